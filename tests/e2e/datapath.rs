//! The data path: full replication through the real binary, local and over TCP.

use ferry_tests::*;

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
        .args(["--target", &server.url, "--token-file"])
        .arg(&token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let sessions = server.sessions(1);
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["point_id"], 1);
    assert_replica_equals(&remote, "vm1", "d0", &img);
}
