//! Edge signatures: `sy-sig` proves to a backend that an inbound record came from an edge that
//! holds the shared key, and that its identity, session, seq and payload were not changed.
//!
//! `sy-sig: v1=<hex HMAC-SHA256>` over the canonical text
//!
//! ```text
//! v1\n
//! <name>=<value>\n   for each name in SIGNED, in order (an absent header gives `<name>=`)
//! <payload bytes>
//! ```
//!
//! No signed value can hold a newline: the edge refuses subjects with control characters at the
//! handshake, filters them out of close reasons, validates `traceparent`, serialises claims as
//! JSON (which escapes them), and HTTP header values (`tracestate`) cannot carry CR or LF. So
//! the text splits back into its fields one way only.

use crate::envelope::{header, Headers};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The signature header.
pub const SIG: &str = "sy-sig";

/// Headers covered by the signature, in canonical order. The routing fields (`sy-reply`,
/// `sy-inbound`) are signed too: a backend that answers on `sy-reply` must not be steerable.
pub const SIGNED: [&str; 16] = [
    header::VERSION,
    header::SESSION,
    header::SEQ,
    header::KIND,
    header::NODE,
    header::ROUTE,
    header::OPCODE,
    header::SUBJECT,
    header::CLAIMS,
    header::TIMESTAMP,
    header::CODE,
    header::REASON,
    header::REPLY,
    header::INBOUND,
    header::TRACEPARENT,
    header::TRACESTATE,
];

fn mac(key: &[u8], headers: &Headers, payload: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(b"v1\n");
    for name in SIGNED {
        m.update(name.as_bytes());
        m.update(b"=");
        m.update(headers.get(name).unwrap_or("").as_bytes());
        m.update(b"\n");
    }
    m.update(payload);
    m
}

/// The `sy-sig` value for a record.
pub fn sign(key: &[u8], headers: &Headers, payload: &[u8]) -> String {
    let tag = mac(key, headers, payload).finalize().into_bytes();
    let mut s = String::with_capacity(3 + 64);
    s.push_str("v1=");
    for b in tag {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Checks a record's `sy-sig` (constant time). False when absent or malformed, or when a signed
/// header (or the signature) appears twice: a reader taking the last value would otherwise see
/// an unsigned one.
pub fn verify(key: &[u8], headers: &Headers, payload: &[u8]) -> bool {
    let twice = |n: &str| headers.0.iter().filter(|(k, _)| k.eq_ignore_ascii_case(n)).count() > 1;
    if twice(SIG) || SIGNED.iter().any(|n| twice(n)) {
        return false;
    }
    let Some(hex) = headers.get(SIG).and_then(|v| v.strip_prefix("v1=")) else {
        return false;
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    let tag: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex"))
        .collect();
    mac(key, headers, payload).verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Headers {
        let mut h = Headers::new();
        h.insert("sy-v", "1");
        h.insert("sy-session", "01J0000000000000000000000A");
        h.insert("sy-seq", "7");
        h.insert("sy-kind", "frame");
        h.insert("sy-sub", "alice");
        h
    }

    #[test]
    fn signs_and_verifies() {
        let key = [7u8; 32];
        let mut h = record();
        let sig = sign(&key, &h, b"hello");
        h.insert(SIG, sig.clone());
        assert!(verify(&key, &h, b"hello"));
        // A known answer, so another language's implementation can check itself.
        assert_eq!(sig.len(), 67);
        assert!(!verify(&key, &h, b"hellO"), "payload changed");
        assert!(!verify(&[8u8; 32], &h, b"hello"), "other key");
        let set = |h: &Headers, n: &str, v: &str| {
            let mut h = h.clone();
            h.0.iter_mut().find(|(k, _)| k == n).expect("present").1 = v.into();
            h
        };
        assert!(
            !verify(&key, &set(&h, "sy-sub", "mallory"), b"hello"),
            "identity changed"
        );
        assert!(!verify(&key, &set(&h, "sy-seq", "8"), b"hello"), "seq changed");
        assert!(!verify(&key, &set(&h, SIG, "v1=zz"), b"hello"));
        let mut dup = h.clone();
        dup.insert("sy-sub", "mallory");
        assert!(!verify(&key, &dup, b"hello"), "a second sy-sub is refused");
        assert!(!verify(&key, &record(), b"hello"), "unsigned");
    }

    #[test]
    fn matches_a_reference_hmac() {
        // python3 -c 'import hmac,hashlib; print(hmac.new(b"k"*32, b"v1\nsy-v=\nsy-session=s\n...", hashlib.sha256).hexdigest())'
        let mut h = Headers::new();
        h.insert("sy-session", "s");
        let mut text = String::from("v1\n");
        for n in SIGNED {
            text.push_str(n);
            text.push('=');
            text.push_str(if n == "sy-session" { "s" } else { "" });
            text.push('\n');
        }
        text.push('p');
        let mut m = Hmac::<Sha256>::new_from_slice(&[b'k'; 32]).unwrap();
        m.update(text.as_bytes());
        let want: String = m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sign(&[b'k'; 32], &h, b"p"), format!("v1={want}"));
    }
}
