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
//! the target's reorder window; among equals, the next in turn (frame number
//! modulo the connections). Each lane sends a Keepalive when it has been
//! quiet for [`KEEPALIVE_INTERVAL`], as the first connection does: the target's
//! idle timeout applies to every connection.
//!
//! `--streams auto` grows ([`StreamPlan`], [`grow`]). It starts with
//! [`auto_streams`] connections from the first connection's RTT, asks the
//! target for [`AUTO_MAX`] (the ticket grants up to that), and joins the rest
//! during the run, one at a time, on a thread of its own (the handshake takes
//! a few round trips; the sender does not wait for it). Every [`GROW_WINDOW`]
//! the striper measures the share of time the sender waited on full lanes and
//! the rate all lanes wrote; [`grow`] adds a connection when the network held
//! the pipeline and each connection moved at least half of what its window
//! carries per round trip (window-limited, not link-limited), and stops for the
//! session once a connection added raised the rate by less than half a
//! connection's share. Measured on the bench's delay line (1 Gbit/s, 100 ms,
//! 4 MiB windows; bench/RESULTS.md): 1, 2, 4, 8 fixed streams moved the 2 GiB
//! image in 30.6, 24.3, 16.2 and 21.0 s (8: CPU-bound on 2 cores).
//! A join that fails stops the growth; the session goes on.
//!
//! Failure: a write that fails on any lane fails the job with that lane's
//! error (it names the stream); every connection is then shut down, the target
//! fails the session (its merge sees the cut) and keeps what was durable; the
//! next run resumes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use ferry_wire::{Authenticator, Data, Frame, Join, OpenStreams, StreamTicket, MAX_STREAMS};

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

/// How a job stripes its session: connections at the start, and for `--streams auto`
/// how it may grow during the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamPlan {
    /// Connections opened before the data moves (1: none joined at first).
    pub start: u16,
    /// Most connections in all: the target is asked for this many; more than
    /// `start` only for `auto`, which joins them when [`grow`] says so.
    pub cap: u16,
    /// The first connection's round-trip time at the start.
    pub rtt: Duration,
    /// The largest TCP window of one connection ([`kernel_window`]).
    pub window: u64,
    /// Tests: add a connection after every this many bytes queued, whatever the
    /// measurements say (up to `cap`).
    pub grow_every: Option<u64>,
}

impl StreamPlan {
    /// `--streams N`: N connections, no growth.
    pub fn fixed(n: u16) -> StreamPlan {
        StreamPlan { start: n, cap: n, rtt: Duration::ZERO, window: 0, grow_every: None }
    }

    /// `--streams auto` on a path of round trip `rtt`: starts with [`auto_streams`],
    /// may grow to [`AUTO_MAX`] (one connection only below [`AUTO_MIN_RTT`]).
    pub fn auto(rtt: Duration, window: u64) -> StreamPlan {
        let start = auto_streams(rtt, window);
        let cap = if rtt < AUTO_MIN_RTT { 1 } else { AUTO_MAX };
        StreamPlan { start, cap, rtt, window, grow_every: None }
    }
}

/// How long `auto` measures before it decides to grow (and waits after a new
/// connection joined: its slow start must not count).
pub const GROW_WINDOW: Duration = Duration::from_secs(1);

/// What `auto` measured over one [`GROW_WINDOW`] of a striped session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrowInput {
    /// Connections now.
    pub lanes: u16,
    /// The most allowed.
    pub cap: u16,
    /// Share of the window the sender waited on full connections (0..=1): the
    /// network, not the disk or the CPU, held the pipeline.
    pub blocked: f64,
    /// Bytes per second all connections wrote.
    pub rate: f64,
    /// Round-trip time of the path (at the start, without queues).
    pub rtt: Duration,
    /// Largest window of one connection.
    pub window: u64,
    /// The rate measured before the last connection was added, if one was.
    pub before_last: Option<f64>,
}

/// What `auto` does after a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grow {
    /// Add a connection.
    Add,
    /// Keep the connections as they are, and look again next window.
    Keep,
    /// The last connection added brought little: grow no more in this session.
    Stop,
}

/// `--streams auto` during a run: add a connection when the connections are
/// window-limited. All of: the sender waited on the network most of the window
/// (at least half of it), each connection moved at least half of what its window
/// carries per round trip (`window / rtt`: a connection below that is held by the
/// link, whose share more connections would only split), and the last connection
/// added (if any) raised the rate by at least half of one connection's share
/// (else the path, or the CPU, is full: stop growing).
pub fn grow(g: &GrowInput) -> Grow {
    if g.blocked < 0.5 {
        return Grow::Keep; // the network did not hold the pipeline: nothing to judge
    }
    if let Some(before) = g.before_last {
        let n = f64::from(g.lanes.max(2));
        if g.rate < before * (1.0 + 0.5 / (n - 1.0)) {
            return Grow::Stop;
        }
    }
    if g.lanes >= g.cap || g.rtt.is_zero() || g.window == 0 {
        return Grow::Keep;
    }
    let per_lane = g.rate / f64::from(g.lanes.max(1));
    let window_rate = g.window as f64 / g.rtt.as_secs_f64();
    if per_lane < 0.5 * window_rate {
        return Grow::Keep;
    }
    Grow::Add
}

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
    shared: Arc<Shared>,
    /// The thread that opens further connections during the run (`auto`), and its orders.
    grower: Option<(Sender<()>, JoinHandle<()>)>,
}

/// What the sender and the grower share.
struct Shared {
    primary: Arc<Conn>,
    state: Mutex<State>,
    /// The first lane failure, for the sender.
    failed: Arc<Mutex<Option<MoveError>>>,
}

struct State {
    next_seq: u64,
    lanes: Vec<Lane>,
    meter: Meter,
}

/// `auto`'s measurements between decisions ([`grow`]).
struct Meter {
    plan: StreamPlan,
    since: Instant,
    /// Bytes the lanes had written, and the sender's wait on full lanes, since `since`.
    written: u64,
    blocked: Duration,
    queued: u64,
    /// A connection is being opened (one at a time).
    pending: bool,
    /// Why opening one more failed (growth stopped there), for a notice.
    failed_join: Option<String>,
    /// The rate before the last connection joined, to judge it once.
    before_last: Option<f64>,
    stopped: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_failure(&self) -> Option<MoveError> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn add_lane(&self, conn: Arc<Conn>, killer: Option<Sock>) {
        let lane = spawn_lane(conn, killer, &self.failed);
        let mut st = self.lock();
        st.lanes.push(lane);
        let written = st.lanes.iter().map(|l| l.conn.bytes_sent()).sum();
        let m = &mut st.meter;
        m.pending = false;
        // The new connection's slow start must not count: measure afresh from now.
        m.since = Instant::now();
        m.blocked = Duration::ZERO;
        m.written = written;
    }
}

/// Open stream `stream` of the session with `ticket`: TCP, TLS, authentication, Join.
fn join_one(
    ticket: &StreamTicket,
    stream: u16,
    dial: &Dial,
    auth: &Arc<dyn Authenticator>,
) -> Result<(Arc<Conn>, Option<Sock>)> {
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
}

impl Striper {
    /// Ask the target for `plan.cap` connections in all on the first one, open and join
    /// `plan.start` of them (each authenticated with `auth` over its own TLS session);
    /// with a cap above the start, the rest join during the run when [`grow`] says so.
    pub(crate) fn open(
        primary: &Arc<Conn>,
        primary_sock: Option<Sock>,
        rx: &mut Rx,
        plan: StreamPlan,
        dial: &Arc<Dial>,
        auth: &Arc<dyn Authenticator>,
    ) -> Result<Striper> {
        primary.send(&Frame::OpenStreams(OpenStreams { count: plan.cap.max(plan.start) }))?;
        let ticket = match expect_frame(primary, rx)? {
            Frame::StreamTicket(t) => t,
            f => return Err(unexpected(primary, &f, "StreamTicket")),
        };
        let failed = Arc::new(Mutex::new(None));
        let plan = StreamPlan { start: plan.start.min(ticket.count), cap: ticket.count, ..plan };
        let meter = Meter {
            plan,
            since: Instant::now(),
            written: 0,
            blocked: Duration::ZERO,
            queued: 0,
            pending: false,
            failed_join: None,
            before_last: None,
            stopped: false,
        };
        let shared = Arc::new(Shared {
            primary: primary.clone(),
            state: Mutex::new(State { next_seq: 0, lanes: Vec::new(), meter }),
            failed,
        });
        let mut striper = Striper { shared: shared.clone(), grower: None };
        shared.add_lane(primary.clone(), primary_sock);
        // Each join takes about five round trips (TCP, TLS, authentication, Join), which
        // one after the other would cost seconds on a long path: the start's connections
        // join all at once. `auto` (an RTT measured) joins them in the background, the
        // data moving on the first connection meanwhile; `--streams N` joins them first.
        let background = !plan.rtt.is_zero() && plan.cap > 1;
        let now = if background { 1 } else { plan.start };
        let joins: Vec<Result<(Arc<Conn>, Option<Sock>)>> = std::thread::scope(|s| {
            let ticket = &ticket;
            let handles: Vec<_> =
                (1..now).map(|stream| s.spawn(move || join_one(ticket, stream, &**dial, auth))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let mut first_error = None;
        for j in joins {
            match j {
                Ok((conn, killer)) => shared.add_lane(conn, killer),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            striper.finish(false);
            return Err(e);
        }
        if background {
            let (tx, orders) = bounded::<()>(1);
            let (dial, auth) = (dial.clone(), auth.clone());
            shared.lock().meter.pending = true;
            let thread = std::thread::Builder::new()
                .name("ferry-grow".into())
                .spawn(move || {
                    // Not fatal: the session goes on with the connections it has.
                    let join = |stream: u16| match join_one(&ticket, stream, &*dial, &auth) {
                        Ok((conn, killer)) => {
                            shared.add_lane(conn, killer);
                            true
                        }
                        Err(e) => {
                            let mut st = shared.lock();
                            st.meter.stopped = true;
                            st.meter.failed_join.get_or_insert(format!("stream {stream}: {e}"));
                            false
                        }
                    };
                    std::thread::scope(|s| {
                        for stream in 1..plan.start {
                            s.spawn(move || join(stream));
                        }
                    });
                    shared.lock().meter.pending = false;
                    for (stream, ()) in (plan.start..).zip(orders) {
                        if !join(stream) {
                            shared.lock().meter.pending = false;
                            return;
                        }
                    }
                })
                .expect("spawn grower");
            striper.grower = Some((tx, thread));
        }
        Ok(striper)
    }

    /// Connections in use.
    pub(crate) fn count(&self) -> usize {
        self.shared.lock().lanes.len()
    }

    /// Why a connection `auto` tried to add during the run could not join, if one failed.
    pub(crate) fn failed_join(&self) -> Option<String> {
        self.shared.lock().meter.failed_join.clone()
    }

    /// Bytes written to each connection (TLS records included), stream 0 first.
    pub(crate) fn bytes_per_stream(&self) -> Vec<u64> {
        self.shared.lock().lanes.iter().map(|l| l.conn.bytes_sent()).collect()
    }

    /// Number `frame`, validate it with the first connection's session and queue it.
    fn submit(&self, frame: &Frame, payload: Bytes) -> Result<u64> {
        let mut st = self.shared.lock();
        if let Some(e) = self.shared.take_failure() {
            return Err(e);
        }
        let head = self.shared.primary.sequence(frame)?;
        let n = (head.len() + payload.len()) as u64;
        // Fewest bytes queued; among equals (idle connections) the next in turn, so a
        // connection that joined while the others keep up still gets its share.
        let k = st.lanes.len();
        let first = (st.next_seq % k as u64) as usize;
        let lane = (0..k)
            .map(|i| &st.lanes[(first + i) % k])
            .min_by_key(|l| l.queued.load(Ordering::Relaxed))
            .expect("at least one lane");
        lane.queued.fetch_add(n, Ordering::Relaxed);
        let t = Instant::now();
        let sent = lane.jobs.as_ref().is_some_and(|j| j.send(Job { seq: st.next_seq, head, payload }).is_ok());
        if !sent {
            // The lane stopped: its error says why.
            let peer = lane.conn.peer().to_string();
            return Err(self.shared.take_failure().unwrap_or_else(|| MoveError::Net {
                peer,
                source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the connection stopped"),
            }));
        }
        st.next_seq += 1;
        st.meter.blocked += t.elapsed();
        st.meter.queued += n;
        if self.grower.is_some() {
            self.steer(&mut st);
        }
        Ok(n + SEQ_FRAME_LEN)
    }

    /// `auto`: after each [`GROW_WINDOW`], ask the grower for one more connection when
    /// [`grow`] says so (or every `grow_every` bytes queued, for tests).
    fn steer(&self, st: &mut State) {
        let m = &mut st.meter;
        if m.pending || m.stopped {
            return;
        }
        let lanes = st.lanes.len() as u16;
        let add = if let Some(every) = m.plan.grow_every {
            m.queued >= every * u64::from(lanes)
        } else {
            let took = m.since.elapsed();
            if took < GROW_WINDOW {
                return;
            }
            let written: u64 = st.lanes.iter().map(|l| l.conn.bytes_sent()).sum();
            let rate = (written - m.written) as f64 / took.as_secs_f64();
            let input = GrowInput {
                lanes,
                cap: m.plan.cap,
                blocked: m.blocked.as_secs_f64() / took.as_secs_f64(),
                rate,
                rtt: m.plan.rtt,
                window: m.plan.window,
                before_last: m.before_last.take(),
            };
            m.since = Instant::now();
            m.written = written;
            m.blocked = Duration::ZERO;
            match grow(&input) {
                Grow::Add => {
                    m.before_last = Some(rate);
                    true
                }
                Grow::Keep => false,
                Grow::Stop => {
                    m.stopped = true;
                    false
                }
            }
        };
        if add && lanes < m.plan.cap {
            if let Some((tx, _)) = &self.grower {
                m.pending = tx.try_send(()).is_ok();
            }
        }
    }

    /// End the lanes: with `ok`, after they wrote everything queued; otherwise at once
    /// (every socket shut down, the first one's too: a lane blocked writing to a target
    /// that stopped reading fails instead of holding the job). A connection being opened
    /// is waited for first (its handshake is bounded by the connect timeouts).
    pub(crate) fn finish(&mut self, ok: bool) {
        if let Some((tx, thread)) = self.grower.take() {
            drop(tx);
            let _ = thread.join();
        }
        let mut st = self.shared.lock();
        if !ok {
            for l in &st.lanes {
                if let Some(k) = &l.killer {
                    k.shutdown();
                }
            }
        }
        for l in &mut st.lanes {
            drop(l.jobs.take());
        }
        for l in &mut st.lanes {
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
        for l in st.lanes.iter().skip(1) {
            l.conn.shutdown();
        }
    }
}

/// Start the thread that writes one connection's frames.
fn spawn_lane(conn: Arc<Conn>, killer: Option<Sock>, failed: &Arc<Mutex<Option<MoveError>>>) -> Lane {
    let (tx, jobs) = bounded::<Job>(LANE_QUEUE);
    let queued = Arc::new(AtomicU64::new(0));
    let thread = {
        let (conn, queued, failed) = (conn.clone(), queued.clone(), failed.clone());
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
    Lane { conn, killer, jobs: Some(tx), queued, thread: Some(thread) }
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

    const MB: f64 = 1e6;

    /// 1 Gbit/s at 100 ms over 4 MiB windows: one connection carries at most ~42 MB/s.
    fn long_fat(lanes: u16, rate: f64, blocked: f64, before_last: Option<f64>) -> GrowInput {
        let rtt = Duration::from_millis(100);
        GrowInput { lanes, cap: AUTO_MAX, blocked, rate, rtt, window: 4 << 20, before_last }
    }

    #[test]
    fn auto_grows_while_the_connections_are_window_limited() {
        // Each connection at its window's rate (42 MB/s), the sender waiting on them: add.
        assert_eq!(grow(&long_fat(2, 80.0 * MB, 0.9, None)), Grow::Add);
        // The third one raised 80 -> 115 MB/s (more than half a connection's share): go on.
        assert_eq!(grow(&long_fat(3, 115.0 * MB, 0.9, Some(80.0 * MB))), Grow::Add);
        // At the cap: keep.
        assert_eq!(grow(&long_fat(AUTO_MAX, 125.0 * MB, 0.9, None)), Grow::Keep);
    }

    #[test]
    fn auto_does_not_grow_on_a_slow_link_or_an_idle_network() {
        // 100 Mbit/s: 12.5 MB/s on one connection, far below 42: the link holds it.
        assert_eq!(grow(&long_fat(1, 12.5 * MB, 0.95, None)), Grow::Keep);
        // 1 Gbit/s shared by 6: 20.8 MB/s each, below half of 42: the link is full.
        assert_eq!(grow(&long_fat(6, 125.0 * MB, 0.95, None)), Grow::Keep);
        // The sender hardly waited on the network (the disk or the CPU holds the pipeline).
        assert_eq!(grow(&long_fat(2, 80.0 * MB, 0.3, None)), Grow::Keep);
        // A loopback-like path (no RTT measured) or no window known.
        assert_eq!(grow(&GrowInput { rtt: Duration::ZERO, ..long_fat(1, 1e9, 1.0, None) }), Grow::Keep);
    }

    #[test]
    fn auto_stops_when_the_last_connection_brought_little() {
        // 4 -> 5 connections gave 100 -> 104 MB/s: below 100 x (1 + 0.5/4) = 112.5.
        assert_eq!(grow(&long_fat(5, 104.0 * MB, 0.9, Some(100.0 * MB))), Grow::Stop);
        // 113 is enough to try one more.
        assert_eq!(grow(&long_fat(5, 113.0 * MB, 0.9, Some(100.0 * MB))), Grow::Add);
        // Not judged while the network did not hold the pipeline.
        assert_eq!(grow(&long_fat(5, 50.0 * MB, 0.2, Some(100.0 * MB))), Grow::Keep);
    }

    #[test]
    fn the_plan_of_auto_starts_from_the_rtt_and_may_grow_to_the_cap() {
        let w = 4 << 20;
        let lan = StreamPlan::auto(Duration::from_micros(200), w);
        assert_eq!((lan.start, lan.cap), (1, 1), "a LAN never grows");
        let wan = StreamPlan::auto(Duration::from_millis(50), w);
        assert_eq!((wan.start, wan.cap), (4, AUTO_MAX));
        assert_eq!(
            StreamPlan::fixed(3),
            StreamPlan { start: 3, cap: 3, rtt: Duration::ZERO, window: 0, grow_every: None }
        );
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
