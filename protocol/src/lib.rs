//! The Switchyard wire contract, with no I/O.
//!
//! Everything a backend, an edge or a router must agree on lives here, as plain types with
//! encode/decode functions over [`bytes`]. Nothing in this crate opens a socket or spawns a task,
//! so every decoder can be property-tested in isolation.
//!
//! - [`envelope`]: the record a session produces or receives (session, node, seq, kind, route,
//!   opcode, identity, trace context, timestamp, reply subject, payload) and its mapping onto bus
//!   headers + an unchanged payload.
//! - [`naming`]: topic / subject names for inbound, outbound, registry, node delivery and channels.
//! - [`framed`]: the small JSON protocol spoken on `framed` routes.
//! - [`handover`]: the records that move a session from one edge to another.
//! - [`close`]: WebSocket close codes Switchyard uses, in one place.
//! - [`sign`]: the optional `sy-sig` HMAC an edge puts on every inbound record.
//! - [`ws`]: the WebSocket frame parser for client bytes (messages out, flood budgets charged
//!   per frame header), sans I/O: the edge's socket reader is a thin shell over it.

pub mod close;
pub mod envelope;
pub mod framed;
pub mod handover;
pub mod naming;
pub mod resume;
pub mod sign;
pub mod ws;

pub use envelope::{ControlOp, DecodeError, Envelope, Headers, Identity, Kind, Opcode, TraceContext, WIRE_VERSION};
pub use naming::{pattern_matches, patterns_overlap, valid_channel, valid_pattern, Naming, TopicClass};
