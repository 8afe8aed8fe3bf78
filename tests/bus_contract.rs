//! The Bus contract, written once and run against every bus: `mod memory` always, `mod nats`
//! and `mod kafka` against the real brokers that `scripts/test` starts.

mod common;

use bytes::Bytes;
use std::sync::Arc;
use switchyard_bus::{Bus, BusOptions, Record, SubscribeOptions};
use switchyard_protocol::Headers;

fn rec(key: &str, payload: String) -> Record {
    let mut h = Headers::new();
    h.insert("sy-session", key);
    h.insert("x-test", "1");
    Record {
        key: Some(Bytes::from(key.to_owned())),
        headers: h,
        payload: Bytes::from(payload),
    }
}

async fn recv(sub: &mut switchyard_bus::Subscription) -> switchyard_bus::Message {
    tokio::time::timeout(common::WAIT, sub.recv())
        .await
        .expect("message in time")
        .expect("subscription open")
}

/// Key, headers and payload arrive unchanged; a subscription is live when subscribe returns.
async fn round_trip(bus: Arc<dyn Bus>) {
    let topic = common::unique("t.rt.");
    let mut sub = bus.subscribe(&topic, SubscribeOptions::default()).await.unwrap();
    let payload = "héllo \u{0} binary-safe".to_string();
    bus.publish(&topic, rec("s1", payload.clone())).await.unwrap();
    let m = recv(&mut sub).await;
    assert_eq!(&*m.topic, topic.as_str());
    assert_eq!(m.record.key.as_deref(), Some(&b"s1"[..]));
    assert_eq!(m.record.headers.get("x-test"), Some("1"));
    assert_eq!(m.record.headers.get("sy-session"), Some("s1"));
    assert_eq!(m.record.payload, Bytes::from(payload));
}

/// Every plain subscriber gets every record, in publish order.
async fn fan_out_in_order(bus: Arc<dyn Bus>) {
    let topic = common::unique("t.fan.");
    let mut a = bus.subscribe(&topic, SubscribeOptions::default()).await.unwrap();
    let mut b = bus.subscribe(&topic, SubscribeOptions::default()).await.unwrap();
    for i in 0..500 {
        bus.publish(&topic, rec("k", i.to_string())).await.unwrap();
    }
    for sub in [&mut a, &mut b] {
        for i in 0..500 {
            assert_eq!(recv(sub).await.record.payload, Bytes::from(i.to_string()));
        }
    }
}

/// Wildcards: `*` one token, `>` the rest.
async fn patterns(bus: Arc<dyn Bus>) {
    let base = common::unique("t.pat.");
    let mut star = bus
        .subscribe(&format!("{base}.*"), SubscribeOptions::default())
        .await
        .unwrap();
    let mut rest = bus
        .subscribe(&format!("{base}.>"), SubscribeOptions::default())
        .await
        .unwrap();
    bus.publish(&format!("{base}.a"), rec("k", "1".into())).await.unwrap();
    bus.publish(&format!("{base}.a.b"), rec("k", "2".into())).await.unwrap();
    assert_eq!(recv(&mut star).await.record.payload, "1");
    assert_eq!(recv(&mut rest).await.record.payload, "1");
    assert_eq!(recv(&mut rest).await.record.payload, "2");
    bus.publish(&format!("{base}.c"), rec("k", "3".into())).await.unwrap();
    assert_eq!(recv(&mut star).await.record.payload, "3", "`*` did not match a.b");
}

/// Members of a group share records, each delivered exactly once. With `sticky`, a key always
/// goes to the same member, so each key's records stay in order (memory://). NATS queue groups
/// pick a member per message: order inside a group is not promised there (docs/protocol.md).
async fn group_shares(bus: Arc<dyn Bus>, sticky: bool) {
    let topic = common::unique("t.grp.");
    let group = common::unique("g");
    // Both members forward into one channel, tagged with the member index.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for idx in 0..2 {
        let mut sub = bus.subscribe(&topic, SubscribeOptions::group(&group)).await.unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.recv().await {
                if tx.send((idx, m)).is_err() {
                    return;
                }
            }
        });
    }
    const KEYS: usize = 50;
    const PER_KEY: usize = 40;
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            bus.publish(&topic, rec(&format!("k{k}"), format!("k{k}:{i}")))
                .await
                .unwrap();
        }
    }
    let mut next = vec![0usize; KEYS];
    let mut per_member = [0usize; 2];
    let mut owner: Vec<Option<usize>> = vec![None; KEYS];
    let mut seen: Vec<std::collections::BTreeSet<usize>> = vec![Default::default(); KEYS];

    for _ in 0..KEYS * PER_KEY {
        let (idx, m) = tokio::time::timeout(common::WAIT, rx.recv())
            .await
            .expect("record in time")
            .unwrap();
        let p = String::from_utf8(m.record.payload.to_vec()).unwrap();
        let (k, i) = p.split_once(':').unwrap();
        let k: usize = k[1..].parse().unwrap();
        let i: usize = i.parse().unwrap();
        if sticky {
            assert_eq!(i, next[k], "key k{k} in order");
            assert_eq!(*owner[k].get_or_insert(idx), idx, "a key sticks to one member");
        }
        seen[k].insert(i);
        next[k] += 1;
        per_member[idx] += 1;
    }
    assert!(
        seen.iter().all(|s| s.len() == PER_KEY),
        "each record delivered exactly once"
    );
    assert!(
        per_member[0] > 0 && per_member[1] > 0,
        "both members got work: {per_member:?}"
    );
}

/// Invalid names are typed errors, not panics.
async fn invalid_names(bus: Arc<dyn Bus>) {
    assert!(bus.publish("a..b", rec("k", String::new())).await.is_err());
    assert!(bus.publish("a.*", rec("k", String::new())).await.is_err());
    assert!(bus.subscribe("a.>.b", SubscribeOptions::default()).await.is_err());
}

macro_rules! contract {
    ($make:expr, sticky = $sticky:expr) => {
        #[tokio::test]
        async fn round_trip() {
            super::round_trip($make).await
        }
        #[tokio::test]
        async fn fan_out_in_order() {
            super::fan_out_in_order($make).await
        }
        #[tokio::test]
        async fn patterns() {
            super::patterns($make).await
        }
        #[tokio::test]
        async fn group_shares() {
            super::group_shares($make, $sticky).await
        }
        #[tokio::test]
        async fn invalid_names() {
            super::invalid_names($make).await
        }
    };
}

mod memory {
    use super::*;

    async fn bus() -> Arc<dyn Bus> {
        switchyard_bus::connect("memory://", &BusOptions::default())
            .await
            .unwrap()
    }

    contract!(bus().await, sticky = true);

    /// A full buffer is an explicit error to the publisher, after the bounded wait.
    #[tokio::test]
    async fn overflow_is_an_error_not_a_silent_drop() {
        let opts = BusOptions {
            buffer: 4,
            publish_timeout: std::time::Duration::from_millis(50),
            ..BusOptions::default()
        };
        let bus = switchyard_bus::connect("memory://", &opts).await.unwrap();
        let mut stalled = bus.subscribe("t.full", SubscribeOptions::default()).await.unwrap();
        for i in 0..4 {
            bus.publish("t.full", rec("k", i.to_string())).await.unwrap();
        }
        let err = bus.publish("t.full", rec("k", "4".into())).await.unwrap_err();
        assert!(matches!(err, switchyard_bus::BusError::Overflow { .. }), "{err}");
        // What was accepted is all there, in order.
        for i in 0..4 {
            assert_eq!(stalled.recv().await.unwrap().record.payload, Bytes::from(i.to_string()));
        }
        assert!(stalled.try_recv().is_none());
    }
}

mod nats {
    use super::*;

    async fn bus() -> Arc<dyn Bus> {
        let url = std::env::var("NATS_URL").expect("NATS_URL is not set: run ./scripts/test, which starts nats-server");
        let opts = BusOptions {
            prefix: common::unique("c"),
            ..BusOptions::default()
        };
        switchyard_bus::connect(&url, &opts).await.unwrap()
    }

    contract!(bus().await, sticky = false);

    /// Inbound topics are durable: publish returns the stream sequence once stored, and a
    /// subscriber of the topic sees every partition.
    #[tokio::test]
    async fn inbound_is_acknowledged_and_partitioned() {
        let url = std::env::var("NATS_URL").expect("NATS_URL");
        let prefix = common::unique("c");
        let opts = BusOptions {
            prefix: prefix.clone(),
            partitions: 4,
            ..BusOptions::default()
        };
        let bus = switchyard_bus::connect(&url, &opts).await.unwrap();
        let topic = format!("{prefix}.in.app");
        let mut sub = bus.subscribe(&topic, SubscribeOptions::default()).await.unwrap();
        // A stock client sees the partition subjects.
        let nc = async_nats::connect(&url).await.unwrap();
        let mut raw = nc.subscribe(format!("{prefix}.in.app.>")).await.unwrap();
        // `flush` only writes the SUB out; a probe published after it on the same connection
        // comes back once the server has processed the SUB. Its subject matches `raw` but not
        // the bus subscription (one token after the topic).
        nc.publish(format!("{prefix}.in.app.probe.x"), Bytes::new())
            .await
            .unwrap();
        nc.flush().await.unwrap();
        let probe = tokio::time::timeout(common::WAIT, futures::StreamExt::next(&mut raw))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(probe.subject.as_str(), format!("{prefix}.in.app.probe.x"));
        let mut seqs = Vec::new();
        for k in 0..20 {
            seqs.push(
                bus.publish(&topic, rec(&format!("s{k}"), k.to_string()))
                    .await
                    .unwrap()
                    .expect("stream seq"),
            );
        }
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "acknowledged with increasing stream sequences"
        );
        for k in 0..20 {
            let m = recv(&mut sub).await;
            assert_eq!(
                &*m.topic,
                topic.as_str(),
                "partition token hidden from subscribers of the topic"
            );
            assert_eq!(m.record.payload, Bytes::from(k.to_string()));
        }
        for k in 0..20 {
            let m = tokio::time::timeout(common::WAIT, futures::StreamExt::next(&mut raw))
                .await
                .unwrap()
                .unwrap();
            let key = format!("s{k}");
            let p = switchyard_protocol::naming::partition_for(key.as_bytes(), 4);
            assert_eq!(
                m.subject.as_str(),
                format!("{prefix}.in.app.p{p}"),
                "key {key} on murmur2(key) % 4"
            );
            assert_eq!(m.payload, Bytes::from(k.to_string()));
        }
    }
}

mod kafka {
    use super::*;

    async fn bus() -> Arc<dyn Bus> {
        let brokers = std::env::var("KAFKA_BROKERS")
            .expect("KAFKA_BROKERS is not set: run ./scripts/test, which starts a Kafka broker");
        let opts = BusOptions {
            prefix: common::unique("c"),
            partitions: 4,
            ..BusOptions::default()
        };
        switchyard_bus::connect(&format!("kafka://{brokers}"), &opts)
            .await
            .unwrap()
    }

    // Wildcard subscriptions on Kafka see only topics that exist when they are made (plus
    // metadata refreshes), so `patterns` is not part of Kafka's contract (docs/protocol.md).
    #[tokio::test]
    async fn round_trip() {
        super::round_trip(bus().await).await
    }
    #[tokio::test]
    async fn fan_out_in_order() {
        super::fan_out_in_order(bus().await).await
    }
    #[tokio::test]
    async fn group_shares() {
        // Two members of one group: partitions split, each key in one partition → sticky.
        super::group_shares(bus().await, true).await
    }
    #[tokio::test]
    async fn invalid_names() {
        super::invalid_names(bus().await).await
    }
}
