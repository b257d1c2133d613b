//! Replays the committed corpus of the `metadata` fuzz target through its own
//! check, so stable `cargo test` runs the catalog, session and undo readers on
//! every input the fuzzer kept. `FERRY_WRITE_CORPUS=1` (re)writes the seeds:
//! files the datastore itself wrote.

use std::path::PathBuf;

#[path = "../fuzz/fuzz_targets/checks.rs"]
mod checks;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/metadata")
}

#[test]
fn replay_metadata_corpus() {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 5, "{} corpus files", files.len());
    for f in files {
        eprintln!("{}", f.display());
        checks::metadata(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn write_seed_corpus() {
    use ferry_datastore::store::{encode_catalog, Catalog, PointDisk, RestorePoint, UndoExtent};
    use ferry_datastore::undo::UndoWriter;

    if std::env::var_os("FERRY_WRITE_CORPUS").is_none() {
        return;
    }
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let seed = |name: &str, which: u8, bytes: &[u8]| {
        let mut v = vec![which];
        v.extend_from_slice(bytes);
        std::fs::write(dir.join(name), v).unwrap();
    };
    let point = |id: u64| RestorePoint {
        id,
        point_time_ns: 1_700_000_000_000_000_000 + id as i64,
        completed_ns: 1_700_000_000_000_000_100 + id as i64,
        ferry_version: "0.1.0".into(),
        session_id: "00112233445566778899aabbccddeeff".into(),
        disks: vec![PointDisk {
            name: "sda".into(),
            size: 3 << 16,
            chunks_changed: 2,
            bytes_changed: 2 << 16,
            undo: (id == 1).then_some(UndoExtent { bytes: 65_700, records: 2 }),
        }],
    };
    let c = Catalog { version: 1, next_id: 3, points: vec![point(1), point(2)], checksum: None };
    seed("catalog-checksummed", 0, &encode_catalog(&c));
    seed("catalog-old-without-checksum", 0, &serde_json::to_vec_pretty(&c).unwrap());
    seed("session", 1, br#"{"version":1,"session_id":"00","point_time_ns":1,"started_ns":2,"disks":{"sda":{"size":196608,"previous_size":0,"next_chunk":1,"chunks_changed":1,"bytes_changed":65536}}}"#);
    let tmp = tempfile::tempdir().unwrap();
    let mut w = UndoWriter::open(tmp.path(), 1, "sda", 1 << 16, 3 << 16).unwrap();
    w.append(0, &[7u8; 1 << 16]).unwrap();
    w.append(2, &[9u8; 1000]).unwrap();
    w.sync().unwrap();
    let undo = std::fs::read(w.path()).unwrap();
    seed("undo-two-records", 2, &undo);
    seed("undo-torn", 2, &undo[..undo.len() - 10]);
    seed("undo-header-only", 2, &undo[..64]);
}
