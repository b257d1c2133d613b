//! ferry-mover: the IO side of ferry.
//!
//! - [`backend`]: io_uring and portable pread/pwrite behind [`backend::IoBackend`],
//!   chosen at run time by probing.
//! - [`source`]: the source pipeline (reader, workers, sender).
//! - [`target`]: the target session (receiver, verify workers, writer) and the datastore.
//! - [`conn`]: sockets, the wire session, handshake and authentication ([`auth`]).
//! - [`export`]: raw images out of a datastore.
//! - [`map_cache`]: the source's cache of target digest maps.
//! - [`backup`]: replica from backup: repositories of restore points (ferry datastores, qcow2 chains).
//!
//! A chunk travels reader -> worker -> socket with one copy at most (the
//! kernel's), and socket -> verify worker -> writer with one copy into an
//! aligned buffer (decompression writes straight into it). Memory is bounded
//! by fixed buffer pools on both sides whatever the disk size.
#![warn(missing_docs)]

pub mod auth;
pub mod backend;
pub mod backup;
pub mod buf;
pub mod conn;
pub mod digests;
pub mod disk;
pub mod error;
pub mod export;
pub mod map_cache;
pub mod nbd;
pub mod source;
pub mod stats;
pub mod target;

pub use error::{MoveError, Result};

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use ferry_wire::Authenticator;

/// Where a job sends its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// A `ferry serve` at HOST:PORT.
    Remote(String),
    /// A datastore directory, served in-process over the same protocol.
    Local(PathBuf),
}

impl TargetSpec {
    /// Parse `ferry://HOST:PORT` or a directory path.
    pub fn parse(s: &str) -> Result<TargetSpec> {
        if let Some(rest) = s.strip_prefix("ferry://") {
            let hostport = rest.trim_end_matches('/');
            if hostport.is_empty() || !hostport.contains(':') {
                return Err(MoveError::Config(format!("target {s:?}: expected ferry://HOST:PORT")));
            }
            return Ok(TargetSpec::Remote(hostport.to_string()));
        }
        if s.contains("://") {
            return Err(MoveError::Config(format!("target {s:?}: use ferry://HOST:PORT or a directory")));
        }
        Ok(TargetSpec::Local(PathBuf::from(s)))
    }
}

/// A connection to a target, and for a local target the thread serving it.
pub struct Connected {
    /// The socket.
    pub sock: conn::Sock,
    /// Peer description for messages.
    pub peer: String,
    /// The authenticator both ends use.
    pub auth: Arc<dyn Authenticator>,
    /// The in-process target (local targets), joined after the job.
    pub local: Option<JoinHandle<target::SessionReport>>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected").field("peer", &self.peer).field("local", &self.local.is_some()).finish()
    }
}

/// Connect to a target: TCP for a remote one (authenticated with `token`),
/// an in-process target over a socketpair for a local one.
/// With `create` false (plans), a local datastore is never created.
pub fn connect(
    spec: &TargetSpec,
    token: Option<&std::path::Path>,
    serve: &target::ServeConfig,
    create: bool,
) -> Result<Connected> {
    match spec {
        TargetSpec::Remote(addr) => {
            let token = token.ok_or_else(|| {
                MoveError::Config("a remote target needs --token-file (the same token the server uses)".into())
            })?;
            let auth: Arc<dyn Authenticator> = Arc::new(auth::TokenAuth::from_file(token)?);
            let addrs: Vec<_> =
                addr.to_socket_addrs().map_err(|e| MoveError::Net { peer: addr.clone(), source: e })?.collect();
            let mut last = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, std::time::Duration::from_secs(10)) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(Connected { sock: conn::Sock::Tcp(s), peer: addr.clone(), auth, local: None });
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(MoveError::Net {
                peer: addr.clone(),
                source: last.unwrap_or_else(|| std::io::Error::other("no address")),
            })
        }
        TargetSpec::Local(dir) => {
            let ds = if create {
                target::datastore::Datastore::open_or_create(dir)?
            } else if dir.join("ferry-datastore.json").exists() {
                target::datastore::Datastore::open(dir)?
            } else {
                target::datastore::Datastore::at(dir)
            };
            let auth: Arc<dyn Authenticator> = Arc::new(auth::TokenAuth::ephemeral());
            let (a, b) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| MoveError::Net { peer: "local target".into(), source: e })?;
            let (auth2, serve) = (auth.clone(), serve.clone());
            let peer = format!("local datastore {}", dir.display());
            let handle = std::thread::Builder::new()
                .name("ferry-local-target".into())
                .spawn(move || target::serve_connection(conn::Sock::Unix(b), "local source", &ds, auth2, &serve))
                .map_err(|e| MoveError::Net { peer: peer.clone(), source: e })?;
            Ok(Connected { sock: conn::Sock::Unix(a), peer, auth, local: Some(handle) })
        }
    }
}
