//! Edge configuration: node-wide limits plus the route table (from a TOML file).

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::{valid_channel, valid_pattern, Naming};

/// How a route treats client frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Frames are opaque payloads, published unchanged.
    Raw,
    /// Frames are the framed JSON protocol (subscribe / unsubscribe / publish / send).
    Framed,
}

/// What happens when a socket's outgoing queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowPolicy {
    /// Drop the oldest queued message to make room (tickers, dashboards).
    DropOldest,
    /// Close the socket with code 4008 (ordered streams).
    Close,
}

/// One route: a WebSocket path mapped to an inbound topic and a mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Request path, e.g. `/ws/echo`.
    pub path: String,
    /// Inbound topic name (the bus name is `<prefix>.in.<topic>`).
    pub topic: String,
    pub mode: Mode,
    /// Framed routes: may clients publish to channels?
    #[serde(default)]
    pub allow_publish: bool,
    /// Outgoing queue length per socket (messages).
    #[serde(default = "default_queue")]
    pub queue_size: usize,
    #[serde(default = "default_slow")]
    pub slow_policy: SlowPolicy,
    /// Largest client message in bytes (default: the node's `max_message_size`).
    pub max_message_size: Option<usize>,
    /// Exact `Origin` values allowed (scheme://host[:port]); empty = any, including none.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Authentication at the handshake (`[route.auth]`); absent = anonymous.
    pub auth: Option<crate::auth::AuthConfig>,
    /// Per-session message rate (`[route.rate_limit]`); absent = unlimited (the node's frame
    /// flood budget still applies).
    pub rate_limit: Option<RateLimit>,
    /// Which channels may be subscribed to / published on (`[route.channels]`).
    #[serde(default)]
    pub channels: ChannelRules,
}

/// What happens to a client message over the session's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateAction {
    /// Framed routes: the message is not published and the client gets an `error` op with code
    /// `rate_limited` (and its `id`).
    Error,
    /// Close the socket with 1008 (policy violation).
    Close,
}

/// A token bucket per session.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub messages_per_second: u32,
    /// Bucket size (default: one second's worth).
    pub burst: Option<u32>,
    pub action: RateAction,
}

/// Channel authorization of a route. Patterns are dot-separated tokens where `*` matches one
/// token and a final `>` matches one or more (NATS style). A channel is allowed when it matches
/// the route's list (empty = any) and, when `[route.auth]` names a claim for the operation, a
/// pattern in that claim of the client's token.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRules {
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
}

fn default_queue() -> usize {
    1024
}
fn default_slow() -> SlowPolicy {
    SlowPolicy::DropOldest
}

/// History for the channels of one pattern (`[[channel]]` in the routes file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Channel pattern (`ticker.*`, `dash.>`, or one channel).
    pub pattern: String,
    /// Messages kept per channel, 1..=100000.
    pub history_size: usize,
    /// How long a message is kept, e.g. "10m" (1s..=30 days).
    #[serde(deserialize_with = "duration")]
    pub history_ttl: Duration,
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
}

/// Most messages a channel may keep.
pub const MAX_HISTORY_SIZE: usize = 100_000;

impl ChannelConfig {
    /// The limits as the bus takes them.
    pub fn limits(&self) -> switchyard_bus::HistoryLimits {
        switchyard_bus::HistoryLimits {
            size: self.history_size,
            ttl: self.history_ttl,
        }
    }
}

/// Checks `[[channel]]` tables: valid patterns in range, and no two overlapping (a channel
/// gets one log). The error is one line.
pub fn validate_channels(channels: &[ChannelConfig]) -> Result<(), String> {
    for (i, c) in channels.iter().enumerate() {
        if !valid_pattern(&c.pattern) {
            return Err(format!(
                "[[channel]] pattern {:?} is not a valid channel pattern",
                c.pattern
            ));
        }
        if c.history_size == 0 || c.history_size > MAX_HISTORY_SIZE {
            return Err(format!(
                "[[channel]] {}: history_size {} out of range 1..={MAX_HISTORY_SIZE}",
                c.pattern, c.history_size
            ));
        }
        if c.history_ttl < Duration::from_secs(1) || c.history_ttl > Duration::from_secs(30 * 86_400) {
            return Err(format!(
                "[[channel]] {}: history_ttl {:?} out of range 1s..=30 days",
                c.pattern, c.history_ttl
            ));
        }
        if let Some(o) = channels[..i]
            .iter()
            .find(|o| switchyard_protocol::patterns_overlap(&o.pattern, &c.pattern))
        {
            return Err(format!(
                "[[channel]] patterns {:?} and {:?} overlap: a channel may have one history",
                o.pattern, c.pattern
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    #[serde(rename = "route", default)]
    routes: Vec<RouteConfig>,
    #[serde(rename = "channel", default)]
    channels: Vec<ChannelConfig>,
}

/// Parses a routes TOML file's text (`[[route]]` tables).
pub fn parse_routes(text: &str) -> Result<Vec<RouteConfig>, String> {
    parse_route_file(text).map(|(routes, _)| routes)
}

/// Parses a routes TOML file's text: its `[[route]]` and its `[[channel]]` tables.
pub fn parse_route_file(text: &str) -> Result<(Vec<RouteConfig>, Vec<ChannelConfig>), String> {
    let f: RouteFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
    Ok((f.routes, f.channels))
}

/// The routes used when no file is given: `/ws/echo` (raw → `echo`) and `/ws` (framed → `app`,
/// publish allowed).
pub fn default_routes() -> Vec<RouteConfig> {
    parse_routes(DEFAULT_ROUTES).expect("built-in routes parse")
}

/// Built-in route table, also shipped as `examples/routes.toml`.
pub const DEFAULT_ROUTES: &str = r#"
[[route]]
path = "/ws/echo"
topic = "echo"
mode = "raw"
slow_policy = "close"

[[route]]
path = "/ws"
topic = "app"
mode = "framed"
allow_publish = true
slow_policy = "drop_oldest"
"#;

/// Node-wide edge settings. The tunables are flags of the binary (each with its `SWITCHYARD_*`
/// environment twin), flattened into its options: their defaults are written once, here, and
/// [`EdgeConfig::new`] takes the same defaults. The rest is filled in by the binary from other
/// flags (node id, prefix, route file, TLS files, the identity key).
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeConfig {
    #[arg(skip)]
    pub node_id: String,
    #[arg(skip)]
    pub naming: Naming,
    #[arg(skip = default_routes())]
    pub routes: Vec<RouteConfig>,
    /// Channel patterns with history (`[[channel]]` in the routes file).
    #[arg(skip)]
    pub channels: Vec<ChannelConfig>,
    /// Most messages a subscribe with `since` recovers; further behind, it answers
    /// recovered:false (and `rewind` is capped at it)
    #[arg(long, env = "SWITCHYARD_MAX_RECOVER", default_value_t = 1000, global = true)]
    pub max_recover: usize,
    /// How long a session whose socket dropped waits for the client to resume it (0 turns
    /// resume off): no disconnect is published meanwhile
    #[arg(long, env = "SWITCHYARD_RESUME_WINDOW", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub resume_window: Duration,
    /// Backend deliveries kept per session for a resume; more while the client is away and
    /// the resume is refused (resumed:false)
    #[arg(long, env = "SWITCHYARD_RESUME_BUFFER", default_value_t = 1000, global = true)]
    pub resume_buffer: usize,
    /// On SIGTERM, how long sessions closed with 1012 stay resumable on another edge (the
    /// drain waits for them; 0, memory://, or a bus that is down: they end at once; at most
    /// --resume-window)
    #[arg(long, env = "SWITCHYARD_HANDOVER_GRACE", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub handover_grace: Duration,
    /// The key resume tokens are signed with (from `--resume-key-file`); without one, each
    /// process draws its own (tokens then work on this process only)
    #[arg(skip)]
    pub resume_key: Option<std::sync::Arc<Vec<u8>>>,
    /// A page served at `GET /` (and its script at `GET /switchyard.js`) on the client
    /// listener: the demo's dashboard. `None`: no page is served.
    #[arg(skip)]
    pub page: Option<std::sync::Arc<Page>>,
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
    /// Refuse clients from these CIDRs at accept (comma-separated; checked before --allow-cidr)
    #[arg(
        long = "deny-cidr",
        env = "SWITCHYARD_DENY_CIDRS",
        value_delimiter = ',',
        global = true
    )]
    pub deny_cidrs: Vec<ipnet::IpNet>,
    /// Only accept clients from these CIDRs (comma-separated; default: any)
    #[arg(
        long = "allow-cidr",
        env = "SWITCHYARD_ALLOW_CIDRS",
        value_delimiter = ',',
        global = true
    )]
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// The TLS handshake, and then the HTTP request head, must each complete within this (slowloris)
    #[arg(long, env = "SWITCHYARD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub handshake_timeout: Duration,
    /// Largest HTTP request head in bytes (431 past it; 8192..=1048576)
    #[arg(long, env = "SWITCHYARD_MAX_HEADER_BYTES", default_value_t = 16 << 10, global = true)]
    pub max_header_bytes: usize,
    /// Most HTTP request headers (431 past it)
    #[arg(long, env = "SWITCHYARD_MAX_HEADERS", default_value_t = 64, global = true)]
    pub max_headers: usize,
    #[command(flatten)]
    pub frame_limits: crate::limits::FrameLimits,
    #[arg(skip)]
    pub tls: Option<crate::tls::TlsFiles>,
    /// On SIGTERM, how long sessions keep running (readyz already 503) before they are closed
    /// with 1012
    #[arg(long, env = "SWITCHYARD_DRAIN_GRACE", default_value = "0s", value_parser = humantime::parse_duration, global = true)]
    pub drain_grace: Duration,
    #[arg(skip)]
    pub identity_hmac_key: Option<std::sync::Arc<Vec<u8>>>,
    /// Framed routes: deepest JSON nesting of a client frame (its own object is level 1); deeper
    /// frames are answered bad_request and not published
    #[arg(long, env = "SWITCHYARD_MAX_JSON_DEPTH", default_value_t = switchyard_protocol::framed::DEFAULT_MAX_DEPTH, global = true)]
    pub max_json_depth: usize,
}

/// A static page and its script, served on the client listener (the demo's dashboard).
#[derive(Debug)]
pub struct Page {
    pub html: &'static str,
    pub script: &'static str,
}

/// What [`EdgeConfig::validate`] read from disk, taken by [`crate::Edge::start`] so that nothing
/// is loaded twice (and a file removed after validation cannot fail the start).
#[derive(Clone, Default)]
pub struct Loaded {
    /// The verifier of each route with `[route.auth]`, by path.
    pub verifiers: HashMap<String, Arc<crate::auth::Verifier>>,
    /// The wss:// certificate, when `tls` is set.
    pub tls: Option<Arc<crate::tls::TlsReloader>>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("verifiers", &self.verifiers.keys().collect::<Vec<_>>())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Deepest `max_json_depth` accepted: Python's `json` module, for one, fails near 1,000.
pub const MAX_JSON_DEPTH: usize = 512;

impl EdgeConfig {
    /// The `[[channel]]` whose pattern covers `channel`, if it keeps history.
    pub fn history_of(&self, channel: &str) -> Option<&ChannelConfig> {
        self.channels
            .iter()
            .find(|c| switchyard_protocol::pattern_matches(&c.pattern, channel))
    }

    /// The defaults of every flag above (the environment is not read), for `node_id`.
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            ..switchyard_bus::flag_defaults()
        }
    }

    /// Is a client at `ip` let in (deny list first, then the allow list if any)?
    pub fn ip_allowed(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        !self.deny_cidrs.iter().any(|n| n.contains(&ip))
            && (self.allow_cidrs.is_empty() || self.allow_cidrs.iter().any(|n| n.contains(&ip)))
    }

    /// Checks everything before any port is bound, and loads what the checks read from disk
    /// (route verifiers, the TLS pair) for [`crate::Edge::start`]. The error is one line.
    pub fn validate(&self) -> Result<Loaded, String> {
        let mut loaded = Loaded::default();
        if !valid_channel(&self.node_id) || self.node_id.contains('.') {
            return Err(format!(
                "invalid node id {:?}: use [A-Za-z0-9_-], no dots",
                self.node_id
            ));
        }
        if self.routes.is_empty() {
            return Err("no routes configured".into());
        }
        validate_channels(&self.channels)?;
        if self.resume_buffer == 0 || self.resume_buffer > MAX_HISTORY_SIZE {
            return Err(format!(
                "--resume-buffer {} out of range 1..={MAX_HISTORY_SIZE}",
                self.resume_buffer
            ));
        }
        if self.resume_window > Duration::from_secs(3600) {
            return Err(format!("--resume-window {:?} out of range 0..=1h", self.resume_window));
        }
        if self.resume_key.as_ref().is_some_and(|k| k.len() < 16) {
            return Err("--resume-key-file: the key must be at least 16 bytes".into());
        }
        if self.max_recover == 0 || self.max_recover > MAX_HISTORY_SIZE {
            return Err(format!(
                "--max-recover {} out of range 1..={MAX_HISTORY_SIZE}",
                self.max_recover
            ));
        }
        if self.max_message_size == 0 || self.max_message_size > 64 << 20 {
            return Err(format!(
                "max message size {} out of range 1..=64MiB",
                self.max_message_size
            ));
        }
        if self.ping_interval.is_zero() || self.idle_timeout <= self.ping_interval {
            return Err(format!(
                "idle timeout ({:?}) must be longer than the ping interval ({:?}), and both non-zero",
                self.idle_timeout, self.ping_interval
            ));
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 || self.max_connections_per_user == 0 {
            return Err("connection caps must be at least 1".into());
        }
        if self.handshake_timeout < Duration::from_millis(100) || self.handshake_timeout > Duration::from_secs(300) {
            return Err(format!(
                "handshake timeout {:?} out of range 100ms..=5m",
                self.handshake_timeout
            ));
        }
        if !(8192..=1 << 20).contains(&self.max_header_bytes) {
            return Err(format!(
                "max header bytes {} out of range 8192..=1048576",
                self.max_header_bytes
            ));
        }
        if !(8..=1024).contains(&self.max_headers) {
            return Err(format!("max headers {} out of range 8..=1024", self.max_headers));
        }
        if self.frame_limits.frames_per_second == 0 || self.frame_limits.control_per_second == 0 {
            return Err("frame flood budgets must be at least 1 per second".into());
        }
        if let Some(t) = &self.tls {
            loaded.tls = Some(crate::tls::TlsReloader::new(t.clone()).map_err(|e| format!("TLS: {e}"))?);
        }
        if self.identity_hmac_key.as_ref().is_some_and(|k| k.len() < 32) {
            return Err("identity HMAC key shorter than 32 bytes".into());
        }
        if !(1..=MAX_JSON_DEPTH).contains(&self.max_json_depth) {
            return Err(format!(
                "max JSON depth {} out of range 1..={MAX_JSON_DEPTH}",
                self.max_json_depth
            ));
        }
        if self.lease < Duration::from_secs(1) || self.lease > Duration::from_secs(3600) {
            return Err(format!("lease {:?} out of range 1s..=1h", self.lease));
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.routes {
            let at = format!("route {:?}", r.path);
            if !r.path.starts_with('/') || r.path.contains(['?', '#', ' ']) {
                return Err(format!("{at}: path must start with '/' and hold no '?', '#' or spaces"));
            }
            if !seen.insert(r.path.as_str()) {
                return Err(format!("{at}: duplicate path"));
            }
            // One token: on NATS the inbound subject is <prefix>.in.<topic>.p<N>, and a dot in
            // the topic would make one route's subjects match another's.
            if !valid_channel(&r.topic) || r.topic.contains('.') {
                return Err(format!(
                    "{at}: invalid topic {:?}: one token of [A-Za-z0-9_-], no dots",
                    r.topic
                ));
            }

            if r.queue_size == 0 || r.queue_size > 1 << 20 {
                return Err(format!("{at}: queue_size {} out of range 1..=1048576", r.queue_size));
            }
            if r.max_message_size.is_some_and(|m| m == 0 || m > 64 << 20) {
                return Err(format!("{at}: max_message_size out of range 1..=64MiB"));
            }
            if r.allow_publish && r.mode == Mode::Raw {
                return Err(format!("{at}: allow_publish applies to framed routes only"));
            }
            for o in &r.allowed_origins {
                let ok = (o.starts_with("https://") || o.starts_with("http://"))
                    && !o.ends_with('/')
                    && !o[o.find("://").map_or(0, |i| i + 3)..].contains(['/', '*', ' ']);
                if !ok {
                    return Err(format!(
                        "{at}: allowed origin {o:?} must be exactly scheme://host[:port]"
                    ));
                }
            }
            if let Some(a) = &r.auth {
                let v = crate::auth::Verifier::load(a).map_err(|e| format!("{at}: auth: {e}"))?;
                loaded.verifiers.insert(r.path.clone(), Arc::new(v));
            }
            if let Some(rl) = &r.rate_limit {
                if rl.messages_per_second == 0 || rl.burst == Some(0) {
                    return Err(format!("{at}: rate_limit needs messages_per_second and burst >= 1"));
                }
                if rl.action == RateAction::Error && r.mode == Mode::Raw {
                    return Err(format!(
                        "{at}: rate_limit action \"error\" needs a framed route (raw clients have no error op): use \"close\""
                    ));
                }
            }
            for p in r.channels.subscribe.iter().chain(&r.channels.publish) {
                if !valid_pattern(p) {
                    return Err(format!("{at}: invalid channel pattern {p:?}"));
                }
            }
        }
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_protocol::pattern_matches as channel_matches;

    #[test]
    fn shipped_example_is_the_default() {
        let shipped = parse_routes(include_str!("../../examples/routes.toml")).unwrap();
        let fmt = |r: &[RouteConfig]| format!("{r:?}");
        assert_eq!(fmt(&shipped), fmt(&default_routes()));
    }

    #[test]
    fn channel_patterns() {
        assert!(channel_matches("ticker.*", "ticker.btc"));
        assert!(!channel_matches("ticker.*", "ticker.btc.usd"));
        assert!(!channel_matches("ticker.*", "ticker"));
        assert!(channel_matches("ticker.>", "ticker.btc.usd"));
        assert!(!channel_matches("ticker.>", "ticker"));
        assert!(channel_matches("a.b", "a.b"));
        assert!(!channel_matches("a.b", "a.bc"));
        assert!(!channel_matches("a.b", "a.b.c"));
        assert!(channel_matches(">", "x.y"));
        assert!(valid_pattern("ticker.*") && valid_pattern("a.>") && valid_pattern("*"));
        assert!(!valid_pattern("a.>.b") && !valid_pattern("a..b") && !valid_pattern("a b"));
    }

    #[test]
    fn channel_history_tables() {
        let (routes, channels) = parse_route_file(
            "[[route]]\npath='/ws'\ntopic='t'\nmode='framed'\n\
             [[channel]]\npattern='ticker.*'\nhistory_size=1000\nhistory_ttl='10m'\n",
        )
        .unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(channels[0].history_ttl, Duration::from_secs(600));
        let mut c = EdgeConfig::new("n1");
        c.channels = channels;
        c.validate().unwrap();
        assert_eq!(c.history_of("ticker.AAPL").map(|h| h.history_size), Some(1000));
        assert!(c.history_of("dash.x").is_none());
        let table = |p: &str, n: usize, ttl: u64| ChannelConfig {
            pattern: p.into(),
            history_size: n,
            history_ttl: Duration::from_secs(ttl),
        };
        for (channels, want) in [
            (vec![table("a..b", 1, 60)], "not a valid channel pattern"),
            (vec![table("a.*", 0, 60)], "history_size 0 out of range"),
            (vec![table("a.*", 100_001, 60)], "history_size 100001 out of range"),
            (vec![table("a.*", 10, 0)], "history_ttl"),
            (vec![table("a.*", 10, 60), table("a.b", 10, 60)], "overlap"),
        ] {
            let mut c = EdgeConfig::new("n1");
            c.channels = channels;
            let e = c.validate().unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let e = parse_route_file("[[channel]]\npattern='a'\nhistory_size=1\nhistory_ttl='soon'\n").unwrap_err();
        assert!(e.contains("soon"), "{e}");
        let mut c = EdgeConfig::new("n1");
        c.max_recover = 0;
        assert!(c.validate().unwrap_err().contains("--max-recover"));
    }

    #[test]
    fn cidr_rules() {
        let mut c = EdgeConfig::new("n1");
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(c.ip_allowed(ip("10.1.2.3")));
        c.deny_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(!c.ip_allowed(ip("10.1.2.3")));
        assert!(!c.ip_allowed(ip("::ffff:10.1.2.3")), "v4-mapped v6 is the v4 address");
        assert!(c.ip_allowed(ip("192.168.0.1")));
        c.allow_cidrs = vec!["192.168.0.0/16".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(c.ip_allowed(ip("192.168.0.1")) && c.ip_allowed(ip("::1")));
        assert!(!c.ip_allowed(ip("172.16.0.1")));
    }

    #[test]
    fn defaults_validate() {
        EdgeConfig::new("n1").validate().unwrap();
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let mut c = EdgeConfig::new("n1");
        c.routes[0].path = "ws".into();
        assert!(c.validate().unwrap_err().contains("must start with '/'"));
        let mut c = EdgeConfig::new("n1");
        c.routes[1].path = "/ws/echo".into();
        assert!(c.validate().unwrap_err().contains("duplicate"));
        let mut c = EdgeConfig::new("bad.node");
        assert!(c.validate().unwrap_err().contains("node id"));
        c.node_id = "n".into();
        c.routes[0].topic = "a b".into();
        assert!(c.validate().unwrap_err().contains("invalid topic"));
        assert!(parse_routes("[[route]]\npath='/x'\ntopic='t'\nmode='weird'")
            .unwrap_err()
            .contains("unknown variant"));
        assert!(parse_routes("[[route]]\npath='/x'\ntopic='t'\nmode='raw'\nbogus=1")
            .unwrap_err()
            .contains("unknown field"));
    }
}
