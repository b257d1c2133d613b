//! Encoding frames: header and body, little-endian, as laid out in PROTOCOL.md.
//!
//! DO NOT MODIFY: protocol v1, pinned by the golden vectors (see the `frame` module).

use bytes::{BufMut, Bytes, BytesMut};

use super::data::{INTENT_FIXED_LEN, INTENT_RUN_LEN};
use super::{encode_header, frame_type, Data, Frame, DATA_FIXED_LEN, HEADER_LEN};

impl Frame {
    /// Encode the frame (header and body) at the end of `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        if let Frame::Data(d) = self {
            d.encode_head(dst);
            dst.extend_from_slice(&d.payload);
            return;
        }
        let start = dst.len();
        dst.put_bytes(0, HEADER_LEN);
        self.encode_body(dst);
        let body_len = dst.len() - start - HEADER_LEN;
        let header = encode_header(self.frame_type(), self.flags(), body_len as u32);
        dst[start..start + HEADER_LEN].copy_from_slice(&header);
    }

    /// Encode the frame into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }

    fn encode_body(&self, b: &mut BytesMut) {
        match self {
            Frame::Hello(h) => {
                b.put_u16_le(h.version_min);
                b.put_u16_le(h.version_max);
                b.put_u64_le(h.features);
                b.put_slice(&h.nonce);
                put_str(b, &h.peer_name);
                put_str(b, &h.software);
            }
            Frame::Welcome(w) => {
                b.put_u16_le(w.version);
                b.put_u64_le(w.features);
                b.put_slice(&w.nonce);
                put_str(b, &w.peer_name);
                put_str(b, &w.software);
            }
            Frame::AuthProof(a) => b.put_slice(&a.proof),
            Frame::AuthOk(a) => b.put_slice(&a.proof),
            Frame::OpenReplica(o) => {
                put_str(b, &o.replica);
                b.put_i64_le(o.point_time_ns);
                b.put_slice(&o.session_id);
                b.put_u32_le(o.retain);
                b.put_u8(o.flags);
            }
            Frame::ReplicaOpened(r) => {
                b.put_slice(&r.session_id);
                b.put_u8(r.resumed as u8);
                b.put_u64_le(r.latest_point);
                b.put_i64_le(r.latest_point_time_ns);
                b.put_u32_le(r.chunk_size);
                b.put_i64_le(r.pending_point_time_ns);
            }
            Frame::OpenDisk(o) => {
                b.put_u32_le(o.disk);
                put_str(b, &o.name);
                b.put_u64_le(o.size);
                b.put_u32_le(o.chunk_size);
                b.put_u8(o.mode as u8);
            }
            Frame::ResumeInfo(r) => {
                b.put_u32_le(r.disk);
                b.put_u64_le(r.previous_size);
                b.put_u64_le(r.next_chunk);
                b.put_u8(r.flags);
            }
            Frame::DigestMapRequest(r) => {
                b.put_u32_le(r.disk);
                b.put_slice(&r.cached_map_hash);
            }
            Frame::DigestMapPart(p) => {
                b.put_u32_le(p.disk);
                b.put_u64_le(p.first_chunk);
                b.put_u32_le(p.count() as u32);
                b.put_slice(&p.digests);
            }
            Frame::DigestMapEnd(e) => {
                b.put_u32_le(e.disk);
                b.put_u64_le(e.chunk_count);
                b.put_slice(&e.map_hash);
                b.put_u8(e.cache_hit as u8);
            }
            Frame::Data(_) => unreachable!("data frames are encoded by encode_head"),
            Frame::ZeroRun(z) => {
                b.put_u32_le(z.disk);
                b.put_u64_le(z.first_chunk);
                b.put_u64_le(z.count);
            }
            Frame::Flush(f) => {
                b.put_u32_le(f.disk);
                b.put_u64_le(f.next_chunk);
            }
            Frame::Checkpoint(c) => {
                b.put_u32_le(c.disk);
                b.put_u64_le(c.next_chunk);
            }
            Frame::Intent(i) => {
                b.reserve(INTENT_FIXED_LEN + INTENT_RUN_LEN * i.runs.len());
                b.put_u32_le(i.disk);
                b.put_u32_le(i.runs.len() as u32);
                for run in &i.runs {
                    b.put_u64_le(run.first_chunk);
                    b.put_u32_le(run.count);
                }
            }
            Frame::Commit(c) => b.put_u32_le(c.disk_count),
            Frame::Committed(c) => {
                b.put_u64_le(c.point_id);
                b.put_i64_le(c.point_time_ns);
            }
            Frame::Progress(p) => {
                b.put_u32_le(p.disk);
                b.put_u64_le(p.bytes_done);
            }
            Frame::Keepalive | Frame::Close | Frame::Unknown { .. } => {}
            Frame::Notice(n) => {
                b.put_u8(n.level as u8);
                put_str(b, &n.message);
            }
            Frame::Error(e) => {
                b.put_u16_le(e.code.to_u16());
                put_str(b, &e.message);
            }
            Frame::Join(j) => {
                b.put_slice(&j.ticket);
                b.put_u16_le(j.stream);
            }
            Frame::Joined(j) => b.put_u16_le(j.stream),
            Frame::OpenStreams(o) => b.put_u16_le(o.count),
            Frame::StreamTicket(t) => {
                b.put_slice(&t.ticket);
                b.put_u16_le(t.count);
            }
            Frame::Seq(q) => b.put_u64_le(q.seq),
        }
    }
}

impl Data {
    /// Encode the frame header and fixed fields of this data frame, but not
    /// its payload, so a sender can write head and payload with one vectored
    /// write and never copy the payload.
    pub fn encode_head(&self, dst: &mut BytesMut) {
        let body_len = DATA_FIXED_LEN + self.payload.len();
        dst.put_slice(&encode_header(frame_type::DATA, 0, body_len as u32));
        dst.put_u32_le(self.disk);
        dst.put_u64_le(self.chunk);
        dst.put_u32_le(self.logical_len);
        dst.put_u8(self.codec as u8);
        dst.put_slice(&self.digest);
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
}
