//! Bandwidth limits (issue 18, "throttling by schedule"): `--bwlimit` holds the
//! rate measured on the wire, a `--bwlimit-rule` boundary switches it in a
//! running session, `serve --bwlimit` shares its limit evenly between sessions,
//! and a bad rule is a usage error that names it. Rates are measured by a relay
//! between source and server that timestamps the bytes it forwards, never from
//! ferry's own report.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::*;

const MB: f64 = 1e6;
const MIB: u64 = 1 << 20;

/// Per connection, `(time, bytes forwarded so far)` at each read.
type Samples = Arc<Mutex<Vec<Vec<(Instant, u64)>>>>;

/// A TCP relay to a server that records, per connection, when each read of the client's
/// bytes was forwarded: `(time, bytes forwarded so far)`.
struct Meter {
    addr: String,
    samples: Samples,
}

impl Meter {
    fn start(upstream: &str) -> Meter {
        let upstream = upstream.strip_prefix("ferry://").unwrap_or(upstream).to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind meter");
        let addr = listener.local_addr().expect("meter address").to_string();
        let samples: Samples = Arc::default();
        let all = samples.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                let i = {
                    let mut a = all.lock().unwrap();
                    a.push(Vec::new());
                    a.len() - 1
                };
                let all = all.clone();
                std::thread::spawn(move || relay(client, server, i, &all));
            }
        });
        Meter { addr, samples }
    }

    fn url(&self) -> String {
        format!("ferry://{}", self.addr)
    }

    fn connections(&self) -> Vec<Vec<(Instant, u64)>> {
        self.samples.lock().unwrap().clone()
    }
}

fn relay(client: TcpStream, server: TcpStream, i: usize, all: &Mutex<Vec<Vec<(Instant, u64)>>>) {
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (mut s_read, mut c_write) = (server, client);
    let down = std::thread::spawn(move || {
        let _ = std::io::copy(&mut s_read, &mut c_write);
        let _ = c_write.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match c_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if s_write.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
        all.lock().unwrap()[i].push((Instant::now(), total));
    }
    let _ = s_write.shutdown(Shutdown::Write);
    let _ = down.join();
}

/// Bytes a connection had forwarded by `t`.
fn bytes_at(samples: &[(Instant, u64)], t: Instant) -> u64 {
    samples.iter().take_while(|(at, _)| *at <= t).last().map_or(0, |s| s.1)
}

/// When a connection had first forwarded `n` bytes.
fn time_of(samples: &[(Instant, u64)], n: u64) -> Instant {
    samples.iter().find(|s| s.1 >= n).unwrap_or_else(|| panic!("never reached {n} bytes")).0
}

/// `ferry replicate` of `src` as disk d0 of `replica` to `target`, uncompressed, no retries.
fn replicate(target: &str, token: &Path, src: &Path, replica: &str, extra: &[&str]) -> Child {
    replicate_cmd(target, token, replica, src)
        .args(["--compress", "none"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry replicate")
}

fn finish(child: Child) -> Run {
    child.wait_with_output().expect("wait ferry").into()
}

#[test]
fn bwlimit_20m_holds_20_mb_per_second_on_the_wire_over_ten_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let (ds, src) = (dir.path().join("ds"), dir.path().join("src.img"));
    // 20 MB of start-up, the 10 s window, 20 MB of tail: incompressible, sent uncompressed.
    write_image(&src, 240 * 1_000_000, 18, &[Fill::Random]);
    let server = Server::start(&ds, &token, &[]);
    let meter = Meter::start(&server.url);
    let r = finish(replicate(
        &meter.url(),
        &token,
        &src,
        "vm1",
        &[&server.client_args()[..], &["--bwlimit", "20M"]].concat(),
    ));
    r.expect_code(0);
    let conns = meter.connections();
    assert_eq!(conns.len(), 1);
    let c = &conns[0];
    let t0 = time_of(c, 20_000_000);
    let t1 = t0 + Duration::from_secs(10);
    assert!(c.last().unwrap().0 > t1, "the run ended within the window");
    let rate = (bytes_at(c, t1) - bytes_at(c, t0)) as f64 / 10.0;
    assert!((rate / (20.0 * MB) - 1.0).abs() < 0.05, "measured {:.3} MB/s on the wire", rate / MB);
    let events = r.events();
    let bw: Vec<_> = events.iter().filter(|e| e["event"] == "bwlimit").collect();
    assert_eq!(bw.len(), 1, "{bw:?}");
    assert_eq!(bw[0]["rate"], 20_000_000);
    assert!(bw[0]["rule"].is_null() && bw[0]["previous"].is_null(), "{}", bw[0]);
    assert_eq!(r.summary()["bwlimit"], 20_000_000);
    assert_replica_equals(&ds, "vm1", "d0", &src);
}

#[test]
fn a_rule_boundary_switches_the_rate_of_a_running_session() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let (ds, src) = (dir.path().join("ds"), dir.path().join("src.img"));
    write_image(&src, 16 * MIB, 19, &[Fill::Random]);
    let server = Server::start(&ds, &token, &[]);
    let meter = Meter::start(&server.url);
    // The source's local clock starts 2 s before the work-hours rule ends (test-only variable).
    let start = Instant::now();
    let child = ferry()
        .env("FERRY_TEST_LOCAL_TIME", "mon 17:59:58")
        .args(["replicate", "--json", "--replica", "vm1", "--retry-for", "0", "--compress", "none"])
        .args(["--source", &format!("d0={}", s(&src)), "--target", &meter.url(), "--token-file", s(&token)])
        .args(server.client_args())
        .args(["--bwlimit", "0", "--bwlimit-rule", "sat,sun 1M", "--bwlimit-rule", "mon..fri 8:00-18:00 2M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry replicate");
    let r = finish(child);
    r.expect_code(0);
    let bw: Vec<_> = r.events().into_iter().filter(|e| e["event"] == "bwlimit").collect();
    assert_eq!(bw.len(), 2, "{bw:?}");
    assert_eq!(bw[0]["rate"], 2_000_000);
    assert_eq!(bw[0]["rule"], "mon..fri 8:00-18:00 2M");
    assert_eq!(
        (bw[1]["rate"].as_u64(), bw[1]["rule"].is_null(), bw[1]["previous"].as_u64()),
        (Some(0), true, Some(2_000_000))
    );
    let c = &meter.connections()[0];
    // Before the boundary (2 s after the start) the rule's 2 MB/s holds (plus the first
    // frames and what the sockets buffer); the remaining ~12 MB go unlimited within a
    // second of it, where 2 MB/s would need 6 s more.
    let early = bytes_at(c, start + Duration::from_millis(1800));
    assert!(early < 4 * MIB + MIB / 2, "{early} bytes by 1.8 s");
    let done = time_of(c, 16 * MIB) - start;
    assert!(done < Duration::from_millis(3500), "all sent {done:?} after the start");
    assert_replica_equals(&ds, "vm1", "d0", &src);
}

#[test]
fn two_sessions_under_one_serve_bwlimit_get_even_shares() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let ds = dir.path().join("ds");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    write_image(&a, 40 * 1_000_000, 20, &[Fill::Random]);
    write_image(&b, 40 * 1_000_000, 21, &[Fill::Random]);
    let server = Server::start(&ds, &token, &["--bwlimit", "10M"]);
    let meter = Meter::start(&server.url);
    let pa = replicate(&meter.url(), &token, &a, "vm-a", &server.client_args());
    let pb = replicate(&meter.url(), &token, &b, "vm-b", &server.client_args());
    let (ra, rb) = (finish(pa), finish(pb));
    ra.expect_code(0);
    rb.expect_code(0);
    let conns = meter.connections();
    assert_eq!(conns.len(), 2);
    // While both run (each past its first 4 MB, neither in its last 8 MB): even shares of
    // the server's 10 MB/s.
    let from = conns.iter().map(|c| time_of(c, 4_000_000)).max().unwrap();
    let to = conns.iter().map(|c| time_of(c, 32_000_000)).min().unwrap();
    assert!(to > from + Duration::from_secs(2), "the sessions overlapped too little: {:?}", to - from);
    let secs = (to - from).as_secs_f64();
    let shares: Vec<f64> = conns.iter().map(|c| (bytes_at(c, to) - bytes_at(c, from)) as f64 / secs).collect();
    let ratio = shares[0].max(shares[1]) / shares[0].min(shares[1]);
    assert!(ratio < 1.10, "shares {:.2} and {:.2} MB/s", shares[0] / MB, shares[1] / MB);
    let sum = shares[0] + shares[1];
    // Together: the server's limit, measured upstream of the server's reads, so the
    // sockets' buffers (a few MB per connection, filling during the window) blur it.
    assert!((sum / (10.0 * MB) - 1.0).abs() < 0.15, "together {:.2} MB/s", sum / MB);
    let bw = server.events_named("bwlimit", 1);
    assert_eq!(bw[0]["rate"], 10_000_000);
    assert_replica_equals(&ds, "vm-a", "d0", &a);
    assert_replica_equals(&ds, "vm-b", "d0", &b);
}

#[test]
fn a_bad_bwlimit_rule_is_a_usage_error_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "token");
    let src = dir.path().join("src.img");
    write_image(&src, MIB, 22, &[Fill::Random]);
    let ds = dir.path().join("ds");
    let base = ["replicate", "--replica", "vm1", "--source", s(&src), "--target", s(&ds)];
    let r = run(base.iter().copied().chain([
        "--bwlimit-rule",
        "mon..fri 8:00-18:00 10M",
        "--bwlimit-rule",
        "mon..frx 8:00-9:00 1M",
    ]));
    r.expect_code(2);
    assert!(r.stderr.contains("bad --bwlimit-rule \"mon..frx 8:00-9:00 1M\": bad days \"mon..frx\""), "{}", r.stderr);
    let r = run(base.iter().copied().chain(["--bwlimit-rule", "mon 18:00-8:00 1M"]));
    r.expect_code(2);
    assert!(r.stderr.contains("bad --bwlimit-rule \"mon 18:00-8:00 1M\""), "{}", r.stderr);
    let r = run(base.iter().copied().chain(["--bwlimit", "20 Mbit"]));
    r.expect_code(2);
    assert!(r.stderr.contains("--bwlimit: bad rate \"20 Mbit\""), "{}", r.stderr);
    // Nothing was made at the target.
    assert!(!ds.exists());
    let r = run(["serve", "--listen", "127.0.0.1:0", "--datastore", s(&ds), "--token-file", s(&token)]
        .into_iter()
        .chain(["--bwlimit-rule", "sat,sun 0.5"]));
    r.expect_code(2);
    assert!(r.stderr.contains("bad --bwlimit-rule \"sat,sun 0.5\": bad rate \"0.5\""), "{}", r.stderr);
    assert!(!ds.exists());
}
