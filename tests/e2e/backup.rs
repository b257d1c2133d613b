//! Replica from backup (`ferry replicate --from-backup`): qcow2 chain
//! repositories and ferry datastores as repositories. Skipped, with a note,
//! when qemu-img is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const CHUNK: u64 = 64 * KIB;
const DISK: &str = "2M";

fn have_qemu() -> bool {
    let ok = |c: &str| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success());
    if ok("qemu-img") && ok("qemu-io") {
        true
    } else {
        eprintln!("note: qemu-img/qemu-io not installed: skipping the replica-from-backup tests");
        false
    }
}

fn sh(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(o.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Write pattern `byte` (0: zeroes, as qemu-io `write -z`) at chunks `chunks` of a qcow2 file.
fn write_chunks(file: &Path, chunks: &[u64], byte: u8) {
    let mut args = vec!["-f".to_string(), "qcow2".into()];
    for c in chunks {
        let cmd = if byte == 0 {
            format!("write -z {} {CHUNK}", c * CHUNK)
        } else {
            format!("write -P {byte} {} {CHUNK}", c * CHUNK)
        };
        args.extend(["-c".into(), cmd]);
    }
    args.push(s(file).into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    sh("qemu-io", &a);
}

/// A backup point in a qcow2 chain repository: `repo/vm/sda.ID.qcow2` and `repo/vm/ID.json`.
/// Full (a copy of `from` or empty) when `parent` is None, else an overlay on the parent's file.
struct Point<'a> {
    repo: &'a Path,
    vm: &'a str,
    id: &'a str,
    time: &'a str,
    parent: Option<&'a str>,
}

impl Point<'_> {
    fn file(&self) -> PathBuf {
        self.repo.join(self.vm).join(format!("sda.{}.qcow2", self.id))
    }

    /// Create the image (full: from `base` if given) and write its manifest; returns the image.
    fn create(&self, base: Option<&Path>, writes: &[(&[u64], u8)]) -> PathBuf {
        let dir = self.repo.join(self.vm);
        std::fs::create_dir_all(&dir).unwrap();
        let f = self.file();
        match (self.parent, base) {
            (Some(p), _) => {
                let backing = format!("sda.{p}.qcow2");
                sh("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &backing, s(&f)]);
            }
            (None, Some(b)) => sh("qemu-img", &["convert", "-O", "qcow2", s(b), s(&f)]),
            (None, None) => sh("qemu-img", &["create", "-q", "-f", "qcow2", s(&f), DISK]),
        }
        for (chunks, byte) in writes {
            write_chunks(&f, chunks, *byte);
        }
        let manifest = serde_json::json!({
            "format": "ferry-backup-point/1",
            "vm": self.vm,
            "point_time": self.time,
            "disks": {"sda": format!("sda.{}.qcow2", self.id)},
            "parent": self.parent,
        });
        std::fs::write(dir.join(format!("{}.json", self.id)), manifest.to_string()).unwrap();
        f
    }
}

/// `qemu-img convert -O raw` of a point's image (the reference).
fn reference(image: &Path, out: &Path) -> PathBuf {
    sh("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", s(image), s(out)]);
    out.to_path_buf()
}

fn from_backup(repos: &[&Path], vm: &str, target: &Path, replica: &str, extra: &[&str]) -> Run {
    let mut args: Vec<String> = vec!["replicate".into(), "--json".into(), "--chunk-size".into(), "64K".into()];
    for r in repos {
        args.extend(["--from-backup".into(), s(r).into()]);
    }
    args.extend(["--vm".into(), vm.into(), "--target".into(), s(target).into(), "--replica".into(), replica.into()]);
    args.extend(extra.iter().map(|x| x.to_string()));
    run(args)
}

fn points_of(target: &Path, replica: &str) -> Vec<Value> {
    let r = run(["points", "list", "--json", "--target", s(target), "--replica", replica]);
    r.expect_code(0);
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("points json");
    v["points"].as_array().expect("points").clone()
}

fn export(target: &Path, replica: &str, point: u64, out: &Path) -> PathBuf {
    let r = run([
        "points",
        "export",
        "--target",
        s(target),
        "--replica",
        replica,
        "--disk",
        "sda",
        "--point",
        &point.to_string(),
        "--out",
        s(out),
    ]);
    r.expect_code(0);
    out.to_path_buf()
}

fn chunks_sent(summary_or_point: &Value) -> u64 {
    summary_or_point["totals"]["chunks_sent"].as_u64().unwrap_or_else(|| panic!("no chunks_sent in {summary_or_point}"))
}

fn point_done(r: &Run) -> Vec<Value> {
    r.events().into_iter().filter(|e| e["event"] == "point_done").collect()
}

const SUN: &str = "2026-11-22T02:00:00Z";
const MON: &str = "2026-11-23T02:00:00Z";
const TUE: &str = "2026-11-24T02:00:00Z";
const WED: &str = "2026-11-25T02:00:00Z";
const THU: &str = "2026-11-26T02:00:00Z";
const FRI: &str = "2026-11-27T02:00:00Z";

/// The week, then catch-up, then the replica itself as a repository.
#[test]
fn week_of_backups_then_catch_up_then_datastore_repository() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (r1, r2, ds) = (tmp.path().join("repo1"), tmp.path().join("repo2"), tmp.path().join("dr"));
    std::fs::create_dir_all(&r1).unwrap();
    std::fs::create_dir_all(&r2).unwrap();
    let repos = [r1.as_path(), r2.as_path()];
    let mut refs: Vec<PathBuf> = Vec::new();

    // Sunday: repository 1, full: chunks 0..8 and 20.
    let sun = Point { repo: &r1, vm: "web1", id: "sun", time: SUN, parent: None }
        .create(None, &[(&[0, 1, 2, 3, 4, 5, 6, 7], 1), (&[20], 9)]);
    refs.push(reference(&sun, &tmp.path().join("ref-sun.raw")));
    let r = from_backup(&repos, "web1", &ds, "web1-dr", &[]);
    r.expect_code(0);
    assert_eq!(r.summary()["point_time"], SUN);
    assert_eq!(chunks_sent(&r.summary()), 9, "Sunday's full sends its 9 data chunks");
    if Command::new("qemu-nbd").arg("--version").output().is_ok_and(|o| o.status.success()) {
        assert_eq!(r.summary()["backend"], "nbd", "qcow2 points are read through qemu-nbd");
    }

    // Monday: repository 2, full: Sunday plus chunks 10, 11.
    let mon = Point { repo: &r2, vm: "web1", id: "mon", time: MON, parent: None }.create(Some(&sun), &[(&[10, 11], 2)]);
    refs.push(reference(&mon, &tmp.path().join("ref-mon.raw")));
    let r = from_backup(&repos, "web1", &ds, "web1-dr", &[]);
    r.expect_code(0);
    assert_eq!(r.summary()["point_time"], MON);
    assert_eq!(r.summary()["disks"][0]["mode"], "digest", "a full after a full: what differs");
    assert_eq!(chunks_sent(&r.summary()), 2);

    // Tuesday: repository 1, incremental on Sunday: Monday's change again, chunks 3 and 25, chunk 20 zeroed.
    let tue = Point { repo: &r1, vm: "web1", id: "tue", time: TUE, parent: Some("sun") }
        .create(None, &[(&[10, 11], 2), (&[3, 25], 3), (&[20], 0)]);
    refs.push(reference(&tue, &tmp.path().join("ref-tue.raw")));
    let r = from_backup(&repos, "web1", &ds, "web1-dr", &[]);
    r.expect_code(0);
    let sum = r.summary();
    assert_eq!(sum["point_time"], TUE);
    // The replica is at Monday, which is not in Tuesday's chain: what differs from Monday moves (3 and 25; 20 as zeros).
    assert_eq!(chunks_sent(&sum), 2, "{sum}");
    assert_eq!(sum["totals"]["chunks_zero"], 1, "{sum}");

    // Wednesday: nothing new.
    let r = from_backup(&repos, "web1", &ds, "web1-dr", &[]);
    r.expect_code(3);
    assert_eq!(r.summary()["status"], "warning");
    assert!(
        r.events().iter().any(|e| e["event"] == "warning" && e["message"] == "latest restore point already replicated"),
        "{}",
        r.stdout
    );
    assert_eq!(chunks_sent(&r.summary()), 0);

    let pts = points_of(&ds, "web1-dr");
    let times: Vec<&str> = pts.iter().map(|p| p["point_time"].as_str().unwrap()).collect();
    assert_eq!(times, [SUN, MON, TUE]);
    for (p, want) in pts.iter().zip(&refs) {
        let id = p["id"].as_u64().unwrap();
        let got = export(&ds, "web1-dr", id, &tmp.path().join(format!("exp-{id}.raw")));
        assert!(same_bytes(&got, want), "replica point {id} differs from {}", want.display());
    }

    // Three new points, then --catch-up: two incrementals in repository 1, a full in repository 2.
    let wed = Point { repo: &r1, vm: "web1", id: "wed", time: WED, parent: Some("tue") }.create(None, &[(&[5], 5)]);
    let thu = Point { repo: &r1, vm: "web1", id: "thu", time: THU, parent: Some("wed") }.create(None, &[(&[6, 7], 6)]);
    let thu_raw = reference(&thu, &tmp.path().join("ref-thu.raw"));
    let fri = Point { repo: &r2, vm: "web1", id: "fri", time: FRI, parent: None }.create(Some(&thu_raw), &[(&[30], 7)]);
    refs.push(reference(&wed, &tmp.path().join("ref-wed.raw")));
    refs.push(thu_raw);
    refs.push(reference(&fri, &tmp.path().join("ref-fri.raw")));
    // `ferry plan` lists them and moves nothing.
    let mut args = vec!["plan".to_string(), "--json".into()];
    for r in &repos {
        args.extend(["--from-backup".into(), s(r).into()]);
    }
    args.extend(["--vm", "web1", "--target", s(&ds), "--replica", "web1-dr", "--catch-up"].map(String::from));
    let r = run(&args);
    r.expect_code(0);
    let listed: Vec<Value> =
        r.events().into_iter().filter(|e| e["event"] == "backup_point").map(|e| e["point_time"].clone()).collect();
    assert_eq!(listed, [WED, THU, FRI], "{}", r.stdout);
    assert_eq!(points_of(&ds, "web1-dr").len(), 3, "plan changes nothing");

    let r = from_backup(&repos, "web1", &ds, "web1-dr", &["--catch-up"]);
    r.expect_code(0);
    let done = point_done(&r);
    let times: Vec<&str> = done.iter().map(|p| p["point_time"].as_str().unwrap()).collect();
    assert_eq!(times, [WED, THU, FRI], "{}", r.stdout);
    let modes: Vec<&str> = done.iter().map(|p| p["disks"][0]["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["cbt", "cbt", "digest"], "incrementals on the replica's point move their own extents");
    let sent: Vec<u64> = done.iter().map(chunks_sent).collect();
    assert_eq!(sent, [1, 2, 1]);
    let planned: Vec<u64> = done.iter().map(|p| p["totals"]["chunks_planned"].as_u64().unwrap()).collect();
    assert_eq!(&planned[..2], [1, 2], "cbt plans only the overlay's clusters");
    let read: Vec<u64> = done.iter().map(|p| p["totals"]["bytes_read"].as_u64().unwrap()).collect();
    assert_eq!(&read[..2], [CHUNK, 2 * CHUNK], "cbt reads only the overlay's clusters");

    let pts = points_of(&ds, "web1-dr");
    let times: Vec<&str> = pts.iter().map(|p| p["point_time"].as_str().unwrap()).collect();
    assert_eq!(times, [SUN, MON, TUE, WED, THU, FRI]);
    for (p, want) in pts.iter().zip(&refs) {
        let id = p["id"].as_u64().unwrap();
        let got = export(&ds, "web1-dr", id, &tmp.path().join(format!("exp2-{id}.raw")));
        assert!(same_bytes(&got, want), "replica point {id} differs from {}", want.display());
    }
    from_backup(&repos, "web1", &ds, "web1-dr", &["--catch-up"]).expect_code(3);

    // The DR datastore as a repository: its replica is the VM; a copy gets every point.
    let ds2 = tmp.path().join("dr2");
    let r = from_backup(&[ds.as_path()], "web1-dr", &ds2, "web1-copy", &["--catch-up"]);
    r.expect_code(0);
    let done = point_done(&r);
    let times: Vec<&str> = done.iter().map(|p| p["point_time"].as_str().unwrap()).collect();
    assert_eq!(times, [SUN, MON, TUE, WED, THU, FRI]);
    let modes: Vec<&str> = done.iter().map(|p| p["disks"][0]["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["full", "cbt", "cbt", "cbt", "cbt", "cbt"], "ferry points move their undo records");
    let sent: Vec<u64> = done.iter().map(chunks_sent).collect();
    assert_eq!(sent, [9, 2, 2, 1, 2, 1]);
    let pts = points_of(&ds2, "web1-copy");
    for (p, want) in pts.iter().zip(&refs) {
        let id = p["id"].as_u64().unwrap();
        let got = export(&ds2, "web1-copy", id, &tmp.path().join(format!("exp3-{id}.raw")));
        assert!(same_bytes(&got, want), "copy point {id} differs from {}", want.display());
    }
    from_backup(&[ds.as_path()], "web1-dr", &ds2, "web1-copy", &[]).expect_code(3);
}

/// Broken repositories: clear errors (exit 2), nothing moved.
#[test]
fn bad_repositories_move_nothing() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("dr");
    let check = |repos: &[&Path], vm: &str, want: &str| {
        let r = from_backup(repos, vm, &ds, "web1-dr", &[]);
        r.expect_code(2);
        assert_eq!(r.summary()["status"], "failed");
        let msg = r.summary()["error"].as_str().unwrap().to_string();
        assert!(msg.contains(want), "expected {want:?} in {msg:?}");
        assert!(!ds.join("web1-dr").exists(), "a failed run must not create the replica");
        msg
    };

    // Missing backing file.
    let a = tmp.path().join("a");
    let base = Point { repo: &a, vm: "web1", id: "sun", time: SUN, parent: None }.create(None, &[(&[0], 1)]);
    Point { repo: &a, vm: "web1", id: "tue", time: TUE, parent: Some("sun") }.create(None, &[(&[1], 2)]);
    std::fs::remove_file(&base).unwrap();
    std::fs::remove_file(a.join("web1/sun.json")).unwrap();
    let msg = check(&[&a], "web1", "backing file");
    assert!(msg.contains("is missing") && msg.contains("sda.sun.qcow2"), "{msg}");

    // Broken manifest: names the file and the reason.
    let b = tmp.path().join("b");
    Point { repo: &b, vm: "web1", id: "sun", time: SUN, parent: None }.create(None, &[(&[0], 1)]);
    std::fs::write(b.join("web1/mon.json"), b"{\"format\": \"ferry-backup-point/1\", \"vm\": ").unwrap();
    let msg = check(&[&b], "web1", "broken manifest");
    assert!(msg.contains("mon.json") && msg.contains("EOF"), "{msg}");

    // Two points with the same time, in two repositories.
    let c = tmp.path().join("c");
    Point { repo: &c, vm: "web1", id: "sun2", time: SUN, parent: None }.create(None, &[(&[2], 1)]);
    check(&[&b.join("none"), &c], "web1", "is not a directory");
    std::fs::remove_file(b.join("web1/mon.json")).unwrap();
    let msg = check(&[&b, &c], "web1", "two restore points at 2026-11-22T02:00:00Z");
    assert!(msg.contains("sun") && msg.contains("sun2"), "{msg}");

    // A chain for another VM: web1's overlay is based on db1's full.
    let d = tmp.path().join("d");
    Point { repo: &d, vm: "db1", id: "full", time: SUN, parent: None }.create(None, &[(&[0], 1)]);
    let inc = Point { repo: &d, vm: "web1", id: "inc", time: MON, parent: None };
    std::fs::create_dir_all(d.join("web1")).unwrap();
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "../db1/sda.full.qcow2", s(&inc.file())]);
    let manifest = serde_json::json!({"format": "ferry-backup-point/1", "vm": "web1", "point_time": MON,
        "disks": {"sda": "sda.inc.qcow2"}, "parent": null});
    std::fs::write(d.join("web1/inc.json"), manifest.to_string()).unwrap();
    let msg = check(&[&d], "web1", "a restore point of VM \"db1\"");
    assert!(msg.contains("web1/inc"), "{msg}");

    // An unknown VM: the VMs found are listed.
    let e = tmp.path().join("e");
    Point { repo: &e, vm: "db1", id: "full", time: SUN, parent: None }.create(None, &[(&[0], 1)]);
    Point { repo: &e, vm: "web1", id: "full", time: SUN, parent: None }.create(None, &[(&[0], 1)]);
    check(&[&e], "mail", "no restore point of VM \"mail\" in the backup repositories (VMs found: db1, web1)");

    // --source with --from-backup is a usage error.
    let (e, ds_s) = (s(&e), s(&ds));
    let r = run([
        "replicate",
        "--source",
        "/dev/null",
        "--from-backup",
        e,
        "--vm",
        "web1",
        "--target",
        ds_s,
        "--replica",
        "web1-dr",
    ]);
    r.expect_code(2);
    assert!(r.stderr.contains("--source and --from-backup exclude each other"), "{}", r.stderr);
    assert!(!ds.join("web1-dr").exists());
}

/// Without a manifest, each qcow2 file is a point of its own, timed by its modification time.
#[test]
fn qcow2_without_manifest_uses_mtime() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let dir = repo.join("vm9");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("sda.2026-11-20.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", s(&f), DISK]);
    write_chunks(&f, &[1, 2], 4);
    sh("touch", &["-d", "2026-11-20T05:00:00Z", s(&f)]);
    let ds = tmp.path().join("dr");
    let r = from_backup(&[&repo], "vm9", &ds, "vm9", &[]);
    r.expect_code(0);
    assert_eq!(r.summary()["point_time"], "2026-11-20T05:00:00Z");
    let want = reference(&f, &tmp.path().join("ref.raw"));
    let got = export(&ds, "vm9", r.summary()["point_id"].as_u64().unwrap(), &tmp.path().join("got.raw"));
    assert!(same_bytes(&got, &want));

    // A manifest-less overlay: diffed by its backing chain.
    let g = dir.join("sda.2026-11-21.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "sda.2026-11-20.qcow2", s(&g)]);
    write_chunks(&g, &[7], 5);
    sh("touch", &["-d", "2026-11-21T05:00:00Z", s(&g)]);
    let r = from_backup(&[&repo], "vm9", &ds, "vm9", &[]);
    r.expect_code(0);
    let sum = r.summary();
    assert_eq!(sum["point_time"], "2026-11-21T05:00:00Z");
    assert_eq!(sum["disks"][0]["mode"], "cbt", "{sum}");
    assert_eq!(sum["totals"]["chunks_planned"], 1, "{sum}");
    let want = reference(&g, &tmp.path().join("ref2.raw"));
    let got = export(&ds, "vm9", sum["point_id"].as_u64().unwrap(), &tmp.path().join("got2.raw"));
    assert!(same_bytes(&got, &want));
}

/// An interrupted session goes on with its own backup point before a newer one.
#[test]
fn interrupted_session_finishes_its_point_first() {
    interrupted_session(false);
}

/// The same through `ferry serve`: the plan-only session reports the pending point time.
#[test]
fn interrupted_session_finishes_its_point_first_on_a_remote_target() {
    interrupted_session(true);
}

fn interrupted_session(remote: bool) {
    use ferry_datastore::store::{Datastore, SessionState};
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (r1, r2, ds) = (tmp.path().join("repo1"), tmp.path().join("repo2"), tmp.path().join("dr"));
    let token = new_token(tmp.path(), "token");
    let server = remote.then(|| Server::start(&ds, &token, &[]));
    let target = server.as_ref().map_or_else(|| ds.clone(), |s| PathBuf::from(&s.url));
    let token_arg = s(&token);
    let fp = server.as_ref().map_or(String::new(), |s| s.fingerprint.clone());
    let extra: &[&str] = if remote { &["--token-file", token_arg, "--fingerprint", &fp] } else { &[] };
    let from_backup = |repos: &[&Path]| from_backup(repos, "web1", &target, "web1-dr", extra);
    let sun = Point { repo: &r1, vm: "web1", id: "sun", time: SUN, parent: None }.create(None, &[(&[0, 1], 1)]);
    from_backup(&[&r1]).expect_code(0);
    let mon = Point { repo: &r2, vm: "web1", id: "mon", time: MON, parent: None }.create(Some(&sun), &[(&[4], 2)]);
    let tue = Point { repo: &r1, vm: "web1", id: "tue", time: TUE, parent: Some("sun") }
        .create(None, &[(&[4], 2), (&[9], 3)]);
    // A run for Monday was interrupted (before any disk data).
    let pending = |t: &str| {
        let store = Datastore::open(&ds).unwrap();
        let r = store.lock_replica("web1-dr", "test", 0, 0).unwrap();
        r.write_session(&SessionState {
            version: ferry_datastore::store::DATASTORE_VERSION,
            session_id: "00".repeat(16),
            point_time_ns: ferry_planner::time::parse_rfc3339(t).unwrap(),
            started_ns: 0,
            disks: Default::default(),
        })
        .unwrap();
    };
    pending("2026-11-22T12:00:00Z");
    let r = from_backup(&[&r1, &r2]);
    r.expect_code(2);
    assert!(r.summary()["error"].as_str().unwrap().contains("interrupted session"), "{}", r.stdout);
    pending(MON);
    let r = from_backup(&[&r1, &r2]);
    r.expect_code(0);
    assert!(r.stdout.contains("has an interrupted session for restore point"), "{}", r.stdout);
    let times: Vec<Value> = point_done(&r).iter().map(|p| p["point_time"].clone()).collect();
    assert_eq!(times, [MON, TUE], "{}", r.stdout);
    let pts = points_of(&ds, "web1-dr");
    assert_eq!(pts.len(), 3);
    for (p, img) in pts[1..].iter().zip([&mon, &tue]) {
        let id = p["id"].as_u64().unwrap();
        let want = reference(img, &tmp.path().join(format!("ref-{id}.raw")));
        let got = export(&ds, "web1-dr", id, &tmp.path().join(format!("exp-{id}.raw")));
        assert!(same_bytes(&got, &want), "point {id}");
    }
}

/// A remote target (`ferry serve`): the replica's latest point time comes from a plan-only session.
#[test]
fn remote_target() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (repo, remote) = (tmp.path().join("repo"), tmp.path().join("remote"));
    let token = new_token(tmp.path(), "token");
    let server = Server::start(&remote, &token, &[]);
    let extra = ["--token-file", s(&token), "--fingerprint", &server.fingerprint];
    let target = PathBuf::from(&server.url);
    let sun = Point { repo: &repo, vm: "web1", id: "sun", time: SUN, parent: None }.create(None, &[(&[0, 1], 1)]);
    from_backup(&[&repo], "web1", &target, "web1", &extra).expect_code(0);
    let r = from_backup(&[&repo], "web1", &target, "web1", &extra);
    r.expect_code(3);
    assert_eq!(r.summary()["status"], "warning");
    let mon = Point { repo: &repo, vm: "web1", id: "mon", time: MON, parent: Some("sun") }.create(None, &[(&[5], 2)]);
    let r = from_backup(&[&repo], "web1", &target, "web1", &extra);
    r.expect_code(0);
    let sum = r.summary();
    assert_eq!((sum["point_time"].as_str(), sum["disks"][0]["mode"].as_str()), (Some(MON), Some("cbt")), "{sum}");
    assert_eq!(chunks_sent(&sum), 1);
    drop(server);
    let pts = points_of(&remote, "web1");
    for (p, img) in pts.iter().zip([&sun, &mon]) {
        let id = p["id"].as_u64().unwrap();
        let want = reference(img, &tmp.path().join(format!("ref-{id}.raw")));
        assert!(same_bytes(&export(&remote, "web1", id, &tmp.path().join(format!("exp-{id}.raw"))), &want));
    }
}
