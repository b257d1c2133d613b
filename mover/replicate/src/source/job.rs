//! The session with the target: open the replica, then per disk OpenDisk /
//! ResumeInfo, the digest map when the plan needs it, the plan; run the
//! pipeline (reader, workers, sender, receiver); Commit.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver};
use ferry_io::IoBackend;
use ferry_nbd::NbdBackend;
use ferry_planner::{
    check_samples, expected_changes, plan_disk, read_span, ChangeMap, ChunkSet, Digest, DigestMap, DiskInputs,
    PlanMode, TargetDisk, ZeroDigests, PAGE_CHUNKS,
};
use ferry_wire::chunk::default_chunk_size;
use ferry_wire::{
    Authenticator, Commit, DigestMapRequest, Event, Frame, Mode, OpenDisk, OpenReplica, ReplicaOpened, ResumeInfo,
};

use super::announce::Announcer;
use super::compress::LevelBytes;
use super::compress::{AutoCompress, AUTO_LEVELS};
use super::heartbeat::{self, Heartbeat};
use super::read::{read_loop, ReadPlan, ReadSide, Work};
use super::receive::{prefer_target_error, receive_loop, RxMsg};
use super::send::send_loop;
use super::stripe::{Dial, FrameSink, StreamPlan, Striper};
use super::work::{work_loop, Done};
use super::{CompressChoice, CompressPolicy, DiskSpec, JobEvent, JobReport, Observer, ReplicateConfig};
use crate::conn::{Conn, Rx, KEEPALIVE_INTERVAL};
use crate::disk::SourceDisk;
use crate::error::{MoveError, Result};
use crate::map_cache::MapCacheWriter;
use crate::stats::{DiskCounters, MapSource, StageStats};
use crate::zstream::MAX_STREAMS;

/// Per-disk state of a running job.
pub(super) struct JobDisk {
    pub(super) disk: SourceDisk,
    pub(super) chunk_count: u64,
    pub(super) ranges: Vec<Range<u64>>,
    /// Planned chunks not to read (NBD holes).
    holes: ChunkSet,
    pub(super) counters: DiskCounters,
    /// Target digests (digest mode).
    target_digests: Option<DigestMap>,
    /// The map the target will hold after this run, streamed to the cache as chunks go.
    pub(super) cache: Option<MapCacheWriter>,
    /// The target's map where only the cache needs it (cbt: the chunks not sent keep these digests).
    cache_base: Option<DigestMap>,
    /// Cbt disks: their planned chunks are announced ahead of the data.
    pub(super) announcer: Option<Announcer>,
}

/// The target's next frame that is not progress, a keepalive or unknown.
pub(super) fn expect_frame(conn: &Conn, rx: &mut Rx) -> Result<Frame> {
    loop {
        let f = rx.next_frame()?.ok_or_else(|| MoveError::PeerGone { peer: conn.peer().into(), side: "target" })?;
        if let Some(Event::Frame(f)) = conn.handle(f)? {
            match f {
                Frame::Progress(_) | Frame::Keepalive | Frame::Unknown { .. } => continue,
                f => return Ok(f),
            }
        }
    }
}

/// The target answered `f` where `wanted` was expected.
pub(super) fn unexpected(conn: &Conn, f: &Frame, wanted: &str) -> MoveError {
    MoveError::Protocol { peer: conn.peer().into(), what: format!("answered {} where {wanted} was expected", f.name()) }
}

/// A disk opened at the source, its spec and its change map.
pub(super) type OpenedDisk<'a> = (SourceDisk, &'a DiskSpec, Option<ChangeMap>);

/// What the pipeline gives: stage figures, the backend's name, what compression did.
type PipelineResult = (StageStats, String, Compressed);

/// What compression did in a run: auto's choices, the bytes at each level, streams or not.
struct Compressed {
    auto: Option<CompressChoice>,
    levels: Vec<LevelBytes>,
    stream: bool,
}

/// How a job may stripe its session: connections wanted, how to open more, the token.
pub(super) struct StripePlan {
    pub(super) plan: StreamPlan,
    pub(super) dial: Arc<Dial>,
    pub(super) auth: Arc<dyn Authenticator>,
    /// Features the target negotiated on the first connection.
    pub(super) features: u64,
    /// Another handle to the first connection's socket (stripe.rs: shut down without its lock).
    pub(super) sock: Option<crate::conn::Sock>,
}

/// What the target agreed to on the first connection: stream compression, and striping.
pub(super) struct PeerPlan {
    /// Chunks may travel as zstd streams (codec zstd-stream).
    pub(super) zstd_stream: bool,
    /// More connections, when the job stripes its session.
    pub(super) stripe: Option<StripePlan>,
}

pub(super) fn run_job(
    conn: &Arc<Conn>,
    rx: Rx,
    opened: Vec<OpenedDisk>,
    cfg: &ReplicateConfig,
    obs: &dyn Observer,
    start: Instant,
    peer: PeerPlan,
) -> Result<JobReport> {
    // Progress at least once a second and a keepalive when quiet, in every phase (heartbeat.rs).
    let hb = Heartbeat::new(obs);
    let tick = || {
        hb.beat();
        let _ = conn.keepalive_if_quiet(KEEPALIVE_INTERVAL);
    };
    crate::busy::ticking(heartbeat::LOOK, tick, || job(conn, rx, opened, cfg, &hb, start, peer))
}

/// [`run_job`] under its heartbeat `obs`.
fn job(
    conn: &Arc<Conn>,
    mut rx: Rx,
    opened: Vec<OpenedDisk>,
    cfg: &ReplicateConfig,
    obs: &Heartbeat,
    start: Instant,
    peer: PeerPlan,
) -> Result<JobReport> {
    let PeerPlan { zstd_stream: stream, stripe } = peer;
    let (reply, chunk_size) = open_replica(conn, &mut rx, &opened, cfg, obs)?;
    // A replica without points gets every disk in full, whatever the change lists say.
    let first_run = reply.latest_point == 0 && !reply.resumed;
    let span = read_span(
        chunk_size,
        opened.iter().map(|(sd, spec, cbt)| {
            expected_changes(spec.mode.map(PlanMode::from), cbt.as_ref(), chunk_size, sd.size, first_run)
        }),
    );
    let read_side = ReadSide::spawn(cfg, chunk_size, span);

    let mut disks = Vec::new();
    for (i, opened) in opened.into_iter().enumerate() {
        disks.push(open_disk(conn, &mut rx, i as u32, opened, cfg, chunk_size, obs)?);
    }
    obs.event(&JobEvent::Plan(disks.iter().map(|d| d.counters.clone()).collect()));

    let read_side = read_side.join().map_err(|_| MoveError::Internal("building the read buffers failed".into()))?;
    // More connections, once the disks are open (stripe.rs).
    let mut striper = match stripe {
        Some(p) if p.plan.cap.max(p.plan.start) > 1 && !cfg.plan_only => {
            if p.features & ferry_wire::FEATURE_STREAMS != 0 {
                Some(Striper::open(conn, p.sock, &mut rx, p.plan, &p.dial, &p.auth)?)
            } else {
                obs.event(&JobEvent::Notice(format!(
                    "the target does not take several connections per session; using one (--streams {})",
                    p.plan.start
                )));
                None
            }
        }
        _ => None,
    };
    let streams_at_start = striper.as_ref().map_or(1, |s| s.count()) as u16;
    // Receiver: checkpoints, the commit answer, errors.
    let (rx_tx, rx_msgs) = crossbeam_channel::unbounded::<RxMsg>();
    let receiver = {
        let conn = conn.clone();
        let mut rx = rx;
        std::thread::Builder::new()
            .name("ferry-receiver".into())
            .spawn(move || receive_loop(&conn, &mut rx, &rx_tx))
            .expect("spawn receiver")
    };

    let sink: &dyn FrameSink = match &striper {
        Some(s) => s,
        None => &**conn,
    };
    obs.phase("data", None);
    let run = run_pipeline(sink, &mut disks, cfg, chunk_size, read_side, &rx_msgs, obs, stream);
    obs.phase("commit", None);
    let outcome = commit(sink, conn, disks.len(), cfg, run, &rx_msgs);
    // A send that failed because the target closed the session or the
    // connection: the target's own Error frame, if the receiver got one, says why.
    let outcome = outcome.map_err(|e| if e.is_connection_error() { prefer_target_error(&rx_msgs, e) } else { e });
    let mut wire_bytes = conn.bytes_sent();
    let mut stream_bytes = vec![wire_bytes];
    if let Some(s) = &mut striper {
        s.finish(outcome.is_ok());
        stream_bytes = s.bytes_per_stream();
        if let Some(why) = s.failed_join() {
            obs.event(&JobEvent::Notice(format!(
                "could not add a connection during the run ({why}); went on with those it had"
            )));
        }
        wire_bytes = stream_bytes.iter().sum();
    }
    conn.shutdown();
    let _ = receiver.join();
    let ((stats, backend, compressed), point_id, point_time_ns) = outcome?;
    // What the target's policy did beyond what was asked (retention it kept, and why).
    for n in conn.take_notices() {
        let message = format!("target: {}", n.message);
        obs.event(&match n.level {
            ferry_wire::NoticeLevel::Warning => JobEvent::Warning(message),
            ferry_wire::NoticeLevel::Info => JobEvent::Notice(message),
        });
    }
    commit_map_caches(&mut disks, cfg, obs);
    Ok(JobReport {
        disks: disks.into_iter().map(|d| d.counters).collect(),
        duration_s: start.elapsed().as_secs_f64(),
        stages: stats.summary(),
        point_id,
        point_time_ns,
        backend,
        resumed: reply.resumed,
        chunk_size,
        wire_bytes,
        compress_auto: compressed.auto,
        compress_levels: compressed.levels,
        compress_stream: compressed.stream,
        streams: stream_bytes.len() as u16,
        streams_at_start,
        stream_bytes,
    })
}

/// Open the session's replica; the target's answer and the chunk size in force.
fn open_replica(
    conn: &Conn,
    rx: &mut Rx,
    opened: &[OpenedDisk],
    cfg: &ReplicateConfig,
    obs: &dyn Observer,
) -> Result<(ReplicaOpened, u32)> {
    let session_id = crate::auth::random_bytes::<16>();
    conn.send(&Frame::OpenReplica(OpenReplica {
        replica: cfg.replica.clone(),
        point_time_ns: cfg.point_time_ns,
        session_id,
        retain: cfg.retain,
        flags: if cfg.plan_only { OpenReplica::PLAN_ONLY } else { 0 },
    }))?;
    let reply = match expect_frame(conn, rx)? {
        Frame::ReplicaOpened(r) => r,
        f => return Err(unexpected(conn, &f, "ReplicaOpened")),
    };
    if reply.resumed {
        obs.event(&JobEvent::Notice(format!(
            "replica {:?} has an interrupted session: resuming it from its last checkpoint",
            cfg.replica
        )));
    }
    let chunk_size = match (reply.chunk_size, cfg.chunk_size) {
        (0, c) => c.unwrap_or_else(|| default_chunk_size(opened.iter().map(|(sd, _, _)| sd.size).max().unwrap_or(0))),
        (r, Some(c)) if c != r => {
            return Err(MoveError::Usage(format!(
                "replica {:?} has chunk size {} KiB; drop --chunk-size or give {} KiB (it is fixed when a replica is created)",
                cfg.replica,
                r / 1024,
                r / 1024
            )))
        }
        (r, _) => r,
    };
    Ok((reply, chunk_size))
}

/// After the pipeline: Commit and wait for the target's answer (a plan only
/// closes the session instead). The pipeline's figures, the point's id and time.
fn commit(
    sink: &dyn FrameSink,
    conn: &Conn,
    disk_count: usize,
    cfg: &ReplicateConfig,
    run: Result<PipelineResult>,
    rx_msgs: &Receiver<RxMsg>,
) -> Result<(PipelineResult, u64, i64)> {
    let run = run?;
    if cfg.plan_only {
        let _ = sink.send(&Frame::Close);
        return Ok((run, 0, cfg.point_time_ns));
    }
    sink.send(&Frame::Commit(Commit { disk_count: disk_count as u32 }))?;
    match rx_msgs.recv() {
        Ok(RxMsg::Committed { point_id, point_time_ns }) => {
            let _ = sink.send(&Frame::Close);
            Ok((run, point_id, point_time_ns))
        }
        Ok(RxMsg::Failed(e)) => Err(e),
        Err(_) => Err(MoveError::PeerGone { peer: conn.peer().into(), side: "target" }),
    }
}

/// Committed: the target now holds the maps streamed during the run.
fn commit_map_caches(disks: &mut [JobDisk], cfg: &ReplicateConfig, obs: &dyn Observer) {
    let (Some(c), false) = (&cfg.map_cache, cfg.plan_only) else { return };
    for d in disks {
        match d.cache.take().map(MapCacheWriter::commit) {
            Some(Ok(true)) => {}
            Some(Ok(false)) | None => c.remove(&cfg.replica, &d.disk.name),
            Some(Err(e)) => obs.event(&JobEvent::Notice(format!(
                "disk {:?}: digest map not cached ({e}); the next run downloads it",
                d.disk.name
            ))),
        }
    }
}

/// Open disk `id` at the target and plan it: its mode, the digest map when
/// the plan needs one, what to read, its counters, cache and announcer.
#[allow(clippy::too_many_arguments)]
fn open_disk(
    conn: &Conn,
    rx: &mut Rx,
    id: u32,
    (sd, spec, cbt): OpenedDisk,
    cfg: &ReplicateConfig,
    chunk_size: u32,
    obs: &Heartbeat,
) -> Result<JobDisk> {
    obs.phase("open", Some(&sd.name));
    let cs = u64::from(chunk_size);
    let requested = spec.mode.unwrap_or(if cbt.is_some() { Mode::Cbt } else { Mode::Digest });
    conn.send(&Frame::OpenDisk(OpenDisk {
        disk: id,
        name: sd.name.clone(),
        size: sd.size,
        chunk_size,
        mode: requested,
    }))?;
    let resume: ResumeInfo = match expect_frame(conn, rx)? {
        Frame::ResumeInfo(r) if r.disk == id => r,
        f => return Err(unexpected(conn, &f, "ResumeInfo")),
    };
    let chunk_count = sd.size.div_ceil(cs);
    let inputs = DiskInputs {
        chunk_size,
        disk_size: sd.size,
        requested: spec.mode.map(PlanMode::from),
        change_map: cbt.as_ref(),
        target: TargetDisk {
            existed: resume.flags & ResumeInfo::EXISTED != 0,
            previous_size: resume.previous_size,
            next_chunk: resume.next_chunk,
        },
        plan_only: cfg.plan_only,
        verify_samples: cfg.verify_samples,
        seed: if cfg.verify_samples == 0 { 0 } else { u64::from_le_bytes(crate::auth::random_bytes::<8>()) },
    };
    let mut plan = plan_disk(&inputs);
    let (mut map_source, mut map_bytes) = (MapSource::None, 0);
    let mut fetch = |conn: &Conn, rx: &mut Rx| -> Result<DigestMap> {
        obs.phase("digest_map", None);
        crate::busy::test_slow("digest_map");
        let cached = cfg.map_cache.as_ref().and_then(|c| c.load(&cfg.replica, &sd.name, chunk_size, sd.size));
        let f = fetch_digests(conn, rx, id, (chunk_size, sd.size), cached)?;
        map_source = f.source;
        map_bytes = f.wire_bytes;
        obs.phase("open", None);
        Ok(f.digests)
    };
    let (mut target_digests, mut cache_base) = (None, None);
    if plan.needs_digest_map {
        let digests = if plan.samples.is_empty() {
            fetch(conn, rx)?
        } else {
            let (digests, sampled) = fetch_and_sample(conn, rx, &sd, cs, &plan.samples, &mut fetch)?;
            plan = check_samples(plan, &sampled, &digests);
            digests
        };
        // Digest mode compares every chunk with the map; cbt keeps it for the cache.
        if plan.compares_digests() {
            target_digests = Some(digests);
        } else {
            cache_base = Some(digests);
        }
    }
    for note in &plan.notes {
        let message = note.message(&sd.name);
        obs.event(&if note.is_warning() { JobEvent::Warning(message) } else { JobEvent::Notice(message) });
    }
    let todo = &plan.todo;
    let holes = sd.hole_chunks(todo, cs)?;
    let mut counters = DiskCounters {
        disk: sd.name.clone(),
        mode: Some(plan.mode),
        size: sd.size,
        chunks_planned: todo.count(),
        bytes_planned: todo.bytes(chunk_size, sd.size),
        chunks_resumed: plan.chunks_resumed(),
        digest_map: Some(map_source),
        digest_map_bytes: map_bytes,
        ..Default::default()
    };
    // The map the target holds after the commit is known when every chunk is either
    // processed by this run or in the target's map as it stands.
    let complete = target_digests.is_some() || cache_base.is_some() || todo.count() == chunk_count;
    let cache = if complete { cache_writer(&sd, cfg, chunk_size, obs) } else { None };
    let mut announcer = plan.announce.then(Announcer::default);
    if let Some(intent) = announcer.as_mut().and_then(|a| a.next_window(id, todo.ranges())) {
        counters.bytes_sent += conn.send(&Frame::Intent(intent))?;
    }
    Ok(JobDisk {
        disk: sd,
        chunk_count,
        announcer,
        ranges: todo.ranges().to_vec(),
        holes,
        counters,
        target_digests,
        cache_base: if cache.is_some() { cache_base } else { None },
        cache,
    })
}

/// Read and hash the chunks `samples` while the target's map is on its way
/// (`fetch`): the map, and the samples' digests.
fn fetch_and_sample(
    conn: &Conn,
    rx: &mut Rx,
    sd: &SourceDisk,
    cs: u64,
    samples: &[u64],
    fetch: &mut dyn FnMut(&Conn, &mut Rx) -> Result<DigestMap>,
) -> Result<(DigestMap, Vec<Digest>)> {
    let (digests, sampled) = std::thread::scope(|s| {
        let sampled = s.spawn(|| hash_chunks(sd, cs, samples));
        let digests = fetch(conn, rx);
        (digests, sampled.join().expect("sample hashing does not panic"))
    });
    Ok((digests?, sampled?))
}

/// A writer of the disk's map into the cache, if there is a cache and this is not a plan only.
fn cache_writer(sd: &SourceDisk, cfg: &ReplicateConfig, chunk_size: u32, obs: &dyn Observer) -> Option<MapCacheWriter> {
    let c = cfg.map_cache.as_ref().filter(|_| !cfg.plan_only)?;
    match c.writer(&cfg.replica, &sd.name, chunk_size, sd.size) {
        Ok(w) => Some(w),
        Err(e) => {
            obs.event(&JobEvent::Notice(format!(
                "disk {:?}: cannot cache its digest map in {}: {e}; the next run downloads it",
                sd.name,
                c.dir().display()
            )));
            None
        }
    }
}

/// A digest map as the target answered a DigestMapRequest.
struct FetchedMap {
    digests: DigestMap,
    source: MapSource,
    /// DigestMapPart and DigestMapEnd bytes received.
    wire_bytes: u64,
}

/// Ask the target for disk `disk`'s digest map, offering the hash of `cached`:
/// the cached copy is used only when the target answers `cache_hit` for it.
fn fetch_digests(
    conn: &Conn,
    rx: &mut Rx,
    disk: u32,
    (chunk_size, disk_size): (u32, u64),
    cached: Option<(DigestMap, Digest)>,
) -> Result<FetchedMap> {
    let cached_map_hash = cached.as_ref().map_or([0; 32], |c| c.1);
    conn.send(&Frame::DigestMapRequest(DigestMapRequest { disk, cached_map_hash }))?;
    let bad = |what: String| MoveError::Protocol { peer: conn.peer().into(), what };
    // Built page by page as the parts come: pages of holes keep no digests (a thin disk's
    // map costs what its data costs), and the map is never held twice.
    let mut v = DigestMap::new(chunk_size, disk_size).map_err(|e| bad(e.to_string()))?;
    let chunk_count = v.chunk_count();
    let mut page: Vec<Digest> = Vec::with_capacity(PAGE_CHUNKS);
    let mut received = 0u64;
    let mut wire_bytes = 0u64;
    let end = loop {
        match expect_frame(conn, rx)? {
            Frame::DigestMapPart(p) if p.disk == disk => {
                wire_bytes += (ferry_wire::HEADER_LEN + 16 + p.digests.len()) as u64;
                for c in p.digests.chunks_exact(32) {
                    if received >= chunk_count {
                        return Err(bad(format!("sent a digest map of more chunks than the disk's {chunk_count}")));
                    }
                    page.push(<[u8; 32]>::try_from(c).expect("32 bytes"));
                    received += 1;
                    if page.len() == PAGE_CHUNKS || received == chunk_count {
                        v.fill_page(((received - 1) / PAGE_CHUNKS as u64) as usize, &page);
                        page.clear();
                    }
                }
            }
            Frame::DigestMapEnd(e) if e.disk == disk => {
                wire_bytes += (ferry_wire::HEADER_LEN + 45) as u64;
                break e;
            }
            f => return Err(unexpected(conn, &f, "DigestMapPart")),
        }
    };
    let (digests, source, count) = match cached {
        Some((m, _)) if end.cache_hit && end.map_hash == cached_map_hash => {
            let n = m.chunk_count();
            (m, MapSource::Cached, n)
        }
        _ if end.cache_hit => {
            return Err(bad("answered cache_hit for a digest map this source did not offer".into()));
        }
        _ => (v, MapSource::Fetched, received),
    };
    if count != chunk_count || end.chunk_count != chunk_count {
        return Err(bad(format!("sent a digest map of {count} chunks for a disk of {chunk_count}")));
    }
    Ok(FetchedMap { digests, source, wire_bytes })
}

/// The digests of `chunks` (sorted): read and hashed, except those inside a hole of the
/// disk, which are zeros (on a thin disk most samples fall in holes: nothing to read).
fn hash_chunks(sd: &SourceDisk, cs: u64, chunks: &[u64]) -> Result<Vec<Digest>> {
    let holes = sd.hole_chunks(&ChunkSet::from_indices(chunks.iter().copied()), cs)?;
    let zeros = ZeroDigests::new(cs as u32);
    let mut buf = vec![0u8; cs as usize];
    chunks
        .iter()
        .map(|&chunk| {
            let offset = chunk * cs;
            let len = (sd.size - offset).min(cs) as usize;
            if holes.contains(chunk) {
                return Ok(zeros.digest(len as u32));
            }
            sd.read_at(offset, &mut buf[..len])?;
            Ok(*blake3::hash(&buf[..len]).as_bytes())
        })
        .collect()
}

/// Run the reader, the workers and the sender over the planned disks; with
/// compression streams (one per worker) when `stream`.
#[allow(clippy::too_many_arguments)]
fn run_pipeline(
    conn: &dyn FrameSink,
    disks: &mut [JobDisk],
    cfg: &ReplicateConfig,
    chunk_size: u32,
    read_side: ReadSide,
    rx_msgs: &Receiver<RxMsg>,
    obs: &dyn Observer,
    stream: bool,
) -> Result<PipelineResult> {
    let ReadSide { read_pool, out_pool, span, depth, workers, backend } = read_side;
    let (backend, warning) = backend.map_err(|source| MoveError::Backend { side: "source", opening: true, source })?;
    if let Some(w) = warning {
        obs.event(&JobEvent::Notice(w));
    }
    let abort = AtomicBool::new(false);
    let (work_tx, work_rx) = bounded::<Work>(depth + workers * 2);
    let (done_tx, done_rx) = bounded::<Done>(depth + workers * 2);
    // Files share `backend`; each NBD disk reads through its own connection.
    let mut plans: Vec<ReadPlan> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| ReadPlan {
            disk: i as u32,
            name: d.disk.name.clone(),
            fd: d.disk.read_fd(),
            size: d.disk.size,
            ranges: d.ranges.clone(),
            holes: d.holes.clone(),
            nbd: d
                .disk
                .nbd_client()
                .zip(d.disk.nbd_uri())
                .map(|(c, uri)| Box::new(NbdBackend::new(c, depth, uri)) as Box<dyn IoBackend>),
            nbd_uri: d.disk.nbd_uri().map(str::to_string),
            prefetch: d.disk.nbd_uri().is_none() && !d.disk.is_direct(),
        })
        .collect();
    let nbd_disks = plans.iter().filter(|p| p.nbd.is_some()).count();
    let backend_name = match nbd_disks {
        0 => backend.name().to_string(),
        n if n == plans.len() => "nbd".to_string(),
        _ => format!("{}+nbd", backend.name()),
    };
    let names: Vec<String> = disks.iter().map(|d| d.disk.name.clone()).collect();
    let target_maps: Vec<Option<DigestMap>> = disks.iter_mut().map(|d| d.target_digests.take()).collect();
    let cache_bases: Vec<Option<DigestMap>> = disks.iter_mut().map(|d| d.cache_base.take()).collect();
    let digests: Vec<Option<&DigestMap>> = target_maps.iter().map(Option::as_ref).collect();
    let cs = u64::from(chunk_size);

    let auto = AutoCompress::default();
    auto.idx.store(1, Ordering::Relaxed); // start at zstd 1; the controller adapts within a window
    auto.checked.store(stream && cfg.compress != CompressPolicy::None, Ordering::Relaxed);
    let auto = &auto;
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let r = read_loop(backend, &read_pool, &mut plans, cs, span, &work_tx, &abort);
            drop(work_tx);
            r
        });
        let mut worker_handles = Vec::new();
        let stream = stream && cfg.compress != CompressPolicy::None;
        for i in 0..workers {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let (out_pool, digests, names) = (&out_pool, &digests, &names);
            // Worker i compresses into stream i (at most MAX_STREAMS of them; workers <= 16).
            let id = stream.then_some(i as u32).filter(|&i| i < MAX_STREAMS);
            worker_handles.push(s.spawn(move || {
                work_loop(work_rx, done_tx, out_pool, digests, names, cfg.compress, chunk_size, auto, id)
            }));
        }
        drop(work_rx);
        drop(done_tx);
        let bases: Vec<Option<&DigestMap>> = digests.iter().zip(&cache_bases).map(|(d, c)| d.or(c.as_ref())).collect();
        let sent = send_loop(conn, disks, &bases, cfg, cs, &done_rx, rx_msgs, obs, auto, workers);
        if sent.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        drop(done_rx);
        let mut stats = StageStats::default();
        for w in worker_handles {
            if let Ok(st) = w.join() {
                stats.merge(&st);
            }
        }
        let read = reader.join().unwrap_or_else(|_| Err(MoveError::Internal("the reader thread panicked".into())));
        let (sender_stats, windows, levels) = sent?;
        let read_stats = read?;
        stats.merge(&read_stats);
        stats.merge(&sender_stats);
        let chosen = (cfg.compress == CompressPolicy::Auto).then(|| CompressChoice {
            levels: AUTO_LEVELS.to_vec(),
            windows: windows.to_vec(),
            final_level: AUTO_LEVELS[auto.idx.load(Ordering::Relaxed)],
        });
        Ok((stats, backend_name, Compressed { auto: chosen, levels, stream }))
    })
}
