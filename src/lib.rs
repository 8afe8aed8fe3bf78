//! The `switchyard` binary as a library: typed config → [`App`] (listeners bound, components
//! started, real addresses known) → [`App::run`] until shutdown. `main` only parses, sets up
//! tracing, builds and runs; tests use the same builder on port 0.
//!
//! - [`config`]: flags / env / route file, validated before anything binds.
//! - [`demo`]: the demo backends (echo, app, ticker), which use the bus like any backend.

pub mod config;
pub mod demo;
#[cfg(feature = "kafka")]
pub mod replay;

use config::{Command, Settings};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard_bus::{Bus, BusError};
use switchyard_edge::admin::{self, AdminState};
use switchyard_edge::Edge;
use switchyard_router::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Exit codes (sysexits.h), one per kind of failure.
pub mod exit {
    /// EX_USAGE: bad flags, environment or configuration.
    pub const USAGE: u8 = 64;
    /// EX_UNAVAILABLE: a listener or the bus could not be opened.
    pub const UNAVAILABLE: u8 = 69;
    /// Anything else, including a shutdown that could not hand everything to the bus.
    pub const FAILURE: u8 = 1;
}

/// Why a process could not start. [`StartError::exit_code`] maps it to an exit code: 64 for
/// configuration, 69 for a listener or the bus being unavailable, 1 for anything else.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}{what}: {source}")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open bus {url}: {source}")]
    Bus {
        url: String,
        #[source]
        source: BusError,
    },
    #[error("router: {0}")]
    Router(#[source] BusError),
    #[error("demo backends: {0}")]
    Demo(#[source] BusError),
    #[error("edge: {0}")]
    Edge(#[source] switchyard_edge::node::StartError),
}

impl StartError {
    pub fn exit_code(&self) -> u8 {
        use switchyard_edge::node::StartError as Edge;
        match self {
            StartError::Config(_) => exit::USAGE,
            StartError::Listen { .. } | StartError::Edge(Edge::Listener(_)) => exit::UNAVAILABLE,
            StartError::Bus { source: e, .. }
            | StartError::Router(e)
            | StartError::Demo(e)
            | StartError::Edge(Edge::Bus(e)) => bus_exit_code(e),
            StartError::Edge(Edge::NotValidated(_)) => exit::FAILURE,
        }
    }
}

/// A bus that cannot be reached (or takes nothing, or refuses our credentials) is unavailable;
/// a bad name or URL is configuration; anything else the broker said is a failure.
fn bus_exit_code(e: &BusError) -> u8 {
    match e {
        BusError::Unavailable(_) | BusError::Overflow { .. } | BusError::Auth { .. } => exit::UNAVAILABLE,
        BusError::InvalidUrl { .. } | BusError::SchemeDisabled(_) | BusError::InvalidTopic(_) => exit::USAGE,
        BusError::Other(_) | BusError::LeaseLost(_) => exit::FAILURE,
    }
}

/// A shutdown that could not finish everything: what was left, one item per line (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("shutdown incomplete: {}", .0.join("; "))]
pub struct ShutdownIncomplete(pub Vec<String>);

/// After the edge has drained, the bus flush and the router, demo backends and admin stopping
/// together get this long: SIGTERM ends the process within drain grace + shutdown grace + 1 s
/// (the session deadline) + 1 s (the node lease) + this, whatever the bus is doing.
pub const LATE_SHUTDOWN_BOUND: Duration = Duration::from_secs(3);

/// Accept backlog of the client listener (see [`bind`]).
const ACCEPT_BACKLOG: u32 = 4096;

/// How long a router holds a backend record for a session it has not heard of yet (the
/// session feed and the outbound topic are separate streams).
const UNKNOWN_SESSION_GRACE: Duration = Duration::from_secs(2);

/// A built, running process: listeners bound, bus connected, components started.
pub struct App {
    /// Where clients connect (when this process runs an edge).
    pub client_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub bus: Arc<dyn Bus>,
    pub edge: Option<Edge>,
    router: Option<Router>,
    demo: Option<JoinHandle<()>>,
    admin: JoinHandle<()>,
    /// Cancelled on SIGTERM/SIGINT: the edge stops accepting and closes its sessions.
    shutdown: CancellationToken,
    /// Cancelled after the edge has drained: router, demo backends, admin.
    late: CancellationToken,
    draining: Arc<AtomicBool>,
}

impl Settings {
    /// Binds listeners, connects the bus and starts what `command` asks for. The edge takes
    /// what validation loaded (`self.loaded`); settings built by hand are validated here.
    pub async fn build(self) -> Result<App, StartError> {
        let prometheus = switchyard_edge::metrics::install();
        switchyard_router::metrics::describe();
        let runs_edge = matches!(self.command, Command::Standalone | Command::Edge);
        let runs_router = matches!(self.command, Command::Standalone | Command::Router);
        let runs_demo = self.command == Command::Demo || (self.command == Command::Standalone && self.demo);
        let loaded = match (runs_edge, self.loaded) {
            (true, Some(l)) => Some(l),
            (true, None) => Some(self.edge.validate().map_err(StartError::Config)?),
            (false, _) => None,
        };

        let client = if runs_edge {
            Some(bind(self.listen, ACCEPT_BACKLOG).map_err(|source| StartError::Listen {
                addr: self.listen,
                what: "",
                source,
            })?)
        } else {
            None
        };
        let admin_listener = TcpListener::bind(self.admin)
            .await
            .map_err(|source| StartError::Listen {
                addr: self.admin,
                what: " (admin)",
                source,
            })?;
        let admin_addr = admin_listener.local_addr().map_err(|source| StartError::Listen {
            addr: self.admin,
            what: " (admin)",
            source,
        })?;
        let bus = switchyard_bus::connect(&self.bus_url, &self.bus)
            .await
            .map_err(|source| StartError::Bus {
                url: self.bus_url.clone(),
                source,
            })?;

        // Channel history before anything publishes: the demo's ticker keeps 100 messages
        // unless a `[[channel]]` already covers it.
        let mut edge_cfg = self.edge.clone();
        if runs_demo && edge_cfg.history_of(demo::TICKER).is_none() {
            edge_cfg.channels.push(demo::history());
        }
        if runs_demo {
            edge_cfg.page = Some(Arc::new(demo::page()));
        }
        if runs_edge || runs_demo {
            for c in &edge_cfg.channels {
                bus.keep_history(&self.naming.channel(&c.pattern), c.limits())
                    .await
                    .map_err(|source| StartError::Bus {
                        url: self.bus_url.clone(),
                        source,
                    })?;
            }
        }

        let shutdown = CancellationToken::new();
        let late = CancellationToken::new();
        let router = if runs_router {
            let cfg = switchyard_router::RouterConfig {
                naming: self.naming.clone(),
                lease: self.edge.lease,
                unknown_grace: UNKNOWN_SESSION_GRACE,
                resume_window: self.edge.resume_window,
            };

            Some(
                Router::start(bus.clone(), cfg, late.clone())
                    .await
                    .map_err(StartError::Router)?,
            )
        } else {
            None
        };
        let demo = if runs_demo {
            Some(
                demo::start(bus.clone(), self.naming.clone(), late.clone())
                    .await
                    .map_err(StartError::Demo)?,
            )
        } else {
            None
        };
        let edge = match (client, loaded) {
            (Some(l), Some(loaded)) => Some(
                Edge::start(edge_cfg, loaded, bus.clone(), l, shutdown.clone())
                    .await
                    .map_err(StartError::Edge)?,
            ),
            _ => None,
        };
        let client_addr = edge.as_ref().map(|e| e.addr);
        let draining = Arc::new(AtomicBool::new(false));
        let admin_state = AdminState {
            bus: bus.clone(),
            naming: self.naming.clone(),
            edge: edge.as_ref().map(|e| e.state.clone()),
            prometheus,
            draining: draining.clone(),
        };
        let stop = late.clone();
        let admin = tokio::spawn(admin::serve(admin_listener, admin_state, stop));
        tracing::info!(
            command = ?self.command, bus = %self.bus_url, node = %self.edge.node_id,
            client = %client_addr.map(|a| a.to_string()).unwrap_or_default(), admin = %admin_addr, "switchyard started"
        );
        Ok(App {
            client_addr,
            admin_addr,
            bus,
            edge,
            router,
            demo,
            admin,
            shutdown,
            late,
            draining,
        })
    }
}

impl App {
    /// The token that starts a graceful shutdown (main cancels it on SIGTERM/SIGINT).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled, then drains in order: `/readyz` turns 503
    /// and the edge stops accepting; sessions keep running for the drain grace, then are
    /// closed with 1012 and publish their disconnects; the bus is flushed; then the router,
    /// demo backends and admin stop. Every step after the drain shares one deadline
    /// ([`LATE_SHUTDOWN_BOUND`]), so a bus that has gone away cannot hold the process. What
    /// could not be finished is logged and returned as [`ShutdownIncomplete`].
    pub async fn run(mut self) -> Result<(), ShutdownIncomplete> {
        self.shutdown.cancelled().await;
        self.draining.store(true, Ordering::Relaxed);
        metrics::gauge!(switchyard_edge::metrics::DRAINING).set(1.0);
        tracing::info!("shutting down: draining sessions");
        let mut left = Vec::new();
        if let Some(edge) = self.edge.take() {
            let d = edge.drain().await;
            if d.sessions_left > 0 {
                left.push(format!(
                    "{} sessions still closing at the deadline (their disconnects may not be published)",
                    d.sessions_left
                ));
            }
            if d.disconnects_refused > 0 {
                left.push(format!(
                    "{} disconnect records refused by the bus (their backends were not told)",
                    d.disconnects_refused
                ));
            }
        }
        let deadline = tokio::time::Instant::now() + LATE_SHUTDOWN_BOUND;
        match tokio::time::timeout_at(deadline, self.bus.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => left.push(format!("bus flush failed ({e}): records still buffered are lost")),
            Err(_) => left.push(format!(
                "bus flush not done within {LATE_SHUTDOWN_BOUND:?}: records still buffered are lost"
            )),
        }
        self.late.cancel();
        if let Some(r) = self.router.take() {
            if !r.stopped_by(deadline).await {
                tracing::warn!("router did not stop in time: stopped where it was");
            }
        }
        for (what, task) in [("demo backends", self.demo.take()), ("admin", Some(self.admin))] {
            let Some(mut task) = task else { continue };
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                tracing::warn!("{what} did not stop in time: stopped where they were");
            }
        }
        if left.is_empty() {
            tracing::info!("shutdown complete");
            Ok(())
        } else {
            for l in &left {
                tracing::warn!("shutdown incomplete: {l}");
            }
            Err(ShutdownIncomplete(left))
        }
    }
}

/// Binds a listener with an explicit accept backlog (tokio's `bind` uses 128, which overflows
/// when thousands of clients connect at once: each dropped SYN costs the client a 1 s retry).
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
