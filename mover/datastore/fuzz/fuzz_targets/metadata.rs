//! `cargo +nightly fuzz run metadata` (from mover/datastore/): the catalog,
//! session state and undo file readers on arbitrary bytes; see `checks.rs`.
#![no_main]

mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::metadata(data));
