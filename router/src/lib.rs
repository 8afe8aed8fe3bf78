//! Switchyard router.
//!
//! Consumes backend records (deliveries and control ops, keyed by session) from the outbound
//! topic, looks the session up in its registry, and forwards each record unchanged to the
//! delivery subject of the node that holds the session. The registry is built from the session
//! lifecycle feed (`<prefix>.sessions`) that every edge publishes to. Several routers share the
//! outbound topic as one group; each keeps the whole registry.
//!
//! - [`registry`]: session → node, plus a bounded memory of recently closed sessions.
//! - [`Router`]: the consume → look up → forward loop.

pub mod registry;

use bytes::Bytes;
use registry::{Lookup, Registry};
use std::sync::Arc;
use switchyard_bus::{Bus, BusError, Message, Record, SubscribeOptions, Subscription};
use switchyard_protocol::{Envelope, Kind, Naming};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Metric names the router reports (declared, with descriptions, by the edge's metrics module).
const FORWARDED: &str = "switchyard_router_forwarded_total";
const DROPPED: &str = "switchyard_router_dropped_total";
const SESSIONS: &str = "switchyard_router_sessions";

/// A running router.
pub struct Router {
    pub registry: Arc<Registry>,
    task: JoinHandle<()>,
}

impl Router {
    /// Subscribes to the lifecycle feed and the outbound topic (both live when this returns),
    /// then routes until `shutdown`.
    pub async fn start(
        bus: Arc<dyn Bus>,
        naming: Naming,
        shutdown: CancellationToken,
    ) -> Result<Router, BusError> {
        let registry = Arc::new(Registry::new(100_000));
        let sessions = bus
            .subscribe(&naming.sessions(), SubscribeOptions::default())
            .await?;
        let outbound = bus
            .subscribe(
                &naming.outbound(),
                SubscribeOptions::group("switchyard-router"),
            )
            .await?;
        let task = tokio::spawn(run(
            bus,
            naming,
            registry.clone(),
            sessions,
            outbound,
            shutdown,
        ));
        Ok(Router { registry, task })
    }

    /// Waits for the routing loop to end (after shutdown).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

async fn run(
    bus: Arc<dyn Bus>,
    naming: Naming,
    registry: Arc<Registry>,
    mut sessions: Subscription,
    mut outbound: Subscription,
    shutdown: CancellationToken,
) {
    let forwarded = metrics::counter!(FORWARDED);
    let gauge = metrics::gauge!(SESSIONS);
    loop {
        // Lifecycle first: a connect published before a backend saw the session is applied
        // before that backend's reply is routed.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            m = sessions.recv() => match m {
                Some(m) => { apply(&registry, &m); gauge.set(registry.len() as f64); }
                None => { tracing::error!("session feed closed by the bus"); return; }
            },
            m = outbound.recv() => match m {
                Some(m) => {
                    while let Some(m) = sessions.try_recv() {
                        apply(&registry, &m);
                    }
                    if route(&bus, &naming, &registry, &m).await {
                        forwarded.increment(1);
                    }
                }
                None => { tracing::error!("outbound subscription closed by the bus"); return; }
            },
        }
    }
}

fn apply(registry: &Registry, m: &Message) {
    let r = &m.record;
    match Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()) {
        Ok(e) => match (e.kind, e.node) {
            (Kind::Connect, Some(node)) => {
                registry.insert(&e.session, &node, e.route.as_deref().unwrap_or(""))
            }
            (Kind::Disconnect, _) => registry.remove(&e.session),
            _ => tracing::debug!(kind = e.kind.as_str(), "ignored record on the session feed"),
        },
        Err(e) => tracing::debug!(error = %e, "undecodable record on the session feed"),
    }
}

fn drop_count(reason: &'static str) {
    metrics::counter!(DROPPED, "reason" => reason).increment(1);
}

/// Forwards one outbound record. Returns false (counted) when it could not be.
async fn route(bus: &Arc<dyn Bus>, naming: &Naming, registry: &Registry, m: &Message) -> bool {
    let r = &m.record;
    let env = match Envelope::from_record(r.key.as_deref(), &r.headers, Bytes::new()) {
        Ok(e) => e,
        Err(e) => {
            drop_count("invalid");
            tracing::debug!(error = %e, "undecodable outbound record");
            return false;
        }
    };
    if !matches!(env.kind, Kind::Deliver | Kind::Control) {
        drop_count("invalid");
        tracing::debug!(
            kind = env.kind.as_str(),
            "outbound record of a kind the router does not route"
        );
        return false;
    }
    let node = match registry.lookup(&env.session) {
        Lookup::Open(node) => node,
        Lookup::Closed => {
            drop_count("closed_session");
            tracing::debug!(session = %env.session, "outbound record for a closed session");
            return false;
        }
        Lookup::Unknown => {
            drop_count("unknown_session");
            tracing::debug!(session = %env.session, "outbound record for an unknown session");
            return false;
        }
    };
    let mut rec: Record = (**r).clone();
    if rec.key.is_none() {
        rec.key = Some(env.key());
    }
    match bus.publish(&naming.node(&node), rec).await {
        Ok(_) => true,
        Err(e) => {
            drop_count("bus_refused");
            tracing::debug!(session = %env.session, error = %e, "could not forward to node");
            false
        }
    }
}
