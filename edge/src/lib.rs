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
//! - [`server`]: the axum listener: route lookup, 404 before upgrade, upgrade.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` and the JSON API.
//! - [`metrics`]: every metric the process exports, declared in one place.

pub mod admin;
pub mod auth;

pub mod channels;
pub mod config;
pub mod delivery;
pub mod metrics;
pub mod queue;
pub mod server;
pub mod session;

pub use config::{EdgeConfig, Mode, RouteConfig, SlowPolicy};
pub use server::{Edge, EdgeState};
