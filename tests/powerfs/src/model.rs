//! The file system as two views of one tree: what the running system sees
//! (`cur`) and what a power cut would leave (`durable`). Pure: no FUSE, no IO.
//! The rules are in the crate doc; every operation here changes `cur` only,
//! except [`State::fsync`] and [`State::fsync_dir`], which copy `cur` into
//! `durable` for one inode.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

/// The block size of file contents: holes and data are tracked per block, so
/// SEEK_DATA / SEEK_HOLE answer at this granularity (as ext4 and xfs do at theirs).
pub const BLOCK: u64 = 4096;

/// The inode number of the root directory.
pub const ROOT: u64 = 1;

/// An errno value.
pub type Errno = i32;

/// A file's contents: a size and the blocks that hold data (absent: a hole,
/// reads as zeros). Blocks are shared copy-on-write between the two views, so
/// an fsync copies a map, not the data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    size: u64,
    blocks: BTreeMap<u64, Arc<[u8]>>,
}

impl Contents {
    /// Length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks that hold data.
    pub fn data_blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// Up to `len` bytes at `off` (fewer at the end of the file).
    pub fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - off) as usize];
        for (&b, data) in self.blocks.range(off / BLOCK..end.div_ceil(BLOCK)) {
            let bstart = b * BLOCK;
            let from = off.max(bstart);
            let to = end.min(bstart + BLOCK);
            out[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&data[(from - bstart) as usize..(to - bstart) as usize]);
        }
        out
    }

    /// Write `data` at `off`, growing the file when it ends past the end.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        let mut pos = off;
        while pos < end {
            let b = pos / BLOCK;
            let bstart = b * BLOCK;
            let to = end.min(bstart + BLOCK);
            let block = self.blocks.entry(b).or_insert_with(|| Arc::from(vec![0u8; BLOCK as usize]));
            let block = block_mut(block);
            block[(pos - bstart) as usize..(to - bstart) as usize]
                .copy_from_slice(&data[(pos - off) as usize..(to - off) as usize]);
            pos = to;
        }
        self.size = self.size.max(end);
    }

    /// Make `[off, off+len)` read as zeros: whole blocks become holes, the
    /// partial ones at the ends are zeroed. The size is kept.
    pub fn punch(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return;
        }
        let first_whole = off.div_ceil(BLOCK);
        let last_whole = end / BLOCK;
        let whole: Vec<u64> = self.blocks.range(first_whole..last_whole.max(first_whole)).map(|(&b, _)| b).collect();
        for b in whole {
            self.blocks.remove(&b);
        }
        for b in [off / BLOCK, end.saturating_sub(1) / BLOCK] {
            let bstart = b * BLOCK;
            let (from, to) = (off.max(bstart), end.min(bstart + BLOCK));
            if from < to {
                if let Some(block) = self.blocks.get_mut(&b) {
                    block_mut(block)[(from - bstart) as usize..(to - bstart) as usize].fill(0);
                }
            }
        }
    }

    /// Truncate or extend (with a hole) to `size`.
    pub fn set_size(&mut self, size: u64) {
        if size < self.size {
            let old = self.size;
            self.punch(size, old - size);
            let keep = size.div_ceil(BLOCK);
            let _ = self.blocks.split_off(&keep);
        }
        self.size = size;
    }

    /// SEEK_DATA: the first offset at or after `off` inside data, or `None` (ENXIO).
    pub fn seek_data(&self, off: u64) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        self.blocks.range(off / BLOCK..).next().map(|(&b, _)| (b * BLOCK).max(off)).filter(|&p| p < self.size)
    }

    /// SEEK_HOLE: the first offset at or after `off` inside a hole (the end of
    /// the file counts as one), or `None` (ENXIO) when `off` is past the end.
    pub fn seek_hole(&self, off: u64) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        let mut b = off / BLOCK;
        while self.blocks.contains_key(&b) {
            b += 1;
        }
        Some((b * BLOCK).max(off).min(self.size))
    }
}

/// A block to change: copied first when the other view shares it.
fn block_mut(b: &mut Arc<[u8]>) -> &mut [u8] {
    if Arc::get_mut(b).is_none() {
        *b = Arc::from(&b[..]);
    }
    Arc::get_mut(b).expect("unique after the copy")
}

/// What an inode is, in one view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A regular file.
    File(Contents),
    /// A directory: name -> inode.
    Dir(BTreeMap<OsString, u64>),
}

/// One inode: both views of its contents.
#[derive(Debug, Clone)]
pub struct Node {
    /// What the running system sees.
    pub cur: Content,
    /// What a power cut leaves (for an inode that a durable entry names).
    pub durable: Content,
    /// Links in the running system's view.
    pub nlink: u32,
    /// Permission bits.
    pub perm: u16,
    /// Modification time, ns since the epoch (not part of the durability model).
    pub mtime_ns: i64,
}

impl Node {
    fn new(dir: bool, perm: u16) -> Node {
        let c = if dir { Content::Dir(BTreeMap::new()) } else { Content::File(Contents::default()) };
        Node { cur: c.clone(), durable: c, nlink: if dir { 2 } else { 1 }, perm, mtime_ns: now_ns() }
    }

    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.cur, Content::Dir(_))
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// The whole file system: inodes by number.
#[derive(Debug, Clone)]
pub struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

impl State {
    /// An empty file system: a root directory, durable.
    pub fn new() -> State {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(true, 0o755));
        State { nodes, next_ino: ROOT + 1 }
    }

    /// The file system a power cut now would leave: every inode reachable from
    /// the root through durable directory entries, with its durable contents,
    /// which become both views. Inodes only the running system could reach go.
    pub fn after_power_cut(&self) -> State {
        let mut nodes = HashMap::new();
        let mut todo = vec![ROOT];
        let mut links: HashMap<u64, u32> = HashMap::new();
        while let Some(ino) = todo.pop() {
            if nodes.contains_key(&ino) {
                continue;
            }
            let Some(n) = self.nodes.get(&ino) else { continue };
            let durable = n.durable.clone();
            if let Content::Dir(entries) = &durable {
                for &child in entries.values() {
                    *links.entry(child).or_default() += 1;
                    todo.push(child);
                }
            }
            let dir = matches!(durable, Content::Dir(_));
            nodes.insert(
                ino,
                Node {
                    cur: durable.clone(),
                    durable,
                    nlink: if dir { 2 } else { 0 },
                    perm: n.perm,
                    mtime_ns: n.mtime_ns,
                },
            );
        }
        for (ino, n) in nodes.iter_mut() {
            if !n.is_dir() {
                n.nlink = links.get(ino).copied().unwrap_or(1);
            }
        }
        State { nodes, next_ino: self.next_ino }
    }

    /// The inode `ino`.
    pub fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.node(dir)?.cur {
            Content::Dir(e) => Ok(e),
            Content::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.node_mut(dir)?.cur {
            Content::Dir(e) => Ok(e),
            Content::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn contents(&self, ino: u64) -> Result<&Contents, Errno> {
        match &self.node(ino)?.cur {
            Content::File(c) => Ok(c),
            Content::Dir(_) => Err(libc::EISDIR),
        }
    }

    fn contents_mut(&mut self, ino: u64) -> Result<&mut Contents, Errno> {
        let n = self.node_mut(ino)?;
        n.mtime_ns = now_ns();
        match &mut n.cur {
            Content::File(c) => Ok(c),
            Content::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// The directory entries of `dir`, sorted by name.
    pub fn list(&self, dir: u64) -> Result<Vec<(OsString, u64)>, Errno> {
        Ok(self.entries(dir)?.iter().map(|(n, &i)| (n.clone(), i)).collect())
    }

    /// The inode `name` in `dir` names.
    pub fn lookup(&self, dir: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(dir)?.get(name).copied().ok_or(libc::ENOENT)
    }

    /// The inode at a `/`-separated path from the root (for tests and tools).
    pub fn resolve(&self, path: &str) -> Result<u64, Errno> {
        path.split('/').filter(|p| !p.is_empty()).try_fold(ROOT, |dir, name| self.lookup(dir, OsStr::new(name)))
    }

    /// A new file or directory `name` in `dir`.
    pub fn create(&mut self, dir: u64, name: &OsStr, is_dir: bool, perm: u16) -> Result<u64, Errno> {
        if self.entries(dir)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, Node::new(is_dir, perm));
        self.entries_mut(dir)?.insert(name.to_os_string(), ino);
        if is_dir {
            self.node_mut(dir)?.nlink += 1;
        }
        Ok(ino)
    }

    fn drop_link(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.nlink = n.nlink.saturating_sub(1);
        }
    }

    /// Remove the file `name` from `dir`.
    pub fn unlink(&mut self, dir: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(dir, name)?;
        if self.node(ino)?.is_dir() {
            return Err(libc::EISDIR);
        }
        self.entries_mut(dir)?.remove(name);
        self.drop_link(ino);
        Ok(())
    }

    /// Remove the empty directory `name` from `dir`.
    pub fn rmdir(&mut self, dir: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(dir, name)?;
        if !self.entries(ino)?.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.entries_mut(dir)?.remove(name);
        self.node_mut(ino)?.nlink = 0;
        self.drop_link(dir);
        Ok(())
    }

    /// Rename `dir/name` to `newdir/newname`, replacing a file there (or an
    /// empty directory, when the source is one); `noreplace`: refuse to.
    pub fn rename(
        &mut self,
        dir: u64,
        name: &OsStr,
        newdir: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(dir, name)?;
        let is_dir = self.node(ino)?.is_dir();
        if let Ok(old) = self.lookup(newdir, newname) {
            if old == ino {
                return Ok(());
            }
            if noreplace {
                return Err(libc::EEXIST);
            }
            match (is_dir, self.node(old)?.is_dir()) {
                (false, true) => return Err(libc::EISDIR),
                (true, false) => return Err(libc::ENOTDIR),
                (true, true) if !self.entries(old)?.is_empty() => return Err(libc::ENOTEMPTY),
                (true, true) => {
                    self.node_mut(old)?.nlink = 0;
                    self.drop_link(newdir);
                }
                (false, false) => self.drop_link(old),
            }
        }
        self.entries_mut(dir)?.remove(name);
        self.entries_mut(newdir)?.insert(newname.to_os_string(), ino);
        if is_dir && dir != newdir {
            self.drop_link(dir);
            self.node_mut(newdir)?.nlink += 1;
        }
        Ok(())
    }

    /// A second name `newdir/newname` for the file `ino`.
    pub fn link(&mut self, ino: u64, newdir: u64, newname: &OsStr) -> Result<(), Errno> {
        if self.node(ino)?.is_dir() {
            return Err(libc::EPERM);
        }
        if self.entries(newdir)?.contains_key(newname) {
            return Err(libc::EEXIST);
        }
        self.entries_mut(newdir)?.insert(newname.to_os_string(), ino);
        self.node_mut(ino)?.nlink += 1;
        Ok(())
    }

    /// Read up to `len` bytes at `off` of file `ino`.
    pub fn read(&self, ino: u64, off: u64, len: u64) -> Result<Vec<u8>, Errno> {
        Ok(self.contents(ino)?.read(off, len))
    }

    /// Write `data` at `off` of file `ino`.
    pub fn write(&mut self, ino: u64, off: u64, data: &[u8]) -> Result<(), Errno> {
        off.checked_add(data.len() as u64).ok_or(libc::EFBIG)?;
        self.contents_mut(ino)?.write(off, data);
        Ok(())
    }

    /// truncate / ftruncate.
    pub fn set_size(&mut self, ino: u64, size: u64) -> Result<(), Errno> {
        self.contents_mut(ino)?.set_size(size);
        Ok(())
    }

    /// Set the permission bits.
    pub fn set_perm(&mut self, ino: u64, perm: u16) -> Result<(), Errno> {
        self.node_mut(ino)?.perm = perm;
        Ok(())
    }

    /// fallocate: mode 0 (allocate; grows the size), FALLOC_FL_KEEP_SIZE
    /// (allocate, no change here: the model keeps no allocation apart from
    /// data), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, and
    /// FALLOC_FL_ZERO_RANGE (with or without KEEP_SIZE). Others: EOPNOTSUPP.
    pub fn fallocate(&mut self, ino: u64, off: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let end = off.checked_add(len).ok_or(libc::EFBIG)?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let c = self.contents_mut(ino)?;
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => {}
            libc::FALLOC_FL_PUNCH_HOLE if keep => c.punch(off, len),
            libc::FALLOC_FL_ZERO_RANGE => c.punch(off, len),
            _ => return Err(libc::EOPNOTSUPP),
        }
        if !keep && end > c.size() {
            c.set_size(end);
        }
        Ok(())
    }

    /// lseek with SEEK_DATA or SEEK_HOLE.
    pub fn seek(&self, ino: u64, off: u64, whence: i32) -> Result<u64, Errno> {
        let c = self.contents(ino)?;
        match whence {
            libc::SEEK_DATA => c.seek_data(off).ok_or(libc::ENXIO),
            libc::SEEK_HOLE => c.seek_hole(off).ok_or(libc::ENXIO),
            _ => Err(libc::EINVAL),
        }
    }

    /// fsync or fdatasync of a file: its contents and size become durable
    /// (fdatasync must make the size durable too: it is needed to read the
    /// data). Its names do not: they are its directories'.
    pub fn fsync(&mut self, ino: u64) -> Result<(), Errno> {
        let n = self.node_mut(ino)?;
        n.durable = n.cur.clone();
        Ok(())
    }

    /// fsync of a directory: its entries become durable (the inodes they name
    /// keep whatever durable contents they have).
    pub fn fsync_dir(&mut self, ino: u64) -> Result<(), Errno> {
        self.fsync(ino)
    }

    /// The current contents of a file (for tests and tools).
    pub fn file(&self, ino: u64) -> Result<&Contents, Errno> {
        self.contents(ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn unsynced_data_is_lost_and_synced_data_kept() {
        let mut s = State::new();
        let f = s.create(ROOT, os("f"), false, 0o644).unwrap();
        s.fsync_dir(ROOT).unwrap();
        s.write(f, 0, b"hello").unwrap();
        s.fsync(f).unwrap();
        s.write(f, 2, b"XYZW").unwrap();
        assert_eq!(s.read(f, 0, 100).unwrap(), b"heXYZW");
        let after = s.after_power_cut();
        let f2 = after.resolve("f").unwrap();
        assert_eq!(after.read(f2, 0, 100).unwrap(), b"hello", "the unsynced write is gone, size too");
    }

    #[test]
    fn a_name_needs_its_directory_synced() {
        let mut s = State::new();
        let d = s.create(ROOT, os("d"), true, 0o755).unwrap();
        let f = s.create(d, os("f"), false, 0o644).unwrap();
        s.write(f, 0, b"x").unwrap();
        s.fsync(f).unwrap();
        s.fsync_dir(d).unwrap();
        // d's own entry in the root was never synced: d and everything in it go.
        assert_eq!(s.after_power_cut().resolve("d/f"), Err(libc::ENOENT));
        s.fsync_dir(ROOT).unwrap();
        let after = s.after_power_cut();
        assert_eq!(after.read(after.resolve("d/f").unwrap(), 0, 10).unwrap(), b"x");
        // A file whose entry is durable but whose data never was: empty.
        let g = s.create(d, os("g"), false, 0o644).unwrap();
        s.write(g, 0, b"data").unwrap();
        s.fsync_dir(d).unwrap();
        let after = s.after_power_cut();
        assert_eq!(after.file(after.resolve("d/g").unwrap()).unwrap().size(), 0);
    }

    #[test]
    fn rename_and_unlink_are_undone_until_the_directory_is_synced() {
        let mut s = State::new();
        let a = s.create(ROOT, os("a"), false, 0o644).unwrap();
        s.write(a, 0, b"old").unwrap();
        s.fsync(a).unwrap();
        s.fsync_dir(ROOT).unwrap();
        // write_atomic: temp, fsync, rename over, (no directory fsync yet).
        let t = s.create(ROOT, os(".a.tmp"), false, 0o644).unwrap();
        s.write(t, 0, b"new").unwrap();
        s.fsync(t).unwrap();
        s.rename(ROOT, os(".a.tmp"), ROOT, os("a"), false).unwrap();
        let after = s.after_power_cut();
        assert_eq!(after.read(after.resolve("a").unwrap(), 0, 9).unwrap(), b"old");
        assert_eq!(after.resolve(".a.tmp"), Err(libc::ENOENT), "the temp's entry was never durable");
        s.fsync_dir(ROOT).unwrap();
        let after = s.after_power_cut();
        assert_eq!(after.read(after.resolve("a").unwrap(), 0, 9).unwrap(), b"new");
        s.unlink(ROOT, os("a")).unwrap();
        assert!(s.after_power_cut().resolve("a").is_ok(), "an unsynced unlink is undone");
        s.fsync_dir(ROOT).unwrap();
        assert_eq!(s.after_power_cut().resolve("a"), Err(libc::ENOENT));
        // A hard link, durable in its directory, keeps the contents.
        let b = s.create(ROOT, os("b"), false, 0o644).unwrap();
        s.write(b, 0, b"bb").unwrap();
        s.fsync(b).unwrap();
        s.link(b, ROOT, os("c")).unwrap();
        s.unlink(ROOT, os("b")).unwrap();
        s.fsync_dir(ROOT).unwrap();
        let after = s.after_power_cut();
        let c = after.resolve("c").unwrap();
        assert_eq!((after.read(c, 0, 9).unwrap(), after.node(c).unwrap().nlink), (b"bb".to_vec(), 1));
    }

    #[test]
    fn holes_punches_and_truncates() {
        let mut c = Contents::default();
        c.write(0, &vec![1u8; 3 * BLOCK as usize]);
        c.set_size(10 * BLOCK);
        c.write(8 * BLOCK + 10, b"z");
        assert_eq!((c.seek_data(0), c.seek_hole(0)), (Some(0), Some(3 * BLOCK)));
        assert_eq!((c.seek_data(3 * BLOCK), c.seek_hole(8 * BLOCK)), (Some(8 * BLOCK), Some(9 * BLOCK)));
        assert_eq!(c.seek_data(9 * BLOCK), None, "only a hole is left");
        c.punch(100, 2 * BLOCK);
        assert_eq!(c.read(99, 2), [1, 0]);
        assert_eq!(c.read(2 * BLOCK + 99, 2), [0, 1]);
        assert_eq!(c.seek_hole(0), Some(BLOCK), "block 0 keeps data (zeroed from 100), block 1 is a hole");
        assert_eq!(c.data_blocks(), 3);
        c.set_size(BLOCK + 1);
        assert_eq!((c.size(), c.data_blocks()), (BLOCK + 1, 1));
        c.set_size(3 * BLOCK);
        assert_eq!(c.read(0, 3 * BLOCK)[100..], vec![0u8; 3 * BLOCK as usize - 100][..]);
        assert_eq!(c.read(0, 100), vec![1u8; 100]);
    }

    #[test]
    fn a_punched_hole_is_not_durable_until_synced() {
        let mut s = State::new();
        let f = s.create(ROOT, os("f"), false, 0o644).unwrap();
        s.write(f, 0, &[7u8; 8192]).unwrap();
        s.fsync(f).unwrap();
        s.fsync_dir(ROOT).unwrap();
        s.fallocate(f, 0, 8192, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE).unwrap();
        assert_eq!(s.read(f, 0, 1).unwrap(), [0]);
        let after = s.after_power_cut();
        assert_eq!(after.read(after.resolve("f").unwrap(), 0, 1).unwrap(), [7]);
        assert_eq!(s.fallocate(f, 0, 1, libc::FALLOC_FL_COLLAPSE_RANGE), Err(libc::EOPNOTSUPP));
    }
}
