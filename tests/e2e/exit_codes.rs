//! Exit codes by error class (README.md, "Exit codes"): 1 failed (a retry may
//! help), 2 usage or configuration, 3 finished with a warning, 4 replica busy.
//! Each case names the class a scheduler must read from it. (Nothing new from
//! backups, exit 3, is pinned by backup.rs.)

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn a_bad_flag_or_bad_setting_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    run(["replicate", "--no-such-flag"]).expect_code(2);
    let img = dir.path().join("d.img");
    write_image(&img, MIB, 1, &[Fill::Text]);
    let ds = dir.path().join("ds");
    let r = run(["replicate", "--source", s(&img), "--target", s(&ds), "--replica", "r", "--chunk-size", "3K"]);
    r.expect_code(2);
    assert!(r.stderr.contains("--chunk-size 3K"), "{}", r.stderr);
    // A source that does not exist: nothing a retry can fix.
    let gone = dir.path().join("gone.img");
    let r = run(["replicate", "--source", s(&gone), "--target", s(&ds), "--replica", "r"]);
    r.expect_code(2);
    assert!(r.stderr.contains(&format!("opening source disk {}: No such file", gone.display())), "{}", r.stderr);
}

/// One attempt (no retries) to replicate `img` to the remote `url`.
fn replicate_once(url: &str, token: &Path, img: &Path, extra: &[&str]) -> Run {
    let args = ["replicate", "--source", s(img), "--target", url, "--token-file", s(token), "--replica", "vm"];
    run(args.into_iter().chain(["--retry-for", "0"]).chain(extra.iter().copied()))
}

/// Hold the replica's lock as a running session does.
fn hold_lock(ds: &Path, replica: &str) -> std::fs::File {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(ds.join(replica).join("lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    (&f).write_all(b"test holder").unwrap();
    f
}

#[test]
fn a_second_writer_to_a_busy_replica_exits_4_locally_and_remotely() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, 2 * MIB, 2, &[Fill::Text, Fill::Random]);
    let ds = dir.path().join("ds");
    run(["replicate", "--source", s(&img), "--target", s(&ds), "--replica", "vm"]).expect_code(0);
    let _lock = hold_lock(&ds, "vm");
    // --retry-for 0: with time to retry, a run waits for a busy replica instead.
    let r =
        run(["replicate", "--json", "--source", s(&img), "--target", s(&ds), "--replica", "vm", "--retry-for", "0"]);
    r.expect_code(4);
    assert!(r.stderr.contains("is in use by another session"), "{}", r.stderr);
    assert_eq!(r.summary()["status"], "failed");
    // Through a server: the target's ReplicaBusy code is the same class at the source.
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    let r = replicate_once(&server.url, &token, &img, &server.pin());
    r.expect_code(4);
    assert!(r.stderr.contains("in use by another session"), "{}", r.stderr);
    // Local maintenance on a busy replica too.
    let r = run(["points", "prune", "--target", s(&ds), "--replica", "vm"]);
    r.expect_code(4);
}

#[test]
fn a_source_truncated_during_the_run_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, 48 * MIB, 3, &[Fill::Text, Fill::Random, Fill::Text]);
    let ds = dir.path().join("ds");
    // zstd level 19 keeps the source busy for seconds: the truncation lands mid-run.
    let mut child = ferry()
        .args(["replicate", "--json", "--compress", "zstd:19", "--source"])
        .arg(format!("d={}", s(&img)))
        .args(["--target", s(&ds), "--replica", "vm"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "ferry ended before its first progress event");
        if line.contains("\"event\":\"progress\"") {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(4 * MIB).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("was it truncated during the run?") || err.contains("changed size during the run"), "{err}");
    assert!(rest.contains("\"status\":\"failed\""), "{rest}");
}

#[test]
fn an_nbd_source_whose_reads_fail_with_eio_exits_1() {
    if Command::new("nbdkit").arg("--version").output().is_err() {
        eprintln!("skipped: nbdkit is not installed (Debian package nbdkit)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    // The pattern plugin has data everywhere (no holes to skip); every read fails with EIO.
    let mut nbdkit = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(&sock)
        .args(["--filter=error", "pattern", "size=8M", "error-pread=EIO", "error-pread-rate=100%"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ds = dir.path().join("ds");
    let uri = format!("d=nbd+unix:///?socket={}", s(&sock));
    let r = run(["replicate", "--json", "--source", &uri, "--target", s(&ds), "--replica", "vm"]);
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    r.expect_code(1);
    assert!(r.stderr.contains("NBD source nbd+unix:///?socket=") && r.stderr.contains("EIO"), "{}", r.stderr);
    assert_eq!(r.summary()["status"], "failed");
}

#[test]
fn a_target_that_breaks_the_protocol_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, MIB, 4, &[Fill::Text]);
    let token = new_token(dir.path(), "token");
    // Not a ferry server: it answers the handshake with garbage; in plaintext the ferry
    // deframer refuses it, over TLS (the default) the TLS handshake does.
    for (extra, expected) in [
        (&["--insecure-plaintext"][..], "not a ferry stream"),
        (&["--fingerprint", &format!("sha256:{}", "ab".repeat(32))][..], "TLS session with"),
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ferry://{}", listener.local_addr().unwrap());
        let garbage = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let _ = c.write_all(&[0x5a; 512]);
            std::thread::sleep(Duration::from_millis(500));
        });
        let r = replicate_once(&url, &token, &img, extra);
        garbage.join().unwrap();
        r.expect_code(1);
        assert!(r.stderr.contains(expected), "{}", r.stderr);
    }
}
