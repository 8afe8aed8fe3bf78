//! `memory://`: an in-process bus. Single process, no persistence, no broker.
//!
//! Every subscription owns a bounded channel. A publish delivers to every matching plain
//! subscription and to one member of each matching group (chosen by the record key's hash, so a
//! key sticks to one member). A full buffer makes the publisher wait up to `publish_timeout`
//! (backpressure); if it is still full, publish returns [`BusError::Overflow`]: the record
//! reached the other subscribers, and the caller is told.

use crate::{check_name, Bus, BusError, Message, Record, SubscribeOptions, Subscription};
use async_trait::async_trait;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
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

/// The embedded bus.
pub struct MemoryBus {
    inner: Arc<RwLock<Inner>>,
    next_id: AtomicU64,
    buffer: usize,
    publish_timeout: Duration,
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
        let known = self.inner.read().offsets.get(topic).cloned();
        let counter = match known {
            Some(c) => c,
            None => self.inner.write().offsets.entry(topic.to_owned()).or_default().clone(),
        };
        let offset = counter.fetch_add(1, Ordering::Relaxed);
        let (msg, full) = self.deliver(topic, record, offset);
        // Buffers that were full: wait for room, up to the deadline, without holding the lock.
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
            Ok(Some(offset))
        }
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
