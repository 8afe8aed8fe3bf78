//! The benchmark payload and exact per-client accounting.
//!
//! Every published message is a JSON object `{"s":SEQ,"t":SCHED_NS,"k":STEP,"p":"xx…"}` padded
//! to the requested size: `s` is the sequence number (0 = warm-up probe, never counted), `t` the
//! *scheduled* send time in ns since the run's clock origin (open loop: latency = receive time −
//! scheduled time), `k` the ramp step (hot scenario; 0 otherwise). Receivers find the fields by
//! byte search, so the same parser works on the raw payload (Pushpin, NATS) and inside the framed
//! wrapper `{"channel":C,"offset":N,"data":{...}}` (Switchyard, baseline).

use memchr::memmem;

/// Builds one payload of at least `size` bytes (exactly `size` when the fields fit).
pub(crate) fn build(seq: u64, sched_ns: u64, step: usize, size: usize) -> Vec<u8> {
    let head = format!("{{\"s\":{seq},\"t\":{sched_ns},\"k\":{step},\"p\":\"");
    let fixed = head.len() + 2; // + `"}`
    let pad = size.saturating_sub(fixed);
    let mut v = Vec::with_capacity(fixed + pad);
    v.extend_from_slice(head.as_bytes());
    v.resize(head.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    v
}

/// The fields of a received payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub seq: u64,
    pub sched_ns: u64,
    pub step: usize,
}

fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = memmem::find(hay, key)? + key.len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    std::str::from_utf8(&hay[at..at + digits]).ok()?.parse().ok()
}

/// Finds `s`, `t` and `k` in a received frame; `None` for anything else (acks, welcome, ...).
/// Each key is searched on its own: a server may re-serialise the object with its keys in
/// another order (the baseline's serde_json sorts them).
pub(crate) fn parse(frame: &[u8]) -> Option<Stamp> {
    Some(Stamp {
        seq: number_after(frame, b"\"s\":")?,
        sched_ns: number_after(frame, b"\"t\":")?,
        step: number_after(frame, b"\"k\":").unwrap_or(0) as usize,
    })
}

/// Exact receive accounting for one client: a bit per sequence number.
#[derive(Default)]
pub(crate) struct Tally {
    bits: Vec<u64>,
    /// Distinct sequence numbers received.
    pub unique: u64,
    /// Receipts of a sequence number already seen.
    pub dup: u64,
}

impl Tally {
    /// Marks `seq` received; true if it is new.
    pub(crate) fn mark(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.bits.len() {
            self.bits.resize(w + 1, 0);
        }
        let mask = 1u64 << b;
        if self.bits[w] & mask != 0 {
            self.dup += 1;
            false
        } else {
            self.bits[w] |= mask;
            self.unique += 1;
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_exact_size() {
        for size in [64, 512] {
            let p = build(12345, 987654321, 3, size);
            assert_eq!(p.len(), size);
            serde_json::from_slice::<serde_json::Value>(&p).unwrap();
            let want = Stamp {
                seq: 12345,
                sched_ns: 987654321,
                step: 3,
            };
            assert_eq!(parse(&p), Some(want));
            let mut wrapped = br#"{"channel":"bench","offset":77,"data":"#.to_vec();
            wrapped.extend_from_slice(&p);
            wrapped.push(b'}');
            assert_eq!(parse(&wrapped), Some(want));
        }
        assert_eq!(parse(br#"{"op":"welcome","session":"01J"}"#), None);
        let sorted = br#"{"channel":"bench","data":{"k":2,"p":"xx","s":5,"t":9},"offset":1}"#;
        let want = Stamp {
            seq: 5,
            sched_ns: 9,
            step: 2,
        };
        assert_eq!(parse(sorted), Some(want));
    }

    #[test]
    fn tally_counts_dups() {
        let mut t = Tally::default();
        assert!(t.mark(1));
        assert!(t.mark(200));
        assert!(!t.mark(1));
        assert_eq!((t.unique, t.dup), (2, 1));
    }
}
