//! `--compress auto`: the workers measure what compressing costs and saves
//! ([`AutoCompress`]), the sender compares it with the link's rate every window
//! and picks the level the workers use next ([`AutoController`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// zstd levels `--compress auto` moves between (0: off).
pub const AUTO_LEVELS: [i32; 3] = [0, 1, 3];

/// Shared state of `--compress auto`: the level the sender chose, and what
/// the workers measured compressing (including 1-in-16 probes while off).
#[derive(Debug, Default)]
pub(super) struct AutoCompress {
    /// Index into [`AUTO_LEVELS`].
    pub(super) idx: AtomicUsize,
    pub(super) comp_ns: AtomicU64,
    pub(super) comp_in: AtomicU64,
    pub(super) comp_out: AtomicU64,
}

/// Sender-side controller: every window compares the link rate L (bytes per
/// second of socket writes) with what the workers can compress, W x C, at
/// ratio R. Compression pays only while the CPUs outrun the link.
pub(super) struct AutoController {
    workers: f64,
    window_start: Instant,
    send_ns: u64,
    send_bytes: u64,
    last: (u64, u64, u64),
    /// Windows spent at each level.
    pub(super) windows: [u64; 3],
}

impl AutoController {
    const WINDOW: Duration = Duration::from_millis(250);

    pub(super) fn new(workers: usize) -> AutoController {
        AutoController {
            workers: workers as f64,
            window_start: Instant::now(),
            send_ns: 0,
            send_bytes: 0,
            last: (0, 0, 0),
            windows: [0; 3],
        }
    }

    pub(super) fn sent(&mut self, bytes: u64, took: Duration) {
        self.send_bytes += bytes;
        self.send_ns += took.as_nanos() as u64;
    }

    pub(super) fn tick(&mut self, auto: &AutoCompress) {
        if self.window_start.elapsed() < Self::WINDOW {
            return;
        }
        self.window_start = Instant::now();
        let idx = auto.idx.load(Ordering::Relaxed);
        self.windows[idx] += 1;
        let now = (
            auto.comp_ns.load(Ordering::Relaxed),
            auto.comp_in.load(Ordering::Relaxed),
            auto.comp_out.load(Ordering::Relaxed),
        );
        let (dns, din, dout) = (now.0 - self.last.0, now.1 - self.last.1, now.2 - self.last.2);
        self.last = now;
        let (send_ns, send_bytes) = (std::mem::take(&mut self.send_ns), std::mem::take(&mut self.send_bytes));
        if dns < 1_000_000 || din == 0 || send_ns < 1_000_000 || send_bytes < (1 << 20) {
            return; // not enough to judge this window
        }
        let link = send_bytes as f64 / (send_ns as f64 / 1e9); // bytes/s the link took
        let cpu = self.workers * din as f64 / (dns as f64 / 1e9); // logical bytes/s the workers can compress
        let ratio = din as f64 / dout.max(1) as f64;
        let next = if cpu < link || ratio < 1.1 {
            idx.saturating_sub(1) // compression is the bottleneck, or buys nothing
        } else if cpu > 3.0 * link * ratio && idx + 1 < AUTO_LEVELS.len() {
            idx + 1 // plenty of CPU headroom over a slow link: compress harder
        } else if idx == 0 {
            1
        } else {
            idx
        };
        auto.idx.store(next, Ordering::Relaxed);
    }
}
