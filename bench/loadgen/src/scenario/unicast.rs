//! The `unicast` scenario: N sessions, each sending `--per-session-rate` probes a second (one by
//! default) that the system routes back to the same socket; the probes are released on time by
//! a pacer thread. With `--framed-send` each probe is a framed `send` op with an `id`, and the
//! acks the edge answers with are counted (frames the bus accepted).

use super::clients::{collect, ramp_json, wait_ramp, Dial};
use super::measure::{
    base, deliveries, kernel_json, latency, ready_memory, server_json, ClientOut, Receiver, SelfCpu, Shared,
};
use super::schedule::drain;
use crate::payload;
use crate::procfs;
use crate::systems::Read;
use crate::Args;
use anyhow::Result;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Releases each unicast client's probes at their scheduled times from a thread of its own.
///
/// tokio's timer has 1 ms ticks and rounds every deadline up: measured on this machine with
/// 16,000 sleeping tasks and no I/O, a `sleep_until` woke 1.06 ms late at the median and 2.0 ms
/// at p99 (3.6 ms at p99.9). Since latency counts from the scheduled time (open loop), that
/// lateness was part of every probe's latency, as much as the whole 2 ms target. This thread
/// sleeps with `std::thread::sleep` (an hrtimer: tens of µs late) to each client's next due
/// time in order, bumps its release count and wakes it. It sleeps at least [`PACE_QUANTUM`] at
/// a time and then releases every client already due, so a probe is at most about that late
/// and the thread wakes a few thousand times a second, not once per probe.
const PACE_QUANTUM: Duration = Duration::from_micros(200);

/// Time from the end of the ramp to the first probe, fixed part. Every client must be waiting
/// for its first probe before it is due: waking 16,000 tasks takes the load generator a few
/// hundred ms (measured: with 100 ms alone, the first second's probes queued behind the
/// wake-ups and made the p99).
const START_LEAD: Duration = Duration::from_millis(100);
/// Time from the end of the ramp to the first probe, per session (see [`START_LEAD`]).
const START_LEAD_PER_SESSION: Duration = Duration::from_micros(60);

struct Pacer {
    /// Probes released to each client so far.
    released: Vec<AtomicU64>,
    wake: Vec<tokio::sync::Notify>,
    /// Time between two probes of one session (ns).
    gap_ns: u64,
    /// Probes go out as framed `send` ops with an `id` (`--framed-send`).
    framed_send: bool,
    /// Acks received so far, summed over sessions (with `framed_send`).
    acked: AtomicU64,
}

impl Pacer {
    fn new(n: usize, per_session_rate: f64, framed_send: bool) -> Self {
        Self {
            released: (0..n).map(|_| AtomicU64::new(0)).collect(),
            wake: (0..n).map(|_| tokio::sync::Notify::new()).collect(),
            gap_ns: (1e9 / per_session_rate) as u64,
            framed_send,
            acked: AtomicU64::new(0),
        }
    }

    /// Client `i`'s `k`-th probe is due at `start + phase(i) + k × gap`.
    fn due(&self, start: Instant, i: usize, k: u64) -> Instant {
        let n = self.released.len().max(1) as u64;
        start + Duration::from_nanos(i as u64 * self.gap_ns / n + k * self.gap_ns)
    }

    /// Runs on its own thread: `count` rounds over every client, in due order; stops early
    /// when `stop` is cancelled.
    fn run(&self, start: Instant, count: u64, stop: &CancellationToken) {
        let n = self.released.len();
        for k in 0..count {
            for i in 0..n {
                if stop.is_cancelled() {
                    return;
                }
                let due = self.due(start, i, k);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep((due - now).max(PACE_QUANTUM));
                }
                self.released[i].store(k + 1, Relaxed);
                self.wake[i].notify_one();
            }
        }
    }
}

/// A unicast session: sends probe `k` at `start + phase + k s` and records each echo.
async fn echo_client(
    i: usize,
    count: u64,
    size: usize,
    dial: Arc<Dial>,
    sh: Arc<Shared>,
    mut start: watch::Receiver<Option<Instant>>,
    pacer: Arc<Pacer>,
) -> (ClientOut, u64, u64) {
    let framed_send = pacer.framed_send;
    let conn = dial
        .connect(i, false, |mut c| async move {
            c.prepare_unicast(i).await?;
            Ok(c)
        })
        .await;
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => return (sh.connect_failed(i, e, true), 0, 0),
    };
    conn.count_ops = framed_send;
    let mut rx = Receiver::new(true);
    sh.ready.fetch_add(1, Relaxed);
    let start = tokio::select! {
        _ = sh.stop.cancelled() => None,
        s = start.wait_for(Option::is_some) => s.ok().and_then(|s| *s),
    };
    let Some(start) = start else {
        let out = ClientOut {
            ready: true,
            healthy: true,
            tally: rx.tally,
        };
        return (out, 0, 0);
    };
    let (mut k, mut counted) = (0u64, 0u64);
    loop {
        // Probes the pacer has released and this client has not sent yet (normally 0 or 1).
        let behind = k < pacer.released[i].load(Relaxed);
        tokio::select! {
            biased;
            _ = sh.stop.cancelled() => break,
            _ = pacer.wake[i].notified(), if k < count && !behind => continue,
            _ = std::future::ready(()), if behind => {
                // Stamped with the scheduled time, not the send time (open loop).
                let due = pacer.due(start, i, k);
                let p = payload::build(k + 1, sh.ns(due), 0, size);
                if conn.send_unicast(i, p, framed_send.then_some(k + 1)).await.is_err() {
                    sh.disconnected.fetch_add(1, Relaxed);
                    break;
                }
                k += 1;
            }
            r = conn.read(|s| rx.record(&sh, s)) => {
                if framed_send {
                    // Acks so far, summed over sessions (read at the end of the schedule).
                    pacer.acked.fetch_add(conn.acks - counted, Relaxed);
                    counted = conn.acks;
                }
                if let Read::Closed = r {
                    sh.closed();
                    break;
                }
            }
        }
    }
    let out = ClientOut {
        ready: true,
        healthy: true,
        tally: rx.tally,
    };
    (out, conn.acks, conn.op_errors)
}

pub(super) async fn unicast(args: &Args, n: usize, duration: f64) -> Result<Value> {
    let sh = Shared::new(1);
    let dial = Dial::new(args)?;
    anyhow::ensure!(args.per_session_rate > 0.0, "--per-session-rate must be above 0");
    let count = (duration * args.per_session_rate).floor().max(1.0) as u64;
    let secs = count as f64 / args.per_session_rate;
    let (tx, rx) = watch::channel(None);
    let (srv0, k0) = (procfs::server(args.server_pid), procfs::kernel());
    let pacer = Arc::new(Pacer::new(n, args.per_session_rate, args.framed_send));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(echo_client(
                i,
                count,
                args.payload,
                dial.clone(),
                sh.clone(),
                rx.clone(),
                pacer.clone(),
            ))
        })
        .collect();
    let ramp = wait_ramp(&sh, n, args.ramp_timeout).await;
    let ready = sh.ready.load(Relaxed);
    let srv_ready = procfs::server(args.server_pid);
    let me = SelfCpu::start_with(args.server_pid);
    let srv_a = procfs::server(args.server_pid);
    let start = Instant::now() + START_LEAD + START_LEAD_PER_SESSION * n as u32;
    tx.send_replace(Some(start));
    let paced = {
        let (pacer, stop) = (pacer.clone(), sh.stop.clone());
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || pacer.run(start, count, &stop))?
    };
    tokio::time::sleep_until(pacer.due(start, 0, count).into()).await;
    let acked_in_time = pacer.acked.load(Relaxed);
    let expected = count * ready as u64;
    drain(&sh.unique, expected, args.drain).await;
    let srv_b = procfs::server(args.server_pid);
    let util = me.util();
    let other = me.other_util(args.server_pid);
    sh.stop.cancel();
    let _ = tokio::task::spawn_blocking(move || paced.join()).await;
    let outs = collect(handles).await;
    let (acks, op_errors) = outs.iter().fold((0, 0), |(a, e), o| (a + o.1, e + o.2));
    let outs: Vec<ClientOut> = outs.into_iter().map(|o| o.0).collect();
    let ready_outs: Vec<&ClientOut> = outs.iter().filter(|c| c.ready).collect();
    let (unique, dup) = deliveries(&ready_outs);
    let expected = count * ready_outs.len() as u64;
    let lost = expected.saturating_sub(unique);
    let h = sh.hists[0].lock().unwrap().clone();

    let mut m = base(args, n);
    m.insert("payload".into(), args.payload.into());
    m.insert("duration_s".into(), secs.into());
    m.insert("per_session_rate".into(), args.per_session_rate.into());
    m.insert(
        "offered_per_s".into(),
        (n as f64 * args.per_session_rate).round().into(),
    );
    m.insert("ramp".into(), ramp_json(&sh, &dial, n, ramp));
    m.insert("probes_per_session".into(), count.into());
    m.insert("expected".into(), expected.into());
    m.insert("delivered".into(), unique.into());
    m.insert("lost".into(), lost.into());
    m.insert("dup".into(), dup.into());
    m.insert("deliveries_per_s".into(), (unique as f64 / secs).round().into());
    if args.framed_send {
        m.insert("acked".into(), acks.into());
        // Frames the edge accepted (Kafka acknowledged) within the schedule, per second.
        m.insert("acked_per_s".into(), (acked_in_time as f64 / secs).round().into());
        m.insert("op_errors".into(), op_errors.into());
    }
    m.insert("disconnects".into(), sh.disconnected.load(Relaxed).into());
    m.insert("latency".into(), latency(&h));
    let mut server = server_json(srv_a, srv_b, None, unique);
    ready_memory(&mut server, srv0, srv_ready, ready);
    m.insert("server".into(), server);
    m.insert("kernel".into(), kernel_json(k0, procfs::kernel(), ready));
    m.insert("loadgen_cpu_util".into(), util.into());
    m.insert("other_cpu_util".into(), other.into());
    m.insert(
        "ok".into(),
        (lost == 0 && dup == 0 && op_errors == 0 && sh.failed.load(Relaxed) == 0).into(),
    );
    Ok(Value::Object(m))
}
