//! The `thin` scenario (issue 20): thin disks of 64 GiB, 256 GiB, 2 TiB and
//! 15 TiB (the largest file ext4 allows is just under 16 TiB), each holding the
//! same 40 MiB of data in 5 extents. Per size, three runs in a row into one
//! replica: full, an unchanged digest run, and a CBT run with 1 MiB changed;
//! once into a local datastore (source and target in one process) and once
//! through `ferry serve` (TLS, a server started per run so that its peak RSS is
//! that run's). Each row: wall time, peak RSS of each process, bytes read
//! (source), sent (wire) and allocated in the replica image afterwards.
//!
//! ferry's cost must follow the data, not the disk's size: the goal is at most
//! 2 s per run at 2 TiB, at most 4x the 64 GiB figure at 15 TiB, and at most
//! 200 MiB of RSS per process. The images are sparse (40 MiB each on disk).
//! Not in `--quick`: it takes about a minute. Written to `thin.md` and
//! `thin.json` in the output directory.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::ferry::{ferry_serve_cmd, Transport};
use super::harness::tail;
use super::Env;
use crate::measure::{free_port, sh_quote, shq, wait_listening, Tree};
use crate::rng::Rng;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The sizes measured.
const SIZES: [u64; 4] = [64 * GIB, 256 * GIB, 2048 * GIB, 15 * 1024 * GIB];
/// 40 MiB of data: 5 extents of 8 MiB spread over the disk.
const EXTENTS: u64 = 5;
const EXTENT_LEN: u64 = 8 * MIB;

/// One measured run of the scenario.
#[derive(Debug, Serialize)]
pub(super) struct ThinRow {
    pub(super) size: u64,
    pub(super) chunk_size: u64,
    /// `local` or `serve`.
    pub(super) via: &'static str,
    /// `full`, `digest` or `cbt`.
    pub(super) run: &'static str,
    pub(super) wall_s: f64,
    /// Peak RSS of the `ferry replicate` process (local: source and target in one).
    pub(super) source_rss: u64,
    /// Peak RSS of `ferry serve` (0 for a local run).
    pub(super) server_rss: u64,
    pub(super) bytes_read: u64,
    pub(super) bytes_sent: u64,
    /// Allocated bytes of the replica's image after the run.
    pub(super) image_allocated: u64,
    pub(super) ok: bool,
    pub(super) error: Option<String>,
}

/// Offsets of the data extents of a thin disk of `size` bytes.
fn extent_offsets(size: u64) -> Vec<u64> {
    (0..EXTENTS).map(|i| (size / EXTENTS * i + 3 * MIB) / MIB * MIB).collect()
}

/// A sparse image of `size` bytes with 40 MiB of random data.
fn make_image(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size).with_context(|| format!("sizing {} to {size} bytes", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; EXTENT_LEN as usize];
    for off in extent_offsets(size) {
        rng.fill(&mut buf);
        f.write_all_at(&buf, off)?;
    }
    Ok(())
}

/// Change 1 MiB inside the second extent; the CBT list that says so.
fn change_one_mib(img: &Path, cbt: &Path, size: u64, seed: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(img)?;
    let off = extent_offsets(size)[1] + 2 * MIB;
    let mut buf = vec![0u8; MIB as usize];
    Rng::new(seed).fill(&mut buf);
    f.write_all_at(&buf, off)?;
    std::fs::write(cbt, format!("[{{\"offset\": {off}, \"length\": {MIB}}}]"))?;
    Ok(())
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

/// Runs the scenario in `work` (removed piece by piece as it goes); the rows.
pub(super) fn run_thin(env: &Env, work: &Path, seed: u64) -> Result<Vec<ThinRow>> {
    let mut rows = Vec::new();
    for &size in &SIZES {
        for via in ["local", "serve"] {
            let dir = work.join(format!("thin-{}g-{via}", size / GIB));
            std::fs::create_dir_all(&dir)?;
            let img = dir.join("disk.img");
            make_image(&img, size, seed)?;
            let ds = dir.join("ds");
            let cbt = dir.join("cbt.json");
            for run in ["full", "digest", "cbt"] {
                if run == "cbt" {
                    change_one_mib(&img, &cbt, size, seed + 1)?;
                }
                let row = measure(env, &dir, &img, &ds, size, via, run, &cbt)
                    .unwrap_or_else(|e| failed(size, via, run, format!("{e:#}")));
                eprintln!(
                    "ferry-bench: thin {} GiB {via} {run}: {:.2} s, rss {} / {} MiB{}",
                    size / GIB,
                    row.wall_s,
                    row.source_rss / MIB,
                    row.server_rss / MIB,
                    row.error.as_deref().map(|e| format!(", FAILED: {e}")).unwrap_or_default()
                );
                rows.push(row);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(rows)
}

fn failed(size: u64, via: &'static str, run: &'static str, error: String) -> ThinRow {
    ThinRow {
        size,
        chunk_size: 0,
        via,
        run,
        wall_s: 0.0,
        source_rss: 0,
        server_rss: 0,
        bytes_read: 0,
        bytes_sent: 0,
        image_allocated: 0,
        ok: false,
        error: Some(error),
    }
}

#[allow(clippy::too_many_arguments)]
fn measure(
    env: &Env,
    dir: &Path,
    img: &Path,
    ds: &Path,
    size: u64,
    via: &'static str,
    run: &'static str,
    cbt: &Path,
) -> Result<ThinRow> {
    let out = dir.join(format!("{run}.out"));
    let err = dir.join(format!("{run}.err"));
    let mut cmd = format!(
        "exec {} replicate --source {} --replica thin --json --retry-for 0 --map-cache {}",
        shq(&env.ferry),
        sh_quote(&format!("d={}", img.display())),
        shq(&dir.join("map-cache"))
    );
    if run == "cbt" {
        cmd += &format!(" --cbt {}", sh_quote(&format!("d={}", cbt.display())));
    }
    let server = if via == "serve" {
        std::fs::create_dir_all(ds)?;
        let port = free_port()?;
        let serve_err = dir.join(format!("{run}.serve.err"));
        let rx = Tree::spawn(&ferry_serve_cmd(env, "127.0.0.1", port, ds, Transport::Tls), None, &serve_err)?;
        wait_listening(rx.pid(), &[port], Duration::from_secs(20))
            .with_context(|| format!("ferry serve: {}", tail(&serve_err)))?;
        let fp = env.tls.as_ref().map(|(_, fp)| format!(" --fingerprint {fp}")).unwrap_or_default();
        cmd += &format!(" --target ferry://127.0.0.1:{port} --token-file {}{fp}", shq(&env.token));
        Some(rx)
    } else {
        cmd += &format!(" --target {}", shq(ds));
        None
    };
    let tx = Tree::spawn(&cmd, Some(&out), &err)?;
    let (st, wall, usage) = tx.wait()?;
    let server_rss = match server {
        Some(rx) => rx.stop(Duration::from_secs(10))?.1.max_rss_bytes,
        None => 0,
    };
    let summary = std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "summary");
    let Some(s) = summary.filter(|_| st.success()) else {
        bail!("ferry replicate {run} failed ({st}): {}", tail(&err));
    };
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    Ok(ThinRow {
        size,
        chunk_size: n(&s["chunk_size"]),
        via,
        run,
        wall_s: wall.as_secs_f64(),
        source_rss: usage.max_rss_bytes,
        server_rss,
        bytes_read: n(&s["totals"]["bytes_read"]),
        bytes_sent: n(&s["wire_bytes"]),
        image_allocated: allocated(&ds.join("thin").join("disks").join("d.img")),
        ok: s["status"] == "ok",
        error: None,
    })
}

/// The rows as a markdown table.
pub(super) fn table(rows: &[ThinRow]) -> String {
    let mut t = String::from(
        "| size | chunk | via | run | wall s | RSS replicate MiB | RSS serve MiB | read MiB | sent MiB | image alloc MiB | ok |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mib = |b: u64| format!("{:.1}", b as f64 / MIB as f64);
    for r in rows {
        t += &format!(
            "| {} GiB | {} KiB | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} |\n",
            r.size / GIB,
            r.chunk_size / 1024,
            r.via,
            r.run,
            r.wall_s,
            mib(r.source_rss),
            if r.via == "serve" { mib(r.server_rss) } else { "-".into() },
            mib(r.bytes_read),
            mib(r.bytes_sent),
            mib(r.image_allocated),
            if r.ok { "yes".to_string() } else { format!("no: {}", r.error.as_deref().unwrap_or("")) }
        );
    }
    t
}
