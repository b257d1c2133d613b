//! Storage of per-chunk digest maps next to replica disks.
//!
//! File format (little-endian), DO NOT MODIFY without a version bump:
//! `b"FRYDMAP1"`, chunk size u32, disk size u64, count u64, `count` digests
//! of 32 bytes, then the BLAKE3 of everything before it. A map whose check,
//! chunk size or disk size does not match is not used: the caller treats the
//! disk's digests as unknown.

use std::path::Path;

use ferry_planner::digest_map::DigestMap;

use crate::error::Result;

/// Marks a chunk whose digest is not known: never equal to a real digest in practice.
pub const UNKNOWN_DIGEST: [u8; 32] = [0xFF; 32];
const MAGIC: &[u8; 8] = b"FRYDMAP1";

/// BLAKE3 of `len` zero bytes, computed without allocating `len` bytes.
pub fn zero_digest(len: u32) -> [u8; 32] {
    static ZEROS: [u8; 65536] = [0; 65536];
    let mut h = blake3::Hasher::new();
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(ZEROS.len());
        h.update(&ZEROS[..n]);
        left -= n;
    }
    *h.finalize().as_bytes()
}

/// A map for a disk of `disk_size`: every chunk `fill`, or the zero digest when `None`.
pub fn filled(chunk_size: u32, disk_size: u64, fill: Option<[u8; 32]>) -> DigestMap {
    let mut m = DigestMap { chunk_size, disk_size: 0, digests: Vec::new() };
    match fill {
        None => resize(&mut m, disk_size),
        Some(d) => {
            m.disk_size = disk_size;
            m.digests = vec![d; disk_size.div_ceil(u64::from(chunk_size)) as usize];
        }
    }
    m
}

/// Resize a map to a new disk size: new chunks are zero (the image grows
/// sparse); a last chunk whose length changes becomes unknown.
pub fn resize(m: &mut DigestMap, disk_size: u64) {
    let cs = u64::from(m.chunk_size);
    let old_count = m.digests.len();
    let new_count = disk_size.div_ceil(cs) as usize;
    if disk_size != m.disk_size && old_count > 0 && m.disk_size % cs != 0 {
        m.digests[old_count - 1] = UNKNOWN_DIGEST;
    }
    m.digests.truncate(new_count);
    let full = zero_digest(m.chunk_size);
    for i in old_count..new_count {
        let len = (disk_size - i as u64 * cs).min(cs) as u32;
        m.digests.push(if len == m.chunk_size { full } else { zero_digest(len) });
    }
    if new_count > 0 && new_count <= old_count && disk_size % cs != 0 && disk_size != m.disk_size {
        m.digests[new_count - 1] = UNKNOWN_DIGEST;
    }
    m.disk_size = disk_size;
}

/// The encoding of a map (see the module docs).
pub fn encode(m: &DigestMap) -> Vec<u8> {
    let mut v = Vec::with_capacity(28 + m.digests.len() * 32 + 32);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&m.chunk_size.to_le_bytes());
    v.extend_from_slice(&m.disk_size.to_le_bytes());
    v.extend_from_slice(&(m.digests.len() as u64).to_le_bytes());
    for d in &m.digests {
        v.extend_from_slice(d);
    }
    let check = blake3::hash(&v);
    v.extend_from_slice(check.as_bytes());
    v
}

/// The hash a client caches the map under.
pub fn map_hash(m: &DigestMap) -> [u8; 32] {
    let e = encode(m);
    e[e.len() - 32..].try_into().expect("32 bytes")
}

/// Decode a map; `None` when it is corrupt or truncated.
pub fn decode(b: &[u8]) -> Option<DigestMap> {
    if b.len() < 28 + 32 || &b[..8] != MAGIC {
        return None;
    }
    let (body, check) = b.split_at(b.len() - 32);
    if blake3::hash(body).as_bytes() != check {
        return None;
    }
    let chunk_size = u32::from_le_bytes(body[8..12].try_into().ok()?);
    let disk_size = u64::from_le_bytes(body[12..20].try_into().ok()?);
    let count = u64::from_le_bytes(body[20..28].try_into().ok()?) as usize;
    if body.len() != 28 + count.checked_mul(32)? || chunk_size == 0 {
        return None;
    }
    if disk_size.div_ceil(u64::from(chunk_size)) != count as u64 {
        return None;
    }
    let digests = body[28..].chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect();
    Some(DigestMap { chunk_size, disk_size, digests })
}

/// Load the map at `path` if it exists, is intact and matches the chunk and disk size.
pub fn load(path: &Path, chunk_size: u32, disk_size: u64) -> Option<DigestMap> {
    let b = std::fs::read(path).ok()?;
    decode(&b).filter(|m| m.chunk_size == chunk_size && m.disk_size == disk_size)
}

/// Store a map atomically and durably.
pub fn store(path: &Path, m: &DigestMap) -> Result<()> {
    let dir = path.parent().expect("digest map lives in a directory");
    let name = path.file_name().expect("file name").to_string_lossy();
    crate::target::datastore::write_atomic(dir, &name, &encode(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_digest_matches_direct_hash() {
        for len in [1u32, 4096, 65536, 65537, 300_000] {
            assert_eq!(zero_digest(len), *blake3::hash(&vec![0u8; len as usize]).as_bytes());
        }
    }

    #[test]
    fn encode_decode_and_corruption() {
        let mut m = filled(65536, 200_000, None);
        m.digests[1] = [7; 32];
        let e = encode(&m);
        assert_eq!(decode(&e).unwrap(), m);
        let mut bad = e.clone();
        bad[40] ^= 1;
        assert!(decode(&bad).is_none());
        assert!(decode(&e[..e.len() - 1]).is_none());
    }

    #[test]
    fn resize_marks_changed_tail_unknown() {
        let mut m = filled(65536, 100_000, None); // 2 chunks, last partial
        resize(&mut m, 300_000);
        assert_eq!(m.digests.len(), 5);
        assert_eq!(m.digests[1], UNKNOWN_DIGEST);
        assert_eq!(m.digests[2], zero_digest(65536));
        assert_eq!(m.digests[4], zero_digest((300_000 - 4 * 65536) as u32));
        resize(&mut m, 70_000);
        assert_eq!(m.digests.len(), 2);
        assert_eq!(m.digests[1], UNKNOWN_DIGEST);
    }
}
