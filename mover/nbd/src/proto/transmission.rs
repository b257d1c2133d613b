//! Transmission messages: request headers, reply headers (simple or
//! structured), and the context every reply is checked against.

use super::{
    be16, be32, be64, chunk, Command, MAX_BLOCK_STATUS_DESCRIPTORS, MAX_ERROR_CHUNK_LEN, REQUEST_LEN, REQUEST_MAGIC,
    SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
};
use crate::NbdError;

/// A transmission request header (a WRITE's payload follows it on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (NBD_CMD_FLAG_*).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Handle (cookie) echoed in the reply.
    pub handle: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// The 28-byte header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// What a reply to this request is checked against.
    pub fn context(&self, structured: bool) -> ReplyContext {
        ReplyContext { command: self.command, offset: self.offset, length: self.length, structured }
    }
}

/// What the client knows about the request a reply answers; the decoder
/// checks every reply against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyContext {
    /// The command.
    pub command: Command,
    /// The request's offset.
    pub offset: u64,
    /// The request's length.
    pub length: u32,
    /// Whether structured replies were negotiated.
    pub structured: bool,
}

impl ReplyContext {
    /// An error about a reply to this request.
    pub fn bad_reply(&self, detail: impl Into<String>) -> NbdError {
        NbdError::BadReply {
            op: self.command.name(),
            offset: self.offset,
            length: self.length as u64,
            detail: detail.into(),
        }
    }

    /// Checks that `[offset, offset+len)` lies within the request.
    pub fn check_range(&self, offset: u64, len: u64, what: &str) -> Result<(), NbdError> {
        let end = offset.checked_add(len);
        let req_end = self.offset.saturating_add(self.length as u64);
        match end {
            Some(end) if offset >= self.offset && end <= req_end => Ok(()),
            _ => Err(self.bad_reply(format!("{what} [{offset}, +{len}) outside the request"))),
        }
    }

    /// The longest structured chunk payload accepted for `chunk_type`.
    pub fn max_chunk_len(&self, chunk_type: u16) -> Result<u32, NbdError> {
        Ok(match chunk_type {
            chunk::NONE => 0,
            chunk::OFFSET_DATA if self.command == Command::Read => self.length.saturating_add(8),
            chunk::OFFSET_HOLE if self.command == Command::Read => 12,
            chunk::BLOCK_STATUS if self.command == Command::BlockStatus => 4 + 8 * MAX_BLOCK_STATUS_DESCRIPTORS,
            t if t & chunk::ERR_BIT != 0 => MAX_ERROR_CHUNK_LEN,
            t => return Err(self.bad_reply(format!("unexpected structured reply chunk type {t:#06x}"))),
        })
    }
}

/// A reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (a READ's data follows it when `error` is 0).
    Simple {
        /// Handle of the request.
        handle: u64,
        /// Error value (0: success).
        error: u32,
    },
    /// A structured reply chunk header; `length` payload bytes follow.
    Structured {
        /// Handle of the request.
        handle: u64,
        /// Reply flags (DONE).
        flags: u16,
        /// Chunk type.
        chunk_type: u16,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// The request's handle.
    pub fn handle(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { handle, .. } | ReplyHeader::Structured { handle, .. } => handle,
        }
    }

    /// Bytes needed to decode the header once the magic is known (4 before).
    pub fn needed(b: &[u8]) -> Result<usize, NbdError> {
        if b.len() < 4 {
            return Ok(4);
        }
        match be32(b, 0) {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_HEADER_LEN),
            got => Err(NbdError::BadMagic {
                what: "reply (simple 0x67446698 or structured 0x668e33ef)",
                expected: STRUCTURED_REPLY_MAGIC as u64,
                got: got as u64,
            }),
        }
    }

    /// Decodes a reply header.
    pub fn decode(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>, NbdError> {
        let need = Self::needed(b)?;
        if b.len() < need || need == 4 {
            return Ok(None);
        }
        Ok(Some(if need == SIMPLE_REPLY_LEN {
            (ReplyHeader::Simple { error: be32(b, 4), handle: be64(b, 8) }, need)
        } else {
            (
                ReplyHeader::Structured {
                    flags: be16(b, 4),
                    chunk_type: be16(b, 6),
                    handle: be64(b, 8),
                    length: be32(b, 16),
                },
                need,
            )
        }))
    }
}
