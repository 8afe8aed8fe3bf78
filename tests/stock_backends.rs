//! The example backends written with stock clients of other languages, end to end against the
//! brokers `scripts/test` starts (found through KAFKA_BROKERS and NATS_URL): the Java one (Apache
//! kafka-clients) answering through edges and a router on Kafka and checking `sy-sig`; Java's
//! default partitioner agreeing with the edge's; the Go one (nats.go) answering on NATS through
//! `sy-reply`. The programs are built by `scripts/build-examples`, never here: a missing one
//! fails the test with that command.

mod common;

use bytes::Bytes;
use common::*;
use futures::SinkExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard_bus::kafka::SessionLog;
use switchyard_protocol::Headers;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").expect("KAFKA_BROKERS is not set: run ./scripts/test, which starts a Kafka broker")
}

fn nats_url() -> String {
    std::env::var("NATS_URL").expect("NATS_URL is not set: run ./scripts/test, which starts nats-server")
}

/// Where `scripts/build-examples` puts everything.
fn examples_build() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/examples-build")
}

/// A program `scripts/build-examples` builds: at `$var` when set, else at its fixed path.
fn artifact(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| examples_build().join(name));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-examples (it builds the example backends into {})",
        path.display(),
        examples_build().display()
    );
    path
}

/// The Java backend's jar, refused when a file of its project is newer (the rule
/// `scripts/build-examples` rebuilds by), so an edited example is never tested stale.
fn java_jar() -> PathBuf {
    let jar = artifact("SWITCHYARD_JAVA_BACKEND_JAR", "switchyard-java-kafka-backend.jar");
    let built = std::fs::metadata(&jar).unwrap().modified().unwrap();
    let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/java-kafka-backend");
    let mut dirs = vec![project.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            if path == project.join("target") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                dirs.push(path);
            } else {
                assert!(
                    e.metadata().unwrap().modified().unwrap() <= built,
                    "{} is newer than {}: run scripts/build-examples",
                    path.display(),
                    jar.display()
                );
            }
        }
    }
    jar
}

/// `java` with the flags that start a small JVM fastest on a busy 2-core machine.
fn java() -> tokio::process::Command {
    let mut c = tokio::process::Command::new("java");
    c.args(["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xmx256m"]);
    c
}

/// An example backend process: started, and ready once it printed its "ready" line on stdout.
/// Its stderr (refusals, the summary at exit) is collected; it is printed if the test fails.
struct Backend {
    child: tokio::process::Child,
    name: &'static str,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_done: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    async fn start(name: &'static str, mut cmd: tokio::process::Command) -> Backend {
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = stderr.clone();
        let stderr_done = tokio::spawn(async move {
            while let Ok(Some(l)) = err_lines.next_line().await {
                sink.lock().unwrap().push(l);
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut b = Backend {
            child,
            name,
            stderr,
            stderr_done: Some(stderr_done),
        };
        let line = tokio::time::timeout(WAIT, out.next_line())
            .await
            .unwrap_or_else(|_| panic!("{name}: no ready line within {WAIT:?}"))
            .unwrap();
        match line {
            Some(l) if l.contains("ready") => eprintln!("{name}: {l}"),
            other => {
                let _ = b.child.wait().await;
                panic!("{name} did not start: {other:?}");
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
        b
    }

    fn lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until at least `n` stderr lines satisfy `pred`.
    async fn wait_for(&self, n: usize, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + WAIT;
        while self.lines().iter().filter(|l| pred(l)).count() < n {
            assert!(Instant::now() < deadline, "{}: {n} lines of {what} in time", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then everything it wrote on stderr once it exited.
    async fn stop(mut self) -> Vec<String> {
        send_signal(&self.child.id().expect("running").to_string(), "-TERM");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} stops on SIGTERM", self.name))
            .unwrap();
        let _ = tokio::time::timeout(WAIT, self.stderr_done.take().unwrap()).await;
        // The JVM exits 143 after SIGTERM even when its shutdown hook ran to the end.
        assert!(
            status.success() || status.code() == Some(143),
            "{} exited with {status}",
            self.name
        );
        self.lines()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let lines = self.lines();
            let from = lines.len().saturating_sub(40);
            eprintln!("--- stderr of {} (last {} lines) ---", self.name, lines.len() - from);
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
    }
}

async fn java_backend(extra: &[&str]) -> Backend {
    let mut cmd = java();
    cmd.arg("-jar")
        .arg(java_jar())
        .arg("--brokers")
        .arg(brokers())
        .args(extra);
    Backend::start("java kafka backend", cmd).await
}

/// A key file as an operator writes one: 38 bytes and a newline, which the edge (and the Java
/// backend, reading it the same way) trims.
fn key_file(dir: &Path, name: &str, key: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{key}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(unique("stock-backends"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Sends `n` text frames tagged with the session, then one binary frame, and expects exactly
/// `tag` + each of them back, in order: only its own replies, none lost, none extra.
async fn tagged_echo(mut ws: Ws, id: String, n: usize, tag: &'static str) {
    for i in 0..n {
        ws.send(Message::text(format!("{id}:{i}"))).await.unwrap();
    }
    let binary = [0u8, 0xff, 0xfe, n as u8];
    ws.send(Message::binary(binary.to_vec())).await.unwrap();
    for i in 0..n {
        assert_eq!(
            next_data(&mut ws).await,
            Message::text(format!("{tag}{id}:{i}")),
            "session {id}: reply {i}"
        );
    }
    let mut want = tag.as_bytes().to_vec();
    want.extend_from_slice(&binary);
    assert_eq!(
        next_data(&mut ws).await,
        Message::binary(want),
        "session {id}: binary reply"
    );
    close_normal(&mut ws).await;
}

const SESSIONS: usize = 8;
const FRAMES: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_backend_answers_signed_frames_through_edges_and_a_router_and_refuses_forgeries() {
    let (url, p) = (format!("kafka://{}", brokers()), unique("k"));
    let dir = temp_dir();
    let key = key_file(&dir, "edge.key", "0123456789abcdef0123456789-java-edge");
    let signed = ["--identity-hmac-key-file", key.as_str()];
    let edges = [
        spawn("edge", &url, &p, &signed).await,
        spawn("edge", &url, &p, &signed).await,
    ];
    let _router = spawn("router", &url, &p, &[]).await;
    // The sessions connect first: the edges create the inbound topic with their connects.
    let mut clients = Vec::new();
    for c in 0..SESSIONS {
        clients.push(connect(&edges[c % 2].ws("/ws/echo")).await);
    }
    // Two forged frames for the first session, in its partition ahead of its real frames: one
    // unsigned, one with a signature made without the key. Answered, either would reach the
    // client before its first real reply.
    let bus = bus_for(&url, &p).await;
    let victim = clients[0].1.clone();
    for sig in [None, Some(format!("v1={}", "0".repeat(64)))] {
        let mut h = Headers::new();
        for (k, v) in [
            ("sy-v", "1"),
            ("sy-session", victim.as_str()),
            ("sy-kind", "frame"),
            ("sy-seq", "99"),
            ("sy-opcode", "text"),
        ] {
            h.insert(k, v);
        }
        if let Some(s) = sig {
            h.insert("sy-sig", s);
        }
        let record = switchyard_bus::Record {
            key: Some(Bytes::from(victim.clone())),
            headers: h,
            payload: Bytes::from_static(b"forged"),
        };
        bus.publish(&format!("{p}.in.echo"), record).await.unwrap();
    }
    let java = java_backend(&[
        "--prefix",
        &p,
        "--topic",
        "echo",
        "--group",
        "java",
        "--hmac-key-file",
        &key,
    ])
    .await;
    let began = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(ws, id)| tokio::spawn(tagged_echo(ws, id, FRAMES, "java:")))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!(
        "java backend: {SESSIONS} sessions x {} frames answered in order in {:?}",
        FRAMES + 1,
        began.elapsed()
    );
    java.wait_for(2, "refusals", |l| l.starts_with("refused")).await;
    let log = java.stop().await;
    let refused: Vec<&String> = log.iter().filter(|l| l.starts_with("refused")).collect();
    assert_eq!(refused.len(), 2, "only the forgeries are refused: {refused:#?}");
    assert!(refused.iter().all(|l| l.contains(&victim)), "{refused:#?}");
    assert!(refused[0].ends_with("no sy-sig; refused 1"), "{}", refused[0]);
    assert!(refused[1].ends_with("bad signature; refused 2"), "{}", refused[1]);
    let total = SESSIONS * (FRAMES + 1);
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("answered {total} frames, refused 2 records"))),
        "summary: {log:#?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_backend_with_the_wrong_key_answers_nothing_and_reports_each_refusal() {
    let (url, p) = (format!("kafka://{}", brokers()), unique("k"));
    let dir = temp_dir();
    let edge_key = key_file(&dir, "edge.key", "0123456789abcdef0123456789-java-edge");
    let wrong_key = key_file(&dir, "wrong.key", "0123456789abcdef0123456789-java-EDGE");
    let edge = spawn("edge", &url, &p, &["--identity-hmac-key-file", &edge_key]).await;
    let _router = spawn("router", &url, &p, &[]).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&edge.ws("/ws/echo")).await);
    }
    let java = java_backend(&["--prefix", &p, "--topic", "echo", "--hmac-key-file", &wrong_key]).await;
    for (ws, id) in &mut clients {
        for i in 0..3 {
            ws.send(Message::text(format!("{id}:{i}"))).await.unwrap();
        }
    }
    // All nine frames reach the backend and are refused ...
    java.wait_for(9, "refused frames", |l| {
        l.starts_with("refused frame record") && l.contains("bad signature")
    })
    .await;
    // ... and nothing comes back (a reply would take milliseconds through the router).
    for (ws, id) in &mut clients {
        let quiet = tokio::time::timeout(Duration::from_secs(1), next_data(ws)).await;
        assert!(quiet.is_err(), "session {id} got a reply: {quiet:?}");
    }
    let log = java.stop().await;
    for (_, id) in &clients {
        let of_session = log
            .iter()
            .filter(|l| l.starts_with("refused") && l.contains(id.as_str()));
        // Its connect and its three frames (and its disconnect, if the edge already sent one).
        assert!(of_session.count() >= 4, "{id}: {log:#?}");
    }
    assert!(
        log.iter().any(|l| l.contains("answered 0 frames, refused")),
        "summary: {log:#?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_default_partitioner_puts_each_session_where_the_edge_does() {
    const PARTITIONS: u32 = 12;
    let (url, p) = (format!("kafka://{}", brokers()), unique("k"));
    let edge = spawn("edge", &url, &p, &["--partitions", &PARTITIONS.to_string()]).await;
    // Each session's connect record is keyed by session in the inbound topic.
    let mut clients = Vec::new();
    for _ in 0..32 {
        clients.push(connect(&edge.ws("/ws/echo")).await);
    }
    let ids: Vec<String> = clients.iter().map(|(_, id)| id.clone()).collect();
    // Java: produce a record keyed by each session to a topic with as many partitions, with
    // the producer's default partitioner, and print the partition the broker acknowledged.
    let out = java()
        .arg("-cp")
        .arg(java_jar())
        .arg("switchyard.example.Partition")
        .args(["--brokers", &brokers(), "--topic", &format!("{p}.parity")])
        .args(["--partitions", &PARTITIONS.to_string()])
        .args(&ids)
        .output()
        .await
        .expect("java");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Partition: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let java: std::collections::HashMap<&str, (u32, u32)> = stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0], (f[1].parse().unwrap(), f[2].parse().unwrap()))
        })
        .collect();
    assert_eq!(java.len(), ids.len(), "one line per session: {stdout}");
    // Where the edge's record of each session really is.
    let naming = switchyard_protocol::Naming::new(&p).unwrap();
    let inbound = format!("{p}.in.echo");
    let mut used = std::collections::BTreeSet::new();
    for id in &ids {
        let deadline = Instant::now() + WAIT;
        let landed = loop {
            let log = SessionLog::new(&url, naming.clone(), Default::default());
            let sid = id.clone();
            let recs = tokio::task::spawn_blocking(move || log.read(&sid, None, None, &|_, _| {}))
                .await
                .unwrap();
            // SessionLog looks in the partition murmur2 names (partition_for); a record the
            // edge put anywhere else would never be found here.
            let found = recs.ok().and_then(|rs| {
                rs.into_iter()
                    .find(|r| r.topic == inbound && r.headers.get("sy-kind") == Some("connect"))
            });
            if let Some(r) = found {
                assert_eq!(r.key.as_deref(), Some(id.as_bytes()), "keyed by session");
                break r.partition as u32;
            }
            assert!(
                Instant::now() < deadline,
                "the edge's connect for {id} is not in partition {} of {inbound}",
                switchyard_protocol::naming::partition_for(id.as_bytes(), PARTITIONS)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let (acked, hashed) = java[id.as_str()];
        let rust = switchyard_protocol::naming::partition_for(id.as_bytes(), PARTITIONS);
        assert_eq!(
            (landed, rust, hashed),
            (acked, acked, acked),
            "session {id}: (edge's record, partition_for, Java murmur2) vs Java producer"
        );
        used.insert(landed);
    }
    assert!(used.len() >= 6, "32 sessions spread over partitions: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_backend_with_nats_go_answers_clients_on_both_edges_through_sy_reply() {
    let (url, p) = (nats_url(), unique("t"));
    // No router: a reply reaches a socket only through the record's sy-reply subject.
    let edges = [spawn("edge", &url, &p, &[]).await, spawn("edge", &url, &p, &[]).await];
    let mut cmd = tokio::process::Command::new(artifact("SWITCHYARD_GO_BACKEND", "go-nats-backend"));
    cmd.args(["--nats", &url, "--prefix", &p, "--topic", "echo"]);
    // Subscribed before any client connects: core NATS subscribers see only live messages.
    let go = Backend::start("go nats backend", cmd).await;
    let mut tasks = Vec::new();
    let began = Instant::now();
    for c in 0..SESSIONS {
        let (ws, id) = connect(&edges[c % 2].ws("/ws/echo")).await;
        tasks.push(tokio::spawn(tagged_echo(ws, id, FRAMES, "go:")));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!(
        "go backend: {SESSIONS} sessions x {} frames answered in order in {:?}",
        FRAMES + 1,
        began.elapsed()
    );
    let log = go.stop().await;
    let total = SESSIONS * (FRAMES + 1);
    assert!(
        log.iter().any(|l| l.contains(&format!("answered {total} frames"))),
        "summary: {log:#?}"
    );
}
