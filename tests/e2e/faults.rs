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
    out.into()
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
    if !same_bytes(&out, expected) {
        let (a, b) = (std::fs::read(&out).unwrap(), std::fs::read(expected).unwrap());
        let differ: Vec<usize> = (0..a.len().max(b.len()).div_ceil(CHUNK as usize))
            .filter(|&c| {
                let r =
                    |v: &[u8]| v.get(c * CHUNK as usize..((c + 1) * CHUNK as usize).min(v.len())).map(<[u8]>::to_vec);
                r(&a) != r(&b)
            })
            .collect();
        panic!(
            "{ctx}: point {point:?} of {replica} differs from {} ({} vs {} bytes) in chunks {differ:?}",
            expected.display(),
            a.len(),
            b.len()
        );
    }
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

/// Images and digest maps in a replica's disks directory (a temporary file that a killed
/// target left behind, `.NAME.tmp`, is neither).
fn images_in(dir: &Path) -> Vec<String> {
    files_in(dir).into_iter().filter(|n| !n.starts_with('.')).collect()
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

/// Wait until no session holds the replica's lock, and none took it for a while (a server may
/// still be finishing, even committing, the session of a source that was just killed).
fn wait_replica_unlocked(ds: &Path, replica: &str) {
    use std::os::fd::AsRawFd;
    let lock = ds.join(replica).join("lock");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut free = 0;
    while free < 4 {
        let is_free = match std::fs::File::open(&lock) {
            Err(_) => true,
            Ok(f) => {
                // SAFETY: flock on an open fd; the lock goes with the file when it is dropped.
                let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                r == 0
            }
        };
        free = if is_free { free + 1 } else { 0 };
        assert!(Instant::now() < deadline, "replica {replica} still locked 20 s after the source died");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the session state says chunk `at` of d0 is durable, or the source has ended.
fn wait_for_checkpoint(session: &Path, at: u64, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            return;
        }
        let next = std::fs::read(session)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["disks"]["d0"]["next_chunk"].as_u64());
        if next.is_some_and(|n| n >= at) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("no checkpoint {at} in 30 s");
}

fn seed() -> u64 {
    std::env::var("FERRY_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6000_5eed)
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

/// A killed source should still be sending: the 9 MiB or so a session puts on the wire fit in the
/// loopback socket buffers, and a source that has sent its Commit leaves the target to finish the
/// point without it. zstd at level 19 makes the source the slow end of the session (about
/// 35 MiB/s here, several times slower than the target), so kills by the target's progress land
/// while it still reads and sends. Without it a cbt session sent everything before the target
/// made its first checkpoints, and 8 of 10 kills came too late. Every other case runs at full
/// speed, for the kills that come after the Commit.
const SLOW_SOURCE: [&str; 2] = ["--compress", "zstd:19"];

/// Kill `victim` at `cases` seeded random moments of a full session (on an
/// empty datastore) or an incremental session in `mode` (digest, or cbt with the
/// exact change list: its chunks are announced to the target, which saves their old
/// contents ahead of the data) on a replica with two points; after each, resume or
/// roll back, and check the replica is exactly the source or exactly its previous point.
fn kill_at_random_moments(victim: Victim, incremental: Option<&str>, cases: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let tok = p(&token);
    let src = dir.path().join("src.img");
    // The replica before the session: a datastore to copy, a copy of its latest point's disk, its point ids.
    let mut before: Option<(PathBuf, PathBuf, Vec<u64>)> = None;
    let size = if victim == Victim::Source { 16 * MIB } else { 4 * MIB };
    let mut list = None;
    if let Some(mode) = incremental {
        let base = dir.path().join("base-ds");
        let v1 = dir.path().join("v1.img");
        write_image(&v1, size, seed, &[Fill::Random, Fill::Text, Fill::Zero, Fill::Random]);
        replicate(&p(&base), "vm1", &v1, &[]).expect_code(0);
        let v2 = dir.path().join("v2.img");
        std::fs::copy(&v1, &v2).unwrap();
        mutate_blocks(&v2, CHUNK, 8, seed + 1);
        replicate(&p(&base), "vm1", &v2, &["--mode", "digest"]).expect_code(0);
        // The session: half the chunks change and the disk grows by 1 MiB of new data.
        std::fs::copy(&v2, &src).unwrap();
        let changed = mutate_blocks(&src, CHUNK, (size / CHUNK / 2) as usize, seed + 2);
        if mode == "cbt" {
            // The grown MiB is sent without being listed (the target had no such chunks).
            let extents: Vec<String> =
                changed.iter().map(|c| format!("{{\"offset\":{},\"length\":{CHUNK}}}", c * CHUNK)).collect();
            let path = dir.path().join("cbt.json");
            std::fs::write(&path, format!("[{}]", extents.join(","))).unwrap();
            list = Some(p(&path));
        }
        let mut f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        let mut tail = vec![0u8; MIB as usize];
        Rng::new(seed + 3).fill(&mut tail);
        write_at(&mut f, size, &tail);
        before = Some((base, v2, vec![1, 2]));
    } else {
        write_image(&src, size + 4321, seed, &[Fill::Random, Fill::Text, Fill::Zero, Fill::Random]);
    }
    let mode: Vec<&str> = match (incremental, &list) {
        (Some("cbt"), Some(list)) => vec!["--mode", "cbt", "--cbt", list],
        (Some(m), _) => vec!["--mode", m],
        (None, _) => vec![],
    };
    let fresh_ds = |name: &str| -> PathBuf {
        let ds = dir.path().join(name);
        if let Some((base, _, _)) = &before {
            copy_dir(base, &ds);
        }
        ds
    };
    let args_for = |url: &str, fingerprint: &str, slow: bool| -> Vec<String> {
        let mut extra: Vec<&str> = KILL_OPTS.to_vec();
        extra.extend(&mode);
        if slow {
            extra.extend(SLOW_SOURCE);
        }
        extra.extend(["--token-file", &tok, "--fingerprint", fingerprint]);
        replicate_args(url, "vm1", &src, &extra)
    };

    // Kill points by progress, not by the clock (this machine's speed varies): once the target
    // has made chunk `at` durable (session.json's next_chunk), plus 0-5 ms; `at` 0 is 0-14 ms
    // after the source starts, before or while it connects.
    //
    // A source, though, runs ahead of the target by what the socket buffers hold (megabytes on
    // loopback), and once its Commit is sent the target completes the point without it. So it
    // gets a 16 MiB disk, is slowed down in even cases (SLOW_SOURCE) and is killed in the first
    // 35% of the target's progress: still sending, at least when slowed down.
    let chunks = std::fs::metadata(&src).unwrap().len().div_ceil(CHUNK);
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    for case in 0..cases {
        let (at, delay) = match victim {
            Victim::Target => (rng.below(chunks), rng.below(6)),
            Victim::Source => (rng.below(chunks * 35 / 100), rng.below(15)),
        };
        let resume = rng.below(2) == 0;
        let slow = victim == Victim::Source && case % 2 == 0;
        let ctx = format!(
            "seed {seed} case {case}: {victim:?}{} killed {delay} ms after {} of an {} session, then {}",
            if slow { " (slowed down)" } else { "" },
            if at == 0 { "the start".to_string() } else { format!("checkpoint {at}") },
            incremental.map_or("full".to_string(), |m| format!("incremental {m}")),
            if resume { "resume" } else { "rollback --incomplete" }
        );
        eprintln!("{ctx}");
        let ds = fresh_ds(&format!("case-{case}"));
        let mut server = Server::start(&ds, &token, &[]);
        let mut child = spawn(&args_for(&server.url, &server.fingerprint, slow));
        if at > 0 {
            wait_for_checkpoint(&ds.join("vm1/session.json"), at, &mut child);
        }
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
                wait_replica_unlocked(&ds, "vm1");
            }
        }
        let prev_ids = before.as_ref().map_or(vec![], |b| b.2.clone());
        let ids = point_ids(&ds, "vm1");
        let committed = ids.as_ref().is_some_and(|ids| ids.len() > prev_ids.len());
        if first.code == 0 {
            assert!(committed, "{ctx}: the source succeeded but no point was made");
        }
        let interrupted = ds.join("vm1/session.json").exists() && !committed;
        let ctx = format!(
            "{ctx} (first run exit {}, session {})",
            first.code,
            std::fs::read_to_string(ds.join("vm1/session.json")).unwrap_or_default().replace(char::is_whitespace, "")
        );
        let outcome = match (&ids, committed, interrupted) {
            (None, _, _) => &mut tally.not_started,
            (_, true, _) => &mut tally.committed,
            (_, false, true) => &mut tally.interrupted,
            (Some(ids), false, false) => {
                // Opened, but nothing of the session is recorded: it did not get that far.
                assert_eq!(ids, &prev_ids, "{ctx}");
                &mut tally.not_started
            }
        };
        *outcome += 1;
        eprintln!("{ctx}: committed {committed}, interrupted {interrupted}");
        if victim == Victim::Target {
            server = Server::start(&ds, &token, &[]);
        }
        if resume {
            let r = run_unbusy(&args_for(&server.url, &server.fingerprint, slow));
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
            // (A target killed inside lock_replica can leave the directory and its lock file.)
            assert!(!ds.join("vm1/replica.json").exists(), "{ctx}");
            assert_eq!(images_in(&ds.join("vm1/disks")), Vec::<String>::new(), "{ctx}: images left");
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
                    assert_eq!(images_in(&ds.join("vm1/disks")), Vec::<String>::new(), "{ctx}: images left");
                    let r = export(&ds, "vm1", None, &dir.path().join("none.raw"));
                    assert_eq!(r.code, 2, "{ctx}: {}", r.stderr);
                    assert!(r.stderr.contains("replica \"vm1\" has no restore point yet"), "{ctx}: {}", r.stderr);
                }
            }
        }
        assert!(!ds.join("vm1/session.json").exists(), "{ctx}: session left after rollback");
        verify(&ds, "vm1", &ctx);
    }
    eprintln!("seed {seed}: {victim:?} incremental {incremental:?}: {tally:?}");
    assert!(
        tally.interrupted * 4 >= cases,
        "seed {seed}: only {} of {cases} kills hit a session in progress: {tally:?}",
        tally.interrupted
    );
}

#[test]
fn target_killed_at_random_moments_resumes_or_rolls_back_exactly() {
    let s = seed();
    kill_at_random_moments(Victim::Target, None, 10, s);
    kill_at_random_moments(Victim::Target, Some("digest"), 10, s + 100);
    kill_at_random_moments(Victim::Target, Some("cbt"), 10, s + 400);
}

#[test]
fn source_killed_at_random_moments_resumes_or_rolls_back_exactly() {
    let s = seed();
    kill_at_random_moments(Victim::Source, None, 10, s + 200);
    kill_at_random_moments(Victim::Source, Some("digest"), 10, s + 300);
    kill_at_random_moments(Victim::Source, Some("cbt"), 10, s + 500);
}

/// Where a cut of the client's stream after `n` bytes falls: (frame type, cut inside its body).
fn cut_position(stream: &[u8]) -> (u8, bool) {
    let n = stream.len() as u64;
    let (ty, start, end) = frame_at(stream, n - 1).expect("a frame holds the last byte");
    (ty, start + 12 < n && n < end)
}

const DATA_FRAME: u8 = 0x30;

#[test]
fn connection_cut_mid_frame_fails_then_resumes_identical() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let tok = p(&token);
    let src = dir.path().join("src.img");
    write_image(&src, 4 * MIB + 999, 31, &[Fill::Random, Fill::Text, Fill::Random, Fill::Zero]);
    let ds = dir.path().join("ds");
    // Plaintext on both ends: the test reads the cut stream's ferry frames (over TLS a cut
    // falls inside a record; tls.rs's tests cut and tamper TLS streams).
    let server = Server::start(&ds, &token, &["--insecure-plaintext"]);
    // 2 MiB + 12345 lands inside a 64 KiB data frame's payload (checked below).
    let cut = 2 * MIB + 12345;
    let proxy = Proxy::start(&server.url, vec![cut]);
    let opts = [
        "--retry-for",
        "0",
        "--checkpoint-every",
        "256K",
        "--compress",
        "none",
        "--token-file",
        &tok,
        "--insecure-plaintext",
    ];
    let r = replicate(&proxy.url(), "vm1", &src, &opts);
    r.expect_code(1);
    assert!(r.stderr.starts_with("ferry: error: "), "{}", r.stderr);
    assert!(r.stderr.contains(&proxy.addr), "the error names the target {}: {}", proxy.addr, r.stderr);
    assert_eq!(r.summary()["status"], "failed");
    let streams = proxy.cut_streams();
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].len() as u64, cut);
    assert_eq!(cut_position(&streams[0]), (DATA_FRAME, true), "the cut is inside a data frame's body");
    wait_server_idle(&server.url);
    assert!(ds.join("vm1/session.json").exists(), "the interrupted session is kept");
    assert_eq!(point_ids(&ds, "vm1"), Some(vec![]));

    // A fresh connection resumes and completes.
    let r = run_unbusy(&replicate_args(&proxy.url(), "vm1", &src, &opts));
    r.expect_code(0);
    let s = r.summary();
    assert_eq!(s["resumed"], true);
    assert!(u(&s["totals"]["chunks_resumed"]) > 0, "{s}");
    assert_eq!(s["point_id"], 1);
    assert_eq!(proxy.connections(), 2);
    assert_point_equals(&ds, "vm1", None, &src, "resumed after a cut");
    verify(&ds, "vm1", "resumed after a cut");

    // With --retry-for, one command rides over the cut by reconnecting.
    let ds2 = dir.path().join("ds2");
    let server2 = Server::start(&ds2, &token, &["--insecure-plaintext"]);
    let proxy2 = Proxy::start(&server2.url, vec![cut]);
    let mut opts2 = opts;
    opts2[1] = "60s";
    let r = replicate(&proxy2.url(), "vm1", &src, &opts2);
    r.expect_code(0);
    let s = r.summary();
    assert_eq!(s["status"], "ok");
    assert_eq!(s["resumed"], true);
    assert_eq!(s["point_id"], 1);
    assert_eq!(proxy2.connections(), 2, "one cut, one reconnect");
    let notices: Vec<Value> = r.events().into_iter().filter(|e| e["event"] == "notice").collect();
    assert!(notices.iter().any(|n| n["message"].as_str().unwrap_or("").contains("reconnecting in 1 s")), "{notices:?}");
    assert_eq!(cut_position(&proxy2.cut_streams()[0]), (DATA_FRAME, true));
    assert_point_equals(&ds2, "vm1", None, &src, "reconnected after a cut");
    verify(&ds2, "vm1", "reconnected after a cut");
}

/// Unmounts a tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_target_file_system_fails_clearly_and_leaves_the_last_point() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let st = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"]).arg(&mnt).status();
    if !st.as_ref().is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot mount a tmpfs here ({st:?})");
        return;
    }
    let _mount = Mount(mnt.clone());
    let token = new_token(dir.path(), "token");
    let tok = p(&token);
    let ds = mnt.join("ds");
    let server = Server::start(&ds, &token, &[]);
    let v1 = dir.path().join("v1.img");
    write_image(&v1, 2 * MIB, 41, &[Fill::Random]);
    replicate(
        &server.url,
        "vm1",
        &v1,
        &["--retry-for", "0", "--token-file", &tok, "--fingerprint", &server.fingerprint],
    )
    .expect_code(0);
    // v2: the first 2 MiB changed and 8 MiB more: 10 MiB of image and 2 MiB of undo do not fit in 6 MiB.
    let v2 = dir.path().join("v2.img");
    write_image(&v2, 10 * MIB, 42, &[Fill::Random]);
    let opts = [
        "--retry-for",
        "0",
        "--checkpoint-every",
        "256K",
        "--compress",
        "none",
        "--token-file",
        &tok,
        "--fingerprint",
        &server.fingerprint,
    ];
    let r = replicate(&server.url, "vm1", &v2, &opts);
    r.expect_code(1);
    assert!(r.stderr.contains("No space left on device (os error 28)"), "{}", r.stderr);
    assert_eq!(r.summary()["status"], "failed");
    assert!(r.summary()["error"].as_str().unwrap().contains("No space left on device"), "{}", r.summary());
    wait_server_idle(&server.url);
    let sessions = server.sessions(2);
    assert!(sessions[1]["error"].as_str().unwrap_or("").contains("No space left on device"), "{}", sessions[1]);

    let rollback = ["points", "rollback", "--incomplete", "--yes", "--target", &p(&ds), "--replica", "vm1"];
    let r = run_unbusy(&rollback.map(String::from));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("rolled back the interrupted session of vm1"), "{}", r.stderr);
    assert_eq!(point_ids(&ds, "vm1"), Some(vec![1]));
    let out = dir.path().join("after.raw");
    export(&ds, "vm1", None, &out).expect_code(0);
    assert!(same_bytes(&out, &v1), "after the rollback the replica is its last point");
    verify(&ds, "vm1", "after ENOSPC and rollback");
    // And it takes a change that fits.
    let v3 = dir.path().join("v3.img");
    std::fs::copy(&v1, &v3).unwrap();
    mutate_blocks(&v3, CHUNK, 4, 43);
    let r = replicate(&server.url, "vm1", &v3, &opts);
    r.expect_code(0);
    assert_eq!(r.summary()["point_id"], 2);
    assert_point_equals(&ds, "vm1", None, &v3, "after ENOSPC");
    assert_point_equals(&ds, "vm1", Some(1), &v1, "after ENOSPC");
}

#[test]
fn resume_after_a_cut_at_half_sends_at_most_55_percent() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let tok = p(&token);
    let src = dir.path().join("src.img");
    write_image(&src, 16 * MIB, 51, &[Fill::Random]);
    let ds = dir.path().join("ds");
    let server = Server::start(&ds, &token, &[]);
    let opts = [
        "--retry-for",
        "0",
        "--checkpoint-every",
        "256K",
        "--compress",
        "none",
        "--token-file",
        &tok,
        "--fingerprint",
        &server.fingerprint,
    ];
    let full = replicate(&server.url, "whole", &src, &opts);
    full.expect_code(0);
    let full_sent = u(&full.summary()["totals"]["bytes_sent"]);
    let full_wire = u(&full.summary()["wire_bytes"]);
    assert!(full_sent >= 16 * MIB, "{full_sent}");

    let proxy = Proxy::start(&server.url, vec![full_wire / 2]);
    replicate(&proxy.url(), "cut", &src, &opts).expect_code(1);
    wait_server_idle(&server.url);
    let r = run_unbusy(&replicate_args(&proxy.url(), "cut", &src, &opts));
    r.expect_code(0);
    let s = r.summary();
    assert_eq!(s["resumed"], true);
    let resumed_sent = u(&s["totals"]["bytes_sent"]);
    eprintln!(
        "full run {full_sent} bytes, resumed run {resumed_sent} bytes ({:.1} %)",
        100.0 * resumed_sent as f64 / full_sent as f64
    );
    assert!(resumed_sent * 100 <= full_sent * 55, "resume sent {resumed_sent} of {full_sent}");
    assert!(resumed_sent * 100 >= full_sent * 45, "resume sent only {resumed_sent} of {full_sent}");
    assert_point_equals(&ds, "cut", None, &src, "resumed");
    verify(&ds, "cut", "resumed");
}

#[test]
fn exports_of_the_last_five_points_equal_the_source_at_each_point() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let src = dir.path().join("src.img");
    write_image(&src, 3 * MIB + 4321, 61, &[Fill::Random, Fill::Text, Fill::Zero]);
    let mut copies = Vec::new();
    for i in 1..=7u64 {
        let mut f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        match i {
            1 => {}
            3 => {
                // Grow by 1 MiB + 1000 bytes of new data.
                let mut tail = vec![0u8; (MIB + 1000) as usize];
                Rng::new(63).fill(&mut tail);
                write_at(&mut f, 3 * MIB + 4321, &tail);
            }
            5 => {
                // Shrink to 2 MiB + 777 bytes (the last chunk becomes partial).
                f.set_len(2 * MIB + 777).unwrap();
            }
            6 => {
                // Zero a 256 KiB region.
                write_at(&mut f, 256 * KIB, &vec![0u8; 256 * KIB as usize]);
                mutate_blocks(&src, CHUNK, 3, 60 + i);
            }
            _ => {
                mutate_blocks(&src, CHUNK, 5, 60 + i);
            }
        }
        drop(f);
        let r = replicate(&p(&ds), "vm1", &src, &["--retain", "5"]);
        r.expect_code(0);
        assert_eq!(r.summary()["point_id"], i);
        let copy = dir.path().join(format!("at-{i}.img"));
        std::fs::copy(&src, &copy).unwrap();
        copies.push(copy);
    }
    assert_eq!(point_ids(&ds, "vm1"), Some(vec![3, 4, 5, 6, 7]));
    let r = run(["points", "list", "--target", &p(&ds), "--replica", "vm1"]);
    r.expect_code(0);
    assert_eq!(r.stdout.lines().count(), 6, "a header and five points:\n{}", r.stdout);
    for i in 3..=7u64 {
        assert_point_equals(&ds, "vm1", Some(i), &copies[i as usize - 1], &format!("point {i}"));
    }
    for i in [1, 2] {
        let r = export(&ds, "vm1", Some(i), &dir.path().join("gone.raw"));
        r.expect_code(2);
        assert!(
            r.stderr.contains(&format!("replica \"vm1\" has no restore point {i} (points: 3, 4, 5, 6, 7)")),
            "{}",
            r.stderr
        );
    }
    verify(&ds, "vm1", "five points");
}

#[test]
fn failback_sends_only_the_chunks_changed_after_failover() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let tok = p(&token);
    // Site A runs the VM; site B is the DR site.
    let disk_a = dir.path().join("vmA-disk0.img");
    write_image(&disk_a, 6 * MIB + 512, 71, &[Fill::Random, Fill::Text, Fill::Zero]);
    let ds_b = dir.path().join("site-b");
    let server_b = Server::start(&ds_b, &token, &[]);
    replicate(&server_b.url, "vmA", &disk_a, &["--token-file", &tok, "--fingerprint", &server_b.fingerprint])
        .expect_code(0);
    // Site A keeps a replica of its own disk (what failback writes back into).
    let ds_a = dir.path().join("site-a");
    replicate(&p(&ds_a), "vmA", &disk_a, &[]).expect_code(0);

    // Failover: the latest point of B becomes the running disk.
    let failed_over = dir.path().join("failed-over.img");
    export(&ds_b, "vmA", None, &failed_over).expect_code(0);
    assert!(same_bytes(&failed_over, &disk_a));
    // The VM runs at B: whole chunks rewritten, and a few bytes in one more chunk.
    let mut changed: std::collections::BTreeSet<u64> = mutate_blocks(&failed_over, CHUNK, 9, 72).into_iter().collect();
    let small = (0..96).find(|c| !changed.contains(c)).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&failed_over).unwrap();
    write_at(&mut f, small * CHUNK + 1000, b"changed at the DR site");
    drop(f);
    changed.insert(small);

    // Failback: replicate the failed-over disk into site A's replica in digest mode.
    let r = replicate(&p(&ds_a), "vmA", &failed_over, &["--mode", "digest"]);
    r.expect_code(0);
    let s = r.summary();
    assert_eq!(s["point_id"], 2);
    assert_eq!(s["disks"][0]["mode"], "digest");
    assert_eq!(u(&s["totals"]["chunks_sent"]), changed.len() as u64, "{s}");
    assert_eq!(u(&s["totals"]["chunks_zero"]), 0, "{s}");
    assert_eq!(u(&s["totals"]["bytes_data"]), changed.len() as u64 * CHUNK, "{s}");
    assert_point_equals(&ds_a, "vmA", None, &failed_over, "after failback");
    assert_point_equals(&ds_a, "vmA", Some(1), &disk_a, "before failback");
    verify(&ds_a, "vmA", "after failback");
}
