//! The session thread: reads the connection's frames and dispatches them.
//!
//! It opens the replica and its disks, answers digest map requests of the
//! disks it still holds, numbers the items (Data, ZeroRun) it dispatches, turns
//! a Flush into a barrier and a Commit into the point, and hands everything that
//! writes to the verify workers and the writer. It never writes to the socket:
//! its answers go to the sending thread ([`Outgoing::Frame`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Sender};
use ferry_wire::{
    Committed, DataHead, DigestMapRequest, Event, Flush, Frame, Intent, Notice, NoticeLevel, OpenDisk, OpenReplica,
    ReplicaOpened, ZeroRun,
};

use super::digest_map::{rebuild_unknown, send_digest_map};
use super::merge::{self, Registered, StreamRegistry, StreamSet};
use super::plan_session::PlanSession;
use super::policy::{check_open, decide_retain, prune_notice};
use super::sender::Outgoing;
use super::verify::{verify_worker, Item, Streams};
use super::writer::{WDisk, Writer, WriterMsg};
use super::{ServeConfig, SessionReport};
use crate::access::Grant;
use crate::busy::{ticking, TARGET_TICK};
use crate::conn::{Conn, Received, Rx, PAYLOAD_SLACK};
use crate::error::{MoveError, Result};
use crate::stats::{Stage, StageStats};
use ferry_datastore::points;
use ferry_datastore::store::{
    self as datastore, now_ns, Datastore, PointDisk, Replica, RestorePoint, SessionState, UndoExtent,
};
use ferry_datastore::StoreError;
use ferry_io::{open_backend, BufPool, PoolBuf};

/// One connection's session, as the session thread runs it.
pub(super) struct TargetSession<'a> {
    pub(super) conn: Arc<Conn>,
    pub(super) ds: &'a Datastore,
    pub(super) cfg: &'a ServeConfig,
    /// The token the source authenticated with: what it may do.
    pub(super) grant: Grant,
    /// Who holds the replica lock (for a second writer's error).
    pub(super) holder: String,
    /// To the sending thread.
    pub(super) events: Sender<Outgoing>,
    /// The first failure of the writer or of the sending thread, typed (taken by whoever
    /// reports it): the sending thread records it before it shuts the socket down.
    pub(super) failed: Arc<Mutex<Option<MoveError>>>,
    pub(super) inner: Option<Active>,
    pub(super) plan: Option<PlanSession>,
    /// Disks and chunks of the disks opened in this replica session so far (bounded by
    /// [`super::MAX_SESSION_DISKS`] and [`super::MAX_SESSION_CHUNKS`]: each disk holds an
    /// image, an entry in session.json and a digest map of an entry per chunk).
    pub(super) opened: (u32, u64),
    /// Where a striped session registers its join ticket (`ferry serve`; none for an
    /// in-process target, which serves one connection).
    pub(super) streams: Option<Arc<StreamRegistry>>,
}

/// A replica opened in a session, with its pipeline.
pub(super) struct Active {
    pub(super) replica: Arc<Replica>,
    pub(super) state: SessionState,
    /// Disk id -> name.
    pub(super) disk_names: HashMap<u32, String>,
    /// Disks opened and not yet handed to the writer (their digest maps are answered here).
    pub(super) opened: HashMap<u32, Box<WDisk>>,
    pub(super) pipeline: Option<Pipeline>,
    /// Items (Data, ZeroRun) dispatched so far: the next item's sequence number.
    pub(super) dispatched: u64,
    pub(super) latest_point: Option<RestorePoint>,
    pub(super) resumed: bool,
    /// The retention the source asked for (0: none): a prune that keeps more warns it.
    pub(super) retain_asked: u32,
    /// Digest maps rebuilt on this thread.
    pub(super) stats: StageStats,
}

/// The verify workers and the writer of a session.
pub(super) struct Pipeline {
    /// The session's chunk buffers: payloads are received into them, verified, and written
    /// from them.
    pool: Arc<BufPool>,
    to_workers: Option<Sender<Item>>,
    /// The compression streams: order checked at admission, decoded in turn.
    streams: Arc<Streams>,
    to_writer: Sender<WriterMsg>,
    workers: Vec<std::thread::JoinHandle<StageStats>>,
    writer: Option<std::thread::JoinHandle<StageStats>>,
    counters: Arc<Counters>,
    pub(super) backend_name: &'static str,
    pub(super) warning: Option<String>,
}

/// The writer's counters, read by the session for its report.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) chunks_written: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    pub(super) chunks_zero: AtomicU64,
    /// Old contents read for undo records that did not match the digest map.
    pub(super) chunks_changed_outside: AtomicU64,
}

impl Pipeline {
    /// Send the writer a message; false when it stopped (see `TargetSession::writer_gone`).
    pub(super) fn tell(&self, msg: WriterMsg) -> bool {
        self.to_writer.send(msg).is_ok()
    }
}

impl Active {
    /// Copy the writer's counters into a report (they only grow: a later call is as good or better).
    pub(super) fn fill_counters(&self, report: &mut SessionReport) {
        if let Some(p) = &self.pipeline {
            report.chunks_written += p.counters.chunks_written.load(Ordering::Relaxed);
            report.bytes_written += p.counters.bytes_written.load(Ordering::Relaxed);
            report.chunks_zero += p.counters.chunks_zero.load(Ordering::Relaxed);
            report.chunks_changed_outside += p.counters.chunks_changed_outside.load(Ordering::Relaxed);
        }
    }

    /// Stop the pipeline (the writer finishes what it was sent) and give its figures.
    pub(super) fn finish(mut self) -> StageStats {
        let mut stats = std::mem::take(&mut self.stats);
        if let Some(mut p) = self.pipeline.take() {
            drop(p.to_workers.take());
            for w in p.workers.drain(..) {
                if let Ok(s) = w.join() {
                    stats.merge(&s);
                }
            }
            let _ = p.to_writer.send(WriterMsg::Stop);
            if let Some(w) = p.writer.take() {
                if let Ok(s) = w.join() {
                    stats.merge(&s);
                }
            }
        }
        stats
    }

    fn pipeline(&self) -> Result<&Pipeline> {
        self.pipeline.as_ref().ok_or_else(|| MoveError::Internal("no disk open".into()))
    }
}

impl TargetSession<'_> {
    /// Read and dispatch frames until the session ends: `Ok` when the source closed it.
    /// `first`: a frame read already (the listener reads one to tell a Join apart).
    pub(super) fn run(&mut self, rx: &mut Rx, report: &mut SessionReport, mut first: Option<Frame>) -> Result<()> {
        let mut charged = rx.bytes_received;
        loop {
            if let Some(f) = first.take() {
                let Some(Event::Frame(frame)) = self.conn.handle(f)? else { continue };
                if !self.dispatch(frame, report)? {
                    return Ok(());
                }
                continue;
            }
            // `serve --bwlimit`: what this session received is charged to the limit all
            // sessions share; reading waits while it is reached, so the sources slow down.
            if let Some(t) = &self.cfg.throttle {
                t.charge(rx.bytes_received - charged);
                charged = rx.bytes_received;
            }
            // Once a pipeline runs, data payloads go straight into its buffers.
            let received = match self.inner.as_ref().and_then(|a| a.pipeline.as_ref()) {
                Some(p) => rx.next_received(&p.pool, &self.conn),
                None => rx.next_frame().map(|f| f.map(Received::Frame)),
            };
            let frame = match received {
                Ok(Some(Received::Frame(f))) => f,
                Ok(Some(Received::Data(head, buf))) => {
                    self.data(head, buf)?;
                    continue;
                }
                Ok(None) if self.inner.is_some() => {
                    let peer = self.peer().to_string();
                    return Err(self.failure().unwrap_or(MoveError::PeerGone { peer, side: "source" }));
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.failure().unwrap_or_else(|| e.peer_gone_if_reset("source"))),
            };
            let Some(Event::Frame(frame)) = self.conn.handle(frame)? else { continue };
            if let Frame::OpenStreams(o) = &frame {
                let registered = self.open_streams(o.count)?;
                return self.run_merged(rx, report, registered);
            }
            if !self.dispatch(frame, report)? {
                return Ok(());
            }
        }
    }

    /// OpenStreams: register a ticket for the streams to join with and answer it.
    fn open_streams(&mut self, count: u16) -> Result<Registered> {
        let Some(registry) = self.streams.clone() else {
            return Err(MoveError::Usage("this target takes one connection per session".into()));
        };
        let chunk_size = match self.inner.as_ref().and_then(|a| a.pipeline.as_ref()) {
            Some(p) => p.pool.buf_size(),
            None => return Err(self.protocol("OpenStreams before any disk was opened".into())),
        };
        let registered = registry.register(&self.grant.name, count, chunk_size);
        self.send(Frame::StreamTicket(ferry_wire::StreamTicket { ticket: registered.ticket, count }))?;
        Ok(registered)
    }

    /// The rest of a striped session: a reader per connection (this one's on a thread of
    /// its own, the joined ones' on the threads that accepted them), the frames taken from
    /// the merge in the source's order and handled as from one connection (merge.rs).
    fn run_merged(&mut self, rx: &mut Rx, report: &mut SessionReport, registered: Registered) -> Result<()> {
        let set = registered.set.clone();
        let killer = rx.sock_clone().ok();
        let name = format!("{} stream 0", self.peer());
        let r = std::thread::scope(|s| {
            let (set, name) = (&set, &name);
            s.spawn(move || merge::read_stream(name, rx, set));
            let r = self.merged_loop(set, report);
            // The readers stop: the merge is closed, their sockets' reading shut down.
            set.close();
            if let Some(k) = &killer {
                k.shutdown_read();
            }
            r
        });
        report.bytes_received += set.bytes_received.load(Ordering::Relaxed);
        drop(registered);
        r
    }

    fn merged_loop(&mut self, set: &StreamSet, report: &mut SessionReport) -> Result<()> {
        loop {
            let item = match set.reorder.next() {
                Ok(item) => item,
                Err(e) => return Err(self.failure().unwrap_or(e)),
            };
            // `serve --bwlimit` over all of the session's streams: a Data frame is charged
            // as it is taken from the merge; the readers wait on the merge's bounded window,
            // so the sources slow down (control frames are small and not charged).
            if let (Some(t), Received::Data(head, _)) = (&self.cfg.throttle, &item) {
                t.charge(ferry_wire::HEADER_LEN as u64 + u64::from(head.payload_len));
            }
            match item {
                Received::Data(head, buf) => {
                    self.conn.handle_data_head(&head)?;
                    self.data(head, buf)?;
                }
                Received::Frame(f) => {
                    let Some(Event::Frame(frame)) = self.conn.handle(f)? else { continue };
                    if !self.dispatch(frame, report)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One frame, validated by the wire session; false when the session ends (Close).
    fn dispatch(&mut self, frame: Frame, report: &mut SessionReport) -> Result<bool> {
        match frame {
            Frame::OpenReplica(o) if o.flags & OpenReplica::PLAN_ONLY != 0 => {
                self.opened = (0, 0);
                self.open_plan_replica(&o, report)?
            }
            Frame::OpenDisk(o) if self.plan.is_some() => self.plan_open_disk(&o)?,
            Frame::OpenReplica(o) => {
                self.opened = (0, 0);
                self.open_replica(&o, report)?
            }
            Frame::OpenDisk(o) => self.open_disk(&o, report)?,
            Frame::DigestMapRequest(r) if self.plan.is_some() => self.plan_digest_map(&r, report)?,
            Frame::DigestMapRequest(r) => self.digest_map(&r, report)?,
            // With a pipeline running, data comes as Received::Data (above).
            Frame::Data(_) => return Err(self.protocol("data before any disk was opened".into())),
            Frame::ZeroRun(z) => self.zero_run(&z)?,
            Frame::Intent(i) => self.intent(&i)?,
            Frame::Flush(f) => self.flush(&f)?,
            Frame::Commit(_) => self.commit(report)?,
            Frame::Close => return Ok(false),
            Frame::Progress(_) | Frame::Keepalive | Frame::Unknown { .. } => {}
            other => return Err(self.protocol(format!("unexpected {} frame from the source", other.name()))),
        }
        Ok(true)
    }

    /// Before anything is created, resized or allocated for a disk a source opens: its size
    /// within `--max-disk-size`, the session's disks within [`super::MAX_SESSION_DISKS`] and
    /// their chunks within [`super::MAX_SESSION_CHUNKS`] (a digest map entry each). Counts
    /// the disk in.
    pub(super) fn admit_disk(&mut self, o: &OpenDisk) -> Result<()> {
        if self.opened.0 >= super::MAX_SESSION_DISKS {
            return Err(MoveError::Usage(format!(
                "disk {:?}: a replica session may open {} disks at most",
                o.name,
                super::MAX_SESSION_DISKS
            )));
        }
        let max = self.cfg.limits.max_disk_size;
        if o.size > max {
            return Err(MoveError::Usage(format!(
                "disk {:?} is {} bytes, more than this server takes (ferry serve --max-disk-size {max})",
                o.name, o.size
            )));
        }
        let chunks = o.size.div_ceil(u64::from(o.chunk_size.max(1)));
        let total = self.opened.1.saturating_add(chunks);
        if total > super::MAX_SESSION_CHUNKS {
            return Err(MoveError::Usage(format!(
                "disk {:?} has {chunks} chunks of {} bytes; with the other disks of this session that is {total}, \
                 more than a session may hold ({}): use a larger --chunk-size",
                o.name,
                o.chunk_size,
                super::MAX_SESSION_CHUNKS
            )));
        }
        self.opened = (self.opened.0 + 1, total);
        Ok(())
    }

    /// Queue a frame for the sending thread.
    pub(super) fn send(&self, frame: Frame) -> Result<()> {
        self.events.send(Outgoing::Frame(frame)).map_err(|_| MoveError::Internal("the sending thread stopped".into()))
    }

    pub(super) fn peer(&self) -> &str {
        self.conn.peer()
    }

    /// The source did something the session does not allow here.
    pub(super) fn protocol(&self, what: String) -> MoveError {
        MoveError::Protocol { peer: self.peer().to_string(), what }
    }

    fn active(&self) -> Result<&Active> {
        self.inner.as_ref().ok_or_else(|| self.protocol("no replica open".into()))
    }

    pub(super) fn active_mut(&mut self) -> Result<&mut Active> {
        let peer = self.peer().to_string();
        self.inner.as_mut().ok_or_else(|| MoveError::Protocol { peer, what: "no replica open".into() })
    }

    /// The writer's (or the sending thread's) failure, if there was one: the cause of
    /// whatever this thread saw next.
    pub(super) fn failure(&self) -> Option<MoveError> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub(super) fn writer_gone(&self) -> MoveError {
        self.failure().unwrap_or_else(|| MoveError::Internal("the target writer stopped".into()))
    }

    /// Tell the writer, which owns `disk` from now on: a disk this thread still holds goes
    /// to it first (before the item that needs it).
    fn tell_writer(&mut self, disk: Option<u32>, msg: WriterMsg) -> Result<()> {
        let a = self.active_mut()?;
        let handed = match disk {
            Some(id) => a.opened.remove(&id).map(|d| vec![(id, d)]).unwrap_or_default(),
            None => a.opened.drain().collect(),
        };
        let to_writer = &a.pipeline()?.to_writer;
        let mut sent = true;
        for (id, d) in handed {
            sent &= to_writer.send(WriterMsg::OpenDisk(id, d)).is_ok();
        }
        if !sent || to_writer.send(msg).is_err() {
            return Err(self.writer_gone());
        }
        Ok(())
    }

    /// OpenReplica (not plan only): lock the replica, finish an interrupted rollback, start
    /// or resume the session (session.json), answer ReplicaOpened.
    fn open_replica(&mut self, o: &OpenReplica, report: &mut SessionReport) -> Result<()> {
        datastore::validate_name("replica", &o.replica)?;
        check_open(&self.grant, &o.replica, true)?;
        // Whether the replica is new decides whether a small retention lowers it (a second
        // session creating it at the same moment could only make this one's request look new).
        let existed = self.ds.replica_dir(&o.replica)?.join("replica.json").exists();
        let mut replica = self.ds.lock_replica(&o.replica, &self.holder, 0, 0)?;
        let current = existed.then_some(replica.settings.retain);
        let (retain, warning) = decide_retain(
            &o.replica,
            &self.grant,
            o.retain,
            current,
            replica.settings.retain,
            self.cfg.protection.keep_min,
        );
        if retain != replica.settings.retain {
            replica.set_retain(retain)?;
        }
        // A rollback interrupted by a crash is finished before anything else.
        points::finish_pending(&replica)?;
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
        self.send(Frame::ReplicaOpened(ReplicaOpened {
            session_id: sid,
            resumed,
            latest_point: latest.as_ref().map_or(0, |p| p.id),
            latest_point_time_ns: latest.as_ref().map_or(0, |p| p.point_time_ns),
            chunk_size: replica.settings.chunk_size,
            pending_point_time_ns,
        }))?;
        if let Some(message) = warning {
            self.send(Frame::Notice(Notice { level: NoticeLevel::Warning, message }))?;
        }
        self.inner = Some(Active {
            replica: Arc::new(replica),
            state,
            disk_names: HashMap::new(),
            opened: HashMap::new(),
            pipeline: None,
            dispatched: 0,
            latest_point: latest,
            resumed,
            retain_asked: o.retain,
            stats: StageStats::default(),
        });
        Ok(())
    }

    /// DigestMapRequest: answered here for a disk not handed to the writer yet (the
    /// source asks right after OpenDisk); for one the writer holds, the writer answers
    /// (the protocol allows a request at any time) and this thread waits for it.
    fn digest_map(&mut self, r: &DigestMapRequest, report: &mut SessionReport) -> Result<()> {
        let events = self.events.clone();
        let a = self.active_mut()?;
        let sent = match a.opened.get_mut(&r.disk) {
            Some(d) => {
                if d.digests.unknown_count() > 0 {
                    let t = std::time::Instant::now();
                    // Hashing a whole image can take long: the source hears keepalives meanwhile.
                    ticking(TARGET_TICK, || keepalive(&events), || rebuild_unknown(&d.image, &mut d.digests))?;
                    d.dirty = true;
                    a.stats.record(Stage::Verify, t.elapsed());
                }
                send_digest_map(&events, r.disk, &d.digests, &r.cached_map_hash)?
            }
            None => {
                let (tx, reply) = bounded(1);
                let msg = WriterMsg::SendDigests { disk: r.disk, cached: r.cached_map_hash, reply: tx };
                a.pipeline()?.to_writer.send(msg).ok();
                reply.recv().map_err(|_| self.writer_gone())??
            }
        };
        sent.count_in(report);
        Ok(())
    }

    /// A data frame's payload, received: item number `dispatched`, to the verify workers.
    fn data(&mut self, head: DataHead, buf: PoolBuf) -> Result<()> {
        let a = self.active_mut()?;
        if let Some(d) = a.opened.remove(&head.disk) {
            // The writer takes the disk before the worker can pass it the chunk.
            if a.pipeline()?.to_writer.send(WriterMsg::OpenDisk(head.disk, d)).is_err() {
                return Err(self.writer_gone());
            }
        }
        let a = self.active_mut()?;
        let seq = a.dispatched;
        a.dispatched += 1;
        let p = a.pipeline()?;
        let turn = p.streams.admit(&head, &buf)?;
        if p.to_workers.as_ref().is_none_or(|w| w.send((seq, head, buf, turn)).is_err()) {
            return Err(self.writer_gone());
        }
        Ok(())
    }

    fn zero_run(&mut self, z: &ZeroRun) -> Result<()> {
        let a = self.active_mut()?;
        let seq = a.dispatched;
        a.dispatched += 1;
        self.tell_writer(Some(z.disk), WriterMsg::Zero { seq, disk: z.disk, first: z.first_chunk, count: z.count })
    }

    /// Advisory: the writer saves these chunks' old contents ahead of their data.
    fn intent(&mut self, i: &Intent) -> Result<()> {
        let runs = i.runs.iter().map(|r| (r.first_chunk, r.first_chunk + u64::from(r.count))).collect();
        self.tell_writer(Some(i.disk), WriterMsg::Intent { disk: i.disk, runs })
    }

    /// A Flush becomes a barrier behind every item dispatched so far.
    fn flush(&mut self, f: &Flush) -> Result<()> {
        let items_before = self.active()?.dispatched;
        self.tell_writer(Some(f.disk), WriterMsg::Barrier { disk: f.disk, next_chunk: f.next_chunk, items_before })
    }

    /// Commit: once the writer made everything durable, the point goes into the catalog
    /// (the commit point), session.json goes, retention runs, and Committed is sent: after
    /// every Checkpoint the writer sent before it answered.
    fn commit(&mut self, report: &mut SessionReport) -> Result<()> {
        let carried = self.carried_disks()?;
        let (tx, reply) = bounded(1);
        let items_before = self.active()?.dispatched;
        self.tell_writer(None, WriterMsg::Commit { items_before, reply: tx })?;
        // The writer's commit (maps stored, fsyncs) can take long: the source hears keepalives
        // meanwhile (crate::busy).
        let answer = ticking(
            TARGET_TICK,
            || keepalive(&self.events),
            || {
                let answer = reply.recv();
                crate::busy::test_slow("commit");
                answer
            },
        );
        let (mut disks, undo) = answer.map_err(|_| self.writer_gone())??;
        disks.extend(carried);
        disks.sort_by(|x, y| x.name.cmp(&y.name));
        let a = self.active()?;
        let mut catalog = a.replica.catalog()?;
        if let Some(prev) = catalog.points.last_mut() {
            // The previous point's undo files are complete now: the catalog records them
            // (a disk this session did not change has none).
            for d in &mut prev.disks {
                let extent = undo.iter().find(|(n, _)| n == &d.name).map(|(_, e)| *e);
                d.undo = Some(extent.unwrap_or(UndoExtent { bytes: 0, records: 0 }));
            }
        }
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
        // A kill point for tests (FERRY_TEST_STOP_AFTER): committed, session.json still there.
        points::test_step("session: catalog written");
        a.replica.clear_session()?;
        let retain = a.replica.settings.retain;
        let protection = self.cfg.protection;
        match points::prune_protected(&a.replica, retain, protection, now_ns()) {
            Ok(pruned) => {
                if let Some(n) = prune_notice(&a.replica.name, retain, a.retain_asked != 0, &protection, &pruned) {
                    self.send(Frame::Notice(n))?;
                }
            }
            // An export or verify reads the points: retention waits for the next commit
            // (or `ferry points prune`) rather than delete what it reads.
            Err(StoreError::Busy { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        report.point_id = Some(point.id);
        // The pipeline stops and the replica's lock goes before the source hears Committed: a
        // run that starts as soon as this one ends finds the replica free.
        if let Some(inner) = self.inner.take() {
            inner.fill_counters(report);
            report.stages = inner.finish().summary();
        }
        self.send(Frame::Committed(Committed { point_id: point.id, point_time_ns: point.point_time_ns }))?;
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl TargetSession<'_> {
    /// The disks of the latest point this session did not open: they go into the new point
    /// unchanged (their images and maps untouched, no chunk changed), so that the next
    /// session that changes one saves its old contents in this point's undo file and every
    /// older point of it stays exact (mover/datastore/DATASTORE.md, "A run that names fewer
    /// disks"). A disk that an interrupted session this one resumes had begun to change is
    /// refused instead: its image is no longer the latest point's.
    fn carried_disks(&self) -> Result<Vec<PointDisk>> {
        let a = self.active()?;
        let Some(latest) = &a.latest_point else { return Ok(Vec::new()) };
        let opened: Vec<&String> = a.disk_names.values().collect();
        let mut carried = Vec::new();
        for d in latest.disks.iter().filter(|d| !opened.contains(&&d.name)) {
            if a.state.disks.contains_key(&d.name) {
                return Err(MoveError::Usage(format!(
                    "disk {:?} of replica {:?} was being changed by the interrupted session this run resumes, \
                     but this run does not name it: name it again (--source {}=...), or undo the interrupted \
                     session with `ferry points rollback --incomplete --yes`",
                    d.name, a.replica.name, d.name
                )));
            }
            carried.push(PointDisk { chunks_changed: 0, bytes_changed: 0, undo: None, ..d.clone() });
        }
        Ok(carried)
    }
}

/// A Keepalive for the sending thread, unless it has enough to send already.
fn keepalive(events: &Sender<Outgoing>) {
    let _ = events.try_send(Outgoing::Frame(Frame::Keepalive));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str, out: &mut [u8]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = s.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
    }
}

/// Start the verify workers and the writer of a session with chunks of `chunk_size` bytes.
pub(super) fn start_pipeline(
    cfg: &ServeConfig,
    chunk_size: u32,
    replica: Arc<Replica>,
    state: SessionState,
    events: Sender<Outgoing>,
    failed: Arc<Mutex<Option<MoveError>>>,
) -> Result<Pipeline> {
    let workers = cfg.workers.max(1);
    let depth = cfg.depth(chunk_size);
    // At most 48 MiB of receive buffers (issue 20: 4 MiB chunks made this pool 96 MiB).
    let count = crate::source::read::pool_count(depth + 2 * workers + 4, 2 * workers + 4, u64::from(chunk_size));
    let pool = Arc::new(BufPool::with_slack(count, chunk_size as usize, PAYLOAD_SLACK));
    let (backend, warning) = open_backend(cfg.backend, &pool, depth).map_err(|source| MoveError::Backend {
        side: "target",
        opening: true,
        source,
    })?;
    let backend_name = backend.name();
    let (to_writer, writer_rx) = bounded::<WriterMsg>(depth + 2 * workers + 16);
    let (to_workers, work_rx) = bounded::<Item>(workers * 2);
    let streams = Arc::new(Streams::default());
    let counters = Arc::new(Counters::default());
    let mut handles = Vec::new();
    for i in 0..workers {
        let rx = work_rx.clone();
        let tx = to_writer.clone();
        let (pool, streams) = (pool.clone(), streams.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("ferry-verify-{i}"))
                .spawn(move || verify_worker(rx, tx, pool, streams))
                .expect("spawn verify worker"),
        );
    }
    let w = Writer::new(backend, replica, state, events, failed, counters.clone(), chunk_size);
    let writer = std::thread::Builder::new()
        .name("ferry-writer".into())
        .spawn(move || w.serve(writer_rx))
        .expect("spawn writer");
    Ok(Pipeline {
        pool,
        to_workers: Some(to_workers),
        streams,
        to_writer,
        workers: handles,
        writer: Some(writer),
        counters,
        backend_name,
        warning,
    })
}
