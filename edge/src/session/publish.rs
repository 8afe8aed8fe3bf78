//! What a session publishes: every record stamped with the envelope (the session's next seq,
//! node, route, identity, trace, reply subject) and optionally signed; the lifecycle records go
//! to the registry, the session feed and the inbound topic in the order routers rely on.

use super::{Ended, Session};
use crate::state::EdgeState;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use switchyard_bus::{BusError, Record, SessionEntry};
use switchyard_protocol::envelope::{header, now_ms};
use switchyard_protocol::{Envelope, Headers, Kind, Opcode};

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
pub(super) async fn publish_frame(
    st: &EdgeState,
    sess: &Session,
    payload: Bytes,
    opcode: Opcode,
    id: Option<&str>,
) -> Result<(), BusError> {
    let e = envelope(st, sess, Kind::Frame, payload, opcode);
    let mut headers = e.headers();
    sign(st, &mut headers, &e.payload);
    // Only an id every bus carries as a header value as is (printable ASCII).
    if let Some(id) = id.filter(|i| i.bytes().all(|b| b.is_ascii_graphic())) {
        headers.insert(switchyard_protocol::envelope::header::ID, id);
    }
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
pub(super) async fn lifecycle(
    st: &EdgeState,
    sess: &Session,
    kind: Kind,
    ended: Option<&Ended>,
) -> Result<(), BusError> {
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
    if matches!(kind, Kind::Connect | Kind::Resume) {
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
        let key = rec.key.clone().unwrap_or_default();
        let a = st.bus.publish(inbound, rec.clone()).await;
        // The feed keeps live sessions only: after the disconnect, a tombstone lets compaction
        // drop the session's records (Kafka; other buses keep nothing per key).
        let b = match st.bus.publish(&sessions, rec).await {
            Ok(_) => st.bus.tombstone(&sessions, key).await,
            Err(e) => Err(e),
        };
        if let Some(d) = &durable {
            d.unregister(&sess.id).await?;
        }
        a.and(b)?;
    }
    Ok(())
}
