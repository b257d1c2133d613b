//! NBD targets: replica disks placed behind a writable qemu-nbd export of a
//! qcow2 file (`DATASTORE/REPLICA/disks/DISK.nbd`). Every check ends with
//! `qemu-img compare` of the source and the qcow2 after qemu-nbd was
//! SIGKILLed: what ferry FLUSHed at its checkpoints is all there is.
//! Skipped with a note when qemu-nbd, qemu-img or qemu-io is missing.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::Value;

use super::nbd::{have_qemu, sh, u};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * KIB;

/// `qemu-img compare` of a raw source and the qcow2: exit 0 and "Images are identical."
/// (qemu-img checks that the part of the larger image past the smaller one's end is zeros).
fn assert_identical(src: &Path, qcow2: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", s(src), s(qcow2)])
        .output()
        .expect("run qemu-img compare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // A larger export gets a size warning; its extra area is compared against zeros.
    let lines: Vec<&str> = stdout.lines().filter(|l| *l != "Warning: Image size mismatch!").collect();
    assert_eq!(
        (out.status.code(), lines),
        (Some(0), vec!["Images are identical."]),
        "{} vs {}: {stdout}{}",
        src.display(),
        qcow2.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A datastore prepared by hand, as docs/NBD.md says: `mkdir -p DS/vm/disks`, then `d0.nbd`.
fn place(ds: &Path, uri: &str) {
    std::fs::create_dir_all(ds.join("vm/disks")).unwrap();
    std::fs::write(ds.join("vm/disks/d0.nbd"), format!("{uri}\n")).unwrap();
}

fn replicate(target: &str, src: &Path, extra: &[&str]) -> Run {
    let source = format!("d0={}", s(src));
    let mut args = vec!["replicate", "--json", "--replica", "vm", "--target", target, "--chunk-size", "64K"];
    args.extend(["--source", &source]);
    args.extend(extra);
    run(args)
}

fn disk0(r: &Run) -> Value {
    r.summary()["disks"][0].clone()
}

fn copy(from: &Path, to: &Path) -> PathBuf {
    std::fs::copy(from, to).unwrap();
    to.to_path_buf()
}

/// Overwrite `[off, off+len)` of a file with zeros.
fn zero_range(path: &Path, off: u64, len: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    write_at(&mut f, off, &vec![0u8; len as usize]);
    f.sync_all().unwrap();
}

#[test]
fn qcow2_behind_qemu_nbd_full_incremental_zero_runs_points_and_verify() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let qcow2 = dir.path().join("t.qcow2");
    let sock = dir.path().join("t.sock");
    let ds = dir.path().join("ds");
    // 32 MiB of random, zero and text 1 MiB regions; the export is 4 MiB larger, and holds
    // stale bytes inside the disk and in its tail that must not survive.
    write_image(&src, 32 * MIB, 11, &[Fill::Random, Fill::Zero, Fill::Text, Fill::Zero]);
    sh("qemu-img", &["create", "-f", "qcow2", s(&qcow2), "36M"]);
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0x77 1M 256K", "-c", "write -P 0x66 33M 1M", s(&qcow2)]);
    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    place(&ds, &srv.uri);

    // First run: the export may hold a copy, so the source compares digests; only the data
    // chunks travel (16 MiB of the 32 are data: 256 chunks), and the stale 256 KiB becomes zeros.
    let r = replicate(s(&ds), &src, &[]);
    r.expect_code(0);
    let d = disk0(&r);
    assert_eq!(d["mode"], "digest", "{d}");
    assert_eq!(u(&d["size"]), 32 * MIB, "{d}");
    assert_eq!(u(&d["chunks_sent"]), 256, "{d}");
    assert_eq!(u(&d["chunks_zero"]), 4, "the four stale chunks in a zero region: {d}");
    assert_eq!(std::fs::read_to_string(ds.join("vm/disks/d0.nbd")).unwrap(), format!("{}\n", srv.uri));
    assert!(!ds.join("vm/disks/d0.img").exists(), "the image lives behind the export");
    srv.kill();
    assert_identical(&src, &qcow2);
    let v1 = copy(&src, &dir.path().join("v1.raw"));

    // Incremental over TCP through `ferry serve`: 1% of the chunks mutated, and one data
    // region (MiB 4, 16 chunks) turned to zeros.
    let changed = mutate_blocks(&src, CHUNK, 5, 12);
    zero_range(&src, 4 * MIB, MIB);
    let zeroed: Vec<u64> = (4 * MIB / CHUNK..5 * MIB / CHUNK).collect();
    let data: Vec<u64> = changed.iter().copied().filter(|c| !zeroed.contains(c)).collect();
    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    let r = replicate(&server.url, &src, &["--token-file", s(&token), "--fingerprint", &server.fingerprint]);
    r.expect_code(0);
    let d = disk0(&r);
    assert_eq!(d["mode"], "digest", "{d}");
    assert_eq!(u(&d["chunks_sent"]), data.len() as u64, "exactly the mutated chunks: {d}");
    assert_eq!(u(&d["chunks_zero"]), 16, "the region turned to zeros: {d}");
    let sessions = server.sessions(1);
    assert_eq!(u(&sessions[0]["chunks_written"]), data.len() as u64, "{}", sessions[0]);
    assert_eq!(u(&sessions[0]["chunks_zero"]), 16, "{}", sessions[0]);
    srv.kill();
    assert_identical(&src, &qcow2);

    // Points: point 1 is rebuilt from the export and the undo file; the latest reads the export.
    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    let out = dir.path().join("p1.raw");
    run(["points", "export", "--target", s(&ds), "--replica", "vm", "--disk", "d0", "--point", "1", "--out", s(&out)])
        .expect_code(0);
    assert!(same_bytes(&out, &v1), "point 1 is the first source version byte for byte");
    assert_replica_equals(&ds, "vm", "d0", &src);
    let r = run(["points", "verify", "--target", s(&ds), "--replica", "vm"]);
    r.expect_code(0);

    // Rollback to point 1 rewrites the export from the undo file: the qcow2 is v1 again.
    run(["points", "rollback", "--target", s(&ds), "--replica", "vm", "--point", "1", "--yes"]).expect_code(0);
    run(["points", "verify", "--target", s(&ds), "--replica", "vm"]).expect_code(0);
    srv.kill();
    assert_identical(&v1, &qcow2);
}

#[test]
fn a_disk_larger_than_its_export_is_refused_and_nothing_is_written() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let qcow2 = dir.path().join("t.qcow2");
    let sock = dir.path().join("t.sock");
    let ds = dir.path().join("ds");
    write_image(&src, 8 * MIB, 3, &[Fill::Random]);
    sh("qemu-img", &["create", "-f", "qcow2", s(&qcow2), "4M"]);
    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    place(&ds, &srv.uri);
    let r = replicate(s(&ds), &src, &[]);
    // Exit 2: the export must be grown before a retry can help.
    r.expect_code(2);
    let want = format!(
        "disk \"d0\" is 8388608 bytes but its NBD export {} has only 4194304 bytes; ferry cannot resize an \
         export: grow the image behind it (for example `qemu-img resize -f qcow2 IMAGE 8388608`) and restart \
         qemu-nbd",
        srv.uri
    );
    assert!(r.stderr.contains(&want), "{}", r.stderr);
    assert_eq!(r.summary()["status"], "failed");
    srv.kill();
    // Nothing written: no point, no session to resume, and the qcow2 is still empty.
    assert!(!ds.join("vm/catalog.json").exists());
    assert!(!ds.join("vm/session.json").exists(), "a session that opened no disk leaves no state");
    let empty = dir.path().join("empty.raw");
    std::fs::File::create(&empty).unwrap().set_len(4 * MIB).unwrap();
    assert_identical(&empty, &qcow2);
    let map = Command::new("qemu-img").args(["map", "--output=json", s(&qcow2)]).output().unwrap();
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    assert!(map.as_array().unwrap().iter().all(|e| e["data"] == false), "nothing allocated: {map}");

    // Grown as the message says, the same run goes through.
    sh("qemu-img", &["resize", "-f", "qcow2", s(&qcow2), "8388608"]);
    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    replicate(s(&ds), &src, &[]).expect_code(0);
    srv.kill();
    assert_identical(&src, &qcow2);
}

#[test]
fn qemu_nbd_killed_mid_run_fails_with_the_uri_and_a_rerun_resumes() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let qcow2 = dir.path().join("t.qcow2");
    let sock = dir.path().join("t.sock");
    let ds = dir.path().join("ds");
    write_image(&src, 128 * MIB, 5, &[Fill::Random]);
    sh("qemu-img", &["create", "-f", "qcow2", s(&qcow2), "128M"]);
    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    place(&ds, &srv.uri);
    let uri = srv.uri.clone();
    let mut child = ferry()
        .args(["replicate", "--json", "--replica", "vm", "--target", s(&ds), "--chunk-size", "64K"])
        .args(["--compress", "none", "--checkpoint-every", "1M", "--source"])
        .arg(format!("d0={}", s(&src)))
        .env("FERRY_NBD_TIMEOUT", "5")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the export once the first checkpoint is durable.
    let session = ds.join("vm/session.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let next = std::fs::read(&session)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["disks"]["d0"]["next_chunk"].as_u64());
        if next.is_some_and(|n| n >= 16) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "ferry ended before its first checkpoint");
        assert!(Instant::now() < deadline, "no checkpoint in 30 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    srv.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("disk \"d0\" on NBD export {uri}")), "{stderr}");
    assert!(session.exists(), "the session can be resumed");

    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    let r = replicate(s(&ds), &src, &[]);
    r.expect_code(0);
    assert_eq!(r.summary()["resumed"], true, "{}", r.stdout);
    srv.kill();
    assert_identical(&src, &qcow2);
    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    run(["points", "verify", "--target", s(&ds), "--replica", "vm"]).expect_code(0);
    drop(srv);
}

#[test]
fn a_read_only_export_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let qcow2 = dir.path().join("t.qcow2");
    let sock = dir.path().join("t.sock");
    let ds = dir.path().join("ds");
    write_image(&src, MIB, 3, &[Fill::Text]);
    sh("qemu-img", &["create", "-f", "qcow2", s(&qcow2), "1M"]);
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", &format!("--socket={}", s(&sock)), s(&qcow2)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    place(&ds, &uri);
    let r = replicate(s(&ds), &src, &[]);
    let _ = child.kill();
    let _ = child.wait();
    // Exit 2: the export must be served writable before a retry can help.
    r.expect_code(2);
    let want = format!("disk \"d0\": the NBD export {uri} (named in {}) is read-only", s(&ds.join("vm/disks/d0.nbd")));
    assert!(r.stderr.contains(&want), "{}", r.stderr);
}

#[test]
fn a_disk_that_shrinks_and_grows_inside_its_export_stays_identical_and_keeps_its_points() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let qcow2 = dir.path().join("t.qcow2");
    let sock = dir.path().join("t.sock");
    let ds = dir.path().join("ds");
    write_image(&src, 8 * MIB, 21, &[Fill::Random, Fill::Text]);
    sh("qemu-img", &["create", "-f", "qcow2", s(&qcow2), "12M"]);
    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    place(&ds, &srv.uri);
    replicate(s(&ds), &src, &[]).expect_code(0);
    let v1 = copy(&src, &dir.path().join("v1.raw"));

    // Shrink to 6 MiB: the cut 2 MiB are zeroed in the export (and saved for point 1).
    std::fs::OpenOptions::new().write(true).open(&src).unwrap().set_len(6 * MIB).unwrap();
    let r = replicate(s(&ds), &src, &[]);
    r.expect_code(0);
    assert_eq!(u(&disk0(&r)["size"]), 6 * MIB);
    let v2 = copy(&src, &dir.path().join("v2.raw"));
    srv.kill();
    assert_identical(&src, &qcow2);

    // Grow to 10 MiB with new data at the end: only those chunks travel.
    let srv = QemuNbd::start(&qcow2, &sock, &[]);
    let mut f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.set_len(10 * MIB).unwrap();
    write_at(&mut f, 9 * MIB, &vec![0x5au8; MIB as usize]);
    drop(f);
    let r = replicate(s(&ds), &src, &[]);
    r.expect_code(0);
    assert_eq!(u(&disk0(&r)["chunks_sent"]), MIB / CHUNK, "{}", disk0(&r));
    srv.kill();
    assert_identical(&src, &qcow2);

    let _srv = QemuNbd::start(&qcow2, &sock, &[]);
    for (point, want) in [(1, &v1), (2, &v2)] {
        let out = dir.path().join(format!("p{point}.raw"));
        let p = point.to_string();
        run([
            "points",
            "export",
            "--target",
            s(&ds),
            "--replica",
            "vm",
            "--disk",
            "d0",
            "--point",
            &p,
            "--out",
            s(&out),
        ])
        .expect_code(0);
        assert!(same_bytes(&out, want), "point {point}");
    }
    run(["points", "verify", "--target", s(&ds), "--replica", "vm"]).expect_code(0);
}
