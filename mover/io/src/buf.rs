//! Aligned IO buffers and the fixed pool that bounds memory.
//!
//! Every chunk in flight lives in a [`PoolBuf`]: a 4 KiB-aligned allocation
//! (O_DIRECT needs it) of the chunk size. A pool hands out a fixed number of
//! them and blocks when all are in use, so memory is bounded whatever the disk
//! size and a slow stage pushes back on the reader. A buffer returns to its
//! pool when dropped, wherever it is: in a worker, inside a `Bytes` payload
//! on its way to the socket, or in an IO backend.

use std::ptr::NonNull;

use crossbeam_channel::{bounded, Receiver, Sender};

/// Alignment of every buffer: enough for O_DIRECT on any common device.
pub const ALIGN: usize = 4096;

/// True when every byte is zero. OR-folds 4 KiB blocks (which the compiler
/// vectorises) and stops at the first block holding data: the one zero check
/// for chunks, undo records and exports.
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// An owned, aligned, fixed-capacity allocation.
struct RawBuf {
    ptr: NonNull<u8>,
    cap: usize,
    /// Index in the pool (and in io_uring's registered buffer table).
    index: u16,
}

// SAFETY: RawBuf owns its allocation exclusively; moving it between threads is
// like moving a Vec<u8>.
unsafe impl Send for RawBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for RawBuf {}

impl RawBuf {
    /// An anonymous mapping: page-aligned and zero-filled by the kernel page by page as
    /// it is first touched. (The allocator zero-fills over-aligned memory with a memset
    /// up front: 4 ms for the source's 7.5 MiB of pools, paid before the first read.)
    fn new(cap: usize, index: u16) -> RawBuf {
        let cap = cap.max(ALIGN).div_ceil(ALIGN) * ALIGN;
        // SAFETY: an anonymous private mapping of a non-zero length; no file, no fixed address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let layout = std::alloc::Layout::from_size_align(cap, ALIGN).expect("buffer layout");
            std::alloc::handle_alloc_error(layout);
        }
        let ptr = NonNull::new(p.cast::<u8>()).expect("mmap never returns null on success");
        RawBuf { ptr, cap, index }
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        // SAFETY: mapped in RawBuf::new with this very length, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
    }
}

/// A buffer from a [`BufPool`]: capacity fixed, `len` bytes valid.
pub struct PoolBuf {
    raw: Option<RawBuf>,
    len: usize,
    home: Sender<RawBuf>,
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuf").field("len", &self.len).field("cap", &self.capacity()).finish()
    }
}

impl PoolBuf {
    fn raw(&self) -> &RawBuf {
        self.raw.as_ref().expect("buffer present until drop")
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.raw().cap
    }

    /// Index in the pool (the io_uring registered-buffer index).
    pub fn index(&self) -> u16 {
        self.raw().index
    }

    /// Number of valid bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no byte is valid.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Set the number of valid bytes (bytes up to the capacity are always initialised).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "length {len} beyond capacity {}", self.capacity());
        self.len = len;
    }

    /// Pointer to the start, for IO submission.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.raw().ptr.as_ptr()
    }

    /// The whole capacity, writable.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let raw = self.raw();
        // SAFETY: the allocation is `cap` bytes, zero-initialised at creation,
        // and exclusively ours through &mut self.
        unsafe { std::slice::from_raw_parts_mut(raw.ptr.as_ptr(), raw.cap) }
    }
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let raw = self.raw();
        // SAFETY: `len <= cap` and all `cap` bytes are initialised.
        unsafe { std::slice::from_raw_parts(raw.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            // If the pool is gone, the buffer is simply freed.
            let _ = self.home.send(raw);
        }
    }
}

/// A fixed set of aligned buffers.
pub struct BufPool {
    free: Receiver<RawBuf>,
    home: Sender<RawBuf>,
    buf_size: usize,
    count: usize,
    /// Addresses of every buffer, by index (for io_uring registration).
    iovecs: Vec<(usize, usize)>,
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool").field("buf_size", &self.buf_size).field("count", &self.count).finish()
    }
}

impl BufPool {
    /// A pool of `count` buffers of `buf_size` bytes (rounded up to [`ALIGN`]).
    pub fn new(count: usize, buf_size: usize) -> BufPool {
        BufPool::with_slack(count, buf_size, 0)
    }

    /// A pool of `count` buffers of `buf_size` bytes (rounded up to [`ALIGN`],
    /// what [`BufPool::buf_size`] reports) whose capacity holds at least `slack`
    /// bytes more: room a reader may use past the data (ferry-replicate reads
    /// TLS records in place, a byte per record past the payload).
    pub fn with_slack(count: usize, buf_size: usize, slack: usize) -> BufPool {
        let buf_size = buf_size.div_ceil(ALIGN) * ALIGN;
        let cap = (buf_size + slack).div_ceil(ALIGN) * ALIGN;
        let (home, free) = bounded(count);
        let mut iovecs = Vec::with_capacity(count);
        for i in 0..count {
            let raw = RawBuf::new(cap, u16::try_from(i).expect("pool of at most 65536 buffers"));
            iovecs.push((raw.ptr.as_ptr() as usize, raw.cap));
            home.send(raw).expect("pool channel has room");
        }
        BufPool { free, home, buf_size, count, iovecs }
    }

    /// Take a buffer, waiting for one to come back if all are in use.
    pub fn get(&self) -> PoolBuf {
        let raw = self.free.recv().expect("the pool holds a sender");
        PoolBuf { raw: Some(raw), len: 0, home: self.home.clone() }
    }

    /// Take a buffer if one is free now.
    pub fn try_get(&self) -> Option<PoolBuf> {
        self.free.try_recv().ok().map(|raw| PoolBuf { raw: Some(raw), len: 0, home: self.home.clone() })
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// (address, length) of each buffer by index, for registering with io_uring.
    pub fn regions(&self) -> &[(usize, usize)] {
        &self.iovecs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_come_back() {
        let pool = BufPool::new(2, 5000);
        assert_eq!(pool.buf_size(), 8192);
        let mut a = pool.get();
        let b = pool.get();
        assert!(pool.try_get().is_none(), "pool of two is exhausted");
        assert_eq!(a.as_mut_ptr() as usize % ALIGN, 0);
        a.spare_mut()[..3].copy_from_slice(b"abc");
        a.set_len(3);
        assert_eq!(&a[..], b"abc");
        drop(a);
        assert!(pool.try_get().is_some(), "a dropped buffer returns to its pool");
        drop(b);
    }

    #[test]
    fn slack_is_capacity_past_the_buffer_size() {
        let pool = BufPool::with_slack(1, 65536, 4);
        assert_eq!(pool.buf_size(), 65536, "the size payloads are checked against");
        let mut a = pool.get();
        assert_eq!(a.capacity(), 65536 + ALIGN);
        assert_eq!(a.spare_mut().len(), 65536 + ALIGN);
        assert_eq!(pool.regions()[0].1, 65536 + ALIGN);
        assert_eq!(BufPool::with_slack(1, 5000, 0).get().capacity(), 8192);
    }

    #[test]
    fn buffer_inside_bytes_returns_when_bytes_drop() {
        let pool = BufPool::new(1, 4096);
        let mut a = pool.get();
        a.set_len(10);
        let bytes = bytes::Bytes::from_owner(a);
        let slice = bytes.slice(2..5);
        drop(bytes);
        assert!(pool.try_get().is_none(), "still referenced by a slice");
        drop(slice);
        assert!(pool.try_get().is_some());
    }
}
