//! An echo backend as a separate program: consumes a route's inbound topic and answers every
//! client frame with the same bytes and opcode, straight to the node holding the session (the
//! record's `sy-reply` subject), so replies keep their order.
//!
//! Run with:
//!   switchyard edge --bus nats://127.0.0.1:4222 &        # plus a router: switchyard router ...
//!   cargo run --example echo -- --bus nats://127.0.0.1:4222 --topic echo

use clap::Parser;
use switchyard_bus::{BusOptions, Record, SubscribeOptions};
use switchyard_protocol::envelope::now_ms;
use switchyard_protocol::{Envelope, Kind, Naming};

#[derive(Parser)]
struct Args {
    /// Bus URL
    #[arg(long, env = "SWITCHYARD_BUS", default_value = "nats://127.0.0.1:4222")]
    bus: String,
    /// Topic prefix (as the gateway's --prefix)
    #[arg(long, env = "SWITCHYARD_PREFIX", default_value = "sy")]
    prefix: String,
    /// Route topic to answer
    #[arg(long, default_value = "echo")]
    topic: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let naming = Naming::new(&args.prefix).map_err(anyhow::Error::msg)?;
    let opts = BusOptions {
        prefix: args.prefix.clone(),
        name: "example-echo".into(),
        ..Default::default()
    };
    let bus = switchyard_bus::connect(&args.bus, &opts).await?;
    let mut sub = bus
        .subscribe(&naming.inbound(&args.topic), SubscribeOptions::group("example-echo"))
        .await?;
    eprintln!("echo backend: answering {}", naming.inbound(&args.topic));
    while let Some(m) = sub.recv().await {
        let r = &m.record;
        let Ok(env) = Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()) else {
            continue;
        };
        if env.kind != Kind::Frame {
            continue;
        }
        let to = env.reply.clone().unwrap_or_else(|| naming.outbound());
        let mut reply = Envelope::new(env.session, Kind::Deliver, env.payload);
        reply.opcode = env.opcode;
        reply.trace = env.trace;
        reply.timestamp_ms = now_ms();
        let rec = Record {
            key: Some(reply.key()),
            headers: reply.headers(),
            payload: reply.payload,
        };
        if let Err(e) = bus.publish(&to, rec).await {
            eprintln!("echo backend: reply refused: {e}");
        }
    }
    Ok(())
}
