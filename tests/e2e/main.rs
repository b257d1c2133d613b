//! ferry's end-to-end tests: one binary, one module per area.

mod datapath;
mod faults;
