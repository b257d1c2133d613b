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

/// Chunks per page of a [`DigestMap`] (8 KiB of digests when the page is held).
/// Also the page of the datastore's sparse map file (version 2): do not modify.
pub const PAGE_CHUNKS: usize = 256;

/// One page of a [`DigestMap`]: [`PAGE_CHUNKS`] chunks.
#[derive(Debug, Clone)]
enum Page {
    /// Every chunk of the page holds zeros (its digest: that of its length of zeros).
    Zero,
    /// Every chunk's digest is unknown.
    Unknown,
    /// The digests, one per chunk ([`UNKNOWN_DIGEST`] for unknown ones); slots past
    /// the disk's last chunk are [`UNKNOWN_DIGEST`].
    Held(Box<[Digest; PAGE_CHUNKS]>),
}

/// A page of a [`DigestMap`] as [`DigestMap::page`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageView<'a> {
    /// Every chunk of the page is zeros.
    Zero,
    /// Every chunk's digest is unknown.
    Unknown,
    /// The digests of the page's chunks (slots past the last chunk are unknown).
    Held(&'a [Digest; PAGE_CHUNKS]),
}

/// The digests of every chunk of one disk, as a replica keeps them.
///
/// Sparse: the map is held in pages of [`PAGE_CHUNKS`] chunks, and a page
/// whose chunks are all zeros (a hole of a thin disk) or all unknown holds no
/// digest, only its kind (16 bytes per page, half a bit per chunk). Memory
/// grows with the pages that hold data, not with the disk's size: a 15 TiB
/// disk holding 40 MiB costs a few pages, where one digest per chunk cost
/// 120 MiB (issue 20).
///
/// Invariants: `chunk_size` is valid (see [`validate_chunk_size`]) and the
/// map covers exactly `ceil(disk_size / chunk_size)` chunks, the last chunk's
/// digest being over its real length. An entry equal to [`UNKNOWN_DIGEST`] is
/// unknown. Equality is by content (a zero page equals a held page of zero
/// digests).
#[derive(Debug, Clone)]
pub struct DigestMap {
    chunk_size: u32,
    disk_size: u64,
    count: u64,
    pages: Vec<Page>,
    /// Digest of a zero chunk of the full size, and of the last chunk's length.
    zero_full: Digest,
    zero_last: Digest,
}

impl PartialEq for DigestMap {
    fn eq(&self, o: &Self) -> bool {
        self.chunk_size == o.chunk_size
            && self.disk_size == o.disk_size
            && (0..self.pages.len()).all(|p| match (&self.pages[p], &o.pages[p]) {
                (Page::Zero, Page::Zero) | (Page::Unknown, Page::Unknown) => true,
                _ => self.page_chunks(p).all(|i| self.get_raw(i) == o.get_raw(i)),
            })
    }
}
impl Eq for DigestMap {}

fn pages_for(count: u64) -> usize {
    count.div_ceil(PAGE_CHUNKS as u64) as usize
}

impl DigestMap {
    fn with_pages(chunk_size: u32, disk_size: u64, page: Page, zeros: Option<&ZeroDigests>) -> Result<Self, PlanError> {
        check_chunk_size("digest map", chunk_size)?;
        let count = chunk_count(chunk_size, disk_size);
        let zero_full = match zeros {
            Some(z) if z.chunk_size() == chunk_size => z.full(),
            _ => zero_chunk_digest(chunk_size),
        };
        let last = if count == 0 { chunk_size } else { chunk_len(chunk_size, disk_size, count - 1) };
        let zero_last = if last == chunk_size { zero_full } else { zero_chunk_digest(last) };
        Ok(DigestMap { chunk_size, disk_size, count, pages: vec![page; pages_for(count)], zero_full, zero_last })
    }

    /// A map of a disk whose chunk digests are all unknown.
    pub fn new(chunk_size: u32, disk_size: u64) -> Result<Self, PlanError> {
        Self::with_pages(chunk_size, disk_size, Page::Unknown, None)
    }

    /// A map of an all-zero disk (a new, sparse replica image).
    pub fn zeroed(chunk_size: u32, disk_size: u64, zeros: &ZeroDigests) -> Result<Self, PlanError> {
        Self::with_pages(chunk_size, disk_size, Page::Zero, Some(zeros))
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
        let mut m = Self::new(chunk_size, disk_size)?;
        for (p, page) in digests.chunks(PAGE_CHUNKS).enumerate() {
            m.fill_page(p, page);
        }
        Ok(m)
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
        self.count
    }

    /// Length of chunk `i` (0 beyond the disk).
    pub fn chunk_len(&self, i: u64) -> u32 {
        chunk_len(self.chunk_size, self.disk_size, i)
    }

    /// Number of pages ([`PAGE_CHUNKS`] chunks each, the last one possibly partial).
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Pages that hold digests (the map's memory beyond its page table).
    pub fn held_pages(&self) -> usize {
        self.pages.iter().filter(|p| matches!(p, Page::Held(_))).count()
    }

    /// Page `p` (panics beyond [`page_count`](Self::page_count)).
    pub fn page(&self, p: usize) -> PageView<'_> {
        match &self.pages[p] {
            Page::Zero => PageView::Zero,
            Page::Unknown => PageView::Unknown,
            Page::Held(d) => PageView::Held(d),
        }
    }

    /// The chunks of page `p`.
    pub fn page_chunks(&self, p: usize) -> std::ops::Range<u64> {
        let first = (p * PAGE_CHUNKS) as u64;
        first..(first + PAGE_CHUNKS as u64).min(self.count)
    }

    /// The digest of a zero chunk `i` (of its length).
    fn zero_of(&self, i: u64) -> Digest {
        if i + 1 == self.count {
            self.zero_last
        } else {
            self.zero_full
        }
    }

    /// The entry of chunk `i`, [`UNKNOWN_DIGEST`] when unknown or beyond the disk.
    pub fn get_raw(&self, i: u64) -> Digest {
        if i >= self.count {
            return UNKNOWN_DIGEST;
        }
        match &self.pages[(i / PAGE_CHUNKS as u64) as usize] {
            Page::Zero => self.zero_of(i),
            Page::Unknown => UNKNOWN_DIGEST,
            Page::Held(d) => d[(i % PAGE_CHUNKS as u64) as usize],
        }
    }

    /// The digest of chunk `i`: `None` if it is unknown or `i` is beyond the disk.
    pub fn get(&self, i: u64) -> Option<Digest> {
        let d = self.get_raw(i);
        (d != UNKNOWN_DIGEST).then_some(d)
    }

    /// Whether the digest of chunk `i` is known.
    pub fn is_known(&self, i: u64) -> bool {
        self.get(i).is_some()
    }

    /// Records the digest of chunk `i` ([`UNKNOWN_DIGEST`] marks it unknown). Setting
    /// what a page already says (a zero digest in a zero page, unknown in an unknown
    /// page) keeps the page without digests.
    ///
    /// # Panics
    /// If `i` is not below [`DigestMap::chunk_count`].
    pub fn set(&mut self, i: u64, digest: Digest) {
        if i >= self.count {
            panic!("chunk {i} is beyond the digest map ({} chunks)", self.count);
        }
        let p = (i / PAGE_CHUNKS as u64) as usize;
        let slot = (i % PAGE_CHUNKS as u64) as usize;
        let keep = match self.pages[p] {
            Page::Zero => digest == self.zero_of(i),
            Page::Unknown => digest == UNKNOWN_DIGEST,
            Page::Held(_) => false,
        };
        if keep {
            return;
        }
        if !matches!(self.pages[p], Page::Held(_)) {
            let held = self.page_digests(p);
            self.pages[p] = Page::Held(held);
        }
        if let Page::Held(d) = &mut self.pages[p] {
            d[slot] = digest;
        }
    }

    /// The digests of page `p` as a held page would hold them.
    fn page_digests(&self, p: usize) -> Box<[Digest; PAGE_CHUNKS]> {
        let mut d = Box::new([UNKNOWN_DIGEST; PAGE_CHUNKS]);
        let first = self.page_chunks(p).start;
        for i in self.page_chunks(p) {
            d[(i - first) as usize] = self.get_raw(i);
        }
        d
    }

    /// Sets every digest of page `p` from `digests` (one per chunk of the page, in
    /// order; fewer for the last page), keeping the page without digests when they are
    /// all zeros or all unknown.
    ///
    /// # Panics
    /// If `digests` does not hold exactly the page's chunks.
    pub fn fill_page(&mut self, p: usize, digests: &[Digest]) {
        let chunks = self.page_chunks(p);
        assert_eq!(digests.len() as u64, chunks.end - chunks.start, "page {p}: one digest per chunk");
        let first = chunks.start;
        self.pages[p] = if digests.iter().enumerate().all(|(k, d)| *d == self.zero_of(first + k as u64)) {
            Page::Zero
        } else if digests.iter().all(|d| *d == UNKNOWN_DIGEST) {
            Page::Unknown
        } else {
            let mut held = Box::new([UNKNOWN_DIGEST; PAGE_CHUNKS]);
            held[..digests.len()].copy_from_slice(digests);
            Page::Held(held)
        };
    }

    /// Marks every chunk of page `p` zero.
    pub fn set_page_zero(&mut self, p: usize) {
        self.pages[p] = Page::Zero;
    }

    /// Gives back the memory of held pages whose chunks are now all zeros or all
    /// unknown (a hole written over a chunk that held data).
    pub fn compact(&mut self) {
        for p in 0..self.pages.len() {
            if let Page::Held(d) = &self.pages[p] {
                let n = (self.page_chunks(p).end - self.page_chunks(p).start) as usize;
                let d: Vec<Digest> = d[..n].to_vec();
                self.fill_page(p, &d);
            }
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
        (0..self.pages.len())
            .map(|p| match &self.pages[p] {
                Page::Zero => 0,
                Page::Unknown => self.page_chunks(p).end - self.page_chunks(p).start,
                Page::Held(_) => self.page_chunks(p).filter(|&i| self.get_raw(i) == UNKNOWN_DIGEST).count() as u64,
            })
            .sum()
    }

    /// The first chunk at or after `from` whose digest is unknown (whole pages without
    /// unknown chunks are skipped at once).
    pub fn next_unknown(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.count {
            let p = (i / PAGE_CHUNKS as u64) as usize;
            match &self.pages[p] {
                Page::Zero => i = self.page_chunks(p).end,
                Page::Unknown => return Some(i),
                Page::Held(_) => {
                    if self.get_raw(i) == UNKNOWN_DIGEST {
                        return Some(i);
                    }
                    i += 1;
                }
            }
        }
        None
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
        let old_count = self.count;
        let new_count = chunk_count(self.chunk_size, new_disk_size);
        let cs = self.chunk_size;
        // The entries of chunks kept, before the geometry changes: those of the old last
        // page (the only one shared that the new geometry may read differently).
        let keep = old_count.min(new_count);
        // Only the last kept chunk can change length (the old last one growing, or the
        // new last one cut short).
        let changed = keep.checked_sub(1).filter(|&i| chunk_len(cs, old_size, i) != chunk_len(cs, new_disk_size, i));
        let boundary_page = (keep / PAGE_CHUNKS as u64) as usize;
        let saved: Vec<Digest> = if boundary_page < self.pages.len() {
            self.page_chunks(boundary_page).filter(|&i| i < keep).map(|i| self.get_raw(i)).collect()
        } else {
            vec![]
        };
        // A zero page's entries follow the geometry: the new zero digests.
        self.disk_size = new_disk_size;
        self.count = new_count;
        self.zero_full = zero_digest_of(cs);
        let last = if new_count == 0 { cs } else { chunk_len(cs, new_disk_size, new_count - 1) };
        self.zero_last = zero_digest_of(last);
        self.pages.truncate(pages_for(keep));
        // Pages past the kept chunks are new: zeros.
        self.pages.resize(pages_for(new_count), Page::Zero);
        // Rebuild the page holding the boundary between kept and new chunks.
        if boundary_page < self.pages.len() {
            let chunks = self.page_chunks(boundary_page);
            let digests: Vec<Digest> = chunks
                .clone()
                .map(|i| {
                    let k = (i - chunks.start) as usize;
                    if i < keep {
                        saved[k]
                    } else {
                        zero_digest_of(chunk_len(cs, new_disk_size, i))
                    }
                })
                .collect();
            self.fill_page(boundary_page, &digests);
        }
        if let Some(i) = changed {
            self.set(i, UNKNOWN_DIGEST);
        }
    }

    /// The canonical encoding (version 1: header, a digest per chunk, no trailer) fed to
    /// `emit` in pieces, built page by page: a zero page costs a copy of a buffer of zero
    /// digests, nothing is allocated per chunk.
    pub fn for_each_encoded(&self, emit: &mut dyn FnMut(&[u8])) {
        emit(&self.header());
        let zero_page = [self.zero_full; PAGE_CHUNKS];
        let unknown_page = [UNKNOWN_DIGEST; PAGE_CHUNKS];
        let mut tail = [UNKNOWN_DIGEST; PAGE_CHUNKS];
        for p in 0..self.pages.len() {
            let chunks = self.page_chunks(p);
            let n = (chunks.end - chunks.start) as usize;
            let is_last = chunks.end == self.count;
            let body: &[Digest] = match &self.pages[p] {
                Page::Zero if is_last => {
                    tail[..n].copy_from_slice(&zero_page[..n]);
                    tail[n - 1] = self.zero_last;
                    &tail[..n]
                }
                Page::Zero => &zero_page[..n],
                Page::Unknown => &unknown_page[..n],
                Page::Held(d) => &d[..n],
            };
            emit(body.as_flattened());
        }
    }

    /// The digests of chunks `range` in the canonical encoding (32 bytes each), appended
    /// to `out`.
    pub fn encode_range(&self, range: std::ops::Range<u64>, out: &mut Vec<u8>) {
        out.reserve(((range.end - range.start) * 32) as usize);
        for i in range {
            out.extend_from_slice(&self.get_raw(i));
        }
    }

    /// The BLAKE3 of the canonical encoding: the trailing checksum of
    /// [`DigestMap::encode`]. A client that caches the map compares it with
    /// the target's to know its copy is current.
    pub fn map_hash(&self) -> Digest {
        let mut hasher = blake3::Hasher::new();
        // Pages go in 8 KiB at a time: BLAKE3 hashes many 1 KiB chunks at once (SIMD).
        self.for_each_encoded(&mut |b| {
            hasher.update(b);
        });
        *hasher.finalize().as_bytes()
    }

    fn header(&self) -> [u8; DIGEST_MAP_HEADER_LEN] {
        encode_header(self.chunk_size, self.disk_size, self.count)
    }

    /// Every digest, in chunk order (for tests and small maps: allocates one per chunk).
    pub fn to_digests(&self) -> Vec<Digest> {
        (0..self.count).map(|i| self.get_raw(i)).collect()
    }

    /// The on-disk encoding (version 1, little-endian; see the crate docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::encoded_len(self.chunk_size, self.disk_size) as usize);
        self.for_each_encoded(&mut |b| out.extend_from_slice(b));
        let trailer = *blake3::hash(&out).as_bytes();
        out.extend_from_slice(&trailer);
        out
    }

    /// Length of [`encode`](Self::encode)'s output for a disk of `disk_size` bytes in
    /// chunks of `chunk_size`: header, a digest per chunk, trailer.
    pub fn encoded_len(chunk_size: u32, disk_size: u64) -> u64 {
        (DIGEST_MAP_HEADER_LEN + DIGEST_MAP_TRAILER_LEN) as u64 + 32 * chunk_count(chunk_size, disk_size)
    }

    /// Checks the header of an encoding (version 1) whose total length is `len`:
    /// its chunk size and disk size. The digests and trailer are the caller's to
    /// read (page by page into [`fill_page`](Self::fill_page) of a
    /// [`new`](Self::new) map) and check (the trailer is the BLAKE3 of all before it).
    pub fn check_header(label: &str, header: &[u8; DIGEST_MAP_HEADER_LEN], len: u64) -> Result<(u32, u64), PlanError> {
        let label_owned = || label.to_owned();
        if header[..8] != DIGEST_MAP_MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(&header[..8]);
            return Err(PlanError::DigestMapBadMagic { label: label_owned(), found });
        }
        let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
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
        if u128::from(len) != expected {
            return Err(PlanError::DigestMapLengthMismatch {
                label: label_owned(),
                len: len as usize,
                count,
                expected,
            });
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

    /// Decodes [`DigestMap::encode`]'s output, rejecting anything truncated,
    /// corrupt, of another version or inconsistent (the caller rebuilds the map).
    /// Allocates only after the length is checked against the input.
    pub fn decode(label: &str, bytes: &[u8]) -> Result<DigestMap, PlanError> {
        let min = DIGEST_MAP_HEADER_LEN + DIGEST_MAP_TRAILER_LEN;
        if bytes.len() < 8 || bytes[..8] != DIGEST_MAP_MAGIC {
            if bytes.len() >= 8 {
                let mut found = [0u8; 8];
                found.copy_from_slice(&bytes[..8]);
                return Err(PlanError::DigestMapBadMagic { label: label.to_owned(), found });
            }
            return Err(PlanError::DigestMapTooShort { label: label.to_owned(), len: bytes.len(), min });
        }
        if bytes.len() < min {
            return Err(PlanError::DigestMapTooShort { label: label.to_owned(), len: bytes.len(), min });
        }
        let header: &[u8; DIGEST_MAP_HEADER_LEN] = bytes[..DIGEST_MAP_HEADER_LEN].try_into().expect("header");
        // The length first (a header that announces more than is there), then the
        // checksum, then the fields it covers.
        let count = u64::from_le_bytes(header[24..32].try_into().expect("8 bytes"));
        let version = u16::from_le_bytes([header[8], header[9]]);
        let expected = min as u128 + u128::from(count) * 32;
        if version == DIGEST_MAP_VERSION && bytes.len() as u128 != expected {
            return Err(PlanError::DigestMapLengthMismatch {
                label: label.to_owned(),
                len: bytes.len(),
                count,
                expected,
            });
        }
        if version == DIGEST_MAP_VERSION {
            let (body, stored) = bytes.split_at(bytes.len() - DIGEST_MAP_TRAILER_LEN);
            let computed = blake3::hash(body);
            if computed.as_bytes() != stored {
                let mut s = [0u8; 4];
                s.copy_from_slice(&stored[..4]);
                let mut c = [0u8; 4];
                c.copy_from_slice(&computed.as_bytes()[..4]);
                return Err(PlanError::DigestMapChecksumMismatch { label: label.to_owned(), stored: s, computed: c });
            }
        }
        let (chunk_size, disk_size) = Self::check_header(label, header, bytes.len() as u64)?;
        let body = &bytes[DIGEST_MAP_HEADER_LEN..bytes.len() - DIGEST_MAP_TRAILER_LEN];
        let mut m = DigestMap::new(chunk_size, disk_size)?;
        let mut page = Vec::with_capacity(PAGE_CHUNKS);
        for (p, raw) in body.chunks(PAGE_CHUNKS * 32).enumerate() {
            page.clear();
            page.extend(raw.chunks_exact(32).map(|c| <Digest>::try_from(c).expect("32-byte chunks")));
            m.fill_page(p, &page);
        }
        Ok(m)
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
            for d in m.to_digests() {
                e.push(&d);
                out.extend_from_slice(&d);
            }
            assert_eq!(e.pushed(), m.chunk_count());
            let trailer = e.finish().unwrap();
            assert_eq!(trailer, m.map_hash());
            out.extend_from_slice(&trailer);
            assert_eq!(out, m.encode(), "size {size}");
            assert_eq!(out.len() as u64, DigestMap::encoded_len(K64, size), "size {size}");
            assert_eq!(DigestMap::decode("x", &out).unwrap().to_digests(), m.to_digests());
            let mut bad = out.clone();
            let n = bad.len();
            bad[n - 1] ^= 1;
            assert!(matches!(DigestMap::decode("x", &bad), Err(PlanError::DigestMapChecksumMismatch { .. })));
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
