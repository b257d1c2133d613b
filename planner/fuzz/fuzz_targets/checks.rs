//! The checks behind the planner's fuzz targets, shared with the stable corpus
//! replay test (`tests/planner/corpus.rs` includes this file), so `cargo test`
//! runs every corpus input through exactly what the fuzzers run.
//!
//! Each check takes arbitrary bytes, must never panic on them, and asserts
//! what a decoder promises about anything it accepts.

#![allow(dead_code)]

use ferry_planner::backup::parse_manifest;
use ferry_planner::time::{format_rfc3339, parse_rfc3339};
use ferry_planner::{parse_cbt_with_format, DigestMap};

/// Splits off a little-endian u64 prefix (zero-padded when short).
fn prefix_u64(data: &[u8]) -> (u64, &[u8]) {
    let n = data.len().min(8);
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&data[..n]);
    (u64::from_le_bytes(b), &data[n..])
}

/// CBT exports (VMware QueryChangedDiskAreas, extent lists, `nbdinfo --map`):
/// the first 8 bytes give the disk size, the rest is the file. An accepted map
/// is sorted, coalesced, non-empty extents inside the disk, and its chunk set
/// (at 64 KiB) names only chunks of the disk.
pub fn cbt(data: &[u8]) {
    let (size, content) = prefix_u64(data);
    // Sizes up to 2^50 (1 PiB): larger ones only make the chunk walk slow.
    let disk_size = size & ((1 << 50) - 1);
    let Ok((map, _format)) = parse_cbt_with_format("fuzz", content, disk_size) else { return };
    let mut end = 0u64;
    for (i, e) in map.extents().iter().enumerate() {
        assert!(e.len > 0, "empty extent {e:?}");
        assert!(i == 0 || e.offset > end, "extents overlap or touch at {e:?}");
        end = e.offset.checked_add(e.len).expect("extent end overflows");
        assert!(end <= disk_size, "extent {e:?} past the disk ({disk_size})");
    }
    assert!(map.bytes() <= disk_size);
    let chunk = 64 * 1024u32;
    let count = disk_size.div_ceil(u64::from(chunk));
    let set = map.chunks(chunk, disk_size);
    if let Some(last) = set.ranges().last() {
        assert!(last.end <= count, "chunk {} past the disk's {count}", last.end);
    }
    assert!(set.bytes(chunk, disk_size) >= map.bytes());
}

/// Digest-map files: whatever decodes re-encodes to the same bytes, and the
/// word-wise decoder agrees. The input is also read the other way round: its
/// first 12 bytes choose a (small) geometry, the rest fills digests, and that
/// map must round-trip and refuse every single-bit flip of its encoding.
pub fn digest_map(data: &[u8]) {
    if let Ok(m) = DigestMap::decode("fuzz", data) {
        assert_eq!(m.encode(), data, "decode then encode changed the bytes");
        assert_eq!(m.chunk_count(), m.to_digests().len() as u64);
    }
    if data.len() < 12 {
        return;
    }
    let chunk_size = ferry_planner::MIN_CHUNK_SIZE << (data[0] % 5); // 64 KiB .. 1 MiB
    let disk_size = u64::from(u32::from_le_bytes(data[4..8].try_into().unwrap()) % (1 << 24));
    let Ok(mut m) = DigestMap::new(chunk_size, disk_size) else { return };
    let body = &data[12..];
    for i in 0..m.chunk_count() {
        let mut d = [0u8; 32];
        for (j, b) in d.iter_mut().enumerate() {
            *b = body.get((i as usize * 32 + j) % body.len().max(1)).copied().unwrap_or(0) ^ i as u8;
        }
        m.set(i, d);
    }
    let enc = m.encode();
    let back = DigestMap::decode("fuzz", &enc).expect("a fresh encoding decodes");
    assert_eq!(back.encode(), enc);
    let bit = u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize % (enc.len() * 8);
    let mut bad = enc.clone();
    bad[bit / 8] ^= 1 << (bit % 8);
    assert!(DigestMap::decode("fuzz", &bad).is_err(), "a flipped bit {bit} was accepted");
}

/// Backup manifests: an accepted manifest has a sane VM name and disk entries,
/// and its point time formats back to the same instant.
pub fn backup_manifest(data: &[u8]) {
    let Ok((m, t)) = parse_manifest("fuzz", data) else { return };
    assert!(!m.vm.is_empty() && !m.vm.contains('/'));
    assert!(!m.disks.is_empty());
    for (name, file) in &m.disks {
        assert!(!name.is_empty() && !name.contains('/') && !file.is_empty());
    }
    assert_eq!(parse_rfc3339(&format_rfc3339(t)), Ok(t), "time {} does not round-trip", m.point_time);
}
