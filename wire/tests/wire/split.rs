//! Data payloads taken apart (`Deframer::next_split`, `Session::handle_data_head`):
//! the same frames, errors and session rules as whole frames.

use bytes::Bytes;
use ferry_wire::*;
use proptest::prelude::*;

use crate::checks::{deframe, drive, split_deframe, CHUNK};
use crate::common::arb_frame;

proptest! {
    #[test]
    fn split_frames_equal_whole_frames(
        frames in proptest::collection::vec(arb_frame(), 1..12),
        cuts in proptest::collection::vec(1usize..9000, 0..6),
    ) {
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.to_bytes()).collect();
        let (whole, err) = deframe(&wire, &cuts);
        prop_assert!(err.is_none());
        let (split, err) = split_deframe(&wire, &cuts);
        prop_assert!(err.is_none());
        prop_assert_eq!(&split, &whole);
        // Unknown frames are skipped by sessions, not by deframers: every frame is there.
        prop_assert_eq!(split.len(), frames.len());
    }
}

fn data(chunk: u64, codec: Codec, logical_len: u32, payload: Vec<u8>) -> Frame {
    Frame::Data(Data { disk: 0, chunk, logical_len, codec, digest: [3; 32], payload: Bytes::from(payload) })
}

#[test]
fn a_bad_data_head_is_refused_before_its_payload_arrives() {
    // A raw payload one byte short of its logical length: the whole frame is refused
    // when complete; taken apart, as soon as the head is in.
    let mut wire = data(0, Codec::None, CHUNK, vec![1; CHUNK as usize]).to_bytes().to_vec();
    let body_len = u32::from_le_bytes(wire[4..8].try_into().unwrap()) - 1;
    wire[4..8].copy_from_slice(&body_len.to_le_bytes());
    let check = header_check(&wire[0..8]);
    wire[8..12].copy_from_slice(&check.to_le_bytes());
    wire.pop();
    let expected = WireError::InvalidValue { frame: "Data", field: "payload length", value: u64::from(CHUNK) - 1 };
    assert_eq!(deframe(&wire, &[]), (vec![], Some(expected.clone())));
    let mut d = Deframer::new();
    d.push(&wire[..HEADER_LEN + DATA_FIXED_LEN]);
    assert_eq!(d.next_split().unwrap_err(), expected);
    // Not all of the head: nothing yet.
    let mut d = Deframer::new();
    d.push(&wire[..HEADER_LEN + DATA_FIXED_LEN - 1]);
    assert!(d.next_split().unwrap().is_none());
}

#[test]
fn take_payload_moves_only_the_buffered_payload() {
    let payload: Vec<u8> = (0..CHUNK).map(|i| i as u8).collect();
    let mut wire = data(0, Codec::None, CHUNK, payload.clone()).to_bytes().to_vec();
    wire.extend_from_slice(&Frame::Keepalive.to_bytes());
    let mut d = Deframer::new();
    d.push(&wire[..HEADER_LEN + DATA_FIXED_LEN + 100]);
    let Some(Split::Data(head)) = d.next_split().unwrap() else { panic!("no data head") };
    assert_eq!((head.chunk, head.payload_len, head.logical_len), (0, CHUNK, CHUNK));
    let mut got = vec![0u8; CHUNK as usize];
    assert_eq!(d.take_payload(&mut got), 100);
    assert_eq!((d.payload_left(), d.buffered()), (CHUNK as usize - 100, 0));
    // The rest "from the socket", then the next frame.
    let rest = &wire[HEADER_LEN + DATA_FIXED_LEN + 100..];
    let direct = CHUNK as usize - 100;
    got[100..].copy_from_slice(&rest[..direct]);
    d.payload_received(direct);
    d.push(&rest[direct..]);
    assert_eq!(got, payload);
    assert_eq!(d.payload_left(), 0);
    assert!(matches!(d.next_split().unwrap(), Some(Split::Frame(Frame::Keepalive))));
}

#[test]
#[should_panic(expected = "the payload of the last data frame must be taken first")]
fn asking_for_a_frame_before_the_payload_is_taken_panics() {
    let wire = data(0, Codec::None, CHUNK, vec![1; CHUNK as usize]).to_bytes();
    let mut d = Deframer::new();
    d.push(&wire);
    let _ = d.next_split().unwrap();
    let _ = d.next_split();
}

/// The server side of a session with disk 0 open (4 full chunks and a short one).
fn server_with_a_disk() -> Session {
    drive(4).1
}

fn head(chunk: u64, codec: Codec, logical_len: u32, payload_len: u32) -> DataHead {
    DataHead { disk: 0, chunk, logical_len, codec, digest: [3; 32], payload_len }
}

#[test]
fn a_data_head_follows_the_session_rules_of_a_whole_frame() {
    let mut s = server_with_a_disk();
    s.handle_data_head(&head(1, Codec::None, CHUNK, CHUNK)).unwrap();
    // Data travels in increasing chunk order: chunk 1 again is refused, as a whole frame is.
    let mut whole = server_with_a_disk();
    whole.handle_frame(data(1, Codec::None, CHUNK, vec![0; CHUNK as usize])).unwrap();
    let e1 = whole.handle_frame(data(1, Codec::None, CHUNK, vec![0; CHUNK as usize])).unwrap_err();
    let e2 = s.handle_data_head(&head(1, Codec::None, CHUNK, CHUNK)).unwrap_err();
    assert_eq!(e1, e2);
    assert!(matches!(e2, WireError::Chunk { disk: 0, chunk: 1, .. }), "{e2:?}");
    // The session is closed, with an Error frame queued for the peer.
    assert_eq!(s.state(), State::Closed);
    assert!(s.take_transmit().is_some());
    assert_eq!(s.handle_data_head(&head(2, Codec::None, CHUNK, CHUNK)).unwrap_err(), WireError::Closed);
}

#[test]
fn a_data_head_with_the_wrong_length_for_its_chunk_is_refused() {
    // The last chunk holds 1000 bytes.
    let mut s = server_with_a_disk();
    let e = s.handle_data_head(&head(4, Codec::None, CHUNK, CHUNK)).unwrap_err();
    assert!(matches!(e, WireError::Chunk { chunk: 4, what: "logical length does not match the disk", .. }), "{e:?}");
    let mut s = server_with_a_disk();
    let e = s.handle_data_head(&head(5, Codec::None, CHUNK, CHUNK)).unwrap_err();
    assert!(matches!(e, WireError::Chunk { chunk: 5, .. }), "{e:?}");
    let mut s = server_with_a_disk();
    s.handle_data_head(&head(4, Codec::None, 1000, 1000)).unwrap();
}
