//! Resume tokens: what a client shows to get its session back after a reconnect.
//!
//! `<claims>.<mac>`, both base64url without padding: `claims` is the JSON object
//! `{"s":SESSION,"r":ROUTE,"u":SUBJECT|null,"e":EXPIRY,"n":NODE}` (expiry in Unix seconds; the
//! node that issued it, which holds the session, so another edge knows whom to ask) and `mac` is
//! HMAC-SHA256 over the claims' base64 text with the cluster's resume key. The token is opaque
//! to clients: they store it and send it back. It cannot be made without the key, and it names
//! the route and the verified subject, so it is no use on another route or for another identity.
//!
//! On a bus that keeps a log of node deliveries (Kafka), the claims also carry `"a"`, an
//! [`Anchor`]: where the session's deliveries can be read back from the log and how they are
//! numbered, so the session can be resumed on another edge after its node died.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a token binds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Session id.
    #[serde(rename = "s")]
    pub session: String,
    /// Route path.
    #[serde(rename = "r")]
    pub route: String,
    /// Verified subject, `None` on an anonymous route.
    #[serde(rename = "u")]
    pub subject: Option<String>,
    /// Expiry, Unix seconds.
    #[serde(rename = "e")]
    pub expires: u64,
    /// The edge node that issued the token (and holds the session).
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where the session's deliveries are in the log (see [`Anchor`]); none when they cannot be
    /// told from the log.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<Anchor>,
    /// A raw session that had channels when the token was issued (their messages are
    /// deliveries, but not in the node's log).
    #[serde(rename = "c", default, skip_serializing_if = "std::ops::Not::not")]
    pub channels: bool,
}

/// A point in one node's delivery topic: after this offset, or (no offset known) from this
/// time on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Point {
    /// After this position of the topic (the bus's offset).
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// From this time (Unix ms), when no offset is known.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
}

/// How a session's deliveries are numbered in the log: deliveries `1..=base` came before;
/// then, when it had just moved here from another node, that node's deliveries for the session
/// after `prev`'s point up to the router's `moved` there; then the issuing node's deliveries
/// for the session after `here` (records passed on between nodes, `sy-forwarded`, are not
/// counted: they were counted where they were first delivered). Only records of kind
/// `deliver` count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    #[serde(rename = "b")]
    pub base: u64,
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<Hop>,
    #[serde(rename = "h")]
    pub here: Point,
}

/// The node a session had just come from, and the point in its topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    #[serde(rename = "n")]
    pub node: String,
    #[serde(rename = "m")]
    pub point: Point,
}

/// Why a token was refused: the `reason` a client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("malformed resume token")]
    Malformed,
    #[error("resume token signature does not verify")]
    Signature,
    #[error("resume token expired")]
    Expired,
    #[error("resume token is for another route")]
    OtherRoute,
    #[error("resume token is for another identity")]
    OtherIdentity,
}

impl Refused {
    /// Short, bounded label (metrics, the welcome's `reason`).
    pub fn code(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Signature => "bad_signature",
            Refused::Expired => "expired",
            Refused::OtherRoute => "other_route",
            Refused::OtherIdentity => "other_identity",
        }
    }
}

/// Longest token accepted (a session id, a route path and a subject fit easily).
pub const MAX_TOKEN_LEN: usize = 1024;

fn mac(key: &[u8], text: &str) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(text.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// Issues a token for `claims`.
pub fn issue(key: &[u8], claims: &Claims) -> String {
    let body = B64.encode(serde_json::to_vec(claims).expect("claims serialise"));
    let sig = B64.encode(mac(key, &body));
    format!("{body}.{sig}")
}

/// Verifies a token presented on `route` by a handshake whose verified subject is `subject`,
/// at `now` (Unix seconds).
pub fn verify(key: &[u8], token: &str, route: &str, subject: Option<&str>, now: u64) -> Result<Claims, Refused> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Refused::Malformed);
    }
    let (body, sig) = token.split_once('.').ok_or(Refused::Malformed)?;
    let sig = B64.decode(sig).map_err(|_| Refused::Malformed)?;
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(body.as_bytes());
    m.verify_slice(&sig).map_err(|_| Refused::Signature)?;
    let claims: Claims = B64
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Refused::Malformed)?;
    if claims.expires < now {
        return Err(Refused::Expired);
    }
    if claims.route != route {
        return Err(Refused::OtherRoute);
    }
    if claims.subject.as_deref() != subject {
        return Err(Refused::OtherIdentity);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            session: "01JD3M6W8Y6QX0S5Q5T3B0Z8C4".into(),
            route: "/ws".into(),
            subject: Some("alice".into()),
            expires: 1_000,
            node: Some("node-a".into()),
            anchor: Some(Anchor {
                base: 3,
                prev: Some(Hop {
                    node: "node-z".into(),
                    point: Point {
                        after: Some(41),
                        since_ms: None,
                    },
                }),
                here: Point {
                    after: None,
                    since_ms: Some(1_000_000),
                },
            }),
            channels: false,
        }
    }

    #[test]
    fn issued_tokens_verify_and_bind_their_claims() {
        let t = issue(b"k1", &claims());
        assert!(
            t.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "URL-safe: {t}"
        );
        assert_eq!(verify(b"k1", &t, "/ws", Some("alice"), 999), Ok(claims()));
        assert_eq!(verify(b"k2", &t, "/ws", Some("alice"), 999), Err(Refused::Signature));
        assert_eq!(verify(b"k1", &t, "/ws", Some("alice"), 1_001), Err(Refused::Expired));
        assert_eq!(
            verify(b"k1", &t, "/ws/echo", Some("alice"), 999),
            Err(Refused::OtherRoute)
        );
        assert_eq!(verify(b"k1", &t, "/ws", Some("bob"), 999), Err(Refused::OtherIdentity));
        assert_eq!(verify(b"k1", &t, "/ws", None, 999), Err(Refused::OtherIdentity));
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let t = issue(b"k1", &claims());
        let (body, sig) = t.split_once('.').unwrap();
        // Another session's claims under the first token's signature.
        let mut other = claims();
        other.session = "01JD3M6W8Y6QX0S5Q5T3B0Z8C5".into();
        let forged = format!("{}.{sig}", B64.encode(serde_json::to_vec(&other).unwrap()));
        assert_eq!(verify(b"k1", &forged, "/ws", Some("alice"), 0), Err(Refused::Signature));
        let mut flipped = body.to_owned().into_bytes();
        flipped[3] ^= 1;
        let flipped = format!("{}.{sig}", String::from_utf8(flipped).unwrap());
        assert!(verify(b"k1", &flipped, "/ws", Some("alice"), 0).is_err());
        for bad in ["", ".", "abc", "a.b", &"x".repeat(2000)] {
            assert!(verify(b"k1", bad, "/ws", Some("alice"), 0).is_err(), "{bad}");
        }
    }
}
