//! Every metric the bus seam reports (counted once, in [`crate::Instrumented`], for every bus),
//! declared and described in one place. Labels are bounded: bus scheme, topic class, reason.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const PUBLISHED: &str = "switchyard_bus_published_total";
pub const PUBLISH_ERRORS: &str = "switchyard_bus_publish_errors_total";
pub const PUBLISH_SECONDS: &str = "switchyard_bus_publish_seconds";
pub const SUBSCRIBE_ERRORS: &str = "switchyard_bus_subscribe_errors_total";
pub const SLOW_CONSUMER: &str = "switchyard_bus_slow_consumer_total";
pub const READY: &str = "switchyard_bus_ready";
pub const HISTORY_READ_SECONDS: &str = "switchyard_bus_history_read_seconds";
pub const HISTORY_READ_ERRORS: &str = "switchyard_bus_history_read_errors_total";
pub const LOG_SCAN_SECONDS: &str = "switchyard_bus_log_scan_seconds";
pub const LOG_SCAN_ERRORS: &str = "switchyard_bus_log_scan_errors_total";

/// Describes every metric above to the installed recorder.
pub fn describe() {
    describe_counter!(PUBLISHED, "Records the bus accepted, by bus and topic class");
    describe_counter!(
        PUBLISH_ERRORS,
        "Records the bus refused, by bus, topic class and reason"
    );
    describe_histogram!(PUBLISH_SECONDS, Unit::Seconds, "Time for the bus to accept a record");
    describe_counter!(SUBSCRIBE_ERRORS, "Failed bus subscriptions, by reason");
    describe_counter!(
        SLOW_CONSUMER,
        "Times the broker reported this client as a slow consumer (messages dropped by NATS)"
    );
    describe_gauge!(READY, "1 while the bus can take records, else 0");
    describe_histogram!(
        HISTORY_READ_SECONDS,
        Unit::Seconds,
        "Time to read a channel's history (recovery, rewind, the history API)"
    );
    describe_counter!(HISTORY_READ_ERRORS, "Failed channel history reads, by reason");
    describe_histogram!(
        LOG_SCAN_SECONDS,
        Unit::Seconds,
        "Time to read a session's records back from a log (a resume after its node died)"
    );
    describe_counter!(LOG_SCAN_ERRORS, "Failed log scans, by reason");
}
