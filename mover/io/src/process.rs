//! The process system calls of the workspace, each behind a safe function:
//! whether a child has exited (without reaping it), signals to a process or a
//! process group, waiting for a child with its resource usage, the effective
//! user and group, entering a network namespace, the open-file limit, and
//! taking a signal synchronously (`ferry serve` reloads its access file on SIGHUP).
//!
//! Like [`crate::sys`], each function is a thin wrapper: it adds no policy,
//! returns the OS error as an `io::Error`, and says in its `// SAFETY:` note
//! why the call is sound.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

/// A signal [`signal_process`] and [`signal_group`] can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `SIGTERM`: asks the process to end (it may clean up first).
    Term,
    /// `SIGKILL`: ends the process at once.
    Kill,
    /// `SIGHUP`: by convention, asks a daemon to reload its configuration.
    Hup,
    /// `SIGSTOP`: stops the process where it is (it cannot catch it).
    Stop,
    /// `SIGCONT`: lets a stopped process go on.
    Cont,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Hup => libc::SIGHUP,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        }
    }

    fn set(self) -> libc::sigset_t {
        // SAFETY: sigset_t is plain old data; sigemptyset initialises it, sigaddset adds a
        // valid signal number (both only write into the set we own).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, self.raw());
            set
        }
    }
}

/// Blocks `sig` in the calling thread (`pthread_sigmask(SIG_BLOCK)`); the threads
/// it starts afterwards inherit the mask. Called before any other thread starts,
/// no thread of the process takes the signal's default action (SIGHUP's ends the
/// process): it stays pending until [`wait_signal`] takes it.
pub fn block_signal(sig: Signal) -> io::Result<()> {
    let set = sig.set();
    // SAFETY: a valid, initialised sigset_t; the old mask is not asked for (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Waits until `sig` (blocked in every thread, see [`block_signal`]) is pending, and
/// takes it (`sigwait`). Several deliveries before the call count as one.
pub fn wait_signal(sig: Signal) -> io::Result<()> {
    let set = sig.set();
    let mut got: libc::c_int = 0;
    // SAFETY: a valid, initialised sigset_t and an int for the signal number, both ours.
    let rc = unsafe { libc::sigwait(&set, &mut got) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// True while the child `pid` of this process has not exited; false once it
/// has (it is not reaped: a later [`wait_with_usage`] still collects it).
/// `waitid(P_PID, pid, WEXITED | WNOHANG | WNOWAIT)`. Fails (ECHILD) when `pid`
/// is not an unreaped child of this process.
pub fn child_is_running(pid: u32) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with WNOWAIT only inspects the state of a child and writes
    // into `info`, a valid siginfo_t we own.
    let rc = unsafe {
        libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: si_pid is valid to read for a siginfo_t filled by waitid (0 when
    // no child changed state).
    Ok(unsafe { info.si_pid() } == 0)
}

/// Sends `sig` to the process `pid` (`kill(pid, sig)`). The caller makes sure
/// `pid` still names the process it means: an unreaped child's pid cannot be
/// reused.
pub fn signal_process(pid: u32, sig: Signal) -> io::Result<()> {
    kill(pid as libc::pid_t, sig)
}

/// Sends `sig` to every process of the process group `pgid` (`kill(-pgid,
/// sig)`). The caller makes sure the group is the one it means: a group whose
/// leader is an unreaped child of this process cannot be reused.
pub fn signal_group(pgid: u32, sig: Signal) -> io::Result<()> {
    if pgid == 0 {
        // kill(0, ..) would signal this process's own group.
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    kill(-(pgid as libc::pid_t), sig)
}

fn kill(target: libc::pid_t, sig: Signal) -> io::Result<()> {
    // SAFETY: kill takes integers only and touches no memory of ours.
    if unsafe { libc::kill(target, sig.raw()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Resource usage of a waited-for child and of every descendant it waited for
/// (`struct rusage`, the fields ferry reads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// CPU time in user mode.
    pub user: Duration,
    /// CPU time in the kernel.
    pub system: Duration,
    /// Largest resident set size of any one of the processes, in bytes.
    pub max_rss_bytes: u64,
}

/// Waits for the child `pid` to end and reaps it (`wait4`, retried when
/// interrupted); returns its exit status and its resource usage.
pub fn wait_with_usage(pid: u32) -> io::Result<(ExitStatus, ResourceUsage)> {
    let pid = pid as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 with valid out-pointers to locals.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if rc == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let usage = ResourceUsage {
        user: tv(ru.ru_utime),
        system: tv(ru.ru_stime),
        // ru_maxrss is in KiB on Linux.
        max_rss_bytes: ru.ru_maxrss as u64 * 1024,
    };
    Ok((ExitStatus::from_raw(status), usage))
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// This process's effective group id.
pub fn effective_gid() -> u32 {
    // SAFETY: getegid has no preconditions and cannot fail.
    unsafe { libc::getegid() }
}

/// Moves the calling thread into the network namespace open as `ns` (e.g.
/// /var/run/netns/NAME): sockets it creates from then on, and threads it
/// starts, live there. `setns(fd, CLONE_NEWNET)`; needs CAP_SYS_ADMIN.
pub fn enter_network_namespace(ns: &File) -> io::Result<()> {
    // SAFETY: setns on a descriptor we hold open; it changes only the network
    // namespace of this thread and touches no memory of ours.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to `want`,
/// or to the hard limit when that is lower; never lowers it. Returns the soft
/// limit in force afterwards.
pub fn raise_open_files_limit(want: u64) -> io::Result<u64> {
    // SAFETY: rlimit is plain old data; all-zero is a valid value.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes one rlimit into a value we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = (want as libc::rlim_t).min(lim.rlim_max);
    if target > lim.rlim_cur {
        lim.rlim_cur = target;
        // SAFETY: setrlimit reads one valid rlimit; a soft limit at most the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_waits_for_wait_signal() {
        // On a thread of its own, the signal directed at that thread: the test harness's
        // other threads keep SIGHUP's default action and never see it.
        std::thread::spawn(|| {
            block_signal(Signal::Hup).unwrap();
            // SAFETY: pthread_kill to this very thread, with a signal it has blocked.
            assert_eq!(unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) }, 0);
            wait_signal(Signal::Hup).unwrap();
        })
        .join()
        .unwrap();
    }
    use std::process::Command;

    #[test]
    fn a_child_runs_until_signalled_and_is_reaped_once() {
        // Reaped by wait_with_usage below, not by std.
        let pid = Command::new("sleep").arg("30").spawn().unwrap().id();
        assert!(child_is_running(pid).unwrap());
        signal_process(pid, Signal::Kill).unwrap();
        // Not reaped by looking: it reads as exited until waited for.
        while child_is_running(pid).unwrap() {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!child_is_running(pid).unwrap());
        let (st, _) = wait_with_usage(pid).unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        // Reaped: no longer our child.
        assert_eq!(child_is_running(pid).unwrap_err().raw_os_error(), Some(libc::ECHILD));
        assert_eq!(wait_with_usage(pid).unwrap_err().raw_os_error(), Some(libc::ECHILD));
    }

    #[test]
    fn usage_counts_the_waited_for_descendants() {
        let child = Command::new("sh").args(["-c", "head -c 20000000 /dev/zero | cksum >/dev/null; exit 3"]).spawn();
        let (st, u) = wait_with_usage(child.unwrap().id()).unwrap();
        assert_eq!(st.code(), Some(3));
        assert!(u.user + u.system > Duration::ZERO, "{u:?}");
        assert!(u.max_rss_bytes > 0);
    }

    #[test]
    fn a_group_signal_reaches_every_process_of_the_group() {
        use std::os::unix::process::CommandExt;
        let pid = Command::new("sh").args(["-c", "sleep 30 & wait"]).process_group(0).spawn().unwrap().id();
        signal_group(pid, Signal::Term).unwrap();
        let (st, _) = wait_with_usage(pid).unwrap();
        assert_eq!(st.signal(), Some(libc::SIGTERM));
        assert_eq!(signal_group(0, Signal::Term).unwrap_err().raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn effective_ids_match_the_id_command() {
        let id = |flag: &str| {
            let out = Command::new("id").arg(flag).output().unwrap();
            String::from_utf8(out.stdout).unwrap().trim().parse::<u32>().unwrap()
        };
        assert_eq!(effective_uid(), id("-u"));
        assert_eq!(effective_gid(), id("-g"));
    }

    #[test]
    fn only_a_namespace_file_is_entered() {
        let f = tempfile::tempfile().unwrap();
        let e = enter_network_namespace(&f).unwrap_err();
        // EINVAL: not a namespace (EPERM first when unprivileged).
        assert!(matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EPERM)), "{e}");
        // Our own namespace, in a thread of its own so that no other test is moved.
        let own = File::open("/proc/self/ns/net").unwrap();
        let r = std::thread::spawn(move || enter_network_namespace(&own)).join().unwrap();
        if effective_uid() == 0 {
            r.unwrap();
        }
    }
}
