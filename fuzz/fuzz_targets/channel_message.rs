//! Channel messages: `framed::channel_message` turns a bus record's payload (written by anyone
//! with bus access) into the JSON text a framed client receives. The payload must come out
//! intact (as JSON, as a JSON string, or base64) and must not be able to change the message's
//! shape (add keys, break the JSON).
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Unstructured;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::Value;
use switchyard_fuzz::arb_channel;
use switchyard_protocol::framed;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(channel) = arb_channel(&mut u) else { return };
    let Ok(offset) = u.arbitrary::<Option<u64>>() else {
        return;
    };
    let payload = u.take_rest();

    let msg = framed::channel_message(&channel, offset, payload);
    // Parsed with the JSON grammar only (numbers kept as text): the message is one object
    // with exactly these keys.
    let obj: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(&msg).unwrap_or_else(|e| panic!("{msg:?} is not a JSON object: {e}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let text = std::str::from_utf8(payload);
    let is_json = matches!(text, Ok(t) if serde_json::from_str::<IgnoredAny>(t).is_ok());
    let data_key = if text.is_ok() { "data" } else { "data_b64" };
    let mut want = vec!["channel", data_key];
    if offset.is_some() {
        want.push("offset");
    }
    want.sort_unstable();
    assert_eq!(keys, want, "keys of {msg:?}");
    assert_eq!(serde_json::from_str::<String>(obj["channel"].get()).unwrap(), channel);
    if let Some(o) = offset {
        assert_eq!(obj["offset"].get(), o.to_string());
    }
    match text {
        Ok(t) if is_json => {
            assert_eq!(obj["data"].get(), t.trim(), "JSON payload changed");
            // Where a strict parser reads the payload, it reads the message the same way.
            if let Ok(expected) = serde_json::from_str::<Value>(t) {
                let v: Value = serde_json::from_str(&msg).expect("message not parseable, payload was");
                assert_eq!(v["data"], expected);
            }
        }
        Ok(t) => {
            let s: String = serde_json::from_str(obj["data"].get()).expect("text payload not a JSON string");
            assert_eq!(s, t, "text payload changed");
        }
        Err(_) => {
            let b64: String = serde_json::from_str(obj["data_b64"].get()).expect("data_b64 not a string");
            let back = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("data_b64 is not base64");
            assert_eq!(back, payload, "binary payload changed");
        }
    }
});
