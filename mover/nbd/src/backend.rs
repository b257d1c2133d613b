//! An [`IoBackend`] over an NBD export. Reads (the source): each chunk read
//! is one NBD_CMD_READ, many in flight on the disk's connection, the reply
//! data going from the socket straight into the pool buffer. Writes (the
//! target writing a replica disk behind an export): each chunk is one
//! NBD_CMD_WRITE, or several when it is longer than the connection's largest
//! request, sent at submit and completed when every part's reply is in;
//! many in flight, so a chunk costs no round trip of its own.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use ferry_io::{IoBackend, IoCompletion, IoKind, IoRequest, PoolBuf};

use crate::{NbdClient, NbdError};

/// A pool buffer read up to `len` bytes.
struct ChunkBuf {
    buf: PoolBuf,
    len: usize,
}

impl AsMut<[u8]> for ChunkBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf.spare_mut()[..self.len]
    }
}

/// A write in flight: its buffer is held until every part is acknowledged.
struct PendingWrite {
    offset: u64,
    len: usize,
    buf: PoolBuf,
    parts_left: usize,
    error: Option<NbdError>,
}

/// Reads or writes through one NBD connection (shared with the disk's other
/// uses: synchronous calls on the same client park these completions for us).
pub struct NbdBackend {
    client: Arc<Mutex<NbdClient>>,
    depth: usize,
    size: u64,
    uri: String,
    /// NBD handle -> (tag, requested length) of reads.
    in_flight: HashMap<u64, (u64, usize)>,
    /// NBD handle -> tag of each write part.
    write_parts: HashMap<u64, u64>,
    /// Tag -> write.
    writes: HashMap<u64, PendingWrite>,
    /// The connection failed while writes were in flight: none of them will complete.
    broken: Option<String>,
}

impl std::fmt::Debug for NbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdBackend").field("depth", &self.depth).field("in_flight", &self.in_flight()).finish()
    }
}

impl NbdBackend {
    /// A backend with up to `depth` reads or writes in flight on `client`.
    /// `uri` names the export in per-request errors.
    pub fn new(client: Arc<Mutex<NbdClient>>, depth: usize, uri: &str) -> NbdBackend {
        let size = client.lock().unwrap_or_else(|p| p.into_inner()).size();
        NbdBackend {
            client,
            depth: depth.max(1),
            size,
            uri: uri.to_string(),
            in_flight: HashMap::new(),
            write_parts: HashMap::new(),
            writes: HashMap::new(),
            broken: None,
        }
    }

    fn submit_write(&mut self, req: IoRequest) -> io::Result<()> {
        let len = req.len.min(req.buf.len());
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let max = c.max_request_len() as usize;
        let mut handles = Vec::new();
        for (i, part) in req.buf[..len].chunks(max).enumerate() {
            match c.submit_write(req.offset + (i * max) as u64, part) {
                Ok(h) => handles.push(h),
                // Parts already sent complete later and are found under no tag: the
                // connection is broken after a failed send, so none will come back.
                Err(e) => return Err(io_error(e)),
            }
        }
        drop(c);
        for &h in &handles {
            self.write_parts.insert(h, req.tag);
        }
        let w = PendingWrite { offset: req.offset, len, buf: req.buf, parts_left: handles.len(), error: None };
        self.writes.insert(req.tag, w);
        Ok(())
    }

    fn wait_write(&mut self) -> io::Result<IoCompletion> {
        if let Some(why) = &self.broken {
            // Each write still counted in flight comes back failed, with its buffer, so that
            // the caller's drain ends and the pool gets its buffers back.
            let tag = *self.writes.keys().next().expect("called with writes in flight");
            let w = self.writes.remove(&tag).expect("present");
            self.write_parts.retain(|_, t| *t != tag);
            let result = Err(io::Error::other(format!("NBD export {}: {why}", self.uri)));
            return Ok(IoCompletion { tag, offset: w.offset, len: w.len, kind: IoKind::Write, buf: w.buf, result });
        }
        loop {
            let next = self.client().wait_detached();
            let c = match next {
                Ok(c) => c,
                Err(e) => {
                    self.broken = Some(e.to_string());
                    return Err(io_error(e));
                }
            };
            let tag = self
                .write_parts
                .remove(&c.handle)
                .ok_or_else(|| io::Error::other(format!("NBD completion for unknown handle {:#x}", c.handle)))?;
            let w = self.writes.get_mut(&tag).expect("a part's write is pending");
            w.parts_left -= 1;
            if let Err(e) = c.result {
                w.error.get_or_insert(e);
            }
            if w.parts_left > 0 {
                continue;
            }
            let w = self.writes.remove(&tag).expect("present");
            let result = match w.error {
                None => Ok(w.len),
                // The server failed this write only: name the export in the disk's write error.
                Some(e) => Err(io::Error::other(format!("NBD export {}: {e}", self.uri))),
            };
            return Ok(IoCompletion { tag, offset: w.offset, len: w.len, kind: IoKind::Write, buf: w.buf, result });
        }
    }

    fn client(&self) -> std::sync::MutexGuard<'_, NbdClient> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An [`NbdError`] carried in an `io::Error` (recover it with `into_inner` + downcast).
fn io_error(e: NbdError) -> io::Error {
    let kind = if e.is_timeout() { io::ErrorKind::TimedOut } else { io::ErrorKind::Other };
    io::Error::new(kind, e)
}

impl IoBackend for NbdBackend {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len() + self.writes.len()
    }

    fn submit(&mut self, req: IoRequest) -> io::Result<()> {
        if req.kind == IoKind::Write {
            return self.submit_write(req);
        }
        // The reader rounds lengths up to whole 4 KiB blocks; the export ends where it ends.
        let len = (req.len as u64).min(self.size.saturating_sub(req.offset)) as usize;
        let handle = self.client().submit_read_buf(req.offset, ChunkBuf { buf: req.buf, len }).map_err(io_error)?;
        self.in_flight.insert(handle, (req.tag, len));
        Ok(())
    }

    fn wait(&mut self) -> io::Result<IoCompletion> {
        if !self.writes.is_empty() {
            return self.wait_write();
        }
        let c = self.client().wait_read_buf::<ChunkBuf>().map_err(io_error)?;
        let (tag, len) = self
            .in_flight
            .remove(&c.handle)
            .ok_or_else(|| io::Error::other(format!("NBD completion for unknown handle {:#x}", c.handle)))?;
        let mut buf = c.buf.buf;
        let result = match c.result {
            Ok(()) => {
                buf.set_len(len);
                Ok(len)
            }
            // The server failed this read only: name the export in the disk's read error.
            Err(e) => Err(io::Error::other(format!("NBD source {}: {e}", self.uri))),
        };
        Ok(IoCompletion { tag, offset: c.offset, len, kind: IoKind::Read, buf, result })
    }
}
