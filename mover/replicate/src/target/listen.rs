//! Serving over TCP: the accept loop, and the bounds that keep a server up
//! whatever its peers do ([`Limits`]; README, "Target: a datastore").
//!
//! ```text
//!  listener --accept--> parked (no thread: a socket that has sent nothing yet)
//!                         |  readable                       | handshake deadline: closed
//!                         v
//!                       connection thread: handshake (deadline) -> session slot -> session
//!  over --max-connections: an Error frame (ReplicaBusy, "server busy"), then the
//!  socket is drained (not reset, so the peer reads the error) for 2 s at most
//! ```
//!
//! Design. One thread (the caller's) accepts and holds every connection that
//! has not sent a byte yet in one `poll` set: an idle connection costs a socket
//! and a few dozen bytes, no thread. A connection that sends gets a thread of
//! its own for its handshake, which then becomes its session thread, so the
//! session code and a TLS layer over it stay blocking and simple. Both are
//! bounded: every accepted connection (parked, in its handshake, or in a
//! session) holds one of `--max-connections` slots, and the whole handshake
//! must be over `--handshake-timeout` after the accept, however the peer
//! spreads its bytes (a read waits only for what is left of the deadline); an
//! authenticated connection then needs one of `--max-sessions` slots. So the
//! server's threads are at most 2 (the accept loop and the SIGHUP watcher) +
//! connections that sent something (a handshake thread, which becomes the
//! session thread or, for a joined stream, that stream's reader) + sessions ×
//! (4 + `--workers` + 8): the sending and writer threads, the first stream's
//! reader of a striped session, the keepalive ticker of a long bookkeeping
//! step, the verify workers, and at most `ferry_io::backend::IOWQ_MAX_WORKERS`
//! io_uring kernel workers for the writer's ring. A connection over a limit
//! gets a clear busy error, never a thread.
//!
//! After authentication a session that hears nothing from its source for
//! `--idle-timeout` ends (its read times out), and TCP keepalive plus
//! `TCP_USER_TIMEOUT` fail a connection whose peer vanished while the target
//! was writing: a stalled (SIGSTOP) or vanished source releases its replica
//! lock within the idle timeout. Sources send a Keepalive frame after 5 s
//! without sending anything, so a busy one never looks idle.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_io::sys::{poll_readable, PollEntry};
use ferry_wire::{ErrorCode, ErrorFrame, Frame};

use super::merge::{read_stream, StreamRegistry};
use super::{run_session, Authenticated, ServeConfig, ServeObserver, SessionReport};
use crate::access::Access;
use crate::conn::Link;
use crate::conn::{self, server_handshake_within, Sock, KEEPALIVE_INTERVAL};
use crate::error::{MoveError, Result};
use crate::tls::{FirstBytes, ServerTransport};
use ferry_datastore::store::Datastore;

/// What one peer, or many, may take of a server. The defaults suit a small
/// server (this project's 2-core VM); README lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once: not yet authenticated, or in a session (`--max-connections`).
    pub max_connections: usize,
    /// Authenticated sessions at once (`--max-sessions`).
    pub max_sessions: usize,
    /// The whole handshake, from the accept to the peer's proof (`--handshake-timeout`).
    pub handshake_timeout: Duration,
    /// A session that receives nothing for this long ends (`--idle-timeout`).
    pub idle_timeout: Duration,
    /// The largest disk a source may open (`--max-disk-size`), checked before anything is
    /// created, resized or allocated for it.
    pub max_disk_size: u64,
}

/// Chunks all the disks of one replica session may have together: a session holds a
/// digest map of 32 bytes per chunk for each disk it opened, so this bounds that memory
/// at 2 GiB (64 Mi chunks: 4 TiB of disks with 64 KiB chunks, 256 TiB with 4 MiB ones).
pub const MAX_SESSION_CHUNKS: u64 = 1 << 26;

/// Disks one replica session may open: a VM has a few dozen at most; each opened disk
/// holds an image file, an entry in session.json (rewritten as disks open) and some memory.
pub const MAX_SESSION_DISKS: u32 = 1024;

impl Default for Limits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Limits {
            max_connections: 4096,
            // A session takes a few threads and up to ~100 MiB of buffers (4 MiB chunks):
            // 8 per core, at least 8, at most 64.
            max_sessions: (8 * cores).clamp(8, 64),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_disk_size: 64 << 40,
        }
    }
}

impl Limits {
    /// The shortest idle timeout: twice the sources' keepalive interval, so that a source
    /// that is busy but has nothing to send is never taken for a stalled one.
    pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(2 * KEEPALIVE_INTERVAL.as_secs());

    /// Refuse limits a server cannot work with (a usage error naming the flag).
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(MoveError::Usage(m));
        if self.max_connections == 0 || self.max_sessions == 0 {
            return bad("--max-connections and --max-sessions must be at least 1".into());
        }
        if self.max_sessions > self.max_connections {
            return bad(format!(
                "--max-sessions {} is more than --max-connections {}: every session is a connection",
                self.max_sessions, self.max_connections
            ));
        }
        if self.idle_timeout < Self::MIN_IDLE_TIMEOUT {
            return bad(format!(
                "--idle-timeout must be at least {} s: sources send a keepalive every {} s while busy",
                Self::MIN_IDLE_TIMEOUT.as_secs(),
                KEEPALIVE_INTERVAL.as_secs()
            ));
        }
        if self.handshake_timeout < Duration::from_secs(1) {
            return bad("--handshake-timeout must be at least 1 s".into());
        }
        if self.max_disk_size < ferry_wire::MIN_CHUNK_SIZE as u64 {
            return bad(format!("--max-disk-size must be at least {} bytes", ferry_wire::MIN_CHUNK_SIZE));
        }
        Ok(())
    }
}

/// One of a counted number of places (connections, sessions): given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place if fewer than `max` are taken.
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection accepted that has sent nothing yet: it waits in the poll set, not on a thread.
struct Parked {
    stream: TcpStream,
    peer: String,
    accepted: Instant,
    slot: Slot,
}

/// A refused connection: the busy error went out; what the peer still sends is read and
/// dropped until it closes (so the error is not lost to a reset), for [`DRAIN_TIME`] at most.
struct Draining {
    stream: TcpStream,
    until: Instant,
}

/// How long a refused connection is drained at most.
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// Refused connections drained at once at most; more are closed at once.
const DRAINING_MAX: usize = 64;

/// Connections the kernel queues for the accept loop.
const LISTEN_BACKLOG: u32 = 1024;

/// Everything the connection threads share.
struct Shared {
    ds: Datastore,
    access: Arc<Access>,
    transport: ServerTransport,
    cfg: ServeConfig,
    obs: Arc<dyn ServeObserver>,
    sessions: Arc<AtomicUsize>,
    /// Tickets of the striped sessions running, for their further connections to join.
    streams: Arc<StreamRegistry>,
}

/// Serve `ds` on `listener` within `cfg.limits`: each connection that speaks gets a thread
/// of its own for its handshake and session, until the listener fails for good (it never
/// returns otherwise).
pub fn serve(
    listener: TcpListener,
    ds: Datastore,
    access: Arc<Access>,
    transport: ServerTransport,
    cfg: ServeConfig,
    obs: Arc<dyn ServeObserver>,
) -> Result<()> {
    cfg.limits.check()?;
    let net = |source| MoveError::Net { peer: "listener".into(), source };
    listener.set_nonblocking(true).map_err(net)?;
    // A burst of sources (the top of the hour) waits in the kernel's queue rather than
    // having its SYNs dropped and retried a second later.
    ferry_io::sys::set_listen_backlog(&listener, LISTEN_BACKLOG).map_err(net)?;
    let limits = cfg.limits.clone();
    let shared = Arc::new(Shared {
        ds,
        access,
        transport,
        cfg,
        obs: obs.clone(),
        sessions: Arc::new(AtomicUsize::new(0)),
        streams: Arc::new(StreamRegistry::default()),
    });
    let open = Arc::new(AtomicUsize::new(0));
    let mut parked: Vec<Parked> = Vec::new();
    let mut draining: Vec<Draining> = Vec::new();
    let mut entries: Vec<PollEntry> = Vec::new();
    loop {
        let now = Instant::now();
        parked.retain(|p| {
            let keep = now < p.accepted + limits.handshake_timeout;
            if !keep {
                let error = format!(
                    "the handshake did not finish within {} s (nothing received)",
                    limits.handshake_timeout.as_secs_f64()
                );
                obs.session_done(&SessionReport { peer: p.peer.clone(), error: Some(error), ..Default::default() });
            }
            keep
        });
        draining.retain(|d| now < d.until);
        let next = parked.iter().map(|p| p.accepted + limits.handshake_timeout).chain(draining.iter().map(|d| d.until));
        // Rounded up to the next millisecond, so that the deadline has passed when poll returns.
        let wait = next.min().map_or(Duration::from_secs(3600), |t| t - now.min(t) + Duration::from_millis(1));
        entries.clear();
        entries.push(PollEntry { fd: listener.as_raw_fd(), ready: false });
        entries.extend(parked.iter().map(|p| PollEntry { fd: p.stream.as_raw_fd(), ready: false }));
        entries.extend(draining.iter().map(|d| PollEntry { fd: d.stream.as_raw_fd(), ready: false }));
        if let Err(e) = poll_readable(&mut entries, wait) {
            obs.accept_failed(&e);
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let np = parked.len();
        // From the end: swap_remove moves an entry already looked at.
        for i in (0..draining.len()).rev() {
            if entries[1 + np + i].ready && !drain(&mut draining[i].stream) {
                draining.swap_remove(i);
            }
        }
        for i in (0..np).rev() {
            if entries[1 + i].ready {
                start_connection(parked.swap_remove(i), &shared);
            }
        }
        if entries[0].ready {
            accept_all(&listener, &limits, &open, &mut parked, &mut draining, obs.as_ref());
        }
    }
}

/// Accept every connection waiting: parked, or refused when `--max-connections` are open.
fn accept_all(
    listener: &TcpListener,
    limits: &Limits,
    open: &Arc<AtomicUsize>,
    parked: &mut Vec<Parked>,
    draining: &mut Vec<Draining>,
    obs: &dyn ServeObserver,
) {
    loop {
        let (stream, addr) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                obs.accept_failed(&e);
                // Out of descriptors (EMFILE): the listener stays readable; do not spin on it.
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        };
        let peer = addr.to_string();
        let Some(slot) = Slot::take(open, limits.max_connections) else {
            let n = limits.max_connections;
            let message = format!(
                "server busy: {n} connections open, its limit (ferry serve --max-connections {n}); try again later"
            );
            if let Some(d) = refuse(stream, &message) {
                if draining.len() < DRAINING_MAX {
                    draining.push(d);
                }
            }
            obs.session_done(&SessionReport { peer, error: Some(message), ..Default::default() });
            continue;
        };
        // Accepted sockets block (only the listener does not): the connection thread reads.
        let _ = stream.set_nodelay(true);
        let _ = ferry_io::sys::set_tcp_keepalive(
            &stream,
            conn::TCP_KEEPALIVE_IDLE,
            conn::TCP_KEEPALIVE_INTERVAL,
            conn::TCP_KEEPALIVE_PROBES,
        );
        parked.push(Parked { stream, peer, accepted: Instant::now(), slot });
    }
}

/// Send a busy Error frame (whatever state the peer's handshake is in, it may receive an
/// Error) and start draining the connection.
fn refuse(stream: TcpStream, message: &str) -> Option<Draining> {
    let mut out = BytesMut::new();
    Frame::Error(ErrorFrame { code: ErrorCode::ReplicaBusy, message: message.to_string() }).encode(&mut out);
    stream.set_nonblocking(true).ok()?;
    // A fresh socket's send buffer takes a small frame whole.
    (&stream).write_all(&out).ok()?;
    stream.shutdown(Shutdown::Write).ok()?;
    Some(Draining { stream, until: Instant::now() + DRAIN_TIME })
}

/// Read and drop what a refused peer sent; false once it closed (or failed).
fn drain(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// The connection sent its first bytes: its thread runs the handshake and the session.
fn start_connection(p: Parked, shared: &Arc<Shared>) {
    let sh = shared.clone();
    let spawned = std::thread::Builder::new().name("ferry-session".into()).spawn(move || {
        let report = serve_tcp(p.stream, &p.peer, p.accepted, &sh);
        drop(p.slot);
        sh.obs.session_done(&report);
    });
    if let Err(e) = spawned {
        // The closure (the socket and its slot) is dropped: the connection closes.
        shared.obs.accept_failed(&e);
    }
}

/// One TCP connection: the handshake within its deadline, a session slot, the session with
/// the idle timeout.
fn serve_tcp(stream: TcpStream, peer: &str, accepted: Instant, sh: &Shared) -> SessionReport {
    let start = Instant::now();
    let limits = &sh.cfg.limits;
    let mut report = SessionReport { peer: peer.to_string(), ..Default::default() };
    let link = match secure(stream, peer, &sh.transport, accepted + limits.handshake_timeout) {
        Ok(link) => link,
        Err(e) => {
            report.error = Some(e.detail());
            report.failure = Some(e);
            return report;
        }
    };
    let killer = link.sock().try_clone().ok();
    let list = sh.access.snapshot();
    let (conn, mut rx, info) =
        match server_handshake_within(link, peer, list.clone(), accepted, limits.handshake_timeout) {
            Ok(x) => x,
            Err(e) => {
                report.error = Some(e.detail());
                report.failure = Some(e);
                return report;
            }
        };
    // The first frame tells a further connection of a striped session (Join), which
    // needs no session slot, from a session's first connection. A slot is taken before
    // it when one is free (an authenticated connection that sends nothing yet holds one,
    // as a session does) and given back for a Join.
    let early = Slot::take(&sh.sessions, limits.max_sessions);
    conn.set_write_timeout(Some(limits.idle_timeout));
    rx.set_idle_timeout(limits.idle_timeout);
    let first = match rx.next_frame() {
        Ok(Some(f)) => f,
        Ok(None) => return report,
        Err(e) => {
            report.error = Some(e.detail());
            report.failure = Some(e);
            return report;
        }
    };
    if let Frame::Join(j) = first {
        drop(early);
        let token = list.grant(info.key).map(|g| g.name.clone()).unwrap_or_default();
        report.peer_name = info.name;
        report.token = Some(token.clone());
        return join_stream(conn, rx, j, &token, killer, sh, report);
    }
    let Some(_session) = early.or_else(|| Slot::take(&sh.sessions, limits.max_sessions)) else {
        let n = limits.max_sessions;
        let message = format!(
            "server busy: {n} sessions in progress, its limit (ferry serve --max-sessions {n}); try again later"
        );
        conn.send_error(ErrorCode::ReplicaBusy, &message);
        // Read what the source sends until it closes (it does, on the error), so that the
        // error is not lost to a reset: DRAIN_TIME at most.
        rx.set_timeout(Some(DRAIN_TIME));
        let until = Instant::now() + DRAIN_TIME;
        while Instant::now() < until && matches!(rx.next_frame(), Ok(Some(_))) {}
        conn.shutdown();
        report.peer_name = info.name;
        report.error = Some(message);
        return report;
    };
    let who = Authenticated { access: &sh.access, list: &list, killer, streams: Some(sh.streams.clone()) };
    run_session(conn, &mut rx, &info, who, &sh.ds, &sh.cfg, start, report, Some(first))
}

/// A further connection of a striped session (PROTOCOL.md section 11): it joins with the
/// ticket its session issued to the same token, and this thread reads it into the
/// session's merge until it ends. It holds a connection slot, no session slot; it can
/// never open a replica (its wire session is `Joined`).
fn join_stream(
    conn: Arc<conn::Conn>,
    mut rx: conn::Rx,
    j: ferry_wire::Join,
    token: &str,
    killer: Option<Sock>,
    sh: &Shared,
    mut report: SessionReport,
) -> SessionReport {
    let name = format!("{} stream {}", report.peer, j.stream);
    let joined = conn
        .handle(Frame::Join(j.clone()))
        .and_then(|_| sh.streams.join(&j.ticket, token, j.stream, killer))
        .and_then(|set| {
            // A stream counted live that cannot answer ends at once (it delivers nothing).
            conn.send(&Frame::Joined(ferry_wire::Joined { stream: j.stream }))
                .map(|_| set.clone())
                .inspect_err(|_| set.reorder.ended(&name, Ok(())))
        });
    match joined {
        Ok(set) => {
            read_stream(&name, &mut rx, &set);
            set.bytes_received.fetch_add(rx.bytes_received, Ordering::Relaxed);
        }
        Err(e) => {
            conn.send_error(e.code(), &e.detail());
            report.error = Some(e.detail());
            report.failure = Some(e);
        }
    }
    conn.shutdown();
    report.bytes_received = rx.bytes_received;
    report.bytes_sent = conn.bytes_sent();
    report
}

/// The transport of an accepted connection: the TLS handshake (over by `deadline`), or
/// none with `--insecure-plaintext`. A source that speaks the other kind is told so in a
/// plaintext Error frame (`tls::plaintext_refusal`) and refused.
fn secure(mut stream: TcpStream, peer: &str, transport: &ServerTransport, deadline: Instant) -> Result<Link> {
    let first = crate::tls::peek_first_bytes(&stream);
    let tls = matches!(transport, ServerTransport::Tls(_));
    if (tls && first == FirstBytes::Plaintext) || (!tls && first == FirstBytes::Tls) {
        let (frame, message) = crate::tls::plaintext_refusal(tls);
        let _ = stream.set_write_timeout(Some(conn::HANDSHAKE_TIMEOUT));
        let _ = stream.write_all(&frame);
        // Let the refusal arrive before the close (unread bytes would reset the connection).
        let _ = stream.shutdown(Shutdown::Write);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = std::io::copy(&mut Read::take(&mut stream, 1 << 16), &mut std::io::sink());
        return Err(MoveError::Usage(format!("refused {peer}: {message}")));
    }
    match transport {
        ServerTransport::Tls(cfg) => {
            let established = crate::tls::accept(&mut stream, peer, cfg, deadline)?;
            Ok(Link::tls(stream, established))
        }
        ServerTransport::Plaintext => Ok(Link::plain(Sock::Tcp(stream))),
    }
}
