//! Block mutators and changed-extent lists.
//!
//! `mutate_blocks` changes exactly the requested number of blocks of an image in
//! place (every byte of a chosen block changes: it is XORed with non-zero random
//! bytes) and returns the changed extents: the input changed block tracking would
//! give, in ferry's generic CBT format `[{"offset":..,"length":..}]` (sorted,
//! coalesced). `diff_extents` derives the same list by comparing two images block
//! by block; the file-system mutator uses it, and the tests check one against the
//! other.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::rng::{derive_seed, Rng};

/// One changed byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Byte offset in the disk.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// How changed blocks are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Every block equally likely.
    Uniform,
    /// Runs of 32 consecutive blocks (like files or database pages written together).
    Clustered,
}

/// Blocks in a run for `Placement::Clustered`.
pub const CLUSTER_BLOCKS: u64 = 32;

/// Sums extent lengths.
pub fn extent_bytes(ext: &[Extent]) -> u64 {
    ext.iter().map(|e| e.length).sum()
}

/// Appends an extent, merging it with the last one when they touch.
fn push_coalesced(v: &mut Vec<Extent>, offset: u64, length: u64) {
    if let Some(last) = v.last_mut() {
        if last.offset + last.length == offset {
            last.length += length;
            return;
        }
    }
    v.push(Extent { offset, length });
}

/// Chooses `count` distinct block indices out of `nblocks`, sorted.
pub fn choose_blocks(nblocks: u64, count: u64, placement: Placement, seed: u64) -> Result<Vec<u64>> {
    if count > nblocks {
        bail!("cannot change {count} blocks of an image that has {nblocks}");
    }
    let mut rng = Rng::new(derive_seed(seed, 10, 0));
    let mut marked = vec![false; nblocks as usize];
    let mut left = count;
    match placement {
        Placement::Uniform => {
            // Partial Fisher-Yates over the indices.
            let mut idx: Vec<u64> = (0..nblocks).collect();
            for i in 0..count as usize {
                let j = i + rng.below(nblocks - i as u64) as usize;
                idx.swap(i, j);
                marked[idx[i] as usize] = true;
            }
            left = 0;
        }
        Placement::Clustered => {
            let mut attempts = 0u64;
            while left > 0 && attempts < 64 * (count + 1) {
                attempts += 1;
                let start = rng.below(nblocks);
                for b in start..(start + CLUSTER_BLOCKS).min(nblocks) {
                    if left == 0 {
                        break;
                    }
                    if !marked[b as usize] {
                        marked[b as usize] = true;
                        left -= 1;
                    }
                }
            }
        }
    }
    // Dense requests may leave a few blocks unplaced by random starts: take the
    // first unmarked ones so the count is always exact.
    for m in marked.iter_mut() {
        if left == 0 {
            break;
        }
        if !*m {
            *m = true;
            left -= 1;
        }
    }
    Ok(marked.iter().enumerate().filter(|(_, m)| **m).map(|(i, _)| i as u64).collect())
}

/// The number of blocks `share` of an image of `size` bytes means (rounded, at least one if share > 0).
pub fn blocks_for_share(size: u64, block: u64, share: f64) -> u64 {
    let n = size.div_ceil(block);
    if share <= 0.0 {
        return 0;
    }
    ((share * n as f64).round() as u64).clamp(1, n)
}

/// Changes `count` blocks of `path` in place; returns the changed extents.
pub fn mutate_blocks(path: &Path, block: u64, count: u64, placement: Placement, seed: u64) -> Result<Vec<Extent>> {
    if block == 0 {
        bail!("block size must be positive");
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} to mutate it", path.display()))?;
    let size = f.metadata()?.len();
    let nblocks = size.div_ceil(block);
    let chosen = choose_blocks(nblocks, count, placement, seed)?;
    let mut buf = vec![0u8; block as usize];
    let mut noise = vec![0u8; block as usize];
    let mut extents = Vec::new();
    for b in chosen {
        let off = b * block;
        let len = block.min(size - off) as usize;
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut buf[..len]).with_context(|| format!("reading block at {off} of {}", path.display()))?;
        Rng::new(derive_seed(seed, 11, b)).fill(&mut noise[..len]);
        for (x, n) in buf[..len].iter_mut().zip(&noise[..len]) {
            *x ^= if *n == 0 { 0xA5 } else { *n };
        }
        f.seek(SeekFrom::Start(off))?;
        f.write_all(&buf[..len]).with_context(|| format!("writing block at {off} of {}", path.display()))?;
        push_coalesced(&mut extents, off, len as u64);
    }
    f.sync_all()?;
    Ok(extents)
}

/// Compares two images block by block and returns the extents that differ
/// (a size difference counts as changed bytes up to the longer length).
pub fn diff_extents(a: &Path, b: &Path, block: u64) -> Result<Vec<Extent>> {
    let open = |p: &Path| -> Result<(BufReader<File>, u64)> {
        let f = File::open(p).with_context(|| format!("opening {} to compare it", p.display()))?;
        let len = f.metadata()?.len();
        Ok((BufReader::with_capacity(1 << 20, f), len))
    };
    let (mut ra, la) = open(a)?;
    let (mut rb, lb) = open(b)?;
    let total = la.max(lb);
    let (mut ba, mut bb) = (vec![0u8; block as usize], vec![0u8; block as usize]);
    let mut extents = Vec::new();
    let mut off = 0;
    while off < total {
        let len = block.min(total - off) as usize;
        let na = read_upto(&mut ra, &mut ba[..len])?;
        let nb = read_upto(&mut rb, &mut bb[..len])?;
        ba[na..len].fill(0);
        bb[nb..len].fill(0);
        if na != nb || ba[..len] != bb[..len] {
            push_coalesced(&mut extents, off, len as u64);
        }
        off += len as u64;
    }
    Ok(extents)
}

/// True when both files have the same length and bytes.
pub fn files_identical(a: &Path, b: &Path) -> Result<bool> {
    let la = std::fs::metadata(a).with_context(|| format!("reading {}", a.display()))?.len();
    let lb = std::fs::metadata(b).with_context(|| format!("reading {}", b.display()))?.len();
    Ok(la == lb && diff_extents(a, b, 1 << 20)?.is_empty())
}

fn read_upto(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Writes an extent list as JSON.
pub fn write_extents(path: &Path, ext: &[Extent]) -> Result<()> {
    let s = serde_json::to_string(ext)?;
    std::fs::write(path, s).with_context(|| format!("writing extent list {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;
    use crate::synth::{generate, SynthSpec};

    fn image(dir: &ScratchDir, name: &str, size: u64) -> std::path::PathBuf {
        let p = dir.path().join(name);
        generate(&SynthSpec::standard(size, 5), &p).unwrap();
        p
    }

    #[test]
    fn mutators_change_exactly_the_requested_blocks() {
        let dir = ScratchDir::new("mutate-test").unwrap();
        let size = (8 << 20) + 12345;
        let block = 64 << 10;
        for placement in [Placement::Uniform, Placement::Clustered] {
            for share in [0.01, 0.10, 0.5] {
                let base = image(&dir, "base", size);
                let new = dir.path().join("new");
                std::fs::copy(&base, &new).unwrap();
                let count = blocks_for_share(size, block, share);
                let ext = mutate_blocks(&new, block, count, placement, 9).unwrap();
                let diff = diff_extents(&base, &new, block).unwrap();
                assert_eq!(ext, diff, "{placement:?} {share}");
                let changed_blocks: u64 = ext.iter().map(|e| e.length.div_ceil(block)).sum();
                assert_eq!(changed_blocks, count, "{placement:?} {share}");
                // A second run with the same seed makes the same choice.
                assert_eq!(
                    choose_blocks(129, 13, placement, 4).unwrap(),
                    choose_blocks(129, 13, placement, 4).unwrap()
                );
            }
        }
    }

    #[test]
    fn clustered_blocks_come_in_runs() {
        let chosen = choose_blocks(10_000, 320, Placement::Clustered, 1).unwrap();
        let runs = chosen.windows(2).filter(|w| w[1] != w[0] + 1).count() + 1;
        assert!(runs <= 20, "{runs} runs");
        assert_eq!(choose_blocks(10, 10, Placement::Clustered, 1).unwrap().len(), 10);
        assert!(choose_blocks(10, 11, Placement::Uniform, 1).is_err());
    }

    #[test]
    fn extent_json_is_the_generic_cbt_format() {
        let e = vec![Extent { offset: 0, length: 65536 }];
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"[{"offset":0,"length":65536}]"#);
    }
}
