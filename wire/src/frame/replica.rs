//! Replica and disk frames (types `0x10..`): open a replica session, open its
//! disks, learn what the target already holds.

/// How a disk's changes are found; tells the target what to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Mode {
    /// Every chunk is sent (zero chunks as zero runs).
    Full = 0,
    /// Only chunks from a changed-block-tracking list.
    Cbt = 1,
    /// Only chunks whose digest differs from the target's digest map.
    Digest = 2,
    /// The target holds a seed copy: it rebuilds digests from it, then digest mode.
    Seed = 3,
}

/// Open (or create) a replica and start a session on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReplica {
    /// Replica name.
    pub replica: String,
    /// Point time of the restore point this session makes, ns since the Unix epoch.
    pub point_time_ns: i64,
    /// The client's session id: the same id again asks to resume.
    pub session_id: [u8; 16],
    /// Restore points to keep (0: keep the replica's setting).
    pub retain: u32,
    /// Flags: [`OpenReplica::PLAN_ONLY`]; other bits must be zero.
    pub flags: u8,
}

impl OpenReplica {
    /// Flag: plan only. The target changes nothing (no lock taken for
    /// writing, no file created or resized) and answers ResumeInfo and digest
    /// maps as they are; Data, ZeroRun, Flush, Intent and Commit are illegal.
    pub const PLAN_ONLY: u8 = 0x01;
}

/// The replica is open and locked for this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOpened {
    /// Session id in force (the client's, or the interrupted one being resumed).
    pub session_id: [u8; 16],
    /// True when an interrupted session is being resumed.
    pub resumed: bool,
    /// Id of the replica's latest restore point (0: none yet).
    pub latest_point: u64,
    /// Point time of the latest restore point (ns), 0 when none.
    pub latest_point_time_ns: i64,
    /// Chunk size of the replica (0: new replica, the client's choice applies).
    pub chunk_size: u32,
    /// Point time (ns) the interrupted session was opened with, when `resumed`
    /// (plan only: when one is pending); 0 otherwise. A client that must not mix
    /// two points (replica from backup) checks it before it resumes.
    pub pending_point_time_ns: i64,
}

/// Open a disk of the open replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenDisk {
    /// Disk id within this session, chosen by the client.
    pub disk: u32,
    /// Disk name (file name in the datastore).
    pub name: String,
    /// Source disk size in bytes.
    pub size: u64,
    /// Chunk size (power of two, 64 KiB..=4 MiB).
    pub chunk_size: u32,
    /// How changes are found.
    pub mode: Mode,
}

/// The target's answer to OpenDisk: what it already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeInfo {
    /// Disk id.
    pub disk: u32,
    /// Size of the disk at the target before this session (0 for a new disk).
    pub previous_size: u64,
    /// First chunk not yet durable in this session: the client resumes here (0: from the start).
    pub next_chunk: u64,
    /// Flags: bit 0 the disk existed at the target; bit 1 this session already finished the disk.
    pub flags: u8,
}

impl ResumeInfo {
    /// Flag: the disk existed at the target before.
    pub const EXISTED: u8 = 0x01;
    /// Flag: the disk was already finished in this (resumed) session.
    pub const FINISHED: u8 = 0x02;
}
