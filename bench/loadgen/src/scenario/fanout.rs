//! The channel fan-out family: `idle` (subscribers held, memory per connection), `dash` and
//! `slow` (one publish rate, some clients that stop reading in `slow`) and `hot` (a ramp of
//! publish rates: the highest step that passes, and the highest that sustains).

use super::clients::{collect, is_slow, ramp_json, start_subscribers};
use super::measure::{
    base, deliveries, kernel_json, latency, ready_memory, round3, server_json, ClientOut, SelfCpu, Shared,
};
use super::schedule::{drain, schedule, warmed_publisher};
use crate::procfs;
use crate::{Args, Scenario};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// CPU utilisation (share of one core) from which a process counts as saturated at the first
/// failing `hot` step.
const SATURATED: f64 = 0.9;

pub(super) async fn idle(args: &Args, n: usize, duration: f64) -> Result<Value> {
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

pub(super) async fn dash(args: &Args, n: usize, duration: f64) -> Result<Value> {
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
    let (mut publ, pub_errors, warmed) = warmed_publisher(args, endpoint, &sh, ready).await?;
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
    let (unique, dup) = deliveries(&healthy);
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
    ready_memory(&mut server, srv0, srv_ready, ready);
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

pub(super) async fn hot(args: &Args, n: usize) -> Result<Value> {
    let endpoint = args
        .publish
        .as_deref()
        .context("--publish is required for this scenario")?;
    let steps = &args.hot_steps;
    let sh = Shared::new(steps.len());
    let (handles, ramp, dial) = start_subscribers(args, n, &sh, 0.0).await?;
    let ready = sh.ready.load(Relaxed);
    let (mut publ, pub_errors, warmed) = warmed_publisher(args, endpoint, &sh, ready).await?;

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
        let srv_util = round3(srv_util);
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
            limit = Some(if lg_util >= SATURATED && srv_util >= SATURATED {
                "both saturated"
            } else if lg_util >= SATURATED {
                "loadgen"
            } else if srv_util >= SATURATED {
                "server"
            } else {
                "neither saturated"
            });
        }
        seq += count;
        // The pass rule: the result is the highest step that passes (zero loss, p99 at most
        // --p99-limit-ms) before the first step that fails it.
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
