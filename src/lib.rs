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

use anyhow::Context;
use config::{Command, Settings};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use switchyard_bus::Bus;
use switchyard_edge::admin::{self, AdminState};
use switchyard_edge::Edge;
use switchyard_router::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    /// Binds listeners, connects the bus and starts what `command` asks for.
    pub async fn build(self) -> anyhow::Result<App> {
        let prometheus = switchyard_edge::metrics::install();
        let runs_edge = matches!(self.command, Command::Standalone | Command::Edge);
        let runs_router = matches!(self.command, Command::Standalone | Command::Router);
        let runs_demo = self.command == Command::Demo || (self.command == Command::Standalone && self.demo);

        let client = if runs_edge {
            Some(bind(self.listen, 4096).with_context(|| format!("cannot listen on {}", self.listen))?)
        } else {
            None
        };
        let admin_listener = TcpListener::bind(self.admin)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", self.admin))?;
        let bus = switchyard_bus::connect(&self.bus_url, &self.bus)
            .await
            .with_context(|| format!("cannot open bus {}", self.bus_url))?;

        let shutdown = CancellationToken::new();
        let late = CancellationToken::new();
        let router = if runs_router {
            let cfg = switchyard_router::RouterConfig {
                naming: self.naming.clone(),
                lease: self.edge.lease,
                unknown_grace: std::time::Duration::from_secs(2),
            };

            Some(Router::start(bus.clone(), cfg, late.clone()).await.context("router")?)
        } else {
            None
        };
        let demo = if runs_demo {
            Some(
                demo::start(bus.clone(), self.naming.clone(), late.clone())
                    .await
                    .context("demo backends")?,
            )
        } else {
            None
        };
        let edge = match client {
            Some(l) => Some(
                Edge::start(self.edge.clone(), bus.clone(), l, shutdown.clone())
                    .await
                    .context("edge")?,
            ),
            None => None,
        };
        let client_addr = edge.as_ref().map(|e| e.addr);
        let draining = Arc::new(AtomicBool::new(false));
        let admin_addr = admin_listener.local_addr()?;
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
    /// demo backends and admin stop.
    pub async fn run(mut self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        self.draining.store(true, Ordering::Relaxed);
        metrics::gauge!(switchyard_edge::metrics::DRAINING).set(1.0);
        tracing::info!("shutting down: draining sessions");
        if let Some(edge) = self.edge.take() {
            edge.drained().await;
        }
        if let Err(e) = self.bus.flush().await {
            tracing::warn!(error = %e, "bus flush failed during shutdown");
        }
        self.late.cancel();
        if let Some(r) = self.router.take() {
            r.stopped().await;
        }
        if let Some(d) = self.demo.take() {
            let _ = d.await;
        }
        let _ = (&mut self.admin).await;
        tracing::info!("shutdown complete");
        Ok(())
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
