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
//!
//! Files by job: `scenarios.rs` (images and scenarios), `harness.rs` (one
//! measured run and its checks), `ferry.rs` (ferry's runs), `peers.rs` (the
//! other tools); this file holds the flags, the environment and the loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Args;

use crate::measure::sh_quote;
use crate::mutate::Placement;
use crate::netns::{self, Wan};
use crate::report::{self, Results, Run, ScenarioInfo, Skip, ToolResult};
use crate::scratch::ScratchDir;

mod ferry;
mod harness;
mod peers;
mod scenarios;
mod thin;
mod wan;

use ferry::{ferry_path, ferry_replicate_cmd, ferry_serve_cmd, run_ferry, tls_identity, Transport};
use harness::{failed_run, RSS_FLOOR};
use peers::{missing_tools, run_peer};
use scenarios::{build, wanted, Kind, Scenario};

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
    /// Image size of `wan-100m` (default: 48M quick, 512M full); `wan-1g` copies an image 4x this size.
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
    /// Passed to `ferry replicate --compress`.
    #[arg(long)]
    pub compress: Option<String>,
    /// Passed to `ferry replicate --streams` (N or auto).
    #[arg(long)]
    pub streams: Option<String>,
    /// Passed to `ferry replicate --io-backend`.
    #[arg(long)]
    pub io_backend: Option<String>,
}

struct Env {
    ferry_modes: bool,
    /// The ferry binary knows `--no-map-cache`.
    map_cache_flag: bool,
    ferry: PathBuf,
    token: PathBuf,
    /// The bench server's TLS directory and fingerprint (None: a ferry without TLS).
    tls: Option<(PathBuf, String)>,
    runs: u32,
    drop_caches: bool,
    compress: Option<String>,
    streams: Option<String>,
    io_backend: Option<String>,
    wan: Option<Wan>,
    /// Seconds `iperf3` measures the link's capacity for.
    iperf_secs: u32,
    missing: BTreeMap<&'static str, String>,
}

/// Where the receiver listens and how commands reach the namespaces.
struct Net<'a> {
    /// The receiver listens here (in its namespace); only the counting proxy connects to it.
    host: &'a str,
    /// The counting proxy listens here (in `proxy_ns`), and senders connect to it.
    front_host: &'a str,
    src_prefix: Option<String>,
    dst_prefix: Option<String>,
    proxy_ns: Option<PathBuf>,
}

fn in_ns(prefix: &Option<String>, script: String) -> String {
    match prefix {
        // exec: the daemon must be the top process of the tree, so that SIGTERM
        // reaches it first and its usage (and its children's) is reaped by wait4.
        Some(p) => format!("exec {p}sh -c {}", sh_quote(&script)),
        None => script,
    }
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
    let wan_wanted = ["wan-100m", "wan-1g", "wan-cbt"].iter().any(|id| wanted(&a.scenarios, id));
    let wan = if wan_wanted { create_wan(&mut skipped) } else { None };
    let img_dir = work.path().join("images");
    std::fs::create_dir_all(&img_dir)?;
    let built = build(&a, &img_dir, sizes, &mut skipped, wan.is_some())?;
    let token = work.path().join("token");
    let token_error = new_token(&ferry, &token);
    // The incremental modes come with the planner (issue 5); a ferry without them
    // is skipped in those scenarios, with the reason recorded, rather than failed.
    let help = Command::new(&ferry).args(["replicate", "--help"]).output();
    let ferry_modes = help.as_ref().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--mode"));
    let map_cache_flag = help.as_ref().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--no-map-cache"));
    let tls = if token_error.is_none() { tls_identity(&ferry, &token, work.path())? } else { None };
    let env = Env {
        ferry_modes,
        map_cache_flag,
        ferry: ferry.clone(),
        token,
        tls,
        runs,
        drop_caches: a.drop_caches,
        compress: a.compress.clone(),
        streams: a.streams.clone(),
        io_backend: a.io_backend.clone(),
        wan,
        iperf_secs: if quick { 3 } else { 10 },
        missing,
    };
    let mut results = Vec::new();
    let mut wan_reports = Vec::new();
    for sc in &built.scenarios {
        let tools = scenario_tools(&a, &env, sc, token_error.is_some(), &mut skipped);
        if let (Some(w), Some(link)) = (&env.wan, sc.link) {
            w.set_shape(link);
        }
        let rows = run_scenario(&env, sc, &tools, work.path(), token_error.as_deref())?;
        if env.wan.is_some() {
            wan_reports.extend(wan::report(sc, &rows));
        }
        results.extend(rows);
    }
    // Thin multi-terabyte disks (issue 20): ferry alone, its own table; not in --quick.
    let thin_ok = if !quick && wanted(&a.scenarios, "thin") {
        let rows = thin::run_thin(&env, work.path(), a.seed)?;
        std::fs::write(a.out.join("thin.md"), thin::table(&rows))?;
        std::fs::write(a.out.join("thin.json"), serde_json::to_vec_pretty(&rows)?)?;
        Some(rows.iter().all(|r| r.ok))
    } else {
        None
    };
    let ok = (!results.is_empty() || thin_ok.is_some())
        && results.iter().all(|r: &ToolResult| r.identical)
        && thin_ok.unwrap_or(true);
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
        wan: wan_reports,
    };
    drop(env);
    let mut doc = doc;
    doc.rss_floor_bytes = RSS_FLOOR.load(std::sync::atomic::Ordering::Relaxed);
    write_results(&a.out, &doc)?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The WAN namespaces, or None with the reason recorded in `skipped`.
/// Each scenario sets the link's shape before it runs.
fn create_wan(skipped: &mut Vec<Skip>) -> Option<Wan> {
    match netns::unavailable_reason() {
        Some(r) => skipped.push(Skip { scenario: Some("wan-*".into()), tool: None, reason: r }),
        None => match Wan::create(netns::Shape { rate_bps: 100_000_000, one_way: Duration::from_millis(25) }) {
            Ok(w) => return Some(w),
            Err(e) => skipped.push(Skip {
                scenario: Some("wan-*".into()),
                tool: None,
                reason: format!("setting up namespaces failed: {e:#}"),
            }),
        },
    }
    None
}

/// Has ferry write a new token to `token`; the error, if it could not.
fn new_token(ferry: &Path, token: &Path) -> Option<String> {
    match Command::new(ferry).args(["token", "new", "--out"]).arg(token).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`ferry token new` failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("cannot run ferry at {}: {e} (pass --ferry PATH)", ferry.display())),
    }
}

/// The tools that run in `sc`: those asked for and installed; ferry without
/// its incremental modes is recorded in `skipped` instead.
fn scenario_tools(
    a: &RunArgs,
    env: &Env,
    sc: &Scenario,
    token_failed: bool,
    skipped: &mut Vec<Skip>,
) -> Vec<&'static str> {
    let tools: Vec<&str> = sc
        .tools()
        .iter()
        .copied()
        .filter(|t| *t == "ferry" || a.tools.is_empty() || a.tools.iter().any(|x| x == t))
        .filter(|t| !env.missing.contains_key(t))
        .collect();
    let mut tools = tools;
    if matches!(sc.kind, Kind::Cbt | Kind::Digest | Kind::Seed) && !env.ferry_modes && !token_failed {
        tools.retain(|t| *t != "ferry");
        skipped.push(Skip {
            scenario: Some(sc.id.clone()),
            tool: Some("ferry".into()),
            reason: "this ferry binary has no `replicate --mode` (incremental modes not built yet)".into(),
        });
    }
    tools
}

/// Where `sc`'s receivers listen: in the WAN namespaces for the WAN scenario, else on loopback.
fn scenario_net<'a>(env: &'a Env, sc: &Scenario) -> Net<'a> {
    match (&env.wan, sc.link) {
        // The link is the delay line between the namespaces; the proxy counts in `dst`,
        // in front of the receiver, with no delay of its own.
        (Some(w), Some(_)) => Net {
            host: "127.0.0.1",
            front_host: netns::DST_ADDR,
            src_prefix: Some(Wan::exec_prefix(&w.src)),
            dst_prefix: Some(Wan::exec_prefix(&w.dst)),
            proxy_ns: Some(Wan::path(&w.dst)),
        },
        _ => Net { host: "127.0.0.1", front_host: "127.0.0.1", src_prefix: None, dst_prefix: None, proxy_ns: None },
    }
}

/// Runs every tool of `sc` `env.runs` times, alternating (run r starts with the r-th tool),
/// each in a fresh directory under `work`; one summary per tool, in `tools`' order.
fn run_scenario(
    env: &Env,
    sc: &Scenario,
    tools: &[&'static str],
    work: &Path,
    token_error: Option<&str>,
) -> Result<Vec<ToolResult>> {
    let net = scenario_net(env, sc);
    let mut per_tool: BTreeMap<&str, (Vec<Run>, String, Option<String>)> = BTreeMap::new();
    for r in 0..env.runs as usize {
        for i in 0..tools.len() {
            let tool = tools[(i + r) % tools.len()];
            let dir = work.join(format!("run-{}", tool));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let line0 = env.wan.as_ref().filter(|_| sc.link.is_some()).map(|w| w.stats());
            let outcome = if let (Some(err), "ferry") = (token_error, tool) {
                Err(anyhow::anyhow!("{err}"))
            } else if tool == "ferry" || tool == "ferry-plaintext" {
                let t = if tool == "ferry" { Transport::Tls } else { Transport::Plaintext };
                run_ferry(env, &net, sc, &dir, t).map(|run| {
                    let cmd = ferry_replicate_cmd(env, sc, net.front_host, 0, "MODE", sc.kind == Kind::Cbt, t);
                    (run, cmd, Some(ferry_serve_cmd(env, net.host, 0, Path::new("DATASTORE"), t)))
                })
            } else {
                run_peer(env, &net, sc, tool, &dir)
            };
            let (mut run, cmd, rcv) = match outcome {
                Ok(x) => x,
                Err(e) => (failed_run(format!("{e:#}")), String::new(), None),
            };
            if let (Some(w), Some(s0)) = (&env.wan, line0) {
                // The link's packet rate and drops over the run (its setup included: nothing
                // else crosses the link meanwhile, and setup does not use it).
                let s1 = w.stats();
                let packets: u64 = (0..2).map(|i| s1[i].packets - s0[i].packets).sum();
                run.line_pps = (run.wall_s > 0.0).then(|| report::round3(packets as f64 / run.wall_s));
                run.line_drops = Some((0..2).map(|i| s1[i].drops - s0[i].drops).sum());
            }
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
    let mut results = Vec::new();
    for tool in tools {
        if let Some((runs, cmd, rcv)) = per_tool.remove(tool) {
            results.push(report::summarize(&sc.id, tool, cmd, rcv, sc.logical(), runs));
        }
    }
    Ok(results)
}

/// Writes results.json, results.md and results.svg into `out` and prints the markdown.
fn write_results(out: &Path, doc: &Results) -> Result<()> {
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(doc)? + "\n")?;
    let md = report::markdown(doc);
    std::fs::write(out.join("results.md"), &md)?;
    std::fs::write(out.join("results.svg"), report::svg(doc))?;
    println!("{md}");
    eprintln!("ferry-bench: wrote {}/results.{{json,md,svg}}", out.display());
    Ok(())
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
