//! Errors of replica from backup.

use std::io;
use std::path::PathBuf;

use ferry_datastore::StoreError;
use ferry_io::ErrorClass;
use ferry_replicate::MoveError;

/// What went wrong reading backup repositories or replicating their points.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A repository, manifest or backing chain that does not check out
    /// (a retry will not help until the repository is fixed).
    #[error("{0}")]
    Repository(String),
    /// A repository's manifest or metadata, as the planner judged it (boxed: it is large).
    #[error(transparent)]
    Plan(Box<ferry_planner::backup::BackupError>),
    /// A helper program (qemu-img, qemu-nbd) is not installed.
    #[error("running {tool} (install qemu-utils)")]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// Why it could not be run.
        #[source]
        source: io::Error,
    },
    /// A helper program failed.
    #[error("{tool} failed: {detail}")]
    ToolFailed {
        /// The program and its arguments.
        tool: String,
        /// What it printed.
        detail: String,
    },
    /// A file of a repository or of the work directory.
    #[error("{what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A ferry datastore read as a repository.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Replicating a point (boxed: it is large).
    #[error(transparent)]
    Replicate(Box<MoveError>),
}

impl BackupError {
    /// How the job that met this error should be treated.
    pub fn class(&self) -> ErrorClass {
        match self {
            BackupError::Repository(_) | BackupError::Plan(_) | BackupError::ToolMissing { .. } => ErrorClass::Usage,
            BackupError::ToolFailed { .. } | BackupError::File { .. } => ErrorClass::Failed,
            BackupError::Store(e) => e.class(),
            BackupError::Replicate(e) => e.class(),
        }
    }

    /// Shorthand for a file error.
    pub fn file(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> BackupError {
        BackupError::File { what, path: path.into(), source }
    }
}

impl From<ferry_planner::backup::BackupError> for BackupError {
    fn from(e: ferry_planner::backup::BackupError) -> BackupError {
        BackupError::Plan(Box::new(e))
    }
}

impl From<MoveError> for BackupError {
    fn from(e: MoveError) -> BackupError {
        BackupError::Replicate(Box::new(e))
    }
}

/// Result of replica from backup.
pub type Result<T, E = BackupError> = std::result::Result<T, E>;
