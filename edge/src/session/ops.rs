//! The framed protocol's client ops: subscribe, unsubscribe, publish and send, each answered
//! (subscribed, unsubscribed, ack or error) and checked against the route and the credential.

use super::publish::publish_frame;
use super::{Session, MAX_CHANNELS_PER_SESSION};
use crate::channels::{Gate, Item};
use crate::state::EdgeState;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use switchyard_bus::{BusError, HistoryQuery, Record};
use switchyard_protocol::envelope::{header, now_ms};
use switchyard_protocol::framed::{self, ClientOp, Position, Start};
use switchyard_protocol::{Headers, Opcode};

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
pub(super) async fn handle_op(
    st: &EdgeState,
    sess: &Arc<Session>,
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
    let req = framed::decode_request_with(&payload, st.cfg.max_json_depth);
    let id = req.id.as_deref();
    let op = match req.op {
        Ok(op) => op,
        Err(e) => {
            sess.reply(framed::error_with_id(e.code(), &e.to_string(), id));
            return Ok(());
        }
    };
    // A resent id the session already accepted: acknowledged again, not published again.
    if let (Some(id), ClientOp::Send { .. } | ClientOp::Publish { .. }) = (id, &op) {
        if sess.cont.seen(id) {
            metrics::counter!(crate::metrics::DUPLICATES).increment(1);
            sess.reply(framed::ack_duplicate(id));
            return Ok(());
        }
    }
    let res = match op {
        ClientOp::Subscribe { channel, start } => {
            if !forbidden(sess, false, &channel, id) {
                subscribe(st, sess, &channel, &start).await;
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
        ClientOp::Send { data } => publish_frame(st, sess, data, Opcode::Text, id).await,
        ClientOp::Ping => {
            sess.reply(framed::pong(id));
            return Ok(());
        }
    };
    match (&res, id) {
        (Ok(()), Some(id)) => {
            sess.cont.accepted(id);
            sess.reply(framed::ack(id))
        }
        (Ok(()), None) => {}
        (Err(e), id) => sess.reply(framed::error_with_id(bus_code(e), &e.to_string(), id)),
    }
    res
}

/// Subscribes a session to a channel and answers `subscribed` (framed) once it is live. On a
/// channel with history the answer carries the epoch and the newest offset, and `start` may
/// ask for retained messages first (`since`, `rewind`).
pub async fn subscribe(st: &EdgeState, sess: &Arc<Session>, channel: &str, start: &Start) {
    let framed = sess.route.is_framed();
    {
        let chans = sess.channels.lock();
        if chans.contains(channel) {
            drop(chans);
            if framed {
                sess.reply(framed::subscribed(channel));
            }
            return;
        }
        if chans.len() >= MAX_CHANNELS_PER_SESSION {
            drop(chans);
            if framed {
                sess.reply(framed::error(
                    "too_many_channels",
                    &format!("at most {MAX_CHANNELS_PER_SESSION} channels per session"),
                ));
            }
            return;
        }
    }
    let gate = st.cfg.history_of(channel).map(|_| Arc::new(Gate::new()));
    match st.channels.subscribe(sess, channel, gate.clone()).await {
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
                return;
            }
            match gate {
                Some(gate) => recover(st, sess, channel, start, &gate).await,
                None if framed => {
                    // No history: a client that asked to recover learns it cannot.
                    let recovered = matches!(start, Start::Since { .. }).then_some(false);
                    sess.reply(framed::subscribed_at(channel, &Position { log: None, recovered }));
                }
                None => {}
            }
        }
        Err(e) => {
            if framed {
                sess.reply(framed::error("bus_unavailable", &e.to_string()));
            }
        }
    }
}

/// Takes the session off a channel it was just put on (the recovery failed).
async fn leave(st: &EdgeState, sess: &Arc<Session>, channel: &str) {
    if sess.channels.lock().remove(channel) {
        st.channels.unsubscribe(sess, channel).await;
    }
}

/// The history part of a subscribe to a channel with history: reads the log (the session is
/// already live behind `gate`), answers `subscribed` with the epoch and newest offset, sends
/// what `start` asked for, then opens the gate past the newest offset the read saw.
async fn recover(st: &EdgeState, sess: &Arc<Session>, channel: &str, start: &Start, gate: &Gate) {
    let max = st.cfg.max_recover;
    let (query, limit) = match start {
        Start::Live => (HistoryQuery::Last(0), 0),
        // One more than allowed, to tell "too far behind" from "exactly max_recover behind".
        Start::Since { offset, .. } => (HistoryQuery::After(*offset), max + 1),
        Start::Rewind(k) => {
            let k = usize::try_from(*k).unwrap_or(usize::MAX).min(max);
            (HistoryQuery::Last(k), k)
        }
    };
    let count = |result: &'static str| metrics::counter!(crate::metrics::RECOVERIES, "result" => result).increment(1);
    let read = match st.bus.history(&st.cfg.naming.channel(channel), query, limit).await {
        Ok(Some(read)) => read,
        Ok(None) => {
            // The bus keeps no log for it after all: live only, and said so.
            gate.open(sess, &[], 0);
            let recovered = matches!(start, Start::Since { .. }).then_some(false);
            sess.reply(framed::subscribed_at(channel, &Position { log: None, recovered }));
            return;
        }
        Err(e) => {
            count("error");
            leave(st, sess, channel).await;
            if sess.route.is_framed() {
                sess.reply(framed::error("bus_unavailable", &format!("history of {channel}: {e}")));
            }
            return;
        }
    };
    let (recovered, messages) = match start {
        Start::Since { epoch, .. } => {
            let ok = *epoch == read.epoch && read.complete && read.messages.len() <= max;
            count(if ok { "recovered" } else { "not_recovered" });
            (Some(ok), if ok { read.messages } else { Vec::new() })
        }
        Start::Rewind(_) => {
            count("rewind");
            (None, read.messages)
        }
        Start::Live => (None, Vec::new()),
    };
    if sess.route.is_framed() {
        sess.reply(framed::subscribed_at(
            channel,
            &Position {
                log: Some((&read.epoch, read.last)),
                recovered,
            },
        ));
    }
    let frames: Vec<Bytes> = messages
        .iter()
        .map(|m| Item::new(m).frame(channel, sess).clone())
        .collect();
    metrics::counter!(crate::metrics::RECOVERED_MESSAGES).increment(frames.len() as u64);
    if !gate.open(sess, &frames, read.last) {
        count("overrun");
        leave(st, sess, channel).await;
        if sess.route.is_framed() {
            sess.reply(framed::error(
                "recovery_overrun",
                &format!(
                    "more than {} live messages on {channel} arrived during the recovery; subscribe again",
                    crate::channels::MAX_HELD
                ),
            ));
        }
    }
}
