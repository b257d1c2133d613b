//! RFC 3339 times without a date library: parse and format UTC.

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Parse `YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)` into ns since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time (for example 2026-11-22T03:00:00Z)");
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        s.get(r).filter(|x| x.bytes().all(|c| c.is_ascii_digit())).and_then(|x| x.parse().ok()).ok_or_else(bad)
    };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let st = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &s[st..i];
        if frac.is_empty() {
            return Err(bad());
        }
        let mut digits: String = frac.chars().take(9).collect();
        while digits.len() < 9 {
            digits.push('0');
        }
        nanos = digits.parse().map_err(|_| bad())?;
    }
    let offset = match &s[i..] {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && &tz[3..4] == ":" => {
            let oh: i64 = tz[1..3].parse().map_err(|_| bad())?;
            let om: i64 = tz[4..6].parse().map_err(|_| bad())?;
            let o = oh * 3600 + om * 60;
            if tz.starts_with('-') {
                -o
            } else {
                o
            }
        }
        _ => return Err(bad()),
    };
    let secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset;
    secs.checked_mul(1_000_000_000).and_then(|x| x.checked_add(nanos)).ok_or_else(bad)
}

/// Format ns since the epoch as RFC 3339 UTC (seconds, or with fraction when present).
pub fn format_rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let frac = ns.rem_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    let base = format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60);
    if frac == 0 {
        format!("{base}Z")
    } else {
        let mut f = format!("{frac:09}");
        while f.ends_with('0') {
            f.pop();
        }
        format!("{base}.{f}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse_rfc3339("2026-11-22T03:00:00Z").unwrap(), 1_795_316_400 * 1_000_000_000);
        assert_eq!(parse_rfc3339("2026-11-22T04:00:00+01:00").unwrap(), parse_rfc3339("2026-11-22T03:00:00Z").unwrap());
        assert_eq!(parse_rfc3339("2000-02-29T12:34:56.5Z").unwrap() % 1_000_000_000, 500_000_000);
        for t in
            ["2026-11-22T03:00:00Z", "1999-12-31T23:59:59Z", "2000-02-29T12:34:56.5Z", "2026-01-05T00:00:00.000001Z"]
        {
            assert_eq!(format_rfc3339(parse_rfc3339(t).unwrap()), t);
        }
        for bad in ["", "2026-11-22", "2026-13-01T00:00:00Z", "2026-11-22T03:00:00", "yesterday"] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
