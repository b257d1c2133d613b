//! Property tests of the extent and chunk algebra against naive models.

use std::collections::BTreeSet;

use ferry_planner::{sample_unchanged, ChangeMap, ChunkSet, Extent};
use proptest::prelude::*;

/// Bytes of the model universe; extents may reach a little beyond it.
const SPACE: u64 = 1000;

fn extents() -> impl Strategy<Value = Vec<Extent>> {
    prop::collection::vec((0..SPACE, 0..120u64).prop_map(|(o, l)| Extent::new(o, l)), 0..24)
}

/// The bitmap model: which bytes of 0..SPACE + 128 are set.
fn bitmap(extents: &[Extent]) -> Vec<bool> {
    let mut bits = vec![false; (SPACE + 128) as usize];
    for e in extents {
        for b in e.offset..e.end() {
            bits[b as usize] = true;
        }
    }
    bits
}

fn assert_canonical(map: &ChangeMap) {
    for e in map.extents() {
        assert!(e.len > 0, "empty extent in {map:?}");
    }
    for w in map.extents().windows(2) {
        assert!(w[0].end() < w[1].offset, "not sorted and coalesced: {map:?}");
    }
    assert_eq!(map.bytes(), map.extents().iter().map(|e| e.len).sum::<u64>());
}

fn chunk_model(set: &ChunkSet) -> BTreeSet<u64> {
    set.iter().collect()
}

fn assert_chunks_canonical(set: &ChunkSet) {
    for r in set.ranges() {
        assert!(r.start < r.end, "empty range in {set:?}");
    }
    for w in set.ranges().windows(2) {
        assert!(w[0].end < w[1].start, "not sorted and coalesced: {set:?}");
    }
}

fn chunk_indices() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(0..200u64, 0..60)
}

proptest! {
    #[test]
    fn from_extents_is_canonical_and_exact(v in extents()) {
        let map = ChangeMap::from_extents(v.iter().copied());
        assert_canonical(&map);
        prop_assert_eq!(bitmap(map.extents()), bitmap(&v));
        prop_assert_eq!(map.bytes() as usize, bitmap(&v).iter().filter(|b| **b).count());
    }

    #[test]
    fn insert_equals_from_extents(v in extents()) {
        let mut map = ChangeMap::new();
        for e in &v {
            map.insert(*e);
            assert_canonical(&map);
        }
        prop_assert_eq!(map, ChangeMap::from_extents(v));
    }

    #[test]
    fn union_and_intersection_match_bitmaps(a in extents(), b in extents()) {
        let (ma, mb) = (ChangeMap::from_extents(a.clone()), ChangeMap::from_extents(b.clone()));
        let (ba, bb) = (bitmap(&a), bitmap(&b));
        let u = ma.union(&mb);
        let i = ma.intersection(&mb);
        assert_canonical(&u);
        assert_canonical(&i);
        let want_u: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x || *y).collect();
        let want_i: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x && *y).collect();
        prop_assert_eq!(bitmap(u.extents()), want_u);
        prop_assert_eq!(bitmap(i.extents()), want_i);
        prop_assert_eq!(&u, &mb.union(&ma));
        prop_assert_eq!(&i, &mb.intersection(&ma));
    }

    #[test]
    fn clip_never_exceeds_size(v in extents(), size in 0..SPACE + 200) {
        let map = ChangeMap::from_extents(v.clone());
        let c = map.clip(size);
        assert_canonical(&c);
        prop_assert!(c.extents().last().is_none_or(|e| e.end() <= size));
        let want: Vec<bool> = bitmap(&v).iter().enumerate().map(|(i, b)| *b && (i as u64) < size).collect();
        prop_assert_eq!(bitmap(c.extents()), want);
    }

    #[test]
    fn widen_covers_and_aligns(v in extents(), shift in 0..7u32) {
        let cs = 1u32 << shift;
        let map = ChangeMap::from_extents(v);
        let w = map.widen(cs);
        assert_canonical(&w);
        for e in w.extents() {
            prop_assert_eq!(e.offset % u64::from(cs), 0);
            prop_assert_eq!(e.end() % u64::from(cs), 0);
        }
        prop_assert_eq!(&map.intersection(&w), &map);
        // Nothing more than the chunks touched.
        prop_assert_eq!(w.bytes(), map.chunks(cs, u64::MAX).count() * u64::from(cs));
    }

    #[test]
    fn chunks_equal_the_chunks_touched(v in extents(), cs in 1..100u32, disk in 0..SPACE + 200) {
        let map = ChangeMap::from_extents(v.clone());
        let set = map.chunks(cs, disk);
        assert_chunks_canonical(&set);
        let want: BTreeSet<u64> = bitmap(&v)
            .iter()
            .enumerate()
            .filter(|(b, set)| **set && (*b as u64) < disk)
            .map(|(b, _)| b as u64 / u64::from(cs))
            .collect();
        prop_assert_eq!(chunk_model(&set), want);
        // bytes(): the chunks' bytes within the disk.
        let naive: u64 = set.iter().map(|i| (disk.min((i + 1) * u64::from(cs))) - i * u64::from(cs)).sum();
        prop_assert_eq!(set.bytes(cs, disk), naive);
        prop_assert!(set.bytes(cs, disk) >= map.clip(disk).bytes());
    }

    #[test]
    fn chunkset_algebra_matches_sets(a in chunk_indices(), b in chunk_indices(), probe in 0..210u64) {
        let (sa, sb) = (ChunkSet::from_indices(a.clone()), ChunkSet::from_indices(b.clone()));
        let (ma, mb): (BTreeSet<u64>, BTreeSet<u64>) = (a.into_iter().collect(), b.into_iter().collect());
        assert_chunks_canonical(&sa);
        prop_assert_eq!(chunk_model(&sa), ma.clone());
        prop_assert_eq!(sa.count(), ma.len() as u64);
        prop_assert_eq!(sa.contains(probe), ma.contains(&probe));
        let sorted = ChunkSet::from_indices(ma.iter().copied());
        prop_assert_eq!(&sorted, &sa);
        for (got, want) in [
            (sa.union(&sb), ma.union(&mb).copied().collect::<BTreeSet<u64>>()),
            (sa.intersection(&sb), ma.intersection(&mb).copied().collect()),
            (sa.difference(&sb), ma.difference(&mb).copied().collect()),
        ] {
            assert_chunks_canonical(&got);
            prop_assert_eq!(chunk_model(&got), want);
        }
    }

    #[test]
    fn sample_is_sorted_distinct_and_unchanged(
        changed in chunk_indices(),
        count in 0..250u64,
        n in 0..40usize,
        seed in any::<u64>(),
    ) {
        let changed = ChunkSet::from_indices(changed);
        let s = sample_unchanged(&changed, count, n, seed);
        let unchanged = (0..count).filter(|i| !changed.contains(*i)).count();
        prop_assert_eq!(s.len(), n.min(unchanged));
        prop_assert!(s.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(s.iter().all(|i| *i < count && !changed.contains(*i)));
        prop_assert_eq!(&s, &sample_unchanged(&changed, count, n, seed));
    }
}

#[test]
fn chunkset_all_and_bytes_of_partial_last_chunk() {
    let all = ChunkSet::all(3);
    assert_eq!(all.iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(all.bytes(65536, 2 * 65536 + 1), 2 * 65536 + 1);
    assert!(ChunkSet::all(0).is_empty());
    // Chunks beyond the disk count for nothing.
    assert_eq!(ChunkSet::from_range(5..10).bytes(65536, 65536), 0);
}

#[test]
fn chunks_of_a_huge_disk_stay_ranges() {
    // 16 TiB disk, 64 KiB chunks: one range, not 2^28 indices.
    let disk = 16u64 << 40;
    let set = ChangeMap::full(disk).chunks(65536, disk);
    assert_eq!(set.ranges().len(), 1);
    assert_eq!(set.count(), disk / 65536);
    assert_eq!(set.bytes(65536, disk), disk);
    let sample = sample_unchanged(&ChunkSet::from_range(0..1000), disk / 65536, 64, 7);
    assert_eq!(sample.len(), 64);
}
