//! Switchyard on Apache Kafka (started by `scripts/test` with `scripts/kafka`, found through
//! KAFKA_BROKERS): edges, routers and backends as processes, a Python backend with
//! confluent-kafka, replay, and a broker restart mid-stream. Every test uses its own prefix.

mod common;

use common::*;
use futures::SinkExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use switchyard_bus::kafka::SessionLog;
use tokio_tungstenite::tungstenite::Message;

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").expect("KAFKA_BROKERS is not set: run ./scripts/test, which starts a Kafka broker")
}

fn kafka_url() -> String {
    format!("kafka://{}", brokers())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_sessions_keep_per_session_order_end_to_end() {
    raise_fd_limit();
    let (url, p) = (kafka_url(), unique("k"));
    // The default --ack-timeout (10 s). IN_FLIGHT sessions at once: a session's time grows with
    // IN_FLIGHT while the total does not, and each reply must come within WAIT.
    let edges = [spawn("edge", &url, &p, &[]).await, spawn("edge", &url, &p, &[]).await];
    let _routers = [
        spawn("router", &url, &p, &[]).await,
        spawn("router", &url, &p, &[]).await,
    ];
    let _demo = spawn("demo", &url, &p, &[]).await;
    const IN_FLIGHT: usize = 100;
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::new();
    for c in 0..1000 {
        let permit = in_flight.clone().acquire_owned().await.unwrap();

        // Raw echo (answered on the node topic) and framed send (answered through the routers'
        // consumer group): both keep each session's order on Kafka.
        let (path, edge) = if c % 4 == 0 {
            ("/ws", &edges[c % 2])
        } else {
            ("/ws/echo", &edges[c % 2])
        };
        let url = edge.ws(path);
        tasks.push(tokio::spawn(async move {
            let began = Instant::now();
            let (mut ws, id) = connect(&url).await;
            if path == "/ws" {
                assert_eq!(next_json(&mut ws).await["op"], "welcome");
                for i in 0..5 {
                    ws.send(Message::text(json!({"op":"send","data":[c, i]}).to_string()))
                        .await
                        .unwrap();
                }
                for i in 0..5 {
                    assert_eq!(
                        next_json(&mut ws).await,
                        json!({"echo": [c, i]}),
                        "session {c}: own replies in order"
                    );
                }
            } else {
                echo_in_order(&mut ws, &id, 5).await;
            }
            close_normal(&mut ws).await;
            drop(permit);
            began.elapsed()
        }));
    }
    let mut took = Vec::new();
    for t in tasks {
        took.push(t.await.unwrap());
    }
    took.sort();
    eprintln!(
        "1,000 sessions, {IN_FLIGHT} at once: per session p50 {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_backend_with_confluent_kafka_answers_clients() {
    let (url, p) = (kafka_url(), unique("k"));
    let edges = [spawn("edge", &url, &p, &[]).await, spawn("edge", &url, &p, &[]).await];
    let _router = spawn("router", &url, &p, &[]).await;
    // The edge creates the inbound topic on first use; create it now so the backend can join.
    let bus = bus_for(&url, &p).await;
    bus.publish(&format!("{p}.in.echo"), Default::default()).await.unwrap();
    let _py = spawn_python(
        "kafka_backend.py",
        &["--brokers", &brokers(), "--prefix", &p, "--topic", "echo"],
    )
    .await;
    for c in 0..10 {
        let (mut ws, id) = connect(&edges[c % 2].ws("/ws/echo")).await;
        ws.send(Message::text(format!("hi {id}"))).await.unwrap();
        ws.send(Message::binary(vec![c as u8, 0xff])).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text(format!("kafka:hi {id}")));
        assert_eq!(
            next_data(&mut ws).await,
            Message::binary(vec![b'k', b'a', b'f', b'k', b'a', b':', c as u8, 0xff])
        );
    }
}

fn replay(args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary())
        .arg("replay")
        .args(args)
        .output()
        .expect("run replay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_prints_the_transcript_and_redrives_it() {
    let (url, p) = (kafka_url(), unique("k"));
    let gw = spawn("standalone", &url, &p, &["--demo"]).await;
    let (mut ws, id) = connect(&gw.ws("/ws/echo")).await;
    let sent = vec![
        Message::text("one"),
        Message::binary(vec![0u8, 1, 2]),
        Message::text("three ✓"),
    ];
    let mut received = Vec::new();
    for m in &sent {
        ws.send(m.clone()).await.unwrap();
        received.push(next_data(&mut ws).await);
    }
    close_normal(&mut ws).await;
    // `switchyard replay` of this session, with `extra` arguments.
    let of_session = |extra: &[&str]| {
        let base = ["--bus", url.as_str(), "--prefix", p.as_str(), "--session", id.as_str()];
        replay(&[&base[..], extra].concat())
    };
    // The disconnect is the last record: wait until the transcript ends with it.
    let mut lines: Vec<Value> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while lines.last().map(|l| l["kind"] != "disconnect").unwrap_or(true) {
        assert!(Instant::now() < deadline, "disconnect recorded in time");
        let out = of_session(&[]);
        if out.status.success() {
            lines = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        }
    }
    let payload = |l: &Value| -> Message {
        match (l["payload"].as_str(), l["payload_b64"].as_str()) {
            (Some(t), _) => Message::text(t),
            (_, Some(b)) => Message::binary(base64_decode(b)),
            _ => panic!("no payload in {l}"),
        }
    };
    let client_sent: Vec<Message> = lines
        .iter()
        .filter(|l| l["direction"] == "in" && l["kind"] == "frame")
        .map(payload)
        .collect();
    let client_got: Vec<Message> = lines.iter().filter(|l| l["direction"] == "out").map(payload).collect();
    assert_eq!(client_sent, sent, "transcript = what the client sent");
    assert_eq!(client_got, received, "transcript = what the client received");
    assert_eq!(lines.first().unwrap()["kind"], "connect");
    let ts: Vec<i64> = lines.iter().map(|l| l["ts"].as_i64().unwrap()).collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "interleaved by time");

    // --to-ws against the echo route reproduces the replies. It stops once the three replies
    // the session originally got are back; the linger only bounds a quiet spell.
    // Re-drives the session into `path`; returns the messages that came back (closes left
    // out) and what replay said on stderr.
    let redrive = |path: &str, linger: &str| {
        let out = of_session(&["--to-ws", &gw.ws(path), "--speed", "0", "--linger", linger]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let back: Vec<Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["kind"] != "close")
            .collect();
        (back, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (back, said) = redrive("/ws/echo", "30s");
    let again: Vec<Message> = back.iter().map(payload).collect();
    assert_eq!(again, received, "re-driven frames produce the same replies");
    assert!(
        said.contains("received 3 messages (the session originally received 3)"),
        "{said}"
    );
    // Against a framed route the edge's own ops come back too (welcome, an error per frame
    // that is not a framed op): they are printed, and replay waits the whole --linger.
    let (back, said) = redrive("/ws", "5s");
    let ops: Vec<Value> = back
        .iter()
        .map(|l| serde_json::from_str(l["payload"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(ops.len(), 4, "{ops:?}");
    assert_eq!(ops[0]["op"], "welcome");
    assert!(ops[1..].iter().all(|o| o["op"] == "error"), "{ops:?}");
    assert!(
        said.contains("received 4 messages, protocol ops included; a framed route waits the whole --linger"),
        "{said}"
    );

    // Clear errors.
    let out = replay(&["--bus", &url, "--prefix", &p, "--session", "01NOSUCHSESSIONAAAAAAAAAAA"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no records for session"));
    let out = of_session(&["--from", "2001-01-01T00:00:00Z", "--to", "2001-01-02T00:00:00Z"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none in the given range"));
    let out = replay(&["--bus", "memory://", "--session", &id]);
    assert_eq!(out.status.code(), Some(64));
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_topic_marks_records_as_replayed() {
    let (url, p) = (kafka_url(), unique("k"));
    let gw = spawn("standalone", &url, &p, &["--demo"]).await;
    let (mut ws, id) = connect(&gw.ws("/ws/echo")).await;
    ws.send(Message::text("x")).await.unwrap();
    next_data(&mut ws).await;
    close_normal(&mut ws).await;
    let staging = format!("{p}.in.staging");
    let deadline = Instant::now() + WAIT;
    loop {
        let out = replay(&["--bus", &url, "--prefix", &p, "--session", &id, "--to-topic", &staging]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let log = SessionLog::new(&url, switchyard_protocol::Naming::new(&p).unwrap(), Default::default());
        let sid = id.clone();
        let recs = tokio::task::spawn_blocking(move || log.read(&sid, None, None, &|_, _| {}))
            .await
            .unwrap()
            .unwrap();
        let replayed: Vec<_> = recs.iter().filter(|r| r.topic == staging).collect();
        if replayed.iter().any(|r| r.headers.get("sy-kind") == Some("disconnect")) {
            assert!(replayed.iter().all(|r| r.headers.get("sy-replayed") == Some("true")));
            let live: Vec<_> = recs.iter().filter(|r| r.topic == format!("{p}.in.echo")).collect();
            assert!(
                live.iter().all(|r| r.headers.get("sy-replayed").is_none()),
                "live records untouched"
            );
            break;
        }
        assert!(Instant::now() < deadline, "replayed records arrive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_no_acknowledged_frame_and_counts_the_rest() {
    // A broker of the test's own (scripts/kafka), killed with SIGKILL and started again on the
    // same ports and log dir.
    let dir = std::env::temp_dir().join(unique("kafka"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = kafka_script(&["start", dir.to_str().unwrap()], &[])
        .trim()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let _stop = StopKafka(dir.clone());
    let url = format!("kafka://127.0.0.1:{port}");
    let p = unique("k");
    let gw = spawn("standalone", &url, &p, &[]).await;
    let until = Instant::now() + Duration::from_secs(8);
    let senders: Vec<_> = (0..5).map(|_| tokio::spawn(sender(gw.ws("/ws"), until))).collect();
    tokio::time::sleep(Duration::from_millis(2000)).await; // let traffic flow first
    send_signal(std::fs::read_to_string(dir.join("kafka.pid")).unwrap().trim(), "-9");
    tokio::time::sleep(Duration::from_millis(1000)).await; // outage length, not synchronisation
                                                           // `restart` waits until the broker answers again (and the old one is gone).
    let restart = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || kafka_script(&["restart", dir.to_str().unwrap()], &[]))
    };

    restart.await.unwrap();
    let mut results = Vec::new();
    for s in senders {
        results.push(s.await.unwrap());
    }
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    for (session, _, _) in &results {
        let log = SessionLog::new(&url, switchyard_protocol::Naming::new(&p).unwrap(), Default::default());
        let sid = session.clone();
        let recs = tokio::task::spawn_blocking(move || log.read(&sid, None, None, &|_, _| {}))
            .await
            .unwrap()
            .unwrap();
        let frames = recs
            .iter()
            .filter(|r| r.headers.get("sy-kind") == Some("frame"))
            .map(|r| serde_json::from_slice(&r.payload).unwrap())
            .collect();
        stored.insert(session.clone(), frames);
    }
    let (acked_n, told_n, told_but_stored) = account(&results, &mut stored);
    let refused = sample(
        &gw.admin.to_string(),
        r#"switchyard_drops_total{route="/ws",reason="bus_refused"}"#,
    )
    .await;
    eprintln!("kafka restart: {acked_n} acked (all stored), {told_n} refused and told ({told_but_stored} stored anyway), metric bus_refused={refused}");
    assert!(acked_n > 0);
    assert_eq!(refused as usize, told_n, "every refusal counted exactly");
}

/// Stops the test's own broker when the test ends, however it ends.
struct StopKafka(std::path::PathBuf);

impl Drop for StopKafka {
    fn drop(&mut self) {
        let _ = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka"))
            .args(["stop", self.0.to_str().unwrap_or_default()])
            .output();
    }
}

/// Runs a Python snippet with confluent-kafka (the test command installs it); returns stdout.
fn python(code: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python3");
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Creates a compacted topic that the broker cleans within moments (a new segment every 100 ms,
/// cleaned at any dirty ratio, tombstones kept 100 ms).
const CREATE_EAGER_COMPACTED: &str = r#"
import sys
from confluent_kafka.admin import AdminClient, NewTopic
a = AdminClient({"bootstrap.servers": sys.argv[1]})
t = NewTopic(sys.argv[2], num_partitions=int(sys.argv[3]), replication_factor=1, config={
    "cleanup.policy": "compact", "segment.ms": "100", "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "100", "min.compaction.lag.ms": "0"})
a.create_topics([t])[sys.argv[2]].result(30)
"#;

/// Prints every key the topic holds (one per line; `TOMBSTONE ` before a null-valued one),
/// reading each partition from its start to its end.
const KEYS_IN_TOPIC: &str = r#"
import sys, uuid
from confluent_kafka import Consumer
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "keys-" + uuid.uuid4().hex,
              "auto.offset.reset": "earliest", "enable.partition.eof": True,
              "enable.auto.commit": False})
c.subscribe([sys.argv[2]])
parts, eof = None, set()
while parts is None or len(eof) < parts:
    m = c.poll(1.0)
    if m is None:
        continue
    if parts is None:
        parts = len(c.list_topics(sys.argv[2]).topics[sys.argv[2]].partitions)
    if m.error():
        if m.error().code() == -191:  # _PARTITION_EOF
            eof.add(m.partition())
        continue
    print(("TOMBSTONE " if m.value() is None else "") + m.key().decode())
c.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_feed_keeps_only_live_sessions_after_compaction() {
    let (url, p) = (kafka_url(), unique("k"));
    let feed = format!("{p}.sessions");
    python(CREATE_EAGER_COMPACTED, &[&brokers(), &feed, "4"]);
    let edge = spawn("edge", &url, &p, &["--partitions", "4"]).await;
    let mut live = std::collections::BTreeSet::new();
    let mut gone = std::collections::BTreeSet::new();
    let mut open = Vec::new(); // the live sessions' sockets, open until the test ends
    for i in 0..12 {
        let (mut ws, id) = connect(&edge.ws("/ws/echo")).await;
        if i % 3 == 0 {
            live.insert(id);
            open.push(ws);
        } else {
            close_normal(&mut ws).await;
            assert_eq!(close_code(&mut ws).await, Some(1000));
            gone.insert(id);
        }
    }
    // Compaction never cleans the active segment: keep connecting (live sessions) until the
    // closed sessions' records, tombstones included, are gone from the feed.
    let deadline = Instant::now() + Duration::from_secs(90);
    let held = loop {
        let keys = python(KEYS_IN_TOPIC, &[&brokers(), &feed]);
        let held: std::collections::BTreeSet<String> = keys.lines().map(str::to_owned).collect();
        if held.iter().all(|k| live.contains(k)) && live.iter().all(|k| held.contains(k)) {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "closed sessions still in the feed: {:?}",
            held.iter().filter(|k| !live.contains(*k)).collect::<Vec<_>>()
        );
        let (ws, id) = connect(&edge.ws("/ws/echo")).await;
        open.push(ws);
        live.insert(id);
    };
    assert!(gone.iter().all(|g| !held.contains(g)));
    // A router started now reads the feed from its start: exactly the live sessions.
    let router = spawn("router", &url, &p, &["--partitions", "4"]).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let n = sample(&router.admin.to_string(), "switchyard_router_sessions").await as usize;
        if n == live.len() {
            break;
        }
        assert!(
            n < live.len() && Instant::now() < deadline,
            "router registry {n}, live {}",
            live.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "feed after compaction: {} live sessions, {} closed ones gone",
        live.len(),
        gone.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_stream_loses_no_acknowledged_reply() {
    let (url, p) = (kafka_url(), unique("k"));
    let edge = spawn("edge", &url, &p, &[]).await;
    let mut doomed = spawn("router", &url, &p, &[]).await;
    let _survivor = spawn("router", &url, &p, &[]).await;
    let _demo = spawn("demo", &url, &p, &[]).await;
    let until = Instant::now() + Duration::from_secs(8);
    let clients: Vec<_> = (0..20)
        .map(|_| tokio::spawn(send_and_collect_replies(edge.ws("/ws"), until)))
        .collect();
    tokio::time::sleep(Duration::from_millis(2500)).await; // mid-stream, not synchronisation
    doomed.kill9();
    let (acked_n, dups) = every_acked_send_answered(clients).await;
    eprintln!("router SIGKILL mid-stream: {acked_n} acknowledged sends, every one answered; {dups} duplicate replies");
}
