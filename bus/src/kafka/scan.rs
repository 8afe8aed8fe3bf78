//! Reading one session's records back from a topic's log ([`crate::Bus::scan`]): a resume
//! whose edge died reads that edge's delivery topic (what the routers sent it for the
//! session) and the session's inbound partition (where its seq stopped).
//!
//! Each scan holds one assign-based consumer from a small pool for its whole read, so a wait
//! for a record that is still to come does not hold up the others; at most [`READERS`]
//! scans run at once per process (the rest wait for a reader).

use super::client::{consumer_base, to_record, Security};
use super::unavailable;
use crate::{BusError, ScanFrom, ScanQuery, ScanRead};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Scans at once per process.
pub(super) const READERS: usize = 4;
/// The longest a scan reads what the log already holds (past it, the scan fails).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The scan consumers of one process.
pub(super) struct Scanners {
    idle: Mutex<Vec<Arc<BaseConsumer>>>,
    slots: tokio::sync::Semaphore,
}

impl Default for Scanners {
    fn default() -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(READERS),
        }
    }
}

impl Scanners {
    /// Runs `query` on a pooled consumer (made on first use).
    pub(super) async fn scan(
        &self,
        brokers: &str,
        prefix: &str,
        security: &Security,
        query: ScanQuery,
    ) -> Result<ScanRead, BusError> {
        let _slot = self.slots.acquire().await.map_err(unavailable)?;
        let pooled = self.idle.lock().pop();
        let consumer = match pooled {
            Some(c) => c,
            None => {
                let c: BaseConsumer = consumer_base(brokers, "switchyard-scan", security)
                    .set("group.id", format!("{prefix}-scan-{}", std::process::id()))
                    .set("enable.auto.commit", "false")
                    .set("enable.partition.eof", "false")
                    // A scan that waits for a record still to come is woken by its arrival;
                    // this bounds the wait of a fetch at the log's end (see history reads).
                    .set("fetch.wait.max.ms", "10")
                    .create()
                    .map_err(unavailable)?;
                Arc::new(c)
            }
        };
        let c = consumer.clone();
        let res = tokio::task::spawn_blocking(move || read(&c, &query))
            .await
            .map_err(unavailable)?;
        let _ = consumer.unassign();
        self.idle.lock().push(consumer);
        res
    }
}

/// One scan (blocking). Positions in and out are Kafka offsets, as [`crate::Message::offset`]
/// gives them on Kafka.
fn read(consumer: &BaseConsumer, q: &ScanQuery) -> Result<ScanRead, BusError> {
    use rdkafka::Message as _;
    let topic = q.topic.as_str();
    let md = consumer
        .fetch_metadata(Some(topic), READ_TIMEOUT)
        .map_err(|e| unavailable(format!("scan of {topic}: {e}")))?;
    let partitions = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    if partitions == 0 {
        // No such topic (nothing was ever published there): nothing to read.
        return Ok(ScanRead {
            complete: matches!(q.from, ScanFrom::Since(_)),
            ..ScanRead::default()
        });
    }
    let partition = switchyard_protocol::naming::partition_for(q.key.as_bytes(), partitions as u32) as i32;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, READ_TIMEOUT)
        .map_err(|e| unavailable(format!("scan of {topic}: {e}")))?;
    let (start, complete) = match q.from {
        ScanFrom::After(o) => {
            let start = i64::try_from(o).unwrap_or(i64::MAX - 1) + 1;
            (start.max(low), start >= low)
        }
        ScanFrom::Since(ms) => {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition, Offset::Offset(ms))
                .map_err(unavailable)?;
            let r = consumer
                .offsets_for_times(tpl, READ_TIMEOUT)
                .map_err(|e| unavailable(format!("scan of {topic}: {e}")))?;
            match r.find_partition(topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => (o.max(low), true),
                // Nothing stamped at or after `ms`.
                _ => (high, true),
            }
        }
    };
    let mut out = ScanRead {
        complete,
        last: u64::try_from(start - 1).ok(),
        ..ScanRead::default()
    };
    if start >= high && q.until.is_none() {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(unavailable)?;
    consumer.assign(&tpl).map_err(unavailable)?;
    let began = Instant::now();
    let mut next = start;
    loop {
        if q.until.is_none() && next >= high {
            break;
        }
        let waited = began.elapsed();
        if next < high && waited > READ_TIMEOUT {
            return Err(unavailable(format!(
                "scan of {topic}/{partition}: read {} of {} records in {} s",
                next - start,
                high - start,
                READ_TIMEOUT.as_secs()
            )));
        }
        if next >= high && waited > q.wait {
            // Waited for the `until` record long enough.
            break;
        }
        let Some(m) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let m = m.map_err(|e| unavailable(format!("scan of {topic}: {e}")))?;
        next = m.offset() + 1;
        out.last = u64::try_from(m.offset()).ok();
        if m.key() != Some(q.key.as_bytes()) {
            continue;
        }
        let msg = to_record(&m);
        let stop = q.stops_at(&msg.record);
        out.records.push(msg);
        if stop {
            out.reached = true;
            break;
        }
    }
    Ok(out)
}
