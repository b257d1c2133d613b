//! The transport: TLS 1.3 on every remote session, the target pinned by its
//! certificate's fingerprint, plaintext only when both ends ask for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// `ferry replicate` of `src` as disk d0 of replica vm1 to `target`, with the known-targets
/// file under `config` (`$XDG_CONFIG_HOME`), no retries, no compression.
fn replicate(config: &Path, target: &str, token: &Path, src: &Path, extra: &[&str]) -> Run {
    let mut c = replicate_cmd(target, token, "vm1", src);
    Run::of(c.env("XDG_CONFIG_HOME", config).args(["--compress", "none"]).args(extra))
}

/// Every file under `dir` (relative path -> bytes), to compare a whole datastore byte for byte.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).expect("read dir") {
            let e = e.expect("entry");
            let path = e.path();
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            if e.file_type().expect("type").is_dir() {
                out.insert(rel.join(""), Vec::new());
                walk(root, &path, out);
            } else {
                out.insert(rel, std::fs::read(&path).expect("read file"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn point_ids(ds: &Path) -> Vec<u64> {
    let r = run(["points", "list", "--json", "--target", s(ds), "--replica", "vm1"]);
    r.expect_code(0);
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("points list json");
    v["points"].as_array().expect("points").iter().map(|p| p["id"].as_u64().expect("id")).collect()
}

#[test]
fn a_pinned_target_gets_the_data_a_wrong_or_missing_pin_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let src = dir.path().join("src.img");
    write_image(&src, 4 * MIB + 4321, 11, &[Fill::Random, Fill::Text, Fill::Zero]);
    let config = dir.path().join("config");
    let server = Server::start(&ds, &token, &[]);
    let fp = server.fingerprint.clone();
    assert!(fp.starts_with("sha256:") && fp.len() == 7 + 64, "{fp}");
    let addr = server.url.strip_prefix("ferry://").unwrap().to_string();

    // The identity: made on the first start in DATASTORE/.tls, private, printed without starting.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ds.join(".tls")), 0o700);
    assert_eq!(mode(&ds.join(".tls/key.pem")), 0o600);
    assert_eq!(mode(&ds.join(".tls/cert.pem")), 0o600);
    assert_eq!(run(["fingerprint", "--datastore", s(&ds)]).expect_code(0).stdout.trim(), fp);
    assert_eq!(run(["fingerprint", "--tls-dir", s(&ds.join(".tls"))]).expect_code(0).stdout.trim(), fp);
    let r = run(["fingerprint", "--tls-dir", s(&dir.path().join("nothing"))]);
    r.expect_code(2);
    assert!(r.stderr.contains("no TLS identity in"), "{}", r.stderr);

    // A wrong pin: exit 2 naming both fingerprints; nothing reaches the datastore.
    let before = tree(&ds);
    let wrong = format!("sha256:{}", "0f".repeat(32));
    let r = replicate(&config, &server.url, &token, &src, &["--fingerprint", &wrong]);
    r.expect_code(2);
    assert!(
        r.stderr.contains(&format!("presented the TLS certificate {fp}, but --fingerprint pins {wrong}")),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("nothing was sent"), "{}", r.stderr);
    assert_eq!(r.summary()["status"], "failed");
    // No pin and no --trust-new: exit 2 naming the fingerprint and how to pin it.
    let r = replicate(&config, &server.url, &token, &src, &[]);
    r.expect_code(2);
    assert!(r.stderr.contains(&format!("presented the TLS certificate {fp}, which is not pinned")), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("--fingerprint {fp}")), "{}", r.stderr);
    assert!(r.stderr.contains("--trust-new"), "{}", r.stderr);
    let sessions = server.sessions(2);
    assert_eq!(sessions.len(), 2);
    for sess in &sessions {
        assert_eq!(sess["replica"], Value::Null, "no session opened a replica: {sess}");
        assert_eq!(sess["bytes_received"], 0, "no ferry byte was received: {sess}");
    }
    assert_eq!(tree(&ds), before, "the datastore is unchanged byte for byte");
    assert!(!config.exists(), "nothing was stored without --trust-new");

    // The right pin: the replica is byte-identical.
    replicate(&config, &server.url, &token, &src, &["--fingerprint", &fp]).expect_code(0);
    assert_replica_equals(&ds, "vm1", "d0", &src);
    assert_eq!(point_ids(&ds), [1]);

    // --trust-new stores the pin on first contact; the next run uses it.
    let r = replicate(&config, &server.url, &token, &src, &["--trust-new"]);
    r.expect_code(0);
    let known = config.join("ferry/known-targets");
    let text = std::fs::read_to_string(&known).unwrap();
    assert!(text.lines().any(|l| l == format!("{addr} {fp}")), "{text}");
    replicate(&config, &server.url, &token, &src, &[]).expect_code(0);
    assert_eq!(point_ids(&ds), [1, 2, 3]);
    // A stored pin that no longer matches is a mismatch naming the file, --trust-new or not.
    std::fs::write(&known, format!("{addr} {wrong}\n")).unwrap();
    let before = tree(&ds);
    let r = replicate(&config, &server.url, &token, &src, &["--trust-new"]);
    r.expect_code(2);
    assert!(r.stderr.contains(&format!("but the known-targets file {} pins {wrong}", known.display())), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&known).unwrap(), format!("{addr} {wrong}\n"), "never replaced");
    assert_eq!(tree(&ds), before);
    // A second start keeps the identity.
    drop(server);
    let again = Server::start(&ds, &token, &[]);
    assert_eq!(again.fingerprint, fp);
}

#[test]
fn a_byte_flipped_on_the_wire_fails_the_session_with_an_integrity_error_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let config = dir.path().join("config");
    let v1 = dir.path().join("v1.img");
    write_image(&v1, 8 * MIB, 21, &[Fill::Random]);
    let v2 = dir.path().join("v2.img");
    write_image(&v2, 8 * MIB, 22, &[Fill::Random]);
    let server = Server::start(&ds, &token, &[]);
    replicate(&config, &server.url, &token, &v1, &server.pin()).expect_code(0);
    // 1 MiB into the source's stream: well after the TLS and ferry handshakes, inside the data.
    let proxy = Proxy::start_with(&server.url, Tamper { flip_to_server: Some(MIB), ..Tamper::default() });
    let r = replicate(&config, &proxy.url(), &token, &v2, &server.pin());
    r.expect_code(1);
    assert!(r.stderr.contains("integrity check"), "{}", r.stderr);
    assert_eq!(r.summary()["status"], "failed");
    let sessions = server.sessions(2);
    let err = sessions[1]["error"].as_str().unwrap_or_default();
    assert!(err.contains("a record failed its integrity check"), "{}", sessions[1]);
    assert_eq!(sessions[1]["point_id"], Value::Null);
    assert_eq!(point_ids(&ds), [1], "nothing was committed");
    assert_replica_equals(&ds, "vm1", "d0", &v1);
    // Untouched, the same run goes through.
    replicate(&config, &server.url, &token, &v2, &server.pin()).expect_code(0);
    assert_replica_equals(&ds, "vm1", "d0", &v2);
}

#[test]
fn disk_bytes_never_appear_on_the_wire_unless_both_ends_say_insecure_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let config = dir.path().join("config");
    let marker = b"FERRY-MARKER-7f3a9c-this-must-not-travel-in-clear";
    let src = dir.path().join("src.img");
    {
        let mut img = vec![0u8; 2 * MIB as usize];
        Rng::new(5).fill(&mut img);
        for at in (0..img.len() - marker.len()).step_by(64 << 10) {
            img[at..at + marker.len()].copy_from_slice(marker);
        }
        std::fs::write(&src, &img).unwrap();
    }
    let has_marker = |b: &[u8]| b.windows(marker.len()).any(|w| w == marker);
    let token_text = std::fs::read_to_string(&token).unwrap();

    let tls = Server::start(&dir.path().join("ds-tls"), &token, &[]);
    let proxy = Proxy::start_with(&tls.url, Tamper { record: true, ..Tamper::default() });
    replicate(&config, &proxy.url(), &token, &src, &tls.pin()).expect_code(0);
    let wire = proxy.recorded();
    assert!(wire.len() as u64 > 2 * MIB, "the data went through the proxy: {} bytes", wire.len());
    assert!(!has_marker(&wire), "the marker crossed the wire in clear over TLS");
    assert!(!has_marker(&wire[..]) && !wire.windows(16).any(|w| w == &token_text.as_bytes()[..16]));
    assert_replica_equals(&dir.path().join("ds-tls"), "vm1", "d0", &src);

    // The control: both ends in plaintext, the marker is there for anyone on the path.
    let plain = Server::start(&dir.path().join("ds-plain"), &token, &["--insecure-plaintext"]);
    let proxy = Proxy::start_with(&plain.url, Tamper { record: true, ..Tamper::default() });
    replicate(&config, &proxy.url(), &token, &src, &["--insecure-plaintext"]).expect_code(0);
    assert!(has_marker(&proxy.recorded()), "the control run must show the marker");

    // One end in plaintext: refused with exit 2 and a message that says which flag to change.
    let r = replicate(&config, &tls.url, &token, &src, &["--insecure-plaintext"]);
    r.expect_code(2);
    assert!(r.stderr.contains("this target speaks TLS and the source connected in plaintext"), "{}", r.stderr);
    let r = replicate(&config, &plain.url, &token, &src, &["--trust-new"]);
    r.expect_code(2);
    assert!(r.stderr.contains("this target runs with --insecure-plaintext and the source spoke TLS"), "{}", r.stderr);
    assert!(!config.join("ferry/known-targets").exists(), "a plaintext target is never pinned");
    // Flags that contradict each other are a usage error.
    run([
        "replicate",
        "--source",
        s(&src),
        "--target",
        &tls.url,
        "--replica",
        "x",
        "--insecure-plaintext",
        "--trust-new",
    ])
    .expect_code(2);
}
