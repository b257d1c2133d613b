//! Arbitrary bytes into a Deframer: decode all frames, whole and split; every
//! decoded frame re-encodes to bytes that decode equal. See `checks.rs`.
#![no_main]

mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::frame_decoder(data));
