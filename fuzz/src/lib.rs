//! Helpers shared by the fuzz targets: reference implementations written independently of
//! `switchyard-protocol` (so a target can compare the two), generators of well-formed values
//! for round-trip targets, and the checks every decoder error must pass.

mod canonical;
mod checks;
mod equality;
mod generators;
mod reference;
mod ws_reference;

pub use canonical::*;
pub use checks::*;
pub use equality::*;
pub use generators::*;
pub use reference::*;
pub use ws_reference::*;
