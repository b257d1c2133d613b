//! Replica from backup: the IO side. Lists the restore points of backup
//! repositories (ferry datastores, qcow2 chain directories; layouts and the
//! manifest format are in `ferry_planner::backup` and docs/BACKUP.md) and
//! turns one point into disks the source pipeline can read.
//!
//! How a point is read:
//! - qcow2: a read-only `qemu-nbd` serves the point's top file (qemu follows
//!   the backing chain) on a unix socket in a private work directory, and the
//!   source pipeline reads it with ferry's NBD client: cbt mode reads only the
//!   changed extents, digest mode skips holes. Without qemu-nbd:
//!   `qemu-img convert -U -O raw` into a temporary sparse file.
//! - ferry datastore: the source replica is locked while it is read (no
//!   session can change it meanwhile); its latest point is its image, read in
//!   place; an older point is first exported to a temporary sparse raw file
//!   with `ferry_datastore::points::export_point` (latest image plus the undo
//!   files of the newer points).
//!
//! The work directory and the servers go when the [`Prepared`] point is dropped.
//!
//! What changed since the replica's latest point, when that point is an
//! ancestor of the new one (same point time), is handed to cbt mode as
//! changed extents in memory (`ChangeSource::Extents`):
//! - qcow2: `qemu-img map --output=json` of the top file: the extents
//!   allocated in the layers above the ancestor's file;
//! - ferry: the chunks recorded in the undo files of the points from the
//!   ancestor up to the point before the new one (undo(K-1) holds the chunks
//!   point K overwrote).
//!
//! Otherwise the disks go in auto mode (digest when the replica has the disk).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_planner::backup::{self as plan, BackupPoint, Locator};
use ferry_planner::{ChangeMap, Extent};
use ferry_wire::Mode;

use ferry_datastore::image::Placement;
use ferry_datastore::{points, undo, Datastore, Replica};
use ferry_replicate::source::{ChangeSource, DiskSpec};

use crate::error::{BackupError, Result};

const DATASTORE_MARKER: &str = "ferry-datastore.json";

/// Every restore point of the given repositories, with the backing chains
/// of the qcow2 points, checked (parents, missing backing files, chains that
/// cross VMs).
#[derive(Debug, Clone)]
pub struct Inventory {
    /// All points of all repositories.
    pub points: Vec<BackupPoint>,
    /// (point index, disk) -> qcow2 chain, top first (canonical paths).
    pub chains: BTreeMap<(usize, String), Vec<String>>,
}

/// Scan the repositories. Any broken repository is an error.
pub fn scan(repos: &[PathBuf]) -> Result<Inventory> {
    let mut points = Vec::new();
    for r in repos {
        if !r.is_dir() {
            return Err(BackupError::Repository(format!("backup repository {} is not a directory", r.display())));
        }
        if r.join(DATASTORE_MARKER).exists() {
            points.extend(scan_ferry(r)?);
        } else {
            points.extend(scan_qcow2(r)?);
        }
    }
    let mut chains = BTreeMap::new();
    for (i, p) in points.iter().enumerate() {
        if let Locator::Qcow2 { files } = &p.locator {
            for (disk, f) in files {
                let chain = backing_chain(p, disk, Path::new(f))?;
                chains.insert((i, disk.clone()), chain);
            }
        }
    }
    plan::check_chains(&points, &chains).map_err(BackupError::from)?;
    plan::check_parents(&points).map_err(BackupError::from)?;
    Ok(Inventory { points, chains })
}

fn repo_label(r: &Path) -> String {
    r.display().to_string()
}

fn scan_ferry(repo: &Path) -> Result<Vec<BackupPoint>> {
    let ds = Datastore::open(repo)?;
    let mut out = Vec::new();
    for name in ds.replicas()? {
        let r = ds.replica(&name)?;
        let mut prev: Option<String> = None;
        for p in r.catalog()?.points {
            let id = p.id.to_string();
            out.push(BackupPoint {
                repo: repo_label(repo),
                id: format!("{name}#{id}"),
                vm: name.clone(),
                time_ns: p.point_time_ns,
                parent: prev.clone(),
                locator: Locator::Ferry {
                    replica: name.clone(),
                    point: p.id,
                    disks: p.disks.iter().map(|d| (d.name.clone(), d.size)).collect(),
                },
            });
            prev = Some(format!("{name}#{id}"));
        }
    }
    Ok(out)
}

fn canonical(path: &Path, what: &str) -> Result<String> {
    std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .map_err(|e| BackupError::Repository(format!("{what}: {} ({e})", path.display())))
}

fn scan_qcow2(repo: &Path) -> Result<Vec<BackupPoint>> {
    let mut out = Vec::new();
    let mut vm_dirs: Vec<PathBuf> = read_dir_sorted(repo)?.into_iter().filter(|p| p.is_dir()).collect();
    vm_dirs.sort();
    for dir in vm_dirs {
        let dir_vm = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let entries = read_dir_sorted(&dir)?;
        let mut named = Vec::new();
        for m in entries.iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
            let label = m.display().to_string();
            let content = std::fs::read(m).map_err(|e| BackupError::file("reading manifest", m, e))?;
            let (man, t) = plan::parse_manifest(&label, &content).map_err(BackupError::from)?;
            if man.vm != dir_vm {
                return Err(BackupError::Repository(format!(
                    "broken manifest {label}: it is for VM {:?} but lies in the directory of VM {dir_vm:?}",
                    man.vm
                )));
            }
            let mut files = BTreeMap::new();
            for (disk, f) in &man.disks {
                let path = dir.join(f);
                let c = canonical(&path, &format!("broken manifest {label}: disk {disk:?}: missing file"))?;
                named.push(c.clone());
                files.insert(disk.clone(), c);
            }
            let id = m.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(BackupPoint {
                repo: repo_label(repo),
                id: format!("{dir_vm}/{id}"),
                vm: man.vm,
                time_ns: t,
                parent: man.parent.map(|p| format!("{dir_vm}/{p}")),
                locator: Locator::Qcow2 { files },
            });
        }
        for q in entries.iter().filter(|p| p.extension().is_some_and(|e| e == "qcow2")) {
            let c = canonical(q, "qcow2 file")?;
            if named.contains(&c) {
                continue;
            }
            let fname = q.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let disk = fname.split('.').next().unwrap_or("disk").to_string();
            let meta = std::fs::metadata(q).map_err(|e| BackupError::file("inspecting", q, e))?;
            let mtime = meta.modified().map_err(|e| BackupError::file("inspecting", q, e))?;
            let ns = mtime.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
            let stem = q.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(BackupPoint {
                repo: repo_label(repo),
                id: format!("{dir_vm}/{stem}"),
                vm: dir_vm.clone(),
                time_ns: ns,
                parent: None,
                locator: Locator::Qcow2 { files: BTreeMap::from([(disk, c)]) },
            });
        }
    }
    Ok(out)
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| BackupError::file("listing", dir, e))? {
        v.push(e.map_err(|e| BackupError::file("listing", dir, e))?.path());
    }
    v.sort();
    Ok(v)
}

fn qemu_img(args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|source| BackupError::ToolMissing { tool: "qemu-img", source })?;
    if !out.status.success() {
        return Err(BackupError::ToolFailed {
            tool: format!("qemu-img {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// The backing chain of `top`, top first, each backing file checked to exist.
fn backing_chain(p: &BackupPoint, disk: &str, top: &Path) -> Result<Vec<String>> {
    let mut chain = vec![top.display().to_string()];
    let mut cur = top.to_path_buf();
    loop {
        let label = cur.display().to_string();
        let out = qemu_img(&["info", "-U", "--output=json", &label])?;
        let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| BackupError::ToolFailed {
            tool: format!("qemu-img info {label}"),
            detail: format!("unreadable output: {e}"),
        })?;
        let Some(b) = v.get("backing-filename").and_then(|b| b.as_str()) else { break };
        let b = Path::new(b);
        let path = if b.is_absolute() { b.to_path_buf() } else { cur.parent().unwrap_or(Path::new(".")).join(b) };
        let c = std::fs::canonicalize(&path).map_err(|_| {
            BackupError::Repository(format!(
                "restore point {} disk {disk:?}: backing file {} of {label} is missing",
                p.label(),
                path.display()
            ))
        })?;
        let c = c.display().to_string();
        if chain.contains(&c) || chain.len() > 1000 {
            return Err(BackupError::Repository(format!(
                "restore point {}: backing chain of {label} loops",
                p.label()
            )));
        }
        chain.push(c);
        cur = PathBuf::from(chain.last().expect("pushed"));
    }
    Ok(chain)
}

/// A private work directory, removed on drop.
#[derive(Debug)]
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// Create one under `parent` (the system temp directory by default).
    pub fn new(parent: Option<&Path>) -> Result<WorkDir> {
        let base = parent.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
        let rnd = u64::from_le_bytes(ferry_replicate::auth::random_bytes::<8>());
        let dir = base.join(format!("ferry-backup-{}-{rnd:016x}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| BackupError::file("creating work directory", &dir, e))?;
        Ok(WorkDir(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A read-only `qemu-nbd` serving one qcow2 point on a unix socket; killed and reaped on drop.
#[derive(Debug)]
pub struct QemuNbd {
    child: std::process::Child,
    /// `nbd+unix:///?socket=PATH`.
    pub uri: String,
}

impl QemuNbd {
    /// True when `qemu-nbd` can be run.
    pub fn available() -> bool {
        Command::new("qemu-nbd").arg("--version").output().is_ok_and(|o| o.status.success())
    }

    /// Serve `image` (qcow2, read-only) on `sock`.
    pub fn start(image: &str, sock: &Path) -> Result<QemuNbd> {
        use std::io::Read;
        let _ = std::fs::remove_file(sock);
        let mut child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=8", "--format=qcow2"])
            .arg(format!("--socket={}", sock.display()))
            .arg(image)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|source| BackupError::ToolMissing { tool: "qemu-nbd", source })?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                let tool = format!("qemu-nbd serving {image}");
                return Err(BackupError::ToolFailed { tool, detail: err.trim().to_string() });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(QemuNbd { child, uri: format!("nbd+unix:///?socket={}", sock.display()) })
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A point ready to replicate: disks to read, and what serves them.
#[derive(Debug)]
pub struct Prepared {
    /// Disks (NBD exports of qemu-nbd, or raw files in the work directory).
    pub disks: Vec<DiskSpec>,
    /// How the changes were found, for messages.
    pub how: String,
    /// qemu-nbd servers (dropped before the work directory).
    pub servers: Vec<QemuNbd>,
    /// A ferry replica being read, locked so no session changes it meanwhile.
    pub source_lock: Option<Replica>,
    /// Keeps the files alive.
    pub work: WorkDir,
}

/// Materialise `point` for replication onto a replica whose latest point time is `replica_latest_ns`.
pub fn prepare(inv: &Inventory, point: &BackupPoint, replica_latest_ns: Option<i64>) -> Result<Prepared> {
    let work = WorkDir::new(None)?;
    let idx = inv.points.iter().position(|p| p == point).expect("point of the inventory");
    // The ancestor the replica is at, if any.
    let base = replica_latest_ns
        .and_then(|t| plan::ancestors(&inv.points, point).into_iter().find(|a| a.time_ns == t))
        .cloned();
    let mut disks = Vec::new();
    let mut servers = Vec::new();
    let mut source_lock = None;
    let use_nbd = QemuNbd::available();
    let mut how = match &base {
        Some(b) => format!("changes since {}", b.label()),
        None => "what differs from the replica".to_string(),
    };
    match &point.locator {
        Locator::Qcow2 { files } => {
            for (disk, top) in files {
                let path = if use_nbd {
                    let server = QemuNbd::start(top, &work.path().join(format!("{}.sock", servers.len())))?;
                    let uri = PathBuf::from(&server.uri);
                    servers.push(server);
                    uri
                } else {
                    let raw = work.path().join(format!("{disk}.raw"));
                    qemu_img(&["convert", "-U", "-f", "qcow2", "-O", "raw", top, &raw.display().to_string()])?;
                    raw
                };
                let mut spec = DiskSpec { name: disk.clone(), path, mode: None, cbt: None };
                let chain = &inv.chains[&(idx, disk.clone())];
                // The replica's point, if it is in this disk's backing chain (the chain decides, not the
                // manifests' parents: manifest-less overlays are diffed too).
                let found = replica_latest_ns.and_then(|t| {
                    inv.points.iter().filter(|q| q.vm == point.vm && q.time_ns == t).find_map(|q| match &q.locator {
                        Locator::Qcow2 { files } => {
                            files.get(disk).and_then(|f| chain.iter().position(|c| c == f)).map(|d| (d, q.label()))
                        }
                        Locator::Ferry { .. } => None,
                    })
                });
                match found {
                    Some((d, label)) => {
                        how = format!("changes since {label}");
                        let out = qemu_img(&["map", "-U", "-f", "qcow2", "--output=json", top])?;
                        let entries = plan::parse_qemu_map(top, &out).map_err(BackupError::from)?;
                        let map = plan::changed_above(&entries, d as u64);
                        spec.mode = Some(Mode::Cbt);
                        spec.cbt = Some(ChangeSource::Extents(map));
                    }
                    None => how = "what differs from the replica".to_string(),
                }
                disks.push(spec);
            }
        }
        Locator::Ferry { replica, point: id, disks: sizes } => {
            let repo = PathBuf::from(&point.repo);
            let ds = Datastore::open(&repo)?;
            // Held until the point is replicated: no session may change the images or undo files meanwhile.
            let r = ds.lock_replica(replica, "ferry replicate --from-backup (reading it)", 0, 0)?;
            let catalog = r.catalog()?;
            let latest = catalog.points.last().is_some_and(|p| p.id == *id) && r.session()?.is_none();
            for (disk, &size) in sizes {
                // An image behind an NBD export (DISK.nbd) is larger than the disk and serves one
                // client: it is exported to a raw file like an older point.
                let image = match Placement::of(&r, disk)? {
                    Placement::File(p) => Some(p),
                    Placement::Nbd(_) => None,
                };
                let path = if let Some(image) =
                    image.filter(|i| latest && std::fs::metadata(i).is_ok_and(|m| m.len() == size))
                {
                    // The latest point is the image itself: read it in place (cbt reads only the changes).
                    image
                } else {
                    let raw = work.path().join(format!("{disk}.raw"));
                    points::export_point(&ds, replica, disk, Some(*id), &raw, points::ExportOptions { force: true })?;
                    raw
                };
                let mut spec = DiskSpec { name: disk.clone(), path, mode: None, cbt: None };
                if let Some(Locator::Ferry { point: from, .. }) = base.as_ref().map(|b| &b.locator) {
                    // undo(J) holds the chunks point J+1 overwrote: J from the base up to the point before this one.
                    let mut map = ChangeMap::new();
                    let mut complete = true;
                    for p in catalog.points.iter().filter(|p| p.id >= *from && p.id < *id) {
                        let path = undo::undo_path(&r.dir, p.id, disk);
                        if !path.exists() {
                            // The disk did not change at p+1 only if p+1 lists it; be safe otherwise.
                            complete = false;
                            break;
                        }
                        let extent = p.disks.iter().find(|d| &d.name == disk).and_then(|d| d.undo);
                        let u = undo::UndoReader::open(&path, undo::Tail::Complete(extent))?;
                        let cs = u64::from(u.chunk_size);
                        for &c in u.records.keys() {
                            map.insert(Extent::new(c * cs, cs));
                        }
                    }
                    if complete {
                        let map = map.clip(size);
                        spec.mode = Some(Mode::Cbt);
                        spec.cbt = Some(ChangeSource::Extents(map));
                    } else {
                        how = "what differs from the replica".to_string();
                    }
                }
                disks.push(spec);
            }
            source_lock = Some(r);
        }
    }
    Ok(Prepared { disks, how, servers, source_lock, work })
}
