//! An [`IoBackend`] that reads from an NBD export: each chunk read is one
//! NBD_CMD_READ, many in flight on the disk's connection, the reply data
//! going from the socket straight into the pool buffer.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use super::{IoBackend, IoCompletion, IoKind, IoRequest};
use crate::buf::PoolBuf;
use crate::nbd::{NbdClient, NbdError};

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

/// Reads through one NBD connection (shared with the disk's other uses,
/// which never run while the reader does).
pub struct NbdBackend {
    client: Arc<Mutex<NbdClient>>,
    depth: usize,
    size: u64,
    uri: String,
    /// NBD handle -> (tag, requested length).
    in_flight: HashMap<u64, (u64, usize)>,
}

impl std::fmt::Debug for NbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdBackend").field("depth", &self.depth).field("in_flight", &self.in_flight.len()).finish()
    }
}

impl NbdBackend {
    /// A backend with up to `depth` reads in flight on `client`.
    /// `uri` names the export in per-read errors.
    pub fn new(client: Arc<Mutex<NbdClient>>, depth: usize, uri: &str) -> NbdBackend {
        let size = client.lock().unwrap_or_else(|p| p.into_inner()).size();
        NbdBackend { client, depth: depth.max(1), size, uri: uri.to_string(), in_flight: HashMap::new() }
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
        self.in_flight.len()
    }

    fn submit(&mut self, req: IoRequest) -> io::Result<()> {
        if req.kind != IoKind::Read {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "the NBD source backend only reads"));
        }
        // The reader rounds lengths up to whole 4 KiB blocks; the export ends where it ends.
        let len = (req.len as u64).min(self.size.saturating_sub(req.offset)) as usize;
        let handle = self.client().submit_read_buf(req.offset, ChunkBuf { buf: req.buf, len }).map_err(io_error)?;
        self.in_flight.insert(handle, (req.tag, len));
        Ok(())
    }

    fn wait(&mut self) -> io::Result<IoCompletion> {
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
