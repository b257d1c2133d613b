//! Data frames (types `0x30..`): chunks, zero runs, watermarks and intents.

use bytes::Bytes;

use super::{frame_type, type_name, DIGEST_LEN, MAX_INTENT_RUNS};
use crate::chunk::Digest;
use crate::error::WireError;

/// How a data frame's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// Payload is the logical bytes.
    None = 0,
    /// Payload is one zstd frame that decodes to the logical bytes.
    Zstd = 1,
    /// Payload is a [`StreamHeader`] and then the bytes one zstd stream produced
    /// for this chunk, flushed at its end: they decode to the logical bytes only
    /// after every earlier chunk of the same stream (see `PROTOCOL.md`, "Stream
    /// compression"). Needs [`FEATURE_ZSTD_STREAM`](super::FEATURE_ZSTD_STREAM).
    ZstdStream = 2,
}

/// Length of a [`StreamHeader`]: the first bytes of a [`Codec::ZstdStream`] payload.
///
/// DO NOT MODIFY: protocol v1 (feature `FEATURE_ZSTD_STREAM`).
pub const STREAM_HEADER_LEN: usize = 4 + 8;

/// Where a [`Codec::ZstdStream`] chunk sits in its compression stream: the
/// first [`STREAM_HEADER_LEN`] bytes of its payload, `stream` (`u32` LE) then
/// `seq` (`u64` LE).
///
/// A sender numbers the chunks of each stream 0, 1, 2, ...; `seq` 0 starts a
/// fresh zstd stream (the decoder drops its history). A receiver decodes a
/// stream's chunks in `seq` order and refuses a gap or a reordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    /// The compression stream (one per source worker).
    pub stream: u32,
    /// The chunk's number in its stream; 0 restarts the stream.
    pub seq: u64,
}

impl StreamHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; STREAM_HEADER_LEN] {
        let mut b = [0u8; STREAM_HEADER_LEN];
        b[..4].copy_from_slice(&self.stream.to_le_bytes());
        b[4..].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// The header at the start of a payload, and the zstd bytes after it; None
    /// when the payload is not longer than a header.
    pub fn split(payload: &[u8]) -> Option<(StreamHeader, &[u8])> {
        if payload.len() <= STREAM_HEADER_LEN {
            return None;
        }
        let (h, rest) = payload.split_at(STREAM_HEADER_LEN);
        let stream = u32::from_le_bytes(h[..4].try_into().ok()?);
        let seq = u64::from_le_bytes(h[4..].try_into().ok()?);
        Some((StreamHeader { stream, seq }, rest))
    }
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
/// [`Deframer::next_split`](super::Deframer::next_split) before the payload.
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
    /// most [`MAX_CHUNK_SIZE`](crate::MAX_CHUNK_SIZE), equal to `logical_len` when the codec is none).
    pub payload_len: u32,
}

impl DataHead {
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
pub(super) const INTENT_FIXED_LEN: usize = 4 + 4;
/// Length of one run in an Intent frame.
pub(super) const INTENT_RUN_LEN: usize = 8 + 4;

impl Intent {
    /// The checks the decoder makes, for the encoder side too (so we never
    /// send what a peer must refuse).
    pub(crate) fn validate(&self) -> Result<(), WireError> {
        check_intent_run_count(self.runs.len())?;
        check_intent_runs(&self.runs)
    }
}

/// The run count of an Intent: 1 ..= [`MAX_INTENT_RUNS`], checked before the runs are read.
pub(super) fn check_intent_run_count(count: usize) -> Result<(), WireError> {
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
pub(super) fn check_intent_runs(runs: &[ChunkRun]) -> Result<(), WireError> {
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
