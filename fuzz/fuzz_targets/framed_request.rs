//! Client frames on `framed` routes: `framed::decode_request` and `framed::decode_client`,
//! fed raw bytes exactly as a WebSocket frame would carry them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use switchyard_fuzz::ref_valid_channel;
use switchyard_protocol::framed::{self, ClientOp, FramedError};

fuzz_target!(|frame: &[u8]| {
    let req = framed::decode_request(frame);
    let op = framed::decode_client(frame);

    // decode_request is decode_client plus the `id` and the nesting bound; it only overrides
    // the op for a bad id or a frame nested too deep.
    let too_deep = framed::nesting_exceeds(frame, framed::DEFAULT_MAX_DEPTH);
    assert_eq!(
        req.op == Err(FramedError::TooDeep(framed::DEFAULT_MAX_DEPTH)),
        too_deep && req.op != Err(FramedError::InvalidId)
    );
    if req.op == Err(FramedError::InvalidId) {
        assert_eq!(req.id, None);
    } else if !too_deep {
        assert_eq!(req.op, op, "decode_request and decode_client disagree");
    }

    // Anything decoded must have come from a JSON document.
    let is_json = serde_json::from_slice::<IgnoredAny>(frame).is_ok();
    if op.is_ok() || req.id.is_some() {
        assert!(is_json, "decoded a frame that is not JSON");
    }
    if !is_json {
        assert!(matches!(op, Err(FramedError::NotJson(_))), "non-JSON frame gave {op:?}");
    }

    // A kept id is a JSON string of at most 64 chars or an integer, and the ack / error the
    // server echoes it in are JSON carrying the same value.
    if let Some(id) = &req.id {
        let v: serde_json::Value = serde_json::from_str(id).expect("kept id is not JSON");
        match &v {
            serde_json::Value::String(s) => assert!(s.chars().count() <= 64),
            serde_json::Value::Number(n) => assert!(n.is_i64() || n.is_u64(), "id {n} is not an integer"),
            other => panic!("kept id {other:?}"),
        }
        let ack: serde_json::Value = serde_json::from_str(&framed::ack(id)).expect("ack is not JSON");
        assert_eq!(ack["id"], v);
        let err: serde_json::Value =
            serde_json::from_str(&framed::error_with_id("bad_request", "x", Some(id))).expect("error is not JSON");
        assert_eq!(err["id"], v);
    }

    match &op {
        Ok(decoded) => {
            match decoded {
                ClientOp::Subscribe { channel, .. } | ClientOp::Unsubscribe { channel } => {
                    assert!(ref_valid_channel(channel), "accepted channel {channel:?}")
                }
                ClientOp::Publish { channel, data } => {
                    assert!(ref_valid_channel(channel), "accepted channel {channel:?}");
                    assert!(serde_json::from_slice::<IgnoredAny>(data).is_ok(), "data is not JSON");
                }
                ClientOp::Ping => {}
                ClientOp::Send { data } => {
                    assert!(serde_json::from_slice::<IgnoredAny>(data).is_ok(), "data is not JSON")
                }
            }
            // Round trip: encoding the decoded op and decoding that gives the same op.
            let encoded = framed::encode_client(decoded);
            assert_eq!(
                framed::decode_client(encoded.as_bytes()).as_ref(),
                Ok(decoded),
                "round trip through {encoded:?}"
            );
        }
        Err(e) => {
            // What the client is told is bounded and is JSON.
            match e {
                FramedError::NotJson(m) => assert!(m.len() <= 120, "NotJson message of {} bytes", m.len()),
                FramedError::UnknownOp(o) => assert!(o.chars().count() <= 32),
                FramedError::InvalidChannel(c) => assert!(c.chars().count() <= 64),
                FramedError::Missing(_) | FramedError::InvalidId | FramedError::TooDeep(_) => {}
            }
            let reply = framed::error_with_id(e.code(), &e.to_string(), req.id.as_deref());
            let v: serde_json::Value = serde_json::from_str(&reply).expect("error reply is not JSON");
            assert_eq!(v["code"], e.code());
        }
    }
});
