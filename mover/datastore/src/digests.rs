//! Digest maps stored next to replica disks (`disks/DISK.digests`).
//!
//! # Format (version 2, sparse; little-endian; do not modify: add a version)
//! ```text
//! offset        size         field
//!  0            8            magic "FERRYDM\0" (the planner's DIGEST_MAP_MAGIC)
//!  8            2            version = 2
//! 10            2            reserved = 0
//! 12            4            chunk_size
//! 16            8            disk_size
//! 24            8            runs: number of page runs that follow
//! 32            16*runs      page runs, in page order, covering every page once:
//!                              first_page u64, pages u32, kind u8 (0 zero, 1 unknown,
//!                              2 held), 3 bytes zero
//! ...           8192*held    the digests of each held page (PAGE_CHUNKS = 256 digests
//!                            of 32 bytes; slots past the last chunk are zero), in order
//! end-32        32           BLAKE3 of all bytes before it
//! ```
//! A page is [`ferry_planner::PAGE_CHUNKS`] chunks. Pages of holes (all zero chunks) and
//! of unknown chunks are a run of 16 bytes whatever their length, so the file (and what a
//! checkpoint writes) grows with the pages that hold data, not with the disk: 40 MiB of
//! data on a 15 TiB disk is a few pages (about 50 KiB), where version 1 was 120 MiB.
//!
//! Version 1 (the planner's canonical [`DigestMap::encode`]: a digest per chunk) is still
//! read, page by page without holding the file, so datastores written by an older ferry
//! open; the next store writes version 2. The canonical encoding stays what the wire's
//! map hash and the source's map cache use.
//!
//! A map that is missing, corrupt, or made for another chunk or disk size is
//! never used: [`load`] returns `None` and the caller starts from a map that
//! is all unknown (an existing image) or all zero (a new, sparse image).

use std::io::{BufReader, Read, Write};
use std::path::Path;

use ferry_planner::digest_map::{DIGEST_MAP_HEADER_LEN, DIGEST_MAP_MAGIC, DIGEST_MAP_TRAILER_LEN};
use ferry_planner::{chunk_count, Digest as PlanDigest, PageView, PAGE_CHUNKS};
pub use ferry_planner::{DigestMap, ZeroDigests, UNKNOWN_DIGEST};

use crate::error::Result;

/// Version of the sparse map file written by [`store`]. Do not modify.
pub const SPARSE_MAP_VERSION: u16 = 2;
const RUN_LEN: usize = 16;
const PAGE_BYTES: usize = PAGE_CHUNKS * 32;
const KIND_ZERO: u8 = 0;
const KIND_UNKNOWN: u8 = 1;
const KIND_HELD: u8 = 2;

/// Load the map at `path` if it exists, is intact and matches the chunk and disk size
/// (either version).
pub fn load(path: &Path, chunk_size: u32, disk_size: u64) -> Option<DigestMap> {
    let f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut r = BufReader::with_capacity(PAGE_BYTES * 8, f);
    let mut header = [0u8; DIGEST_MAP_HEADER_LEN];
    r.read_exact(&mut header).ok()?;
    let version = u16::from_le_bytes([header[8], header[9]]);
    let m = match version {
        SPARSE_MAP_VERSION => read_sparse(&mut r, &header, len, (chunk_size, disk_size)).ok()??,
        _ => read_canonical(&path.display().to_string(), &mut r, &header, len)?.0,
    };
    (m.chunk_size() == chunk_size && m.disk_size() == disk_size).then_some(m)
}

/// Read the rest of a canonical (version 1) encoding whose `header` was read from `r`,
/// page by page: the map and its map hash (the trailer), or `None` when anything does not
/// check out. Memory: the map, and one page of the file at a time.
pub fn read_canonical(
    label: &str,
    r: &mut dyn Read,
    header: &[u8; DIGEST_MAP_HEADER_LEN],
    len: u64,
) -> Option<(DigestMap, PlanDigest)> {
    let (cs, size) = DigestMap::check_header(label, header, len).ok()?;
    let mut m = DigestMap::new(cs, size).ok()?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(header);
    let mut buf = vec![0u8; PAGE_BYTES];
    let mut page: Vec<PlanDigest> = Vec::with_capacity(PAGE_CHUNKS);
    for p in 0..m.page_count() {
        let chunks = m.page_chunks(p);
        let n = (chunks.end - chunks.start) as usize * 32;
        r.read_exact(&mut buf[..n]).ok()?;
        hasher.update(&buf[..n]);
        page.clear();
        page.extend(buf[..n].chunks_exact(32).map(|c| <PlanDigest>::try_from(c).expect("32 bytes")));
        m.fill_page(p, &page);
    }
    let mut trailer = [0u8; DIGEST_MAP_TRAILER_LEN];
    r.read_exact(&mut trailer).ok()?;
    (*hasher.finalize().as_bytes() == trailer).then_some((m, trailer))
}

/// A reader that hashes what it reads.
struct Hashing<'a> {
    r: &'a mut dyn Read,
    h: blake3::Hasher,
}

impl Hashing<'_> {
    fn take(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.r.read_exact(buf)?;
        self.h.update(buf);
        Ok(())
    }
}

/// Read the rest of a sparse map of the geometry `want` (anything else is `None` before
/// the map is allocated: a damaged header must not size it).
fn read_sparse(
    r: &mut dyn Read,
    header: &[u8; DIGEST_MAP_HEADER_LEN],
    len: u64,
    want: (u32, u64),
) -> std::io::Result<Option<DigestMap>> {
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if header[..8] != DIGEST_MAP_MAGIC || header[10..12] != [0, 0] {
        return Ok(None);
    }
    let cs = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    let size = u64_at(16);
    let runs = u64_at(24);
    if (cs, size) != want {
        return Ok(None);
    }
    let Ok(mut m) = DigestMap::new(cs, size) else { return Ok(None) };
    let pages = m.page_count() as u64;
    // The file's length bounds the run table before anything is allocated for it.
    let fixed = (DIGEST_MAP_HEADER_LEN + DIGEST_MAP_TRAILER_LEN) as u128;
    if runs > pages || fixed + u128::from(runs) * RUN_LEN as u128 > u128::from(len) {
        return Ok(None);
    }
    let mut h = Hashing { r, h: blake3::Hasher::new() };
    h.h.update(header);
    let mut table = vec![0u8; runs as usize * RUN_LEN];
    h.take(&mut table)?;
    let mut next = 0u64;
    let mut held = 0u64;
    let mut parsed = Vec::with_capacity(runs as usize);
    for run in table.chunks_exact(RUN_LEN) {
        let first = u64::from_le_bytes(run[0..8].try_into().expect("8 bytes"));
        let n = u64::from(u32::from_le_bytes(run[8..12].try_into().expect("4 bytes")));
        let kind = run[12];
        if first != next || n == 0 || kind > KIND_HELD || run[13..16] != [0; 3] {
            return Ok(None);
        }
        next = first.saturating_add(n);
        if kind == KIND_HELD {
            held += n;
        }
        parsed.push((first, n, kind));
    }
    if next != pages
        || fixed + u128::from(runs) * RUN_LEN as u128 + u128::from(held) * PAGE_BYTES as u128 != u128::from(len)
    {
        return Ok(None);
    }
    let mut buf = vec![0u8; PAGE_BYTES];
    let mut page: Vec<PlanDigest> = Vec::with_capacity(PAGE_CHUNKS);
    for (first, n, kind) in parsed {
        for p in first..first + n {
            let p = p as usize;
            match kind {
                KIND_ZERO => m.set_page_zero(p),
                KIND_UNKNOWN => {} // a new map is all unknown
                _ => {
                    h.take(&mut buf)?;
                    let chunks = m.page_chunks(p);
                    let k = (chunks.end - chunks.start) as usize;
                    page.clear();
                    page.extend(buf[..k * 32].chunks_exact(32).map(|c| <PlanDigest>::try_from(c).expect("32 bytes")));
                    m.fill_page(p, &page);
                }
            }
        }
    }
    let mut trailer = [0u8; DIGEST_MAP_TRAILER_LEN];
    h.r.read_exact(&mut trailer)?;
    Ok((*h.h.finalize().as_bytes() == trailer).then_some(m))
}

/// Bytes of `m` in the sparse format (version 2): written by [`store`].
pub fn encoded_sparse_len(m: &DigestMap) -> u64 {
    let (runs, held) = page_runs(m);
    (DIGEST_MAP_HEADER_LEN + DIGEST_MAP_TRAILER_LEN + runs.len() * RUN_LEN + held * PAGE_BYTES) as u64
}

/// The runs of pages of one kind: (first page, pages, kind); and the held pages.
fn page_runs(m: &DigestMap) -> (Vec<(u64, u32, u8)>, usize) {
    let mut runs: Vec<(u64, u32, u8)> = Vec::new();
    let mut held = 0;
    for p in 0..m.page_count() {
        let kind = match m.page(p) {
            PageView::Zero => KIND_ZERO,
            PageView::Unknown => KIND_UNKNOWN,
            PageView::Held(_) => {
                held += 1;
                KIND_HELD
            }
        };
        match runs.last_mut() {
            Some((_, n, k)) if *k == kind && *n < u32::MAX => *n += 1,
            _ => runs.push((p as u64, 1, kind)),
        }
    }
    (runs, held)
}

/// Write `m` in the sparse format (version 2) to `w`.
pub fn write_sparse(m: &DigestMap, w: &mut dyn Write) -> std::io::Result<()> {
    let (runs, _) = page_runs(m);
    let mut h = blake3::Hasher::new();
    let mut put = |w: &mut dyn Write, b: &[u8]| -> std::io::Result<()> {
        h.update(b);
        w.write_all(b)
    };
    let mut header = [0u8; DIGEST_MAP_HEADER_LEN];
    header[0..8].copy_from_slice(&DIGEST_MAP_MAGIC);
    header[8..10].copy_from_slice(&SPARSE_MAP_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&m.chunk_size().to_le_bytes());
    header[16..24].copy_from_slice(&m.disk_size().to_le_bytes());
    header[24..32].copy_from_slice(&(runs.len() as u64).to_le_bytes());
    put(w, &header)?;
    for &(first, n, kind) in &runs {
        let mut run = [0u8; RUN_LEN];
        run[0..8].copy_from_slice(&first.to_le_bytes());
        run[8..12].copy_from_slice(&n.to_le_bytes());
        run[12] = kind;
        put(w, &run)?;
    }
    for p in 0..m.page_count() {
        if let PageView::Held(d) = m.page(p) {
            put(w, d.as_flattened())?;
        }
    }
    let trailer = *h.finalize().as_bytes();
    w.write_all(&trailer)
}

/// Store a map atomically and durably (sparse format, version 2).
pub fn store(path: &Path, m: &DigestMap) -> Result<()> {
    let dir = path.parent().expect("digest map lives in a directory");
    let name = path.file_name().expect("file name").to_string_lossy();
    let sync = !crate::fault::skip_fsync("map");
    crate::store::write_atomic_with_sync(dir, &name, &mut |w| write_sparse(m, w), sync)
}

/// The map at `path` (either version) for the geometry its own header names, if it checks
/// out: the power-loss tests check every map this way after a cut (a map that does not is
/// rebuilt by the next session, but an atomic replace must never leave one).
pub fn load_as_stored(path: &Path) -> Option<DigestMap> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut header = [0u8; DIGEST_MAP_HEADER_LEN];
    f.read_exact(&mut header).ok()?;
    let cs = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    let size = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    load(path, cs, size)
}

/// Whether [`load_as_stored`] finds an intact map at `path`.
pub fn file_checks_out(path: &Path) -> bool {
    load_as_stored(path).is_some()
}

/// Chunks a version 1 map of this geometry holds (for callers sizing a read).
pub fn canonical_len(chunk_size: u32, disk_size: u64) -> u64 {
    (DIGEST_MAP_HEADER_LEN + DIGEST_MAP_TRAILER_LEN) as u64 + 32 * chunk_count(chunk_size, disk_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K64: u32 = 65536;

    #[test]
    fn store_load_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.digests");
        let zeros = ZeroDigests::new(K64);
        let mut m = DigestMap::zeroed(K64, 200_000, &zeros).unwrap();
        m.set(1, [7; 32]);
        store(&p, &m).unwrap();
        assert_eq!(load(&p, K64, 200_000).unwrap(), m);
        assert!(load(&p, 131072, 200_000).is_none(), "other chunk size");
        assert!(load(&p, K64, 200_001).is_none(), "other disk size");
        let b = std::fs::read(&p).unwrap();
        // Every byte of the header, the run and the trailer; a stride through the page.
        let at: Vec<usize> = (0..64).chain((64..b.len() - 40).step_by(61)).chain(b.len() - 40..b.len()).collect();
        for &i in &at {
            let mut c = b.clone();
            c[i] ^= 1;
            std::fs::write(&p, &c).unwrap();
            assert!(load(&p, K64, 200_000).is_none(), "a flipped bit at byte {i} was accepted");
        }
        for &n in &at {
            std::fs::write(&p, &b[..n]).unwrap();
            assert!(load(&p, K64, 200_000).is_none(), "cut to {n} bytes was accepted");
        }
    }

    /// A 15 TiB disk in 64 KiB chunks with 40 MiB of data in 5 extents: the file holds the
    /// pages with data (and a run per stretch of holes), not a digest per chunk.
    #[test]
    fn a_thin_map_is_stored_by_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.digests");
        let size = 15u64 << 40;
        let mut m = DigestMap::zeroed(K64, size, &ZeroDigests::new(K64)).unwrap();
        let count = m.chunk_count();
        for e in 0..5u64 {
            let first = count / 5 * e + 48; // 8 MiB = 128 chunks, inside one page
            for i in first..first + 128 {
                m.set(i, [e as u8 + 1; 32]);
            }
        }
        assert_eq!(m.held_pages(), 5);
        store(&p, &m).unwrap();
        // header, 10 runs (held, zero, held, ..., held, zero), 5 pages, trailer
        let want = 32 + 10 * 16 + 5 * 8192 + 32;
        assert_eq!(std::fs::metadata(&p).unwrap().len(), want);
        assert_eq!(encoded_sparse_len(&m), want);
        let back = load(&p, K64, size).unwrap();
        assert_eq!(back.held_pages(), 5);
        assert_eq!(back.get(count / 5 + 48), Some([2; 32]));
        assert_eq!(back.get(count / 5 + 47), Some(ZeroDigests::new(K64).full()));
        assert_eq!(back, m);
    }

    /// A map written by an older ferry (the canonical version 1, a digest per chunk) opens,
    /// its zero pages held as pages without digests; the next store writes version 2.
    #[test]
    fn a_version_1_map_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.digests");
        let size = 1000 * u64::from(K64) + 5;
        let zeros = ZeroDigests::new(K64);
        let mut m = DigestMap::zeroed(K64, size, &zeros).unwrap();
        m.set(3, [9; 32]);
        m.mark_unknown(700);
        m.mark_unknown(1000);
        let v1 = m.encode();
        assert_eq!(&v1[8..10], &[1, 0], "version 1");
        std::fs::write(&p, &v1).unwrap();
        let back = load(&p, K64, size).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.held_pages(), 3, "pages 0, 2 and 3 hold digests; 1 is zeros");
        assert_eq!(back.unknown_count(), 2);
        let mut bad = v1.clone();
        bad[40 + 32 * 500] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        assert!(load(&p, K64, size).is_none(), "a corrupt version 1 map");
        std::fs::write(&p, &v1[..v1.len() - 1]).unwrap();
        assert!(load(&p, K64, size).is_none(), "a truncated version 1 map");
        std::fs::write(&p, &v1).unwrap();
        store(&p, &back).unwrap();
        assert_eq!(&std::fs::read(&p).unwrap()[8..10], &[2, 0], "stored again as version 2");
        assert_eq!(load(&p, K64, size).unwrap(), m);
    }
}
