//! Every frame type survives encode -> decode, whole or split anywhere.

use ferry_wire::*;
use proptest::prelude::*;

use crate::checks::deframe;
use crate::common::arb_frame;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_one_is_identity(frame in arb_frame()) {
        let bytes = frame.to_bytes();
        prop_assert_eq!(decode_one(&bytes), Ok(frame.clone()));
        // The header announces exactly the body that follows.
        let h = decode_header(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        prop_assert_eq!(h.body_len as usize, bytes.len() - HEADER_LEN);
        prop_assert_eq!(h.frame_type, frame.frame_type());
        prop_assert_eq!(h.flags, frame.flags());
    }

    #[test]
    fn stream_split_at_random_points(
        frames in proptest::collection::vec(arb_frame(), 1..8),
        cuts in proptest::collection::vec(1usize..200, 1..16),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&f.to_bytes());
        }
        let (got, err) = deframe(&stream, &cuts);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn wanted_never_overshoots(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
        let bytes = frame.to_bytes();
        let cut = cut.index(bytes.len());
        let mut d = Deframer::new();
        d.push(&bytes[..cut]);
        prop_assert_eq!(d.next_frame(), Ok(None));
        // `wanted` is a lower bound of what is missing, so a reader never blocks on bytes that will not come.
        prop_assert!(d.wanted() <= bytes.len() - cut);
        prop_assert!(d.wanted() > 0);
        d.push(&bytes[cut..]);
        prop_assert_eq!(d.next_frame(), Ok(Some(frame)));
        prop_assert_eq!(d.buffered(), 0);
    }
}

/// Splitting a stream of every known frame at every single byte position.
#[test]
fn stream_split_at_every_position() {
    let frames: Vec<Frame> = crate::common::known_frames().into_iter().map(|(_, f)| f).collect();
    let mut stream = Vec::new();
    for f in &frames {
        stream.extend_from_slice(&f.to_bytes());
    }
    for cut in 0..=stream.len() {
        let mut d = Deframer::new();
        let mut got = Vec::new();
        for part in [&stream[..cut], &stream[cut..]] {
            d.push(part);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames, "split at {cut}");
    }
    // And one byte at a time.
    let (got, err) = deframe(&stream, &[1]);
    assert_eq!((got, err), (frames, None));
}
