//! ferry-mover (placeholder).
