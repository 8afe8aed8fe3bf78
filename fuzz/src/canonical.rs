//! What one decode of a record normalises, and the invariants of a decoded envelope.

use crate::*;
use switchyard_protocol::{ControlOp, Envelope, Kind, Opcode};

// What one decode of a record normalises, so that decode(encode(d)) == canonical(d).
//
// - `opcode` travels (as `sy-opcode`) only for `frame` and `deliver`; for other kinds the
//   decoder infers it from the payload (text when UTF-8).
// - a `control: close` carries its code and reason in `sy-code`/`sy-reason`; once decoded,
//   `code`/`reason` equal the close op's (1000 and "" when the record had none).
// - a `control: subscribe|unsubscribe` writes no `sy-code`/`sy-reason`, so those are dropped.

pub fn inferred_opcode(payload: &[u8]) -> Opcode {
    if std::str::from_utf8(payload).is_ok() {
        Opcode::Text
    } else {
        Opcode::Binary
    }
}

pub fn canonical(mut e: Envelope) -> Envelope {
    if !matches!(e.kind, Kind::Frame | Kind::Deliver) {
        e.opcode = inferred_opcode(&e.payload);
    }
    match &e.control {
        Some(ControlOp::Close { code, reason }) => {
            e.code = Some(*code);
            e.reason = Some(reason.clone());
        }
        Some(ControlOp::Subscribe { .. } | ControlOp::Unsubscribe { .. }) => {
            e.code = None;
            e.reason = None;
        }
        None => {}
    }
    e
}

/// Invariants every successfully decoded envelope must satisfy.
pub fn check_envelope_invariants(e: &Envelope) {
    assert!(
        ref_valid_session(&e.session),
        "decoded session {:?} is not a valid session",
        e.session
    );
    assert_eq!(
        e.control.is_some(),
        e.kind == Kind::Control,
        "control op iff kind=control: {e:?}"
    );
    if let Some(c) = e.code {
        assert!((1000..5000).contains(&c), "close code {c} out of range");
    }
    if let Some(r) = &e.reason {
        assert!(
            r.len() <= 123,
            "close reason of {} bytes (a close frame holds 123)",
            r.len()
        );
    }
    match &e.control {
        Some(ControlOp::Subscribe { channel } | ControlOp::Unsubscribe { channel }) => {
            assert!(
                ref_valid_channel(channel),
                "control channel {channel:?} is not a valid channel"
            )
        }
        Some(ControlOp::Close { code, reason }) => {
            assert!((1000..5000).contains(code));
            assert!(reason.len() <= 123);
        }
        None => {}
    }
    if let Some(t) = &e.trace {
        assert!(
            ref_valid_traceparent(&t.traceparent),
            "accepted traceparent {:?}",
            t.traceparent
        );
        assert_eq!(t.trace_id(), &t.traceparent[3..35]);
    }
}
