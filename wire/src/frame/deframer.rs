//! Splitting a byte stream into frames: the [`Deframer`].

use bytes::{Buf, BytesMut};

use super::reader::Reader;
use super::{
    decode_header, frame_type, DataHead, Frame, Header, DATA_FIXED_LEN, FLAGS_RESERVED, HEADER_LEN, MAX_BODY_LEN,
};
use crate::error::WireError;

/// Splits a byte stream into frames.
///
/// Read socket data straight into [`Deframer::buffer_mut`] (or push it with
/// [`Deframer::push`]); [`Deframer::next_frame`] returns `Ok(None)` while it
/// needs more bytes. Decoded payloads are slices of this buffer, not copies.
#[derive(Debug)]
pub struct Deframer {
    buf: BytesMut,
    header: Option<Header>,
    max_body_len: u32,
    /// Payload bytes of the data frame [`Deframer::next_split`] returned last that
    /// its caller has not taken yet.
    payload_left: usize,
}

impl Default for Deframer {
    fn default() -> Self {
        Deframer { buf: BytesMut::new(), header: None, max_body_len: MAX_BODY_LEN, payload_left: 0 }
    }
}

/// What [`Deframer::next_split`] returns: a whole frame, or the head of a data
/// frame whose payload the caller takes itself.
#[derive(Debug)]
pub enum Split {
    /// Any frame but a well-formed data frame.
    Frame(Frame),
    /// A data frame's head: its `payload_len` bytes follow, for the caller to take
    /// with [`Deframer::take_payload`] and [`Deframer::payload_received`].
    Data(DataHead),
}

impl Deframer {
    /// A deframer with an empty buffer, accepting bodies up to [`MAX_BODY_LEN`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Lower the body length limit for the frames not yet started (at most
    /// [`MAX_BODY_LEN`]): a larger announced length is [`WireError::FrameTooLarge`]
    /// as soon as its header is in. Sessions use
    /// [`MAX_HANDSHAKE_BODY_LEN`](super::MAX_HANDSHAKE_BODY_LEN)
    /// until the peer is authenticated.
    pub fn set_max_body_len(&mut self, max: u32) {
        self.max_body_len = max.min(MAX_BODY_LEN);
    }

    /// The body length limit in force.
    pub fn max_body_len(&self) -> u32 {
        self.max_body_len
    }

    /// Append bytes received from the peer.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The receive buffer, for reading from a socket straight into its spare capacity.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// How many bytes are buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the next frame needs at least (0 when one is ready to decode).
    pub fn wanted(&self) -> usize {
        match self.header {
            None => HEADER_LEN.saturating_sub(self.buf.len()),
            Some(h) => (h.body_len as usize).saturating_sub(self.buf.len()),
        }
    }

    /// Decode the next frame, `Ok(None)` if more bytes are needed.
    ///
    /// The header (magic, check, length limit) is validated as soon as its 12
    /// bytes are in, before any body is buffered or allocated for.
    ///
    /// # Panics
    /// When the payload of a data frame from [`Deframer::next_split`] has not
    /// all been taken (a bug in the caller, not bad input).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let Some(header) = self.header()? else { return Ok(None) };
        let len = header.body_len as usize;
        if self.buf.len() < len {
            // Reserve for the announced body (already bounded by max_body_len).
            self.buf.reserve(len - self.buf.len());
            return Ok(None);
        }
        self.header = None;
        let body = self.buf.split_to(len).freeze();
        Frame::decode_body(header.frame_type, header.flags, body).map(Some)
    }
}

impl Deframer {
    /// The header of the next frame, decoded and checked once its bytes are in.
    fn header(&mut self) -> Result<Option<Header>, WireError> {
        assert_eq!(self.payload_left, 0, "the payload of the last data frame must be taken first");
        if let Some(h) = self.header {
            return Ok(Some(h));
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&self.buf[..HEADER_LEN]);
        let h = decode_header(&raw)?;
        if h.body_len > self.max_body_len {
            return Err(WireError::FrameTooLarge { frame_type: h.frame_type, len: h.body_len, max: self.max_body_len });
        }
        self.buf.advance(HEADER_LEN);
        self.header = Some(h);
        Ok(Some(h))
    }

    /// Like [`Deframer::next_frame`], but a data frame comes out as its head as
    /// soon as its fixed fields are in (checked as [`Frame::decode_body`] checks
    /// them): its payload is left for the caller to take into a buffer of its
    /// own, from this buffer ([`Deframer::take_payload`]) and then straight from
    /// the socket ([`Deframer::payload_received`]), before it asks for the next
    /// frame. A receiver that writes chunks from buffers it reuses so never
    /// allocates or copies for a payload.
    ///
    /// # Panics
    /// As [`Deframer::next_frame`].
    pub fn next_split(&mut self) -> Result<Option<Split>, WireError> {
        let Some(h) = self.header()? else { return Ok(None) };
        if h.frame_type != frame_type::DATA || h.flags & FLAGS_RESERVED != 0 || (h.body_len as usize) < DATA_FIXED_LEN {
            // Anything else, and every error a data frame's header can hold, the usual way.
            return Ok(self.next_frame()?.map(Split::Frame));
        }
        if self.buf.len() < DATA_FIXED_LEN {
            return Ok(None);
        }
        self.header = None;
        let fixed = self.buf.split_to(DATA_FIXED_LEN).freeze();
        let head = DataHead::decode(&mut Reader::new(fixed, "Data"), h.body_len as usize - DATA_FIXED_LEN)?;
        self.payload_left = head.payload_len as usize;
        Ok(Some(Split::Data(head)))
    }

    /// Payload bytes of the data frame from [`Deframer::next_split`] not taken yet.
    pub fn payload_left(&self) -> usize {
        self.payload_left
    }

    /// Move the buffered bytes of that payload (as many as fit in `dst`) to `dst`;
    /// returns how many.
    pub fn take_payload(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.payload_left).min(self.buf.len());
        dst[..n].copy_from_slice(&self.buf[..n]);
        self.buf.advance(n);
        self.payload_left -= n;
        n
    }

    /// The caller read `n` bytes of that payload from the peer itself (after taking
    /// every buffered one).
    ///
    /// # Panics
    /// When `n` is more than [`Deframer::payload_left`] or payload bytes are still buffered.
    pub fn payload_received(&mut self, n: usize) {
        assert!(n <= self.payload_left, "more payload received than the frame holds");
        assert!(n == 0 || self.buf.is_empty(), "payload bytes are still buffered");
        self.payload_left -= n;
    }
}

/// Decode exactly one frame from `bytes` (used by tests and fuzzing):
/// an error if the bytes hold less or more than one frame.
pub fn decode_one(bytes: &[u8]) -> Result<Frame, WireError> {
    let mut d = Deframer::new();
    d.push(bytes);
    match d.next_frame()? {
        Some(f) if d.buffered() == 0 => Ok(f),
        Some(f) => Err(WireError::TrailingBytes { frame: f.name(), extra: d.buffered() }),
        None => Err(WireError::Truncated { frame: "frame", field: "header or body" }),
    }
}
