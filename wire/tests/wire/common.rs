//! Frame strategies and known frames shared by the tests.

use bytes::Bytes;
use ferry_wire::*;
use proptest::prelude::*;

fn name(max_chars: usize) -> impl Strategy<Value = String> {
    // Multi-byte characters included; at most 4 bytes each, so under the byte limits.
    proptest::string::string_regex(&format!("[a-zA-Z0-9 ._\\-éß€😀]{{0,{max_chars}}}")).unwrap()
}

fn arr32() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn chunk_size() -> impl Strategy<Value = u32> {
    (16u32..=22).prop_map(|s| 1 << s)
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Full), Just(Mode::Cbt), Just(Mode::Digest), Just(Mode::Seed)]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode::from_u16)
}

fn data() -> impl Strategy<Value = Data> {
    let raw = proptest::collection::vec(any::<u8>(), 1..3000).prop_map(|p| (Codec::None, p.len() as u32, p));
    let zstd =
        (proptest::collection::vec(any::<u8>(), 1..3000), 1u32..=MAX_CHUNK_SIZE).prop_map(|(p, l)| (Codec::Zstd, l, p));
    let stream = (proptest::collection::vec(any::<u8>(), 13..3000), 1u32..=MAX_CHUNK_SIZE)
        .prop_map(|(p, l)| (Codec::ZstdStream, l, p));
    (any::<u32>(), any::<u64>(), arr32(), prop_oneof![raw, zstd, stream]).prop_map(
        |(disk, chunk, digest, (codec, l, p))| Data {
            disk,
            chunk,
            logical_len: l,
            codec,
            digest,
            payload: Bytes::from(p),
        },
    )
}

/// A valid Intent: 1.. runs, each non-empty, strictly increasing and apart
/// by any gap (adjacent runs included), anywhere in the u64 chunk range.
fn intent() -> impl Strategy<Value = Intent> {
    (any::<u32>(), 0..u64::MAX / 2, proptest::collection::vec((0u64..=u64::from(u32::MAX), 1..=u32::MAX), 1..40))
        .prop_map(|(disk, start, gaps)| {
            let mut next = start;
            let runs = gaps
                .into_iter()
                .map(|(gap, count)| {
                    let run = ChunkRun { first_chunk: next + gap, count };
                    next = run.first_chunk + u64::from(count);
                    run
                })
                .collect();
            Intent { disk, runs }
        })
}

/// Unknown type bytes (none of v1's).
pub fn unknown_type() -> impl Strategy<Value = u8> {
    any::<u8>().prop_filter("a v1 frame type", |t| type_name(*t) == "Unknown")
}

/// Any valid v1 frame (within every limit), including skipped unknown ones.
pub fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u64>(), arr32(), name(60), name(16)).prop_map(|(a, b, f, n, p, s)| {
            Frame::Hello(Hello { version_min: a, version_max: b, features: f, nonce: n, peer_name: p, software: s })
        }),
        (any::<u16>(), any::<u64>(), arr32(), name(60), name(16)).prop_map(|(v, f, n, p, s)| {
            Frame::Welcome(Welcome { version: v, features: f, nonce: n, peer_name: p, software: s })
        }),
        arr32().prop_map(|proof| Frame::AuthProof(AuthProof { proof })),
        arr32().prop_map(|proof| Frame::AuthOk(AuthOk { proof })),
        (name(60), any::<i64>(), any::<[u8; 16]>(), any::<u32>()).prop_map(|(r, t, id, k)| {
            Frame::OpenReplica(OpenReplica {
                replica: r,
                point_time_ns: t,
                session_id: id,
                retain: k,
                flags: (k & 1) as u8,
            })
        }),
        (
            any::<[u8; 16]>(),
            any::<bool>(),
            any::<u64>(),
            any::<i64>(),
            prop_oneof![Just(0), chunk_size()],
            any::<i64>()
        )
            .prop_map(|(id, r, p, t, c, pt)| Frame::ReplicaOpened(ReplicaOpened {
                session_id: id,
                resumed: r,
                latest_point: p,
                latest_point_time_ns: t,
                chunk_size: c,
                pending_point_time_ns: pt,
            })),
        (any::<u32>(), name(60), any::<u64>(), chunk_size(), mode()).prop_map(|(d, n, s, c, m)| Frame::OpenDisk(
            OpenDisk { disk: d, name: n, size: s, chunk_size: c, mode: m }
        )),
        (any::<u32>(), any::<u64>(), any::<u64>(), 0u8..4).prop_map(|(d, p, n, f)| Frame::ResumeInfo(ResumeInfo {
            disk: d,
            previous_size: p,
            next_chunk: n,
            flags: f
        })),
        (any::<u32>(), arr32())
            .prop_map(|(d, h)| Frame::DigestMapRequest(DigestMapRequest { disk: d, cached_map_hash: h })),
        (any::<u32>(), any::<u64>(), proptest::collection::vec(arr32(), 0..40)).prop_map(|(d, f, ds)| {
            Frame::DigestMapPart(DigestMapPart { disk: d, first_chunk: f, digests: Bytes::from(ds.concat()) })
        }),
        (any::<u32>(), any::<u64>(), arr32(), any::<bool>()).prop_map(|(d, n, h, c)| Frame::DigestMapEnd(
            DigestMapEnd { disk: d, chunk_count: n, map_hash: h, cache_hit: c }
        )),
        data().prop_map(Frame::Data),
        (any::<u32>(), any::<u64>(), 1u64..).prop_map(|(d, f, c)| Frame::ZeroRun(ZeroRun {
            disk: d,
            first_chunk: f,
            count: c
        })),
        (any::<u32>(), any::<u64>()).prop_map(|(d, n)| Frame::Flush(Flush { disk: d, next_chunk: n })),
        (any::<u32>(), any::<u64>()).prop_map(|(d, n)| Frame::Checkpoint(Checkpoint { disk: d, next_chunk: n })),
        intent().prop_map(Frame::Intent),
        any::<u32>().prop_map(|n| Frame::Commit(Commit { disk_count: n })),
        (any::<u64>(), any::<i64>()).prop_map(|(p, t)| Frame::Committed(Committed { point_id: p, point_time_ns: t })),
        (any::<u32>(), any::<u64>()).prop_map(|(d, b)| Frame::Progress(Progress { disk: d, bytes_done: b })),
        Just(Frame::Keepalive),
        (error_code(), name(200)).prop_map(|(c, m)| Frame::Error(ErrorFrame { code: c, message: m })),
        Just(Frame::Close),
        (any::<bool>(), name(200)).prop_map(|(w, m)| Frame::Notice(Notice {
            level: if w { NoticeLevel::Warning } else { NoticeLevel::Info },
            message: m
        })),
        unknown_type().prop_map(|t| Frame::Unknown { frame_type: t }),
        (1..=MAX_STREAMS).prop_map(|count| Frame::OpenStreams(OpenStreams { count })),
        (arr32(), 1..=MAX_STREAMS).prop_map(|(ticket, count)| Frame::StreamTicket(StreamTicket { ticket, count })),
        (arr32(), any::<u16>()).prop_map(|(ticket, stream)| Frame::Join(Join { ticket, stream })),
        any::<u16>().prop_map(|stream| Frame::Joined(Joined { stream })),
        any::<u64>().prop_map(|seq| Frame::Seq(Seq { seq })),
    ]
}

/// One known value of every frame type: the golden vectors. The frames of
/// the first v1 release in type order, then frames added since, appended (the
/// golden file only ever grows at its end).
pub fn known_frames() -> Vec<(&'static str, Frame)> {
    let seq = |start: u8| -> [u8; 32] { std::array::from_fn(|i| start.wrapping_add(i as u8)) };
    vec![
        (
            "Hello",
            Frame::Hello(Hello {
                version_min: 1,
                version_max: 1,
                // The three bits of the first v1 release: the vector pins the encoding.
                features: FEATURE_ZSTD | FEATURE_DIGEST_MAP | FEATURE_RESUME,
                nonce: seq(0x00),
                peer_name: "src".into(),
                software: "ferry 0.1.0".into(),
            }),
        ),
        (
            "Welcome",
            Frame::Welcome(Welcome {
                version: 1,
                features: FEATURE_DIGEST_MAP | FEATURE_RESUME,
                nonce: seq(0x80),
                peer_name: "dr".into(),
                software: "ferry 0.1.0".into(),
            }),
        ),
        ("AuthProof", Frame::AuthProof(AuthProof { proof: [0xAA; 32] })),
        ("AuthOk", Frame::AuthOk(AuthOk { proof: [0xBB; 32] })),
        (
            "OpenReplica",
            Frame::OpenReplica(OpenReplica {
                replica: "vm-web1".into(),
                point_time_ns: 1_700_000_000_123_456_789,
                session_id: [0x5A; 16],
                retain: 7,
                flags: 0,
            }),
        ),
        (
            "ReplicaOpened",
            Frame::ReplicaOpened(ReplicaOpened {
                session_id: [0x5A; 16],
                resumed: true,
                latest_point: 42,
                latest_point_time_ns: 1_699_999_000_000_000_000,
                chunk_size: 1 << 20,
                pending_point_time_ns: 1_699_000_000_000_000_000,
            }),
        ),
        (
            "OpenDisk",
            Frame::OpenDisk(OpenDisk {
                disk: 1,
                name: "disk0.img".into(),
                size: 10 * (1 << 30) + 12345,
                chunk_size: 1 << 20,
                mode: Mode::Digest,
            }),
        ),
        (
            "ResumeInfo",
            Frame::ResumeInfo(ResumeInfo {
                disk: 1,
                previous_size: 10 * (1 << 30),
                next_chunk: 3,
                flags: ResumeInfo::EXISTED,
            }),
        ),
        ("DigestMapRequest", Frame::DigestMapRequest(DigestMapRequest { disk: 1, cached_map_hash: [0; 32] })),
        (
            "DigestMapPart",
            Frame::DigestMapPart(DigestMapPart {
                disk: 1,
                first_chunk: 0,
                digests: Bytes::from([seq(0x10), seq(0x30)].concat()),
            }),
        ),
        (
            "DigestMapEnd",
            Frame::DigestMapEnd(DigestMapEnd { disk: 1, chunk_count: 2, map_hash: seq(0xC0), cache_hit: false }),
        ),
        (
            "Data",
            Frame::Data(Data {
                disk: 1,
                chunk: 3,
                logical_len: 8,
                codec: Codec::None,
                digest: seq(0xE0),
                payload: Bytes::from_static(b"ferry v1"),
            }),
        ),
        (
            "DataZstd",
            Frame::Data(Data {
                disk: 1,
                chunk: 4,
                logical_len: 65536,
                codec: Codec::Zstd,
                digest: seq(0x01),
                payload: Bytes::from_static(&[0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x00]),
            }),
        ),
        (
            "DataZstdStream",
            Frame::Data(Data {
                disk: 1,
                chunk: 4,
                logical_len: 65536,
                codec: Codec::ZstdStream,
                digest: seq(0x01),
                // Stream 2, seq 7, then the zstd bytes of the chunk.
                payload: Bytes::from_static(&[2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0x28, 0xB5, 0x2F, 0xFD]),
            }),
        ),
        ("ZeroRun", Frame::ZeroRun(ZeroRun { disk: 1, first_chunk: 5, count: 1000 })),
        ("Flush", Frame::Flush(Flush { disk: 1, next_chunk: 1005 })),
        ("Checkpoint", Frame::Checkpoint(Checkpoint { disk: 1, next_chunk: 1005 })),
        ("Commit", Frame::Commit(Commit { disk_count: 1 })),
        ("Committed", Frame::Committed(Committed { point_id: 43, point_time_ns: 1_700_000_000_123_456_789 })),
        ("Progress", Frame::Progress(Progress { disk: 1, bytes_done: 1 << 30 })),
        ("Keepalive", Frame::Keepalive),
        ("Error", Frame::Error(ErrorFrame { code: ErrorCode::ReplicaBusy, message: "replica vm-web1 is busy".into() })),
        ("Close", Frame::Close),
        ("UnknownOptional", Frame::Unknown { frame_type: 0x60 }),
        (
            "Intent",
            Frame::Intent(Intent {
                disk: 1,
                runs: vec![ChunkRun { first_chunk: 3, count: 2 }, ChunkRun { first_chunk: 7, count: 1000 }],
            }),
        ),
        (
            "Notice",
            Frame::Notice(Notice {
                level: NoticeLevel::Warning,
                message: "kept 3 restore points: --keep-min 3".into(),
            }),
        ),
        // Striped sessions (FEATURE_STREAMS).
        ("OpenStreams", Frame::OpenStreams(OpenStreams { count: 4 })),
        ("StreamTicket", Frame::StreamTicket(StreamTicket { ticket: seq(0x40), count: 4 })),
        ("Join", Frame::Join(Join { ticket: seq(0x40), stream: 2 })),
        ("Joined", Frame::Joined(Joined { stream: 2 })),
        ("Seq", Frame::Seq(Seq { seq: 0x0102_0304_0506_0708 })),
    ]
}
