//! The peers ferry is measured against: rsync (daemon), zstd -1 | nc, zstd -3 | nc
//! (`zstd3-nc`), nc, qemu-img, cp and nbdcopy, and on the WAN `iperf3 -P 8` (the
//! link's capacity, no image), their command lines, and which of them this
//! machine lacks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use super::harness::{base_run, check_outputs, file_name, measure_local, measure_net, run_quiet};
use super::scenarios::Scenario;
use super::{Env, Net};
use crate::measure::shq;
use crate::report::Run;

/// The shell command lines of a peer, for the record.
pub(super) fn run_peer(
    env: &Env,
    net: &Net,
    sc: &Scenario,
    tool: &str,
    dir: &Path,
) -> Result<(Run, String, Option<String>)> {
    let host = net.host.to_string();
    let front = net.front_host.to_string();
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
            let snd = |f: &[u16]| format!("rsync -I {flags} {} rsync://{front}:{}/m/", files.join(" "), f[0]);
            let m = measure_net(env, net, dir, &sc.sources, 1, true, &rcv, &snd, None)?;
            (m, snd(&[0]), Some(rcv(&[0])))
        }
        "zstd-nc" | "zstd3-nc" | "nc" => {
            let z = tool != "nc";
            let level = if tool == "zstd3-nc" { 3 } else { 1 };
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
                            format!("zstd -{level} -T2 -q -c {} | nc -N {front} {p}", shq(s))
                        } else {
                            format!("nc -N {front} {p} < {}", shq(s))
                        }
                    })
                    .collect();
                parallel(&parts)
            };
            let m = measure_net(env, net, dir, &sc.sources, n, false, &rcv, &snd, None)?;
            (m, snd(&vec![0; n]), Some(rcv(&vec![0; n])))
        }
        "iperf3" => {
            // The link's capacity: eight TCP streams for a fixed time, through the same
            // counting proxy. The server serves one test and exits (-1).
            let secs = env.iperf_secs;
            let rcv = |b: &[u16]| format!("exec iperf3 -s -1 -B {host} -p {}", b[0]);
            let snd = |f: &[u16]| format!("exec iperf3 -c {front} -p {} -P 8 -t {secs} -J", f[0]);
            let m = measure_net(env, net, dir, &sc.sources, 1, false, &rcv, &snd, None)?;
            let mut run = base_run(&m);
            let out = std::fs::read_to_string(dir.join("sender.out")).unwrap_or_default();
            let bps = serde_json::from_str::<serde_json::Value>(&out)
                .ok()
                .and_then(|v| v.pointer("/end/sum_received/bits_per_second").and_then(|x| x.as_f64()));
            run.link_bps = bps;
            // Nothing to compare: "identical" means it ran and reported a rate.
            run.identical = run.ok && bps.is_some_and(|b| b > 0.0);
            if run.ok && bps.is_none() {
                run.error = Some("iperf3 -J printed no end.sum_received.bits_per_second".into());
            }
            return Ok((run, snd(&[0]), Some(rcv(&[0]))));
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

pub(super) fn missing_tools() -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    let need = |bin: &str| (!probe(&format!("command -v {bin}"))).then(|| format!("`{bin}` is not installed"));
    for (tool, bins) in [
        ("rsync", &["rsync"][..]),
        ("zstd-nc", &["zstd", "nc"][..]),
        ("zstd3-nc", &["zstd", "nc"][..]),
        ("iperf3", &["iperf3"][..]),
        ("nc", &["nc"][..]),
        ("qemu-img", &["qemu-img"][..]),
        ("cp", &["cp"][..]),
        ("nbdcopy", &["nbdcopy"][..]),
    ] {
        if let Some(reason) = bins.iter().find_map(|b| need(b)) {
            m.insert(tool, format!("{reason} (Debian: rsync, zstd, netcat-openbsd, qemu-utils, libnbd-bin, iperf3)"));
        }
    }
    if !m.contains_key("nc") && !probe("nc -h 2>&1 | grep -q OpenBSD") {
        for t in ["nc", "zstd-nc", "zstd3-nc"] {
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
