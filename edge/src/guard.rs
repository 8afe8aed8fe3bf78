//! Frame-flood guard: sits between the upgraded socket and the WebSocket codec, reads the frame
//! headers as they stream past (without copying or changing a byte) and charges every frame to
//! a per-connection budget. Empty continuation frames and pings never surface as messages, so
//! this is the only place they can be counted.
//!
//! When a budget is exhausted the guard stops reading (returns `Pending` without registering a
//! waker: the socket is no longer polled for input) and raises [`Tripped`]. The guard runs
//! inside the session task's own read, so the session sees the trip when that read returns; it
//! then closes with 1008 and ends after its close timeout.

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::io;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-connection frame budgets (frames per second; the burst equals the rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct FrameLimits {
    /// Frames per second per socket, any kind incl. continuation (past it: close 1008)
    #[arg(
        long = "max-frames-per-second",
        env = "SWITCHYARD_MAX_FRAMES_PER_SECOND",
        default_value_t = 20_000,
        global = true
    )]
    pub frames_per_second: u32,
    /// Control frames (ping, pong, close) per second per socket (past it: close 1008)
    #[arg(
        long = "max-control-frames-per-second",
        env = "SWITCHYARD_MAX_CONTROL_FRAMES_PER_SECOND",
        default_value_t = 100,
        global = true
    )]
    pub control_per_second: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        switchyard_bus::flag_defaults()
    }
}

/// Which budget ran out, set once.
#[derive(Default)]
pub struct Tripped {
    which: std::sync::OnceLock<&'static str>,
}

impl Tripped {
    /// `"frame_flood"` or `"control_flood"` once tripped.
    pub fn reason(&self) -> Option<&'static str> {
        self.which.get().copied()
    }

    fn trip(&self, why: &'static str) {
        let _ = self.which.set(why);
    }
}

/// Incremental WebSocket frame-header scanner (RFC 6455 §5.2). Feeds on raw bytes in any split;
/// yields each frame's opcode when its header is complete.
#[derive(Debug, Default)]
pub struct FrameScanner {
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
}

impl FrameScanner {
    /// Header length once the first two bytes are known.
    fn header_len(b1: u8) -> usize {
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
    }

    /// Scans `data`, calling `on_frame(opcode)` for every frame header completed in it.
    pub fn feed(&mut self, mut data: &[u8], mut on_frame: impl FnMut(u8)) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let need = if self.have < 2 {
                2
            } else {
                Self::header_len(self.header[1])
            };
            let n = (need - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < 2 || self.have < Self::header_len(self.header[1]) {
                continue;
            }
            let len = match self.header[1] & 0x7f {
                126 => u16::from_be_bytes([self.header[2], self.header[3]]) as u64,
                127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
                l => l as u64,
            };
            on_frame(self.header[0] & 0x0f);
            self.have = 0;
            self.skip = len;
        }
    }
}

/// The guarded socket.
pub struct Guarded<S> {
    inner: S,
    scanner: FrameScanner,
    all: DefaultDirectRateLimiter,
    control: DefaultDirectRateLimiter,
    tripped: Arc<Tripped>,
}

/// The process's one clock for rate limiters. A new `quanta` clock calibrates itself with
/// CPUID, which is slow (a VM exit under virtualisation): once per process, not per socket.
pub fn clock() -> governor::clock::QuantaClock {
    static CLOCK: std::sync::OnceLock<governor::clock::QuantaClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(Default::default).clone()
}

/// A per-connection (unkeyed) rate limiter on the shared clock.
pub fn direct_limiter(quota: Quota) -> DefaultDirectRateLimiter {
    RateLimiter::direct_with_clock(quota, clock())
}

fn limiter(per_second: u32) -> DefaultDirectRateLimiter {
    let n = NonZeroU32::new(per_second.max(1)).expect("non-zero");
    direct_limiter(Quota::per_second(n).allow_burst(n))
}

impl<S> Guarded<S> {
    pub fn new(inner: S, limits: FrameLimits) -> (Self, Arc<Tripped>) {
        let tripped = Arc::new(Tripped::default());
        (
            Self {
                inner,
                scanner: FrameScanner::default(),
                all: limiter(limits.frames_per_second),
                control: limiter(limits.control_per_second),
                tripped: tripped.clone(),
            },
            tripped,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.tripped.reason().is_some() {
            // Stop reading: the session closes this socket.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let (all, control, tripped) = (&this.all, &this.control, &this.tripped);
            this.scanner.feed(&buf.filled()[before..], |op| {
                if tripped.reason().is_some() {
                    return;
                }
                if all.check().is_err() {
                    tripped.trip("frame_flood");
                } else if op >= 8 && control.check().is_err() {
                    tripped.trip("control_flood");
                }
            });
            if this.tripped.reason().is_some() {
                // Hand over nothing more: frames in this read past the budget are not decoded.
                buf.set_filled(before);
                return Poll::Pending;
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: FIN + opcode, masked, with `len` payload bytes.
    fn frame(op: u8, len: usize) -> Vec<u8> {
        crate::decode::tests::frame(0x80 | op, &vec![0u8; len])
    }

    #[test]
    fn counts_frames_in_any_split() {
        let mut wire = Vec::new();
        let ops = [1u8, 0, 0, 9, 2, 10, 8];
        let lens = [0usize, 5, 125, 126, 70_000, 3, 2];
        for (op, len) in ops.iter().zip(lens) {
            wire.extend(frame(*op, len));
        }
        for chunk in [1usize, 2, 3, 7, 13, 4096, wire.len()] {
            let mut s = FrameScanner::default();
            let mut seen = Vec::new();
            for c in wire.chunks(chunk) {
                s.feed(c, |op| seen.push(op));
            }
            assert_eq!(seen, ops, "chunk size {chunk}");
        }
    }

    #[tokio::test]
    async fn a_continuation_flood_trips_the_frame_budget() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (mut g, tripped) = Guarded::new(
            server,
            FrameLimits {
                frames_per_second: 100,
                control_per_second: 10,
            },
        );
        let mut wire = frame(1, 1);
        wire[0] &= 0x7f; // first fragment, not final
        for _ in 0..1000 {
            let mut c = frame(0, 0);
            c[0] &= 0x7f;
            wire.extend(c);
        }
        client.write_all(&wire).await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let r = tokio::time::timeout(std::time::Duration::from_millis(200), g.read(&mut buf)).await;
        assert!(r.is_err(), "reading must stop once tripped");
        assert_eq!(tripped.reason(), Some("frame_flood"));
    }

    #[tokio::test]
    async fn a_ping_flood_trips_the_control_budget() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (mut g, tripped) = Guarded::new(server, FrameLimits::default());
        let mut wire = Vec::new();
        for _ in 0..101 {
            wire.extend(frame(9, 0));
        }
        client.write_all(&wire).await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), g.read(&mut buf)).await;
        assert_eq!(tripped.reason(), Some("control_flood"));
    }
}
