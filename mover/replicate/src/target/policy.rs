//! What a session's token may do, and the target's retention policy.
//!
//! Roles and scope (see `crate::access`): every replica session needs the
//! token's replica glob to match the replica; a session that writes needs
//! role `replicate` or `admin`; a plan-only session any role. A refusal is a
//! `NotAllowed` error naming the token and the replica.
//!
//! Retention belongs to the target. What a source asks (`OpenReplica.retain`,
//! 0 for "as it is") is bound by the token's role and by the server's
//! [`Protection`] (`ferry serve --keep-min N --immutable DURATION`):
//!
//! | request | replicate token | admin token |
//! |---|---|---|
//! | 0 (as it is) | unchanged | unchanged |
//! | more than the setting, or a new replica | set | set |
//! | less than the setting | refused, the setting stays (warning) | set, but never below N (warning when it was) |
//!
//! A new replica (or any setting) never goes below N. At the commit, the
//! oldest points go beyond `max(setting, N)`, and only those the target
//! completed at least DURATION ago (`points::prune_protected`). When the
//! policy keeps points a request would have dropped, the source hears it in a
//! Notice: a warning (the source exits 3) when this session asked for a
//! retention, for information otherwise (a replica whose points are all
//! young is no news on every run).

use ferry_datastore::points::{Protection, PruneOutcome};
use ferry_wire::{Notice, NoticeLevel};

use crate::access::{AccessRole, Grant};
use crate::error::{MoveError, Result};

/// Refuse a replica session that `grant` does not allow: outside its replicas, or a write
/// by a read token.
pub(super) fn check_open(grant: &Grant, replica: &str, writes: bool) -> Result<()> {
    if !grant.matches(replica) {
        return Err(MoveError::NotAllowed(format!(
            "{} may not open replica {replica:?}: it matches only replicas {:?}",
            grant.describe(),
            grant.replicas
        )));
    }
    if writes && !grant.role.may_write() {
        return Err(MoveError::NotAllowed(format!(
            "{} may not write replica {replica:?}: a read token may plan and read, not replicate \
             (give the source a replicate token)",
            grant.describe()
        )));
    }
    Ok(())
}

/// The retention a replica gets when a session with `role` asks for `asked` points (0: as
/// it is), the setting being `current` (`None`: a new replica, which starts at `default`);
/// and a warning when the answer is not what was asked.
pub(super) fn decide_retain(
    replica: &str,
    grant: &Grant,
    asked: u32,
    current: Option<u32>,
    default: u32,
    keep_min: u32,
) -> (u32, Option<String>) {
    let setting = current.unwrap_or(default);
    if asked == 0 {
        return (setting.max(keep_min), None);
    }
    if current.is_some_and(|c| asked < c) && grant.role != AccessRole::Admin {
        return (
            setting.max(keep_min),
            Some(format!(
                "replica {replica:?} keeps {setting} restore points: {} may not lower its retention to {asked} \
                 (an admin token may)",
                grant.describe()
            )),
        );
    }
    if asked < keep_min {
        return (
            keep_min,
            Some(format!(
                "replica {replica:?} keeps {keep_min} restore points, not the {asked} asked: the target keeps at \
                 least {keep_min} (ferry serve --keep-min)"
            )),
        );
    }
    (asked, None)
}

/// The Notice for what a prune kept that the retention would have dropped, if anything.
pub(super) fn prune_notice(
    replica: &str,
    retain: u32,
    asked: bool,
    p: &Protection,
    out: &PruneOutcome,
) -> Option<Notice> {
    let mut parts = Vec::new();
    if !out.kept_by_keep_min.is_empty() {
        parts.push(format!(
            "restore point(s) {} because the target keeps at least {} (ferry serve --keep-min)",
            ids(&out.kept_by_keep_min),
            p.keep_min
        ));
    }
    if !out.kept_by_immutable.is_empty() {
        parts.push(format!(
            "restore point(s) {} because they are younger than the target's immutable period of {} \
             (ferry serve --immutable): no remote client can remove them",
            ids(&out.kept_by_immutable),
            format_duration_ns(p.immutable_ns)
        ));
    }
    if parts.is_empty() {
        return None;
    }
    Some(Notice {
        level: if asked { NoticeLevel::Warning } else { NoticeLevel::Info },
        message: format!("replica {replica:?}: retention {retain} would drop them, but kept {}", parts.join("; and ")),
    })
}

fn ids(v: &[u64]) -> String {
    v.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// A duration as the CLI takes it: 90s, 30m, 2h, 7d.
pub(crate) fn format_duration_ns(ns: i64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        s if s > 0 && s % 86400 == 0 => format!("{}d", s / 86400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenAuth;

    fn grant(role: AccessRole) -> Grant {
        Grant::new("t1", role, "web*", &TokenAuth::new(b"0123456789abcdef")).unwrap()
    }

    #[test]
    fn retention_requests_by_role_and_policy() {
        let (rep, adm) = (grant(AccessRole::Replicate), grant(AccessRole::Admin));
        // (grant, asked, current, keep_min) -> retention, warned
        let cases = [
            (&rep, 0, Some(5), 1, 5, false),
            (&rep, 0, Some(2), 3, 3, false),
            (&rep, 9, Some(5), 1, 9, false),
            (&rep, 2, Some(5), 1, 5, true),
            (&rep, 2, None, 1, 2, false),
            (&rep, 1, None, 3, 3, true),
            (&adm, 2, Some(5), 1, 2, false),
            (&adm, 1, Some(5), 3, 3, true),
            (&adm, 0, None, 3, 7, false),
        ];
        for (g, asked, current, keep_min, want, warned) in cases {
            let (r, w) = decide_retain("web1", g, asked, current, 7, keep_min);
            assert_eq!(
                (r, w.is_some()),
                (want, warned),
                "{:?} asked {asked} current {current:?} keep_min {keep_min}",
                g.role
            );
        }
        let (_, w) = decide_retain("web1", &rep, 2, Some(5), 7, 1);
        assert_eq!(
            w.unwrap(),
            "replica \"web1\" keeps 5 restore points: token \"t1\" (role replicate, replicas \"web*\") may not lower \
             its retention to 2 (an admin token may)"
        );
    }

    #[test]
    fn scope_and_role() {
        let rep = grant(AccessRole::Replicate);
        check_open(&rep, "web1", true).unwrap();
        let e = check_open(&rep, "db1", true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "token \"t1\" (role replicate, replicas \"web*\") may not open replica \"db1\": it matches only replicas \"web*\""
        );
        let read = grant(AccessRole::Read);
        check_open(&read, "web1", false).unwrap();
        assert!(check_open(&read, "web1", true).unwrap_err().to_string().contains("a read token may plan and read"));
    }
}
