//! Barriers: a Flush becomes a checkpoint, the Commit the point's disks.
//!
//! A barrier runs once every item numbered below it is written (verify workers
//! and zero runs finish out of order: a count of items done is not enough). At
//! a checkpoint the image is fdatasynced (an export: FLUSH), the digest map and
//! session.json are replaced atomically, and only then does the sending thread
//! get [`Outgoing::Checkpoint`]: a checkpoint the source sees is durable.

use std::time::Instant;

use super::{PointMade, Writer, WriterMsg};
use crate::error::Result;
use crate::stats::Stage;
use crate::target::sender::Outgoing;
use ferry_datastore::digests;
use ferry_datastore::store::PointDisk;

impl Writer {
    /// Run the barriers at the front of the queue whose items are all written.
    pub(super) fn run_barriers(&mut self) -> Result<()> {
        while let Some(front) = self.barriers.front() {
            let need = match front {
                WriterMsg::Barrier { items_before, .. } | WriterMsg::Commit { items_before, .. } => *items_before,
                _ => 0,
            };
            if self.written < need {
                return Ok(());
            }
            match self.barriers.pop_front().expect("front exists") {
                WriterMsg::Barrier { disk, next_chunk, .. } => self.checkpoint(disk, next_chunk)?,
                WriterMsg::Commit { reply, .. } => {
                    self.stop_saving_ahead()?;
                    let result = self.commit();
                    let failed = result.is_err();
                    let _ = reply.send(result);
                    if failed {
                        // The session thread reports the error it got in the reply.
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A Flush of `disk` up to `next_chunk`, every item before it written: make it durable,
    /// then report the checkpoint.
    fn checkpoint(&mut self, disk: u32, next_chunk: u64) -> Result<()> {
        if let Some(d) = self.disks.get_mut(&disk) {
            d.entry.next_chunk = next_chunk;
            d.entry.undo_durable = d.undo.as_ref().map(|u| u.durable_extent());
            self.state.disks.insert(d.name.clone(), d.entry.clone());
        }
        if matches!(self.barriers.front(), Some(WriterMsg::Commit { .. })) {
            // The Commit right behind makes everything durable and ends the session:
            // a checkpoint here would only cost syncs (a crash before the commit
            // resumes from the previous checkpoint, whose map marks later chunks unknown).
            return Ok(());
        }
        let t = Instant::now();
        self.sync_disk(disk)?;
        self.replica.write_session(&self.state)?;
        self.stats.record(Stage::Sync, t.elapsed());
        // A kill point for tests (FERRY_TEST_STOP_AFTER): an interrupted session, made on purpose.
        ferry_datastore::points::test_step("session: checkpoint durable");
        // Durable whether or not anyone hears of it: the sending thread lives as long as this
        // writer (it drops what it can no longer send).
        let _ = self.events.send(Outgoing::Checkpoint { disk, next_chunk });
        Ok(())
    }

    /// Chunks announced but never sent need no record: stop saving ahead, and
    /// let the reads in flight finish before the undo file belongs to the point.
    fn stop_saving_ahead(&mut self) -> Result<()> {
        for d in self.disks.values_mut() {
            d.presave.clear();
        }
        while self.presave_reads > 0 {
            self.complete_one()?;
        }
        Ok(())
    }

    /// The Commit, every item before it written: make every disk durable, and give the
    /// point's disks (sorted by name) for the catalog.
    fn commit(&mut self) -> Result<PointMade> {
        let t = Instant::now();
        let ids: Vec<u32> = self.disks.keys().copied().collect();
        let mut result = Ok(());
        for id in ids {
            if let Err(e) = self.sync_disk(id) {
                result = Err(e);
                break;
            }
        }
        // The undo files are frozen from here on, and the catalog records their extents: every
        // record must be durable first. Records saved ahead of their data (reads finished by
        // stop_saving_ahead, chunks the source found unchanged) protect no overwritten chunk, so
        // no round had to sync them; a power cut after the catalog would lose them.
        if result.is_ok() {
            for d in self.disks.values_mut() {
                if let Some(u) = &mut d.undo {
                    if let Err(e) = u.sync() {
                        result = Err(e.into());
                        break;
                    }
                }
            }
        }
        self.stats.record(Stage::Sync, t.elapsed());
        result?;
        let mut disks: Vec<PointDisk> = self
            .disks
            .values()
            .map(|d| PointDisk {
                name: d.name.clone(),
                size: d.size,
                chunks_changed: d.entry.chunks_changed,
                bytes_changed: d.entry.bytes_changed,
                undo: None,
            })
            .collect();
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        let undo =
            self.disks.values().filter_map(|d| Some((d.name.clone(), d.undo.as_ref()?.durable_extent()))).collect();
        Ok((disks, undo))
    }

    /// Make a disk's image and digest map durable.
    fn sync_disk(&mut self, disk: u32) -> Result<()> {
        let Some(d) = self.disks.get_mut(&disk) else { return Ok(()) };
        // fdatasync, or NBD_CMD_FLUSH: every write before the barrier has completed.
        d.image.sync()?;
        if d.dirty {
            digests::store(&d.digests_path, &d.digests)?;
            d.dirty = false;
        }
        Ok(())
    }
}
