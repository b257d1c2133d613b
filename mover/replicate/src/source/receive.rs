//! The receiver thread: what the target says while the source sends
//! (checkpoints are consumed by the connection; Committed and errors are
//! handed to the job).

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use ferry_wire::{Event, Frame};

use crate::conn::{Conn, Rx, KEEPALIVE_INTERVAL};
use crate::error::MoveError;

pub(super) enum RxMsg {
    Committed { point_id: u64, point_time_ns: i64 },
    Failed(MoveError),
}

/// Reads until Committed or a failure. While it waits it also keeps the session alive: a
/// source busy hashing chunks that all match the target's sends nothing for long stretches,
/// so every [`KEEPALIVE_INTERVAL`] of quiet it sends a Keepalive frame (the target ends a
/// session it hears nothing from for its idle timeout).
pub(super) fn receive_loop(conn: &Conn, rx: &mut Rx, out: &Sender<RxMsg>) {
    rx.set_timeout(Some(KEEPALIVE_INTERVAL));
    loop {
        let msg = match rx.next_frame() {
            Err(e) if e.is_read_timeout() => match conn.keepalive_if_quiet(KEEPALIVE_INTERVAL) {
                Ok(()) => continue,
                Err(e) => RxMsg::Failed(e.peer_gone_if_reset("target")),
            },
            Ok(None) => RxMsg::Failed(MoveError::PeerGone { peer: conn.peer().into(), side: "target" }),
            Err(e) => RxMsg::Failed(e.peer_gone_if_reset("target")),
            Ok(Some(f)) => match conn.handle(f) {
                Err(e) => RxMsg::Failed(e),
                Ok(Some(Event::Frame(Frame::Committed(c)))) => {
                    let _ = out.send(RxMsg::Committed { point_id: c.point_id, point_time_ns: c.point_time_ns });
                    return;
                }
                Ok(_) => continue,
            },
        };
        let failed = matches!(msg, RxMsg::Failed(_));
        if out.send(msg).is_err() || failed {
            return;
        }
    }
}

/// When a send fails because the target went away or closed the session,
/// its own Error frame (if the receiver got one) says more than the broken
/// pipe or "session closed".
pub(super) fn prefer_target_error(rx_msgs: &Receiver<RxMsg>, e: MoveError) -> MoveError {
    match rx_msgs.recv_timeout(Duration::from_millis(500)) {
        Ok(RxMsg::Failed(t)) => t.peer_gone_if_reset("target"),
        _ => e.peer_gone_if_reset("target"),
    }
}
