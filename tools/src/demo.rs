//! `ferry demo`: a newcomer's first run.
//!
//! Makes a sample disk that looks like a real one (zero regions, text-like,
//! incompressible and file-system-like data), serves a temporary datastore on
//! loopback TCP (the real server code, TLS with a pinned self-signed
//! certificate and token authentication included),
//! replicates the disk in full and then incrementally after changing 1% of
//! it, verifies the replica byte for byte after each run, prints figures and
//! removes everything it made.

use ferry_replicate::access::{Access, AccessList};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use ferry_datastore::Datastore;
use ferry_replicate::source::{DiskSpec, JobReport, Quiet, ReplicateConfig};
use ferry_replicate::target::ServeConfig;
use ferry_replicate::tls::{ClientTrust, ServerIdentity, ServerTransport};
use ferry_replicate::{Target, TargetSpec};

use crate::report::{human_bytes, totals};

/// Options of `ferry demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Size of the sample disk.
    #[arg(long, default_value = "1G")]
    size: String,
    /// Work directory (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the work directory.
    #[arg(long)]
    keep: bool,
}

/// Change 1% of the disk's 64 KiB blocks (the bench harness's mutator); returns how many.
fn change_one_percent(path: &Path, size: u64) -> anyhow::Result<u64> {
    use ferry_bench::mutate::{blocks_for_share, mutate_blocks, Placement};
    let n = blocks_for_share(size, 65536, 0.01).max(1);
    mutate_blocks(path, 65536, n, Placement::Uniform, 7)?;
    Ok(n)
}

fn run_once(target: &Target, disk: &Path, label: &str) -> anyhow::Result<JobReport> {
    let spec = DiskSpec { name: "sample".into(), path: disk.to_path_buf(), mode: None, cbt: None };
    let cfg = ReplicateConfig::new("demo", vec![spec]);
    eprint!("{label} ... ");
    let _ = std::io::stderr().flush();
    let rep = target.run(&cfg, &Quiet)?;
    eprintln!("done in {:.2} s", rep.duration_s);
    Ok(rep)
}

/// Run the demo.
pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let size = crate::parse_size(&a.size)?;
    if !(1 << 20..=64 << 30).contains(&size) {
        bail!("--size must be between 1M and 64G");
    }
    let mut tmp = None;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.insert(TempDir::new()?).0.clone(),
    };
    let disk = dir.join("sample.img");
    let store = dir.join("datastore");
    eprintln!("ferry demo in {}", dir.display());
    let t = Instant::now();
    // The benchmark harness's synthetic disk: seeded 1 MiB regions, issue 3's mix.
    ferry_bench::synth::generate(&ferry_bench::synth::SynthSpec::standard(size, 42), &disk)?;
    eprintln!(
        "made a {} sample disk (zero, text, incompressible and file-system-like regions) in {:.1} s",
        human_bytes(size),
        t.elapsed().as_secs_f64()
    );

    // The real server code on loopback TCP, with TLS (its own identity, pinned by the
    // source) and token authentication, as `ferry serve` and `ferry replicate` run them.
    let ds = Datastore::open_or_create(&store)?;
    let token = dir.join("token");
    let _ = std::fs::remove_file(&token);
    ferry_replicate::auth::write_new_token(&token)?;
    let access = AccessList::single_admin("demo", &ferry_replicate::auth::TokenAuth::from_file(&token)?);
    let identity = ServerIdentity::load_or_create(&store.join(ferry_replicate::tls::DEFAULT_TLS_DIR))?;
    let transport = ServerTransport::Tls(identity.server_config()?);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    {
        let (access, ds) = (Arc::new(Access::fixed(access)), ds.clone());
        // The library's accept loop, as `ferry serve` runs it; it ends with the process.
        std::thread::spawn(move || {
            ferry_replicate::target::serve(
                listener,
                ds,
                access,
                transport,
                ServeConfig::default(),
                Arc::new(QuietServer),
            )
        });
    }
    eprintln!("serving the datastore on {addr} over TLS 1.3, certificate fingerprint {}", identity.fingerprint());
    let target = Target {
        spec: TargetSpec::Remote(addr.clone()),
        token: Some(token.clone()),
        trust: ClientTrust { fingerprint: Some(identity.fingerprint()), ..ClientTrust::default() },
        serve: ServeConfig::default(),
    };

    let full = run_once(&target, &disk, "full replication over TCP and TLS")?;
    let out = dir.join("export.img");
    // The demo exports twice to its own file.
    let force = ferry_datastore::points::ExportOptions { force: true };
    ferry_datastore::points::export_point(&ds, "demo", "sample", None, &out, force)?;
    if !ferry_bench::mutate::files_identical(&disk, &out)? {
        bail!("the replica differs from the source disk: this is a bug, please report it");
    }
    eprintln!("verified: the replica is byte-identical to the source");

    let changed = change_one_percent(&disk, size)?;
    eprintln!("changed {changed} blocks of 64 KiB (1%) in the source");
    let incr = run_once(&target, &disk, "incremental replication (digest comparison)")?;
    ferry_datastore::points::export_point(&ds, "demo", "sample", None, &out, force)?;
    if !ferry_bench::mutate::files_identical(&disk, &out)? {
        bail!("the replica differs from the source disk after the incremental run: this is a bug, please report it");
    }
    eprintln!("verified: the replica is byte-identical again");

    print_table(size, &full, &incr);
    if a.keep {
        if let Some(t) = tmp.take() {
            std::mem::forget(t);
        }
        eprintln!("kept {}", dir.display());
    } else if a.dir.is_some() {
        let _ = std::fs::remove_file(&disk);
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(&token);
        let _ = std::fs::remove_dir_all(&store);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(size: u64, full: &JobReport, incr: &JobReport) {
    let row = |name: &str, r: &JobReport| {
        let t = totals(&r.disks);
        let rate = size as f64 / r.duration_s.max(1e-9) / f64::from(1u32 << 30);
        let ratio = if t.bytes_compressed_out > 0 {
            format!("{:.2}", t.bytes_compressed_in as f64 / t.bytes_compressed_out as f64)
        } else {
            "-".into()
        };
        println!(
            "| {name:<11} | {:>7.2} s | {rate:>6.2} GiB/s | {:>10} | {:>10} | {:>10} | {:>10} | {ratio:>5} | {:>10} |",
            r.duration_s,
            human_bytes(t.bytes_read),
            human_bytes(t.bytes_zero),
            human_bytes(t.bytes_unchanged),
            human_bytes(t.bytes_compressed_in),
            human_bytes(t.bytes_sent),
        );
    };
    println!();
    println!("| run         |      time |   disk rate |       read |       zero |  unchanged | compressed | ratio |       sent |");
    println!("|-------------|-----------|-------------|------------|------------|------------|------------|-------|------------|");
    row("full", full);
    row("incremental", incr);
    println!();
    println!("time per stage, full run (busy seconds summed over threads; p50 / p99 latency):");
    for s in &full.stages {
        println!(
            "  {:<9} {:>7.2} s   p50 {:>6} us   p99 {:>7} us   ({} ops)",
            s.stage, s.busy_s, s.p50_us, s.p99_us, s.count
        );
    }
    println!("io backend: {}, chunk size {} KiB", full.backend, full.chunk_size / 1024);
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let base = std::env::temp_dir();
        for i in 0..100u32 {
            let p = base.join(format!("ferry-demo-{}-{i}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                return Ok(TempDir(p));
            }
        }
        bail!("cannot create a directory in {}", base.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The demo's server reports nothing: the demo prints its own figures.
struct QuietServer;

impl ferry_replicate::target::ServeObserver for QuietServer {
    fn session_done(&self, _report: &ferry_replicate::target::SessionReport) {}
    fn accept_failed(&self, _error: &std::io::Error) {}
}
