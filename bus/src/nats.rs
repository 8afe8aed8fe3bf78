//! `nats://` — filled in by the NATS issue.
