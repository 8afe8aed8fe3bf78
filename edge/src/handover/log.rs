//! Resume after the session's node died: its deliveries read back from the bus's log (Kafka's
//! node delivery topics; NATS's `<PREFIX>_NODES` stream with `--nats-durable-replies`).
//!
//! The resume token's anchor ([`switchyard_protocol::resume::Anchor`]) says where the
//! session's deliveries are in the log and how they are numbered. When the token's node does
//! not answer `take`, the new edge:
//!
//! 1. holds what the router sends it for the session, as for a handover;
//! 2. reads the session's inbound partition from the token's issue on: where its seq
//!    stopped, the ids of its accepted sends (`sy-id`), and whether it ended (a disconnect:
//!    not resumable);
//! 3. reads the session's records on the old node's delivery topic from the anchor to the
//!    log's end (and, when it had just arrived there, on the node before, up to the router's
//!    `moved`), numbering the deliveries from the anchor's base;
//! 4. answers the client with those after its `delivered` (the usual checks apply), and,
//!    while the `resume` record moves the session here, reads on to the router's `moved` on
//!    the old node's topic, then releases what it held.
//!
//! So the client gets every delivery once and in order, and the backend sees one `resume`.
//! What the log cannot tell is refused (`node_unreachable`): a raw session's channel
//! messages (they are deliveries, but not in the node's log), a log that no longer holds the
//! anchor (retention), or a scan that fails.

use super::{count, deliver_now, finish, Incoming, Restored, END_WAIT};
use crate::session::resume::Continuity;
use crate::state::{EdgeState, Route};
use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use switchyard_bus::{ScanFrom, ScanQuery, ScanRead};
use switchyard_protocol::envelope::header;
use switchyard_protocol::resume::{Anchor, Claims, Hop, Point};
use switchyard_protocol::{handover, ControlOp, Envelope, Kind, Opcode};
use tokio::time::Instant;

/// How long a node's topic is read on for the router's `moved` (past it, what the edge holds
/// is released anyway).
const MOVED_WAIT: Duration = END_WAIT;
/// How much earlier than the token's issue its session's inbound records are looked for
/// (clocks of two edges may disagree a little; the issuing edge stamps both).
const CLOCK_SLACK_MS: u64 = 2_000;

fn scan_from(p: Point, issued_ms: u64) -> ScanFrom {
    match (p.after, p.since_ms) {
        (Some(o), _) => ScanFrom::After(o),
        (None, Some(t)) => ScanFrom::Since(t as i64),
        (None, None) => ScanFrom::Since(issued_ms as i64),
    }
}

/// Reads `session`'s records on `node`'s delivery topic from `from`: to the log's end, or,
/// with `to_moved`, on to the router's `moved` (at most [`MOVED_WAIT`]).
async fn scan_node(
    st: &EdgeState,
    node: &str,
    session: &str,
    from: ScanFrom,
    to_moved: bool,
) -> Result<ScanRead, &'static str> {
    let q = ScanQuery {
        topic: st.cfg.naming.node(node),
        key: session.to_owned(),
        from,
        until: to_moved.then(|| (header::HANDOVER, handover::MOVED.to_owned())),
        wait: MOVED_WAIT,
    };
    match st.bus.scan(q).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) | Err(_) => Err("node_unreachable"),
    }
}

/// The session's records in a node's log, decoded, in order, each with its handover step
/// (if it is one): the ones that count are the router's (not passed on from another node,
/// `sy-forwarded`) and decodable, as the node delivery loop counts them.
fn records(read: &ScanRead) -> impl Iterator<Item = (Envelope, Option<&str>)> + '_ {
    read.records
        .iter()
        .filter(|m| m.record.headers.get(header::FORWARDED).is_none())
        .filter_map(|m| {
            let r = &m.record;
            let env = Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()).ok()?;
            Some((env, r.headers.get(header::HANDOVER)))
        })
}

/// Adds the deliveries in `read` to `out`, or says why the session cannot be resumed from
/// the log: its backend closed it, or subscribed a raw session to a channel (whose messages
/// are deliveries the log does not hold).
fn deliveries(read: &ScanRead, out: &mut Vec<(Bytes, bool)>, last_hop: bool, raw: bool) -> Result<(), &'static str> {
    for (env, step) in records(read) {
        match (env.kind, &env.control) {
            (Kind::Deliver, _) => out.push((env.payload, env.opcode == Opcode::Binary)),
            // The session left that node after the token was issued (a newer token exists).
            (Kind::Handover, _) if last_hop && step == Some(handover::MOVED) => return Err("not_parked"),
            (Kind::Control, Some(ControlOp::Close { .. })) => return Err("not_parked"),
            // (On framed routes channel messages are not deliveries.)
            (Kind::Control, Some(ControlOp::Subscribe { .. })) if raw => return Err("node_unreachable"),
            _ => {}
        }
    }
    Ok(())
}

/// The session's inbound records since `since_ms`: the seq it stopped at and the ids of its
/// accepted sends; `not_parked` when it ended (its disconnect is there).
async fn inbound(
    st: &EdgeState,
    route: &Route,
    session: &str,
    node: &str,
    since_ms: u64,
) -> Result<(u64, Vec<String>), &'static str> {
    let q = ScanQuery {
        topic: route.inbound.clone(),
        key: session.to_owned(),
        from: ScanFrom::Since(since_ms as i64),
        until: None,
        wait: Duration::ZERO,
    };
    let read = match st.bus.scan(q).await {
        Ok(Some(r)) => r,
        Ok(None) | Err(_) => return Err("node_unreachable"),
    };
    let (mut seq, mut ids, mut at) = (0, Vec::new(), None);
    for m in &read.records {
        let r = &m.record;
        let Ok(env) = Envelope::from_record(r.key.as_deref(), &r.headers, Bytes::new()) else {
            continue;
        };
        if env.kind == Kind::Disconnect {
            return Err("not_parked");
        }
        seq = seq.max(env.seq);
        if matches!(env.kind, Kind::Connect | Kind::Resume) {
            at = env.node.clone();
        }
        if let (Kind::Frame, Some(id)) = (env.kind, r.headers.get(header::ID)) {
            ids.push(id.to_owned());
        }
    }
    if seq == 0 {
        // Not even its connect or resume: this log does not have the session.
        return Err("node_unreachable");
    }
    if at.as_deref().is_some_and(|n| n != node) {
        // It resumed on another node since (an older token, or a second resume racing this
        // one): that node has it.
        return Err("not_parked");
    }
    Ok((seq, ids))
}

/// New edge, after the token's `node` did not answer: resumes the session from the log for a
/// client that has had `delivered` deliveries. `issued_ms`: when the token was issued.
pub async fn recover(
    st: &Arc<EdgeState>,
    node: &str,
    claims: &Claims,
    route: &Route,
    delivered: u64,
    issued_ms: u64,
) -> Result<Restored, &'static str> {
    let Some(anchor) = &claims.anchor else {
        return Err("node_unreachable");
    };
    if claims.channels || !st.logged {
        return Err("node_unreachable");
    }
    let session = claims.session.as_str();
    let here = st.log_point();
    let entry = Arc::new(Mutex::new(Incoming {
        answer: None,
        cont: None,
        delivered,
        early: Vec::new(),
        held: Vec::new(),
        here,
        released: false,
    }));
    match st.handovers.incoming.entry(session.to_owned()) {
        dashmap::Entry::Occupied(_) => return Err("not_parked"),
        dashmap::Entry::Vacant(v) => {
            v.insert(entry.clone());
        }
    }
    st.handovers
        .recovered
        .insert(session.to_owned(), (Arc::from(node), Instant::now()));
    // Forgets both if this future is dropped (the client went away mid-read) or fails.
    let mut guard = Forget {
        st: st.clone(),
        session: session.to_owned(),
        armed: true,
    };
    let read = read_back(st, node, anchor, here, route, session, delivered, issued_ms).await;
    let (cont, seq, from) = match read {
        Ok(r) => r,
        Err(why) => {
            count("log", why);
            return Err(why);
        }
    };
    guard.armed = false;
    entry.lock().cont = Some(cont.clone());
    count("log", "ok");
    if node == st.cfg.node_id {
        // This node before a restart: no `moved` will come (the session stays on this node).
        // What its delivery loop held since is released once the session runs here (so no
        // record finds it neither held nor running), or after MOVED_WAIT if it never does.
        tracing::info!(%session, seq, "session resumed from this node's log after a restart");
        st.handovers.arriving.insert(session.to_owned(), from);
        let (st, session) = (st.clone(), session.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(MOVED_WAIT).await;
            arrive(&st, &session);
        });
    } else {
        tracing::info!(%session, %node, seq, "session resumed from the log: its node did not answer");
        tokio::spawn(follow(
            st.clone(),
            node.to_owned(),
            session.to_owned(),
            cont.clone(),
            from,
        ));
    }
    let st = st.clone();
    let session = session.to_owned();
    let forget = st.cfg.resume_window.max(Duration::from_secs(10));
    tokio::spawn(async move {
        tokio::time::sleep(forget).await;
        st.handovers
            .recovered
            .remove_if(&session, |_, r| r.1.elapsed() >= forget);
    });
    Ok(Restored {
        cont,
        seq,
        channels: Default::default(),
    })
}

/// Undoes a recovery's entries unless disarmed (its future dropped, or the read failed).
struct Forget {
    st: Arc<EdgeState>,
    session: String,
    armed: bool,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if self.armed {
            self.st.handovers.incoming.remove(&self.session);
            self.st.handovers.recovered.remove(&self.session);
        }
    }
}

/// Reads the session back: its continuity (the deliveries after `delivered`, numbered on from
/// the anchor), its inbound seq, and where the old node's log was read to.
#[allow(clippy::too_many_arguments)]
async fn read_back(
    st: &EdgeState,
    node: &str,
    anchor: &Anchor,
    here: Point,
    route: &Route,
    session: &str,
    delivered: u64,
    issued_ms: u64,
) -> Result<(Arc<Continuity>, u64, ScanFrom), &'static str> {
    let (seq, ids) = inbound(st, route, session, node, issued_ms.saturating_sub(CLOCK_SLACK_MS)).await?;
    let mut items = Vec::new();
    if let Some(prev) = &anchor.prev {
        let read = scan_node(st, &prev.node, session, scan_from(prev.point, issued_ms), true).await?;
        if !read.complete || !read.reached {
            return Err("node_unreachable");
        }
        deliveries(&read, &mut items, false, !route.is_framed())?;
    }
    let start = scan_from(anchor.here, issued_ms);
    let read = scan_node(st, node, session, start, false).await?;
    if !read.complete {
        return Err("node_unreachable");
    }
    deliveries(&read, &mut items, true, !route.is_framed())?;
    let total = anchor.base + items.len() as u64;
    if delivered > total {
        return Err("delivered_ahead");
    }
    if delivered < anchor.base || total - delivered > st.cfg.resume_buffer as u64 {
        return Err("buffer_exceeded");
    }
    // Where the old node's log goes on from: after the last record read.
    let (point, from) = match read.last {
        Some(o) => (
            Point {
                after: Some(o),
                since_ms: None,
            },
            ScanFrom::After(o),
        ),
        None => (anchor.here, start),
    };
    let kept: Vec<(u64, Bytes, bool)> = items
        .into_iter()
        .zip(anchor.base + 1..)
        .filter(|(_, n)| *n > delivered)
        .map(|((payload, binary), n)| (n, payload, binary))
        .collect();
    // Numbered from here on: the old node's records after `point` up to the router's
    // `moved`, then this node's (when the old node is this one, restarted: its records after
    // `point`).
    let next_anchor = if node == st.cfg.node_id {
        Anchor {
            base: total,
            prev: None,
            here: point,
        }
    } else {
        Anchor {
            base: total,
            prev: Some(Hop {
                node: node.to_owned(),
                point,
            }),
            here,
        }
    };
    let cont = Continuity::arrived(
        st.cfg.resume_buffer,
        total + 1,
        kept,
        &ids,
        delivered,
        Some(next_anchor),
    )
    .ok_or("delivered_ahead")?;
    Ok((Arc::new(cont), seq, from))
}

/// A session runs on this node now: if it was resumed from this node's own log, the records
/// its delivery loop held meanwhile go out.
pub fn arrive(st: &Arc<EdgeState>, session: &str) {
    if st.handovers.arriving.is_empty() {
        return;
    }
    if let Some((_, read_to)) = st.handovers.arriving.remove(session) {
        release_after(st, session, read_to);
    }
}

/// A session resumed from this node's own log: the records its delivery loop held meanwhile
/// go out, but those the read had already (at or before `read_to`); the continuity skips them
/// too when a lagging delivery loop brings them later.
fn release_after(st: &Arc<EdgeState>, session: &str, read_to: ScanFrom) {
    let after = match read_to {
        ScanFrom::After(o) => Some(o),
        ScanFrom::Since(_) => None,
    };
    if let Some(cont) = super::take_held(st, session, after) {
        if let Some(o) = after {
            cont.skip_through(o);
        }
    }
}

/// Reads the old node's log on, from where the resume read it to, up to the router's
/// `moved` (the `resume` record moved the session here): those deliveries go into the
/// continuity, a backend's control op takes the usual path; then what this node held for
/// the session is released.
async fn follow(st: Arc<EdgeState>, node: String, session: String, cont: Arc<Continuity>, from: ScanFrom) {
    match scan_node(&st, &node, &session, from, true).await {
        Ok(read) => {
            if !read.reached {
                count("log_moved", "timeout");
            }
            for (env, _) in records(&read) {
                match env.kind {
                    Kind::Deliver => deliver_now(&cont, &env, None),
                    Kind::Control => {
                        if let Some(sess) = st.sessions.get(&session).map(|s| s.clone()) {
                            let _ = crate::delivery::handle(&st, &sess, &env, None).await;
                        }
                    }
                    _ => {}
                }
            }
        }
        Err(why) => count("log_moved", why),
    }
    finish(&st, &session);
}
