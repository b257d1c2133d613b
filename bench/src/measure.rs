//! Running a command and measuring its whole process tree.
//!
//! Every measured command runs as `sh -c SCRIPT` in a child process. When it
//! ends, `wait4` returns the child's resource usage, which includes every
//! descendant that was waited for (a shell waits for every stage of its
//! pipelines): user and system CPU time summed over the tree, and the peak
//! resident set size of the largest single process of the tree.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_io::process::{self, Signal};

/// Resource usage of one finished process tree.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TreeUsage {
    /// User CPU seconds.
    pub user_s: f64,
    /// System CPU seconds.
    pub sys_s: f64,
    /// Largest resident set of any one process in the tree, bytes.
    pub max_rss_bytes: u64,
}

impl TreeUsage {
    /// Sums CPU and keeps the larger peak RSS.
    pub fn combine(self, o: TreeUsage) -> TreeUsage {
        TreeUsage {
            user_s: self.user_s + o.user_s,
            sys_s: self.sys_s + o.sys_s,
            max_rss_bytes: self.max_rss_bytes.max(o.max_rss_bytes),
        }
    }
}

/// A running `sh -c` process tree.
#[derive(Debug)]
pub struct Tree {
    child: Child,
    started: Instant,
    reaped: bool,
}

/// Quotes a string for `sh`.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Quotes a path for `sh`.
pub fn shq(p: &Path) -> String {
    sh_quote(&p.to_string_lossy())
}

impl Tree {
    /// Starts `sh -c script`, stdout to `stdout_to` (or discarded) and stderr to `stderr_to`.
    pub fn spawn(script: &str, stdout_to: Option<&Path>, stderr_to: &Path) -> Result<Tree> {
        let out = match stdout_to {
            Some(p) => Stdio::from(File::create(p).with_context(|| format!("creating {}", p.display()))?),
            None => Stdio::null(),
        };
        let err = File::create(stderr_to).with_context(|| format!("creating {}", stderr_to.display()))?;
        let started = Instant::now();
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::from(err))
            // Its own process group, so that stopping the tree reaches every process in it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting sh -c {script:?}"))?;
        Ok(Tree { child, started, reaped: false })
    }

    /// Process id of the `sh`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the tree's top process has not exited (does not reap it).
    pub fn is_running(&self) -> bool {
        process::child_is_running(self.pid()).unwrap_or(false)
    }

    /// Sends a signal to every process of the tree (its process group).
    pub fn signal(&self, sig: Signal) {
        if !self.reaped {
            // The group id cannot have been recycled while its leader, our child, is unreaped.
            let _ = process::signal_group(self.pid(), sig);
        }
    }

    /// Waits for the tree; returns its exit status, wall time since spawn and usage.
    pub fn wait(mut self) -> Result<(ExitStatus, Duration, TreeUsage)> {
        self.wait_inner()
    }

    fn wait_inner(&mut self) -> Result<(ExitStatus, Duration, TreeUsage)> {
        let (status, ru) = process::wait_with_usage(self.pid()).context("waiting for a measured process")?;
        let wall = self.started.elapsed();
        self.reaped = true;
        let usage = TreeUsage {
            user_s: ru.user.as_secs_f64(),
            sys_s: ru.system.as_secs_f64(),
            max_rss_bytes: ru.max_rss_bytes,
        };
        Ok((status, wall, usage))
    }

    /// Number of processes in the tree's process group (zombies included).
    pub fn group_size(&self) -> usize {
        group_pids(self.pid()).len()
    }

    /// Stops a daemon: SIGTERM to its top process (so it can reap its own
    /// children and their usage is counted), SIGKILL after `grace`, then SIGKILL
    /// to whatever is left in the group; returns its usage.
    pub fn stop(mut self, grace: Duration) -> Result<(ExitStatus, TreeUsage)> {
        // Our own unreaped child: its pid cannot have been recycled.
        let _ = process::signal_process(self.pid(), Signal::Term);
        let deadline = Instant::now() + grace;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.is_running() {
            let _ = process::signal_process(self.pid(), Signal::Kill);
        }
        // The leader is not reaped yet, so the group id still names our group.
        self.signal(Signal::Kill);
        let (st, _, u) = self.wait_inner()?;
        Ok((st, u))
    }
}

/// The peak RSS every measured tree starts with: Linux keeps `ru_maxrss` across
/// execve, so a child starts from this harness's resident size at the time it
/// was spawned. Measured by spawning `true`.
pub fn rss_floor(scratch: &Path) -> u64 {
    let err = scratch.join(format!("ferry-bench-rss-floor-{}.err", std::process::id()));
    let floor = Tree::spawn("true", None, &err).and_then(|t| t.wait()).map_or(0, |(_, _, u)| u.max_rss_bytes);
    let _ = std::fs::remove_file(err);
    floor
}

impl Drop for Tree {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(Signal::Kill);
            let _ = self.wait_inner();
        }
    }
}

/// Processes of process group `pgid` (read from /proc/*/stat).
pub fn group_pids(pgid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return vec![pgid] };
    let mut v: Vec<u32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces): state ppid pgrp ...
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
        })
        .collect();
    if v.is_empty() {
        v.push(pgid);
    }
    v
}

/// Waits until every port in `ports` is in LISTEN state in the network
/// namespace of some process of the tree led by `pid`, on a socket that a
/// process of the tree holds (read from /proc/PID/net/tcp{,6} and
/// /proc/PID/fd, so nothing connects to a one-shot listener such as `nc -l`;
/// `ip netns exec` forks, so the whole process group is looked at). A port
/// someone else listens on does not count: the receiver may have failed to
/// bind it.
pub fn wait_listening(pid: u32, ports: &[u16], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = group_pids(pid);
        let mut text = String::new();
        for p in &pids {
            for f in ["tcp", "tcp6"] {
                text.push_str(&std::fs::read_to_string(format!("/proc/{p}/net/{f}")).unwrap_or_default());
            }
        }
        let held = socket_inodes(&pids);
        let listening = listening_ports(&text, &held);
        if ports.iter().all(|p| listening.contains(p)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("receiver (pid {pid}) did not listen on ports {ports:?} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Inodes of the sockets the processes `pids` hold open (/proc/PID/fd links `socket:[N]`).
fn socket_inodes(pids: &[u32]) -> std::collections::HashSet<u64> {
    let mut v = std::collections::HashSet::new();
    for p in pids {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/fd")) else { continue };
        for e in rd.flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else { continue };
            let link = link.to_string_lossy();
            if let Some(n) = link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                v.extend(n.parse::<u64>().ok());
            }
        }
    }
    v
}

/// Ports in LISTEN state (st 0A) in /proc/net/tcp{,6} `text` whose socket inode is in `held`.
fn listening_ports(text: &str, held: &std::collections::HashSet<u64>) -> Vec<u16> {
    text.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.get(3) != Some(&"0A") || !held.contains(&cols.get(9)?.parse::<u64>().ok()?) {
                return None;
            }
            let port = cols.get(1)?.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> Result<u16> {
    Ok(reserved_port()?.1)
}

/// A TCP port on 127.0.0.1 held by the returned listener until it is dropped.
pub fn reserved_port() -> Result<(std::net::TcpListener, u16)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_covers_the_whole_pipeline() {
        let dir = crate::scratch::ScratchDir::new("measure-test").unwrap();
        let t = Tree::spawn("head -c 50000000 /dev/zero | sha256sum >/dev/null", None, &dir.path().join("e")).unwrap();
        let (st, wall, u) = t.wait().unwrap();
        assert!(st.success());
        assert!(wall.as_secs_f64() > 0.0);
        assert!(u.user_s + u.sys_s > 0.0 && u.max_rss_bytes > 0);
        assert_eq!(sh_quote("a b'c"), r"'a b'\''c'");
        assert_eq!(sh_quote("/x/y.img"), "/x/y.img");
    }

    #[test]
    fn only_a_port_the_tree_listens_on_counts() {
        let dir = crate::scratch::ScratchDir::new("listen-test").unwrap();
        // This process listens on `ours`; the tree is a shell that listens on nothing.
        let ours = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = ours.local_addr().unwrap().port();
        let t = Tree::spawn("exec sleep 30", None, &dir.path().join("e")).unwrap();
        let e = wait_listening(t.pid(), &[port], Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.to_string(), format!("receiver (pid {}) did not listen on ports [{port}] within 300ms", t.pid()));
        t.signal(Signal::Kill);
        let _ = t.wait();
        // A tree that does listen: nc, as the bench's nc receivers run it.
        drop(ours);
        let t =
            Tree::spawn(&format!("exec nc -d -l 127.0.0.1 {port} > /dev/null"), None, &dir.path().join("e2")).unwrap();
        wait_listening(t.pid(), &[port], Duration::from_secs(10)).unwrap();
        t.signal(Signal::Kill);
        let _ = t.wait();
    }

    #[test]
    fn listening_ports_reads_state_and_inode() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0
   1: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1 0
   2: 0100007F:1F92 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4244 1 0";
        let held: std::collections::HashSet<u64> = [4242, 4244].into();
        assert_eq!(listening_ports(text, &held), vec![0x1F90]);
    }
}
