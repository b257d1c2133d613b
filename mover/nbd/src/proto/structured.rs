//! Structured replies: chunk types and their payloads (data, holes, block
//! status, errors), the checks of a chunk against its request, and the
//! decoder of a whole reply message.

use super::{be16, be32, be64, chunk, utf8_lossy, Command, ReplyContext, ReplyHeader, REPLY_FLAG_DONE};
use crate::NbdError;

/// One block status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Extent length (nonzero).
    pub length: u32,
    /// Status flags, meaning defined by the context.
    pub flags: u32,
}

/// A decoded structured chunk (payload borrowed from the input).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// NBD_REPLY_TYPE_NONE.
    None,
    /// NBD_REPLY_TYPE_OFFSET_DATA.
    OffsetData {
        /// Offset of the data.
        offset: u64,
        /// The data.
        data: &'a [u8],
    },
    /// NBD_REPLY_TYPE_OFFSET_HOLE.
    OffsetHole {
        /// Offset of the hole.
        offset: u64,
        /// Its length.
        length: u32,
    },
    /// NBD_REPLY_TYPE_BLOCK_STATUS.
    BlockStatus {
        /// Metadata context id.
        context_id: u32,
        /// Consecutive extents from the request's offset.
        descriptors: Vec<BlockDescriptor>,
    },
    /// An error chunk (NBD_REPLY_TYPE_ERROR, _ERROR_OFFSET, or an unknown
    /// type with bit 15 set).
    Error {
        /// The chunk type.
        chunk_type: u16,
        /// Error value.
        code: u32,
        /// Message (may be empty).
        message: String,
        /// Offset of NBD_REPLY_TYPE_ERROR_OFFSET.
        offset: Option<u64>,
    },
}

/// Decodes a chunk payload of the OFFSET_DATA header (its 8-byte offset) and
/// checks the data range against the request. Returns (offset, data length).
pub fn decode_data_offset(ctx: &ReplyContext, chunk_len: u32, b: &[u8; 8]) -> Result<(u64, u32), NbdError> {
    let offset = u64::from_be_bytes(*b);
    let len = match chunk_len.checked_sub(8) {
        Some(l) if l > 0 => l,
        _ => return Err(ctx.bad_reply(format!("OFFSET_DATA chunk of {chunk_len} bytes"))),
    };
    ctx.check_range(offset, len as u64, "OFFSET_DATA")?;
    Ok((offset, len))
}

/// Checks a structured chunk header against its request before its payload
/// is read.
pub fn check_chunk_header(ctx: &ReplyContext, flags: u16, chunk_type: u16, length: u32) -> Result<(), NbdError> {
    if !ctx.structured {
        return Err(ctx.bad_reply("structured reply chunk, but structured replies were not negotiated"));
    }
    let max = ctx.max_chunk_len(chunk_type)?;
    if length > max {
        return Err(ctx.bad_reply(format!("chunk type {chunk_type:#06x} of {length} bytes, at most {max} expected")));
    }
    let min = match chunk_type {
        chunk::NONE => 0,
        chunk::OFFSET_DATA => 9,
        chunk::OFFSET_HOLE => 12,
        chunk::BLOCK_STATUS => 12,
        chunk::ERROR_OFFSET => 14,
        _ => 6,
    };
    if length < min {
        return Err(ctx.bad_reply(format!("chunk type {chunk_type:#06x} of {length} bytes, at least {min} expected")));
    }
    if chunk_type == chunk::NONE && flags & REPLY_FLAG_DONE == 0 {
        return Err(ctx.bad_reply("NBD_REPLY_TYPE_NONE without the DONE flag"));
    }
    if chunk_type == chunk::BLOCK_STATUS && (length - 4) % 8 != 0 {
        return Err(ctx.bad_reply(format!("BLOCK_STATUS chunk of {length} bytes is not 4 + 8n")));
    }
    Ok(())
}

/// Decodes the payload of a checked chunk header (any type; for
/// OFFSET_DATA the payload includes the offset).
pub fn decode_chunk_payload<'a>(ctx: &ReplyContext, chunk_type: u16, p: &'a [u8]) -> Result<Chunk<'a>, NbdError> {
    let len = u32::try_from(p.len()).map_err(|_| ctx.bad_reply("chunk longer than 4 GiB"))?;
    check_chunk_header(ctx, REPLY_FLAG_DONE, chunk_type, len)?;
    match chunk_type {
        chunk::NONE => Ok(Chunk::None),
        chunk::OFFSET_DATA => {
            let mut o = [0u8; 8];
            o.copy_from_slice(&p[..8]);
            let (offset, _) = decode_data_offset(ctx, p.len() as u32, &o)?;
            Ok(Chunk::OffsetData { offset, data: &p[8..] })
        }
        chunk::OFFSET_HOLE => {
            let offset = be64(p, 0);
            let length = be32(p, 8);
            if length == 0 {
                return Err(ctx.bad_reply("OFFSET_HOLE of length 0"));
            }
            ctx.check_range(offset, length as u64, "OFFSET_HOLE")?;
            Ok(Chunk::OffsetHole { offset, length })
        }
        chunk::BLOCK_STATUS => {
            let context_id = be32(p, 0);
            let n = (p.len() - 4) / 8;
            let mut descriptors = Vec::with_capacity(n);
            let mut sum = 0u64;
            for i in 0..n {
                let d = BlockDescriptor { length: be32(p, 4 + 8 * i), flags: be32(p, 8 + 8 * i) };
                if d.length == 0 {
                    return Err(ctx.bad_reply(format!("block status descriptor {i} has length 0")));
                }
                sum += d.length as u64;
                descriptors.push(d);
            }
            // The spec says the sum MUST NOT exceed the request's length; qemu
            // may extend the last extent past it, so only the first
            // descriptor is required to start inside the request and the
            // client clamps the rest.
            if sum > ctx.length as u64 && n > 1 && sum - descriptors[n - 1].length as u64 >= ctx.length as u64 {
                return Err(ctx.bad_reply(format!("block status descriptors cover {sum} bytes")));
            }
            Ok(Chunk::BlockStatus { context_id, descriptors })
        }
        t => {
            // Error chunks: error, message length, message, type-specific tail.
            let code = be32(p, 0);
            let mlen = be16(p, 4) as usize;
            let tail = if t == chunk::ERROR_OFFSET { 8 } else { 0 };
            if 6 + mlen + tail > p.len() {
                return Err(ctx.bad_reply(format!("error chunk message of {mlen} bytes overruns the chunk")));
            }
            let message = utf8_lossy(&p[6..6 + mlen]);
            let offset = if t == chunk::ERROR_OFFSET {
                let off = be64(p, 6 + mlen);
                if ctx.check_range(off, 1, "ERROR_OFFSET").is_err() {
                    return Err(ctx.bad_reply(format!("ERROR_OFFSET offset {off} outside the request")));
                }
                Some(off)
            } else {
                None
            };
            Ok(Chunk::Error { chunk_type: t, code, message, offset })
        }
    }
}

/// A whole decoded reply message, borrowed from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A simple reply; `data` holds a successful READ's payload.
    Simple {
        /// Handle.
        handle: u64,
        /// Error value.
        error: u32,
        /// READ payload (empty otherwise).
        data: &'a [u8],
    },
    /// One structured reply chunk.
    Chunk {
        /// Handle.
        handle: u64,
        /// Reply flags (DONE).
        flags: u16,
        /// The chunk.
        chunk: Chunk<'a>,
    },
}

/// Decodes one reply message (a simple reply or one structured chunk).
/// `lookup` maps a handle to its request (None: unknown handle, an error).
/// The client reads data payloads straight into its buffers instead; it
/// uses the same checks ([`check_chunk_header`], [`decode_chunk_payload`]).
pub fn decode_reply<'a>(
    b: &'a [u8],
    lookup: impl FnOnce(u64) -> Option<ReplyContext>,
) -> Result<Option<(Reply<'a>, usize)>, NbdError> {
    let Some((h, hlen)) = ReplyHeader::decode(b)? else { return Ok(None) };
    let handle = h.handle();
    let ctx = lookup(handle).ok_or(NbdError::UnknownHandle(handle))?;
    match h {
        ReplyHeader::Simple { error, .. } => {
            let dlen = if error == 0 && ctx.command == Command::Read {
                if ctx.structured {
                    return Err(ctx.bad_reply("successful simple reply to READ after structured replies"));
                }
                ctx.length as usize
            } else {
                0
            };
            if b.len() - hlen < dlen {
                return Ok(None);
            }
            Ok(Some((Reply::Simple { handle, error, data: &b[hlen..hlen + dlen] }, hlen + dlen)))
        }
        ReplyHeader::Structured { flags, chunk_type, length, .. } => {
            check_chunk_header(&ctx, flags, chunk_type, length)?;
            let total = hlen + length as usize;
            if b.len() < total {
                return Ok(None);
            }
            let chunk = decode_chunk_payload(&ctx, chunk_type, &b[hlen..total])?;
            Ok(Some((Reply::Chunk { handle, flags, chunk }, total)))
        }
    }
}
