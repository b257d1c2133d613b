//! ferry-backup: replica from backup.
//!
//! Lists the restore points of backup repositories (ferry datastores, qcow2
//! chain directories with manifests; formats in docs/BACKUP.md), turns a
//! point into disks the source pipeline can read ([`repo`]), and replicates
//! the points a replica does not have yet, oldest first, each with its
//! backup's point time.
//!
//! # Dependencies
//! ferry-planner (manifests, ancestry, change maps), ferry-datastore (ferry
//! repositories), ferry-replicate (the replication itself). It knows nothing
//! of the wire protocol or of IO backends, and has no `unsafe`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod job;
pub mod repo;

pub use error::{BackupError, Result};
