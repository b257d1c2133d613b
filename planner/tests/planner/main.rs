//! The integration tests of ferry-planner (one binary).

mod algebra;
mod cbt;
mod corpus;
mod digest_map;
mod plan;
