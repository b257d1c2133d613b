//! Long bookkeeping phases (issue 20): a run whose source or target works for
//! longer than the server's idle timeout without data to move still succeeds,
//! and the source reports progress at least once a second meanwhile (`--json`
//! progress events with the phase's name). The phases are slowed by the
//! test knob `FERRY_TEST_SLOW=PHASE:SECS` (ferry-replicate `busy`).

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// Seconds a phase is slowed by: past the server's idle timeout (10 s).
const SLOW: u64 = 12;

/// The progress events of `r` in `phase`.
fn progress_in(r: &Run, phase: &str) -> usize {
    r.events().iter().filter(|e| e["event"] == "progress" && e["phase"] == phase).count()
}

#[test]
fn a_source_slow_to_get_a_digest_map_keeps_its_session_and_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, 8 * MIB, 61, &[Fill::Random]);
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &["--idle-timeout", "10s"]);
    let first = Run::of(replicate_cmd(&server.url, &token, "vm", &img).args(server.client_args()));
    first.expect_code(0);
    assert_eq!(progress_in(&first, "digest_map"), 0, "a first run fetches no digest map");
    mutate_blocks(&img, 64 * 1024, 5, 62);

    // The source takes 12 s before it asks for the map: it sends nothing of its own then.
    let slow = format!("digest_map:{SLOW}");
    let r = Run::of(
        replicate_cmd(&server.url, &token, "vm", &img).args(server.client_args()).env("FERRY_TEST_SLOW", &slow),
    );
    r.expect_code(0);
    let beats = progress_in(&r, "digest_map");
    assert!(beats as u64 >= SLOW - 1, "{beats} progress events in {SLOW} s of digest map phase:\n{}", r.stdout);
    let done = server.sessions(2);
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(done.iter().all(|v| v["error"].is_null()), "{done:?}");
    assert!(r.summary()["totals"]["chunks_sent"].as_u64().unwrap() > 0, "the changed chunks went");
    assert_replica_equals(&ds, "vm", "d0", &img);
}

#[test]
fn a_target_slow_to_commit_keeps_the_session_and_the_source_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    write_image(&img, 8 * MIB, 63, &[Fill::Random]);
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let slow = format!("commit:{SLOW}");
    let server = Server::start_env(&ds, &token, &["--idle-timeout", "10s"], &[("FERRY_TEST_SLOW", &slow)]);
    let r = Run::of(replicate_cmd(&server.url, &token, "vm", &img).args(server.client_args()));
    r.expect_code(0);
    let beats = progress_in(&r, "commit");
    assert!(beats as u64 >= SLOW - 1, "{beats} progress events in {SLOW} s of commit:\n{}", r.stdout);
    assert_eq!(r.summary()["point_id"], 1);
    let done = server.sessions(1);
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(done.iter().all(|v| v["error"].is_null()), "{done:?}");
    assert_replica_equals(&ds, "vm", "d0", &img);
}
