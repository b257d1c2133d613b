//! The images and the scenarios: which tools run where, the synthetic and
//! ext4 images, their mutated versions (blocks or files changed, with the
//! changed-extent lists), seeds, several disks at once and the WAN copy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use super::harness::{file_name, run_quiet};
use super::RunArgs;
use crate::ext4;
use crate::measure::shq;
use crate::mutate::{self, extent_bytes, Placement};
use crate::netns::Shape;
use crate::report::{ImageInfo, Skip};
use crate::synth::{self, SynthSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Full,
    Cbt,
    Digest,
    Seed,
    Multi,
    Wan,
    /// A full copy to `ferry serve` over TLS (`ferry`) against `--insecure-plaintext`
    /// on both ends (`ferry-plaintext`), alternating in the same run.
    Transport,
}

#[derive(Debug)]
pub(super) struct Scenario {
    pub(super) id: String,
    pub(super) description: String,
    pub(super) kind: Kind,
    /// (disk name, source image).
    pub(super) sources: Vec<(String, PathBuf)>,
    /// The target's previous state per disk (incrementals, seeding).
    pub(super) previous: Vec<PathBuf>,
    /// Changed-extent lists per disk (cbt).
    pub(super) cbt: Vec<PathBuf>,
    pub(super) changed_bytes: Option<u64>,
    /// WAN scenarios: the emulated link (rate, one-way delay) the networked tools run over.
    pub(super) link: Option<Shape>,
}

impl Scenario {
    pub(super) fn logical(&self) -> u64 {
        self.sources.iter().map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len())).sum()
    }

    pub(super) fn tools(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::Full => &["ferry", "rsync", "zstd-nc", "nc", "qemu-img", "cp", "nbdcopy", "bdsync"],
            Kind::Cbt | Kind::Digest | Kind::Seed => &["ferry", "rsync", "bdsync"],
            Kind::Multi => &["ferry", "rsync", "zstd-nc"],
            Kind::Wan => &["ferry", "zstd-nc", "zstd3-nc", "rsync", "iperf3"],
            Kind::Transport => &["ferry", "ferry-plaintext"],
        }
    }
}

pub(super) struct Built {
    pub(super) images: Vec<ImageInfo>,
    pub(super) scenarios: Vec<Scenario>,
}

pub(super) fn wanted(filters: &[String], id: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| id.starts_with(f.as_str()))
}

pub(super) fn copy_sparse(a: &Path, b: &Path) -> Result<()> {
    run_quiet(&format!("cp --sparse=always {} {}", shq(a), shq(b)))
}

/// Makes the images and the scenario list.
pub(super) fn build(
    a: &RunArgs,
    dir: &Path,
    sizes: (u64, u64, u64),
    skipped: &mut Vec<Skip>,
    wan_ok: bool,
) -> Result<Built> {
    let (synth_size, fs_size, wan_size) = sizes;
    let mut images = Vec::new();
    let mut scenarios = Vec::new();
    let mut families: Vec<(&str, PathBuf)> = Vec::new();
    let s = synth_spec(a, synth_size, a.seed);
    let synth_img = dir.join("synth.img");
    eprintln!("ferry-bench: generating {} ({} MiB)", synth_img.display(), synth_size >> 20);
    synth::generate(&s, &synth_img)?;
    images.push(ImageInfo { name: "synth".into(), bytes: synth_size, description: describe_synth(&s) });
    families.push(("synth", synth_img.clone()));
    let mut ext4_files = Vec::new();
    let ext4_wanted = !a.no_ext4
        && (a.scenarios.is_empty()
            || a.scenarios.iter().any(|f| f.contains("ext4") || f.starts_with("multi") || !f.contains('/')));
    if ext4_wanted {
        let img = dir.join("ext4.img");
        eprintln!("ferry-bench: building {} ({} MiB) from {:?}", img.display(), fs_size >> 20, ext4::ROOTS);
        let tree = dir.join("ext4-tree");
        std::fs::create_dir_all(&tree)?;
        match ext4::build(&tree, &img, fs_size, 0.7) {
            Ok(files) => {
                images.push(ext4_info(fs_size, files.len()));
                ext4_files = files;
                families.push(("ext4", img));
                let _ = std::fs::remove_dir_all(&tree);
            }
            Err(e) => skipped.push(Skip { scenario: Some("*/ext4".into()), tool: None, reason: format!("{e:#}") }),
        }
    }
    for (fam, base) in &families {
        scenarios.extend(family_scenarios(a, dir, fam, base, &ext4_files)?);
    }
    if wanted(&a.scenarios, "multi-3") {
        scenarios.push(multi_scenario(a, dir, synth_size, &families)?);
    }
    if wan_ok {
        wan_scenarios(a, dir, wan_size, &synth_img, &mut images, &mut scenarios, skipped)?;
    }
    Ok(Built { images, scenarios })
}

/// The synthetic image spec of the run's flags, at `size` with `seed`.
fn synth_spec(a: &RunArgs, size: u64, seed: u64) -> SynthSpec {
    SynthSpec { size, seed, zero: a.zero, random: a.random, text: a.text, fs: a.fs, region: synth::DEFAULT_REGION }
}

/// What a synthetic image holds, for the report.
fn describe_synth(s: &SynthSpec) -> String {
    format!(
        "synthetic, seed {}: {:.0}% zero, {:.0}% incompressible, {:.0}% text-like, {:.0}% file-system-like, in shuffled 1 MiB regions",
        s.seed,
        s.zero * 100.0,
        s.random * 100.0,
        s.text * 100.0,
        s.fs * 100.0
    )
}

/// The report entry of the ext4 image.
fn ext4_info(fs_size: u64, files: usize) -> ImageInfo {
    ImageInfo {
        name: "ext4".into(),
        bytes: fs_size,
        description: format!(
            "ext4 (mke2fs -t ext4 -b 4096 -d) holding {files} files copied from {:?}, filling ~70%",
            ext4::ROOTS
        ),
    }
}

/// The single-disk scenarios of one image family: full, the incrementals
/// (cbt and digest at 1% and 10% changed) and seeding.
fn family_scenarios(a: &RunArgs, dir: &Path, fam: &str, base: &Path, ext4_files: &[PathBuf]) -> Result<Vec<Scenario>> {
    let mut scenarios = Vec::new();
    let size = std::fs::metadata(base)?.len();
    let one =
        |id: &str, kind, src: PathBuf, prev: Option<PathBuf>, cbt: Option<PathBuf>, changed, desc: String| Scenario {
            id: format!("{id}/{fam}"),
            description: desc,
            kind,
            sources: vec![("disk0".into(), src)],
            previous: prev.into_iter().collect(),
            cbt: cbt.into_iter().collect(),
            changed_bytes: changed,
            link: None,
        };
    if wanted(&a.scenarios, &format!("tls/{fam}")) && fam == "synth" {
        scenarios.push(one(
            "tls",
            Kind::Transport,
            base.to_path_buf(),
            None,
            None,
            None,
            format!("Full copy of the {fam} image to ferry serve over TLS 1.3 (ferry, the default) and with --insecure-plaintext on both ends (ferry-plaintext), alternating."),
        ));
    }
    if wanted(&a.scenarios, &format!("full/{fam}")) {
        scenarios.push(one(
            "full",
            Kind::Full,
            base.to_path_buf(),
            None,
            None,
            None,
            format!("Full copy of the {fam} image to an empty target."),
        ));
    }
    for pct in [1u32, 10] {
        let ids = [format!("cbt-{pct}/{fam}"), format!("digest-{pct}/{fam}")];
        if !ids.iter().any(|i| wanted(&a.scenarios, i)) {
            continue;
        }
        let new = dir.join(format!("{fam}-{pct}.img"));
        let ext = dir.join(format!("{fam}-{pct}.json"));
        copy_sparse(base, &new)?;
        let how = mutate_family(a, dir, fam, base, &new, &ext, size, pct, ext4_files)?;
        let changed = extent_bytes(&serde_json::from_str::<Vec<mutate::Extent>>(&std::fs::read_to_string(&ext)?)?);
        for (kind, id, what) in [
            (Kind::Cbt, "cbt", "with the changed-extent list (CBT)"),
            (Kind::Digest, "digest", "without CBT (digest comparison)"),
        ] {
            if wanted(&a.scenarios, &format!("{id}-{pct}/{fam}")) {
                scenarios.push(one(&format!("{id}-{pct}"), kind, new.clone(), Some(base.to_path_buf()), Some(ext.clone()), Some(changed), format!("Incremental {what}: the target holds the previous version; {how}. rsync gets the same previous version and uses its delta algorithm.")));
            }
        }
    }
    if wanted(&a.scenarios, &format!("seed-95/{fam}")) {
        let seed_img = dir.join(format!("{fam}-seed95.img"));
        copy_sparse(base, &seed_img)?;
        let n = mutate::blocks_for_share(size, a.block_size, 0.05);
        let e = mutate::mutate_blocks(&seed_img, a.block_size, n, Placement::Uniform, a.seed + 95)?;
        scenarios.push(one("seed-95", Kind::Seed, base.to_path_buf(), Some(seed_img), None, Some(extent_bytes(&e)), format!("Seeding: the target already holds a copy of the {fam} image with 5% of its {} KiB blocks different, placed by other means (copied to DATASTORE/REPLICA/disks/disk0.img with no digests; rsync's module holds the same copy); ferry runs --mode seed.", a.block_size >> 10)));
    }
    Ok(scenarios)
}

/// Changes `pct`% of `new` (a copy of `base`, `size` bytes) and writes its
/// changed extents to `ext`: blocks for the synthetic image, files (debugfs)
/// for ext4. Returns how, for the scenario's description.
#[allow(clippy::too_many_arguments)]
fn mutate_family(
    a: &RunArgs,
    dir: &Path,
    fam: &str,
    base: &Path,
    new: &Path,
    ext: &Path,
    size: u64,
    pct: u32,
    ext4_files: &[PathBuf],
) -> Result<String> {
    Ok(if fam == "synth" {
        let n = mutate::blocks_for_share(size, a.block_size, f64::from(pct) / 100.0);
        let e = mutate::mutate_blocks(new, a.block_size, n, a.placement, a.seed + u64::from(pct))?;
        mutate::write_extents(ext, &e)?;
        format!("{pct}% of the {} KiB blocks changed ({:?})", a.block_size >> 10, a.placement)
    } else {
        let ch = ext4::mutate_image(
            new,
            ext4_files,
            size * u64::from(pct) / 100,
            a.seed + u64::from(pct),
            &dir.join("fs-mutate"),
        )?;
        let e = mutate::diff_extents(base, new, 4096)?;
        mutate::write_extents(ext, &e)?;
        format!(
            "files changed with debugfs: {} edited, {} added, {} deleted ({} MiB written, about {pct}% of the image); CBT list from a 4 KiB block comparison",
            ch.edited,
            ch.added,
            ch.deleted,
            ch.bytes_written >> 20
        )
    })
}

/// Three disks at once: the image families plus synthetic images to make three.
fn multi_scenario(a: &RunArgs, dir: &Path, synth_size: u64, families: &[(&str, PathBuf)]) -> Result<Scenario> {
    let extra = dir.join("synth-b.img");
    synth::generate(&synth_spec(a, synth_size, a.seed + 1), &extra)?;
    let mut disks: Vec<PathBuf> = families.iter().map(|(_, p)| p.clone()).collect();
    disks.push(extra);
    if disks.len() < 3 {
        let c = dir.join("synth-c.img");
        synth::generate(&synth_spec(a, synth_size, a.seed + 3), &c)?;
        disks.push(c);
    }
    let sources: Vec<(String, PathBuf)> =
        disks.iter().enumerate().map(|(i, p)| (format!("disk{i}"), p.clone())).collect();
    Ok(Scenario {
        id: "multi-3".into(),
        description: format!(
            "Three disks at once ({}), full, to an empty target; zstd-nc runs three pipelines in parallel.",
            disks.iter().map(|p| file_name(p)).collect::<Vec<_>>().join(", ")
        ),
        kind: Kind::Multi,
        sources,
        previous: vec![],
        cbt: vec![],
        changed_bytes: None,
        link: None,
    })
}

/// The WAN scenarios (issue 18), over the emulated link of netns.rs: `wan-100m` (the WAN
/// image, `--wan-size`, 512 MiB by default, at 100 Mbit/s and 50 ms RTT), `wan-1g` (an image
/// 4x that, 2 GiB by default, at 1 Gbit/s and 100 ms RTT) and `wan-cbt` (1% of the synthetic
/// image's blocks changed, with CBT, at 100 Mbit/s and 50 ms RTT). Only `wan-100m` is in
/// `--quick` (with a 48 MiB image): the others take minutes.
fn wan_scenarios(
    a: &RunArgs,
    dir: &Path,
    wan_size: u64,
    synth_img: &Path,
    images: &mut Vec<ImageInfo>,
    scenarios: &mut Vec<Scenario>,
    skipped: &mut Vec<Skip>,
) -> Result<()> {
    let ms = Duration::from_millis;
    let slow = Shape { rate_bps: 100_000_000, one_way: ms(25) };
    let fast = Shape { rate_bps: 1_000_000_000, one_way: ms(50) };
    let link_text = |s: &Shape| {
        format!(
            "{} Mbit/s, {} ms RTT: two network namespaces joined by TUN devices and a packet-level delay line (TCP end to end, drop-tail queue of one BDP); wire bytes counted by a proxy in front of the receiver; ferry over TLS (the default)",
            s.rate_bps / 1_000_000,
            s.one_way.as_millis() * 2
        )
    };
    let full = |id: &str, img: PathBuf, link: Shape| Scenario {
        id: id.into(),
        description: format!("Full copy over an emulated WAN, {}.", link_text(&link)),
        kind: Kind::Wan,
        sources: vec![("disk0".into(), img)],
        previous: vec![],
        cbt: vec![],
        changed_bytes: None,
        link: Some(link),
    };
    if wanted(&a.scenarios, "wan-100m") {
        let img = dir.join("wan.img");
        let s = synth_spec(a, wan_size, a.seed + 2);
        synth::generate(&s, &img)?;
        images.push(ImageInfo { name: "wan".into(), bytes: wan_size, description: describe_synth(&s) });
        scenarios.push(full("wan-100m", img, slow));
    }
    for (id, why) in [("wan-1g", "a 2 GiB copy at 1 Gbit/s"), ("wan-cbt", "a 4 GiB image's incremental")] {
        if a.quick && wanted(&a.scenarios, id) {
            skipped.push(Skip {
                scenario: Some(id.into()),
                tool: None,
                reason: format!("not in --quick ({why}: minutes, not seconds)"),
            });
        }
    }
    if a.quick {
        return Ok(());
    }
    if wanted(&a.scenarios, "wan-1g") {
        let img = dir.join("wan-1g.img");
        let size = wan_size * 4;
        let s = synth_spec(a, size, a.seed + 4);
        eprintln!("ferry-bench: generating {} ({} MiB)", img.display(), size >> 20);
        synth::generate(&s, &img)?;
        images.push(ImageInfo { name: "wan-1g".into(), bytes: size, description: describe_synth(&s) });
        scenarios.push(full("wan-1g", img, fast));
    }
    if wanted(&a.scenarios, "wan-cbt") {
        let new = dir.join("wan-cbt.img");
        let ext = dir.join("wan-cbt.json");
        copy_sparse(synth_img, &new)?;
        let size = std::fs::metadata(synth_img)?.len();
        let n = mutate::blocks_for_share(size, a.block_size, 0.01);
        let e = mutate::mutate_blocks(&new, a.block_size, n, a.placement, a.seed + 101)?;
        mutate::write_extents(&ext, &e)?;
        scenarios.push(Scenario {
            id: "wan-cbt".into(),
            description: format!(
                "Incremental with the changed-extent list (CBT) of the `synth` image ({} MiB), 1% of its {} KiB blocks changed ({:?}), over an emulated WAN, {}. rsync gets the previous version and uses its delta algorithm. The ideal: the changed bytes compressed by `zstd` at the level ferry used most, at the link rate.",
                size >> 20,
                a.block_size >> 10,
                a.placement,
                link_text(&slow)
            ),
            kind: Kind::Cbt,
            sources: vec![("disk0".into(), new)],
            previous: vec![synth_img.to_path_buf()],
            cbt: vec![ext],
            changed_bytes: Some(extent_bytes(&e)),
            link: Some(slow),
        });
    }
    Ok(())
}
