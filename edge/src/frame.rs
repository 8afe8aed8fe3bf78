//! Server-to-client WebSocket frames, encoded once into [`Bytes`] that every recipient shares.
//!
//! Server frames are never masked (RFC 6455 §5.1), so the bytes of a channel message are the
//! same for every subscriber: the channel pump encodes header + payload once and each socket's
//! queue holds a reference-counted handle to them. The header layout comes from tungstenite's
//! [`FrameHeader`], the codec that also decodes what clients send.

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

fn encode(opcode: OpCode, parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    let mut out = BytesMut::with_capacity(header.len(len as u64) + len).writer();
    header
        .format(len as u64, &mut out)
        .expect("writing to memory cannot fail");
    let mut out = out.into_inner();
    for p in parts {
        out.extend_from_slice(p);
    }
    out.freeze()
}

/// A final text frame. The caller guarantees `payload` is UTF-8.
pub fn text(payload: &[u8]) -> Bytes {
    encode(OpCode::Data(Data::Text), &[payload])
}

/// A final binary frame.
pub fn binary(payload: &[u8]) -> Bytes {
    encode(OpCode::Data(Data::Binary), &[payload])
}

/// A ping with an empty payload.
pub fn ping() -> Bytes {
    encode(OpCode::Control(Control::Ping), &[])
}

/// The pong answering a ping with `payload` (at most 125 bytes, checked by the decoder).
pub fn pong(payload: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Pong), &[payload])
}

/// A close frame. The reason is cut at a character boundary to fit the 125-byte control
/// frame limit.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    encode(
        OpCode::Control(Control::Close),
        &[&code.to_be_bytes(), &reason.as_bytes()[..end]],
    )
}

/// Bytes of the frame header in front of a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes one server frame with tungstenite's own parser.
    fn parse(b: &[u8]) -> (FrameHeader, Vec<u8>) {
        let mut c = std::io::Cursor::new(b);
        let (h, len) = FrameHeader::parse(&mut c).unwrap().unwrap();
        let start = c.position() as usize;
        assert_eq!(start + len as usize, b.len(), "exactly one frame");
        assert_eq!(start, header_len(len as usize));
        (h, b[start..].to_vec())
    }

    #[test]
    fn frames_decode_with_tungstenite() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 200_000] {
            let payload = vec![b'x'; len];
            let (h, p) = parse(&text(&payload));
            assert!(h.is_final && h.mask.is_none());
            assert_eq!(h.opcode, OpCode::Data(Data::Text));
            assert_eq!(p, payload);
            let (h, _) = parse(&binary(&payload));
            assert_eq!(h.opcode, OpCode::Data(Data::Binary));
        }
        let (h, p) = parse(&pong(b"abc"));
        assert_eq!((h.opcode, p.as_slice()), (OpCode::Control(Control::Pong), &b"abc"[..]));
        let (h, p) = parse(&ping());
        assert_eq!((h.opcode, p.len()), (OpCode::Control(Control::Ping), 0));
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(100); // 200 bytes
        let b = close(4008, &long);
        let (h, p) = parse(&b);
        assert_eq!(h.opcode, OpCode::Control(Control::Close));
        assert!(p.len() <= 125);
        assert_eq!(u16::from_be_bytes([p[0], p[1]]), 4008);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }
}
