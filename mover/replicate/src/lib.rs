//! ferry-replicate: replication sessions, both ends.
//!
//! - [`source`]: the source pipeline (reader, workers, sender) that reads
//!   disks, finds what changed and sends it.
//! - [`target`]: the target session (session thread, verify workers, writer,
//!   one sending thread per connection) that
//!   verifies every chunk and writes it into a datastore; [`target::serve`] is
//!   `ferry serve`'s accept loop within [`target::Limits`] (connections,
//!   sessions, handshake deadline, idle timeout, disk size: target/listen.rs).
//! - [`conn`]: sockets, the wire session, handshake; [`auth`]: tokens;
//!   [`access`]: scoped tokens (the access file), roles, revocation.
//!   [`tls`]: the server's identity, the source's pins, the TLS handshake.
//! - [`disk`]: source disks (files, block devices, NBD exports).
//! - [`map_cache`]: the source's cache of target digest maps.
//! - [`stats`]: per-disk counters and per-stage latency histograms.
//! - [`zstream`]: stream compression (zstd history across chunks, flushed per chunk).
//! - [`throttle`]: `--bwlimit` schedules and the shared token bucket they are charged to.
//!
//! A chunk travels reader -> worker -> socket with one copy at most (the
//! kernel's), and socket -> verify worker -> writer straight into a pool
//! buffer. Memory is bounded by fixed buffer pools on both sides whatever the
//! disk size.
//!
//! # Dependencies
//! ferry-wire (the protocol), ferry-planner (what must move), ferry-io
//! (buffers, IO backends, syscalls), ferry-nbd (NBD disks) and
//! ferry-datastore (the target's replicas). It must not depend on
//! ferry-backup, the CLI or the bench (they sit above it), and it has no
//! `unsafe`: raw system calls are ferry-io's.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod auth;
pub mod busy;
pub mod conn;
pub mod connect;
pub mod disk;
pub mod error;
pub mod map_cache;
pub mod records;
pub mod source;
pub mod stats;
pub mod target;
pub mod throttle;
pub mod tls;
pub mod zstream;

pub use connect::{Target, TargetSpec};
pub use error::{MoveError, Result};
