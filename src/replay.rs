//! `switchyard replay`: a session's conversation, read back from Kafka.
//!
//! Prints the transcript (both directions, interleaved by time) as JSON lines; or re-drives
//! the client's frames into a live WebSocket endpoint with the original spacing; or
//! re-publishes the inbound records to a staging topic, marked `sy-replayed: true`.

use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::time::Duration;
use switchyard_bus::kafka::{LogRecord, Security, SessionLog};
use switchyard_bus::{BusOptions, Record};
use switchyard_protocol::envelope::{header, valid_session};
use switchyard_protocol::Naming;
use tokio_tungstenite::tungstenite::Message;

/// Replay one session recorded on a Kafka bus.
#[derive(Debug, Clone, Args, PartialEq)]
pub struct ReplayArgs {
    /// Session id (the x-switchyard-session of the original connection)
    #[arg(long)]
    pub session: String,
    /// Only records at or after this time (RFC 3339, e.g. 2026-11-25T10:00:00Z, or Unix ms)
    #[arg(long)]
    pub from: Option<String>,
    /// Only records at or before this time (RFC 3339 or Unix ms)
    #[arg(long)]
    pub to: Option<String>,
    /// Re-drive the client's frames into this WebSocket URL as a new client; print what comes back
    #[arg(long, conflicts_with = "to_topic")]
    pub to_ws: Option<String>,
    /// Re-publish the inbound records to this topic, marked sy-replayed: true
    #[arg(long)]
    pub to_topic: Option<String>,
    /// Speed factor for --to-ws (2 = twice as fast; 0 = no waiting)
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// With --to-ws: after the last frame, wait this long for replies (on a raw route, only
    /// until as many came back as the session originally received)
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub linger: Duration,
}

fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s).with_context(|| format!("invalid time {s:?}: use RFC 3339 or Unix ms"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
}

/// Checks the arguments without I/O (exit 64 on failure).
pub fn validate(args: &ReplayArgs, bus: &str) -> Result<(), String> {
    if !bus.starts_with("kafka://") {
        return Err(format!(
            "replay reads a Kafka log: give --bus kafka://HOST:PORT (got {bus})"
        ));
    }
    if !valid_session(&args.session) {
        return Err(format!("invalid session id {:?}", args.session));
    }
    for t in [&args.from, &args.to].into_iter().flatten() {
        parse_time(t).map_err(|e| e.to_string())?;
    }
    if !(args.speed >= 0.0 && args.speed.is_finite()) {
        return Err("--speed must be a finite number ≥ 0".into());
    }
    if let Some(t) = &args.to_topic {
        if !switchyard_protocol::valid_channel(t) {
            return Err(format!("invalid --to-topic {t:?}"));
        }
    }
    if let Some(u) = &args.to_ws {
        if !(u.starts_with("ws://") || u.starts_with("wss://")) {
            return Err(format!("--to-ws must be a ws:// or wss:// URL (got {u})"));
        }
    }
    Ok(())
}

/// The time a record happened: the edge's `sy-ts`, else the broker timestamp.
fn when(r: &LogRecord) -> i64 {
    r.headers
        .get(header::TIMESTAMP)
        .and_then(|t| t.parse().ok())
        .or(r.timestamp_ms)
        .unwrap_or(0)
}

fn is_inbound(r: &LogRecord) -> bool {
    matches!(r.headers.get(header::KIND), Some("connect" | "frame" | "disconnect"))
}

fn transcript_line(r: &LogRecord) -> Value {
    let mut headers = Map::new();
    for (k, v) in r.headers.iter() {
        headers.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    let mut line = json!({
        "direction": if is_inbound(r) { "in" } else { "out" },
        "ts": when(r),
        "seq": r.headers.get(header::SEQ).and_then(|s| s.parse::<u64>().ok()),
        "kind": r.headers.get(header::KIND).unwrap_or("deliver"),
        "opcode": r.headers.get(header::OPCODE),
        "topic": r.topic,
        "offset": r.offset,
        "headers": headers,
    });
    let binary = r.headers.get(header::OPCODE) == Some("binary");
    match std::str::from_utf8(&r.payload) {
        Ok(t) if !binary => line["payload"] = Value::String(t.to_owned()),
        _ => line["payload_b64"] = Value::String(base64::engine::general_purpose::STANDARD.encode(&r.payload)),
    }
    line
}

pub async fn run(args: ReplayArgs, bus_url: String, prefix: String, security: Security) -> anyhow::Result<()> {
    let from = args.from.as_deref().map(parse_time).transpose()?;
    let to = args.to.as_deref().map(parse_time).transpose()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_draw_target(if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    });
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} reading {pos}/{len} records {wide_bar} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let naming = Naming::new(&prefix).map_err(|e| anyhow::anyhow!("--prefix: {e}"))?;
    let log = SessionLog::new(&bus_url, naming.clone(), security.clone());
    let session = args.session.clone();
    let b2 = bar.clone();
    let mut records = tokio::task::spawn_blocking(move || {
        log.read(&session, from, to, &|seen, total| {
            b2.set_length(total);
            b2.set_position(seen);
        })
    })
    .await??;
    bar.finish_and_clear();
    if records.is_empty() {
        // Tell "no such session" apart from "nothing in that range".
        if from.is_some() || to.is_some() {
            let log = SessionLog::new(&bus_url, naming, security.clone());
            let s = args.session.clone();
            let any = tokio::task::spawn_blocking(move || log.read(&s, None, None, &|_, _| {})).await??;
            if !any.is_empty() {
                bail!(
                    "session {} has {} records, but none in the given range",
                    args.session,
                    any.len()
                );
            }
        }
        bail!("no records for session {} on {bus_url} (prefix {prefix})", args.session);
    }
    records.sort_by_key(|r| (when(r), !is_inbound(r), r.offset));

    if let Some(url) = &args.to_ws {
        return drive_ws(&records, url, args.speed, args.linger).await;
    }
    if let Some(topic) = &args.to_topic {
        let opts = BusOptions {
            prefix: prefix.clone(),
            name: "switchyard-replay".into(),
            tls: security.tls.clone(),
            auth: security.auth.clone(),
            ..BusOptions::default()
        };
        let bus = switchyard_bus::connect(&bus_url, &opts).await?;
        let mut n = 0;
        for r in records.iter().filter(|r| is_inbound(r)) {
            let mut headers = r.headers.clone();
            headers.0.retain(|(k, _)| k != header::REPLAYED);
            headers.insert(header::REPLAYED, "true");
            bus.publish(
                topic,
                Record {
                    key: r.key.clone(),
                    headers,
                    payload: r.payload.clone(),
                },
            )
            .await?;
            n += 1;
        }
        bus.flush().await?;
        eprintln!("replayed {n} inbound records of session {} to {topic}", args.session);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for r in &records {
        writeln!(out, "{}", transcript_line(r))?;
    }
    Ok(())
}

/// Sends the session's client frames to `url` with the original spacing (÷ speed), printing
/// every message that comes back as a JSON line. After the last frame it waits `linger`, or on
/// a raw route only until as many messages came back as the session originally received.
async fn drive_ws(records: &[LogRecord], url: &str, speed: f64, linger: Duration) -> anyhow::Result<()> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let (mut tx, mut rx) = ws.split();
    // One event per message that came back: whether the route is framed (its first message is
    // the welcome op). A framed route's own ops (welcome, acks, errors) and channel messages
    // are not in the session's log, so its count cannot be compared: only raw routes stop early.
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let printer = tokio::spawn(async move {
        let mut framed = None;
        while let Some(Ok(m)) = rx.next().await {
            let line = match m {
                Message::Text(t) => {
                    framed.get_or_insert_with(|| serde_json::from_str::<Value>(&t).is_ok_and(|v| v["op"] == "welcome"));
                    json!({"direction":"out","ts":switchyard_protocol::envelope::now_ms(),"opcode":"text","payload":t.as_str()})
                }
                Message::Binary(b) => {
                    framed.get_or_insert(false);
                    json!({"direction":"out","ts":switchyard_protocol::envelope::now_ms(),"opcode":"binary","payload_b64":base64::engine::general_purpose::STANDARD.encode(&b)})
                }
                Message::Close(f) => {
                    println!(
                        "{}",
                        json!({"direction":"out","kind":"close","code":f.map(|f| u16::from(f.code))})
                    );
                    continue;
                }
                _ => continue,
            };
            println!("{line}");
            let _ = got_tx.send(framed == Some(true));
        }
    });
    // What the session originally received (a control op is not a message to the client).
    let expected = records
        .iter()
        .filter(|r| !is_inbound(r) && r.headers.get(header::KIND).unwrap_or("deliver") == "deliver")
        .count();
    let frames: Vec<&LogRecord> = records
        .iter()
        .filter(|r| r.headers.get(header::KIND) == Some("frame"))
        .collect();
    let mut prev: Option<i64> = None;
    for r in &frames {
        if let (Some(p), true) = (prev, speed > 0.0) {
            let gap = (when(r) - p).max(0) as f64 / speed;
            tokio::time::sleep(Duration::from_millis(gap as u64)).await;
        }
        prev = Some(when(r));
        let m = if r.headers.get(header::OPCODE) == Some("binary") {
            Message::Binary(r.payload.clone())
        } else {
            Message::Text(String::from_utf8_lossy(&r.payload).into_owned().into())
        };
        tx.send(m).await?;
    }
    eprintln!(
        "sent {} frames; waiting up to {:?} for replies (the session received {expected})",
        frames.len(),
        linger
    );
    let until = tokio::time::Instant::now() + linger;
    let (mut received, mut framed) = (0, false);
    while expected == 0 || framed || received < expected {
        match tokio::time::timeout_at(until, got.recv()).await {
            Ok(Some(f)) => {
                received += 1;
                framed |= f;
            }
            // --linger is over, or the endpoint closed.
            Ok(None) | Err(_) => break,
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    // What comes while our close is answered is still printed (at most 5 s), and counted.
    let _ = tokio::time::timeout(Duration::from_secs(5), printer).await;
    while let Ok(f) = got.try_recv() {
        received += 1;
        framed |= f;
    }
    let how = if framed {
        ", protocol ops included; a framed route waits the whole --linger"
    } else {
        ""
    };
    eprintln!("received {received} messages{how} (the session originally received {expected})");
    Ok(())
}
