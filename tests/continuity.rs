//! Channel history and recovery (docs/continuity.md), against real sockets on every bus:
//! `mod memory` always, `mod nats` and `mod kafka` against the brokers `scripts/test` starts.
//! Each bus runs the same scenarios: recovery after a gap, the explicit `recovered:false`
//! answers, `rewind`, the history API, and the seam under a steady publisher.

mod common;

use bytes::Bytes;
use common::{connect, next_json, unique, Running, Ws};
use futures::SinkExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use switchyard::config::Settings;
use switchyard_bus::Record;
use switchyard_edge::config::ChannelConfig;
use tokio_tungstenite::tungstenite::Message;

/// `h.*` keeps 10,000 messages; `s.*` keeps 10 (for "older than retention").
fn channels() -> Vec<ChannelConfig> {
    vec![
        ChannelConfig {
            pattern: "h.*".into(),
            history_size: 10_000,
            history_ttl: Duration::from_secs(600),
        },
        ChannelConfig {
            pattern: "s.*".into(),
            history_size: 10,
            history_ttl: Duration::from_secs(600),
        },
    ]
}

/// A standalone app on `bus_url` with the history patterns above and `max_recover` 600.
async fn app(bus_url: &str) -> Running {
    let mut s = Settings::for_tests();
    s.bus_url = bus_url.into();
    s.bus.prefix = unique("k");
    s.naming = s.bus.naming().unwrap();
    s.edge.naming = s.naming.clone();
    s.edge.channels = channels();
    s.edge.max_recover = 600;
    s.demo = false;
    common::start(s).await
}

async fn publish(app: &Running, channel: &str, n: u64) {
    let topic = app.edge.cfg.naming.channel(channel);
    let rec = Record {
        key: None,
        headers: Default::default(),
        payload: Bytes::from(format!(r#"{{"n":{n}}}"#)),
    };
    app.bus.publish(&topic, rec).await.unwrap();
}

/// Connects to `/ws`, sends `subscribe` (with `extra` fields) and returns the `subscribed`.
async fn subscribe(app: &Running, channel: &str, extra: Value) -> (Ws, Value) {
    let (mut ws, _) = connect(&app.url("/ws")).await;
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    let mut op = json!({"op": "subscribe", "channel": channel});
    for (k, v) in extra.as_object().unwrap() {
        op[k] = v.clone();
    }
    ws.send(Message::text(op.to_string())).await.unwrap();
    let s = next_json(&mut ws).await;
    assert_eq!(s["op"], "subscribed", "{s}");
    assert_eq!(s["channel"], channel);
    (ws, s)
}

/// The next channel message: (offset, n).
async fn message(ws: &mut Ws) -> (u64, u64) {
    let v = next_json(ws).await;
    let offset = v["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {v}"));
    let n = v["data"]["n"].as_u64().unwrap_or_else(|| panic!("no data.n in {v}"));
    (offset, n)
}

/// Reads `count` messages and checks they are `first..first+count` with increasing offsets.
async fn expect_run(ws: &mut Ws, first: u64, count: u64) -> u64 {
    let mut last = 0;
    for i in 0..count {
        let (offset, n) = message(ws).await;
        assert_eq!(n, first + i, "in order, none missing, none twice");
        assert!(offset > last, "offsets increase: {offset} after {last}");
        last = offset;
    }
    last
}

/// Publishes a marker and reads until it: what came before it is returned.
async fn until_marker(app: &Running, ws: &mut Ws, channel: &str) -> Vec<u64> {
    publish(app, channel, 999_999_999).await;
    let mut seen = Vec::new();
    loop {
        let (_, n) = message(ws).await;
        if n == 999_999_999 {
            return seen;
        }
        seen.push(n);
    }
}

/// A subscriber leaves, 500 messages are published, it comes back with `since` and gets
/// exactly those 500 in order, then live ones; the refusals are explicit.
async fn recovery(bus_url: &str) {
    let app = app(bus_url).await;
    let channel = unique("h.");
    let (mut ws, s) = subscribe(&app, &channel, json!({})).await;
    let epoch = s["epoch"]
        .as_str()
        .expect("a channel with history has an epoch")
        .to_owned();
    assert_eq!(s["offset"], 0, "nothing published yet: {s}");
    assert!(s.get("recovered").is_none(), "no `since`, no `recovered`: {s}");
    for n in 0..5 {
        publish(&app, &channel, n).await;
    }
    let last = expect_run(&mut ws, 0, 5).await;
    drop(ws);

    for n in 5..505 {
        publish(&app, &channel, n).await;
    }
    let (mut ws, s) = subscribe(&app, &channel, json!({"since": {"offset": last, "epoch": epoch}})).await;
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["epoch"], epoch.as_str());
    let cur = s["offset"].as_u64().unwrap();
    let end = expect_run(&mut ws, 5, 500).await;
    assert_eq!(end, cur, "the last recovered message is the `subscribed` offset");
    for n in 505..508 {
        publish(&app, &channel, n).await;
    }
    expect_run(&mut ws, 505, 3).await;
    assert!(
        until_marker(&app, &mut ws, &channel).await.is_empty(),
        "nothing twice at the seam"
    );

    // Another epoch: recovered:false, live only.
    let (mut ws, s) = subscribe(&app, &channel, json!({"since": {"offset": last, "epoch": "another"}})).await;
    assert_eq!(s["recovered"], false, "{s}");
    assert_eq!(s["epoch"], epoch.as_str(), "the answer names the current epoch");
    assert!(
        until_marker(&app, &mut ws, &channel).await.is_empty(),
        "no history after recovered:false"
    );

    // From the start: 510 behind is within max_recover (600), 610 is not.
    let (mut ws, s) = subscribe(&app, &channel, json!({"since": {"offset": 0, "epoch": epoch}})).await;
    assert_eq!(s["recovered"], true, "{s}");
    expect_run(&mut ws, 0, 508).await;
    drop(ws);
    for n in 0..100 {
        publish(&app, &channel, 1000 + n).await;
    }
    let (mut ws, s) = subscribe(&app, &channel, json!({"since": {"offset": 0, "epoch": epoch}})).await;
    assert_eq!(s["recovered"], false, "610 behind, max_recover 600: {s}");
    assert!(until_marker(&app, &mut ws, &channel).await.is_empty());

    // rewind:1 is the last value, then live.
    let (mut ws, s) = subscribe(&app, &channel, json!({"rewind": 1})).await;
    assert!(s.get("recovered").is_none(), "{s}");
    let (offset, n) = message(&mut ws).await;
    assert_eq!(
        (offset, n),
        (s["offset"].as_u64().unwrap(), 999_999_999),
        "the newest message"
    );
    assert!(until_marker(&app, &mut ws, &channel).await.is_empty());

    // The history API: the same log.
    let http = reqwest::Client::new();
    let url = app.admin_url(&format!("/api/channels/{channel}/history?since={last}&limit=1000"));
    let h: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(h["epoch"], epoch.as_str());
    assert_eq!(h["complete"], true);
    let ns: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"]["n"].as_u64().unwrap_or(u64::MAX))
        .collect();
    assert_eq!(ns.len(), 503 + 4 + 100, "503, four markers, the 100 more");
    assert_eq!(&ns[..503], (5..508).collect::<Vec<_>>().as_slice());
    let h: Value = http
        .get(app.admin_url(&format!("/api/channels/{channel}/history?since={last}&limit=10")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["messages"].as_array().unwrap().len(), 10);
    for (path, status) in [
        (format!("/api/channels/{}/history", unique("none.")), 404),
        (format!("/api/channels/{channel}/history?limit=0"), 400),
        (format!("/api/channels/{channel}/history?since=-1"), 400),
        (format!("/api/channels/{channel}/history?bogus=1"), 400),
    ] {
        let r = http.get(app.admin_url(&path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    app.stop().await;
}

/// `since` older than what is retained (`s.*` keeps 10) is recovered:false; so is a channel
/// without history.
async fn beyond_retention(bus_url: &str) {
    let app = app(bus_url).await;
    let channel = unique("s.");
    let (mut ws, s) = subscribe(&app, &channel, json!({})).await;
    let epoch = s["epoch"].as_str().unwrap().to_owned();
    publish(&app, &channel, 0).await;
    let (first, _) = message(&mut ws).await;
    drop(ws);
    for n in 1..30 {
        publish(&app, &channel, n).await;
    }
    let (mut ws, s) = subscribe(&app, &channel, json!({"since": {"offset": first, "epoch": epoch}})).await;
    assert_eq!(s["recovered"], false, "19 of the missing 29 were dropped: {s}");
    assert!(until_marker(&app, &mut ws, &channel).await.is_empty());
    // rewind past retention gives what is retained: the last 10.
    let (mut ws, _) = subscribe(&app, &channel, json!({"rewind": 50})).await;
    expect_run(&mut ws, 21, 9).await;
    assert_eq!(message(&mut ws).await.1, 999_999_999, "the marker is the tenth");

    let plain = unique("p.");
    let (_ws, s) = subscribe(&app, &plain, json!({"since": {"offset": 3, "epoch": epoch}})).await;
    assert_eq!(s, json!({"op":"subscribed","channel":plain,"recovered":false}));
    app.stop().await;
}

/// The seam: 100 subscribers recover while a publisher keeps publishing about 1,000 msg/s. Each
/// must get exactly the log's messages after its `since` offset, in the log's order, through
/// to the end: no gap and no duplicate where history meets live. The log's order is what a
/// live probe subscriber saw.
async fn seam(bus_url: &str) {
    let app = Arc::new(app(bus_url).await);
    let channel = unique("h.");
    let (mut probe, s) = subscribe(&app, &channel, json!({})).await;
    let epoch = s["epoch"].as_str().unwrap().to_owned();
    const TOTAL: u64 = 3000;
    let publisher = {
        let app = app.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for burst in 0..TOTAL / 10 {
                tick.tick().await;
                let sends = (0..10).map(|i| publish(&app, &channel, burst * 10 + i));
                futures::future::join_all(sends).await;
            }
        })
    };
    // The probe's view of the log, shared with the subscribers as it grows.
    let (log_tx, log_rx) = tokio::sync::watch::channel(Vec::<(u64, u64)>::new());
    let probe_task = tokio::spawn(async move {
        let mut log = Vec::new();
        while log.len() < TOTAL as usize {
            log.push(message(&mut probe).await);
            if log.len() % 20 == 0 || log.len() == TOTAL as usize {
                log_tx.send_replace(log.clone());
            }
        }
        log
    });
    let mut subs = Vec::new();
    for i in 0..100u64 {
        // Start points spread over the run: wait until the probe has seen enough.
        let mut rx = log_rx.clone();
        let want = 101 + i * 25;
        let seen = rx.wait_for(|l| l.len() as u64 >= want).await.unwrap().clone();
        let start = seen.len() - 100;
        let from = seen[start - 1];
        let (mut ws, s) = subscribe(&app, &channel, json!({"since": {"offset": from.0, "epoch": epoch}})).await;
        assert_eq!(s["recovered"], true, "subscriber {i}: {s}");
        subs.push(tokio::spawn(async move {
            // Every message of the log after `from`: the log holds TOTAL in all.
            let mut got = Vec::new();
            for _ in start..TOTAL as usize {
                got.push(message(&mut ws).await);
            }
            (start, got)
        }));
    }
    publisher.await.unwrap();
    let log = probe_task.await.unwrap();
    for s in subs {
        let (start, got) = s.await.unwrap();
        let want = &log[start..];
        if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
            panic!(
                "from log position {start}: message {i} is {:?}, the log has {:?} (a gap, a duplicate or out of order)",
                got.get(i),
                want.get(i)
            );
        }
    }
    // Nothing more came after the log's end (a duplicate would have shifted the comparison).
    Arc::try_unwrap(app).ok().expect("one owner").stop().await;
}

mod memory {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery() {
        super::recovery("memory://").await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_retention() {
        super::beyond_retention("memory://").await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seam() {
        super::seam("memory://").await
    }

    /// A restarted memory bus starts a new log with a new epoch: recovered:false.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_changes_the_epoch() {
        let channel = super::unique("h.");
        let first = super::app("memory://").await;
        let (mut ws, s) = super::subscribe(&first, &channel, super::json!({})).await;
        super::publish(&first, &channel, 1).await;
        let (offset, _) = super::message(&mut ws).await;
        let epoch = s["epoch"].as_str().unwrap().to_owned();
        first.stop().await;
        let second = super::app("memory://").await;
        super::publish(&second, &channel, 2).await;
        let (_ws, s) = super::subscribe(
            &second,
            &channel,
            super::json!({"since": {"offset": offset, "epoch": epoch}}),
        )
        .await;
        assert_eq!(s["recovered"], false, "{s}");
        assert_ne!(s["epoch"], epoch.as_str(), "a new log, a new epoch");
        second.stop().await;
    }
}

mod nats {
    fn url() -> String {
        std::env::var("NATS_URL").expect("NATS_URL is not set: run ./scripts/test, which starts nats-server")
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery() {
        super::recovery(&url()).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_retention() {
        super::beyond_retention(&url()).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seam() {
        super::seam(&url()).await
    }
}

mod kafka {
    fn url() -> String {
        let brokers = std::env::var("KAFKA_BROKERS")
            .expect("KAFKA_BROKERS is not set: run ./scripts/test, which starts a Kafka broker");
        format!("kafka://{brokers}")
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery() {
        super::recovery(&url()).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_retention() {
        super::beyond_retention(&url()).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seam() {
        super::seam(&url()).await
    }
}
