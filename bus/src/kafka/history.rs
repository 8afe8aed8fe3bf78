//! Channel history on Kafka: a channel topic (one partition) is its own log. Offsets are the
//! Kafka offsets plus one (so 0 is "before the first" on every bus). What is retained is what
//! the broker still holds, cut to the pattern's `history_size` newest records and to those
//! younger than its `history_ttl` (the topic is created with `retention.ms` = the TTL, so the
//! broker drops them too, later).
//!
//! Epochs: librdkafka knows each topic's id but rust-rdkafka does not expose it (only
//! through unsafe FFI, which this project forbids). So each channel topic's epoch is a record
//! on the compacted topic `<prefix>.epochs` (key = the channel topic, value = the epoch),
//! written with a fresh random epoch whenever a Switchyard process creates the topic or finds
//! none. Every process reads that topic from the beginning and follows it, so all agree. A
//! topic deleted and recreated by another tool keeps its old epoch: delete its epoch record
//! too (a tombstone on `<prefix>.epochs`), or recreate it through Switchyard.

use super::client::to_record;
use crate::{BusError, HistoryLimits, HistoryQuery, HistoryRead, Message};
use parking_lot::{Mutex, RwLock};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// What a Kafka bus knows about channel history.
#[derive(Default)]
pub(super) struct Histories {
    patterns: RwLock<Vec<(String, HistoryLimits)>>,
    /// Channel topic → epoch, as read from `<prefix>.epochs`.
    pub(super) epochs: Mutex<HashMap<String, String>>,
    /// The next `<prefix>.epochs` offset the follower has not applied yet.
    pub(super) applied: AtomicI64,
    pub(super) changed: tokio::sync::Notify,
    /// One history read at a time per process, on one assign-based consumer.
    pub(super) reader: tokio::sync::Mutex<Option<Arc<BaseConsumer>>>,
}

impl Histories {
    pub(super) fn add(&self, pattern: &str, limits: HistoryLimits) -> bool {
        let mut p = self.patterns.write();
        let first = p.is_empty();
        p.push((pattern.to_owned(), limits));
        first
    }

    pub(super) fn limits_of(&self, topic: &str) -> Option<HistoryLimits> {
        if topic.contains(['*', '>']) {
            return None;
        }
        self.patterns
            .read()
            .iter()
            .find(|(p, _)| switchyard_protocol::pattern_matches(p, topic))
            .map(|(_, l)| *l)
    }

    /// Applies one record of `<prefix>.epochs` (a tombstone forgets the topic's epoch).
    pub(super) fn apply(&self, m: &Message) {
        if let Some(key) = &m.record.key {
            let topic = String::from_utf8_lossy(key).into_owned();
            let mut e = self.epochs.lock();
            if m.record.payload.is_empty() {
                e.remove(&topic);
            } else {
                e.insert(topic, String::from_utf8_lossy(&m.record.payload).into_owned());
            }
        }
        if let Some(o) = m.offset {
            self.applied.fetch_max(o as i64 + 1, Ordering::AcqRel);
        }
        self.changed.notify_waiters();
    }
}

/// A fresh epoch: `k` and 16 random hex digits.
pub(super) fn new_epoch() -> String {
    let r = std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
    format!("k{r:016x}")
}

/// How long a history read may take in all.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `topic`'s history (blocking: run it on a blocking thread). Offsets in and out are
/// one more than Kafka's.
pub(super) fn read(
    consumer: &BaseConsumer,
    topic: &str,
    limits: HistoryLimits,
    epoch: String,
    query: HistoryQuery,
    limit: usize,
) -> Result<HistoryRead, BusError> {
    use rdkafka::Message as _;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, READ_TIMEOUT)
        .map_err(|e| unavailable(format!("history of {topic}: {e}")))?;
    // Kafka offsets: the retained window is [first, high), cut to the newest `size`.
    let first = low.max(high - limits.size as i64);
    let oldest_ms = now_ms() - limits.ttl.as_millis() as i64;
    let last = u64::try_from(high).unwrap_or(0);
    let (start, want_all_from_start) = match query {
        // The client has everything up to Kafka offset n - 1: what it misses starts at n.
        HistoryQuery::After(n) => (i64::try_from(n).unwrap_or(i64::MAX), true),
        HistoryQuery::Last(k) => (high - k as i64, false),
    };
    let from = start.max(first);
    let end = high.min(from.saturating_add(limit as i64));
    let mut messages = Vec::new();
    // `After(n)` is complete when the record at n (if any) is still in the window.
    let mut complete = match query {
        HistoryQuery::After(n) => n <= last && start >= first,
        HistoryQuery::Last(_) => true,
    };
    if from < end {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(from))
            .map_err(unavailable)?;
        consumer.assign(&tpl).map_err(unavailable)?;
        let deadline = std::time::Instant::now() + READ_TIMEOUT;
        let mut next = from;
        while next < end {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(unavailable(format!(
                    "history of {topic}: read {} of {} records in 10 s",
                    next - from,
                    end - from
                )));
            }
            let Some(m) = consumer.poll(left.min(Duration::from_millis(200))) else {
                continue;
            };
            let m = m.map_err(|e| unavailable(format!("history of {topic}: {e}")))?;
            next = m.offset() + 1;
            if m.timestamp().to_millis().is_some_and(|ts| ts < oldest_ms) {
                // Older than the TTL: as good as dropped. Missing the first one asked for
                // means the recovery is not complete.
                if want_all_from_start && m.offset() == start {
                    complete = false;
                }
                continue;
            }
            let mut msg = to_record(&m);
            msg.offset = Some(m.offset() as u64 + 1);
            messages.push(msg);
        }
        let _ = consumer.unassign();
    }
    Ok(HistoryRead {
        epoch,
        last,
        complete,
        messages,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
