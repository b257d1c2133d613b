//! `cargo +nightly fuzz run server_receive` (from mover/replicate/): frames
//! after an honest handshake into a real target session; see `checks.rs`.
#![no_main]

mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::server_receive(data);
});
