//! An edge node's life: [`Edge::start`] (routes, node delivery, the lease, the listener) and
//! [`Edge::drain`] (drain grace, close 1012, wait for every session's disconnect, leave).

use crate::channels::ChannelHub;
use crate::config::EdgeConfig;
use crate::state::{EdgeState, Route};
use axum::Router;
use dashmap::DashMap;
use governor::{Quota, RateLimiter};
use std::net::SocketAddr;
use std::sync::Arc;
use switchyard_bus::{Bus, BusError, SubscribeOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    pub async fn start(
        cfg: EdgeConfig,
        bus: Arc<dyn Bus>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Edge, BusError> {
        let routes = cfg
            .routes
            .iter()
            .map(|r| Ok((r.path.clone(), Arc::new(Route::new(r.clone(), &cfg)?))))
            .collect::<Result<_, String>>()
            .map_err(BusError::Other)?;
        let node_topic = cfg.naming.node(&cfg.node_id);
        let state = Arc::new(EdgeState {
            channels: ChannelHub::new(bus.clone(), cfg.naming.clone()),
            bus: bus.clone(),
            routes,
            sessions: DashMap::new(),
            node_topic: node_topic.clone(),
            shutdown: shutdown.clone(),
            tracker: TaskTracker::new(),
            open: Default::default(),
            per_ip: DashMap::new(),
            per_user: DashMap::new(),
            ip_rate: std::num::NonZeroU32::new(cfg.connect_rate_per_ip)
                .map(|n| RateLimiter::keyed(Quota::per_second(n).allow_burst(n))),
            close_all: CancellationToken::new(),
            cfg,
        });
        let tls = match &state.cfg.tls {
            Some(files) => {
                let t = crate::tls::TlsReloader::new(files.clone()).map_err(BusError::Other)?;
                tokio::spawn(t.clone().watch(std::time::Duration::from_secs(2), shutdown.clone()));
                Some(t)
            }
            None => None,
        };
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
        let addr = listener.local_addr().map_err(|e| BusError::Other(e.to_string()))?;
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
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
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
    pub async fn drained(self) {
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
        let _ = self.server.await;
        let grace = self.state.cfg.shutdown_grace + std::time::Duration::from_secs(1);
        if tokio::time::timeout(grace, self.state.tracker.wait()).await.is_err() {
            tracing::warn!(
                left = self.state.sessions.len(),
                "sessions still open after the shutdown grace"
            );
        }
        self.delivery.abort();
        if let Some(h) = self.heartbeat {
            h.abort();
            // Only a node whose sessions all ended (and published their disconnects) leaves;
            // otherwise the lease lapses and a router ends what is left.
            if !self.state.sessions.is_empty() {
                tracing::warn!(
                    left = self.state.sessions.len(),
                    "not removing the node lease: sessions still open"
                );
            } else if let Some(reg) = self.state.bus.registry() {
                if let Err(e) = reg.leave(&self.state.cfg.node_id).await {
                    tracing::warn!(error = %e, "could not remove the node lease");
                }
            }
        }
    }
}
