//! The target datastore: a directory of replicas (see DATASTORE.md).
//!
//! ```text
//! DATASTORE/
//!   ferry-datastore.json        {"format":"ferry-datastore","version":1}
//!   REPLICA/
//!     lock                      flock()ed by the session writing the replica
//!     replica.json              settings: chunk size, retention
//!     catalog.json              restore points, oldest first
//!     session.json              only while a session is in progress (resume state)
//!     rollback.json             only while a rollback is pending (its intent record)
//!     points.lock               flock()ed shared by exports and verify, exclusively by
//!                               rollback and prune
//!     disks/DISK.img            latest state of each disk: flat, sparse
//!     disks/DISK.digests        BLAKE3 per chunk of DISK.img
//! ```
//!
//! Every metadata file is replaced atomically: written to a temporary file,
//! fsynced, renamed over the old one, and the directory fsynced.
//!
//! Modes: VM disks hold secrets, so every directory the datastore creates is
//! created with mode 0700 and every file with 0600 ([`DIR_MODE`],
//! [`FILE_MODE`]), whatever the umask (a umask only takes bits away). Files
//! and directories that exist already (a datastore made by an older ferry,
//! a seed placed by hand) keep their modes: ferry never chmods what it did
//! not create; `chmod -R go-rwx DATASTORE` tightens an old one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

/// Version of the datastore layout. DO NOT MODIFY without a migration.
pub const DATASTORE_VERSION: u32 = 1;
const MARKER: &str = "ferry-datastore.json";
/// Longest replica or disk name in bytes.
pub const MAX_NAME: usize = 128;
/// Mode of the directories the datastore creates: the owner's only.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files the datastore creates: the owner's only.
pub const FILE_MODE: u32 = 0o600;

/// Create `dir` and its missing parents with [`DIR_MODE`] (existing ones keep theirs).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Options that create a file with [`FILE_MODE`] (an existing file keeps its mode).
pub fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Check a replica or disk name: it becomes a file or directory name, so it
/// must not escape the datastore.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let bad = |why: &str| Err(StoreError::BadName(format!("{kind} name {name:?} is not allowed: {why}")));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME {
        return bad(&format!("longer than {MAX_NAME} bytes"));
    }
    if name == "." || name == ".." || name.starts_with('.') {
        return bad("must not start with '.'");
    }
    if let Some(c) = name.chars().find(|c| *c == '/' || *c == '\\' || c.is_control()) {
        return bad(&format!("contains {c:?}"));
    }
    Ok(())
}

/// Replica settings, fixed when the replica is created (chunk size) or set by the user (retention).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaSettings {
    /// Layout version.
    pub version: u32,
    /// Chunk size of every disk of the replica.
    pub chunk_size: u32,
    /// Restore points to keep.
    pub retain: u32,
    /// Creation time (ns since the epoch).
    pub created_ns: i64,
}

/// One disk's part of a restore point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointDisk {
    /// Disk name.
    pub name: String,
    /// Size of the disk at this point.
    pub size: u64,
    /// Chunks written by the session that made this point.
    pub chunks_changed: u64,
    /// Logical bytes written by that session.
    pub bytes_changed: u64,
    /// This disk's undo file for this point (`undo/ID/DISK.undo`), as the session that
    /// made the next point left it: written at that commit, cleared when a rollback makes
    /// this point the latest again. `None`: the latest point, or a catalog written by a
    /// ferry that did not record it (nothing to check the file against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<UndoExtent>,
}

/// What an undo file held when its point stopped being the latest: `points verify`,
/// exports and rollbacks check the file against it (a file cut at a record boundary
/// reads as intact on its own).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct UndoExtent {
    /// Length of the file; 0: there is no file (no chunk of the disk changed).
    pub bytes: u64,
    /// Records in it.
    pub records: u64,
}

/// A restore point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestorePoint {
    /// Id, increasing.
    pub id: u64,
    /// The source's point in time (ns since the epoch).
    pub point_time_ns: i64,
    /// When the point was completed at the target (ns).
    pub completed_ns: i64,
    /// Software that made it.
    pub ferry_version: String,
    /// Session that made it (hex).
    pub session_id: String,
    /// Disks at this point.
    pub disks: Vec<PointDisk>,
}

/// The catalog of restore points.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Catalog {
    /// Layout version.
    pub version: u32,
    /// Next point id.
    pub next_id: u64,
    /// Points, oldest first. The last one is the state of the images.
    pub points: Vec<RestorePoint>,
    /// BLAKE3 (hex) of catalog.json as written with this field all zeros: checked
    /// whenever the catalog is read. Absent from catalogs written before ferry kept it
    /// (read as they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// The checksum field's value while the catalog's checksum is computed.
const CHECKSUM_PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The bytes of catalog.json for `c`, with its checksum.
pub fn encode_catalog(c: &Catalog) -> Vec<u8> {
    let mut c = c.clone();
    c.checksum = Some(CHECKSUM_PLACEHOLDER.into());
    let mut bytes = serde_json::to_vec_pretty(&c).expect("json");
    bytes.push(b'\n');
    let sum = blake3::hash(&bytes).to_hex();
    let at = checksum_at(&bytes, CHECKSUM_PLACEHOLDER).expect("the placeholder was just written");
    bytes[at..at + 64].copy_from_slice(sum.as_bytes());
    bytes
}

/// Where the value `hex` of the `"checksum"` field starts in `bytes`.
fn checksum_at(bytes: &[u8], hex: &str) -> Option<usize> {
    let needle = format!("\"checksum\": \"{hex}\"");
    let n = needle.as_bytes();
    bytes.windows(n.len()).position(|w| w == n).map(|p| p + n.len() - 65)
}

/// Parse catalog.json, checking its checksum when it has one.
pub fn decode_catalog(path: &Path, bytes: &[u8]) -> Result<Catalog> {
    let c: Catalog = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Damaged(format!("{} is corrupt ({e}); the datastore needs repair", path.display())))?;
    if let Some(sum) = &c.checksum {
        let ok = sum.len() == 64
            && checksum_at(bytes, sum).is_some_and(|at| {
                let mut b = bytes.to_vec();
                b[at..at + 64].copy_from_slice(CHECKSUM_PLACEHOLDER.as_bytes());
                blake3::hash(&b).to_hex().as_str() == sum
            });
        if !ok {
            return Err(StoreError::Damaged(format!(
                "{} does not match its checksum: it was changed outside ferry or is damaged; \
                 the restore points it lists cannot be trusted",
                path.display()
            )));
        }
    }
    Ok(c)
}

/// State of one disk in a session in progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionDisk {
    /// Size the source announced.
    pub size: u64,
    /// Size at the target before the session.
    pub previous_size: u64,
    /// First chunk not yet durable.
    pub next_chunk: u64,
    /// Chunks written so far.
    pub chunks_changed: u64,
    /// Bytes written so far.
    pub bytes_changed: u64,
    /// The latest point's undo file of this disk as far as it was durable at the last
    /// checkpoint: a record before its end that does not check out is damage, not a torn
    /// tail (the file is not cut there). Absent before the first checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_durable: Option<UndoExtent>,
}

/// A session in progress: written at every checkpoint, removed at commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionState {
    /// Layout version.
    pub version: u32,
    /// Session id (hex).
    pub session_id: String,
    /// Point time of the point being made.
    pub point_time_ns: i64,
    /// When the session started (ns).
    pub started_ns: i64,
    /// Disks by name.
    pub disks: BTreeMap<String, SessionDisk>,
}

/// Current time in ns since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Write `bytes` to `dir/name` atomically and durably.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    write_atomic_parts(dir, name, &[bytes])
}

/// [`write_atomic`] of the concatenation of `parts` (not made in memory).
pub fn write_atomic_parts(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    let mut f = private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| StoreError::file("creating", &tmp, e))?;
    parts
        .iter()
        .try_for_each(|p| f.write_all(p))
        .and_then(|_| f.sync_all())
        .map_err(|e| StoreError::file("writing", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, &dst).map_err(|e| StoreError::file("renaming into place", &dst, e))?;
    sync_dir(dir)
}

/// [`write_atomic`] of what `write` writes (through a buffer): a file built as it is
/// written, never whole in memory.
pub fn write_atomic_with(
    dir: &Path,
    name: &str,
    write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    write_atomic_with_sync(dir, name, write, true)
}

/// [`write_atomic_with`]; `sync: false` leaves out the temporary file's fsync (only for
/// the power-loss tests' `FERRY_TEST_SKIP_FSYNC=map`, crate `fault`).
pub(crate) fn write_atomic_with_sync(
    dir: &Path,
    name: &str,
    write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    sync: bool,
) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    let f = private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| StoreError::file("creating", &tmp, e))?;
    let mut w = std::io::BufWriter::with_capacity(256 << 10, f);
    write(&mut w)
        .and_then(|_| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| if sync { f.sync_all() } else { Ok(()) })
        .map_err(|e| StoreError::file("writing", &tmp, e))?;
    fs::rename(&tmp, &dst).map_err(|e| StoreError::file("renaming into place", &dst, e))?;
    sync_dir(dir)
}

/// fsync a directory (makes renames and creations in it durable).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::file("syncing directory", dir, e))
}

/// Create `dir` and its missing parents durably: each directory created is made durable
/// in its parent (the parent is fsynced) before anything goes into it. A directory made by
/// `create_dir_all` alone can vanish at a power cut with everything later written in it,
/// however well synced (DATASTORE.md, "Durability").
pub fn create_dir_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    create_dir_durable(parent)?;
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => sync_dir(parent),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(StoreError::file("creating", dir, e)),
    }
}

/// Whether `root` holds only disks placed by hand before the first run:
/// replica directories with nothing but `disks/`, holding nothing but
/// `DISK.nbd` (an NBD placement) and `DISK.img` (a seed) files. Such a
/// directory becomes a datastore; anything else in it is someone else's.
fn is_prepared(root: &Path) -> bool {
    let entries =
        |d: &Path| -> Option<Vec<fs::DirEntry>> { fs::read_dir(d).ok()?.collect::<std::io::Result<_>>().ok() };
    let Some(replicas) = entries(root) else { return false };
    replicas.iter().all(|r| {
        let name = r.file_name();
        let Some(name) = name.to_str() else { return false };
        if validate_name("replica", name).is_err() || !r.file_type().is_ok_and(|t| t.is_dir()) {
            return false;
        }
        let Some(inside) = entries(&r.path()) else { return false };
        inside.iter().all(|e| {
            e.file_name() == "disks"
                && e.file_type().is_ok_and(|t| t.is_dir())
                && entries(&e.path()).is_some_and(|disks| {
                    disks.iter().all(|f| {
                        let n = f.file_name().to_string_lossy().into_owned();
                        let stem = n.strip_suffix(".nbd").or_else(|| n.strip_suffix(".img"));
                        f.file_type().is_ok_and(|t| t.is_file())
                            && stem.is_some_and(|s| validate_name("disk", s).is_ok())
                    })
                })
        })
    })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            StoreError::Damaged(format!("{} is corrupt ({e}); the datastore needs repair", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::file("reading", path, e)),
    }
}

/// A datastore directory.
#[derive(Debug, Clone)]
pub struct Datastore {
    root: PathBuf,
}

impl Datastore {
    /// Open a datastore, creating it (and its directory) when absent.
    pub fn open_or_create(root: &Path) -> Result<Datastore> {
        create_dir_durable(root)?;
        let marker = root.join(MARKER);
        if !marker.exists() {
            let non_empty = fs::read_dir(root).map_err(|e| StoreError::file("listing", root, e))?.next().is_some();
            if non_empty && !is_prepared(root) {
                return Err(StoreError::Invalid(format!(
                    "{} is not empty and not a ferry datastore; use an empty or new directory",
                    root.display()
                )));
            }
            write_atomic(
                root,
                MARKER,
                format!("{{\"format\":\"ferry-datastore\",\"version\":{DATASTORE_VERSION}}}\n").as_bytes(),
            )?;
        }
        Datastore::open(root)
    }

    /// Open an existing datastore.
    pub fn open(root: &Path) -> Result<Datastore> {
        let marker = root.join(MARKER);
        let v: Option<serde_json::Value> = read_json(&marker)?;
        let Some(v) = v else {
            return Err(StoreError::Invalid(format!("{} is not a ferry datastore (no {MARKER})", root.display())));
        };
        let version = v.get("version").and_then(|x| x.as_u64()).unwrap_or(0);
        if version != u64::from(DATASTORE_VERSION) {
            return Err(StoreError::Invalid(format!(
                "datastore {} has layout version {version}; this ferry reads version {DATASTORE_VERSION}",
                root.display()
            )));
        }
        Ok(Datastore { root: root.to_path_buf() })
    }

    /// A handle on a directory that may not be a datastore (yet), for
    /// plan-only reads: nothing is created, and replica lookups fail as
    /// "no replica" when it holds none.
    pub fn at(root: &Path) -> Datastore {
        Datastore { root: root.to_path_buf() }
    }

    /// The datastore's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of a replica (the name is validated).
    pub fn replica_dir(&self, name: &str) -> Result<PathBuf> {
        validate_name("replica", name)?;
        Ok(self.root.join(name))
    }

    /// Names of the replicas.
    pub fn replicas(&self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.root).map_err(|e| StoreError::file("listing", &self.root, e))? {
            let e = e.map_err(|e| StoreError::file("listing", &self.root, e))?;
            if e.path().join("replica.json").exists() {
                v.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        v.sort();
        Ok(v)
    }

    /// Open an existing replica for reading (no lock).
    pub fn replica(&self, name: &str) -> Result<Replica> {
        let dir = self.replica_dir(name)?;
        let settings: ReplicaSettings = read_json(&dir.join("replica.json"))?
            .ok_or_else(|| StoreError::NotFound(format!("no replica {name:?} in datastore {}", self.root.display())))?;
        Ok(Replica { name: name.to_string(), dir, settings, lock: None })
    }

    /// Lock a replica for writing, creating it with `chunk_size` and `retain` when new.
    ///
    /// A second writer gets [`StoreError::Busy`] at once.
    pub fn lock_replica(&self, name: &str, holder: &str, chunk_size: u32, retain: u32) -> Result<Replica> {
        let dir = self.replica_dir(name)?;
        create_dir_durable(&dir.join("disks"))?;
        let lock_path = dir.join("lock");
        let mut lock = private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| StoreError::file("opening lock", &lock_path, e))?;
        if !ferry_io::sys::try_lock_exclusive(&lock).map_err(|e| StoreError::file("locking", &lock_path, e))? {
            let holder = fs::read_to_string(&lock_path).unwrap_or_default().trim().to_string();
            return Err(StoreError::Busy {
                replica: name.to_string(),
                holder: if holder.is_empty() { "another session".into() } else { holder },
            });
        }
        let _ = lock.set_len(0).and_then(|_| lock.write_all(holder.as_bytes()));
        let settings_path = dir.join("replica.json");
        let settings = match read_json::<ReplicaSettings>(&settings_path)? {
            Some(mut s) => {
                if retain != 0 && retain != s.retain {
                    s.retain = retain;
                    write_atomic(&dir, "replica.json", &serde_json::to_vec_pretty(&s).expect("json"))?;
                }
                s
            }
            None => {
                let s = ReplicaSettings {
                    version: DATASTORE_VERSION,
                    chunk_size,
                    retain: if retain == 0 { 7 } else { retain },
                    created_ns: now_ns(),
                };
                write_atomic(&dir, "replica.json", &serde_json::to_vec_pretty(&s).expect("json"))?;
                s
            }
        };
        Ok(Replica { name: name.to_string(), dir, settings, lock: Some(lock) })
    }
}

/// The points lock of a replica, held until dropped ([`Replica::read_points`],
/// [`Replica::change_points`]).
#[derive(Debug)]
pub struct PointsLock {
    _file: Option<File>,
}

/// A replica, locked for writing or opened for reading.
#[derive(Debug)]
pub struct Replica {
    /// Replica name.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its settings.
    pub settings: ReplicaSettings,
    lock: Option<File>,
}

impl Replica {
    /// Change the replica's retention setting (replica.json, atomically).
    pub fn set_retain(&mut self, retain: u32) -> Result<()> {
        self.settings.retain = retain.max(1);
        write_atomic(&self.dir, "replica.json", &serde_json::to_vec_pretty(&self.settings).expect("json"))
    }

    /// True when this handle holds the write lock.
    pub fn is_locked(&self) -> bool {
        self.lock.is_some()
    }

    /// Path of a disk's image (the name is validated).
    pub fn disk_path(&self, disk: &str) -> Result<PathBuf> {
        validate_name("disk", disk)?;
        Ok(self.dir.join("disks").join(format!("{disk}.img")))
    }

    /// Path of the file that places a disk's image behind an NBD export (`disks/DISK.nbd`).
    pub fn nbd_file(&self, disk: &str) -> Result<PathBuf> {
        validate_name("disk", disk)?;
        Ok(self.dir.join("disks").join(format!("{disk}.nbd")))
    }

    /// The NBD URI in `disks/DISK.nbd`, when the disk's image is placed behind an export.
    pub fn nbd_uri(&self, disk: &str) -> Result<Option<String>> {
        let p = self.nbd_file(disk)?;
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::file("reading", &p, e)),
        };
        let uri = text.trim();
        if !ferry_nbd::is_nbd_uri(uri) || uri.contains(char::is_whitespace) {
            return Err(StoreError::Invalid(format!(
                "{} does not hold an NBD URI (one line: nbd://HOST[:PORT]/EXPORT or \
                 nbd+unix:///EXPORT?socket=PATH), it holds {uri:?}",
                p.display()
            )));
        }
        // An image next to the placement would be ignored while the digest map (and any
        // undo files) still describe it: the export would be trusted to hold what it may not.
        let img = self.disk_path(disk)?;
        if img.exists() {
            return Err(StoreError::Invalid(format!(
                "{} places disk {disk:?} behind {uri}, but {} exists too: copy the image into the \
                 export's file (for example `qemu-img convert -O qcow2 {} NEW.qcow2`, then serve \
                 NEW.qcow2) and remove {}; or remove {} to keep the image",
                p.display(),
                img.display(),
                img.display(),
                img.display(),
                p.display()
            )));
        }
        Ok(Some(uri.to_string()))
    }

    /// Path of a disk's digest map.
    pub fn digests_path(&self, disk: &str) -> Result<PathBuf> {
        validate_name("disk", disk)?;
        Ok(self.dir.join("disks").join(format!("{disk}.digests")))
    }

    /// The restore points (the catalog's checksum checked).
    pub fn catalog(&self) -> Result<Catalog> {
        let path = self.dir.join("catalog.json");
        match fs::read(&path) {
            Ok(b) => decode_catalog(&path, &b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Catalog { version: DATASTORE_VERSION, next_id: 1, points: vec![], checksum: None })
            }
            Err(e) => Err(StoreError::file("reading", &path, e)),
        }
    }

    /// Replace the catalog atomically (with a fresh checksum).
    pub fn write_catalog(&self, c: &Catalog) -> Result<()> {
        write_atomic(&self.dir, "catalog.json", &encode_catalog(c))
    }

    /// Take the points lock (`points.lock`) shared, without waiting: held by exports and
    /// `points verify` while they read restore points, so that nothing deletes or
    /// rewrites a point under them. A rollback or a prune holding it exclusively (they
    /// change or delete points) makes this [`StoreError::Busy`].
    pub fn read_points(&self, what: &str) -> Result<PointsLock> {
        self.points_lock(false, what)
    }

    /// Take the points lock exclusively, without waiting: for a rollback or a prune,
    /// which change or delete restore points. [`StoreError::Busy`] while an export or a
    /// verify reads them.
    pub fn change_points(&self, what: &str) -> Result<PointsLock> {
        self.points_lock(true, what)
    }

    fn points_lock(&self, exclusive: bool, what: &str) -> Result<PointsLock> {
        let path = self.dir.join("points.lock");
        let file = match private_file().read(true).write(true).create(true).truncate(false).open(&path) {
            Ok(f) => f,
            // A datastore on a read-only file system: nothing can change points there.
            Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PointsLock { _file: None }),
                Err(e) => return Err(StoreError::file("opening lock", &path, e)),
            },
            Err(e) => return Err(StoreError::file("opening lock", &path, e)),
        };
        let taken =
            if exclusive { ferry_io::sys::try_lock_exclusive(&file) } else { ferry_io::sys::try_lock_shared(&file) }
                .map_err(|e| StoreError::file("locking", &path, e))?;
        if !taken {
            let holder = if exclusive {
                "an export or `points verify` reading its restore points".to_string()
            } else {
                "a rollback or prune changing its restore points".to_string()
            };
            return Err(StoreError::Busy {
                replica: self.name.clone(),
                holder: format!("{holder}, so {what} cannot run now"),
            });
        }
        Ok(PointsLock { _file: Some(file) })
    }

    /// The interrupted session, if any.
    pub fn session(&self) -> Result<Option<SessionState>> {
        read_json(&self.dir.join("session.json"))
    }

    /// Replace the session state atomically.
    pub fn write_session(&self, s: &SessionState) -> Result<()> {
        write_atomic(&self.dir, "session.json", &serde_json::to_vec_pretty(s).expect("json"))
    }

    /// Remove the session state (after commit), durably.
    pub fn clear_session(&self) -> Result<()> {
        let p = self.dir.join("session.json");
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::file("removing", &p, e)),
        }
    }

    /// Names of the disks that have images (files or NBD placements).
    pub fn disks(&self) -> Result<Vec<String>> {
        let d = self.dir.join("disks");
        let mut v = Vec::new();
        for e in fs::read_dir(&d).map_err(|e| StoreError::file("listing", &d, e))? {
            let e = e.map_err(|e| StoreError::file("listing", &d, e))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = n.strip_suffix(".img").or_else(|| n.strip_suffix(".nbd")) {
                v.push(stem.to_string());
            }
        }
        v.sort();
        v.dedup();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a\0b", "a\nb", &"x".repeat(129)] {
            assert!(validate_name("disk", bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["vm1", "disk-0.img", "web server", "a=b", &"x".repeat(128)] {
            validate_name("disk", good).unwrap();
        }
    }

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open_or_create(dir.path()).unwrap();
        let a = ds.lock_replica("r", "first", 65536, 0).unwrap();
        let err = ds.lock_replica("r", "second", 65536, 0).unwrap_err();
        assert!(matches!(err, StoreError::Busy { ref holder, .. } if holder == "first"), "{err}");
        drop(a);
        ds.lock_replica("r", "third", 65536, 0).unwrap();
    }

    #[test]
    fn foreign_directory_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("something"), b"x").unwrap();
        assert!(Datastore::open_or_create(dir.path()).is_err());
        // Replica-like directories with anything besides disk placements are foreign too.
        let other = tempfile::tempdir().unwrap();
        fs::create_dir_all(other.path().join("vm1/disks")).unwrap();
        fs::write(other.path().join("vm1/disks/d0.nbd"), "nbd://h/e\n").unwrap();
        fs::write(other.path().join("vm1/disks/notes.txt"), "x").unwrap();
        assert!(Datastore::open_or_create(other.path()).is_err());
    }

    #[test]
    fn disks_placed_before_the_first_run_make_a_datastore() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("vm1/disks")).unwrap();
        fs::create_dir_all(dir.path().join("vm2/disks")).unwrap();
        fs::write(dir.path().join("vm1/disks/d0.nbd"), "nbd+unix:///?socket=/run/d0.sock\n").unwrap();
        fs::write(dir.path().join("vm1/disks/d1.img"), b"seed").unwrap();
        let ds = Datastore::open_or_create(dir.path()).unwrap();
        let r = ds.lock_replica("vm1", "test", 65536, 0).unwrap();
        assert_eq!(r.nbd_uri("d0").unwrap().as_deref(), Some("nbd+unix:///?socket=/run/d0.sock"));
        assert_eq!(r.nbd_uri("d1").unwrap(), None);
        assert_eq!(r.disks().unwrap(), ["d0", "d1"]);
        // An image and a placement for the same disk: refused, naming both.
        fs::write(dir.path().join("vm1/disks/d0.img"), b"old").unwrap();
        let err = r.nbd_uri("d0").unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("d0.nbd") && msg.contains("d0.img exists too"), "{msg}");
    }
}
