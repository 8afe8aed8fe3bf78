//! What a session keeps across a reconnect to the same edge: its backend deliveries (numbered
//! from 1, the newest `--resume-buffer` kept for a resume), the `id`s of its last accepted
//! sends and publishes (duplicates are acknowledged, not published again), and its phase
//! (live, parked while the client is away, resumed by a new socket, or ended).
//!
//! One [`Continuity`] is shared by every socket of a session: a resume builds a new
//! [`Session`] around the same one. Deliveries always go to the current socket (the sink), so
//! a delivery racing a resume is neither lost nor sent twice.

use super::Session;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Weak};
use switchyard_protocol::resume::{Anchor, Hop, Point};
use switchyard_protocol::{framed, handover};

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Live,
    /// The socket is gone; the session waits for a resume until its window ends.
    Parked,
    /// A new socket took it over.
    Resumed,
    /// It ended (its disconnect is or was published).
    Ended,
}

/// One kept delivery.
struct Kept {
    n: u64,
    payload: Bytes,
    binary: bool,
}

struct Deliveries {
    /// The next delivery's number (1-based).
    next: u64,
    kept: VecDeque<Kept>,
    cap: usize,
    /// While a resume is being attached: nothing after this number may be dropped.
    pinned: Option<u64>,
    /// The socket deliveries go to (none while parked).
    sink: Weak<Session>,
    /// Handed over to this node: deliveries are passed on there, not numbered here.
    forward: Option<Arc<str>>,
    /// Where the deliveries numbered from `next` on are in this node's log (for a resume
    /// after this node died), while that can be told: a delivery that came in log order moves
    /// it; one that did not (passed on from another node, a raw channel message) clears it.
    anchor: Option<Anchor>,
    /// Resumed from this node's own log up to this position: a record of the log at or before
    /// it (a lagging delivery loop) was read already, and is not delivered again.
    skip_through: Option<u64>,
}

/// The last `cap` accepted ids, for duplicate suppression.
struct RecentIds {
    order: VecDeque<String>,
    set: HashSet<String>,
    cap: usize,
}

/// Most ids remembered per session.
pub const RECENT_IDS: usize = 1000;

/// Why a resume cannot happen here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHere {
    /// Not parked on this edge: the window ended, the session is still connected elsewhere on
    /// this node, or another edge holds it.
    NotParked,
    /// The client says it received more deliveries than were sent.
    AheadOfServer,
    /// More deliveries came while it was away than the resume buffer keeps.
    BufferExceeded,
}

impl NotHere {
    pub fn code(self) -> &'static str {
        match self {
            NotHere::NotParked => "not_parked",
            NotHere::AheadOfServer => "delivered_ahead",
            NotHere::BufferExceeded => "buffer_exceeded",
        }
    }
}

pub struct Continuity {
    /// Deliveries kept for a resume (0: resume is off).
    keep: usize,
    phase: Mutex<Phase>,
    deliveries: Mutex<Deliveries>,
    ids: Mutex<RecentIds>,
    /// Woken when a resume takes the parked session over.
    pub(super) taken: tokio::sync::Notify,
    /// Woken when the session parks.
    parked: tokio::sync::Notify,
    /// A resume is closing the old socket to take the session over.
    takeover: std::sync::atomic::AtomicBool,
}

impl Continuity {
    /// `keep`: deliveries kept for a resume (0 when resume is off).
    pub fn new(keep: usize) -> Self {
        Self {
            keep,
            phase: Mutex::new(Phase::Live),
            deliveries: Mutex::new(Deliveries {
                next: 1,
                kept: VecDeque::new(),
                cap: keep,
                pinned: None,
                sink: Weak::new(),
                forward: None,
                anchor: None,
                skip_through: None,
            }),
            ids: Mutex::new(RecentIds {
                order: VecDeque::new(),
                set: HashSet::new(),
                cap: RECENT_IDS,
            }),
            taken: tokio::sync::Notify::new(),
            parked: tokio::sync::Notify::new(),
            takeover: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A resume is about to close the live socket to take the session over.
    pub fn start_takeover(&self) {
        self.takeover.store(true, std::sync::atomic::Ordering::Release);
    }

    /// True while a resume is taking the session over from a live socket.
    pub fn taken_over(&self) -> bool {
        self.takeover.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until the session has parked (true), up to `within`.
    pub async fn wait_parked(&self, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let parked = self.parked.notified();
            match *self.phase.lock() {
                Phase::Parked => return true,
                Phase::Live => {}
                Phase::Resumed | Phase::Ended => return false,
            }
            if tokio::time::timeout_at(deadline, parked).await.is_err() {
                return false;
            }
        }
    }

    /// True while a socket is live for the session.
    pub fn is_live(&self) -> bool {
        *self.phase.lock() == Phase::Live
    }

    /// True when deliveries are kept for a resume.
    pub fn keeps(&self) -> bool {
        self.keep > 0
    }

    /// Numbers a delivery, keeps it, and sends it to the session's current socket. `at`: its
    /// position in this node's delivery log, when it came from there in log order (`None`
    /// for one passed on from another node or a channel message). Once the session was handed
    /// over to another node, returns that node instead (the caller passes the record on).
    #[must_use = "a handed-over session's records are passed on by the caller"]
    pub fn deliver(&self, payload: &Bytes, binary: bool, at: Option<u64>) -> Option<Arc<str>> {
        let mut d = self.deliveries.lock();
        if let Some(node) = &d.forward {
            return Some(node.clone());
        }
        if let (Some(o), Some(skip)) = (at, d.skip_through) {
            if o <= skip {
                return None;
            }
        }
        let n = d.next;
        d.next += 1;
        d.anchor = at.map(|o| Anchor {
            base: n,
            prev: None,
            here: Point {
                after: Some(o),
                since_ms: None,
            },
        });
        if d.cap > 0 {
            d.kept.push_back(Kept {
                n,
                payload: payload.clone(),
                binary,
            });
            while d.kept.len() > d.cap && d.pinned.is_none_or(|p| d.kept.front().is_some_and(|k| k.n <= p)) {
                d.kept.pop_front();
            }
        }
        if let Some(s) = d.sink.upgrade() {
            s.deliver(&s.delivery_frame(n, payload, binary));
        }
        None
    }

    /// Resumed from this node's own log up to position `o`: log records at or before it are
    /// not delivered again.
    pub fn skip_through(&self, o: u64) {
        self.deliveries.lock().skip_through = Some(o);
    }

    /// Where this session's next deliveries are in this node's log (for its resume token).
    pub fn anchor(&self) -> Option<Anchor> {
        self.deliveries.lock().anchor.clone()
    }

    /// A new session: its deliveries are this node's log's records for it after `here`.
    pub fn start_at(&self, here: Point) {
        let mut d = self.deliveries.lock();
        if d.next == 1 {
            d.anchor = Some(Anchor {
                base: 0,
                prev: None,
                here,
            });
        }
    }

    /// The node this session was handed over to, if it was.
    pub fn forwarded_to(&self) -> Option<Arc<str>> {
        self.deliveries.lock().forward.clone()
    }

    /// Hands a parked session over to `node` for a client that has had `delivered`
    /// deliveries: what it kept after those, its next delivery number and its accepted ids.
    /// From here on [`Continuity::deliver`] names `node` instead of delivering, so nothing is
    /// kept here that the snapshot missed.
    pub fn hand_over(&self, delivered: u64, node: &str) -> Result<handover::State, NotHere> {
        let mut p = self.phase.lock();
        if *p != Phase::Parked {
            return Err(NotHere::NotParked);
        }
        let mut d = self.deliveries.lock();
        check_resumable(&d, delivered)?;
        let kept = d
            .kept
            .iter()
            .filter(|k| k.n > delivered)
            .map(|k| handover::Kept {
                n: k.n,
                data_b64: B64.encode(&k.payload),
                binary: k.binary,
            })
            .collect();
        d.forward = Some(node.into());
        d.kept.clear();
        let next = d.next;
        // This node's log goes on from its anchor, if that is where numbering stands.
        let point = match &d.anchor {
            Some(a) if a.prev.is_none() && a.base + 1 == next => Some(a.here),
            _ => None,
        };
        *p = Phase::Resumed;
        drop(d);
        drop(p);
        let ids = self.ids.lock().order.iter().cloned().collect();
        self.taken.notify_one();
        Ok(handover::State {
            refused: None,
            next,
            kept,
            seq: 0,
            ids,
            channels: Vec::new(),
            point,
        })
    }

    /// The continuity another edge handed over (`state`) from node `from`, taken by a client
    /// that has had `delivered` deliveries; `here`: this node's log position before the
    /// router could send it anything for the session. `None` when the state is inconsistent
    /// with `delivered`.
    pub fn restore(keep: usize, state: &handover::State, delivered: u64, from: &str, here: Point) -> Option<Self> {
        let mut kept = Vec::with_capacity(state.kept.len());
        for k in &state.kept {
            kept.push((k.n, Bytes::from(B64.decode(&k.data_b64).ok()?), k.binary));
        }
        let anchor = state.point.map(|point| Anchor {
            base: state.next.saturating_sub(1),
            prev: Some(Hop {
                node: from.to_owned(),
                point,
            }),
            here,
        });
        Self::arrived(keep, state.next, kept, &state.ids, delivered, anchor)
    }

    /// A session arriving on this node: `next` is its next delivery number, `kept` its kept
    /// deliveries (number, payload, binary), `ids` its accepted ids, for a client that has had
    /// `delivered` deliveries. `None` when `delivered` is ahead of `next`.
    pub fn arrived(
        keep: usize,
        next: u64,
        kept: Vec<(u64, Bytes, bool)>,
        ids: &[String],
        delivered: u64,
        anchor: Option<Anchor>,
    ) -> Option<Self> {
        let c = Self::new(keep);
        {
            let mut d = c.deliveries.lock();
            d.next = next.max(1);
            if delivered >= d.next {
                return None;
            }
            for (n, payload, binary) in kept {
                d.kept.push_back(Kept { n, payload, binary });
            }
            d.pinned = Some(delivered);
            d.anchor = anchor;
        }
        for id in ids {
            c.accepted(id);
        }
        *c.phase.lock() = Phase::Resumed;
        Some(c)
    }

    /// Makes `sess` the socket deliveries go to; after a resume, first sends it every kept
    /// delivery after the `after`-th, in order (under the same lock as new deliveries, so none
    /// is missed or sent twice at the seam).
    pub(super) fn attach(&self, sess: &Arc<Session>, after: Option<u64>) {
        let mut d = self.deliveries.lock();
        if let Some(after) = after {
            let frames: Vec<Bytes> = d
                .kept
                .iter()
                .filter(|k| k.n > after)
                .map(|k| sess.delivery_frame(k.n, &k.payload, k.binary))
                .collect();
            if !frames.is_empty() {
                sess.deliver_all(&frames);
            }
            d.pinned = None;
            while d.kept.len() > d.cap {
                d.kept.pop_front();
            }
        }
        d.sink = Arc::downgrade(sess);
    }

    /// The socket is gone: park, if the session is live. False when something else already
    /// decided its fate.
    pub(super) fn park(&self) -> bool {
        let mut p = self.phase.lock();
        if *p != Phase::Live {
            return false;
        }
        *p = Phase::Parked;
        self.deliveries.lock().sink = Weak::new();
        drop(p);
        self.parked.notify_waiters();
        true
    }

    /// A resume with `delivered` deliveries received takes a parked session over.
    pub fn take(&self, delivered: u64) -> Result<(), NotHere> {
        let mut p = self.phase.lock();
        if *p != Phase::Parked {
            return Err(NotHere::NotParked);
        }
        let mut d = self.deliveries.lock();
        check_resumable(&d, delivered)?;
        d.pinned = Some(delivered);
        *p = Phase::Resumed;
        drop(d);
        drop(p);
        self.taken.notify_one();
        Ok(())
    }

    /// The parked session's window ended (or the node drains): it ends, unless a resume took
    /// it first. True when it ended here.
    pub(super) fn expire(&self) -> bool {
        let mut p = self.phase.lock();
        match *p {
            Phase::Parked | Phase::Live => {
                *p = Phase::Ended;
                true
            }
            Phase::Resumed | Phase::Ended => false,
        }
    }

    /// Ends the session whatever its phase (a resume whose upgrade then failed).
    pub(super) fn end(&self) {
        *self.phase.lock() = Phase::Ended;
    }

    /// A new socket is live for this session.
    pub(super) fn live(&self) {
        *self.phase.lock() = Phase::Live;
        self.takeover.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Kept deliveries (the resume buffer's occupancy).
    pub fn kept(&self) -> usize {
        self.deliveries.lock().kept.len()
    }

    /// True when `id` was accepted already (a resend).
    pub fn seen(&self, id: &str) -> bool {
        self.ids.lock().set.contains(id)
    }

    /// Remembers an accepted `id` (the oldest is forgotten past [`RECENT_IDS`]).
    pub fn accepted(&self, id: &str) {
        let mut ids = self.ids.lock();
        if ids.set.insert(id.to_owned()) {
            ids.order.push_back(id.to_owned());
            if ids.order.len() > ids.cap {
                if let Some(old) = ids.order.pop_front() {
                    ids.set.remove(&old);
                }
            }
        }
    }
}

/// Can a client that has had `delivered` deliveries resume from what `d` kept?
fn check_resumable(d: &Deliveries, delivered: u64) -> Result<(), NotHere> {
    let sent = d.next - 1;
    if delivered > sent {
        return Err(NotHere::AheadOfServer);
    }
    let kept_from = d.kept.front().map_or(d.next, |k| k.n);
    if delivered < sent && kept_from > delivered + 1 {
        return Err(NotHere::BufferExceeded);
    }
    Ok(())
}

/// A delivery's frame for a framed v2 socket: `{"op":"deliver","n":K,"data":D}`.
pub(super) fn v2_frame(n: u64, payload: &[u8], binary: bool) -> Bytes {
    crate::frame::text(framed::deliver(n, payload, binary).as_bytes())
}
