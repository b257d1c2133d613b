//! The image of a replica disk: where its latest state lives.
//!
//! By default a file in the datastore, `disks/DISK.img` (flat, sparse). When
//! `disks/DISK.nbd` exists, it holds one NBD URI (`nbd://HOST[:PORT]/EXPORT`
//! or `nbd+unix:///EXPORT?socket=PATH`) and the image is that export (for
//! example `qemu-nbd -t -f qcow2` over a qcow2 file at the DR site); all
//! metadata (digest maps, undo files, session state, catalog) stays in the
//! datastore directory either way.
//!
//! Everything that reads or writes an image goes through [`ReplicaImage`]:
//! the writer, undo saves, hashing of unknown digests, resize, export,
//! rollback and verify. The differences it hides:
//! - Zeroing: a file gets a hole punched; an export gets NBD_CMD_WRITE_ZEROES
//!   without NO_HOLE, so qcow2 and other formats may deallocate. TRIM is not
//!   used: the NBD spec does not promise that trimmed blocks read as zeros,
//!   and the digest map says they are zeros.
//! - Durability: fdatasync for a file, NBD_CMD_FLUSH for an export.
//! - Size: a file is resized to the disk's size. An export cannot be resized
//!   by ferry: the disk's size (the source's, recorded in the points and the
//!   session) must fit in it, and the bytes of the export beyond that size
//!   are kept zero, so that `qemu-img compare` of the source and the export
//!   finds them identical. [`ReplicaImage::capacity`] is the file's length or the
//!   export's size; the disk's logical size is the caller's to know.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Result, StoreError};
use crate::store::Replica;
use ferry_nbd::proto::STATE_ZERO;
use ferry_nbd::{NbdClient, NbdError, NbdOptions};

/// The NBD metadata context of allocation (holes and zeros).
const ALLOCATION: &str = "base:allocation";

/// Where a replica disk's image is placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// `disks/DISK.img` in the datastore.
    File(PathBuf),
    /// The NBD export named in `disks/DISK.nbd`.
    Nbd(String),
}

impl Placement {
    /// Where disk `disk` of replica `r` lives: `disks/DISK.nbd` names an export, else `disks/DISK.img`.
    pub fn of(r: &Replica, disk: &str) -> Result<Placement> {
        match r.nbd_uri(disk)? {
            Some(uri) => Ok(Placement::Nbd(uri)),
            None => Ok(Placement::File(r.disk_path(disk)?)),
        }
    }

    /// Whether the image is an NBD export.
    pub fn is_nbd(&self) -> bool {
        matches!(self, Placement::Nbd(_))
    }
}

/// An open replica disk image.
pub enum ReplicaImage {
    /// A file in the datastore.
    File {
        /// The open file (read-write, or read-only for exports and verify).
        file: File,
        /// Its path, for messages.
        path: PathBuf,
        /// Disk name, for messages.
        disk: String,
    },
    /// An NBD export: one connection for this disk, shared with the writer's backend.
    Nbd {
        /// The connection.
        client: Arc<Mutex<NbdClient>>,
        /// The URI, for messages.
        uri: String,
        /// Disk name, for messages.
        disk: String,
        /// Size of the export.
        size: u64,
        /// Whether the server granted `base:allocation`.
        allocation: bool,
    },
}

impl std::fmt::Debug for ReplicaImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaImage::File { path, disk, .. } => {
                f.debug_struct("ReplicaImage::File").field("disk", disk).field("path", path).finish()
            }
            ReplicaImage::Nbd { uri, disk, size, .. } => {
                f.debug_struct("ReplicaImage::Nbd").field("disk", disk).field("uri", uri).field("size", size).finish()
            }
        }
    }
}

/// An NBD error on a replica disk's export as a [`StoreError`].
pub fn nbd_error(what: &'static str, disk: &str, uri: &str, e: NbdError) -> StoreError {
    StoreError::Nbd { what, disk: disk.to_string(), uri: uri.to_string(), source: Box::new(e) }
}

/// An `io::Error` from the NBD backend (an [`NbdError`] inside, or a message) as a [`StoreError`].
pub fn nbd_io_error(what: &'static str, disk: &str, uri: &str, e: io::Error) -> StoreError {
    let source = match e.into_inner().map(|i| i.downcast::<NbdError>()) {
        Some(Ok(n)) => *n,
        Some(Err(other)) => NbdError::Broken(other.to_string()),
        None => NbdError::Broken("IO error".into()),
    };
    nbd_error(what, disk, uri, source)
}

impl ReplicaImage {
    /// Open disk `disk` of `r` for writing: the file is created if absent; the
    /// export must be writable.
    pub fn open_rw(r: &Replica, disk: &str) -> Result<ReplicaImage> {
        match Placement::of(r, disk)? {
            Placement::File(path) => {
                let file = crate::store::private_file()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| StoreError::file("opening replica disk", &path, e))?;
                Ok(ReplicaImage::File { file, path, disk: disk.to_string() })
            }
            Placement::Nbd(uri) => {
                let img = ReplicaImage::connect(disk, &uri)?;
                if let ReplicaImage::Nbd { client, .. } = &img {
                    if lock(client).is_read_only() {
                        return Err(StoreError::Invalid(format!(
                            "disk {disk:?}: the NBD export {uri} (named in {}) is read-only; serve it writable \
                             (qemu-nbd without -r)",
                            r.nbd_file(disk)?.display()
                        )));
                    }
                }
                Ok(img)
            }
        }
    }

    /// Open disk `disk` of `r` for reading; `None` when it is a file that does not exist.
    pub fn open_ro(r: &Replica, disk: &str) -> Result<Option<ReplicaImage>> {
        match Placement::of(r, disk)? {
            Placement::File(path) => match File::open(&path) {
                Ok(file) => Ok(Some(ReplicaImage::File { file, path, disk: disk.to_string() })),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::file("opening", &path, e)),
            },
            Placement::Nbd(uri) => ReplicaImage::connect(disk, &uri).map(Some),
        }
    }

    /// Connect to the export of disk `disk` at `uri` (asking for `base:allocation`
    /// when the server has it).
    pub fn connect(disk: &str, uri: &str) -> Result<ReplicaImage> {
        let mut allocation = true;
        let client = loop {
            let mut opts = NbdOptions::with_meta_contexts(if allocation { vec![ALLOCATION] } else { vec![] });
            opts.timeout = ferry_nbd::default_timeout();
            match NbdClient::connect(uri, opts) {
                Ok(c) => break c,
                Err(NbdError::MetaContextUnavailable(c)) if c == ALLOCATION && allocation => allocation = false,
                Err(e) => return Err(nbd_error("connecting to the export of", disk, uri, e)),
            }
        };
        let size = client.size();
        Ok(ReplicaImage::Nbd {
            client: Arc::new(Mutex::new(client)),
            uri: uri.to_string(),
            disk: disk.to_string(),
            size,
            allocation,
        })
    }

    /// A file image (for tests and tools that hold a file).
    pub fn from_file(file: File, path: &Path, disk: &str) -> ReplicaImage {
        ReplicaImage::File { file, path: path.to_path_buf(), disk: disk.to_string() }
    }

    /// The NBD URI, for an export.
    pub fn nbd_uri(&self) -> Option<&str> {
        match self {
            ReplicaImage::Nbd { uri, .. } => Some(uri),
            ReplicaImage::File { .. } => None,
        }
    }

    /// The connection, for an export (the writer's pipelined backend shares it).
    pub fn nbd_client(&self) -> Option<Arc<Mutex<NbdClient>>> {
        match self {
            ReplicaImage::Nbd { client, .. } => Some(client.clone()),
            ReplicaImage::File { .. } => None,
        }
    }

    /// The file descriptor of a file image; -1 for an export.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            ReplicaImage::File { file, .. } => file.as_raw_fd(),
            ReplicaImage::Nbd { .. } => -1,
        }
    }

    /// The file's path, for a file image.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ReplicaImage::File { path, .. } => Some(path),
            ReplicaImage::Nbd { .. } => None,
        }
    }

    fn disk(&self) -> &str {
        match self {
            ReplicaImage::File { disk, .. } | ReplicaImage::Nbd { disk, .. } => disk,
        }
    }

    /// Room for the disk: the file's length, or the export's size.
    pub fn capacity(&self) -> Result<u64> {
        match self {
            ReplicaImage::File { file, path, .. } => {
                file.metadata().map(|m| m.len()).map_err(|e| StoreError::file("inspecting", path, e))
            }
            ReplicaImage::Nbd { size, .. } => Ok(*size),
        }
    }

    /// Check that a disk of `size` bytes fits: always for a file; for an
    /// export, a clear configuration error naming the disk, the URI, both
    /// sizes and the fix when it does not.
    pub fn check_fits(&self, size: u64) -> Result<()> {
        match self {
            ReplicaImage::Nbd { uri, disk, size: have, .. } if size > *have => Err(StoreError::Invalid(format!(
                "disk {disk:?} is {size} bytes but its NBD export {uri} has only {have} bytes; ferry cannot resize \
                 an export: grow the image behind it (for example `qemu-img resize -f qcow2 IMAGE {size}`) and \
                 restart qemu-nbd"
            ))),
            _ => Ok(()),
        }
    }

    /// Read `buf.len()` bytes at `offset` (`what` says why, for the error).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64, what: &'static str) -> Result<()> {
        match self {
            ReplicaImage::File { file, disk, .. } => file.read_exact_at(buf, offset).map_err(|e| StoreError::DiskIo {
                what,
                disk: disk.clone(),
                offset,
                len: buf.len(),
                source: e,
            }),
            ReplicaImage::Nbd { client, uri, disk, .. } => {
                lock(client).read_at(offset, buf).map_err(|e| nbd_error(what, disk, uri, e))
            }
        }
    }

    /// Read up to `buf.len()` bytes at `offset` of an image that may be shorter
    /// (a file grows sparse): bytes past its end read as zeros.
    pub fn read_padded(&self, buf: &mut [u8], offset: u64, what: &'static str) -> Result<()> {
        let avail = self.capacity()?.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail > 0 {
            self.read_exact_at(&mut buf[..avail], offset, what)?;
        }
        Ok(())
    }

    /// Write `buf` at `offset` (synchronously; the writer's chunk writes are pipelined elsewhere).
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            ReplicaImage::File { file, disk, .. } => file.write_all_at(buf, offset).map_err(|e| StoreError::DiskIo {
                what: "writing",
                disk: disk.clone(),
                offset,
                len: buf.len(),
                source: e,
            }),
            ReplicaImage::Nbd { client, uri, disk, .. } => {
                lock(client).write_at(offset, buf).map_err(|e| nbd_error("writing", disk, uri, e))
            }
        }
    }

    /// Make `[offset, offset+len)` read as zeros, deallocating where the storage can.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self {
            ReplicaImage::File { file, disk, .. } => {
                ferry_io::sys::punch_hole(file.as_raw_fd(), offset, len).map_err(|e| StoreError::DiskIo {
                    what: "punching a hole in",
                    disk: disk.clone(),
                    offset,
                    len: len as usize,
                    source: e,
                })
            }
            ReplicaImage::Nbd { client, uri, disk, .. } => {
                lock(client).write_zeroes(offset, len).map_err(|e| nbd_error("writing zeroes to", disk, uri, e))
            }
        }
    }

    /// Make everything written so far durable: fdatasync, or NBD_CMD_FLUSH.
    pub fn sync(&self) -> Result<()> {
        match self {
            ReplicaImage::File { file, disk, .. } => {
                if crate::fault::skip_fsync("image") {
                    return Ok(());
                }
                if let Err(source) = file.sync_data() {
                    return Err(StoreError::DiskIo { what: "syncing", disk: disk.clone(), offset: 0, len: 0, source });
                }
                Ok(())
            }
            ReplicaImage::Nbd { client, uri, disk, .. } => {
                lock(client).flush().map_err(|e| nbd_error("flushing", disk, uri, e))
            }
        }
    }

    /// Give the disk the logical size `to` (it was `from`). A file is
    /// truncated or extended (sparse). An export keeps its size: the disk
    /// must fit ([`ReplicaImage::check_fits`]); a grown range
    /// `[from, to)` is zeroed when `zero_grown` (it may hold old bytes), and
    /// everything from `to` to the export's end is zeroed.
    pub fn resize(&self, from: u64, to: u64, zero_grown: bool) -> Result<()> {
        match self {
            ReplicaImage::File { file, path, .. } => {
                if self.capacity()? != to {
                    file.set_len(to).map_err(|e| StoreError::file("resizing replica disk", path, e))?;
                }
                Ok(())
            }
            ReplicaImage::Nbd { size, .. } => {
                self.check_fits(to)?;
                if zero_grown && from < to {
                    self.zero(from, to - from)?;
                }
                self.zero(to, size - to)
            }
        }
    }

    /// Chunks of `chunk_size` (the last one `size % chunk_size` long) that the
    /// export reports as reading zeros over their whole length (NBD
    /// `base:allocation` with NBD_STATE_ZERO), so their digests are known
    /// without reading them. Empty for a file or without `base:allocation`.
    pub fn zero_chunks(&self, chunk_size: u32, size: u64) -> Result<Vec<u64>> {
        let ReplicaImage::Nbd { client, uri, disk, allocation: true, .. } = self else { return Ok(vec![]) };
        if size == 0 {
            return Ok(vec![]);
        }
        let extents = lock(client)
            .block_status(ALLOCATION, 0, size)
            .map_err(|e| nbd_error("reading the allocation map of", disk, uri, e))?;
        let cs = u64::from(chunk_size);
        let mut out = Vec::new();
        for (off, len, flags) in extents {
            if flags & STATE_ZERO == 0 {
                continue;
            }
            let end = (off + len).min(size);
            // Whole chunks inside [off, end), the partial last chunk when `end` is the disk's end.
            let first = off.div_ceil(cs);
            let last = if end == size { size.div_ceil(cs) } else { end / cs };
            out.extend(first..last);
        }
        Ok(out)
    }

    /// The error for a chunk write the pipelined backend failed.
    pub fn write_error(&self, offset: u64, len: usize, e: io::Error) -> StoreError {
        match self {
            ReplicaImage::Nbd { uri, disk, .. } => nbd_io_error("writing", disk, uri, e),
            ReplicaImage::File { .. } => {
                StoreError::DiskIo { what: "writing", disk: self.disk().to_string(), offset, len, source: e }
            }
        }
    }
}

fn lock(c: &Mutex<NbdClient>) -> MutexGuard<'_, NbdClient> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn file_image(size: u64) -> (tempfile::TempDir, ReplicaImage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(size).unwrap();
        (dir, ReplicaImage::from_file(f, &path, "d"))
    }

    #[test]
    fn file_write_read_zero_and_resize() {
        let (_dir, img) = file_image(1 << 20);
        img.write_all_at(&[7u8; 8192], 4096).unwrap();
        let mut buf = vec![0u8; 8192];
        img.read_exact_at(&mut buf, 4096, "reading").unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        img.zero(4096, 4096).unwrap();
        img.read_exact_at(&mut buf, 4096, "reading").unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 7));
        img.sync().unwrap();
        img.resize(1 << 20, 10000, true).unwrap();
        assert_eq!(img.capacity().unwrap(), 10000);
        let mut tail = vec![9u8; 100];
        img.read_padded(&mut tail, 9950, "reading").unwrap();
        assert_eq!(&tail[..50], &[7u8; 50][..], "bytes 9950..10000 were written");
        assert!(tail[50..].iter().all(|&b| b == 0), "past the end reads as zeros");
        img.check_fits(u64::MAX).unwrap();
        assert!(img.zero_chunks(4096, 10000).unwrap().is_empty(), "a file reports no zero chunks");
    }

    #[test]
    fn read_errors_name_the_disk_and_offset() {
        let (_dir, img) = file_image(4096);
        let mut buf = vec![0u8; 100];
        let e = img.read_exact_at(&mut buf, 4090, "hashing").unwrap_err();
        assert!(e.to_string().starts_with("hashing disk \"d\" at offset 4090 (100 bytes)"), "{e}");
    }

    #[test]
    fn an_nbd_placement_is_read_from_the_disk_nbd_file() {
        let dir = tempfile::tempdir().unwrap();
        let ds = crate::store::Datastore::open_or_create(dir.path()).unwrap();
        let r = ds.lock_replica("vm", "test", 65536, 0).unwrap();
        assert_eq!(Placement::of(&r, "d0").unwrap(), Placement::File(r.dir.join("disks/d0.img")));
        std::fs::write(r.dir.join("disks/d0.nbd"), "  nbd+unix:///?socket=/run/d0.sock \n").unwrap();
        assert_eq!(Placement::of(&r, "d0").unwrap(), Placement::Nbd("nbd+unix:///?socket=/run/d0.sock".into()));
        std::fs::write(r.dir.join("disks/d1.nbd"), "/not/a/uri\n").unwrap();
        let e = Placement::of(&r, "d1").unwrap_err().to_string();
        assert!(e.contains("d1.nbd") && e.contains("does not hold an NBD URI"), "{e}");
        // A placed disk with a dead socket fails naming the disk and the URI.
        std::fs::write(r.dir.join("disks/d2.nbd"), format!("nbd+unix:///?socket={}/gone.sock\n", dir.path().display()))
            .unwrap();
        let e = StoreError::detail(&ReplicaImage::open_rw(&r, "d2").unwrap_err());
        assert!(e.starts_with("connecting to the export of disk \"d2\" on NBD export nbd+unix:///?socket="), "{e}");
    }
}
