//! ferry-datastore: where replicas live at the target.
//!
//! A datastore is a directory of replicas. Per replica: the latest image of
//! each disk (flat, sparse, ready to boot or export; or behind an NBD export),
//! its digest map, a catalog of restore points, and for every older point an
//! undo file holding the old contents of the chunks the next point overwrote.
//! The formats, the order of writes and the crash-safety rules are in
//! `mover/datastore/DATASTORE.md`; this crate is their implementation.
//!
//! - [`store`]: the layout: [`Datastore`], [`Replica`] (locked for writing or
//!   open for reading), settings, catalog, session state, atomic file writes.
//! - [`image`]: a replica disk's latest image: a file or an NBD export.
//! - [`undo`]: undo files: the writer appends and syncs, the reader indexes.
//! - [`digests`]: storing and loading digest maps.
//! - [`points`]: export, rollback, retention and verify of restore points.
//! - [`export`]: sparse copies of images.
//! - [`fault`]: the power-loss tests' hidden knob that removes one fdatasync
//!   (`FERRY_TEST_SKIP_FSYNC=undo` or `image`), to show the tests catch its absence.
//!
//! # Invariants
//! - A chunk of the latest image is overwritten only once its old contents
//!   are durable in the undo file of the latest point (the writer of
//!   ferry-replicate keeps this order; [`undo::UndoWriter`] says what is durable).
//! - Metadata files are replaced atomically (temporary file, fsync, rename,
//!   fsync of the directory); the catalog write is a session's commit point.
//! - One writer per replica: [`Datastore::lock_replica`] takes an exclusive
//!   lock that a second session gets as [`StoreError::Busy`].
//! - A rollback writes its intent record (`rollback.json`) before it changes
//!   anything and takes only steps that can be taken again; until it is
//!   finished ([`points::finish_pending`]) nothing reads or deletes around it
//!   ([`StoreError::RollbackPending`]).
//! - Readers of old points (export, verify) hold the points lock shared,
//!   rollbacks and prunes exclusively ([`Replica::read_points`],
//!   [`Replica::change_points`]); sessions do not take it: an export reads a
//!   consistent point while one runs ([`points::export_point`]).
//! - Only the latest point's undo file may end in a torn tail; an older
//!   point's must hold what the catalog recorded ([`undo::Tail`]). The
//!   catalog carries its own checksum ([`store::decode_catalog`]).
//!
//! # Dependencies
//! ferry-io (syscalls, zero check), ferry-nbd (images behind exports) and
//! ferry-planner (digest maps). It knows nothing of sockets, sessions or the
//! wire protocol, and has no `unsafe`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod digests;
mod error;
pub mod export;
pub mod fault;
pub mod image;
pub mod points;
pub mod store;
pub mod undo;

pub use error::{Result, StoreError};
pub use store::{now_ns, validate_name, Datastore, Replica};
