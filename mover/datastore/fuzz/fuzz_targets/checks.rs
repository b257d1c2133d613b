//! The check behind the datastore's `metadata` fuzz target, shared with the
//! stable corpus replay test (`tests/corpus.rs` includes this file).
//!
//! The first byte chooses the reader; the rest is the file:
//! - 0: `catalog.json` ([`decode_catalog`]): what it accepts re-encodes (with a
//!   fresh checksum) to bytes that decode to the same catalog, and a catalog
//!   with a checksum refuses any changed byte of its checksummed encoding;
//! - 1: `session.json` (the session state a resumed session reads);
//! - 2: an undo file ([`UndoReader`]), read as the latest point's (a torn tail
//!   is cut) and as an older point's (every record must check out): every
//!   record it keeps reads back with its digest, lies inside the file, and the
//!   strict reading accepts a file only where the tolerant one found no tear.

#![allow(dead_code)]

use std::path::Path;

use ferry_datastore::store::{decode_catalog, encode_catalog, SessionState};
use ferry_datastore::undo::{Tail, UndoReader};

/// Run the reader the first byte chooses on the rest.
pub fn metadata(data: &[u8]) {
    let Some((&which, file)) = data.split_first() else { return };
    match which % 3 {
        0 => catalog(file),
        1 => {
            let _ = serde_json::from_slice::<SessionState>(file);
        }
        _ => undo(file),
    }
}

fn catalog(bytes: &[u8]) {
    let path = Path::new("catalog.json");
    let Ok(c) = decode_catalog(path, bytes) else { return };
    let again = encode_catalog(&c);
    let d = decode_catalog(path, &again).expect("a fresh encoding decodes");
    assert_eq!((d.version, d.next_id, &d.points), (c.version, c.next_id, &c.points));
    if c.checksum.is_some() {
        // Any changed byte of a checksummed catalog is found (unless it leaves the JSON equal
        // in meaning: whitespace outside strings is not covered, so only change a digit).
        if let Some(at) = bytes.iter().position(|b| b.is_ascii_digit()) {
            let mut bad = bytes.to_vec();
            bad[at] = if bad[at] == b'9' { b'8' } else { bad[at] + 1 };
            assert!(decode_catalog(path, &bad).is_err(), "a changed digit at {at} was accepted");
        }
    }
}

fn undo(bytes: &[u8]) {
    let dir = tempfile::Builder::new().prefix("ferry-fuzz-undo-").tempdir_in(scratch()).expect("scratch dir");
    let path = dir.path().join("sda.undo");
    std::fs::write(&path, bytes).expect("write");
    let tolerant = UndoReader::open(&path, Tail::MayBeTorn);
    let strict = UndoReader::open(&path, Tail::Complete(None));
    if let Ok(u) = &tolerant {
        assert!(u.valid_end <= bytes.len() as u64);
        assert!(u.records.len() as u64 <= u.count);
        let mut buf = vec![0u8; u.chunk_size as usize];
        for loc in u.records.values() {
            assert!(loc.data_offset + u64::from(loc.len) <= u.valid_end || loc.zero);
            u.read(loc, &mut buf).expect("a kept record reads");
        }
        assert_eq!(strict.is_ok(), !u.torn, "the strict reading disagrees with the tolerant one");
    } else {
        assert!(strict.is_err(), "the strict reading accepted what the tolerant one refused");
    }
}

/// Where fuzz files go: tmpfs when there is one.
fn scratch() -> std::path::PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
