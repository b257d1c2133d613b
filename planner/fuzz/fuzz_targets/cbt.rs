//! `cargo +nightly fuzz run cbt` (from planner/): see `checks.rs`.
#![no_main]

mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::cbt(data));
