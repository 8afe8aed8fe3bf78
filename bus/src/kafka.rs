//! `kafka://HOST:PORT[,HOST:PORT…]`: rdkafka.
//!
//! - One idempotent producer per process (`acks=all`, `enable.idempotence=true`) with Kafka's
//!   murmur2 partitioner, so Java clients, NATS partition tokens and `replay` agree on
//!   key → partition. `publish` returns the record's offset once the broker acknowledged it.
//! - Topics are created on first use: inbound and outbound with `partitions` partitions, the
//!   session feed compacted, node delivery and channel topics with one partition (one partition
//!   keeps a channel's order and gives it one offset sequence).
//! - Group subscriptions are consumer groups (`<prefix>-<group>`); `subscribe` returns once the
//!   group has assigned partitions. A group without committed offsets starts at the beginning.

//! - Plain subscriptions share one assign-based consumer per process and start at the high
//!   watermark resolved at subscribe time: everything published after `subscribe` returns is
//!   delivered. [`StartFrom::Earliest`] starts at the log's beginning instead.

use crate::{check_name, Bus, BusError, BusOptions, Message, Record, StartFrom, SubscribeOptions, Subscription};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::{Headers, Naming, TopicClass};
use tokio::sync::mpsc;

type Senders = Arc<Mutex<HashMap<String, Vec<(u64, mpsc::Sender<Message>)>>>>;

pub struct KafkaBus {
    brokers: String,
    tls: Option<crate::BusTls>,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// The shared assign-based consumer for plain subscriptions, and who wants which topic.
    fanout: Arc<StreamConsumer>,
    senders: Senders,
    next_id: AtomicU64,
    created: Mutex<HashSet<String>>,
    /// Serialises topic creation: the first publisher creates, the others wait for it.
    creating: tokio::sync::Mutex<()>,
    prefix: String,
    naming: Naming,
    partitions: i32,
    buffer: usize,
    ack_timeout: Duration,
    ready: Arc<std::sync::atomic::AtomicBool>,
    _fanout_task: AbortOnDrop,
}

/// Keeps `ready` current: true while the broker answers a metadata request (every second).
/// Stops when the bus is dropped.
fn watch_readiness(producer: FutureProducer, ready: std::sync::Weak<std::sync::atomic::AtomicBool>) {
    use rdkafka::producer::Producer as _;
    std::thread::Builder::new()
        .name("kafka-readiness".into())
        .spawn(move || {
            while let Some(flag) = ready.upgrade() {
                let ok = producer.client().fetch_metadata(None, Duration::from_secs(1)).is_ok();
                flag.store(ok, Ordering::Relaxed);
                drop(flag);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .ok();
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn map_err(e: KafkaError) -> BusError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => BusError::Overflow { topic: String::new() },
        _ => unavailable(e),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The base config every client shares.
fn base(brokers: &str, name: &str, tls: Option<&crate::BusTls>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", name)
        .set("log_level", "3");
    if let Some(t) = tls {
        c.set("security.protocol", "ssl");
        for (k, v) in [
            ("ssl.ca.location", &t.ca),
            ("ssl.certificate.location", &t.cert),
            ("ssl.key.location", &t.key),
        ] {
            if let Some(p) = v {
                c.set(k, p.display().to_string());
            }
        }
    }
    c
}

/// A consumer config tuned for latency: librdkafka's default fetch wait (500 ms) would add up
/// to half a second per hop on a quiet topic.
fn consumer_base(brokers: &str, name: &str, tls: Option<&crate::BusTls>) -> ClientConfig {
    let mut c = base(brokers, name, tls);
    c.set("fetch.wait.max.ms", "20").set("fetch.min.bytes", "1");
    c
}

fn to_record(m: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    use rdkafka::Message as _;
    let mut headers = Headers::new();
    if let Some(h) = m.headers() {
        for hd in h.iter() {
            if let Some(v) = hd.value {
                headers.insert(hd.key, String::from_utf8_lossy(v).into_owned());
            }
        }
    }
    Message {
        topic: Arc::from(m.topic()),
        offset: u64::try_from(m.offset()).ok(),
        record: Arc::new(Record {
            key: m.key().map(Bytes::copy_from_slice),
            headers,
            payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        }),
    }
}

/// NATS-style pattern → librdkafka regex subscription (`^…$`).
fn pattern_regex(pattern: &str) -> String {
    let parts: Vec<String> = pattern
        .split('.')
        .map(|t| match t {
            "*" => "[^.]+".to_owned(),
            ">" => ".+".to_owned(),
            t => regex_escape(t),
        })
        .collect();
    format!("^{}$", parts.join("\\."))
}

fn regex_escape(t: &str) -> String {
    t.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_string()
            } else {
                format!("\\{c}")
            }
        })
        .collect()
}

impl KafkaBus {
    pub async fn connect(url: &str, opts: &BusOptions) -> Result<Self, BusError> {
        let brokers = url.trim_start_matches("kafka://").trim_end_matches('/').to_owned();
        let producer: FutureProducer = base(&brokers, &opts.name, opts.tls.as_ref())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            .set("message.timeout.ms", opts.ack_timeout.as_millis().max(1000).to_string())
            .set("queue.buffering.max.messages", opts.outage_buffer.max(1).to_string())
            .create()
            .map_err(unavailable)?;
        let admin: AdminClient<DefaultClientContext> = base(&brokers, &opts.name, opts.tls.as_ref())
            .create()
            .map_err(unavailable)?;
        // Fail fast on an unreachable broker, with a clear message.
        let p2 = producer.clone();
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer as _;
            p2.client().fetch_metadata(None, Duration::from_secs(10)).map(|_| ())
        })
        .await
        .map_err(unavailable)?
        .map_err(|e| unavailable(format!("cannot reach Kafka at {brokers}: {e}")))?;
        let fanout: StreamConsumer = consumer_base(&brokers, &opts.name, opts.tls.as_ref())
            .set("group.id", format!("{}-fanout-{}", opts.prefix, std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(unavailable)?;
        let fanout = Arc::new(fanout);
        let senders: Senders = Arc::default();
        let task = tokio::spawn(pump_fanout(fanout.clone(), senders.clone()));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        watch_readiness(producer.clone(), Arc::downgrade(&ready));
        Ok(Self {
            brokers,
            tls: opts.tls.clone(),
            producer,
            admin,
            fanout,
            senders,
            next_id: AtomicU64::new(1),
            created: Mutex::new(HashSet::new()),
            creating: tokio::sync::Mutex::new(()),
            prefix: opts.prefix.clone(),
            naming: opts.naming()?,
            partitions: opts.partitions.max(1) as i32,
            buffer: opts.buffer.max(1),
            ack_timeout: opts.ack_timeout,
            ready,
            _fanout_task: AbortOnDrop(task),
        })
    }

    /// Creates `topic` if this process has not seen it yet (an existing topic is fine).
    async fn ensure_topic(&self, topic: &str) -> Result<(), BusError> {
        if self.created.lock().contains(topic) {
            return Ok(());
        }
        let _one_at_a_time = self.creating.lock().await;
        if self.created.lock().contains(topic) {
            return Ok(());
        }

        let class = self.naming.classify(topic);
        // Node delivery and channels: one partition (one order, one offset sequence).
        let partitions = match class {
            TopicClass::Node | TopicClass::Channel => 1,
            _ => self.partitions,
        };

        let mut nt = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        if class == TopicClass::Sessions {
            nt = nt.set("cleanup.policy", "compact");
        }
        let res = self
            .admin
            .create_topics(
                [&nt],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(unavailable)?;
        for r in res {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(unavailable(format!("cannot create topic {t}: {code}"))),
            }
        }
        self.created.lock().insert(topic.to_owned());
        Ok(())
    }

    /// Partition count of an existing topic.
    async fn partitions_of(&self, topic: &str) -> Result<Vec<i32>, BusError> {
        let c = self.fanout.clone();
        let t = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let md = c
                .fetch_metadata(Some(&t), Duration::from_secs(10))
                .map_err(unavailable)?;
            let parts: Vec<i32> = md
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if parts.is_empty() {
                Err(unavailable(format!("topic {t} has no partitions")))
            } else {
                Ok(parts)
            }
        })
        .await
        .map_err(unavailable)?
    }

    /// The shared consumer's start offsets for `topic`: each partition's high watermark now
    /// (or the beginning).
    async fn start_offsets(&self, topic: &str, start: StartFrom) -> Result<TopicPartitionList, BusError> {
        let parts = self.partitions_of(topic).await?;
        let c = self.fanout.clone();
        let t = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in parts {
                let offset = match start {
                    StartFrom::Earliest => Offset::Beginning,
                    StartFrom::Latest => {
                        let (_, high) = c
                            .fetch_watermarks(&t, p, Duration::from_secs(10))
                            .map_err(unavailable)?;
                        Offset::Offset(high)
                    }
                };
                tpl.add_partition_offset(&t, p, offset).map_err(unavailable)?;
            }
            Ok(tpl)
        })
        .await
        .map_err(unavailable)?
    }

    async fn group_subscription(&self, pattern: &str, group: &str, reset: &str) -> Result<Subscription, BusError> {
        let topic_or_regex = if pattern.contains(['*', '>']) {
            pattern_regex(pattern)
        } else {
            self.ensure_topic(pattern).await?;
            pattern.to_owned()
        };
        let consumer: StreamConsumer =
            consumer_base(&self.brokers, &format!("{}-{group}", self.prefix), self.tls.as_ref())
                .set("group.id", format!("{}-{group}", self.prefix))
                // A group with no committed offset starts at the beginning: a partition that
                // moves to a member during a rebalance, before anything was committed, loses
                // nothing (at the cost of reading history once, on a group's very first start).
                .set("auto.offset.reset", reset)
                .set("enable.auto.commit", "true")
                .set("auto.commit.interval.ms", "1000")
                .set("enable.partition.eof", "false")
                .set("topic.metadata.refresh.interval.ms", "2000")
                .create()
                .map_err(unavailable)?;
        consumer.subscribe(&[&topic_or_regex]).map_err(unavailable)?;
        let consumer = Arc::new(consumer);
        let (tx, rx) = mpsc::channel(self.buffer);
        let c = consumer.clone();
        let task = tokio::spawn(async move {
            let mut stream = c.stream();
            while let Some(m) = stream.next().await {
                match m {
                    Ok(m) => {
                        if tx.send(to_record(&m)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
                }
            }
        });
        // Live once the group has given this member partitions.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                task.abort();
                return Err(unavailable(format!(
                    "group {group} got no partitions of {pattern} within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Subscription::new(rx, (AbortOnDrop(task), consumer)))
    }
}

async fn pump_fanout(consumer: Arc<StreamConsumer>, senders: Senders) {
    let mut stream = consumer.stream();
    while let Some(m) = stream.next().await {
        let m = match m {
            Ok(m) => to_record(&m),
            Err(e) => {
                tracing::warn!(error = %e, "kafka consumer error");
                continue;
            }
        };
        let targets: Vec<mpsc::Sender<Message>> = senders
            .lock()
            .get(&*m.topic)
            .map(|v| v.iter().map(|(_, s)| s.clone()).collect())
            .unwrap_or_default();
        for tx in targets {
            let _ = tx.send(m.clone()).await;
        }
    }
}

/// Removes a plain subscriber; the last one out unassigns the topic.
struct Unsubscribe {
    consumer: Arc<StreamConsumer>,
    senders: Senders,
    topic: String,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut g = self.senders.lock();
        let empty = match g.get_mut(&self.topic) {
            Some(v) => {
                v.retain(|(id, _)| *id != self.id);
                v.is_empty()
            }
            None => false,
        };
        if empty {
            g.remove(&self.topic);
            if let Ok(a) = self.consumer.assignment() {
                let mut tpl = TopicPartitionList::new();
                for e in a.elements_for_topic(&self.topic) {
                    tpl.add_partition(&self.topic, e.partition());
                }
                let _ = self.consumer.incremental_unassign(&tpl);
            }
        }
    }
}

#[async_trait]
impl Bus for KafkaBus {
    fn scheme(&self) -> &'static str {
        "kafka"
    }

    async fn publish(&self, topic: &str, record: Record) -> Result<Option<u64>, BusError> {
        check_name(topic, false)?;
        self.ensure_topic(topic).await?;
        let mut h = OwnedHeaders::new_with_capacity(record.headers.len());
        for (k, v) in record.headers.iter() {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(&record.payload[..]).headers(h);
        if let Some(k) = &record.key {
            fr = fr.key(&k[..]);
        }
        match self.producer.send(fr, self.ack_timeout).await {
            Ok(delivery) => Ok(u64::try_from(delivery.offset).ok()),
            Err((e, _)) => Err(match map_err(e) {
                BusError::Overflow { .. } => BusError::Overflow {
                    topic: topic.to_owned(),
                },
                other => other,
            }),
        }
    }

    async fn subscribe(&self, pattern: &str, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        check_name(pattern, true)?;
        if let Some(g) = &opts.group {
            return self.group_subscription(pattern, g, "earliest").await;
        }
        if pattern.contains(['*', '>']) {
            // Plain wildcard subscriptions get a private group, starting at the end.
            let g = format!("p-{}", process_unique(self.next_id.fetch_add(1, Ordering::Relaxed)));
            return self.group_subscription(pattern, &g, "latest").await;
        }
        self.ensure_topic(pattern).await?;
        let (tx, rx) = mpsc::channel(self.buffer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut g = self.senders.lock();
            let v = g.entry(pattern.to_owned()).or_default();
            v.push((id, tx));
            v.len() == 1
        };
        if first {
            let assigned = match self.start_offsets(pattern, opts.start).await {
                Ok(tpl) => self.fanout.incremental_assign(&tpl).map_err(unavailable),
                Err(e) => Err(e),
            };
            if let Err(e) = assigned {
                // Leave no subscriber behind: the next subscribe must try the assignment again.
                let mut g = self.senders.lock();
                g.remove(pattern);
                return Err(e);
            }
        }

        Ok(Subscription::new(
            rx,
            Unsubscribe {
                consumer: self.fanout.clone(),
                senders: self.senders.clone(),
                topic: pattern.to_owned(),
                id,
            },
        ))
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<(), BusError> {
        use rdkafka::producer::Producer as _;
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(10)))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }
}

/// A name unique to this process and call: `<pid>-<n>` (private consumer group names).
fn process_unique(n: u64) -> String {
    format!("{}-{n}", std::process::id())
}

/// One record read back from the log, for `replay`.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The broker's timestamp (ms).
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Where a session's records are: the inbound topics (all `<prefix>.in.*`) and, once its
/// connect names a node, that node's delivery topic.
pub struct SessionLog {
    brokers: String,
    naming: Naming,
    tls: Option<crate::BusTls>,
}

/// Progress of a scan: (records scanned so far, records to scan in all).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

impl SessionLog {
    pub fn new(url: &str, naming: Naming, tls: Option<crate::BusTls>) -> Self {
        Self {
            brokers: url.trim_start_matches("kafka://").trim_end_matches('/').to_owned(),
            naming,
            tls,
        }
    }

    /// Every record keyed `session` in the session's inbound partitions and its node topic,
    /// with broker timestamps in `[from_ms, to_ms]`, in log order per topic.
    pub fn read(
        &self,
        session: &str,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        progress: Progress<'_>,
    ) -> Result<Vec<LogRecord>, BusError> {
        use rdkafka::consumer::BaseConsumer;
        let consumer: BaseConsumer = base(&self.brokers, "switchyard-replay", self.tls.as_ref())
            .set("group.id", format!("switchyard-replay-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(unavailable)?;
        let timeout = Duration::from_secs(10);
        let md = consumer
            .fetch_metadata(None, timeout)
            .map_err(|e| unavailable(format!("cannot reach Kafka at {}: {e}", self.brokers)))?;
        let inbound_prefix = self.naming.inbound("");
        let key = session.as_bytes();
        // (topic, partition) pairs to scan: murmur2 says which partition holds the session.
        let mut targets: Vec<(String, i32)> = md
            .topics()
            .iter()
            .filter(|t| self.naming.classify(t.name()) == TopicClass::Inbound && !t.partitions().is_empty())
            .map(|t| {
                (
                    t.name().to_owned(),
                    switchyard_protocol::naming::partition_for(key, t.partitions().len() as u32) as i32,
                )
            })
            .collect();
        if targets.is_empty() {
            return Err(BusError::Other(format!(
                "no inbound topics ({inbound_prefix}*) on {}",
                self.brokers
            )));
        }
        let mut out = self.scan(&consumer, &targets, key, from_ms, to_ms, progress)?;
        // The node that held the session, from its connect record, holds the replies.
        let node = out.iter().find_map(|r| {
            r.headers
                .get(switchyard_protocol::envelope::header::NODE)
                .map(str::to_owned)
        });
        if let Some(node) = node {
            let topic = self.naming.node(&node);
            if md.topics().iter().any(|t| t.name() == topic) {
                targets = vec![(topic, 0)];
                out.extend(self.scan(&consumer, &targets, key, from_ms, to_ms, progress)?);
            }
        }
        Ok(out)
    }

    fn scan(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer,
        targets: &[(String, i32)],
        key: &[u8],
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        progress: Progress<'_>,
    ) -> Result<Vec<LogRecord>, BusError> {
        use rdkafka::Message as _;
        let timeout = Duration::from_secs(10);
        let mut out = Vec::new();
        for (topic, partition) in targets {
            let (low, high) = consumer
                .fetch_watermarks(topic, *partition, timeout)
                .map_err(unavailable)?;
            if high <= low {
                continue;
            }
            let start = match from_ms {
                Some(ms) => {
                    let mut q = TopicPartitionList::new();
                    q.add_partition_offset(topic, *partition, Offset::Offset(ms))
                        .map_err(unavailable)?;
                    let r = consumer.offsets_for_times(q, timeout).map_err(unavailable)?;
                    match r.find_partition(topic, *partition).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        _ => high, // nothing at or after `from`
                    }
                }
                None => low,
            };
            if start >= high {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, *partition, Offset::Offset(start))
                .map_err(unavailable)?;
            consumer.assign(&tpl).map_err(unavailable)?;
            let total = (high - start) as u64;
            let mut seen = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while seen < total {
                if std::time::Instant::now() > deadline {
                    return Err(unavailable(format!(
                        "reading {topic}/{partition} timed out at {seen}/{total}"
                    )));
                }
                let Some(m) = consumer.poll(Duration::from_millis(500)) else {
                    continue;
                };
                let m = match m {
                    Ok(m) => m,
                    Err(KafkaError::PartitionEOF(_)) => break,
                    Err(e) => return Err(unavailable(e)),
                };
                seen = (m.offset() - start + 1) as u64;
                progress(seen, total);
                let ts = m.timestamp().to_millis();
                if to_ms.is_some_and(|t| ts.is_some_and(|ts| ts > t)) {
                    break;
                }
                if m.key() != Some(key) {
                    continue;
                }
                let mut headers = Headers::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        if let Some(v) = hd.value {
                            headers.insert(hd.key, String::from_utf8_lossy(v).into_owned());
                        }
                    }
                }
                out.push(LogRecord {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: m.offset(),
                    timestamp_ms: ts,
                    key: m.key().map(Bytes::copy_from_slice),
                    headers,
                    payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }
}
