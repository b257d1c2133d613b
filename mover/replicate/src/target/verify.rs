//! Verify workers: decompress and hash every received chunk; a chunk that fails is never
//! passed on to the writer.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use ferry_wire::{Codec, DataHead};

use super::writer::WriterMsg;
use crate::error::MoveError;
use crate::stats::{Stage, StageStats};
use ferry_io::{BufPool, PoolBuf};

/// Verify received chunks: a raw payload is hashed in the buffer it was received into,
/// which then goes on to the writer; a compressed one is decompressed into a second buffer.
pub(super) fn verify_worker(
    rx: Receiver<(u64, DataHead, PoolBuf)>,
    tx: Sender<WriterMsg>,
    pool: Arc<BufPool>,
) -> StageStats {
    let mut stats = StageStats::default();
    let mut dctx = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    for (seq, d, received) in rx {
        let t = Instant::now();
        let len = d.logical_len as usize;
        let disk_label = || format!("#{}", d.disk);
        let decompress_error =
            |detail: String| MoveError::Decompress { disk: disk_label(), chunk: d.chunk, expected: len, detail };
        let res = match d.codec {
            // The wire checked that a raw payload is exactly the logical length.
            Codec::None => Ok(received),
            Codec::Zstd if len > pool.buf_size() => Err(decompress_error("longer than the chunk size".into())),
            Codec::Zstd => {
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
            break;
        }
    }
    stats
}
