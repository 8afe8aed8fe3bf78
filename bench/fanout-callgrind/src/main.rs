//! `fanout-callgrind`: the channel fan-out path with N subscribers and M messages, each
//! subscriber behind a real loopback TCP socket, so `valgrind --tool=callgrind` can count the
//! user-space instructions per delivery (the kernel's share of each `write` is not counted by
//! callgrind, for either side).
//!
//! - `--mode switchyard`: the real edge. An [`Edge`] is started (its listener is bound but never
//!   connected to), N [`Session`]s of route `/ws` are subscribed to one channel through the
//!   edge's own `ChannelHub`, each with the server end of a loopback connection as its socket,
//!   and M messages are published on the production `memory://` bus (with the Prometheus
//!   recorder installed, as in the binary). The channel pump encodes each message's frame once
//!   and writes it to every idle socket itself; a frame that cannot be written at once goes
//!   through the session's queue to a stand-in writer task (as in the edge's writer).
//!   What is counted: bus publish + pump + framing + per-socket write call.
//! - `--mode baseline`: the naive peer's path (bench/baseline): each message encoded once and
//!   sent on a `tokio::sync::broadcast` channel; one task per receiver `recv`s it and sends it
//!   with tokio-tungstenite on its own loopback socket.
//!
//! The client ends are kept open and not read: the kernel buffers what is written (each socket
//! gets at most a few tens of KiB). Both modes run on a current-thread runtime, publish in
//! batches of `--batch` messages and then let every task run until all deliveries of the batch
//! happened. Only `measured_*` is counted:
//!
//! Run with:
//! `valgrind --tool=callgrind --toggle-collect='*measured_switchyard*' target/release/fanout-callgrind --mode switchyard --subscribers 1000 --messages 200`
//! (`bench/callgrind.sh` runs both modes and prints instructions per delivery).

use clap::{Parser, ValueEnum};
use futures::SinkExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;
use switchyard_bus::{Bus, BusOptions, Record};
use switchyard_edge::queue::{Out, SharedTcp};
use switchyard_edge::session::Session;
use switchyard_edge::{Edge, EdgeConfig};
use switchyard_protocol::{Naming, TraceContext};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
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

/// Waits (yielding to every other task) until `counted()` reaches `target`; gives up loudly
/// after a minute (e.g. when the never-read client sockets filled up, with large `--messages`).
async fn settle(counted: &dyn Fn() -> u64, target: u64) {
    let give_up = Instant::now() + std::time::Duration::from_secs(60);
    while counted() < target {
        assert!(
            Instant::now() < give_up,
            "stuck at {} of {target} deliveries: socket buffers full? use fewer --messages",
            counted()
        );
        tokio::task::yield_now().await;
    }
}

/// A connected loopback pair: (server end, client end). The client end is taken out of the
/// runtime (a plain std socket, never read): as with a real client in another process, its
/// readiness events are not the server's work.
async fn pair(l: &TcpListener) -> anyhow::Result<(TcpStream, std::net::TcpStream)> {
    let client = TcpStream::connect(l.local_addr()?).await?;
    let (server, _) = l.accept().await?;
    server.set_nodelay(true)?;
    Ok((server, client.into_std()?))
}

/// Publishes `seqs` on the memory bus in batches and waits for every delivery.
async fn publish_sy(
    bus: &Arc<dyn Bus>,
    topic: &str,
    seqs: std::ops::Range<u64>,
    a: &Args,
    delivered: &dyn Fn() -> u64,
) {
    let mut target = delivered();
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
fn measured_switchyard(rt: &Runtime, bus: &Arc<dyn Bus>, topic: &str, a: &Args, delivered: &dyn Fn() -> u64) {
    rt.block_on(publish_sy(bus, topic, 1..1 + a.messages, a, delivered));
}

fn switchyard(a: &Args) -> anyhow::Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // As in the binary: a metrics recorder is installed, so counters are real.
    let _ = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let (bus, topic, _edge, sessions, _clients) = rt.block_on(async {
        let bus = switchyard_bus::connect("memory://", &BusOptions::default()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let cfg = EdgeConfig::new("callgrind");
        let loaded = cfg.validate().map_err(anyhow::Error::msg)?;
        let edge = Edge::start(cfg, loaded, bus.clone(), listener, CancellationToken::new()).await?;
        let route = edge
            .state
            .routes
            .get("/ws")
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no /ws route"))?;
        let pairs = TcpListener::bind("127.0.0.1:0").await?;
        let (mut sessions, mut clients) = (Vec::new(), Vec::new());
        for i in 0..a.subscribers {
            let trace = TraceContext {
                traceparent: format!("00-{:032x}-{:016x}-01", i + 1, i + 1),
                tracestate: None,
            };
            let sess = Arc::new(Session::new(format!("s{i:08}"), route.clone(), trace));
            let (server, client) = pair(&pairs).await?;
            let (read_half, write_half) = server.into_split();
            let write_half = Arc::new(write_half);
            sess.queue.set_direct(write_half.clone());
            edge.state.channels.subscribe(&sess, CHANNEL, None).await?;
            let s2 = sess.clone();
            // Stand-in for the session's writer: what could not be written at once.
            tokio::spawn(async move {
                let mut out = SharedTcp(write_half);
                let mut batch: VecDeque<Out> = VecDeque::new();
                loop {
                    s2.queue.take_all(&mut batch).await;
                    for o in batch.drain(..) {
                        if let Some(b) = o.bytes() {
                            out.write_all(b).await.expect("loopback write");
                        }
                        if matches!(o, Out::Data(_)) {
                            s2.frames_out.fetch_add(1, Relaxed);
                        }
                    }
                }
            });
            sessions.push(sess);
            clients.push((client, read_half));
        }
        anyhow::Ok((bus, Naming::default().channel(CHANNEL), edge, sessions, clients))
    })?;
    // Frames on the wire: written by the pump (counted by `deliver`) or by the stand-in.
    let delivered = || sessions.iter().map(|s| s.frames_out.load(Relaxed)).sum::<u64>();
    // Warm-up outside the measurement: queues, buffers and the allocator reach steady state.
    rt.block_on(publish_sy(&bus, &topic, 0..a.batch * 2, a, &delivered));
    let before = delivered();
    measured_switchyard(&rt, &bus, &topic, a, &delivered);
    Ok(delivered() - before)
}

async fn publish_naive(tx: &broadcast::Sender<Arc<str>>, seqs: std::ops::Range<u64>, a: &Args, delivered: &AtomicU64) {
    let counted = || delivered.load(Relaxed);
    let mut target = counted();
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
        settle(&counted, target).await;
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
    let _clients = rt.block_on(async {
        let pairs = TcpListener::bind("127.0.0.1:0").await?;
        let mut clients = Vec::new();
        for _ in 0..a.subscribers {
            let mut rx = tx.subscribe();
            let d = delivered.clone();
            let (server, client) = pair(&pairs).await?;
            clients.push(client);
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                server,
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            // As bench/baseline does per client: frame and send each message.
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(m) => {
                            ws.send(Message::text(&*m)).await.expect("loopback write");
                            d.fetch_add(1, Relaxed);
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
        }
        // Let every receiver reach its first `recv`.
        tokio::task::yield_now().await;
        anyhow::Ok(clients)
    })?;
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
