//! The one typed configuration: flags, each with an `env =` twin, plus the TOML route file.
//! Everything is validated before any port is bound; a bad value is one line on stderr and exit
//! code 64 (EX_USAGE).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use switchyard_bus::BusOptions;
use switchyard_edge::config::{default_routes, parse_routes};
use switchyard_edge::EdgeConfig;
use switchyard_protocol::Naming;

/// Switchyard: a WebSocket edge gateway that turns sockets into Kafka/NATS topics.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub opts: Options,
}

/// What this process runs. With no subcommand: `standalone`.
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum Command {
    /// Edge + router (+ demo backends with --demo) in one process, on any bus (default).
    Standalone,
    /// An edge node only: client sockets, inbound publishing, node delivery, channels.
    Edge,
    /// A router only: session registry and delivery of backend records to nodes.
    Router,
    /// The demo backends only (echo, app, ticker), as an external backend would run them.
    Demo,
    /// Print, re-drive or re-publish one session's recorded traffic (needs --bus kafka://)
    #[cfg(feature = "kafka")]
    Replay(crate::replay::ReplayArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct Options {
    /// Bus URL: memory:// (embedded, one process), nats://HOST:PORT or kafka://HOST:PORT
    #[arg(long, env = "SWITCHYARD_BUS", default_value = "memory://", global = true)]
    pub bus: String,
    /// Client WebSocket listener address
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "0.0.0.0:8080", global = true)]
    pub listen: SocketAddr,
    /// Admin listener address (/healthz, /readyz, /metrics, /api)
    #[arg(long, env = "SWITCHYARD_ADMIN", default_value = "127.0.0.1:9090", global = true)]
    pub admin: SocketAddr,
    /// Node id, [A-Za-z0-9_-] (default: generated, unique per start)
    #[arg(long, env = "SWITCHYARD_NODE_ID", global = true)]
    pub node_id: Option<String>,
    /// TOML route file with [[route]] tables (default: /ws/echo raw and /ws framed)
    #[arg(long, env = "SWITCHYARD_ROUTES", global = true)]
    pub routes: Option<PathBuf>,
    /// Also run the demo backends (echo on /ws/echo, app + demo.ticker channel on /ws)
    #[arg(long, env = "SWITCHYARD_DEMO", global = true)]
    pub demo: bool,
    /// Prefix of every topic/subject name
    #[arg(long, env = "SWITCHYARD_PREFIX", default_value = "sy", global = true)]
    pub prefix: String,
    /// Default largest client message in bytes (bigger closes with 1009)
    #[arg(long, env = "SWITCHYARD_MAX_MESSAGE_SIZE", default_value_t = 1 << 20, global = true)]
    pub max_message_size: usize,
    /// Interval between server pings, e.g. 20s
    #[arg(long, env = "SWITCHYARD_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration, global = true)]
    pub ping_interval: Duration,
    /// Close sockets silent (no frame, no pong) for this long, e.g. 60s
    #[arg(long, env = "SWITCHYARD_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long clients get to answer the close handshake
    #[arg(long, env = "SWITCHYARD_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_grace: Duration,
    /// Node lease in the durable registry (NATS KV): a node silent this long is dead and its
    /// sessions get synthetic disconnects
    #[arg(long, env = "SWITCHYARD_LEASE", default_value = "15s", value_parser = humantime::parse_duration, global = true)]
    pub lease: Duration,
    /// Partitions of each inbound topic (NATS subject token p<N>; murmur2(session) % N)
    #[arg(long, env = "SWITCHYARD_PARTITIONS", default_value_t = 16, global = true)]
    pub partitions: u32,
    /// Publishes that may wait while the bus is disconnected; past it, clients are told
    #[arg(long, env = "SWITCHYARD_OUTAGE_BUFFER", default_value_t = 1024, global = true)]
    pub outage_buffer: usize,
    /// How long a durable publish (NATS stream, Kafka acks=all) may wait for the broker's
    /// acknowledgement before the client is told it was refused
    #[arg(long, env = "SWITCHYARD_ACK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub ack_timeout: Duration,
    /// Most WebSocket connections this node holds (past it: 503 before the upgrade)
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = 100_000, global = true)]
    pub max_connections: usize,
    /// Most connections one client IP may hold (past it: 429 before the upgrade)
    #[arg(
        long,
        env = "SWITCHYARD_MAX_CONNECTIONS_PER_IP",
        default_value_t = 10_000,
        global = true
    )]
    pub max_connections_per_ip: usize,
    /// Most connections one authenticated subject may hold (past it: 429 before the upgrade)
    #[arg(
        long,
        env = "SWITCHYARD_MAX_CONNECTIONS_PER_USER",
        default_value_t = 1_000,
        global = true
    )]
    pub max_connections_per_user: usize,
    /// New connections per second one client IP may open, burst the same (past it: 429); 0 = off
    #[arg(long, env = "SWITCHYARD_CONNECT_RATE_PER_IP", default_value_t = 0, global = true)]
    pub connect_rate_per_ip: u32,
    /// Only accept clients from these CIDRs (comma-separated; default: any)
    #[arg(long, env = "SWITCHYARD_ALLOW_CIDRS", value_delimiter = ',', global = true)]
    pub allow_cidr: Vec<ipnet::IpNet>,
    /// Refuse clients from these CIDRs at accept (comma-separated; checked before --allow-cidr)
    #[arg(long, env = "SWITCHYARD_DENY_CIDRS", value_delimiter = ',', global = true)]
    pub deny_cidr: Vec<ipnet::IpNet>,
    /// The TLS handshake, and then the HTTP request head, must each complete within this (slowloris)
    #[arg(long, env = "SWITCHYARD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub handshake_timeout: Duration,
    /// Largest HTTP request head in bytes (431 past it; 8192..=1048576)
    #[arg(long, env = "SWITCHYARD_MAX_HEADER_BYTES", default_value_t = 16 << 10, global = true)]
    pub max_header_bytes: usize,
    /// Most HTTP request headers (431 past it)
    #[arg(long, env = "SWITCHYARD_MAX_HEADERS", default_value_t = 64, global = true)]
    pub max_headers: usize,
    /// Frames per second per socket, any kind incl. continuation (past it: close 1008)
    #[arg(
        long,
        env = "SWITCHYARD_MAX_FRAMES_PER_SECOND",
        default_value_t = 20_000,
        global = true
    )]
    pub max_frames_per_second: u32,
    /// Control frames (ping, pong, close) per second per socket (past it: close 1008)
    #[arg(
        long,
        env = "SWITCHYARD_MAX_CONTROL_FRAMES_PER_SECOND",
        default_value_t = 100,
        global = true
    )]
    pub max_control_frames_per_second: u32,
    /// wss://: PEM certificate chain (with --tls-key); reloaded when the file changes or on SIGHUP
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires = "tls_key", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// wss://: PEM private key (with --tls-cert)
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert", global = true)]
    pub tls_key: Option<PathBuf>,
    /// On SIGTERM, how long sessions keep running (readyz already 503) before they are closed
    /// with 1012
    #[arg(long, env = "SWITCHYARD_DRAIN_GRACE", default_value = "0s", value_parser = humantime::parse_duration, global = true)]
    pub drain_grace: Duration,
    /// File holding the key (>= 32 bytes) for `sy-sig`, an HMAC-SHA256 on every inbound record
    #[arg(long, env = "SWITCHYARD_IDENTITY_HMAC_KEY_FILE", global = true)]
    pub identity_hmac_key_file: Option<PathBuf>,
    /// TLS to the broker: PEM CA bundle to trust (NATS: TLS required once any --bus-tls-* is set)
    #[arg(long, env = "SWITCHYARD_BUS_TLS_CA", global = true)]
    pub bus_tls_ca: Option<PathBuf>,
    /// TLS to the broker: client certificate (mutual TLS, with --bus-tls-key)
    #[arg(long, env = "SWITCHYARD_BUS_TLS_CERT", requires = "bus_tls_key", global = true)]
    pub bus_tls_cert: Option<PathBuf>,
    /// TLS to the broker: client key (with --bus-tls-cert)
    #[arg(long, env = "SWITCHYARD_BUS_TLS_KEY", requires = "bus_tls_cert", global = true)]
    pub bus_tls_key: Option<PathBuf>,
    /// Framed routes: deepest JSON nesting of a client frame (its own object is level 1); deeper
    /// frames are answered bad_request and not published
    #[arg(long, env = "SWITCHYARD_MAX_JSON_DEPTH", default_value_t = switchyard_protocol::framed::DEFAULT_MAX_DEPTH, global = true)]
    pub max_json_depth: usize,
    /// Per-subscription bus buffer (messages)
    #[arg(long, env = "SWITCHYARD_BUS_BUFFER", default_value_t = 8192, global = true)]
    pub bus_buffer: usize,
    /// Log filter, tracing-subscriber syntax (e.g. info,switchyard_edge=debug)
    #[arg(long, env = "SWITCHYARD_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Log format
    #[arg(
        long,
        env = "SWITCHYARD_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

impl Options {
    /// Broker TLS from the --bus-tls-* flags; every named file must be readable.
    pub fn bus_tls(&self) -> Result<Option<switchyard_bus::BusTls>, String> {
        let files = [&self.bus_tls_ca, &self.bus_tls_cert, &self.bus_tls_key];
        if files.iter().all(|f| f.is_none()) {
            return Ok(None);
        }
        for f in files.into_iter().flatten() {
            std::fs::metadata(f).map_err(|e| format!("bus TLS file {}: {e}", f.display()))?;
        }
        Ok(Some(switchyard_bus::BusTls {
            ca: self.bus_tls_ca.clone(),
            cert: self.bus_tls_cert.clone(),
            key: self.bus_tls_key.clone(),
        }))
    }
}

/// Validated settings, ready to build an [`crate::App`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub command: Command,
    pub bus_url: String,
    pub bus: BusOptions,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub edge: EdgeConfig,
    pub naming: Naming,
    pub demo: bool,
}

impl Settings {
    /// Defaults for an embedded standalone node on ephemeral loopback ports (tests use this).
    pub fn for_tests() -> Self {
        let mut edge = EdgeConfig::new(generated_node_id());
        edge.shutdown_grace = Duration::from_secs(1);
        Self {
            command: Command::Standalone,
            bus_url: "memory://".into(),
            bus: BusOptions::default(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin: "127.0.0.1:0".parse().expect("addr"),
            edge,
            naming: Naming::default(),
            demo: true,
        }
    }
}

fn generated_node_id() -> String {
    let u = ulid::Ulid::new().to_string().to_lowercase();
    format!("node-{}", &u[16..])
}

impl Cli {
    /// Validates everything; the error is one line.
    pub fn settings(&self) -> Result<Settings, String> {
        let o = &self.opts;
        let command = self.command.clone().unwrap_or(Command::Standalone);

        switchyard_bus::validate_url(&o.bus)?;
        if o.bus.starts_with("memory://") && command != Command::Standalone {
            return Err(format!(
                "`switchyard {}` needs a shared bus (nats:// or kafka://): memory:// exists only inside one process",
                format!("{command:?}").to_lowercase()
            ));
        }
        if o.demo && command != Command::Standalone {
            return Err("--demo applies to standalone; run `switchyard demo` for the backends alone".into());
        }
        let naming = Naming::new(&o.prefix).map_err(|e| format!("--prefix: {e}"))?;
        let routes = match &o.routes {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read route file {}: {e}", path.display()))?;
                parse_routes(&text)
                    .map_err(|e| format!("route file {}: {}", path.display(), e.trim().replace('\n', " ")))?
            }
            None => default_routes(),
        };
        let mut edge = EdgeConfig::new(o.node_id.clone().unwrap_or_else(generated_node_id));
        edge.naming = naming.clone();
        edge.routes = routes;
        edge.max_message_size = o.max_message_size;
        edge.ping_interval = o.ping_interval;
        edge.idle_timeout = o.idle_timeout;
        edge.shutdown_grace = o.shutdown_grace;
        edge.lease = o.lease;
        edge.max_connections = o.max_connections;
        edge.max_connections_per_ip = o.max_connections_per_ip;
        edge.max_connections_per_user = o.max_connections_per_user;
        edge.connect_rate_per_ip = o.connect_rate_per_ip;
        edge.allow_cidrs = o.allow_cidr.clone();
        edge.deny_cidrs = o.deny_cidr.clone();
        edge.handshake_timeout = o.handshake_timeout;
        edge.max_header_bytes = o.max_header_bytes;
        edge.max_headers = o.max_headers;
        edge.frame_limits = switchyard_edge::limits::FrameLimits {
            frames_per_second: o.max_frames_per_second,
            control_per_second: o.max_control_frames_per_second,
        };
        edge.tls = match (&o.tls_cert, &o.tls_key) {
            (Some(cert), Some(key)) => Some(switchyard_edge::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        edge.drain_grace = o.drain_grace;
        edge.max_json_depth = o.max_json_depth;
        edge.identity_hmac_key = match &o.identity_hmac_key_file {
            Some(p) => {
                let k = std::fs::read(p).map_err(|e| format!("cannot read identity HMAC key {}: {e}", p.display()))?;
                Some(std::sync::Arc::new(k.trim_ascii().to_vec()))
            }
            None => None,
        };

        edge.validate()?;
        if o.partitions == 0 || o.partitions > 4096 {
            return Err(format!("--partitions {} out of range 1..=4096", o.partitions));
        }
        if o.bus_buffer == 0 || o.bus_buffer > 1 << 22 {
            return Err(format!("--bus-buffer {} out of range 1..=4194304", o.bus_buffer));
        }
        if command == Command::Standalone && o.listen == o.admin && o.listen.port() != 0 {
            return Err(format!("--listen and --admin are both {}", o.listen));
        }
        let bus = BusOptions {
            buffer: o.bus_buffer,
            outage_buffer: o.outage_buffer,
            name: format!("switchyard-{}", edge.node_id),
            prefix: o.prefix.clone(),
            partitions: o.partitions,
            ack_timeout: o.ack_timeout,
            tls: o.bus_tls()?,
            ..BusOptions::default()
        };

        Ok(Settings {
            command,
            bus_url: o.bus.clone(),
            bus,
            listen: o.listen,
            admin: o.admin,
            edge,
            naming,
            demo: o.demo,
        })
    }
}
