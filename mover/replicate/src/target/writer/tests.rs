//! The writer's ordering, pinned with the portable backend and no socket: a recording
//! backend logs every operation's submission and completion; the events and replies the
//! writer gives are checked against that log and against the files it leaves.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::{WDisk, Writer, WriterMsg};
use crate::error::MoveError;
use crate::stats::StageStats;
use crate::target::sender::Outgoing;
use crate::target::session::Counters;
use ferry_datastore::digests::{self, DigestMap, ZeroDigests};
use ferry_datastore::image::ReplicaImage;
use ferry_datastore::store::{Datastore, Replica, SessionDisk, SessionState, UndoExtent, DATASTORE_VERSION};
use ferry_datastore::undo::{undo_path, Tail, UndoReader, UndoWriter};
use ferry_io::backend::PortableBackend;
use ferry_io::{BufPool, IoBackend, IoCompletion, IoKind, IoRequest};

const CS: u32 = 64 * 1024;
const CHUNKS: u64 = 48;
const DEPTH: usize = 8;

/// One entry of the recording backend's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Op {
    /// False: submitted; true: its completion returned by `wait`.
    done: bool,
    kind: IoKind,
    fd: RawFd,
    offset: u64,
}

/// The portable backend, every submission and completion logged in order.
struct Recording {
    inner: PortableBackend,
    log: Arc<Mutex<Vec<Op>>>,
    fds: Mutex<std::collections::HashMap<u64, RawFd>>,
}

impl IoBackend for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn depth(&self) -> usize {
        self.inner.depth()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn submit(&mut self, req: IoRequest) -> std::io::Result<()> {
        let op = Op { done: false, kind: req.kind, fd: req.fd, offset: req.offset };
        self.fds.lock().unwrap().insert(req.tag, req.fd);
        self.log.lock().unwrap().push(op);
        self.inner.submit(req)
    }
    fn wait(&mut self) -> std::io::Result<IoCompletion> {
        let c = self.inner.wait()?;
        let fd = self.fds.lock().unwrap().remove(&c.tag).expect("submitted");
        self.log.lock().unwrap().push(Op { done: true, kind: c.kind, fd, offset: c.offset });
        Ok(c)
    }
}

/// A writer over a temporary replica whose latest point (id 1) holds one disk, `d0`,
/// of [`CHUNKS`] chunks, every byte of chunk `c` equal to `c + 1`.
struct Rig {
    _dir: tempfile::TempDir,
    replica: Arc<Replica>,
    to_writer: Sender<WriterMsg>,
    events: Receiver<Outgoing>,
    log: Arc<Mutex<Vec<Op>>>,
    image_fd: RawFd,
    undo_fd: RawFd,
    pool: BufPool,
    writer: Option<JoinHandle<StageStats>>,
    failed: Arc<Mutex<Option<MoveError>>>,
}

impl Rig {
    /// `map_known`: the digest map knows the old contents (else every chunk is unknown).
    fn new(map_known: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open_or_create(dir.path()).unwrap();
        let replica = ds.lock_replica("r", "test", CS, 0).unwrap();
        let size = CHUNKS * u64::from(CS);
        let image = ReplicaImage::open_rw(&replica, "d0").unwrap();
        image.resize(0, size, false).unwrap();
        let old: Vec<u8> = (0..CHUNKS).flat_map(|c| vec![c as u8 + 1; CS as usize]).collect();
        std::fs::write(image.path().unwrap(), &old).unwrap();
        let zeros = ZeroDigests::new(CS);
        let mut map = DigestMap::new(CS, size).unwrap();
        if map_known {
            for c in 0..CHUNKS {
                map.set(c, *blake3::hash(&old[(c * u64::from(CS)) as usize..][..CS as usize]).as_bytes());
            }
        }
        let undo = UndoWriter::open(&replica.dir, 1, "d0", CS, size).unwrap();
        let entry = SessionDisk {
            size,
            previous_size: size,
            next_chunk: 0,
            chunks_changed: 0,
            bytes_changed: 0,
            undo_durable: None,
        };
        let mut state = SessionState {
            version: DATASTORE_VERSION,
            session_id: "00".repeat(16),
            point_time_ns: 1,
            started_ns: 1,
            disks: Default::default(),
        };
        state.disks.insert("d0".into(), entry.clone());
        replica.write_session(&state).unwrap();
        let (image_fd, undo_fd) = (image.raw_fd(), undo.raw_fd());
        let disk = WDisk {
            name: "d0".into(),
            image,
            direct: None,
            nbd: None,
            size,
            chunk_size: CS,
            digests: map,
            zeros,
            digests_path: replica.digests_path("d0").unwrap(),
            dirty: false,
            entry,
            undo: Some(undo),
            point_size: size,
            presave: Default::default(),
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let backend = Recording { inner: PortableBackend::new(DEPTH), log: log.clone(), fds: Default::default() };
        let replica = Arc::new(replica);
        let (events_tx, events) = unbounded();
        let failed = Arc::new(Mutex::new(None));
        let counters = Arc::new(Counters::default());
        let w = Writer::new(Box::new(backend), replica.clone(), state, events_tx, failed.clone(), counters, CS);
        let (to_writer, rx) = unbounded();
        let writer = std::thread::spawn(move || w.serve(rx));
        to_writer.send(WriterMsg::OpenDisk(0, Box::new(disk))).unwrap();
        let pool = BufPool::new(2 * CHUNKS as usize, CS as usize);
        Rig { _dir: dir, replica, to_writer, events, log, image_fd, undo_fd, pool, writer: Some(writer), failed }
    }

    /// The new contents of chunk `c`.
    fn new_bytes(c: u64) -> Vec<u8> {
        vec![0x80 | c as u8; CS as usize]
    }

    fn chunk(&self, seq: u64, c: u64) {
        let mut buf = self.pool.get();
        buf.spare_mut()[..CS as usize].copy_from_slice(&Rig::new_bytes(c));
        buf.set_len(CS as usize);
        let digest = *blake3::hash(&Rig::new_bytes(c)).as_bytes();
        self.to_writer.send(WriterMsg::Chunk { seq, disk: 0, chunk: c, buf, digest }).unwrap();
    }

    fn barrier(&self, next_chunk: u64, items_before: u64) {
        self.to_writer.send(WriterMsg::Barrier { disk: 0, next_chunk, items_before }).unwrap();
    }

    fn commit(&self, items_before: u64) -> Receiver<crate::error::Result<super::PointMade>> {
        let (tx, reply) = bounded(1);
        self.to_writer.send(WriterMsg::Commit { items_before, reply: tx }).unwrap();
        reply
    }

    fn next_checkpoint(&self) -> (u32, u64) {
        match self.events.recv_timeout(Duration::from_secs(20)) {
            Ok(Outgoing::Checkpoint { disk, next_chunk }) => (disk, next_chunk),
            other => panic!("expected a checkpoint, got {other:?} (writer error: {:?})", self.failed.lock().unwrap()),
        }
    }

    fn stop(mut self) -> Vec<Op> {
        let _ = self.to_writer.send(WriterMsg::Stop);
        self.writer.take().unwrap().join().unwrap();
        assert!(self.failed.lock().unwrap().is_none(), "writer failed: {:?}", self.failed.lock().unwrap());
        self.log.lock().unwrap().clone()
    }

    /// Position in `log` of the first entry that matches.
    fn find(log: &[Op], from: usize, f: impl Fn(&Op) -> bool) -> Option<usize> {
        log.iter().skip(from).position(f).map(|i| i + from)
    }

    /// Every chunk write to the image was submitted only after its old contents were read
    /// and an undo fdatasync submitted after that read had completed.
    fn assert_undo_durable_before_writes(&self, log: &[Op], chunks: &[u64]) {
        for &c in chunks {
            let offset = c * u64::from(CS);
            let is = |kind: IoKind, done: bool, fd: RawFd| move |o: &Op| o.kind == kind && o.done == done && o.fd == fd;
            let write = Rig::find(log, 0, |o| is(IoKind::Write, false, self.image_fd)(o) && o.offset == offset)
                .unwrap_or_else(|| panic!("chunk {c} was never written: {log:?}"));
            let read = Rig::find(log, 0, |o| is(IoKind::Read, true, self.image_fd)(o) && o.offset == offset)
                .unwrap_or_else(|| panic!("old contents of chunk {c} never read: {log:?}"));
            assert!(read < write, "chunk {c}: written (op {write}) before its old contents were read (op {read})");
            // A sync of the undo file submitted after the read completed, and completed itself
            // before the write was submitted.
            let synced = (read..write).any(|s| {
                is(IoKind::Sync, false, self.undo_fd)(&log[s])
                    && (s..write).any(|d| is(IoKind::Sync, true, self.undo_fd)(&log[d]))
            });
            assert!(synced, "chunk {c}: written (op {write}) before its undo record was synced: {log:?}");
        }
    }
}

#[test]
fn every_overwritten_chunk_has_its_undo_record_synced_before_its_write() {
    let rig = Rig::new(false);
    let chunks: Vec<u64> = (0..CHUNKS).step_by(3).collect();
    for (seq, &c) in chunks.iter().enumerate() {
        rig.chunk(seq as u64, c);
    }
    rig.barrier(CHUNKS, chunks.len() as u64);
    rig.next_checkpoint();
    let log = rig.log.lock().unwrap().clone();
    rig.assert_undo_durable_before_writes(&log, &chunks);
    // The records are in the undo file, durable, with the old contents.
    let undo = UndoReader::open(&undo_path(&rig.replica.dir, 1, "d0"), Tail::MayBeTorn).unwrap();
    assert_eq!(undo.records.len(), chunks.len());
    let mut old = vec![0u8; CS as usize];
    for &c in &chunks {
        undo.read(&undo.records[&c], &mut old).unwrap();
        assert_eq!(old, vec![c as u8 + 1; CS as usize], "the old contents of chunk {c}");
    }
    rig.stop();
}

#[test]
fn a_barrier_waits_for_every_item_below_it_and_reports_after_the_session_state() {
    let rig = Rig::new(true);
    // Items 0..8 are chunks 0..8; item 8 (chunk 8) is still being verified when the
    // Flush reaches the writer.
    for c in 0..8 {
        rig.chunk(c, c);
    }
    rig.barrier(9, 9);
    match rig.events.recv_timeout(Duration::from_millis(500)) {
        Err(_) => {}
        Ok(e) => panic!("{e:?} before item 8 was written"),
    }
    rig.chunk(8, 8);
    assert_eq!(rig.next_checkpoint(), (0, 9));
    // Durable before it was reported: session.json names the checkpoint, and the digest map
    // stored with it has the new digest of every chunk below it (the map takes a digest only
    // once the chunk's write completed).
    let state = rig.replica.session().unwrap().expect("session.json");
    assert_eq!(state.disks["d0"].next_chunk, 9);
    let map = digests::load(&rig.replica.digests_path("d0").unwrap(), CS, CHUNKS * u64::from(CS)).expect("map");
    for c in 0..9 {
        assert_eq!(map.get(c), Some(*blake3::hash(&Rig::new_bytes(c)).as_bytes()), "chunk {c}");
    }
    let log = rig.stop();
    let writes_done = log.iter().filter(|o| o.done && o.kind == IoKind::Write).count();
    assert_eq!(writes_done, 9);
}

#[test]
fn the_commit_answers_after_every_earlier_checkpoint_and_write() {
    let rig = Rig::new(true);
    // Item 5 (chunk 5) comes late: after the Commit reached the writer.
    for c in 0..5 {
        rig.chunk(c, c);
    }
    rig.barrier(6, 6);
    rig.chunk(6, 6);
    rig.chunk(7, 7);
    // A barrier with the Commit right behind it is skipped (the commit makes it durable);
    // the one before it is not.
    rig.barrier(8, 8);
    let reply = rig.commit(8);
    if let Ok(r) = reply.recv_timeout(Duration::from_millis(500)) {
        panic!("the commit answered {r:?} before item 5 was written");
    }
    rig.chunk(5, 5);
    let (disks, _) = reply.recv_timeout(Duration::from_secs(20)).expect("a reply").expect("committed");
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].chunks_changed, 8);
    // The checkpoint was on its way to the sending thread before the reply came.
    match rig.events.try_recv() {
        Ok(Outgoing::Checkpoint { disk: 0, next_chunk: 6 }) => {}
        other => panic!("expected the checkpoint before the commit's reply, got {other:?}"),
    }
    assert!(rig.events.try_recv().is_err(), "the barrier right before the commit is skipped");
    let log = rig.log.lock().unwrap().clone();
    let writes_done = log.iter().filter(|o| o.done && o.kind == IoKind::Write).count();
    assert_eq!(writes_done, 8, "the commit answered before every write completed");
    let map = digests::load(&rig.replica.digests_path("d0").unwrap(), CS, CHUNKS * u64::from(CS)).expect("map");
    for c in 0..8 {
        assert_eq!(map.get(c), Some(*blake3::hash(&Rig::new_bytes(c)).as_bytes()), "chunk {c}");
    }
    rig.stop();
}

/// Regression: the writer's copy of the session state was taken when the first disk was
/// opened, and a checkpoint of that disk rewrote session.json without the disks opened after
/// it (until their own first checkpoint). The session thread now sends the writer each later
/// disk's entry ([`WriterMsg::SessionDisk`]) when it opens the disk; this pins the writer's side. A crash then lost a later disk's entry, and with
/// it the size it had at the latest point (`previous_size`): a resumed cbt run of a disk
/// that grew would not have sent the grown chunks it had not written yet.
#[test]
fn a_checkpoint_keeps_the_session_entries_of_disks_opened_after_the_first() {
    let rig = Rig::new(true);
    let size = 4 * u64::from(CS);
    let image = ReplicaImage::open_rw(&rig.replica, "d1").unwrap();
    image.resize(0, size, false).unwrap();
    let zeros = ZeroDigests::new(CS);
    let entry = SessionDisk {
        size,
        previous_size: 2 * u64::from(CS),
        next_chunk: 0,
        chunks_changed: 0,
        bytes_changed: 0,
        undo_durable: None,
    };
    // As the session thread records it when it opens the disk.
    let mut state = rig.replica.session().unwrap().expect("session.json");
    state.disks.insert("d1".into(), entry.clone());
    rig.replica.write_session(&state).unwrap();
    rig.to_writer.send(WriterMsg::SessionDisk("d1".into(), entry.clone())).unwrap();
    let disk = WDisk {
        name: "d1".into(),
        image,
        direct: None,
        nbd: None,
        size,
        chunk_size: CS,
        digests: DigestMap::zeroed(CS, size, &zeros).unwrap(),
        zeros,
        digests_path: rig.replica.digests_path("d1").unwrap(),
        dirty: false,
        entry,
        undo: None,
        point_size: 0,
        presave: Default::default(),
    };
    rig.chunk(0, 0);
    rig.barrier(1, 1);
    assert_eq!(rig.next_checkpoint(), (0, 1));
    // The disk goes to the writer with its first item, after the other disk's checkpoint.
    rig.to_writer.send(WriterMsg::OpenDisk(1, Box::new(disk))).unwrap();
    let state = rig.replica.session().unwrap().expect("session.json");
    assert_eq!(state.disks["d0"].next_chunk, 1);
    let d1 = state.disks.get("d1").expect("d1 is still in session.json");
    assert_eq!((d1.size, d1.previous_size), (size, 2 * u64::from(CS)));
    rig.stop();
}

/// Regression: chunks announced by an Intent have their old contents saved ahead of their
/// data; at the Commit the reads in flight completed and their records were appended, but
/// nothing synced them before the commit reported the undo file's extent (the catalog records
/// it as the frozen file): only a round after the reply did, and a power cut between the
/// catalog and that round left the file shorter than recorded. Every record the commit
/// reports is durable when it answers: no undo fdatasync is left for after it.
#[test]
fn the_commit_makes_records_saved_ahead_durable_before_it_answers() {
    let rig = Rig::new(true);
    rig.to_writer.send(WriterMsg::Intent { disk: 0, runs: vec![(0, CHUNKS)] }).unwrap();
    // No data comes: the chunks turned out unchanged.
    let reply = rig.commit(0);
    let (_, undo) = reply.recv_timeout(Duration::from_secs(20)).expect("a reply").expect("committed");
    let file = UndoReader::open(&undo_path(&rig.replica.dir, 1, "d0"), Tail::MayBeTorn).unwrap();
    assert!(!file.records.is_empty(), "some old contents were saved ahead");
    let extent = UndoExtent { bytes: file.valid_end, records: file.count };
    assert_eq!(undo, vec![("d0".to_string(), extent)], "the extent reported is the file's");
    // The session ends (Stop): a round started now would have come after the catalog.
    let undo_fd = rig.undo_fd;
    let log = rig.stop();
    let last_read = log.iter().rposition(|o| o.done && o.kind == IoKind::Read).expect("old contents read");
    let late_sync = log[last_read..].iter().any(|o| !o.done && o.kind == IoKind::Sync && o.fd == undo_fd);
    assert!(!late_sync, "an undo fdatasync came after the commit reported its records: {log:?}");
}
