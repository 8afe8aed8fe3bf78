//! Resume on another edge (docs/continuity.md): two edges, a router, on a real nats-server and
//! a real Kafka broker, as separate processes sharing a resume key. A v2 client drops from one
//! edge and resumes on the other while replies keep coming: every reply once, in order; the
//! backend sees one connect, one resume (with the new node), no disconnect, and sy-seq
//! continuing. Then the session is taken back from a socket that still looks alive, and a
//! drained edge (SIGTERM, 1012) hands its sessions over. An edge killed with SIGKILL cannot hand
//! over: on NATS the resume is refused, with a reason; on Kafka the session's deliveries are
//! read back from the log, and it resumes anyway.

mod common;

use common::*;
use futures::SinkExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use switchyard_bus::{Bus, SubscribeOptions, Subscription};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn nats_url() -> String {
    std::env::var("NATS_URL").expect("NATS_URL is not set: run ./scripts/test, which starts nats-server")
}

fn kafka_url() -> String {
    let b = std::env::var("KAFKA_BROKERS").expect("KAFKA_BROKERS is not set: run ./scripts/test, which starts Kafka");
    format!("kafka://{b}")
}

/// A resume key file shared by the edges of one test (removed when dropped).
struct KeyFile(std::path::PathBuf);

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn key_file() -> KeyFile {
    let path = std::env::temp_dir().join(unique("sy-resume-key"));
    std::fs::write(&path, b"a-cluster-resume-key-for-the-handover-tests").unwrap();
    KeyFile(path)
}

struct Cluster {
    prefix: String,
    node_a: String,
    node_b: String,
    a: Proc,
    b: Proc,
    router: Proc,
    bus: std::sync::Arc<dyn Bus>,
    naming: switchyard_protocol::Naming,
    _key: KeyFile,
}

async fn cluster(url: &str, extra: &[&str]) -> Cluster {
    cluster_with(url, extra, &[]).await
}

/// Two edges (each with `extra`) and a router (with `router_extra`).
async fn cluster_with(url: &str, extra: &[&str], router_extra: &[&str]) -> Cluster {
    let p = unique("h");
    let key = key_file();
    let k = key.0.to_str().unwrap().to_owned();
    let mut args = vec!["--resume-key-file", k.as_str()];
    args.extend_from_slice(extra);
    let router = spawn("router", url, &p, router_extra).await;
    let (na, nb) = (format!("{p}-a"), format!("{p}-b"));
    let a = spawn(
        "edge",
        url,
        &p,
        &[args.as_slice(), &["--node-id", na.as_str()]].concat(),
    )
    .await;
    let b = spawn(
        "edge",
        url,
        &p,
        &[args.as_slice(), &["--node-id", nb.as_str()]].concat(),
    )
    .await;
    Cluster {
        prefix: p.clone(),
        node_a: na,
        node_b: nb,
        a,
        b,
        router,
        bus: bus_for(url, &p).await,
        naming: switchyard_protocol::Naming::new(&p).unwrap(),
        _key: key,
    }
}

/// A v2 framed client on `url`: the socket and its welcome.
async fn v2(url: &str) -> (Ws, Value) {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "switchyard.v2".parse().unwrap());
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect in time")
        .expect("upgrade");
    let w = next_json(&mut ws).await;
    assert_eq!(w["op"], "welcome", "{w}");
    (ws, w)
}

/// A v2 client on `edge` whose connect the backend saw: (socket, session, resume token).
async fn connected(edge: &Proc, backend: &mut Backend) -> (Ws, String, String) {
    let (ws, w) = v2(&edge.ws("/ws")).await;
    let session = w["session"].as_str().unwrap().to_owned();
    let token = w["resume_token"].as_str().unwrap().to_owned();
    assert_eq!(backend.next(&session).await.0, "connect");
    (ws, session, token)
}

/// A backend reply to `session`, through the router (the edge's admin API publishes it to the
/// outbound topic).
async fn push(admin: &str, session: &str, i: u64) {
    let r = reqwest::Client::new()
        .post(format!("{admin}/api/sessions/{session}/send"))
        .json(&json!({ "data": { "i": i } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap_or_default());
}

/// Reads deliver ops until reply `last` came: (n, i) pairs. Anything else but acks fails.
async fn until_reply(ws: &mut Ws, last: u64) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    loop {
        let v = next_json(ws).await;
        match v["op"].as_str() {
            Some("deliver") => {
                let i = v["data"]["i"].as_u64().expect("a pushed reply");
                got.push((v["n"].as_u64().unwrap(), i));
                if i == last {
                    return got;
                }
            }
            Some("ack") => {}
            _ => panic!("unexpected {v}"),
        }
    }
}

/// Lifecycle records of the route `app` (connect, frame, resume, disconnect) of `session`,
/// as (kind, seq, node, synthetic).
struct Backend(Subscription);

impl Backend {
    async fn new(c: &Cluster) -> Self {
        Self(
            c.bus
                .subscribe(&c.naming.inbound("app"), SubscribeOptions::default())
                .await
                .unwrap(),
        )
    }
    async fn next(&mut self, session: &str) -> (String, u64, String) {
        loop {
            let m = tokio::time::timeout(WAIT, self.0.recv())
                .await
                .expect("an inbound record in time")
                .unwrap();
            let h = &m.record.headers;
            if h.get("sy-session") == Some(session) {
                return (
                    h.get("sy-kind").unwrap_or("").to_owned(),
                    h.get("sy-seq").and_then(|s| s.parse().ok()).unwrap_or(0),
                    h.get("sy-node").unwrap_or("").to_owned(),
                );
            }
        }
    }
}

/// Polls a metric on `admin` until it reaches `want` (bounded by WAIT).
async fn metric_reaches(admin: &std::net::SocketAddr, series: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if sample(&admin.to_string(), series).await >= want {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let text = metrics_text(&admin.to_string()).await;
            let name = series.split('{').next().unwrap();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(name) || l.contains("handover"))
                .collect();
            panic!("{series} never reached {want}: {lines:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resumes `session` on `edge` for a client that had 3 deliveries, while the replies
/// `first..=60` are pushed one per 5 ms: checks the welcome and that 4..60 come once, in order,
/// numbered on; returns the socket and its new token.
async fn resume_while_replies_come(admin: &str, edge: &Proc, session: &str, token: &str, first: u64) -> (Ws, String) {
    let pusher = {
        let (admin, session) = (admin.to_owned(), session.to_owned());
        tokio::spawn(async move {
            for i in first..=60 {
                push(&admin, &session, i).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let (mut ws, w) = v2(&edge.ws(&format!("/ws?resume={token}&delivered=3"))).await;
    assert_eq!(w["resumed"], true, "{w}");
    assert_eq!(w["session"], session);
    let token2 = w["resume_token"].as_str().unwrap().to_owned();
    pusher.await.unwrap();
    assert_contiguous(&until_reply(&mut ws, 60).await, 4, 4, 60);
    (ws, token2)
}

fn assert_contiguous(got: &[(u64, u64)], first_n: u64, first_i: u64, last_i: u64) {
    let want: Vec<(u64, u64)> = (first_i..=last_i).map(|i| (first_n + i - first_i, i)).collect();
    assert_eq!(got, want.as_slice(), "every reply once, in order, numbered on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_the_other_edge_on_nats() {
    resumes_on_the_other_edge(&nats_url()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_the_other_edge_on_kafka() {
    resumes_on_the_other_edge(&kafka_url()).await
}

async fn resumes_on_the_other_edge(url: &str) {
    // A window longer than the test's waits: a record passed back and forth between the two
    // nodes until a `moved` entry expires would not arrive in time.
    let c = cluster(url, &["--resume-window", "120s"]).await;
    let (node_a, node_b) = (c.node_a.clone(), c.node_b.clone());
    let mut backend = Backend::new(&c).await;
    let admin = c.a.admin("");
    let (mut ws, w) = v2(&c.a.ws("/ws")).await;
    let session = w["session"].as_str().unwrap().to_owned();
    let token = w["resume_token"].as_str().unwrap().to_owned();
    assert_eq!(backend.next(&session).await, ("connect".into(), 1, node_a.clone()));
    for i in 1..=5 {
        push(&admin, &session, i).await;
    }
    assert_contiguous(&until_reply(&mut ws, 5).await, 1, 1, 5);
    // An abrupt drop (no close frame). The client saw 3 of the 5 (two were "in flight").
    drop(ws);
    metric_reaches(&c.a.admin, "switchyard_sessions_parked", 1).await;
    for i in 6..=8 {
        push(&admin, &session, i).await;
    }
    // Replies keep coming while it resumes on the other edge.
    let (mut ws, token2) = resume_while_replies_come(&admin, &c.b, &session, &token, 9).await;
    // The backend: one resume, on the new node, seq continuing; no disconnect before it.
    assert_eq!(backend.next(&session).await, ("resume".into(), 2, node_b.clone()));
    ws.send(Message::text(json!({"op":"send","id":1,"data":"hi"}).to_string()))
        .await
        .unwrap();
    assert_eq!(backend.next(&session).await, ("frame".into(), 3, node_b.clone()));
    assert_eq!(
        sample(
            &c.a.admin.to_string(),
            r#"switchyard_handovers_total{step="give",result="ok"}"#
        )
        .await,
        1
    );

    // Back to A while the socket on B still looks alive: B closes it (1001) and hands over.
    push(&admin, &session, 61).await;
    let got = until_reply(&mut ws, 61).await;
    let n61 = got.last().unwrap().0;
    let (mut again, w) = v2(&c.a.ws(&format!("/ws?resume={token2}&delivered={n61}"))).await;
    assert_eq!(w["resumed"], true, "{w}");
    assert_eq!(close_code(&mut ws).await, Some(1001), "the old socket is told");
    push(&admin, &session, 62).await;
    assert_contiguous(&until_reply(&mut again, 62).await, n61 + 1, 62, 62);
    // Once A has the session back for good (its `end` from B), a reply still reaches it: A no
    // longer passes the session's records on to B, where it went before.
    metric_reaches(&c.a.admin, r#"switchyard_handovers_total{step="end",result="ok"}"#, 1).await;
    push(&admin, &session, 63).await;
    assert_contiguous(&until_reply(&mut again, 63).await, n61 + 2, 63, 63);
    let resume = backend.next(&session).await;
    assert_eq!((resume.0.as_str(), resume.2.as_str()), ("resume", node_a.as_str()));
    close_normal(&mut again).await;
    let end = backend.next(&session).await;
    assert_eq!(end.0, "disconnect", "one disconnect, at the real end: {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_edge_hands_its_sessions_over_on_nats() {
    drained_edge_hands_over(&nats_url()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_edge_hands_its_sessions_over_on_kafka() {
    drained_edge_hands_over(&kafka_url()).await
}

/// SIGTERM on the edge that holds 20 sessions: each gets 1012, resumes on the other edge with
/// what it had, and gets every reply once and in order; no disconnect reaches the backend.
async fn drained_edge_hands_over(url: &str) {
    let mut c = cluster(url, &["--drain-grace", "0s"]).await;
    let node_b = c.node_b.clone();
    let mut backend = Backend::new(&c).await;
    let admin_b = c.b.admin("");
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (ws, w) = v2(&c.a.ws("/ws")).await;
        clients.push((
            ws,
            w["session"].as_str().unwrap().to_owned(),
            w["resume_token"].as_str().unwrap().to_owned(),
        ));
    }
    for (ws, session, _) in clients.iter_mut() {
        push(&admin_b, session, 1).await;
        assert_contiguous(&until_reply(ws, 1).await, 1, 1, 1);
    }
    c.a.term();
    let mut resumed = Vec::new();
    for (mut ws, session, token) in clients {
        assert_eq!(close_code(&mut ws).await, Some(1012));
        push(&admin_b, &session, 2).await;
        let (ws, w) = v2(&c.b.ws(&format!("/ws?resume={token}&delivered=1"))).await;
        assert_eq!(w["resumed"], true, "{w}");
        resumed.push((ws, session));
    }
    for (ws, session) in resumed.iter_mut() {
        push(&admin_b, session, 3).await;
        assert_contiguous(&until_reply(ws, 3).await, 2, 2, 3);
    }
    // The backend saw, per session: connect, resume (node B), and nothing else.
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while seen.values().map(Vec::len).sum::<usize>() < 40 {
        let m = tokio::time::timeout(WAIT, backend.0.recv())
            .await
            .expect("lifecycle records")
            .unwrap();
        let h = &m.record.headers;
        let kind = h.get("sy-kind").unwrap_or("").to_owned();
        if kind == "resume" {
            assert_eq!(h.get("sy-node"), Some(node_b.as_str()));
        }
        seen.entry(h.get("sy-session").unwrap().to_owned())
            .or_default()
            .push(kind);
    }
    assert_eq!(seen.len(), 20);
    assert!(seen.values().all(|k| k == &["connect", "resume"]), "{seen:?}");
    let status = tokio::time::timeout(WAIT, c.a.child.wait())
        .await
        .expect("the drained edge exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    for (ws, _) in resumed.iter_mut() {
        close_normal(ws).await;
    }
    for _ in 0..20 {
        let m = tokio::time::timeout(WAIT, backend.0.recv())
            .await
            .expect("disconnects")
            .unwrap();
        assert_eq!(m.record.headers.get("sy-kind"), Some("disconnect"));
    }
}

/// Without a log of node deliveries (`--nats-durable-replies false`: core NATS), an edge killed with
/// SIGKILL had the session's kept deliveries in memory only: a resume on the other edge is
/// refused with `node_unreachable` and a new session, never a half-resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_node_log_a_resume_after_sigkill_of_the_edge_is_refused_with_a_reason() {
    let mut c = cluster(&nats_url(), &["--nats-durable-replies", "false"]).await;
    let (ws, w) = v2(&c.a.ws("/ws")).await;
    let (session, token) = (
        w["session"].as_str().unwrap().to_owned(),
        w["resume_token"].as_str().unwrap().to_owned(),
    );
    c.a.kill9();
    drop(ws);
    let (_ws, w) = v2(&c.b.ws(&format!("/ws?resume={token}&delivered=0"))).await;
    assert_eq!(w["resumed"], false, "{w}");
    assert_eq!(w["reason"], "node_unreachable", "{w}");
    assert_ne!(w["session"], session.as_str(), "a new session");
}

/// On Kafka the node delivery topics are logs: a session whose edge was killed with SIGKILL
/// resumes on the other edge from them. The client dropped (no close frame) having counted 3
/// of 5 replies; 25 more came while its edge was dead, 30 more while it resumed. It gets 4..60
/// once, in order, numbered on; the backend sees one resume (seq continuing, the new node), no
/// disconnect, and a send resent with its id is acknowledged as a duplicate, not published
/// again. Then the second edge is killed too, and the session resumes on a third edge, from
/// both edges' logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_from_the_log_after_sigkill_of_its_edge_on_kafka() {
    resumes_from_the_log_after_sigkill(&kafka_url()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_from_the_log_after_sigkill_of_its_edge_on_nats() {
    resumes_from_the_log_after_sigkill(&nats_url()).await
}

async fn resumes_from_the_log_after_sigkill(url: &str) {
    let mut c = cluster(url, &["--resume-window", "120s"]).await;
    let (node_a, node_b) = (c.node_a.clone(), c.node_b.clone());
    let mut backend = Backend::new(&c).await;
    let admin = c.b.admin("");
    let (mut ws, w) = v2(&c.a.ws("/ws")).await;
    let session = w["session"].as_str().unwrap().to_owned();
    let token = w["resume_token"].as_str().unwrap().to_owned();
    assert_eq!(backend.next(&session).await, ("connect".into(), 1, node_a.clone()));
    for i in 1..=5 {
        push(&admin, &session, i).await;
    }
    assert_contiguous(&until_reply(&mut ws, 5).await, 1, 1, 5);
    ws.send(Message::text(json!({"op":"send","id":"m1","data":"one"}).to_string()))
        .await
        .unwrap();
    let ack = next_json(&mut ws).await;
    assert_eq!((ack["op"].as_str(), ack.get("duplicate")), (Some("ack"), None), "{ack}");
    assert_eq!(backend.next(&session).await, ("frame".into(), 2, node_a.clone()));
    drop(ws);
    c.a.kill9();
    let _ = c.a.child.wait().await;
    for i in 6..=30 {
        push(&admin, &session, i).await;
    }
    let (mut ws, token2) = resume_while_replies_come(&admin, &c.b, &session, &token, 31).await;
    assert_eq!(backend.next(&session).await, ("resume".into(), 3, node_b.clone()));
    // B's one session keeps what it had from the log (4..30) and what came since (31..60).
    for series in [
        "switchyard_resume_buffer_deliveries",
        "switchyard_resume_buffer_max_deliveries",
    ] {
        assert_eq!(sample(&c.b.admin.to_string(), series).await, 57, "{series}");
    }
    // The send's id came back from the log: resent, it is a duplicate.
    ws.send(Message::text(json!({"op":"send","id":"m1","data":"one"}).to_string()))
        .await
        .unwrap();
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["duplicate"], true, "{ack}");
    ws.send(Message::text(json!({"op":"send","id":"m2","data":"two"}).to_string()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["op"], "ack");
    assert_eq!(backend.next(&session).await, ("frame".into(), 4, node_b.clone()));
    assert_eq!(
        sample(
            &c.b.admin.to_string(),
            r#"switchyard_handovers_total{step="log",result="ok"}"#
        )
        .await,
        1
    );

    // B dies too, with replies in flight; a third edge resumes the session from A's log (the
    // replies the router sent A before it moved the session) and B's.
    push(&admin, &session, 61).await;
    let got = until_reply(&mut ws, 61).await;
    assert_contiguous(&got, 61, 61, 61);
    let key = c._key.0.to_str().unwrap().to_owned();
    let node_c = format!("{}-c", c.prefix);
    let third = spawn(
        "edge",
        url,
        &c.prefix,
        &[
            "--resume-key-file",
            &key,
            "--node-id",
            &node_c,
            "--resume-window",
            "120s",
        ],
    )
    .await;
    let admin = third.admin("");
    drop(ws);
    c.b.kill9();
    let _ = c.b.child.wait().await;
    for i in 62..=70 {
        push(&admin, &session, i).await;
    }
    // The first token, used again: the inbound log shows the session resumed on B since.
    let (_stale, w) = v2(&third.ws(&format!("/ws?resume={token}&delivered=60"))).await;
    assert_eq!(
        (w["resumed"].as_bool(), w["reason"].as_str()),
        (Some(false), Some("not_parked")),
        "{w}"
    );
    let (mut ws, w) = v2(&third.ws(&format!("/ws?resume={token2}&delivered=60"))).await;
    assert_eq!(w["resumed"], true, "{w}");
    push(&admin, &session, 71).await;
    assert_contiguous(&until_reply(&mut ws, 71).await, 61, 61, 71);
    assert_eq!(backend.next(&session).await, ("resume".into(), 5, node_c.clone()));
    close_normal(&mut ws).await;
    let end = backend.next(&session).await;
    assert_eq!(end.0, "disconnect", "one disconnect, at the real end: {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_both_edges_loses_nothing_on_nats() {
    rolling_restart(&nats_url()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_both_edges_loses_nothing_on_kafka() {
    rolling_restart(&kafka_url()).await
}

/// One client of the rolling restart: on a 1012 it resumes on the other edge it knows of.
/// Returns the replies it got (in arrival order), the resumes it made and whether each was
/// resumed.
async fn roaming_client(
    mut urls: tokio::sync::watch::Receiver<Vec<String>>,
    start: usize,
    last: u64,
    ready: tokio::sync::mpsc::Sender<String>,
) -> (Vec<u64>, Vec<bool>) {
    let mut at = start;
    let url = urls.borrow()[at].clone();
    let (mut ws, w) = v2(&format!("{url}/ws")).await;
    let mut token = w["resume_token"].as_str().unwrap().to_owned();
    ready.send(w["session"].as_str().unwrap().to_owned()).await.unwrap();
    drop(ready);
    let (mut got, mut resumes, mut delivered) = (Vec::new(), Vec::new(), 0u64);
    loop {
        let m = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut ws))
            .await
            .expect("a message or a close in time");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["op"] == "deliver" {
                    delivered = v["n"].as_u64().unwrap();
                    let i = v["data"]["i"].as_u64().unwrap();
                    got.push(i);
                    if i == last {
                        close_normal(&mut ws).await;
                        return (got, resumes);
                    }
                } else if v["op"] == "welcome" {
                    resumes.push(v["resumed"] == true);
                    token = v["resume_token"].as_str().unwrap().to_owned();
                }
            }
            Some(Ok(Message::Close(f))) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1012), "only drains close us");
                // The other edge (the current list: a restarted edge has a new address).
                at = (at + 1) % 2;
                let url = urls.borrow_and_update()[at].clone();
                let mut req = format!("{url}/ws?resume={token}&delivered={delivered}")
                    .into_client_request()
                    .unwrap();
                req.headers_mut()
                    .insert("sec-websocket-protocol", "switchyard.v2".parse().unwrap());
                ws = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
                    .await
                    .expect("reconnect in time")
                    .expect("the other edge takes us")
                    .0;
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended without a close: {other:?}"),
        }
    }
}

/// 2 edges, 200 clients, a backend sending every session one reply per 100 ms; edge A is
/// drained (SIGTERM) and restarted, then edge B: every client resumed each time and got every
/// reply exactly once, in order.
async fn rolling_restart(url: &str) {
    const CLIENTS: usize = 200;
    const ROUNDS: u64 = 60;
    let c = cluster(url, &["--drain-grace", "0s"]).await;
    let Cluster {
        a,
        b,
        bus,
        naming,
        _key,
        router: _router,
        ..
    } = c;
    let key = _key.0.to_str().unwrap().to_owned();
    let p = naming.outbound();
    let prefix = p.strip_suffix(".out").unwrap().to_owned();
    let (urls_tx, urls_rx) = tokio::sync::watch::channel(vec![a.ws(""), b.ws("")]);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(CLIENTS);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(tokio::spawn(roaming_client(
            urls_rx.clone(),
            i % 2,
            ROUNDS,
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let mut sessions = Vec::new();
    while let Some(s) = ready_rx.recv().await {
        sessions.push(s);
    }
    assert_eq!(sessions.len(), CLIENTS);
    // The backend: one reply per session per 100 ms, through the router.
    let (round_tx, mut round) = tokio::sync::watch::channel(0u64);
    let backend = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for i in 1..=ROUNDS {
                tick.tick().await;
                round_tx.send_replace(i);
                for s in &sessions {
                    let payload = bytes::Bytes::from(json!({ "i": i }).to_string());
                    let e = switchyard_protocol::Envelope::new(
                        s.clone(),
                        switchyard_protocol::Kind::Deliver,
                        payload.clone(),
                    );
                    let rec = switchyard_bus::Record {
                        key: Some(e.key()),
                        headers: e.headers(),
                        payload,
                    };
                    bus.publish(&p, rec).await.unwrap();
                }
            }
        })
    };
    let args = ["--resume-key-file", key.as_str(), "--drain-grace", "0s"];
    // Restart A, then B, each once its sessions have moved.
    let mut a = a;
    round.wait_for(|r| *r >= 10).await.unwrap();
    a.term();
    let st = tokio::time::timeout(WAIT, a.child.wait())
        .await
        .expect("A exits")
        .unwrap();
    assert!(st.success(), "A: {st:?} {:?}", a.log_tail());
    let a2 = spawn("edge", url, &prefix, &args).await;
    urls_tx.send_replace(vec![a2.ws(""), b.ws("")]);
    // A's clients are on B now.
    metric_reaches(
        &b.admin,
        r#"switchyard_resumes_total{result="resumed"}"#,
        (CLIENTS / 2) as u64,
    )
    .await;
    round.wait_for(|r| *r >= 30).await.unwrap();
    let mut b = b;
    b.term();
    let st = tokio::time::timeout(WAIT, b.child.wait())
        .await
        .expect("B exits")
        .unwrap();
    assert!(st.success(), "B: {st:?} {:?}", b.log_tail());
    let b2 = spawn("edge", url, &prefix, &args).await;
    urls_tx.send_replace(vec![a2.ws(""), b2.ws("")]);
    backend.await.unwrap();
    let mut moves = 0;
    for (i, cl) in clients.into_iter().enumerate() {
        let (got, resumes) = cl.await.unwrap();
        assert!(
            resumes.iter().all(|r| *r),
            "client {i}: a resume was refused: {resumes:?}"
        );
        moves += resumes.len();
        let want: Vec<u64> = (1..=ROUNDS).collect();
        assert_eq!(got, want, "client {i}: every reply once, in order");
    }
    eprintln!("rolling restart: {CLIENTS} clients, {moves} resumes, every reply once and in order");
    // Clients on A moved twice (A → B → A2), clients on B once (B → A2).
    assert_eq!(moves, CLIENTS / 2 * 3);
    drop((a2, b2));
}

/// The new edge gives up waiting for the old one (frozen with SIGSTOP past the 3 s wait): the
/// client gets `resumed:false` (`node_unreachable`). When the old edge wakes up and hands the
/// session over anyway, the new one says `gone`, and the old one publishes the session's one
/// disconnect: the backend is not left with a session that never ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_comes_too_late_ends_the_session_with_one_disconnect() {
    // Without a node log: with one, the new edge resumes from it instead (tested below).
    let c = cluster(&nats_url(), &["--nats-durable-replies", "false"]).await;
    let mut backend = Backend::new(&c).await;
    let (ws, session, token) = connected(&c.a, &mut backend).await;
    drop(ws);
    metric_reaches(&c.a.admin, "switchyard_sessions_parked", 1).await;
    let pid = c.a.child.id().unwrap().to_string();
    send_signal(&pid, "-STOP");
    let (_ws, w) = v2(&c.b.ws(&format!("/ws?resume={token}&delivered=0"))).await;
    send_signal(&pid, "-CONT");
    assert_eq!(w["resumed"], false, "{w}");
    assert_eq!(w["reason"], "node_unreachable", "{w}");
    let (kind, _, node) = backend.next(&session).await;
    assert_eq!(
        (kind.as_str(), node.as_str()),
        ("disconnect", c.node_a.as_str()),
        "one disconnect, from the old node"
    );
    metric_reaches(
        &c.a.admin,
        r#"switchyard_handovers_total{step="gone",result="ended"}"#,
        1,
    )
    .await;
}

/// On Kafka, an old edge frozen (SIGSTOP) past the 3 s wait does not stop the resume: the new
/// edge reads the session back from the log. When the old edge wakes up and hands the session
/// over anyway, the new one says `gone` with `resumed`: the old edge lets it go without a
/// disconnect, and what it passes on (read from the log already) is dropped, so the client
/// gets no reply twice.
/// On NATS a dead edge's lease lapses (`--lease`) before the resume window ends: the router
/// then waits out the window before it ends the edge's sessions, so a client that comes back
/// meanwhile still resumes (from the log), and its session is not ended behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_after_its_dead_edge_lease_lapsed_on_nats() {
    let timing = ["--lease", "2s", "--resume-window", "60s"];
    let mut c = cluster_with(&nats_url(), &timing, &timing).await;
    let mut backend = Backend::new(&c).await;
    let admin = c.b.admin("");
    let (mut ws, session, token) = connected(&c.a, &mut backend).await;
    push(&admin, &session, 1).await;
    assert_contiguous(&until_reply(&mut ws, 1).await, 1, 1, 1);
    drop(ws);
    c.a.kill9();
    let _ = c.a.child.wait().await;
    // The router has seen the lease lapse: the session waits out the window.
    metric_reaches(&c.router.admin, "switchyard_router_doomed_sessions", 1).await;
    for i in 2..=4 {
        push(&admin, &session, i).await;
    }
    let (mut ws, w) = v2(&c.b.ws(&format!("/ws?resume={token}&delivered=1"))).await;
    assert_eq!(w["resumed"], true, "{w}");
    assert_contiguous(&until_reply(&mut ws, 4).await, 2, 2, 4);
    let (kind, _, node) = backend.next(&session).await;
    assert_eq!((kind.as_str(), node.as_str()), ("resume", c.node_b.as_str()));
    // The resume lifted the doom: nothing will end the session behind the client.
    let router = c.router.admin.to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    while sample(&router, "switchyard_router_doomed_sessions").await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the resume never lifted the doom"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    close_normal(&mut ws).await;
    let (kind, _, node) = backend.next(&session).await;
    assert_eq!((kind.as_str(), node.as_str()), ("disconnect", c.node_b.as_str()));
    assert_eq!(sample(&router, "switchyard_router_expired_sessions_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_edge_does_not_stop_a_resume_from_the_log_on_kafka() {
    frozen_edge_resume_from_the_log(&kafka_url()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_edge_does_not_stop_a_resume_from_the_log_on_nats() {
    frozen_edge_resume_from_the_log(&nats_url()).await
}

async fn frozen_edge_resume_from_the_log(url: &str) {
    let c = cluster(url, &["--resume-window", "120s"]).await;
    let mut backend = Backend::new(&c).await;
    let admin = c.b.admin("");
    let (ws, session, token) = connected(&c.a, &mut backend).await;
    drop(ws);
    metric_reaches(&c.a.admin, "switchyard_sessions_parked", 1).await;
    let pid = c.a.child.id().unwrap().to_string();
    send_signal(&pid, "-STOP");
    for i in 1..=10 {
        push(&admin, &session, i).await;
    }
    let (mut ws, w) = v2(&c.b.ws(&format!("/ws?resume={token}&delivered=0"))).await;
    send_signal(&pid, "-CONT");
    assert_eq!(w["resumed"], true, "{w}");
    assert_contiguous(&until_reply(&mut ws, 10).await, 1, 1, 10);
    let (kind, _, node) = backend.next(&session).await;
    assert_eq!((kind.as_str(), node.as_str()), ("resume", c.node_b.as_str()));
    metric_reaches(
        &c.a.admin,
        r#"switchyard_handovers_total{step="gone",result="resumed"}"#,
        1,
    )
    .await;
    // Whatever the old edge passed on (it depends on when its delivery loop and its handover
    // task ran: 0..=10 replies) was published before it handled the `gone`, so before reply
    // 11: a reply it passed on would come again here, before 11. The new edge dropped each.
    let passed_on = sample(
        &c.a.admin.to_string(),
        r#"switchyard_handovers_total{step="forward",result="ok"}"#,
    )
    .await;
    push(&admin, &session, 11).await;
    assert_contiguous(&until_reply(&mut ws, 11).await, 11, 11, 11);
    assert_eq!(
        sample(
            &c.b.admin.to_string(),
            r#"switchyard_handovers_total{step="forward",result="dropped_logged"}"#
        )
        .await,
        passed_on
    );
    close_normal(&mut ws).await;
    let (kind, _, node) = backend.next(&session).await;
    assert_eq!(
        (kind.as_str(), node.as_str()),
        ("disconnect", c.node_b.as_str()),
        "one disconnect, from the new node only"
    );
}

/// An edge restarted with the same `--node-id` after SIGKILL resumes the sessions it held from
/// its own log: the replies sent while it was dead come once, in order, then the live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restarted_with_its_node_id_resumes_from_its_own_log_on_kafka() {
    restarted_edge_resumes_from_its_own_log(&kafka_url()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restarted_with_its_node_id_resumes_from_its_own_log_on_nats() {
    restarted_edge_resumes_from_its_own_log(&nats_url()).await
}

async fn restarted_edge_resumes_from_its_own_log(url: &str) {
    let mut c = cluster(url, &["--resume-window", "120s"]).await;
    let mut backend = Backend::new(&c).await;
    let admin = c.b.admin("");
    let (mut ws, session, token) = connected(&c.a, &mut backend).await;
    for i in 1..=3 {
        push(&admin, &session, i).await;
    }
    assert_contiguous(&until_reply(&mut ws, 3).await, 1, 1, 3);
    drop(ws);
    c.a.kill9();
    let _ = c.a.child.wait().await;
    for i in 4..=6 {
        push(&admin, &session, i).await;
    }
    let key = c._key.0.to_str().unwrap().to_owned();
    let again = spawn(
        "edge",
        url,
        &c.prefix,
        &[
            "--resume-key-file",
            &key,
            "--node-id",
            &c.node_a,
            "--resume-window",
            "120s",
        ],
    )
    .await;
    let (mut ws, w) = v2(&again.ws(&format!("/ws?resume={token}&delivered=2"))).await;
    assert_eq!(w["resumed"], true, "{w}");
    push(&admin, &session, 7).await;
    assert_contiguous(&until_reply(&mut ws, 7).await, 3, 3, 7);
    let (kind, seq, node) = backend.next(&session).await;
    assert_eq!((kind.as_str(), seq, node.as_str()), ("resume", 2, c.node_a.as_str()));
    assert_eq!(
        sample(
            &again.admin.to_string(),
            r#"switchyard_handovers_total{step="log",result="ok"}"#
        )
        .await,
        1
    );
    close_normal(&mut ws).await;
    assert_eq!(backend.next(&session).await.0, "disconnect");
}
