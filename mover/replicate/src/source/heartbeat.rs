//! The job's heartbeat: a progress event at least every [`BEAT`] in every phase
//! of a run, and a Keepalive whenever the connection was quiet for
//! [`KEEPALIVE_INTERVAL`] (crate::busy has the why).
//!
//! The sender reports progress as chunks pass it (every 200 ms at most); in a
//! phase where nothing passes (opening disks, fetching a digest map, waiting for
//! the target's commit) the heartbeat repeats the latest figures with the
//! phase's name: `open`, `digest_map`, `data`, `commit`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{JobEvent, Observer};

/// The longest a run goes without a progress event.
pub(super) const BEAT: Duration = Duration::from_secs(1);

/// How often the heartbeat looks (well under [`BEAT`], so beats come at most this late).
pub(super) const LOOK: Duration = Duration::from_millis(200);

/// An observer that remembers the latest progress and repeats it when it gets old.
pub(super) struct Heartbeat<'a> {
    obs: &'a dyn Observer,
    state: Mutex<Beat>,
}

struct Beat {
    phase: &'static str,
    disk: String,
    done: u64,
    total: u64,
    last: Instant,
}

impl<'a> Heartbeat<'a> {
    pub(super) fn new(obs: &'a dyn Observer) -> Heartbeat<'a> {
        let state = Beat { phase: "open", disk: String::new(), done: 0, total: 0, last: Instant::now() };
        Heartbeat { obs, state: Mutex::new(state) }
    }

    /// The run enters `phase`; on `disk` when given (its figures start at 0).
    pub(super) fn phase(&self, phase: &'static str, disk: Option<&str>) {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        b.phase = phase;
        if let Some(d) = disk {
            (b.disk, b.done, b.total) = (d.to_string(), 0, 0);
        }
    }

    /// Repeat the latest progress, in the current phase, if none came for [`BEAT`].
    pub(super) fn beat(&self) {
        let e = {
            let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if b.last.elapsed() + LOOK < BEAT {
                return;
            }
            b.last = Instant::now();
            JobEvent::Progress { disk: b.disk.clone(), done: b.done, total: b.total, phase: b.phase }
        };
        self.obs.event(&e);
    }
}

impl Observer for Heartbeat<'_> {
    fn event(&self, e: &JobEvent) {
        if let JobEvent::Progress { disk, done, total, .. } = e {
            let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (b.disk, b.done, b.total, b.last) = (disk.clone(), *done, *total, Instant::now());
        }
        self.obs.event(e);
    }
}
