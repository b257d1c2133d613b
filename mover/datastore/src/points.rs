//! Restore points: export any point, roll back, prune, verify.
//!
//! The latest point is the images themselves. Point K < latest is the images
//! with the undo files of K, K+1, ... applied; for each chunk the record in
//! the undo file with the lowest point id >= K holds its contents at K, and a
//! chunk in none of them is unchanged since K.
//!
//! # Rollbacks: an intent record, then idempotent steps
//! Both rollbacks (to a point, and of an interrupted session) first make an
//! intent record durable (`rollback.json`, `rollback-session.json`), then
//! change the replica in steps that can all run again, and remove the record
//! last. Killed at any moment, the next
//! `points rollback`, `replicate` or `points prune` finishes the recorded
//! rollback before anything else ([`finish_pending`]); `points export`,
//! `points list` and `points verify`, which do not write, refuse with
//! [`StoreError::RollbackPending`] naming it and the command that finishes it.
//! - To a point: undo files are applied newest first, each fully and durably,
//!   before the catalog drops the newer point; the undo file goes after the
//!   catalog write (applying an undo file twice is harmless).
//! - An interrupted session: `session.json` is renamed to
//!   `rollback-session.json` (the intent: no session resumes it from then on,
//!   and a rename needs no room on a full file system); the latest point's undo
//!   file is applied, disks the session added are removed, then the undo file,
//!   then the intent.
//!
//! # The points lock
//! Exports and verify hold `points.lock` shared while they read; rollbacks and
//! prunes (also the retention run after a commit) take it exclusively, without
//! waiting: a rollback or prune during an export is [`StoreError::Busy`], and a
//! commit leaves retention to the next commit (or `points prune`). A session
//! does not take it: an export reads a consistent point while a session
//! changes the images ([`export_point`]).
//!
//! # Kill points for tests
//! With `FERRY_TEST_STOP_AFTER=N` in the environment, a rollback, prune or
//! export prints each durable step it takes (`ferry test step I: WHAT` on
//! stderr) and exits with code [`TEST_STOP_EXIT`] right after step N, as if
//! killed there (nothing is cleaned up, the page cache keeps what was written).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::digests::{self, DigestMap, ZeroDigests};
use crate::error::{Result, StoreError};
use crate::export::ExportReport;
use crate::image::{Placement, ReplicaImage};
use crate::store::{sync_dir, write_atomic, Catalog, Datastore, Replica, RestorePoint, SessionState};
use crate::undo::{undo_path, RecordLoc, Tail, UndoReader};

/// Exit code of a process stopped by `FERRY_TEST_STOP_AFTER` (see the module doc).
pub const TEST_STOP_EXIT: i32 = 86;

/// One durable step of a rollback, prune or export: with `FERRY_TEST_STOP_AFTER=N`, printed,
/// and the process exits right after step N (a test's kill point).
pub fn test_step(what: &str) {
    static STEPS: AtomicU64 = AtomicU64::new(0);
    let Some(stop) = std::env::var("FERRY_TEST_STOP_AFTER").ok().and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    let n = STEPS.fetch_add(1, Ordering::Relaxed) + 1;
    eprintln!("ferry test step {n}: {what}");
    if n >= stop {
        eprintln!("ferry test: stopped after step {n}");
        std::process::exit(TEST_STOP_EXIT);
    }
}

/// The intent record of a rollback to a point, `rollback.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct RollbackIntent {
    /// The point the replica goes back to.
    to: u64,
}

/// The intent record of a rollback of an interrupted session: its `session.json`, renamed.
/// A rename needs no room for data, so it is made on a full file system too (where a
/// session often stops).
const UNDOING: &str = "rollback-session.json";

/// A rollback recorded and not finished.
enum Intent {
    ToPoint(u64),
    Incomplete(SessionState),
}

/// A rollback recorded (`rollback.json`, `rollback-session.json`) and not finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingRollback {
    /// Back to restore point `to`.
    ToPoint(u64),
    /// Undoing the interrupted session.
    Incomplete,
}

impl PendingRollback {
    /// What it is and the command that finishes it.
    pub fn describe(&self, replica: &str) -> String {
        match self {
            PendingRollback::ToPoint(to) => format!(
                "replica {replica:?} has a rollback to restore point {to} that did not finish (rollback.json); \
                 `ferry points rollback --point {to} --yes` finishes it (so do `ferry replicate` and \
                 `ferry points prune` of the replica)"
            ),
            PendingRollback::Incomplete => format!(
                "replica {replica:?} has a rollback of its interrupted session that did not finish \
                 ({UNDOING}); `ferry points rollback --incomplete --yes` finishes it (so do \
                 `ferry replicate` and `ferry points prune` of the replica)"
            ),
        }
    }
}

fn read_intent(r: &Replica) -> Result<Option<Intent>> {
    let read = |name: &str| -> Result<Option<Vec<u8>>> {
        let path = r.dir.join(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::file("reading", &path, e)),
        }
    };
    let corrupt = |name: &str, e: serde_json::Error| {
        StoreError::Damaged(format!("{} is corrupt ({e}); the datastore needs repair", r.dir.join(name).display()))
    };
    if let Some(b) = read(UNDOING)? {
        return serde_json::from_slice(&b).map(|s| Some(Intent::Incomplete(s))).map_err(|e| corrupt(UNDOING, e));
    }
    match read("rollback.json")? {
        Some(b) => serde_json::from_slice::<RollbackIntent>(&b)
            .map(|i| Some(Intent::ToPoint(i.to)))
            .map_err(|e| corrupt("rollback.json", e)),
        None => Ok(None),
    }
}

/// The rollback recorded and not finished, if any.
pub fn pending_rollback(r: &Replica) -> Result<Option<PendingRollback>> {
    Ok(read_intent(r)?.map(|i| match i {
        Intent::Incomplete(_) => PendingRollback::Incomplete,
        Intent::ToPoint(to) => PendingRollback::ToPoint(to),
    }))
}

/// For commands that only read: refuse while a rollback is pending (its images are half
/// way between two points). Take the points lock shared first: a rollback running now
/// holds it, and its reader gets [`StoreError::Busy`] instead.
pub fn refuse_pending(r: &Replica) -> Result<()> {
    match pending_rollback(r)? {
        Some(p) => Err(StoreError::RollbackPending(p.describe(&r.name))),
        None => Ok(()),
    }
}

fn find_point<'a>(c: &'a Catalog, id: u64, replica: &str) -> Result<&'a RestorePoint> {
    c.points.iter().find(|p| p.id == id).ok_or_else(|| {
        let ids: Vec<String> = c.points.iter().map(|p| p.id.to_string()).collect();
        StoreError::NotFound(format!("replica {replica:?} has no restore point {id} (points: {})", ids.join(", ")))
    })
}

/// The undo file of `disk` for point `p`, which is not the latest (its file is complete):
/// `None` when the disk did not change at the next point. A file the catalog recorded and
/// that is missing, or that does not hold what the catalog recorded, is an error naming it.
fn committed_undo(r: &Replica, p: &RestorePoint, disk: &str) -> Result<Option<UndoReader>> {
    let path = undo_path(&r.dir, p.id, disk);
    let extent = p.disks.iter().find(|d| d.name == disk).and_then(|d| d.undo);
    if !path.exists() {
        return match extent {
            Some(e) if e.bytes > 0 => Err(StoreError::Damaged(format!(
                "undo file {} is missing (the catalog recorded {} records in {} bytes): restore point {} and \
                 older cannot be rebuilt",
                path.display(),
                e.records,
                e.bytes,
                p.id
            ))),
            _ => Ok(None),
        };
    }
    if extent.is_some_and(|e| e.bytes == 0) {
        return Err(StoreError::Damaged(format!(
            "undo file {} exists but the catalog recorded none for restore point {}",
            path.display(),
            p.id
        )));
    }
    UndoReader::open(&path, Tail::Complete(extent)).map(Some)
}

/// How `points export` writes its output.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOptions {
    /// Replace an existing file at the output path (never a symbolic link or a directory).
    pub force: bool,
}

/// The output of an export: a temporary file next to the output path, renamed over it
/// once complete and durable; removed if the export fails.
struct OutFile {
    tmp: PathBuf,
    out: PathBuf,
    dir: PathBuf,
    file: File,
    force: bool,
    done: bool,
}

impl OutFile {
    /// Check `out` and create the temporary file beside it. Refused (usage errors): a
    /// path inside the datastore (a replica's own image would be destroyed), a symbolic
    /// link or directory at `out`, an existing file without `force`, a missing directory.
    fn create(root: &Path, out: &Path, force: bool) -> Result<OutFile> {
        let name = out
            .file_name()
            .filter(|n| *n != "." && *n != "..")
            .ok_or_else(|| StoreError::Invalid(format!("--out {} does not name a file", out.display())))?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = std::fs::canonicalize(&parent).map_err(|e| {
            StoreError::Invalid(format!(
                "--out {}: its directory {} is not there ({e})",
                out.display(),
                parent.display()
            ))
        })?;
        let root = std::fs::canonicalize(root).map_err(|e| StoreError::file("resolving", root, e))?;
        if dir.starts_with(&root) {
            return Err(StoreError::Invalid(format!(
                "--out {} is inside the datastore {}: an export must not write over the replicas it reads; \
                 choose a path outside it",
                out.display(),
                root.display()
            )));
        }
        let out = dir.join(name);
        match std::fs::symlink_metadata(&out) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(StoreError::Invalid(format!(
                    "--out {} is a symbolic link: ferry does not write through one; give the real path",
                    out.display()
                )))
            }
            Ok(m) if m.is_dir() => {
                return Err(StoreError::Invalid(format!("--out {} is a directory", out.display())));
            }
            Ok(_) if !force => {
                return Err(StoreError::Invalid(format!("--out {} exists: add --force to replace it", out.display())))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::file("inspecting", &out, e)),
        }
        let tmp = dir.join(format!(".{}.ferry-export.{}", name.to_string_lossy(), std::process::id()));
        // O_EXCL (create_new) and O_NOFOLLOW: never an existing file, never through a link.
        let file = crate::store::private_file()
            .write(true)
            .create_new(true)
            .custom_flags(ferry_io::sys::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| StoreError::file("creating", &tmp, e))?;
        Ok(OutFile { tmp, out, dir, file, force, done: false })
    }

    /// Make the file durable and put it in place: renamed over `out` with `force`,
    /// else linked (which fails, rather than replaces, if `out` appeared meanwhile).
    fn finish(mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| StoreError::file("syncing", &self.tmp, e))?;
        test_step("export: output complete and durable");
        if self.force {
            std::fs::rename(&self.tmp, &self.out).map_err(|e| StoreError::file("renaming into place", &self.out, e))?;
        } else {
            std::fs::hard_link(&self.tmp, &self.out).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    StoreError::Invalid(format!("--out {} exists: add --force to replace it", self.out.display()))
                } else {
                    StoreError::file("linking into place", &self.out, e)
                }
            })?;
            std::fs::remove_file(&self.tmp).map_err(|e| StoreError::file("removing", &self.tmp, e))?;
        }
        self.done = true;
        sync_dir(&self.dir)?;
        test_step("export: output in place");
        Ok(())
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The undo files that rebuild one disk at point K while sessions may change the replica:
/// the files of older points are complete and read once; the latest point's file (and
/// those of points committed during the export) may grow, and are read again
/// ([`PointSource::refresh`]) after every batch of chunks taken from the image.
struct PointSource {
    undo_dir: PathBuf,
    disk: String,
    from: u64,
    /// Point id and reader, in the order opened.
    files: Vec<(u64, UndoReader)>,
    /// Files that may still grow (indexes into `files`).
    growing: Vec<usize>,
    /// Ids of the points whose files are known (opened, or complete and absent).
    seen: std::collections::HashSet<u64>,
    /// Per chunk: the record with the lowest point id (>= K): its contents at K.
    index: HashMap<u64, (u64, usize, RecordLoc)>,
    scratch: Vec<u8>,
}

impl PointSource {
    fn open(r: &Replica, catalog: &Catalog, from: u64, disk: &str) -> Result<PointSource> {
        let latest = catalog.points.last().map_or(0, |p| p.id);
        let mut s = PointSource {
            undo_dir: r.dir.join("undo"),
            disk: disk.to_string(),
            from,
            files: Vec::new(),
            growing: Vec::new(),
            seen: Default::default(),
            index: HashMap::new(),
            scratch: Vec::new(),
        };
        for p in catalog.points.iter().filter(|p| p.id >= from && p.id < latest) {
            s.seen.insert(p.id);
            if let Some(u) = committed_undo(r, p, disk)? {
                s.add(p.id, u, false);
            }
        }
        s.refresh()?;
        Ok(s)
    }

    fn add(&mut self, id: u64, u: UndoReader, growing: bool) {
        let i = self.files.len();
        for (&c, &loc) in &u.records {
            self.note(c, id, i, loc);
        }
        self.files.push((id, u));
        if growing {
            self.growing.push(i);
        }
    }

    fn note(&mut self, chunk: u64, id: u64, i: usize, loc: RecordLoc) {
        match self.index.get(&chunk) {
            Some(&(have, _, _)) if have <= id => {}
            _ => {
                self.index.insert(chunk, (id, i, loc));
            }
        }
    }

    /// Read what was appended to the files that may grow, and open the files of points
    /// that appeared (the latest point's, once a session opens the disk; a newer point's,
    /// once a session that committed meanwhile is followed by another).
    fn refresh(&mut self) -> Result<()> {
        for k in 0..self.growing.len() {
            let i = self.growing[k];
            let mut new = Vec::new();
            let (id, u) = &mut self.files[i];
            let id = *id;
            // A record not all there yet is being appended: its chunk is not overwritten yet.
            u.scan(|c, loc| new.push((c, loc)))?;
            for (c, loc) in new {
                self.note(c, id, i, loc);
            }
        }
        let entries = match std::fs::read_dir(&self.undo_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::file("listing", &self.undo_dir, e)),
        };
        let mut ids: Vec<u64> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
            .filter(|&id| id >= self.from && !self.seen.contains(&id))
            .collect();
        ids.sort_unstable();
        for id in ids {
            let path = self.undo_dir.join(id.to_string()).join(format!("{}.undo", self.disk));
            match UndoReader::open(&path, Tail::MayBeTorn) {
                Ok(u) => {
                    self.seen.insert(id);
                    self.add(id, u, true);
                }
                // Not there yet: looked for again after the next batch.
                Err(StoreError::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                // A header being written: the same.
                Err(StoreError::File { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Read `chunk`'s record into `buf`, if it has one: true.
    fn read(&mut self, chunk: u64, buf: &mut [u8]) -> Result<bool> {
        let Some((_, i, loc)) = self.index.get(&chunk) else { return Ok(false) };
        let n = (loc.len as usize).min(buf.len());
        self.scratch.resize(self.scratch.len().max(loc.len as usize), 0);
        self.files[*i].1.read(loc, &mut self.scratch)?;
        buf[..n].copy_from_slice(&self.scratch[..n]);
        buf[n..].fill(0);
        Ok(true)
    }
}

/// Bytes of a disk read per batch of an export (then the undo files are read again).
const EXPORT_BATCH: u64 = 8 << 20;

/// Export `disk` of restore point `point` (default: the latest) as a raw, sparse image at `out`.
///
/// The image goes to a temporary file beside `out`, made durable and then renamed into
/// place: an export that fails or is killed leaves no file at `out` (a killed one may
/// leave its `.NAME.ferry-export.PID` file). Refused (usage errors): a path inside the
/// datastore, a symbolic link or directory at `out`, an existing file without `force`, a
/// directory that does not exist.
///
/// Consistency while a session runs: the export takes no replica lock (a session may hold
/// it for hours); it holds the points lock shared, so no rollback or prune changes the
/// points under it. A session only appends to the latest point's undo file and
/// overwrites a chunk of the image once the chunk's old contents are in that file, so
/// the export reads a batch of chunks from the image, then reads the undo files again:
/// a chunk that has a record now was (or may have been) overwritten, and its record,
/// which holds its contents at the point, is taken instead. A chunk that still has none
/// was not overwritten before that second look, so the image gave its contents at the
/// point.
pub fn export_point(
    ds: &Datastore,
    replica: &str,
    disk: &str,
    point: Option<u64>,
    out: &Path,
    opts: ExportOptions,
) -> Result<ExportReport> {
    let r = ds.replica(replica)?;
    let output = OutFile::create(ds.root(), out, opts.force)?;
    let _points = r.read_points("the export")?;
    refuse_pending(&r)?;
    let catalog = r.catalog()?;
    let Some(latest) = catalog.points.last() else {
        return Err(StoreError::NotFound(format!("replica {replica:?} has no restore point yet")));
    };
    let id = point.unwrap_or(latest.id);
    let p = find_point(&catalog, id, replica)?;
    let pd = p.disks.iter().find(|d| d.name == disk).ok_or_else(|| {
        let names: Vec<&str> = p.disks.iter().map(|d| d.name.as_str()).collect();
        StoreError::NotFound(format!(
            "restore point {id} of {replica:?} has no disk {disk:?} (disks: {})",
            names.join(", ")
        ))
    })?;
    let size = pd.size;
    let mut undo = PointSource::open(&r, &catalog, id, disk)?;
    let cs = u64::from(r.settings.chunk_size);
    // An export holds the disk in its first `size` bytes; only those are exported.
    let src = ReplicaImage::open_ro(&r, disk)?;
    if let Some(img) = src.as_ref().filter(|i| i.nbd_uri().is_some()) {
        img.check_fits(size)?;
    }
    // Chunks that read as zeros when the export starts are not read: an export's
    // `base:allocation` zeros, a file's holes. A session that overwrites one saves a record
    // first, which the second look finds.
    let zero: std::collections::HashSet<u64> = match &src {
        Some(img) if img.nbd_uri().is_some() => img.zero_chunks(r.settings.chunk_size, size)?.into_iter().collect(),
        _ => Default::default(),
    };
    let data: Vec<std::ops::Range<u64>> = match src.as_ref().and_then(|i| i.path()) {
        Some(path) => {
            let f = File::open(path).map_err(|e| StoreError::file("opening", path, e))?;
            ferry_io::sys::data_ranges(&f, size).collect()
        }
        None => std::iter::once(0..size).collect(),
    };
    let in_hole = |c: u64| {
        let (a, b) = (c * cs, ((c + 1) * cs).min(size));
        let i = data.partition_point(|r| r.end <= a);
        data.get(i).is_none_or(|r| r.start >= b)
    };
    output.file.set_len(size).map_err(|e| StoreError::file("sizing", &output.tmp, e))?;
    let per_batch = (EXPORT_BATCH / cs).max(1);
    let mut buf = vec![0u8; (per_batch * cs) as usize];
    let chunks = size.div_ceil(cs);
    let mut data_bytes = 0;
    let mut first = 0;
    while first < chunks {
        let end = (first + per_batch).min(chunks);
        let mut from_image = Vec::new();
        // Chunks of this batch that are holes in the output (zeros, never filled or
        // scanned: a thin disk's export costs its data, not its size).
        let mut hole = vec![false; (end - first) as usize];
        for c in first..end {
            let off = c * cs;
            let len = (size - off).min(cs) as usize;
            let at = ((c - first) * cs) as usize;
            let b = &mut buf[at..at + len];
            if undo.read(c, b)? {
                continue;
            }
            match &src {
                Some(img) if !zero.contains(&c) && !in_hole(c) => img.read_padded(b, off, "exporting")?,
                // Zeros at the point whether or not a session overwrites the chunk now (its
                // record would hold these zeros): no second look needed.
                _ => {
                    hole[(c - first) as usize] = true;
                    continue;
                }
            }
            from_image.push(c);
        }
        if !from_image.is_empty() {
            undo.refresh()?;
            for &c in &from_image {
                let off = c * cs;
                let len = (size - off).min(cs) as usize;
                let at = ((c - first) * cs) as usize;
                undo.read(c, &mut buf[at..at + len])?;
            }
        }
        for c in first..end {
            if hole[(c - first) as usize] {
                continue;
            }
            let off = c * cs;
            let len = (size - off).min(cs) as usize;
            let at = ((c - first) * cs) as usize;
            let b = &buf[at..at + len];
            if !ferry_io::is_zero(b) {
                output.file.write_all_at(b, off).map_err(|e| StoreError::file("writing", &output.tmp, e))?;
                data_bytes += len as u64;
            }
        }
        first = end;
        test_step("export: a batch written");
    }
    output.finish()?;
    Ok(ExportReport { size, data_bytes })
}

/// Apply the records of `undo` (if any) to the image of `disk`, set the image to `size`,
/// update its digest map. Idempotent. `cur` is the disk's size now, for an image behind
/// an NBD export (a file's is its length).
fn apply_undo(r: &Replica, undo: Option<&UndoReader>, disk: &str, size: u64, cur: u64) -> Result<()> {
    let f = ReplicaImage::open_rw(r, disk)?;
    let nbd = f.nbd_uri().is_some();
    let cur = if nbd { cur } else { f.capacity()? };
    let cs = r.settings.chunk_size;
    let zeros = ZeroDigests::new(cs);
    let dpath = r.digests_path(disk)?;
    // The map is at the image's size once a checkpoint stored it; before that (or after a
    // rollback of a size change was cut short) it can still be the point's map at `size`.
    let mut map = digests::load(&dpath, cs, cur)
        .or_else(|| digests::load(&dpath, cs, size))
        .map_or_else(|| DigestMap::new(cs, cur), Ok)
        .map_err(|e| StoreError::Damaged(e.to_string()))?;
    if size > cur {
        // Grown bytes read as zeros (an export's tail past the disk is kept zero).
        f.resize(cur, size, false)?;
    }
    map.resize(size.max(cur), |l| zeros.digest(l));
    if let Some(u) = undo {
        let mut buf = vec![0u8; cs as usize];
        for (&c, loc) in &u.records {
            let off = c * u64::from(cs);
            if loc.zero {
                f.zero(off, u64::from(loc.len))?;
            } else {
                u.read(loc, &mut buf)?;
                f.write_all_at(&buf[..loc.len as usize], off)?;
            }
            if c < map.chunk_count() {
                map.set(c, loc.digest);
            }
            test_step("rollback: a record applied");
        }
    }
    if nbd || f.capacity()? != size {
        f.resize(size.max(cur), size, false)?;
    }
    map.resize(size, |l| zeros.digest(l));
    // Chunks the map does not know (no usable map, a partial last chunk whose length
    // changed) are hashed from the restored image: verify and digest mode need them.
    let mut buf = vec![0u8; cs as usize];
    for c in 0..map.chunk_count() {
        if !map.is_known(c) {
            let len = map.chunk_len(c) as usize;
            f.read_exact_at(&mut buf[..len], c * u64::from(cs), "hashing")?;
            map.set(c, *blake3::hash(&buf[..len]).as_bytes());
        }
    }
    f.sync()?;
    digests::store(&dpath, &map)?;
    test_step("rollback: a disk restored and durable");
    Ok(())
}

/// Roll a locked replica back, in place, to restore point `to`: newer points are dropped.
///
/// A pending rollback is finished first: one of an interrupted session, or one to a point
/// at or after `to` (going on to `to` from wherever it stopped). One to an older point is
/// refused: `to` is about to be dropped by it.
pub fn rollback_to(r: &Replica, to: u64) -> Result<Vec<u64>> {
    assert!(r.is_locked(), "rollback needs the replica lock");
    let _points = r.change_points("the rollback")?;
    match read_intent(r)? {
        Some(Intent::Incomplete(_)) => {
            finish(r)?;
        }
        Some(Intent::ToPoint(pending)) if pending < to => {
            return Err(StoreError::RollbackPending(format!(
                "{}; restore point {to} is dropped by it",
                PendingRollback::ToPoint(pending).describe(&r.name)
            )));
        }
        _ => {}
    }
    if r.session()?.is_some() {
        return Err(StoreError::Invalid(format!(
            "replica {:?} has an interrupted session: resume it, or run `ferry points rollback --incomplete --yes` first",
            r.name
        )));
    }
    find_point(&r.catalog()?, to, &r.name)?;
    write_atomic(&r.dir, "rollback.json", &serde_json::to_vec(&RollbackIntent { to }).expect("json"))?;
    test_step("rollback: intent written");
    finish(r).map(|f| f.dropped)
}

/// What [`finish_pending`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    /// The rollback it finished.
    pub what: Option<PendingRollback>,
    /// Points dropped.
    pub dropped: Vec<u64>,
}

/// Finish a rollback recorded in `rollback.json` (after a crash), if there is one; a
/// locked replica. Run before anything else changes the replica: by `replicate`,
/// `points rollback` and `points prune`. [`StoreError::Busy`] while an export reads it.
pub fn finish_pending(r: &Replica) -> Result<Finished> {
    assert!(r.is_locked(), "finishing a rollback needs the replica lock");
    if read_intent(r)?.is_none() {
        return Ok(Finished::default());
    }
    let _points = r.change_points("finishing the pending rollback")?;
    finish(r)
}

fn finish(r: &Replica) -> Result<Finished> {
    let Some(intent) = read_intent(r)? else { return Ok(Finished::default()) };
    let mut done = Finished::default();
    let name = match intent {
        Intent::Incomplete(session) => {
            finish_incomplete(r, &session)?;
            done.what = Some(PendingRollback::Incomplete);
            UNDOING
        }
        Intent::ToPoint(to) => {
            done.dropped = finish_to_point(r, to)?;
            done.what = Some(PendingRollback::ToPoint(to));
            "rollback.json"
        }
    };
    let path = r.dir.join(name);
    std::fs::remove_file(&path).map_err(|e| StoreError::file("removing", &path, e))?;
    sync_dir(&r.dir)?;
    test_step("rollback: intent removed");
    Ok(done)
}

/// The steps of a rollback to point `to`, from wherever a killed one stopped.
fn finish_to_point(r: &Replica, to: u64) -> Result<Vec<u64>> {
    let mut dropped = Vec::new();
    loop {
        let mut catalog = r.catalog()?;
        let n = catalog.points.len();
        if n < 2 || catalog.points[n - 1].id <= to {
            break;
        }
        let latest = catalog.points[n - 1].clone();
        let prev = catalog.points[n - 2].clone();
        for d in &prev.disks {
            let cur = latest.disks.iter().find(|l| l.name == d.name).map_or(d.size, |l| l.size);
            let u = committed_undo(r, &prev, &d.name)?;
            apply_undo(r, u.as_ref(), &d.name, d.size, cur)?;
        }
        for d in latest.disks.iter().filter(|d| !prev.disks.iter().any(|p| p.name == d.name)) {
            remove_disk(r, &d.name)?;
            test_step("rollback: a disk removed");
        }
        catalog.points.pop();
        // The new latest point's undo file is applied: it no longer has one.
        for d in &mut catalog.points[n - 2].disks {
            d.undo = None;
        }
        r.write_catalog(&catalog)?;
        test_step("rollback: catalog written");
        remove_undo_dir(r, prev.id)?;
        test_step("rollback: undo directory removed");
        dropped.push(latest.id);
    }
    // Undo directories of the latest point (no session is pending) and newer ones: left by
    // a rollback killed between its catalog write and the removal.
    let latest = r.catalog()?.points.last().map_or(0, |p| p.id);
    remove_undo_dirs(r, |id| id >= latest)?;
    Ok(dropped)
}

/// Undo an interrupted session: the replica returns exactly to its latest
/// restore point (or, with none yet, to empty). Returns false when there was no session.
///
/// The intent record is `session.json` itself, renamed to `rollback-session.json`: from
/// then on no session resumes it, and the rename needs no room on a full file system.
pub fn rollback_incomplete(r: &Replica) -> Result<bool> {
    assert!(r.is_locked(), "rollback needs the replica lock");
    let _points = r.change_points("the rollback")?;
    if let Some(pending) = read_intent(r)? {
        finish(r)?;
        if matches!(pending, Intent::Incomplete(_)) {
            return Ok(true);
        }
    }
    if r.session()?.is_none() {
        return Ok(false);
    }
    let (from, to) = (r.dir.join("session.json"), r.dir.join(UNDOING));
    std::fs::rename(&from, &to).map_err(|e| StoreError::file("renaming", &from, e))?;
    sync_dir(&r.dir)?;
    test_step("rollback: intent written (session.json renamed)");
    finish(r)?;
    Ok(true)
}

/// The steps of a rollback of the interrupted session `session`, from wherever a killed
/// one stopped: the images restored from the latest point's undo file (again), disks the
/// session added removed, then the undo file removed; the intent record goes last.
fn finish_incomplete(r: &Replica, session: &SessionState) -> Result<()> {
    let catalog = r.catalog()?;
    // Disks the session added: those it recorded, and any image it created before it
    // could record it (the image is created just before the session state names it).
    let mut added: std::collections::BTreeSet<String> = session.disks.keys().cloned().collect();
    added.extend(r.disks()?);
    match catalog.points.last() {
        Some(latest) if latest.session_id == session.session_id => {} // committed already
        Some(latest) => {
            for d in &latest.disks {
                let cur = session.disks.get(&d.name).map_or(d.size, |s| s.size);
                let path = undo_path(&r.dir, latest.id, &d.name);
                let u = match path.exists() {
                    true => Some(UndoReader::open(&path, Tail::MayBeTorn)?),
                    false => None,
                };
                // (A missing file: this rollback applied it and removed it before it was killed.)
                if let Some(u) = &u {
                    u.check_durable(session.disks.get(&d.name).and_then(|s| s.undo_durable))?;
                }
                apply_undo(r, u.as_ref(), &d.name, d.size, cur)?;
            }
            for name in added.iter().filter(|n| !latest.disks.iter().any(|d| &d.name == *n)) {
                remove_disk(r, name)?;
                test_step("rollback: a disk removed");
            }
        }
        None => {
            for name in &added {
                remove_disk(r, name)?;
                test_step("rollback: a disk removed");
            }
        }
    }
    if let Some(latest) = catalog.points.last() {
        remove_undo_dirs(r, |id| id >= latest.id)?;
        test_step("rollback: undo directory removed");
    }
    Ok(())
}

/// Remove a disk's image and digest map. A disk placed behind an NBD export keeps its
/// placement (`DISK.nbd`, the user's) and its export; only its map goes, so the next
/// session hashes the export again.
fn remove_disk(r: &Replica, disk: &str) -> Result<()> {
    let image = match Placement::of(r, disk)? {
        Placement::File(p) => Some(p),
        Placement::Nbd(_) => None,
    };
    for p in image.into_iter().chain([r.digests_path(disk)?]) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::file("removing", &p, e)),
        }
    }
    // Durable before the catalog drops the point that had the disk: a power cut must not
    // bring back an image (and map) that no point names.
    crate::store::sync_dir(&r.dir.join("disks"))
}

fn remove_undo_dir(r: &Replica, point: u64) -> Result<()> {
    let d = r.dir.join("undo").join(point.to_string());
    match std::fs::remove_dir_all(&d) {
        Ok(()) => sync_dir(&r.dir.join("undo")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::file("removing", &d, e)),
    }
}

/// Remove the undo directories whose point id passes `which`.
fn remove_undo_dirs(r: &Replica, which: impl Fn(u64) -> bool) -> Result<()> {
    let undo = r.dir.join("undo");
    let entries = match std::fs::read_dir(&undo) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::file("listing", &undo, e)),
    };
    let ids: Vec<u64> = entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    for id in ids.into_iter().filter(|&id| which(id)) {
        remove_undo_dir(r, id)?;
    }
    Ok(())
}

/// Keep the newest `retain` points; drop older ones and their undo files. Returns the
/// dropped ids. The replica is locked; a pending rollback must be finished first (it may
/// need the undo files: refused otherwise). [`StoreError::Busy`] while an export or a
/// verify reads the points.
pub fn prune(r: &Replica, retain: u32) -> Result<Vec<u64>> {
    Ok(prune_protected(r, retain, Protection::default(), crate::store::now_ns())?.dropped)
}

/// What a target's retention policy protects from what remote clients ask
/// (`ferry serve --keep-min N --immutable DURATION`); local `ferry points`
/// commands on the target's host are not bound by it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Protection {
    /// Points a replica keeps at least, whatever retention is asked.
    pub keep_min: u32,
    /// A point younger than this (ns, by the time the target completed it:
    /// the source's point time is the source's to choose) is never dropped.
    pub immutable_ns: i64,
}

/// What [`prune_protected`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneOutcome {
    /// Points dropped, oldest first.
    pub dropped: Vec<u64>,
    /// Points the retention alone would have dropped that `keep_min` kept.
    pub kept_by_keep_min: Vec<u64>,
    /// Points the retention and `keep_min` would have dropped that were younger than `immutable_ns`.
    pub kept_by_immutable: Vec<u64>,
}

/// [`prune`] under a [`Protection`]: keep the newest `max(retain, keep_min)`
/// points, and of the older ones drop only those at least `immutable_ns` old
/// at `now_ns`. Points go only as a run from the oldest (a point needs the
/// undo files of every newer one): should the clock have gone back, a young
/// point keeps the older ones after it too.
pub fn prune_protected(r: &Replica, retain: u32, p: Protection, now_ns: i64) -> Result<PruneOutcome> {
    if let Some(p) = pending_rollback(r)? {
        return Err(StoreError::RollbackPending(p.describe(&r.name)));
    }
    let _points = r.change_points("pruning")?;
    let mut catalog = r.catalog()?;
    let n = catalog.points.len();
    let excess = |keep: u32| n - (keep.max(1) as usize).min(n);
    let asked = excess(retain);
    let allowed = excess(retain.max(p.keep_min));
    let old_enough = catalog.points[..allowed]
        .iter()
        .take_while(|q| p.immutable_ns <= 0 || now_ns.saturating_sub(q.completed_ns) >= p.immutable_ns)
        .count();
    let ids = |range: std::ops::Range<usize>| catalog.points[range].iter().map(|q| q.id).collect::<Vec<u64>>();
    let kept_by_keep_min = ids(allowed..asked);
    let kept_by_immutable = ids(old_enough..allowed);
    let dropped: Vec<u64> = catalog.points.drain(..old_enough).map(|p| p.id).collect();
    if !dropped.is_empty() {
        r.write_catalog(&catalog)?;
        test_step("prune: catalog written");
    }
    // Every undo directory not belonging to a kept point (or to a pending session's base) goes.
    let live: Vec<u64> = catalog.points.iter().map(|p| p.id).collect();
    let undo = r.dir.join("undo");
    if let Ok(entries) = std::fs::read_dir(&undo) {
        let mut ids: Vec<u64> = entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
        ids.sort_unstable();
        for id in ids.into_iter().filter(|id| !live.contains(id)) {
            remove_undo_dir(r, id)?;
            test_step("prune: undo directory removed");
        }
    }
    Ok(PruneOutcome { dropped, kept_by_keep_min, kept_by_immutable })
}

/// A problem `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyIssue {
    /// Disk name.
    pub disk: String,
    /// Chunk index (None for a file-level problem).
    pub chunk: Option<u64>,
    /// What is wrong.
    pub problem: String,
}

/// Check a locked replica: the catalog's checksum; the latest images re-hashed against
/// their digest maps (a chunk changed outside ferry is named); every undo file the
/// catalog needs there, complete to the length and record count the catalog recorded,
/// every record's head and data checked. Returns (chunks and records checked, issues).
pub fn verify(r: &Replica) -> Result<(u64, Vec<VerifyIssue>)> {
    let _points = r.read_points("verify")?;
    refuse_pending(r)?;
    let issue =
        |disk: &str, chunk: Option<u64>, problem: String| VerifyIssue { disk: disk.to_string(), chunk, problem };
    let catalog = match r.catalog() {
        Ok(c) => c,
        Err(e @ StoreError::Damaged(_)) => return Ok((0, vec![issue("", None, e.to_string())])),
        Err(e) => return Err(e),
    };
    let Some(latest) = catalog.points.last() else { return Ok((0, vec![])) };
    if r.session()?.is_some() {
        return Err(StoreError::Invalid(format!(
            "replica {:?} has an interrupted session: resume or roll it back before verifying",
            r.name
        )));
    }
    let cs = r.settings.chunk_size;
    let mut issues = Vec::new();
    let mut checked = 0;
    let mut buf = vec![0u8; cs as usize];
    for d in &latest.disks {
        let Some(f) = ReplicaImage::open_ro(r, &d.name)? else {
            issues.push(issue(&d.name, None, "image missing".into()));
            continue;
        };
        let len = f.capacity()?;
        // A file is exactly the disk; an export holds it in its first d.size bytes.
        let (fits, what) = match f.nbd_uri() {
            Some(_) => (len >= d.size, "export"),
            None => (len == d.size, "image"),
        };
        if !fits {
            issues.push(issue(&d.name, None, format!("{what} is {len} bytes, the point says {}", d.size)));
            continue;
        }
        let size = d.size;
        let Some(map) = digests::load(&r.digests_path(&d.name)?, cs, size) else {
            issues.push(issue(&d.name, None, "digest map missing or damaged".into()));
            continue;
        };
        for c in 0..map.chunk_count() {
            let len = map.chunk_len(c) as usize;
            f.read_exact_at(&mut buf[..len], c * u64::from(cs), "verifying")?;
            checked += 1;
            match map.get(c) {
                Some(want) if want == *blake3::hash(&buf[..len]).as_bytes() => {}
                Some(_) => issues.push(issue(
                    &d.name,
                    Some(c),
                    "data does not match its digest (changed outside ferry?)".into(),
                )),
                None => issues.push(issue(&d.name, Some(c), "digest unknown".into())),
            }
        }
    }
    for p in catalog.points.iter().filter(|p| p.id < latest.id) {
        for d in &p.disks {
            match committed_undo(r, p, &d.name) {
                Ok(Some(u)) => checked += u.count,
                Ok(None) => {}
                Err(e) => issues.push(issue(&d.name, None, e.detail())),
            }
        }
    }
    Ok((checked, issues))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DATASTORE_VERSION;

    const HOUR: i64 = 3600 * 1_000_000_000;

    /// A replica whose catalog holds points 1..=n, point i completed `ages[i-1]` hours before `now`.
    fn replica_with_points(dir: &Path, ages: &[i64], now: i64) -> Replica {
        let ds = Datastore::open_or_create(dir).unwrap();
        let r = ds.lock_replica("vm1", "test", 65536, 7).unwrap();
        let points = ages
            .iter()
            .enumerate()
            .map(|(i, age)| RestorePoint {
                id: i as u64 + 1,
                point_time_ns: 0, // a source's point time says nothing about a point's age
                completed_ns: now - age * HOUR,
                ferry_version: "test".into(),
                session_id: format!("{i}"),
                disks: vec![],
            })
            .collect();
        r.write_catalog(&Catalog {
            version: DATASTORE_VERSION,
            next_id: ages.len() as u64 + 1,
            points,
            checksum: None,
        })
        .unwrap();
        r
    }

    fn ids(r: &Replica) -> Vec<u64> {
        r.catalog().unwrap().points.iter().map(|p| p.id).collect()
    }

    #[test]
    fn keep_min_and_immutable_keep_points_that_retention_would_drop() {
        let now = crate::store::now_ns();
        let dir = tempfile::tempdir().unwrap();
        // Points 1..=6 completed 50, 40, 30, 20, 10 and 0 hours ago.
        let ages = [50, 40, 30, 20, 10, 0];
        let r = replica_with_points(dir.path(), &ages, now);
        let p = Protection { keep_min: 4, immutable_ns: 0 };
        let out = prune_protected(&r, 1, p, now).unwrap();
        assert_eq!(
            out,
            PruneOutcome { dropped: vec![1, 2], kept_by_keep_min: vec![3, 4, 5], kept_by_immutable: vec![] }
        );
        assert_eq!(ids(&r), vec![3, 4, 5, 6]);

        let dir = tempfile::tempdir().unwrap();
        let r = replica_with_points(dir.path(), &ages, now);
        // Younger than 35 hours: points 3..=6 stay whatever is asked.
        let p = Protection { keep_min: 2, immutable_ns: 35 * HOUR };
        let out = prune_protected(&r, 1, p, now).unwrap();
        assert_eq!(out, PruneOutcome { dropped: vec![1, 2], kept_by_keep_min: vec![5], kept_by_immutable: vec![3, 4] });
        assert_eq!(ids(&r), vec![3, 4, 5, 6]);

        // Without protection, retention alone decides (the local `ferry points prune`).
        let dir = tempfile::tempdir().unwrap();
        let r = replica_with_points(dir.path(), &ages, now);
        assert_eq!(prune(&r, 1).unwrap(), vec![1, 2, 3, 4, 5]);
        assert_eq!(ids(&r), vec![6]);
    }

    #[test]
    fn a_clock_that_went_back_keeps_the_points_after_a_young_one() {
        let now = 1_000_000 * HOUR;
        let dir = tempfile::tempdir().unwrap();
        // Point 2 looks younger than point 3 (the clock was set back in between).
        let r = replica_with_points(dir.path(), &[50, 1, 40, 30], now);
        let out = prune_protected(&r, 1, Protection { keep_min: 1, immutable_ns: 24 * HOUR }, now).unwrap();
        assert_eq!(out, PruneOutcome { dropped: vec![1], kept_by_keep_min: vec![], kept_by_immutable: vec![2, 3] });
        assert_eq!(ids(&r), vec![2, 3, 4]);
    }

    #[test]
    fn files_and_directories_are_created_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ds");
        let ds = Datastore::open_or_create(&root).unwrap();
        let r = ds.lock_replica("vm1", "test", 65536, 7).unwrap();
        crate::image::ReplicaImage::open_rw(&r, "d0").unwrap();
        crate::undo::UndoWriter::open(&r.dir, 1, "d0", 65536, 65536).unwrap();
        r.write_catalog(&r.catalog().unwrap()).unwrap();
        let mut seen = 0;
        let mut stack = vec![root.clone()];
        while let Some(p) = stack.pop() {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            if p.is_dir() {
                assert_eq!(mode, 0o700, "{}", p.display());
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                assert_eq!(mode, 0o600, "{}", p.display());
            }
            seen += 1;
        }
        // ds, marker, vm1, lock, replica.json, catalog.json, disks, d0.img, undo, undo/1, its file
        assert_eq!(seen, 11);
    }
}
