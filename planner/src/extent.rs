//! Extents, change maps (byte ranges) and chunk sets (chunk-index ranges).

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// A byte range of a disk: `offset..offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Extent {
    /// An extent of `len` bytes at `offset`.
    pub const fn new(offset: u64, len: u64) -> Self {
        Extent { offset, len }
    }

    /// One past the last byte, saturating at `u64::MAX`.
    pub const fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    /// Whether the extent holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A set of changed bytes: extents sorted by offset, coalesced (no two overlap
/// or touch) and non-empty.
///
/// Extents whose end would pass `u64::MAX` are cut at `u64::MAX`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ChangeMap {
    extents: Vec<Extent>,
}

impl ChangeMap {
    /// An empty map: nothing changed.
    pub fn new() -> Self {
        ChangeMap::default()
    }

    /// Every byte of a disk of `size` bytes (empty if `size` is 0).
    pub fn full(size: u64) -> Self {
        let mut map = ChangeMap::new();
        map.insert(Extent::new(0, size));
        map
    }

    /// A map of the given extents in any order; overlapping and adjacent
    /// extents are merged, empty ones dropped.
    pub fn from_extents(extents: impl IntoIterator<Item = Extent>) -> Self {
        let mut v: Vec<Extent> = extents
            .into_iter()
            .filter(|e| !e.is_empty())
            .map(|e| Extent::new(e.offset, e.end() - e.offset))
            .filter(|e| !e.is_empty())
            .collect();
        v.sort_unstable_by_key(|e| e.offset);
        ChangeMap { extents: coalesce_sorted(v) }
    }

    /// Adds the bytes of `extent` (a no-op for an empty extent).
    pub fn insert(&mut self, extent: Extent) {
        let start = extent.offset;
        let end = extent.end();
        if start == end {
            return;
        }
        // Extents touching or overlapping start..end are lo..hi.
        let lo = self.extents.partition_point(|e| e.end() < start);
        let hi = self.extents.partition_point(|e| e.offset <= end);
        if lo == hi {
            self.extents.insert(lo, Extent::new(start, end - start));
            return;
        }
        let new_start = start.min(self.extents[lo].offset);
        let new_end = end.max(self.extents[hi - 1].end());
        self.extents.drain(lo + 1..hi);
        self.extents[lo] = Extent::new(new_start, new_end - new_start);
    }

    /// The extents, sorted, coalesced and non-empty.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        // Disjoint ranges below 2^64 cannot sum above 2^64 - 1.
        self.extents.iter().map(|e| e.len).sum()
    }

    /// Bytes in either map.
    pub fn union(&self, other: &ChangeMap) -> ChangeMap {
        let mut v = Vec::with_capacity(self.extents.len() + other.extents.len());
        let (mut a, mut b) = (self.extents.iter().peekable(), other.extents.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.offset <= y.offset => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            v.extend(next.copied());
        }
        ChangeMap { extents: coalesce_sorted(v) }
    }

    /// Bytes in both maps.
    pub fn intersection(&self, other: &ChangeMap) -> ChangeMap {
        let mut v = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.extents.len() && j < other.extents.len() {
            let (x, y) = (self.extents[i], other.extents[j]);
            let start = x.offset.max(y.offset);
            let end = x.end().min(y.end());
            if start < end {
                v.push(Extent::new(start, end - start));
            }
            if x.end() <= y.end() {
                i += 1;
            } else {
                j += 1;
            }
        }
        // Pieces of disjoint inputs are disjoint, but may touch.
        ChangeMap { extents: coalesce_sorted(v) }
    }

    /// The bytes below `size` (the disk size).
    pub fn clip(&self, size: u64) -> ChangeMap {
        let extents = self
            .extents
            .iter()
            .take_while(|e| e.offset < size)
            .map(|e| Extent::new(e.offset, e.end().min(size) - e.offset))
            .collect();
        ChangeMap { extents }
    }

    /// Every extent widened outwards to multiples of `chunk_size`, then coalesced.
    ///
    /// An end that would round up past `u64::MAX` stays at `u64::MAX`; clip to
    /// the disk size afterwards (or use [`ChangeMap::chunks`]).
    ///
    /// # Panics
    /// If `chunk_size` is 0.
    pub fn widen(&self, chunk_size: u32) -> ChangeMap {
        assert!(chunk_size > 0, "chunk size must be non-zero");
        let cs = u64::from(chunk_size);
        let v = self
            .extents
            .iter()
            .map(|e| {
                let start = e.offset / cs * cs;
                let end = e.end().div_ceil(cs).saturating_mul(cs);
                Extent::new(start, end - start)
            })
            .collect();
        ChangeMap { extents: coalesce_sorted(v) }
    }

    /// The chunks of a disk of `disk_size` bytes that hold at least one byte of
    /// this map (bytes at or beyond `disk_size` are ignored).
    ///
    /// # Panics
    /// If `chunk_size` is 0.
    pub fn chunks(&self, chunk_size: u32, disk_size: u64) -> ChunkSet {
        assert!(chunk_size > 0, "chunk size must be non-zero");
        let cs = u64::from(chunk_size);
        let ranges = self
            .extents
            .iter()
            .take_while(|e| e.offset < disk_size)
            .map(|e| e.offset / cs..e.end().min(disk_size).div_ceil(cs))
            .collect();
        ChunkSet { ranges: coalesce_ranges(ranges) }
    }
}

impl FromIterator<Extent> for ChangeMap {
    fn from_iter<I: IntoIterator<Item = Extent>>(iter: I) -> Self {
        ChangeMap::from_extents(iter)
    }
}

/// Merges overlapping or touching extents of a list sorted by offset.
fn coalesce_sorted(v: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v.into_iter().filter(|e| !e.is_empty()) {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                let end = last.end().max(e.end());
                last.len = end - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

/// Merges overlapping or touching ranges of a list sorted by start, dropping empty ones.
fn coalesce_ranges(v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v.into_iter().filter(|r| r.start < r.end) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// A set of chunk indices, held as sorted, coalesced, non-empty ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ChunkSet {
    ranges: Vec<Range<u64>>,
}

impl ChunkSet {
    /// The empty set.
    pub fn new() -> Self {
        ChunkSet::default()
    }

    /// Every chunk of a disk of `chunk_count` chunks: `0..chunk_count`.
    pub fn all(chunk_count: u64) -> Self {
        ChunkSet::from_range(0..chunk_count)
    }

    /// The set of the given indices (sorted input is fastest; any order and
    /// duplicates are accepted). `u64::MAX` is not a valid chunk index (a disk
    /// has at most `u64::MAX` chunks) and is ignored.
    pub fn from_indices(indices: impl IntoIterator<Item = u64>) -> Self {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let mut sorted = true;
        for i in indices {
            if i == u64::MAX {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.end == i => last.end += 1,
                Some(last) if i >= last.start && i < last.end => {}
                Some(last) => {
                    sorted &= i > last.end;
                    ranges.push(i..i + 1);
                }
                None => ranges.push(i..i + 1),
            }
        }
        if !sorted {
            ranges.sort_unstable_by_key(|r| r.start);
        }
        ChunkSet { ranges: coalesce_ranges(ranges) }
    }

    /// The chunks of one range (empty if `range` is).
    pub fn from_range(range: Range<u64>) -> Self {
        ChunkSet::from_ranges(std::iter::once(range))
    }

    /// The set of the given ranges, in any order, overlapping or not.
    pub fn from_ranges(ranges: impl IntoIterator<Item = Range<u64>>) -> Self {
        let mut v: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
        v.sort_unstable_by_key(|r| r.start);
        ChunkSet { ranges: coalesce_ranges(v) }
    }

    /// The ranges, sorted, coalesced (no two touch) and non-empty.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Number of chunks in the set.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether the set holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether chunk `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        let k = self.ranges.partition_point(|r| r.end <= i);
        self.ranges.get(k).is_some_and(|r| r.start <= i)
    }

    /// The chunk indices in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|r| r.clone())
    }

    /// Bytes these chunks cover on a disk of `disk_size` bytes, the last chunk
    /// at its real length; chunks beyond the disk count for nothing.
    pub fn bytes(&self, chunk_size: u32, disk_size: u64) -> u64 {
        let cs = u128::from(chunk_size);
        let disk = u128::from(disk_size);
        let total: u128 = self
            .ranges
            .iter()
            .map(|r| {
                let start = (u128::from(r.start) * cs).min(disk);
                let end = (u128::from(r.end) * cs).min(disk);
                end - start
            })
            .sum();
        // At most disk_size.
        total as u64
    }

    /// Chunks in either set.
    pub fn union(&self, other: &ChunkSet) -> ChunkSet {
        ChunkSet::from_ranges(self.ranges.iter().chain(&other.ranges).cloned())
    }

    /// Chunks in both sets.
    pub fn intersection(&self, other: &ChunkSet) -> ChunkSet {
        let mut v = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.ranges.len() && j < other.ranges.len() {
            let (x, y) = (&self.ranges[i], &other.ranges[j]);
            let (start, end) = (x.start.max(y.start), x.end.min(y.end));
            if start < end {
                v.push(start..end);
            }
            if x.end <= y.end {
                i += 1;
            } else {
                j += 1;
            }
        }
        ChunkSet { ranges: coalesce_ranges(v) }
    }

    /// Chunks in `self` but not in `other`.
    pub fn difference(&self, other: &ChunkSet) -> ChunkSet {
        let mut v = Vec::new();
        let mut j = 0;
        for r in &self.ranges {
            let mut start = r.start;
            // Skip ranges of `other` that end before this one starts.
            while j < other.ranges.len() && other.ranges[j].end <= start {
                j += 1;
            }
            let mut k = j;
            while k < other.ranges.len() && other.ranges[k].start < r.end {
                let o = &other.ranges[k];
                if o.start > start {
                    v.push(start..o.start);
                }
                start = start.max(o.end);
                k += 1;
            }
            if start < r.end {
                v.push(start..r.end);
            }
        }
        ChunkSet { ranges: v }
    }
}

impl FromIterator<u64> for ChunkSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        ChunkSet::from_indices(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, len: u64) -> Extent {
        Extent::new(offset, len)
    }

    #[test]
    fn from_extents_sorts_and_merges_overlapping_and_adjacent() {
        let m = ChangeMap::from_extents([e(100, 10), e(0, 10), e(10, 5), e(105, 20), e(50, 0)]);
        assert_eq!(m.extents(), &[e(0, 15), e(100, 25)]);
        assert_eq!(m.len(), 2);
        assert_eq!(m.bytes(), 40);
    }

    #[test]
    fn extent_past_u64_max_is_cut() {
        let m = ChangeMap::from_extents([e(u64::MAX - 1, 10)]);
        assert_eq!(m.extents(), &[e(u64::MAX - 1, 1)]);
    }

    #[test]
    fn insert_bridges_neighbours() {
        let mut m = ChangeMap::from_extents([e(0, 10), e(20, 10), e(40, 10)]);
        m.insert(e(10, 10));
        assert_eq!(m.extents(), &[e(0, 30), e(40, 10)]);
        m.insert(e(60, 5));
        m.insert(e(35, 2));
        assert_eq!(m.extents(), &[e(0, 30), e(35, 2), e(40, 10), e(60, 5)]);
        m.insert(e(5, 100));
        assert_eq!(m.extents(), &[e(0, 105)]);
    }

    #[test]
    fn full_of_zero_is_empty() {
        assert!(ChangeMap::full(0).is_empty());
        assert_eq!(ChangeMap::full(7).extents(), &[e(0, 7)]);
    }

    #[test]
    fn widen_and_chunks_with_partial_last_chunk() {
        let m = ChangeMap::from_extents([e(5, 1), e(4090, 20)]);
        assert_eq!(m.widen(4096).extents(), &[e(0, 8192)]);
        // Disk of 5000 bytes: chunk 1 is 904 bytes long.
        let c = m.chunks(4096, 5000);
        assert_eq!(c, ChunkSet::from_range(0..2));
        assert_eq!(c.bytes(4096, 5000), 5000);
        assert_eq!(ChangeMap::from_extents([e(6000, 10)]).chunks(4096, 5000).count(), 0);
    }

    #[test]
    fn chunkset_difference_and_contains() {
        let a = ChunkSet::from_ranges([0..10, 20..30]);
        let b = ChunkSet::from_indices([0, 3, 4, 9, 10, 25]);
        assert_eq!(b.ranges(), &[0..1, 3..5, 9..11, 25..26]);
        assert_eq!(a.difference(&b).ranges(), &[1..3, 5..9, 20..25, 26..30]);
        assert!(a.contains(29) && !a.contains(30) && !a.contains(15));
        assert_eq!(ChunkSet::from_indices([5, 1, 2, 5, 3]).ranges(), &[1..4, 5..6]);
        assert_eq!(ChunkSet::from_indices([u64::MAX]).count(), 0);
    }
}
