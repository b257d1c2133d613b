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
    Authenticator, ChunkRun, Codec, Commit, Data, DigestMapRequest, Event, Flush, Frame, Intent, Mode, OpenDisk,
    OpenReplica, ResumeInfo, ZeroRun,
};

use crate::conn::{client_handshake, Conn, Rx, Sock};
use crate::disk::SourceDisk;
use crate::error::{MoveError, Result};
use crate::map_cache::{MapCache, MapCacheWriter};
use crate::stats::{DiskCounters, MapSource, Stage, StageStats, StageSummary};
use ferry_io::{is_zero, BufPool, PoolBuf, ALIGN};
use ferry_io::{open_backend, BackendChoice, IoBackend, IoKind, IoRequest};
use ferry_nbd::is_nbd_uri;
use ferry_nbd::NbdBackend;
use ferry_planner::{parse_cbt, sample_unchanged, ChangeMap, ChunkSet, Digest, DigestMap, ZeroDigests};

/// zstd levels `--compress auto` moves between (0: off).
pub const AUTO_LEVELS: [i32; 3] = [0, 1, 3];

/// Shared state of `--compress auto`: the level the sender chose, and what
/// the workers measured compressing (including 1-in-16 probes while off).
#[derive(Debug, Default)]
struct AutoCompress {
    /// Index into [`AUTO_LEVELS`].
    idx: std::sync::atomic::AtomicUsize,
    comp_ns: std::sync::atomic::AtomicU64,
    comp_in: std::sync::atomic::AtomicU64,
    comp_out: std::sync::atomic::AtomicU64,
}

/// Sender-side controller: every window compares the link rate L (bytes per
/// second of socket writes) with what the workers can compress, W x C, at
/// ratio R. Compression pays only while the CPUs outrun the link.
struct AutoController {
    workers: f64,
    window_start: Instant,
    send_ns: u64,
    send_bytes: u64,
    last: (u64, u64, u64),
    /// Windows spent at each level.
    windows: [u64; 3],
}

impl AutoController {
    const WINDOW: Duration = Duration::from_millis(250);

    fn new(workers: usize) -> AutoController {
        AutoController {
            workers: workers as f64,
            window_start: Instant::now(),
            send_ns: 0,
            send_bytes: 0,
            last: (0, 0, 0),
            windows: [0; 3],
        }
    }

    fn sent(&mut self, bytes: u64, took: Duration) {
        self.send_bytes += bytes;
        self.send_ns += took.as_nanos() as u64;
    }

    fn tick(&mut self, auto: &AutoCompress) {
        if self.window_start.elapsed() < Self::WINDOW {
            return;
        }
        self.window_start = Instant::now();
        let idx = auto.idx.load(Ordering::Relaxed);
        self.windows[idx] += 1;
        let now = (
            auto.comp_ns.load(Ordering::Relaxed),
            auto.comp_in.load(Ordering::Relaxed),
            auto.comp_out.load(Ordering::Relaxed),
        );
        let (dns, din, dout) = (now.0 - self.last.0, now.1 - self.last.1, now.2 - self.last.2);
        self.last = now;
        let (send_ns, send_bytes) = (std::mem::take(&mut self.send_ns), std::mem::take(&mut self.send_bytes));
        if dns < 1_000_000 || din == 0 || send_ns < 1_000_000 || send_bytes < (1 << 20) {
            return; // not enough to judge this window
        }
        let link = send_bytes as f64 / (send_ns as f64 / 1e9); // bytes/s the link took
        let cpu = self.workers * din as f64 / (dns as f64 / 1e9); // logical bytes/s the workers can compress
        let ratio = din as f64 / dout.max(1) as f64;
        let next = if cpu < link || ratio < 1.1 {
            idx.saturating_sub(1) // compression is the bottleneck, or buys nothing
        } else if cpu > 3.0 * link * ratio && idx + 1 < AUTO_LEVELS.len() {
            idx + 1 // plenty of CPU headroom over a slow link: compress harder
        } else if idx == 0 {
            1
        } else {
            idx
        };
        auto.idx.store(next, Ordering::Relaxed);
    }
}

/// Smallest chunk size, and the default for disks up to [`MAX_DEFAULT_CHUNKS`] of it (128 GiB).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Chunks per disk above which the default chunk size doubles: 2 Mi chunks keep a
/// disk's digest map (32 bytes per chunk, held in memory at both ends) at 64 MiB.
pub const MAX_DEFAULT_CHUNKS: u64 = 2 << 20;

/// Default chunk size of a new replica whose largest disk has `largest` bytes:
/// 64 KiB (the granularity of VMware CBT and of QEMU dirty bitmaps, so a changed
/// block moves as itself, not as a larger chunk around it), doubled until the
/// disk has at most [`MAX_DEFAULT_CHUNKS`] chunks, at most 4 MiB.
pub fn default_chunk_size(largest: u64) -> u32 {
    let mut cs = MIN_CHUNK_SIZE;
    while cs < (4 << 20) && largest.div_ceil(u64::from(cs)) > MAX_DEFAULT_CHUNKS {
        cs *= 2;
    }
    cs
}

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
    /// Source path (file or block device), or an NBD URI
    /// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
    pub path: PathBuf,
    /// How changes are found; `None` for auto: cbt when a change list is
    /// given, digest when the target already has the disk, else full.
    pub mode: Option<Mode>,
    /// Changed-block-tracking list (any format the planner recognises), or
    /// `qemu-bitmap:BITMAP`: the dirty bitmap BITMAP of the disk's NBD export.
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
    /// IO backend for reads of files (NBD disks always read through their connection).
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
    /// Plan only: read, hash and compress as a run would, send nothing, change nothing at the target.
    pub plan_only: bool,
    /// Where to cache the target's digest maps (None: no cache; every map is downloaded).
    pub map_cache: Option<MapCache>,
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
            point_time_ns: ferry_datastore::store::now_ns(),
            direct_io: false,
            checkpoint_bytes: 256 << 20,
            retain: 0,
            verify_samples: 200,
            plan_only: false,
            map_cache: None,
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
    /// What `--compress auto` chose (None for a fixed policy).
    pub compress_auto: Option<CompressChoice>,
}

/// What `--compress auto` chose during a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompressChoice {
    /// zstd levels it moves between (0: off).
    pub levels: Vec<i32>,
    /// 250 ms windows spent at each level.
    pub windows: Vec<u64>,
    /// Level at the end of the run.
    pub final_level: i32,
}

enum Work {
    /// `count` consecutive chunks from `chunk` on, read with one operation into
    /// one buffer (`expected` bytes); they take the sequence numbers `seq..seq + count`.
    Chunk {
        seq: u64,
        disk: u32,
        chunk: u64,
        count: u64,
        offset: u64,
        expected: usize,
        buf: PoolBuf,
        result: std::io::Result<usize>,
    },
    /// A chunk the NBD server reported as unallocated zeros: not read.
    Hole {
        seq: u64,
        disk: u32,
        chunk: u64,
        len: u64,
    },
    DiskEnd {
        seq: u64,
        disk: u32,
    },
}

enum Outcome {
    Data(Data),
    /// `skipped`: not read (an NBD hole).
    Zero {
        disk: u32,
        chunk: u64,
        len: u64,
        skipped: bool,
    },
    Unchanged {
        disk: u32,
        chunk: u64,
        len: u64,
        skipped: bool,
    },
    DiskEnd {
        disk: u32,
    },
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
    name: String,
    fd: i32,
    size: u64,
    ranges: Vec<Range<u64>>,
    /// Chunks not to read (NBD holes): they become zero chunks.
    holes: ChunkSet,
    /// NBD disks: their own backend (files share the reader's one) ...
    nbd: Option<Box<dyn IoBackend>>,
    /// ... and their URI, for messages.
    nbd_uri: Option<String>,
    /// A file read through the page cache: its planned chunks are advised ahead ([`Prefetch`]).
    prefetch: bool,
}

/// Planned chunks advised to the kernel ahead of the reader.
const PREFETCH_BYTES: u64 = 32 << 20;

/// Asks the kernel to read a file source's planned chunks a window ahead of the
/// reader (posix_fadvise WILLNEED). Scattered chunks that are not in the page cache
/// (a CBT incremental of a disk nobody read lately) are then fetched from the device
/// many at a time, not queue-depth at a time; for cached chunks it is a page cache
/// lookup. The window is topped up when half of it was read.
struct Prefetch {
    /// The chunks to advise: the planned ones outside the file's holes (advising a
    /// hole fills the cache with zeros). Empty when the plan is not prefetched.
    ranges: Vec<Range<u64>>,
    /// Next chunk to advise.
    cursor: RangeCursor,
    /// Chunks advised, and submitted for reading.
    advised: u64,
    read: u64,
    window: u64,
}

impl Prefetch {
    fn new(plan: &ReadPlan, cs: u64) -> Prefetch {
        let ranges = if plan.prefetch {
            ChunkSet::from_ranges(plan.ranges.iter().cloned()).difference(&plan.holes).ranges().to_vec()
        } else {
            Vec::new()
        };
        Prefetch { ranges, cursor: RangeCursor::default(), advised: 0, read: 0, window: (PREFETCH_BYTES / cs).max(1) }
    }

    /// The reader submits `count` chunks of `plan`: keep the window ahead of it.
    fn reading(&mut self, plan: &ReadPlan, cs: u64, count: u64) {
        self.read += count;
        if self.advised >= self.read + self.window / 2 {
            return;
        }
        while self.advised < self.read + self.window {
            let Some(r) = self.cursor.take(&self.ranges, self.read + self.window - self.advised) else { break };
            let (offset, len) = (r.start * cs, (r.end * cs).min(plan.size) - r.start * cs);
            // A failure only means no advice.
            let _ = ferry_io::sys::fadvise(plan.fd, offset, len, ferry_io::sys::Advice::WillNeed);
            self.advised += r.end - r.start;
        }
    }
}

/// A position in a list of increasing chunk ranges, handing them out in runs.
#[derive(Default)]
struct RangeCursor {
    /// Index into the ranges, and the next chunk.
    range: usize,
    next: u64,
}

impl RangeCursor {
    /// The next run of at most `max` chunks of `ranges`, if any are left.
    fn take(&mut self, ranges: &[Range<u64>], max: u64) -> Option<Range<u64>> {
        if max == 0 {
            return None;
        }
        while let Some(r) = ranges.get(self.range) {
            let start = self.next.max(r.start);
            let end = r.end.min(start + max);
            if start < end {
                self.next = end;
                return Some(start..end);
            }
            self.range += 1;
        }
        None
    }
}

/// Planned chunks a cbt disk announces to the target (Intent frames) a window ahead of
/// its data, so the target saves their old contents to its undo file before the data
/// comes (DATASTORE.md): the undo fdatasyncs then cover hundreds of records each
/// instead of the few chunks that arrived during the previous one.
const INTENT_WINDOW: u64 = 8192;

/// Announces a disk's planned chunks (its [`JobDisk::ranges`]), [`INTENT_WINDOW`] at a
/// time, topped up when the sender has passed half of what was announced.
#[derive(Default)]
struct Announcer {
    /// Next chunk to announce.
    cursor: RangeCursor,
    /// Chunks announced, and planned chunks the sender has passed (sent or not).
    announced: u64,
    passed: u64,
}

impl Announcer {
    /// The next window of `disk`'s planned chunks `ranges`, if any are left.
    fn next_window(&mut self, disk: u32, ranges: &[Range<u64>]) -> Option<Intent> {
        let mut runs = Vec::new();
        let mut n = 0;
        while n < INTENT_WINDOW {
            let Some(r) = self.cursor.take(ranges, INTENT_WINDOW - n) else { break };
            runs.push(ChunkRun { first_chunk: r.start, count: (r.end - r.start) as u32 });
            n += r.end - r.start;
        }
        self.announced += n;
        (!runs.is_empty()).then_some(Intent { disk, runs })
    }

    /// The sender passed one planned chunk of `disk`: the next window when it is due.
    fn passed(&mut self, disk: u32, ranges: &[Range<u64>]) -> Option<Intent> {
        self.passed += 1;
        if self.announced < self.passed + INTENT_WINDOW / 2 {
            self.next_window(disk, ranges)
        } else {
            None
        }
    }
}

/// Per-disk state of a running job.
struct JobDisk {
    disk: SourceDisk,
    chunk_count: u64,
    ranges: Vec<Range<u64>>,
    /// Planned chunks not to read (NBD holes).
    holes: ChunkSet,
    counters: DiskCounters,
    /// Target digests (digest mode).
    target_digests: Option<Vec<[u8; 32]>>,
    /// The map the target will hold after this run, streamed to the cache as chunks go.
    cache: Option<MapCacheWriter>,
    /// The target's map where only the cache needs it (cbt: the chunks not sent keep these digests).
    cache_base: Option<Vec<Digest>>,
    /// Cbt disks: their planned chunks are announced ahead of the data.
    announcer: Option<Announcer>,
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
        return Err(MoveError::Usage("no source disk given".into()));
    }
    let mut opened = Vec::new();
    for d in &cfg.disks {
        ferry_datastore::store::validate_name("disk", &d.name)?;
        if opened.iter().any(|(o, _, _): &(SourceDisk, _, _)| o.name == d.name) {
            return Err(MoveError::Usage(format!("disk name {:?} given twice", d.name)));
        }
        let bitmap = d.cbt.as_ref().and_then(|p| p.to_str()).and_then(|s| s.strip_prefix("qemu-bitmap:"));
        let sd = match bitmap {
            None => SourceDisk::open(&d.name, &d.path, cfg.direct_io)?,
            Some("") => return Err(MoveError::Usage(format!("disk {:?}: qemu-bitmap: needs a bitmap name", d.name))),
            Some(b) => match d.path.to_str().filter(|p| is_nbd_uri(p)) {
                Some(uri) => SourceDisk::open_nbd(&d.name, uri, Some(b))?,
                None => {
                    return Err(MoveError::Usage(format!(
                        "disk {:?}: qemu-bitmap CBT needs an NBD source (--source {}=nbd+unix:///EXPORT?socket=PATH \
                         or nbd://HOST:PORT/EXPORT), not {}",
                        d.name,
                        d.name,
                        d.path.display()
                    )))
                }
            },
        };
        let cbt = match (&d.cbt, bitmap) {
            (None, _) => None,
            (Some(_), Some(b)) => Some(sd.dirty_map(b)?),
            (Some(p), None) => {
                let content =
                    std::fs::read(p).map_err(|source| MoveError::ChangeListUnreadable { path: p.clone(), source })?;
                let label = p.display().to_string();
                let bad = |e| MoveError::ChangeList { disk: d.name.clone(), source: Box::new(e) };
                Some(parse_cbt(&label, &content, sd.size).map_err(bad)?)
            }
        };
        if d.mode == Some(Mode::Cbt) && cbt.is_none() {
            return Err(MoveError::Usage(format!("disk {:?}: --mode cbt needs a change list (--cbt)", d.name)));
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
    MoveError::Protocol { peer: conn.peer().into(), what: format!("answered {} where {wanted} was expected", f.name()) }
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
        flags: if cfg.plan_only { OpenReplica::PLAN_ONLY } else { 0 },
    }))?;
    let opened_reply = match expect_frame(conn, &mut rx)? {
        Frame::ReplicaOpened(r) => r,
        f => return Err(unexpected(conn, &f, "ReplicaOpened")),
    };
    if opened_reply.resumed {
        obs.event(&JobEvent::Notice(format!(
            "replica {:?} has an interrupted session: resuming it from its last checkpoint",
            cfg.replica
        )));
    }
    let chunk_size = match (opened_reply.chunk_size, cfg.chunk_size) {
        (0, c) => c.unwrap_or_else(|| default_chunk_size(opened.iter().map(|(sd, _, _)| sd.size).max().unwrap_or(0))),
        (r, Some(c)) if c != r => {
            return Err(MoveError::Usage(format!(
                "replica {:?} has chunk size {} KiB; drop --chunk-size or give {} KiB (it is fixed when a replica is created)",
                cfg.replica,
                r / 1024,
                r / 1024
            )))
        }
        (r, _) => r,
    };
    let cs = u64::from(chunk_size);
    // A replica without points gets every disk in full, whatever the change lists say.
    let first_run = opened_reply.latest_point == 0 && !opened_reply.resumed;
    let span = read_span(
        chunk_size,
        opened.iter().map(|(sd, spec, cbt)| match spec.mode {
            None | Some(Mode::Cbt) if !first_run => cbt.as_ref().map(|m| m.chunks(chunk_size, sd.size)),
            _ => None,
        }),
    );
    let read_side = ReadSide::spawn(cfg, chunk_size, span);

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
        let mut cache_base = None;
        let mut map_source = MapSource::None;
        let mut map_bytes = 0;
        let mut fetch = |conn: &Conn, rx: &mut Rx| -> Result<Vec<Digest>> {
            let cached = cfg.map_cache.as_ref().and_then(|c| c.load(&cfg.replica, &sd.name, chunk_size, sd.size));
            let f = fetch_digests(conn, rx, id, chunk_count, cached)?;
            map_source = f.source;
            map_bytes = f.wire_bytes;
            Ok(f.digests)
        };
        let wanted = match mode {
            Mode::Full => all,
            Mode::Digest | Mode::Seed => {
                target_digests = Some(fetch(conn, &mut rx)?);
                all
            }
            Mode::Cbt => {
                let map = cbt.as_ref().expect("cbt mode has a change list");
                // Chunks the target did not have (the disk grew; the old partial last chunk changed length).
                // Only a grown disk has them: a same-size disk's partial last chunk is not new.
                let grown = if resume.previous_size < sd.size {
                    ChunkSet::from_range(resume.previous_size / cs..chunk_count)
                } else {
                    ChunkSet::new()
                };
                let changed = map.chunks(chunk_size, sd.size).union(&grown);
                if cfg.verify_samples == 0 {
                    changed
                } else {
                    let seed = u64::from_le_bytes(crate::auth::random_bytes::<8>());
                    let samples = sample_unchanged(&changed, chunk_count, cfg.verify_samples, seed);
                    // The samples are read and hashed while the target's map is on its way.
                    let (digests, sampled) = std::thread::scope(|s| {
                        let sampled = s.spawn(|| hash_chunks(&sd, cs, &samples));
                        let digests = fetch(conn, &mut rx);
                        (digests, sampled.join().expect("sample hashing does not panic"))
                    });
                    let (digests, sampled) = (digests?, sampled?);
                    let mismatch = samples.iter().zip(&sampled).find(|(&c, d)| digests[c as usize] != **d);
                    match mismatch.map(|(&c, _)| c) {
                        None => {
                            cache_base = Some(digests);
                            changed
                        }
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
        let holes = sd.hole_chunks(&todo, cs)?;
        let mut counters = DiskCounters {
            disk: sd.name.clone(),
            mode: format!("{mode:?}").to_lowercase(),
            size: sd.size,
            chunks_planned: todo.count(),
            bytes_planned: todo.bytes(chunk_size, sd.size),
            chunks_resumed: wanted.count() - todo.count(),
            digest_map: Some(map_source),
            digest_map_bytes: map_bytes,
            ..Default::default()
        };
        // The map the target holds after the commit is known when every chunk is either
        // processed by this run or in the target's map as it stands.
        let cache = match &cfg.map_cache {
            Some(c)
                if !cfg.plan_only
                    && (target_digests.is_some() || cache_base.is_some() || todo.count() == chunk_count) =>
            {
                match c.writer(&cfg.replica, &sd.name, chunk_size, sd.size) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        obs.event(&JobEvent::Notice(format!(
                            "disk {:?}: cannot cache its digest map in {}: {e}; the next run downloads it",
                            sd.name,
                            c.dir().display()
                        )));
                        None
                    }
                }
            }
            _ => None,
        };
        // A cbt plan is what will be sent (short of a few chunks equal to the replica's):
        // announce it, so the target starts saving old contents now.
        let mut announcer = (mode == Mode::Cbt && existed && !cfg.plan_only).then(Announcer::default);
        if let Some(intent) = announcer.as_mut().and_then(|a| a.next_window(id, todo.ranges())) {
            counters.bytes_sent += conn.send(&Frame::Intent(intent))?;
        }
        disks.push(JobDisk {
            disk: sd,
            chunk_count,
            announcer,
            ranges: todo.ranges().to_vec(),
            holes,
            counters,
            target_digests,
            cache_base: if cache.is_some() { cache_base } else { None },
            cache,
        });
    }
    obs.event(&JobEvent::Plan(disks.iter().map(|d| d.counters.clone()).collect()));

    let read_side = read_side.join().map_err(|_| MoveError::Internal("building the read buffers failed".into()))?;
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

    let run = run_pipeline(conn, &mut disks, cfg, chunk_size, read_side, &rx_msgs, obs);
    let outcome = run.and_then(|(stats, backend, chosen)| {
        if cfg.plan_only {
            let _ = conn.send(&Frame::Close);
            return Ok((stats, backend, chosen, 0, cfg.point_time_ns));
        }
        conn.send(&Frame::Commit(Commit { disk_count: disks.len() as u32 }))?;
        match rx_msgs.recv() {
            Ok(RxMsg::Committed { point_id, point_time_ns }) => {
                let _ = conn.send(&Frame::Close);
                Ok((stats, backend, chosen, point_id, point_time_ns))
            }
            Ok(RxMsg::Failed(e)) => Err(e),
            Err(_) => Err(MoveError::PeerGone { peer: conn.peer().into(), side: "target" }),
        }
    });
    // A send that failed because the target closed the session or the
    // connection: the target's own Error frame, if the receiver got one, says why.
    let outcome = outcome.map_err(|e| if e.is_connection_error() { prefer_target_error(&rx_msgs, e) } else { e });
    conn.shutdown();
    let _ = receiver.join();
    let (stats, backend, compress_auto, point_id, point_time_ns) = outcome?;
    if let (Some(c), false) = (&cfg.map_cache, cfg.plan_only) {
        // Committed: the target now holds the maps streamed during the run.
        for d in &mut disks {
            match d.cache.take().map(MapCacheWriter::commit) {
                Some(Ok(true)) => {}
                Some(Ok(false)) | None => c.remove(&cfg.replica, &d.disk.name),
                Some(Err(e)) => obs.event(&JobEvent::Notice(format!(
                    "disk {:?}: digest map not cached ({e}); the next run downloads it",
                    d.disk.name
                ))),
            }
        }
    }
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
        compress_auto,
    })
}

fn receive_loop(conn: &Conn, rx: &mut Rx, out: &Sender<RxMsg>) {
    loop {
        let msg = match rx.next_frame() {
            Ok(None) => RxMsg::Failed(MoveError::PeerGone { peer: conn.peer().into(), side: "target" }),
            Err(e) => RxMsg::Failed(e.peer_gone_if_reset("target")),
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

/// A digest map as the target answered a DigestMapRequest.
struct FetchedMap {
    digests: Vec<Digest>,
    source: MapSource,
    /// DigestMapPart and DigestMapEnd bytes received.
    wire_bytes: u64,
}

/// Ask the target for disk `disk`'s digest map, offering the hash of `cached`:
/// the cached copy is used only when the target answers `cache_hit` for it.
fn fetch_digests(
    conn: &Conn,
    rx: &mut Rx,
    disk: u32,
    chunk_count: u64,
    cached: Option<(DigestMap, Digest)>,
) -> Result<FetchedMap> {
    let cached_map_hash = cached.as_ref().map_or([0; 32], |c| c.1);
    conn.send(&Frame::DigestMapRequest(DigestMapRequest { disk, cached_map_hash }))?;
    let mut v: Vec<Digest> = Vec::new();
    let mut wire_bytes = 0u64;
    let end = loop {
        match expect_frame(conn, rx)? {
            Frame::DigestMapPart(p) if p.disk == disk => {
                if v.capacity() == 0 {
                    v.reserve_exact(chunk_count as usize);
                }
                wire_bytes += (ferry_wire::HEADER_LEN + 16 + p.digests.len()) as u64;
                v.extend(p.digests.chunks_exact(32).map(|c| <[u8; 32]>::try_from(c).expect("32 bytes")));
            }
            Frame::DigestMapEnd(e) if e.disk == disk => {
                wire_bytes += (ferry_wire::HEADER_LEN + 45) as u64;
                break e;
            }
            f => return Err(unexpected(conn, &f, "DigestMapPart")),
        }
    };
    let (digests, source) = match cached {
        Some((m, _)) if end.cache_hit && end.map_hash == cached_map_hash => (m.into_digests(), MapSource::Cached),
        _ if end.cache_hit => {
            return Err(MoveError::Protocol {
                peer: conn.peer().into(),
                what: "answered cache_hit for a digest map this source did not offer".into(),
            })
        }
        _ => (v, MapSource::Fetched),
    };
    if digests.len() as u64 != chunk_count || end.chunk_count != chunk_count {
        return Err(MoveError::Protocol {
            peer: conn.peer().into(),
            what: format!("sent a digest map of {} chunks for a disk of {chunk_count}", digests.len()),
        });
    }
    Ok(FetchedMap { digests, source, wire_bytes })
}

/// The BLAKE3 digest of each of `chunks`, read one by one.
fn hash_chunks(sd: &SourceDisk, cs: u64, chunks: &[u64]) -> Result<Vec<Digest>> {
    let mut buf = vec![0u8; cs as usize];
    chunks
        .iter()
        .map(|&chunk| {
            let offset = chunk * cs;
            let len = (sd.size - offset).min(cs) as usize;
            sd.read_at(offset, &mut buf[..len])?;
            Ok(*blake3::hash(&buf[..len]).as_bytes())
        })
        .collect()
}

/// The read side's buffer pools and IO backend. They are built on a thread of their own
/// while the disks are opened and planned: registering a pool with io_uring touches each
/// of its pages, milliseconds that would otherwise delay the first read.
struct ReadSide {
    read_pool: BufPool,
    out_pool: BufPool,
    /// Chunks per read, reads in flight and workers.
    span: u64,
    depth: usize,
    workers: usize,
    backend: std::result::Result<(Box<dyn IoBackend>, Option<String>), std::io::Error>,
}

impl ReadSide {
    /// Pools and backend for reads of `span` chunks of `chunk_size` bytes.
    fn new(backend: BackendChoice, workers: usize, depth: usize, chunk_size: u32, span: u64) -> ReadSide {
        let (workers, depth) = (workers.max(1), depth.clamp(1, 256));
        let read_pool = BufPool::new(depth + workers * 3 + 8, (span * u64::from(chunk_size)) as usize);
        let out_pool = BufPool::new(workers * 2 + 8, chunk_size as usize);
        let backend = open_backend(backend, &read_pool, depth);
        ReadSide { read_pool, out_pool, span, depth, workers, backend }
    }

    /// Build it on a thread of its own.
    fn spawn(cfg: &ReplicateConfig, chunk_size: u32, span: u64) -> std::thread::JoinHandle<ReadSide> {
        let (backend, workers, depth) = (cfg.backend, cfg.workers, cfg.queue_depth);
        std::thread::spawn(move || ReadSide::new(backend, workers, depth, chunk_size, span))
    }
}

fn run_pipeline(
    conn: &Arc<Conn>,
    disks: &mut [JobDisk],
    cfg: &ReplicateConfig,
    chunk_size: u32,
    read_side: ReadSide,
    rx_msgs: &Receiver<RxMsg>,
    obs: &dyn Observer,
) -> Result<(StageStats, String, Option<CompressChoice>)> {
    let ReadSide { read_pool, out_pool, span, depth, workers, backend } = read_side;
    let (backend, warning) = backend.map_err(|source| MoveError::Backend { side: "source", opening: true, source })?;
    if let Some(w) = warning {
        obs.event(&JobEvent::Notice(w));
    }
    let abort = AtomicBool::new(false);
    let (work_tx, work_rx) = bounded::<Work>(depth + workers * 2);
    let (done_tx, done_rx) = bounded::<Done>(depth + workers * 2);
    // Files share `backend`; each NBD disk reads through its own connection.
    let mut plans: Vec<ReadPlan> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| ReadPlan {
            disk: i as u32,
            name: d.disk.name.clone(),
            fd: d.disk.read_fd(),
            size: d.disk.size,
            ranges: d.ranges.clone(),
            holes: d.holes.clone(),
            nbd: d
                .disk
                .nbd_client()
                .zip(d.disk.nbd_uri())
                .map(|(c, uri)| Box::new(NbdBackend::new(c, depth, uri)) as Box<dyn IoBackend>),
            nbd_uri: d.disk.nbd_uri().map(str::to_string),
            prefetch: d.disk.nbd_uri().is_none() && !d.disk.is_direct(),
        })
        .collect();
    let nbd_disks = plans.iter().filter(|p| p.nbd.is_some()).count();
    let backend_name = match nbd_disks {
        0 => backend.name().to_string(),
        n if n == plans.len() => "nbd".to_string(),
        _ => format!("{}+nbd", backend.name()),
    };
    let names: Vec<String> = disks.iter().map(|d| d.disk.name.clone()).collect();
    let digests: Vec<Option<Vec<[u8; 32]>>> = disks.iter_mut().map(|d| d.target_digests.take()).collect();
    let cache_bases: Vec<Option<Vec<Digest>>> = disks.iter_mut().map(|d| d.cache_base.take()).collect();
    let cs = u64::from(chunk_size);

    let auto = AutoCompress::default();
    auto.idx.store(1, Ordering::Relaxed); // start at zstd 1; the controller adapts within a window
    let auto = &auto;
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let r = read_loop(backend, &read_pool, &mut plans, cs, span, &work_tx, &abort);
            drop(work_tx);
            r
        });
        let mut worker_handles = Vec::new();
        for _ in 0..workers {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let (out_pool, digests, names) = (&out_pool, &digests, &names);
            worker_handles.push(
                s.spawn(move || work_loop(work_rx, done_tx, out_pool, digests, names, cfg.compress, chunk_size, auto)),
            );
        }
        drop(work_rx);
        drop(done_tx);
        let bases: Vec<Option<&[Digest]>> =
            digests.iter().zip(&cache_bases).map(|(d, c)| d.as_deref().or(c.as_deref())).collect();
        let sent = send_loop(conn, disks, &bases, cfg, cs, &done_rx, rx_msgs, obs, auto, workers);
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
        let read = reader.join().unwrap_or_else(|_| Err(MoveError::Internal("the reader thread panicked".into())));
        let (sender_stats, windows) = sent?;
        let read_stats = read?;
        stats.merge(&read_stats);
        stats.merge(&sender_stats);
        let chosen = (cfg.compress == CompressPolicy::Auto).then(|| CompressChoice {
            levels: AUTO_LEVELS.to_vec(),
            windows: windows.to_vec(),
            final_level: AUTO_LEVELS[auto.idx.load(Ordering::Relaxed)],
        });
        Ok((stats, backend_name, chosen))
    })
}

/// An error of `plan`'s backend (NBD: the disk and URI named, exit 1).
fn backend_error(plan: &ReadPlan, e: std::io::Error) -> MoveError {
    match &plan.nbd_uri {
        Some(uri) => {
            let source = match e.into_inner().map(|i| i.downcast::<ferry_nbd::NbdError>()) {
                Some(Ok(n)) => n,
                Some(Err(other)) => Box::new(ferry_nbd::NbdError::Broken(other.to_string())),
                None => Box::new(ferry_nbd::NbdError::Broken("IO error".into())),
            };
            MoveError::Nbd { disk: plan.name.clone(), uri: uri.clone(), source }
        }
        None => MoveError::Backend { side: "source", opening: false, source: e },
    }
}

/// Bytes read at once when chunks are smaller (64 KiB chunks go four at a time).
const SPAN_BYTES: u64 = 256 * 1024;

/// Chunks per read: small chunks are read [`SPAN_BYTES`] at a time (one read, one
/// hand-off and one buffer for several chunks, each still hashed, compared and sent on
/// its own). When every disk comes with its changed chunks (cbt: `Some`), fewer: the
/// mean run of changed chunks, rounded up to a power of two. A read never spans a gap,
/// so a 1% change list (runs of one 64 KiB chunk) would fill a quarter of each buffer,
/// and the read pool (all of it touched when io_uring registers it) would be four times
/// the memory it needs. A disk that falls back to digest mode then reads with the
/// smaller span.
fn read_span(chunk_size: u32, changed: impl IntoIterator<Item = Option<ChunkSet>>) -> u64 {
    let max = (SPAN_BYTES / u64::from(chunk_size)).max(1);
    let (mut chunks, mut runs) = (0u64, 0u64);
    for set in changed {
        let Some(set) = set else { return max };
        chunks += set.count();
        runs += set.ranges().len() as u64;
    }
    if runs == 0 {
        return max;
    }
    chunks.div_ceil(runs).next_power_of_two().min(max)
}

/// A read in flight: disk, first chunk, chunks, bytes expected, start time.
type InFlight = (u32, u64, u64, usize, Instant);

fn read_loop(
    mut file_backend: Box<dyn IoBackend>,
    pool: &BufPool,
    plans: &mut [ReadPlan],
    cs: u64,
    span: u64,
    tx: &Sender<Work>,
    abort: &AtomicBool,
) -> Result<StageStats> {
    let mut stats = StageStats::default();
    // In flight, by the sequence number of the first chunk.
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let mut seq = 0u64;
    // Hand one completion downstream; false when downstream is gone.
    let complete = |backend: &mut Box<dyn IoBackend>,
                    plan: &ReadPlan,
                    stats: &mut StageStats,
                    inflight: &mut HashMap<u64, InFlight>|
     -> Result<bool> {
        let c = backend.wait().map_err(|e| backend_error(plan, e))?;
        let (disk, chunk, count, expected, t) = inflight.remove(&c.tag).expect("completion of a submitted read");
        stats.record(Stage::Read, t.elapsed());
        let (offset, buf, result) = (c.offset, c.buf, c.result);
        Ok(tx.send(Work::Chunk { seq: c.tag, disk, chunk, count, offset, expected, buf, result }).is_ok())
    };
    for plan in plans.iter_mut() {
        let mut own = plan.nbd.take();
        let plan = &*plan;
        let backend = own.as_mut().unwrap_or(&mut file_backend);
        let mut prefetch = Prefetch::new(plan, cs);
        for r in &plan.ranges {
            let mut chunk = r.start;
            while chunk < r.end {
                if abort.load(Ordering::Relaxed) {
                    return Ok(stats);
                }
                let offset = chunk * cs;
                if plan.holes.contains(chunk) {
                    let len = (plan.size - offset).min(cs);
                    let hole = Work::Hole { seq, disk: plan.disk, chunk, len };
                    if tx.send(hole).is_err() {
                        return Ok(stats);
                    }
                    seq += 1;
                    chunk += 1;
                    continue;
                }
                // Up to `span` chunks of this range, stopping before a hole.
                let mut count = 1;
                while count < span && chunk + count < r.end && !plan.holes.contains(chunk + count) {
                    count += 1;
                }
                let expected = (plan.size.min((chunk + count) * cs) - offset) as usize;
                prefetch.reading(plan, cs, count);
                while backend.in_flight() >= backend.depth() {
                    if !complete(backend, plan, &mut stats, &mut inflight)? {
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
                    if !complete(backend, plan, &mut stats, &mut inflight)? {
                        return Ok(stats);
                    }
                };
                // O_DIRECT needs whole blocks: read the aligned length; the file ends where it ends.
                let len = (expected.div_ceil(ALIGN) * ALIGN).min(buf.capacity());
                inflight.insert(seq, (plan.disk, chunk, count, expected, Instant::now()));
                backend
                    .submit(IoRequest { tag: seq, fd: plan.fd, offset, len, kind: IoKind::Read, buf })
                    .map_err(|e| backend_error(plan, e))?;
                seq += count;
                chunk += count;
            }
        }
        while backend.in_flight() > 0 {
            if !complete(backend, plan, &mut stats, &mut inflight)? {
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

// One pipeline stage: its channels, shared pools and the job's settings.
#[allow(clippy::too_many_arguments)]
fn work_loop(
    rx: Receiver<Work>,
    tx: Sender<Done>,
    out_pool: &BufPool,
    digests: &[Option<Vec<[u8; 32]>>],
    names: &[String],
    policy: CompressPolicy,
    chunk_size: u32,
    auto: &AutoCompress,
) -> StageStats {
    let mut stats = StageStats::default();
    let zeros = ZeroDigests::new(chunk_size);
    let mut cur_level = 1;
    let mut probe = 0u64;
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
        let (seq, disk, chunk, count, offset, expected, buf, result) = match w {
            Work::DiskEnd { seq, disk } => {
                if tx.send(Done { seq, outcome: Outcome::DiskEnd { disk }, compressed: (0, 0) }).is_err() {
                    break;
                }
                continue;
            }
            Work::Hole { seq, disk, chunk, len } => {
                let target = digests[disk as usize].as_ref().map(|m| &m[chunk as usize]);
                let outcome = if target.is_some_and(|d| *d == zeros.digest(len as u32)) {
                    Outcome::Unchanged { disk, chunk, len, skipped: true }
                } else {
                    Outcome::Zero { disk, chunk, len, skipped: true }
                };
                if tx.send(Done { seq, outcome, compressed: (0, 0) }).is_err() {
                    break;
                }
                continue;
            }
            Work::Chunk { seq, disk, chunk, count, offset, expected, buf, result } => {
                (seq, disk, chunk, count, offset, expected, buf, result)
            }
        };
        let name = &names[disk as usize];
        let failed = match result {
            Err(e) => Some(MoveError::DiskIo { what: "reading", disk: name.clone(), offset, len: expected, source: e }),
            Ok(n) if n < expected => Some(MoveError::ShortRead { disk: name.clone(), offset, expected, got: n }),
            Ok(_) => None,
        };
        if let Some(e) = failed {
            // The sender stops at the first failed item: the span's later chunks never come.
            if tx.send(Done { seq, outcome: Outcome::Failed(e), compressed: (0, 0) }).is_err() {
                break;
            }
            continue;
        }
        let mut buf = buf;
        buf.set_len(expected);
        // One owner for the span: a raw payload is a slice of it, no copy.
        let span = Bytes::from_owner(buf);
        let cs = chunk_size as usize;
        let mut gone = false;
        for i in 0..count {
            let (seq, chunk) = (seq + i, chunk + i);
            let at = i as usize * cs;
            let range = at..(at + cs).min(expected);
            let expected = range.len();
            let buf = &span[range.clone()];
            let mut compressed = (0, 0);
            let outcome = {
                let t = Instant::now();
                let zero = is_zero(buf);
                let target = digests[disk as usize].as_ref().map(|m| &m[chunk as usize]);
                if zero {
                    stats.record(Stage::Hash, t.elapsed());
                    if target.is_some_and(|d| *d == zeros.digest(expected as u32)) {
                        Outcome::Unchanged { disk, chunk, len: expected as u64, skipped: false }
                    } else {
                        Outcome::Zero { disk, chunk, len: expected as u64, skipped: false }
                    }
                } else {
                    let digest = *blake3::hash(buf).as_bytes();
                    stats.record(Stage::Hash, t.elapsed());
                    let unchanged = target.is_some_and(|d| *d == digest);
                    if unchanged {
                        Outcome::Unchanged { disk, chunk, len: expected as u64, skipped: false }
                    } else {
                        let try_compress = match policy {
                            CompressPolicy::None => false,
                            CompressPolicy::Zstd(_) => true,
                            CompressPolicy::Auto => {
                                let lvl = AUTO_LEVELS[auto.idx.load(Ordering::Relaxed)];
                                // While off, 1 chunk in 16 is compressed anyway to keep measuring.
                                probe += 1;
                                let want = if lvl == 0 { probe % 16 == 0 } else { true };
                                let lvl = lvl.max(1);
                                if want && lvl != cur_level {
                                    let _ = cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(lvl));
                                    cur_level = lvl;
                                }
                                if !want {
                                    false
                                } else if skip > 0 {
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
                                let r = cctx.compress_to_buffer(buf, &mut out.spare_mut()[..cap]);
                                let took = t.elapsed();
                                auto.comp_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
                                auto.comp_in.fetch_add(expected as u64, Ordering::Relaxed);
                                auto.comp_out
                                    .fetch_add(r.as_ref().map_or(expected as u64, |&n| n as u64), Ordering::Relaxed);
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
                        let (codec, payload) = payload.unwrap_or_else(|| (Codec::None, span.slice(range.clone())));
                        Outcome::Data(Data { disk, chunk, logical_len: expected as u32, codec, digest, payload })
                    }
                }
            };
            if tx.send(Done { seq, outcome, compressed }).is_err() {
                gone = true;
                break;
            }
        }
        if gone {
            break;
        }
    }
    stats
}

// One pipeline stage: its channels, shared pools and the job's settings.
#[allow(clippy::too_many_arguments)]
fn send_loop(
    conn: &Conn,
    disks: &mut [JobDisk],
    target_digests: &[Option<&[Digest]>],
    cfg: &ReplicateConfig,
    cs: u64,
    rx: &Receiver<Done>,
    rx_msgs: &Receiver<RxMsg>,
    obs: &dyn Observer,
    auto: &AutoCompress,
    workers: usize,
) -> Result<(StageStats, [u64; 3])> {
    let mut ctl = AutoController::new(workers);
    let mut stats = StageStats::default();
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut zero_run: Option<ZeroRun> = None;
    let mut since_flush = vec![0u64; disks.len()];
    let mut last_progress = Instant::now();
    let mut done_bytes = vec![0u64; disks.len()];
    let zeros = ZeroDigests::new(cs as u32);
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
            let n = emit(conn, cfg.plan_only, &Frame::ZeroRun(z.clone()))?;
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
                    let n = emit_data(conn, cfg.plan_only, data)?;
                    let took = t.elapsed();
                    stats.record(Stage::Send, took);
                    ctl.sent(n, took);
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
                    let jd = &mut disks[data.disk as usize];
                    cache_chunk(&mut jd.cache, target_digests[data.disk as usize], data.chunk, Some(data.digest));
                    (data.disk, data.chunk)
                }
                Outcome::Zero { disk, chunk, len, skipped } => {
                    let c = &mut disks[*disk as usize].counters;
                    if *skipped {
                        c.bytes_hole_skipped += len;
                    } else {
                        c.bytes_read += len;
                    }
                    c.bytes_zero += len;
                    c.chunks_zero += 1;
                    let jd = &mut disks[*disk as usize];
                    cache_chunk(&mut jd.cache, target_digests[*disk as usize], *chunk, Some(zeros.digest(*len as u32)));
                    match &mut zero_run {
                        Some(z) if z.disk == *disk && z.first_chunk + z.count == *chunk => z.count += 1,
                        _ => {
                            flush_zero(&mut zero_run, disks, &mut stats)?;
                            zero_run = Some(ZeroRun { disk: *disk, first_chunk: *chunk, count: 1 });
                        }
                    }
                    (*disk, *chunk)
                }
                Outcome::Unchanged { disk, chunk, len, skipped } => {
                    flush_zero(&mut zero_run, disks, &mut stats)?;
                    let c = &mut disks[*disk as usize].counters;
                    if *skipped {
                        c.bytes_hole_skipped += len;
                    } else {
                        c.bytes_read += len;
                    }
                    c.bytes_unchanged += len;
                    c.chunks_unchanged += 1;
                    // Unchanged: the target keeps the digest its map has.
                    cache_chunk(&mut disks[*disk as usize].cache, target_digests[*disk as usize], *chunk, None);
                    (*disk, *chunk)
                }
                Outcome::DiskEnd { disk } => {
                    flush_zero(&mut zero_run, disks, &mut stats)?;
                    let jd = &mut disks[*disk as usize];
                    // The disk must not have changed size under us.
                    let now = jd.disk.current_size()?;
                    if now != jd.disk.size {
                        return Err(MoveError::Resized {
                            disk: jd.disk.name.clone(),
                            before: jd.disk.size,
                            after: now,
                        });
                    }
                    if jd.chunk_count > 0 {
                        cache_chunk(&mut jd.cache, target_digests[*disk as usize], jd.chunk_count - 1, None);
                    }
                    let n =
                        emit(conn, cfg.plan_only, &Frame::Flush(Flush { disk: *disk, next_chunk: jd.chunk_count }))?;
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
            if let Some(intent) = jd.announcer.as_mut().and_then(|a| a.passed(disk, &jd.ranges)) {
                jd.counters.bytes_sent += conn.send(&Frame::Intent(intent))?;
            }
            let len = (jd.disk.size - chunk * cs).min(cs);
            since_flush[disk as usize] += len;
            done_bytes[disk as usize] += len;
            if since_flush[disk as usize] >= cfg.checkpoint_bytes {
                flush_zero(&mut zero_run, disks, &mut stats)?;
                let n = emit(conn, cfg.plan_only, &Frame::Flush(Flush { disk, next_chunk: chunk + 1 }))?;
                disks[disk as usize].counters.bytes_sent += n;
                since_flush[disk as usize] = 0;
            }
            if cfg.compress == CompressPolicy::Auto {
                ctl.tick(auto);
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
    Ok((stats, ctl.windows))
}

/// Stream the target's digest of every chunk up to `chunk` into a disk's
/// cache file: chunks this run skipped keep the target's digest (`base`),
/// `chunk` gets `digest` (None: the target's, unchanged). Without a base, a
/// skipped chunk's digest is unknown and the map is not cached.
fn cache_chunk(w: &mut Option<MapCacheWriter>, base: Option<&[Digest]>, chunk: u64, digest: Option<Digest>) {
    let Some(w) = w else { return };
    // A writer that gave up (or failed to write) takes no more digests.
    while w.is_open() && w.next_chunk() <= chunk {
        let i = w.next_chunk();
        let d = match (digest, base) {
            (Some(d), _) if i == chunk => d,
            (_, Some(b)) if (i as usize) < b.len() => b[i as usize],
            _ => {
                w.abandon();
                return;
            }
        };
        w.push(&d);
    }
}

/// Send a frame, or in a plan only count the bytes it would take.
fn emit(conn: &Conn, plan_only: bool, f: &Frame) -> Result<u64> {
    if plan_only {
        return Ok(f.to_bytes().len() as u64);
    }
    conn.send(f)
}

/// Send a data frame, or in a plan only count the bytes it would take.
fn emit_data(conn: &Conn, plan_only: bool, d: &Data) -> Result<u64> {
    if plan_only {
        return Ok((ferry_wire::HEADER_LEN + ferry_wire::DATA_FIXED_LEN + d.payload.len()) as u64);
    }
    conn.send_data(d)
}

/// When a send fails because the target went away or closed the session,
/// its own Error frame (if the receiver got one) says more than the broken
/// pipe or "session closed".
fn prefer_target_error(rx_msgs: &Receiver<RxMsg>, e: MoveError) -> MoveError {
    match rx_msgs.recv_timeout(Duration::from_millis(500)) {
        Ok(RxMsg::Failed(t)) => t.peer_gone_if_reset("target"),
        _ => e.peer_gone_if_reset("target"),
    }
}

/// What a target says about a replica, without changing anything there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// Id of the latest restore point (0: none).
    pub latest_point: u64,
    /// Its point time (ns; 0 when none).
    pub latest_point_time_ns: i64,
    /// True when an interrupted session is pending.
    pub interrupted: bool,
    /// The point time the interrupted session was opened with (0 when none).
    pub pending_point_time_ns: i64,
}

/// Ask a target about `replica` through a plan-only session (side-effect free).
pub fn replica_info(sock: Sock, peer: &str, auth: Arc<dyn Authenticator>, replica: &str) -> Result<ReplicaInfo> {
    let (conn, mut rx, _peer_info) = client_handshake(sock, peer, auth)?;
    conn.set_write_timeout(Some(Duration::from_secs(120)));
    let result = (|| {
        conn.send(&Frame::OpenReplica(OpenReplica {
            replica: replica.to_string(),
            point_time_ns: 0,
            session_id: crate::auth::random_bytes::<16>(),
            retain: 0,
            flags: OpenReplica::PLAN_ONLY,
        }))?;
        match expect_frame(&conn, &mut rx)? {
            Frame::ReplicaOpened(r) => Ok(ReplicaInfo {
                latest_point: r.latest_point,
                latest_point_time_ns: r.latest_point_time_ns,
                interrupted: r.resumed,
                pending_point_time_ns: r.pending_point_time_ns,
            }),
            f => Err(unexpected(&conn, &f, "ReplicaOpened")),
        }
    })();
    let _ = conn.send(&Frame::Close);
    conn.shutdown();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_span_the_mean_run_of_changed_chunks_when_every_disk_has_a_change_list() {
        // Runs as (first, end) pairs.
        let set = |r: &[(u64, u64)]| Some(ChunkSet::from_ranges(r.iter().map(|&(a, b)| a..b)));
        // 64 KiB chunks: at most 4 per read.
        assert_eq!(read_span(64 << 10, [set(&[(1, 2), (5, 6), (9, 10)])]), 1);
        assert_eq!(read_span(64 << 10, [set(&[(1, 2), (5, 7)]), set(&[(9, 10)])]), 2, "4 chunks in 3 runs");
        assert_eq!(read_span(64 << 10, [set(&[(0, 100)])]), 4);
        // A disk without a change list (digest or full mode) reads whole spans.
        assert_eq!(read_span(64 << 10, [set(&[(1, 2)]), None]), 4);
        // Nothing changed: whole spans (a fallback to digest mode reads everything).
        assert_eq!(read_span(64 << 10, [set(&[])]), 4);
        assert_eq!(read_span(1 << 20, [set(&[(0, 100)])]), 1);
    }

    #[test]
    fn a_range_cursor_hands_out_runs_of_at_most_max_chunks_in_order() {
        let ranges = [2..5, 7..7, 9..10];
        let mut c = RangeCursor::default();
        assert_eq!(c.take(&ranges, 0), None);
        assert_eq!(c.take(&ranges, 2), Some(2..4));
        assert_eq!(c.take(&ranges, 2), Some(4..5));
        assert_eq!(c.take(&ranges, 8), Some(9..10));
        assert_eq!(c.take(&ranges, 8), None);
    }

    #[test]
    fn default_chunk_size_keeps_digest_maps_at_64_mib() {
        const GIB: u64 = 1 << 30;
        assert_eq!(default_chunk_size(0), 64 * 1024);
        assert_eq!(default_chunk_size(4 * GIB), 64 * 1024);
        assert_eq!(default_chunk_size(128 * GIB), 64 * 1024);
        assert_eq!(default_chunk_size(128 * GIB + 1), 128 * 1024);
        assert_eq!(default_chunk_size(2048 * GIB), 1024 * 1024);
        assert_eq!(default_chunk_size(8192 * GIB), 4 << 20);
        assert_eq!(default_chunk_size(u64::MAX), 4 << 20);
        for size in [GIB, 100 * GIB, 300 * GIB, 5000 * GIB] {
            let cs = u64::from(default_chunk_size(size));
            assert!(size.div_ceil(cs) <= MAX_DEFAULT_CHUNKS, "{size}");
        }
    }
}
