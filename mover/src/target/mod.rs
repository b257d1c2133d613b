//! The target: receives a session, verifies every chunk, writes the datastore.
//!
//! ```text
//! connection thread (deframe, validate) --Data--> verify workers (zstd, BLAKE3)
//!        |  ZeroRun, Flush, Commit                        | verified chunk
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
//! checkpoint the source sees is durable.

pub mod datastore;
pub mod points;
pub mod undo;

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use ferry_wire::{
    Authenticator, Checkpoint, Codec, Committed, Data, DigestMapEnd, DigestMapPart, Event, Frame, OpenDisk,
    ReplicaOpened, ResumeInfo, MAX_DIGESTS_PER_PART,
};
use serde::Serialize;

use crate::backend::{open_backend, BackendChoice, IoBackend, IoKind, IoRequest};
use crate::buf::{BufPool, PoolBuf, ALIGN};
use crate::conn::{server_handshake, Conn, Sock};
use crate::digests::{self, DigestMap, ZeroDigests};
use crate::error::{MoveError, Result};
use crate::stats::{Stage, StageStats};
use datastore::{now_ns, Datastore, PointDisk, Replica, RestorePoint, SessionDisk, SessionState};

/// Target settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// IO backend for writes.
    pub backend: BackendChoice,
    /// Writes in flight.
    pub queue_depth: usize,
    /// Verify workers.
    pub workers: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            backend: BackendChoice::Auto,
            queue_depth: 8,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8),
        }
    }
}

/// What one session did, for logs and `serve --json`.
#[derive(Debug, Clone, Serialize, Default)]
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
    /// The error that ended the session, if any.
    pub error: Option<String>,
    /// Warning shown once (IO backend fallback).
    pub warning: Option<String>,
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
    let result = t.run(&mut rx, &mut report);
    if let Err(e) = &result {
        conn.send_error(e.code(), &e.detail());
        report.error = Some(e.detail());
    }
    if let Some(inner) = t.inner.take() {
        inner.fill_counters(&mut report);
        let (stats, wr) = inner.finish();
        // The writer's error is the cause; what the connection thread saw next
        // ("session closed", a hang-up) is its consequence.
        if wr.is_some() {
            report.error = wr;
        }
        report.stages = stats.summary();
    }
    conn.shutdown();
    report.bytes_received = rx.bytes_received;
    report.bytes_sent = conn.bytes_sent();
    report.duration_s = start.elapsed().as_secs_f64();
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
    disks: HashMap<u32, (Option<File>, String, DigestMap)>,
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
    to_workers: Option<Sender<(u64, Data)>>,
    to_writer: Sender<WriterMsg>,
    workers: Vec<std::thread::JoinHandle<StageStats>>,
    writer: Option<std::thread::JoinHandle<WriterOutcome>>,
    counters: Arc<Counters>,
    error: Arc<Mutex<Option<String>>>,
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

    fn finish(mut self) -> (StageStats, Option<String>) {
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
            err = p.error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        }
        (stats, err)
    }
}

impl TargetSession<'_> {
    fn run(&mut self, rx: &mut crate::conn::Rx, report: &mut SessionReport) -> Result<()> {
        loop {
            let frame = match rx.next_frame() {
                Ok(Some(f)) => f,
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
                        Err(MoveError::Config(_)) => None, // a new replica
                        Err(e) => return Err(e),
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
                    let (state, resumed) = match replica.session()? {
                        Some(mut s) if latest.as_ref().is_none_or(|p| p.session_id != s.session_id) => {
                            s.point_time_ns = o.point_time_ns;
                            (s, true)
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
                    let plan = self.plan.as_mut().expect("checked");
                    let (file, name, map) =
                        plan.disks.get_mut(&r.disk).ok_or_else(|| MoveError::Config(format!("no disk {}", r.disk)))?;
                    if map.unknown_count() > 0 {
                        match file {
                            Some(f) => rebuild_unknown(f, name, map)?,
                            None => return Err(MoveError::Datastore(format!("disk {name:?} has no image to hash"))),
                        }
                    }
                    send_digest_map(&self.conn, r.disk, map, &r.cached_map_hash, report)?;
                }
                Frame::DigestMapRequest(r) => {
                    let a = self.active()?;
                    let (tx, reply) = bounded(1);
                    a.pipeline()?.to_writer.send(WriterMsg::GetDigests { disk: r.disk, reply: tx }).ok();
                    let map = reply.recv().map_err(|_| self.writer_gone())?;
                    send_digest_map(&self.conn, r.disk, &map, &r.cached_map_hash, report)?;
                }
                Frame::Data(d) => {
                    let a = self.active_mut()?;
                    let seq = a.dispatched;
                    a.dispatched += 1;
                    let p = a.pipeline()?;
                    if p.to_workers.as_ref().is_none_or(|w| w.send((seq, d)).is_err()) {
                        return Err(self.writer_gone());
                    }
                }
                Frame::ZeroRun(z) => {
                    let a = self.active_mut()?;
                    let seq = a.dispatched;
                    a.dispatched += 1;
                    let msg = WriterMsg::Zero { seq, disk: z.disk, first: z.first_chunk, count: z.count };
                    if a.pipeline()?.to_writer.send(msg).is_err() {
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
                            return Err(MoveError::Datastore(e));
                        }
                    }
                }
                Frame::Close => return Ok(()),
                Frame::Progress(_) | Frame::Keepalive | Frame::Unknown { .. } => {}
                other => {
                    return Err(MoveError::Config(format!("unexpected {} frame from the source", other.name())));
                }
            }
        }
    }

    fn active(&self) -> Result<&Active> {
        self.inner.as_ref().ok_or_else(|| MoveError::Config("no replica open".into()))
    }

    fn active_mut(&mut self) -> Result<&mut Active> {
        self.inner.as_mut().ok_or_else(|| MoveError::Config("no replica open".into()))
    }

    fn writer_error(&self) -> Option<MoveError> {
        let p = self.inner.as_ref()?.pipeline.as_ref()?;
        let e = p.error.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        Some(MoveError::Datastore(e))
    }

    fn writer_gone(&self) -> MoveError {
        self.writer_error().unwrap_or_else(|| MoveError::Datastore("the target writer stopped".into()))
    }

    fn open_disk(&mut self, o: &OpenDisk, report: &mut SessionReport) -> Result<()> {
        datastore::validate_name("disk", &o.name)?;
        let cfg = self.cfg.clone();
        let conn = self.conn.clone();
        let a = self.active_mut()?;
        if a.disk_names.values().any(|n| n == &o.name) {
            return Err(MoveError::Config(format!("disk {:?} opened twice in one session", o.name)));
        }
        let replica_cs = a.replica.settings.chunk_size;
        if replica_cs != 0 && replica_cs != o.chunk_size {
            return Err(MoveError::Config(format!(
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
        let path = a.replica.disk_path(&o.name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| MoveError::file("opening replica disk", &path, e))?;
        let existing = file.metadata().map_err(|e| MoveError::file("inspecting", &path, e))?.len();
        let existed = existing > 0 || a.latest_point.as_ref().is_some_and(|p| p.disks.iter().any(|d| d.name == o.name));
        let chunk_count = o.size.div_ceil(u64::from(o.chunk_size));
        let resume = a.state.disks.get(&o.name).filter(|d| d.size == o.size).cloned();
        let (previous_size, next_chunk) = match &resume {
            Some(d) => (d.previous_size, d.next_chunk.min(chunk_count)),
            None => (existing, 0),
        };
        // Protect the latest point: old contents go to its undo file before they are overwritten.
        let point_disk =
            a.latest_point.as_ref().and_then(|p| p.disks.iter().find(|d| d.name == o.name).map(|d| (p.id, d.size)));
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
                    read_exact_at(&file, &mut buf[..len], c * cs, &o.name)?;
                    u.append(c, &buf[..len])?;
                }
                u.sync()?;
            }
            undo_writer = Some(u);
        }
        if existing != o.size {
            file.set_len(o.size).map_err(|e| MoveError::file("resizing replica disk", &path, e))?;
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
            // No usable map: a new disk is all zeros; an existing one is unknown until rebuilt.
            None if existing == 0 => DigestMap::zeroed(o.chunk_size, previous_size, &zeros),
            None => DigestMap::new(o.chunk_size, previous_size),
        }
        .map_err(|e| MoveError::Config(e.to_string()))?;
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
        let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&path).ok();
        a.disk_names.insert(o.disk, o.name.clone());
        let msg = WriterMsg::OpenDisk(
            o.disk,
            Box::new(WDisk {
                name: o.name.clone(),
                file,
                direct,
                size: o.size,
                chunk_size: o.chunk_size,
                digests: map,
                zeros,
                digests_path,
                dirty: false,
                entry,
                undo: undo_writer,
                point_size,
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
        let (file, existing) = match &plan.replica {
            Some(r) => {
                if r.settings.chunk_size != 0 && r.settings.chunk_size != o.chunk_size {
                    return Err(MoveError::Config(format!(
                        "replica {:?} uses chunk size {} and cannot take disk {:?} with chunk size {}",
                        r.name, r.settings.chunk_size, o.name, o.chunk_size
                    )));
                }
                let f = File::open(r.disk_path(&o.name)?).ok();
                let size = f.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
                (f, size)
            }
            None => (None, 0),
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
            None if existing == 0 => DigestMap::zeroed(cs, existing, &zeros),
            None => DigestMap::new(cs, existing),
        }
        .map_err(|e| MoveError::Config(e.to_string()))?;
        map.resize(o.size, |l| zeros.digest(l));
        let existed = file.is_some() && existing > 0;
        plan.disks.insert(o.disk, (file, o.name.clone(), map));
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
        self.pipeline.as_ref().ok_or_else(|| MoveError::Config("no disk open".into()))
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
    file: File,
    direct: Option<File>,
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
}

enum WriterMsg {
    OpenDisk(u32, Box<WDisk>),
    Chunk { seq: u64, disk: u32, chunk: u64, buf: PoolBuf, digest: [u8; 32] },
    Zero { seq: u64, disk: u32, first: u64, count: u64 },
    Barrier { disk: u32, next_chunk: u64, items_before: u64 },
    GetDigests { disk: u32, reply: Sender<DigestMap> },
    Commit { items_before: u64, reply: Sender<Result<Vec<PointDisk>>> },
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
    let depth = cfg.queue_depth.max(1);
    let pool = Arc::new(BufPool::new(depth + 2 * workers + 4, chunk_size as usize));
    let (backend, warning) =
        open_backend(cfg.backend, &pool, depth).map_err(|e| MoveError::Config(format!("target IO backend: {e}")))?;
    let backend_name = backend.name();
    let (to_writer, writer_rx) = bounded::<WriterMsg>(depth + 2 * workers + 16);
    let (to_workers, work_rx) = bounded::<(u64, Data)>(workers * 2);
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
                    held: Vec::new(),
                    old: Vec::new(),
                };
                let rest = writer_rx.clone();
                if let Err(e) = w.run(writer_rx) {
                    // Recorded before the peer hears of it: the connection thread may see
                    // the peer hang up next and must report this error, not the hang-up.
                    *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.detail());
                    w.conn.send_error(e.code(), &e.detail());
                    w.conn.shutdown();
                    // Give back every pool buffer: verified chunks queued for this writer (and
                    // writes held for it) own buffers that a verify worker may be waiting for.
                    // Without this the workers never end, the session never ends, and the
                    // replica stays locked until the server restarts.
                    w.held.clear();
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
fn verify_worker(rx: Receiver<(u64, Data)>, tx: Sender<WriterMsg>, pool: Arc<BufPool>) -> StageStats {
    let mut stats = StageStats::default();
    let mut dctx = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    for (seq, d) in rx {
        let t = Instant::now();
        let mut buf = pool.get();
        let len = d.logical_len as usize;
        let disk_label = || format!("#{}", d.disk);
        let res = if len > buf.capacity() {
            Err(MoveError::Decompress {
                disk: disk_label(),
                chunk: d.chunk,
                expected: len,
                detail: "longer than the chunk size".into(),
            })
        } else {
            match d.codec {
                Codec::None => {
                    buf.spare_mut()[..len].copy_from_slice(&d.payload);
                    Ok(())
                }
                Codec::Zstd => match dctx.decompress_to_buffer(&d.payload, &mut buf.spare_mut()[..len]) {
                    Ok(n) if n == len => Ok(()),
                    Ok(n) => Err(MoveError::Decompress {
                        disk: disk_label(),
                        chunk: d.chunk,
                        expected: len,
                        detail: format!("got {n} bytes"),
                    }),
                    Err(e) => Err(MoveError::Decompress {
                        disk: disk_label(),
                        chunk: d.chunk,
                        expected: len,
                        detail: e.to_string(),
                    }),
                },
            }
        };
        let msg = match res {
            Err(e) => WriterMsg::Failed(e),
            Ok(()) => {
                buf.set_len(len);
                if *blake3::hash(&buf).as_bytes() != d.digest {
                    WriterMsg::Failed(MoveError::DigestMismatch { disk: disk_label(), chunk: d.chunk })
                } else {
                    WriterMsg::Chunk { seq, disk: d.disk, chunk: d.chunk, buf, digest: d.digest }
                }
            }
        };
        stats.record(Stage::Verify, t.elapsed());
        if tx.send(msg).is_err() {
            break;
        }
    }
    stats
}

/// Most writes held back waiting for one fsync of their undo records.
const HOLD_MAX: usize = 32;

/// Append the old contents of `chunk` to the disk's undo file if the latest
/// point needs them and they are not saved yet. Returns true when a record
/// was appended (the write must wait for the undo file's fsync).
fn save_old(d: &mut WDisk, chunk: u64, old: &mut Vec<u8>) -> Result<bool> {
    let Some(u) = &mut d.undo else { return Ok(false) };
    let cs = u64::from(d.chunk_size);
    let offset = chunk * cs;
    if offset >= d.point_size || u.saved.contains_key(&chunk) {
        return Ok(false);
    }
    let len = (d.point_size - offset).min(cs) as usize;
    old.resize(len.max(old.len()), 0);
    read_exact_at(&d.file, &mut old[..len], offset, &d.name)?;
    u.append(chunk, &old[..len])?;
    Ok(true)
}

fn read_exact_at(f: &File, buf: &mut [u8], offset: u64, disk: &str) -> Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, offset).map_err(|e| MoveError::DiskIo {
        what: "reading old contents of",
        disk: disk.to_string(),
        offset,
        len: buf.len(),
        source: e,
    })
}

/// Hash the chunks of an image whose digests are unknown (a seed placed in
/// the datastore, a lost or stale map), at local disk speed.
fn rebuild_unknown(file: &File, disk: &str, map: &mut DigestMap) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let cs = u64::from(map.chunk_size());
    let file_size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = vec![0u8; map.chunk_size() as usize];
    for i in 0..map.chunk_count() {
        if map.is_known(i) {
            continue;
        }
        let offset = i * cs;
        let len = map.chunk_len(i) as usize;
        // Bytes past the end of the image read as zeros (it grows sparse).
        let avail = file_size.saturating_sub(offset).min(len as u64) as usize;
        buf[avail..len].fill(0);
        file.read_exact_at(&mut buf[..avail], offset).map_err(|e| MoveError::DiskIo {
            what: "hashing",
            disk: disk.to_string(),
            offset,
            len,
            source: e,
        })?;
        map.set(i, *blake3::hash(&buf[..len]).as_bytes());
    }
    Ok(())
}

/// Send a digest map as parts and an end (or only the end when the client's cached copy is current).
fn send_digest_map(
    conn: &Conn,
    disk: u32,
    map: &DigestMap,
    cached: &[u8; 32],
    report: &mut SessionReport,
) -> Result<()> {
    let hash = map.map_hash();
    let cache_hit = hash == *cached;
    report.digest_maps += 1;
    if cache_hit {
        report.digest_map_hits += 1;
    } else {
        report.digest_map_parts += map.digests().len().div_ceil(MAX_DIGESTS_PER_PART) as u64;
        for (i, part) in map.digests().chunks(MAX_DIGESTS_PER_PART).enumerate() {
            let bytes: Vec<u8> = part.iter().flatten().copied().collect();
            conn.send(&Frame::DigestMapPart(DigestMapPart {
                disk,
                first_chunk: (i * MAX_DIGESTS_PER_PART) as u64,
                digests: bytes.into(),
            }))?;
        }
    }
    conn.send(&Frame::DigestMapEnd(DigestMapEnd { disk, chunk_count: map.chunk_count(), map_hash: hash, cache_hit }))?;
    Ok(())
}

struct Writer {
    backend: Box<dyn IoBackend>,
    disks: HashMap<u32, WDisk>,
    /// Items (Data, ZeroRun) done: every item with a sequence number below this one.
    written: u64,
    /// Items done out of order, above `written` (workers and zero runs overtake each other).
    done: std::collections::BTreeSet<u64>,
    /// Sequence number of each write in flight or held, by tag.
    seq_of: HashMap<u64, u64>,
    /// The session is ending: Checkpoints are still made durable, but may find no one to tell.
    stopping: bool,
    barriers: VecDeque<WriterMsg>,
    replica: Arc<Replica>,
    state: SessionState,
    conn: Arc<Conn>,
    counters: Arc<Counters>,
    stats: StageStats,
    /// Write start times by tag, for latency.
    started: HashMap<u64, Instant>,
    /// Writes whose undo records are appended but not yet fsynced.
    held: Vec<IoRequest>,
    /// Reused buffer for reading old contents.
    old: Vec<u8>,
}

impl Writer {
    fn run(&mut self, rx: Receiver<WriterMsg>) -> Result<()> {
        let mut tag = 0u64;
        loop {
            if !self.held.is_empty() && (self.held.len() >= HOLD_MAX || rx.is_empty() || !self.barriers.is_empty()) {
                self.flush_held()?;
            }
            self.run_barriers()?;
            let busy = self.backend.in_flight();
            let msg = if busy >= self.backend.depth() {
                None
            } else if busy > 0 {
                rx.try_recv().ok()
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return Ok(()),
                }
            };
            let Some(msg) = msg else {
                self.complete_one()?;
                continue;
            };
            match msg {
                WriterMsg::Stop => {
                    // The session is ending: everything the source sent is here. Finish its writes
                    // and run its Flushes, so that a resume starts from the last Flush received
                    // rather than from the last one this writer had caught up with. Nobody may be
                    // listening for those Checkpoints any more; their state is durable first.
                    self.stopping = true;
                    self.flush_held()?;
                    while self.backend.in_flight() > 0 {
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
                    let d = self.disks.get_mut(&disk).ok_or_else(|| MoveError::Config(format!("no disk {disk}")))?;
                    if d.digests.get(chunk) == Some(digest) {
                        // The replica already holds these bytes: nothing to write, nothing to undo.
                        self.item_done(seq);
                        continue;
                    }
                    let offset = chunk * u64::from(d.chunk_size);
                    let len = buf.len();
                    let fd = match &d.direct {
                        Some(f) if len % ALIGN == 0 => f.as_raw_fd(),
                        _ => d.file.as_raw_fd(),
                    };
                    let held = save_old(d, chunk, &mut self.old)?;
                    d.digests.set(chunk, digest);
                    d.dirty = true;
                    d.entry.chunks_changed += 1;
                    d.entry.bytes_changed += len as u64;
                    tag += 1;
                    let req =
                        IoRequest { tag: (u64::from(disk) << 48) | tag, fd, offset, len, kind: IoKind::Write, buf };
                    self.seq_of.insert(req.tag, seq);
                    if held {
                        self.held.push(req);
                    } else {
                        self.submit(req)?;
                    }
                }
                WriterMsg::Zero { seq, disk, first, count } => {
                    let t = Instant::now();
                    let d = self.disks.get_mut(&disk).ok_or_else(|| MoveError::Config(format!("no disk {disk}")))?;
                    let cs = u64::from(d.chunk_size);
                    let offset = first * cs;
                    let end = ((first + count) * cs).min(d.size);
                    let mut changed = 0;
                    for c in first..first + count {
                        if d.digests.get(c) != Some(d.zeros.digest(d.digests.chunk_len(c))) {
                            save_old(d, c, &mut self.old)?;
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
                    crate::disk::punch_hole(d.file.as_raw_fd(), offset, end - offset).map_err(|e| {
                        MoveError::DiskIo {
                            what: "punching a hole in",
                            disk: d.name.clone(),
                            offset,
                            len: (end - offset) as usize,
                            source: e,
                        }
                    })?;
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
                WriterMsg::GetDigests { disk, reply } => {
                    let Some(d) = self.disks.get_mut(&disk) else { continue };
                    if d.digests.unknown_count() > 0 {
                        let t = Instant::now();
                        rebuild_unknown(&d.file, &d.name, &mut d.digests)?;
                        d.dirty = true;
                        self.stats.record(Stage::Verify, t.elapsed());
                    }
                    let _ = reply.send(d.digests.clone());
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

    fn submit(&mut self, req: IoRequest) -> Result<()> {
        while self.backend.in_flight() >= self.backend.depth() {
            self.complete_one()?;
        }
        let (offset, len, disk) = (req.offset, req.len, (req.tag >> 48) as u32);
        self.started.insert(req.tag & ((1 << 48) - 1), Instant::now());
        self.backend.submit(req).map_err(|e| MoveError::DiskIo {
            what: "writing",
            disk: self.disks.get(&disk).map_or_else(String::new, |d| d.name.clone()),
            offset,
            len,
            source: e,
        })
    }

    /// Make the undo records of the held writes durable, then submit them.
    fn flush_held(&mut self) -> Result<()> {
        let t = Instant::now();
        for d in self.disks.values_mut() {
            if let Some(u) = &mut d.undo {
                u.sync()?;
            }
        }
        self.stats.record(Stage::Sync, t.elapsed());
        for req in std::mem::take(&mut self.held) {
            self.submit(req)?;
        }
        Ok(())
    }

    fn disk_name(&self, label: &str) -> String {
        label
            .strip_prefix('#')
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(|id| self.disks.get(&id))
            .map_or_else(|| label.to_string(), |d| d.name.clone())
    }

    fn complete_one(&mut self) -> Result<()> {
        let c = self.backend.wait().map_err(|e| MoveError::Datastore(format!("target IO backend failed: {e}")))?;
        let disk = (c.tag >> 48) as u32;
        if let Some(t) = self.started.remove(&(c.tag & ((1 << 48) - 1))) {
            self.stats.record(Stage::Write, t.elapsed());
        }
        let name = self.disks.get(&disk).map_or_else(String::new, |d| d.name.clone());
        c.result.map_err(|e| MoveError::DiskIo {
            what: "writing",
            disk: name,
            offset: c.offset,
            len: c.len,
            source: e,
        })?;
        if let Some(seq) = self.seq_of.remove(&c.tag) {
            self.item_done(seq);
        }
        self.counters.chunks_written.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_written.fetch_add(c.len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn drain(&mut self) {
        while self.backend.in_flight() > 0 {
            if self.complete_one().is_err() {
                continue;
            }
        }
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
                    let t = Instant::now();
                    self.sync_disk(disk)?;
                    if let Some(d) = self.disks.get_mut(&disk) {
                        d.entry.next_chunk = next_chunk;
                        self.state.disks.insert(d.name.clone(), d.entry.clone());
                    }
                    self.replica.write_session(&self.state)?;
                    self.stats.record(Stage::Sync, t.elapsed());
                    // A Checkpoint that cannot be sent (the connection is closing) is still
                    // durable: keep making the rest durable too, until the session stops us.
                    if self.conn.send(&Frame::Checkpoint(Checkpoint { disk, next_chunk })).is_err() {
                        self.stopping = true;
                    }
                }
                WriterMsg::Commit { reply, .. } => {
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
                        return Err(MoveError::Datastore("commit failed".into()));
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
        // SAFETY: fdatasync on an open fd.
        if unsafe { libc::fdatasync(d.file.as_raw_fd()) } != 0 {
            return Err(MoveError::DiskIo {
                what: "syncing",
                disk: d.name.clone(),
                offset: 0,
                len: 0,
                source: std::io::Error::last_os_error(),
            });
        }
        if d.dirty {
            digests::store(&d.digests_path, &d.digests)?;
            d.dirty = false;
        }
        Ok(())
    }
}
