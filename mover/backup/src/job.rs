//! Replicating a VM's backup points: which points, in which order, and each
//! one as a replica point with its backup's time.
//!
//! - The replica's latest point decides what is new; without `catch_up` only
//!   the newest backup point goes, with it every newer point, oldest first.
//! - An interrupted session of the replica is finished first with the backup
//!   point it was for (its point time names it): resuming it with another
//!   point would mix two states in one restore point.
//! - Nothing new is not an error: the outcome says so, and `replicate` warns.

use std::path::PathBuf;
use std::time::Duration;

use ferry_planner::backup::{self as plan, BackupPoint};
use ferry_planner::time::format_rfc3339;
use ferry_replicate::source::{JobEvent, JobReport, Observer, ReplicateConfig};
use ferry_replicate::Target;

use crate::error::{BackupError, Result};
use crate::repo::{self, Inventory};

/// The warning of a run that found nothing new (exit 3).
pub const NOTHING_NEW: &str = "latest restore point already replicated";

/// One replica-from-backup job.
#[derive(Debug, Clone)]
pub struct BackupJob {
    /// The repositories to look in.
    pub repos: Vec<PathBuf>,
    /// The VM whose points to replicate.
    pub vm: String,
    /// Every point newer than the replica's latest (else only the newest).
    pub catch_up: bool,
    /// Settings of each point's replication; disks, mode and point time come
    /// from the backup point.
    pub base: ReplicateConfig,
    /// How long each point's replication keeps reconnecting.
    pub retry_for: Duration,
}

/// Receives what a backup job does, besides each replication's own events.
pub trait BackupObserver: Observer {
    /// Point `index` of `count` is about to be replicated (or planned); `how`
    /// says how its changes are found.
    fn point_start(&self, point: &BackupPoint, how: &str, index: usize, count: usize);
    /// The point was replicated (or planned) as `rep` says.
    fn point_done(&self, point: &BackupPoint, rep: &JobReport);
}

/// How a backup job ended.
#[derive(Debug)]
pub enum BackupOutcome {
    /// Nothing new: the replica holds the newest backup point already. Its
    /// latest point (id, point time), if any.
    NothingNew {
        /// The replica's latest point.
        latest: Option<(u64, i64)>,
    },
    /// Points were replicated (or planned); the report of the last one.
    Done(JobReport),
}

/// The points to move, in order, the replica's latest point time, and the inventory.
struct Selection {
    inv: Inventory,
    chosen: Vec<BackupPoint>,
    latest: Option<(u64, i64)>,
}

fn select(job: &BackupJob, target: &Target, obs: &dyn Observer, finish_pending: bool) -> Result<Selection> {
    let info = target.replica_info(&job.base.replica)?;
    let latest = (info.latest_point > 0).then_some((info.latest_point, info.latest_point_time_ns));
    let inv = repo::scan(&job.repos)?;
    let latest_ns = latest.map(|l| l.1);
    let mut chosen: Vec<BackupPoint> =
        plan::select(&inv.points, &job.vm, latest_ns, job.catch_up)?.into_iter().cloned().collect();
    let pending = info.interrupted.then_some(info.pending_point_time_ns);
    if let Some(t) = pending.filter(|&t| finish_pending && chosen.first().map(|p| p.time_ns) != Some(t)) {
        let Some(p) = inv.points.iter().find(|p| p.vm == job.vm && p.time_ns == t) else {
            return Err(BackupError::Repository(format!(
                "replica {:?} has an interrupted session (point time {}) that is no restore point of VM {:?} \
                 in these repositories: undo it with `ferry points rollback --incomplete --yes` first",
                job.base.replica,
                format_rfc3339(t),
                job.vm
            )));
        };
        obs.event(&JobEvent::Notice(format!(
            "replica {:?} has an interrupted session for restore point {} ({}): finishing it first",
            job.base.replica,
            p.label(),
            format_rfc3339(t)
        )));
        chosen.retain(|c| c.time_ns > t);
        chosen.insert(0, p.clone());
    }
    Ok(Selection { inv, chosen, latest })
}

/// Replicate the new backup points of `job.vm` to `target`, each as its own
/// replica point carrying the backup's point time.
pub fn replicate(job: &BackupJob, target: &Target, obs: &dyn BackupObserver) -> Result<BackupOutcome> {
    let Selection { inv, chosen, latest } = select(job, target, obs, true)?;
    if chosen.is_empty() {
        let newest = inv.points.iter().filter(|p| p.vm == job.vm).map(|p| p.time_ns).max().unwrap_or(0);
        obs.event(&JobEvent::Notice(format!(
            "VM {:?}: the newest backup point is from {}; replica {:?} is at {}",
            job.vm,
            format_rfc3339(newest),
            job.base.replica,
            format_rfc3339(latest.map_or(0, |l| l.1))
        )));
        obs.event(&JobEvent::Warning(NOTHING_NEW.into()));
        return Ok(BackupOutcome::NothingNew { latest });
    }
    run_points(job, target, obs, &inv, &chosen, latest, false)
}

/// What [`replicate`] would move, point by point, without changing the
/// target. Later points are planned against the replica as it is now: their
/// cbt extents are exact, their digest figures are measured against the
/// replica's current state.
pub fn plan(job: &BackupJob, target: &Target, obs: &dyn BackupObserver) -> Result<BackupOutcome> {
    let Selection { inv, chosen, latest } = select(job, target, obs, false)?;
    if chosen.is_empty() {
        return Ok(BackupOutcome::NothingNew { latest });
    }
    run_points(job, target, obs, &inv, &chosen, latest, true)
}

/// Replicate (or plan) `chosen` in order, each point against the replica as
/// the previous one leaves it; the report of the last one.
fn run_points(
    job: &BackupJob,
    target: &Target,
    obs: &dyn BackupObserver,
    inv: &Inventory,
    chosen: &[BackupPoint],
    latest: Option<(u64, i64)>,
    plan_only: bool,
) -> Result<BackupOutcome> {
    let mut latest_ns = latest.map(|l| l.1);
    let mut last = None;
    for (i, p) in chosen.iter().enumerate() {
        let prepared = repo::prepare(inv, p, latest_ns)?;
        obs.point_start(p, &prepared.how, i, chosen.len());
        let mut cfg = ReplicateConfig { disks: prepared.disks.clone(), point_time_ns: p.time_ns, ..job.base.clone() };
        let rep = if plan_only {
            cfg.plan_only = true;
            if i > 0 {
                // The replica is not at this point's base yet: checking the change list against it would fail.
                cfg.verify_samples = 0;
            }
            target.run(&cfg, obs)?
        } else {
            target.run_with_retry(&cfg, obs, job.retry_for)?
        };
        drop(prepared);
        latest_ns = Some(p.time_ns);
        obs.point_done(p, &rep);
        last = Some(rep);
    }
    Ok(BackupOutcome::Done(last.expect("at least one point")))
}
