//! What every scenario measures with: the state client tasks share with the driver, each
//! client's receive accounting, latency histograms, and the readings of the server, the kernel
//! and the load generator's own CPU turned into the result's JSON fields.

use crate::payload::{Stamp, Tally};
use crate::procfs::{self, KernelSample, ServerSample};
use crate::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Highest latency the histograms hold (µs): one hour.
const HIST_MAX_US: u64 = 3_600_000_000;
/// Significant decimal digits the histograms keep (values within 0.1 % of what was recorded).
const HIST_SIGFIGS: u8 = 3;

pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIGS).expect("valid histogram bounds")
}

/// State every client task shares with the driver.
pub(super) struct Shared {
    /// Clock origin of every stamp.
    t0: Instant,
    /// Added to every stamp: 0 (stamps are ns since `t0`), or the Unix time of `t0` in ns when
    /// publisher and subscribers run in different processes ([`Shared::new_wall`]).
    origin_ns: u64,
    /// Latency histograms (µs), one per ramp step (one in total outside `hot`).
    pub(super) hists: Vec<Mutex<Histogram<u64>>>,
    /// Distinct deliveries to healthy clients, per step.
    pub(super) step_unique: Vec<AtomicU64>,
    /// Distinct deliveries to healthy clients, all steps.
    pub(super) unique: AtomicU64,
    /// Repeated deliveries to healthy clients, per step.
    pub(super) step_dup: Vec<AtomicU64>,
    /// Clients that have seen a warm-up probe.
    pub(super) warm: AtomicUsize,
    pub(super) ready: AtomicUsize,
    pub(super) failed: AtomicUsize,
    /// Ready clients whose connection ended before the end of the run.
    pub(super) disconnected: AtomicUsize,
    first_error: Mutex<Option<String>>,
    /// End of the run: clients stop reading and return their tallies.
    pub(super) stop: CancellationToken,
    /// Slow clients stop reading when this is cancelled.
    pub(super) slow_stop: CancellationToken,
}

impl Shared {
    pub(super) fn new(steps: usize) -> Arc<Self> {
        Arc::new(Self {
            t0: Instant::now(),
            origin_ns: 0,
            hists: (0..steps.max(1)).map(|_| Mutex::new(histogram())).collect(),
            step_unique: (0..steps.max(1)).map(|_| AtomicU64::new(0)).collect(),
            unique: AtomicU64::new(0),
            step_dup: (0..steps.max(1)).map(|_| AtomicU64::new(0)).collect(),
            warm: AtomicUsize::new(0),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            disconnected: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            stop: CancellationToken::new(),
            slow_stop: CancellationToken::new(),
        })
    }

    /// Like [`Shared::new`], but stamps are Unix-epoch nanoseconds (`CLOCK_REALTIME`), which
    /// another process on the same machine can compare with its own.
    pub(super) fn new_wall(steps: usize) -> Arc<Self> {
        let mut sh = Self::new(steps);
        let me = Arc::get_mut(&mut sh).expect("fresh Arc");
        me.t0 = Instant::now();
        // Read right after `t0`: the two clocks are paired to within a few hundred ns.
        me.origin_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        sh
    }

    pub(super) fn ns(&self, at: Instant) -> u64 {
        self.origin_ns + at.duration_since(self.t0).as_nanos() as u64
    }

    pub(super) fn fail(&self, e: anyhow::Error) {
        self.failed.fetch_add(1, Relaxed);
        let mut f = self.first_error.lock().unwrap();
        if f.is_none() {
            *f = Some(format!("{e:#}"));
        }
    }

    /// Client `i` could not connect: counts the failure and returns its (empty) result.
    pub(super) fn connect_failed(&self, i: usize, e: anyhow::Error, healthy: bool) -> ClientOut {
        self.fail(e.context(format!("client {i}")));
        ClientOut {
            ready: false,
            healthy,
            tally: Tally::default(),
        }
    }

    /// A ready client's connection ended: a disconnect, unless the run is ending.
    pub(super) fn closed(&self) {
        if !self.stop.is_cancelled() {
            self.disconnected.fetch_add(1, Relaxed);
        }
    }

    pub(super) fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap().clone()
    }
}

/// One client's receive accounting.
pub(super) struct Receiver {
    pub(super) tally: Tally,
    warm: bool,
    /// Slow clients are left out of the healthy figures.
    healthy: bool,
}

impl Receiver {
    pub(super) fn new(healthy: bool) -> Self {
        Self {
            tally: Tally::default(),
            warm: false,
            healthy,
        }
    }

    pub(super) fn record(&mut self, sh: &Shared, s: Stamp) {
        if s.seq == 0 {
            if !self.warm {
                self.warm = true;
                sh.warm.fetch_add(1, Relaxed);
            }
            return;
        }
        let new = self.tally.mark(s.seq);
        if !self.healthy {
            return;
        }
        let step = s.step.min(sh.hists.len() - 1);
        let lat_us = sh.ns(Instant::now()).saturating_sub(s.sched_ns) / 1000;
        sh.hists[step].lock().unwrap().saturating_record(lat_us.max(1));
        if new {
            sh.unique.fetch_add(1, Relaxed);
            sh.step_unique[step].fetch_add(1, Relaxed);
        } else {
            sh.step_dup[step].fetch_add(1, Relaxed);
        }
    }
}

/// What a client task hands back at the end.
pub(super) struct ClientOut {
    pub(super) ready: bool,
    pub(super) healthy: bool,
    pub(super) tally: Tally,
}

/// Distinct and repeated deliveries, summed over `clients`.
pub(super) fn deliveries(clients: &[&ClientOut]) -> (u64, u64) {
    (
        clients.iter().map(|c| c.tally.unique).sum(),
        clients.iter().map(|c| c.tally.dup).sum(),
    )
}

/// `x` rounded to three decimals: the resolution of the seconds and utilisations reported.
pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(super) fn latency(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": (h.mean() * 10.0).round() / 10.0,
    })
}

pub(super) fn base(args: &Args, n: usize) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("system".into(), args.system().name().into());
    m.insert("scenario".into(), args.scenario.name().into());
    m.insert("tag".into(), args.tag.clone().into());
    m.insert("connections".into(), n.into());
    m
}

pub(super) fn server_json(
    before: ServerSample,
    after: ServerSample,
    per_conn_n: Option<usize>,
    deliveries: u64,
) -> Value {
    let cpu = after.cpu_us.saturating_sub(before.cpu_us);
    let mut v = json!({
        "processes": after.processes,
        "rss_before": before.rss,
        "rss_after": after.rss,
        "rss_anon_before": before.rss_anon,
        "rss_anon_after": after.rss_anon,
        "cpu_us": cpu,
        "cpu_us_per_delivery": if deliveries > 0 { json!(cpu as f64 / deliveries as f64) } else { Value::Null },
    });
    if let Some(n) = per_conn_n.filter(|n| *n > 0) {
        v["rss_per_conn"] = json!((after.rss as f64 - before.rss as f64) / n as f64);
        v["rss_anon_per_conn"] = json!((after.rss_anon as f64 - before.rss_anon as f64) / n as f64);
    }
    v
}

/// Adds the server's RSS at rest, with the `ready` clients connected, and the growth per
/// client (`rss_at_rest`, `rss_ready`, `rss_per_conn`) to a [`server_json`] object.
pub(super) fn ready_memory(server: &mut Value, at_rest: ServerSample, with_ready: ServerSample, ready: usize) {
    server["rss_at_rest"] = json!(at_rest.rss);
    server["rss_ready"] = json!(with_ready.rss);
    server["rss_per_conn"] = json!((with_ready.rss as f64 - at_rest.rss as f64) / ready.max(1) as f64);
}

pub(super) fn kernel_json(before: KernelSample, after: KernelSample, n: usize) -> Value {
    let d = |a: u64, b: u64| a as f64 - b as f64;
    let n = n.max(1) as f64;
    json!({
        "slab_delta": d(after.slab, before.slab),
        "tcp_mem_delta": d(after.tcp_mem, before.tcp_mem),
        "tcp_sockets_delta": d(after.tcp_inuse, before.tcp_inuse),
        // Both ends of every loopback connection are in this kernel: these include the load
        // generator's client sockets too.
        "slab_per_conn": d(after.slab, before.slab) / n,
        "tcp_mem_per_conn": d(after.tcp_mem, before.tcp_mem) / n,
    })
}

/// CPU utilisation over a phase (1.0 = one core busy): of the load generator, and of
/// everything else on the machine that is neither the load generator nor the server (another
/// workload, plus kernel work not charged to either process): the noise indicator.
pub(super) struct SelfCpu(u64, Instant, u64, u64);

impl SelfCpu {
    pub(super) fn start_with(server: Option<u32>) -> Self {
        SelfCpu(
            procfs::self_cpu_us(),
            Instant::now(),
            procfs::machine_busy_us(),
            procfs::server(server).cpu_us,
        )
    }
    pub(super) fn wall_us(&self) -> f64 {
        (self.1.elapsed().as_secs_f64() * 1e6).max(1.0)
    }
    pub(super) fn util(&self) -> f64 {
        let us = procfs::self_cpu_us().saturating_sub(self.0) as f64;
        round3(us / self.wall_us())
    }
    /// Machine busy time not used by this process or the server tree, per wall time.
    pub(super) fn other_util(&self, server: Option<u32>) -> f64 {
        let machine = procfs::machine_busy_us().saturating_sub(self.2) as f64;
        let me = procfs::self_cpu_us().saturating_sub(self.0) as f64;
        let srv = procfs::server(server).cpu_us.saturating_sub(self.3) as f64;
        round3((machine - me - srv).max(0.0) / self.wall_us())
    }
}
