//! WebSocket client frames in, messages out (RFC 6455 §5), with no I/O.
//!
//! A [`Parser`] is fed the bytes read from a client socket, in any split, and hands out complete
//! messages: text, binary, ping, pong and close. `Ok(None)` means "need more bytes"; an
//! [`Error`] is final (the parser refuses everything after it) and [`Error::close`] gives the
//! close code and reason owed to the client.
//!
//! Memory per socket is what this module decides. Nothing is kept between frames: the caller
//! reads into a buffer of its own (on its stack) and feeds it; frames complete in that buffer
//! are parsed where they lie, and only the bytes of a frame that has not fully arrived (plus,
//! when a message is handed out mid-read, the rest of the read) are copied to the heap. That
//! memory is released as soon as the frame is complete. A header's length never reserves more
//! than [`RESERVE_MAX`] ahead: the buffer grows with what arrives. Payloads up to
//! [`COPY_MAX`] are copied out, so a small message kept by the bus never pins a large buffer;
//! the fragments of an unfinished message are unmasked straight into one buffer, and text is
//! checked for UTF-8 fragment by fragment.
//!
//! Every frame header is charged to a [`Budget`] the moment it is complete, before any rule is
//! applied to it, and exactly once: the edge's per-connection flood limits. A budget that runs
//! out ends parsing with [`Error::Flood`].
//!
//! Rules enforced (the close code owed): client frames must be masked, RSV bits clear, opcodes
//! known, a 64-bit length must have its top bit clear, control frames final and at most 125
//! bytes, continuations only inside a fragmented message and data frames only outside one,
//! close payloads of 0 or ≥ 2 bytes with an allowed code (1002); text and close reasons valid
//! UTF-8 (1007); frames and messages within the size limit, checked from the header before any
//! payload is read (1009); budgets (1008). Every rule on a frame is checked from its header,
//! except UTF-8 and close payloads, which need the payload.

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::close;

/// Most memory reserved ahead for a frame that has not fully arrived.
pub const RESERVE_MAX: usize = 64 << 10;
/// Payloads up to this size are copied out of the buffer they arrived in.
pub const COPY_MAX: usize = 4096;
/// The longest frame header: 2 bytes, a 64-bit length, a mask.
pub const MAX_HEADER: usize = 14;
/// The longest control-frame payload.
pub const MAX_CONTROL: usize = 125;

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

/// What a frame header is charged as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// The first (or only) frame of a message; also the reserved data opcodes 3–7.
    Data,
    /// A continuation frame (opcode 0).
    Continuation,
    /// Ping, pong, close; also the reserved control opcodes 11–15.
    Control,
}

impl FrameKind {
    /// The kind of a frame whose first header byte is `b0`.
    pub fn of(b0: u8) -> Self {
        match b0 & 0x0f {
            0 => FrameKind::Continuation,
            1..=7 => FrameKind::Data,
            _ => FrameKind::Control,
        }
    }
}

/// Which budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    /// Every frame: data, continuation and control.
    Frames,
    /// Control frames only.
    Control,
}

impl Flood {
    /// The close reason sent to the client.
    pub fn reason(self) -> &'static str {
        match self {
            Flood::Frames => "frame flood",
            Flood::Control => "control frame flood",
        }
    }

    /// The name metrics and logs use.
    pub fn label(self) -> &'static str {
        match self {
            Flood::Frames => "frame_flood",
            Flood::Control => "control_flood",
        }
    }
}

/// Charged once for every frame header, the moment it is complete.
pub trait Budget {
    fn charge(&mut self, kind: FrameKind) -> Result<(), Flood>;
}

/// No budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl Budget for Unlimited {
    fn charge(&mut self, _: FrameKind) -> Result<(), Flood> {
        Ok(())
    }
}

impl<F: FnMut(FrameKind) -> Result<(), Flood>> Budget for F {
    fn charge(&mut self, kind: FrameKind) -> Result<(), Flood> {
        self(kind)
    }
}

/// Why parsing stopped; [`Error::close`] gives the code and reason to close with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Error {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in text frame")]
    Utf8,
    #[error("frame too big")]
    FrameTooBig,
    #[error("message too big")]
    MessageTooBig,
    #[error("{}", .0.reason())]
    Flood(Flood),
}

impl Error {
    /// The close code and reason owed to the client.
    pub fn close(&self) -> (u16, &'static str) {
        match self {
            Error::Protocol(_) => (close::PROTOCOL_ERROR, "protocol error"),
            Error::Utf8 => (close::INVALID_PAYLOAD, "invalid UTF-8 in text frame"),
            Error::FrameTooBig => (close::TOO_BIG, "frame too big"),
            Error::MessageTooBig => (close::TOO_BIG, "message too big"),
            Error::Flood(f) => (close::POLICY, f.reason()),
        }
    }
}

/// Close codes a client may send (RFC 6455 §7.4, as tungstenite's `CloseCode::is_allowed`):
/// the defined ones except 1004–1006 and 1014–1015, plus 3000–4999.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

/// A fragmented message being assembled.
#[derive(Debug)]
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
    fn check_utf8(&mut self, fin: bool) -> Result<(), Error> {
        if !self.text {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            Err(e) if e.error_len().is_none() && !fin => self.checked += e.valid_up_to(),
            Err(_) => return Err(Error::Utf8),
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Continue,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

/// A frame header that has been read, charged and checked.
#[derive(Debug, Clone, Copy)]
struct Head {
    fin: bool,
    op: Op,
    mask: [u8; 4],
    /// Payload bytes (within the size limit, so a `usize`).
    len: usize,
}

/// What one step over the input did.
enum Step {
    Msg(Msg),
    /// A frame was consumed that completes no message (a fragment).
    Frame,
    /// The next frame has not fully arrived.
    More,
}

/// Client bytes in, messages out; see the module docs.
///
/// Call [`Parser::next`] until it returns `Ok(None)` before feeding more bytes: [`Parser::feed`]
/// returns only the first message the new bytes complete and keeps the rest.
#[derive(Debug)]
pub struct Parser {
    max: usize,
    /// Bytes fed and not yet consumed: the payload so far of the frame whose header is `head`,
    /// then whatever followed. Empty and unallocated between frames.
    buf: BytesMut,
    /// The frame whose header has been consumed (and charged) but whose payload is incomplete.
    head: Option<Head>,
    partial: Option<Box<Partial>>,
    failed: Option<Error>,
}

impl Parser {
    /// `max` bounds each frame and each message (payload bytes).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            buf: BytesMut::new(),
            head: None,
            partial: None,
            failed: None,
        }
    }

    /// Feeds bytes read from the socket; returns the first message they complete, or `None` if
    /// more bytes are needed. Bytes after that message are kept for [`Parser::next`].
    pub fn feed(&mut self, input: &[u8], budget: &mut impl Budget) -> Result<Option<Msg>, Error> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let r = if self.buf.is_empty() {
            self.feed_direct(input, budget)
        } else {
            self.buf.extend_from_slice(input);
            self.drain(budget)
        };
        r.inspect_err(|e| self.fail(*e))
    }

    /// The next message from the bytes already fed, or `None` if more bytes are needed.
    pub fn next(&mut self, budget: &mut impl Budget) -> Result<Option<Msg>, Error> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        self.drain(budget).inspect_err(|e| self.fail(*e))
    }

    /// Nothing is pending: no partial frame, no unfinished message (a clean place for the
    /// connection to end).
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.head.is_none() && self.partial.is_none()
    }

    /// Bytes held: unconsumed input and the fragments of an unfinished message.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.partial.as_ref().map_or(0, |p| p.data.len())
    }

    /// Heap bytes held by the buffers (their capacity).
    pub fn capacity(&self) -> usize {
        self.buf.capacity() + self.partial.as_ref().map_or(0, |p| p.data.capacity())
    }

    /// The error parsing stopped with, if it has.
    pub fn error(&self) -> Option<Error> {
        self.failed
    }

    fn fail(&mut self, e: Error) {
        self.failed = Some(e);
        self.buf = BytesMut::new();
        self.head = None;
        self.partial = None;
    }

    /// Frames straight out of `input` (nothing is buffered); what is left is kept.
    fn feed_direct(&mut self, mut input: &[u8], budget: &mut impl Budget) -> Result<Option<Msg>, Error> {
        loop {
            match self.step(&mut input, budget)? {
                Step::Frame => {}
                Step::Msg(m) => {
                    self.keep(input);
                    return Ok(Some(m));
                }
                Step::More => {
                    self.keep(input);
                    return Ok(None);
                }
            }
        }
    }

    /// Keeps what the caller's buffer still holds after [`Parser::feed_direct`]. `buf` is empty
    /// here but may hold a reservation for a payload that has now arrived: released if nothing
    /// is left, so nothing stays on the heap while idle.
    fn keep(&mut self, rest: &[u8]) {
        match self.head {
            None if rest.is_empty() => self.buf = BytesMut::new(),
            None => self.buf.extend_from_slice(rest),
            Some(h) => {
                self.buf.reserve(rest.len() + (h.len - rest.len()).min(RESERVE_MAX));
                self.buf.extend_from_slice(rest);
            }
        }
    }

    /// Frames out of `buf`.
    fn drain(&mut self, budget: &mut impl Budget) -> Result<Option<Msg>, Error> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = loop {
            match self.step(&mut buf, budget) {
                Ok(Step::Frame) => {}
                Ok(Step::Msg(m)) => break Ok(Some(m)),
                Ok(Step::More) => break Ok(None),
                Err(e) => break Err(e),
            }
        };
        if buf.is_empty() && self.head.is_none() {
            buf = BytesMut::new(); // release it while idle
        } else if let Some(h) = self.head {
            buf.reserve((h.len - buf.len()).min(RESERVE_MAX));
        }
        self.buf = buf;
        r
    }

    /// Consumes the next frame from `src` if it has fully arrived (its header, once complete,
    /// is charged, checked and consumed even if the payload has not arrived).
    fn step<I: Input>(&mut self, src: &mut I, budget: &mut impl Budget) -> Result<Step, Error> {
        let head = match self.head {
            Some(h) => h,
            None => {
                let Some((b0, len, mask, n)) = read_head(src.bytes()) else {
                    return Ok(Step::More);
                };
                budget.charge(FrameKind::of(b0)).map_err(Error::Flood)?;
                let h = self.check(b0, len, mask)?;
                src.advance(n);
                h
            }
        };
        if src.bytes().len() < head.len {
            self.head = Some(head);
            return Ok(Step::More);
        }
        self.head = None;
        let msg = self.on_frame(head, src)?;
        if head.len > COPY_MAX {
            src.after_large_frame();
        }
        Ok(match msg {
            Some(m) => Step::Msg(m),
            None => Step::Frame,
        })
    }

    /// The header rules and the size limits, in the order the error is reported.
    fn check(&self, b0: u8, len: u64, mask: Option<[u8; 4]>) -> Result<Head, Error> {
        let op = match b0 & 0x0f {
            0 => Op::Continue,
            1 => Op::Text,
            2 => Op::Binary,
            8 => Op::Close,
            9 => Op::Ping,
            10 => Op::Pong,
            _ => return Err(Error::Protocol("reserved opcode")),
        };
        if len >> 63 != 0 {
            return Err(Error::Protocol("frame length with the most significant bit set"));
        }
        if b0 & 0x70 != 0 {
            return Err(Error::Protocol("reserved bits set without an extension"));
        }
        let Some(mask) = mask else {
            return Err(Error::Protocol("client frame not masked"));
        };
        let fin = b0 & 0x80 != 0;
        if matches!(op, Op::Close | Op::Ping | Op::Pong) {
            if len > MAX_CONTROL as u64 {
                return Err(Error::Protocol("control frame over 125 bytes"));
            }
            if !fin {
                return Err(Error::Protocol("fragmented control frame"));
            }
        } else {
            let so_far = self.partial.as_ref().map(|p| p.data.len());
            match (op, so_far) {
                (Op::Continue, Some(n)) if len > self.max.saturating_sub(n) as u64 => {
                    return Err(Error::MessageTooBig);
                }
                _ if len > self.max as u64 => return Err(Error::FrameTooBig),
                _ => {}
            }
            match (op, so_far) {
                (Op::Continue, None) => {
                    return Err(Error::Protocol("continuation outside a fragmented message"));
                }
                (Op::Text | Op::Binary, Some(_)) => {
                    return Err(Error::Protocol("new message inside a fragmented message"));
                }
                _ => {}
            }
        }
        Ok(Head {
            fin,
            op,
            mask,
            len: len as usize,
        })
    }

    /// Applies the message rules to a frame whose payload is at the front of `src`; `None`
    /// when it only continued a message.
    fn on_frame<I: Input>(&mut self, h: Head, src: &mut I) -> Result<Option<Msg>, Error> {
        match h.op {
            Op::Ping => {
                let mut p = src.take(h.len);
                unmask(&mut p, h.mask);
                Ok(Some(Msg::Ping(p.freeze())))
            }
            Op::Pong => {
                src.advance(h.len);
                Ok(Some(Msg::Pong))
            }
            Op::Close => {
                let mut p = [0u8; MAX_CONTROL];
                let p = &mut p[..h.len];
                p.copy_from_slice(&src.bytes()[..h.len]);
                src.advance(h.len);
                unmask(p, h.mask);
                close_message(p).map(Some)
            }
            Op::Text | Op::Binary if h.fin => {
                let mut p = src.take(h.len);
                unmask(&mut p, h.mask);
                message(h.op == Op::Text, p.freeze()).map(Some)
            }
            Op::Text | Op::Binary => {
                let mut p = Box::new(Partial {
                    text: h.op == Op::Text,
                    data: BytesMut::new(),
                    checked: 0,
                });
                unmask_onto(&mut p.data, src, h);
                p.check_utf8(false)?;
                self.partial = Some(p);
                Ok(None)
            }
            Op::Continue => {
                let p = self.partial.as_mut().expect("checked from the header");
                unmask_onto(&mut p.data, src, h);
                p.check_utf8(h.fin)?;
                if !h.fin {
                    return Ok(None);
                }
                let p = self.partial.take().expect("checked from the header");
                Ok(Some(if p.text {
                    Msg::Text(p.data.freeze())
                } else {
                    Msg::Binary(p.data.freeze())
                }))
            }
        }
    }
}

mod input;

/// A client frame as a client writes it: first byte `b0` (FIN, RSV and opcode bits), then the
/// length, the mask and the payload masked with it. For clients and tests (the edge only
/// decodes): the one builder of masked frames in the workspace.
pub fn encode_client_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MAX_HEADER + payload.len());
    f.push(b0);
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
    let start = f.len();
    f.extend_from_slice(payload);
    unmask(&mut f[start..], mask);
    f
}

pub use input::unmask;
use input::{close_message, message, read_head, unmask_onto, Input};

#[cfg(test)]
mod tests;
