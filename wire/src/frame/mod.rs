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
//! DO NOT MODIFY the layouts below (the constants and type codes here, the
//! fields of the payload types, their order in `encode.rs` and `decode.rs`):
//! they are protocol v1, pinned by the golden vectors in
//! `tests/golden/frames.hex`. A change is a new protocol version.
//!
//! One file per job: this one holds the limits, flags, type codes and the
//! [`Frame`] enum; `header.rs` the 12-byte header; the payload types sit in
//! one file per group of type codes, as PROTOCOL.md section 3 groups them
//! (`handshake.rs` 0x01.., `replica.rs` 0x10.., `digest_map.rs` 0x20..,
//! `data.rs` 0x30.., `control.rs` 0x40.. and up); `encode.rs` and `decode.rs`
//! lay them out in bytes (`reader.rs` bounds-checks every read); and
//! `deframer.rs` cuts a byte stream into frames.

mod control;
mod data;
mod decode;
mod deframer;
mod digest_map;
mod encode;
mod handshake;
mod header;
mod reader;
mod replica;
mod streams;

pub use control::{Commit, Committed, ErrorCode, ErrorFrame, Notice, NoticeLevel, Progress};
pub use data::{
    Checkpoint, ChunkRun, Codec, Data, DataHead, Flush, Intent, StreamHeader, ZeroRun, DATA_FIXED_LEN,
    STREAM_HEADER_LEN,
};
pub use deframer::{decode_one, Deframer, Split};
pub use digest_map::{DigestMapEnd, DigestMapPart, DigestMapRequest};
pub use handshake::{AuthOk, AuthProof, Hello, Welcome};
pub use header::{decode_header, encode_header, header_check, Header};
pub use replica::{Mode, OpenDisk, OpenReplica, ReplicaOpened, ResumeInfo};
pub use streams::{Join, Joined, OpenStreams, Seq, StreamTicket, MAX_STREAMS, SEQ_BODY_LEN};

// The chunk size limits and `Digest` live in `crate::chunk`, shared with the
// planner and the mover; frames only carry them.
use crate::chunk::{Digest, MAX_CHUNK_SIZE};

/// The two bytes every frame starts with. Not ASCII, so a text protocol
/// (HTTP, SSH banner) hitting a ferry port is rejected at once.
pub const MAGIC: [u8; 2] = [0xFE, 0x52];
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// Lowest protocol version this crate speaks.
pub const VERSION_MIN: u16 = 1;
/// Highest protocol version this crate speaks.
pub const VERSION_MAX: u16 = 1;

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
const _: () = assert!(DIGEST_LEN == std::mem::size_of::<Digest>());

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
/// Feature bit: Data frames with codec zstd-stream (compression history kept
/// across the chunks of a stream, [`Codec::ZstdStream`]).
pub const FEATURE_ZSTD_STREAM: u64 = 1 << 3;
/// All features this version implements (offered in Hello / Welcome).
/// Feature bit: a session striped over several connections (OpenStreams,
/// StreamTicket, Join, Joined, Seq; PROTOCOL.md section 11).
pub const FEATURE_STREAMS: u64 = 1 << 4;
/// All features this version implements (offered in Hello / Welcome).
pub const FEATURES_V1: u64 = FEATURE_ZSTD | FEATURE_DIGEST_MAP | FEATURE_RESUME | FEATURE_ZSTD_STREAM | FEATURE_STREAMS;

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
    /// Join: a further connection joins a striped session (feature streams).
    pub const JOIN: u8 = 0x05;
    /// Joined: the connection joined the session.
    pub const JOINED: u8 = 0x06;
    /// OpenReplica: open or resume a replica session.
    pub const OPEN_REPLICA: u8 = 0x10;
    /// ReplicaOpened: the replica is open and locked.
    pub const REPLICA_OPENED: u8 = 0x11;
    /// OpenDisk: open a disk of the replica.
    pub const OPEN_DISK: u8 = 0x12;
    /// ResumeInfo: what the target holds of a disk, where to resume.
    pub const RESUME_INFO: u8 = 0x13;
    /// OpenStreams: stripe the replica session over several connections.
    pub const OPEN_STREAMS: u8 = 0x14;
    /// StreamTicket: the ticket further connections join with.
    pub const STREAM_TICKET: u8 = 0x15;
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
    /// Seq: the sequence number of the frame that follows (striped sessions).
    pub const SEQ: u8 = 0x35;
    /// Commit: make the restore point.
    pub const COMMIT: u8 = 0x40;
    /// Committed: the restore point is durable.
    pub const COMMITTED: u8 = 0x41;
    /// Progress: optional report.
    pub const PROGRESS: u8 = 0x50;
    /// Keepalive: optional liveness.
    pub const KEEPALIVE: u8 = 0x51;
    /// Notice: a message for the source's operator, optional (added to v1 after its first release).
    pub const NOTICE: u8 = 0x52;
    /// Error: typed error, then close.
    pub const ERROR: u8 = 0x7E;
    /// Close: orderly end of the session.
    pub const CLOSE: u8 = 0x7F;
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
    /// A message for the source's operator, optional (0x52).
    Notice(Notice),
    /// Typed error; the sender closes (0x7E).
    Error(ErrorFrame),
    /// Orderly end of the session (0x7F).
    Close,
    /// Join a striped session (0x05).
    Join(Join),
    /// Joined (0x06).
    Joined(Joined),
    /// Stripe the session over several connections (0x14).
    OpenStreams(OpenStreams),
    /// The join ticket (0x15).
    StreamTicket(StreamTicket),
    /// Sequence number of the next frame on this connection (0x35).
    Seq(Seq),
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
            Frame::Notice(_) => "Notice",
            Frame::Error(_) => "Error",
            Frame::Close => "Close",
            Frame::Join(_) => "Join",
            Frame::Joined(_) => "Joined",
            Frame::OpenStreams(_) => "OpenStreams",
            Frame::StreamTicket(_) => "StreamTicket",
            Frame::Seq(_) => "Seq",
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
            Frame::Notice(_) => NOTICE,
            Frame::Error(_) => ERROR,
            Frame::Close => CLOSE,
            Frame::Join(_) => JOIN,
            Frame::Joined(_) => JOINED,
            Frame::OpenStreams(_) => OPEN_STREAMS,
            Frame::StreamTicket(_) => STREAM_TICKET,
            Frame::Seq(_) => SEQ,
            Frame::Unknown { frame_type } => *frame_type,
        }
    }

    /// Flags this frame is sent with: Progress, Keepalive, Intent and Notice are optional.
    pub fn flags(&self) -> u8 {
        match self {
            Frame::Progress(_) | Frame::Keepalive | Frame::Intent(_) | Frame::Notice(_) | Frame::Unknown { .. } => {
                FLAG_OPTIONAL
            }
            _ => 0,
        }
    }
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
        NOTICE => "Notice",
        ERROR => "Error",
        CLOSE => "Close",
        JOIN => "Join",
        JOINED => "Joined",
        OPEN_STREAMS => "OpenStreams",
        STREAM_TICKET => "StreamTicket",
        SEQ => "Seq",
        _ => "Unknown",
    }
}
