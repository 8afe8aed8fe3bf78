//! The envelope and its mapping onto a bus record.
//!
//! A bus record is `(key, headers, payload)`. The payload is the client's frame bytes, unchanged;
//! everything else travels in headers named `sy-*` (plus the W3C `traceparent`/`tracestate`), so a
//! backend written with any stock Kafka or NATS client can read it. The key is the session id.

use bytes::Bytes;
use serde_json::{Map, Value};
use thiserror::Error;

/// Version of the header contract, sent as `sy-v`. Bumped on incompatible changes.
pub const WIRE_VERSION: u32 = 1;

/// Header names. docs/protocol.md documents each one.
pub mod header {
    pub const VERSION: &str = "sy-v";
    pub const SESSION: &str = "sy-session";
    pub const NODE: &str = "sy-node";
    pub const SEQ: &str = "sy-seq";
    pub const KIND: &str = "sy-kind";
    pub const ROUTE: &str = "sy-route";
    pub const OPCODE: &str = "sy-opcode";
    pub const SUBJECT: &str = "sy-sub";
    pub const CLAIMS: &str = "sy-claims";
    pub const TIMESTAMP: &str = "sy-ts";
    pub const REPLY: &str = "sy-reply";
    pub const OP: &str = "sy-op";
    pub const CHANNEL: &str = "sy-channel";
    pub const CODE: &str = "sy-code";
    pub const REASON: &str = "sy-reason";
    pub const SYNTHETIC: &str = "sy-synthetic";
    pub const REPLAYED: &str = "sy-replayed";
    /// On a `handover` record: the step (`take`, `state`, `end`, `moved`).
    pub const HANDOVER: &str = "sy-handover";
    /// On a record an edge passes on to the node a session moved to: the node it came from.
    pub const FORWARDED: &str = "sy-forwarded";
    /// On a framed `send`'s frame record: the op's `id`, when it had one (duplicate suppression
    /// after a resume from the log reads it back; a backend may use it to de-duplicate too).
    pub const ID: &str = "sy-id";
    /// On lifecycle records: the route's inbound topic (routers use it for synthetic disconnects).
    pub const INBOUND: &str = "sy-inbound";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
}

/// Longest session id accepted on the wire (ULIDs are 26 characters).
pub const MAX_SESSION_LEN: usize = 64;

/// Ordered list of `(name, value)` header pairs. Values are always text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Self(Vec::with_capacity(8))
    }
    pub fn insert(&mut self, name: &str, value: impl Into<String>) {
        self.0.push((name.to_owned(), value.into()));
    }
    /// First value for `name` (header names compare case-insensitively).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a record means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A session opened (edge → backend). Payload empty.
    Connect,
    /// A client frame (edge → backend). Payload = the frame bytes.
    Frame,
    /// A session ended (edge → backend). `code`/`reason` say why.
    Disconnect,
    /// Bytes for a session's socket (backend → router → edge).
    Deliver,
    /// A control operation on a session (backend → router → edge).
    Control,
    /// A session came back within its resume window (edge → backend), on the node in
    /// `sy-node`: the same session id, `sy-seq` continuing. No disconnect came before it.
    Resume,
    /// Between edges and from routers to edges, on node delivery subjects only (never on a
    /// backend's topics): a session moving from one edge to another (`sy-handover` = the step).
    Handover,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Frame => "frame",
            Kind::Disconnect => "disconnect",
            Kind::Deliver => "deliver",
            Kind::Control => "control",
            Kind::Resume => "resume",
            Kind::Handover => "handover",
        }
    }
    pub fn parse(s: &str) -> Result<Self, DecodeError> {
        Ok(match s {
            "connect" => Kind::Connect,
            "frame" => Kind::Frame,
            "disconnect" => Kind::Disconnect,
            "deliver" => Kind::Deliver,
            "control" => Kind::Control,
            "resume" => Kind::Resume,
            "handover" => Kind::Handover,
            _ => return Err(DecodeError::invalid(header::KIND, s)),
        })
    }
}

/// WebSocket data opcode of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    Text,
    Binary,
}

impl Opcode {
    pub fn as_str(self) -> &'static str {
        match self {
            Opcode::Text => "text",
            Opcode::Binary => "binary",
        }
    }
    pub fn parse(s: &str) -> Result<Self, DecodeError> {
        match s {
            "text" => Ok(Opcode::Text),
            "binary" => Ok(Opcode::Binary),
            _ => Err(DecodeError::invalid(header::OPCODE, s)),
        }
    }
}

/// Identity verified at the edge: the subject plus the claims the route chose to stamp.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Identity {
    pub subject: String,
    pub claims: Map<String, Value>,
}

/// W3C trace context, carried verbatim after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Accepts a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, DecodeError> {
        let bad = || DecodeError::invalid(header::TRACEPARENT, traceparent);
        let parts: Vec<&str> = traceparent.split('-').collect();
        let lens = [2, 32, 16, 2];
        if parts.len() != 4 || parts[0] == "ff" {
            return Err(bad());
        }
        for (p, n) in parts.iter().zip(lens) {
            if p.len() != n || !p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(bad());
            }
        }
        if parts[1].bytes().all(|b| b == b'0') || parts[2].bytes().all(|b| b == b'0') {
            return Err(bad());
        }
        Ok(Self {
            traceparent: traceparent.to_owned(),
            tracestate: tracestate.map(str::to_owned),
        })
    }

    /// The trace id part (32 hex chars).
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }
}

/// Control operations a backend may ask for on a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlOp {
    /// Close the socket with this code and reason.
    Close { code: u16, reason: String },
    /// Subscribe the session to a channel.
    Subscribe { channel: String },
    /// Unsubscribe the session from a channel.
    Unsubscribe { channel: String },
}

/// A decoded record. See the module docs for the header mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub session: String,
    pub node: Option<String>,
    /// Per-session sequence number, starting at 1 with `connect` (0 when not applicable).
    pub seq: u64,
    pub kind: Kind,
    pub route: Option<String>,
    pub opcode: Opcode,
    pub identity: Option<Identity>,
    pub trace: Option<TraceContext>,
    /// Milliseconds since the Unix epoch when the edge (or backend) stamped the record.
    pub timestamp_ms: u64,
    /// Subject a backend may publish to directly to reach the node holding the session.
    pub reply: Option<String>,
    pub control: Option<ControlOp>,
    /// Close code for `disconnect` (and `control: close`).
    pub code: Option<u16>,
    /// Close reason for `disconnect` (and `control: close`).
    pub reason: Option<String>,
    /// The record was made by Switchyard on the session's behalf (e.g. a lease expired).
    pub synthetic: bool,
    /// The record is a replay of an earlier one, not live traffic.
    pub replayed: bool,
    pub payload: Bytes,
}

/// Why a record could not be decoded. Never a panic.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record has no session (no `sy-session` header and no key)")]
    MissingSession,
    #[error("record is missing required header `{0}`")]
    Missing(&'static str),
    #[error("header `{name}` has an invalid value {value:?}")]
    Invalid { name: &'static str, value: String },
    #[error("unsupported wire version {0}")]
    Version(String),
}

impl DecodeError {
    fn invalid(name: &'static str, value: &str) -> Self {
        let mut value = value.to_owned();
        if value.len() > 64 {
            let mut cut = 64;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
        }
        DecodeError::Invalid { name, value }
    }
}

/// True when `s` is a plausible session id: 1..=64 chars of `[A-Za-z0-9_-]`.
pub fn valid_session(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SESSION_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Envelope {
    /// A new envelope with the given session, kind and payload; every optional field empty.
    pub fn new(session: impl Into<String>, kind: Kind, payload: Bytes) -> Self {
        Self {
            session: session.into(),
            node: None,
            seq: 0,
            kind,
            route: None,
            opcode: Opcode::Text,
            identity: None,
            trace: None,
            timestamp_ms: 0,
            reply: None,
            control: None,
            code: None,
            reason: None,
            synthetic: false,
            replayed: false,
            payload,
        }
    }

    /// The record key: the session id.
    pub fn key(&self) -> Bytes {
        Bytes::copy_from_slice(self.session.as_bytes())
    }

    /// Encodes everything but the payload into headers.
    pub fn headers(&self) -> Headers {
        let mut h = Headers::new();
        h.insert(header::VERSION, WIRE_VERSION.to_string());
        h.insert(header::SESSION, self.session.clone());
        h.insert(header::KIND, self.kind.as_str());
        if self.seq != 0 {
            h.insert(header::SEQ, self.seq.to_string());
        }
        if let Some(n) = &self.node {
            h.insert(header::NODE, n.clone());
        }
        if let Some(r) = &self.route {
            h.insert(header::ROUTE, r.clone());
        }
        if matches!(self.kind, Kind::Frame | Kind::Deliver) {
            h.insert(header::OPCODE, self.opcode.as_str());
        }
        if let Some(id) = &self.identity {
            h.insert(header::SUBJECT, id.subject.clone());
            if !id.claims.is_empty() {
                h.insert(header::CLAIMS, Value::Object(id.claims.clone()).to_string());
            }
        }
        if let Some(t) = &self.trace {
            h.insert(header::TRACEPARENT, t.traceparent.clone());
            if let Some(s) = &t.tracestate {
                h.insert(header::TRACESTATE, s.clone());
            }
        }
        if self.timestamp_ms != 0 {
            h.insert(header::TIMESTAMP, self.timestamp_ms.to_string());
        }
        if let Some(r) = &self.reply {
            h.insert(header::REPLY, r.clone());
        }
        match &self.control {
            Some(ControlOp::Close { code, reason }) => {
                h.insert(header::OP, "close");
                h.insert(header::CODE, code.to_string());
                h.insert(header::REASON, reason.clone());
            }
            Some(ControlOp::Subscribe { channel }) => {
                h.insert(header::OP, "subscribe");
                h.insert(header::CHANNEL, channel.clone());
            }
            Some(ControlOp::Unsubscribe { channel }) => {
                h.insert(header::OP, "unsubscribe");
                h.insert(header::CHANNEL, channel.clone());
            }
            None => {
                if let Some(c) = self.code {
                    h.insert(header::CODE, c.to_string());
                }
                if let Some(r) = &self.reason {
                    h.insert(header::REASON, r.clone());
                }
            }
        }
        if self.synthetic {
            h.insert(header::SYNTHETIC, "true");
        }
        if self.replayed {
            h.insert(header::REPLAYED, "true");
        }
        h
    }

    /// Decodes a record. The session comes from `sy-session`, else from the key. A record with
    /// no `sy-kind` is a `deliver` (what a minimal backend reply looks like); a record with no
    /// `sy-opcode` is text when the payload is UTF-8 and binary otherwise.
    pub fn from_record(key: Option<&[u8]>, headers: &Headers, payload: Bytes) -> Result<Self, DecodeError> {
        if let Some(v) = headers.get(header::VERSION) {
            if v.parse::<u32>().ok() != Some(WIRE_VERSION) {
                return Err(DecodeError::Version(v.chars().take(16).collect()));
            }
        }
        let session = match headers.get(header::SESSION) {
            Some(s) => s.to_owned(),
            None => match key {
                Some(k) => std::str::from_utf8(k)
                    .map_err(|_| DecodeError::invalid("key", &String::from_utf8_lossy(k)))?
                    .to_owned(),
                None => return Err(DecodeError::MissingSession),
            },
        };
        if !valid_session(&session) {
            return Err(DecodeError::invalid(header::SESSION, &session));
        }
        let kind = match headers.get(header::KIND) {
            Some(k) => Kind::parse(k)?,
            None => Kind::Deliver,
        };
        let seq = parse_num(headers, header::SEQ)?.unwrap_or(0);
        let opcode = match headers.get(header::OPCODE) {
            Some(o) => Opcode::parse(o)?,
            None if std::str::from_utf8(&payload).is_ok() => Opcode::Text,
            None => Opcode::Binary,
        };
        let identity = match headers.get(header::SUBJECT) {
            Some(sub) => {
                let claims = match headers.get(header::CLAIMS) {
                    Some(c) => match serde_json::from_str::<Value>(c) {
                        Ok(Value::Object(m)) => m,
                        _ => return Err(DecodeError::invalid(header::CLAIMS, c)),
                    },
                    None => Map::new(),
                };
                Some(Identity {
                    subject: sub.to_owned(),
                    claims,
                })
            }
            None => None,
        };
        let trace = match headers.get(header::TRACEPARENT) {
            Some(tp) => Some(TraceContext::parse(tp, headers.get(header::TRACESTATE))?),
            None => None,
        };
        let timestamp_ms = parse_num(headers, header::TIMESTAMP)?.unwrap_or(0);
        let code = match parse_num(headers, header::CODE)? {
            Some(c) if (1000..5000).contains(&c) => Some(c as u16),
            Some(_) => {
                return Err(DecodeError::invalid(
                    header::CODE,
                    headers.get(header::CODE).unwrap_or(""),
                ))
            }
            None => None,
        };
        let reason = headers.get(header::REASON).map(str::to_owned);
        if reason.as_ref().is_some_and(|r| r.len() > 123) {
            return Err(DecodeError::invalid(header::REASON, reason.as_deref().unwrap_or("")));
        }
        let control = if kind == Kind::Control {
            let op = headers.get(header::OP).ok_or(DecodeError::Missing(header::OP))?;
            let channel = || -> Result<String, DecodeError> {
                let c = headers
                    .get(header::CHANNEL)
                    .ok_or(DecodeError::Missing(header::CHANNEL))?;
                if !crate::naming::valid_channel(c) {
                    return Err(DecodeError::invalid(header::CHANNEL, c));
                }
                Ok(c.to_owned())
            };
            Some(match op {
                "close" => ControlOp::Close {
                    code: code.unwrap_or(crate::close::NORMAL),
                    reason: reason.clone().unwrap_or_default(),
                },
                "subscribe" => ControlOp::Subscribe { channel: channel()? },
                "unsubscribe" => ControlOp::Unsubscribe { channel: channel()? },
                other => return Err(DecodeError::invalid(header::OP, other)),
            })
        } else {
            None
        };
        Ok(Self {
            session,
            node: headers.get(header::NODE).map(str::to_owned),
            seq,
            kind,
            route: headers.get(header::ROUTE).map(str::to_owned),
            opcode,
            identity,
            trace,
            timestamp_ms,
            reply: headers.get(header::REPLY).map(str::to_owned),
            control,
            code,
            reason,
            synthetic: parse_bool(headers, header::SYNTHETIC)?,
            replayed: parse_bool(headers, header::REPLAYED)?,
            payload,
        })
    }
}

fn parse_num(h: &Headers, name: &'static str) -> Result<Option<u64>, DecodeError> {
    match h.get(name) {
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| DecodeError::invalid(name, v)),
        None => Ok(None),
    }
}

fn parse_bool(h: &Headers, name: &'static str) -> Result<bool, DecodeError> {
    match h.get(name) {
        None => Ok(false),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => Err(DecodeError::invalid(name, v)),
    }
}

/// Milliseconds since the Unix epoch, for `sy-ts`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn session() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{1,64}"
    }

    fn control() -> impl Strategy<Value = Option<ControlOp>> {
        prop_oneof![
            Just(None),
            (1000u16..5000, "[ -~]{0,100}").prop_map(|(code, reason)| Some(ControlOp::Close { code, reason })),
            "[a-z0-9]{1,8}(\\.[a-z0-9]{1,8}){0,3}".prop_map(|channel| Some(ControlOp::Subscribe { channel })),
            "[a-z0-9]{1,8}(\\.[a-z0-9]{1,8}){0,3}".prop_map(|channel| Some(ControlOp::Unsubscribe { channel })),
        ]
    }

    prop_compose! {
        fn envelope()(
            session in session(),
            node in proptest::option::of("[a-z0-9-]{1,20}"),
            seq in any::<u64>(),
            kind_i in 0usize..5,
            route in proptest::option::of("/[a-z/]{0,20}"),
            binary in any::<bool>(),
            subject in proptest::option::of("[ -~]{0,30}"),
            claim in proptest::option::of(("[a-z]{1,8}", "[ -~]{0,20}")),
            trace in proptest::option::of(("[0-9a-f]{31}[1-9a-f]", "[0-9a-f]{15}[1-9a-f]", "[0-9a-f]{2}")),
            ts in any::<u64>(),
            reply in proptest::option::of("[a-z.]{1,30}"),
            ctl in control(),
            synthetic in any::<bool>(),
            replayed in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..256),
        ) -> Envelope {
            let kinds = [Kind::Connect, Kind::Frame, Kind::Disconnect, Kind::Deliver, Kind::Control];
            let kind = if ctl.is_some() { Kind::Control } else { kinds[kind_i % 4] };
            let mut e = Envelope::new(session, kind, Bytes::from(payload));
            e.node = node;
            e.seq = seq;
            e.route = route;
            // Opcode travels only for frames and deliveries; elsewhere it is inferred.
            e.opcode = if binary { Opcode::Binary } else { Opcode::Text };
            e.identity = subject.map(|subject| {
                let mut claims = Map::new();
                if let Some((k, v)) = claim { claims.insert(k, Value::String(v)); }
                Identity { subject, claims }
            });
            e.trace = trace.map(|(t, s, f)| TraceContext { traceparent: format!("00-{t}-{s}-{f}"), tracestate: None });
            e.timestamp_ms = ts;
            e.reply = reply;
            if let Some(ControlOp::Close { code, reason }) = &ctl {
                e.code = Some(*code);
                e.reason = Some(reason.clone());
            }
            e.control = ctl;
            e.synthetic = synthetic;
            e.replayed = replayed;
            e
        }
    }

    proptest! {
        #[test]
        fn round_trip(mut e in envelope()) {
            let h = e.headers();
            let d = Envelope::from_record(Some(e.session.as_bytes()), &h, e.payload.clone()).unwrap();
            if !matches!(e.kind, Kind::Frame | Kind::Deliver) {
                // inferred from payload
                e.opcode = if std::str::from_utf8(&e.payload).is_ok() { Opcode::Text } else { Opcode::Binary };
            }
            prop_assert_eq!(d, e);
        }

        #[test]
        fn garbage_headers_never_panic(
            pairs in proptest::collection::vec(
                (prop_oneof![
                    Just(header::SESSION.to_string()), Just(header::KIND.to_string()),
                    Just(header::SEQ.to_string()), Just(header::OPCODE.to_string()),
                    Just(header::CLAIMS.to_string()), Just(header::TRACEPARENT.to_string()),
                    Just(header::CODE.to_string()), Just(header::OP.to_string()),
                    Just(header::CHANNEL.to_string()), Just(header::VERSION.to_string()),
                    Just(header::SYNTHETIC.to_string()), Just(header::SUBJECT.to_string()),
                    "[a-z-]{1,10}",
                ], "\\PC{0,80}"),
                0..12),
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80)),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let h = Headers(pairs);
            let _ = Envelope::from_record(key.as_deref(), &h, Bytes::from(payload));
        }
    }

    #[test]
    fn minimal_backend_reply_is_a_text_delivery() {
        let e = Envelope::from_record(Some(b"01J0ABC"), &Headers::new(), Bytes::from_static(b"hi")).unwrap();
        assert_eq!(e.session, "01J0ABC");
        assert_eq!(e.kind, Kind::Deliver);
        assert_eq!(e.opcode, Opcode::Text);
        let e = Envelope::from_record(Some(b"s1"), &Headers::new(), Bytes::from_static(&[0xff, 0])).unwrap();
        assert_eq!(e.opcode, Opcode::Binary);
    }

    #[test]
    fn typed_errors() {
        assert_eq!(
            Envelope::from_record(None, &Headers::new(), Bytes::new()),
            Err(DecodeError::MissingSession)
        );
        let mut h = Headers::new();
        h.insert(header::KIND, "bogus");
        assert!(matches!(
            Envelope::from_record(Some(b"s"), &h, Bytes::new()),
            Err(DecodeError::Invalid { name: "sy-kind", .. })
        ));
        let mut h = Headers::new();
        h.insert(header::KIND, "control");
        assert_eq!(
            Envelope::from_record(Some(b"s"), &h, Bytes::new()),
            Err(DecodeError::Missing(header::OP))
        );
        let mut h = Headers::new();
        h.insert(header::VERSION, "2");
        assert!(matches!(
            Envelope::from_record(Some(b"s"), &h, Bytes::new()),
            Err(DecodeError::Version(_))
        ));
        let mut h = Headers::new();
        h.insert(
            header::TRACEPARENT,
            "00-00000000000000000000000000000000-0000000000000001-01",
        );
        assert!(Envelope::from_record(Some(b"s"), &h, Bytes::new()).is_err());
        assert!(Envelope::from_record(Some(b"bad session!"), &Headers::new(), Bytes::new()).is_err());
    }
}
