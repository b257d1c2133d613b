//! The checks behind the fuzz targets, shared with the stable corpus replay
//! test (`tests/wire/corpus.rs` includes this file), so `cargo test` runs
//! every corpus input through exactly what the fuzzers run.

#![allow(dead_code)]

use std::sync::Arc;

use ferry_wire::*;

/// A deterministic stand-in MAC for tests and fuzzing: not secure, only keyed.
pub struct MixAuth(pub [u8; 32]);

impl Authenticator for MixAuth {
    fn proof(
        &self,
        _key: usize,
        role: Role,
        binding: &[u8; 32],
        client_nonce: &[u8; 32],
        server_nonce: &[u8; 32],
    ) -> [u8; 32] {
        let label: u8 = match role {
            Role::Client => 0xC1,
            Role::Server => 0x5E,
        };
        let mut out = [0u8; 32];
        let mut acc: u8 = label;
        for i in 0..32 {
            acc = acc.rotate_left(3)
                ^ self.0[i]
                ^ client_nonce[i].wrapping_mul(3)
                ^ server_nonce[(i + 7) % 32]
                ^ binding[i];
            out[i] = acc.wrapping_add(i as u8);
        }
        out
    }
}

/// Token shared by the fuzz and test peers.
pub const TOKEN: [u8; 32] = [0x42; 32];
/// Chunk size of the fuzz disk.
pub const CHUNK: u32 = 64 * 1024;
/// Size of the fuzz disk: 4 full chunks and a short one.
pub const DISK_SIZE: u64 = 4 * CHUNK as u64 + 1000;

/// Local info of a fuzz/test peer with a fixed nonce.
pub fn local(name: &str, nonce: u8) -> LocalInfo {
    LocalInfo { name: name.into(), software: "ferry-test".into(), nonce: [nonce; 32], features: FEATURES_V1 }
}

/// A fresh client and server with fixed nonces and the shared token.
pub fn pair() -> (Session, Session) {
    (
        Session::client(local("source", 0x11), Arc::new(MixAuth(TOKEN)), [0; 32]),
        Session::server(local("target", 0x22), Arc::new(MixAuth(TOKEN)), [0; 32]),
    )
}

/// Move everything `from` has queued into `to` and poll `to` until it needs more bytes.
pub fn pump(from: &mut Session, to: &mut Session) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(b) = from.take_transmit() {
        to.receive(&b);
    }
    while let Some(ev) = to.poll_event().expect("setup exchange must not fail") {
        events.push(ev);
    }
    events
}

/// How far [`drive`] takes a fresh pair before the fuzz bytes arrive.
pub const STAGES: u8 = 7;

/// Drive a fresh pair to `stage`: 0 nothing exchanged, 1 Hello/Welcome done,
/// 2 authenticated, 3 OpenReplica sent, 4 a disk open, 5 a digest map request
/// in flight, 6 Commit sent.
pub fn drive(stage: u8) -> (Session, Session) {
    let (mut c, mut s) = pair();
    if stage >= 1 {
        pump(&mut c, &mut s); // Hello -> Welcome queued
        pump(&mut s, &mut c); // Welcome -> AuthProof queued
    }
    if stage >= 2 {
        pump(&mut c, &mut s); // AuthProof -> AuthOk queued
        pump(&mut s, &mut c);
    }
    if stage >= 3 {
        c.send(&Frame::OpenReplica(OpenReplica {
            replica: "vm1".into(),
            point_time_ns: 1_700_000_000_000_000_000,
            session_id: [7; 16],
            retain: 0,
            flags: 0,
        }))
        .unwrap();
        pump(&mut c, &mut s);
    }
    if stage >= 4 {
        s.send(&Frame::ReplicaOpened(ReplicaOpened {
            session_id: [7; 16],
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
            name: "disk0.img".into(),
            size: DISK_SIZE,
            chunk_size: CHUNK,
            mode: Mode::Digest,
        }))
        .unwrap();
        pump(&mut c, &mut s);
        s.send(&Frame::ResumeInfo(ResumeInfo { disk: 0, previous_size: 0, next_chunk: 0, flags: 0 })).unwrap();
        pump(&mut s, &mut c);
    }
    if stage == 5 {
        c.send(&Frame::DigestMapRequest(DigestMapRequest { disk: 0, cached_map_hash: [0; 32] })).unwrap();
        pump(&mut c, &mut s);
    }
    if stage >= 6 {
        c.send(&Frame::ZeroRun(ZeroRun { disk: 0, first_chunk: 0, count: 5 })).unwrap();
        c.send(&Frame::Flush(Flush { disk: 0, next_chunk: 5 })).unwrap();
        c.send(&Frame::Commit(Commit { disk_count: 1 })).unwrap();
        pump(&mut c, &mut s);
    }
    (c, s)
}

/// Decode every frame of `data`, fed in pieces whose sizes come from `cuts`
/// (cycled; empty: all at once). Returns the frames and the error that stopped
/// the stream, if any.
pub fn deframe(data: &[u8], cuts: &[usize]) -> (Vec<Frame>, Option<WireError>) {
    let mut d = Deframer::new();
    let mut frames = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    loop {
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                // The session stops at the first error too.
                Err(e) => return (frames, Some(e)),
            }
        }
        if pos == data.len() {
            return (frames, None);
        }
        let n = if cuts.is_empty() { data.len() - pos } else { cuts[i % cuts.len()].max(1).min(data.len() - pos) };
        i += 1;
        d.push(&data[pos..pos + n]);
        pos += n;
    }
}

/// As [`deframe`], but the way a target reads: a data frame's payload is taken
/// by the caller ([`Deframer::next_split`]), what is buffered first, then
/// straight from the stream, the bytes after it going on into the deframer
/// (as a readv into the payload and the receive buffer puts them).
pub fn split_deframe(data: &[u8], cuts: &[usize]) -> (Vec<Frame>, Option<WireError>) {
    let mut d = Deframer::new();
    let mut frames = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    let mut piece = |pos: &mut usize| {
        let n = if cuts.is_empty() { data.len() - *pos } else { cuts[i % cuts.len()].max(1).min(data.len() - *pos) };
        i += 1;
        *pos += n;
        &data[*pos - n..*pos]
    };
    loop {
        loop {
            match d.next_split() {
                Ok(Some(Split::Frame(f))) => frames.push(f),
                Ok(Some(Split::Data(head))) => {
                    let mut payload = vec![0u8; head.payload_len as usize];
                    let mut filled = d.take_payload(&mut payload);
                    assert_eq!(d.payload_left(), payload.len() - filled);
                    while filled < payload.len() {
                        if pos == data.len() {
                            return (frames, None); // the stream ends inside the payload
                        }
                        let p = piece(&mut pos);
                        let direct = p.len().min(payload.len() - filled);
                        payload[filled..filled + direct].copy_from_slice(&p[..direct]);
                        filled += direct;
                        d.payload_received(direct);
                        d.push(&p[direct..]);
                    }
                    frames.push(Frame::Data(head.with_payload(bytes::Bytes::from(payload))));
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
        if pos == data.len() {
            return (frames, None);
        }
        let p = piece(&mut pos);
        d.push(p);
    }
}

/// The `frame_decoder` target: decode arbitrary bytes, then check that the
/// result does not depend on how the stream was split, and that every decoded
/// frame re-encodes to bytes that decode to the same frame.
pub fn frame_decoder(data: &[u8]) {
    let (frames, err) = deframe(data, &[]);
    let cuts: Vec<usize> = data.iter().take(8).map(|&b| usize::from(b % 17) + 1).collect();
    let (frames2, err2) = deframe(data, &cuts);
    assert_eq!(frames, frames2, "frames depend on how the stream was split");
    assert_eq!(err, err2, "errors depend on how the stream was split");
    // Taking data payloads apart gives the same frames and errors. It may see a data
    // frame's bad head before the end of a stream that would have left it incomplete.
    let (frames3, err3) = split_deframe(data, &cuts);
    assert_eq!(frames, frames3, "data payloads taken apart give other frames");
    if err.is_some() {
        assert_eq!(err, err3, "data payloads taken apart give another error");
    }
    for f in &frames {
        let bytes = f.to_bytes();
        let again = decode_one(&bytes).expect("a decoded frame must re-encode to a valid frame");
        assert_eq!(&again, f);
    }
    if let Some(e) = err {
        let _ = e.to_string();
        let _ = e.code();
    }
}

/// The `session` target: the first byte picks the side (bit 0: 0 server,
/// 1 client), the stage (bits 1..=3, see [`drive`]) and the piece size
/// (bits 4..=7); the rest is fed to that side as if the peer had sent it. Nothing may panic; an error must close the session for good.
pub fn session(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return };
    let stage = ((sel >> 1) & 7) % STAGES;
    let (mut c, mut s) = drive(stage);
    let target = if sel & 1 == 0 { &mut s } else { &mut c };
    let step = usize::from(sel >> 4) * 7 + 1;
    for piece in rest.chunks(step) {
        target.receive(piece);
        loop {
            match target.poll_event() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_string();
                    assert!(target.is_closed(), "an error must close the session");
                    assert_eq!(target.poll_event(), Ok(None), "a closed session yields nothing");
                    // Everything queued decodes, and a local error ends with an Error frame for the peer.
                    let out = target.take_transmit().unwrap_or_default();
                    let (frames, err) = deframe(&out, &[]);
                    assert!(err.is_none(), "session sent an undecodable frame: {err:?}");
                    if !matches!(e, WireError::Remote { .. }) {
                        assert!(matches!(frames.last(), Some(Frame::Error(_))), "no Error frame after {e}");
                    }
                    return;
                }
            }
        }
    }
    // Whatever the session answered must decode.
    if let Some(out) = target.take_transmit() {
        let (_, err) = deframe(&out, &[]);
        assert!(err.is_none(), "session sent an undecodable frame: {err:?}");
    }
}
