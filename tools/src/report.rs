//! How a job reports: NDJSON events (`--json`) or text with a progress bar.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ferry_replicate::source::{JobEvent, JobReport, Observer, ReplicateConfig};
use ferry_replicate::stats::{DiskCounters, MapSource, StageSummary};
use ferry_replicate::target::SessionReport;
use serde_json::{json, Value};

use crate::time::format_rfc3339;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Exit 0.
    Ok,
    /// Exit 3.
    Warning,
}

/// Print one JSON value as a line on stdout.
pub fn print_json(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// 1.5 GiB, 12.0 MiB, 512 B.
pub fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Sum of per-disk counters.
pub fn totals(disks: &[DiskCounters]) -> DiskCounters {
    let mut t = DiskCounters { disk: "total".into(), ..Default::default() };
    for d in disks {
        t.size += d.size;
        t.chunks_planned += d.chunks_planned;
        t.bytes_planned += d.bytes_planned;
        t.chunks_resumed += d.chunks_resumed;
        t.add(d);
    }
    t
}

/// Stage summaries as a JSON object keyed by stage name.
pub fn stages_json(stages: &[StageSummary]) -> Value {
    let mut m = serde_json::Map::new();
    for s in stages {
        m.insert(s.stage.to_string(), serde_json::to_value(s).expect("json"));
    }
    Value::Object(m)
}

/// A job observer that also writes the final summary.
pub trait JobObserver: Send + Sync {
    /// The mover-facing observer.
    fn as_observer(&self) -> &dyn Observer;
    /// True when a warning was reported.
    fn warned(&self) -> bool;
    /// Print the summary of a finished job; returns the exit code.
    fn finish_ok(&self, cfg: &ReplicateConfig, rep: &JobReport, status: Status) -> ExitCode;
    /// Print the summary of a failed job; returns the exit code.
    fn finish_err(&self, cfg: &ReplicateConfig, err: &anyhow::Error) -> ExitCode;
}

fn summary_json(cfg: &ReplicateConfig, rep: &JobReport, status: &str) -> Value {
    json!({
        "event": "summary",
        "status": status,
        "replica": cfg.replica,
        "point_id": rep.point_id,
        "point_time": format_rfc3339(rep.point_time_ns),
        "duration_s": rep.duration_s,
        "backend": rep.backend,
        "chunk_size": rep.chunk_size,
        "resumed": rep.resumed,
        "wire_bytes": rep.wire_bytes,
        "streams": rep.streams,
        // `--streams auto` may add connections during the run: how many at the start,
        // and the bytes each one carried (the first connection first).
        "streams_at_start": rep.streams_at_start,
        "stream_bytes": rep.stream_bytes,
        "compress_auto": rep.compress_auto,
        "compress_stream": rep.compress_stream,
        "levels": rep.compress_levels,
        // The rate in force at the end (bytes/s, 0: unlimited); null without --bwlimit.
        "bwlimit": cfg.throttle.as_ref().map(|t| t.rate().0),
        "totals": totals(&rep.disks),
        "disks": rep.disks,
        "stages": stages_json(&rep.stages),
    })
}

fn exit_for_error(err: &anyhow::Error) -> ExitCode {
    ExitCode::from(crate::exit_code_of(err))
}

/// The exit code of a finished job.
fn exit_for_status(status: Status) -> ExitCode {
    ExitCode::from(if status == Status::Ok { crate::EXIT_OK } else { crate::EXIT_WARNING })
}

/// `--json`: NDJSON on stdout.
#[derive(Debug, Default)]
pub struct JsonObserver {
    warned: AtomicBool,
    start: Mutex<Option<Instant>>,
}

impl Observer for JsonObserver {
    fn event(&self, e: &JobEvent) {
        let v = match e {
            JobEvent::Plan(disks) => {
                *self.start.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                json!({"event": "plan", "disks": disks, "totals": totals(disks)})
            }
            JobEvent::Progress { disk, done, total, phase } => {
                json!({"event": "progress", "disk": disk, "bytes_done": done, "bytes_total": total, "phase": phase})
            }
            JobEvent::DiskDone(c) => json!({"event": "disk_done", "disk": c.disk, "counters": c}),
            JobEvent::Warning(m) => {
                self.warned.store(true, Ordering::Relaxed);
                json!({"event": "warning", "message": m})
            }
            JobEvent::Notice(m) => json!({"event": "notice", "message": m}),
        };
        print_json(&v);
    }
}

impl JobObserver for JsonObserver {
    fn as_observer(&self) -> &dyn Observer {
        self
    }
    fn warned(&self) -> bool {
        self.warned.load(Ordering::Relaxed)
    }
    fn finish_ok(&self, cfg: &ReplicateConfig, rep: &JobReport, status: Status) -> ExitCode {
        let s = if status == Status::Ok { "ok" } else { "warning" };
        print_json(&summary_json(cfg, rep, s));
        exit_for_status(status)
    }
    fn finish_err(&self, cfg: &ReplicateConfig, err: &anyhow::Error) -> ExitCode {
        let msg = format!("{err:#}");
        print_json(&json!({"event": "error", "message": msg}));
        let dur = self.start.lock().unwrap_or_else(|p| p.into_inner()).map_or(0.0, |t| t.elapsed().as_secs_f64());
        print_json(&json!({
            "event": "summary",
            "status": "failed",
            "replica": cfg.replica,
            "error": msg,
            "duration_s": dur,
            "totals": DiskCounters { disk: "total".into(), ..Default::default() },
            "disks": [],
            "stages": {},
        }));
        eprintln!("ferry: error: {msg}");
        exit_for_error(err)
    }
}

/// Text output: a progress bar on a terminal, a readable summary.
pub struct TextObserver {
    bar: Option<indicatif::ProgressBar>,
    warned: AtomicBool,
    totals: Mutex<(u64, std::collections::HashMap<String, u64>)>,
}

impl TextObserver {
    /// With a progress bar when `tty`.
    pub fn new(tty: bool) -> TextObserver {
        TextObserver {
            bar: tty.then(indicatif::ProgressBar::hidden),
            warned: AtomicBool::new(false),
            totals: Mutex::default(),
        }
    }
}

impl Observer for TextObserver {
    fn event(&self, e: &JobEvent) {
        match e {
            JobEvent::Plan(disks) => {
                let t = totals(disks);
                if let Some(b) = &self.bar {
                    b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    b.set_length(t.bytes_planned);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
                        )
                        .expect("template"),
                    );
                }
                eprintln!("replicating {} disk(s), {} planned", disks.len(), human_bytes(t.bytes_planned));
            }
            JobEvent::Progress { disk, done, phase, .. } => {
                let mut g = self.totals.lock().unwrap_or_else(|p| p.into_inner());
                let prev = g.1.insert(disk.clone(), *done).unwrap_or(0);
                g.0 += done.saturating_sub(prev);
                if let Some(b) = &self.bar {
                    b.set_position(g.0);
                    // Outside the data phase the bar says what the run waits for.
                    b.set_message(if *phase == "data" {
                        String::new()
                    } else {
                        format!("({})", phase.replace('_', " "))
                    });
                    b.tick();
                }
            }
            JobEvent::DiskDone(c) => {
                let map = match c.digest_map {
                    Some(MapSource::Cached) => ", digest map cached".to_string(),
                    Some(MapSource::Fetched) => format!(", digest map fetched ({})", human_bytes(c.digest_map_bytes)),
                    _ => String::new(),
                };
                let msg = format!(
                    "disk {}: {} read, {} zero, {} unchanged, {} sent{map}",
                    c.disk,
                    human_bytes(c.bytes_read),
                    human_bytes(c.bytes_zero),
                    human_bytes(c.bytes_unchanged),
                    human_bytes(c.bytes_sent)
                );
                match &self.bar {
                    Some(b) => b.println(msg),
                    None => eprintln!("{msg}"),
                }
            }
            JobEvent::Warning(m) | JobEvent::Notice(m) => {
                let label = if matches!(e, JobEvent::Warning(_)) {
                    self.warned.store(true, Ordering::Relaxed);
                    "warning"
                } else {
                    "note"
                };
                match &self.bar {
                    Some(b) => b.println(format!("{label}: {m}")),
                    None => eprintln!("{label}: {m}"),
                }
            }
        }
    }
}

impl JobObserver for TextObserver {
    fn as_observer(&self) -> &dyn Observer {
        self
    }
    fn warned(&self) -> bool {
        self.warned.load(Ordering::Relaxed)
    }
    fn finish_ok(&self, cfg: &ReplicateConfig, rep: &JobReport, status: Status) -> ExitCode {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let t = totals(&rep.disks);
        let rate = t.bytes_planned as f64 / rep.duration_s.max(1e-9) / (1u64 << 30) as f64;
        println!(
            "replica {} point {} ({}) {}: {} planned in {:.2} s ({rate:.2} GiB/s), {} read, {} zero, {} unchanged, {} sent{}{}",
            cfg.replica,
            rep.point_id,
            format_rfc3339(rep.point_time_ns - rep.point_time_ns % 1_000_000_000),
            if status == Status::Ok { "done" } else { "done with warnings" },
            human_bytes(t.bytes_planned),
            rep.duration_s,
            human_bytes(t.bytes_read),
            human_bytes(t.bytes_zero),
            human_bytes(t.bytes_unchanged),
            human_bytes(t.bytes_sent),
            if rep.resumed { " (resumed)" } else { "" },
            match (rep.streams, rep.streams_at_start) {
                (1, _) => String::new(),
                (n, s) if s < n => format!(" over {n} streams ({s} at the start)"),
                (n, _) => format!(" over {n} streams"),
            },
        );
        if let Some(line) = levels_line(rep) {
            println!("{line}");
        }
        exit_for_status(status)
    }
    fn finish_err(&self, _cfg: &ReplicateConfig, err: &anyhow::Error) -> ExitCode {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!("ferry: error: {err:#}");
        exit_for_error(err)
    }
}

/// `compressed (streams): zstd 3 1200 chunks 75.0 MiB -> 21.3 MiB, raw 40 chunks 2.5 MiB`:
/// the data chunks at each level; None when nothing was compressed.
fn levels_line(rep: &JobReport) -> Option<String> {
    if rep.compress_levels.iter().all(|l| l.level == 0) {
        return None;
    }
    let parts: Vec<String> = rep
        .compress_levels
        .iter()
        .map(|l| match l.level {
            0 => format!("raw {} chunks {}", l.chunks, human_bytes(l.bytes_in)),
            n => format!("zstd {n} {} chunks {} -> {}", l.chunks, human_bytes(l.bytes_in), human_bytes(l.bytes_out)),
        })
        .collect();
    let how = if rep.compress_stream { "streams" } else { "chunk by chunk" };
    Some(format!("compressed ({how}): {}", parts.join(", ")))
}

/// The log of `ferry serve`: a line (or with `--json` an event) per session.
#[derive(Debug)]
pub struct ServeLog {
    /// NDJSON events instead of lines.
    pub json: bool,
}

impl ferry_replicate::target::ServeObserver for ServeLog {
    fn session_done(&self, report: &SessionReport) {
        session_done(report, self.json);
    }
    fn accept_failed(&self, error: &std::io::Error) {
        eprintln!("ferry serve: accept failed: {error}");
    }
}

/// The rate in force changed (`--bwlimit`, `--bwlimit-rule`): a `bwlimit` event, or a line
/// of `who` (`ferry`, `ferry serve`).
pub fn bwlimit_changed(ch: &ferry_replicate::throttle::RateChange, json_out: bool, who: &str) {
    if json_out {
        print_json(&json!({
            "event": "bwlimit",
            "rate": ch.rate.0,
            "rule": ch.rule,
            "previous": ch.previous.map(|r| r.0),
        }));
    } else {
        let by = ch.rule.as_ref().map_or("--bwlimit".to_string(), |r| format!("rule {r:?}"));
        match ch.previous {
            Some(p) => eprintln!("{who}: bandwidth limit now {} (was {p}), by {by}", ch.rate),
            None => eprintln!("{who}: bandwidth limit {}, by {by}", ch.rate),
        }
    }
}

/// Log a finished server session.
pub fn session_done(rep: &SessionReport, json_out: bool) {
    if json_out {
        let mut v = serde_json::to_value(rep).expect("json");
        v["event"] = json!("session_done");
        v["stages"] = stages_json(&rep.stages);
        print_json(&v);
    } else {
        match &rep.error {
            Some(e) => eprintln!("ferry serve: session from {} ({}) failed: {e}", rep.peer, rep.peer_name),
            None => eprintln!(
                "ferry serve: session from {} ({}) replica {} point {}: {} chunks, {} written, {} zero chunks in {:.2} s",
                rep.peer,
                rep.peer_name,
                rep.replica.as_deref().unwrap_or("-"),
                rep.point_id.map_or("-".into(), |p| p.to_string()),
                rep.chunks_written,
                human_bytes(rep.bytes_written),
                rep.chunks_zero,
                rep.duration_s
            ),
        }
    }
}

/// Print what a plan found: per disk, what would be read and moved.
pub fn print_plan(cfg: &ReplicateConfig, rep: &JobReport, json_out: bool) {
    let share = |c: &DiskCounters| if c.size == 0 { 0.0 } else { c.bytes_data as f64 / c.size as f64 };
    if json_out {
        let disks: Vec<Value> = rep
            .disks
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).expect("json");
                v["share"] = json!(share(c));
                v["expected_wire_bytes"] = json!(c.bytes_sent);
                v
            })
            .collect();
        let t = totals(&rep.disks);
        print_json(&json!({
            "event": "plan",
            "replica": cfg.replica,
            "chunk_size": rep.chunk_size,
            "resumes_interrupted_session": rep.resumed,
            "disks": disks,
            "totals": t,
            "expected_wire_bytes": t.bytes_sent,
            "share": share(&t),
        }));
        return;
    }
    println!(
        "{:<16} {:<7} {:>10} {:>8} {:>8} {:>8} {:>9} {:>11} {:>7} {:>11}",
        "disk", "mode", "size", "chunks", "to send", "zero", "unchanged", "to move", "share", "wire bytes"
    );
    let mut all = rep.disks.clone();
    all.push(totals(&rep.disks));
    for c in &all {
        println!(
            "{:<16} {:<7} {:>10} {:>8} {:>8} {:>8} {:>9} {:>11} {:>6.2}% {:>11}",
            c.disk,
            c.mode.map_or("", ferry_planner::PlanMode::as_str),
            human_bytes(c.size),
            c.chunks_planned,
            c.chunks_sent,
            c.chunks_zero,
            c.chunks_unchanged,
            human_bytes(c.bytes_data),
            100.0 * share(c),
            human_bytes(c.bytes_sent)
        );
    }
    println!("chunk size {} KiB; nothing was sent and the target was not changed", rep.chunk_size / 1024);
}

/// Prints warnings and notices to stderr, nothing else (for `ferry plan`).
#[derive(Debug, Default)]
pub struct WarningsOnly {
    warned: AtomicBool,
}

impl WarningsOnly {
    /// True when a warning was reported.
    pub fn warned(&self) -> bool {
        self.warned.load(Ordering::Relaxed)
    }
}

impl Observer for WarningsOnly {
    fn event(&self, e: &JobEvent) {
        match e {
            JobEvent::Warning(m) => {
                self.warned.store(true, Ordering::Relaxed);
                eprintln!("warning: {m}");
            }
            JobEvent::Notice(m) => eprintln!("note: {m}"),
            _ => {}
        }
    }
}
