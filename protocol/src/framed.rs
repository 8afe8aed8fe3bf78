//! The `framed` client protocol: small JSON objects with an `op` field.
//!
//! Client → server: `subscribe` (optionally with `since` or `rewind`), `unsubscribe`,
//! `publish`, `send`.
//! Server → client: `welcome`, `subscribed`, `unsubscribed`, `error`, and channel messages
//! `{"channel":C,"offset":N,"data":...}` (no `op`; `offset` present when the bus knows one).

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use thiserror::Error;

use crate::naming::valid_channel;

/// A decoded client operation. `data` is the raw JSON text of the `data` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    Subscribe {
        channel: String,
        start: Start,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        data: Bytes,
    },
    Send {
        data: Bytes,
    },
    /// Answered `{"op":"pong"}` at once: lets a client that cannot see WebSocket pings (a
    /// browser) tell a live connection from a dead one.
    Ping,
}

/// Where a subscription starts, for channels with history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    /// Live messages only (plain `subscribe`).
    #[default]
    Live,
    /// `"since":{"offset":N,"epoch":E}`: every retained message after offset `N` of epoch `E`,
    /// then the live ones.
    Since { offset: u64, epoch: String },
    /// `"rewind":K`: the last `K` retained messages, then the live ones.
    Rewind(u64),
}

/// Longest `epoch` a client may send back (the server's epochs are much shorter).
pub const MAX_EPOCH_LEN: usize = 64;

/// Why a client frame is not a valid framed op. [`FramedError::code`] is what the client sees.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum FramedError {
    #[error("frame is not a JSON object: {0}")]
    NotJson(String),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    #[error("invalid channel name {0:?}")]
    InvalidChannel(String),
    #[error("`id` must be a string of at most 64 characters or an integer")]
    InvalidId,
    #[error("JSON nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("invalid `{0}`: {1}")]
    Invalid(&'static str, &'static str),
}

impl FramedError {
    /// The `code` of the error op sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            FramedError::NotJson(_)
            | FramedError::Missing(_)
            | FramedError::InvalidId
            | FramedError::TooDeep(_)
            | FramedError::Invalid(..) => "bad_request",
            FramedError::UnknownOp(_) => "unknown_op",
            FramedError::InvalidChannel(_) => "invalid_channel",
        }
    }
}

#[derive(Deserialize)]
struct RawOp<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    #[serde(borrow)]
    rewind: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSince {
    offset: u64,
    epoch: String,
}

/// `since` / `rewind` of a subscribe (at most one of them).
fn start(since: Option<&RawValue>, rewind: Option<&RawValue>) -> Result<Start, FramedError> {
    match (since, rewind) {
        (Some(_), Some(_)) => Err(FramedError::Invalid("since", "give `since` or `rewind`, not both")),
        (Some(s), None) => {
            let s: RawSince = serde_json::from_str(s.get()).map_err(|_| {
                FramedError::Invalid(
                    "since",
                    "expected {\"offset\":N,\"epoch\":E} with N a non-negative integer and E a string",
                )
            })?;
            if s.epoch.len() > MAX_EPOCH_LEN {
                return Err(FramedError::Invalid("since", "epoch longer than 64 bytes"));
            }
            Ok(Start::Since {
                offset: s.offset,
                epoch: s.epoch,
            })
        }
        (None, Some(r)) => match serde_json::from_str::<u64>(r.get()) {
            Ok(k) => Ok(Start::Rewind(k)),
            Err(_) => Err(FramedError::Invalid("rewind", "expected a non-negative integer")),
        },
        (None, None) => Ok(Start::Live),
    }
}

/// A client frame: its op (or why it is not one) and the optional `id` the client attached,
/// as raw JSON text (a string of at most 64 characters or an integer). When an `id` is given
/// on `send` or `publish`, the server answers `{"op":"ack","id":ID}` once the bus has taken the
/// message, or an error carrying the same `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: Option<String>,
    pub op: Result<ClientOp, FramedError>,
}

fn valid_id(raw: &RawValue) -> bool {
    match serde_json::from_str::<serde_json::Value>(raw.get()) {
        Ok(serde_json::Value::String(s)) => s.chars().count() <= 64,
        Ok(serde_json::Value::Number(n)) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

/// How deeply a framed client frame may nest arrays and objects by default (the frame's own
/// object is level 1). Deeper frames are refused before anything is published, so no backend
/// behind the gateway receives a document its JSON parser cannot take.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// True when `json` nests arrays and objects more than `max` levels deep. Brackets inside
/// strings do not count. One pass, no allocation; stops at the first level past `max`. It
/// judges nesting only: whether the text is JSON at all is the parser's business.
pub fn nesting_exceeds(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// [`decode_request_with`] at [`DEFAULT_MAX_DEPTH`].
pub fn decode_request(frame: &[u8]) -> Request {
    decode_request_with(frame, DEFAULT_MAX_DEPTH)
}

/// Decodes one client frame, keeping its `id` even when the op itself is invalid. A frame
/// nested deeper than `max_depth` is [`FramedError::TooDeep`], whatever its op.
pub fn decode_request_with(frame: &[u8], max_depth: usize) -> Request {
    let raw: Result<RawOp<'_>, _> = serde_json::from_slice(frame);
    let id = match &raw {
        Ok(r) => match r.id {
            Some(i) if valid_id(i) => Some(i.get().to_owned()),
            Some(_) => {
                return Request {
                    id: None,
                    op: Err(FramedError::InvalidId),
                }
            }
            None => None,
        },
        Err(_) => None,
    };
    let op = if nesting_exceeds(frame, max_depth) {
        Err(FramedError::TooDeep(max_depth))
    } else {
        decode_client(frame)
    };
    Request { id, op }
}

/// Decodes one client frame.
pub fn decode_client(frame: &[u8]) -> Result<ClientOp, FramedError> {
    let raw: RawOp<'_> = serde_json::from_slice(frame).map_err(|e| {
        // serde_json's message can quote the client's text (`invalid type: string "…"`), so cut
        // it at a char boundary: `String::truncate` panics inside a multi-byte character.
        let mut m = e.to_string();
        let mut cut = m.len().min(120);
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        FramedError::NotJson(m)
    })?;
    let op = raw.op.ok_or(FramedError::Missing("op"))?;
    let channel = || -> Result<String, FramedError> {
        let c = raw.channel.as_deref().ok_or(FramedError::Missing("channel"))?;
        if !valid_channel(c) {
            let mut c = c.to_owned();
            c.truncate(c.char_indices().nth(64).map_or(c.len(), |(i, _)| i));
            return Err(FramedError::InvalidChannel(c));
        }
        Ok(c.to_owned())
    };
    let data = || -> Result<Bytes, FramedError> {
        let d = raw.data.ok_or(FramedError::Missing("data"))?;
        Ok(Bytes::copy_from_slice(d.get().as_bytes()))
    };
    match op.as_ref() {
        "subscribe" => Ok(ClientOp::Subscribe {
            channel: channel()?,
            start: start(raw.since, raw.rewind)?,
        }),
        "unsubscribe" => Ok(ClientOp::Unsubscribe { channel: channel()? }),
        "publish" => Ok(ClientOp::Publish {
            channel: channel()?,
            data: data()?,
        }),
        "send" => Ok(ClientOp::Send { data: data()? }),
        "ping" => Ok(ClientOp::Ping),
        other => {
            let mut o = other.to_owned();
            o.truncate(o.char_indices().nth(32).map_or(o.len(), |(i, _)| i));
            Err(FramedError::UnknownOp(o))
        }
    }
}

/// Encodes a client op (used by clients and tests; the edge only decodes).
pub fn encode_client(op: &ClientOp) -> String {
    let data = |d: &Bytes| String::from_utf8_lossy(d).into_owned();
    match op {
        ClientOp::Subscribe { channel, start } => match start {
            Start::Live => format!(r#"{{"op":"subscribe","channel":{}}}"#, q(channel)),
            Start::Since { offset, epoch } => format!(
                r#"{{"op":"subscribe","channel":{},"since":{{"offset":{offset},"epoch":{}}}}}"#,
                q(channel),
                q(epoch)
            ),
            Start::Rewind(k) => format!(r#"{{"op":"subscribe","channel":{},"rewind":{k}}}"#, q(channel)),
        },
        ClientOp::Unsubscribe { channel } => {
            format!(r#"{{"op":"unsubscribe","channel":{}}}"#, q(channel))
        }
        ClientOp::Publish { channel, data: d } => {
            format!(r#"{{"op":"publish","channel":{},"data":{}}}"#, q(channel), data(d))
        }
        ClientOp::Send { data: d } => format!(r#"{{"op":"send","data":{}}}"#, data(d)),
        ClientOp::Ping => r#"{"op":"ping"}"#.to_owned(),
    }
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `{"op":"welcome","session":ID}`
pub fn welcome(session: &str) -> String {
    format!(r#"{{"op":"welcome","session":{}}}"#, q(session))
}

/// What a `welcome` says about resuming.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Welcome<'a> {
    /// `Some(true)`: the session came back; `Some(false)`: the client asked and could not
    /// (with `reason`); `None`: it did not ask.
    pub resumed: Option<bool>,
    pub reason: Option<&'a str>,
    /// The token for the next resume (absent when resume is off).
    pub resume_token: Option<&'a str>,
}

/// `{"op":"welcome","session":ID,"resumed":B,"reason":R,"resume_token":T}` (fields present as
/// given).
pub fn welcome_with(session: &str, w: &Welcome<'_>) -> String {
    let mut out = format!(r#"{{"op":"welcome","session":{}"#, q(session));
    if let Some(r) = w.resumed {
        out.push_str(if r { r#","resumed":true"# } else { r#","resumed":false"# });
    }
    if let Some(r) = w.reason {
        out.push_str(&format!(r#","reason":{}"#, q(r)));
    }
    if let Some(t) = w.resume_token {
        out.push_str(&format!(r#","resume_token":{}"#, q(t)));
    }
    out.push('}');
    out
}

/// `{"op":"deliver","n":K,"data":D}` (`switchyard.v2`): backend delivery number K of the
/// session, `data` as in channel messages (JSON as-is, other text as a string, else
/// `data_b64`). A payload marked binary is always `data_b64`.
pub fn deliver(n: u64, payload: &[u8], binary: bool) -> String {
    let mut out = String::with_capacity(payload.len() + 40);
    out.push_str(r#"{"op":"deliver","n":"#);
    out.push_str(&n.to_string());
    push_data(&mut out, payload, binary);
    out.push('}');
    out
}

/// `{"op":"ack","id":ID,"duplicate":true}`: the session had already accepted this `id`; the
/// message was not published again.
pub fn ack_duplicate(id: &str) -> String {
    format!(r#"{{"op":"ack","id":{id},"duplicate":true}}"#)
}

/// `{"op":"subscribed","channel":C}` — sent once the channel subscription is live on the bus.
pub fn subscribed(channel: &str) -> String {
    format!(r#"{{"op":"subscribed","channel":{}}}"#, q(channel))
}

/// What a `subscribed` says about a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position<'a> {
    /// The history's epoch; `None` when the channel keeps no history.
    pub log: Option<(&'a str, u64)>,
    /// Present when the client asked to recover (`since`).
    pub recovered: Option<bool>,
}

/// `{"op":"subscribed","channel":C,"epoch":E,"offset":CUR,"recovered":R}`: `epoch` and
/// `offset` (the newest message's offset, 0 when there is none) on channels with history,
/// `recovered` when the subscribe carried `since`.
pub fn subscribed_at(channel: &str, at: &Position<'_>) -> String {
    let mut out = format!(r#"{{"op":"subscribed","channel":{}"#, q(channel));
    if let Some((epoch, offset)) = at.log {
        out.push_str(&format!(r#","epoch":{},"offset":{offset}"#, q(epoch)));
    }
    if let Some(r) = at.recovered {
        out.push_str(if r {
            r#","recovered":true"#
        } else {
            r#","recovered":false"#
        });
    }
    out.push('}');
    out
}

/// `{"op":"pong"}`, or `{"op":"pong","id":ID}` for a ping that carried an `id`.
pub fn pong(id: Option<&str>) -> String {
    match id {
        Some(id) => format!(r#"{{"op":"pong","id":{id}}}"#),
        None => r#"{"op":"pong"}"#.to_owned(),
    }
}

/// `{"op":"unsubscribed","channel":C}`
pub fn unsubscribed(channel: &str) -> String {
    format!(r#"{{"op":"unsubscribed","channel":{}}}"#, q(channel))
}

/// `{"op":"error","code":CODE,"message":MSG}`
pub fn error(code: &str, message: &str) -> String {
    format!(r#"{{"op":"error","code":{},"message":{}}}"#, q(code), q(message))
}

/// `{"op":"ack","id":ID}` — the bus took the message sent with this `id`.
pub fn ack(id: &str) -> String {
    format!(r#"{{"op":"ack","id":{id}}}"#)
}

/// `{"op":"error","code":CODE,"message":MSG,"id":ID}` — an error about the message with `id`.
pub fn error_with_id(code: &str, message: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => format!(
            r#"{{"op":"error","code":{},"message":{},"id":{id}}}"#,
            q(code),
            q(message)
        ),
        None => error(code, message),
    }
}

/// A channel message: `{"channel":C,"offset":N,"data":D}`.
///
/// `payload` is embedded as-is when it is JSON; as a JSON string when it is other UTF-8 text;
/// otherwise base64-encoded under `data_b64`, so no payload is ever dropped or mangled.
pub fn channel_message(channel: &str, offset: Option<u64>, payload: &[u8]) -> String {
    let mut out = String::with_capacity(payload.len() + channel.len() + 40);
    out.push_str(r#"{"channel":"#);
    out.push_str(&q(channel));
    if let Some(o) = offset {
        out.push_str(r#","offset":"#);
        out.push_str(&o.to_string());
    }
    push_data(&mut out, payload, false);
    out.push('}');
    out
}

/// `,"data":D` (JSON as-is, other UTF-8 as a string) or `,"data_b64":"…"`.
fn push_data(out: &mut String, payload: &[u8], binary: bool) {
    let text = if binary {
        None
    } else {
        std::str::from_utf8(payload).ok()
    };
    match text {
        Some(t) if serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok() => {
            out.push_str(r#","data":"#);
            out.push_str(t.trim());
        }
        Some(t) => {
            out.push_str(r#","data":"#);
            out.push_str(&q(t));
        }
        None => {
            out.push_str(r#","data_b64":""#);
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(payload));
            out.push('"');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_ops() {
        assert_eq!(
            decode_client(br#"{"op":"subscribe","channel":"demo.ticker"}"#),
            Ok(ClientOp::Subscribe {
                channel: "demo.ticker".into(),
                start: Start::Live,
            })
        );
        assert_eq!(
            decode_client(br#"{"op":"publish","channel":"c","data":{"a":[1,2]}}"#),
            Ok(ClientOp::Publish {
                channel: "c".into(),
                data: Bytes::from_static(br#"{"a":[1,2]}"#)
            })
        );
        assert_eq!(
            decode_client(br#"{"op":"send","data":"hi"}"#),
            Ok(ClientOp::Send {
                data: Bytes::from_static(br#""hi""#)
            })
        );
        assert_eq!(decode_client(br#"{"op":"send"}"#), Err(FramedError::Missing("data")));
        assert_eq!(decode_client(br#"{"op":"ping"}"#), Ok(ClientOp::Ping));
        assert_eq!(pong(Some("7")), r#"{"op":"pong","id":7}"#);
        assert_eq!(decode_client(br#"{"channel":"x"}"#), Err(FramedError::Missing("op")));
        assert!(matches!(decode_client(b"nope"), Err(FramedError::NotJson(_))));
        assert!(matches!(
            decode_client(br#"{"op":"x"}"#),
            Err(FramedError::UnknownOp(_))
        ));
        assert!(matches!(
            decode_client(br#"{"op":"subscribe","channel":"a.*"}"#),
            Err(FramedError::InvalidChannel(_))
        ));
    }

    #[test]
    fn not_json_message_is_cut_on_a_char_boundary() {
        // A top-level JSON string is not an op; serde_json's error quotes it, and byte 120 of the
        // message can fall inside a multi-byte character (found by fuzz target framed_request).
        let found = "\"juzst uztring juzst uztring \\u0044t44tr0a\u{e9}s  st &&&&&&&r0a\u{e9}s  sst uztring \
                     \\u0044t44tr0a\u{e9}s  st &&&&&&&r0a\u{e9}s t\"";
        let mut frames = vec![found.to_owned()];
        for pad in 0..4 {
            frames.push(format!("\"{}{}\"", "a".repeat(pad), "\u{20ac}".repeat(40)));
            frames.push(format!("\"{}{}\"", "a".repeat(pad), "\u{1f600}".repeat(30)));
        }
        for frame in frames {
            match decode_client(frame.as_bytes()) {
                Err(FramedError::NotJson(m)) => assert!(m.len() <= 120 && m.len() > 100, "{m:?}"),
                other => panic!("{frame:?}: {other:?}"),
            }
            assert!(matches!(
                decode_request(frame.as_bytes()).op,
                Err(FramedError::NotJson(_))
            ));
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |n: usize| format!(r#"{{"op":"send","id":9,"data":{}1{}}}"#, "[".repeat(n), "]".repeat(n));
        // The frame's object is level 1, so data may nest max - 1 arrays.
        assert!(decode_request_with(deep(63).as_bytes(), 64).op.is_ok());
        let r = decode_request_with(deep(64).as_bytes(), 64);
        assert_eq!(r.op, Err(FramedError::TooDeep(64)));
        assert_eq!(r.op.unwrap_err().code(), "bad_request");
        assert_eq!(r.id.as_deref(), Some("9"), "the id survives, so the error can name it");
        // 100,000 levels: refused, in one pass.
        assert_eq!(
            decode_request(deep(100_000).as_bytes()).op,
            Err(FramedError::TooDeep(64))
        );
        // Brackets inside strings, escaped quotes included, are not nesting.
        let text = format!(r#"{{"op":"send","data":"\"{}"}}"#, "[{".repeat(500));
        assert!(!nesting_exceeds(text.as_bytes(), 2));
        assert!(decode_request_with(text.as_bytes(), 2).op.is_ok());
        assert!(
            nesting_exceeds(br#"{"a":"\\",[[1]]}"#, 2),
            "an escaped backslash ends the escape"
        );
    }

    #[test]
    fn ids_are_kept_and_checked() {
        let r = decode_request(br#"{"op":"send","data":1,"id":7}"#);
        assert_eq!(r.id.as_deref(), Some("7"));
        assert!(r.op.is_ok());
        let r = decode_request(br#"{"op":"nope","id":"a"}"#);
        assert_eq!(r.id.as_deref(), Some(r#""a""#));
        assert!(r.op.is_err());
        assert_eq!(
            decode_request(br#"{"op":"send","data":1,"id":{}}"#).op,
            Err(FramedError::InvalidId)
        );
        assert_eq!(
            decode_request(br#"{"op":"send","data":1,"id":1.5}"#).op,
            Err(FramedError::InvalidId)
        );
        let v: serde_json::Value = serde_json::from_str(&error_with_id("x", "y", Some("3"))).unwrap();
        assert_eq!(v["id"], 3);
        let v: serde_json::Value = serde_json::from_str(&ack(r#""k""#)).unwrap();
        assert_eq!(v, serde_json::json!({"op":"ack","id":"k"}));
    }

    #[test]
    fn subscribe_since_and_rewind() {
        let sub = |f: &str| decode_client(f.as_bytes());
        assert_eq!(
            sub(r#"{"op":"subscribe","channel":"t.a","since":{"offset":41,"epoch":"e1"}}"#),
            Ok(ClientOp::Subscribe {
                channel: "t.a".into(),
                start: Start::Since {
                    offset: 41,
                    epoch: "e1".into()
                }
            })
        );
        assert_eq!(
            sub(r#"{"op":"subscribe","channel":"t.a","rewind":1}"#),
            Ok(ClientOp::Subscribe {
                channel: "t.a".into(),
                start: Start::Rewind(1)
            })
        );
        for bad in [
            r#"{"op":"subscribe","channel":"t","since":{"offset":-1,"epoch":"e"}}"#,
            r#"{"op":"subscribe","channel":"t","since":{"offset":1}}"#,
            r#"{"op":"subscribe","channel":"t","since":{"offset":1,"epoch":7}}"#,
            r#"{"op":"subscribe","channel":"t","since":{"offset":1,"epoch":"e","x":1}}"#,
            r#"{"op":"subscribe","channel":"t","since":3}"#,
            r#"{"op":"subscribe","channel":"t","rewind":-2}"#,
            r#"{"op":"subscribe","channel":"t","rewind":"1"}"#,
            r#"{"op":"subscribe","channel":"t","rewind":1,"since":{"offset":1,"epoch":"e"}}"#,
        ] {
            let e = sub(bad).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{bad}: {e}");
        }
        let long = format!(
            r#"{{"op":"subscribe","channel":"t","since":{{"offset":1,"epoch":"{}"}}}}"#,
            "e".repeat(65)
        );
        assert!(sub(&long).is_err());
        let at = |log, recovered| subscribed_at("t", &Position { log, recovered });
        assert_eq!(
            at(Some(("e1", 7)), Some(true)),
            r#"{"op":"subscribed","channel":"t","epoch":"e1","offset":7,"recovered":true}"#
        );
        assert_eq!(
            at(None, Some(false)),
            r#"{"op":"subscribed","channel":"t","recovered":false}"#
        );
        assert_eq!(at(None, None), subscribed("t"));
    }

    #[test]
    fn v2_and_resume_shapes() {
        assert_eq!(
            deliver(3, br#"{"a":1}"#, false),
            r#"{"op":"deliver","n":3,"data":{"a":1}}"#
        );
        assert_eq!(deliver(4, b"hi", false), r#"{"op":"deliver","n":4,"data":"hi"}"#);
        assert_eq!(deliver(5, b"hi", true), r#"{"op":"deliver","n":5,"data_b64":"aGk="}"#);
        assert_eq!(
            deliver(6, &[0xff], false),
            r#"{"op":"deliver","n":6,"data_b64":"/w=="}"#
        );
        assert_eq!(ack_duplicate("\"a\""), r#"{"op":"ack","id":"a","duplicate":true}"#);
        assert_eq!(welcome_with("S", &Welcome::default()), welcome("S"));
        assert_eq!(
            welcome_with(
                "S",
                &Welcome {
                    resumed: Some(false),
                    reason: Some("expired"),
                    resume_token: Some("t.k")
                }
            ),
            r#"{"op":"welcome","session":"S","resumed":false,"reason":"expired","resume_token":"t.k"}"#
        );
    }

    #[test]
    fn channel_message_shapes() {
        assert_eq!(
            channel_message("c", Some(3), b"{\"p\":1}"),
            r#"{"channel":"c","offset":3,"data":{"p":1}}"#
        );
        assert_eq!(
            channel_message("c", None, b"plain"),
            r#"{"channel":"c","data":"plain"}"#
        );
        assert_eq!(
            channel_message("c", None, &[0xff]),
            r#"{"channel":"c","data_b64":"/w=="}"#
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(frame in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_client(&frame);
            let _ = decode_request(&frame);
        }

        #[test]
        fn round_trip(channel in "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,3}", n in any::<i64>(), s in "\\PC{0,40}", which in 0usize..5) {
            let data = Bytes::from(serde_json::json!({"n": n, "s": s}).to_string());
            let op = match which {
                0 => ClientOp::Subscribe { channel, start: match n.rem_euclid(3) {
                    0 => Start::Live,
                    1 => Start::Since { offset: n.unsigned_abs(), epoch: s.chars().take(16).collect() },
                    _ => Start::Rewind(n.unsigned_abs()),
                } },
                1 => ClientOp::Unsubscribe { channel },
                2 => ClientOp::Publish { channel, data },
                3 => ClientOp::Ping,
                _ => ClientOp::Send { data },
            };
            prop_assert_eq!(decode_client(encode_client(&op).as_bytes()), Ok(op));
        }

        #[test]
        fn channel_messages_are_json(payload in proptest::collection::vec(any::<u8>(), 0..100), off in proptest::option::of(any::<u64>())) {
            let m = channel_message("x.y", off, &payload);
            let v: serde_json::Value = serde_json::from_str(&m).unwrap();
            prop_assert_eq!(v["channel"].as_str(), Some("x.y"));
        }
    }
}
