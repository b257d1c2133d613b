//! Counters and per-stage latency histograms.
//!
//! Each thread keeps its own [`StageStats`] (no locking on the hot path) and
//! they are merged when the run ends.

use std::time::{Duration, Instant};

use ferry_planner::PlanMode;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Pipeline stages that are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Source: reading a chunk from the disk.
    Read,
    /// Zero check and BLAKE3.
    Hash,
    /// zstd compression.
    Compress,
    /// Writing frames to the socket.
    Send,
    /// Target: decompression and digest verification.
    Verify,
    /// Target: writing a chunk to the datastore.
    Write,
    /// Target: durable checkpoint (fdatasync and metadata).
    Sync,
}

const STAGES: [Stage; 7] =
    [Stage::Read, Stage::Hash, Stage::Compress, Stage::Send, Stage::Verify, Stage::Write, Stage::Sync];

impl Stage {
    /// Lower-case name used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Hash => "hash",
            Stage::Compress => "compress",
            Stage::Send => "send",
            Stage::Verify => "verify",
            Stage::Write => "write",
            Stage::Sync => "sync",
        }
    }
}

/// Latency histograms (microseconds) and busy time of each stage.
#[derive(Debug, Clone)]
pub struct StageStats {
    hist: Vec<Histogram<u64>>,
    busy: Vec<Duration>,
}

impl Default for StageStats {
    fn default() -> Self {
        StageStats {
            hist: STAGES
                .iter()
                .map(|_| Histogram::new_with_bounds(1, 60_000_000, 2).expect("histogram bounds"))
                .collect(),
            busy: vec![Duration::ZERO; STAGES.len()],
        }
    }
}

impl StageStats {
    /// Record one operation of `stage` that took `d`.
    pub fn record(&mut self, stage: Stage, d: Duration) {
        let i = stage as usize;
        self.busy[i] += d;
        let _ = self.hist[i].record((d.as_micros() as u64).clamp(1, 60_000_000));
    }

    /// Time `f` as one operation of `stage`.
    pub fn time<T>(&mut self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.record(stage, t.elapsed());
        r
    }

    /// Add another thread's figures.
    pub fn merge(&mut self, other: &StageStats) {
        for i in 0..STAGES.len() {
            let _ = self.hist[i].add(&other.hist[i]);
            self.busy[i] += other.busy[i];
        }
    }

    /// Summary of the stages that saw any operation.
    pub fn summary(&self) -> Vec<StageSummary> {
        STAGES
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.hist[*i].is_empty())
            .map(|(i, s)| {
                let h = &self.hist[i];
                StageSummary {
                    stage: s.name(),
                    count: h.len(),
                    busy_s: self.busy[i].as_secs_f64(),
                    p50_us: h.value_at_quantile(0.5),
                    p99_us: h.value_at_quantile(0.99),
                    p999_us: h.value_at_quantile(0.999),
                    max_us: h.max(),
                }
            })
            .collect()
    }
}

/// One stage's figures, as reported in JSON.
#[derive(Debug, Clone, Serialize)]
pub struct StageSummary {
    /// Stage name.
    pub stage: &'static str,
    /// Operations recorded.
    pub count: u64,
    /// Total time spent in the stage, summed over threads (seconds).
    pub busy_s: f64,
    /// Median latency (µs).
    pub p50_us: u64,
    /// 99th percentile (µs).
    pub p99_us: u64,
    /// 99.9th percentile (µs).
    pub p999_us: u64,
    /// Largest (µs).
    pub max_us: u64,
}

/// Byte and chunk counters of one disk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskCounters {
    /// Disk name.
    pub disk: String,
    /// How its changes were found (full, cbt, digest, seed; `""` in totals).
    #[serde(serialize_with = "mode_or_empty")]
    pub mode: Option<PlanMode>,
    /// Disk size in bytes.
    pub size: u64,
    /// Chunks the plan selected.
    pub chunks_planned: u64,
    /// Logical bytes the plan selected.
    pub bytes_planned: u64,
    /// Bytes read from the source disk.
    pub bytes_read: u64,
    /// Bytes found to be zero (sent as zero runs), including `bytes_hole_skipped`.
    pub bytes_zero: u64,
    /// Bytes not read at all because the NBD server reported them as
    /// unallocated zeros (`base:allocation`); counted in `bytes_zero` (or
    /// `bytes_unchanged`), not in `bytes_read`.
    pub bytes_hole_skipped: u64,
    /// Bytes found unchanged by digest comparison (not sent).
    pub bytes_unchanged: u64,
    /// Logical bytes of the chunks sent as data.
    pub bytes_data: u64,
    /// Logical bytes that were compressed.
    pub bytes_compressed_in: u64,
    /// What they compressed to.
    pub bytes_compressed_out: u64,
    /// Logical bytes sent uncompressed because they did not shrink (or compression was off).
    pub bytes_stored: u64,
    /// Bytes written to the connection for this disk (frame headers included).
    pub bytes_sent: u64,
    /// Data frames sent.
    pub chunks_sent: u64,
    /// Zero chunks.
    pub chunks_zero: u64,
    /// Unchanged chunks.
    pub chunks_unchanged: u64,
    /// Chunks skipped because a resumed session had them already.
    pub chunks_resumed: u64,
    /// Where the target's digest map came from (absent in totals).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest_map: Option<MapSource>,
    /// Bytes of DigestMapPart and DigestMapEnd frames received for this disk (headers included).
    pub digest_map_bytes: u64,
}

/// A disk's mode by its name; totals (no mode) as `""`.
fn mode_or_empty<S: serde::Serializer>(mode: &Option<PlanMode>, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(mode.map_or("", PlanMode::as_str))
}

/// Where a disk's digest map (the target's digests) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MapSource {
    /// No map was needed (full mode, cbt without verification samples).
    None,
    /// Downloaded from the target.
    Fetched,
    /// The source's cached copy, confirmed current by the target (no parts sent).
    Cached,
}

impl DiskCounters {
    /// Add another set of counters (same disk).
    pub fn add(&mut self, o: &DiskCounters) {
        self.bytes_read += o.bytes_read;
        self.bytes_zero += o.bytes_zero;
        self.bytes_hole_skipped += o.bytes_hole_skipped;
        self.bytes_unchanged += o.bytes_unchanged;
        self.bytes_data += o.bytes_data;
        self.bytes_compressed_in += o.bytes_compressed_in;
        self.bytes_compressed_out += o.bytes_compressed_out;
        self.bytes_stored += o.bytes_stored;
        self.bytes_sent += o.bytes_sent;
        self.chunks_sent += o.chunks_sent;
        self.chunks_zero += o.chunks_zero;
        self.chunks_unchanged += o.chunks_unchanged;
        self.digest_map_bytes += o.digest_map_bytes;
    }
}
