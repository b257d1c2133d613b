//! Verify workers: decompress and hash every received chunk; a chunk that fails is never
//! passed on to the writer.
//!
//! Stream-compressed chunks (codec zstd-stream, see `zstream.rs`) need their
//! stream's earlier chunks decoded first. The session thread admits each one
//! in the order it arrived ([`Streams::admit`]: the stream id in range, its seq
//! 0 or the previous one plus 1, else an integrity error) and gives it a turn;
//! whichever worker takes it waits until the stream's earlier turns are done,
//! then decodes it with the stream's one decoder. The workers take chunks in
//! admission order, so the oldest admitted chunk is never waiting: no worker
//! waits forever (and a worker that stops breaks every stream, waking the others).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use ferry_wire::{Codec, DataHead, StreamHeader};

use super::writer::WriterMsg;
use crate::error::MoveError;
use crate::stats::{Stage, StageStats};
use crate::zstream::{StreamDecoder, MAX_STREAMS};
use ferry_io::{BufPool, PoolBuf};

/// What the session gives a verify worker: item number, the frame's head, its
/// payload, and for a stream-compressed chunk its turn in its stream.
pub(super) type Item = (u64, DataHead, PoolBuf, Option<Turn>);

/// A stream-compressed chunk's place: its stream and its turn there.
#[derive(Debug, Clone, Copy)]
pub(super) struct Turn {
    stream: u32,
    turn: u64,
}

/// The compression streams of a session: the order check at admission, and
/// each stream's decoder, taken in turn by the verify workers.
#[derive(Debug)]
pub(super) struct Streams {
    slots: Vec<Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    state: Mutex<SlotState>,
    turned: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    /// The seq the next admitted chunk must have (besides 0); None before the first.
    admit_next: Option<u64>,
    /// Turns given, and turns done.
    given: u64,
    done: u64,
    /// An earlier chunk failed, or the workers stopped: nothing more is decoded.
    broken: bool,
    decoder: Option<StreamDecoder>,
}

impl Default for Streams {
    fn default() -> Self {
        Streams { slots: (0..MAX_STREAMS).map(|_| Slot::default()).collect() }
    }
}

impl Streams {
    /// Admit a data frame, in arrival order: its turn if stream-compressed,
    /// an integrity error when its stream id or seq is out of order.
    pub(super) fn admit(&self, head: &DataHead, payload: &[u8]) -> Result<Option<Turn>, MoveError> {
        if head.codec != Codec::ZstdStream {
            return Ok(None);
        }
        let bad = |detail: String| MoveError::Decompress {
            disk: format!("#{}", head.disk),
            chunk: head.chunk,
            expected: head.logical_len as usize,
            detail,
        };
        // The wire checked that the payload is longer than a header.
        let (h, _) = StreamHeader::split(payload).ok_or_else(|| bad("no stream header".into()))?;
        let slot = self
            .slots
            .get(h.stream as usize)
            .ok_or_else(|| bad(format!("compression stream {} (at most {MAX_STREAMS})", h.stream)))?;
        let mut s = slot.state.lock().unwrap_or_else(|p| p.into_inner());
        if h.seq != 0 && s.admit_next != Some(h.seq) {
            let due = s.admit_next.map_or("0 (a stream's first chunk)".to_string(), |n| n.to_string());
            return Err(bad(format!(
                "compression stream {} out of order: chunk seq {} where {due} was due",
                h.stream, h.seq
            )));
        }
        s.admit_next = Some(h.seq + 1);
        let turn = s.given;
        s.given += 1;
        Ok(Some(Turn { stream: h.stream, turn }))
    }

    /// Decode a stream-compressed chunk into `out` once its turn comes.
    fn decode(&self, t: Turn, payload: &[u8], out: &mut [u8]) -> Result<(), String> {
        let slot = &self.slots[t.stream as usize];
        let mut s = slot.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.done != t.turn && !s.broken {
            s = slot.turned.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        let r = if s.broken {
            Err(format!("compression stream {} broken by an earlier chunk", t.stream))
        } else {
            let (h, z) = StreamHeader::split(payload).ok_or("no stream header")?;
            s.decoder.get_or_insert_with(StreamDecoder::new).decode(h.seq, z, out)
        };
        s.done += 1;
        s.broken |= r.is_err();
        slot.turned.notify_all();
        r
    }

    /// The workers stopped: wake every waiter, decode nothing more.
    fn break_all(&self) {
        for slot in &self.slots {
            slot.state.lock().unwrap_or_else(|p| p.into_inner()).broken = true;
            slot.turned.notify_all();
        }
    }
}

/// Verify received chunks: a raw payload is hashed in the buffer it was received into,
/// which then goes on to the writer; a compressed one is decompressed into a second buffer.
pub(super) fn verify_worker(
    rx: Receiver<Item>,
    tx: Sender<WriterMsg>,
    pool: Arc<BufPool>,
    streams: Arc<Streams>,
) -> StageStats {
    let mut stats = StageStats::default();
    let mut dctx = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    for (seq, d, received, turn) in rx {
        let t = Instant::now();
        let len = d.logical_len as usize;
        let disk_label = || format!("#{}", d.disk);
        let decompress_error =
            |detail: String| MoveError::Decompress { disk: disk_label(), chunk: d.chunk, expected: len, detail };
        let res = match (d.codec, turn) {
            // The wire checked that a raw payload is exactly the logical length.
            (Codec::None, _) => Ok(received),
            (_, _) if len > pool.buf_size() => Err(decompress_error("longer than the chunk size".into())),
            (Codec::Zstd, _) => {
                let mut buf = pool.get();
                match dctx.decompress_to_buffer(&received, &mut buf.spare_mut()[..len]) {
                    Ok(n) if n == len => {
                        buf.set_len(len);
                        Ok(buf)
                    }
                    Ok(n) => Err(decompress_error(format!("got {n} bytes"))),
                    Err(e) => Err(decompress_error(e.to_string())),
                }
            }
            (Codec::ZstdStream, Some(turn)) => {
                let mut buf = pool.get();
                match streams.decode(turn, &received, &mut buf.spare_mut()[..len]) {
                    Ok(()) => {
                        buf.set_len(len);
                        Ok(buf)
                    }
                    Err(e) => Err(decompress_error(e)),
                }
            }
            (Codec::ZstdStream, None) => Err(decompress_error("stream chunk not admitted".into())),
        };
        let msg = match res {
            Err(e) => WriterMsg::Failed(e),
            Ok(buf) if *blake3::hash(&buf).as_bytes() != d.digest => {
                WriterMsg::Failed(MoveError::DigestMismatch { disk: disk_label(), chunk: d.chunk })
            }
            Ok(buf) => WriterMsg::Chunk { seq, disk: d.disk, chunk: d.chunk, buf, digest: d.digest },
        };
        stats.record(Stage::Verify, t.elapsed());
        if tx.send(msg).is_err() {
            streams.break_all();
            break;
        }
    }
    stats
}
