//! Hostile or unusual input and configuration on the embedded bus: JSON nesting bombs on framed
//! routes, a dotted `--prefix`, and start-up failures mapped to exit codes.

mod common;

use common::*;
use futures::SinkExt;
use serde_json::json;
use switchyard::config::Settings;
use switchyard_bus::SubscribeOptions;
use switchyard_protocol::{Envelope, Kind, Naming};
use tokio_tungstenite::tungstenite::Message;

/// Builds `s` and returns the start error it fails with.
async fn start_error(s: Settings) -> switchyard::StartError {
    match s.build().await {
        Ok(_) => panic!("expected the build to fail"),
        Err(e) => e,
    }
}

/// `{"op":"send","id":ID,"data":[[…1…]]}` with `arrays` levels of arrays in `data`.
fn nested_send(id: &str, arrays: usize) -> String {
    format!(
        r#"{{"op":"send","id":"{id}","data":{}1{}}}"#,
        "[".repeat(arrays),
        "]".repeat(arrays)
    )
}

/// The next frame record of `session` on the tap (connect and other sessions skipped).
async fn next_frame(tap: &mut switchyard_bus::Subscription, session: &str) -> Envelope {
    loop {
        let m = tokio::time::timeout(WAIT, tap.recv())
            .await
            .expect("record in time")
            .unwrap();
        let r = &m.record;
        let e = Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()).unwrap();
        if e.session == session && e.kind == Kind::Frame {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_json_nested_too_deep_is_bad_request_and_never_published() {
    let app = start_default().await;
    let mut tap = app
        .bus
        .subscribe("sy.in.app", SubscribeOptions::default())
        .await
        .unwrap();
    let (mut ws, id) = connect(&app.url("/ws")).await;
    assert_eq!(next_json(&mut ws).await["op"], "welcome");

    // The issue's bomb: 100,000 levels (200 KB), then the default limit's edge: 64 levels in
    // all (the frame's object + 63 arrays) passes, 65 does not.
    for (tag, arrays) in [("bomb", 100_000), ("d65", 64)] {
        ws.send(Message::text(nested_send(tag, arrays))).await.unwrap();
        let v = next_json(&mut ws).await;
        assert_eq!(
            (v["op"].as_str(), v["code"].as_str(), v["id"].as_str()),
            (Some("error"), Some("bad_request"), Some(tag)),
            "{v}"
        );
        assert!(v["message"].as_str().unwrap_or_default().contains("64"), "{v}");
    }
    ws.send(Message::text(nested_send("d64", 63))).await.unwrap();
    let v = next_json(&mut ws).await;
    let ack = if v["op"] == "ack" { v } else { next_json(&mut ws).await };
    assert_eq!(ack, json!({"op":"ack","id":"d64"}));
    // The first frame record of the session is the one that passed: neither refused frame
    // reached the bus.
    let e = next_frame(&mut tap, &id).await;
    assert_eq!(e.payload.iter().filter(|&&b| b == b'[').count(), 63);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_json_depth_is_configurable() {
    let mut s = Settings::for_tests();
    s.edge.max_json_depth = 3;
    let app = start(s).await;
    let (mut ws, _) = connect(&app.url("/ws")).await;
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    ws.send(Message::text(nested_send("ok", 2))).await.unwrap();
    let mut got = vec![next_json(&mut ws).await, next_json(&mut ws).await];
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got, [json!({"echo": [[1]]}), json!({"op":"ack","id":"ok"})]);
    ws.send(Message::text(nested_send("deep", 3))).await.unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!(
        (v["code"].as_str(), v["id"].as_str()),
        (Some("bad_request"), Some("deep")),
        "{v}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dotted_prefix_keeps_bus_metric_labels() {
    // Regression: the topic class was the second dotted token, so with `acme.prod` every bus
    // metric said topic="other".
    let naming = Naming::new("acme.prod").unwrap();
    let mut s = Settings::for_tests();
    s.naming = naming.clone();
    s.edge.naming = naming.clone();
    s.bus.prefix = "acme.prod".into();
    let app = start(s).await;
    let (mut ws, _) = connect(&app.url("/ws/echo")).await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("hi"));
    close_normal(&mut ws).await;
    let admin = app.admin.to_string();
    let published = |topic: &str| format!(r#"switchyard_bus_published_total{{bus="memory",topic="{topic}"}}"#);
    // The connect, the frame and the echo's reply were published under the dotted prefix.
    assert!(sample(&admin, &published("in")).await >= 2);
    assert!(sample(&admin, &published("sessions")).await >= 1);
    assert!(sample(&admin, &published("node")).await >= 1);
    assert_eq!(sample(&admin, &published("other")).await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_map_to_exit_codes_64_69_and_1() {
    // 64: a configuration the builder validates itself (settings built by hand).
    let mut s = Settings::for_tests();
    s.edge.max_headers = 1;
    let e = start_error(s).await;
    assert_eq!(e.exit_code(), 64, "{e}");
    assert!(e.to_string().contains("max headers"), "{e}");

    // 69: a listener that cannot be bound.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut s = Settings::for_tests();
    s.admin = taken.local_addr().unwrap();
    let e = start_error(s).await;
    assert_eq!(e.exit_code(), 69, "{e}");
    assert!(e.to_string().contains(&taken.local_addr().unwrap().to_string()), "{e}");

    // 69: a bus that cannot be reached (nothing listens on the port we just freed).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut s = Settings::for_tests();
    s.bus_url = format!("nats://{closed}");
    let e = start_error(s).await;
    assert_eq!(e.exit_code(), 69, "{e}");
    assert!(e.to_string().contains("cannot open bus"), "{e}");

    // 1: anything else, e.g. an edge handed settings whose keys and certificates were not
    // loaded by validation (it refuses rather than serve wss:// or an auth route without them).
    let mut s = Settings::for_tests();
    s.edge.tls = Some(switchyard_edge::tls::TlsFiles {
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
    });
    s.loaded = Some(Default::default());
    let e = start_error(s).await;
    assert_eq!(e.exit_code(), 1, "{e}");
    assert!(e.to_string().contains("not validated"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_metric_is_described() {
    let app = start_default().await;
    // Some traffic through every part: a raw echo, a framed send (router), a channel, a refusal.
    let (mut raw, _) = connect(&app.url("/ws/echo")).await;
    raw.send(Message::text("m")).await.unwrap();
    next_data(&mut raw).await;
    let (mut framed, _) = framed_subscriber(&app.url("/ws"), &common::unique("c")).await;
    framed.send(Message::text(r#"{"op":"send","data":1}"#)).await.unwrap();
    assert_eq!(next_json(&mut framed).await, json!({"echo": 1}));
    let refused = reqwest::get(format!("http://{}/nope", app.client)).await.unwrap();
    assert_eq!(refused.status(), 404);
    let text = reqwest::get(app.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let described: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut series = std::collections::BTreeSet::new();
    for l in text.lines().filter(|l| l.starts_with("switchyard_")) {
        let name = l.split(['{', ' ']).next().unwrap();
        let base = ["_sum", "_count", "_bucket"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| described.contains(b)))
            .unwrap_or(name);
        series.insert(base);
    }
    for must in [
        "switchyard_bus_published_total",
        "switchyard_router_forwarded_total",
        "switchyard_frames_in_total",
    ] {
        assert!(series.contains(must), "{must} exported: {series:?}");
    }
    let undescribed: Vec<_> = series.iter().filter(|s| !described.contains(*s)).collect();
    assert!(
        undescribed.is_empty(),
        "exported without a description: {undescribed:?}"
    );
    app.stop().await;
}
