//! Reading one session's records back from the log (`switchyard replay`): the session's
//! partition of every inbound topic, then its node's delivery topic.

use super::client::{base, probe, Security};
use super::unavailable;
use crate::BusError;
use bytes::Bytes;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Headers as _;
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;
use switchyard_protocol::{Headers, Naming, TopicClass};

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
    security: Security,
}

/// Progress of a scan: (records scanned so far, records to scan in all).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

impl SessionLog {
    pub fn new(url: &str, naming: Naming, security: Security) -> Self {
        Self {
            brokers: url.trim_start_matches("kafka://").trim_end_matches('/').to_owned(),
            naming,
            security,
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
        probe(
            &base(&self.brokers, "switchyard-replay", &self.security),
            &self.brokers,
            self.security.auth.as_ref(),
        )?;
        let consumer: BaseConsumer = base(&self.brokers, "switchyard-replay", &self.security)
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
