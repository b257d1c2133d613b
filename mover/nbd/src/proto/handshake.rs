//! Negotiation messages: the server's greeting, the client's flags and option
//! requests, option replies (with NBD_REP_INFO payloads) and the reply to
//! NBD_OPT_EXPORT_NAME.

use std::fmt;

use super::{
    be16, be32, be64, info, opt, option_name, rep, utf8_lossy, CLISERV_MAGIC, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, GREETING_LEN, IHAVEOPT, MAX_OPTION_REPLY_LEN, MAX_STRING_LEN, NBDMAGIC,
    OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC,
};
use crate::NbdError;

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

impl fmt::Display for BlockSizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "min {} preferred {} max {}", self.minimum, self.preferred, self.maximum)
    }
}
