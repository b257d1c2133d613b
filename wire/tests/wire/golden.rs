//! Golden byte vectors: protocol v1 as committed in `tests/golden/frames.hex`.
//!
//! DO NOT re-bless to make a failing test pass: a difference is a wire format
//! change, i.e. a new protocol version. `FERRY_BLESS=1` rewrites the file
//! (only for frames added on purpose).

use std::fmt::Write as _;
use std::path::PathBuf;

use ferry_wire::*;

use crate::common::known_frames;

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/frames.hex")
}

fn to_hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Parse `name hex` lines; `#` starts a comment line.
pub fn read_golden() -> Vec<(String, Vec<u8>)> {
    let text = std::fs::read_to_string(golden_path()).expect("tests/golden/frames.hex");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, hex) = l.split_once(' ').expect("`name hex`");
            let hex = hex.trim();
            let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            (name.to_string(), bytes)
        })
        .collect()
}

#[test]
fn golden_vectors_pin_v1() {
    if std::env::var_os("FERRY_BLESS").is_some() {
        let mut out = String::from(
            "# ferry wire protocol v1: golden frames (name, then header and body in hex).\n\
             # DO NOT MODIFY: a change here is a new protocol version. See wire/PROTOCOL.md.\n",
        );
        for (name, f) in known_frames() {
            let _ = writeln!(out, "{name} {}", to_hex(&f.to_bytes()));
        }
        std::fs::write(golden_path(), out).unwrap();
    }
    let golden = read_golden();
    let known = known_frames();
    assert_eq!(golden.len(), known.len(), "one golden vector per known frame");
    for ((gname, gbytes), (name, frame)) in golden.iter().zip(&known) {
        assert_eq!(gname, name);
        assert_eq!(to_hex(&frame.to_bytes()), to_hex(gbytes), "encoding of {name} drifted from v1");
        assert_eq!(decode_one(gbytes).as_ref(), Ok(frame), "decoding of golden {name}");
    }
}

/// Every v1 frame type has a golden vector.
#[test]
fn golden_vectors_cover_every_frame_type() {
    let mut types: Vec<u8> = read_golden().iter().map(|(_, b)| b[2]).collect();
    types.sort_unstable();
    types.dedup();
    let v1: Vec<u8> = (0..=255u8).filter(|t| type_name(*t) != "Unknown").collect();
    for t in v1 {
        assert!(types.contains(&t), "no golden vector for frame type {t:#04x} ({})", type_name(t));
    }
}

/// Spot checks of the header against the spec, by hand.
#[test]
fn header_layout_by_hand() {
    // Close: type 0x7F, no flags, empty body.
    let h = encode_header(0x7F, 0, 0);
    assert_eq!(&h[..8], &[0xFE, 0x52, 0x7F, 0x00, 0, 0, 0, 0]);
    // FNV-1a 32 over bytes 0..8, little-endian.
    let mut fnv: u32 = 0x811c_9dc5;
    for b in &h[..8] {
        fnv = (fnv ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    assert_eq!(&h[8..], &fnv.to_le_bytes());
    assert_eq!(header_check(b""), 0x811c_9dc5);
    assert_eq!(header_check(b"a"), 0xe40c_292c); // FNV-1a test vector
    assert_eq!(Frame::Close.to_bytes()[..], h[..]);
    // Keepalive carries FLAG_OPTIONAL.
    assert_eq!(Frame::Keepalive.to_bytes()[3], FLAG_OPTIONAL);
    // A data frame's body length is its fixed fields plus the payload.
    assert_eq!(DATA_FIXED_LEN, 49);
}
