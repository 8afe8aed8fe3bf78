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
//! - Channel topics' offsets are the Kafka offsets plus one (0 is "before the first" on every
//!   bus); channel history is in [`history`].

mod client;
mod history;
mod log;
mod progress;
mod scan;

pub use client::Security;
pub use log::{LogRecord, Progress, SessionLog};

use crate::{
    check_name, Ack, Bus, BusError, BusOptions, HistoryLimits, HistoryQuery, HistoryRead, Message, Record, ScanQuery,
    ScanRead, StartFrom, SubscribeOptions, Subscription,
};
use async_trait::async_trait;
use bytes::Bytes;
use client::{base, consumer_base, pattern_regex, probe, to_record};
use futures::StreamExt;
use parking_lot::Mutex;
use progress::Progresses;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::{Naming, TopicClass};
use tokio::sync::mpsc;

/// How long a new topic may take to appear with its partitions in the broker's metadata.
const METADATA_PROPAGATION: Duration = Duration::from_secs(10);
/// Pause between metadata requests while waiting for a new topic's partitions.
const METADATA_RETRY: Duration = Duration::from_millis(50);

type Senders = Arc<Mutex<HashMap<String, Vec<(u64, mpsc::Sender<Message>)>>>>;

pub struct KafkaBus {
    brokers: String,
    security: Security,
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
    histories: Arc<history::Histories>,
    /// Follows `<prefix>.epochs` once a pattern keeps history.
    epochs_follower: Mutex<Option<AbortOnDrop>>,
    scanners: scan::Scanners,
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

impl KafkaBus {
    pub async fn connect(url: &str, opts: &BusOptions) -> Result<Self, BusError> {
        let brokers = url.trim_start_matches("kafka://").trim_end_matches('/').to_owned();
        let security = Security {
            tls: opts.tls.clone(),
            auth: opts.auth.clone(),
        };
        // Fail fast, with one clear error, on an unreachable broker or refused credentials,
        // before any client that would log librdkafka's retries exists.
        let config = base(&brokers, &opts.name, &security);
        let auth = opts.auth.clone();
        let b = brokers.clone();
        tokio::task::spawn_blocking(move || probe(&config, &b, auth.as_ref()))
            .await
            .map_err(unavailable)??;
        let producer: FutureProducer = base(&brokers, &opts.name, &security)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            .set("message.timeout.ms", opts.ack_timeout.as_millis().max(1000).to_string())
            .set("queue.buffering.max.messages", opts.outage_buffer.max(1).to_string())
            .create()
            .map_err(unavailable)?;
        let admin: AdminClient<DefaultClientContext> =
            base(&brokers, &opts.name, &security).create().map_err(unavailable)?;
        let fanout: StreamConsumer = consumer_base(&brokers, &opts.name, &security)
            .set("group.id", format!("{}-fanout-{}", opts.prefix, std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(unavailable)?;
        let fanout = Arc::new(fanout);
        let senders: Senders = Arc::default();
        let naming = opts.naming()?;
        let task = tokio::spawn(pump_fanout(fanout.clone(), senders.clone(), naming.clone()));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        watch_readiness(producer.clone(), Arc::downgrade(&ready));
        Ok(Self {
            brokers,
            security,
            producer,
            admin,
            fanout,
            senders,
            next_id: AtomicU64::new(1),
            created: Mutex::new(HashSet::new()),
            creating: tokio::sync::Mutex::new(()),
            prefix: opts.prefix.clone(),
            naming,
            partitions: opts.partitions.max(1) as i32,
            buffer: opts.buffer.max(1),
            ack_timeout: opts.ack_timeout,
            ready,
            _fanout_task: AbortOnDrop(task),
            histories: Arc::default(),
            epochs_follower: Mutex::new(None),
            scanners: scan::Scanners::default(),
        })
    }

    /// Creates `topic` if this process has not seen it yet (an existing topic is fine).
    /// True when this call created it.
    async fn ensure_topic(&self, topic: &str) -> Result<bool, BusError> {
        if self.created.lock().contains(topic) {
            return Ok(false);
        }
        let _one_at_a_time = self.creating.lock().await;
        if self.created.lock().contains(topic) {
            return Ok(false);
        }

        let class = self.naming.classify(topic);
        let epochs = topic == self.naming.epochs();
        // Node delivery, channels and epochs: one partition (one order, one offset sequence).
        let partitions = match class {
            TopicClass::Node | TopicClass::Channel => 1,
            _ if epochs => 1,
            _ => self.partitions,
        };

        let mut nt = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        if class == TopicClass::Sessions || epochs {
            nt = nt.set("cleanup.policy", "compact");
        }
        let retention = self
            .histories
            .limits_of(topic)
            .map(|l| l.ttl.as_millis().max(1).to_string());
        if let Some(ms) = &retention {
            nt = nt.set("retention.ms", ms);
        }
        let res = self
            .admin
            .create_topics(
                [&nt],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(unavailable)?;
        let mut created = false;
        for r in res {
            match r {
                Ok(_) => created = true,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(unavailable(format!("cannot create topic {t}: {code}"))),
            }
        }
        self.created.lock().insert(topic.to_owned());
        Ok(created)
    }

    /// Makes sure a channel topic with history exists; a topic this call created starts a
    /// new log, so it gets a new epoch.
    async fn ensure_channel(&self, topic: &str) -> Result<(), BusError> {
        if self.ensure_topic(topic).await? && self.histories.limits_of(topic).is_some() {
            self.write_epoch(topic, &history::new_epoch()).await?;
        }
        Ok(())
    }

    /// Records `epoch` for `topic` on `<prefix>.epochs` (and here at once).
    async fn write_epoch(&self, topic: &str, epoch: &str) -> Result<(), BusError> {
        let epochs = self.naming.epochs();
        let fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&epochs)
            .key(topic.as_bytes())
            .payload(epoch.as_bytes());
        self.producer
            .send(fr, self.ack_timeout)
            .await
            .map_err(|(e, _)| map_err(e))?;
        self.histories.epochs.lock().insert(topic.to_owned(), epoch.to_owned());
        Ok(())
    }

    /// Waits until the follower has applied every `<prefix>.epochs` record written so far.
    async fn epochs_caught_up(&self) -> Result<(), BusError> {
        let c = self.fanout.clone();
        let t = self.naming.epochs();
        let (_, high) = tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, 0, Duration::from_secs(10)))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let changed = self.histories.changed.notified();
            if self.histories.applied.load(Ordering::Acquire) >= high {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(unavailable(format!(
                    "{} not read up to offset {high} within 10 s",
                    self.naming.epochs()
                )));
            }
        }
    }

    /// The epoch of a channel topic with history: the one on `<prefix>.epochs`, or a new one.
    async fn epoch_of(&self, topic: &str) -> Result<String, BusError> {
        if let Some(e) = self.histories.epochs.lock().get(topic) {
            return Ok(e.clone());
        }
        self.epochs_caught_up().await?;
        if let Some(e) = self.histories.epochs.lock().get(topic) {
            return Ok(e.clone());
        }
        let e = history::new_epoch();
        self.write_epoch(topic, &e).await?;
        Ok(e)
    }

    /// Partitions of an existing topic. A topic just created may not be in the metadata the
    /// broker serves yet (Apache Kafka answers with no partitions for a moment): asked again
    /// until [`METADATA_PROPAGATION`] has passed.
    ///
    /// Asked on the fanout consumer itself: on its connection this waits behind its fetch held
    /// at the end of the log (up to `fetch.wait.max.ms`, 500 ms: a broker answers a connection
    /// in order), but leaves the consumer knowing the topic's leader, so it fetches a partition
    /// it is then assigned at once. Asked through the producer's client instead, subscribe got
    /// ~500 ms faster but the first live messages came up to ~1 s late (continuity's
    /// `kafka::seam` failed 3 runs of 4).
    async fn partitions_of(&self, topic: &str) -> Result<Vec<i32>, BusError> {
        let c = self.fanout.clone();
        let t = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + METADATA_PROPAGATION;
            loop {
                let md = c
                    .fetch_metadata(Some(&t), Duration::from_secs(10))
                    .map_err(unavailable)?;
                let all: Vec<_> = md.topics().iter().flat_map(|t| t.partitions()).collect();
                // Every partition with a leader: a partition just created may have none yet
                // (fetching its watermarks would fail with NotLeaderForPartition).
                if !all.is_empty() && all.iter().all(|p| p.leader() >= 0 && p.error().is_none()) {
                    return Ok(all.iter().map(|p| p.id()).collect());
                }
                if std::time::Instant::now() >= deadline {
                    return Err(unavailable(format!("topic {t} has no partitions")));
                }
                std::thread::sleep(METADATA_RETRY);
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
            let deadline = std::time::Instant::now() + METADATA_PROPAGATION;
            for p in parts {
                let offset = match start {
                    StartFrom::Earliest => Offset::Beginning,
                    StartFrom::Latest => loop {
                        // A leader elected a moment ago may not answer yet: asked again.
                        match c.fetch_watermarks(&t, p, Duration::from_secs(10)) {
                            Ok((_, high)) => break Offset::Offset(high),
                            Err(e) if std::time::Instant::now() >= deadline => return Err(unavailable(e)),
                            Err(_) => std::thread::sleep(METADATA_RETRY),
                        }
                    },
                };
                tpl.add_partition_offset(&t, p, offset).map_err(unavailable)?;
            }
            Ok(tpl)
        })
        .await
        .map_err(unavailable)?
    }

    /// A consumer group member. With `acknowledged`, offsets are stored only as the
    /// subscriber acknowledges messages (each partition up to its oldest unacknowledged
    /// message) and committed from there; otherwise as messages are received.
    async fn group_subscription(
        &self,
        pattern: &str,
        group: &str,
        reset: &str,
        acknowledged: bool,
    ) -> Result<Subscription, BusError> {
        let topic_or_regex = if pattern.contains(['*', '>']) {
            pattern_regex(pattern)
        } else {
            self.ensure_topic(pattern).await?;
            pattern.to_owned()
        };
        let consumer: StreamConsumer =
            consumer_base(&self.brokers, &format!("{}-{group}", self.prefix), &self.security)
                .set("group.id", format!("{}-{group}", self.prefix))
                // A group with no committed offset starts at the beginning: a partition that
                // moves to a member during a rebalance, before anything was committed, loses
                // nothing (at the cost of reading history once, on a group's very first start).
                .set("auto.offset.reset", reset)
                .set("enable.auto.commit", "true")
                .set("enable.auto.offset.store", if acknowledged { "false" } else { "true" })
                .set("auto.commit.interval.ms", "1000")
                .set("enable.partition.eof", "false")
                // A member that dies (SIGKILL) holds its partitions until its session times
                // out: 10 s, not librdkafka's 45 s (measured: a router killed mid-stream left
                // its sessions' replies waiting longer than clients do).
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "3000")
                .set("topic.metadata.refresh.interval.ms", "2000")
                .create()
                .map_err(unavailable)?;
        consumer.subscribe(&[&topic_or_regex]).map_err(unavailable)?;
        let consumer = Arc::new(consumer);
        let (tx, rx) = mpsc::channel(self.buffer);
        let c = consumer.clone();
        let progress: Progresses = Arc::default();
        let task = tokio::spawn(async move {
            let mut stream = c.stream();
            while let Some(m) = stream.next().await {
                match m {
                    Ok(m) => {
                        let mut msg = to_record(&m);
                        if acknowledged {
                            use rdkafka::Message as _;
                            let (topic, partition, offset) = (msg.topic.clone(), m.partition(), m.offset());
                            progress
                                .lock()
                                .entry((topic.clone(), partition))
                                .or_default()
                                .delivered(offset);
                            let (progress, consumer) = (progress.clone(), c.clone());
                            msg.ack = Some(Ack::new(move || {
                                let handled = progress
                                    .lock()
                                    .get_mut(&(topic.clone(), partition))
                                    .and_then(|p| p.handled(offset));
                                if let Some(upto) = handled {
                                    // Fails for a partition this member no longer owns: its new
                                    // owner reads from the last commit (at least once).
                                    let _ = consumer.store_offset(&topic, partition, upto);
                                }
                            }));
                        }
                        if tx.send(msg).await.is_err() {
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

async fn pump_fanout(consumer: Arc<StreamConsumer>, senders: Senders, naming: Naming) {
    let mut stream = consumer.stream();
    while let Some(m) = stream.next().await {
        let m = match m {
            Ok(m) => {
                let mut m = to_record(&m);
                if naming.classify(&m.topic) == TopicClass::Channel {
                    m.offset = m.offset.map(|o| o + 1);
                }
                m
            }
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
        let channel = self.naming.classify(topic) == TopicClass::Channel;
        if channel {
            self.ensure_channel(topic).await?;
        } else {
            self.ensure_topic(topic).await?;
        }
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
            Ok(delivery) => Ok(u64::try_from(delivery.offset).ok().map(|o| o + u64::from(channel))),
            Err((e, _)) => Err(match map_err(e) {
                BusError::Overflow { .. } => BusError::Overflow {
                    topic: topic.to_owned(),
                },
                other => other,
            }),
        }
    }

    async fn tombstone(&self, topic: &str, key: Bytes) -> Result<(), BusError> {
        check_name(topic, false)?;
        self.ensure_topic(topic).await?;
        let fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(&key[..]);
        match self.producer.send(fr, self.ack_timeout).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(map_err(e)),
        }
    }

    async fn subscribe(&self, pattern: &str, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        check_name(pattern, true)?;
        if let Some(g) = &opts.group {
            return self.group_subscription(pattern, g, "earliest", opts.acknowledged).await;
        }
        if pattern.contains(['*', '>']) {
            // Plain wildcard subscriptions get a private group, starting at the end.
            let g = format!("p-{}", process_unique(self.next_id.fetch_add(1, Ordering::Relaxed)));
            return self.group_subscription(pattern, &g, "latest", false).await;
        }
        if self.naming.classify(pattern) == TopicClass::Channel {
            self.ensure_channel(pattern).await?;
        } else {
            self.ensure_topic(pattern).await?;
        }
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

    async fn keep_history(&self, pattern: &str, limits: HistoryLimits) -> Result<(), BusError> {
        check_name(pattern, true)?;
        if self.naming.classify(pattern) != TopicClass::Channel {
            return Err(BusError::InvalidTopic(pattern.chars().take(80).collect()));
        }
        if !self.histories.add(pattern, limits) {
            return Ok(());
        }
        // The first pattern: follow `<prefix>.epochs` from its beginning.
        let epochs = self.naming.epochs();
        self.ensure_topic(&epochs).await?;
        let mut sub = self
            .subscribe(
                &epochs,
                SubscribeOptions {
                    start: StartFrom::Earliest,
                    ..SubscribeOptions::default()
                },
            )
            .await?;
        let h = self.histories.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.recv().await {
                h.apply(&m);
            }
        });
        *self.epochs_follower.lock() = Some(AbortOnDrop(task));
        self.epochs_caught_up().await
    }

    async fn history(&self, topic: &str, query: HistoryQuery, limit: usize) -> Result<Option<HistoryRead>, BusError> {
        check_name(topic, false)?;
        let Some(limits) = self.histories.limits_of(topic) else {
            return Ok(None);
        };
        self.ensure_channel(topic).await?;
        let epoch = self.epoch_of(topic).await?;
        let mut reader = self.histories.reader.lock().await;
        let consumer = match &*reader {
            Some(c) => c.clone(),
            None => {
                let c: rdkafka::consumer::BaseConsumer =
                    consumer_base(&self.brokers, "switchyard-history", &self.security)
                        .set("group.id", format!("{}-history-{}", self.prefix, std::process::id()))
                        .set("enable.auto.commit", "false")
                        .set("enable.partition.eof", "false")
                        // Its fetch at the end of the log, still held when a read has
                        // unassigned, comes back within 10 ms, not 500: the broker answers a
                        // connection in order, so the next read's watermarks and fetch wait
                        // behind it (measured: 1,000 messages in 5 ms, then 500 ms from the
                        // second read on). It fetches only while a read has it assigned.
                        .set("fetch.wait.max.ms", "10")
                        .create()
                        .map_err(unavailable)?;
                let c = Arc::new(c);
                *reader = Some(c.clone());
                c
            }
        };
        let t = topic.to_owned();
        let read = tokio::task::spawn_blocking(move || history::read(&consumer, &t, limits, epoch, query, limit))
            .await
            .map_err(unavailable)??;
        drop(reader);
        Ok(Some(read))
    }

    fn keeps_log(&self) -> bool {
        true
    }

    async fn scan(&self, query: ScanQuery) -> Result<Option<ScanRead>, BusError> {
        check_name(&query.topic, false)?;
        let read = self
            .scanners
            .scan(&self.brokers, &self.prefix, &self.security, query)
            .await?;
        Ok(Some(read))
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
