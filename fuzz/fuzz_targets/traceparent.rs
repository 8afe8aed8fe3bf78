//! Trace context from handshake headers: `TraceContext::parse(traceparent, tracestate)`.
//!
//! Two modes, chosen by the first byte: raw text (split at the first NUL into traceparent and
//! tracestate), or a well-formed traceparent with one byte overwritten, so both sides of every
//! check are reached. Properties: acceptance matches an independent reference; an accepted
//! value is kept verbatim, its trace id is its bytes 3..35, and re-serialising its four
//! fields parses to the same value; a refusal echoes at most 64 bytes of the input.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use switchyard_fuzz::{arb_traceparent, check_decode_error, ref_valid_traceparent};
use switchyard_protocol::{DecodeError, TraceContext};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (tp, ts): (String, Option<String>) = if mode & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        match text.split_once('\0') {
            Some((a, b)) => (a.to_owned(), Some(b.to_owned())),
            None => (text.to_owned(), None),
        }
    } else {
        let mut u = Unstructured::new(rest);
        let Ok(mut tp) = arb_traceparent(&mut u) else { return };
        let (Ok(at), Ok(c)) = (u.int_in_range(0..=60usize), u.arbitrary::<char>()) else {
            return;
        };
        if mode & 2 == 2 {
            // Overwrite (or append past the end) one character.
            if at < tp.len() {
                tp.replace_range(at..at + 1, c.encode_utf8(&mut [0; 4]));
            } else {
                tp.push(c);
            }
        }
        (tp, u.arbitrary::<Option<String>>().unwrap_or(None))
    };

    match TraceContext::parse(&tp, ts.as_deref()) {
        Ok(t) => {
            assert!(ref_valid_traceparent(&tp), "accepted {tp:?}");
            assert_eq!(t.traceparent, tp);
            assert_eq!(t.tracestate, ts);
            let id = t.trace_id();
            assert_eq!(id, &tp[3..35]);
            assert!(id.len() == 32 && id.bytes().any(|b| b != b'0'));
            let parts: Vec<&str> = tp.split('-').collect();
            let re = format!("{}-{}-{}-{}", parts[0], parts[1], parts[2], parts[3]);
            assert_eq!(
                TraceContext::parse(&re, ts.as_deref()),
                Ok(t.clone()),
                "re-serialised {re:?}"
            );
        }
        Err(e) => {
            assert!(!ref_valid_traceparent(&tp), "refused {tp:?}: {e}");
            check_decode_error(&e);
            match &e {
                DecodeError::Invalid { name, value } => {
                    assert_eq!(*name, "traceparent");
                    assert!(
                        tp.starts_with(value.as_str()),
                        "echo {value:?} is not a prefix of the input"
                    );
                }
                other => panic!("unexpected error kind {other:?}"),
            }
        }
    }
});
