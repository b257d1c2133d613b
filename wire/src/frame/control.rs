//! Commit, report and end-of-session frames (types `0x40..`, `0x50..`, `0x7E`).

/// Source: all disks are complete; make the restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Number of disks the source opened in this session (cross-checked).
    pub disk_count: u32,
}

/// Target: the restore point exists and is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Id of the new restore point.
    pub point_id: u64,
    /// Its point time (ns since the epoch).
    pub point_time_ns: i64,
}

/// Progress or liveness report (optional frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Disk id.
    pub disk: u32,
    /// Bytes of the disk processed so far.
    pub bytes_done: u64,
}

/// Target: something the operator of the source should know (optional frame).
///
/// A [`NoticeLevel::Warning`] says the result is not exactly what was asked
/// (e.g. retention kept more points than the source asked for, and why): the
/// source finishes with a warning. Sent with `FLAG_OPTIONAL`: a peer that
/// predates it skips it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// How much it matters.
    pub level: NoticeLevel,
    /// Message for the operator (at most `MAX_MESSAGE_LEN` bytes).
    pub message: String,
}

/// The level of a [`Notice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NoticeLevel {
    /// For information; the result is as asked.
    Info = 0,
    /// The result differs from what was asked (the source exits with a warning).
    Warning = 1,
}

/// Typed error; the sender closes the session after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Error code.
    pub code: ErrorCode,
    /// Message for the operator.
    pub message: String,
}

/// Typed error codes carried by Error frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Malformed frame or illegal transition.
    Protocol = 1,
    /// No protocol version in common.
    UnsupportedVersion = 2,
    /// Authentication failed.
    AuthFailed = 3,
    /// The replica is locked by another session.
    ReplicaBusy = 4,
    /// A replica or disk name that is not allowed.
    BadName = 5,
    /// A chunk's payload does not match its digest.
    DigestMismatch = 6,
    /// The target failed to read or write its datastore.
    Io = 7,
    /// The target's file system is full.
    NoSpace = 8,
    /// A request that contradicts the replica (chunk size, unknown disk, ...).
    BadRequest = 9,
    /// Something the peer asked for does not exist.
    NotFound = 10,
    /// An internal error of the peer.
    Internal = 11,
    /// The token is not allowed to do this (its role or its replica scope), or it was revoked.
    NotAllowed = 12,
    /// A code this version does not know (kept verbatim).
    Unknown(u16),
}

impl ErrorCode {
    /// The code as it travels on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Protocol => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::AuthFailed => 3,
            ErrorCode::ReplicaBusy => 4,
            ErrorCode::BadName => 5,
            ErrorCode::DigestMismatch => 6,
            ErrorCode::Io => 7,
            ErrorCode::NoSpace => 8,
            ErrorCode::BadRequest => 9,
            ErrorCode::NotFound => 10,
            ErrorCode::Internal => 11,
            ErrorCode::NotAllowed => 12,
            ErrorCode::Unknown(v) => v,
        }
    }

    /// The code for a wire value; unknown values are kept.
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::AuthFailed,
            4 => ErrorCode::ReplicaBusy,
            5 => ErrorCode::BadName,
            6 => ErrorCode::DigestMismatch,
            7 => ErrorCode::Io,
            8 => ErrorCode::NoSpace,
            9 => ErrorCode::BadRequest,
            10 => ErrorCode::NotFound,
            11 => ErrorCode::Internal,
            12 => ErrorCode::NotAllowed,
            other => ErrorCode::Unknown(other),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::Protocol => "protocol error",
            ErrorCode::UnsupportedVersion => "unsupported version",
            ErrorCode::AuthFailed => "authentication failed",
            ErrorCode::ReplicaBusy => "replica busy",
            ErrorCode::BadName => "bad name",
            ErrorCode::DigestMismatch => "digest mismatch",
            ErrorCode::Io => "target I/O error",
            ErrorCode::NoSpace => "no space left on target",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotFound => "not found",
            ErrorCode::Internal => "internal error",
            ErrorCode::NotAllowed => "not allowed",
            ErrorCode::Unknown(v) => return write!(f, "error code {v}"),
        };
        f.write_str(s)
    }
}
