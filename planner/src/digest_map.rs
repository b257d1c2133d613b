//! Per-disk digest maps: the BLAKE3 of every chunk of a replica disk.

// The chunk geometry is ferry-wire's, one definition for the whole of ferry;
// re-exported here and at the crate root under the names it always had.
pub use ferry_wire::chunk::{chunk_count, chunk_len, validate_chunk_size, Digest, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

use crate::PlanError;

/// The sentinel that marks a chunk whose digest is unknown (must be
/// recomputed or the chunk resent). A real chunk digest equal to it (odds
/// 2^-256) is merely treated as unknown, which costs one resent chunk.
pub const UNKNOWN_DIGEST: Digest = [0; 32];

/// Magic of an encoded digest map. Do not modify: it is on disk.
pub const DIGEST_MAP_MAGIC: [u8; 8] = *b"FERRYDM\0";
/// Version of the digest map encoding written by [`DigestMap::encode`]. Do not
/// modify the layout of version 1: add a version instead.
pub const DIGEST_MAP_VERSION: u16 = 1;
/// Length of the fixed header of an encoded digest map.
pub const DIGEST_MAP_HEADER_LEN: usize = 32;
/// Length of the trailing BLAKE3 checksum of an encoded digest map.
pub const DIGEST_MAP_TRAILER_LEN: usize = 32;

const _: () = assert!(DIGEST_MAP_HEADER_LEN == 8 + 2 + 2 + 4 + 8 + 8);

/// [`validate_chunk_size`], its error as a [`PlanError::InvalidChunkSize`] for `label`.
fn check_chunk_size(label: &str, chunk_size: u32) -> Result<(), PlanError> {
    validate_chunk_size(chunk_size)
        .map_err(|e| PlanError::InvalidChunkSize { label: label.to_owned(), chunk_size: e.chunk_size })
}

/// BLAKE3 of `len` zero bytes, hashed from a static zero buffer (never
/// allocates `len` bytes). About 1 ms for 4 MiB: reuse it through
/// [`ZeroDigests`].
pub fn zero_chunk_digest(len: u32) -> Digest {
    static ZEROS: [u8; 16 * 1024] = [0; 16 * 1024];
    let mut hasher = blake3::Hasher::new();
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(ZEROS.len());
        hasher.update(&ZEROS[..n]);
        left -= n;
    }
    *hasher.finalize().as_bytes()
}

/// Zero-chunk digests of one chunk size, computed once: a disk has at most
/// two chunk lengths (full and last), so the full one is precomputed and the
/// others computed on demand.
///
/// `|len| zeros.digest(len)` is the `zero_digest_of` argument of
/// [`DigestMap::resize`]; the mover's zero check compares against
/// [`ZeroDigests::full`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZeroDigests {
    chunk_size: u32,
    full: Digest,
}

impl ZeroDigests {
    /// Precomputes the digest of a zero chunk of `chunk_size` bytes.
    pub fn new(chunk_size: u32) -> Self {
        ZeroDigests { chunk_size, full: zero_chunk_digest(chunk_size) }
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Digest of a zero chunk of the full chunk size.
    pub fn full(&self) -> Digest {
        self.full
    }

    /// Digest of `len` zero bytes (cached when `len` is the chunk size).
    pub fn digest(&self, len: u32) -> Digest {
        if len == self.chunk_size {
            self.full
        } else {
            zero_chunk_digest(len)
        }
    }
}

fn encode_header(chunk_size: u32, disk_size: u64, count: u64) -> [u8; DIGEST_MAP_HEADER_LEN] {
    let mut h = [0u8; DIGEST_MAP_HEADER_LEN];
    h[0..8].copy_from_slice(&DIGEST_MAP_MAGIC);
    h[8..10].copy_from_slice(&DIGEST_MAP_VERSION.to_le_bytes());
    // 10..12: reserved, zero.
    h[12..16].copy_from_slice(&chunk_size.to_le_bytes());
    h[16..24].copy_from_slice(&disk_size.to_le_bytes());
    h[24..32].copy_from_slice(&count.to_le_bytes());
    h
}

/// Produces [`DigestMap::encode`]'s bytes one digest at a time, in chunk
/// order, without holding the map: the header, then each digest as it is
/// pushed, then the trailer. A source streams the map it predicts for the
/// target into its cache this way while it sends the chunks.
#[derive(Debug, Clone)]
pub struct DigestMapEncoder {
    header: [u8; DIGEST_MAP_HEADER_LEN],
    hasher: blake3::Hasher,
    /// Digests not yet hashed: BLAKE3 is several times faster over 16 KiB at once
    /// (many 1 KiB chunks in parallel) than over 32 bytes at a time.
    pending: Vec<u8>,
    expected: u64,
    pushed: u64,
}

/// Bytes of digests the encoder hashes at once.
const ENCODER_BATCH: usize = 16 << 10;

impl DigestMapEncoder {
    /// An encoder for a map of a disk of `disk_size` bytes in chunks of `chunk_size`.
    pub fn new(chunk_size: u32, disk_size: u64) -> Result<Self, PlanError> {
        check_chunk_size("digest map", chunk_size)?;
        let expected = chunk_count(chunk_size, disk_size);
        let header = encode_header(chunk_size, disk_size, expected);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        Ok(DigestMapEncoder { header, hasher, pending: Vec::with_capacity(ENCODER_BATCH), expected, pushed: 0 })
    }

    /// The first [`DIGEST_MAP_HEADER_LEN`] bytes of the encoding.
    pub fn header(&self) -> &[u8; DIGEST_MAP_HEADER_LEN] {
        &self.header
    }

    /// Chunks the map has.
    pub fn chunk_count(&self) -> u64 {
        self.expected
    }

    /// Digests pushed so far (the index of the next chunk).
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Adds the digest of the next chunk; its encoding is the 32 bytes of `digest`.
    pub fn push(&mut self, digest: &Digest) {
        self.pending.extend_from_slice(digest);
        if self.pending.len() >= ENCODER_BATCH {
            self.hasher.update(&self.pending);
            self.pending.clear();
        }
        self.pushed += 1;
    }

    /// The trailer (= [`DigestMap::map_hash`] of the map pushed), once every chunk has its digest.
    pub fn finish(&self) -> Result<Digest, PlanError> {
        if self.pushed != self.expected {
            let u64_at = |at: usize| u64::from_le_bytes(self.header[at..at + 8].try_into().expect("8 bytes"));
            let chunk_size = u32::from_le_bytes(self.header[12..16].try_into().expect("4 bytes"));
            return Err(PlanError::DigestCountMismatch {
                label: "digest map encoder".to_owned(),
                count: self.pushed,
                disk_size: u64_at(16),
                chunk_size,
                expected: self.expected,
            });
        }
        let mut hasher = self.hasher.clone();
        hasher.update(&self.pending);
        Ok(*hasher.finalize().as_bytes())
    }
}

/// The digests of every chunk of one disk, as a replica keeps them.
///
/// Invariants: `chunk_size` is valid (see [`validate_chunk_size`]) and there
/// is exactly one digest per chunk (`ceil(disk_size / chunk_size)`), the last
/// chunk's digest being over its real length. An entry equal to
/// [`UNKNOWN_DIGEST`] is unknown.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DigestMap {
    chunk_size: u32,
    disk_size: u64,
    digests: Vec<Digest>,
}

impl DigestMap {
    /// A map of a disk whose chunk digests are all unknown.
    pub fn new(chunk_size: u32, disk_size: u64) -> Result<Self, PlanError> {
        check_chunk_size("digest map", chunk_size)?;
        let count = chunk_count(chunk_size, disk_size);
        Ok(DigestMap { chunk_size, disk_size, digests: vec![UNKNOWN_DIGEST; count as usize] })
    }

    /// A map of an all-zero disk (a new, sparse replica image).
    pub fn zeroed(chunk_size: u32, disk_size: u64, zeros: &ZeroDigests) -> Result<Self, PlanError> {
        let mut map = DigestMap::new(chunk_size, disk_size)?;
        for (i, d) in map.digests.iter_mut().enumerate() {
            *d = zeros.digest(chunk_len(chunk_size, disk_size, i as u64));
        }
        Ok(map)
    }

    /// A map from digests already computed, one per chunk.
    pub fn from_digests(chunk_size: u32, disk_size: u64, digests: Vec<Digest>) -> Result<Self, PlanError> {
        check_chunk_size("digest map", chunk_size)?;
        let expected = chunk_count(chunk_size, disk_size);
        if digests.len() as u64 != expected {
            return Err(PlanError::DigestCountMismatch {
                label: "digest map".to_owned(),
                count: digests.len() as u64,
                disk_size,
                chunk_size,
                expected,
            });
        }
        Ok(DigestMap { chunk_size, disk_size, digests })
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Number of chunks (and digests).
    pub fn chunk_count(&self) -> u64 {
        self.digests.len() as u64
    }

    /// Length of chunk `i` (0 beyond the disk).
    pub fn chunk_len(&self, i: u64) -> u32 {
        chunk_len(self.chunk_size, self.disk_size, i)
    }

    /// All entries, [`UNKNOWN_DIGEST`] marking unknown ones.
    pub fn digests(&self) -> &[Digest] {
        &self.digests
    }

    /// The digest of chunk `i`: `None` if it is unknown or `i` is beyond the disk.
    pub fn get(&self, i: u64) -> Option<Digest> {
        let d = *self.digests.get(usize::try_from(i).ok()?)?;
        (d != UNKNOWN_DIGEST).then_some(d)
    }

    /// Whether the digest of chunk `i` is known.
    pub fn is_known(&self, i: u64) -> bool {
        self.get(i).is_some()
    }

    /// Records the digest of chunk `i` ([`UNKNOWN_DIGEST`] marks it unknown).
    ///
    /// # Panics
    /// If `i` is not below [`DigestMap::chunk_count`].
    pub fn set(&mut self, i: u64, digest: Digest) {
        let count = self.digests.len();
        let slot = usize::try_from(i).ok().and_then(|i| self.digests.get_mut(i));
        match slot {
            Some(slot) => *slot = digest,
            None => panic!("chunk {i} is beyond the digest map ({count} chunks)"),
        }
    }

    /// Marks chunk `i` unknown.
    ///
    /// # Panics
    /// If `i` is not below [`DigestMap::chunk_count`].
    pub fn mark_unknown(&mut self, i: u64) {
        self.set(i, UNKNOWN_DIGEST);
    }

    /// Whether chunk `i` must be sent to a target holding this map, given the
    /// source's `digest` of it: true unless the entry is known and equal.
    pub fn differs(&self, i: u64, digest: &Digest) -> bool {
        self.get(i).as_ref() != Some(digest)
    }

    /// Number of unknown entries.
    pub fn unknown_count(&self) -> u64 {
        self.digests.iter().filter(|d| **d == UNKNOWN_DIGEST).count() as u64
    }

    /// Follows the disk to `new_disk_size` bytes (the disk was grown with
    /// zeros, or truncated).
    ///
    /// - Chunks wholly kept keep their digests.
    /// - A kept chunk whose length changes (the old last chunk, if partial,
    ///   when the disk grows; the new last chunk, if partial, when it shrinks)
    ///   becomes unknown: its content is not known to this map.
    /// - New chunks get `zero_digest_of(len)`, the digest of `len` zero bytes
    ///   (see [`ZeroDigests::digest`]).
    pub fn resize(&mut self, new_disk_size: u64, zero_digest_of: impl Fn(u32) -> Digest) {
        let old_size = self.disk_size;
        let old_count = self.chunk_count();
        let new_count = chunk_count(self.chunk_size, new_disk_size);
        self.disk_size = new_disk_size;
        self.digests.truncate(new_count as usize);
        for i in 0..old_count.min(new_count) {
            if chunk_len(self.chunk_size, old_size, i) != chunk_len(self.chunk_size, new_disk_size, i) {
                self.digests[i as usize] = UNKNOWN_DIGEST;
            }
        }
        for i in old_count..new_count {
            self.digests.push(zero_digest_of(chunk_len(self.chunk_size, new_disk_size, i)));
        }
    }

    /// The BLAKE3 of the canonical encoding: the trailing checksum of
    /// [`DigestMap::encode`]. A client that caches the map compares it with
    /// the target's to know its copy is current.
    pub fn map_hash(&self) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.header());
        // One update over all digests: BLAKE3 hashes many 1 KiB chunks at once (SIMD).
        hasher.update(self.digests.as_flattened());
        *hasher.finalize().as_bytes()
    }

    fn header(&self) -> [u8; DIGEST_MAP_HEADER_LEN] {
        encode_header(self.chunk_size, self.disk_size, self.chunk_count())
    }

    /// The digests, giving up the map (no copy).
    pub fn into_digests(self) -> Vec<Digest> {
        self.digests
    }

    /// The on-disk encoding (version 1, little-endian; see the crate docs).
    pub fn encode(&self) -> Vec<u8> {
        let (header, digests, trailer) = self.encoded_parts();
        [&header[..], digests, &trailer[..]].concat()
    }

    /// Length of [`encode`](Self::encode)'s output for a disk of `disk_size` bytes in
    /// chunks of `chunk_size`: header, a digest per chunk, trailer.
    pub fn encoded_len(chunk_size: u32, disk_size: u64) -> u64 {
        (DIGEST_MAP_HEADER_LEN + DIGEST_MAP_TRAILER_LEN) as u64 + 32 * chunk_count(chunk_size, disk_size)
    }

    /// [`encode`](Self::encode)'s output as its three parts, the digests not copied:
    /// header, digests, trailer (the BLAKE3 of the first two: the map's hash).
    pub fn encoded_parts(&self) -> ([u8; DIGEST_MAP_HEADER_LEN], &[u8], Digest) {
        (self.header(), self.digests.as_flattened(), self.map_hash())
    }

    /// [`decode`](Self::decode) of an encoding held as 32-byte words (header, digests
    /// and trailer are 32 bytes each), reusing their allocation for the digests (the
    /// header word is removed by moving the digests down in place).
    pub fn decode_words(label: &str, mut words: Vec<Digest>) -> Result<DigestMap, PlanError> {
        let (chunk_size, disk_size) = Self::check(label, words.as_flattened())?;
        words.pop();
        words.remove(0);
        Ok(DigestMap { chunk_size, disk_size, digests: words })
    }

    /// Decodes [`DigestMap::encode`]'s output, rejecting anything truncated,
    /// corrupt, of another version or inconsistent (the caller rebuilds the map).
    /// Allocates only after the length is checked against the input.
    pub fn decode(label: &str, bytes: &[u8]) -> Result<DigestMap, PlanError> {
        let (chunk_size, disk_size) = Self::check(label, bytes)?;
        let body = &bytes[DIGEST_MAP_HEADER_LEN..bytes.len() - DIGEST_MAP_TRAILER_LEN];
        let digests = body.chunks_exact(32).map(|c| c.try_into().expect("32-byte chunks")).collect();
        Ok(DigestMap { chunk_size, disk_size, digests })
    }

    /// Every check of [`decode`](Self::decode); the encoding's chunk size and disk size.
    fn check(label: &str, bytes: &[u8]) -> Result<(u32, u64), PlanError> {
        let label_owned = || label.to_owned();
        let min = DIGEST_MAP_HEADER_LEN + DIGEST_MAP_TRAILER_LEN;
        if bytes.len() < 8 || bytes[..8] != DIGEST_MAP_MAGIC {
            if bytes.len() >= 8 {
                let mut found = [0u8; 8];
                found.copy_from_slice(&bytes[..8]);
                return Err(PlanError::DigestMapBadMagic { label: label_owned(), found });
            }
            return Err(PlanError::DigestMapTooShort { label: label_owned(), len: bytes.len(), min });
        }
        if bytes.len() < min {
            return Err(PlanError::DigestMapTooShort { label: label_owned(), len: bytes.len(), min });
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let version = u16_at(8);
        if version != DIGEST_MAP_VERSION {
            return Err(PlanError::DigestMapUnsupportedVersion {
                label: label_owned(),
                version,
                supported: DIGEST_MAP_VERSION,
            });
        }
        let count = u64_at(24);
        let expected = (DIGEST_MAP_HEADER_LEN + DIGEST_MAP_TRAILER_LEN) as u128 + u128::from(count) * 32;
        if bytes.len() as u128 != expected {
            return Err(PlanError::DigestMapLengthMismatch { label: label_owned(), len: bytes.len(), count, expected });
        }
        let (body, stored) = bytes.split_at(bytes.len() - DIGEST_MAP_TRAILER_LEN);
        let computed = blake3::hash(body);
        if computed.as_bytes() != stored {
            let mut s = [0u8; 4];
            s.copy_from_slice(&stored[..4]);
            let mut c = [0u8; 4];
            c.copy_from_slice(&computed.as_bytes()[..4]);
            return Err(PlanError::DigestMapChecksumMismatch { label: label_owned(), stored: s, computed: c });
        }
        let reserved = u16_at(10);
        if reserved != 0 {
            return Err(PlanError::DigestMapReserved { label: label_owned(), value: reserved });
        }
        let chunk_size = u32_at(12);
        check_chunk_size(label, chunk_size)?;
        let disk_size = u64_at(16);
        let want = chunk_count(chunk_size, disk_size);
        if count != want {
            return Err(PlanError::DigestCountMismatch {
                label: label_owned(),
                count,
                disk_size,
                chunk_size,
                expected: want,
            });
        }
        Ok((chunk_size, disk_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K64: u32 = 64 * 1024;

    #[test]
    fn zero_chunk_digest_matches_direct_hash() {
        for len in [0u32, 1, 16 * 1024, 16 * 1024 + 1, 100_000, K64] {
            assert_eq!(zero_chunk_digest(len), *blake3::hash(&vec![0u8; len as usize]).as_bytes(), "len {len}");
        }
        let z = ZeroDigests::new(K64);
        assert_eq!(z.full(), zero_chunk_digest(K64));
        assert_eq!(z.digest(5), zero_chunk_digest(5));
    }

    // chunk_count, chunk_len and validate_chunk_size are ferry-wire's (tested there).
    #[test]
    fn chunk_size_validation() {
        for ok in [MIN_CHUNK_SIZE, 1 << 20, MAX_CHUNK_SIZE] {
            assert!(check_chunk_size("x", ok).is_ok());
            assert!(DigestMap::new(ok, 1).is_ok());
            assert!(DigestMapEncoder::new(ok, 1).is_ok());
        }
        for bad in [0, 4096, MIN_CHUNK_SIZE + 1, MAX_CHUNK_SIZE * 2, 3 << 20] {
            let err = |label: &str| Err(PlanError::InvalidChunkSize { label: label.into(), chunk_size: bad });
            assert_eq!(check_chunk_size("x", bad), err("x"));
            assert_eq!(DigestMap::new(bad, 1).map(|_| ()), err("digest map"));
            assert_eq!(DigestMap::from_digests(bad, 1, vec![UNKNOWN_DIGEST]).map(|_| ()), err("digest map"));
            assert_eq!(DigestMapEncoder::new(bad, 1).map(|_| ()), err("digest map"));
        }
        assert_eq!(
            check_chunk_size("x", 4096).unwrap_err().to_string(),
            "x: chunk size 4096 is not a power of two between 64 KiB and 4 MiB"
        );
        assert!(DigestMap::from_digests(K64, 1, vec![]).is_err());
    }

    #[test]
    fn get_set_differs() {
        let mut m = DigestMap::new(K64, 3 * u64::from(K64)).unwrap();
        assert_eq!(m.chunk_count(), 3);
        assert_eq!(m.unknown_count(), 3);
        assert_eq!(m.get(0), None);
        assert!(m.differs(0, &[7; 32]));
        m.set(0, [7; 32]);
        assert_eq!(m.get(0), Some([7; 32]));
        assert!(!m.differs(0, &[7; 32]));
        assert!(m.differs(0, &[8; 32]));
        assert!(m.differs(3, &[7; 32]));
        assert_eq!(m.get(3), None);
        m.mark_unknown(0);
        assert!(!m.is_known(0));
    }

    #[test]
    fn encoder_matches_encode() {
        let zeros = ZeroDigests::new(K64);
        for size in [0u64, 1, 3 * u64::from(K64), 3 * u64::from(K64) + 5] {
            let mut m = DigestMap::zeroed(K64, size, &zeros).unwrap();
            if m.chunk_count() > 1 {
                m.set(1, [9; 32]);
                m.mark_unknown(0);
            }
            let mut e = DigestMapEncoder::new(K64, size).unwrap();
            let mut out = e.header().to_vec();
            for d in m.digests() {
                e.push(d);
                out.extend_from_slice(d);
            }
            assert_eq!(e.pushed(), m.chunk_count());
            let trailer = e.finish().unwrap();
            assert_eq!(trailer, m.map_hash());
            out.extend_from_slice(&trailer);
            assert_eq!(out, m.encode(), "size {size}");
            assert_eq!(out.len() as u64, DigestMap::encoded_len(K64, size), "size {size}");
            assert_eq!(DigestMap::decode("x", &out).unwrap().into_digests(), m.digests().to_vec());
            // As 32-byte words, the allocation kept: the same map, and the same refusals.
            let words: Vec<Digest> = out.chunks_exact(32).map(|w| w.try_into().unwrap()).collect();
            assert_eq!(DigestMap::decode_words("x", words.clone()).unwrap(), m);
            let mut bad = words;
            *bad.last_mut().unwrap() = [0; 32];
            assert!(matches!(DigestMap::decode_words("x", bad), Err(PlanError::DigestMapChecksumMismatch { .. })));
        }
        let mut e = DigestMapEncoder::new(K64, 2 * u64::from(K64)).unwrap();
        e.push(&[1; 32]);
        assert!(matches!(e.finish(), Err(PlanError::DigestCountMismatch { count: 1, expected: 2, .. })));
        assert!(DigestMapEncoder::new(4096, 1).is_err());
    }

    #[test]
    #[should_panic(expected = "beyond the digest map")]
    fn set_beyond_panics() {
        DigestMap::new(K64, 1).unwrap().set(1, [1; 32]);
    }
}
