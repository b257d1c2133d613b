//! The portable backend: synchronous pread/pwrite, one operation at a time.
//!
//! Operations run at submit; `wait` hands back the finished ones in order.
//! Works wherever io_uring does not (containers with the default seccomp
//! profile, older kernels).

use std::collections::VecDeque;
use std::io;

use super::{IoBackend, IoCompletion, IoKind, IoRequest};

/// pread/pwrite backend.
#[derive(Debug)]
pub struct PortableBackend {
    depth: usize,
    done: VecDeque<IoCompletion>,
}

impl PortableBackend {
    /// A backend that accepts up to `depth` operations before `wait`.
    pub fn new(depth: usize) -> PortableBackend {
        PortableBackend { depth: depth.max(1), done: VecDeque::new() }
    }
}

impl IoBackend for PortableBackend {
    fn name(&self) -> &'static str {
        "portable"
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn submit(&mut self, mut req: IoRequest) -> io::Result<()> {
        assert!(req.len <= req.buf.capacity(), "request longer than its buffer");
        if req.kind == IoKind::Sync {
            let result = loop {
                // SAFETY: fdatasync on a descriptor the caller keeps open.
                if unsafe { libc::fdatasync(req.fd) } == 0 {
                    break Ok(0);
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    break Err(e);
                }
            };
            let (tag, offset, kind) = (req.tag, req.offset, req.kind);
            self.done.push_back(IoCompletion { tag, offset, len: 0, kind, buf: req.buf, result });
            return Ok(());
        }
        let mut done = 0usize;
        let result = loop {
            if done == req.len {
                break Ok(done);
            }
            let off = (req.offset + done as u64) as libc::off_t;
            let n = match req.kind {
                IoKind::Read => {
                    let spare = &mut req.buf.spare_mut()[done..req.len];
                    // SAFETY: `spare` is valid for writes of its length.
                    unsafe { libc::pread(req.fd, spare.as_mut_ptr().cast(), spare.len(), off) }
                }
                IoKind::Write => {
                    let data = &req.buf.spare_mut()[done..req.len];
                    // SAFETY: `data` is valid for reads of its length.
                    unsafe { libc::pwrite(req.fd, data.as_ptr().cast(), data.len(), off) }
                }
                IoKind::Sync => unreachable!("handled above"),
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(e);
            }
            if n == 0 {
                if req.kind == IoKind::Write {
                    break Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0 bytes"));
                }
                break Ok(done);
            }
            done += n as usize;
        };
        if req.kind == IoKind::Read {
            req.buf.set_len(*result.as_ref().unwrap_or(&0));
        }
        self.done.push_back(IoCompletion {
            tag: req.tag,
            offset: req.offset,
            len: req.len,
            kind: req.kind,
            buf: req.buf,
            result,
        });
        Ok(())
    }

    fn wait(&mut self) -> io::Result<IoCompletion> {
        self.done.pop_front().ok_or_else(|| io::Error::other("wait with nothing in flight"))
    }
}
