//! `loadgen`: the load generator of Switchyard's benchmarks: the peer comparison and the
//! scale-out run in BENCHMARKS.md.
//!
//! One invocation = one run of one scenario against one system; the result is one JSON line
//! (stdout, or appended to `--out`). `scripts/bench` drives it for every system × scenario.
//!
//! Run with:
//! `target/release/loadgen --system switchyard --scenario dash --url ws://127.0.0.1:8080/ws --publish ws://127.0.0.1:8080/ws --server-pid $(pgrep -n switchyard)`
//!
//! Scenarios (every count and duration is a flag; the defaults are the counts of the full run
//! in BENCHMARKS.md):
//! - `idle`: N subscribed connections held for `--duration`; server RSS per connection and
//!   kernel memory per connection.
//! - `dash`: N subscribers on one channel, `--rate` msg/s of `--payload` bytes.
//! - `hot`: N subscribers, the publisher ramps through `--hot-steps` msg/s; the highest step with
//!   zero loss and p99 ≤ `--p99-limit-ms` passed before the first failing one is the result
//!   (`best_rate`); the highest step with zero loss and p99 ≤ `--sustain-p99-ms` is reported
//!   beside it (`sustained_rate`), and the ramp goes on while steps sustain.
//! - `unicast`: N sessions, each sends `--per-session-rate` probes per second (default 1) that
//!   the system routes back to it. With `--framed-send` (Switchyard's framed `/ws` route), each
//!   probe is a `send` op with an `id`, the edge's acks are counted, and the reply is the
//!   backend's answer (`{"echo":…}` from the demo `app` backend, through the outbound topic and
//!   a router): the gateway side of the Kafka path in BENCHMARKS.md.
//! - `handshake`: N upgrades by `--connectors` concurrent connectors; upgrades/s.
//! - `slow`: `dash` where `--slow-fraction` of the clients stop reading after `--slow-after` s.
//! - `subscribe`: N subscribers only, for a publisher in another process (scale-out runs, several
//!   load generators on several edges): progress in `--status`, stop when `--stop-file` exists,
//!   then per-step exact loss/duplicate counts and latency histograms for `--hot-steps` ×
//!   `--step-secs`.
//! - `publish`: the publisher only: warm-up probes every `--probe-interval` s until `--go-file`
//!   exists, then `--hot-steps` × `--step-secs` on the fixed schedule, `--step-gap` s before each
//!   step.
//! - `sample`: no load: RSS and CPU time of the processes named on standard input (`NAME PID`
//!   lines) and the machine's busy time, every `--sample-secs`, one JSON line each, until standard
//!   input closes (the `/proc` sampler of the scale-out run; see `sampler.rs`).
//!
//! `subscribe` and `publish` stamp times as nanoseconds since the Unix epoch (the other scenarios
//! use the process's own clock origin), so latency stays receive − scheduled across processes.
//!
//! Latency is open loop: the publisher stamps each message with its *scheduled* send time and
//! latency = receive time − scheduled time, so a publisher or server that falls behind shows up
//! as latency instead of silently slowing the schedule.

mod nats;
mod payload;
mod procfs;
mod sampler;
mod scenario;
mod systems;
mod ws;

use clap::{Parser, ValueEnum};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use systems::System;

/// The scenarios of the peer comparison in BENCHMARKS.md, the two halves of the scale-out run
/// (`subscribe`, `publish`) and its `/proc` sampler (`sample`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Dash,
    Hot,
    Unicast,
    Handshake,
    Slow,
    Subscribe,
    Publish,
    Sample,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Dash => "dash",
            Scenario::Hot => "hot",
            Scenario::Unicast => "unicast",
            Scenario::Handshake => "handshake",
            Scenario::Slow => "slow",
            Scenario::Subscribe => "subscribe",
            Scenario::Publish => "publish",
            Scenario::Sample => "sample",
        }
    }
    /// The connection counts of the full run in BENCHMARKS.md.
    fn default_connections(self) -> usize {
        match self {
            Scenario::Idle | Scenario::Unicast | Scenario::Handshake | Scenario::Subscribe => 16_000,
            Scenario::Dash | Scenario::Slow => 10_000,
            Scenario::Hot => 2_000,
            Scenario::Publish | Scenario::Sample => 0,
        }
    }
    fn default_duration(self) -> f64 {
        match self {
            Scenario::Idle => 60.0,
            Scenario::Dash | Scenario::Unicast => 30.0,
            Scenario::Slow => 40.0,
            Scenario::Hot | Scenario::Handshake | Scenario::Subscribe | Scenario::Publish | Scenario::Sample => 0.0,
        }
    }
}

/// Load generator of the Switchyard benchmarks (one scenario, one system, one JSON line).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The system under test. Required by every scenario except `sample`.
    #[arg(long, value_enum)]
    system: Option<System>,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Client WebSocket URL (subscribers; unicast sessions; handshakes). Loopback only.
    /// Required by every scenario except `publish`.
    #[arg(long, default_value = "")]
    url: String,
    /// Publisher endpoint: ws:// URL (switchyard, baseline), HOST:PORT of core NATS (nats),
    /// http://…/publish/ (pushpin). Needed by dash, hot and slow.
    #[arg(long)]
    publish: Option<String>,
    /// Channel / subject name.
    #[arg(long, default_value = "bench")]
    channel: String,
    /// Connections (default per scenario: idle/unicast/handshake 16000, dash/slow 10000, hot 2000).
    #[arg(long)]
    connections: Option<usize>,
    /// Measured duration in seconds (default: idle 60, dash/unicast 30, slow 40).
    #[arg(long)]
    duration: Option<f64>,
    /// dash/slow publish rate, msg/s.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// unicast: probes per second per session.
    #[arg(long, default_value_t = 1.0)]
    per_session_rate: f64,
    /// unicast: send each probe as a framed `send` op with an `id` (`{"op":"send","id":K,
    /// "data":PROBE}`) and count the acks; for framed routes (Switchyard's `/ws`).
    #[arg(long)]
    framed_send: bool,
    /// Payload size in bytes (the JSON object as published).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// hot: publish rates of the ramp, msg/s (subscribe/publish: the steps, in order; both
    /// sides must be given the same steps and `--step-secs`).
    #[arg(long, value_delimiter = ',', default_value = "100,250,500,1000,2000,3000,4000,5000")]
    hot_steps: Vec<f64>,
    /// hot: seconds per step.
    #[arg(long, default_value_t = 5.0)]
    step_secs: f64,
    /// hot: a step passes with zero loss and p99 at most this (ms).
    #[arg(long, default_value_t = 25.0)]
    p99_limit_ms: f64,
    /// hot: a step *sustains* with zero loss and p99 at most this (ms): the publisher's rate
    /// was carried with a bounded backlog. The ramp goes on past a step that fails the p99 rule
    /// while steps sustain, so a rate can be compared where a peer passes no step.
    #[arg(long, default_value_t = 1000.0)]
    sustain_p99_ms: f64,
    /// hot: keep ramping after the first step that neither passes nor sustains (default: stop there).
    #[arg(long)]
    keep_ramping: bool,
    /// Most connection handshakes in flight during the ramp.
    #[arg(long, default_value_t = 2000)]
    max_inflight: usize,
    /// Retries of a failed connect + subscribe during the ramp (not in `handshake`).
    #[arg(long, default_value_t = 5)]
    retries: usize,
    /// handshake: concurrent connectors.
    #[arg(long, default_value_t = 64)]
    connectors: usize,
    /// slow: fraction of subscribers that stop reading.
    #[arg(long, default_value_t = 0.01)]
    slow_fraction: f64,
    /// slow: seconds into the measured phase when they stop.
    #[arg(long, default_value_t = 10.0)]
    slow_after: f64,
    /// slow: receive buffer of the slow clients' sockets (bytes), so backpressure reaches the
    /// server within the run.
    #[arg(long, default_value_t = 4096)]
    slow_rcvbuf: u32,
    /// Source addresses, round-robin over connections (each has its own ephemeral port range).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9"
    )]
    sources: Vec<IpAddr>,
    /// PID of the server (its whole process tree is measured: RSS, CPU).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Runtime worker threads (1 when pinned to one CPU).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Give up on connections not ready after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    ramp_timeout: f64,
    /// After the last publish, wait at most this long (s) for stragglers.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Append the JSON line to this file (stdout otherwise).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Free-form tag copied into the result (repetition number, mode, ...).
    #[arg(long, default_value = "")]
    tag: String,
    /// subscribe: progress (one JSON object) rewritten here every 250 ms.
    #[arg(long)]
    status: Option<PathBuf>,
    /// subscribe: stop (after `--drain`) once this file exists.
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// publish: start the steps once this file exists (warm-up probes until then).
    #[arg(long)]
    go_file: Option<PathBuf>,
    /// publish: seconds between warm-up probes (each one reaches every subscriber).
    #[arg(long, default_value_t = 0.1)]
    probe_interval: f64,
    /// publish: pause (s) before each step, so one step's backlog does not spill into the next.
    #[arg(long, default_value_t = 0.0)]
    step_gap: f64,
    /// subscribe/publish: give up after this many seconds in all (waiting for the go or stop
    /// file included).
    #[arg(long, default_value_t = 1200.0)]
    deadline: f64,
    /// sample: seconds between two readings.
    #[arg(long, default_value_t = 1.0)]
    sample_secs: f64,
}

impl Args {
    /// The system under test (`main` checks that it was given).
    fn system(&self) -> System {
        self.system.expect("--system is checked in main")
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.scenario == Scenario::Sample {
        return sampler::run(&args);
    }
    if args.system.is_none() {
        anyhow::bail!("--system is required by --scenario {}", args.scenario.name());
    }
    for ip in &args.sources {
        systems::check_loopback(*ip)?;
    }
    if args.scenario != Scenario::Publish {
        systems::target_addr(&args.url)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let result = rt.block_on(scenario::run(&args))?;
    let line = serde_json::to_string(&result)?;
    match &args.out {
        Some(p) => {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(p)?;
            writeln!(f, "{line}")?;
        }
        None => println!("{line}"),
    }
    // Exit without tearing 16k sockets down one by one.
    rt.shutdown_background();
    Ok(())
}
