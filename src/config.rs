//! The one typed configuration: flags, each with an `env =` twin, plus the TOML route file.
//! Everything is validated before any port is bound; a bad value is one line on stderr and exit
//! code 64 (EX_USAGE).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use switchyard_bus::{BusAuth, BusOptions, SaslMechanism, Secret};
use switchyard_edge::config::Loaded;
use switchyard_edge::config::{default_routes, parse_route_file};
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
    /// wss://: PEM certificate chain (with --tls-key); reloaded when the file changes or on SIGHUP
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires = "tls_key", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// wss://: PEM private key (with --tls-cert)
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert", global = true)]
    pub tls_key: Option<PathBuf>,
    /// File holding the key (>= 32 bytes) for `sy-sig`, an HMAC-SHA256 on every inbound record
    #[arg(long, env = "SWITCHYARD_IDENTITY_HMAC_KEY_FILE", global = true)]
    pub identity_hmac_key_file: Option<PathBuf>,
    /// File holding the key (>= 16 bytes) resume tokens are signed with, shared by the cluster
    /// (default: one drawn per process, so tokens work only on the edge that issued them)
    #[arg(long, env = "SWITCHYARD_RESUME_KEY_FILE", global = true)]
    pub resume_key_file: Option<PathBuf>,
    /// TLS to the broker: PEM CA bundle to trust (NATS: TLS required once any --bus-tls-* is set)
    #[arg(long, env = "SWITCHYARD_BUS_TLS_CA", global = true)]
    pub bus_tls_ca: Option<PathBuf>,
    /// TLS to the broker: client certificate (mutual TLS, with --bus-tls-key)
    #[arg(long, env = "SWITCHYARD_BUS_TLS_CERT", requires = "bus_tls_key", global = true)]
    pub bus_tls_cert: Option<PathBuf>,
    /// TLS to the broker: client key (with --bus-tls-cert)
    #[arg(long, env = "SWITCHYARD_BUS_TLS_KEY", requires = "bus_tls_cert", global = true)]
    pub bus_tls_key: Option<PathBuf>,
    /// Broker user name (NATS user/password, Kafka SASL); the password from --bus-password-file or env SWITCHYARD_BUS_PASSWORD
    #[arg(long, env = "SWITCHYARD_BUS_USER", global = true)]
    pub bus_user: Option<String>,
    /// Kafka SASL mechanism for --bus-user (over TLS: security.protocol=sasl_ssl)
    #[arg(long, env = "SWITCHYARD_BUS_SASL_MECHANISM", value_enum, global = true)]
    pub bus_sasl_mechanism: Option<SaslMechanism>,
    /// File holding the broker password for --bus-user (or the password itself in env SWITCHYARD_BUS_PASSWORD)
    #[arg(long, env = "SWITCHYARD_BUS_PASSWORD_FILE", global = true)]
    pub bus_password_file: Option<PathBuf>,
    /// File holding a NATS token (or the token itself in env SWITCHYARD_BUS_TOKEN)
    #[arg(long, env = "SWITCHYARD_BUS_TOKEN_FILE", global = true)]
    pub bus_token_file: Option<PathBuf>,
    /// File holding a NATS NKey user seed (SU…)
    #[arg(long, env = "SWITCHYARD_BUS_NKEY_SEED_FILE", global = true)]
    pub bus_nkey_seed_file: Option<PathBuf>,
    /// NATS .creds file (user JWT + seed, as nsc writes it)
    #[arg(long, env = "SWITCHYARD_BUS_CREDS_FILE", global = true)]
    pub bus_creds_file: Option<PathBuf>,
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
    #[command(flatten)]
    pub edge: EdgeConfig,
    #[command(flatten)]
    pub bus_options: BusOptions,
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

    /// Broker authentication from the --bus-user/--bus-*-file flags and the secret variables
    /// (read through `env`): at most one mechanism, every file readable, only for a broker.
    pub fn bus_auth(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<BusAuth>, String> {
        let password = file_or_env(
            "--bus-password-file",
            self.bus_password_file.as_deref(),
            BUS_PASSWORD_ENV,
            env,
        )?;
        let token = file_or_env("--bus-token-file", self.bus_token_file.as_deref(), BUS_TOKEN_ENV, env)?;
        let mut given: Vec<BusAuth> = Vec::new();
        match (&self.bus_user, password) {
            (Some(user), Some(password)) if !user.is_empty() => given.push(BusAuth::UserPassword {
                user: user.clone(),
                password,
            }),
            (Some(_), Some(_)) => return Err("--bus-user is empty".into()),
            (Some(_), None) => {
                return Err(format!(
                    "--bus-user needs a password: --bus-password-file or {BUS_PASSWORD_ENV}"
                ))
            }
            (None, Some(_)) => return Err("a bus password needs --bus-user".into()),
            (None, None) => {}
        }
        if let Some(mechanism) = self.bus_sasl_mechanism {
            match given.pop() {
                Some(BusAuth::UserPassword { user, password }) => given.push(BusAuth::Sasl {
                    mechanism,
                    user,
                    password,
                }),
                _ => return Err("--bus-sasl-mechanism needs --bus-user and a password".into()),
            }
        }
        given.extend(token.map(BusAuth::Token));
        if let Some(p) = &self.bus_nkey_seed_file {
            let seed = BusAuth::NkeySeed(read_secret("--bus-nkey-seed-file", p)?);
            seed.validate()
                .map_err(|e| format!("--bus-nkey-seed-file {}: {e}", p.display()))?;
            given.push(seed);
        }
        if let Some(p) = &self.bus_creds_file {
            let creds = BusAuth::Creds(read_secret_file("--bus-creds-file", p)?);
            creds
                .validate()
                .map_err(|e| format!("--bus-creds-file {}: {e}", p.display()))?;
            given.push(creds);
        }
        let auth = match given.len() {
            0 => return Ok(None),
            1 => given.remove(0),
            _ => {
                let names: Vec<&str> = given.iter().map(BusAuth::mechanism).collect();
                return Err(format!(
                    "broker authentication: {} given at once; give one",
                    names.join(" and ")
                ));
            }
        };
        match (self.bus.split("://").next().unwrap_or(""), &auth) {
            ("nats" | "tls", BusAuth::Sasl { .. }) => Err("--bus-sasl-mechanism is for kafka://".into()),
            ("nats" | "tls", _) | ("kafka", BusAuth::Sasl { .. }) => Ok(Some(auth)),
            ("kafka", BusAuth::UserPassword { .. }) => {
                Err("kafka:// with --bus-user needs --bus-sasl-mechanism SCRAM-SHA-512".into())
            }
            ("kafka", other) => Err(format!(
                "broker authentication ({}) is for nats://; kafka:// takes --bus-user with --bus-sasl-mechanism",
                other.mechanism()
            )),
            (scheme, _) => Err(format!(
                "broker authentication ({}) given for {scheme}://, which has no broker",
                auth.mechanism()
            )),
        }
    }
}

/// Environment variables that hold a broker secret itself (there is no flag for them: a flag
/// value shows in `ps`).
pub const BUS_PASSWORD_ENV: &str = "SWITCHYARD_BUS_PASSWORD";
pub const BUS_TOKEN_ENV: &str = "SWITCHYARD_BUS_TOKEN";

/// Reads a secret file: surrounding whitespace (a trailing newline) is dropped; empty is an error.
fn read_secret(flag: &str, path: &std::path::Path) -> Result<Secret, String> {
    let text = read_secret_file(flag, path)?;
    Ok(Secret::new(text.expose().trim()))
}

/// Reads a secret file as it is (a `.creds` file's format ends with a newline).
fn read_secret_file(flag: &str, path: &std::path::Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    if text.trim().is_empty() {
        return Err(format!("{flag} {} is empty", path.display()));
    }
    Ok(Secret::new(&text))
}

/// A secret from its file flag or its environment variable, not both.
fn file_or_env(
    flag: &str,
    path: Option<&std::path::Path>,
    var: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, String> {
    let from_env = env(var).map(|v| v.trim().to_owned());
    match (path, from_env) {
        (Some(_), Some(_)) => Err(format!("{flag} and {var} are both set: give the secret once")),
        (Some(p), None) => read_secret(flag, p).map(Some),
        (None, Some(v)) if v.is_empty() => Err(format!("{var} is empty")),
        (None, Some(v)) => Ok(Some(Secret::new(&v))),
        (None, None) => Ok(None),
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
    /// What validating `edge` loaded (verifiers, TLS); `None` for settings built by hand,
    /// which [`Settings::build`](crate::App) then validates.
    pub loaded: Option<Loaded>,
    pub naming: Naming,
    pub demo: bool,
}

impl Settings {
    /// Defaults for an embedded standalone node on ephemeral loopback ports (tests use this).
    pub fn for_tests() -> Self {
        let mut edge = EdgeConfig::new(generated_node_id());
        edge.shutdown_grace = Duration::from_secs(1);
        // In-process apps stop at the end of each test: no handover wait (tests/handover.rs
        // runs edges as processes with it).
        edge.handover_grace = Duration::ZERO;
        Self {
            command: Command::Standalone,
            bus_url: "memory://".into(),
            bus: BusOptions::default(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin: "127.0.0.1:0".parse().expect("addr"),
            edge,
            loaded: None,
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
        o.bus_options.validate()?;
        let naming = o.bus_options.naming().map_err(|e| format!("--prefix: {e}"))?;
        let (routes, channels) = match &o.routes {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read route file {}: {e}", path.display()))?;
                parse_route_file(&text)
                    .map_err(|e| format!("route file {}: {}", path.display(), e.trim().replace('\n', " ")))?
            }
            None => (default_routes(), Vec::new()),
        };
        let mut edge = o.edge.clone();
        edge.node_id = o.node_id.clone().unwrap_or_else(generated_node_id);
        edge.naming = naming.clone();
        edge.routes = routes;
        edge.channels = channels;
        edge.tls = match (&o.tls_cert, &o.tls_key) {
            (Some(cert), Some(key)) => Some(switchyard_edge::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        edge.resume_key = match &o.resume_key_file {
            Some(p) => {
                let k = std::fs::read(p).map_err(|e| format!("cannot read resume key {}: {e}", p.display()))?;
                Some(std::sync::Arc::new(k.trim_ascii().to_vec()))
            }
            None => None,
        };
        edge.identity_hmac_key = match &o.identity_hmac_key_file {
            Some(p) => {
                let k = std::fs::read(p).map_err(|e| format!("cannot read identity HMAC key {}: {e}", p.display()))?;
                Some(std::sync::Arc::new(k.trim_ascii().to_vec()))
            }
            None => None,
        };

        let loaded = edge.validate()?;
        if command == Command::Standalone && o.listen == o.admin && o.listen.port() != 0 {
            return Err(format!("--listen and --admin are both {}", o.listen));
        }
        let bus = BusOptions {
            name: format!("switchyard-{}", edge.node_id),
            tls: o.bus_tls()?,
            auth: o.bus_auth(&|var| std::env::var(var).ok())?,
            ..o.bus_options.clone()
        };

        Ok(Settings {
            command,
            bus_url: o.bus.clone(),
            bus,
            listen: o.listen,
            admin: o.admin,
            edge,
            loaded: Some(loaded),
            naming,
            demo: o.demo,
        })
    }
}
