//! The target: receives a session, verifies every chunk, writes the datastore.
//!
//! ```text
//!  socket --read--> session thread ---------- Frame, Error -----------> sending thread --write--> socket
//!   (session.rs; open_disk.rs,            (ReplicaOpened, ResumeInfo,        (sender.rs)
//!   plan_session.rs, digest_map.rs)        digest maps, Committed)                ^
//!     |  Data (payload in a pool buffer)                                          |
//!     v                                                                           |
//!   verify workers (verify.rs: zstd, BLAKE3)                                      |
//!     |  verified chunk                                                           |
//!     v                                                                           |
//!   writer thread (writer/mod.rs; writer/undo.rs: old contents, undo   ---------+
//!   fdatasync rounds; writer/barrier.rs: checkpoints, the commit)      Checkpoint, WriterFailed,
//!     ^                                                                digest maps (late requests)
//!     +-- session thread: OpenDisk (hand-over), ZeroRun, Intent, Flush, Commit
//! ```
//!
//! Threads and who owns what. The session thread ([`serve_connection`]) reads
//! and validates every frame and dispatches it; it owns the replica lock, the
//! catalog and the disks it has opened but not handed over. The sending thread
//! is the only one that writes to the socket: everyone else sends it
//! `Outgoing` events (sender.rs) over one bounded channel, and answers
//! the wire session queues while validating a received frame (an Error for a
//! refused one) wait for it too (`Conn::defer_answers`). The writer owns the
//! images, undo files and digest maps of the disks handed to it; it never
//! touches the socket: a durable checkpoint is an event, and so is its failure
//! (it records the typed error for the session first, then the sending thread
//! sends the Error frame and shuts the socket down, which ends the session
//! thread's blocking read; the session reports the writer's error, the cause,
//! rather than the hang-up it saw next).
//!
//! Digest maps. A disk opened stays with the session thread until its first
//! item that needs the writer (Data, ZeroRun, Intent, Flush; the Commit hands
//! over every disk left), so the session thread answers the DigestMapRequest
//! the source sends right after OpenDisk itself, without copying the map. The
//! protocol allows a request later too (PROTOCOL.md: any time the replica is
//! open, one in flight per disk), so a request for a disk the writer holds is
//! not refused: it is routed to the writer, which queues the map's frames for
//! the sending thread, and the session thread waits for its answer.
//!
//! Ordering: the session thread numbers the items it dispatches; a Flush
//! becomes a barrier that the writer runs once every item numbered below it
//! is written (verify workers and zero runs finish out of order: a count of
//! items done is not enough).
//! At a barrier the writer fdatasyncs the image, stores the digest map and the
//! session state (atomically), and only then sends the Checkpoint event: a
//! checkpoint the source sees is durable. A barrier with the Commit already
//! queued right behind it is skipped: the commit makes everything durable.
//! The writer answers the Commit after every earlier barrier, and the session
//! thread queues Committed only once it has that answer and the catalog is
//! written: the channel keeps that order, so every Checkpoint goes out before
//! Committed.
//!
//! Undo records: a chunk is overwritten only once its old contents are durable
//! in the undo file (DATASTORE.md, "Order of writes"). Chunks the source
//! announces with Intent frames (cbt mode) are saved ahead of their data, so the
//! fdatasync rounds run while the data is still on its way.

mod digest_map;
mod open_disk;
mod plan_session;
mod sender;
mod session;
mod verify;
mod writer;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::bounded;
use ferry_wire::Authenticator;
use serde::Serialize;

use crate::conn::{server_handshake, Link, Sock};
use crate::error::{MoveError, Result};
use crate::tls::{FirstBytes, ServerTransport};
use ferry_datastore::store::Datastore;
use ferry_io::BackendChoice;

use sender::{run_sender, Outgoing, OUTGOING_MAX};
use session::TargetSession;

/// Target settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// IO backend for writes.
    pub backend: BackendChoice,
    /// IO operations in flight (old-content reads, writes, undo syncs); `None`: [`auto_depth`].
    pub queue_depth: Option<usize>,
    /// Verify workers.
    pub workers: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            backend: BackendChoice::Auto,
            queue_depth: None,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8),
        }
    }
}

impl ServeConfig {
    /// IO operations in flight for a session with chunks of `chunk_size` bytes.
    pub fn depth(&self, chunk_size: u32) -> usize {
        self.queue_depth.unwrap_or_else(|| auto_depth(chunk_size)).clamp(1, 256)
    }
}

/// The target's default queue depth: 2 MiB of chunks in flight, at least 16 operations
/// and at most 64. An overwritten chunk takes three operations (its old contents read,
/// a share of an undo fdatasync, its write) and a 64 KiB write is short, so small chunks
/// need more of them in flight to keep the device busy: a 1% incremental of 64 KiB
/// chunks ran about 15% faster at 32 than at 16 (bench/RESULTS.md).
pub fn auto_depth(chunk_size: u32) -> usize {
    ((2usize << 20) / chunk_size.max(1) as usize).clamp(16, 64)
}

/// What one session did, for logs and `serve --json`.
#[derive(Debug, Serialize, Default)]
pub struct SessionReport {
    /// Peer address.
    pub peer: String,
    /// Peer's name from the handshake.
    pub peer_name: String,
    /// Replica written.
    pub replica: Option<String>,
    /// Restore point made, if the session committed.
    pub point_id: Option<u64>,
    /// True when an interrupted session was resumed.
    pub resumed: bool,
    /// Bytes received from the connection.
    pub bytes_received: u64,
    /// Bytes sent on the connection.
    pub bytes_sent: u64,
    /// Digest maps asked for.
    pub digest_maps: u64,
    /// Of those, maps the source had cached (answered by a DigestMapEnd alone).
    pub digest_map_hits: u64,
    /// DigestMapPart frames sent.
    pub digest_map_parts: u64,
    /// Chunks written.
    pub chunks_written: u64,
    /// Logical bytes written.
    pub bytes_written: u64,
    /// Zero chunks (holes).
    pub chunks_zero: u64,
    /// IO backend used.
    pub backend: String,
    /// Seconds from handshake to end.
    pub duration_s: f64,
    /// Stage figures.
    pub stages: Vec<crate::stats::StageSummary>,
    /// The error that ended the session, if any (with its causes).
    pub error: Option<String>,
    /// The same error, typed (not serialised): a local target's cause for the source.
    #[serde(skip)]
    pub failure: Option<MoveError>,
    /// Warning shown once (IO backend fallback).
    pub warning: Option<String>,
}

/// What a server reports while it serves.
pub trait ServeObserver: Send + Sync {
    /// A session ended (well or not).
    fn session_done(&self, report: &SessionReport);
    /// Accepting a connection failed (the server goes on).
    fn accept_failed(&self, error: &std::io::Error);
}

/// Serve `ds` on `listener`: each connection gets a session on a thread of its
/// own (its TLS handshake included, with `transport` TLS), until the listener
/// fails for good (it never returns otherwise).
pub fn serve(
    listener: std::net::TcpListener,
    ds: Datastore,
    auth: Arc<dyn Authenticator>,
    transport: ServerTransport,
    cfg: ServeConfig,
    obs: Arc<dyn ServeObserver>,
) -> Result<()> {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                obs.accept_failed(&e);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().map(|p| p.to_string()).unwrap_or_else(|_| "unknown".into());
        let (ds, auth, cfg, session_obs) = (ds.clone(), auth.clone(), cfg.clone(), obs.clone());
        let transport = transport.clone();
        let spawned = std::thread::Builder::new().name("ferry-session".into()).spawn(move || {
            let report = match secure(stream, &peer, &transport) {
                Ok(link) => serve_connection(link, &peer, &ds, auth, &cfg),
                Err(e) => SessionReport {
                    peer: peer.clone(),
                    error: Some(e.detail()),
                    failure: Some(e),
                    ..Default::default()
                },
            };
            session_obs.session_done(&report);
        });
        if let Err(e) = spawned {
            obs.accept_failed(&e);
        }
    }
    Ok(())
}

/// The transport of an accepted connection: the TLS handshake, or none with
/// `--insecure-plaintext`. A source that speaks the other kind is told so in a
/// plaintext Error frame (`tls::plaintext_refusal`) and refused.
fn secure(mut stream: std::net::TcpStream, peer: &str, transport: &ServerTransport) -> Result<Link> {
    let first = crate::tls::peek_first_bytes(&stream);
    let tls = matches!(transport, ServerTransport::Tls(_));
    if (tls && first == FirstBytes::Plaintext) || (!tls && first == FirstBytes::Tls) {
        use std::io::Write;
        let (frame, message) = crate::tls::plaintext_refusal(tls);
        let _ = stream.set_write_timeout(Some(crate::conn::HANDSHAKE_TIMEOUT));
        let _ = stream.write_all(&frame);
        // Let the refusal arrive before the close (unread bytes would reset the connection).
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        let _ = std::io::copy(&mut std::io::Read::take(&mut stream, 1 << 16), &mut std::io::sink());
        return Err(MoveError::Usage(format!("refused {peer}: {message}")));
    }
    match transport {
        ServerTransport::Tls(cfg) => {
            let established = crate::tls::accept(&mut stream, peer, cfg)?;
            Ok(Link::tls(stream, established))
        }
        ServerTransport::Plaintext => Ok(Link::plain(Sock::Tcp(stream))),
    }
}

/// Serve one connection to its end. Never panics on bad input; the report says how it ended.
pub fn serve_connection(
    sock: Link,
    peer: &str,
    ds: &Datastore,
    auth: Arc<dyn Authenticator>,
    cfg: &ServeConfig,
) -> SessionReport {
    let start = Instant::now();
    let mut report = SessionReport { peer: peer.to_string(), ..Default::default() };
    let (conn, mut rx, info) = match server_handshake(sock, peer, auth) {
        Ok(x) => x,
        Err(e) => {
            report.error = Some(e.detail());
            report.failure = Some(e);
            return report;
        }
    };
    report.peer_name = info.name.clone();
    // From here on only the sending thread writes to the socket.
    conn.defer_answers();
    let (events, outgoing) = bounded(OUTGOING_MAX);
    let failed = Arc::new(Mutex::new(None));
    let sender = {
        let (conn, failed) = (conn.clone(), failed.clone());
        std::thread::Builder::new()
            .name("ferry-send".into())
            .spawn(move || run_sender(conn, outgoing, failed))
            .expect("spawn sending thread")
    };
    let mut t = TargetSession {
        conn: conn.clone(),
        ds,
        cfg,
        holder: format!("{} from {peer}", info.name),
        events,
        failed: failed.clone(),
        inner: None,
        plan: None,
    };
    let mut result = t.run(&mut rx, &mut report);
    if let Err(e) = &result {
        let _ = t.events.send(Outgoing::Error(e.code(), e.detail()));
        report.error = Some(e.detail());
    }
    if let Some(inner) = t.inner.take() {
        // A session that failed before any disk was recorded has nothing to resume: leave no
        // session.json behind (a disk too large for its NBD export, a chunk size mismatch).
        if result.is_err() && !inner.resumed && inner.state.disks.is_empty() {
            let _ = inner.replica.clear_session();
        }
        inner.fill_counters(&mut report);
        report.stages = inner.finish().summary();
    }
    // Every producer is gone once the session is: the sending thread sends what is left.
    drop(t);
    let _ = sender.join();
    // The writer's error is the cause; what the session thread saw next ("session closed",
    // a hang-up) is its consequence.
    if let Some(e) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        report.error = Some(e.detail());
        result = Err(e);
    }
    conn.shutdown();
    report.bytes_received = rx.bytes_received;
    report.bytes_sent = conn.bytes_sent();
    report.duration_s = start.elapsed().as_secs_f64();
    report.failure = result.err();
    report
}
