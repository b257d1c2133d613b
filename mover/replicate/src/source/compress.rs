//! `--compress auto`: the workers measure what compressing costs and saves
//! ([`AutoCompress`]), the sender compares it with the link's rate every window
//! and picks the level the workers use next ([`AutoController`]). What was
//! sent at each level is counted for the summary ([`LevelBytes`]).
//!
//! The rule, in the spirit of `zstd --adapt`: every 250 ms window the
//! controller knows the link's drain rate L (wire bytes per second of socket
//! writes: a slow link blocks the writes), the compression ratio R at the
//! current level, and what the workers can compress, C (workers x logical
//! bytes per second of compress time, i.e. the CPU headroom). The link takes
//! D = L x R logical bytes per second. Compression must never be the
//! bottleneck: below C < 1.2 D the level steps down (to 0, off, on a link
//! faster than the compressor, such as loopback). It steps up while the next
//! level is expected to keep C > 1.5 D: from that level's own rate when it
//! was measured before, else from the current rate divided by 2.5 (about what
//! each step of [`AUTO_LEVELS`] costs on this data). A level that proved too
//! slow is remembered, so the controller does not oscillate (each change of
//! level restarts the workers' compression streams).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// zstd levels `--compress auto` moves between (0: off).
pub const AUTO_LEVELS: [i32; 5] = [0, 1, 3, 6, 9];

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

/// Data chunks sent at one zstd level (0: sent raw), for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LevelBytes {
    /// zstd level; 0 for chunks sent uncompressed.
    pub level: i32,
    /// Data chunks.
    pub chunks: u64,
    /// Their logical bytes.
    pub bytes_in: u64,
    /// Their payload bytes on the wire (stream headers included, frame headers not).
    pub bytes_out: u64,
}

/// Per level, what was sent.
#[derive(Debug, Default)]
pub(super) struct LevelCounts(BTreeMap<i32, LevelBytes>);

impl LevelCounts {
    pub(super) fn add(&mut self, level: i32, bytes_in: u64, bytes_out: u64) {
        let e = self.0.entry(level).or_insert_with(|| LevelBytes { level, ..Default::default() });
        e.chunks += 1;
        e.bytes_in += bytes_in;
        e.bytes_out += bytes_out;
    }

    pub(super) fn into_vec(self) -> Vec<LevelBytes> {
        self.0.into_values().collect()
    }
}

/// Sender-side controller (see the module docs).
pub(super) struct AutoController {
    workers: f64,
    window_start: Instant,
    send_ns: u64,
    send_bytes: u64,
    last: (u64, u64, u64),
    /// Per level, the workers' compress rate last measured there (logical bytes/s).
    rate: [Option<f64>; AUTO_LEVELS.len()],
    /// Windows spent at each level.
    pub(super) windows: [u64; AUTO_LEVELS.len()],
}

/// What one window measured: link drain rate (wire bytes/s), the workers'
/// compress rate (logical bytes/s, all workers), the ratio.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    pub(super) link: f64,
    pub(super) cpu: f64,
    pub(super) ratio: f64,
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
            rate: [None; AUTO_LEVELS.len()],
            windows: [0; AUTO_LEVELS.len()],
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
        let w = Window {
            link: send_bytes as f64 / (send_ns as f64 / 1e9),
            cpu: self.workers * din as f64 / (dns as f64 / 1e9),
            ratio: din as f64 / dout.max(1) as f64,
        };
        auto.idx.store(self.next(idx, w), Ordering::Relaxed);
    }

    /// The level index for the next window, at `idx` now, after window `w`.
    pub(super) fn next(&mut self, idx: usize, w: Window) -> usize {
        if idx > 0 {
            // Level 0 only probes (1 chunk in 16, at level 1): its rate is level 1's.
            self.rate[idx] = Some(w.cpu);
        } else {
            self.rate[1].get_or_insert(w.cpu);
        }
        let demand = w.link * w.ratio; // logical bytes/s the link takes at this ratio
        if w.ratio < 1.1 || w.cpu < 1.2 * demand {
            return idx.saturating_sub(1); // compression buys nothing, or is the bottleneck
        }
        if idx == 0 {
            return 1;
        }
        let up = idx + 1;
        if up < AUTO_LEVELS.len() && self.rate[up].unwrap_or(w.cpu / 2.5) > 1.5 * demand {
            return up; // CPU headroom over a slow link: compress harder
        }
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    #[test]
    fn loopback_switches_compression_off() {
        let mut c = AutoController::new(2);
        // A link that takes 2 GB/s, workers that compress 500 MB/s at ratio 2.
        let w = Window { link: 2000.0 * MB, cpu: 500.0 * MB, ratio: 2.0 };
        assert_eq!(c.next(1, w), 0);
        assert_eq!(c.next(0, w), 0);
    }

    #[test]
    fn a_slow_link_climbs_to_the_level_the_cpu_sustains_and_stays() {
        let mut c = AutoController::new(2);
        // 100 Mbit/s at ratio 3: the link takes 37.5 MB/s of logical bytes.
        let link = 12.5 * MB;
        // Measured rates per level on this data (all workers).
        let cpu = [500.0 * MB, 500.0 * MB, 260.0 * MB, 150.0 * MB, 35.0 * MB];
        let mut idx = 1;
        let mut seen = Vec::new();
        for _ in 0..12 {
            idx = c.next(idx, Window { link, cpu: cpu[idx], ratio: 3.0 });
            seen.push(AUTO_LEVELS[idx]);
        }
        // 6 promises 150 / 2.5 = 60 > 1.5 x 37.5 at 9: up to 9, too slow there
        // (35 < 1.2 x 37.5), back to 6, and 6 it stays.
        assert_eq!(seen, [3, 6, 9, 6, 6, 6, 6, 6, 6, 6, 6, 6]);
    }

    #[test]
    fn incompressible_data_steps_down() {
        let mut c = AutoController::new(2);
        let w = Window { link: 12.5 * MB, cpu: 400.0 * MB, ratio: 1.02 };
        assert_eq!(c.next(2, w), 1);
        assert_eq!(c.next(1, w), 0);
    }

    #[test]
    fn level_counts_sum_per_level() {
        let mut l = LevelCounts::default();
        l.add(3, 100, 40);
        l.add(0, 100, 100);
        l.add(3, 50, 10);
        assert_eq!(
            l.into_vec(),
            [
                LevelBytes { level: 0, chunks: 1, bytes_in: 100, bytes_out: 100 },
                LevelBytes { level: 3, chunks: 2, bytes_in: 150, bytes_out: 50 },
            ]
        );
    }
}
