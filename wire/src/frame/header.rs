//! The 12-byte frame header: magic, type, flags, body length and header check.

use super::{HEADER_LEN, MAGIC, MAX_BODY_LEN};
use crate::error::WireError;

/// FNV-1a, 32 bit: the header check. Not a digest of data; it only detects a
/// stream that lost sync or a corrupted header.
pub fn header_check(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Encode a frame header.
pub fn encode_header(frame_type: u8, flags: u8, body_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(&MAGIC);
    h[2] = frame_type;
    h[3] = flags;
    h[4..8].copy_from_slice(&body_len.to_le_bytes());
    let check = header_check(&h[0..8]);
    h[8..12].copy_from_slice(&check.to_le_bytes());
    h
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame type byte.
    pub frame_type: u8,
    /// Flags byte.
    pub flags: u8,
    /// Body length.
    pub body_len: u32,
}

/// Decode and check a frame header, including the body length limit.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    if h[0..2] != MAGIC {
        return Err(WireError::BadMagic { found: [h[0], h[1]], expected: MAGIC });
    }
    let found = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let computed = header_check(&h[0..8]);
    if found != computed {
        return Err(WireError::HeaderCheck { found, computed });
    }
    let body_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if body_len > MAX_BODY_LEN {
        return Err(WireError::FrameTooLarge { frame_type: h[2], len: body_len, max: MAX_BODY_LEN });
    }
    Ok(Header { frame_type: h[2], flags: h[3], body_len })
}
