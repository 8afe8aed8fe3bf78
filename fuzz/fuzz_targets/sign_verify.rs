//! Edge signatures: `sign::verify(key, headers, payload)` on records from the bus (anyone with
//! bus access can write them).
//!
//! Properties: verify never panics on arbitrary headers (names, duplicates, any `sy-sig` text);
//! a record signed with `sign` verifies under the same key; changing the payload, any signed
//! header's value, or the key makes it fail; a duplicated signed header makes it fail.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use switchyard_protocol::sign::{sign, verify, SIG, SIGNED};
use switchyard_protocol::Headers;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(key) = <Vec<u8>>::arbitrary(&mut u) else { return };
    let Ok(pairs) = <Vec<(String, String)>>::arbitrary(&mut u) else {
        return;
    };
    let Ok(payload) = <Vec<u8>>::arbitrary(&mut u) else {
        return;
    };
    let headers = Headers(pairs);
    // Arbitrary records: no panic, whatever the result.
    let _ = verify(&key, &headers, &payload);

    // A record as an edge would write it: unique names, then the signature.
    let mut clean = Headers::new();
    for (k, v) in headers.0.iter() {
        if k.eq_ignore_ascii_case(SIG) || clean.get(k).is_some() {
            continue;
        }
        clean.insert(k, v.clone());
    }
    let sig = sign(&key, &clean, &payload);
    let mut signed = clean.clone();
    signed.insert(SIG, sig);
    assert!(verify(&key, &signed, &payload), "a signed record verifies");

    let mut other_payload = payload.clone();
    other_payload.push(0);
    assert!(!verify(&key, &signed, &other_payload), "a changed payload fails");
    let mut other_key = key.clone();
    other_key.push(1);
    assert!(!verify(&other_key, &signed, &payload), "another key fails");
    if let Some((name, value)) = signed
        .0
        .iter()
        .find(|(k, _)| SIGNED.iter().any(|s| k.eq_ignore_ascii_case(s)))
        .cloned()
    {
        let mut changed = signed.clone();
        changed.0.iter_mut().find(|(k, _)| *k == name).expect("present").1 = format!("{value}x");
        assert!(!verify(&key, &changed, &payload), "a changed {name} fails");
        let mut dup = signed.clone();
        dup.insert(&name, value);
        assert!(!verify(&key, &dup, &payload), "a duplicated {name} fails");
    }
});
