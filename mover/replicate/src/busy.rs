//! Long bookkeeping phases (issue 20): neither the user nor the peer is left
//! without news while one end works for a long time without data to move.
//!
//! A source reports progress at least once a second whatever it is doing
//! ([`crate::source`]'s heartbeat: `JobEvent::Progress` with the phase it is
//! in) and sends a Keepalive after [`crate::conn::KEEPALIVE_INTERVAL`] of
//! quiet in every phase (before the pipeline too: loading a digest map or
//! planning a large disk). A target sends a Keepalive every [`TARGET_TICK`]
//! while it works long before an answer (the commit; rebuilding a digest map
//! before it sends it), so that the connection never looks dead to the source
//! or to anything between them.
//!
//! Test knob: `FERRY_TEST_SLOW=PHASE:SECS[,PHASE:SECS]` makes a phase take SECS
//! seconds longer, to show that the ticks come and that no idle timeout fires:
//! `digest_map` (the source, before it asks for a disk's digest map, where it
//! loads its cached copy) and `commit` (the target, once the writer made the
//! session durable, before the point goes into the catalog).

use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError};

/// The environment variable of the test knob (see the module doc).
pub const SLOW_VAR: &str = "FERRY_TEST_SLOW";

/// How often a target working before an answer sends a Keepalive.
pub const TARGET_TICK: Duration = Duration::from_secs(1);

/// Test knob: sleep as long as `FERRY_TEST_SLOW` says for `phase` (not at all without it).
pub(crate) fn test_slow(phase: &str) {
    let Ok(v) = std::env::var(SLOW_VAR) else { return };
    for item in v.split(',') {
        if let Some((p, secs)) = item.split_once(':') {
            if p == phase {
                if let Ok(n) = secs.parse::<u64>() {
                    std::thread::sleep(Duration::from_secs(n));
                }
            }
        }
    }
}

/// Run `work` while another thread calls `tick` every `every` until it returns (or panics).
pub(crate) fn ticking<T>(every: Duration, tick: impl Fn() + Sync, work: impl FnOnce() -> T) -> T {
    let (stop, stopped) = bounded::<()>(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                tick();
            }
        });
        let r = work();
        drop(stop);
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn ticks_while_the_work_runs_and_stops_with_it() {
        let ticks = AtomicU32::new(0);
        let tick = || {
            ticks.fetch_add(1, Ordering::Relaxed);
        };
        // The work ends once it has seen three ticks (or after 10 s, and the test fails).
        let r = ticking(Duration::from_millis(20), tick, || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while ticks.load(Ordering::Relaxed) < 3 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            7
        });
        assert_eq!(r, 7);
        let n = ticks.load(Ordering::Relaxed);
        assert!(n >= 3, "{n} ticks while the work ran");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ticks.load(Ordering::Relaxed), n, "no tick once the work returned");
    }
}
