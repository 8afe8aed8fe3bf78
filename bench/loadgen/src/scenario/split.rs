//! A message scenario split over processes: `subscribe` holds the subscribers and counts,
//! `publish` sends. Several `subscribe` processes (one per edge: a process holds at most
//! ~19,900 sockets here) and one `publish` process make the scale-out run of
//! `scripts/bench-scaleout`.
//!
//! Both sides are given the same `--hot-steps` and `--step-secs`, so every subscriber knows how
//! many sequence numbers each step has (step k: `round(rate_k × step_secs)` messages, numbered
//! on from 1). Stamps are Unix-epoch nanoseconds ([`Shared::new_wall`]): latency = receive time −
//! the publisher's *scheduled* send time, across processes.
//!
//! Coordination is by files, so any driver (a shell script, Python) can sequence the phases:
//! 1. `subscribe` ramps and rewrites `--status` every 250 ms (`phase`: `ramping`, `ready`,
//!    `warm`, `draining`, `done`; counts of ready, failed, warm, disconnected clients and
//!    distinct deliveries so far);
//! 2. `publish` sends warm-up probes (seq 0, never counted) every `--probe-interval` s until
//!    `--go-file` exists; a subscriber process is `warm` once each of its ready clients saw one;
//! 3. the driver creates the go file once every subscriber process is warm; `publish` runs the
//!    steps (`--step-gap` s of silence before each) and exits with its JSON line;
//! 4. the driver creates `--stop-file`; each `subscribe` waits until every expected delivery
//!    arrived or `--drain` s passed, and exits with its JSON line: per step expected, delivered,
//!    lost, duplicates, latency percentiles and the histogram's recorded values (`hist`:
//!    `[[µs, count], ...]`) so the driver can merge percentiles over processes.

use super::clients::{collect, ramp_json, start_subscribers};
use super::measure::{
    base, deliveries, histogram, kernel_json, latency, ready_memory, round3, server_json, ClientOut, SelfCpu, Shared,
};
use super::schedule::{drain, schedule};
use crate::payload;
use crate::procfs;
use crate::systems::Publisher;
use crate::Args;
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often `subscribe` rewrites its `--status` file.
const STATUS_EVERY: Duration = Duration::from_millis(250);
/// How often `subscribe` looks for the stop file (and whether every client is warm).
const STOP_FILE_POLL: Duration = Duration::from_millis(50);
/// How often `publish` looks for the go file between two warm-up probes.
const GO_FILE_POLL: Duration = Duration::from_millis(20);
/// Shortest `--probe-interval` honoured (s).
const MIN_PROBE_INTERVAL: f64 = 0.01;
/// Time left after the last step for refusals the server reports asynchronously to arrive.
const REFUSAL_GRACE: Duration = Duration::from_millis(500);

/// Recorded values of a histogram as `[[value_µs, count], ...]` (value = the highest value
/// equivalent to the bucket), enough to merge histograms of several processes and take
/// percentiles of the sum.
fn buckets(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded()
            .map(|v| json!([h.highest_equivalent(v.value_iterated_to()), v.count_at_value()]))
            .collect(),
    )
}

/// Writes `v` to `path` atomically (temporary file + rename), ignoring errors: the status file
/// is advisory.
fn write_status(path: Option<&Path>, v: &Value) {
    let Some(path) = path else { return };
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, v.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn step_counts(args: &Args) -> Vec<u64> {
    args.hot_steps
        .iter()
        .map(|r| (r * args.step_secs).round() as u64)
        .collect()
}

/// `subscribe`: N subscribers for a publisher in another process.
pub(super) async fn subscribe(args: &Args, n: usize) -> Result<Value> {
    let counts = step_counts(args);
    let per_client: u64 = counts.iter().sum();
    let t_start = Instant::now();
    let deadline = t_start + Duration::from_secs_f64(args.deadline.max(1.0));
    let sh = Shared::new_wall(counts.len());
    let phase: Arc<Mutex<&'static str>> = Arc::new(Mutex::new("ramping"));
    let ramp_secs = Arc::new(Mutex::new(None::<f64>));
    let status_path = args.status.clone();

    let progress = {
        let (sh, phase, ramp_secs) = (sh.clone(), phase.clone(), ramp_secs.clone());
        move || {
            json!({
                "phase": *phase.lock().unwrap(),
                "requested": n,
                "ready": sh.ready.load(Relaxed),
                "failed": sh.failed.load(Relaxed),
                "warm": sh.warm.load(Relaxed),
                "disconnected": sh.disconnected.load(Relaxed),
                "delivered": sh.unique.load(Relaxed),
                "expected_per_client": per_client,
                "ramp_secs": *ramp_secs.lock().unwrap(),
                "first_error": sh.first_error(),
            })
        }
    };
    let writer = {
        let (progress, path, sh) = (progress.clone(), status_path.clone(), sh.clone());
        tokio::spawn(async move {
            while !sh.stop.is_cancelled() {
                write_status(path.as_deref(), &progress());
                tokio::time::sleep(STATUS_EVERY).await;
            }
        })
    };

    let (srv0, k0) = (procfs::server(args.server_pid), procfs::kernel());
    let (handles, ramp, dial) = start_subscribers(args, n, &sh, 0.0).await?;
    let ready = sh.ready.load(Relaxed);
    let (srv_ready, k_ready) = (procfs::server(args.server_pid), procfs::kernel());
    *ramp_secs.lock().unwrap() = Some(round3(ramp));
    *phase.lock().unwrap() = "ready";
    write_status(status_path.as_deref(), &progress());

    // Warm-up, then the publisher's steps: wait for the stop file.
    let mut warmed = false;
    let mut timed_out = false;
    loop {
        if args.stop_file.as_deref().is_some_and(Path::exists) {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        if !warmed && sh.warm.load(Relaxed) >= ready.saturating_sub(sh.disconnected.load(Relaxed)) {
            warmed = true;
            *phase.lock().unwrap() = "warm";
            write_status(status_path.as_deref(), &progress());
        }
        tokio::time::sleep(STOP_FILE_POLL).await;
    }
    *phase.lock().unwrap() = "draining";
    let me = SelfCpu::start_with(args.server_pid);
    drain(&sh.unique, per_client * ready as u64, args.drain).await;
    let drain_secs = me.wall_us() / 1e6;
    let srv_end = procfs::server(args.server_pid);
    sh.stop.cancel();
    let _ = writer.await;
    let outs = collect(handles).await;

    let ready_outs: Vec<&ClientOut> = outs.iter().filter(|c| c.ready).collect();
    let clients = ready_outs.len() as u64;
    let (unique, dup) = deliveries(&ready_outs);
    let expected = per_client * clients;
    let mut all = histogram();
    let mut steps = Vec::new();
    for (k, (&rate, &count)) in args.hot_steps.iter().zip(&counts).enumerate() {
        let h = sh.hists[k].lock().unwrap().clone();
        all.add(&h).ok();
        let got = sh.step_unique[k].load(Relaxed);
        let exp = count * clients;
        steps.push(json!({
            "rate": rate,
            "published": count,
            "expected": exp,
            "delivered": got,
            "lost": exp.saturating_sub(got),
            "dup": sh.step_dup[k].load(Relaxed),
            "latency": latency(&h),
            "hist": buckets(&h),
        }));
    }

    let mut m = base(args, n);
    m.insert("payload".into(), args.payload.into());
    m.insert("step_secs".into(), args.step_secs.into());
    m.insert("ramp".into(), ramp_json(&sh, &dial, n, ramp));
    m.insert("warmed".into(), warmed.into());
    m.insert("timed_out".into(), timed_out.into());
    m.insert("drain_secs".into(), round3(drain_secs).into());
    m.insert("clients".into(), clients.into());
    m.insert("expected".into(), expected.into());
    m.insert("delivered".into(), unique.into());
    m.insert("lost".into(), expected.saturating_sub(unique).into());
    m.insert("dup".into(), dup.into());
    m.insert("disconnects".into(), sh.disconnected.load(Relaxed).into());
    m.insert("latency".into(), latency(&all));
    m.insert("steps".into(), Value::Array(steps));
    let mut server = server_json(srv0, srv_end, None, unique);
    ready_memory(&mut server, srv0, srv_ready, ready);
    server["ramp_cpu_us"] = json!(srv_ready.cpu_us.saturating_sub(srv0.cpu_us));
    m.insert("server".into(), server);
    m.insert("kernel".into(), kernel_json(k0, k_ready, ready));
    let ok = expected > 0
        && unique == expected
        && dup == 0
        && clients == n as u64
        && sh.disconnected.load(Relaxed) == 0
        && warmed
        && !timed_out;
    m.insert("ok".into(), ok.into());
    *phase.lock().unwrap() = "done";
    write_status(status_path.as_deref(), &progress());
    Ok(Value::Object(m))
}

/// `publish`: probes until `--go-file` exists, then the steps on their fixed schedules.
pub(super) async fn publish(args: &Args) -> Result<Value> {
    let endpoint = args
        .publish
        .as_deref()
        .context("--publish is required for this scenario")?;
    let go = args
        .go_file
        .as_deref()
        .context("--go-file is required for the publish scenario")?;
    let counts = step_counts(args);
    let t = Instant::now();
    let deadline = t + Duration::from_secs_f64(args.deadline.max(1.0));
    let sh = Shared::new_wall(counts.len());
    let errors = Arc::new(AtomicU64::new(0));
    let mut publ = Publisher::connect(args.system(), endpoint, &args.channel, errors.clone())
        .await
        .context("publisher")?;

    let mut probes = 0u64;
    while !go.exists() {
        if Instant::now() >= deadline {
            bail!("{} did not appear within --deadline {} s", go.display(), args.deadline);
        }
        publ.publish(&[payload::build(0, sh.ns(Instant::now()), 0, args.payload)])
            .await?;
        probes += 1;
        let next = Instant::now() + Duration::from_secs_f64(args.probe_interval.max(MIN_PROBE_INTERVAL));
        while Instant::now() < next && !go.exists() {
            tokio::time::sleep(GO_FILE_POLL).await;
        }
    }
    let probe_secs = t.elapsed().as_secs_f64();

    let mut seq = 1u64;
    let mut steps = Vec::new();
    for (k, (&rate, &count)) in args.hot_steps.iter().zip(&counts).enumerate() {
        if args.step_gap > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(args.step_gap)).await;
        }
        let me = SelfCpu::start_with(None);
        let a = Instant::now();
        schedule(&mut publ, &sh, seq, count, rate, k, args.payload).await?;
        let b = Instant::now();
        steps.push(json!({
            "rate": rate,
            "published": count,
            "first_seq": seq,
            "start_unix_ns": sh.ns(a),
            "end_unix_ns": sh.ns(b),
            "secs": (b - a).as_secs_f64(),
            "publisher_cpu_util": me.util(),
        }));
        seq += count;
    }
    tokio::time::sleep(REFUSAL_GRACE).await;

    let mut m = base(args, 0);
    m.insert("channel".into(), args.channel.clone().into());
    m.insert("payload".into(), args.payload.into());
    m.insert("step_secs".into(), args.step_secs.into());
    m.insert("step_gap".into(), args.step_gap.into());
    m.insert("probes".into(), probes.into());
    m.insert("probe_secs".into(), probe_secs.into());
    m.insert("steps".into(), Value::Array(steps));
    m.insert("publish_errors".into(), errors.load(Relaxed).into());
    m.insert("ok".into(), (errors.load(Relaxed) == 0).into());
    Ok(Value::Object(m))
}
