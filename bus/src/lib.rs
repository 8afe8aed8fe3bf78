//! The Bus seam: one trait, one implementation per URL scheme.
//!
//! - `memory://` ([`memory`]): embedded, single process, always compiled in; the default.
//! - `nats://` (`nats` module, cargo feature `nats`): core NATS subjects + JetStream KV.
//! - `kafka://` (`kafka` module, cargo feature `kafka`): rdkafka.
//! - [`pipeline`]: many publishes in flight, in order per key (for consumers that forward).
//!
//! A disabled scheme is a typed error ([`BusError::SchemeDisabled`]), not a panic. Counting and
//! logging happen once, in [`Instrumented`], never in the backends.
//!
//! Semantics every implementation keeps:
//! - `publish` resolves when the bus has taken the record, or returns an error; never a silent
//!   drop. Records published from one task to one topic with one key arrive in that order.
//! - `subscribe` resolves once the subscription is live: everything published afterwards is
//!   delivered to it.
//! - Subscriptions with the same `group` on the same pattern share the messages; with `memory://`
//!   a key always goes to the same member, so per-key order holds inside a group.

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
pub mod metrics;
#[cfg(feature = "nats")]
pub mod nats;
pub mod pipeline;

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;
use switchyard_protocol::{Headers, Naming};
use thiserror::Error;
use tokio::sync::mpsc;

/// One record on the bus: an optional key (the session id), text headers, opaque payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Bytes>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// A record as received by a subscriber.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Arc<str>,
    /// Position in the topic, when the bus has one (memory: a per-topic counter; Kafka: offset).
    pub offset: Option<u64>,
    pub record: Arc<Record>,
    /// With [`SubscribeOptions::acknowledged`] on a bus that commits positions (Kafka groups):
    /// call [`Ack::done`] once the message is handled; only then may its position be
    /// committed. `None` elsewhere.
    pub ack: Option<Ack>,
}

/// A group message's handle for telling the bus it has been handled (see [`Message::ack`]).
/// Dropped without [`Ack::done`], the message's position is never committed: after a crash or
/// a rebalance the group reads it again.
#[derive(Clone)]
pub struct Ack(Arc<dyn Fn() + Send + Sync>);

impl Ack {
    pub fn new(done: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(done))
    }
    /// The message is handled (forwarded, or dropped and counted).
    pub fn done(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ack")
    }
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// Only what is published after the subscription is live.
    #[default]
    Latest,
    /// Everything the bus still holds (Kafka: the log's beginning; memory and NATS core
    /// subjects hold nothing, so this is the same as `Latest` there).
    Earliest,
}

/// How to subscribe.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Members of one group share the messages instead of each getting all of them.
    pub group: Option<String>,
    pub start: StartFrom,
    /// With a group: the subscriber acknowledges each message ([`Message::ack`]) once handled,
    /// and only positions below every unacknowledged message are committed (Kafka). Without
    /// it, positions are committed as messages are received.
    pub acknowledged: bool,
}

impl SubscribeOptions {
    pub fn group(name: impl Into<String>) -> Self {
        Self {
            group: Some(name.into()),
            ..Self::default()
        }
    }
}

/// How much history the channels of one pattern keep (`[[channel]]` in the routes file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Messages kept per channel.
    pub size: usize,
    /// How long a message is kept.
    pub ttl: std::time::Duration,
}

/// Which retained messages a history read asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// Every retained message with an offset greater than this one.
    After(u64),
    /// The newest `n` retained messages.
    Last(usize),
}

/// A channel's history as read by [`Bus::history`].
///
/// Offsets on channels with history start at 1 on every bus (memory: a counter per channel;
/// NATS: the JetStream stream sequence, which grows but skips the other channels' messages of
/// the same stream; Kafka: the Kafka offset plus one), so 0 always means "before the first".
#[derive(Debug, Clone)]
pub struct HistoryRead {
    /// Changes whenever the channel's log is reset (memory: every start; NATS: the stream was
    /// recreated; Kafka: the topic was recreated). Offsets of another epoch mean nothing here.
    pub epoch: String,
    /// The newest message's offset (0: none yet). Live messages have greater offsets.
    pub last: u64,
    /// For [`HistoryQuery::After`]: nothing published after that offset has been dropped from
    /// the log, so `messages` (up to the read's limit) is everything after it.
    pub complete: bool,
    /// Oldest first, each with its offset.
    pub messages: Vec<Message>,
}

/// Where a [`Bus::scan`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanFrom {
    /// After this position of the topic (a [`Message::offset`] it gave).
    After(u64),
    /// At the first record stamped at or after this time (Unix ms).
    Since(i64),
}

/// A read of one key's records back from a topic's log ([`Bus::scan`]): what a resume after
/// a node's death needs of that node's delivery topic and of the session's inbound partition.
#[derive(Debug, Clone)]
pub struct ScanQuery {
    pub topic: String,
    /// Only records with this key (the session); only the partition holding it is read.
    pub key: String,
    pub from: ScanFrom,
    /// `None`: read up to the end the log had when the scan began. `Some((header, value))`:
    /// read on, past that end, until a record of the key carries that header value (it is
    /// the last one returned), for at most `wait`.
    pub until: Option<(&'static str, String)>,
    pub wait: std::time::Duration,
}

impl ScanQuery {
    /// True for the record `until` waits for.
    pub fn stops_at(&self, record: &Record) -> bool {
        self.until
            .as_ref()
            .is_some_and(|(h, v)| record.headers.get(h) == Some(v.as_str()))
    }
}

/// What a [`Bus::scan`] read.
#[derive(Debug, Clone, Default)]
pub struct ScanRead {
    /// The key's records, in log order, each with its position.
    pub records: Vec<Message>,
    /// With `until`: the record it waited for was found.
    pub reached: bool,
    /// Where the read stopped: the position of the last record read (of any key), or the
    /// position it started after when it read none. A later scan goes on `After` it.
    pub last: Option<u64>,
    /// False when the log no longer holds where the scan was asked to start (retention).
    pub complete: bool,
}

/// Errors a bus returns. `Overflow` and `Unavailable` are what a client is told about.
#[derive(Debug, Clone, Error)]
pub enum BusError {
    #[error("bus buffer full for {topic}")]
    Overflow { topic: String },
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("invalid bus URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("bus scheme {0}:// is not compiled into this binary (enable the `{0}` cargo feature)")]
    SchemeDisabled(&'static str),
    #[error("invalid topic or pattern {0:?}")]
    InvalidTopic(String),
    #[error("bus error: {0}")]
    Other(String),
    #[error("node lease lost: {0}")]
    LeaseLost(String),
    /// The broker refused our credentials (or wanted some and got none).
    #[error("authentication failed ({bus}, {mechanism})")]
    Auth { bus: &'static str, mechanism: &'static str },
}

impl BusError {
    /// Short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            BusError::Overflow { .. } => "overflow",
            BusError::Unavailable(_) => "unavailable",
            BusError::InvalidUrl { .. } => "invalid_url",
            BusError::SchemeDisabled(_) => "scheme_disabled",
            BusError::InvalidTopic(_) => "invalid_topic",
            BusError::Other(_) => "other",
            BusError::LeaseLost(_) => "lease_lost",
            BusError::Auth { .. } => "auth",
        }
    }
}

/// A live subscription. Dropping it unsubscribes.
pub struct Subscription {
    rx: mpsc::Receiver<Message>,
    _guard: Box<dyn Send + Sync>,
}

impl Subscription {
    pub fn new(rx: mpsc::Receiver<Message>, guard: impl Send + Sync + 'static) -> Self {
        Self {
            rx,
            _guard: Box::new(guard),
        }
    }
    /// Next message; `None` when the bus closed the subscription.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
    /// A message that is already waiting, without waiting for one.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }
    /// Receives up to `limit` ready messages into `buf` (waits for at least one).
    pub async fn recv_many(&mut self, buf: &mut Vec<Message>, limit: usize) -> usize {
        self.rx.recv_many(buf, limit).await
    }
}

/// The seam every bus implements.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// URL scheme, for logs and metric labels.
    fn scheme(&self) -> &'static str;
    /// Publishes one record. Returns the record's offset when the bus assigns one.
    async fn publish(&self, topic: &str, record: Record) -> Result<Option<u64>, BusError>;
    /// Subscribes to a topic, or a pattern with `*` (one token) and `>` (the rest).
    async fn subscribe(&self, pattern: &str, opts: SubscribeOptions) -> Result<Subscription, BusError>;
    /// True while the bus can take records (drives `/readyz`).
    fn is_ready(&self) -> bool;
    /// Waits until everything published so far has been handed to the bus.
    async fn flush(&self) -> Result<(), BusError>;
    /// Lets a compacted topic forget `key`: Kafka publishes a tombstone (the key with a null
    /// value, no headers), which compaction keeps in place of the key's earlier records and
    /// removes after the topic's `delete.retention.ms`. Buses that keep nothing per key (memory,
    /// NATS core subjects) have nothing to forget.
    async fn tombstone(&self, _topic: &str, _key: Bytes) -> Result<(), BusError> {
        Ok(())
    }
    /// The durable session registry this bus provides, if any (NATS: JetStream KV). Without
    /// one, routers build their registry from the `<prefix>.sessions` feed alone.
    fn registry(&self) -> Option<Arc<dyn SessionRegistry>> {
        None
    }
    /// Keeps history for every topic matching `pattern` (a channel pattern's full topic
    /// pattern). Called at start, before anything is published there; the subscriptions and
    /// reads of those topics then carry offsets (see [`HistoryRead`]).
    async fn keep_history(&self, _pattern: &str, _limits: HistoryLimits) -> Result<(), BusError> {
        Err(BusError::Other(format!(
            "{}:// keeps no channel history",
            self.scheme()
        )))
    }
    /// Reads a topic's history: `None` when the topic keeps none. At most `limit` messages.
    async fn history(
        &self,
        _topic: &str,
        _query: HistoryQuery,
        _limit: usize,
    ) -> Result<Option<HistoryRead>, BusError> {
        Ok(None)
    }
    /// True when node delivery topics are logs that [`Bus::scan`] can read back (Kafka).
    fn keeps_log(&self) -> bool {
        false
    }
    /// Reads one key's records back from a topic's log: `None` when this bus keeps no log of
    /// that topic (memory://, NATS core subjects).
    async fn scan(&self, _query: ScanQuery) -> Result<Option<ScanRead>, BusError> {
        Ok(None)
    }
}

/// Where a session lives, as stored in a durable registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry {
    pub node: String,
    pub route: String,
    /// The route's inbound topic, so a router can publish a synthetic disconnect there.
    pub inbound: String,
}

impl SessionEntry {
    /// `node\nroute\ninbound`: three lines, none of which may contain a newline.
    pub fn encode(&self) -> Bytes {
        Bytes::from(format!("{}\n{}\n{}", self.node, self.route, self.inbound))
    }
    pub fn decode(b: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.split('\n');
        let (node, route, inbound) = (it.next()?, it.next()?, it.next()?);
        Some(Self {
            node: node.into(),
            route: route.into(),
            inbound: inbound.into(),
        })
    }
}

/// A change in the durable registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    /// A session registered (`Some`) or unregistered (`None`).
    Session {
        session: String,
        entry: Option<SessionEntry>,
    },
    /// A node renewed its lease at `at_ms` (its clock); `revision` identifies this renewal.
    Heartbeat { node: String, at_ms: u64, revision: u64 },
    /// A node's lease record was removed (expired and handled, or the node left cleanly).
    NodeGone { node: String },
}

/// A durable session registry with node leases. Each edge renews one lease for all of its
/// sessions; when a node's lease lapses, exactly one router wins [`SessionRegistry::claim_expiry`]
/// and ends its sessions.
#[async_trait]
pub trait SessionRegistry: Send + Sync {
    async fn register(&self, session: &str, entry: &SessionEntry) -> Result<(), BusError>;
    async fn unregister(&self, session: &str) -> Result<(), BusError>;
    /// Renews the node's lease. With `last` (the revision of this node's previous renewal)
    /// it is a compare-and-set: [`BusError::LeaseLost`] if anyone else wrote or removed the
    /// lease since (a router ended the node's sessions). Returns the new revision.
    async fn heartbeat(&self, node: &str, last: Option<u64>) -> Result<u64, BusError>;
    /// The node left cleanly (its sessions were closed one by one): drop its lease record.
    async fn leave(&self, node: &str) -> Result<(), BusError>;
    /// Current contents as events, then live changes.
    async fn watch(&self) -> Result<mpsc::Receiver<RegistryEvent>, BusError>;
    async fn lookup(&self, session: &str) -> Result<Option<SessionEntry>, BusError>;
    /// Claims the expiry of `node`, whose last renewal the caller saw as `revision`. True for
    /// exactly one caller, and only if the node has not renewed since.
    async fn claim_expiry(&self, node: &str, revision: u64) -> Result<bool, BusError>;
}

/// Opens the bus named by `url`.
pub async fn connect(url: &str, opts: &BusOptions) -> Result<Arc<dyn Bus>, BusError> {
    let naming = opts.naming()?;
    let scheme = url.split("://").next().unwrap_or("");
    if !url.contains("://") {
        return Err(BusError::InvalidUrl {
            url: url.into(),
            reason: "expected SCHEME://…".into(),
        });
    }
    let inner: Arc<dyn Bus> = match scheme {
        "memory" => Arc::new(memory::MemoryBus::new(opts.buffer, opts.publish_timeout)),
        "nats" | "tls" => {
            #[cfg(feature = "nats")]
            {
                Arc::new(nats::NatsBus::connect(url, opts).await?)
            }
            #[cfg(not(feature = "nats"))]
            {
                return Err(BusError::SchemeDisabled("nats"));
            }
        }
        "kafka" => {
            #[cfg(feature = "kafka")]
            {
                Arc::new(kafka::KafkaBus::connect(url, opts).await?)
            }
            #[cfg(not(feature = "kafka"))]
            {
                return Err(BusError::SchemeDisabled("kafka"));
            }
        }
        other => {
            return Err(BusError::InvalidUrl {
                url: url.into(),
                reason: format!("unknown scheme {other:?} (memory, nats, kafka)"),
            })
        }
    };
    Ok(Arc::new(Instrumented { inner, naming }))
}

/// Checks a bus URL's shape without connecting (config validation, before any port is bound).
pub fn validate_url(url: &str) -> Result<(), String> {
    // Credentials in the URL would be a secret in a flag value (and in every error that names
    // the bus): refused, and the URL is not repeated.
    if url.contains('@') {
        return Err(
            "--bus: a URL with credentials (USER:PASSWORD@ or TOKEN@) is refused: use --bus-user with --bus-password-file, or --bus-token-file".into(),
        );
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "invalid bus URL {url:?}: expected memory://, nats://HOST:PORT or kafka://HOST:PORT"
        ));
    };
    match scheme {
        "memory" => Ok(()),
        "nats" | "tls" | "kafka" if rest.is_empty() => Err(format!("invalid bus URL {url:?}: missing host")),
        "nats" | "tls" => {
            if cfg!(feature = "nats") {
                Ok(())
            } else {
                Err(BusError::SchemeDisabled("nats").to_string())
            }
        }
        "kafka" => {
            if cfg!(feature = "kafka") {
                Ok(())
            } else {
                Err(BusError::SchemeDisabled("kafka").to_string())
            }
        }

        other => Err(format!(
            "invalid bus URL {url:?}: unknown scheme {other:?} (memory, nats, kafka)"
        )),
    }
}

/// Options common to every bus. The tunables are flags of the binary (each with its
/// `SWITCHYARD_*` environment twin), flattened into its options: the defaults are written once,
/// here, and [`BusOptions::default`] takes the same ones.
#[derive(Debug, Clone, clap::Args)]
pub struct BusOptions {
    /// Per-subscription bus buffer (messages)
    #[arg(
        long = "bus-buffer",
        env = "SWITCHYARD_BUS_BUFFER",
        default_value_t = 8192,
        global = true
    )]
    pub buffer: usize,
    /// Publishes that may wait while the bus is disconnected; past it, clients are told
    #[arg(long, env = "SWITCHYARD_OUTAGE_BUFFER", default_value_t = 1024, global = true)]
    pub outage_buffer: usize,
    /// How long a publisher waits for room in a full buffer before it is told `Overflow`.
    #[arg(skip = std::time::Duration::from_secs(1))]
    pub publish_timeout: std::time::Duration,
    /// Client name shown by the broker.
    #[arg(skip = String::from("switchyard"))]
    pub name: String,
    /// Prefix of every topic/subject name
    #[arg(long, env = "SWITCHYARD_PREFIX", default_value = "sy", global = true)]
    pub prefix: String,
    /// Partitions of each inbound topic (NATS subject token p<N>; murmur2(session) % N)
    #[arg(long, env = "SWITCHYARD_PARTITIONS", default_value_t = 16, global = true)]
    pub partitions: u32,
    /// NATS: backend → client traffic through JetStream streams: <PREFIX>_OUT (the routers'
    /// subject: one router at a time reads it, acknowledging each record once forwarded) and
    /// <PREFIX>_NODES (node deliveries, an hour: a session resumes from it after its edge was
    /// killed). false: core NATS, at most once (every process of a cluster should agree)
    #[arg(long = "nats-durable-replies", env = "SWITCHYARD_NATS_DURABLE_REPLIES", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub nats_durable_replies: bool,
    /// How long a durable publish (NATS stream, Kafka acks=all) may wait for the broker's
    /// acknowledgement before the client is told it was refused
    #[arg(long, env = "SWITCHYARD_ACK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub ack_timeout: std::time::Duration,
    /// TLS to the broker (NATS: required once set; Kafka: `security.protocol=ssl`).
    #[arg(skip)]
    pub tls: Option<BusTls>,
    /// How to authenticate to the broker (none: anonymous).
    #[arg(skip)]
    pub auth: Option<BusAuth>,
}

/// The defaults of a clap `Args` struct exactly as its attributes write them, without reading
/// the environment: what `new`/`default` of a flag-backed settings struct return, so that each
/// default is written once, in the flag's attribute.
pub fn flag_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults")).mut_args(|a| a.env(None));
    let matches = cmd
        .try_get_matches_from(["defaults"])
        .expect("every flag of a settings struct has a default");
    T::from_arg_matches(&matches).expect("defaults parse into their own struct")
}

/// TLS to the broker: a CA bundle to trust, and optionally a client certificate (mutual TLS).
/// All PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

/// A secret read from a file or the environment (a password, a token, a seed). `Debug` prints
/// `***` and there is no `Display`: its text reaches the broker through [`Secret::expose`] and
/// nothing else, never a log line or an error.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(text: &str) -> Self {
        Self(Arc::from(text))
    }
    /// The secret's text, for the one call that hands it to the broker's client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// How to authenticate to the broker; one mechanism at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusAuth {
    /// NATS user and password.
    UserPassword { user: String, password: Secret },
    /// NATS token.
    Token(Secret),
    /// NATS NKey: the user's seed (`SU…`); the server knows the public key.
    NkeySeed(Secret),
    /// NATS decentralised auth: a `.creds` file's contents (user JWT + its seed).
    Creds(Secret),
    /// Kafka SASL (always over TLS: `security.protocol=sasl_ssl`).
    Sasl {
        mechanism: SaslMechanism,
        user: String,
        password: Secret,
    },
}

/// A Kafka SASL mechanism (`--bus-sasl-mechanism`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name librdkafka's `sasl.mechanisms` and Kafka's brokers use.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl BusAuth {
    /// The mechanism's name, as error lines and docs spell it.
    pub fn mechanism(&self) -> &'static str {
        match self {
            BusAuth::UserPassword { .. } => "user/password",
            BusAuth::Token(_) => "token",
            BusAuth::NkeySeed(_) => "nkey",
            BusAuth::Creds(_) => "creds file",
            BusAuth::Sasl { mechanism, .. } => mechanism.name(),
        }
    }

    /// Checks the secret's shape before anything connects (an NKey seed must decode as a
    /// user seed, a `.creds` file must hold a JWT and a seed). The error is one line and
    /// never quotes the secret.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            #[cfg(feature = "nats")]
            BusAuth::NkeySeed(_) | BusAuth::Creds(_) => nats::validate_auth(self),
            _ => Ok(()),
        }
    }
}

impl BusOptions {
    /// The names derived from [`BusOptions::prefix`]: the one source of every topic name.
    pub fn naming(&self) -> Result<Naming, BusError> {
        Naming::new(&self.prefix).map_err(|_| BusError::InvalidTopic(self.prefix.chars().take(80).collect()))
    }

    /// Checks the ranges (config validation, before any port is bound). The error is one line.
    pub fn validate(&self) -> Result<(), String> {
        self.naming().map_err(|_| {
            format!(
                "--prefix: invalid prefix {:?}: use dot-separated tokens of [A-Za-z0-9_-]",
                self.prefix
            )
        })?;
        if self.partitions == 0 || self.partitions > 4096 {
            return Err(format!("--partitions {} out of range 1..=4096", self.partitions));
        }
        if self.buffer == 0 || self.buffer > 1 << 22 {
            return Err(format!("--bus-buffer {} out of range 1..=4194304", self.buffer));
        }
        Ok(())
    }
}

impl Default for BusOptions {
    fn default() -> Self {
        flag_defaults()
    }
}

/// Wraps a bus to count and log in one place.
pub struct Instrumented {
    inner: Arc<dyn Bus>,
    /// Classifies topics into bounded metric labels (`in`, `out`, `sessions`, `node`, `ch`).
    naming: Naming,
}

#[async_trait]
impl Bus for Instrumented {
    fn scheme(&self) -> &'static str {
        self.inner.scheme()
    }
    async fn publish(&self, topic: &str, record: Record) -> Result<Option<u64>, BusError> {
        let started = Instant::now();
        let res = self.inner.publish(topic, record).await;
        let class = self.naming.classify(topic).label();
        match &res {
            Ok(_) => {
                ::metrics::counter!(crate::metrics::PUBLISHED, "bus" => self.scheme(), "topic" => class).increment(1);
                ::metrics::histogram!(crate::metrics::PUBLISH_SECONDS, "bus" => self.scheme())
                    .record(started.elapsed());
            }
            Err(e) => {
                ::metrics::counter!(crate::metrics::PUBLISH_ERRORS, "bus" => self.scheme(), "topic" => class, "reason" => e.reason()).increment(1);
                tracing::debug!(topic, error = %e, "bus publish failed");
            }
        }
        res
    }
    async fn subscribe(&self, pattern: &str, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        let res = self.inner.subscribe(pattern, opts).await;
        if let Err(e) = &res {
            ::metrics::counter!(crate::metrics::SUBSCRIBE_ERRORS, "bus" => self.scheme(), "reason" => e.reason())
                .increment(1);
            tracing::warn!(pattern, error = %e, "bus subscribe failed");
        }
        res
    }
    fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }
    async fn flush(&self) -> Result<(), BusError> {
        self.inner.flush().await
    }
    async fn tombstone(&self, topic: &str, key: Bytes) -> Result<(), BusError> {
        let res = self.inner.tombstone(topic, key).await;
        if let Err(e) = &res {
            let class = self.naming.classify(topic).label();
            ::metrics::counter!(crate::metrics::PUBLISH_ERRORS, "bus" => self.scheme(), "topic" => class, "reason" => e.reason()).increment(1);
            tracing::debug!(topic, error = %e, "bus tombstone failed");
        }
        res
    }
    fn registry(&self) -> Option<Arc<dyn SessionRegistry>> {
        self.inner.registry()
    }
    async fn keep_history(&self, pattern: &str, limits: HistoryLimits) -> Result<(), BusError> {
        self.inner.keep_history(pattern, limits).await
    }
    async fn history(&self, topic: &str, query: HistoryQuery, limit: usize) -> Result<Option<HistoryRead>, BusError> {
        let started = Instant::now();
        let res = self.inner.history(topic, query, limit).await;
        match &res {
            Ok(_) => ::metrics::histogram!(crate::metrics::HISTORY_READ_SECONDS, "bus" => self.scheme())
                .record(started.elapsed()),
            Err(e) => {
                ::metrics::counter!(crate::metrics::HISTORY_READ_ERRORS, "bus" => self.scheme(), "reason" => e.reason())
                    .increment(1);
                tracing::warn!(topic, error = %e, "bus history read failed");
            }
        }
        res
    }
    fn keeps_log(&self) -> bool {
        self.inner.keeps_log()
    }
    async fn scan(&self, query: ScanQuery) -> Result<Option<ScanRead>, BusError> {
        let topic = query.topic.clone();
        let started = Instant::now();
        let res = self.inner.scan(query).await;
        match &res {
            Ok(Some(_)) => ::metrics::histogram!(crate::metrics::LOG_SCAN_SECONDS, "bus" => self.scheme())
                .record(started.elapsed()),
            Ok(None) => {}
            Err(e) => {
                ::metrics::counter!(crate::metrics::LOG_SCAN_ERRORS, "bus" => self.scheme(), "reason" => e.reason())
                    .increment(1);
                tracing::warn!(topic, error = %e, "bus log scan failed");
            }
        }
        res
    }
}

/// Validates a topic (no wildcards) or, with `pattern`, a subscription pattern.
pub fn check_name(name: &str, pattern: bool) -> Result<(), BusError> {
    if switchyard_protocol::naming::valid_dotted(name, pattern) {
        Ok(())
    } else {
        Err(BusError::InvalidTopic(name.chars().take(80).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(check_name("a.*.>", true).is_ok());
        assert!(check_name("a.*", false).is_err());
        assert!(check_name("a..b", true).is_err());
        assert!(check_name("a.>.b", true).is_err());
    }

    #[test]
    fn defaults_are_the_flags_defaults() {
        let d = BusOptions::default();
        assert_eq!((d.buffer, d.outage_buffer, d.partitions), (8192, 1024, 16));
        assert_eq!((d.prefix.as_str(), d.name.as_str()), ("sy", "switchyard"));
        assert_eq!(d.ack_timeout, std::time::Duration::from_secs(10));
        assert_eq!(d.publish_timeout, std::time::Duration::from_secs(1));
        d.validate().unwrap();
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let auth = BusAuth::UserPassword {
            user: "alice".into(),
            password: Secret::new("hunter2-very-secret"),
        };
        let opts = BusOptions {
            auth: Some(auth.clone()),
            ..BusOptions::default()
        };
        for text in [format!("{auth:?}"), format!("{opts:?}"), format!("{opts:#?}")] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("***") && text.contains("alice"), "{text}");
        }
        assert_eq!(Secret::new("t").expose(), "t");
    }

    #[test]
    fn urls() {
        assert!(validate_url("memory://").is_ok());
        assert!(validate_url("redis://x").is_err());
        assert!(validate_url("nats://").is_err());
        assert!(validate_url("localhost:4222").is_err());
        for url in [
            "nats://alice:hunter2@localhost:4222",
            "nats://s3cr3t@h",
            "kafka://u:p@h:9092",
        ] {
            let e = validate_url(url).unwrap_err();
            assert!(
                !e.contains("hunter2") && !e.contains("s3cr3t") && !e.contains(":p@"),
                "{e}"
            );
            assert!(e.contains("--bus-user"), "{e}");
        }
        assert!(validate_url("nats://a:4222,b:4222").is_ok());
    }
}
