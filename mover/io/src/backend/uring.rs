//! The io_uring backend: one ring per thread, the pool's buffers registered.
//!
//! Reads and writes use READ_FIXED / WRITE_FIXED on the registered pool, so
//! the kernel does not pin and unpin pages per operation. A short transfer
//! that is not at end of file is resubmitted for the rest. Buffers stay in
//! `slots` while the kernel owns them; dropping the backend waits for every
//! operation in flight before the buffers can go back to the pool.

use std::io;

use io_uring::{opcode, types, IoUring};

use super::{IoBackend, IoCompletion, IoKind, IoRequest};
use crate::buf::BufPool;

struct Slot {
    req: IoRequest,
    /// Bytes transferred so far (for resubmission after a short transfer).
    done: usize,
}

/// io_uring backend.
pub struct UringBackend {
    ring: IoUring,
    depth: usize,
    /// Operations owned by the kernel, by slot index (the SQE's user_data).
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    /// Pool buffers are registered: use the FIXED opcodes.
    registered: bool,
    /// Address range of the registered pool, to check a buffer belongs to it.
    pool_regions: Vec<(usize, usize)>,
    unsubmitted: usize,
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend").field("depth", &self.depth).field("in_flight", &self.in_flight).finish()
    }
}

/// io_uring's kernel worker threads (io-wq) per thread that owns a ring, for
/// each of its two kinds (bounded: regular files; unbounded: sockets, pipes).
/// The kernel's own bound is min(ring entries, 4 x CPUs), which grows with the
/// machine; 8 is what a 2-core machine gets, and enough to keep a queue of
/// buffered writes and fsyncs moving. With it a session's threads are bounded
/// by a number that does not depend on the CPU count (see the target's
/// listen.rs). Kernels before 5.15 cannot set it and keep their own bound.
pub const IOWQ_MAX_WORKERS: u32 = 8;

impl UringBackend {
    /// Set up a ring of `depth` entries and register `pool`'s buffers.
    ///
    /// Fails when io_uring is not permitted here, or when the buffers cannot
    /// be registered (RLIMIT_MEMLOCK): the caller then falls back.
    pub fn new(pool: &BufPool, depth: usize) -> io::Result<UringBackend> {
        let depth = depth.clamp(1, 256);
        let ring = IoUring::new(depth.next_power_of_two() as u32)?;
        let iovecs: Vec<libc::iovec> = pool
            .regions()
            .iter()
            .map(|&(addr, len)| libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len })
            .collect();
        // SAFETY: the iovecs describe the pool's allocations, which live as
        // long as any PoolBuf or the pool itself; the ring only uses them
        // while an operation holds the corresponding PoolBuf (see submit).
        unsafe { ring.submitter().register_buffers(&iovecs) }
            .map_err(|e| io::Error::new(e.kind(), format!("registering {} buffers failed: {e}", iovecs.len())))?;
        // Best effort: an older kernel keeps its own (CPU-sized) bound.
        let _ = ring.submitter().register_iowq_max_workers(&mut [IOWQ_MAX_WORKERS; 2]);
        Ok(UringBackend {
            ring,
            depth,
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            in_flight: 0,
            registered: true,
            pool_regions: pool.regions().to_vec(),
            unsubmitted: 0,
        })
    }

    fn push(&mut self, slot: usize) -> io::Result<()> {
        let s = self.slots[slot].as_mut().expect("slot in use");
        let req = &mut s.req;
        let fd = types::Fd(req.fd);
        let offset = req.offset + s.done as u64;
        let len = (req.len - s.done) as u32;
        let index = req.buf.index();
        let fixed = self.registered
            && self.pool_regions.get(index as usize).is_some_and(|&(a, _)| a == req.buf.as_mut_ptr() as usize);
        // SAFETY: `done < len <= capacity`, so the pointer stays inside the buffer.
        let ptr = unsafe { req.buf.as_mut_ptr().add(s.done) };
        let entry = match (req.kind, fixed) {
            (IoKind::Read, true) => opcode::ReadFixed::new(fd, ptr, len, index).offset(offset).build(),
            (IoKind::Read, false) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
            (IoKind::Write, true) => opcode::WriteFixed::new(fd, ptr, len, index).offset(offset).build(),
            (IoKind::Write, false) => opcode::Write::new(fd, ptr, len).offset(offset).build(),
            (IoKind::Sync, _) => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        }
        .user_data(slot as u64);
        // SAFETY: the entry points into the buffer owned by `slots[slot]`,
        // which stays there (not moved, not dropped) until its completion is
        // reaped in `wait` or in Drop.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.unsubmitted += 1;
        Ok(())
    }
}

impl IoBackend for UringBackend {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, req: IoRequest) -> io::Result<()> {
        assert!(req.len <= req.buf.capacity(), "request longer than its buffer");
        let slot = self.free_slots.pop().ok_or_else(|| io::Error::other("io_uring backend: depth exceeded"))?;
        if req.len == 0 && req.kind != IoKind::Sync {
            // Nothing to transfer: complete at once without the kernel.
            self.slots[slot] = Some(Slot { req, done: 0 });
            self.in_flight += 1;
            let nop = opcode::Nop::new().build().user_data(slot as u64);
            // SAFETY: a NOP references no memory.
            unsafe { self.ring.submission().push(&nop) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            self.unsubmitted += 1;
            return Ok(());
        }
        self.slots[slot] = Some(Slot { req, done: 0 });
        self.in_flight += 1;
        if let Err(e) = self.push(slot) {
            self.in_flight -= 1;
            self.slots[slot] = None;
            self.free_slots.push(slot);
            return Err(e);
        }
        Ok(())
    }

    fn wait(&mut self) -> io::Result<IoCompletion> {
        loop {
            if self.in_flight == 0 {
                return Err(io::Error::other("wait with nothing in flight"));
            }
            let cqe = self.ring.completion().next();
            let Some(cqe) = cqe else {
                let want = if self.unsubmitted > 0 { 0 } else { 1 };
                match self.ring.submit_and_wait(want) {
                    Ok(_) => self.unsubmitted = 0,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => return Err(e),
                }
                continue;
            };
            let slot = cqe.user_data() as usize;
            let res = cqe.result();
            let s = self.slots[slot].as_mut().expect("completion for a slot in use");
            let finished = if res < 0 {
                Some(Err(io::Error::from_raw_os_error(-res)))
            } else {
                s.done += res as usize;
                if res == 0 || s.done >= s.req.len {
                    Some(Ok(s.done))
                } else {
                    None // short transfer: submit the rest
                }
            };
            match finished {
                None => self.push(slot)?,
                Some(result) => {
                    let s = self.slots[slot].take().expect("slot in use");
                    self.free_slots.push(slot);
                    self.in_flight -= 1;
                    let mut req = s.req;
                    let result = match (req.kind, result) {
                        (IoKind::Write, Ok(n)) if n < req.len => {
                            Err(io::Error::new(io::ErrorKind::WriteZero, format!("short write: {n} of {}", req.len)))
                        }
                        (_, r) => r,
                    };
                    if req.kind == IoKind::Read {
                        req.buf.set_len(*result.as_ref().unwrap_or(&0));
                    }
                    return Ok(IoCompletion {
                        tag: req.tag,
                        offset: req.offset,
                        len: req.len,
                        kind: req.kind,
                        buf: req.buf,
                        result,
                    });
                }
            }
        }
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // The kernel may still write into buffers of operations in flight:
        // reap them all before the buffers are released.
        while self.in_flight > 0 {
            if self.wait().is_err() {
                // Cannot reap: leak the buffers rather than free memory the
                // kernel may still write to.
                for s in self.slots.iter_mut().filter_map(Option::take) {
                    std::mem::forget(s.req.buf);
                }
                break;
            }
        }
    }
}
