//! Resume on another edge: the session moves between nodes over their delivery subjects
//! (`protocol::handover` has the steps).
//!
//! - The new edge ([`request`]) asks the node named in the resume token to `take`, and holds
//!   every record the router sends it for the session until the old node says `end`.
//! - The old edge ([`give`]) takes the session from its socket (or from where it was parked),
//!   answers with its `state`, then passes every record that still reaches it for the session
//!   on to the new node (`sy-forwarded`), and says `end` once the router said `moved`.
//!
//! So the client gets every kept and every later delivery once, in order, and the backend
//! sees one `resume` and no disconnect. When the old node does not answer (it was killed),
//! its deliveries are read back from the bus's log where it keeps one (Kafka: [`log`]);
//! elsewhere the resume is refused (`node_unreachable`): they were in its memory.

pub mod log;

use crate::session::resume::Continuity;
use crate::state::EdgeState;
use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use switchyard_bus::{Message, Record};
use switchyard_protocol::envelope::header;
use switchyard_protocol::handover::{self, State, Take};
use switchyard_protocol::{Envelope, Kind, Opcode};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long a new edge waits for the old node's `state`.
pub const STATE_WAIT: Duration = Duration::from_secs(3);
/// How long a new edge holds the router's records for the session, waiting for `end` (past
/// it they are delivered; a forward that comes later still is delivered when it comes).
pub const END_WAIT: Duration = Duration::from_secs(5);
/// Records held per incoming session (past it, the oldest are dropped and counted).
const MAX_HELD: usize = 10_000;

/// What a new edge got: the session's continuity, its inbound seq and its channels.
pub struct Restored {
    pub cont: Arc<Continuity>,
    pub seq: u64,
    pub channels: HashSet<String>,
}

/// A session on its way here from another node.
struct Incoming {
    answer: Option<oneshot::Sender<Result<Restored, String>>>,
    cont: Option<Arc<Continuity>>,
    /// What the resuming client has had.
    delivered: u64,
    /// Forwards that came before the state.
    early: Vec<Envelope>,
    /// The router's records (with their positions in this node's log), held until `end`.
    held: Vec<(Envelope, Option<u64>)>,
    /// Where this node's log stood before the router could send anything for the session.
    here: switchyard_protocol::resume::Point,
    /// What was held went out: records that come now take the usual path.
    released: bool,
}

/// A session that left this node, and until when its records are passed on.
struct Moved {
    node: Arc<str>,
    until: Instant,
    /// `end` was sent (the router said `moved`).
    ended: bool,
    /// The session, in case the new node does not take it after all (`gone`): then its
    /// disconnect is published here.
    sess: Arc<crate::session::Session>,
}

#[derive(Default)]
pub struct Handovers {
    incoming: DashMap<String, Arc<Mutex<Incoming>>>,
    /// Sessions resumed here from the log after their node did not answer: what that node
    /// still passes on for them was read from the log already (dropped), and a late `state`
    /// from it is answered `gone` with `resumed` (it ends the session without a disconnect).
    recovered: DashMap<String, (Arc<str>, Instant)>,
    /// Sessions resumed from this node's own log (a restart with the same node id) whose
    /// socket does not run yet: where the read stopped.
    arriving: DashMap<String, switchyard_bus::ScanFrom>,
    moved: DashMap<String, Moved>,
    /// Woken when an `end` was sent.
    settled: tokio::sync::Notify,
}

impl Handovers {
    /// Sessions handed over whose `end` was not sent yet.
    fn unsettled(&self) -> usize {
        self.moved.iter().filter(|m| !m.ended).count()
    }

    /// A draining node: waits (at most `within`) until every session it handed over got its
    /// `end`, so what still reaches it for them is passed on before it stops reading.
    pub async fn settle(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let woken = self.settled.notified();
            if self.unsettled() == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                tracing::warn!(
                    sessions = self.unsettled(),
                    "handed-over sessions without an end from the router"
                );
                return;
            }
        }
    }
}

fn count(step: &'static str, result: &'static str) {
    metrics::counter!(crate::metrics::HANDOVERS, "step" => step, "result" => result).increment(1);
}

/// A handover record for `session`.
fn record(session: &str, step: &str, node: &str, payload: Bytes) -> Record {
    let mut e = Envelope::new(session.to_owned(), Kind::Handover, payload.clone());
    e.node = Some(node.to_owned());
    e.timestamp_ms = switchyard_protocol::envelope::now_ms();
    let mut headers = e.headers();
    headers.insert(header::HANDOVER, step);
    Record {
        key: Some(e.key()),
        headers,
        payload,
    }
}

/// The reasons a client can be told (the welcome's `reason` is a static label).
fn reason(why: &str) -> &'static str {
    match why {
        "not_parked" => "not_parked",
        "delivered_ahead" => "delivered_ahead",
        "buffer_exceeded" => "buffer_exceeded",
        "other_route" => "other_route",
        _ => "refused",
    }
}

/// New edge: asks `node` to hand `session` over to this node, for a client on `route` that has
/// had `delivered` deliveries.
pub async fn request(
    st: &EdgeState,
    node: &str,
    session: &str,
    route: &str,
    delivered: u64,
) -> Result<Restored, &'static str> {
    let (tx, rx) = oneshot::channel();
    let entry = Arc::new(Mutex::new(Incoming {
        answer: Some(tx),
        cont: None,
        delivered,
        early: Vec::new(),
        held: Vec::new(),
        here: st.log_point(),
        released: false,
    }));
    match st.handovers.incoming.entry(session.to_owned()) {
        // Two resumes of one session at once: the second is refused.
        dashmap::Entry::Occupied(_) => return Err("not_parked"),
        dashmap::Entry::Vacant(v) => {
            v.insert(entry);
        }
    }
    let take = serde_json::to_vec(&Take {
        delivered,
        route: route.to_owned(),
    })
    .expect("a take serialises");
    let rec = record(session, handover::TAKE, &st.cfg.node_id, take.into());
    if let Err(e) = st.bus.publish(&st.cfg.naming.node(node), rec).await {
        tracing::warn!(%session, %node, error = %e, "could not ask the session's node for it");
        st.handovers.incoming.remove(session);
        count("take", "bus_error");
        return Err("node_unreachable");
    }
    match tokio::time::timeout(STATE_WAIT, rx).await {
        Ok(Ok(Ok(r))) => {
            count("take", "ok");
            Ok(r)
        }
        Ok(Ok(Err(why))) => {
            st.handovers.incoming.remove(session);
            count("take", "refused");
            Err(reason(&why))
        }
        _ => {
            st.handovers.incoming.remove(session);
            count("take", "no_answer");
            Err("node_unreachable")
        }
    }
}

/// The node delivery loop's first look at a record: handover steps, and records of a session
/// on its way here (held) or gone from here (passed on). True when it was handled.
pub async fn intercept(st: &Arc<EdgeState>, env: &Envelope, msg: &Message) -> bool {
    if env.kind == Kind::Handover {
        let step = msg.record.headers.get(header::HANDOVER).unwrap_or("");
        let from = env.node.clone().unwrap_or_default();
        match step {
            handover::TAKE => match serde_json::from_slice::<Take>(&msg.record.payload) {
                Ok(take) if !from.is_empty() => {
                    tokio::spawn(give(st.clone(), env.session.clone(), from, take));
                }
                _ => tracing::debug!(session = %env.session, "malformed take"),
            },
            handover::STATE => {
                if !on_state(st, &env.session, &from, &msg.record.payload) && !from.is_empty() {
                    // Not taken here after all: the old node ends it (one disconnect), unless
                    // it was resumed here from the log meanwhile (then it ends there quietly).
                    let body = if recovered_from(st, &env.session, &from) {
                        Bytes::from_static(handover::RESUMED.as_bytes())
                    } else {
                        Bytes::new()
                    };
                    let rec = record(&env.session, handover::GONE, &st.cfg.node_id, body);
                    if let Err(e) = st.bus.publish(&st.cfg.naming.node(&from), rec).await {
                        tracing::warn!(session = %env.session, error = %e, "could not send a handover gone");
                    }
                }
            }
            handover::GONE => {
                // Resumed there from the log (even if the router's `moved` came here first):
                // its backend saw the resume, nothing ends, and nothing more is passed on.
                let resumed = msg.record.payload == handover::RESUMED.as_bytes();
                let gone = st
                    .handovers
                    .moved
                    .remove_if(&env.session, |_, m| (resumed || !m.ended) && *m.node == *from);
                if let Some((_, m)) = gone {
                    if resumed {
                        count("gone", "resumed");
                        tracing::info!(session = %env.session, %from, "the session was resumed on another node from the log");
                        return true;
                    }
                    count("gone", "ended");
                    tracing::info!(session = %env.session, %from, "the new node did not take the session: it ends here");
                    crate::session::abandon(st, &m.sess, "resume on another node failed").await;
                }
            }
            // Resumed from that node's log: the read of its log (not its `end`) says when
            // the held records go out.
            handover::END if recovered_from(st, &env.session, &from) => {}
            handover::END => finish(st, &env.session),
            handover::MOVED => {
                let to = st.handovers.moved.get(&env.session).map(|m| m.node.clone());
                if let Some(to) = to {
                    let rec = record(&env.session, handover::END, &st.cfg.node_id, Bytes::new());
                    if let Err(e) = st.bus.publish(&st.cfg.naming.node(&to), rec).await {
                        tracing::warn!(session = %env.session, error = %e, "could not send a handover end");
                    }
                    if let Some(mut m) = st.handovers.moved.get_mut(&env.session) {
                        m.ended = true;
                    }
                    st.handovers.settled.notify_waiters();
                }
            }
            _ => tracing::debug!(session = %env.session, %step, "unknown handover step"),
        }
        return true;
    }
    let forwarded_by = msg.record.headers.get(header::FORWARDED);
    let forwarded = forwarded_by.is_some();
    if forwarded_by.is_some_and(|by| recovered_from(st, &env.session, by)) {
        // Read from that node's log already.
        count("forward", "dropped_logged");
        return true;
    }
    if let Some(entry) = st.handovers.incoming.get(&env.session).map(|e| e.clone()) {
        let now = {
            let mut inc = entry.lock();
            if inc.released {
                // Released meanwhile: the usual path (the entry is about to go).
                drop(inc);
                return false;
            }
            match (&inc.cont, forwarded) {
                (Some(cont), true) => Some(cont.clone()),
                (None, true) => {
                    hold(&mut inc.early, env.clone());
                    None
                }
                (_, false) => {
                    hold(&mut inc.held, (env.clone(), msg.offset));
                    None
                }
            }
        };
        if let Some(cont) = now {
            deliver_to(st, &cont, env, None).await;
        }
        return true;
    }
    let to = st.handovers.moved.get(&env.session).map(|m| (m.node.clone(), m.until));
    if let Some((to, until)) = to {
        if Instant::now() < until {
            pass_on(st, &to, msg).await;
            return true;
        }
        st.handovers.moved.remove(&env.session);
    }
    false
}

fn hold<T>(q: &mut Vec<T>, item: T) {
    if q.len() >= MAX_HELD {
        q.remove(0);
        count("hold", "dropped");
    }
    q.push(item);
}

/// Passes a record of a session that moved on to its new node.
pub(crate) async fn pass_on(st: &EdgeState, to: &str, msg: &Message) {
    let mut rec = (*msg.record).clone();
    rec.headers.insert(header::FORWARDED, st.cfg.node_id.as_str());
    match st.bus.publish(&st.cfg.naming.node(to), rec).await {
        Ok(_) => count("forward", "ok"),
        Err(e) => {
            count("forward", "bus_error");
            tracing::warn!(%to, error = %e, "could not pass a record on to the session's new node");
        }
    }
}

/// A record of a session that arrived here (`at`: its position in this node's log, for the
/// router's records): a delivery goes into its continuity (to the socket once attached);
/// anything else takes the usual path once the session runs here.
async fn deliver_to(st: &Arc<EdgeState>, cont: &Continuity, env: &Envelope, at: Option<u64>) {
    if env.kind == Kind::Deliver {
        deliver_now(cont, env, at);
    } else if let Some(sess) = st.sessions.get(&env.session).map(|s| s.clone()) {
        let _ = crate::delivery::handle(st, &sess, env, at).await;
    } else {
        tracing::debug!(session = %env.session, kind = env.kind.as_str(), "control op for a session still arriving: dropped");
    }
}

/// A delivery into the continuity (a session on its way here is never forwarded again).
fn deliver_now(cont: &Continuity, env: &Envelope, at: Option<u64>) {
    let _ = cont.deliver(&env.payload, env.opcode == Opcode::Binary, at);
}

/// Records that waited for the session, in order (each with its position in this node's log,
/// for the router's): deliveries at once; from the first control op on, the rest in order on
/// a task (a control op takes the usual path).
fn release(st: &Arc<EdgeState>, cont: Arc<Continuity>, waited: Vec<(Envelope, Option<u64>)>) {
    let mut waited = waited.into_iter().peekable();
    while let Some((env, at)) = waited.next_if(|(e, _)| e.kind == Kind::Deliver) {
        deliver_now(&cont, &env, at);
    }
    let rest: Vec<(Envelope, Option<u64>)> = waited.collect();
    if !rest.is_empty() {
        let st = st.clone();
        tokio::spawn(async move {
            for (env, at) in rest {
                deliver_to(&st, &cont, &env, at).await;
            }
        });
    }
}

/// New edge: the old node's answer. False when a handed-over session is not taken here after
/// all (the resume gave up waiting, or the state does not fit): the caller says `gone`.
fn on_state(st: &Arc<EdgeState>, session: &str, from: &str, payload: &[u8]) -> bool {
    let state = serde_json::from_slice::<State>(payload);
    let handed_over = matches!(&state, Ok(s) if s.refused.is_none());
    let Some(entry) = st.handovers.incoming.get(session).map(|e| e.clone()) else {
        // Too late: the resume gave up waiting.
        count("state", "late");
        return !handed_over;
    };
    let mut inc = entry.lock();
    let Some(answer) = inc.answer.take() else {
        return !handed_over;
    };
    let state = match state {
        Ok(s) if s.refused.is_none() => s,
        Ok(s) => {
            let _ = answer.send(Err(s.refused.unwrap_or_default()));
            return true;
        }
        Err(_) => {
            let _ = answer.send(Err("refused".into()));
            return true;
        }
    };
    let keep = st.cfg.resume_buffer;
    let Some(cont) = Continuity::restore(keep, &state, inc.delivered, from, inc.here).map(Arc::new) else {
        let _ = answer.send(Err("delivered_ahead".into()));
        drop(inc);
        st.handovers.incoming.remove(session);
        return false;
    };
    inc.cont = Some(cont.clone());
    let early: Vec<(Envelope, Option<u64>)> = std::mem::take(&mut inc.early).into_iter().map(|e| (e, None)).collect();
    drop(inc);
    // It may be coming back: what reaches this node for it is its own again, not passed on to
    // where it went before (or two nodes would pass its records back and forth).
    st.handovers.moved.remove(session);
    release(st, cont.clone(), early);
    let restored = Restored {
        cont,
        seq: state.seq,
        channels: state.channels.into_iter().collect(),
    };
    if answer.send(Ok(restored)).is_ok() {
        // The router's records wait for `end`, at most END_WAIT.
        let st = st.clone();
        let session = session.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(END_WAIT).await;
            if st.handovers.incoming.contains_key(&session) {
                count("end", "timeout");
                finish(&st, &session);
            }
        });
        true
    } else {
        // The resume gave up meanwhile.
        st.handovers.incoming.remove(session);
        false
    }
}

/// New edge: the old node will pass nothing more on in order; the held records go out.
fn finish(st: &Arc<EdgeState>, session: &str) {
    if let Some(cont) = take_held(st, session, None) {
        count("end", "ok");
        drop(cont);
    }
}

/// Releases what was held for an arriving session and forgets the entry: the deliveries go
/// into its continuity while the entry is locked and marked released, so a record the
/// delivery loop brings meanwhile is delivered after them, not held and lost (`after`: skip
/// held records at or before this position of this node's log). Returns the continuity.
pub(super) fn take_held(st: &Arc<EdgeState>, session: &str, after: Option<u64>) -> Option<Arc<Continuity>> {
    let entry = st.handovers.incoming.get(session).map(|e| e.clone())?;
    let mut inc = entry.lock();
    let Some(cont) = inc.cont.clone() else {
        drop(inc);
        st.handovers.incoming.remove_if(session, |_, e| Arc::ptr_eq(e, &entry));
        return None;
    };
    let mut held = std::mem::take(&mut inc.held);
    if let Some(o) = after {
        held.retain(|(_, at)| at.is_none_or(|a| a > o));
    }
    inc.released = true;
    release(st, cont.clone(), held);
    drop(inc);
    st.handovers.incoming.remove_if(session, |_, e| Arc::ptr_eq(e, &entry));
    Some(cont)
}

/// True when `session` was resumed here from `node`'s log (recently).
fn recovered_from(st: &EdgeState, session: &str, node: &str) -> bool {
    st.handovers.recovered.get(session).is_some_and(|r| *r.0 == *node)
}

/// Old edge: hands `session` over to node `to` (it asked with `take`).
async fn give(st: Arc<EdgeState>, session: String, to: String, take: Take) {
    let answer = |state: State| {
        let st = st.clone();
        let session = session.clone();
        let to = to.clone();
        async move {
            if let Some(why) = &state.refused {
                tracing::info!(%session, %to, reason = %why, "not handing a session over");
            }
            let body = serde_json::to_vec(&state).expect("a state serialises");
            let rec = record(&session, handover::STATE, &st.cfg.node_id, body.into());
            if let Err(e) = st.bus.publish(&st.cfg.naming.node(&to), rec).await {
                tracing::warn!(%session, %to, error = %e, "could not send a session's state");
            }
        }
    };
    let Some(sess) = st.sessions.get(&session).map(|s| s.clone()) else {
        tracing::debug!(%session, "take: no such session here");
        count("give", "not_parked");
        return answer(State::refused("not_parked")).await;
    };
    if sess.route.cfg.path != take.route {
        count("give", "other_route");
        return answer(State::refused("other_route")).await;
    }
    // The client may have come back elsewhere before this node saw its old socket die.
    if !sess.take_from_socket("resumed on another node").await {
        tracing::debug!(%session, "take: the session did not park");
        count("give", "not_parked");
        return answer(State::refused("not_parked")).await;
    }
    // It may have just arrived here itself: what was held for it goes into its continuity
    // first, so the state has it.
    finish(&st, &session);
    // From here the session's deliveries are passed on (the delivery loop sees it in its
    // continuity, then, once the session is gone from `sessions`, in `moved`).
    let mut state = match sess.cont.hand_over(take.delivered, &to) {
        Ok(s) => s,
        Err(e) => {
            count("give", e.code());
            return answer(State::refused(e.code())).await;
        }
    };
    st.handovers.moved.insert(
        session.clone(),
        Moved {
            node: to.as_str().into(),
            until: Instant::now() + st.cfg.resume_window.max(Duration::from_secs(10)),
            ended: false,
            sess: sess.clone(),
        },
    );
    state.seq = sess.seq();
    // Its channels move with it (raw routes kept them while away; framed ones left them).
    let channels: Vec<String> = {
        let mut chans = sess.channels.lock();
        sess.stopped.store(true, Ordering::Release);
        chans.drain().collect()
    };
    for c in &channels {
        st.channels.unsubscribe(&sess, c).await;
    }
    state.channels = channels;
    st.sessions.remove_if(&session, |_, s| Arc::ptr_eq(s, &sess));
    count("give", "ok");
    tracing::info!(%session, %to, kept = state.kept.len(), "session handed over to another node");
    answer(state).await;
    // Forget it once nothing more can come for it.
    let until = st.cfg.resume_window.max(Duration::from_secs(10));
    tokio::time::sleep(until).await;
    st.handovers.moved.remove_if(&session, |_, m| Instant::now() >= m.until);
}
