//! One session striped over several TCP connections (`ferry replicate --streams`):
//! a byte-identical replica over TLS, a cut stream that fails the session cleanly and
//! a next run that resumes (sending the remainder and at most one checkpoint window
//! again), and joins that are refused.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_replicate::conn::{client_handshake, Link};
use ferry_replicate::tls::ClientTrust;
use ferry_tests::*;
use ferry_wire::{ErrorCode, Frame, Join, WireError};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const CS: u64 = 64 << 10;

/// `ferry replicate --json` of `src` as disk d0 of replica vm1, no retries, no compression.
fn replicate(config: &Path, target: &str, token: &Path, src: &Path, extra: &[&str]) -> Run {
    let mut c = replicate_cmd(target, token, "vm1", src);
    Run::of(c.env("XDG_CONFIG_HOME", config).args(["--compress", "none", "--chunk-size", "64K"]).args(extra))
}

fn total(summary: &Value, field: &str) -> u64 {
    summary["disks"].as_array().expect("disks").iter().map(|d| d[field].as_u64().expect(field)).sum()
}

#[test]
fn four_streams_over_tls_give_a_byte_identical_replica() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let src = dir.path().join("src.img");
    write_image(&src, 24 * MIB + 4321, 5, &[Fill::Random, Fill::Text, Fill::Zero, Fill::Random]);
    let server = Server::start(&ds, &token, &[]);
    let config = dir.path().join("config");

    let r = replicate(&config, &server.url, &token, &src, &[&server.pin()[..], &["--streams", "4"]].concat());
    r.expect_code(0);
    let sum = r.summary();
    assert_eq!(sum["streams"], 4, "{sum}");
    assert_replica_equals(&ds, "vm1", "d0", &src);

    // One session: the first connection holds the replica and makes the point; the three
    // joined ones carried their share of the frames and opened nothing.
    let done = server.sessions(4);
    assert_eq!(done.len(), 4, "{done:?}");
    let (first, joined): (Vec<&Value>, Vec<&Value>) = done.iter().partition(|v| v["replica"] == "vm1");
    assert_eq!(first.len(), 1, "{done:?}");
    assert_eq!(first[0]["point_id"], 1);
    assert_eq!(first[0]["error"], Value::Null, "{done:?}");
    for j in &joined {
        assert_eq!(j["error"], Value::Null, "{done:?}");
        assert!(j["bytes_received"].as_u64().unwrap() > MIB, "every stream carried data: {done:?}");
    }

    // An incremental run over 4 streams: the changed chunks only, identical again.
    mutate_blocks(&src, CS, 40, 9);
    let r = replicate(&config, &server.url, &token, &src, &[&server.pin()[..], &["--streams", "4"]].concat());
    r.expect_code(0);
    assert_eq!(r.summary()["streams"], 4);
    assert!(total(&r.summary(), "chunks_sent") <= 40, "{}", r.summary());
    assert_replica_equals(&ds, "vm1", "d0", &src);

    // `auto` on loopback: one connection (nothing to gain from more).
    let r = replicate(&config, &server.url, &token, &src, &server.pin());
    r.expect_code(0);
    assert_eq!(r.summary()["streams"], 1);
}

/// `--streams N` joins its connections all at once (each join is about five round trips:
/// one after another they cost seconds on a long path). A proxy holds every joined
/// connection until all of them are open: joined one after another, the first would wait
/// there in vain for 10 s, and the proxy says so.
#[test]
fn fixed_streams_join_all_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let src = dir.path().join("src.img");
    write_image(&src, 8 * MIB, 29, &[Fill::Random, Fill::Text]);
    let server = Server::start(&ds, &token, &[]);
    let config = dir.path().join("config");
    let proxy = Proxy::start_with(&server.url, Tamper { together: 4, ..Tamper::default() });
    let r = replicate(&config, &proxy.url(), &token, &src, &[&server.pin()[..], &["--streams", "4"]].concat());
    r.expect_code(0);
    assert_eq!(r.summary()["streams"], 4);
    assert_eq!(proxy.connections(), 4);
    assert!(proxy.were_together(4), "the joined connections were opened one after another");
    assert_replica_equals(&ds, "vm1", "d0", &src);
}

#[test]
fn auto_adds_streams_mid_run_and_the_replica_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let src = dir.path().join("src.img");
    write_image(&src, 24 * MIB + 4321, 23, &[Fill::Random, Fill::Text, Fill::Zero, Fill::Random]);
    let server = Server::start(&ds, &token, &[]);
    let config = dir.path().join("config");
    // `auto` on loopback starts with one connection; the test knob adds one after every
    // 2 MiB sent per connection (what window-limited connections on a long path get),
    // while the run lasts (about 1 s at 20 MB/s).
    let extra = ["--streams", "auto", "--streams-grow-every", "2M", "--bwlimit", "20M"];
    let r = replicate(&config, &server.url, &token, &src, &[&server.pin()[..], &extra].concat());
    r.expect_code(0);
    let sum = r.summary();
    assert_eq!(sum["streams_at_start"], 1, "{sum}");
    let streams = sum["streams"].as_u64().unwrap();
    assert!((2..=8).contains(&streams), "streams joined during the run: {sum}");
    let per_stream: Vec<u64> = sum["stream_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
    assert_eq!(per_stream.len() as u64, streams, "{sum}");
    assert_eq!(per_stream.iter().sum::<u64>(), sum["wire_bytes"].as_u64().unwrap(), "{sum}");
    assert!(per_stream[1] > MIB, "the stream that joined mid-run carried data: {sum}");
    assert_replica_equals(&ds, "vm1", "d0", &src);
    // One session: the first connection made the point, the joined ones opened nothing.
    let done = server.sessions(streams as usize);
    let first: Vec<&Value> = done.iter().filter(|v| v["replica"] == "vm1").collect();
    assert_eq!(first.len(), 1, "{done:?}");
    assert_eq!(first[0]["point_id"], 1, "{done:?}");
    assert!(done.iter().all(|v| v["error"] == Value::Null), "{done:?}");
}

#[test]
fn a_cut_stream_fails_the_session_cleanly_and_the_next_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let src = dir.path().join("src.img");
    let size = 96 * MIB;
    write_image(&src, size, 17, &[Fill::Random]);
    let chunks = size / CS;
    let server = Server::start(&ds, &token, &[]);
    let config = dir.path().join("config");
    // The third connection is cut after 8 MiB of the source's bytes: one of the joined
    // streams 1-3, which join all at once.
    let proxy = Proxy::start(&server.url, vec![u64::MAX, u64::MAX, 8 * MIB]);
    let args = [&server.pin()[..], &["--streams", "4", "--checkpoint-every", "1M"]].concat();

    let r = replicate(&config, &proxy.url(), &token, &src, &args);
    r.expect_code(1);
    assert!((1..4).any(|n| r.stderr.contains(&format!("stream {n}"))), "the error names the cut stream: {}", r.stderr);
    assert_eq!(proxy.cut_streams().len(), 1);
    let failed = server.sessions(4);
    let first: Vec<&Value> = failed.iter().filter(|v| v["replica"] == "vm1").collect();
    assert_eq!(first.len(), 1, "{failed:?}");
    assert_eq!(first[0]["point_id"], Value::Null, "nothing committed: {failed:?}");
    assert!(first[0]["error"].as_str().unwrap().contains("stream"), "{failed:?}");
    let written = first[0]["chunks_written"].as_u64().unwrap();
    assert!(written > 16 && written < chunks, "the cut fell mid-disk: {written} of {chunks} chunks written");

    // The next run (the lock was released) resumes from the last durable checkpoint.
    let r = replicate(&config, &proxy.url(), &token, &src, &args);
    r.expect_code(0);
    let sum = r.summary();
    assert_eq!(sum["resumed"], true, "{sum}");
    assert_eq!(sum["streams"], 4, "{sum}");
    assert_replica_equals(&ds, "vm1", "d0", &src);
    let resumed = total(&sum, "chunks_resumed");
    let sent = total(&sum, "chunks_sent");
    // A resumed session compares with the target's digests: chunks written after the last
    // checkpoint are found unchanged rather than sent again.
    let unchanged = total(&sum, "chunks_unchanged");
    assert_eq!(resumed + sent + unchanged, chunks, "every chunk once: resumed, unchanged or sent ({sum})");
    assert!(resumed > 0, "the run resumed from a durable checkpoint ({sum})");
    // The remainder, plus at most one checkpoint window (1 MiB = 16 chunks, and the
    // barrier of the window under way), of what the target had written.
    let window = 2 * (MIB / CS);
    assert!(sent <= chunks - written + window, "sent {sent}, remainder {}, window {window}", chunks - written);
    // On the wire: those chunks and their frames (Seq included), TLS records, control frames.
    let per_chunk = CS + 61 + 20;
    let wire = sum["wire_bytes"].as_u64().unwrap();
    assert!(wire <= sent * per_chunk * 1003 / 1000 + 256 * 1024, "wire {wire} for {sent} chunks");
    assert_eq!(server.sessions(8).iter().filter(|v| v["point_id"] == 1).count(), 1, "one restore point");
}

#[test]
fn a_join_with_a_wrong_ticket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let server = Server::start(&ds, &token, &[]);
    let addr = server.url.strip_prefix("ferry://").unwrap().to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    let trust = ClientTrust { fingerprint: Some(server.fingerprint.parse().unwrap()), ..ClientTrust::default() };
    let tls = ferry_replicate::tls::connect(&mut stream, &addr, &trust).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = Arc::new(ferry_replicate::auth::TokenAuth::from_file(&token).unwrap());
    let (conn, mut rx, _) = client_handshake(Link::tls(stream, tls), &addr, auth).unwrap();
    conn.send(&Frame::Join(Join { ticket: [0x5A; 32], stream: 1 })).unwrap();
    let f = rx.next_frame().unwrap().expect("an Error frame");
    match conn.handle(f) {
        Err(ferry_replicate::MoveError::Wire { source: WireError::Remote { code, message }, .. }) => {
            assert_eq!(code, ErrorCode::NotAllowed);
            assert_eq!(
                message,
                "join refused: unknown or expired stream ticket (the session it belonged to has ended)"
            );
        }
        other => panic!("{other:?}"),
    }
    let done = server.sessions(1);
    assert!(done[0]["error"].as_str().unwrap().contains("join refused"), "{done:?}");
    assert_eq!(done[0]["replica"], Value::Null);
}
