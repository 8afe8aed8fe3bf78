//! Envelopes built with `arbitrary` inside the encoder's domain (valid session, channel, trace
//! context, close code and reason): `from_record(key, headers(e), payload) == e`, with the
//! opcode inferred from the payload for kinds that do not carry it, and floats in the claims
//! allowed to move by a few ULPs (serde_json without `float_roundtrip`; see
//! switchyard_fuzz::json_close). Also: header order and header-name case do not change the
//! result, and the key is not needed.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use switchyard_fuzz::{arb_envelope, assert_envelope_eq, check_envelope_invariants, inferred_opcode};
use switchyard_protocol::{Envelope, Headers, Kind};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mut e) = arb_envelope(&mut u) else { return };
    let Ok(rotate) = u.arbitrary::<u8>() else { return };
    if !matches!(e.kind, Kind::Frame | Kind::Deliver) {
        e.opcode = inferred_opcode(&e.payload);
    }
    check_envelope_invariants(&e);

    let h = e.headers();
    let d = Envelope::from_record(Some(&e.key()), &h, e.payload.clone())
        .unwrap_or_else(|err| panic!("decoding {h:?} failed: {err}"));
    assert_envelope_eq(&d, &e, "round trip through headers(e)");

    // Header order and name case are not significant; the key is not needed.
    let mut shuffled = h.0.clone();
    if !shuffled.is_empty() {
        let k = usize::from(rotate) % shuffled.len();
        shuffled.rotate_left(k);
    }
    for (i, (name, _)) in shuffled.iter_mut().enumerate() {
        if (usize::from(rotate) >> (i % 8)) & 1 == 1 {
            *name = name.to_ascii_uppercase();
        }
    }
    let d2 = Envelope::from_record(None, &Headers(shuffled), e.payload.clone())
        .unwrap_or_else(|err| panic!("reordered / re-cased headers refused: {err}"));
    assert_eq!(d2, d, "reordered / re-cased headers decode differently");
});
