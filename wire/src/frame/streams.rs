//! Frames of a session striped over several connections (feature
//! `FEATURE_STREAMS`): OpenStreams / StreamTicket on the first connection
//! (0x14, 0x15), Join / Joined on each further one (0x05, 0x06), and Seq
//! (0x35), the session-wide sequence number of the frame that follows it on
//! whichever connection carries it. PROTOCOL.md section 11.

/// Most connections one session may use (the first one included).
pub const MAX_STREAMS: u16 = 16;

/// Source, on the session's first connection: stripe the rest of this replica
/// session over `count` connections in all (2 ..= [`MAX_STREAMS`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenStreams {
    /// Connections wanted, the first one included.
    pub count: u16,
}

/// Target: the ticket further connections join the session with, and how many
/// connections the session may use in all (1 ..= the count asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTicket {
    /// Unguessable, issued for this session and the token that opened it.
    pub ticket: [u8; 32],
    /// Connections granted in all, the first one included.
    pub count: u16,
}

/// Source, on a further connection right after authentication: join the
/// session that issued `ticket` as stream `stream` (1 .. count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The ticket of the session's StreamTicket.
    pub ticket: [u8; 32],
    /// This connection's stream number.
    pub stream: u16,
}

/// Target: the connection joined the session as stream `stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The stream number, echoed.
    pub stream: u16,
}

/// Source: the next frame on this connection is frame number `seq` of the
/// striped session (numbered from 0 after StreamTicket, every connection
/// counting in one sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seq {
    /// The following frame's number.
    pub seq: u64,
}

/// Body length of a Seq frame; with the header a Seq costs 20 bytes per frame.
pub const SEQ_BODY_LEN: usize = 8;
