//! A hidden knob for ferry's power-loss tests, never for production: it
//! removes one fdatasync so that the tests can show they catch its absence
//! (tests/e2e/power.rs). Not shown in `--help` or the README's usage.
//!
//! `FERRY_TEST_SKIP_FSYNC=undo`: the undo records of a session are not
//! fdatasynced before the chunks they protect are overwritten (the writer's
//! sync rounds and [`crate::undo::UndoWriter::sync`] report them durable
//! without the call). A power cut after a checkpoint then leaves overwritten
//! chunks whose old contents are lost: an older point no longer exports as it
//! was.
//!
//! `FERRY_TEST_SKIP_FSYNC=image`: a file image is never fdatasynced
//! ([`crate::image::ReplicaImage::sync`]: at checkpoints, the commit and
//! rollbacks). A checkpoint then records chunks as durable that a power cut
//! takes back, and a resumed session skips them.
//!
//! `FERRY_TEST_SKIP_FSYNC=map`: a digest map's temporary file is renamed into
//! place without its fsync ([`crate::digests::store`]). A power cut after the
//! rename's directory fsync then leaves a `DISK.digests` whose bytes never
//! reached the disk: a map that does not check out (the target rebuilds it,
//! but the power-loss tests check every map after a cut and find it).
//!
//! Any of them may be given (`undo,image`). The variable is read once per process;
//! any other value does nothing.

use std::sync::OnceLock;

/// Name of the environment variable.
pub const SKIP_FSYNC_VAR: &str = "FERRY_TEST_SKIP_FSYNC";

/// True when [`SKIP_FSYNC_VAR`] names `what` (comma-separated list).
pub fn skip_fsync(what: &str) -> bool {
    static VALUE: OnceLock<Option<String>> = OnceLock::new();
    VALUE
        .get_or_init(|| std::env::var(SKIP_FSYNC_VAR).ok())
        .as_deref()
        .is_some_and(|v| v.split(',').any(|w| w.trim() == what))
}
