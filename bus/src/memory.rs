//! `memory://`: an in-process bus. Single process, no persistence, no broker.
//!
//! Every subscription owns a bounded channel. A publish delivers to every matching plain
//! subscription and to one member of each matching group (chosen by the record key's hash, so a
//! key sticks to one member). A full buffer makes the publisher wait up to `publish_timeout`
//! (backpressure); if it is still full, publish returns [`BusError::Overflow`]: the record
//! reached the other subscribers, and the caller is told.
//!
//! Offsets count from 1 per topic. Topics under a [`Bus::keep_history`] pattern keep a ring of
//! their newest messages (bounded by count and age); their publishes are taken one at a time,
//! so offsets reach every subscriber in order. The epoch is drawn at random when the bus is
//! made: a restarted process has a new one, and its history starts empty.

use crate::{
    check_name, Bus, BusError, HistoryLimits, HistoryQuery, HistoryRead, Message, Record, SubscribeOptions,
    Subscription,
};
use async_trait::async_trait;
use parking_lot::RwLock;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

struct Sub {
    id: u64,
    pattern: String,
    group: Option<String>,
    tx: mpsc::Sender<Message>,
}

#[derive(Default)]
struct Inner {
    /// Subscriptions without wildcards, by topic.
    exact: HashMap<String, Vec<Sub>>,
    /// Subscriptions with `*` or `>`.
    wild: Vec<Sub>,
    /// Next offset per topic.
    offsets: HashMap<String, Arc<AtomicU64>>,
}

/// One topic's history: its next offset and its newest messages.
struct Log {
    next: u64,
    limits: HistoryLimits,
    ring: VecDeque<(Message, Instant)>,
}

impl Log {
    fn prune(&mut self, now: Instant) {
        while self.ring.len() > self.limits.size {
            self.ring.pop_front();
        }
        while self
            .ring
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > self.limits.ttl)
        {
            self.ring.pop_front();
        }
    }

    /// The oldest retained offset (the next one when nothing is retained).
    fn first(&self) -> u64 {
        self.ring.front().and_then(|(m, _)| m.offset).unwrap_or(self.next)
    }
}

/// The embedded bus.
pub struct MemoryBus {
    inner: Arc<RwLock<Inner>>,
    next_id: AtomicU64,
    buffer: usize,
    publish_timeout: Duration,
    epoch: String,
    /// `keep_history` patterns.
    histories: RwLock<Vec<(String, HistoryLimits)>>,
    /// Logs of the topics under those patterns, made on first use.
    logs: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Log>>>>,
}

impl MemoryBus {
    /// `buffer`: capacity of each subscription's channel; `publish_timeout`: how long a
    /// publisher waits for room in a full buffer before it gets [`BusError::Overflow`].
    pub fn new(buffer: usize, publish_timeout: Duration) -> Self {
        Self {
            inner: Arc::default(),
            next_id: AtomicU64::new(1),
            buffer: buffer.max(1),
            publish_timeout,
            epoch: format!(
                "m{:016x}",
                std::collections::hash_map::RandomState::new().hash_one(Instant::now())
            ),
            histories: RwLock::default(),
            logs: parking_lot::Mutex::default(),
        }
    }

    /// The log of `topic` when it is under a history pattern (made on first use).
    fn log(&self, topic: &str) -> Option<Arc<tokio::sync::Mutex<Log>>> {
        let histories = self.histories.read();
        if histories.is_empty() {
            return None;
        }
        let limits = histories
            .iter()
            .find(|(p, _)| switchyard_protocol::pattern_matches(p, topic))?
            .1;
        let mut logs = self.logs.lock();
        Some(
            logs.entry(topic.to_owned())
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Mutex::new(Log {
                        next: 1,
                        limits,
                        ring: VecDeque::new(),
                    }))
                })
                .clone(),
        )
    }

    /// Waits, up to the deadline and without holding the bus's lock, for room in the buffers
    /// that were full. Overflow when one stayed full.
    async fn wait_for_room(
        &self,
        topic: &str,
        msg: &Message,
        full: Vec<mpsc::Sender<Message>>,
    ) -> Result<(), BusError> {
        let mut overflow = false;
        for tx in full {
            if tx.send_timeout(msg.clone(), self.publish_timeout).await.is_err() && !tx.is_closed() {
                overflow = true;
            }
        }
        if overflow {
            Err(BusError::Overflow {
                topic: topic.to_owned(),
            })
        } else {
            Ok(())
        }
    }
}

struct Unsubscribe {
    inner: Weak<RwLock<Inner>>,
    id: u64,
    pattern: String,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut g = inner.write();
        if let Some(list) = g.exact.get_mut(&self.pattern) {
            list.retain(|s| s.id != self.id);
            if list.is_empty() {
                g.exact.remove(&self.pattern);
            }
        }
        g.wild.retain(|s| s.id != self.id);
    }
}

fn key_hash(record: &Record) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    record.key.as_deref().unwrap_or(&[]).hash(&mut h);
    h.finish()
}

#[async_trait]
impl Bus for MemoryBus {
    fn scheme(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, topic: &str, record: Record) -> Result<Option<u64>, BusError> {
        check_name(topic, false)?;
        if let Some(log) = self.log(topic) {
            // One publish at a time per history topic, waits included, so that offsets reach
            // every subscriber in order and the ring holds them in order.
            let mut log = log.lock().await;
            let offset = log.next;
            log.next += 1;
            let (msg, full) = self.deliver(topic, record, offset);
            let now = Instant::now();
            log.ring.push_back((msg.clone(), now));
            log.prune(now);
            return self.wait_for_room(topic, &msg, full).await.map(|()| Some(offset));
        }
        let known = self.inner.read().offsets.get(topic).cloned();
        let counter = match known {
            Some(c) => c,
            None => self.inner.write().offsets.entry(topic.to_owned()).or_default().clone(),
        };
        let offset = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let (msg, full) = self.deliver(topic, record, offset);
        self.wait_for_room(topic, &msg, full).await.map(|()| Some(offset))
    }

    async fn subscribe(&self, pattern: &str, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        check_name(pattern, true)?;
        let (tx, rx) = mpsc::channel(self.buffer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sub = Sub {
            id,
            pattern: pattern.to_owned(),
            group: opts.group,
            tx,
        };
        let mut g = self.inner.write();
        if pattern.split('.').any(|t| t == "*" || t == ">") {
            g.wild.push(sub);
        } else {
            g.exact.entry(pattern.to_owned()).or_default().push(sub);
        }
        drop(g);
        Ok(Subscription::new(
            rx,
            Unsubscribe {
                inner: Arc::downgrade(&self.inner),
                id,
                pattern: pattern.to_owned(),
            },
        ))
    }

    fn is_ready(&self) -> bool {
        true
    }

    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn keep_history(&self, pattern: &str, limits: HistoryLimits) -> Result<(), BusError> {
        check_name(pattern, true)?;
        self.histories.write().push((pattern.to_owned(), limits));
        Ok(())
    }

    async fn history(&self, topic: &str, query: HistoryQuery, limit: usize) -> Result<Option<HistoryRead>, BusError> {
        check_name(topic, false)?;
        let Some(log) = self.log(topic) else {
            return Ok(None);
        };
        let mut log = log.lock().await;
        log.prune(Instant::now());
        let last = log.next - 1;
        let (from, complete) = match query {
            // Nothing after `n` was dropped when the oldest retained message follows it, and
            // `n` is an offset this log has given.
            HistoryQuery::After(n) => (n.saturating_add(1), n <= last && n.saturating_add(1) >= log.first()),
            HistoryQuery::Last(k) => (log.next.saturating_sub(k as u64).max(log.first()), true),
        };
        let messages = log
            .ring
            .iter()
            .filter(|(m, _)| m.offset.is_some_and(|o| o >= from))
            .take(limit)
            .map(|(m, _)| m.clone())
            .collect();
        Ok(Some(HistoryRead {
            epoch: self.epoch.clone(),
            last,
            complete,
            messages,
        }))
    }
}

impl MemoryBus {
    /// Hands `record` to every ready receiver; returns the senders whose buffers were full.
    fn deliver(&self, topic: &str, record: Record, offset: u64) -> (Message, Vec<mpsc::Sender<Message>>) {
        let g = self.inner.read();
        let msg = Message {
            ack: None,
            topic: Arc::from(topic),
            offset: Some(offset),
            record: Arc::new(record),
        };
        let mut full = Vec::new();
        // Groups seen on this publish: group name → candidate members.
        let mut groups: Vec<(&str, Vec<&Sub>)> = Vec::new();
        let candidates = g.exact.get(topic).into_iter().flatten().chain(
            g.wild
                .iter()
                .filter(|s| switchyard_protocol::pattern_matches(&s.pattern, topic)),
        );
        for s in candidates {
            match &s.group {
                None => try_send(&s.tx, &msg, &mut full),
                Some(name) => match groups.iter_mut().find(|(n, _)| *n == name.as_str()) {
                    Some((_, members)) => members.push(s),
                    None => groups.push((name.as_str(), vec![s])),
                },
            }
        }
        if !groups.is_empty() {
            let h = key_hash(&msg.record);
            for (_, members) in groups {
                let m = members[(h % members.len() as u64) as usize];
                try_send(&m.tx, &msg, &mut full);
            }
        }
        drop(g);
        (msg, full)
    }
}

/// A closed receiver is a subscription being dropped: not an error. A full one is remembered.
fn try_send(tx: &mpsc::Sender<Message>, msg: &Message, full: &mut Vec<mpsc::Sender<Message>>) {
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(msg.clone()) {
        full.push(tx.clone());
    }
}
