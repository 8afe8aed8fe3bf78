//! End-to-end tests on the embedded bus: real tokio-tungstenite clients over real sockets
//! against the real app on 127.0.0.1:0.

mod common;

use bytes::Bytes;
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::HashSet;
use switchyard::config::Settings;
use switchyard_bus::{Record, SubscribeOptions};
use switchyard_edge::{Mode, RouteConfig, SlowPolicy};
use switchyard_protocol::{Envelope, Kind, Opcode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trip_keeps_order_over_10k_frames() {
    let app = start_default().await;
    let (ws, _) = connect(&app.url("/ws/echo")).await;
    let (mut tx, mut rx) = ws.split();
    const N: usize = 10_000;
    // At most 512 frames in flight: the route's queue (1024, policy close) only closes clients
    // that let more replies than that pile up, which has its own test.
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(512));
    let permits = window.clone();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            permits.acquire().await.unwrap().forget();
            let m = if i % 2 == 0 {
                Message::text(format!("t{i}"))
            } else {
                Message::binary(format!("b{i}").into_bytes())
            };
            tx.send(m).await.unwrap();
        }
        tx
    });
    for i in 0..N {
        let m = loop {
            match tokio::time::timeout(WAIT, rx.next()).await.unwrap().unwrap().unwrap() {
                Message::Ping(_) | Message::Pong(_) => continue,
                m => break m,
            }
        };
        let want = if i % 2 == 0 {
            Message::text(format!("t{i}"))
        } else {
            Message::binary(format!("b{i}").into_bytes())
        };
        assert_eq!(m, want, "frame {i}: same bytes, same opcode, same order");
        window.add_permits(1);
    }
    let _ = sender.await.unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_sessions_each_get_only_their_own_replies() {
    let app = start_default().await;
    let url = app.url("/ws/echo");
    let mut tasks = Vec::new();
    for c in 0..1000 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ws, id) = connect(&url).await;
            for i in 0..5 {
                ws.send(Message::text(format!("{id}:{c}:{i}"))).await.unwrap();
            }
            for i in 0..5 {
                let m = next_data(&mut ws).await;
                assert_eq!(
                    m,
                    Message::text(format!("{id}:{c}:{i}")),
                    "session {c} got someone else's reply or out of order"
                );
            }
            ws.close(None).await.unwrap();
            id
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1000, "session ids are unique");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_reaches_1000_subscribers_in_order_with_one_bus_subscription() {
    let app = start_default().await;
    let channel = unique("c");
    let url = app.url("/ws");
    let mut subs = Vec::new();
    for _ in 0..1000 {
        subs.push(framed_subscriber(&url, &channel).await.0);
    }
    // One subscription on the bus for this channel, however many local subscribers.
    assert_eq!(app.edge.channels.active().await, 1);
    assert_eq!(app.edge.channels.subscribers(&channel).await, 1000);
    const M: u64 = 50;
    let topic = switchyard_protocol::Naming::default().channel(&channel);
    for n in 0..M {
        let rec = Record {
            key: None,
            headers: Default::default(),
            payload: Bytes::from(format!(r#"{{"n":{n}}}"#)),
        };
        app.bus.publish(&topic, rec).await.unwrap();
    }
    let mut tasks = Vec::new();
    for mut ws in subs {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut last_offset = None;
            for n in 0..M {
                let v = next_json(&mut ws).await;
                assert_eq!(v["channel"], channel.as_str());
                assert_eq!(v["data"], json!({"n": n}), "in order, none missing");
                let off = v["offset"].as_u64().expect("memory bus gives offsets");
                assert!(last_offset.is_none_or(|l| off == l + 1), "offsets consecutive");
                last_offset = Some(off);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    app.stop().await;
}

/// A route for one test, with its own path (so its metrics are its own).
fn route(mode: Mode, queue: usize, slow: SlowPolicy) -> RouteConfig {
    RouteConfig {
        path: format!("/{}", unique("r")),
        topic: unique("t"),
        mode,
        allow_publish: mode == Mode::Framed,
        queue_size: queue,
        slow_policy: slow,
        max_message_size: None,
        allowed_origins: vec![],
        auth: None,
        rate_limit: None,
        channels: Default::default(),
    }
}

/// Healthy readers report how far they got, so the publisher can stay within a window of
/// the slowest healthy reader: their queues never fill, only a stalled socket's does.
#[derive(Default)]
struct Progress {
    done: Vec<std::sync::atomic::AtomicU64>,
    moved: tokio::sync::Notify,
}

impl Progress {
    fn new(readers: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            done: (0..readers).map(|_| Default::default()).collect(),
            moved: Default::default(),
        })
    }
    fn set(&self, i: usize, n: u64) {
        self.done[i].store(n, std::sync::atomic::Ordering::Release);
        self.moved.notify_waiters();
    }
    async fn wait_min(&self, n: u64) {
        loop {
            let notified = self.moved.notified();
            if self
                .done
                .iter()
                .all(|d| d.load(std::sync::atomic::Ordering::Acquire) >= n)
            {
                return;
            }
            tokio::time::timeout(WAIT, notified)
                .await
                .expect("healthy readers progress");
        }
    }
}

/// Spawns a reader per healthy socket that checks it gets every message in order.
fn healthy_readers(
    healthy: Vec<Ws>,
    m: usize,
    progress: &std::sync::Arc<Progress>,
) -> Vec<tokio::task::JoinHandle<()>> {
    healthy
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            let progress = progress.clone();
            tokio::spawn(async move {
                for n in 0..m {
                    let v = next_json(&mut ws).await;
                    assert_eq!(v["data"]["n"], n as u64, "healthy subscriber lost nothing");
                    progress.set(i, n as u64 + 1);
                }
            })
        })
        .collect()
}

/// Publishes `m` messages of `size` bytes — far more than loopback buffers hold for a stalled
/// socket, so its queue policy must act — staying within `window` of the healthy readers.
async fn flood(app: &Running, channel: &str, m: usize, size: usize, progress: &Progress, window: u64) {
    let topic = switchyard_protocol::Naming::default().channel(channel);
    let pad = "x".repeat(size);
    for n in 0..m as u64 {
        progress.wait_min(n.saturating_sub(window)).await;
        let rec = Record {
            key: None,
            headers: Default::default(),
            payload: Bytes::from(format!(r#"{{"n":{n},"pad":"{pad}"}}"#)),
        };
        app.bus.publish(&topic, rec).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_is_dropped_oldest_and_others_get_everything() {
    let mut s = Settings::for_tests();
    let r = route(Mode::Framed, 64, SlowPolicy::DropOldest);
    let path = r.path.clone();
    s.edge.routes.push(r);
    let app = start(s).await;
    let channel = unique("c");
    let (stalled, _) = framed_subscriber(&app.url(&path), &channel).await;
    let mut healthy = Vec::new();
    for _ in 0..20 {
        healthy.push(framed_subscriber(&app.url(&path), &channel).await.0);
    }
    const M: usize = 2000;
    let progress = Progress::new(healthy.len());
    let readers = healthy_readers(healthy, M, &progress);
    // 2000 × 16 KiB = 32 MiB: far beyond what loopback buffers hold for the stalled socket.
    flood(&app, &channel, M, 16 * 1024, &progress, 16).await;
    for r in readers {
        r.await.unwrap();
    }
    let series = format!(r#"switchyard_drops_total{{route="{path}",reason="slow_drop_oldest"}}"#);
    let dropped = sample(&app.admin.to_string(), &series).await;
    assert!(dropped > 0, "the stalled socket's queue dropped its oldest messages");
    assert!(dropped < M as u64, "only the stalled socket dropped");
    drop(stalled);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_on_close_policy_gets_4008() {
    let mut s = Settings::for_tests();
    let r = route(Mode::Framed, 64, SlowPolicy::Close);
    let path = r.path.clone();
    s.edge.routes.push(r);
    let app = start(s).await;
    let channel = unique("c");
    let (mut stalled, _) = framed_subscriber(&app.url(&path), &channel).await;
    let (healthy, _) = framed_subscriber(&app.url(&path), &channel).await;
    const M: usize = 2000;
    let progress = Progress::new(1);
    let readers = healthy_readers(vec![healthy], M, &progress);
    flood(&app, &channel, M, 16 * 1024, &progress, 16).await;
    for r in readers {
        r.await.unwrap();
    }
    // Reading the stalled socket now drains what reached it, then the 4008 close.
    assert_eq!(close_code(&mut stalled).await, Some(4008));
    assert_eq!(
        sample(
            &app.admin.to_string(),
            &format!(r#"switchyard_drops_total{{route="{path}",reason="slow_close"}}"#)
        )
        .await,
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_that_keeps_sending_is_closed_all_the_same() {
    let mut s = Settings::for_tests();
    let r = route(Mode::Framed, 64, SlowPolicy::Close);
    let path = r.path.clone();
    s.edge.routes.push(r);
    let app = start(s).await;
    let admin = app.admin.to_string();
    let open = format!(r#"switchyard_connections_open{{route="{path}"}}"#);
    let channel = unique("c");
    let (mut stalled, _) = framed_subscriber(&app.url(&path), &channel).await;
    let (healthy, _) = framed_subscriber(&app.url(&path), &channel).await;
    assert_eq!(sample(&admin, &open).await, 2, "both sessions counted");
    const M: usize = 2000;
    let progress = Progress::new(1);
    let readers = healthy_readers(vec![healthy], M, &progress);
    flood(&app, &channel, M, 16 * 1024, &progress, 16).await;
    for r in readers {
        r.await.unwrap(); // the healthy socket is dropped here: its session ends too
    }
    // The stalled client never reads (its 4008 sits behind a full socket) but keeps sending:
    // its session must still end once the close deadline passes, not live while it talks.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut sending = true;
    while sample(&admin, &open).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled session was never closed"
        );
        if sending {
            sending = stalled.send(Message::text(r#"{"op":"send","data":1}"#)).await.is_ok();
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await; // polling the gauge
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_closes_1009() {
    let mut s = Settings::for_tests();
    s.edge.max_message_size = 1024;
    let app = start(s).await;
    let (mut ws, _) = connect(&app.url("/ws/echo")).await;
    ws.send(Message::text("x".repeat(1024))).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::text("x".repeat(1024)),
        "exactly the limit passes"
    );
    ws.send(Message::text("x".repeat(1025))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1009));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_text_closes_1007() {
    let app = start_default().await;
    let (mut ws, _) = connect(&app.url("/ws/echo")).await;
    let frame = Frame::message(Bytes::from_static(&[0x66, 0xff, 0xfe]), OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1007));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_is_404_before_upgrade() {
    let app = start_default().await;
    let err = tokio_tungstenite::connect_async(app.url("/nope")).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 404),
        other => panic!("expected HTTP 404, got {other:?}"),
    }
    // A plain GET on a route path is not an upgrade: 4xx, never 101.
    let r = reqwest::get(format!("http://{}/ws/echo", app.client)).await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_protocol_ops_and_errors() {
    let app = start_default().await;
    let channel = unique("c");
    let (mut a, _) = framed_subscriber(&app.url("/ws"), &channel).await;
    let (mut b, _) = connect(&app.url("/ws")).await;
    assert_eq!(next_json(&mut b).await["op"], "welcome");
    // publish reaches subscribers (not the publisher, who is not subscribed)
    b.send(Message::text(format!(
        r#"{{"op":"publish","channel":"{channel}","data":{{"hi":1}}}}"#
    )))
    .await
    .unwrap();
    let v = next_json(&mut a).await;
    assert_eq!(v["data"], json!({"hi": 1}));
    // send goes to the backend, whose answer comes back
    b.send(Message::text(r#"{"op":"send","data":[1,2]}"#)).await.unwrap();
    assert_eq!(next_json(&mut b).await, json!({"echo": [1, 2]}));
    for (bad, code) in [
        ("nope", "bad_request"),
        (r#"{"op":"fly"}"#, "unknown_op"),
        (r#"{"op":"subscribe","channel":"a.*"}"#, "invalid_channel"),
        (r#"{"op":"unsubscribe","channel":"never"}"#, "not_subscribed"),
        (r#"{"op":"send"}"#, "bad_request"),
    ] {
        b.send(Message::text(bad)).await.unwrap();
        let v = next_json(&mut b).await;
        assert_eq!(
            (v["op"].as_str(), v["code"].as_str()),
            (Some("error"), Some(code)),
            "{bad} → {v}"
        );
    }
    b.send(Message::binary(vec![1u8, 2])).await.unwrap();
    assert_eq!(next_json(&mut b).await["code"], "bad_request");
    a.send(Message::text(format!(
        r#"{{"op":"unsubscribe","channel":"{channel}"}}"#
    )))
    .await
    .unwrap();
    assert_eq!(next_json(&mut a).await, json!({"op":"unsubscribed","channel":channel}));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_refused_where_the_route_does_not_allow_it() {
    let mut s = Settings::for_tests();
    let mut r = route(Mode::Framed, 16, SlowPolicy::DropOldest);
    r.allow_publish = false;
    let path = r.path.clone();
    s.edge.routes.push(r);
    let app = start(s).await;
    let (mut ws, _) = connect(&app.url(&path)).await;
    next_json(&mut ws).await;
    ws.send(Message::text(r#"{"op":"publish","channel":"x","data":1}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "forbidden");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_records_carry_the_envelope_in_order() {
    let app = start_default().await;
    let tap = app
        .bus
        .subscribe("sy.in.echo", SubscribeOptions::default())
        .await
        .unwrap();
    let mut tap = tap;
    let (ws, id) = {
        let (ws, resp) = tokio_tungstenite::connect_async(
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(app.url("/ws/echo"))
                .map(|mut r| {
                    r.headers_mut().insert(
                        "traceparent",
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                            .parse()
                            .unwrap(),
                    );
                    r
                })
                .unwrap(),
        )
        .await
        .unwrap();
        let id = resp.headers()["x-switchyard-session"].to_str().unwrap().to_owned();
        (ws, id)
    };
    let mut ws = ws;
    ws.send(Message::text("a")).await.unwrap();
    ws.send(Message::binary(vec![0u8, 159])).await.unwrap();
    next_data(&mut ws).await;
    next_data(&mut ws).await;
    close_normal(&mut ws).await;
    let mut got = Vec::new();
    while got.len() < 4 {
        let m = tokio::time::timeout(WAIT, tap.recv()).await.unwrap().unwrap();
        let r = &m.record;
        let e = Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()).unwrap();
        if e.session == id {
            assert_eq!(r.key.as_deref(), Some(id.as_bytes()), "keyed by session");
            got.push(e);
        }
    }
    let kinds: Vec<_> = got.iter().map(|e| (e.kind, e.seq)).collect();
    assert_eq!(
        kinds,
        [
            (Kind::Connect, 1),
            (Kind::Frame, 2),
            (Kind::Frame, 3),
            (Kind::Disconnect, 4)
        ]
    );
    assert_eq!(got[1].payload, Bytes::from_static(b"a"));
    assert_eq!(got[1].opcode, Opcode::Text);
    assert_eq!(got[2].payload, Bytes::from_static(&[0, 159]));
    assert_eq!(got[2].opcode, Opcode::Binary);
    for e in &got {
        assert_eq!(e.route.as_deref(), Some("/ws/echo"));
        assert!(e.node.is_some() && e.reply.as_deref().is_some_and(|r| r.starts_with("sy.node.")));
        assert_eq!(e.trace.as_ref().unwrap().trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert!(e.timestamp_ms > 0);
    }
    assert_eq!(got[3].code, Some(1000));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_works_and_rejects_bad_input_with_json() {
    let app = start_default().await;
    let http = reqwest::Client::new();
    let channel = unique("c");
    let (mut sub, _) = framed_subscriber(&app.url("/ws"), &channel).await;
    let r = http
        .post(app.admin_url("/api/publish"))
        .json(&json!({"channel": channel, "data": {"p": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(next_json(&mut sub).await["data"], json!({"p": 1}));

    let (mut ws, id) = connect(&app.url("/ws/echo")).await;
    let r = http
        .post(app.admin_url(&format!("/api/sessions/{id}/send")))
        .json(&json!({"data": "pushed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(next_data(&mut ws).await, Message::text("pushed"));
    let r = http
        .post(app.admin_url(&format!("/api/sessions/{id}/send")))
        .json(&json!({"binary": "AAE="}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(next_data(&mut ws).await, Message::binary(vec![0u8, 1]));
    ws.send(Message::text("one")).await.unwrap();
    next_data(&mut ws).await;
    let info: serde_json::Value = http
        .get(app.admin_url(&format!("/api/sessions/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["route"], "/ws/echo");
    assert_eq!(info["frames_in"], 1);
    assert_eq!(info["frames_out"], 3);

    for (method, path, body, status) in [
        ("POST", "/api/publish".to_string(), "not json", 400),
        ("POST", "/api/publish".to_string(), r#"{"channel":"a b","data":1}"#, 400),
        ("POST", "/api/publish".to_string(), r#"{"channel":"ok"}"#, 400),
        ("POST", format!("/api/sessions/{id}/send"), r#"{}"#, 400),
        ("POST", format!("/api/sessions/{id}/send"), r#"{"binary":"***"}"#, 400),
        ("POST", "/api/sessions/bad%20id/send".to_string(), r#"{"data":1}"#, 400),
        ("GET", "/api/sessions/01NOSUCHSESSION".to_string(), "", 404),
        ("DELETE", format!("/api/sessions/{id}?code=1006"), "", 400),
        ("GET", "/api/nothing".to_string(), "", 404),
    ] {
        let r = http
            .request(method.parse().unwrap(), app.admin_url(&path))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{method} {path} {body}");
        let v: serde_json::Value = r.json().await.expect("JSON error body");
        assert!(v["error"].is_string(), "{v}");
    }

    let r = http
        .delete(app.admin_url(&format!("/api/sessions/{id}?code=4000&reason=bye")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(close_code(&mut ws).await, Some(4000));
    assert_eq!(http.get(app.admin_url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(app.admin_url("/readyz")).send().await.unwrap().status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_control_ops_subscribe_and_close_a_session() {
    let app = start_default().await;
    let channel = unique("c");
    let (mut ws, id) = connect(&app.url("/ws")).await;
    next_json(&mut ws).await;
    let naming = switchyard_protocol::Naming::default();
    let mut env = Envelope::new(id.clone(), Kind::Control, Bytes::new());
    env.control = Some(switchyard_protocol::ControlOp::Subscribe {
        channel: channel.clone(),
    });
    app.bus
        .publish(
            &naming.outbound(),
            Record {
                key: Some(env.key()),
                headers: env.headers(),
                payload: Bytes::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await, json!({"op":"subscribed","channel":channel}));
    app.bus
        .publish(
            &naming.channel(&channel),
            Record {
                payload: Bytes::from_static(b"7"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["data"], 7);
    env.control = Some(switchyard_protocol::ControlOp::Close {
        code: 4100,
        reason: "kicked".into(),
    });
    app.bus
        .publish(
            &naming.outbound(),
            Record {
                key: Some(env.key()),
                headers: env.headers(),
                payload: Bytes::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(4100));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_for_unknown_sessions_are_counted_not_fatal() {
    let app = start_default().await;
    let naming = switchyard_protocol::Naming::default();
    let series = r#"switchyard_router_dropped_total{reason="unknown_session"}"#;
    let before = sample(&app.admin.to_string(), series).await;
    let env = Envelope::new("01NOBODY", Kind::Deliver, Bytes::from_static(b"x"));
    app.bus
        .publish(
            &naming.outbound(),
            Record {
                key: Some(env.key()),
                headers: env.headers(),
                payload: env.payload.clone(),
            },
        )
        .await
        .unwrap();
    let garbage = Record {
        key: None,
        headers: Default::default(),
        payload: Bytes::from_static(b"?"),
    };
    app.bus.publish(&naming.outbound(), garbage).await.unwrap();
    // The router is still alive and routing: an echo round trip proves it.
    let (mut ws, _) = connect(&app.url("/ws/echo")).await;
    ws.send(Message::text("alive")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("alive"));
    // A record for a session the router has not heard of waits up to 2 s for its connect,
    // then is counted.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut after = before;
    while after <= before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        after = sample(&app.admin.to_string(), series).await;
    }
    assert!(after > before, "unknown session counted ({before} → {after})");

    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_1012_and_every_accepted_frame_reaches_the_bus() {
    let app = start_default().await;
    let tap = app
        .bus
        .subscribe("sy.in.echo", SubscribeOptions::default())
        .await
        .unwrap();
    let (ws, id) = connect(&app.url("/ws/echo")).await;
    // Drain the tap as records arrive (an undrained subscriber would backpressure the bus).
    let want = id.clone();
    let collector = tokio::spawn(async move {
        let mut tap = tap;
        let mut mine = Vec::new();
        while let Some(m) = tokio::time::timeout(WAIT, tap.recv())
            .await
            .expect("records keep coming")
        {
            let r = &m.record;
            let e = Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()).unwrap();
            if e.session == want {
                let done = e.kind == Kind::Disconnect;
                mine.push(e);
                if done {
                    break;
                }
            }
        }
        mine
    });
    let (mut tx, mut rx) = ws.split();
    // The client sends as fast as it can, until the socket refuses.
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        while tx.send(Message::text(format!("{sent}"))).await.is_ok() {
            sent += 1;
            if sent % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        sent
    });
    // Wait until 200 echoes came back: those frames were certainly accepted.
    let mut echoed = 0u64;
    while echoed < 200 {
        if let Message::Text(_) = tokio::time::timeout(WAIT, rx.next()).await.unwrap().unwrap().unwrap() {
            echoed += 1;
        }
    }
    app.shutdown.cancel();
    let code = loop {
        match tokio::time::timeout(WAIT, rx.next()).await.unwrap() {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("expected close, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1012), "service restart: reconnect elsewhere");
    let sent = sender.await.unwrap();
    tokio::time::timeout(WAIT, app.task).await.unwrap().unwrap().unwrap();
    // The bus saw frames 0..k in order, no gap, then the disconnect with seq k+2.
    let mut frames = 0u64;
    let records = collector.await.unwrap();
    assert_eq!(
        records.last().map(|e| e.kind),
        Some(Kind::Disconnect),
        "disconnect arrives"
    );
    for e in records {
        match e.kind {
            Kind::Connect => assert_eq!(e.seq, 1),
            Kind::Frame => {
                assert_eq!(e.payload, Bytes::from(frames.to_string()), "contiguous, in order");
                assert_eq!(e.seq, frames + 2);
                frames += 1;
            }
            Kind::Disconnect => {
                assert_eq!(e.seq, frames + 2);
                assert_eq!(e.code, Some(1012));
            }
            k => panic!("unexpected {k:?}"),
        }
    }
    assert!(
        frames >= echoed,
        "every echoed (accepted) frame is on the bus: {frames} ≥ {echoed}"
    );
    assert!(frames <= sent, "{frames} ≤ {sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_reply_for_a_session_not_on_the_node_is_counted_not_misdelivered() {
    let app = start_default().await;
    let (mut ws, id) = connect(&app.url("/ws/echo")).await;
    close_normal(&mut ws).await;
    let (mut other, _) = connect(&app.url("/ws/echo")).await;
    let series = r#"switchyard_drops_total{route="",reason="unknown_session"}"#;
    let before = sample(&app.admin.to_string(), series).await;
    // A backend answers the closed session on its old sy-reply subject.
    let env = Envelope::new(id.clone(), Kind::Deliver, Bytes::from_static(b"late"));
    let rec = Record {
        key: Some(env.key()),
        headers: env.headers(),
        payload: env.payload.clone(),
    };
    app.bus.publish(&app.edge.node_topic, rec).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while sample(&app.admin.to_string(), series).await <= before {
        assert!(tokio::time::Instant::now() < deadline, "counted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Nobody else got it: the other session's next message is its own echo.
    other.send(Message::text("mine")).await.unwrap();
    assert_eq!(next_data(&mut other).await, Message::text("mine"));
    app.stop().await;
}
