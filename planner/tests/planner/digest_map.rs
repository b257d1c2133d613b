//! Digest maps: golden encoding, corruption, resize.

use ferry_planner::{zero_chunk_digest, DigestMap, PlanError, ZeroDigests, UNKNOWN_DIGEST};
use proptest::prelude::*;

const K64: u32 = 64 * 1024;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 3 chunks of a 150000-byte disk: a known digest, an unknown one, and the
/// zero digest of the 18928-byte last chunk.
fn small_map() -> DigestMap {
    let mut m = DigestMap::new(K64, 150_000).unwrap();
    m.set(0, [0x11; 32]);
    m.set(2, zero_chunk_digest(150_000 - 2 * K64));
    m
}

#[test]
fn zero_chunk_digests_are_pinned() {
    // BLAKE3 of the empty input (from the BLAKE3 test vectors).
    assert_eq!(hex(&zero_chunk_digest(0)), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
    assert_eq!(hex(&zero_chunk_digest(K64)), hex(blake3::hash(&[0u8; 65536]).as_bytes()));
}

#[test]
fn golden_encoding() {
    let m = small_map();
    let bytes = m.encode();
    assert_eq!(bytes.len(), 32 + 3 * 32 + 32);
    let header = "4645525259444d00\
                  0100\
                  0000\
                  00000100\
                  f049020000000000\
                  0300000000000000";
    let digests = format!("{}{}{}", "11".repeat(32), "00".repeat(32), hex(&zero_chunk_digest(18_928)));
    assert_eq!(hex(&bytes[..32 + 96]), format!("{header}{digests}"));
    // Pinned: any change to the layout or the hash changes this.
    assert_eq!(hex(&bytes[128..]), GOLDEN_TRAILER);
    assert_eq!(hex(&m.map_hash()), GOLDEN_TRAILER);
    assert_eq!(hex(&zero_chunk_digest(18_928)), GOLDEN_ZERO_18928);
    assert_eq!(DigestMap::decode("m", &bytes).unwrap(), m);
}

const GOLDEN_TRAILER: &str = "0c89725c9c4da489351a395d3d1eb62206c47c81adc01b63e9522a5d615c319c";
const GOLDEN_ZERO_18928: &str = "1d34795075a8c635c11e796360f01fc3014bc01846e389b570987c372bbd4fc5";

#[test]
fn decode_rejects_every_corruption() {
    let bytes = small_map().encode();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x40;
        assert!(DigestMap::decode("m", &b).is_err(), "flip at byte {i} accepted");
    }
    for len in 0..bytes.len() {
        assert!(DigestMap::decode("m", &bytes[..len]).is_err(), "truncation to {len} accepted");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(DigestMap::decode("m", &longer).is_err());
}

#[test]
fn decode_errors_name_the_problem() {
    let bytes = small_map().encode();
    assert_eq!(
        DigestMap::decode("m", &bytes[..bytes.len() - 1]).unwrap_err(),
        PlanError::DigestMapLengthMismatch { label: "m".into(), len: bytes.len() - 1, count: 3, expected: 160 }
    );
    assert_eq!(
        DigestMap::decode("m", &bytes[..10]).unwrap_err(),
        PlanError::DigestMapTooShort { label: "m".into(), len: 10, min: 64 }
    );
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(matches!(DigestMap::decode("m", &bad), Err(PlanError::DigestMapBadMagic { .. })));
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert_eq!(
        DigestMap::decode("m", &v2).unwrap_err(),
        PlanError::DigestMapUnsupportedVersion { label: "m".into(), version: 2, supported: 1 }
    );
    let mut flipped = bytes.clone();
    flipped[40] ^= 1;
    let err = DigestMap::decode("m", &flipped).unwrap_err();
    assert!(matches!(err, PlanError::DigestMapChecksumMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("rebuild"), "{err}");
    // A header that is internally inconsistent but correctly checksummed.
    let reseal = |mut b: Vec<u8>| {
        let n = b.len() - 32;
        let sum = *blake3::hash(&b[..n]).as_bytes();
        b[n..].copy_from_slice(&sum);
        b
    };
    let mut wrong_count = bytes.clone();
    wrong_count[16] = 0x00; // disk_size 150000 -> 149744: still 3 chunks
    wrong_count[18] = 0x01; // -> 84208: 2 chunks
    assert!(matches!(
        DigestMap::decode("m", &reseal(wrong_count)),
        Err(PlanError::DigestCountMismatch { count: 3, expected: 2, .. })
    ));
    let mut bad_cs = bytes.clone();
    bad_cs[13] = 0x10; // 4096
    bad_cs[14] = 0x00;
    assert!(matches!(
        DigestMap::decode("m", &reseal(bad_cs)),
        Err(PlanError::InvalidChunkSize { chunk_size: 4096, .. })
    ));
    let mut reserved = bytes.clone();
    reserved[10] = 1;
    assert!(matches!(DigestMap::decode("m", &reseal(reserved)), Err(PlanError::DigestMapReserved { value: 1, .. })));
    // A count that would need a huge allocation is refused from the length alone.
    let mut huge = bytes.clone();
    huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(DigestMap::decode("m", &huge), Err(PlanError::DigestMapLengthMismatch { .. })));
}

#[test]
fn empty_disk_map_round_trips() {
    let m = DigestMap::new(K64, 0).unwrap();
    assert_eq!(m.chunk_count(), 0);
    assert_eq!(DigestMap::decode("m", &m.encode()).unwrap(), m);
}

#[test]
fn resize_grow_marks_partial_last_chunk_unknown_and_adds_zero_chunks() {
    let zeros = ZeroDigests::new(K64);
    let mut m = DigestMap::from_digests(K64, 150_000, vec![[1; 32], [2; 32], [3; 32]]).unwrap();
    m.resize(5 * u64::from(K64) + 7, |len| zeros.digest(len));
    assert_eq!(m.chunk_count(), 6);
    assert_eq!(m.get(0), Some([1; 32]));
    assert_eq!(m.get(1), Some([2; 32]));
    assert_eq!(m.get(2), None, "the old partial last chunk grew: unknown");
    assert_eq!(m.get(3), Some(zeros.full()));
    assert_eq!(m.get(4), Some(zeros.full()));
    assert_eq!(m.get(5), Some(zero_chunk_digest(7)));
    assert_eq!(m.chunk_len(5), 7);
}

#[test]
fn resize_grow_from_a_chunk_multiple_keeps_every_digest() {
    let zeros = ZeroDigests::new(K64);
    let mut m = DigestMap::from_digests(K64, 2 * u64::from(K64), vec![[1; 32], [2; 32]]).unwrap();
    m.resize(3 * u64::from(K64), |len| zeros.digest(len));
    assert_eq!(m.to_digests(), &[[1; 32], [2; 32], zeros.full()]);
    assert_eq!(m.unknown_count(), 0);
}

#[test]
fn resize_shrink() {
    let zeros = ZeroDigests::new(K64);
    let mut m = DigestMap::from_digests(K64, 3 * u64::from(K64), vec![[1; 32], [2; 32], [3; 32]]).unwrap();
    m.resize(2 * u64::from(K64), |len| zeros.digest(len));
    assert_eq!(m.to_digests(), &[[1; 32], [2; 32]]);
    m.resize(u64::from(K64) + 1, |len| zeros.digest(len));
    assert_eq!(m.to_digests(), &[[1; 32], UNKNOWN_DIGEST], "new partial last chunk: unknown");
    m.resize(0, |len| zeros.digest(len));
    assert_eq!(m.chunk_count(), 0);
    m.resize(10, |len| zeros.digest(len));
    assert_eq!(m.get(0), Some(zero_chunk_digest(10)));
}

#[test]
fn zeroed_map_holds_zero_digests() {
    let zeros = ZeroDigests::new(K64);
    let m = DigestMap::zeroed(K64, 150_000, &zeros).unwrap();
    assert_eq!(m.to_digests(), &[zeros.full(), zeros.full(), zero_chunk_digest(18_928)]);
    assert!(!m.differs(2, &zero_chunk_digest(18_928)));
}

proptest! {
    #[test]
    fn encode_decode_round_trip(
        shift in 16..=22u32,
        disk in 0..(1u64 << 24),
        seed in any::<u8>(),
    ) {
        let cs = 1u32 << shift;
        let mut m = DigestMap::new(cs, disk).unwrap();
        for i in 0..m.chunk_count() {
            if (i as u8) ^ seed != 0 {
                m.set(i, [(i as u8) ^ seed; 32]);
            }
        }
        let bytes = m.encode();
        prop_assert_eq!(&DigestMap::decode("p", &bytes).unwrap(), &m);
        prop_assert_eq!(&bytes[bytes.len() - 32..], &m.map_hash()[..]);
    }

    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = DigestMap::decode("p", &bytes);
    }

    #[test]
    fn resize_matches_model(
        old in 0..400_000u64,
        new in 0..400_000u64,
    ) {
        let zeros = ZeroDigests::new(K64);
        let cs = u64::from(K64);
        let mut m = DigestMap::zeroed(K64, old, &zeros).unwrap();
        for i in 0..m.chunk_count() {
            m.set(i, [i as u8 + 1; 32]);
        }
        m.resize(new, |len| zeros.digest(len));
        prop_assert_eq!(m.chunk_count(), new.div_ceil(cs));
        for i in 0..m.chunk_count() {
            prop_assert_eq!(m.get(i), after_resize(old, new, i, || [i as u8 + 1; 32]), "chunk {}", i);
        }
    }
}

/// The model of a resize from `old` to `new` bytes (64 KiB chunks): what chunk `i` holds
/// after it, given `kept`, the digest it held before (asked only for a chunk that was there). A chunk that is new is all zeros; one
/// whose length is unchanged keeps its digest; one whose length changed is unknown.
fn after_resize(old: u64, new: u64, i: u64, kept: impl FnOnce() -> [u8; 32]) -> Option<[u8; 32]> {
    let cs = u64::from(K64);
    let old_len = old.saturating_sub(i * cs).min(cs);
    let new_len = new.saturating_sub(i * cs).min(cs);
    if old_len == 0 {
        Some(zero_chunk_digest(new_len as u32))
    } else if old_len == new_len {
        Some(kept())
    } else {
        None
    }
}

/// A map over several pages: the holes keep no digests, the data pages do, and the map
/// reads, encodes and hashes as one digest per chunk would.
#[test]
fn pages_of_holes_hold_no_digests() {
    let zeros = ZeroDigests::new(K64);
    let size = 3000 * u64::from(K64) + 100;
    let mut m = DigestMap::zeroed(K64, size, &zeros).unwrap();
    assert_eq!((m.page_count(), m.held_pages()), (12, 0));
    m.set(5, zeros.full()); // a zero digest in a zero page: the page stays without digests
    m.set(600, [6; 32]);
    m.set(601, [7; 32]);
    m.mark_unknown(3000);
    assert_eq!(m.held_pages(), 2, "page 2 (chunks 512..768) and page 11 (the last)");
    let mut flat: Vec<_> = (0..m.chunk_count()).map(|i| m.get_raw(i)).collect();
    assert_eq!(flat[600], [6; 32]);
    assert_eq!(flat[3000], UNKNOWN_DIGEST);
    assert_eq!(flat[2999], zeros.full());
    let dense = DigestMap::from_digests(K64, size, flat.clone()).unwrap();
    assert_eq!(dense, m);
    assert_eq!(dense.held_pages(), 2, "from_digests keeps zero pages without digests");
    assert_eq!(dense.encode(), m.encode());
    assert_eq!(m.map_hash(), *blake3::hash(&m.encode()[..m.encode().len() - 32]).as_bytes());
    assert_eq!(m.next_unknown(0), Some(3000));
    assert_eq!(m.unknown_count(), 1);
    // Written back over with zeros: compact gives the page's memory back.
    m.set(600, zeros.full());
    m.set(601, zeros.full());
    m.compact();
    assert_eq!(m.held_pages(), 1);
    flat[600] = zeros.full();
    flat[601] = zeros.full();
    assert_eq!(m.to_digests(), flat);
}

proptest! {
    #[test]
    fn resize_across_pages_matches_model(
        old in 0..1200u64,
        new in 0..1200u64,
        old_tail in 0..3u64,
        new_tail in 0..3u64,
        set_every in 1..400u64,
    ) {
        let zeros = ZeroDigests::new(K64);
        let cs = u64::from(K64);
        let (old, new) = (old * cs / 2 + old_tail * 7, new * cs / 2 + new_tail * 7);
        let mut m = DigestMap::zeroed(K64, old, &zeros).unwrap();
        for i in (0..m.chunk_count()).step_by(set_every as usize) {
            m.set(i, [(i % 250) as u8 + 1; 32]);
        }
        let before: Vec<_> = m.to_digests();
        m.resize(new, |len| zeros.digest(len));
        prop_assert_eq!(m.chunk_count(), new.div_ceil(cs));
        for i in 0..m.chunk_count() {
            prop_assert_eq!(m.get(i), after_resize(old, new, i, || before[i as usize]), "chunk {}", i);
        }
    }
}
