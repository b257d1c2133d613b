//! Intent frames: a cbt disk's plan, announced to the target ahead of its data.

use std::ops::Range;

use ferry_wire::{ChunkRun, Intent};

use super::read::RangeCursor;

/// Planned chunks a cbt disk announces to the target (Intent frames) a window ahead of
/// its data, so the target saves their old contents to its undo file before the data
/// comes (DATASTORE.md): the undo fdatasyncs then cover hundreds of records each
/// instead of the few chunks that arrived during the previous one.
pub(super) const INTENT_WINDOW: u64 = 8192;

/// Announces a disk's planned chunks (its [`JobDisk::ranges`](super::job::JobDisk::ranges)), [`INTENT_WINDOW`] at a
/// time, topped up when the sender has passed half of what was announced.
#[derive(Default)]
pub(super) struct Announcer {
    /// Next chunk to announce.
    cursor: RangeCursor,
    /// Chunks announced, and planned chunks the sender has passed (sent or not).
    announced: u64,
    passed: u64,
}

impl Announcer {
    /// The next window of `disk`'s planned chunks `ranges`, if any are left.
    pub(super) fn next_window(&mut self, disk: u32, ranges: &[Range<u64>]) -> Option<Intent> {
        let mut runs = Vec::new();
        let mut n = 0;
        while n < INTENT_WINDOW {
            let Some(r) = self.cursor.take(ranges, INTENT_WINDOW - n) else { break };
            runs.push(ChunkRun { first_chunk: r.start, count: (r.end - r.start) as u32 });
            n += r.end - r.start;
        }
        self.announced += n;
        (!runs.is_empty()).then_some(Intent { disk, runs })
    }

    /// The sender passed `count` planned chunks of `disk`: the windows that are due.
    pub(super) fn passed_many(&mut self, disk: u32, ranges: &[Range<u64>], count: u64) -> Vec<Intent> {
        self.passed += count;
        let mut due = Vec::new();
        while self.announced < self.passed + INTENT_WINDOW / 2 {
            match self.next_window(disk, ranges) {
                Some(i) => due.push(i),
                None => break,
            }
        }
        due
    }
}
