//! Reference implementations of the name grammars (docs/protocol.md), written as explicit state machines.

// Reference implementations (docs/protocol.md's grammar, written as explicit state machines).

fn is_token_byte(b: u8) -> bool {
    matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-')
}

/// `token ("." token)*`, 1..=200 bytes, token = 1+ of `[A-Za-z0-9_-]`.
pub fn ref_valid_channel(s: &str) -> bool {
    if s.is_empty() || s.len() > 200 {
        return false;
    }
    let mut token_len = 0usize;
    for b in s.bytes() {
        if b == b'.' {
            if token_len == 0 {
                return false;
            }
            token_len = 0;
        } else if is_token_byte(b) {
            token_len += 1;
        } else {
            return false;
        }
    }
    token_len > 0
}

/// 1..=64 bytes of `[A-Za-z0-9_-]`.
pub fn ref_valid_session(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(is_token_byte)
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// W3C traceparent as the edge accepts it: `vv-<32 hex>-<16 hex>-<2 hex>` (lowercase hex),
/// version not `ff`, trace id and parent id not all zero. 55 bytes exactly.
pub fn ref_valid_traceparent(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 55 {
        return false;
    }
    for (i, &c) in b.iter().enumerate() {
        let dash = i == 2 || i == 35 || i == 52;
        if dash != (c == b'-') || (!dash && !is_lower_hex(c)) {
            return false;
        }
    }
    &s[0..2] != "ff" && b[3..35].iter().any(|&c| c != b'0') && b[36..52].iter().any(|&c| c != b'0')
}
