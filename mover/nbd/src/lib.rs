//! ferry's NBD client: reads and writes disks exported over the Network Block
//! Device protocol (qemu-nbd, nbdkit, qemu's built-in server), and reads
//! their allocation and dirty-bitmap metadata for change detection.
//!
//! Used by the source side (ferry-replicate's `SourceDisk`) and by the target
//! for replica disks behind an export (`DATASTORE/REPLICA/disks/DISK.nbd`, see
//! ferry-datastore's `image`). The source side: `--source NAME=nbd+unix:///EXPORT?socket=PATH` or
//! `NAME=nbd://HOST:PORT/EXPORT` opens a disk over one connection; the reader
//! reads it through [`NbdBackend`] (one READ per chunk, many in flight, replies
//! straight into pool buffers via [`NbdClient::submit_read_buf`]);
//! `base:allocation` ([`BASE_ALLOCATION`]) lets it skip unallocated zero
//! chunks, and `--cbt NAME=qemu-bitmap:BITMAP` takes the change map from
//! `qemu:dirty-bitmap:BITMAP`. See docs/NBD.md.
//!
//! Three layers:
//! - [`proto`]: the wire format, sans-IO (encoders, and decoders that return
//!   `Ok(None)` for "need more bytes" and check every length before
//!   allocating).
//! - [`client`]: [`NbdClient`], a blocking client over TCP or Unix sockets.
//! - [`backend`]: [`NbdBackend`], ferry-io's `IoBackend` over one client, for
//!   the pipelines of both sides.
//!
//! This crate depends on ferry-io only (buffers and the backend trait); it
//! knows nothing of replicas or of ferry's own protocol, and has no `unsafe`.
//!
//! Supported:
//! - URIs `nbd://HOST[:PORT]/EXPORT` (port 10809 by default) and
//!   `nbd+unix:///EXPORT?socket=PATH`; the export name may be empty.
//! - Fixed newstyle negotiation with NO_ZEROES; NBD_OPT_STRUCTURED_REPLY;
//!   NBD_OPT_SET_META_CONTEXT (`base:allocation`, `qemu:dirty-bitmap:NAME`,
//!   `qemu:allocation-depth`, any other name); NBD_OPT_GO with
//!   NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE, falling back to
//!   NBD_OPT_EXPORT_NAME on servers without NBD_OPT_GO; NBD_OPT_ABORT on a
//!   failed negotiation.
//! - Commands READ, WRITE, WRITE_ZEROES (NO_HOLE never set, so the server may
//!   punch holes), TRIM, FLUSH, BLOCK_STATUS, DISC. Simple replies, and
//!   structured replies (OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, ERROR,
//!   ERROR_OFFSET, NONE) reassembled in any order, interleaved across
//!   requests.
//! - Many requests in flight on one connection: [`NbdClient::submit_read`] /
//!   [`NbdClient::wait_read`] (buffers move in and come back; any
//!   `AsMut<[u8]>` buffer with [`NbdClient::submit_read_buf`] /
//!   [`NbdClient::wait_read_buf`]), and
//!   [`NbdClient::read_many`]; writes with [`NbdClient::submit_write`] /
//!   [`NbdClient::wait_detached`] (the payload is sent before the submit
//!   returns, so the caller keeps its buffer); `read_at`/`write_at` pipeline
//!   their own parts.
//!   Read data goes from the socket straight into the destination buffer
//!   (only bytes that arrived together with a reply header, at most 16 KiB,
//!   pass through the receive buffer).
//!
//! Limits and timeouts:
//! - Every socket operation (connect, each read and write) times out after
//!   [`NbdOptions::timeout`] (30 s by default) with [`NbdError::Timeout`].
//!   After a timeout, a protocol violation or an IO error the connection is
//!   unusable and every later call returns [`NbdError::Broken`].
//! - READ/WRITE payloads are split at min(server maximum block size,
//!   [`NbdOptions::max_request_len`]); offsets and lengths must be multiples
//!   of the server's minimum block size (the client does no read-modify-write).
//! - Option replies are at most 64 KiB, error chunks 4 KiB of message, a
//!   block status chunk at most 2^20 descriptors, an OFFSET_DATA chunk at
//!   most the request's length + 8: anything longer is rejected before
//!   allocating.
//!
//! Tests: `mover/nbd/tests/nbd.rs` runs against real qemu-nbd (skipped with a
//! note if it is missing) and fake servers for faults; the decoders have
//! proptest properties and a cargo-fuzz target (`cd mover/nbd && cargo +nightly
//! fuzz run nbd_decoders`) whose corpus a stable test replays. Throughput:
//! `NBD_BENCH_URI=... cargo test --release -p ferry-nbd --test nbd
//! bench_read_throughput -- --ignored --nocapture`.
//!
//! Left out: TLS (`nbds://`, NBD_OPT_STARTTLS), NBD_OPT_LIST and
//! NBD_OPT_LIST_META_CONTEXT, extended headers (64-bit lengths), NBD_CMD_CACHE,
//! FUA and FAST_ZERO flags, NBD_CMD_FLAG_DF, oldstyle negotiation, multiple
//! connections.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod client;
pub mod proto;

use std::io;
use std::time::Duration;

pub use backend::NbdBackend;
pub use client::{Completion, Extent, NbdClient, NbdOptions, ReadCompletion};
pub use proto::BlockSizes;

/// The metadata context of allocation (holes and zeros).
pub const BASE_ALLOCATION: &str = "base:allocation";

/// True when a disk spec is an NBD URI rather than a path.
pub fn is_nbd_uri(s: &str) -> bool {
    ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+tcp://", "nbds+tcp://"].iter().any(|p| s.starts_with(p))
}

/// Timeout of each NBD socket operation for ferry's connections:
/// `FERRY_NBD_TIMEOUT` seconds, 30 by default.
pub fn default_timeout() -> Duration {
    let secs = std::env::var("FERRY_NBD_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0);
    Duration::from_secs_f64(secs.unwrap_or(30.0))
}

/// Errors of the NBD client. Each says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The URI could not be parsed.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting failed.
    #[error("cannot connect to {target}")]
    Connect {
        /// Address or socket path.
        target: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A socket operation failed.
    #[error("{op}: socket error")]
    Io {
        /// What was being done.
        op: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The server did not answer in time.
    #[error("{op}: timed out after {after:?} without progress from the server")]
    Timeout {
        /// What was being done.
        op: String,
        /// The configured timeout.
        after: Duration,
    },
    /// The server closed the connection.
    #[error("{op}: the server closed the connection")]
    Closed {
        /// What was being done.
        op: String,
    },
    /// A magic number was wrong (not an NBD server, or a desynchronised stream).
    #[error("bad magic in {what}: expected {expected:#x}, got {got:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// The magic expected.
        expected: u64,
        /// The bytes received.
        got: u64,
    },
    /// A malformed negotiation message.
    #[error("NBD handshake: {0}")]
    BadHandshake(String),
    /// A malformed reply to a transmission request.
    #[error("{op} offset {offset} length {length}: invalid reply: {detail}")]
    BadReply {
        /// The command.
        op: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// What is wrong.
        detail: String,
    },
    /// A length field above the client's limit.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Which message.
        what: &'static str,
        /// The length received.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A reply for a handle that is not in flight.
    #[error("reply for unknown handle {0:#x}")]
    UnknownHandle(u64),
    /// The server rejected an option.
    #[error("the server rejected {option}: {code_name}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    OptionRejected {
        /// The option.
        option: &'static str,
        /// The NBD_REP_ERR_* code.
        code: u32,
        /// Its name.
        code_name: &'static str,
        /// The server's message.
        message: String,
    },
    /// A requested metadata context was not granted by the server.
    #[error("the server does not provide metadata context {0:?}")]
    MetaContextUnavailable(String),
    /// The server failed a command.
    #[error("{op} offset {offset} length {length} failed: {code_name} ({code}){}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Command {
        /// The command.
        op: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// The NBD error value.
        code: u32,
        /// Its name (EIO, EINVAL, ...).
        code_name: &'static str,
        /// The server's message (structured replies only).
        message: String,
    },
    /// The server or this client lacks a feature.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The caller passed something invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The connection failed earlier and cannot be used.
    #[error("NBD connection unusable after an earlier error: {0}")]
    Broken(String),
}

impl NbdError {
    /// How a job that met this error should be treated: a URI, export, bitmap
    /// or feature that is not there will not appear on a retry; a connection
    /// that failed, timed out or broke, or a command the server failed, may
    /// go better on the next run.
    pub fn class(&self) -> ferry_io::ErrorClass {
        use ferry_io::ErrorClass::*;
        match self {
            NbdError::InvalidUri { .. }
            | NbdError::OptionRejected { .. }
            | NbdError::MetaContextUnavailable(_)
            | NbdError::Unsupported(_) => Usage,
            _ => Failed,
        }
    }

    /// Whether this is a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, NbdError::Timeout { .. })
    }
}
