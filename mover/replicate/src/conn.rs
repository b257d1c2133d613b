//! A ferry connection: a socket, the wire session, and the handshake.
//!
//! The sending half ([`Conn`]) holds the [`Session`] under a mutex so that
//! the sender and the receiver can use it from different threads (a target
//! has one thread that writes: see `target` and [`Conn::defer_answers`]).
//! The receiving half ([`Rx`]) owns its own [`Deframer`] and reads straight
//! into it, so data payloads are slices
//! of the receive buffer and never copied; frames are validated with
//! [`Conn::handle`]. A target reads data payloads into its buffer pool
//! instead ([`Rx::next_received`]): straight from the socket into the buffer
//! the chunk is verified and written from, memory that is reused rather than
//! fresh for every megabyte received.
//!
//! Bounds before authentication (wire/PROTOCOL.md, "Limits"): until the peer
//! has proved it holds the token, a frame body may be at most
//! [`MAX_HANDSHAKE_BODY_LEN`] (8 KiB; the receiver refuses a larger announced
//! length as soon as the header is in), a read asks for 4 KiB at most, and
//! the whole handshake must be over by a deadline: every read waits only for
//! what is left of it, so a peer that dribbles a byte at a time cannot stretch
//! it. After authentication a server's reads wait at most its idle timeout
//! ([`Rx::set_idle_timeout`]); a source sends a Keepalive whenever it has been
//! quiet for a while ([`Conn::keepalive_if_quiet`]), so a busy source (hashing
//! a long unchanged stretch) never looks idle.
//!
//! TLS. A remote session's bytes travel as TLS 1.3 records ([`Link`] carries
//! them from the handshake in `tls.rs`). rustls runs the handshake; then each
//! half owns its direction (`records.rs`): the sending half seals a frame into
//! its own buffer, 256 KiB of plaintext at a time (a copy into the buffer, AES-GCM
//! in place), a data payload from a record boundary on (wire/PROTOCOL.md, "TLS
//! record layout"), and writes it. The receiving half reads a data payload's
//! records straight from the socket into the payload's pool buffer and decrypts
//! them there (`Rx::read_direct`: one `readv` for a chunk's records and the
//! next frame's head, no copy); other records it reads into its own buffer,
//! decrypts in place and copies once into the deframer's buffer. Reads stop at
//! a record's end where a payload may follow, so its records stay in the
//! socket for the direct path. The stream ends with close_notify
//! ([`Conn::shutdown`]); its TCP end without one is an error. No lock is shared per frame or
//! record, so the data path keeps its shape (one thread reads, the sending
//! side holds [`Conn`]'s mutex) and a reader blocked on the socket never stalls
//! a sender. What the receiving half wants sent (an alert after a record that
//! fails its integrity check, a key update the peer requested) goes out with
//! the next write of the sending half, or at [`Conn::shutdown`]. Without TLS
//! (`--insecure-plaintext`, in-process local targets) a payload is read from
//! the socket straight into the pool buffer.
//! Byte counts ([`Conn::bytes_sent`], [`Rx::bytes_received`]) are socket
//! bytes: TLS records included.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_wire::{
    Authenticator, Data, DataHead, Deframer, ErrorCode, ErrorFrame, Event, Frame, LocalInfo, Notice, PeerInfo, Session,
    Split, WireError, MAX_BODY_LEN, MAX_HANDSHAKE_BODY_LEN,
};

use crate::error::{MoveError, Result};
use crate::records::{Cursor, Opened, Opener, Sealer, HEADER, MAX_PLAIN, OVERHEAD, TAG};
use crate::tls::Established;
use ferry_io::{BufPool, PoolBuf};

/// A connected socket and, for a remote session, the TLS session over it.
#[derive(Debug)]
pub struct Link {
    sock: Sock,
    tls: Option<Established>,
}

impl Link {
    /// The socket (TLS records travel on it under TLS).
    pub fn sock(&self) -> &Sock {
        &self.sock
    }

    /// A socket whose bytes travel as they are (in-process local targets,
    /// `--insecure-plaintext`); the token proofs are bound to zeros.
    pub fn plain(sock: Sock) -> Link {
        Link { sock, tls: None }
    }

    /// A TCP socket with a TLS session established over it.
    pub fn tls(sock: TcpStream, tls: Established) -> Link {
        Link { sock: Sock::Tcp(sock), tls: Some(tls) }
    }

    /// True when the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl From<Sock> for Link {
    fn from(sock: Sock) -> Link {
        Link::plain(sock)
    }
}

/// A connected stream socket: TCP or Unix.
#[derive(Debug)]
pub enum Sock {
    /// TCP (remote targets).
    Tcp(TcpStream),
    /// Unix (in-process local targets, over a socketpair).
    Unix(UnixStream),
}

impl Sock {
    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    /// Shut both directions down (wakes a blocked reader).
    pub fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Shut the reading direction down: wakes a blocked reader, writes still go out.
    pub fn shutdown_read(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Read),
            Sock::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    /// Read timeout (None: block forever).
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(d),
            Sock::Unix(s) => s.set_read_timeout(d),
        }
    }

    /// Write timeout (None: block forever).
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(d),
            Sock::Unix(s) => s.set_write_timeout(d),
        }
    }

    /// TCP keepalive for a session's socket (nothing for a Unix socket): see
    /// [`TCP_KEEPALIVE_IDLE`]. A peer that vanished (host down, cable cut) fails
    /// the connection within a minute even while this end only waits or writes.
    pub fn set_keepalive(&self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => {
                ferry_io::sys::set_tcp_keepalive(s, TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_INTERVAL, TCP_KEEPALIVE_PROBES)
            }
            Sock::Unix(_) => Ok(()),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }

    fn read_vectored(&self, iov: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        loop {
            let r = match self {
                Sock::Tcp(s) => (&*s).read_vectored(iov),
                Sock::Unix(s) => (&*s).read_vectored(iov),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn write_all_vectored(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        let w: &mut dyn Write = match self {
            Sock::Tcp(s) => s,
            Sock::Unix(s) => s,
        };
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match w.write_vectored(bufs) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "connection closed")),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

struct Tx {
    session: Session,
    sock: Sock,
    head: BytesMut,
    bytes_sent: u64,
    /// When this end last wrote to the socket (for [`Conn::keepalive_if_quiet`]).
    last_send: Instant,
    /// Answers the session queues while validating received frames wait for
    /// [`Conn::flush_answers`] (a target's receiving thread never writes).
    defer_answers: bool,
    /// The sending direction of the TLS session, and the records being sent.
    tls: Option<(Sealer, Vec<u8>)>,
}

/// Plaintext sealed into records before they are written (16 records): small
/// enough that the records are still in cache when the kernel copies them.
const TLS_WRITE_CHUNK: usize = 16 * MAX_PLAIN;

impl Tx {
    /// Write whatever the session queued (handshake answers, errors).
    /// Returns the frame bytes written (TLS records not counted).
    fn flush_queued(&mut self) -> io::Result<u64> {
        if let Some(b) = self.session.take_transmit() {
            self.write_all(&mut [IoSlice::new(&b)])?;
            return Ok(b.len() as u64);
        }
        Ok(0)
    }

    /// Write `bufs` in full: as they are, or as TLS records (sealed into `out`
    /// 256 KiB of plaintext at a time, each piece written before the next is
    /// sealed). Counts socket bytes.
    fn write_all(&mut self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        self.last_send = Instant::now();
        let Some((seal, out)) = &mut self.tls else {
            self.bytes_sent += bufs.iter().map(|b| b.len() as u64).sum::<u64>();
            return self.sock.write_all_vectored(bufs);
        };
        let mut cur = Cursor::default();
        loop {
            out.clear();
            // The connection failed (a record from the peer did not decrypt): the
            // alert the sealer put in `out` still goes out, then the error.
            let sealed = seal.seal(bufs, &mut cur, TLS_WRITE_CHUNK, out);
            self.bytes_sent += out.len() as u64;
            self.sock.write_all_vectored(&mut [IoSlice::new(out)])?;
            match sealed {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }

    /// End the TLS stream, best effort: what the receiving half asked for (an
    /// alert after a failed record, which ends it), else close_notify, so the
    /// peer can tell this end from a cut connection.
    fn close_tls(&mut self) {
        if let Some((seal, out)) = &mut self.tls {
            out.clear();
            let _ = seal.close_notify(out);
            if !out.is_empty() {
                let _ = self.sock.set_write_timeout(Some(Duration::from_secs(2)));
                self.bytes_sent += out.len() as u64;
                let _ = self.sock.write_all_vectored(&mut [IoSlice::new(out)]);
            }
        }
    }
}

/// The sending half of a connection, shareable between threads.
pub struct Conn {
    peer: String,
    tx: Mutex<Tx>,
    /// Notices the peer sent (a target's retention warnings), for the job to report.
    notices: Mutex<Vec<Notice>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).finish()
    }
}

/// The receiving half.
pub struct Rx {
    sock: Sock,
    deframer: Deframer,
    peer: String,
    /// Until the peer is authenticated: when the handshake must be over, and how long it was given.
    deadline: Option<(Instant, Duration)>,
    /// After it: how long a read may wait for the peer ([`Rx::set_idle_timeout`]).
    idle: Option<Duration>,
    /// Bytes received so far.
    pub bytes_received: u64,
    /// Data payload bytes read in place under TLS (`Rx::read_direct`), for tests and diagnostics.
    pub bytes_in_place: u64,
    /// The receiving direction of the TLS session, and the records read from the
    /// socket (the one being taken decrypted in place).
    tls: Option<(Opener, BytesMut)>,
    /// Where `Rx::read_direct` reads a payload's ciphertext (made on first use).
    scratch: Vec<u8>,
}

/// Records read in place at most per `readv` (`Rx::read_direct`).
const DIRECT_RECORDS: usize = 32;

/// A data frame's head as one TLS record: what `Rx::read_direct` reads after a
/// payload's last record (the head of the next data frame from a ferry sender).
const NEXT_HEAD_RECORD: usize = HEADER + ferry_wire::HEADER_LEN + ferry_wire::DATA_FIXED_LEN + 1 + TAG;

/// Slack a pool buffer needs past its payload for every record to be decrypted
/// straight into it under TLS (`Rx::read_direct`: the last record's inner content
/// type lands one byte past the payload): give it to [`BufPool::with_slack`].
pub const PAYLOAD_SLACK: usize = 1;

/// One stream byte range of records read apart: `k` records of the `rem`
/// payload bytes still to come (16 KiB of plaintext each but the last), and
/// `tail` bytes after them into `next`.
struct Direct {
    k: usize,
    rem: usize,
    tail: usize,
    hdrs: [[u8; HEADER]; DIRECT_RECORDS],
    tags: [[u8; TAG]; DIRECT_RECORDS],
    next: [u8; NEXT_HEAD_RECORD],
}

impl Direct {
    /// The records of `rem` payload bytes whose plaintext (and the inner content type
    /// after it) fits in `room` bytes.
    fn new(rem: usize, room: usize) -> Direct {
        let total = rem.div_ceil(MAX_PLAIN);
        let mut d = Direct {
            k: 0,
            rem,
            tail: 0,
            hdrs: [[0; HEADER]; DIRECT_RECORDS],
            tags: [[0; TAG]; DIRECT_RECORDS],
            next: [0; NEXT_HEAD_RECORD],
        };
        while d.k < total.min(DIRECT_RECORDS) && d.body(d.k).end <= room {
            d.k += 1;
        }
        if d.k == total {
            d.tail = NEXT_HEAD_RECORD;
        }
        d
    }

    /// Plaintext of record `r`.
    fn plain(&self, r: usize) -> usize {
        (self.rem - r * MAX_PLAIN).min(MAX_PLAIN)
    }

    /// Where record `r` begins in the stream read (`k`: where the tail begins).
    fn start(&self, r: usize) -> usize {
        (0..r).map(|i| HEADER + self.plain(i) + 1 + TAG).sum()
    }

    /// Where record `r`'s plaintext and inner content type go in the payload's buffer.
    fn body(&self, r: usize) -> std::ops::Range<usize> {
        let at = r * MAX_PLAIN;
        at..at + self.plain(r) + 1
    }

    /// Where record `r`'s ciphertext is read in the scratch buffer.
    fn cipher(&self, r: usize) -> std::ops::Range<usize> {
        let at = r * (MAX_PLAIN + 1);
        at..at + self.plain(r) + 1
    }

    /// The pieces of the stream, in order: header, ciphertext, tag of each record, the tail.
    fn iovecs<'a>(&'a mut self, scratch: &'a mut [u8]) -> Vec<io::IoSliceMut<'a>> {
        let mut iov = Vec::with_capacity(3 * self.k + 1);
        let mut rest = &mut scratch[..self.cipher(self.k - 1).end];
        let sizes: Vec<usize> = (0..self.k).map(|r| self.plain(r) + 1).collect();
        for ((h, t), size) in self.hdrs.iter_mut().zip(self.tags.iter_mut()).zip(sizes) {
            let (b, after) = std::mem::take(&mut rest).split_at_mut(size);
            rest = after;
            iov.push(io::IoSliceMut::new(h));
            iov.push(io::IoSliceMut::new(b));
            iov.push(io::IoSliceMut::new(t));
        }
        iov.push(io::IoSliceMut::new(&mut self.next[..self.tail]));
        iov
    }

    /// Put back, in stream order at the end of `out`, what was read from record
    /// `from` on (`got` bytes of the range in all) for the usual path.
    fn gather(&self, from: usize, got: usize, scratch: &[u8], out: &mut BytesMut) {
        let mut at = self.start(from);
        let mut put = |piece: &[u8], at: &mut usize| {
            let end = *at + piece.len();
            if got > *at {
                out.extend_from_slice(&piece[..got.min(end) - *at]);
            }
            *at = end;
        };
        for r in from..self.k {
            put(&self.hdrs[r], &mut at);
            put(&scratch[self.cipher(r)], &mut at);
            put(&self.tags[r], &mut at);
        }
        put(&self.next[..self.tail], &mut at);
    }
}

/// Read at most `n` bytes from `sock` onto the end of `buf` (never into the rest
/// of its spare capacity: under TLS what follows may be a payload's records, for
/// `Rx::read_direct`). Small reads of a record's rest or a data frame's head
/// record, or a large one when nothing can follow but what the caller reads next.
fn read_at_most(sock: &Sock, buf: &mut BytesMut, n: usize) -> io::Result<usize> {
    if n >= TLS_READ_SIZE {
        return ferry_io::sys::readv_into(sock.fd(), &mut [], buf, n);
    }
    let at = buf.len();
    buf.resize(at + n, 0);
    let r = sock.read_vectored(&mut [io::IoSliceMut::new(&mut buf[at..])]);
    buf.truncate(at + *r.as_ref().unwrap_or(&0));
    r
}

/// The end of a TLS stream without close_notify: inside a record, or between
/// records (a cut stream, or a peer that stopped: never a clean end).
fn tls_eof(peer: &str, in_record: bool) -> MoveError {
    let what = if in_record {
        "connection closed in the middle of a TLS record"
    } else {
        "connection closed without a TLS close_notify: the peer stopped or the stream was cut"
    };
    MoveError::Net { peer: peer.to_string(), source: io::Error::new(io::ErrorKind::UnexpectedEof, what) }
}

/// Ciphertext read from the socket at once (TLS).
const TLS_READ_SIZE: usize = 256 << 10;

impl std::fmt::Debug for Rx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rx").field("peer", &self.peer).finish()
    }
}

/// How much to read at once.
const READ_SIZE: usize = 1 << 20;

/// How much to read at once before the peer is authenticated: an unauthenticated
/// connection holds a few KiB of buffer (its frames are at most 8 KiB), not a megabyte.
const HANDSHAKE_READ_SIZE: usize = 4096;

/// TCP keepalive of a session's socket ([`Sock::set_keepalive`]): the first probe
/// after 30 s without traffic, then every 10 s; 3 unanswered probes (or data
/// unacknowledged for 30 + 3·10 = 60 s, `TCP_USER_TIMEOUT`) fail the connection.
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// See [`TCP_KEEPALIVE_IDLE`].
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`TCP_KEEPALIVE_IDLE`].
pub const TCP_KEEPALIVE_PROBES: u32 = 3;

/// A source that has written nothing for this long sends a Keepalive frame
/// ([`Conn::keepalive_if_quiet`]): a target's idle timeout must be longer (its
/// smallest allowed value is twice this).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How much to read at once into the receive buffer while data payloads go to
/// pool buffers: after a payload, the next frame's head and a little of its
/// payload, which is then copied.
const SPLIT_READ_SIZE: usize = 4096;

/// A frame, or a data frame whose payload was read into a pool buffer.
#[derive(Debug)]
pub enum Received {
    /// Any frame but a data frame.
    Frame(Frame),
    /// A data frame, validated; its payload (`payload_len` bytes) is in the buffer.
    Data(DataHead, PoolBuf),
}

impl Rx {
    /// Next frame from the peer; `Ok(None)` when the peer closed the connection cleanly between frames.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            match self.deframer.next_frame() {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(source) => return Err(MoveError::Wire { peer: self.peer.clone(), source }),
            }
            if !self.read_more(READ_SIZE, TLS_READ_SIZE)? {
                return Ok(None);
            }
        }
    }

    /// Next frame from the peer, a data frame's payload read into a buffer of
    /// `pool` (waiting for one to be free) and the frame validated against the
    /// session (`conn`'s) on the way: the payload comes from the socket straight
    /// into that buffer, except for the few bytes read with the frame's head.
    /// Other frames are returned as [`Rx::next_frame`] returns them, still to be
    /// validated. A payload longer than the pool's buffers is an error.
    pub fn next_received(&mut self, pool: &BufPool, conn: &Conn) -> Result<Option<Received>> {
        self.next_split_received(pool, Some(conn))
    }

    /// As [`Rx::next_received`], but a data frame's head is not validated against a
    /// session: for a stream of a striped session, whose frames the session validates
    /// in sequence order once they are merged (`target/merge.rs`).
    pub fn next_unvalidated(&mut self, pool: &BufPool) -> Result<Option<Received>> {
        self.next_split_received(pool, None)
    }

    /// [`Rx::next_received`], validating a data frame's head against `session` if given.
    fn next_split_received(&mut self, pool: &BufPool, session: Option<&Conn>) -> Result<Option<Received>> {
        loop {
            match self.deframer.next_split() {
                Ok(Some(Split::Frame(f))) => return Ok(Some(Received::Frame(f))),
                Ok(Some(Split::Data(head))) => {
                    if let Some(conn) = session {
                        conn.handle_data_head(&head)?;
                    }
                    let buf = self.read_payload(&head, pool)?;
                    return Ok(Some(Received::Data(head, buf)));
                }
                Ok(None) => {}
                Err(source) => return Err(MoveError::Wire { peer: self.peer.clone(), source }),
            }
            if !self.read_more(SPLIT_READ_SIZE, NEXT_HEAD_RECORD)? {
                return Ok(None);
            }
        }
    }

    /// Another handle to the socket (to shut its reading down from another thread).
    pub fn sock_clone(&self) -> io::Result<Sock> {
        self.sock.try_clone()
    }

    /// The peer, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Read up to `size` more bytes (or what the deframer reserved) into the receive buffer;
    /// false when the peer closed the connection cleanly between frames. Under TLS a read
    /// of the socket asks for `tls_size` bytes, or the rest of a record begun: where a data
    /// payload may follow, as much as a data frame's head record, so that the payload's
    /// records are still in the socket for `Rx::read_direct`.
    fn read_more(&mut self, size: usize, tls_size: usize) -> Result<bool> {
        let size = match self.deadline {
            Some((by, limit)) => {
                // The whole handshake has a deadline: each read waits only for what is left of it.
                let left = by.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(self.handshake_timeout(limit));
                }
                self.sock.set_read_timeout(Some(left)).map_err(|e| self.net(e))?;
                size.min(HANDSHAKE_READ_SIZE)
            }
            None => size,
        };
        let n = if self.tls.is_some() {
            let mut buf = std::mem::take(self.deframer.buffer_mut());
            let r = self.read_tls(&mut buf, size, tls_size);
            *self.deframer.buffer_mut() = buf;
            r?
        } else {
            let n = ferry_io::sys::readv_into(self.sock.fd(), &mut [], self.deframer.buffer_mut(), size)
                .map_err(|e| self.net(e))?;
            self.bytes_received += n as u64;
            n
        };
        if n == 0 {
            if self.deframer.buffered() == 0 {
                return Ok(false);
            }
            return Err(self.eof_in_frame());
        }
        Ok(true)
    }

    /// Read the payload of the data frame `head` into a buffer of `pool`: what is buffered
    /// already, then the rest from the socket, each read going on into the receive buffer
    /// for the next frame's head. The receive buffer is empty while the payload is read
    /// (every buffered byte of it was taken first); it is set aside for each read, so the
    /// deframer accounts for the payload bytes before it holds the bytes that followed them.
    fn read_payload(&mut self, head: &DataHead, pool: &BufPool) -> Result<PoolBuf> {
        let len = head.payload_len as usize;
        if len > pool.buf_size() {
            let source = WireError::FieldTooLong {
                frame: "Data",
                field: "payload",
                len: len as u64,
                max: pool.buf_size() as u64,
            };
            return Err(MoveError::Wire { peer: self.peer.clone(), source });
        }
        let mut buf = pool.get();
        let mut filled = self.deframer.take_payload(&mut buf.spare_mut()[..len]);
        if self.tls.is_some() {
            self.read_payload_tls(buf.spare_mut(), filled, len)?;
            filled = len;
        }
        let dst = &mut buf.spare_mut()[..len];
        while filled < len {
            let mut next = std::mem::take(self.deframer.buffer_mut());
            let read = ferry_io::sys::readv_into(self.sock.fd(), &mut dst[filled..], &mut next, SPLIT_READ_SIZE);
            let n = read.map_err(|e| self.net(e))?;
            self.bytes_received += n as u64;
            if n == 0 {
                return Err(self.eof_in_frame());
            }
            let direct = n.min(len - filled);
            filled += direct;
            self.deframer.payload_received(direct);
            *self.deframer.buffer_mut() = next;
        }
        buf.set_len(len);
        Ok(buf)
    }

    /// A read error; a read that timed out says which limit it ran into.
    fn net(&self, source: io::Error) -> MoveError {
        if source.kind() == io::ErrorKind::WouldBlock {
            if let Some((_, limit)) = self.deadline {
                return self.handshake_timeout(limit);
            }
            if let Some(idle) = self.idle {
                return MoveError::Net {
                    peer: self.peer.clone(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "nothing received for {}: the peer stalled or vanished (idle timeout; \
                             `ferry serve --idle-timeout`)",
                            human_duration(idle)
                        ),
                    ),
                };
            }
        }
        MoveError::Net { peer: self.peer.clone(), source }
    }

    fn handshake_timeout(&self, limit: Duration) -> MoveError {
        MoveError::Net {
            peer: self.peer.clone(),
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the handshake did not finish within {}", human_duration(limit)),
            ),
        }
    }

    /// Up to `max` bytes of plaintext of the TLS session appended to `dst` (the
    /// deframer's buffer): what is left of the record opened last, or else the
    /// next record in the receive buffer (decrypted in place, its plaintext
    /// copied out while it is still in cache), reading the socket (`size`
    /// bytes, or the rest of a record begun) only when neither gave anything.
    /// Returns the bytes given, 0 at the end of the stream (close_notify); the
    /// end of the TCP stream without close_notify is an error.
    fn read_tls(&mut self, dst: &mut BytesMut, max: usize, size: usize) -> Result<usize> {
        let Some((open, cipher)) = &mut self.tls else { unreachable!("read_tls without TLS") };
        let peer = &self.peer;
        let mut got = 0;
        loop {
            let mut need = 0;
            while got < max {
                let p = open.plaintext(cipher);
                if !p.is_empty() {
                    let k = p.len().min(max - got);
                    dst.extend_from_slice(&p[..k]);
                    open.consume(cipher, k);
                    got += k;
                    continue;
                }
                if got > 0 {
                    // One record at a time into the deframer: a data payload's records
                    // that follow stay ciphertext, for `read_payload` to open in place.
                    break;
                }
                match open.open(cipher) {
                    Ok(Opened::Data) => {}
                    Ok(Opened::NeedMore(n)) => {
                        need = n;
                        break;
                    }
                    Ok(Opened::Closed) => return Ok(got),
                    Err(source) => return Err(MoveError::Tls { peer: peer.clone(), source }),
                }
            }
            if got > 0 {
                return Ok(got);
            }
            // A record that has begun is read to its end and no further (the records
            // after it may be a payload's, read in place); otherwise `size`, and before
            // authentication reads stay small (see `read_more`).
            let size = if !cipher.is_empty() {
                need
            } else if self.deadline.is_some() {
                size.min(HANDSHAKE_READ_SIZE)
            } else {
                size.min(TLS_READ_SIZE)
            };
            let n = match read_at_most(&self.sock, cipher, size.max(need)) {
                Ok(n) => n,
                // As for a plaintext read: a timeout is the handshake deadline or the idle timeout.
                Err(e) => return Err(self.net(e)),
            };
            self.bytes_received += n as u64;
            if n == 0 {
                return Err(tls_eof(peer, !cipher.is_empty()));
            }
        }
    }

    /// Read the rest of a data payload under TLS into `dst` (a pool buffer's whole
    /// capacity, see [`PAYLOAD_SLACK`]; `filled` bytes are in): records at the front of the receive buffer
    /// are opened there and copied, and from a record boundary on the payload's
    /// records are read in place (`Rx::read_direct`).
    fn read_payload_tls(&mut self, dst: &mut [u8], mut filled: usize, len: usize) -> Result<()> {
        while filled < len {
            let Some((open, cipher)) = &mut self.tls else { unreachable!("read_payload_tls without TLS") };
            let p = open.plaintext(cipher);
            if !p.is_empty() {
                let k = p.len().min(len - filled);
                dst[filled..filled + k].copy_from_slice(&p[..k]);
                open.consume(cipher, k);
                filled += k;
                self.deframer.payload_received(k);
                continue;
            }
            if cipher.is_empty() {
                let n = self.read_direct(dst, filled, len)?;
                self.deframer.payload_received(n);
                self.bytes_in_place += n as u64;
                filled += n;
                let Some((_, cipher)) = &self.tls else { unreachable!() };
                if n > 0 || !cipher.is_empty() {
                    continue;
                }
                // No room for a record in place: the next one through the receive buffer.
            }
            let Some((open, cipher)) = &mut self.tls else { unreachable!() };
            let need = match open.open(cipher) {
                Ok(Opened::Data) => continue,
                Ok(Opened::NeedMore(n)) => n,
                Ok(Opened::Closed) => return Err(self.eof_in_frame()),
                Err(source) => return Err(MoveError::Tls { peer: self.peer.clone(), source }),
            };
            let n = read_at_most(&self.sock, cipher, need).map_err(|e| self.net(e))?;
            self.bytes_received += n as u64;
            if n == 0 {
                let Some((_, cipher)) = &self.tls else { unreachable!() };
                return Err(tls_eof(&self.peer, !cipher.is_empty()));
            }
        }
        Ok(())
    }

    /// The zero-copy receive path (PROTOCOL.md, "TLS record layout"): with the
    /// receive buffer empty at a record boundary inside a payload of which
    /// `len - filled` bytes are still to come, read the records a ferry sender
    /// makes of it (16 KiB of plaintext each but the last) from the socket a few
    /// at a time with one `readv`: each record's header and tag into small
    /// arrays, its ciphertext (data and inner content type) into a scratch buffer
    /// that stays in cache, and decrypt it from there straight to its final
    /// offset in `dst` (AES-GCM out of place: the plaintext is never copied). The
    /// inner content type lands on the byte after the record's data, which the
    /// next record overwrites; past the payload's last record it needs a byte of
    /// slack in `dst` ([`PAYLOAD_SLACK`]); without it the records that do not fit
    /// go through the receive buffer. After the payload's last record the same
    /// `readv` reads as much as a data frame's head record into the receive
    /// buffer, so a stream of data frames needs no other read.
    ///
    /// Each header is checked as soon as it is in: a record that is not the one
    /// expected (another peer's layout, a key update, an alert) ends the direct
    /// reading; what was read from it on goes to the front of the receive buffer,
    /// in stream order, for the usual path. So this never waits for bytes beyond a
    /// record the peer has begun, whatever its layout. Returns the payload bytes
    /// given (0 when not even one record fits in `dst`, or the first header was
    /// not the one expected).
    fn read_direct(&mut self, dst: &mut [u8], filled: usize, len: usize) -> Result<usize> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(DIRECT_RECORDS * (MAX_PLAIN + 1), 0);
        let r = self.read_direct_via(&mut scratch, &mut dst[filled..], len - filled);
        self.scratch = scratch;
        r
    }

    fn read_direct_via(&mut self, scratch: &mut [u8], body: &mut [u8], rem: usize) -> Result<usize> {
        let mut d = Direct::new(rem, body.len());
        if d.k == 0 {
            return Ok(0);
        }
        let (mut got, mut done, mut checked) = (0usize, 0usize, 0usize);
        let mut fallback = None;
        while done < d.k {
            let n = {
                let mut iov = d.iovecs(scratch);
                let mut iov = &mut iov[..];
                io::IoSliceMut::advance_slices(&mut iov, got);
                self.sock.read_vectored(iov)
            };
            let n = n.map_err(|e| self.net(e))?;
            self.bytes_received += n as u64;
            if n == 0 {
                let at_boundary = got == d.start(done);
                return Err(if at_boundary { self.eof_in_frame() } else { tls_eof(&self.peer, true) });
            }
            got += n;
            // Check each header that came in, open each record that is whole.
            while checked < d.k && fallback.is_none() && got >= d.start(checked) + HEADER {
                if d.hdrs[checked] != Opener::direct_header(d.plain(checked)) {
                    fallback = Some(checked);
                } else {
                    checked += 1;
                }
            }
            let Some((open, cipher)) = &mut self.tls else { unreachable!("read_direct without TLS") };
            while done < checked && got >= d.start(done + 1) {
                let out = &mut body[d.body(done)];
                match open.open_direct(&d.hdrs[done], &scratch[d.cipher(done)], &d.tags[done], out) {
                    Ok(Some(m)) if m == d.plain(done) => done += 1,
                    Ok(Some(m)) => {
                        // Padding, or a key update of just that length: the records from
                        // here on are not where they were expected.
                        d.gather(done + 1, got, scratch, cipher);
                        return Ok(d.body(done).start + m);
                    }
                    Ok(None) => return Err(self.eof_in_frame()),
                    Err(source) => return Err(MoveError::Tls { peer: self.peer.clone(), source }),
                }
            }
            if fallback == Some(done) {
                d.gather(done, got, scratch, cipher);
                return Ok(done * MAX_PLAIN);
            }
        }
        let Some((_, cipher)) = &mut self.tls else { unreachable!("read_direct without TLS") };
        d.gather(d.k, got, scratch, cipher);
        Ok(rem.min(d.k * MAX_PLAIN))
    }

    fn eof_in_frame(&self) -> MoveError {
        MoveError::Net {
            peer: self.peer.clone(),
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in the middle of a frame"),
        }
    }

    /// Set the read timeout of the underlying socket.
    pub fn set_timeout(&self, d: Option<Duration>) {
        let _ = self.sock.set_read_timeout(d);
    }

    /// From now on a read that waits `idle` for the peer fails (a target's idle timeout:
    /// a stalled or vanished source releases its replica within that time).
    pub fn set_idle_timeout(&mut self, idle: Duration) {
        self.idle = Some(idle);
        let _ = self.sock.set_read_timeout(Some(idle));
    }

    /// The peer proved itself: frames may be as large as the protocol allows, reads block
    /// as long as they need (unless [`Rx::set_idle_timeout`] says otherwise).
    fn authenticated(&mut self) {
        self.deadline = None;
        self.deframer.set_max_body_len(MAX_BODY_LEN);
        let _ = self.sock.set_read_timeout(None);
    }
}

/// 90 s, 2 min, 1.5 s: a duration for messages.
fn human_duration(d: Duration) -> String {
    match d.as_millis() {
        ms if ms % 60_000 == 0 && ms > 0 => format!("{} min", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{} s", ms / 1000),
        ms => format!("{:.1} s", ms as f64 / 1000.0),
    }
}

impl Conn {
    fn new(
        peer: String,
        session: Session,
        sock: Sock,
        tls: Option<Established>,
        deadline: (Instant, Duration),
    ) -> Result<(Arc<Conn>, Rx)> {
        let rsock = sock.try_clone().map_err(|source| MoveError::Net { peer: peer.clone(), source })?;
        let (seal, open) = match tls {
            Some(t) => (Some(t.records.sealer), Some((t.records.opener, BytesMut::from(&t.leftover[..])))),
            None => (None, None),
        };
        let conn = Arc::new(Conn {
            peer: peer.clone(),
            tx: Mutex::new(Tx {
                session,
                sock,
                head: BytesMut::with_capacity(256),
                bytes_sent: 0,
                last_send: Instant::now(),
                defer_answers: false,
                tls: seal.map(|s| (s, Vec::with_capacity(TLS_WRITE_CHUNK + TLS_WRITE_CHUNK / MAX_PLAIN * OVERHEAD))),
            }),
            notices: Mutex::new(Vec::new()),
        });
        // Until the peer is authenticated its frames are small (PROTOCOL.md, "Limits").
        let mut deframer = Deframer::new();
        deframer.set_max_body_len(MAX_HANDSHAKE_BODY_LEN);
        Ok((
            conn,
            Rx {
                sock: rsock,
                deframer,
                peer,
                deadline: Some(deadline),
                idle: None,
                bytes_received: 0,
                bytes_in_place: 0,
                scratch: Vec::new(),
                tls: open,
            },
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Tx> {
        // A panic in another thread holding the lock is a bug; keep going with the state it left.
        self.tx.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer's address, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Bytes written to the socket so far.
    pub fn bytes_sent(&self) -> u64 {
        self.lock().bytes_sent
    }

    fn net_err(&self, source: io::Error) -> MoveError {
        MoveError::Net { peer: self.peer.clone(), source }
    }

    /// Validate and send a frame; returns the frame's bytes (without TLS record overhead).
    pub fn send(&self, frame: &Frame) -> Result<u64> {
        if let Frame::Data(d) = frame {
            return self.send_data(d);
        }
        let mut tx = self.lock();
        tx.session.send(frame).map_err(|source| MoveError::Wire { peer: self.peer.clone(), source })?;
        tx.flush_queued().map_err(|e| self.net_err(e))
    }

    /// Validate and send a data frame: header and payload in one vectored
    /// write, the payload never copied (without TLS). Returns the frame's bytes.
    pub fn send_data(&self, data: &Data) -> Result<u64> {
        let frame = Frame::Data(data.clone()); // clones the Bytes handle, not the payload
        let mut tx = self.lock();
        tx.session.prepare_send(&frame).map_err(|source| MoveError::Wire { peer: self.peer.clone(), source })?;
        tx.flush_queued().map_err(|e| self.net_err(e))?;
        let tx = &mut *tx;
        tx.head.clear();
        data.encode_head(&mut tx.head);
        let head = std::mem::take(&mut tx.head);
        let n = (head.len() + data.payload.len()) as u64;
        let r = tx.write_all(&mut [IoSlice::new(&head), IoSlice::new(&data.payload)]);
        tx.head = head;
        r.map_err(|e| MoveError::Net { peer: self.peer.clone(), source: e })?;
        Ok(n)
    }

    /// Validate `frame` for sending on this connection's session and give its
    /// bytes without writing them: a striped session's frames are validated by
    /// its first connection's session, in sequence order, and written by
    /// whichever connection carries them ([`Conn::write_sequenced`]). For a data
    /// frame the bytes are its head (the payload is the caller's).
    pub fn sequence(&self, frame: &Frame) -> Result<bytes::Bytes> {
        let mut tx = self.lock();
        let wire = |source| MoveError::Wire { peer: self.peer.clone(), source };
        if let Frame::Data(d) = frame {
            tx.session.prepare_send(frame).map_err(wire)?;
            let mut head = BytesMut::with_capacity(ferry_wire::HEADER_LEN + ferry_wire::DATA_FIXED_LEN);
            d.encode_head(&mut head);
            return Ok(head.freeze());
        }
        tx.session.send(frame).map_err(wire)?;
        Ok(tx.session.take_transmit().unwrap_or_default())
    }

    /// Write frame number `seq` of a striped session (its bytes from
    /// [`Conn::sequence`] on the first connection, and a data frame's payload)
    /// after a Seq frame, in one write under this connection's lock, so nothing
    /// comes between them. Returns the bytes written (Seq included, TLS records not).
    pub fn write_sequenced(&self, seq: u64, head: &[u8], payload: &[u8]) -> Result<u64> {
        // Not checked against this connection's session: the first connection's validated
        // the frame (and is closed once it validated the Close).
        let mut tx = self.lock();
        let mut s = BytesMut::with_capacity(ferry_wire::HEADER_LEN + ferry_wire::SEQ_BODY_LEN);
        Frame::Seq(ferry_wire::Seq { seq }).encode(&mut s);
        let n = (s.len() + head.len() + payload.len()) as u64;
        tx.write_all(&mut [IoSlice::new(&s), IoSlice::new(head), IoSlice::new(payload)])
            .map_err(|e| self.net_err(e))?;
        Ok(n)
    }

    /// Validate a received frame against the session; answers the session
    /// queued (handshake, errors) are written at once. A Notice is kept for
    /// [`Conn::take_notices`] (whichever thread reads it) and not returned.
    pub fn handle(&self, frame: Frame) -> Result<Option<Event>> {
        let mut tx = self.lock();
        let r = tx.session.handle_frame(frame);
        if !tx.defer_answers {
            let _ = tx.flush_queued();
        }
        drop(tx);
        match r {
            Ok(Some(Event::Frame(Frame::Notice(n)))) => {
                self.notices.lock().unwrap_or_else(|p| p.into_inner()).push(n);
                Ok(None)
            }
            r => r.map_err(|source| MoveError::Wire { peer: self.peer.clone(), source }),
        }
    }

    /// The Notices received so far, oldest first (taken).
    pub fn take_notices(&self) -> Vec<Notice> {
        std::mem::take(&mut *self.notices.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Validate the head of a data frame whose payload the receiver reads itself.
    pub fn handle_data_head(&self, head: &DataHead) -> Result<()> {
        let mut tx = self.lock();
        let r = tx.session.handle_data_head(head);
        if !tx.defer_answers {
            let _ = tx.flush_queued();
        }
        r.map_err(|source| MoveError::Wire { peer: self.peer.clone(), source })
    }

    /// Report an error to the peer (best effort) and close the session.
    pub fn send_error(&self, code: ErrorCode, message: &str) {
        let mut tx = self.lock();
        if tx.session.is_closed() {
            return;
        }
        let mut msg = message.to_string();
        msg.truncate(ferry_wire::MAX_MESSAGE_LEN);
        while !message.is_char_boundary(msg.len()) {
            msg.pop();
        }
        let _ = tx.session.send(&Frame::Error(ErrorFrame { code, message: msg }));
        let _ = tx.flush_queued();
    }

    /// From now on, answers the session queues while [`Conn::handle`] or
    /// [`Conn::handle_data_head`] validate a received frame (an Error frame for a
    /// refused one) are not written by the validating thread: they wait for
    /// [`Conn::flush_answers`] from the thread that owns the writes.
    pub fn defer_answers(&self) {
        self.lock().defer_answers = true;
    }

    /// Write the answers the session queued (see [`Conn::defer_answers`]).
    pub fn flush_answers(&self) -> Result<()> {
        self.lock().flush_queued().map(|_| ()).map_err(|e| self.net_err(e))
    }

    /// Shut the socket down: wakes the receiver. Under TLS the stream ends
    /// first with close_notify (a clean end: the peer's receiver takes it as the
    /// end of the stream, where the TCP end alone is an error), or with the alert
    /// the receiving half asked for (a record that failed its integrity check),
    /// so the peer learns why.
    pub fn shutdown(&self) {
        let mut tx = self.lock();
        tx.close_tls();
        tx.sock.shutdown();
    }

    /// Send a Keepalive frame when nothing was written for `quiet` (a source that is busy
    /// but has nothing to send, so that the target's idle timeout does not end the session).
    /// Does nothing while another thread is writing (it holds the sending half) or once the
    /// session is closed.
    pub fn keepalive_if_quiet(&self, quiet: Duration) -> Result<()> {
        let mut tx = match self.tx.try_lock() {
            Ok(tx) => tx,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        if tx.last_send.elapsed() < quiet || tx.session.is_closed() || tx.session.peer().is_none() {
            return Ok(());
        }
        tx.session.send(&Frame::Keepalive).map_err(|source| MoveError::Wire { peer: self.peer.clone(), source })?;
        tx.flush_queued().map(|_| ()).map_err(|e| self.net_err(e))
    }

    /// Set the write timeout: a peer that stops reading fails the send instead of hanging.
    pub fn set_write_timeout(&self, d: Option<Duration>) {
        let _ = self.lock().sock.set_write_timeout(d);
    }
}

/// Time a source allows the whole handshake (from connecting to AuthOk).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Local identity for the handshake: host name, software version, a fresh nonce.
pub fn local_info() -> LocalInfo {
    LocalInfo {
        name: ferry_io::sys::hostname(),
        software: format!("ferry {}", env!("CARGO_PKG_VERSION")),
        nonce: crate::auth::random_bytes::<32>(),
        features: ferry_wire::FEATURES_V1,
    }
}

fn handshake(conn: &Arc<Conn>, rx: &mut Rx, side: &'static str) -> Result<PeerInfo> {
    {
        let mut tx = conn.lock();
        tx.flush_queued().map_err(|e| conn.net_err(e))?;
    }
    loop {
        let frame = match rx.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return Err(MoveError::PeerGone { peer: conn.peer.clone(), side }),
            Err(e) => {
                // A frame the receiver refused (too large, bad header): the peer learns why.
                if let MoveError::Wire { source, .. } = &e {
                    conn.send_error(source.code(), &source.to_string());
                }
                return Err(e);
            }
        };
        match conn.handle(frame)? {
            Some(Event::Authenticated(peer)) => {
                rx.authenticated();
                return Ok(peer);
            }
            Some(Event::Frame(f)) => {
                return Err(MoveError::Wire {
                    peer: conn.peer.clone(),
                    source: ferry_wire::WireError::IllegalFrame {
                        frame: f.name(),
                        direction: "received",
                        state: "handshake",
                    },
                })
            }
            None => {}
        }
    }
}

/// Connect as the client (source): handshake and authentication within
/// [`HANDSHAKE_TIMEOUT`], over TLS when `link` has a TLS session (the proofs are bound to it).
pub fn client_handshake(
    link: impl Into<Link>,
    peer: &str,
    auth: Arc<dyn Authenticator>,
) -> Result<(Arc<Conn>, Rx, PeerInfo)> {
    let Link { sock, tls } = link.into();
    let binding = tls.as_ref().map_or([0; 32], |t| t.binding);
    let session = Session::client(local_info(), auth, binding);
    let deadline = (Instant::now() + HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT);
    let (conn, mut rx) = Conn::new(peer.to_string(), session, sock, tls, deadline)?;
    let info = handshake(&conn, &mut rx, "target")?;
    Ok((conn, rx, info))
}

/// Accept as the server (target): handshake and authentication, as for [`client_handshake`].
pub fn server_handshake(
    link: impl Into<Link>,
    peer: &str,
    auth: Arc<dyn Authenticator>,
) -> Result<(Arc<Conn>, Rx, PeerInfo)> {
    server_handshake_within(link, peer, auth, Instant::now(), HANDSHAKE_TIMEOUT)
}

/// Accept as the server: the whole handshake must be over `limit` after `since` (when the
/// connection was accepted), however the peer spreads its bytes.
pub fn server_handshake_within(
    link: impl Into<Link>,
    peer: &str,
    auth: Arc<dyn Authenticator>,
    since: Instant,
    limit: Duration,
) -> Result<(Arc<Conn>, Rx, PeerInfo)> {
    let Link { sock, tls } = link.into();
    let binding = tls.as_ref().map_or([0; 32], |t| t.binding);
    let session = Session::server(local_info(), auth, binding);
    let (conn, mut rx) = Conn::new(peer.to_string(), session, sock, tls, (since + limit, limit))?;
    let info = handshake(&conn, &mut rx, "source")?;
    Ok((conn, rx, info))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::auth::TokenAuth;
    use crate::tls::{self, ClientTrust, ServerIdentity};
    use ferry_wire::Data;

    /// Both ends of a TLS connection over loopback TCP, past the handshake
    /// (the wire sessions unused: frames go through `Tx::write_all`, limits lifted).
    fn tls_pair() -> ((Arc<Conn>, Rx), (Arc<Conn>, Rx)) {
        let dir = tempfile::tempdir().unwrap();
        let id = ServerIdentity::load_or_create(dir.path()).unwrap();
        let trust = ClientTrust { fingerprint: Some(id.fingerprint()), ..ClientTrust::default() };
        let cfg = id.server_config().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let limit = Duration::from_secs(10);
        let client = std::thread::spawn(move || {
            let mut sock = TcpStream::connect(&addr).unwrap();
            let est = tls::connect(&mut sock, &addr, &trust).unwrap();
            let session = Session::client(local_info(), Arc::new(TokenAuth::new(b"token")), est.binding);
            Conn::new("target".into(), session, Sock::Tcp(sock), Some(est), (Instant::now() + limit, limit)).unwrap()
        });
        let (mut sock, _) = listener.accept().unwrap();
        let est = tls::accept(&mut sock, "source", &cfg, Instant::now() + limit).unwrap();
        let session = Session::server(local_info(), Arc::new(TokenAuth::new(b"token")), est.binding);
        let server =
            Conn::new("source".into(), session, Sock::Tcp(sock), Some(est), (Instant::now() + limit, limit)).unwrap();
        let mut client = client.join().unwrap();
        client.1.authenticated();
        let mut server = server;
        server.1.authenticated();
        (client, server)
    }

    fn data_frame(chunk: u64, len: usize) -> (BytesMut, Vec<u8>) {
        let payload: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + chunk * 13) as u8).collect();
        let d = Data {
            disk: 0,
            chunk,
            logical_len: len as u32,
            codec: ferry_wire::Codec::None,
            digest: [chunk as u8; 32],
            payload: bytes::Bytes::new(),
        };
        let mut head = BytesMut::new();
        // The head announces `len` payload bytes (the payload itself travels after it).
        Data { payload: bytes::Bytes::from(payload.clone()), ..d }.encode_head(&mut head);
        (head, payload)
    }

    /// Payload sizes around record boundaries, then a whole chunk, a few times.
    const SIZES: [usize; 9] = [1, MAX_PLAIN - 1, MAX_PLAIN, MAX_PLAIN + 1, 3 * MAX_PLAIN + 7, 65536, 65536, 2, 65536];

    /// Receive `SIZES` as data frames into pool buffers; each payload checked byte for byte.
    fn receive_sizes(rx: &mut Rx, pool: &BufPool) {
        for (i, &len) in SIZES.iter().enumerate() {
            let (_, want) = data_frame(i as u64, len);
            match rx.next_unvalidated(pool).unwrap() {
                Some(Received::Data(head, buf)) => {
                    assert_eq!((head.chunk, head.payload_len as usize), (i as u64, len));
                    assert!(buf[..] == want[..], "payload {i} ({len} bytes) arrives intact");
                }
                other => panic!("frame {i}: {other:?}"),
            }
        }
    }

    /// A ferry sender's payloads start on a record boundary, so the receiver reads every
    /// one of their records from the socket in place, into the pool buffer: all payload
    /// bytes, each frame's head read alone, whatever the timing of the two ends.
    #[test]
    fn tls_payloads_from_a_ferry_sender_are_read_in_place() {
        let ((src, _src_rx), (_dst, mut rx)) = tls_pair();
        let (go, wait) = std::sync::mpsc::channel();
        let sender = std::thread::spawn(move || {
            // A frame read the usual way first: the receive buffer grows for a large read,
            // which must not take the payloads' records that come after it.
            let mut ka = BytesMut::new();
            Frame::Keepalive.encode(&mut ka);
            src.lock().write_all(&mut [IoSlice::new(&ka)]).unwrap();
            wait.recv().unwrap();
            for (i, &len) in SIZES.iter().enumerate() {
                let (head, payload) = data_frame(i as u64, len);
                src.lock().write_all(&mut [IoSlice::new(&head), IoSlice::new(&payload)]).unwrap();
            }
            src
        });
        assert!(matches!(rx.next_frame(), Ok(Some(Frame::Keepalive))));
        go.send(()).unwrap();
        let pool = BufPool::with_slack(2, 65536, PAYLOAD_SLACK);
        receive_sizes(&mut rx, &pool);
        assert_eq!(rx.bytes_in_place, SIZES.iter().sum::<usize>() as u64, "every payload byte read in place");
        let src = sender.join().unwrap();
        // And the end: close_notify, then the clean end of the stream.
        src.shutdown();
        assert!(matches!(rx.next_frame(), Ok(None)));
        // Without slack in the pool's buffers the last record of a full chunk goes
        // through the receive buffer; the bytes are the same.
        let ((src, _src_rx), (_dst, mut rx)) = tls_pair();
        let sender = std::thread::spawn(move || {
            for (i, &len) in SIZES.iter().enumerate() {
                let (head, payload) = data_frame(i as u64, len);
                src.lock().write_all(&mut [IoSlice::new(&head), IoSlice::new(&payload)]).unwrap();
            }
        });
        receive_sizes(&mut rx, &BufPool::new(2, 65536));
        sender.join().unwrap();
        assert!(rx.bytes_in_place > 0 && rx.bytes_in_place < SIZES.iter().sum::<usize>() as u64);
    }

    /// Records laid out as another TLS peer may lay them out (16 KiB records across frame
    /// boundaries, key updates every few records) end the in-place reading at the first
    /// header that is not the one expected, and the bytes already read go the usual way:
    /// every payload arrives intact.
    #[test]
    fn tls_payloads_in_any_record_layout_arrive_intact() {
        let ((src, _src_rx), (_dst, mut rx)) = tls_pair();
        let sender = std::thread::spawn(move || {
            let mut stream = Vec::new();
            for (i, &len) in SIZES.iter().enumerate() {
                let (head, payload) = data_frame(i as u64, len);
                stream.extend_from_slice(&head);
                stream.extend_from_slice(&payload);
            }
            let mut tx = src.lock();
            tx.tls.as_mut().unwrap().0.set_limit(3);
            // One buffer: records run over frame boundaries, every 1000 bytes a write.
            for piece in stream.chunks(1000) {
                tx.write_all(&mut [IoSlice::new(piece)]).unwrap();
            }
            drop(tx);
            src
        });
        let pool = BufPool::with_slack(2, 65536, PAYLOAD_SLACK);
        receive_sizes(&mut rx, &pool);
        let src = sender.join().unwrap();
        src.shutdown();
        assert!(matches!(rx.next_frame(), Ok(None)));
    }

    /// Ending a TLS connection: close_notify (sent by `Conn::shutdown`) is the clean end of
    /// the stream; the TCP end without it, between records or inside one, is an error.
    #[test]
    fn a_tls_stream_ends_cleanly_only_with_close_notify() {
        // close_notify: the clean end, from either side.
        let ((c, _crx), (_s, mut srx)) = tls_pair();
        c.shutdown();
        assert!(matches!(srx.next_frame(), Ok(None)));
        let ((_c, mut crx), (s, _srx)) = tls_pair();
        s.shutdown();
        assert!(matches!(crx.next_frame(), Ok(None)));
        // The TCP end alone (a peer that stopped, or a FIN forged on the path).
        let ((c, _crx), (_s, mut srx)) = tls_pair();
        c.lock().sock.shutdown();
        match srx.next_frame() {
            Err(MoveError::Net { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
                assert_eq!(
                    source.to_string(),
                    "connection closed without a TLS close_notify: the peer stopped or the stream was cut"
                );
            }
            other => panic!("the TCP end without close_notify: {other:?}"),
        }
        // Cut in the middle of a record.
        let ((c, _crx), (_s, mut srx)) = tls_pair();
        {
            let mut tx = c.lock();
            let mut out = Vec::new();
            let (seal, _) = tx.tls.as_mut().unwrap();
            seal.seal(&[IoSlice::new(&[7u8; 100])], &mut Cursor::default(), 100, &mut out).unwrap();
            tx.sock.write_all_vectored(&mut [IoSlice::new(&out[..out.len() / 2])]).unwrap();
            tx.sock.shutdown();
        }
        match srx.next_frame() {
            Err(MoveError::Net { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
                assert_eq!(source.to_string(), "connection closed in the middle of a TLS record");
            }
            other => panic!("a cut inside a record: {other:?}"),
        }
    }
}
