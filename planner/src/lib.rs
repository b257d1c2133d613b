//! ferry-planner: change maps, CBT parsers, digest maps and "what must move"
//! decisions. Pure logic: no file, network or clock access; functions take
//! bytes, strings and values, never paths.
//!
//! It depends on ferry-wire alone (the chunk geometry and the wire's modes) and
//! must not depend on any mover crate: they call it, it never calls them.
//!
//! # Units and invariants
//! - An [`Extent`] is a byte range `offset..offset + len`. A [`ChangeMap`] is
//!   a set of bytes held as extents sorted by offset, coalesced (no two
//!   overlap or touch) and non-empty; every operation keeps that form.
//! - A chunk is the unit of digests and transfer: a power of two between
//!   [`MIN_CHUNK_SIZE`] (64 KiB) and [`MAX_CHUNK_SIZE`] (4 MiB), fixed per
//!   replica. Chunk `i` covers `i * chunk_size .. min((i + 1) * chunk_size,
//!   disk_size)`: the last chunk may be partial. A [`ChunkSet`] is a set of
//!   chunk indices held as sorted, coalesced, non-empty ranges. The chunk
//!   size limits, [`validate_chunk_size`], [`chunk_count`], [`chunk_len`] and
//!   [`Digest`] are ferry-wire's (`ferry_wire::chunk`, with its `Geometry`),
//!   re-exported: one chunk geometry for all of ferry.
//! - A chunk digest is BLAKE3 of the chunk's bytes at its real length.
//!
//! # Change-map formats ([`cbt::parse_cbt`])
//! The format is recognised from the JSON content. Keys are matched ignoring
//! ASCII case (govc prints `StartOffset`/`ChangedArea`, pyVmomi
//! `startOffset`/`changedArea`); unknown keys (such as pyVmomi's `_vimtype`)
//! are ignored. All numbers are non-negative integers that fit in 64 bits.
//! - VMware QueryChangedDiskAreas, a DiskChangeInfo:
//!   `{"startOffset": N, "length": N, "changedArea": [{"start": N, "length": N}, ...]}`,
//!   or an array of them (paged queries), unioned. `startOffset..startOffset
//!   + length` is the range the query covered: ending beyond the disk is a
//!   [`PlanError::DiskSizeMismatch`]; every changed area must lie inside it.
//! - A generic extent list: `[{"offset": N, "length": N}, ...]`, in any order,
//!   or `{"disk_size": N, "extents": [...]}` whose disk_size, if present,
//!   must equal the disk's.
//! - `nbdinfo --map --json` output: `[{"offset": N, "length": N, "type": N,
//!   "description": S}, ...]`, contiguous from 0 to exactly the disk size.
//!   An extent is changed when `type & 1 != 0`: bit 0 is "dirty" in a
//!   `qemu:dirty-bitmap:NAME` context. (In `base:allocation` bit 0 means
//!   "hole": do not feed that context to the planner.)
//! - `[]` is an empty map in any format.
//!
//! Extents must lie within the disk and must not overlap each other within
//! one list (adjacent is fine). Zero-length extents are accepted and ignored
//! (they change no byte), after the same number and bounds checks as others.
//!
//! # Digest map encoding ([`DigestMap::encode`], version 1, little-endian)
//! ```text
//! offset  size      field
//!  0      8         magic "FERRYDM\0"
//!  8      2         version = 1
//! 10      2         reserved = 0
//! 12      4         chunk_size
//! 16      8         disk_size
//! 24      8         count = ceil(disk_size / chunk_size)
//! 32      32*count  digests, chunk order; 32 zero bytes = unknown
//! end-32  32        BLAKE3 of all bytes before it (= DigestMap::map_hash)
//! ```
//! A map whose length, checksum, version, chunk size or count is wrong is
//! rejected with a [`PlanError`]; the caller rebuilds it from the disk.
//!
//! This encoding is canonical (its trailer is the map hash the wire and the
//! source's map cache compare), not the in-memory form: a [`DigestMap`] holds
//! pages of [`PAGE_CHUNKS`] chunks and keeps no digest for a page that is all
//! zeros or all unknown, so its memory follows the data, not the disk. The
//! datastore stores maps in its own sparse format (ferry-datastore
//! `digests`, DATASTORE.md), built from [`DigestMap::page`].
//!
//! # Errors
//! Every [`PlanError`] names the caller's label for the input, and where it
//! applies the entry index, the JSON path and the values concerned.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backup;
pub mod cbt;
pub mod digest_map;
mod error;
mod extent;
pub mod plan;
pub mod time;

pub use cbt::{parse_cbt, parse_cbt_with_format, CbtFormat};
pub use digest_map::{
    chunk_count, chunk_len, validate_chunk_size, zero_chunk_digest, Digest, DigestMap, DigestMapEncoder, PageView,
    ZeroDigests, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, PAGE_CHUNKS, UNKNOWN_DIGEST,
};
pub use error::PlanError;
pub use extent::{ChangeMap, ChunkSet, Extent};
pub use plan::{
    check_samples, expected_changes, plan_disk, read_span, sample_unchanged, DiskInputs, DiskPlan, PlanMode, PlanNote,
    TargetDisk,
};
