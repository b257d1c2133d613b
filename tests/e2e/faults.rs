//! Fault injection: the target or the source killed at random moments, the
//! connection cut mid-frame, a full file system. Whatever happens, the replica
//! ends at a restore point: resumed to the source, or rolled back to the last
//! point. Also: resume cost, the last points' exports, failback.
//!
//! The kill tests are seeded: set FERRY_FAULT_SEED to replay a failing run
//! (each case prints its seed, delay and follow-up before it runs).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * KIB;

fn p(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `ferry replicate --json` of one disk `d0` (64K chunks) plus `extra`.
fn replicate_args(target: &str, replica: &str, source: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["replicate", "--json", "--replica", replica, "--target", target, "--chunk-size", "64K"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["--source".to_string(), format!("d0={}", source.display())]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn replicate(target: &str, replica: &str, source: &Path, extra: &[&str]) -> Run {
    run(replicate_args(target, replica, source, extra))
}

/// Run a command; while the replica is still locked by a session the server
/// is winding down (the source was just killed or cut), try again.
fn run_unbusy(args: &[String]) -> Run {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = run(args);
        if r.code != 0 && r.stderr.contains("is in use by another session") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        return r;
    }
}

fn spawn(args: &[String]) -> Child {
    ferry().args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn")
}

/// Wait (at most 60 s) for a spawned command.
fn wait(child: Child) -> Run {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(o) => o.expect("wait"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("ferry (pid {pid}) still running after 60 s");
        }
    };
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Point ids of a replica; None when there is no such replica.
fn point_ids(ds: &Path, replica: &str) -> Option<Vec<u64>> {
    let r = run(["points", "list", "--json", "--target", &p(ds), "--replica", replica]);
    if r.code == 2 && r.stderr.contains(&format!("no replica {replica:?}")) {
        return None;
    }
    r.expect_code(0);
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("points list json");
    Some(v["points"].as_array().expect("points").iter().map(|p| u(&p["id"])).collect())
}

fn export(ds: &Path, replica: &str, point: Option<u64>, out: &Path) -> Run {
    let mut a = vec!["points".to_string(), "export".into(), "--target".into(), p(ds), "--replica".into()];
    a.extend([replica.to_string(), "--disk".into(), "d0".into(), "--out".into(), p(out)]);
    if let Some(id) = point {
        a.extend(["--point".to_string(), id.to_string()]);
    }
    run(a)
}

/// Export disk d0 of `point` (default the latest) and compare it with `expected`.
fn assert_point_equals(ds: &Path, replica: &str, point: Option<u64>, expected: &Path, ctx: &str) {
    let out = ds.parent().expect("parent").join(format!("export-{replica}-{point:?}.raw"));
    let r = export(ds, replica, point, &out);
    assert_eq!(r.code, 0, "{ctx}: export of point {point:?} failed: {}", r.stderr);
    assert!(same_bytes(&out, expected), "{ctx}: point {point:?} of {replica} differs from {}", expected.display());
    std::fs::remove_file(&out).expect("remove export");
}

fn verify(ds: &Path, replica: &str, ctx: &str) {
    let r = run(["points", "verify", "--target", &p(ds), "--replica", replica]);
    assert_eq!(r.code, 0, "{ctx}: verify\nstdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(", 0 problem(s)"), "{ctx}: {}", r.stdout);
}

/// Files in a directory (none when it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return vec![] };
    let mut v: Vec<String> = rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Wait until the server on `port` has no connection left open (it has
/// finished every session, and released every replica lock, of a dead source).
fn wait_server_idle(url: &str) {
    let port: u16 = url.rsplit(':').next().and_then(|s| s.parse().ok()).expect("port");
    let local = format!("0100007F:{port:04X}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let busy = tcp.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && (f[3] == "01" || f[3] == "08")
        });
        if !busy {
            return;
        }
        assert!(Instant::now() < deadline, "the server still has a connection 20 s after the source died");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn seed() -> u64 {
    std::env::var("FERRY_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6_0005_eed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Target,
    Source,
}

/// What became of one kill.
#[derive(Debug, Default)]
struct Tally {
    /// Killed with an interrupted session left behind (session.json).
    interrupted: usize,
    /// The session had committed its point already.
    committed: usize,
    /// Killed before the replica was opened.
    not_started: usize,
}

const KILL_OPTS: [&str; 4] = ["--retry-for", "0", "--checkpoint-every", "256K"];

/// Kill `victim` at `cases` seeded random moments of a full session (on an
/// empty datastore) or an incremental digest-mode session (on a replica with
/// two points); after each, resume or roll back, and check the replica is
/// exactly the source or exactly its previous point.
fn kill_at_random_moments(victim: Victim, incremental: bool, cases: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let tok = p(&token);
    let src = dir.path().join("src.img");
    // The replica before the session: a datastore to copy, a copy of its latest point's disk, its point ids.
    let mut before: Option<(PathBuf, PathBuf, Vec<u64>)> = None;
    if incremental {
        let base = dir.path().join("base-ds");
        let v1 = dir.path().join("v1.img");
        write_image(&v1, 4 * MIB, seed, &[Fill::Random, Fill::Text, Fill::Zero, Fill::Random]);
        replicate(&p(&base), "vm1", &v1, &[]).expect_code(0);
        let v2 = dir.path().join("v2.img");
        std::fs::copy(&v1, &v2).unwrap();
        mutate_blocks(&v2, CHUNK, 8, seed + 1);
        replicate(&p(&base), "vm1", &v2, &["--mode", "digest"]).expect_code(0);
        // The session: half the chunks change and the disk grows by 1 MiB of new data.
        std::fs::copy(&v2, &src).unwrap();
        mutate_blocks(&src, CHUNK, 32, seed + 2);
        let mut f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        let mut tail = vec![0u8; MIB as usize];
        Rng::new(seed + 3).fill(&mut tail);
        write_at(&mut f, 4 * MIB, &tail);
        before = Some((base, v2, vec![1, 2]));
    } else {
        write_image(&src, 4 * MIB + 4321, seed, &[Fill::Random, Fill::Text, Fill::Zero, Fill::Random]);
    }
    let mode: &[&str] = if incremental { &["--mode", "digest"] } else { &[] };
    let fresh_ds = |name: &str| -> PathBuf {
        let ds = dir.path().join(name);
        if let Some((base, _, _)) = &before {
            copy_dir(base, &ds);
        }
        ds
    };
    let args_for = |url: &str| -> Vec<String> {
        let mut extra: Vec<&str> = KILL_OPTS.to_vec();
        extra.extend(mode);
        extra.extend(["--token-file", &tok]);
        replicate_args(url, "vm1", &src, &extra)
    };

    // How long an undisturbed session takes here and now: kills land in 0..1.25 of that.
    let ds = fresh_ds("timing");
    let server = Server::start(&ds, &token, &[]);
    let t = Instant::now();
    let r = run(args_for(&server.url));
    let took = t.elapsed();
    r.expect_code(0);
    drop(server);
    let window_ms = (took.as_millis() as u64 * 5 / 4).max(20);
    eprintln!("seed {seed}: {victim:?} kills, incremental {incremental}: a session takes {took:?}");

    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    for case in 0..cases {
        let delay = rng.below(window_ms);
        let resume = rng.below(2) == 0;
        let ctx = format!(
            "seed {seed} case {case}: {victim:?} killed after {delay} ms of an {} session, then {}",
            if incremental { "incremental" } else { "full" },
            if resume { "resume" } else { "rollback --incomplete" }
        );
        eprintln!("{ctx}");
        let ds = fresh_ds(&format!("case-{case}"));
        let mut server = Server::start(&ds, &token, &[]);
        let mut child = spawn(&args_for(&server.url));
        std::thread::sleep(Duration::from_millis(delay));
        match victim {
            Victim::Target => server.kill(),
            Victim::Source => {
                let _ = child.kill();
            }
        }
        let first = wait(child);
        match victim {
            // The source sees the target die (1) unless it had finished (0).
            Victim::Target => {
                assert!(first.code == 0 || first.code == 1, "{ctx}: exit {}: {}", first.code, first.stderr)
            }
            // Killed by the signal unless it had finished.
            Victim::Source => {
                assert!(first.code == 0 || first.code == -1, "{ctx}: exit {}: {}", first.code, first.stderr);
                wait_server_idle(&server.url);
            }
        }
        let prev_ids = before.as_ref().map_or(vec![], |b| b.2.clone());
        let ids = point_ids(&ds, "vm1");
        let committed = ids.as_ref().is_some_and(|ids| ids.len() > prev_ids.len());
        if first.code == 0 {
            assert!(committed, "{ctx}: the source succeeded but no point was made");
        }
        let interrupted = ds.join("vm1/session.json").exists() && !committed;
        match (&ids, committed, interrupted) {
            (None, _, _) => tally.not_started += 1,
            (_, true, _) => tally.committed += 1,
            (_, false, true) => tally.interrupted += 1,
            (Some(ids), false, false) => {
                // Opened, but nothing of the session is recorded: it did not get that far.
                assert_eq!(ids, &prev_ids, "{ctx}");
                tally.not_started += 1;
            }
        }
        if victim == Victim::Target {
            server = Server::start(&ds, &token, &[]);
        }
        if resume {
            let r = run_unbusy(&args_for(&server.url));
            assert_eq!(r.code, 0, "{ctx}: resumed run\n{}", r.stderr);
            if interrupted {
                assert_eq!(r.summary()["resumed"], true, "{ctx}");
            }
            assert_point_equals(&ds, "vm1", None, &src, &ctx);
            verify(&ds, "vm1", &ctx);
            continue;
        }
        let rollback: Vec<String> =
            ["points", "rollback", "--incomplete", "--yes", "--target", &p(&ds), "--replica", "vm1"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let r = run_unbusy(&rollback);
        if ids.is_none() {
            // Never opened: there is nothing, and nothing to roll back.
            assert_eq!(r.code, 2, "{ctx}: {}", r.stderr);
            assert!(r.stderr.contains("no replica \"vm1\""), "{ctx}: {}", r.stderr);
            assert_eq!(files_in(&ds), ["ferry-datastore.json"], "{ctx}");
            continue;
        }
        assert_eq!(r.code, 0, "{ctx}: {}", r.stderr);
        if interrupted {
            assert!(r.stderr.contains("rolled back the interrupted session of vm1"), "{ctx}: {}", r.stderr);
        }
        let after = point_ids(&ds, "vm1").expect("replica");
        if committed {
            assert_eq!(after, ids.clone().unwrap(), "{ctx}");
            assert_point_equals(&ds, "vm1", None, &src, &ctx);
        } else {
            assert_eq!(after, prev_ids, "{ctx}: rollback must leave the previous points");
            match &before {
                Some((_, prev, _)) => assert_point_equals(&ds, "vm1", None, prev, &ctx),
                None => {
                    assert_eq!(files_in(&ds.join("vm1/disks")), Vec::<String>::new(), "{ctx}: images left");
                    let r = export(&ds, "vm1", None, &dir.path().join("none.raw"));
                    assert_eq!(r.code, 2, "{ctx}: {}", r.stderr);
                    assert!(r.stderr.contains("replica \"vm1\" has no restore point yet"), "{ctx}: {}", r.stderr);
                }
            }
        }
        assert!(!ds.join("vm1/session.json").exists(), "{ctx}: session left after rollback");
        verify(&ds, "vm1", &ctx);
    }
    eprintln!("seed {seed}: {victim:?} incremental {incremental}: {tally:?}");
    assert!(
        tally.interrupted * 3 >= cases,
        "seed {seed}: only {} of {cases} kills hit a session in progress: {tally:?}",
        tally.interrupted
    );
}

#[test]
fn target_killed_at_random_moments_resumes_or_rolls_back_exactly() {
    let s = seed();
    kill_at_random_moments(Victim::Target, false, 10, s);
    kill_at_random_moments(Victim::Target, true, 10, s + 100);
}

#[test]
fn source_killed_at_random_moments_resumes_or_rolls_back_exactly() {
    let s = seed();
    kill_at_random_moments(Victim::Source, false, 10, s + 200);
    kill_at_random_moments(Victim::Source, true, 10, s + 300);
}
