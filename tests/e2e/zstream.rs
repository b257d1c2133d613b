//! Stream compression (codec zstd-stream): replicas byte-identical over a
//! local target and a TLS server, the levels in the summary, a killed run
//! resumed with fresh streams, and a target that refuses stream chunks out of
//! order as an integrity error.

use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;

use ferry_replicate::zstream::StreamEncoder;
use ferry_tests::*;
use ferry_wire::{Codec, Data, ErrorCode, Frame};
use serde_json::Value;

use crate::datapath::{anyhow_like, next_frame, raw_session_with_disk, remote_code};

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The summary's levels: every data chunk counted once, stream mode on, and
/// the compressed level `level` holding most of the compressible chunks.
fn check_levels(s: &Value, level: i64) {
    assert_eq!(s["compress_stream"], true, "{s}");
    let levels = s["levels"].as_array().expect("levels");
    let chunks: u64 = levels.iter().map(|l| u(&l["chunks"])).sum();
    assert_eq!(chunks, u(&s["totals"]["chunks_sent"]), "{s}");
    let bytes_in: u64 = levels.iter().map(|l| u(&l["bytes_in"])).sum();
    assert_eq!(bytes_in, u(&s["totals"]["bytes_data"]), "{s}");
    let z = levels.iter().find(|l| l["level"] == level).unwrap_or_else(|| panic!("no level {level}: {s}"));
    assert_eq!(u(&z["bytes_in"]), u(&s["totals"]["bytes_compressed_in"]), "{s}");
    assert_eq!(u(&z["bytes_out"]), u(&s["totals"]["bytes_compressed_out"]), "{s}");
    assert!(u(&z["bytes_out"]) * 2 < u(&z["bytes_in"]), "text compresses: {s}");
    for l in levels {
        assert!(l["level"] == 0 || l["level"] == level, "{s}");
    }
}

#[test]
fn stream_compression_local_and_tls_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    // Text regions that repeat a vocabulary, incompressible and zero regions between them.
    write_image(&img, 9 * MIB + 4321, 5, &[Fill::Text, Fill::Random, Fill::Text, Fill::Zero]);
    let args = |target: &str| {
        let mut a: Vec<String> =
            ["replicate", "--json", "--replica", "vm1", "--compress", "zstd:3", "--target", target]
                .map(String::from)
                .to_vec();
        a.extend(["--source".into(), format!("d0={}", img.display())]);
        a
    };
    let local = dir.path().join("local");
    let r = run(args(&p(&local)));
    r.expect_code(0);
    check_levels(&r.summary(), 3);
    assert_replica_equals(&local, "vm1", "d0", &img);

    let token = new_token(dir.path(), "token");
    let remote = dir.path().join("remote");
    let server = Server::start(&remote, &token, &[]);
    let mut a = args(&server.url);
    a.extend(["--token-file".into(), p(&token), "--fingerprint".into(), server.fingerprint.clone()]);
    let r = run(a);
    r.expect_code(0);
    check_levels(&r.summary(), 3);
    assert_eq!(server.sessions(1)[0]["error"], Value::Null);
    assert_replica_equals(&remote, "vm1", "d0", &img);
    // The text line names the levels too.
    let r = run(args(&p(&dir.path().join("text"))).into_iter().filter(|a| a != "--json"));
    r.expect_code(0);
    assert!(r.stdout.contains("compressed (streams): raw "), "{}", r.stdout);
    assert!(r.stdout.contains(", zstd 3 "), "{}", r.stdout);
}

#[test]
fn a_killed_stream_run_resumes_with_fresh_streams_and_ends_identical() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    write_image(&img, 24 * MIB, 9, &[Fill::Text, Fill::Text, Fill::Random]);
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let server = Server::start(&ds, &token, &[]);
    let cmd = |level: &str| {
        let mut c = ferry();
        c.args(["replicate", "--json", "--replica", "vm1", "--compress", level, "--checkpoint-every", "1M"])
            .args(["--retry-for", "30", "--source", &format!("d0={}", img.display())])
            .args(["--target", &server.url, "--token-file", &p(&token), "--fingerprint", &server.fingerprint]);
        c
    };
    // zstd 19 is slow: kill the source once 4 MiB are done (checkpoints made).
    let mut child = cmd("zstd:19").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap_or(Value::Null);
        if v["event"] == "progress" && v["bytes_done"].as_u64().unwrap_or(0) >= 4 * MIB {
            break;
        }
        assert_ne!(v["event"], "summary", "the run ended before it was killed: {v}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The resumed run: new streams (seq 0 again), at another level.
    let out = cmd("zstd:3").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let s: Value = stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok()).unwrap();
    assert_eq!(s["resumed"], true, "{s}");
    assert!(u(&s["disks"][0]["chunks_resumed"]) > 0, "{s}");
    check_levels(&s, 3);
    assert_replica_equals(&ds, "vm1", "d0", &img);
}

/// Two stream chunks of text, compressed by one stream (seq 0 and 1).
fn two_stream_chunks(cs: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.img");
    write_image(&img, 2 * cs as u64, 3, &[Fill::Text]);
    let data = std::fs::read(&img).unwrap();
    let chunks: Vec<Vec<u8>> = data.chunks(cs).map(<[u8]>::to_vec).collect();
    let mut enc = StreamEncoder::new(0, 3);
    let payloads = chunks
        .iter()
        .map(|c| {
            let mut out = vec![0u8; cs - 1];
            let n = enc.compress(3, c, &mut out).expect("text compresses");
            out.truncate(n);
            out
        })
        .collect();
    (chunks, payloads)
}

#[test]
fn stream_chunks_out_of_order_are_an_integrity_error_and_nothing_is_written() {
    let cs = 64 * 1024;
    let (chunks, payloads) = two_stream_chunks(cs);
    let data = |chunk: u64, payload: &[u8]| Data {
        disk: 0,
        chunk,
        logical_len: cs as u32,
        codec: Codec::ZstdStream,
        digest: *blake3::hash(&chunks[chunk as usize]).as_bytes(),
        payload: payload.to_vec().into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    // (what is sent, what the target says)
    let cases: [(&[usize], &str); 2] = [
        // A stream that does not start at seq 0.
        (&[1], "compression stream 0 out of order: chunk seq 1 where 0 (a stream's first chunk) was due"),
        // A gap: chunk 0 as seq 0, then chunk 1's bytes numbered seq 5.
        (&[0, 5], "compression stream 0 out of order: chunk seq 5 where 1 was due"),
    ];
    for (i, (sent, expect)) in cases.iter().enumerate() {
        let ds = dir.path().join(format!("ds{i}"));
        let server = Server::start(&ds, &token, &[]);
        let (conn, mut rx) = raw_session_with_disk(&server, &token, cs);
        for (chunk, &which) in sent.iter().enumerate() {
            let mut payload = payloads[which.min(1)].clone();
            if which > 1 {
                payload[4..12].copy_from_slice(&(which as u64).to_le_bytes());
            }
            // The target may close the session before the second frame goes out.
            let _ = conn.send_data(&data(chunk as u64, &payload));
        }
        let reply = next_frame(&conn, &mut rx);
        assert_eq!(remote_code(&reply), Some(ErrorCode::DigestMismatch), "case {i}: {reply:?}");
        let msg = anyhow_like(&reply.unwrap_err());
        assert!(msg.contains(expect), "case {i}: {msg}");
        let sessions = server.sessions(1);
        assert!(sessions[0]["error"].as_str().unwrap_or("").contains(expect), "case {i}: {}", sessions[0]);
        assert_eq!(sessions[0]["point_id"], Value::Null);
        // Case 1: chunk 0 (seq 0) was fine and may be written; chunk 1 never is.
        let image = std::fs::read(ds.join("vm1/disks/d0.img")).unwrap();
        assert!(image[cs..].iter().all(|&b| b == 0), "case {i}: nothing of the refused chunk is written");
    }
}

#[test]
fn a_stream_chunk_that_does_not_decode_is_an_integrity_error() {
    let cs = 64 * 1024;
    let (chunks, payloads) = two_stream_chunks(cs);
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let server = Server::start(&dir.path().join("ds"), &token, &[]);
    let (conn, mut rx) = raw_session_with_disk(&server, &token, cs);
    // Chunk 1's stream bytes decoded without chunk 0's history: not chunk 1.
    let mut payload = payloads[1].clone();
    payload[4..12].copy_from_slice(&0u64.to_le_bytes());
    conn.send_data(&Data {
        disk: 0,
        chunk: 0,
        logical_len: cs as u32,
        codec: Codec::ZstdStream,
        digest: *blake3::hash(&chunks[1]).as_bytes(),
        payload: payload.into(),
    })
    .unwrap();
    let reply = next_frame(&conn, &mut rx);
    assert_eq!(remote_code(&reply), Some(ErrorCode::DigestMismatch), "{reply:?}");
    assert!(!matches!(reply, Ok(Frame::Checkpoint(_))));
}
