//! Striping: one session over several TCP connections (`--streams N|auto`).
//!
//! On a long fat path one TCP connection moves at most its window per round
//! trip, and the window is capped by the kernel's socket buffers (the
//! `tcp_wmem` / `tcp_rmem` maxima: 4 MiB by default, about 330 Mbit/s at
//! 100 ms). More connections, each with its own window, fill the path.
//!
//! ```text
//!  sender (send.rs) --frame--> Striper: number it (Seq n), validate it with the
//!                              first connection's wire session, queue it on the
//!                              connection with the fewest bytes queued
//!                                 |            |            |
//!                              lane 0       lane 1  ...  lane k   (a thread each: write
//!                              (first conn) (joined)     (joined)  Seq+frame; keepalives)
//! ```
//!
//! After the disks are open, the source asks for streams on its first
//! connection (OpenStreams); the target answers with a ticket (StreamTicket),
//! and every further connection makes the full TLS handshake with the same
//! pin, authenticates with the same token (its proof bound to its own TLS
//! exporter) and joins with the ticket (Join / Joined). From then on every
//! frame the source sends goes after a Seq frame with its number, on
//! whichever connection; the target merges them back into that order
//! (target/merge.rs), so one wire session (the first connection's) validates
//! the whole replica session and the target sees what one connection would
//! have carried: one lock, one commit, resume as before. Answers (ResumeInfo,
//! Checkpoint, Committed, Error, Notice) still come on the first connection.
//!
//! Choosing the connection: the one with the fewest bytes queued for it, so a
//! connection that slows down (a loss, a smaller window) gets less, within
//! the target's reorder window. Each lane sends a Keepalive when it has been
//! quiet for [`KEEPALIVE_INTERVAL`], as the first connection does: the target's
//! idle timeout applies to every connection.
//!
//! Failure: a write that fails on any lane fails the job with that lane's
//! error (it names the stream); every connection is then shut down, the target
//! fails the session (its merge sees the cut) and keeps what was durable; the
//! next run resumes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use ferry_wire::{Authenticator, Data, Frame, Join, OpenStreams, MAX_STREAMS};

use super::job::{expect_frame, unexpected};
use crate::conn::{client_handshake, Conn, Link, Rx, Sock, KEEPALIVE_INTERVAL};
use crate::error::{MoveError, Result};

/// Where a job's frames go: one connection, or a session striped over several.
pub(crate) trait FrameSink: Sync {
    /// Validate and send a frame; returns the bytes it took on the wire (TLS records not counted).
    fn send(&self, frame: &Frame) -> Result<u64>;
    /// Validate and send a data frame, its payload not copied.
    fn send_data(&self, data: &Data) -> Result<u64>;
}

impl FrameSink for Conn {
    fn send(&self, frame: &Frame) -> Result<u64> {
        Conn::send(self, frame)
    }

    fn send_data(&self, data: &Data) -> Result<u64> {
        Conn::send_data(self, data)
    }
}

/// How many connections a job uses (`--streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streams {
    /// From the path's round-trip time and the kernel's socket buffer limits ([`auto_streams`]).
    Auto,
    /// This many (1 ..= [`MAX_STREAMS`]); 1 is one connection, as before streams existed.
    Fixed(u16),
}

impl Streams {
    /// Parse `auto` or a count 1 ..= 16.
    pub fn parse(s: &str) -> std::result::Result<Streams, String> {
        if s == "auto" {
            return Ok(Streams::Auto);
        }
        match s.parse::<u16>() {
            Ok(n) if (1..=MAX_STREAMS).contains(&n) => Ok(Streams::Fixed(n)),
            _ => Err(format!("--streams {s:?}: expected auto or a number of connections from 1 to {MAX_STREAMS}")),
        }
    }
}

/// Below this round-trip time (loopback, a LAN) one connection fills the path:
/// `auto` uses one.
pub const AUTO_MIN_RTT: Duration = Duration::from_millis(5);

/// The rate `auto` plans for: about what one source's pipeline moves at its best
/// (2.5 Gbit/s). A path slower than that is filled by fewer connections than
/// planned; the extra ones cost a TLS handshake and a thread each.
pub const AUTO_RATE: u64 = 2_500_000_000 / 8;

/// Most connections `auto` opens.
pub const AUTO_MAX: u16 = 8;

/// `--streams auto`: one connection unless the round trip is long enough that
/// one connection's window (the smaller of the kernel's `tcp_wmem` and
/// `tcp_rmem` maxima, `window` bytes) cannot carry [`AUTO_RATE`]; then as many as
/// it takes, at most [`AUTO_MAX`]. 4 MiB windows: 1 below 5 ms, 2 at 20 ms,
/// 4 at 50 ms, 8 at 100 ms.
pub fn auto_streams(rtt: Duration, window: u64) -> u16 {
    if rtt < AUTO_MIN_RTT || window == 0 {
        return 1;
    }
    let per_stream = window as f64 / rtt.as_secs_f64();
    ((AUTO_RATE as f64 / per_stream).ceil() as u64).clamp(1, u64::from(AUTO_MAX)) as u16
}

/// The largest TCP window this host allows one connection: the smaller of the
/// `tcp_wmem` and `tcp_rmem` maxima (the peer's are taken to be alike); 4 MiB
/// when they cannot be read.
pub fn kernel_window() -> u64 {
    let max_of = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.split_whitespace().nth(2)?.parse().ok() };
    match (max_of("/proc/sys/net/ipv4/tcp_wmem"), max_of("/proc/sys/net/ipv4/tcp_rmem")) {
        (Some(w), Some(r)) => w.min(r),
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => 4 << 20,
    }
}

/// Opens one more connection to the same target: TCP and TLS with the same pin;
/// gives the link and the peer's name.
pub type Dial = dyn Fn() -> Result<(Link, String)> + Send + Sync;

/// A frame queued for a lane.
struct Job {
    seq: u64,
    head: Bytes,
    payload: Bytes,
}

/// One connection of a striped session and the thread that writes it.
struct Lane {
    conn: Arc<Conn>,
    /// Another handle to its socket: shut down without the connection's lock, which a
    /// write blocked on a peer that stopped reading holds.
    killer: Option<Sock>,
    jobs: Option<Sender<Job>>,
    queued: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Frames a lane's queue holds (beyond them, the socket's send buffer holds more).
const LANE_QUEUE: usize = 4;

/// Seq frame bytes added to every frame of a striped session.
const SEQ_FRAME_LEN: u64 = (ferry_wire::HEADER_LEN + ferry_wire::SEQ_BODY_LEN) as u64;

/// A session striped over several connections (module docs).
pub(crate) struct Striper {
    primary: Arc<Conn>,
    lanes: Vec<Lane>,
    next_seq: Mutex<u64>,
    /// The first lane failure, for the sender.
    failed: Arc<Mutex<Option<MoveError>>>,
}

impl Striper {
    /// Ask the target for `count` connections in all on the first one, open and join
    /// the others (each authenticated with `auth` over its own TLS session).
    pub(crate) fn open(
        primary: &Arc<Conn>,
        primary_sock: Option<Sock>,
        rx: &mut Rx,
        count: u16,
        dial: &Dial,
        auth: &Arc<dyn Authenticator>,
    ) -> Result<Striper> {
        primary.send(&Frame::OpenStreams(OpenStreams { count }))?;
        let ticket = match expect_frame(primary, rx)? {
            Frame::StreamTicket(t) => t,
            f => return Err(unexpected(primary, &f, "StreamTicket")),
        };
        let failed = Arc::new(Mutex::new(None));
        let mut striper =
            Striper { primary: primary.clone(), lanes: Vec::new(), next_seq: Mutex::new(0), failed: failed.clone() };
        striper.add_lane(primary.clone(), primary_sock);
        for stream in 1..ticket.count {
            let joined = (|| {
                let (link, peer) = dial()?;
                let killer = link.sock().try_clone().ok();
                let (conn, mut crx, _) = client_handshake(link, &format!("{peer} stream {stream}"), auth.clone())?;
                conn.send(&Frame::Join(Join { ticket: ticket.ticket, stream }))?;
                match expect_frame(&conn, &mut crx)? {
                    Frame::Joined(j) if j.stream == stream => {}
                    f => return Err(unexpected(&conn, &f, "Joined")),
                }
                conn.set_write_timeout(Some(Duration::from_secs(120)));
                Ok((conn, killer))
            })();
            match joined {
                Ok((conn, killer)) => striper.add_lane(conn, killer),
                Err(e) => {
                    striper.finish(false);
                    return Err(e);
                }
            }
        }
        Ok(striper)
    }

    fn add_lane(&mut self, conn: Arc<Conn>, killer: Option<Sock>) {
        let (tx, jobs) = bounded::<Job>(LANE_QUEUE);
        let queued = Arc::new(AtomicU64::new(0));
        let thread = {
            let (conn, queued, failed) = (conn.clone(), queued.clone(), self.failed.clone());
            std::thread::Builder::new()
                .name("ferry-lane".into())
                .spawn(move || {
                    let fail = |e: MoveError| {
                        failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    };
                    loop {
                        match jobs.recv_timeout(KEEPALIVE_INTERVAL) {
                            Ok(job) => {
                                let r = conn.write_sequenced(job.seq, &job.head, &job.payload);
                                queued.fetch_sub((job.head.len() + job.payload.len()) as u64, Ordering::Relaxed);
                                if let Err(e) = r {
                                    return fail(e.peer_gone_if_reset("target"));
                                }
                            }
                            Err(RecvTimeoutError::Timeout) => {
                                if let Err(e) = conn.keepalive_if_quiet(KEEPALIVE_INTERVAL) {
                                    return fail(e.peer_gone_if_reset("target"));
                                }
                            }
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                })
                .expect("spawn lane")
        };
        self.lanes.push(Lane { conn, killer, jobs: Some(tx), queued, thread: Some(thread) });
    }

    /// Connections in use.
    pub(crate) fn count(&self) -> usize {
        self.lanes.len()
    }

    /// Bytes written to all connections (TLS records included).
    pub(crate) fn bytes_sent(&self) -> u64 {
        self.lanes.iter().map(|l| l.conn.bytes_sent()).sum()
    }

    fn take_failure(&self) -> Option<MoveError> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Number `frame`, validate it with the first connection's session and queue it.
    fn submit(&self, frame: &Frame, payload: Bytes) -> Result<u64> {
        let mut seq = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.take_failure() {
            return Err(e);
        }
        let head = self.primary.sequence(frame)?;
        let n = (head.len() + payload.len()) as u64;
        let lane = self.lanes.iter().min_by_key(|l| l.queued.load(Ordering::Relaxed)).expect("at least one lane");
        lane.queued.fetch_add(n, Ordering::Relaxed);
        let sent = lane.jobs.as_ref().is_some_and(|j| j.send(Job { seq: *seq, head, payload }).is_ok());
        if !sent {
            // The lane stopped: its error says why.
            return Err(self.take_failure().unwrap_or_else(|| MoveError::Net {
                peer: lane.conn.peer().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the connection stopped"),
            }));
        }
        *seq += 1;
        Ok(n + SEQ_FRAME_LEN)
    }

    /// End the lanes: with `ok`, after they wrote everything queued; otherwise at once
    /// (every socket shut down, the first one's too: a lane blocked writing to a target
    /// that stopped reading fails instead of holding the job).
    pub(crate) fn finish(&mut self, ok: bool) {
        if !ok {
            for l in &self.lanes {
                if let Some(k) = &l.killer {
                    k.shutdown();
                }
            }
        }
        for l in &mut self.lanes {
            drop(l.jobs.take());
        }
        for l in &mut self.lanes {
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
        for l in self.lanes.iter().skip(1) {
            l.conn.shutdown();
        }
    }
}

impl FrameSink for Striper {
    fn send(&self, frame: &Frame) -> Result<u64> {
        self.submit(frame, Bytes::new())
    }

    fn send_data(&self, data: &Data) -> Result<u64> {
        self.submit(&Frame::Data(data.clone()), data.payload.clone())
    }
}

impl Drop for Striper {
    fn drop(&mut self) {
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_opens_streams_only_when_one_window_cannot_carry_the_rate() {
        let w = 4 << 20;
        assert_eq!(auto_streams(Duration::from_micros(50), w), 1, "loopback");
        assert_eq!(auto_streams(Duration::from_millis(1), w), 1, "LAN");
        assert_eq!(auto_streams(Duration::from_millis(20), w), 2);
        assert_eq!(auto_streams(Duration::from_millis(50), w), 4);
        assert_eq!(auto_streams(Duration::from_millis(100), w), 8);
        assert_eq!(auto_streams(Duration::from_millis(300), w), AUTO_MAX);
        // Larger buffers: fewer connections for the same path.
        assert_eq!(auto_streams(Duration::from_millis(100), 32 << 20), 1);
    }

    #[test]
    fn streams_parse() {
        assert_eq!(Streams::parse("auto"), Ok(Streams::Auto));
        assert_eq!(Streams::parse("1"), Ok(Streams::Fixed(1)));
        assert_eq!(Streams::parse("16"), Ok(Streams::Fixed(16)));
        for bad in ["0", "17", "-1", "four", ""] {
            assert!(Streams::parse(bad).unwrap_err().contains("from 1 to 16"), "{bad}");
        }
    }
}
