//! The two states of a session's end, kept by its future ([`super::conn::Conn`]): what the
//! writer still owes the socket ([`Write`]) and whether the session is closing, until when and
//! why ([`Ending`]).

use super::Ended;
use tokio::time::Instant;

/// The writer's state.
pub(super) enum Write {
    /// Writing what the queue hands over.
    Open,
    /// The batch being written ends with our close frame (this one).
    Closing(Ended),
    /// Nothing more will be written: our close frame is on the wire (`failed` false), or the
    /// socket failed; `sent` is the close frame we had sent or were sending.
    Done { sent: Option<Ended>, failed: bool },
}

/// The session's state as far as ending goes.
pub(super) enum Ending {
    /// Running.
    Open,
    /// Closing: we closed (drain, flood, expiry, rate) or were closed from outside (a backend
    /// close, a 4008, seen once its close frame is in the writer's batch or the writer is
    /// stuck). The client may answer until `until`; `why` is why we closed, when it was us.
    Closing { until: Instant, why: Option<Ended> },
}

impl Ending {
    pub(super) fn is_open(&self) -> bool {
        matches!(self, Ending::Open)
    }
    pub(super) fn until(&self) -> Option<Instant> {
        match self {
            Ending::Open => None,
            Ending::Closing { until, .. } => Some(*until),
        }
    }
    pub(super) fn why(&self) -> Option<&Ended> {
        match self {
            Ending::Closing { why: Some(w), .. } => Some(w),
            _ => None,
        }
    }
    /// Why we closed, if we did (taken: the session ends with it).
    pub(super) fn take_why(&mut self) -> Option<Ended> {
        match self {
            Ending::Closing { why, .. } => why.take(),
            Ending::Open => None,
        }
    }
}
