//! The sending thread: the one thread that writes to a target connection's socket.
//!
//! Everyone else hands it [`Outgoing`] events over a bounded channel: the
//! session thread its answers (ReplicaOpened, ResumeInfo, digest maps,
//! Committed) and its final error, the writer its durable checkpoints, the
//! digest maps it answers and its failure. The channel keeps each producer's
//! order, and an event sent before another producer sends its own goes out
//! first: the Checkpoints the writer sent before it answered the Commit go
//! out before the Committed the session thread sends once it has the answer.

use std::sync::{Arc, Mutex};

use crossbeam_channel::Receiver;
use ferry_wire::{Checkpoint, ErrorCode, Frame};

use crate::conn::Conn;
use crate::error::MoveError;

/// Events in flight to the sending thread, at most: a digest map of up to 64 MiB goes as
/// parts of 512 KiB, and this bounds how many wait in memory.
pub(super) const OUTGOING_MAX: usize = 8;

/// What the sending thread is asked to do.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// Send a frame of the session thread's (or a digest map part or end of the writer's).
    /// A frame that cannot be sent fails the session: the error is recorded and the
    /// socket shut down, which ends the session thread's read.
    Frame(Frame),
    /// The image of `disk` is durable up to `next_chunk`, and so are its digest map and
    /// session.json: tell the source (a Checkpoint that cannot be sent is dropped).
    Checkpoint {
        /// The disk.
        disk: u32,
        /// Every chunk below this one is durable.
        next_chunk: u64,
    },
    /// The writer failed (it recorded its typed error for the session first): an Error
    /// frame, then the socket shut down so that the session thread's blocking read ends.
    WriterFailed {
        /// The error's code.
        code: ErrorCode,
        /// The error's message (with its causes).
        message: String,
    },
    /// The session ends with an error: tell the peer (best effort).
    Error(ErrorCode, String),
    /// The session's token was revoked (the typed error is recorded for the session first):
    /// a NotAllowed Error frame, then the socket shut down, as for a writer failure.
    Revoked(String),
}

/// Send every event until all the producers are gone. A frame that could not be sent is
/// recorded in `failed` (unless the writer's failure is there already) before the socket is
/// shut down: the session thread, woken by the shutdown, finds it there.
pub(super) fn run_sender(conn: Arc<Conn>, events: Receiver<Outgoing>, failed: Arc<Mutex<Option<MoveError>>>) {
    // The writer's error (recorded by the writer) is the cause of whatever else went wrong.
    let record = |e: MoveError| {
        failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
    };
    // Answers the session queued while validating what it received (an Error for a refused
    // frame) go out before anything sent after them.
    let flush = |conn: &Conn| {
        let _ = conn.flush_answers();
    };
    let mut broken = false;
    for event in events {
        flush(&conn);
        match event {
            Outgoing::Frame(f) => {
                if broken {
                    continue;
                }
                if let Err(e) = conn.send(&f) {
                    broken = true;
                    record(e);
                    conn.shutdown();
                }
            }
            Outgoing::Checkpoint { disk, next_chunk } => {
                // Durable whether or not the source hears of it (the connection may be closing).
                if !broken {
                    let _ = conn.send(&Frame::Checkpoint(Checkpoint { disk, next_chunk }));
                }
            }
            Outgoing::WriterFailed { code, message } => {
                conn.send_error(code, &message);
                conn.shutdown();
                broken = true;
            }
            Outgoing::Revoked(message) => {
                conn.send_error(ErrorCode::NotAllowed, &message);
                conn.shutdown();
                broken = true;
            }
            Outgoing::Error(code, message) => {
                conn.send_error(code, &message);
                flush(&conn);
            }
        }
    }
    flush(&conn);
}
