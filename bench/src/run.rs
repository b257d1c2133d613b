//! Scenarios, tools and the measurement loop.
//!
//! For every scenario, every tool runs `runs` times, alternating (run r starts
//! with the r-th tool), each run in a fresh directory: untimed setup (the target's
//! previous state), then the measured command(s), then an untimed byte-for-byte
//! check of the result against the source.
//!
//! Networked tools run with a fresh receiver per run (ferry serve, an rsync
//! daemon, `nc -l`), listening on a port that only a counting proxy connects to;
//! the sender connects to the proxy. Timing starts when the sender starts (the
//! receiver is already listening) and ends when the data is in place: when the
//! sender exits for ferry and rsync (they wait for the target), when the
//! receiver exits for nc pipelines. CPU is the sum over the sender and receiver
//! process trees; peak RSS is the largest single process of either.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::ext4;
use crate::measure::{free_port, reserved_port, sh_quote, shq, wait_listening, Tree, TreeUsage};
use crate::mutate::{self, extent_bytes, Placement};
use crate::netns::{self, Wan};
use crate::proxy::Proxy;
use crate::report::{self, ImageInfo, Results, Run, ScenarioInfo, Skip, StageLatency, ToolResult};
use crate::scratch::ScratchDir;
use crate::synth::{self, SynthSpec};

/// Flags of the benchmark run (the default command).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Small images, one run each, under 2 minutes (the CI smoke test).
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// The full profile (the default): 4 GiB synthetic and 2 GiB ext4 images, 3 runs each.
    #[arg(long)]
    pub full: bool,
    /// Output directory for results.json, results.md and results.svg.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// The ferry binary (default: this program when run as `ferry bench`, else `ferry` next to it).
    #[arg(long)]
    pub ferry: Option<PathBuf>,
    /// Parent of the scratch directory (default: $TMPDIR); needs room for ~10 image copies.
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Keep the scratch directory (images, logs) after the run.
    #[arg(long)]
    pub keep_work: bool,
    /// Runs per tool and scenario (default: 1 quick, 3 full).
    #[arg(long)]
    pub runs: Option<u32>,
    /// Seed of every generator and mutator.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Synthetic image size (default: 128M quick, 4G full).
    #[arg(long, value_parser = crate::parse_size)]
    pub synth_size: Option<u64>,
    /// ext4 image size (default: 128M quick, 2G full).
    #[arg(long, value_parser = crate::parse_size)]
    pub fs_size: Option<u64>,
    /// Image size for the WAN scenario (default: 48M quick, 512M full).
    #[arg(long, value_parser = crate::parse_size)]
    pub wan_size: Option<u64>,
    /// Share of zero regions in synthetic images.
    #[arg(long, default_value_t = 0.30)]
    pub zero: f64,
    /// Share of incompressible regions.
    #[arg(long, default_value_t = 0.20)]
    pub random: f64,
    /// Share of text-like regions.
    #[arg(long, default_value_t = 0.25)]
    pub text: f64,
    /// Share of file-system-like regions.
    #[arg(long, default_value_t = 0.25)]
    pub fs: f64,
    /// Block size of the block mutator.
    #[arg(long, value_parser = crate::parse_size, default_value = "64K")]
    pub block_size: u64,
    /// Placement of changed blocks.
    #[arg(long, value_enum, default_value = "uniform")]
    pub placement: Placement,
    /// Only scenarios whose id starts with one of these (comma-separated), e.g. `full,cbt-1/synth,wan`.
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// Only these tools (comma-separated); ferry is always included.
    #[arg(long, value_delimiter = ',')]
    pub tools: Vec<String>,
    /// Drop the page cache before every run (root only); the default is a warm cache.
    #[arg(long)]
    pub drop_caches: bool,
    /// Skip the ext4 image and its scenarios.
    #[arg(long)]
    pub no_ext4: bool,
    /// WAN link rate for tc tbf.
    #[arg(long, default_value = "100mbit")]
    pub wan_rate: String,
    /// WAN one-way delay added by the proxy, in milliseconds.
    #[arg(long, default_value_t = 25)]
    pub wan_delay_ms: u64,
    /// Passed to `ferry replicate --compress`.
    #[arg(long)]
    pub compress: Option<String>,
    /// Passed to `ferry replicate --io-backend`.
    #[arg(long)]
    pub io_backend: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Full,
    Cbt,
    Digest,
    Seed,
    Multi,
    Wan,
}

#[derive(Debug)]
struct Scenario {
    id: String,
    description: String,
    kind: Kind,
    /// (disk name, source image).
    sources: Vec<(String, PathBuf)>,
    /// The target's previous state per disk (incrementals, seeding).
    previous: Vec<PathBuf>,
    /// Changed-extent lists per disk (cbt).
    cbt: Vec<PathBuf>,
    changed_bytes: Option<u64>,
}

impl Scenario {
    fn logical(&self) -> u64 {
        self.sources.iter().map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len())).sum()
    }

    fn tools(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::Full => &["ferry", "rsync", "zstd-nc", "nc", "qemu-img", "cp", "nbdcopy", "bdsync"],
            Kind::Cbt | Kind::Digest | Kind::Seed => &["ferry", "rsync", "bdsync"],
            Kind::Multi => &["ferry", "rsync", "zstd-nc"],
            Kind::Wan => &["ferry", "rsync", "zstd-nc", "nc"],
        }
    }
}

struct Env {
    ferry_modes: bool,
    /// The ferry binary knows `--no-map-cache`.
    map_cache_flag: bool,
    ferry: PathBuf,
    token: PathBuf,
    runs: u32,
    drop_caches: bool,
    compress: Option<String>,
    io_backend: Option<String>,
    wan: Option<Wan>,
    wan_delay: Duration,
    missing: BTreeMap<&'static str, String>,
}

/// Where the receiver listens and how commands reach the namespaces.
struct Net<'a> {
    host: &'a str,
    src_prefix: Option<String>,
    dst_prefix: Option<String>,
    proxy_ns: Option<PathBuf>,
    delay: Duration,
}

fn in_ns(prefix: &Option<String>, script: String) -> String {
    match prefix {
        // exec: the daemon must be the top process of the tree, so that SIGTERM
        // reaches it first and its usage (and its children's) is reaped by wait4.
        Some(p) => format!("exec {p}sh -c {}", sh_quote(&script)),
        None => script,
    }
}

/// Outcome of one measured command set.
struct Measured {
    wall_s: f64,
    usage: TreeUsage,
    wire: Option<u64>,
    /// Bytes read from block devices meanwhile.
    dev_read: Option<u64>,
    ok: bool,
    error: Option<String>,
}

/// Bytes read from block devices since boot, whole machine (/proc/vmstat pgpgin, KiB).
fn dev_read_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/vmstat").ok()?;
    s.lines().find_map(|l| l.strip_prefix("pgpgin ")).and_then(|v| v.trim().parse::<u64>().ok()).map(|k| k * 1024)
}

/// Bytes read from block devices since [`dev_read_bytes`] returned `start`.
fn dev_read_since(start: Option<u64>) -> Option<u64> {
    start.zip(dev_read_bytes()).map(|(a, b)| b.saturating_sub(a))
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().rev().take(4).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Largest RSS floor seen before any run (see `measure::rss_floor`).
static RSS_FLOOR: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Before a measured run: either drop the page cache, or warm it with the sources and the
/// target's previous state (`dir`'s `out/*` for peers, `datastore/*/disks/*.img` for ferry,
/// whose setup wrote them with O_DIRECT), so that every tool starts from the same state.
fn prepare_run(env: &Env, dir: &Path, sources: &[(String, PathBuf)]) -> Result<()> {
    RSS_FLOOR.fetch_max(crate::measure::rss_floor(&std::env::temp_dir()), std::sync::atomic::Ordering::Relaxed);
    run_quiet("sync")?;
    settle_disk(dir)?;
    if env.drop_caches {
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache (needs root)")?;
        return Ok(());
    }
    let files_in = |d: PathBuf| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect())
            .unwrap_or_default()
    };
    let mut warm: Vec<PathBuf> = sources.iter().map(|(_, p)| p.clone()).collect();
    warm.extend(files_in(dir.join("out")));
    if let Ok(rd) = std::fs::read_dir(dir.join("datastore")) {
        for replica in rd.flatten() {
            warm.extend(
                files_in(replica.path().join("disks"))
                    .into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "img")),
            );
        }
    }
    for p in warm {
        let mut f = std::fs::File::open(&p).with_context(|| format!("warming {}", p.display()))?;
        std::io::copy(&mut f, &mut std::io::sink())?;
    }
    Ok(())
}

/// Wait (15 s at most) until a 4 KiB write plus fdatasync is quick again, five in a row.
/// `sync` returns once the guest has written, but the machine under this VM may still
/// be writing back what an untimed setup step wrote (gigabytes), and that would slow
/// whichever measured tool syncs first. Every tool's runs wait alike.
fn settle_disk(dir: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let p = dir.join(".settle");
    let f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&p)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut quick = 0;
    while quick < 5 && Instant::now() < deadline {
        f.write_all_at(&[0u8; 4096], 0)?;
        let t = Instant::now();
        f.sync_data()?;
        if t.elapsed() < Duration::from_millis(2) {
            quick += 1;
        } else {
            quick = 0;
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(f);
    std::fs::remove_file(&p)?;
    Ok(())
}

fn run_quiet(script: &str) -> Result<()> {
    let out = Command::new("sh").arg("-c").arg(script).output().with_context(|| format!("running {script}"))?;
    if !out.status.success() {
        bail!("`{script}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs a networked tool: receiver(back ports) listening behind counting proxies, sender(front ports).
#[allow(clippy::too_many_arguments)]
fn measure_net(
    env: &Env,
    net: &Net,
    dir: &Path,
    sources: &[(String, PathBuf)],
    nports: usize,
    daemon: bool,
    receiver: &dyn Fn(&[u16]) -> String,
    sender: &dyn Fn(&[u16]) -> String,
    daemon_done: Option<&dyn Fn() -> bool>,
) -> Result<Measured> {
    // The receiver's ports stay bound here until the proxies listen: a port released at once could
    // be handed to a proxy's port 0, and that proxy would relay to itself while the receiver
    // failed to bind (CI hung on it once).
    let held: Vec<_> = (0..nports).map(|_| reserved_port()).collect::<Result<_>>()?;
    let back: Vec<u16> = held.iter().map(|(_, port)| *port).collect();
    let mut proxies = Vec::new();
    for b in &back {
        let up: SocketAddr = format!("{}:{b}", net.host).parse()?;
        proxies.push(Proxy::start("127.0.0.1:0".parse()?, up, net.delay, net.proxy_ns.clone())?);
    }
    drop(held);
    let front: Vec<u16> = proxies.iter().map(|p| p.port).collect();
    let rx_script = in_ns(&net.dst_prefix, receiver(&back));
    let rx = Tree::spawn(&rx_script, Some(&dir.join("receiver.out")), &dir.join("receiver.err"))?;
    if let Err(e) = wait_listening(rx.pid(), &back, Duration::from_secs(10)) {
        bail!("{e:#}; receiver stderr: {}", tail(&dir.join("receiver.err")));
    }
    let baseline = rx.group_size();
    prepare_run(env, dir, sources)?;
    let tx_script = in_ns(&net.src_prefix, sender(&front));
    let read0 = dev_read_bytes();
    let t0 = Instant::now();
    let tx = Tree::spawn(&tx_script, Some(&dir.join("sender.out")), &dir.join("sender.err"))?;
    let (tx_status, _, tx_usage) = tx.wait()?;
    let mut wall = t0.elapsed();
    let mut dev_read = dev_read_since(read0);
    let (rx_ok, rx_usage) = if daemon {
        // Let the daemon finish its bookkeeping of the session (untimed) before stopping it.
        if let Some(done) = daemon_done {
            let deadline = Instant::now() + Duration::from_secs(10);
            while tx_status.success() && !done() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // A forking daemon (rsync) must have reaped its session process, or that
        // process's CPU would not be counted.
        let deadline = Instant::now() + Duration::from_secs(10);
        while rx.group_size() > baseline && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if std::env::var_os("FERRY_BENCH_DEBUG").is_some() {
            eprintln!("daemon group: baseline {baseline}, now {}", rx.group_size());
        }
        let (_, u) = rx.stop(Duration::from_secs(10))?;
        (true, u)
    } else {
        if !tx_status.success() {
            // The receiver may wait forever for a sender that failed.
            rx.signal(ferry_io::process::Signal::Term);
        }
        let (st, _, u) = rx.wait()?;
        wall = t0.elapsed();
        dev_read = dev_read_since(read0);
        (st.success(), u)
    };
    let wire: u64 = proxies.iter().map(|p| p.settle(Duration::from_secs(5))).sum();
    let sender_ok = tx_status.success() || (tx_status.code() == Some(3));
    let ok = sender_ok && rx_ok;
    let error = (!ok).then(|| {
        format!("sender {tx_status}: {}; receiver: {}", tail(&dir.join("sender.err")), tail(&dir.join("receiver.err")))
    });
    Ok(Measured {
        wall_s: wall.as_secs_f64(),
        usage: tx_usage.combine(rx_usage),
        wire: Some(wire),
        dev_read,
        ok,
        error,
    })
}

fn measure_local(env: &Env, dir: &Path, sources: &[(String, PathBuf)], script: &str) -> Result<Measured> {
    prepare_run(env, dir, sources)?;
    let read0 = dev_read_bytes();
    let t = Tree::spawn(script, Some(&dir.join("sender.out")), &dir.join("sender.err"))?;
    let (st, wall, usage) = t.wait()?;
    let dev_read = dev_read_since(read0);
    let error = (!st.success()).then(|| format!("{st}: {}", tail(&dir.join("sender.err"))));
    Ok(Measured { wall_s: wall.as_secs_f64(), usage, wire: None, dev_read, ok: st.success(), error })
}

fn ferry_replicate_cmd(env: &Env, sc: &Scenario, port: u16, mode: &str, with_cbt: bool) -> String {
    let mut c = format!("exec {} replicate", shq(&env.ferry));
    for (name, p) in &sc.sources {
        c += &format!(" --source {}", sh_quote(&format!("{name}={}", p.display())));
    }
    c += &format!(" --target ferry://127.0.0.1:{port} --replica bench --token-file {}", shq(&env.token));
    // Full is the default; leaving it out also works with a ferry that has no --mode yet.
    if mode != "full" {
        c += &format!(" --mode {mode}");
    }
    if with_cbt {
        for ((name, _), e) in sc.sources.iter().zip(&sc.cbt) {
            c += &format!(" --cbt {}", sh_quote(&format!("{name}={}", e.display())));
        }
    }
    if let Some(x) = &env.compress {
        c += &format!(" --compress {}", sh_quote(x));
    }
    if let Some(x) = &env.io_backend {
        c += &format!(" --io-backend {}", sh_quote(x));
    }
    if env.map_cache_flag {
        // Deterministic and conservative: every digest-mode run downloads the target's digest
        // map (a scheduled job's next run would find it in its cache), and nothing is written
        // to the caller's ~/.cache.
        c += " --no-map-cache";
    }
    c + " --json"
}

fn ferry_serve_cmd(env: &Env, host: &str, port: u16, ds: &Path) -> String {
    format!(
        "exec {} serve --listen {host}:{port} --datastore {} --token-file {} --json",
        shq(&env.ferry),
        shq(ds),
        shq(&env.token)
    )
}

/// Has `ferry serve` create an empty datastore in `ds` (untimed).
fn ferry_init_datastore(env: &Env, dir: &Path, ds: &Path) -> Result<()> {
    let port = free_port()?;
    let err = dir.join("init.err");
    let rx = Tree::spawn(&ferry_serve_cmd(env, "127.0.0.1", port, ds), None, &err)?;
    wait_listening(rx.pid(), &[port], Duration::from_secs(20))
        .with_context(|| format!("ferry serve creating a datastore: {}", tail(&err)))?;
    rx.stop(Duration::from_secs(10))?;
    Ok(())
}

/// Puts the target's previous state into a fresh datastore with an untimed full replication.
fn ferry_seed_datastore(env: &Env, dir: &Path, ds: &Path, sc: &Scenario) -> Result<()> {
    let prev = Scenario {
        id: String::new(),
        description: String::new(),
        kind: Kind::Full,
        sources: sc.sources.iter().zip(&sc.previous).map(|((n, _), p)| (n.clone(), p.clone())).collect(),
        previous: vec![],
        cbt: vec![],
        changed_bytes: None,
    };
    let port = free_port()?;
    let setup = dir.join("setup");
    std::fs::create_dir_all(&setup)?;
    let rx = Tree::spawn(&ferry_serve_cmd(env, "127.0.0.1", port, ds), None, &setup.join("serve.err"))?;
    wait_listening(rx.pid(), &[port], Duration::from_secs(20))
        .with_context(|| format!("ferry serve for setup: {}", tail(&setup.join("serve.err"))))?;
    let tx = Tree::spawn(&ferry_replicate_cmd(env, &prev, port, "full", false), None, &setup.join("rep.err"))?;
    let (st, _, _) = tx.wait()?;
    rx.stop(Duration::from_secs(10))?;
    if !st.success() {
        bail!("setting up the previous state with ferry (full) failed: {st}: {}", tail(&setup.join("rep.err")));
    }
    Ok(())
}

fn parse_stages(v: &serde_json::Value, prefix: &str, into: &mut BTreeMap<String, StageLatency>) {
    if let Some(obj) = v.get("stages").and_then(|s| s.as_object()) {
        for (name, l) in obj {
            let f = |k: &str| l.get(k).and_then(|x| x.as_f64());
            if let (Some(p50_us), Some(p99_us), Some(p999_us)) = (f("p50_us"), f("p99_us"), f("p999_us")) {
                let key = if into.contains_key(name) { format!("{prefix}{name}") } else { name.clone() };
                let busy_s = l.get("busy_s").and_then(|x| x.as_f64());
                let count = l.get("count").and_then(|x| x.as_u64());
                into.insert(key, StageLatency { p50_us, p99_us, p999_us, busy_s, count });
            }
        }
    }
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
}

fn run_ferry(env: &Env, net: &Net, sc: &Scenario, dir: &Path) -> Result<Run> {
    let ds = dir.join("datastore");
    std::fs::create_dir_all(&ds)?;
    let mode = match sc.kind {
        Kind::Full | Kind::Multi | Kind::Wan => "full",
        Kind::Cbt => "cbt",
        Kind::Digest => "digest",
        Kind::Seed => "seed",
    };
    if sc.kind == Kind::Seed {
        // A seed is a copy placed by other means: let ferry create the datastore,
        // then put the copy where the replica's disk lives.
        ferry_init_datastore(env, dir, &ds)?;
        let disks = ds.join("bench").join("disks");
        std::fs::create_dir_all(&disks)?;
        for ((name, _), prev) in sc.sources.iter().zip(&sc.previous) {
            copy_sparse(prev, &disks.join(format!("{name}.img")))?;
        }
    } else if !sc.previous.is_empty() {
        ferry_seed_datastore(env, dir, &ds, sc)?;
    }
    let host = net.host.to_string();
    let session_done =
        || std::fs::read_to_string(dir.join("receiver.out")).is_ok_and(|s| s.contains("\"session_done\""));
    let m = measure_net(
        env,
        net,
        dir,
        &sc.sources,
        1,
        true,
        &|b| ferry_serve_cmd(env, &host, b[0], &ds),
        &|f| ferry_replicate_cmd(env, sc, f[0], mode, sc.kind == Kind::Cbt),
        Some(&session_done),
    )?;
    let events = json_lines(&dir.join("sender.out"));
    let summary = events.iter().rev().find(|e| e.get("event").and_then(|x| x.as_str()) == Some("summary"));
    let mut stages = BTreeMap::new();
    let mut run = base_run(&m);
    if let Some(s) = summary {
        parse_stages(s, "source_", &mut stages);
        run.ferry_status = s.get("status").and_then(|x| x.as_str()).map(String::from);
        run.ferry_totals = s.get("totals").cloned();
    } else {
        run.ok = false;
        run.error.get_or_insert_with(|| format!("no summary event on stdout: {}", tail(&dir.join("sender.err"))));
    }
    if run.ferry_status.as_deref() == Some("failed") {
        run.ok = false;
    }
    for e in json_lines(&dir.join("receiver.out")) {
        if e.get("event").and_then(|x| x.as_str()) == Some("session_done") {
            parse_stages(&e, "target_", &mut stages);
        }
    }
    run.stages = (!stages.is_empty()).then_some(stages);
    if run.ok {
        let mut identical = true;
        for (name, src) in &sc.sources {
            let out = dir.join(format!("export-{name}.img"));
            let o = Command::new(&env.ferry)
                .args(["points", "export", "--target"])
                .arg(&ds)
                .args(["--replica", "bench", "--disk", name, "--out"])
                .arg(&out)
                .output()
                .context("running ferry points export")?;
            if !o.status.success() {
                run.error = Some(format!("ferry points export failed: {}", String::from_utf8_lossy(&o.stderr).trim()));
                identical = false;
                break;
            }
            identical &= mutate::files_identical(src, &out)?;
            let _ = std::fs::remove_file(&out);
        }
        run.identical = identical;
    }
    Ok(run)
}

fn base_run(m: &Measured) -> Run {
    Run {
        wall_s: report::round6(m.wall_s),
        cpu_user_s: report::round6(m.usage.user_s),
        cpu_sys_s: report::round6(m.usage.sys_s),
        peak_rss_bytes: m.usage.max_rss_bytes,
        wire_bytes: m.wire,
        dev_read_bytes: m.dev_read,
        ok: m.ok,
        identical: false,
        error: m.error.clone(),
        ferry_status: None,
        ferry_totals: None,
        stages: None,
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn check_outputs(run: &mut Run, pairs: &[(PathBuf, PathBuf)]) -> Result<()> {
    if !run.ok {
        return Ok(());
    }
    let mut identical = true;
    for (src, out) in pairs {
        let same = out.exists() && mutate::files_identical(src, out)?;
        if !same {
            run.error.get_or_insert_with(|| format!("{} differs from {}", out.display(), src.display()));
        }
        identical &= same;
    }
    run.identical = identical;
    Ok(())
}

/// The shell command lines of a peer, for the record.
fn run_peer(env: &Env, net: &Net, sc: &Scenario, tool: &str, dir: &Path) -> Result<(Run, String, Option<String>)> {
    let host = net.host.to_string();
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir)?;
    let srcs: Vec<PathBuf> = sc.sources.iter().map(|(_, p)| p.clone()).collect();
    // Outputs keep the source file names.
    let outs: Vec<PathBuf> = srcs.iter().map(|p| out_dir.join(file_name(p))).collect();
    let pairs: Vec<(PathBuf, PathBuf)> = srcs.iter().cloned().zip(outs.iter().cloned()).collect();
    let (m, sender, receiver) = match tool {
        "rsync" => {
            for (prev, out) in sc.previous.iter().zip(&outs) {
                run_quiet(&format!("cp --sparse=always {} {}", shq(prev), shq(out)))?;
            }
            let (uid, gid) = (ferry_io::process::effective_uid(), ferry_io::process::effective_gid());
            let conf = dir.join("rsyncd.conf");
            std::fs::write(
                &conf,
                format!(
                    "use chroot = no\npid file = {d}/rsyncd.pid\nlog file = {d}/rsyncd.log\n[m]\npath = {o}\nread only = no\nuid = {uid}\ngid = {gid}\n",
                    d = dir.display(),
                    o = out_dir.display()
                ),
            )?;
            let delta = !sc.previous.is_empty();
            let flags = if delta { "--inplace --no-whole-file" } else { "--whole-file --sparse" };
            let files: Vec<String> = srcs.iter().map(|p| shq(p)).collect();
            let rcv = |b: &[u16]| {
                format!("exec rsync --daemon --no-detach --address {host} --port {} --config {}", b[0], shq(&conf))
            };
            let snd = |f: &[u16]| format!("rsync -I {flags} {} rsync://127.0.0.1:{}/m/", files.join(" "), f[0]);
            let m = measure_net(env, net, dir, &sc.sources, 1, true, &rcv, &snd, None)?;
            (m, snd(&[0]), Some(rcv(&[0])))
        }
        "zstd-nc" | "nc" => {
            let z = tool == "zstd-nc";
            let n = srcs.len();
            let rcv = |b: &[u16]| {
                let parts: Vec<String> = outs
                    .iter()
                    .zip(b)
                    .map(|(o, p)| {
                        if z {
                            format!("nc -d -l {host} {p} | zstd -d -q -f -o {}", shq(o))
                        } else {
                            format!("nc -d -l {host} {p} > {}", shq(o))
                        }
                    })
                    .collect();
                parallel(&parts)
            };
            let snd = |f: &[u16]| {
                let parts: Vec<String> = srcs
                    .iter()
                    .zip(f)
                    .map(|(s, p)| {
                        if z {
                            format!("zstd -1 -T2 -q -c {} | nc -N 127.0.0.1 {p}", shq(s))
                        } else {
                            format!("nc -N 127.0.0.1 {p} < {}", shq(s))
                        }
                    })
                    .collect();
                parallel(&parts)
            };
            let m = measure_net(env, net, dir, &sc.sources, n, false, &rcv, &snd, None)?;
            (m, snd(&vec![0; n]), Some(rcv(&vec![0; n])))
        }
        "qemu-img" | "cp" | "nbdcopy" => {
            let (s, o) = (shq(&srcs[0]), shq(&outs[0]));
            let script = match tool {
                "qemu-img" => format!("qemu-img convert -O raw {s} {o}"),
                "cp" => format!("cp --sparse=always {s} {o}"),
                _ => format!("nbdcopy {s} {o}"),
            };
            if tool == "nbdcopy" {
                // nbdcopy writes into an existing destination of the right size.
                std::fs::File::create(&outs[0])?.set_len(sc.logical())?;
            }
            (measure_local(env, dir, &sc.sources, &script)?, script, None)
        }
        other => bail!("unknown tool {other}"),
    };
    let mut run = base_run(&m);
    check_outputs(&mut run, &pairs)?;
    Ok((run, sender, receiver))
}

fn parallel(parts: &[String]) -> String {
    if parts.len() == 1 {
        return parts[0].clone();
    }
    let mut s: String = parts.iter().map(|p| format!("( {p} ) & ")).collect();
    s.push_str("wait");
    s
}

fn probe(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(cmd).output().is_ok_and(|o| o.status.success())
}

fn missing_tools() -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    let need = |bin: &str| (!probe(&format!("command -v {bin}"))).then(|| format!("`{bin}` is not installed"));
    for (tool, bins) in [
        ("rsync", &["rsync"][..]),
        ("zstd-nc", &["zstd", "nc"][..]),
        ("nc", &["nc"][..]),
        ("qemu-img", &["qemu-img"][..]),
        ("cp", &["cp"][..]),
        ("nbdcopy", &["nbdcopy"][..]),
    ] {
        if let Some(reason) = bins.iter().find_map(|b| need(b)) {
            m.insert(tool, format!("{reason} (Debian: rsync, zstd, netcat-openbsd, qemu-utils, libnbd-bin)"));
        }
    }
    if !m.contains_key("nc") && !probe("nc -h 2>&1 | grep -q OpenBSD") {
        for t in ["nc", "zstd-nc"] {
            m.insert(t, "`nc` is not netcat-openbsd (install netcat-openbsd)".into());
        }
    }
    if probe("command -v bdsync") {
        m.insert("bdsync", "installed, but this harness does not drive bdsync yet".into());
    } else {
        let policy = Command::new("apt-cache").args(["policy", "bdsync"]).output();
        let candidate = policy
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .and_then(|s| s.lines().find_map(|l| l.trim().strip_prefix("Candidate:").map(|c| c.trim().to_string())));
        let reason = match candidate {
            Some(c) if c != "(none)" => format!("not installed (apt candidate {c}; install it to include it)"),
            _ => "not packaged in this machine's Debian sources (`apt-cache policy bdsync` has no candidate)".into(),
        };
        m.insert("bdsync", reason);
    }
    m
}

fn ferry_path(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    if exe.file_name().is_some_and(|n| n == "ferry") {
        return Ok(exe);
    }
    Ok(exe.with_file_name("ferry"))
}

fn machine() -> report::Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|r| r.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0);
    report::Machine {
        hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        cpu_model,
        mem_bytes: mem_kib * 1024,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
    }
}

struct Built {
    images: Vec<ImageInfo>,
    scenarios: Vec<Scenario>,
}

fn wanted(filters: &[String], id: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| id.starts_with(f.as_str()))
}

fn copy_sparse(a: &Path, b: &Path) -> Result<()> {
    run_quiet(&format!("cp --sparse=always {} {}", shq(a), shq(b)))
}

/// Makes the images and the scenario list.
fn build(a: &RunArgs, dir: &Path, sizes: (u64, u64, u64), skipped: &mut Vec<Skip>, wan_ok: bool) -> Result<Built> {
    let (synth_size, fs_size, wan_size) = sizes;
    let mut images = Vec::new();
    let mut scenarios = Vec::new();
    let spec = |size, seed| SynthSpec {
        size,
        seed,
        zero: a.zero,
        random: a.random,
        text: a.text,
        fs: a.fs,
        region: synth::DEFAULT_REGION,
    };
    let describe = |s: &SynthSpec| {
        format!(
            "synthetic, seed {}: {:.0}% zero, {:.0}% incompressible, {:.0}% text-like, {:.0}% file-system-like, in shuffled 1 MiB regions",
            s.seed,
            s.zero * 100.0,
            s.random * 100.0,
            s.text * 100.0,
            s.fs * 100.0
        )
    };
    let mut families: Vec<(&str, PathBuf)> = Vec::new();
    let s = spec(synth_size, a.seed);
    let synth_img = dir.join("synth.img");
    eprintln!("ferry-bench: generating {} ({} MiB)", synth_img.display(), synth_size >> 20);
    synth::generate(&s, &synth_img)?;
    images.push(ImageInfo { name: "synth".into(), bytes: synth_size, description: describe(&s) });
    families.push(("synth", synth_img.clone()));
    let mut ext4_files = Vec::new();
    let ext4_wanted = !a.no_ext4
        && (a.scenarios.is_empty()
            || a.scenarios.iter().any(|f| f.contains("ext4") || f.starts_with("multi") || !f.contains('/')));
    if ext4_wanted {
        let img = dir.join("ext4.img");
        eprintln!("ferry-bench: building {} ({} MiB) from {:?}", img.display(), fs_size >> 20, ext4::ROOTS);
        let tree = dir.join("ext4-tree");
        std::fs::create_dir_all(&tree)?;
        match ext4::build(&tree, &img, fs_size, 0.7) {
            Ok(files) => {
                images.push(ImageInfo {
                    name: "ext4".into(),
                    bytes: fs_size,
                    description: format!(
                        "ext4 (mke2fs -t ext4 -b 4096 -d) holding {} files copied from {:?}, filling ~70%",
                        files.len(),
                        ext4::ROOTS
                    ),
                });
                ext4_files = files;
                families.push(("ext4", img));
                let _ = std::fs::remove_dir_all(&tree);
            }
            Err(e) => skipped.push(Skip { scenario: Some("*/ext4".into()), tool: None, reason: format!("{e:#}") }),
        }
    }
    for (fam, base) in &families {
        let size = std::fs::metadata(base)?.len();
        let one = |id: &str, kind, src: PathBuf, prev: Option<PathBuf>, cbt: Option<PathBuf>, changed, desc: String| {
            Scenario {
                id: format!("{id}/{fam}"),
                description: desc,
                kind,
                sources: vec![("disk0".into(), src)],
                previous: prev.into_iter().collect(),
                cbt: cbt.into_iter().collect(),
                changed_bytes: changed,
            }
        };
        if wanted(&a.scenarios, &format!("full/{fam}")) {
            scenarios.push(one(
                "full",
                Kind::Full,
                base.clone(),
                None,
                None,
                None,
                format!("Full copy of the {fam} image to an empty target."),
            ));
        }
        for pct in [1u32, 10] {
            let ids = [format!("cbt-{pct}/{fam}"), format!("digest-{pct}/{fam}")];
            if !ids.iter().any(|i| wanted(&a.scenarios, i)) {
                continue;
            }
            let new = dir.join(format!("{fam}-{pct}.img"));
            let ext = dir.join(format!("{fam}-{pct}.json"));
            copy_sparse(base, &new)?;
            let how = if *fam == "synth" {
                let n = mutate::blocks_for_share(size, a.block_size, f64::from(pct) / 100.0);
                let e = mutate::mutate_blocks(&new, a.block_size, n, a.placement, a.seed + u64::from(pct))?;
                mutate::write_extents(&ext, &e)?;
                format!("{pct}% of the {} KiB blocks changed ({:?})", a.block_size >> 10, a.placement)
            } else {
                let ch = ext4::mutate_image(
                    &new,
                    &ext4_files,
                    size * u64::from(pct) / 100,
                    a.seed + u64::from(pct),
                    &dir.join("fs-mutate"),
                )?;
                let e = mutate::diff_extents(base, &new, 4096)?;
                mutate::write_extents(&ext, &e)?;
                format!(
                    "files changed with debugfs: {} edited, {} added, {} deleted ({} MiB written, about {pct}% of the image); CBT list from a 4 KiB block comparison",
                    ch.edited,
                    ch.added,
                    ch.deleted,
                    ch.bytes_written >> 20
                )
            };
            let changed = extent_bytes(&serde_json::from_str::<Vec<mutate::Extent>>(&std::fs::read_to_string(&ext)?)?);
            for (kind, id, what) in [
                (Kind::Cbt, "cbt", "with the changed-extent list (CBT)"),
                (Kind::Digest, "digest", "without CBT (digest comparison)"),
            ] {
                if wanted(&a.scenarios, &format!("{id}-{pct}/{fam}")) {
                    scenarios.push(one(&format!("{id}-{pct}"), kind, new.clone(), Some(base.clone()), Some(ext.clone()), Some(changed), format!("Incremental {what}: the target holds the previous version; {how}. rsync gets the same previous version and uses its delta algorithm.")));
                }
            }
        }
        if wanted(&a.scenarios, &format!("seed-95/{fam}")) {
            let seed_img = dir.join(format!("{fam}-seed95.img"));
            copy_sparse(base, &seed_img)?;
            let n = mutate::blocks_for_share(size, a.block_size, 0.05);
            let e = mutate::mutate_blocks(&seed_img, a.block_size, n, Placement::Uniform, a.seed + 95)?;
            scenarios.push(one("seed-95", Kind::Seed, base.clone(), Some(seed_img), None, Some(extent_bytes(&e)), format!("Seeding: the target already holds a copy of the {fam} image with 5% of its {} KiB blocks different, placed by other means (copied to DATASTORE/REPLICA/disks/disk0.img with no digests; rsync's module holds the same copy); ferry runs --mode seed.", a.block_size >> 10)));
        }
    }
    if wanted(&a.scenarios, "multi-3") {
        let extra = dir.join("synth-b.img");
        synth::generate(&spec(synth_size, a.seed + 1), &extra)?;
        let mut disks: Vec<PathBuf> = families.iter().map(|(_, p)| p.clone()).collect();
        disks.push(extra);
        if disks.len() < 3 {
            let c = dir.join("synth-c.img");
            synth::generate(&spec(synth_size, a.seed + 3), &c)?;
            disks.push(c);
        }
        let sources: Vec<(String, PathBuf)> =
            disks.iter().enumerate().map(|(i, p)| (format!("disk{i}"), p.clone())).collect();
        scenarios.push(Scenario {
            id: "multi-3".into(),
            description: format!(
                "Three disks at once ({}), full, to an empty target; zstd-nc runs three pipelines in parallel.",
                disks.iter().map(|p| file_name(p)).collect::<Vec<_>>().join(", ")
            ),
            kind: Kind::Multi,
            sources,
            previous: vec![],
            cbt: vec![],
            changed_bytes: None,
        });
    }
    if wanted(&a.scenarios, "wan") && wan_ok {
        let img = dir.join("wan.img");
        let s = spec(wan_size, a.seed + 2);
        synth::generate(&s, &img)?;
        images.push(ImageInfo { name: "wan".into(), bytes: wan_size, description: describe(&s) });
        scenarios.push(Scenario {
                id: "wan-full".into(),
                description: format!("Full copy over a WAN: two network namespaces joined by veth, tc tbf {} on both ends, and {} ms added each way by the proxy.", a.wan_rate, a.wan_delay_ms),
                kind: Kind::Wan,
                sources: vec![("disk0".into(), img)],
                previous: vec![],
                cbt: vec![],
                changed_bytes: None,
            });
    }
    Ok(Built { images, scenarios })
}

/// Runs the benchmark; see the module docs.
pub fn run(a: RunArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let started_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let quick = a.quick;
    let profile = if quick { "quick" } else { "full" };
    let sizes = (
        a.synth_size.unwrap_or(if quick { 128 << 20 } else { 4 << 30 }),
        a.fs_size.unwrap_or(if quick { 128 << 20 } else { 2 << 30 }),
        a.wan_size.unwrap_or(if quick { 48 << 20 } else { 512 << 20 }),
    );
    let runs = a.runs.unwrap_or(if quick { 1 } else { 3 }).max(1);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating output directory {}", a.out.display()))?;
    let parent = a.work.clone().unwrap_or_else(std::env::temp_dir);
    let mut work = ScratchDir::new_in(&parent, "work")?;
    if a.keep_work {
        work.keep();
        eprintln!("ferry-bench: keeping scratch directory {}", work.path().display());
    }
    let ferry = ferry_path(a.ferry.clone())?;
    let mut skipped = Vec::new();
    let missing = missing_tools();
    for (tool, reason) in &missing {
        skipped.push(Skip { scenario: None, tool: Some(tool.to_string()), reason: reason.clone() });
    }
    let wan_wanted = wanted(&a.scenarios, "wan");
    let mut wan = None;
    if wan_wanted {
        match netns::unavailable_reason() {
            Some(r) => skipped.push(Skip { scenario: Some("wan-full".into()), tool: None, reason: r }),
            None => match Wan::create(&a.wan_rate) {
                Ok(w) => wan = Some(w),
                Err(e) => skipped.push(Skip {
                    scenario: Some("wan-full".into()),
                    tool: None,
                    reason: format!("setting up namespaces failed: {e:#}"),
                }),
            },
        }
    }
    let img_dir = work.path().join("images");
    std::fs::create_dir_all(&img_dir)?;
    let built = build(&a, &img_dir, sizes, &mut skipped, wan.is_some())?;
    let token = work.path().join("token");
    let mut token_error = None;
    match Command::new(&ferry).args(["token", "new", "--out"]).arg(&token).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => token_error = Some(format!("`ferry token new` failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => token_error = Some(format!("cannot run ferry at {}: {e} (pass --ferry PATH)", ferry.display())),
    }
    // The incremental modes come with the planner (issue 5); a ferry without them
    // is skipped in those scenarios, with the reason recorded, rather than failed.
    let help = Command::new(&ferry).args(["replicate", "--help"]).output();
    let ferry_modes = help.as_ref().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--mode"));
    let map_cache_flag = help.as_ref().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--no-map-cache"));
    let env = Env {
        ferry_modes,
        map_cache_flag,
        ferry: ferry.clone(),
        token,
        runs,
        drop_caches: a.drop_caches,
        compress: a.compress.clone(),
        io_backend: a.io_backend.clone(),
        wan,
        wan_delay: Duration::from_millis(a.wan_delay_ms),
        missing,
    };
    let mut results = Vec::new();
    for sc in &built.scenarios {
        let tools: Vec<&str> = sc
            .tools()
            .iter()
            .copied()
            .filter(|t| *t == "ferry" || a.tools.is_empty() || a.tools.iter().any(|x| x == t))
            .filter(|t| !env.missing.contains_key(t))
            .collect();
        let mut tools = tools;
        if matches!(sc.kind, Kind::Cbt | Kind::Digest | Kind::Seed) && !env.ferry_modes && token_error.is_none() {
            tools.retain(|t| *t != "ferry");
            skipped.push(Skip {
                scenario: Some(sc.id.clone()),
                tool: Some("ferry".into()),
                reason: "this ferry binary has no `replicate --mode` (incremental modes not built yet)".into(),
            });
        }
        let net = match (&env.wan, sc.kind) {
            (Some(w), Kind::Wan) => Net {
                host: netns::DST_ADDR,
                src_prefix: Some(Wan::exec_prefix(&w.src)),
                dst_prefix: Some(Wan::exec_prefix(&w.dst)),
                proxy_ns: Some(Wan::path(&w.src)),
                delay: env.wan_delay,
            },
            _ => Net { host: "127.0.0.1", src_prefix: None, dst_prefix: None, proxy_ns: None, delay: Duration::ZERO },
        };
        let mut per_tool: BTreeMap<&str, (Vec<Run>, String, Option<String>)> = BTreeMap::new();
        for r in 0..env.runs as usize {
            for i in 0..tools.len() {
                let tool = tools[(i + r) % tools.len()];
                let dir = work.path().join(format!("run-{}", tool));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)?;
                let outcome = if let (Some(err), "ferry") = (&token_error, tool) {
                    Err(anyhow::anyhow!("{err}"))
                } else if tool == "ferry" {
                    run_ferry(&env, &net, sc, &dir).map(|run| {
                        let cmd = ferry_replicate_cmd(&env, sc, 0, "MODE", sc.kind == Kind::Cbt);
                        (run, cmd, Some(ferry_serve_cmd(&env, net.host, 0, Path::new("DATASTORE"))))
                    })
                } else {
                    run_peer(&env, &net, sc, tool, &dir)
                };
                let (run, cmd, rcv) = match outcome {
                    Ok(x) => x,
                    Err(e) => (failed_run(format!("{e:#}")), String::new(), None),
                };
                eprintln!(
                    "ferry-bench: {:<16} {:<9} run {}/{}: {:>8.3} s {}{}",
                    sc.id,
                    tool,
                    r + 1,
                    env.runs,
                    run.wall_s,
                    if run.ok && run.identical { "identical" } else { "FAILED" },
                    run.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
                );
                let entry = per_tool.entry(tool).or_insert_with(|| (Vec::new(), String::new(), None));
                entry.0.push(run);
                if !cmd.is_empty() {
                    entry.1 = cmd;
                    entry.2 = rcv;
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        for tool in &tools {
            if let Some((runs, cmd, rcv)) = per_tool.remove(tool) {
                results.push(report::summarize(&sc.id, tool, cmd, rcv, sc.logical(), runs));
            }
        }
    }
    let ok = !results.is_empty() && results.iter().all(|r: &ToolResult| r.identical);
    let doc = Results {
        schema: report::SCHEMA.into(),
        profile: profile.into(),
        started_utc: report::rfc3339(started_unix),
        duration_s: started.elapsed().as_secs_f64(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        cache: if a.drop_caches { "dropped before every run".into() } else { "warm".into() },
        ferry: ferry.display().to_string(),
        images: built.images,
        scenarios: built
            .scenarios
            .iter()
            .map(|s| ScenarioInfo {
                id: s.id.clone(),
                description: s.description.clone(),
                changed_bytes: s.changed_bytes,
            })
            .collect(),
        results,
        skipped,
        ok,
        rss_floor_bytes: 0,
    };
    drop(env);
    let mut doc = doc;
    doc.rss_floor_bytes = RSS_FLOOR.load(std::sync::atomic::Ordering::Relaxed);
    std::fs::write(a.out.join("results.json"), serde_json::to_string_pretty(&doc)? + "\n")?;
    let md = report::markdown(&doc);
    std::fs::write(a.out.join("results.md"), &md)?;
    std::fs::write(a.out.join("results.svg"), report::svg(&doc))?;
    println!("{md}");
    eprintln!("ferry-bench: wrote {}/results.{{json,md,svg}}", a.out.display());
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn failed_run(error: String) -> Run {
    Run {
        wall_s: 0.0,
        cpu_user_s: 0.0,
        cpu_sys_s: 0.0,
        peak_rss_bytes: 0,
        wire_bytes: None,
        dev_read_bytes: None,
        ok: false,
        identical: false,
        error: Some(error),
        ferry_status: None,
        ferry_totals: None,
        stages: None,
    }
}
