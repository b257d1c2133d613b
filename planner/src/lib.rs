//! ferry-planner (interim: the digest map only; the full planner lands with issue 5).
#![forbid(unsafe_code)]

/// Per-chunk digest maps.
pub mod digest_map {
    /// A BLAKE3 digest per chunk of a disk.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DigestMap {
        /// Chunk size in bytes.
        pub chunk_size: u32,
        /// Disk size in bytes.
        pub disk_size: u64,
        /// One digest per chunk.
        pub digests: Vec<[u8; 32]>,
    }
}
