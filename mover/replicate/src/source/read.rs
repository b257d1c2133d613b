//! The reader: reads each disk's planned chunks, a span of chunks per read,
//! through the IO backend (files) or the disk's NBD connection, and hands
//! them to the workers in sequence order (a read that completes early waits
//! for the ones before it: each worker then compresses its chunks in the order
//! the sender sends them, which a compression stream needs, see `zstream.rs`). Holes (SEEK_HOLE of a file,
//! `base:allocation` of an export) are not read and not walked: a run of
//! planned chunks inside a hole goes on as one [`Work::Holes`] item, whatever
//! its length, so a thin disk costs what its data costs. A file's planned
//! chunks are advised to the kernel ahead of the reads.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::Sender;
use ferry_io::{open_backend, BackendChoice, BufPool, IoBackend, IoKind, IoRequest, PoolBuf, ALIGN};
use ferry_planner::ChunkSet;

use super::ReplicateConfig;
use crate::error::{MoveError, Result};
use crate::stats::{Stage, StageStats};

/// The read side's buffer pools and IO backend. They are built on a thread of their own
/// while the disks are opened and planned: registering a pool with io_uring touches each
/// of its pages, milliseconds that would otherwise delay the first read.
pub(super) struct ReadSide {
    pub(super) read_pool: BufPool,
    pub(super) out_pool: BufPool,
    /// Chunks per read, reads in flight and workers.
    pub(super) span: u64,
    pub(super) depth: usize,
    pub(super) workers: usize,
    pub(super) backend: std::result::Result<(Box<dyn IoBackend>, Option<String>), std::io::Error>,
}

impl ReadSide {
    /// Pools and backend for reads of `span` chunks of `chunk_size` bytes.
    fn new(backend: BackendChoice, workers: usize, depth: usize, chunk_size: u32, span: u64) -> ReadSide {
        let (workers, depth) = (workers.max(1), depth.clamp(1, 256));
        let count = pool_count(depth + workers * 3 + 8, workers * 2 + 4, span * u64::from(chunk_size));
        let read_pool = BufPool::new(count, (span * u64::from(chunk_size)) as usize);
        // One compressed buffer per chunk the read pool can hold: with fewer, chunks
        // waiting to be sent (a slow link) emptied the pool and the workers sent
        // compressible chunks raw (they never wait for it). Bounded: as many bytes
        // as the read pool.
        let out_pool = BufPool::new(count * span as usize, chunk_size as usize);
        let backend = open_backend(backend, &read_pool, depth);
        ReadSide { read_pool, out_pool, span, depth, workers, backend }
    }

    /// Build it on a thread of its own.
    pub(super) fn spawn(cfg: &ReplicateConfig, chunk_size: u32, span: u64) -> std::thread::JoinHandle<ReadSide> {
        let (backend, workers, depth) = (cfg.backend, cfg.workers, cfg.queue_depth);
        std::thread::spawn(move || ReadSide::new(backend, workers, depth, chunk_size, span))
    }
}

/// Bytes a buffer pool holds at most (the source's read pool and its compressed twin, the
/// target's receive pool) unless that leaves fewer than its minimum count of buffers. A
/// pool registered with io_uring is resident whole: sized in chunks alone, 4 MiB chunks
/// (disks of 8 TiB and more) made 120 MiB per pool, and a local run on a thin 15 TiB disk
/// held 265 MiB for 40 MiB of data (issue 20). 48 MiB is 12 reads of 4 MiB in flight.
pub(crate) const POOL_BYTES: u64 = 48 << 20;

/// Buffers of `buf_size` bytes for a pool that wants `wanted`: at most [`POOL_BYTES`] of
/// them, never fewer than `min`. The reader never waits for a buffer with reads in flight,
/// so a pool smaller than the queue depth slows nothing but the depth.
pub(crate) fn pool_count(wanted: usize, min: usize, buf_size: u64) -> usize {
    let cap = (POOL_BYTES / buf_size.max(1)) as usize;
    wanted.min(cap).max(min)
}

/// What the reader reads of one disk.
pub(super) struct ReadPlan {
    pub(super) disk: u32,
    pub(super) name: String,
    pub(super) fd: i32,
    pub(super) size: u64,
    pub(super) ranges: Vec<Range<u64>>,
    /// Chunks not to read (holes of the file or export): they become zero chunks.
    pub(super) holes: ChunkSet,
    /// NBD disks: their own backend (files share the reader's one) ...
    pub(super) nbd: Option<Box<dyn IoBackend>>,
    /// ... and their URI, for messages.
    pub(super) nbd_uri: Option<String>,
    /// A file read through the page cache: its planned chunks are advised ahead ([`Prefetch`]).
    pub(super) prefetch: bool,
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
pub(super) struct RangeCursor {
    /// Index into the ranges, and the next chunk.
    range: usize,
    next: u64,
}

impl RangeCursor {
    /// The next run of at most `max` chunks of `ranges`, if any are left.
    pub(super) fn take(&mut self, ranges: &[Range<u64>], max: u64) -> Option<Range<u64>> {
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

/// What the reader hands the workers, in sequence order.
pub(super) enum Work {
    /// A span of chunks read with one operation.
    Chunk(ReadSpan),
    /// Consecutive planned chunks inside a hole (zeros, not read), one item whatever
    /// their number; the disk is `size` bytes (its last chunk may be short).
    Holes { seq: u64, disk: u32, chunks: Range<u64>, size: u64 },
    /// A disk's last chunk was handed out.
    DiskEnd { seq: u64, disk: u32 },
}

/// `count` consecutive chunks from `chunk` on, read with one operation into
/// one buffer (`expected` bytes); they take the sequence numbers `seq..seq + count`.
pub(super) struct ReadSpan {
    pub(super) seq: u64,
    pub(super) disk: u32,
    pub(super) chunk: u64,
    pub(super) count: u64,
    pub(super) offset: u64,
    pub(super) expected: usize,
    pub(super) buf: PoolBuf,
    pub(super) result: std::io::Result<usize>,
}

/// A read in flight: disk, first chunk, chunks, bytes expected, start time.
type InFlight = (u32, u64, u64, usize, Instant);

/// Work handed downstream in sequence order: an item that is ready before the
/// ones before it (a read completing early) waits here. Bounded by the reads in
/// flight: only their completions can wait.
struct InOrder<'a> {
    tx: &'a Sender<Work>,
    /// The sequence number due next.
    next: u64,
    /// Ready items by sequence number, with the sequence numbers each takes.
    ready: BTreeMap<u64, (Work, u64)>,
}

impl InOrder<'_> {
    /// Hand on `work` (sequence numbers `seq..seq + width`) once all before it went;
    /// false when downstream is gone.
    fn emit(&mut self, seq: u64, width: u64, work: Work) -> bool {
        self.ready.insert(seq, (work, width));
        while let Some(e) = self.ready.first_entry() {
            if *e.key() != self.next {
                break;
            }
            let (work, width) = e.remove();
            self.next += width;
            if self.tx.send(work).is_err() {
                return false;
            }
        }
        true
    }
}

pub(super) fn read_loop(
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
    let mut order = InOrder { tx, next: 0, ready: BTreeMap::new() };
    // Hand one completion downstream; false when downstream is gone.
    let complete = |backend: &mut Box<dyn IoBackend>,
                    plan: &ReadPlan,
                    stats: &mut StageStats,
                    inflight: &mut HashMap<u64, InFlight>,
                    order: &mut InOrder<'_>|
     -> Result<bool> {
        let c = backend.wait().map_err(|e| backend_error(plan, e))?;
        let (disk, chunk, count, expected, t) = inflight.remove(&c.tag).expect("completion of a submitted read");
        stats.record(Stage::Read, t.elapsed());
        let (offset, buf, result) = (c.offset, c.buf, c.result);
        Ok(order.emit(
            c.tag,
            count,
            Work::Chunk(ReadSpan { seq: c.tag, disk, chunk, count, offset, expected, buf, result }),
        ))
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
                let (in_hole, run_end) = hole_run(&plan.holes, chunk, r.end);
                if in_hole {
                    let holes = Work::Holes { seq, disk: plan.disk, chunks: chunk..run_end, size: plan.size };
                    if !order.emit(seq, 1, holes) {
                        return Ok(stats);
                    }
                    seq += 1;
                    chunk = run_end;
                    continue;
                }
                // Up to `span` chunks of this range, stopping before a hole.
                let count = (run_end - chunk).min(span);
                let expected = (plan.size.min((chunk + count) * cs) - offset) as usize;
                prefetch.reading(plan, cs, count);
                while backend.in_flight() >= backend.depth() {
                    if !complete(backend, plan, &mut stats, &mut inflight, &mut order)? {
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
                    if !complete(backend, plan, &mut stats, &mut inflight, &mut order)? {
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
            if !complete(backend, plan, &mut stats, &mut inflight, &mut order)? {
                return Ok(stats);
            }
        }
        if !order.emit(seq, 1, Work::DiskEnd { seq, disk: plan.disk }) {
            return Ok(stats);
        }
        seq += 1;
    }
    Ok(stats)
}

/// Where chunk `chunk` stands against `holes`, up to `end`: whether it is in a hole,
/// and where that hole (or the data before the next hole) ends. A binary search: the
/// reader never walks a hole chunk by chunk.
fn hole_run(holes: &ChunkSet, chunk: u64, end: u64) -> (bool, u64) {
    let ranges = holes.ranges();
    let k = ranges.partition_point(|h| h.end <= chunk);
    match ranges.get(k) {
        Some(h) if h.start <= chunk => (true, h.end.min(end)),
        Some(h) => (false, h.start.min(end)),
        None => (false, end),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn hole_runs_are_found_by_range_not_walked() {
        let holes = ChunkSet::from_ranges([2..5, 10..1_000_000_000]);
        assert_eq!(hole_run(&holes, 0, 100), (false, 2));
        assert_eq!(hole_run(&holes, 2, 100), (true, 5));
        assert_eq!(hole_run(&holes, 3, 4), (true, 4), "cut at the planned range's end");
        assert_eq!(hole_run(&holes, 5, 100), (false, 10));
        assert_eq!(hole_run(&holes, 10, 1 << 40), (true, 1_000_000_000));
        assert_eq!(hole_run(&holes, 1_000_000_000, 1 << 40), (false, 1 << 40));
        assert_eq!(hole_run(&ChunkSet::new(), 7, 9), (false, 9));
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn pools_of_large_chunks_are_bounded_in_bytes() {
        // 16 + 3 x 2 + 8 buffers wanted: 4 MiB chunks get 48 MiB (12), 256 KiB reads keep 30.
        assert_eq!(pool_count(30, 8, 4 << 20), 12);
        assert_eq!(pool_count(30, 8, 256 << 10), 30);
        assert_eq!(pool_count(30, 8, 1 << 20), 30);
        // Never fewer than the minimum the pipeline needs.
        assert_eq!(pool_count(30, 8, 16 << 20), 8);
    }
}
