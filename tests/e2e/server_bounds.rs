//! A server that cannot be knocked over (issue 16): pre-authentication limits,
//! connection and session limits, the idle timeout, the disk size cap, and plan
//! sessions that change nothing. Abusive peers are raw TCP clients; an
//! authenticated raw client speaks the protocol through ferry-wire's `Session`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_io::process::{raise_open_files_limit, signal_process, Signal};
use ferry_replicate::auth::TokenAuth;
use ferry_tests::*;
use ferry_wire::{
    encode_header, frame_type, Deframer, ErrorCode, Event, Frame, LocalInfo, Mode, OpenDisk, OpenReplica, Session,
    FEATURES_V1,
};

const MIB: u64 = 1 << 20;

fn addr_of(server: &Server) -> String {
    server.url.strip_prefix("ferry://").expect("ferry url").to_string()
}

/// Threads and resident memory (KiB) of process `pid`, from /proc/PID/status.
fn threads_and_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in status"));
        line.split_whitespace().nth(1).expect("value").parse().expect("number")
    };
    (field("Threads:"), field("VmRSS:"))
}

/// The process's threads by name, counted ("ferry-session" 1, "iou-wrk-123" folded into "iou-wrk" 3, ...).
fn thread_names(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut names = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = comm.trim().trim_end_matches(|c: char| c.is_ascii_digit() || c == '-').to_string();
        *names.entry(name).or_insert(0) += 1;
    }
    names
}

/// Wait up to `within` for `f` to hold.
fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// True when the server closed `c` (end of stream or reset), false while it is open.
fn closed_by_server(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut b = [0u8; 256];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // an Error frame before the close
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A client that speaks the protocol itself (for frames ferry's own source never sends).
struct RawClient {
    sock: TcpStream,
    session: Session,
}

impl RawClient {
    /// Connect and authenticate with `token`.
    fn connect(addr: &str, token: &Path) -> RawClient {
        let auth = Arc::new(TokenAuth::from_file(token).expect("token"));
        let local = LocalInfo { name: "raw".into(), software: "test".into(), nonce: [9; 32], features: FEATURES_V1 };
        let mut c = RawClient {
            sock: TcpStream::connect(addr).expect("connect"),
            session: Session::client(local, auth, [0; 32]),
        };
        c.sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.flush();
        match c.next_event() {
            Ok(Event::Authenticated(_)) => c,
            other => panic!("handshake: {other:?}"),
        }
    }

    fn flush(&mut self) {
        if let Some(b) = self.session.take_transmit() {
            self.sock.write_all(&b).expect("write");
        }
    }

    fn send(&mut self, f: Frame) {
        self.session.send(&f).expect("send");
        self.flush();
    }

    /// The next event, or the error the server reported.
    fn next_event(&mut self) -> Result<Event, ferry_wire::WireError> {
        loop {
            if let Some(ev) = self.session.poll_event()? {
                self.flush();
                return Ok(ev);
            }
            self.flush();
            let mut b = [0u8; 65536];
            let n = self.sock.read(&mut b).expect("read");
            assert!(n > 0, "server closed the connection without an Error frame");
            self.session.receive(&b[..n]);
        }
    }

    fn open_replica(&mut self, replica: &str, flags: u8) {
        self.send(Frame::OpenReplica(OpenReplica {
            replica: replica.into(),
            point_time_ns: 1_700_000_000_000_000_000,
            session_id: [5; 16],
            retain: 0,
            flags,
        }));
        match self.next_event() {
            Ok(Event::Frame(Frame::ReplicaOpened(_))) => {}
            other => panic!("OpenReplica: {other:?}"),
        }
    }

    /// Open disk `disk` of `size` bytes: the server's answer.
    fn open_disk(&mut self, disk: u32, name: &str, size: u64, chunk_size: u32) -> Result<Event, ferry_wire::WireError> {
        self.send(Frame::OpenDisk(OpenDisk { disk, name: name.into(), size, chunk_size, mode: Mode::Full }));
        self.next_event()
    }

    /// Open a disk of `size` bytes; the server's refusal.
    fn open_disk_refused(&mut self, name: &str, size: u64, chunk_size: u32) -> (ErrorCode, String) {
        match self.open_disk(0, name, size, chunk_size) {
            Err(ferry_wire::WireError::Remote { code, message }) => (code, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

/// Every file and directory under `root`: path, size, mode and (files) the BLAKE3 of the contents.
fn tree_snapshot(root: &Path) -> Vec<(PathBuf, u64, u32, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let contents = if m.is_file() {
                blake3::hash(&std::fs::read(&p).unwrap()).to_hex().to_string()
            } else {
                String::new()
            };
            if m.is_dir() {
                todo.push(p.clone());
            }
            out.push((p.strip_prefix(root).unwrap().to_path_buf(), m.len(), m.permissions().mode(), contents));
        }
    }
    out.sort();
    out
}

fn replicate_args<'a>(url: &'a str, token: &'a Path, replica: &'a str, source: &'a str) -> Vec<&'a str> {
    // These servers speak plaintext: the abuse below is raw bytes (TLS is tests/e2e/tls.rs').
    vec![
        "replicate",
        "--json",
        "--insecure-plaintext",
        "--source",
        source,
        "--target",
        url,
        "--token-file",
        s(token),
        "--replica",
        replica,
    ]
}

#[test]
fn two_thousand_idle_and_two_hundred_dribbling_connections_do_not_stop_a_replicate() {
    const IDLE: usize = 2000;
    const DRIBBLERS: usize = 200;
    const HANDSHAKE: Duration = Duration::from_secs(15);
    assert!(raise_open_files_limit(8192).unwrap() >= 8192, "this test needs 8192 open files");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, 32 * MIB, 51, &[Fill::Text, Fill::Random, Fill::Zero]);
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &["--insecure-plaintext", "--handshake-timeout", "15s"]);
    let addr = addr_of(&server);
    let pid = server.pid();
    let (base_threads, base_rss) = threads_and_rss(pid);

    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = (0..IDLE).map(|_| TcpStream::connect(&addr).expect("idle connect")).collect();
    let mut dribblers: Vec<TcpStream> = (0..DRIBBLERS).map(|_| TcpStream::connect(&addr).expect("connect")).collect();
    let connected = Instant::now();
    // One byte of a Hello every 2 s each (the first one now): a handshake that never ends.
    let hello_head = encode_header(frame_type::HELLO, 0, 100);
    let stop = Arc::new(AtomicBool::new(false));
    let dribbling = {
        let socks: Vec<TcpStream> = dribblers.iter().map(|c| c.try_clone().unwrap()).collect();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut socks = socks;
            for i in 0.. {
                for c in socks.iter_mut() {
                    let _ = c.write_all(&hello_head[i % hello_head.len()..][..1]);
                }
                for _ in 0..100 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        })
    };
    // Each dribbler has a handshake thread; the idle ones have none.
    let all_in = wait_until(Duration::from_secs(10), || threads_and_rss(pid).0 >= base_threads + DRIBBLERS as u64);
    let (held_threads, held_rss) = threads_and_rss(pid);
    assert!(all_in, "server threads {held_threads}, expected {base_threads} + {DRIBBLERS}");

    // A real replicate while all of them are held, the server sampled meanwhile.
    let peak = Arc::new(std::sync::Mutex::new((0u64, 0u64, Default::default())));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                let (t, r) = threads_and_rss(pid);
                let mut p = peak.lock().unwrap();
                if t > p.0 {
                    p.2 = thread_names(pid);
                }
                p.0 = p.0.max(t);
                p.1 = p.1.max(r);
                drop(p);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let r = run(replicate_args(&server.url, &token, "vm", s(&img)).into_iter().chain(["--retry-for", "0"]));
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    r.expect_code(0);
    assert_replica_equals(&ds, "vm", "d.img", &img);
    assert!(opened.elapsed() < HANDSHAKE, "the replicate ran while every connection was held");
    let (peak_threads, peak_rss, ref peak_names) = *peak.lock().unwrap();
    println!(
        "ferry serve with {IDLE} idle + {DRIBBLERS} dribbling connections (opened in {:.2} s): threads {base_threads} -> {held_threads} \
         (peak {peak_threads} during a replicate: {peak_names:?}), RSS {} -> {} MiB (peak {} MiB)",
        (connected - opened).as_secs_f64(),
        base_rss / 1024,
        held_rss / 1024,
        peak_rss / 1024
    );
    // README's bounds (target/listen.rs): 2 + connections that sent something + sessions x
    // (4 + workers + io_uring's kernel workers). One session here, whose joined streams are
    // connections too; the server's --workers default is the CPU count, at most 8.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8) as u64;
    let joined = r.summary()["streams"].as_u64().expect("streams") - 1;
    let bound = base_threads + DRIBBLERS as u64 + joined + 4 + workers + u64::from(ferry_io::backend::IOWQ_MAX_WORKERS);
    assert!(held_threads <= base_threads + DRIBBLERS as u64, "held: {held_threads} threads");
    assert!(peak_threads <= bound, "peak: {peak_threads} threads, bound {bound}: {peak_names:?}");
    assert!(peak_rss < 128 * 1024, "peak RSS {peak_rss} KiB");

    // The handshake deadline is for the whole handshake: dribbling does not extend it.
    std::thread::sleep((connected + HANDSHAKE + Duration::from_secs(2)).saturating_duration_since(Instant::now()));
    assert!(connected.elapsed() < HANDSHAKE + Duration::from_secs(4), "checked soon after the deadline");
    let still_open_idle = idle.iter_mut().map(closed_by_server).filter(|&closed| !closed).count();
    let still_open_dribbling = dribblers.iter_mut().map(closed_by_server).filter(|&closed| !closed).count();
    stop.store(true, Ordering::Relaxed);
    dribbling.join().unwrap();
    assert_eq!((still_open_idle, still_open_dribbling), (0, 0), "connections left open after the deadline");
    assert!(wait_until(Duration::from_secs(5), || threads_and_rss(pid).0 <= base_threads), "threads back to base");
    let done = server.sessions(IDLE + DRIBBLERS + 1);
    let count = |what: &str| done.iter().filter(|v| v["error"].as_str().is_some_and(|e| e.contains(what))).count();
    assert_eq!(count("the handshake did not finish within 15 s (nothing received)"), IDLE);
    assert_eq!(count("the handshake did not finish within 15 s"), IDLE + DRIBBLERS);
    assert_eq!(done.iter().filter(|v| v["error"].is_null()).count(), 1, "the replicate's session");
}

#[test]
fn a_frame_over_8_kib_before_authentication_is_refused_at_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let server = Server::start(&dir.path().join("ds"), &token, &["--insecure-plaintext"]);
    let mut c = TcpStream::connect(addr_of(&server)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A Hello announcing 8 KiB + 1 of body: refused as soon as the header is in (no body sent).
    c.write_all(&encode_header(frame_type::HELLO, 0, 8 * 1024 + 1)).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("the server answers and closes at once");
    let mut d = Deframer::new();
    d.push(&got);
    match d.next_frame() {
        Ok(Some(Frame::Error(e))) => {
            assert_eq!(e.code, ErrorCode::Protocol);
            assert_eq!(e.message, "frame of type 0x01 is 8193 bytes, above the limit of 8192");
        }
        other => panic!("expected an Error frame, got {other:?}"),
    }
    // Exactly 8 KiB is not refused at its header: the server waits for the body.
    let mut c = TcpStream::connect(addr_of(&server)).unwrap();
    c.write_all(&encode_header(frame_type::HELLO, 0, 8 * 1024)).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let e = c.read(&mut [0u8; 64]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "still waiting for the body");
}

#[test]
fn a_source_refuses_a_frame_over_8_kib_before_auth_ok() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, MIB, 52, &[Fill::Text]);
    let token = new_token(dir.path(), "token");
    // A fake target: reads the Hello, answers with a header announcing a 1 MiB Welcome.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut b = [0u8; 512];
        let _ = c.read(&mut b);
        c.write_all(&encode_header(frame_type::WELCOME, 0, 1 << 20)).unwrap();
        let _ = c.read(&mut b);
    });
    let url = format!("ferry://{addr}");
    let r = run(replicate_args(&url, &token, "vm", s(&img)).into_iter().chain(["--retry-for", "0"]));
    r.expect_code(1);
    assert!(r.stderr.contains("frame of type 0x02 is 1048576 bytes, above the limit of 8192"), "stderr: {}", r.stderr);
    fake.join().unwrap();
}

#[test]
fn connections_and_sessions_over_the_limits_get_a_busy_error_and_retries_wait() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, 4 * MIB, 53, &[Fill::Text, Fill::Random]);
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &["--insecure-plaintext", "--max-connections", "3", "--max-sessions", "1"]);
    let addr = addr_of(&server);
    let once = |r: &str| run(replicate_args(&server.url, &token, r, s(&img)).into_iter().chain(["--retry-for", "0"]));

    // One authenticated session held: a second one is refused with exit 4.
    let held = RawClient::connect(&addr, &token);
    let r = once("vm");
    r.expect_code(4);
    let sessions_busy =
        "server busy: 1 sessions in progress, its limit (ferry serve --max-sessions 1); try again later";
    assert!(r.stderr.contains(sessions_busy), "stderr: {}", r.stderr);

    // Two idle connections more: 3 open, the next connection is refused before its handshake.
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    // Time for the server to accept them (generous: CI machines are loaded).
    std::thread::sleep(Duration::from_millis(1000));
    let r = once("vm");
    r.expect_code(4);
    let conns_busy = "server busy: 3 connections open, its limit (ferry serve --max-connections 3); try again later";
    assert!(r.stderr.contains(conns_busy), "stderr: {}", r.stderr);
    assert!(!ds.join("vm").exists(), "nothing was created for refused sources");
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));

    // A run with --retry-for waits while the server is busy, says so, and gets in once it is not.
    let mut waiting = ferry()
        .args(replicate_args(&server.url, &token, "vm", s(&img)))
        .args(["--retry-for", "1m"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    drop(held);
    let out = wait_output(&mut waiting, Duration::from_secs(30));
    assert_eq!(out.0, Some(0), "stderr: {}", out.2);
    let notices: Vec<String> = out
        .1
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "notice")
        .map(|v| v["message"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(notices.iter().any(|m| m.contains(sessions_busy) && m.contains("trying again in")), "notices: {notices:?}");
    assert_replica_equals(&ds, "vm", "d.img", &img);
}

/// Wait for `child` (at most `within`): exit code, stdout, stderr.
fn wait_output(child: &mut Child, within: Duration) -> (Option<i32>, String, String) {
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().unwrap();
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code(), out, err)
}

#[test]
fn an_open_disk_of_2_62_bytes_is_refused_and_plan_sessions_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, 4 * MIB, 54, &[Fill::Text, Fill::Random]);
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &["--insecure-plaintext"]);
    let addr = addr_of(&server);
    let once = |r: &str, src: &str| {
        run(replicate_args(&server.url, &token, r, src).into_iter().chain(["--retry-for", "0"])).expect_code(0);
    };
    once("vm", &format!("d={}", s(&img)));
    let before = tree_snapshot(&ds);
    let unlocked = |t: Vec<(PathBuf, u64, u32, String)>| -> Vec<_> {
        t.into_iter().filter(|e| e.0 != Path::new("vm/lock")).collect()
    };

    // 2^62 bytes, in a session that writes and in a plan: refused before anything is made (the
    // session that writes took the replica's lock: only the lock file names the new holder).
    let too_big = format!(
        "disk \"d\" is {} bytes, more than this server takes (ferry serve --max-disk-size {})",
        1u64 << 62,
        64u64 << 40
    );
    for flags in [0, OpenReplica::PLAN_ONLY] {
        let mut c = RawClient::connect(&addr, &token);
        c.open_replica("vm", flags);
        let (code, message) = c.open_disk_refused("d", 1 << 62, 65536);
        assert_eq!((code, message.as_str()), (ErrorCode::BadRequest, too_big.as_str()), "flags {flags}");
        assert_eq!(unlocked(tree_snapshot(&ds)), unlocked(before.clone()), "flags {flags}");
    }
    let before = tree_snapshot(&ds);
    // Within the size cap but more chunks than a session may hold digests for.
    let mut c = RawClient::connect(&addr, &token);
    c.open_replica("vm", OpenReplica::PLAN_ONLY);
    let (code, message) = c.open_disk_refused("d", (1 << 42) + 1, 65536);
    assert_eq!(code, ErrorCode::BadRequest);
    assert_eq!(
        message,
        format!(
            "disk \"d\" has {} chunks of 65536 bytes; with the other disks of this session that is {}, more than a \
             session may hold ({}): use a larger --chunk-size",
            (1u64 << 26) + 1,
            (1u64 << 26) + 1,
            1u64 << 26
        )
    );
    drop(c);
    // And at most 1024 disks in one session, whatever their size.
    let mut c = RawClient::connect(&addr, &token);
    c.open_replica("vm", OpenReplica::PLAN_ONLY);
    for i in 0..1024 {
        let r = c.open_disk(i, &format!("z{i}"), 0, 65536);
        assert!(matches!(r, Ok(Event::Frame(Frame::ResumeInfo(_)))), "disk {i}: {r:?}");
    }
    match c.open_disk(1024, "z1024", 0, 65536) {
        Err(ferry_wire::WireError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert_eq!(message, "disk \"z1024\": a replica session may open 1024 disks at most");
        }
        other => panic!("the 1025th disk: {other:?}"),
    }
    drop(c);
    assert_eq!(tree_snapshot(&ds), before, "refused sessions changed the datastore");

    // Plans of a grown, a shrunk and a new disk, of a new replica, in every mode: nothing changes.
    let grown = dir.path().join("grown.img");
    write_image(&grown, 6 * MIB + 4096, 55, &[Fill::Random, Fill::Text]);
    let shrunk = dir.path().join("shrunk.img");
    write_image(&shrunk, MIB, 56, &[Fill::Text]);
    let plans: Vec<(&str, String, &str)> = vec![
        ("vm", format!("d={}", s(&grown)), "digest"),
        ("vm", format!("d={}", s(&grown)), "full"),
        ("vm", format!("d={}", s(&shrunk)), "digest"),
        ("vm", format!("d={}", s(&shrunk)), "auto"),
        ("vm", format!("new={}", s(&img)), "auto"),
        ("vm2", format!("d={}", s(&img)), "auto"),
    ];
    for (replica, source, mode) in &plans {
        let args = [
            "plan",
            "--json",
            "--insecure-plaintext",
            "--source",
            source,
            "--target",
            &server.url,
            "--token-file",
            s(&token),
        ];
        run(args.into_iter().chain(["--replica", replica, "--mode", mode])).expect_code(0);
        assert_eq!(tree_snapshot(&ds), before, "plan {replica} {source} --mode {mode} changed the datastore");
    }

    // The server is still up: the next replicate works.
    once("vm", &format!("d={}", s(&grown)));
    assert_replica_equals(&ds, "vm", "d", &grown);
}

/// `ferry replicate --json` started in the background, its stdout read line by line.
fn spawn_replicate(args: &[&str]) -> (Child, std::sync::mpsc::Receiver<serde_json::Value>) {
    let mut child = ferry().args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    (child, rx)
}

#[test]
fn a_stopped_source_releases_the_replica_within_the_idle_timeout_and_the_next_run_resumes() {
    const IDLE: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, 256 * MIB, 57, &[Fill::Random]);
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &["--insecure-plaintext", "--idle-timeout", "10s"]);
    let source = format!("d={}", s(&img));
    let args = replicate_args(&server.url, &token, "vm", &source);

    // The first source is stopped once its session has the replica and its data flows.
    let (mut first, events) = spawn_replicate(&args);
    loop {
        let v = events.recv_timeout(Duration::from_secs(30)).expect("the first run's plan");
        if v["event"] == "plan" {
            break;
        }
    }
    signal_process(first.id(), Signal::Stop).unwrap();
    let stopped = Instant::now();

    // A second run waits for the replica (busy, retried) and gets in once the target let the
    // stopped source go: within the idle timeout.
    let second_args: Vec<&str> = args.iter().copied().chain(["--retry-for", "2m"]).collect();
    let mut second = ferry().args(&second_args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The second run's refused attempts end sessions too: the stopped source's is the one
    // that timed out.
    let idle_end = "nothing received for 10 s: the peer stalled or vanished (idle timeout";
    let timed_out = || server.sessions(0).iter().any(|v| v["error"].as_str().is_some_and(|e| e.contains(idle_end)));
    assert!(wait_until(IDLE + Duration::from_secs(10), timed_out), "the stopped source's session ended");
    let released_after = stopped.elapsed();
    assert!(released_after < IDLE + Duration::from_secs(3), "released after {released_after:?}");
    assert!(released_after >= IDLE - Duration::from_secs(1), "released after {released_after:?}");
    let out = wait_output(&mut second, Duration::from_secs(90));
    assert_eq!(out.0, Some(0), "second run: {}", out.2);
    let lines: Vec<serde_json::Value> = out.1.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        lines.iter().any(|v| v["event"] == "notice"
            && v["message"].as_str().is_some_and(|m| m.contains("is in use by another session"))),
        "the second run said it waited for the replica: {lines:?}"
    );
    let summary = lines.last().expect("summary");
    assert_eq!(summary["status"], "ok");
    assert_eq!(summary["resumed"], true, "the second run resumed the stopped source's session");

    // The stopped source is killed; the replica is the source, and a next run moves nothing.
    signal_process(first.id(), Signal::Kill).unwrap();
    let _ = first.wait();
    assert_replica_equals(&ds, "vm", "d", &img);
    let r = run(args.iter().copied().chain(["--retry-for", "0", "--mode", "digest"]));
    r.expect_code(0);
    assert_eq!(r.summary()["totals"]["chunks_sent"], 0);
    run(["points", "verify", "--target", s(&ds), "--replica", "vm"]).expect_code(0);
    assert_replica_equals(&ds, "vm", "d", &img);
}

#[test]
fn a_source_busy_reading_with_nothing_to_send_keeps_its_session_past_the_idle_timeout() {
    if std::process::Command::new("nbdkit").arg("--version").output().is_err() {
        eprintln!("skipped: nbdkit is not installed (Debian package nbdkit)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, 2 * MIB, 58, &[Fill::Random]);
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &["--insecure-plaintext", "--idle-timeout", "10s"]);
    let source = format!("d={}", s(&img));
    run(replicate_args(&server.url, &token, "vm", &source).into_iter().chain(["--retry-for", "0"])).expect_code(0);

    // The same bytes through an export whose every read takes 12 s: a digest run reads and
    // hashes for 12 s with nothing to send, longer than the target's idle timeout.
    let sock = dir.path().join("nbd.sock");
    let mut nbdkit = std::process::Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--readonly", "--unix"])
        .arg(&sock)
        .args(["--filter=delay", "file", s(&img), "rdelay=12"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || sock.exists()), "nbdkit did not start");
    let uri = format!("d=nbd+unix:///?socket={}", s(&sock));
    let started = Instant::now();
    let r = run(replicate_args(&server.url, &token, "vm", &uri).into_iter().chain([
        "--retry-for",
        "0",
        "--mode",
        "digest",
    ]));
    let took = started.elapsed();
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    r.expect_code(0);
    assert!(took > Duration::from_secs(12), "the run was quiet for longer than the idle timeout ({took:?})");
    assert_eq!(r.summary()["totals"]["chunks_sent"], 0);
    let done = server.sessions(2);
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|v| v["error"].is_null()), "{done:?}");
    assert_replica_equals(&ds, "vm", "d", &img);
}

#[test]
fn serve_refuses_limits_it_cannot_work_with() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let serve = |extra: &[&str]| {
        let args = ["serve", "--listen", "127.0.0.1:0", "--datastore", s(&ds), "--token-file", s(&token)];
        run(args.iter().copied().chain(extra.iter().copied()))
    };
    let r = serve(&["--idle-timeout", "5s"]);
    r.expect_code(2);
    assert!(
        r.stderr.contains("--idle-timeout must be at least 10 s: sources send a keepalive every 5 s while busy"),
        "{}",
        r.stderr
    );
    let r = serve(&["--max-connections", "4", "--max-sessions", "8"]);
    r.expect_code(2);
    assert!(
        r.stderr.contains("--max-sessions 8 is more than --max-connections 4: every session is a connection"),
        "{}",
        r.stderr
    );
    serve(&["--max-disk-size", "1X"]).expect_code(2);
}
