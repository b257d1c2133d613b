//! Replays the committed fuzz corpus (`fuzz/corpus/TARGET/`) through the fuzz
//! targets' own checks, so stable `cargo test` catches a regression of anything
//! the fuzzers found. `FERRY_WRITE_CORPUS=1` (re)writes the seed files.

use std::path::PathBuf;

use ferry_planner::DigestMap;

#[path = "../../fuzz/fuzz_targets/checks.rs"]
mod checks;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn replay(target: &str, check: fn(&[u8])) {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "fuzz/corpus/{target} has {} files", files.len());
    for f in files {
        eprintln!("{}", f.display());
        check(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn replay_cbt_corpus() {
    replay("cbt", checks::cbt);
}

#[test]
fn replay_digest_map_corpus() {
    replay("digest_map", checks::digest_map);
}

#[test]
fn replay_backup_manifest_corpus() {
    replay("backup_manifest", checks::backup_manifest);
}

#[test]
fn write_seed_corpus() {
    if std::env::var_os("FERRY_WRITE_CORPUS").is_none() {
        return;
    }
    let seed = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for e in std::fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let mut v = (64u64 << 20).to_le_bytes().to_vec();
            v.extend(std::fs::read(&p).unwrap());
            seed("cbt", &format!("data-{}", p.file_name().unwrap().to_string_lossy()), &v);
        }
    }
    let with_size = |size: u64, json: &str| {
        let mut v = size.to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v
    };
    seed("cbt", "extents-bare", &with_size(1 << 20, r#"[{"offset":0,"length":4096},{"offset":65536,"length":512}]"#));
    seed(
        "cbt",
        "extents-wrapped",
        &with_size(1 << 20, r#"{"size":1048576,"extents":[{"offset":4096,"length":4096}]}"#),
    );
    seed("cbt", "empty-list", &with_size(4096, "[]"));
    seed("cbt", "past-the-end", &with_size(4096, r#"[{"offset":4000,"length":4096}]"#));
    seed(
        "cbt",
        "vmware-one",
        &with_size(1 << 30, r#"{"startOffset":0,"length":1073741824,"changedArea":[{"start":0,"length":65536}]}"#),
    );
    for (name, chunk, size) in [("empty", 65536u32, 0u64), ("one-short", 65536, 1000), ("three", 65536, 3 * 65536 - 1)]
    {
        let mut m = DigestMap::new(chunk, size).unwrap();
        for i in 0..m.chunk_count() {
            m.set(i, [i as u8 + 1; 32]);
        }
        seed("digest_map", &format!("map-{name}"), &m.encode());
    }
    seed("digest_map", "geometry-small", &[3, 0, 0, 0, 0x10, 0x27, 0, 0, 7, 0, 0, 0, 0xAA, 0xBB]);
    seed("digest_map", "short", b"FERRYDM");
    let manifest = |parent: &str, time: &str| {
        format!(
            r#"{{"format":"ferry-backup-point/1","vm":"web","point_time":"{time}","disks":{{"sda":"sda.qcow2"}},"parent":{parent}}}"#
        )
    };
    seed("backup_manifest", "full", manifest("null", "2026-11-22T03:00:00Z").as_bytes());
    seed("backup_manifest", "incremental", manifest("\"p1\"", "2026-11-22T03:00:00.5+01:00").as_bytes());
    seed("backup_manifest", "bad-time", manifest("null", "2026-13-22T03:00:00Z").as_bytes());
    seed("backup_manifest", "unknown-field", br#"{"format":"ferry-backup-point/1","x":1}"#);
    seed("backup_manifest", "not-json", b"\xff\xfe");
}
