//! ferry-bench (placeholder).
