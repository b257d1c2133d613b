//! `cargo +nightly fuzz run nbd_decoders` (from mover/nbd/): NBD reply, greeting
//! and option reply decoders on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_nbd::proto::fuzz_decoders(data);
});
