//! Helpers for ferry's end-to-end tests: the real `ferry` binary, real
//! files, real sockets.
//!
//! [`ferry_bin`] builds the binary once (a nested `cargo build -p ferry`, so
//! `cargo test --workspace` always tests the current code) and returns its
//! path. [`Server`] runs `ferry serve` on a free loopback port and kills it
//! when dropped, also when a test fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

/// Path of the freshly built `ferry` binary.
pub fn ferry_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/debug/deps/e2e-HASH -> target/debug/ferry (target/release/... for `--release`)
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe.parent().and_then(Path::parent).expect("target/debug");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "ferry", "--locked"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let st = build.status().expect("run cargo build -p ferry");
        assert!(st.success(), "building the ferry binary failed");
        let bin = dir.join("ferry");
        assert!(bin.exists(), "no ferry binary at {}", bin.display());
        // Digest maps cached by the previous run of the tests (see `ferry()`).
        let _ = std::fs::remove_dir_all(bin.with_file_name("e2e-xdg-cache"));
        bin
    })
}

/// A `ferry` command. Its default digest map cache (`$XDG_CACHE_HOME/ferry/maps`)
/// is under the build directory, not the user's home.
pub fn ferry() -> Command {
    let mut c = Command::new(ferry_bin());
    c.env("XDG_CACHE_HOME", ferry_bin().with_file_name("e2e-xdg-cache"));
    // The known-targets file (TLS pins) is not the user's either; tests pin with --fingerprint.
    c.env("XDG_CONFIG_HOME", ferry_bin().with_file_name("e2e-xdg-config"));
    c
}

/// Result of a command: exit code, stdout, stderr.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// The last `summary` event of a `--json` run.
    pub fn summary(&self) -> serde_json::Value {
        self.events()
            .into_iter()
            .rev()
            .find(|e| e["event"] == "summary")
            .unwrap_or_else(|| panic!("no summary event in stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }

    /// Every NDJSON event on stdout.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Panic with the output unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "exit code\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Run `cmd` to completion, stdin closed.
    pub fn of(cmd: &mut Command) -> Run {
        cmd.stdin(Stdio::null()).output().expect("run ferry").into()
    }
}

/// Run `ferry ARGS` to completion.
pub fn run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Run::of(ferry().args(args))
}

/// A test path as `&str` (the tests make only UTF-8 paths).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `ferry replicate --json --retry-for 0` of `image` as disk d0 of `replica` to `target`
/// with the token in `token`; add a server's [`Server::client_args`] and any other flags,
/// then [`Run::of`] it or spawn it.
pub fn replicate_cmd(target: &str, token: &Path, replica: &str, image: &Path) -> Command {
    let mut c = ferry();
    c.args(["replicate", "--json", "--retry-for", "0", "--replica", replica, "--target", target])
        .args(["--token-file", s(token), "--source", &format!("d0={}", s(image))])
        .stdin(Stdio::null());
    c
}

/// Deterministic pseudo-random bytes (xorshift64*), for test images.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Fill a buffer.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Kinds of content for [`write_image`] regions.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// Zeros (left as a hole).
    Zero,
    /// Incompressible.
    Random,
    /// Compressible text-like bytes.
    Text,
}

/// Write an image of `size` bytes made of 1 MiB regions of the given kinds in turn.
pub fn write_image(path: &Path, size: u64, seed: u64, pattern: &[Fill]) {
    let mut f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut rng = Rng::new(seed);
    let words: [&[u8]; 8] = [b"replica ", b"disk ", b"block ", b"ferry ", b"chunk ", b"site\n", b"point ", b"the "];
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut i = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        match pattern[i % pattern.len()] {
            Fill::Zero => {}
            Fill::Random => {
                rng.fill(&mut buf[..n]);
                write_at(&mut f, off, &buf[..n]);
            }
            Fill::Text => {
                let mut p = 0;
                while p < n {
                    let w = words[rng.below(8) as usize];
                    let k = w.len().min(n - p);
                    buf[p..p + k].copy_from_slice(&w[..k]);
                    p += k;
                }
                write_at(&mut f, off, &buf[..n]);
            }
        }
        off += n as u64;
        i += 1;
    }
    f.sync_all().expect("sync image");
}

/// Write `data` at `offset`.
pub fn write_at(f: &mut std::fs::File, offset: u64, data: &[u8]) {
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
}

/// Overwrite `count` distinct blocks of `block` bytes with random data; returns their indices, sorted.
pub fn mutate_blocks(path: &Path, block: u64, count: usize, seed: u64) -> Vec<u64> {
    let size = std::fs::metadata(path).expect("stat").len();
    let blocks = size / block;
    assert!(count as u64 <= blocks, "not enough blocks");
    let mut rng = Rng::new(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < count {
        chosen.insert(rng.below(blocks));
    }
    let mut f = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    let mut buf = vec![0u8; block as usize];
    for &b in &chosen {
        rng.fill(&mut buf);
        write_at(&mut f, b * block, &buf);
    }
    f.sync_all().expect("sync");
    chosen.into_iter().collect()
}

/// True when two files have the same bytes (compared in 1 MiB steps).
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (std::fs::File::open(a).expect("open a"), std::fs::File::open(b).expect("open b"));
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Allocated bytes of a file (to check sparseness).
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").blocks() * 512
}

/// Pages of the file at `p` in the page cache, and its pages in all (mincore over a mapping).
pub fn cached_pages(p: &Path) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p).expect("open");
    let len = f.metadata().expect("stat").len() as usize;
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of a file held open, unmapped before return; mincore
    // writes one byte per page into `vec`, which has room for every page.
    unsafe {
        let m = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(m, libc::MAP_FAILED, "mmap {}", p.display());
        assert_eq!(libc::mincore(m, len, vec.as_mut_ptr()), 0, "mincore {}", p.display());
        libc::munmap(m, len);
    }
    (vec.iter().filter(|&&b| b & 1 != 0).count(), pages)
}

/// True when `p` is on a tmpfs, whose page cache is the files themselves.
pub fn on_tmpfs(p: &Path) -> bool {
    // SAFETY: an all-zero statfs is a valid value of the plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: a NUL-terminated path and a struct statfs for the kernel to fill.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0, "statfs {}", p.display());
    st.f_type == libc::TMPFS_MAGIC
}

/// The bytes of `image`'s holes that a file source skips instead of reading:
/// `holes` when the file system under it keeps the image sparse (then it
/// reports the holes to SEEK_HOLE), 0 when it stores every block.
pub fn skipped_holes(image: &Path, holes: u64) -> u64 {
    let size = std::fs::metadata(image).expect("stat").len();
    if allocated_bytes(image) + holes <= size.next_multiple_of(4096) {
        holes
    } else {
        0
    }
}

/// Export a replica disk and check it equals `source`.
pub fn assert_replica_equals(datastore: &Path, replica: &str, disk: &str, source: &Path) {
    let out = datastore.parent().unwrap_or(datastore).join(format!("export-{replica}-{disk}.raw"));
    let r = ferry()
        .args(["points", "export", "--target"])
        .arg(datastore)
        .args(["--replica", replica, "--disk", disk, "--out"])
        .arg(&out)
        .output()
        .expect("run export");
    assert!(r.status.success(), "export failed: {}", String::from_utf8_lossy(&r.stderr));
    assert!(same_bytes(&out, source), "replica {replica}/{disk} differs from {}", source.display());
    let _ = std::fs::remove_file(&out);
}

/// A token file in `dir`.
pub fn new_token(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    run(["token", "new", "--out", p.to_str().expect("utf-8 path")]).expect_code(0);
    p
}

/// A scoped token file `dir/NAME` (`ferry token new --name NAME --role ROLE --replicas GLOB`)
/// and the access-file line it printed.
pub fn new_scoped_token(dir: &Path, name: &str, role: &str, replicas: &str) -> (PathBuf, String) {
    let p = dir.join(name);
    let path = p.to_str().expect("utf-8 path");
    let r = run(["token", "new", "--out", path, "--name", name, "--role", role, "--replicas", replicas]);
    r.expect_code(0);
    (p, r.stdout.trim().to_string())
}

/// Write an access file of `lines` at `path`, mode 0600 (as `serve --access` requires).
pub fn write_access(path: &Path, lines: &[&str]) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create access file");
    f.write_all(format!("# written by a test\n{}\n", lines.join("\n")).as_bytes()).expect("write access file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod access file");
}

/// `ferry serve` on a free loopback port; killed when dropped.
pub struct Server {
    child: Child,
    /// `ferry://127.0.0.1:PORT`.
    pub url: String,
    /// The fingerprint of its TLS certificate (`sha256:HEX`, from the `listening`
    /// event); empty with `--insecure-plaintext`.
    pub fingerprint: String,
    events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Server {
    /// Start a server on `datastore` with `token`, plus extra args.
    pub fn start(datastore: &Path, token: &Path, extra: &[&str]) -> Server {
        Server::launch(datastore, "--token-file", token, extra, &[])
    }

    /// [`Server::start`] with environment variables set for the server (test knobs).
    pub fn start_env(datastore: &Path, token: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::launch(datastore, "--token-file", token, extra, env)
    }

    /// Start a server on `datastore` with the access file `access` (`--access`), plus extra args.
    pub fn start_access(datastore: &Path, access: &Path, extra: &[&str]) -> Server {
        Server::launch(datastore, "--access", access, extra, &[])
    }

    fn launch(datastore: &Path, auth_flag: &str, auth_file: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = ferry()
            .envs(env.iter().copied())
            .args(["serve", "--listen", "127.0.0.1:0", "--json", "--datastore"])
            .arg(datastore)
            .arg(auth_flag)
            .arg(auth_file)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ferry serve");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read listening line");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("bad first line {line:?}"));
        let addr = v["address"].as_str().expect("address").to_string();
        let fingerprint = v["fingerprint"].as_str().unwrap_or("").to_string();
        assert_eq!(
            fingerprint.is_empty(),
            extra.contains(&"--insecure-plaintext"),
            "a fingerprint exactly when TLS is on: {line}"
        );
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Server { child, url: format!("ferry://{addr}"), fingerprint, events }
    }

    /// The flags that pin this server: `["--fingerprint", "sha256:.."]`.
    pub fn pin(&self) -> [&str; 2] {
        ["--fingerprint", &self.fingerprint]
    }

    /// What a source needs to reach this server: its pin, or `--insecure-plaintext` for a
    /// server started with it.
    pub fn client_args(&self) -> Vec<&str> {
        if self.fingerprint.is_empty() {
            vec!["--insecure-plaintext"]
        } else {
            vec!["--fingerprint", &self.fingerprint]
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (up to 20 s) until the server has printed `n` events named `name`; return them.
    pub fn events_named(&self, name: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let found: Vec<serde_json::Value> =
                self.events.lock().unwrap().iter().filter(|v| v["event"] == name).cloned().collect();
            if found.len() >= n || std::time::Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kill it with SIGKILL and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait (up to 20 s) until the server has reported `n` finished sessions; return them.
    pub fn sessions(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let done: Vec<serde_json::Value> =
                self.events.lock().unwrap().iter().filter(|v| v["event"] == "session_done").cloned().collect();
            if done.len() >= n || std::time::Instant::now() > deadline {
                return done;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copy a directory tree (files and directories only).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("dir entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy file");
        }
    }
}

/// A TCP proxy on 127.0.0.1 in front of a server. The i-th connection is cut
/// after `cuts[i]` bytes from the client have been forwarded (the client's
/// socket is shut down at once; the server gets those bytes, then the end); later connections are forwarded untouched. The client's bytes
/// of each cut connection are kept (see [`Proxy::cut_streams`]).
pub struct Proxy {
    /// `127.0.0.1:PORT` of the proxy.
    pub addr: String,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    connections: std::sync::atomic::AtomicUsize,
    cut_streams: std::sync::Mutex<Vec<Vec<u8>>>,
    /// Every byte forwarded, both ways, in the order forwarded (with `record`).
    recorded: std::sync::Mutex<Vec<u8>>,
    stop: std::sync::atomic::AtomicBool,
    /// With [`Tamper::together`]: a held connection waited in vain.
    apart: std::sync::atomic::AtomicBool,
}

/// What a [`Proxy`] does to the bytes it relays besides copying them.
#[derive(Debug, Clone, Default)]
pub struct Tamper {
    /// Cut the i-th connection after `cuts[i]` bytes from the client (see [`Proxy`]).
    pub cuts: Vec<u64>,
    /// Flip the lowest bit of the client's byte at this offset (every connection).
    pub flip_to_server: Option<u64>,
    /// Flip the lowest bit of the server's byte at this offset (every connection).
    pub flip_to_client: Option<u64>,
    /// Keep every byte forwarded either way (see [`Proxy::recorded`]).
    pub record: bool,
    /// Hold every connection but the first until this many are open (at most 10 s),
    /// then forward; [`Proxy::were_together`] says whether they all came. A client that
    /// opens them one after another, each waiting for the one before, cannot.
    pub together: usize,
}

impl Proxy {
    /// Start a proxy to `upstream` (`HOST:PORT` or `ferry://HOST:PORT`).
    pub fn start(upstream: &str, cuts: Vec<u64>) -> Proxy {
        Proxy::start_with(upstream, Tamper { cuts, ..Tamper::default() })
    }

    /// Start a proxy to `upstream` that does `tamper` to what it relays.
    pub fn start_with(upstream: &str, tamper: Tamper) -> Proxy {
        use std::sync::atomic::Ordering;
        let upstream = upstream.strip_prefix("ferry://").unwrap_or(upstream).to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let state = std::sync::Arc::new(ProxyState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let i = st.connections.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let cut = tamper.cuts.get(i).copied();
                let (st, tamper) = (st.clone(), tamper.clone());
                std::thread::spawn(move || {
                    if i > 0 && tamper.together > 0 {
                        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                        while st.connections.load(Ordering::SeqCst) < tamper.together {
                            if std::time::Instant::now() > deadline {
                                break;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        if st.connections.load(Ordering::SeqCst) < tamper.together {
                            st.apart.store(true, Ordering::SeqCst);
                        }
                    }
                    proxy_connection(client, server, cut, &tamper, &st)
                });
            }
        });
        Proxy { addr, state }
    }

    /// `ferry://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("ferry://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The client's bytes of each connection cut so far (exactly what was forwarded).
    pub fn cut_streams(&self) -> Vec<Vec<u8>> {
        self.state.cut_streams.lock().unwrap().clone()
    }

    /// Every byte forwarded so far, both ways (with [`Tamper::record`]).
    pub fn recorded(&self) -> Vec<u8> {
        self.state.recorded.lock().unwrap().clone()
    }

    /// With [`Tamper::together`]: whether all its connections were open at once (none of
    /// the held ones waited in vain).
    pub fn were_together(&self, together: usize) -> bool {
        use std::sync::atomic::Ordering;
        !self.state.apart.load(Ordering::SeqCst) && self.state.connections.load(Ordering::SeqCst) >= together
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(&self.addr);
    }
}

/// Flip the lowest bit of the stream's byte at offset `at` if it is in `buf`, which
/// holds the stream's bytes from offset `pos` on.
fn flip_in(buf: &mut [u8], pos: u64, at: Option<u64>) {
    if let Some(at) = at {
        if at >= pos && at < pos + buf.len() as u64 {
            buf[(at - pos) as usize] ^= 1;
        }
    }
}

fn proxy_connection(
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    cut: Option<u64>,
    tamper: &Tamper,
    st: &std::sync::Arc<ProxyState>,
) {
    use std::net::Shutdown;
    let (Ok(mut c_read), Ok(mut s_write)) = (client.try_clone(), server.try_clone()) else { return };
    let (Ok(mut s_read), Ok(mut c_write)) = (server.try_clone(), client.try_clone()) else { return };
    // Server to client. After a cut the server's bytes are still read (and dropped) until it
    // closes: closing a socket with unread bytes would reset the connection, and a reset makes
    // the server's kernel drop what it received but the server had not read yet. A cut cable
    // does not do that: what reached the server is read by the server.
    let (down_tamper, down_st) = (tamper.clone(), st.clone());
    let down = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut client_gone = false;
        let mut pos = 0u64;
        loop {
            let n = match s_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            flip_in(&mut buf[..n], pos, down_tamper.flip_to_client);
            pos += n as u64;
            if down_tamper.record {
                down_st.recorded.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            if !client_gone && c_write.write_all(&buf[..n]).is_err() {
                client_gone = true;
            }
        }
        let _ = c_write.shutdown(Shutdown::Write);
    });
    let mut seen = Vec::new();
    let mut forwarded = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match c_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let take = match cut {
            Some(limit) => (n as u64).min(limit - forwarded) as usize,
            None => n,
        };
        flip_in(&mut buf[..take], forwarded, tamper.flip_to_server);
        if tamper.record {
            st.recorded.lock().unwrap().extend_from_slice(&buf[..take]);
        }
        if s_write.write_all(&buf[..take]).is_err() {
            break;
        }
        forwarded += take as u64;
        if cut.is_some() {
            seen.extend_from_slice(&buf[..take]);
        }
        if cut == Some(forwarded) {
            st.cut_streams.lock().unwrap().push(std::mem::take(&mut seen));
            // The source loses the connection at once; the server gets the bytes sent so far, then the end.
            let _ = client.shutdown(Shutdown::Both);
            break;
        }
    }
    let _ = s_write.shutdown(Shutdown::Write);
    let _ = down.join();
}

/// `(type, start, end)` of the frame of a ferry byte stream that holds byte
/// offset `at` (frames are a 12-byte header with the body length at bytes 4..8).
pub fn frame_at(stream: &[u8], at: u64) -> Option<(u8, u64, u64)> {
    let mut pos = 0u64;
    loop {
        let p = pos as usize;
        if p + 8 > stream.len() {
            return None;
        }
        assert_eq!(&stream[p..p + 2], &[0xFE, 0x52], "no frame magic at {pos}");
        let len = u32::from_le_bytes(stream[p + 4..p + 8].try_into().expect("4 bytes"));
        let end = pos + 12 + u64::from(len);
        if at < end {
            return Some((stream[p + 2], pos, end));
        }
        pos = end;
    }
}

/// `qemu-nbd -t -f qcow2 --socket=SOCK ARGS IMAGE` (ARGS e.g. `-r` or `-B BITMAP`),
/// returned once it accepts connections; SIGKILLed and reaped on drop.
pub struct QemuNbd {
    child: Child,
    /// `nbd+unix:///?socket=SOCK`.
    pub uri: String,
}

impl QemuNbd {
    /// Start it; panics with qemu-nbd's stderr if it exits or does not listen within 20 s.
    pub fn start(img: &Path, sock: &Path, args: &[&str]) -> QemuNbd {
        let _ = std::fs::remove_file(sock);
        let mut child = Command::new("qemu-nbd")
            .args(["-t", "-f", "qcow2"])
            .arg(format!("--socket={}", sock.display()))
            .args(args)
            .arg(img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-nbd");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            if let Some(st) = child.try_wait().expect("try_wait") {
                let mut err = String::new();
                let _ = child.stderr.take().expect("stderr").read_to_string(&mut err);
                panic!("qemu-nbd exited early ({st}): {err}");
            }
            assert!(std::time::Instant::now() < deadline, "qemu-nbd did not start listening");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        QemuNbd { child, uri: format!("nbd+unix:///?socket={}", sock.display()) }
    }

    /// SIGKILL now: nothing a client did not flush survives in qemu-nbd's caches.
    pub fn kill(self) {}
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
