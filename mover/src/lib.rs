//! ferry-mover (placeholder).
pub mod nbd;
