//! The `handshake` scenario: N WebSocket upgrades by `--connectors` concurrent connectors, each
//! socket held open until all are done; upgrades per second and the upgrade latency.

use super::clients::Dial;
use super::measure::{base, histogram, latency, server_json, SelfCpu};
use crate::procfs;
use crate::systems;
use crate::Args;
use anyhow::{anyhow, Result};
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Longest one upgrade may take before it counts as an error.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) async fn handshake(args: &Args, n: usize) -> Result<Value> {
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
                        UPGRADE_TIMEOUT,
                        systems::upgrade_raw(&dial.url, dial.dst, dial.source(i), None),
                    )
                    .await
                    .map_err(|_| anyhow!("upgrade took over {} s", UPGRADE_TIMEOUT.as_secs()))
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
