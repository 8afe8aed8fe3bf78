//! The scenarios. Each returns one JSON object (see `BENCHMARKS.md` for the field list).
//!
//! Common shape of a message scenario:
//! 1. read the server's RSS and kernel memory at rest;
//! 2. ramp: N client tasks connect from round-robin source addresses, at most
//!    `--max-inflight` handshakes (connect + upgrade + subscribe) at a time;
//! 3. warm-up barrier: probes (seq 0, not counted) are published every 100 ms until every
//!    subscriber has seen one, so no subscription is still settling when counting starts;
//! 4. measured phase: the publisher follows its fixed schedule (open loop);
//! 5. drain: wait until every expected delivery arrived or `--drain` seconds passed;
//! 6. loss = expected − distinct received, duplicates counted separately, per client, exactly.
//!
//! `subscribe` and `publish` (in [`split`]) are the two halves of that shape in separate
//! processes, for runs where one process cannot hold every socket (scale-out over several edges).
//!
//! Layout (one file per concern, below `scenario/`):
//! - `measure.rs`: shared state of the client tasks, receive accounting, histograms, the
//!   server/kernel/CPU readings and the result's common JSON fields;
//! - `clients.rs`: dialing (sources, ramp permits, retries), the subscriber task, the ramp;
//! - `schedule.rs`: warm-up probes, the open-loop publish schedule, the drain;
//! - `fanout.rs`: `idle`, `dash`/`slow` and `hot`;
//! - `unicast.rs`: `unicast` and its pacer thread;
//! - `handshake.rs`: `handshake`;
//! - `split.rs`: `subscribe` and `publish`.

mod clients;
mod fanout;
mod handshake;
mod measure;
mod schedule;
mod split;
mod unicast;

use crate::{Args, Scenario};
use anyhow::Result;
use serde_json::Value;

pub(crate) async fn run(args: &Args) -> Result<Value> {
    let n = args.connections.unwrap_or_else(|| args.scenario.default_connections());
    let duration = args.duration.unwrap_or_else(|| args.scenario.default_duration());
    match args.scenario {
        Scenario::Idle => fanout::idle(args, n, duration).await,
        Scenario::Dash | Scenario::Slow => fanout::dash(args, n, duration).await,
        Scenario::Hot => fanout::hot(args, n).await,
        Scenario::Unicast => unicast::unicast(args, n, duration).await,
        Scenario::Handshake => handshake::handshake(args, n).await,
        Scenario::Subscribe => split::subscribe(args, n).await,
        Scenario::Publish => split::publish(args).await,
        Scenario::Sample => unreachable!("main runs the sampler, outside the runtime"),
    }
}
