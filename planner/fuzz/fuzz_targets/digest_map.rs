//! `cargo +nightly fuzz run digest_map` (from planner/): see `checks.rs`.
#![no_main]

mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::digest_map(data));
