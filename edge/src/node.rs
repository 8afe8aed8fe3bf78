//! An edge node's life: [`Edge::start`] (routes, node delivery, the lease, the listener) and
//! [`Edge::drain`] (drain grace, close 1012, wait for every session's disconnect, leave).

use crate::config::{EdgeConfig, Loaded};
use crate::state::{EdgeState, Route};
use axum::Router;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use switchyard_bus::{Bus, BusError, SubscribeOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the wss:// certificate files are checked for a change.
const TLS_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Why an edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The bus refused the node's delivery subscription or its first lease renewal.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The client listener failed before serving.
    #[error("client listener: {0}")]
    Listener(#[source] std::io::Error),
    /// `Edge::start` was given a config whose `Loaded` does not match it (a route with auth
    /// but no verifier, TLS files but no certificate): validate it first.
    #[error("{0}: not validated (EdgeConfig::validate loads its keys and certificates)")]
    NotValidated(String),
}

/// A running edge node.
pub struct Edge {
    pub state: Arc<EdgeState>,
    pub addr: SocketAddr,
    /// The wss:// certificate, when configured (reload it on SIGHUP).
    pub tls: Option<Arc<crate::tls::TlsReloader>>,
    server: JoinHandle<()>,
    delivery: JoinHandle<()>,
    heartbeat: Option<JoinHandle<()>>,
}

/// Renews the node's lease until aborted, compare-and-set on the last revision. A failed
/// renewal is retried on the next tick; if renewals keep failing for a whole lease, routers end
/// this node's sessions. When the node comes back and finds its lease claimed, its sessions
/// are gone from the registry and their backends were told: it closes them (1012, the client
/// should reconnect) and starts a fresh lease.
async fn renew(
    st: Arc<EdgeState>,
    reg: Arc<dyn switchyard_bus::SessionRegistry>,
    mut last: u64,
    every: std::time::Duration,
) {
    let node = st.cfg.node_id.clone();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match reg.heartbeat(&node, Some(last)).await {
            Ok(rev) => last = rev,
            Err(BusError::LeaseLost(why)) => {
                tracing::error!(%why, sessions = st.sessions.len(), "node lease lost: closing this node's sessions");
                for s in st.sessions.iter() {
                    s.queue
                        .close(switchyard_protocol::close::SERVICE_RESTART, "node lease lost");
                }
                match reg.heartbeat(&node, None).await {
                    Ok(rev) => last = rev,
                    Err(e) => tracing::warn!(error = %e, "could not start a new node lease"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the node lease"),
        }
    }
}

impl Edge {
    /// Subscribes to the node delivery subject, then serves `listener` until `shutdown`.
    /// `loaded` is what [`EdgeConfig::validate`] returned for `cfg`.
    pub async fn start(
        cfg: EdgeConfig,
        loaded: Loaded,
        bus: Arc<dyn Bus>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Edge, StartError> {
        let mut routes = HashMap::new();
        for r in &cfg.routes {
            let verifier = loaded.verifiers.get(&r.path).cloned();
            if r.auth.is_some() && verifier.is_none() {
                // Never serve an authenticated route anonymously.
                return Err(StartError::NotValidated(r.path.clone()));
            }
            routes.insert(r.path.clone(), Arc::new(Route::new(r.clone(), &cfg, verifier)));
        }
        let state = Arc::new(EdgeState::new(cfg, routes, bus.clone(), shutdown.clone()));
        let node_topic = state.node_topic.clone();
        if state.cfg.tls.is_some() != loaded.tls.is_some() {
            return Err(StartError::NotValidated("tls".into()));
        }
        let tls = loaded.tls;
        if let Some(t) = &tls {
            tokio::spawn(t.clone().watch(TLS_POLL, shutdown.clone()));
        }
        let sub = bus.subscribe(&node_topic, SubscribeOptions::default()).await?;
        let delivery = tokio::spawn(crate::delivery::run(state.clone(), sub));
        let heartbeat = match bus.registry() {
            Some(reg) => {
                // First renewal before the first client: a router never sees a session of a
                // node without a lease.
                let rev = reg.heartbeat(&state.cfg.node_id, None).await?;
                Some(tokio::spawn(renew(state.clone(), reg, rev, state.cfg.lease / 3)))
            }
            None => None,
        };
        let addr = listener.local_addr().map_err(StartError::Listener)?;
        let app = Router::new()
            .fallback(crate::upgrade::upgrade)
            .with_state(state.clone());
        let server = tokio::spawn(crate::listener::serve(
            listener,
            app,
            state.clone(),
            tls.clone(),
            state.close_all.clone(),
        ));
        if state.ip_rate.is_some() {
            // Forget addresses whose bucket is full again, so the map stays bounded.
            let st = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(IP_RATE_SWEEP);
                loop {
                    tokio::select! {
                        _ = st.shutdown.cancelled() => return,
                        _ = tick.tick() => if let Some(l) = &st.ip_rate { l.retain_recent() },
                    }
                }
            });
        }
        tracing::info!(%addr, node = %state.cfg.node_id, "edge listening");
        Ok(Edge {
            state,
            addr,
            tls,
            server,
            delivery,
            heartbeat,
        })
    }

    /// Waits for the listener to stop (after `shutdown`); lets sessions run for the drain
    /// grace (or until none is left); closes the rest with 1012; then waits for every session
    /// to finish its close handshake and publish its disconnect, up to the shutdown grace (+1 s).
    /// Bounded whatever the bus does: a session still publishing after that is reported, not
    /// waited for. Returns what could not be finished.
    pub async fn drain(self) -> Drained {
        let refused_before = self.state.disconnects_refused.load(Ordering::Relaxed);
        self.state.tracker.close();
        let grace = self.state.cfg.drain_grace;
        if !grace.is_zero() {
            tracing::info!(
                sessions = self.state.sessions.len(),
                ?grace,
                "draining: sessions keep running for the drain grace"
            );
            let _ = tokio::time::timeout(grace, self.state.tracker.wait()).await;
        }
        // During the drain grace the listener still accepts (and answers 503 `draining`), so a
        // client a load balancer still sends here is told rather than reset. Then it closes.
        self.state.close_all.cancel();
        // Each session sees the drain on its next poll; wake them all for it. (One that
        // registers after this loop checks `close_all` on its first poll.)
        for s in self.state.sessions.iter() {
            s.queue.wake();
        }
        // Sessions closed with 1012 may wait the handover grace for a resume on another edge.
        let handover = if crate::session::hands_over(&self.state) {
            self.state.cfg.handover_grace.min(self.state.cfg.resume_window)
        } else {
            std::time::Duration::ZERO
        };
        let grace = self.state.cfg.shutdown_grace + handover + SESSION_END_SLACK;
        let deadline = tokio::time::Instant::now() + grace;
        let mut server = self.server;
        if tokio::time::timeout_at(deadline, &mut server).await.is_err() {
            server.abort();
        }
        let mut report = Drained::default();
        if tokio::time::timeout_at(deadline, self.state.tracker.wait())
            .await
            .is_err()
        {
            report.sessions_left = self.state.tracker.len();
            tracing::warn!(
                left = report.sessions_left,
                "sessions still open after the shutdown grace: their disconnects may not be published"
            );
        }
        // Sessions handed over to other edges: keep passing on what reaches us for them until
        // the routers have moved them (bounded).
        self.state.handovers.settle(crate::handover::END_WAIT).await;
        self.delivery.abort();
        if let Some(h) = self.heartbeat {
            h.abort();
            // Only a node whose sessions all ended (and published their disconnects) leaves;
            // otherwise the lease lapses and a router ends what is left.
            if report.sessions_left > 0 {
                tracing::warn!(
                    left = report.sessions_left,
                    "not removing the node lease: sessions still open"
                );
            } else if let Some(reg) = self.state.bus.registry() {
                match tokio::time::timeout(LEAVE_BOUND, reg.leave(&self.state.cfg.node_id)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not remove the node lease"),
                    Err(_) => tracing::warn!(bound = ?LEAVE_BOUND, "could not remove the node lease in time"),
                }
            }
        }
        report.disconnects_refused = self.state.disconnects_refused.load(Ordering::Relaxed) - refused_before;
        report
    }
}

/// How often the per-IP connection rate limiter forgets addresses whose bucket is full again.
const IP_RATE_SWEEP: std::time::Duration = std::time::Duration::from_secs(30);

/// Past the shutdown grace, how long a session has to publish its disconnect and end.
const SESSION_END_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a leaving node waits for its lease record to be removed (the lease lapses anyway).
const LEAVE_BOUND: std::time::Duration = std::time::Duration::from_secs(1);

/// What a drain could not finish: sessions whose task was still running at the deadline, and
/// disconnect records the bus refused during the drain.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub sessions_left: usize,
    pub disconnects_refused: u64,
}

impl Drained {
    /// Nothing was left unfinished.
    pub fn is_clean(&self) -> bool {
        self.sessions_left == 0 && self.disconnects_refused == 0
    }
}
