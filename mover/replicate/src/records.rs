//! TLS 1.3 record protection after the handshake (RFC 8446 section 5), done in
//! ferry's own buffers with aws-lc-rs' AEAD.
//!
//! Why (issue 16, throughput): rustls' record layer copies every byte three
//! times on the receiving side (our buffer into its deframer, the decrypted
//! record into its plaintext queue, that queue into the chunk's pool buffer)
//! and twice on the sending side (the frame into a fresh record, the record
//! into the send buffer), with an allocation per 16 KiB record. Here a data
//! payload's records are read from the socket into a scratch buffer that stays
//! in cache and decrypted from there straight into the chunk's pool buffer
//! ([`Opener::open_direct`], driven by `conn.rs`: the plaintext is never
//! copied); other records are decrypted in place in the receive buffer and
//! their plaintext copied once, while it is still in cache. A record that lies
//! in one buffer (a payload's) is encrypted from there into the send buffer
//! (AES-GCM out of place, `seal_out_of_place_scatter`, the inner content type
//! as its extra byte); a record of several small pieces (a frame's head) is
//! copied into the send buffer and encrypted there. The AEAD is aws-lc-rs'
//! AES-GCM (the suite rustls negotiated), because ring has no out-of-place
//! AEAD.
//!
//! Record layout (wire/PROTOCOL.md, "TLS record layout"): [`Sealer::seal`]
//! starts the last buffer it is given (a data frame's payload) on a record
//! boundary and cuts it in records of 16 KiB from there, so a receiver knows
//! where each of the payload's records lies before it reads them. Still plain
//! TLS 1.3: any peer reads it, and the receiver takes any layout (a record
//! other than the one expected goes the usual way).
//!
//! How: rustls runs the whole handshake (`tls.rs`, unchanged: pinning, the
//! exporter binding). Then its secret extraction (`dangerous_extract_secrets`,
//! the interface rustls offers for kTLS) hands over the traffic keys and
//! sequence numbers of both directions; the connection object is gone. Each
//! half of a ferry connection then owns its direction: the sender a [`Sealer`],
//! the receiver an [`Opener`]; no lock is taken per record or per frame on the
//! data path, which is better than the issue's "lock held only around the
//! state machine": there is no shared state machine left to lock. The two
//! halves share a small `Shared` (a mutex taken once per frame sent and on
//! rare events) for what one half must tell the other: an alert to send after
//! a record failed its integrity check, a key update the peer requested.
//!
//! Key updates. AES-GCM may protect at most 2^24 records under one key
//! (rustls' confidentiality limit, RFC 8446 section 5.5), 256 GiB of 16 KiB
//! records: a long session must update its keys. The sender does so before it
//! reaches the limit: a KeyUpdate handshake message under the old key, then the
//! next traffic secret `HKDF-Expand-Label(secret, "traffic upd", "", Hash.length)`
//! and its key and IV (RFC 8446 section 7.2). The receiver follows a KeyUpdate
//! from the peer the same way, and answers one that requests an update with
//! its own. The initial traffic secrets come from rustls' key log callback for
//! this connection alone; `Keys` checks that the key and IV it derives from
//! them are the ones rustls extracted, so a wrong secret cannot go unnoticed.
//!
//! Records are byte-compatible with rustls' (the unit tests exchange data and
//! key updates with a rustls peer in both directions). Received records are
//! checked as rustls would: outer type application_data, length at most
//! 2^14 + 256, integrity, a content type after the padding; an alert ends the
//! stream (close_notify cleanly, others as [`rustls::Error::AlertReceived`]).
//! [`Sealer::close_notify`] ends what this side sends (`Conn::shutdown` sends it
//! at every end of a connection but a failed one, which sends its alert).

use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard};

use aws_lc_rs::{aead, hkdf};
use bytes::{Buf, BytesMut};
use rustls::{AlertDescription, ConnectionTrafficSecrets, Error, InvalidMessage, PeerMisbehaved};

/// Largest plaintext of a record.
pub const MAX_PLAIN: usize = 1 << 14;
/// Largest protected payload a peer may send (RFC 8446 section 5.2).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// Record header: type, legacy version, length.
pub const HEADER: usize = 5;
/// AEAD tag.
pub const TAG: usize = 16;
/// Bytes a record adds to its plaintext: header, inner content type, tag.
pub const OVERHEAD: usize = HEADER + 1 + TAG;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPDATA: u8 = 23;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;

/// Which side of the connection this end is (whose traffic secret is whose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source.
    Client,
    /// The target.
    Server,
}

/// The client's and the server's first traffic secrets, once logged.
type Logged = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The traffic secrets rustls' key log reported for one connection.
#[derive(Default)]
pub struct SecretLog {
    secrets: Mutex<Logged>,
}

impl std::fmt::Debug for SecretLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretLog(..)") // never the secrets
    }
}

impl rustls::KeyLog for SecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let mut s = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        match label {
            "CLIENT_TRAFFIC_SECRET_0" => s.0 = Some(secret.to_vec()),
            "SERVER_TRAFFIC_SECRET_0" => s.1 = Some(secret.to_vec()),
            _ => {}
        }
    }

    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }
}

impl SecretLog {
    fn take(&self) -> Logged {
        std::mem::take(&mut *self.secrets.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// One direction's traffic protection: AEAD key, IV, sequence number, and the
/// traffic secret the next key update derives from.
struct Keys {
    alg: &'static aead::Algorithm,
    hash: hkdf::Algorithm,
    secret: Vec<u8>,
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

fn internal(what: &str) -> Error {
    Error::General(format!("TLS record layer: {what}"))
}

/// `HKDF-Expand-Label(secret, label, "", len)` (RFC 8446 section 7.1).
fn expand_label(hash: hkdf::Algorithm, secret: &[u8], label: &[u8], len: usize) -> Vec<u8> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = hkdf::Prk::new_less_safe(hash, secret);
    let out_len = (len as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&out_len, &label_len, b"tls13 ", label, &[0]];
    let mut out = vec![0u8; len];
    prk.expand(&info, Len(len)).and_then(|okm| okm.fill(&mut out)).expect("HKDF output length within bounds");
    out
}

impl Keys {
    /// Keys from a traffic secret; `expect` (what rustls extracted) must match.
    fn from_secret(
        alg: &'static aead::Algorithm,
        hash: hkdf::Algorithm,
        secret: Vec<u8>,
        seq: u64,
    ) -> Result<Keys, Error> {
        let key = expand_label(hash, &secret, b"key", alg.key_len());
        let iv: [u8; 12] = expand_label(hash, &secret, b"iv", 12).try_into().expect("12 bytes");
        let key = aead::UnboundKey::new(alg, &key).map_err(|_| internal("bad key length"))?;
        Ok(Keys { alg, hash, secret, key: aead::LessSafeKey::new(key), iv, seq })
    }

    /// The keys rustls extracted, with the secret they came from (checked).
    fn extracted(secret: Option<Vec<u8>>, (seq, x): (u64, ConnectionTrafficSecrets)) -> Result<Keys, Error> {
        let (alg, hash, key, iv) = match &x {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, hkdf::HKDF_SHA256, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, hkdf::HKDF_SHA384, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, hkdf::HKDF_SHA256, key, iv)
            }
            _ => return Err(internal("unsupported cipher suite")),
        };
        let secret = secret.ok_or_else(|| internal("no traffic secret was logged"))?;
        let keys = Keys::from_secret(alg, hash, secret, seq)?;
        let derived = expand_label(hash, &keys.secret, b"key", alg.key_len());
        if derived != key.as_ref() || keys.iv[..] != *iv.as_ref() {
            return Err(internal("the logged traffic secret does not give the extracted keys"));
        }
        Ok(keys)
    }

    /// The next generation (a key update, RFC 8446 section 7.2).
    fn next(&self) -> Result<Keys, Error> {
        let secret = expand_label(self.hash, &self.secret, b"traffic upd", hkdf::KeyType::len(&self.hash));
        Keys::from_secret(self.alg, self.hash, secret, 0)
    }

    fn nonce(&self) -> aead::Nonce {
        let mut n = self.iv;
        for (a, b) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *a ^= b;
        }
        aead::Nonce::assume_unique_for_key(n)
    }
}

/// What one half tells the other.
#[derive(Default)]
struct Shared {
    /// A fatal alert the receiving half wants sent (after a bad record).
    alert: Option<AlertDescription>,
    /// The peer asked for our sending keys to be updated.
    update_requested: bool,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(s: &SharedRef) -> MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Both directions of a connection whose handshake rustls finished.
pub struct Records {
    /// The sending direction.
    pub sealer: Sealer,
    /// The receiving direction.
    pub opener: Opener,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Records(..)")
    }
}

impl Records {
    /// Take over a connection rustls finished the handshake of (nothing of it
    /// left to send or to read: see `tls.rs`), with the secrets `log` caught.
    pub fn take_over(conn: rustls::Connection, side: Side, log: &SecretLog) -> Result<Records, Error> {
        if conn.is_handshaking() || conn.wants_write() {
            return Err(internal("taking over a connection whose handshake is not done"));
        }
        let limit = match conn.negotiated_cipher_suite() {
            Some(rustls::SupportedCipherSuite::Tls13(s)) => s.common.confidentiality_limit,
            #[allow(unreachable_patterns)]
            _ => return Err(internal("not a TLS 1.3 connection")),
        };
        let x = match conn {
            rustls::Connection::Client(c) => c.dangerous_extract_secrets()?,
            rustls::Connection::Server(c) => c.dangerous_extract_secrets()?,
        };
        let (client, server) = log.take();
        let (tx, rx) = match side {
            Side::Client => (client, server),
            Side::Server => (server, client),
        };
        let shared = SharedRef::default();
        Ok(Records {
            sealer: Sealer {
                keys: Keys::extracted(tx, x.tx)?,
                limit,
                shared: shared.clone(),
                failed: false,
                closed: false,
            },
            opener: Opener { keys: Keys::extracted(rx, x.rx)?, shared, plain: (0, 0), end: 0, closed: false },
        })
    }
}

/// The sending direction: frames into records.
pub struct Sealer {
    keys: Keys,
    /// Records per key (the suite's confidentiality limit).
    limit: u64,
    shared: SharedRef,
    /// A fatal alert went out: nothing more may.
    failed: bool,
    /// close_notify went out: no more data may.
    closed: bool,
}

/// Where [`Sealer::seal`] is in a list of buffers.
#[derive(Default, Debug, Clone, Copy)]
pub struct Cursor {
    buf: usize,
    at: usize,
}

impl Sealer {
    /// Append to `out` the records of about `max` bytes of `bufs` from `cur`
    /// on (at least one record; whole records are sealed, so a call may take a
    /// little more than `max`); true when all of `bufs` is sealed. The record
    /// layout (see the module docs): the last buffer of `bufs` (a data frame's
    /// payload) starts a record of its own and is cut into records of 16 KiB
    /// from its start; the buffers before it share records. A fatal alert the
    /// receiving half asked for goes out first, and fails this and every later
    /// call, as does a call after [`Sealer::close_notify`].
    pub fn seal(
        &mut self,
        bufs: &[IoSlice<'_>],
        cur: &mut Cursor,
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<bool, Error> {
        self.pending(out)?;
        if self.closed {
            return Err(internal("sending after close_notify"));
        }
        let last = bufs.len().saturating_sub(1);
        let left = |cur: &Cursor| bufs.iter().skip(cur.buf).map(|b| b.len()).sum::<usize>() - cur.at;
        let take = left(cur).min(max.max(1));
        out.reserve(take + take.div_ceil(MAX_PLAIN) * OVERHEAD + 2 * OVERHEAD + 5);
        let mut sealed = 0;
        while sealed < take.max(1) && left(cur) > 0 {
            // This record ends where the last buffer begins, if it is before it.
            let segment = if cur.buf < last {
                bufs[cur.buf..last].iter().map(|b| b.len()).sum::<usize>() - cur.at
            } else {
                left(cur)
            };
            let n = segment.min(MAX_PLAIN);
            if bufs[cur.buf].len() - cur.at >= n {
                // All of it in one buffer (a payload's records): encrypted from there.
                self.record_from(out, &bufs[cur.buf][cur.at..cur.at + n])?;
                cur.at += n;
                if cur.at == bufs[cur.buf].len() {
                    cur.buf += 1;
                    cur.at = 0;
                }
                sealed += n;
                continue;
            }
            self.record(out, APPDATA, |o| {
                let mut want = n;
                while want > 0 {
                    let b = &bufs[cur.buf][cur.at..];
                    let k = b.len().min(want);
                    o.extend_from_slice(&b[..k]);
                    want -= k;
                    cur.at += k;
                    if cur.at == bufs[cur.buf].len() {
                        cur.buf += 1;
                        cur.at = 0;
                    }
                }
            })?;
            sealed += n;
        }
        // Empty buffers at the end.
        while cur.buf < bufs.len() && cur.at == bufs[cur.buf].len() {
            cur.buf += 1;
            cur.at = 0;
        }
        Ok(left(cur) == 0)
    }

    /// A close_notify alert (a clean end of what this side sends).
    /// Sent once: a second call adds nothing; nothing may be sealed after it.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        self.pending(out)?;
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.record(out, ALERT, |o| o.extend_from_slice(&[1, 0]))
    }

    /// Only what the receiving half asked for: an alert, a key update.
    pub fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        self.pending(out)
    }

    fn pending(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        if self.failed {
            return Err(internal("the connection failed"));
        }
        let (alert, update) = {
            let mut s = lock(&self.shared);
            (s.alert.take(), std::mem::take(&mut s.update_requested))
        };
        if let Some(a) = alert {
            self.failed = true;
            self.record_now(out, ALERT, |o| o.extend_from_slice(&[2, u8::from(a)]))?;
            return Err(internal("the connection failed"));
        }
        if update {
            self.key_update(out)?;
        }
        Ok(())
    }

    fn key_update(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        // update_not_requested (0): this side's keys only.
        self.record_now(out, HANDSHAKE, |o| o.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]))?;
        self.keys = self.keys.next()?;
        Ok(())
    }

    /// A key update when this key is about to reach its limit (one record of it
    /// is left for the KeyUpdate message): before every record but that one.
    fn update_if_due(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        if self.keys.seq + 1 >= self.limit {
            self.key_update(out)?;
        }
        Ok(())
    }

    /// A record, after a key update if one is due.
    fn record(&mut self, out: &mut Vec<u8>, typ: u8, fill: impl FnOnce(&mut Vec<u8>)) -> Result<(), Error> {
        self.update_if_due(out)?;
        self.record_now(out, typ, fill)
    }

    /// An application data record of `plain`, encrypted from where it is into
    /// `out` (no copy of the plaintext first), after a key update if one is due.
    fn record_from(&mut self, out: &mut Vec<u8>, plain: &[u8]) -> Result<(), Error> {
        self.update_if_due(out)?;
        debug_assert!(plain.len() <= MAX_PLAIN);
        let at = out.len();
        let header = Opener::direct_header(plain.len());
        out.extend_from_slice(&header);
        // Room for the ciphertext, the inner content type and the tag: written by the
        // AEAD, so the zeroes here are never sent.
        out.resize(at + HEADER + plain.len() + 1 + TAG, 0);
        let (cipher, extra) = out[at + HEADER..].split_at_mut(plain.len());
        self.keys
            .key
            .seal_out_of_place_scatter(self.keys.nonce(), aead::Aad::from(header), plain, cipher, &[APPDATA], extra)
            .map_err(|_| internal("encryption failed"))?;
        self.keys.seq += 1;
        Ok(())
    }

    fn record_now(&mut self, out: &mut Vec<u8>, typ: u8, fill: impl FnOnce(&mut Vec<u8>)) -> Result<(), Error> {
        let at = out.len();
        out.extend_from_slice(&[APPDATA, 3, 3, 0, 0]);
        fill(out);
        out.push(typ);
        let len = out.len() - at - HEADER + TAG;
        debug_assert!(len <= MAX_PLAIN + 1 + TAG);
        out[at + 3..at + 5].copy_from_slice(&(len as u16).to_be_bytes());
        let header: [u8; HEADER] = out[at..at + HEADER].try_into().expect("5 bytes");
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(self.keys.nonce(), aead::Aad::from(header), &mut out[at + HEADER..])
            .map_err(|_| internal("encryption failed"))?;
        out.extend_from_slice(tag.as_ref());
        self.keys.seq += 1;
        Ok(())
    }

    /// Test hook: update keys every `records` records.
    #[cfg(test)]
    pub fn set_limit(&mut self, records: u64) {
        self.limit = records;
    }
}

/// What [`Opener::open`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: [`Opener::plaintext`].
    Data,
    /// A record is not complete yet: at least this many more bytes are needed.
    NeedMore(usize),
    /// The peer closed the stream cleanly (close_notify).
    Closed,
}

/// What a record held (see `Opener::inner`).
enum Inner {
    /// Application data: this many bytes at the front of the plaintext.
    Data(usize),
    /// Nothing for the stream (padding only, a key update followed).
    Nothing,
    /// close_notify.
    Closed,
}

/// The receiving direction: records decrypted in place in the receive buffer.
pub struct Opener {
    keys: Keys,
    shared: SharedRef,
    /// Plaintext of the record opened last not yet taken: a range of the buffer.
    plain: (usize, usize),
    /// Where that record ends in the buffer (0: none is open).
    end: usize,
    closed: bool,
}

impl Opener {
    /// The plaintext not yet taken (in `buf`, the receive buffer).
    pub fn plaintext<'a>(&self, buf: &'a BytesMut) -> &'a [u8] {
        &buf[self.plain.0..self.plain.1]
    }

    /// `n` bytes of [`Opener::plaintext`] were taken; the record leaves the buffer with its last byte.
    pub fn consume(&mut self, buf: &mut BytesMut, n: usize) {
        self.plain.0 += n;
        debug_assert!(self.plain.0 <= self.plain.1);
        if self.plain.0 == self.plain.1 && self.end > 0 {
            buf.advance(self.end);
            self.plain = (0, 0);
            self.end = 0;
        }
    }

    /// Open the next record at the front of `buf` (its plaintext all taken).
    /// An error is final; the sending half sends the alert it calls for.
    pub fn open(&mut self, buf: &mut BytesMut) -> Result<Opened, Error> {
        debug_assert!(self.end == 0);
        let r = self.open_inner(buf);
        self.failed(&r);
        r
    }

    /// After an error: the alert it calls for goes to the sending half, and the stream is over.
    fn failed<T>(&mut self, r: &Result<T, Error>) {
        if let Err(e) = r {
            let alert = match e {
                Error::DecryptError => Some(AlertDescription::BadRecordMac),
                Error::AlertReceived(_) => None,
                Error::InvalidMessage(_) => Some(AlertDescription::DecodeError),
                _ => Some(AlertDescription::UnexpectedMessage),
            };
            lock(&self.shared).alert = alert;
            self.closed = true;
        }
    }

    fn open_inner(&mut self, buf: &mut BytesMut) -> Result<Opened, Error> {
        loop {
            if self.closed {
                return Ok(Opened::Closed);
            }
            if buf.len() < HEADER {
                return Ok(Opened::NeedMore(HEADER - buf.len()));
            }
            let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
            if buf[0] == CHANGE_CIPHER_SPEC {
                return Err(PeerMisbehaved::IllegalMiddleboxChangeCipherSpec.into());
            }
            if buf[0] != APPDATA || buf[1] != 3 || buf[2] != 3 {
                return Err(InvalidMessage::InvalidContentType.into());
            }
            if len > MAX_CIPHER {
                return Err(InvalidMessage::MessageTooLarge.into());
            }
            if len < TAG + 1 {
                return Err(Error::DecryptError);
            }
            if buf.len() < HEADER + len {
                return Ok(Opened::NeedMore(HEADER + len - buf.len()));
            }
            let (header, body) = buf[..HEADER + len].split_at_mut(HEADER);
            let nonce = self.keys.nonce();
            let plain =
                self.keys.key.open_in_place(nonce, aead::Aad::from(&*header), body).map_err(|_| Error::DecryptError)?;
            self.keys.seq += 1;
            match self.inner(plain)? {
                Inner::Data(at) => {
                    self.plain = (HEADER, HEADER + at);
                    self.end = HEADER + len;
                    return Ok(Opened::Data);
                }
                Inner::Closed => {
                    buf.advance(HEADER + len);
                    return Ok(Opened::Closed);
                }
                Inner::Nothing => {}
            }
            buf.advance(HEADER + len);
        }
    }

    /// What a decrypted record holds (`plain`: its inner plaintext, content
    /// type and padding included), checked as rustls checks it; handshake
    /// messages (key updates) are acted on here.
    fn inner(&mut self, plain: &[u8]) -> Result<Inner, Error> {
        // The content type is the last byte that is not padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(PeerMisbehaved::IllegalTlsInnerPlaintext.into());
        };
        let typ = plain[at];
        if at > MAX_PLAIN {
            return Err(Error::PeerSentOversizedRecord);
        }
        match typ {
            APPDATA if at > 0 => Ok(Inner::Data(at)),
            APPDATA => Ok(Inner::Nothing),
            ALERT => {
                if at != 2 {
                    return Err(InvalidMessage::MessageTooShort.into());
                }
                let desc = AlertDescription::from(plain[1]);
                if desc == AlertDescription::CloseNotify {
                    self.closed = true;
                    return Ok(Inner::Closed);
                }
                Err(Error::AlertReceived(desc))
            }
            HANDSHAKE => {
                let msgs = plain[..at].to_vec();
                self.handshake(&msgs)?;
                Ok(Inner::Nothing)
            }
            _ => Err(InvalidMessage::InvalidContentType.into()),
        }
    }

    /// The header of a record that holds `n` bytes of application data and nothing
    /// else: what a record read apart must have (see [`Opener::open_direct`]), and
    /// what the sealer writes for a payload's record.
    pub fn direct_header(n: usize) -> [u8; HEADER] {
        let len = ((n + 1 + TAG) as u16).to_be_bytes();
        [APPDATA, 3, 3, len[0], len[1]]
    }

    /// Open a record read apart (the receive side's zero-copy path, see the
    /// module docs): `header` its 5-byte header, `cipher` its ciphertext without
    /// the tag, `tag` its tag. The plaintext (with its inner content type last)
    /// is decrypted straight into `out`, which is as long as `cipher`; the record
    /// is checked as [`Opener::open`] checks it (header, integrity, content type,
    /// padding; a key update is followed, an alert ends the stream). Returns the
    /// application data bytes now at the front of `out` (0 for a record that
    /// held none), or `Ok(None)` for a close_notify. An error is final, as for
    /// [`Opener::open`].
    pub fn open_direct(
        &mut self,
        header: &[u8; HEADER],
        cipher: &[u8],
        tag: &[u8; TAG],
        out: &mut [u8],
    ) -> Result<Option<usize>, Error> {
        debug_assert!(self.end == 0 && !self.closed);
        let r = self.open_direct_inner(header, cipher, tag, out);
        self.failed(&r);
        r
    }

    fn open_direct_inner(
        &mut self,
        header: &[u8; HEADER],
        cipher: &[u8],
        tag: &[u8; TAG],
        out: &mut [u8],
    ) -> Result<Option<usize>, Error> {
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != APPDATA || header[1] != 3 || header[2] != 3 {
            return Err(InvalidMessage::InvalidContentType.into());
        }
        if len > MAX_CIPHER || len != cipher.len() + TAG || out.len() != cipher.len() {
            return Err(InvalidMessage::MessageTooLarge.into());
        }
        let nonce = self.keys.nonce();
        self.keys
            .key
            .open_separate_gather(nonce, aead::Aad::from(&header[..]), cipher, tag, out)
            .map_err(|_| Error::DecryptError)?;
        self.keys.seq += 1;
        match self.inner(out)? {
            Inner::Data(at) => Ok(Some(at)),
            Inner::Nothing => Ok(Some(0)),
            Inner::Closed => Ok(None),
        }
    }

    /// Handshake messages after the handshake: KeyUpdate (followed), a
    /// NewSessionTicket (ignored: resumption is off).
    fn handshake(&mut self, mut msgs: &[u8]) -> Result<(), Error> {
        while !msgs.is_empty() {
            let [typ, a, b, c, rest @ ..] = msgs else {
                return Err(InvalidMessage::MessageTooShort.into());
            };
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if rest.len() < len {
                return Err(InvalidMessage::MessageTooShort.into());
            }
            let (body, next) = rest.split_at(len);
            match *typ {
                KEY_UPDATE => {
                    let request = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(InvalidMessage::InvalidKeyUpdate.into()),
                    };
                    // A key update must end its record (RFC 8446 section 5.1).
                    if !next.is_empty() {
                        return Err(PeerMisbehaved::KeyEpochWithPendingFragment.into());
                    }
                    self.keys = self.keys.next()?;
                    if request {
                        lock(&self.shared).update_requested = true;
                    }
                }
                NEW_SESSION_TICKET => {}
                _ => return Err(internal("unexpected handshake message after the handshake")),
            }
            msgs = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{provider, PinVerifier, ServerIdentity};
    use std::io::{Read, Write};

    /// A rustls client and server with their handshake done in memory; the
    /// key logs of both.
    fn pair(dir: &std::path::Path) -> (rustls::Connection, rustls::Connection, Arc<SecretLog>, Arc<SecretLog>) {
        let id = ServerIdentity::load_or_create(dir).unwrap();
        let (clog, slog) = (Arc::new(SecretLog::default()), Arc::new(SecretLog::default()));
        let mut scfg = (*id.server_config().unwrap()).clone();
        scfg.enable_secret_extraction = true;
        scfg.key_log = slog.clone();
        let mut ccfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier::new(Some(id.fingerprint()), false)))
            .with_no_client_auth();
        ccfg.enable_secret_extraction = true;
        ccfg.key_log = clog.clone();
        let name = rustls::pki_types::ServerName::try_from("ferry").unwrap();
        let mut c = rustls::Connection::Client(rustls::ClientConnection::new(Arc::new(ccfg), name).unwrap());
        let mut s = rustls::Connection::Server(rustls::ServerConnection::new(Arc::new(scfg)).unwrap());
        while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
            move_tls(&mut c, &mut s);
            move_tls(&mut s, &mut c);
        }
        (c, s, clog, slog)
    }

    fn move_tls(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut b = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut b).unwrap();
        }
        let mut rd = &b[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Everything `open` yields from `buf` (until it needs more, or the peer closed).
    fn open_buf(open: &mut Opener, buf: &mut BytesMut) -> (Vec<u8>, Result<Opened, Error>) {
        let mut got = Vec::new();
        loop {
            match open.open(buf) {
                Ok(Opened::Data) => {
                    got.extend_from_slice(open.plaintext(buf));
                    let n = open.plaintext(buf).len();
                    open.consume(buf, n);
                }
                r => return (got, r),
            }
        }
    }

    fn open_all(open: &mut Opener, wire: &[u8]) -> (Vec<u8>, Result<Opened, Error>) {
        open_buf(open, &mut BytesMut::from(wire))
    }

    /// One end taken over (`side`), the other a rustls connection: data both ways,
    /// with key updates from both, then close_notify both ways.
    fn exchange_with_rustls(side: Side) {
        let dir = tempfile::tempdir().unwrap();
        let (c, s, clog, slog) = pair(dir.path());
        let (ours, mut theirs, log) = match side {
            Side::Client => (c, s, clog),
            Side::Server => (s, c, slog),
        };
        let Records { mut sealer, mut opener } = Records::take_over(ours, side, &log).unwrap();
        // Ours to rustls: 1 MiB and a bit in pieces, keys updated every 5 records.
        sealer.set_limit(5);
        let a = data(MAX_PLAIN * 40 + 123, 1);
        let b = data(777, 2);
        let bufs = [IoSlice::new(&a[..100_000]), IoSlice::new(&a[100_000..]), IoSlice::new(&b)];
        let (mut wire, mut cur) = (Vec::new(), Cursor::default());
        while !sealer.seal(&bufs, &mut cur, 3 * MAX_PLAIN + 5, &mut wire).unwrap() {}
        sealer.close_notify(&mut wire).unwrap();
        let (mut rd, mut got, mut chunk) = (&wire[..], Vec::new(), vec![0u8; 1 << 16]);
        let mut clean_end = false;
        while !rd.is_empty() || !clean_end {
            if !rd.is_empty() {
                theirs.read_tls(&mut rd).unwrap();
                theirs.process_new_packets().unwrap();
            }
            loop {
                match theirs.reader().read(&mut chunk) {
                    Ok(0) => {
                        clean_end = true; // close_notify
                        break;
                    }
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !rd.is_empty() => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(got.len(), a.len() + b.len());
        assert!(got[..a.len()] == a[..] && got[a.len()..] == b[..], "rustls reads what we sealed");
        // rustls to ours, its keys updated in the middle, then its close_notify.
        let x = data(MAX_PLAIN * 3 + 9, 3);
        let mut wire = Vec::new();
        theirs.writer().write_all(&x[..20_000]).unwrap();
        theirs.refresh_traffic_keys().unwrap();
        theirs.writer().write_all(&x[20_000..]).unwrap();
        theirs.send_close_notify();
        while theirs.wants_write() {
            theirs.write_tls(&mut wire).unwrap();
        }
        let (got, end) = open_all(&mut opener, &wire);
        assert_eq!(end.unwrap(), Opened::Closed);
        assert!(got == x, "we read what rustls sent across its key update");
    }

    #[test]
    fn records_interoperate_with_rustls_as_client() {
        exchange_with_rustls(Side::Client);
    }

    #[test]
    fn records_interoperate_with_rustls_as_server() {
        exchange_with_rustls(Side::Server);
    }

    /// Records opened as `conn.rs` reads them (header, ciphertext and tag apart),
    /// decrypted straight to their offset in the payload: the plaintext lands
    /// there; a flipped byte fails the integrity check and queues the alert, as
    /// for a record opened in the receive buffer.
    #[test]
    fn records_opened_apart_land_at_their_offset_and_are_checked() {
        for flip in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (c, s, clog, slog) = pair(dir.path());
            let mut src = Records::take_over(c, Side::Client, &clog).unwrap();
            let mut dst = Records::take_over(s, Side::Server, &slog).unwrap();
            let head = data(61, 8);
            let payload = data(2 * MAX_PLAIN + 100, 9);
            let (mut wire, mut cur) = (Vec::new(), Cursor::default());
            let bufs = [IoSlice::new(&head), IoSlice::new(&payload)];
            assert!(src.sealer.seal(&bufs, &mut cur, usize::MAX, &mut wire).unwrap());
            // The head alone in the first record.
            let mut buf = BytesMut::from(&wire[..HEADER + 61 + 1 + TAG]);
            let (got, end) = open_buf(&mut dst.opener, &mut buf);
            assert_eq!((got, end.unwrap()), (head, Opened::NeedMore(HEADER)));
            let mut rest = &wire[HEADER + 61 + 1 + TAG..];
            let mut out = vec![0u8; payload.len() + 1];
            for (r, n) in [MAX_PLAIN, MAX_PLAIN, 100].into_iter().enumerate() {
                let header: [u8; HEADER] = rest[..HEADER].try_into().unwrap();
                assert_eq!(header, Opener::direct_header(n), "payload record {r} as expected");
                let at = r * MAX_PLAIN;
                let mut cipher = rest[HEADER..HEADER + n + 1].to_vec();
                let tag: [u8; TAG] = rest[HEADER + n + 1..HEADER + n + 1 + TAG].try_into().unwrap();
                if flip && r == 2 {
                    cipher[7] ^= 1;
                }
                let m = dst.opener.open_direct(&header, &cipher, &tag, &mut out[at..at + n + 1]);
                if flip && r == 2 {
                    assert!(matches!(m, Err(Error::DecryptError)), "{m:?}");
                    let mut alert = Vec::new();
                    assert!(dst.sealer.seal(&[IoSlice::new(b"x")], &mut Cursor::default(), 10, &mut alert).is_err());
                    let (_, end) = open_all(&mut src.opener, &alert);
                    assert!(matches!(end, Err(Error::AlertReceived(AlertDescription::BadRecordMac))), "{end:?}");
                    break;
                }
                assert_eq!(m.unwrap(), Some(n));
                rest = &rest[HEADER + n + 1 + TAG..];
            }
            if !flip {
                assert!(rest.is_empty());
                assert!(out[..payload.len()] == payload[..], "every record's plaintext at its offset");
            }
        }
    }

    /// ferry's provider at both ends: the hybrid post-quantum key exchange and
    /// AES-128-GCM are what they agree on.
    #[test]
    fn both_ends_agree_on_x25519mlkem768_and_aes_128_gcm() {
        let dir = tempfile::tempdir().unwrap();
        let (c, s, _, _) = pair(dir.path());
        for conn in [&c, &s] {
            let kx = conn.negotiated_key_exchange_group().expect("key exchange").name();
            assert_eq!(kx, rustls::NamedGroup::X25519MLKEM768);
            let suite = conn.negotiated_cipher_suite().expect("suite").suite();
            assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        }
    }

    #[test]
    fn both_ends_taken_over_update_keys_and_fail_on_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (c, s, clog, slog) = pair(dir.path());
        let mut src = Records::take_over(c, Side::Client, &clog).unwrap();
        let mut dst = Records::take_over(s, Side::Server, &slog).unwrap();
        src.sealer.set_limit(2);
        let a = data(MAX_PLAIN * 10, 5);
        let (mut wire, mut cur) = (Vec::new(), Cursor::default());
        assert!(src.sealer.seal(&[IoSlice::new(&a)], &mut cur, usize::MAX, &mut wire).unwrap());
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        let (got, end) = open_buf(&mut dst.opener, &mut buf);
        assert_eq!(end.unwrap(), Opened::NeedMore(1), "the last record lacks a byte");
        assert!(got[..] == a[..MAX_PLAIN * 9], "every whole record opened, keys updated 9 times");
        buf.extend_from_slice(&wire[wire.len() - 1..]);
        let (got, end) = open_buf(&mut dst.opener, &mut buf);
        assert_eq!(end.unwrap(), Opened::NeedMore(HEADER));
        assert!(got[..] == a[MAX_PLAIN * 9..] && buf.is_empty(), "the last record, once whole");
        // A byte flipped: the integrity check fails, and the receiving end's
        // sender puts a bad_record_mac alert out, then refuses to send.
        let (mut wire, mut cur) = (Vec::new(), Cursor::default());
        assert!(src.sealer.seal(&[IoSlice::new(b"hello")], &mut cur, usize::MAX, &mut wire).unwrap());
        let mut tampered = wire.clone();
        tampered[HEADER + 2] ^= 1;
        let (got, end) = open_all(&mut dst.opener, &tampered);
        assert!(got.is_empty());
        assert!(matches!(end, Err(Error::DecryptError)), "{end:?}");
        let mut alert = Vec::new();
        assert!(dst.sealer.seal(&[IoSlice::new(b"x")], &mut Cursor::default(), 10, &mut alert).is_err());
        assert!(dst.sealer.seal(&[IoSlice::new(b"x")], &mut Cursor::default(), 10, &mut Vec::new()).is_err());
        let (_, end) = open_all(&mut src.opener, &alert);
        assert!(matches!(end, Err(Error::AlertReceived(AlertDescription::BadRecordMac))), "{end:?}");
        // Without the traffic secrets logged the take-over is refused.
        let e = Records::take_over(pair(dir.path()).1, Side::Server, &SecretLog::default()).err().unwrap();
        assert!(e.to_string().contains("no traffic secret"), "{e}");
    }
}
