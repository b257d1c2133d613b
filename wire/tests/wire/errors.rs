//! Every typed error, and that nothing else leaks.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use ferry_wire::*;

use crate::checks::{drive, local, pair, pump, MixAuth, TOKEN};

/// Deliver everything `from` queued to `to` and return `to`'s first result.
fn deliver(from: &mut Session, to: &mut Session) -> Result<Option<Event>, WireError> {
    while let Some(b) = from.take_transmit() {
        to.receive(&b);
    }
    to.poll_event()
}

#[test]
fn wrong_token_fails_at_the_server_and_reveals_nothing() {
    let mut c = Session::client(local("source", 0x11), Arc::new(MixAuth([0x43; 32])), [0; 32]);
    let mut s = Session::server(local("target", 0x22), Arc::new(MixAuth(TOKEN)), [0; 32]);
    assert_eq!(deliver(&mut c, &mut s), Ok(None)); // Hello -> Welcome
    assert_eq!(deliver(&mut s, &mut c), Ok(None)); // Welcome -> AuthProof
    assert_eq!(s.peer(), None, "the peer's claims are not trusted before its proof");
    assert_eq!(deliver(&mut c, &mut s), Err(WireError::AuthFailed));
    assert!(s.is_closed());
    assert_eq!(s.peer(), None);
    // The server sends exactly one Error frame, with a fixed message.
    let out = s.take_transmit().unwrap();
    assert_eq!(
        decode_one(&out),
        Ok(Frame::Error(ErrorFrame { code: ErrorCode::AuthFailed, message: "authentication failed".into() }))
    );
    c.receive(&out);
    assert_eq!(
        c.poll_event(),
        Err(WireError::Remote { code: ErrorCode::AuthFailed, message: "authentication failed".into() })
    );
    assert!(c.is_closed());
    assert_eq!(c.take_transmit(), None, "no answer to a remote error");
    assert_eq!(c.poll_event(), Ok(None));
}

/// A server holding several keys (an access file of tokens): `MixAuth` keyed by key index.
struct Keys(Vec<[u8; 32]>);

impl Authenticator for Keys {
    fn key_count(&self) -> usize {
        self.0.len()
    }
    fn proof(&self, key: usize, role: Role, b: &[u8; 32], c: &[u8; 32], s: &[u8; 32]) -> [u8; 32] {
        MixAuth(self.0[key]).proof(0, role, b, c, s)
    }
}

#[test]
fn a_server_with_several_keys_finds_the_clients_key_and_proves_that_one() {
    let keys = vec![[0x01; 32], [0x02; 32], TOKEN, [0x04; 32]];
    let mut c = Session::client(local("source", 0x11), Arc::new(MixAuth(TOKEN)), [0; 32]);
    let mut s = Session::server(local("target", 0x22), Arc::new(Keys(keys.clone())), [0; 32]);
    assert_eq!(deliver(&mut c, &mut s), Ok(None));
    assert_eq!(deliver(&mut s, &mut c), Ok(None));
    match deliver(&mut c, &mut s) {
        Ok(Some(Event::Authenticated(p))) => assert_eq!(p.key, 2, "the index of the client's key"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.peer().unwrap().key, 2);
    // The client checks the server's proof: made with the key it holds.
    assert!(matches!(deliver(&mut s, &mut c), Ok(Some(Event::Authenticated(_)))));
    assert_eq!(c.peer().unwrap().key, 0);

    // A key the server does not hold: refused, whatever the others are.
    let mut c = Session::client(local("source", 0x11), Arc::new(MixAuth([0x09; 32])), [0; 32]);
    let mut s = Session::server(local("target", 0x22), Arc::new(Keys(keys)), [0; 32]);
    deliver(&mut c, &mut s).unwrap();
    deliver(&mut s, &mut c).unwrap();
    assert_eq!(deliver(&mut c, &mut s), Err(WireError::AuthFailed));
    // A server with no key at all authenticates no one.
    let mut c = Session::client(local("source", 0x11), Arc::new(MixAuth(TOKEN)), [0; 32]);
    let mut s = Session::server(local("target", 0x22), Arc::new(Keys(vec![])), [0; 32]);
    deliver(&mut c, &mut s).unwrap();
    deliver(&mut s, &mut c).unwrap();
    assert_eq!(deliver(&mut c, &mut s), Err(WireError::AuthFailed));
}

#[test]
fn a_notice_goes_from_the_server_only() {
    let (mut c, mut s) = drive(2);
    let notice = Frame::Notice(Notice { level: NoticeLevel::Warning, message: "kept 3 points".into() });
    s.send(&notice).unwrap();
    assert_eq!(pump(&mut s, &mut c), vec![Event::Frame(notice.clone())]);
    assert!(matches!(c.send(&notice), Err(WireError::IllegalFrame { frame: "Notice", .. })));
}

#[test]
fn a_proof_made_for_another_channel_fails_at_the_server() {
    // A relay between two TLS sessions: the client's proof covers its channel's binding,
    // the server checks it against its own.
    let mut c = Session::client(local("source", 0x11), Arc::new(MixAuth(TOKEN)), [1; 32]);
    let mut s = Session::server(local("target", 0x22), Arc::new(MixAuth(TOKEN)), [2; 32]);
    assert_eq!(deliver(&mut c, &mut s), Ok(None));
    assert_eq!(deliver(&mut s, &mut c), Ok(None));
    assert_eq!(deliver(&mut c, &mut s), Err(WireError::AuthFailed));
    // The same binding on both ends authenticates.
    let mut c = Session::client(local("source", 0x11), Arc::new(MixAuth(TOKEN)), [2; 32]);
    let mut s = Session::server(local("target", 0x22), Arc::new(MixAuth(TOKEN)), [2; 32]);
    assert_eq!(deliver(&mut c, &mut s), Ok(None));
    assert_eq!(deliver(&mut s, &mut c), Ok(None));
    assert!(matches!(deliver(&mut c, &mut s), Ok(Some(Event::Authenticated(_)))));
}

#[test]
fn server_that_cannot_prove_the_token_is_refused_by_the_client() {
    let mut c = Session::client(local("source", 0x11), Arc::new(MixAuth(TOKEN)), [0; 32]);
    // A server that accepts any proof but does not hold the token: forge its frames by hand.
    let mut s = Session::server(local("target", 0x22), Arc::new(MixAuth(TOKEN)), [0; 32]);
    deliver(&mut c, &mut s).unwrap();
    deliver(&mut s, &mut c).unwrap();
    let _ = c.take_transmit();
    c.receive(&Frame::AuthOk(AuthOk { proof: [0; 32] }).to_bytes());
    assert_eq!(c.poll_event(), Err(WireError::ServerAuthFailed));
    assert_eq!(decode_one(&c.take_transmit().unwrap()).unwrap().name(), "Error");
}

fn hello(min: u16, max: u16) -> Frame {
    Frame::Hello(Hello {
        version_min: min,
        version_max: max,
        features: FEATURES_V1,
        nonce: [1; 32],
        peer_name: "future".into(),
        software: "ferry 9".into(),
    })
}

#[test]
fn no_common_version_is_unsupported_version_on_both_ends() {
    let (mut c, mut s) = pair();
    let _ = c.take_transmit(); // the real Hello is replaced by a v2..=3 one
    s.receive(&hello(2, 3).to_bytes());
    let err = s.poll_event().unwrap_err();
    assert_eq!(err, WireError::UnsupportedVersion { peer_min: 2, peer_max: 3, ours_min: 1, ours_max: 1 });
    let out = s.take_transmit().unwrap();
    c.receive(&out);
    match c.poll_event() {
        Err(WireError::Remote { code: ErrorCode::UnsupportedVersion, message }) => {
            assert!(message.contains("peer speaks 2..=3, we speak 1..=1"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn version_ranges_are_negotiated() {
    // A future client speaking 1..=5 gets version 1.
    let (_, mut s) = pair();
    s.receive(&hello(1, 5).to_bytes());
    assert_eq!(s.poll_event(), Ok(None));
    let Ok(Frame::Welcome(w)) = decode_one(&s.take_transmit().unwrap()) else { panic!() };
    assert_eq!(w.version, 1);
    // An inverted or zero range is refused.
    for (min, max) in [(0, 0), (3, 1)] {
        let (_, mut s) = pair();
        s.receive(&hello(min, max).to_bytes());
        assert!(matches!(s.poll_event(), Err(WireError::UnsupportedVersion { .. })));
    }
    // A Welcome with a version the client did not offer.
    let (mut c, _) = pair();
    let w = Welcome { version: 2, features: 0, nonce: [0; 32], peer_name: String::new(), software: String::new() };
    c.receive(&Frame::Welcome(w).to_bytes());
    assert!(matches!(c.poll_event(), Err(WireError::UnsupportedVersion { .. })));
}

#[test]
fn unknown_feature_bits_are_dropped() {
    let (_, mut s) = pair();
    let Frame::Hello(mut h) = hello(1, 1) else { unreachable!() };
    h.features = FEATURES_V1 | (1 << 40);
    s.receive(&Frame::Hello(h).to_bytes());
    s.poll_event().unwrap();
    let Ok(Frame::Welcome(w)) = decode_one(&s.take_transmit().unwrap()) else { panic!() };
    assert_eq!(w.features, FEATURES_V1);
}

#[test]
fn truncated_frame() {
    let bytes = Frame::Commit(Commit { disk_count: 1 }).to_bytes();
    for cut in 0..bytes.len() {
        let mut d = Deframer::new();
        d.push(&bytes[..cut]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(matches!(decode_one(&bytes[..cut]), Err(WireError::Truncated { .. })));
    }
    // A body shorter than its fields, with a consistent header.
    let mut b = BytesMut::new();
    b.put_slice(&encode_header(frame_type::COMMIT, 0, 3));
    b.put_slice(&[1, 0, 0]);
    assert_eq!(decode_one(&b), Err(WireError::Truncated { frame: "Commit", field: "disk_count" }));
}

#[test]
fn oversized_frame_refused_from_the_header_alone() {
    let h = encode_header(frame_type::DATA, 0, MAX_BODY_LEN + 1);
    let mut d = Deframer::new();
    d.push(&h);
    assert_eq!(
        d.next_frame(),
        Err(WireError::FrameTooLarge { frame_type: frame_type::DATA, len: MAX_BODY_LEN + 1, max: MAX_BODY_LEN })
    );
    assert!(d.buffer_mut().capacity() < MAX_BODY_LEN as usize, "nothing allocated for the body");
    // The largest allowed length is accepted and waits for its body.
    let mut d = Deframer::new();
    d.push(&encode_header(frame_type::DATA, 0, MAX_BODY_LEN));
    assert_eq!(d.next_frame(), Ok(None));
    assert_eq!(d.wanted(), MAX_BODY_LEN as usize);
}

#[test]
fn corrupted_header_and_bad_magic() {
    let good = Frame::Close.to_bytes();
    for i in 2..HEADER_LEN {
        let mut b = good.to_vec();
        b[i] ^= 0x01;
        assert!(matches!(decode_one(&b), Err(WireError::HeaderCheck { .. })), "byte {i}");
    }
    let mut b = good.to_vec();
    b[0] = b'G';
    assert_eq!(decode_one(&b), Err(WireError::BadMagic { found: [b'G', 0x52], expected: MAGIC }));
    // An HTTP request hitting a ferry port.
    assert!(matches!(decode_one(b"GET / HTTP/1.1\r\n"), Err(WireError::BadMagic { .. })));
}

fn raw_frame(ty: u8, flags: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_slice(&encode_header(ty, flags, body.len() as u32));
    b.put_slice(body);
    b.freeze()
}

#[test]
fn trailing_bytes_inside_a_body() {
    let b = raw_frame(frame_type::COMMIT, 0, &[1, 0, 0, 0, 0xFF]);
    assert_eq!(decode_one(&b), Err(WireError::TrailingBytes { frame: "Commit", extra: 1 }));
    let b = raw_frame(frame_type::CLOSE, 0, &[0]);
    assert_eq!(decode_one(&b), Err(WireError::TrailingBytes { frame: "Close", extra: 1 }));
    // Bytes after a whole frame given to decode_one.
    let mut two = Frame::Close.to_bytes().to_vec();
    two.push(0);
    assert!(matches!(decode_one(&two), Err(WireError::TrailingBytes { .. })));
}

#[test]
fn field_errors() {
    // Reserved flags.
    let b = raw_frame(frame_type::CLOSE, 0x80, &[]);
    assert_eq!(decode_one(&b), Err(WireError::ReservedFlags { frame: "Close", flags: 0x80 }));
    // A string longer than its limit.
    let mut body = vec![0u8; 0];
    body.extend_from_slice(&256u16.to_le_bytes());
    body.extend_from_slice(&[b'a'; 256]);
    let b = raw_frame(frame_type::OPEN_REPLICA, 0, &body);
    assert!(matches!(decode_one(&b), Err(WireError::FieldTooLong { field: "replica", len: 256, .. })));
    // Not UTF-8.
    let mut body = 1u16.to_le_bytes().to_vec();
    body.push(0xFF);
    body.extend_from_slice(&[0; 8 + 16 + 4]);
    let b = raw_frame(frame_type::OPEN_REPLICA, 0, &body);
    assert_eq!(decode_one(&b), Err(WireError::InvalidUtf8 { frame: "OpenReplica", field: "replica" }));
    // A chunk size that is not a power of two.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&100_000u32.to_le_bytes());
    body.push(0);
    let b = raw_frame(frame_type::OPEN_DISK, 0, &body);
    assert!(matches!(decode_one(&b), Err(WireError::InvalidValue { field: "chunk_size", value: 100_000, .. })));
    // Too many digests in a part: refused before reading them.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&(MAX_DIGESTS_PER_PART as u32 + 1).to_le_bytes());
    let b = raw_frame(frame_type::DIGEST_MAP_PART, 0, &body);
    assert!(matches!(decode_one(&b), Err(WireError::FieldTooLong { field: "count", .. })));
    // A zero-length zero run; a bool that is neither 0 nor 1.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&[0; 16]);
    assert!(matches!(
        decode_one(&raw_frame(frame_type::ZERO_RUN, 0, &body)),
        Err(WireError::InvalidValue { field: "count", .. })
    ));
    let mut body = [0u8; 16].to_vec();
    body.push(2);
    body.extend_from_slice(&[0; 20]);
    assert!(matches!(
        decode_one(&raw_frame(frame_type::REPLICA_OPENED, 0, &body)),
        Err(WireError::InvalidValue { field: "resumed", value: 2, .. })
    ));
    // Raw data whose payload does not match its logical length.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&4u32.to_le_bytes());
    body.push(Codec::None as u8);
    body.extend_from_slice(&[0; 32]);
    body.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(
        decode_one(&raw_frame(frame_type::DATA, 0, &body)),
        Err(WireError::InvalidValue { field: "payload length", value: 3, .. })
    ));
    // A zstd payload larger than a chunk.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&MIN_CHUNK_SIZE.to_le_bytes());
    body.push(Codec::Zstd as u8);
    body.extend_from_slice(&[0; 32]);
    body.resize(body.len() + MAX_CHUNK_SIZE as usize + 1, 0);
    assert!(matches!(
        decode_one(&raw_frame(frame_type::DATA, 0, &body)),
        Err(WireError::FieldTooLong { field: "payload", .. })
    ));
}

#[test]
fn unknown_frames_optional_skipped_mandatory_refused() {
    let (mut c, mut s) = drive(2);
    // Optional: skipped, the next frame comes through.
    s.receive(&raw_frame(0x66, FLAG_OPTIONAL, b"from the future"));
    assert_eq!(s.poll_event(), Ok(None));
    assert_eq!(decode_one(&raw_frame(0x66, FLAG_OPTIONAL, b"x")), Ok(Frame::Unknown { frame_type: 0x66 }));
    c.send(&Frame::Keepalive).unwrap();
    assert_eq!(pump(&mut c, &mut s), vec![Event::Frame(Frame::Keepalive)]);
    // Mandatory: an error, the session closes with an Error frame for the peer.
    s.receive(&raw_frame(0x66, 0, b""));
    assert_eq!(s.poll_event(), Err(WireError::UnknownFrameType(0x66)));
    assert!(s.is_closed());
    c.receive(&s.take_transmit().unwrap());
    assert!(matches!(c.poll_event(), Err(WireError::Remote { code: ErrorCode::Protocol, .. })));
}

fn data(chunk: u64, len: u32) -> Frame {
    Frame::Data(Data {
        disk: 0,
        chunk,
        logical_len: len,
        codec: Codec::None,
        digest: [0; 32],
        payload: Bytes::from(vec![0; len as usize]),
    })
}

#[test]
fn illegal_transitions_are_typed() {
    // Data before OpenDisk: unknown disk.
    let (mut c, _) = drive(3);
    assert!(matches!(
        c.send(&data(0, 1000)),
        Err(WireError::IllegalFrame { frame: "Data", state: "OpeningReplica", .. })
    ));
    let (mut c, mut s) = drive(2);
    c.send(&Frame::OpenReplica(OpenReplica {
        replica: "r".into(),
        point_time_ns: 0,
        session_id: [0; 16],
        retain: 0,
        flags: 0,
    }))
    .unwrap();
    pump(&mut c, &mut s);
    s.send(&Frame::ReplicaOpened(ReplicaOpened {
        session_id: [0; 16],
        resumed: false,
        latest_point: 0,
        latest_point_time_ns: 0,
        chunk_size: 0,
        pending_point_time_ns: 0,
    }))
    .unwrap();
    pump(&mut s, &mut c);
    assert_eq!(c.send(&data(0, 65536)), Err(WireError::Disk { what: "frame for unknown", disk: 0 }));

    // Data before ResumeInfo.
    let (mut c, _) = drive(4);
    let od = OpenDisk { disk: 1, name: "d1".into(), size: 1 << 20, chunk_size: 1 << 16, mode: Mode::Full };
    c.send(&Frame::OpenDisk(od.clone())).unwrap();
    assert_eq!(c.send(&Frame::OpenDisk(od)), Err(WireError::Disk { what: "OpenDisk for already open", disk: 1 }));
    let d1 = Frame::Data(Data {
        disk: 1,
        chunk: 0,
        logical_len: 1 << 16,
        codec: Codec::Zstd,
        digest: [0; 32],
        payload: Bytes::from_static(b"z"),
    });
    assert_eq!(c.send(&d1), Err(WireError::Disk { what: "frame before ResumeInfo for", disk: 1 }));

    // Data out of order, wrong length, beyond the end; received side too.
    let (mut c, mut s) = drive(4);
    c.send(&data(1, 65536)).unwrap();
    assert!(matches!(
        c.send(&data(1, 65536)),
        Err(WireError::Chunk { chunk: 1, what: "out of order or already sent", .. })
    ));
    assert!(matches!(c.send(&data(0, 65536)), Err(WireError::Chunk { chunk: 0, .. })));
    assert!(matches!(
        c.send(&data(2, 1000)),
        Err(WireError::Chunk { what: "logical length does not match the disk", .. })
    ));
    assert!(matches!(c.send(&data(5, 1000)), Err(WireError::Chunk { what: "beyond the end of the disk", .. })));
    pump(&mut c, &mut s);
    s.receive(&data(0, 65536).to_bytes());
    assert!(matches!(s.poll_event(), Err(WireError::Chunk { chunk: 0, .. })));
    assert!(s.is_closed());

    // Commit before the disk is flushed to its end, with a wrong disk count, with a map reply in flight.
    let (mut c, _) = drive(4);
    assert!(matches!(c.send(&Frame::Commit(Commit { disk_count: 1 })), Err(WireError::Disk { disk: 0, .. })));
    assert!(matches!(c.send(&Frame::Commit(Commit { disk_count: 2 })), Err(WireError::Disk { .. })));
    c.send(&Frame::Flush(Flush { disk: 0, next_chunk: 5 })).unwrap();
    c.send(&Frame::DigestMapRequest(DigestMapRequest { disk: 0, cached_map_hash: [0; 32] })).unwrap();
    assert!(matches!(
        c.send(&Frame::Commit(Commit { disk_count: 1 })),
        Err(WireError::Disk { what: "Commit while a digest map reply is in flight for", .. })
    ));

    // Flush behind data sent; Checkpoint ahead of the flush; handshake frames after the handshake.
    let (mut c, mut s) = drive(4);
    c.send(&data(2, 65536)).unwrap();
    assert!(matches!(c.send(&Frame::Flush(Flush { disk: 0, next_chunk: 2 })), Err(WireError::Chunk { .. })));
    assert!(matches!(c.send(&Frame::Flush(Flush { disk: 0, next_chunk: 6 })), Err(WireError::Chunk { .. })));
    c.send(&Frame::Flush(Flush { disk: 0, next_chunk: 3 })).unwrap();
    pump(&mut c, &mut s);
    assert!(matches!(
        s.send(&Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: 4 })),
        Err(WireError::Chunk { what: "checkpoint ahead of the last flush", .. })
    ));
    s.send(&Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: 3 })).unwrap();
    assert!(matches!(
        s.send(&Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: 2 })),
        Err(WireError::Chunk { what: "checkpoint behind an earlier checkpoint", .. })
    ));
    assert!(matches!(s.send(&hello(1, 1)), Err(WireError::IllegalFrame { frame: "Hello", direction: "sent", .. })));
    // A client must not send target frames.
    assert!(matches!(
        c.send(&Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: 3 })),
        Err(WireError::IllegalFrame { .. })
    ));

    // Digest map: parts out of order, end early, part without request.
    let (mut c, mut s) = drive(5);
    let part =
        |first| Frame::DigestMapPart(DigestMapPart { disk: 0, first_chunk: first, digests: Bytes::from(vec![0; 64]) });
    s.send(&part(0)).unwrap();
    assert!(matches!(s.send(&part(1)), Err(WireError::Chunk { what: "digest map part out of order", .. })));
    // The disk has 5 chunks: 2 sent, 4 more would pass its end.
    let long = Frame::DigestMapPart(DigestMapPart { disk: 0, first_chunk: 2, digests: Bytes::from(vec![0; 128]) });
    assert!(matches!(
        s.send(&long),
        Err(WireError::Chunk { chunk: 2, what: "digest map part beyond the end of the disk", .. })
    ));
    let end = |n, hit| Frame::DigestMapEnd(DigestMapEnd { disk: 0, chunk_count: n, map_hash: [0; 32], cache_hit: hit });
    assert!(matches!(s.send(&end(5, false)), Err(WireError::Chunk { what: "digest map ended early or late", .. })));
    assert!(matches!(s.send(&end(2, true)), Err(WireError::Chunk { what: "digest map cache hit after parts", .. })));
    s.send(&end(2, false)).unwrap();
    assert!(matches!(s.send(&part(2)), Err(WireError::Disk { what: "DigestMapPart without a request for", .. })));
    assert_eq!(pump(&mut s, &mut c).len(), 2);

    // Sending after close.
    let (mut c, _) = drive(2);
    c.send(&Frame::Close).unwrap();
    assert_eq!(c.send(&Frame::Keepalive), Err(WireError::Closed));
}

#[test]
fn sender_refuses_what_the_peer_must_refuse() {
    let (_, mut s) = drive(3);
    let ro = ReplicaOpened {
        session_id: [0; 16],
        resumed: false,
        latest_point: 0,
        latest_point_time_ns: 0,
        chunk_size: 3,
        pending_point_time_ns: 0,
    };
    assert!(matches!(s.send(&Frame::ReplicaOpened(ro)), Err(WireError::InvalidValue { field: "chunk_size", .. })));
    let (_, mut s) = drive(4);
    let (mut c2, _) = drive(4);
    c2.send(&Frame::OpenDisk(OpenDisk { disk: 1, name: "x".into(), size: 1, chunk_size: 1 << 16, mode: Mode::Cbt }))
        .unwrap();
    let ri = ResumeInfo { disk: 0, previous_size: 0, next_chunk: 0, flags: 0x80 };
    assert!(matches!(s.send(&Frame::ResumeInfo(ri)), Err(WireError::InvalidValue { field: "flags", .. })));
    assert!(matches!(
        s.send(&Frame::Unknown { frame_type: frame_type::DATA }),
        Err(WireError::InvalidValue { field: "frame_type", .. })
    ));
    let long = "x".repeat(MAX_NAME_LEN + 1);
    let (mut c, _) = drive(2);
    let or = OpenReplica { replica: long, point_time_ns: 0, session_id: [0; 16], retain: 0, flags: 0 };
    assert!(matches!(c.send(&Frame::OpenReplica(or)), Err(WireError::FieldTooLong { .. })));
}

#[test]
fn error_codes_round_trip() {
    for v in 0..=20u16 {
        assert_eq!(ErrorCode::from_u16(v).to_u16(), v);
    }
    assert_eq!(ErrorCode::from_u16(999), ErrorCode::Unknown(999));
    assert_eq!(WireError::AuthFailed.code(), ErrorCode::AuthFailed);
    assert_eq!(WireError::Closed.code(), ErrorCode::Protocol);
}

#[test]
fn features_must_be_negotiated_before_use() {
    // A client that offers no features: neither zstd data nor digest maps may flow.
    let mut c = Session::client(
        LocalInfo { features: 0, ..local("source", 0x11) },
        std::sync::Arc::new(MixAuth(TOKEN)),
        [0; 32],
    );
    let mut s = Session::server(local("target", 0x22), std::sync::Arc::new(MixAuth(TOKEN)), [0; 32]);
    for _ in 0..2 {
        pump(&mut c, &mut s);
        pump(&mut s, &mut c);
    }
    assert_eq!(c.peer().unwrap().features, 0);
    assert_eq!(s.peer().unwrap().features, 0);
    c.send(&Frame::OpenReplica(OpenReplica {
        replica: "r".into(),
        point_time_ns: 0,
        session_id: [0; 16],
        retain: 0,
        flags: 0,
    }))
    .unwrap();
    pump(&mut c, &mut s);
    s.send(&Frame::ReplicaOpened(ReplicaOpened {
        session_id: [0; 16],
        resumed: false,
        latest_point: 0,
        latest_point_time_ns: 0,
        chunk_size: 0,
        pending_point_time_ns: 0,
    }))
    .unwrap();
    pump(&mut s, &mut c);
    c.send(&Frame::OpenDisk(OpenDisk {
        disk: 0,
        name: "d".into(),
        size: 1 << 16,
        chunk_size: 1 << 16,
        mode: Mode::Full,
    }))
    .unwrap();
    pump(&mut c, &mut s);
    s.send(&Frame::ResumeInfo(ResumeInfo { disk: 0, previous_size: 0, next_chunk: 0, flags: 0 })).unwrap();
    pump(&mut s, &mut c);
    let req = Frame::DigestMapRequest(DigestMapRequest { disk: 0, cached_map_hash: [0; 32] });
    assert!(matches!(c.send(&req), Err(WireError::InvalidValue { value: FEATURE_DIGEST_MAP, .. })));
    let z = Frame::Data(Data {
        disk: 0,
        chunk: 0,
        logical_len: 1 << 16,
        codec: Codec::Zstd,
        digest: [0; 32],
        payload: Bytes::from_static(b"z"),
    });
    assert!(matches!(c.send(&z), Err(WireError::InvalidValue { value: FEATURE_ZSTD, .. })));
    let zs = Frame::Data(Data {
        disk: 0,
        chunk: 0,
        logical_len: 1 << 16,
        codec: Codec::ZstdStream,
        digest: [0; 32],
        payload: Bytes::from_static(b"stream header and zstd"),
    });
    assert!(matches!(c.send(&zs), Err(WireError::InvalidValue { value: FEATURE_ZSTD_STREAM, .. })));
    // And the server refuses them when received.
    s.receive(&z.to_bytes());
    assert!(matches!(s.poll_event(), Err(WireError::InvalidValue { value: FEATURE_ZSTD, .. })));
}

#[test]
fn zstd_stream_payload_must_hold_more_than_its_header() {
    for len in [1usize, STREAM_HEADER_LEN] {
        let mut body = 0u32.to_le_bytes().to_vec();
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&MIN_CHUNK_SIZE.to_le_bytes());
        body.push(Codec::ZstdStream as u8);
        body.extend_from_slice(&[0; 32]);
        body.resize(body.len() + len, 0);
        assert!(
            matches!(
                decode_one(&raw_frame(frame_type::DATA, 0, &body)),
                Err(WireError::InvalidValue { field: "payload length", value, .. }) if value == len as u64
            ),
            "payload of {len} bytes"
        );
    }
    let h = StreamHeader { stream: 7, seq: 0x0102_0304_0506_0708 };
    let mut payload = h.encode().to_vec();
    assert_eq!(StreamHeader::split(&payload), None);
    payload.push(0xAA);
    assert_eq!(StreamHeader::split(&payload), Some((h, &[0xAA][..])));
}

/// Regression: a refused DigestMapEnd used to clear the request in flight, so
/// the correct End that followed was refused as "without a request".
#[test]
fn regression_refused_digest_map_end_keeps_the_request() {
    let (mut c, mut s) = drive(5);
    let end = |n| Frame::DigestMapEnd(DigestMapEnd { disk: 0, chunk_count: n, map_hash: [0; 32], cache_hit: false });
    assert!(matches!(s.send(&end(1)), Err(WireError::Chunk { .. })));
    s.send(&end(0)).unwrap();
    assert_eq!(pump(&mut s, &mut c), vec![Event::Frame(end(0))]);
}

#[test]
fn unauthenticated_peer_can_not_announce_large_frames() {
    // Before authentication: 8 KiB, refused from the header alone.
    let (_, mut s) = pair();
    s.receive(&encode_header(frame_type::HELLO, 0, MAX_HANDSHAKE_BODY_LEN + 1));
    assert_eq!(
        s.poll_event(),
        Err(WireError::FrameTooLarge {
            frame_type: frame_type::HELLO,
            len: MAX_HANDSHAKE_BODY_LEN + 1,
            max: MAX_HANDSHAKE_BODY_LEN
        })
    );
    assert!(s.buffer_mut().capacity() < 64 * 1024, "nothing reserved for the body");
    let (mut c, _) = pair();
    let _ = c.take_transmit();
    c.receive(&encode_header(frame_type::WELCOME, 0, 1 << 20));
    assert!(matches!(c.poll_event(), Err(WireError::FrameTooLarge { max: MAX_HANDSHAKE_BODY_LEN, .. })));
    // After: full-size data frames flow (the pair tests move 64 KiB chunks); the limit is MAX_BODY_LEN.
    let (_, mut s) = drive(4);
    s.receive(&encode_header(frame_type::DATA, 0, MAX_BODY_LEN));
    assert_eq!(s.poll_event(), Ok(None));
    let mut d = Deframer::new();
    assert_eq!(d.max_body_len(), MAX_BODY_LEN);
    d.set_max_body_len(u32::MAX);
    assert_eq!(d.max_body_len(), MAX_BODY_LEN);
}

#[test]
fn plan_only_session_refuses_data_flush_intent_and_commit_on_both_ends() {
    let (mut c, mut s) = drive(2);
    c.send(&Frame::OpenReplica(OpenReplica {
        replica: "r".into(),
        point_time_ns: 0,
        session_id: [0; 16],
        retain: 0,
        flags: OpenReplica::PLAN_ONLY,
    }))
    .unwrap();
    pump(&mut c, &mut s);
    s.send(&Frame::ReplicaOpened(ReplicaOpened {
        session_id: [0; 16],
        resumed: false,
        latest_point: 0,
        latest_point_time_ns: 0,
        chunk_size: 0,
        pending_point_time_ns: 0,
    }))
    .unwrap();
    pump(&mut s, &mut c);
    let od = OpenDisk { disk: 0, name: "d0".into(), size: 1 << 20, chunk_size: 1 << 16, mode: Mode::Digest };
    c.send(&Frame::OpenDisk(od)).unwrap();
    pump(&mut c, &mut s);
    s.send(&Frame::ResumeInfo(ResumeInfo { disk: 0, previous_size: 1 << 20, next_chunk: 0, flags: 1 })).unwrap();
    pump(&mut s, &mut c);
    // Digest maps are fine in a plan; data, flushes, intents and commits are not.
    c.send(&Frame::DigestMapRequest(DigestMapRequest { disk: 0, cached_map_hash: [0; 32] })).unwrap();
    let plan_only = |frame| WireError::IllegalFrame { frame, direction: "sent", state: "ReplicaOpen (plan only)" };
    assert_eq!(c.send(&data(0, 65536)), Err(plan_only("Data")));
    assert_eq!(c.send(&Frame::ZeroRun(ZeroRun { disk: 0, first_chunk: 0, count: 1 })), Err(plan_only("ZeroRun")));
    assert_eq!(c.send(&Frame::Flush(Flush { disk: 0, next_chunk: 16 })), Err(plan_only("Flush")));
    assert_eq!(c.send(&Frame::Commit(Commit { disk_count: 1 })), Err(plan_only("Commit")));
    let intent = Frame::Intent(Intent { disk: 0, runs: vec![ChunkRun { first_chunk: 0, count: 1 }] });
    assert_eq!(c.send(&intent), Err(plan_only("Intent")));
    // The server refuses an intent (or a data frame: the same rule) it receives in a plan-only session.
    s.receive(&intent.to_bytes());
    assert!(matches!(
        s.poll_event(),
        Err(WireError::IllegalFrame { frame: "Intent", direction: "received", state: "ReplicaOpen (plan only)" })
    ));
    // Unknown flag bits are refused by the decoder.
    let mut body = Frame::OpenReplica(OpenReplica {
        replica: "r".into(),
        point_time_ns: 0,
        session_id: [0; 16],
        retain: 0,
        flags: 0,
    })
    .to_bytes()
    .to_vec();
    *body.last_mut().unwrap() = 0x80;
    let fixed = raw_frame(frame_type::OPEN_REPLICA, 0, &body[HEADER_LEN..]);
    assert!(matches!(decode_one(&fixed), Err(WireError::InvalidValue { field: "flags", value: 0x80, .. })));
}
