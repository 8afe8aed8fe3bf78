//! Moving a session from one edge to another (a resume on another node, a drain).
//!
//! Records of kind `handover` travel on node delivery subjects only, never on a backend's
//! topics. `sy-handover` names the step:
//!
//! 1. `take` (new edge → the node in the resume token): "hand `sy-session` over to `sy-node`;
//!    the client has had `delivered` deliveries". Payload: [`Take`].
//! 2. `state` (old edge → new edge): the session's kept deliveries after `delivered`, the next
//!    delivery number, the inbound seq, the accepted ids and the channels, or why not
//!    ([`State::refused`]). From then on the old edge passes every record for the session on
//!    to the new node, marked `sy-forwarded`.
//! 3. `moved` (router → old edge): the router now sends the session's records to `sy-node`;
//!    everything it sent the old edge before is ahead of this record.
//! 4. `end` (old edge → new edge): nothing more will be passed on in order. The new edge held
//!    the router's records for the session until here, so the client gets every delivery once,
//!    in order.
//!
//! `gone` (new edge → old edge): a `state` came that the new edge did not take after all (its
//! resume had given up waiting): the old edge ends the session and publishes its disconnect,
//! or, when the payload is `resumed` (the new edge resumed it from the bus's log meanwhile),
//! lets it go without one.

use serde::{Deserialize, Serialize};

/// Step names (`sy-handover`).
pub const TAKE: &str = "take";
pub const STATE: &str = "state";
pub const MOVED: &str = "moved";
pub const END: &str = "end";
pub const GONE: &str = "gone";
/// The payload of a `gone` whose session was resumed on the new edge from the log (its node
/// did not answer in time): the old node lets it go without a disconnect.
pub const RESUMED: &str = "resumed";

/// What a new edge asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Take {
    /// Deliveries the client says it received.
    pub delivered: u64,
    /// The route the client resumed on (the token was checked against it).
    pub route: String,
}

/// One kept delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub n: u64,
    /// The payload, base64.
    pub data_b64: String,
    pub binary: bool,
}

/// The old edge's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Why the session cannot be handed over (the `reason` the client is told); the rest is
    /// empty then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The next delivery's number.
    #[serde(default)]
    pub next: u64,
    /// Kept deliveries after the client's `delivered`, oldest first.
    #[serde(default)]
    pub kept: Vec<Kept>,
    /// The inbound seq of the session's last record.
    #[serde(default)]
    pub seq: u64,
    /// The ids of its last accepted sends and publishes, oldest first.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Channels it was on (raw routes keep them while away).
    #[serde(default)]
    pub channels: Vec<String>,
    /// Where the old node's log goes on from (its deliveries for the session after this point
    /// are numbered from `next`), when it can tell: see [`crate::resume::Anchor`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<crate::resume::Point>,
}

impl State {
    pub fn refused(why: &str) -> Self {
        Self {
            refused: Some(why.to_owned()),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_round_trips_and_a_refusal_is_small() {
        let s = State {
            refused: None,
            next: 7,
            kept: vec![Kept {
                n: 6,
                data_b64: "aGk".into(),
                binary: false,
            }],
            seq: 12,
            ids: vec!["a".into()],
            channels: vec!["ticker.x".into()],
            point: Some(crate::resume::Point {
                after: Some(9),
                since_ms: None,
            }),
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<State>(&text).unwrap(), s);
        assert_eq!(
            serde_json::to_string(&State::refused("not_parked")).unwrap(),
            r#"{"refused":"not_parked","next":0,"kept":[],"seq":0,"ids":[],"channels":[]}"#
        );
    }
}
