//! OpenDisk in a session that writes: the image opened (and sized), the latest point
//! protected by an undo file, the digest map loaded, session.json naming the disk, and
//! ResumeInfo sent. The disk stays with the session thread (which answers its digest
//! map request) until its first item for the writer.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;

use ferry_wire::{Frame, OpenDisk, ResumeInfo};

use super::session::{start_pipeline, Active, TargetSession};
use super::writer::{WDisk, WriterMsg};
use super::SessionReport;
use crate::error::{MoveError, Result};
use ferry_datastore::digests::{self, DigestMap, ZeroDigests};
use ferry_datastore::image::ReplicaImage;
use ferry_datastore::store::{self as datastore, SessionDisk};
use ferry_datastore::undo::UndoWriter;
use ferry_nbd::NbdBackend;

/// Where a disk stands when it is opened.
struct Standing {
    /// The latest point's id and size of this disk, if it has one.
    point_disk: Option<(u64, u64)>,
    /// The interrupted session's entry for it (same size only).
    resume: Option<SessionDisk>,
    /// Its current size (see [`Standing::of`]).
    existing: u64,
    chunk_count: u64,
    previous_size: u64,
    next_chunk: u64,
    nbd: bool,
}

impl Standing {
    fn of(a: &Active, o: &OpenDisk, image: &ReplicaImage) -> Result<Standing> {
        let nbd = image.nbd_uri().is_some();
        let point_disk =
            a.latest_point.as_ref().and_then(|p| p.disks.iter().find(|d| d.name == o.name).map(|d| (p.id, d.size)));
        let resume = a.state.disks.get(&o.name).filter(|d| d.size == o.size).cloned();
        // The disk's current size: a file's length. An export is larger than the disk it holds:
        // the session's size when resuming, else the latest point's; a disk new to the replica is
        // taken to fill the export up to the source's size, its contents unknown until hashed.
        let existing = match (nbd, &resume, point_disk) {
            (false, _, _) => image.capacity()?,
            (true, Some(_), _) => o.size,
            (true, None, Some((_, psize))) => psize,
            (true, None, None) => o.size,
        };
        let chunk_count = o.size.div_ceil(u64::from(o.chunk_size));
        let (previous_size, next_chunk) = match &resume {
            Some(d) => (d.previous_size, d.next_chunk.min(chunk_count)),
            None => (existing, 0),
        };
        Ok(Standing { point_disk, resume, existing, chunk_count, previous_size, next_chunk, nbd })
    }
}

impl TargetSession<'_> {
    /// OpenDisk: make the disk ready to be written, keep it until its first item, and
    /// answer with ResumeInfo.
    pub(super) fn open_disk(&mut self, o: &OpenDisk, report: &mut SessionReport) -> Result<()> {
        datastore::validate_name("disk", &o.name)?;
        self.admit_disk(o)?;
        let cfg = self.cfg.clone();
        let (events, failed) = (self.events.clone(), self.failed.clone());
        let peer = self.peer().to_string();
        let a = self.active_mut()?;
        if a.disk_names.values().any(|n| n == &o.name) {
            return Err(MoveError::Protocol { peer, what: format!("disk {:?} opened twice in one session", o.name) });
        }
        check_chunk_size(a, o)?;
        let image = ReplicaImage::open_rw(&a.replica, &o.name)?;
        // Nothing is written to a disk that does not fit in its export.
        image.check_fits(o.size)?;
        let st = Standing::of(a, o, &image)?;
        // An export may hold a copy already (a seed): the source compares digests rather than sending all.
        let existed = st.nbd || st.existing > 0 || st.point_disk.is_some();
        let undo = protect_point(a, o, &image, &st)?;
        resize_image(&image, o, &st)?;
        let (digests, zeros, digests_path) = load_map(a, o, &st)?;
        let entry = st.resume.clone().unwrap_or(SessionDisk {
            size: o.size,
            previous_size: st.previous_size,
            next_chunk: 0,
            chunks_changed: 0,
            bytes_changed: 0,
            undo_durable: None,
        });
        a.state.disks.insert(o.name.clone(), entry.clone());
        a.replica.write_session(&a.state)?;
        let told = match &a.pipeline {
            None => {
                let p = start_pipeline(&cfg, o.chunk_size, a.replica.clone(), a.state.clone(), events, failed)?;
                report.backend = p.backend_name.to_string();
                report.warning = p.warning.clone();
                a.pipeline = Some(p);
                true
            }
            // The writer's checkpoints rewrite session.json: it must name this disk too, from
            // now on, not only from the disk's own first checkpoint.
            Some(p) => p.tell(WriterMsg::SessionDisk(o.name.clone(), entry.clone())),
        };
        let direct =
            image.path().and_then(|p| OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(p).ok());
        // Chunk writes to an export are pipelined on its connection: several WRITEs in flight.
        let nbd =
            image.nbd_client().zip(image.nbd_uri()).map(|(c, uri)| NbdBackend::new(c, cfg.depth(o.chunk_size), uri));
        a.disk_names.insert(o.disk, o.name.clone());
        let (point_size, undo) = undo.map_or((0, None), |(size, u)| (size, Some(u)));
        let disk = WDisk {
            name: o.name.clone(),
            image,
            direct,
            nbd,
            size: o.size,
            chunk_size: o.chunk_size,
            digests,
            zeros,
            digests_path,
            dirty: false,
            entry,
            undo,
            point_size,
            presave: VecDeque::new(),
        };
        a.opened.insert(o.disk, Box::new(disk));
        let finished = st.next_chunk == st.chunk_count && st.chunk_count > 0 && a.resumed;
        if !told {
            return Err(self.writer_gone());
        }
        self.send(Frame::ResumeInfo(ResumeInfo {
            disk: o.disk,
            previous_size: st.previous_size,
            next_chunk: st.next_chunk,
            flags: (if existed { ResumeInfo::EXISTED } else { 0 }) | (if finished { ResumeInfo::FINISHED } else { 0 }),
        }))
    }
}

/// A replica takes disks of one chunk size: the first disk's, recorded in replica.json.
fn check_chunk_size(a: &Active, o: &OpenDisk) -> Result<()> {
    let replica_cs = a.replica.settings.chunk_size;
    if replica_cs != 0 && replica_cs != o.chunk_size {
        return Err(MoveError::Usage(format!(
            "replica {:?} uses chunk size {} and cannot take disk {:?} with chunk size {}",
            a.replica.name, replica_cs, o.name, o.chunk_size
        )));
    }
    if replica_cs == 0 {
        let mut s = a.replica.settings.clone();
        s.chunk_size = o.chunk_size;
        datastore::write_atomic(&a.replica.dir, "replica.json", &serde_json::to_vec_pretty(&s).expect("json"))?;
        // The settings are read again by later sessions; this one keeps o.chunk_size.
    }
    Ok(())
}

/// Protect the latest point: old contents go to its undo file before they are overwritten.
/// The chunks a shrink cuts off are saved here and now. Gives the point's size of the disk
/// and the undo writer, when the latest point has this disk.
fn protect_point(a: &Active, o: &OpenDisk, image: &ReplicaImage, st: &Standing) -> Result<Option<(u64, UndoWriter)>> {
    let Some((point_id, psize)) = st.point_disk else { return Ok(None) };
    let durable = st.resume.as_ref().and_then(|r| r.undo_durable);
    let mut u = UndoWriter::open_checked(&a.replica.dir, point_id, &o.name, o.chunk_size, psize, durable)?;
    if o.size < st.existing {
        // Chunks a shrink cuts off (and the new partial last chunk) keep their old contents.
        let cs = u64::from(o.chunk_size);
        let mut buf = vec![0u8; o.chunk_size as usize];
        for c in o.size / cs..psize.div_ceil(cs) {
            if u.saved.contains_key(&c) {
                continue;
            }
            let len = ((psize - c * cs).min(cs)) as usize;
            image.read_exact_at(&mut buf[..len], c * cs, "reading old contents of")?;
            u.append(c, &buf[..len])?;
        }
        u.sync()?;
    }
    Ok(Some((psize, u)))
}

/// Give the image the disk's size (a file), or zero an export past the disk's old end.
fn resize_image(image: &ReplicaImage, o: &OpenDisk, st: &Standing) -> Result<()> {
    if !st.nbd && st.existing != o.size {
        image.resize(st.existing, o.size, false)?;
    } else if st.nbd && st.resume.is_none() && (st.existing != o.size || st.point_disk.is_none()) {
        // A grown range may hold bytes of an older, larger disk; everything past the
        // disk's end reads as zeros, so that the export compares equal to the source.
        // Durable before the session names the disk: a resume does not do it again.
        image.resize(st.existing, o.size, true)?;
        image.sync()?;
    }
    Ok(())
}

/// The disk's digest map as the session starts it: stored, or zeros (a new file), or unknown.
fn load_map(a: &Active, o: &OpenDisk, st: &Standing) -> Result<(DigestMap, ZeroDigests, std::path::PathBuf)> {
    let digests_path = a.replica.digests_path(&o.name)?;
    let zeros = ZeroDigests::new(o.chunk_size);
    // A resumed disk's map was stored at its checkpoints at the session's size; before the
    // first checkpoint (or without a session) it is the latest point's map at the previous size.
    let stored = st
        .resume
        .as_ref()
        .and_then(|_| digests::load(&digests_path, o.chunk_size, o.size))
        .or_else(|| digests::load(&digests_path, o.chunk_size, st.previous_size));
    let mut map = match stored {
        Some(m) => Ok(m),
        // No usable map: a new file is all zeros; an existing one (or any export) is unknown until rebuilt.
        None if st.existing == 0 && !st.nbd => DigestMap::zeroed(o.chunk_size, st.previous_size, &zeros),
        None => DigestMap::new(o.chunk_size, st.previous_size),
    }
    .map_err(|e| MoveError::Usage(e.to_string()))?;
    map.resize(o.size, |l| zeros.digest(l));
    if st.resume.is_some() {
        // Chunks after the last checkpoint may have been written without the map knowing.
        for i in st.next_chunk..st.chunk_count {
            map.mark_unknown(i);
        }
    }
    Ok((map, zeros, digests_path))
}
