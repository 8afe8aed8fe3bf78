//! `grip-backend`: the tiny GRIP backend behind Pushpin in the benchmark comparison in
//! BENCHMARKS.md.
//!
//! Pushpin (route `* 127.0.0.1:PORT,over_http`) turns every client WebSocket into
//! WebSocket-over-HTTP requests to this server. The backend:
//! - answers `OPEN` with `OPEN` plus `Sec-WebSocket-Extensions: grip; message-prefix=""`; when the request path
//!   is `/ws` it also subscribes the connection to channel `bench` (or `?channel=NAME`) with a
//!   `c:{"type":"subscribe",...}` control message and then sends the client
//!   `{"op":"subscribed","channel":C}`;
//! - echoes every `TEXT`/`BINARY` event back (the unicast scenario: a reply per frame, routed
//!   to the sending connection by Pushpin);
//! - answers `PING` with `PONG` and `CLOSE` with `CLOSE`.
//!
//! It is written in Rust rather than Python so that the backend, not Pushpin, is never the
//! bottleneck of the unicast and handshake scenarios.
//!
//! Run with: `target/release/grip-backend --listen 127.0.0.1:8099`

use axum::body::Bytes;
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use clap::Parser;
use std::net::SocketAddr;

/// Bytes reserved in a reply beyond the request's size, for the extra events (`OPEN`, the
/// subscribe control message and the `subscribed` ack) and their headers.
const REPLY_SLACK: usize = 128;

#[derive(Parser)]
#[command(version, about = "GRIP WebSocket-over-HTTP backend for the Pushpin benchmark peer")]
struct Args {
    /// Listen address (Pushpin's routes file points here).
    #[arg(long, default_value = "127.0.0.1:8099")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let app = Router::new().fallback(handle);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("grip-backend listening on {}", args.listen);
    axum::serve(listener, app).await
}

/// One WebSocket-over-HTTP event: `TYPE[ HEXLEN]\r\n[CONTENT\r\n]`.
#[derive(Debug, PartialEq, Eq)]
struct Event<'a> {
    kind: &'a str,
    content: Option<&'a [u8]>,
}

fn parse_events(mut body: &[u8]) -> Result<Vec<Event<'_>>, String> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("event line without CRLF")?;
        let line = std::str::from_utf8(&body[..eol]).map_err(|_| "event line not UTF-8")?;
        body = &body[eol + 2..];
        let (kind, len) = match line.split_once(' ') {
            Some((k, hex)) => (k, Some(usize::from_str_radix(hex, 16).map_err(|_| "bad event length")?)),
            None => (line, None),
        };
        let content = match len {
            Some(n) => {
                if body.len() < n + 2 {
                    return Err("truncated event".into());
                }
                let c = &body[..n];
                body = &body[n + 2..];
                Some(c)
            }
            None => None,
        };
        out.push(Event { kind, content });
    }
    Ok(out)
}

fn push_event(out: &mut Vec<u8>, kind: &str, content: Option<&[u8]>) {
    out.extend_from_slice(kind.as_bytes());
    if let Some(c) = content {
        out.extend_from_slice(format!(" {:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
    }
    out.extend_from_slice(b"\r\n");
}

/// `?channel=NAME` from the query, `bench` by default.
fn channel_of(uri: &Uri) -> String {
    uri.query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("channel=").map(str::to_owned))
        })
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        .unwrap_or_else(|| "bench".into())
}

async fn handle(uri: Uri, body: Bytes) -> Response {
    let events = match parse_events(&body) {
        Ok(e) => e,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let mut out = Vec::with_capacity(body.len() + REPLY_SLACK);
    for ev in events {
        match ev.kind {
            "OPEN" => {
                push_event(&mut out, "OPEN", None);
                if uri.path() == "/ws" {
                    let ch = channel_of(&uri);
                    let sub = format!(r#"c:{{"type":"subscribe","channel":"{ch}"}}"#);
                    push_event(&mut out, "TEXT", Some(sub.as_bytes()));
                    let ack = format!(r#"{{"op":"subscribed","channel":"{ch}"}}"#);
                    push_event(&mut out, "TEXT", Some(ack.as_bytes()));
                }
            }
            "TEXT" | "BINARY" => push_event(&mut out, ev.kind, ev.content),
            "PING" => push_event(&mut out, "PONG", ev.content),
            "CLOSE" => push_event(&mut out, "CLOSE", ev.content),
            _ => {} // DISCONNECT, PONG
        }
    }
    let mut resp = out.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/websocket-events"),
    );
    h.insert(
        "sec-websocket-extensions",
        // Without `message-prefix=""`, Pushpin only forwards backend messages prefixed `m:`.
        HeaderValue::from_static("grip; message-prefix=\"\""),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_roundtrip() {
        let mut wire = Vec::new();
        push_event(&mut wire, "OPEN", None);
        push_event(&mut wire, "TEXT", Some(b"hello\r\nworld"));
        let evs = parse_events(&wire).unwrap();
        assert_eq!(
            evs,
            [
                Event {
                    kind: "OPEN",
                    content: None
                },
                Event {
                    kind: "TEXT",
                    content: Some(b"hello\r\nworld")
                }
            ]
        );
        assert_eq!(channel_of(&"/ws?x=1&channel=c.1".parse().unwrap()), "c.1".to_string());
    }
}
