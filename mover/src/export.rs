//! Sparse copies of images: streaming, bounded memory, holes kept (used by
//! [`crate::target::points::export_point`] for the latest point).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{MoveError, Result};

/// Bytes copied per step.
const STEP: usize = 1 << 20;

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Size of the image.
    pub size: u64,
    /// Bytes of data written (the rest are holes).
    pub data_bytes: u64,
}

/// Copy `src` to `dst` keeping holes: data ranges found with SEEK_DATA/SEEK_HOLE,
/// and all-zero blocks inside them written as holes too.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<ExportReport> {
    let mut f = File::open(src).map_err(|e| MoveError::file("opening", src, e))?;
    let size = f.metadata().map_err(|e| MoveError::file("inspecting", src, e))?.len();
    let mut o = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(|e| MoveError::file("creating", dst, e))?;
    o.set_len(size).map_err(|e| MoveError::file("sizing", dst, e))?;
    let mut buf = vec![0u8; STEP];
    let mut data_bytes = 0;
    let mut pos = 0u64;
    while pos < size {
        let (start, end) = match next_data(&f, pos, size) {
            Some(r) => r,
            None => break,
        };
        f.seek(SeekFrom::Start(start)).map_err(|e| MoveError::file("seeking", src, e))?;
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(STEP);
            f.read_exact(&mut buf[..n]).map_err(|e| MoveError::file("reading", src, e))?;
            if !crate::buf::is_zero(&buf[..n]) {
                o.seek(SeekFrom::Start(at)).map_err(|e| MoveError::file("seeking", dst, e))?;
                o.write_all(&buf[..n]).map_err(|e| MoveError::file("writing", dst, e))?;
                data_bytes += n as u64;
            }
            at += n as u64;
        }
        pos = end;
    }
    o.sync_all().map_err(|e| MoveError::file("syncing", dst, e))?;
    Ok(ExportReport { size, data_bytes })
}

/// The next data range at or after `pos`, or None when only holes remain.
fn next_data(f: &File, pos: u64, size: u64) -> Option<(u64, u64)> {
    // SAFETY: lseek on an open fd.
    let start = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        // ENXIO: no data after pos. Other errors: treat everything as data.
        return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            None
        } else {
            Some((pos, size))
        };
    }
    // SAFETY: lseek on an open fd.
    let end = unsafe { libc::lseek(f.as_raw_fd(), start, libc::SEEK_HOLE) };
    let end = if end < 0 { size } else { (end as u64).min(size) };
    Some((start as u64, end))
}
