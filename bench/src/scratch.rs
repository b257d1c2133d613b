//! A scratch directory removed when dropped (unless kept on purpose).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A directory under the system temporary directory (or a given parent).
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    /// Creates `$TMPDIR/ferry-bench-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<Self> {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// Creates a fresh directory under `parent`.
    pub fn new_in(parent: &Path, tag: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("ferry-bench-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating scratch directory {}", path.display()))?;
        Ok(ScratchDir { path, keep: false })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place when dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
