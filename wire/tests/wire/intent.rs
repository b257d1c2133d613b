//! Intent (0x34, optional): its codec, its limits on both sides, its session
//! rules, and that a peer which does not know it can skip it.

use bytes::{BufMut, Bytes, BytesMut};
use ferry_wire::*;

use crate::checks::{drive, pump, CHUNK, DISK_SIZE};

const CHUNKS: u64 = DISK_SIZE.div_ceil(CHUNK as u64);

fn intent_of(disk: u32, runs: &[(u64, u32)]) -> Intent {
    Intent { disk, runs: runs.iter().map(|&(first_chunk, count)| ChunkRun { first_chunk, count }).collect() }
}

/// An Intent for the test disk 0 of [`drive`].
fn intent(runs: &[(u64, u32)]) -> Frame {
    Frame::Intent(intent_of(0, runs))
}

/// A chunk of the test disk 0 (the last one is short).
fn data(chunk: u64) -> Frame {
    let len = (DISK_SIZE - chunk * u64::from(CHUNK)).min(u64::from(CHUNK)) as usize;
    Frame::Data(Data {
        disk: 0,
        chunk,
        logical_len: len as u32,
        codec: Codec::None,
        digest: [chunk as u8; 32],
        payload: Bytes::from(vec![chunk as u8; len]),
    })
}

/// An Intent frame written by hand: `count` as given, then `runs`, then `extra` bytes.
fn raw_intent(count: u32, runs: &[(u64, u32)], extra: &[u8]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u32_le(0);
    body.put_u32_le(count);
    for &(first, n) in runs {
        body.put_u64_le(first);
        body.put_u32_le(n);
    }
    body.put_slice(extra);
    let mut b = BytesMut::new();
    b.put_slice(&encode_header(frame_type::INTENT, FLAG_OPTIONAL, body.len() as u32));
    b.put_slice(&body);
    b.freeze()
}

#[test]
fn intent_round_trips_with_flag_optional() {
    let f = intent(&[(0, 1), (1, 2), (10, u32::MAX), (u64::MAX - 1, 1)]);
    let b = f.to_bytes();
    assert_eq!(b.len(), HEADER_LEN + 8 + 12 * 4);
    let h = decode_header(b[..HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!((h.frame_type, h.flags, h.body_len), (frame_type::INTENT, FLAG_OPTIONAL, 8 + 12 * 4));
    assert_eq!(f.flags(), FLAG_OPTIONAL);
    assert_eq!((f.name(), type_name(0x34)), ("Intent", "Intent"));
    assert_eq!(decode_one(&b), Ok(f));
    // The layout by hand: disk u32, count u32, then (first_chunk u64, chunks u32) per run.
    let f = Frame::Intent(intent_of(0x0102_0304, &[(0x1122_3344_5566_7788, 0x99AA_BBCC)]));
    assert_eq!(
        &f.to_bytes()[HEADER_LEN..],
        &[4, 3, 2, 1, 1, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xCC, 0xBB, 0xAA, 0x99]
    );
    // A receiver ignores FLAG_OPTIONAL on a type it knows: without it the frame decodes the same.
    let mut plain = f.to_bytes().to_vec();
    plain[..HEADER_LEN].copy_from_slice(&encode_header(frame_type::INTENT, 0, 20));
    assert_eq!(decode_one(&plain), Ok(f));
}

#[test]
fn intent_at_the_run_limit_round_trips() {
    let runs: Vec<(u64, u32)> = (0..MAX_INTENT_RUNS as u64).map(|i| (i * 3, 2)).collect();
    let f = intent(&runs);
    let b = f.to_bytes();
    assert_eq!(b.len(), HEADER_LEN + 8 + 12 * MAX_INTENT_RUNS);
    assert!(b.len() - HEADER_LEN <= MAX_BODY_LEN as usize);
    assert_eq!(decode_one(&b), Ok(f));
}

/// An older ferry does not know 0x34: it sees an unknown type with
/// FLAG_OPTIONAL and skips it. Simulated with a type byte this version does
/// not know, carrying the Intent's flags and body.
#[test]
fn intent_is_skipped_by_a_peer_that_does_not_know_it() {
    let unknown = 0x36;
    assert_eq!(type_name(unknown), "Unknown");
    let b = intent(&[(1, 2)]).to_bytes();
    let mut as_unknown = encode_header(unknown, b[3], (b.len() - HEADER_LEN) as u32).to_vec();
    as_unknown.extend_from_slice(&b[HEADER_LEN..]);
    assert_eq!(decode_one(&as_unknown), Ok(Frame::Unknown { frame_type: unknown }));
    let (mut c, mut s) = drive(4);
    s.receive(&as_unknown);
    assert_eq!(s.poll_event(), Ok(None));
    c.send(&data(1)).unwrap();
    assert_eq!(pump(&mut c, &mut s), vec![Event::Frame(data(1))]);
    // Without FLAG_OPTIONAL the same frame would end the session: hence the rule.
    as_unknown[..HEADER_LEN].copy_from_slice(&encode_header(unknown, 0, (b.len() - HEADER_LEN) as u32));
    assert_eq!(decode_one(&as_unknown), Err(WireError::UnknownFrameType(unknown)));
}

#[test]
fn intent_decode_errors() {
    let invalid = |field, value| Err(WireError::InvalidValue { frame: "Intent", field, value });
    // The run count: at most MAX_INTENT_RUNS (checked before the runs are read), at least 1.
    assert_eq!(
        decode_one(&raw_intent(MAX_INTENT_RUNS as u32 + 1, &[], &[])),
        Err(WireError::FieldTooLong {
            frame: "Intent",
            field: "count",
            len: MAX_INTENT_RUNS as u64 + 1,
            max: MAX_INTENT_RUNS as u64
        })
    );
    assert!(matches!(
        decode_one(&raw_intent(u32::MAX, &[], &[])),
        Err(WireError::FieldTooLong { field: "count", len: 0xFFFF_FFFF, .. })
    ));
    assert_eq!(decode_one(&raw_intent(0, &[], &[])), invalid("count", 0));
    // The body is exactly 8 + 12 * count bytes.
    assert_eq!(
        decode_one(&raw_intent(2, &[(0, 1)], &[])),
        Err(WireError::Truncated { frame: "Intent", field: "runs" })
    );
    assert_eq!(
        decode_one(&raw_intent(1, &[(0, 1)], &[0])),
        Err(WireError::TrailingBytes { frame: "Intent", extra: 1 })
    );
    assert_eq!(
        decode_one(&raw_intent(1, &[(0, 1), (5, 1)], &[])),
        Err(WireError::TrailingBytes { frame: "Intent", extra: 12 })
    );
    let mut short = BytesMut::new();
    short.put_slice(&encode_header(frame_type::INTENT, FLAG_OPTIONAL, 6));
    short.put_slice(&[0; 6]);
    assert_eq!(decode_one(&short), Err(WireError::Truncated { frame: "Intent", field: "count" }));
    // Every run has at least one chunk and ends within u64.
    assert_eq!(decode_one(&raw_intent(2, &[(0, 1), (4, 0)], &[])), invalid("count", 0));
    assert_eq!(decode_one(&raw_intent(1, &[(u64::MAX, 1)], &[])), invalid("first_chunk", u64::MAX));
    assert!(decode_one(&raw_intent(1, &[(u64::MAX - 1, 1)], &[])).is_ok());
    // Runs strictly increasing, not overlapping (adjacent is fine).
    assert_eq!(decode_one(&raw_intent(2, &[(0, 5), (4, 1)], &[])), invalid("runs", 4));
    assert_eq!(decode_one(&raw_intent(2, &[(10, 1), (3, 1)], &[])), invalid("runs", 3));
    assert_eq!(decode_one(&raw_intent(2, &[(3, 1), (3, 1)], &[])), invalid("runs", 3));
    assert_eq!(decode_one(&raw_intent(2, &[(0, 5), (5, 1)], &[])), Ok(intent(&[(0, 5), (5, 1)])));
}

/// The sender refuses every Intent the decoder refuses, with the same error.
#[test]
fn sender_refuses_the_intents_a_peer_must_refuse() {
    let too_many: Vec<(u64, u32)> = (0..=MAX_INTENT_RUNS as u64).map(|i| (i, 1)).collect();
    let bad: [&[(u64, u32)]; 6] =
        [&[], &too_many, &[(0, 0)], &[(1, 1), (u64::MAX, 1)], &[(0, 5), (4, 1)], &[(3, 1), (2, 1)]];
    let (mut c, mut s) = drive(4);
    for runs in bad {
        let f = intent(runs);
        let refused = c.send(&f).unwrap_err();
        assert!(matches!(refused, WireError::InvalidValue { .. } | WireError::FieldTooLong { .. }), "{refused}");
        assert_eq!(decode_one(&f.to_bytes()), Err(refused), "{} runs", runs.len());
    }
    assert_eq!(c.take_transmit(), None, "nothing refused was queued");
    // A refused Intent leaves the session as it was.
    c.send(&intent(&[(0, 1)])).unwrap();
    assert_eq!(pump(&mut c, &mut s), vec![Event::Frame(intent(&[(0, 1)]))]);
}

#[test]
fn session_accepts_intents_ahead_of_data() {
    let (mut c, mut s) = drive(4);
    let sent = [
        intent(&[(0, 1)]),
        // Adjacent to the previous intent; chunk 0 was announced and is never sent.
        intent(&[(1, 2)]),
        data(1), // announced
        data(3), // never announced
        // After data sent: from next_min (4), which is past the last intent's end (3).
        intent(&[(4, 1)]),
        data(4),
        Frame::Flush(Flush { disk: 0, next_chunk: CHUNKS }),
    ];
    for f in &sent {
        c.send(f).unwrap();
    }
    let got = pump(&mut c, &mut s);
    assert_eq!(got, sent.iter().cloned().map(Event::Frame).collect::<Vec<_>>());
    s.send(&Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: CHUNKS })).unwrap();
    pump(&mut s, &mut c);
    c.send(&Frame::Commit(Commit { disk_count: 1 })).unwrap();
    pump(&mut c, &mut s);
    assert_eq!((c.state(), s.state()), (State::Committing, State::Committing));
}

#[test]
fn intent_before_resume_info_or_for_an_unknown_disk_is_refused() {
    let (mut c, _) = drive(4);
    let od = OpenDisk { disk: 1, name: "d1".into(), size: 1 << 20, chunk_size: 1 << 16, mode: Mode::Cbt };
    c.send(&Frame::OpenDisk(od)).unwrap();
    let on = |disk| Frame::Intent(intent_of(disk, &[(0, 1)]));
    assert_eq!(c.send(&on(1)), Err(WireError::Disk { what: "frame before ResumeInfo for", disk: 1 }));
    assert_eq!(c.send(&on(7)), Err(WireError::Disk { what: "frame for unknown", disk: 7 }));
    // Outside a replica session, or once Commit is sent.
    let (mut c, _) = drive(2);
    assert_eq!(
        c.send(&intent(&[(0, 1)])),
        Err(WireError::IllegalFrame { frame: "Intent", direction: "sent", state: "Ready" })
    );
    let (mut c, _) = drive(6);
    assert_eq!(
        c.send(&intent(&[(0, 1)])),
        Err(WireError::IllegalFrame { frame: "Intent", direction: "sent", state: "Committing" })
    );
}

#[test]
fn intent_behind_data_sent_is_refused() {
    let behind = |chunk| WireError::Chunk { disk: 0, chunk, what: "intent behind data sent or an earlier intent" };
    let (mut c, mut s) = drive(4);
    c.send(&data(2)).unwrap();
    assert_eq!(c.send(&intent(&[(2, 1)])), Err(behind(2)));
    assert_eq!(c.send(&intent(&[(0, 4)])), Err(behind(0)));
    // A Flush moves next_min too.
    c.send(&Frame::Flush(Flush { disk: 0, next_chunk: 4 })).unwrap();
    assert_eq!(c.send(&intent(&[(3, 1)])), Err(behind(3)));
    c.send(&intent(&[(4, 1)])).unwrap();
    pump(&mut c, &mut s);
    // The target runs the same check on what it receives.
    s.receive(&intent(&[(4, 1)]).to_bytes());
    assert_eq!(s.poll_event(), Err(behind(4)));
    assert!(s.is_closed());
    assert!(matches!(
        decode_one(&s.take_transmit().unwrap()),
        Ok(Frame::Error(ErrorFrame { code: ErrorCode::Protocol, .. }))
    ));
}

#[test]
fn intent_behind_an_earlier_intent_is_refused() {
    let behind = |chunk| WireError::Chunk { disk: 0, chunk, what: "intent behind data sent or an earlier intent" };
    let (mut c, _) = drive(4);
    c.send(&intent(&[(0, 1), (2, 2)])).unwrap();
    assert_eq!(c.send(&intent(&[(3, 1)])), Err(behind(3)));
    assert_eq!(c.send(&intent(&[(1, 1)])), Err(behind(1)));
    // Data behind the intent's end is fine (intents are advisory), but does not move intent_end back.
    c.send(&data(1)).unwrap();
    assert_eq!(c.send(&intent(&[(2, 1)])), Err(behind(2)));
    c.send(&intent(&[(4, 1)])).unwrap();
}

#[test]
fn intent_beyond_the_disk_end_is_refused() {
    let beyond = |chunk| WireError::Chunk { disk: 0, chunk, what: "intent beyond the end of the disk" };
    let (mut c, _) = drive(4);
    assert_eq!(c.send(&intent(&[(0, 1), (4, 2)])), Err(beyond(4)));
    assert_eq!(c.send(&intent(&[(CHUNKS, 1)])), Err(beyond(CHUNKS)));
    assert_eq!(c.send(&intent(&[(u64::MAX - 1, 1)])), Err(beyond(u64::MAX - 1)));
    // A refused Intent does not move intent_end: the whole disk can still be announced.
    c.send(&intent(&[(0, CHUNKS as u32)])).unwrap();
}

#[test]
fn intent_from_the_server_is_refused() {
    let (mut c, mut s) = drive(4);
    assert_eq!(
        s.send(&intent(&[(0, 1)])),
        Err(WireError::IllegalFrame { frame: "Intent", direction: "sent", state: "ReplicaOpen" })
    );
    c.receive(&intent(&[(0, 1)]).to_bytes());
    assert_eq!(
        c.poll_event(),
        Err(WireError::IllegalFrame { frame: "Intent", direction: "received", state: "ReplicaOpen" })
    );
    assert!(c.is_closed());
}
