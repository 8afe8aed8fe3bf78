//! `kafka-baseline`: the baseline of the Kafka path in BENCHMARKS.md. Bare rdkafka clients play
//! both sides of the gateway's per-session request/reply on one broker, with nothing of
//! Switchyard in between:
//!
//! - a "client" producer sends each session's requests, keyed by session, to an inbound topic
//!   (idempotent, `acks=all`, `murmur2_random`, `linger.ms=1`: the edge's producer settings);
//! - a "backend" consumer group reads them and answers each, keyed by session, to a reply topic
//!   (`{"echo":<request>}`, as the demo `app` backend does);
//! - a "client" consumer reads the replies and measures latency from each request's *scheduled*
//!   send time (open loop, as the load generator does), loss and duplicates per session.
//!
//! Session `i` sends request `k` at `start + i/N × interval + k × interval` (the load
//! generator's unicast schedule), released by a pacing loop that sleeps with
//! `std::thread::sleep`. One JSON line out, with the load generator's field names.
//!
//! Run with:
//! `target/release/kafka-baseline --brokers 127.0.0.1:9092 --sessions 1000 --per-session-rate 2 --duration 20`

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bare rdkafka request/reply, the baseline of the gateway's Kafka path.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Kafka bootstrap servers (loopback only).
    #[arg(long)]
    brokers: String,
    /// Sessions (distinct keys), each with its own request schedule.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Requests per second per session.
    #[arg(long, default_value_t = 1.0)]
    per_session_rate: f64,
    /// Measured duration (s).
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Request payload size (bytes), the load generator's benchmark payload.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Partitions of the two topics (the gateway's `--partitions` default).
    #[arg(long, default_value_t = 16)]
    partitions: i32,
    /// Topic names: `<prefix>.in` and `<prefix>.out` (default: `kb<pid>`), created fresh.
    #[arg(long)]
    topic_prefix: Option<String>,
    /// After the last request, wait at most this long (s) for replies.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Give up on the warm-up (every session's probe answered) after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    warmup_timeout: f64,
    /// Free-form tag copied into the result.
    #[arg(long, default_value = "")]
    tag: String,
}

/// Sleep at least this long when the next request is due later, then release all that are due.
const PACE_QUANTUM: Duration = Duration::from_micros(200);
/// Time between two rounds of warm-up probes.
const WARM_UP_ROUND: Duration = Duration::from_millis(500);
/// How long a consumer poll blocks before the stop flag is checked again.
const POLL: Duration = Duration::from_millis(100);
/// Highest latency recorded (µs) and the histogram's significant digits, as the load generator.
const HIST_MAX_US: u64 = 3_600_000_000;
const HIST_SIGFIGS: u8 = 3;

/// Counts delivery reports.
#[derive(Default)]
struct Counted {
    acked: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Counted {}

impl ProducerContext for Counted {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(_) => self.acked.fetch_add(1, Relaxed),
            Err(_) => self.failed.fetch_add(1, Relaxed),
        };
    }
}

fn base(brokers: &str, name: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", name)
        .set("log_level", "3");
    c
}

/// The edge's producer settings (bus/src/kafka/mod.rs).
fn producer(brokers: &str, name: &str) -> Result<ThreadedProducer<Counted>> {
    Ok(base(brokers, name)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "10000")
        .create_with_context(Counted::default())?)
}

/// The gateway's consumer settings (bus/src/kafka/{client,mod}.rs): `fetch.min.bytes=1`,
/// librdkafka's default fetch wait, auto-commit every second.
fn consumer(brokers: &str, group: &str) -> Result<BaseConsumer> {
    Ok(base(brokers, group)
        .set("fetch.min.bytes", "1")
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "3000")
        .create()?)
}

fn session_key(i: usize) -> String {
    // 26 characters, like the gateway's ULID session ids.
    format!("BENCH{i:021}")
}

fn session_index(key: &[u8]) -> Option<usize> {
    std::str::from_utf8(key.get(5..)?).ok()?.parse().ok()
}

/// The load generator's benchmark payload: `{"s":SEQ,"t":SCHED_NS,"k":0,"p":"xx…"}`.
fn build(seq: u64, sched_ns: u64, size: usize) -> Vec<u8> {
    let head = format!("{{\"s\":{seq},\"t\":{sched_ns},\"k\":0,\"p\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut v = Vec::with_capacity(head.len() + pad + 2);
    v.extend_from_slice(head.as_bytes());
    v.resize(head.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    v
}

fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(hay, key)? + key.len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits]).ok()?.parse().ok()
}

/// Sends `rec` to `p`, waiting while the producer's queue is full.
fn send(p: &ThreadedProducer<Counted>, mut rec: BaseRecord<'_, str, [u8]>) -> Result<()> {
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("produce: {e}"),
        }
    }
}

/// The backend: a consumer group on the inbound topic answering every request to the reply
/// topic, keyed by session.
fn backend(brokers: String, inbound: String, out: String, stop: Arc<AtomicBool>) -> Result<JoinHandle<Result<u64>>> {
    let c = consumer(&brokers, &format!("{inbound}-backend"))?;
    c.subscribe(&[&inbound])?;
    let p = producer(&brokers, "kafka-baseline-backend")?;
    Ok(std::thread::Builder::new().name("backend".into()).spawn(move || {
        let mut answered = 0u64;
        let mut reply = Vec::new();
        while !stop.load(Relaxed) {
            let Some(m) = c.poll(POLL) else { continue };
            let m = m?;
            let (Some(key), Some(payload)) = (m.key(), m.payload()) else {
                continue;
            };
            let key = std::str::from_utf8(key)?;
            reply.clear();
            reply.extend_from_slice(b"{\"echo\":");
            reply.extend_from_slice(payload);
            reply.push(b'}');
            send(&p, BaseRecord::to(&out).key(key).payload(&reply[..]))?;
            answered += 1;
        }
        p.flush(Duration::from_secs(5))?;
        Ok(answered)
    })?)
}

/// What the client consumer saw.
struct Seen {
    /// Per session: a bit per request number (1-based; 0 is the warm-up probe).
    bits: Vec<Vec<u64>>,
    unique: u64,
    dup: u64,
    hist: Histogram<u64>,
}

/// The client's reply reader. `warm` counts sessions whose probe came back; `unique` counts
/// distinct replies to requests (the drain waits on it).
fn reader(
    brokers: &str,
    out: &str,
    n: usize,
    t0: Instant,
    warm: Arc<AtomicU64>,
    unique: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<Result<Seen>>> {
    let c = consumer(brokers, &format!("{out}-client"))?;
    c.subscribe(&[out])?;
    Ok(std::thread::Builder::new().name("reader".into()).spawn(move || {
        let mut seen = Seen {
            bits: vec![Vec::new(); n],
            unique: 0,
            dup: 0,
            hist: Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIGS)?,
        };
        let mut warmed = vec![false; n];
        while !stop.load(Relaxed) {
            let Some(m) = c.poll(POLL) else { continue };
            let m = m?;
            let now_ns = t0.elapsed().as_nanos() as u64;
            let (Some(i), Some(p)) = (m.key().and_then(session_index), m.payload()) else {
                continue;
            };
            let (Some(seq), Some(sched)) = (number_after(p, b"\"s\":"), number_after(p, b"\"t\":")) else {
                continue;
            };
            if i >= n {
                continue;
            }
            if seq == 0 {
                if !warmed[i] {
                    warmed[i] = true;
                    warm.fetch_add(1, Relaxed);
                }
                continue;
            }
            seen.hist
                .saturating_record((now_ns.saturating_sub(sched) / 1000).max(1));
            let (w, b) = ((seq / 64) as usize, seq % 64);
            let bits = &mut seen.bits[i];
            if w >= bits.len() {
                bits.resize(w + 1, 0);
            }
            if bits[w] & (1 << b) != 0 {
                seen.dup += 1;
            } else {
                bits[w] |= 1 << b;
                seen.unique += 1;
                unique.fetch_add(1, Relaxed);
            }
        }
        Ok(seen)
    })?)
}

fn create_topics(brokers: &str, names: &[&str], partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = base(brokers, "kafka-baseline-admin").create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in futures::executor::block_on(admin.create_topics(&topics, &opts))? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => bail!("cannot create topic {t}: {code}"),
        }
    }
    Ok(())
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn check_loopback(brokers: &str) -> Result<()> {
    for b in brokers.split(',') {
        let addr: std::net::SocketAddr = b.parse().with_context(|| format!("broker {b}: want IP:PORT"))?;
        if !addr.ip().is_loopback() {
            bail!("{b} is not a loopback address: refusing to send load there");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    check_loopback(&a.brokers)?;
    if a.sessions == 0 || a.per_session_rate <= 0.0 || a.duration <= 0.0 {
        bail!("--sessions, --per-session-rate and --duration must be above 0");
    }
    let n = a.sessions;
    let prefix = a
        .topic_prefix
        .clone()
        .unwrap_or_else(|| format!("kb{}", std::process::id()));
    let (inbound, out) = (format!("{prefix}.in"), format!("{prefix}.out"));
    create_topics(&a.brokers, &[&inbound, &out], a.partitions)?;

    let t0 = Instant::now();
    let ns = |at: Instant| at.duration_since(t0).as_nanos() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let (warm, unique) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let backend = backend(a.brokers.clone(), inbound.clone(), out.clone(), stop.clone())?;
    let reader = reader(&a.brokers, &out, n, t0, warm.clone(), unique.clone(), stop.clone())?;
    let client = producer(&a.brokers, "kafka-baseline-client")?;
    let keys: Vec<String> = (0..n).map(session_key).collect();

    // Warm-up: a probe per session, in rounds, until every session has had one answered (both
    // groups have their partitions and every partition has a leader), as the gateway's
    // processes are up and subscribed before the load generator starts.
    let wt = Instant::now();
    while (warm.load(Relaxed) as usize) < n {
        if wt.elapsed().as_secs_f64() > a.warmup_timeout {
            bail!(
                "warm-up: {} of {n} sessions answered in {} s",
                warm.load(Relaxed),
                a.warmup_timeout
            );
        }
        for k in &keys {
            send(
                &client,
                BaseRecord::to(&inbound)
                    .key(k.as_str())
                    .payload(&build(0, ns(Instant::now()), a.payload)[..]),
            )?;
        }
        std::thread::sleep(WARM_UP_ROUND);
    }
    let warm_up_s = wt.elapsed().as_secs_f64();
    let (acked0, failed0) = (
        client.context().acked.load(Relaxed),
        client.context().failed.load(Relaxed),
    );

    // The measured phase: session i's request k is due at start + i/n × gap + k × gap.
    let gap = Duration::from_secs_f64(1.0 / a.per_session_rate);
    let count = (a.duration * a.per_session_rate).floor().max(1.0) as u64;
    let start = Instant::now() + Duration::from_millis(50);
    let start_unix_ns = unix_ns() + 50_000_000;
    let due = |i: usize, k: u64| start + gap.mul_f64(i as f64 / n as f64) + gap.mul_f64(k as f64);
    for k in 0..count {
        for (i, key) in keys.iter().enumerate() {
            let at = due(i, k);
            let now = Instant::now();
            if at > now {
                std::thread::sleep((at - now).max(PACE_QUANTUM));
            }
            let p = build(k + 1, ns(at), a.payload);
            send(&client, BaseRecord::to(&inbound).key(key.as_str()).payload(&p[..]))?;
        }
    }
    let end = due(0, count);
    let expected = count * n as u64;
    // Acknowledged within the schedule, and all of them after the drain.
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let acked_in_time = client.context().acked.load(Relaxed) - acked0;
    let dt = Instant::now();
    while unique.load(Relaxed) < expected && dt.elapsed().as_secs_f64() < a.drain {
        std::thread::sleep(Duration::from_millis(10));
    }
    let end_unix_ns = unix_ns();
    client.flush(Duration::from_secs(5))?;
    stop.store(true, Relaxed);
    let answered = backend
        .join()
        .map_err(|_| anyhow::anyhow!("backend thread panicked"))??;
    let seen = reader.join().map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    let acked = client.context().acked.load(Relaxed) - acked0;
    let failed = client.context().failed.load(Relaxed) - failed0;
    let lost = expected.saturating_sub(seen.unique);
    let secs = count as f64 / a.per_session_rate;
    let h = &seen.hist;
    let v = json!({
        "system": "rdkafka",
        "scenario": "request-reply",
        "tag": a.tag,
        "connections": n,
        "payload": a.payload,
        "per_session_rate": a.per_session_rate,
        "offered_per_s": (n as f64 * a.per_session_rate).round(),
        "duration_s": secs,
        "measured_unix_ns": [start_unix_ns, end_unix_ns],
        "warm_up_s": (warm_up_s * 1000.0).round() / 1000.0,
        "expected": expected,
        "acked": acked,
        "ack_errors": failed,
        "acked_per_s": (acked_in_time as f64 / secs).round(),
        "delivered": seen.unique,
        "lost": lost,
        "dup": seen.dup,
        "deliveries_per_s": (seen.unique as f64 / secs).round(),
        "backend_answered": answered,
        "latency": {
            "count": h.len(),
            "p50_us": h.value_at_quantile(0.50),
            "p90_us": h.value_at_quantile(0.90),
            "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999),
            "max_us": h.max(),
            "mean_us": (h.mean() * 10.0).round() / 10.0,
        },
        "ok": lost == 0 && seen.dup == 0 && failed == 0,
    });
    println!("{v}");
    Ok(())
}
