//! Digest maps stored next to replica disks (the format is the planner's
//! [`DigestMap`] encoding, checked by its trailing BLAKE3).
//!
//! A map that is missing, corrupt, or made for another chunk or disk size is
//! never used: [`load`] returns `None` and the caller starts from a map that
//! is all unknown (an existing image) or all zero (a new, sparse image).

use std::io::Read;
use std::path::Path;

pub use ferry_planner::{DigestMap, ZeroDigests, UNKNOWN_DIGEST};

use crate::error::Result;

/// Load the map at `path` if it exists, is intact and matches the chunk and disk size.
pub fn load(path: &Path, chunk_size: u32, disk_size: u64) -> Option<DigestMap> {
    // Read straight into 32-byte words that become the digests: one allocation of the
    // map's size (fresh memory costs a page fault per 4 KiB), no second buffer (the
    // header word is shifted out in place).
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if len != DigestMap::encoded_len(chunk_size, disk_size) {
        return None;
    }
    let mut words = vec![[0u8; 32]; (len / 32) as usize];
    f.read_exact(words.as_flattened_mut()).ok()?;
    DigestMap::decode_words(&path.display().to_string(), words)
        .ok()
        .filter(|m| m.chunk_size() == chunk_size && m.disk_size() == disk_size)
}

/// Store a map atomically and durably.
pub fn store(path: &Path, m: &DigestMap) -> Result<()> {
    let dir = path.parent().expect("digest map lives in a directory");
    let name = path.file_name().expect("file name").to_string_lossy();
    let (header, digests, trailer) = m.encoded_parts();
    crate::store::write_atomic_parts(dir, &name, &[&header, digests, &trailer])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_load_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.digests");
        let zeros = ZeroDigests::new(65536);
        let mut m = DigestMap::zeroed(65536, 200_000, &zeros).unwrap();
        m.set(1, [7; 32]);
        store(&p, &m).unwrap();
        assert_eq!(load(&p, 65536, 200_000).unwrap(), m);
        assert!(load(&p, 131072, 200_000).is_none(), "other chunk size");
        assert!(load(&p, 65536, 200_001).is_none(), "other disk size");
        let mut b = std::fs::read(&p).unwrap();
        b[40] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(load(&p, 65536, 200_000).is_none(), "corrupt");
    }
}
