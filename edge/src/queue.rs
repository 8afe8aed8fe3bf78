//! The bounded outgoing queue of one socket.
//!
//! Producers (channel fan-out, node delivery, the session's own replies) push; the socket's one
//! writer task takes everything queued at once and writes it with a single flush, so bursts
//! coalesce naturally without a timer. When the queue is full the route's [`SlowPolicy`] decides:
//! drop the oldest message, or close the socket with 4008. Both are counted by the caller.

use crate::config::SlowPolicy;
use parking_lot::Mutex;
use std::collections::VecDeque;
use tokio::sync::Notify;
use tungstenite::Message;

/// What the writer should do next.
#[derive(Debug)]
pub enum Out {
    Msg(Message),
    /// Send a close frame with this code and reason, then stop writing.
    Close(u16, String),
}

/// Result of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Queued after dropping the oldest message (policy `drop_oldest`).
    DroppedOldest,
    /// Queue full under policy `close`: the socket is being closed with 4008; message dropped.
    Overflowed,
    /// The socket is already closing; message dropped.
    Closed,
}

struct State {
    items: VecDeque<Out>,
    closing: bool,
}

pub struct OutQueue {
    state: Mutex<State>,
    notify: Notify,
    cap: usize,
    policy: SlowPolicy,
}

impl OutQueue {
    pub fn new(cap: usize, policy: SlowPolicy) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closing: false,
            }),
            notify: Notify::new(),
            cap: cap.max(1),
            policy,
        }
    }

    /// Queues a data message under the slow-consumer policy.
    pub fn push(&self, msg: Message) -> Push {
        let mut s = self.state.lock();
        if s.closing {
            return Push::Closed;
        }
        let mut res = Push::Queued;
        if s.items.len() >= self.cap {
            match self.policy {
                SlowPolicy::DropOldest => {
                    s.items.pop_front();
                    res = Push::DroppedOldest;
                }
                SlowPolicy::Close => {
                    self.close_slow(s);
                    return Push::Overflowed;
                }
            }
        }
        let was_empty = s.items.is_empty();
        s.items.push_back(Out::Msg(msg));
        drop(s);
        // The writer takes everything at once and waits only after seeing the queue empty
        // (under the lock), so only the push that makes it non-empty needs to wake it.
        if was_empty {
            self.notify.notify_one();
        }
        res
    }

    /// Queues a message the protocol requires (welcome, acks, errors). These are not subject
    /// to drop-oldest, but a client that lets twice the queue size pile up (e.g. by sending
    /// garbage without reading the errors) is closed with 4008 all the same.
    pub fn push_control(&self, msg: Message) -> bool {
        let mut s = self.state.lock();
        if s.closing {
            return false;
        }
        if s.items.len() >= self.cap.saturating_mul(2) {
            self.close_slow(s);
            return false;
        }
        let was_empty = s.items.is_empty();
        s.items.push_back(Out::Msg(msg));
        drop(s);
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Marks the queue closing and queues the 4008 close (the message that overflowed is dropped).
    fn close_slow(&self, mut s: parking_lot::MutexGuard<'_, State>) {
        s.closing = true;
        s.items.push_back(Out::Close(
            switchyard_protocol::close::SLOW_CONSUMER,
            "slow consumer".into(),
        ));
        drop(s);
        self.notify.notify_one();
    }

    /// Asks the writer to close the socket after what is already queued. Returns false when a
    /// close was already requested.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        let mut s = self.state.lock();
        if s.closing {
            return false;
        }
        s.closing = true;
        s.items.push_back(Out::Close(code, reason.to_owned()));
        drop(s);
        self.notify.notify_one();
        true
    }

    pub fn is_closing(&self) -> bool {
        self.state.lock().closing
    }

    pub fn len(&self) -> usize {
        self.state.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until something is queued, then moves all of it into `batch`.
    pub async fn take_all(&self, batch: &mut VecDeque<Out>) {
        loop {
            {
                let mut s = self.state.lock();
                if !s.items.is_empty() {
                    std::mem::swap(&mut s.items, batch);
                    return;
                }
            }
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    #[tokio::test]
    async fn drop_oldest_keeps_newest() {
        let q = OutQueue::new(2, SlowPolicy::DropOldest);
        assert_eq!(q.push(text("1")), Push::Queued);
        assert_eq!(q.push(text("2")), Push::Queued);
        assert_eq!(q.push(text("3")), Push::DroppedOldest);
        let mut b = VecDeque::new();
        q.take_all(&mut b).await;
        let got: Vec<_> = b
            .iter()
            .map(|o| match o {
                Out::Msg(Message::Text(t)) => t.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, ["2", "3"]);
    }

    #[tokio::test]
    async fn protocol_replies_are_bounded_too() {
        let q = OutQueue::new(2, SlowPolicy::DropOldest);
        for _ in 0..4 {
            assert!(q.push_control(text("err")));
        }
        assert!(
            !q.push_control(text("err")),
            "past twice the queue size the socket closes"
        );
        let mut b = VecDeque::new();
        q.take_all(&mut b).await;
        assert!(matches!(b.back(), Some(Out::Close(4008, _))));
    }

    #[tokio::test]
    async fn close_policy_closes_once() {
        let q = OutQueue::new(1, SlowPolicy::Close);
        assert_eq!(q.push(text("1")), Push::Queued);
        assert_eq!(q.push(text("2")), Push::Overflowed);
        assert_eq!(q.push(text("3")), Push::Closed);
        assert!(!q.close(1000, "x"));
        let mut b = VecDeque::new();
        q.take_all(&mut b).await;
        assert!(matches!(b.back(), Some(Out::Close(4008, _))));
        assert_eq!(b.len(), 2);
    }
}
