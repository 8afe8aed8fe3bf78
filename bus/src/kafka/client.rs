//! librdkafka client configuration shared by the bus and the log reader, and the conversions
//! between Kafka messages and bus records.

use crate::{BusAuth, BusError, Message, Record};
use bytes::Bytes;
use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers as _;
use rdkafka::producer::{BaseProducer, Producer as _};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_protocol::Headers;

/// How a client reaches the brokers: TLS and SASL credentials. Every client of a process
/// shares one.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub tls: Option<crate::BusTls>,
    pub auth: Option<BusAuth>,
}

/// The base config every client shares.
pub(super) fn base(brokers: &str, name: &str, sec: &Security) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", name)
        .set("log_level", "3");
    let sasl = match &sec.auth {
        Some(BusAuth::Sasl {
            mechanism,
            user,
            password,
        }) => Some((mechanism.name(), user, password)),
        _ => None,
    };
    if let Some((mechanism, user, password)) = sasl {
        // SASL only over TLS: with no --bus-tls-ca, librdkafka trusts the system's CAs.
        c.set("security.protocol", "sasl_ssl")
            .set("sasl.mechanisms", mechanism)
            .set("sasl.username", user.as_str())
            .set("sasl.password", password.expose());
    } else if sec.tls.is_some() {
        c.set("security.protocol", "ssl");
    }
    if let Some(t) = &sec.tls {
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

/// A consumer config: the broker answers a fetch as soon as one byte is there
/// (`fetch.min.bytes=1`), so librdkafka's default fetch wait (500 ms) is only how long an idle
/// fetch is held, not a latency. (A 20 ms wait, needed for tansu, which answers only when the
/// wait expires, measured on Apache Kafka 4.3.1: echo round trip p50 6.9 ms against 4.7 ms
/// with the default, and 2.8x the broker's idle CPU.)
pub(super) fn consumer_base(brokers: &str, name: &str, sec: &Security) -> ClientConfig {
    let mut c = base(brokers, name, sec);
    c.set("fetch.min.bytes", "1");
    c
}

/// How long [`probe`] waits for the brokers' first metadata answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// One metadata request of the probe; between two, the client's error events are read.
const PROBE_REQUEST: Duration = Duration::from_millis(500);
/// How long the probe reads error events after each request.
const PROBE_EVENTS: Duration = Duration::from_millis(20);

/// What a probe client heard from librdkafka: whether the brokers refused our credentials,
/// and the last error it reported (for the message when they never answer).
#[derive(Default)]
struct ProbeContext {
    auth_failed: std::sync::atomic::AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for ProbeContext {
    // The probe's outcome is its result: its retries are not logged.
    fn log(&self, _level: RDKafkaLogLevel, _fac: &str, _message: &str) {}

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
            self.auth_failed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // "1/1 brokers are down" follows each broker's own error, which says more.
        let mut last = self.last_error.lock();
        if last.is_none() || error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *last = Some(reason.to_owned());
        }
    }
}

impl rdkafka::producer::ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Blocks until the brokers answer a metadata request on a throwaway client with `config`,
/// before any long-lived client exists. librdkafka does not give up on refused credentials:
/// it reports `ERR__AUTHENTICATION` as an error event, logs a line per attempt and reconnects
/// for ever, and a request only times out. The probe reads those events between short
/// requests and fails at once with [`BusError::Auth`]; an unreachable broker fails after
/// [`PROBE_TIMEOUT`] with librdkafka's last error.
pub(super) fn probe(config: &ClientConfig, brokers: &str, auth: Option<&BusAuth>) -> Result<(), BusError> {
    let client: BaseProducer<ProbeContext> = config
        .create_with_context(ProbeContext::default())
        .map_err(|e| BusError::Unavailable(format!("cannot create a Kafka client: {e}")))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        let res = client.client().fetch_metadata(None, PROBE_REQUEST);
        client.poll(PROBE_EVENTS); // serves the error events into ProbeContext
        let ctx = client.context();
        if ctx.auth_failed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(BusError::Auth {
                bus: "kafka",
                mechanism: auth.map_or("no credentials given", BusAuth::mechanism),
            });
        }
        match res {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                let why = ctx.last_error.lock().clone().unwrap_or_else(|| e.to_string());
                return Err(BusError::Unavailable(format!("cannot reach Kafka at {brokers}: {why}")));
            }
            Err(_) => {}
        }
    }
}

pub(super) fn to_record(m: &rdkafka::message::BorrowedMessage<'_>) -> Message {
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
        ack: None,
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
pub(super) fn pattern_regex(pattern: &str) -> String {
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
