//! Kafka SASL/SCRAM-SHA-512 over TLS on a real Apache Kafka (scripts/kafka) whose SASL_SSL
//! listener requires it: the right password serves an echo through an edge, a router and the
//! demo backends as separate processes; a wrong one exits 69 with one line naming the broker
//! and the mechanism, and no secret in stderr.
//!
//! The broker is the test's own: its server.properties adds a SASL_SSL listener (PEM keystore
//! made here with rcgen, SCRAM-SHA-512 only) next to the PLAINTEXT one that scripts/kafka's
//! readiness check and the controller use; alice's SCRAM credential is created when the log
//! dir is formatted (KAFKA_ADD_SCRAM). Switchyard only ever talks to the SASL_SSL listener.

mod common;

use common::*;
use futures::SinkExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const USER: &str = "alice";
const PASSWORD: &str = "alice-scram-secret-0451";

/// A broker with a SASL_SSL listener; stopped (and its directory removed) on drop.
struct SaslKafka {
    dir: PathBuf,
    /// `kafka://127.0.0.1:<SASL_SSL port>`
    url: String,
    ca: String,
}

impl Drop for SaslKafka {
    fn drop(&mut self) {
        let _ = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka"))
            .args(["stop", self.dir.to_str().unwrap_or_default()])
            .output();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl SaslKafka {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("kafkasasl"));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = pki();
        let (cert, key, ca) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("ca.pem"));
        leaf(&pki, &cert, &key);
        write_ca(&pki, &ca);
        // Kafka's PEM keystore: the PKCS#8 key and the certificate chain in one file.
        let keystore = dir.join("keystore.pem");
        std::fs::write(
            &keystore,
            std::fs::read_to_string(&key).unwrap() + &std::fs::read_to_string(&cert).unwrap(),
        )
        .unwrap();
        let (port, controller, sasl) = (free_port(), free_port(), free_port());
        assert!(port != controller && controller != sasl && port != sasl, "three ports");
        std::fs::write(dir.join("ports"), format!("{port} {controller}\n")).unwrap();
        write_properties(&dir, port, controller, sasl, &keystore);
        let scram = format!("SCRAM-SHA-512=[name={USER},password={PASSWORD}]");
        kafka_script(&["start", dir.to_str().unwrap()], &[("KAFKA_ADD_SCRAM", &scram)]);
        Self {
            url: format!("kafka://127.0.0.1:{sasl}"),
            ca: ca.display().to_string(),
            dir,
        }
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// The SASL flags for `password_file` (or none: the password from the environment).
    fn flags<'a>(&'a self, password_file: Option<&'a str>) -> Vec<&'a str> {
        let mut f = vec![
            "--bus-user",
            USER,
            "--bus-sasl-mechanism",
            "SCRAM-SHA-512",
            "--bus-tls-ca",
            &self.ca,
        ];
        if let Some(p) = password_file {
            f.extend(["--bus-password-file", p]);
        }
        f
    }

    /// Exit 69, one stderr line naming the bus and `(kafka, SCRAM-SHA-512)`, no secret in it.
    async fn refuses(&self, role: &str, flags: &[&str], env: &[(&str, &str)], secrets: &[&str]) {
        let prefix = unique("k");
        let mut args = vec![role, "--bus", &self.url, "--prefix", &prefix];
        args.extend_from_slice(flags);
        let want = format!(
            "switchyard: cannot open bus {}: authentication failed (kafka, SCRAM-SHA-512)",
            self.url
        );
        let took = refused_start(&args, env, &want, secrets).await;
        eprintln!("{role}: refused in {took:?}");
        assert!(
            took < Duration::from_secs(8),
            "fails fast, not after the 10 s metadata timeout: {took:?}"
        );
    }
}

/// scripts/kafka's broker settings, plus a SASL_SSL listener taking only SCRAM-SHA-512.
fn write_properties(dir: &Path, port: u16, controller: u16, sasl: u16, keystore: &Path) {
    let text = format!(
        "process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller},SASL_SSL://127.0.0.1:{sasl}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller},SASL_SSL://127.0.0.1:{sasl}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
log.dirs={data}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
log.cleaner.dedupe.buffer.size=16777216
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location={keystore}
",
        data = dir.join("data").display(),
        keystore = keystore.display(),
    );
    std::fs::write(dir.join("server.properties"), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_512_over_tls() {
    let kafka = tokio::task::spawn_blocking(SaslKafka::start).await.unwrap();
    let good = kafka.file("password", &format!("{PASSWORD}\n"));
    let wrong = "alice-scram-wrong-9999";
    let bad = kafka.file("bad-password", wrong);

    // Wrong password, each role: refused at start.
    for role in ["edge", "router", "demo"] {
        kafka
            .refuses(role, &kafka.flags(Some(&bad)), &[], &[wrong, PASSWORD])
            .await;
    }
    // From the environment instead of a file.
    kafka
        .refuses(
            "standalone",
            &kafka.flags(None),
            &[("SWITCHYARD_BUS_PASSWORD", wrong)],
            &[wrong, PASSWORD],
        )
        .await;

    // Right password: edge, router and demo backends as separate processes.
    let p = unique("k");
    let flags = kafka.flags(Some(&good));
    let edge = spawn("edge", &kafka.url, &p, &flags).await;
    let router = spawn("router", &kafka.url, &p, &flags).await;
    let demo = spawn("demo", &kafka.url, &p, &flags).await;
    for path in ["/ws/echo", "/ws"] {
        let (mut ws, id) = connect(&edge.ws(path)).await;
        if path == "/ws" {
            // Framed: the backend's reply goes through the outbound topic and the router.
            assert_eq!(next_json(&mut ws).await["op"], "welcome");
            ws.send(Message::text(r#"{"op":"send","data":"hi","id":1}"#))
                .await
                .unwrap();
            let mut got = Vec::new();
            while got.len() < 2 {
                got.push(next_json(&mut ws).await);
            }
            assert!(got.iter().any(|v| v["op"] == "ack"), "{got:?}");
            assert!(got.iter().any(|v| v["echo"] == "hi"), "{got:?}");
        } else {
            echo_in_order(&mut ws, &id, 10).await;
        }
        close_normal(&mut ws).await;
    }
    for proc in [&edge, &router, &demo] {
        assert!(!proc.log_tail().join("\n").contains(PASSWORD), "the password in a log");
    }
}

/// Bad Kafka authentication settings: one line, exit 64, before binding.
#[test]
fn bad_kafka_auth_config_is_one_line_and_exit_64() {
    let dir = std::env::temp_dir().join(unique("sy-kauthcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let pw = dir.join("pw");
    std::fs::write(&pw, PASSWORD).unwrap();
    let pw = pw.display().to_string();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let kafka = "kafka://127.0.0.1:9092";
    type Case<'a> = (Vec<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--bus", kafka, "--bus-user", USER, "--bus-password-file", &pw],
            "needs --bus-sasl-mechanism SCRAM-SHA-512",
        ),
        (
            vec!["--bus", kafka, "--bus-sasl-mechanism", "SCRAM-SHA-512"],
            "--bus-sasl-mechanism needs --bus-user",
        ),
        (
            vec!["--bus", kafka, "--bus-sasl-mechanism", "PLAIN"],
            "--bus-sasl-mechanism",
        ),
        (vec!["--bus", kafka, "--bus-token-file", &pw], "is for nats://"),
        (
            vec![
                "--bus",
                "nats://127.0.0.1:4222",
                "--bus-user",
                USER,
                "--bus-password-file",
                &pw,
                "--bus-sasl-mechanism",
                "SCRAM-SHA-512",
            ],
            "--bus-sasl-mechanism is for kafka://",
        ),
    ];
    for (args, expect) in cases {
        let out = std::process::Command::new(binary())
            .args(["--listen", &addr, "--admin", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err:?}");
        assert!(!err.contains(PASSWORD), "no secret in {err:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
