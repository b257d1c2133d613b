//! `ferry plan`: what a run would move, exactly, with nothing moved or changed.

use ferry_tests::*;
use serde_json::Value;

fn plan_json(target: &str, img: &std::path::Path, extra: &[&str]) -> Value {
    let mut args = vec!["plan", "--json", "--replica", "vm1", "--chunk-size", "64K", "--compress", "none", "--target"];
    args.push(target);
    args.extend_from_slice(extra);
    let img = img.to_str().unwrap();
    args.extend(["--source", img]);
    let r = run(&args);
    r.expect_code(0);
    r.events().into_iter().find(|e| e["event"] == "plan").expect("plan event")
}

fn replicate_json(target: &str, img: &std::path::Path, extra: &[&str]) -> Value {
    let mut args = vec!["replicate", "--json", "--replica", "vm1", "--chunk-size", "64K", "--compress", "none"];
    args.extend(["--retry-for", "0", "--target", target]);
    args.extend_from_slice(extra);
    let img = img.to_str().unwrap();
    args.extend(["--source", img]);
    let r = run(&args);
    r.expect_code(0);
    r.summary()
}

fn tree(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                v.extend(tree(&p));
            } else {
                v.push((p.display().to_string(), std::fs::metadata(&p).unwrap().len()));
            }
        }
    }
    v.sort();
    v
}

#[test]
fn plan_predicts_the_run_exactly_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    write_image(&img, 4 << 20, 3, &[Fill::Random, Fill::Zero, Fill::Text]);
    let ds = dir.path().join("ds");
    let ds_s = ds.to_str().unwrap().to_string();

    // A plan against a datastore that does not exist yet creates nothing.
    let p = plan_json(&ds_s, &img, &[]);
    assert!(!ds.exists(), "plan created the datastore");
    assert_eq!(p["disks"][0]["mode"], "full");
    let r = replicate_json(&ds_s, &img, &[]);
    for k in ["chunks_sent", "chunks_zero", "bytes_data", "bytes_sent"] {
        assert_eq!(p["totals"][k], r["totals"][k], "{k}");
    }

    // Incremental: 5 changed 64K blocks; the plan says exactly those, the run moves exactly those.
    let changed = mutate_blocks(&img, 65536, 5, 9);
    let before = tree(&ds);
    let p = plan_json(&ds_s, &img, &[]);
    assert_eq!(tree(&ds), before, "plan changed the datastore");
    assert_eq!(p["disks"][0]["mode"], "digest");
    assert_eq!(p["totals"]["chunks_sent"], changed.len() as u64);
    assert_eq!(p["totals"]["bytes_data"], 5 * 65536);

    // The same over TCP against a server.
    let token = new_token(dir.path(), "token");
    let server = Server::start(&ds, &token, &[]);
    // The server's first start made its TLS identity (DATASTORE/.tls); the plan must change nothing more.
    let before = tree(&ds);
    let p_remote =
        plan_json(&server.url, &img, &["--token-file", token.to_str().unwrap(), "--fingerprint", &server.fingerprint]);
    assert_eq!(tree(&ds), before, "remote plan changed the datastore");
    for k in ["chunks_sent", "chunks_zero", "chunks_unchanged", "bytes_data", "bytes_sent"] {
        assert_eq!(p_remote["totals"][k], p["totals"][k], "{k}");
    }
    let r = replicate_json(
        &server.url,
        &img,
        &["--token-file", token.to_str().unwrap(), "--fingerprint", &server.fingerprint],
    );
    for k in ["chunks_sent", "chunks_zero", "bytes_data", "bytes_sent"] {
        assert_eq!(p["totals"][k], r["totals"][k], "{k}");
    }
    assert_replica_equals(&ds, "vm1", "d0.img", &img);
}
