//! Errors of the datastore.

use std::io;
use std::path::PathBuf;

use ferry_io::ErrorClass;
use ferry_nbd::NbdError;

/// What went wrong in a datastore. Each variant says what was being done
/// and on which file, replica, disk or offset.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be opened, read, written or synced.
    #[error("{what} {path}")]
    File {
        /// What was being done ("writing undo file", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing a replica disk at an offset failed.
    #[error("{what} disk {disk:?} at offset {offset} ({len} bytes)")]
    DiskIo {
        /// "reading", "writing", ...
        what: &'static str,
        /// Disk name.
        disk: String,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The NBD export holding a replica disk's image failed: unreachable,
    /// gone, timed out, broke the protocol or refused a request.
    #[error("{what} disk {disk:?} on NBD export {uri}")]
    Nbd {
        /// What was being done ("writing", "flushing", ...).
        what: &'static str,
        /// Disk name.
        disk: String,
        /// The NBD URI.
        uri: String,
        /// What the NBD client said (boxed: it is large).
        #[source]
        source: Box<NbdError>,
    },
    /// A replica or disk name that could escape the datastore.
    #[error("{0}")]
    BadName(String),
    /// A replica, restore point or disk that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The datastore or replica is set up in a way that does not allow the
    /// request: not a datastore, another layout version, a bad `DISK.nbd`, an
    /// export too small or read-only, a chunk size the replica does not use.
    #[error("{0}")]
    Invalid(String),
    /// Datastore files that do not check out: a corrupt catalog or session
    /// file, a damaged undo file, an image of the wrong size.
    #[error("{0}")]
    Damaged(String),
    /// A rollback was recorded (`rollback.json`) and did not finish: the images may be
    /// half way between two points. The message names it and the command that finishes it.
    #[error("{0}")]
    RollbackPending(String),
    /// The replica is locked by another session.
    #[error("replica {replica:?} is in use by another session (locked by {holder}); try again when it has finished")]
    Busy {
        /// Replica name.
        replica: String,
        /// Who holds the lock.
        holder: String,
    },
}

impl StoreError {
    /// How the job that met this error should be treated.
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::BadName(_)
            | StoreError::NotFound(_)
            | StoreError::Invalid(_)
            | StoreError::RollbackPending(_) => ErrorClass::Usage,
            StoreError::Busy { .. } => ErrorClass::Busy,
            StoreError::File { .. } | StoreError::DiskIo { .. } | StoreError::Nbd { .. } | StoreError::Damaged(_) => {
                ErrorClass::Failed
            }
        }
    }

    /// The OS error under a file or disk error, if any (to tell a full disk).
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            StoreError::File { source, .. } | StoreError::DiskIo { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The error with its whole chain of causes, for messages and reports.
    pub fn detail(&self) -> String {
        ferry_io::error_chain(self)
    }

    /// Shorthand for a file error.
    pub fn file(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> StoreError {
        StoreError::File { what, path: path.into(), source }
    }
}

/// Result of the datastore.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
