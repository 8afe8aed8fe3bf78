//! Connecting clients: where from and how many at a time ([`Dial`]: round-robin source
//! addresses, a permit per handshake in flight, retries), the subscriber task, waiting for the
//! ramp, and collecting every client's tally at the end.

use super::measure::{round3, ClientOut, Receiver, Shared};
use crate::systems::{Conn, Read, System};
use crate::{systems, Args};
use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Longest one connect + upgrade + subscribe attempt may take before it counts as failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Back-off before a retry, per failed attempt so far (ms).
const RETRY_BACKOFF_MS: u64 = 100;
/// Range of the per-client back-off jitter (ms), so that clients failing together do not retry
/// together.
const RETRY_JITTER_MS: u64 = 100;
/// A prime that scatters consecutive client numbers over the jitter range.
const JITTER_SCATTER: u64 = 7919;
/// How often the ramp's ready + failed count is checked.
const RAMP_POLL: Duration = Duration::from_millis(20);

/// Where and how clients connect.
pub(super) struct Dial {
    system: System,
    pub(super) url: String,
    pub(super) dst: SocketAddr,
    sources: Vec<IpAddr>,
    channel: String,
    sem: Semaphore,
    rcvbuf_slow: u32,
    retries: usize,
    /// Connection attempts that failed and were retried.
    retried: AtomicUsize,
}

impl Dial {
    pub(super) fn new(args: &Args) -> Result<Arc<Self>> {
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

    pub(super) fn source(&self, i: usize) -> IpAddr {
        self.sources[i % self.sources.len()]
    }

    /// Connects client `i` and runs `prepare` on it, holding a ramp permit per attempt. A failed
    /// attempt is retried (`--retries`, growing back-off) and counted in `retries`.
    pub(super) async fn connect<F, Fut>(&self, i: usize, slow: bool, prepare: F) -> Result<Conn>
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
                tokio::time::timeout(ATTEMPT_TIMEOUT, fut)
                    .await
                    .map_err(|_| anyhow!("connect + subscribe took over {} s", ATTEMPT_TIMEOUT.as_secs()))
                    .and_then(|r| r)
            };
            match res {
                Ok(c) => return Ok(c),
                Err(e) if attempt >= self.retries => return Err(e),
                Err(_) => {
                    attempt += 1;
                    self.retried.fetch_add(1, Relaxed);
                    let jitter = (i as u64 * JITTER_SCATTER) % RETRY_JITTER_MS;
                    tokio::time::sleep(Duration::from_millis(RETRY_BACKOFF_MS * attempt as u64 + jitter)).await;
                }
            }
        }
    }
}

pub(super) fn is_slow(i: usize, fraction: f64) -> bool {
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
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => return sh.connect_failed(i, e, !slow),
    };
    let mut rx = Receiver::new(!slow);
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
                    sh.closed();
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
pub(super) async fn wait_ramp(sh: &Shared, n: usize, timeout: f64) -> f64 {
    let t = Instant::now();
    while sh.ready.load(Relaxed) + sh.failed.load(Relaxed) < n && t.elapsed().as_secs_f64() < timeout {
        tokio::time::sleep(RAMP_POLL).await;
    }
    t.elapsed().as_secs_f64()
}

/// Starts `n` subscribers; returns their handles once all are ready (or the ramp timed out).
pub(super) async fn start_subscribers(
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

pub(super) async fn collect<T>(handles: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(c) = h.await {
            out.push(c);
        }
    }
    out
}

pub(super) fn ramp_json(sh: &Shared, dial: &Dial, n: usize, secs: f64) -> Value {
    json!({
        "retried": dial.retried.load(Relaxed),
        "ready": sh.ready.load(Relaxed),
        "failed": sh.failed.load(Relaxed),
        "secs": round3(secs),
        "connects_per_s": (sh.ready.load(Relaxed) as f64 / secs.max(1e-9)).round(),
        "first_error": sh.first_error(),
        "requested": n,
    })
}
