//! The check behind the `server_receive` fuzz target, shared with the stable
//! corpus replay test (`tests/corpus.rs` includes this file).
//!
//! The server's real receive path: a target session ([`serve_connection`], the
//! code `ferry serve` runs for every connection) on a fresh datastore, reached
//! over a socketpair by a client that completes the handshake honestly and then
//! sends the fuzz input as raw bytes, as a peer holding the token could, paced
//! as a source paces its frames (see `feed`). The
//! session must end (never hang, never panic) when the input ends, whatever it
//! held, and leave a datastore that opens and whose replicas' catalogs read.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_datastore::store::Datastore;
use ferry_replicate::access::{Access, AccessList};
use ferry_replicate::auth::TokenAuth;
use ferry_replicate::conn::{client_handshake, Sock};
use ferry_replicate::target::{serve_connection, ServeConfig};
use ferry_wire::{Deframer, Frame};

/// Run one session on `input`: what the server answered, and its report's error.
pub fn server_receive(input: &[u8]) -> (Vec<u8>, Option<String>) {
    let dir = tempfile::Builder::new().prefix("ferry-fuzz-").tempdir_in(scratch()).expect("scratch dir");
    let ds = Datastore::open_or_create(dir.path()).expect("datastore");
    let token = TokenAuth::new(b"ferry fuzz token, 32 characters!");
    let access = Arc::new(Access::fixed(AccessList::single_admin("fuzz", &token)));
    let auth = Arc::new(token);
    let (client, server) = UnixStream::pair().expect("socketpair");
    let mut cfg = ServeConfig { workers: 1, ..ServeConfig::default() };
    // Disks the peer may claim stay small: a fuzzer's 64 TiB disk would spend its time on a
    // digest map of zeros (within the limits, as for `ferry serve`, but slow).
    cfg.limits.max_disk_size = 1 << 30;
    let server_ds = ds.clone();
    let target =
        std::thread::spawn(move || serve_connection(Sock::Unix(server).into(), "fuzz peer", &server_ds, &access, &cfg));
    let raw = client.try_clone().expect("clone");
    let (_conn, _rx, _peer) = client_handshake(Sock::Unix(client), "fuzz target", auth).expect("handshake");
    // The answers are read by a thread of their own: the server may answer before it has read
    // the whole input, and the feeder waits for the answers a real source waits for.
    let answers = Arc::new(Answers::default());
    let reader = {
        let (mut raw, answers) = (raw.try_clone().expect("clone"), answers.clone());
        std::thread::spawn(move || answers.read_all(&mut raw))
    };
    feed(raw, input, &answers);
    let answered = reader.join().expect("the answer reader never panics");
    let report = target.join().expect("the session thread never panics");
    let ds = Datastore::open(dir.path()).expect("the datastore still opens");
    for name in ds.replicas().expect("replicas list") {
        if let Ok(r) = ds.replica(&name) {
            r.catalog().expect("a replica's catalog reads");
        }
    }
    (answered, report.error)
}

/// What the server answered so far: the bytes, the frames decoded from them, and whether it hung up.
#[derive(Default)]
struct Answers {
    state: Mutex<(Vec<u8>, Vec<&'static str>, bool)>,
    changed: Condvar,
}

impl Answers {
    /// Read answers until the server hangs up; the bytes.
    fn read_all(&self, sock: &mut UnixStream) -> Vec<u8> {
        let mut deframer = Deframer::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = sock.read(&mut buf).unwrap_or(0);
            let mut st = self.state.lock().unwrap();
            if n == 0 {
                st.2 = true;
                self.changed.notify_all();
                return std::mem::take(&mut st.0);
            }
            st.0.extend_from_slice(&buf[..n]);
            deframer.push(&buf[..n]);
            while let Ok(Some(f)) = deframer.next_frame() {
                st.1.push(f.name());
            }
            self.changed.notify_all();
        }
    }

    /// Wait (at most 2 s) until the server answered with one of `names` after its first `seen`
    /// frames, or hung up.
    fn wait_for(&self, seen: usize, names: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut st = self.state.lock().unwrap();
        while !st.2 && !st.1.iter().skip(seen).any(|n| names.contains(n)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = self.changed.wait_timeout(st, left).unwrap().0;
        }
    }

    fn frames(&self) -> usize {
        self.state.lock().unwrap().1.len()
    }
}

/// Send `input` as a source paces it: frame by frame while it decodes as frames, waiting after
/// OpenReplica, OpenDisk, DigestMapRequest and Commit for the answer a source waits for; bytes that do
/// not decode go as they are. The write side is shut down at the end.
fn feed(mut sock: UnixStream, input: &[u8], answers: &Answers) {
    let mut deframer = Deframer::new();
    deframer.push(input);
    let mut sent = 0;
    loop {
        let seen = answers.frames();
        let frame = match deframer.next_frame() {
            Ok(Some(f)) => f,
            _ => break,
        };
        let end = input.len() - deframer.buffered();
        if sock.write_all(&input[sent..end]).is_err() {
            return;
        }
        sent = end;
        match frame {
            Frame::OpenReplica(_) => answers.wait_for(seen, &["ReplicaOpened", "Error"]),
            Frame::OpenDisk(_) => answers.wait_for(seen, &["ResumeInfo", "Error"]),
            Frame::DigestMapRequest(_) => answers.wait_for(seen, &["DigestMapEnd", "Error"]),
            Frame::Commit(_) => answers.wait_for(seen, &["Committed", "Error"]),
            _ => {}
        }
    }
    let _ = sock.write_all(&input[sent..]);
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// Where fuzz datastores go: tmpfs when there is one.
fn scratch() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
