//! ferry-powerfs: a FUSE file system that forgets, at a simulated power cut,
//! everything no fsync or fdatasync made durable. The datastore runs on it in
//! the power-loss tests (tests/e2e/power.rs); a SIGKILL keeps the page cache,
//! this does not.
//!
//! It follows LazyFS (a FUSE file system that keeps unsynced writes in its own
//! page cache and drops them on a "clear-cache" fault) and goes further on
//! metadata: LazyFS passes creates, renames and unlinks straight to the file
//! system below, so they are durable at once; here they are not.
//!
//! # The model: what is durable when
//! Every inode has two views: what the running system sees and what a power
//! cut leaves ([`model`]). Operations change the first; only these copy it
//! into the second, for one inode:
//! - `fsync` or `fdatasync` of a file: its contents (data, holes) and its
//!   size. fdatasync is not weaker here: the size is metadata needed to read
//!   the data. Its names are not made durable: they belong to directories.
//! - `fsync` of a directory: its entries (names -> inodes) as they are now.
//!
//! Nothing else makes anything durable:
//! - `write`/`pwrite`, also through an `O_DIRECT` descriptor and io_uring (an
//!   O_DIRECT write skips the page cache, not the drive's cache: it needs an
//!   fdatasync like any other), `truncate`/`ftruncate`, `fallocate` (allocate,
//!   `PUNCH_HOLE|KEEP_SIZE`, `ZERO_RANGE`): file contents, volatile.
//! - `create`/`mknod`/`mkdir`, `unlink`/`rmdir`, `rename` (also over an
//!   existing name), `link`: directory entries, volatile in each directory
//!   they change until that directory is fsynced. A rename between two
//!   directories is two changes: each is durable when its directory is synced.
//! - A new directory's own entries are durable only when it is fsynced, and
//!   it exists after a cut only if its parent was fsynced after the mkdir.
//!
//! A power cut keeps the durable view of every inode reachable from the root
//! through durable entries; the rest is gone. A file whose name was made
//! durable but whose data never was comes back empty; an unsynced unlink or
//! rename is undone. This is the strictest reading of POSIX that a real file
//! system may show (ext4 and xfs often make more durable, never less), and it
//! drops every unsynced write; it does not keep a random part of them (a torn
//! write inside a block is not modelled either).
//!
//! # Supported
//! Regular files and directories; lookup, getattr/setattr (size, mode),
//! create/mknod/mkdir, unlink/rmdir, rename (`RENAME_NOREPLACE`; not
//! `RENAME_EXCHANGE`), link, open (every file is opened `FOPEN_DIRECT_IO`:
//! each write reaches the model in order, and `O_DIRECT` opens work),
//! read/write, fsync/fdatasync, readdir, fsyncdir, statfs, fallocate as above,
//! and `lseek` `SEEK_DATA`/`SEEK_HOLE` at 4 KiB granularity. `flock` and
//! POSIX locks are the kernel's own (the file system claims neither
//! `FUSE_FLOCK_LOCKS` nor `FUSE_POSIX_LOCKS`), which is what the datastore's
//! lock file needs. No symlinks, xattrs or special files.
//!
//! # Cutting the power
//! Every operation that changes either view (write, setattr, fallocate,
//! create, mkdir, unlink, rmdir, rename, link, fsync, fsyncdir) counts as one.
//! [`PowerFs::cut_after`]`(n)` cuts the power instead of the n-th such
//! operation from now: that operation and every later request fail with EIO,
//! so nothing after the cut changes anything (the file system is frozen);
//! the test then kills the process that was writing and calls
//! [`PowerFs::power_cut`], which unmounts and gives the [`State`] a reboot
//! finds, to mount again. Requests are served by one thread, in the order the
//! kernel sends them.
//!
//! State lives in memory (blocks shared copy-on-write between the views): a
//! test-sized file system. Unlinked inodes stay until the next power cut or
//! remount drops what no durable entry reaches.
//!
//! This crate has no `unsafe`; the FUSE protocol and the mount are the
//! `fuser` crate's (its pure-Rust mount: as root, mount(2) directly, else
//! `fusermount3`).

#![forbid(unsafe_code)]

pub mod model;

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

pub use model::State;
use model::{Content, ROOT};

/// Whether FUSE can be used here: `/dev/fuse` exists. Tests skip, saying so, when not.
pub fn available() -> bool {
    Path::new("/dev/fuse").exists()
}

struct Inner {
    state: State,
    /// Changing operations so far.
    ops: u64,
    /// The operation the power is cut instead of.
    cut_at: Option<u64>,
    cut: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    uid: u32,
    gid: u32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A changing operation: counted, and refused once the power is (or now goes) off.
    fn change<T>(&self, f: impl FnOnce(&mut State) -> Result<T, i32>) -> Result<T, Errno> {
        let mut g = self.lock();
        if g.cut {
            return Err(Errno::EIO);
        }
        g.ops += 1;
        if g.cut_at == Some(g.ops) {
            g.cut = true;
            return Err(Errno::EIO);
        }
        f(&mut g.state).map_err(Errno::from_i32)
    }

    /// A read-only operation: refused once the power is off.
    fn query<T>(&self, f: impl FnOnce(&State) -> Result<T, i32>) -> Result<T, Errno> {
        let g = self.lock();
        if g.cut {
            return Err(Errno::EIO);
        }
        f(&g.state).map_err(Errno::from_i32)
    }

    fn attr(&self, s: &State, ino: u64) -> Result<FileAttr, i32> {
        let n = s.node(ino)?;
        let (kind, size, blocks) = match &n.cur {
            Content::Dir(e) => (FileType::Directory, e.len() as u64, 0),
            Content::File(c) => (FileType::RegularFile, c.size(), c.data_blocks() * (model::BLOCK / 512)),
        };
        let t = UNIX_EPOCH + Duration::from_nanos(n.mtime_ns.max(0) as u64);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: n.perm,
            nlink: n.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: model::BLOCK as u32,
            flags: 0,
        })
    }
}

/// No caching of names or attributes in the kernel: every lookup asks the model.
const TTL: Duration = Duration::ZERO;

struct Fs(Arc<Shared>);

impl Fs {
    fn entry(&self, reply: ReplyEntry, r: Result<u64, Errno>) {
        match r.and_then(|ino| self.0.query(|s| self.0.attr(s, ino))) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn attr_reply(&self, reply: ReplyAttr, r: Result<u64, Errno>) {
        match r.and_then(|ino| self.0.query(|s| self.0.attr(s, ino))) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.0.query(|s| s.lookup(parent.0, name));
        self.entry(reply, r)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.attr_reply(reply, Ok(ino.0))
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = if size.is_some() || mode.is_some() {
            self.0.change(|s| {
                if let Some(size) = size {
                    s.set_size(ino.0, size)?;
                }
                if let Some(mode) = mode {
                    s.set_perm(ino.0, (mode & 0o7777) as u16)?;
                }
                Ok(ino.0)
            })
        } else {
            Ok(ino.0)
        };
        self.attr_reply(reply, r)
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let r = self.0.change(|s| s.create(parent.0, name, false, (mode & 0o7777) as u16));
        self.entry(reply, r)
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let r = self.0.change(|s| s.create(parent.0, name, true, (mode & 0o7777) as u16));
        self.entry(reply, r)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.0.change(|s| s.unlink(parent.0, name)))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.0.change(|s| s.rmdir(parent.0, name)))
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let bits = flags.bits();
        if bits & !libc::RENAME_NOREPLACE != 0 {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = bits & libc::RENAME_NOREPLACE != 0;
        empty(reply, self.0.change(|s| s.rename(parent.0, name, newparent.0, newname, noreplace)))
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let r = self.0.change(|s| s.link(ino.0, newparent.0, newname).map(|()| ino.0));
        self.entry(reply, r)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.0.query(|s| s.node(ino.0).map(|_| ())) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self
            .0
            .change(|s| s.create(parent.0, name, false, (mode & 0o7777) as u16))
            .and_then(|ino| self.0.query(|s| self.0.attr(s, ino)));
        match r {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.query(|s| s.read(ino.0, offset, u64::from(size))) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.0.change(|s| s.write(ino.0, offset, data)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() makes nothing durable.
        reply.ok()
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.0.change(|s| s.fsync(ino.0)))
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let list = match self.0.query(|s| s.list(ino.0)) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let dots = [(OsStr::new(".").to_os_string(), ino.0), (OsStr::new("..").to_os_string(), ROOT)];
        let kinds = self.0.query(|s| {
            Ok(list.iter().map(|(_, i)| s.node(*i).map_or(FileType::RegularFile, kind_of)).collect::<Vec<_>>())
        });
        let Ok(kinds) = kinds else { return reply.error(Errno::EIO) };
        let all = dots
            .into_iter()
            .map(|(n, i)| (n, i, FileType::Directory))
            .chain(list.into_iter().zip(kinds).map(|((n, i), k)| (n, i, k)));
        for (idx, (name, i, kind)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), idx as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.0.change(|s| s.fsync_dir(ino.0)))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = 1 << 24;
        reply.statfs(blocks, blocks, blocks, 1 << 20, 1 << 20, model::BLOCK as u32, 255, model::BLOCK as u32)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.0.change(|s| s.fallocate(ino.0, offset, length, mode)))
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let Ok(off) = u64::try_from(offset) else { return reply.error(Errno::EINVAL) };
        match self.0.query(|s| s.seek(ino.0, off, whence)) {
            Ok(p) => reply.offset(p as i64),
            Err(e) => reply.error(e),
        }
    }
}

fn kind_of(n: &model::Node) -> FileType {
    if n.is_dir() {
        FileType::Directory
    } else {
        FileType::RegularFile
    }
}

/// A mounted power-loss file system.
pub struct PowerFs {
    shared: Arc<Shared>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for PowerFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerFs").field("mountpoint", &self.mountpoint).field("ops", &self.ops()).finish()
    }
}

impl PowerFs {
    /// Mount `state` at `mountpoint` (an existing directory; files appear owned by its owner).
    pub fn mount(mountpoint: &Path, state: State) -> io::Result<PowerFs> {
        let meta = std::fs::metadata(mountpoint)?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner { state, ops: 0, cut_at: None, cut: false }),
            uid: meta.uid(),
            gid: meta.gid(),
        });
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![fuser::MountOption::FSName("ferry-powerfs".into()), fuser::MountOption::RW];
        let session = fuser::spawn_mount(Fs(shared.clone()), mountpoint, &cfg)?;
        Ok(PowerFs { shared, session: Some(session), mountpoint: mountpoint.to_path_buf() })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Changing operations served so far (counting the one the power was cut instead of).
    pub fn ops(&self) -> u64 {
        self.shared.lock().ops
    }

    /// Cut the power instead of the `n`-th changing operation from now (`n` >= 1).
    pub fn cut_after(&self, n: u64) {
        let mut g = self.shared.lock();
        g.cut_at = Some(g.ops + n.max(1));
    }

    /// Forget a cut armed by [`cut_after`](Self::cut_after) that has not happened.
    pub fn disarm(&self) {
        self.shared.lock().cut_at = None;
    }

    /// True once the power is off.
    pub fn is_cut(&self) -> bool {
        self.shared.lock().cut
    }

    /// Cut the power now (if it is not off already), unmount, and give what a
    /// reboot finds. Kill the processes that used the mount first: their open
    /// files keep it busy.
    pub fn power_cut(mut self) -> io::Result<State> {
        self.shared.lock().cut = true;
        self.unmount_session()?;
        Ok(self.shared.lock().state.after_power_cut())
    }

    /// Unmount cleanly: everything the running system saw is kept (as if the
    /// kernel wrote it all back, which a clean shutdown does).
    pub fn unmount(mut self) -> io::Result<State> {
        self.unmount_session()?;
        let mut g = self.shared.lock();
        Ok(std::mem::take(&mut g.state))
    }

    /// Unmount and end the session thread. A process killed with files open in an io_uring
    /// keeps the mount busy for a moment after it is reaped (the ring is torn down by a kernel
    /// worker): `umount` is retried for 10 s, then the mount is detached (`umount -l`) and the
    /// session thread left to end when the last file goes.
    fn unmount_session(&mut self) -> io::Result<()> {
        let Some(s) = self.session.take() else { return Ok(()) };
        let t = std::time::Instant::now();
        loop {
            let out = std::process::Command::new("umount").arg(&self.mountpoint).output();
            match out {
                // Unmounted: the session thread ends (its device reads fail); fuser's own
                // unmount, when its handle drops, finds nothing to do.
                Ok(o) if o.status.success() => return s.join(),
                Ok(o) if t.elapsed() > Duration::from_secs(10) => {
                    let lazy = std::process::Command::new("umount").arg("-l").arg(&self.mountpoint).status()?;
                    if !lazy.success() {
                        return Err(io::Error::other(format!(
                            "umount {}: {}",
                            self.mountpoint.display(),
                            String::from_utf8_lossy(&o.stderr).trim()
                        )));
                    }
                    return Ok(());
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
                // No umount(8) here: fuser's own unmount.
                Err(_) => return s.umount_and_join(),
            }
        }
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        let _ = self.unmount_session();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File, OpenOptions};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};

    fn mounted(state: State) -> Option<(tempfile::TempDir, PowerFs)> {
        if !available() {
            eprintln!("skipped: no /dev/fuse on this machine");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = PowerFs::mount(dir.path(), state).expect("mount ferry-powerfs");
        Some((dir, fs))
    }

    #[test]
    fn through_the_kernel_only_synced_writes_survive_a_cut() {
        let Some((dir, fs)) = mounted(State::new()) else { return };
        let p = dir.path();
        fs::create_dir(p.join("d")).unwrap();
        File::open(p).unwrap().sync_all().unwrap();
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(p.join("d/a")).unwrap();
        f.write_all_at(&[1u8; 8192], 0).unwrap();
        f.sync_data().unwrap();
        File::open(p.join("d")).unwrap().sync_all().unwrap();
        // O_DIRECT: not durable by itself.
        let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(p.join("d/a")).unwrap();
        let mut block = vec![0u8; 4096];
        block.fill(2);
        direct.write_all_at(&block, 4096).unwrap();
        // A punched hole and a new file, never synced.
        f.set_len(1 << 20).unwrap();
        fs::write(p.join("d/b"), b"b").unwrap();
        let mut rd = vec![0u8; 8192];
        f.read_exact_at(&mut rd, 0).unwrap();
        assert_eq!((rd[0], rd[4096]), (1, 2));
        drop((f, direct));
        let ops = fs.ops();
        assert!(ops >= 8, "{ops} changing operations");
        let after = fs.power_cut().unwrap();
        assert_eq!(after.resolve("d/b"), Err(libc::ENOENT));
        let a = after.resolve("d/a").unwrap();
        assert_eq!(after.file(a).unwrap().size(), 8192);
        assert_eq!(after.read(a, 4096, 1).unwrap(), [1], "the O_DIRECT write was never synced");

        // Mounted again: what a reboot finds, through the kernel; holes through SEEK_DATA/SEEK_HOLE.
        let fs = PowerFs::mount(dir.path(), after).unwrap();
        assert_eq!(fs::read(p.join("d/a")).unwrap(), vec![1u8; 8192]);
        let f = OpenOptions::new().read(true).write(true).open(p.join("d/a")).unwrap();
        f.set_len(64 * 1024).unwrap();
        f.write_all_at(b"x", 40 * 1024).unwrap();
        let ranges: Vec<_> = ferry_io::sys::data_ranges(&f, 64 * 1024).map(|r| (r.start, r.end)).collect();
        assert_eq!(ranges, [(0, 8192), (40 * 1024, 44 * 1024)]);
        drop(f);
        // An armed cut fails the n-th changing operation and freezes everything after it.
        fs.cut_after(2);
        fs::write(p.join("c1"), b"1").unwrap_or_default();
        assert!(fs.is_cut());
        assert_eq!(fs::read(p.join("d/a")).map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
        let after = fs.power_cut().unwrap();
        assert_eq!(after.resolve("c1"), Err(libc::ENOENT));
        assert_eq!(after.file(after.resolve("d/a").unwrap()).unwrap().size(), 8192);
    }
}
