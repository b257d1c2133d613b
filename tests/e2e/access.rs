//! Access control at a `ferry serve`: scoped tokens (an access file of name, role,
//! replica glob and verifier key), the target's retention policy (`--keep-min`,
//! `--immutable`), revocation on SIGHUP, and secret files that must be the
//! owner's alone. Real server process, real sockets, real files.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_replicate::conn::{client_handshake, Sock};
use ferry_tests::*;
use ferry_wire::{ErrorCode, Frame, OpenReplica, WireError};

/// `ferry replicate --json` of `image` as disk d0 into `replica` at `server` with `token`.
fn replicate(server: &Server, token: &Path, replica: &str, image: &Path, extra: &[&str]) -> Run {
    Run::of(replicate_cmd(&server.url, token, replica, image).args(server.client_args()).args(extra))
}

/// Ids of the restore points of `replica` in the datastore `ds`.
fn point_ids(ds: &Path, replica: &str) -> Vec<u64> {
    let r = run(["points", "list", "--json", "--target", s(ds), "--replica", replica]);
    r.expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    v["points"].as_array().expect("points").iter().map(|p| p["id"].as_u64().expect("id")).collect()
}

/// The `warning` events of a `--json` run.
fn warnings(r: &Run) -> Vec<String> {
    r.events()
        .iter()
        .filter(|e| e["event"] == "warning")
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A 1 MiB disk image `disk-SEED.img`; `seed` decides its bytes.
fn image(dir: &Path, seed: u64) -> std::path::PathBuf {
    let p = dir.join(format!("disk-{seed}.img"));
    write_image(&p, 1 << 20, seed, &[Fill::Random]);
    p
}

#[test]
fn a_token_scoped_to_web_star_writes_web1_and_cannot_open_db1() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let (web, web_line) = new_scoped_token(dir.path(), "web-writer", "replicate", "web*");
    let access = dir.path().join("access");
    write_access(&access, &[&web_line]);
    let server = Server::start_access(&ds, &access, &[]);
    let img = image(dir.path(), 1);

    let r = replicate(&server, &web, "db1", &img, &[]);
    r.expect_code(2);
    assert!(
        r.stderr.contains(
            "token \"web-writer\" (role replicate, replicas \"web*\") may not open replica \"db1\": it matches only \
             replicas \"web*\""
        ),
        "{}",
        r.stderr
    );
    assert!(!ds.join("db1").exists(), "a refused replica is not created");

    replicate(&server, &web, "web1", &img, &[]).expect_code(0);
    assert_replica_equals(&ds, "web1", "d0", &img);
    let sessions = server.sessions(2);
    assert_eq!(sessions.iter().filter(|v| v["token"] == "web-writer").count(), 2, "{sessions:?}");
}

#[test]
fn a_read_token_plans_but_cannot_replicate() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let (writer, writer_line) = new_scoped_token(dir.path(), "writer", "replicate", "*");
    let (reader, reader_line) = new_scoped_token(dir.path(), "reader", "read", "vm*");
    let access = dir.path().join("access");
    write_access(&access, &[&writer_line, &reader_line]);
    let server = Server::start_access(&ds, &access, &[]);
    let img = image(dir.path(), 2);
    replicate(&server, &writer, "vm1", &img, &[]).expect_code(0);
    let catalog = std::fs::read(ds.join("vm1/catalog.json")).unwrap();

    let changed = image(dir.path(), 3);
    let r = replicate(&server, &reader, "vm1", &changed, &[]);
    r.expect_code(2);
    assert!(
        r.stderr.contains("token \"reader\" (role read, replicas \"vm*\") may not write replica \"vm1\""),
        "{}",
        r.stderr
    );
    let r = run(["plan", "--json", "--target", &server.url, "--token-file", s(&reader), "--replica", "vm1"]
        .into_iter()
        .chain(["--source", &format!("d0={}", s(&changed))])
        .chain(server.client_args()));
    r.expect_code(0);
    // Nothing changed at the target: the same catalog, the first image.
    assert_eq!(std::fs::read(ds.join("vm1/catalog.json")).unwrap(), catalog);
    assert_replica_equals(&ds, "vm1", "d0", &img);
    // Its scope binds plans too.
    let r = run(["plan", "--target", &server.url, "--token-file", s(&reader), "--replica", "db1"]
        .into_iter()
        .chain(["--source", &format!("d0={}", s(&changed))])
        .chain(server.client_args()));
    r.expect_code(2);
    assert!(r.stderr.contains("may not open replica \"db1\""), "{}", r.stderr);
}

#[test]
fn keep_min_keeps_three_points_when_a_source_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let (admin, admin_line) = new_scoped_token(dir.path(), "ops", "admin", "*");
    let (writer, writer_line) = new_scoped_token(dir.path(), "writer", "replicate", "*");
    let access = dir.path().join("access");
    write_access(&access, &[&admin_line, &writer_line]);
    let server = Server::start_access(&ds, &access, &["--keep-min", "3"]);
    for seed in 10..15 {
        replicate(&server, &writer, "vm1", &image(dir.path(), seed), &[]).expect_code(0);
    }
    assert_eq!(point_ids(&ds, "vm1"), vec![1, 2, 3, 4, 5]);

    // A replicate token may not lower retention at all: warned, the setting (7) stays.
    let r = replicate(&server, &writer, "vm1", &image(dir.path(), 15), &["--retain", "1"]);
    r.expect_code(3);
    assert_eq!(r.summary()["status"], "warning");
    assert_eq!(
        warnings(&r),
        vec![
            "target: replica \"vm1\" keeps 7 restore points: token \"writer\" (role replicate, replicas \"*\") may \
              not lower its retention to 1 (an admin token may)"
        ]
    );
    assert_eq!(point_ids(&ds, "vm1"), vec![1, 2, 3, 4, 5, 6]);

    // An admin may lower it, but not below --keep-min 3.
    let img = image(dir.path(), 16);
    let r = replicate(&server, &admin, "vm1", &img, &["--retain", "1"]);
    r.expect_code(3);
    assert_eq!(
        warnings(&r),
        vec![
            "target: replica \"vm1\" keeps 3 restore points, not the 1 asked: the target keeps at least 3 (ferry \
              serve --keep-min)"
        ]
    );
    assert_eq!(point_ids(&ds, "vm1"), vec![5, 6, 7]);
    assert_replica_equals(&ds, "vm1", "d0", &img);
    // The points kept are whole: the oldest still exports (the image of the run that made it).
    let out = dir.path().join("p5.raw");
    run(["points", "export", "--target", s(&ds), "--replica", "vm1", "--disk", "d0", "--point", "5", "--out", s(&out)])
        .expect_code(0);
    let p5 = dir.path().join("p5-source.raw");
    write_image(&p5, 1 << 20, 14, &[Fill::Random]);
    assert!(same_bytes(&out, &p5));
}

#[test]
fn a_point_younger_than_immutable_survives_every_remote_request() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let (admin, admin_line) = new_scoped_token(dir.path(), "ops", "admin", "*");
    let access = dir.path().join("access");
    write_access(&access, &[&admin_line]);
    let server = Server::start_access(&ds, &access, &["--immutable", "1h"]);
    for seed in 20..23 {
        replicate(&server, &admin, "vm1", &image(dir.path(), seed), &[]).expect_code(0);
    }
    // Admin asks for one point: every point is younger than an hour, so all stay.
    let r = replicate(&server, &admin, "vm1", &image(dir.path(), 23), &["--retain", "1"]);
    r.expect_code(3);
    assert_eq!(
        warnings(&r),
        vec![
            "target: replica \"vm1\": retention 1 would drop them, but kept restore point(s) 1, 2, 3 because they \
              are younger than the target's immutable period of 1h (ferry serve --immutable): no remote client can \
              remove them"
        ]
    );
    assert_eq!(point_ids(&ds, "vm1"), vec![1, 2, 3, 4]);
    // A run that asks nothing is told, not warned (exit 0), and still drops nothing.
    let r = replicate(&server, &admin, "vm1", &image(dir.path(), 24), &[]);
    r.expect_code(0);
    assert!(r.events().iter().any(|e| e["event"] == "notice"
        && e["message"].as_str().unwrap_or_default().contains("younger than the target's immutable period")));
    assert_eq!(point_ids(&ds, "vm1"), vec![1, 2, 3, 4, 5]);
    // On the target's host, `ferry points prune` is not bound by the policy.
    drop(server);
    run(["points", "prune", "--target", s(&ds), "--replica", "vm1", "--retain", "2"]).expect_code(0);
    assert_eq!(point_ids(&ds, "vm1"), vec![4, 5]);
}

#[test]
fn sighup_after_removing_a_line_ends_its_running_session_and_refuses_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let (gone, gone_line) = new_scoped_token(dir.path(), "leaving", "replicate", "*");
    let (stays, stays_line) = new_scoped_token(dir.path(), "staying", "replicate", "*");
    let access = dir.path().join("access");
    write_access(&access, &[&gone_line, &stays_line]);
    // The raw client below speaks plaintext (TLS is tests/e2e/tls.rs'): so does this server.
    let server = Server::start_access(&ds, &access, &["--insecure-plaintext"]);
    let img = image(dir.path(), 30);
    replicate(&server, &gone, "vm1", &img, &[]).expect_code(0);

    // A session of the leaving token, open and idle: a real client over TCP.
    let addr = server.url.strip_prefix("ferry://").unwrap().to_string();
    let stream = std::net::TcpStream::connect(&addr).unwrap();
    let auth = Arc::new(ferry_replicate::auth::TokenAuth::from_file(&gone).unwrap());
    let (conn, mut rx, _) = client_handshake(Sock::Tcp(stream), &addr, auth).unwrap();
    // The handshake clears the read timeout: a session the server forgets to end fails the
    // test instead of hanging it.
    rx.set_timeout(Some(Duration::from_secs(20)));
    conn.send(&Frame::OpenReplica(OpenReplica {
        replica: "vm2".into(),
        point_time_ns: 1_700_000_000_000_000_000,
        session_id: [9; 16],
        retain: 0,
        flags: 0,
    }))
    .unwrap();
    let opened = rx.next_frame().unwrap().unwrap();
    assert!(matches!(conn.handle(opened).unwrap(), Some(ferry_wire::Event::Frame(Frame::ReplicaOpened(_)))));

    // A bad file on reload: the old list stays in force, the session goes on.
    write_access(&access, &["not-a-line"]);
    ferry_io::process::signal_process(server.pid(), ferry_io::process::Signal::Hup).unwrap();
    let failed = server.events_named("access_reload_failed", 1);
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["error"].as_str().unwrap().contains("line 2: expected 4 fields"), "{failed:?}");

    write_access(&access, &[&stays_line]);
    ferry_io::process::signal_process(server.pid(), ferry_io::process::Signal::Hup).unwrap();
    let reloaded = server.events_named("access_reloaded", 1);
    assert_eq!(reloaded.len(), 1);
    assert_eq!(reloaded[0]["tokens"], 1);
    assert_eq!(reloaded[0]["sessions_ended"][0]["token"], "leaving");
    // The running session is told why, and ends.
    let f = rx.next_frame().unwrap().expect("an Error frame");
    match conn.handle(f) {
        Err(ferry_replicate::MoveError::Wire { source: WireError::Remote { code, message }, .. }) => {
            assert_eq!(code, ErrorCode::NotAllowed);
            assert_eq!(
                message,
                "token \"leaving\" (role replicate, replicas \"*\") was revoked at the target (its access-file line \
                 was removed or changed); this session ends"
            );
        }
        other => panic!("{other:?}"),
    }
    let ended = server.sessions(2);
    assert!(ended[1]["error"].as_str().unwrap().contains("was revoked at the target"), "{ended:?}");

    // Its next session is refused; the other token goes on.
    let r = replicate(&server, &gone, "vm1", &image(dir.path(), 31), &[]);
    r.expect_code(2);
    assert!(r.stderr.contains("authentication failed"), "{}", r.stderr);
    let img = image(dir.path(), 32);
    replicate(&server, &stays, "vm1", &img, &[]).expect_code(0);
    assert_replica_equals(&ds, "vm1", "d0", &img);
}

#[test]
fn token_and_access_files_others_may_read_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let img = image(dir.path(), 40);
    let r = replicate(&server, &token, "vm1", &img, &[]);
    r.expect_code(2);
    let want = format!(
        "token file {} is accessible by group or others (mode 0644); it holds a secret: run `chmod 600 {}`",
        s(&token),
        s(&token)
    );
    assert!(r.stderr.contains(&want), "{}", r.stderr);
    assert_eq!(server.sessions(1).len(), 0, "nothing was sent");
    // The server refuses to start with such a token file, or such an access file.
    let r = run(["serve", "--listen", "127.0.0.1:0", "--datastore", s(&ds), "--token-file", s(&token)]);
    r.expect_code(2);
    assert!(r.stderr.contains(&want), "{}", r.stderr);
    let (_, line) = new_scoped_token(dir.path(), "a", "read", "*");
    let access = dir.path().join("access");
    write_access(&access, &[&line]);
    std::fs::set_permissions(&access, std::fs::Permissions::from_mode(0o640)).unwrap();
    let r = run(["serve", "--listen", "127.0.0.1:0", "--datastore", s(&ds), "--access", s(&access)]);
    r.expect_code(2);
    assert!(r.stderr.contains("access file") && r.stderr.contains("(mode 0640)"), "{}", r.stderr);
}

#[test]
fn datastore_files_have_no_group_or_other_bits() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    for seed in 50..52 {
        replicate(&server, &token, "vm1", &image(dir.path(), seed), &[]).expect_code(0);
    }
    let mut stack = vec![ds.clone()];
    let mut checked = 0;
    while let Some(p) = stack.pop() {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", p.display());
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
        checked += 1;
    }
    // ds, marker, .tls/, key.pem, cert.pem, vm1, lock, points.lock, replica.json, catalog.json, disks/,
    // d0.img, d0.digests, undo/, undo/1/, d0.undo
    assert_eq!(checked, 16);
}

#[test]
fn token_new_prints_the_access_line_and_checks_it_before_writing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (tok, line) = new_scoped_token(dir.path(), "web-writer", "replicate", "web*");
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields[..3], ["web-writer", "replicate", "web*"]);
    assert!(fields[3].len() == 64 && fields[3].bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
    assert_eq!(std::fs::metadata(&tok).unwrap().permissions().mode() & 0o777, 0o600);
    // The line holds the verifier, not the token; `token line` prints the same line again.
    let secret = std::fs::read_to_string(&tok).unwrap();
    assert!(!line.contains(secret.trim()));
    let again = run(["token", "line", "--token-file", s(&tok), "--name", "web-writer", "--replicas", "web*"]);
    again.expect_code(0);
    assert_eq!(again.stdout.trim(), line);
    // A bad name or role is refused before anything is written.
    let bad = dir.path().join("bad");
    let r = run(["token", "new", "--out", s(&bad), "--name", "web writer"]);
    r.expect_code(2);
    assert!(r.stderr.contains("token name \"web writer\" holds ' '"), "{}", r.stderr);
    let r = run(["token", "new", "--out", s(&bad), "--role", "root"]);
    r.expect_code(2);
    assert!(r.stderr.contains("--role: unknown role \"root\": use read, replicate or admin"), "{}", r.stderr);
    assert!(!bad.exists());
}
