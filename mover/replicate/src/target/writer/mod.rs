//! The writer thread: the one stage that changes a replica's images.
//!
//! It takes verified chunks, zero runs, intents, barriers and the commit
//! ([`WriterMsg`]) and writes them through the IO backend (an export's writes
//! on its own NBD connection), never overwriting a chunk of the latest point
//! before its old contents are durable in the undo file ([`undo`]), and makes
//! everything durable at barriers and the commit ([`barrier`]). It never
//! touches the socket: a durable checkpoint, a digest map it answers and its
//! own failure go to the connection's sending thread as [`Outgoing`] events.

mod barrier;
#[cfg(test)]
mod tests;
mod undo;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::digest_map::{rebuild_unknown, send_digest_map, MapSent};
use super::sender::Outgoing;
use super::session::Counters;
use crate::error::{MoveError, Result};
use crate::stats::{Stage, StageStats};
use ferry_datastore::digests::{DigestMap, ZeroDigests};
use ferry_datastore::image::ReplicaImage;
use ferry_datastore::store::UndoExtent;
use ferry_datastore::store::{PointDisk, Replica, SessionDisk, SessionState};
use ferry_datastore::undo::UndoWriter;
use ferry_io::{BufPool, IoBackend, IoCompletion, IoKind, IoRequest, PoolBuf, ALIGN};
use ferry_nbd::NbdBackend;

use undo::{old_contents, save_old_now, skip_presave, OldContents, OldRead, Syncing, PRESAVE_RUNS_MAX};

/// What the Commit gives the catalog: the new point's disks (sorted by name), and the
/// undo files of the point before it as they now stand, by disk (the catalog records
/// them, for `points verify` and readers to check the files against).
pub(in crate::target) type PointMade = (Vec<PointDisk>, Vec<(String, UndoExtent)>);

/// A disk as the writer holds it.
pub(in crate::target) struct WDisk {
    pub(in crate::target) name: String,
    pub(in crate::target) image: ReplicaImage,
    /// The file image opened with O_DIRECT, for aligned chunk writes.
    pub(in crate::target) direct: Option<File>,
    /// The pipelined write backend of an image behind an NBD export.
    pub(in crate::target) nbd: Option<NbdBackend>,
    pub(in crate::target) size: u64,
    pub(in crate::target) chunk_size: u32,
    pub(in crate::target) digests: DigestMap,
    pub(in crate::target) zeros: ZeroDigests,
    pub(in crate::target) digests_path: std::path::PathBuf,
    pub(in crate::target) dirty: bool,
    pub(in crate::target) entry: SessionDisk,
    /// Old contents of overwritten chunks go here first (replicas with a point that has this disk).
    pub(in crate::target) undo: Option<UndoWriter>,
    /// Size of the disk at the latest point (what the undo file restores).
    pub(in crate::target) point_size: u64,
    /// Chunks the source announced (Intent) and whose old contents are not saved yet:
    /// runs `start..end`, in order. Saved ahead of their data; data overtakes them.
    pub(in crate::target) presave: VecDeque<(u64, u64)>,
}

/// What the writer is told, in the order the source sent it (chunks: in the order their
/// verification finished; `seq` numbers them as dispatched).
pub(in crate::target) enum WriterMsg {
    /// A disk the session thread opened: its entry in session.json, which every checkpoint
    /// rewrites (the disk itself may come much later, with its first item).
    SessionDisk(String, SessionDisk),
    /// A disk the session thread hands over (before its first item).
    OpenDisk(u32, Box<WDisk>),
    /// A verified chunk, item `seq`.
    Chunk { seq: u64, disk: u32, chunk: u64, buf: PoolBuf, digest: [u8; 32] },
    /// A ZeroRun, item `seq`.
    Zero { seq: u64, disk: u32, first: u64, count: u64 },
    /// A Flush: once every item below `items_before` is written, make the disk durable
    /// up to `next_chunk` and report the checkpoint.
    Barrier { disk: u32, next_chunk: u64, items_before: u64 },
    /// Answer a DigestMapRequest (the source's cached map has hash `cached`).
    SendDigests { disk: u32, cached: [u8; 32], reply: Sender<Result<MapSent>> },
    /// The Commit: once every item below `items_before` is written, make every disk
    /// durable and reply with the point's disks.
    Commit { items_before: u64, reply: Sender<Result<PointMade>> },
    /// The source is about to send these chunks (runs `start..end`, increasing).
    Intent { disk: u32, runs: Vec<(u64, u64)> },
    /// A verify worker refused a chunk: the session fails.
    Failed(MoveError),
    /// The session ends: finish what was sent, then stop.
    Stop,
}

/// The writer: the IO pipeline of one session (see the module doc).
pub(in crate::target) struct Writer {
    backend: Box<dyn IoBackend>,
    disks: HashMap<u32, WDisk>,
    /// Items (Data, ZeroRun) done: every item with a sequence number below this one.
    written: u64,
    /// Items done out of order, above `written` (workers and zero runs overtake each other).
    done: BTreeSet<u64>,
    /// Per write (in flight or queued), by tag: its item's sequence number, chunk and
    /// digest. The digest map takes the digest when the write completes, so a map stored
    /// at a checkpoint never claims contents that neither the image nor an undo record holds.
    seq_of: HashMap<u64, (u64, u64, [u8; 32])>,
    /// The session is ending: Checkpoints are still made durable, but may find no one to tell.
    stopping: bool,
    barriers: VecDeque<WriterMsg>,
    replica: Arc<Replica>,
    state: SessionState,
    /// To the sending thread: checkpoints, digest maps, this writer's failure.
    events: Sender<Outgoing>,
    /// Where this writer's error goes, typed, for the session to report.
    failed: Arc<Mutex<Option<MoveError>>>,
    counters: Arc<Counters>,
    stats: StageStats,
    /// Start times of the operations in flight by tag, for latency.
    started: HashMap<u64, Instant>,
    next_tag: u64,
    /// Buffers for reading the old contents that undo files keep (not the session's
    /// pool: the writer must never wait for a buffer a verify worker holds).
    old_pool: BufPool,
    /// Small buffers that travel with Sync operations (the backend moves a buffer with each).
    token_pool: BufPool,
    /// Writes waiting for a buffer or an IO slot to read their chunk's old contents.
    need_old: VecDeque<OldRead>,
    /// Old-content reads in flight, by tag.
    old_reads: HashMap<u64, OldRead>,
    /// Writes whose undo records are appended but not known durable.
    held: Vec<IoRequest>,
    /// The undo fdatasyncs in flight (one round at a time: group commit) and the writes they release.
    syncing: Option<Syncing>,
    /// Writes free to go (no undo record needed, or theirs is durable).
    ready: VecDeque<IoRequest>,
    /// Old-content reads in flight for announced chunks (no write waits on them).
    presave_reads: usize,
    /// Reused buffer for reading old contents.
    old: Vec<u8>,
}

impl Writer {
    /// A writer for a session of `replica` (its state as of now), `depth` operations in flight
    /// on `backend`, chunks of `chunk_size` bytes; what the source must hear goes to `events`.
    pub(in crate::target) fn new(
        backend: Box<dyn IoBackend>,
        replica: Arc<Replica>,
        state: SessionState,
        events: Sender<Outgoing>,
        failed: Arc<Mutex<Option<MoveError>>>,
        counters: Arc<Counters>,
        chunk_size: u32,
    ) -> Writer {
        let depth = backend.depth();
        Writer {
            backend,
            disks: HashMap::new(),
            written: 0,
            done: BTreeSet::new(),
            seq_of: HashMap::new(),
            stopping: false,
            barriers: VecDeque::new(),
            replica,
            state,
            events,
            failed,
            counters,
            stats: StageStats::default(),
            started: HashMap::new(),
            next_tag: 0,
            old_pool: BufPool::new(depth, chunk_size as usize),
            token_pool: BufPool::new(depth, ALIGN),
            need_old: VecDeque::new(),
            old_reads: HashMap::new(),
            presave_reads: 0,
            held: Vec::new(),
            syncing: None,
            ready: VecDeque::new(),
            old: Vec::new(),
        }
    }

    /// The writer thread's body: run until Stop (or the session's channels close). A failure
    /// is recorded for the session, then goes to the sending thread as
    /// [`Outgoing::WriterFailed`] (it tells the peer and shuts the socket down); every buffer
    /// is given back before this returns.
    pub(in crate::target) fn serve(mut self, rx: Receiver<WriterMsg>) -> StageStats {
        if let Err(e) = self.run(&rx) {
            // Recorded before the peer hears of it: the session thread may see the peer hang
            // up next and must report this error, not the hang-up.
            let (code, message) = (e.code(), e.detail());
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            let _ = self.events.send(Outgoing::WriterFailed { code, message });
            // Give back every pool buffer: verified chunks queued for this writer (and
            // writes queued in it) own buffers that a verify worker may be waiting for.
            // Without this the workers never end, the session never ends, and the
            // replica stays locked until the server restarts.
            self.barriers.clear();
            self.drain();
            for m in rx.iter() {
                if matches!(m, WriterMsg::Stop) {
                    break;
                }
            }
        }
        self.drain();
        self.stats
    }

    /// The message loop: move the IO pipeline on, run the barriers it allows, take the next
    /// message when there is room for it (else wait for an operation to complete).
    fn run(&mut self, rx: &Receiver<WriterMsg>) -> Result<()> {
        loop {
            self.pump(rx.is_empty())?;
            self.run_barriers()?;
            let busy = self.in_flight();
            let msg = if busy >= self.backend.depth() {
                None
            } else if busy > 0 || self.queued() {
                rx.try_recv().ok()
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return Ok(()),
                }
            };
            let Some(msg) = msg else {
                // Nothing new: wait for an operation (with none in flight, pump moves the queues).
                if self.in_flight() > 0 {
                    self.complete_one()?;
                }
                continue;
            };
            match msg {
                WriterMsg::Stop => return self.stop(),
                WriterMsg::Failed(e) => return Err(self.named(e)),
                WriterMsg::SessionDisk(name, entry) => {
                    self.state.disks.insert(name, entry);
                }
                WriterMsg::OpenDisk(id, d) => {
                    self.disks.insert(id, *d);
                }
                WriterMsg::Chunk { seq, disk, chunk, buf, digest } => self.chunk(seq, disk, chunk, buf, digest)?,
                WriterMsg::Zero { seq, disk, first, count } => self.zero_run(seq, disk, first, count)?,
                WriterMsg::SendDigests { disk, cached, reply } => {
                    let sent = self.send_digests(disk, &cached)?;
                    let _ = reply.send(sent);
                }
                WriterMsg::Intent { disk, runs } => self.intent(disk, runs),
                b @ (WriterMsg::Barrier { .. } | WriterMsg::Commit { .. }) => self.barriers.push_back(b),
            }
        }
    }

    /// The session is ending: everything the source sent is here. Finish its writes and run
    /// its Flushes, so that a resume starts from the last Flush received rather than from the
    /// last one this writer had caught up with. Nobody may be listening for those Checkpoints
    /// any more; their state is durable first.
    fn stop(&mut self) -> Result<()> {
        self.stopping = true;
        for d in self.disks.values_mut() {
            d.presave.clear();
        }
        loop {
            self.pump(true)?;
            if self.in_flight() == 0 {
                break;
            }
            self.complete_one()?;
        }
        self.run_barriers()
    }

    /// A verify worker's error, its disk named (workers know only the disk's number).
    fn named(&self, e: MoveError) -> MoveError {
        match e {
            MoveError::DigestMismatch { disk, chunk } => {
                MoveError::DigestMismatch { disk: self.disk_name(&disk), chunk }
            }
            other => other,
        }
    }

    /// A verified chunk: queue its write behind whatever the latest point needs first
    /// (nothing, a durable record, or its old contents read and saved).
    fn chunk(&mut self, seq: u64, disk: u32, chunk: u64, buf: PoolBuf, digest: [u8; 32]) -> Result<()> {
        let d = self.disks.get_mut(&disk).ok_or_else(|| MoveError::Internal(format!("no disk {disk}")))?;
        if d.digests.get(chunk) == Some(digest) {
            // The replica already holds these bytes: nothing to write, nothing to undo.
            self.item_done(seq);
            return Ok(());
        }
        // Data travels in increasing chunk order: announced chunks up to this
        // one are saved (below) or were never sent.
        skip_presave(d, chunk + 1);
        let offset = chunk * u64::from(d.chunk_size);
        let len = buf.len();
        let fd = match &d.direct {
            Some(f) if len % ALIGN == 0 => f.as_raw_fd(),
            _ => d.image.raw_fd(),
        };
        let mut old = old_contents(d, chunk, d.digests.get(chunk))?;
        if let (OldContents::Read(n), true) = (&old, d.nbd.is_some()) {
            // An export is read on its connection, here; files are read through the backend.
            save_old_now(d, chunk, *n, &mut self.old)?;
            old = OldContents::Appended;
        }
        d.entry.chunks_changed += 1;
        d.entry.bytes_changed += len as u64;
        let req = IoRequest { tag: self.tag(disk), fd, offset, len, kind: IoKind::Write, buf };
        self.seq_of.insert(req.tag, (seq, chunk, digest));
        match old {
            OldContents::NotNeeded => self.ready.push_back(req),
            OldContents::Appended => self.held.push(req),
            OldContents::Read(len) => self.need_old.push_back(OldRead { disk, chunk, len, write: Some(req) }),
        }
        Ok(())
    }

    /// A zero run, here and now: old contents saved and synced, then a hole punched (a
    /// file) or WRITE_ZEROES (an export).
    fn zero_run(&mut self, seq: u64, disk: u32, first: u64, count: u64) -> Result<()> {
        let t = Instant::now();
        let d = self.disks.get_mut(&disk).ok_or_else(|| MoveError::Internal(format!("no disk {disk}")))?;
        skip_presave(d, first + count);
        let cs = u64::from(d.chunk_size);
        let offset = first * cs;
        let end = ((first + count) * cs).min(d.size);
        let mut changed = 0;
        for c in first..first + count {
            let old_digest = d.digests.get(c);
            if old_digest != Some(d.zeros.digest(d.digests.chunk_len(c))) {
                if let OldContents::Read(n) = old_contents(d, c, old_digest)? {
                    save_old_now(d, c, n, &mut self.old)?;
                }
                changed += 1;
            }
        }
        self.counters.chunks_zero.fetch_add(count, Ordering::Relaxed);
        if changed == 0 {
            self.item_done(seq);
            return Ok(());
        }
        if let Some(u) = &mut d.undo {
            u.sync()?;
        }
        // A hole in a file; WRITE_ZEROES (may deallocate) on an export.
        d.image.zero(offset, end - offset)?;
        for c in first..first + count {
            let len = (d.size - c * cs).min(cs) as u32;
            d.digests.set(c, d.zeros.digest(len));
        }
        d.dirty = true;
        d.entry.chunks_changed += changed;
        d.entry.bytes_changed += end - offset;
        self.item_done(seq);
        self.stats.record(Stage::Write, t.elapsed());
        Ok(())
    }

    /// Answer a DigestMapRequest for a disk this writer holds already (the session thread
    /// answers those of disks it has not handed over yet): the map's frames go to the
    /// sending thread in order, after whatever this writer sent before.
    fn send_digests(&mut self, disk: u32, cached: &[u8; 32]) -> Result<Result<MapSent>> {
        let Some(d) = self.disks.get_mut(&disk) else {
            return Ok(Err(MoveError::Internal(format!("no disk {disk}"))));
        };
        if d.digests.unknown_count() > 0 {
            let t = Instant::now();
            rebuild_unknown(&d.image, &mut d.digests)?;
            d.dirty = true;
            self.stats.record(Stage::Verify, t.elapsed());
        }
        Ok(send_digest_map(&self.events, disk, &d.digests, cached))
    }

    /// Chunks the source announced: queue them for saving ahead. Only a file image with a
    /// point to protect is worth it; an export's old contents are read on its connection,
    /// one at a time, with the data.
    fn intent(&mut self, disk: u32, runs: Vec<(u64, u64)>) {
        let Some(d) = self.disks.get_mut(&disk) else { return };
        if d.undo.is_none() || d.nbd.is_some() || self.stopping {
            return;
        }
        let point_chunks = d.point_size.div_ceil(u64::from(d.chunk_size));
        for (start, end) in runs {
            let end = end.min(point_chunks);
            if start < end && d.presave.len() < PRESAVE_RUNS_MAX {
                d.presave.push_back((start, end));
            }
        }
    }
    fn item_done(&mut self, seq: u64) {
        self.done.insert(seq);
        while self.done.remove(&self.written) {
            self.written += 1;
        }
    }

    /// Writes, old-content reads or undo syncs waiting in the writer's queues.
    fn queued(&self) -> bool {
        !self.ready.is_empty() || !self.need_old.is_empty() || !self.held.is_empty()
    }

    /// Submit the read of a chunk's old contents into `buf` (the backend has room).
    fn read_old(&mut self, o: OldRead, mut buf: PoolBuf) -> Result<()> {
        let d = self.disks.get(&o.disk).ok_or_else(|| MoveError::Internal(format!("no disk {}", o.disk)))?;
        let (offset, fd) = (o.chunk * u64::from(d.chunk_size), d.image.raw_fd());
        buf.set_len(0);
        let tag = self.tag(o.disk);
        let req = IoRequest { tag, fd, offset, len: o.len, kind: IoKind::Read, buf };
        self.started.insert(tag, Instant::now());
        if let Err(e) = self.backend.submit(req) {
            return Err(MoveError::DiskIo {
                what: "reading old contents of",
                disk: self.disk_of(tag),
                offset,
                len: o.len,
                source: e,
            });
        }
        self.old_reads.insert(tag, o);
        Ok(())
    }

    /// Writes in flight on the file backend and on every disk's NBD connection.
    fn in_flight(&self) -> usize {
        self.backend.in_flight()
            + self.disks.values().filter_map(|d| d.nbd.as_ref()).map(|b| b.in_flight()).sum::<usize>()
    }

    /// Submit a write (the caller checked its backend has room).
    fn submit(&mut self, req: IoRequest) -> Result<()> {
        let (offset, len, tag) = (req.offset, req.len, req.tag);
        self.started.insert(tag, Instant::now());
        let submitted = match self.disks.get_mut(&((tag >> 48) as u32)) {
            // A disk behind an NBD export writes on its own connection; files share the IO backend.
            Some(WDisk { nbd: Some(b), .. }) => b.submit(req),
            _ => self.backend.submit(req),
        };
        submitted.map_err(|e| self.write_error(tag, offset, len, e))
    }

    /// A failed write of the operation `tag`, named after its disk (and export).
    fn write_error(&self, tag: u64, offset: u64, len: usize, e: std::io::Error) -> MoveError {
        match self.disks.get(&((tag >> 48) as u32)) {
            Some(d) => d.image.write_error(offset, len, e).into(),
            None => MoveError::DiskIo { what: "writing", disk: String::new(), offset, len, source: e },
        }
    }

    /// A new operation tag: the disk in the top 16 bits, a counter below.
    fn tag(&mut self, disk: u32) -> u64 {
        self.next_tag += 1;
        (u64::from(disk) << 48) | (self.next_tag & ((1 << 48) - 1))
    }

    /// Name of the disk an operation (by tag) is for.
    fn disk_of(&self, tag: u64) -> String {
        self.disks.get(&((tag >> 48) as u32)).map_or_else(String::new, |d| d.name.clone())
    }

    fn disk_name(&self, label: &str) -> String {
        label
            .strip_prefix('#')
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(|id| self.disks.get(&id))
            .map_or_else(|| label.to_string(), |d| d.name.clone())
    }

    /// Wait for one operation and move on what it finished: on the file backend when it has
    /// operations in flight, else on the connection of an NBD disk with writes in flight.
    fn complete_one(&mut self) -> Result<()> {
        let nbd_disk = if self.backend.in_flight() > 0 {
            None
        } else {
            self.disks.iter().find(|(_, d)| d.nbd.as_ref().is_some_and(|b| b.in_flight() > 0)).map(|(&id, _)| id)
        };
        let c: IoCompletion = match nbd_disk {
            Some(id) => {
                let d = self.disks.get_mut(&id).expect("found above");
                let b = d.nbd.as_mut().expect("an NBD disk");
                b.wait().map_err(|e| d.image.write_error(0, 0, e))?
            }
            None => {
                self.backend.wait().map_err(|e| MoveError::Backend { side: "target", opening: false, source: e })?
            }
        };
        let stage = match c.kind {
            IoKind::Write => Stage::Write,
            IoKind::Read => Stage::Read,
            IoKind::Sync => Stage::Sync,
        };
        if let Some(t) = self.started.remove(&c.tag) {
            self.stats.record(stage, t.elapsed());
        }
        match c.kind {
            IoKind::Write => self.write_done(c),
            IoKind::Read => self.old_read_done(c),
            IoKind::Sync => self.sync_done(c),
        }
    }

    /// A chunk write completed: the digest map takes the chunk's new digest, its item is done.
    fn write_done(&mut self, c: IoCompletion) -> Result<()> {
        if let Err(e) = c.result {
            return Err(self.write_error(c.tag, c.offset, c.len, e));
        }
        if let Some((seq, chunk, digest)) = self.seq_of.remove(&c.tag) {
            if let Some(d) = self.disks.get_mut(&((c.tag >> 48) as u32)) {
                d.digests.set(chunk, digest);
                d.dirty = true;
            }
            self.item_done(seq);
        }
        self.counters.chunks_written.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_written.fetch_add(c.len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Give up: drop every queued write and wait for the operations in flight
    /// (their buffers may only go back once the kernel is done with them).
    fn drain(&mut self) {
        self.held.clear();
        self.ready.clear();
        self.need_old.clear();
        for d in self.disks.values_mut() {
            d.presave.clear();
        }
        self.syncing = None;
        while self.backend.in_flight() > 0 {
            if self.backend.wait().is_err() {
                break;
            }
        }
        for b in self.disks.values_mut().filter_map(|d| d.nbd.as_mut()) {
            // A lost connection fails each write in flight once: this ends.
            while b.in_flight() > 0 {
                if b.wait().is_err() {
                    break;
                }
            }
        }
        self.old_reads.clear();
        self.presave_reads = 0;
    }
}
