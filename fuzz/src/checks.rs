//! Error checks: nothing a decoder echoes back may be unbounded.

use switchyard_protocol::DecodeError;

// Error checks: nothing a decoder echoes back (to a log, a client, a metric) may be unbounded.

pub fn check_decode_error(e: &DecodeError) {
    match e {
        DecodeError::Invalid { value, .. } => {
            assert!(value.len() <= 64, "DecodeError::Invalid echoes {} bytes", value.len())
        }
        DecodeError::Version(v) => assert!(v.chars().count() <= 16, "DecodeError::Version echoes {v:?}"),
        DecodeError::MissingSession | DecodeError::Missing(_) => {}
    }
    // Display must not panic either.
    let _ = e.to_string();
}
