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
//!
//! - this module: the session handle ([`Session`]: queue, counters, channels) and teardown;
//! - [`conn`]: the hand-written future that reads, writes and keeps the timers;
//! - [`ending`]: its two states of ending (the writer's, the session's);
//! - [`ops`]: the framed protocol's ops (subscribe, unsubscribe, publish, send);
//! - [`publish`]: envelope stamping and the inbound, lifecycle and registry publishes;
//! - [`resume`]: what survives a reconnect (numbered deliveries, accepted ids, the phase).
//!
//! A socket that drops (1006, or 1001 going away) with resume on is parked instead of ended:
//! the task keeps the session (deliveries are kept, no disconnect is published) until a resume
//! takes it over, its `--resume-window` ends, or the node drains; then it ends as usual, with
//! the original close code.

mod conn;
mod ending;
mod ops;
mod publish;
pub mod resume;
#[cfg(test)]
mod tests;

pub use ops::subscribe;

use crate::config::Mode;
use crate::frame;
use crate::queue::{OutQueue, Push};
use crate::state::{EdgeState, Route};
use bytes::Bytes;
use conn::{Conn, Decoder};
use parking_lot::Mutex;
use publish::lifecycle;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use switchyard_protocol::envelope::now_ms;
use switchyard_protocol::framed;
use switchyard_protocol::{close, Kind, TraceContext};
use tokio::io::{AsyncRead, AsyncWrite};

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
    pub(crate) stopped: AtomicBool,
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
    /// What survives a reconnect (shared with the sockets that resume this session).
    pub cont: Arc<resume::Continuity>,
    /// The socket negotiated `switchyard.v2`: deliveries are wrapped and numbered.
    pub v2: bool,
    /// This socket resumed the session after the client had received this many deliveries.
    pub resumed_after: Option<u64>,
    /// The framed `welcome` text (built at the handshake, where the resume was decided).
    pub welcome: Option<String>,
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
            rate: route.rate.map(crate::limits::direct_limiter),
            route,
            cont: Arc::new(resume::Continuity::new(0)),
            v2: false,
            resumed_after: None,
            welcome: None,
        }
    }

    /// For a resume: takes the session from its socket if that still looks alive (closed with
    /// 1001 and `reason`, woken even if it was already closing), and waits up to 2 s for the
    /// session to park. False when it did not park.
    pub async fn take_from_socket(&self, reason: &str) -> bool {
        if !self.cont.is_live() {
            return true;
        }
        self.cont.start_takeover();
        self.queue.close(close::GOING_AWAY, reason);
        // Already closing (the drain's 1012, waiting for the client's answer), it must look at
        // the takeover now, not when its close wait ends.
        self.queue.wake();
        self.cont.wait_parked(TAKEOVER_WAIT).await
    }

    /// The inbound seq of the session's last record.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Continues at `seq` (a resumed session's records carry on where it stopped).
    pub fn continue_seq(&self, seq: u64) {
        self.seq.store(seq, Ordering::Relaxed);
    }

    /// The frame of backend delivery `n` for this socket: wrapped on `switchyard.v2`, else the
    /// payload as is (binary when marked so or not UTF-8).
    pub fn delivery_frame(&self, n: u64, payload: &[u8], binary: bool) -> Bytes {
        if self.v2 {
            resume::v2_frame(n, payload, binary)
        } else if binary || std::str::from_utf8(payload).is_err() {
            frame::binary(payload)
        } else {
            frame::text(payload)
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
/// halves; the reader charges every frame header to the socket's flood budgets.
pub async fn run<R, W>(st: Arc<EdgeState>, sess: Arc<Session>, reader: R, writer: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let budget = crate::limits::FloodBudget::new(st.cfg.frame_limits);
    let stream = Decoder::with_budget(reader, sess.route.max_message_size, budget);
    st.sessions.insert(sess.id.clone(), sess.clone());
    // Resumed from this node's log after a restart: what waited for it goes out now.
    crate::handover::log::arrive(&st, &sess.id);
    sess.route.open.increment(1.0);
    // Welcome first: a backend may answer the connect event before the publish returns.
    if sess.route.cfg.mode == Mode::Framed {
        let w = sess.welcome.clone().unwrap_or_else(|| framed::welcome(&sess.id));
        sess.reply(w);
    }
    // Then, on a resume, the deliveries the client missed; then live ones.
    sess.cont.live();
    sess.cont.attach(&sess, sess.resumed_after);
    if sess.resumed_after.is_some() && !sess.route.is_framed() {
        // The raw session's channels, which it kept while away, now feed this socket.
        let channels: Vec<String> = sess.channels.lock().iter().cloned().collect();
        for c in channels {
            if st.channels.subscribe(&sess, &c, None).await.is_err() {
                sess.channels.lock().remove(&c);
            }
        }
    }
    let mut conn = Conn::new(st.clone(), sess.clone(), stream, writer);
    let ended = (&mut conn).await;
    // A close this side had started (a backend, the admin API, a limit, the drain) is final;
    // the takeover by a resume is not.
    // The drain's 1012 is not final when another edge can take the session over.
    let final_close = sess.queue.closed_deliberately()
        && !sess.cont.taken_over()
        && !(ended.code == close::SERVICE_RESTART && hands_over(&st));

    // Teardown: send our close frame if one is still owed, leave channels, forget the session,
    // then tell the backend. 1005/1006/1015 are never sent on the wire.
    let code = if matches!(ended.code, 1005 | 1006 | 1015) {
        close::NORMAL
    } else {
        ended.code
    };
    sess.queue.close(code, &ended.reason);
    conn.flush_close().await;
    if !final_close && resumable(&st, &ended) && sess.cont.park() {
        sess.queue.drop_direct();
        sess.route.open.decrement(1.0);
        let taken = park(&st, &sess).await;
        sess.route.open.increment(1.0);
        if taken {
            // A new socket carries the session on: no disconnect, and its channels and its
            // entry in `sessions` are the new socket's now.
            metrics::counter!(crate::metrics::CLOSES, "route" => sess.route.cfg.path.clone(), "code" => ended.code.to_string())
                .increment(1);
            sess.route.open.decrement(1.0);
            return;
        }
    } else {
        sess.cont.expire();
    }
    let channels: Vec<String> = {
        let mut chans = sess.channels.lock();
        sess.stopped.store(true, Ordering::Release);
        chans.drain().collect()
    };
    for c in channels {
        Box::pin(st.channels.unsubscribe(&sess, &c)).await;
    }
    st.sessions.remove_if(&sess.id, |_, s| Arc::ptr_eq(s, &sess));
    sess.route.open.decrement(1.0);
    metrics::counter!(crate::metrics::CLOSES, "route" => sess.route.cfg.path.clone(), "code" => ended.code.to_string())
        .increment(1);
    tracing::debug!(code = ended.code, reason = %ended.reason, "session closed");
    if let Err(e) = Box::pin(lifecycle(&st, &sess, Kind::Disconnect, Some(&ended))).await {
        st.disconnects_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(session = %sess.id, error = %e, "bus refused disconnect event: its backend is not told the session ended");
    }
}

/// How long a resume waits for the session's old socket to close and park (a client can come
/// back before the edge has noticed its old connection is dead).
const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A session taken over for a resume that then did not happen (its upgrade failed, or the
/// node it was handed to did not take it): it ends here, and its disconnect is published
/// (code 1006, reason `why`).
pub async fn abandon(st: &EdgeState, sess: &Arc<Session>, why: &str) {
    sess.cont.end();
    st.sessions.remove_if(&sess.id, |_, s| Arc::ptr_eq(&s.cont, &sess.cont));
    let channels: Vec<String> = sess.channels.lock().drain().collect();
    for c in channels {
        Box::pin(st.channels.unsubscribe(sess, &c)).await;
    }
    let ended = Ended::new(close::ABNORMAL, why);
    if let Err(e) = Box::pin(lifecycle(st, sess, Kind::Disconnect, Some(&ended))).await {
        st.disconnects_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(session = %sess.id, error = %e, "bus refused disconnect event: its backend is not told the session ended");
    }
}

/// Whether a session that ended this way waits for a resume: resume is on, and the socket
/// dropped (1006) or went away (1001: the client said so, the idle timeout, or a resume took
/// it over), or the drain closed it (1012) and another edge can take it ([`hands_over`]).
fn resumable(st: &EdgeState, ended: &Ended) -> bool {
    if st.cfg.resume_window.is_zero() {
        return false;
    }
    if st.close_all.is_cancelled() {
        matches!(ended.code, close::ABNORMAL | close::GOING_AWAY | close::SERVICE_RESTART) && hands_over(st)
    } else {
        matches!(ended.code, close::ABNORMAL | close::GOING_AWAY) && !st.shutdown.is_cancelled()
    }
}

/// Draining, a session closed with 1012 waits for a resume on another edge for the handover
/// grace: when one is set, the bus is shared (not memory://) and the bus is up.
pub(crate) fn hands_over(st: &EdgeState) -> bool {
    st.close_all.is_cancelled() && !st.cfg.handover_grace.is_zero() && st.bus.scheme() != "memory" && st.bus.is_ready()
}

/// Waits, parked, for a resume (true), the end of the window or the drain (false).
async fn park(st: &EdgeState, sess: &Arc<Session>) -> bool {
    let parked = metrics::gauge!(crate::metrics::SESSIONS_PARKED);
    parked.increment(1.0);
    // Framed clients resubscribe (with `since`) when they resume; raw sessions keep their
    // channels, whose messages are deliveries kept like the backend's.
    if sess.route.is_framed() {
        let channels: Vec<String> = sess.channels.lock().drain().collect();
        for c in channels {
            Box::pin(st.channels.unsubscribe(sess, &c)).await;
        }
    }
    // Draining: only for the handover grace (counted from when the drain closed it), and not
    // at all when no other edge can take it (the drain may have begun while this session was
    // leaving its channels).
    // One look at the drain for both: had it begun between two looks, the window would bound
    // the wait, not the drain (a session left parked past the shutdown grace).
    let draining = st.close_all.is_cancelled();
    let wait = if !draining {
        st.cfg.resume_window
    } else if hands_over(st) {
        st.cfg.handover_grace.min(st.cfg.resume_window)
    } else {
        std::time::Duration::ZERO
    };
    let drained = async {
        if draining {
            // Parked by the drain: `wait` bounds it.
            return std::future::pending::<()>().await;
        }
        st.close_all.cancelled().await;
        // The drain began while it was parked: it may still be taken for the handover grace.
        if hands_over(st) {
            tokio::time::sleep(st.cfg.handover_grace.min(st.cfg.resume_window)).await
        }
    };
    let taken = tokio::select! {
        _ = sess.cont.taken.notified() => true,
        _ = tokio::time::sleep(wait) => false,
        _ = drained => false,
    };
    parked.decrement(1.0);
    // A resume may win the race with the window: then it has the session.
    taken || !sess.cont.expire()
}

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
