//! Frames of protocol v1 and their byte encoding.
//!
//! Every frame is a 12-byte header followed by a body (see PROTOCOL.md):
//!
//! ```text
//! 0      2      3      4             8             12
//! +------+------+------+-------------+-------------+----------- - -
//! | magic| type | flags| body length | header check|  body ...
//! +------+------+------+-------------+-------------+----------- - -
//! ```
//!
//! All integers are little-endian. The header check is FNV-1a (32 bit) over
//! bytes 0..8, so a stream that lost sync is detected at the very next header.
//!
//! DO NOT MODIFY the layouts below: they are protocol v1, pinned by the golden
//! vectors in `tests/golden/frames.hex`. A change is a new protocol version.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::WireError;

/// The two bytes every frame starts with. Not ASCII, so a text protocol
/// (HTTP, SSH banner) hitting a ferry port is rejected at once.
pub const MAGIC: [u8; 2] = [0xFE, 0x52];
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// Lowest protocol version this crate speaks.
pub const VERSION_MIN: u16 = 1;
/// Highest protocol version this crate speaks.
pub const VERSION_MAX: u16 = 1;

/// Smallest chunk size (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size (4 MiB).
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Largest frame body: a full chunk plus the data frame's fixed fields, with room to spare.
pub const MAX_BODY_LEN: u32 = MAX_CHUNK_SIZE + 1024;
/// Largest frame body a session accepts before the peer is authenticated: an
/// unauthenticated peer can not make a receiver reserve more than this. Every
/// handshake frame (and an Error frame) fits.
pub const MAX_HANDSHAKE_BODY_LEN: u32 = 8 * 1024;
/// Longest replica, disk or peer name in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest software version string in bytes.
pub const MAX_SOFTWARE_LEN: usize = 64;
/// Longest error message in bytes.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Most digests in one DigestMapPart frame.
pub const MAX_DIGESTS_PER_PART: usize = 16384;
/// Runs in one Intent frame, at most.
pub const MAX_INTENT_RUNS: usize = 16384;
/// Length of a BLAKE3 digest, a nonce, an auth proof.
pub const DIGEST_LEN: usize = 32;

/// Frame flag: a peer that does not know this frame type skips it instead of failing.
pub const FLAG_OPTIONAL: u8 = 0x01;
/// Flags reserved for future versions: must be zero in v1.
pub const FLAGS_RESERVED: u8 = !FLAG_OPTIONAL;

/// Feature bit: zstd-compressed data frames.
pub const FEATURE_ZSTD: u64 = 1 << 0;
/// Feature bit: digest map exchange (digest mode, seeding).
pub const FEATURE_DIGEST_MAP: u64 = 1 << 1;
/// Feature bit: resume of interrupted sessions.
pub const FEATURE_RESUME: u64 = 1 << 2;
/// All features this version implements.
pub const FEATURES_V1: u64 = FEATURE_ZSTD | FEATURE_DIGEST_MAP | FEATURE_RESUME;

/// A 32-byte BLAKE3 digest (computed by the caller; this crate only carries it).
pub type Digest = [u8; DIGEST_LEN];

/// The frame type byte of each message.
///
/// DO NOT MODIFY: protocol v1. New frames take new values.
pub mod frame_type {
    /// Hello: client's first frame (version range, features, nonce).
    pub const HELLO: u8 = 0x01;
    /// Welcome: server's answer (version, features, nonce).
    pub const WELCOME: u8 = 0x02;
    /// AuthProof: client's proof of the token.
    pub const AUTH_PROOF: u8 = 0x03;
    /// AuthOk: server accepts and proves the token.
    pub const AUTH_OK: u8 = 0x04;
    /// OpenReplica: open or resume a replica session.
    pub const OPEN_REPLICA: u8 = 0x10;
    /// ReplicaOpened: the replica is open and locked.
    pub const REPLICA_OPENED: u8 = 0x11;
    /// OpenDisk: open a disk of the replica.
    pub const OPEN_DISK: u8 = 0x12;
    /// ResumeInfo: what the target holds of a disk, where to resume.
    pub const RESUME_INFO: u8 = 0x13;
    /// DigestMapRequest: ask for a disk's digest map.
    pub const DIGEST_MAP_REQUEST: u8 = 0x20;
    /// DigestMapPart: a run of digests.
    pub const DIGEST_MAP_PART: u8 = 0x21;
    /// DigestMapEnd: end of a digest map reply.
    pub const DIGEST_MAP_END: u8 = 0x22;
    /// Data: one chunk.
    pub const DATA: u8 = 0x30;
    /// ZeroRun: a run of all-zero chunks.
    pub const ZERO_RUN: u8 = 0x31;
    /// Flush: source watermark, make it durable.
    pub const FLUSH: u8 = 0x32;
    /// Checkpoint: target watermark, durable.
    pub const CHECKPOINT: u8 = 0x33;
    /// Intent: chunks the source is about to send (optional, advisory).
    pub const INTENT: u8 = 0x34;
    /// Commit: make the restore point.
    pub const COMMIT: u8 = 0x40;
    /// Committed: the restore point is durable.
    pub const COMMITTED: u8 = 0x41;
    /// Progress: optional report.
    pub const PROGRESS: u8 = 0x50;
    /// Keepalive: optional liveness.
    pub const KEEPALIVE: u8 = 0x51;
    /// Error: typed error, then close.
    pub const ERROR: u8 = 0x7E;
    /// Close: orderly end of the session.
    pub const CLOSE: u8 = 0x7F;
}

/// How a disk's changes are found; tells the target what to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Mode {
    /// Every chunk is sent (zero chunks as zero runs).
    Full = 0,
    /// Only chunks from a changed-block-tracking list.
    Cbt = 1,
    /// Only chunks whose digest differs from the target's digest map.
    Digest = 2,
    /// The target holds a seed copy: it rebuilds digests from it, then digest mode.
    Seed = 3,
}

impl Mode {
    fn from_u8(v: u8) -> Option<Mode> {
        Some(match v {
            0 => Mode::Full,
            1 => Mode::Cbt,
            2 => Mode::Digest,
            3 => Mode::Seed,
            _ => return None,
        })
    }
}

/// How a data frame's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// Payload is the logical bytes.
    None = 0,
    /// Payload is one zstd frame that decodes to the logical bytes.
    Zstd = 1,
}

impl Codec {
    fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
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
            ErrorCode::Unknown(v) => return write!(f, "error code {v}"),
        };
        f.write_str(s)
    }
}

/// Client's first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub version_min: u16,
    /// Highest protocol version the client speaks.
    pub version_max: u16,
    /// Feature bits the client offers.
    pub features: u64,
    /// Client's random challenge nonce.
    pub nonce: [u8; 32],
    /// Peer name (host name or job name).
    pub peer_name: String,
    /// Software and version, for logs ("ferry 0.1.0").
    pub software: String,
}

/// Server's answer to Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version chosen for this session.
    pub version: u16,
    /// Features both sides support.
    pub features: u64,
    /// Server's random challenge nonce.
    pub nonce: [u8; 32],
    /// Server name.
    pub peer_name: String,
    /// Server software and version.
    pub software: String,
}

/// Client's proof that it holds the shared token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthProof {
    /// MAC over both nonces, keyed by the token.
    pub proof: [u8; 32],
}

/// Server accepts the client and proves it holds the token too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOk {
    /// MAC over both nonces, keyed by the token, with the server's label.
    pub proof: [u8; 32],
}

/// Open (or create) a replica and start a session on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReplica {
    /// Replica name.
    pub replica: String,
    /// Point time of the restore point this session makes, ns since the Unix epoch.
    pub point_time_ns: i64,
    /// The client's session id: the same id again asks to resume.
    pub session_id: [u8; 16],
    /// Restore points to keep (0: keep the replica's setting).
    pub retain: u32,
    /// Flags: [`OpenReplica::PLAN_ONLY`]; other bits must be zero.
    pub flags: u8,
}

impl OpenReplica {
    /// Flag: plan only. The target changes nothing (no lock taken for
    /// writing, no file created or resized) and answers ResumeInfo and digest
    /// maps as they are; Data, ZeroRun, Flush, Intent and Commit are illegal.
    pub const PLAN_ONLY: u8 = 0x01;
}

/// The replica is open and locked for this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOpened {
    /// Session id in force (the client's, or the interrupted one being resumed).
    pub session_id: [u8; 16],
    /// True when an interrupted session is being resumed.
    pub resumed: bool,
    /// Id of the replica's latest restore point (0: none yet).
    pub latest_point: u64,
    /// Point time of the latest restore point (ns), 0 when none.
    pub latest_point_time_ns: i64,
    /// Chunk size of the replica (0: new replica, the client's choice applies).
    pub chunk_size: u32,
    /// Point time (ns) the interrupted session was opened with, when `resumed`
    /// (plan only: when one is pending); 0 otherwise. A client that must not mix
    /// two points (replica from backup) checks it before it resumes.
    pub pending_point_time_ns: i64,
}

/// Open a disk of the open replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenDisk {
    /// Disk id within this session, chosen by the client.
    pub disk: u32,
    /// Disk name (file name in the datastore).
    pub name: String,
    /// Source disk size in bytes.
    pub size: u64,
    /// Chunk size (power of two, 64 KiB..=4 MiB).
    pub chunk_size: u32,
    /// How changes are found.
    pub mode: Mode,
}

/// The target's answer to OpenDisk: what it already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeInfo {
    /// Disk id.
    pub disk: u32,
    /// Size of the disk at the target before this session (0 for a new disk).
    pub previous_size: u64,
    /// First chunk not yet durable in this session: the client resumes here (0: from the start).
    pub next_chunk: u64,
    /// Flags: bit 0 the disk existed at the target; bit 1 this session already finished the disk.
    pub flags: u8,
}

impl ResumeInfo {
    /// Flag: the disk existed at the target before.
    pub const EXISTED: u8 = 0x01;
    /// Flag: the disk was already finished in this (resumed) session.
    pub const FINISHED: u8 = 0x02;
}

/// Ask for the target's digest map of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestMapRequest {
    /// Disk id.
    pub disk: u32,
    /// Hash of the map the client has cached (all zero: none); on a match no parts are sent.
    pub cached_map_hash: [u8; 32],
}

/// A run of digests from the target's digest map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestMapPart {
    /// Disk id.
    pub disk: u32,
    /// Index of the first chunk described.
    pub first_chunk: u64,
    /// `n * 32` bytes: the digests of chunks `first_chunk..first_chunk + n`.
    pub digests: Bytes,
}

impl DigestMapPart {
    /// Number of digests in the part.
    pub fn count(&self) -> usize {
        self.digests.len() / DIGEST_LEN
    }
}

/// End of a digest map reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestMapEnd {
    /// Disk id.
    pub disk: u32,
    /// Number of chunks the map covers.
    pub chunk_count: u64,
    /// Hash of the whole map (lets the client cache it).
    pub map_hash: [u8; 32],
    /// True when the client's cached map is current and no parts were sent.
    pub cache_hit: bool,
}

/// One chunk of data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// Disk id.
    pub disk: u32,
    /// Chunk index.
    pub chunk: u64,
    /// Length of the chunk's logical bytes (the chunk size, or less for the last chunk).
    pub logical_len: u32,
    /// Payload encoding.
    pub codec: Codec,
    /// BLAKE3 of the logical bytes; the target verifies it before writing.
    pub digest: Digest,
    /// Encoded payload: a slice of the receive buffer, never copied by the decoder.
    pub payload: Bytes,
}

/// Length of a data frame's fixed fields (before the payload).
pub const DATA_FIXED_LEN: usize = 4 + 8 + 4 + 1 + DIGEST_LEN;

/// A data frame's fixed fields and the length of its payload: what a
/// receiver that reads payloads into buffers of its own gets from
/// [`Deframer::next_split`] before the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHead {
    /// Disk id.
    pub disk: u32,
    /// Chunk index.
    pub chunk: u64,
    /// Length of the chunk's logical bytes.
    pub logical_len: u32,
    /// Payload encoding.
    pub codec: Codec,
    /// BLAKE3 of the logical bytes.
    pub digest: Digest,
    /// Length of the encoded payload (checked as for a whole frame: not empty, at
    /// most [`MAX_CHUNK_SIZE`], equal to `logical_len` when the codec is none).
    pub payload_len: u32,
}

impl DataHead {
    /// Read the fixed fields of a data frame whose payload is `payload_len` bytes,
    /// and check them and that length.
    fn decode(r: &mut Reader, payload_len: usize) -> Result<DataHead, WireError> {
        let name = r.frame;
        let disk = r.u32("disk")?;
        let chunk = r.u64("chunk")?;
        let logical_len = r.u32("logical_len")?;
        if logical_len == 0 || logical_len > MAX_CHUNK_SIZE {
            return Err(WireError::InvalidValue { frame: name, field: "logical_len", value: logical_len.into() });
        }
        let c = r.u8("codec")?;
        let codec =
            Codec::from_u8(c).ok_or(WireError::InvalidValue { frame: name, field: "codec", value: c.into() })?;
        let digest = r.array("digest")?;
        // The sender refuses payloads above a chunk (a zstd frame that does not
        // shrink the chunk is sent raw instead); refuse them here too.
        if payload_len > MAX_CHUNK_SIZE as usize {
            return Err(WireError::FieldTooLong {
                frame: name,
                field: "payload",
                len: payload_len as u64,
                max: MAX_CHUNK_SIZE.into(),
            });
        }
        if codec == Codec::None && payload_len != logical_len as usize {
            return Err(WireError::InvalidValue { frame: name, field: "payload length", value: payload_len as u64 });
        }
        if payload_len == 0 {
            return Err(WireError::Truncated { frame: name, field: "payload" });
        }
        Ok(DataHead { disk, chunk, logical_len, codec, digest, payload_len: payload_len as u32 })
    }

    /// The whole frame, with its payload.
    pub fn with_payload(self, payload: Bytes) -> Data {
        let DataHead { disk, chunk, logical_len, codec, digest, .. } = self;
        Data { disk, chunk, logical_len, codec, digest, payload }
    }
}

/// A run of all-zero chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZeroRun {
    /// Disk id.
    pub disk: u32,
    /// First chunk of the run.
    pub first_chunk: u64,
    /// Number of chunks.
    pub count: u64,
}

/// Source: everything for chunks below `next_chunk` has been sent; make it durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flush {
    /// Disk id.
    pub disk: u32,
    /// All chunks below this index are sent. Equal to the disk's chunk count: the disk is complete.
    pub next_chunk: u64,
}

/// Target: everything for chunks below `next_chunk` is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Disk id.
    pub disk: u32,
    /// Durable up to (not including) this chunk.
    pub next_chunk: u64,
}

/// A run of chunks `first_chunk .. first_chunk + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRun {
    /// First chunk of the run.
    pub first_chunk: u64,
    /// Number of chunks, at least 1.
    pub count: u32,
}

/// Source: the chunks of `disk` it is about to send, in increasing order (advisory; FLAG_OPTIONAL).
///
/// A target may ignore it (one that predates it skips it as an unknown
/// optional frame); the source may send fewer chunks than announced, and
/// chunks never announced. Runs are non-empty, strictly increasing and do not
/// overlap; the first is never behind data sent or an earlier Intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// Disk id.
    pub disk: u32,
    /// 1 ..= [`MAX_INTENT_RUNS`] runs, in increasing chunk order.
    pub runs: Vec<ChunkRun>,
}

/// Length of an Intent frame's fixed fields (before the runs).
const INTENT_FIXED_LEN: usize = 4 + 4;
/// Length of one run in an Intent frame.
const INTENT_RUN_LEN: usize = 8 + 4;

impl Intent {
    /// The checks the decoder makes, for the encoder side too (so we never
    /// send what a peer must refuse).
    pub(crate) fn validate(&self) -> Result<(), WireError> {
        check_intent_run_count(self.runs.len())?;
        check_intent_runs(&self.runs)
    }
}

/// The run count of an Intent: 1 ..= [`MAX_INTENT_RUNS`], checked before the runs are read.
fn check_intent_run_count(count: usize) -> Result<(), WireError> {
    let frame = type_name(frame_type::INTENT);
    if count > MAX_INTENT_RUNS {
        return Err(WireError::FieldTooLong { frame, field: "count", len: count as u64, max: MAX_INTENT_RUNS as u64 });
    }
    if count == 0 {
        return Err(WireError::InvalidValue { frame, field: "count", value: 0 });
    }
    Ok(())
}

/// Each run non-empty and within u64; runs strictly increasing, not overlapping.
fn check_intent_runs(runs: &[ChunkRun]) -> Result<(), WireError> {
    let frame = type_name(frame_type::INTENT);
    let mut prev_end = 0u64;
    for (i, run) in runs.iter().enumerate() {
        if run.count == 0 {
            return Err(WireError::InvalidValue { frame, field: "count", value: 0 });
        }
        if i > 0 && run.first_chunk < prev_end {
            return Err(WireError::InvalidValue { frame, field: "runs", value: run.first_chunk });
        }
        prev_end = run.first_chunk.checked_add(u64::from(run.count)).ok_or(WireError::InvalidValue {
            frame,
            field: "first_chunk",
            value: run.first_chunk,
        })?;
    }
    Ok(())
}

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

/// Typed error; the sender closes the session after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Error code.
    pub code: ErrorCode,
    /// Message for the operator.
    pub message: String,
}

/// A frame of protocol v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client's first frame (type 0x01).
    Hello(Hello),
    /// Server's answer to Hello (0x02).
    Welcome(Welcome),
    /// Client's proof (0x03).
    AuthProof(AuthProof),
    /// Server's acceptance and proof (0x04).
    AuthOk(AuthOk),
    /// Open a replica (0x10).
    OpenReplica(OpenReplica),
    /// The replica is open (0x11).
    ReplicaOpened(ReplicaOpened),
    /// Open a disk (0x12).
    OpenDisk(OpenDisk),
    /// The target's state of a disk (0x13).
    ResumeInfo(ResumeInfo),
    /// Ask for a digest map (0x20).
    DigestMapRequest(DigestMapRequest),
    /// Digests of a run of chunks (0x21).
    DigestMapPart(DigestMapPart),
    /// End of a digest map (0x22).
    DigestMapEnd(DigestMapEnd),
    /// One chunk (0x30).
    Data(Data),
    /// All-zero chunks (0x31).
    ZeroRun(ZeroRun),
    /// Source watermark (0x32).
    Flush(Flush),
    /// Durable watermark (0x33).
    Checkpoint(Checkpoint),
    /// Chunks the source is about to send, optional (0x34).
    Intent(Intent),
    /// Make the restore point (0x40).
    Commit(Commit),
    /// The restore point exists (0x41).
    Committed(Committed),
    /// Progress report, optional (0x50).
    Progress(Progress),
    /// Liveness, optional (0x51).
    Keepalive,
    /// Typed error; the sender closes (0x7E).
    Error(ErrorFrame),
    /// Orderly end of the session (0x7F).
    Close,
    /// A frame of unknown type that carried FLAG_OPTIONAL: skipped by v1 peers.
    Unknown {
        /// Its type byte.
        frame_type: u8,
    },
}

impl Frame {
    /// The frame's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::AuthProof(_) => "AuthProof",
            Frame::AuthOk(_) => "AuthOk",
            Frame::OpenReplica(_) => "OpenReplica",
            Frame::ReplicaOpened(_) => "ReplicaOpened",
            Frame::OpenDisk(_) => "OpenDisk",
            Frame::ResumeInfo(_) => "ResumeInfo",
            Frame::DigestMapRequest(_) => "DigestMapRequest",
            Frame::DigestMapPart(_) => "DigestMapPart",
            Frame::DigestMapEnd(_) => "DigestMapEnd",
            Frame::Data(_) => "Data",
            Frame::ZeroRun(_) => "ZeroRun",
            Frame::Flush(_) => "Flush",
            Frame::Checkpoint(_) => "Checkpoint",
            Frame::Intent(_) => "Intent",
            Frame::Commit(_) => "Commit",
            Frame::Committed(_) => "Committed",
            Frame::Progress(_) => "Progress",
            Frame::Keepalive => "Keepalive",
            Frame::Error(_) => "Error",
            Frame::Close => "Close",
            Frame::Unknown { .. } => "Unknown",
        }
    }

    /// The frame's type byte.
    pub fn frame_type(&self) -> u8 {
        use frame_type::*;
        match self {
            Frame::Hello(_) => HELLO,
            Frame::Welcome(_) => WELCOME,
            Frame::AuthProof(_) => AUTH_PROOF,
            Frame::AuthOk(_) => AUTH_OK,
            Frame::OpenReplica(_) => OPEN_REPLICA,
            Frame::ReplicaOpened(_) => REPLICA_OPENED,
            Frame::OpenDisk(_) => OPEN_DISK,
            Frame::ResumeInfo(_) => RESUME_INFO,
            Frame::DigestMapRequest(_) => DIGEST_MAP_REQUEST,
            Frame::DigestMapPart(_) => DIGEST_MAP_PART,
            Frame::DigestMapEnd(_) => DIGEST_MAP_END,
            Frame::Data(_) => DATA,
            Frame::ZeroRun(_) => ZERO_RUN,
            Frame::Flush(_) => FLUSH,
            Frame::Checkpoint(_) => CHECKPOINT,
            Frame::Intent(_) => INTENT,
            Frame::Commit(_) => COMMIT,
            Frame::Committed(_) => COMMITTED,
            Frame::Progress(_) => PROGRESS,
            Frame::Keepalive => KEEPALIVE,
            Frame::Error(_) => ERROR,
            Frame::Close => CLOSE,
            Frame::Unknown { frame_type } => *frame_type,
        }
    }

    /// Flags this frame is sent with: Progress, Keepalive and Intent are optional.
    pub fn flags(&self) -> u8 {
        match self {
            Frame::Progress(_) | Frame::Keepalive | Frame::Intent(_) | Frame::Unknown { .. } => FLAG_OPTIONAL,
            _ => 0,
        }
    }

    /// Encode the frame (header and body) at the end of `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        if let Frame::Data(d) = self {
            d.encode_head(dst);
            dst.extend_from_slice(&d.payload);
            return;
        }
        let start = dst.len();
        dst.put_bytes(0, HEADER_LEN);
        self.encode_body(dst);
        let body_len = dst.len() - start - HEADER_LEN;
        let header = encode_header(self.frame_type(), self.flags(), body_len as u32);
        dst[start..start + HEADER_LEN].copy_from_slice(&header);
    }

    /// Encode the frame into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }

    fn encode_body(&self, b: &mut BytesMut) {
        match self {
            Frame::Hello(h) => {
                b.put_u16_le(h.version_min);
                b.put_u16_le(h.version_max);
                b.put_u64_le(h.features);
                b.put_slice(&h.nonce);
                put_str(b, &h.peer_name);
                put_str(b, &h.software);
            }
            Frame::Welcome(w) => {
                b.put_u16_le(w.version);
                b.put_u64_le(w.features);
                b.put_slice(&w.nonce);
                put_str(b, &w.peer_name);
                put_str(b, &w.software);
            }
            Frame::AuthProof(a) => b.put_slice(&a.proof),
            Frame::AuthOk(a) => b.put_slice(&a.proof),
            Frame::OpenReplica(o) => {
                put_str(b, &o.replica);
                b.put_i64_le(o.point_time_ns);
                b.put_slice(&o.session_id);
                b.put_u32_le(o.retain);
                b.put_u8(o.flags);
            }
            Frame::ReplicaOpened(r) => {
                b.put_slice(&r.session_id);
                b.put_u8(r.resumed as u8);
                b.put_u64_le(r.latest_point);
                b.put_i64_le(r.latest_point_time_ns);
                b.put_u32_le(r.chunk_size);
                b.put_i64_le(r.pending_point_time_ns);
            }
            Frame::OpenDisk(o) => {
                b.put_u32_le(o.disk);
                put_str(b, &o.name);
                b.put_u64_le(o.size);
                b.put_u32_le(o.chunk_size);
                b.put_u8(o.mode as u8);
            }
            Frame::ResumeInfo(r) => {
                b.put_u32_le(r.disk);
                b.put_u64_le(r.previous_size);
                b.put_u64_le(r.next_chunk);
                b.put_u8(r.flags);
            }
            Frame::DigestMapRequest(r) => {
                b.put_u32_le(r.disk);
                b.put_slice(&r.cached_map_hash);
            }
            Frame::DigestMapPart(p) => {
                b.put_u32_le(p.disk);
                b.put_u64_le(p.first_chunk);
                b.put_u32_le(p.count() as u32);
                b.put_slice(&p.digests);
            }
            Frame::DigestMapEnd(e) => {
                b.put_u32_le(e.disk);
                b.put_u64_le(e.chunk_count);
                b.put_slice(&e.map_hash);
                b.put_u8(e.cache_hit as u8);
            }
            Frame::Data(_) => unreachable!("data frames are encoded by encode_head"),
            Frame::ZeroRun(z) => {
                b.put_u32_le(z.disk);
                b.put_u64_le(z.first_chunk);
                b.put_u64_le(z.count);
            }
            Frame::Flush(f) => {
                b.put_u32_le(f.disk);
                b.put_u64_le(f.next_chunk);
            }
            Frame::Checkpoint(c) => {
                b.put_u32_le(c.disk);
                b.put_u64_le(c.next_chunk);
            }
            Frame::Intent(i) => {
                b.reserve(INTENT_FIXED_LEN + INTENT_RUN_LEN * i.runs.len());
                b.put_u32_le(i.disk);
                b.put_u32_le(i.runs.len() as u32);
                for run in &i.runs {
                    b.put_u64_le(run.first_chunk);
                    b.put_u32_le(run.count);
                }
            }
            Frame::Commit(c) => b.put_u32_le(c.disk_count),
            Frame::Committed(c) => {
                b.put_u64_le(c.point_id);
                b.put_i64_le(c.point_time_ns);
            }
            Frame::Progress(p) => {
                b.put_u32_le(p.disk);
                b.put_u64_le(p.bytes_done);
            }
            Frame::Keepalive | Frame::Close | Frame::Unknown { .. } => {}
            Frame::Error(e) => {
                b.put_u16_le(e.code.to_u16());
                put_str(b, &e.message);
            }
        }
    }

    /// Decode one frame body. `frame_type` and `flags` come from the header.
    pub fn decode_body(ty: u8, flags: u8, body: Bytes) -> Result<Frame, WireError> {
        use self::frame_type as t;
        let name = type_name(ty);
        if flags & FLAGS_RESERVED != 0 {
            return Err(WireError::ReservedFlags { frame: name, flags });
        }
        let mut r = Reader { buf: body, frame: name };
        let frame = match ty {
            t::HELLO => Frame::Hello(Hello {
                version_min: r.u16("version_min")?,
                version_max: r.u16("version_max")?,
                features: r.u64("features")?,
                nonce: r.array("nonce")?,
                peer_name: r.string("peer_name", MAX_NAME_LEN)?,
                software: r.string("software", MAX_SOFTWARE_LEN)?,
            }),
            t::WELCOME => Frame::Welcome(Welcome {
                version: r.u16("version")?,
                features: r.u64("features")?,
                nonce: r.array("nonce")?,
                peer_name: r.string("peer_name", MAX_NAME_LEN)?,
                software: r.string("software", MAX_SOFTWARE_LEN)?,
            }),
            t::AUTH_PROOF => Frame::AuthProof(AuthProof { proof: r.array("proof")? }),
            t::AUTH_OK => Frame::AuthOk(AuthOk { proof: r.array("proof")? }),
            t::OPEN_REPLICA => Frame::OpenReplica(OpenReplica {
                replica: r.string("replica", MAX_NAME_LEN)?,
                point_time_ns: r.i64("point_time_ns")?,
                session_id: r.array("session_id")?,
                retain: r.u32("retain")?,
                flags: {
                    let f = r.u8("flags")?;
                    if f & !OpenReplica::PLAN_ONLY != 0 {
                        return Err(WireError::InvalidValue { frame: name, field: "flags", value: f.into() });
                    }
                    f
                },
            }),
            t::REPLICA_OPENED => Frame::ReplicaOpened(ReplicaOpened {
                session_id: r.array("session_id")?,
                resumed: r.bool("resumed")?,
                latest_point: r.u64("latest_point")?,
                latest_point_time_ns: r.i64("latest_point_time_ns")?,
                chunk_size: {
                    let c = r.u32("chunk_size")?;
                    if c != 0 {
                        check_chunk_size(name, c)?;
                    }
                    c
                },
                pending_point_time_ns: r.i64("pending_point_time_ns")?,
            }),
            t::OPEN_DISK => Frame::OpenDisk(OpenDisk {
                disk: r.u32("disk")?,
                name: r.string("name", MAX_NAME_LEN)?,
                size: r.u64("size")?,
                chunk_size: {
                    let c = r.u32("chunk_size")?;
                    check_chunk_size(name, c)?;
                    c
                },
                mode: {
                    let m = r.u8("mode")?;
                    Mode::from_u8(m).ok_or(WireError::InvalidValue { frame: name, field: "mode", value: m.into() })?
                },
            }),
            t::RESUME_INFO => Frame::ResumeInfo(ResumeInfo {
                disk: r.u32("disk")?,
                previous_size: r.u64("previous_size")?,
                next_chunk: r.u64("next_chunk")?,
                flags: {
                    let f = r.u8("flags")?;
                    if f & !(ResumeInfo::EXISTED | ResumeInfo::FINISHED) != 0 {
                        return Err(WireError::InvalidValue { frame: name, field: "flags", value: f.into() });
                    }
                    f
                },
            }),
            t::DIGEST_MAP_REQUEST => Frame::DigestMapRequest(DigestMapRequest {
                disk: r.u32("disk")?,
                cached_map_hash: r.array("cached_map_hash")?,
            }),
            t::DIGEST_MAP_PART => {
                let disk = r.u32("disk")?;
                let first_chunk = r.u64("first_chunk")?;
                let count = r.u32("count")? as usize;
                if count > MAX_DIGESTS_PER_PART {
                    return Err(WireError::FieldTooLong {
                        frame: name,
                        field: "count",
                        len: count as u64,
                        max: MAX_DIGESTS_PER_PART as u64,
                    });
                }
                let digests = r.bytes("digests", count * DIGEST_LEN)?;
                Frame::DigestMapPart(DigestMapPart { disk, first_chunk, digests })
            }
            t::DIGEST_MAP_END => Frame::DigestMapEnd(DigestMapEnd {
                disk: r.u32("disk")?,
                chunk_count: r.u64("chunk_count")?,
                map_hash: r.array("map_hash")?,
                cache_hit: r.bool("cache_hit")?,
            }),
            t::DATA => {
                let payload_len = r.buf.len().saturating_sub(DATA_FIXED_LEN);
                let head = DataHead::decode(&mut r, payload_len)?;
                Frame::Data(head.with_payload(r.rest()))
            }
            t::ZERO_RUN => {
                let z = ZeroRun { disk: r.u32("disk")?, first_chunk: r.u64("first_chunk")?, count: r.u64("count")? };
                if z.count == 0 {
                    return Err(WireError::InvalidValue { frame: name, field: "count", value: 0 });
                }
                Frame::ZeroRun(z)
            }
            t::FLUSH => Frame::Flush(Flush { disk: r.u32("disk")?, next_chunk: r.u64("next_chunk")? }),
            t::CHECKPOINT => Frame::Checkpoint(Checkpoint { disk: r.u32("disk")?, next_chunk: r.u64("next_chunk")? }),
            t::INTENT => {
                let disk = r.u32("disk")?;
                let count = r.u32("count")? as usize;
                check_intent_run_count(count)?;
                // Every run is in the body before anything is allocated for them.
                r.need(count * INTENT_RUN_LEN, "runs")?;
                let mut runs = Vec::with_capacity(count);
                for _ in 0..count {
                    runs.push(ChunkRun { first_chunk: r.u64("first_chunk")?, count: r.u32("count")? });
                }
                check_intent_runs(&runs)?;
                Frame::Intent(Intent { disk, runs })
            }
            t::COMMIT => Frame::Commit(Commit { disk_count: r.u32("disk_count")? }),
            t::COMMITTED => {
                Frame::Committed(Committed { point_id: r.u64("point_id")?, point_time_ns: r.i64("point_time_ns")? })
            }
            t::PROGRESS => Frame::Progress(Progress { disk: r.u32("disk")?, bytes_done: r.u64("bytes_done")? }),
            t::KEEPALIVE => Frame::Keepalive,
            t::ERROR => Frame::Error(ErrorFrame {
                code: ErrorCode::from_u16(r.u16("code")?),
                message: r.string("message", MAX_MESSAGE_LEN)?,
            }),
            t::CLOSE => Frame::Close,
            other => {
                if flags & FLAG_OPTIONAL != 0 {
                    return Ok(Frame::Unknown { frame_type: other });
                }
                return Err(WireError::UnknownFrameType(other));
            }
        };
        r.finish()?;
        Ok(frame)
    }
}

impl Data {
    /// Encode the frame header and fixed fields of this data frame, but not
    /// its payload, so a sender can write head and payload with one vectored
    /// write and never copy the payload.
    pub fn encode_head(&self, dst: &mut BytesMut) {
        let body_len = DATA_FIXED_LEN + self.payload.len();
        dst.put_slice(&encode_header(frame_type::DATA, 0, body_len as u32));
        dst.put_u32_le(self.disk);
        dst.put_u64_le(self.chunk);
        dst.put_u32_le(self.logical_len);
        dst.put_u8(self.codec as u8);
        dst.put_slice(&self.digest);
    }
}

fn check_chunk_size(frame: &'static str, c: u32) -> Result<(), WireError> {
    if !c.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) {
        return Err(WireError::InvalidValue { frame, field: "chunk_size", value: c.into() });
    }
    Ok(())
}

/// Name of a frame type, for errors.
pub fn type_name(ty: u8) -> &'static str {
    use self::frame_type::*;
    match ty {
        HELLO => "Hello",
        WELCOME => "Welcome",
        AUTH_PROOF => "AuthProof",
        AUTH_OK => "AuthOk",
        OPEN_REPLICA => "OpenReplica",
        REPLICA_OPENED => "ReplicaOpened",
        OPEN_DISK => "OpenDisk",
        RESUME_INFO => "ResumeInfo",
        DIGEST_MAP_REQUEST => "DigestMapRequest",
        DIGEST_MAP_PART => "DigestMapPart",
        DIGEST_MAP_END => "DigestMapEnd",
        DATA => "Data",
        ZERO_RUN => "ZeroRun",
        FLUSH => "Flush",
        CHECKPOINT => "Checkpoint",
        INTENT => "Intent",
        COMMIT => "Commit",
        COMMITTED => "Committed",
        PROGRESS => "Progress",
        KEEPALIVE => "Keepalive",
        ERROR => "Error",
        CLOSE => "Close",
        _ => "Unknown",
    }
}

/// FNV-1a, 32 bit: the header check. Not a digest of data; it only detects a
/// stream that lost sync or a corrupted header.
pub fn header_check(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Encode a frame header.
pub fn encode_header(frame_type: u8, flags: u8, body_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(&MAGIC);
    h[2] = frame_type;
    h[3] = flags;
    h[4..8].copy_from_slice(&body_len.to_le_bytes());
    let check = header_check(&h[0..8]);
    h[8..12].copy_from_slice(&check.to_le_bytes());
    h
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame type byte.
    pub frame_type: u8,
    /// Flags byte.
    pub flags: u8,
    /// Body length.
    pub body_len: u32,
}

/// Decode and check a frame header, including the body length limit.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    if h[0..2] != MAGIC {
        return Err(WireError::BadMagic { found: [h[0], h[1]], expected: MAGIC });
    }
    let found = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let computed = header_check(&h[0..8]);
    if found != computed {
        return Err(WireError::HeaderCheck { found, computed });
    }
    let body_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if body_len > MAX_BODY_LEN {
        return Err(WireError::FrameTooLarge { frame_type: h[2], len: body_len, max: MAX_BODY_LEN });
    }
    Ok(Header { frame_type: h[2], flags: h[3], body_len })
}

/// Splits a byte stream into frames.
///
/// Read socket data straight into [`Deframer::buffer_mut`] (or push it with
/// [`Deframer::push`]); [`Deframer::next_frame`] returns `Ok(None)` while it
/// needs more bytes. Decoded payloads are slices of this buffer, not copies.
#[derive(Debug)]
pub struct Deframer {
    buf: BytesMut,
    header: Option<Header>,
    max_body_len: u32,
    /// Payload bytes of the data frame [`Deframer::next_split`] returned last that
    /// its caller has not taken yet.
    payload_left: usize,
}

impl Default for Deframer {
    fn default() -> Self {
        Deframer { buf: BytesMut::new(), header: None, max_body_len: MAX_BODY_LEN, payload_left: 0 }
    }
}

/// What [`Deframer::next_split`] returns: a whole frame, or the head of a data
/// frame whose payload the caller takes itself.
#[derive(Debug)]
pub enum Split {
    /// Any frame but a well-formed data frame.
    Frame(Frame),
    /// A data frame's head: its `payload_len` bytes follow, for the caller to take
    /// with [`Deframer::take_payload`] and [`Deframer::payload_received`].
    Data(DataHead),
}

impl Deframer {
    /// A deframer with an empty buffer, accepting bodies up to [`MAX_BODY_LEN`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Lower the body length limit for the frames not yet started (at most
    /// [`MAX_BODY_LEN`]): a larger announced length is [`WireError::FrameTooLarge`]
    /// as soon as its header is in. Sessions use [`MAX_HANDSHAKE_BODY_LEN`]
    /// until the peer is authenticated.
    pub fn set_max_body_len(&mut self, max: u32) {
        self.max_body_len = max.min(MAX_BODY_LEN);
    }

    /// The body length limit in force.
    pub fn max_body_len(&self) -> u32 {
        self.max_body_len
    }

    /// Append bytes received from the peer.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The receive buffer, for reading from a socket straight into its spare capacity.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// How many bytes are buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the next frame needs at least (0 when one is ready to decode).
    pub fn wanted(&self) -> usize {
        match self.header {
            None => HEADER_LEN.saturating_sub(self.buf.len()),
            Some(h) => (h.body_len as usize).saturating_sub(self.buf.len()),
        }
    }

    /// Decode the next frame, `Ok(None)` if more bytes are needed.
    ///
    /// The header (magic, check, length limit) is validated as soon as its 12
    /// bytes are in, before any body is buffered or allocated for.
    ///
    /// # Panics
    /// When the payload of a data frame from [`Deframer::next_split`] has not
    /// all been taken (a bug in the caller, not bad input).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let Some(header) = self.header()? else { return Ok(None) };
        let len = header.body_len as usize;
        if self.buf.len() < len {
            // Reserve for the announced body (already bounded by max_body_len).
            self.buf.reserve(len - self.buf.len());
            return Ok(None);
        }
        self.header = None;
        let body = self.buf.split_to(len).freeze();
        Frame::decode_body(header.frame_type, header.flags, body).map(Some)
    }
}

impl Deframer {
    /// The header of the next frame, decoded and checked once its bytes are in.
    fn header(&mut self) -> Result<Option<Header>, WireError> {
        assert_eq!(self.payload_left, 0, "the payload of the last data frame must be taken first");
        if let Some(h) = self.header {
            return Ok(Some(h));
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&self.buf[..HEADER_LEN]);
        let h = decode_header(&raw)?;
        if h.body_len > self.max_body_len {
            return Err(WireError::FrameTooLarge { frame_type: h.frame_type, len: h.body_len, max: self.max_body_len });
        }
        self.buf.advance(HEADER_LEN);
        self.header = Some(h);
        Ok(Some(h))
    }

    /// Like [`Deframer::next_frame`], but a data frame comes out as its head as
    /// soon as its fixed fields are in (checked as [`Frame::decode_body`] checks
    /// them): its payload is left for the caller to take into a buffer of its
    /// own, from this buffer ([`Deframer::take_payload`]) and then straight from
    /// the socket ([`Deframer::payload_received`]), before it asks for the next
    /// frame. A receiver that writes chunks from buffers it reuses so never
    /// allocates or copies for a payload.
    ///
    /// # Panics
    /// As [`Deframer::next_frame`].
    pub fn next_split(&mut self) -> Result<Option<Split>, WireError> {
        let Some(h) = self.header()? else { return Ok(None) };
        if h.frame_type != frame_type::DATA || h.flags & FLAGS_RESERVED != 0 || (h.body_len as usize) < DATA_FIXED_LEN {
            // Anything else, and every error a data frame's header can hold, the usual way.
            return Ok(self.next_frame()?.map(Split::Frame));
        }
        if self.buf.len() < DATA_FIXED_LEN {
            return Ok(None);
        }
        self.header = None;
        let fixed = self.buf.split_to(DATA_FIXED_LEN).freeze();
        let head = DataHead::decode(&mut Reader { buf: fixed, frame: "Data" }, h.body_len as usize - DATA_FIXED_LEN)?;
        self.payload_left = head.payload_len as usize;
        Ok(Some(Split::Data(head)))
    }

    /// Payload bytes of the data frame from [`Deframer::next_split`] not taken yet.
    pub fn payload_left(&self) -> usize {
        self.payload_left
    }

    /// Move the buffered bytes of that payload (as many as fit in `dst`) to `dst`;
    /// returns how many.
    pub fn take_payload(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.payload_left).min(self.buf.len());
        dst[..n].copy_from_slice(&self.buf[..n]);
        self.buf.advance(n);
        self.payload_left -= n;
        n
    }

    /// The caller read `n` bytes of that payload from the peer itself (after taking
    /// every buffered one).
    ///
    /// # Panics
    /// When `n` is more than [`Deframer::payload_left`] or payload bytes are still buffered.
    pub fn payload_received(&mut self, n: usize) {
        assert!(n <= self.payload_left, "more payload received than the frame holds");
        assert!(n == 0 || self.buf.is_empty(), "payload bytes are still buffered");
        self.payload_left -= n;
    }
}

/// Decode exactly one frame from `bytes` (used by tests and fuzzing):
/// an error if the bytes hold less or more than one frame.
pub fn decode_one(bytes: &[u8]) -> Result<Frame, WireError> {
    let mut d = Deframer::new();
    d.push(bytes);
    match d.next_frame()? {
        Some(f) if d.buffered() == 0 => Ok(f),
        Some(f) => Err(WireError::TrailingBytes { frame: f.name(), extra: d.buffered() }),
        None => Err(WireError::Truncated { frame: "frame", field: "header or body" }),
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
}

/// Bounds-checked reader over a frame body.
struct Reader {
    buf: Bytes,
    frame: &'static str,
}

impl Reader {
    fn need(&self, n: usize, field: &'static str) -> Result<(), WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated { frame: self.frame, field });
        }
        Ok(())
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::InvalidValue { frame: self.frame, field, value: v.into() }),
        }
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64_le())
    }
    fn i64(&mut self, field: &'static str) -> Result<i64, WireError> {
        self.need(8, field)?;
        Ok(self.buf.get_i64_le())
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        self.need(N, field)?;
        let mut a = [0u8; N];
        self.buf.copy_to_slice(&mut a);
        Ok(a)
    }
    fn bytes(&mut self, field: &'static str, n: usize) -> Result<Bytes, WireError> {
        self.need(n, field)?;
        Ok(self.buf.split_to(n))
    }
    fn string(&mut self, field: &'static str, max: usize) -> Result<String, WireError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(WireError::FieldTooLong { frame: self.frame, field, len: len as u64, max: max as u64 });
        }
        let raw = self.bytes(field, len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| WireError::InvalidUtf8 { frame: self.frame, field })
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    fn finish(self) -> Result<(), WireError> {
        if !self.buf.is_empty() {
            return Err(WireError::TrailingBytes { frame: self.frame, extra: self.buf.len() });
        }
        Ok(())
    }
}
