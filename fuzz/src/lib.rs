//! Helpers shared by the fuzz targets: reference implementations written independently of
//! `switchyard-protocol` (so a target can compare the two), generators of well-formed values
//! for round-trip targets, and the checks every decoder error must pass.

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use serde_json::{Map, Number, Value};
use switchyard_protocol::envelope::header;
use switchyard_protocol::{ControlOp, DecodeError, Envelope, Headers, Identity, Kind, Opcode, TraceContext};

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// Error checks: nothing a decoder echoes back (to a log, a client, a metric) may be unbounded.

pub fn check_decode_error(e: &DecodeError) {
    match e {
        DecodeError::Invalid { value, .. } => {
            assert!(value.len() <= 64, "DecodeError::Invalid echoes {} bytes", value.len())
        }
        DecodeError::Version(v) => assert!(v.chars().count() <= 16, "DecodeError::Version echoes {v:?}"),
        DecodeError::MissingSession | DecodeError::Missing(_) => {}
    }
    // Display must not panic either.
    let _ = e.to_string();
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// Generators of well-formed values.

const TOKEN_BYTES: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

fn token(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let n = u.int_in_range(1..=max)?;
    let mut s = String::with_capacity(n);
    for _ in 0..n {
        s.push(*u.choose(TOKEN_BYTES)? as char);
    }
    Ok(s)
}

/// A valid session id (1..=64 token bytes).
pub fn arb_session(u: &mut Unstructured<'_>) -> Result<String> {
    token(u, 64)
}

/// A valid channel name (1..=200 bytes).
pub fn arb_channel(u: &mut Unstructured<'_>) -> Result<String> {
    let mut s = token(u, 24)?;
    for _ in 0..u.int_in_range(0..=8)? {
        let t = token(u, 24)?;
        if s.len() + 1 + t.len() > 200 {
            break;
        }
        s.push('.');
        s.push_str(&t);
    }
    Ok(s)
}

/// A string of at most `max_bytes` bytes, any Unicode.
pub fn arb_string_max(u: &mut Unstructured<'_>, max_bytes: usize) -> Result<String> {
    let mut s: String = u.arbitrary()?;
    if s.len() > max_bytes {
        let mut cut = max_bytes;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    Ok(s)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A valid traceparent (any version but `ff`, non-zero ids).
pub fn arb_traceparent(u: &mut Unstructured<'_>) -> Result<String> {
    let mut version: u8 = u.arbitrary()?;
    if version == 0xff {
        version = 0;
    }
    let mut trace: [u8; 16] = u.arbitrary()?;
    if trace.iter().all(|&b| b == 0) {
        trace[15] = 1;
    }
    let mut parent: [u8; 8] = u.arbitrary()?;
    if parent.iter().all(|&b| b == 0) {
        parent[7] = 1;
    }
    let flags: u8 = u.arbitrary()?;
    Ok(format!(
        "{:02x}-{}-{}-{:02x}",
        version,
        hex(&trace),
        hex(&parent),
        flags
    ))
}

/// Any JSON value serde_json can hold (finite floats), nested at most `depth` levels.
pub fn arb_json(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let max = if depth == 0 { 5 } else { 7 };
    Ok(match u.int_in_range(0..=max)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::Number(Number::from(u.arbitrary::<i64>()?)),
        3 => Value::Number(Number::from(u.arbitrary::<u64>()?)),
        4 => match Number::from_f64(u.arbitrary::<f64>()?) {
            Some(n) => Value::Number(n),
            None => Value::Null,
        },
        5 => Value::String(u.arbitrary()?),
        6 => {
            let n = u.int_in_range(0..=4)?;
            Value::Array((0..n).map(|_| arb_json(u, depth - 1)).collect::<Result<_>>()?)
        }
        _ => Value::Object(arb_map(u, depth - 1)?),
    })
}

/// serde_json with `raw_value` (on in this workspace) reads an object whose key is this token as
/// the JSON text in its value, not as an object: `{"$serde_json::private::RawValue":"[1]"}`
/// parses to `[1]`. So claims holding such a key do not survive `sy-claims`; the generator
/// leaves them out (docs/fuzzing.md, findings).
pub const SERDE_JSON_MAGIC: &str = "$serde_json::private::";

pub fn arb_map(u: &mut Unstructured<'_>, depth: u32) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for _ in 0..u.int_in_range(0..=4)? {
        let mut k: String = u.arbitrary()?;
        if k.starts_with(SERDE_JSON_MAGIC) {
            k.insert(0, '_');
        }
        let v = arb_json(u, depth)?;
        m.insert(k, v);
    }
    Ok(m)
}

/// An envelope inside the domain the encoder promises to round-trip: valid session, trace
/// context and channels, close codes in 1000..5000, close reasons of at most 123 bytes, and
/// `code`/`reason` equal to the close op's on a `control: close`.
pub fn arb_envelope(u: &mut Unstructured<'_>) -> Result<Envelope> {
    let control = match u.int_in_range(0..=3)? {
        0 => None,
        1 => Some(ControlOp::Close {
            code: u.int_in_range(1000..=4999)?,
            reason: arb_string_max(u, 123)?,
        }),
        2 => Some(ControlOp::Subscribe {
            channel: arb_channel(u)?,
        }),
        _ => Some(ControlOp::Unsubscribe {
            channel: arb_channel(u)?,
        }),
    };
    let kind = if control.is_some() {
        Kind::Control
    } else {
        *u.choose(&[Kind::Connect, Kind::Frame, Kind::Disconnect, Kind::Deliver])?
    };
    let payload: Vec<u8> = u.arbitrary()?;
    let mut e = Envelope::new(arb_session(u)?, kind, Bytes::from(payload));
    e.node = u.arbitrary()?;
    e.seq = u.arbitrary()?;
    e.route = u.arbitrary()?;
    e.opcode = if u.arbitrary()? { Opcode::Binary } else { Opcode::Text };
    if u.arbitrary()? {
        e.identity = Some(Identity {
            subject: u.arbitrary()?,
            claims: arb_map(u, 2)?,
        });
    }
    if u.arbitrary()? {
        e.trace = Some(TraceContext {
            traceparent: arb_traceparent(u)?,
            tracestate: u.arbitrary()?,
        });
    }
    e.timestamp_ms = u.arbitrary()?;
    e.reply = u.arbitrary()?;
    match &control {
        Some(ControlOp::Close { code, reason }) => {
            e.code = Some(*code);
            e.reason = Some(reason.clone());
        }
        Some(_) => {}
        None => {
            if u.arbitrary()? {
                e.code = Some(u.int_in_range(1000..=4999)?);
            }
            if u.arbitrary()? {
                e.reason = Some(arb_string_max(u, 123)?);
            }
        }
    }
    e.control = control;
    e.synthetic = u.arbitrary()?;
    e.replayed = u.arbitrary()?;
    Ok(e)
}

/// Every header name the decoder reads, for targets that build records.
pub const HEADER_NAMES: &[&str] = &[
    header::VERSION,
    header::SESSION,
    header::NODE,
    header::SEQ,
    header::KIND,
    header::ROUTE,
    header::OPCODE,
    header::SUBJECT,
    header::CLAIMS,
    header::TIMESTAMP,
    header::REPLY,
    header::OP,
    header::CHANNEL,
    header::CODE,
    header::REASON,
    header::SYNTHETIC,
    header::REPLAYED,
    header::INBOUND,
    header::TRACEPARENT,
    header::TRACESTATE,
];

/// Values that get a record past a check, so the fuzzer reaches the checks behind it.
pub const LIKELY_VALUES: &[&str] = &[
    "1",
    "0",
    "01",
    "+1",
    "2",
    "connect",
    "frame",
    "disconnect",
    "deliver",
    "control",
    "text",
    "binary",
    "close",
    "subscribe",
    "unsubscribe",
    "true",
    "false",
    "1000",
    "4999",
    "5000",
    "999",
    "65536",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "",
    "{}",
    "{\"tenant\":\"a\"}",
    "[]",
    "null",
    "{\"x\":1e400}",
    "{\"a\":1.5,\"a\":2}",
    "ticker.AAPL",
    "a..b",
    "sess-1",
    "01J0ABCDEFGHJKMNPQRSTVWXYZ",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
];

/// A record's header name: one the decoder reads (sometimes in another case), or anything.
pub fn arb_header_name(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=9)? {
        0 => u.arbitrary()?,
        1 => u.choose(HEADER_NAMES)?.to_ascii_uppercase(),
        _ => u.choose(HEADER_NAMES)?.to_string(),
    })
}

/// A header value: a likely one, a likely one with bytes appended, or anything.
pub fn arb_header_value(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=3)? {
        0 => u.arbitrary()?,
        1 => {
            let mut s = u.choose(LIKELY_VALUES)?.to_string();
            s.push_str(&u.arbitrary::<String>()?);
            s
        }
        _ => u.choose(LIKELY_VALUES)?.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// WebSocket client frames (RFC 6455 §5), for the `ws_parser` target: a reference decoder of
// the whole input at once, written from the RFC without the parser's incremental state, and a
// reference encoder.

/// A message the reference decodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefMsg {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<(u16, String)>),
}

/// What the reference makes of a whole input: each message with the input offset at which its
/// last frame ends; each header charged (0 data, 1 continuation, 2 control) with the offset at
/// which the header ends; the error (its text, as `ws::Error` displays it) with the offset at
/// which it becomes known; and whether the input ends cleanly (on a frame boundary, outside a
/// fragmented message).
#[derive(Debug, Default)]
pub struct RefRun {
    pub msgs: Vec<(RefMsg, usize)>,
    pub charges: Vec<(u8, usize)>,
    pub error: Option<(String, usize)>,
    pub idle: bool,
}

/// Close codes a client may send: RFC 6455 §7.4.1 defined codes except 1004 (reserved), 1005,
/// 1006 (never on the wire), 1015 (TLS, never on the wire); 1012–1013 (IANA); 3000–4999.
pub fn ref_close_code_allowed(c: u16) -> bool {
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013].contains(&c) || (3000..5000).contains(&c)
}

/// Decodes `wire` frame by frame with frame/message limit `max`, a budget of `frames` headers
/// and `control` control headers (`None`: no limit).
pub fn ref_ws(wire: &[u8], max: usize, mut frames: Option<usize>, mut control: Option<usize>) -> RefRun {
    let mut run = RefRun::default();
    let mut pos = 0usize;
    // An unfinished fragmented message: text?, bytes so far.
    let mut frag: Option<(bool, Vec<u8>)> = None;
    macro_rules! fail {
        ($what:expr, $at:expr) => {{
            run.error = Some(($what.to_string(), $at));
            return run;
        }};
    }
    loop {
        let rest = &wire[pos..];
        if rest.len() < 2 {
            run.idle = rest.is_empty() && frag.is_none();
            return run;
        }
        let (b0, b1) = (rest[0], rest[1]);
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let masked = b1 & 0x80 != 0;
        let hlen = 2 + ext + if masked { 4 } else { 0 };
        if rest.len() < hlen {
            return run;
        }
        let mut len: u64 = (b1 & 0x7f) as u64;
        if ext > 0 {
            len = 0;
            for &b in &rest[2..2 + ext] {
                len = len << 8 | b as u64;
            }
        }
        let hend = pos + hlen;
        let opcode = b0 & 0x0f;
        let control_frame = opcode >= 8;
        run.charges.push((
            if opcode == 0 {
                1
            } else if control_frame {
                2
            } else {
                0
            },
            hend,
        ));
        match frames {
            Some(0) => fail!("frame flood", hend),
            Some(n) => frames = Some(n - 1),
            None => {}
        }
        if control_frame {
            match control {
                Some(0) => fail!("control frame flood", hend),
                Some(n) => control = Some(n - 1),
                None => {}
            }
        }
        if ![0, 1, 2, 8, 9, 10].contains(&opcode) {
            fail!("protocol error: reserved opcode", hend);
        }
        if len >= 1 << 63 {
            fail!("protocol error: frame length with the most significant bit set", hend);
        }
        if b0 & 0x70 != 0 {
            fail!("protocol error: reserved bits set without an extension", hend);
        }
        if !masked {
            fail!("protocol error: client frame not masked", hend);
        }
        let fin = b0 & 0x80 != 0;
        if control_frame {
            if len > 125 {
                fail!("protocol error: control frame over 125 bytes", hend);
            }
            if !fin {
                fail!("protocol error: fragmented control frame", hend);
            }
        } else {
            let so_far = frag.as_ref().map(|(_, d)| d.len());
            if opcode == 0 && so_far.is_some_and(|n| n as u64 + len > max as u64) {
                fail!("message too big", hend);
            }
            if len > max as u64 {
                fail!("frame too big", hend);
            }
            if opcode == 0 && frag.is_none() {
                fail!("protocol error: continuation outside a fragmented message", hend);
            }
            if opcode != 0 && frag.is_some() {
                fail!("protocol error: new message inside a fragmented message", hend);
            }
        }
        let len = len as usize;
        if wire.len() - hend < len {
            return run;
        }
        let mask = &rest[hlen - 4..hlen];
        let payload: Vec<u8> = wire[hend..hend + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        let fend = hend + len;
        pos = fend;
        match opcode {
            8 => {
                let msg = match payload.len() {
                    0 => RefMsg::Close(None),
                    1 => fail!("protocol error: close payload of one byte", fend),
                    _ => {
                        let code = u16::from(payload[0]) << 8 | u16::from(payload[1]);
                        if !ref_close_code_allowed(code) {
                            fail!("protocol error: close code not allowed", fend);
                        }
                        match String::from_utf8(payload[2..].to_vec()) {
                            Ok(reason) => RefMsg::Close(Some((code, reason))),
                            Err(_) => fail!("invalid UTF-8 in text frame", fend),
                        }
                    }
                };
                run.msgs.push((msg, fend));
            }
            9 => run.msgs.push((RefMsg::Ping(payload), fend)),
            10 => run.msgs.push((RefMsg::Pong, fend)),
            _ => {
                let (text, mut data) = match frag.take() {
                    Some(f) => f,
                    None => (opcode == 1, Vec::new()),
                };
                data.extend_from_slice(&payload);
                if text {
                    // Invalid as soon as a fragment makes it so; a character cut at the end of
                    // a fragment waits for the next one, unless this is the last.
                    if let Err(e) = std::str::from_utf8(&data) {
                        if e.error_len().is_some() || fin {
                            fail!("invalid UTF-8 in text frame", fend);
                        }
                    }
                }
                if fin {
                    run.msgs.push((if text { RefMsg::Text(data) } else { RefMsg::Binary(data) }, fend));
                } else {
                    frag = Some((text, data));
                }
            }
        }
    }
}

/// One client frame as the reference encoder writes it.
#[derive(Debug, Clone)]
pub struct RefFrame {
    /// FIN, RSV and opcode bits.
    pub b0: u8,
    pub payload: Vec<u8>,
    /// `None`: not masked.
    pub mask: Option<[u8; 4]>,
    /// 0: the shortest length encoding; 1: 16-bit; 2: 64-bit; 3: 64-bit with the top bit set.
    pub length_form: u8,
}

/// The frame's wire bytes.
pub fn ref_encode(f: &RefFrame) -> Vec<u8> {
    let n = f.payload.len();
    let m = if f.mask.is_some() { 0x80 } else { 0 };
    let mut out = vec![f.b0];
    match (f.length_form, n) {
        (0, 0..=125) => out.push(m | n as u8),
        (0 | 1, 0..=0xffff) => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        (3, _) => {
            out.push(m | 127);
            out.extend_from_slice(&((n as u64) | 1 << 63).to_be_bytes());
        }
        _ => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match f.mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(f.payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => out.extend_from_slice(&f.payload),
    }
    out
}

/// Payloads worth trying: UTF-8 of every width, characters cut, invalid bytes, close payloads.
const WS_PIECES: &[&[u8]] = &[
    b"hello",
    "héllo wörld".as_bytes(),
    "日本語".as_bytes(),
    "🦀".as_bytes(),
    &[0xc3],
    &[0xa9],
    &[0xe6, 0x97],
    &[0xa5],
    &[0xf0, 0x9f],
    &[0xa6, 0x80],
    &[0xff],
    &[0xed, 0xa0, 0x80],
    &[0xc0, 0x80],
    &[0x03, 0xe8],
    &[0x03, 0xe8, b'b', b'y', b'e'],
    &[0x03, 0xed],
    &[0x0f, 0xa0],
    &[0x13, 0x88],
    &[0x03, 0xe8, 0xff],
    &[],
];

/// A frame, mostly a well-formed one, so the fuzzer reaches the rules behind the header.
pub fn arb_ref_frame(u: &mut Unstructured<'_>) -> Result<RefFrame> {
    let opcode = match u.int_in_range(0..=15u8)? {
        0..=3 => 0,
        4..=6 => 1,
        7..=8 => 2,
        9 => 8,
        10..=11 => 9,
        12 => 10,
        _ => u.int_in_range(0..=15)?,
    };
    let fin = if u.ratio(3, 4)? { 0x80 } else { 0 };
    let rsv = if u.ratio(1, 32)? { u.int_in_range(1..=7u8)? << 4 } else { 0 };
    let payload = match u.int_in_range(0..=7u8)? {
        0..=2 => {
            let n = u.int_in_range(0..=3usize)?;
            let mut p = Vec::new();
            for _ in 0..n {
                p.extend_from_slice(u.choose(WS_PIECES)?);
            }
            p
        }
        3..=5 => {
            let n = u.int_in_range(0..=200usize)?;
            u.bytes(n.min(u.len()))?.to_vec()
        }
        6 => vec![b'a'; u.int_in_range(120..=130usize)?],
        _ => {
            // Large: a pattern repeated, across the 16/64-bit length forms and the 64 KiB reserve.
            let n = u.int_in_range(0..=140_000usize)?;
            let pat = *u.choose(&[b'x', 0xff, 0x80])?;
            vec![pat; n]
        }
    };
    let mask = if u.ratio(31, 32)? { Some(u.arbitrary()?) } else { None };
    let length_form = if u.ratio(7, 8)? { 0 } else { u.int_in_range(1..=3)? };
    Ok(RefFrame {
        b0: fin | rsv | opcode,
        payload,
        mask,
        length_form,
    })
}
