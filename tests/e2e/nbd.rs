//! NBD sources: qcow2 images served by real qemu-nbd, persistent dirty
//! bitmaps as CBT (qemu-bitmap:NAME), base:allocation hole skipping, and
//! servers that are gone, hang or send garbage. Skipped with a note when
//! qemu-nbd, qemu-img or qemu-io is missing.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * KIB;

pub(super) fn have_qemu() -> bool {
    let ok = |p: &str| Command::new(p).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if ok("qemu-nbd") && ok("qemu-img") && ok("qemu-io") {
        true
    } else {
        eprintln!("note: qemu-nbd/qemu-img/qemu-io not installed, skipping this test");
        false
    }
}

/// Run a program; panic with its output unless it succeeds.
pub(super) fn sh(prog: &str, args: &[&str]) {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// qemu-io writes of (pattern, offset, length) into a qcow2.
fn qemu_write(img: &Path, writes: &[(u8, u64, u64)]) {
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    for (p, off, len) in writes {
        args.extend(["-c".into(), format!("write -P {p} {off} {len}")]);
    }
    args.push(s(img).into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sh("qemu-io", &args);
}

/// The raw contents of a qcow2, as qemu-img sees them.
fn reference(img: &Path, out: &Path) -> PathBuf {
    let _ = std::fs::remove_file(out);
    sh("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", s(img), s(out)]);
    out.to_path_buf()
}

/// Distinct chunks overlapping the written ranges.
fn chunks_of(writes: &[(u8, u64, u64)]) -> u64 {
    let set: std::collections::BTreeSet<u64> =
        writes.iter().flat_map(|&(_, off, len)| off / CHUNK..(off + len).div_ceil(CHUNK)).collect();
    set.len() as u64
}

/// `ferry replicate --json --replica vm --target DS --chunk-size 64K --source d=URI EXTRA`.
fn replicate_nbd(ds: &Path, uri: &str, extra: &[&str]) -> Run {
    let mut args = vec!["replicate", "--json", "--replica", "vm", "--target", s(ds), "--chunk-size", "64K"];
    let source = format!("d={uri}");
    args.extend(["--source", &source]);
    args.extend(extra);
    run(args)
}

pub(super) fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn qcow2_full_then_bitmap_incrementals_with_rotation() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.qcow2");
    let sock = dir.path().join("nbd.sock");
    let ds = dir.path().join("ds");
    sh("qemu-img", &["create", "-f", "qcow2", s(&img), "16M"]);
    qemu_write(&img, &[(1, 0, 3 * MIB), (3, 5 * MIB, 512 * KIB)]);
    sh("qemu-img", &["bitmap", "--add", "--enable", s(&img), "b0"]);
    // Dirty in b0: chunk 16; chunks 96 and 97 (100 KiB from 6 MiB); chunk 200 (an unaligned 4 KiB).
    let b0_writes = [(7, MIB, 64 * KIB), (8, 6 * MIB, 100 * KIB), (9, 200 * CHUNK + 8 * KIB, 4 * KIB)];
    qemu_write(&img, &b0_writes);

    // Full: the replica equals what qemu-img reads.
    let srv = QemuNbd::start(&img, &sock, &["-r"]);
    let r = replicate_nbd(&ds, &srv.uri, &[]);
    r.expect_code(0);
    let d = &r.summary()["disks"][0];
    assert_eq!(d["mode"], "full", "{d}");
    assert_eq!(u(&d["size"]), 16 * MIB, "the size comes from the export");
    drop(srv);
    let ref1 = reference(&img, &dir.path().join("ref1.raw"));
    assert_replica_equals(&ds, "vm", "d", &ref1);

    // Incremental from b0: exactly the chunks it marks, all data.
    let srv = QemuNbd::start(&img, &sock, &["-r", "-B", "b0"]);
    let r = replicate_nbd(&ds, &srv.uri, &["--cbt", "d=qemu-bitmap:b0"]);
    r.expect_code(0);
    let d = &r.summary()["disks"][0];
    assert_eq!(d["mode"], "cbt");
    assert_eq!(chunks_of(&b0_writes), 4);
    assert_eq!(u(&d["chunks_planned"]), 4, "{d}");
    assert_eq!(u(&d["chunks_sent"]), 4, "{d}");
    assert_eq!(u(&d["chunks_zero"]), 0, "{d}");
    assert_eq!(u(&d["bytes_read"]), 4 * CHUNK, "{d}");
    drop(srv);
    assert_replica_equals(&ds, "vm", "d", &ref1);

    // Rotation: freeze b0, start b1, write more; the next incremental is b1's chunks.
    sh("qemu-img", &["bitmap", "--disable", s(&img), "b0"]);
    sh("qemu-img", &["bitmap", "--add", "--enable", s(&img), "b1"]);
    // Chunks 160..163 and 255 (the last, through the disk's end).
    let b1_writes = [(5, 10 * MIB, 200 * KIB), (6, 16 * MIB - 16 * KIB, 16 * KIB)];
    qemu_write(&img, &b1_writes);
    let ref2 = reference(&img, &dir.path().join("ref2.raw"));
    let srv = QemuNbd::start(&img, &sock, &["-r", "-B", "b1"]);
    let r = replicate_nbd(&ds, &srv.uri, &["--cbt", "d=qemu-bitmap:b1"]);
    r.expect_code(0);
    let d = &r.summary()["disks"][0];
    assert_eq!(chunks_of(&b1_writes), 5);
    assert_eq!(u(&d["chunks_planned"]), 5, "{d}");
    assert_eq!(u(&d["chunks_sent"]), 5, "{d}");
    drop(srv);
    assert_replica_equals(&ds, "vm", "d", &ref2);
    assert!(!same_bytes(&ref1, &ref2));
}

#[test]
fn holes_are_not_read_and_the_replica_is_identical() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.qcow2");
    let sock = dir.path().join("nbd.sock");
    let ds = dir.path().join("ds");
    sh("qemu-img", &["create", "-f", "qcow2", s(&img), "64M"]);
    qemu_write(&img, &[(0x5a, 10 * MIB, MIB), (0x33, 40 * MIB, MIB)]);
    let reference = reference(&img, &dir.path().join("ref.raw"));
    let srv = QemuNbd::start(&img, &sock, &["-r"]);
    let r = replicate_nbd(&ds, &srv.uri, &["--compress", "none"]);
    r.expect_code(0);
    let s = r.summary();
    assert_eq!(s["backend"], "nbd");
    let t = &s["totals"];
    assert_eq!(u(&t["bytes_read"]), 2 * MIB, "only the data is read from the export: {t}");
    assert_eq!(u(&t["bytes_hole_skipped"]), 62 * MIB, "{t}");
    assert_eq!(u(&t["bytes_zero"]), 62 * MIB, "{t}");
    assert_eq!(u(&t["chunks_sent"]), 32, "{t}");
    drop(srv);
    assert_replica_equals(&ds, "vm", "d", &reference);
}

#[test]
fn a_missing_bitmap_and_a_file_source_with_qemu_bitmap_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.qcow2");
    let sock = dir.path().join("nbd.sock");
    let ds = dir.path().join("ds");
    sh("qemu-img", &["create", "-f", "qcow2", s(&img), "4M"]);
    sh("qemu-img", &["bitmap", "--add", "--enable", s(&img), "b0"]);
    let srv = QemuNbd::start(&img, &sock, &["-r", "-B", "b0"]);
    let r = replicate_nbd(&ds, &srv.uri, &["--cbt", "d=qemu-bitmap:nosuchbitmap"]);
    assert!(r.code == 1 || r.code == 2, "exit {}: {}", r.code, r.stderr);
    assert!(r.stderr.contains("nosuchbitmap"), "{}", r.stderr);
    drop(srv);

    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, vec![1u8; 64 * 1024]).unwrap();
    let r = replicate_nbd(&ds, s(&raw), &["--cbt", "d=qemu-bitmap:b0"]);
    r.expect_code(2);
    assert!(r.stderr.contains("qemu-bitmap CBT needs an NBD source"), "{}", r.stderr);
}

#[test]
fn a_dead_socket_fails_with_the_uri() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("nbd+unix:///?socket={}", s(&dir.path().join("gone.sock")));
    let r = replicate_nbd(&dir.path().join("ds"), &uri, &[]);
    r.expect_code(1);
    assert!(r.stderr.contains(&uri), "{}", r.stderr);
    assert!(r.stderr.contains("disk \"d\""), "{}", r.stderr);
}

/// A fake server on a Unix socket: each connection gets `greet` and is then left hanging.
fn fake_server(sock: &Path, greet: &'static [u8]) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.write_all(greet);
            std::thread::sleep(Duration::from_secs(3));
        }
    })
}

#[test]
fn a_hanging_or_garbage_server_fails_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    for (name, greet, expect) in
        [("hang", &b""[..], "timed out"), ("garbage", &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..], "magic")]
    {
        let sock = dir.path().join(format!("{name}.sock"));
        let server = fake_server(&sock, greet);
        let uri = format!("nbd+unix:///?socket={}", s(&sock));
        // The binary may still have to be built: not inside the timed window.
        let mut cmd = ferry();
        let t = Instant::now();
        let out = cmd
            .args(["replicate", "--replica", "vm", "--target", s(&dir.path().join("ds")), "--source"])
            .arg(format!("d={uri}"))
            .env("FERRY_NBD_TIMEOUT", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(t.elapsed() < Duration::from_secs(5), "{name}: took {:?}", t.elapsed());
        assert!(stderr.contains(&uri) && stderr.contains(expect), "{name}: {stderr}");
        server.join().unwrap();
    }
}
