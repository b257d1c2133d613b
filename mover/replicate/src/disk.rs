//! Opening disks: source images and block devices (read-only), NBD exports
//! (`nbd://HOST:PORT/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`), sizes, holes.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_planner::{ChangeMap, ChunkSet, Extent};
use ferry_wire::Geometry;

use ferry_io::sys::{self, Advice};
use ferry_nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use ferry_nbd::{is_nbd_uri, NbdClient, NbdError, NbdOptions, BASE_ALLOCATION as ALLOCATION};

use crate::error::{MoveError, Result};

enum Backing {
    File {
        file: File,
        direct: Option<File>,
    },
    Nbd {
        uri: String,
        client: Arc<Mutex<NbdClient>>,
        /// Whether the server granted `base:allocation`.
        allocation: bool,
    },
}

/// A source disk opened read-only: a file, a block device or an NBD export.
pub struct SourceDisk {
    /// Disk name (the file name unless given as NAME=PATH).
    pub name: String,
    /// Path opened (for NBD: the URI).
    pub path: PathBuf,
    /// Size in bytes (block devices: from the ioctl; NBD: the export's).
    pub size: u64,
    backing: Backing,
}

impl std::fmt::Debug for SourceDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceDisk")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("size", &self.size)
            .field("nbd", &self.nbd_uri())
            .finish()
    }
}

impl SourceDisk {
    /// Open `path` read-only; with `direct`, also try an O_DIRECT handle for
    /// aligned reads. An NBD URI opens the export (see [`SourceDisk::open_nbd`]).
    pub fn open(name: &str, path: &Path, direct: bool) -> Result<SourceDisk> {
        if let Some(uri) = path.to_str().filter(|p| is_nbd_uri(p)) {
            return SourceDisk::open_nbd(name, uri, None);
        }
        let open_error = |source| MoveError::OpenSource { disk: name.to_string(), path: path.to_path_buf(), source };
        let file = File::open(path).map_err(open_error)?;
        let size = file_size(&file).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => {
                let why = format!("{} is neither a regular file nor a block device", path.display());
                open_error(std::io::Error::new(e.kind(), why))
            }
            _ => open_error(e),
        })?;
        let direct =
            if direct { OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok() } else { None };
        // The kernel may still read ahead on the buffered handle; tell it we go sequentially.
        let _ = sys::fadvise(direct.as_ref().unwrap_or(&file).as_raw_fd(), 0, 0, Advice::Sequential);
        Ok(SourceDisk {
            name: name.to_string(),
            path: path.to_path_buf(),
            size,
            backing: Backing::File { file, direct },
        })
    }

    /// Connect to the NBD export at `uri` (one connection per disk, so
    /// `qemu-nbd` needs no `-e`). Negotiates `base:allocation` when the
    /// server has it, and `qemu:dirty-bitmap:BITMAP` when `bitmap` is given
    /// (a bitmap the server does not export is a configuration error).
    pub fn open_nbd(name: &str, uri: &str, bitmap: Option<&str>) -> Result<SourceDisk> {
        let nbd_err = |e| MoveError::Nbd { disk: name.to_string(), uri: uri.to_string(), source: Box::new(e) };
        let bitmap_ctx = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut allocation = true;
        let client = loop {
            let mut contexts: Vec<String> = Vec::new();
            if allocation {
                contexts.push(ALLOCATION.into());
            }
            contexts.extend(bitmap_ctx.clone());
            let mut opts = NbdOptions::with_meta_contexts(contexts);
            opts.timeout = ferry_nbd::default_timeout();
            // One request per chunk: the largest chunk.
            opts.max_request_len = ferry_wire::MAX_CHUNK_SIZE;
            match NbdClient::connect(uri, opts) {
                Ok(c) => break c,
                Err(NbdError::MetaContextUnavailable(c)) if c == ALLOCATION && allocation => allocation = false,
                Err(NbdError::MetaContextUnavailable(c)) if Some(&c) == bitmap_ctx.as_ref() => {
                    return Err(MoveError::Usage(format!(
                        "disk {name:?}: the NBD export {uri} has no dirty bitmap {:?} (context {c:?}); export it \
                         with `qemu-nbd -B {}` and check its name with `qemu-img info`",
                        bitmap.unwrap_or_default(),
                        bitmap.unwrap_or_default()
                    )))
                }
                Err(e) => return Err(nbd_err(e)),
            }
        };
        let size = client.size();
        Ok(SourceDisk {
            name: name.to_string(),
            path: PathBuf::from(uri),
            size,
            backing: Backing::Nbd { uri: uri.to_string(), client: Arc::new(Mutex::new(client)), allocation },
        })
    }

    /// The fd to read chunk-aligned ranges from (O_DIRECT when available); -1 for an NBD disk.
    pub fn read_fd(&self) -> RawFd {
        match &self.backing {
            Backing::File { file, direct } => direct.as_ref().unwrap_or(file).as_raw_fd(),
            Backing::Nbd { .. } => -1,
        }
    }

    /// True when reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        matches!(&self.backing, Backing::File { direct: Some(_), .. })
    }

    /// The NBD URI of an NBD disk.
    pub fn nbd_uri(&self) -> Option<&str> {
        match &self.backing {
            Backing::Nbd { uri, .. } => Some(uri),
            Backing::File { .. } => None,
        }
    }

    /// The NBD connection of an NBD disk (for [`ferry_nbd::NbdBackend`]).
    pub fn nbd_client(&self) -> Option<Arc<Mutex<NbdClient>>> {
        match &self.backing {
            Backing::Nbd { client, .. } => Some(client.clone()),
            Backing::File { .. } => None,
        }
    }

    fn with_nbd<T>(&self, f: impl FnOnce(&mut NbdClient) -> std::result::Result<T, NbdError>) -> Option<Result<T>> {
        match &self.backing {
            Backing::Nbd { uri, client, .. } => {
                let mut c = client.lock().unwrap_or_else(|p| p.into_inner());
                Some(f(&mut c).map_err(|e| MoveError::Nbd {
                    disk: self.name.clone(),
                    uri: uri.clone(),
                    source: Box::new(e),
                }))
            }
            Backing::File { .. } => None,
        }
    }

    /// Read exactly `buf.len()` bytes at `offset` through the buffered handle (NBD: the connection).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.backing {
            Backing::File { file, .. } => file.read_exact_at(buf, offset).map_err(|e| MoveError::DiskIo {
                what: "reading",
                disk: self.name.clone(),
                offset,
                len: buf.len(),
                source: e,
            }),
            Backing::Nbd { .. } => self.with_nbd(|c| c.read_at(offset, buf)).expect("an NBD disk"),
        }
    }

    /// Size of the file now (to detect a disk resized during the run). An
    /// NBD export keeps its size for the connection's life.
    pub fn current_size(&self) -> Result<u64> {
        match &self.backing {
            Backing::File { file, .. } => file_size(file).map_err(|e| MoveError::file("inspecting", &self.path, e)),
            Backing::Nbd { .. } => Ok(self.size),
        }
    }

    /// The chunks of `todo` that need no read because the NBD server says
    /// they are unallocated and read as zeros (`base:allocation` with both
    /// NBD_STATE_HOLE and NBD_STATE_ZERO over the whole chunk; the spec only
    /// promises zeros with NBD_STATE_ZERO). Empty for files and for servers
    /// without `base:allocation`.
    pub fn hole_chunks(&self, todo: &ChunkSet, chunk_size: u64) -> Result<ChunkSet> {
        let cs = chunk_size;
        let size = self.size;
        if let Backing::File { file, .. } = &self.backing {
            return Ok(file_holes(file, size, cs)?.intersection(todo));
        }
        let allocation = matches!(&self.backing, Backing::Nbd { allocation: true, .. });
        if !allocation || todo.is_empty() {
            return Ok(ChunkSet::new());
        }
        let chunk_count = size.div_ceil(cs);
        let mut holes = Vec::new();
        for r in todo.ranges() {
            let (start, end) = (r.start * cs, (r.end * cs).min(size));
            if start >= end {
                continue;
            }
            let extents = self.with_nbd(|c| c.block_status(ALLOCATION, start, end - start)).expect("an NBD disk")?;
            let mut run: Option<(u64, u64)> = None;
            for (off, len, flags) in extents.into_iter().chain([(end, 0, 0)]) {
                let hole = flags & (STATE_HOLE | STATE_ZERO) == (STATE_HOLE | STATE_ZERO) && len > 0;
                match (&mut run, hole) {
                    (Some(r), true) if r.1 == off => r.1 = off + len,
                    (_, true) => {
                        if let Some((a, b)) = run.take() {
                            holes.push(whole_chunks(a, b, cs, size, chunk_count));
                        }
                        run = Some((off, off + len));
                    }
                    (_, false) => {
                        if let Some((a, b)) = run.take() {
                            holes.push(whole_chunks(a, b, cs, size, chunk_count));
                        }
                    }
                }
            }
        }
        Ok(ChunkSet::from_ranges(holes).intersection(todo))
    }

    /// The dirty extents of `bitmap` (negotiated at open with
    /// [`SourceDisk::open_nbd`]) as a change map.
    pub fn dirty_map(&self, bitmap: &str) -> Result<ChangeMap> {
        let ctx = format!("qemu:dirty-bitmap:{bitmap}");
        let extents = self.with_nbd(|c| c.extents(&ctx, STATE_DIRTY)).unwrap_or_else(|| {
            Err(MoveError::Usage(format!("disk {:?}: qemu-bitmap CBT needs an NBD source", self.name)))
        })?;
        Ok(ChangeMap::from_extents(extents.into_iter().map(|(o, l)| Extent::new(o, l))))
    }
}

/// Whole chunks inside the holes of a regular file (SEEK_HOLE / SEEK_DATA: what
/// reads as zeros without being stored), so that the reader need not read them.
/// Block devices and file systems without hole reporting give none.
fn file_holes(file: &File, size: u64, cs: u64) -> Result<ChunkSet> {
    let is_file = file.metadata().is_ok_and(|m| m.file_type().is_file());
    if !is_file || size == 0 {
        return Ok(ChunkSet::new());
    }
    let chunk_count = size.div_ceil(cs);
    let mut holes = Vec::new();
    let mut pos = 0;
    // The holes are the gaps between the data ranges (and after the last one).
    for data in sys::data_ranges(file, size).chain(std::iter::once(size..size)) {
        if data.start > pos {
            holes.push(whole_chunks(pos, data.start, cs, size, chunk_count));
        }
        pos = data.end;
    }
    Ok(ChunkSet::from_ranges(holes))
}

/// Chunks lying entirely in `[a, b)` (the short last chunk counts when `b` is the disk's end):
/// [`Geometry::inner`] of a disk of `size` bytes in chunks of `cs` bytes.
fn whole_chunks(a: u64, b: u64, cs: u64, size: u64, chunk_count: u64) -> std::ops::Range<u64> {
    let g = Geometry::new(cs as u32, size).expect("the session's chunk size is valid");
    debug_assert_eq!(g.chunk_count(), chunk_count);
    g.inner(a, b.saturating_sub(a))
}

/// Size of a regular file or block device.
pub fn file_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        sys::block_device_size(file)
    } else if ft.is_file() {
        Ok(meta.len())
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "neither a regular file nor a block device"))
    }
}

/// Parse `NAME=PATH` or `PATH` (the name is then the file name). An NBD URI
/// without a name is named after its export (`nbd` when the export name is empty).
pub fn parse_named(spec: &str) -> (String, PathBuf) {
    if is_nbd_uri(spec) {
        let rest = spec.split_once("://").map_or("", |(_, r)| r);
        let path = rest.split('?').next().unwrap_or("");
        let export = path.split_once('/').map_or("", |(_, e)| e);
        let name = if export.is_empty() { "nbd".to_string() } else { export.replace(['/', '%'], "_") };
        return (name, PathBuf::from(spec));
    }
    if let Some((name, path)) = spec.split_once('=') {
        if !name.is_empty() && !name.contains('/') {
            return (name.to_string(), PathBuf::from(path));
        }
    }
    let path = PathBuf::from(spec);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| spec.to_string());
    (name, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_chunks_of_hole_extents() {
        // 64 KiB chunks, a disk of 10 chunks and 100 bytes (11 chunks).
        let (cs, size) = (65536, 10 * 65536 + 100);
        assert_eq!(whole_chunks(0, 65536, cs, size, 11), 0..1);
        assert_eq!(whole_chunks(1, 3 * 65536, cs, size, 11), 1..3, "a partly covered chunk is read");
        assert_eq!(whole_chunks(100, 65535, cs, size, 11), 1..1);
        assert_eq!(whole_chunks(9 * 65536, size, cs, size, 11), 9..11, "the short last chunk up to the end");
        assert_eq!(whole_chunks(9 * 65536, size - 1, cs, size, 11), 9..10);
    }

    #[test]
    fn holes_of_a_sparse_file_are_whole_chunks() {
        use std::os::unix::fs::FileExt;
        let cs = 65536u64;
        let f = tempfile::tempfile().unwrap();
        let size = 10 * cs + 100;
        f.set_len(size).unwrap();
        // Data in chunk 2 (one byte) and in the short last chunk; the rest is hole.
        f.write_all_at(&[1], 2 * cs + 5).unwrap();
        f.write_all_at(&[1], 10 * cs + 50).unwrap();
        f.sync_all().unwrap();
        let holes = file_holes(&f, size, cs).unwrap();
        let got: Vec<u64> = holes.ranges().iter().flat_map(|r| r.clone()).collect();
        // File systems allocate in blocks (4 KiB here); chunk 2 and chunk 10 hold data.
        assert_eq!(got, [0, 1, 3, 4, 5, 6, 7, 8, 9]);
        // A file without holes has none.
        let g = tempfile::tempfile().unwrap();
        g.write_all_at(&vec![7u8; 3 * cs as usize], 0).unwrap();
        assert!(file_holes(&g, 3 * cs, cs).unwrap().is_empty());
    }

    #[test]
    fn named_specs() {
        assert_eq!(parse_named("a=/x/y.img"), ("a".into(), PathBuf::from("/x/y.img")));
        assert_eq!(parse_named("/x/y.img"), ("y.img".into(), PathBuf::from("/x/y.img")));
        assert_eq!(parse_named("/x/a=b.img"), ("a=b.img".into(), PathBuf::from("/x/a=b.img")));
        let u = "nbd+unix:///?socket=/tmp/s";
        assert_eq!(parse_named(u), ("nbd".into(), PathBuf::from(u)));
        assert_eq!(parse_named(&format!("d={u}")), ("d".into(), PathBuf::from(u)));
        assert_eq!(parse_named("nbd://h:1/vm/disk0"), ("vm_disk0".into(), PathBuf::from("nbd://h:1/vm/disk0")));
    }
}
