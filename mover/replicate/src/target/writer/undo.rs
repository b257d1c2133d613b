//! Undo records: a chunk of the latest point is overwritten only once its old contents
//! are durable in the point's undo file (DATASTORE.md, "Order of writes"): reads of old
//! contents, appends, and the group-committed fdatasync rounds that release held writes.
//! Chunks the source announced (Intent) are saved ahead of their data.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::time::Instant;

use super::{WDisk, Writer};
use crate::error::{MoveError, Result};
use crate::stats::Stage;
use ferry_io::{IoBackend, IoCompletion, IoKind, IoRequest};

/// Undo records one fdatasync round waits for while more are on their way.
pub(super) const HOLD_MAX: u64 = 32;

/// Announced runs a disk queues for saving ahead, at most (an Intent is advisory:
/// runs beyond this are dropped, and their chunks are saved when their data comes).
pub(super) const PRESAVE_RUNS_MAX: usize = 1 << 16;

/// A read of a chunk's old contents for the undo file: for a chunk write that waits
/// for its record, or ahead of the data (an announced chunk, no write yet).
pub(super) struct OldRead {
    pub(super) disk: u32,
    pub(super) chunk: u64,
    /// Length of the chunk at the latest point.
    pub(super) len: usize,
    pub(super) write: Option<IoRequest>,
}

/// One round of undo fdatasyncs in flight.
pub(super) struct Syncing {
    /// Sync operations not finished yet.
    pub(super) left: usize,
    /// Writes released when all have finished.
    pub(super) writes: Vec<IoRequest>,
    /// Per sync tag: the disk and its undo writer's `appended()` and `end()` when the sync started.
    pub(super) upto: HashMap<u64, (u32, (u64, u64))>,
}

/// What a write needs before it may overwrite its chunk.
pub(super) enum OldContents {
    /// Nothing: no point to protect, beyond the point's size, or saved already.
    NotNeeded,
    /// A record is appended (known zeros); it must become durable.
    Appended,
    /// The old contents must be read (this many bytes) and appended.
    Read(usize),
}

/// What the latest point needs before `chunk` (whose digest was `old_digest`) is overwritten.
pub(super) fn old_contents(d: &mut WDisk, chunk: u64, old_digest: Option<[u8; 32]>) -> Result<OldContents> {
    let Some(u) = &mut d.undo else { return Ok(OldContents::NotNeeded) };
    let cs = u64::from(d.chunk_size);
    let offset = chunk * cs;
    if offset >= d.point_size {
        return Ok(OldContents::NotNeeded);
    }
    if u.saved.contains_key(&chunk) {
        // Saved before (maybe ahead of its data, announced by an Intent): the record may
        // still have to become durable.
        return Ok(if u.is_durable(chunk) { OldContents::NotNeeded } else { OldContents::Appended });
    }
    let len = (d.point_size - offset).min(cs) as u32;
    // The digest map is consistent with the image (chunks a crash may have changed are
    // marked unknown): old zeros need no read.
    let zero = d.zeros.digest(len);
    if old_digest == Some(zero) {
        u.append_zero(chunk, len, zero)?;
        return Ok(OldContents::Appended);
    }
    Ok(OldContents::Read(len as usize))
}

/// Announced chunks below `end` need no saving ahead any more (their data is here).
pub(super) fn skip_presave(d: &mut WDisk, end: u64) {
    while let Some(r) = d.presave.front_mut() {
        if r.1 <= end {
            d.presave.pop_front();
        } else {
            r.0 = r.0.max(end);
            break;
        }
    }
}

/// Read the `len` old bytes of `chunk` here, synchronously (zero runs, disks behind an
/// export), and append them to the undo file ([`old_contents`] said they are needed).
/// The record must be synced before the overwrite.
pub(super) fn save_old_now(d: &mut WDisk, chunk: u64, len: usize, old: &mut Vec<u8>) -> Result<()> {
    let offset = chunk * u64::from(d.chunk_size);
    old.resize(len.max(old.len()), 0);
    d.image.read_exact_at(&mut old[..len], offset, "reading old contents of")?;
    Ok(d.undo.as_mut().expect("old contents are saved for an undo file").append(chunk, &old[..len])?)
}

impl Writer {
    /// Start what may start, without waiting: a round of undo fdatasyncs for the
    /// held writes, the writes that are free to go, then reads of old contents.
    ///
    /// A write is only submitted once the undo record of its chunk's old contents
    /// is durable: read old contents -> append record -> fdatasync the undo file
    /// (one round in flight, covering every record appended before it started)
    /// -> write. The stages overlap, so neither the reads nor the syncs stall the
    /// writes of other chunks.
    pub(super) fn pump(&mut self, idle: bool) -> Result<()> {
        self.start_sync_round(idle)?;
        self.submit_ready()?;
        self.start_old_reads()
    }

    /// Start a round of undo fdatasyncs, if none is in flight and one is due.
    ///
    /// An fdatasync costs about the same whatever it covers (a journal commit and a
    /// device flush), so a round waits for [`HOLD_MAX`] records while more are on
    /// their way (old reads in flight or queued, messages waiting: `idle` is false),
    /// and starts at once when nothing else could join it.
    fn start_sync_round(&mut self, idle: bool) -> Result<()> {
        let depth = self.backend.depth();
        let presave_left = self.disks.values().any(|d| !d.presave.is_empty());
        let more_coming = !idle || !self.need_old.is_empty() || !self.old_reads.is_empty() || presave_left;
        let unsynced: u64 = self.disks.values().filter_map(|d| d.undo.as_ref()).map(|u| u.unsynced()).sum();
        let round_ready = unsynced >= HOLD_MAX || !more_coming || !self.barriers.is_empty() || self.stopping;
        if self.syncing.is_some() || (self.held.is_empty() && unsynced == 0) || !round_ready {
            return Ok(());
        }
        if ferry_datastore::fault::skip_fsync("undo") {
            // The power-loss tests' knob (ferry-datastore `fault`): records count as durable unsynced.
            for d in self.disks.values_mut() {
                if let Some(u) = &mut d.undo {
                    u.sync()?;
                }
            }
            self.ready.extend(self.held.drain(..));
            return Ok(());
        }
        let undo: Vec<(u32, RawFd, (u64, u64))> = self
            .disks
            .iter()
            .filter_map(|(&id, d)| {
                d.undo.as_ref().filter(|u| u.needs_sync()).map(|u| (id, u.raw_fd(), (u.appended(), u.end())))
            })
            .collect();
        if undo.is_empty() {
            // Made durable already (a zero run syncs at once).
            self.ready.extend(self.held.drain(..));
        } else if undo.len() > depth {
            let t = Instant::now();
            for d in self.disks.values_mut() {
                if let Some(u) = &mut d.undo {
                    u.sync()?;
                }
            }
            self.stats.record(Stage::Sync, t.elapsed());
            self.ready.extend(self.held.drain(..));
        } else if self.backend.in_flight() + undo.len() <= depth {
            let mut s = Syncing { left: undo.len(), writes: std::mem::take(&mut self.held), upto: HashMap::new() };
            for (id, fd, upto) in undo {
                let tag = self.tag(id);
                let buf = self.token_pool.try_get().expect("a token per slot");
                let req = IoRequest { tag, fd, offset: 0, len: 0, kind: IoKind::Sync, buf };
                self.started.insert(tag, Instant::now());
                s.upto.insert(tag, (id, upto));
                if let Err(e) = self.backend.submit(req) {
                    let path = self.disks.get(&id).and_then(|d| d.undo.as_ref()).map(|u| u.path().to_path_buf());
                    return Err(MoveError::file("syncing undo file", path.unwrap_or_default(), e));
                }
            }
            self.syncing = Some(s);
        }
        Ok(())
    }

    /// Submit the writes that are free to go: a file's on the IO backend, an export's on
    /// its own connection; none waits.
    fn submit_ready(&mut self) -> Result<()> {
        let depth = self.backend.depth();
        while let Some(req) = self.ready.front() {
            let room = match self.disks.get(&((req.tag >> 48) as u32)).and_then(|d| d.nbd.as_ref()) {
                Some(b) => b.in_flight() < b.depth(),
                None => self.backend.in_flight() < depth,
            };
            if !room {
                break;
            }
            let req = self.ready.pop_front().expect("front exists");
            self.submit(req)?;
        }
        Ok(())
    }

    /// Start reads of old contents: those writes wait for first, then those of announced
    /// chunks, saved ahead of the data with at most half of the operations in flight, so
    /// the data's own reads and writes find room.
    fn start_old_reads(&mut self) -> Result<()> {
        let depth = self.backend.depth();
        while self.backend.in_flight() < depth && !self.need_old.is_empty() {
            let Some(buf) = self.old_pool.try_get() else { break };
            let o = self.need_old.pop_front().expect("not empty");
            self.read_old(o, buf)?;
        }
        while !self.stopping && self.backend.in_flight() < depth && self.presave_reads < depth.div_ceil(2) {
            let Some(id) = self.disks.iter().find(|(_, d)| !d.presave.is_empty()).map(|(&id, _)| id) else { break };
            let Some(buf) = self.old_pool.try_get() else { break };
            let d = self.disks.get_mut(&id).expect("found above");
            let run = d.presave.front_mut().expect("not empty");
            let chunk = run.0;
            run.0 += 1;
            if run.0 >= run.1 {
                d.presave.pop_front();
            }
            // Zero old contents get their record without a read; saved chunks need nothing.
            if let OldContents::Read(len) = old_contents(d, chunk, d.digests.get(chunk))? {
                self.presave_reads += 1;
                self.read_old(OldRead { disk: id, chunk, len, write: None }, buf)?;
            }
        }
        Ok(())
    }

    /// A read of old contents completed: append its undo record; its write (if any) now
    /// waits for the next fdatasync round.
    pub(super) fn old_read_done(&mut self, c: IoCompletion) -> Result<()> {
        let o = self.old_reads.remove(&c.tag).expect("an old-content read in flight");
        if o.write.is_none() {
            self.presave_reads -= 1;
        }
        let short = |n: usize| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("read {n} bytes"));
        let n =
            c.result.and_then(|n| if n < o.len { Err(short(n)) } else { Ok(n) }).map_err(|e| MoveError::DiskIo {
                what: "reading old contents of",
                disk: self.disk_of(c.tag),
                offset: c.offset,
                len: o.len,
                source: e,
            })?;
        let d = self.disks.get_mut(&o.disk).ok_or_else(|| MoveError::Internal(format!("no disk {}", o.disk)))?;
        // A chunk saved meanwhile (its data's own read and this one) keeps its first record.
        let u = d.undo.as_mut().expect("old contents are read for an undo file");
        // The old contents are hashed even where the digest map knows them: an image
        // changed outside ferry (booted in place) no longer matches its map, and its record
        // must hold the real digest, else every reader rejects it. Old zeros the map knows
        // are not read (their record is the point's contents, whatever the image holds now).
        match d.digests.get(o.chunk).filter(|_| d.digests.chunk_len(o.chunk) as usize == n) {
            Some(digest) => {
                if !u.append_checked(o.chunk, &c.buf[..n], digest)? {
                    self.counters.chunks_changed_outside.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            None => u.append(o.chunk, &c.buf[..n])?,
        }
        if let Some(w) = o.write {
            self.held.push(w);
        }
        Ok(())
    }

    /// One fdatasync of the round in flight completed: once all have, the writes the round
    /// held are free to go.
    pub(super) fn sync_done(&mut self, c: IoCompletion) -> Result<()> {
        let s = self.syncing.as_mut().expect("a sync round in flight");
        let (disk, (upto, end)) = s.upto.remove(&c.tag).expect("a sync of this round");
        let u = self.disks.get_mut(&disk).and_then(|d| d.undo.as_mut()).expect("an undo file");
        c.result.map_err(|e| MoveError::file("syncing undo file", u.path(), e))?;
        u.synced_upto(upto, end);
        s.left -= 1;
        if s.left == 0 {
            let s = self.syncing.take().expect("in flight");
            self.ready.extend(s.writes);
        }
        Ok(())
    }
}
