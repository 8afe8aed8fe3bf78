//! Switchyard edge node.
//!
//! Terminates WebSockets on the routes of its config, gives every socket a session id, publishes
//! connect / each frame / disconnect to the route's inbound topic (keyed by session, with a
//! per-session seq), subscribes once to its own node delivery subject for backend replies, and
//! fans channel messages out to local sockets through one bus subscription per channel.
//!
//! - [`config`]: routes and limits (validated before anything binds).
//! - [`queue`]: the bounded per-socket outgoing queue and its slow-consumer policy.
//! - [`session`]: one socket = one reader loop + one writer task.
//! - [`channels`]: one bus subscription per channel with local subscribers; encode once, share.
//! - [`delivery`]: the node delivery subscription (backend replies and control ops).
//! - [`handover`]: a session moving to another edge (a resume there).
//! - [`listener`]: the accept loop: CIDR rules, TLS, header timeouts and limits.
//! - [`tls`]: wss:// certificates, reloaded when their files change or on SIGHUP.
//! - [`decode`]: the socket reader: client frames in, messages out (over `protocol::ws`).
//! - [`limits`]: the per-socket frame-flood budgets and the rate limiters' shared clock.
//! - [`state`]: the shared data: routes with their metric handles, the node state.
//! - [`node`]: the node's life: start (delivery, lease, listener) and drain.
//! - [`admit`]: connection caps (rate, node, per IP, per user), held from accept to close.
//! - [`upgrade`]: route lookup, 404 before upgrade, every handshake check, the upgrade.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` and the JSON API.
//! - [`metrics`]: every metric the process exports, declared in one place.

pub mod admin;
pub mod auth;

pub mod admit;
pub mod channels;
pub mod config;
pub mod decode;
pub mod delivery;
pub mod frame;
pub mod handover;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod queue;
pub mod session;
pub mod state;
pub mod tls;
pub mod upgrade;

pub use config::{EdgeConfig, Mode, RouteConfig, SlowPolicy};
pub use node::{Drained, Edge};
pub use state::EdgeState;
