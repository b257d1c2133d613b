//! ferry-bench: ferry's benchmark harness.
//!
//! It makes deterministic test images (synthetic, and ext4 from this machine's
//! own files), mutates them the way a running guest would (changing a share of
//! blocks, or files), and measures ferry against the tools its users would pick
//! instead (rsync, zstd | nc, nc, qemu-img, cp, nbdcopy) on the same data in the
//! same run, alternating runs. Every result is checked byte for byte. Output:
//! results.json (schema `ferry-bench/1`, see bench/README.md), results.md and
//! results.svg.
//!
//! ferry is driven as a subprocess through its CLI contract (README.md: usage, events, exit codes), so the
//! harness measures exactly what a user runs. Entry point: [`main_with_args`],
//! which the ferry CLI exposes as `ferry bench` and the `ferry-bench` binary calls.
//!
//! It has no `unsafe`: its system calls (wait4 with resource usage, signals to
//! process groups, setns, splice) are ferry-io's safe functions.
#![forbid(unsafe_code)]

pub mod ext4;
pub mod measure;
pub mod mutate;
pub mod netns;
pub mod proxy;
pub mod report;
pub mod rng;
pub mod run;
pub mod scratch;
pub mod synth;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// Benchmark ferry against rsync, zstd|nc, nc, qemu-img, cp and nbdcopy on the same data.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench", args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: run::RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes a deterministic synthetic image.
    GenSynth(GenSynthArgs),
    /// Builds an ext4 image from a copy of this machine's /usr files.
    GenExt4(GenExt4Args),
    /// Changes a share of an image's blocks in place and writes the changed-extent list.
    Mutate(MutateArgs),
    /// Compares two images block by block and writes the extents that differ.
    Diff(DiffArgs),
}

#[derive(Debug, Args)]
struct GenSynthArgs {
    /// Output image.
    #[arg(long)]
    out: PathBuf,
    /// Size, e.g. 4G, 256M, 1048576.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 0.30)]
    zero: f64,
    #[arg(long, default_value_t = 0.20)]
    random: f64,
    #[arg(long, default_value_t = 0.25)]
    text: f64,
    #[arg(long, default_value_t = 0.25)]
    fs: f64,
    /// Region size.
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    region: u64,
}

#[derive(Debug, Args)]
struct GenExt4Args {
    /// Output image.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Share of the image filled with files.
    #[arg(long, default_value_t = 0.7)]
    fill: f64,
    /// Where the copied tree goes (kept; needed by the file-system mutator).
    #[arg(long)]
    tree: PathBuf,
}

#[derive(Debug, Args)]
struct MutateArgs {
    /// Image changed in place.
    #[arg(long)]
    image: PathBuf,
    /// Share of blocks to change (0.01 = 1%).
    #[arg(long)]
    share: f64,
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    block_size: u64,
    #[arg(long, value_enum, default_value = "uniform")]
    placement: mutate::Placement,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Changed-extent list (JSON) output.
    #[arg(long)]
    extents: PathBuf,
}

#[derive(Debug, Args)]
struct DiffArgs {
    old: PathBuf,
    new: PathBuf,
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    block_size: u64,
    /// Extent list output (JSON).
    #[arg(long)]
    extents: PathBuf,
}

/// Parses sizes like `4G`, `256M`, `64K`, `512` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (examples: 4G, 256M, 65536)"))
}

/// Runs ferry-bench with `args` as from `std::env::args()`: the first element is
/// the program name (e.g. `ferry bench` or `ferry-bench`), the rest are flags.
/// Returns exit code 0 when everything ran and every result was byte-identical,
/// 1 when a run failed or differed, 2 for usage errors (printed by clap).
pub fn main_with_args(args: Vec<String>) -> Result<ExitCode> {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return Ok(ExitCode::from(code));
        }
    };
    match cli.command {
        None => run::run(cli.run),
        Some(Command::GenSynth(a)) => {
            let spec = synth::SynthSpec {
                size: a.size,
                seed: a.seed,
                zero: a.zero,
                random: a.random,
                text: a.text,
                fs: a.fs,
                region: a.region,
            };
            synth::generate(&spec, &a.out)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::GenExt4(a)) => {
            std::fs::create_dir_all(&a.tree).with_context(|| format!("creating {}", a.tree.display()))?;
            let files = ext4::build(&a.tree, &a.out, a.size, a.fill)?;
            eprintln!("{}: ext4 image with {} files from {:?}", a.out.display(), files.len(), ext4::ROOTS);
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Mutate(a)) => {
            let size = std::fs::metadata(&a.image).with_context(|| format!("reading {}", a.image.display()))?.len();
            let n = mutate::blocks_for_share(size, a.block_size, a.share);
            let ext = mutate::mutate_blocks(&a.image, a.block_size, n, a.placement, a.seed)?;
            mutate::write_extents(&a.extents, &ext)?;
            eprintln!("changed {n} blocks ({} bytes in {} extents)", mutate::extent_bytes(&ext), ext.len());
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Diff(a)) => {
            let ext = mutate::diff_extents(&a.old, &a.new, a.block_size)?;
            mutate::write_extents(&a.extents, &ext)?;
            eprintln!("{} bytes differ in {} extents", mutate::extent_bytes(&ext), ext.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn cli_parses() {
        Cli::try_parse_from(["ferry-bench", "--quick", "--out", "/tmp/x"]).unwrap();
        Cli::try_parse_from(["ferry-bench", "mutate", "--image", "a", "--share", "0.01", "--extents", "e"]).unwrap();
        assert!(Cli::try_parse_from(["ferry-bench", "--quick", "--full"]).is_err());
    }
}
