//! RFC 3339 times: the planner's (`ferry_planner::time`), shared with the backup manifests.

pub use ferry_planner::time::{format_rfc3339, parse_rfc3339};
