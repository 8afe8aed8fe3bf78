//! Session resume on the edge that holds the session (docs/continuity.md): `switchyard.v2`
//! numbered deliveries, resume tokens, the deliveries kept while the client is away, the
//! backend's one ordered life (no disconnect, one `resume`), duplicate suppression, and the
//! refusals. Real sockets against the app on memory://, with the demo backends.

mod common;

use common::{next_json, unique, Running, Ws, WAIT};
use futures::SinkExt;
use serde_json::{json, Value};
use std::time::Duration;
use switchyard::config::Settings;
use switchyard_bus::{SubscribeOptions, Subscription};
use switchyard_protocol::resume;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Response;
use tokio_tungstenite::tungstenite::Message;

const KEY: &[u8] = b"resume-key-for-the-tests-0123456789";

async fn app(window: Duration) -> Running {
    app_on("memory://", window).await
}

/// The app with the demo backends on `bus_url` (a fresh prefix on a shared broker).
async fn app_on(bus_url: &str, window: Duration) -> Running {
    let mut s = Settings::for_tests();
    s.bus_url = bus_url.into();
    s.bus.prefix = unique("r");
    s.naming = s.bus.naming().unwrap();
    s.edge.naming = s.naming.clone();
    s.edge.resume_window = window;
    s.edge.resume_key = Some(std::sync::Arc::new(KEY.to_vec()));
    common::start(s).await
}

/// Connects with extra headers (e.g. `Sec-WebSocket-Protocol`) and returns the 101 too.
async fn connect(url: &str, headers: &[(&str, &str)]) -> (Ws, Response<Option<Vec<u8>>>) {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect in time")
        .expect("upgrade")
}

const V2: (&str, &str) = ("sec-websocket-protocol", "switchyard.v2");

/// A v2 framed client on `/ws`: its welcome.
async fn v2_client(app: &Running, query: &str) -> (Ws, Value) {
    let (mut ws, resp) = connect(&app.url(&format!("/ws{query}")), &[V2]).await;
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("switchyard.v2")
    );
    let w = next_json(&mut ws).await;
    assert_eq!(w["op"], "welcome", "{w}");
    (ws, w)
}

async fn send(ws: &mut Ws, id: u64, data: Value) {
    ws.send(Message::text(json!({"op":"send","id":id,"data":data}).to_string()))
        .await
        .unwrap();
}

/// Reads until `count` deliver ops arrived; returns them as (n, data) and the acks seen.
async fn deliveries(ws: &mut Ws, count: usize) -> (Vec<(u64, Value)>, Vec<Value>) {
    let (mut got, mut acks) = (Vec::new(), Vec::new());
    while got.len() < count {
        let v = next_json(ws).await;
        match v["op"].as_str() {
            Some("deliver") => got.push((v["n"].as_u64().expect("n"), v["data"].clone())),
            Some("ack") => acks.push(v),
            _ => panic!("unexpected {v}"),
        }
    }
    (got, acks)
}

/// Pushes a backend reply to a session through the router (admin API).
async fn push(app: &Running, session: &str, data: Value) {
    let r = reqwest::Client::new()
        .post(app.admin_url(&format!("/api/sessions/{session}/send")))
        .json(&json!({ "data": data }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
}

/// The next inbound record of `session` on the route's topic: (kind, seq, node, code).
async fn lifecycle(sub: &mut Subscription, session: &str) -> (String, u64, String, Option<String>) {
    loop {
        let m = tokio::time::timeout(WAIT, sub.recv())
            .await
            .expect("inbound record in time")
            .unwrap();
        let h = &m.record.headers;
        if h.get("sy-session") != Some(session) {
            continue;
        }
        return (
            h.get("sy-kind").unwrap_or("").to_owned(),
            h.get("sy-seq").and_then(|s| s.parse().ok()).unwrap_or(0),
            h.get("sy-node").unwrap_or("").to_owned(),
            h.get("sy-code").map(str::to_owned),
        );
    }
}

async fn inbound(app: &Running, topic: &str) -> Subscription {
    app.bus
        .subscribe(&app.edge.cfg.naming.inbound(topic), SubscribeOptions::default())
        .await
        .unwrap()
}

/// The whole life of a v2 session across an abrupt drop: numbered deliveries, the ones the
/// client missed (in flight, and sent while it was away) exactly once and in order after the
/// resume, the backend seeing connect, frames, one resume, frames, and no disconnect; a resent
/// id is acknowledged as a duplicate and not published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_v2_session_resumes_with_every_delivery_once_in_order() {
    dropped_v2_session_resumes("memory://").await
}

/// The same on NATS: the resume record, the router's registry (JetStream KV) and the replies
/// go through the real broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_v2_session_resumes_on_nats() {
    let url = std::env::var("NATS_URL").expect("NATS_URL is not set: run ./scripts/test, which starts nats-server");
    dropped_v2_session_resumes(&url).await
}

/// The same on Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_v2_session_resumes_on_kafka() {
    let brokers =
        std::env::var("KAFKA_BROKERS").expect("KAFKA_BROKERS is not set: run ./scripts/test, which starts Kafka");
    dropped_v2_session_resumes(&format!("kafka://{brokers}")).await
}

async fn dropped_v2_session_resumes(bus_url: &str) {
    let app = app_on(bus_url, Duration::from_secs(30)).await;
    let mut backend = inbound(&app, "app").await;
    let (mut ws, w) = v2_client(&app, "").await;
    let session = w["session"].as_str().unwrap().to_owned();
    let token = w["resume_token"]
        .as_str()
        .expect("a resume token in the welcome")
        .to_owned();
    assert!(w.get("resumed").is_none(), "{w}");
    for i in 1..=5 {
        send(&mut ws, i, json!(i)).await;
    }
    let (got, acks) = deliveries(&mut ws, 5).await;
    assert_eq!(
        got,
        (1..=5).map(|i| (i, json!({"echo": i}))).collect::<Vec<_>>(),
        "numbered from 1, in order"
    );
    assert!(acks.len() <= 5);
    // The client "received" only 3 of them (the last two were in flight when it dropped).
    drop(ws);
    // Replies sent while it is away are kept.
    for i in 6..=8 {
        push(&app, &session, json!({"away": i})).await;
    }
    assert_eq!(lifecycle(&mut backend, &session).await.0, "connect");
    for seq in 2..=6 {
        let (kind, s, _, _) = lifecycle(&mut backend, &session).await;
        assert_eq!((kind.as_str(), s), ("frame", seq));
    }

    let (mut ws, w) = v2_client(&app, &format!("?resume={token}&delivered=3")).await;
    assert_eq!(w["resumed"], true, "{w}");
    assert_eq!(w["session"], session.as_str(), "the same session");
    assert!(w["resume_token"].is_string(), "a token for the next resume: {w}");
    let (got, _) = deliveries(&mut ws, 5).await;
    let want: Vec<(u64, Value)> = vec![
        (4, json!({"echo": 4})),
        (5, json!({"echo": 5})),
        (6, json!({"away": 6})),
        (7, json!({"away": 7})),
        (8, json!({"away": 8})),
    ];
    assert_eq!(got, want, "every delivery after the 3rd, once, in order");
    // The backend: one resume (seq continuing, this node), no disconnect.
    let (kind, seq, node, _) = lifecycle(&mut backend, &session).await;
    assert_eq!((kind.as_str(), seq), ("resume", 7), "one resume, seq continuing");
    assert_eq!(node, app.edge.cfg.node_id);
    // A resent id is a duplicate: acked, not published; a new one goes through.
    send(&mut ws, 5, json!(5)).await;
    assert_eq!(next_json(&mut ws).await, json!({"op":"ack","id":5,"duplicate":true}));
    send(&mut ws, 9, json!(9)).await;
    let (got, _) = deliveries(&mut ws, 1).await;
    assert_eq!(
        got,
        vec![(9, json!({"echo": 9}))],
        "live deliveries continue the numbering"
    );
    let (kind, seq, _, _) = lifecycle(&mut backend, &session).await;
    assert_eq!((kind.as_str(), seq), ("frame", 8), "the duplicate was not published");
    common::close_normal(&mut ws).await;
    let (kind, seq, _, code) = lifecycle(&mut backend, &session).await;
    assert_eq!((kind.as_str(), seq, code.as_deref()), ("disconnect", 9, Some("1000")));
    app.stop().await;
}

/// Tokens for another route, another identity, expired or tampered: `resumed:false` with a
/// reason and a new session, and nothing of the old session reaches the new socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misused_tokens_get_a_new_session_and_none_of_the_old_data() {
    let app = app(Duration::from_secs(30)).await;
    let (ws, w) = v2_client(&app, "").await;
    let session = w["session"].as_str().unwrap().to_owned();
    let token = w["resume_token"].as_str().unwrap().to_owned();
    drop(ws);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |route: &str, subject: Option<&str>, expires: u64| resume::Claims {
        node: None,
        session: session.clone(),
        route: route.into(),
        subject: subject.map(str::to_owned),
        expires,
        anchor: None,
        channels: false,
    };
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let cases = [
        (String::from_utf8(tampered).unwrap(), "bad_signature"),
        (resume::issue(KEY, &claims("/ws", None, now - 1)), "expired"),
        (
            resume::issue(KEY, &claims("/ws", Some("mallory"), now + 60)),
            "other_identity",
        ),
        (resume::issue(KEY, &claims("/ws/echo", None, now + 60)), "other_route"),
        (
            resume::issue(b"another-cluster-key-0123456", &claims("/ws", None, now + 60)),
            "bad_signature",
        ),
        ("garbage".to_owned(), "malformed"),
    ];
    for (t, reason) in cases {
        let (mut ws, w) = v2_client(&app, &format!("?resume={t}&delivered=0")).await;
        assert_eq!(w["resumed"], false, "{reason}: {w}");
        assert_eq!(w["reason"], reason, "{w}");
        let fresh = w["session"].as_str().unwrap().to_owned();
        assert_ne!(fresh, session, "{reason}: a new session");
        // Data for the old session does not come here; data for the new one does.
        push(&app, &session, json!({"old": 1})).await;
        push(&app, &fresh, json!({"new": 1})).await;
        let (got, _) = deliveries(&mut ws, 1).await;
        assert_eq!(got, vec![(1, json!({"new": 1}))], "{reason}");
    }
    // The token for this route works on the raw route's handshake only if it names it: a
    // header resume on /ws/echo with the /ws token is refused there.
    let (_ws, resp) = connect(
        &app.url("/ws/echo"),
        &[("x-switchyard-resume", &token), ("x-switchyard-delivered", "0")],
    )
    .await;
    assert_eq!(resp.headers()["x-switchyard-resumed"], "false");
    assert_eq!(resp.headers()["x-switchyard-resume-reason"], "other_route");
    assert_ne!(resp.headers()["x-switchyard-session"], session.as_str());
    // The real token still resumes: the refusals did not touch the parked session. The two
    // replies pushed per refused case wait there for it, numbered 1..=6.
    let (mut ws, w) = v2_client(&app, &format!("?resume={token}&delivered=0")).await;
    assert_eq!(w["resumed"], true, "{w}");
    let (got, _) = deliveries(&mut ws, 6).await;
    assert_eq!(got, (1..=6).map(|n| (n, json!({"old": 1}))).collect::<Vec<_>>());
    app.stop().await;
}

/// A raw session resumes through the upgrade headers; the 101 says so; echoes carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_session_resumes_through_headers() {
    let app = app(Duration::from_secs(30)).await;
    let (mut ws, resp) = connect(&app.url("/ws/echo"), &[]).await;
    let session = resp.headers()["x-switchyard-session"].to_str().unwrap().to_owned();
    let token = resp.headers()["x-switchyard-resume-token"].to_str().unwrap().to_owned();
    assert!(resp.headers().get("x-switchyard-resumed").is_none());
    for t in ["a", "b"] {
        ws.send(Message::text(t)).await.unwrap();
        assert_eq!(common::next_data(&mut ws).await, Message::text(t));
    }
    drop(ws);
    let (mut ws, resp) = connect(
        &app.url("/ws/echo"),
        &[("x-switchyard-resume", &token), ("x-switchyard-delivered", "2")],
    )
    .await;
    assert_eq!(resp.headers()["x-switchyard-resumed"], "true");
    assert_eq!(resp.headers()["x-switchyard-session"], session.as_str());
    assert!(resp.headers().get("x-switchyard-resume-token").is_some());
    ws.send(Message::text("c")).await.unwrap();
    assert_eq!(common::next_data(&mut ws).await, Message::text("c"));
    app.stop().await;
}

/// When the window ends without a resume, the disconnect is published with the original
/// close code, and a later resume is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_ends_with_the_original_disconnect() {
    let app = app(Duration::from_millis(500)).await;
    let mut backend = inbound(&app, "app").await;
    let (ws, w) = v2_client(&app, "").await;
    let session = w["session"].as_str().unwrap().to_owned();
    let token = w["resume_token"].as_str().unwrap().to_owned();
    assert_eq!(lifecycle(&mut backend, &session).await.0, "connect");
    drop(ws);
    let (kind, seq, _, code) = lifecycle(&mut backend, &session).await;
    assert_eq!((kind.as_str(), seq, code.as_deref()), ("disconnect", 2, Some("1006")));
    let (_ws, w) = v2_client(&app, &format!("?resume={token}&delivered=0")).await;
    assert_eq!(
        (w["resumed"].clone(), w["reason"].clone()),
        (json!(false), json!("not_parked"))
    );
    app.stop().await;
}

/// Resume off (`--resume-window 0`): no token, a resume attempt is refused, a drop publishes
/// the disconnect at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_off_issues_no_token() {
    let app = app(Duration::ZERO).await;
    let (ws, w) = v2_client(&app, "").await;
    assert!(w.get("resume_token").is_none(), "{w}");
    drop(ws);
    let (_ws, w) = v2_client(&app, &format!("?resume=x.y&delivered=0&n={}", unique("q"))).await;
    assert_eq!(
        (w["resumed"].clone(), w["reason"].clone()),
        (json!(false), json!("resume_off"))
    );
    app.stop().await;
}

/// A client back before the edge noticed its old connection died: the resume closes the old
/// socket (1001) and takes the session over; nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_takes_over_a_socket_that_still_looks_alive() {
    let app = app(Duration::from_secs(30)).await;
    let (mut old, w) = v2_client(&app, "").await;
    let session = w["session"].as_str().unwrap().to_owned();
    let token = w["resume_token"].as_str().unwrap().to_owned();
    send(&mut old, 1, json!(1)).await;
    let (got, _) = deliveries(&mut old, 1).await;
    assert_eq!(got, vec![(1, json!({"echo": 1}))]);
    let (mut ws, w) = v2_client(&app, &format!("?resume={token}&delivered=1")).await;
    assert_eq!(w["resumed"], true, "{w}");
    assert_eq!(w["session"], session.as_str());
    assert_eq!(
        common::close_code(&mut old).await,
        Some(1001),
        "the old socket is closed"
    );
    push(&app, &session, json!({"after": 2})).await;
    let (got, _) = deliveries(&mut ws, 1).await;
    assert_eq!(got, vec![(2, json!({"after": 2}))]);
    app.stop().await;
}
