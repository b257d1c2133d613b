//! The source: reads disks, finds what changed, sends it.
//!
//! ```text
//! reader thread --(chunk, seq)--> workers (zero check, BLAKE3, compare, zstd)
//!   (IO backend,                        |
//!    buffer pool)                       v
//!                        sender (reorders by seq, coalesces zero runs,
//!                                writes frames, Flush every N bytes)
//! receiver thread <-- Checkpoint / Committed / Error from the target
//! ```
//!
//! Memory is bounded by two fixed pools (read buffers and compressed
//! buffers). The reader only blocks on the read pool when it has nothing in
//! flight, and a worker never blocks on the compressed pool (it sends the
//! chunk uncompressed instead), so no stage can wait on another in a cycle.
//! The sender reorders completions by sequence number so the wire carries
//! each disk's chunks in increasing order: one watermark per disk then says
//! what is durable (see wire/PROTOCOL.md, "Resume").

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, Sender};
use ferry_wire::{
    Authenticator, Codec, Commit, Data, DigestMapRequest, ErrorCode, Event, Flush, Frame, Mode, OpenDisk, OpenReplica,
    ResumeInfo, ZeroRun,
};

use crate::backend::{open_backend, BackendChoice, IoBackend, IoKind, IoRequest};
use crate::buf::{BufPool, PoolBuf, ALIGN};
use crate::conn::{client_handshake, Conn, Rx, Sock};
use crate::disk::SourceDisk;
use crate::error::{MoveError, Result};
use crate::stats::{DiskCounters, Stage, StageStats, StageSummary};
use ferry_planner::{parse_cbt, sample_unchanged, ChangeMap, ChunkSet, ZeroDigests};

/// Default chunk size for new replicas.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;

/// How chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressPolicy {
    /// zstd at a fast level, skipping data that does not shrink (backing off on incompressible runs).
    Auto,
    /// Never compress.
    None,
    /// Always try zstd at this level; send raw when it does not shrink.
    Zstd(i32),
}

impl std::str::FromStr for CompressPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(CompressPolicy::Auto),
            "none" => Ok(CompressPolicy::None),
            other => {
                let level = other
                    .strip_prefix("zstd:")
                    .or_else(|| (other == "zstd").then_some("3"))
                    .ok_or_else(|| format!("unknown compression {other:?}: use auto, none or zstd:LEVEL"))?;
                let level: i32 = level.parse().map_err(|_| format!("bad zstd level {level:?}"))?;
                if !(-7..=19).contains(&level) {
                    return Err(format!("zstd level {level} out of range -7..=19"));
                }
                Ok(CompressPolicy::Zstd(level))
            }
        }
    }
}

/// One disk to replicate.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Disk name at the target.
    pub name: String,
    /// Source path (file or block device).
    pub path: PathBuf,
    /// How changes are found; `None` for auto: cbt when a change list is
    /// given, digest when the target already has the disk, else full.
    pub mode: Option<Mode>,
    /// Changed-block-tracking list (any format the planner recognises).
    pub cbt: Option<PathBuf>,
}

/// A replication job.
#[derive(Debug, Clone)]
pub struct ReplicateConfig {
    /// Replica name at the target.
    pub replica: String,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// Chunk size for a new replica (an existing replica keeps its own).
    pub chunk_size: Option<u32>,
    /// Compression.
    pub compress: CompressPolicy,
    /// IO backend for reads.
    pub backend: BackendChoice,
    /// Reads in flight.
    pub queue_depth: usize,
    /// Worker threads.
    pub workers: usize,
    /// Point time of the restore point (ns since the epoch).
    pub point_time_ns: i64,
    /// Read with O_DIRECT where the file allows it.
    pub direct_io: bool,
    /// Ask the target for a durable checkpoint after this many bytes of disk.
    pub checkpoint_bytes: u64,
    /// Retention to set on the replica (0: keep).
    pub retain: u32,
    /// With CBT: chunks that CBT calls unchanged to check against the
    /// target's digests (0: trust CBT blindly).
    pub verify_samples: usize,
}

impl ReplicateConfig {
    /// A full replication of `disks` with default settings.
    pub fn new(replica: &str, disks: Vec<DiskSpec>) -> ReplicateConfig {
        ReplicateConfig {
            replica: replica.to_string(),
            disks,
            chunk_size: None,
            compress: CompressPolicy::Auto,
            backend: BackendChoice::Auto,
            queue_depth: 16,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 16),
            point_time_ns: crate::target::datastore::now_ns(),
            direct_io: false,
            checkpoint_bytes: 256 << 20,
            retain: 0,
            verify_samples: 200,
        }
    }
}

/// What a job reports while it runs.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// The plan: per disk, chunks and bytes to consider.
    Plan(Vec<DiskCounters>),
    /// Bytes of a disk processed so far.
    Progress {
        /// Disk name.
        disk: String,
        /// Bytes processed.
        done: u64,
        /// Bytes planned.
        total: u64,
    },
    /// A disk finished (its last Flush was sent).
    DiskDone(DiskCounters),
    /// Something that affects the result (the run ends with status warning, exit 3).
    Warning(String),
    /// Something the operator should know that does not affect the result.
    Notice(String),
}

/// Receives [`JobEvent`]s.
pub trait Observer: Send + Sync {
    /// Called from the job's threads.
    fn event(&self, e: &JobEvent);
}

/// An observer that ignores everything.
#[derive(Debug)]
pub struct Quiet;
impl Observer for Quiet {
    fn event(&self, _: &JobEvent) {}
}

/// The outcome of a job.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// Per-disk counters.
    pub disks: Vec<DiskCounters>,
    /// Wall time.
    pub duration_s: f64,
    /// Stage figures.
    pub stages: Vec<StageSummary>,
    /// Restore point made.
    pub point_id: u64,
    /// Its point time.
    pub point_time_ns: i64,
    /// IO backend used for reads.
    pub backend: String,
    /// True when an interrupted session was resumed.
    pub resumed: bool,
    /// Chunk size in force.
    pub chunk_size: u32,
    /// Bytes written to the connection in all.
    pub wire_bytes: u64,
}

enum Work {
    Chunk {
        seq: u64,
        disk: u32,
        chunk: u64,
        offset: u64,
        expected: usize,
        buf: PoolBuf,
        result: std::io::Result<usize>,
    },
    DiskEnd {
        seq: u64,
        disk: u32,
    },
}

enum Outcome {
    Data(Data),
    Zero { disk: u32, chunk: u64, len: u64 },
    Unchanged { disk: u32, chunk: u64, len: u64 },
    DiskEnd { disk: u32 },
    Failed(MoveError),
}

struct Done {
    seq: u64,
    outcome: Outcome,
    /// Compressed in / out bytes (0, 0 when not compressed).
    compressed: (u64, u64),
}

enum RxMsg {
    Committed { point_id: u64, point_time_ns: i64 },
    Failed(MoveError),
}

/// What the reader reads of one disk.
struct ReadPlan {
    disk: u32,
    fd: i32,
    size: u64,
    ranges: Vec<Range<u64>>,
}

/// Per-disk state of a running job.
struct JobDisk {
    disk: SourceDisk,
    chunk_count: u64,
    ranges: Vec<Range<u64>>,
    counters: DiskCounters,
    /// Target digests (digest mode).
    target_digests: Option<Vec<[u8; 32]>>,
}

/// Run a replication over an established socket to a target.
pub fn replicate(
    sock: Sock,
    peer: &str,
    auth: Arc<dyn Authenticator>,
    cfg: &ReplicateConfig,
    obs: &dyn Observer,
) -> Result<JobReport> {
    let start = Instant::now();
    if cfg.disks.is_empty() {
        return Err(MoveError::Config("no source disk given".into()));
    }
    let mut opened = Vec::new();
    for d in &cfg.disks {
        crate::target::datastore::validate_name("disk", &d.name)?;
        if opened.iter().any(|(o, _, _): &(SourceDisk, _, _)| o.name == d.name) {
            return Err(MoveError::Config(format!("disk name {:?} given twice", d.name)));
        }
        let sd = SourceDisk::open(&d.name, &d.path, cfg.direct_io)?;
        let cbt = match &d.cbt {
            None => None,
            Some(p) => {
                let content = std::fs::read(p).map_err(|e| MoveError::file("reading change list", p, e))?;
                let label = p.display().to_string();
                Some(
                    parse_cbt(&label, &content, sd.size)
                        .map_err(|e| MoveError::Config(format!("disk {:?}: {e}", d.name)))?,
                )
            }
        };
        if d.mode == Some(Mode::Cbt) && cbt.is_none() {
            return Err(MoveError::Config(format!("disk {:?}: --mode cbt needs a change list (--cbt)", d.name)));
        }
        opened.push((sd, d, cbt));
    }
    let (conn, rx, _peer_info) = client_handshake(sock, peer, auth)?;
    conn.set_write_timeout(Some(Duration::from_secs(120)));
    let result = run_job(&conn, rx, opened, cfg, obs, start);
    if let Err(e) = &result {
        if !matches!(e, MoveError::Wire { source: ferry_wire::WireError::Remote { .. }, .. }) {
            conn.send_error(e.code(), &e.detail());
        }
    }
    conn.shutdown();
    result
}

fn expect_frame(conn: &Conn, rx: &mut Rx) -> Result<Frame> {
    loop {
        let f = rx.next_frame()?.ok_or_else(|| MoveError::PeerGone { peer: conn.peer().into(), side: "target" })?;
        if let Some(Event::Frame(f)) = conn.handle(f)? {
            match f {
                Frame::Progress(_) | Frame::Keepalive | Frame::Unknown { .. } => continue,
                f => return Ok(f),
            }
        }
    }
}

fn unexpected(conn: &Conn, f: &Frame, wanted: &str) -> MoveError {
    MoveError::Config(format!("{} answered {} where {wanted} was expected", conn.peer(), f.name()))
}

fn run_job(
    conn: &Arc<Conn>,
    mut rx: Rx,
    opened: Vec<(SourceDisk, &DiskSpec, Option<ChangeMap>)>,
    cfg: &ReplicateConfig,
    obs: &dyn Observer,
    start: Instant,
) -> Result<JobReport> {
    let session_id = crate::auth::random_bytes::<16>();
    conn.send(&Frame::OpenReplica(OpenReplica {
        replica: cfg.replica.clone(),
        point_time_ns: cfg.point_time_ns,
        session_id,
        retain: cfg.retain,
    }))?;
    let opened_reply = match expect_frame(conn, &mut rx)? {
        Frame::ReplicaOpened(r) => r,
        f => return Err(unexpected(conn, &f, "ReplicaOpened")),
    };
    let chunk_size = match (opened_reply.chunk_size, cfg.chunk_size) {
        (0, c) => c.unwrap_or(DEFAULT_CHUNK_SIZE),
        (r, Some(c)) if c != r => {
            return Err(MoveError::Config(format!(
                "replica {:?} has chunk size {} KiB; drop --chunk-size or give {} KiB (it is fixed when a replica is created)",
                cfg.replica,
                r / 1024,
                r / 1024
            )))
        }
        (r, _) => r,
    };
    let cs = u64::from(chunk_size);

    let mut disks = Vec::new();
    for (i, (sd, spec, cbt)) in opened.into_iter().enumerate() {
        let id = i as u32;
        let requested = spec.mode.unwrap_or(if cbt.is_some() { Mode::Cbt } else { Mode::Digest });
        conn.send(&Frame::OpenDisk(OpenDisk {
            disk: id,
            name: sd.name.clone(),
            size: sd.size,
            chunk_size,
            mode: requested,
        }))?;
        let resume: ResumeInfo = match expect_frame(conn, &mut rx)? {
            Frame::ResumeInfo(r) if r.disk == id => r,
            f => return Err(unexpected(conn, &f, "ResumeInfo")),
        };
        let chunk_count = sd.size.div_ceil(cs);
        let existed = resume.flags & ResumeInfo::EXISTED != 0;
        let mut mode = spec.mode.unwrap_or(match (&cbt, existed) {
            (Some(_), _) => Mode::Cbt,
            (None, true) => Mode::Digest,
            (None, false) => Mode::Full,
        });
        if !existed && mode != Mode::Full {
            obs.event(&JobEvent::Notice(format!("disk {:?} is new to the replica: copying it in full", sd.name)));
            mode = Mode::Full;
        }
        let all = ChunkSet::all(chunk_count);
        let mut target_digests = None;
        let wanted = match mode {
            Mode::Full => all,
            Mode::Digest | Mode::Seed => {
                target_digests = Some(fetch_digests(conn, &mut rx, id, chunk_count)?);
                all
            }
            Mode::Cbt => {
                let map = cbt.as_ref().expect("cbt mode has a change list");
                // Chunks the target did not have (the disk grew; the old partial last chunk changed length).
                let grown = ChunkSet::from_range(resume.previous_size / cs..chunk_count);
                let changed = map.chunks(chunk_size, sd.size).union(&grown);
                if cfg.verify_samples == 0 {
                    changed
                } else {
                    let digests = fetch_digests(conn, &mut rx, id, chunk_count)?;
                    let seed = u64::from_le_bytes(crate::auth::random_bytes::<8>());
                    let samples = sample_unchanged(&changed, chunk_count, cfg.verify_samples, seed);
                    match first_mismatch(&sd, cs, &samples, &digests)? {
                        None => changed,
                        Some(chunk) => {
                            obs.event(&JobEvent::Warning(format!(
                                "disk {:?}: changed block tracking missed a change (chunk {chunk} differs from the \
                                 replica but is not in the change list); replicating this disk in digest mode",
                                sd.name
                            )));
                            mode = Mode::Digest;
                            target_digests = Some(digests);
                            all
                        }
                    }
                }
            }
        };
        let todo = wanted.difference(&ChunkSet::from_range(0..resume.next_chunk));
        let counters = DiskCounters {
            disk: sd.name.clone(),
            mode: format!("{mode:?}").to_lowercase(),
            size: sd.size,
            chunks_planned: todo.count(),
            bytes_planned: todo.bytes(chunk_size, sd.size),
            chunks_resumed: wanted.count() - todo.count(),
            ..Default::default()
        };
        disks.push(JobDisk { disk: sd, chunk_count, ranges: todo.ranges().to_vec(), counters, target_digests });
    }
    obs.event(&JobEvent::Plan(disks.iter().map(|d| d.counters.clone()).collect()));

    // Receiver: checkpoints, the commit answer, errors.
    let (rx_tx, rx_msgs) = crossbeam_channel::unbounded::<RxMsg>();
    let receiver = {
        let conn = conn.clone();
        let mut rx = rx;
        std::thread::Builder::new()
            .name("ferry-receiver".into())
            .spawn(move || receive_loop(&conn, &mut rx, &rx_tx))
            .expect("spawn receiver")
    };

    let run = run_pipeline(conn, &mut disks, cfg, chunk_size, &rx_msgs, obs);
    let outcome = run.and_then(|(stats, backend)| {
        conn.send(&Frame::Commit(Commit { disk_count: disks.len() as u32 }))?;
        match rx_msgs.recv() {
            Ok(RxMsg::Committed { point_id, point_time_ns }) => {
                let _ = conn.send(&Frame::Close);
                Ok((stats, backend, point_id, point_time_ns))
            }
            Ok(RxMsg::Failed(e)) => Err(e),
            Err(_) => Err(MoveError::PeerGone { peer: conn.peer().into(), side: "target" }),
        }
    });
    conn.shutdown();
    let _ = receiver.join();
    let (stats, backend, point_id, point_time_ns) = outcome?;
    Ok(JobReport {
        disks: disks.into_iter().map(|d| d.counters).collect(),
        duration_s: start.elapsed().as_secs_f64(),
        stages: stats.summary(),
        point_id,
        point_time_ns,
        backend,
        resumed: opened_reply.resumed,
        chunk_size,
        wire_bytes: conn.bytes_sent(),
    })
}

fn receive_loop(conn: &Conn, rx: &mut Rx, out: &Sender<RxMsg>) {
    loop {
        let msg = match rx.next_frame() {
            Ok(None) => RxMsg::Failed(MoveError::PeerGone { peer: conn.peer().into(), side: "target" }),
            Err(e) => RxMsg::Failed(e),
            Ok(Some(f)) => match conn.handle(f) {
                Err(e) => RxMsg::Failed(e),
                Ok(Some(Event::Frame(Frame::Committed(c)))) => {
                    let _ = out.send(RxMsg::Committed { point_id: c.point_id, point_time_ns: c.point_time_ns });
                    return;
                }
                Ok(_) => continue,
            },
        };
        let failed = matches!(msg, RxMsg::Failed(_));
        if out.send(msg).is_err() || failed {
            return;
        }
    }
}

fn fetch_digests(conn: &Conn, rx: &mut Rx, disk: u32, chunk_count: u64) -> Result<Vec<[u8; 32]>> {
    conn.send(&Frame::DigestMapRequest(DigestMapRequest { disk, cached_map_hash: [0; 32] }))?;
    let mut v: Vec<[u8; 32]> = Vec::with_capacity(chunk_count as usize);
    loop {
        match expect_frame(conn, rx)? {
            Frame::DigestMapPart(p) if p.disk == disk => {
                v.extend(p.digests.chunks_exact(32).map(|c| <[u8; 32]>::try_from(c).expect("32 bytes")));
            }
            Frame::DigestMapEnd(e) if e.disk == disk => break,
            f => return Err(unexpected(conn, &f, "DigestMapPart")),
        }
    }
    if v.len() as u64 != chunk_count {
        return Err(MoveError::Datastore(format!(
            "the target's digest map has {} chunks, the disk {chunk_count}",
            v.len()
        )));
    }
    Ok(v)
}

/// Read and hash `samples` (chunks CBT calls unchanged) and return the
/// first whose digest differs from the target's.
fn first_mismatch(sd: &SourceDisk, cs: u64, samples: &[u64], target: &[[u8; 32]]) -> Result<Option<u64>> {
    let mut buf = vec![0u8; cs as usize];
    for &chunk in samples {
        let offset = chunk * cs;
        let len = (sd.size - offset).min(cs) as usize;
        sd.read_at(offset, &mut buf[..len])?;
        if blake3::hash(&buf[..len]).as_bytes() != &target[chunk as usize] {
            return Ok(Some(chunk));
        }
    }
    Ok(None)
}

fn run_pipeline(
    conn: &Arc<Conn>,
    disks: &mut [JobDisk],
    cfg: &ReplicateConfig,
    chunk_size: u32,
    rx_msgs: &Receiver<RxMsg>,
    obs: &dyn Observer,
) -> Result<(StageStats, String)> {
    let workers = cfg.workers.max(1);
    let depth = cfg.queue_depth.clamp(1, 256);
    let read_pool = BufPool::new(depth + workers * 3 + 8, chunk_size as usize);
    let out_pool = BufPool::new(workers * 2 + 8, chunk_size as usize);
    let (backend, warning) = open_backend(cfg.backend, &read_pool, depth)
        .map_err(|e| MoveError::Config(format!("source IO backend: {e}")))?;
    if let Some(w) = warning {
        obs.event(&JobEvent::Notice(w));
    }
    let backend_name = backend.name().to_string();
    let abort = AtomicBool::new(false);
    let (work_tx, work_rx) = bounded::<Work>(depth + workers * 2);
    let (done_tx, done_rx) = bounded::<Done>(depth + workers * 2);
    let plans: Vec<ReadPlan> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| ReadPlan { disk: i as u32, fd: d.disk.read_fd(), size: d.disk.size, ranges: d.ranges.clone() })
        .collect();
    let names: Vec<String> = disks.iter().map(|d| d.disk.name.clone()).collect();
    let digests: Vec<Option<Vec<[u8; 32]>>> = disks.iter_mut().map(|d| d.target_digests.take()).collect();
    let cs = u64::from(chunk_size);

    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let r = read_loop(backend, &read_pool, &plans, cs, &work_tx, &abort);
            drop(work_tx);
            r
        });
        let mut worker_handles = Vec::new();
        for _ in 0..workers {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let (out_pool, digests, names) = (&out_pool, &digests, &names);
            worker_handles
                .push(s.spawn(move || work_loop(work_rx, done_tx, out_pool, digests, names, cfg.compress, chunk_size)));
        }
        drop(work_rx);
        drop(done_tx);
        let sent = send_loop(conn, disks, cfg, cs, &done_rx, rx_msgs, obs);
        if sent.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        drop(done_rx);
        let mut stats = StageStats::default();
        for w in worker_handles {
            if let Ok(st) = w.join() {
                stats.merge(&st);
            }
        }
        let read = reader.join().unwrap_or_else(|_| Err(MoveError::Config("reader thread panicked".into())));
        let (sender_stats, _) = sent?;
        let read_stats = read?;
        stats.merge(&read_stats);
        stats.merge(&sender_stats);
        Ok((stats, backend_name))
    })
}

fn read_loop(
    mut backend: Box<dyn IoBackend>,
    pool: &BufPool,
    plans: &[ReadPlan],
    cs: u64,
    tx: &Sender<Work>,
    abort: &AtomicBool,
) -> Result<StageStats> {
    let mut stats = StageStats::default();
    // In flight: seq -> (disk, chunk, expected length, start time).
    let mut inflight: HashMap<u64, (u32, u64, usize, Instant)> = HashMap::new();
    let mut seq = 0u64;
    // Hand one completion downstream; false when downstream is gone.
    let complete = |backend: &mut Box<dyn IoBackend>,
                    stats: &mut StageStats,
                    inflight: &mut HashMap<u64, (u32, u64, usize, Instant)>|
     -> Result<bool> {
        let c = backend.wait().map_err(|e| MoveError::Config(format!("IO backend failed: {e}")))?;
        let (disk, chunk, expected, t) = inflight.remove(&c.tag).expect("completion of a submitted read");
        stats.record(Stage::Read, t.elapsed());
        Ok(tx
            .send(Work::Chunk { seq: c.tag, disk, chunk, offset: c.offset, expected, buf: c.buf, result: c.result })
            .is_ok())
    };
    for plan in plans {
        for r in &plan.ranges {
            for chunk in r.clone() {
                if abort.load(Ordering::Relaxed) {
                    return Ok(stats);
                }
                while backend.in_flight() >= backend.depth() {
                    if !complete(&mut backend, &mut stats, &mut inflight)? {
                        return Ok(stats);
                    }
                }
                // Block on the pool only with nothing in flight: what is in
                // flight may be what the sender is waiting for.
                let buf = loop {
                    if backend.in_flight() == 0 {
                        break pool.get();
                    }
                    if let Some(b) = pool.try_get() {
                        break b;
                    }
                    if !complete(&mut backend, &mut stats, &mut inflight)? {
                        return Ok(stats);
                    }
                };
                let offset = chunk * cs;
                let expected = (plan.size - offset).min(cs) as usize;
                // O_DIRECT needs whole blocks: read the aligned length; the file ends where it ends.
                let len = (expected.div_ceil(ALIGN) * ALIGN).min(buf.capacity());
                inflight.insert(seq, (plan.disk, chunk, expected, Instant::now()));
                backend
                    .submit(IoRequest { tag: seq, fd: plan.fd, offset, len, kind: IoKind::Read, buf })
                    .map_err(|e| MoveError::Config(format!("IO backend failed: {e}")))?;
                seq += 1;
            }
        }
        while backend.in_flight() > 0 {
            if !complete(&mut backend, &mut stats, &mut inflight)? {
                return Ok(stats);
            }
        }
        if tx.send(Work::DiskEnd { seq, disk: plan.disk }).is_err() {
            return Ok(stats);
        }
        seq += 1;
    }
    Ok(stats)
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

fn work_loop(
    rx: Receiver<Work>,
    tx: Sender<Done>,
    out_pool: &BufPool,
    digests: &[Option<Vec<[u8; 32]>>],
    names: &[String],
    policy: CompressPolicy,
    chunk_size: u32,
) -> StageStats {
    let mut stats = StageStats::default();
    let zeros = ZeroDigests::new(chunk_size);
    let level = match policy {
        CompressPolicy::Zstd(l) => l,
        _ => 1,
    };
    let mut cctx = zstd::bulk::Compressor::new(level).expect("zstd context");
    let _ = cctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false));
    let _ = cctx.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false));
    let mut skip = 0u32;
    let mut backoff = 0u32;
    for w in rx {
        let (seq, disk, chunk, offset, expected, buf, result) = match w {
            Work::DiskEnd { seq, disk } => {
                if tx.send(Done { seq, outcome: Outcome::DiskEnd { disk }, compressed: (0, 0) }).is_err() {
                    break;
                }
                continue;
            }
            Work::Chunk { seq, disk, chunk, offset, expected, buf, result } => {
                (seq, disk, chunk, offset, expected, buf, result)
            }
        };
        let name = &names[disk as usize];
        let mut compressed = (0, 0);
        let outcome = match result {
            Err(e) => Outcome::Failed(MoveError::DiskIo {
                what: "reading",
                disk: name.clone(),
                offset,
                len: expected,
                source: e,
            }),
            Ok(n) if n < expected => {
                Outcome::Failed(MoveError::ShortRead { disk: name.clone(), offset, expected, got: n })
            }
            Ok(_) => {
                let mut buf = buf;
                buf.set_len(expected);
                let t = Instant::now();
                let zero = is_zero(&buf);
                let target = digests[disk as usize].as_ref().map(|m| &m[chunk as usize]);
                if zero {
                    stats.record(Stage::Hash, t.elapsed());
                    if target.is_some_and(|d| *d == zeros.digest(expected as u32)) {
                        Outcome::Unchanged { disk, chunk, len: expected as u64 }
                    } else {
                        Outcome::Zero { disk, chunk, len: expected as u64 }
                    }
                } else {
                    let digest = *blake3::hash(&buf).as_bytes();
                    stats.record(Stage::Hash, t.elapsed());
                    let unchanged = target.is_some_and(|d| *d == digest);
                    if unchanged {
                        Outcome::Unchanged { disk, chunk, len: expected as u64 }
                    } else {
                        let try_compress = match policy {
                            CompressPolicy::None => false,
                            CompressPolicy::Zstd(_) => true,
                            CompressPolicy::Auto => {
                                if skip > 0 {
                                    skip -= 1;
                                    false
                                } else {
                                    true
                                }
                            }
                        };
                        let mut payload = None;
                        if try_compress {
                            if let Some(mut out) = out_pool.try_get() {
                                let t = Instant::now();
                                let cap = expected - expected / 8;
                                let r = cctx.compress_to_buffer(&buf[..], &mut out.spare_mut()[..cap]);
                                stats.record(Stage::Compress, t.elapsed());
                                match r {
                                    Ok(n) if n < cap => {
                                        out.set_len(n);
                                        compressed = (expected as u64, n as u64);
                                        payload = Some((Codec::Zstd, Bytes::from_owner(out)));
                                        backoff = 0;
                                    }
                                    _ => {
                                        // Did not shrink by 1/8: back off exponentially on incompressible runs.
                                        backoff = (backoff * 2).clamp(1, 64);
                                        skip = if policy == CompressPolicy::Auto { backoff } else { 0 };
                                    }
                                }
                            }
                        }
                        let (codec, payload) = payload.unwrap_or_else(|| (Codec::None, Bytes::from_owner(buf)));
                        Outcome::Data(Data { disk, chunk, logical_len: expected as u32, codec, digest, payload })
                    }
                }
            }
        };
        if tx.send(Done { seq, outcome, compressed }).is_err() {
            break;
        }
    }
    stats
}

fn send_loop(
    conn: &Conn,
    disks: &mut [JobDisk],
    cfg: &ReplicateConfig,
    cs: u64,
    rx: &Receiver<Done>,
    rx_msgs: &Receiver<RxMsg>,
    obs: &dyn Observer,
) -> Result<(StageStats, ())> {
    let mut stats = StageStats::default();
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut zero_run: Option<ZeroRun> = None;
    let mut since_flush = vec![0u64; disks.len()];
    let mut last_progress = Instant::now();
    let mut done_bytes = vec![0u64; disks.len()];
    let check_target = |rx_msgs: &Receiver<RxMsg>| -> Result<()> {
        while let Ok(m) = rx_msgs.try_recv() {
            if let RxMsg::Failed(e) = m {
                return Err(e);
            }
        }
        Ok(())
    };
    let flush_zero = |zero_run: &mut Option<ZeroRun>, disks: &mut [JobDisk], stats: &mut StageStats| -> Result<()> {
        if let Some(z) = zero_run.take() {
            let t = Instant::now();
            let n = conn.send(&Frame::ZeroRun(z.clone()))?;
            stats.record(Stage::Send, t.elapsed());
            disks[z.disk as usize].counters.bytes_sent += n;
        }
        Ok(())
    };
    for d in rx.iter() {
        pending.insert(d.seq, d);
        while let Some(done) = pending.remove(&next) {
            next += 1;
            check_target(rx_msgs)?;
            let (disk, chunk) = match &done.outcome {
                Outcome::Failed(_) => {
                    let Outcome::Failed(e) = done.outcome else { unreachable!() };
                    return Err(e);
                }
                Outcome::Data(data) => {
                    flush_zero(&mut zero_run, disks, &mut stats)?;
                    let t = Instant::now();
                    let n = match conn.send_data(data) {
                        Ok(n) => n,
                        Err(e) => return Err(prefer_target_error(rx_msgs, e)),
                    };
                    stats.record(Stage::Send, t.elapsed());
                    let c = &mut disks[data.disk as usize].counters;
                    c.bytes_sent += n;
                    c.chunks_sent += 1;
                    c.bytes_read += u64::from(data.logical_len);
                    c.bytes_data += u64::from(data.logical_len);
                    if data.codec == Codec::Zstd {
                        c.bytes_compressed_in += done.compressed.0;
                        c.bytes_compressed_out += done.compressed.1;
                    } else {
                        c.bytes_stored += u64::from(data.logical_len);
                    }
                    (data.disk, data.chunk)
                }
                Outcome::Zero { disk, chunk, len } => {
                    let c = &mut disks[*disk as usize].counters;
                    c.bytes_read += len;
                    c.bytes_zero += len;
                    c.chunks_zero += 1;
                    match &mut zero_run {
                        Some(z) if z.disk == *disk && z.first_chunk + z.count == *chunk => z.count += 1,
                        _ => {
                            flush_zero(&mut zero_run, disks, &mut stats)?;
                            zero_run = Some(ZeroRun { disk: *disk, first_chunk: *chunk, count: 1 });
                        }
                    }
                    (*disk, *chunk)
                }
                Outcome::Unchanged { disk, chunk, len } => {
                    flush_zero(&mut zero_run, disks, &mut stats)?;
                    let c = &mut disks[*disk as usize].counters;
                    c.bytes_read += len;
                    c.bytes_unchanged += len;
                    c.chunks_unchanged += 1;
                    (*disk, *chunk)
                }
                Outcome::DiskEnd { disk } => {
                    flush_zero(&mut zero_run, disks, &mut stats)?;
                    let jd = &mut disks[*disk as usize];
                    // The disk must not have changed size under us.
                    let now = jd.disk.current_size()?;
                    if now != jd.disk.size {
                        return Err(MoveError::Config(format!(
                            "source disk {:?} changed size during the run ({} -> {} bytes); run again",
                            jd.disk.name, jd.disk.size, now
                        )));
                    }
                    let n = conn.send(&Frame::Flush(Flush { disk: *disk, next_chunk: jd.chunk_count }))?;
                    jd.counters.bytes_sent += n;
                    obs.event(&JobEvent::Progress {
                        disk: jd.disk.name.clone(),
                        done: jd.counters.bytes_planned,
                        total: jd.counters.bytes_planned,
                    });
                    obs.event(&JobEvent::DiskDone(jd.counters.clone()));
                    continue;
                }
            };
            let jd = &mut disks[disk as usize];
            let len = (jd.disk.size - chunk * cs).min(cs);
            since_flush[disk as usize] += len;
            done_bytes[disk as usize] += len;
            if since_flush[disk as usize] >= cfg.checkpoint_bytes {
                flush_zero(&mut zero_run, disks, &mut stats)?;
                let n = conn.send(&Frame::Flush(Flush { disk, next_chunk: chunk + 1 }))?;
                disks[disk as usize].counters.bytes_sent += n;
                since_flush[disk as usize] = 0;
            }
            if last_progress.elapsed() >= Duration::from_millis(200) {
                last_progress = Instant::now();
                let jd = &disks[disk as usize];
                obs.event(&JobEvent::Progress {
                    disk: jd.disk.name.clone(),
                    done: done_bytes[disk as usize],
                    total: jd.counters.bytes_planned,
                });
            }
        }
    }
    Ok((stats, ()))
}

/// When a send fails because the target went away, its own Error frame (if
/// the receiver got one) says more than the broken pipe.
fn prefer_target_error(rx_msgs: &Receiver<RxMsg>, e: MoveError) -> MoveError {
    match rx_msgs.recv_timeout(Duration::from_millis(500)) {
        Ok(RxMsg::Failed(t)) => t,
        _ => match e {
            MoveError::Net { peer, .. } => MoveError::PeerGone { peer, side: "target" },
            other => other,
        },
    }
}

/// Report an error to the target (used when a local step fails).
pub fn abort_session(conn: &Conn, e: &MoveError) {
    conn.send_error(ErrorCode::Internal, &e.detail());
}
