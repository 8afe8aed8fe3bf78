//! The node delivery subscription: backend replies and control ops for sessions on this node,
//! forwarded by a router or published directly to the `sy-reply` subject. Processed in order
//! by one task, so per-session order holds.

use crate::metrics as m;
use crate::session::Session;
use crate::state::EdgeState;
use std::sync::Arc;
use switchyard_bus::Subscription;
use switchyard_protocol::framed;
use switchyard_protocol::{ControlOp, Envelope, Kind, Opcode};

pub async fn run(st: Arc<EdgeState>, mut sub: Subscription) {
    let invalid = metrics::counter!(m::DELIVERIES, "kind" => "invalid");
    let unknown = metrics::counter!(m::DROPS, "route" => "", "reason" => "unknown_session");
    while let Some(msg) = sub.recv().await {
        if let Some(o) = msg.offset {
            st.log_position.store(o, std::sync::atomic::Ordering::Release);
        }
        let r = &msg.record;
        let env = match Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()) {
            Ok(e) => e,
            Err(e) => {
                invalid.increment(1);
                tracing::debug!(error = %e, "undecodable record on node delivery subject");
                continue;
            }
        };
        if crate::handover::intercept(&st, &env, &msg).await {
            continue;
        }
        let Some(sess) = st.sessions.get(&env.session).map(|s| s.clone()) else {
            unknown.increment(1);
            tracing::debug!(session = %env.session, "delivery for a session not on this node");
            continue;
        };
        let to = match sess.cont.forwarded_to() {
            Some(to) => Some(to),
            None => handle(&st, &sess, &env, in_order(&msg)).await,
        };
        if let Some(to) = to {
            // The session was handed over to another node meanwhile.
            crate::handover::pass_on(&st, &to, &msg).await;
        }
    }
}

/// A record's position in this node's log, when it is the router's (not one passed on from
/// another node): what numbering after a resume from the log goes by.
pub(crate) fn in_order(msg: &switchyard_bus::Message) -> Option<u64> {
    if msg
        .record
        .headers
        .get(switchyard_protocol::envelope::header::FORWARDED)
        .is_some()
    {
        None
    } else {
        msg.offset
    }
}

/// One record for a session of this node (`at`: see [`in_order`]). Returns the node to pass
/// it on to when the session was handed over meanwhile.
pub(crate) async fn handle(
    st: &Arc<EdgeState>,
    sess: &Arc<Session>,
    env: &Envelope,
    at: Option<u64>,
) -> Option<Arc<str>> {
    match (env.kind, env.control.clone()) {
        (Kind::Deliver, _) => {
            metrics::counter!(m::DELIVERIES, "kind" => "deliver").increment(1);
            if let Some(t) = &env.trace {
                // The backend's trace context is honoured in the delivery's log line.
                tracing::debug!(session = %env.session, trace_id = %t.trace_id(), "delivering a backend record");
            }
            // Numbered and kept for a resume; text that is not UTF-8 goes out as binary.
            return sess.cont.deliver(&env.payload, env.opcode == Opcode::Binary, at);
        }
        (Kind::Control, Some(op)) => {
            metrics::counter!(m::DELIVERIES, "kind" => "control").increment(1);
            match op {
                ControlOp::Close { code, reason } => {
                    // As documented: 1000 or an application code 3000..=4999.
                    let code = if code == 1000 || (3000..5000).contains(&code) {
                        code
                    } else {
                        1000
                    };

                    sess.queue.close(code, &reason);
                }
                ControlOp::Subscribe { channel } => {
                    crate::session::subscribe(st, sess, &channel, &Default::default()).await
                }
                ControlOp::Unsubscribe { channel } => {
                    if sess.channels.lock().remove(&channel) {
                        st.channels.unsubscribe(sess, &channel).await;
                        if sess.route.is_framed() {
                            sess.reply(framed::unsubscribed(&channel));
                        }
                    }
                }
            }
        }
        _ => {
            metrics::counter!(m::DELIVERIES, "kind" => "invalid").increment(1);
            tracing::debug!(
                kind = env.kind.as_str(),
                "unexpected record kind on node delivery subject"
            );
        }
    }
    None
}
