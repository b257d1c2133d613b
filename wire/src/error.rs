//! Errors of the wire layer.

use crate::frame::ErrorCode;

/// Everything that can go wrong while decoding frames or driving a session.
///
/// Decoding errors say which frame and which field; session errors say which
/// state refused which frame. None of them is ever a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The stream does not start with ferry's magic: not a ferry peer, or the stream lost sync.
    #[error("not a ferry stream: bad magic {found:02x?} (expected {expected:02x?})")]
    BadMagic {
        /// The two bytes found.
        found: [u8; 2],
        /// The magic expected.
        expected: [u8; 2],
    },
    /// The header check did not match: the stream is desynchronised or corrupt.
    #[error(
        "frame header check failed (got {found:#010x}, computed {computed:#010x}): stream desynchronised or corrupt"
    )]
    HeaderCheck {
        /// Check value carried by the header.
        found: u32,
        /// Check value computed over the header.
        computed: u32,
    },
    /// A frame body longer than the limit, refused before allocating.
    #[error("frame of type {frame_type:#04x} is {len} bytes, above the limit of {max}")]
    FrameTooLarge {
        /// Frame type byte.
        frame_type: u8,
        /// Announced body length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A frame type this version does not know and that is not marked optional.
    #[error("unknown mandatory frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// Reserved flag bits set.
    #[error("frame {frame}: reserved flag bits set ({flags:#04x})")]
    ReservedFlags {
        /// Frame name.
        frame: &'static str,
        /// The flags byte.
        flags: u8,
    },
    /// A frame body ended before a field.
    #[error("frame {frame}: body truncated while reading {field}")]
    Truncated {
        /// Frame name.
        frame: &'static str,
        /// Field being read.
        field: &'static str,
    },
    /// A frame body longer than its fields.
    #[error("frame {frame}: {extra} trailing bytes after the last field")]
    TrailingBytes {
        /// Frame name.
        frame: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// A length or count field above its limit.
    #[error("frame {frame}: {field} is {len}, above the limit of {max}")]
    FieldTooLong {
        /// Frame name.
        frame: &'static str,
        /// Field name.
        field: &'static str,
        /// Value found.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A string field that is not UTF-8.
    #[error("frame {frame}: {field} is not valid UTF-8")]
    InvalidUtf8 {
        /// Frame name.
        frame: &'static str,
        /// Field name.
        field: &'static str,
    },
    /// A field with a value outside its domain.
    #[error("frame {frame}: invalid {field} {value}")]
    InvalidValue {
        /// Frame name.
        frame: &'static str,
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// No protocol version in common.
    #[error("protocol version mismatch: peer speaks {peer_min}..={peer_max}, we speak {ours_min}..={ours_max}; upgrade the older side")]
    UnsupportedVersion {
        /// Peer's lowest version.
        peer_min: u16,
        /// Peer's highest version.
        peer_max: u16,
        /// Our lowest version.
        ours_min: u16,
        /// Our highest version.
        ours_max: u16,
    },
    /// The client's proof did not match the shared token (server side).
    #[error("authentication failed: the client's token does not match")]
    AuthFailed,
    /// The server could not prove it knows the token (client side).
    #[error("authentication failed: the server could not prove it holds the same token")]
    ServerAuthFailed,
    /// A frame that is not allowed in the session's current state.
    #[error("protocol violation: {frame} {direction} in state {state}")]
    IllegalFrame {
        /// Frame name.
        frame: &'static str,
        /// "sent" or "received".
        direction: &'static str,
        /// State name.
        state: &'static str,
    },
    /// A disk id that was not opened, or opened twice.
    #[error("protocol violation: {what} disk id {disk}")]
    Disk {
        /// What was wrong.
        what: &'static str,
        /// The disk id.
        disk: u32,
    },
    /// A chunk index out of range or out of order.
    #[error("protocol violation: disk {disk} chunk {chunk}: {what}")]
    Chunk {
        /// Disk id.
        disk: u32,
        /// Chunk index.
        chunk: u64,
        /// What was wrong.
        what: &'static str,
    },
    /// The peer sent an Error frame.
    #[error("peer reported {code}: {message}")]
    Remote {
        /// Typed error code.
        code: ErrorCode,
        /// Human-readable message from the peer.
        message: String,
    },
    /// The session is closed.
    #[error("session closed")]
    Closed,
}

impl WireError {
    /// The error code to report to the peer for this local error.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::AuthFailed | WireError::ServerAuthFailed => ErrorCode::AuthFailed,
            WireError::Remote { code, .. } => *code,
            _ => ErrorCode::Protocol,
        }
    }
}
