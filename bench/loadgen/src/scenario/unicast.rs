//! The `unicast` scenario: N sessions, each sending one probe a second that the system routes
//! back to the same socket; the probes are released on time by a pacer thread.

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
}

impl Pacer {
    fn new(n: usize) -> Self {
        Self {
            released: (0..n).map(|_| AtomicU64::new(0)).collect(),
            wake: (0..n).map(|_| tokio::sync::Notify::new()).collect(),
        }
    }

    /// Client `i`'s `k`-th probe is due at `start + phase(i) + k s`.
    fn due(start: Instant, i: usize, n: usize, k: u64) -> Instant {
        start + Duration::from_nanos((i as u64 * 1_000_000_000) / n.max(1) as u64) + Duration::from_secs(k)
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
                let due = Self::due(start, i, n, k);
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
) -> ClientOut {
    let conn = dial
        .connect(i, false, |mut c| async move {
            c.prepare_unicast(i).await?;
            Ok(c)
        })
        .await;
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => return sh.connect_failed(i, e, true),
    };
    let mut rx = Receiver::new(true);
    sh.ready.fetch_add(1, Relaxed);
    let start = tokio::select! {
        _ = sh.stop.cancelled() => None,
        s = start.wait_for(Option::is_some) => s.ok().and_then(|s| *s),
    };
    let Some(start) = start else {
        return ClientOut {
            ready: true,
            healthy: true,
            tally: rx.tally,
        };
    };
    let mut k = 0u64;
    loop {
        // Probes the pacer has released and this client has not sent yet (normally 0 or 1).
        let behind = k < pacer.released[i].load(Relaxed);
        tokio::select! {
            biased;
            _ = sh.stop.cancelled() => break,
            _ = pacer.wake[i].notified(), if k < count && !behind => continue,
            _ = std::future::ready(()), if behind => {
                // Stamped with the scheduled time, not the send time (open loop).
                let due = Pacer::due(start, i, pacer.released.len(), k);
                let p = payload::build(k + 1, sh.ns(due), 0, size);
                if conn.send_unicast(i, p).await.is_err() {
                    sh.disconnected.fetch_add(1, Relaxed);
                    break;
                }
                k += 1;
            }
            r = conn.read(|s| rx.record(&sh, s)) => {
                if let Read::Closed = r {
                    sh.closed();
                    break;
                }
            }
        }
    }
    ClientOut {
        ready: true,
        healthy: true,
        tally: rx.tally,
    }
}

pub(super) async fn unicast(args: &Args, n: usize, duration: f64) -> Result<Value> {
    let sh = Shared::new(1);
    let dial = Dial::new(args)?;
    let count = duration.floor().max(1.0) as u64;
    let (tx, rx) = watch::channel(None);
    let (srv0, k0) = (procfs::server(args.server_pid), procfs::kernel());
    let pacer = Arc::new(Pacer::new(n));
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
    tokio::time::sleep_until((start + Duration::from_secs(count)).into()).await;
    let expected = count * ready as u64;
    drain(&sh.unique, expected, args.drain).await;
    let srv_b = procfs::server(args.server_pid);
    let util = me.util();
    let other = me.other_util(args.server_pid);
    sh.stop.cancel();
    let _ = tokio::task::spawn_blocking(move || paced.join()).await;
    let outs = collect(handles).await;
    let ready_outs: Vec<&ClientOut> = outs.iter().filter(|c| c.ready).collect();
    let (unique, dup) = deliveries(&ready_outs);
    let expected = count * ready_outs.len() as u64;
    let lost = expected.saturating_sub(unique);
    let h = sh.hists[0].lock().unwrap().clone();

    let mut m = base(args, n);
    m.insert("payload".into(), args.payload.into());
    m.insert("duration_s".into(), (count as f64).into());
    m.insert("ramp".into(), ramp_json(&sh, &dial, n, ramp));
    m.insert("probes_per_session".into(), count.into());
    m.insert("expected".into(), expected.into());
    m.insert("delivered".into(), unique.into());
    m.insert("lost".into(), lost.into());
    m.insert("dup".into(), dup.into());
    m.insert("deliveries_per_s".into(), (unique as f64 / count as f64).round().into());
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
        (lost == 0 && dup == 0 && sh.failed.load(Relaxed) == 0).into(),
    );
    Ok(Value::Object(m))
}
