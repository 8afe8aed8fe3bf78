//! `nats://`: core NATS for delivery, JetStream for durable inbound and the session registry.
//!
//! - Inbound topics (`<prefix>.in.<topic>`) are published to `<prefix>.in.<topic>.p<N>`, with
//!   N = Kafka's murmur2(key) % partitions, through JetStream: the stream `<PREFIX>_IN`
//!   captures `<prefix>.in.>` and publish returns only once the stream has acknowledged the
//!   record. Core NATS subscribers receive the same records live.
//! - With `--nats-durable-replies` (the default), backend → client traffic is on JetStream too:
//!   - node delivery subjects (`<prefix>.node.<id>`): the stream `<PREFIX>_NODES` keeps them
//!     for an hour; publishes to them are acknowledged by the stream, each edge reads its own
//!     through an ordered push consumer from "new" (offsets are stream sequences), and
//!     [`Bus::scan`] reads a session's records back from it (a resume after its edge died), as
//!     it does from `<PREFIX>_IN`;
//!   - the outbound subject (`<prefix>.out`): the work-queue stream `<PREFIX>_OUT`; an
//!     acknowledged group subscription (the routers) is one durable pull consumer named after
//!     the group, with a pinned client: one member at a time gets the records, in order, and
//!     acknowledges each once handled; when it stops pulling (killed) the pin moves to another
//!     member after [`PIN_TIMEOUT`], and what it had not acknowledged is delivered again after
//!     [`OUT_ACK_WAIT`] (at least once).
//! - Every other topic is a core NATS subject (at most once): channels without history, the
//!   session feed.
//! - Channels with history ([`Bus::keep_history`]): one stream per pattern,
//!   `<PREFIX>_CH_<hash>`, over the pattern's subjects with per-subject limits (count and age).
//!   Publishes to them are acknowledged by the stream, subscriptions are ordered push
//!   consumers from "new", and offsets are stream sequences. The epoch is a hash of the
//!   stream's creation time: a recreated stream has a new one.
//! - The session registry is the KV bucket `<prefix>_sessions` (see [`NatsRegistry`]).
//! - While disconnected, up to `outage_buffer` publishes wait for the reconnection (each at
//!   most `ack_timeout` for durable ones); past that, publish fails at once with `Unavailable`.

use crate::{
    check_name, Bus, BusAuth, BusError, BusOptions, HistoryLimits, HistoryQuery, HistoryRead, Message, Record,
    RegistryEvent, ScanFrom, ScanQuery, ScanRead, SessionEntry, SessionRegistry, SubscribeOptions, Subscription,
};
use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, HeaderValue};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::naming::partition_for;
use switchyard_protocol::{Headers, Naming};
use tokio::sync::mpsc;

/// Header carrying the record key (NATS messages have none).
pub const KEY_HEADER: &str = "sy-key";

pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    inbound_prefix: String,
    partitions: u32,
    buffer: usize,
    outage_buffer: usize,
    waiting: Arc<AtomicUsize>,
    registry: Arc<NatsRegistry>,
    naming: Naming,
    /// `keep_history` patterns, each with its stream.
    histories: parking_lot::RwLock<Vec<History>>,
    /// Node deliveries go through `<PREFIX>_NODES` (`--nats-durable-replies`).
    durable_replies: bool,
    /// `<prefix>.node.`
    node_prefix: String,
    /// `<prefix>.out`
    outbound: String,
}

/// How long `<PREFIX>_NODES` keeps a node delivery (a resume after an edge crash needs them
/// for the resume window, at most), and `<PREFIX>_OUT` a record no router took.
const NODE_LOG_AGE: Duration = Duration::from_secs(3600);
/// How long a group member that stopped pulling `<PREFIX>_OUT` keeps the pin (the failover
/// time after a router died).
pub const PIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a record of `<PREFIX>_OUT` handed to a member waits for its acknowledgement
/// before it is delivered again (to whoever holds the pin then): longer than a forward's own
/// wait for the node stream (`--ack-timeout`, 10 s by default), so a slow forward is not
/// delivered twice.
pub const OUT_ACK_WAIT: Duration = Duration::from_secs(15);
/// Records of `<PREFIX>_OUT` handed out and not acknowledged yet, at most.
const OUT_MAX_ACK_PENDING: i64 = 2048;
/// The priority group the members of an outbound group pull in.
const OUT_PRIORITY_GROUP: &str = "members";

/// One channel pattern with history.
#[derive(Clone)]
struct History {
    pattern: String,
    limits: HistoryLimits,
    stream: String,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// Returns once the server has processed everything this client sent before: a probe on a
/// fresh inbox, published after those commands, has come back.
async fn barrier(client: &async_nats::Client) -> Result<(), BusError> {
    let inbox = client.new_inbox();
    let mut probe = client.subscribe(inbox.clone()).await.map_err(unavailable)?;
    client.publish(inbox, bytes::Bytes::new()).await.map_err(unavailable)?;
    client.flush().await.map_err(unavailable)?;
    match tokio::time::timeout(Duration::from_secs(10), probe.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(unavailable("the server did not confirm the subscription within 10 s")),
    }
}

/// Checks an NKey seed or a `.creds` file's contents without connecting. Never quotes them.
pub(crate) fn validate_auth(auth: &BusAuth) -> Result<(), String> {
    match auth {
        BusAuth::NkeySeed(seed) => match nkeys::KeyPair::from_seed(seed.expose()) {
            Ok(kp) if kp.key_pair_type() == nkeys::KeyPairType::User => Ok(()),
            Ok(_) => Err("the NKey seed is not a user seed (SU…)".into()),
            Err(_) => Err("the NKey seed does not decode (expected one line SU…)".into()),
        },
        BusAuth::Creds(creds) => async_nats::ConnectOptions::with_credentials(creds.expose())
            .map(|_| ())
            .map_err(|_| "not a NATS credentials file (a user JWT and a user seed, as nsc writes it)".into()),
        _ => Ok(()),
    }
}

/// Client options carrying `auth`'s credentials.
fn with_auth(auth: Option<&BusAuth>) -> Result<async_nats::ConnectOptions, BusError> {
    use async_nats::ConnectOptions as O;
    Ok(match auth {
        None => O::new(),
        Some(BusAuth::UserPassword { user, password }) => {
            O::with_user_and_password(user.clone(), password.expose().to_owned())
        }
        Some(BusAuth::Token(t)) => O::with_token(t.expose().to_owned()),
        Some(BusAuth::NkeySeed(seed)) => O::with_nkey(seed.expose().to_owned()),
        Some(a @ BusAuth::Creds(creds)) => O::with_credentials(creds.expose()).map_err(|_| BusError::Auth {
            bus: "nats",
            mechanism: a.mechanism(),
        })?,
        Some(a @ BusAuth::Sasl { .. }) => {
            return Err(BusError::Other(format!("{} is a Kafka mechanism", a.mechanism())))
        }
    })
}

impl NatsBus {
    pub async fn connect(url: &str, opts: &BusOptions) -> Result<Self, BusError> {
        let mut connect = with_auth(opts.auth.as_ref())?;
        if let Some(t) = &opts.tls {
            connect = connect.require_tls(true);
            if let Some(ca) = &t.ca {
                connect = connect.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                connect = connect.add_client_certificate(cert.clone(), key.clone());
            }
        }
        let connect = connect
            .name(&opts.name)
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .subscription_capacity(opts.buffer.max(1024))
            .event_callback(|e| async move {
                match e {
                    async_nats::Event::Connected => tracing::info!("nats: connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats: disconnected"),
                    async_nats::Event::SlowConsumer(sid) => {
                        ::metrics::counter!(crate::metrics::SLOW_CONSUMER, "bus" => "nats").increment(1);
                        tracing::warn!(sid, "nats: slow consumer, messages dropped by the client");
                    }
                    other => tracing::info!(event = %other, "nats event"),
                }
            })
            .connect(url);
        // The first connect is not retried (a wrong secret fails at once: the server answers
        // `-ERR 'Authorization Violation'` and async-nats returns it). async-nats also logs
        // that failure itself, at ERROR; the error returned here is what the process prints,
        // as its one line, so async-nats's own events during this call are not shown.
        let client =
            tracing::instrument::WithSubscriber::with_subscriber(connect, tracing::subscriber::NoSubscriber::default())
                .await
                .map_err(|e| match e.kind() {
                    async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication => BusError::Auth {
                        bus: "nats",
                        mechanism: opts.auth.as_ref().map_or("no credentials given", BusAuth::mechanism),
                    },
                    _ => unavailable(format!("cannot connect to {url}: {e}")),
                })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(opts.ack_timeout);
        let naming = opts.naming()?;
        js.get_or_create_stream(stream::Config {
            name: naming.inbound_stream(),
            subjects: vec![naming.inbound(">")],
            max_age: Duration::from_secs(24 * 3600),
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(format!("cannot create the inbound stream: {e}")))?;
        if opts.nats_durable_replies {
            js.get_or_create_stream(stream::Config {
                name: naming.outbound_stream(),
                subjects: vec![naming.outbound()],
                max_age: NODE_LOG_AGE,
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::WorkQueue,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(format!("cannot create the outbound stream: {e}")))?;
            js.get_or_create_stream(stream::Config {
                name: naming.node_stream(),
                subjects: vec![naming.node(">")],
                max_age: NODE_LOG_AGE,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(format!("cannot create the node delivery stream: {e}")))?;
        }
        let bucket = naming.registry_bucket();
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    // Per-message TTLs, so the markers left by removals expire (below).
                    limit_markers: Some(MARKER_TTL),
                    ..Default::default()
                })
                .await
                .map_err(|e| unavailable(format!("cannot create KV bucket {bucket}: {e}")))?,
        };
        Ok(Self {
            client,
            js,
            inbound_prefix: naming.inbound(""),
            partitions: opts.partitions.max(1),
            buffer: opts.buffer.max(1),
            outage_buffer: opts.outage_buffer,
            waiting: Arc::default(),
            registry: Arc::new(NatsRegistry { kv }),
            durable_replies: opts.nats_durable_replies,
            node_prefix: naming.node(""),
            outbound: naming.outbound(),
            naming,
            histories: parking_lot::RwLock::default(),
        })
    }

    /// The history pattern covering `topic` (a topic, not a pattern), if any.
    fn history_of(&self, topic: &str) -> Option<History> {
        if topic.contains(['*', '>']) {
            return None;
        }
        self.histories
            .read()
            .iter()
            .find(|h| switchyard_protocol::pattern_matches(&h.pattern, topic))
            .cloned()
    }

    async fn stream(&self, name: &str) -> Result<stream::Stream, BusError> {
        self.js
            .get_stream(name)
            .await
            .map_err(|e| unavailable(format!("history stream {name}: {e}")))
    }

    /// A node delivery subject kept by `<PREFIX>_NODES` (a topic, not a pattern).
    fn is_logged_node(&self, topic: &str) -> bool {
        self.durable_replies && topic.starts_with(&self.node_prefix) && !topic.contains(['*', '>'])
    }

    /// An acknowledged group subscription to `<prefix>.out` (the routers): one durable pull
    /// consumer named after the group, pinned to one member at a time.
    async fn subscribe_outbound(&self, group: &str) -> Result<Subscription, BusError> {
        use jetstream::consumer::{pull, AckPolicy, PriorityPolicy};
        let fail = |e: &dyn std::fmt::Display| unavailable(format!("outbound consumer {group}: {e}"));
        let durable = group.replace(['.', '*', '>', ' '], "_");
        let consumer: jetstream::consumer::Consumer<pull::Config> = self
            .stream(&self.naming.outbound_stream())
            .await?
            .get_or_create_consumer(
                &durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: OUT_ACK_WAIT,
                    max_ack_pending: OUT_MAX_ACK_PENDING,
                    priority_policy: PriorityPolicy::PinnedClient,
                    priority_groups: vec![OUT_PRIORITY_GROUP.to_owned()],
                    priority_timeout: PIN_TIMEOUT,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| fail(&e))?;
        let mut messages = consumer
            .stream()
            .group(OUT_PRIORITY_GROUP)
            // Well below the pin timeout, so a live member keeps its pin between pulls.
            .expires(PIN_TIMEOUT / 3)
            .heartbeat(PIN_TIMEOUT / 6)
            .messages()
            .await
            .map_err(|e| fail(&e))?;
        let (tx, rx) = mpsc::channel(self.buffer);
        let topic: Arc<str> = Arc::from(self.outbound.as_str());
        let group = group.to_owned();
        let task = tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        // Heartbeats missed, a reconnect: the stream goes on pulling.
                        tracing::debug!(%group, error = %e, "outbound consumer");
                        continue;
                    }
                };
                let seq = m.info().map(|i| i.stream_sequence).ok();
                let (message, acker) = m.split();
                let mut msg = from_nats(message, topic.clone());
                msg.offset = seq;
                let acker = Arc::new(acker);
                msg.ack = Some(crate::Ack::new(move || {
                    let acker = acker.clone();
                    tokio::spawn(async move {
                        if let Err(e) = acker.ack().await {
                            tracing::debug!(error = %e, "outbound ack failed: the record comes again");
                        }
                    });
                }));
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
        Ok(Subscription::new(rx, AbortOnDrop(task)))
    }

    /// A live subscription to a topic kept by stream `stream` (a channel with history, a node
    /// delivery subject): an ordered push consumer from "new", so every message has its
    /// stream sequence.
    async fn subscribe_ordered(&self, topic: &str, stream: &str) -> Result<Subscription, BusError> {
        use jetstream::consumer::{push, DeliverPolicy};
        let consumer = self
            .stream(stream)
            .await?
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: topic.to_owned(),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(format!("stream consumer on {topic}: {e}")))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable(format!("stream consumer on {topic}: {e}")))?;
        let (tx, rx) = mpsc::channel(self.buffer);
        let name: Arc<str> = Arc::from(topic);
        let topic = topic.to_owned();
        let task = tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        // The ordered consumer recreates itself after gaps and reconnects;
                        // what it cannot recover from ends the subscription.
                        tracing::warn!(%topic, error = %e, "stream consumer ended");
                        break;
                    }
                };
                let seq = m.info().map(|i| i.stream_sequence).ok();
                let mut msg = from_nats(m.message, name.clone());
                msg.offset = seq;
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
        Ok(Subscription::new(rx, AbortOnDrop(task)))
    }

    /// Reads up to `want` messages of `topic` from `start`, none past `last`.
    async fn read_history(
        &self,
        stream: &stream::Stream,
        topic: &str,
        start: jetstream::consumer::DeliverPolicy,
        want: usize,
        last: u64,
    ) -> Result<(u64, Vec<Message>), BusError> {
        use jetstream::consumer::pull;
        let fail = |e: &dyn std::fmt::Display| unavailable(format!("reading the history of {topic}: {e}"));
        let mut consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: topic.to_owned(),
                deliver_policy: start,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&e))?;
        let pending = consumer.info().await.map_err(|e| fail(&e))?.num_pending;
        let mut out = Vec::new();
        if want == 0 || pending == 0 {
            return Ok((pending, out));
        }
        let name: Arc<str> = Arc::from(topic);
        let mut messages = consumer.messages().await.map_err(|e| fail(&e))?;
        while out.len() < want && (out.len() as u64) < pending {
            let m = match tokio::time::timeout(HISTORY_READ_TIMEOUT, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(fail(&e)),
                Ok(None) => break,
                Err(_) => return Err(fail(&"no message within 10 s")),
            };
            let seq = m.info().map_err(|e| fail(&e))?.stream_sequence;
            if seq > last {
                break;
            }
            let mut msg = from_nats(m.message, name.clone());
            msg.offset = Some(seq);
            out.push(msg);
        }
        Ok((pending, out))
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Admits one publish: immediately when connected; while disconnected, only while fewer
    /// than `outage_buffer` publishes already wait.
    fn admit(&self) -> Result<Waiting, BusError> {
        if self.connected() {
            return Ok(Waiting(None));
        }
        let n = self.waiting.fetch_add(1, Ordering::AcqRel);
        if n >= self.outage_buffer {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(BusError::Unavailable(
                "NATS is disconnected and the outage buffer is full".into(),
            ));
        }
        Ok(Waiting(Some(self.waiting.clone())))
    }

    /// An inbound topic's subject for this key, or None for other topics.
    fn inbound_subject(&self, topic: &str, key: Option<&[u8]>) -> Option<String> {
        let rest = topic.strip_prefix(&self.inbound_prefix)?;
        if rest.contains('.') {
            return None; // already a partition subject
        }
        let p = partition_for(key.unwrap_or(&[]), self.partitions);
        Some(format!("{topic}.p{p}"))
    }
}

/// Releases an outage-buffer slot when the publish finishes.
struct Waiting(Option<Arc<AtomicUsize>>);

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(w) = &self.0 {
            w.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// NATS header values may not hold CR or LF (async-nats panics on them): replace them. Values
/// can come from clients (a close reason) or tokens (a subject).
fn header_value(v: &str) -> HeaderValue {
    if v.contains(['\r', '\n']) {
        HeaderValue::from(v.replace(['\r', '\n'], " ").as_str())
    } else {
        HeaderValue::from(v)
    }
}

fn to_nats_headers(record: &Record) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in record.headers.iter() {
        h.insert(k, header_value(v));
    }
    if let Some(k) = &record.key {
        h.insert(KEY_HEADER, header_value(String::from_utf8_lossy(k).as_ref()));
    }
    h
}

fn from_nats(m: async_nats::Message, topic: Arc<str>) -> Message {
    let mut headers = Headers::new();
    let mut key = None;
    if let Some(h) = &m.headers {
        for (name, values) in h.iter() {
            let name: &str = name.as_ref();
            for v in values {
                if name.eq_ignore_ascii_case(KEY_HEADER) {
                    key = Some(Bytes::copy_from_slice(v.as_str().as_bytes()));
                } else {
                    headers.insert(name, v.as_str());
                }
            }
        }
    }
    Message {
        ack: None,
        topic,
        offset: None,
        record: Arc::new(Record {
            key,
            headers,
            payload: m.payload,
        }),
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn scheme(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, topic: &str, record: Record) -> Result<Option<u64>, BusError> {
        check_name(topic, false)?;
        let _slot = self.admit()?;
        let headers = to_nats_headers(&record);
        // A channel with history: acknowledged by its stream, which gives the offset.
        let durable = match self.inbound_subject(topic, record.key.as_deref()) {
            Some(subject) => Some(subject),
            None if self.is_logged_node(topic) || (self.durable_replies && topic == self.outbound) => {
                Some(topic.to_owned())
            }
            None => self.history_of(topic).map(|_| topic.to_owned()),
        };
        match durable {
            Some(subject) => {
                let ack = self
                    .js
                    .publish_with_headers(subject, headers, record.payload)
                    .await
                    .map_err(unavailable)?;
                let ack = ack.await.map_err(unavailable)?;
                Ok(Some(ack.sequence))
            }
            None => {
                self.client
                    .publish_with_headers(topic.to_owned(), headers, record.payload)
                    .await
                    .map_err(unavailable)?;
                Ok(None)
            }
        }
    }

    async fn subscribe(&self, pattern: &str, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        check_name(pattern, true)?;
        if opts.group.is_none() {
            if let Some(h) = self.history_of(pattern) {
                return self.subscribe_ordered(pattern, &h.stream).await;
            }
            if self.is_logged_node(pattern) {
                return self.subscribe_ordered(pattern, &self.naming.node_stream()).await;
            }
        }
        if let (Some(g), true, true) = (&opts.group, opts.acknowledged, self.durable_replies) {
            if pattern == self.outbound {
                return self.subscribe_outbound(g).await;
            }
        }
        // An inbound topic means all of its partitions.
        let (subject, strip) = match pattern.strip_prefix(&self.inbound_prefix) {
            Some(rest) if !rest.contains('.') && !rest.contains(['*', '>']) => (format!("{pattern}.*"), true),
            _ => (pattern.to_owned(), false),
        };
        let mut sub = match &opts.group {
            Some(g) => self.client.queue_subscribe(subject.clone(), g.clone()).await,
            None => self.client.subscribe(subject.clone()).await,
        }
        .map_err(unavailable)?;
        // Live on the server once it has processed the SUB: `flush` only writes it out, so
        // wait for a probe published after it on this connection (the server handles one
        // connection's commands in order).
        barrier(&self.client).await?;
        let (tx, rx) = mpsc::channel(self.buffer);
        let topic: Arc<str> = Arc::from(pattern);
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let t = if strip {
                    topic.clone()
                } else {
                    Arc::from(m.subject.as_str())
                };
                if tx.send(from_nats(m, t)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Subscription::new(rx, AbortOnDrop(task)))
    }

    fn is_ready(&self) -> bool {
        self.connected()
    }

    async fn flush(&self) -> Result<(), BusError> {
        self.client.flush().await.map_err(unavailable)
    }

    fn registry(&self) -> Option<Arc<dyn SessionRegistry>> {
        Some(self.registry.clone())
    }

    async fn keep_history(&self, pattern: &str, limits: HistoryLimits) -> Result<(), BusError> {
        check_name(pattern, true)?;
        let name = self.naming.history_stream(pattern);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![pattern.to_owned()],
            max_messages_per_subject: i64::try_from(limits.size).unwrap_or(i64::MAX),
            max_age: limits.ttl,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        };
        // Created by the first edge; the limits follow the config of the latest to start.
        self.js
            .create_or_update_stream(config)
            .await
            .map_err(|e| unavailable(format!("cannot create history stream {name} for {pattern}: {e}")))?;
        self.histories.write().push(History {
            pattern: pattern.to_owned(),
            limits,
            stream: name,
        });
        Ok(())
    }

    async fn history(&self, topic: &str, query: HistoryQuery, limit: usize) -> Result<Option<HistoryRead>, BusError> {
        use jetstream::consumer::DeliverPolicy;
        check_name(topic, false)?;
        let Some(h) = self.history_of(topic) else {
            return Ok(None);
        };
        let mut stream = self.stream(&h.stream).await?;
        let info = stream
            .info()
            .await
            .map_err(|e| unavailable(format!("history stream {}: {e}", h.stream)))?
            .clone();
        let epoch = epoch_of(&h.stream, &format!("{:?}", info.created));
        // The newest message of this channel: everything read is at or below it.
        let last = match stream.get_last_raw_message_by_subject(topic).await {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(e) => return Err(unavailable(format!("history of {topic}: {e}"))),
        };
        let (messages, complete) = match query {
            HistoryQuery::After(n) => {
                let (pending, messages) = self
                    .read_history(
                        &stream,
                        topic,
                        DeliverPolicy::ByStartSequence { start_sequence: n + 1 },
                        limit,
                        last,
                    )
                    .await?;
                // Nothing after `n` was dropped when: `n` is still stored (age removes the
                // oldest first, so nothing newer aged out), and either `n` is this channel's
                // own message (the per-channel limit removes a channel's oldest first) or
                // fewer than the limit follow it (so the limit never removed one of them).
                // `n` = 0 is "before the first": the stream must never have lost its front.
                let under_limit = pending < h.limits.size as u64;
                let complete = if n == 0 {
                    info.state.first_sequence <= 1 && under_limit
                } else if n > last {
                    false
                } else {
                    match stream.get_raw_message(n).await {
                        Ok(m) => m.subject.as_str() == topic || under_limit,
                        Err(_) => false,
                    }
                };
                (messages, complete)
            }
            HistoryQuery::Last(0) => (Vec::new(), true),
            HistoryQuery::Last(1) => {
                let messages = if last == 0 {
                    Vec::new()
                } else {
                    self.read_history(
                        &stream,
                        topic,
                        DeliverPolicy::ByStartSequence { start_sequence: last },
                        1,
                        last,
                    )
                    .await?
                    .1
                };
                (messages, true)
            }
            HistoryQuery::Last(k) => {
                // The stream cannot seek to "k from the end" of one subject: read them all
                // (at most the pattern's history size) and keep the newest k.
                let (_, mut all) = self
                    .read_history(&stream, topic, DeliverPolicy::All, h.limits.size, last)
                    .await?;
                let drop = all.len().saturating_sub(k.min(limit));
                all.drain(..drop);
                (all, true)
            }
        };
        Ok(Some(HistoryRead {
            epoch,
            last,
            complete,
            messages,
        }))
    }

    fn keeps_log(&self) -> bool {
        self.durable_replies
    }

    async fn scan(&self, q: ScanQuery) -> Result<Option<ScanRead>, BusError> {
        use jetstream::consumer::{pull, DeliverPolicy};
        check_name(&q.topic, false)?;
        let (stream_name, subject) = if self.is_logged_node(&q.topic) {
            (self.naming.node_stream(), q.topic.clone())
        } else if let Some(s) = self.inbound_subject(&q.topic, Some(q.key.as_bytes())) {
            (self.naming.inbound_stream(), s)
        } else {
            return Ok(None);
        };
        let fail = |e: &dyn std::fmt::Display| unavailable(format!("scan of {subject}: {e}"));
        let mut stream = self.stream(&stream_name).await?;
        let first = stream.info().await.map_err(|e| fail(&e))?.state.first_sequence;
        let (deliver_policy, complete, last) = match q.from {
            ScanFrom::After(o) => (
                DeliverPolicy::ByStartSequence { start_sequence: o + 1 },
                // Nothing after `o` was dropped by the stream's limits.
                o + 1 >= first,
                Some(o),
            ),
            ScanFrom::Since(ms) => {
                let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                    .map_err(|e| fail(&e))?;
                (DeliverPolicy::ByStartTime { start_time }, true, None)
            }
        };
        let mut consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&e))?;
        // What the stream holds now; with `until`, the scan reads on past it.
        let pending = consumer.info().await.map_err(|e| fail(&e))?.num_pending;
        let mut out = ScanRead {
            complete,
            last,
            ..ScanRead::default()
        };
        if pending == 0 && q.until.is_none() {
            return Ok(Some(out));
        }
        let mut messages = consumer.messages().await.map_err(|e| fail(&e))?;
        let topic: Arc<str> = Arc::from(q.topic.as_str());
        let began = tokio::time::Instant::now();
        let mut read = 0u64;
        loop {
            if q.until.is_none() && read >= pending {
                break;
            }
            let left = if read < pending {
                HISTORY_READ_TIMEOUT
            } else {
                q.wait.saturating_sub(began.elapsed())
            };
            let m = match tokio::time::timeout(left, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(fail(&e)),
                Ok(None) if read < pending => return Err(fail(&"the consumer ended before the log's end")),
                Ok(None) => break,
                Err(_) if read < pending => return Err(fail(&"no message within 10 s")),
                // Waited for the `until` record long enough.
                Err(_) => break,
            };
            read += 1;
            let seq = m.info().map_err(|e| fail(&e))?.stream_sequence;
            out.last = Some(seq);
            let mut msg = from_nats(m.message, topic.clone());
            msg.offset = Some(seq);
            if msg.record.key.as_deref() != Some(q.key.as_bytes()) {
                continue;
            }
            let stop = q.stops_at(&msg.record);
            out.records.push(msg);
            if stop {
                out.reached = true;
                break;
            }
        }
        Ok(Some(out))
    }
}

/// How long one history read waits for its next message before giving up.
const HISTORY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A short epoch from the stream's name and creation time (FNV-1a): the same on every edge,
/// different for a recreated stream.
fn epoch_of(stream: &str, created: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes().chain([0]).chain(created.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("j{h:016x}")
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The session registry in JetStream KV: `s.<session>` → [`SessionEntry`], `n.<node>` →
/// the node's last renewal time (ms). Expiry is claimed by a compare-and-set on `n.<node>`.
pub struct NatsRegistry {
    kv: kv::Store,
}

/// How long the marker a removal leaves in the registry bucket lives: long enough for every
/// watching router to see it, after which the key is simply absent. Without a TTL every
/// session that ever existed would keep a marker (the bucket would grow without bound).
pub const MARKER_TTL: Duration = Duration::from_secs(15 * 60);

impl NatsRegistry {
    /// Removes `key`, leaving a marker that expires after [`MARKER_TTL`]. A bucket created
    /// before markers had a TTL cannot take one: there the key is deleted as before (its
    /// marker stays; recreate the bucket to bound it).
    async fn forget(&self, key: String) -> Result<(), BusError> {
        match self.kv.purge_with_ttl(&key, MARKER_TTL).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(%key, error = %e, "purge with a TTL refused: deleting without one");
                self.kv.delete(key).await.map_err(unavailable)
            }
        }
    }
}

#[async_trait]
impl SessionRegistry for NatsRegistry {
    async fn register(&self, session: &str, entry: &SessionEntry) -> Result<(), BusError> {
        self.kv
            .put(format!("s.{session}"), entry.encode())
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn unregister(&self, session: &str) -> Result<(), BusError> {
        self.forget(format!("s.{session}")).await
    }

    async fn heartbeat(&self, node: &str, last: Option<u64>) -> Result<u64, BusError> {
        let now = Bytes::from(switchyard_protocol::envelope::now_ms().to_string());
        let key = format!("n.{node}");
        match last {
            None => self.kv.put(key, now).await.map_err(unavailable),
            Some(rev) => match self.kv.update(key, now, rev).await {
                Ok(r) => Ok(r),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(BusError::LeaseLost(format!(
                    "{node}: renewed by someone else or expired"
                ))),
                Err(e) => Err(unavailable(e)),
            },
        }
    }

    async fn leave(&self, node: &str) -> Result<(), BusError> {
        self.forget(format!("n.{node}")).await
    }

    async fn watch(&self) -> Result<mpsc::Receiver<RegistryEvent>, BusError> {
        let mut w = self.kv.watch_with_history(">").await.map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(async move {
            while let Some(e) = w.next().await {
                let Ok(e) = e else {
                    tracing::warn!("registry watch error");
                    continue;
                };
                let put = e.operation == kv::Operation::Put;
                let ev = if let Some(s) = e.key.strip_prefix("s.") {
                    RegistryEvent::Session {
                        session: s.to_owned(),
                        entry: if put { SessionEntry::decode(&e.value) } else { None },
                    }
                } else if let Some(n) = e.key.strip_prefix("n.") {
                    let at = std::str::from_utf8(&e.value).ok().and_then(|v| v.parse::<u64>().ok());
                    match (put, at) {
                        (true, Some(at_ms)) => RegistryEvent::Heartbeat {
                            node: n.to_owned(),
                            at_ms,
                            revision: e.revision,
                        },
                        // "expired" marker written by the claiming router, or a delete.
                        _ => RegistryEvent::NodeGone { node: n.to_owned() },
                    }
                } else {
                    continue;
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn lookup(&self, session: &str) -> Result<Option<SessionEntry>, BusError> {
        let v = self.kv.get(format!("s.{session}")).await.map_err(unavailable)?;
        Ok(v.and_then(|b| SessionEntry::decode(&b)))
    }

    async fn claim_expiry(&self, node: &str, revision: u64) -> Result<bool, BusError> {
        match self
            .kv
            .update(format!("n.{node}"), Bytes::from_static(b"expired"), revision)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }
}
