//! A ticker publisher as a separate program: publishes a JSON price tick to a channel on an
//! interval. Every edge with subscribers to the channel holds one subscription and fans the
//! tick out to its sockets.
//!
//! Run with:
//!   cargo run --example ticker -- --bus nats://127.0.0.1:4222 --channel ticker.SWYD --every 100ms
//! and subscribe from a framed route: {"op":"subscribe","channel":"ticker.SWYD"}

use bytes::Bytes;
use clap::Parser;
use std::time::Duration;
use switchyard_bus::{BusOptions, Record};
use switchyard_protocol::envelope::now_ms;
use switchyard_protocol::Naming;

#[derive(Parser)]
struct Args {
    /// Bus URL
    #[arg(long, env = "SWITCHYARD_BUS", default_value = "nats://127.0.0.1:4222")]
    bus: String,
    /// Topic prefix (as the gateway's --prefix)
    #[arg(long, env = "SWITCHYARD_PREFIX", default_value = "sy")]
    prefix: String,
    /// Channel to publish to
    #[arg(long, default_value = "ticker.SWYD")]
    channel: String,
    /// Interval between ticks
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Stop after this many ticks (0 = never)
    #[arg(long, default_value_t = 0)]
    count: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let naming = Naming::new(&args.prefix).map_err(anyhow::Error::msg)?;
    if !switchyard_protocol::valid_channel(&args.channel) {
        anyhow::bail!("invalid channel name {:?}", args.channel);
    }
    let opts = BusOptions {
        prefix: args.prefix.clone(),
        name: "example-ticker".into(),
        ..Default::default()
    };
    let bus = switchyard_bus::connect(&args.bus, &opts).await?;
    let topic = naming.channel(&args.channel);
    let mut tick = tokio::time::interval(args.every);
    let mut price = 100.0f64;
    for n in 0.. {
        if args.count != 0 && n >= args.count {
            break;
        }
        tick.tick().await;
        price = (price + ((n as f64) * 0.7).sin() * 0.5).max(1.0);
        let payload = format!(r#"{{"symbol":"SWYD","price":{price:.2},"seq":{n},"ts":{}}}"#, now_ms());
        let rec = Record {
            payload: Bytes::from(payload),
            ..Default::default()
        };
        if let Err(e) = bus.publish(&topic, rec).await {
            eprintln!("ticker: publish refused: {e}");
        }
    }
    bus.flush().await?;
    Ok(())
}
