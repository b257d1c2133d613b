//! Opening disks: source images and block devices (read-only), sizes, holes.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{MoveError, Result};

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A source disk opened read-only.
#[derive(Debug)]
pub struct SourceDisk {
    /// Disk name (the file name unless given as NAME=PATH).
    pub name: String,
    /// Path opened.
    pub path: PathBuf,
    /// Size in bytes (block devices: from the ioctl).
    pub size: u64,
    file: File,
    direct: Option<File>,
}

impl SourceDisk {
    /// Open `path` read-only; with `direct`, also try an O_DIRECT handle for aligned reads.
    pub fn open(name: &str, path: &Path, direct: bool) -> Result<SourceDisk> {
        let file = File::open(path).map_err(|e| MoveError::file("opening source disk", path, e))?;
        let size = file_size(&file, path)?;
        let direct =
            if direct { OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok() } else { None };
        if let Some(d) = &direct {
            // The kernel may still read ahead on the buffered handle; tell it we go sequentially.
            // SAFETY: plain advisory syscall on an open fd.
            unsafe { libc::posix_fadvise(d.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        } else {
            // SAFETY: plain advisory syscall on an open fd.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        }
        Ok(SourceDisk { name: name.to_string(), path: path.to_path_buf(), size, file, direct })
    }

    /// The fd to read chunk-aligned ranges from (O_DIRECT when available).
    pub fn read_fd(&self) -> RawFd {
        self.direct.as_ref().unwrap_or(&self.file).as_raw_fd()
    }

    /// True when reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Read exactly `buf.len()` bytes at `offset` through the buffered handle.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset).map_err(|e| MoveError::DiskIo {
            what: "reading",
            disk: self.name.clone(),
            offset,
            len: buf.len(),
            source: e,
        })
    }

    /// Size of the file now (to detect a disk resized during the run).
    pub fn current_size(&self) -> Result<u64> {
        file_size(&self.file, &self.path)
    }
}

/// Size of a regular file or block device.
pub fn file_size(file: &File, path: &Path) -> Result<u64> {
    let meta = file.metadata().map_err(|e| MoveError::file("inspecting", path, e))?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if r != 0 {
            return Err(MoveError::file("reading the size of block device", path, std::io::Error::last_os_error()));
        }
        Ok(size)
    } else if ft.is_file() {
        Ok(meta.len())
    } else {
        Err(MoveError::Config(format!("{} is neither a regular file nor a block device", path.display())))
    }
}

/// Deallocate `len` bytes at `offset` (they read back as zeros); the size is kept.
pub fn punch_hole(fd: RawFd, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an open fd with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Parse `NAME=PATH` or `PATH` (the name is then the file name).
pub fn parse_named(spec: &str) -> (String, PathBuf) {
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
    fn named_specs() {
        assert_eq!(parse_named("a=/x/y.img"), ("a".into(), PathBuf::from("/x/y.img")));
        assert_eq!(parse_named("/x/y.img"), ("y.img".into(), PathBuf::from("/x/y.img")));
        assert_eq!(parse_named("/x/a=b.img"), ("a=b.img".into(), PathBuf::from("/x/a=b.img")));
    }
}
