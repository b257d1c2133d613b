//! A bounds-checked reader over a frame body: every read says which field it
//! is for, so a short body is a [`WireError::Truncated`] naming that field.

use bytes::{Buf, Bytes};

use crate::error::WireError;

/// Bounds-checked reader over a frame body.
pub(super) struct Reader {
    buf: Bytes,
    /// Name of the frame being read, for errors.
    pub(super) frame: &'static str,
}

impl Reader {
    /// A reader over `body`, the body of a frame named `frame`.
    pub(super) fn new(body: Bytes, frame: &'static str) -> Self {
        Reader { buf: body, frame }
    }
    /// How many bytes are left to read.
    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(super) fn need(&self, n: usize, field: &'static str) -> Result<(), WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated { frame: self.frame, field });
        }
        Ok(())
    }
    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }
    pub(super) fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::InvalidValue { frame: self.frame, field, value: v.into() }),
        }
    }
    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16_le())
    }
    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32_le())
    }
    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64_le())
    }
    pub(super) fn i64(&mut self, field: &'static str) -> Result<i64, WireError> {
        self.need(8, field)?;
        Ok(self.buf.get_i64_le())
    }
    pub(super) fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        self.need(N, field)?;
        let mut a = [0u8; N];
        self.buf.copy_to_slice(&mut a);
        Ok(a)
    }
    pub(super) fn bytes(&mut self, field: &'static str, n: usize) -> Result<Bytes, WireError> {
        self.need(n, field)?;
        Ok(self.buf.split_to(n))
    }
    pub(super) fn string(&mut self, field: &'static str, max: usize) -> Result<String, WireError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(WireError::FieldTooLong { frame: self.frame, field, len: len as u64, max: max as u64 });
        }
        let raw = self.bytes(field, len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| WireError::InvalidUtf8 { frame: self.frame, field })
    }
    pub(super) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    pub(super) fn finish(self) -> Result<(), WireError> {
        if !self.buf.is_empty() {
            return Err(WireError::TrailingBytes { frame: self.frame, extra: self.buf.len() });
        }
        Ok(())
    }
}
