//! The workers: per chunk, the zero check, the BLAKE3 digest, the comparison
//! with the target's digest and compression. A read span is split into its
//! chunks here; each is answered on its own ([`Outcome`]), with the span's
//! sequence numbers.
//!
//! With stream compression (the target negotiated `FEATURE_ZSTD_STREAM`),
//! worker `i` owns compression stream `i` (`zstream.rs`): its chunks keep the
//! history of the chunks it compressed before. The sender writes the chunks in
//! sequence order and a worker takes spans in sequence order, so a stream's
//! chunks reach the wire in the order they were compressed. A chunk that goes
//! through the stream is always sent as the stream made it (the target's
//! decoder needs it), unless it did not shrink at all: then it goes raw and
//! the stream restarts.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use ferry_io::{is_zero, BufPool};
use ferry_planner::{Digest, DigestMap, ZeroDigests};
use ferry_wire::{Codec, Data};

use super::compress::{AutoCompress, AUTO_LEVELS};
use super::read::{ReadSpan, Work};
use super::CompressPolicy;
use crate::error::MoveError;
use crate::stats::{Stage, StageStats};
use crate::zstream::StreamEncoder;

/// What a worker found of one chunk.
pub(super) enum Outcome {
    Data(Data),
    Zero {
        disk: u32,
        chunk: u64,
        len: u64,
    },
    Unchanged {
        disk: u32,
        chunk: u64,
        len: u64,
    },
    /// Planned chunks inside a hole, not read (the disk is `size` bytes).
    Holes {
        disk: u32,
        chunks: Range<u64>,
        size: u64,
    },
    DiskEnd {
        disk: u32,
    },
    Failed(MoveError),
}

/// A worker's answer for the chunk with sequence number `seq`.
pub(super) struct Done {
    pub(super) seq: u64,
    pub(super) outcome: Outcome,
    /// Compressed in / out bytes (0, 0 when not compressed).
    pub(super) compressed: (u64, u64),
    /// The zstd level of a data chunk's payload (0: raw).
    pub(super) level: i32,
}

// One pipeline stage: its channels, shared pools and the job's settings.
#[allow(clippy::too_many_arguments)]
pub(super) fn work_loop(
    rx: Receiver<Work>,
    tx: Sender<Done>,
    out_pool: &BufPool,
    digests: &[Option<&DigestMap>],
    names: &[String],
    policy: CompressPolicy,
    chunk_size: u32,
    auto: &AutoCompress,
    stream: Option<u32>,
) -> StageStats {
    let mut worker = Worker::new(out_pool, digests, names, policy, chunk_size, auto);
    worker.stream = stream.map(|id| StreamEncoder::new(id, worker.cur_level));
    for w in rx {
        let sent = match w {
            Work::DiskEnd { seq, disk } => {
                tx.send(Done { seq, outcome: Outcome::DiskEnd { disk }, compressed: (0, 0), level: 0 })
            }
            // The sender compares a hole run with the target's map, as a range.
            Work::Holes { seq, disk, chunks, size } => {
                tx.send(Done { seq, outcome: Outcome::Holes { disk, chunks, size }, compressed: (0, 0), level: 0 })
            }
            Work::Chunk(span) => worker.span(span, &tx),
        };
        if sent.is_err() {
            break;
        }
    }
    worker.stats
}

/// One worker's state: its zstd context and what `--compress` does next.
struct Worker<'a> {
    out_pool: &'a BufPool,
    /// Per disk, the target's digests (digest mode).
    digests: &'a [Option<&'a DigestMap>],
    names: &'a [String],
    policy: CompressPolicy,
    chunk_size: u32,
    auto: &'a AutoCompress,
    stats: StageStats,
    zeros: ZeroDigests,
    cctx: zstd::bulk::Compressor<'static>,
    /// This worker's compression stream, when the target takes them.
    stream: Option<StreamEncoder>,
    /// Level-1 context for the check before a stream at [`CHECK_FROM`] and above.
    check: Option<zstd::bulk::Compressor<'static>>,
    /// The level chunks are compressed at (`cctx` is set to it).
    cur_level: i32,
    /// Chunks seen while auto is off (1 in 16 is compressed anyway).
    probe: u64,
    /// Chunks not to try, and the current back-off, after incompressible ones.
    skip: u32,
    backoff: u32,
}

/// From this level on, a stream's chunks are checked at level 1 first (`Worker::compress`).
pub(super) const CHECK_FROM: i32 = 3;

type SendResult = std::result::Result<(), crossbeam_channel::SendError<Done>>;

impl<'a> Worker<'a> {
    fn new(
        out_pool: &'a BufPool,
        digests: &'a [Option<&'a DigestMap>],
        names: &'a [String],
        policy: CompressPolicy,
        chunk_size: u32,
        auto: &'a AutoCompress,
    ) -> Worker<'a> {
        let level = match policy {
            CompressPolicy::Zstd(l) => l,
            _ => 1,
        };
        let mut cctx = zstd::bulk::Compressor::new(level).expect("zstd context");
        let _ = cctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false));
        let _ = cctx.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false));
        Worker {
            out_pool,
            digests,
            names,
            policy,
            chunk_size,
            auto,
            stats: StageStats::default(),
            zeros: ZeroDigests::new(chunk_size),
            cctx,
            stream: None,
            check: None,
            cur_level: level,
            probe: 0,
            skip: 0,
            backoff: 0,
        }
    }

    /// The target's digest of `chunk` of `disk`, if the job has its map.
    fn target(&self, disk: u32, chunk: u64) -> Option<Digest> {
        self.digests[disk as usize].map(|m| m.get_raw(chunk))
    }

    /// A read span: a failure for the span, else one answer per chunk.
    // The error only hands back the answer the sender no longer takes; it is dropped at once.
    #[allow(clippy::result_large_err)]
    fn span(&mut self, read: ReadSpan, tx: &Sender<Done>) -> SendResult {
        let ReadSpan { seq, disk, chunk, count, offset, expected, mut buf, result } = read;
        let name = &self.names[disk as usize];
        let failed = match result {
            Err(e) => Some(MoveError::DiskIo { what: "reading", disk: name.clone(), offset, len: expected, source: e }),
            Ok(n) if n < expected => Some(MoveError::ShortRead { disk: name.clone(), offset, expected, got: n }),
            Ok(_) => None,
        };
        if let Some(e) = failed {
            // The sender stops at the first failed item: the span's later chunks never come.
            return tx.send(Done { seq, outcome: Outcome::Failed(e), compressed: (0, 0), level: 0 });
        }
        buf.set_len(expected);
        // One owner for the span: a raw payload is a slice of it, no copy.
        let span = Bytes::from_owner(buf);
        let cs = self.chunk_size as usize;
        for i in 0..count {
            let at = i as usize * cs;
            let (outcome, compressed, level) = self.chunk(disk, chunk + i, &span, at..(at + cs).min(expected));
            tx.send(Done { seq: seq + i, outcome, compressed, level })?;
        }
        Ok(())
    }

    /// Chunk `chunk` of `disk`, the bytes `range` of `span`: zero, unchanged or data;
    /// with the compressed in / out bytes and the level of its payload.
    fn chunk(&mut self, disk: u32, chunk: u64, span: &Bytes, range: Range<usize>) -> (Outcome, (u64, u64), i32) {
        let buf = &span[range.clone()];
        let len = range.len();
        let t = Instant::now();
        let target = self.target(disk, chunk);
        if is_zero(buf) {
            self.stats.record(Stage::Hash, t.elapsed());
            let outcome = if target.is_some_and(|d| d == self.zeros.digest(len as u32)) {
                Outcome::Unchanged { disk, chunk, len: len as u64 }
            } else {
                Outcome::Zero { disk, chunk, len: len as u64 }
            };
            return (outcome, (0, 0), 0);
        }
        let digest = *blake3::hash(buf).as_bytes();
        self.stats.record(Stage::Hash, t.elapsed());
        if target.is_some_and(|d| d == digest) {
            return (Outcome::Unchanged { disk, chunk, len: len as u64 }, (0, 0), 0);
        }
        let compressed = if self.try_compress() { self.compress(buf) } else { None };
        let (codec, payload, sizes, level) = match compressed {
            Some((codec, payload, n)) => (codec, payload, (len as u64, n), self.cur_level),
            None => (Codec::None, span.slice(range), (0, 0), 0),
        };
        (Outcome::Data(Data { disk, chunk, logical_len: len as u32, codec, digest, payload }), sizes, level)
    }

    /// Whether to try compressing the next data chunk (and at which level, for auto).
    fn try_compress(&mut self) -> bool {
        match self.policy {
            CompressPolicy::None => false,
            CompressPolicy::Zstd(_) => true,
            CompressPolicy::Auto => {
                let lvl = AUTO_LEVELS[self.auto.idx.load(Ordering::Relaxed)];
                // While off, 1 chunk in 16 is compressed anyway to keep measuring.
                self.probe += 1;
                let want = if lvl == 0 { self.probe % 16 == 0 } else { true };
                let lvl = lvl.max(1);
                if want && lvl != self.cur_level {
                    if self.stream.is_none() {
                        let _ = self.cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(lvl));
                    }
                    self.cur_level = lvl;
                }
                if !want {
                    false
                } else if self.skip > 0 {
                    self.skip -= 1;
                    false
                } else {
                    true
                }
            }
        }
    }

    /// `buf` compressed into a buffer of the compressed pool: its codec, the
    /// payload and its length; None when the pool is empty or it did not
    /// shrink (by 1/8 for a chunk compressed alone, at all for a stream).
    fn compress(&mut self, buf: &[u8]) -> Option<(Codec, Bytes, u64)> {
        let mut out = self.out_pool.try_get()?;
        let expected = buf.len();
        let t = Instant::now();
        let eighth = expected - expected / 8;
        // At the levels of a slow link, a chunk that level 1 cannot shrink at all is
        // sent raw without entering the stream: the stream keeps its history (a chunk
        // that does not fit restarts it) and the slow level does not grind through noise.
        let noise = self.stream.is_some() && self.cur_level >= CHECK_FROM && {
            let check = self.check.get_or_insert_with(|| {
                let mut c = zstd::bulk::Compressor::new(1).expect("zstd context");
                let _ = c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false));
                let _ = c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false));
                c
            });
            check.compress_to_buffer(buf, &mut out.spare_mut()[..expected - expected / 64]).is_err()
        };
        let (codec, r) = match &mut self.stream {
            _ if noise => (Codec::ZstdStream, None),
            Some(s) => (Codec::ZstdStream, s.compress(self.cur_level, buf, &mut out.spare_mut()[..expected - 1])),
            None => (Codec::Zstd, self.cctx.compress_to_buffer(buf, &mut out.spare_mut()[..eighth]).ok()),
        };
        let took = t.elapsed();
        let auto = self.auto;
        auto.comp_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        auto.comp_in.fetch_add(expected as u64, Ordering::Relaxed);
        auto.comp_out.fetch_add(r.map_or(expected as u64, |n| n as u64), Ordering::Relaxed);
        self.stats.record(Stage::Compress, took);
        if r.is_some_and(|n| n < eighth) {
            self.backoff = 0;
        } else {
            // Did not shrink by 1/8: back off exponentially on incompressible runs,
            // less far at the levels auto picks for slow links (the CPU has time).
            // With the check (a stream at CHECK_FROM and above), noise costs a level-1
            // pass: every chunk is looked at, none is sent raw unseen.
            let most = if self.cur_level <= 1 { 64 } else { 4 };
            self.backoff = (self.backoff * 2).clamp(1, most);
            let checked = self.stream.is_some() && self.cur_level >= CHECK_FROM;
            self.skip = if self.policy == CompressPolicy::Auto && !checked { self.backoff } else { 0 };
        }
        // A stream's output goes out whenever it fits: the target's decoder needs it.
        let n = r?;
        out.set_len(n);
        Some((codec, Bytes::from_owner(out), n as u64))
    }
}
