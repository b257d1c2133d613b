//! The high-level API over the engine: owned and borrowed reads, detached
//! and waited-for writes, zeroing and trimming, flush, block status and
//! extents, and disconnecting.

use std::collections::VecDeque;

use super::engine::Target;
use super::{Completion, Extent, NbdClient, ReadCompletion, MAX_ZERO_TRIM_LEN};
use crate::proto::{tflags, Command};
use crate::NbdError;

impl NbdClient {
    /// Starts reading `buf.len()` bytes at `offset` into `buf` (at most
    /// [`NbdClient::max_request_len`]). Returns the handle; the buffer comes
    /// back from [`NbdClient::wait_read`].
    pub fn submit_read(&mut self, offset: u64, buf: Vec<u8>) -> Result<u64, NbdError> {
        self.submit_read_buf(offset, buf)
    }

    /// Like [`NbdClient::submit_read`] for any owned buffer: reads
    /// `buf.as_mut().len()` bytes at `offset` straight into it. The buffer
    /// comes back from [`NbdClient::wait_read_buf`] with the same type `B`
    /// (every owned read in flight at once should use one buffer type).
    pub fn submit_read_buf<B: AsMut<[u8]> + Send + 'static>(
        &mut self,
        offset: u64,
        mut buf: B,
    ) -> Result<u64, NbdError> {
        self.check_usable()?;
        let len = buf.as_mut().len();
        self.check_range(Command::Read, offset, len as u64)?;
        if len > self.max_request_len() as usize || len == 0 {
            return Err(NbdError::InvalidArgument(format!(
                "read of {len} bytes: must be 1..={} bytes",
                self.max_request_len()
            )));
        }
        let req = self.new_request(Command::Read, 0, offset, len as u32);
        let h = self.submit(req, None, Target::Owned(Box::new(buf)))?;
        self.owned_reads += 1;
        Ok(h)
    }

    /// Reads submitted with [`NbdClient::submit_read`] and not yet returned.
    pub fn reads_in_flight(&self) -> usize {
        self.owned_reads
    }

    /// Waits for the next completed [`NbdClient::submit_read`] (any order).
    /// A server error fails only that read (in `result`); a connection error
    /// is returned as `Err`.
    pub fn wait_read(&mut self) -> Result<ReadCompletion, NbdError> {
        self.wait_read_buf::<Vec<u8>>()
    }

    /// [`NbdClient::wait_read`] for reads submitted with
    /// [`NbdClient::submit_read_buf`] with buffers of type `B`. If the next
    /// completed read holds another buffer type, it stays queued and this
    /// returns [`NbdError::InvalidArgument`].
    pub fn wait_read_buf<B: 'static>(&mut self) -> Result<ReadCompletion<B>, NbdError> {
        loop {
            if let Some(c) = self.ready.front() {
                if !c.buf.is(std::any::TypeId::of::<B>()) {
                    return Err(NbdError::InvalidArgument(format!(
                        "wait_read_buf::<{}>: the next completed read holds another buffer type",
                        std::any::type_name::<B>()
                    )));
                }
                let c = self.ready.pop_front().expect("front exists");
                self.owned_reads -= 1;
                let buf = *c.buf.into_any().downcast::<B>().expect("type checked above");
                return Ok(ReadCompletion { handle: c.handle, offset: c.offset, buf, result: c.result });
            }
            if self.owned_reads == 0 {
                return Err(NbdError::InvalidArgument("wait_read with no read in flight".into()));
            }
            self.check_usable()?;
            self.flush_queued()?;
            match self.recv_one(None) {
                Ok(Some(p)) => self.park(p),
                Ok(None) => {}
                Err(e) => {
                    self.broken = Some(e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// Reads many ranges with up to `max_in_flight` requests in flight and
    /// hands each piece to `sink(offset, data)` as it completes (in
    /// completion order, not offset order). Ranges longer than
    /// [`NbdClient::max_request_len`] are split. Buffers are reused.
    pub fn read_many<E: From<NbdError>>(
        &mut self,
        ranges: &[(u64, u64)],
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let max = self.max_request_len() as u64;
        let depth = self.opts.max_in_flight.max(1);
        let mut parts = ranges
            .iter()
            .flat_map(|&(off, len)| (0..len.div_ceil(max)).map(move |i| (off + i * max, (len - i * max).min(max))));
        let mut free: Vec<Vec<u8>> = Vec::new();
        let mut mine = 0usize;
        let mut exhausted = false;
        let base = self.owned_reads;
        if base != 0 {
            return Err(NbdError::InvalidArgument("read_many with submit_read requests in flight".into()).into());
        }
        loop {
            while !exhausted && mine < depth {
                match parts.next() {
                    Some((off, len)) => {
                        let mut buf = free.pop().unwrap_or_default();
                        buf.resize(len as usize, 0);
                        self.submit_read(off, buf)?;
                        mine += 1;
                    }
                    None => exhausted = true,
                }
            }
            if mine == 0 {
                return Ok(());
            }
            let c = self.wait_read()?;
            mine -= 1;
            c.result?;
            sink(c.offset, &c.buf)?;
            free.push(c.buf);
        }
    }

    /// Reads `buf.len()` bytes at `offset`, with up to `max_in_flight`
    /// requests in flight; the data lands directly in `buf`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_usable()?;
        self.check_range(Command::Read, offset, buf.len() as u64)?;
        let max = self.max_request_len() as usize;
        let total = buf.len();
        let mut handles = VecDeque::new();
        let mut pos = 0usize;
        let mut first_err = None;
        while pos < total || !handles.is_empty() {
            while pos < total && handles.len() < self.opts.max_in_flight.max(1) && first_err.is_none() {
                let len = (total - pos).min(max);
                let req = self.new_request(Command::Read, 0, offset + pos as u64, len as u32);
                handles.push_back(self.submit(req, None, Target::Borrowed { start: pos })?);
                pos += len;
            }
            let Some(h) = handles.pop_front() else { break };
            let p = self.wait_for(h, Some(buf))?;
            if let Some(e) = p.error {
                first_err.get_or_insert(e);
            }
            if first_err.is_some() && pos < total {
                pos = total;
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Sends a WRITE of `buf` at `offset` (1..=[`NbdClient::max_request_len`]
    /// bytes) and returns without waiting for the reply: the payload is on
    /// the socket when this returns, so `buf` may be reused at once. The
    /// reply comes back from [`NbdClient::wait_detached`]; a caller keeps
    /// its own bound on how many are in flight.
    pub fn submit_write(&mut self, offset: u64, buf: &[u8]) -> Result<u64, NbdError> {
        self.check_usable()?;
        self.check_writable(Command::Write)?;
        self.check_range(Command::Write, offset, buf.len() as u64)?;
        if buf.is_empty() || buf.len() > self.max_request_len() as usize {
            return Err(NbdError::InvalidArgument(format!(
                "write of {} bytes: must be 1..={} bytes",
                buf.len(),
                self.max_request_len()
            )));
        }
        let req = self.new_request(Command::Write, 0, offset, buf.len() as u32);
        let h = self.submit(req, Some(buf), Target::Detached)?;
        self.detached_in_flight += 1;
        Ok(h)
    }

    /// Requests submitted with [`NbdClient::submit_write`] and not yet returned by
    /// [`NbdClient::wait_detached`].
    pub fn detached_in_flight(&self) -> usize {
        self.detached_in_flight
    }

    /// Waits for the next completed [`NbdClient::submit_write`] (any order).
    /// A server error fails only that request (in `result`); a connection
    /// error is returned as `Err`.
    pub fn wait_detached(&mut self) -> Result<Completion, NbdError> {
        loop {
            if let Some(c) = self.detached.pop_front() {
                self.detached_in_flight -= 1;
                return Ok(c);
            }
            if self.detached_in_flight == 0 {
                return Err(NbdError::InvalidArgument("wait_detached with no request in flight".into()));
            }
            self.check_usable()?;
            self.flush_queued()?;
            match self.recv_one(None) {
                Ok(Some(p)) => self.park(p),
                Ok(None) => {}
                Err(e) => {
                    self.broken = Some(e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// Writes `buf` at `offset`, with up to `max_in_flight` requests in flight.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), NbdError> {
        self.check_usable()?;
        self.check_writable(Command::Write)?;
        self.check_range(Command::Write, offset, buf.len() as u64)?;
        let max = self.max_request_len() as usize;
        let parts = buf.chunks(max).enumerate().map(|(i, c)| (offset + (i * max) as u64, c.len() as u64, Some(c)));
        self.run_parts(Command::Write, 0, parts)
    }

    /// Writes zeroes over `[offset, offset+len)`. NO_HOLE is not set, so the
    /// server may punch holes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check_usable()?;
        self.check_writable(Command::WriteZeroes)?;
        if self.tflags & tflags::SEND_WRITE_ZEROES == 0 {
            return Err(NbdError::Unsupported("the server does not support NBD_CMD_WRITE_ZEROES".into()));
        }
        self.check_range(Command::WriteZeroes, offset, len)?;
        let parts = self.split_no_payload(offset, len);
        self.run_parts(Command::WriteZeroes, 0, parts)
    }

    /// Discards `[offset, offset+len)` (a hint; contents afterwards are
    /// whatever the server says, zeroes for qemu-nbd on most formats).
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check_usable()?;
        self.check_writable(Command::Trim)?;
        if self.tflags & tflags::SEND_TRIM == 0 {
            return Err(NbdError::Unsupported("the server does not support NBD_CMD_TRIM".into()));
        }
        self.check_range(Command::Trim, offset, len)?;
        let parts = self.split_no_payload(offset, len);
        self.run_parts(Command::Trim, 0, parts)
    }

    fn split_no_payload(&self, offset: u64, len: u64) -> Vec<(u64, u64, Option<&'static [u8]>)> {
        let min = self.block_sizes.minimum as u64;
        let step = MAX_ZERO_TRIM_LEN - MAX_ZERO_TRIM_LEN % min;
        (0..len.div_ceil(step)).map(|i| (offset + i * step, (len - i * step).min(step), None)).collect()
    }

    /// Sends `parts` with up to `max_in_flight` in flight; waits for all.
    fn run_parts<'a>(
        &mut self,
        command: Command,
        flags: u16,
        parts: impl IntoIterator<Item = (u64, u64, Option<&'a [u8]>)>,
    ) -> Result<(), NbdError> {
        let mut handles = VecDeque::new();
        let mut first_err = None;
        let mut parts = parts.into_iter();
        loop {
            while handles.len() < self.opts.max_in_flight.max(1) && first_err.is_none() {
                let Some((off, len, payload)) = parts.next() else { break };
                let req = self.new_request(command, flags, off, len as u32);
                handles.push_back(self.submit(req, payload, Target::None)?);
            }
            let Some(h) = handles.pop_front() else { break };
            if let Some(e) = self.wait_for(h, None)?.error {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Flushes the server's caches (a no-op if it does not offer flush).
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.check_usable()?;
        if self.tflags & tflags::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.run_parts(Command::Flush, 0, [(0, 0, None)])
    }

    fn context_id(&self, context: &str) -> Result<u32, NbdError> {
        self.contexts.iter().find(|(n, _)| n == context).map(|&(_, id)| id).ok_or_else(|| {
            NbdError::InvalidArgument(format!(
                "metadata context {context:?} was not negotiated (NbdOptions::meta_contexts)"
            ))
        })
    }

    /// Block status of `[offset, offset+len)` in `context`: consecutive
    /// extents (offset, length, flags), adjacent equal flags merged, covering
    /// the whole range.
    pub fn block_status(&mut self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>, NbdError> {
        self.check_usable()?;
        let id = self.context_id(context)?;
        self.check_range(Command::BlockStatus, offset, len)?;
        let min = self.block_sizes.minimum;
        let max = (self.opts.max_block_status_len.max(min) / min * min) as u64;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let rlen = (end - pos).min(max);
            let req = self.new_request(Command::BlockStatus, 0, pos, rlen as u32);
            let h = self.submit(req, None, Target::BlockStatus { context_id: id, descriptors: None })?;
            let p = self.wait_for(h, None)?;
            if let Some(e) = p.error {
                return Err(e);
            }
            let Target::BlockStatus { descriptors: Some(ds), .. } = p.target else {
                return Err(req.context(true).bad_reply("no BLOCK_STATUS chunk"));
            };
            let rend = pos + rlen;
            for d in ds {
                if pos >= rend {
                    break;
                }
                let l = (d.length as u64).min(rend - pos);
                match out.last_mut() {
                    Some(last) if last.2 == d.flags && last.0 + last.1 == pos => last.1 += l,
                    _ => out.push((pos, l, d.flags)),
                }
                pos += l;
            }
        }
        Ok(out)
    }

    /// The extents of the whole export whose `context` flags satisfy `test`,
    /// sorted and coalesced.
    pub fn extents_matching(
        &mut self,
        context: &str,
        mut test: impl FnMut(u32) -> bool,
    ) -> Result<Vec<(u64, u64)>, NbdError> {
        let all = self.block_status(context, 0, self.size)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (off, len, flags) in all {
            if !test(flags) {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => out.push((off, len)),
            }
        }
        Ok(out)
    }

    /// The extents of the whole export with any of `flag_mask` set in
    /// `context`: e.g. dirty extents (`qemu:dirty-bitmap:NAME`,
    /// [`proto::STATE_DIRTY`](crate::proto::STATE_DIRTY)) or holes (`base:allocation`,
    /// [`proto::STATE_HOLE`](crate::proto::STATE_HOLE)).
    pub fn extents(&mut self, context: &str, flag_mask: u32) -> Result<Vec<(u64, u64)>, NbdError> {
        self.extents_matching(context, |f| f & flag_mask != 0)
    }

    /// Waits for every request in flight, then disconnects cleanly
    /// (NBD_CMD_DISC).
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.check_usable()?;
        self.flush_queued()?;
        while !self.pending.is_empty() {
            match self.recv_one(None) {
                Ok(Some(p)) => self.park(p),
                Ok(None) => {}
                Err(e) => {
                    self.broken = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        self.send_disc()
    }

    pub(super) fn send_disc(&mut self) -> Result<(), NbdError> {
        let req = self.new_request(Command::Disc, 0, 0, 0);
        self.sbuf.extend_from_slice(&req.encode());
        let r = self.flush_send(None, &req);
        self.broken = Some("disconnected".into());
        self.stream.shutdown();
        r
    }
}
