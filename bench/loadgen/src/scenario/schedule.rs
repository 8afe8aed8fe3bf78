//! The publishing side of a message scenario: warm-up probes, the fixed (open-loop) schedule
//! every counted message is stamped with, and waiting for the deliveries to drain.

use super::measure::Shared;
use crate::payload;
use crate::systems::Publisher;
use crate::Args;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest the warm-up probes go on for.
const WARM_UP_LIMIT: Duration = Duration::from_secs(20);
/// Time between two warm-up probes (ms).
const WARM_UP_PROBE_MS: u64 = 100;
/// Time between two checks of the warm count while waiting for the next probe (ms).
const WARM_UP_POLL_MS: u64 = 10;
/// Time from setting a schedule up to its first message, so that the first is not due already.
const SCHEDULE_LEAD: Duration = Duration::from_millis(2);
/// Most messages one publish call carries when several are due at once.
const MAX_BATCH: usize = 256;
/// How often the drain checks the delivery count.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// Connects the publisher to `endpoint` and runs the warm-up barrier for the `ready`
/// subscribers; returns it, the count of refusals the server reports back to it, and whether
/// every subscriber saw a probe in time.
pub(super) async fn warmed_publisher(
    args: &Args,
    endpoint: &str,
    sh: &Shared,
    ready: usize,
) -> Result<(Publisher, Arc<AtomicU64>, bool)> {
    let errors = Arc::new(AtomicU64::new(0));
    let mut publ = Publisher::connect(args.system(), endpoint, &args.channel, errors.clone())
        .await
        .context("publisher")?;
    let warmed = warm_up(&mut publ, sh, ready, args.payload).await?;
    Ok((publ, errors, warmed))
}

/// Publishes warm-up probes until `expect` clients have seen one ([`WARM_UP_LIMIT`] at most).
async fn warm_up(publ: &mut Publisher, sh: &Shared, expect: usize, size: usize) -> Result<bool> {
    let t = Instant::now();
    while t.elapsed() < WARM_UP_LIMIT {
        publ.publish(&[payload::build(0, sh.ns(Instant::now()), 0, size)])
            .await?;
        for _ in 0..WARM_UP_PROBE_MS / WARM_UP_POLL_MS {
            if sh.warm.load(Relaxed) >= expect {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(WARM_UP_POLL_MS)).await;
        }
    }
    Ok(sh.warm.load(Relaxed) >= expect)
}

/// Publishes `n` messages `seq0..seq0+n` at `rate` msg/s on a fixed schedule. Messages already
/// due are sent together (at most [`MAX_BATCH`] per call); each carries its own scheduled time.
pub(super) async fn schedule(
    publ: &mut Publisher,
    sh: &Shared,
    seq0: u64,
    n: u64,
    rate: f64,
    step: usize,
    size: usize,
) -> Result<()> {
    let start = Instant::now() + SCHEDULE_LEAD;
    let start_ns = sh.ns(start);
    let gap_ns = 1e9 / rate;
    let at = |j: u64| (j as f64 * gap_ns) as u64;
    let mut i = 0u64;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while i < n {
        let now = Instant::now();
        let due = if now < start {
            0
        } else {
            (((now - start).as_nanos() as f64 / gap_ns) as u64 + 1).min(n)
        };
        if due > i {
            let upto = due.min(i + MAX_BATCH as u64);
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
pub(super) async fn drain(counter: &AtomicU64, target: u64, secs: f64) {
    let t = Instant::now();
    while counter.load(Relaxed) < target && t.elapsed().as_secs_f64() < secs {
        tokio::time::sleep(DRAIN_POLL).await;
    }
}
