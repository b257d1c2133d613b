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
mod listen;
mod merge;
mod open_disk;
mod plan_session;
mod policy;
mod sender;
mod session;
mod verify;
mod writer;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::bounded;
use ferry_wire::PeerInfo;
use serde::Serialize;

use crate::access::{Access, AccessList, Revoke};
use crate::conn::{server_handshake, Conn, Link, Rx, Sock};
use crate::error::MoveError;
use ferry_datastore::points::Protection;
use ferry_datastore::store::Datastore;
use ferry_io::BackendChoice;

pub use listen::{serve, Limits, MAX_SESSION_CHUNKS, MAX_SESSION_DISKS};
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
    /// What remote clients' retention requests cannot drop (`--keep-min`, `--immutable`);
    /// none for an in-process target (its datastore is the caller's own).
    pub protection: Protection,
    /// What one peer, or many, may take of the server (listen.rs).
    pub limits: Limits,
    /// The bandwidth limit all sessions' received bytes are charged to (`serve --bwlimit`).
    pub throttle: Option<Arc<crate::throttle::Throttle>>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            backend: BackendChoice::Auto,
            queue_depth: None,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8),
            protection: Protection::default(),
            limits: Limits::default(),
            throttle: None,
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
    /// Name of the token the peer authenticated with (its access-file line).
    pub token: Option<String>,
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
    /// Chunks whose old contents, read for their undo records, did not match the digest
    /// map: the image was changed outside ferry since the last session (booted in place?).
    /// Their records hold the real contents; `ferry points verify` names the chunks left.
    pub chunks_changed_outside: u64,
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

/// Serve one connection to its end. Never panics on bad input; the report says how it ended.
///
/// The peer authenticates with a token of the list `access` holds now, and the session
/// runs under that token's grant (role, replicas) and is registered with `access`: a reload
/// that revokes the token ends it (a `NotAllowed` error to the source, then the socket is
/// shut down, as for a writer failure).
pub fn serve_connection(
    link: Link,
    peer: &str,
    ds: &Datastore,
    access: &Arc<Access>,
    cfg: &ServeConfig,
) -> SessionReport {
    let start = Instant::now();
    let report = SessionReport { peer: peer.to_string(), ..Default::default() };
    // A handle that shuts the socket down without the connection's lock (a revocation
    // while the sending thread is blocked on a peer that does not read).
    let killer = link.sock().try_clone().ok();
    let list = access.snapshot();
    match server_handshake(link, peer, list.clone()) {
        Ok((conn, mut rx, info)) => {
            let who = Authenticated { access, list: &list, killer, streams: None };
            run_session(conn, &mut rx, &info, who, ds, cfg, start, report, None)
        }
        Err(e) => failed_handshake(report, e),
    }
}

/// A report for a connection whose handshake failed.
fn failed_handshake(mut report: SessionReport, e: MoveError) -> SessionReport {
    report.error = Some(e.detail());
    report.failure = Some(e);
    report
}

/// Who a peer proved to be: the access list it authenticated against, and a handle that
/// ends its connection when its token is revoked.
struct Authenticated<'a> {
    access: &'a Arc<Access>,
    list: &'a Arc<AccessList>,
    killer: Option<Sock>,
    /// Where striped sessions register their tickets (`ferry serve` only).
    streams: Option<Arc<merge::StreamRegistry>>,
}

/// Run the session of an authenticated connection to its end.
#[allow(clippy::too_many_arguments)]
fn run_session(
    conn: Arc<Conn>,
    rx: &mut Rx,
    info: &PeerInfo,
    who: Authenticated<'_>,
    ds: &Datastore,
    cfg: &ServeConfig,
    start: Instant,
    mut report: SessionReport,
    first: Option<ferry_wire::Frame>,
) -> SessionReport {
    let peer = report.peer.clone();
    report.peer_name = info.name.clone();
    let grant = who.list.grant(info.key).cloned().expect("the key the peer proved is one of the list's");
    report.token = Some(grant.name.clone());
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
    let revoke: Revoke = {
        let (events, failed, killer) = (events.clone(), failed.clone(), who.killer);
        Box::new(move |why: &str| {
            failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(MoveError::NotAllowed(why.to_string()));
            if events.try_send(Outgoing::Revoked(why.to_string())).is_err() {
                if let Some(k) = &killer {
                    k.shutdown();
                }
            }
        })
    };
    let registration = who.access.register(&grant, &peer, revoke);
    let mut t = TargetSession {
        conn: conn.clone(),
        ds,
        cfg,
        grant,
        holder: format!("{} from {peer}", info.name),
        events,
        failed: failed.clone(),
        inner: None,
        plan: None,
        opened: (0, 0),
        streams: who.streams,
    };
    let mut result = match &registration {
        Ok(_) => t.run(rx, &mut report, first),
        Err(e) => Err(MoveError::NotAllowed(e.to_string())),
    };
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
    // Every producer is gone once the session is (the registration's revoke holds one):
    // the sending thread sends what is left.
    drop(registration);
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
