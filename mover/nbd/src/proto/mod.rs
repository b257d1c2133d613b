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
//!
//! This file holds the constants, the commands and the names used in errors;
//! the messages are in one file per family, re-exported here:
//! `handshake.rs` (greeting, option requests and replies), `transmission.rs`
//! (request headers, reply headers and the context a reply is checked
//! against) and `structured.rs` (structured reply chunks and whole replies).

mod handshake;
mod structured;
mod transmission;

pub use handshake::{
    decode_export_name_reply, decode_option_reply, encode_client_flags, BlockSizes, Greeting, InfoReply, OptionReply,
    OptionRequest,
};
pub use structured::{
    check_chunk_header, decode_chunk_payload, decode_data_offset, decode_reply, BlockDescriptor, Chunk, Reply,
};
pub use transmission::{ReplyContext, ReplyHeader, Request};

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

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

pub(crate) fn utf8_lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Fuzzing entry point (used by `mover/nbd/fuzz` and by a stable test that
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
    use crate::NbdError;
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
