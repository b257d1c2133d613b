//! Chunk geometry, one definition for all of ferry: the chunk sizes a replica
//! may use, and which bytes of a disk each chunk covers. The wire checks chunk
//! sizes in OpenDisk and ReplicaOpened, the planner sizes digest maps, the
//! mover reads, sends and writes chunks: all with these.
//!
//! A chunk is the unit of digests and transfer: a power of two between
//! [`MIN_CHUNK_SIZE`] (64 KiB) and [`MAX_CHUNK_SIZE`] (4 MiB), fixed per
//! replica. Chunk `i` of a disk of `disk_size` bytes covers
//! `i * chunk_size .. min((i + 1) * chunk_size, disk_size)`: the last chunk
//! may be partial, and an empty disk has no chunk.
//!
//! DO NOT MODIFY the limits: they are part of protocol v1 and of the on-disk
//! digest map encoding.

use std::ops::Range;

/// Smallest chunk size a replica may use (64 KiB), and the default for disks
/// up to [`MAX_DEFAULT_CHUNKS`] of it (128 GiB).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size a replica may use (4 MiB).
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Chunks per disk above which the default chunk size doubles: 2 Mi chunks keep a
/// disk's digest map (32 bytes per chunk, held in memory at both ends) at 64 MiB.
pub const MAX_DEFAULT_CHUNKS: u64 = 2 << 20;

/// A 32-byte BLAKE3 digest (computed by the caller; ferry-wire only carries it).
pub type Digest = [u8; 32];

/// A chunk size that is not a power of two between [`MIN_CHUNK_SIZE`] and
/// [`MAX_CHUNK_SIZE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("chunk size {chunk_size} is not a power of two between 64 KiB and 4 MiB")]
pub struct ChunkSizeError {
    /// The chunk size given.
    pub chunk_size: u32,
}

/// Checks that `chunk_size` is a power of two between [`MIN_CHUNK_SIZE`] and [`MAX_CHUNK_SIZE`].
pub fn validate_chunk_size(chunk_size: u32) -> Result<(), ChunkSizeError> {
    if chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(ChunkSizeError { chunk_size })
    }
}

/// Number of chunks of `chunk_size` bytes in a disk of `disk_size` bytes (the
/// last one may be partial).
///
/// # Panics
/// If `chunk_size` is 0.
pub fn chunk_count(chunk_size: u32, disk_size: u64) -> u64 {
    disk_size.div_ceil(u64::from(chunk_size))
}

/// Length of chunk `index` of a disk: `chunk_size`, less for the last chunk,
/// 0 beyond the disk.
///
/// # Panics
/// If `chunk_size` is 0.
pub fn chunk_len(chunk_size: u32, disk_size: u64, index: u64) -> u32 {
    let cs = u64::from(chunk_size);
    match index.checked_mul(cs) {
        Some(start) if start < disk_size => (disk_size - start).min(cs) as u32,
        _ => 0,
    }
}

/// Default chunk size of a new replica whose largest disk has `largest` bytes:
/// 64 KiB (the granularity of VMware CBT and of QEMU dirty bitmaps, so a changed
/// block moves as itself, not as a larger chunk around it), doubled until the
/// disk has at most [`MAX_DEFAULT_CHUNKS`] chunks, at most 4 MiB.
pub fn default_chunk_size(largest: u64) -> u32 {
    let mut cs = MIN_CHUNK_SIZE;
    while cs < MAX_CHUNK_SIZE && largest.div_ceil(u64::from(cs)) > MAX_DEFAULT_CHUNKS {
        cs *= 2;
    }
    cs
}

/// The chunks of one disk: a valid chunk size and the disk's size.
///
/// Chunk `i` is the bytes `offset(i) .. offset(i + 1)`, `chunk_len(i)` of them;
/// every index from [`Geometry::chunk_count`] on is an empty chunk at the
/// disk's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    chunk_size: u32,
    disk_size: u64,
}

impl Geometry {
    /// The chunks of a disk of `disk_size` bytes in chunks of `chunk_size`
    /// bytes; an error if the chunk size is not valid ([`validate_chunk_size`]).
    pub fn new(chunk_size: u32, disk_size: u64) -> Result<Geometry, ChunkSizeError> {
        validate_chunk_size(chunk_size)?;
        Ok(Geometry { chunk_size, disk_size })
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Number of chunks (the last one may be partial; 0 for an empty disk).
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.chunk_size, self.disk_size)
    }

    /// Length of chunk `index`: the chunk size, less for a partial last chunk,
    /// 0 beyond the disk.
    pub fn chunk_len(&self, index: u64) -> u32 {
        chunk_len(self.chunk_size, self.disk_size, index)
    }

    /// Offset of the first byte of chunk `index`; the disk size for an index
    /// at or beyond [`Geometry::chunk_count`] (never overflows).
    pub fn offset(&self, index: u64) -> u64 {
        index.checked_mul(u64::from(self.chunk_size)).map_or(self.disk_size, |o| o.min(self.disk_size))
    }

    /// The chunks that hold at least one byte of `offset .. offset + len`:
    /// the byte range widened outwards to chunk boundaries, such as the chunks
    /// a write or a changed extent touches. Bytes at or beyond the disk's end
    /// are ignored; the range is empty when none of its bytes is on the disk.
    pub fn covering(&self, offset: u64, len: u64) -> Range<u64> {
        let cs = u64::from(self.chunk_size);
        let end = offset.saturating_add(len).min(self.disk_size);
        if offset >= end {
            let at = if offset < self.disk_size { offset / cs } else { self.chunk_count() };
            return at..at;
        }
        offset / cs..end.div_ceil(cs)
    }

    /// The chunks wholly inside `offset .. offset + len`: the byte range
    /// narrowed inwards to chunk boundaries, such as the chunks a hole makes
    /// all-zero. The partial last chunk counts as whole when the range reaches
    /// the disk's end. Empty when no chunk is wholly inside.
    pub fn inner(&self, offset: u64, len: u64) -> Range<u64> {
        let cs = u64::from(self.chunk_size);
        let count = self.chunk_count();
        let start = offset.div_ceil(cs).min(count);
        let end = offset.saturating_add(len);
        let end = if end >= self.disk_size { count } else { end / cs };
        start..end.max(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K64: u32 = 64 * 1024;
    const CS: u64 = K64 as u64;

    #[test]
    fn chunk_size_validation() {
        for ok in [MIN_CHUNK_SIZE, 1 << 20, MAX_CHUNK_SIZE] {
            assert_eq!(validate_chunk_size(ok), Ok(()));
            assert!(Geometry::new(ok, 1).is_ok());
        }
        for bad in [0, 1, 4096, MIN_CHUNK_SIZE / 2, MIN_CHUNK_SIZE + 1, MAX_CHUNK_SIZE * 2, 3 << 20, u32::MAX] {
            assert_eq!(validate_chunk_size(bad), Err(ChunkSizeError { chunk_size: bad }));
            assert_eq!(Geometry::new(bad, 1), Err(ChunkSizeError { chunk_size: bad }));
        }
        assert_eq!(
            ChunkSizeError { chunk_size: 4096 }.to_string(),
            "chunk size 4096 is not a power of two between 64 KiB and 4 MiB"
        );
    }

    #[test]
    fn chunk_count_and_len() {
        assert_eq!(chunk_count(K64, 0), 0);
        assert_eq!(chunk_count(K64, 1), 1);
        assert_eq!(chunk_count(K64, 2 * u64::from(K64)), 2);
        assert_eq!(chunk_len(K64, 100_000, 0), K64);
        assert_eq!(chunk_len(K64, 100_000, 1), 100_000 - K64);
        assert_eq!(chunk_len(K64, 100_000, 2), 0);
        assert_eq!(chunk_len(K64, 100_000, u64::MAX), 0);
    }

    #[test]
    fn geometry_counts_lengths_and_offsets() {
        /// (index, length, offset) of some chunks.
        type Chunks = &'static [(u64, u32, u64)];
        // (disk size, chunk count, chunks)
        let cases: &[(u64, u64, Chunks)] = &[
            // Empty disk: no chunk; every offset is 0.
            (0, 0, &[(0, 0, 0), (1, 0, 0)]),
            // One byte: one partial chunk.
            (1, 1, &[(0, 1, 0), (1, 0, 1)]),
            // Exactly two chunks.
            (2 * CS, 2, &[(0, K64, 0), (1, K64, CS), (2, 0, 2 * CS)]),
            // Two and a half chunks: the last one partial.
            (2 * CS + CS / 2, 3, &[(1, K64, CS), (2, K64 / 2, 2 * CS), (3, 0, 2 * CS + CS / 2)]),
            // The largest disk: offsets never overflow.
            (u64::MAX, u64::MAX / CS + 1, &[(u64::MAX / CS, K64 - 1, u64::MAX / CS * CS), (u64::MAX, 0, u64::MAX)]),
        ];
        for &(disk, count, chunks) in cases {
            let g = Geometry::new(K64, disk).unwrap();
            assert_eq!((g.chunk_size(), g.disk_size(), g.chunk_count()), (K64, disk, count), "disk {disk}");
            for &(i, len, offset) in chunks {
                assert_eq!((g.chunk_len(i), g.offset(i)), (len, offset), "disk {disk} chunk {i}");
            }
            // Chunk i is offset(i) .. offset(i + 1).
            for i in (0..count.min(4)).chain(count.saturating_sub(2)..count + 2) {
                assert_eq!(g.offset(i) + u64::from(g.chunk_len(i)), g.offset(i + 1), "disk {disk} chunk {i}");
            }
        }
    }

    #[test]
    fn covering_widens_to_chunk_boundaries() {
        let disk = 2 * CS + CS / 2; // chunk 2 is partial
                                    // (offset, len, chunks)
        let cases: &[(u64, u64, Range<u64>)] = &[
            (0, 1, 0..1),
            (0, CS, 0..1),
            (0, CS + 1, 0..2),
            (CS - 1, 2, 0..2),
            (CS, CS, 1..2),
            (CS + 1, 1, 1..2),
            (0, disk, 0..3),
            (2 * CS, 1, 2..3),
            // Ranges at the end: bytes beyond the disk are ignored.
            (disk - 1, 1, 2..3),
            (disk - 1, 10 * CS, 2..3),
            (CS, u64::MAX, 1..3),
            (u64::MAX, u64::MAX, 3..3),
            (disk, 1, 3..3),
            (disk + CS, CS, 3..3),
            // Empty ranges hold no chunk.
            (0, 0, 0..0),
            (CS + 5, 0, 1..1),
        ];
        let g = Geometry::new(K64, disk).unwrap();
        for (offset, len, want) in cases {
            assert_eq!(g.covering(*offset, *len), *want, "covering({offset}, {len})");
        }
        let empty = Geometry::new(K64, 0).unwrap();
        assert_eq!(empty.covering(0, CS), 0..0);
        assert_eq!(empty.covering(CS, CS), 0..0);
    }

    #[test]
    fn inner_narrows_to_whole_chunks() {
        let disk = 2 * CS + CS / 2; // chunk 2 is partial
                                    // (offset, len, chunks)
        let cases: &[(u64, u64, Range<u64>)] = &[
            (0, CS, 0..1),
            (0, CS - 1, 0..0),
            (1, CS, 1..1),
            (1, 2 * CS, 1..2),
            (1, 2 * CS - 1, 1..2),
            (1, 2 * CS - 2, 1..1),
            (CS - 1, CS + 1, 1..2),
            (0, 2 * CS, 0..2),
            // The partial last chunk is whole when the range reaches the disk's end...
            (2 * CS, CS / 2, 2..3),
            (0, disk, 0..3),
            (CS, u64::MAX, 1..3),
            (CS + 1, 10 * CS, 2..3),
            // ...and not when it stops short of it.
            (2 * CS, CS / 2 - 1, 2..2),
            (2 * CS + 1, CS, 3..3),
            // Ranges at or beyond the end hold no chunk.
            (disk, CS, 3..3),
            (disk + CS, CS, 3..3),
            (u64::MAX, 1, 3..3),
            (0, 0, 0..0),
        ];
        let g = Geometry::new(K64, disk).unwrap();
        for (offset, len, want) in cases {
            assert_eq!(g.inner(*offset, *len), *want, "inner({offset}, {len})");
        }
        let empty = Geometry::new(K64, 0).unwrap();
        assert_eq!(empty.inner(0, CS), 0..0);
        let exact = Geometry::new(K64, 2 * CS).unwrap();
        assert_eq!(exact.inner(CS, CS), 1..2);
        assert_eq!(exact.inner(CS, CS - 1), 1..1);
    }

    /// `covering` and `inner` against a chunk-by-chunk model, over ranges that
    /// start and end at every chunk boundary, one byte either side and the disk's end.
    #[test]
    fn covering_and_inner_match_a_model() {
        for disk in [0, 1, CS - 1, CS, CS + 1, 3 * CS, 3 * CS - 7] {
            let g = Geometry::new(K64, disk).unwrap();
            let mut points: Vec<u64> = (0..=4).flat_map(|i| [i * CS, (i * CS).saturating_sub(1), i * CS + 1]).collect();
            points.extend([disk.saturating_sub(1), disk, disk + 1]);
            for &start in &points {
                for &end in points.iter().filter(|&&e| e >= start) {
                    let chunks = |r: Range<u64>| r.collect::<Vec<u64>>();
                    let bytes = |i: u64| g.offset(i)..g.offset(i) + u64::from(g.chunk_len(i));
                    let touched = (0..g.chunk_count()).filter(|&i| start.max(bytes(i).start) < end.min(bytes(i).end));
                    let inside = (0..g.chunk_count()).filter(|&i| start <= bytes(i).start && bytes(i).end <= end);
                    let what = format!("disk {disk}, bytes {start}..{end}");
                    assert_eq!(chunks(g.covering(start, end - start)), touched.collect::<Vec<_>>(), "{what}");
                    assert_eq!(chunks(g.inner(start, end - start)), inside.collect::<Vec<_>>(), "{what}");
                }
            }
        }
    }

    #[test]
    fn default_chunk_size_keeps_digest_maps_at_64_mib() {
        const GIB: u64 = 1 << 30;
        assert_eq!(default_chunk_size(0), 64 * 1024);
        assert_eq!(default_chunk_size(4 * GIB), 64 * 1024);
        assert_eq!(default_chunk_size(128 * GIB), 64 * 1024);
        assert_eq!(default_chunk_size(128 * GIB + 1), 128 * 1024);
        assert_eq!(default_chunk_size(2048 * GIB), 1024 * 1024);
        assert_eq!(default_chunk_size(8192 * GIB), 4 << 20);
        assert_eq!(default_chunk_size(u64::MAX), 4 << 20);
        for size in [GIB, 100 * GIB, 300 * GIB, 5000 * GIB] {
            let cs = u64::from(default_chunk_size(size));
            assert!(size.div_ceil(cs) <= MAX_DEFAULT_CHUNKS, "{size}");
        }
    }
}
