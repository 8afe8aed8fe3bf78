//! The parser's byte sources and the small pure steps it takes on them: reading a header,
//! unmasking a payload, turning a payload into a message.

use super::{close_code_allowed, Error, Head, Msg, COPY_MAX};
use bytes::{Buf, Bytes, BytesMut};

/// Where frames are read from: the caller's buffer, or the parser's own.
pub(super) trait Input {
    fn bytes(&self) -> &[u8];
    fn advance(&mut self, n: usize);
    /// The next `n` bytes, owned: copied when small (or borrowed), split off when large.
    fn take(&mut self, n: usize) -> BytesMut;
    /// A large frame has just been consumed from the front.
    fn after_large_frame(&mut self) {}
}

impl Input for &[u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn advance(&mut self, n: usize) {
        *self = &self[n..];
    }
    fn take(&mut self, n: usize) -> BytesMut {
        let p = BytesMut::from(&self[..n]);
        *self = &self[n..];
        p
    }
}

impl Input for BytesMut {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn advance(&mut self, n: usize) {
        Buf::advance(self, n);
    }
    fn take(&mut self, n: usize) -> BytesMut {
        if n <= COPY_MAX {
            let p = BytesMut::from(&self[..n]);
            Buf::advance(self, n);
            p
        } else {
            self.split_to(n)
        }
    }
    /// The few bytes after a large frame (what arrived with its end) move to a buffer of their
    /// own: left in the frame's allocation, they would keep it alive once the message is
    /// dropped, and grow back into all of it (past the 64 KiB reserve) for the next frame.
    fn after_large_frame(&mut self) {
        if !self.is_empty() {
            *self = BytesMut::from(&self[..]);
        }
    }
}

/// The header at the front of `b`: its first byte, payload length, mask and length in bytes;
/// `None` until all of it has arrived.
pub(super) fn read_head(b: &[u8]) -> Option<(u8, u64, Option<[u8; 4]>, usize)> {
    let [b0, b1, ..] = *b else { return None };
    let (len, mut n) = match b1 & 0x7f {
        126 => (u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as u64, 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
        l => (l as u64, 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let m: [u8; 4] = b.get(n..n + 4)?.try_into().ok()?;
        n += 4;
        Some(m)
    } else {
        None
    };
    Some((b0, len, mask, n))
}

pub(super) fn message(text: bool, data: Bytes) -> Result<Msg, Error> {
    if text {
        std::str::from_utf8(&data).map_err(|_| Error::Utf8)?;
        Ok(Msg::Text(data))
    } else {
        Ok(Msg::Binary(data))
    }
}

pub(super) fn close_message(payload: &[u8]) -> Result<Msg, Error> {
    match payload {
        [] => Ok(Msg::Close(None)),
        [_] => Err(Error::Protocol("close payload of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !close_code_allowed(code) {
                return Err(Error::Protocol("close code not allowed"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| Error::Utf8)?;
            Ok(Msg::Close(Some((code, reason.to_owned()))))
        }
    }
}

/// Appends the frame's payload from `src` to `dst`, unmasked.
pub(super) fn unmask_onto<I: Input>(dst: &mut BytesMut, src: &mut I, h: Head) {
    let start = dst.len();
    dst.extend_from_slice(&src.bytes()[..h.len]);
    src.advance(h.len);
    unmask(&mut dst[start..], h.mask);
}

/// XORs `data` with the mask (a whole frame's payload: the mask starts at its first byte).
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
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
