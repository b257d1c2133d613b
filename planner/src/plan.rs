//! "What must move": the plan of each disk of a replication job.
//!
//! The source executes it: [`plan_disk`] decides from what the job was given
//! and what the target answered (ResumeInfo) which chunks to consider, whether
//! the target's digest map is needed and which unchanged chunks to sample;
//! once the samples are read and the map is in, [`check_samples`] keeps the
//! plan or falls back to digest mode. [`read_span`] sizes the reads.

use std::fmt;
use std::ops::Range;

use serde::Serialize;

use crate::{chunk_count, ChangeMap, ChunkSet, Digest};

/// splitmix64: a tiny, well-mixed deterministic generator (Steele, Lea, Flood 2014).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The chunk ranges of `0..chunk_count` that are not in `changed`.
fn unchanged_ranges(changed: &ChunkSet, chunk_count: u64) -> Vec<Range<u64>> {
    ChunkSet::all(chunk_count).difference(changed).ranges().to_vec()
}

/// Up to `n` chunk indices below `chunk_count` and NOT in `changed`, for
/// checking a change map against the target's digests ("trust but verify").
///
/// Sorted, distinct, deterministic for a given `seed`, and spread evenly: the
/// unchanged chunks (in order) are cut into `n` strata of near-equal size and
/// one chunk is drawn from each. If there are at most `n` unchanged chunks,
/// all of them are returned. Never materialises the unchanged set.
pub fn sample_unchanged(changed: &ChunkSet, chunk_count: u64, n: usize, seed: u64) -> Vec<u64> {
    let ranges = unchanged_ranges(changed, chunk_count);
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    if n == 0 || total == 0 {
        return Vec::new();
    }
    let n64 = n as u64;
    let mut state = seed;
    // Ranks (positions among the unchanged chunks) in increasing order.
    let ranks: Box<dyn Iterator<Item = u64>> = if total <= n64 {
        Box::new(0..total)
    } else {
        Box::new((0..n64).map(move |k| {
            let lo = (u128::from(k) * u128::from(total) / u128::from(n64)) as u64;
            let hi = (u128::from(k + 1) * u128::from(total) / u128::from(n64)) as u64;
            // hi > lo since total > n; the modulo bias is negligible for a sample.
            lo + splitmix64(&mut state) % (hi - lo)
        }))
    };
    let mut out = Vec::with_capacity(n.min(total as usize));
    let mut ranges = ranges.into_iter();
    let mut current = ranges.next();
    let mut base = 0u64; // rank of current.start
    for rank in ranks {
        while let Some(r) = &current {
            let len = r.end - r.start;
            if rank < base + len {
                out.push(r.start + (rank - base));
                break;
            }
            base += len;
            current = ranges.next();
        }
    }
    out
}

/// Bytes read at once when chunks are smaller (64 KiB chunks go four at a time).
pub const SPAN_BYTES: u64 = 256 * 1024;

/// Chunks per read: small chunks are read [`SPAN_BYTES`] at a time (one read, one
/// hand-off and one buffer for several chunks, each still hashed, compared and sent on
/// its own). When every disk comes with its changed chunks (cbt: `Some`, see
/// [`expected_changes`]), fewer: the mean run of changed chunks, rounded up to a power
/// of two. A read never spans a gap, so a 1% change list (runs of one 64 KiB chunk)
/// would fill a quarter of each buffer, and the read pool (all of it touched when
/// io_uring registers it) would be four times the memory it needs. A disk that falls
/// back to digest mode then reads with the smaller span.
pub fn read_span(chunk_size: u32, changed: impl IntoIterator<Item = Option<ChunkSet>>) -> u64 {
    let max = (SPAN_BYTES / u64::from(chunk_size)).max(1);
    let (mut chunks, mut runs) = (0u64, 0u64);
    for set in changed {
        let Some(set) = set else { return max };
        chunks += set.count();
        runs += set.ranges().len() as u64;
    }
    if runs == 0 {
        return max;
    }
    chunks.div_ceil(runs).next_power_of_two().min(max)
}

/// The chunks a disk is expected to read as far as is known before the target
/// answers (for [`read_span`]): its change map's, when the mode asked is cbt or
/// auto and the replica has points (`first_run`: it has none, every disk goes
/// in full); `None` when every chunk may be read.
pub fn expected_changes(
    requested: Option<PlanMode>,
    change_map: Option<&ChangeMap>,
    chunk_size: u32,
    disk_size: u64,
    first_run: bool,
) -> Option<ChunkSet> {
    match requested {
        None | Some(PlanMode::Cbt) if !first_run => change_map.map(|m| m.chunks(chunk_size, disk_size)),
        _ => None,
    }
}

/// How a disk's chunks are chosen (serialised in lowercase: `"full"`, `"cbt"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanMode {
    /// Every chunk (zero chunks become zero runs).
    Full,
    /// The chunks a changed-block-tracking map touches, a sample of the others checked.
    Cbt,
    /// Every chunk is read and hashed; only those whose digest differs are sent.
    Digest,
    /// The target digests a copy it already holds, then the job runs as digest mode.
    Seed,
}

impl PlanMode {
    /// The lowercase name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            PlanMode::Full => "full",
            PlanMode::Cbt => "cbt",
            PlanMode::Digest => "digest",
            PlanMode::Seed => "seed",
        }
    }
}

impl fmt::Display for PlanMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl From<ferry_wire::Mode> for PlanMode {
    fn from(m: ferry_wire::Mode) -> PlanMode {
        match m {
            ferry_wire::Mode::Full => PlanMode::Full,
            ferry_wire::Mode::Cbt => PlanMode::Cbt,
            ferry_wire::Mode::Digest => PlanMode::Digest,
            ferry_wire::Mode::Seed => PlanMode::Seed,
        }
    }
}

impl From<PlanMode> for ferry_wire::Mode {
    fn from(m: PlanMode) -> ferry_wire::Mode {
        match m {
            PlanMode::Full => ferry_wire::Mode::Full,
            PlanMode::Cbt => ferry_wire::Mode::Cbt,
            PlanMode::Digest => ferry_wire::Mode::Digest,
            PlanMode::Seed => ferry_wire::Mode::Seed,
        }
    }
}

/// What the target answered about a disk when it was opened (ResumeInfo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetDisk {
    /// The replica already had the disk.
    pub existed: bool,
    /// Its size at the latest point (0 when new).
    pub previous_size: u64,
    /// An interrupted session's watermark: chunks below it are durable at the target.
    pub next_chunk: u64,
}

/// What a disk's plan is made from.
#[derive(Debug, Clone, Copy)]
pub struct DiskInputs<'a> {
    /// Chunk size in force.
    pub chunk_size: u32,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// The mode asked for; `None` for auto: cbt when a change map is given,
    /// digest when the target already has the disk, else full.
    pub requested: Option<PlanMode>,
    /// The disk's change map, if one was given.
    pub change_map: Option<&'a ChangeMap>,
    /// What the target answered.
    pub target: TargetDisk,
    /// Plan only: nothing is announced to the target.
    pub plan_only: bool,
    /// Cbt: unchanged chunks to check against the target's digests (0: trust the map).
    pub verify_samples: usize,
    /// Seed of the sample draw ([`sample_unchanged`]).
    pub seed: u64,
}

/// Something the plan tells the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanNote {
    /// The disk is new to the replica: it is copied in full whatever the mode asked.
    NewDisk,
    /// A sampled chunk the change map calls unchanged differs from the
    /// target's: the disk falls back to digest mode.
    CbtMissedChange {
        /// The first such chunk.
        chunk: u64,
    },
}

impl PlanNote {
    /// Whether it affects the result (a warning) rather than being a notice.
    pub fn is_warning(&self) -> bool {
        matches!(self, PlanNote::CbtMissedChange { .. })
    }

    /// The message for disk `disk`.
    pub fn message(&self, disk: &str) -> String {
        match self {
            PlanNote::NewDisk => format!("disk {disk:?} is new to the replica: copying it in full"),
            PlanNote::CbtMissedChange { chunk } => format!(
                "disk {disk:?}: changed block tracking missed a change (chunk {chunk} differs from the \
                 replica but is not in the change list); replicating this disk in digest mode"
            ),
        }
    }
}

/// The plan of one disk.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskPlan {
    /// How its chunks are chosen.
    pub mode: PlanMode,
    /// Chunks in the disk.
    pub chunk_count: u64,
    /// The chunks this run considers (digest, seed and full: all of them).
    pub wanted: ChunkSet,
    /// Of those, the ones still to read: a resumed session skips what the target holds.
    pub todo: ChunkSet,
    /// A resumed session's watermark: the chunks below it are not read again.
    pub resume_from: u64,
    /// Cbt: unchanged chunks to read and compare with the target's digests.
    pub samples: Vec<u64>,
    /// The target's digest map is needed (digest and seed: to compare; cbt: to check the samples).
    pub needs_digest_map: bool,
    /// Intent frames announce `todo` ahead of the data (cbt: the plan is what will be sent).
    pub announce: bool,
    /// What to tell the operator, in order.
    pub notes: Vec<PlanNote>,
}

impl DiskPlan {
    /// Whether each chunk read is compared with the target's digest (digest and seed).
    pub fn compares_digests(&self) -> bool {
        matches!(self.mode, PlanMode::Digest | PlanMode::Seed)
    }

    /// Chunks wanted that a resumed session skips.
    pub fn chunks_resumed(&self) -> u64 {
        self.wanted.count() - self.todo.count()
    }
}

/// The plan of a disk before its samples are checked.
///
/// # Panics
/// If the mode is cbt (asked, or auto with a change map) without a change map:
/// the caller rejects that before planning.
pub fn plan_disk(inputs: &DiskInputs) -> DiskPlan {
    let DiskInputs { chunk_size, disk_size, requested, change_map, target, .. } = *inputs;
    let chunk_count = chunk_count(chunk_size, disk_size);
    let mut notes = Vec::new();
    let mut mode = requested.unwrap_or(match (change_map, target.existed) {
        (Some(_), _) => PlanMode::Cbt,
        (None, true) => PlanMode::Digest,
        (None, false) => PlanMode::Full,
    });
    if !target.existed && mode != PlanMode::Full {
        notes.push(PlanNote::NewDisk);
        mode = PlanMode::Full;
    }
    let mut samples = Vec::new();
    let (wanted, needs_digest_map) = match mode {
        PlanMode::Full => (ChunkSet::all(chunk_count), false),
        PlanMode::Digest | PlanMode::Seed => (ChunkSet::all(chunk_count), true),
        PlanMode::Cbt => {
            let map = change_map.expect("cbt mode has a change list");
            // Chunks the target did not have (the disk grew; the old partial last chunk changed length).
            // Only a grown disk has them: a same-size disk's partial last chunk is not new.
            let grown = if target.previous_size < disk_size {
                ChunkSet::from_range(target.previous_size / u64::from(chunk_size)..chunk_count)
            } else {
                ChunkSet::new()
            };
            let changed = map.chunks(chunk_size, disk_size).union(&grown);
            if inputs.verify_samples > 0 {
                samples = sample_unchanged(&changed, chunk_count, inputs.verify_samples, inputs.seed);
            }
            (changed, inputs.verify_samples > 0)
        }
    };
    let resume_from = target.next_chunk;
    let todo = wanted.difference(&ChunkSet::from_range(0..resume_from));
    // A cbt plan is what will be sent (short of a few chunks equal to the replica's):
    // announcing it lets the target start saving old contents now.
    let announce = mode == PlanMode::Cbt && target.existed && !inputs.plan_only;
    DiskPlan { mode, chunk_count, wanted, todo, resume_from, samples, needs_digest_map, announce, notes }
}

/// The plan once its samples are read (`sampled[i]`: the digest of chunk
/// `plan.samples[i]`) and the target's map is in (`target`, one digest per
/// chunk): unchanged if every sample matches, else digest mode over every
/// chunk (a [`PlanNote::CbtMissedChange`] names the first mismatch).
pub fn check_samples(mut plan: DiskPlan, sampled: &[Digest], target: &crate::DigestMap) -> DiskPlan {
    let mismatch = plan.samples.iter().zip(sampled).find(|(&c, d)| target.get_raw(c) != **d);
    let Some((&chunk, _)) = mismatch else { return plan };
    plan.notes.push(PlanNote::CbtMissedChange { chunk });
    plan.mode = PlanMode::Digest;
    plan.wanted = ChunkSet::all(plan.chunk_count);
    plan.todo = plan.wanted.difference(&ChunkSet::from_range(0..plan.resume_from));
    plan.announce = false;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_span_the_mean_run_of_changed_chunks_when_every_disk_has_a_change_list() {
        // Runs as (first, end) pairs.
        let set = |r: &[(u64, u64)]| Some(ChunkSet::from_ranges(r.iter().map(|&(a, b)| a..b)));
        // 64 KiB chunks: at most 4 per read.
        assert_eq!(read_span(64 << 10, [set(&[(1, 2), (5, 6), (9, 10)])]), 1);
        assert_eq!(read_span(64 << 10, [set(&[(1, 2), (5, 7)]), set(&[(9, 10)])]), 2, "4 chunks in 3 runs");
        assert_eq!(read_span(64 << 10, [set(&[(0, 100)])]), 4);
        // A disk without a change list (digest or full mode) reads whole spans.
        assert_eq!(read_span(64 << 10, [set(&[(1, 2)]), None]), 4);
        // Nothing changed: whole spans (a fallback to digest mode reads everything).
        assert_eq!(read_span(64 << 10, [set(&[])]), 4);
        assert_eq!(read_span(1 << 20, [set(&[(0, 100)])]), 1);
    }

    #[test]
    fn splitmix64_reference_values() {
        // First outputs for seed 0 from the reference implementation.
        let mut s = 0;
        assert_eq!(splitmix64(&mut s), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(&mut s), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn sample_small_sets() {
        let changed = ChunkSet::from_range(2..8);
        assert_eq!(sample_unchanged(&changed, 10, 100, 1), vec![0, 1, 8, 9]);
        assert_eq!(sample_unchanged(&changed, 10, 0, 1), Vec::<u64>::new());
        assert!(sample_unchanged(&ChunkSet::all(10), 10, 5, 1).is_empty());
        assert!(sample_unchanged(&ChunkSet::new(), 0, 5, 1).is_empty());
    }

    #[test]
    fn sample_is_spread_and_deterministic() {
        let changed = ChunkSet::from_range(0..1000);
        let a = sample_unchanged(&changed, 101_000, 100, 42);
        assert_eq!(a, sample_unchanged(&changed, 101_000, 100, 42));
        assert_ne!(a, sample_unchanged(&changed, 101_000, 100, 43));
        assert_eq!(a.len(), 100);
        for (k, i) in a.iter().enumerate() {
            // Stratum k of the unchanged chunks 1000..101000 is 1000 + 1000k .. 1000 + 1000(k+1).
            assert!((1000 + 1000 * k as u64..2000 + 1000 * k as u64).contains(i), "{k}: {i}");
        }
    }
}
