//! Demo backends. They use the bus exactly as an external backend would: consume a route's
//! inbound topic as a group, reply on the outbound topic keyed by session, publish to a channel.
//!
//! - `echo` (route `/ws/echo`, topic `echo`): every frame back, same bytes, same opcode, via the
//!   record's `sy-reply` subject (straight to the node holding the session, in order).
//! - `app` (route `/ws`, topic `app`): every `send` answered with `{"echo":<data>}` via the
//!   outbound topic and a router.
//! - `ticker`: a price tick on channel `demo.ticker` every 500 ms, with history (`demo.*` keeps
//!   its last 100 messages for 10 minutes unless the routes file says otherwise).

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use switchyard_bus::pipeline::Pipeline;
use switchyard_bus::{Ack, Bus, BusError, Record, SubscribeOptions, Subscription};
use switchyard_protocol::envelope::now_ms;
use switchyard_protocol::{Envelope, Kind, Naming};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The dashboard served at `GET /` with `--demo`: clients/js/demo/index.html and the built
/// SDK (clients/js/dist/switchyard.min.js, committed; `npm run build` in clients/js remakes it).
pub fn page() -> switchyard_edge::config::Page {
    switchyard_edge::config::Page {
        html: include_str!("../clients/js/demo/index.html"),
        script: include_str!("../clients/js/dist/switchyard.min.js"),
    }
}

/// The demo's ticker channel.
pub const TICKER: &str = "demo.ticker";

/// The history the demo gives `demo.*`: 100 messages, 10 minutes.
pub fn history() -> switchyard_edge::config::ChannelConfig {
    switchyard_edge::config::ChannelConfig {
        pattern: "demo.*".into(),
        history_size: 100,
        history_ttl: Duration::from_secs(600),
    }
}

/// Subscribes (live when this returns) and runs the demo backends until `shutdown`.
pub async fn start(bus: Arc<dyn Bus>, naming: Naming, shutdown: CancellationToken) -> Result<JoinHandle<()>, BusError> {
    let echo = bus
        .subscribe(&naming.inbound("echo"), acknowledged("demo-echo"))
        .await?;
    let app = bus.subscribe(&naming.inbound("app"), acknowledged("demo-app")).await?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = respond(bus.clone(), naming.clone(), echo, true, |p| p.clone()) => {}
            _ = respond(bus.clone(), naming.clone(), app, false, |p| {
                let mut v = Vec::with_capacity(p.len() + 10);
                v.extend_from_slice(b"{\"echo\":");
                v.extend_from_slice(p);
                v.push(b'}');
                Bytes::from(v)
            }) => {}
            _ = ticker(bus.clone(), naming.clone()) => {}
        }
    }))
}

/// Answers every client frame. `direct`: publish to the record's `sy-reply` subject when it
/// has one; otherwise to the outbound topic, for a router.
async fn respond(
    bus: Arc<dyn Bus>,
    naming: Naming,
    mut sub: Subscription,
    direct: bool,
    answer: impl Fn(&Bytes) -> Bytes,
) {
    let out = naming.outbound();
    // Replies in flight at once, in order per session (the pipeline keys them by session).
    let mut replies: Pipeline<Option<Ack>> = Pipeline::new(bus.clone(), DEMO_IN_FLIGHT);
    loop {
        let (full, busy) = (replies.is_full(), !replies.is_empty());
        let m = tokio::select! {
            (ack, res) = replies.next_done(), if busy => {
                if let Err(e) = res {
                    tracing::warn!(error = %e, "demo backend could not reply");
                }
                // Handled either way (a refused reply is logged, not retried).
                if let Some(a) = ack {
                    a.done();
                }
                continue;
            }
            m = sub.recv(), if !full => match m {
                Some(m) => m,
                None => break,
            },
        };
        let r = &m.record;
        let env = match Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()) {
            Ok(env) if env.kind == Kind::Frame => env,
            _ => {
                if let Some(a) = &m.ack {
                    a.done();
                }
                continue;
            }
        };
        let to = match (&env.reply, direct) {
            (Some(r), true) => r.clone(),
            _ => out.clone(),
        };
        let mut reply = Envelope::new(env.session, Kind::Deliver, answer(&env.payload));
        reply.opcode = env.opcode;
        reply.trace = env.trace;
        reply.timestamp_ms = now_ms();
        let rec = Record {
            key: Some(reply.key()),
            headers: reply.headers(),
            payload: reply.payload,
        };
        replies.push(to, rec, m.ack.clone());
    }
}

/// A group subscription whose positions are committed once each record is answered.
fn acknowledged(group: &str) -> SubscribeOptions {
    SubscribeOptions {
        acknowledged: true,
        ..SubscribeOptions::group(group)
    }
}

/// Replies a demo backend keeps in flight.
const DEMO_IN_FLIGHT: usize = 1024;

/// How often the demo ticker publishes a price on `demo.ticker`.
const TICK_EVERY: Duration = Duration::from_millis(500);

async fn ticker(bus: Arc<dyn Bus>, naming: Naming) {
    let topic = naming.channel(TICKER);
    let mut tick = tokio::time::interval(TICK_EVERY);
    let mut price = 100.0f64;
    for n in 0u64.. {
        tick.tick().await;
        // A deterministic wiggle: no RNG needed for a demo.
        price = (price + ((n as f64) * 0.7).sin() * 0.5).max(1.0);
        let payload = format!(r#"{{"symbol":"SWYD","price":{price:.2},"seq":{n},"ts":{}}}"#, now_ms());
        let rec = Record {
            key: None,
            headers: Default::default(),
            payload: Bytes::from(payload),
        };
        if let Err(e) = bus.publish(&topic, rec).await {
            tracing::warn!(error = %e, "ticker could not publish");
        }
    }
}
