//! A shaped WAN link between two network namespaces (root only).
//!
//! `src` and `dst` namespaces are joined by a veth pair (10.77.0.1 <-> 10.77.0.2),
//! each end shaped with `tc qdisc add dev X root tbf rate RATE burst 256kb
//! latency 50ms`. The delay is added by a userspace proxy (see proxy.rs) that
//! lives in `src` and forwards to the receiver in `dst`. Dropping the `Wan`
//! removes both namespaces (and with them the veth pair), also on error or panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Address of the receiver side inside the `dst` namespace.
pub const DST_ADDR: &str = "10.77.0.2";

/// Two namespaces joined by a shaped veth pair; removed on drop.
#[derive(Debug)]
pub struct Wan {
    /// Namespace of the sender side.
    pub src: String,
    /// Namespace of the receiver side.
    pub dst: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Why the WAN scenario cannot run here, if it cannot.
pub fn unavailable_reason() -> Option<String> {
    if Command::new("nsenter").arg("--version").output().is_err() {
        return Some("`nsenter` (util-linux) is not installed".into());
    }
    if ferry_io::process::effective_uid() != 0 {
        return Some("not root: network namespaces and tc need root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`ip netns list` failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("`ip` not runnable: {e}")),
    }
}

impl Wan {
    /// Creates the namespaces, the veth pair and the shaping.
    pub fn create(rate: &str) -> Result<Wan> {
        Self::remove_stale();
        let pid = std::process::id();
        let wan = Wan { src: format!("fbench-s-{pid}"), dst: format!("fbench-d-{pid}") };
        // A guard exists from here on: a failure below still removes what was made.
        let (vs, vd) = (format!("fbs{pid}"), format!("fbd{pid}"));
        ip(&["netns", "add", &wan.src])?;
        ip(&["netns", "add", &wan.dst])?;
        ip(&["link", "add", &vs, "type", "veth", "peer", "name", &vd])?;
        ip(&["link", "set", &vs, "netns", &wan.src])?;
        ip(&["link", "set", &vd, "netns", &wan.dst])?;
        for (ns, dev, addr) in [(&wan.src, &vs, "10.77.0.1/24"), (&wan.dst, &vd, "10.77.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate])
                .args(["burst", "256kb", "latency", "50ms"])
                .output()?;
            if !out.status.success() {
                bail!("tc tbf on {dev} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(wan)
    }

    /// Path of a namespace for setns().
    pub fn path(ns: &str) -> PathBuf {
        PathBuf::from("/var/run/netns").join(ns)
    }

    /// Prefix that runs a shell command inside a namespace. nsenter execs the
    /// command in place (`ip netns exec` forks and would hide it from wait4).
    pub fn exec_prefix(ns: &str) -> String {
        format!("nsenter --net={} ", Self::path(ns).display())
    }

    /// Removes namespaces left by runs that were killed (their pid is gone).
    pub fn remove_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let pid = name.strip_prefix("fbench-s-").or_else(|| name.strip_prefix("fbench-d-"));
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("ip").args(["netns", "del", name]).output();
                }
            }
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
