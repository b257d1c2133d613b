//! Sparse copies of images: streaming, bounded memory, holes kept (used by
//! [`crate::points::export_point`] for the latest point).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Result, StoreError};

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
    let f = File::open(src).map_err(|e| StoreError::file("opening", src, e))?;
    let size = f.metadata().map_err(|e| StoreError::file("inspecting", src, e))?.len();
    let o = crate::store::private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(|e| StoreError::file("creating", dst, e))?;
    o.set_len(size).map_err(|e| StoreError::file("sizing", dst, e))?;
    let mut buf = vec![0u8; STEP];
    let mut data_bytes = 0;
    for range in ferry_io::sys::data_ranges(&f, size) {
        let mut at = range.start;
        while at < range.end {
            let n = ((range.end - at) as usize).min(STEP);
            f.read_exact_at(&mut buf[..n], at).map_err(|e| StoreError::file("reading", src, e))?;
            if !ferry_io::is_zero(&buf[..n]) {
                o.write_all_at(&buf[..n], at).map_err(|e| StoreError::file("writing", dst, e))?;
                data_bytes += n as u64;
            }
            at += n as u64;
        }
    }
    o.sync_all().map_err(|e| StoreError::file("syncing", dst, e))?;
    Ok(ExportReport { size, data_bytes })
}
