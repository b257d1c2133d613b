//! ferry-wire: the framed replication protocol of ferry, version 1, sans-IO.
//!
//! This crate holds no sockets, no clock, no randomness, and no hashing or
//! compression code. It encodes and decodes [`Frame`]s and drives the
//! [`Session`] state machine of either end; the caller moves the bytes, draws
//! the nonces, computes digests and MACs (through [`Authenticator`]).
//! `wire/PROTOCOL.md` is the byte-level specification.
//!
//! It also holds ferry's one chunk geometry ([`chunk`]): the chunk size
//! limits, [`Geometry`] (which bytes of a disk each chunk covers) and
//! [`Digest`], shared with the planner and the mover.
//!
//! It depends on no other ferry crate (the planner and the mover crates
//! depend on it), and must stay that way: the protocol is the contract both
//! ends share.
//!
//! Invariants:
//! - The decoder never panics and never allocates more than
//!   [`MAX_BODY_LEN`] for a frame ([`MAX_HANDSHAKE_BODY_LEN`] in a session
//!   before the peer is authenticated): the header's length is checked first.
//! - Every field is bounds-checked; a body with bytes after its last field is
//!   an error ([`WireError::TrailingBytes`]).
//! - Data payloads are [`bytes::Bytes`] slices of the receive buffer, never copied;
//!   or, taken apart with [`Deframer::next_split`], read by the caller into a
//!   buffer of its own, with the same checks ([`Session::handle_data_head`]).
//! - Within a disk, data travels in strictly increasing chunk order, so one
//!   watermark per disk (Flush / Checkpoint / ResumeInfo) describes what is
//!   durable and where to resume.
//! - Optional frames (Progress, Keepalive, Intent, Notice) are always sent with
//!   [`FLAG_OPTIONAL`]: a peer that does not know one skips it, so no peer
//!   ever needs one understood. Intent only announces chunks (advisory);
//!   Notice only informs the source (a warning makes it finish with exit 3).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chunk;
mod error;
mod frame;
mod session;

pub use chunk::{
    chunk_count, chunk_len, default_chunk_size, validate_chunk_size, ChunkSizeError, Digest, Geometry, MAX_CHUNK_SIZE,
    MAX_DEFAULT_CHUNKS, MIN_CHUNK_SIZE,
};
pub use error::WireError;
pub use frame::*;
pub use session::{Authenticator, Event, LocalInfo, PeerInfo, Role, Session, State};
