//! IO backends: io_uring and a portable pread/pwrite fallback behind one trait.
//!
//! A buffer moves into an operation with [`IoBackend::submit`] and comes back
//! with its result from [`IoBackend::wait`] (the tokio-uring / compio model),
//! so no buffer can be touched, reused or freed while the kernel may still
//! write into it. [`open_backend`] probes io_uring at start and falls back to
//! the portable backend with one warning when it is unavailable (seccomp in
//! containers, `kernel.io_uring_disabled`, RLIMIT_MEMLOCK too small for the
//! registered pool); naming `uring` explicitly fails instead. Other crates
//! implement the trait too: disks behind NBD exports use ferry-nbd's
//! `NbdBackend` (operations on the disk's NBD connection) whatever the choice
//! for files.

mod portable;
mod uring;

use std::io;
use std::os::fd::RawFd;

use crate::buf::{BufPool, PoolBuf};

pub use portable::PortableBackend;
pub use uring::{UringBackend, IOWQ_MAX_WORKERS};

/// Read, write or sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Read `len` bytes at `offset` into the buffer.
    Read,
    /// Write the buffer's first `len` bytes at `offset`.
    Write,
    /// fdatasync the file: `offset` and `len` are ignored (give 0), the
    /// buffer only travels along. It covers every write to the file that
    /// completed before it was submitted, so a writer can go on appending
    /// while it runs (group commit).
    Sync,
}

/// One operation: the buffer travels with it.
#[derive(Debug)]
pub struct IoRequest {
    /// Caller's tag, returned with the completion.
    pub tag: u64,
    /// File descriptor; must stay open until the completion is returned.
    pub fd: RawFd,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes to transfer (at most the buffer's capacity).
    pub len: usize,
    /// Read or write.
    pub kind: IoKind,
    /// The buffer.
    pub buf: PoolBuf,
}

/// A finished operation.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's tag.
    pub tag: u64,
    /// Offset of the request.
    pub offset: u64,
    /// Requested length.
    pub len: usize,
    /// The request's kind.
    pub kind: IoKind,
    /// The buffer, back from the kernel. For a read, its length is set to the bytes read.
    pub buf: PoolBuf,
    /// Bytes transferred (less than `len` only at end of file), or the error.
    pub result: io::Result<usize>,
}

/// An IO engine with a bounded number of operations in flight.
pub trait IoBackend: Send {
    /// "io_uring" or "portable".
    fn name(&self) -> &'static str;
    /// Most operations in flight at once.
    fn depth(&self) -> usize;
    /// Operations submitted and not yet returned by `wait`.
    fn in_flight(&self) -> usize;
    /// Queue an operation. The caller keeps `in_flight() < depth()`.
    fn submit(&mut self, req: IoRequest) -> io::Result<()>;
    /// Return one finished operation, waiting if none is finished yet.
    /// Must only be called with `in_flight() > 0`.
    fn wait(&mut self) -> io::Result<IoCompletion>;
}

/// Which backend the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring if it works here, else portable with a warning.
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// pread/pwrite.
    Portable,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "uring" | "io_uring" => Ok(BackendChoice::Uring),
            "portable" => Ok(BackendChoice::Portable),
            other => Err(format!("unknown IO backend {other:?}: use auto, uring or portable")),
        }
    }
}

/// Open the chosen backend for buffers of `pool`, with `depth` operations in flight.
///
/// Returns the backend and, when `Auto` fell back to portable, the warning to show once.
pub fn open_backend(
    choice: BackendChoice,
    pool: &BufPool,
    depth: usize,
) -> io::Result<(Box<dyn IoBackend>, Option<String>)> {
    match choice {
        BackendChoice::Portable => Ok((Box::new(PortableBackend::new(depth)), None)),
        BackendChoice::Uring => match UringBackend::new(pool, depth) {
            Ok(b) => Ok((Box::new(b), None)),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("io_uring requested but unavailable here: {e} (use --io-backend auto or portable)"),
            )),
        },
        BackendChoice::Auto => match UringBackend::new(pool, depth) {
            Ok(b) => Ok((Box::new(b), None)),
            Err(e) => Ok((
                Box::new(PortableBackend::new(depth)),
                Some(format!("io_uring unavailable ({e}); using the portable pread/pwrite backend")),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn roundtrip(choice: BackendChoice) {
        let pool = BufPool::new(8, 64 * 1024);
        let (mut be, _) = open_backend(choice, &pool, 4).unwrap();
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let fd = f.as_raw_fd();
        let mut got = vec![0u8; data.len()];
        let mut next = 0u64;
        let mut done = 0;
        let chunks = data.len().div_ceil(65536);
        while done < chunks {
            while be.in_flight() < be.depth() && (next as usize) < chunks {
                let buf = pool.get();
                be.submit(IoRequest { tag: next, fd, offset: next * 65536, len: 65536, kind: IoKind::Read, buf })
                    .unwrap();
                next += 1;
            }
            let c = be.wait().unwrap();
            let n = c.result.unwrap();
            assert_eq!(n, c.buf.len());
            let off = c.tag as usize * 65536;
            assert_eq!(n, (data.len() - off).min(65536), "short read only at the end");
            got[off..off + n].copy_from_slice(&c.buf);
            done += 1;
        }
        assert_eq!(got, data);

        // Write a buffer back at an offset and read it through the file.
        let mut buf = pool.get();
        buf.spare_mut()[..4096].fill(0xAB);
        buf.set_len(4096);
        be.submit(IoRequest { tag: 99, fd, offset: 8192, len: 4096, kind: IoKind::Write, buf }).unwrap();
        let c = be.wait().unwrap();
        assert_eq!(c.result.unwrap(), 4096);
        let mut check = [0u8; 4096];
        nix_pread(fd, &mut check, 8192);
        assert!(check.iter().all(|&b| b == 0xAB));

        // Sync: completes with 0 bytes and hands its buffer back; a bad descriptor fails it.
        be.submit(IoRequest { tag: 7, fd, offset: 0, len: 0, kind: IoKind::Sync, buf: pool.get() }).unwrap();
        let c = be.wait().unwrap();
        assert_eq!((c.tag, c.kind, c.result.unwrap()), (7, IoKind::Sync, 0));
        be.submit(IoRequest { tag: 8, fd: -1, offset: 0, len: 0, kind: IoKind::Sync, buf: c.buf }).unwrap();
        let c = be.wait().unwrap();
        assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::EBADF));
    }

    fn nix_pread(fd: RawFd, buf: &mut [u8], off: u64) {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off as libc::off_t) };
        assert_eq!(n as usize, buf.len());
    }

    #[test]
    fn portable_reads_and_writes() {
        roundtrip(BackendChoice::Portable);
    }

    #[test]
    fn auto_reads_and_writes() {
        roundtrip(BackendChoice::Auto);
    }
}
