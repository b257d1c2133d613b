//! Two in-memory sessions, in the style of quinn-proto's `Pair`: a source and
//! a target application drive a client and a server `Session`, and the bytes
//! between them are delivered in pieces cut at random points.

use std::collections::VecDeque;

use bytes::Bytes;
use ferry_wire::*;
use proptest::prelude::*;

use crate::checks::{pair, pump, CHUNK, DISK_SIZE};

const CHUNKS: u64 = DISK_SIZE.div_ceil(CHUNK as u64);

/// Payload of chunk `i` of the test disk.
fn chunk_bytes(i: u64) -> Bytes {
    let len = (DISK_SIZE - i * u64::from(CHUNK)).min(u64::from(CHUNK)) as usize;
    Bytes::from((0..len).map(|j| (j as u64 * 31 + i) as u8).collect::<Vec<u8>>())
}

fn data(i: u64) -> Frame {
    let payload = chunk_bytes(i);
    Frame::Data(Data {
        disk: 0,
        chunk: i,
        logical_len: payload.len() as u32,
        codec: Codec::None,
        digest: [i as u8; 32],
        payload,
    })
}

fn open_replica(resume: bool) -> Frame {
    Frame::OpenReplica(OpenReplica {
        replica: "vm1".into(),
        point_time_ns: 1_700_000_000_000_000_000,
        session_id: if resume { [9; 16] } else { [7; 16] },
        retain: 3,
        flags: 0,
    })
}

fn replica_opened(resume: bool) -> Frame {
    Frame::ReplicaOpened(ReplicaOpened {
        session_id: if resume { [9; 16] } else { [7; 16] },
        resumed: resume,
        latest_point: 1,
        latest_point_time_ns: 1_600_000_000_000_000_000,
        chunk_size: CHUNK,
        pending_point_time_ns: 0,
    })
}

fn open_disk() -> Frame {
    Frame::OpenDisk(OpenDisk {
        disk: 0,
        name: "disk0.img".into(),
        size: DISK_SIZE,
        chunk_size: CHUNK,
        mode: Mode::Digest,
    })
}

fn resume_info(next: u64) -> Frame {
    Frame::ResumeInfo(ResumeInfo { disk: 0, previous_size: DISK_SIZE, next_chunk: next, flags: ResumeInfo::EXISTED })
}

fn map_parts() -> Vec<Frame> {
    vec![
        Frame::DigestMapPart(DigestMapPart { disk: 0, first_chunk: 0, digests: Bytes::from(vec![1u8; 3 * 32]) }),
        Frame::DigestMapPart(DigestMapPart { disk: 0, first_chunk: 3, digests: Bytes::from(vec![2u8; 2 * 32]) }),
        Frame::DigestMapEnd(DigestMapEnd { disk: 0, chunk_count: CHUNKS, map_hash: [3; 32], cache_hit: false }),
    ]
}

/// The source's frames after the digest map, from chunk `from`.
fn source_data(from: u64) -> Vec<Frame> {
    let mut v = Vec::new();
    if from == 0 {
        v.push(data(0));
        v.push(Frame::ZeroRun(ZeroRun { disk: 0, first_chunk: 1, count: 2 }));
        v.push(Frame::Progress(Progress { disk: 0, bytes_done: 3 * u64::from(CHUNK) }));
    }
    for i in from.max(3)..CHUNKS {
        v.push(data(i));
    }
    v.push(Frame::Flush(Flush { disk: 0, next_chunk: CHUNKS }));
    v
}

/// A client and a server with their applications and the bytes in flight.
struct Pair {
    client: Session,
    server: Session,
    to_server: VecDeque<u8>,
    to_client: VecDeque<u8>,
    cuts: Vec<usize>,
    cut_i: usize,
    client_events: Vec<Event>,
    server_events: Vec<Event>,
    resume_from: u64,
}

impl Pair {
    fn new(cuts: Vec<usize>, resume_from: u64) -> Pair {
        let (client, server) = pair();
        Pair {
            client,
            server,
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            cuts,
            cut_i: 0,
            client_events: Vec::new(),
            server_events: Vec::new(),
            resume_from,
        }
    }

    fn next_cut(&mut self) -> usize {
        let c = self.cuts[self.cut_i % self.cuts.len()];
        self.cut_i += 1;
        c.max(1)
    }

    /// Move one piece each way; run both applications. False when nothing moved.
    fn step(&mut self) -> bool {
        while let Some(b) = self.client.take_transmit() {
            self.to_server.extend(&b[..]);
        }
        while let Some(b) = self.server.take_transmit() {
            self.to_client.extend(&b[..]);
        }
        if self.to_server.is_empty() && self.to_client.is_empty() {
            return false;
        }
        let n = self.next_cut().min(self.to_server.len());
        let piece: Vec<u8> = self.to_server.drain(..n).collect();
        self.server.receive(&piece);
        while let Some(ev) = self.server.poll_event().expect("server") {
            self.server_app(&ev);
            self.server_events.push(ev);
        }
        let n = self.next_cut().min(self.to_client.len());
        let piece: Vec<u8> = self.to_client.drain(..n).collect();
        self.client.receive(&piece);
        while let Some(ev) = self.client.poll_event().expect("client") {
            self.client_app(&ev);
            self.client_events.push(ev);
        }
        true
    }

    fn run(&mut self) {
        while self.step() {}
    }

    /// The source application: reacts to what the target says.
    fn client_app(&mut self, ev: &Event) {
        let resume = self.resume_from > 0;
        let c = &mut self.client;
        match ev {
            Event::Authenticated(_) => c.send(&open_replica(resume)).unwrap(),
            Event::Frame(Frame::ReplicaOpened(_)) => c.send(&open_disk()).unwrap(),
            Event::Frame(Frame::ResumeInfo(r)) => {
                if r.next_chunk == 0 {
                    c.send(&Frame::DigestMapRequest(DigestMapRequest { disk: 0, cached_map_hash: [0; 32] })).unwrap();
                } else {
                    for f in source_data(r.next_chunk) {
                        c.send(&f).unwrap();
                    }
                }
            }
            Event::Frame(Frame::DigestMapEnd(_)) => {
                for f in source_data(0) {
                    c.send(&f).unwrap();
                }
            }
            Event::Frame(Frame::Checkpoint(cp)) if cp.next_chunk == CHUNKS => {
                c.send(&Frame::Commit(Commit { disk_count: 1 })).unwrap()
            }
            Event::Frame(Frame::Committed(_)) => c.send(&Frame::Close).unwrap(),
            _ => {}
        }
    }

    /// The target application: answers the source.
    fn server_app(&mut self, ev: &Event) {
        let resume = self.resume_from > 0;
        let s = &mut self.server;
        match ev {
            Event::Frame(Frame::OpenReplica(_)) => s.send(&replica_opened(resume)).unwrap(),
            Event::Frame(Frame::OpenDisk(_)) => s.send(&resume_info(self.resume_from)).unwrap(),
            Event::Frame(Frame::DigestMapRequest(_)) => {
                for f in map_parts() {
                    s.send(&f).unwrap();
                }
            }
            Event::Frame(Frame::Flush(f)) => {
                s.send(&Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: f.next_chunk })).unwrap()
            }
            Event::Frame(Frame::Commit(_)) => {
                s.send(&Frame::Committed(Committed { point_id: 2, point_time_ns: 1_700_000_000_000_000_000 })).unwrap()
            }
            _ => {}
        }
    }
}

fn peer(name: &str) -> PeerInfo {
    PeerInfo { name: name.into(), software: "ferry-test".into(), version: 1, features: FEATURES_V1, key: 0 }
}

fn expected_server_events(resume_from: u64) -> Vec<Event> {
    let mut v = vec![Event::Authenticated(peer("source"))];
    v.push(Event::Frame(open_replica(resume_from > 0)));
    v.push(Event::Frame(open_disk()));
    if resume_from == 0 {
        v.push(Event::Frame(Frame::DigestMapRequest(DigestMapRequest { disk: 0, cached_map_hash: [0; 32] })));
    }
    v.extend(source_data(resume_from).into_iter().map(Event::Frame));
    v.push(Event::Frame(Frame::Commit(Commit { disk_count: 1 })));
    v.push(Event::Frame(Frame::Close));
    v
}

fn expected_client_events(resume_from: u64) -> Vec<Event> {
    let mut v = vec![Event::Authenticated(peer("target"))];
    v.push(Event::Frame(replica_opened(resume_from > 0)));
    v.push(Event::Frame(resume_info(resume_from)));
    if resume_from == 0 {
        v.extend(map_parts().into_iter().map(Event::Frame));
    }
    v.push(Event::Frame(Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: CHUNKS })));
    v.push(Event::Frame(Frame::Committed(Committed { point_id: 2, point_time_ns: 1_700_000_000_000_000_000 })));
    v
}

fn check_full_session(cuts: Vec<usize>, resume_from: u64) {
    let mut p = Pair::new(cuts, resume_from);
    p.run();
    assert_eq!(p.server_events, expected_server_events(resume_from));
    assert_eq!(p.client_events, expected_client_events(resume_from));
    assert!(p.client.is_closed() && p.server.is_closed());
    assert_eq!(p.client.peer(), Some(&peer("target")));
    assert_eq!(p.server.peer(), Some(&peer("source")));
}

#[test]
fn full_session_one_byte_at_a_time() {
    check_full_session(vec![1], 0);
}

#[test]
fn full_session_whole_buffers() {
    check_full_session(vec![usize::MAX], 0);
}

#[test]
fn resumed_session_continues_from_next_chunk() {
    check_full_session(vec![4096], 3);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn full_session_cut_at_random_points(cuts in proptest::collection::vec(1usize..70_000, 1..32)) {
        check_full_session(cuts, 0);
    }

    #[test]
    fn resumed_session_cut_at_random_points(
        cuts in proptest::collection::vec(1usize..70_000, 1..32),
        from in 1..=CHUNKS,
    ) {
        check_full_session(cuts, from);
    }
}

/// On resume, data below the target's durable point is refused: the source must continue from `next_chunk`.
#[test]
fn resume_refuses_chunks_already_durable() {
    let (mut c, mut s) = pair();
    assert!(matches!(c.send(&open_replica(true)), Err(WireError::IllegalFrame { state: "AwaitWelcome", .. })));
    for _ in 0..2 {
        pump(&mut c, &mut s);
        pump(&mut s, &mut c);
    }
    assert_eq!((c.state(), s.state()), (State::Ready, State::Ready));
    c.send(&open_replica(true)).unwrap();
    assert_eq!(pump(&mut c, &mut s), vec![Event::Frame(open_replica(true))]);
    s.send(&replica_opened(true)).unwrap();
    pump(&mut s, &mut c);
    c.send(&open_disk()).unwrap();
    pump(&mut c, &mut s);
    s.send(&resume_info(3)).unwrap();
    assert_eq!(pump(&mut s, &mut c), vec![Event::Frame(resume_info(3))]);
    assert!(matches!(c.send(&data(2)), Err(WireError::Chunk { disk: 0, chunk: 2, .. })));
    let zr = Frame::ZeroRun(ZeroRun { disk: 0, first_chunk: 1, count: 3 });
    assert!(matches!(c.send(&zr), Err(WireError::Chunk { disk: 0, chunk: 1, .. })));
    assert!(matches!(c.send(&Frame::Flush(Flush { disk: 0, next_chunk: 2 })), Err(WireError::Chunk { .. })));
    c.send(&data(3)).unwrap();
    c.send(&data(4)).unwrap();
    c.send(&Frame::Flush(Flush { disk: 0, next_chunk: CHUNKS })).unwrap();
    let got = pump(&mut c, &mut s);
    assert_eq!(got.len(), 3);
    // A checkpoint may not go behind the resume point (already durable).
    assert!(matches!(
        s.send(&Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: 2 })),
        Err(WireError::Chunk { chunk: 2, .. })
    ));
    s.send(&Frame::Checkpoint(Checkpoint { disk: 0, next_chunk: CHUNKS })).unwrap();
    c.send(&Frame::Commit(Commit { disk_count: 1 })).unwrap();
}
