//! The sender (the job's own thread): takes the workers' answers, puts them
//! back in sequence order, and writes the frames: Data, ZeroRun (consecutive
//! zero chunks coalesced), Intent (a cbt disk's plan ahead of its data), Flush
//! (every `checkpoint_bytes` of a disk, and at its end). It counts what it
//! sends, reports progress, steers `--compress auto` and streams the digest
//! map the target will hold into the map cache.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use ferry_planner::{Digest, ZeroDigests};
use ferry_wire::{Codec, Data, Flush, Frame, ZeroRun};

use super::compress::{AutoCompress, AutoController};
use super::job::JobDisk;
use super::receive::RxMsg;
use super::work::{Done, Outcome};
use super::{CompressPolicy, JobEvent, Observer, ReplicateConfig};
use crate::conn::Conn;
use crate::error::{MoveError, Result};
use crate::map_cache::MapCacheWriter;
use crate::stats::{DiskCounters, Stage, StageStats};

// One pipeline stage: its channels, shared pools and the job's settings.
#[allow(clippy::too_many_arguments)]
pub(super) fn send_loop(
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
        stats: StageStats::default(),
        zero_run: None,
        since_flush: vec![0; n],
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
    Ok((sender.stats, sender.ctl.windows))
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
    conn: &'a Conn,
    disks: &'a mut [JobDisk],
    /// Per disk, the target's digests where the run has them (digest mode, or a verified cbt map).
    target_digests: &'a [Option<&'a [Digest]>],
    cfg: &'a ReplicateConfig,
    cs: u64,
    obs: &'a dyn Observer,
    auto: &'a AutoCompress,
    ctl: AutoController,
    stats: StageStats,
    zero_run: Option<ZeroRun>,
    since_flush: Vec<u64>,
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
        let (disk, chunk) = match done.outcome {
            Outcome::Failed(e) => return Err(e),
            Outcome::Data(data) => self.data(&data, done.compressed)?,
            Outcome::Zero { disk, chunk, len, skipped } => self.zero(disk, chunk, len, skipped)?,
            Outcome::Unchanged { disk, chunk, len, skipped } => self.unchanged(disk, chunk, len, skipped)?,
            Outcome::DiskEnd { disk } => return self.disk_end(disk),
        };
        self.passed(disk, chunk)
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
    fn data(&mut self, data: &Data, compressed: (u64, u64)) -> Result<(u32, u64)> {
        self.flush_zero()?;
        let t = Instant::now();
        let n = emit_data(self.conn, self.cfg.plan_only, data)?;
        self.charge(n);
        let took = t.elapsed();
        self.stats.record(Stage::Send, took);
        self.ctl.sent(n, took);
        let c = &mut self.disks[data.disk as usize].counters;
        c.bytes_sent += n;
        c.chunks_sent += 1;
        c.bytes_read += u64::from(data.logical_len);
        c.bytes_data += u64::from(data.logical_len);
        if data.codec == Codec::Zstd {
            c.bytes_compressed_in += compressed.0;
            c.bytes_compressed_out += compressed.1;
        } else {
            c.bytes_stored += u64::from(data.logical_len);
        }
        let jd = &mut self.disks[data.disk as usize];
        cache_chunk(&mut jd.cache, self.target_digests[data.disk as usize], data.chunk, Some(data.digest));
        Ok((data.disk, data.chunk))
    }

    /// A zero chunk the target does not hold: joins the zero run.
    fn zero(&mut self, disk: u32, chunk: u64, len: u64, skipped: bool) -> Result<(u32, u64)> {
        let jd = &mut self.disks[disk as usize];
        let c = &mut jd.counters;
        count_read(c, len, skipped);
        c.bytes_zero += len;
        c.chunks_zero += 1;
        cache_chunk(&mut jd.cache, self.target_digests[disk as usize], chunk, Some(self.zeros.digest(len as u32)));
        match &mut self.zero_run {
            Some(z) if z.disk == disk && z.first_chunk + z.count == chunk => z.count += 1,
            _ => {
                self.flush_zero()?;
                self.zero_run = Some(ZeroRun { disk, first_chunk: chunk, count: 1 });
            }
        }
        Ok((disk, chunk))
    }

    /// A chunk the target already holds.
    fn unchanged(&mut self, disk: u32, chunk: u64, len: u64, skipped: bool) -> Result<(u32, u64)> {
        self.flush_zero()?;
        let jd = &mut self.disks[disk as usize];
        let c = &mut jd.counters;
        count_read(c, len, skipped);
        c.bytes_unchanged += len;
        c.chunks_unchanged += 1;
        // Unchanged: the target keeps the digest its map has.
        cache_chunk(&mut jd.cache, self.target_digests[disk as usize], chunk, None);
        Ok((disk, chunk))
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
        });
        self.obs.event(&JobEvent::DiskDone(jd.counters.clone()));
        Ok(())
    }

    /// The sender passed planned chunk `chunk` of `disk`: announce the next
    /// window, Flush when a checkpoint is due, steer auto, report progress.
    fn passed(&mut self, disk: u32, chunk: u64) -> Result<()> {
        let (cs, d) = (self.cs, disk as usize);
        let jd = &mut self.disks[d];
        if let Some(intent) = jd.announcer.as_mut().and_then(|a| a.passed(disk, &jd.ranges)) {
            jd.counters.bytes_sent += self.conn.send(&Frame::Intent(intent))?;
        }
        let len = (jd.disk.size - chunk * cs).min(cs);
        self.since_flush[d] += len;
        self.done_bytes[d] += len;
        if self.since_flush[d] >= self.cfg.checkpoint_bytes {
            self.flush_zero()?;
            let n = emit(self.conn, self.cfg.plan_only, &Frame::Flush(Flush { disk, next_chunk: chunk + 1 }))?;
            self.disks[d].counters.bytes_sent += n;
            self.since_flush[d] = 0;
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
            });
        }
        Ok(())
    }
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

/// A chunk of `len` bytes was read, or `skipped` as a hole the server reported.
fn count_read(c: &mut DiskCounters, len: u64, skipped: bool) {
    if skipped {
        c.bytes_hole_skipped += len;
    } else {
        c.bytes_read += len;
    }
}
