//! One WebSocket session: a reader loop and a writer draining the session's [`OutQueue`], both
//! in one task. If either half ends, the other is stopped.
//!
//! Client frames are decoded by [`crate::decode`]; everything sent to the client is an encoded
//! frame from [`crate::frame`] written by the queue's direct path or by the writer here. Pings
//! and closes are answered here, through the queue, in order with everything else.
//!
//! The reader publishes connect, every client frame and disconnect to the route's inbound topic
//! in order, with a per-session seq (connect = 1). A frame counts as accepted once the bus has
//! taken it; when the bus refuses one, a raw client is closed with 1013 and a framed client gets
//! an `error` op — never a silent drop.

use crate::config::{Mode, RateAction};
use crate::frame;
use crate::guard::Tripped;
use crate::queue::{Out, OutQueue, Push};
use crate::server::{EdgeState, Route};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::decode::Msg;
use std::time::Duration;
use switchyard_bus::{BusError, Record, SessionEntry};
use switchyard_protocol::envelope::{header, now_ms};
use switchyard_protocol::framed::{self, ClientOp};
use switchyard_protocol::{close, Envelope, Headers, Kind, Opcode, TraceContext};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Most channels one session may hold.
pub const MAX_CHANNELS_PER_SESSION: usize = 256;

/// A live session, shared by its reader, its writer, channel fan-out and node delivery.
pub struct Session {
    pub id: String,
    pub route: Arc<Route>,
    pub connected_at_ms: u64,
    pub trace: TraceContext,
    pub queue: OutQueue,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub channels: Mutex<HashSet<String>>,
    /// Cancelled when the writer failed (the socket is gone) or the session is torn down.
    pub stop: CancellationToken,
    /// Set by the writer once it has sent our close frame: code and reason sent.
    pub close_sent: Mutex<Option<(u16, String)>>,
    /// Cancelled together with `close_sent`, to wake the reader.
    close_sent_signal: CancellationToken,
    /// Verified identity, stamped into every inbound record.
    pub identity: Option<switchyard_protocol::Identity>,
    /// When the credential expires (Unix seconds): the socket is closed with 4001 then.
    pub expires_at: Option<u64>,
    /// Channel patterns the credential grants (channel authorization).
    pub grants: crate::auth::Grants,
    /// The route's message rate for this session, when it has one.
    rate: Option<governor::DefaultDirectRateLimiter>,
}

impl Session {
    pub fn new(id: String, route: Arc<Route>, trace: TraceContext) -> Self {
        Self {
            queue: OutQueue::new(route.cfg.queue_size, route.cfg.slow_policy),
            id,
            connected_at_ms: now_ms(),
            trace,
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            channels: Mutex::new(HashSet::new()),
            stop: CancellationToken::new(),
            close_sent: Mutex::new(None),
            close_sent_signal: CancellationToken::new(),
            identity: None,
            expires_at: None,
            grants: Default::default(),
            rate: route.rate.map(crate::guard::direct_limiter),
            route,
        }
    }

    /// Sends or queues an encoded data frame, applying and counting the slow-consumer policy.
    pub fn deliver(&self, frame: &Bytes) {
        let mut tally = Tally::default();
        self.deliver_tallied(frame, &mut tally);
    }

    /// [`Session::deliver`], adding a written frame to the route's counters through `tally`
    /// (a fan-out applies them once per batch, not once per socket).
    pub fn deliver_tallied(&self, frame: &Bytes, tally: &mut Tally) {
        match self.queue.push(frame) {
            Push::Written => {
                self.frames_out.fetch_add(1, Ordering::Relaxed);
                tally.add(&self.route, frame.len() as u64);
            }
            Push::Queued | Push::Closed => {}
            Push::DroppedOldest => self.route.drop_oldest.increment(1),
            Push::Overflowed => {
                self.route.drop_slow_close.increment(1);
                tracing::debug!(session = %self.id, "slow consumer: closing with 4008");
            }
        }
    }

    /// [`Session::deliver`] for several frames in order: the ones that fit go out with one
    /// vectored write.
    pub fn deliver_all(&self, frames: &[Bytes]) {
        let (mut n, mut bytes) = (0u64, 0u64);
        self.queue.push_all(frames, |f, p| match p {
            Push::Written => {
                n += 1;
                bytes += f.len() as u64;
            }
            Push::Queued | Push::Closed => {}
            Push::DroppedOldest => self.route.drop_oldest.increment(1),
            Push::Overflowed => self.route.drop_slow_close.increment(1),
        });
        count(self, &self.route, n, bytes);
    }

    /// Sends or queues a protocol message (welcome, ack, error) for a framed client.
    pub fn reply(&self, text: String) {
        let f = frame::text(text.as_bytes());
        let len = f.len() as u64;
        if self.queue.push_control(f) == Push::Written {
            count(self, &self.route, 1, len);
        }
    }
}

/// Frames written to clients, added up per route and applied to the route's counters on
/// [`Tally::flush`] (and on drop).
#[derive(Default)]
pub struct Tally {
    route: Option<Arc<Route>>,
    frames: u64,
    bytes: u64,
}

impl Tally {
    fn add(&mut self, route: &Arc<Route>, bytes: u64) {
        if !self.route.as_ref().is_some_and(|r| Arc::ptr_eq(r, route)) {
            self.flush();
            self.route = Some(route.clone());
        }
        self.frames += 1;
        self.bytes += bytes;
    }

    /// Applies what was added to the route's counters.
    pub fn flush(&mut self) {
        if let Some(r) = &self.route {
            if self.frames > 0 {
                r.frames_out.increment(self.frames);
                r.bytes_out.increment(self.bytes);
            }
        }
        self.frames = 0;
        self.bytes = 0;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.flush();
    }
}

/// How a session ended, as reported in its disconnect event.
#[derive(Debug, Clone)]
struct Ended {
    code: u16,
    reason: String,
}

/// Runs a session on an upgraded socket until it ends: `reader` and `writer` are its two
/// halves; the frame-flood guard is put in front of the reader here.
pub async fn run<R, W>(st: Arc<EdgeState>, sess: Arc<Session>, reader: R, writer: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (reader, tripped) = crate::guard::Guarded::new(reader, st.cfg.frame_limits);
    let stream = Decoder::new(reader, sess.route.max_message_size);
    run_session(st, sess, writer, stream, tripped).await
}

type Decoder<R> = crate::decode::Decoder<crate::guard::Guarded<R>>;

/// The session logic.
async fn run_session<R, W>(st: Arc<EdgeState>, sess: Arc<Session>, sink: W, stream: Decoder<R>, tripped: Arc<Tripped>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    st.sessions.insert(sess.id.clone(), sess.clone());
    sess.route.open.increment(1.0);
    // Reader and writer share this one task (no second task, stack or join handle per
    // socket): both futures are polled here, each woken by its own half of the socket.
    let mut writer = std::pin::pin!(write_loop(sink, sess.clone(), st.cfg.ping_interval));
    let mut writer_done = false;
    let mut pubr = Publisher {
        st: &st,
        sess: &sess,
        seq: 0,
    };

    // Welcome first: a backend may answer the connect event before the publish returns.
    if sess.route.cfg.mode == Mode::Framed {
        sess.reply(framed::welcome(&sess.id));
    }
    let ended = {
        let reader = async {
            // Boxed: rare and large, so not part of every socket's resident task.
            match Box::pin(pubr.lifecycle(Kind::Connect, None)).await {
                Err(e) => {
                    tracing::debug!(session = %sess.id, error = %e, "bus refused connect");
                    Ended {
                        code: close::TRY_AGAIN_LATER,
                        reason: "bus unavailable".into(),
                    }
                }
                Ok(()) => read_loop(&st, &sess, &mut pubr, stream, &tripped).await,
            }
        };
        let mut reader = std::pin::pin!(reader);
        loop {
            tokio::select! {
                e = &mut reader => break e,
                // The writer ends early only when the socket failed; it cancels `stop`, which
                // ends the reader too.
                _ = &mut writer, if !writer_done => writer_done = true,
            }
        }
    };

    // Teardown: stop the writer (sending our close frame if one is still owed), leave channels,
    // forget the session, then tell the backend.
    // 1005/1006/1015 are never sent on the wire.
    let code = if matches!(ended.code, 1005 | 1006 | 1015) {
        close::NORMAL
    } else {
        ended.code
    };
    sess.queue.close(code, &ended.reason);
    if !writer_done {
        // The close frame (and what was queued before it) goes out, or we give up after 5 s.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut writer).await;
    }
    sess.stop.cancel();
    let channels: Vec<String> = sess.channels.lock().drain().collect();
    for c in channels {
        Box::pin(st.channels.unsubscribe(&sess, &c)).await;
    }
    st.sessions.remove(&sess.id);
    sess.route.open.decrement(1.0);
    metrics::counter!(crate::metrics::CLOSES, "route" => sess.route.cfg.path.clone(), "code" => ended.code.to_string())
        .increment(1);
    tracing::debug!(code = ended.code, reason = %ended.reason, "session closed");
    if let Err(e) = Box::pin(pubr.lifecycle(Kind::Disconnect, Some(&ended))).await {
        tracing::warn!(session = %sess.id, error = %e, "bus refused disconnect event");
    }
}

async fn read_loop<R>(
    st: &EdgeState,
    sess: &Arc<Session>,
    pubr: &mut Publisher<'_>,
    mut stream: Decoder<R>,
    tripped: &Tripped,
) -> Ended
where
    R: AsyncRead + Unpin,
{
    let idle = st.cfg.idle_timeout;
    // After we have sent a close (shutdown, idle, error), wait this long for the client's.
    let mut closing_deadline: Option<tokio::time::Instant> = None;
    let mut ended: Option<Ended> = None;
    // A credential that expires mid-connection ends the session with 4001.
    let expiry = sess.expires_at.map(|exp| {
        let left = exp.saturating_sub(now_ms() / 1000);
        tokio::time::Instant::now() + Duration::from_secs(left)
    });
    loop {
        let deadline = closing_deadline.unwrap_or_else(|| tokio::time::Instant::now() + idle);
        let next = tokio::select! {
            biased;
            _ = st.close_all.cancelled(), if closing_deadline.is_none() => {
                // Draining (SIGTERM): the client should reconnect, to another node.
                sess.queue.close(close::SERVICE_RESTART, "server restarting");
                ended = Some(Ended { code: close::SERVICE_RESTART, reason: "server restarting".into() });
                closing_deadline = Some(tokio::time::Instant::now() + st.cfg.shutdown_grace);
                continue;
            }
            _ = tripped.signal.cancelled(), if closing_deadline.is_none() => {
                // The guard stopped reading: nothing more will come from this client, so only
                // give the writer a moment to send our close frame.
                let why = tripped.reason().unwrap_or("frame_flood");
                metrics::counter!(crate::metrics::DROPS, "route" => sess.route.cfg.path.clone(), "reason" => why).increment(1);
                let reason = if why == "control_flood" { "control frame flood" } else { "frame flood" };
                sess.queue.close(close::POLICY, reason);
                ended = Some(Ended { code: close::POLICY, reason: reason.into() });
                closing_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                continue;
            }
            _ = sess.close_sent_signal.cancelled(), if closing_deadline.is_none() => {
                // We closed (backend request, slow consumer, ...): give the client a moment to
                // answer, reading (and publishing) what it still sends.
                closing_deadline = Some(tokio::time::Instant::now() + st.cfg.shutdown_grace.min(Duration::from_secs(5)));
                continue;
            }
            _ = sess.stop.cancelled() => {
                return ended.or_else(|| sent(sess)).unwrap_or(Ended { code: 1006, reason: "write failed".into() });
            }
            _ = sleep_until_opt(expiry), if closing_deadline.is_none() => {
                sess.queue.close(close::TOKEN_EXPIRED, "token expired");
                ended = Some(Ended { code: close::TOKEN_EXPIRED, reason: "token expired".into() });
                closing_deadline = Some(tokio::time::Instant::now() + st.cfg.shutdown_grace.min(Duration::from_secs(5)));
                continue;
            }
            r = tokio::time::timeout_at(deadline, stream.next()) => r,
        };
        let msg = match next {
            Err(_) if closing_deadline.is_some() => {
                return ended.unwrap_or(Ended {
                    code: close::GOING_AWAY,
                    reason: "close timeout".into(),
                });
            }
            Err(_) => {
                sess.queue.close(close::GOING_AWAY, "idle timeout");
                return Ended {
                    code: close::GOING_AWAY,
                    reason: "idle timeout".into(),
                };
            }
            Ok(None) => {
                return ended.unwrap_or(Ended {
                    code: 1006,
                    reason: "connection lost".into(),
                })
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "client frame refused");
                let (code, reason) = e.close();
                if code != 1006 {
                    sess.queue.close(code, reason);
                }
                return Ended {
                    code,
                    reason: reason.into(),
                };
            }
            Ok(Some(Ok(m))) => m,
        };
        let (payload, opcode) = match msg {
            Msg::Text(t) => (t, Opcode::Text),
            Msg::Binary(b) => (b, Opcode::Binary),
            Msg::Ping(p) => {
                sess.queue.push_raw(frame::pong(&p));
                continue;
            }
            Msg::Pong => continue,
            Msg::Close(f) => {
                let (code, reason) = f.unwrap_or((1005, String::new()));
                return ended.unwrap_or(Ended { code, reason });
            }
        };
        sess.frames_in.fetch_add(1, Ordering::Relaxed);
        sess.route.frames_in.increment(1);
        sess.route.bytes_in.increment(payload.len() as u64);
        if ended
            .as_ref()
            .is_some_and(|e| e.code == close::POLICY || e.code == close::TOKEN_EXPIRED)
        {
            // Closed for policy (flood, rate) or an expired token: nothing more this client
            // sends is published while its close handshake runs out.
            sess.route.drop_policy.increment(1);
            continue;
        }
        if sess.rate.as_ref().is_some_and(|r| r.check().is_err()) {
            let action = sess.route.cfg.rate_limit.map(|r| r.action);
            let label = if action == Some(RateAction::Close) {
                "close"
            } else {
                "error"
            };
            metrics::counter!(crate::metrics::RATE_LIMITED, "route" => sess.route.cfg.path.clone(), "action" => label)
                .increment(1);
            if action == Some(RateAction::Close) {
                sess.queue.close(close::POLICY, "message rate exceeded");
                ended = Some(Ended {
                    code: close::POLICY,
                    reason: "message rate exceeded".into(),
                });
                closing_deadline =
                    Some(tokio::time::Instant::now() + st.cfg.shutdown_grace.min(Duration::from_secs(5)));
            } else {
                // Not published, and the client is told which message it was.
                let id = (opcode == Opcode::Text)
                    .then(|| framed::decode_request(&payload).id)
                    .flatten();
                sess.reply(framed::error_with_id(
                    "rate_limited",
                    "message rate exceeded: not published",
                    id.as_deref(),
                ));
            }
            continue;
        }
        let res = match sess.route.cfg.mode {
            // Boxed so the resident task stays small: one short-lived allocation per frame
            // (publishing allocates a boxed bus future anyway).
            Mode::Raw => Box::pin(pubr.frame(payload, opcode)).await,
            Mode::Framed => Box::pin(handle_op(st, sess, pubr, payload, opcode)).await,
        };
        if let Err(e) = res {
            sess.route.drop_bus.increment(1);
            match sess.route.cfg.mode {
                Mode::Raw => {
                    tracing::debug!(session = %sess.id, error = %e, "bus refused a frame: closing 1013");
                    sess.queue.close(close::TRY_AGAIN_LATER, "bus unavailable");
                    return Ended {
                        code: close::TRY_AGAIN_LATER,
                        reason: "bus unavailable".into(),
                    };
                }
                Mode::Framed => {} // handle_op already told the client
            }
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The close we sent, if any.

fn sent(sess: &Session) -> Option<Ended> {
    sess.close_sent
        .lock()
        .clone()
        .map(|(code, reason)| Ended { code, reason })
}

fn bus_code(e: &BusError) -> &'static str {
    match e {
        BusError::Overflow { .. } => "overloaded",
        _ => "bus_unavailable",
    }
}

/// Refuses a channel operation the route or the credential does not allow.
fn forbidden(sess: &Session, publish: bool, channel: &str, id: Option<&str>) -> bool {
    if sess.route.may(publish, &sess.grants, channel) {
        return false;
    }
    let op = if publish { "publish" } else { "subscribe" };
    metrics::counter!(crate::metrics::FORBIDDEN, "route" => sess.route.cfg.path.clone(), "op" => op).increment(1);
    sess.reply(framed::error_with_id(
        "forbidden",
        &format!("not allowed to {op} on {channel}"),
        id,
    ));
    true
}

/// Handles one framed-protocol client frame. A bus refusal is answered with an error op
/// (carrying the client's `id` if it gave one) and returned so it is counted.
async fn handle_op(
    st: &EdgeState,
    sess: &Arc<Session>,
    pubr: &mut Publisher<'_>,
    payload: Bytes,
    opcode: Opcode,
) -> Result<(), BusError> {
    if opcode == Opcode::Binary {
        sess.reply(framed::error(
            "bad_request",
            "binary frames are not part of the framed protocol",
        ));
        return Ok(());
    }
    let req = framed::decode_request(&payload);
    let id = req.id.as_deref();
    let op = match req.op {
        Ok(op) => op,
        Err(e) => {
            sess.reply(framed::error_with_id(e.code(), &e.to_string(), id));
            return Ok(());
        }
    };
    let res = match op {
        ClientOp::Subscribe { channel } => {
            if !forbidden(sess, false, &channel, id) {
                subscribe(st, sess, &channel).await;
            }
            return Ok(());
        }
        ClientOp::Unsubscribe { channel } => {
            if sess.channels.lock().remove(&channel) {
                st.channels.unsubscribe(sess, &channel).await;
                sess.reply(framed::unsubscribed(&channel));
            } else {
                sess.reply(framed::error("not_subscribed", &format!("not subscribed to {channel}")));
            }
            return Ok(());
        }
        ClientOp::Publish { channel, data } => {
            if !sess.route.cfg.allow_publish {
                sess.reply(framed::error_with_id(
                    "forbidden",
                    "this route does not allow publish",
                    id,
                ));
                return Ok(());
            }
            if forbidden(sess, true, &channel, id) {
                return Ok(());
            }
            let mut h = Headers::new();
            h.insert(header::SESSION, sess.id.clone());
            h.insert(header::NODE, st.cfg.node_id.clone());
            h.insert(header::TIMESTAMP, now_ms().to_string());
            h.insert(header::TRACEPARENT, sess.trace.traceparent.clone());
            let rec = Record {
                key: None,
                headers: h,
                payload: data,
            };
            st.bus.publish(&st.cfg.naming.channel(&channel), rec).await.map(|_| ())
        }
        ClientOp::Send { data } => pubr.frame(data, Opcode::Text).await,
    };
    match (&res, id) {
        (Ok(()), Some(id)) => sess.reply(framed::ack(id)),
        (Ok(()), None) => {}
        (Err(e), id) => sess.reply(framed::error_with_id(bus_code(e), &e.to_string(), id)),
    }
    res
}

/// Subscribes a session to a channel and answers `subscribed` (framed) once it is live.
pub async fn subscribe(st: &EdgeState, sess: &Arc<Session>, channel: &str) {
    {
        let chans = sess.channels.lock();
        if chans.contains(channel) {
            drop(chans);
            if sess.route.is_framed() {
                sess.reply(framed::subscribed(channel));
            }
            return;
        }
        if chans.len() >= MAX_CHANNELS_PER_SESSION {
            drop(chans);
            if sess.route.is_framed() {
                sess.reply(framed::error(
                    "too_many_channels",
                    &format!("at most {MAX_CHANNELS_PER_SESSION} channels per session"),
                ));
            }
            return;
        }
    }
    match st.channels.subscribe(sess, channel).await {
        Ok(()) if sess.stop.is_cancelled() || sess.queue.is_closing() => {
            // The session ended while the subscription was being made: undo it, or the hub
            // would keep the session (and the bus subscription) forever.
            st.channels.unsubscribe(sess, channel).await;
        }
        Ok(()) => {
            sess.channels.lock().insert(channel.to_owned());

            if sess.route.is_framed() {
                sess.reply(framed::subscribed(channel));
            }
        }
        Err(e) => {
            if sess.route.is_framed() {
                sess.reply(framed::error("bus_unavailable", &e.to_string()));
            }
        }
    }
}

/// Stamps and publishes this session's inbound records, in order.
struct Publisher<'a> {
    st: &'a EdgeState,
    sess: &'a Session,
    seq: u64,
}

impl Publisher<'_> {
    /// Adds `sy-sig` when the node has an identity key.
    fn sign(&self, headers: &mut Headers, payload: &[u8]) {
        if let Some(key) = &self.st.cfg.identity_hmac_key {
            let sig = switchyard_protocol::sign::sign(key, headers, payload);
            headers.insert(switchyard_protocol::sign::SIG, sig);
        }
    }

    fn envelope(&mut self, kind: Kind, payload: Bytes, opcode: Opcode) -> Envelope {
        self.seq += 1;
        let mut e = Envelope::new(self.sess.id.clone(), kind, payload);
        e.seq = self.seq;
        e.node = Some(self.st.cfg.node_id.clone());
        e.route = Some(self.sess.route.cfg.path.clone());
        e.opcode = opcode;
        e.trace = Some(self.sess.trace.clone());
        e.identity = self.sess.identity.clone();

        e.timestamp_ms = now_ms();
        e.reply = Some(self.st.node_topic.clone());
        e
    }

    async fn frame(&mut self, payload: Bytes, opcode: Opcode) -> Result<(), BusError> {
        let e = self.envelope(Kind::Frame, payload, opcode);
        let mut headers = e.headers();
        self.sign(&mut headers, &e.payload);
        let rec = Record {
            key: Some(e.key()),
            headers,
            payload: e.payload,
        };
        // A refused frame keeps its number: a gap in sy-seq tells the backend that a frame was
        // refused (and its client told).
        self.st.bus.publish(&self.sess.route.inbound, rec).await.map(|_| ())
    }

    /// Connect goes to the durable registry (if the bus has one) and the registry feed first,
    /// then inbound; disconnect the other way round, so a router never routes to a session it
    /// cannot find.
    async fn lifecycle(&mut self, kind: Kind, ended: Option<&Ended>) -> Result<(), BusError> {
        let mut e = self.envelope(kind, Bytes::new(), Opcode::Text);
        if let Some(x) = ended {
            e.code = Some(x.code);
            // Client-chosen text: no control characters in a header.
            e.reason = Some(x.reason.chars().filter(|c| !c.is_control()).take(120).collect());
        }

        let mut headers = e.headers();
        headers.insert(header::INBOUND, self.sess.route.inbound.clone());
        self.sign(&mut headers, &[]);
        let rec = Record {
            key: Some(e.key()),
            headers,
            payload: Bytes::new(),
        };
        let sessions = self.st.cfg.naming.sessions();
        let inbound = &self.sess.route.inbound;
        let durable = self.st.bus.registry();
        if kind == Kind::Connect {
            if let Some(d) = &durable {
                let entry = SessionEntry {
                    node: self.st.cfg.node_id.clone(),
                    route: self.sess.route.cfg.path.clone(),
                    inbound: inbound.clone(),
                };
                d.register(&self.sess.id, &entry).await?;
            }
            self.st.bus.publish(&sessions, rec.clone()).await?;
            self.st.bus.publish(inbound, rec).await?;
        } else {
            let a = self.st.bus.publish(inbound, rec.clone()).await;
            let b = self.st.bus.publish(&sessions, rec).await;
            if let Some(d) = &durable {
                d.unregister(&self.sess.id).await?;
            }
            a.and(b)?;
        }
        Ok(())
    }
}

/// The writer: drains the queue into the socket, one vectored write per batch; pings on an
/// interval (through the queue, so they never cut into a frame written by the direct path).
async fn write_loop<W>(mut sink: W, sess: Arc<Session>, ping_every: Duration)
where
    W: AsyncWrite + Unpin,
{
    let mut batch: VecDeque<Out> = VecDeque::new();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let route = sess.route.clone();
    let res: io::Result<()> = async {
        loop {
            tokio::select! {
                _ = sess.queue.take_all(&mut batch) => {
                    if write_batch(&mut sink, &sess, &route, &mut batch).await? {
                        return Ok(());
                    }
                }
                _ = ping.tick() => {
                    sess.queue.push_raw(frame::ping());
                }
            }
        }
    }
    .await;
    // Nothing more will be written: refuse further pushes.
    sess.queue.close(close::GOING_AWAY, "writer stopped");
    if let Err(e) = res {
        // The socket is gone: stop the reader too.
        tracing::debug!(session = %sess.id, error = %e, "socket write ended");
        sess.stop.cancel();
    }
}

/// Most frames handed to one vectored write.
const IOV: usize = 64;

/// Writes everything taken from the queue; true once our close frame is on the wire.
async fn write_batch<W>(sink: &mut W, sess: &Session, route: &Route, batch: &mut VecDeque<Out>) -> io::Result<bool>
where
    W: AsyncWrite + Unpin,
{
    let (mut n, mut bytes, mut closed) = (0u64, 0u64, false);
    for out in batch.iter_mut() {
        match out {
            Out::Data(b) | Out::Control(b) => {
                n += 1;
                bytes += b.len() as u64;
            }
            Out::Raw(_) => {}
            Out::Close(code, reason) => {
                *sess.close_sent.lock() = Some((*code, reason.clone()));
                sess.close_sent_signal.cancel();
                *out = Out::Raw(frame::close(*code, reason));
                closed = true;
            }
        }
    }
    // Counted before the write: once a client can see a frame, it is counted.
    count(sess, route, n, bytes);
    while !batch.is_empty() {
        // The slice array lives only inside one poll: held across an await it would sit in
        // every socket's resident task (1 KiB).
        let mut written = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); IOV];
            let k = batch
                .iter()
                .filter_map(Out::bytes)
                .zip(slices.iter_mut())
                .map(|(b, s)| *s = IoSlice::new(b))
                .count();
            Pin::new(&mut *sink).poll_write_vectored(cx, &slices[..k])
        })
        .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let Some(front) = batch.front_mut() else { break };
            let len = front.bytes().map_or(0, Bytes::len);
            if written >= len {
                batch.pop_front();
                written -= len;
            } else {
                let rest = front.bytes().map(|b| b.slice(written..)).unwrap_or_default();
                *front = Out::Raw(rest);
                written = 0;
            }
        }
    }
    sink.flush().await?;
    Ok(closed)
}

fn count(sess: &Session, route: &Route, n: u64, bytes: u64) {
    if n > 0 {
        sess.frames_out.fetch_add(n, Ordering::Relaxed);
        route.frames_out.increment(n);
        route.bytes_out.increment(bytes);
    }
}
