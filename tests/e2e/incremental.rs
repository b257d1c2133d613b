//! Incremental replication (the planner, issue 5): cbt and digest runs move
//! exactly the changed chunks; a change list that misses a change is caught by
//! the verification samples; a seed placed at the target moves only its
//! differences; grown, shrunk and new disks; bad change lists are refused with
//! nothing changed at the target.
//!
//! Images are random (no chunk is zero or compressible unless a test says so),
//! 64 MiB = 1024 chunks of 64 KiB, so every count below is exact.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_tests::*;
use serde_json::Value;

const CS: u64 = 64 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const CHUNKS: u64 = SIZE / CS;

fn p(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

fn named(name: &str, path: &Path) -> String {
    format!("{name}={}", path.display())
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `ferry replicate --json --replica vm1 --chunk-size 64K --retry-for 0 --target TARGET --source S... EXTRA...`.
fn replicate(target: &str, sources: &[String], extra: &[&str]) -> Run {
    let mut args: Vec<String> =
        ["replicate", "--json", "--replica", "vm1", "--chunk-size", "64K", "--retry-for", "0", "--target", target]
            .iter()
            .map(|s| s.to_string())
            .collect();
    for s in sources {
        args.extend(["--source".into(), s.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    run(args)
}

/// The summary's counters of `disk`.
fn disk_of<'a>(summary: &'a Value, disk: &str) -> &'a Value {
    summary["disks"]
        .as_array()
        .expect("disks array")
        .iter()
        .find(|d| d["disk"] == disk)
        .unwrap_or_else(|| panic!("no disk {disk:?} in {summary}"))
}

/// The messages of a run's events of kind `kind` (warning, notice, error).
fn messages(r: &Run, kind: &str) -> Vec<String> {
    r.events().iter().filter(|e| e["event"] == kind).map(|e| e["message"].as_str().expect("message").into()).collect()
}

/// `buf.len()` bytes of `f` at `offset`; zeros past its end.
fn read_padded(f: &std::fs::File, offset: u64, buf: &mut [u8]) {
    buf.fill(0);
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64).expect("read") {
            0 => break,
            k => done += k,
        }
    }
}

/// The chunks whose bytes differ between the first `len` bytes of `a` and of
/// `b` (a file shorter than `len` reads as zeros past its end, as a grown
/// replica does).
fn differing_chunks(a: &Path, b: &Path, len: u64) -> Vec<u64> {
    let (fa, fb) = (std::fs::File::open(a).expect("open a"), std::fs::File::open(b).expect("open b"));
    let (mut ba, mut bb) = (vec![0u8; CS as usize], vec![0u8; CS as usize]);
    let mut out = Vec::new();
    for c in 0..len.div_ceil(CS) {
        let n = (len - c * CS).min(CS) as usize;
        read_padded(&fa, c * CS, &mut ba[..n]);
        read_padded(&fb, c * CS, &mut bb[..n]);
        if ba[..n] != bb[..n] {
            out.push(c);
        }
    }
    out
}

/// Write random bytes over `[from, to)` of a file (growing it when `to` is past its end).
fn write_random(path: &Path, from: u64, to: u64, seed: u64) {
    let mut buf = vec![0u8; (to - from) as usize];
    Rng::new(seed).fill(&mut buf);
    let mut f = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    write_at(&mut f, from, &buf);
    f.sync_all().expect("sync");
}

/// Keep a copy of `img` as it is now.
fn snapshot(img: &Path, name: &str) -> PathBuf {
    let copy = img.with_file_name(name);
    std::fs::copy(img, &copy).expect("copy image");
    copy
}

/// The formats of change lists ferry reads.
#[derive(Debug, Clone, Copy)]
enum Format {
    /// `[{"offset":..,"length":..}]`.
    Extents,
    /// `{"disk_size":..,"extents":[..]}`.
    Wrapped,
    /// VMware QueryChangedDiskAreas, one DiskChangeInfo as pyVmomi prints it.
    Vmware,
    /// VMware QueryChangedDiskAreas as govc prints it (capitalised keys), in two pages.
    VmwareGovcPaged,
    /// `nbdinfo --map --json` of a `qemu:dirty-bitmap:` context: the whole disk, dirty or clean.
    Nbdinfo,
}

/// `(offset, length)` of the byte runs of `chunks` (sorted), adjacent chunks coalesced,
/// the last chunk of a `disk_size`-byte disk cut to its length.
fn runs(chunks: &[u64], disk_size: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        let (off, len) = (c * CS, (disk_size - c * CS).min(CS));
        match v.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => v.push((off, len)),
        }
    }
    v
}

/// A change list naming exactly the byte ranges `extents` of a `disk_size`-byte disk.
fn change_list(format: Format, extents: &[(u64, u64)], disk_size: u64) -> String {
    let list = |key: &str, ext: &[(u64, u64)]| -> String {
        let items: Vec<String> = ext.iter().map(|(o, l)| format!(r#"{{"{key}":{o},"length":{l}}}"#)).collect();
        format!("[{}]", items.join(","))
    };
    match format {
        Format::Extents => list("offset", extents),
        Format::Wrapped => format!(r#"{{"disk_size":{disk_size},"extents":{}}}"#, list("offset", extents)),
        Format::Vmware => {
            let areas: Vec<String> = extents
                .iter()
                .map(|(o, l)| {
                    format!(r#"{{"_vimtype":"vim.vm.DiskChangeInfo.DiskChangeExtent","start":{o},"length":{l}}}"#)
                })
                .collect();
            format!(
                r#"{{"_vimtype":"vim.vm.DiskChangeInfo","startOffset":0,"length":{disk_size},"changedArea":[{}]}}"#,
                areas.join(",")
            )
        }
        Format::VmwareGovcPaged => {
            // Two pages split at a chunk boundary near the middle; an extent across it is cut in two.
            let mid = disk_size / 2 / CS * CS;
            let page = |start: u64, end: u64| {
                let areas: Vec<String> = extents
                    .iter()
                    .filter_map(|&(o, l)| {
                        let (a, b) = (o.max(start), (o + l).min(end));
                        (a < b).then(|| format!(r#"{{"Start":{a},"Length":{}}}"#, b - a))
                    })
                    .collect();
                format!(r#"{{"StartOffset":{start},"Length":{},"ChangedArea":[{}]}}"#, end - start, areas.join(","))
            };
            format!("[{},{}]", page(0, mid), page(mid, disk_size))
        }
        Format::Nbdinfo => {
            let mut items = Vec::new();
            let mut at = 0;
            let mut push = |o: u64, l: u64, dirty: bool| {
                let (t, d) = if dirty { (1, "dirty") } else { (0, "clean") };
                items.push(format!(r#"{{ "offset": {o}, "length": {l}, "type": {t}, "description": "{d}"}}"#));
            };
            for &(o, l) in extents {
                if o > at {
                    push(at, o - at, false);
                }
                push(o, l, true);
                at = o + l;
            }
            if at < disk_size {
                push(at, disk_size - at, false);
            }
            format!("[\n{}\n]\n", items.join(",\n"))
        }
    }
}

/// Write a change list naming `chunks` of a `disk_size`-byte disk to `dir/name`.
fn write_list(dir: &Path, name: &str, format: Format, chunks: &[u64], disk_size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, change_list(format, &runs(chunks, disk_size), disk_size)).expect("write change list");
    path
}

/// Every file under `dir`: path, size and BLAKE3 of its contents, sorted.
fn tree(dir: &Path) -> Vec<(String, u64, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(tree(&p));
        } else {
            let bytes = std::fs::read(&p).expect("read file");
            v.push((p.display().to_string(), bytes.len() as u64, blake3::hash(&bytes).to_hex().to_string()));
        }
    }
    v.sort();
    v
}

/// Export `point` of disk d0 of replica vm1 and check it equals `expected`.
fn assert_point_equals(ds: &Path, point: u64, expected: &Path) {
    let out = ds.with_file_name(format!("export-point-{point}.raw"));
    let (ds_s, out_s, point_s) = (p(ds), p(&out), point.to_string());
    run([
        "points",
        "export",
        "--target",
        &ds_s,
        "--replica",
        "vm1",
        "--disk",
        "d0",
        "--out",
        &out_s,
        "--point",
        &point_s,
    ])
    .expect_code(0);
    assert!(same_bytes(&out, expected), "point {point} differs from {}", expected.display());
    std::fs::remove_file(&out).expect("remove export");
}

/// The summary of a run that ended with exit 0 and status ok.
fn ok_summary(r: &Run) -> Value {
    r.expect_code(0);
    let s = r.summary();
    assert_eq!(s["status"], "ok", "{s}");
    s
}

/// The summary's counters of disk d0 are those of a `mode` run over a random disk of `size`
/// bytes that found `changed` chunks changed and sent exactly them.
fn assert_sent_exactly(s: &Value, mode: &str, changed: &[u64], size: u64) {
    let d = disk_of(s, "d0");
    let (n, chunks) = (changed.len() as u64, size.div_ceil(CS));
    let bytes: u64 = changed.iter().map(|c| (size - c * CS).min(CS)).sum();
    assert_eq!(d["mode"], mode, "{d}");
    assert_eq!(u(&d["size"]), size, "{d}");
    assert_eq!(u(&d["chunks_sent"]), n, "{mode}: chunks sent: {d}");
    assert_eq!(u(&d["bytes_data"]), bytes, "{d}");
    assert_eq!(u(&d["chunks_zero"]), 0, "{d}");
    if mode == "cbt" {
        // Only the listed chunks are read.
        assert_eq!((u(&d["chunks_planned"]), u(&d["bytes_read"])), (n, bytes), "{d}");
        assert_eq!(u(&d["chunks_unchanged"]), 0, "{d}");
    } else {
        // Every chunk is read and hashed; the differing ones are sent.
        assert_eq!((u(&d["chunks_planned"]), u(&d["bytes_read"])), (chunks, size), "{d}");
        assert_eq!(u(&d["chunks_unchanged"]), chunks - n, "{d}");
    }
}

/// A full copy of a 64 MiB random disk d0 to `target`, then 1% and 10% of its chunks changed, each
/// replicated in `mode` (cbt with a change list of `formats[i]`, or digest): every run sends exactly
/// the changed chunks and leaves a byte-identical replica. `--mode MODE` is given to the
/// incrementals when `explicit`, else auto picks it. Returns the chunks each run sent (the full
/// copy's, then each incremental's).
fn one_and_ten_percent(
    dir: &Path,
    (target, ds): (&str, &Path),
    (mode, explicit): (&str, bool),
    formats: [Format; 2],
    extra: &[&str],
) -> Vec<u64> {
    let img = dir.join("d0.img");
    write_image(&img, SIZE, 1, &[Fill::Random]);
    let src = [named("d0", &img)];
    let r = replicate(target, &src, extra);
    r.expect_code(0);
    assert_eq!(u(&disk_of(&r.summary(), "d0")["chunks_sent"]), CHUNKS);
    let mut counts = vec![CHUNKS];
    let mut points = Vec::new();
    for (i, (percent, format)) in [(1, formats[0]), (10, formats[1])].into_iter().enumerate() {
        let before = snapshot(&img, &format!("point-{}.img", i + 1));
        let changed = mutate_blocks(&img, CS, (CHUNKS * percent / 100) as usize, 10 + i as u64);
        assert_eq!(changed.len() as u64, [10, 102][i]);
        assert_eq!(differing_chunks(&before, &img, SIZE), changed, "the mutated chunks really differ");
        let mut args = extra.to_vec();
        if explicit {
            args.extend(["--mode", mode]);
        }
        let list;
        if mode == "cbt" {
            list = write_list(dir, &format!("cbt-{percent}.json"), format, &changed, SIZE);
            args.extend(["--cbt", list.to_str().unwrap()]);
        }
        let r = replicate(target, &src, &args);
        let s = ok_summary(&r);
        assert_sent_exactly(&s, mode, &changed, SIZE);
        assert_eq!(s["totals"]["chunks_sent"], changed.len() as u64);
        assert_eq!(s["point_id"], i as u64 + 2);
        assert!(messages(&r, "warning").is_empty(), "{}", r.stdout);
        assert_replica_equals(ds, "vm1", "d0", &img);
        counts.push(changed.len() as u64);
        points.push(before);
    }
    // The undo records (saved ahead of the data in cbt mode, announced by Intent frames)
    // rebuild every older point.
    for (i, before) in points.iter().enumerate() {
        assert_point_equals(ds, i as u64 + 1, before);
    }
    run(["points", "verify", "--target", &p(ds), "--replica", "vm1"]).expect_code(0);
    counts
}

#[test]
fn cbt_incrementals_of_1_and_10_percent_send_exactly_the_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    one_and_ten_percent(dir.path(), (&p(&ds), &ds), ("cbt", true), [Format::Extents, Format::Vmware], &[]);
}

#[test]
fn cbt_incrementals_through_ferry_serve_send_exactly_the_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    let formats = [Format::Nbdinfo, Format::VmwareGovcPaged];
    let counts = one_and_ten_percent(
        dir.path(),
        (&server.url, &ds),
        ("cbt", false),
        formats,
        &["--token-file", &p(&token), "--fingerprint", &server.fingerprint],
    );
    // The server wrote exactly those chunks, session by session.
    let written: Vec<u64> = server.sessions(3).iter().map(|s| u(&s["chunks_written"])).collect();
    assert_eq!(written, counts);
}

#[test]
fn digest_incrementals_of_1_and_10_percent_send_exactly_the_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    one_and_ten_percent(dir.path(), (&p(&ds), &ds), ("digest", true), [Format::Extents; 2], &[]);
}

#[test]
fn digest_incrementals_through_ferry_serve_send_exactly_the_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    let counts = one_and_ten_percent(
        dir.path(),
        (&server.url, &ds),
        ("digest", false),
        [Format::Extents; 2],
        &["--token-file", &p(&token), "--fingerprint", &server.fingerprint],
    );
    let written: Vec<u64> = server.sessions(3).iter().map(|s| u(&s["chunks_written"])).collect();
    assert_eq!(written, counts);
}

/// A replica vm1 of a 64 MiB random disk d0 in a local datastore, after its full copy. Returns
/// (image, datastore).
fn replicated_disk(dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let img = dir.join("d0.img");
    write_image(&img, SIZE, seed, &[Fill::Random]);
    let ds = dir.join("ds");
    replicate(&p(&ds), &[named("d0", &img)], &[]).expect_code(0);
    (img, ds)
}

/// The warning of a cbt run whose samples found chunk `chunk` of d0 changed but not listed.
fn missed_warning(chunk: u64) -> String {
    format!(
        "disk \"d0\": changed block tracking missed a change (chunk {chunk} differs from the replica but is not \
         in the change list); replicating this disk in digest mode"
    )
}

#[test]
fn cbt_list_that_misses_a_change_is_caught_by_the_samples_and_redone_in_digest_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (img, ds) = replicated_disk(dir.path(), 2);
    let before = snapshot(&img, "before.img");
    let changed = mutate_blocks(&img, CS, 5, 30);
    assert_eq!(differing_chunks(&before, &img, SIZE), changed);
    // The list misses the third change.
    let missed = changed[2];
    let listed: Vec<u64> = changed.iter().copied().filter(|&c| c != missed).collect();
    let list = write_list(dir.path(), "cbt.json", Format::Extents, &listed, SIZE);
    // More samples than unchanged chunks: every chunk the list calls unchanged is checked.
    let samples = CHUNKS.to_string();
    let r = replicate(&p(&ds), &[named("d0", &img)], &["--cbt", &p(&list), "--verify-samples", &samples]);
    r.expect_code(3);
    assert_eq!(messages(&r, "warning"), [missed_warning(missed)]);
    let s = r.summary();
    assert_eq!(s["status"], "warning");
    assert_eq!(s["point_id"], 2);
    // Redone in digest mode: every chunk read and compared, exactly the five changed ones sent.
    assert_sent_exactly(&s, "digest", &changed, SIZE);
    assert_replica_equals(&ds, "vm1", "d0", &img);
}

#[test]
fn verify_samples_0_trusts_a_list_that_misses_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let (img, ds) = replicated_disk(dir.path(), 3);
    let before = snapshot(&img, "before.img");
    let changed = mutate_blocks(&img, CS, 5, 31);
    let missed = changed[0];
    let listed = &changed[1..];
    let list = write_list(dir.path(), "cbt.json", Format::Vmware, listed, SIZE);
    let r = replicate(&p(&ds), &[named("d0", &img)], &["--cbt", &p(&list), "--verify-samples", "0"]);
    assert_sent_exactly(&ok_summary(&r), "cbt", listed, SIZE);
    assert!(messages(&r, "warning").is_empty(), "{}", r.stdout);
    // The replica is the source except the missed chunk, which still holds its old bytes.
    let out = dir.path().join("export.raw");
    run(["points", "export", "--target", &p(&ds), "--replica", "vm1", "--disk", "d0", "--out", &p(&out)])
        .expect_code(0);
    assert_eq!(differing_chunks(&out, &img, SIZE), [missed]);
    assert_eq!(differing_chunks(&out, &before, SIZE), listed);
    // A digest run finds and sends that one chunk.
    let r = replicate(&p(&ds), &[named("d0", &img)], &["--mode", "digest"]);
    assert_sent_exactly(&ok_summary(&r), "digest", &[missed], SIZE);
    assert_replica_equals(&ds, "vm1", "d0", &img);
}

/// Place a copy of `img` with 5% of its chunks changed as the seed of disk d0 of replica vm1 in
/// `ds` (`DATASTORE/REPLICA/disks/DISK.img`); returns the chunks that differ.
fn place_seed(img: &Path, ds: &Path, seed: u64) -> Vec<u64> {
    let disks = ds.join("vm1").join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let copy = disks.join("d0.img");
    std::fs::copy(img, &copy).unwrap();
    let differ = mutate_blocks(&copy, CS, (CHUNKS * 5 / 100) as usize, seed);
    assert_eq!(differ.len(), 51);
    assert_eq!(differing_chunks(&copy, img, SIZE), differ);
    differ
}

#[test]
fn seed_with_5_percent_differences_sends_exactly_the_differences() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    write_image(&img, SIZE, 4, &[Fill::Random]);
    let src = [named("d0", &img)];

    // --mode seed into a local datastore.
    let ds = dir.path().join("ds");
    let differ = place_seed(&img, &ds, 40);
    let r = replicate(&p(&ds), &src, &["--mode", "seed"]);
    let s = ok_summary(&r);
    assert_sent_exactly(&s, "seed", &differ, SIZE);
    assert_eq!(s["point_id"], 1);
    assert!(messages(&r, "notice").iter().all(|m| !m.contains("is new to the replica")), "{}", r.stdout);
    assert_replica_equals(&ds, "vm1", "d0", &img);

    // auto through ferry serve: the disk is there, so auto compares digests.
    let ds = dir.path().join("ds-remote");
    let differ = place_seed(&img, &ds, 41);
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    let r = replicate(&server.url, &src, &["--token-file", &p(&token), "--fingerprint", &server.fingerprint]);
    assert_sent_exactly(&ok_summary(&r), "digest", &differ, SIZE);
    assert!(messages(&r, "notice").iter().all(|m| !m.contains("is new to the replica")), "{}", r.stdout);
    assert_eq!(u(&server.sessions(1)[0]["chunks_written"]), 51);
    assert_replica_equals(&ds, "vm1", "d0", &img);
}

#[test]
fn grown_and_shrunk_disks_in_cbt_mode_send_the_listed_and_the_grown_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    // A partial last chunk: 1024 chunks and 12345 bytes.
    let size0 = SIZE + 12345;
    write_image(&img, size0, 5, &[Fill::Random]);
    let ds = dir.path().join("ds");
    let (ds_s, src) = (p(&ds), [named("d0", &img)]);
    let r = replicate(&ds_s, &src, &[]);
    r.expect_code(0);
    assert_eq!(u(&disk_of(&r.summary(), "d0")["chunks_sent"]), 1025);
    let point1 = snapshot(&img, "point1.img");
    // Every chunk the list calls unchanged is sampled: a chunk the resize left wrong would warn.
    let all_samples = ["--verify-samples", "5000"];
    let replica_len = || std::fs::metadata(ds.join("vm1/disks/d0.img")).unwrap().len();

    // Grow by 5 chunks and 999 bytes, written from 2000 bytes before the old end; and 4 chunks
    // changed. The list (with the disk's new size) names all of it: 4 + the old partial chunk
    // 1024 + the 5 chunks after it.
    let size1 = size0 + 5 * CS + 999;
    let changed = mutate_blocks(&img, CS, 4, 50);
    write_random(&img, size0 - 2000, size1, 51);
    let want: Vec<u64> = changed.iter().copied().chain(1024..1030).collect();
    assert_eq!(differing_chunks(&point1, &img, size1), want);
    let mut ext = runs(&changed, size1);
    ext.push((size0 - 2000, size1 - (size0 - 2000)));
    let list = dir.path().join("grow1.json");
    std::fs::write(&list, change_list(Format::Wrapped, &ext, size1)).unwrap();
    let mut args = all_samples.to_vec();
    args.extend(["--cbt", list.to_str().unwrap()]);
    let s = ok_summary(&replicate(&ds_s, &src, &args));
    assert_sent_exactly(&s, "cbt", &want, size1);
    assert_replica_equals(&ds, "vm1", "d0", &img);
    assert_eq!(replica_len(), size1);
    let point2 = snapshot(&img, "point2.img");

    // Grow by 3 chunks with a list that names only 2 changes inside the old size: ferry sends
    // the grown range (from the old partial chunk 1029 on) whatever the list says.
    let size2 = size1 + 3 * CS;
    let changed = mutate_blocks(&img, CS, 2, 52);
    write_random(&img, size1, size2, 53);
    let want: Vec<u64> = changed.iter().copied().chain(1029..1033).collect();
    assert_eq!(differing_chunks(&point2, &img, size2), want);
    let list = write_list(dir.path(), "grow2.json", Format::Extents, &changed, size2);
    let mut args = all_samples.to_vec();
    args.extend(["--cbt", list.to_str().unwrap()]);
    let s = ok_summary(&replicate(&ds_s, &src, &args));
    assert_sent_exactly(&s, "cbt", &want, size2);
    assert_replica_equals(&ds, "vm1", "d0", &img);
    assert_eq!(replica_len(), size2);
    let point3 = snapshot(&img, "point3.img");

    // Shrink by 7 chunks and 4000 bytes (a new partial last chunk 1025, unchanged but shorter),
    // 3 chunks changed, named by an nbdinfo map of the new size.
    let size3 = size2 - 7 * CS - 4000;
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(size3).unwrap();
    let changed = mutate_blocks(&img, CS, 3, 54);
    assert_eq!(differing_chunks(&point3, &img, size3), changed);
    let list = write_list(dir.path(), "shrink.json", Format::Nbdinfo, &changed, size3);
    let mut args = all_samples.to_vec();
    args.extend(["--cbt", list.to_str().unwrap()]);
    let s = ok_summary(&replicate(&ds_s, &src, &args));
    assert_sent_exactly(&s, "cbt", &changed, size3);
    assert_replica_equals(&ds, "vm1", "d0", &img);
    assert_eq!(replica_len(), size3);

    // The older points, at their own sizes, from the undo files.
    for (point, copy) in [(1, &point1), (2, &point2), (3, &point3)] {
        assert_point_equals(&ds, point, copy);
    }
}

/// A change list may name chunks that did not change (trackers work at their own
/// granularity): they are announced, maybe saved ahead, and sent, but not written (the
/// target holds those bytes). The older point still exports exactly.
#[test]
fn cbt_chunks_listed_but_unchanged_are_sent_not_written_and_the_older_point_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    let img = dir.path().join("d0.img");
    write_image(&img, SIZE, 7, &[Fill::Random]);
    let src = [named("d0", &img)];
    replicate(&server.url, &src, &["--token-file", &p(&token), "--fingerprint", &server.fingerprint]).expect_code(0);
    let before = snapshot(&img, "point-1.img");
    let changed = mutate_blocks(&img, CS, 10, 90);
    // Listed: the 10 changed chunks and 40 unchanged ones.
    let mut listed = changed.clone();
    listed.extend((0..CHUNKS).step_by(25).filter(|c| !changed.contains(c)).take(40));
    listed.sort_unstable();
    assert_eq!(listed.len(), 50);
    let list = write_list(dir.path(), "cbt.json", Format::Extents, &listed, SIZE);
    let r = replicate(
        &server.url,
        &src,
        &["--token-file", &p(&token), "--fingerprint", &server.fingerprint, "--cbt", &p(&list)],
    );
    assert_sent_exactly(&ok_summary(&r), "cbt", &listed, SIZE);
    let written: Vec<u64> = server.sessions(2).iter().map(|s| u(&s["chunks_written"])).collect();
    assert_eq!(written, vec![CHUNKS, changed.len() as u64]);
    assert_replica_equals(&ds, "vm1", "d0", &img);
    assert_point_equals(&ds, 1, &before);
    run(["points", "verify", "--target", &p(&ds), "--replica", "vm1"]).expect_code(0);
}

/// Regression: a cbt run took the partial last chunk of a disk whose size had not changed for a
/// grown chunk and sent it, listed or not: one chunk too many on every such incremental.
#[test]
fn cbt_does_not_resend_the_unchanged_partial_last_chunk_of_a_disk_of_the_same_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    let size = MIB + 777;
    write_image(&img, size, 10, &[Fill::Random]);
    let ds = dir.path().join("ds");
    let src = [named("d0", &img)];
    replicate(&p(&ds), &src, &[]).expect_code(0);
    let changed = mutate_blocks(&img, CS, 1, 80);
    for (name, listed) in [("one.json", &changed[..]), ("none.json", &[][..])] {
        let list = write_list(dir.path(), name, Format::Extents, listed, size);
        let r = replicate(&p(&ds), &src, &["--cbt", &p(&list), "--verify-samples", "100"]);
        assert_sent_exactly(&ok_summary(&r), "cbt", listed, size);
        assert_replica_equals(&ds, "vm1", "d0", &img);
    }
}

#[test]
fn disks_added_to_an_existing_replica_are_copied_in_full_beside_the_incrementals() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    let tok = p(&token);
    let image = |name: &str, size: u64, seed: u64, fill: &[Fill]| {
        let path = dir.path().join(format!("{name}.raw"));
        write_image(&path, size, seed, fill);
        path
    };
    let d0 = image("d0", 16 * MIB, 6, &[Fill::Random]);
    let r = replicate(&server.url, &[named("d0", &d0)], &["--token-file", &tok, "--fingerprint", &server.fingerprint]);
    r.expect_code(0);
    let new_disk = |name: &str| format!("disk {name:?} is new to the replica: copying it in full");

    // d1 added, --mode digest for both: d0 sends its 5 changes, d1 is new and copied in full.
    let d1 = image("d1", 4 * MIB + 777, 7, &[Fill::Random]);
    let changed0 = mutate_blocks(&d0, CS, 5, 60);
    let r = replicate(
        &server.url,
        &[named("d0", &d0), named("d1", &d1)],
        &["--token-file", &tok, "--fingerprint", &server.fingerprint, "--mode", "digest"],
    );
    let s = ok_summary(&r);
    assert_sent_exactly(&s, "digest", &changed0, 16 * MIB);
    assert_eq!(messages(&r, "notice"), [new_disk("d1")]);
    let d = disk_of(&s, "d1");
    assert_eq!(d["mode"], "full", "{d}");
    assert_eq!((u(&d["chunks_planned"]), u(&d["chunks_sent"]), u(&d["chunks_zero"])), (65, 65, 0), "{d}");
    assert_eq!(u(&s["totals"]["chunks_sent"]), 5 + 65);
    assert_eq!(s["point_id"], 2);

    // d2 added, every disk with a change list: d0 and d1 send the listed chunks, d2 (whose list
    // means nothing: the replica has no copy) is copied in full, its zero MiB as zeros.
    let d2 = image("d2", 3 * MIB, 8, &[Fill::Random, Fill::Zero, Fill::Random]);
    let changed0 = mutate_blocks(&d0, CS, 3, 61);
    let changed1 = mutate_blocks(&d1, CS, 2, 62);
    let l0 = write_list(dir.path(), "d0.json", Format::Extents, &changed0, 16 * MIB);
    let l1 = write_list(dir.path(), "d1.json", Format::Vmware, &changed1, 4 * MIB + 777);
    let l2 = write_list(dir.path(), "d2.json", Format::Extents, &[0], 3 * MIB);
    let sources = [named("d0", &d0), named("d1", &d1), named("d2", &d2)];
    let lists = [named("d0", &l0), named("d1", &l1), named("d2", &l2)];
    let r = replicate(
        &server.url,
        &sources,
        &[
            "--token-file",
            &tok,
            "--fingerprint",
            &server.fingerprint,
            "--cbt",
            &lists[0],
            "--cbt",
            &lists[1],
            "--cbt",
            &lists[2],
        ],
    );
    let s = ok_summary(&r);
    assert_sent_exactly(&s, "cbt", &changed0, 16 * MIB);
    assert_eq!(messages(&r, "notice"), [new_disk("d2")]);
    let d = disk_of(&s, "d1");
    assert_eq!((d["mode"].as_str(), u(&d["chunks_planned"]), u(&d["chunks_sent"])), (Some("cbt"), 2, 2), "{d}");
    let d = disk_of(&s, "d2");
    assert_eq!(d["mode"], "full", "{d}");
    assert_eq!((u(&d["chunks_planned"]), u(&d["chunks_sent"]), u(&d["chunks_zero"])), (48, 32, 16), "{d}");
    assert_eq!(u(&s["totals"]["chunks_sent"]), 3 + 2 + 32);
    assert_eq!(s["point_id"], 3);

    let written: Vec<u64> = server.sessions(3).iter().map(|s| u(&s["chunks_written"])).collect();
    assert_eq!(written, [256, 70, 37]);
    for (name, img) in [("d0", &d0), ("d1", &d1), ("d2", &d2)] {
        assert_replica_equals(&ds, "vm1", name, img);
    }
}

#[test]
fn bad_change_lists_are_refused_with_exit_2_naming_file_and_entry_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    // Small: the datastores are hashed after every case.
    let size = 4 * MIB;
    write_image(&img, size, 9, &[Fill::Random]);
    let src = [named("d0", &img)];
    // Two replicas with a point and an undo file each: a local datastore and one behind ferry serve.
    let ds = dir.path().join("ds");
    let remote = dir.path().join("ds-remote");
    let token = new_token(dir.path(), "token");
    let server = Server::start(&remote, &token, &[]);
    let tok = p(&token);
    let targets = [(p(&ds), ds.clone()), (server.url.clone(), remote.clone())];
    for seed in [70, 71] {
        for (target, _) in &targets {
            replicate(target, &src, &["--token-file", &tok, "--fingerprint", &server.fingerprint]).expect_code(0);
        }
        mutate_blocks(&img, CS, 3, seed);
    }
    let trees = [tree(&ds), tree(&remote)];
    assert!(trees[0].iter().any(|(f, _, _)| f.ends_with(".undo")), "{:?}", trees[0]);

    let wrong_size = size + CS;
    let cases: Vec<(&str, String, String)> = vec![
        (
            "not-json",
            r#"[{"offset":0,"length":65536},]"#.into(),
            "not JSON at line 1, column 30: trailing comma".into(),
        ),
        (
            "truncated",
            r#"[{"offset":0,"length":65536},{"offset":"#.into(),
            "JSON is truncated (input ends at line 1, column 39)".into(),
        ),
        ("empty", "\n".into(), "change map is empty (an interrupted export?)".into()),
        (
            "negative",
            r#"[{"offset":0,"length":65536},{"offset":-65536,"length":65536}]"#.into(),
            "entry 1: $[1].offset is negative (-65536)".into(),
        ),
        (
            "overlapping",
            r#"[{"offset":0,"length":131072},{"offset":196608,"length":65536},{"offset":65536,"length":65536}]"#.into(),
            "entry 2 (offset 65536, length 65536) overlaps entry 0 (offset 0, length 131072)".into(),
        ),
        (
            "out-of-range",
            format!(r#"[{{"offset":0,"length":65536}},{{"offset":{},"length":131072}}]"#, size - CS),
            format!(
                "entry 1: extent at offset {} with length 131072 ends beyond the disk ({size} bytes): map made for \
                 another disk?",
                size - CS
            ),
        ),
        (
            "other-size-extents",
            change_list(Format::Wrapped, &[(0, CS)], wrong_size),
            format!(
                "entry 0: map made for a disk of another size (it covers {wrong_size} bytes, this disk has {size})"
            ),
        ),
        (
            "other-size-nbdinfo",
            change_list(Format::Nbdinfo, &[(CS, CS)], wrong_size),
            format!(
                "entry 2: map made for a disk of another size (it covers {wrong_size} bytes, this disk has {size})"
            ),
        ),
        (
            "other-size-vmware",
            change_list(Format::Vmware, &[(0, CS)], wrong_size),
            format!(
                "entry 0: map made for a disk of another size (it covers {wrong_size} bytes, this disk has {size})"
            ),
        ),
        (
            "unrecognised",
            r#"{"changes":[{"from":0,"to":65536}]}"#.into(),
            "unrecognised change map format (an object with keys [changes]); accepted formats: VMware \
             QueryChangedDiskAreas (a DiskChangeInfo object {\"startOffset\", \"length\", \"changedArea\": \
             [{\"start\", \"length\"}]} or an array of them), a generic extent list ([{\"offset\", \"length\"}] or \
             {\"disk_size\", \"extents\": [...]}), nbdinfo --map --json output ([{\"offset\", \"length\", \"type\", \
             \"description\"}])"
                .into(),
        ),
    ];
    let check = |what: &str, r: &Run, error: &str| {
        assert_eq!(r.code, 2, "{what}: exit code\nstdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(&format!("ferry: error: {error}\n")), "{what}: stderr:\n{}", r.stderr);
        assert_eq!([tree(&ds), tree(&remote)], trees, "{what}: a datastore changed");
    };
    for (name, content, msg) in &cases {
        let list = dir.path().join(format!("{name}.json"));
        std::fs::write(&list, content).unwrap();
        let error = format!("disk \"d0\": {}: {msg}", list.display());
        for (target, _) in &targets {
            let r = replicate(
                target,
                &src,
                &["--token-file", &tok, "--fingerprint", &server.fingerprint, "--cbt", &p(&list)],
            );
            let what = format!("{name} to {target}");
            check(&what, &r, &error);
            let s = r.summary();
            assert_eq!((s["status"].as_str(), s["error"].as_str()), (Some("failed"), Some(error.as_str())), "{what}");
            assert_eq!(messages(&r, "error"), std::slice::from_ref(&error), "{what}");
        }
        // A plan refuses it the same way.
        let r =
            run(["plan", "--json", "--replica", "vm1", "--target", &p(&ds), "--source", &src[0], "--cbt", &p(&list)]);
        check(&format!("plan {name}"), &r, &error);
    }

    // A list that cannot be read is a usage error too.
    let missing = dir.path().join("missing.json");
    let error = format!("reading change list {}: No such file or directory (os error 2)", missing.display());
    for (target, _) in &targets {
        let r = replicate(
            target,
            &src,
            &["--token-file", &tok, "--fingerprint", &server.fingerprint, "--cbt", &p(&missing)],
        );
        check(&format!("missing list to {target}"), &r, &error);
    }

    // Nothing was left half done: the next run is the next point and moves the 3 changes.
    for (target, store) in &targets {
        let s = ok_summary(&replicate(target, &src, &["--token-file", &tok, "--fingerprint", &server.fingerprint]));
        assert_eq!(s["point_id"], 3, "{target}");
        assert_eq!(u(&disk_of(&s, "d0")["chunks_sent"]), 3, "{target}");
        assert_replica_equals(store, "vm1", "d0", &img);
    }
}

/// Export disk `disk` of point `point` of replica vm1 and compare it with `expected`.
fn assert_disk_point_equals(ds: &Path, disk: &str, point: u64, expected: &Path) {
    let out = ds.with_file_name(format!("export-{disk}-{point}.raw"));
    let (ds_s, out_s, point_s) = (p(ds), p(&out), point.to_string());
    let args = ["points", "export", "--target", &ds_s, "--replica", "vm1", "--disk", disk, "--out", &out_s];
    run(args.into_iter().chain(["--point", &point_s])).expect_code(0);
    assert!(same_bytes(&out, expected), "disk {disk} at point {point} differs from {}", expected.display());
    std::fs::remove_file(&out).expect("remove export");
}

/// Regression (issue 17): a run that names fewer disks than the replica has used to leave the
/// other disks out of its point, so the next run that changed them kept no undo records for
/// them and their older points could no longer be rebuilt. A disk left out of a run is
/// carried into the new point unchanged.
#[test]
fn a_disk_left_out_of_a_run_is_carried_into_its_point_and_its_older_points_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    write_image(&a, 2 * MIB, 71, &[Fill::Random, Fill::Text]);
    write_image(&b, 2 * MIB, 72, &[Fill::Text, Fill::Random]);
    let both = [named("a", &a), named("b", &b)];
    ok_summary(&replicate(&p(&ds), &both, &[])); // point 1
    write_random(&b, 0, MIB / 4, 73);
    let b2 = snapshot(&b, "b2.img");
    ok_summary(&replicate(&p(&ds), &both, &[])); // point 2
    write_random(&a, MIB, MIB + MIB / 16, 74);
    let s = ok_summary(&replicate(&p(&ds), &[named("a", &a)], &[])); // point 3: b left out
    assert_eq!(s["point_id"], 3);
    write_random(&b, 0, MIB, 75);
    let b4 = snapshot(&b, "b4.img");
    ok_summary(&replicate(&p(&ds), &both, &[])); // point 4: b changed
    assert_disk_point_equals(&ds, "b", 2, &b2);
    assert_disk_point_equals(&ds, "b", 3, &b2);
    assert_disk_point_equals(&ds, "b", 4, &b4);
    let list = run(["points", "list", "--json", "--target", &p(&ds), "--replica", "vm1"]);
    list.expect_code(0);
    let v: Value = serde_json::from_str(&list.stdout).unwrap();
    let p3 = &v["points"][2];
    let names: Vec<&str> = p3["disks"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b"], "{p3}");
    assert_eq!(p3["disks"][1]["chunks_changed"], 0, "{p3}");
    run(["points", "verify", "--target", &p(&ds), "--replica", "vm1"]).expect_code(0);
    // Rolled back to point 3, b is as it was at point 2 (and 3).
    let ds_s = p(&ds);
    run(["points", "rollback", "--target", &ds_s, "--replica", "vm1", "--point", "3", "--yes"]).expect_code(0);
    assert!(same_bytes(&ds.join("vm1/disks/b.img"), &b2), "b after the rollback to point 3");
}

/// A run that resumes an interrupted session which had begun to change a disk, and does
/// not name that disk, is refused (exit 2) and changes nothing: that disk's image is no
/// longer the latest point's, so it cannot be carried into the new point.
#[test]
fn a_resumed_session_that_leaves_out_a_disk_it_had_begun_to_change_is_refused() {
    use ferry_datastore::store::{Datastore, SessionDisk, SessionState, DATASTORE_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    write_image(&a, MIB, 81, &[Fill::Random]);
    write_image(&b, MIB, 82, &[Fill::Text]);
    ok_summary(&replicate(&p(&ds), &[named("a", &a), named("b", &b)], &[]));
    // An interrupted session that had begun with disk b.
    {
        let r = Datastore::open(&ds).unwrap().lock_replica("vm1", "test", 0, 0).unwrap();
        let entry = SessionDisk {
            size: MIB,
            previous_size: MIB,
            next_chunk: 4,
            chunks_changed: 4,
            bytes_changed: 4,
            undo_durable: None,
        };
        r.write_session(&SessionState {
            version: DATASTORE_VERSION,
            session_id: "11".repeat(16),
            point_time_ns: 0,
            started_ns: 0,
            disks: [("b".to_string(), entry)].into_iter().collect(),
        })
        .unwrap();
    }
    let r = replicate(&p(&ds), &[named("a", &a)], &[]);
    r.expect_code(2);
    let e = r.summary()["error"].as_str().unwrap().to_string();
    assert!(e.contains("disk \"b\" of replica \"vm1\" was being changed by the interrupted session"), "{e}");
    let list = run(["points", "list", "--json", "--target", &p(&ds), "--replica", "vm1"]);
    let v: Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(v["points"].as_array().unwrap().len(), 1, "no point was made: {v}");
    assert_eq!(v["interrupted_session"], true);
}
