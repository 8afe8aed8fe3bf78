//! What every part of an edge node shares: the configured routes (with their metric handles,
//! derived once) and the node state each session, the listener, node delivery and the admin API
//! read. Data only: the handshake is in [`crate::upgrade`], start and drain in [`crate::node`].

use crate::channels::ChannelHub;
use crate::config::{EdgeConfig, Mode, RouteConfig};
use crate::metrics as m;
use crate::session::Session;
use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics::{Counter, Gauge};
use std::collections::HashMap;
use std::sync::Arc;
use switchyard_bus::Bus;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A configured route plus what is derived from it once: its inbound topic and metric handles.
pub struct Route {
    pub cfg: RouteConfig,
    pub verifier: Option<Arc<crate::auth::Verifier>>,

    pub inbound: String,
    pub max_message_size: usize,
    pub frames_in: Counter,
    pub bytes_in: Counter,
    pub frames_out: Counter,
    pub bytes_out: Counter,
    pub open: Gauge,
    pub drop_oldest: Counter,
    pub drop_slow_close: Counter,
    pub drop_bus: Counter,
    /// Frames read after the session was closed for policy or an expired token (not published).
    pub drop_policy: Counter,
    /// The route's per-session message rate, as a governor quota.
    pub rate: Option<Quota>,
}

impl Route {
    /// `verifier` is the route's, as validation loaded it (see [`crate::config::Loaded`]).
    pub(crate) fn new(cfg: RouteConfig, edge: &EdgeConfig, verifier: Option<Arc<crate::auth::Verifier>>) -> Self {
        let r = cfg.path.clone();
        Self {
            verifier,
            inbound: edge.naming.inbound(&cfg.topic),
            max_message_size: cfg.max_message_size.unwrap_or(edge.max_message_size),
            frames_in: metrics::counter!(m::FRAMES_IN, "route" => r.clone()),
            bytes_in: metrics::counter!(m::BYTES_IN, "route" => r.clone()),
            frames_out: metrics::counter!(m::FRAMES_OUT, "route" => r.clone()),
            bytes_out: metrics::counter!(m::BYTES_OUT, "route" => r.clone()),
            open: metrics::gauge!(m::CONNECTIONS_OPEN, "route" => r.clone()),
            drop_oldest: metrics::counter!(m::DROPS, "route" => r.clone(), "reason" => "slow_drop_oldest"),
            drop_slow_close: metrics::counter!(m::DROPS, "route" => r.clone(), "reason" => "slow_close"),
            drop_bus: metrics::counter!(m::DROPS, "route" => r.clone(), "reason" => "bus_refused"),
            drop_policy: metrics::counter!(m::DROPS, "route" => r, "reason" => "after_policy_close"),
            rate: cfg.rate_limit.map(|rl| {
                let per = std::num::NonZeroU32::new(rl.messages_per_second.max(1)).expect("non-zero");
                let burst =
                    std::num::NonZeroU32::new(rl.burst.unwrap_or(rl.messages_per_second).max(1)).expect("non-zero");
                Quota::per_second(per).allow_burst(burst)
            }),
            cfg,
        }
    }

    pub fn path(&self) -> &str {
        &self.cfg.path
    }

    pub fn is_framed(&self) -> bool {
        self.cfg.mode == Mode::Framed
    }

    /// Channel authorization: the route's patterns (empty = any) and the credential's grants.
    pub fn may(&self, publish: bool, grants: &crate::auth::Grants, channel: &str) -> bool {
        use switchyard_protocol::pattern_matches as channel_matches;
        let (route, granted) = if publish {
            (&self.cfg.channels.publish, &grants.publish)
        } else {
            (&self.cfg.channels.subscribe, &grants.subscribe)
        };
        (route.is_empty() || route.iter().any(|p| channel_matches(p, channel)))
            && granted
                .as_ref()
                .is_none_or(|g| g.iter().any(|p| channel_matches(p, channel)))
    }
}

impl EdgeState {
    /// The state of a node that has not started serving yet: no sessions, nothing open.
    pub fn new(
        cfg: EdgeConfig,
        routes: HashMap<String, Arc<Route>>,
        bus: Arc<dyn Bus>,
        shutdown: CancellationToken,
    ) -> Self {
        let logged = bus.keeps_log();
        Self {
            channels: ChannelHub::new(bus.clone(), cfg.naming.clone()),
            bus,
            routes,
            sessions: DashMap::new(),
            node_topic: cfg.naming.node(&cfg.node_id),
            shutdown,
            tracker: TaskTracker::new(),
            open: Default::default(),
            per_ip: DashMap::new(),
            per_user: DashMap::new(),
            ip_rate: std::num::NonZeroU32::new(cfg.connect_rate_per_ip)
                .map(|n| RateLimiter::keyed(Quota::per_second(n).allow_burst(n))),
            close_all: CancellationToken::new(),
            disconnects_refused: Default::default(),
            resume_key: cfg.resume_key.clone().unwrap_or_else(|| {
                let mut k = vec![0u8; 32];
                getrandom::fill(&mut k).expect("the OS random source works");
                Arc::new(k)
            }),
            handovers: Default::default(),
            logged,
            log_position: std::sync::atomic::AtomicU64::new(u64::MAX),
            cfg,
        }
    }
}

/// State shared by every session of one edge node.
pub struct EdgeState {
    pub cfg: EdgeConfig,
    pub bus: Arc<dyn Bus>,
    pub routes: HashMap<String, Arc<Route>>,
    pub sessions: DashMap<String, Arc<Session>>,
    pub channels: ChannelHub,
    /// This node's delivery subject (also the `sy-reply` of every inbound record).
    pub node_topic: String,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Sockets open on this node, and per client IP (the connection caps).
    pub open: std::sync::atomic::AtomicUsize,
    pub per_ip: DashMap<std::net::IpAddr, usize>,
    /// Sockets per authenticated subject (the per-user cap).
    pub per_user: DashMap<String, usize>,
    /// New connections per client IP (when `connect_rate_per_ip` is set).
    pub ip_rate: Option<DefaultKeyedRateLimiter<std::net::IpAddr>>,
    /// Cancelled after the drain grace: every session closes with 1012.
    pub close_all: CancellationToken,
    /// Disconnect records the bus refused (their backends were not told the session ended).
    pub disconnects_refused: std::sync::atomic::AtomicU64,
    /// Signs and checks resume tokens: `--resume-key-file`, or drawn for this process.
    pub resume_key: Arc<Vec<u8>>,
    /// Sessions on their way here from another node, and those that left for one.
    pub handovers: crate::handover::Handovers,
    /// The bus keeps a log of node deliveries (Kafka): resume tokens carry where a session's
    /// deliveries are in it, so it can be resumed after this node died.
    pub logged: bool,
    /// The position of the last record the node delivery loop took (`u64::MAX`: none yet).
    pub log_position: std::sync::atomic::AtomicU64,
}

impl EdgeState {
    /// Where this node's delivery log stands: everything the router sends it from now on is
    /// after this point.
    pub fn log_point(&self) -> switchyard_protocol::resume::Point {
        match self.log_position.load(std::sync::atomic::Ordering::Acquire) {
            u64::MAX => switchyard_protocol::resume::Point {
                after: None,
                // A second early, for clocks that disagree a little.
                since_ms: Some(switchyard_protocol::envelope::now_ms().saturating_sub(1000)),
            },
            o => switchyard_protocol::resume::Point {
                after: Some(o),
                since_ms: None,
            },
        }
    }
}
