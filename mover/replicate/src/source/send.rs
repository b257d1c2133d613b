//! The sender (the job's own thread): takes the workers' answers, puts them
//! back in sequence order, and writes the frames: Data, ZeroRun (consecutive
//! zero chunks coalesced), Intent (a cbt disk's plan ahead of its data), Flush
//! (every `checkpoint_bytes` of a disk read, at least every
//! [`CHECKPOINT_INTERVAL`] while a disk moves, and at its end). It counts what
//! it sends, reports progress, steers `--compress auto` and streams the digest
//! map the target will hold into the map cache.
//!
//! Holes come as runs ([`Outcome::Holes`]) and are handled as runs: compared
//! with the target's map (a 32-byte comparison per chunk, no read, no hash),
//! joined to a zero run or counted unchanged in one step. Checkpoints follow
//! the bytes read, not the disk's size: a thin 2 TiB disk holding 40 MiB asks
//! for a few, not 8192 (each one an fdatasync and a `session.json` replaced at
//! the target).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use ferry_planner::{zero_chunk_digest, Digest, DigestMap, ZeroDigests};
use ferry_wire::{Codec, Data, Flush, Frame, ZeroRun};

use super::compress::{AutoCompress, AutoController, LevelBytes, LevelCounts, AUTO_LEVELS};
use super::job::JobDisk;
use super::receive::RxMsg;
use super::stripe::FrameSink;
use super::work::{Done, Outcome};
use super::{CompressPolicy, JobEvent, Observer, ReplicateConfig};
use crate::error::{MoveError, Result};
use crate::map_cache::MapCacheWriter;
use crate::stats::{DiskCounters, Stage, StageStats};

// One pipeline stage: its channels, shared pools and the job's settings.
#[allow(clippy::too_many_arguments)]
pub(super) fn send_loop(
    conn: &dyn FrameSink,
    disks: &mut [JobDisk],
    target_digests: &[Option<&DigestMap>],
    cfg: &ReplicateConfig,
    cs: u64,
    rx: &Receiver<Done>,
    rx_msgs: &Receiver<RxMsg>,
    obs: &dyn Observer,
    auto: &AutoCompress,
    workers: usize,
) -> Result<(StageStats, [u64; AUTO_LEVELS.len()], Vec<LevelBytes>)> {
    let n = disks.len();
    let mut sender = Sender {
        conn,
        disks,
        target_digests,
        cfg,
        cs,
        obs,
        auto,
        ctl: AutoController::new(workers),
        levels: LevelCounts::default(),
        stats: StageStats::default(),
        zero_run: None,
        since_flush: vec![0; n],
        last_flush: vec![Instant::now(); n],
        done_bytes: vec![0; n],
        last_progress: Instant::now(),
        zeros: ZeroDigests::new(cs as u32),
    };
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    for d in rx.iter() {
        pending.insert(d.seq, d);
        while let Some(done) = pending.remove(&next) {
            next += 1;
            check_target(rx_msgs)?;
            sender.take(done)?;
        }
    }
    Ok((sender.stats, sender.ctl.windows, sender.levels.into_vec()))
}

/// The error the target reported, if the receiver got one.
fn check_target(rx_msgs: &Receiver<RxMsg>) -> Result<()> {
    while let Ok(m) = rx_msgs.try_recv() {
        if let RxMsg::Failed(e) = m {
            return Err(e);
        }
    }
    Ok(())
}

/// The sender's state: the disks' counters and caches, the zero run being
/// coalesced, bytes since each disk's last Flush, the auto controller.
struct Sender<'a> {
    /// One connection, or the striper of a session over several (stripe.rs).
    conn: &'a dyn FrameSink,
    disks: &'a mut [JobDisk],
    /// Per disk, the target's digests where the run has them (digest mode, or a verified cbt map).
    target_digests: &'a [Option<&'a DigestMap>],
    cfg: &'a ReplicateConfig,
    cs: u64,
    obs: &'a dyn Observer,
    auto: &'a AutoCompress,
    ctl: AutoController,
    /// Data chunks sent at each level, for the summary.
    levels: LevelCounts,
    stats: StageStats,
    zero_run: Option<ZeroRun>,
    /// Bytes read of each disk since its last Flush, and when that Flush went.
    since_flush: Vec<u64>,
    last_flush: Vec<Instant>,
    done_bytes: Vec<u64>,
    last_progress: Instant,
    zeros: ZeroDigests,
}

impl Sender<'_> {
    /// Charge `n` bytes sent to `--bwlimit` (a plan only sends nothing): waits while the
    /// limit is reached, so the socket carries at most the rate in force.
    fn charge(&self, n: u64) {
        if let (Some(t), false) = (&self.cfg.throttle, self.cfg.plan_only) {
            t.charge(n);
        }
    }

    /// The next answer in sequence order.
    fn take(&mut self, done: Done) -> Result<()> {
        match done.outcome {
            Outcome::Failed(e) => Err(e),
            Outcome::Data(data) => {
                let (disk, chunk) = self.data(&data, done.compressed, done.level)?;
                self.passed(disk, chunk..chunk + 1, u64::from(data.logical_len))
            }
            Outcome::Zero { disk, chunk, len } => {
                self.zero(disk, chunk..chunk + 1, len, false)?;
                self.passed(disk, chunk..chunk + 1, len)
            }
            Outcome::Unchanged { disk, chunk, len } => {
                self.unchanged(disk, chunk..chunk + 1, len, false)?;
                self.passed(disk, chunk..chunk + 1, len)
            }
            Outcome::Holes { disk, chunks, size } => self.holes(disk, chunks, size),
            Outcome::DiskEnd { disk } => self.disk_end(disk),
        }
    }

    /// Planned chunks inside a hole of a disk of `size` bytes: split into runs the
    /// target holds as zeros (unchanged) and runs it does not (a zero run), each
    /// handled in one step.
    fn holes(&mut self, disk: u32, chunks: std::ops::Range<u64>, size: u64) -> Result<()> {
        let (cs, base, full) = (self.cs, self.target_digests[disk as usize], self.zeros.full());
        let len_of = |i: u64| (size - i * cs).min(cs);
        // Whether the target's map says chunk `i` holds zeros (only a short last chunk
        // needs its own zero digest).
        let held = |i: u64| {
            base.and_then(|b| b.get(i))
                .is_some_and(|d| d == if len_of(i) == cs { full } else { zero_chunk_digest(len_of(i) as u32) })
        };
        let mut c = chunks.start;
        while c < chunks.end {
            let unchanged = held(c);
            let mut end = c + 1;
            while end < chunks.end && held(end) == unchanged {
                end += 1;
            }
            let bytes = (end * cs).min(size) - c * cs;
            if unchanged {
                self.unchanged(disk, c..end, bytes, true)?;
            } else {
                self.zero(disk, c..end, bytes, true)?;
            }
            self.passed(disk, c..end, 0)?;
            c = end;
        }
        Ok(())
    }

    /// Send the zero run being coalesced, if any.
    fn flush_zero(&mut self) -> Result<()> {
        if let Some(z) = self.zero_run.take() {
            let t = Instant::now();
            let n = emit(self.conn, self.cfg.plan_only, &Frame::ZeroRun(z.clone()))?;
            self.charge(n);
            self.stats.record(Stage::Send, t.elapsed());
            self.disks[z.disk as usize].counters.bytes_sent += n;
        }
        Ok(())
    }

    /// A chunk to send.
    fn data(&mut self, data: &Data, compressed: (u64, u64), level: i32) -> Result<(u32, u64)> {
        self.flush_zero()?;
        let t = Instant::now();
        let n = emit_data(self.conn, self.cfg.plan_only, data)?;
        self.charge(n);
        let took = t.elapsed();
        self.stats.record(Stage::Send, took);
        self.ctl.sent(n, took);
        self.levels.add(level, u64::from(data.logical_len), data.payload.len() as u64);
        let c = &mut self.disks[data.disk as usize].counters;
        c.bytes_sent += n;
        c.chunks_sent += 1;
        c.bytes_read += u64::from(data.logical_len);
        c.bytes_data += u64::from(data.logical_len);
        if data.codec != Codec::None {
            c.bytes_compressed_in += compressed.0;
            c.bytes_compressed_out += compressed.1;
        } else {
            c.bytes_stored += u64::from(data.logical_len);
        }
        let jd = &mut self.disks[data.disk as usize];
        cache_chunk(&mut jd.cache, self.target_digests[data.disk as usize], data.chunk, Some(data.digest));
        Ok((data.disk, data.chunk))
    }

    /// Zero chunks the target does not hold (`len` bytes in all, `skipped`: a hole,
    /// not read): they join the zero run.
    fn zero(&mut self, disk: u32, chunks: std::ops::Range<u64>, len: u64, skipped: bool) -> Result<()> {
        let jd = &mut self.disks[disk as usize];
        let c = &mut jd.counters;
        count_read(c, len, skipped);
        c.bytes_zero += len;
        c.chunks_zero += chunks.end - chunks.start;
        let base = self.target_digests[disk as usize];
        for i in chunks.clone() {
            let len = (jd.disk.size - i * self.cs).min(self.cs);
            cache_chunk(&mut jd.cache, base, i, Some(self.zeros.digest(len as u32)));
        }
        let count = chunks.end - chunks.start;
        match &mut self.zero_run {
            Some(z) if z.disk == disk && z.first_chunk + z.count == chunks.start => z.count += count,
            _ => {
                self.flush_zero()?;
                self.zero_run = Some(ZeroRun { disk, first_chunk: chunks.start, count });
            }
        }
        Ok(())
    }

    /// Chunks the target already holds (`len` bytes in all; `skipped`: a hole, not read).
    fn unchanged(&mut self, disk: u32, chunks: std::ops::Range<u64>, len: u64, skipped: bool) -> Result<()> {
        self.flush_zero()?;
        let jd = &mut self.disks[disk as usize];
        let c = &mut jd.counters;
        count_read(c, len, skipped);
        c.bytes_unchanged += len;
        c.chunks_unchanged += chunks.end - chunks.start;
        // Unchanged: the target keeps the digest its map has.
        cache_chunk(&mut jd.cache, self.target_digests[disk as usize], chunks.end - 1, None);
        Ok(())
    }

    /// A disk's last chunk went: check its size, Flush it, report it done.
    fn disk_end(&mut self, disk: u32) -> Result<()> {
        self.flush_zero()?;
        let jd = &mut self.disks[disk as usize];
        // The disk must not have changed size under us.
        let now = jd.disk.current_size()?;
        if now != jd.disk.size {
            return Err(MoveError::Resized { disk: jd.disk.name.clone(), before: jd.disk.size, after: now });
        }
        if jd.chunk_count > 0 {
            cache_chunk(&mut jd.cache, self.target_digests[disk as usize], jd.chunk_count - 1, None);
        }
        let n = emit(self.conn, self.cfg.plan_only, &Frame::Flush(Flush { disk, next_chunk: jd.chunk_count }))?;
        jd.counters.bytes_sent += n;
        self.obs.event(&JobEvent::Progress {
            disk: jd.disk.name.clone(),
            done: jd.counters.bytes_planned,
            total: jd.counters.bytes_planned,
            phase: "data",
        });
        self.obs.event(&JobEvent::DiskDone(jd.counters.clone()));
        Ok(())
    }

    /// The sender passed the planned chunks `chunks` of `disk`, `read` bytes of them
    /// read (holes are not): announce the next window, Flush when a checkpoint is due
    /// (every `checkpoint_bytes` read, or [`CHECKPOINT_INTERVAL`] after the last one),
    /// steer auto, report progress.
    fn passed(&mut self, disk: u32, chunks: std::ops::Range<u64>, read: u64) -> Result<()> {
        let (cs, d) = (self.cs, disk as usize);
        let jd = &mut self.disks[d];
        if let Some(a) = jd.announcer.as_mut() {
            for intent in a.passed_many(disk, &jd.ranges, chunks.end - chunks.start) {
                jd.counters.bytes_sent += self.conn.send(&Frame::Intent(intent))?;
            }
        }
        let len = (chunks.end * cs).min(jd.disk.size) - chunks.start * cs;
        self.since_flush[d] += read;
        self.done_bytes[d] += len;
        if self.since_flush[d] >= self.cfg.checkpoint_bytes || self.last_flush[d].elapsed() >= CHECKPOINT_INTERVAL {
            self.flush_zero()?;
            let flush = Frame::Flush(Flush { disk, next_chunk: chunks.end });
            let n = emit(self.conn, self.cfg.plan_only, &flush)?;
            self.disks[d].counters.bytes_sent += n;
            self.since_flush[d] = 0;
            self.last_flush[d] = Instant::now();
        }
        if self.cfg.compress == CompressPolicy::Auto {
            self.ctl.tick(self.auto);
        }
        if self.last_progress.elapsed() >= Duration::from_millis(200) {
            self.last_progress = Instant::now();
            let jd = &self.disks[d];
            self.obs.event(&JobEvent::Progress {
                disk: jd.disk.name.clone(),
                done: self.done_bytes[d],
                total: jd.counters.bytes_planned,
                phase: "data",
            });
        }
        Ok(())
    }
}

/// A disk that moves asks for a checkpoint at least this often, however little it reads:
/// what an interrupted run redoes is bounded in time as well as in bytes.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// Stream the target's digest of every chunk up to `chunk` into a disk's
/// cache file: chunks this run skipped keep the target's digest (`base`),
/// `chunk` gets `digest` (None: the target's, unchanged). Without a base, a
/// skipped chunk's digest is unknown and the map is not cached.
fn cache_chunk(w: &mut Option<MapCacheWriter>, base: Option<&DigestMap>, chunk: u64, digest: Option<Digest>) {
    let Some(w) = w else { return };
    // A writer that gave up (or failed to write) takes no more digests.
    while w.is_open() && w.next_chunk() <= chunk {
        let i = w.next_chunk();
        let d = match (digest, base) {
            (Some(d), _) if i == chunk => d,
            (_, Some(b)) if i < b.chunk_count() => b.get_raw(i),
            _ => {
                w.abandon();
                return;
            }
        };
        w.push(&d);
    }
}

/// Send a frame, or in a plan only count the bytes it would take.
fn emit(conn: &dyn FrameSink, plan_only: bool, f: &Frame) -> Result<u64> {
    if plan_only {
        return Ok(f.to_bytes().len() as u64);
    }
    conn.send(f)
}

/// Send a data frame, or in a plan only count the bytes it would take.
fn emit_data(conn: &dyn FrameSink, plan_only: bool, d: &Data) -> Result<u64> {
    if plan_only {
        return Ok((ferry_wire::HEADER_LEN + ferry_wire::DATA_FIXED_LEN + d.payload.len()) as u64);
    }
    conn.send_data(d)
}

/// A chunk of `len` bytes was read, or `skipped` as a hole the server reported.
fn count_read(c: &mut DiskCounters, len: u64, skipped: bool) {
    if skipped {
        c.bytes_hole_skipped += len;
    } else {
        c.bytes_read += len;
    }
}
