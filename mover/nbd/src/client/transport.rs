//! The connection under the client: `nbd://` and `nbd+unix://` URIs, the
//! socket (TCP or Unix) with its timeouts, and the receive buffer that
//! headers and small payloads pass through.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::{DEFAULT_PORT, RECV_BUF_LEN};
use crate::NbdError;

/// Where a parsed URI points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix { path: String },
}

fn percent_decode(s: &str, uri: &str) -> Result<String, NbdError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| NbdError::InvalidUri {
                uri: uri.into(),
                reason: format!("bad percent escape at byte {i}"),
            })?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| NbdError::InvalidUri { uri: uri.into(), reason: "export name is not UTF-8".into() })
}

/// Parses `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`.
pub(super) fn parse_uri(uri: &str) -> Result<(Endpoint, String), NbdError> {
    let bad = |reason: &str| NbdError::InvalidUri { uri: uri.into(), reason: reason.into() };
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("missing scheme (nbd:// or nbd+unix://)"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export = percent_decode(path, uri)?;
    match scheme {
        "nbd" | "nbd+tcp" => {
            if query.is_some_and(|q| !q.is_empty()) {
                return Err(bad("query parameters are not supported for TCP"));
            }
            if authority.is_empty() {
                return Err(bad("missing host"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, after) = v6.split_once(']').ok_or_else(|| bad("unterminated [IPv6] host"))?;
                let port = match after.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if after.is_empty() => None,
                    None => return Err(bad("junk after ]")),
                };
                (h.to_string(), port)
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            let port = match port {
                Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
                None => DEFAULT_PORT,
            };
            Ok((Endpoint::Tcp { host, port }, export))
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(bad("nbd+unix:// takes no host (use nbd+unix:///EXPORT?socket=PATH)"));
            }
            let mut socket = None;
            for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
                match kv.split_once('=') {
                    Some(("socket", v)) => socket = Some(percent_decode(v, uri)?),
                    _ => return Err(bad(&format!("unsupported query parameter {kv:?}"))),
                }
            }
            let path = socket.filter(|s| !s.is_empty()).ok_or_else(|| bad("missing ?socket=PATH"))?;
            Ok((Endpoint::Unix { path }, export))
        }
        "nbds" | "nbds+unix" | "nbds+tcp" => Err(NbdError::Unsupported("TLS (nbds://)".into())),
        _ => Err(bad("unknown scheme (nbd:// or nbd+unix://)")),
    }
}

pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(super) fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
    pub(super) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes received but not yet decoded.
pub(super) struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub(super) fn new() -> Self {
        RecvBuf { buf: vec![0; RECV_BUF_LEN], start: 0, end: 0 }
    }
    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    /// Reads at least one more byte, growing the buffer up to `limit`.
    pub(super) fn fill_more(&mut self, s: &mut Stream, limit: usize) -> io::Result<()> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < limit {
                let n = (self.buf.len() * 2).min(limit);
                self.buf.resize(n, 0);
            } else {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "message exceeds the receive limit"));
            }
        }
        loop {
            match s.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
    /// Makes at least `n` bytes available (`n` at most the buffer size).
    pub(super) fn fill_to(&mut self, s: &mut Stream, n: usize) -> io::Result<()> {
        while self.end - self.start < n {
            self.fill_more(s, RECV_BUF_LEN.max(n))?;
        }
        Ok(())
    }
    /// Fills `dst`: buffered bytes first, the rest straight from the socket.
    pub(super) fn read_exact_into(&mut self, s: &mut Stream, dst: &mut [u8]) -> io::Result<()> {
        let have = (self.end - self.start).min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.consume(have);
        let rest = &mut dst[have..];
        if !rest.is_empty() {
            s.read_exact(rest)?;
        }
        Ok(())
    }
}

/// Writes `head` then `payload` with as few syscalls as possible.
pub(super) fn write_all_vectored(s: &mut Stream, head: &[u8], payload: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(head), IoSlice::new(payload)];
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match s.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NbdError;

    #[test]
    fn parses_uris() {
        let t = |u: &str| parse_uri(u).unwrap();
        assert_eq!(t("nbd://localhost/disk"), (Endpoint::Tcp { host: "localhost".into(), port: 10809 }, "disk".into()));
        assert_eq!(t("nbd://127.0.0.1:1234/"), (Endpoint::Tcp { host: "127.0.0.1".into(), port: 1234 }, "".into()));
        assert_eq!(t("nbd://h:1"), (Endpoint::Tcp { host: "h".into(), port: 1 }, "".into()));
        assert_eq!(t("nbd://[::1]:99/a%20b"), (Endpoint::Tcp { host: "::1".into(), port: 99 }, "a b".into()));
        assert_eq!(
            t("nbd+unix:///ex?socket=/tmp/s.sock"),
            (Endpoint::Unix { path: "/tmp/s.sock".into() }, "ex".into())
        );
        assert_eq!(t("nbd+unix://?socket=/tmp/s"), (Endpoint::Unix { path: "/tmp/s".into() }, "".into()));
        for bad in
            ["nbd:/x", "http://h/x", "nbd+unix:///x", "nbd://h:99999/", "nbd://h/x%zz", "nbd+unix://h/?socket=/s"]
        {
            assert!(matches!(parse_uri(bad), Err(NbdError::InvalidUri { .. })), "{bad}");
        }
        assert!(matches!(parse_uri("nbds://h/x"), Err(NbdError::Unsupported(_))));
    }
}
