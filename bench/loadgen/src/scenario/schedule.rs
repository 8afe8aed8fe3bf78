//! The publishing side of a message scenario: warm-up probes, the fixed (open-loop) schedule
//! every counted message is stamped with, and waiting for the deliveries to drain.

use super::measure::Shared;
use crate::payload;
use crate::systems::Publisher;
use anyhow::Result;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Publishes warm-up probes until `expect` clients have seen one (20 s at most).
pub(super) async fn warm_up(publ: &mut Publisher, sh: &Shared, expect: usize, size: usize) -> Result<bool> {
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
pub(super) async fn schedule(
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
pub(super) async fn drain(counter: &AtomicU64, target: u64, secs: f64) {
    let t = Instant::now();
    while counter.load(Relaxed) < target && t.elapsed().as_secs_f64() < secs {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
