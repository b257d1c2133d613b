//! The request/reply engine: requests in flight and where their replies go,
//! sending (queued headers and payloads), and receiving replies (simple or
//! structured chunks) into the waiting request's buffer, in any order.

use std::collections::BTreeMap;

use super::transport::write_all_vectored;
use super::{command_error, map_io, Completion, NbdClient, OwnedBuf, Ready};
use crate::proto::{self, chunk, BlockDescriptor, Chunk, Command, ReplyContext, ReplyHeader, Request, REPLY_FLAG_DONE};
use crate::NbdError;

/// Where a request's reply goes.
pub(super) enum Target {
    /// No data (WRITE, TRIM, ...).
    None,
    /// A READ into a buffer owned by the pending entry (`submit_read*`).
    Owned(Box<dyn OwnedBuf>),
    /// A READ into the caller's buffer passed to `wait_for`, from `start`.
    Borrowed { start: usize },
    /// A BLOCK_STATUS for one context id.
    BlockStatus { context_id: u32, descriptors: Option<Vec<BlockDescriptor>> },
    /// No data; the completion goes to `wait_detached` (`submit_write`).
    Detached,
}

pub(super) struct Pending {
    pub(super) req: Request,
    pub(super) target: Target,
    pub(super) error: Option<NbdError>,
    /// READ: byte ranges already filled (start -> end), to reject overlaps.
    filled: BTreeMap<u64, u64>,
    filled_len: u64,
}

impl Pending {
    fn add_filled(&mut self, ctx: &ReplyContext, start: u64, len: u64) -> Result<(), NbdError> {
        let end = start + len;
        let overlaps_prev = self.filled.range(..=start).next_back().is_some_and(|(_, &e)| e > start);
        let overlaps_next = self.filled.range(start..).next().is_some_and(|(&s, _)| s < end);
        if overlaps_prev || overlaps_next {
            return Err(ctx.bad_reply(format!("content chunk [{start}, +{len}) overlaps an earlier chunk")));
        }
        self.filled.insert(start, end);
        self.filled_len += len;
        Ok(())
    }
}

impl NbdClient {
    pub(super) fn check_usable(&self) -> Result<(), NbdError> {
        match &self.broken {
            Some(m) => Err(NbdError::Broken(m.clone())),
            None => Ok(()),
        }
    }

    pub(super) fn check_range(&self, op: Command, offset: u64, len: u64) -> Result<(), NbdError> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.size) {
            return Err(NbdError::InvalidArgument(format!(
                "{} offset {offset} length {len} beyond the export size {}",
                op.name(),
                self.size
            )));
        }
        let min = self.block_sizes.minimum as u64;
        if min > 1 && (offset % min != 0 || len % min != 0) {
            return Err(NbdError::InvalidArgument(format!(
                "{} offset {offset} length {len} not aligned to the server's minimum block size {min}",
                op.name()
            )));
        }
        Ok(())
    }

    pub(super) fn check_writable(&self, op: Command) -> Result<(), NbdError> {
        if self.is_read_only() {
            return Err(NbdError::Unsupported(format!("{}: the export is read-only", op.name())));
        }
        Ok(())
    }

    /// Queues a request (and sends it with `payload` if it carries one).
    pub(super) fn submit(&mut self, req: Request, payload: Option<&[u8]>, target: Target) -> Result<u64, NbdError> {
        self.check_usable()?;
        self.sbuf.extend_from_slice(&req.encode());
        self.pending.insert(req.handle, Pending { req, target, error: None, filled: BTreeMap::new(), filled_len: 0 });
        if payload.is_some() || self.sbuf.len() >= 4096 {
            self.flush_send(payload, &req)?;
        }
        Ok(req.handle)
    }

    pub(super) fn new_request(&mut self, command: Command, flags: u16, offset: u64, length: u32) -> Request {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        Request { flags, command, handle, offset, length }
    }

    /// Writes the queued request headers and an optional payload.
    pub(super) fn flush_send(&mut self, payload: Option<&[u8]>, req: &Request) -> Result<(), NbdError> {
        let r = write_all_vectored(&mut self.stream, &self.sbuf, payload.unwrap_or(&[]));
        self.sbuf.clear();
        if let Err(e) = r {
            let err = map_io(
                e,
                || format!("sending {} offset {} length {}", req.command.name(), req.offset, req.length),
                self.opts.timeout,
            );
            self.broken = Some(err.to_string());
            return Err(err);
        }
        Ok(())
    }

    pub(super) fn flush_queued(&mut self) -> Result<(), NbdError> {
        if self.sbuf.is_empty() {
            return Ok(());
        }
        let req = Request { flags: 0, command: Command::Read, handle: 0, offset: 0, length: 0 };
        self.flush_send(None, &req)
    }

    /// Receives replies until `handle` completes; returns its entry. Read
    /// data of `Target::Borrowed` requests goes into `dst`.
    pub(super) fn wait_for(&mut self, handle: u64, mut dst: Option<&mut [u8]>) -> Result<Pending, NbdError> {
        loop {
            if let Some(p) = self.done.remove(&handle) {
                return Ok(p);
            }
            if !self.pending.contains_key(&handle) {
                return Err(NbdError::InvalidArgument(format!("handle {handle:#x} is not in flight")));
            }
            self.check_usable()?;
            self.flush_queued()?;
            let r = self.recv_one(dst.as_deref_mut());
            match r {
                Ok(Some(p)) => {
                    if p.req.handle == handle {
                        return Ok(p);
                    }
                    self.park(p);
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken = Some(e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// Stores a completed request nobody is waiting for yet.
    pub(super) fn park(&mut self, p: Pending) {
        if let Target::Detached = p.target {
            self.detached.push_back(Completion {
                handle: p.req.handle,
                offset: p.req.offset,
                length: p.req.length,
                result: p.error.map_or(Ok(()), Err),
            });
        } else if let Target::Owned(_) = p.target {
            let Pending { req, target, error, .. } = p;
            let Target::Owned(buf) = target else { return };
            self.ready.push_back(Ready {
                handle: req.handle,
                offset: req.offset,
                buf,
                result: error.map_or(Ok(()), Err),
            });
        } else {
            self.done.insert(p.req.handle, p);
        }
    }

    /// Reads one reply message; returns the request it completed, if any.
    pub(super) fn recv_one(&mut self, dst: Option<&mut [u8]>) -> Result<Option<Pending>, NbdError> {
        let timeout = self.opts.timeout;
        let in_flight = self.pending.len();
        let waiting = || format!("waiting for a reply ({in_flight} requests in flight)");
        self.rbuf.fill_to(&mut self.stream, 4).map_err(|e| map_io(e, waiting, timeout))?;
        let need = ReplyHeader::needed(self.rbuf.data())?;
        self.rbuf.fill_to(&mut self.stream, need).map_err(|e| map_io(e, waiting, timeout))?;
        let (header, n) = ReplyHeader::decode(self.rbuf.data())?
            .ok_or_else(|| NbdError::BadHandshake("reply header incomplete".into()))?;
        self.rbuf.consume(n);
        let handle = header.handle();
        let p = self.pending.get_mut(&handle).ok_or(NbdError::UnknownHandle(handle))?;
        let req = p.req;
        let ctx = req.context(self.structured);
        let reading =
            || format!("reading the reply to {} offset {} length {}", req.command.name(), req.offset, req.length);
        let done = match header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    p.error.get_or_insert(command_error(&req, error, String::new()));
                } else if req.command == Command::Read {
                    if self.structured {
                        return Err(ctx.bad_reply("successful simple reply to READ after structured replies"));
                    }
                    let len = req.length as usize;
                    let d = data_dest(&mut p.target, dst, 0, len, &ctx)?;
                    self.rbuf.read_exact_into(&mut self.stream, d).map_err(|e| map_io(e, reading, timeout))?;
                    p.filled_len = req.length as u64;
                }
                true
            }
            ReplyHeader::Structured { flags, chunk_type, length, .. } => {
                proto::check_chunk_header(&ctx, flags, chunk_type, length)?;
                if chunk_type == chunk::OFFSET_DATA {
                    let mut o = [0u8; 8];
                    self.rbuf.read_exact_into(&mut self.stream, &mut o).map_err(|e| map_io(e, reading, timeout))?;
                    let (off, dlen) = proto::decode_data_offset(&ctx, length, &o)?;
                    p.add_filled(&ctx, off, dlen as u64)?;
                    let rel = (off - req.offset) as usize;
                    let d = data_dest(&mut p.target, dst, rel, dlen as usize, &ctx)?;
                    self.rbuf.read_exact_into(&mut self.stream, d).map_err(|e| map_io(e, reading, timeout))?;
                } else {
                    // Bounded by check_chunk_header.
                    let mut payload = vec![0u8; length as usize];
                    self.rbuf
                        .read_exact_into(&mut self.stream, &mut payload)
                        .map_err(|e| map_io(e, reading, timeout))?;
                    match proto::decode_chunk_payload(&ctx, chunk_type, &payload)? {
                        Chunk::None => {}
                        Chunk::OffsetData { .. } => {}
                        Chunk::OffsetHole { offset, length } => {
                            p.add_filled(&ctx, offset, length as u64)?;
                            let rel = (offset - req.offset) as usize;
                            data_dest(&mut p.target, dst, rel, length as usize, &ctx)?.fill(0);
                        }
                        Chunk::BlockStatus { context_id, descriptors } => {
                            if let Target::BlockStatus { context_id: want, descriptors: got } = &mut p.target {
                                if context_id == *want {
                                    if got.is_some() {
                                        return Err(
                                            ctx.bad_reply(format!("two BLOCK_STATUS chunks for context {want}"))
                                        );
                                    }
                                    *got = Some(descriptors);
                                } else if !self.contexts.iter().any(|(_, id)| *id == context_id) {
                                    return Err(
                                        ctx.bad_reply(format!("BLOCK_STATUS for unknown context id {context_id}"))
                                    );
                                }
                            }
                        }
                        Chunk::Error { chunk_type, code, message, offset } => {
                            let message = match offset {
                                Some(o) => format!("{message} (at offset {o})"),
                                None if chunk_type != chunk::ERROR && chunk_type != chunk::ERROR_OFFSET => {
                                    format!("{message} (error chunk type {chunk_type:#06x})")
                                }
                                None => message,
                            };
                            let code = if code == 0 { 5 } else { code };
                            p.error.get_or_insert(command_error(&req, code, message));
                        }
                    }
                }
                flags & REPLY_FLAG_DONE != 0
            }
        };
        if !done {
            return Ok(None);
        }
        let p = self.pending.remove(&handle).ok_or(NbdError::UnknownHandle(handle))?;
        if p.error.is_none() {
            match (&p.target, req.command) {
                (_, Command::Read) if p.filled_len != req.length as u64 => {
                    return Err(ctx.bad_reply(format!("reply covers {} of {} bytes", p.filled_len, req.length)));
                }
                (Target::BlockStatus { descriptors: None, .. }, _) => {
                    return Err(ctx.bad_reply("no BLOCK_STATUS chunk for the requested context"));
                }
                _ => {}
            }
        }
        Ok(Some(p))
    }
}

/// The destination of `len` read bytes at `rel` within the request.
fn data_dest<'a>(
    target: &'a mut Target,
    dst: Option<&'a mut [u8]>,
    rel: usize,
    len: usize,
    ctx: &ReplyContext,
) -> Result<&'a mut [u8], NbdError> {
    let (buf, start) = match target {
        Target::Owned(v) => (v.bytes(), 0),
        Target::Borrowed { start } => match dst {
            Some(d) => (d, *start),
            None => return Err(ctx.bad_reply("internal: read data without a destination buffer")),
        },
        _ => return Err(ctx.bad_reply("read data for a request that reads nothing")),
    };
    buf.get_mut(start + rel..start + rel + len).ok_or_else(|| ctx.bad_reply("read data outside the buffer"))
}
