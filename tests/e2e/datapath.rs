//! The data path: full replication through the real binary, local and over TCP.

use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_datastore::Datastore;
use ferry_io::BufPool;
use ferry_replicate::conn::{client_handshake, server_handshake, Conn, Link, Received, Rx, Sock};
use ferry_replicate::tls::ClientTrust;
use ferry_replicate::MoveError;
use ferry_tests::*;
use ferry_wire::{
    Codec, Data, ErrorCode, Event, Flush, Frame, Mode, OpenDisk, OpenReplica, ReplicaOpened, ResumeInfo, WireError,
};
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// `ferry replicate --json --replica REPLICA --target TARGET --source S... EXTRA...`.
fn replicate(target: &str, replica: &str, sources: &[String], extra: &[&str]) -> Run {
    let mut args: Vec<String> = vec!["replicate".into(), "--json".into(), "--replica".into(), replica.into()];
    args.extend(["--target".into(), target.into()]);
    for s in sources {
        args.extend(["--source".into(), s.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    run(args)
}

fn p(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

fn named(name: &str, path: &Path) -> String {
    format!("{name}={}", path.display())
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The summary's per-disk counters for `disk`.
fn disk_of<'a>(summary: &'a Value, disk: &str) -> &'a Value {
    summary["disks"]
        .as_array()
        .expect("disks array")
        .iter()
        .find(|d| d["disk"] == disk)
        .unwrap_or_else(|| panic!("no disk {disk:?} in {summary}"))
}

/// Entries of a directory, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn full_replication_local_and_remote_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.img");
    // Not a multiple of the chunk size; zero, random and text regions.
    write_image(&img, 5 * (1 << 20) + 12345, 1, &[Fill::Random, Fill::Zero, Fill::Text]);

    let local = dir.path().join("local-ds");
    let out = ferry()
        .args(["replicate", "--json", "--replica", "vm1", "--chunk-size", "64K", "--source"])
        .arg(&img)
        .arg("--target")
        .arg(&local)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_replica_equals(&local, "vm1", "disk0.img", &img);

    let remote = dir.path().join("remote-ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&remote, &token, &[]);
    let out = ferry()
        .args(["replicate", "--json", "--replica", "vm1", "--source"])
        .arg(format!("d0={}", img.display()))
        .args(["--target", &server.url, "--fingerprint", &server.fingerprint, "--token-file"])
        .arg(&token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let sessions = server.sessions(1);
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["point_id"], 1);
    assert_replica_equals(&remote, "vm1", "d0", &img);
}

#[test]
fn size_not_a_multiple_of_the_chunk_size_counts_the_short_last_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("odd.img");
    let size = MIB + 12345;
    write_image(&img, size, 2, &[Fill::Random]);
    let ds = dir.path().join("ds");
    let r = replicate(&p(&ds), "vm1", &[p(&img)], &["--chunk-size", "64K", "--compress", "none"]);
    r.expect_code(0);
    let s = r.summary();
    assert_eq!(s["status"], "ok");
    assert_eq!(s["chunk_size"], 65536);
    let t = &s["totals"];
    // 16 whole chunks and one of 12345 bytes.
    assert_eq!(u(&t["chunks_planned"]), 17);
    assert_eq!(u(&t["bytes_planned"]), size);
    assert_eq!(u(&t["bytes_read"]), size);
    assert_eq!(u(&t["bytes_zero"]), 0);
    assert_eq!(u(&t["chunks_zero"]), 0);
    assert_eq!(u(&t["chunks_sent"]), 17);
    assert_eq!(u(&t["bytes_data"]), size);
    assert_eq!(u(&t["bytes_stored"]), size, "--compress none stores every byte");
    // 17 data frames (12-byte header, 49 bytes of fields) and one Flush (12 + 12).
    assert_eq!(u(&t["bytes_sent"]), size + 17 * (12 + 49) + 24);
    assert_replica_equals(&ds, "vm1", "odd.img", &img);
    assert_eq!(std::fs::metadata(ds.join("vm1/disks/odd.img.img")).unwrap().len(), size);
}

/// A first copy is written with O_DIRECT where the file system allows it: gigabytes go to the
/// target's disk without filling its page cache.
#[test]
fn a_full_copy_is_written_around_the_page_cache() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    let direct = std::fs::OpenOptions::new().create(true).write(true).custom_flags(libc::O_DIRECT).open(&probe);
    if on_tmpfs(dir.path()) || direct.is_err() {
        eprintln!("skipped: {} is on tmpfs or refuses O_DIRECT ({direct:?})", dir.path().display());
        return;
    }
    let img = dir.path().join("d0.img");
    write_image(&img, 32 * MIB, 21, &[Fill::Random]);
    let ds = dir.path().join("ds");
    replicate(&p(&ds), "vm1", &[named("d0", &img)], &["--chunk-size", "64K"]).expect_code(0);
    let (cached, pages) = cached_pages(&ds.join("vm1").join("disks").join("d0.img"));
    assert_eq!(pages as u64, 32 * MIB / 4096);
    assert!(cached < pages / 100, "{cached} of {pages} pages of the replica cached after its full copy");
    assert_replica_equals(&ds, "vm1", "d0", &img);
}

#[test]
fn zero_byte_and_one_byte_disks_replicate_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let one = dir.path().join("one.img");
    std::fs::write(&one, [0x5Au8]).unwrap();
    let ds = dir.path().join("ds");
    let r = replicate(&p(&ds), "vm1", &[named("e0", &empty), named("e1", &one)], &["--chunk-size", "64K"]);
    r.expect_code(0);
    let s = r.summary();
    let e0 = disk_of(&s, "e0");
    assert_eq!(u(&e0["size"]), 0);
    assert_eq!(u(&e0["chunks_planned"]), 0);
    assert_eq!(u(&e0["bytes_read"]), 0);
    assert_eq!(u(&e0["chunks_sent"]), 0);
    assert_eq!(u(&e0["chunks_zero"]), 0);
    let e1 = disk_of(&s, "e1");
    assert_eq!(u(&e1["size"]), 1);
    assert_eq!(u(&e1["chunks_planned"]), 1);
    assert_eq!(u(&e1["bytes_read"]), 1);
    assert_eq!(u(&e1["chunks_sent"]), 1);
    assert_eq!(u(&e1["chunks_zero"]), 0);
    assert_replica_equals(&ds, "vm1", "e0", &empty);
    assert_replica_equals(&ds, "vm1", "e1", &one);
}

#[test]
fn all_zero_disk_sends_no_data_and_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zero.img");
    let size = 8 * MIB;
    write_image(&img, size, 3, &[Fill::Zero]);
    let ds = dir.path().join("ds");
    let r = replicate(&p(&ds), "vm1", &[p(&img)], &["--chunk-size", "64K"]);
    r.expect_code(0);
    let t = &r.summary()["totals"];
    assert_eq!(u(&t["chunks_planned"]), 128);
    assert_eq!(u(&t["chunks_zero"]), 128);
    assert_eq!(u(&t["bytes_zero"]), size);
    // The image is one hole: a sparse file is not read at all.
    let skipped = skipped_holes(&img, size);
    assert_eq!((u(&t["bytes_read"]), u(&t["bytes_hole_skipped"])), (size - skipped, skipped));
    assert_eq!(u(&t["chunks_sent"]), 0, "no data frame for zeros: {t}");
    // One ZeroRun (12-byte header + 20) and one Flush (12 + 12): nothing else.
    assert_eq!(u(&t["bytes_sent"]), 32 + 24);
    assert_eq!(u(&t["bytes_data"]), 0);
    let replica_img = ds.join("vm1/disks/zero.img.img");
    assert_eq!(std::fs::metadata(&replica_img).unwrap().len(), size);
    assert!(allocated_bytes(&replica_img) <= 64 * KIB, "replica image allocates {}", allocated_bytes(&replica_img));
    let out = dir.path().join("export.raw");
    run(["points", "export", "--target", &p(&ds), "--replica", "vm1", "--disk", "zero.img", "--out", &p(&out)])
        .expect_code(0);
    assert!(same_bytes(&out, &img));
    assert!(allocated_bytes(&out) <= 64 * KIB, "export allocates {}", allocated_bytes(&out));
}

#[test]
fn totals_are_exact_for_mixed_regions_local_and_remote() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mixed.img");
    // 1 MiB regions: R Z T Z R Z T(12345 bytes): 3 MiB of zeros, chunk-aligned.
    let size = 6 * MIB + 12345;
    write_image(&img, size, 4, &[Fill::Random, Fill::Zero, Fill::Text, Fill::Zero]);
    let token = new_token(dir.path(), "token");
    let remote = dir.path().join("remote-ds");
    let server = Server::start(&remote, &token, &[]);
    let local = dir.path().join("local-ds");
    for target in [p(&local), server.url.clone()] {
        let opts = ["--chunk-size", "64K", "--token-file", &p(&token), "--fingerprint", &server.fingerprint];
        let r = replicate(&target, "vm1", &[named("d0", &img)], &opts);
        r.expect_code(0);
        let s = r.summary();
        assert_eq!(s["status"], "ok");
        assert_eq!(s["point_id"], 1);
        let t = &s["totals"];
        assert_eq!(u(&t["bytes_planned"]), size, "{target}");
        // The zero regions are holes of the image: skipped, not read.
        let skipped = skipped_holes(&img, 3 * MIB);
        assert_eq!(u(&t["bytes_read"]), size - skipped, "{target}");
        assert_eq!(u(&t["bytes_hole_skipped"]), skipped, "{target}");
        assert_eq!(u(&t["bytes_zero"]), 3 * MIB, "{target}");
        assert_eq!(u(&t["chunks_planned"]), 97, "{target}");
        assert_eq!(u(&t["chunks_zero"]), 48, "{target}");
        assert_eq!(u(&t["chunks_sent"]), 49, "{target}");
        assert_eq!(u(&t["chunks_sent"]) + u(&t["chunks_zero"]), u(&t["chunks_planned"]));
        // The totals are the sum of the one disk.
        let d = disk_of(&s, "d0");
        for k in ["bytes_read", "bytes_zero", "bytes_sent", "chunks_sent", "chunks_zero"] {
            assert_eq!(d[k], t[k], "{k}");
        }
    }
    let sessions = server.sessions(1);
    assert_eq!(sessions[0]["chunks_zero"], 48);
    assert_eq!(sessions[0]["chunks_written"], 49);
    assert_eq!(u(&sessions[0]["bytes_written"]), size - 3 * MIB);
    assert_eq!(sessions[0]["error"], Value::Null);
    assert_replica_equals(&local, "vm1", "d0", &img);
    assert_replica_equals(&remote, "vm1", "d0", &img);
}

#[test]
fn several_disks_in_one_replica_are_each_identical() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = [
        ("sys", 3 * MIB + 4097, [Fill::Text, Fill::Zero].as_slice()),
        ("data", 2 * MIB, [Fill::Random].as_slice()),
        ("swap", MIB + 1, [Fill::Zero].as_slice()),
    ];
    let mut sources = Vec::new();
    for (i, (name, size, fill)) in imgs.iter().enumerate() {
        let path = dir.path().join(format!("{name}.raw"));
        write_image(&path, *size, 10 + i as u64, fill);
        sources.push(named(name, &path));
    }
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let server = Server::start(&ds, &token, &[]);
    let r =
        replicate(&server.url, "vm1", &sources, &["--token-file", &p(&token), "--fingerprint", &server.fingerprint]);
    r.expect_code(0);
    let s = r.summary();
    assert_eq!(s["disks"].as_array().unwrap().len(), 3);
    let mut total = 0;
    // Holes: sys's second MiB and its last 4097 bytes; all of swap.
    for ((name, size, _), holes) in imgs.iter().zip([MIB + 4097, 0, MIB + 1]) {
        let d = disk_of(&s, name);
        assert_eq!(u(&d["size"]), *size, "{name}");
        let skipped = skipped_holes(&dir.path().join(format!("{name}.raw")), holes);
        assert_eq!(u(&d["bytes_read"]), size - skipped, "{name}");
        assert_eq!(u(&d["bytes_hole_skipped"]), skipped, "{name}");
        total += size - skipped;
    }
    assert_eq!(u(&s["totals"]["bytes_read"]), total);
    assert_eq!(server.sessions(1)[0]["point_id"], 1);
    assert_eq!(entries(&ds.join("vm1/disks")).iter().filter(|n| n.ends_with(".img")).count(), 3);
    for (name, _, _) in &imgs {
        assert_replica_equals(&ds, "vm1", name, &dir.path().join(format!("{name}.raw")));
    }
}

#[test]
fn both_io_backends_on_source_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let size = 4 * MIB + 777;
    write_image(&img, size, 5, &[Fill::Random, Fill::Zero, Fill::Text]);
    let token = new_token(dir.path(), "token");
    for (flag, name) in [("portable", "portable"), ("uring", "io_uring")] {
        // Local target: source and in-process target both on the backend.
        let local = dir.path().join(format!("local-{flag}"));
        let r = replicate(&p(&local), "vm1", &[named("d", &img)], &["--io-backend", flag]);
        r.expect_code(0);
        let s = r.summary();
        assert_eq!(s["backend"], name);
        // The second MiB and the last 777 bytes are holes of the image.
        assert_eq!(u(&s["totals"]["bytes_read"]), size - skipped_holes(&img, MIB + 777));
        assert_replica_equals(&local, "vm1", "d", &img);
        // A server on the backend.
        let remote = dir.path().join(format!("remote-{flag}"));
        let server = Server::start(&remote, &token, &["--io-backend", flag]);
        let opts = ["--io-backend", flag, "--token-file", &p(&token), "--fingerprint", &server.fingerprint];
        let r = replicate(&server.url, "vm1", &[named("d", &img)], &opts);
        r.expect_code(0);
        assert_eq!(r.summary()["backend"], name);
        let sessions = server.sessions(1);
        assert_eq!(sessions[0]["backend"], name, "{}", sessions[0]);
        assert_eq!(sessions[0]["error"], Value::Null);
        assert_replica_equals(&remote, "vm1", "d", &img);
    }
}

/// Next frame from the target (the handshake is already done).
pub(crate) fn next_frame(conn: &Conn, rx: &mut Rx) -> Result<Frame, MoveError> {
    loop {
        let f = rx.next_frame()?.ok_or_else(|| MoveError::PeerGone { peer: "target".into(), side: "target" })?;
        if let Some(Event::Frame(f)) = conn.handle(f)? {
            return Ok(f);
        }
    }
}

/// A raw client session: authenticated, replica `replica` open.
fn raw_session(server: &Server, token: &Path, replica: &str) -> (Arc<Conn>, Rx, Result<Frame, MoveError>) {
    let addr = server.url.strip_prefix("ferry://").unwrap().to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    let trust = ClientTrust { fingerprint: Some(server.fingerprint.parse().unwrap()), ..ClientTrust::default() };
    let tls = ferry_replicate::tls::connect(&mut stream, &addr, &trust).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = Arc::new(ferry_replicate::auth::TokenAuth::from_file(token).unwrap());
    let (conn, mut rx, _) = client_handshake(Link::tls(stream, tls), &addr, auth).unwrap();
    conn.send(&Frame::OpenReplica(OpenReplica {
        replica: replica.into(),
        point_time_ns: 1_700_000_000_000_000_000,
        session_id: [7; 16],
        retain: 0,
        flags: 0,
    }))
    .unwrap();
    let reply = next_frame(&conn, &mut rx);
    (conn, rx, reply)
}

/// A raw client session with replica `vm1` open and a new disk `d0` of two chunks of `cs` bytes.
pub(crate) fn raw_session_with_disk(server: &Server, token: &Path, cs: usize) -> (Arc<Conn>, Rx) {
    let (conn, mut rx, reply) = raw_session(server, token, "vm1");
    assert!(matches!(reply, Ok(Frame::ReplicaOpened(_))), "{reply:?}");
    let size = 2 * cs as u64;
    conn.send(&Frame::OpenDisk(OpenDisk { disk: 0, name: "d0".into(), size, chunk_size: cs as u32, mode: Mode::Full }))
        .unwrap();
    let f = next_frame(&conn, &mut rx).unwrap();
    assert!(matches!(f, Frame::ResumeInfo(ref r) if r.disk == 0 && r.next_chunk == 0), "{f:?}");
    (conn, rx)
}

pub(crate) fn remote_code(r: &Result<Frame, MoveError>) -> Option<ErrorCode> {
    match r {
        Err(MoveError::Wire { source: WireError::Remote { code, .. }, .. }) => Some(*code),
        _ => None,
    }
}

/// The error with its causes, as the CLI prints it.
pub(crate) fn anyhow_like(e: &MoveError) -> String {
    ferry_io::error_chain(e)
}

/// A raw session that writes a good chunk 0 (checkpointed), then a chunk 1 of
/// 0xAB bytes under a wrong digest. Returns the target's answer to chunk 1
/// and the good chunk's bytes.
fn send_chunk_with_wrong_digest(server: &Server, token: &Path) -> (Result<Frame, MoveError>, Vec<u8>) {
    let cs = 64 * KIB as usize;
    let (conn, mut rx) = raw_session_with_disk(server, token, cs);

    // A good chunk 0, made durable by a Flush and its Checkpoint.
    let good = vec![0x11u8; cs];
    conn.send_data(&Data {
        disk: 0,
        chunk: 0,
        logical_len: cs as u32,
        codec: Codec::None,
        digest: *blake3::hash(&good).as_bytes(),
        payload: good.clone().into(),
    })
    .unwrap();
    conn.send(&Frame::Flush(Flush { disk: 0, next_chunk: 1 })).unwrap();
    let f = next_frame(&conn, &mut rx).unwrap();
    assert!(matches!(f, Frame::Checkpoint(ref c) if c.disk == 0 && c.next_chunk == 1), "{f:?}");

    // Chunk 1: 0xAB bytes under the digest of something else.
    conn.send_data(&Data {
        disk: 0,
        chunk: 1,
        logical_len: cs as u32,
        codec: Codec::None,
        digest: *blake3::hash(b"something else").as_bytes(),
        payload: vec![0xABu8; cs].into(),
    })
    .unwrap();
    (next_frame(&conn, &mut rx), good)
}

#[test]
fn chunk_with_a_wrong_digest_is_rejected_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let server = Server::start(&ds, &token, &[]);
    let (reply, good) = send_chunk_with_wrong_digest(&server, &token);
    assert_eq!(remote_code(&reply), Some(ErrorCode::DigestMismatch), "{reply:?}");
    let msg = anyhow_like(&reply.unwrap_err());
    assert!(
        msg.contains("disk \"d0\" chunk 1: data does not match its BLAKE3 digest; nothing of it was written"),
        "{msg}"
    );
    let sessions = server.sessions(1);
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["point_id"], Value::Null);
    assert!(sessions[0]["error"].is_string(), "{}", sessions[0]);
    let image = std::fs::read(ds.join("vm1/disks/d0.img")).unwrap();
    assert_eq!(image.len(), 2 * good.len());
    assert!(image[..good.len()] == good[..], "the verified chunk 0 is written");
    assert!(image[good.len()..].iter().all(|&b| b == 0), "nothing of the bad chunk is written");
    assert!(!image.contains(&0xAB));
}

#[test]
fn a_compressed_payload_longer_than_the_chunk_size_is_refused_and_nothing_written() {
    // Payloads are received into buffers of the chunk size; a sender never sends a zstd
    // frame that does not shrink its chunk, so a longer one is refused before it is read.
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let server = Server::start(&ds, &token, &[]);
    let cs = 64 * KIB as usize;
    let (conn, mut rx) = raw_session_with_disk(&server, &token, cs);
    conn.send_data(&Data {
        disk: 0,
        chunk: 0,
        logical_len: cs as u32,
        codec: Codec::Zstd,
        digest: [1; 32],
        payload: vec![0x5Au8; cs + 1].into(),
    })
    .unwrap();
    let reply = next_frame(&conn, &mut rx);
    assert_eq!(remote_code(&reply), Some(ErrorCode::Protocol), "{reply:?}");
    let msg = anyhow_like(&reply.unwrap_err());
    assert!(msg.contains("frame Data: payload is 65537, above the limit of 65536"), "{msg}");
    let sessions = server.sessions(1);
    assert_eq!(sessions[0]["point_id"], Value::Null);
    let image = std::fs::read(ds.join("vm1/disks/d0.img")).unwrap();
    assert!(image.iter().all(|&b| b == 0), "nothing is written");
}

#[test]
fn digest_mismatch_is_the_error_of_the_servers_session_report() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let server = Server::start(&dir.path().join("ds"), &token, &[]);
    let (reply, _) = send_chunk_with_wrong_digest(&server, &token);
    assert_eq!(remote_code(&reply), Some(ErrorCode::DigestMismatch), "{reply:?}");
    let sessions = server.sessions(1);
    let err = sessions[0]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("disk \"d0\" chunk 1: data does not match its BLAKE3 digest"),
        "session_done: {}",
        sessions[0]
    );
}

#[test]
fn wrong_token_is_refused_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, MIB, 6, &[Fill::Text]);
    let right = new_token(dir.path(), "right");
    let wrong = new_token(dir.path(), "wrong");
    let ds = dir.path().join("ds");
    let server = Server::start(&ds, &right, &[]);
    let r =
        replicate(&server.url, "vm1", &[p(&img)], &["--token-file", &p(&wrong), "--fingerprint", &server.fingerprint]);
    // Exit 2: a retry with the same token will not help.
    r.expect_code(2);
    let addr = server.url.strip_prefix("ferry://").unwrap();
    assert!(r.stderr.contains(&format!("{addr}: peer reported authentication failed")), "stderr: {}", r.stderr);
    assert_eq!(r.summary()["status"], "failed");
    let sessions = server.sessions(1);
    let err = sessions[0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("authentication failed: the client's token does not match"), "{}", sessions[0]);
    assert_eq!(sessions[0]["replica"], Value::Null);
    assert!(!ds.join("vm1").exists(), "nothing is created for the replica");
}

#[test]
fn serve_without_token_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let r = run(["serve", "--listen", "127.0.0.1:0", "--datastore", &p(&ds)]);
    r.expect_code(2);
    assert!(r.stderr.contains("ferry serve needs --token-file"), "{}", r.stderr);
    assert!(r.stderr.contains("`ferry token new --out PATH`"), "{}", r.stderr);
    assert!(!ds.exists(), "no datastore is created");
}

/// Replicate a 64 MiB random image to a server and SIGKILL the server mid-run.
/// Returns the source's exit code, stderr, summary event and the server address.
fn kill_target_mid_run() -> (Option<i32>, String, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.img");
    write_image(&img, 64 * MIB, 7, &[Fill::Random]);
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let mut server = Server::start(&ds, &token, &[]);
    let addr = server.url.strip_prefix("ferry://").unwrap().to_string();
    let start = Instant::now();
    let mut child = ferry()
        .args([
            "replicate",
            "--json",
            "--replica",
            "vm1",
            "--compress",
            "none",
            "--retry-for",
            "0",
            "--source",
            &p(&img),
        ])
        .args(["--target", &server.url, "--token-file", &p(&token), "--fingerprint", &server.fingerprint])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            let _ = tx.send(l);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    // The whole run takes ~150 ms here and its only progress event may be
    // the last one (sent after all data): kill the target at a progress event
    // that is not the end, or 20 ms after the plan, whichever comes first.
    let mut out = Vec::new();
    let mut planned: Option<Instant> = None;
    loop {
        let wait = planned.map_or(Duration::from_secs(20), |t| Duration::from_millis(20).saturating_sub(t.elapsed()));
        match lines.recv_timeout(wait) {
            Ok(l) => {
                let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
                out.push(v.clone());
                assert!(
                    v["event"] != "summary" && v["event"] != "disk_done",
                    "the disk was sent before the target was killed: {l}"
                );
                if v["event"] == "progress" && v["bytes_done"] != v["bytes_total"] {
                    break;
                }
                if v["event"] == "plan" {
                    planned = Some(Instant::now());
                }
            }
            Err(_) if planned.is_some() => break,
            Err(e) => panic!("no plan event: {e}"),
        }
    }
    server.kill();
    let killed = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "source still running 30 s after the target died");
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    out.extend(lines.try_iter().map(|l| serde_json::from_str(&l).unwrap_or(Value::Null)));
    let stderr = err_reader.join().unwrap();
    let summary = out.iter().rev().find(|v| v["event"] == "summary").cloned().expect("summary event");
    // Killed mid-run: no restore point, the interrupted session is kept for resume.
    assert!(!ds.join("vm1/catalog.json").exists(), "a point was committed before the kill");
    assert!(ds.join("vm1/session.json").exists(), "no interrupted session left");
    eprintln!("source ended {:?} after the start", start.elapsed());
    (status.code(), stderr, summary, addr)
}

#[test]
fn target_killed_mid_run_fails_the_source_with_exit_1() {
    let (code, stderr, summary, addr) = kill_target_mid_run();
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert_eq!(summary["status"], "failed");
    // Which of the two the source says is a race (see the ignored test below):
    // the receiver's read fails with ECONNRESET, or the sender sees the target gone.
    let reset = format!("connection to {addr}: Connection reset by peer (os error 104)");
    let gone = format!("{addr} closed the connection unexpectedly (was the target killed or the network cut?)");
    let said = stderr.trim_end().strip_prefix("ferry: error: ").unwrap_or_else(|| panic!("stderr: {stderr}"));
    assert!(said == reset || said == gone, "stderr: {stderr}");
    assert_eq!(summary["error"], said);
}

#[test]
fn target_killed_mid_run_says_the_target_closed_the_connection() {
    let (code, stderr, summary, addr) = kill_target_mid_run();
    assert_eq!(code, Some(1), "stderr: {stderr}");
    let expected = format!("{addr} closed the connection unexpectedly (was the target killed or the network cut?)");
    assert_eq!(stderr.trim_end(), format!("ferry: error: {expected}"));
    assert_eq!(summary["error"], expected);
}

#[test]
fn second_writer_to_a_replica_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, MIB + 3, 8, &[Fill::Text]);
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    let holder = Datastore::open_or_create(&ds).unwrap().lock_replica("vm1", "test holder", 65536, 0).unwrap();
    let busy = "replica \"vm1\" is in use by another session (locked by test holder); try again when it has finished";
    for target in [p(&ds), server.url.clone()] {
        let r = replicate(
            &target,
            "vm1",
            &[p(&img)],
            &["--token-file", &p(&token), "--fingerprint", &server.fingerprint, "--retry-for", "0"],
        );
        // Exit 4: busy, try later (not 1, "failed", or 2, "fix the configuration").
        r.expect_code(4);
        assert!(r.stderr.contains(busy), "{target}: {}", r.stderr);
        assert_eq!(r.summary()["status"], "failed");
    }
    let sessions = server.sessions(1);
    assert!(sessions[0]["error"].as_str().unwrap_or_default().contains(busy), "{}", sessions[0]);
    assert!(!ds.join("vm1/catalog.json").exists());
    drop(holder);
    let r = replicate(&p(&ds), "vm1", &[p(&img)], &[]);
    r.expect_code(0);
    assert_eq!(r.summary()["point_id"], 1);
    let r =
        replicate(&server.url, "vm1", &[p(&img)], &["--token-file", &p(&token), "--fingerprint", &server.fingerprint]);
    r.expect_code(0);
    assert_eq!(r.summary()["point_id"], 2);
    assert_replica_equals(&ds, "vm1", "d.img", &img);
}

#[test]
fn names_that_escape_the_datastore_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, MIB, 9, &[Fill::Text]);
    let ds = dir.path().join("ds");
    for (replica, source, msg) in [
        ("..", p(&img), "replica name \"..\" is not allowed: must not start with '.'"),
        (".hidden", p(&img), "replica name \".hidden\" is not allowed: must not start with '.'"),
        ("vm1", named("..", &img), "disk name \"..\" is not allowed: must not start with '.'"),
        ("vm1", named(".x", &img), "disk name \".x\" is not allowed: must not start with '.'"),
    ] {
        let r = replicate(&p(&ds), replica, &[source], &[]);
        r.expect_code(2);
        assert!(r.stderr.contains(msg), "{replica}: {}", r.stderr);
    }
    assert_eq!(entries(dir.path()), ["d.img", "ds"], "nothing outside the datastore");
    assert_eq!(entries(&ds), ["ferry-datastore.json"], "no replica made");
}

#[test]
fn escaping_names_from_a_raw_client_are_refused_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let server = Server::start(&ds, &token, &[]);
    let (_conn, _rx, reply) = raw_session(&server, &token, "../x");
    assert!(remote_code(&reply).is_some(), "{reply:?}");
    let msg = anyhow_like(&reply.unwrap_err());
    assert!(msg.contains("replica name \"../x\" is not allowed"), "{msg}");

    let (conn, mut rx, reply) = raw_session(&server, &token, "vm1");
    assert!(matches!(reply, Ok(Frame::ReplicaOpened(_))), "{reply:?}");
    conn.send(&Frame::OpenDisk(OpenDisk {
        disk: 0,
        name: "a/../../b".into(),
        size: 65536,
        chunk_size: 65536,
        mode: Mode::Full,
    }))
    .unwrap();
    let reply = next_frame(&conn, &mut rx);
    assert!(remote_code(&reply).is_some(), "{reply:?}");
    let msg = anyhow_like(&reply.unwrap_err());
    assert!(msg.contains("disk name \"a/../../b\" is not allowed: contains '/'"), "{msg}");
    assert_eq!(entries(dir.path()), ["ds", "token"]);
    assert_eq!(server.sessions(2).len(), 2);
    assert!(!ds.join("x").exists() && !ds.join("b").exists() && !ds.join("vm1/b.img").exists());
}

#[test]
fn escaping_names_are_reported_with_the_bad_name_code() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let server = Server::start(&dir.path().join("ds"), &token, &[]);
    let (_conn, _rx, reply) = raw_session(&server, &token, "../x");
    assert_eq!(remote_code(&reply), Some(ErrorCode::BadName), "{reply:?}");
}

#[test]
fn source_that_is_a_directory_or_missing_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let sub = dir.path().join("adir");
    std::fs::create_dir(&sub).unwrap();
    let r = replicate(&p(&ds), "vm1", &[p(&sub)], &[]);
    r.expect_code(2);
    assert!(
        r.stderr.contains(&format!("{} is neither a regular file nor a block device", sub.display())),
        "{}",
        r.stderr
    );
    let missing = dir.path().join("missing.img");
    let r = replicate(&p(&ds), "vm1", &[p(&missing)], &[]);
    r.expect_code(2);
    assert!(r.stderr.contains(&format!("opening source disk {}", missing.display())), "{}", r.stderr);
    assert!(r.stderr.contains("No such file or directory"), "{}", r.stderr);
    assert!(!ds.join("vm1").exists(), "no replica made");
}

/// The next frame `rx` brings, validated by `conn` (handshake frames answered inside).
fn validated(conn: &Conn, rx: &mut Rx) -> Frame {
    let f = rx.next_frame().unwrap().expect("a frame");
    match conn.handle(f).unwrap() {
        Some(Event::Frame(f)) => f,
        other => panic!("not a frame: {other:?}"),
    }
}

/// A client and a server connection over a socketpair, authenticated, with replica `vm1`
/// and a disk 0 of two chunks of `cs` bytes (the last 1000 bytes short) open, and a clone
/// of the client's socket to write raw bytes with. Returns (server conn, server rx, raw
/// socket, client conn and rx).
#[allow(clippy::type_complexity)]
fn open_pair(cs: usize) -> (Arc<Conn>, Rx, std::os::unix::net::UnixStream, (Arc<Conn>, Rx)) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let raw = a.try_clone().unwrap();
    let auth = Arc::new(ferry_replicate::auth::TokenAuth::new(b"dribble"));
    let server = {
        let auth = auth.clone();
        std::thread::spawn(move || server_handshake(Sock::Unix(b), "source", auth).unwrap())
    };
    let (cconn, mut crx, _) = client_handshake(Sock::Unix(a), "target", auth).unwrap();
    let (sconn, mut srx, _) = server.join().unwrap();
    let session_id = [7; 16];
    cconn
        .send(&Frame::OpenReplica(OpenReplica {
            replica: "vm1".into(),
            point_time_ns: 1,
            session_id,
            retain: 0,
            flags: 0,
        }))
        .unwrap();
    assert!(matches!(validated(&sconn, &mut srx), Frame::OpenReplica(_)));
    sconn
        .send(&Frame::ReplicaOpened(ReplicaOpened {
            session_id,
            resumed: false,
            latest_point: 0,
            latest_point_time_ns: 0,
            chunk_size: cs as u32,
            pending_point_time_ns: 0,
        }))
        .unwrap();
    assert!(matches!(validated(&cconn, &mut crx), Frame::ReplicaOpened(_)));
    let size = 2 * cs as u64 - 1000;
    let open = OpenDisk { disk: 0, name: "d0".into(), size, chunk_size: cs as u32, mode: Mode::Full };
    cconn.send(&Frame::OpenDisk(open)).unwrap();
    assert!(matches!(validated(&sconn, &mut srx), Frame::OpenDisk(_)));
    sconn.send(&Frame::ResumeInfo(ResumeInfo { disk: 0, previous_size: 0, next_chunk: 0, flags: 0 })).unwrap();
    assert!(matches!(validated(&cconn, &mut crx), Frame::ResumeInfo(_)));
    (sconn, srx, raw, (cconn, crx))
}

#[test]
fn payloads_dribbled_in_small_pieces_arrive_whole_in_pool_buffers() {
    // The target reads each data payload from the socket straight into a pool buffer
    // (Rx::next_received). Here the frames come 777 bytes at a time, so payloads,
    // heads and the frames after them are split across reads at every kind of place.
    let cs = 64 * KIB as usize;
    let (sconn, mut srx, raw, client) = open_pair(cs);

    // Chunk 0 raw, chunk 1 (short) compressed, then a Flush.
    let raw0: Vec<u8> = (0..cs).map(|i| (i * 7 % 251) as u8).collect();
    // The receiver does not decompress: any payload shorter than the chunk will do.
    let zstd1: Vec<u8> = (0..5000).map(|i| (i % 13) as u8).collect();
    let frames = [(raw0.clone(), Codec::None, cs as u32), (zstd1.clone(), Codec::Zstd, cs as u32 - 1000)];
    let mut wire = Vec::new();
    for (chunk, (payload, codec, logical_len)) in frames.iter().enumerate() {
        let d = Data {
            disk: 0,
            chunk: chunk as u64,
            logical_len: *logical_len,
            codec: *codec,
            digest: [chunk as u8; 32],
            payload: payload.clone().into(),
        };
        wire.extend_from_slice(&Frame::Data(d).to_bytes());
    }
    wire.extend_from_slice(&Frame::Flush(Flush { disk: 0, next_chunk: 2 }).to_bytes());
    let total = wire.len() as u64;
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut raw = raw;
        for piece in wire.chunks(777) {
            raw.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_micros(50));
        }
        raw
    });
    let pool = BufPool::new(3, cs);
    let before = srx.bytes_received;
    let Received::Data(h0, b0) = srx.next_received(&pool, &sconn).unwrap().unwrap() else { panic!("not data") };
    assert_eq!((h0.chunk, h0.codec, h0.payload_len, h0.digest), (0, Codec::None, cs as u32, [0; 32]));
    assert!(b0[..] == raw0[..], "raw payload differs");
    let Received::Data(h1, b1) = srx.next_received(&pool, &sconn).unwrap().unwrap() else { panic!("not data") };
    assert_eq!((h1.chunk, h1.codec, h1.logical_len), (1, Codec::Zstd, cs as u32 - 1000));
    assert_eq!(&b1[..], &zstd1[..]);
    let Received::Frame(f) = srx.next_received(&pool, &sconn).unwrap().unwrap() else { panic!("not a frame") };
    assert!(matches!(sconn.handle(f).unwrap(), Some(Event::Frame(Frame::Flush(Flush { disk: 0, next_chunk: 2 })))));
    assert_eq!(srx.bytes_received - before, total);
    drop(writer.join().unwrap());
    drop(client);
    // The peer is gone between frames: a clean end.
    assert!(srx.next_received(&pool, &sconn).unwrap().is_none());
}

#[test]
fn a_connection_cut_inside_a_payload_is_an_error_not_a_short_chunk() {
    let cs = 64 * KIB as usize;
    let (sconn, mut srx, raw, client) = open_pair(cs);
    let d = Data {
        disk: 0,
        chunk: 0,
        logical_len: cs as u32,
        codec: Codec::None,
        digest: [1; 32],
        payload: vec![9u8; cs].into(),
    };
    let wire = Frame::Data(d).to_bytes();
    {
        use std::io::Write;
        let mut raw = raw;
        raw.write_all(&wire[..wire.len() / 2]).unwrap();
    }
    drop(client);
    let pool = BufPool::new(1, cs);
    let e = srx.next_received(&pool, &sconn).unwrap_err();
    let MoveError::Net { source, .. } = &e else { panic!("not a network error: {e:?}") };
    assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(source.to_string(), "connection closed in the middle of a frame");
    assert!(pool.try_get().is_some(), "the buffer went back to the pool");
}
