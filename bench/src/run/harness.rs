//! One measured run: the same starting state for every tool (page cache
//! dropped or warmed, disk settled), the measured command(s) with their
//! process trees, wire bytes and block-device reads, and the byte-for-byte
//! check of the result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{in_ns, Env, Net};
use crate::measure::{reserved_port, wait_listening, Tree, TreeUsage};
use crate::mutate;
use crate::proxy::Proxy;
use crate::report::{self, Run};

/// Outcome of one measured command set.
pub(super) struct Measured {
    pub(super) wall_s: f64,
    pub(super) usage: TreeUsage,
    /// CPU seconds (user + system) of the sender's and of the receiver's process tree.
    pub(super) sides: Option<(f64, f64)>,
    pub(super) wire: Option<u64>,
    /// Bytes read from block devices meanwhile.
    pub(super) dev_read: Option<u64>,
    pub(super) ok: bool,
    pub(super) error: Option<String>,
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

pub(super) fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().rev().take(4).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Largest RSS floor seen before any run (see `measure::rss_floor`).
pub(super) static RSS_FLOOR: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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

pub(super) fn run_quiet(script: &str) -> Result<()> {
    let out = Command::new("sh").arg("-c").arg(script).output().with_context(|| format!("running {script}"))?;
    if !out.status.success() {
        bail!("`{script}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs a networked tool: receiver(back ports) listening behind counting proxies, sender(front ports).
#[allow(clippy::too_many_arguments)]
pub(super) fn measure_net(
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
        let listen: SocketAddr = format!("{}:0", net.front_host).parse()?;
        proxies.push(Proxy::start(listen, up, net.proxy_ns.clone())?);
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
    let sides = Some((tx_usage.user_s + tx_usage.sys_s, rx_usage.user_s + rx_usage.sys_s));
    Ok(Measured {
        wall_s: wall.as_secs_f64(),
        sides,
        usage: tx_usage.combine(rx_usage),
        wire: Some(wire),
        dev_read,
        ok,
        error,
    })
}

pub(super) fn measure_local(env: &Env, dir: &Path, sources: &[(String, PathBuf)], script: &str) -> Result<Measured> {
    prepare_run(env, dir, sources)?;
    let read0 = dev_read_bytes();
    let t = Tree::spawn(script, Some(&dir.join("sender.out")), &dir.join("sender.err"))?;
    let (st, wall, usage) = t.wait()?;
    let dev_read = dev_read_since(read0);
    let error = (!st.success()).then(|| format!("{st}: {}", tail(&dir.join("sender.err"))));
    Ok(Measured { wall_s: wall.as_secs_f64(), usage, sides: None, wire: None, dev_read, ok: st.success(), error })
}

pub(super) fn base_run(m: &Measured) -> Run {
    Run {
        wall_s: report::round6(m.wall_s),
        cpu_user_s: report::round6(m.usage.user_s),
        cpu_sys_s: report::round6(m.usage.sys_s),
        cpu_sender_s: m.sides.map(|s| report::round6(s.0)),
        cpu_receiver_s: m.sides.map(|s| report::round6(s.1)),
        peak_rss_bytes: m.usage.max_rss_bytes,
        wire_bytes: m.wire,
        dev_read_bytes: m.dev_read,
        ok: m.ok,
        identical: false,
        error: m.error.clone(),
        ferry_status: None,
        ferry_totals: None,
        stages: None,
        line_pps: None,
        line_drops: None,
        link_bps: None,
    }
}

pub(super) fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

pub(super) fn check_outputs(run: &mut Run, pairs: &[(PathBuf, PathBuf)]) -> Result<()> {
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

pub(super) fn failed_run(error: String) -> Run {
    Run {
        wall_s: 0.0,
        cpu_user_s: 0.0,
        cpu_sys_s: 0.0,
        cpu_sender_s: None,
        cpu_receiver_s: None,
        peak_rss_bytes: 0,
        wire_bytes: None,
        dev_read_bytes: None,
        ok: false,
        identical: false,
        error: Some(error),
        ferry_status: None,
        ferry_totals: None,
        stages: None,
        line_pps: None,
        line_drops: None,
        link_bps: None,
    }
}
