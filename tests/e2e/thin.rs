//! Thin multi-terabyte disks (issue 20): a 2 TiB disk holding 40 MiB costs what
//! its 40 MiB cost. Full, then an unchanged digest run, then a CBT run with 1 MiB
//! changed, into a local datastore; after each, the exported image is compared
//! with the source over their data extents (SEEK_DATA) and must hold its holes
//! as holes (allocated bytes close to the data's size).
//!
//! The counts are exact: 1 MiB chunks (the default for 2 TiB), 5 extents of 8 MiB
//! aligned to chunks, so 40 chunks of data and 2 Mi - 40 chunks of holes. The wire
//! bytes of the unchanged digest run pin the checkpoint cadence: a Flush every
//! 256 MiB of the disk's size (8192 of them, ~190 KiB) made the run cost per
//! logical byte and timed the connection out.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ferry_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;
const SIZE: u64 = 2 * TIB;
const DATA: u64 = 40 * MIB;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The data ranges of a file (SEEK_DATA / SEEK_HOLE), coalesced.
fn data_ranges(p: &Path) -> Vec<std::ops::Range<u64>> {
    let f = File::open(p).expect("open");
    let size = f.metadata().expect("stat").len();
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for r in ferry_io::sys::data_ranges(&f, size) {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// `export` equals `source`: same size, same data extents, same bytes in them
/// (everything else is a hole in both, so reads as zeros in both).
fn assert_same_thin(source: &Path, export: &Path) {
    let (a, b) = (File::open(source).expect("open source"), File::open(export).expect("open export"));
    assert_eq!(a.metadata().unwrap().len(), b.metadata().unwrap().len(), "sizes differ");
    let ranges = data_ranges(source);
    assert_eq!(data_ranges(export), ranges, "the export's data extents differ from the source's");
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    for r in ranges {
        let mut off = r.start;
        while off < r.end {
            let n = (r.end - off).min(MIB) as usize;
            a.read_exact_at(&mut x[..n], off).expect("read source");
            b.read_exact_at(&mut y[..n], off).expect("read export");
            assert!(x[..n] == y[..n], "bytes differ at offset {off}");
            off += n as u64;
        }
    }
}

fn export(ds: &Path, out: &Path) {
    let r = ferry()
        .args(["points", "export", "--target"])
        .arg(ds)
        .args(["--replica", "big", "--disk", "d", "--force", "--out"])
        .arg(out)
        .output()
        .expect("run export");
    assert!(r.status.success(), "export failed: {}", String::from_utf8_lossy(&r.stderr));
}

fn replicate(img: &Path, ds: &Path, cache: &Path, extra: &[&str]) -> Value {
    let mut args: Vec<String> = vec![
        "replicate".into(),
        "--json".into(),
        "--retry-for".into(),
        "0".into(),
        "--replica".into(),
        "big".into(),
        "--source".into(),
        format!("d={}", img.display()),
        "--target".into(),
        ds.display().to_string(),
        "--map-cache".into(),
        cache.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let r = run(args);
    r.expect_code(0);
    r.summary()
}

/// The replica's digest map is stored by its data: 5 pages of 256 chunks hold the 40
/// chunks of data (each extent inside one page), the 2 Mi - 40 chunks of holes are runs:
/// header, 10 runs of 16 bytes (held, zero, ..., held, zero), 5 pages of 8 KiB, trailer.
/// A digest per chunk was 64 MiB, rewritten at every checkpoint.
fn assert_sparse_map(ds: &Path) {
    let map = ds.join("big").join("disks").join("d.digests");
    assert_eq!(std::fs::metadata(&map).unwrap().len(), 32 + 10 * 16 + 5 * 8192 + 32, "{}", map.display());
}

#[test]
fn a_2_tib_thin_disk_costs_its_data_full_then_digest_then_cbt() {
    let dir = tempfile::tempdir().unwrap();
    let (img, ds, cache, out) =
        (dir.path().join("big.img"), dir.path().join("ds"), dir.path().join("maps"), dir.path().join("export.img"));
    let f = File::create(&img).unwrap();
    f.set_len(SIZE).unwrap();
    let mut rng = Rng::new(20);
    let mut buf = vec![0u8; (8 * MIB) as usize];
    for i in 0..5 {
        rng.fill(&mut buf);
        f.write_all_at(&buf, SIZE / 5 * i / MIB * MIB + 3 * MIB).unwrap();
    }
    drop(f);
    if allocated_bytes(&img) > 2 * DATA {
        eprintln!("skipped: the file system under {} does not keep files sparse", img.display());
        return;
    }

    // Full: 40 chunks read and sent, every other chunk skipped as a hole, never read.
    let s = replicate(&img, &ds, &cache, &[]);
    let d = &s["disks"][0];
    assert_eq!((d["mode"].as_str(), u(&s["chunk_size"])), (Some("full"), MIB));
    assert_eq!(u(&d["chunks_planned"]), SIZE / MIB);
    assert_eq!(u(&d["bytes_read"]), DATA);
    assert_eq!(u(&d["chunks_sent"]), 40);
    assert_eq!(u(&d["bytes_hole_skipped"]), SIZE - DATA);
    assert_eq!(u(&d["chunks_zero"]), SIZE / MIB - 40);
    assert_sparse_map(&ds);
    export(&ds, &out);
    assert_same_thin(&img, &out);
    assert!(allocated_bytes(&out) <= DATA + 4 * MIB, "the export is not sparse: {} bytes", allocated_bytes(&out));

    // Unchanged digest run: nothing sent; a handful of frames on the wire.
    let s = replicate(&img, &ds, &cache, &[]);
    let d = &s["disks"][0];
    assert_eq!(d["mode"].as_str(), Some("digest"));
    assert_eq!(u(&d["chunks_sent"]), 0);
    assert_eq!(u(&d["chunks_unchanged"]), SIZE / MIB);
    assert_eq!(u(&d["bytes_read"]), DATA);
    assert!(u(&s["wire_bytes"]) < 16 << 10, "{} bytes on the wire for an unchanged run", s["wire_bytes"]);
    assert_sparse_map(&ds);

    // CBT: 1 MiB changed inside the second extent, one chunk moves.
    let at = SIZE / 5 / MIB * MIB + 3 * MIB + 2 * MIB;
    let mut changed = vec![0u8; MIB as usize];
    rng.fill(&mut changed);
    File::options().write(true).open(&img).unwrap().write_all_at(&changed, at).unwrap();
    let cbt = dir.path().join("cbt.json");
    std::fs::write(&cbt, format!("[{{\"offset\": {at}, \"length\": {MIB}}}]")).unwrap();
    let s = replicate(&img, &ds, &cache, &["--cbt", &format!("d={}", cbt.display())]);
    let d = &s["disks"][0];
    assert_eq!(d["mode"].as_str(), Some("cbt"));
    assert_eq!((u(&d["chunks_planned"]), u(&d["chunks_sent"]), u(&d["bytes_read"])), (1, 1, MIB));
    export(&ds, &out);
    assert_same_thin(&img, &out);
    assert!(allocated_bytes(&out) <= DATA + 4 * MIB, "the export is not sparse: {} bytes", allocated_bytes(&out));
    assert_sparse_map(&ds);
    let image = ds.join("big").join("disks").join("d.img");
    assert!(allocated_bytes(&image) <= DATA + 4 * MIB, "the replica image is not sparse");
}
