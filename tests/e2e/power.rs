//! Power-loss tests (issue 17): the datastore on ferry-powerfs, a FUSE file
//! system that drops every write no fsync/fdatasync made durable when the
//! power is cut (tests/powerfs: its crate doc has the model). A SIGKILL keeps
//! the page cache; these tests do not.
//!
//! One seeded run is a sequence of rounds on one replica (64 KiB chunks, a
//! checkpoint every 256 KiB, retain 4) of disk d0 (1 MiB and a bit) and, from
//! a seeded round on, d1 (6 chunks or so; runs then name both disks or leave
//! one out, which carries it unchanged): the named disks change, then one
//! command runs with a power cut armed after a
//! seeded number of the file system's changing operations (uniform over the
//! command's length as measured by earlier uncut runs of its kind, and a
//! quarter beyond, so some commands finish): `ferry replicate` in full, cbt
//! or digest mode (a grown or shrunk source now and then), `ferry points
//! rollback --point`, or `ferry points prune --retain N`. At the cut the file
//! system freezes (nothing after it becomes durable), ferry is killed, and
//! the file system is mounted again from what a reboot finds. Then:
//! - recovery as a user would: after a replicate, the same replicate again
//!   (it resumes) or `points rollback --incomplete`; after a rollback or a
//!   prune, the same command again. Each must exit 0.
//! - "at a restore point": `points list` has exactly the points it must (the
//!   old ones, less those rolled back or pruned, plus any the interrupted or
//!   resumed session committed, the newest 4 kept) and no pending session,
//!   and every one of them exports byte for byte as the source was at it.
//! - "verify ok": `points verify` exits 0.
//!
//! Each run prints `power cuts: N, at a restore point: N, verify ok: N`.
//! FERRY_POWER_SEED replays a run; FERRY_POWER_CUTS sets the count of the
//! long mode (`power_cuts_long`, ignored by default: 200 cuts).
//! FERRY_POWER_CUT_RECOVERY=0 cuts no recovery command.
//! FERRY_POWER_REPLICATE_AFTER_INCOMPLETE=1 (off by default): after a cut
//! during `points rollback --incomplete`, half the time the user runs the
//! replicate instead of the rollback again. Issue 17 says that resumes a
//! session whose rollback was half done (no intent record), and this finds
//! it: a point that is not what the source was, within 21, 23 and 16 cuts
//! for seeds 1, 2 and 3. Turn it on by default once rollbacks have intent records.
//!
//! The harness is shown to fail: with FERRY_TEST_SKIP_FSYNC=undo (ferry-datastore
//! `fault`: the undo records are not fdatasynced before their chunks are
//! overwritten) it must find a point that no longer exports as it was; with
//! `map` (a digest map renamed into place unsynced) a map that does not check
//! out right after a cut (every `disks/*.digests` is checked then).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_powerfs::{PowerFs, State};
use ferry_tests::{ferry, Rng, Run};

const CHUNK: u64 = 65536;
const BASE_SIZE: u64 = 16 * CHUNK + 4321;
const RETAIN: usize = 4;
const REPLICA: &str = "vm";
/// Whether recovery commands are cut too (FERRY_POWER_CUT_RECOVERY=1 or 0 overrides).
const CUT_RECOVERY: bool = true;

fn seed() -> u64 {
    std::env::var("FERRY_POWER_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x90_4e_c0_75)
}

/// What one seeded run found.
#[derive(Debug, Default)]
struct Outcome {
    cuts: usize,
    at_point: usize,
    verify_ok: usize,
    /// Commands that finished before their cut came.
    uncut: usize,
    /// Cuts by command: full, cbt, digest, rollback, prune.
    by_kind: [usize; 5],
    /// Cuts that left an interrupted session (session.json) behind.
    interrupted: usize,
    /// Cuts during recovery commands (not counted in `cuts`: checked with the cut they follow).
    recovery_cuts: usize,
    /// Cuts during replicates that left a disk of the replica out (carried unchanged).
    left_out: usize,
    /// Cuts during rollbacks to a point without a disk the replica has (its image removed).
    disk_dropped: usize,
    /// The first thing found wrong, with the seed and round to replay it.
    failure: Option<String>,
}

impl Outcome {
    fn line(&self) -> String {
        format!("power cuts: {}, at a restore point: {}, verify ok: {}", self.cuts, self.at_point, self.verify_ok)
    }
}

/// Disk name -> contents.
type Disks = BTreeMap<String, Vec<u8>>;

#[derive(Debug, Clone)]
enum Action {
    /// A replicate naming `disks` (a disk of the replica left out is carried unchanged).
    Replicate {
        mode: &'static str,
        disks: Vec<String>,
    },
    Rollback {
        to: u64,
    },
    Prune {
        retain: usize,
    },
}

impl Action {
    /// Index of the command's kind, for its length estimate.
    fn kind(&self) -> usize {
        match self {
            Action::Replicate { mode: "full", .. } => 0,
            Action::Replicate { mode: "cbt", .. } => 1,
            Action::Replicate { .. } => 2,
            Action::Rollback { .. } => 3,
            Action::Prune { .. } => 4,
        }
    }
}

struct Harness {
    tmp: tempfile::TempDir,
    mnt: PathBuf,
    fs: Option<PowerFs>,
    rng: Rng,
    seed: u64,
    env: Vec<(String, String)>,
    /// The source disks as they are now: d0 from the start, d1 from a later round on.
    src: Disks,
    /// Every restore point the replica must have: id -> its disks as the source had them.
    points: BTreeMap<u64, Disks>,
    /// Per disk, the chunks changed since the replica's latest point; None (or absent): not
    /// known (after a rollback or a resize, or a disk the replica lacks), so no cbt run.
    cbt: BTreeMap<String, Option<BTreeSet<u64>>>,
    /// Changing operations of the longest uncut run of each kind of command (full, cbt,
    /// digest, rollback, prune, rollback --incomplete).
    est: [u64; 6],
    /// Cut the power during recovery commands too.
    cut_recovery: bool,
    /// Cuts during recovery commands.
    recovery_cuts: usize,
    /// After a cut during `points rollback --incomplete`, run the replicate sometimes.
    replicate_after_incomplete: bool,
    round: usize,
}

impl Harness {
    fn new(seed: u64, env: &[(&str, &str)], cut_recovery: bool) -> Harness {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs = PowerFs::mount(&mnt, State::new()).expect("mount ferry-powerfs");
        let mut rng = Rng::new(seed);
        let d0 = new_disk(&mut rng, BASE_SIZE);
        std::fs::write(tmp.path().join("d0.img"), &d0).expect("write source");
        Harness {
            tmp,
            mnt,
            fs: Some(fs),
            rng,
            seed,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            src: BTreeMap::from([("d0".to_string(), d0)]),
            points: BTreeMap::new(),
            cbt: BTreeMap::new(),
            est: [150, 60, 80, 60, 20, 40],
            cut_recovery,
            recovery_cuts: 0,
            replicate_after_incomplete: std::env::var("FERRY_POWER_REPLICATE_AFTER_INCOMPLETE").is_ok_and(|v| v == "1"),
            round: 0,
        }
    }

    fn ds(&self) -> PathBuf {
        self.mnt.join("ds")
    }

    fn src_path(&self, disk: &str) -> PathBuf {
        self.tmp.path().join(format!("{disk}.img"))
    }

    fn fs(&self) -> &PowerFs {
        self.fs.as_ref().expect("mounted")
    }

    fn cmd(&self, args: &[String]) -> Command {
        let mut c = ferry();
        c.args(args).stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Run to completion, no cut armed.
    fn run(&self, args: &[String]) -> Run {
        self.fs().disarm();
        self.cmd(args).output().expect("run ferry").into()
    }

    /// Run with a power cut armed; Ok(true) when the power was cut (ferry killed, file
    /// system mounted again from what survived), Ok(false) when the command finished first.
    fn run_with_cut(&mut self, args: &[String], kind: usize) -> Result<bool, String> {
        let est = self.est[kind];
        let at = 1 + self.rng.below(est + est / 4 + 1);
        let fs = self.fs.as_ref().expect("mounted");
        let start = fs.ops();
        fs.cut_after(at);
        let out = self.tmp.path().join("out.txt");
        let err = self.tmp.path().join("err.txt");
        let mut child = self
            .cmd(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawn ferry");
        let t = Instant::now();
        let status = loop {
            if fs.is_cut() {
                let _ = child.kill();
                break None;
            }
            if let Some(st) = child.try_wait().expect("wait") {
                break Some(st);
            }
            if t.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{args:?} ran for 2 minutes without the power cut after {at} operations"));
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        let _ = child.wait();
        let cut = fs.is_cut();
        fs.disarm();
        let used = fs.ops() - start;
        if !cut {
            let st = status.expect("exited");
            if !st.success() {
                return Err(format!(
                    "{args:?} failed without a power cut ({st}):\n{}\n{}",
                    std::fs::read_to_string(&out).unwrap_or_default(),
                    std::fs::read_to_string(&err).unwrap_or_default()
                ));
            }
            self.est[kind] = self.est[kind].max(used);
            return Ok(false);
        }
        let fs = self.fs.take().expect("mounted");
        let state = fs.power_cut().map_err(|e| format!("unmounting after the cut: {e}"))?;
        self.fs = Some(PowerFs::mount(&self.mnt, state).map_err(|e| format!("mounting after the cut: {e}"))?);
        Ok(true)
    }

    /// Every digest map the cut left checks out: an atomic replace (temporary file fsynced,
    /// renamed, directory fsynced) never leaves a torn one. A torn map would only be rebuilt
    /// by the next session, so nothing else here would notice it.
    fn check_maps(&self) -> Result<(), String> {
        let dir = self.ds().join(REPLICA).join("disks");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(()) };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "digests") && !ferry_datastore::digests::file_checks_out(&p) {
                return Err(format!("after the power cut, the digest map {} does not check out", p.display()));
            }
        }
        Ok(())
    }

    /// Change the named source disks before a replicate: a few chunks rewritten, zeroed or
    /// partly changed; now and then a new size.
    fn change_source(&mut self, disks: &[String]) {
        for disk in disks {
            let src = self.src.get_mut(disk).expect("a source disk");
            let size = src.len() as u64;
            let n = 1 + self.rng.below(4);
            for _ in 0..n {
                let c = self.rng.below(size.div_ceil(CHUNK));
                let off = c * CHUNK;
                let end = (off + CHUNK).min(size);
                let chunk = &mut src[off as usize..end as usize];
                match self.rng.below(3) {
                    0 => self.rng.fill(chunk),
                    1 => chunk.fill(0),
                    _ => {
                        let at = self.rng.below(chunk.len() as u64) as usize;
                        chunk[at] = chunk[at].wrapping_add(1);
                    }
                }
                if let Some(Some(set)) = self.cbt.get_mut(disk) {
                    set.insert(c);
                }
            }
            if self.rng.below(10) == 0 {
                let base = if disk == "d0" { BASE_SIZE } else { 6 * CHUNK };
                let new = base - 3 * CHUNK + self.rng.below(6 * CHUNK);
                let old = src.len();
                src.resize(new as usize, 0);
                if (new as usize) > old {
                    let mut tail = vec![0u8; new as usize - old];
                    self.rng.fill(&mut tail);
                    src[old..].copy_from_slice(&tail);
                }
                self.cbt.insert(disk.clone(), None);
            }
            std::fs::write(self.src_path(disk), &self.src[disk]).expect("write source");
        }
    }

    fn replicate_args(&self, mode: &str, disks: &[String]) -> Vec<String> {
        let mut a: Vec<String> = vec![];
        for d in disks {
            a.extend(["--source".to_string(), format!("{d}={}", self.src_path(d).display())]);
        }
        let rest: Vec<String> = [
            "--target",
            &self.ds().display().to_string(),
            "--replica",
            REPLICA,
            "--mode",
            mode,
            "--retain",
            &RETAIN.to_string(),
            "--retry-for",
            "0",
            "--checkpoint-every",
            "256K",
            "--no-map-cache",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.insert(0, "replicate".to_string());
        a.extend(rest);
        if mode == "cbt" {
            for d in disks {
                let list = self.tmp.path().join(format!("{d}.cbt.json"));
                let size = self.src[d].len() as u64;
                let extents: Vec<serde_json::Value> = self.cbt[d]
                    .as_ref()
                    .expect("cbt runs only with a known change list")
                    .iter()
                    .map(|&c| serde_json::json!({"offset": c * CHUNK, "length": (size - c * CHUNK).min(CHUNK)}))
                    .collect();
                let json = serde_json::json!({"disk_size": size, "extents": extents}).to_string();
                std::fs::write(&list, json).unwrap();
                a.extend(["--cbt".to_string(), format!("{d}={}", list.display())]);
            }
        }
        a
    }

    fn points_args(&self, sub: &str, extra: &[String]) -> Vec<String> {
        let mut a: Vec<String> = ["points", sub, "--target", &self.ds().display().to_string(), "--replica", REPLICA]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().cloned());
        a
    }

    fn action_args(&self, a: &Action) -> Vec<String> {
        match a {
            Action::Replicate { mode, disks } => self.replicate_args(mode, disks),
            Action::Rollback { to } => {
                self.points_args("rollback", &["--point".into(), to.to_string(), "--yes".into()])
            }
            Action::Prune { retain } => self.points_args("prune", &["--retain".into(), retain.to_string()]),
        }
    }

    /// The next command: mostly replicates; a rollback or a prune once there are points to lose.
    fn next_action(&mut self) -> Action {
        let ids: Vec<u64> = self.points.keys().copied().collect();
        let r = self.rng.below(10);
        if ids.len() >= 2 && r == 0 {
            // Half the time back to a point with fewer disks than the latest, when there is one
            // (the rollback removes the newer disk's image).
            let latest = self.points.values().last().map_or(0, |p| p.len());
            let fewer: Vec<u64> = self.points.iter().filter(|(_, p)| p.len() < latest).map(|(&i, _)| i).collect();
            if !fewer.is_empty() && self.rng.below(2) == 0 {
                return Action::Rollback { to: fewer[self.rng.below(fewer.len() as u64) as usize] };
            }
            return Action::Rollback { to: ids[self.rng.below(ids.len() as u64 - 1) as usize] };
        }
        if ids.len() >= 3 && r == 1 {
            return Action::Prune { retain: 2 + self.rng.below(2) as usize };
        }
        if ids.is_empty() {
            return Action::Replicate { mode: "full", disks: vec!["d0".into()] };
        }
        if !self.src.contains_key("d1") && self.rng.below(8) == 0 {
            // A second disk, from now on: the next runs add it (new disk: full copy), then
            // name both or leave one out (carried into the point unchanged).
            let size = 5 * CHUNK + 100 + self.rng.below(3 * CHUNK);
            let d1 = new_disk(&mut self.rng, size);
            std::fs::write(self.src_path("d1"), &d1).expect("write source");
            self.src.insert("d1".into(), d1);
        }
        let disks: Vec<String> = match (self.src.contains_key("d1"), self.rng.below(10)) {
            (false, _) => vec!["d0".into()],
            (true, 0 | 1) => vec!["d0".into()],
            (true, 2) => vec!["d1".into()],
            (true, _) => vec!["d0".into(), "d1".into()],
        };
        self.change_source(&disks);
        let cbt_known = disks.iter().all(|d| self.cbt.get(d).is_some_and(|c| c.is_some()));
        let modes: &[&'static str] = if cbt_known { &["full", "cbt", "digest"] } else { &["full", "digest"] };
        Action::Replicate { mode: modes[self.rng.below(modes.len() as u64) as usize], disks }
    }

    /// The point ids in the catalog, and whether a session is pending.
    fn catalog(&self) -> Result<(Vec<u64>, bool), String> {
        let r = self.run(&self.points_args("list", &["--json".into()]));
        if r.code != 0 {
            // No replica yet (the first session's replica.json did not survive).
            if self.points.is_empty() && r.stderr.contains("no replica") {
                return Ok((vec![], false));
            }
            return Err(format!("points list exited {}: {}", r.code, r.stderr));
        }
        let v: serde_json::Value = serde_json::from_str(&r.stdout).map_err(|e| format!("points list: {e}"))?;
        let ids = v["points"].as_array().into_iter().flatten().filter_map(|p| p["id"].as_u64()).collect();
        Ok((ids, v["interrupted_session"].as_bool() == Some(true)))
    }

    fn expect_ok(&self, args: &[String]) -> Result<Run, String> {
        let r = self.run(args);
        if r.code != 0 {
            return Err(format!("`ferry {}` exited {}:\n{}{}", args.join(" "), r.code, r.stdout, r.stderr));
        }
        Ok(r)
    }

    /// Run a recovery command to success. With cuts in recovery on, the power is cut during
    /// it too, at most 3 times in a row, each cut followed by the same command again.
    fn recover(&mut self, args: &[String], kind: usize) -> Result<(), String> {
        if self.cut_recovery {
            for _ in 0..3 {
                if !self.run_with_cut(args, kind)? {
                    return Ok(());
                }
                self.recovery_cuts += 1;
            }
        }
        self.expect_ok(args).map(|_| ())
    }

    /// `points rollback --incomplete` to success, cut like [`recover`](Self::recover); with
    /// `replicate_after_incomplete`, a cut rollback is followed half the time by the replicate
    /// instead (true), which must finish the rollback first or refuse.
    fn recover_incomplete(&mut self, action: &Action) -> Result<bool, String> {
        let args = self.points_args("rollback", &["--incomplete".into(), "--yes".into()]);
        if self.cut_recovery {
            for _ in 0..3 {
                if !self.run_with_cut(&args, 5)? {
                    return Ok(false);
                }
                self.recovery_cuts += 1;
                if self.replicate_after_incomplete && self.rng.below(2) == 0 {
                    self.recover(&self.action_args(action), action.kind())?;
                    return Ok(true);
                }
            }
        }
        self.expect_ok(&args).map(|_| false)
    }

    /// After a cut during `action`: recover as a user would, then check the points.
    /// Returns whether `points verify` exited 0 (Err: not at a restore point).
    fn recover_and_check(&mut self, action: &Action, old: &BTreeMap<u64, Disks>) -> Result<bool, String> {
        let old_ids: Vec<u64> = old.keys().copied().collect();
        let expected: Vec<u64> = match action {
            Action::Replicate { .. } => {
                let mut resume = old_ids.is_empty() || self.rng.below(3) != 0;
                if resume {
                    self.recover(&self.action_args(action), action.kind())?;
                } else {
                    resume = self.recover_incomplete(action)?;
                }
                let (ids, _) = self.catalog()?;
                // Points the interrupted session (and the resumed one) committed: the source as it is now.
                let max_old = old_ids.last().copied().unwrap_or(0);
                let new: Vec<u64> = ids.iter().copied().filter(|&i| i > max_old).collect();
                if resume && new.is_empty() {
                    return Err("the resumed session made no point".into());
                }
                for &id in &new {
                    let p = self.point_made(action, old);
                    self.points.insert(id, p);
                }
                let all: Vec<u64> = old_ids.iter().copied().chain(new.iter().copied()).collect();
                // Retention runs after the commit: a cut between them (then `rollback --incomplete`,
                // which finds the session committed) keeps older points until the next commit or
                // prune. A point kept longer is still exact; one dropped too early is not allowed.
                let keep = ids.len().clamp(RETAIN.min(all.len()), all.len());
                let expected = all[all.len() - keep..].to_vec();
                // The named disks of the replica's latest point are the source now exactly when
                // a point was made.
                if !new.is_empty() {
                    self.committed(action);
                }
                expected
            }
            Action::Rollback { to } => {
                self.recover(&self.action_args(action), action.kind())?;
                self.cbt.clear();
                old_ids.iter().copied().filter(|i| i <= to).collect()
            }
            Action::Prune { retain } => {
                self.recover(&self.action_args(action), action.kind())?;
                old_ids[old_ids.len().saturating_sub(*retain)..].to_vec()
            }
        };
        self.check_points(&expected)?;
        let v = self.run(&self.points_args("verify", &[]));
        Ok(v.code == 0 || expected.is_empty() && v.code == 2)
    }

    /// The catalog holds exactly `expected`, no session is pending, and every point exports
    /// byte for byte as the source was at it.
    fn check_points(&mut self, expected: &[u64]) -> Result<(), String> {
        let (ids, pending) = self.catalog()?;
        if pending {
            return Err("a session is still pending after recovery".into());
        }
        if ids != expected {
            return Err(format!("the catalog has points {ids:?}, it must have {expected:?}"));
        }
        self.points.retain(|id, _| ids.contains(id));
        let out = self.tmp.path().join("export.img");
        for (&id, disks) in &self.points {
            for (disk, want) in disks {
                let _ = std::fs::remove_file(&out);
                let args = self.points_args(
                    "export",
                    &[
                        "--disk".into(),
                        disk.clone(),
                        "--point".into(),
                        id.to_string(),
                        "--out".into(),
                        out.display().to_string(),
                    ],
                );
                self.expect_ok(&args)?;
                let got = std::fs::read(&out).map_err(|e| format!("reading the export: {e}"))?;
                if got.len() != want.len() {
                    return Err(format!(
                        "point {id} disk {disk} exports {} bytes, the source had {}",
                        got.len(),
                        want.len()
                    ));
                }
                if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
                    return Err(format!(
                        "point {id} disk {disk} differs from the source at it from byte {at} (chunk {})",
                        at as u64 / CHUNK
                    ));
                }
            }
        }
        Ok(())
    }

    /// Rounds until `cuts` power cuts, or the first failure.
    fn run_cuts(mut self, cuts: usize) -> Outcome {
        let mut o = Outcome::default();
        while o.cuts < cuts {
            self.round += 1;
            let action = self.next_action();
            let args = self.action_args(&action);
            let old = self.points.clone();
            let cut = match self.run_with_cut(&args, action.kind()) {
                Ok(c) => c,
                Err(e) => {
                    o.failure = Some(self.failure(&action, &e));
                    break;
                }
            };
            if !cut {
                o.uncut += 1;
                if let Err(e) = self.apply_uncut(&action, &old) {
                    o.failure = Some(self.failure(&action, &e));
                    break;
                }
                continue;
            }
            o.cuts += 1;
            o.by_kind[action.kind()] += 1;
            if let Err(e) = self.check_maps() {
                o.failure = Some(self.failure(&action, &e));
                break;
            }
            let latest_disks = old.values().last().map_or(0, |p| p.len());
            match &action {
                Action::Replicate { disks, .. } if disks.len() < latest_disks => o.left_out += 1,
                Action::Rollback { to } if old.get(to).is_some_and(|p| p.len() < latest_disks) => o.disk_dropped += 1,
                _ => {}
            }
            if matches!(action, Action::Replicate { .. }) && self.catalog().is_ok_and(|(_, pending)| pending) {
                o.interrupted += 1;
            }
            match self.recover_and_check(&action, &old) {
                Ok(verified) => {
                    o.at_point += 1;
                    if verified {
                        o.verify_ok += 1;
                    } else {
                        o.failure = Some(self.failure(&action, "points verify did not exit 0"));
                        break;
                    }
                }
                Err(e) => {
                    o.failure = Some(self.failure(&action, &e));
                    break;
                }
            }
        }
        o.recovery_cuts = self.recovery_cuts;
        o
    }

    /// A command that finished: the model follows it.
    fn apply_uncut(&mut self, action: &Action, old: &BTreeMap<u64, Disks>) -> Result<(), String> {
        let (ids, pending) = self.catalog()?;
        if pending {
            return Err("a session is pending after a run that exited 0".into());
        }
        let max_old = old.keys().last().copied().unwrap_or(0);
        match action {
            Action::Replicate { .. } => {
                for id in ids.iter().filter(|&&i| i > max_old) {
                    let p = self.point_made(action, old);
                    self.points.insert(*id, p);
                }
                self.committed(action);
            }
            Action::Rollback { .. } => self.cbt.clear(),
            Action::Prune { .. } => {}
        }
        self.points.retain(|id, _| ids.contains(id));
        Ok(())
    }

    /// The point a replicate makes: the latest point's disks (those it leaves out are
    /// carried unchanged) with the named ones as the source has them now.
    fn point_made(&self, action: &Action, old: &BTreeMap<u64, Disks>) -> Disks {
        let Action::Replicate { disks, .. } = action else { unreachable!("only replicates make points") };
        let mut p = old.values().last().cloned().unwrap_or_default();
        for d in disks {
            p.insert(d.clone(), self.src[d].clone());
        }
        p
    }

    /// A replicate committed: its disks' change lists start again (the others' go on).
    fn committed(&mut self, action: &Action) {
        if let Action::Replicate { disks, .. } = action {
            for d in disks {
                self.cbt.insert(d.clone(), Some(BTreeSet::new()));
            }
        }
    }

    fn failure(&self, action: &Action, what: &str) -> String {
        format!("seed {} round {} ({action:?}): {what}", self.seed, self.round)
    }
}

/// A source disk of `size` bytes: random data, text-like runs and zeros (holes at the target).
fn new_disk(rng: &mut Rng, size: u64) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for (i, c) in d.chunks_mut(CHUNK as usize).enumerate() {
        match i % 4 {
            0 | 3 => rng.fill(c),
            1 => c.iter_mut().enumerate().for_each(|(j, b)| *b = b"ferry power "[j % 12]),
            _ => {}
        }
    }
    d
}

fn power_cuts(cuts: usize, seed: u64, env: &[(&str, &str)]) -> Option<Outcome> {
    if !ferry_powerfs::available() {
        eprintln!("power-loss test skipped: no /dev/fuse on this machine (FUSE is needed)");
        return None;
    }
    eprintln!("power cuts: seed {seed} (FERRY_POWER_SEED replays it)");
    let cut_recovery = std::env::var("FERRY_POWER_CUT_RECOVERY").map_or(CUT_RECOVERY, |v| v == "1");
    let o = Harness::new(seed, env, cut_recovery).run_cuts(cuts);
    let k = o.by_kind;
    eprintln!(
        "power cuts by command: full {}, cbt {}, digest {}, rollback {}, prune {}; {} left an interrupted \
         session; {} more during recovery; {} in runs leaving a disk out; {} in rollbacks dropping a disk; {} \
         commands finished before their cut",
        k[0], k[1], k[2], k[3], k[4], o.interrupted, o.recovery_cuts, o.left_out, o.disk_dropped, o.uncut
    );
    println!("{}", o.line());
    Some(o)
}

fn assert_all_good(o: &Outcome, cuts: usize) {
    if let Some(f) = &o.failure {
        panic!("{f}\n{}", o.line());
    }
    assert_eq!((o.cuts, o.at_point, o.verify_ok), (cuts, cuts, cuts), "{}", o.line());
}

/// 50 seeded power cuts across full, cbt and digest sessions, rollbacks and prunes: after each
/// the replica is at a restore point (once resumed or rolled back) and verify exits 0.
#[test]
fn power_cuts_leave_a_restore_point() {
    let Some(o) = power_cuts(50, seed(), &[]) else { return };
    assert_all_good(&o, 50);
}

/// The long mode: FERRY_POWER_CUTS cuts (default 200).
#[test]
#[ignore = "long: run with --ignored (FERRY_POWER_CUTS, FERRY_POWER_SEED)"]
fn power_cuts_long() {
    let cuts = std::env::var("FERRY_POWER_CUTS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let Some(o) = power_cuts(cuts, seed(), &[]) else { return };
    assert_all_good(&o, cuts);
}

/// A seeded run with one fdatasync of the target removed (ferry-datastore `fault`): the
/// harness must find a point that is not what the source was, within 50 cuts.
fn finds_missing_fsync(what: &str) {
    let Some(o) = power_cuts(50, seed(), &[(ferry_datastore::fault::SKIP_FSYNC_VAR, what)]) else { return };
    let f =
        o.failure.as_deref().unwrap_or_else(|| panic!("no failure found without the {what} fdatasync: {}", o.line()));
    // Found in the checks after a cut (not in a command that ran uncut): a point that is not
    // what the source was, a catalog without a point it must have, verify, or a recovery that
    // could not finish (for example CBT sampling finding chunks the replica lost: exit 3);
    // never the harness's own trouble.
    assert!(o.cuts >= 1 && o.at_point < o.cuts, "{f}\n{}", o.line());
    let harness = ["mounting after the cut", "ran for 2 minutes"];
    assert!(!harness.iter().any(|h| f.contains(h)), "{f}");
    eprintln!("without the {what} fdatasync the harness found, after {} power cut(s): {f}", o.cuts);
}

/// Without the fdatasync of undo records before their chunks are overwritten.
#[test]
fn power_cuts_find_a_missing_undo_fdatasync() {
    finds_missing_fsync("undo");
}

/// Without the fdatasync of the image at checkpoints and the commit.
#[test]
fn power_cuts_find_a_missing_image_fdatasync() {
    finds_missing_fsync("image");
}

/// Without the fsync of a digest map's temporary file before its rename (issue 20: the
/// sparse map file is written through a buffer, then fsynced, renamed, the directory
/// fsynced).
#[test]
fn power_cuts_find_a_missing_digest_map_fsync() {
    finds_missing_fsync("map");
}

/// A cbt session announces its planned chunks (Intent) and the target saves their old contents
/// ahead of the data. At the Commit the reads in flight complete and their records are
/// appended; their chunks are never overwritten, so no group-commit round syncs them, and the
/// commit used to record the undo file's extent in the catalog with those records only in the
/// page cache (the writer's round at the session's end came after it). A power cut right after
/// the catalog then left the file shorter than the catalog says, and every older point failed
/// to export. Here the session is killed right after the catalog and the power cut there.
/// Whether records are still unsynced at that moment depends on timing (this passed without the
/// fix in the runs tried); the writer test
/// `the_commit_makes_records_saved_ahead_durable_before_it_answers` pins the order.
#[test]
fn a_power_cut_right_after_the_catalog_keeps_the_undo_records_it_recorded() {
    if !ferry_powerfs::available() {
        eprintln!("power-loss test skipped: no /dev/fuse on this machine (FUSE is needed)");
        return;
    }
    let mut h = Harness::new(seed(), &[], false);
    let size = 1024 * CHUNK;
    let d0 = new_disk(&mut h.rng, size);
    std::fs::write(h.src_path("d0"), &d0).unwrap();
    h.src.insert("d0".into(), d0);
    let disks = vec!["d0".to_string()];
    h.expect_ok(&h.replicate_args("full", &disks)).unwrap();
    let mut cut = 0;
    let mut stop = 0;
    for _ in 0..60 {
        stop += 1;
        // Every chunk announced and none changed: old contents saved ahead, nothing sent.
        h.cbt.insert("d0".into(), Some((0..size / CHUNK).collect()));
        let mut args = h.replicate_args("cbt", &disks);
        let every = args.iter().position(|a| a == "--checkpoint-every").unwrap() + 1;
        args[every] = "16M".into();
        h.fs().disarm();
        let out = h.cmd(&args).env("FERRY_TEST_STOP_AFTER", stop.to_string()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(0) {
            // Fewer steps than `stop` this time: a point made, count again.
            stop = 0;
            continue;
        }
        assert_eq!(out.status.code(), Some(ferry_datastore::points::TEST_STOP_EXIT), "{stderr}");
        if !stderr.contains(&format!("step {stop}: session: catalog written")) {
            // Stopped at a checkpoint: start again from the latest point.
            h.expect_ok(&h.points_args("rollback", &["--incomplete".into(), "--yes".into()])).unwrap();
            continue;
        }
        // Killed right after the commit point: cut the power, then every point must check out.
        let state = h.fs.take().expect("mounted").power_cut().expect("power cut");
        h.fs = Some(PowerFs::mount(&h.mnt, state).expect("mount after the cut"));
        // The next session finds the committed session.json and goes on from the new point.
        h.cbt.insert("d0".into(), Some(BTreeSet::new()));
        h.expect_ok(&h.replicate_args("cbt", &disks)).unwrap();
        let r = h.run(&h.points_args("verify", &[]));
        assert_eq!(r.code, 0, "points verify after a power cut right after the catalog:\n{}{}", r.stdout, r.stderr);
        cut += 1;
        if cut == 5 {
            break;
        }
    }
    assert!(cut > 0, "no session was stopped right after its catalog was written");
}
