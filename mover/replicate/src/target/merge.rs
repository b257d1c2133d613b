//! A session striped over several connections (`ferry replicate --streams`):
//! the tickets further connections join with, one reader per connection, and
//! the bounded reorder buffer that gives the session thread the source's
//! frames back in the order the source sent them (PROTOCOL.md section 11).
//!
//! ```text
//!  stream 0 (first connection) --reader--+
//!  stream 1 (joined)          --reader--+--> Reorder (frames seq next .. next + window) --> session thread
//!  stream k (joined)          --reader--+        in sequence order, as from one connection
//! ```
//!
//! Design. Every frame of the striped session carries a sequence number (a Seq
//! frame right before it); each connection has a reader thread (the first
//! one's is spawned by the session thread, a joined one's is the thread that
//! accepted it) that reads `Seq{n}`, waits until `n` is inside the window
//! (`next .. next + window`), only then takes a pool buffer and reads the
//! frame (a data payload straight into the buffer), and puts it in the
//! buffer. The session thread takes frames in order and validates them with
//! the first connection's wire session, exactly as if they had come on one
//! connection: the rest of the target is unchanged ("within a disk, chunks in
//! increasing order, one watermark per disk").
//!
//! Bounds. At most `window` frames wait in the buffer and a reader that is
//! ahead of the window waits before it takes a buffer or reads its frame, so
//! its socket stops being read and TCP pushes back on the source's connection
//! that runs ahead. Buffers come from a pool of `window + streams` buffers of
//! the chunk size: a frame that is next can always get one (the frames ahead of
//! it hold fewer than the pool), so the merge never deadlocks on memory.
//!
//! Failure. A connection that breaks (reset, bad frame, idle timeout) fails the
//! whole session at once, with an error that names the stream; one that ends
//! cleanly is fine as long as its frames were not needed: once every stream has
//! ended and the next frame is not in the buffer, the gap will never fill and
//! the session fails (the source cut a stream or went away), never hangs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use ferry_io::BufPool;
use ferry_wire::Frame;

use crate::conn::{Received, Rx, Sock, PAYLOAD_SLACK};
use crate::error::{MoveError, Result};

/// A reorder buffer: items numbered by the sender come out in number order,
/// at most `window` of them waiting.
pub(crate) struct Reorder<T> {
    state: Mutex<ReorderState<T>>,
    changed: Condvar,
    window: u64,
}

struct ReorderState<T> {
    /// The number of the item the consumer takes next.
    next: u64,
    waiting: BTreeMap<u64, T>,
    /// Streams still delivering (each ends once, well or not).
    live: usize,
    /// The first stream failure, for the consumer.
    failed: Option<MoveError>,
    /// The last stream that ended cleanly, for the gap's error.
    last_ended: Option<String>,
    closed: bool,
}

impl<T> Reorder<T> {
    /// A buffer for `streams` producers, holding at most `window` items (at least 1).
    pub(crate) fn new(streams: usize, window: usize) -> Reorder<T> {
        Reorder {
            state: Mutex::new(ReorderState {
                next: 0,
                waiting: BTreeMap::new(),
                live: streams,
                failed: None,
                last_ended: None,
                closed: false,
            }),
            changed: Condvar::new(),
            window: window.max(1) as u64,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ReorderState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until item `seq` fits the window. Err when the merge is over (closed or
    /// failed), or `seq` was delivered already or is waiting (a duplicate: a protocol error).
    pub(crate) fn admit(&self, seq: u64, stream: &str) -> Result<()> {
        let mut s = self.lock();
        loop {
            if s.closed || s.failed.is_some() {
                return Err(MoveError::Internal("the striped session ended".into()));
            }
            if seq < s.next || s.waiting.contains_key(&seq) {
                return Err(MoveError::Protocol {
                    peer: stream.to_string(),
                    what: format!("frame number {seq} sent twice"),
                });
            }
            if seq < s.next + self.window {
                return Ok(());
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Put item `seq` (admitted first).
    pub(crate) fn put(&self, seq: u64, item: T) {
        let mut s = self.lock();
        s.waiting.insert(seq, item);
        drop(s);
        self.changed.notify_all();
    }

    /// The next item in order, waiting for it. Err at the first stream failure, or when
    /// every stream has ended and the next item is not there (a gap that never fills).
    pub(crate) fn next(&self) -> Result<T> {
        let mut s = self.lock();
        loop {
            if let Some(e) = s.failed.take() {
                s.closed = true;
                drop(s);
                self.changed.notify_all();
                return Err(e);
            }
            let n = s.next;
            if let Some(item) = s.waiting.remove(&n) {
                s.next += 1;
                drop(s);
                self.changed.notify_all();
                return Ok(item);
            }
            if s.closed || s.live == 0 {
                let peer = s.last_ended.clone().unwrap_or_else(|| "source".into());
                return Err(MoveError::PeerGone { peer, side: "source" }).map_err(|e| gap(e, n));
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// One more stream delivers (a join); false when the merge is over already.
    pub(crate) fn joined(&self) -> bool {
        let mut s = self.lock();
        if s.closed || s.failed.is_some() || s.live == 0 {
            return false;
        }
        s.live += 1;
        true
    }

    /// A stream ended: cleanly (`Ok`) or with an error, which fails the merge.
    pub(crate) fn ended(&self, stream: &str, how: Result<()>) {
        let mut s = self.lock();
        s.live = s.live.saturating_sub(1);
        match how {
            Ok(()) => s.last_ended = Some(stream.to_string()),
            Err(e) => {
                if s.failed.is_none() && !s.closed {
                    s.failed = Some(e);
                }
            }
        }
        drop(s);
        self.changed.notify_all();
    }

    /// The consumer is done: waiting producers give up.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// The error of a gap that never fills: which frame was missing.
fn gap(e: MoveError, n: u64) -> MoveError {
    match e {
        MoveError::PeerGone { peer, .. } => MoveError::Net {
            peer,
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("every stream of the session closed before frame {n} arrived (a stream was cut)"),
            ),
        },
        e => e,
    }
}

/// Frames of a striped session wait here at most: about 32 MiB of chunks, at least 16
/// and at most 512 frames. It only has to cover how far one connection runs ahead
/// of another (the path's bandwidth-delay product sits in the TCP windows).
pub(crate) fn reorder_window(chunk_size: usize) -> usize {
    ((32usize << 20) / chunk_size.max(1)).clamp(16, 512)
}

/// One striped session: its token, its streams, the merge.
pub(crate) struct StreamSet {
    /// The name of the token that opened the session: only it may join.
    token: String,
    /// Connections granted in all (the first one included).
    count: u16,
    /// Which streams joined (stream 0 is the first connection).
    joined: Mutex<Vec<bool>>,
    /// Sockets of the joined streams, to stop their readers when the session ends.
    socks: Mutex<Vec<Sock>>,
    pub(crate) reorder: Reorder<Received>,
    pub(crate) pool: Arc<BufPool>,
    /// Bytes received on the joined connections.
    pub(crate) bytes_received: std::sync::atomic::AtomicU64,
}

impl StreamSet {
    /// The session is over: readers stop (their sockets' reading is shut down).
    pub(crate) fn close(&self) {
        self.reorder.close();
        for s in self.socks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            s.shutdown_read();
        }
    }
}

/// The striped sessions of a server, by ticket.
#[derive(Default)]
pub(crate) struct StreamRegistry {
    sets: Mutex<HashMap<[u8; 32], Arc<StreamSet>>>,
}

/// A ticket registered for a session; removed when dropped (a stale ticket joins nothing).
pub(crate) struct Registered {
    /// The ticket the source joins with.
    pub(crate) ticket: [u8; 32],
    registry: Arc<StreamRegistry>,
    pub(crate) set: Arc<StreamSet>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.sets.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.ticket);
        self.set.close();
    }
}

impl StreamRegistry {
    /// Issue a fresh ticket for a session of `count` streams opened by token `token`,
    /// its frames read into buffers of `chunk_size` bytes.
    pub(crate) fn register(self: &Arc<Self>, token: &str, count: u16, chunk_size: usize) -> Registered {
        let window = reorder_window(chunk_size);
        let ticket = crate::auth::random_bytes::<32>();
        let set = Arc::new(StreamSet {
            token: token.to_string(),
            count,
            joined: Mutex::new((0..count).map(|i| i == 0).collect()),
            socks: Mutex::new(Vec::new()),
            // Live streams: the first connection; each join adds one (a source may join
            // fewer than it was granted, and join them at any time: PROTOCOL.md 11).
            reorder: Reorder::new(1, window),
            pool: Arc::new(BufPool::with_slack(window + count as usize, chunk_size, PAYLOAD_SLACK)),
            bytes_received: Default::default(),
        });
        self.sets.lock().unwrap_or_else(|p| p.into_inner()).insert(ticket, set.clone());
        Registered { registry: self.clone(), ticket, set }
    }

    /// A connection authenticated with token `token` joins as `stream` with `ticket`: the
    /// session's set, or why not (for the peer).
    pub(crate) fn join(
        &self,
        ticket: &[u8; 32],
        token: &str,
        stream: u16,
        sock: Option<Sock>,
    ) -> Result<Arc<StreamSet>> {
        let refused = |why: &str| Err(MoveError::NotAllowed(format!("join refused: {why}")));
        let Some(set) = self.sets.lock().unwrap_or_else(|p| p.into_inner()).get(ticket).cloned() else {
            return refused("unknown or expired stream ticket (the session it belonged to has ended)");
        };
        // Compared after the lookup: a ticket is 32 random bytes, guessing one is hopeless.
        if set.token != token {
            return refused("the ticket was issued to another token");
        }
        if stream == 0 || stream >= set.count {
            return refused(&format!("stream {stream} is not one of the session's 1..{}", set.count));
        }
        let mut joined = set.joined.lock().unwrap_or_else(|p| p.into_inner());
        if joined[stream as usize] {
            return refused(&format!("stream {stream} has joined already"));
        }
        // Counted live before the merge can see every stream ended: a stream that joins
        // after the session's streams all ended finds the merge over (its reader stops).
        if !set.reorder.joined() {
            return refused("the session's streams have all ended");
        }
        joined[stream as usize] = true;
        drop(joined);
        if let Some(s) = sock {
            set.socks.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        }
        Ok(set)
    }
}

/// Read one stream of a striped session into the merge until it ends; tells the merge how.
pub(crate) fn read_stream(name: &str, rx: &mut Rx, set: &StreamSet) {
    let r = read_frames(name, rx, set);
    set.reorder.ended(name, r);
}

fn read_frames(name: &str, rx: &mut Rx, set: &StreamSet) -> Result<()> {
    let named = |e: MoveError| match e {
        MoveError::Net { source, .. } => MoveError::Net { peer: name.to_string(), source },
        MoveError::Wire { source, .. } => MoveError::Wire { peer: name.to_string(), source },
        e => e,
    };
    let protocol = |what: String| MoveError::Protocol { peer: name.to_string(), what };
    loop {
        let seq = match rx.next_frame().map_err(named)? {
            None => return Ok(()),
            Some(Frame::Seq(s)) => s.seq,
            // Liveness travels outside the sequence: it only has to arrive.
            Some(Frame::Keepalive | Frame::Progress(_) | Frame::Unknown { .. }) => continue,
            // The source ends the session on its first connection (an Error) or stops.
            Some(Frame::Error(e)) => {
                let source = ferry_wire::WireError::Remote { code: e.code, message: e.message };
                return Err(MoveError::Wire { peer: name.to_string(), source });
            }
            Some(f) => return Err(protocol(format!("{} frame without a sequence number", f.name()))),
        };
        if set.reorder.admit(seq, name).is_err() {
            // The session ended (or a duplicate, which the session thread reports).
            return Ok(());
        }
        let item = match rx.next_unvalidated(&set.pool).map_err(named)? {
            None => return Err(protocol(format!("the connection closed after Seq {seq}"))),
            Some(Received::Frame(Frame::Seq(_) | Frame::Keepalive)) => {
                return Err(protocol(format!("Seq {seq} is not followed by a frame of the session")))
            }
            Some(item) => item,
        };
        set.reorder.put(seq, item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn items_come_out_in_order_whatever_stream_brings_them() {
        let r = Arc::new(Reorder::<u64>::new(3, 8));
        let mut producers = Vec::new();
        for k in 0..3u64 {
            let r = r.clone();
            // Stream k carries items k, k+3, k+6, ...: out of order between streams.
            producers.push(std::thread::spawn(move || {
                for seq in (k..300).step_by(3) {
                    r.admit(seq, "s").unwrap();
                    r.put(seq, seq);
                }
                r.ended("s", Ok(()));
            }));
        }
        for want in 0..300 {
            assert_eq!(r.next().unwrap(), want);
        }
        for p in producers {
            p.join().unwrap();
        }
    }

    #[test]
    fn a_producer_ahead_of_the_window_waits() {
        let r = Arc::new(Reorder::<u64>::new(2, 4));
        for seq in 1..4 {
            r.admit(seq, "s").unwrap();
            r.put(seq, seq);
        }
        // Item 4 is outside the window 0..4 until item 0 is taken.
        let (tx, rx) = mpsc::channel();
        let r2 = r.clone();
        let ahead = std::thread::spawn(move || {
            r2.admit(4, "s").unwrap();
            tx.send(()).unwrap();
            r2.put(4, 4);
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "admitted past the window");
        assert_eq!(r.lock().waiting.len(), 3, "the buffer holds at most the window");
        r.admit(0, "s").unwrap();
        r.put(0, 0);
        assert_eq!(r.next().unwrap(), 0);
        rx.recv_timeout(Duration::from_secs(10)).expect("admitted once the window moved");
        ahead.join().unwrap();
        for want in 1..5 {
            assert_eq!(r.next().unwrap(), want);
        }
    }

    #[test]
    fn a_gap_that_never_fills_ends_with_an_error_not_a_hang() {
        let r = Reorder::<u64>::new(2, 8);
        for seq in [0, 2] {
            r.admit(seq, "s").unwrap();
            r.put(seq, seq);
        }
        r.ended("stream 1", Ok(()));
        r.ended("stream 0", Ok(()));
        assert_eq!(r.next().unwrap(), 0);
        let e = r.next().unwrap_err();
        assert!(matches!(e, MoveError::Net { .. }), "{e:?}");
        assert!(e.to_string().contains("stream 0"), "{e}");
        assert!(e.detail().contains("before frame 1 arrived"), "{}", e.detail());
    }

    #[test]
    fn a_broken_stream_fails_the_merge_at_once() {
        let r = Arc::new(Reorder::<u64>::new(2, 8));
        let r2 = r.clone();
        let consumer = std::thread::spawn(move || r2.next());
        std::thread::sleep(Duration::from_millis(50));
        let cut = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        r.ended("10.0.0.1:5000 stream 2", Err(MoveError::Net { peer: "10.0.0.1:5000 stream 2".into(), source: cut }));
        let e = consumer.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("stream 2"), "{e}");
        // A producer waiting for the window gives up too.
        assert!(r.admit(100, "s").is_err());
    }

    #[test]
    fn a_duplicate_is_refused() {
        let r = Reorder::<u64>::new(1, 8);
        r.admit(0, "s").unwrap();
        r.put(0, 0);
        assert!(matches!(r.admit(0, "s"), Err(MoveError::Protocol { .. })));
        assert_eq!(r.next().unwrap(), 0);
        assert!(matches!(r.admit(0, "s"), Err(MoveError::Protocol { .. })));
    }
}
