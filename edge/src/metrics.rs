//! Every metric the edge reports, declared and described in one place, and the process's
//! Prometheus recorder. The bus's metrics are declared in `switchyard_bus::metrics` and the
//! router's in `switchyard_router::metrics`; [`install`] describes the bus's too (the binary
//! adds the router's). Labels are bounded: route path (from config), bus scheme, topic class,
//! reason. Never a session or user id.

use metrics::{describe_counter, describe_gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const CONNECTIONS_OPEN: &str = "switchyard_connections_open";
pub const HANDSHAKES: &str = "switchyard_handshakes_total";
pub const HANDSHAKE_REJECTED: &str = "switchyard_handshakes_rejected_total";
pub const FRAMES_IN: &str = "switchyard_frames_in_total";
pub const BYTES_IN: &str = "switchyard_bytes_in_total";
pub const FRAMES_OUT: &str = "switchyard_frames_out_total";
pub const BYTES_OUT: &str = "switchyard_bytes_out_total";
pub const DROPS: &str = "switchyard_drops_total";
pub const CLOSES: &str = "switchyard_closes_total";
pub const CHANNELS_ACTIVE: &str = "switchyard_channels_active";
pub const CHANNEL_MESSAGES: &str = "switchyard_channel_messages_total";
pub const DELIVERIES: &str = "switchyard_deliveries_total";
pub const TLS_RELOADS: &str = "switchyard_tls_reloads_total";
pub const RATE_LIMITED: &str = "switchyard_rate_limited_total";
pub const FORBIDDEN: &str = "switchyard_forbidden_total";
pub const DRAINING: &str = "switchyard_draining";
pub const RECOVERIES: &str = "switchyard_recoveries_total";
pub const RESUMES: &str = "switchyard_resumes_total";
pub const SESSIONS_PARKED: &str = "switchyard_sessions_parked";
pub const HANDOVERS: &str = "switchyard_handovers_total";
pub const DUPLICATES: &str = "switchyard_duplicates_suppressed_total";
pub const RECOVERED_MESSAGES: &str = "switchyard_recovered_messages_total";
pub const RESUME_BUFFER: &str = "switchyard_resume_buffer_deliveries";
pub const RESUME_BUFFER_MAX: &str = "switchyard_resume_buffer_max_deliveries";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle());
            describe();
            switchyard_bus::metrics::describe();
            let h = handle.clone();
            // The exporter keeps histogram buckets until rendered; trim them periodically.
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    h.run_upkeep();
                })
                .ok();
            handle
        })
        .clone()
}

fn describe() {
    describe_gauge!(CONNECTIONS_OPEN, "WebSocket connections currently open, by route");
    describe_counter!(HANDSHAKES, "Successful WebSocket upgrades, by route");
    describe_counter!(HANDSHAKE_REJECTED, "Handshakes refused before upgrade, by reason");
    describe_counter!(FRAMES_IN, "Client data frames read, by route");
    describe_counter!(BYTES_IN, Unit::Bytes, "Client payload bytes read, by route");
    describe_counter!(FRAMES_OUT, "Data frames written to clients, by route");
    describe_counter!(
        BYTES_OUT,
        Unit::Bytes,
        "Bytes written to clients (whole WebSocket frames), by route"
    );
    describe_counter!(DROPS, "Messages not delivered or not published, by route and reason");
    describe_counter!(CLOSES, "Sockets closed, by route and close code");
    describe_gauge!(
        CHANNELS_ACTIVE,
        "Channels with at least one local subscriber (one bus subscription each)"
    );
    describe_counter!(
        CHANNEL_MESSAGES,
        "Channel messages received from the bus for local fan-out"
    );
    describe_counter!(DELIVERIES, "Records received on this node's delivery subject, by kind");
    describe_counter!(TLS_RELOADS, "TLS certificate reloads, by result (ok, error)");
    describe_counter!(
        RATE_LIMITED,
        "Client messages over a session's rate, by route and action (error, close)"
    );
    describe_counter!(
        FORBIDDEN,
        "Subscribe or publish refused by channel authorization, by route and op"
    );
    describe_gauge!(DRAINING, "1 once the node has started draining (SIGTERM), else 0");
    describe_counter!(
        RECOVERIES,
        "Subscribes with since or rewind, by result (recovered, not_recovered, rewind, overrun, error)"
    );
    describe_counter!(
        RESUMES,
        "Handshakes that asked to resume a session, by result (resumed, or why not)"
    );
    describe_gauge!(
        SESSIONS_PARKED,
        "Sessions whose socket dropped, waiting for a resume within --resume-window"
    );
    describe_counter!(
        HANDOVERS,
        "Steps of sessions moving between edges, by step (take, give, forward, end, hold, state) and result"
    );
    describe_counter!(
        DUPLICATES,
        "send/publish ops whose id the session had already accepted (acked, not published again)"
    );
    describe_gauge!(
        RESUME_BUFFER,
        "Backend deliveries kept for a resume, over every session of this node (at the last scrape)"
    );
    describe_gauge!(
        RESUME_BUFFER_MAX,
        "The most backend deliveries one session of this node keeps for a resume (at the last scrape)"
    );
    describe_counter!(
        RECOVERED_MESSAGES,
        "Channel history messages sent on subscribe (since and rewind)"
    );
}
