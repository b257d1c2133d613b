//! Replica from backup: restore points of backup repositories, which of them
//! to replicate, and what changed between two of them. Pure logic: the mover
//! (`ferry_backup::repo`) lists the repositories and reads the images.
//!
//! # Repositories
//! - A ferry datastore (it has `ferry-datastore.json`): each replica is a VM
//!   named after the replica, each of its restore points a backup point with
//!   the catalog's point time; disks keep their names.
//! - A qcow2 chain directory: `REPO/VM/` holds the VM's qcow2 files (a full
//!   image and incremental overlays whose backing file is the previous point's
//!   file) and one manifest per restore point, `REPO/VM/POINT.json`:
//!   ```json
//!   {"format": "ferry-backup-point/1", "vm": "web1", "point_time": "2026-11-22T03:00:00Z",
//!    "disks": {"sda": "sda.sun.qcow2"}, "parent": null}
//!   ```
//!   `POINT` (the file stem) is the point's id; disk files are relative to the
//!   manifest's directory; `parent` is the id of the point the overlays are
//!   based on (null for a full backup). A qcow2 file in `REPO/VM/` that no
//!   manifest names is a point of its own (for backup tools that write no
//!   manifest): its id is the file stem, its only disk is named after the
//!   part of the file name before the first `.`, its point time is the file's
//!   modification time.
//!
//! # Selection
//! The VM's points across all repositories, ordered by point time (two points
//! at the same time are an error: which one is "the" point is ambiguous).
//! Without catch-up: the latest, if it is newer than the replica's latest
//! point; with catch-up: every point newer than the replica's latest, oldest
//! first.
//!
//! # What moves
//! A point whose ancestry (qcow2 backing chain, or earlier points of the same
//! ferry replica) contains a point at exactly the replica's latest point time
//! moves only the extents changed since that ancestor (cbt mode: qcow2
//! allocation above the ancestor's layer, or the undo records of the ferry
//! points in between). Any other point moves what differs from the replica
//! (digest mode).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;

use crate::{ChangeMap, Extent};

/// The manifest format this version writes and reads.
pub const MANIFEST_FORMAT: &str = "ferry-backup-point/1";

/// Errors in repositories and selection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackupError {
    /// A manifest is not valid.
    #[error("broken manifest {file}: {reason}")]
    BrokenManifest {
        /// The manifest's file name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The VM has no point in any repository.
    #[error("no restore point of VM {vm:?} in the backup repositories (VMs found: {found})")]
    UnknownVm {
        /// The VM asked for.
        vm: String,
        /// VMs found, comma-separated ("none" when empty).
        found: String,
    },
    /// Two points of a VM have the same point time.
    #[error("VM {vm:?} has two restore points at {time}: {a} and {b}; remove one of them")]
    SameTime {
        /// VM.
        vm: String,
        /// The time (RFC 3339).
        time: String,
        /// One point.
        a: String,
        /// The other.
        b: String,
    },
    /// A point's chain contains a point of another VM.
    #[error("restore point {point} of VM {vm:?} is based on {other}, a restore point of VM {other_vm:?}")]
    OtherVm {
        /// The point.
        point: String,
        /// Its VM.
        vm: String,
        /// The point it is based on.
        other: String,
        /// That point's VM.
        other_vm: String,
    },
    /// A point names a parent that does not exist.
    #[error("restore point {point} of VM {vm:?} names parent {parent:?}, which is not in its repository")]
    MissingParent {
        /// The point.
        point: String,
        /// VM.
        vm: String,
        /// The parent id.
        parent: String,
    },
    /// qemu-img output that could not be understood.
    #[error("{label}: {reason}")]
    BadImageInfo {
        /// What was read.
        label: String,
        /// What is wrong.
        reason: String,
    },
}

/// A restore point's manifest (qcow2 chain repositories).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Must be [`MANIFEST_FORMAT`].
    pub format: String,
    /// VM name.
    pub vm: String,
    /// Point time, RFC 3339.
    pub point_time: String,
    /// Disk name -> qcow2 file (relative to the manifest's directory).
    pub disks: BTreeMap<String, String>,
    /// Id of the parent point; null for a full backup.
    #[serde(default)]
    pub parent: Option<String>,
}

/// Parse and check a manifest; returns it with its point time in ns.
pub fn parse_manifest(file: &str, content: &[u8]) -> Result<(Manifest, i64), BackupError> {
    let broken = |reason: String| BackupError::BrokenManifest { file: file.to_string(), reason };
    let m: Manifest = serde_json::from_slice(content).map_err(|e| broken(e.to_string()))?;
    if m.format != MANIFEST_FORMAT {
        return Err(broken(format!("format is {:?}, expected {MANIFEST_FORMAT:?}", m.format)));
    }
    if m.vm.is_empty() || m.vm.contains('/') {
        return Err(broken(format!("bad VM name {:?}", m.vm)));
    }
    if m.disks.is_empty() {
        return Err(broken("no disks".into()));
    }
    for (name, f) in &m.disks {
        if name.is_empty() || name.contains('/') || f.is_empty() {
            return Err(broken(format!("bad disk entry {name:?}: {f:?}")));
        }
    }
    let t = crate::time::parse_rfc3339(&m.point_time).map_err(|e| broken(format!("point_time: {e}")))?;
    Ok((m, t))
}

/// Where a point's disks are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// qcow2 chain: disk name -> top file path.
    Qcow2 {
        /// Disk name -> the point's qcow2 file.
        files: BTreeMap<String, String>,
    },
    /// A restore point of a ferry replica.
    Ferry {
        /// Replica name in the datastore.
        replica: String,
        /// Restore point id.
        point: u64,
        /// Disk name -> size.
        disks: BTreeMap<String, u64>,
    },
}

/// A restore point found in a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPoint {
    /// Repository (as given).
    pub repo: String,
    /// Point id within the repository.
    pub id: String,
    /// VM.
    pub vm: String,
    /// Point time, ns since the epoch.
    pub time_ns: i64,
    /// Parent point id in the same repository (None: full or unknown).
    pub parent: Option<String>,
    /// Where the disks are.
    pub locator: Locator,
}

impl BackupPoint {
    /// `REPO:ID` for messages.
    pub fn label(&self) -> String {
        format!("{}:{}", self.repo, self.id)
    }

    /// Disk names.
    pub fn disk_names(&self) -> Vec<String> {
        match &self.locator {
            Locator::Qcow2 { files } => files.keys().cloned().collect(),
            Locator::Ferry { disks, .. } => disks.keys().cloned().collect(),
        }
    }
}

/// Check the parents named by the points of one repository: they must exist
/// and belong to the same VM.
pub fn check_parents(points: &[BackupPoint]) -> Result<(), BackupError> {
    for p in points {
        if let Some(parent) = &p.parent {
            match points.iter().find(|q| q.repo == p.repo && &q.id == parent) {
                None => {
                    return Err(BackupError::MissingParent {
                        point: p.label(),
                        vm: p.vm.clone(),
                        parent: parent.clone(),
                    })
                }
                Some(q) if q.vm != p.vm => {
                    return Err(BackupError::OtherVm {
                        point: p.label(),
                        vm: p.vm.clone(),
                        other: q.label(),
                        other_vm: q.vm.clone(),
                    })
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Check that no file of a qcow2 chain belongs to a point of another VM.
/// `chains[(point index, disk)]` is the chain of files, top first.
pub fn check_chains(
    points: &[BackupPoint],
    chains: &BTreeMap<(usize, String), Vec<String>>,
) -> Result<(), BackupError> {
    let mut owner: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, p) in points.iter().enumerate() {
        if let Locator::Qcow2 { files } = &p.locator {
            for f in files.values() {
                owner.insert(f.as_str(), i);
            }
        }
    }
    for ((i, _disk), chain) in chains {
        let p = &points[*i];
        for f in chain.iter().skip(1) {
            if let Some(&j) = owner.get(f.as_str()) {
                let q = &points[j];
                if q.vm != p.vm {
                    return Err(BackupError::OtherVm {
                        point: p.label(),
                        vm: p.vm.clone(),
                        other: q.label(),
                        other_vm: q.vm.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The points of `vm` to replicate, oldest first: the latest one newer than
/// `replica_latest_ns` (or, with `catch_up`, every newer one). Empty when the
/// latest point is already replicated.
pub fn select<'a>(
    points: &'a [BackupPoint],
    vm: &str,
    replica_latest_ns: Option<i64>,
    catch_up: bool,
) -> Result<Vec<&'a BackupPoint>, BackupError> {
    let mut mine: Vec<&BackupPoint> = points.iter().filter(|p| p.vm == vm).collect();
    if mine.is_empty() {
        let found: BTreeSet<&str> = points.iter().map(|p| p.vm.as_str()).collect();
        let found =
            if found.is_empty() { "none".to_string() } else { found.into_iter().collect::<Vec<_>>().join(", ") };
        return Err(BackupError::UnknownVm { vm: vm.to_string(), found });
    }
    mine.sort_by_key(|p| p.time_ns);
    for w in mine.windows(2) {
        if w[0].time_ns == w[1].time_ns {
            return Err(BackupError::SameTime {
                vm: vm.to_string(),
                time: crate::time::format_rfc3339(w[0].time_ns),
                a: w[0].label(),
                b: w[1].label(),
            });
        }
    }
    let newer: Vec<&BackupPoint> =
        mine.into_iter().filter(|p| replica_latest_ns.is_none_or(|t| p.time_ns > t)).collect();
    Ok(if catch_up { newer } else { newer.last().copied().into_iter().collect() })
}

/// The ancestors of `point` in its repository, nearest first (by `parent`).
pub fn ancestors<'a>(points: &'a [BackupPoint], point: &BackupPoint) -> Vec<&'a BackupPoint> {
    let mut out: Vec<&BackupPoint> = Vec::new();
    let mut cur = point.parent.clone();
    while let Some(id) = cur {
        match points.iter().find(|q| q.repo == point.repo && q.id == id) {
            Some(q) if !out.iter().any(|o| o.id == q.id) => {
                out.push(q);
                cur = q.parent.clone();
            }
            _ => break,
        }
    }
    out
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Offset.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Layer of the chain serving it (0: the top file).
    pub depth: u64,
    /// Allocated in some layer.
    pub present: bool,
}

/// Parse `qemu-img map --output=json` output.
pub fn parse_qemu_map(label: &str, content: &[u8]) -> Result<Vec<MapEntry>, BackupError> {
    let bad = |reason: String| BackupError::BadImageInfo { label: label.to_string(), reason };
    let v: Value = serde_json::from_slice(content).map_err(|e| bad(e.to_string()))?;
    let items = v.as_array().ok_or_else(|| bad("expected a JSON array".into()))?;
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let num = |k: &str| it.get(k).and_then(Value::as_u64).ok_or_else(|| bad(format!("entry {i}: no {k}")));
        let present = match it.get("present").and_then(Value::as_bool) {
            Some(p) => p,
            // Older qemu-img: no "present"; allocated means data or an explicit zero at this layer.
            None => it.get("data").and_then(Value::as_bool).unwrap_or(false),
        };
        out.push(MapEntry { start: num("start")?, length: num("length")?, depth: num("depth")?, present });
    }
    Ok(out)
}

/// Extents allocated above layer `depth` (the layers 0..depth, top first):
/// what changed since the image at that layer.
pub fn changed_above(entries: &[MapEntry], depth: u64) -> ChangeMap {
    ChangeMap::from_extents(
        entries.iter().filter(|e| e.present && e.depth < depth).map(|e| Extent::new(e.start, e.length)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(repo: &str, id: &str, vm: &str, t: i64, parent: Option<&str>) -> BackupPoint {
        BackupPoint {
            repo: repo.into(),
            id: id.into(),
            vm: vm.into(),
            time_ns: t,
            parent: parent.map(String::from),
            locator: Locator::Qcow2 { files: BTreeMap::from([("sda".into(), format!("{repo}/{id}.qcow2"))]) },
        }
    }

    #[test]
    fn selects_latest_or_every_newer() {
        let pts = vec![
            pt("r1", "sun", "vm", 10, None),
            pt("r1", "tue", "vm", 30, Some("sun")),
            pt("r2", "mon", "vm", 20, None),
        ];
        let ids = |v: Vec<&BackupPoint>| v.into_iter().map(|p| p.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(select(&pts, "vm", None, false).unwrap()), ["tue"]);
        assert_eq!(ids(select(&pts, "vm", None, true).unwrap()), ["sun", "mon", "tue"]);
        assert_eq!(ids(select(&pts, "vm", Some(10), true).unwrap()), ["mon", "tue"]);
        assert!(select(&pts, "vm", Some(30), false).unwrap().is_empty());
        assert!(select(&pts, "vm", Some(31), true).unwrap().is_empty());
        let e = select(&pts, "db", None, false).unwrap_err();
        assert_eq!(e.to_string(), "no restore point of VM \"db\" in the backup repositories (VMs found: vm)");
        let ancestors: Vec<_> = ancestors(&pts, &pts[1]).into_iter().map(|p| p.id.clone()).collect();
        assert_eq!(ancestors, ["sun"]);
    }

    #[test]
    fn same_time_and_parents() {
        let pts = vec![pt("r1", "a", "vm", 10, None), pt("r2", "b", "vm", 10, None)];
        assert!(matches!(select(&pts, "vm", None, false), Err(BackupError::SameTime { .. })));
        let pts = vec![pt("r1", "a", "other", 10, None), pt("r1", "b", "vm", 20, Some("a"))];
        assert!(matches!(check_parents(&pts), Err(BackupError::OtherVm { .. })));
        let pts = vec![pt("r1", "b", "vm", 20, Some("x"))];
        assert!(matches!(check_parents(&pts), Err(BackupError::MissingParent { .. })));
        let pts = vec![pt("r1", "a", "other", 10, None), pt("r1", "b", "vm", 20, None)];
        let chains =
            BTreeMap::from([((1, "sda".to_string()), vec!["r1/b.qcow2".to_string(), "r1/a.qcow2".to_string()])]);
        assert!(matches!(check_chains(&pts, &chains), Err(BackupError::OtherVm { .. })));
    }

    #[test]
    fn manifests() {
        let ok = br#"{"format":"ferry-backup-point/1","vm":"vm","point_time":"2026-11-22T03:00:00Z","disks":{"sda":"a.qcow2"},"parent":null}"#;
        let (m, t) = parse_manifest("m.json", ok).unwrap();
        assert_eq!((m.vm.as_str(), t), ("vm", 1_795_316_400 * 1_000_000_000));
        let e = parse_manifest("m.json", b"{").unwrap_err().to_string();
        assert!(e.starts_with("broken manifest m.json: "), "{e}");
        let no_time = br#"{"format":"ferry-backup-point/1","vm":"vm","point_time":"sunday","disks":{"sda":"a"}}"#;
        assert!(parse_manifest("m.json", no_time).unwrap_err().to_string().contains("point_time"));
    }

    #[test]
    fn qemu_map() {
        let m = br#"[{ "start": 0, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true},
            { "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true},
            { "start": 131072, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false},
            { "start": 196608, "length": 65536, "depth": 2, "present": false, "zero": true, "data": false}]"#;
        let e = parse_qemu_map("map", m).unwrap();
        assert_eq!(changed_above(&e, 1).extents(), &[Extent::new(65536, 131072)]);
        assert_eq!(changed_above(&e, 2).extents(), &[Extent::new(0, 196608)]);
        assert!(changed_above(&e, 0).is_empty());
    }
}
