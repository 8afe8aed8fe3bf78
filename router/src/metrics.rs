//! Every metric the router reports, declared and described in one place. Labels are bounded:
//! a drop reason. Never a session id.

use metrics::{describe_counter, describe_gauge};

pub const FORWARDED: &str = "switchyard_router_forwarded_total";
pub const DROPPED: &str = "switchyard_router_dropped_total";
pub const SESSIONS: &str = "switchyard_router_sessions";
pub const EXPIRED: &str = "switchyard_router_expired_sessions_total";
pub const DOOMED: &str = "switchyard_router_doomed_sessions";

/// Describes every metric above to the installed recorder.
pub fn describe() {
    describe_counter!(FORWARDED, "Outbound records the router forwarded to a node");
    describe_counter!(DROPPED, "Outbound records the router could not forward, by reason");
    describe_gauge!(SESSIONS, "Sessions in this router's registry");
    describe_gauge!(
        DOOMED,
        "Sessions of nodes whose lease lapsed, waiting out the resume window (they end unless resumed elsewhere)"
    );
    describe_counter!(
        EXPIRED,
        "Sessions of nodes whose lease lapsed, ended by this router with a synthetic disconnect"
    );
}
