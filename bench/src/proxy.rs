//! A TCP proxy that counts the bytes on the wire.
//!
//! Every networked tool (ferry included) is measured through one of these,
//! placed in front of its receiver, so "wire bytes" means the same thing for all
//! of them: TCP payload bytes in both directions. It adds no delay: on the WAN
//! scenarios it sits in the receiver's namespace, behind the emulated link
//! (netns.rs), so TCP still runs end to end over the link. The proxy's own CPU
//! is not charged to any tool, but it runs on the same cores: it relays with
//! splice(2) through a pipe (the payload is not copied through user space), and
//! it accepts a connection as soon as one arrives (poll, not a sleep loop).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use ferry_io::sys;

const BUF: usize = 256 << 10;

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    /// Port it listens on (in its namespace, on `listen`'s address).
    pub port: u16,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Listens on `listen` (port 0: any) and forwards every connection to
    /// `upstream`. With `netns`, the proxy's sockets are created inside the
    /// network namespace at that path (/var/run/netns/NAME).
    pub fn start(listen: SocketAddr, upstream: SocketAddr, netns: Option<PathBuf>) -> Result<Proxy> {
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = sync_channel::<Result<u16>>(1);
        let (b2, s2, c2) = (bytes.clone(), stop.clone(), conns.clone());
        let here = netns.is_none();
        let accept = std::thread::Builder::new().name("proxy-accept".into()).spawn(move || {
            let listener = match bind_in(listen, netns) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let addr = listener.local_addr();
            if here && addr.as_ref().is_ok_and(|a| *a == upstream) {
                let _ = tx.send(Err(anyhow!("proxy on {upstream} would relay to itself")));
                return;
            }
            let _ = tx.send(Ok(addr.map(|a| a.port()).unwrap_or(0)));
            while !s2.load(Ordering::Relaxed) {
                if !readable(&listener, Duration::from_millis(100)) {
                    continue;
                }
                match listener.accept() {
                    Ok((down, _)) => {
                        let b3 = b2.clone();
                        // Threads started here inherit this thread's network namespace.
                        let h = std::thread::spawn(move || {
                            if let Ok(up) = TcpStream::connect(upstream) {
                                relay(down, up, b3);
                            }
                        });
                        c2.lock().unwrap_or_else(|p| p.into_inner()).push(h);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        })?;
        let port = rx.recv().map_err(|_| anyhow!("proxy thread ended before listening"))??;
        Ok(Proxy { port, bytes, stop, accept: Some(accept), conns })
    }

    /// Bytes relayed so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Zeroes the counter (between runs).
    pub fn reset(&self) {
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// Waits (up to `timeout`) for finished connections to drain, then returns the count.
    pub fn settle(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let all_done = self.conns.lock().unwrap_or_else(|p| p.into_inner()).iter().all(|h| h.is_finished());
            if all_done || Instant::now() > deadline {
                return self.bytes();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn bind_in(listen: SocketAddr, netns: Option<PathBuf>) -> Result<TcpListener> {
    if let Some(ns) = netns {
        let f = std::fs::File::open(&ns).with_context(|| format!("opening network namespace {}", ns.display()))?;
        // Only this (proxy) thread, and the threads it starts, move into the namespace.
        ferry_io::process::enter_network_namespace(&f).context("entering the network namespace for the proxy")?;
    }
    let l = TcpListener::bind(listen).with_context(|| format!("proxy listening on {listen}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Waits until `l` has a connection to accept (or `timeout` passes).
fn readable(l: &TcpListener, timeout: Duration) -> bool {
    sys::wait_readable(l, timeout).unwrap_or(false)
}

fn relay(down: TcpStream, up: TcpStream, bytes: Arc<AtomicU64>) {
    let _ = down.set_nonblocking(false);
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (Ok(d2), Ok(u2)) = (down.try_clone(), up.try_clone()) else { return };
    let b2 = bytes.clone();
    let t = std::thread::spawn(move || pump(d2, u2, b2));
    pump(up, down, bytes);
    let _ = t.join();
}

/// Copies `from` to `to` until EOF, then half-closes `to`.
fn pump(mut from: TcpStream, mut to: TcpStream, bytes: Arc<AtomicU64>) {
    if splice_pump(&from, &to, &bytes).is_ok() {
        let _ = to.shutdown(Shutdown::Write);
        return;
    }
    // No splice here (or it failed before moving anything): copy through a buffer.
    let mut buf = vec![0u8; BUF];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Moves `from`'s bytes to `to` through a pipe with splice(2) until EOF. Err only when
/// splice is unusable before any byte moved; a broken connection after that ends it Ok.
fn splice_pump(from: &TcpStream, to: &TcpStream, bytes: &AtomicU64) -> std::io::Result<()> {
    let (rd, wr) = sys::pipe()?;
    // A larger pipe means fewer splices; the default (64 KiB) still works.
    let _ = sys::set_pipe_capacity(&wr, BUF);
    let mut moved_any = false;
    loop {
        let n = match sys::splice(from, &wr, BUF) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) => return if moved_any { Ok(()) } else { Err(e) },
        };
        moved_any = true;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        let mut left = n;
        while left > 0 {
            match sys::splice(&rd, to, left) {
                Ok(m) => left -= m,
                Err(_) => {
                    let _ = from.shutdown(Shutdown::Both);
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_both_directions() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = server.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut v = Vec::new();
            s.read_to_end(&mut v).unwrap();
            s.write_all(&v[..10]).unwrap();
        });
        let p = Proxy::start("127.0.0.1:0".parse().unwrap(), up, None).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        c.write_all(&[7u8; 100_000]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        echo.join().unwrap();
        assert_eq!(back, vec![7u8; 10]);
        assert_eq!(p.settle(Duration::from_secs(5)), 100_010);
    }

    #[test]
    fn a_proxy_never_relays_to_itself() {
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = Proxy::start(free, free, None).unwrap_err();
        assert_eq!(e.to_string(), format!("proxy on {free} would relay to itself"));
    }
}
