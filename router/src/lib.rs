//! Switchyard router.
//!
//! Consumes backend records (deliveries and control ops, keyed by session) from the outbound
//! topic, looks the session up in its registry, and forwards each record unchanged to the
//! delivery subject of the node that holds the session. Several routers share the outbound
//! topic as one group; each keeps the whole registry.
//!
//! The registry is fed by the `<prefix>.sessions` lifecycle feed that every edge publishes to,
//! and, when the bus has a durable registry (NATS: JetStream KV), rebuilt from it on start,
//! consulted for sessions the feed has not shown yet, and swept for lapsed node leases: when an
//! edge stops renewing, one router wins the claim and, once the resume window has passed,
//! publishes a synthetic disconnect (`sy-synthetic: true`) for each of its sessions that did
//! not resume elsewhere meanwhile (a resume from the log), so backends learn they ended.
//!
//! - [`metrics`]: the metrics it reports, declared and described in one place.
//! - [`registry`]: session → node, plus a bounded memory of recently closed sessions.
//! - [`Router`]: the consume → look up → forward loop and the lease sweep.

pub mod metrics;
pub mod registry;

use bytes::Bytes;
use registry::{Lookup, Registry};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_bus::pipeline::Pipeline;
use switchyard_bus::{
    Ack, Bus, BusError, Message, Record, RegistryEvent, SessionRegistry, StartFrom, SubscribeOptions, Subscription,
};

use switchyard_protocol::envelope::now_ms;
use switchyard_protocol::{Envelope, Kind, Naming};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DOOMED, DROPPED, EXPIRED, FORWARDED, SESSIONS};

/// Recently closed sessions the registry remembers (so a late record is "closed", not
/// "unknown").
const CLOSED_REMEMBERED: usize = 100_000;
/// The shortest interval between lease and parked-record sweeps.
const MIN_SWEEP: Duration = Duration::from_millis(50);

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub naming: Naming,
    /// A node whose lease was not renewed for this long is dead; its sessions end.
    pub lease: Duration,
    /// How long a record for a session the router has not heard of yet waits for that
    /// session's connect (the feed and the outbound topic are separate streams).
    pub unknown_grace: Duration,
    /// The edges' `--resume-window`: a dead node's sessions end this long after its lease
    /// lapsed, unless they resumed elsewhere meanwhile (from the bus's log).
    pub resume_window: Duration,
}

/// A session of a dead node, to end at `at` unless it resumes first.
struct Doomed {
    at: Instant,
    node: String,
    entry: registry::Entry,
}

/// Records held for a session the router has not heard of yet, in arrival order.
struct Parked {
    since: Instant,
    records: std::collections::VecDeque<Message>,
}

/// A running router.
pub struct Router {
    pub registry: Arc<Registry>,
    task: JoinHandle<()>,
}

/// What the router knows of one node's lease.
struct NodeLease {
    seen: Instant,
    revision: u64,
}

impl Router {
    /// Subscribes to the lifecycle feed and the outbound topic (both live when this returns),
    /// loads the durable registry if the bus has one, then routes until `shutdown`.
    pub async fn start(bus: Arc<dyn Bus>, cfg: RouterConfig, shutdown: CancellationToken) -> Result<Router, BusError> {
        let registry = Arc::new(Registry::new(CLOSED_REMEMBERED));
        // From the beginning: on Kafka the compacted feed is the registry, rebuilt on start.
        let from_start = SubscribeOptions {
            start: StartFrom::Earliest,
            ..SubscribeOptions::default()
        };
        let sessions = bus.subscribe(&cfg.naming.sessions(), from_start).await?;
        let outbound = bus
            .subscribe(
                &cfg.naming.outbound(),
                // A record's position is committed once it is forwarded (or dropped and
                // counted), so a router killed mid-stream loses none to the group.
                SubscribeOptions {
                    acknowledged: true,
                    ..SubscribeOptions::group("switchyard-router")
                },
            )
            .await?;
        let durable = bus.registry();
        let events = match &durable {
            Some(d) => Some(d.watch().await?),
            None => None,
        };
        let bus_for_pipeline = bus.clone();
        let r = Routing {
            bus,
            cfg,
            registry: registry.clone(),
            durable,
            nodes: HashMap::new(),
            parked: HashMap::new(),
            doomed: HashMap::new(),
            pipeline: Pipeline::new(bus_for_pipeline, MAX_IN_FLIGHT),
        };
        let task = tokio::spawn(r.run(sessions, outbound, events, shutdown));
        Ok(Router { registry, task })
    }

    /// Waits for the routing loop to end (after shutdown).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }

    /// [`Router::stopped`], until `deadline`; then the loop is aborted where it is. True if it
    /// ended by itself.
    pub async fn stopped_by(mut self, deadline: tokio::time::Instant) -> bool {
        if tokio::time::timeout_at(deadline, &mut self.task).await.is_ok() {
            return true;
        }
        self.task.abort();
        false
    }
}

struct Routing {
    bus: Arc<dyn Bus>,
    cfg: RouterConfig,
    registry: Arc<Registry>,
    durable: Option<Arc<dyn SessionRegistry>>,
    nodes: HashMap<String, NodeLease>,
    parked: HashMap<String, Parked>,
    /// Sessions of dead nodes waiting out the resume window.
    doomed: HashMap<String, Doomed>,
    /// Forwards in flight, tagged with their session.
    pipeline: Pipeline<(String, Option<Ack>)>,
}

/// Sessions whose forwards may be in flight at once (each session's records stay in order).
const MAX_IN_FLIGHT: usize = 1024;

impl Routing {
    async fn run(
        mut self,
        mut sessions: Subscription,
        mut outbound: Subscription,
        mut events: Option<mpsc::Receiver<RegistryEvent>>,
        shutdown: CancellationToken,
    ) {
        let gauge = ::metrics::gauge!(SESSIONS);
        // Often enough to notice a lapsed lease within a fifteenth of it and a parked record's
        // grace within a quarter, never more than every MIN_SWEEP.
        let tick = (self.cfg.lease / 15).min(self.cfg.unknown_grace / 4).max(MIN_SWEEP);
        let mut sweep = tokio::time::interval(tick);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Lifecycle first: a connect published before a backend saw the session is applied
            // before that backend's reply is routed. Outbound records are taken only while the
            // pipeline has room (it pushes back on the consumer, not on memory).
            let full = self.pipeline.is_full();
            let busy = !self.pipeline.is_empty();
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Step::Stop,
                m = sessions.recv() => match m {
                    Some(m) => Step::Feed(m),
                    None => { tracing::error!("session feed closed by the bus"); Step::Stop }
                },
                e = recv_opt(&mut events) => match e {
                    Some(e) => Step::Durable(e),
                    None => { tracing::error!("registry watch ended"); events = None; continue; }
                },
                (tag, res) = self.pipeline.next_done(), if busy => Step::Forwarded(tag, res),
                m = outbound.recv(), if !full => match m {
                    Some(m) => Step::Outbound(m),
                    None => { tracing::error!("outbound subscription closed by the bus"); Step::Stop }
                },
                _ = sweep.tick() => Step::Sweep,
            };
            match step {
                Step::Stop => break,
                Step::Feed(m) => {
                    self.apply_and_release(&m).await;
                    gauge.set(self.registry.len() as f64);
                }
                Step::Durable(e) => {
                    self.apply_durable(e);
                    gauge.set(self.registry.len() as f64);
                }
                Step::Forwarded(tag, res) => forwarded(tag, res),
                Step::Outbound(m) => {
                    while let Some(m) = sessions.try_recv() {
                        self.apply_and_release(&m).await;
                    }
                    self.route(m).await;
                }
                Step::Sweep => {
                    self.expire_parked();
                    if let Some(durable) = self.durable.clone() {
                        self.sweep().await;
                        if !self.doomed.is_empty() {
                            self.end_doomed(&durable).await;
                        }
                    }
                }
            }
        }
        // Let what is in flight finish (the process bounds how long).
        while !self.pipeline.is_empty() {
            let (tag, res) = self.pipeline.next_done().await;
            forwarded(tag, res);
        }
    }

    /// Applies a feed record; a connect releases what was parked for that session, in order.
    async fn apply_and_release(&mut self, m: &Message) {
        if let Some(session) = self.apply(m) {
            if let Some(p) = self.parked.remove(&session) {
                for rec in p.records {
                    self.route(rec).await;
                }
            }
        }
    }

    /// Drops (and counts) parked records whose session never showed up.
    fn expire_parked(&mut self) {
        let grace = self.cfg.unknown_grace;
        self.parked.retain(|session, p| {
            if p.since.elapsed() < grace {
                return true;
            }
            ::metrics::counter!(DROPPED, "reason" => "unknown_session").increment(p.records.len() as u64);
            p.records.iter().for_each(handled);
            tracing::debug!(%session, records = p.records.len(), "outbound records for an unknown session");
            false
        });
    }

    /// Returns the session a connect record announced.
    fn apply(&mut self, m: &Message) -> Option<String> {
        let r = &m.record;
        if r.headers.is_empty() && r.payload.is_empty() {
            // A tombstone (Kafka): the session ended; compaction may already have removed its
            // disconnect record, so this is how a lagging router learns it.
            if let Some(session) = r.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()) {
                self.registry.remove(session);
            }
            return None;
        }
        match Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()) {
            Ok(e) => match (e.kind, e.node) {
                // A resume moves the session to the node it came back on.
                (Kind::Connect | Kind::Resume, Some(node)) => {
                    // Back (resumed after its node died): it does not end.
                    if self.doomed.remove(&e.session).is_some() {
                        ::metrics::gauge!(DOOMED).set(self.doomed.len() as f64);
                    }
                    let route = e.route.as_deref().unwrap_or("");
                    let inbound = r
                        .headers
                        .get(switchyard_protocol::envelope::header::INBOUND)
                        .unwrap_or("");
                    if let Some(from) = self.registry.insert(&e.session, &node, route, inbound) {
                        self.moved(&e.session, &from, &node);
                    }
                    return Some(e.session);
                }
                (Kind::Disconnect, _) => self.registry.remove(&e.session),
                _ => tracing::debug!(kind = e.kind.as_str(), "ignored record on the session feed"),
            },
            Err(e) => tracing::debug!(error = %e, "undecodable record on the session feed"),
        }
        None
    }

    /// A session moved from node `from` to `to` (it resumed there): tells `from`, behind every
    /// record this router sent it for the session (the pipeline keeps a session's order), so
    /// the old edge knows nothing more comes from this router in order (docs/continuity.md).
    fn moved(&mut self, session: &str, from: &str, to: &str) {
        let mut e = Envelope::new(session.to_owned(), Kind::Handover, Bytes::new());
        e.node = Some(to.to_owned());
        e.timestamp_ms = now_ms();
        let mut headers = e.headers();
        headers.insert(
            switchyard_protocol::envelope::header::HANDOVER,
            switchyard_protocol::handover::MOVED,
        );
        let rec = Record {
            key: Some(e.key()),
            headers,
            payload: Bytes::new(),
        };
        tracing::debug!(%session, %from, %to, "session moved: telling its old node");
        self.pipeline
            .push(self.cfg.naming.node(from), rec, (session.to_owned(), None));
    }

    fn apply_durable(&mut self, e: RegistryEvent) {
        match e {
            RegistryEvent::Session {
                session,
                entry: Some(en),
            } => {
                if let Some(from) = self.registry.insert(&session, &en.node, &en.route, &en.inbound) {
                    self.moved(&session, &from, &en.node);
                }
            }
            RegistryEvent::Session { session, entry: None } => self.registry.remove(&session),
            RegistryEvent::Heartbeat { node, revision, .. } => {
                self.nodes.insert(
                    node,
                    NodeLease {
                        seen: Instant::now(),
                        revision,
                    },
                );
            }
            RegistryEvent::NodeGone { node } => {
                self.nodes.remove(&node);
            }
        }
    }

    /// Ends the sessions of every node whose lease lapsed (if this router wins the claim).
    async fn sweep(&mut self) {
        let Some(durable) = self.durable.clone() else { return };
        let lapsed: Vec<(String, u64)> = self
            .nodes
            .iter()
            .filter(|(_, l)| l.seen.elapsed() > self.cfg.lease)
            .map(|(n, l)| (n.clone(), l.revision))
            .collect();
        for (node, revision) in lapsed {
            match durable.claim_expiry(&node, revision).await {
                Ok(true) => {
                    self.nodes.remove(&node);
                    self.doom_node(&durable, &node).await
                }
                Ok(false) => {
                    // Another router won, or the node renewed (a new heartbeat event follows).
                    self.nodes.remove(&node);
                }
                // Kept: the next sweep tries again.
                Err(e) => tracing::warn!(%node, error = %e, "could not claim a lapsed lease; will retry"),
            }
        }
    }

    /// A node's lease lapsed (this router won the claim): its sessions end once the resume
    /// window has passed, each unless it resumed elsewhere by then.
    async fn doom_node(&mut self, durable: &Arc<dyn SessionRegistry>, node: &str) {
        let sessions = self.registry.sessions_on(node);
        tracing::warn!(%node, sessions = sessions.len(), window = ?self.cfg.resume_window, "node lease lapsed: its sessions end unless resumed elsewhere within the resume window");
        let at = Instant::now() + self.cfg.resume_window;
        for (session, entry) in sessions {
            self.doomed.insert(
                session,
                Doomed {
                    at,
                    node: node.to_owned(),
                    entry,
                },
            );
        }
        let _ = durable.leave(node).await;
        self.end_doomed(durable).await;
    }

    /// Ends the dead nodes' sessions whose window has passed and that are still on them.
    async fn end_doomed(&mut self, durable: &Arc<dyn SessionRegistry>) {
        let now = Instant::now();
        let due: Vec<String> = self
            .doomed
            .iter()
            .filter(|(_, d)| d.at <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for session in due {
            let Some(d) = self.doomed.remove(&session) else {
                continue;
            };
            if self.registry.lookup(&session) != Lookup::Open(d.node.as_str().into()) {
                // It resumed on another node, or ended, meanwhile.
                continue;
            }
            self.end_session(durable, &session, &d.node, &d.entry).await;
        }
        ::metrics::gauge!(DOOMED).set(self.doomed.len() as f64);
    }

    /// Publishes a dead node's session's synthetic disconnect and forgets the session.
    async fn end_session(
        &self,
        durable: &Arc<dyn SessionRegistry>,
        session: &str,
        node: &str,
        entry: &registry::Entry,
    ) {
        let mut e = Envelope::new(session.to_owned(), Kind::Disconnect, Bytes::new());
        e.node = Some(node.to_owned());
        e.route = Some(entry.route.to_string());
        e.code = Some(switchyard_protocol::close::ABNORMAL);
        e.reason = Some("node lease expired".into());
        e.synthetic = true;
        e.timestamp_ms = now_ms();
        let rec = Record {
            key: Some(e.key()),
            headers: e.headers(),
            payload: Bytes::new(),
        };
        // Counted when decided, so whoever sees the disconnect also sees it counted.
        ::metrics::counter!(EXPIRED).increment(1);
        if !entry.inbound.is_empty() {
            if let Err(err) = self.bus.publish(&entry.inbound, rec.clone()).await {
                tracing::warn!(%session, error = %err, "could not publish a synthetic disconnect");
            }
        }
        let key = rec.key.clone().unwrap_or_default();
        if self.bus.publish(&self.cfg.naming.sessions(), rec).await.is_ok() {
            // As an edge does after a disconnect: compaction may forget the session.
            let _ = self.bus.tombstone(&self.cfg.naming.sessions(), key).await;
        }
        let _ = durable.unregister(session).await;
        self.registry.remove(session);
    }

    /// Forwards one outbound record (through the pipeline: in order per session, many
    /// sessions at once), parks it while its session is not known yet, or counts why it could
    /// not be forwarded.
    async fn route(&mut self, m: Message) {
        let ack = m.ack.clone();
        if let Some((session, topic, rec)) = self.route_or_park(m).await {
            self.pipeline.push(topic, rec, (session, ack));
        }
    }

    /// Where a record goes: (session, node topic, record), or `None` when it was parked (it
    /// is handled once forwarded or expired) or dropped (handled and counted here).
    async fn route_or_park(&mut self, m: Message) -> Option<(String, String, Record)> {
        let r = &m.record;
        let env = match Envelope::from_record(r.key.as_deref(), &r.headers, Bytes::new()) {
            Ok(e) => e,
            Err(e) => {
                drop_count("invalid");
                handled(&m);
                tracing::debug!(error = %e, "undecodable outbound record");
                return None;
            }
        };
        if !matches!(env.kind, Kind::Deliver | Kind::Control) {
            drop_count("invalid");
            handled(&m);
            tracing::debug!(
                kind = env.kind.as_str(),
                "outbound record of a kind the router does not route"
            );
            return None;
        }
        if let Some(p) = self.parked.get_mut(&env.session) {
            // Behind earlier records of the same session: order is kept.
            p.records.push_back(m);
            return None;
        }
        let mut lookup = self.registry.lookup(&env.session);
        if lookup == Lookup::Unknown {
            // The feed may not have shown this session yet: ask the durable registry.
            if let Some(d) = &self.durable {
                if let Ok(Some(en)) = d.lookup(&env.session).await {
                    self.registry.insert(&env.session, &en.node, &en.route, &en.inbound);
                    lookup = Lookup::Open(en.node.as_str().into());
                }
            }
        }
        let node = match lookup {
            Lookup::Open(node) => node,
            Lookup::Closed => {
                drop_count("closed_session");
                handled(&m);
                tracing::debug!(session = %env.session, "outbound record for a closed session");
                return None;
            }
            Lookup::Unknown => {
                let mut records = std::collections::VecDeque::new();
                records.push_back(m);
                self.parked.insert(
                    env.session,
                    Parked {
                        since: Instant::now(),
                        records,
                    },
                );
                return None;
            }
        };
        let mut rec: Record = (**r).clone();
        if rec.key.is_none() {
            rec.key = Some(env.key());
        }
        Some((env.session, self.cfg.naming.node(&node), rec))
    }
}

/// What the routing loop does next.
enum Step {
    Stop,
    Feed(Message),
    Durable(RegistryEvent),
    Outbound(Message),
    Forwarded((String, Option<Ack>), Result<Option<u64>, BusError>),
    Sweep,
}

/// Counts a finished forward and tells the bus the record is handled.
fn forwarded((session, ack): (String, Option<Ack>), res: Result<Option<u64>, BusError>) {
    if let Some(a) = ack {
        a.done();
    }
    match res {
        Ok(_) => ::metrics::counter!(FORWARDED).increment(1),
        Err(e) => {
            drop_count("bus_refused");
            tracing::debug!(%session, error = %e, "could not forward to node");
        }
    }
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<RegistryEvent>>) -> Option<RegistryEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Tells the bus an outbound record is handled (dropped and counted, or forwarded).
fn handled(m: &Message) {
    if let Some(a) = &m.ack {
        a.done();
    }
}

fn drop_count(reason: &'static str) {
    ::metrics::counter!(DROPPED, "reason" => reason).increment(1);
}
