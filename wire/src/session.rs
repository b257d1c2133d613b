//! Session state machines for both ends, sans-IO.
//!
//! A [`Session`] takes bytes in ([`Session::buffer_mut`] or
//! [`Session::receive`]), hands decoded and validated frames out as
//! [`Event`]s ([`Session::poll_event`]), and queues the bytes to send
//! ([`Session::send`], [`Session::take_transmit`]). It answers the handshake
//! and the authentication itself; everything after is the application's.
//!
//! Every frame, sent or received, is checked against the state: an illegal
//! frame is a typed [`WireError`], never a panic. On a local error the session
//! queues an Error frame for the peer and closes.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::chunk::{chunk_count, validate_chunk_size, MAX_CHUNK_SIZE};
use crate::error::WireError;
use crate::frame::*;

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The source: connects, authenticates, sends data.
    Client,
    /// The target: listens, verifies, writes.
    Server,
}

/// Computes authentication proofs from one or more keys.
///
/// The wire crate computes no MACs itself: the caller supplies this (ferry
/// uses a keyed BLAKE3 over a label, the channel binding and both nonces).
/// `role` tells whose proof is asked for, so the client's proof can never be
/// replayed as the server's. `binding` is the channel binding the session was
/// made with (a TLS exporter value; zeros where there is no TLS), so a proof
/// relayed into another TLS session does not check out there.
///
/// A client holds one key (its token). A server may accept several (one per
/// token in its access file): it finds which key made the client's proof by
/// comparing the proof of every key in constant time, without stopping at a
/// match (the time taken does not say which key, or whether any, matched),
/// answers with that key's server proof, and reports the key's index as
/// [`PeerInfo::key`], so the application can tell which token the peer holds.
pub trait Authenticator: Send + Sync {
    /// How many keys this end holds (at least 1 to authenticate anyone). A client uses key 0.
    fn key_count(&self) -> usize {
        1
    }

    /// The proof that `role` holds key `key` (`0..key_count()`), for this channel and pair of nonces.
    fn proof(
        &self,
        key: usize,
        role: Role,
        binding: &[u8; 32],
        client_nonce: &[u8; 32],
        server_nonce: &[u8; 32],
    ) -> [u8; 32];
}

/// What one end says about itself in the handshake.
#[derive(Debug, Clone)]
pub struct LocalInfo {
    /// Peer name sent to the other end.
    pub name: String,
    /// Software version string.
    pub software: String,
    /// Fresh random nonce for this connection (the caller draws it; no RNG here).
    pub nonce: [u8; 32],
    /// Features offered.
    pub features: u64,
}

/// What the session learned about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Peer's name.
    pub name: String,
    /// Peer's software version.
    pub software: String,
    /// Protocol version in force.
    pub version: u16,
    /// Features both ends support.
    pub features: u64,
    /// Which key of this end's [`Authenticator`] the peer proved it holds: on a
    /// server, the index of the client's token among its keys; on a client, 0.
    pub key: usize,
}

/// What [`Session::poll_event`] hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake and authentication are complete.
    Authenticated(PeerInfo),
    /// An application frame, validated against the session state.
    Frame(Frame),
}

/// Session states (both roles; some are only reached by one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Server: waiting for Hello.
    AwaitHello,
    /// Client: Hello sent, waiting for Welcome.
    AwaitWelcome,
    /// Server: Welcome sent, waiting for the client's proof.
    AwaitAuthProof,
    /// Client: proof sent, waiting for AuthOk.
    AwaitAuthOk,
    /// Authenticated, no replica open.
    Ready,
    /// OpenReplica sent or received, ReplicaOpened not yet.
    OpeningReplica,
    /// A replica is open: disks, data, checkpoints.
    ReplicaOpen,
    /// Commit sent or received, Committed not yet.
    Committing,
    /// Join sent or received, Joined not yet (a further connection of a striped session).
    Joining,
    /// A further connection of a striped session: it carries the session's
    /// sequenced frames, which the first connection's session validates
    /// (PROTOCOL.md section 11); its own session takes only Keepalive,
    /// Progress, Error and Close.
    Joined,
    /// Closed (Close or Error sent or received).
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitHello => "AwaitHello",
            State::AwaitWelcome => "AwaitWelcome",
            State::AwaitAuthProof => "AwaitAuthProof",
            State::AwaitAuthOk => "AwaitAuthOk",
            State::Ready => "Ready",
            State::OpeningReplica => "OpeningReplica",
            State::ReplicaOpen => "ReplicaOpen",
            State::Committing => "Committing",
            State::Joining => "Joining",
            State::Joined => "Joined",
            State::Closed => "Closed",
        }
    }
}

/// Per-disk bookkeeping shared by both ends.
#[derive(Debug, Clone)]
struct DiskTrack {
    size: u64,
    chunk_size: u32,
    chunk_count: u64,
    /// ResumeInfo seen: data may flow.
    open: bool,
    /// Lowest chunk index the next Data or ZeroRun may carry.
    next_min: u64,
    /// Highest Flush so far.
    flushed: u64,
    /// End of the last run announced by an Intent (0: none): the next
    /// Intent starts at or after it. Data does not depend on it.
    intent_end: u64,
    /// Highest durable watermark seen (ResumeInfo, then Checkpoints): never goes back.
    durable: u64,
    /// Digest map reply in progress: the next part's first chunk.
    map_next: Option<u64>,
}

impl DiskTrack {
    fn logical_len(&self, chunk: u64) -> u64 {
        let start = chunk * u64::from(self.chunk_size);
        (self.size - start).min(u64::from(self.chunk_size))
    }
}

/// Which way a frame is going, relative to this end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Send,
    Recv,
}

/// One end of a ferry session. See the module docs.
pub struct Session {
    role: Role,
    state: State,
    auth: Arc<dyn Authenticator>,
    /// The channel binding both proofs cover.
    binding: [u8; 32],
    local: LocalInfo,
    peer_nonce: [u8; 32],
    peer: Option<PeerInfo>,
    /// Set once the peer's proof checked out: `peer` is only handed out then.
    authenticated: bool,
    disks: HashMap<u32, DiskTrack>,
    /// The open replica session is plan only: no data, intent, flush or commit.
    plan_only: bool,
    /// Streams asked for (OpenStreams) and granted (StreamTicket) in the open replica session.
    streams: (u16, u16),
    deframer: Deframer,
    out: BytesMut,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("role", &self.role).field("state", &self.state).finish()
    }
}

impl Session {
    /// A client session; Hello is queued at once. `binding`: the channel
    /// binding both proofs cover (the TLS exporter value; zeros without TLS).
    pub fn client(local: LocalInfo, auth: Arc<dyn Authenticator>, binding: [u8; 32]) -> Session {
        let mut s = Session::new(Role::Client, State::AwaitWelcome, local, auth, binding);
        let hello = Frame::Hello(Hello {
            version_min: VERSION_MIN,
            version_max: VERSION_MAX,
            features: s.local.features,
            nonce: s.local.nonce,
            peer_name: truncate(&s.local.name, MAX_NAME_LEN),
            software: truncate(&s.local.software, MAX_SOFTWARE_LEN),
        });
        hello.encode(&mut s.out);
        s
    }

    /// A server session, waiting for Hello; `binding` as for [`Session::client`].
    pub fn server(local: LocalInfo, auth: Arc<dyn Authenticator>, binding: [u8; 32]) -> Session {
        Session::new(Role::Server, State::AwaitHello, local, auth, binding)
    }

    fn new(role: Role, state: State, local: LocalInfo, auth: Arc<dyn Authenticator>, binding: [u8; 32]) -> Session {
        let mut deframer = Deframer::new();
        deframer.set_max_body_len(MAX_HANDSHAKE_BODY_LEN);
        Session {
            role,
            state,
            auth,
            binding,
            local,
            peer_nonce: [0; 32],
            peer: None,
            authenticated: false,
            disks: HashMap::new(),
            plan_only: false,
            streams: (0, 0),
            deframer,
            out: BytesMut::new(),
        }
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The peer, once authenticated (`None` before, even if it already said who it claims to be).
    pub fn peer(&self) -> Option<&PeerInfo> {
        self.peer.as_ref().filter(|_| self.authenticated)
    }

    /// True once Close or Error went either way.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Append received bytes.
    pub fn receive(&mut self, data: &[u8]) {
        self.deframer.push(data);
    }

    /// The receive buffer, to read from a socket straight into it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        self.deframer.buffer_mut()
    }

    /// Bytes queued for the peer (handshake answers, sent frames, errors).
    pub fn take_transmit(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    /// Validate `frame` for sending and queue its bytes.
    pub fn send(&mut self, frame: &Frame) -> Result<(), WireError> {
        self.prepare_send(frame)?;
        frame.encode(&mut self.out);
        Ok(())
    }

    /// Validate `frame` for sending and advance the state, without encoding
    /// it: for a caller that writes a data frame's head and payload itself
    /// (vectored, without copying the payload). Anything queued by
    /// [`Session::take_transmit`] must be written before it.
    pub fn prepare_send(&mut self, frame: &Frame) -> Result<(), WireError> {
        if self.state == State::Closed {
            return Err(WireError::Closed);
        }
        check_limits(frame)?;
        self.transition(frame, Dir::Send)
    }

    /// Decode and validate the next received frame; `Ok(None)` when more bytes are needed.
    ///
    /// Handshake frames are answered here. On an error, an Error frame for the
    /// peer is queued (unless the peer sent one) and the session closes: write
    /// out [`Session::take_transmit`] before closing the socket.
    pub fn poll_event(&mut self) -> Result<Option<Event>, WireError> {
        loop {
            if self.state == State::Closed {
                return Ok(None);
            }
            let frame = match self.deframer.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.fail(e)),
            };
            match self.handle(frame) {
                Ok(Some(ev)) => return Ok(Some(ev)),
                Ok(None) => continue,
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// Validate a frame decoded by the caller's own [`Deframer`] (for a
    /// receiver thread that reads without holding the session): the same as
    /// one step of [`Session::poll_event`], including its error handling.
    /// `Ok(None)` means the frame was consumed by the session itself.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<Option<Event>, WireError> {
        if self.state == State::Closed {
            return Err(WireError::Closed);
        }
        self.handle(frame).map_err(|e| self.fail(e))
    }

    /// Validate a data frame received as its head ([`Deframer::next_split`]),
    /// its payload read by the caller: the checks and the state change that
    /// [`Session::handle_frame`] applies to the whole frame (the head carries
    /// the payload's length, checked already), with the same error handling.
    pub fn handle_data_head(&mut self, head: &DataHead) -> Result<(), WireError> {
        if self.state == State::Closed {
            return Err(WireError::Closed);
        }
        // The state machine never looks at a payload: an empty one stands in for it.
        self.transition(&Frame::Data(head.with_payload(Bytes::new())), Dir::Recv).map_err(|e| self.fail(e))
    }

    /// Close locally with an error and queue an Error frame for the peer.
    pub fn fail(&mut self, e: WireError) -> WireError {
        if self.state != State::Closed && !matches!(e, WireError::Remote { .. } | WireError::Closed) {
            let message = match &e {
                // Reveal nothing about why authentication failed.
                WireError::AuthFailed => "authentication failed".to_string(),
                other => other.to_string(),
            };
            Frame::Error(ErrorFrame { code: e.code(), message: truncate(&message, MAX_MESSAGE_LEN) })
                .encode(&mut self.out);
        }
        self.state = State::Closed;
        e
    }

    fn handle(&mut self, frame: Frame) -> Result<Option<Event>, WireError> {
        match (&frame, self.role, self.state) {
            (Frame::Unknown { .. }, _, _) => Ok(None),
            (Frame::Hello(h), Role::Server, State::AwaitHello) => {
                let version = VERSION_MAX.min(h.version_max);
                if version < VERSION_MIN.max(h.version_min) || h.version_min > h.version_max {
                    return Err(WireError::UnsupportedVersion {
                        peer_min: h.version_min,
                        peer_max: h.version_max,
                        ours_min: VERSION_MIN,
                        ours_max: VERSION_MAX,
                    });
                }
                self.peer_nonce = h.nonce;
                let features = h.features & self.local.features;
                self.peer = Some(PeerInfo {
                    name: h.peer_name.clone(),
                    software: h.software.clone(),
                    version,
                    features,
                    key: 0,
                });
                Frame::Welcome(Welcome {
                    version,
                    features,
                    nonce: self.local.nonce,
                    peer_name: truncate(&self.local.name, MAX_NAME_LEN),
                    software: truncate(&self.local.software, MAX_SOFTWARE_LEN),
                })
                .encode(&mut self.out);
                self.state = State::AwaitAuthProof;
                Ok(None)
            }
            (Frame::Welcome(w), Role::Client, State::AwaitWelcome) => {
                if !(VERSION_MIN..=VERSION_MAX).contains(&w.version) {
                    return Err(WireError::UnsupportedVersion {
                        peer_min: w.version,
                        peer_max: w.version,
                        ours_min: VERSION_MIN,
                        ours_max: VERSION_MAX,
                    });
                }
                self.peer_nonce = w.nonce;
                self.peer = Some(PeerInfo {
                    name: w.peer_name.clone(),
                    software: w.software.clone(),
                    version: w.version,
                    features: w.features & self.local.features,
                    key: 0,
                });
                let proof = self.auth.proof(0, Role::Client, &self.binding, &self.local.nonce, &w.nonce);
                Frame::AuthProof(AuthProof { proof }).encode(&mut self.out);
                self.state = State::AwaitAuthOk;
                Ok(None)
            }
            (Frame::AuthProof(p), Role::Server, State::AwaitAuthProof) => {
                // Every key is tried, a match does not end the loop: the time taken does not
                // say which key matched. Keys are distinct (the application checks), so at
                // most one matches.
                let mut matched = None;
                for key in 0..self.auth.key_count() {
                    let expected =
                        self.auth.proof(key, Role::Client, &self.binding, &self.peer_nonce, &self.local.nonce);
                    if constant_time_eq(&expected, &p.proof) {
                        matched = Some(key);
                    }
                }
                let Some(key) = matched else {
                    return Err(WireError::AuthFailed);
                };
                if let Some(peer) = &mut self.peer {
                    peer.key = key;
                }
                let proof = self.auth.proof(key, Role::Server, &self.binding, &self.peer_nonce, &self.local.nonce);
                Frame::AuthOk(AuthOk { proof }).encode(&mut self.out);
                self.state = State::Ready;
                self.authenticated = true;
                self.deframer.set_max_body_len(MAX_BODY_LEN);
                Ok(self.peer.clone().map(Event::Authenticated))
            }
            (Frame::AuthOk(a), Role::Client, State::AwaitAuthOk) => {
                let expected = self.auth.proof(0, Role::Server, &self.binding, &self.local.nonce, &self.peer_nonce);
                if !constant_time_eq(&expected, &a.proof) {
                    return Err(WireError::ServerAuthFailed);
                }
                self.state = State::Ready;
                self.authenticated = true;
                self.deframer.set_max_body_len(MAX_BODY_LEN);
                Ok(self.peer.clone().map(Event::Authenticated))
            }
            (Frame::Error(e), _, _) => {
                self.state = State::Closed;
                Err(WireError::Remote { code: e.code, message: e.message.clone() })
            }
            _ => {
                self.transition(&frame, Dir::Recv)?;
                Ok(Some(Event::Frame(frame)))
            }
        }
    }

    /// Check that `frame` may go in direction `dir` now, and apply its effect.
    ///
    /// This is the session's state machine: one match over (frame, state,
    /// direction), a row per legal transition. It is long on purpose: split
    /// into helpers, the table could no longer be read (or reviewed against
    /// PROTOCOL.md section 6, "Session state machine") in one place.
    fn transition(&mut self, frame: &Frame, dir: Dir) -> Result<(), WireError> {
        // Who sends this frame: the client (source) or the server (target).
        let from_client = (self.role == Role::Client) == (dir == Dir::Send);
        let illegal = |state: State| WireError::IllegalFrame {
            frame: frame.name(),
            direction: if dir == Dir::Send { "sent" } else { "received" },
            state: state.name(),
        };
        let authenticated =
            !matches!(self.state, State::AwaitHello | State::AwaitWelcome | State::AwaitAuthProof | State::AwaitAuthOk);
        match frame {
            Frame::Error(_) | Frame::Close => {
                self.state = State::Closed;
                Ok(())
            }
            Frame::Progress(_) | Frame::Keepalive | Frame::Unknown { .. } if authenticated => Ok(()),
            Frame::Notice(_) if authenticated && !from_client => Ok(()),
            Frame::Data(_) | Frame::ZeroRun(_) | Frame::Flush(_) | Frame::Intent(_) | Frame::Commit(_)
                if self.plan_only && self.state == State::ReplicaOpen =>
            {
                Err(WireError::IllegalFrame {
                    frame: frame.name(),
                    direction: if dir == Dir::Send { "sent" } else { "received" },
                    state: "ReplicaOpen (plan only)",
                })
            }
            Frame::OpenReplica(o) if from_client && self.state == State::Ready => {
                self.plan_only = o.flags & OpenReplica::PLAN_ONLY != 0;
                self.streams = (0, 0);
                self.disks.clear();
                self.state = State::OpeningReplica;
                Ok(())
            }
            Frame::ReplicaOpened(_) if !from_client && self.state == State::OpeningReplica => {
                self.state = State::ReplicaOpen;
                Ok(())
            }
            Frame::OpenDisk(o) if from_client && self.state == State::ReplicaOpen => {
                if self.disks.contains_key(&o.disk) {
                    return Err(WireError::Disk { what: "OpenDisk for already open", disk: o.disk });
                }
                self.disks.insert(
                    o.disk,
                    DiskTrack {
                        size: o.size,
                        chunk_size: o.chunk_size,
                        chunk_count: chunk_count(o.chunk_size, o.size),
                        open: false,
                        next_min: 0,
                        flushed: 0,
                        intent_end: 0,
                        durable: 0,
                        map_next: None,
                    },
                );
                Ok(())
            }
            Frame::ResumeInfo(r) if !from_client && self.state == State::ReplicaOpen => {
                let d = self.disk(r.disk, false)?;
                if r.next_chunk > d.chunk_count {
                    return Err(WireError::Chunk {
                        disk: r.disk,
                        chunk: r.next_chunk,
                        what: "resume point beyond the disk",
                    });
                }
                d.open = true;
                d.next_min = r.next_chunk;
                d.flushed = r.next_chunk;
                d.durable = r.next_chunk;
                Ok(())
            }
            Frame::DigestMapRequest(r) if from_client && self.state == State::ReplicaOpen => {
                self.require_feature(FEATURE_DIGEST_MAP, frame.name(), "digest map (feature not negotiated)")?;
                let d = self.disk(r.disk, true)?;
                if d.map_next.is_some() {
                    return Err(WireError::Disk { what: "second DigestMapRequest in flight for", disk: r.disk });
                }
                d.map_next = Some(0);
                Ok(())
            }
            Frame::DigestMapPart(p) if !from_client && self.state == State::ReplicaOpen => {
                let d = self.disk(p.disk, true)?;
                let Some(next) = d.map_next else {
                    return Err(WireError::Disk { what: "DigestMapPart without a request for", disk: p.disk });
                };
                if p.first_chunk != next {
                    return Err(WireError::Chunk {
                        disk: p.disk,
                        chunk: p.first_chunk,
                        what: "digest map part out of order",
                    });
                }
                // Never more digests than the disk has chunks: a receiver may size its map by the
                // disk, and a peer must not make it grow past that.
                let end = next + p.count() as u64;
                if end > d.chunk_count {
                    return Err(WireError::Chunk {
                        disk: p.disk,
                        chunk: p.first_chunk,
                        what: "digest map part beyond the end of the disk",
                    });
                }
                d.map_next = Some(end);
                Ok(())
            }
            Frame::DigestMapEnd(e) if !from_client && self.state == State::ReplicaOpen => {
                let d = self.disk(e.disk, true)?;
                // Not `take()`: a refused frame must leave the state as it was.
                let Some(next) = d.map_next else {
                    return Err(WireError::Disk { what: "DigestMapEnd without a request for", disk: e.disk });
                };
                if !e.cache_hit && next != e.chunk_count {
                    return Err(WireError::Chunk { disk: e.disk, chunk: next, what: "digest map ended early or late" });
                }
                if e.cache_hit && next != 0 {
                    return Err(WireError::Chunk {
                        disk: e.disk,
                        chunk: next,
                        what: "digest map cache hit after parts",
                    });
                }
                d.map_next = None;
                Ok(())
            }
            Frame::Data(data) if from_client && self.state == State::ReplicaOpen => {
                if data.codec == Codec::Zstd {
                    self.require_feature(FEATURE_ZSTD, frame.name(), "codec zstd (feature not negotiated)")?;
                }
                if data.codec == Codec::ZstdStream {
                    self.require_feature(
                        FEATURE_ZSTD_STREAM,
                        frame.name(),
                        "codec zstd-stream (feature not negotiated)",
                    )?;
                }
                let d = self.disk(data.disk, true)?;
                check_chunk(data.disk, d, data.chunk, 1)?;
                if u64::from(data.logical_len) != d.logical_len(data.chunk) {
                    return Err(WireError::Chunk {
                        disk: data.disk,
                        chunk: data.chunk,
                        what: "logical length does not match the disk",
                    });
                }
                d.next_min = data.chunk + 1;
                Ok(())
            }
            Frame::ZeroRun(z) if from_client && self.state == State::ReplicaOpen => {
                let d = self.disk(z.disk, true)?;
                check_chunk(z.disk, d, z.first_chunk, z.count)?;
                d.next_min = z.first_chunk + z.count;
                Ok(())
            }
            Frame::Intent(i) if from_client && self.state == State::ReplicaOpen => {
                let d = self.disk(i.disk, true)?;
                // The codec guarantees at least one run, ordered; a frame built by
                // hand and given to `handle_frame` must still not panic.
                let (Some(first), Some(last)) = (i.runs.first(), i.runs.last()) else {
                    return Err(WireError::InvalidValue { frame: frame.name(), field: "count", value: 0 });
                };
                if first.first_chunk < d.next_min.max(d.intent_end) {
                    return Err(WireError::Chunk {
                        disk: i.disk,
                        chunk: first.first_chunk,
                        what: "intent behind data sent or an earlier intent",
                    });
                }
                match last.first_chunk.checked_add(u64::from(last.count)) {
                    Some(end) if end <= d.chunk_count => {
                        d.intent_end = end;
                        Ok(())
                    }
                    _ => Err(WireError::Chunk {
                        disk: i.disk,
                        chunk: last.first_chunk,
                        what: "intent beyond the end of the disk",
                    }),
                }
            }
            Frame::Flush(f) if from_client && self.state == State::ReplicaOpen => {
                let d = self.disk(f.disk, true)?;
                if f.next_chunk < d.next_min.max(d.flushed) || f.next_chunk > d.chunk_count {
                    return Err(WireError::Chunk {
                        disk: f.disk,
                        chunk: f.next_chunk,
                        what: "flush point behind data sent or beyond the disk",
                    });
                }
                d.flushed = f.next_chunk;
                d.next_min = f.next_chunk;
                Ok(())
            }
            Frame::Checkpoint(c) if !from_client && matches!(self.state, State::ReplicaOpen | State::Committing) => {
                let d = self.disk(c.disk, true)?;
                if c.next_chunk > d.flushed {
                    return Err(WireError::Chunk {
                        disk: c.disk,
                        chunk: c.next_chunk,
                        what: "checkpoint ahead of the last flush",
                    });
                }
                if c.next_chunk < d.durable {
                    return Err(WireError::Chunk {
                        disk: c.disk,
                        chunk: c.next_chunk,
                        what: "checkpoint behind an earlier checkpoint",
                    });
                }
                d.durable = c.next_chunk;
                Ok(())
            }
            Frame::Commit(c) if from_client && self.state == State::ReplicaOpen => {
                if c.disk_count as usize != self.disks.len() {
                    return Err(WireError::Disk {
                        what: "Commit counts a different number of disks than opened; last",
                        disk: c.disk_count,
                    });
                }
                if let Some((id, _)) = self.disks.iter().find(|(_, d)| !d.open || d.flushed != d.chunk_count) {
                    return Err(WireError::Disk {
                        what: "Commit before every disk was flushed to its end:",
                        disk: *id,
                    });
                }
                if let Some((id, _)) = self.disks.iter().find(|(_, d)| d.map_next.is_some()) {
                    return Err(WireError::Disk {
                        what: "Commit while a digest map reply is in flight for",
                        disk: *id,
                    });
                }
                self.state = State::Committing;
                Ok(())
            }
            Frame::Join(_) if from_client && self.state == State::Ready => {
                self.require_feature(FEATURE_STREAMS, frame.name(), "streams (feature not negotiated)")?;
                self.state = State::Joining;
                Ok(())
            }
            Frame::Joined(_) if !from_client && self.state == State::Joining => {
                self.state = State::Joined;
                Ok(())
            }
            Frame::OpenStreams(o) if from_client && self.state == State::ReplicaOpen && !self.plan_only => {
                self.require_feature(FEATURE_STREAMS, frame.name(), "streams (feature not negotiated)")?;
                if self.streams.0 != 0 {
                    return Err(WireError::IllegalFrame {
                        frame: frame.name(),
                        direction: if dir == Dir::Send { "sent" } else { "received" },
                        state: "ReplicaOpen (streams already open)",
                    });
                }
                if o.count < 2 {
                    return Err(WireError::InvalidValue { frame: frame.name(), field: "count", value: o.count.into() });
                }
                self.streams.0 = o.count;
                Ok(())
            }
            Frame::StreamTicket(t) if !from_client && self.state == State::ReplicaOpen => {
                if self.streams.0 == 0 || self.streams.1 != 0 {
                    return Err(illegal(self.state));
                }
                if t.count > self.streams.0 {
                    return Err(WireError::InvalidValue { frame: frame.name(), field: "count", value: t.count.into() });
                }
                self.streams.1 = t.count;
                Ok(())
            }
            Frame::Committed(_) if !from_client && self.state == State::Committing => {
                self.disks.clear();
                self.state = State::Ready;
                Ok(())
            }
            _ => Err(illegal(self.state)),
        }
    }

    /// A frame that needs a feature both ends agreed on in the handshake.
    fn require_feature(&self, feature: u64, frame: &'static str, field: &'static str) -> Result<(), WireError> {
        match &self.peer {
            Some(p) if p.features & feature != 0 => Ok(()),
            _ => Err(WireError::InvalidValue { frame, field, value: feature }),
        }
    }

    fn disk(&mut self, disk: u32, must_be_open: bool) -> Result<&mut DiskTrack, WireError> {
        match self.disks.get_mut(&disk) {
            None => Err(WireError::Disk { what: "frame for unknown", disk }),
            Some(d) if must_be_open && !d.open => Err(WireError::Disk { what: "frame before ResumeInfo for", disk }),
            Some(d) if !must_be_open && d.open => Err(WireError::Disk { what: "second ResumeInfo for", disk }),
            Some(d) => Ok(d),
        }
    }
}

fn check_chunk(disk: u32, d: &DiskTrack, first: u64, count: u64) -> Result<(), WireError> {
    if first < d.next_min {
        return Err(WireError::Chunk { disk, chunk: first, what: "out of order or already sent" });
    }
    match first.checked_add(count) {
        Some(end) if end <= d.chunk_count => Ok(()),
        _ => Err(WireError::Chunk { disk, chunk: first, what: "beyond the end of the disk" }),
    }
}

/// Check encoder-side limits so we never send what a peer must refuse.
fn check_limits(frame: &Frame) -> Result<(), WireError> {
    let name = frame.name();
    let too_long = |field: &'static str, len: usize, max: usize| {
        if len > max {
            Err(WireError::FieldTooLong { frame: name, field, len: len as u64, max: max as u64 })
        } else {
            Ok(())
        }
    };
    let bad_chunk_size = |c: u32| validate_chunk_size(c).is_err();
    match frame {
        Frame::OpenReplica(o) => too_long("replica", o.replica.len(), MAX_NAME_LEN),
        Frame::OpenStreams(OpenStreams { count }) | Frame::StreamTicket(StreamTicket { count, .. })
            if *count == 0 || *count > MAX_STREAMS =>
        {
            Err(WireError::InvalidValue { frame: name, field: "count", value: (*count).into() })
        }
        Frame::ReplicaOpened(r) if r.chunk_size != 0 && bad_chunk_size(r.chunk_size) => {
            Err(WireError::InvalidValue { frame: name, field: "chunk_size", value: r.chunk_size.into() })
        }
        Frame::ResumeInfo(r) if r.flags & !(ResumeInfo::EXISTED | ResumeInfo::FINISHED) != 0 => {
            Err(WireError::InvalidValue { frame: name, field: "flags", value: r.flags.into() })
        }
        Frame::Unknown { frame_type } if type_name(*frame_type) != "Unknown" => {
            Err(WireError::InvalidValue { frame: name, field: "frame_type", value: (*frame_type).into() })
        }
        Frame::OpenDisk(o) => {
            too_long("name", o.name.len(), MAX_NAME_LEN)?;
            if bad_chunk_size(o.chunk_size) {
                return Err(WireError::InvalidValue { frame: name, field: "chunk_size", value: o.chunk_size.into() });
            }
            Ok(())
        }
        Frame::DigestMapPart(p) => {
            if p.digests.len() % DIGEST_LEN != 0 {
                return Err(WireError::InvalidValue {
                    frame: name,
                    field: "digests length",
                    value: p.digests.len() as u64,
                });
            }
            too_long("count", p.count(), MAX_DIGESTS_PER_PART)
        }
        Frame::Data(d) => {
            too_long("payload", d.payload.len(), MAX_CHUNK_SIZE as usize)?;
            if d.payload.is_empty()
                || (d.codec == Codec::None && d.payload.len() != d.logical_len as usize)
                || (d.codec == Codec::ZstdStream && d.payload.len() <= STREAM_HEADER_LEN)
            {
                return Err(WireError::InvalidValue {
                    frame: name,
                    field: "payload length",
                    value: d.payload.len() as u64,
                });
            }
            Ok(())
        }
        Frame::ZeroRun(z) if z.count == 0 => Err(WireError::InvalidValue { frame: name, field: "count", value: 0 }),
        Frame::Intent(i) => i.validate(),
        Frame::Error(e) => too_long("message", e.message.len(), MAX_MESSAGE_LEN),
        Frame::Notice(n) => too_long("message", n.message.len(), MAX_MESSAGE_LEN),
        _ => Ok(()),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}
