//! Arbitrary bytes into a server or client Session driven to some state
//! (the first byte picks which): must never panic. See `checks.rs`.
#![no_main]

mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::session(data));
