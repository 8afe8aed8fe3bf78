//! Names and header tokens: `valid_channel`, `valid_session`, `Naming::new` / `channel` /
//! `channel_of`, `Kind::parse`, `Opcode::parse`, and `partition_for` on arbitrary keys.
//!
//! Properties: each validator agrees with an independent reference; `Naming::new(p)` succeeds
//! exactly when `valid_channel(p)`; `channel_of` inverts `channel` (for every channel) and
//! whatever it returns re-encodes to the topic it came from; `Kind`/`Opcode` parse exactly
//! their `as_str` spellings; a partition is always in range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_fuzz::{check_decode_error, ref_valid_channel, ref_valid_session};
use switchyard_protocol::envelope::valid_session;
use switchyard_protocol::naming::partition_for;
use switchyard_protocol::{valid_channel, Kind, Naming, Opcode};

const KINDS: [Kind; 5] = [
    Kind::Connect,
    Kind::Frame,
    Kind::Disconnect,
    Kind::Deliver,
    Kind::Control,
];
const OPCODES: [Opcode; 2] = [Opcode::Text, Opcode::Binary];

fuzz_target!(|data: &[u8]| {
    // Partitioning takes any key bytes (a session id, or a key a backend chose).
    let parts = u32::from(data.first().copied().unwrap_or(0));
    assert!(partition_for(data, parts) < parts.max(1));

    let Ok(s) = std::str::from_utf8(data) else { return };

    assert_eq!(valid_channel(s), ref_valid_channel(s), "valid_channel({s:?})");
    assert_eq!(valid_session(s), ref_valid_session(s), "valid_session({s:?})");

    match Kind::parse(s) {
        Ok(k) => assert_eq!(k.as_str(), s),
        Err(e) => {
            assert!(KINDS.iter().all(|k| k.as_str() != s), "Kind::parse refused {s:?}");
            check_decode_error(&e);
        }
    }
    match Opcode::parse(s) {
        Ok(o) => assert_eq!(o.as_str(), s),
        Err(e) => {
            assert!(OPCODES.iter().all(|o| o.as_str() != s), "Opcode::parse refused {s:?}");
            check_decode_error(&e);
        }
    }
    for k in KINDS {
        assert_eq!(Kind::parse(k.as_str()), Ok(k));
    }
    for o in OPCODES {
        assert_eq!(Opcode::parse(o.as_str()), Ok(o));
    }

    // Split the input into a prefix and a topic / channel at the first '|'.
    let (prefix, rest) = s.split_once('|').unwrap_or(("sy", s));
    match Naming::new(prefix) {
        Ok(n) => {
            assert!(ref_valid_channel(prefix));
            assert_eq!(n.prefix(), prefix);
            // `rest` as a channel: channel_of inverts channel.
            let topic = n.channel(rest);
            assert_eq!(n.channel_of(&topic), Some(rest), "channel_of({topic:?})");
            // `rest` as a topic off the bus: whatever channel_of returns re-encodes to it.
            if let Some(c) = n.channel_of(rest) {
                assert_eq!(n.channel(c), rest, "channel_of({rest:?}) = {c:?}");
            }
            // Every name built from a valid prefix and a valid channel / topic is valid.
            if ref_valid_channel(rest) {
                for name in [
                    n.channel(rest),
                    n.inbound(rest),
                    n.node(rest),
                    n.inbound_partition(rest, parts),
                ] {
                    if name.len() <= 200 {
                        assert!(valid_channel(&name), "{name:?}");
                    }
                }
            }
        }
        Err(msg) => {
            assert!(!ref_valid_channel(prefix), "Naming::new refused {prefix:?}: {msg}");
        }
    }
});
