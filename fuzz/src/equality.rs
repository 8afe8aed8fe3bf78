//! Equality up to serde_json's float round trip.

use serde_json::Value;
use switchyard_protocol::envelope::header;
use switchyard_protocol::{Envelope, Headers};

// Equality up to one known loss: serde_json without its `float_roundtrip` feature (the
// workspace's configuration) parses floats "best effort", so a float it printed can come back
// a few ULPs away (measured on 20M random f64: 29.4% off by 1 ULP, 0.21% by 2, none by more;
// with `float_roundtrip`, none). A float in `sy-claims` can thus move per decode/encode.
// Everything else must be exactly equal. docs/fuzzing.md records this finding.

/// How far (in ULPs) a float may move through one serde_json print + parse.
pub const FLOAT_ULPS: u64 = 4;

fn floats_close(a: f64, b: f64) -> bool {
    a == b || (a.is_sign_negative() == b.is_sign_negative() && a.to_bits().abs_diff(b.to_bits()) <= FLOAT_ULPS)
}

/// JSON equality, except that two floats at most [`FLOAT_ULPS`] apart count as equal.
pub fn json_close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            floats_close(x.as_f64().unwrap(), y.as_f64().unwrap())
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_close(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w)))
        }
        _ => a == b,
    }
}

/// `got == want`, except that claims are compared with [`json_close`].
pub fn assert_envelope_eq(got: &Envelope, want: &Envelope, what: &str) {
    if got == want {
        return;
    }
    let (mut g, mut w) = (got.clone(), want.clone());
    let gc = g.identity.as_mut().map(|i| std::mem::take(&mut i.claims));
    let wc = w.identity.as_mut().map(|i| std::mem::take(&mut i.claims));
    assert_eq!(g, w, "{what}");
    let close = match (&gc, &wc) {
        (Some(a), Some(b)) => json_close(&Value::Object(a.clone()), &Value::Object(b.clone())),
        _ => gc == wc,
    };
    assert!(close, "{what}: claims differ\n got: {gc:?}\nwant: {wc:?}");
}

/// `got == want`, except that `sy-claims` values are compared with [`json_close`].
pub fn assert_headers_eq(got: &Headers, want: &Headers, what: &str) {
    if got == want {
        return;
    }
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for ((gn, gv), (wn, wv)) in got.iter().zip(want.iter()) {
        assert_eq!(gn, wn, "{what}");
        if gv != wv {
            assert_eq!(gn, header::CLAIMS, "{what}: header {gn} {gv:?} vs {wv:?}");
            let (g, w): (Value, Value) = (serde_json::from_str(gv).unwrap(), serde_json::from_str(wv).unwrap());
            assert!(json_close(&g, &w), "{what}: claims {gv} vs {wv}");
        }
    }
}
