//! Reaching a target and running jobs against it: a `ferry serve` over TCP, or
//! a datastore directory served in-process over a socketpair with the same
//! protocol code; one attempt, or attempts that reconnect and resume until
//! `--retry-for` runs out. A remote target is reached over TLS 1.3 and trusted
//! by its pinned certificate fingerprint (`tls.rs`), unless `--insecure-plaintext`.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_wire::Authenticator;

use crate::access::{Access, AccessList};
use crate::error::{MoveError, Result};
use crate::source::{JobEvent, JobReport, Observer, ReplicaInfo, ReplicateConfig};
use crate::target::{ServeConfig, SessionReport};
use crate::tls::ClientTrust;
use crate::{auth, conn, source, target};

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
                return Err(MoveError::Usage(format!("target {s:?}: expected ferry://HOST:PORT")));
            }
            return Ok(TargetSpec::Remote(hostport.to_string()));
        }
        if s.contains("://") {
            return Err(MoveError::Usage(format!("target {s:?}: use ferry://HOST:PORT or a directory")));
        }
        Ok(TargetSpec::Local(PathBuf::from(s)))
    }
}

/// A connection to a target, and for a local target the thread serving it.
pub(crate) struct Connected {
    /// The socket, and its TLS session for a remote target.
    pub(crate) sock: conn::Link,
    /// Peer description for messages.
    pub(crate) peer: String,
    /// The authenticator both ends use.
    pub(crate) auth: Arc<dyn Authenticator>,
    /// The in-process target (local targets), joined after the job.
    pub(crate) local: Option<JoinHandle<target::SessionReport>>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected").field("peer", &self.peer).field("local", &self.local.is_some()).finish()
    }
}

/// Connect to a target: TCP and TLS for a remote one (its certificate checked
/// against `trust`; authenticated with `token`), an in-process target over a
/// socketpair for a local one. With `create` false (plans), a local datastore
/// is never created.
pub(crate) fn connect(
    spec: &TargetSpec,
    token: Option<&std::path::Path>,
    trust: &ClientTrust,
    serve: &target::ServeConfig,
    create: bool,
) -> Result<Connected> {
    match spec {
        TargetSpec::Remote(addr) => {
            let token = token.ok_or_else(|| {
                MoveError::Usage("a remote target needs --token-file (the same token the server uses)".into())
            })?;
            let auth: Arc<dyn Authenticator> = Arc::new(auth::TokenAuth::from_file(token)?);
            let sock = open_link(addr, trust)?;
            Ok(Connected { sock, peer: addr.clone(), auth, local: None })
        }
        TargetSpec::Local(dir) => {
            let ds = if create {
                ferry_datastore::Datastore::open_or_create(dir)?
            } else if dir.join("ferry-datastore.json").exists() {
                ferry_datastore::Datastore::open(dir)?
            } else {
                ferry_datastore::Datastore::at(dir)
            };
            // The datastore is the caller's own: one ephemeral admin token, no protection.
            let token = auth::TokenAuth::ephemeral();
            let access = Arc::new(Access::fixed(AccessList::single_admin("local", &token)));
            let auth: Arc<dyn Authenticator> = Arc::new(token);
            let (a, b) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| MoveError::Net { peer: "local target".into(), source: e })?;
            let serve = serve.clone();
            let peer = format!("local datastore {}", dir.display());
            let handle = std::thread::Builder::new()
                .name("ferry-local-target".into())
                .spawn(move || {
                    target::serve_connection(conn::Sock::Unix(b).into(), "local source", &ds, &access, &serve)
                })
                .map_err(|e| MoveError::Net { peer: peer.clone(), source: e })?;
            Ok(Connected { sock: conn::Sock::Unix(a).into(), peer, auth, local: Some(handle) })
        }
    }
}

/// A TCP connection to a remote target, under TLS unless `--insecure-plaintext`.
fn open_link(addr: &str, trust: &ClientTrust) -> Result<conn::Link> {
    let addrs: Vec<_> =
        addr.to_socket_addrs().map_err(|e| MoveError::Net { peer: addr.to_string(), source: e })?.collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, std::time::Duration::from_secs(10)) {
            Ok(mut s) => {
                let _ = s.set_nodelay(true);
                if trust.insecure_plaintext {
                    return Ok(conn::Link::plain(conn::Sock::Tcp(s)));
                }
                let tls = crate::tls::connect(&mut s, addr, trust)?;
                return Ok(conn::Link::tls(s, tls));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(MoveError::Net { peer: addr.to_string(), source: last.unwrap_or_else(|| std::io::Error::other("no address")) })
}

/// Connections a job to a remote target uses: `--streams N`, or for `auto` the rule of
/// [`source::auto_streams`] from the first connection's round-trip time (the kernel's
/// smoothed RTT, measured over the TLS and ferry handshakes).
/// `auto` may add connections during the run, up to [`source::AUTO_MAX`], when they
/// are window-limited ([`source::grow`]).
fn stream_plan(cfg: &ReplicateConfig, link: &conn::Link) -> source::StreamPlan {
    match cfg.streams {
        source::Streams::Fixed(n) => source::StreamPlan::fixed(n),
        source::Streams::Auto => {
            let rtt = match link.sock() {
                conn::Sock::Tcp(s) => ferry_io::sys::tcp_rtt(s).unwrap_or(Duration::ZERO),
                conn::Sock::Unix(_) => Duration::ZERO,
            };
            let mut plan = source::StreamPlan::auto(rtt, source::kernel_window());
            if let Some(every) = cfg.streams_grow_every {
                plan.cap = source::AUTO_MAX;
                plan.grow_every = Some(every);
            }
            plan
        }
    }
}

/// A target and how to reach it: what every job against it needs.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where it is.
    pub spec: TargetSpec,
    /// Token file for a remote target.
    pub token: Option<PathBuf>,
    /// How a remote target's TLS certificate is trusted (or `--insecure-plaintext`).
    pub trust: ClientTrust,
    /// Settings of an in-process target (local datastores).
    pub serve: ServeConfig,
}

impl Target {
    /// One attempt at `cfg`: connect, run the job, and for a local target
    /// join the in-process session. A plan never creates a local datastore.
    pub fn run(&self, cfg: &ReplicateConfig, obs: &dyn Observer) -> Result<JobReport> {
        let c = connect(&self.spec, self.token.as_deref(), &self.trust, &self.serve, !cfg.plan_only)?;
        // Streams are for the network: a local target is one socketpair.
        let r = match &self.spec {
            TargetSpec::Remote(addr) if !cfg.plan_only => {
                let plan = stream_plan(cfg, &c.sock);
                let trust = self.trust.clone();
                let addr = addr.clone();
                let dial: Arc<source::Dial> = Arc::new(move || open_link(&addr, &trust).map(|l| (l, addr.clone())));
                source::replicate_striped(c.sock, &c.peer, c.auth, cfg, obs, Some((plan, dial)))
            }
            _ => source::replicate(c.sock, &c.peer, c.auth, cfg, obs),
        };
        let local = c.local.and_then(|h| h.join().ok());
        r.map_err(|e| prefer_local(e, local))
    }

    /// Run `cfg`, reconnecting with backoff (1 s doubling to 60 s) on
    /// transient failures until `retry_for` has passed; each new session
    /// resumes where the last one stopped. A replica (or server) busy with
    /// another session is waited for the same way: its holder may be a stalled
    /// source that the target lets go after its idle timeout. Each retry is
    /// announced as a notice.
    pub fn run_with_retry(&self, cfg: &ReplicateConfig, obs: &dyn Observer, retry_for: Duration) -> Result<JobReport> {
        let deadline = Instant::now() + retry_for;
        let mut delay = Duration::from_secs(1);
        loop {
            match self.run(cfg, obs) {
                Err(e) if e.is_busy() && Instant::now() + delay < deadline => {
                    obs.event(&JobEvent::Notice(format!(
                        "{}; trying again in {} s (giving up after --retry-for {})",
                        e.detail(),
                        delay.as_secs(),
                        format_duration(retry_for)
                    )));
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
                Err(e) if e.is_transient() && Instant::now() + delay < deadline => {
                    obs.event(&JobEvent::Notice(format!(
                        "{}; reconnecting in {} s (the session resumes where it stopped; giving up after --retry-for {})",
                        e.detail(),
                        delay.as_secs(),
                        format_duration(retry_for)
                    )));
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
                r => return r,
            }
        }
    }

    /// What the target says about `replica`, through a plan-only session
    /// (nothing is created or changed there).
    pub fn replica_info(&self, replica: &str) -> Result<ReplicaInfo> {
        let c = connect(&self.spec, self.token.as_deref(), &self.trust, &self.serve, false)?;
        let r = source::replica_info(c.sock, &c.peer, c.auth, replica);
        let local = c.local.and_then(|h| h.join().ok());
        r.map_err(|e| prefer_local(e, local))
    }
}

/// A duration as the CLI takes it: 90s, 30m, 2h.
fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A local target's own error explains more than the source's "peer gone".
fn prefer_local(e: MoveError, local: Option<SessionReport>) -> MoveError {
    match (e, local.and_then(|r| r.failure)) {
        (MoveError::PeerGone { .. } | MoveError::Net { .. }, Some(t)) => t,
        (e, _) => e,
    }
}
