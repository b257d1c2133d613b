//! `--bwlimit RATE` and `--bwlimit-rule "TIMEFRAME RATE"`: the grammar and the
//! schedule, as pure values (no clock, no IO: the local time is passed in).
//!
//! RATE is bytes per second: a number (`0` means unlimited), optionally with a
//! decimal part, and an optional unit: `K`/`KB` = 10^3, `M`/`MB` = 10^6,
//! `G`/`GB` = 10^9, `T`/`TB` = 10^12 (decimal, as Proxmox's `MB`, and as network
//! links are sold), `KiB`/`MiB`/`GiB`/`TiB` = powers of 1024, and an optional
//! `/s`. So `20M` is 20,000,000 bytes/s (160 Mbit/s). Unlike rsync, a bare number
//! is bytes, not KiB, and `M` is not MiB: ferry says `MiB` when it means it.
//!
//! TIMEFRAME follows Proxmox's daily durations (`mon..fri 8:00-18:00`): optional
//! days, then optional time ranges, at least one of the two:
//! - days: a comma list of days and day ranges: `mon,wed`, `mon..fri`,
//!   `sat,sun`, `fri..mon` (a range wraps over the week's end); `mon` to `sun`
//!   or the full English names; no days means every day.
//! - times: a comma list of `H[:MM]-H[:MM]` in local time, start inclusive, end
//!   exclusive, `24:00` allowed as an end; no times means the whole day. A range
//!   that crosses midnight is two ranges (`22:00-24:00,0:00-6:00`).
//!
//! The first rule whose timeframe holds the local time gives the rate;
//! otherwise `--bwlimit` does (unlimited when absent).

use std::fmt;

/// A rate in bytes per second; 0 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rate(pub u64);

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate(0);

    /// Bytes per second, or None when unlimited.
    pub fn limit(self) -> Option<u64> {
        (self.0 > 0).then_some(self.0)
    }

    /// Parse a RATE (module docs); the error says what is wrong.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t);
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = (&t[..split], t[split..].trim());
        if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1 {
            return Err(format!("bad rate {s:?}: expected a number of bytes per second such as 20M or 512KiB"));
        }
        let mult: u64 = match unit {
            "" | "B" => 1,
            "K" | "k" | "KB" | "kB" => 1_000,
            "M" | "MB" => 1_000_000,
            "G" | "GB" => 1_000_000_000,
            "T" | "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            u => {
                return Err(format!(
                    "bad rate {s:?}: unknown unit {u:?} (bytes per second: K, M, G, T = powers of 1000, KiB, MiB, GiB, TiB = powers of 1024)"
                ))
            }
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        let too_big = || format!("bad rate {s:?}: too large");
        let int: u64 = int.parse().map_err(|_| too_big())?;
        let v = int.checked_mul(mult).ok_or_else(too_big)?;
        // The fractional part, exactly: its digits times the unit, truncated to whole bytes.
        let frac = &frac[..frac.len().min(18)];
        let part = frac.parse::<u128>().unwrap_or(0) * u128::from(mult) / 10u128.pow(frac.len() as u32);
        let v = v.checked_add(part as u64).ok_or_else(too_big)?;
        if v == 0 && (int != 0 || frac.bytes().any(|d| d != b'0')) {
            return Err(format!("bad rate {s:?}: less than one byte per second (0 means unlimited)"));
        }
        Ok(Rate(v))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit() {
            None => write!(f, "unlimited"),
            Some(b) if b >= 1_000_000 => write!(f, "{} MB/s", b as f64 / 1e6),
            Some(b) if b >= 1_000 => write!(f, "{} kB/s", b as f64 / 1e3),
            Some(b) => write!(f, "{b} B/s"),
        }
    }
}

/// A local wall-clock time within the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 = Monday .. 6 = Sunday.
    pub weekday: u8,
    /// Second of the day, 0..86_400.
    pub second: u32,
}

impl LocalTime {
    /// Parse `DAY H:MM[:SS]` (`mon 17:59:58`): the test clock's start (`FERRY_TEST_LOCAL_TIME`).
    pub fn parse(s: &str) -> Result<LocalTime, String> {
        let bad = || format!("bad local time {s:?}: expected DAY H:MM[:SS] such as \"mon 17:59:58\"");
        let (day, time) = s.trim().split_once(' ').ok_or_else(bad)?;
        let weekday = parse_day(day).ok_or_else(bad)?;
        let parts: Vec<&str> = time.trim().split(':').collect();
        if parts.len() < 2 || parts.len() > 3 {
            return Err(bad());
        }
        let num = |p: &str, max: u32| p.parse::<u32>().ok().filter(|&v| v < max && !p.is_empty());
        let h = num(parts[0], 24).ok_or_else(bad)?;
        let m = num(parts[1], 60).ok_or_else(bad)?;
        let sec = if parts.len() == 3 { num(parts[2], 60).ok_or_else(bad)? } else { 0 };
        Ok(LocalTime { weekday, second: h * 3600 + m * 60 + sec })
    }

    /// This time plus `secs` seconds (wrapping over the week).
    pub fn plus_secs(self, secs: u64) -> LocalTime {
        const WEEK: u64 = 7 * 86_400;
        let t = (u64::from(self.weekday) * 86_400 + u64::from(self.second) + secs) % WEEK;
        LocalTime { weekday: (t / 86_400) as u8, second: (t % 86_400) as u32 }
    }
}

/// When a rule applies: days of the week and minute ranges of the day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeframe {
    /// Bit `d` set: weekday `d` (0 = Monday) is in.
    days: u8,
    /// Minute ranges `[start, end)` of the day, end at most 1440.
    minutes: Vec<(u16, u16)>,
}

const DAYS: [(&str, &str); 7] = [
    ("mon", "monday"),
    ("tue", "tuesday"),
    ("wed", "wednesday"),
    ("thu", "thursday"),
    ("fri", "friday"),
    ("sat", "saturday"),
    ("sun", "sunday"),
];

fn parse_day(s: &str) -> Option<u8> {
    let s = s.to_ascii_lowercase();
    DAYS.iter().position(|(short, long)| s == *short || s == *long).map(|d| d as u8)
}

/// `H[:MM]` (`24:00` when `end`) as minutes of the day.
fn parse_hm(s: &str, end: bool) -> Option<u16> {
    let (h, m) = s.split_once(':').unwrap_or((s, "00"));
    let ok = |p: &str, n: usize| !p.is_empty() && p.len() <= n && p.bytes().all(|b| b.is_ascii_digit());
    if !ok(h, 2) || !ok(m, 2) || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) if end => Some(1440),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

impl Timeframe {
    /// Parse a TIMEFRAME (module docs).
    pub fn parse(s: &str) -> Result<Timeframe, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let looks_like_time = |w: &str| w.starts_with(|c: char| c.is_ascii_digit());
        let (day_word, time_word) = match words.as_slice() {
            [d] if !looks_like_time(d) => (Some(*d), None),
            [t] => (None, Some(*t)),
            [d, t] => (Some(*d), Some(*t)),
            [] => return Err("empty timeframe: expected days and/or times such as \"mon..fri 8:00-18:00\"".into()),
            _ => {
                return Err(format!("bad timeframe {s:?}: expected [DAYS] [H:MM-H:MM] such as \"mon..fri 8:00-18:00\""))
            }
        };
        let mut days = 0u8;
        match day_word {
            None => days = 0x7f,
            Some(w) => {
                for part in w.split(',') {
                    let bad = || {
                        format!("bad days {part:?} in {s:?}: expected mon..sun, a range such as mon..fri, or a list such as sat,sun")
                    };
                    match part.split_once("..") {
                        Some((a, b)) => {
                            let (a, b) = (parse_day(a).ok_or_else(bad)?, parse_day(b).ok_or_else(bad)?);
                            let mut d = a;
                            loop {
                                days |= 1 << d;
                                if d == b {
                                    break;
                                }
                                d = (d + 1) % 7;
                            }
                        }
                        None => days |= 1 << parse_day(part).ok_or_else(bad)?,
                    }
                }
            }
        }
        let mut minutes = Vec::new();
        match time_word {
            None => minutes.push((0, 1440)),
            Some(w) => {
                for part in w.split(',') {
                    let bad = || {
                        format!("bad time range {part:?} in {s:?}: expected H:MM-H:MM such as 8:00-18:00 (24:00 may end a range)")
                    };
                    let (a, b) = part.split_once('-').ok_or_else(bad)?;
                    let (a, b) = (parse_hm(a, false).ok_or_else(bad)?, parse_hm(b, true).ok_or_else(bad)?);
                    if a >= b {
                        return Err(format!(
                            "bad time range {part:?} in {s:?}: the end must come after the start (for a range over midnight give two: 22:00-24:00,0:00-6:00)"
                        ));
                    }
                    minutes.push((a, b));
                }
            }
        }
        Ok(Timeframe { days, minutes })
    }

    /// Whether `t` falls in this timeframe.
    pub fn contains(&self, t: LocalTime) -> bool {
        let minute = (t.second / 60) as u16;
        self.days & (1 << t.weekday) != 0 && self.minutes.iter().any(|&(a, b)| a <= minute && minute < b)
    }
}

/// One `--bwlimit-rule`: a timeframe and the rate in force within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The rule as given (for messages and events).
    pub text: String,
    /// When it applies.
    pub timeframe: Timeframe,
    /// Its rate.
    pub rate: Rate,
}

impl Rule {
    /// Parse `"TIMEFRAME RATE"`; the error names the rule.
    pub fn parse(s: &str) -> Result<Rule, String> {
        let named = |e: String| format!("bad --bwlimit-rule {s:?}: {e}");
        let t = s.trim();
        let (tf, rate) = t.rsplit_once(char::is_whitespace).ok_or_else(|| {
            named("expected \"TIMEFRAME RATE\" such as \"mon..fri 8:00-18:00 20M\" (a rate alone is --bwlimit)".into())
        })?;
        let rate = Rate::parse(rate).map_err(named)?;
        let timeframe = Timeframe::parse(tf).map_err(named)?;
        Ok(Rule { text: t.to_string(), timeframe, rate })
    }
}

/// `--bwlimit` and the `--bwlimit-rule`s, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schedule {
    /// The rate when no rule matches.
    pub default: Rate,
    /// Rules, first match wins.
    pub rules: Vec<Rule>,
}

impl Schedule {
    /// Parse the flags' values; an error names the bad value.
    pub fn parse(bwlimit: Option<&str>, rules: &[String]) -> Result<Schedule, String> {
        let default = match bwlimit {
            Some(r) => Rate::parse(r).map_err(|e| format!("--bwlimit: {e}"))?,
            None => Rate::UNLIMITED,
        };
        let rules = rules.iter().map(|r| Rule::parse(r)).collect::<Result<_, _>>()?;
        Ok(Schedule { default, rules })
    }

    /// True when nothing is ever limited.
    pub fn is_unlimited(&self) -> bool {
        self.default == Rate::UNLIMITED && self.rules.iter().all(|r| r.rate == Rate::UNLIMITED)
    }

    /// The rate in force at `t`, and the index of the rule that gives it (None: `--bwlimit`).
    pub fn rate_at(&self, t: LocalTime) -> (Rate, Option<usize>) {
        match self.rules.iter().position(|r| r.timeframe.contains(t)) {
            Some(i) => (self.rules[i].rate, Some(i)),
            None => (self.default, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: &str, hm: &str) -> LocalTime {
        LocalTime::parse(&format!("{day} {hm}")).unwrap()
    }

    #[test]
    fn rates_and_units() {
        let ok = |s: &str| Rate::parse(s).unwrap().0;
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("1"), 1);
        assert_eq!(ok("20M"), 20_000_000);
        assert_eq!(ok("20MB"), 20_000_000);
        assert_eq!(ok("20MB/s"), 20_000_000);
        assert_eq!(ok("20MiB"), 20 << 20);
        assert_eq!(ok("1.5M"), 1_500_000);
        assert_eq!(ok("512KiB"), 512 << 10);
        assert_eq!(ok("100k"), 100_000);
        assert_eq!(ok("1G"), 1_000_000_000);
        assert_eq!(ok("0.5KiB"), 512);
        assert_eq!(ok("2T"), 2_000_000_000_000);
        for bad in [
            "",
            "M",
            "20X",
            "20 Mbit",
            "-5M",
            "1.2.3M",
            ".5M",
            "5.M",
            "99999999999999999999",
            "20000000T",
            "0.1",
            "20m",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(Rate(20_000_000).to_string(), "20 MB/s");
        assert_eq!(Rate(0).to_string(), "unlimited");
    }

    #[test]
    fn timeframes() {
        let tf = Timeframe::parse("mon..fri 8:00-18:00").unwrap();
        assert!(tf.contains(at("mon", "8:00")));
        assert!(tf.contains(at("fri", "17:59:59")));
        assert!(!tf.contains(at("fri", "18:00")));
        assert!(!tf.contains(at("wed", "7:59:59")));
        assert!(!tf.contains(at("sat", "12:00")));
        let wk = Timeframe::parse("sat,sun").unwrap();
        assert!(
            wk.contains(at("sun", "0:00")) && wk.contains(at("sat", "23:59:59")) && !wk.contains(at("mon", "0:00"))
        );
        let daily = Timeframe::parse("8:00-12:00,13:00-17:30").unwrap();
        for d in ["mon", "thu", "sun"] {
            assert!(daily.contains(at(d, "8:00")) && daily.contains(at(d, "17:29")));
            assert!(!daily.contains(at(d, "12:30")) && !daily.contains(at(d, "17:30")));
        }
        let wrap = Timeframe::parse("fri..mon 22:00-24:00,0:00-6").unwrap();
        assert!(wrap.contains(at("sat", "23:59:59")) && wrap.contains(at("mon", "5:59")));
        assert!(!wrap.contains(at("tue", "23:00")) && !wrap.contains(at("sun", "12:00")));
        let mixed = Timeframe::parse("Monday,wed..thu 9-17").unwrap();
        assert!(
            mixed.contains(at("mon", "9:00"))
                && mixed.contains(at("thu", "16:59"))
                && !mixed.contains(at("tue", "10:00"))
        );
        for bad in [
            "",
            "mon..fri 8:00-18:00 extra",
            "funday",
            "mon..",
            "mon,,tue",
            "8:00",
            "18:00-8:00",
            "8:00-8:00",
            "8:60-9:00",
            "25:00-26:00",
            "8:0-9:00",
            "mon 8:00-24:01",
            "24:00-24:00",
        ] {
            assert!(Timeframe::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn first_matching_rule_wins_else_the_default() {
        let rules = ["mon..fri 8:00-18:00 10M", "mon 1M", "sat,sun 0"].map(String::from);
        let s = Schedule::parse(Some("50M"), &rules).unwrap();
        assert_eq!(s.rate_at(at("mon", "9:00")), (Rate(10_000_000), Some(0)));
        assert_eq!(s.rate_at(at("mon", "19:00")), (Rate(1_000_000), Some(1)));
        assert_eq!(s.rate_at(at("tue", "19:00")), (Rate(50_000_000), None));
        assert_eq!(s.rate_at(at("sun", "9:00")), (Rate::UNLIMITED, Some(2)));
        assert!(!s.is_unlimited());
        assert!(Schedule::parse(None, &[]).unwrap().is_unlimited());
    }

    #[test]
    fn errors_name_the_rule() {
        let e = Schedule::parse(None, &["mon..fri 8:00-18:00 20M".into(), "mon..frx 8:00-9:00 1M".into()]).unwrap_err();
        assert!(e.starts_with("bad --bwlimit-rule \"mon..frx 8:00-9:00 1M\": bad days \"mon..frx\""), "{e}");
        let e = Rule::parse("20M").unwrap_err();
        assert!(e.contains("\"20M\"") && e.contains("a rate alone is --bwlimit"), "{e}");
        let e = Rule::parse("mon 8:00-9:00 fast").unwrap_err();
        assert!(e.contains("bad rate \"fast\""), "{e}");
        let e = Schedule::parse(Some("20Q"), &[]).unwrap_err();
        assert!(e.starts_with("--bwlimit: bad rate \"20Q\""), "{e}");
    }

    #[test]
    fn local_times() {
        assert_eq!(
            LocalTime::parse("mon 17:59:58").unwrap(),
            LocalTime { weekday: 0, second: 17 * 3600 + 59 * 60 + 58 }
        );
        assert_eq!(at("sun", "23:59:59").plus_secs(2), at("mon", "0:00:01"));
        assert!(LocalTime::parse("mon 24:00").is_err() && LocalTime::parse("xyz 1:00").is_err());
    }
}
