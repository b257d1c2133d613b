//! ferry-planner (placeholder, see issue 5).
#![forbid(unsafe_code)]
