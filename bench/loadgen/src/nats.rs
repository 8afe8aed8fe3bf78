//! The few NATS protocol lines the load generator needs, parsed incrementally: the server's
//! WebSocket listener may put several protocol messages in one frame or split one across frames.

/// One server → client protocol message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event<'a> {
    /// `MSG subject sid [reply] size` + payload: the payload.
    Msg(&'a [u8]),
    Ping,
    Pong,
    /// `INFO`, `+OK`: nothing to do.
    Other,
    /// `-ERR ...`: the line.
    Err(&'a [u8]),
}

/// Incremental parser: [`Parser::feed`] bytes as they arrive.
#[derive(Default)]
pub(crate) struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    /// Appends `data` and calls `on` for every complete message, in order.
    pub(crate) fn feed(&mut self, data: &[u8], mut on: impl FnMut(Event<'_>)) {
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        while let Some(rel) = memchr::memmem::find(&self.buf[pos..], b"\r\n") {
            let line = &self.buf[pos..pos + rel];
            let after = pos + rel + 2;
            if line.starts_with(b"MSG ") {
                let size: usize = line
                    .rsplit(|b| *b == b' ')
                    .next()
                    .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
                    .unwrap_or(0);
                if self.buf.len() < after + size + 2 {
                    break; // payload not complete yet
                }
                on(Event::Msg(&self.buf[after..after + size]));
                pos = after + size + 2;
                continue;
            }
            match line {
                b"PING" => on(Event::Ping),
                b"PONG" => on(Event::Pong),
                l if l.starts_with(b"-ERR") => on(Event::Err(l)),
                _ => on(Event::Other),
            }
            pos = after;
        }
        self.buf.drain(..pos);
    }
}

/// The client's first line: no `+OK` per command (echo stays on: unicast sessions receive
/// their own publishes on their own subject).
pub(crate) const CONNECT: &str =
    "CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"lang\":\"rust\",\"version\":\"loadgen\"}\r\n";

/// `PUB subject size\r\npayload\r\n` appended to `out`.
pub(crate) fn push_pub(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_batched() {
        let mut p = Parser::default();
        let mut got = Vec::new();
        let wire = b"INFO {}\r\nMSG a.b 1 5\r\nhello\r\nPING\r\nMSG a 1 r 2\r\nhi\r\n";
        for chunk in wire.chunks(7) {
            p.feed(chunk, |e| {
                got.push(match e {
                    Event::Msg(m) => String::from_utf8_lossy(m).into_owned(),
                    Event::Ping => "PING".into(),
                    other => format!("{other:?}"),
                })
            });
        }
        assert_eq!(got, ["Other", "hello", "PING", "hi"]);
    }

    #[test]
    fn pub_line() {
        let mut v = Vec::new();
        push_pub(&mut v, "x", b"abc");
        assert_eq!(v, b"PUB x 3\r\nabc\r\n");
    }
}
