//! A real file-system image built from this machine's own files, and a mutator
//! that edits, adds and deletes files inside it.
//!
//! The tree is a copy of regular files from /usr/share then /usr/lib, walked in
//! sorted order, until the files fill `fill` of the image (files larger than 8 MiB,
//! symlinks, special files and names that are not plain ASCII are skipped). Every
//! copied file and directory gets a fixed mtime/atime, and mke2fs runs with a
//! fixed UUID, hash seed and E2FSPROGS_FAKE_TIME, so the same machine gives the
//! same image except for inode change times (ctime cannot be set from user
//! space). A different machine (other /usr contents) gives a different image:
//! this image is about real data, not about bit-for-bit reproducibility.
//!
//! The mutator works in place with `debugfs -w` (rm + write for edits, write for
//! additions, rm for deletions), which, like a running guest, changes only the
//! blocks it touches. The changed-extent list is then derived by comparing the
//! old and new images block by block (`mutate::diff_extents`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::measure::shq;
use crate::rng::{derive_seed, Rng};

const FIXED_TIME: u64 = 1_700_000_000;
const MAX_FILE: u64 = 8 << 20;
const UUID: &str = "6f1d3a1e-5e2b-4c8a-9d7e-0f0e0d0c0b0a";

/// Roots the tree is copied from, in order.
pub const ROOTS: &[&str] = &["/usr/share", "/usr/lib"];

fn plain_name(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b)))
}

/// Space a file takes in the image: whole 4 KiB blocks plus its inode.
fn on_disk(len: u64) -> u64 {
    len.div_ceil(4096) * 4096 + 256
}

/// Copies up to `budget` bytes (counted as in-image space) of regular files from `ROOTS` into `dst`, sorted walk.
/// Returns the copied files (relative paths) and their total size.
pub fn copy_tree(dst: &Path, budget: u64) -> Result<(Vec<PathBuf>, u64)> {
    let mut files = Vec::new();
    let mut total = 0u64;
    for root in ROOTS {
        let root = Path::new(root);
        let name = root.file_name().map(PathBuf::from).unwrap_or_default();
        walk(root, &name, dst, budget, &mut total, &mut files)?;
        if total >= budget {
            break;
        }
    }
    Ok((files, total))
}

fn walk(src: &Path, rel: &Path, dst: &Path, budget: u64, total: &mut u64, files: &mut Vec<PathBuf>) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(src) else { return Ok(()) };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if *total >= budget {
            return Ok(());
        }
        if !plain_name(&p) {
            continue;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
        let r = rel.join(p.file_name().unwrap_or_default());
        if md.is_dir() {
            walk(&p, &r, dst, budget, total, files)?;
        } else if md.is_file() && md.len() <= MAX_FILE && *total + on_disk(md.len()) <= budget {
            let target = dst.join(&r);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if std::fs::copy(&p, &target).is_ok() {
                *total += on_disk(md.len());
                files.push(r);
            }
        }
    }
    Ok(())
}

/// Sets fixed times on everything under `dir` (children before parents).
pub fn fix_times(dir: &Path) -> Result<()> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(FIXED_TIME);
    let times = std::fs::FileTimes::new().set_accessed(t).set_modified(t);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            fix_times(&p)?;
        } else {
            std::fs::File::options().write(true).open(&p)?.set_times(times)?;
        }
    }
    std::fs::File::open(dir)?.set_times(times)?;
    Ok(())
}

fn count_entries(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()).map(|e| 1 + if e.path().is_dir() { count_entries(&e.path()) } else { 0 }).sum()
        })
        .unwrap_or(0)
}

/// Runs mke2fs to make an ext4 image of `size` bytes holding `tree`, with
/// inodes for the tree and as many again (small files are common in /usr).
pub fn make_image(tree: &Path, img: &Path, size: u64) -> Result<()> {
    let _ = std::fs::remove_file(img);
    let inodes = (count_entries(tree) * 2).max(size / (16 << 10)).max(1024);
    let out = Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", FIXED_TIME.to_string())
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-U", UUID, "-N", &inodes.to_string()])
        .arg("-E")
        .arg(format!("hash_seed={UUID},root_owner=0:0"))
        .arg("-d")
        .arg(tree)
        .arg(img)
        .arg(format!("{}k", size / 1024))
        .output()
        .context("running mke2fs (install e2fsprogs)")?;
    if !out.status.success() {
        bail!("mke2fs -d {} {} failed: {}", tree.display(), img.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Builds the ext4 image: copies files worth `fill` of `size` into `tree_dir`, then mke2fs.
pub fn build(tree_dir: &Path, img: &Path, size: u64, fill: f64) -> Result<Vec<PathBuf>> {
    let (files, _) = copy_tree(tree_dir, (size as f64 * fill) as u64)?;
    fix_times(tree_dir)?;
    make_image(tree_dir, img, size)?;
    Ok(files)
}

/// What the file-system mutator did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsChanges {
    /// Files rewritten with part of their content changed.
    pub edited: u64,
    /// New files.
    pub added: u64,
    /// Removed files.
    pub deleted: u64,
    /// File bytes written (edits and additions).
    pub bytes_written: u64,
}

/// Edits, adds and deletes files of `img` (in place, with debugfs -w) until about
/// `budget` file bytes were written: 60% of it as edits, 40% as new files, and
/// deletions of 1 file per 10 edited. `files` lists the image's files (relative
/// to its root), `work` is a scratch directory.
pub fn mutate_image(img: &Path, files: &[PathBuf], budget: u64, seed: u64, work: &Path) -> Result<FsChanges> {
    let mut rng = Rng::new(derive_seed(seed, 20, 0));
    let mut order: Vec<usize> = (0..files.len()).collect();
    rng.shuffle(&mut order);
    let mut cmds = String::new();
    let mut ch = FsChanges::default();
    let mut next = order.into_iter();
    let mut n = 0u64;
    std::fs::create_dir_all(work)?;
    let debugfs_path = |p: &Path| format!("\"/{}\"", p.display());
    // Edits: take the file from the image's source copy, change a quarter of it, rewrite it.
    while ch.bytes_written < budget * 6 / 10 {
        let Some(i) = next.next() else { break };
        let rel = &files[i];
        let local = work.join(format!("edit{n}"));
        n += 1;
        let status = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump {} {}", debugfs_path(rel), local.display()))
            .arg(img)
            .output()?;
        let Ok(mut data) = std::fs::read(&local) else { continue };
        if !status.status.success() || data.is_empty() {
            continue;
        }
        let len = (data.len() / 4).max(1);
        let at = rng.below((data.len() - len + 1) as u64) as usize;
        let mut r = Rng::new(derive_seed(seed, 21, i as u64));
        r.fill(&mut data[at..at + len]);
        std::fs::write(&local, &data)?;
        cmds.push_str(&format!("rm {}\nwrite {} {}\n", debugfs_path(rel), local.display(), debugfs_path(rel)));
        ch.edited += 1;
        ch.bytes_written += data.len() as u64;
        if ch.edited % 10 == 0 {
            if let Some(j) = next.next() {
                cmds.push_str(&format!("rm {}\n", debugfs_path(&files[j])));
                ch.deleted += 1;
            }
        }
    }
    // Additions: text-like files in a new directory.
    cmds.push_str("mkdir /bench-added\n");
    while ch.bytes_written < budget {
        let size = (16 << 10) + rng.below(240 << 10) as usize;
        let mut data = vec![0u8; size];
        crate::synth::fill_region(seed, 1_000_000 + ch.added, crate::synth::RegionKind::Text, &mut data);
        let local = work.join(format!("add{}", ch.added));
        std::fs::write(&local, &data)?;
        cmds.push_str(&format!("write {} /bench-added/f{}\n", local.display(), ch.added));
        ch.added += 1;
        ch.bytes_written += size as u64;
    }
    let cmdfile = work.join("debugfs.cmds");
    std::fs::File::create(&cmdfile)?.write_all(cmds.as_bytes())?;
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("debugfs -w -f {} {}", shq(&cmdfile), shq(img)))
        .env("E2FSPROGS_FAKE_TIME", (FIXED_TIME + 86_400).to_string())
        .output()
        .context("running debugfs -w")?;
    if !out.status.success() {
        bail!("debugfs -w on {} failed: {}", img.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(img).output().context("running e2fsck -fn")?;
    if !fsck.status.success() {
        bail!(
            "the mutated image {} does not pass e2fsck -fn: {}",
            img.display(),
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    Ok(ch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mutate::{diff_extents, extent_bytes};
    use crate::scratch::ScratchDir;

    #[test]
    fn ext4_image_builds_and_mutates() {
        if Command::new("mke2fs").arg("-V").output().is_err() || Command::new("debugfs").arg("-V").output().is_err() {
            eprintln!("skipped: e2fsprogs not installed");
            return;
        }
        let dir = ScratchDir::new("ext4-test").unwrap();
        let img = dir.path().join("fs.img");
        let files = build(&dir.path().join("tree"), &img, 32 << 20, 0.5).unwrap();
        assert!(!files.is_empty());
        let again = dir.path().join("fs2.img");
        make_image(&dir.path().join("tree"), &again, 32 << 20).unwrap();
        let old = dir.path().join("old.img");
        std::fs::copy(&img, &old).unwrap();
        let ch = mutate_image(&img, &files, 1 << 20, 3, &dir.path().join("w")).unwrap();
        assert!(ch.edited + ch.added > 0);
        let ext = diff_extents(&old, &img, 4096).unwrap();
        let changed = extent_bytes(&ext);
        assert!((1 << 19..8 << 20).contains(&changed), "changed {changed} bytes for {ch:?}");
    }
}
