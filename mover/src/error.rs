//! Errors of the mover.

use std::io;
use std::path::PathBuf;

use ferry_wire::{ErrorCode, WireError};

/// What went wrong while moving data. Each variant says what was being done
/// and on which disk, offset or peer.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// A file could not be opened, read or written.
    #[error("{what} {path}")]
    File {
        /// What was being done ("opening source disk", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing a disk at an offset failed.
    #[error("{what} disk {disk:?} at offset {offset} ({len} bytes)")]
    DiskIo {
        /// "reading" or "writing".
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
    /// The source disk changed size while it was read.
    #[error("source disk {disk:?} is shorter than planned: expected {expected} bytes at offset {offset}, read {got}; was it truncated during the run?")]
    ShortRead {
        /// Disk name.
        disk: String,
        /// Offset of the chunk.
        offset: u64,
        /// Bytes expected.
        expected: usize,
        /// Bytes read.
        got: usize,
    },
    /// An NBD source disk failed: unreachable, gone, timed out or broke the protocol.
    #[error("disk {disk:?}: NBD source {uri}")]
    Nbd {
        /// Disk name.
        disk: String,
        /// The NBD URI.
        uri: String,
        /// What the NBD client said (boxed: it is large).
        #[source]
        source: Box<crate::nbd::NbdError>,
    },
    /// The NBD export holding a replica disk's image failed: unreachable,
    /// gone, timed out, broke the protocol or refused a request.
    #[error("{what} disk {disk:?} on NBD export {uri}")]
    NbdImage {
        /// What was being done ("writing", "flushing", ...).
        what: &'static str,
        /// Disk name.
        disk: String,
        /// The NBD URI.
        uri: String,
        /// What the NBD client said (boxed: it is large).
        #[source]
        source: Box<crate::nbd::NbdError>,
    },
    /// The connection to the peer failed.
    #[error("connection to {peer}")]
    Net {
        /// Peer address.
        peer: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer broke the protocol, or reported an error.
    #[error("{peer}")]
    Wire {
        /// Peer address.
        peer: String,
        /// The protocol error.
        #[source]
        source: WireError,
    },
    /// The peer closed the connection in the middle of a session.
    #[error("{peer} closed the connection unexpectedly (was the {side} killed or the network cut?)")]
    PeerGone {
        /// Peer address.
        peer: String,
        /// "target" or "source".
        side: &'static str,
    },
    /// A chunk whose bytes do not match its digest.
    #[error("disk {disk:?} chunk {chunk}: data does not match its BLAKE3 digest; nothing of it was written")]
    DigestMismatch {
        /// Disk name.
        disk: String,
        /// Chunk index.
        chunk: u64,
    },
    /// A compressed payload that does not decode to its logical length.
    #[error("disk {disk:?} chunk {chunk}: payload does not decompress to {expected} bytes: {detail}")]
    Decompress {
        /// Disk name.
        disk: String,
        /// Chunk index.
        chunk: u64,
        /// Logical length expected.
        expected: usize,
        /// What the decoder said.
        detail: String,
    },
    /// Bad configuration or input (exit code 2 material).
    #[error("{0}")]
    Config(String),
    /// A replica or disk name that could escape the datastore.
    #[error("{0}")]
    BadName(String),
    /// A datastore, replica or disk in a state that does not allow the request.
    #[error("{0}")]
    Datastore(String),
    /// The replica is locked by another session.
    #[error("replica {replica:?} is in use by another session (locked by {holder}); try again when it has finished")]
    Busy {
        /// Replica name.
        replica: String,
        /// Who holds the lock.
        holder: String,
    },
}

impl MoveError {
    /// The error code to report to a peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            MoveError::DigestMismatch { .. } => ErrorCode::DigestMismatch,
            MoveError::Decompress { .. } => ErrorCode::DigestMismatch,
            MoveError::Busy { .. } => ErrorCode::ReplicaBusy,
            MoveError::Config(_) => ErrorCode::BadRequest,
            MoveError::BadName(_) => ErrorCode::BadName,
            MoveError::Datastore(_) => ErrorCode::BadRequest,
            MoveError::Wire { source, .. } => source.code(),
            MoveError::File { source, .. } | MoveError::DiskIo { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                ErrorCode::NoSpace
            }
            MoveError::File { .. } | MoveError::DiskIo { .. } | MoveError::Nbd { .. } | MoveError::NbdImage { .. } => {
                ErrorCode::Io
            }
            _ => ErrorCode::Internal,
        }
    }

    /// The error with its whole chain of causes, for messages to peers and reports.
    pub fn detail(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }

    /// A reset or broken connection becomes [`MoveError::PeerGone`]: the
    /// peer was killed or the network cut, and the OS error says less.
    pub fn peer_gone_if_reset(self, side: &'static str) -> MoveError {
        use std::io::ErrorKind::*;
        match self {
            MoveError::Net { peer, source }
                if matches!(source.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof) =>
            {
                MoveError::PeerGone { peer, side }
            }
            other => other,
        }
    }

    /// True for a failure of the connection or of the session itself (the
    /// peer closed it, reset it, or it broke), not of the local side's work.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            MoveError::Net { .. }
                | MoveError::PeerGone { .. }
                | MoveError::Wire { source: ferry_wire::WireError::Closed, .. }
        )
    }

    /// True for errors a new connection may cure (the peer restarted, the network came back).
    pub fn is_transient(&self) -> bool {
        matches!(self, MoveError::Net { .. } | MoveError::PeerGone { .. })
    }

    /// Shorthand for a file error.
    pub fn file(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> MoveError {
        MoveError::File { what, path: path.into(), source }
    }
}

/// Result of the mover.
pub type Result<T, E = MoveError> = std::result::Result<T, E>;
