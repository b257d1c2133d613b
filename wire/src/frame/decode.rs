//! Decoding frame bodies: each frame's fields in order, every one
//! bounds-checked, every length against its limit before it is read, every
//! enumerated value against its domain.
//!
//! DO NOT MODIFY: protocol v1, pinned by the golden vectors (see the `frame` module).

use bytes::Bytes;

use super::data::{check_intent_run_count, check_intent_runs, INTENT_RUN_LEN};
use super::reader::Reader;
use super::*;
use crate::chunk::{validate_chunk_size, MAX_CHUNK_SIZE};
use crate::error::WireError;

impl Frame {
    /// Decode one frame body. `frame_type` and `flags` come from the header.
    pub fn decode_body(ty: u8, flags: u8, body: Bytes) -> Result<Frame, WireError> {
        use super::frame_type as t;
        let name = type_name(ty);
        if flags & FLAGS_RESERVED != 0 {
            return Err(WireError::ReservedFlags { frame: name, flags });
        }
        let mut r = Reader::new(body, name);
        let frame = match ty {
            t::HELLO => Frame::Hello(Hello::decode(&mut r)?),
            t::WELCOME => Frame::Welcome(Welcome::decode(&mut r)?),
            t::AUTH_PROOF => Frame::AuthProof(AuthProof { proof: r.array("proof")? }),
            t::AUTH_OK => Frame::AuthOk(AuthOk { proof: r.array("proof")? }),
            t::OPEN_REPLICA => Frame::OpenReplica(OpenReplica::decode(&mut r)?),
            t::REPLICA_OPENED => Frame::ReplicaOpened(ReplicaOpened::decode(&mut r)?),
            t::OPEN_DISK => Frame::OpenDisk(OpenDisk::decode(&mut r)?),
            t::RESUME_INFO => Frame::ResumeInfo(ResumeInfo::decode(&mut r)?),
            t::DIGEST_MAP_REQUEST => Frame::DigestMapRequest(DigestMapRequest {
                disk: r.u32("disk")?,
                cached_map_hash: r.array("cached_map_hash")?,
            }),
            t::DIGEST_MAP_PART => Frame::DigestMapPart(DigestMapPart::decode(&mut r)?),
            t::DIGEST_MAP_END => Frame::DigestMapEnd(DigestMapEnd {
                disk: r.u32("disk")?,
                chunk_count: r.u64("chunk_count")?,
                map_hash: r.array("map_hash")?,
                cache_hit: r.bool("cache_hit")?,
            }),
            t::DATA => {
                let payload_len = r.remaining().saturating_sub(DATA_FIXED_LEN);
                let head = DataHead::decode(&mut r, payload_len)?;
                Frame::Data(head.with_payload(r.rest()))
            }
            t::ZERO_RUN => Frame::ZeroRun(ZeroRun::decode(&mut r)?),
            t::FLUSH => Frame::Flush(Flush { disk: r.u32("disk")?, next_chunk: r.u64("next_chunk")? }),
            t::CHECKPOINT => Frame::Checkpoint(Checkpoint { disk: r.u32("disk")?, next_chunk: r.u64("next_chunk")? }),
            t::INTENT => Frame::Intent(Intent::decode(&mut r)?),
            t::COMMIT => Frame::Commit(Commit { disk_count: r.u32("disk_count")? }),
            t::COMMITTED => {
                Frame::Committed(Committed { point_id: r.u64("point_id")?, point_time_ns: r.i64("point_time_ns")? })
            }
            t::PROGRESS => Frame::Progress(Progress { disk: r.u32("disk")?, bytes_done: r.u64("bytes_done")? }),
            t::KEEPALIVE => Frame::Keepalive,
            t::NOTICE => Frame::Notice(Notice {
                level: match r.u8("level")? {
                    0 => NoticeLevel::Info,
                    1 => NoticeLevel::Warning,
                    v => return Err(WireError::InvalidValue { frame: "Notice", field: "level", value: v.into() }),
                },
                message: r.string("message", MAX_MESSAGE_LEN)?,
            }),
            t::ERROR => Frame::Error(ErrorFrame {
                code: ErrorCode::from_u16(r.u16("code")?),
                message: r.string("message", MAX_MESSAGE_LEN)?,
            }),
            t::CLOSE => Frame::Close,
            t::JOIN => Frame::Join(Join { ticket: r.array("ticket")?, stream: r.u16("stream")? }),
            t::JOINED => Frame::Joined(Joined { stream: r.u16("stream")? }),
            t::OPEN_STREAMS => Frame::OpenStreams(OpenStreams { count: stream_count("OpenStreams", r.u16("count")?)? }),
            t::STREAM_TICKET => Frame::StreamTicket(StreamTicket {
                ticket: r.array("ticket")?,
                count: stream_count("StreamTicket", r.u16("count")?)?,
            }),
            t::SEQ => Frame::Seq(Seq { seq: r.u64("seq")? }),
            other => {
                if flags & FLAG_OPTIONAL != 0 {
                    return Ok(Frame::Unknown { frame_type: other });
                }
                return Err(WireError::UnknownFrameType(other));
            }
        };
        r.finish()?;
        Ok(frame)
    }
}

impl Hello {
    fn decode(r: &mut Reader) -> Result<Hello, WireError> {
        Ok(Hello {
            version_min: r.u16("version_min")?,
            version_max: r.u16("version_max")?,
            features: r.u64("features")?,
            nonce: r.array("nonce")?,
            peer_name: r.string("peer_name", MAX_NAME_LEN)?,
            software: r.string("software", MAX_SOFTWARE_LEN)?,
        })
    }
}

impl Welcome {
    fn decode(r: &mut Reader) -> Result<Welcome, WireError> {
        Ok(Welcome {
            version: r.u16("version")?,
            features: r.u64("features")?,
            nonce: r.array("nonce")?,
            peer_name: r.string("peer_name", MAX_NAME_LEN)?,
            software: r.string("software", MAX_SOFTWARE_LEN)?,
        })
    }
}

impl OpenReplica {
    fn decode(r: &mut Reader) -> Result<OpenReplica, WireError> {
        Ok(OpenReplica {
            replica: r.string("replica", MAX_NAME_LEN)?,
            point_time_ns: r.i64("point_time_ns")?,
            session_id: r.array("session_id")?,
            retain: r.u32("retain")?,
            flags: {
                let f = r.u8("flags")?;
                if f & !OpenReplica::PLAN_ONLY != 0 {
                    return Err(WireError::InvalidValue { frame: r.frame, field: "flags", value: f.into() });
                }
                f
            },
        })
    }
}

impl ReplicaOpened {
    fn decode(r: &mut Reader) -> Result<ReplicaOpened, WireError> {
        Ok(ReplicaOpened {
            session_id: r.array("session_id")?,
            resumed: r.bool("resumed")?,
            latest_point: r.u64("latest_point")?,
            latest_point_time_ns: r.i64("latest_point_time_ns")?,
            chunk_size: {
                let c = r.u32("chunk_size")?;
                if c != 0 {
                    check_chunk_size(r.frame, c)?;
                }
                c
            },
            pending_point_time_ns: r.i64("pending_point_time_ns")?,
        })
    }
}

impl OpenDisk {
    fn decode(r: &mut Reader) -> Result<OpenDisk, WireError> {
        Ok(OpenDisk {
            disk: r.u32("disk")?,
            name: r.string("name", MAX_NAME_LEN)?,
            size: r.u64("size")?,
            chunk_size: {
                let c = r.u32("chunk_size")?;
                check_chunk_size(r.frame, c)?;
                c
            },
            mode: {
                let m = r.u8("mode")?;
                Mode::from_u8(m).ok_or(WireError::InvalidValue { frame: r.frame, field: "mode", value: m.into() })?
            },
        })
    }
}

impl ResumeInfo {
    fn decode(r: &mut Reader) -> Result<ResumeInfo, WireError> {
        Ok(ResumeInfo {
            disk: r.u32("disk")?,
            previous_size: r.u64("previous_size")?,
            next_chunk: r.u64("next_chunk")?,
            flags: {
                let f = r.u8("flags")?;
                if f & !(ResumeInfo::EXISTED | ResumeInfo::FINISHED) != 0 {
                    return Err(WireError::InvalidValue { frame: r.frame, field: "flags", value: f.into() });
                }
                f
            },
        })
    }
}

impl DigestMapPart {
    fn decode(r: &mut Reader) -> Result<DigestMapPart, WireError> {
        let disk = r.u32("disk")?;
        let first_chunk = r.u64("first_chunk")?;
        let count = r.u32("count")? as usize;
        if count > MAX_DIGESTS_PER_PART {
            return Err(WireError::FieldTooLong {
                frame: r.frame,
                field: "count",
                len: count as u64,
                max: MAX_DIGESTS_PER_PART as u64,
            });
        }
        let digests = r.bytes("digests", count * DIGEST_LEN)?;
        Ok(DigestMapPart { disk, first_chunk, digests })
    }
}

impl DataHead {
    /// Read the fixed fields of a data frame whose payload is `payload_len` bytes,
    /// and check them and that length.
    pub(super) fn decode(r: &mut Reader, payload_len: usize) -> Result<DataHead, WireError> {
        let name = r.frame;
        let disk = r.u32("disk")?;
        let chunk = r.u64("chunk")?;
        let logical_len = r.u32("logical_len")?;
        if logical_len == 0 || logical_len > MAX_CHUNK_SIZE {
            return Err(WireError::InvalidValue { frame: name, field: "logical_len", value: logical_len.into() });
        }
        let c = r.u8("codec")?;
        let codec =
            Codec::from_u8(c).ok_or(WireError::InvalidValue { frame: name, field: "codec", value: c.into() })?;
        let digest = r.array("digest")?;
        // The sender refuses payloads above a chunk (a zstd frame that does not
        // shrink the chunk is sent raw instead); refuse them here too.
        if payload_len > MAX_CHUNK_SIZE as usize {
            return Err(WireError::FieldTooLong {
                frame: name,
                field: "payload",
                len: payload_len as u64,
                max: MAX_CHUNK_SIZE.into(),
            });
        }
        if codec == Codec::None && payload_len != logical_len as usize {
            return Err(WireError::InvalidValue { frame: name, field: "payload length", value: payload_len as u64 });
        }
        if codec == Codec::ZstdStream && payload_len <= STREAM_HEADER_LEN {
            return Err(WireError::InvalidValue { frame: name, field: "payload length", value: payload_len as u64 });
        }
        if payload_len == 0 {
            return Err(WireError::Truncated { frame: name, field: "payload" });
        }
        Ok(DataHead { disk, chunk, logical_len, codec, digest, payload_len: payload_len as u32 })
    }
}

impl ZeroRun {
    fn decode(r: &mut Reader) -> Result<ZeroRun, WireError> {
        let z = ZeroRun { disk: r.u32("disk")?, first_chunk: r.u64("first_chunk")?, count: r.u64("count")? };
        if z.count == 0 {
            return Err(WireError::InvalidValue { frame: r.frame, field: "count", value: 0 });
        }
        Ok(z)
    }
}

impl Intent {
    fn decode(r: &mut Reader) -> Result<Intent, WireError> {
        let disk = r.u32("disk")?;
        let count = r.u32("count")? as usize;
        check_intent_run_count(count)?;
        // Every run is in the body before anything is allocated for them.
        r.need(count * INTENT_RUN_LEN, "runs")?;
        let mut runs = Vec::with_capacity(count);
        for _ in 0..count {
            runs.push(ChunkRun { first_chunk: r.u64("first_chunk")?, count: r.u32("count")? });
        }
        check_intent_runs(&runs)?;
        Ok(Intent { disk, runs })
    }
}

impl Mode {
    fn from_u8(v: u8) -> Option<Mode> {
        Some(match v {
            0 => Mode::Full,
            1 => Mode::Cbt,
            2 => Mode::Digest,
            3 => Mode::Seed,
            _ => return None,
        })
    }
}

impl Codec {
    fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::ZstdStream),
            _ => None,
        }
    }
}

/// A count of connections: 1 ..= MAX_STREAMS.
fn stream_count(frame: &'static str, n: u16) -> Result<u16, WireError> {
    if n == 0 || n > MAX_STREAMS {
        return Err(WireError::InvalidValue { frame, field: "count", value: n.into() });
    }
    Ok(n)
}

fn check_chunk_size(frame: &'static str, c: u32) -> Result<(), WireError> {
    validate_chunk_size(c).map_err(|_| WireError::InvalidValue { frame, field: "chunk_size", value: c.into() })
}
