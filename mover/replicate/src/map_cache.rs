//! The source's cache of target digest maps, so that a digest-mode run over
//! a WAN does not download a map it already knows.
//!
//! One file per (target, replica, disk) in a cache directory (default
//! `$XDG_CACHE_HOME/ferry/maps`, else `$HOME/.cache/ferry/maps`), named by
//! the hex BLAKE3 of those three (see [`MapCache::path`]); its content is the
//! planner's [`DigestMap`] encoding, versioned and checksummed.
//!
//! The cache is a hint, never trusted: a file is offered to the target by its
//! map hash (DigestMapRequest.cached_map_hash) and used only when the target
//! answers `cache_hit` for exactly that hash. A missing, truncated, corrupt
//! or foreign file is a miss, never an error. After a committed run the
//! source writes the map it knows the target now holds (streamed chunk by
//! chunk as the run goes, see [`MapCacheWriter`]), to a temporary file renamed
//! into place, so a reader sees either the old file or the new one. It is not
//! fsynced: a file torn by a crash fails its checksum and is a miss.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ferry_planner::{Digest, DigestMap, DigestMapEncoder};

/// Where a source caches digest maps, and which target they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapCache {
    dir: PathBuf,
    target: String,
}

impl MapCache {
    /// A cache in `dir` for maps of the target known as `target` (e.g.
    /// `ferry://host:7420`, or `dir:/abs/path` for a local datastore).
    pub fn new(dir: impl Into<PathBuf>, target: impl Into<String>) -> MapCache {
        MapCache { dir: dir.into(), target: target.into() }
    }

    /// The default cache directory: `$XDG_CACHE_HOME/ferry/maps`, else
    /// `$HOME/.cache/ferry/maps` (relative or empty variables are ignored, as
    /// the XDG spec says); `None` when neither is set.
    pub fn default_dir() -> Option<PathBuf> {
        let abs = |v: &str| std::env::var_os(v).map(PathBuf::from).filter(|p| p.is_absolute());
        abs("XDG_CACHE_HOME").or_else(|| abs("HOME").map(|h| h.join(".cache"))).map(|c| c.join("ferry").join("maps"))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache file of `disk` of `replica` at this target: `HEX.map`, HEX
    /// being the BLAKE3 (keyed by a fixed context) of the length-prefixed
    /// target, replica and disk names.
    pub fn path(&self, replica: &str, disk: &str) -> PathBuf {
        let mut h = blake3::Hasher::new_derive_key("ferry v1 digest map cache file name");
        for part in [self.target.as_str(), replica, disk] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        self.dir.join(format!("{}.map", h.finalize().to_hex()))
    }

    /// The cached map of `disk` and its map hash, if there is an intact one of
    /// this chunk and disk size (anything else is a miss).
    pub fn load(&self, replica: &str, disk: &str, chunk_size: u32, disk_size: u64) -> Option<(DigestMap, Digest)> {
        let path = self.path(replica, disk);
        // The canonical encoding (its trailer is the map hash), read page by page: a page
        // of holes keeps no digests, and the file is never held whole.
        let want = ferry_datastore::digests::canonical_len(chunk_size, disk_size);
        let f = File::open(&path).ok()?;
        if f.metadata().ok()?.len() != want {
            return None;
        }
        let mut r = std::io::BufReader::with_capacity(256 << 10, f);
        let mut header = [0u8; ferry_planner::digest_map::DIGEST_MAP_HEADER_LEN];
        std::io::Read::read_exact(&mut r, &mut header).ok()?;
        let (map, hash) = ferry_datastore::digests::read_canonical(&path.display().to_string(), &mut r, &header, want)?;
        if map.chunk_size() != chunk_size || map.disk_size() != disk_size {
            return None;
        }
        Some((map, hash))
    }

    /// Start writing the map of `disk`: digests are pushed in chunk order;
    /// [`MapCacheWriter::commit`] puts the file in place.
    pub fn writer(
        &self,
        replica: &str,
        disk: &str,
        chunk_size: u32,
        disk_size: u64,
    ) -> std::io::Result<MapCacheWriter> {
        let enc = DigestMapEncoder::new(chunk_size, disk_size).map_err(std::io::Error::other)?;
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(replica, disk);
        let tmp = self.dir.join(format!(
            ".{}.{}-{}.tmp",
            path.file_name().expect("file name").to_string_lossy(),
            std::process::id(),
            ferry_datastore::store::now_ns()
        ));
        let mut out = BufWriter::with_capacity(256 << 10, File::create(&tmp)?);
        let written = out.write_all(enc.header());
        let w = MapCacheWriter { out: Some(out), enc, tmp, path, incomplete: false, io_error: None };
        match written {
            Ok(()) => Ok(w),
            Err(e) => Err(e), // `w` is dropped: the temporary file goes
        }
    }

    /// Remove the cached map of `disk` (it is known to be stale).
    pub fn remove(&self, replica: &str, disk: &str) {
        let _ = std::fs::remove_file(self.path(replica, disk));
    }
}

/// A cache file being written: the map the target will hold once the run
/// commits, one digest per chunk in chunk order. Dropped without
/// [`MapCacheWriter::commit`], it removes its temporary file.
#[derive(Debug)]
pub struct MapCacheWriter {
    out: Option<BufWriter<File>>,
    enc: DigestMapEncoder,
    tmp: PathBuf,
    path: PathBuf,
    /// The map is not known for certain (a chunk's digest is missing).
    incomplete: bool,
    /// Writing the file failed.
    io_error: Option<std::io::Error>,
}

impl MapCacheWriter {
    /// The chunk whose digest comes next.
    pub fn next_chunk(&self) -> u64 {
        self.enc.pushed()
    }

    /// Chunks of the map.
    pub fn chunk_count(&self) -> u64 {
        self.enc.chunk_count()
    }

    /// True until the writer gave up or failed: it takes digests.
    pub fn is_open(&self) -> bool {
        self.out.is_some()
    }

    /// Give up: some chunk's digest at the target is not known for certain.
    pub fn abandon(&mut self) {
        self.incomplete = true;
        self.out = None;
    }

    /// The digest of the next chunk.
    pub fn push(&mut self, digest: &Digest) {
        if self.enc.pushed() >= self.enc.chunk_count() {
            self.abandon();
        }
        let Some(out) = &mut self.out else { return };
        if let Err(e) = out.write_all(digest) {
            self.io_error = Some(e);
            self.out = None;
            return;
        }
        self.enc.push(digest);
    }

    /// Complete the file and rename it into place: `Ok(true)`. When the map
    /// is incomplete (`Ok(false)`) or could not be written (`Err`), the old
    /// file, if any, is removed: it no longer matches the target.
    pub fn commit(mut self) -> std::io::Result<bool> {
        let result = (|| {
            if let Some(e) = self.io_error.take() {
                return Err(e);
            }
            let (Some(mut out), Ok(trailer)) = (self.out.take(), self.enc.finish()) else { return Ok(false) };
            if self.incomplete {
                return Ok(false);
            }
            out.write_all(&trailer)?;
            out.into_inner().map_err(|e| e.into_error())?;
            std::fs::rename(&self.tmp, &self.path)?;
            Ok(true)
        })();
        if !matches!(result, Ok(true)) {
            let _ = std::fs::remove_file(&self.path);
        }
        result.map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", self.path.display())))
    }
}

impl Drop for MapCacheWriter {
    fn drop(&mut self) {
        self.out = None;
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_planner::ZeroDigests;

    const K64: u32 = 65536;

    fn sample_map(size: u64) -> DigestMap {
        let mut m = DigestMap::zeroed(K64, size, &ZeroDigests::new(K64)).unwrap();
        m.set(1, [7; 32]);
        m
    }

    fn write(c: &MapCache, m: &DigestMap) {
        let mut w = c.writer("vm1", "d0", m.chunk_size(), m.disk_size()).unwrap();
        for d in &m.to_digests() {
            w.push(d);
        }
        assert!(w.commit().unwrap());
    }

    #[test]
    fn written_map_loads_and_is_byte_identical_to_encode() {
        let dir = tempfile::tempdir().unwrap();
        let c = MapCache::new(dir.path().join("maps"), "ferry://h:1");
        let m = sample_map(200_000);
        assert_eq!(c.load("vm1", "d0", K64, 200_000), None, "empty cache");
        write(&c, &m);
        assert_eq!(std::fs::read(c.path("vm1", "d0")).unwrap(), m.encode());
        assert_eq!(c.load("vm1", "d0", K64, 200_000), Some((m.clone(), m.map_hash())));
        // Another geometry, another disk, replica or target: a miss.
        assert_eq!(c.load("vm1", "d0", K64, 200_001), None);
        assert_eq!(c.load("vm1", "d0", 2 * K64, 200_000), None);
        assert_eq!(c.load("vm2", "d0", K64, 200_000), None);
        assert_eq!(c.load("vm1", "d1", K64, 200_000), None);
        assert_eq!(MapCache::new(c.dir(), "ferry://h:2").load("vm1", "d0", K64, 200_000), None);
        // Only the final file is left.
        assert_eq!(std::fs::read_dir(c.dir()).unwrap().count(), 1);
    }

    #[test]
    fn names_do_not_run_together() {
        let c = MapCache::new("/x", "t");
        assert_ne!(c.path("ab", "c"), c.path("a", "bc"));
        assert_ne!(MapCache::new("/x", "ta").path("b", "c"), MapCache::new("/x", "t").path("ab", "c"));
    }

    #[test]
    fn corrupt_truncated_or_foreign_files_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let c = MapCache::new(dir.path(), "t");
        let m = sample_map(200_000);
        write(&c, &m);
        let p = c.path("vm1", "d0");
        let good = std::fs::read(&p).unwrap();
        let mut flipped = good.clone();
        flipped[40] ^= 1;
        for bad in [flipped, good[..good.len() - 1].to_vec(), Vec::new(), b"not a map".to_vec()] {
            std::fs::write(&p, &bad).unwrap();
            assert_eq!(c.load("vm1", "d0", K64, 200_000), None);
        }
    }

    #[test]
    fn incomplete_or_abandoned_maps_are_not_written_and_remove_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let c = MapCache::new(dir.path(), "t");
        let m = sample_map(200_000);
        write(&c, &m);
        let mut w = c.writer("vm1", "d0", K64, 200_000).unwrap();
        w.push(&[1; 32]);
        assert!(!w.commit().unwrap(), "too few digests");
        assert!(!c.path("vm1", "d0").exists());
        write(&c, &m);
        let mut w = c.writer("vm1", "d0", K64, 200_000).unwrap();
        for d in &m.to_digests() {
            w.push(d);
        }
        w.abandon();
        assert!(!w.commit().unwrap(), "abandoned");
        assert!(!c.path("vm1", "d0").exists());
        let mut w = c.writer("vm1", "d0", K64, 200_000).unwrap();
        for d in m.to_digests().iter().chain(&m.to_digests()) {
            w.push(d);
        }
        assert!(!w.commit().unwrap(), "too many digests");
        // A writer dropped half way leaves nothing behind.
        drop(c.writer("vm1", "d0", K64, 200_000).unwrap());
        assert_eq!(std::fs::read_dir(c.dir()).unwrap().count(), 0);
    }

    #[test]
    fn default_dir_follows_xdg() {
        // Only checks the shape: the environment is the process's.
        if let Some(d) = MapCache::default_dir() {
            assert!(d.is_absolute() && d.ends_with("ferry/maps"), "{}", d.display());
        }
    }
}
