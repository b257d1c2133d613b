//! The NBD wire format, sans-IO: encoders for everything the client sends and
//! decoders for everything the server sends. No sockets, no clock.
//!
//! Constants follow `doc/proto.md` of NetworkBlockDevice/nbd (fixed newstyle
//! negotiation, structured replies, metadata contexts). They are on-wire
//! values fixed by the protocol: do not modify.
//!
//! Decoders take a byte slice and return `Ok(None)` when they need more bytes,
//! or the decoded item and how many bytes it used. Every length is checked
//! against a limit before anything is allocated, and no input makes them panic.

use std::fmt;

use super::NbdError;

/// `NBDMAGIC`, first 8 bytes of every server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting magic and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle greeting magic (`cliserv_magic`); not supported by this client.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Greeting length: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
/// Option request header: IHAVEOPT, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Handshake flag: server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits, sent with the export size).
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// NBD_CMD_TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_CMD_FLAG_DF supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Multiple connections share one cache.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// NBD_CMD_CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// NBD_CMD_FLAG_FAST_ZERO supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes.
pub mod opt {
    /// Choose the export and enter transmission (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// Soft disconnect during negotiation.
    pub const ABORT: u32 = 2;
    /// List exports (not used by this client).
    pub const LIST: u32 = 3;
    /// Start TLS (not supported by this client).
    pub const STARTTLS: u32 = 5;
    /// Query an export without entering transmission.
    pub const INFO: u32 = 6;
    /// Query an export and enter transmission.
    pub const GO: u32 = 7;
    /// Enable structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts (not used by this client).
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Option accepted / list finished.
    pub const ACK: u32 = 1;
    /// Export description (NBD_OPT_LIST).
    pub const SERVER: u32 = 2;
    /// Export information (NBD_OPT_INFO/GO).
    pub const INFO: u32 = 3;
    /// Metadata context id and name.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set in every error reply type.
    pub const ERR_BIT: u32 = 1 << 31;
    /// Option unknown to the server.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// Forbidden by server policy.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// Syntactically invalid.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// Not supported on the server's platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// Export unknown.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// Client must honour block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// Request or reply too big.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
    /// Extended headers required.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT | 10;
}

/// NBD_INFO types (in NBD_OPT_INFO/GO requests and NBD_REP_INFO replies).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags.
pub mod cmdflags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES: do not punch a hole. This client never sets it.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ: do not fragment.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail fast if zeroing is slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk types.
pub mod chunk {
    /// No payload; final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A run of zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// Bit set in every error chunk type.
    pub const ERR_BIT: u16 = 1 << 15;
    /// An error.
    pub const ERROR: u16 = ERR_BIT | 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = ERR_BIT | 2;
}

/// `base:allocation` flag: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Longest string the protocol allows (export names, messages, context names).
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option reply payload accepted (strings are at most 4 KiB; INFO
/// replies are a few bytes).
pub const MAX_OPTION_REPLY_LEN: u32 = 64 * 1024;
/// Largest error chunk accepted: error, message length, message, an offset,
/// and room for fields of error types defined later.
pub const MAX_ERROR_CHUNK_LEN: u32 = 6 + MAX_STRING_LEN as u32 + 64;
/// Most block status descriptors accepted in one chunk (qemu sends at most
/// 2^17 = 1 MiB of descriptors; this leaves headroom for other servers).
pub const MAX_BLOCK_STATUS_DESCRIPTORS: u32 = 1 << 20;

/// Transmission commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// NBD_CMD_READ (0).
    Read,
    /// NBD_CMD_WRITE (1).
    Write,
    /// NBD_CMD_DISC (2).
    Disc,
    /// NBD_CMD_FLUSH (3).
    Flush,
    /// NBD_CMD_TRIM (4).
    Trim,
    /// NBD_CMD_WRITE_ZEROES (6).
    WriteZeroes,
    /// NBD_CMD_BLOCK_STATUS (7).
    BlockStatus,
}

impl Command {
    /// The on-wire type.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
        }
    }

    /// The protocol's name, for errors.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "NBD_CMD_READ",
            Command::Write => "NBD_CMD_WRITE",
            Command::Disc => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim => "NBD_CMD_TRIM",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
        }
    }
}

/// The name of an option code, for errors.
pub fn option_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        opt::ABORT => "NBD_OPT_ABORT",
        opt::LIST => "NBD_OPT_LIST",
        opt::STARTTLS => "NBD_OPT_STARTTLS",
        opt::INFO => "NBD_OPT_INFO",
        opt::GO => "NBD_OPT_GO",
        opt::STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

/// The name of an option error reply type, for errors.
pub fn option_error_name(reply_type: u32) -> &'static str {
    match reply_type {
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY",
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID",
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        rep::ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown error reply",
    }
}

/// The name of an NBD error value (errno-like), for errors.
pub fn errno_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// What the server said first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags (FIXED_NEWSTYLE, NO_ZEROES).
    pub flags: u16,
}

impl Greeting {
    /// Decodes the 18-byte newstyle greeting.
    pub fn decode(b: &[u8]) -> Result<Option<(Greeting, usize)>, NbdError> {
        if b.len() >= 8 {
            let magic = be64(b, 0);
            if magic != NBDMAGIC {
                return Err(NbdError::BadMagic { what: "server greeting", expected: NBDMAGIC, got: magic });
            }
        }
        if b.len() >= 16 {
            let magic = be64(b, 8);
            if magic == CLISERV_MAGIC {
                return Err(NbdError::Unsupported("oldstyle negotiation (server greeted with cliserv_magic)".into()));
            }
            if magic != IHAVEOPT {
                return Err(NbdError::BadMagic { what: "server greeting (IHAVEOPT)", expected: IHAVEOPT, got: magic });
            }
        }
        if b.len() < GREETING_LEN {
            return Ok(None);
        }
        let flags = be16(b, 16);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Unsupported("server does not speak fixed newstyle negotiation".into()));
        }
        Ok(Some((Greeting { flags }, GREETING_LEN)))
    }

    /// The client flags to answer with: everything both sides support.
    pub fn client_flags(&self) -> u32 {
        let mut f = FLAG_C_FIXED_NEWSTYLE;
        if self.flags & FLAG_NO_ZEROES != 0 {
            f |= FLAG_C_NO_ZEROES;
        }
        f
    }
}

/// Encodes the 32-bit client flags.
pub fn encode_client_flags(flags: u32) -> [u8; 4] {
    flags.to_be_bytes()
}

/// An option request the client sends during negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionRequest {
    /// NBD_OPT_STRUCTURED_REPLY.
    StructuredReply,
    /// NBD_OPT_SET_META_CONTEXT for `export` with `queries`.
    SetMetaContext {
        /// Export name.
        export: String,
        /// Context names or queries.
        queries: Vec<String>,
    },
    /// NBD_OPT_INFO: describe `export`, stay in negotiation.
    Info {
        /// Export name.
        export: String,
        /// NBD_INFO_* types asked for.
        requests: Vec<u16>,
    },
    /// NBD_OPT_GO: describe `export` and enter transmission.
    Go {
        /// Export name.
        export: String,
        /// NBD_INFO_* types asked for.
        requests: Vec<u16>,
    },
    /// NBD_OPT_EXPORT_NAME (fallback for servers without NBD_OPT_GO).
    ExportName {
        /// Export name.
        export: String,
    },
    /// NBD_OPT_ABORT.
    Abort,
}

impl OptionRequest {
    /// The option code.
    pub fn code(&self) -> u32 {
        match self {
            OptionRequest::StructuredReply => opt::STRUCTURED_REPLY,
            OptionRequest::SetMetaContext { .. } => opt::SET_META_CONTEXT,
            OptionRequest::Info { .. } => opt::INFO,
            OptionRequest::Go { .. } => opt::GO,
            OptionRequest::ExportName { .. } => opt::EXPORT_NAME,
            OptionRequest::Abort => opt::ABORT,
        }
    }

    /// Appends the option request to `dst`. Fails if a string is longer than
    /// the protocol allows.
    pub fn encode(&self, dst: &mut Vec<u8>) -> Result<(), NbdError> {
        let mut data = Vec::new();
        let put_str = |data: &mut Vec<u8>, s: &str, what: &str| -> Result<(), NbdError> {
            if s.len() > MAX_STRING_LEN {
                return Err(NbdError::InvalidArgument(format!(
                    "{what} is {} bytes, the protocol allows {MAX_STRING_LEN}",
                    s.len()
                )));
            }
            data.extend_from_slice(&(s.len() as u32).to_be_bytes());
            data.extend_from_slice(s.as_bytes());
            Ok(())
        };
        match self {
            OptionRequest::StructuredReply | OptionRequest::Abort => {}
            OptionRequest::SetMetaContext { export, queries } => {
                put_str(&mut data, export, "export name")?;
                data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
                for q in queries {
                    put_str(&mut data, q, "metadata context")?;
                }
            }
            OptionRequest::Info { export, requests } | OptionRequest::Go { export, requests } => {
                put_str(&mut data, export, "export name")?;
                if requests.len() > 64 {
                    return Err(NbdError::InvalidArgument("too many NBD_INFO requests".into()));
                }
                data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
                for r in requests {
                    data.extend_from_slice(&r.to_be_bytes());
                }
            }
            OptionRequest::ExportName { export } => {
                if export.len() > MAX_STRING_LEN {
                    return Err(NbdError::InvalidArgument("export name longer than 4096 bytes".into()));
                }
                data.extend_from_slice(export.as_bytes());
            }
        }
        dst.extend_from_slice(&IHAVEOPT.to_be_bytes());
        dst.extend_from_slice(&self.code().to_be_bytes());
        dst.extend_from_slice(&(data.len() as u32).to_be_bytes());
        dst.extend_from_slice(&data);
        Ok(())
    }
}

/// NBD_REP_INFO payloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoReply {
    /// NBD_INFO_EXPORT.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// NBD_INFO_NAME.
    Name(String),
    /// NBD_INFO_DESCRIPTION.
    Description(String),
    /// NBD_INFO_BLOCK_SIZE.
    BlockSize(BlockSizes),
    /// An info type this client does not know (ignored, as the spec says).
    Unknown(u16),
}

/// Block size constraints of an export (NBD_INFO_BLOCK_SIZE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size: offsets and lengths are multiples of it.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Largest payload of a READ or WRITE.
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// What the spec says a client may assume when the server says nothing.
    fn default() -> Self {
        BlockSizes { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 }
    }
}

/// An option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionReply {
    /// NBD_REP_ACK.
    Ack,
    /// NBD_REP_SERVER (name only).
    Server(String),
    /// NBD_REP_INFO.
    Info(InfoReply),
    /// NBD_REP_META_CONTEXT.
    MetaContext {
        /// Context id used in BLOCK_STATUS chunks.
        id: u32,
        /// Context name.
        name: String,
    },
    /// An error reply (bit 31 set) with its optional message.
    Error {
        /// Reply type (NBD_REP_ERR_*).
        code: u32,
        /// Message from the server (may be empty).
        message: String,
    },
    /// A non-error reply type this client does not know.
    Unknown(u32),
}

fn utf8_lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn bad_option_reply(option: u32, detail: String) -> NbdError {
    NbdError::BadHandshake(format!("reply to {}: {detail}", option_name(option)))
}

/// Decodes one option reply to `expected_option`.
pub fn decode_option_reply(b: &[u8], expected_option: u32) -> Result<Option<(OptionReply, usize)>, NbdError> {
    if b.len() >= 8 {
        let magic = be64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(NbdError::BadMagic { what: "option reply", expected: OPTION_REPLY_MAGIC, got: magic });
        }
    }
    if b.len() < OPTION_REPLY_HEADER_LEN {
        return Ok(None);
    }
    let option = be32(b, 8);
    let ty = be32(b, 12);
    let len = be32(b, 16);
    if option != expected_option {
        return Err(bad_option_reply(
            expected_option,
            format!("server answered option {option} ({})", option_name(option)),
        ));
    }
    if len > MAX_OPTION_REPLY_LEN {
        return Err(NbdError::TooLong { what: "option reply", len: len as u64, max: MAX_OPTION_REPLY_LEN as u64 });
    }
    let total = OPTION_REPLY_HEADER_LEN + len as usize;
    if b.len() < total {
        return Ok(None);
    }
    let p = &b[OPTION_REPLY_HEADER_LEN..total];
    let reply = match ty {
        rep::ACK => {
            if !p.is_empty() {
                return Err(bad_option_reply(option, format!("NBD_REP_ACK with {} bytes of data", p.len())));
            }
            OptionReply::Ack
        }
        rep::SERVER => {
            if p.len() < 4 || be32(p, 0) as usize > p.len() - 4 {
                return Err(bad_option_reply(option, "malformed NBD_REP_SERVER".into()));
            }
            OptionReply::Server(utf8_lossy(&p[4..4 + be32(p, 0) as usize]))
        }
        rep::INFO => {
            if p.len() < 2 {
                return Err(bad_option_reply(option, "NBD_REP_INFO shorter than 2 bytes".into()));
            }
            let it = be16(p, 0);
            let d = &p[2..];
            let bad_len = |what: &str| bad_option_reply(option, format!("{what} with {} bytes of data", d.len()));
            OptionReply::Info(match it {
                info::EXPORT => {
                    if d.len() != 10 {
                        return Err(bad_len("NBD_INFO_EXPORT"));
                    }
                    InfoReply::Export { size: be64(d, 0), flags: be16(d, 8) }
                }
                info::NAME => InfoReply::Name(utf8_lossy(d)),
                info::DESCRIPTION => InfoReply::Description(utf8_lossy(d)),
                info::BLOCK_SIZE => {
                    if d.len() != 12 {
                        return Err(bad_len("NBD_INFO_BLOCK_SIZE"));
                    }
                    let bs = BlockSizes { minimum: be32(d, 0), preferred: be32(d, 4), maximum: be32(d, 8) };
                    let pow2 = |v: u32| v != 0 && v.is_power_of_two();
                    if !pow2(bs.minimum)
                        || bs.minimum > 65536
                        || !pow2(bs.preferred)
                        || bs.preferred < bs.minimum
                        || bs.maximum < bs.minimum
                    {
                        return Err(bad_option_reply(option, format!("invalid block sizes {bs:?}")));
                    }
                    InfoReply::BlockSize(bs)
                }
                other => InfoReply::Unknown(other),
            })
        }
        rep::META_CONTEXT => {
            if p.len() < 4 || p.len() - 4 > MAX_STRING_LEN {
                return Err(bad_option_reply(option, format!("NBD_REP_META_CONTEXT with {} bytes", p.len())));
            }
            OptionReply::MetaContext { id: be32(p, 0), name: utf8_lossy(&p[4..]) }
        }
        t if t & rep::ERR_BIT != 0 => OptionReply::Error { code: t, message: utf8_lossy(p) },
        t => OptionReply::Unknown(t),
    };
    Ok(Some((reply, total)))
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags, and (without NO_ZEROES) 124
/// zero bytes.
pub fn decode_export_name_reply(b: &[u8], no_zeroes: bool) -> Option<((u64, u16), usize)> {
    let len = if no_zeroes { 10 } else { 134 };
    if b.len() < len {
        return None;
    }
    Some(((be64(b, 0), be16(b, 8)), len))
}

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

impl fmt::Display for BlockSizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "min {} preferred {} max {}", self.minimum, self.preferred, self.maximum)
    }
}

/// Fuzzing entry point (used by `mover/fuzz` and by a stable test that
/// replays its corpus): the first 14 bytes choose the request a reply
/// answers, the rest is decoded as a stream of replies, and also as a
/// greeting and option replies. Must never panic.
#[doc(hidden)]
pub fn fuzz_decoders(data: &[u8]) {
    if data.len() < 14 {
        return;
    }
    let command = match data[0] % 7 {
        0 => Command::Read,
        1 => Command::Write,
        2 => Command::Disc,
        3 => Command::Flush,
        4 => Command::Trim,
        5 => Command::WriteZeroes,
        _ => Command::BlockStatus,
    };
    let offset = be64(data, 1) >> (data[13] & 63);
    let length = be32(data, 9);
    let ctx = ReplyContext { command, offset, length, structured: data[13] & 0x80 == 0 };
    let mut rest = &data[14..];
    while let Ok(Some((_, n))) = decode_reply(rest, |h| (h & 1 == 0).then_some(ctx)) {
        if n == 0 {
            break;
        }
        rest = &rest[n..];
    }
    let body = &data[14..];
    let _ = Greeting::decode(body);
    let mut rest = body;
    while let Ok(Some((_, n))) = decode_option_reply(rest, data[0] as u32 % 12) {
        rest = &rest[n..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ctx(command: Command, offset: u64, length: u32) -> ReplyContext {
        ReplyContext { command, offset, length, structured: true }
    }

    fn chunk_bytes(flags: u16, ty: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn request_golden_vector() {
        let r = Request {
            flags: cmdflags::FUA,
            command: Command::Write,
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        assert_eq!(
            r.encode(),
            [0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0]
        );
        assert_eq!(Command::WriteZeroes.code(), 6);
        assert_eq!(Command::BlockStatus.code(), 7);
    }

    #[test]
    fn option_golden_vectors() {
        let mut b = Vec::new();
        OptionRequest::SetMetaContext { export: "e".into(), queries: vec!["base:allocation".into()] }
            .encode(&mut b)
            .unwrap();
        let mut want = b"IHAVEOPT".to_vec();
        want.extend_from_slice(&[0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 1, b'e', 0, 0, 0, 1, 0, 0, 0, 15]);
        want.extend_from_slice(b"base:allocation");
        assert_eq!(b, want);
        b.clear();
        OptionRequest::Go { export: String::new(), requests: vec![info::BLOCK_SIZE] }.encode(&mut b).unwrap();
        assert_eq!(&b[8..], &[0, 0, 0, 7, 0, 0, 0, 8, 0, 0, 0, 0, 0, 1, 0, 3]);
        let long = "x".repeat(MAX_STRING_LEN + 1);
        assert!(OptionRequest::ExportName { export: long }.encode(&mut b).is_err());
    }

    #[test]
    fn greeting_needs_bytes_then_checks_magic() {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&3u16.to_be_bytes());
        for n in 0..g.len() {
            assert_eq!(Greeting::decode(&g[..n]).unwrap(), None);
        }
        let (gr, n) = Greeting::decode(&g).unwrap().unwrap();
        assert_eq!((gr.flags, n, gr.client_flags()), (3, 18, 3));
        let mut old = g.clone();
        old[8..16].copy_from_slice(&CLISERV_MAGIC.to_be_bytes());
        assert!(matches!(Greeting::decode(&old), Err(NbdError::Unsupported(_))));
        match Greeting::decode(b"SSH-2.0-") {
            Err(NbdError::BadMagic { expected, got, .. }) => {
                assert_eq!((expected, got), (NBDMAGIC, u64::from_be_bytes(*b"SSH-2.0-")))
            }
            other => panic!("{other:?}"),
        }
    }

    fn opt_reply(option: u32, ty: u32, data: &[u8]) -> Vec<u8> {
        let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&ty.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        r
    }

    #[test]
    fn option_replies() {
        let mut d = vec![0, 0];
        d.extend_from_slice(&(5u64 << 30).to_be_bytes());
        d.extend_from_slice(&0x0d_u16.to_be_bytes());
        let b = opt_reply(opt::GO, rep::INFO, &d);
        for n in 0..b.len() {
            assert_eq!(decode_option_reply(&b[..n], opt::GO).unwrap(), None);
        }
        assert_eq!(
            decode_option_reply(&b, opt::GO).unwrap(),
            Some((OptionReply::Info(InfoReply::Export { size: 5 << 30, flags: 0x0d }), b.len()))
        );
        let mut bs = vec![0, 3];
        for v in [512u32, 4096, 32 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        let (r, _) = decode_option_reply(&opt_reply(opt::GO, rep::INFO, &bs), opt::GO).unwrap().unwrap();
        assert_eq!(
            r,
            OptionReply::Info(InfoReply::BlockSize(BlockSizes { minimum: 512, preferred: 4096, maximum: 32 << 20 }))
        );
        bs[2..6].copy_from_slice(&3u32.to_be_bytes());
        assert!(decode_option_reply(&opt_reply(opt::GO, rep::INFO, &bs), opt::GO).is_err());
        let (r, _) =
            decode_option_reply(&opt_reply(opt::GO, rep::ERR_UNKNOWN, b"no such export"), opt::GO).unwrap().unwrap();
        assert_eq!(r, OptionReply::Error { code: rep::ERR_UNKNOWN, message: "no such export".into() });
        // An oversized reply is rejected from its header alone.
        let mut huge = opt_reply(opt::GO, rep::INFO, &[]);
        huge[16..20].copy_from_slice(&(MAX_OPTION_REPLY_LEN + 1).to_be_bytes());
        assert!(matches!(decode_option_reply(&huge, opt::GO), Err(NbdError::TooLong { .. })));
        // A reply to another option is a protocol error.
        assert!(decode_option_reply(&opt_reply(opt::INFO, rep::ACK, &[]), opt::GO).is_err());
        let mut mc = 7u32.to_be_bytes().to_vec();
        mc.extend_from_slice(b"base:allocation");
        let (r, _) =
            decode_option_reply(&opt_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &mc), opt::SET_META_CONTEXT)
                .unwrap()
                .unwrap();
        assert_eq!(r, OptionReply::MetaContext { id: 7, name: "base:allocation".into() });
    }

    #[test]
    fn structured_chunks_decode_and_check_limits() {
        let c = ctx(Command::Read, 1000, 100);
        let look = |h: u64| (h == 9).then_some(c);
        let mut p = 1010u64.to_be_bytes().to_vec();
        p.extend_from_slice(&[1, 2, 3]);
        let b = chunk_bytes(0, chunk::OFFSET_DATA, 9, &p);
        for n in 0..b.len() {
            assert_eq!(decode_reply(&b[..n], look).unwrap(), None, "prefix {n}");
        }
        let (r, n) = decode_reply(&b, look).unwrap().unwrap();
        assert_eq!(n, b.len());
        assert_eq!(
            r,
            Reply::Chunk { handle: 9, flags: 0, chunk: Chunk::OffsetData { offset: 1010, data: &[1, 2, 3] } }
        );
        // Data past the request's end.
        let mut p = 1099u64.to_be_bytes().to_vec();
        p.extend_from_slice(&[1, 2]);
        assert!(decode_reply(&chunk_bytes(0, chunk::OFFSET_DATA, 9, &p), look).is_err());
        // A chunk longer than the request + 8 is rejected from its header.
        let mut h = chunk_bytes(REPLY_FLAG_DONE, chunk::OFFSET_DATA, 9, &[]);
        h[16..20].copy_from_slice(&109u32.to_be_bytes());
        assert!(matches!(decode_reply(&h, look), Err(NbdError::BadReply { .. })));
        // Unknown handle.
        assert!(matches!(decode_reply(&chunk_bytes(1, 0, 8, &[]), look), Err(NbdError::UnknownHandle(8))));
        // NONE without DONE.
        assert!(decode_reply(&chunk_bytes(0, chunk::NONE, 9, &[]), look).is_err());
        // Hole.
        let mut p = 1000u64.to_be_bytes().to_vec();
        p.extend_from_slice(&100u32.to_be_bytes());
        let hb = chunk_bytes(1, chunk::OFFSET_HOLE, 9, &p);
        let (r, _) = decode_reply(&hb, look).unwrap().unwrap();
        assert_eq!(r, Reply::Chunk { handle: 9, flags: 1, chunk: Chunk::OffsetHole { offset: 1000, length: 100 } });
        // Error with offset.
        let mut p = 22u32.to_be_bytes().to_vec();
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(b"no");
        p.extend_from_slice(&1050u64.to_be_bytes());
        let eb = chunk_bytes(1, chunk::ERROR_OFFSET, 9, &p);
        let (r, _) = decode_reply(&eb, look).unwrap().unwrap();
        assert_eq!(
            r,
            Reply::Chunk {
                handle: 9,
                flags: 1,
                chunk: Chunk::Error {
                    chunk_type: chunk::ERROR_OFFSET,
                    code: 22,
                    message: "no".into(),
                    offset: Some(1050)
                }
            }
        );
        // Message length overrunning the chunk.
        let mut p = 22u32.to_be_bytes().to_vec();
        p.extend_from_slice(&200u16.to_be_bytes());
        assert!(decode_reply(&chunk_bytes(1, chunk::ERROR, 9, &p), look).is_err());
    }

    #[test]
    fn block_status_chunks() {
        let c = ctx(Command::BlockStatus, 0, 1 << 20);
        let look = |_| Some(c);
        let mut p = 1u32.to_be_bytes().to_vec();
        for (l, f) in [(4096u32, 0u32), (8192, 3)] {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        let bb = chunk_bytes(1, chunk::BLOCK_STATUS, 5, &p);
        let (r, _) = decode_reply(&bb, look).unwrap().unwrap();
        let Reply::Chunk { chunk: Chunk::BlockStatus { context_id, descriptors }, .. } = r else { panic!("{r:?}") };
        assert_eq!(context_id, 1);
        assert_eq!(
            descriptors,
            vec![BlockDescriptor { length: 4096, flags: 0 }, BlockDescriptor { length: 8192, flags: 3 }]
        );
        // Not 4 + 8n, no descriptor, a zero-length descriptor, too many.
        assert!(decode_reply(&chunk_bytes(1, chunk::BLOCK_STATUS, 5, &p[..11]), look).is_err());
        assert!(decode_reply(&chunk_bytes(1, chunk::BLOCK_STATUS, 5, &p[..4]), look).is_err());
        let mut z = p.clone();
        z[4..8].fill(0);
        assert!(decode_reply(&chunk_bytes(1, chunk::BLOCK_STATUS, 5, &z), look).is_err());
        let mut h = chunk_bytes(1, chunk::BLOCK_STATUS, 5, &[]);
        h[16..20].copy_from_slice(&(4 + 8 * (MAX_BLOCK_STATUS_DESCRIPTORS + 1)).to_be_bytes());
        assert!(decode_reply(&h, look).is_err());
        // Block status chunk in reply to a read.
        let r = ctx(Command::Read, 0, 4096);
        assert!(decode_reply(&chunk_bytes(1, chunk::BLOCK_STATUS, 5, &p), |_| Some(r)).is_err());
    }

    #[test]
    fn simple_replies() {
        let plain = ReplyContext { command: Command::Read, offset: 0, length: 4, structured: false };
        let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&3u64.to_be_bytes());
        assert_eq!(decode_reply(&b, |_| Some(plain)).unwrap(), None);
        b.extend_from_slice(&[9, 8, 7, 6, 5]);
        let (r, n) = decode_reply(&b, |_| Some(plain)).unwrap().unwrap();
        assert_eq!((r, n), (Reply::Simple { handle: 3, error: 0, data: &[9, 8, 7, 6] }, 20));
        // After structured replies, a successful simple reply to READ is invalid.
        assert!(decode_reply(&b, |_| Some(ctx(Command::Read, 0, 4))).is_err());
        // A structured chunk when structured replies were not negotiated.
        assert!(decode_reply(&chunk_bytes(1, 0, 3, &[]), |_| Some(plain)).is_err());
    }

    fn any_ctx() -> impl Strategy<Value = ReplyContext> {
        (0usize..7, any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(c, offset, length, structured)| {
            let command = [
                Command::Read,
                Command::Write,
                Command::Disc,
                Command::Flush,
                Command::Trim,
                Command::WriteZeroes,
                Command::BlockStatus,
            ][c];
            ReplyContext { command, offset, length, structured }
        })
    }

    /// Bytes that start like a reply more often than random ones do.
    fn replyish() -> impl Strategy<Value = Vec<u8>> {
        (0usize..3, any::<u16>(), 0u16..8, proptest::collection::vec(any::<u8>(), 0..200)).prop_map(
            |(kind, flags, ty, rest)| {
                let mut b = match kind {
                    0 => STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec(),
                    1 => SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec(),
                    _ => Vec::new(),
                };
                if kind == 0 {
                    b.extend_from_slice(&flags.to_be_bytes());
                    let t = if ty >= 6 { chunk::ERR_BIT | (ty - 5) } else { ty };
                    b.extend_from_slice(&t.to_be_bytes());
                }
                b.extend_from_slice(&rest);
                b
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn reply_decoder_never_panics(b in replyish(), c in any_ctx(), known in any::<bool>()) {
            if let Ok(Some((_, n))) = decode_reply(&b, |_| known.then_some(c)) {
                prop_assert!(n <= b.len());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300), c in any_ctx(), o in 0u32..12) {
            let _ = decode_reply(&b, |_| Some(c));
            let _ = Greeting::decode(&b);
            let _ = decode_option_reply(&b, o);
            if b.len() >= 2 {
                let ty = u16::from_be_bytes([b[0], b[1]]);
                let _ = decode_chunk_payload(&c, ty, &b[2..]);
            }
        }

        #[test]
        fn option_reply_decoder_never_panics(ty in any::<u32>(), o in 0u32..12, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&o.to_be_bytes());
            // Mostly the known reply types, sometimes anything.
            let ty = if ty & 0x100 == 0 { (ty & 7) | (ty & rep::ERR_BIT) } else { ty };
            r.extend_from_slice(&ty.to_be_bytes());
            r.extend_from_slice(&(data.len() as u32).to_be_bytes());
            r.extend_from_slice(&data);
            for n in 0..=r.len() {
                let _ = decode_option_reply(&r[..n], o);
            }
        }

        #[test]
        fn valid_data_chunk_roundtrips_at_any_split(off in 0u64..1000, len in 1u32..64, split in 0usize..100) {
            let c = ctx(Command::Read, 0, 2000);
            let mut p = off.to_be_bytes().to_vec();
            p.extend(std::iter::repeat_n(0xAB, len as usize));
            let b = chunk_bytes(REPLY_FLAG_DONE, chunk::OFFSET_DATA, 1, &p);
            let split = split.min(b.len());
            if split < b.len() {
                prop_assert_eq!(decode_reply(&b[..split], |_| Some(c)).unwrap(), None);
            }
            let (r, n) = decode_reply(&b, |_| Some(c)).unwrap().unwrap();
            prop_assert_eq!(n, b.len());
            prop_assert_eq!(r, Reply::Chunk { handle: 1, flags: 1, chunk: Chunk::OffsetData { offset: off, data: &p[8..] } });
        }
    }

    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/nbd_decoders");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            fuzz_decoders(&data);
            n += 1;
        }
        assert!(n >= 5, "corpus at {} has {n} files", dir.display());
    }
}
