//! The target: receives a session, verifies every chunk, writes the datastore.
//!
//! ```text
//! connection thread (deframe, validate) --Data--> verify workers (zstd, BLAKE3)
//!        |  Intent, ZeroRun, Flush, Commit                | verified chunk
//!        v                                                v
//!                      writer thread (IO backend, holes, fdatasync)
//!                                 | Checkpoint / Committed
//!                                 v
//!                               source
//! ```
//!
//! Ordering: the connection thread numbers the items it dispatches; a Flush
//! becomes a barrier that the writer runs once every item numbered below it
//! is written (verify workers and zero runs finish out of order: a count of
//! items done is not enough).
//! At a barrier the writer fdatasyncs the image, stores the digest map and the
//! session state (atomically), and only then sends the Checkpoint: a
//! checkpoint the source sees is durable. A barrier with the Commit already
//! queued right behind it is skipped: the commit makes everything durable.
//!
//! Undo records: a chunk is overwritten only once its old contents are durable
//! in the undo file (DATASTORE.md, "Order of writes"). Chunks the source
//! announces with Intent frames (cbt mode) are saved ahead of their data, so the
//! fdatasync rounds run while the data is still on its way.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use ferry_wire::{
    Authenticator, Checkpoint, Codec, Committed, DataHead, DigestMapEnd, DigestMapPart, Event, Frame, OpenDisk,
    ReplicaOpened, ResumeInfo, MAX_DIGESTS_PER_PART,
};
use serde::Serialize;

use crate::conn::{server_handshake, Conn, Received, Sock};
use crate::error::{MoveError, Result};
use crate::stats::{Stage, StageStats};
use ferry_datastore::digests::{self, DigestMap, ZeroDigests};
use ferry_datastore::image::{Placement, ReplicaImage};
use ferry_datastore::store::{
    self as datastore, now_ns, Datastore, PointDisk, Replica, RestorePoint, SessionDisk, SessionState,
};
use ferry_datastore::{points, undo, StoreError};
use ferry_io::{open_backend, BackendChoice, IoBackend, IoCompletion, IoKind, IoRequest};
use ferry_io::{BufPool, PoolBuf, ALIGN};
use ferry_nbd::NbdBackend;

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
/// own, until the listener fails for good (it never returns otherwise).
pub fn serve(
    listener: std::net::TcpListener,
    ds: Datastore,
    auth: Arc<dyn Authenticator>,
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
        let spawned = std::thread::Builder::new().name("ferry-session".into()).spawn(move || {
            let report = serve_connection(Sock::Tcp(stream), &peer, &ds, auth, &cfg);
            session_obs.session_done(&report);
        });
        if let Err(e) = spawned {
            obs.accept_failed(&e);
        }
    }
    Ok(())
}

/// Serve one connection to its end. Never panics on bad input; the report says how it ended.
pub fn serve_connection(
    sock: Sock,
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
    let mut t = TargetSession {
        conn: conn.clone(),
        ds,
        cfg,
        holder: format!("{} from {peer}", info.name),
        inner: None,
        plan: None,
    };
    let mut result = t.run(&mut rx, &mut report);
    if let Err(e) = &result {
        conn.send_error(e.code(), &e.detail());
        report.error = Some(e.detail());
    }
    if let Some(inner) = t.inner.take() {
        // A session that failed before any disk was recorded has nothing to resume: leave no
        // session.json behind (a disk too large for its NBD export, a chunk size mismatch).
        if result.is_err() && !inner.resumed && inner.state.disks.is_empty() {
            let _ = inner.replica.clear_session();
        }
        inner.fill_counters(&mut report);
        let (stats, wr) = inner.finish();
        // The writer's error is the cause; what the connection thread saw next
        // ("session closed", a hang-up) is its consequence.
        if let Some(e) = wr {
            report.error = Some(e.detail());
            result = Err(e);
        }
        report.stages = stats.summary();
    }
    conn.shutdown();
    report.bytes_received = rx.bytes_received;
    report.bytes_sent = conn.bytes_sent();
    report.duration_s = start.elapsed().as_secs_f64();
    report.failure = result.err();
    report
}

struct TargetSession<'a> {
    conn: Arc<Conn>,
    ds: &'a Datastore,
    cfg: &'a ServeConfig,
    holder: String,
    inner: Option<Active>,
    plan: Option<PlanSession>,
}

/// A plan-only replica session: reads the datastore, changes nothing.
struct PlanSession {
    replica: Option<Replica>,
    session: Option<SessionState>,
    /// Disk id -> (image opened read-only, name, digest map as the disk would have it).
    /// An image behind an NBD export is connected to only when it must be hashed.
    disks: HashMap<u32, (Option<ReplicaImage>, String, DigestMap)>,
}

/// A replica opened in a session, with its pipeline.
struct Active {
    replica: Arc<Replica>,
    state: SessionState,
    /// Disk id -> name.
    disk_names: HashMap<u32, String>,
    pipeline: Option<Pipeline>,
    dispatched: u64,
    latest_point: Option<RestorePoint>,
    resumed: bool,
}

struct Pipeline {
    /// The session's chunk buffers: payloads are received into them, verified, and written
    /// from them.
    pool: Arc<BufPool>,
    to_workers: Option<Sender<(u64, DataHead, PoolBuf)>>,
    to_writer: Sender<WriterMsg>,
    workers: Vec<std::thread::JoinHandle<StageStats>>,
    writer: Option<std::thread::JoinHandle<WriterOutcome>>,
    counters: Arc<Counters>,
    /// The writer's error, typed, once it failed (taken by whoever reports it).
    error: Arc<Mutex<Option<MoveError>>>,
    backend_name: &'static str,
    warning: Option<String>,
}

#[derive(Default)]
struct Counters {
    chunks_written: AtomicU64,
    bytes_written: AtomicU64,
    chunks_zero: AtomicU64,
}

struct WriterOutcome {
    stats: StageStats,
}

impl Active {
    /// Copy the writer's counters into a report (they only grow: a later call is as good or better).
    fn fill_counters(&self, report: &mut SessionReport) {
        if let Some(p) = &self.pipeline {
            report.chunks_written += p.counters.chunks_written.load(Ordering::Relaxed);
            report.bytes_written += p.counters.bytes_written.load(Ordering::Relaxed);
            report.chunks_zero += p.counters.chunks_zero.load(Ordering::Relaxed);
        }
    }

    fn finish(mut self) -> (StageStats, Option<MoveError>) {
        let mut stats = StageStats::default();
        let mut err = None;
        if let Some(mut p) = self.pipeline.take() {
            drop(p.to_workers.take());
            for w in p.workers.drain(..) {
                if let Ok(s) = w.join() {
                    stats.merge(&s);
                }
            }
            let _ = p.to_writer.send(WriterMsg::Stop);
            if let Some(w) = p.writer.take() {
                if let Ok(o) = w.join() {
                    stats.merge(&o.stats);
                }
            }
            err = p.error.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        (stats, err)
    }
}

impl TargetSession<'_> {
    fn run(&mut self, rx: &mut crate::conn::Rx, report: &mut SessionReport) -> Result<()> {
        loop {
            // Once a pipeline runs, data payloads go straight into its buffers.
            let received = match self.inner.as_ref().and_then(|a| a.pipeline.as_ref()) {
                Some(p) => rx.next_received(&p.pool, &self.conn),
                None => rx.next_frame().map(|f| f.map(Received::Frame)),
            };
            let frame = match received {
                Ok(Some(Received::Frame(f))) => f,
                Ok(Some(Received::Data(head, buf))) => {
                    let a = self.active_mut()?;
                    let seq = a.dispatched;
                    a.dispatched += 1;
                    let p = a.pipeline()?;
                    if p.to_workers.as_ref().is_none_or(|w| w.send((seq, head, buf)).is_err()) {
                        return Err(self.writer_gone());
                    }
                    continue;
                }
                Ok(None) => {
                    if self.inner.is_some() {
                        return Err(self.writer_error().unwrap_or_else(|| MoveError::PeerGone {
                            peer: self.conn.peer().to_string(),
                            side: "source",
                        }));
                    }
                    return Ok(());
                }
                Err(e) => return Err(self.writer_error().unwrap_or_else(|| e.peer_gone_if_reset("source"))),
            };
            let Some(Event::Frame(frame)) = self.conn.handle(frame)? else { continue };
            match frame {
                Frame::OpenReplica(o) if o.flags & ferry_wire::OpenReplica::PLAN_ONLY != 0 => {
                    datastore::validate_name("replica", &o.replica)?;
                    let replica = match self.ds.replica(&o.replica) {
                        Ok(r) => Some(r),
                        Err(StoreError::NotFound(_)) => None, // a new replica
                        Err(e) => return Err(e.into()),
                    };
                    let session = replica.as_ref().map(|r| r.session()).transpose()?.flatten();
                    let catalog = replica.as_ref().map(|r| r.catalog()).transpose()?.unwrap_or_default();
                    let latest = catalog.points.last();
                    self.conn.send(&Frame::ReplicaOpened(ReplicaOpened {
                        session_id: o.session_id,
                        resumed: session.is_some(),
                        latest_point: latest.map_or(0, |p| p.id),
                        latest_point_time_ns: latest.map_or(0, |p| p.point_time_ns),
                        chunk_size: replica.as_ref().map_or(0, |r| r.settings.chunk_size),
                        pending_point_time_ns: session.as_ref().map_or(0, |s| s.point_time_ns),
                    }))?;
                    report.replica = Some(o.replica.clone());
                    self.plan = Some(PlanSession { replica, session, disks: HashMap::new() });
                }
                Frame::OpenDisk(o) if self.plan.is_some() => self.plan_open_disk(&o)?,
                Frame::OpenReplica(o) => {
                    let replica = self.ds.lock_replica(&o.replica, &self.holder, 0, o.retain)?;
                    // A rollback interrupted by a crash is finished before anything else.
                    points::finish_rollback(&replica)?;
                    let catalog = replica.catalog()?;
                    let latest = catalog.points.last().cloned();
                    let (state, resumed, pending_point_time_ns) = match replica.session()? {
                        Some(mut s) if latest.as_ref().is_none_or(|p| p.session_id != s.session_id) => {
                            let pending = s.point_time_ns;
                            s.point_time_ns = o.point_time_ns;
                            (s, true, pending)
                        }
                        _ => (
                            SessionState {
                                version: datastore::DATASTORE_VERSION,
                                session_id: hex(&o.session_id),
                                point_time_ns: o.point_time_ns,
                                started_ns: now_ns(),
                                disks: Default::default(),
                            },
                            false,
                            0,
                        ),
                    };
                    replica.write_session(&state)?;
                    report.replica = Some(o.replica.clone());
                    report.resumed = resumed;
                    let mut sid = [0u8; 16];
                    unhex(&state.session_id, &mut sid);
                    self.conn.send(&Frame::ReplicaOpened(ReplicaOpened {
                        session_id: sid,
                        resumed,
                        latest_point: latest.as_ref().map_or(0, |p| p.id),
                        latest_point_time_ns: latest.as_ref().map_or(0, |p| p.point_time_ns),
                        chunk_size: replica.settings.chunk_size,
                        pending_point_time_ns,
                    }))?;
                    self.inner = Some(Active {
                        replica: Arc::new(replica),
                        state,
                        disk_names: HashMap::new(),
                        pipeline: None,
                        dispatched: 0,
                        latest_point: latest,
                        resumed,
                    });
                }
                Frame::OpenDisk(o) => self.open_disk(&o, report)?,
                Frame::DigestMapRequest(r) if self.plan.is_some() => {
                    let no_disk = self.protocol(format!("no disk {}", r.disk));
                    let plan = self.plan.as_mut().expect("checked");
                    let (image, name, map) = plan.disks.get_mut(&r.disk).ok_or(no_disk)?;
                    if map.unknown_count() > 0 {
                        if image.is_none() {
                            if let Some(r) = &plan.replica {
                                *image = ReplicaImage::open_ro(r, name)?;
                            }
                        }
                        match image {
                            Some(img) => rebuild_unknown(img, map)?,
                            None => {
                                return Err(StoreError::NotFound(format!("disk {name:?} has no image to hash")).into())
                            }
                        }
                    }
                    let sent = send_digest_map(&self.conn, r.disk, map, &r.cached_map_hash)?;
                    sent.count_in(report);
                }
                Frame::DigestMapRequest(r) => {
                    // The writer owns the map and sends it itself (no copy of a map of up to 64 MiB).
                    let a = self.active()?;
                    let (tx, reply) = bounded(1);
                    let msg = WriterMsg::SendDigests { disk: r.disk, cached: r.cached_map_hash, reply: tx };
                    a.pipeline()?.to_writer.send(msg).ok();
                    let sent = reply.recv().map_err(|_| self.writer_gone())??;
                    sent.count_in(report);
                }
                // With a pipeline running, data comes as Received::Data (above).
                Frame::Data(_) => return Err(self.protocol("data before any disk was opened".into())),
                Frame::ZeroRun(z) => {
                    let a = self.active_mut()?;
                    let seq = a.dispatched;
                    a.dispatched += 1;
                    let msg = WriterMsg::Zero { seq, disk: z.disk, first: z.first_chunk, count: z.count };
                    if a.pipeline()?.to_writer.send(msg).is_err() {
                        return Err(self.writer_gone());
                    }
                }
                Frame::Intent(i) => {
                    // Advisory: the writer saves these chunks' old contents ahead of their data.
                    let runs = i.runs.iter().map(|r| (r.first_chunk, r.first_chunk + u64::from(r.count))).collect();
                    let a = self.active()?;
                    if a.pipeline()?.to_writer.send(WriterMsg::Intent { disk: i.disk, runs }).is_err() {
                        return Err(self.writer_gone());
                    }
                }
                Frame::Flush(f) => {
                    let a = self.active()?;
                    let msg = WriterMsg::Barrier { disk: f.disk, next_chunk: f.next_chunk, items_before: a.dispatched };
                    if a.pipeline()?.to_writer.send(msg).is_err() {
                        return Err(self.writer_gone());
                    }
                }
                Frame::Commit(_) => {
                    let point = self.commit()?;
                    report.point_id = Some(point.id);
                    self.conn.send(&Frame::Committed(Committed {
                        point_id: point.id,
                        point_time_ns: point.point_time_ns,
                    }))?;
                    if let Some(inner) = self.inner.take() {
                        inner.fill_counters(report);
                        let (stats, err) = inner.finish();
                        report.stages = stats.summary();
                        if let Some(e) = err {
                            return Err(e);
                        }
                    }
                }
                Frame::Close => return Ok(()),
                Frame::Progress(_) | Frame::Keepalive | Frame::Unknown { .. } => {}
                other => {
                    return Err(self.protocol(format!("unexpected {} frame from the source", other.name())));
                }
            }
        }
    }

    fn active(&self) -> Result<&Active> {
        self.inner.as_ref().ok_or_else(|| self.protocol("no replica open".into()))
    }

    /// The source did something the session does not allow here.
    fn protocol(&self, what: String) -> MoveError {
        MoveError::Protocol { peer: self.conn.peer().to_string(), what }
    }

    fn active_mut(&mut self) -> Result<&mut Active> {
        let peer = self.conn.peer().to_string();
        self.inner.as_mut().ok_or_else(|| MoveError::Protocol { peer, what: "no replica open".into() })
    }

    fn writer_error(&self) -> Option<MoveError> {
        let p = self.inner.as_ref()?.pipeline.as_ref()?;
        p.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn writer_gone(&self) -> MoveError {
        self.writer_error().unwrap_or_else(|| MoveError::Internal("the target writer stopped".into()))
    }

    fn open_disk(&mut self, o: &OpenDisk, report: &mut SessionReport) -> Result<()> {
        datastore::validate_name("disk", &o.name)?;
        let cfg = self.cfg.clone();
        let conn = self.conn.clone();
        let a = self.active_mut()?;
        if a.disk_names.values().any(|n| n == &o.name) {
            return Err(MoveError::Protocol {
                peer: conn.peer().to_string(),
                what: format!("disk {:?} opened twice in one session", o.name),
            });
        }
        let replica_cs = a.replica.settings.chunk_size;
        if replica_cs != 0 && replica_cs != o.chunk_size {
            return Err(MoveError::Usage(format!(
                "replica {:?} uses chunk size {} and cannot take disk {:?} with chunk size {}",
                a.replica.name, replica_cs, o.name, o.chunk_size
            )));
        }
        if replica_cs == 0 {
            let mut s = a.replica.settings.clone();
            s.chunk_size = o.chunk_size;
            datastore::write_atomic(&a.replica.dir, "replica.json", &serde_json::to_vec_pretty(&s).expect("json"))?;
            // The settings are read again by later sessions; this one keeps o.chunk_size.
        }
        let image = ReplicaImage::open_rw(&a.replica, &o.name)?;
        let nbd = image.nbd_uri().is_some();
        // Nothing is written to a disk that does not fit in its export.
        image.check_fits(o.size)?;
        let point_disk =
            a.latest_point.as_ref().and_then(|p| p.disks.iter().find(|d| d.name == o.name).map(|d| (p.id, d.size)));
        let resume = a.state.disks.get(&o.name).filter(|d| d.size == o.size).cloned();
        // The disk's current size: a file's length. An export is larger than the disk it holds:
        // the session's size when resuming, else the latest point's; a disk new to the replica is
        // taken to fill the export up to the source's size, its contents unknown until hashed.
        let existing = match (nbd, &resume, point_disk) {
            (false, _, _) => image.capacity()?,
            (true, Some(_), _) => o.size,
            (true, None, Some((_, psize))) => psize,
            (true, None, None) => o.size,
        };
        // An export may hold a copy already (a seed): the source compares digests rather than sending all.
        let existed = nbd || existing > 0 || point_disk.is_some();
        let chunk_count = o.size.div_ceil(u64::from(o.chunk_size));
        let (previous_size, next_chunk) = match &resume {
            Some(d) => (d.previous_size, d.next_chunk.min(chunk_count)),
            None => (existing, 0),
        };
        // Protect the latest point: old contents go to its undo file before they are overwritten.
        let mut undo_writer = None;
        let mut point_size = 0;
        if let Some((point_id, psize)) = point_disk {
            let mut u = undo::UndoWriter::open(&a.replica.dir, point_id, &o.name, o.chunk_size, psize)?;
            point_size = psize;
            if o.size < existing {
                // Chunks a shrink cuts off (and the new partial last chunk) keep their old contents.
                let cs = u64::from(o.chunk_size);
                let mut buf = vec![0u8; o.chunk_size as usize];
                for c in o.size / cs..psize.div_ceil(cs) {
                    if u.saved.contains_key(&c) {
                        continue;
                    }
                    let len = ((psize - c * cs).min(cs)) as usize;
                    image.read_exact_at(&mut buf[..len], c * cs, "reading old contents of")?;
                    u.append(c, &buf[..len])?;
                }
                u.sync()?;
            }
            undo_writer = Some(u);
        }
        if !nbd && existing != o.size {
            image.resize(existing, o.size, false)?;
        } else if nbd && resume.is_none() && (existing != o.size || point_disk.is_none()) {
            // A grown range may hold bytes of an older, larger disk; everything past the
            // disk's end reads as zeros, so that the export compares equal to the source.
            // Durable before the session names the disk: a resume does not do it again.
            image.resize(existing, o.size, true)?;
            image.sync()?;
        }
        let digests_path = a.replica.digests_path(&o.name)?;
        let zeros = ZeroDigests::new(o.chunk_size);
        // A resumed disk's map was stored at its checkpoints at the session's size; before the
        // first checkpoint (or without a session) it is the latest point's map at the previous size.
        let stored = resume
            .as_ref()
            .and_then(|_| digests::load(&digests_path, o.chunk_size, o.size))
            .or_else(|| digests::load(&digests_path, o.chunk_size, previous_size));
        let mut map = match stored {
            Some(m) => Ok(m),
            // No usable map: a new file is all zeros; an existing one (or any export) is unknown until rebuilt.
            None if existing == 0 && !nbd => DigestMap::zeroed(o.chunk_size, previous_size, &zeros),
            None => DigestMap::new(o.chunk_size, previous_size),
        }
        .map_err(|e| MoveError::Usage(e.to_string()))?;
        map.resize(o.size, |l| zeros.digest(l));
        if resume.is_some() {
            // Chunks after the last checkpoint may have been written without the map knowing.
            for i in next_chunk..chunk_count {
                map.mark_unknown(i);
            }
        }
        let entry = resume.unwrap_or(SessionDisk {
            size: o.size,
            previous_size,
            next_chunk: 0,
            chunks_changed: 0,
            bytes_changed: 0,
        });
        a.state.disks.insert(o.name.clone(), entry.clone());
        a.replica.write_session(&a.state)?;
        if a.pipeline.is_none() {
            let p = start_pipeline(&cfg, o.chunk_size, a.replica.clone(), a.state.clone(), conn.clone())?;
            report.backend = p.backend_name.to_string();
            report.warning = p.warning.clone();
            a.pipeline = Some(p);
        }
        let direct =
            image.path().and_then(|p| OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(p).ok());
        // Chunk writes to an export are pipelined on its connection: several WRITEs in flight.
        let nbd_backend =
            image.nbd_client().zip(image.nbd_uri()).map(|(c, uri)| NbdBackend::new(c, cfg.depth(o.chunk_size), uri));
        a.disk_names.insert(o.disk, o.name.clone());
        let msg = WriterMsg::OpenDisk(
            o.disk,
            Box::new(WDisk {
                name: o.name.clone(),
                image,
                direct,
                nbd: nbd_backend,
                size: o.size,
                chunk_size: o.chunk_size,
                digests: map,
                zeros,
                digests_path,
                dirty: false,
                entry,
                undo: undo_writer,
                point_size,
                presave: VecDeque::new(),
            }),
        );
        if a.pipeline()?.to_writer.send(msg).is_err() {
            return Err(self.writer_gone());
        }
        let finished = next_chunk == chunk_count && chunk_count > 0 && self.active()?.resumed;
        self.conn.send(&Frame::ResumeInfo(ResumeInfo {
            disk: o.disk,
            previous_size,
            next_chunk,
            flags: (if existed { ResumeInfo::EXISTED } else { 0 }) | (if finished { ResumeInfo::FINISHED } else { 0 }),
        }))?;
        Ok(())
    }

    /// OpenDisk in a plan-only session: what the target holds, nothing created or resized.
    fn plan_open_disk(&mut self, o: &OpenDisk) -> Result<()> {
        datastore::validate_name("disk", &o.name)?;
        let plan = self.plan.as_mut().expect("plan session");
        let (image, existing, nbd) = match &plan.replica {
            Some(r) => {
                if r.settings.chunk_size != 0 && r.settings.chunk_size != o.chunk_size {
                    return Err(MoveError::Usage(format!(
                        "replica {:?} uses chunk size {} and cannot take disk {:?} with chunk size {}",
                        r.name, r.settings.chunk_size, o.name, o.chunk_size
                    )));
                }
                match Placement::of(r, &o.name)? {
                    // As open_disk sizes it; the export is connected to only if it must be hashed.
                    Placement::Nbd(_) => {
                        let catalog = r.catalog()?;
                        let point = catalog.points.last().and_then(|p| p.disks.iter().find(|d| d.name == o.name));
                        (None, point.map_or(o.size, |d| d.size), true)
                    }
                    Placement::File(_) => {
                        let f = ReplicaImage::open_ro(r, &o.name).ok().flatten();
                        let size = f.as_ref().and_then(|f| f.capacity().ok()).unwrap_or(0);
                        (f, size, false)
                    }
                }
            }
            None => (None, 0, false),
        };
        let cs = o.chunk_size;
        let chunk_count = o.size.div_ceil(u64::from(cs));
        let resume = plan.session.as_ref().and_then(|s| s.disks.get(&o.name)).filter(|d| d.size == o.size);
        let (previous_size, next_chunk) =
            resume.map_or((existing, 0), |d| (d.previous_size, d.next_chunk.min(chunk_count)));
        let zeros = ZeroDigests::new(cs);
        let stored = plan.replica.as_ref().map(|r| r.digests_path(&o.name)).transpose()?;
        let mut map = match stored.and_then(|p| digests::load(&p, cs, existing)) {
            Some(m) => Ok(m),
            None if existing == 0 && !nbd => DigestMap::zeroed(cs, existing, &zeros),
            None => DigestMap::new(cs, existing),
        }
        .map_err(|e| MoveError::Usage(e.to_string()))?;
        map.resize(o.size, |l| zeros.digest(l));
        let existed = nbd || (image.is_some() && existing > 0);
        plan.disks.insert(o.disk, (image, o.name.clone(), map));
        self.conn.send(&Frame::ResumeInfo(ResumeInfo {
            disk: o.disk,
            previous_size,
            next_chunk,
            flags: if existed { ResumeInfo::EXISTED } else { 0 },
        }))?;
        Ok(())
    }

    fn commit(&mut self) -> Result<RestorePoint> {
        let a = self.active()?;
        let (tx, reply) = bounded(1);
        a.pipeline()?
            .to_writer
            .send(WriterMsg::Commit { items_before: a.dispatched, reply: tx })
            .map_err(|_| self.writer_gone())?;
        let disks = reply.recv().map_err(|_| self.writer_gone())??;
        let a = self.active()?;
        let mut catalog = a.replica.catalog()?;
        let point = RestorePoint {
            id: catalog.next_id.max(1),
            point_time_ns: a.state.point_time_ns,
            completed_ns: now_ns(),
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            session_id: a.state.session_id.clone(),
            disks,
        };
        catalog.next_id = point.id + 1;
        catalog.points.push(point.clone());
        // The catalog write is the commit point; session.json goes after it.
        a.replica.write_catalog(&catalog)?;
        a.replica.clear_session()?;
        points::prune(&a.replica, a.replica.settings.retain)?;
        Ok(point)
    }
}

impl Active {
    fn pipeline(&self) -> Result<&Pipeline> {
        self.pipeline.as_ref().ok_or_else(|| MoveError::Internal("no disk open".into()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str, out: &mut [u8]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = s.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
    }
}

/// A disk as the writer holds it.
struct WDisk {
    name: String,
    image: ReplicaImage,
    /// The file image opened with O_DIRECT, for aligned chunk writes.
    direct: Option<File>,
    /// The pipelined write backend of an image behind an NBD export.
    nbd: Option<NbdBackend>,
    size: u64,
    chunk_size: u32,
    digests: DigestMap,
    zeros: ZeroDigests,
    digests_path: std::path::PathBuf,
    dirty: bool,
    entry: SessionDisk,
    /// Old contents of overwritten chunks go here first (replicas with a point that has this disk).
    undo: Option<undo::UndoWriter>,
    /// Size of the disk at the latest point (what the undo file restores).
    point_size: u64,
    /// Chunks the source announced (Intent) and whose old contents are not saved yet:
    /// runs `start..end`, in order. Saved ahead of their data; data overtakes them.
    presave: VecDeque<(u64, u64)>,
}

enum WriterMsg {
    OpenDisk(u32, Box<WDisk>),
    Chunk {
        seq: u64,
        disk: u32,
        chunk: u64,
        buf: PoolBuf,
        digest: [u8; 32],
    },
    Zero {
        seq: u64,
        disk: u32,
        first: u64,
        count: u64,
    },
    Barrier {
        disk: u32,
        next_chunk: u64,
        items_before: u64,
    },
    /// Answer a DigestMapRequest (the source's cached map has hash `cached`).
    SendDigests {
        disk: u32,
        cached: [u8; 32],
        reply: Sender<Result<MapSent>>,
    },
    Commit {
        items_before: u64,
        reply: Sender<Result<Vec<PointDisk>>>,
    },
    /// The source is about to send these chunks (runs `start..end`, increasing).
    Intent {
        disk: u32,
        runs: Vec<(u64, u64)>,
    },
    Failed(MoveError),
    Stop,
}

fn start_pipeline(
    cfg: &ServeConfig,
    chunk_size: u32,
    replica: Arc<Replica>,
    state: SessionState,
    conn: Arc<Conn>,
) -> Result<Pipeline> {
    let workers = cfg.workers.max(1);
    let depth = cfg.depth(chunk_size);
    let pool = Arc::new(BufPool::new(depth + 2 * workers + 4, chunk_size as usize));
    let (backend, warning) = open_backend(cfg.backend, &pool, depth).map_err(|source| MoveError::Backend {
        side: "target",
        opening: true,
        source,
    })?;
    let backend_name = backend.name();
    let (to_writer, writer_rx) = bounded::<WriterMsg>(depth + 2 * workers + 16);
    let (to_workers, work_rx) = bounded::<(u64, DataHead, PoolBuf)>(workers * 2);
    let counters = Arc::new(Counters::default());
    let error = Arc::new(Mutex::new(None));
    let mut handles = Vec::new();
    for i in 0..workers {
        let rx = work_rx.clone();
        let tx = to_writer.clone();
        let pool = pool.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("ferry-verify-{i}"))
                .spawn(move || verify_worker(rx, tx, pool))
                .expect("spawn verify worker"),
        );
    }
    let writer = {
        let counters = counters.clone();
        let error = error.clone();
        std::thread::Builder::new()
            .name("ferry-writer".into())
            .spawn(move || {
                let mut w = Writer {
                    backend,
                    disks: HashMap::new(),
                    written: 0,
                    done: std::collections::BTreeSet::new(),
                    seq_of: HashMap::new(),
                    stopping: false,
                    barriers: VecDeque::new(),
                    replica,
                    state,
                    conn,
                    counters,
                    stats: StageStats::default(),
                    started: HashMap::new(),
                    next_tag: 0,
                    old_pool: BufPool::new(depth, chunk_size as usize),
                    token_pool: BufPool::new(depth, ALIGN),
                    need_old: VecDeque::new(),
                    old_reads: HashMap::new(),
                    presave_reads: 0,
                    held: Vec::new(),
                    syncing: None,
                    ready: VecDeque::new(),
                    old: Vec::new(),
                };
                let rest = writer_rx.clone();
                if let Err(e) = w.run(writer_rx) {
                    // Recorded before the peer hears of it: the connection thread may see
                    // the peer hang up next and must report this error, not the hang-up.
                    w.conn.send_error(e.code(), &e.detail());
                    *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    w.conn.shutdown();
                    // Give back every pool buffer: verified chunks queued for this writer (and
                    // writes queued in it) own buffers that a verify worker may be waiting for.
                    // Without this the workers never end, the session never ends, and the
                    // replica stays locked until the server restarts.
                    w.barriers.clear();
                    w.drain();
                    for m in rest.iter() {
                        if matches!(m, WriterMsg::Stop) {
                            break;
                        }
                    }
                }
                w.drain();
                WriterOutcome { stats: w.stats }
            })
            .expect("spawn writer")
    };
    Ok(Pipeline {
        pool,
        to_workers: Some(to_workers),
        to_writer,
        workers: handles,
        writer: Some(writer),
        counters,
        error,
        backend_name,
        warning,
    })
}

/// Decompress and verify chunks; a chunk that fails is never passed on.
/// Verify received chunks: a raw payload is hashed in the buffer it was received into,
/// which then goes on to the writer; a compressed one is decompressed into a second buffer.
fn verify_worker(rx: Receiver<(u64, DataHead, PoolBuf)>, tx: Sender<WriterMsg>, pool: Arc<BufPool>) -> StageStats {
    let mut stats = StageStats::default();
    let mut dctx = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    for (seq, d, received) in rx {
        let t = Instant::now();
        let len = d.logical_len as usize;
        let disk_label = || format!("#{}", d.disk);
        let decompress_error =
            |detail: String| MoveError::Decompress { disk: disk_label(), chunk: d.chunk, expected: len, detail };
        let res = match d.codec {
            // The wire checked that a raw payload is exactly the logical length.
            Codec::None => Ok(received),
            Codec::Zstd if len > pool.buf_size() => Err(decompress_error("longer than the chunk size".into())),
            Codec::Zstd => {
                let mut buf = pool.get();
                match dctx.decompress_to_buffer(&received, &mut buf.spare_mut()[..len]) {
                    Ok(n) if n == len => {
                        buf.set_len(len);
                        Ok(buf)
                    }
                    Ok(n) => Err(decompress_error(format!("got {n} bytes"))),
                    Err(e) => Err(decompress_error(e.to_string())),
                }
            }
        };
        let msg = match res {
            Err(e) => WriterMsg::Failed(e),
            Ok(buf) if *blake3::hash(&buf).as_bytes() != d.digest => {
                WriterMsg::Failed(MoveError::DigestMismatch { disk: disk_label(), chunk: d.chunk })
            }
            Ok(buf) => WriterMsg::Chunk { seq, disk: d.disk, chunk: d.chunk, buf, digest: d.digest },
        };
        stats.record(Stage::Verify, t.elapsed());
        if tx.send(msg).is_err() {
            break;
        }
    }
    stats
}

/// Undo records one fdatasync round waits for while more are on their way.
const HOLD_MAX: u64 = 32;

/// Announced runs a disk queues for saving ahead, at most (an Intent is advisory:
/// runs beyond this are dropped, and their chunks are saved when their data comes).
const PRESAVE_RUNS_MAX: usize = 1 << 16;

/// A read of a chunk's old contents for the undo file: for a chunk write that waits
/// for its record, or ahead of the data (an announced chunk, no write yet).
struct OldRead {
    disk: u32,
    chunk: u64,
    /// Length of the chunk at the latest point.
    len: usize,
    write: Option<IoRequest>,
}

/// One round of undo fdatasyncs in flight.
struct Syncing {
    /// Sync operations not finished yet.
    left: usize,
    /// Writes released when all have finished.
    writes: Vec<IoRequest>,
    /// Per sync tag: the disk and its undo writer's `appended()` and `end()` when the sync started.
    upto: HashMap<u64, (u32, (u64, u64))>,
}

/// What a write needs before it may overwrite its chunk.
enum OldContents {
    /// Nothing: no point to protect, beyond the point's size, or saved already.
    NotNeeded,
    /// A record is appended (known zeros); it must become durable.
    Appended,
    /// The old contents must be read (this many bytes) and appended.
    Read(usize),
}

/// What the latest point needs before `chunk` (whose digest was `old_digest`) is overwritten.
fn old_contents(d: &mut WDisk, chunk: u64, old_digest: Option<[u8; 32]>) -> Result<OldContents> {
    let Some(u) = &mut d.undo else { return Ok(OldContents::NotNeeded) };
    let cs = u64::from(d.chunk_size);
    let offset = chunk * cs;
    if offset >= d.point_size {
        return Ok(OldContents::NotNeeded);
    }
    if u.saved.contains_key(&chunk) {
        // Saved before (maybe ahead of its data, announced by an Intent): the record may
        // still have to become durable.
        return Ok(if u.is_durable(chunk) { OldContents::NotNeeded } else { OldContents::Appended });
    }
    let len = (d.point_size - offset).min(cs) as u32;
    // The digest map is consistent with the image (chunks a crash may have changed are
    // marked unknown): old zeros need no read.
    let zero = d.zeros.digest(len);
    if old_digest == Some(zero) {
        u.append_zero(chunk, len, zero)?;
        return Ok(OldContents::Appended);
    }
    Ok(OldContents::Read(len as usize))
}

/// Announced chunks below `end` need no saving ahead any more (their data is here).
fn skip_presave(d: &mut WDisk, end: u64) {
    while let Some(r) = d.presave.front_mut() {
        if r.1 <= end {
            d.presave.pop_front();
        } else {
            r.0 = r.0.max(end);
            break;
        }
    }
}

/// Read the `len` old bytes of `chunk` here, synchronously (zero runs, disks behind an
/// export), and append them to the undo file ([`old_contents`] said they are needed).
/// The record must be synced before the overwrite.
fn save_old_now(d: &mut WDisk, chunk: u64, len: usize, old: &mut Vec<u8>) -> Result<()> {
    let offset = chunk * u64::from(d.chunk_size);
    old.resize(len.max(old.len()), 0);
    d.image.read_exact_at(&mut old[..len], offset, "reading old contents of")?;
    Ok(d.undo.as_mut().expect("old contents are saved for an undo file").append(chunk, &old[..len])?)
}

/// Hash the chunks of an image whose digests are unknown (a seed placed in
/// the datastore, an export placed behind DISK.nbd, a lost or stale map), at
/// local disk speed. Chunks an export reports as zeros are not read.
fn rebuild_unknown(image: &ReplicaImage, map: &mut DigestMap) -> Result<()> {
    let cs = u64::from(map.chunk_size());
    let size = map.disk_size();
    if map.unknown_count() > 0 {
        let zeros = ZeroDigests::new(map.chunk_size());
        for c in image.zero_chunks(map.chunk_size(), size)? {
            if c < map.chunk_count() && !map.is_known(c) {
                map.set(c, zeros.digest(map.chunk_len(c)));
            }
        }
    }
    let mut buf = vec![0u8; map.chunk_size() as usize];
    for i in 0..map.chunk_count() {
        if map.is_known(i) {
            continue;
        }
        let len = map.chunk_len(i) as usize;
        // Bytes past the end of a file image read as zeros (it grows sparse).
        image.read_padded(&mut buf[..len], i * cs, "hashing")?;
        map.set(i, *blake3::hash(&buf[..len]).as_bytes());
    }
    Ok(())
}

/// What answering one DigestMapRequest sent.
struct MapSent {
    cache_hit: bool,
    parts: u64,
}

impl MapSent {
    fn count_in(&self, report: &mut SessionReport) {
        report.digest_maps += 1;
        report.digest_map_hits += u64::from(self.cache_hit);
        report.digest_map_parts += self.parts;
    }
}

/// Send a digest map as parts and an end (or only the end when the client's cached copy is current).
fn send_digest_map(conn: &Conn, disk: u32, map: &DigestMap, cached: &[u8; 32]) -> Result<MapSent> {
    let hash = map.map_hash();
    let cache_hit = hash == *cached;
    let mut parts = 0;
    if !cache_hit {
        for (i, part) in map.digests().chunks(MAX_DIGESTS_PER_PART).enumerate() {
            conn.send(&Frame::DigestMapPart(DigestMapPart {
                disk,
                first_chunk: (i * MAX_DIGESTS_PER_PART) as u64,
                digests: bytes::Bytes::copy_from_slice(part.as_flattened()),
            }))?;
            parts += 1;
        }
    }
    conn.send(&Frame::DigestMapEnd(DigestMapEnd { disk, chunk_count: map.chunk_count(), map_hash: hash, cache_hit }))?;
    Ok(MapSent { cache_hit, parts })
}

struct Writer {
    backend: Box<dyn IoBackend>,
    disks: HashMap<u32, WDisk>,
    /// Items (Data, ZeroRun) done: every item with a sequence number below this one.
    written: u64,
    /// Items done out of order, above `written` (workers and zero runs overtake each other).
    done: std::collections::BTreeSet<u64>,
    /// Sequence number of each write in flight or held, by tag.
    /// Per write (in flight or queued), by tag: its item's sequence number, chunk and
    /// digest. The digest map takes the digest when the write completes, so a map stored
    /// at a checkpoint never claims contents that neither the image nor an undo record holds.
    seq_of: HashMap<u64, (u64, u64, [u8; 32])>,
    /// The session is ending: Checkpoints are still made durable, but may find no one to tell.
    stopping: bool,
    barriers: VecDeque<WriterMsg>,
    replica: Arc<Replica>,
    state: SessionState,
    conn: Arc<Conn>,
    counters: Arc<Counters>,
    stats: StageStats,
    /// Start times of the operations in flight by tag, for latency.
    started: HashMap<u64, Instant>,
    next_tag: u64,
    /// Buffers for reading the old contents that undo files keep (not the session's
    /// pool: the writer must never wait for a buffer a verify worker holds).
    old_pool: BufPool,
    /// Small buffers that travel with Sync operations (the backend moves a buffer with each).
    token_pool: BufPool,
    /// Writes waiting for a buffer or an IO slot to read their chunk's old contents.
    need_old: VecDeque<OldRead>,
    /// Old-content reads in flight, by tag.
    old_reads: HashMap<u64, OldRead>,
    /// Writes whose undo records are appended but not known durable.
    held: Vec<IoRequest>,
    /// The undo fdatasyncs in flight (one round at a time: group commit) and the writes they release.
    syncing: Option<Syncing>,
    /// Writes free to go (no undo record needed, or theirs is durable).
    ready: VecDeque<IoRequest>,
    /// Old-content reads in flight for announced chunks (no write waits on them).
    presave_reads: usize,
    /// Reused buffer for reading old contents.
    old: Vec<u8>,
}

impl Writer {
    fn run(&mut self, rx: Receiver<WriterMsg>) -> Result<()> {
        loop {
            self.pump(rx.is_empty())?;
            self.run_barriers()?;
            let busy = self.in_flight();
            let msg = if busy >= self.backend.depth() {
                None
            } else if busy > 0 || self.queued() {
                rx.try_recv().ok()
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return Ok(()),
                }
            };
            let Some(msg) = msg else {
                // Nothing new: wait for an operation (with none in flight, pump moves the queues).
                if self.in_flight() > 0 {
                    self.complete_one()?;
                }
                continue;
            };
            match msg {
                WriterMsg::Stop => {
                    // The session is ending: everything the source sent is here. Finish its writes
                    // and run its Flushes, so that a resume starts from the last Flush received
                    // rather than from the last one this writer had caught up with. Nobody may be
                    // listening for those Checkpoints any more; their state is durable first.
                    self.stopping = true;
                    for d in self.disks.values_mut() {
                        d.presave.clear();
                    }
                    loop {
                        self.pump(true)?;
                        if self.in_flight() == 0 {
                            break;
                        }
                        self.complete_one()?;
                    }
                    return self.run_barriers();
                }
                WriterMsg::Failed(e) => {
                    let e = match e {
                        MoveError::DigestMismatch { disk, chunk } => {
                            MoveError::DigestMismatch { disk: self.disk_name(&disk), chunk }
                        }
                        other => other,
                    };
                    return Err(e);
                }
                WriterMsg::OpenDisk(id, d) => {
                    self.disks.insert(id, *d);
                }
                WriterMsg::Chunk { seq, disk, chunk, buf, digest } => {
                    let d = self.disks.get_mut(&disk).ok_or_else(|| MoveError::Internal(format!("no disk {disk}")))?;
                    if d.digests.get(chunk) == Some(digest) {
                        // The replica already holds these bytes: nothing to write, nothing to undo.
                        self.item_done(seq);
                        continue;
                    }
                    // Data travels in increasing chunk order: announced chunks up to this
                    // one are saved (below) or were never sent.
                    skip_presave(d, chunk + 1);
                    let offset = chunk * u64::from(d.chunk_size);
                    let len = buf.len();
                    let fd = match &d.direct {
                        Some(f) if len % ALIGN == 0 => f.as_raw_fd(),
                        _ => d.image.raw_fd(),
                    };
                    let mut old = old_contents(d, chunk, d.digests.get(chunk))?;
                    if let (OldContents::Read(n), true) = (&old, d.nbd.is_some()) {
                        // An export is read on its connection, here; files are read through the backend.
                        save_old_now(d, chunk, *n, &mut self.old)?;
                        old = OldContents::Appended;
                    }
                    d.entry.chunks_changed += 1;
                    d.entry.bytes_changed += len as u64;
                    let req = IoRequest { tag: self.tag(disk), fd, offset, len, kind: IoKind::Write, buf };
                    self.seq_of.insert(req.tag, (seq, chunk, digest));
                    match old {
                        OldContents::NotNeeded => self.ready.push_back(req),
                        OldContents::Appended => self.held.push(req),
                        OldContents::Read(len) => {
                            self.need_old.push_back(OldRead { disk, chunk, len, write: Some(req) })
                        }
                    }
                }
                WriterMsg::Zero { seq, disk, first, count } => {
                    let t = Instant::now();
                    let d = self.disks.get_mut(&disk).ok_or_else(|| MoveError::Internal(format!("no disk {disk}")))?;
                    skip_presave(d, first + count);
                    let cs = u64::from(d.chunk_size);
                    let offset = first * cs;
                    let end = ((first + count) * cs).min(d.size);
                    let mut changed = 0;
                    for c in first..first + count {
                        let old_digest = d.digests.get(c);
                        if old_digest != Some(d.zeros.digest(d.digests.chunk_len(c))) {
                            if let OldContents::Read(n) = old_contents(d, c, old_digest)? {
                                save_old_now(d, c, n, &mut self.old)?;
                            }
                            changed += 1;
                        }
                    }
                    self.counters.chunks_zero.fetch_add(count, Ordering::Relaxed);
                    if changed == 0 {
                        self.item_done(seq);
                        continue;
                    }
                    if let Some(u) = &mut d.undo {
                        u.sync()?;
                    }
                    // A hole in a file; WRITE_ZEROES (may deallocate) on an export.
                    d.image.zero(offset, end - offset)?;
                    for c in first..first + count {
                        let len = (d.size - c * cs).min(cs) as u32;
                        d.digests.set(c, d.zeros.digest(len));
                    }
                    d.dirty = true;
                    d.entry.chunks_changed += changed;
                    d.entry.bytes_changed += end - offset;
                    self.item_done(seq);
                    self.stats.record(Stage::Write, t.elapsed());
                }
                WriterMsg::SendDigests { disk, cached, reply } => {
                    let Some(d) = self.disks.get_mut(&disk) else { continue };
                    if d.digests.unknown_count() > 0 {
                        let t = Instant::now();
                        rebuild_unknown(&d.image, &mut d.digests)?;
                        d.dirty = true;
                        self.stats.record(Stage::Verify, t.elapsed());
                    }
                    let _ = reply.send(send_digest_map(&self.conn, disk, &d.digests, &cached));
                }
                WriterMsg::Intent { disk, runs } => {
                    // Only a file image with a point to protect is worth it; an export's old
                    // contents are read on its connection, one at a time, with the data.
                    let Some(d) = self.disks.get_mut(&disk) else { continue };
                    if d.undo.is_none() || d.nbd.is_some() || self.stopping {
                        continue;
                    }
                    let point_chunks = d.point_size.div_ceil(u64::from(d.chunk_size));
                    for (start, end) in runs {
                        let end = end.min(point_chunks);
                        if start < end && d.presave.len() < PRESAVE_RUNS_MAX {
                            d.presave.push_back((start, end));
                        }
                    }
                }
                b @ (WriterMsg::Barrier { .. } | WriterMsg::Commit { .. }) => self.barriers.push_back(b),
            }
        }
    }

    /// Item `seq` is done; `written` moves up over every item done without a gap below it.
    fn item_done(&mut self, seq: u64) {
        self.done.insert(seq);
        while self.done.remove(&self.written) {
            self.written += 1;
        }
    }

    /// Writes, old-content reads or undo syncs waiting in the writer's queues.
    fn queued(&self) -> bool {
        !self.ready.is_empty() || !self.need_old.is_empty() || !self.held.is_empty()
    }

    /// Start what may start, without waiting: a round of undo fdatasyncs for the
    /// held writes, the writes that are free to go, then reads of old contents.
    ///
    /// A write is only submitted once the undo record of its chunk's old contents
    /// is durable: read old contents -> append record -> fdatasync the undo file
    /// (one round in flight, covering every record appended before it started)
    /// -> write. The stages overlap, so neither the reads nor the syncs stall the
    /// writes of other chunks.
    ///
    /// An fdatasync costs about the same whatever it covers (a journal commit and a
    /// device flush), so a round waits for [`HOLD_MAX`] records while more are on
    /// their way (old reads in flight or queued, messages waiting: `idle` is false),
    /// and starts at once when nothing else could join it.
    fn pump(&mut self, idle: bool) -> Result<()> {
        let depth = self.backend.depth();
        let presave_left = self.disks.values().any(|d| !d.presave.is_empty());
        let more_coming = !idle || !self.need_old.is_empty() || !self.old_reads.is_empty() || presave_left;
        let unsynced: u64 = self.disks.values().filter_map(|d| d.undo.as_ref()).map(|u| u.unsynced()).sum();
        let round_ready = unsynced >= HOLD_MAX || !more_coming || !self.barriers.is_empty() || self.stopping;
        if self.syncing.is_none() && (!self.held.is_empty() || unsynced > 0) && round_ready {
            let undo: Vec<(u32, std::os::fd::RawFd, (u64, u64))> = self
                .disks
                .iter()
                .filter_map(|(&id, d)| {
                    d.undo.as_ref().filter(|u| u.needs_sync()).map(|u| (id, u.raw_fd(), (u.appended(), u.end())))
                })
                .collect();
            if undo.is_empty() {
                // Made durable already (a zero run syncs at once).
                self.ready.extend(self.held.drain(..));
            } else if undo.len() > depth {
                let t = Instant::now();
                for d in self.disks.values_mut() {
                    if let Some(u) = &mut d.undo {
                        u.sync()?;
                    }
                }
                self.stats.record(Stage::Sync, t.elapsed());
                self.ready.extend(self.held.drain(..));
            } else if self.backend.in_flight() + undo.len() <= depth {
                let mut s = Syncing { left: undo.len(), writes: std::mem::take(&mut self.held), upto: HashMap::new() };
                for (id, fd, upto) in undo {
                    let tag = self.tag(id);
                    let buf = self.token_pool.try_get().expect("a token per slot");
                    let req = IoRequest { tag, fd, offset: 0, len: 0, kind: IoKind::Sync, buf };
                    self.started.insert(tag, Instant::now());
                    s.upto.insert(tag, (id, upto));
                    if let Err(e) = self.backend.submit(req) {
                        let path = self.disks.get(&id).and_then(|d| d.undo.as_ref()).map(|u| u.path().to_path_buf());
                        return Err(MoveError::file("syncing undo file", path.unwrap_or_default(), e));
                    }
                }
                self.syncing = Some(s);
            }
        }
        // Writes: a file's on the IO backend, an export's on its own connection; none waits.
        while let Some(req) = self.ready.front() {
            let room = match self.disks.get(&((req.tag >> 48) as u32)).and_then(|d| d.nbd.as_ref()) {
                Some(b) => b.in_flight() < b.depth(),
                None => self.backend.in_flight() < depth,
            };
            if !room {
                break;
            }
            let req = self.ready.pop_front().expect("front exists");
            self.submit(req)?;
        }
        while self.backend.in_flight() < depth && !self.need_old.is_empty() {
            let Some(buf) = self.old_pool.try_get() else { break };
            let o = self.need_old.pop_front().expect("not empty");
            self.read_old(o, buf)?;
        }
        // Announced chunks: their old contents are saved ahead of the data, with at most
        // half of the operations in flight, so the data's own reads and writes find room.
        while !self.stopping && self.backend.in_flight() < depth && self.presave_reads < depth.div_ceil(2) {
            let Some(id) = self.disks.iter().find(|(_, d)| !d.presave.is_empty()).map(|(&id, _)| id) else { break };
            let Some(buf) = self.old_pool.try_get() else { break };
            let d = self.disks.get_mut(&id).expect("found above");
            let run = d.presave.front_mut().expect("not empty");
            let chunk = run.0;
            run.0 += 1;
            if run.0 >= run.1 {
                d.presave.pop_front();
            }
            // Zero old contents get their record without a read; saved chunks need nothing.
            if let OldContents::Read(len) = old_contents(d, chunk, d.digests.get(chunk))? {
                self.presave_reads += 1;
                self.read_old(OldRead { disk: id, chunk, len, write: None }, buf)?;
            }
        }
        Ok(())
    }

    /// Submit the read of a chunk's old contents into `buf` (the backend has room).
    fn read_old(&mut self, o: OldRead, mut buf: PoolBuf) -> Result<()> {
        let d = self.disks.get(&o.disk).ok_or_else(|| MoveError::Internal(format!("no disk {}", o.disk)))?;
        let (offset, fd) = (o.chunk * u64::from(d.chunk_size), d.image.raw_fd());
        buf.set_len(0);
        let tag = self.tag(o.disk);
        let req = IoRequest { tag, fd, offset, len: o.len, kind: IoKind::Read, buf };
        self.started.insert(tag, Instant::now());
        if let Err(e) = self.backend.submit(req) {
            return Err(MoveError::DiskIo {
                what: "reading old contents of",
                disk: self.disk_of(tag),
                offset,
                len: o.len,
                source: e,
            });
        }
        self.old_reads.insert(tag, o);
        Ok(())
    }

    /// Writes in flight on the file backend and on every disk's NBD connection.
    fn in_flight(&self) -> usize {
        self.backend.in_flight()
            + self.disks.values().filter_map(|d| d.nbd.as_ref()).map(|b| b.in_flight()).sum::<usize>()
    }

    /// Submit a write (the caller checked its backend has room).
    fn submit(&mut self, req: IoRequest) -> Result<()> {
        let (offset, len, tag) = (req.offset, req.len, req.tag);
        self.started.insert(tag, Instant::now());
        let submitted = match self.disks.get_mut(&((tag >> 48) as u32)) {
            // A disk behind an NBD export writes on its own connection; files share the IO backend.
            Some(WDisk { nbd: Some(b), .. }) => b.submit(req),
            _ => self.backend.submit(req),
        };
        submitted.map_err(|e| self.write_error(tag, offset, len, e))
    }

    /// A failed write of the operation `tag`, named after its disk (and export).
    fn write_error(&self, tag: u64, offset: u64, len: usize, e: std::io::Error) -> MoveError {
        match self.disks.get(&((tag >> 48) as u32)) {
            Some(d) => d.image.write_error(offset, len, e).into(),
            None => MoveError::DiskIo { what: "writing", disk: String::new(), offset, len, source: e },
        }
    }

    /// A new operation tag: the disk in the top 16 bits, a counter below.
    fn tag(&mut self, disk: u32) -> u64 {
        self.next_tag += 1;
        (u64::from(disk) << 48) | (self.next_tag & ((1 << 48) - 1))
    }

    /// Name of the disk an operation (by tag) is for.
    fn disk_of(&self, tag: u64) -> String {
        self.disks.get(&((tag >> 48) as u32)).map_or_else(String::new, |d| d.name.clone())
    }

    fn disk_name(&self, label: &str) -> String {
        label
            .strip_prefix('#')
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(|id| self.disks.get(&id))
            .map_or_else(|| label.to_string(), |d| d.name.clone())
    }

    /// Wait for one operation and move on what it finished: on the file backend when it has
    /// operations in flight, else on the connection of an NBD disk with writes in flight.
    fn complete_one(&mut self) -> Result<()> {
        let nbd_disk = if self.backend.in_flight() > 0 {
            None
        } else {
            self.disks.iter().find(|(_, d)| d.nbd.as_ref().is_some_and(|b| b.in_flight() > 0)).map(|(&id, _)| id)
        };
        let c: IoCompletion = match nbd_disk {
            Some(id) => {
                let d = self.disks.get_mut(&id).expect("found above");
                let b = d.nbd.as_mut().expect("an NBD disk");
                b.wait().map_err(|e| d.image.write_error(0, 0, e))?
            }
            None => {
                self.backend.wait().map_err(|e| MoveError::Backend { side: "target", opening: false, source: e })?
            }
        };
        let stage = match c.kind {
            IoKind::Write => Stage::Write,
            IoKind::Read => Stage::Read,
            IoKind::Sync => Stage::Sync,
        };
        if let Some(t) = self.started.remove(&c.tag) {
            self.stats.record(stage, t.elapsed());
        }
        match c.kind {
            IoKind::Write => {
                if let Err(e) = c.result {
                    return Err(self.write_error(c.tag, c.offset, c.len, e));
                }
                if let Some((seq, chunk, digest)) = self.seq_of.remove(&c.tag) {
                    if let Some(d) = self.disks.get_mut(&((c.tag >> 48) as u32)) {
                        d.digests.set(chunk, digest);
                        d.dirty = true;
                    }
                    self.item_done(seq);
                }
                self.counters.chunks_written.fetch_add(1, Ordering::Relaxed);
                self.counters.bytes_written.fetch_add(c.len as u64, Ordering::Relaxed);
            }
            IoKind::Read => {
                let o = self.old_reads.remove(&c.tag).expect("an old-content read in flight");
                if o.write.is_none() {
                    self.presave_reads -= 1;
                }
                let short =
                    |n: usize| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("read {n} bytes"));
                let n = c.result.and_then(|n| if n < o.len { Err(short(n)) } else { Ok(n) }).map_err(|e| {
                    MoveError::DiskIo {
                        what: "reading old contents of",
                        disk: self.disk_of(c.tag),
                        offset: c.offset,
                        len: o.len,
                        source: e,
                    }
                })?;
                let d =
                    self.disks.get_mut(&o.disk).ok_or_else(|| MoveError::Internal(format!("no disk {}", o.disk)))?;
                // A chunk saved meanwhile (its data's own read and this one) keeps its first record.
                let u = d.undo.as_mut().expect("old contents are read for an undo file");
                // The digest map is consistent with the image (see `old_contents`): a chunk it
                // knows, of the length read, needs no hashing for its record. Old zeros were
                // not read at all, so a known digest here is not that of zeros.
                match d.digests.get(o.chunk).filter(|_| d.digests.chunk_len(o.chunk) as usize == n) {
                    Some(digest) => u.append_hashed(o.chunk, &c.buf[..n], digest)?,
                    None => u.append(o.chunk, &c.buf[..n])?,
                }
                if let Some(w) = o.write {
                    self.held.push(w);
                }
            }
            IoKind::Sync => {
                let s = self.syncing.as_mut().expect("a sync round in flight");
                let (disk, (upto, end)) = s.upto.remove(&c.tag).expect("a sync of this round");
                let u = self.disks.get_mut(&disk).and_then(|d| d.undo.as_mut()).expect("an undo file");
                c.result.map_err(|e| MoveError::file("syncing undo file", u.path(), e))?;
                u.synced_upto(upto, end);
                s.left -= 1;
                if s.left == 0 {
                    let s = self.syncing.take().expect("in flight");
                    self.ready.extend(s.writes);
                }
            }
        }
        Ok(())
    }

    /// Give up: drop every queued write and wait for the operations in flight
    /// (their buffers may only go back once the kernel is done with them).
    fn drain(&mut self) {
        self.held.clear();
        self.ready.clear();
        self.need_old.clear();
        for d in self.disks.values_mut() {
            d.presave.clear();
        }
        self.syncing = None;
        while self.backend.in_flight() > 0 {
            if self.backend.wait().is_err() {
                break;
            }
        }
        for b in self.disks.values_mut().filter_map(|d| d.nbd.as_mut()) {
            // A lost connection fails each write in flight once: this ends.
            while b.in_flight() > 0 {
                if b.wait().is_err() {
                    break;
                }
            }
        }
        self.old_reads.clear();
        self.presave_reads = 0;
    }

    fn run_barriers(&mut self) -> Result<()> {
        while let Some(front) = self.barriers.front() {
            let need = match front {
                WriterMsg::Barrier { items_before, .. } | WriterMsg::Commit { items_before, .. } => *items_before,
                _ => 0,
            };
            if self.written < need {
                return Ok(());
            }
            match self.barriers.pop_front().expect("front exists") {
                WriterMsg::Barrier { disk, next_chunk, .. } => {
                    if let Some(d) = self.disks.get_mut(&disk) {
                        d.entry.next_chunk = next_chunk;
                        self.state.disks.insert(d.name.clone(), d.entry.clone());
                    }
                    if matches!(self.barriers.front(), Some(WriterMsg::Commit { .. })) {
                        // The Commit right behind makes everything durable and ends the session:
                        // a checkpoint here would only cost syncs (a crash before the commit
                        // resumes from the previous checkpoint, whose map marks later chunks unknown).
                        continue;
                    }
                    let t = Instant::now();
                    self.sync_disk(disk)?;
                    self.replica.write_session(&self.state)?;
                    self.stats.record(Stage::Sync, t.elapsed());
                    // A Checkpoint that cannot be sent (the connection is closing) is still
                    // durable: keep making the rest durable too, until the session stops us.
                    if self.conn.send(&Frame::Checkpoint(Checkpoint { disk, next_chunk })).is_err() {
                        self.stopping = true;
                    }
                }
                WriterMsg::Commit { reply, .. } => {
                    // Chunks announced but never sent need no record: stop saving ahead, and
                    // let the reads in flight finish before the undo file belongs to the point.
                    for d in self.disks.values_mut() {
                        d.presave.clear();
                    }
                    while self.presave_reads > 0 {
                        self.complete_one()?;
                    }
                    let t = Instant::now();
                    let ids: Vec<u32> = self.disks.keys().copied().collect();
                    let mut result = Ok(());
                    for id in ids {
                        if let Err(e) = self.sync_disk(id) {
                            result = Err(e);
                            break;
                        }
                    }
                    self.stats.record(Stage::Sync, t.elapsed());
                    let mut disks: Vec<PointDisk> = self
                        .disks
                        .values()
                        .map(|d| PointDisk {
                            name: d.name.clone(),
                            size: d.size,
                            chunks_changed: d.entry.chunks_changed,
                            bytes_changed: d.entry.bytes_changed,
                        })
                        .collect();
                    disks.sort_by(|a, b| a.name.cmp(&b.name));
                    let failed = result.is_err();
                    let _ = reply.send(result.map(|_| disks));
                    if failed {
                        // The connection thread reports the error it got in the reply.
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Make a disk's image and digest map durable.
    fn sync_disk(&mut self, disk: u32) -> Result<()> {
        let Some(d) = self.disks.get_mut(&disk) else { return Ok(()) };
        // fdatasync, or NBD_CMD_FLUSH: every write before the barrier has completed.
        d.image.sync()?;
        if d.dirty {
            digests::store(&d.digests_path, &d.digests)?;
            d.dirty = false;
        }
        Ok(())
    }
}
