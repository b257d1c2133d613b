//! TLS for remote sessions: the server's identity, the source's pins, the
//! rustls configurations and the TLS handshake.
//!
//! Design (issue 16, "Transport"):
//! - **TLS 1.3 only**, rustls 0.23 with its `aws-lc-rs` crypto provider (its
//!   default; aws-lc-sys builds with a C compiler alone, no cmake), whose AEAD
//!   `records.rs` also uses: it encrypts out of place, which ring cannot, so a
//!   payload is never copied before it is encrypted. Key exchange prefers the
//!   hybrid X25519MLKEM768 (post-quantum ML-KEM with X25519: a recorded session
//!   stays secret unless both break), which both ferry ends offer; X25519 and
//!   the NIST curves remain. Session tickets and resumption
//!   are off: each session is a full handshake (one per run, cheap beside the
//!   data), and no ticket secret lives in the server.
//! - **Identity without a CA**: on its first start `ferry serve` makes an ECDSA
//!   P-256 key and a self-signed certificate ([`ServerIdentity::load_or_create`]),
//!   kept in `DATASTORE/.tls/` (a name no replica can take) or `--tls-dir`,
//!   directory mode 0700, files 0600. Its [`Fingerprint`] is `sha256:` and the
//!   hex of the certificate's DER.
//! - **Pinning**: the source accepts exactly one certificate, named by its
//!   fingerprint (`--fingerprint`, or the known-targets file, see
//!   [`KnownTargets`]). [`PinVerifier`] compares the fingerprint and still checks
//!   the handshake signature against the certificate's key with the provider,
//!   so only the holder of the pinned key can complete the handshake. Names,
//!   dates and CA chains are not checked: the pin is the whole trust.
//! - **Channel binding**: both ends export 32 bytes of keying material
//!   ([`EXPORTER_LABEL`]) once the handshake is done; the token proofs cover it
//!   (wire/PROTOCOL.md section 4), so a proof relayed into another TLS session
//!   is worthless.
//! - **Plaintext** only when both ends say `--insecure-plaintext`. Each end
//!   recognises the other kind by the first bytes it receives (a TLS record
//!   starts with 0x16, a ferry frame with `FE 52`) and answers with a ferry
//!   Error frame in plaintext that says what to change ([`plaintext_refusal`]).
//!
//! - **Record layer**: once the handshake is over, rustls hands the traffic
//!   keys over (secret extraction, the interface it offers for kTLS; the
//!   traffic secrets come from a key log of this connection alone, for key
//!   updates) and ferry protects the records itself in its own buffers, with
//!   fewer copies (`records.rs`; `conn.rs` runs it). `handshake` gives
//!   rustls whole records and none past the handshake, so nothing of the
//!   session is left inside rustls when it hands over.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::{MoveError, Result};
use crate::records::{Records, SecretLog, Side};

/// The label of the TLS exporter whose output binds the token proofs to the
/// TLS session (RFC 8446 section 7.5; 32 bytes, no context). Do not modify.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry-v1-auth-binding";

/// The identity directory inside a datastore when `--tls-dir` is not given.
pub const DEFAULT_TLS_DIR: &str = ".tls";

const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// The crypto provider of every ferry TLS session: aws-lc-rs, its TLS 1.3 suites
/// with AES-128-GCM first (fewer rounds than AES-256, both use AES-NI).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// SHA-256 of a certificate's DER: what a source pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_der);
        let mut b = [0u8; 32];
        b.copy_from_slice(d.as_ref());
        Fingerprint(b)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = MoveError;

    /// `sha256:` and 64 hex digits (either case; `:` between byte pairs allowed, as
    /// `openssl x509 -fingerprint` prints them).
    fn from_str(s: &str) -> Result<Fingerprint> {
        let bad = || {
            MoveError::Usage(format!(
                "fingerprint {s:?}: expected sha256: and 64 hex digits, as `ferry fingerprint` prints it"
            ))
        };
        let t = s.trim();
        let hex = t.strip_prefix("sha256:").or_else(|| t.strip_prefix("SHA256:")).ok_or_else(bad)?;
        let digits: Vec<u8> = hex.bytes().filter(|&c| c != b':').collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut b = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| bad())?;
            b[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(b))
    }
}

/// The server's key and self-signed certificate.
#[derive(Clone)]
pub struct ServerIdentity {
    cert: CertificateDer<'static>,
    key: Arc<PrivateKeyDer<'static>>,
    /// Where it is kept.
    pub dir: PathBuf,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity").field("dir", &self.dir).field("fingerprint", &self.fingerprint()).finish()
    }
}

impl ServerIdentity {
    /// Load the identity kept in `dir`, or make one there: an ECDSA P-256 key
    /// and a self-signed certificate, `dir` created with mode 0700 and both files
    /// written with mode 0600 (to temporary names, then renamed: the key first,
    /// so a certificate on disk always has its key beside it).
    pub fn load_or_create(dir: &Path) -> Result<ServerIdentity> {
        if dir.join(CERT_FILE).exists() {
            return ServerIdentity::load(dir);
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| MoveError::file("creating TLS directory", dir, e))?;
        let name = format!("ferry {}", ferry_io::sys::hostname());
        let mut params = rcgen::CertificateParams::new(vec!["ferry".to_string()])
            .map_err(|e| MoveError::Internal(format!("making a TLS certificate: {e}")))?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        // Valid for a century: the pin, not the date, is the trust.
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| MoveError::Internal(format!("making a TLS key: {e}")))?;
        let cert =
            params.self_signed(&key).map_err(|e| MoveError::Internal(format!("making a TLS certificate: {e}")))?;
        write_private(dir, KEY_FILE, key.serialize_pem().as_bytes())?;
        write_private(dir, CERT_FILE, cert.pem().as_bytes())?;
        ServerIdentity::load(dir)
    }

    /// Load the identity kept in `dir`; a clear error when there is none.
    pub fn load(dir: &Path) -> Result<ServerIdentity> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        if !cert_path.exists() {
            return Err(MoveError::Usage(format!(
                "no TLS identity in {} (no {CERT_FILE}): `ferry serve` makes one on its first start",
                dir.display()
            )));
        }
        let pem = fs::read(&cert_path).map_err(|e| MoveError::file("reading TLS certificate", &cert_path, e))?;
        let cert = CertificateDer::from_pem_slice(&pem)
            .map_err(|e| MoveError::Usage(format!("{} does not hold a PEM certificate: {e}", cert_path.display())))?;
        let pem = fs::read(&key_path).map_err(|e| MoveError::file("reading TLS key", &key_path, e))?;
        let key = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| MoveError::Usage(format!("{} does not hold a PEM private key: {e}", key_path.display())))?;
        Ok(ServerIdentity { cert, key: Arc::new(key), dir: dir.to_path_buf() })
    }

    /// The certificate's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// The rustls configuration of a server with this identity.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| MoveError::Internal(format!("TLS configuration: {e}")))?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| MoveError::Usage(format!("TLS identity in {} is not usable: {e}", self.dir.display())))?;
        cfg.send_tls13_tickets = 0;
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(cfg))
    }
}

/// Write `name` in `dir` with mode 0600, durably: a temporary file renamed over it.
fn write_private(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| MoveError::file("creating", &tmp, e))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| MoveError::file("writing", &tmp, e))?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(|e| MoveError::file("renaming", &path, e))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// How a server speaks to its sources.
#[derive(Clone, Debug)]
pub enum ServerTransport {
    /// TLS 1.3 with this identity (the default of `ferry serve`).
    Tls(Arc<rustls::ServerConfig>),
    /// Plaintext: `--insecure-plaintext`, for benchmarks on a trusted link.
    Plaintext,
}

/// How the source decides to trust a target's certificate.
#[derive(Clone, Debug, Default)]
pub struct ClientTrust {
    /// Plaintext (`--insecure-plaintext`): no TLS at all.
    pub insecure_plaintext: bool,
    /// `--fingerprint`: the one certificate to accept.
    pub fingerprint: Option<Fingerprint>,
    /// The known-targets file (default [`KnownTargets::default_path`]).
    pub known_targets: Option<PathBuf>,
    /// `--trust-new`: a target without an entry in the file is trusted and added.
    pub trust_new: bool,
}

/// The source's pins: a per-user file of `HOST:PORT sha256:HEX` lines.
///
/// Path: `$XDG_CONFIG_HOME/ferry/known-targets`, else
/// `$HOME/.config/ferry/known-targets`. `#` starts a comment. `--trust-new`
/// adds a line for a target that has none (trust on first use, only when
/// asked); an existing line is never replaced: a changed identity is a
/// mismatch until someone edits the file.
#[derive(Debug, Clone)]
pub struct KnownTargets {
    /// The file.
    pub path: PathBuf,
}

impl KnownTargets {
    /// `$XDG_CONFIG_HOME/ferry/known-targets`, else `$HOME/.config/ferry/known-targets`.
    pub fn default_path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("ferry").join("known-targets"))
    }

    /// The pin of `target` (`HOST:PORT`), if the file has one.
    pub fn lookup(&self, target: &str) -> Result<Option<Fingerprint>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(MoveError::file("reading known-targets file", &self.path, e)),
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(host), Some(fp), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(MoveError::Usage(format!(
                    "{} line {}: expected `HOST:PORT sha256:HEX`",
                    self.path.display(),
                    i + 1
                )));
            };
            if host == target {
                return fp
                    .parse::<Fingerprint>()
                    .map(Some)
                    .map_err(|e| MoveError::Usage(format!("{} line {}: {}", self.path.display(), i + 1, e.detail())));
            }
        }
        Ok(None)
    }

    /// Add `target fp` (the directory is made when absent; the file is rewritten
    /// through a temporary file and a rename).
    pub fn add(&self, target: &str, fp: &Fingerprint) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| MoveError::file("creating", dir, e))?;
        let mut text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                "# ferry known targets: HOST:PORT and the fingerprint of its TLS certificate\n".to_string()
            }
            Err(e) => return Err(MoveError::file("reading known-targets file", &self.path, e)),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{target} {fp}\n"));
        let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("known-targets");
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| MoveError::file("writing known-targets file", &self.path, e))
    }
}

/// Where the pin of a session comes from, for messages.
#[derive(Debug, Clone)]
enum Pin {
    /// `--fingerprint`.
    Flag(Fingerprint),
    /// A line of the known-targets file.
    File(Fingerprint, PathBuf),
    /// No pin, and `--trust-new`: store what the target presents.
    TrustNew(KnownTargets),
    /// No pin: refuse, naming what the target presents.
    None(Option<PathBuf>),
}

/// Accepts exactly the pinned certificate; records what the server presented.
#[derive(Debug)]
pub struct PinVerifier {
    expected: Option<Fingerprint>,
    /// Without `expected`: accept any certificate (`--trust-new`), or refuse it.
    accept_any: bool,
    presented: Mutex<Option<Fingerprint>>,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    /// A verifier that accepts the certificate with fingerprint `expected`; with
    /// `None`, any certificate if `accept_any` (`--trust-new`), else none. The
    /// fingerprint presented is recorded either way.
    pub fn new(expected: Option<Fingerprint>, accept_any: bool) -> PinVerifier {
        PinVerifier { expected, accept_any, presented: Mutex::new(None), provider: provider() }
    }

    /// The fingerprint of the certificate the server presented, once it has.
    pub fn presented(&self) -> Option<Fingerprint> {
        *self.presented.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
        match self.expected {
            Some(e) if e == fp => Ok(ServerCertVerified::assertion()),
            None if self.accept_any => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration offers TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The result of a TLS handshake: the record protection of both directions
/// (rustls' connection handed over, see `records.rs`), and the exporter value
/// the token proofs are bound to.
pub struct Established {
    /// Both directions' keys.
    pub records: Records,
    /// Bytes the handshake read past its end: the peer's first records.
    pub leftover: Vec<u8>,
    /// [`EXPORTER_LABEL`]'s 32 bytes.
    pub binding: [u8; 32],
}

impl fmt::Debug for Established {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Established(..)")
    }
}

/// The source's side: run the TLS handshake on `sock` to `target` (`HOST:PORT`)
/// and check the certificate against `trust`. A target without a pin fails with
/// [`MoveError::UnknownTarget`], one with another certificate with
/// [`MoveError::FingerprintMismatch`]; in both cases the handshake stops before
/// any ferry frame is sent.
pub fn connect(sock: &mut TcpStream, target: &str, trust: &ClientTrust) -> Result<Established> {
    let pin = match (trust.fingerprint, &trust.known_targets) {
        (Some(fp), _) => Pin::Flag(fp),
        (None, Some(path)) => {
            let kt = KnownTargets { path: path.clone() };
            match kt.lookup(target)? {
                Some(fp) => Pin::File(fp, path.clone()),
                None if trust.trust_new => Pin::TrustNew(kt),
                None => Pin::None(Some(path.clone())),
            }
        }
        (None, None) => Pin::None(None),
    };
    let expected = match &pin {
        Pin::Flag(fp) | Pin::File(fp, _) => Some(*fp),
        Pin::TrustNew(_) | Pin::None(_) => None,
    };
    let verifier = Arc::new(PinVerifier::new(expected, matches!(pin, Pin::TrustNew(_))));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| MoveError::Internal(format!("TLS configuration: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_sni = false;
    // The record layer after the handshake is ferry's (records.rs): it takes
    // the keys over, and the traffic secrets for key updates.
    let log = Arc::new(SecretLog::default());
    cfg.enable_secret_extraction = true;
    cfg.key_log = log.clone();
    let host = target.rsplit_once(':').map(|(h, _)| h).unwrap_or(target).trim_matches(['[', ']']);
    let name =
        ServerName::try_from(host.to_string()).unwrap_or_else(|_| ServerName::try_from("ferry").expect("a valid name"));
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name)
        .map_err(|e| MoveError::Internal(format!("TLS client: {e}")))?;
    // A target without a pin: stop at the certificate, naming it.
    if let Pin::None(file) = &pin {
        let r = handshake(sock, &mut conn, target, true, Instant::now() + TLS_HANDSHAKE_TIMEOUT);
        let presented = verifier.presented();
        return match (r, presented) {
            (_, Some(fp)) => Err(MoveError::UnknownTarget {
                target: target.to_string(),
                presented: fp.to_string(),
                file: file.clone(),
            }),
            (Err(e), None) => Err(e),
            (Ok(_), None) => Err(MoveError::Internal("TLS handshake finished without a certificate".into())),
        };
    }
    let leftover = match handshake(sock, &mut conn, target, true, Instant::now() + TLS_HANDSHAKE_TIMEOUT) {
        Ok(l) => l,
        Err(e) => {
            return Err(match (verifier.presented(), expected) {
                (Some(p), Some(x)) if p != x => MoveError::FingerprintMismatch {
                    target: target.to_string(),
                    expected: x.to_string(),
                    presented: p.to_string(),
                    pinned_by: match &pin {
                        Pin::File(_, path) => format!("the known-targets file {}", path.display()),
                        _ => "--fingerprint".to_string(),
                    },
                },
                _ => e,
            });
        }
    };
    if let Pin::TrustNew(kt) = &pin {
        let fp = verifier.presented().ok_or_else(|| MoveError::Internal("no certificate presented".into()))?;
        kt.add(target, &fp)?;
    }
    established(rustls::Connection::Client(conn), Side::Client, &log, leftover)
}

/// The target's side: the TLS handshake of a source on `sock`.
/// The whole handshake must be over by `deadline` (`ferry serve --handshake-timeout` after
/// the connection was accepted), however the source spreads its bytes.
pub fn accept(
    sock: &mut TcpStream,
    peer: &str,
    cfg: &Arc<rustls::ServerConfig>,
    deadline: Instant,
) -> Result<Established> {
    // This connection's own configuration: its key log catches its secrets alone.
    let log = Arc::new(SecretLog::default());
    let mut cfg = (**cfg).clone();
    cfg.enable_secret_extraction = true;
    cfg.key_log = log.clone();
    let mut conn =
        rustls::ServerConnection::new(Arc::new(cfg)).map_err(|e| MoveError::Internal(format!("TLS server: {e}")))?;
    let leftover = handshake(sock, &mut conn, peer, false, deadline)?;
    established(rustls::Connection::Server(conn), Side::Server, &log, leftover)
}

/// The binding, then the record layer taken over from rustls.
fn established(conn: rustls::Connection, side: Side, log: &SecretLog, leftover: Vec<u8>) -> Result<Established> {
    let binding = export_binding(&conn)?;
    let records = Records::take_over(conn, side, log)
        .map_err(|e| MoveError::Internal(format!("TLS: taking over the record layer: {e}")))?;
    Ok(Established { records, leftover, binding })
}

fn export_binding(conn: &rustls::Connection) -> Result<[u8; 32]> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| MoveError::Internal(format!("TLS exporter: {e}")))
}

/// Time a source allows the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = crate::conn::HANDSHAKE_TIMEOUT;

/// Drive a TLS handshake on a blocking socket to its end. The client checks the
/// first bytes it receives: a ferry frame there is a plaintext target's refusal.
/// rustls is given whole records, one at a time, and none after the handshake
/// is over: what the peer sent after it (its first application records) is
/// returned, for the record layer that takes over (`records.rs`).
fn handshake<S: rustls::SideData>(
    sock: &mut TcpStream,
    conn: &mut rustls::ConnectionCommon<S>,
    peer: &str,
    client: bool,
    deadline: Instant,
) -> Result<Vec<u8>> {
    let net = |e: io::Error| MoveError::Net { peer: peer.to_string(), source: e };
    let timed_out = || net(io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake did not finish in time"));
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let _ = sock.set_read_timeout(Some(left));
    let _ = sock.set_write_timeout(Some(left));
    // Received bytes not given to rustls yet: at most one record beyond a read.
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut chunk = vec![0u8; 16 << 10];
    let mut first = true;
    loop {
        while conn.wants_write() {
            conn.write_tls(sock).map_err(net)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        // A whole record at the front: to rustls.
        if buf.len() >= 5 {
            let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
            // A header no TLS peer sends fails at once, not after waiting for a record
            // that never ends (a peer that is not a ferry target, or not TLS).
            if !(20..=23).contains(&buf[0]) || buf[1] != 3 || len > (1 << 14) + 2048 {
                let source = if (20..=23).contains(&buf[0]) && buf[1] == 3 {
                    rustls::InvalidMessage::MessageTooLarge
                } else {
                    rustls::InvalidMessage::InvalidContentType
                };
                return Err(MoveError::Tls { peer: peer.to_string(), source: source.into() });
            }
            let end = 5 + len;
            if buf.len() >= end {
                let mut rd = &buf[..end];
                while !rd.is_empty() {
                    conn.read_tls(&mut rd).map_err(net)?;
                    if let Err(e) = conn.process_new_packets() {
                        // Tell the peer why (the alert rustls queued), then fail.
                        let _ = conn.write_tls(sock);
                        return Err(MoveError::Tls { peer: peer.to_string(), source: e });
                    }
                }
                buf.drain(..end);
                continue;
            }
        }
        // Each read and write waits only for what is left before the deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let _ = sock.set_read_timeout(Some(left));
        let _ = sock.set_write_timeout(Some(left));
        let n = match sock.read(&mut chunk) {
            Ok(0) => {
                return Err(MoveError::PeerGone {
                    peer: peer.to_string(),
                    side: if client { "target" } else { "source" },
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                return Err(timed_out())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(net(e)),
        };
        if client && first && chunk[..n].starts_with(&[0xFE]) {
            return Err(plaintext_answer(sock, &chunk[..n], peer));
        }
        first = false;
        buf.extend_from_slice(&chunk[..n]);
    }
    let _ = sock.set_read_timeout(None);
    let _ = sock.set_write_timeout(None);
    Ok(buf)
}

/// A TLS source met a plaintext target: it answered with a ferry frame (its
/// refusal, see [`plaintext_refusal`]). Read the frame and report it.
fn plaintext_answer(sock: &mut TcpStream, first: &[u8], peer: &str) -> MoveError {
    let mut d = ferry_wire::Deframer::new();
    d.set_max_body_len(ferry_wire::MAX_HANDSHAKE_BODY_LEN);
    d.buffer_mut().extend_from_slice(first);
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match d.next_frame() {
            Ok(Some(ferry_wire::Frame::Error(e))) => {
                return MoveError::Wire {
                    peer: peer.to_string(),
                    source: ferry_wire::WireError::Remote { code: e.code, message: e.message },
                }
            }
            Ok(Some(_)) | Err(_) => break,
            Ok(None) => match sock.read(&mut buf) {
                Ok(n) if n > 0 => d.buffer_mut().extend_from_slice(&buf[..n]),
                _ => break,
            },
        }
    }
    MoveError::Usage(format!(
        "{peer} answered in plaintext, not TLS: is it a `ferry serve --insecure-plaintext`? \
         Use --insecure-plaintext on both ends, or neither"
    ))
}

/// What the first bytes a server receives say the source speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// A TLS record (handshake content type 0x16).
    Tls,
    /// A ferry frame (magic `FE 52`).
    Plaintext,
    /// Something else (or nothing within the timeout).
    Other,
}

/// Look at (without consuming) the first bytes a source sent.
pub fn peek_first_bytes(sock: &TcpStream) -> FirstBytes {
    let _ = sock.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT));
    let mut b = [0u8; 2];
    let r = loop {
        match sock.peek(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r,
        }
    };
    let _ = sock.set_read_timeout(None);
    match r {
        Ok(n) if n >= 1 && b[0] == 0x16 => FirstBytes::Tls,
        Ok(n) if n >= 1 && b[0] == 0xFE => FirstBytes::Plaintext,
        _ => FirstBytes::Other,
    }
}

/// A plaintext ferry Error frame a server sends to a source that spoke the
/// other kind of transport (`server_tls`: whether the server speaks TLS), and
/// the message it carries.
pub fn plaintext_refusal(server_tls: bool) -> (Vec<u8>, String) {
    let message = if server_tls {
        "this target speaks TLS and the source connected in plaintext: drop --insecure-plaintext at the source \
         (or start the target with --insecure-plaintext too)"
    } else {
        "this target runs with --insecure-plaintext and the source spoke TLS: add --insecure-plaintext at the \
         source, or restart the target without it (recommended)"
    };
    let mut b = bytes::BytesMut::new();
    ferry_wire::Frame::Error(ferry_wire::ErrorFrame {
        code: ferry_wire::ErrorCode::BadRequest,
        message: message.into(),
    })
    .encode(&mut b);
    (b.to_vec(), message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_and_print() {
        let fp = Fingerprint::of(b"certificate");
        let s = fp.to_string();
        assert!(s.starts_with("sha256:") && s.len() == 7 + 64, "{s}");
        assert_eq!(s.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(s.to_uppercase().replace("SHA256:", "sha256:").parse::<Fingerprint>().unwrap(), fp);
        for bad in ["", "sha256:", "md5:00", &s[..s.len() - 1], &format!("{s}0"), &s.replace("sha256:", "")] {
            let e = bad.parse::<Fingerprint>().unwrap_err();
            assert!(matches!(e, MoveError::Usage(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn identity_is_made_once_with_private_modes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tls");
        let a = ServerIdentity::load_or_create(&dir).unwrap();
        let b = ServerIdentity::load_or_create(&dir).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint(), "the second start loads the first identity");
        assert_eq!(ServerIdentity::load(&dir).unwrap().fingerprint(), a.fingerprint());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CERT_FILE)), 0o600);
        let pem = fs::read(dir.join(CERT_FILE)).unwrap();
        assert_eq!(Fingerprint::of(&CertificateDer::from_pem_slice(&pem).unwrap()), a.fingerprint());
        let other = ServerIdentity::load_or_create(&d.path().join("other")).unwrap();
        assert_ne!(other.fingerprint(), a.fingerprint());
        let e = ServerIdentity::load(&d.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("no TLS identity"), "{e}");
    }

    #[test]
    fn known_targets_add_and_look_up() {
        let d = tempfile::tempdir().unwrap();
        let kt = KnownTargets { path: d.path().join("cfg/ferry/known-targets") };
        assert_eq!(kt.lookup("h:1").unwrap(), None);
        let (a, b) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        kt.add("h:1", &a).unwrap();
        kt.add("h:2", &b).unwrap();
        assert_eq!(kt.lookup("h:1").unwrap(), Some(a));
        assert_eq!(kt.lookup("h:2").unwrap(), Some(b));
        assert_eq!(kt.lookup("h:3").unwrap(), None);
        fs::write(&kt.path, "h:1 nonsense\n").unwrap();
        assert!(kt.lookup("h:1").unwrap_err().to_string().contains("line 1"));
    }
}
