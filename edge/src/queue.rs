//! The bounded outgoing queue of one socket, and the direct write path in front of it.
//!
//! Everything bound for a client is a complete, already-encoded WebSocket frame ([`Bytes`],
//! shared between all recipients of a channel message). A producer (channel fan-out, node
//! delivery, the session's own replies) pushes a frame:
//!
//! - when nothing is queued and the socket's writer is idle, and the socket is plain TCP, the
//!   producer writes the frame to the socket itself (`try_write`, never waiting): no queue
//!   entry, no task wake-up. The rest of a partly written frame is queued first in line;
//! - otherwise the frame is queued and the socket's writer task, woken only when the queue
//!   becomes non-empty, takes everything at once and writes it with one vectored write, so
//!   bursts coalesce without a timer.
//!
//! Both paths run under the queue's lock or while the writer holds the `writing` mark, so
//! bytes of two frames never interleave. When the queue is full the route's [`SlowPolicy`]
//! decides: drop the oldest data frame, or close the socket with 4008. Both are counted by the
//! caller.

use crate::config::SlowPolicy;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;

/// What the writer should do next.
#[derive(Debug)]
pub enum Out {
    /// A data frame (channel message, backend reply): the one a full queue may drop.
    Data(Bytes),
    /// A frame the protocol requires (welcome, ack, error, ping, pong): never dropped.
    Control(Bytes),
    /// Bytes not counted as a frame: pings, pongs, and the unsent end of a frame whose start
    /// is already on the wire (first in line). Never dropped.
    Raw(Bytes),
    /// Send a close frame with this code and reason, then stop writing.
    Close(u16, String),
}

impl Out {
    /// The bytes to write (a close is encoded by the writer).
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            Out::Data(b) | Out::Control(b) | Out::Raw(b) => Some(b),
            Out::Close(..) => None,
        }
    }
}

/// Result of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Written to the socket by the caller (at least its first byte; the rest is queued).
    Written,
    Queued,
    /// Queued after dropping the oldest data frame (policy `drop_oldest`).
    DroppedOldest,
    /// Queue full under policy `close`: the socket is being closed with 4008; frame dropped.
    Overflowed,
    /// The socket is already closing; frame dropped.
    Closed,
}

struct State {
    items: VecDeque<Out>,
    closing: bool,
    /// The writer task holds frames it took from the queue and has not finished writing:
    /// nobody else may write to the socket.
    writing: bool,
    /// The front item is the rest of a frame cut by a direct write: not counted against the cap
    /// (its frame was accepted already).
    rest: bool,
    /// The socket, for the direct path (plain TCP only; TLS goes through the writer task).
    direct: Option<Arc<OwnedWriteHalf>>,
    /// Someone decided to end the session ([`OutQueue::close`]), rather than the socket
    /// failing under it ([`OutQueue::stop`]).
    deliberate: bool,
}

impl State {
    /// Queued items that count against the cap.
    fn held(&self) -> usize {
        self.items.len() - usize::from(self.rest)
    }

    /// Queues the unsent end of a frame cut by a direct write (the queue was empty: it is first
    /// in line). The caller wakes the writer.
    fn push_rest(&mut self, rest: Bytes) {
        self.items.push_back(Out::Raw(rest));
        self.rest = true;
    }

    /// Marks the queue closing and queues the 4008 close. The caller wakes the writer.
    fn close_slow(&mut self) {
        self.closing = true;
        self.items.push_back(Out::Close(
            switchyard_protocol::close::SLOW_CONSUMER,
            "slow consumer".into(),
        ));
    }
}

pub struct OutQueue {
    state: Mutex<State>,
    /// The session task's waker: woken when the queue becomes non-empty (and by
    /// [`OutQueue::wake`]).
    waker: atomic_waker::AtomicWaker,
    cap: usize,
    policy: SlowPolicy,
}

impl OutQueue {
    pub fn new(cap: usize, policy: SlowPolicy) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closing: false,
                writing: false,
                rest: false,
                direct: None,
                deliberate: false,
            }),
            waker: atomic_waker::AtomicWaker::new(),
            cap: cap.max(1),
            policy,
        }
    }

    /// Enables the direct path: producers may write to this socket themselves.
    pub fn set_direct(&self, socket: Arc<OwnedWriteHalf>) {
        self.state.lock().direct = Some(socket);
    }

    /// Lets go of the socket (the session outlives it while it waits for a resume).
    pub fn drop_direct(&self) {
        self.state.lock().direct = None;
    }

    /// Writes `frame` now if nothing is ahead of it. `None` when it must be queued.
    fn try_direct(&self, s: &mut State, frame: &Bytes) -> Option<Push> {
        if !s.items.is_empty() || s.writing {
            return None;
        }
        let socket = s.direct.clone()?;
        match socket.try_write(frame) {
            Ok(n) if n == frame.len() => Some(Push::Written),
            Ok(n) if n > 0 => {
                s.push_rest(frame.slice(n..));
                self.waker.wake();
                Some(Push::Written)
            }
            // Would block (or failed: the writer task finds out and ends the session).
            _ => None,
        }
    }

    /// Queues a data frame under the slow-consumer policy (lock held, direct path not tried).
    /// Returns the result and whether the writer must be woken.
    fn queue_data(&self, s: &mut State, frame: Bytes) -> (Push, bool) {
        let mut res = Push::Queued;
        if s.held() >= self.cap {
            match self.policy {
                SlowPolicy::DropOldest => {
                    if let Some(i) = s.items.iter().position(|o| matches!(o, Out::Data(_))) {
                        s.items.remove(i);
                        res = Push::DroppedOldest;
                    }
                }
                SlowPolicy::Close => {
                    s.close_slow();
                    return (Push::Overflowed, true);
                }
            }
        }
        let was_empty = s.items.is_empty();
        s.items.push_back(Out::Data(frame));
        // The writer takes everything at once and waits only after seeing the queue empty
        // (under the lock), so only the push that makes it non-empty needs to wake it.
        (res, was_empty)
    }

    /// Sends or queues a data frame under the slow-consumer policy (the handle is cloned only
    /// when the frame has to be queued).
    pub fn push(&self, frame: &Bytes) -> Push {
        let mut s = self.state.lock();
        if s.closing {
            return Push::Closed;
        }
        if let Some(p) = self.try_direct(&mut s, frame) {
            return p;
        }
        let (res, wake) = self.queue_data(&mut s, frame.clone());
        drop(s);
        if wake {
            self.waker.wake();
        }
        res
    }

    /// Sends or queues several data frames in order, the ones that fit with one vectored write.
    /// Reports what happened to each frame through `each` (in order).
    pub fn push_all(&self, frames: &[Bytes], mut each: impl FnMut(&Bytes, Push)) {
        let mut s = self.state.lock();
        let mut rest = frames;
        if !s.closing && s.items.is_empty() && !s.writing {
            if let Some(socket) = s.direct.clone() {
                let mut slices = [std::io::IoSlice::new(&[]); 64];
                let k = frames
                    .iter()
                    .zip(slices.iter_mut())
                    .map(|(f, sl)| *sl = std::io::IoSlice::new(f))
                    .count();
                let mut n = socket.try_write_vectored(&slices[..k]).unwrap_or(0);
                while let Some((f, tail)) = rest.split_first() {
                    if n == 0 {
                        break;
                    }
                    if n < f.len() {
                        s.push_rest(f.slice(n..));
                        self.waker.wake();
                        n = 0;
                    } else {
                        n -= f.len();
                    }
                    each(f, Push::Written);
                    rest = tail;
                }
            }
        }
        let mut wake = false;
        for f in rest {
            let p = if s.closing {
                Push::Closed
            } else {
                let (p, w) = self.queue_data(&mut s, f.clone());
                wake |= w;
                p
            };
            each(f, p);
        }
        drop(s);
        if wake {
            self.waker.wake();
        }
    }

    /// Sends or queues a frame the protocol requires (welcome, acks, errors). These are not
    /// subject to drop-oldest, but a client that lets twice the queue size pile up (e.g. by
    /// sending garbage without reading the errors) is closed with 4008 all the same.
    pub fn push_control(&self, frame: Bytes) -> Push {
        self.push_kept(frame, Out::Control)
    }

    /// Sends or queues a ping or pong: kept like [`OutQueue::push_control`], not counted as a frame.
    pub fn push_raw(&self, frame: Bytes) -> Push {
        self.push_kept(frame, Out::Raw)
    }

    fn push_kept(&self, frame: Bytes, kind: fn(Bytes) -> Out) -> Push {
        let mut s = self.state.lock();
        if s.closing {
            return Push::Closed;
        }
        if let Some(p) = self.try_direct(&mut s, &frame) {
            return p;
        }
        if s.held() >= self.cap.saturating_mul(2) {
            s.close_slow();
            drop(s);
            self.waker.wake();
            return Push::Overflowed;
        }
        self.enqueue(s, kind(frame));
        Push::Queued
    }

    fn enqueue(&self, mut s: parking_lot::MutexGuard<'_, State>, item: Out) {
        let was_empty = s.items.is_empty();
        s.items.push_back(item);
        drop(s);
        if was_empty {
            self.waker.wake();
        }
    }

    /// Asks the writer to close the socket after what is already queued. Returns false when a
    /// close was already requested.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        self.close_as(code, reason, true)
    }

    /// [`OutQueue::close`] for a socket that failed or went silent: the session may still
    /// be resumed.
    pub fn stop(&self, code: u16, reason: &str) -> bool {
        self.close_as(code, reason, false)
    }

    /// True when the session was closed on purpose (a backend, a limit, the drain), not
    /// because its socket failed.
    pub fn closed_deliberately(&self) -> bool {
        self.state.lock().deliberate
    }

    fn close_as(&self, code: u16, reason: &str, deliberate: bool) -> bool {
        let mut s = self.state.lock();
        if s.closing {
            return false;
        }
        s.closing = true;
        s.deliberate = deliberate;
        s.items.push_back(Out::Close(code, reason.to_owned()));
        drop(s);
        self.waker.wake();
        true
    }

    pub fn is_closing(&self) -> bool {
        self.state.lock().closing
    }

    pub fn len(&self) -> usize {
        self.state.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers the session task's waker: it is woken when something is queued.
    pub fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    /// Wakes the session task (a signal for it outside the queue, e.g. a drain).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// When something is queued, moves all of it into `batch` and marks the writer busy until
    /// the next call finds the queue empty; otherwise registers `cx` to be woken by the next
    /// push.
    pub fn poll_take_all(&self, cx: &mut Context<'_>, batch: &mut VecDeque<Out>) -> Poll<()> {
        let mut s = self.state.lock();
        if !s.items.is_empty() {
            std::mem::swap(&mut s.items, batch);
            s.writing = true;
            s.rest = false;
            return Poll::Ready(());
        }
        s.writing = false;
        // Under the lock: a push after this sees the registered waker.
        self.waker.register(cx.waker());
        Poll::Pending
    }

    /// Waits until something is queued, then takes it all ([`OutQueue::poll_take_all`]).
    pub async fn take_all(&self, batch: &mut VecDeque<Out>) {
        std::future::poll_fn(|cx| self.poll_take_all(cx, batch)).await
    }
}

/// The writing end of a plain TCP socket shared with the direct path: an [`AsyncWrite`] over
/// `Arc<OwnedWriteHalf>` (readiness + `try_write`), used only by the socket's writer task.
pub struct SharedTcp(pub Arc<OwnedWriteHalf>);

impl SharedTcp {
    fn poll_io(
        &self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&OwnedWriteHalf) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(AsRef::<tokio::net::TcpStream>::as_ref(&*self.0).poll_write_ready(cx))?;
            match f(&self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_io(cx, |s| s.try_write(buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(cx, |s| s.try_write_vectored(bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    /// The write side is shut down when the last handle (this or the direct path's) drops.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Bytes {
        crate::frame::text(s.as_bytes())
    }

    fn texts(b: &VecDeque<Out>) -> Vec<String> {
        b.iter()
            .map(|o| match o {
                Out::Data(f) | Out::Control(f) => String::from_utf8_lossy(&f[2..]).into_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn drop_oldest_keeps_newest_and_protocol_frames() {
        let q = OutQueue::new(2, SlowPolicy::DropOldest);
        assert_eq!(q.push_control(frame("welcome")), Push::Queued);
        assert_eq!(q.push(&frame("1")), Push::Queued);
        assert_eq!(q.push(&frame("2")), Push::DroppedOldest);
        assert_eq!(q.push(&frame("3")), Push::DroppedOldest);
        let mut b = VecDeque::new();
        q.take_all(&mut b).await;
        assert_eq!(texts(&b), ["welcome", "3"]);
    }

    #[tokio::test]
    async fn protocol_replies_are_bounded_too() {
        let q = OutQueue::new(2, SlowPolicy::DropOldest);
        for _ in 0..4 {
            assert_eq!(q.push_control(frame("err")), Push::Queued);
        }
        assert_eq!(
            q.push_control(frame("err")),
            Push::Overflowed,
            "past twice the queue size the socket closes"
        );
        let mut b = VecDeque::new();
        q.take_all(&mut b).await;
        assert!(matches!(b.back(), Some(Out::Close(4008, _))));
    }

    #[tokio::test]
    async fn close_policy_closes_once() {
        let q = OutQueue::new(1, SlowPolicy::Close);
        assert_eq!(q.push(&frame("1")), Push::Queued);
        assert_eq!(q.push(&frame("2")), Push::Overflowed);
        assert_eq!(q.push(&frame("3")), Push::Closed);
        assert!(!q.close(1000, "x"));
        let mut b = VecDeque::new();
        q.take_all(&mut b).await;
        assert!(matches!(b.back(), Some(Out::Close(4008, _))));
        assert_eq!(b.len(), 2);
    }

    /// A connected loopback pair: (server write half for the queue, server read half kept
    /// open, client end).
    async fn pair() -> (
        Arc<OwnedWriteHalf>,
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::TcpStream,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (r, w) = server.into_split();
        (Arc::new(w), r, client)
    }

    #[tokio::test]
    async fn direct_writes_skip_the_queue_only_when_nothing_is_ahead() {
        use tokio::io::AsyncReadExt;
        let (w, _r, mut client) = pair().await;
        let q = OutQueue::new(8, SlowPolicy::DropOldest);
        assert_eq!(q.push(&frame("queued")), Push::Queued, "no socket yet");
        q.set_direct(w);
        assert_eq!(q.push(&frame("behind")), Push::Queued, "a queued frame is ahead");
        let mut b = VecDeque::new();
        q.take_all(&mut b).await;
        assert_eq!(q.push(&frame("busy")), Push::Queued, "the writer holds frames");
        let mut b2 = VecDeque::new();
        q.take_all(&mut b2).await; // the writer would write b, then come back for b2
        assert_eq!(texts(&b2), ["busy"]);
        let qa = Arc::new(q);
        let q2 = qa.clone();
        // The writer finds the queue empty and goes idle: now producers write directly.
        let idle = tokio::spawn(async move { q2.take_all(&mut VecDeque::new()).await });
        tokio::task::yield_now().await;
        while qa.state.lock().writing {
            tokio::task::yield_now().await;
        }
        assert_eq!(qa.push(&frame("direct")), Push::Written);
        assert!(qa.is_empty());
        let want = frame("direct");
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        idle.abort();
    }

    /// Pushes 256 KiB frames through the direct path until one is cut (nobody reads the client
    /// end, so the socket buffers fill); returns the frame.
    fn fill_until_cut(q: &OutQueue) -> Bytes {
        let big = crate::frame::binary(&vec![7u8; 256 << 10]);
        let mut pushes = 0;
        while q.is_empty() {
            assert_eq!(q.push(&big), Push::Written);
            pushes += 1;
            assert!(pushes < 1000, "socket buffers never filled");
        }
        big
    }

    #[tokio::test]
    async fn a_partial_direct_write_queues_the_rest_first() {
        let (w, _r, client) = pair().await;
        let q = OutQueue::new(1 << 20, SlowPolicy::DropOldest);
        q.set_direct(w);
        let big = fill_until_cut(&q);
        assert_eq!(q.push(&big), Push::Queued);
        let mut b = VecDeque::new();
        q.take_all(&mut b).await;
        assert!(matches!(b.front(), Some(Out::Raw(r)) if r.len() < big.len()));
        assert!(matches!(b.get(1), Some(Out::Data(_))));
        drop(client);
    }

    #[tokio::test]
    async fn the_rest_of_a_cut_frame_does_not_count_against_the_cap() {
        let (w, _r, client) = pair().await;
        let q = OutQueue::new(1, SlowPolicy::Close);
        q.set_direct(w);
        let big = fill_until_cut(&q);
        assert_eq!(q.push(&big), Push::Queued, "one frame fits next to the cut one");
        assert_eq!(q.push(&big), Push::Overflowed, "the second is past the cap of 1");
        drop(client);
    }
}
