//! `cargo +nightly fuzz run backup_manifest` (from planner/): see `checks.rs`.
#![no_main]

mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::backup_manifest(data));
