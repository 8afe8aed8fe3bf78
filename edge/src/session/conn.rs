//! The session's task as one hand-written future ([`Conn`]): the reader (one publish in flight
//! at a time), the writer (one vectored write per batch taken from the queue) and one timer for
//! the ping, idle, close and token deadlines.

use super::ending::{Ending, Write};
use super::ops::handle_op;
use super::publish::{lifecycle, publish_frame};
use super::{count, Ended, Session};
use crate::config::{Mode, RateAction};
use crate::decode::{DecodeError, Msg};
use crate::frame;
use crate::queue::Out;
use crate::state::EdgeState;
use bytes::Bytes;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use switchyard_bus::BusError;
use switchyard_protocol::envelope::now_ms;
use switchyard_protocol::framed;
use switchyard_protocol::ws::{self, Flood};
use switchyard_protocol::{close, Kind, Opcode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

pub(super) type Decoder<R> = crate::decode::Decoder<R, crate::limits::FloodBudget>;

/// A bus publish in flight (the connect event, or a client frame's publish or framed op).
struct Job {
    connect: bool,
    fut: Pin<Box<dyn Future<Output = Result<(), BusError>> + Send>>,
}

/// A session's task: reader, writer and timers in one hand-written future, which ends with how
/// the session ended. Client frames are read one at a time: while a frame's publish is in
/// flight nothing more is read (the bus sets the pace), but the writer and pings go on.
pub(super) struct Conn<R, W> {
    st: Arc<EdgeState>,
    sess: Arc<Session>,
    stream: Decoder<R>,
    sink: W,
    /// Frames taken from the queue and not yet fully written.
    batch: VecDeque<Out>,
    /// Written but not yet flushed (TLS).
    unflushed: bool,
    /// What the writer still owes the socket.
    write: Write,
    /// One timer for every deadline below; moved only when the earliest one comes closer or
    /// when it fires (reading a frame moves `last_read`, not the timer).
    timer: Pin<Box<Sleep>>,
    next_ping: Instant,
    last_read: Instant,
    /// When the credential expires: the socket is closed with 4001 then.
    expiry: Option<Instant>,
    /// Whether the session is closing, until when the client may answer, and why.
    ending: Ending,
    job: Option<Job>,
}

impl<R, W> Conn<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub(super) fn new(st: Arc<EdgeState>, sess: Arc<Session>, stream: Decoder<R>, sink: W) -> Self {
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
            fut: Box::pin(async move {
                let kind = if sess2.resumed_after.is_some() {
                    Kind::Resume
                } else {
                    Kind::Connect
                };
                lifecycle(&st2, &sess2, kind, None).await
            }),
        };
        Self {
            st,
            sess,
            stream,
            sink,
            batch: VecDeque::new(),
            unflushed: false,
            write: Write::Open,
            timer: Box::pin(tokio::time::sleep_until(next_ping)),
            next_ping,
            last_read: now,
            expiry,
            ending: Ending::Open,
            job: Some(job),
        }
    }

    /// After the session ended: lets the writer send what is queued and our close frame, or
    /// gives up after [`CLOSE_FLUSH`]. Boxed: the timer is needed once, not in every socket's
    /// resident task.
    pub(super) async fn flush_close(mut self) {
        if self.write_done() {
            return;
        }
        let flush = std::future::poll_fn(|cx| {
            self.poll_writer(cx);
            if self.write_done() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let _ = Box::pin(tokio::time::timeout(CLOSE_FLUSH, flush)).await;
    }

    /// Closes the socket with `code` (after what is queued) and gives the client `wait` to
    /// answer.
    fn close_with(&mut self, code: u16, reason: &str, wait: Duration) {
        self.sess.queue.close(code, reason);
        self.ending = Ending::Closing {
            until: Instant::now() + wait,
            why: Some(Ended::new(code, reason)),
        };
    }

    /// How long a client may take to answer our close (not the drain's full grace).
    fn close_wait(&self) -> Duration {
        self.st.cfg.shutdown_grace.min(Duration::from_secs(5))
    }

    /// Nothing more will be written (our close frame is out, or the socket failed).
    fn write_done(&self) -> bool {
        matches!(self.write, Write::Done { .. })
    }

    /// Drives the writer; moves it to [`Write::Done`] when it has finished.
    fn poll_writer(&mut self, cx: &mut Context<'_>) {
        if self.write_done() {
            return;
        }
        if let Poll::Ready(res) = self.poll_write_out(cx) {
            let sent = match std::mem::replace(&mut self.write, Write::Open) {
                Write::Closing(e) => Some(e),
                _ => None,
            };
            if let Err(e) = &res {
                tracing::debug!(session = %self.sess.id, error = %e, "socket write ended");
            }
            self.write = Write::Done {
                sent,
                failed: res.is_err(),
            };
            // Nothing more will be written: refuse further pushes.
            self.sess.queue.stop(close::GOING_AWAY, "writer stopped");
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
            if matches!(self.write, Write::Closing(_)) {
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
                    self.write = Write::Closing(Ended::new(*code, reason));
                    *out = Out::Raw(frame::close(*code, reason));
                }
            }
        }
        if matches!(self.write, Write::Closing(_)) && self.ending.is_open() {
            // We closed (backend request, slow consumer, ...): the client has a moment to
            // answer; what it still sends is read and published.
            self.ending = Ending::Closing {
                until: Instant::now() + self.close_wait(),
                why: None,
            };
        }
        // Counted before the write: once a client can see a frame, it is counted.
        count(&self.sess, &self.sess.route, n, bytes);
    }

    /// The earliest deadline the timer must wake us for. While a publish is in flight only
    /// pings are due (the rest is looked at once it is done).
    fn next_deadline(&self) -> Instant {
        let far = self.last_read + Duration::from_secs(86_400);
        let ping = if self.write_done() { far } else { self.next_ping };
        if self.job.is_some() {
            return ping;
        }
        let mut d = ping.min(self.ending.until().unwrap_or(self.last_read + self.st.cfg.idle_timeout));
        if self.ending.is_open() {
            if let Some(e) = self.expiry {
                d = d.min(e);
            }
        }
        d
    }

    /// Acts on the deadlines that have passed.
    fn on_time(&mut self, now: Instant) -> Option<Ended> {
        if !self.write_done() && now >= self.next_ping {
            self.sess.queue.push_raw(frame::ping());
            self.next_ping = now + self.st.cfg.ping_interval;
        }
        if self.job.is_some() {
            return None;
        }
        if !self.ending.is_open() {
            return self.close_timed_out(now);
        }
        if self.expiry.is_some_and(|e| now >= e) {
            self.close_with(close::TOKEN_EXPIRED, "token expired", self.close_wait());
            return None;
        }
        if now >= self.last_read + self.st.cfg.idle_timeout {
            self.sess.queue.stop(close::GOING_AWAY, "idle timeout");
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
        // A resume is taking the session over: this socket ends now (its close frame, already
        // queued, goes out if it can), without waiting for the client's answer.
        if self.sess.cont.taken_over() {
            return Some(Ended::new(close::GOING_AWAY, "resumed on another connection"));
        }
        // (The clock is read only when a deadline is running: this runs before every frame.)
        if !self.ending.is_open() {
            if let Some(e) = self.close_timed_out(Instant::now()) {
                return Some(e);
            }
        } else if self.sess.queue.is_closing() {
            // Closed from outside (a 4008 overflow, a backend close) while our writer is stuck
            // behind a full socket: the close frame may never go out, so start the clock here.
            self.ending = Ending::Closing {
                until: Instant::now() + self.close_wait(),
                why: None,
            };
        }
        if self.ending.is_open() && self.st.close_all.is_cancelled() {
            // Draining (SIGTERM): the client should reconnect, to another node.
            self.close_with(close::SERVICE_RESTART, "server restarting", self.st.cfg.shutdown_grace);
        }
        if self.ending.is_open() && self.expiry.is_some_and(|e| Instant::now() >= e) {
            self.close_with(close::TOKEN_EXPIRED, "token expired", self.close_wait());
        }
        if let Write::Done { sent, failed: true } = &mut self.write {
            let sent = sent.take();
            return Some(
                self.ending
                    .take_why()
                    .or(sent)
                    .unwrap_or_else(|| Ended::new(close::ABNORMAL, "write failed")),
            );
        }
        None
    }

    /// How the session ends once the client has had its time to answer our close.
    fn close_timed_out(&mut self, now: Instant) -> Option<Ended> {
        self.ending.until().is_some_and(|d| now >= d).then(|| {
            self.ending
                .take_why()
                .unwrap_or_else(|| Ended::new(close::GOING_AWAY, "close timeout"))
        })
    }

    /// A frame-flood budget ran out and the decoder stopped reading: nothing more will come
    /// from this client, so only give the writer a moment to send our close frame.
    fn on_tripped(&mut self, flood: Flood) {
        metrics::counter!(crate::metrics::DROPS, "route" => self.sess.route.cfg.path.clone(), "reason" => flood.label())
            .increment(1);
        self.close_with(close::POLICY, flood.reason(), Duration::from_secs(1));
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
            None => {
                return Some(
                    self.ending
                        .take_why()
                        .unwrap_or_else(|| Ended::new(close::ABNORMAL, "connection lost")),
                )
            }
            Some(Err(DecodeError::Frame(ws::Error::Flood(flood)))) => {
                if self.ending.is_open() {
                    self.on_tripped(flood);
                }
                return None;
            }
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
                return Some(self.ending.take_why().unwrap_or(Ended { code, reason }));
            }
        };
        let sess = &self.sess;
        sess.frames_in.fetch_add(1, Ordering::Relaxed);
        sess.route.frames_in.increment(1);
        sess.route.bytes_in.increment(payload.len() as u64);
        if self
            .ending
            .why()
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
            Mode::Raw => Box::pin(async move { publish_frame(&st, &sess, payload, opcode, None).await }),
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
                // A publish still in flight (the bus may be slow, or gone) does not hold back
                // the drain's close: the client is told to reconnect now; the session ends
                // once the publish has its answer.
                if this.ending.is_open() && this.st.close_all.is_cancelled() {
                    this.close_with(close::SERVICE_RESTART, "server restarting", this.st.cfg.shutdown_grace);
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
                    Poll::Pending => {}
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

/// How long a session's last writes (what is queued, then our close frame) may take.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// Most frames handed to one vectored write.
const IOV: usize = 64;
