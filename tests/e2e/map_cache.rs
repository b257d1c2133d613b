//! The source's digest map cache (`--map-cache`, `--no-map-cache`): a
//! digest-mode run whose cached map the target confirms downloads no map; a
//! cache that is corrupt, foreign or stale (rollback, resize) is a miss and
//! the result is the same.

use std::path::{Path, PathBuf};

use ferry_tests::*;
use serde_json::Value;

const CS: u64 = 64 * 1024;
/// A DigestMapEnd frame: 12-byte header + 45-byte body.
const END_BYTES: u64 = 57;

/// Map bytes a download of a map of a `size`-byte disk takes: DigestMapParts
/// (12 + 16 bytes + 32 per digest, up to 16384 digests each) and the End.
fn fetched_bytes(size: u64) -> u64 {
    let n = size.div_ceil(CS);
    n.div_ceil(16384) * 28 + 32 * n + END_BYTES
}

fn replicate(target: &str, img: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["replicate", "--json", "--replica", "vm1", "--chunk-size", "64K", "--retry-for", "0"];
    args.extend(["--target", target, "--source", img.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let r = run(&args);
    r.expect_code(0);
    for e in r.events() {
        assert!(e["event"] != "notice" || !e["message"].as_str().unwrap().contains("digest map"), "{e}");
    }
    r.summary()
}

/// `(digest_map, digest_map_bytes)` of the first disk of a summary.
fn map_of(summary: &Value) -> (String, u64) {
    let d = &summary["disks"][0];
    (d["digest_map"].as_str().unwrap_or("?").to_string(), d["digest_map_bytes"].as_u64().unwrap())
}

/// The files in a cache directory (none when it does not exist).
fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// The cache holds exactly one map, byte-identical to the canonical encoding of the target's
/// stored map of the disk (the target stores it sparse, DATASTORE.md "Digest map files").
fn assert_cache_is_targets_map(maps: &Path, ds: &Path, disk: &str) -> PathBuf {
    let files = cache_files(maps);
    assert_eq!(files.len(), 1, "cache files: {files:?}");
    let target_map = ds.join("vm1").join("disks").join(format!("{disk}.digests"));
    let stored = ferry_datastore::digests::load_as_stored(&target_map).expect("the target's map checks out");
    assert!(
        std::fs::read(&files[0]).unwrap() == stored.encode(),
        "the cached map differs from the target's {}",
        target_map.display()
    );
    files[0].clone()
}

/// Overwrite chunk `chunk` of `img` with `data` (zeros when None).
fn write_chunk(img: &Path, chunk: u64, seed: u64, zero: bool) {
    let mut buf = vec![0u8; CS as usize];
    if !zero {
        Rng::new(seed).fill(&mut buf);
    }
    let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    write_at(&mut f, chunk * CS, &buf);
    f.sync_all().unwrap();
}

/// The server session that made restore point `point`.
fn session_of(server: &Server, runs: usize, point: &Value) -> Value {
    let sessions = server.sessions(runs);
    sessions
        .into_iter()
        .find(|s| s["point_id"] == *point)
        .unwrap_or_else(|| panic!("no session_done for point {point}"))
}

#[test]
fn digest_runs_hit_the_cache_after_digest_cbt_full_and_resize_runs() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    // A partial last chunk: 64 full chunks and 12345 bytes.
    let mut size = (4 << 20) + 12345;
    write_image(&img, size, 7, &[Fill::Random, Fill::Zero, Fill::Text]);
    let ds = dir.path().join("ds");
    let maps = dir.path().join("maps");
    let maps_s = maps.to_str().unwrap();
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    let tok = token.to_str().unwrap();
    let mut runs = 0;
    let mut go = |extra: &[&str]| {
        runs += 1;
        let mut a = vec!["--token-file", tok, "--fingerprint", &server.fingerprint];
        a.extend_from_slice(extra);
        let s = replicate(&server.url, &img, &a);
        assert_replica_equals(&ds, "vm1", "d0.img", &img);
        let session = session_of(&server, runs, &s["point_id"]);
        (s, session)
    };

    // 1: full, no cache.
    let (s, _) = go(&["--no-map-cache"]);
    assert_eq!(map_of(&s), ("none".into(), 0));
    assert!(!maps.exists(), "--no-map-cache wrote a cache");

    // 2: digest, nothing cached: the map is downloaded, then cached as the target holds it after the run.
    mutate_blocks(&img, CS, 3, 1);
    let (s, session) = go(&["--map-cache", maps_s]);
    assert_eq!(s["disks"][0]["mode"], "digest");
    assert_eq!(map_of(&s), ("fetched".into(), fetched_bytes(size)));
    assert_eq!((session["digest_maps"].as_u64(), session["digest_map_parts"].as_u64()), (Some(1), Some(1)));
    assert_eq!(session["digest_map_hits"], 0);
    let cache = assert_cache_is_targets_map(&maps, &ds, "d0.img");

    // 3: digest with data and a zeroed chunk changed: the cache is current, no DigestMapPart crosses.
    mutate_blocks(&img, CS, 2, 2);
    write_chunk(&img, 5, 0, true);
    let (s, session) = go(&["--map-cache", maps_s]);
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
    assert_eq!(s["disks"][0]["chunks_sent"], 2);
    assert_eq!((session["digest_map_hits"].as_u64(), session["digest_map_parts"].as_u64()), (Some(1), Some(0)));
    assert_eq!(assert_cache_is_targets_map(&maps, &ds, "d0.img"), cache, "one file per disk");

    // 4: cbt (its verification samples need the map): cached; 5: digest after it: cached.
    write_chunk(&img, 10, 3, false);
    write_chunk(&img, 11, 0, true);
    let cbt = dir.path().join("cbt.json");
    std::fs::write(&cbt, format!(r#"[{{"offset":{},"length":{}}}]"#, 10 * CS, 2 * CS)).unwrap();
    let (s, session) = go(&["--map-cache", maps_s, "--cbt", cbt.to_str().unwrap()]);
    assert_eq!(s["disks"][0]["mode"], "cbt");
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
    assert_eq!(session["digest_map_parts"], 0);
    assert_cache_is_targets_map(&maps, &ds, "d0.img");
    mutate_blocks(&img, CS, 1, 4);
    let (s, _) = go(&["--map-cache", maps_s]);
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
    assert_cache_is_targets_map(&maps, &ds, "d0.img");

    // cbt trusted blindly (--verify-samples 0) needs no map, so it cannot know the chunks it did
    // not send: the stale cache is removed, and the next digest run downloads the map.
    write_chunk(&img, 10, 4, false);
    std::fs::write(&cbt, format!(r#"[{{"offset":{},"length":{}}}]"#, 10 * CS, CS)).unwrap();
    let (s, _) = go(&["--map-cache", maps_s, "--cbt", cbt.to_str().unwrap(), "--verify-samples", "0"]);
    assert_eq!(map_of(&s), ("none".into(), 0));
    assert_eq!(cache_files(&maps), Vec::<PathBuf>::new());
    let (s, _) = go(&["--map-cache", maps_s]);
    assert_eq!(map_of(&s), ("fetched".into(), fetched_bytes(size)));
    assert_cache_is_targets_map(&maps, &ds, "d0.img");

    // 6: the disk grows (the old partial chunk is filled): the cached map is of the old size, a
    // miss; 7: the map written after the grow is a hit.
    let from = size - 2000;
    size += 3 * CS + 999;
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut tail = vec![0u8; (size - from) as usize];
        Rng::new(5).fill(&mut tail);
        write_at(&mut f, from, &tail);
    }
    let (s, _) = go(&["--map-cache", maps_s]);
    assert_eq!(map_of(&s), ("fetched".into(), fetched_bytes(size)));
    assert_cache_is_targets_map(&maps, &ds, "d0.img");
    mutate_blocks(&img, CS, 1, 6);
    let (s, session) = go(&["--map-cache", maps_s]);
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
    assert_eq!(session["digest_map_parts"], 0);

    // 8: the disk shrinks to a new partial last chunk: a miss, then a hit.
    size -= CS + 4000;
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(size).unwrap();
    let (s, _) = go(&["--map-cache", maps_s]);
    assert_eq!(map_of(&s), ("fetched".into(), fetched_bytes(size)));
    assert_cache_is_targets_map(&maps, &ds, "d0.img");
    let (s, _) = go(&["--map-cache", maps_s]);
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));

    // 9: a full run needs no map but knows every chunk: it writes the cache; the next digest run hits it.
    mutate_blocks(&img, CS, 2, 7);
    let (s, _) = go(&["--map-cache", maps_s, "--mode", "full"]);
    assert_eq!(map_of(&s), ("none".into(), 0));
    assert_cache_is_targets_map(&maps, &ds, "d0.img");
    mutate_blocks(&img, CS, 2, 8);
    let (s, session) = go(&["--map-cache", maps_s]);
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
    assert_eq!((session["digest_map_hits"].as_u64(), session["digest_map_parts"].as_u64()), (Some(1), Some(0)));
    assert_cache_is_targets_map(&maps, &ds, "d0.img");
}

#[test]
fn corrupt_foreign_or_stale_caches_are_misses_with_identical_results() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    let size = (3 << 20) + 4321;
    write_image(&img, size, 11, &[Fill::Text, Fill::Random, Fill::Zero]);
    let ds = dir.path().join("ds");
    let ds_s = ds.to_str().unwrap();
    let maps = dir.path().join("maps");
    let m = ["--map-cache", maps.to_str().unwrap()];
    let go = |seed: u64| {
        mutate_blocks(&img, CS, 2, seed);
        let s = replicate(ds_s, &img, &m);
        assert_replica_equals(&ds, "vm1", "d0.img", &img);
        s
    };
    go(1);
    let s = go(2);
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
    let cache = assert_cache_is_targets_map(&maps, &ds, "d0.img");
    let good = std::fs::read(&cache).unwrap();

    // Corrupt (a flipped digest bit), truncated, empty, or not a map at all: a miss, no error.
    let mut flipped = good.clone();
    flipped[32 + 5 * 32] ^= 1;
    // Foreign: an intact map of the right geometry that is not the target's (its checksum is
    // right; the target's hash is not its hash).
    let mut foreign = ferry_planner::DigestMap::zeroed(CS as u32, size, &ferry_planner::ZeroDigests::new(CS as u32))
        .unwrap()
        .encode();
    assert_eq!(foreign.len(), good.len());
    foreign[40] = 1;
    let len = foreign.len();
    let sum = *blake3::hash(&foreign[..len - 32]).as_bytes();
    foreign[len - 32..].copy_from_slice(&sum);
    assert!(ferry_planner::DigestMap::decode("foreign", &foreign).is_ok());
    for (i, bad) in
        [flipped, good[..good.len() - 1].to_vec(), Vec::new(), b"FERRYDM".to_vec(), foreign].into_iter().enumerate()
    {
        std::fs::write(&cache, &bad).unwrap();
        let s = go(10 + i as u64);
        assert_eq!(map_of(&s), ("fetched".into(), fetched_bytes(size)), "case {i}");
        assert_cache_is_targets_map(&maps, &ds, "d0.img");
    }

    // Stale: a cache written after a point that a rollback then dropped.
    let s = go(20);
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
    let back_to = s["point_id"].as_u64().unwrap();
    let s = go(21);
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
    run(["points", "rollback", "--target", ds_s, "--replica", "vm1", "--point", &back_to.to_string(), "--yes"])
        .expect_code(0);
    let s = go(22);
    assert_eq!(map_of(&s), ("fetched".into(), fetched_bytes(size)));
    assert_cache_is_targets_map(&maps, &ds, "d0.img");
    let s = go(23);
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
}

#[test]
fn default_location_no_map_cache_and_plan() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    let size = 2 << 20;
    write_image(&img, size, 13, &[Fill::Random, Fill::Text]);
    let ds = dir.path().join("ds");
    let ds_s = ds.to_str().unwrap();
    let xdg = dir.path().join("xdg");
    let with_xdg = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--json", "--replica", "vm1", "--chunk-size", "64K", "--target", ds_s]);
        a.extend(["--source", img.to_str().unwrap()]);
        let out = ferry().args(a).env("XDG_CACHE_HOME", &xdg).output().unwrap();
        let r: Run = out.into();
        r.expect_code(0);
        r
    };

    // --no-map-cache: the map is downloaded every time and no cache is written anywhere.
    for seed in 0..3 {
        mutate_blocks(&img, CS, 1, seed);
        let s = with_xdg(&["replicate", "--no-map-cache"]).summary();
        let want = if seed == 0 { ("none".into(), 0) } else { ("fetched".into(), fetched_bytes(size)) };
        assert_eq!(map_of(&s), want, "run {seed}");
        assert_replica_equals(&ds, "vm1", "d0.img", &img);
    }
    assert!(!xdg.exists(), "--no-map-cache wrote under XDG_CACHE_HOME");

    // Default: $XDG_CACHE_HOME/ferry/maps.
    mutate_blocks(&img, CS, 1, 3);
    let s = with_xdg(&["replicate"]).summary();
    assert_eq!(map_of(&s), ("fetched".into(), fetched_bytes(size)));
    let maps = xdg.join("ferry").join("maps");
    let cache = assert_cache_is_targets_map(&maps, &ds, "d0.img");
    let before = std::fs::read(&cache).unwrap();

    // A plan uses the cache and never writes it.
    mutate_blocks(&img, CS, 1, 4);
    let plan = with_xdg(&["plan"]).events().into_iter().find(|e| e["event"] == "plan").expect("plan event");
    assert_eq!(plan["disks"][0]["digest_map"], "cached");
    assert_eq!(plan["disks"][0]["digest_map_bytes"], END_BYTES);
    assert_eq!(plan["disks"][0]["chunks_sent"], 1);
    assert_eq!(cache_files(&maps), vec![cache.clone()]);
    assert_eq!(std::fs::read(&cache).unwrap(), before);
    let s = with_xdg(&["replicate"]).summary();
    assert_eq!(map_of(&s), ("cached".into(), END_BYTES));
    assert_eq!(s["disks"][0]["chunks_sent"], 1);
    assert_replica_equals(&ds, "vm1", "d0.img", &img);
    assert_cache_is_targets_map(&maps, &ds, "d0.img");
}
