//! The subscribers' WebSocket client: a plain `TcpStream`, one growable read buffer, and a frame
//! parser that hands out every complete frame in the buffer after each read.
//!
//! tokio-tungstenite costs the load generator about a microsecond per frame (a `Message` and an
//! owned payload per frame, a stream poll per frame); with 2,000 subscribers and a server that
//! writes one frame per message, that made the load generator the ceiling of the `hot` ramp.
//! Here a read that returns many frames is parsed in place with no allocation. The same client
//! is used for every system, so the comparison stays fair. Client frames are masked
//! (RFC 6455 §5.3) with a key from a per-connection xorshift generator.

use anyhow::Result;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A frame handed to the reader's callback. Payloads borrow the read buffer.
pub(crate) enum Frame<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// What [`Ws::read`] saw.
pub(crate) enum Got {
    /// Zero or more data frames were handed out (pings were answered).
    Frames,
    /// A close frame, EOF or an error.
    Closed,
}

/// Initial read buffer per connection: 16,000 clients in one process. It grows for a larger
/// frame (and for reads that arrive faster than they are parsed) up to [`MAX_FRAME`].
const INITIAL: usize = 4096;
/// Largest frame accepted.
const MAX_FRAME: usize = 1 << 20;

pub(crate) struct Ws {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// Parsed up to here; `buf[pos..]` is an incomplete frame.
    pos: usize,
    /// A fragmented message being assembled: its opcode and payload so far.
    frag: Option<(u8, Vec<u8>)>,
    mask_state: u32,
}

impl Ws {
    /// TCP connect from `src` and an RFC 6455 upgrade of `url` (see [`crate::systems::upgrade_raw`]).
    pub(crate) async fn open(url: &str, dst: SocketAddr, src: IpAddr, rcvbuf: Option<u32>) -> Result<Self> {
        let (tcp, rest) = crate::systems::upgrade_raw(url, dst, src, rcvbuf).await?;
        let mut buf = Vec::with_capacity(INITIAL.max(rest.len()));
        buf.extend_from_slice(&rest);
        let port = tcp.local_addr().map_or(0, |a| a.port());
        Ok(Self {
            tcp,
            buf,
            pos: 0,
            frag: None,
            mask_state: 0x9E37_79B9 ^ u32::from(port).wrapping_mul(0x85EB_CA6B) | 1,
        })
    }

    fn mask_key(&mut self) -> [u8; 4] {
        // xorshift32: the key only has to differ from frame to frame for the server.
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_le_bytes()
    }

    /// Sends one masked frame with `opcode` (FIN set).
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        let mut f = Vec::with_capacity(payload.len() + 14);
        f.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = self.mask_key();
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
        self.tcp.write_all(&f).await?;
        Ok(())
    }

    pub(crate) async fn send_text(&mut self, payload: &[u8]) -> Result<()> {
        self.send(0x1, payload).await
    }

    pub(crate) async fn send_binary(&mut self, payload: &[u8]) -> Result<()> {
        self.send(0x2, payload).await
    }

    /// Reads once (waiting for data) and hands every complete data frame now buffered to `on`,
    /// in order. Pings are answered with a pong; a close frame ends the connection.
    pub(crate) async fn read(&mut self, mut on: impl FnMut(Frame<'_>)) -> Got {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(self.buf.capacity().max(INITIAL));
        }
        match self.tcp.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => return Got::Closed,
            Ok(_) => {}
        }
        let mut pongs: Vec<Vec<u8>> = Vec::new();
        let closed = loop {
            match parse(&self.buf[self.pos..]) {
                Parse::Need => break false,
                Parse::Bad => break true,
                Parse::Frame {
                    fin,
                    opcode,
                    start,
                    end,
                } => {
                    let (s, e) = (self.pos + start, self.pos + end);
                    self.pos += end;
                    let payload = &self.buf[s..e];
                    match (opcode, fin, &mut self.frag) {
                        (0x8, ..) => break true,
                        (0x9, ..) => pongs.push(payload.to_vec()),
                        (0xA, ..) => {}
                        (0x1 | 0x2, true, None) => on(data(opcode, payload)),
                        (0x1 | 0x2, false, f @ None) => *f = Some((opcode, payload.to_vec())),
                        (0x0, _, Some((_, acc))) if acc.len() + payload.len() <= MAX_FRAME => {
                            acc.extend_from_slice(payload);
                            if fin {
                                let (op, acc) = self.frag.take().expect("fragment in progress");
                                on(data(op, &acc));
                            }
                        }
                        _ => break true, // protocol error: treat as closed
                    }
                }
            }
        };
        for p in pongs {
            if self.send(0xA, &p).await.is_err() {
                return Got::Closed;
            }
        }
        if closed {
            Got::Closed
        } else {
            Got::Frames
        }
    }
}

fn data(opcode: u8, payload: &[u8]) -> Frame<'_> {
    if opcode == 0x1 {
        Frame::Text(payload)
    } else {
        Frame::Binary(payload)
    }
}

enum Parse {
    Need,
    Bad,
    Frame {
        fin: bool,
        opcode: u8,
        start: usize,
        end: usize,
    },
}

/// One server frame (unmasked) at the start of `b`: its payload is `b[start..end]`.
fn parse(b: &[u8]) -> Parse {
    if b.len() < 2 {
        return Parse::Need;
    }
    let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0F);
    if b[1] & 0x80 != 0 {
        return Parse::Bad; // servers never mask
    }
    let (len, start) = match b[1] & 0x7F {
        126 if b.len() < 4 => return Parse::Need,
        126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() < 10 => return Parse::Need,
        127 => {
            let n = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
            if n > MAX_FRAME as u64 {
                return Parse::Bad;
            }
            (n as usize, 10)
        }
        n => (n as usize, 2),
    };
    if len > MAX_FRAME {
        return Parse::Bad;
    }
    if b.len() < start + len {
        return Parse::Need;
    }
    Parse::Frame {
        fin,
        opcode,
        start,
        end: start + len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frames_in_any_split() {
        let mut wire = vec![0x81, 3, b'a', b'b', b'c'];
        wire.extend([0x82, 126, 0, 200]);
        wire.extend(std::iter::repeat_n(7u8, 200));
        for cut in 0..wire.len() {
            match parse(&wire[..cut]) {
                Parse::Need => assert!(cut < 5, "first frame complete at 5, got Need at {cut}"),
                Parse::Frame {
                    fin,
                    opcode,
                    start,
                    end,
                } => {
                    assert!(cut >= 5);
                    assert_eq!((fin, opcode, &wire[start..end]), (true, 1, &b"abc"[..]));
                }
                Parse::Bad => panic!("bad at {cut}"),
            }
        }
        match parse(&wire[5..]) {
            Parse::Frame { opcode, start, end, .. } => assert_eq!((opcode, end - start), (2, 200)),
            _ => panic!("second frame"),
        }
        assert!(matches!(parse(&wire[5..5 + 203]), Parse::Need));
        assert!(
            matches!(parse(&[0x81, 0x83, 0, 0, 0, 0]), Parse::Bad),
            "masked server frame"
        );
    }
}
