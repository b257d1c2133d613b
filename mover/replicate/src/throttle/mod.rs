//! Bandwidth limits (`--bwlimit`, `--bwlimit-rule`): a [`Throttle`] that the
//! bytes a session moves are charged to, shared by everything that must share
//! one limit (`Arc<Throttle>`): the frames a source sends (source/send.rs), or
//! the bytes all of a server's sessions receive (target/session.rs).
//!
//! The bucket is governor's GCRA rate limiter, not a sleep loop: a charge takes
//! cells from it and, when there are not enough, sleeps until governor says they
//! will be. A cell is `ceil(rate / 100_000)` bytes, so governor's replenish
//! interval (whole nanoseconds) is at least 10 µs and its rounding costs under
//! 0.01% of the rate; the bucket holds 50 ms of the rate (the largest burst after
//! an idle spell). Charges go in pieces of at most 16 KiB: sessions sharing a
//! server's limit take turns in small steps, in the order they came (a ticket
//! queue, not whoever wakes first), so none starves another (each gets
//! an even share while all are busy; an idle one takes nothing).
//!
//! governor fixes a limiter's quota at construction, so a new rate means a new
//! limiter: the schedule (schedule.rs) is evaluated at the first charge and then
//! at most every [`RECHECK`], and a charge waiting for cells wakes at least every
//! [`RECHECK`] to look again; a rule boundary therefore takes effect within
//! about a quarter of a second, in a running session. A waiting piece is charged
//! again to the new limiter.
//!
//! The clock is injectable ([`ThrottleClock`]: a monotonic time, the local
//! wall-clock time of the week, and sleeping), so tests drive schedules without
//! waiting for real days; [`SystemClock::starting_at`] runs a real clock from a
//! chosen local time (the CLI's test-only `FERRY_TEST_LOCAL_TIME`).

pub mod schedule;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

pub use schedule::{LocalTime, Rate, Rule, Schedule, Timeframe};

/// How often the schedule is looked at again while bytes flow or wait.
pub const RECHECK: Duration = Duration::from_millis(250);

/// The largest piece of one charge.
const PIECE: u64 = 16 << 10;

/// What a throttle needs of time.
pub trait ThrottleClock: Send + Sync {
    /// Monotonic time since some fixed start.
    fn mono(&self) -> Duration;
    /// The local wall-clock time now.
    fn local(&self) -> LocalTime;
    /// Wait `d` (of [`ThrottleClock::mono`]'s time).
    fn sleep(&self, d: Duration);
}

/// The real clocks: `Instant`, the system's local time, `thread::sleep`.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
    /// A fixed local time at `start` (tests); None: the system's.
    local_at_start: Option<LocalTime>,
}

impl SystemClock {
    /// The system's clocks.
    pub fn new() -> SystemClock {
        SystemClock { start: Instant::now(), local_at_start: None }
    }

    /// Real time whose local time starts at `t` and runs from there (for tests of schedules).
    pub fn starting_at(t: LocalTime) -> SystemClock {
        SystemClock { start: Instant::now(), local_at_start: Some(t) }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl ThrottleClock for SystemClock {
    fn mono(&self) -> Duration {
        self.start.elapsed()
    }
    fn local(&self) -> LocalTime {
        if let Some(t) = self.local_at_start {
            return t.plus_secs(self.start.elapsed().as_secs());
        }
        // The local time is only ever unreadable on a broken system: count as Monday 0:00.
        let (weekday, second) = ferry_io::sys::local_weekday_second().unwrap_or((0, 0));
        LocalTime { weekday, second }
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// The rate in force changed (or was first set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateChange {
    /// The rate now in force.
    pub rate: Rate,
    /// The rule that gives it (its text), or None for `--bwlimit`.
    pub rule: Option<String>,
    /// The rate before, or None at the first charge.
    pub previous: Option<Rate>,
}

/// Called when the rate in force changes.
pub type OnChange = Box<dyn Fn(&RateChange) + Send + Sync>;

/// The monotonic clock as governor sees it.
struct GovClock(Arc<dyn ThrottleClock>);

impl Clock for GovClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.0.mono()
    }
}

/// One rate's bucket.
struct Bucket {
    limiter: RateLimiter<NotKeyed, InMemoryState, GovClock, NoOpMiddleware<Duration>>,
    /// Bytes per cell.
    cell: u64,
    /// Bytes per piece (at most the bucket's capacity).
    piece: u64,
    /// Bytes charged so far: a charge takes the cells its bytes complete.
    charged: AtomicU64,
}

impl Bucket {
    fn new(rate: u64, clock: &Arc<dyn ThrottleClock>) -> Bucket {
        let cell = rate.div_ceil(100_000).max(1);
        let period = Duration::from_nanos(((1_000_000_000u128 * u128::from(cell)) / u128::from(rate)).max(1) as u64);
        let burst_bytes = (rate / 20).max(1);
        let piece = burst_bytes.min(PIECE);
        // One cell more than the bytes need: a piece's cells round up by one at most.
        let burst = NonZeroU32::new((burst_bytes.div_ceil(cell) + 1).min(u64::from(u32::MAX)) as u32)
            .expect("at least one cell");
        let quota = Quota::with_period(period).expect("a non-zero period").allow_burst(burst);
        Bucket {
            limiter: RateLimiter::direct_with_clock(quota, GovClock(clock.clone())),
            cell,
            piece,
            charged: AtomicU64::new(0),
        }
    }

    /// The cells `bytes` more complete.
    fn cells(&self, bytes: u64) -> u32 {
        let before = self.charged.fetch_add(bytes, Ordering::Relaxed);
        ((before + bytes) / self.cell - before / self.cell) as u32
    }
}

/// The rate in force and its bucket.
struct Current {
    rate: Rate,
    rule: Option<usize>,
    bucket: Option<Arc<Bucket>>,
    /// When the schedule was last evaluated; None: never.
    checked: Option<Duration>,
}

/// A bandwidth limit on a schedule, charged by everything that shares it (module docs).
pub struct Throttle {
    schedule: Schedule,
    clock: Arc<dyn ThrottleClock>,
    current: Mutex<Current>,
    on_change: Option<OnChange>,
    /// Pieces waiting for the bucket take turns in the order they came: the next
    /// ticket to hand out and the one being served. A session that charges again
    /// queues behind the others, so sessions sharing a limit get even shares
    /// however the threads are scheduled.
    queue: Mutex<(u64, u64)>,
    turn: Condvar,
}

/// This piece's turn at the bucket; the next piece's when dropped (also on a panic).
struct Turn<'a>(&'a Throttle);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.queue.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
        self.0.turn.notify_all();
    }
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle").field("schedule", &self.schedule).finish_non_exhaustive()
    }
}

impl Throttle {
    /// A throttle on `schedule` with the system's clocks; None when nothing is ever limited.
    pub fn from_schedule(schedule: Schedule) -> Option<Arc<Throttle>> {
        (!schedule.is_unlimited()).then(|| Arc::new(Throttle::new(schedule, Arc::new(SystemClock::new()), None)))
    }

    /// A throttle on `schedule` with `clock`; `on_change` hears of every change of the
    /// rate in force (and of the first rate, at the first charge).
    pub fn new(schedule: Schedule, clock: Arc<dyn ThrottleClock>, on_change: Option<OnChange>) -> Throttle {
        let current = Mutex::new(Current { rate: Rate::UNLIMITED, rule: None, bucket: None, checked: None });
        Throttle { schedule, clock, current, on_change, queue: Mutex::new((0, 0)), turn: Condvar::new() }
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The rate in force (as of the last look at the schedule).
    pub fn rate(&self) -> Rate {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).rate
    }

    /// The bucket in force, after a look at the schedule when one is due.
    fn bucket(&self) -> Option<Arc<Bucket>> {
        let now = self.clock.mono();
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.checked.is_some_and(|c| now.saturating_sub(c) < RECHECK) {
            return cur.bucket.clone();
        }
        let first = cur.checked.is_none();
        cur.checked = Some(now);
        let (rate, rule) = self.schedule.rate_at(self.clock.local());
        if first || rate != cur.rate || rule != cur.rule {
            let previous = (!first).then_some(cur.rate);
            if first || rate != cur.rate {
                cur.bucket = rate.limit().map(|r| Arc::new(Bucket::new(r, &self.clock)));
            }
            cur.rate = rate;
            cur.rule = rule;
            if let Some(f) = &self.on_change {
                f(&RateChange { rate, rule: rule.map(|i| self.schedule.rules[i].text.clone()), previous });
            }
        }
        cur.bucket.clone()
    }

    /// Wait for this piece's turn at the bucket.
    fn take_turn(&self) -> Turn<'_> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = q.0;
        q.0 += 1;
        while q.1 != ticket {
            q = self.turn.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        Turn(self)
    }

    /// Charge `bytes` moved (or about to be): returns once the rate in force allows them.
    pub fn charge(&self, bytes: u64) {
        let mut left = bytes;
        while left > 0 {
            let _turn = self.take_turn();
            let Some(bucket) = self.bucket() else { return };
            let piece = left.min(bucket.piece);
            let Some(cells) = NonZeroU32::new(bucket.cells(piece)) else {
                left -= piece;
                continue;
            };
            let taken = loop {
                match bucket.limiter.check_n(cells) {
                    Ok(Ok(())) => break true,
                    Ok(Err(not_until)) => {
                        let wait = not_until.wait_time_from(self.clock.mono());
                        self.clock.sleep(wait.min(RECHECK));
                    }
                    // Cannot happen (a piece fits the bucket); never block on it.
                    Err(_) => break true,
                }
                // A new rate: charge the piece to its bucket instead.
                if !self.bucket().is_some_and(|b| Arc::ptr_eq(&b, &bucket)) {
                    break false;
                }
            };
            if taken {
                left -= piece;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that only moves when slept on.
    struct MockClock {
        nanos: AtomicU64,
        local_start: LocalTime,
    }

    impl MockClock {
        fn new(local: &str) -> Arc<MockClock> {
            Arc::new(MockClock { nanos: AtomicU64::new(0), local_start: LocalTime::parse(local).unwrap() })
        }
    }

    impl ThrottleClock for MockClock {
        fn mono(&self) -> Duration {
            Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
        }
        fn local(&self) -> LocalTime {
            self.local_start.plus_secs(self.mono().as_secs())
        }
        fn sleep(&self, d: Duration) {
            self.nanos.fetch_add(d.as_nanos().max(1) as u64, Ordering::SeqCst);
        }
    }

    /// The changes a throttle reported, with the mock time of each.
    type ChangeLog = Arc<Mutex<Vec<(Duration, RateChange)>>>;

    fn throttle(default: &str, rules: &[&str], clock: &Arc<MockClock>) -> (Throttle, ChangeLog) {
        let rules: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        let schedule = Schedule::parse(Some(default), &rules).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (l, c) = (log.clone(), clock.clone());
        let on_change: OnChange = Box::new(move |ch| l.lock().unwrap().push((c.mono(), ch.clone())));
        (Throttle::new(schedule, clock.clone(), Some(on_change)), log)
    }

    /// Charge 64 KiB frames until the mock clock reaches `until`; the bytes charged per
    /// whole second of mock time.
    fn run(t: &Throttle, clock: &MockClock, until: Duration) -> Vec<u64> {
        let mut per_sec = vec![0u64; until.as_secs() as usize + 1];
        while clock.mono() < until {
            t.charge(64 << 10);
            // The frame goes when the charge returns.
            per_sec[clock.mono().as_secs() as usize] += 64 << 10;
        }
        per_sec
    }

    #[test]
    fn holds_the_rate_over_ten_seconds() {
        for (rate, text) in
            [(20_000_000u64, "20M"), (1_000_000, "1M"), (3_333_333, "3333333"), (123_456_789, "123456789")]
        {
            let clock = MockClock::new("tue 3:00");
            let (t, _) = throttle(text, &[], &clock);
            let per_sec = run(&t, &clock, Duration::from_secs(10));
            let total: u64 = per_sec[..10].iter().sum();
            let got = total as f64 / 10.0;
            // Within 1% over 10 s (the 50 ms bucket and one frame are the only slack).
            assert!((got / rate as f64 - 1.0).abs() < 0.01, "{text}: {got} B/s");
        }
    }

    #[test]
    fn a_rule_boundary_switches_the_rate_within_a_second() {
        // Two seconds before 18:00 on a Monday: the work-hours rule gives 1 MB/s, then
        // --bwlimit's 10 MB/s.
        let clock = MockClock::new("mon 17:59:58");
        let (t, log) = throttle("10M", &["mon..fri 8:00-18:00 1M"], &clock);
        let per_sec = run(&t, &clock, Duration::from_secs(6));
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(
            log[0].1,
            RateChange { rate: Rate(1_000_000), rule: Some("mon..fri 8:00-18:00 1M".into()), previous: None }
        );
        assert_eq!(log[1].1, RateChange { rate: Rate(10_000_000), rule: None, previous: Some(Rate(1_000_000)) });
        // The boundary is at 2 s of the mock clock: the switch within 1 s of it.
        let switched = log[1].0;
        assert!(switched >= Duration::from_secs(2) && switched < Duration::from_secs(3), "switched at {switched:?}");
        // Before: 1 MB/s (within the burst and a frame); from a second after: 10 MB/s.
        let before = (per_sec[0] + per_sec[1]) as f64;
        assert!((before / 2e6 - 1.0).abs() < 0.06, "before: {before} bytes in 2 s");
        let after = (per_sec[3] + per_sec[4]) as f64;
        assert!((after / 2e7 - 1.0).abs() < 0.01, "after: {after} bytes in 2 s");
    }

    #[test]
    fn a_slow_rule_ending_wakes_a_waiting_charge() {
        // 100 B/s until 18:00, then unlimited: a 64 KiB charge at 17:59:59 would take
        // 11 minutes at the old rate; it ends soon after the boundary instead.
        let clock = MockClock::new("mon 17:59:59");
        let (t, log) = throttle("0", &["mon 8:00-18:00 100"], &clock);
        t.charge(64 << 10);
        let took = clock.mono();
        assert!(took >= Duration::from_secs(1) && took < Duration::from_millis(1500), "took {took:?}");
        assert_eq!(log.lock().unwrap().last().unwrap().1.rate, Rate::UNLIMITED);
        assert_eq!(t.rate(), Rate::UNLIMITED);
    }

    #[test]
    fn unlimited_never_waits() {
        let clock = MockClock::new("sat 12:00");
        let (t, log) = throttle("0", &["mon..fri 1M"], &clock);
        t.charge(1 << 30);
        assert_eq!(clock.mono(), Duration::ZERO);
        assert_eq!(log.lock().unwrap()[0].1.rate, Rate::UNLIMITED);
        assert!(Throttle::from_schedule(Schedule::parse(Some("0"), &[]).unwrap()).is_none());
    }
}
