//! Every raw system call on files and sockets that the workspace's libraries
//! make outside the IO backends (process calls are in [`crate::process`]),
//! each behind a safe function: page-cache advice, hole and data ranges of sparse
//! files, block-device sizes, hole punching, file locks, vectored socket
//! reads into a receive buffer, the local time, the host name, page residency, and the socket
//! helpers of a relay (waiting for readability, pipes, splice) and of a server
//! (TCP keepalive and user timeout, `poll` over many sockets).
//!
//! Each function is a thin wrapper: it adds no policy, returns the OS error
//! as an `io::Error`, and says in its `// SAFETY:` note why the call is sound.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use bytes::{BufMut, BytesMut};

/// What [`fadvise`] tells the kernel about a range of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// The file is read sequentially: read ahead more.
    Sequential,
    /// The range will be read soon: start reading it now.
    WillNeed,
    /// The range will not be read again: drop its clean pages.
    DontNeed,
}

/// `posix_fadvise`: advice only; the kernel may ignore it, and a failure
/// means no more than that (callers usually ignore the result).
pub fn fadvise(fd: RawFd, offset: u64, len: u64, advice: Advice) -> io::Result<()> {
    let advice = match advice {
        Advice::Sequential => libc::POSIX_FADV_SEQUENTIAL,
        Advice::WillNeed => libc::POSIX_FADV_WILLNEED,
        Advice::DontNeed => libc::POSIX_FADV_DONTNEED,
    };
    // SAFETY: posix_fadvise only reads its integer arguments.
    let r = unsafe { libc::posix_fadvise(fd, offset as libc::off_t, len as libc::off_t, advice) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// The data ranges of the first `size` bytes of a file (SEEK_DATA /
/// SEEK_HOLE), in order; everything between them reads as zeros without
/// being stored. A file system that does not report holes gives one range
/// over everything. This is the one hole walk of the project: hole maps of
/// sources and sparse exports are both made from it.
pub fn data_ranges(file: &File, size: u64) -> DataRanges<'_> {
    DataRanges { file, pos: 0, size }
}

/// Iterator of [`data_ranges`].
#[derive(Debug)]
pub struct DataRanges<'a> {
    file: &'a File,
    pos: u64,
    size: u64,
}

impl DataRanges<'_> {
    fn seek(&self, off: u64, whence: libc::c_int) -> io::Result<u64> {
        // SAFETY: lseek on an open descriptor with integer arguments. It moves only this
        // descriptor's offset, and every read of these files uses pread at its own offset.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }
}

impl Iterator for DataRanges<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        if self.pos >= self.size {
            return None;
        }
        let start = match self.seek(self.pos, libc::SEEK_DATA) {
            Ok(s) => s.min(self.size),
            // ENXIO: only a hole is left.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => self.size,
            // Holes not reported here: the rest is data.
            Err(_) => self.pos,
        };
        if start >= self.size {
            self.pos = self.size;
            return None;
        }
        let end = self.seek(start, libc::SEEK_HOLE).map_or(self.size, |e| e.min(self.size)).max(start + 1);
        self.pos = end;
        Some(start..end)
    }
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of the block device open as `file`.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Deallocate `len` bytes at `offset` (they read back as zeros); the size is kept.
pub fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an open fd with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `fdatasync` of a descriptor (the file's data and the metadata needed to read it).
pub fn fdatasync(fd: RawFd) -> io::Result<()> {
    // SAFETY: fdatasync on a descriptor; an invalid one fails with EBADF.
    if unsafe { libc::fdatasync(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `open(2)`'s O_NOFOLLOW, for `OpenOptionsExt::custom_flags` in crates without libc.
pub const O_NOFOLLOW: i32 = libc::O_NOFOLLOW;

/// Take an exclusive `flock` on `file` without waiting: false when another
/// open file description holds it. Released when the file is closed.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    try_flock(file, libc::LOCK_EX)
}

/// Take a shared `flock` on `file` without waiting: false when another open
/// file description holds it exclusively. Released when the file is closed.
pub fn try_lock_shared(file: &File) -> io::Result<bool> {
    try_flock(file, libc::LOCK_SH)
}

fn try_flock(file: &File, how: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on an open fd with integer flags.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// One `readv` from `fd`: first into `direct`, then into the spare capacity of
/// `buf` (at least `reserve` bytes of it), whose length grows by what went
/// there. Returns the bytes read in all (0: end of stream); retried when
/// interrupted. With an empty `direct` it is a plain read into `buf`.
pub fn readv_into(fd: RawFd, direct: &mut [u8], buf: &mut BytesMut, reserve: usize) -> io::Result<usize> {
    buf.reserve(reserve);
    let spare = buf.chunk_mut();
    let iov = [
        libc::iovec { iov_base: direct.as_mut_ptr().cast(), iov_len: direct.len() },
        libc::iovec { iov_base: spare.as_mut_ptr().cast(), iov_len: spare.len() },
    ];
    let n = loop {
        // SAFETY: both iovecs describe memory valid for writes of their length (a live
        // mutable slice and the spare capacity of `buf`), and readv writes at most that.
        let n = unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: readv fills the iovecs in order, `direct` first: it initialised the first
    // `n - direct.len()` bytes (if any) of the spare capacity.
    unsafe { buf.advance_mut(n.saturating_sub(direct.len())) };
    Ok(n)
}

/// The local wall-clock time now, in the system's time zone (TZ, /etc/localtime):
/// the day of the week (0 = Monday .. 6 = Sunday) and the second of the day
/// (0..86_400; a leap second reads as the last second of its minute).
pub fn local_weekday_second() -> io::Result<(u8, u32)> {
    // SAFETY: time(NULL) only returns the current time.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: an all-zero `tm` is a valid value (integers and a null zone pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `now` and writes one `tm` through the pointer, both valid
    // for the call; it is the reentrant variant (no shared static buffer).
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return Err(io::Error::last_os_error());
    }
    // tm_wday counts from Sunday (0).
    let weekday = ((tm.tm_wday + 6) % 7) as u8;
    let second = (tm.tm_hour as u32) * 3600 + (tm.tm_min as u32) * 60 + (tm.tm_sec as u32).min(59);
    Ok((weekday, second))
}

/// This host's name, or "unknown".
pub fn hostname() -> String {
    let mut host = [0u8; 256];
    // SAFETY: gethostname writes at most host.len() bytes into the buffer.
    if unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) } != 0 {
        return "unknown".to_string();
    }
    let end = host.iter().position(|&b| b == 0).unwrap_or(host.len());
    String::from_utf8_lossy(&host[..end]).into_owned()
}

/// How many of the pages of the first `len` bytes of `file` are in the page
/// cache (`mincore` over a read-only mapping). For tests that check what a
/// writer leaves cached.
pub fn resident_pages(file: &File, len: usize) -> io::Result<usize> {
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a fresh read-only shared mapping of an open file; unmapped below and
    // never dereferenced here.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `addr` is a live mapping of `len` bytes and `vec` has one byte per page of it.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    if r != 0 {
        return Err(err);
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count())
}

/// True when `path` is on a tmpfs (where a file's pages are the file, so
/// page-cache residency says nothing).
pub fn is_tmpfs(path: &std::path::Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type == libc::TMPFS_MAGIC)
}

/// Waits until `fd` is readable (for a listening socket: has a connection to
/// accept), at most `timeout`, with nanosecond resolution (one `ppoll`: the
/// bench's delay line waits for packets to the microsecond); false when the
/// time ran out or the wait was interrupted.
pub fn wait_readable(fd: impl AsFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: one pollfd we own, a timespec we own, no signal mask.
    let n = unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
    if n >= 0 {
        return Ok(n > 0);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A new pipe, `(read end, write end)`, both close-on-exec (`pipe2`).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array, which has room for them.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else; they are
    // closed when the OwnedFds drop.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a pipe buffer of `bytes` (`F_SETPIPE_SZ`; the kernel rounds it up
/// to a power-of-two number of pages). Returns the capacity it now has.
/// Unprivileged processes are capped at /proc/sys/fs/pipe-max-size.
pub fn set_pipe_capacity(pipe: impl AsFd, bytes: usize) -> io::Result<usize> {
    let want = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: fcntl on a descriptor we borrow, with an integer argument.
    let r = unsafe { libc::fcntl(pipe.as_fd().as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// One `splice` of up to `len` bytes from `from` to `to`, one of which must be
/// a pipe (the payload moves inside the kernel, never through user space), at
/// their current offsets; retried when interrupted. Returns the bytes moved
/// (0: end of stream on `from`).
pub fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let (from, to) = (from.as_fd().as_raw_fd(), to.as_fd().as_raw_fd());
    loop {
        // SAFETY: splice between descriptors we borrow; null offset pointers (use
        // and advance the descriptors' own offsets) and no memory of ours.
        let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Turns TCP keepalive on for the socket `fd`: after `idle` without traffic the
/// kernel probes the peer every `interval`, and after `count` unanswered probes
/// the connection fails (a blocked read or write returns ETIMEDOUT). Also sets
/// `TCP_USER_TIMEOUT` to `idle + interval * count`: data sent and not
/// acknowledged for that long fails the connection too (a peer that vanished
/// while this end was writing). Durations are rounded down to seconds (at least 1).
pub fn set_tcp_keepalive(fd: impl AsFd, idle: Duration, interval: Duration, count: u32) -> io::Result<()> {
    let fd = fd.as_fd().as_raw_fd();
    let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as libc::c_int;
    let user_ms = (idle + interval * count).as_millis().min(u32::MAX as u128) as libc::c_uint;
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(idle))?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(interval))?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count.clamp(1, 127) as libc::c_int)?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_ms as libc::c_int)
}

/// The kernel's smoothed round-trip time of the TCP connection `fd`
/// (`TCP_INFO`'s `tcpi_rtt`): after a TLS handshake and ferry's own, a fair
/// measure of the path's RTT, taken without sending anything.
pub fn tcp_rtt(fd: impl AsFd) -> io::Result<Duration> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: tcp_info is plain old data (integers only): all zeros is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large and
    // lives across the call; `len` is a valid pointer it updates.
    let r = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::from_micros(u64::from(info.tcpi_rtt)))
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int from a valid pointer, of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the accept queue of the listening socket `fd` to `backlog` connections
/// (`listen` again on a socket that listens already only changes its backlog;
/// the kernel caps it at `net.core.somaxconn`). A burst of connections beyond
/// the queue has its SYNs dropped and retried a second later.
pub fn set_listen_backlog(fd: impl AsFd, backlog: u32) -> io::Result<()> {
    let backlog = backlog.min(libc::c_int::MAX as u32) as libc::c_int;
    // SAFETY: listen on a descriptor we borrow, with an integer argument.
    if unsafe { libc::listen(fd.as_fd().as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One descriptor for [`poll_readable`]: what to wait for, and what happened.
#[derive(Debug, Clone, Copy)]
pub struct PollEntry {
    /// The descriptor (borrowed: the caller keeps it open during the call).
    pub fd: RawFd,
    /// Set by [`poll_readable`]: readable, hung up, or in error (a read will not block).
    pub ready: bool,
}

/// Waits until at least one of `entries` is readable (or hung up, or in error),
/// at most `timeout` (rounded down to milliseconds). One `poll`; marks each
/// entry's `ready` and returns how many are. 0 when the time ran out or the
/// wait was interrupted.
pub fn poll_readable(entries: &mut [PollEntry], timeout: Duration) -> io::Result<usize> {
    let mut fds: Vec<libc::pollfd> =
        entries.iter().map(|e| libc::pollfd { fd: e.fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.as_millis().min(libc::c_int::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a live array of `fds.len()` pollfds owned here, for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
    }
    for (e, p) in entries.iter_mut().zip(&fds) {
        e.ready = p.revents != 0;
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_ranges_of_a_sparse_file() {
        let f = tempfile::tempfile().unwrap();
        let m = 1 << 20;
        f.set_len(8 * m).unwrap();
        f.write_all_at(&[1; 4096], 2 * m).unwrap();
        f.write_all_at(&[1; 4096], 8 * m - 4096).unwrap();
        let got: Vec<_> = data_ranges(&f, 8 * m).collect();
        assert_eq!(got, [2 * m..2 * m + 4096, 8 * m - 4096..8 * m]);
        // Cut at `size`.
        let got: Vec<_> = data_ranges(&f, 2 * m + 100).collect();
        assert_eq!(got, vec![(2 * m)..(2 * m + 100)]);
        // All hole; empty.
        assert_eq!(data_ranges(&f, m).count(), 0);
        assert_eq!(data_ranges(&f, 0).count(), 0);
    }

    #[test]
    fn a_second_exclusive_lock_is_refused_until_the_first_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = File::create(&p).unwrap();
        assert!(try_lock_exclusive(&a).unwrap());
        let b = File::open(&p).unwrap();
        assert!(!try_lock_exclusive(&b).unwrap());
        drop(a);
        assert!(try_lock_exclusive(&b).unwrap());
    }

    #[test]
    fn readv_into_fills_the_slice_then_the_buffer() {
        use std::io::Write;
        let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
        w.write_all(b"0123456789").unwrap();
        let mut direct = [0u8; 4];
        let mut buf = BytesMut::from(&b"xy"[..]);
        assert_eq!(readv_into(r.as_raw_fd(), &mut direct, &mut buf, 64).unwrap(), 10);
        assert_eq!((&direct, &buf[..]), (b"0123", &b"xy456789"[..]));
        w.write_all(b"abc").unwrap();
        assert_eq!(readv_into(r.as_raw_fd(), &mut [], &mut buf, 64).unwrap(), 3);
        assert_eq!(&buf[..], b"xy456789abc");
        drop(w);
        assert_eq!(readv_into(r.as_raw_fd(), &mut [], &mut buf, 64).unwrap(), 0);
    }

    #[test]
    fn a_listener_is_readable_once_a_connection_waits() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!wait_readable(&l, Duration::from_millis(20)).unwrap());
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(wait_readable(&l, Duration::from_secs(10)).unwrap());
    }

    #[test]
    fn splice_moves_socket_bytes_through_a_pipe() {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let pair = || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (a, l.accept().unwrap().0)
        };
        let ((mut src, from), (to, mut dst)) = (pair(), pair());
        let (rd, wr) = pipe().unwrap();
        assert!(set_pipe_capacity(&wr, 256 << 10).unwrap() >= 64 << 10);
        src.write_all(b"through the pipe").unwrap();
        drop(src);
        let mut moved = 0;
        loop {
            let n = splice(&from, &wr, 1 << 16).unwrap();
            if n == 0 {
                break;
            }
            let mut left = n;
            while left > 0 {
                left -= splice(&rd, &to, left).unwrap();
            }
            moved += n;
        }
        drop(to);
        let mut got = Vec::new();
        dst.read_to_end(&mut got).unwrap();
        assert_eq!((moved, &got[..]), (16, &b"through the pipe"[..]));
        // Neither end a pipe: refused.
        assert_eq!(splice(&from, &dst, 16).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    }
}
