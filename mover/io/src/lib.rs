//! ferry-io: the IO primitives of the mover crates.
//!
//! - [`buf`]: fixed pools of aligned buffers ([`BufPool`], [`PoolBuf`]) that bound
//!   memory whatever the disk size, and the zero check.
//! - [`backend`]: io_uring and a portable pread/pwrite fallback behind
//!   [`IoBackend`], chosen at run time by probing ([`open_backend`]).
//! - [`sys`]: every other raw system call on files and sockets, behind safe
//!   functions (page-cache advice, hole walks, locks, vectored reads, poll,
//!   pipes and splice, ...).
//! - [`process`]: the process system calls (child state without reaping,
//!   signals to a process or its group, wait4 with resource usage, effective
//!   uid/gid, entering a network namespace), for the bench harness and tools.
//! - [`tun`]: TUN devices, a nanosecond `ppoll` and `TCP_WINDOW_CLAMP`, for the
//!   bench's emulated WAN link (a packet-level delay line between two namespaces).
//! - [`ErrorClass`] and [`error_chain`]: what every mover crate's errors share
//!   (the class that decides the exit code; an error printed with its causes).
//!
//! # Invariants
//! - This is the only crate of the workspace's libraries with `unsafe` code;
//!   every `unsafe` block carries a `// SAFETY:` note naming its invariant.
//! - A buffer moves into an IO operation and comes back with its completion:
//!   nothing can touch a buffer the kernel may still write into.
//! - It knows nothing of disks, replicas, protocols or peers: it must not
//!   depend on any other ferry crate.

pub mod backend;
pub mod buf;
pub mod process;
pub mod sys;
pub mod tun;

pub use backend::{open_backend, BackendChoice, IoBackend, IoCompletion, IoKind, IoRequest};
pub use buf::{is_zero, BufPool, PoolBuf, ALIGN};

/// How an error should be handled by whoever runs the job (a scheduler reads
/// it from the exit code). Every library error type of the mover crates has a
/// `class()`; the CLI maps classes to exit codes and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The run failed; a retry may help (IO error, peer gone, protocol
    /// violation by the peer, disk changed during the run). Exit 1.
    Failed,
    /// Usage or configuration: a retry will not help until someone changes
    /// something (bad flags, bad change list, wrong token, unknown replica). Exit 2.
    Usage,
    /// Another session holds the replica: try later. Exit 4.
    Busy,
}

/// An error with its whole chain of causes, `: `-separated, as `{:#}` of
/// anyhow prints it: for messages to peers, reports and logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
