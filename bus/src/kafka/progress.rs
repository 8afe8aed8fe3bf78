//! What a consumer-group member has received and handled, per partition: the offset up to
//! which everything is handled is the one it may commit (acknowledged subscriptions).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// A group member's progress per (topic, partition).
pub(super) type Progresses = Arc<Mutex<HashMap<(Arc<str>, i32), PartitionProgress>>>;

/// What a group member has received and handled of one partition.
#[derive(Default)]
pub(super) struct PartitionProgress {
    /// Received, not yet handled.
    pending: std::collections::BTreeSet<i64>,
    highest: Option<i64>,
    stored: Option<i64>,
}

impl PartitionProgress {
    pub(super) fn delivered(&mut self, offset: i64) {
        // Nothing before the first offset received is this member's to store.
        self.stored = self.stored.or(Some(offset - 1));
        self.pending.insert(offset);
        self.highest = self.highest.max(Some(offset));
    }

    /// Marks `offset` handled; returns the offset up to which everything received is handled,
    /// when that moved forward.
    pub(super) fn handled(&mut self, offset: i64) -> Option<i64> {
        self.pending.remove(&offset);
        let upto = match self.pending.first() {
            Some(&oldest) => Some(oldest - 1),
            None => self.highest,
        };
        match upto {
            Some(u) if upto > self.stored => {
                self.stored = upto;
                Some(u)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PartitionProgress;

    #[test]
    fn commits_only_below_the_oldest_unhandled_offset() {
        let mut p = PartitionProgress::default();
        for o in 10..15 {
            p.delivered(o);
        }
        assert_eq!(p.handled(12), None, "10 and 11 are not handled yet");
        assert_eq!(p.handled(10), Some(10));
        assert_eq!(p.handled(11), Some(12), "12 was handled before: up to 12");
        assert_eq!(p.handled(14), None);
        assert_eq!(p.handled(13), Some(14));
        assert_eq!(p.handled(13), None, "a second ack moves nothing");
    }
}
