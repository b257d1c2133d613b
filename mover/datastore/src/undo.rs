//! Undo files: the reverse deltas that keep older restore points.
//!
//! While a session turns point N into point N+1, the old contents of every
//! chunk it overwrites (or truncates away) are appended to
//! `REPLICA/undo/N/DISK.undo` and made durable before the chunk is touched.
//! After the commit that file belongs to point N: the state of point N is the
//! latest image with the undo files of N, N+1, ... applied, newest first.
//!
//! Format (little-endian), DO NOT MODIFY without a version bump:
//! ```text
//! header  64 bytes: magic "FERRYUN1", point id u64, chunk size u32,
//!                   reserved u32, disk size at point N u64, 24 zero bytes,
//!                   BLAKE3 of the first 56 bytes truncated to 8 bytes
//! record  56-byte head: chunk u64, len u32, flags u32 (bit 0: all zero, no data),
//!                   digest [32] (BLAKE3 of the len bytes), head check u64
//!                   (BLAKE3 of the first 48 bytes, truncated)
//!         then `len` data bytes unless the zero flag is set
//! ```
//! In the latest point's file, which a session appends to, a record whose head
//! check or data digest does not match ends the file: it is the torn tail of a
//! crash, and its chunk was never overwritten (records are fsynced before the
//! overwrite). In an older point's file it is damage, reported with the file
//! and the record's index ([`Tail`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};
use crate::store::UndoExtent;

const MAGIC: &[u8; 8] = b"FERRYUN1";
/// Length of the file header.
pub const HEADER_LEN: u64 = 64;
/// Length of a record head.
pub const RECORD_HEAD_LEN: usize = 56;
/// Record flag: the old contents were all zero (no data stored).
pub const FLAG_ZERO: u32 = 1;
/// 4 KiB, the smallest page size: the page cache drops only whole pages of the real size.
const PAGE: u64 = 4096;

fn check8(b: &[u8]) -> u64 {
    let h = blake3::hash(b);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Where one chunk's old contents are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLoc {
    /// Offset of the data in the file (meaningless for zero records).
    pub data_offset: u64,
    /// Length of the chunk at the point.
    pub len: u32,
    /// True when the old contents were all zero.
    pub zero: bool,
    /// BLAKE3 of the old contents.
    pub digest: [u8; 32],
}

/// Path of the undo file of `disk` for point `point`.
pub fn undo_path(replica_dir: &Path, point: u64, disk: &str) -> PathBuf {
    replica_dir.join("undo").join(point.to_string()).join(format!("{disk}.undo"))
}

/// An undo file being appended to.
#[derive(Debug)]
pub struct UndoWriter {
    file: File,
    path: PathBuf,
    end: u64,
    /// Records appended so far (this session) and how many of them are known durable.
    appended: u64,
    synced: u64,
    /// The page cache holds nothing of the file below this offset that this writer put there.
    uncached: u64,
    /// Records found in the file when it was opened.
    found: u64,
    /// End of the records known durable (found when opened, or covered by a finished fdatasync).
    durable_end: u64,
    /// Chunks already saved (their first old contents are kept; later writes need no record).
    pub saved: HashMap<u64, RecordLoc>,
    /// Records appended by this writer: chunk -> index among them (`appended` before it),
    /// so a chunk saved ahead of its data knows whether its record is durable yet.
    index_of: HashMap<u64, u64>,
}

impl UndoWriter {
    /// Open (or create) the undo file of `disk` for `point`; an existing file
    /// is scanned, its torn tail cut off, and its records remembered.
    pub fn open(replica_dir: &Path, point: u64, disk: &str, chunk_size: u32, disk_size: u64) -> Result<UndoWriter> {
        UndoWriter::open_checked(replica_dir, point, disk, chunk_size, disk_size, None)
    }

    /// [`UndoWriter::open`] of the file of an interrupted session, `durable` as its last
    /// checkpoint recorded it: the file must hold at least that much intact (else the error
    /// names the file and the record), and only what follows may be cut as a torn tail.
    pub fn open_checked(
        replica_dir: &Path,
        point: u64,
        disk: &str,
        chunk_size: u32,
        disk_size: u64,
        durable: Option<UndoExtent>,
    ) -> Result<UndoWriter> {
        let path = undo_path(replica_dir, point, disk);
        let dir = path.parent().expect("undo dir");
        crate::store::create_dir_durable(dir)?;
        let mut file = crate::store::private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::file("opening undo file", &path, e))?;
        let len = file.metadata().map_err(|e| StoreError::file("inspecting", &path, e))?.len();
        let (saved, end, found) = if len >= HEADER_LEN {
            let r = UndoReader::open(&path, Tail::MayBeTorn)?;
            r.check_durable(durable)?;
            if r.chunk_size != chunk_size {
                return Err(StoreError::Damaged(format!(
                    "{} was made with chunk size {}, not {chunk_size}",
                    path.display(),
                    r.chunk_size
                )));
            }
            (r.records, r.valid_end, r.count)
        } else {
            let mut h = [0u8; HEADER_LEN as usize];
            h[..8].copy_from_slice(MAGIC);
            h[8..16].copy_from_slice(&point.to_le_bytes());
            h[16..20].copy_from_slice(&chunk_size.to_le_bytes());
            h[24..32].copy_from_slice(&disk_size.to_le_bytes());
            let c = check8(&h[..56]);
            h[56..64].copy_from_slice(&c.to_le_bytes());
            file.set_len(0)
                .and_then(|_| file.write_all_at(&h, 0))
                .and_then(|_| file.sync_all())
                .map_err(|e| StoreError::file("writing undo file", &path, e))?;
            crate::store::sync_dir(dir)?;
            (HashMap::new(), HEADER_LEN, 0)
        };
        file.set_len(end).map_err(|e| StoreError::file("trimming undo file", &path, e))?;
        if !saved.is_empty() {
            // The records found count as durable (their chunks may be overwritten at once), but
            // a killed writer may have left some only in the page cache: make them durable now.
            file.sync_data().map_err(|e| StoreError::file("syncing undo file", &path, e))?;
        }
        file.seek(SeekFrom::Start(end)).map_err(|e| StoreError::file("seeking", &path, e))?;
        Ok(UndoWriter {
            file,
            path,
            end,
            appended: 0,
            synced: 0,
            uncached: end & !(PAGE - 1),
            found,
            durable_end: end,
            saved,
            index_of: HashMap::new(),
        })
    }

    /// Append the old contents of `chunk` (`data`; all-zero contents are stored as a flag).
    /// A chunk saved already keeps its first record: nothing is appended.
    pub fn append(&mut self, chunk: u64, data: &[u8]) -> Result<()> {
        if self.saved.contains_key(&chunk) {
            return Ok(());
        }
        let zero = ferry_io::is_zero(data);
        let digest = *blake3::hash(data).as_bytes();
        self.append_record(chunk, data.len() as u32, digest, (!zero).then_some(data))
    }

    /// Append the old contents of `chunk`, `data`, which the replica's digest map says
    /// have BLAKE3 `digest` (not that of zeros). The contents are hashed all the same and
    /// the record takes their real digest: false when it is not `digest`, that is when the
    /// image was changed outside ferry (booted in place, written by another tool) after the
    /// map was stored. Trusting the map there would make a record whose data does not match
    /// its digest, which every reader rejects. A chunk saved already keeps its first record:
    /// nothing is appended (true).
    pub fn append_checked(&mut self, chunk: u64, data: &[u8], digest: [u8; 32]) -> Result<bool> {
        if self.saved.contains_key(&chunk) {
            return Ok(true);
        }
        let real = *blake3::hash(data).as_bytes();
        let zero = real != digest && ferry_io::is_zero(data);
        self.append_record(chunk, data.len() as u32, real, (!zero).then_some(data))?;
        Ok(real == digest)
    }

    /// Append a record for a chunk whose old contents are known to be `len`
    /// zero bytes (the replica's digest map says so), without reading them.
    pub fn append_zero(&mut self, chunk: u64, len: u32, zero_digest: [u8; 32]) -> Result<()> {
        self.append_record(chunk, len, zero_digest, None)
    }

    fn append_record(&mut self, chunk: u64, len: u32, digest: [u8; 32], data: Option<&[u8]>) -> Result<()> {
        let mut head = [0u8; RECORD_HEAD_LEN];
        head[..8].copy_from_slice(&chunk.to_le_bytes());
        head[8..12].copy_from_slice(&len.to_le_bytes());
        let zero = data.is_none();
        head[12..16].copy_from_slice(&(if zero { FLAG_ZERO } else { 0 }).to_le_bytes());
        head[16..48].copy_from_slice(&digest);
        let c = check8(&head[..48]);
        head[48..56].copy_from_slice(&c.to_le_bytes());
        let data = data.unwrap_or_default();
        let mut bufs = [std::io::IoSlice::new(&head), std::io::IoSlice::new(data)];
        // One write for head and data (write_all_vectored is unstable).
        let mut slices: &mut [std::io::IoSlice<'_>] = &mut bufs;
        while !slices.is_empty() {
            match self.file.write_vectored(slices) {
                Ok(0) => {
                    let e = std::io::Error::new(std::io::ErrorKind::WriteZero, "wrote 0 bytes");
                    return Err(StoreError::file("writing undo file", &self.path, e));
                }
                Ok(n) => std::io::IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::file("writing undo file", &self.path, e)),
            }
        }
        let data_offset = self.end + RECORD_HEAD_LEN as u64;
        self.end = data_offset + data.len() as u64;
        self.saved.insert(chunk, RecordLoc { data_offset, len, zero, digest });
        self.index_of.insert(chunk, self.appended);
        self.appended += 1;
        Ok(())
    }

    /// Make every appended record durable (before the chunks are overwritten).
    pub fn sync(&mut self) -> Result<()> {
        if self.synced < self.appended {
            if !crate::fault::skip_fsync("undo") {
                self.file.sync_data().map_err(|e| StoreError::file("syncing undo file", &self.path, e))?;
            }
            self.synced_upto(self.appended, self.end);
        }
        Ok(())
    }

    /// Records appended so far; an fdatasync started now makes them all durable.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Offset of the end of the records appended so far.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The file as it stands: its length and records (found when opened, and appended).
    pub fn extent(&self) -> UndoExtent {
        UndoExtent { bytes: self.end, records: self.found + self.appended }
    }

    /// The part of the file known durable: for the session state at a checkpoint.
    pub fn durable_extent(&self) -> UndoExtent {
        UndoExtent { bytes: self.durable_end, records: self.found + self.synced }
    }

    /// True when some appended record is not known to be durable yet.
    pub fn needs_sync(&self) -> bool {
        self.synced < self.appended
    }

    /// Records appended and not known to be durable yet.
    pub fn unsynced(&self) -> u64 {
        self.appended - self.synced
    }

    /// True when `chunk`'s record is known durable (found in the file when it was
    /// opened, or covered by a finished fdatasync). Only for saved chunks.
    pub fn is_durable(&self, chunk: u64) -> bool {
        self.index_of.get(&chunk).is_none_or(|&i| i < self.synced)
    }

    /// An fdatasync started when [`appended`](Self::appended) was `upto` and [`end`](Self::end)
    /// was `end` has finished.
    ///
    /// The records it covered are clean in the page cache, and nothing reads them in this
    /// session: their pages are dropped, so that the next records' pages are those (the
    /// allocator hands out the pages freed last first). An undo file then holds a round's
    /// worth of page cache rather than all of its records, and a session does not take
    /// tens of megabytes of memory not touched for a while, which on a VM whose free pages
    /// the host takes back (virtio-balloon free page reporting) costs a host fault per page.
    pub fn synced_upto(&mut self, upto: u64, end: u64) {
        self.synced = self.synced.max(upto);
        self.durable_end = self.durable_end.max(end);
        if end > self.uncached {
            // Advice only: an error (there is none for a regular file) would change nothing that matters.
            let advice = ferry_io::sys::Advice::DontNeed;
            let _ = ferry_io::sys::fadvise(self.raw_fd(), self.uncached, end - self.uncached, advice);
            // A partial last page stays (and is dropped with the next round's).
            self.uncached = end & !(PAGE - 1);
        }
    }

    /// The file, for an fdatasync run by an IO backend.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.file)
    }

    /// The file's path, for errors.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// How much of an undo file must check out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The latest point's file, which a session appends to (or did, when it was killed
    /// or the power went): the first record that does not check out ends the file. It is
    /// a torn tail: records are made durable before their chunks are overwritten, so a
    /// record not all there belongs to a chunk that was never overwritten, and so does
    /// every record after it (a power cut may keep a later page and lose an earlier one).
    MayBeTorn,
    /// The file of an older point, frozen since the next point was committed: every
    /// record must check out, else the file is damaged (an error naming it and the
    /// record). With the extent the catalog recorded, the file must hold exactly that
    /// many bytes and records (a file cut at a record boundary reads as intact).
    Complete(Option<UndoExtent>),
}

/// An undo file opened for reading.
#[derive(Debug)]
pub struct UndoReader {
    file: File,
    path: PathBuf,
    /// Point the file restores.
    pub point: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// Disk size at the point.
    pub disk_size: u64,
    /// Records by chunk (the first record of a chunk wins).
    pub records: HashMap<u64, RecordLoc>,
    /// Records read (a file written by this ferry holds one per chunk).
    pub count: u64,
    /// End of the last intact record.
    pub valid_end: u64,
    /// True when a torn or corrupt record was found (and ignored with everything after it).
    pub torn: bool,
}

/// Why a record does not check out.
fn bad_record(
    reader: &mut impl Read,
    head: &mut [u8; RECORD_HEAD_LEN],
    data: &mut [u8],
    pos: u64,
    len: u64,
    chunk_size: u32,
) -> std::result::Result<(u64, RecordLoc), &'static str> {
    if pos + RECORD_HEAD_LEN as u64 > len || reader.read_exact(head).is_err() {
        return Err("its head is cut off by the end of the file");
    }
    if check8(&head[..48]).to_le_bytes() != head[48..56] {
        return Err("its head fails its check");
    }
    let chunk = u64::from_le_bytes(head[..8].try_into().expect("8"));
    let rlen = u32::from_le_bytes(head[8..12].try_into().expect("4"));
    let flags = u32::from_le_bytes(head[12..16].try_into().expect("4"));
    let digest: [u8; 32] = head[16..48].try_into().expect("32");
    if rlen > chunk_size {
        return Err("its length is larger than a chunk");
    }
    let zero = flags & FLAG_ZERO != 0;
    let data_offset = pos + RECORD_HEAD_LEN as u64;
    let end = data_offset + if zero { 0 } else { u64::from(rlen) };
    if end > len {
        return Err("its data is cut off by the end of the file");
    }
    if !zero {
        let d = &mut data[..rlen as usize];
        if reader.read_exact(d).is_err() || blake3::hash(d).as_bytes() != &digest {
            return Err("its data does not match its digest");
        }
    }
    Ok((chunk, RecordLoc { data_offset, len: rlen, zero, digest }))
}

impl UndoReader {
    /// Open and index an undo file; verifies every record's head and data, and reads its
    /// end as `tail` says.
    pub fn open(path: &Path, tail: Tail) -> Result<UndoReader> {
        let mut file = File::open(path).map_err(|e| StoreError::file("opening undo file", path, e))?;
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact(&mut h).map_err(|e| StoreError::file("reading undo header", path, e))?;
        if &h[..8] != MAGIC || check8(&h[..56]).to_le_bytes() != h[56..64] {
            return Err(StoreError::Damaged(format!("{} is not an intact ferry undo file", path.display())));
        }
        let point = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let chunk_size = u32::from_le_bytes(h[16..20].try_into().expect("4"));
        let disk_size = u64::from_le_bytes(h[24..32].try_into().expect("8"));
        if chunk_size == 0 || chunk_size > 64 << 20 {
            return Err(StoreError::Damaged(format!("{} names chunk size {chunk_size}", path.display())));
        }
        let mut u = UndoReader {
            file,
            path: path.to_path_buf(),
            point,
            chunk_size,
            disk_size,
            records: HashMap::new(),
            count: 0,
            valid_end: HEADER_LEN,
            torn: false,
        };
        let why = u.scan(|_, _| {})?;
        match (tail, why) {
            (Tail::MayBeTorn, w) => u.torn = w.is_some(),
            (Tail::Complete(_), Some(why)) => {
                return Err(StoreError::Damaged(format!(
                    "undo file {} is damaged: record {} (at offset {}) does not check out ({why}); restore \
                     point {point} and older cannot be rebuilt exactly",
                    path.display(),
                    u.count,
                    u.valid_end
                )))
            }
            (Tail::Complete(Some(want)), None) if want.bytes != u.valid_end || want.records != u.count => {
                return Err(StoreError::Damaged(format!(
                    "undo file {} is incomplete: it holds {} records in {} bytes, the catalog recorded {} \
                     records in {} bytes; restore point {point} and older cannot be rebuilt exactly",
                    path.display(),
                    u.count,
                    u.valid_end,
                    want.records,
                    want.bytes
                )))
            }
            (Tail::Complete(_), None) => {}
        }
        Ok(u)
    }

    /// Read the records from [`valid_end`](Self::valid_end) to the end of the file as it
    /// is now, calling `new` for each record of a chunk not seen before; stop at the first
    /// that does not check out (returned: why). A file a session is appending to reads
    /// again from there next time (an export reads the latest point's file this way,
    /// record by record, as the session makes it).
    pub fn scan(&mut self, mut new: impl FnMut(u64, RecordLoc)) -> Result<Option<&'static str>> {
        let len = self.file.metadata().map_err(|e| StoreError::file("inspecting", &self.path, e))?.len();
        if len <= self.valid_end {
            return Ok(None);
        }
        let mut f = self.file.try_clone().map_err(|e| StoreError::file("opening", &self.path, e))?;
        f.seek(SeekFrom::Start(self.valid_end)).map_err(|e| StoreError::file("seeking", &self.path, e))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, f);
        let mut data = vec![0u8; self.chunk_size as usize];
        let mut head = [0u8; RECORD_HEAD_LEN];
        let mut pos = self.valid_end;
        while pos < len {
            match bad_record(&mut reader, &mut head, &mut data, pos, len, self.chunk_size) {
                Ok((chunk, loc)) => {
                    if let std::collections::hash_map::Entry::Vacant(e) = self.records.entry(chunk) {
                        e.insert(loc);
                        new(chunk, loc);
                    }
                    self.count += 1;
                    pos = loc.data_offset + if loc.zero { 0 } else { u64::from(loc.len) };
                    self.valid_end = pos;
                }
                Err(why) => return Ok(Some(why)),
            }
        }
        Ok(None)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The latest point's file, read with [`Tail::MayBeTorn`], against what a checkpoint
    /// recorded durable: a torn tail may only begin after it.
    pub fn check_durable(&self, durable: Option<UndoExtent>) -> Result<()> {
        match durable {
            Some(d) if self.valid_end < d.bytes || self.count < d.records => Err(StoreError::Damaged(format!(
                "undo file {} is damaged: record {} (at offset {}) does not check out or is missing, but the \
                 session's last checkpoint made {} records ({} bytes) durable; restore point {} cannot be \
                 rebuilt exactly",
                self.path.display(),
                self.count,
                self.valid_end,
                d.records,
                d.bytes,
                self.point
            ))),
            _ => Ok(()),
        }
    }

    /// Read a record's old contents into `buf` (`loc.len` bytes; zeros for a zero record).
    pub fn read(&self, loc: &RecordLoc, buf: &mut [u8]) -> Result<()> {
        let b = &mut buf[..loc.len as usize];
        if loc.zero {
            b.fill(0);
            return Ok(());
        }
        self.file
            .read_exact_at(b, loc.data_offset)
            .map_err(|e| StoreError::Damaged(format!("reading undo record: {e}")))
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn append_reopen_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = UndoWriter::open(dir.path(), 3, "d", 65536, 300_000).unwrap();
        w.append(2, &vec![7u8; 65536]).unwrap();
        w.append(4, &vec![0u8; 300_000 - 4 * 65536]).unwrap();
        let end = w.end;
        w.append(2, &vec![9u8; 65536]).unwrap(); // a chunk saved already keeps its first record
        assert_eq!(w.end, end, "nothing appended");
        w.sync().unwrap();
        drop(w);
        let p = undo_path(dir.path(), 3, "d");
        // A torn record at the end: half a head.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        drop(f);
        let r = UndoReader::open(&p, Tail::MayBeTorn).unwrap();
        assert!(r.torn);
        assert_eq!((r.point, r.chunk_size, r.disk_size), (3, 65536, 300_000));
        let mut buf = vec![0u8; 65536];
        r.read(&r.records[&2], &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        assert!(r.records[&4].zero);
        // Reopening for append cuts the torn tail and keeps the records.
        let w = UndoWriter::open(dir.path(), 3, "d", 65536, 300_000).unwrap();
        assert_eq!(w.saved.len(), 2);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), r.valid_end);
    }

    #[test]
    fn old_contents_that_do_not_match_the_map_get_their_real_digest() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = UndoWriter::open(dir.path(), 2, "d", 65536, 1 << 20).unwrap();
        let map_says = *blake3::hash(&[1u8; 65536]).as_bytes();
        assert!(!w.append_checked(0, &[5u8; 65536], map_says).unwrap(), "changed outside ferry");
        assert!(!w.append_checked(1, &[0u8; 65536], map_says).unwrap(), "zeroed outside ferry");
        assert!(w.append_checked(2, &[1u8; 65536], map_says).unwrap());
        assert_eq!(w.extent(), UndoExtent { bytes: HEADER_LEN + 3 * 56 + 2 * 65536, records: 3 });
        w.sync().unwrap();
        drop(w);
        let p = undo_path(dir.path(), 2, "d");
        let want = Some(UndoExtent { bytes: HEADER_LEN + 3 * 56 + 2 * 65536, records: 3 });
        let r = UndoReader::open(&p, Tail::Complete(want)).unwrap();
        assert_eq!(r.records.len(), 3);
        assert_eq!(r.records[&0].digest, *blake3::hash(&[5u8; 65536]).as_bytes());
        assert!(r.records[&1].zero);
    }

    #[test]
    fn an_older_points_file_must_be_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = UndoWriter::open(dir.path(), 1, "d", 65536, 1 << 20).unwrap();
        for c in 0..3u64 {
            w.append(c, &vec![c as u8 + 1; 65536]).unwrap();
        }
        w.sync().unwrap();
        let full = w.extent();
        drop(w);
        let p = undo_path(dir.path(), 1, "d");
        // Cut at a record boundary: intact on its own, short of what the catalog recorded.
        let cut = HEADER_LEN + 2 * (56 + 65536);
        OpenOptions::new().write(true).open(&p).unwrap().set_len(cut).unwrap();
        UndoReader::open(&p, Tail::Complete(None)).unwrap();
        let e = UndoReader::open(&p, Tail::Complete(Some(full))).unwrap_err().to_string();
        assert!(e.contains("1.undo") || e.contains("d.undo"), "{e}");
        assert!(e.contains("holds 2 records in 131248 bytes, the catalog recorded 3 records in 196840 bytes"), "{e}");
        // A bad record in the middle: an error naming the record, not a torn tail.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xFF], HEADER_LEN + 56 + 100).unwrap();
        let e = UndoReader::open(&p, Tail::Complete(None)).unwrap_err().to_string();
        assert!(e.contains("record 0 (at offset 64) does not check out (its data does not match its digest)"), "{e}");
        // The latest point's file reads it as a torn tail.
        assert!(UndoReader::open(&p, Tail::MayBeTorn).unwrap().torn);
    }

    #[test]
    fn a_record_appended_with_its_known_digest_reads_back_verified() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = UndoWriter::open(dir.path(), 2, "d", 65536, 1 << 20).unwrap();
        let old: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 + 1).collect();
        let digest = *blake3::hash(&old).as_bytes();
        assert!(w.append_checked(3, &old, digest).unwrap());
        let end = w.end();
        assert!(w.append_checked(3, &[9u8; 65536], *blake3::hash(&[9u8; 65536]).as_bytes()).unwrap());
        assert_eq!(w.end(), end, "a chunk saved already keeps its first record");
        w.sync().unwrap();
        drop(w);
        let r = UndoReader::open(&undo_path(dir.path(), 2, "d"), Tail::MayBeTorn).unwrap();
        assert!(!r.torn);
        let loc = r.records[&3];
        assert_eq!((loc.len, loc.zero, loc.digest), (65536, false, digest));
        let mut buf = vec![0u8; 65536];
        r.read(&loc, &mut buf).unwrap();
        assert_eq!(buf, old);
    }

    #[test]
    fn a_record_is_durable_once_a_sync_started_after_it_finished() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = UndoWriter::open(dir.path(), 1, "d", 65536, 1 << 20).unwrap();
        w.append(5, &vec![1u8; 65536]).unwrap();
        drop(w);
        // Records found in the file when it is opened are durable.
        let mut w = UndoWriter::open(dir.path(), 1, "d", 65536, 1 << 20).unwrap();
        assert!(w.is_durable(5));
        w.append(6, &vec![2u8; 65536]).unwrap();
        let (upto, end) = (w.appended(), w.end()); // an fdatasync starts here ...
        w.append(7, &vec![3u8; 65536]).unwrap();
        assert_eq!(w.unsynced(), 2);
        assert!(!w.is_durable(6) && !w.is_durable(7));
        w.synced_upto(upto, end); // ... and finishes: it covered 6, not 7
        assert!(w.is_durable(6) && !w.is_durable(7));
        assert_eq!(w.unsynced(), 1);
        w.sync().unwrap();
        assert!(w.is_durable(7));
        assert_eq!(w.unsynced(), 0);
    }

    /// Pages of `file` in the page cache.
    fn resident_pages(file: &File) -> usize {
        let len = file.metadata().unwrap().len() as usize;
        ferry_io::sys::resident_pages(file, len).unwrap()
    }

    #[test]
    fn synced_records_leave_the_page_cache_and_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        if ferry_io::sys::is_tmpfs(dir.path()).unwrap() {
            eprintln!("skipped: {} is on tmpfs, whose pages are the files themselves", dir.path().display());
            return;
        }
        let mut w = UndoWriter::open(dir.path(), 1, "d", 65536, 1 << 30).unwrap();
        for c in 0..8u64 {
            w.append(c, &vec![c as u8 + 1; 65536]).unwrap();
        }
        let (upto, end) = (w.appended(), w.end());
        w.append(8, &vec![9u8; 65536]).unwrap();
        let before = resident_pages(&w.file);
        w.file.sync_data().unwrap(); // as a sync round run by the IO backend would
        w.synced_upto(upto, end);
        let after = resident_pages(&w.file);
        // 9 records of 16 pages: the 8 synced ones (and the header) leave; the 9th stays,
        // with the page it shares with the 8th.
        assert!(before >= 9 * 16, "{before} pages cached before");
        assert!(after <= 17, "{after} pages cached after the sync of 8 of 9 records");
        w.sync().unwrap();
        assert!(resident_pages(&w.file) <= 1, "everything synced leaves");
        drop(w);
        let r = UndoReader::open(&undo_path(dir.path(), 1, "d"), Tail::MayBeTorn).unwrap();
        assert!(!r.torn);
        let mut buf = vec![0u8; 65536];
        for c in 0..9u64 {
            r.read(&r.records[&c], &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == c as u8 + 1), "record {c}");
        }
    }

    #[test]
    fn corrupt_data_ends_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = UndoWriter::open(dir.path(), 1, "d", 65536, 1 << 20).unwrap();
        w.append(0, &vec![1u8; 65536]).unwrap();
        w.append(1, &vec![2u8; 65536]).unwrap();
        w.sync().unwrap();
        let p = undo_path(dir.path(), 1, "d");
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xFF], HEADER_LEN + 56 + 65536 + 56 + 10).unwrap();
        let r = UndoReader::open(&p, Tail::MayBeTorn).unwrap();
        assert!(r.torn);
        assert_eq!(r.records.len(), 1);
    }
}
