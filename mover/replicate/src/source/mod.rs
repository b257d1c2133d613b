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
//!
//! One stage, one file:
//!
//! | file | stage | takes | gives |
//! |------|-------|-------|-------|
//! | `job.rs` | the session with the target: OpenReplica, per disk OpenDisk / ResumeInfo, the digest map and the sample check the plan asks for, the pipeline's threads, Commit | the opened disks | a [`JobReport`] |
//! | `read.rs` | reader thread: the planned chunks, a span per read, NBD holes skipped, page cache prefetch | each disk's planned ranges | `Work` (a read span, a hole, a disk's end) |
//! | `work.rs` | worker threads: zero check, BLAKE3, compare with the target's digest, compress | `Work` | `Done` (one `Outcome` per chunk) |
//! | `compress.rs` | `--compress auto`: what the workers measure, the level the sender picks | | |
//! | `send.rs` | sender (the job's thread): reorder by sequence, zero runs, Data, Flush, progress, map cache | `Done` | frames |
//! | `announce.rs` | Intent frames announcing a cbt disk's plan ahead of its data | the planned ranges | `Intent` |
//! | `receive.rs` | receiver thread: Checkpoint, Committed, Error from the target | frames | `RxMsg` |
//!
//! What each disk reads is decided by the planner (`ferry_planner::plan_disk`,
//! then `check_samples` once the target's digests are in); this module only
//! executes the plan. The entry points are [`replicate`] and [`replica_info`].

mod announce;
mod compress;
mod heartbeat;
mod job;
pub(crate) mod read;
mod receive;
mod send;
mod stripe;
mod work;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_io::BackendChoice;
use ferry_nbd::is_nbd_uri;
use ferry_planner::{parse_cbt, ChangeMap, PlanError};
use ferry_wire::{Authenticator, Frame, Mode, OpenReplica};

use crate::conn::{client_handshake, Link};
use crate::disk::SourceDisk;
use crate::error::{MoveError, Result};
use crate::map_cache::MapCache;
use crate::stats::{DiskCounters, StageSummary};
use job::{expect_frame, run_job, unexpected};

pub use compress::{LevelBytes, AUTO_LEVELS};
pub use stripe::{
    auto_streams, grow, kernel_window, Dial, Grow, GrowInput, StreamPlan, Streams, AUTO_MAX, AUTO_MIN_RTT, AUTO_RATE,
    GROW_WINDOW,
};

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
    /// Where its changes come from (cbt); `None`: no change list.
    pub cbt: Option<ChangeSource>,
}

/// Where a disk's changes since the replica's latest point come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeSource {
    /// A changed-block-tracking list in any format the planner recognises.
    File(PathBuf),
    /// The dirty bitmap of this name of the disk's NBD export (`qemu-bitmap:NAME`).
    QemuBitmap(String),
    /// Changed extents already in memory (such as a backup's own metadata).
    Extents(ChangeMap),
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
    /// Ask the target for a durable checkpoint after this many bytes of a disk read (holes
    /// and chunks skipped unread do not count; a disk that moves also asks every
    /// `send::CHECKPOINT_INTERVAL`).
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
    /// Connections to a remote target (`--streams`; a local target always takes one).
    pub streams: Streams,
    /// Tests: with `--streams auto`, add a connection after every this many bytes sent
    /// per connection, whatever the measurements say (up to the cap).
    pub streams_grow_every: Option<u64>,
    /// The bandwidth limit the frames sent are charged to (`--bwlimit`); None: unlimited.
    pub throttle: Option<std::sync::Arc<crate::throttle::Throttle>>,
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
            streams: Streams::Auto,
            streams_grow_every: None,
            throttle: None,
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
        /// What the run is doing: `open` (opening the replica and its disks, planning),
        /// `digest_map` (getting a disk's digest map), `data` (reading, comparing, sending),
        /// `commit` (waiting for the target to make the point durable). Outside `data`
        /// the figures are the latest ones, repeated at least once a second.
        phase: &'static str,
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
    /// Data chunks sent at each zstd level (0: raw), levels in increasing order.
    pub compress_levels: Vec<LevelBytes>,
    /// True when chunks were compressed in streams (codec zstd-stream).
    pub compress_stream: bool,
    /// Connections the session was striped over at its end (1: one connection).
    pub streams: u16,
    /// Connections at the start (`--streams auto` may add some during the run).
    pub streams_at_start: u16,
    /// Bytes written to each connection (TLS records included), the first one first.
    pub stream_bytes: Vec<u64>,
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

/// Run a replication over an established socket to a target.
pub fn replicate(
    sock: Link,
    peer: &str,
    auth: Arc<dyn Authenticator>,
    cfg: &ReplicateConfig,
    obs: &dyn Observer,
) -> Result<JobReport> {
    replicate_striped(sock, peer, auth, cfg, obs, None)
}

/// Run a replication over an established socket to a target, striped as `streams.0`
/// plans (more than one connection, or `auto` growing), the others opened with
/// `streams.1` (stripe.rs).
pub fn replicate_striped(
    sock: Link,
    peer: &str,
    auth: Arc<dyn Authenticator>,
    cfg: &ReplicateConfig,
    obs: &dyn Observer,
    streams: Option<(StreamPlan, Arc<Dial>)>,
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
        let sd = match &d.cbt {
            Some(ChangeSource::QemuBitmap(b)) => open_bitmap_source(d, b)?,
            _ => SourceDisk::open(&d.name, &d.path, cfg.direct_io)?,
        };
        let cbt = match &d.cbt {
            None => None,
            Some(ChangeSource::QemuBitmap(b)) => Some(sd.dirty_map(b)?),
            Some(ChangeSource::File(p)) => {
                let content =
                    std::fs::read(p).map_err(|source| MoveError::ChangeListUnreadable { path: p.clone(), source })?;
                let label = p.display().to_string();
                let bad = |e| MoveError::ChangeList { disk: d.name.clone(), source: Box::new(e) };
                Some(parse_cbt(&label, &content, sd.size).map_err(bad)?)
            }
            Some(ChangeSource::Extents(map)) => Some(check_extents(&d.name, map, sd.size)?),
        };
        if d.mode == Some(Mode::Cbt) && cbt.is_none() {
            return Err(MoveError::Usage(format!("disk {:?}: --mode cbt needs a change list (--cbt)", d.name)));
        }
        opened.push((sd, d, cbt));
    }
    let killer = sock.sock().try_clone().ok();
    let (conn, rx, peer_info) = client_handshake(sock, peer, auth.clone())?;
    conn.set_write_timeout(Some(Duration::from_secs(120)));
    let stripe =
        streams.map(|(plan, dial)| job::StripePlan { plan, dial, auth, features: peer_info.features, sock: killer });
    let stream = peer_info.features & ferry_wire::FEATURE_ZSTD_STREAM != 0;
    let result = run_job(&conn, rx, opened, cfg, obs, start, job::PeerPlan { zstd_stream: stream, stripe });
    if let Err(e) = &result {
        if !matches!(e, MoveError::Wire { source: ferry_wire::WireError::Remote { .. }, .. }) {
            conn.send_error(e.code(), &e.detail());
        }
    }
    conn.shutdown();
    result
}

/// Open disk `d` whose changes are its NBD export's dirty bitmap `bitmap`.
fn open_bitmap_source(d: &DiskSpec, bitmap: &str) -> Result<SourceDisk> {
    if bitmap.is_empty() {
        return Err(MoveError::Usage(format!("disk {:?}: qemu-bitmap: needs a bitmap name", d.name)));
    }
    match d.path.to_str().filter(|p| is_nbd_uri(p)) {
        Some(uri) => SourceDisk::open_nbd(&d.name, uri, Some(bitmap)),
        None => Err(MoveError::Usage(format!(
            "disk {:?}: qemu-bitmap CBT needs an NBD source (--source {}=nbd+unix:///EXPORT?socket=PATH \
             or nbd://HOST:PORT/EXPORT), not {}",
            d.name,
            d.name,
            d.path.display()
        ))),
    }
}

/// Changed extents given in memory, checked as a change list is: every one inside the disk.
fn check_extents(disk: &str, map: &ChangeMap, disk_size: u64) -> Result<ChangeMap> {
    match map.extents().iter().enumerate().find(|(_, e)| e.end() > disk_size) {
        None => Ok(map.clone()),
        Some((entry, e)) => Err(MoveError::ChangeList {
            disk: disk.to_string(),
            source: Box::new(PlanError::ExtentBeyondDisk {
                label: "changed extents".into(),
                entry,
                offset: e.offset,
                length: e.len,
                disk_size,
            }),
        }),
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
pub fn replica_info(sock: Link, peer: &str, auth: Arc<dyn Authenticator>, replica: &str) -> Result<ReplicaInfo> {
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
    use ferry_planner::Extent;

    #[test]
    fn extents_given_in_memory_must_lie_inside_the_disk() {
        let map = ChangeMap::from_extents([Extent::new(0, 10), Extent::new(100, 28)]);
        assert_eq!(check_extents("d", &map, 128).unwrap(), map);
        let e = check_extents("d", &map, 127).unwrap_err();
        assert!(matches!(e, MoveError::ChangeList { ref disk, .. } if disk == "d"), "{e:?}");
        assert_eq!(
            std::error::Error::source(&e).unwrap().to_string(),
            "changed extents: entry 1: extent at offset 100 with length 28 ends beyond the disk (127 bytes): map \
             made for another disk?"
        );
    }
}
