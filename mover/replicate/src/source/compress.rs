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
//! faster than the compressor, such as loopback). It steps up to the highest
//! level expected to keep C > 1.5 D, several steps at once when the headroom
//! is large: a level's own rate when it was measured before, else the current
//! rate divided by 2.5 per step (about what each step of [`AUTO_LEVELS`] costs
//! on this data). While off (0), level 1's rate comes from the 1-in-16 probes. A level that proved too
//! slow is remembered, so the controller does not oscillate (each change of
//! level restarts the workers' compression streams).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// zstd levels `--compress auto` moves between (0: off).
pub const AUTO_LEVELS: [i32; 5] = [0, 1, 3, 6, 9];

/// What one step up [`AUTO_LEVELS`] is expected to cost in compress rate before it
/// was measured (level 1 -> 3 -> 6 -> 9 on the bench's data: about 2.5x each).
const STEP_COST: f64 = 2.5;

/// Shared state of `--compress auto`: the level the sender chose, and what
/// the workers measured compressing (including 1-in-16 probes while off).
#[derive(Debug, Default)]
pub(super) struct AutoCompress {
    /// Index into [`AUTO_LEVELS`].
    pub(super) idx: AtomicUsize,
    /// The workers compress into streams and check chunks at level 1 from level 3 on
    /// (work.rs): incompressible data costs a level-1 pass at any level.
    pub(super) checked: AtomicBool,
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
    /// See [`AutoCompress::checked`].
    checked: bool,
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
            checked: false,
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
        self.checked = auto.checked.load(Ordering::Relaxed);
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
                                       // Data that does not compress steps down, except where it costs a level-1 check
                                       // only (checked, level 3 and up): there the noise goes raw, and the level stays
                                       // for the compressible data around it (a window of noise is no reason to lose it).
        let noise_is_cheap = self.checked && AUTO_LEVELS[idx] >= super::work::CHECK_FROM;
        if (w.ratio < 1.1 && !noise_is_cheap) || w.cpu < 1.2 * demand {
            return idx.saturating_sub(1); // compression buys nothing, or is the bottleneck
        }
        // CPU headroom over a slow link: compress harder, as many steps at once as
        // the expected rates allow (a slow link is found in one window, not four).
        let from = idx.max(1);
        let mut to = from;
        let mut expect = w.cpu;
        for up in from + 1..AUTO_LEVELS.len() {
            expect /= STEP_COST;
            if self.rate[up].unwrap_or(expect) > 1.5 * demand {
                to = up;
            } else {
                break;
            }
        }
        to
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
        // From 1 (500): 3 promises 200, 6 promises 80 > 1.5 x 37.5, 9 only 32: straight
        // to 6. 6 promises 150 / 2.5 = 60 at 9: up to 9, too slow there
        // (35 < 1.2 x 37.5), back to 6, and 6 it stays.
        assert_eq!(seen, [6, 9, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6]);
    }

    #[test]
    fn from_off_the_probes_rate_picks_the_level_at_once() {
        let mut c = AutoController::new(2);
        // Off, probing at level 1: 400 MB/s; 12.5 MB/s at ratio 3 (demand 37.5 MB/s):
        // 3 promises 160, 6 promises 64, 9 25.6: level 6 in one window.
        let w = Window { link: 12.5 * MB, cpu: 400.0 * MB, ratio: 3.0 };
        assert_eq!(AUTO_LEVELS[c.next(0, w)], 6);
        // A 1 Gbit/s link (demand 375 MB/s): 400 < 1.2 x 375, stays off.
        let mut c = AutoController::new(2);
        let w = Window { link: 125.0 * MB, cpu: 400.0 * MB, ratio: 3.0 };
        assert_eq!(c.next(0, w), 0);
        // 50 MB/s (demand 150): 1 holds (400 > 180), 3 would give 160 < 225: level 1.
        let w = Window { link: 50.0 * MB, cpu: 400.0 * MB, ratio: 3.0 };
        assert_eq!(AUTO_LEVELS[c.next(0, w)], 1);
    }

    #[test]
    fn incompressible_data_steps_down() {
        let mut c = AutoController::new(2);
        let w = Window { link: 12.5 * MB, cpu: 400.0 * MB, ratio: 1.02 };
        assert_eq!(c.next(2, w), 1);
        assert_eq!(c.next(1, w), 0);
    }

    #[test]
    fn checked_streams_keep_a_high_level_through_noise() {
        let mut c = AutoController::new(2);
        c.checked = true;
        // A window of noise at level 6 over a slow link: the check sends it raw cheaply.
        let noise = Window { link: 12.5 * MB, cpu: 600.0 * MB, ratio: 1.02 };
        assert_eq!(AUTO_LEVELS[c.next(3, noise)], 9);
        // At level 1 (a fast link) noise still switches compression off.
        assert_eq!(c.next(1, noise), 0);
        // Noise that makes the CPU the bottleneck still steps down.
        let slow = Window { link: 12.5 * MB, cpu: 10.0 * MB, ratio: 1.02 };
        assert_eq!(AUTO_LEVELS[c.next(3, slow)], 3);
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
