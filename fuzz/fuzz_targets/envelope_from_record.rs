//! Bus records: `Envelope::from_record(key, &Headers, payload)` on records anyone with bus
//! access can write. Headers are built mostly from the names the decoder reads and values
//! that pass its checks, so the fuzzer gets past one check to the next.
//!
//! Properties: no panic; every error echoes a bounded value; every decoded envelope satisfies
//! the protocol's invariants; and decode is a normaliser: re-encoding a decoded envelope and
//! decoding that gives `canonical(decoded)` (see switchyard_fuzz::canonical), after which the
//! headers are a fixed point (up to a float in `sy-claims` moving a few ULPs, see switchyard_fuzz::json_close).
#![no_main]

use arbitrary::Unstructured;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchyard_fuzz::{
    arb_header_name, arb_header_value, assert_envelope_eq, assert_headers_eq, canonical, check_decode_error,
    check_envelope_invariants,
};
use switchyard_protocol::{Envelope, Headers};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(key) = u.arbitrary::<Option<Vec<u8>>>() else {
        return;
    };
    let Ok(n) = u.int_in_range(0..=16u8) else { return };
    let mut headers = Headers::new();
    for _ in 0..n {
        let (Ok(name), Ok(value)) = (arb_header_name(&mut u), arb_header_value(&mut u)) else {
            return;
        };
        headers.0.push((name, value));
    }
    let payload = Bytes::copy_from_slice(u.take_rest());

    let decoded = match Envelope::from_record(key.as_deref(), &headers, payload.clone()) {
        Ok(e) => e,
        Err(e) => {
            check_decode_error(&e);
            return;
        }
    };
    check_envelope_invariants(&decoded);
    assert_eq!(decoded.payload, payload, "payload changed");

    let h1 = decoded.headers();
    let again = Envelope::from_record(Some(&decoded.key()), &h1, decoded.payload.clone())
        .unwrap_or_else(|e| panic!("re-decoding {h1:?} failed: {e}"));
    assert_envelope_eq(&again, &canonical(decoded.clone()), "decode(encode(d)) != canonical(d)");
    // The session travels in `sy-session`: the key is not needed.
    assert_eq!(
        Envelope::from_record(None, &h1, decoded.payload.clone()).as_ref(),
        Ok(&again)
    );
    // Fixed point after one normalisation (floats in claims may move a few ULPs, see lib.rs).
    assert_headers_eq(&again.headers(), &h1, "headers are not a fixed point");
});
