//! WebSocket client frames: a whole-input reference decoder and a reference encoder.

use arbitrary::{Result, Unstructured};

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
                    run.msgs
                        .push((if text { RefMsg::Text(data) } else { RefMsg::Binary(data) }, fend));
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
    let rsv = if u.ratio(1, 32)? {
        u.int_in_range(1..=7u8)? << 4
    } else {
        0
    };
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
