//! Client frames in, messages out (RFC 6455 §5), with no per-socket buffer while the socket is
//! idle: a thin I/O shell over [`switchyard_protocol::ws::Parser`], which holds the rules, the
//! memory policy and the flood budgets' charging.
//!
//! tungstenite's own reader keeps a read buffer (1 KiB here) and a ~0.5 KiB context for every
//! socket for its whole life. Here each read goes into a stack buffer inside one poll and is fed
//! to the parser, which parses the frames complete in it where they lie; only the bytes of a
//! frame that has not fully arrived (and the fragments of an unfinished message) are kept on
//! the heap, and that memory is released as soon as the frame or message is complete.
//!
//! Every frame header is charged to the socket's [`Budget`] (the edge's is
//! [`crate::limits::FloodBudget`]) when it is complete. When a budget runs out the decoder
//! returns [`DecodeError::Frame`] with [`ws::Error::Flood`] once and then reads nothing more
//! from the socket (it stays pending): the session closes with 1008 and ends after its close
//! timeout. The rules and the close codes they earn are listed in [`switchyard_protocol::ws`].

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use switchyard_protocol::ws::{self, Budget, Parser, Unlimited};
use tokio::io::{AsyncRead, ReadBuf};

pub use switchyard_protocol::ws::Msg;

/// Bytes read from the socket per poll (on the stack, never kept).
const READ_CHUNK: usize = 4096;

/// Why reading stopped; [`DecodeError::close`] gives the code and reason to close with.
#[derive(Debug)]
pub enum DecodeError {
    /// The client's bytes broke a rule, or a flood budget ran out.
    Frame(ws::Error),
    Io(io::Error),
}

impl DecodeError {
    /// The close code and reason owed to the client (1006: the socket failed, send nothing).
    pub fn close(&self) -> (u16, &'static str) {
        match self {
            DecodeError::Frame(e) => e.close(),
            DecodeError::Io(_) => (1006, "connection error"),
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Frame(e) => e.fmt(f),
            DecodeError::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

/// The reading half of a WebSocket server connection, charging frames to `B`.
pub struct Decoder<R, B = Unlimited> {
    io: R,
    parser: Parser,
    budget: B,
    eof: bool,
    /// The parser failed: nothing more is read.
    stopped: bool,
}

impl<R: AsyncRead + Unpin> Decoder<R> {
    /// `max` bounds each frame and each message (payload bytes); no flood budget.
    pub fn new(io: R, max: usize) -> Self {
        Self::with_budget(io, max, Unlimited)
    }
}

impl<R: AsyncRead + Unpin, B: Budget> Decoder<R, B> {
    /// `max` bounds each frame and each message (payload bytes); every frame header is charged
    /// to `budget`.
    pub fn with_budget(io: R, max: usize, budget: B) -> Self {
        Self {
            io,
            parser: Parser::new(max),
            budget,
            eof: false,
            stopped: false,
        }
    }

    /// The next message; `None` once the client closed the TCP connection.
    pub async fn next(&mut self) -> Option<Result<Msg, DecodeError>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Decoder::next`], polled. After an error from the parser (a flood included) it stays
    /// pending without reading: the socket is no longer polled for input.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Msg, DecodeError>>> {
        if self.stopped {
            return Poll::Pending;
        }
        // A message already complete in what was read?
        let mut got = self.parser.next(&mut self.budget);
        loop {
            match got {
                Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                Err(e) => {
                    self.stopped = true;
                    return Poll::Ready(Some(Err(DecodeError::Frame(e))));
                }
                Ok(None) => {}
            }
            if self.eof {
                return Poll::Ready(None);
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            if let Err(e) = ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb)) {
                return Poll::Ready(Some(Err(DecodeError::Io(e))));
            }
            let read = rb.filled();
            if read.is_empty() {
                self.eof = true;
                if !self.parser.is_idle() {
                    return Poll::Ready(Some(Err(DecodeError::Io(io::ErrorKind::UnexpectedEof.into()))));
                }
                return Poll::Ready(None);
            }
            got = self.parser.feed(read, &mut self.budget);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{FloodBudget, FrameLimits};
    use bytes::Bytes;
    use tokio::io::AsyncWriteExt;

    /// A masked client frame (first byte `b0`: FIN, RSV and opcode bits).
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        switchyard_protocol::ws::encode_client_frame(b0, payload, [0x37, 0xfa, 0x21, 0x3d])
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
                [frame(0x01, b"a"), frame(0x80, &[0xc3])].concat(),
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
    fn close_codes_allowed_as_tungstenite_allows_them() {
        use tungstenite::protocol::frame::coding::CloseCode;
        for code in 0..=u16::MAX {
            assert_eq!(
                ws::close_code_allowed(code),
                CloseCode::from(code).is_allowed(),
                "{code}"
            );
        }
    }

    fn flood_decoder(limits: FrameLimits) -> (tokio::io::DuplexStream, Decoder<tokio::io::DuplexStream, FloodBudget>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        (client, Decoder::with_budget(server, 1 << 20, FloodBudget::new(limits)))
    }

    #[tokio::test]
    async fn a_continuation_flood_trips_the_frame_budget_and_reading_stops() {
        let (mut client, mut d) = flood_decoder(FrameLimits {
            frames_per_second: 100,
            control_per_second: 10,
        });
        let mut wire = frame(0x01, b"x"); // first fragment, not final
        for _ in 0..1000 {
            wire.extend(frame(0x00, b""));
        }
        client.write_all(&wire).await.unwrap();
        match d.next().await {
            Some(Err(e @ DecodeError::Frame(ws::Error::Flood(ws::Flood::Frames)))) => {
                assert_eq!(e.close(), (1008, "frame flood"));
            }
            other => panic!("{other:?}"),
        }
        client.write_all(&frame(0x81, b"after")).await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(200), d.next()).await;
        assert!(r.is_err(), "reading must stop once tripped");
    }

    #[tokio::test]
    async fn a_ping_flood_trips_the_control_budget() {
        let (mut client, mut d) = flood_decoder(FrameLimits::default());
        let wire: Vec<u8> = (0..101).flat_map(|_| frame(0x89, b"")).collect();
        client.write_all(&wire).await.unwrap();
        for _ in 0..100 {
            assert!(matches!(d.next().await, Some(Ok(Msg::Ping(_)))));
        }
        match d.next().await {
            Some(Err(e @ DecodeError::Frame(ws::Error::Flood(ws::Flood::Control)))) => {
                assert_eq!(e.close(), (1008, "control frame flood"));
            }
            other => panic!("{other:?}"),
        }
    }
}
