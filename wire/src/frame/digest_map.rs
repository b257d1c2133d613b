//! Digest map frames (types `0x20..`): the target's digests of a disk's chunks.

use bytes::Bytes;

use super::DIGEST_LEN;

/// Ask for the target's digest map of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestMapRequest {
    /// Disk id.
    pub disk: u32,
    /// Hash of the map the client has cached (all zero: none); on a match no parts are sent.
    pub cached_map_hash: [u8; 32],
}

/// A run of digests from the target's digest map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestMapPart {
    /// Disk id.
    pub disk: u32,
    /// Index of the first chunk described.
    pub first_chunk: u64,
    /// `n * 32` bytes: the digests of chunks `first_chunk..first_chunk + n`.
    pub digests: Bytes,
}

impl DigestMapPart {
    /// Number of digests in the part.
    pub fn count(&self) -> usize {
        self.digests.len() / DIGEST_LEN
    }
}

/// End of a digest map reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestMapEnd {
    /// Disk id.
    pub disk: u32,
    /// Number of chunks the map covers.
    pub chunk_count: u64,
    /// Hash of the whole map (lets the client cache it).
    pub map_hash: [u8; 32],
    /// True when the client's cached map is current and no parts were sent.
    pub cache_hit: bool,
}
