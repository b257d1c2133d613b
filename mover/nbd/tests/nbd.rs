//! NBD client tests against real qemu-nbd (skipped with a note if qemu-nbd is
//! missing) and against tiny in-test fake servers for faults.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_nbd::proto::{self, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use ferry_nbd::{NbdClient, NbdError, NbdOptions};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn have_qemu() -> bool {
    let ok = |p: &str| Command::new(p).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if ok("qemu-nbd") && ok("qemu-img") && ok("qemu-io") {
        true
    } else {
        eprintln!("note: qemu-nbd/qemu-img/qemu-io not installed, skipping this test");
        false
    }
}

fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A qemu-nbd process, killed and reaped on drop.
struct Server {
    child: Option<Child>,
    uri: String,
}

impl Server {
    fn start(image: &Path, format: &str, extra: &[&str], dir: &Path, tcp: bool) -> Server {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-t", "-e", "8", "-f", format]).args(extra);
        let (uri, probe): (String, Box<dyn Fn() -> bool>) = if tcp {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
            (format!("nbd://127.0.0.1:{port}/"), Box::new(move || TcpStream::connect(("127.0.0.1", port)).is_ok()))
        } else {
            let sock = dir.join(format!("nbd-{}.sock", std::process::id()));
            let _ = std::fs::remove_file(&sock);
            cmd.arg("-k").arg(&sock);
            let s2 = sock.clone();
            (format!("nbd+unix:///?socket={}", sock.display()), Box::new(move || UnixStream::connect(&s2).is_ok()))
        };
        cmd.arg(image).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn qemu-nbd");
        let mut server = Server { child: Some(child), uri };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if probe() {
                return server;
            }
            let child = server.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("qemu-nbd exited early ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "qemu-nbd did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server gracefully (SIGTERM: qemu-nbd flushes and exits).
    fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn connect(uri: &str, contexts: &[&str]) -> NbdClient {
    NbdClient::connect(uri, NbdOptions::with_meta_contexts(contexts.iter().copied())).unwrap()
}

/// A sparse raw file with random data in `extents`; returns its contents.
fn make_sparse_raw(path: &Path, size: u64, extents: &[(u64, u64)], seed: u64) -> Vec<u8> {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    for &(off, len) in extents {
        let r = &mut content[off as usize..(off + len) as usize];
        rng.fill(r);
        f.write_all_at(r, off).unwrap();
    }
    f.sync_all().unwrap();
    content
}

fn check_random_reads(c: &mut NbdClient, expect: &[u8], seed: u64, n: usize) {
    let mut rng = Rng(seed);
    let size = expect.len() as u64;
    for _ in 0..n {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(3 * M));
        let mut buf = vec![0xAAu8; len as usize];
        c.read_at(off, &mut buf).unwrap();
        assert!(buf == expect[off as usize..(off + len) as usize], "read at {off} len {len} differs");
    }
}

fn read_all_pipelined(c: &mut NbdClient) -> Vec<u8> {
    let size = c.size();
    let mut image = vec![0x55u8; size as usize];
    let ranges: Vec<(u64, u64)> = (0..size.div_ceil(M)).map(|i| (i * M, (size - i * M).min(M))).collect();
    let mut seen = 0u64;
    c.read_many::<NbdError>(&ranges, |off, data| {
        image[off as usize..off as usize + data.len()].copy_from_slice(data);
        seen += data.len() as u64;
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, size);
    image
}

#[test]
fn raw_over_unix_reads_match_file() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    // qemu-nbd rounds raw sizes up to 512 bytes: keep it aligned to 512, not more.
    let size = 24 * M + 25 * 512;
    let expect = make_sparse_raw(&img, size, &[(0, 3 * M), (5 * M + 4096, 7 * M), (20 * M, size - 20 * M)], 1);
    let server = Server::start(&img, "raw", &[], dir.path(), false);
    let mut c = connect(&server.uri, &[]);
    assert_eq!(c.size(), size);
    assert!(c.structured_replies());
    check_random_reads(&mut c, &expect, 7, 200);
    assert!(read_all_pipelined(&mut c) == expect, "whole-image read_many differs");
    let mut whole = vec![0u8; size as usize];
    c.read_at(0, &mut whole).unwrap();
    assert!(whole == expect, "whole-image read_at differs");

    // Owned buffers, many in flight, completions in any order.
    let mut submitted = std::collections::HashMap::new();
    for i in 0..32u64 {
        let off = i * 700 * K;
        let h = c.submit_read(off, vec![0; (64 * K + i * 4099) as usize]).unwrap();
        submitted.insert(h, off);
    }
    assert_eq!(c.reads_in_flight(), 32);
    // A synchronous op while reads are in flight.
    let mut small = [0u8; 100];
    c.read_at(size - 100, &mut small).unwrap();
    assert_eq!(&small[..], &expect[size as usize - 100..]);
    while c.reads_in_flight() > 0 {
        let r = c.wait_read().unwrap();
        r.result.unwrap();
        assert_eq!(submitted.remove(&r.handle), Some(r.offset));
        assert!(r.buf == expect[r.offset as usize..r.offset as usize + r.buf.len()]);
    }
    assert!(submitted.is_empty());
    // Out of range is the caller's error, not the connection's.
    assert!(matches!(c.read_at(size - 1, &mut [0u8; 2]), Err(NbdError::InvalidArgument(_))));
    c.read_at(0, &mut small).unwrap();
    c.disconnect().unwrap();

    // Simple replies only (structured replies not requested).
    let opts = NbdOptions { structured_replies: false, max_request_len: 300 * 1024, ..Default::default() };
    let mut c = NbdClient::connect(&server.uri, opts).unwrap();
    assert!(!c.structured_replies());
    check_random_reads(&mut c, &expect, 8, 50);
    assert!(read_all_pipelined(&mut c) == expect, "whole-image read with simple replies differs");
    drop(c);
    server.stop();
}

#[test]
fn sparse_raw_base_allocation_is_exact() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.raw");
    let data = [(M, 64 * K), (10 * M, 2 * M), (31 * M, M)];
    make_sparse_raw(&img, 32 * M, &data, 2);
    let server = Server::start(&img, "raw", &["-r"], dir.path(), true);
    let mut c = connect(&server.uri, &["base:allocation"]);
    assert!(c.is_read_only());
    let allocated = c.extents_matching("base:allocation", |f| f & STATE_HOLE == 0).unwrap();
    assert_eq!(allocated, data.to_vec());
    let zero = c.extents("base:allocation", STATE_ZERO).unwrap();
    assert_eq!(zero, vec![(0, M), (M + 64 * K, 10 * M - M - 64 * K), (12 * M, 19 * M)]);
    // A sub-range, and the whole range in small block status requests.
    let bs = c.block_status("base:allocation", M + 4 * K, 8 * K).unwrap();
    assert_eq!(bs, vec![(M + 4 * K, 8 * K, 0)]);
    drop(c);
    let mut opts = NbdOptions::with_meta_contexts(["base:allocation"]);
    opts.max_block_status_len = 256 * 1024;
    let mut c = NbdClient::connect(&server.uri, opts).unwrap();
    assert_eq!(c.extents_matching("base:allocation", |f| f & STATE_HOLE == 0).unwrap(), data.to_vec());
    assert!(matches!(c.write_at(0, &[1]), Err(NbdError::Unsupported(_))));
    drop(c);
    server.stop();
}

fn make_qcow2(dir: &Path, name: &str, size: &str, writes: &[&str]) -> PathBuf {
    let p = dir.join(name);
    run("qemu-img", &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), size]);
    let mut args: Vec<&str> = Vec::new();
    for w in writes {
        args.extend(["-c", w]);
    }
    if !args.is_empty() {
        args.push(p.to_str().unwrap());
        run("qemu-io", &args);
    }
    p
}

fn to_raw(img: &Path, fmt: &str) -> Vec<u8> {
    let raw = img.with_extension("converted.raw");
    run("qemu-img", &["convert", "-f", fmt, "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    std::fs::read(raw).unwrap()
}

#[test]
fn qcow2_over_tcp_reads_writes_and_allocation() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make_qcow2(dir.path(), "d.qcow2", "16M", &["write -P 7 1M 64k", "write -P 9 5M 128k", "write 9M 3M"]);
    let expect = to_raw(&img, "qcow2");
    let server = Server::start(&img, "qcow2", &[], dir.path(), true);
    let mut c = connect(&server.uri, &["base:allocation"]);
    assert_eq!(c.size(), 16 * M);
    check_random_reads(&mut c, &expect, 3, 100);
    assert!(read_all_pipelined(&mut c) == expect);
    let allocated = c.extents_matching("base:allocation", |f| f & STATE_HOLE == 0).unwrap();
    assert_eq!(allocated, vec![(M, 64 * K), (5 * M, 128 * K), (9 * M, 3 * M)]);

    // Writes, then the image must equal our model of it.
    let mut model = expect.clone();
    let mut rng = Rng(11);
    for _ in 0..40 {
        let off = rng.below(16 * M - 1);
        let len = 1 + rng.below((16 * M - off).min(300 * K));
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        c.write_at(off, &data).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    let big: Vec<u8> = (0..5 * M).map(|i| (i % 251) as u8).collect();
    c.write_at(10 * M + 3, &big).unwrap();
    model[(10 * M + 3) as usize..(15 * M + 3) as usize].copy_from_slice(&big);
    c.write_zeroes(2 * M, 2 * M).unwrap();
    model[(2 * M) as usize..(4 * M) as usize].fill(0);
    c.flush().unwrap();
    let mut back = vec![0u8; model.len()];
    c.read_at(0, &mut back).unwrap();
    assert!(back == model, "read back after writes differs");
    c.disconnect().unwrap();
    server.stop();

    let expected_raw = dir.path().join("model.raw");
    std::fs::write(&expected_raw, &model).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw", img.to_str().unwrap(), expected_raw.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"));
}

#[test]
fn pipelined_writes_complete_out_of_band_of_sync_calls() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make_qcow2(dir.path(), "w.qcow2", "8M", &[]);
    let server = Server::start(&img, "qcow2", &[], dir.path(), false);
    let mut c = connect(&server.uri, &[]);
    let mut model = vec![0u8; 8 * M as usize];
    let mut rng = Rng(21);
    let mut handles = std::collections::BTreeMap::new();
    let mut buf = vec![0u8; 64 * K as usize];
    // 64 writes of 64 KiB, up to 16 in flight; the buffer is reused as soon as submit returns.
    for i in 0..64u64 {
        if c.detached_in_flight() == 16 {
            let done = c.wait_detached().unwrap();
            done.result.unwrap();
            assert_eq!(handles.remove(&done.handle), Some((done.offset, done.length)));
        }
        rng.fill(&mut buf);
        let off = (i * 7 % 128) * 64 * K;
        let h = c.submit_write(off, &buf).unwrap();
        handles.insert(h, (off, 64 * K as u32));
        model[off as usize..(off + 64 * K) as usize].copy_from_slice(&buf);
        if i == 40 {
            // A synchronous call in between parks the replies of the writes in flight.
            let mut probe = vec![0u8; 4096];
            c.read_at(7 * M, &mut probe).unwrap();
        }
    }
    assert!(c.detached_in_flight() > 0);
    while c.detached_in_flight() > 0 {
        let done = c.wait_detached().unwrap();
        done.result.unwrap();
        assert!(handles.remove(&done.handle).is_some());
    }
    assert!(handles.is_empty());
    assert!(matches!(c.wait_detached(), Err(NbdError::InvalidArgument(_))));
    assert!(matches!(c.submit_write(8 * M - 100, &[0u8; 200]), Err(NbdError::InvalidArgument(_))));
    c.flush().unwrap();
    let mut back = vec![0u8; model.len()];
    c.read_at(0, &mut back).unwrap();
    assert!(back == model, "read back after pipelined writes differs");
    c.disconnect().unwrap();
    server.stop();
    assert!(to_raw(&img, "qcow2") == model);
}

#[test]
fn write_zeroes_and_trim_leave_zeros() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("full.raw");
    let size = 8 * M;
    let mut model = make_sparse_raw(&img, size, &[(0, size)], 5);
    let server = Server::start(&img, "raw", &["--discard=unmap"], dir.path(), false);
    let mut c = connect(&server.uri, &["base:allocation"]);
    c.write_zeroes(M, M).unwrap();
    c.trim(4 * M, 2 * M).unwrap();
    c.write_zeroes(7 * M + 512, 1000).unwrap();
    model[M as usize..(2 * M) as usize].fill(0);
    model[(4 * M) as usize..(6 * M) as usize].fill(0);
    model[(7 * M + 512) as usize..(7 * M + 1512) as usize].fill(0);
    let mut back = vec![1u8; size as usize];
    c.read_at(0, &mut back).unwrap();
    assert!(back == model);
    // NO_HOLE was not set: qemu punched holes.
    let holes = c.extents("base:allocation", STATE_HOLE).unwrap();
    assert_eq!(holes, vec![(M, M), (4 * M, 2 * M)]);
    c.disconnect().unwrap();
    server.stop();
    assert!(std::fs::read(&img).unwrap() == model);
}

#[test]
fn dirty_bitmap_extents() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make_qcow2(dir.path(), "b.qcow2", "8M", &["write -P 1 0 8M"]);
    run("qemu-img", &["bitmap", "--add", "--enable", img.to_str().unwrap(), "b0"]);
    run("qemu-io", &["-c", "write -P 7 1M 64k", "-c", "write 5M 128k", img.to_str().unwrap()]);
    let server = Server::start(&img, "qcow2", &["-r", "-B", "b0"], dir.path(), false);
    let ctx = "qemu:dirty-bitmap:b0";
    let mut c = connect(&server.uri, &["base:allocation", ctx]);
    // Granularity 64 KiB: both writes are aligned, so the extents are exact.
    assert_eq!(c.extents(ctx, STATE_DIRTY).unwrap(), vec![(M, 64 * K), (5 * M, 128 * K)]);
    assert_eq!(c.extents_matching("base:allocation", |f| f & STATE_HOLE == 0).unwrap(), vec![(0, 8 * M)]);
    drop(c);
    // A bitmap the server does not export is an error naming it.
    match NbdClient::connect(&server.uri, NbdOptions::with_meta_contexts(["qemu:dirty-bitmap:nope"])) {
        Err(NbdError::MetaContextUnavailable(n)) => assert_eq!(n, "qemu:dirty-bitmap:nope"),
        other => panic!("unexpected {other:?}"),
    }
    server.stop();
}

#[test]
fn allocation_depth_on_overlay() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = make_qcow2(dir.path(), "base.qcow2", "8M", &["write -P 3 0 2M"]);
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "qcow2", top.to_str().unwrap()],
    );
    run("qemu-io", &["-c", "write -P 4 1M 64k", "-c", "write -P 5 4M 256k", top.to_str().unwrap()]);
    let server = Server::start(&top, "qcow2", &["-r", "-A"], dir.path(), true);
    let ctx = "qemu:allocation-depth";
    let mut c = connect(&server.uri, &[ctx]);
    let bs = c.block_status(ctx, 0, c.size()).unwrap();
    assert_eq!(
        bs,
        vec![
            (0, M, 2),
            (M, 64 * K, 1),
            (M + 64 * K, M - 64 * K, 2),
            (2 * M, 2 * M, 0),
            (4 * M, 256 * K, 1),
            (4 * M + 256 * K, 4 * M - 256 * K, 0)
        ]
    );
    assert_eq!(c.extents_matching(ctx, |d| d == 1).unwrap(), vec![(M, 64 * K), (4 * M, 256 * K)]);
    drop(c);
    server.stop();
}

#[test]
fn unknown_export_is_rejected_with_message() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.raw");
    make_sparse_raw(&img, M, &[], 0);
    let server = Server::start(&img, "raw", &["-x", "named"], dir.path(), true);
    let wrong = server.uri.trim_end_matches('/').to_string() + "/other";
    match NbdClient::connect(&wrong, NbdOptions::default()) {
        Err(e @ NbdError::OptionRejected { .. }) => assert!(e.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{e}"),
        other => panic!("unexpected {other:?}"),
    }
    let right = server.uri.trim_end_matches('/').to_string() + "/named";
    let c = NbdClient::connect(&right, NbdOptions::default()).unwrap();
    assert_eq!(c.size(), M);
    assert_eq!(c.export_name(), "named");
    drop(c);
    server.stop();
}

// ---- fault tests with fake servers ----

/// Runs `script` as the server of one TCP connection; returns the URI.
fn fake_server(script: impl FnOnce(TcpStream) + Send + 'static) -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            script(s);
        }
    });
    (format!("nbd://127.0.0.1:{port}/"), h)
}

fn greeting() -> Vec<u8> {
    let mut g = Vec::new();
    g.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    g
}

fn read_option(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut d = vec![0; len as usize];
    s.read_exact(&mut d).unwrap();
    (opt, d)
}

fn option_reply(opt: u32, ty: u32, data: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&proto::OPTION_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&opt.to_be_bytes());
    r.extend_from_slice(&ty.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

/// A fake server's handshake: structured replies and a 1 MiB export.
fn fake_handshake(s: &mut TcpStream) {
    s.write_all(&greeting()).unwrap();
    let mut f = [0u8; 4];
    s.read_exact(&mut f).unwrap();
    loop {
        let (opt, _) = read_option(s);
        match opt {
            proto::opt::STRUCTURED_REPLY => s.write_all(&option_reply(opt, proto::rep::ACK, &[])).unwrap(),
            proto::opt::GO => {
                let mut info = vec![0, 0];
                info.extend_from_slice(&M.to_be_bytes());
                info.extend_from_slice(&(proto::tflags::HAS_FLAGS | proto::tflags::SEND_FLUSH).to_be_bytes());
                s.write_all(&option_reply(opt, proto::rep::INFO, &info)).unwrap();
                s.write_all(&option_reply(opt, proto::rep::ACK, &[])).unwrap();
                return;
            }
            _ => s.write_all(&option_reply(opt, proto::rep::ERR_UNSUP, &[])).unwrap(),
        }
    }
}

fn fast_opts() -> NbdOptions {
    NbdOptions { timeout: Duration::from_secs(1), ..Default::default() }
}

#[test]
fn fault_garbage_greeting() {
    let (uri, h) = fake_server(|mut s| {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    match NbdClient::connect(&uri, fast_opts()) {
        Err(NbdError::BadMagic { expected, got, .. }) => {
            assert_eq!(expected, proto::NBDMAGIC);
            assert_eq!(got, u64::from_be_bytes(*b"HTTP/1.1"));
        }
        other => panic!("unexpected {other:?}"),
    }
    h.join().unwrap();
}

#[test]
fn fault_close_after_greeting() {
    let (uri, h) = fake_server(|mut s| {
        s.write_all(&greeting()).unwrap();
    });
    let e = NbdClient::connect(&uri, fast_opts()).unwrap_err();
    assert!(matches!(e, NbdError::Closed { .. }), "{e:?}");
    h.join().unwrap();
}

#[test]
fn fault_server_never_replies_to_handshake() {
    let (uri, h) = fake_server(|mut s| {
        s.write_all(&greeting()).unwrap();
        std::thread::sleep(Duration::from_secs(3));
    });
    let t = Instant::now();
    let e = NbdClient::connect(&uri, fast_opts()).unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    h.join().unwrap();
}

#[test]
fn fault_server_never_replies_to_read() {
    let (uri, h) = fake_server(|mut s| {
        fake_handshake(&mut s);
        std::thread::sleep(Duration::from_secs(3));
    });
    let mut c = NbdClient::connect(&uri, fast_opts()).unwrap();
    let t = Instant::now();
    let e = c.read_at(0, &mut [0u8; 4096]).unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    // The connection is now unusable, and says so.
    assert!(matches!(c.read_at(0, &mut [0u8; 1]), Err(NbdError::Broken(_))));
    drop(c);
    h.join().unwrap();
}

fn chunk_header(flags: u16, ty: u16, handle: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&ty.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

fn read_request(s: &mut TcpStream) -> (u64, u64, u32) {
    let mut r = [0u8; 28];
    s.read_exact(&mut r).unwrap();
    (
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
        u64::from_be_bytes(r[16..24].try_into().unwrap()),
        u32::from_be_bytes(r[24..28].try_into().unwrap()),
    )
}

#[test]
fn fault_oversized_structured_reply() {
    let (uri, h) = fake_server(|mut s| {
        fake_handshake(&mut s);
        let (handle, _, len) = read_request(&mut s);
        // Claims 4 GiB of data for a 4 KiB read.
        let _ = s.write_all(&chunk_header(proto::REPLY_FLAG_DONE, proto::chunk::OFFSET_DATA, handle, u32::MAX));
        assert_eq!(len, 4096);
        std::thread::sleep(Duration::from_millis(500));
    });
    let mut c = NbdClient::connect(&uri, fast_opts()).unwrap();
    let e = c.read_at(0, &mut [0u8; 4096]).unwrap_err();
    match &e {
        NbdError::BadReply { op, offset, length, detail } => {
            assert_eq!((*op, *offset, *length), ("NBD_CMD_READ", 0, 4096));
            assert!(detail.contains("4294967295"), "{detail}");
        }
        other => panic!("unexpected {other:?}"),
    }
    drop(c);
    h.join().unwrap();
}

#[test]
fn fault_error_chunk_and_out_of_order_replies() {
    let (uri, h) = fake_server(|mut s| {
        fake_handshake(&mut s);
        let a = read_request(&mut s);
        let b = read_request(&mut s);
        // Reply to the second read first, split in a data and a hole chunk.
        let mut r = chunk_header(0, proto::chunk::OFFSET_DATA, b.0, 8 + 2);
        r.extend_from_slice(&b.1.to_be_bytes());
        r.extend_from_slice(&[7, 7]);
        let mut hole = chunk_header(proto::REPLY_FLAG_DONE, proto::chunk::OFFSET_HOLE, b.0, 12);
        hole.extend_from_slice(&(b.1 + 2).to_be_bytes());
        hole.extend_from_slice(&(b.2 - 2).to_be_bytes());
        r.extend_from_slice(&hole);
        // Then an error for the first.
        let msg = b"disk on fire";
        let mut e = chunk_header(proto::REPLY_FLAG_DONE, proto::chunk::ERROR, a.0, 6 + msg.len() as u32);
        e.extend_from_slice(&5u32.to_be_bytes());
        e.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        e.extend_from_slice(msg);
        r.extend_from_slice(&e);
        s.write_all(&r).unwrap();
        // A flush gets a simple reply.
        let f = read_request(&mut s);
        let mut sr = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        sr.extend_from_slice(&0u32.to_be_bytes());
        sr.extend_from_slice(&f.0.to_be_bytes());
        s.write_all(&sr).unwrap();
        let _ = read_request(&mut s); // NBD_CMD_DISC
    });
    let mut c = NbdClient::connect(&uri, fast_opts()).unwrap();
    let ha = c.submit_read(0, vec![1; 16]).unwrap();
    let hb = c.submit_read(4096, vec![1; 16]).unwrap();
    let first = c.wait_read().unwrap();
    assert_eq!(first.handle, hb);
    first.result.unwrap();
    assert_eq!(first.buf, [7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let second = c.wait_read().unwrap();
    assert_eq!(second.handle, ha);
    let e = second.result.unwrap_err();
    assert!(
        matches!(&e, NbdError::Command { op: "NBD_CMD_READ", offset: 0, length: 16, code: 5, message, .. } if message == "disk on fire"),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "NBD_CMD_READ offset 0 length 16 failed: EIO (5): disk on fire");
    c.flush().unwrap();
    c.disconnect().unwrap();
    h.join().unwrap();
}

/// Throughput figure, not a check: `NBD_BENCH_URI=nbd+unix:///?socket=S
/// cargo test --release -p ferry-nbd --test nbd bench_read_throughput --
/// --ignored --nocapture` reads the whole export with `read_many`
/// (NBD_BENCH_REQ bytes per request, NBD_BENCH_DEPTH in flight).
#[test]
#[ignore]
fn bench_read_throughput() {
    let Ok(uri) = std::env::var("NBD_BENCH_URI") else {
        eprintln!("note: set NBD_BENCH_URI to run this benchmark");
        return;
    };
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let req = env("NBD_BENCH_REQ", NbdOptions::default().max_request_len as u64);
    let opts = NbdOptions {
        max_request_len: req as u32,
        max_in_flight: env("NBD_BENCH_DEPTH", 16) as usize,
        ..Default::default()
    };
    let mut c = NbdClient::connect(&uri, opts).unwrap();
    let size = c.size();
    let t = Instant::now();
    let mut sum = 0u64;
    let ranges: Vec<(u64, u64)> = (0..size.div_ceil(req)).map(|i| (i * req, (size - i * req).min(req))).collect();
    c.read_many::<NbdError>(&ranges, |_, d| {
        sum += d[0] as u64 + d[d.len() - 1] as u64;
        Ok(())
    })
    .unwrap();
    let s = t.elapsed().as_secs_f64();
    println!(
        "read {} MiB in {:.3} s: {:.0} MiB/s (request {} KiB, depth {}) [{sum}]",
        size / M,
        s,
        size as f64 / M as f64 / s,
        req / K,
        env("NBD_BENCH_DEPTH", 16)
    );
}

#[test]
fn fault_garbage_reply_and_close_mid_reply() {
    let (uri, h) = fake_server(|mut s| {
        fake_handshake(&mut s);
        let _ = read_request(&mut s);
        let _ = s.write_all(b"GARBAGE!GARBAGE!GARBAGE!");
        std::thread::sleep(Duration::from_millis(300));
    });
    let mut c = NbdClient::connect(&uri, fast_opts()).unwrap();
    match c.read_at(0, &mut [0u8; 512]) {
        Err(NbdError::BadMagic { got, .. }) => assert_eq!(got, u32::from_be_bytes(*b"GARB") as u64),
        other => panic!("unexpected {other:?}"),
    }
    drop(c);
    h.join().unwrap();

    let (uri, h) = fake_server(|mut s| {
        fake_handshake(&mut s);
        let (handle, off, _) = read_request(&mut s);
        let mut r = chunk_header(proto::REPLY_FLAG_DONE, proto::chunk::OFFSET_DATA, handle, 8 + 512);
        r.extend_from_slice(&off.to_be_bytes());
        r.extend_from_slice(&[1; 100]);
        let _ = s.write_all(&r);
    });
    let mut c = NbdClient::connect(&uri, fast_opts()).unwrap();
    let e = c.read_at(0, &mut [0u8; 512]).unwrap_err();
    assert!(matches!(e, NbdError::Closed { .. }), "{e:?}");
    assert!(e.to_string().contains("NBD_CMD_READ offset 0 length 512"), "{e}");
    drop(c);
    h.join().unwrap();
}

#[test]
fn fault_connection_lost_with_writes_in_flight_fails_each_write_once() {
    use ferry_io::BufPool;
    use ferry_io::{IoBackend, IoKind, IoRequest};
    use ferry_nbd::NbdBackend;
    let (uri, h) = fake_server(|mut s| {
        fake_handshake(&mut s);
        // Take four 4 KiB writes, acknowledge the first, then hang up.
        let mut handles = Vec::new();
        for _ in 0..4 {
            let (handle, _, len) = read_request(&mut s);
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload).unwrap();
            handles.push(handle);
        }
        let mut r = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&handles[0].to_be_bytes());
        s.write_all(&r).unwrap();
    });
    let c = std::sync::Arc::new(std::sync::Mutex::new(NbdClient::connect(&uri, fast_opts()).unwrap()));
    let pool = BufPool::new(4, 4096);
    let mut b = NbdBackend::new(c, 4, &uri);
    for i in 0..4u64 {
        let mut buf = pool.get();
        buf.spare_mut()[..4096].fill(i as u8);
        buf.set_len(4096);
        b.submit(IoRequest { tag: i, fd: -1, offset: i * 4096, len: 4096, kind: IoKind::Write, buf }).unwrap();
    }
    assert_eq!(b.in_flight(), 4);
    let first = b.wait().unwrap();
    assert_eq!((first.tag, first.result.as_ref().ok()), (0, Some(&4096)));
    drop(first);
    h.join().unwrap();
    let e = b.wait().unwrap_err();
    assert!(e.to_string().contains("closed the connection"), "{e}");
    // The three writes left come back failed, with their buffers, and the backend is empty.
    let mut failed: Vec<u64> =
        (0..3).map(|_| b.wait().unwrap()).map(|c| (c.tag, c.result.is_err())).filter(|x| x.1).map(|x| x.0).collect();
    failed.sort();
    assert_eq!(failed, [1, 2, 3]);
    assert_eq!(b.in_flight(), 0);
    let back: Vec<_> = (0..4).map_while(|_| pool.try_get()).collect();
    assert_eq!(back.len(), 4, "every buffer is back in the pool");
}
