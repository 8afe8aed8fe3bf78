//! `recovery-bench`: time to recover a channel's history on subscribe (BENCHMARKS.md, "Channel
//! recovery"), against a stock client of the same bus reading the same messages.
//!
//! 1. Publishes `--messages` (M) messages of about `--payload` bytes to a fresh channel
//!    `<channel-prefix>.<unique>` through the admin API (`POST /api/publish`, a few at a time).
//! 2. A plain framed subscribe learns the channel's epoch and newest offset CUR.
//! 3. `--runs` (R) times: a new connection to the framed route; after its welcome (not timed),
//!    `subscribe` with `since: {offset: CUR - M, epoch}`, timed from sending it until the M-th
//!    recovered message arrives. Each run must answer `recovered: true` with offset CUR and then
//!    exactly M messages with increasing offsets in (CUR - M, CUR], ending at CUR; anything else
//!    fails the run (exit 1).
//! 4. Baseline, same M messages straight from the bus with no gateway: NATS, an async-nats
//!    JetStream ordered pull consumer on the channel's stream, filtered on the channel subject,
//!    from stream sequence CUR - M + 1 (consumer creation timed, as the gateway makes one per
//!    read); Kafka, one rdkafka `BaseConsumer` made once (like the gateway's persistent history
//!    reader) and assigned to the channel topic's partition 0 at Kafka offset CUR - M (gateway
//!    offsets are Kafka offsets + 1), timed from `assign` to the M-th record. memory:// has no
//!    stock client, so no baseline.
//!
//! One JSON line out: bus, M, R, p50/p90/max (ms, nearest rank) of the gateway and the baseline,
//! and every run's time.
//!
//! Run with (a gateway with `[[channel]] pattern = "bench.*"` whose `history_size` >= M):
//! `target/release/recovery-bench --url ws://127.0.0.1:8080/ws --admin 127.0.0.1:8081 --bus nats://127.0.0.1:4222`

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use std::borrow::Cow;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Times the gateway's channel recovery against a stock bus client.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The gateway's framed route (loopback).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// The gateway's admin listener, HOST:PORT (`POST /api/publish`).
    #[arg(long, default_value = "127.0.0.1:8081")]
    admin: String,
    /// The gateway's bus: memory:// (no baseline), nats://HOST:PORT or kafka://HOST:PORT (the
    /// baseline reads it directly).
    #[arg(long, default_value = "memory://")]
    bus: String,
    /// The gateway's `--prefix` (bus names: `<prefix>.ch.<channel>`).
    #[arg(long, default_value = "sy")]
    prefix: String,
    /// The channel is `<this>.<unique>`: a `[[channel]]` pattern with history_size >= M must
    /// cover it.
    #[arg(long, default_value = "bench")]
    channel_prefix: String,
    /// Messages published, then recovered by each subscribe (M).
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Timed recoveries (R), each on a new connection; as many baseline reads.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Keep the plain subscribe's connection (subscribed to the channel) open during the runs,
    /// so the edge already has the channel's live subscription when each timed subscribe comes
    /// (a channel with other subscribers on the edge); without it each timed subscribe is the
    /// channel's first subscriber on the edge.
    #[arg(long)]
    hold: bool,
    /// Size of each message's `data` JSON (bytes).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Publish requests in flight at once.
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// The Kafka baseline consumer's `fetch.wait.max.ms` (the gateway's history reader: 10;
    /// librdkafka's default: 500).
    #[arg(long, default_value_t = 10)]
    kafka_fetch_wait_ms: u64,
    /// Longest one recovery, baseline read or publish may take (s).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
}

/// The fields of a server frame this bench looks at.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    offset: Option<u64>,
    recovered: Option<bool>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The next text frame (pings and pongs skipped), within `deadline`.
async fn next_text(ws: &mut Ws, deadline: Instant) -> Result<String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, ws.next())
            .await
            .map_err(|_| anyhow!("no frame from the gateway in time"))?
            .ok_or_else(|| anyhow!("the gateway closed the connection"))??;
        match m {
            WsMessage::Text(t) => return Ok(t.as_str().to_owned()),
            WsMessage::Close(c) => bail!("the gateway closed the connection: {c:?}"),
            WsMessage::Binary(_) => bail!("unexpected binary frame"),
            _ => {}
        }
    }
}

fn parse(text: &str) -> Result<Frame<'_>> {
    let f: Frame<'_> = serde_json::from_str(text).with_context(|| format!("bad frame {text:?}"))?;
    if f.op.as_deref() == Some("error") {
        bail!(
            "gateway error {}: {}",
            f.code.as_deref().unwrap_or("?"),
            f.message.as_deref().unwrap_or("")
        );
    }
    Ok(f)
}

/// A framed connection, after its welcome.
async fn connect(url: &str, timeout: Duration) -> Result<Ws> {
    let deadline = Instant::now() + timeout;
    let (mut ws, _) = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| anyhow!("connecting to {url} timed out"))?
        .with_context(|| format!("connecting to {url}"))?;
    let t = next_text(&mut ws, deadline).await?;
    ensure!(
        parse(&t)?.op.as_deref() == Some("welcome"),
        "expected a welcome, got {t}"
    );
    Ok(ws)
}

async fn send(ws: &mut Ws, v: serde_json::Value) -> Result<()> {
    ws.send(WsMessage::Text(v.to_string().into())).await?;
    Ok(())
}

/// A plain subscribe: the channel's (epoch, newest offset), and its connection (still
/// subscribed: dropping it leaves the channel).
async fn position(a: &Args, channel: &str) -> Result<(String, u64, Ws)> {
    let timeout = Duration::from_secs_f64(a.timeout);
    let mut ws = connect(&a.url, timeout).await?;
    send(&mut ws, json!({"op": "subscribe", "channel": channel})).await?;
    let t = next_text(&mut ws, Instant::now() + timeout).await?;
    let f = parse(&t)?;
    ensure!(f.op.as_deref() == Some("subscribed"), "expected subscribed, got {t}");
    let (Some(epoch), Some(offset)) = (f.epoch, f.offset) else {
        bail!("no epoch/offset in {t}: does a [[channel]] pattern with history cover {channel}?");
    };
    let epoch = epoch.into_owned();
    Ok((epoch, offset, ws))
}

/// One timed recovery of the `m` messages after `since` (newest `cur`) on a new connection.
async fn recover_once(a: &Args, channel: &str, epoch: &str, since: u64, cur: u64, m: usize) -> Result<Duration> {
    let timeout = Duration::from_secs_f64(a.timeout);
    let mut ws = connect(&a.url, timeout).await?;
    let sub = json!({"op": "subscribe", "channel": channel, "since": {"offset": since, "epoch": epoch}});
    let text = WsMessage::Text(sub.to_string().into());
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    ws.send(text).await?;
    let mut subscribed = false;
    let (mut got, mut prev) = (0usize, since);
    while got < m {
        let t = next_text(&mut ws, deadline)
            .await
            .with_context(|| format!("after {got} of {m} recovered messages"))?;
        let f = parse(&t)?;
        match f.op.as_deref() {
            Some("subscribed") => {
                ensure!(!subscribed, "a second subscribed: {t}");
                ensure!(f.recovered == Some(true), "not recovered: {t}");
                ensure!(f.epoch.as_deref() == Some(epoch), "epoch changed: {t}");
                ensure!(f.offset == Some(cur), "subscribed at another offset than {cur}: {t}");
                subscribed = true;
            }
            Some(op) => bail!("unexpected op {op}: {t}"),
            None => {
                ensure!(subscribed, "a message before subscribed: {t}");
                ensure!(f.channel.as_deref() == Some(channel), "message of another channel: {t}");
                let o = f.offset.ok_or_else(|| anyhow!("message without offset: {t}"))?;
                ensure!(
                    o > prev && o <= cur,
                    "offset {o} after {prev} (recovering ({since}, {cur}]): {t}"
                );
                prev = o;
                got += 1;
            }
        }
    }
    let took = t0.elapsed();
    ensure!(prev == cur, "{m} messages ended at offset {prev}, not {cur}");
    let _ = ws.close(None).await;
    Ok(took)
}

/// Publishes `m` messages to `channel`; returns the newest offset the admin API reported.
async fn publish(a: &Args, channel: &str) -> Result<u64> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(a.timeout))
        .build()?;
    let url = format!("http://{}/api/publish", a.admin);
    let mut results = futures::stream::iter(0..a.messages)
        .map(|i| {
            let base = format!(r#"{{"i":{i},"p":""}}"#);
            let pad = "x".repeat(a.payload.saturating_sub(base.len()));
            let body = json!({"channel": channel, "data": {"i": i, "p": pad}});
            let req = http.post(&url).json(&body).send();
            async move {
                let r = req.await?;
                let status = r.status();
                let v: serde_json::Value = r.json().await?;
                ensure!(status.as_u16() == 202, "publish answered {status}: {v}");
                Ok::<_, anyhow::Error>(v["offset"].as_u64())
            }
        })
        .buffer_unordered(a.publishers.max(1));
    let mut newest = 0;
    while let Some(r) = results.next().await {
        newest = newest.max(r?.unwrap_or(0));
    }
    Ok(newest)
}

/// NATS baseline: `runs` ordered pull consumers reading the `m` messages of `subject` from
/// stream sequence `cur - m + 1`, each timed from its creation to its M-th message.
async fn nats_baseline(a: &Args, url: &str, subject: &str, cur: u64, m: usize) -> Result<Vec<Duration>> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    let timeout = Duration::from_secs_f64(a.timeout);
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let js = async_nats::jetstream::new(client);
    let name = js
        .stream_by_subject(subject)
        .await
        .with_context(|| format!("the stream of {subject}"))?;
    let stream = js.get_stream(&name).await.with_context(|| format!("stream {name}"))?;
    let start = cur + 1 - m as u64;
    let mut out = Vec::with_capacity(a.runs);
    for _ in 0..a.runs {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.to_owned(),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("ordered consumer on {name}: {e}"))?;
        let mut msgs = consumer
            .messages()
            .await
            .map_err(|e| anyhow!("consumer messages: {e}"))?;
        let (mut got, mut prev) = (0usize, start - 1);
        while got < m {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, msgs.next())
                .await
                .map_err(|_| anyhow!("NATS baseline: {got} of {m} messages in time"))?
                .ok_or_else(|| anyhow!("NATS baseline: the consumer ended after {got} of {m}"))?
                .map_err(|e| anyhow!("NATS baseline: {e}"))?;
            let seq = msg.info().map_err(|e| anyhow!("NATS baseline: {e}"))?.stream_sequence;
            ensure!(seq > prev && seq <= cur, "NATS baseline: sequence {seq} after {prev}");
            prev = seq;
            got += 1;
        }
        out.push(t0.elapsed());
        ensure!(prev == cur, "NATS baseline: {m} messages ended at {prev}, not {cur}");
    }
    Ok(out)
}

/// Kafka baseline (blocking): one consumer, made once, assigned `runs` times to `topic`
/// partition 0 at Kafka offset `cur - m`, each timed from `assign` to the M-th record.
fn kafka_baseline(
    runs: usize,
    timeout: Duration,
    fetch_wait_ms: u64,
    brokers: &str,
    topic: &str,
    cur: u64,
    m: usize,
) -> Result<Vec<Duration>> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("recovery-bench-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.min.bytes", "1")
        // As the gateway's history reader (bus/src/kafka/mod.rs): with the default 500 ms, the
        // fetch held open at the end of the log when a read stops delays the next read's first
        // fetch by up to 500 ms (the broker answers one connection in order).
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .create()?;
    // Untimed: connections and metadata, as the gateway's reader has them from the plain
    // subscribe's read.
    let (_, high) = c.fetch_watermarks(topic, 0, timeout)?;
    ensure!(
        high as u64 == cur,
        "Kafka baseline: {topic} ends at {high}, the gateway said {cur}"
    );
    let from = (cur - m as u64) as i64;
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(from))?;
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        c.assign(&tpl)?;
        let mut next = from;
        while next < from + m as i64 {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "Kafka baseline: {} of {m} records in time",
                next - from
            );
            let Some(r) = c.poll(left.min(Duration::from_millis(200))) else {
                continue;
            };
            let r = r?;
            ensure!(
                r.offset() == next,
                "Kafka baseline: offset {} where {next} was due",
                r.offset()
            );
            next += 1;
        }
        out.push(t0.elapsed());
        c.unassign()?;
    }
    Ok(out)
}

/// p50, p90, max (ms, nearest rank) and every run (ms) as JSON fields prefixed `name_`.
fn summary(name: &str, runs: &[Duration], out: &mut serde_json::Map<String, serde_json::Value>) {
    let mut ms: Vec<f64> = runs.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let each = ms.clone();
    ms.sort_by(f64::total_cmp);
    let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    out.insert(format!("{name}_p50_ms"), json!(r3(rank(0.5))));
    out.insert(format!("{name}_p90_ms"), json!(r3(rank(0.9))));
    out.insert(format!("{name}_max_ms"), json!(r3(ms[ms.len() - 1])));
    out.insert(
        format!("{name}_runs_ms"),
        json!(each.into_iter().map(r3).collect::<Vec<_>>()),
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(a.messages > 0 && a.runs > 0, "--messages and --runs must be at least 1");
    let (scheme, host) = a
        .bus
        .split_once("://")
        .context("--bus: memory://, nats://H:P or kafka://H:P")?;
    ensure!(matches!(scheme, "memory" | "nats" | "kafka"), "unknown bus {}", a.bus);
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let channel = format!("{}.r{}-{unique}", a.channel_prefix, std::process::id());
    let topic = format!("{}.ch.{channel}", a.prefix);
    let m = a.messages;

    let t = Instant::now();
    let published = publish(&a, &channel).await?;
    let publish_s = t.elapsed().as_secs_f64();
    let (epoch, cur, mut holder) = position(&a, &channel).await?;
    if !a.hold {
        // Each timed subscribe is then the edge's only subscriber of the channel.
        let _ = holder.close(None).await;
        drop(holder);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("published {m} to {channel} in {publish_s:.2} s; epoch {epoch}, newest offset {cur}");
    ensure!(
        cur >= m as u64,
        "newest offset {cur} is below {m}: not a fresh channel?"
    );
    ensure!(
        published == 0 || published == cur,
        "the admin API's newest offset {published} differs from subscribed's {cur}"
    );
    let since = cur - m as u64;

    let mut gw = Vec::with_capacity(a.runs);
    for i in 0..a.runs {
        let d = recover_once(&a, &channel, &epoch, since, cur, m)
            .await
            .with_context(|| format!("gateway run {}", i + 1))?;
        gw.push(d);
    }

    let timeout = Duration::from_secs_f64(a.timeout);
    let (baseline, client) = match scheme {
        "nats" => (
            Some(nats_baseline(&a, &a.bus, &topic, cur, m).await?),
            "async-nats JetStream ordered pull consumer",
        ),
        "kafka" => {
            let (runs, wait, brokers, t) = (a.runs, a.kafka_fetch_wait_ms, host.to_owned(), topic.clone());
            let r = tokio::task::spawn_blocking(move || kafka_baseline(runs, timeout, wait, &brokers, &t, cur, m))
                .await??;
            (Some(r), "rdkafka BaseConsumer, assign + poll")
        }
        _ => (None, "none (memory:// has no stock client)"),
    };

    let mut out = serde_json::Map::new();
    out.insert("bus".into(), json!(scheme));
    out.insert("messages".into(), json!(m));
    out.insert("runs".into(), json!(a.runs));
    out.insert("payload".into(), json!(a.payload));
    out.insert("hold".into(), json!(a.hold));
    out.insert("channel".into(), json!(channel));
    out.insert("offset".into(), json!(cur));
    out.insert("publish_s".into(), json!((publish_s * 1000.0).round() / 1000.0));
    summary("gateway", &gw, &mut out);
    out.insert("baseline".into(), json!(client));
    if let Some(b) = &baseline {
        summary("baseline", b, &mut out);
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
