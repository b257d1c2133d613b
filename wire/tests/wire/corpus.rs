//! Replays the committed fuzz corpus through the fuzz targets' own checks, so
//! stable `cargo test` catches a regression of anything the fuzzers found.
//! `FERRY_WRITE_CORPUS=1` (re)writes the seed files made from known frames
//! and full session transcripts.

use std::path::PathBuf;

use ferry_wire::*;

use crate::checks;
use crate::common::known_frames;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn files(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// The bytes each side sends in a full session, with a given first byte for the session target.
fn transcripts() -> (Vec<u8>, Vec<u8>) {
    let (mut c, mut s) = checks::pair();
    let mut from_client = Vec::new();
    let mut from_server = Vec::new();
    let move_bytes = |a: &mut Session, b: &mut Session, log: &mut Vec<u8>| {
        while let Some(x) = a.take_transmit() {
            log.extend_from_slice(&x);
            b.receive(&x);
        }
        while b.poll_event().unwrap().is_some() {}
    };
    for _ in 0..2 {
        move_bytes(&mut c, &mut s, &mut from_client);
        move_bytes(&mut s, &mut c, &mut from_server);
    }
    let (d, sz) = (checks::CHUNK, checks::DISK_SIZE);
    let client_frames = [
        Frame::OpenReplica(OpenReplica {
            replica: "vm1".into(),
            point_time_ns: 1,
            session_id: [7; 16],
            retain: 0,
            flags: 0,
        }),
        Frame::OpenDisk(OpenDisk { disk: 0, name: "d".into(), size: sz, chunk_size: d, mode: Mode::Digest }),
        Frame::DigestMapRequest(DigestMapRequest { disk: 0, cached_map_hash: [0; 32] }),
        Frame::Intent(Intent {
            disk: 0,
            runs: vec![ChunkRun { first_chunk: 0, count: 1 }, ChunkRun { first_chunk: 4, count: 1 }],
        }),
        Frame::Data(Data {
            disk: 0,
            chunk: 0,
            logical_len: d,
            codec: Codec::Zstd,
            digest: [1; 32],
            payload: bytes::Bytes::from_static(&[0x28, 0xB5, 0x2F, 0xFD]),
        }),
        Frame::ZeroRun(ZeroRun { disk: 0, first_chunk: 1, count: 3 }),
        Frame::Data(Data {
            disk: 0,
            chunk: 4,
            logical_len: 1000,
            codec: Codec::None,
            digest: [2; 32],
            payload: bytes::Bytes::from(vec![0xAB; 1000]),
        }),
        Frame::Flush(Flush { disk: 0, next_chunk: 5 }),
        Frame::Commit(Commit { disk_count: 1 }),
        Frame::Close,
    ];
    let server_frames = [
        Frame::ReplicaOpened(ReplicaOpened {
            session_id: [7; 16],
            resumed: false,
            latest_point: 0,
            latest_point_time_ns: 0,
            chunk_size: 0,
            pending_point_time_ns: 0,
        }),
        Frame::ResumeInfo(ResumeInfo { disk: 0, previous_size: 0, next_chunk: 0, flags: 0 }),
        Frame::DigestMapPart(DigestMapPart { disk: 0, first_chunk: 0, digests: bytes::Bytes::from(vec![5; 64]) }),
        Frame::DigestMapEnd(DigestMapEnd { disk: 0, chunk_count: 2, map_hash: [6; 32], cache_hit: false }),
        Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: 5 }),
        Frame::Committed(Committed { point_id: 1, point_time_ns: 1 }),
    ];
    // Interleave as the real exchange would: each side's frames are checked by its own session.
    let order: &[(bool, usize)] = &[
        (true, 0),
        (false, 0),
        (true, 1),
        (false, 1),
        (true, 2),
        (false, 2),
        (false, 3),
        (true, 3),
        (true, 4),
        (true, 5),
        (true, 6),
        (true, 7),
        (false, 4),
        (true, 8),
        (false, 5),
        (true, 9),
    ];
    for &(client, i) in order {
        if client {
            c.send(&client_frames[i]).unwrap();
            move_bytes(&mut c, &mut s, &mut from_client);
        } else {
            s.send(&server_frames[i]).unwrap();
            move_bytes(&mut s, &mut c, &mut from_server);
        }
    }
    assert!(c.is_closed() && s.is_closed());
    (from_client, from_server)
}

/// A full session's transcripts pass both sessions without an error.
#[test]
fn transcripts_are_a_valid_session() {
    let (from_client, from_server) = transcripts();
    let (f, e) = checks::deframe(&from_client, &[]);
    assert!(e.is_none() && f.len() == 12, "{e:?} {}", f.len());
    let (f, e) = checks::deframe(&from_server, &[]);
    assert!(e.is_none() && f.len() == 8, "{e:?} {}", f.len());
}

#[test]
fn write_seed_corpus() {
    if std::env::var_os("FERRY_WRITE_CORPUS").is_none() {
        return;
    }
    let dir = corpus_dir("frame_decoder");
    std::fs::create_dir_all(&dir).unwrap();
    let mut all = Vec::new();
    for (name, f) in known_frames() {
        let b = f.to_bytes();
        all.extend_from_slice(&b);
        std::fs::write(dir.join(format!("golden-{name}")), &b).unwrap();
    }
    std::fs::write(dir.join("golden-all-frames"), &all).unwrap();
    let (from_client, from_server) = transcripts();
    std::fs::write(dir.join("transcript-client"), &from_client).unwrap();
    std::fs::write(dir.join("transcript-server"), &from_server).unwrap();
    let dir = corpus_dir("session");
    std::fs::create_dir_all(&dir).unwrap();
    // Selector byte: bit 0 side (0 server, 1 client), bits 1..=3 stage, bits 4..=7 piece size; see checks::session.
    let seed = |name: &str, sel: u8, bytes: &[u8]| {
        let mut v = vec![sel];
        v.extend_from_slice(bytes);
        std::fs::write(dir.join(name), v).unwrap();
    };
    seed("server-fresh-full-transcript", 0x00, &from_client);
    seed("server-fresh-full-transcript-step8", 0x10, &from_client);
    seed("client-fresh-full-transcript", 0x01, &from_server);
    // After the handshake (stage 2), the transcripts minus their handshake frames.
    let skip = |b: &[u8], n: usize| {
        let mut d = Deframer::new();
        d.push(b);
        for _ in 0..n {
            d.next_frame().unwrap().unwrap();
        }
        b[b.len() - d.buffered()..].to_vec()
    };
    seed("server-ready-transcript", 0x04, &skip(&from_client, 2));
    seed("client-ready-transcript", 0x05, &skip(&from_server, 2));
    // Each known frame, to the side that receives that frame type, with a disk open (stage 4).
    for (name, f) in known_frames() {
        let to_client = matches!(
            f,
            Frame::Welcome(_)
                | Frame::AuthOk(_)
                | Frame::ReplicaOpened(_)
                | Frame::ResumeInfo(_)
                | Frame::DigestMapPart(_)
                | Frame::DigestMapEnd(_)
                | Frame::Checkpoint(_)
                | Frame::Committed(_)
        );
        seed(&format!("open-{name}"), 0x08 | u8::from(to_client), &f.to_bytes());
    }
}

#[test]
fn replay_frame_decoder_corpus() {
    let files = files("frame_decoder");
    assert!(!files.is_empty());
    for (name, data) in files {
        eprintln!("frame_decoder/{name}");
        checks::frame_decoder(&data);
    }
}

#[test]
fn replay_session_corpus() {
    let files = files("session");
    assert!(!files.is_empty());
    for (name, data) in files {
        eprintln!("session/{name}");
        checks::session(&data);
    }
}
