//! ferry's end-to-end tests: one binary, one module per area.

mod access;
mod backup;
mod busy;
mod bwlimit;
mod datapath;
mod exit_codes;
mod faults;
mod incremental;
mod map_cache;
mod nbd;
mod nbd_target;
mod plan;
mod points;
mod power;
mod server_bounds;
mod streams;
mod thin;
mod tls;
mod zstream;
