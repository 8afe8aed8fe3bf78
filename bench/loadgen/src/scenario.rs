//! The scenarios. Each returns one JSON object (see `BENCHMARKS.md` for the field list).
//!
//! Common shape of a message scenario:
//! 1. read the server's RSS and kernel memory at rest;
//! 2. ramp: N client tasks connect from round-robin source addresses, at most
//!    `--max-inflight` handshakes (connect + upgrade + subscribe) at a time;
//! 3. warm-up barrier: probes (seq 0, not counted) are published every 100 ms until every
//!    subscriber has seen one, so no subscription is still settling when counting starts;
//! 4. measured phase: the publisher follows its fixed schedule (open loop);
//! 5. drain: wait until every expected delivery arrived or `--drain` seconds passed;
//! 6. loss = expected − distinct received, duplicates counted separately, per client, exactly.
//!
//! `subscribe` and `publish` (in [`split`]) are the two halves of that shape in separate
//! processes, for runs where one process cannot hold every socket (scale-out over several edges).

mod split;

use crate::payload::{self, Stamp, Tally};
use crate::procfs::{self, KernelSample, ServerSample};
use crate::systems::{self, Conn, Publisher, Read, System};
use crate::{Args, Scenario};
use anyhow::{anyhow, Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Highest latency the histograms hold (µs): one hour.
const HIST_MAX_US: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// State every client task shares with the driver.
struct Shared {
    /// Clock origin of every stamp.
    t0: Instant,
    /// Added to every stamp: 0 (stamps are ns since `t0`), or the Unix time of `t0` in ns when
    /// publisher and subscribers run in different processes ([`Shared::new_wall`]).
    origin_ns: u64,
    /// Latency histograms (µs), one per ramp step (one in total outside `hot`).
    hists: Vec<Mutex<Histogram<u64>>>,
    /// Distinct deliveries to healthy clients, per step.
    step_unique: Vec<AtomicU64>,
    /// Distinct deliveries to healthy clients, all steps.
    unique: AtomicU64,
    /// Repeated deliveries to healthy clients, per step.
    step_dup: Vec<AtomicU64>,
    /// Clients that have seen a warm-up probe.
    warm: AtomicUsize,
    ready: AtomicUsize,
    failed: AtomicUsize,
    /// Ready clients whose connection ended before the end of the run.
    disconnected: AtomicUsize,
    first_error: Mutex<Option<String>>,
    /// End of the run: clients stop reading and return their tallies.
    stop: CancellationToken,
    /// Slow clients stop reading when this is cancelled.
    slow_stop: CancellationToken,
}

impl Shared {
    fn new(steps: usize) -> Arc<Self> {
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
    fn new_wall(steps: usize) -> Arc<Self> {
        let mut sh = Self::new(steps);
        let me = Arc::get_mut(&mut sh).expect("fresh Arc");
        me.t0 = Instant::now();
        // Read right after `t0`: the two clocks are paired to within a few hundred ns.
        me.origin_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        sh
    }

    fn ns(&self, at: Instant) -> u64 {
        self.origin_ns + at.duration_since(self.t0).as_nanos() as u64
    }

    fn fail(&self, e: anyhow::Error) {
        self.failed.fetch_add(1, Relaxed);
        let mut f = self.first_error.lock().unwrap();
        if f.is_none() {
            *f = Some(format!("{e:#}"));
        }
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap().clone()
    }
}

/// One client's receive accounting.
struct Receiver {
    tally: Tally,
    warm: bool,
    /// Slow clients are left out of the healthy figures.
    healthy: bool,
}

impl Receiver {
    fn new(healthy: bool) -> Self {
        Self {
            tally: Tally::default(),
            warm: false,
            healthy,
        }
    }

    fn record(&mut self, sh: &Shared, s: Stamp) {
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
struct ClientOut {
    ready: bool,
    healthy: bool,
    tally: Tally,
}

/// Where and how clients connect.
struct Dial {
    system: System,
    url: String,
    dst: SocketAddr,
    sources: Vec<IpAddr>,
    channel: String,
    sem: Semaphore,
    rcvbuf_slow: u32,
    retries: usize,
    /// Connection attempts that failed and were retried.
    retried: AtomicUsize,
}

impl Dial {
    fn new(args: &Args) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            system: args.system(),
            url: args.url.clone(),
            dst: systems::target_addr(&args.url)?,
            sources: args.sources.clone(),
            channel: args.channel.clone(),
            sem: Semaphore::new(args.max_inflight.max(1)),
            rcvbuf_slow: args.slow_rcvbuf,
            retries: args.retries,
            retried: AtomicUsize::new(0),
        }))
    }

    fn source(&self, i: usize) -> IpAddr {
        self.sources[i % self.sources.len()]
    }

    /// Connects client `i` and runs `prepare` on it, holding a ramp permit per attempt. A failed
    /// attempt is retried (`--retries`, growing back-off) and counted in `retries`.
    async fn connect<F, Fut>(&self, i: usize, slow: bool, prepare: F) -> Result<Conn>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<Conn>>,
    {
        let rcvbuf = slow.then_some(self.rcvbuf_slow);
        let mut attempt = 0;
        loop {
            let res = {
                let _permit = self.sem.acquire().await?;
                let fut = async {
                    let ws = crate::ws::Ws::open(&self.url, self.dst, self.source(i), rcvbuf).await?;
                    prepare(Conn::new(ws, self.system)).await
                };
                tokio::time::timeout(Duration::from_secs(30), fut)
                    .await
                    .map_err(|_| anyhow!("connect + subscribe took over 30 s"))
                    .and_then(|r| r)
            };
            match res {
                Ok(c) => return Ok(c),
                Err(e) if attempt >= self.retries => return Err(e),
                Err(_) => {
                    attempt += 1;
                    self.retried.fetch_add(1, Relaxed);
                    let jitter = (i as u64 * 7919) % 100;
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64 + jitter)).await;
                }
            }
        }
    }
}

fn is_slow(i: usize, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let every = (1.0 / fraction).round().max(1.0) as usize;
    i % every == every - 1
}

/// A subscriber: connect, subscribe, then read until the end of the run (a slow one stops
/// reading when `slow_stop` fires but keeps its socket open).
async fn subscriber(i: usize, slow: bool, dial: Arc<Dial>, sh: Arc<Shared>) -> ClientOut {
    let channel = dial.channel.as_str();
    let conn = dial
        .connect(i, slow, |mut c| async move {
            c.subscribe(channel).await?;
            Ok(c)
        })
        .await;
    let mut rx = Receiver::new(!slow);
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            sh.fail(e.context(format!("client {i}")));
            return ClientOut {
                ready: false,
                healthy: !slow,
                tally: rx.tally,
            };
        }
    };
    sh.ready.fetch_add(1, Relaxed);
    loop {
        tokio::select! {
            biased;
            _ = sh.stop.cancelled() => break,
            _ = sh.slow_stop.cancelled(), if slow => {
                sh.stop.cancelled().await;
                break;
            }
            r = conn.read(|s| rx.record(&sh, s)) => {
                if let Read::Closed = r {
                    if !sh.stop.is_cancelled() {
                        sh.disconnected.fetch_add(1, Relaxed);
                    }
                    break;
                }
            }
        }
    }
    ClientOut {
        ready: true,
        healthy: !slow,
        tally: rx.tally,
    }
}

/// Waits until every client is ready or failed, or the ramp timeout; returns seconds taken.
async fn wait_ramp(sh: &Shared, n: usize, timeout: f64) -> f64 {
    let t = Instant::now();
    while sh.ready.load(Relaxed) + sh.failed.load(Relaxed) < n && t.elapsed().as_secs_f64() < timeout {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed().as_secs_f64()
}

/// Publishes warm-up probes until `expect` clients have seen one (20 s at most).
async fn warm_up(publ: &mut Publisher, sh: &Shared, expect: usize, size: usize) -> Result<bool> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        publ.publish(&[payload::build(0, sh.ns(Instant::now()), 0, size)])
            .await?;
        for _ in 0..10 {
            if sh.warm.load(Relaxed) >= expect {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(sh.warm.load(Relaxed) >= expect)
}

/// Publishes `n` messages `seq0..seq0+n` at `rate` msg/s on a fixed schedule. Messages already
/// due are sent together (at most 256 per call); each carries its own scheduled time.
async fn schedule(
    publ: &mut Publisher,
    sh: &Shared,
    seq0: u64,
    n: u64,
    rate: f64,
    step: usize,
    size: usize,
) -> Result<()> {
    let start = Instant::now() + Duration::from_millis(2);
    let start_ns = sh.ns(start);
    let gap_ns = 1e9 / rate;
    let at = |j: u64| (j as f64 * gap_ns) as u64;
    let mut i = 0u64;
    let mut batch = Vec::with_capacity(256);
    while i < n {
        let now = Instant::now();
        let due = if now < start {
            0
        } else {
            (((now - start).as_nanos() as f64 / gap_ns) as u64 + 1).min(n)
        };
        if due > i {
            let upto = due.min(i + 256);
            batch.clear();
            for j in i..upto {
                batch.push(payload::build(seq0 + j, start_ns + at(j), step, size));
            }
            publ.publish(&batch).await?;
            i = upto;
        } else {
            let next = start + Duration::from_nanos(at(i));
            tokio::time::sleep_until(next.into()).await;
        }
    }
    Ok(())
}

/// Waits until `counter` reaches `target` or `secs` pass.
async fn drain(counter: &AtomicU64, target: u64, secs: f64) {
    let t = Instant::now();
    while counter.load(Relaxed) < target && t.elapsed().as_secs_f64() < secs {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn latency(h: &Histogram<u64>) -> Value {
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

fn base(args: &Args, n: usize) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("system".into(), args.system().name().into());
    m.insert("scenario".into(), args.scenario.name().into());
    m.insert("tag".into(), args.tag.clone().into());
    m.insert("connections".into(), n.into());
    m
}

fn server_json(before: ServerSample, after: ServerSample, per_conn_n: Option<usize>, deliveries: u64) -> Value {
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

fn kernel_json(before: KernelSample, after: KernelSample, n: usize) -> Value {
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
struct SelfCpu(u64, Instant, u64, u64);

impl SelfCpu {
    fn start_with(server: Option<u32>) -> Self {
        SelfCpu(
            procfs::self_cpu_us(),
            Instant::now(),
            procfs::machine_busy_us(),
            procfs::server(server).cpu_us,
        )
    }
    fn wall_us(&self) -> f64 {
        (self.1.elapsed().as_secs_f64() * 1e6).max(1.0)
    }
    fn util(&self) -> f64 {
        let us = procfs::self_cpu_us().saturating_sub(self.0) as f64;
        ((us / self.wall_us()) * 1000.0).round() / 1000.0
    }
    /// Machine busy time not used by this process or the server tree, per wall time.
    fn other_util(&self, server: Option<u32>) -> f64 {
        let machine = procfs::machine_busy_us().saturating_sub(self.2) as f64;
        let me = procfs::self_cpu_us().saturating_sub(self.0) as f64;
        let srv = procfs::server(server).cpu_us.saturating_sub(self.3) as f64;
        (((machine - me - srv).max(0.0) / self.wall_us()) * 1000.0).round() / 1000.0
    }
}

pub(crate) async fn run(args: &Args) -> Result<Value> {
    let n = args.connections.unwrap_or_else(|| args.scenario.default_connections());
    let duration = args.duration.unwrap_or_else(|| args.scenario.default_duration());
    match args.scenario {
        Scenario::Idle => idle(args, n, duration).await,
        Scenario::Dash | Scenario::Slow => dash(args, n, duration).await,
        Scenario::Hot => hot(args, n).await,
        Scenario::Unicast => unicast(args, n, duration).await,
        Scenario::Handshake => handshake(args, n).await,
        Scenario::Subscribe => split::subscribe(args, n).await,
        Scenario::Publish => split::publish(args).await,
        Scenario::Sample => unreachable!("main runs the sampler, outside the runtime"),
    }
}

/// Starts `n` subscribers; returns their handles once all are ready (or the ramp timed out).
async fn start_subscribers(
    args: &Args,
    n: usize,
    sh: &Arc<Shared>,
    slow_fraction: f64,
) -> Result<(Vec<JoinHandle<ClientOut>>, f64, Arc<Dial>)> {
    let dial = Dial::new(args)?;
    let handles = (0..n)
        .map(|i| tokio::spawn(subscriber(i, is_slow(i, slow_fraction), dial.clone(), sh.clone())))
        .collect();
    let ramp = wait_ramp(sh, n, args.ramp_timeout).await;
    Ok((handles, ramp, dial))
}

async fn collect(handles: Vec<JoinHandle<ClientOut>>) -> Vec<ClientOut> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(c) = h.await {
            out.push(c);
        }
    }
    out
}

fn ramp_json(sh: &Shared, dial: &Dial, n: usize, secs: f64) -> Value {
    json!({
        "retried": dial.retried.load(Relaxed),
        "ready": sh.ready.load(Relaxed),
        "failed": sh.failed.load(Relaxed),
        "secs": (secs * 1000.0).round() / 1000.0,
        "connects_per_s": (sh.ready.load(Relaxed) as f64 / secs.max(1e-9)).round(),
        "first_error": sh.first_error(),
        "requested": n,
    })
}

async fn idle(args: &Args, n: usize, duration: f64) -> Result<Value> {
    let sh = Shared::new(1);
    let (srv0, k0) = (procfs::server(args.server_pid), procfs::kernel());
    let (handles, ramp, dial) = start_subscribers(args, n, &sh, 0.0).await?;
    let ready = sh.ready.load(Relaxed);
    let hold_cpu = procfs::server(args.server_pid);
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    let (srv1, k1) = (procfs::server(args.server_pid), procfs::kernel());
    let mut m = base(args, n);
    m.insert("duration_s".into(), duration.into());
    m.insert("ramp".into(), ramp_json(&sh, &dial, n, ramp));
    m.insert("disconnects".into(), sh.disconnected.load(Relaxed).into());
    let mut server = server_json(srv0, srv1, Some(ready), 0);
    server["hold_cpu_us"] = json!(srv1.cpu_us.saturating_sub(hold_cpu.cpu_us));
    m.insert("server".into(), server);
    m.insert("kernel".into(), kernel_json(k0, k1, ready));
    let failed = sh.failed.load(Relaxed);
    let disc = sh.disconnected.load(Relaxed);
    m.insert("ok".into(), (failed == 0 && disc == 0).into());
    sh.stop.cancel();
    drop(handles);
    Ok(Value::Object(m))
}

async fn dash(args: &Args, n: usize, duration: f64) -> Result<Value> {
    let slow_fraction = if args.scenario == Scenario::Slow {
        args.slow_fraction
    } else {
        0.0
    };
    let endpoint = args
        .publish
        .as_deref()
        .context("--publish is required for this scenario")?;
    let sh = Shared::new(1);
    let (srv0, k0) = (procfs::server(args.server_pid), procfs::kernel());
    let (handles, ramp, dial) = start_subscribers(args, n, &sh, slow_fraction).await?;
    let ready = sh.ready.load(Relaxed);
    let pub_errors = Arc::new(AtomicU64::new(0));
    let mut publ = Publisher::connect(args.system(), endpoint, &args.channel, pub_errors.clone())
        .await
        .context("publisher")?;
    let warmed = warm_up(&mut publ, &sh, ready, args.payload).await?;
    let srv_ready = procfs::server(args.server_pid);
    let k_ready = procfs::kernel();

    let me = SelfCpu::start_with(args.server_pid);
    let srv_a = procfs::server(args.server_pid);
    let t = Instant::now();
    if slow_fraction > 0.0 {
        let slow = sh.slow_stop.clone();
        let after = args.slow_after;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(after)).await;
            slow.cancel();
        });
    }
    let count = (args.rate * duration).round() as u64;
    schedule(&mut publ, &sh, 1, count, args.rate, 0, args.payload).await?;
    let publish_secs = t.elapsed().as_secs_f64();
    let healthy_ready = count_healthy_ready(n, ready, slow_fraction);
    let expected = count * healthy_ready as u64;
    drain(&sh.unique, expected, args.drain).await;
    let srv_b = procfs::server(args.server_pid);
    let util = me.util();
    let other = me.other_util(args.server_pid);
    sh.stop.cancel();
    let outs = collect(handles).await;

    let healthy: Vec<&ClientOut> = outs.iter().filter(|c| c.ready && c.healthy).collect();
    let unique: u64 = healthy.iter().map(|c| c.tally.unique).sum();
    let dup: u64 = healthy.iter().map(|c| c.tally.dup).sum();
    let expected = count * healthy.len() as u64;
    let lost = expected.saturating_sub(unique);
    let h = sh.hists[0].lock().unwrap().clone();

    let mut m = base(args, n);
    m.insert("payload".into(), args.payload.into());
    m.insert("rate".into(), args.rate.into());
    m.insert("duration_s".into(), duration.into());
    m.insert("ramp".into(), ramp_json(&sh, &dial, n, ramp));
    m.insert("warmed".into(), warmed.into());
    m.insert("published".into(), count.into());
    m.insert("publish_errors".into(), pub_errors.load(Relaxed).into());
    m.insert("publish_secs".into(), publish_secs.into());
    m.insert("healthy_clients".into(), healthy.len().into());
    m.insert("expected".into(), expected.into());
    m.insert("delivered".into(), unique.into());
    m.insert("lost".into(), lost.into());
    m.insert("dup".into(), dup.into());
    m.insert(
        "deliveries_per_s".into(),
        (unique as f64 / duration.max(1e-9)).round().into(),
    );
    m.insert("disconnects".into(), sh.disconnected.load(Relaxed).into());
    m.insert("latency".into(), latency(&h));
    let mut server = server_json(srv_a, srv_b, None, unique);
    // Memory at rest vs with N connected, and growth during the measured phase (slow clients'
    // backlog shows up here).
    server["rss_at_rest"] = json!(srv0.rss);
    server["rss_ready"] = json!(srv_ready.rss);
    server["rss_per_conn"] = json!((srv_ready.rss as f64 - srv0.rss as f64) / ready.max(1) as f64);
    server["rss_growth"] = json!(srv_b.rss as f64 - srv_a.rss as f64);
    m.insert("server".into(), server);
    m.insert("kernel".into(), kernel_json(k0, k_ready, ready));
    m.insert("loadgen_cpu_util".into(), util.into());
    m.insert("other_cpu_util".into(), other.into());
    if slow_fraction > 0.0 {
        let slow: Vec<&ClientOut> = outs.iter().filter(|c| c.ready && !c.healthy).collect();
        m.insert(
            "slow".into(),
            json!({
                "clients": slow.len(),
                "after_s": args.slow_after,
                "rcvbuf": args.slow_rcvbuf,
                "delivered": slow.iter().map(|c| c.tally.unique).sum::<u64>(),
            }),
        );
    }
    let ok = lost == 0 && dup == 0 && sh.failed.load(Relaxed) == 0 && pub_errors.load(Relaxed) == 0 && warmed;
    m.insert("ok".into(), ok.into());
    Ok(Value::Object(m))
}

/// Healthy clients among the ready ones, for the drain target. Exact when every client
/// connected; otherwise an upper bound (the final figures are recounted from the tallies).
fn count_healthy_ready(n: usize, ready: usize, slow_fraction: f64) -> usize {
    let slow = (0..n).filter(|i| is_slow(*i, slow_fraction)).count();
    ready.saturating_sub(slow)
}

async fn hot(args: &Args, n: usize) -> Result<Value> {
    let endpoint = args
        .publish
        .as_deref()
        .context("--publish is required for this scenario")?;
    let steps = &args.hot_steps;
    let sh = Shared::new(steps.len());
    let (handles, ramp, dial) = start_subscribers(args, n, &sh, 0.0).await?;
    let ready = sh.ready.load(Relaxed);
    let pub_errors = Arc::new(AtomicU64::new(0));
    let mut publ = Publisher::connect(args.system(), endpoint, &args.channel, pub_errors.clone())
        .await
        .context("publisher")?;
    let warmed = warm_up(&mut publ, &sh, ready, args.payload).await?;

    let mut seq = 1u64;
    let mut step_out = Vec::new();
    let mut best: Option<(f64, f64)> = None;
    let mut limit: Option<&str> = None;
    let mut best_sustained: Option<(f64, f64)> = None;
    for (k, &rate) in steps.iter().enumerate() {
        let count = (rate * args.step_secs).round() as u64;
        let me = SelfCpu::start_with(args.server_pid);
        let srv_a = procfs::server(args.server_pid);
        let errs_a = pub_errors.load(Relaxed);
        schedule(&mut publ, &sh, seq, count, rate, k, args.payload).await?;
        // Utilisations over the publishing window (the drain below would dilute them).
        let (lg_util, other) = (me.util(), me.other_util(args.server_pid));
        let srv_util = procfs::server(args.server_pid).cpu_us.saturating_sub(srv_a.cpu_us) as f64 / me.wall_us();
        let srv_util = (srv_util * 1000.0).round() / 1000.0;
        let expected = count * ready as u64;
        drain(&sh.step_unique[k], expected, args.drain).await;
        let srv_b = procfs::server(args.server_pid);
        let got = sh.step_unique[k].load(Relaxed);
        let h = sh.hists[k].lock().unwrap().clone();
        let lost = expected.saturating_sub(got);
        let p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
        let sustained = lost == 0 && p99_ms <= args.sustain_p99_ms && pub_errors.load(Relaxed) == errs_a && got > 0;
        let pass = sustained && p99_ms <= args.p99_limit_ms;
        let cpu = srv_b.cpu_us.saturating_sub(srv_a.cpu_us);
        step_out.push(json!({
            "rate": rate,
            "published": count,
            "expected": expected,
            "delivered": got,
            "lost": lost,
            "deliveries_per_s": (got as f64 / args.step_secs).round(),
            "latency": latency(&h),
            "server_cpu_us": cpu,
            "cpu_us_per_delivery": if got > 0 { json!(cpu as f64 / got as f64) } else { Value::Null },
            "loadgen_cpu_util": lg_util,
            "server_cpu_util": srv_util,
            "other_cpu_util": other,
            "pass": pass,
            "sustained": sustained,
        }));
        if !pass && limit.is_none() {
            // Who ran out of CPU at the first failing step (both pinned to one core each).
            limit = Some(if lg_util >= 0.9 && srv_util >= 0.9 {
                "both saturated"
            } else if lg_util >= 0.9 {
                "loadgen"
            } else if srv_util >= 0.9 {
                "server"
            } else {
                "neither saturated"
            });
        }
        seq += count;
        // The rule: the highest step passed before the first failing one.
        if pass && limit.is_none() {
            best = Some((rate, rate * ready as f64));
        }
        if sustained {
            best_sustained = Some((rate, rate * ready as f64));
        } else if !args.keep_ramping {
            break;
        }
    }
    sh.stop.cancel();
    let outs = collect(handles).await;
    let dup: u64 = outs.iter().map(|c| c.tally.dup).sum();

    let mut m = base(args, n);
    m.insert("payload".into(), args.payload.into());
    m.insert("step_secs".into(), args.step_secs.into());
    m.insert("p99_limit_ms".into(), args.p99_limit_ms.into());
    m.insert("ramp".into(), ramp_json(&sh, &dial, n, ramp));
    m.insert("warmed".into(), warmed.into());
    m.insert("publish_errors".into(), pub_errors.load(Relaxed).into());
    m.insert("dup".into(), dup.into());
    m.insert("disconnects".into(), sh.disconnected.load(Relaxed).into());
    m.insert("steps".into(), Value::Array(step_out.clone()));
    let best_step = best.and_then(|(r, _)| step_out.iter().find(|s| s["rate"].as_f64() == Some(r)).cloned());
    m.insert("limit".into(), limit.unwrap_or("no step failed").into());
    m.insert("best_rate".into(), best.map(|b| b.0).into());
    m.insert("best_deliveries_per_s".into(), best.map(|b| b.1).into());
    m.insert("sustain_p99_ms".into(), args.sustain_p99_ms.into());
    m.insert("sustained_rate".into(), best_sustained.map(|b| b.0).into());
    m.insert("sustained_deliveries_per_s".into(), best_sustained.map(|b| b.1).into());
    if let Some(s) = &best_step {
        m.insert("latency".into(), s["latency"].clone());
        m.insert(
            "server".into(),
            json!({"cpu_us_per_delivery": s["cpu_us_per_delivery"].clone()}),
        );
        m.insert("loadgen_cpu_util".into(), s["loadgen_cpu_util"].clone());
        m.insert("other_cpu_util".into(), s["other_cpu_util"].clone());
    }
    m.insert(
        "ok".into(),
        (best.is_some() && dup == 0 && sh.failed.load(Relaxed) == 0 && warmed).into(),
    );
    Ok(Value::Object(m))
}

/// A unicast session: sends probe `k` at `start + phase + k s` and records each echo.
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
    let mut rx = Receiver::new(true);
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            sh.fail(e.context(format!("client {i}")));
            return ClientOut {
                ready: false,
                healthy: true,
                tally: rx.tally,
            };
        }
    };
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
                    if !sh.stop.is_cancelled() {
                        sh.disconnected.fetch_add(1, Relaxed);
                    }
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

async fn unicast(args: &Args, n: usize, duration: f64) -> Result<Value> {
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
    // Every client must be waiting for its first probe before the first is due: waking 16,000
    // tasks takes the load generator a few hundred ms (measured: with 100 ms, the first
    // second's probes queued behind the wake-ups and made the p99).
    let start = Instant::now() + Duration::from_millis(100) + Duration::from_micros(60) * n as u32;
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
    let unique: u64 = ready_outs.iter().map(|c| c.tally.unique).sum();
    let dup: u64 = ready_outs.iter().map(|c| c.tally.dup).sum();
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
    server["rss_at_rest"] = json!(srv0.rss);
    server["rss_ready"] = json!(srv_ready.rss);
    server["rss_per_conn"] = json!((srv_ready.rss as f64 - srv0.rss as f64) / ready.max(1) as f64);
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

async fn handshake(args: &Args, n: usize) -> Result<Value> {
    let dial = Dial::new(args)?;
    let next = Arc::new(AtomicUsize::new(0));
    let hist = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(AtomicUsize::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let srv_a = procfs::server(args.server_pid);
    let me = SelfCpu::start_with(args.server_pid);
    let t = Instant::now();
    let connectors: Vec<JoinHandle<Vec<tokio::net::TcpStream>>> = (0..args.connectors.max(1))
        .map(|_| {
            let (dial, next, hist, errors, first_error) = (
                dial.clone(),
                next.clone(),
                hist.clone(),
                errors.clone(),
                first_error.clone(),
            );
            tokio::spawn(async move {
                // Upgraded sockets are kept open until every connector is done.
                let mut held = Vec::new();
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= n {
                        return held;
                    }
                    let t = Instant::now();
                    let r = tokio::time::timeout(
                        Duration::from_secs(30),
                        systems::upgrade_raw(&dial.url, dial.dst, dial.source(i), None),
                    )
                    .await
                    .map_err(|_| anyhow!("upgrade took over 30 s"))
                    .and_then(|r| r);
                    match r {
                        Ok((ws, _)) => {
                            let us = t.elapsed().as_micros() as u64;
                            hist.lock().unwrap().saturating_record(us.max(1));
                            held.push(ws);
                        }
                        Err(e) => {
                            errors.fetch_add(1, Relaxed);
                            let mut f = first_error.lock().unwrap();
                            if f.is_none() {
                                *f = Some(format!("{e:#}"));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut held = 0;
    for c in connectors {
        held += c.await.map(|v| v.len()).unwrap_or(0);
    }
    let secs = t.elapsed().as_secs_f64();
    let srv_b = procfs::server(args.server_pid);
    let h = hist.lock().unwrap().clone();
    let errs = errors.load(Relaxed);
    let mut m = base(args, n);
    m.insert("connectors".into(), args.connectors.into());
    m.insert("upgraded".into(), held.into());
    m.insert("errors".into(), errs.into());
    m.insert("first_error".into(), first_error.lock().unwrap().clone().into());
    m.insert("secs".into(), secs.into());
    m.insert("upgrades_per_s".into(), (held as f64 / secs.max(1e-9)).round().into());
    m.insert("latency".into(), latency(&h));
    m.insert("server".into(), server_json(srv_a, srv_b, Some(held), held as u64));
    m.insert("loadgen_cpu_util".into(), me.util().into());
    m.insert("other_cpu_util".into(), me.other_util(args.server_pid).into());
    m.insert("ok".into(), (errs == 0 && held == n).into());
    Ok(Value::Object(m))
}
