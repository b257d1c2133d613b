//! `ferry replicate --from-backup` and `ferry plan --from-backup`: flags into
//! a [`BackupJob`], the job run by ferry-backup, its events printed (see
//! docs/BACKUP.md).

use std::process::ExitCode;

use ferry_backup::job::{self, BackupJob, BackupObserver, BackupOutcome, NOTHING_NEW};
use ferry_planner::backup::BackupPoint;
use ferry_replicate::source::{JobEvent, JobReport, Observer};

use crate::report::{self, JobObserver, Status};
use crate::time::format_rfc3339;
use crate::{job_observer, parse_duration, replicate_config, target, usage, ReplicateArgs, EXIT_OK, EXIT_WARNING};

/// Flag checks shared by `replicate` and `plan`, then the job.
fn backup_job(a: &ReplicateArgs) -> anyhow::Result<BackupJob> {
    if !a.sources.is_empty() {
        return Err(usage(
            "--source and --from-backup exclude each other: replicate either from disks (--source) or from the \
             restore points of backup repositories (--from-backup REPO --vm NAME)",
        ));
    }
    if a.from_backup.is_empty() {
        return Err(usage("--vm and --catch-up go with --from-backup REPO"));
    }
    let Some(vm) = a.vm.clone() else {
        return Err(usage("--from-backup needs --vm NAME: the VM whose restore points to replicate"));
    };
    if !a.cbt.is_empty() || a.mode != "auto" || a.point_time.is_some() {
        return Err(usage(
            "--from-backup chooses the mode and the point time itself (from the backup): drop --cbt, --mode and \
             --point-time",
        ));
    }
    Ok(BackupJob {
        repos: a.from_backup.clone(),
        vm,
        catch_up: a.catch_up,
        base: replicate_config(a)?,
        retry_for: parse_duration(&a.retry_for)?,
    })
}

/// `ferry plan --from-backup ...`: the points that would be replicated and, for each, what would move.
pub fn plan_from_backup(a: ReplicateArgs) -> anyhow::Result<ExitCode> {
    let job = backup_job(&a)?;
    let obs =
        PlanLog { json: a.json, vm: job.vm.clone(), base: job.base.clone(), warnings: report::WarningsOnly::default() };
    match job::plan(&job, &target(&a)?, &obs)? {
        BackupOutcome::NothingNew { .. } => {
            if a.json {
                report::print_json(&serde_json::json!({"event": "warning", "message": NOTHING_NEW}));
            } else {
                eprintln!("warning: {NOTHING_NEW}");
            }
            Ok(ExitCode::from(EXIT_WARNING))
        }
        BackupOutcome::Done(_) => Ok(ExitCode::from(if obs.warnings.warned() { EXIT_WARNING } else { EXIT_OK })),
    }
}

/// Prints each planned point.
struct PlanLog {
    json: bool,
    vm: String,
    base: ferry_replicate::source::ReplicateConfig,
    warnings: report::WarningsOnly,
}

impl Observer for PlanLog {
    fn event(&self, e: &JobEvent) {
        self.warnings.event(e);
    }
}

impl BackupObserver for PlanLog {
    fn point_start(&self, p: &BackupPoint, how: &str, _index: usize, _count: usize) {
        if self.json {
            report::print_json(&serde_json::json!({
                "event": "backup_point", "backup_point": p.label(), "vm": self.vm,
                "point_time": format_rfc3339(p.time_ns), "moves": how,
            }));
        } else {
            println!("restore point {} of VM {:?} ({}): moves {how}", p.label(), self.vm, format_rfc3339(p.time_ns));
        }
    }

    fn point_done(&self, _p: &BackupPoint, rep: &JobReport) {
        report::print_plan(&self.base, rep, self.json);
    }
}

/// Run `ferry replicate --from-backup ...`.
pub fn replicate_from_backup(a: ReplicateArgs) -> anyhow::Result<ExitCode> {
    let job = backup_job(&a)?;
    let obs = ReplicateLog { json: a.json, vm: job.vm.clone(), inner: job_observer(a.json) };
    let outcome = target(&a).and_then(|t| Ok(job::replicate(&job, &t, &obs)?));
    let base = &job.base;
    match outcome {
        Err(e) => Ok(obs.inner.finish_err(base, &e)),
        Ok(BackupOutcome::NothingNew { latest }) => {
            let (point_id, point_time_ns) = latest.unwrap_or((0, 0));
            let rep = JobReport {
                disks: Vec::new(),
                duration_s: 0.0,
                stages: Vec::new(),
                point_id,
                point_time_ns,
                backend: "none".into(),
                resumed: false,
                chunk_size: 0,
                wire_bytes: 0,
                compress_auto: None,
                compress_levels: Vec::new(),
                compress_stream: false,
                streams: 0,
                streams_at_start: 0,
                stream_bytes: Vec::new(),
            };
            Ok(obs.inner.finish_ok(base, &rep, Status::Warning))
        }
        Ok(BackupOutcome::Done(rep)) => {
            let status = if obs.inner.warned() { Status::Warning } else { Status::Ok };
            Ok(obs.inner.finish_ok(base, &rep, status))
        }
    }
}

/// The job's events as `replicate` prints them, plus a line or event per backup point.
struct ReplicateLog {
    json: bool,
    vm: String,
    inner: Box<dyn JobObserver>,
}

impl Observer for ReplicateLog {
    fn event(&self, e: &JobEvent) {
        self.inner.as_observer().event(e);
    }
}

impl BackupObserver for ReplicateLog {
    fn point_start(&self, p: &BackupPoint, how: &str, index: usize, count: usize) {
        self.event(&JobEvent::Notice(format!(
            "restore point {} of VM {:?} ({}), {} of {count}: moving {how}",
            p.label(),
            self.vm,
            format_rfc3339(p.time_ns),
            index + 1
        )));
    }

    fn point_done(&self, p: &BackupPoint, rep: &JobReport) {
        let totals = report::totals(&rep.disks);
        if self.json {
            report::print_json(&serde_json::json!({
                "event": "point_done",
                "backup_point": p.label(),
                "vm": self.vm,
                "point_id": rep.point_id,
                "point_time": format_rfc3339(rep.point_time_ns),
                "totals": totals,
                "disks": rep.disks,
            }));
        } else {
            eprintln!(
                "backup point {} -> replica point {} ({}): {} chunks sent",
                p.label(),
                rep.point_id,
                format_rfc3339(rep.point_time_ns),
                totals.chunks_sent
            );
        }
    }
}
