//! Restore points: export any point, roll back, prune, verify.
//!
//! The latest point is the images themselves. Point K < latest is the images
//! with the undo files of K, K+1, ... applied; for each chunk the record in
//! the undo file with the lowest point id >= K holds its contents at K, and a
//! chunk in none of them is unchanged since K.
//!
//! Rollback is crash-safe: `rollback.json` records the target point first;
//! then undo files are applied newest first, each fully and durably, before
//! the catalog drops the newer point and the undo file is removed. Applying
//! an undo file twice is harmless, so after a crash the rollback is finished
//! from `rollback.json` the next time the replica is opened for writing.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digests::{self, DigestMap, ZeroDigests};
use crate::error::{Result, StoreError};
use crate::export::ExportReport;
use crate::image::{Placement, ReplicaImage};
use crate::store::{write_atomic, Catalog, Datastore, Replica, RestorePoint};
use crate::undo::{undo_path, RecordLoc, UndoReader};

#[derive(Debug, Serialize, Deserialize)]
struct RollbackIntent {
    to: u64,
}

fn find_point<'a>(c: &'a Catalog, id: u64, replica: &str) -> Result<&'a RestorePoint> {
    c.points.iter().find(|p| p.id == id).ok_or_else(|| {
        let ids: Vec<String> = c.points.iter().map(|p| p.id.to_string()).collect();
        StoreError::NotFound(format!("replica {replica:?} has no restore point {id} (points: {})", ids.join(", ")))
    })
}

/// Undo readers of `disk` for every point id in `ids`, in that order (missing files skipped).
fn readers(r: &Replica, ids: &[u64], disk: &str) -> Result<Vec<UndoReader>> {
    let mut v = Vec::new();
    for &id in ids {
        let p = undo_path(&r.dir, id, disk);
        if p.exists() {
            let rd = UndoReader::open(&p)?;
            if rd.torn && ids.last() != Some(&id) {
                return Err(StoreError::Damaged(format!(
                    "undo file {} is damaged: restore point {id} cannot be rebuilt",
                    p.display()
                )));
            }
            v.push(rd);
        }
    }
    Ok(v)
}

/// Export `disk` of restore point `point` (default: the latest) as a raw, sparse image.
pub fn export_point(ds: &Datastore, replica: &str, disk: &str, point: Option<u64>, out: &Path) -> Result<ExportReport> {
    let r = ds.replica(replica)?;
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
    let pending = r.session()?.is_some();
    // Undo files of points id..latest, plus the latest's own while a session is changing the images.
    let mut ids: Vec<u64> = catalog.points.iter().map(|q| q.id).filter(|&q| q >= id && q < latest.id).collect();
    if pending {
        ids.push(latest.id);
    }
    let placement = Placement::of(&r, disk)?;
    if let (true, Placement::File(image)) = (ids.is_empty(), &placement) {
        let rep = crate::export::copy_sparse(image, out)?;
        if rep.size != pd.size {
            return Err(StoreError::Damaged(format!(
                "image of {replica}/{disk} is {} bytes, its restore point says {}",
                rep.size, pd.size
            )));
        }
        return Ok(rep);
    }
    let undos = readers(&r, &ids, disk)?;
    let cs = r.settings.chunk_size;
    let mut index: HashMap<u64, (usize, RecordLoc)> = HashMap::new();
    for (i, u) in undos.iter().enumerate() {
        for (&c, &loc) in &u.records {
            index.entry(c).or_insert((i, loc));
        }
    }
    // An export holds the disk in its first pd.size bytes; only those are exported.
    let src = ReplicaImage::open_ro(&r, disk)?;
    if let Some(img) = src.as_ref().filter(|i| i.nbd_uri().is_some()) {
        img.check_fits(pd.size)?;
    }
    // Chunks an export reports as zeros are not read (an export's holes stay holes in the file).
    let zero: std::collections::HashSet<u64> = match &src {
        Some(img) => img.zero_chunks(cs, pd.size)?.into_iter().collect(),
        None => Default::default(),
    };
    let o = crate::store::private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(|e| StoreError::file("creating", out, e))?;
    o.set_len(pd.size).map_err(|e| StoreError::file("sizing", out, e))?;
    let csz = u64::from(cs);
    let mut buf = vec![0u8; cs as usize];
    let mut data_bytes = 0;
    for c in 0..pd.size.div_ceil(csz) {
        let off = c * csz;
        let len = (pd.size - off).min(csz) as usize;
        let b = &mut buf[..len];
        match index.get(&c) {
            Some((i, loc)) => {
                b.fill(0);
                let n = (loc.len as usize).min(len);
                undos[*i].read(loc, &mut buf[..loc.len as usize])?;
                buf[n..len].fill(0);
            }
            None => match &src {
                Some(img) if !zero.contains(&c) => img.read_padded(b, off, "exporting")?,
                _ => b.fill(0),
            },
        }
        let b = &buf[..len];
        if !ferry_io::is_zero(b) {
            o.write_all_at(b, off).map_err(|e| StoreError::file("writing", out, e))?;
            data_bytes += len as u64;
        }
    }
    o.sync_all().map_err(|e| StoreError::file("syncing", out, e))?;
    Ok(ExportReport { size: pd.size, data_bytes })
}

/// Apply the records of undo file `point`/`disk` to the image, set the
/// image to `size`, update its digest map. Idempotent. `cur` is the disk's
/// size now, for an image behind an NBD export (a file's is its length).
fn apply_undo(r: &Replica, point: u64, disk: &str, size: u64, cur: u64) -> Result<()> {
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
    let p = undo_path(&r.dir, point, disk);
    if p.exists() {
        let u = UndoReader::open(&p)?;
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
    digests::store(&dpath, &map)
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
    Ok(())
}

fn remove_undo_dir(r: &Replica, point: u64) -> Result<()> {
    let d = r.dir.join("undo").join(point.to_string());
    match std::fs::remove_dir_all(&d) {
        Ok(()) => crate::store::sync_dir(&r.dir.join("undo")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::file("removing", &d, e)),
    }
}

/// Roll a locked replica back, in place, to restore point `to`: newer points are dropped.
pub fn rollback_to(r: &Replica, to: u64) -> Result<Vec<u64>> {
    assert!(r.is_locked(), "rollback needs the replica lock");
    if r.session()?.is_some() {
        return Err(StoreError::Damaged(format!(
            "replica {:?} has an interrupted session: resume it, or run `ferry points rollback --incomplete` first",
            r.name
        )));
    }
    find_point(&r.catalog()?, to, &r.name)?;
    write_atomic(&r.dir, "rollback.json", &serde_json::to_vec(&RollbackIntent { to }).expect("json"))?;
    finish_rollback(r)
}

/// Finish a rollback recorded in `rollback.json` (after a crash, or just begun). Returns the dropped point ids.
pub fn finish_rollback(r: &Replica) -> Result<Vec<u64>> {
    let path = r.dir.join("rollback.json");
    let intent: RollbackIntent = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Damaged(format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(StoreError::file("reading", &path, e)),
    };
    let mut dropped = Vec::new();
    loop {
        let mut catalog = r.catalog()?;
        let n = catalog.points.len();
        if n == 0 || catalog.points[n - 1].id <= intent.to {
            break;
        }
        let latest = catalog.points[n - 1].clone();
        let Some(prev) = catalog.points.get(n.wrapping_sub(2)).cloned() else {
            break;
        };
        for d in &prev.disks {
            let cur = latest.disks.iter().find(|l| l.name == d.name).map_or(d.size, |l| l.size);
            apply_undo(r, prev.id, &d.name, d.size, cur)?;
        }
        for d in latest.disks.iter().filter(|d| !prev.disks.iter().any(|p| p.name == d.name)) {
            remove_disk(r, &d.name)?;
        }
        catalog.points.pop();
        r.write_catalog(&catalog)?;
        remove_undo_dir(r, prev.id)?;
        dropped.push(latest.id);
    }
    std::fs::remove_file(&path).map_err(|e| StoreError::file("removing", &path, e))?;
    crate::store::sync_dir(&r.dir)?;
    Ok(dropped)
}

/// Undo an interrupted session: the replica returns exactly to its latest
/// restore point (or, with none yet, to empty). Returns false when there was no session.
pub fn rollback_incomplete(r: &Replica) -> Result<bool> {
    assert!(r.is_locked(), "rollback needs the replica lock");
    let Some(session) = r.session()? else { return Ok(false) };
    let catalog = r.catalog()?;
    // Disks the session added: those it recorded, and any image it created before it could
    // record it (the image is created just before the session state names it).
    let mut added: std::collections::BTreeSet<String> = session.disks.keys().cloned().collect();
    added.extend(r.disks()?);
    match catalog.points.last() {
        Some(latest) if latest.session_id == session.session_id => {} // committed already
        Some(latest) => {
            for d in &latest.disks {
                let cur = session.disks.get(&d.name).map_or(d.size, |s| s.size);
                apply_undo(r, latest.id, &d.name, d.size, cur)?;
            }
            for name in added.iter().filter(|n| !latest.disks.iter().any(|d| &d.name == *n)) {
                remove_disk(r, name)?;
            }
            remove_undo_dir(r, latest.id)?;
        }
        None => {
            for name in &added {
                remove_disk(r, name)?;
            }
        }
    }
    r.clear_session()?;
    Ok(true)
}

/// Keep the newest `retain` points; drop older ones and their undo files. Returns the dropped ids.
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
    }
    // Every undo directory not belonging to a kept point (or to a pending session's base) goes.
    let live: Vec<u64> = catalog.points.iter().map(|p| p.id).collect();
    let undo = r.dir.join("undo");
    if let Ok(entries) = std::fs::read_dir(&undo) {
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().parse::<u64>().ok();
            if id.is_some_and(|id| !live.contains(&id)) {
                remove_undo_dir(r, id.expect("checked"))?;
            }
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

/// Re-hash the latest images against their digest maps and check every undo
/// file's records. Returns (chunks checked, issues).
pub fn verify(r: &Replica) -> Result<(u64, Vec<VerifyIssue>)> {
    let catalog = r.catalog()?;
    let Some(latest) = catalog.points.last() else { return Ok((0, vec![])) };
    if r.session()?.is_some() {
        return Err(StoreError::Damaged(format!(
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
            issues.push(VerifyIssue { disk: d.name.clone(), chunk: None, problem: "image missing".into() });
            continue;
        };
        let len = f.capacity()?;
        // A file is exactly the disk; an export holds it in its first d.size bytes.
        let (fits, what) = match f.nbd_uri() {
            Some(_) => (len >= d.size, "export"),
            None => (len == d.size, "image"),
        };
        if !fits {
            issues.push(VerifyIssue {
                disk: d.name.clone(),
                chunk: None,
                problem: format!("{what} is {len} bytes, the point says {}", d.size),
            });
            continue;
        }
        let size = d.size;
        let Some(map) = digests::load(&r.digests_path(&d.name)?, cs, size) else {
            issues.push(VerifyIssue {
                disk: d.name.clone(),
                chunk: None,
                problem: "digest map missing or damaged".into(),
            });
            continue;
        };
        for c in 0..map.chunk_count() {
            let len = map.chunk_len(c) as usize;
            f.read_exact_at(&mut buf[..len], c * u64::from(cs), "verifying")?;
            checked += 1;
            match map.get(c) {
                Some(want) if want == *blake3::hash(&buf[..len]).as_bytes() => {}
                Some(_) => issues.push(VerifyIssue {
                    disk: d.name.clone(),
                    chunk: Some(c),
                    problem: "data does not match its digest".into(),
                }),
                None => {
                    issues.push(VerifyIssue { disk: d.name.clone(), chunk: Some(c), problem: "digest unknown".into() })
                }
            }
        }
    }
    for p in catalog.points.iter().filter(|p| p.id < latest.id) {
        for d in &p.disks {
            let path = undo_path(&r.dir, p.id, &d.name);
            if !path.exists() {
                continue;
            }
            match UndoReader::open(&path) {
                Ok(u) if u.torn => issues.push(VerifyIssue {
                    disk: d.name.clone(),
                    chunk: None,
                    problem: format!("undo file of point {} is damaged after offset {}", p.id, u.valid_end),
                }),
                Ok(u) => checked += u.records.len() as u64,
                Err(e) => issues.push(VerifyIssue { disk: d.name.clone(), chunk: None, problem: e.detail() }),
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
        r.write_catalog(&Catalog { version: DATASTORE_VERSION, next_id: ages.len() as u64 + 1, points }).unwrap();
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
