//! Replays the committed corpus of the `server_receive` fuzz target through its
//! own check, so stable `cargo test` runs the server's receive path on every
//! input the fuzzer kept. `FERRY_WRITE_CORPUS=1` (re)writes the seeds, made from
//! the wire crate's corpus of client transcripts after the handshake.

use std::path::PathBuf;

#[path = "../fuzz/fuzz_targets/checks.rs"]
mod checks;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/server_receive")
}

#[test]
fn replay_server_receive_corpus() {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 5, "{} corpus files", files.len());
    for f in files {
        eprintln!("{}", f.display());
        let (answer, error) = checks::server_receive(&std::fs::read(&f).unwrap());
        eprintln!("  answered {} bytes; {error:?}", answer.len());
        if std::env::var_os("FERRY_CORPUS_DEBUG").is_some() {
            for (what, b) in [("sent", std::fs::read(&f).unwrap()), ("answered", answer)] {
                let mut d = ferry_wire::Deframer::new();
                d.push(&b);
                while let Ok(Some(fr)) = d.next_frame() {
                    eprintln!("    {what}: {fr:?}");
                }
            }
        }
    }
}

#[test]
fn garbage_after_the_handshake_is_refused_with_a_reason() {
    let (answer, error) = checks::server_receive(b"\x00\x01\x02 not a frame at all");
    assert!(error.is_some(), "the session reported no error");
    assert!(!answer.is_empty(), "the server sent no Error frame");
}

#[test]
fn write_seed_corpus() {
    if std::env::var_os("FERRY_WRITE_CORPUS").is_none() {
        return;
    }
    let wire = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../wire/fuzz/corpus/session");
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    // Wire session seeds with selector bit 0 clear are bytes a client sends; drop the selector.
    for e in std::fs::read_dir(&wire).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let b = std::fs::read(&p).unwrap();
        if b.first().is_some_and(|s| s & 1 == 0) && !name.contains("fresh") {
            std::fs::write(dir.join(&name), &b[1..]).unwrap();
        }
    }
    std::fs::write(dir.join("empty"), b"").unwrap();
    // Real sessions: what a source sends after the handshake, recorded through a relay.
    let img_dir = tempfile::tempdir().unwrap();
    let img = img_dir.path().join("sda.img");
    let mut bytes = vec![0u8; 3 * 65536 + 1000];
    for (i, b) in bytes.iter_mut().enumerate().take(65536) {
        *b = (i * 7 % 251) as u8; // chunk 0: data; chunk 1: zero; chunk 2: compressible
    }
    bytes[2 * 65536..].fill(b'x');
    std::fs::write(&img, &bytes).unwrap();
    for (name, plan_only) in [("session-full", false), ("session-plan", true)] {
        std::fs::write(dir.join(name), record_session(&img, plan_only)).unwrap();
    }
}

/// Run a real source against a real target through a recording relay; the
/// bytes the source sent after its Hello and AuthProof, up to its Close.
fn record_session(img: &std::path::Path, plan_only: bool) -> Vec<u8> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use ferry_replicate::access::{Access, AccessList};
    use ferry_replicate::auth::TokenAuth;
    use ferry_replicate::conn::Sock;
    use ferry_replicate::source::{self, DiskSpec, Quiet, ReplicateConfig};
    use ferry_replicate::target::{serve_connection, ServeConfig};

    let ds_dir = tempfile::tempdir().unwrap();
    let ds = ferry_datastore::store::Datastore::open_or_create(ds_dir.path()).unwrap();
    let token = TokenAuth::new(b"ferry fuzz token, 32 characters!");
    let access = Arc::new(Access::fixed(AccessList::single_admin("seed", &token)));
    let auth = Arc::new(token);
    let (src, mut relay_a) = UnixStream::pair().unwrap();
    let (mut relay_b, srv) = UnixStream::pair().unwrap();
    let target = std::thread::spawn(move || {
        serve_connection(Sock::Unix(srv).into(), "seed", &ds, &access, &ServeConfig::default())
    });
    let (mut back_from, mut back_to) = (relay_b.try_clone().unwrap(), relay_a.try_clone().unwrap());
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_from, &mut back_to);
        let _ = back_to.shutdown(std::net::Shutdown::Write);
    });
    let forward = std::thread::spawn(move || {
        let mut recorded = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match relay_a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    recorded.extend_from_slice(&buf[..n]);
                    if relay_b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = relay_b.shutdown(std::net::Shutdown::Write);
        recorded
    });
    let disk = DiskSpec { name: "sda".into(), path: img.to_path_buf(), mode: None, cbt: None };
    let mut cfg = ReplicateConfig::new("seed", vec![disk]);
    cfg.plan_only = plan_only;
    source::replicate(Sock::Unix(src).into(), "relay", auth, &cfg, &Quiet).expect("seed session");
    let recorded = forward.join().unwrap();
    let _ = back.join();
    let report = target.join().unwrap();
    assert!(report.error.is_none(), "{:?}", report.error);
    let mut d = ferry_wire::Deframer::new();
    d.push(&recorded);
    for _ in 0..2 {
        d.next_frame().unwrap().expect("Hello and AuthProof");
    }
    // Without the final Close: a pipelined Close ends the session before its answers go out.
    let start = recorded.len() - d.buffered();
    let mut end = start;
    while let Ok(Some(f)) = d.next_frame() {
        if matches!(f, ferry_wire::Frame::Close) {
            break;
        }
        end = recorded.len() - d.buffered();
    }
    recorded[start..end].to_vec()
}

#[test]
fn a_recorded_session_commits_through_the_harness() {
    // The harness paces frames as a source does, so a real session reaches its commit:
    // the fuzzer starts from the deep end of the receive path, not only from its refusals.
    let input = std::fs::read(corpus_dir().join("session-full")).unwrap();
    let (answer, error) = checks::server_receive(&input);
    assert_eq!(error, None);
    let mut d = ferry_wire::Deframer::new();
    d.push(&answer);
    let mut names = Vec::new();
    while let Ok(Some(f)) = d.next_frame() {
        names.push(f.name());
    }
    assert_eq!(names, ["ReplicaOpened", "ResumeInfo", "Committed"]);
}
