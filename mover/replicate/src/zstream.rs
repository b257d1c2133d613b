//! Stream compression (codec zstd-stream, wire feature `FEATURE_ZSTD_STREAM`):
//! zstd streams that keep their history across chunks and flush at each
//! chunk's end, so a chunk compresses against the megabytes before it (the
//! ratio of `zstd | nc`) while every chunk stays its own Data frame, verified
//! by its BLAKE3 digest before it is written, and resumable at any chunk.
//!
//! - One stream per source worker ([`StreamEncoder`]): a worker's chunks go
//!   into its stream in the order it compresses them, which is the order the
//!   sender puts them on the wire (a worker takes its spans in sequence
//!   order, and the sender writes in sequence order). Each chunk's payload is
//!   a [`StreamHeader`] (stream id, seq) then the bytes the stream produced
//!   for it, flushed (`ZSTD_e_flush`): the decoder needs nothing after it.
//! - seq 0 starts a fresh zstd stream. The encoder restarts when its level
//!   changes (a single-threaded zstd context applies a new level only to a
//!   new frame) and when a chunk's output does not fit under the chunk's own
//!   length (the chunk goes raw; its bytes were fed to the stream, so the
//!   history must be dropped at both ends). A new or resumed session starts
//!   with fresh encoders and decoders: nothing of a stream outlives its
//!   connection's session.
//! - At the target ([`StreamDecoder`], driven by `target/verify.rs`), each
//!   stream has one decoder; its chunks are decoded in seq order. A gap, a
//!   reordering, a stream id at or above [`MAX_STREAMS`] or a decoder error is
//!   an integrity error (`MoveError::Decompress`, exit 1), never a panic; a
//!   decoded chunk still goes through the BLAKE3 check.
//! - Memory per stream is bounded by the window: [`WINDOW_LOG`] (4 MiB of
//!   history) at the encoder, and the decoder refuses a frame asking for more
//!   (`ZSTD_d_windowLogMax`). A target holds at most [`MAX_STREAMS`] decoders
//!   per session (each about 4 MiB plus zstd's block buffers).
//!
//! Why streams rather than a shared dictionary or frames of several chunks:
//! measured with `zstd -b1 -e9` on the bench's 256 MiB synthetic and ext4
//! images, independent 64 KiB blocks gave 101.1 MB / 83.4 MB at level 1 where
//! one stream gave 91.7 MB / 69.9 MB (level 3: 100.3 / 82.2 against 87.7 /
//! 60.2): the gain comes from matches megabytes away, which a dictionary
//! trained in advance cannot hold and which frames of several chunks would
//! buy only by giving up decoding (so verifying and resuming) chunk by chunk.

use ferry_wire::{StreamHeader, STREAM_HEADER_LEN};
use zstd::zstd_safe::{self, CParameter, DParameter, InBuffer, OutBuffer, ResetDirective};

/// zstd window of a stream: 2^22 bytes (4 MiB) of history.
///
/// DO NOT raise without raising what targets accept: a target's decoders refuse
/// frames with a larger window.
pub const WINDOW_LOG: u32 = 22;

/// Compression streams a target decodes per session, at most (stream ids 0..64).
pub const MAX_STREAMS: u32 = 64;

/// One worker's compression stream.
pub struct StreamEncoder {
    cctx: zstd_safe::CCtx<'static>,
    stream: u32,
    next: u64,
    level: i32,
}

impl std::fmt::Debug for StreamEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEncoder").field("stream", &self.stream).field("next", &self.next).finish()
    }
}

impl StreamEncoder {
    /// A fresh stream `stream` (below [`MAX_STREAMS`]) at zstd level `level`.
    pub fn new(stream: u32, level: i32) -> StreamEncoder {
        assert!(stream < MAX_STREAMS, "stream id {stream} out of range");
        let mut e = StreamEncoder { cctx: zstd_safe::CCtx::create(), stream, next: 0, level };
        e.restart();
        e
    }

    /// The level chunks are compressed at.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Drop the history: the next chunk is seq 0 of a fresh zstd stream.
    fn restart(&mut self) {
        let _ = self.cctx.reset(ResetDirective::SessionAndParameters);
        let _ = self.cctx.set_parameter(CParameter::CompressionLevel(self.level));
        let _ = self.cctx.set_parameter(CParameter::WindowLog(WINDOW_LOG));
        let _ = self.cctx.set_parameter(CParameter::ChecksumFlag(false));
        let _ = self.cctx.set_parameter(CParameter::ContentSizeFlag(false));
        self.next = 0;
    }

    /// Compress `chunk` at `level` into `out` (header, then zstd bytes); the
    /// payload's length when it fits in `out`. None when it does not: the
    /// chunk must go raw, and the stream restarts (its history held the chunk).
    pub fn compress(&mut self, level: i32, chunk: &[u8], out: &mut [u8]) -> Option<usize> {
        if level != self.level {
            self.level = level;
            self.restart();
        }
        if out.len() <= STREAM_HEADER_LEN {
            self.restart();
            return None;
        }
        let (head, body) = out.split_at_mut(STREAM_HEADER_LEN);
        head.copy_from_slice(&StreamHeader { stream: self.stream, seq: self.next }.encode());
        let mut input = InBuffer::around(chunk);
        let mut output = OutBuffer::around(body);
        let fitted = loop {
            match self.cctx.compress_stream2(
                &mut output,
                &mut input,
                zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush,
            ) {
                Ok(0) => break true,
                // More to flush: room left means zstd wants another call.
                Ok(_) if output.pos() < output.capacity() => continue,
                _ => break false,
            }
        };
        if !fitted {
            self.restart();
            return None;
        }
        self.next += 1;
        Some(STREAM_HEADER_LEN + output.pos())
    }
}

/// One stream's decoder at the target.
pub struct StreamDecoder {
    dctx: zstd_safe::DCtx<'static>,
    /// The seq the next chunk must have (besides 0); None before the first
    /// chunk and after an error (then only a restart, seq 0, is taken... by no one:
    /// the session fails at the first error).
    next: Option<u64>,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder").field("next", &self.next).finish()
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        StreamDecoder::new()
    }
}

impl StreamDecoder {
    /// A decoder that takes windows up to [`WINDOW_LOG`].
    pub fn new() -> StreamDecoder {
        let mut dctx = zstd_safe::DCtx::create();
        let _ = dctx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG));
        StreamDecoder { dctx, next: None }
    }

    /// Decode the chunk numbered `seq` in its stream, `zstd` its bytes after
    /// the header, into exactly `out.len()` bytes. An error names what was
    /// wrong (out of order, the decoder's error, the length); the decoder is
    /// then broken for good.
    pub fn decode(&mut self, seq: u64, zstd: &[u8], out: &mut [u8]) -> Result<(), String> {
        if seq == 0 {
            let _ = self.dctx.reset(ResetDirective::SessionOnly);
        } else if self.next != Some(seq) {
            let expected = self.next.map_or("0 (a stream's first chunk)".to_string(), |n| n.to_string());
            self.next = None;
            return Err(format!("compression stream out of order: chunk seq {seq} where {expected} was due"));
        }
        self.next = None;
        let want = out.len();
        let mut input = InBuffer::around(zstd);
        let mut output = OutBuffer::around(out);
        loop {
            let before = (input.pos(), output.pos());
            if let Err(code) = self.dctx.decompress_stream(&mut output, &mut input) {
                return Err(format!("zstd stream: {}", zstd_safe::get_error_name(code)));
            }
            let done = input.pos() == zstd.len() && output.pos() == want;
            if done || (input.pos(), output.pos()) == before {
                break;
            }
        }
        if output.pos() != want {
            return Err(format!("got {} bytes", output.pos()));
        }
        if input.pos() != zstd.len() {
            return Err(format!("{} bytes left after the chunk", zstd.len() - input.pos()));
        }
        // The decoder takes input into its own buffer: output beyond the chunk
        // would only show on the next call. Ask for one more byte.
        let mut probe = [0u8; 1];
        let mut more = OutBuffer::around(&mut probe[..]);
        let mut none = InBuffer::around(&[]);
        if self.dctx.decompress_stream(&mut more, &mut none).is_err() || more.pos() != 0 {
            return Err("bytes left after the chunk".into());
        }
        self.next = Some(seq + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: usize = 64 * 1024;

    /// Compressible chunks that repeat each other from afar (what streams win on).
    fn chunks(n: usize) -> Vec<Vec<u8>> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let words: Vec<Vec<u8>> =
            (0..256).map(|_| (0..(rnd() % 9 + 2)).map(|_| b'a' + (rnd() % 26) as u8).collect()).collect();
        (0..n)
            .map(|_| {
                let mut c = Vec::with_capacity(CS);
                while c.len() < CS {
                    c.extend_from_slice(&words[(rnd() % 256) as usize]);
                    c.push(b' ');
                }
                c.truncate(CS);
                c
            })
            .collect()
    }

    fn encode_all(enc: &mut StreamEncoder, level: i32, chunks: &[Vec<u8>]) -> Vec<Vec<u8>> {
        chunks
            .iter()
            .map(|c| {
                let mut out = vec![0u8; c.len() - 1];
                let n = enc.compress(level, c, &mut out).expect("compressible chunk fits");
                out.truncate(n);
                out
            })
            .collect()
    }

    /// The decoded chunk (printed as its length and digest on a failed assert).
    fn decode(dec: &mut StreamDecoder, payload: &[u8], len: usize) -> Result<Chunk, String> {
        let (h, z) = StreamHeader::split(payload).ok_or("short payload")?;
        let mut out = vec![0u8; len];
        dec.decode(h.seq, z, &mut out)?;
        Ok(Chunk(out))
    }

    #[derive(PartialEq)]
    struct Chunk(Vec<u8>);
    impl std::fmt::Debug for Chunk {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} bytes, blake3 {}", self.0.len(), blake3::hash(&self.0))
        }
    }
    impl PartialEq<Vec<u8>> for Chunk {
        fn eq(&self, o: &Vec<u8>) -> bool {
            &self.0 == o
        }
    }

    #[test]
    fn round_trip_across_many_chunks_beats_chunks_alone() {
        let data = chunks(64);
        let mut enc = StreamEncoder::new(3, 3);
        let payloads = encode_all(&mut enc, 3, &data);
        let mut dec = StreamDecoder::new();
        for (i, (p, c)) in payloads.iter().zip(&data).enumerate() {
            let (h, _) = StreamHeader::split(p).unwrap();
            assert_eq!(h, StreamHeader { stream: 3, seq: i as u64 });
            assert!(decode(&mut dec, p, CS).unwrap() == *c, "chunk {i}");
        }
        // History across chunks: smaller than each chunk compressed alone.
        let streamed: usize = payloads.iter().map(Vec::len).sum();
        let alone: usize = data.iter().map(|c| zstd::bulk::compress(c, 3).unwrap().len()).sum();
        assert!(streamed < alone, "stream {streamed} bytes, chunks alone {alone} bytes");
    }

    #[test]
    fn a_level_change_restarts_the_stream() {
        let data = chunks(4);
        let mut enc = StreamEncoder::new(0, 1);
        let mut payloads = encode_all(&mut enc, 1, &data[..2]);
        payloads.extend(encode_all(&mut enc, 6, &data[2..]));
        let seqs: Vec<u64> = payloads.iter().map(|p| StreamHeader::split(p).unwrap().0.seq).collect();
        assert_eq!(seqs, [0, 1, 0, 1]);
        assert_eq!(enc.level(), 6);
        let mut dec = StreamDecoder::new();
        for (p, c) in payloads.iter().zip(&data) {
            assert!(decode(&mut dec, p, CS).unwrap() == *c);
        }
    }

    #[test]
    fn a_chunk_that_does_not_fit_goes_raw_and_restarts_the_stream() {
        let data = chunks(3);
        let mut enc = StreamEncoder::new(0, 1);
        let first = encode_all(&mut enc, 1, &data[..1]);
        // Incompressible bytes do not fit under their own length.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..CS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let mut out = vec![0u8; CS - 1];
        assert_eq!(enc.compress(1, &noise, &mut out), None);
        let rest = encode_all(&mut enc, 1, &data[1..]);
        assert_eq!(StreamHeader::split(&rest[0]).unwrap().0.seq, 0, "restarted");
        let mut dec = StreamDecoder::new();
        assert!(decode(&mut dec, &first[0], CS).unwrap() == data[0]);
        assert!(decode(&mut dec, &rest[0], CS).unwrap() == data[1]);
        assert!(decode(&mut dec, &rest[1], CS).unwrap() == data[2]);
    }

    #[test]
    fn out_of_order_chunks_are_refused() {
        let data = chunks(4);
        let payloads = encode_all(&mut StreamEncoder::new(1, 3), 3, &data);
        // A stream must start at seq 0.
        let mut dec = StreamDecoder::new();
        let e = decode(&mut dec, &payloads[1], CS).unwrap_err();
        assert_eq!(e, "compression stream out of order: chunk seq 1 where 0 (a stream's first chunk) was due");
        // A gap.
        let mut dec = StreamDecoder::new();
        decode(&mut dec, &payloads[0], CS).unwrap();
        let e = decode(&mut dec, &payloads[2], CS).unwrap_err();
        assert_eq!(e, "compression stream out of order: chunk seq 2 where 1 was due");
        // Broken for good after an error.
        let e = decode(&mut dec, &payloads[1], CS).unwrap_err();
        assert!(e.contains("out of order"), "{e}");
        // A chunk sent twice.
        let mut dec = StreamDecoder::new();
        decode(&mut dec, &payloads[0], CS).unwrap();
        decode(&mut dec, &payloads[1], CS).unwrap();
        let e = decode(&mut dec, &payloads[1], CS).unwrap_err();
        assert_eq!(e, "compression stream out of order: chunk seq 1 where 2 was due");
    }

    #[test]
    fn corrupted_bytes_are_an_error_or_a_different_chunk_never_a_panic() {
        let data = chunks(3);
        let payloads = encode_all(&mut StreamEncoder::new(0, 3), 3, &data);
        for at in [STREAM_HEADER_LEN, STREAM_HEADER_LEN + 3, payloads[1].len() / 2, payloads[1].len() - 1] {
            let mut bad = payloads[1].clone();
            bad[at] ^= 0x5A;
            let mut dec = StreamDecoder::new();
            decode(&mut dec, &payloads[0], CS).unwrap();
            // Either the decoder notices, or the bytes differ (the BLAKE3 check
            // at the target catches those).
            match decode(&mut dec, &bad, CS) {
                Err(_) => {}
                Ok(got) => assert!(got != data[1], "byte {at} flipped yet the same chunk"),
            }
        }
        // Truncated, and with trailing bytes.
        let mut dec = StreamDecoder::new();
        decode(&mut dec, &payloads[0], CS).unwrap();
        let short = &payloads[1][..payloads[1].len() - 4];
        assert!(decode(&mut dec, short, CS).is_err());
        let mut dec = StreamDecoder::new();
        let mut long = payloads[0].clone();
        long.extend_from_slice(&payloads[1][STREAM_HEADER_LEN..]);
        assert!(decode(&mut dec, &long, CS).unwrap_err().contains("left after the chunk"));
        // Garbage from the start.
        let mut dec = StreamDecoder::new();
        let mut garbage = StreamHeader { stream: 0, seq: 0 }.encode().to_vec();
        garbage.extend_from_slice(&[0xAB; 100]);
        assert!(decode(&mut dec, &garbage, CS).unwrap_err().starts_with("zstd stream:"));
    }

    #[test]
    fn a_window_above_the_limit_is_refused() {
        // An encoder with a 2^24 window, as a foreign source might use.
        let mut cctx = zstd_safe::CCtx::create();
        cctx.set_parameter(CParameter::WindowLog(WINDOW_LOG + 2)).unwrap();
        cctx.set_parameter(CParameter::ContentSizeFlag(false)).unwrap();
        let chunk = &chunks(1)[0];
        let mut out = vec![0u8; CS];
        let mut output = OutBuffer::around(&mut out[..]);
        let mut input = InBuffer::around(chunk);
        while cctx
            .compress_stream2(&mut output, &mut input, zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush)
            .unwrap()
            > 0
        {}
        let n = output.pos();
        let mut dec = StreamDecoder::new();
        let mut got = vec![0u8; CS];
        let e = dec.decode(0, &out[..n], &mut got).unwrap_err();
        assert!(e.contains("zstd stream"), "{e}");
    }
}
