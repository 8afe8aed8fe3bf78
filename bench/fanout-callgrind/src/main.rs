//! `fanout-callgrind`: the in-memory channel fan-out path with N subscribers and M messages,
//! without sockets, so `valgrind --tool=callgrind` can count instructions per delivery.
//!
//! - `--mode switchyard`: the real edge. An [`Edge`] is started (its listener is bound but never
//!   connected to), N [`Session`]s of route `/ws` are subscribed to one channel through the
//!   edge's own `ChannelHub`, and M messages are published on the production `memory://` bus
//!   (with the Prometheus recorder installed, as in the binary). The channel pump encodes each
//!   message once and queues it to every session; one task per session stands in for the socket
//!   writer: it takes everything queued (`OutQueue::take_all`) and drops it. What is counted:
//!   bus publish + pump + per-session queue push + writer wake-up + dequeue. Not counted:
//!   WebSocket framing and the `write` syscall.
//! - `--mode baseline`: the naive peer's path: each message encoded once and sent on a
//!   `tokio::sync::broadcast` channel; one task per receiver `recv`s and drops it.
//!
//! Both run on a current-thread runtime, publish in batches of `--batch` messages and then let
//! every task run until all deliveries of the batch happened. Only `measured_*` is counted:
//!
//! Run with:
//! `valgrind --tool=callgrind --toggle-collect='*measured_switchyard*' target/release/fanout-callgrind --mode switchyard --subscribers 1000 --messages 200`
//! (`bench/callgrind.sh` runs both modes and prints instructions per delivery).

use clap::{Parser, ValueEnum};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;
use switchyard_bus::{Bus, BusOptions, Record};
use switchyard_edge::queue::Out;
use switchyard_edge::session::Session;
use switchyard_edge::{Edge, EdgeConfig};
use switchyard_protocol::{Naming, TraceContext};
use tokio::runtime::Runtime;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Switchyard,
    Baseline,
}

/// In-memory fan-out for callgrind: N subscribers, M messages, no sockets.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 200)]
    messages: u64,
    /// Messages published before every task is let run.
    #[arg(long, default_value_t = 32)]
    batch: u64,
    /// Payload (JSON) size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

const CHANNEL: &str = "bench";

fn payload(seq: u64, size: usize) -> String {
    let head = format!("{{\"s\":{seq},\"p\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// Waits (yielding to every other task) until `counter` reaches `target`.
async fn settle(counter: &AtomicU64, target: u64) {
    while counter.load(Relaxed) < target {
        tokio::task::yield_now().await;
    }
}

/// Publishes `seqs` on the memory bus in batches and waits for every delivery.
async fn publish_sy(bus: &Arc<dyn Bus>, topic: &str, seqs: std::ops::Range<u64>, a: &Args, delivered: &AtomicU64) {
    let mut target = delivered.load(Relaxed);
    let mut seq = seqs.start;
    while seq < seqs.end {
        let end = (seq + a.batch).min(seqs.end);
        for s in seq..end {
            let rec = Record {
                key: None,
                headers: Default::default(),
                payload: payload(s, a.payload).into(),
            };
            bus.publish(topic, rec).await.expect("memory bus publish");
        }
        target += (end - seq) * a.subscribers as u64;
        settle(delivered, target).await;
        seq = end;
    }
}

#[inline(never)]
fn measured_switchyard(rt: &Runtime, bus: &Arc<dyn Bus>, topic: &str, a: &Args, delivered: &AtomicU64) {
    rt.block_on(publish_sy(bus, topic, 1..1 + a.messages, a, delivered));
}

fn switchyard(a: &Args) -> anyhow::Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // As in the binary: a metrics recorder is installed, so counters are real.
    let _ = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let delivered = Arc::new(AtomicU64::new(0));
    let (bus, topic, _edge) = rt.block_on(async {
        let bus = switchyard_bus::connect("memory://", &BusOptions::default()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let edge = Edge::start(
            EdgeConfig::new("callgrind"),
            bus.clone(),
            listener,
            CancellationToken::new(),
        )
        .await?;
        let route = edge
            .state
            .routes
            .get("/ws")
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no /ws route"))?;
        for i in 0..a.subscribers {
            let trace = TraceContext {
                traceparent: format!("00-{:032x}-{:016x}-01", i + 1, i + 1),
                tracestate: None,
            };
            let sess = Arc::new(Session::new(format!("s{i:08}"), route.clone(), trace));
            edge.state.channels.subscribe(&sess, CHANNEL).await?;
            let d = delivered.clone();
            // Stand-in for the socket writer: drain everything queued, drop it.
            tokio::spawn(async move {
                let mut batch: VecDeque<Out> = VecDeque::new();
                loop {
                    sess.queue.take_all(&mut batch).await;
                    d.fetch_add(batch.len() as u64, Relaxed);
                    batch.clear();
                }
            });
        }
        anyhow::Ok((bus, Naming::default().channel(CHANNEL), edge))
    })?;
    // Warm-up outside the measurement: queues, buffers and the allocator reach steady state.
    rt.block_on(publish_sy(&bus, &topic, 0..a.batch * 2, a, &delivered));
    let before = delivered.load(Relaxed);
    measured_switchyard(&rt, &bus, &topic, a, &delivered);
    Ok(delivered.load(Relaxed) - before)
}

async fn publish_naive(tx: &broadcast::Sender<Arc<str>>, seqs: std::ops::Range<u64>, a: &Args, delivered: &AtomicU64) {
    let mut target = delivered.load(Relaxed);
    let mut seq = seqs.start;
    while seq < seqs.end {
        let end = (seq + a.batch).min(seqs.end);
        for s in seq..end {
            // Encoded once per message, shared by every receiver.
            let msg = format!(
                r#"{{"channel":"{CHANNEL}","offset":{s},"data":{}}}"#,
                payload(s, a.payload)
            );
            let _ = tx.send(Arc::from(msg));
        }
        target += (end - seq) * a.subscribers as u64;
        settle(delivered, target).await;
        seq = end;
    }
}

#[inline(never)]
fn measured_baseline(rt: &Runtime, tx: &broadcast::Sender<Arc<str>>, a: &Args, delivered: &AtomicU64) {
    rt.block_on(publish_naive(tx, 1..1 + a.messages, a, delivered));
}

fn baseline(a: &Args) -> anyhow::Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let delivered = Arc::new(AtomicU64::new(0));
    let (tx, _) = broadcast::channel::<Arc<str>>(1024);
    rt.block_on(async {
        for _ in 0..a.subscribers {
            let mut rx = tx.subscribe();
            let d = delivered.clone();
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(m) => {
                            d.fetch_add(1, Relaxed);
                            drop(m);
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
        }
        // Let every receiver reach its first `recv`.
        tokio::task::yield_now().await;
    });
    rt.block_on(publish_naive(&tx, 0..a.batch * 2, a, &delivered));
    let before = delivered.load(Relaxed);
    measured_baseline(&rt, &tx, a, &delivered);
    Ok(delivered.load(Relaxed) - before)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let t = Instant::now();
    let n = match a.mode {
        Mode::Switchyard => switchyard(&a)?,
        Mode::Baseline => baseline(&a)?,
    };
    let want = a.messages * a.subscribers as u64;
    println!(
        "mode={:?} subscribers={} messages={} deliveries={} wall_ms={}",
        a.mode,
        a.subscribers,
        a.messages,
        n,
        t.elapsed().as_millis()
    );
    anyhow::ensure!(n == want, "expected {want} deliveries, counted {n}");
    Ok(())
}
