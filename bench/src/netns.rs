//! An emulated WAN link between two network namespaces (root only): a
//! packet-level delay line that carries TCP end to end.
//!
//! `src` and `dst` each hold a TUN device (`fwan0`; 10.77.0.1 in `src`, 10.77.0.2
//! in `dst`, MTU [`MTU`]). This process holds both TUN descriptors (each opened by a
//! thread that entered its namespace; a descriptor stays valid wherever it is used)
//! and one thread per direction forwards every IP packet read from one device to the
//! other. So the two kernels' TCP stacks talk to each other directly and see the
//! link's round-trip time: window limits, slow start, losses and several streams
//! behave as on a real path (the earlier TCP proxy terminated the connection, and
//! the sender saw a loopback RTT).
//!
//! Each direction is an exact serialisation clock followed by a fixed delay, the
//! model of a bottleneck router on a long path:
//! - a packet of `n` bytes read at `now` starts serialising at
//!   `start = max(now, busy_until)` and takes `n * 8 / rate`; `busy_until` moves on;
//! - it is written to the other device at `busy_until + delay` (one-way delay each
//!   direction, so RTT = 2 x delay; deliveries keep their order);
//! - drop-tail: a packet that would wait longer than one RTT (at least 5 ms) behind those already
//!   queued (the queue holds one bandwidth-delay product, what one Reno/CUBIC flow
//!   needs to keep the link busy) is dropped, as a router's full buffer does.
//!
//! Why a clock in the delay line rather than `tc tbf` on the TUN devices: tbf on the
//! sender's own egress gives the sender's TCP local backpressure (TCP small queues)
//! instead of queueing and loss at a remote bottleneck, its burst and latency
//! parameters blur the rate at 1 Gbit/s, and the TUN driver silently drops when its
//! ring overflows. The clock is exact, costs a few instructions per packet, and the
//! queue and its drops are counted ([`LineStats`]).
//!
//! Cost: two syscalls per packet (read, write). At 1 Gbit/s with MTU 9000 that is
//! about 14 000 data packets/s one way plus the acknowledgements the other way; the
//! line reports its packet rate in [`LineStats`]. Memory: at most one BDP queued plus
//! `rate x delay` in flight per direction (and never more than [`MAX_HELD`] bytes).
//!
//! The shape can change between scenarios ([`Wan::set_shape`]) without rebuilding
//! the namespaces. Dropping the `Wan` stops the threads, closes the devices and
//! removes both namespaces, also on error or panic.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Address of the sender side inside the `src` namespace.
pub const SRC_ADDR: &str = "10.77.0.1";
/// Address of the receiver side inside the `dst` namespace.
pub const DST_ADDR: &str = "10.77.0.2";
/// MTU of both TUN devices: jumbo frames keep the packet rate at 1 Gbit/s near
/// 14 000/s, which one thread per direction forwards with CPU to spare.
pub const MTU: usize = 9000;
/// Name of the TUN device in each namespace.
const DEV: &str = "fwan0";
/// Upper bound of the bytes one direction holds (queue plus in flight).
pub const MAX_HELD: usize = 64 << 20;

/// Rate and one-way delay of the link (both directions alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Bits per second; 0: no rate limit.
    pub rate_bps: u64,
    /// Added to every packet in each direction; RTT = 2 x this.
    pub one_way: Duration,
}

impl Shape {
    /// Longest a packet may wait for serialisation: one RTT (so the queue holds
    /// one bandwidth-delay product), at least 5 ms (a few jumbo frames on a short path).
    fn queue_limit(&self) -> Duration {
        (self.one_way * 2).max(Duration::from_millis(5))
    }

    /// Serialisation time of `bytes` at this rate.
    fn serialise(&self, bytes: usize) -> Duration {
        if self.rate_bps == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((bytes as u128 * 8 * 1_000_000_000 / u128::from(self.rate_bps)) as u64)
    }
}

/// Counters of one direction of the line.
#[derive(Debug, Default)]
struct DirCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
    drops: AtomicU64,
    max_queue_us: AtomicU64,
    /// The thread's id (from /proc/thread-self), for its CPU time.
    tid: AtomicU64,
}

/// A snapshot of one direction's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LineStats {
    /// Packets forwarded.
    pub packets: u64,
    /// IP bytes forwarded.
    pub bytes: u64,
    /// Packets dropped because the queue was full.
    pub drops: u64,
    /// Longest serialisation wait seen, microseconds.
    pub max_queue_us: u64,
    /// CPU seconds the direction's thread used (/proc/self/task/TID/schedstat; 0 if unknown).
    pub cpu_s: f64,
}

/// Two namespaces joined by the delay line; removed on drop.
#[derive(Debug)]
pub struct Wan {
    /// Namespace of the sender side.
    pub src: String,
    /// Namespace of the receiver side.
    pub dst: String,
    shape: Arc<Mutex<Shape>>,
    stop: Arc<AtomicBool>,
    /// [src -> dst, dst -> src].
    counters: [Arc<DirCounters>; 2],
    threads: Vec<JoinHandle<()>>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Why the WAN scenarios cannot run here, if they cannot.
pub fn unavailable_reason() -> Option<String> {
    if Command::new("nsenter").arg("--version").output().is_err() {
        return Some("`nsenter` (util-linux) is not installed".into());
    }
    if ferry_io::process::effective_uid() != 0 {
        return Some("not root: network namespaces and TUN devices need root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing (no TUN support)".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`ip netns list` failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("`ip` not runnable: {e}")),
    }
}

/// Runs `f` in a thread that entered the network namespace at `ns` (this thread stays put).
pub fn in_namespace<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let path = ns.to_path_buf();
    std::thread::spawn(move || {
        let nsf = File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
        ferry_io::process::enter_network_namespace(&nsf)
            .with_context(|| format!("entering network namespace {}", path.display()))?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("a thread in namespace {} panicked", ns.display()))?
}

/// Parses a link rate like `100mbit`, `1gbit`, `500kbit` or a number of bits per second.
pub fn parse_rate(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1_000_000_000)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1_000_000)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1_000)
    } else {
        (t.as_str(), 1)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| anyhow!("{s:?} is not a link rate (examples: 100mbit, 1gbit, 500kbit)"))
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Wan {
    /// Creates the namespaces, the TUN devices and the delay line with `shape`.
    pub fn create(shape: Shape) -> Result<Wan> {
        Self::remove_stale();
        let (pid, n) = (std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let counters = [Arc::new(DirCounters::default()), Arc::new(DirCounters::default())];
        let mut wan = Wan {
            src: format!("fbench-s-{pid}-{n}"),
            dst: format!("fbench-d-{pid}-{n}"),
            shape: Arc::new(Mutex::new(shape)),
            stop: Arc::new(AtomicBool::new(false)),
            counters,
            threads: Vec::new(),
        };
        // The guard exists from here on: a failure below still removes what was made.
        ip(&["netns", "add", &wan.src])?;
        ip(&["netns", "add", &wan.dst])?;
        let tun_src = in_namespace(&Self::path(&wan.src), || Ok(ferry_io::tun::open_tun(DEV)?))
            .context("creating the TUN device in the src namespace")?;
        let tun_dst = in_namespace(&Self::path(&wan.dst), || Ok(ferry_io::tun::open_tun(DEV)?))
            .context("creating the TUN device in the dst namespace")?;
        for (ns, addr) in [(&wan.src, SRC_ADDR), (&wan.dst, DST_ADDR)] {
            let mtu = MTU.to_string();
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", DEV])?;
            ip(&["-n", ns, "link", "set", DEV, "mtu", &mtu, "up"])?;
        }
        let (s2, d2) = (tun_src.try_clone()?, tun_dst.try_clone()?);
        for (i, (from, to)) in [(tun_src, d2), (tun_dst, s2)].into_iter().enumerate() {
            let (shape, stop, c) = (wan.shape.clone(), wan.stop.clone(), wan.counters[i].clone());
            let name = if i == 0 { "wan-src-dst" } else { "wan-dst-src" };
            wan.threads
                .push(std::thread::Builder::new().name(name.into()).spawn(move || line(from, to, &shape, &stop, &c))?);
        }
        Ok(wan)
    }

    /// The link's shape now.
    pub fn shape(&self) -> Shape {
        *self.shape.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes rate and delay; packets read from now on follow it.
    pub fn set_shape(&self, shape: Shape) {
        *self.shape.lock().unwrap_or_else(|p| p.into_inner()) = shape;
    }

    /// Counters of [src -> dst, dst -> src] since the link was made.
    pub fn stats(&self) -> [LineStats; 2] {
        let snap = |c: &DirCounters| LineStats {
            packets: c.packets.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            drops: c.drops.load(Ordering::Relaxed),
            max_queue_us: c.max_queue_us.load(Ordering::Relaxed),
            cpu_s: thread_cpu_s(c.tid.load(Ordering::Relaxed)),
        };
        [snap(&self.counters[0]), snap(&self.counters[1])]
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
            let rest = name.strip_prefix("fbench-s-").or_else(|| name.strip_prefix("fbench-d-"));
            if let Some(pid) = rest.map(|r| r.split('-').next().unwrap_or("")) {
                if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("ip").args(["netns", "del", name]).output();
                }
            }
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// CPU seconds thread `tid` of this process has run (0.0 when unknown).
fn thread_cpu_s(tid: u64) -> f64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// One direction of the delay line: reads packets from `from`, stamps each with its
/// delivery time (serialisation clock plus delay) and writes it to `to` then.
fn line(mut from: File, mut to: File, shape: &Mutex<Shape>, stop: &AtomicBool, c: &DirCounters) {
    if let Some(tid) = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok()))
    {
        c.tid.store(tid, Ordering::Relaxed);
    }
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut held = 0usize;
    let mut busy_until = Instant::now();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, pkt)) = queue.pop_front() else { break };
            held -= pkt.len();
            // A TUN write injects the packet into the other namespace's stack; it fails
            // only when that device is going away (the link is being removed).
            if to.write(&pkt).is_ok() {
                c.packets.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
            }
        }
        let wait = queue.front().map_or(Duration::from_millis(50), |(due, _)| due.saturating_duration_since(now));
        if !ferry_io::sys::wait_readable(&from, wait).unwrap_or(false) {
            continue;
        }
        // A bounded batch, so that deliveries due meanwhile are not held up.
        for _ in 0..64 {
            let n = match from.read(&mut buf) {
                Ok(n) if n > 0 => n,
                _ => break, // WouldBlock: nothing more for now
            };
            let now = Instant::now();
            let s = *shape.lock().unwrap_or_else(|p| p.into_inner());
            let start = busy_until.max(now);
            let waited = start - now;
            if waited > s.queue_limit() || held + n > MAX_HELD {
                c.drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            c.max_queue_us.fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
            busy_until = start + s.serialise(n);
            held += n;
            queue.push_back((busy_until + s.one_way, buf[..n].to_vec()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener, TcpStream};

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("100mbit").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("64000").unwrap(), 64_000);
        assert_eq!(
            parse_rate("fast").unwrap_err().to_string(),
            "\"fast\" is not a link rate (examples: 100mbit, 1gbit, 500kbit)"
        );
    }

    #[test]
    fn serialisation_and_queue_limit() {
        let s = Shape { rate_bps: 100_000_000, one_way: Duration::from_millis(25) };
        assert_eq!(s.serialise(9000), Duration::from_micros(720));
        assert_eq!(s.queue_limit(), Duration::from_millis(50));
        assert_eq!(Shape { rate_bps: 1, one_way: Duration::ZERO }.queue_limit(), Duration::from_millis(5));
        assert_eq!(Shape { rate_bps: 0, one_way: Duration::ZERO }.serialise(9000), Duration::ZERO);
    }

    /// Sends `bytes` from `src` to a sink in `dst` whose listener clamps its window at
    /// `clamp` (0: no clamp); first ten 1-byte ping-pongs. Returns (RTTs, transfer seconds).
    fn probe(wan: &Wan, clamp: u32, bytes: usize) -> (Vec<Duration>, f64) {
        let listener = in_namespace(&Wan::path(&wan.dst), move || {
            let l = TcpListener::bind((DST_ADDR, 0))?;
            if clamp > 0 {
                ferry_io::tun::set_tcp_window_clamp(&l, clamp)?;
            }
            Ok(l)
        })
        .unwrap();
        let port = listener.local_addr().unwrap().port();
        let sink = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            if clamp > 0 {
                // Also on the connection: not every kernel hands the listener's clamp on.
                ferry_io::tun::set_tcp_window_clamp(&s, clamp).unwrap();
            }
            let mut one = [0u8; 1];
            for _ in 0..10 {
                s.read_exact(&mut one).unwrap();
                s.write_all(&one).unwrap();
            }
            let n = std::io::copy(&mut s, &mut std::io::sink()).unwrap();
            s.write_all(b"k").unwrap();
            n
        });
        let (rtts, secs) = in_namespace(&Wan::path(&wan.src), move || {
            let mut c = TcpStream::connect((DST_ADDR, port))?;
            c.set_nodelay(true)?;
            let mut rtts = Vec::new();
            let mut one = [0u8; 1];
            for _ in 0..10 {
                let t = Instant::now();
                c.write_all(b"p")?;
                c.read_exact(&mut one)?;
                rtts.push(t.elapsed());
            }
            let data = vec![0x5au8; 1 << 20];
            let t = Instant::now();
            let mut left = bytes;
            while left > 0 {
                let k = left.min(data.len());
                c.write_all(&data[..k])?;
                left -= k;
            }
            c.shutdown(Shutdown::Write)?;
            c.read_exact(&mut one)?;
            Ok((rtts, t.elapsed().as_secs_f64()))
        })
        .unwrap();
        assert_eq!(sink.join().unwrap(), bytes as u64);
        (rtts, secs)
    }

    /// The link carries TCP end to end: the RTT is 2 x delay, a window-clamped stream
    /// runs at window / RTT (a terminating proxy would let it run at the link rate),
    /// and an unclamped stream on a short path fills the link rate and no more.
    #[test]
    fn tcp_sees_the_links_rtt_window_and_rate() {
        if let Some(r) = unavailable_reason() {
            eprintln!("skipped: the WAN link test needs namespaces and TUN: {r}");
            return;
        }
        let wan = Wan::create(Shape { rate_bps: 200_000_000, one_way: Duration::from_millis(20) }).unwrap();
        // The line is a userspace thread: on a machine loaded by other builds it sometimes waits
        // for a CPU, which only ever slows a measurement. Each check gets three attempts; the
        // first that passes counts (the bounds themselves are not loosened).
        let clamp = 256 << 10;
        let mut failures = Vec::new();
        for _ in 0..3 {
            match window_and_rtt(&wan, clamp) {
                Ok(()) => break,
                Err(e) => failures.push(e),
            }
        }
        assert!(failures.len() < 3, "RTT / window checks failed three times: {failures:#?}");
        let mut failures = Vec::new();
        for _ in 0..3 {
            match link_rate(&wan) {
                Ok(()) => break,
                Err(e) => failures.push(e),
            }
        }
        assert!(failures.len() < 3, "rate check failed three times: {failures:#?}");
    }

    /// RTT: ten 1-byte ping-pongs; the fastest (the link's RTT, as ping reports it) within
    /// 3 ms of 2 x 20 ms. Window: with the receiver's window clamped at 256 KiB one stream is
    /// window-limited, so doubling the RTT halves its rate, far below the link's 25 MB/s.
    /// (Through a proxy that terminates TCP the sender's window would see a loopback RTT: link
    /// rate both times.) The kernel (6.18 here) keeps about 1.6x the clamp in flight, so the
    /// absolute figure is only bounded loosely; the ratio is what theory pins.
    fn window_and_rtt(wan: &Wan, clamp: u32) -> Result<(), String> {
        wan.set_shape(Shape { rate_bps: 200_000_000, one_way: Duration::from_millis(20) });
        let (rtts, secs40) = probe(wan, clamp, 12 << 20);
        let min = rtts.iter().min().copied().unwrap_or_default();
        if min < Duration::from_millis(40) {
            return Err(format!("RTT below 2 x delay: {rtts:?}"));
        }
        if min > Duration::from_millis(43) {
            return Err(format!("RTT {min:?} not within 3 ms of 40 ms: {rtts:?}"));
        }
        wan.set_shape(Shape { rate_bps: 200_000_000, one_way: Duration::from_millis(40) });
        let (_, secs80) = probe(wan, clamp, 12 << 20);
        let (r40, r80) = ((12 << 20) as f64 / secs40, (12 << 20) as f64 / secs80);
        let theory = f64::from(clamp) / 0.040;
        eprintln!(
            "window-limited: {:.2} MB/s at 40 ms, {:.2} MB/s at 80 ms (window/RTT at 40 ms: {:.2} MB/s)",
            r40 / 1e6,
            r80 / 1e6,
            theory / 1e6
        );
        if !(1.6..=2.4).contains(&(r40 / r80)) {
            return Err(format!("rate ratio {:.2} for RTT 40 vs 80 ms, not ~2", r40 / r80));
        }
        if r40 > theory * 2.0 || r40 > 25e6 * 0.6 {
            return Err(format!("{:.2} MB/s is not window-limited", r40 / 1e6));
        }
        Ok(())
    }

    /// Rate: 50 Mbit/s with 10 ms each way, unclamped: the stream gets the link rate and
    /// the IP bytes never exceed it.
    fn link_rate(wan: &Wan) -> Result<(), String> {
        wan.set_shape(Shape { rate_bps: 50_000_000, one_way: Duration::from_millis(10) });
        let before = wan.stats()[0];
        let (_, secs) = probe(wan, 0, 12 << 20);
        let rate = (12 << 20) as f64 * 8.0 / secs;
        let after = wan.stats()[0];
        let wire = (after.bytes - before.bytes) as f64 * 8.0;
        eprintln!(
            "rate-limited: payload {:.1} Mbit/s, IP {:.1} Mbit/s, {} packets, {} drops, max queue {} us, line CPU {:.3} s",

            rate / 1e6,
            wire / secs / 1e6,
            after.packets - before.packets,
            after.drops - before.drops,
            after.max_queue_us,
            after.cpu_s - before.cpu_s
        );
        if after.cpu_s <= before.cpu_s {
            return Err("the line's thread CPU time did not advance".into());
        }
        if wire / secs > 50e6 * 1.02 {
            return Err(format!("IP rate {:.1} Mbit/s above the link's 50", wire / secs / 1e6));
        }
        if rate < 50e6 * 0.75 {
            return Err(format!("payload rate {:.1} Mbit/s far below the link's 50", rate / 1e6));
        }
        Ok(())
    }
}
