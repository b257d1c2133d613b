//! Integration tests of ferry-wire, in one test binary (as every crate here has: one binary per crate, a module per area).
//!
//! - `roundtrip`: proptest encode/decode of every frame type, whole and split.
//! - `pair`: two in-memory sessions (quinn-proto's `Pair`) with random cuts.
//! - `golden`: the committed v1 byte vectors.
//! - `errors`: every typed error.
//! - `intent`: the optional Intent frame: codec, limits, session rules, skipping.
//! - `corpus`: the fuzz corpus replayed through the fuzz targets' checks.
//! - `zero_copy`: data payloads are slices of the receive buffer.
//! - `split`: data payloads taken apart by the receiver: same frames, errors, rules.

#[path = "../../fuzz/fuzz_targets/checks.rs"]
mod checks;
mod common;

mod corpus;
mod errors;
mod golden;
mod intent;
mod pair;
mod roundtrip;
mod split;
mod zero_copy;
