//! ferry's runs: its command lines, an untimed datastore set up with the
//! target's previous state, the measured replication through the proxy, its
//! JSON events (status, totals, stage latencies), and the check of the
//! exported disks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::harness::{base_run, measure_net, tail};
use super::scenarios::{copy_sparse, Kind, Scenario};
use super::{Env, Net};
use crate::measure::{free_port, sh_quote, shq, wait_listening, Tree};
use crate::mutate;
use crate::report::{Run, StageLatency};

/// How a ferry run's session travels: TLS (ferry's default) or `--insecure-plaintext`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transport {
    Tls,
    Plaintext,
}

/// The flags of `replicate` for `transport`: the bench server's pin, or plaintext. None for
/// a ferry binary without TLS.
fn transport_flags(env: &Env, transport: Transport) -> String {
    match (&env.tls, transport) {
        (None, _) => String::new(),
        (Some(_), Transport::Plaintext) => " --insecure-plaintext".into(),
        (Some((_, fp)), Transport::Tls) => format!(" --fingerprint {fp}"),
    }
}

pub(super) fn ferry_replicate_cmd(
    env: &Env,
    sc: &Scenario,
    host: &str,
    port: u16,
    mode: &str,
    with_cbt: bool,
    transport: Transport,
) -> String {
    let mut c = format!("exec {} replicate", shq(&env.ferry));
    for (name, p) in &sc.sources {
        c += &format!(" --source {}", sh_quote(&format!("{name}={}", p.display())));
    }
    c += &format!(" --target ferry://{host}:{port} --replica bench --token-file {}", shq(&env.token));
    c += &transport_flags(env, transport);
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
    if let Some(x) = &env.streams {
        c += &format!(" --streams {}", sh_quote(x));
    }
    if env.map_cache_flag {
        // Deterministic and conservative: every digest-mode run downloads the target's digest
        // map (a scheduled job's next run would find it in its cache), and nothing is written
        // to the caller's ~/.cache.
        c += " --no-map-cache";
    }
    c + " --json"
}

pub(super) fn ferry_serve_cmd(env: &Env, host: &str, port: u16, ds: &Path, transport: Transport) -> String {
    let tls = match (&env.tls, transport) {
        (None, _) => String::new(),
        (Some(_), Transport::Plaintext) => " --insecure-plaintext".into(),
        // One identity for every run, made once (`tls_identity`), so the sources can pin it.
        (Some((dir, _)), Transport::Tls) => format!(" --tls-dir {}", shq(dir)),
    };
    format!(
        "exec {} serve --listen {host}:{port} --datastore {} --token-file {}{tls} --json",
        shq(&env.ferry),
        shq(ds),
        shq(&env.token)
    )
}

/// Makes the bench server's TLS identity in `dir` (a `ferry serve` started once, untimed)
/// and returns its fingerprint; None for a ferry binary without TLS.
pub(super) fn tls_identity(ferry: &Path, token: &Path, work: &Path) -> Result<Option<(PathBuf, String)>> {
    let help = Command::new(ferry).args(["serve", "--help"]).output().context("running ferry serve --help")?;
    if !String::from_utf8_lossy(&help.stdout).contains("--tls-dir") {
        return Ok(None);
    }
    let dir = work.join("tls");
    let ds = work.join("tls-init-ds");
    let port = free_port()?;
    let err = work.join("tls-init.err");
    let cmd = format!(
        "exec {} serve --listen 127.0.0.1:{port} --datastore {} --token-file {} --tls-dir {}",
        shq(ferry),
        shq(&ds),
        shq(token),
        shq(&dir)
    );
    let rx = Tree::spawn(&cmd, None, &err)?;
    wait_listening(rx.pid(), &[port], Duration::from_secs(20))
        .with_context(|| format!("ferry serve making the TLS identity: {}", tail(&err)))?;
    rx.stop(Duration::from_secs(10))?;
    let _ = std::fs::remove_dir_all(&ds);
    let o = Command::new(ferry).args(["fingerprint", "--tls-dir"]).arg(&dir).output()?;
    if !o.status.success() {
        bail!("ferry fingerprint failed: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(Some((dir, String::from_utf8_lossy(&o.stdout).trim().to_string())))
}

/// Has `ferry serve` create an empty datastore in `ds` (untimed).
fn ferry_init_datastore(env: &Env, dir: &Path, ds: &Path) -> Result<()> {
    let port = free_port()?;
    let err = dir.join("init.err");
    let rx = Tree::spawn(&ferry_serve_cmd(env, "127.0.0.1", port, ds, Transport::Tls), None, &err)?;
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
        link: None,
    };
    let port = free_port()?;
    let setup = dir.join("setup");
    std::fs::create_dir_all(&setup)?;
    let rx = Tree::spawn(&ferry_serve_cmd(env, "127.0.0.1", port, ds, Transport::Tls), None, &setup.join("serve.err"))?;
    wait_listening(rx.pid(), &[port], Duration::from_secs(20))
        .with_context(|| format!("ferry serve for setup: {}", tail(&setup.join("serve.err"))))?;
    let cmd = ferry_replicate_cmd(env, &prev, "127.0.0.1", port, "full", false, Transport::Tls);
    let tx = Tree::spawn(&cmd, None, &setup.join("rep.err"))?;
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

pub(super) fn run_ferry(env: &Env, net: &Net, sc: &Scenario, dir: &Path, transport: Transport) -> Result<Run> {
    let ds = dir.join("datastore");
    std::fs::create_dir_all(&ds)?;
    let mode = match sc.kind {
        Kind::Full | Kind::Multi | Kind::Wan | Kind::Transport => "full",
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
    let (host, front) = (net.host.to_string(), net.front_host.to_string());
    let session_done =
        || std::fs::read_to_string(dir.join("receiver.out")).is_ok_and(|s| s.contains("\"session_done\""));
    let m = measure_net(
        env,
        net,
        dir,
        &sc.sources,
        1,
        true,
        &|b| ferry_serve_cmd(env, &host, b[0], &ds, transport),
        &|f| ferry_replicate_cmd(env, sc, &front, f[0], mode, sc.kind == Kind::Cbt, transport),
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
        // The levels compression used and the bytes at each ride along with the totals.
        if let Some(serde_json::Value::Object(t)) = &mut run.ferry_totals {
            for key in ["levels", "compress_stream", "streams"] {
                if let Some(v) = s.get(key) {
                    t.insert(key.into(), v.clone());
                }
            }
        }
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
                .args(["--replica", "bench", "--disk", name, "--force", "--out"])
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

pub(super) fn ferry_path(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    if exe.file_name().is_some_and(|n| n == "ferry") {
        return Ok(exe);
    }
    Ok(exe.with_file_name("ferry"))
}
