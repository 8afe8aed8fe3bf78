//! One WebSocket session: one task whose future ([`Conn`]) is written by hand, so an idle socket
//! costs a few hundred bytes of task state: the decoder, the writer's batch, one timer (ping,
//! idle, close and token deadlines, re-armed lazily) and a few flags. It reads client frames,
//! drains the session's [`OutQueue`] and runs at most one bus publish at a time.
//!
//! Client frames are decoded by [`crate::decode`]; everything sent to the client is an encoded
//! frame from [`crate::frame`] written by the queue's direct path or by the writer here. Pings
//! and closes are answered here, through the queue, in order with everything else. The task is
//! woken by its socket, its timer, its publish, and the queue's waker (a push to an empty queue,
//! or [`OutQueue::wake`] for a drain).
//!
//! The reader publishes connect, every client frame and disconnect to the route's inbound topic
//! in order, with a per-session seq (connect = 1). A frame counts as accepted once the bus has
//! taken it; when the bus refuses one, a raw client is closed with 1013 and a framed client gets
//! an `error` op — never a silent drop.

use crate::config::{Mode, RateAction};
use crate::frame;
use crate::guard::Tripped;
use crate::queue::{Out, OutQueue, Push};
use crate::state::{EdgeState, Route};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use crate::decode::{DecodeError, Msg};
use std::time::Duration;
use switchyard_bus::{BusError, Record, SessionEntry};
use switchyard_protocol::envelope::{header, now_ms};
use switchyard_protocol::framed::{self, ClientOp};
use switchyard_protocol::{close, Envelope, Headers, Kind, Opcode, TraceContext};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

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
    /// Set when the session is torn down: a subscription completed after this is undone.
    stopped: AtomicBool,
    /// The per-session seq of the last inbound record (connect = 1).
    seq: AtomicU64,
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
            stopped: AtomicBool::new(false),
            seq: AtomicU64::new(0),
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
        let mut p = Push::Closed;
        self.count_ahead(1, || {
            p = self.queue.push(frame);
            u64::from(p == Push::Written)
        });
        match p {
            Push::Written => tally.add(&self.route, frame.len() as u64),
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
        let mut bytes = 0u64;
        let n = self.count_ahead(frames.len() as u64, || {
            let mut n = 0;
            self.queue.push_all(frames, |f, p| match p {
                Push::Written => {
                    n += 1;
                    bytes += f.len() as u64;
                }
                Push::Queued | Push::Closed => {}
                Push::DroppedOldest => self.route.drop_oldest.increment(1),
                Push::Overflowed => self.route.drop_slow_close.increment(1),
            });
            n
        });
        tally_route(&self.route, n, bytes);
    }

    /// Sends or queues a protocol message (welcome, ack, error) for a framed client.
    pub fn reply(&self, text: String) {
        let f = frame::text(text.as_bytes());
        let len = f.len() as u64;
        if self.count_ahead(1, || u64::from(self.queue.push_control(f) == Push::Written)) == 1 {
            tally_route(&self.route, 1, len);
        }
    }

    /// Adds `n` frames to `frames_out` before `push` can write them where the client sees
    /// them, then takes back the ones it did not write (a queued frame is counted when the
    /// writer takes it). Returns how many `push` wrote.
    fn count_ahead(&self, n: u64, push: impl FnOnce() -> u64) -> u64 {
        self.frames_out.fetch_add(n, Ordering::Relaxed);
        let written = push();
        if written < n {
            self.frames_out.fetch_sub(n - written, Ordering::Relaxed);
        }
        written
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

impl Ended {
    fn new(code: u16, reason: &str) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
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
    st.sessions.insert(sess.id.clone(), sess.clone());
    sess.route.open.increment(1.0);
    // Welcome first: a backend may answer the connect event before the publish returns.
    if sess.route.cfg.mode == Mode::Framed {
        sess.reply(framed::welcome(&sess.id));
    }
    let mut conn = Conn::new(st.clone(), sess.clone(), stream, tripped, writer);
    let ended = (&mut conn).await;

    // Teardown: send our close frame if one is still owed, leave channels, forget the session,
    // then tell the backend. 1005/1006/1015 are never sent on the wire.
    let code = if matches!(ended.code, 1005 | 1006 | 1015) {
        close::NORMAL
    } else {
        ended.code
    };
    sess.queue.close(code, &ended.reason);
    if !conn.write_done {
        // The close frame (and what was queued before it) goes out, or we give up after 5 s.
        // Boxed: the timer is needed once, not in every socket's resident task.
        let flush = std::future::poll_fn(|cx| {
            conn.poll_writer(cx);
            if conn.write_done {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(5), flush)).await;
    }
    drop(conn);
    let channels: Vec<String> = {
        let mut chans = sess.channels.lock();
        sess.stopped.store(true, Ordering::Release);
        chans.drain().collect()
    };
    for c in channels {
        Box::pin(st.channels.unsubscribe(&sess, &c)).await;
    }
    st.sessions.remove(&sess.id);
    sess.route.open.decrement(1.0);
    metrics::counter!(crate::metrics::CLOSES, "route" => sess.route.cfg.path.clone(), "code" => ended.code.to_string())
        .increment(1);
    tracing::debug!(code = ended.code, reason = %ended.reason, "session closed");
    if let Err(e) = Box::pin(lifecycle(&st, &sess, Kind::Disconnect, Some(&ended))).await {
        tracing::warn!(session = %sess.id, error = %e, "bus refused disconnect event");
    }
}

type Decoder<R> = crate::decode::Decoder<crate::guard::Guarded<R>>;

/// A bus publish in flight (the connect event, or a client frame's publish or framed op).
struct Job {
    connect: bool,
    fut: Pin<Box<dyn Future<Output = Result<(), BusError>> + Send>>,
}

/// A session's task: reader, writer and timers in one hand-written future, which ends with how
/// the session ended. Client frames are read one at a time: while a frame's publish is in
/// flight nothing more is read (the bus sets the pace), but the writer and pings go on.
struct Conn<R, W> {
    st: Arc<EdgeState>,
    sess: Arc<Session>,
    stream: Decoder<R>,
    tripped: Arc<Tripped>,
    sink: W,
    /// Frames taken from the queue and not yet fully written.
    batch: VecDeque<Out>,
    /// Written but not yet flushed (TLS).
    unflushed: bool,
    /// The batch being written ends with our close frame.
    close_in_batch: bool,
    /// Nothing more will be written: our close frame is on the wire, or the socket failed.
    write_done: bool,
    write_failed: bool,
    /// The close frame we sent.
    sent: Option<Ended>,
    /// One timer for every deadline below; moved only when the earliest one comes closer or
    /// when it fires (reading a frame moves `last_read`, not the timer).
    timer: Pin<Box<Sleep>>,
    next_ping: Instant,
    last_read: Instant,
    /// When the credential expires: the socket is closed with 4001 then.
    expiry: Option<Instant>,
    /// Once we have closed (drain, flood, expiry, a close frame sent): until when the client
    /// may answer.
    closing: Option<Instant>,
    /// Why we closed, when we did.
    ended: Option<Ended>,
    job: Option<Job>,
}

impl<R, W> Conn<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    fn new(st: Arc<EdgeState>, sess: Arc<Session>, stream: Decoder<R>, tripped: Arc<Tripped>, sink: W) -> Self {
        let now = Instant::now();
        // An `exp` too far ahead for the clock (e.g. 1e19, signed by the issuer) never expires.
        let expiry = sess.expires_at.and_then(|exp| {
            let left = exp.saturating_sub(now_ms() / 1000);
            now.checked_add(Duration::from_secs(left))
        });
        let next_ping = now + st.cfg.ping_interval;
        // The connect event is published before anything the client sends.
        let (st2, sess2) = (st.clone(), sess.clone());
        let job = Job {
            connect: true,
            fut: Box::pin(async move { lifecycle(&st2, &sess2, Kind::Connect, None).await }),
        };
        Self {
            st,
            sess,
            stream,
            tripped,
            sink,
            batch: VecDeque::new(),
            unflushed: false,
            close_in_batch: false,
            write_done: false,
            write_failed: false,
            sent: None,
            timer: Box::pin(tokio::time::sleep_until(next_ping)),
            next_ping,
            last_read: now,
            expiry,
            closing: None,
            ended: None,
            job: Some(job),
        }
    }

    /// Closes the socket with `code` (after what is queued) and gives the client `wait` to
    /// answer.
    fn close_with(&mut self, code: u16, reason: &str, wait: Duration) {
        self.sess.queue.close(code, reason);
        self.ended = Some(Ended::new(code, reason));
        self.closing = Some(Instant::now() + wait);
    }

    /// How long a client may take to answer our close (not the drain's full grace).
    fn close_wait(&self) -> Duration {
        self.st.cfg.shutdown_grace.min(Duration::from_secs(5))
    }

    /// Drives the writer; sets `write_done` (and `write_failed`) when it has finished.
    fn poll_writer(&mut self, cx: &mut Context<'_>) {
        if self.write_done {
            return;
        }
        match self.poll_write_out(cx) {
            Poll::Pending => {}
            Poll::Ready(res) => {
                self.write_done = true;
                // Nothing more will be written: refuse further pushes.
                self.sess.queue.close(close::GOING_AWAY, "writer stopped");
                if let Err(e) = res {
                    tracing::debug!(session = %self.sess.id, error = %e, "socket write ended");
                    self.write_failed = true;
                }
            }
        }
    }

    /// Writes everything queued, one vectored write per batch; ready once our close frame is
    /// on the wire (or with the socket's error).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while !self.batch.is_empty() {
                let batch = &self.batch;
                let mut slices = [IoSlice::new(&[]); IOV];
                let k = batch
                    .iter()
                    .filter_map(Out::bytes)
                    .zip(slices.iter_mut())
                    .map(|(b, s)| *s = IoSlice::new(b))
                    .count();
                let mut written = ready!(Pin::new(&mut self.sink).poll_write_vectored(cx, &slices[..k]))?;
                if written == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.unflushed = true;
                while written > 0 {
                    let Some(front) = self.batch.front_mut() else { break };
                    let len = front.bytes().map_or(0, Bytes::len);
                    if written >= len {
                        self.batch.pop_front();
                        written -= len;
                    } else {
                        let rest = front.bytes().map(|b| b.slice(written..)).unwrap_or_default();
                        *front = Out::Raw(rest);
                        written = 0;
                    }
                }
            }
            if self.unflushed {
                ready!(Pin::new(&mut self.sink).poll_flush(cx))?;
                self.unflushed = false;
            }
            if self.close_in_batch {
                return Poll::Ready(Ok(()));
            }
            ready!(self.sess.queue.poll_take_all(cx, &mut self.batch));
            self.prepare_batch();
        }
    }

    /// Counts a batch taken from the queue and encodes its close frame, if it has one.
    fn prepare_batch(&mut self) {
        let (mut n, mut bytes) = (0u64, 0u64);
        for out in self.batch.iter_mut() {
            match out {
                Out::Data(b) | Out::Control(b) => {
                    n += 1;
                    bytes += b.len() as u64;
                }
                Out::Raw(_) => {}
                Out::Close(code, reason) => {
                    self.sent = Some(Ended::new(*code, reason));
                    *out = Out::Raw(frame::close(*code, reason));
                    self.close_in_batch = true;
                }
            }
        }
        if self.close_in_batch && self.closing.is_none() {
            // We closed (backend request, slow consumer, ...): the client has a moment to
            // answer; what it still sends is read and published.
            self.closing = Some(Instant::now() + self.close_wait());
        }
        // Counted before the write: once a client can see a frame, it is counted.
        count(&self.sess, &self.sess.route, n, bytes);
    }

    /// The earliest deadline the timer must wake us for. While a publish is in flight only
    /// pings are due (the rest is looked at once it is done).
    fn next_deadline(&self) -> Instant {
        let far = self.last_read + Duration::from_secs(86_400);
        let ping = if self.write_done { far } else { self.next_ping };
        if self.job.is_some() {
            return ping;
        }
        let mut d = ping.min(self.closing.unwrap_or(self.last_read + self.st.cfg.idle_timeout));
        if self.closing.is_none() {
            if let Some(e) = self.expiry {
                d = d.min(e);
            }
        }
        d
    }

    /// Acts on the deadlines that have passed.
    fn on_time(&mut self, now: Instant) -> Option<Ended> {
        if !self.write_done && now >= self.next_ping {
            self.sess.queue.push_raw(frame::ping());
            self.next_ping = now + self.st.cfg.ping_interval;
        }
        if self.job.is_some() {
            return None;
        }
        if self.closing.is_some() {
            return self.close_timed_out(now);
        }
        if self.expiry.is_some_and(|e| now >= e) {
            self.close_with(close::TOKEN_EXPIRED, "token expired", self.close_wait());
            return None;
        }
        if now >= self.last_read + self.st.cfg.idle_timeout {
            self.sess.queue.close(close::GOING_AWAY, "idle timeout");
            return Some(Ended::new(close::GOING_AWAY, "idle timeout"));
        }
        None
    }

    /// What is looked at before every client frame: a drain, an expired credential (here too,
    /// not only on the timer: a client that always has a frame buffered never lets the timer
    /// run without a publish in flight), a failed socket.
    fn on_signals(&mut self) -> Option<Ended> {
        // Here too, not only on the timer: a client that always has a frame buffered would
        // otherwise keep publishing past our close for as long as it likes.
        // (The clock is read only when a deadline is running: this runs before every frame.)
        if self.closing.is_some() {
            if let Some(e) = self.close_timed_out(Instant::now()) {
                return Some(e);
            }
        } else if self.sess.queue.is_closing() {
            // Closed from outside (a 4008 overflow, a backend close) while our writer is stuck
            // behind a full socket: the close frame may never go out, so start the clock here.
            self.closing = Some(Instant::now() + self.close_wait());
        }
        if self.closing.is_none() && self.st.close_all.is_cancelled() {
            // Draining (SIGTERM): the client should reconnect, to another node.
            self.close_with(close::SERVICE_RESTART, "server restarting", self.st.cfg.shutdown_grace);
        }
        if self.closing.is_none() && self.expiry.is_some_and(|e| Instant::now() >= e) {
            self.close_with(close::TOKEN_EXPIRED, "token expired", self.close_wait());
        }
        if self.write_failed {
            return Some(
                self.ended
                    .take()
                    .or_else(|| self.sent.take())
                    .unwrap_or_else(|| Ended::new(1006, "write failed")),
            );
        }
        None
    }

    /// How the session ends once the client has had its time to answer our close.
    fn close_timed_out(&mut self, now: Instant) -> Option<Ended> {
        self.closing.is_some_and(|d| now >= d).then(|| {
            self.ended
                .take()
                .unwrap_or_else(|| Ended::new(close::GOING_AWAY, "close timeout"))
        })
    }

    /// The frame-flood guard stopped reading: nothing more will come from this client, so only
    /// give the writer a moment to send our close frame.
    fn on_tripped(&mut self) {
        let why = self.tripped.reason().unwrap_or("frame_flood");
        metrics::counter!(crate::metrics::DROPS, "route" => self.sess.route.cfg.path.clone(), "reason" => why)
            .increment(1);
        let reason = if why == "control_flood" {
            "control frame flood"
        } else {
            "frame flood"
        };
        self.close_with(close::POLICY, reason, Duration::from_secs(1));
    }

    /// A publish finished.
    fn on_job_done(&mut self, connect: bool, res: Result<(), BusError>) -> Option<Ended> {
        let e = res.err()?;
        if connect {
            tracing::debug!(session = %self.sess.id, error = %e, "bus refused connect");
            return Some(Ended::new(close::TRY_AGAIN_LATER, "bus unavailable"));
        }
        self.sess.route.drop_bus.increment(1);
        match self.sess.route.cfg.mode {
            Mode::Raw => {
                tracing::debug!(session = %self.sess.id, error = %e, "bus refused a frame: closing 1013");
                self.sess.queue.close(close::TRY_AGAIN_LATER, "bus unavailable");
                Some(Ended::new(close::TRY_AGAIN_LATER, "bus unavailable"))
            }
            Mode::Framed => None, // handle_op already told the client
        }
    }

    /// One result from the decoder.
    fn on_read(&mut self, next: Option<Result<Msg, DecodeError>>) -> Option<Ended> {
        let msg = match next {
            None => return Some(self.ended.take().unwrap_or_else(|| Ended::new(1006, "connection lost"))),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "client frame refused");
                let (code, reason) = e.close();
                if code != 1006 {
                    self.sess.queue.close(code, reason);
                }
                return Some(Ended::new(code, reason));
            }
            Some(Ok(m)) => m,
        };
        let (payload, opcode) = match msg {
            Msg::Text(t) => (t, Opcode::Text),
            Msg::Binary(b) => (b, Opcode::Binary),
            Msg::Ping(p) => {
                self.sess.queue.push_raw(frame::pong(&p));
                return None;
            }
            Msg::Pong => return None,
            Msg::Close(f) => {
                let (code, reason) = f.unwrap_or((1005, String::new()));
                return Some(self.ended.take().unwrap_or(Ended { code, reason }));
            }
        };
        let sess = &self.sess;
        sess.frames_in.fetch_add(1, Ordering::Relaxed);
        sess.route.frames_in.increment(1);
        sess.route.bytes_in.increment(payload.len() as u64);
        if self
            .ended
            .as_ref()
            .is_some_and(|e| e.code == close::POLICY || e.code == close::TOKEN_EXPIRED)
        {
            // Closed for policy (flood, rate) or an expired token: nothing more this client
            // sends is published while its close handshake runs out.
            sess.route.drop_policy.increment(1);
            return None;
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
                self.close_with(close::POLICY, "message rate exceeded", self.close_wait());
            } else {
                // Not published, and the client is told which message it was.
                let id = (opcode == Opcode::Text)
                    .then(|| framed::decode_request_with(&payload, self.st.cfg.max_json_depth).id)
                    .flatten();
                sess.reply(framed::error_with_id(
                    "rate_limited",
                    "message rate exceeded: not published",
                    id.as_deref(),
                ));
            }
            return None;
        }
        let (st, sess) = (self.st.clone(), self.sess.clone());
        let fut: Pin<Box<dyn Future<Output = Result<(), BusError>> + Send>> = match sess.route.cfg.mode {
            Mode::Raw => Box::pin(async move { publish_frame(&st, &sess, payload, opcode).await }),
            Mode::Framed => Box::pin(async move { handle_op(&st, &sess, payload, opcode).await }),
        };
        self.job = Some(Job { connect: false, fut });
        None
    }

    /// Re-arms the timer if the earliest deadline moved, and polls it.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<Option<Ended>> {
        let want = self.next_deadline();
        if want < self.timer.deadline() || self.timer.is_elapsed() {
            self.timer.as_mut().reset(want);
        }
        ready!(self.timer.as_mut().poll(cx));
        Poll::Ready(self.on_time(Instant::now()))
    }
}

impl<R, W> Future for Conn<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    type Output = Ended;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        let this = self.get_mut();
        // Woken by pushes to an empty queue and by signals (a drain).
        this.sess.queue.register(cx.waker());
        loop {
            this.poll_writer(cx);
            if let Some(job) = &mut this.job {
                if let Poll::Ready(res) = job.fut.as_mut().poll(cx) {
                    let connect = job.connect;
                    this.job = None;
                    // Idle time counts from the end of the client's last publish.
                    this.last_read = Instant::now();
                    if let Some(e) = this.on_job_done(connect, res) {
                        return Poll::Ready(e);
                    }
                    continue;
                }
            } else {
                if let Some(e) = this.on_signals() {
                    return Poll::Ready(e);
                }
                match this.stream.poll_next(cx) {
                    Poll::Ready(next) => {
                        this.last_read = Instant::now();
                        if let Some(e) = this.on_read(next) {
                            return Poll::Ready(e);
                        }
                        continue;
                    }
                    Poll::Pending => {
                        if this.closing.is_none() && this.tripped.reason().is_some() {
                            this.on_tripped();
                            continue;
                        }
                    }
                }
            }
            match this.poll_timer(cx) {
                Poll::Ready(Some(e)) => return Poll::Ready(e),
                Poll::Ready(None) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
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
async fn handle_op(st: &EdgeState, sess: &Arc<Session>, payload: Bytes, opcode: Opcode) -> Result<(), BusError> {
    if opcode == Opcode::Binary {
        sess.reply(framed::error(
            "bad_request",
            "binary frames are not part of the framed protocol",
        ));
        return Ok(());
    }
    let req = framed::decode_request_with(&payload, st.cfg.max_json_depth);
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
        ClientOp::Send { data } => publish_frame(st, sess, data, Opcode::Text).await,
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
        Ok(()) => {
            // Checked and recorded under the lock teardown takes to set `stopped` and empty
            // the set: either teardown sees this channel, or this sees `stopped`.
            let kept = {
                let mut chans = sess.channels.lock();
                let ended = sess.stopped.load(Ordering::Acquire) || sess.queue.is_closing();
                if !ended {
                    chans.insert(channel.to_owned());
                }
                !ended
            };
            if !kept {
                // The session ended while the subscription was being made: undo it, or the hub
                // would keep the session (and the bus subscription) forever.
                st.channels.unsubscribe(sess, channel).await;
            } else if sess.route.is_framed() {
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

/// Adds `sy-sig` when the node has an identity key.
fn sign(st: &EdgeState, headers: &mut Headers, payload: &[u8]) {
    if let Some(key) = &st.cfg.identity_hmac_key {
        let sig = switchyard_protocol::sign::sign(key, headers, payload);
        headers.insert(switchyard_protocol::sign::SIG, sig);
    }
}

/// Stamps an inbound record with the session's next seq. Records are published one at a time
/// per session, so seq order is publish order.
fn envelope(st: &EdgeState, sess: &Session, kind: Kind, payload: Bytes, opcode: Opcode) -> Envelope {
    let mut e = Envelope::new(sess.id.clone(), kind, payload);
    e.seq = sess.seq.fetch_add(1, Ordering::Relaxed) + 1;
    e.node = Some(st.cfg.node_id.clone());
    e.route = Some(sess.route.cfg.path.clone());
    e.opcode = opcode;
    e.trace = Some(sess.trace.clone());
    e.identity = sess.identity.clone();
    e.timestamp_ms = now_ms();
    e.reply = Some(st.node_topic.clone());
    e
}

/// Publishes one client frame to the route's inbound topic.
async fn publish_frame(st: &EdgeState, sess: &Session, payload: Bytes, opcode: Opcode) -> Result<(), BusError> {
    let e = envelope(st, sess, Kind::Frame, payload, opcode);
    let mut headers = e.headers();
    sign(st, &mut headers, &e.payload);
    let rec = Record {
        key: Some(e.key()),
        headers,
        payload: e.payload,
    };
    // A refused frame keeps its number: a gap in sy-seq tells the backend that a frame was
    // refused (and its client told).
    st.bus.publish(&sess.route.inbound, rec).await.map(|_| ())
}

/// Connect goes to the durable registry (if the bus has one) and the registry feed first,
/// then inbound; disconnect the other way round, so a router never routes to a session it
/// cannot find.
async fn lifecycle(st: &EdgeState, sess: &Session, kind: Kind, ended: Option<&Ended>) -> Result<(), BusError> {
    let mut e = envelope(st, sess, kind, Bytes::new(), Opcode::Text);
    if let Some(x) = ended {
        e.code = Some(x.code);
        // Client-chosen text: no control characters in a header.
        e.reason = Some(x.reason.chars().filter(|c| !c.is_control()).take(120).collect());
    }

    let mut headers = e.headers();
    headers.insert(header::INBOUND, sess.route.inbound.clone());
    sign(st, &mut headers, &[]);
    let rec = Record {
        key: Some(e.key()),
        headers,
        payload: Bytes::new(),
    };
    let sessions = st.cfg.naming.sessions();
    let inbound = &sess.route.inbound;
    let durable = st.bus.registry();
    if kind == Kind::Connect {
        if let Some(d) = &durable {
            let entry = SessionEntry {
                node: st.cfg.node_id.clone(),
                route: sess.route.cfg.path.clone(),
                inbound: inbound.clone(),
            };
            d.register(&sess.id, &entry).await?;
        }
        st.bus.publish(&sessions, rec.clone()).await?;
        st.bus.publish(inbound, rec).await?;
    } else {
        let a = st.bus.publish(inbound, rec.clone()).await;
        let b = st.bus.publish(&sessions, rec).await;
        if let Some(d) = &durable {
            d.unregister(&sess.id).await?;
        }
        a.and(b)?;
    }
    Ok(())
}

/// Most frames handed to one vectored write.
const IOV: usize = 64;

fn count(sess: &Session, route: &Route, n: u64, bytes: u64) {
    if n > 0 {
        sess.frames_out.fetch_add(n, Ordering::Relaxed);
        tally_route(route, n, bytes);
    }
}

fn tally_route(route: &Route, n: u64, bytes: u64) {
    if n > 0 {
        route.frames_out.increment(n);
        route.bytes_out.increment(bytes);
    }
}
