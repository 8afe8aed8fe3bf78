//! Client frames in, messages out (RFC 6455 §5), with no per-socket buffer while the socket is
//! idle.
//!
//! Frame headers are parsed by tungstenite's [`FrameHeader`] and close codes checked with its
//! [`CloseCode`]; what this module adds is the part that decides memory per socket. tungstenite's
//! own reader keeps a read buffer (1 KiB here) and a ~0.5 KiB context for every socket for its
//! whole life. Here each read goes into a stack buffer inside one poll; only the bytes of a
//! frame that has not fully arrived (and the fragments of an unfinished message) are kept on
//! the heap, and that memory is released as soon as the frame or message is complete.
//!
//! Rules enforced (the close code the session then sends): client frames must be masked, RSV
//! bits clear, opcodes known, control frames final and at most 125 bytes, continuations only
//! inside a fragmented message and data frames only outside one, close payloads of 0 or ≥ 2
//! bytes with an allowed code (1002); text and close reasons valid UTF-8 (1007); frames and
//! messages within the route's size limit, checked from the header before any payload is
//! read (1009).

use bytes::{Buf, Bytes, BytesMut};
use std::io::{self, Cursor};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Bytes read from the socket per poll (on the stack, never kept).
const READ_CHUNK: usize = 4096;
/// Most memory reserved ahead for a frame that has not fully arrived: the buffer grows with
/// what arrives, not with what a header claims.
const RESERVE_MAX: usize = 64 << 10;
/// Payloads up to this size are copied out of the read buffer, so a small message kept by the
/// bus never pins a large buffer.
const COPY_MAX: usize = 4096;

/// A complete client message or control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close: its code and reason, if it sent a code.
    Close(Option<(u16, String)>),
}

/// Why reading stopped; [`DecodeError::close`] gives the code and reason to close with.
#[derive(Debug)]
pub enum DecodeError {
    Protocol(&'static str),
    Utf8,
    FrameTooBig,
    MessageTooBig,
    Io(io::Error),
}

impl DecodeError {
    /// The close code and reason owed to the client (1006: the socket failed, send nothing).
    pub fn close(&self) -> (u16, &'static str) {
        match self {
            DecodeError::Protocol(_) => (1002, "protocol error"),
            DecodeError::Utf8 => (1007, "invalid UTF-8 in text frame"),
            DecodeError::FrameTooBig => (1009, "frame too big"),
            DecodeError::MessageTooBig => (1009, "message too big"),
            DecodeError::Io(_) => (1006, "connection error"),
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Protocol(why) => write!(f, "protocol error: {why}"),
            DecodeError::Io(e) => write!(f, "read failed: {e}"),
            other => f.write_str(other.close().1),
        }
    }
}

/// A fragmented message being assembled.
struct Partial {
    text: bool,
    data: BytesMut,
    /// Bytes of a text message already known to be valid UTF-8 (a prefix ending on a char
    /// boundary), so each fragment is checked once and invalid text fails fast.
    checked: usize,
}

impl Partial {
    /// Checks what arrived since the last fragment; a character cut at the end is fine unless
    /// this is the final fragment.
    fn check_utf8(&mut self, fin: bool) -> Result<(), DecodeError> {
        if !self.text {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            Err(e) if e.error_len().is_none() && !fin => self.checked += e.valid_up_to(),
            Err(_) => return Err(DecodeError::Utf8),
        }
        Ok(())
    }
}

/// The reading half of a WebSocket server connection.
pub struct Decoder<R> {
    io: R,
    /// Bytes of a frame that has not fully arrived (empty, unallocated, between frames).
    pending: BytesMut,
    partial: Option<Box<Partial>>,
    max: usize,
    eof: bool,
}

/// A frame parsed out of the input.
struct Frame {
    header: FrameHeader,
    payload: Bytes,
}

impl<R: AsyncRead + Unpin> Decoder<R> {
    /// `max` bounds each frame and each message (payload bytes).
    pub fn new(io: R, max: usize) -> Self {
        Self {
            io,
            pending: BytesMut::new(),
            partial: None,
            max,
            eof: false,
        }
    }

    /// The next message; `None` once the client closed the TCP connection.
    pub async fn next(&mut self) -> Option<Result<Msg, DecodeError>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Decoder::next`], polled.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Msg, DecodeError>>> {
        loop {
            // A frame already complete in `pending`?
            if !self.pending.is_empty() {
                let partial = self.partial.as_ref().map(|p| p.data.len());
                match parse(&mut self.pending, self.max, partial) {
                    Err(e) => return Poll::Ready(Some(Err(e))),
                    Ok(Some(frame)) => {
                        if self.pending.is_empty() {
                            self.pending = BytesMut::new(); // release it while idle
                        }
                        match self.on_frame(frame) {
                            Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                            Ok(None) => continue,
                            Err(e) => return Poll::Ready(Some(Err(e))),
                        }
                    }
                    Ok(None) => {}
                }
            }
            if self.eof {
                return Poll::Ready(None);
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            if let Err(e) = ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb)) {
                return Poll::Ready(Some(Err(DecodeError::Io(e))));
            }
            let got = rb.filled();
            if got.is_empty() {
                self.eof = true;
                if !self.pending.is_empty() || self.partial.is_some() {
                    return Poll::Ready(Some(Err(DecodeError::Io(io::ErrorKind::UnexpectedEof.into()))));
                }
                return Poll::Ready(None);
            }
            self.pending.extend_from_slice(got);
        }
    }

    /// Applies the message rules to one frame; `Ok(None)` when it only continued a message.
    fn on_frame(&mut self, f: Frame) -> Result<Option<Msg>, DecodeError> {
        let h = &f.header;
        match h.opcode {
            OpCode::Control(c) => {
                if !h.is_final {
                    return Err(DecodeError::Protocol("fragmented control frame"));
                }
                match c {
                    Control::Ping => Ok(Some(Msg::Ping(f.payload))),
                    Control::Pong => Ok(Some(Msg::Pong)),
                    Control::Close => close(&f.payload).map(Some),
                    Control::Reserved(_) => Err(DecodeError::Protocol("reserved opcode")),
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some(p) = self.partial.as_mut() else {
                    return Err(DecodeError::Protocol("continuation outside a fragmented message"));
                };
                if p.data.len() + f.payload.len() > self.max {
                    return Err(DecodeError::MessageTooBig);
                }
                p.data.extend_from_slice(&f.payload);
                p.check_utf8(h.is_final)?;
                if !h.is_final {
                    return Ok(None);
                }
                let p = self.partial.take().expect("checked above");
                Ok(Some(if p.text {
                    Msg::Text(p.data.freeze())
                } else {
                    Msg::Binary(p.data.freeze())
                }))
            }
            OpCode::Data(d) => {
                let text = match d {
                    Data::Text => true,
                    Data::Binary => false,
                    _ => return Err(DecodeError::Protocol("reserved opcode")),
                };
                if self.partial.is_some() {
                    return Err(DecodeError::Protocol("new message inside a fragmented message"));
                }
                if h.is_final {
                    return message(text, f.payload).map(Some);
                }
                let mut p = Box::new(Partial {
                    text,
                    data: BytesMut::from(&f.payload[..]),
                    checked: 0,
                });
                p.check_utf8(false)?;
                self.partial = Some(p);
                Ok(None)
            }
        }
    }
}

fn message(text: bool, data: Bytes) -> Result<Msg, DecodeError> {
    if !text {
        return Ok(Msg::Binary(data));
    }
    std::str::from_utf8(&data).map_err(|_| DecodeError::Utf8)?;
    Ok(Msg::Text(data))
}

fn close(payload: &[u8]) -> Result<Msg, DecodeError> {
    match payload {
        [] => Ok(Msg::Close(None)),
        [_] => Err(DecodeError::Protocol("close payload of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !CloseCode::from(code).is_allowed() {
                return Err(DecodeError::Protocol("close code not allowed"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| DecodeError::Utf8)?;
            Ok(Msg::Close(Some((code, reason.to_owned()))))
        }
    }
}

/// Takes one complete frame off the front of `buf` (unmasked), or `None` if it has not fully
/// arrived. Header rules, and the size limits (`partial`: bytes of the fragmented message so
/// far), are checked as soon as the header is complete.
fn parse(buf: &mut BytesMut, max: usize, partial: Option<usize>) -> Result<Option<Frame>, DecodeError> {
    let mut cur = Cursor::new(&buf[..]);
    let (header, len) = match FrameHeader::parse(&mut cur) {
        Ok(Some(x)) => x,
        Ok(None) => return Ok(None),
        Err(_) => return Err(DecodeError::Protocol("reserved opcode")),
    };
    if len >> 63 != 0 {
        return Err(DecodeError::Protocol("frame length with the most significant bit set"));
    }
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(DecodeError::Protocol("reserved bits set without an extension"));
    }
    let Some(mask) = header.mask else {
        return Err(DecodeError::Protocol("client frame not masked"));
    };
    match (header.opcode, partial) {
        (OpCode::Control(_), _) if len > 125 => {
            return Err(DecodeError::Protocol("control frame over 125 bytes"));
        }
        (OpCode::Control(_), _) => {}
        (OpCode::Data(Data::Continue), Some(so_far)) if len > max.saturating_sub(so_far) as u64 => {
            return Err(DecodeError::MessageTooBig);
        }
        _ if len > max as u64 => return Err(DecodeError::FrameTooBig),
        _ => {}
    }
    let start = cur.position() as usize;
    let len = len as usize;
    if buf.len() < start + len {
        buf.reserve((start + len - buf.len()).min(RESERVE_MAX));
        return Ok(None);
    }
    buf.advance(start);
    let mut payload = if len <= COPY_MAX {
        let p = BytesMut::from(&buf[..len]);
        buf.advance(len);
        p
    } else {
        buf.split_to(len)
    };
    unmask(&mut payload, mask);
    Ok(Some(Frame {
        header,
        payload: payload.freeze(),
    }))
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ m;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A masked client frame (first byte `b0`: FIN, RSV and opcode bits); also used by the
    /// frame guard's tests.
    pub(crate) fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![b0];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Feeds `wire` in chunks of `chunk` bytes and collects everything decoded.
    async fn decode(wire: &[u8], chunk: usize, max: usize) -> Vec<Result<Msg, String>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let wire = wire.to_vec();
        let w = tokio::spawn(async move {
            for c in wire.chunks(chunk) {
                client.write_all(c).await.unwrap();
            }
        });
        let mut d = Decoder::new(server, max);
        let mut out = Vec::new();
        while let Some(r) = d.next().await {
            let stop = r.is_err();
            out.push(r.map_err(|e| e.to_string()));
            if stop {
                break;
            }
        }
        w.await.unwrap();
        out
    }

    #[tokio::test]
    async fn messages_fragments_and_controls_in_any_split() {
        let mut wire = frame(0x81, b"hello");
        wire.extend(frame(0x02, b"ab")); // binary, not final
        wire.extend(frame(0x89, b"p")); // ping between fragments
        wire.extend(frame(0x00, b"cd"));
        wire.extend(frame(0x80, b"ef")); // final continuation
        wire.extend(frame(0x82, &vec![9u8; 70_000]));
        wire.extend(frame(0x8a, b""));
        wire.extend(frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']));
        for chunk in [1, 3, 7, 4096, wire.len()] {
            let got = decode(&wire, chunk, 1 << 20).await;
            assert_eq!(
                got,
                vec![
                    Ok(Msg::Text(Bytes::from_static(b"hello"))),
                    Ok(Msg::Ping(Bytes::from_static(b"p"))),
                    Ok(Msg::Binary(Bytes::from_static(b"abcdef"))),
                    Ok(Msg::Binary(Bytes::from(vec![9u8; 70_000]))),
                    Ok(Msg::Pong),
                    Ok(Msg::Close(Some((1000, "bye".into())))),
                ],
                "chunk {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn violations_get_their_close_codes() {
        let code = |r: &Result<Msg, String>| r.clone().err();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x81, 0x01, b'x'], "protocol error: client frame not masked"),
            (
                frame(0xc1, b"x"),
                "protocol error: reserved bits set without an extension",
            ),
            (frame(0x83, b"x"), "protocol error: reserved opcode"),
            (frame(0x8b, b"x"), "protocol error: reserved opcode"),
            (frame(0x09, b"x"), "protocol error: fragmented control frame"),
            (frame(0x89, &[0u8; 126]), "protocol error: control frame over 125 bytes"),
            (
                frame(0x80, b"x"),
                "protocol error: continuation outside a fragmented message",
            ),
            (
                [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
                "protocol error: new message inside a fragmented message",
            ),
            (frame(0x88, &[3]), "protocol error: close payload of one byte"),
            (
                frame(0x88, &1005u16.to_be_bytes()),
                "protocol error: close code not allowed",
            ),
            (frame(0x81, &[0xff, 0xfe]), "invalid UTF-8 in text frame"),
            // Fails at the first fragment, without waiting for the message to end.
            (frame(0x01, &[b'a', 0xff]), "invalid UTF-8 in text frame"),
            // A character cut between fragments is fine; one never finished is not.
            ([frame(0x01, &[0xc3]), frame(0x80, &[0xa9])].concat(), "none"),
            (
                [frame(0x01, &[b'a']), frame(0x80, &[0xc3])].concat(),
                "invalid UTF-8 in text frame",
            ),
            (frame(0x88, &[0x03, 0xe8, 0xff]), "invalid UTF-8 in text frame"),
            (frame(0x82, &[0u8; 101]), "frame too big"),
            // The message limit applies from the continuation's header.
            (
                [frame(0x02, &[0u8; 60]), frame(0x80, &[0u8; 60])[..8].to_vec()].concat(),
                "message too big",
            ),
            (
                [
                    vec![0x82, 0xff],
                    (1u64 << 63 | 5).to_be_bytes().to_vec(),
                    vec![1, 2, 3, 4],
                ]
                .concat(),
                "protocol error: frame length with the most significant bit set",
            ),
            (
                [frame(0x02, &[0u8; 60]), frame(0x80, &[0u8; 60])].concat(),
                "message too big",
            ),
        ];
        for (wire, want) in cases {
            let got = decode(&wire, 5, 100).await;
            let last = got.last().and_then(code);
            assert_eq!(last.as_deref().unwrap_or("none"), want, "{wire:x?}");
        }
    }

    #[tokio::test]
    async fn a_frame_cut_by_eof_is_an_error_and_a_clean_eof_is_the_end() {
        let got = decode(&frame(0x81, b"hello")[..4], 1, 100).await;
        assert!(matches!(got.as_slice(), [Err(e)] if e.contains("read failed")));
        assert!(decode(&[], 1, 100).await.is_empty());
    }

    #[test]
    fn no_buffer_is_kept_between_frames() {
        let mut buf = BytesMut::from(&frame(0x81, b"hi")[..]);
        let f = parse(&mut buf, 100, None).unwrap().unwrap();
        assert_eq!(&f.payload[..], b"hi");
        assert!(buf.is_empty());
    }
}
