//! Errors of replication, both ends.
//!
//! Every variant has a class ([`MoveError::class`]) that decides the exit
//! code, and a code ([`MoveError::code`]) that the peer hears in an Error
//! frame. A target's error reaches the source as that code, and the source
//! classes it from the code alone ([`class_of_code`]), so a full disk at the
//! target is a failure worth retrying at the source, and a refused token is
//! not.

use std::io;
use std::path::PathBuf;

use ferry_datastore::StoreError;
use ferry_io::ErrorClass;
use ferry_nbd::NbdError;
use ferry_planner::PlanError;
use ferry_wire::{ErrorCode, WireError};

/// What went wrong while moving data. Each variant says what was being done
/// and on which disk, offset or peer.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// Bad flags, settings or input: a retry will not help until someone
    /// changes them.
    #[error("{0}")]
    Usage(String),
    /// A source disk could not be opened or sized.
    #[error("opening source disk {}", path.display())]
    OpenSource {
        /// Disk name.
        disk: String,
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A token file that cannot be read.
    #[error("reading token file {path}")]
    Token {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A token file that holds no usable token.
    #[error("{0}")]
    BadToken(String),
    /// An access file that does not parse (line 0: the file as a whole).
    #[error("access file {} {}{what}", path.display(), if *line > 0 { format!("line {line}: ") } else { String::new() })]
    AccessFile {
        /// The file.
        path: PathBuf,
        /// 1-based line number; 0 for the whole file.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// The token may not do this (its role or replica scope), or it was revoked. The
    /// message names the token and the replica.
    #[error("{0}")]
    NotAllowed(String),
    /// A change list that cannot be read.
    #[error("reading change list {path}")]
    ChangeListUnreadable {
        /// The list.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A change list that does not parse or does not fit its disk.
    #[error("disk {disk:?}")]
    ChangeList {
        /// Disk name.
        disk: String,
        /// What is wrong with it (names the list and the entry; boxed: it is large).
        #[source]
        source: Box<PlanError>,
    },
    /// A file could not be opened, read or written.
    #[error("{what} {path}")]
    File {
        /// What was being done ("writing digest map cache", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a source disk at an offset failed.
    #[error("{what} disk {disk:?} at offset {offset} ({len} bytes)")]
    DiskIo {
        /// "reading", ...
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
    /// The source disk got shorter while it was read.
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
    /// The source disk changed size during the run.
    #[error("source disk {disk:?} changed size during the run ({before} -> {after} bytes); run again")]
    Resized {
        /// Disk name.
        disk: String,
        /// Size when the run started.
        before: u64,
        /// Size at the end.
        after: u64,
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
        source: Box<NbdError>,
    },
    /// An IO backend could not be opened (`--io-backend uring` where io_uring
    /// is not available) or failed.
    #[error("{side} IO backend")]
    Backend {
        /// "source" or "target".
        side: &'static str,
        /// Whether it failed to open (a configuration matter) or while running.
        opening: bool,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The datastore (target side) failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The connection to the peer failed.
    #[error("connection to {peer}")]
    Net {
        /// Peer address.
        peer: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer broke the protocol, refused us, or reported an error.
    #[error("{peer}")]
    Wire {
        /// Peer address.
        peer: String,
        /// The protocol error.
        #[source]
        source: WireError,
    },
    /// The peer sent something the session did not expect at this point.
    #[error("{peer}: {what}")]
    Protocol {
        /// Peer address.
        peer: String,
        /// What it did.
        what: String,
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
    /// TLS failed: the handshake, or a record that did not decrypt (its
    /// integrity check failed: the stream was altered on the way).
    #[error("TLS session with {peer}: {}", tls_what(source))]
    Tls {
        /// Peer address.
        peer: String,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The target presented a certificate that nothing pins.
    #[error(
        "target {target} presented the TLS certificate {presented}, which is not pinned: nothing was sent. \
         Check it against `ferry fingerprint` on the target host, then run again with --fingerprint {presented}{}",
        match file { Some(f) => format!(" (or with --trust-new to store it in {})", f.display()), None => String::new() }
    )]
    UnknownTarget {
        /// HOST:PORT.
        target: String,
        /// Its fingerprint.
        presented: String,
        /// The known-targets file that has no line for it.
        file: Option<PathBuf>,
    },
    /// The target presented another certificate than the pinned one.
    #[error(
        "target {target} presented the TLS certificate {presented}, but {pinned_by} pins {expected}: nothing was sent. \
         If the target's identity changed on purpose, pin the new one (check it with `ferry fingerprint` on the target host)"
    )]
    FingerprintMismatch {
        /// HOST:PORT.
        target: String,
        /// The pinned fingerprint.
        expected: String,
        /// What it presented.
        presented: String,
        /// Where the pin comes from (--fingerprint, the known-targets file).
        pinned_by: String,
    },
    /// A replica or disk name that could escape the datastore.
    #[error("{0}")]
    BadName(String),
    /// Something of our own went wrong (a thread panicked, a stage stopped).
    #[error("{0}")]
    Internal(String),
}

/// What a TLS error means for the user; a record that failed its integrity
/// check (either end) says so plainly.
fn tls_what(e: &rustls::Error) -> String {
    match e {
        rustls::Error::DecryptError => {
            "a record failed its integrity check (the stream was altered or corrupted on the way); nothing of it was used"
                .into()
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac) => {
            "the peer found a record that failed its integrity check (the stream was altered or corrupted on the way)"
                .into()
        }
        _ => "failed".into(),
    }
}

/// The class of an error a peer reported with `code`.
pub fn class_of_code(code: ErrorCode) -> ErrorClass {
    match code {
        ErrorCode::UnsupportedVersion
        | ErrorCode::AuthFailed
        | ErrorCode::BadName
        | ErrorCode::BadRequest
        | ErrorCode::NotAllowed
        | ErrorCode::NotFound => ErrorClass::Usage,
        ErrorCode::ReplicaBusy => ErrorClass::Busy,
        ErrorCode::Protocol
        | ErrorCode::DigestMismatch
        | ErrorCode::Io
        | ErrorCode::NoSpace
        | ErrorCode::Internal
        | ErrorCode::Unknown(_) => ErrorClass::Failed,
    }
}

impl MoveError {
    /// How the job that met this error should be treated (the exit code).
    pub fn class(&self) -> ErrorClass {
        use ErrorClass::*;
        match self {
            MoveError::Usage(_)
            | MoveError::Token { .. }
            | MoveError::BadToken(_)
            | MoveError::AccessFile { .. }
            | MoveError::NotAllowed(_)
            | MoveError::ChangeList { .. }
            | MoveError::ChangeListUnreadable { .. }
            | MoveError::UnknownTarget { .. }
            | MoveError::FingerprintMismatch { .. }
            | MoveError::BadName(_) => Usage,
            MoveError::OpenSource { source, .. } => match source.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput => Usage,
                _ => Failed,
            },
            MoveError::Backend { opening: true, .. } => Usage,
            MoveError::Nbd { source, .. } => source.class(),
            MoveError::Store(e) => e.class(),
            MoveError::Wire { source, .. } => match source {
                WireError::Remote { code, .. } => class_of_code(*code),
                WireError::UnsupportedVersion { .. } | WireError::AuthFailed | WireError::ServerAuthFailed => Usage,
                _ => Failed,
            },
            MoveError::File { .. }
            | MoveError::DiskIo { .. }
            | MoveError::ShortRead { .. }
            | MoveError::Resized { .. }
            | MoveError::Backend { opening: false, .. }
            | MoveError::Net { .. }
            | MoveError::Protocol { .. }
            | MoveError::PeerGone { .. }
            | MoveError::DigestMismatch { .. }
            | MoveError::Decompress { .. }
            | MoveError::Tls { .. }
            | MoveError::Internal(_) => Failed,
        }
    }

    /// The error code to report to a peer for this error.
    pub fn code(&self) -> ErrorCode {
        let no_space = |e: &io::Error| e.raw_os_error() == Some(libc::ENOSPC);
        match self {
            MoveError::DigestMismatch { .. } | MoveError::Decompress { .. } => ErrorCode::DigestMismatch,
            MoveError::Usage(_)
            | MoveError::ChangeList { .. }
            | MoveError::ChangeListUnreadable { .. }
            | MoveError::Token { .. }
            | MoveError::AccessFile { .. }
            | MoveError::UnknownTarget { .. }
            | MoveError::FingerprintMismatch { .. }
            | MoveError::BadToken(_) => ErrorCode::BadRequest,
            MoveError::NotAllowed(_) => ErrorCode::NotAllowed,
            MoveError::BadName(_) => ErrorCode::BadName,
            MoveError::Wire { source, .. } => source.code(),
            MoveError::Protocol { .. } => ErrorCode::Protocol,
            MoveError::Store(e) => match e {
                StoreError::Busy { .. } => ErrorCode::ReplicaBusy,
                StoreError::BadName(_) => ErrorCode::BadName,
                StoreError::NotFound(_) => ErrorCode::NotFound,
                StoreError::Invalid(_) => ErrorCode::BadRequest,
                e if e.os_error().is_some_and(no_space) => ErrorCode::NoSpace,
                _ => ErrorCode::Io,
            },
            MoveError::File { source, .. } | MoveError::DiskIo { source, .. } if no_space(source) => ErrorCode::NoSpace,
            MoveError::File { .. }
            | MoveError::DiskIo { .. }
            | MoveError::OpenSource { .. }
            | MoveError::ShortRead { .. }
            | MoveError::Resized { .. }
            | MoveError::Nbd { .. }
            | MoveError::Backend { .. } => ErrorCode::Io,
            MoveError::Tls { .. } => ErrorCode::Protocol,
            MoveError::Net { .. } | MoveError::PeerGone { .. } | MoveError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The error with its whole chain of causes, for messages to peers and reports.
    pub fn detail(&self) -> String {
        ferry_io::error_chain(self)
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
            MoveError::Net { .. } | MoveError::PeerGone { .. } | MoveError::Wire { source: WireError::Closed, .. }
        )
    }

    /// True for errors a new connection may cure (the peer restarted, the network came back).
    pub fn is_transient(&self) -> bool {
        matches!(self, MoveError::Net { .. } | MoveError::PeerGone { .. })
    }

    /// True when the replica (or the server) is busy with another session: trying again
    /// later may get in (exit 4 when the time to retry has run out).
    pub fn is_busy(&self) -> bool {
        self.class() == ErrorClass::Busy
    }

    /// True for a read that waited for its socket's read timeout and got nothing.
    pub fn is_read_timeout(&self) -> bool {
        matches!(self, MoveError::Net { source, .. } if source.kind() == io::ErrorKind::WouldBlock)
    }

    /// Shorthand for a file error.
    pub fn file(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> MoveError {
        MoveError::File { what, path: path.into(), source }
    }
}

/// Result of replication.
pub type Result<T, E = MoveError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_at_the_target_is_a_failure_the_source_may_retry() {
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        let e =
            MoveError::Store(StoreError::DiskIo { what: "writing", disk: "d".into(), offset: 0, len: 1, source: full });
        assert_eq!(e.code(), ErrorCode::NoSpace);
        let at_source =
            MoveError::Wire { peer: "t".into(), source: WireError::Remote { code: e.code(), message: e.detail() } };
        assert_eq!(at_source.class(), ErrorClass::Failed);
    }

    #[test]
    fn classes_of_remote_codes() {
        let remote =
            |code| MoveError::Wire { peer: "t".into(), source: WireError::Remote { code, message: String::new() } };
        assert_eq!(remote(ErrorCode::AuthFailed).class(), ErrorClass::Usage);
        assert_eq!(remote(ErrorCode::ReplicaBusy).class(), ErrorClass::Busy);
        assert_eq!(remote(ErrorCode::BadRequest).class(), ErrorClass::Usage);
        assert_eq!(remote(ErrorCode::NotAllowed).class(), ErrorClass::Usage);
        assert_eq!(remote(ErrorCode::Io).class(), ErrorClass::Failed);
        assert_eq!(remote(ErrorCode::Protocol).class(), ErrorClass::Failed);
        // A peer that breaks the protocol here is a failure, not a usage error.
        let broken = MoveError::Wire { peer: "t".into(), source: WireError::UnknownFrameType(0x7f) };
        assert_eq!(broken.class(), ErrorClass::Failed);
        let resized = MoveError::Resized { disk: "d".into(), before: 1, after: 2 };
        assert_eq!(resized.class(), ErrorClass::Failed);
    }
}
