//! `ferry replicate --from-backup`: replica from the restore points of backup
//! repositories (see docs/BACKUP.md). Each backup point becomes one replica
//! point carrying the backup's point time.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::anyhow;
use ferry_mover::source::{JobEvent, JobReport, ReplicateConfig};
use ferry_mover::target::datastore::Datastore;
use ferry_mover::TargetSpec;
use ferry_planner::backup as plan;

use crate::report::{self, JobObserver, JsonObserver, Status, TextObserver};
use crate::time::format_rfc3339;
use crate::{replicate_config, run_job, serve_config, usage, ReplicateArgs};

/// The message of a run that found nothing new (exit 3).
pub const NOTHING_NEW: &str = "latest restore point already replicated";

/// What a local replica holds: its latest restore point (id, point time),
/// and the point time of an interrupted session, if any.
type ReplicaState = (Option<(u64, i64)>, Option<i64>);

fn replica_state(
    a: &ReplicateArgs,
    spec: &TargetSpec,
    serve_cfg: &ferry_mover::target::ServeConfig,
) -> anyhow::Result<ReplicaState> {
    let replica = a.replica.as_str();
    let dir = match spec {
        TargetSpec::Local(dir) => dir,
        TargetSpec::Remote(_) => {
            // A plan-only session: the target answers without changing anything.
            let c = ferry_mover::connect(spec, a.token_file.as_deref(), serve_cfg, false)?;
            let info = ferry_mover::source::replica_info(c.sock, &c.peer, c.auth, replica)?;
            if let Some(h) = c.local {
                let _ = h.join();
            }
            let latest = (info.latest_point > 0).then_some((info.latest_point, info.latest_point_time_ns));
            return Ok((latest, info.interrupted.then_some(info.pending_point_time_ns)));
        }
    };
    if !dir.join("ferry-datastore.json").exists() || !dir.join(replica).join("replica.json").exists() {
        return Ok((None, None));
    }
    let ds = Datastore::open(dir)?;
    let r = ds.replica(replica)?;
    let latest = r.catalog()?.points.last().map(|p| (p.id, p.point_time_ns));
    Ok((latest, r.session()?.map(|s| s.point_time_ns)))
}

/// Flag checks shared by `replicate` and `plan`; returns the VM.
fn check_args(a: &ReplicateArgs) -> anyhow::Result<String> {
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
    Ok(vm)
}

/// `ferry plan --from-backup ...`: the points that would be replicated and, for each, what would move.
/// Later points are planned against the replica as it is now (their cbt extents are exact; digest
/// figures are measured against the replica's current state).
pub fn plan_from_backup(a: ReplicateArgs) -> anyhow::Result<ExitCode> {
    let vm = check_args(&a)?;
    let base = replicate_config(&a)?;
    let spec = TargetSpec::parse(&a.target)?;
    let (latest, _pending) = replica_state(&a, &spec, &serve_config(&a.io)?)?;
    let inv = ferry_mover::backup::scan(&a.from_backup)?;
    let mut latest_ns = latest.map(|l| l.1);
    let chosen: Vec<plan::BackupPoint> = plan::select(&inv.points, &vm, latest_ns, a.catch_up)
        .map_err(|e| ferry_mover::MoveError::Config(e.to_string()))?
        .into_iter()
        .cloned()
        .collect();
    if chosen.is_empty() {
        if a.json {
            report::print_json(&serde_json::json!({"event": "warning", "message": NOTHING_NEW}));
        } else {
            eprintln!("warning: {NOTHING_NEW}");
        }
        return Ok(ExitCode::from(3));
    }
    let mut warned = false;
    for (i, p) in chosen.iter().enumerate() {
        let prepared = ferry_mover::backup::prepare(&inv, p, latest_ns)?;
        let mut cfg: ReplicateConfig = base.clone();
        cfg.disks = prepared.disks.clone();
        cfg.point_time_ns = p.time_ns;
        cfg.plan_only = true;
        if i > 0 {
            // The replica is not at this point's base yet: checking the change list against it would fail.
            cfg.verify_samples = 0;
        }
        if a.json {
            report::print_json(&serde_json::json!({
                "event": "backup_point", "backup_point": p.label(), "vm": vm,
                "point_time": format_rfc3339(p.time_ns), "moves": prepared.how,
            }));
        } else {
            println!(
                "restore point {} of VM {vm:?} ({}): moves {}",
                p.label(),
                format_rfc3339(p.time_ns),
                prepared.how
            );
        }
        let c = ferry_mover::connect(&spec, a.token_file.as_deref(), &serve_config(&a.io)?, false)?;
        let obs = report::WarningsOnly::default();
        let r = ferry_mover::source::replicate(c.sock, &c.peer, c.auth, &cfg, &obs);
        let local_error = c.local.and_then(|h| h.join().ok()).and_then(|r| r.error);
        let rep = r.map_err(|e| crate::with_local(e, local_error))?;
        report::print_plan(&cfg, &rep, a.json);
        warned |= obs.warned();
        latest_ns = Some(p.time_ns);
    }
    Ok(ExitCode::from(if warned { 3 } else { 0 }))
}

/// Run `ferry replicate --from-backup ...`.
pub fn replicate_from_backup(a: ReplicateArgs) -> anyhow::Result<ExitCode> {
    let vm = check_args(&a)?;
    let base = replicate_config(&a)?;
    let spec = TargetSpec::parse(&a.target)?;
    let serve_cfg = serve_config(&a.io)?;
    let obs: Box<dyn JobObserver> = if a.json {
        Box::new(JsonObserver::default())
    } else {
        Box::new(TextObserver::new(std::io::stderr().is_terminal()))
    };
    let fail = |e: anyhow::Error| Ok(obs.finish_err(&base, &e));
    let (latest, pending) = match replica_state(&a, &spec, &serve_cfg) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let inv = match ferry_mover::backup::scan(&a.from_backup) {
        Ok(i) => i,
        Err(e) => return fail(anyhow!(e)),
    };
    let mut latest_ns = latest.map(|l| l.1);
    let mut chosen: Vec<plan::BackupPoint> = match plan::select(&inv.points, &vm, latest_ns, a.catch_up) {
        Ok(c) => c.into_iter().cloned().collect(),
        Err(e) => return fail(anyhow!(ferry_mover::MoveError::Config(e.to_string()))),
    };
    // An interrupted session resumes where it stopped: it must go on with the same backup point,
    // or the replica would mix two points. Finish that point first.
    if let Some(t) = pending.filter(|&t| chosen.first().map(|p| p.time_ns) != Some(t)) {
        match inv.points.iter().find(|p| p.vm == vm && p.time_ns == t) {
            Some(p) => {
                obs.as_observer().event(&JobEvent::Notice(format!(
                    "replica {:?} has an interrupted session for restore point {} ({}): finishing it first",
                    a.replica,
                    p.label(),
                    format_rfc3339(t)
                )));
                chosen.retain(|c| c.time_ns > t);
                chosen.insert(0, p.clone());
            }
            None => {
                return fail(anyhow!(ferry_mover::MoveError::Config(format!(
                    "replica {:?} has an interrupted session (point time {}) that is no restore point of VM {vm:?} \
                     in these repositories: undo it with `ferry points rollback --incomplete --yes` first",
                    a.replica,
                    format_rfc3339(t)
                ))))
            }
        }
    }
    if chosen.is_empty() {
        let newest = inv.points.iter().filter(|p| p.vm == vm).map(|p| p.time_ns).max().unwrap_or(0);
        obs.as_observer().event(&JobEvent::Notice(format!(
            "VM {vm:?}: the newest backup point is from {}; replica {:?} is at {}",
            format_rfc3339(newest),
            a.replica,
            format_rfc3339(latest_ns.unwrap_or(0))
        )));
        obs.as_observer().event(&JobEvent::Warning(NOTHING_NEW.into()));
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
        };
        return Ok(obs.finish_ok(&base, &rep, Status::Warning));
    }
    let n = chosen.len();
    for (i, p) in chosen.iter().enumerate() {
        let prepared = match ferry_mover::backup::prepare(&inv, p, latest_ns) {
            Ok(x) => x,
            Err(e) => return fail(anyhow!(e)),
        };
        obs.as_observer().event(&JobEvent::Notice(format!(
            "restore point {} of VM {vm:?} ({}), {} of {n}: moving {}",
            p.label(),
            format_rfc3339(p.time_ns),
            i + 1,
            prepared.how
        )));
        let mut cfg: ReplicateConfig = base.clone();
        cfg.disks = prepared.disks.clone();
        cfg.point_time_ns = p.time_ns;
        let rep = match run_job(&a, &spec, &serve_cfg, &cfg, obs.as_ref()) {
            Ok(Ok(rep)) => rep,
            Ok(Err(e)) => return fail(anyhow!(e)),
            Err(e) => return fail(e),
        };
        drop(prepared);
        latest_ns = Some(p.time_ns);
        let totals = report::totals(&rep.disks);
        if a.json {
            report::print_json(&serde_json::json!({
                "event": "point_done",
                "backup_point": p.label(),
                "vm": vm,
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
        if i + 1 == n {
            let status = if obs.warned() { Status::Warning } else { Status::Ok };
            return Ok(obs.finish_ok(&cfg, &rep, status));
        }
    }
    unreachable!("the loop returns at its last point")
}
