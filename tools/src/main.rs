//! ferry: the command-line interface.
//!
//! Raw flags (clap) are validated into the libraries' config types before
//! anything runs; the libraries do the work (ferry-replicate's `Target` runs
//! and retries jobs and serves, ferry-backup replicates backups); this crate
//! parses, validates, calls and prints. Exit codes come from the class of an
//! error (`exit_code_of`): 0 success, 1 failed, 2 usage or configuration, 3
//! finished with a warning, 4 replica busy. With `--json`, stdout carries
//! NDJSON events ending in one `summary` event.

// The doc comments of the argument structs are clap's --help text, where
// `nbd://HOST[:PORT]/EXPORT` is plain text, not an intra-doc link.
#![allow(rustdoc::broken_intra_doc_links)]
#![forbid(unsafe_code)]

mod backup;
mod demo;
mod report;
mod time;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use ferry_datastore::points;
use ferry_datastore::points::Protection;
use ferry_datastore::Datastore;
use ferry_io::BackendChoice;
use ferry_io::ErrorClass;
use ferry_replicate::access::{Access, AccessRole, AccessSource, Grant};
use ferry_replicate::source::{ChangeSource, CompressPolicy, DiskSpec, ReplicateConfig};
use ferry_replicate::target::ServeConfig;
use ferry_replicate::throttle;
use ferry_replicate::tls::{ClientTrust, ServerTransport};
use ferry_replicate::{MoveError, Target, TargetSpec};
use ferry_wire::Mode;

use report::{JsonObserver, Status, TextObserver};

/// ferry: block-level replication of virtual-machine disks for disaster recovery.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve a datastore to sources over TCP.
    Serve(Box<ServeArgs>),
    /// Replicate disks to a target (a datastore directory or ferry://HOST:PORT).
    Replicate(Box<ReplicateArgs>),
    /// What `replicate` with the same options would move, per disk: reads, hashes and
    /// compresses like a run, sends nothing, changes nothing at the target.
    Plan(Box<ReplicateArgs>),
    /// Restore points of a replica.
    Points {
        #[command(subcommand)]
        cmd: PointsCmd,
    },
    /// Print the TLS fingerprint of a `ferry serve` identity (without starting a server),
    /// for the sources to pin with --fingerprint.
    Fingerprint(FingerprintArgs),
    /// Authentication tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// A first run: make a sample disk, replicate it through the real protocol, verify, print figures.
    Demo(demo::DemoArgs),
    /// The benchmark harness: ferry against rsync, zstd | nc, qemu-img convert, cp (see bench/README.md).
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments of the harness (`ferry bench --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:7420.
    #[arg(long)]
    listen: String,
    /// Datastore directory (created when absent).
    #[arg(long)]
    datastore: PathBuf,
    /// File holding one token (see `ferry token new`): an admin token for every replica.
    #[arg(long, conflicts_with = "access")]
    token_file: Option<PathBuf>,
    /// Access file: one line per token a source may use, NAME ROLE REPLICAS KEY, as
    /// `ferry token new` prints it (roles read, replicate, admin; REPLICAS a glob). Mode 0600.
    /// SIGHUP reloads it: a removed or changed token's running sessions end.
    #[arg(long, value_name = "FILE")]
    access: Option<PathBuf>,
    /// Restore points every replica keeps at least, whatever retention a remote client asks.
    #[arg(long, value_name = "N", default_value_t = 1)]
    keep_min: u32,
    /// No remote client, whatever its role, can remove a restore point younger than this
    /// (by the time this server completed it), e.g. 7d, 24h; 0: no such period.
    #[arg(long, value_name = "DURATION", default_value = "0")]
    immutable: String,
    /// Directory of the server's TLS key and self-signed certificate, made on the first
    /// start (mode 0700, files 0600). Default: DATASTORE/.tls.
    #[arg(long, value_name = "DIR", conflicts_with = "insecure_plaintext")]
    tls_dir: Option<PathBuf>,
    /// No TLS: sessions travel in plaintext (anyone on the path reads and can change every
    /// byte). Only for benchmarks on a trusted link; the sources must say it too.
    #[arg(long)]
    insecure_plaintext: bool,
    #[command(flatten)]
    io: IoArgs,
    /// NDJSON events on stdout (one `session_done` per session).
    #[arg(long)]
    json: bool,
    /// Connections open at once, in their handshake or in a session; more are refused with a
    /// busy error (default 4096).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Authenticated sessions at once; more are refused with a busy error (default: 8 per core,
    /// at least 8, at most 64).
    #[arg(long)]
    max_sessions: Option<usize>,
    /// The whole handshake must be over this long after a connection is accepted.
    #[arg(long, default_value = "10s")]
    handshake_timeout: String,
    /// A session that receives nothing from its source for this long ends and releases its
    /// replica (at least 10s; sources send a keepalive every 5 s while busy).
    #[arg(long, default_value = "60s")]
    idle_timeout: String,
    /// The largest disk a source may open (K, M, G or T), checked before anything is created,
    /// resized or allocated for it.
    #[arg(long, default_value = "64T")]
    max_disk_size: String,
    #[command(flatten)]
    bwlimit: BwLimitArgs,
}

/// Bandwidth limits (`ferry_replicate::throttle`): on `replicate` the bytes it sends, on
/// `serve` the bytes all its sessions receive, shared evenly by the busy ones.
#[derive(Debug, Args, Clone)]
struct BwLimitArgs {
    /// Bandwidth limit in bytes per second: K, M, G = 1000^n, KiB, MiB, GiB = 1024^n
    /// (20M = 20,000,000 bytes/s = 160 Mbit/s); 0: unlimited (the default).
    #[arg(long, value_name = "RATE")]
    bwlimit: Option<String>,
    /// A limit for a time of the week: "TIMEFRAME RATE", e.g. "mon..fri 8:00-18:00 10M",
    /// "sat,sun 0", "22:00-24:00,0:00-6:00 0" (local time). Repeatable: the first rule that
    /// holds the time wins, else --bwlimit; a change takes effect within a second.
    #[arg(long = "bwlimit-rule", value_name = "TIMEFRAME RATE")]
    bwlimit_rule: Vec<String>,
}

#[derive(Debug, Args, Clone)]
struct IoArgs {
    /// IO backend: auto (io_uring if available), uring, portable. For `replicate` it applies to
    /// file and block-device sources; NBD sources always read through their NBD connection.
    #[arg(long, default_value = "auto")]
    io_backend: String,
    /// IO operations in flight (default: 16 for a source; for a target, 2 MiB of chunks
    /// from 16 to 64 operations: 32 with 64 KiB chunks).
    #[arg(long)]
    queue_depth: Option<usize>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Debug, Args)]
struct ReplicateArgs {
    /// Source disk: [NAME=]PATH (file or block device) or [NAME=]URI of an NBD export
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH). Repeat for several disks.
    #[arg(long = "source", required_unless_present = "from_backup")]
    sources: Vec<String>,
    /// Replicate from the restore points of a backup repository (a ferry datastore or a qcow2
    /// chain directory, see docs/BACKUP.md) instead of --source. Repeat for several repositories.
    #[arg(long = "from-backup")]
    from_backup: Vec<PathBuf>,
    /// With --from-backup: the VM whose restore points to replicate.
    #[arg(long)]
    vm: Option<String>,
    /// With --from-backup: replicate every restore point newer than the replica's latest, oldest
    /// first, each as its own replica point (default: only the latest).
    #[arg(long)]
    catch_up: bool,
    /// Target: a datastore directory, or ferry://HOST:PORT of a `ferry serve`.
    #[arg(long)]
    target: String,
    /// Replica name at the target.
    #[arg(long)]
    replica: String,
    /// Token file for a remote target.
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    trust: TrustArgs,
    /// How changes are found: auto (cbt with --cbt, digest when the target has the disk, else full),
    /// full, cbt, digest, seed (the target holds a copy placed there: only differences move).
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Changed-block list for a disk: [NAME=]PATH (VMware QueryChangedDiskAreas JSON,
    /// a JSON extent list, or `nbdinfo --map --json` of a dirty bitmap), or
    /// [NAME=]qemu-bitmap:BITMAP: the dirty bitmap BITMAP of the disk's NBD export (qemu-nbd -B BITMAP).
    #[arg(long = "cbt")]
    cbt: Vec<String>,
    /// With CBT, chunks it calls unchanged to check against the replica (0: trust CBT).
    #[arg(long, default_value_t = 200)]
    verify_samples: usize,
    /// Chunk size of a new replica (64K..4M, power of two). An existing replica keeps its own.
    /// Default: 64K, doubled until the largest disk has at most 2Mi chunks (64K up to 128 GiB).
    #[arg(long)]
    chunk_size: Option<String>,
    /// Compression: auto, none, zstd:LEVEL.
    #[arg(long, default_value = "auto")]
    compress: String,
    /// TCP connections to a remote target, one session striped over them: 1..16, or auto
    /// (more than one only when the round trip is long enough that one connection's window
    /// cannot fill the path; one on a LAN; up to 8, adding connections during the run
    /// while they are window-limited). A local target always takes one.
    #[arg(long, default_value = "auto")]
    streams: String,
    /// With --streams auto, add a connection after every this many bytes sent per
    /// connection, whatever the measurements say (up to 8; for tests).
    #[arg(long, hide = true)]
    streams_grow_every: Option<String>,
    /// Point time of the restore point (RFC 3339); default: the start of the run.
    #[arg(long)]
    point_time: Option<String>,
    /// Restore points to keep for this replica (stored in its settings).
    #[arg(long)]
    retain: Option<u32>,
    /// Keep reconnecting (with backoff) for this long when the connection fails or breaks;
    /// each new session resumes where the last stopped. 0 fails at once. E.g. 30m, 90s, 2h.
    #[arg(long, default_value = "30m")]
    retry_for: String,
    /// Read the source with O_DIRECT (bypasses the page cache; spares production caches).
    #[arg(long)]
    direct_io: bool,
    /// Directory for the source's cache of the target's digest maps (one file per target,
    /// replica and disk; used only when the target confirms it is current).
    /// Default: $XDG_CACHE_HOME/ferry/maps, else $HOME/.cache/ferry/maps.
    #[arg(long, value_name = "DIR")]
    map_cache: Option<PathBuf>,
    /// Do not cache digest maps: download the target's map on every digest-mode run.
    #[arg(long, conflicts_with = "map_cache")]
    no_map_cache: bool,
    /// Ask the target for a durable checkpoint after this much of each disk read (default 256M; also
    /// every 10 s while a disk moves; for tests).
    #[arg(long, hide = true)]
    checkpoint_every: Option<String>,
    #[command(flatten)]
    io: IoArgs,
    /// NDJSON events on stdout, ending with one `summary` event.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    bwlimit: BwLimitArgs,
}

/// How a remote target's TLS certificate is trusted.
#[derive(Debug, Args, Clone)]
pub(crate) struct TrustArgs {
    /// The remote target's TLS certificate fingerprint (sha256:HEX, as `ferry fingerprint` or
    /// the server's startup line prints it): only that certificate is accepted.
    #[arg(long, value_name = "sha256:HEX", conflicts_with = "insecure_plaintext")]
    fingerprint: Option<String>,
    /// Trust a remote target that has no pin yet and store its fingerprint in the known-targets
    /// file ($XDG_CONFIG_HOME/ferry/known-targets, else ~/.config/ferry/known-targets). A pin
    /// already there is never replaced.
    #[arg(long, conflicts_with = "insecure_plaintext")]
    trust_new: bool,
    /// No TLS (the target must run with --insecure-plaintext too): only for benchmarks on a
    /// trusted link.
    #[arg(long)]
    insecure_plaintext: bool,
}

#[derive(Debug, Args)]
struct FingerprintArgs {
    /// The server's TLS directory (as given to `serve --tls-dir`).
    #[arg(long, value_name = "DIR", required_unless_present = "datastore", conflicts_with = "datastore")]
    tls_dir: Option<PathBuf>,
    /// The datastore of a `serve` without --tls-dir (its identity is in DATASTORE/.tls).
    #[arg(long, value_name = "DIR")]
    datastore: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum PointsCmd {
    /// List the restore points of a replica.
    List {
        /// Datastore directory.
        #[arg(long)]
        target: PathBuf,
        /// Replica name.
        #[arg(long)]
        replica: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Write a replica disk as a raw image (sparse).
    Export {
        /// Datastore directory.
        #[arg(long)]
        target: PathBuf,
        /// Replica name.
        #[arg(long)]
        replica: String,
        /// Disk name.
        #[arg(long)]
        disk: String,
        /// Output file: written to a temporary file beside it, renamed into place when
        /// complete. Never a path inside the datastore, never through a symbolic link.
        #[arg(long)]
        out: PathBuf,
        /// Restore point id (default: the latest).
        #[arg(long)]
        point: Option<u64>,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
    /// Return a replica, in place, to an older restore point (newer points are dropped),
    /// or undo an interrupted session.
    Rollback {
        /// Datastore directory.
        #[arg(long)]
        target: PathBuf,
        /// Replica name.
        #[arg(long)]
        replica: String,
        /// Restore point id to return to.
        #[arg(long, conflicts_with = "incomplete", required_unless_present = "incomplete")]
        point: Option<u64>,
        /// Undo an interrupted session: back to the last complete point.
        #[arg(long)]
        incomplete: bool,
        /// Confirm: newer restore points are deleted for good.
        #[arg(long)]
        yes: bool,
    },
    /// Drop the oldest restore points beyond the retention.
    Prune {
        /// Datastore directory.
        #[arg(long)]
        target: PathBuf,
        /// Replica name.
        #[arg(long)]
        replica: String,
        /// Points to keep (default: the replica's setting); also stored as the new setting.
        #[arg(long)]
        retain: Option<u32>,
    },
    /// Re-hash the latest images against their digest maps and check every undo file.
    Verify {
        /// Datastore directory.
        #[arg(long)]
        target: PathBuf,
        /// Replica name.
        #[arg(long)]
        replica: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Write a fresh random token (64 hex characters, mode 0600) and print its line for a
    /// server's access file (`ferry serve --access`) on stdout.
    New {
        /// Where to write it (never overwritten).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        grant: GrantArgs,
    },
    /// Print the access-file line of an existing token file (e.g. the token a server used
    /// with --token-file, to move it to --access with a narrower role).
    Line {
        /// The token file.
        #[arg(long)]
        token_file: PathBuf,
        #[command(flatten)]
        grant: GrantArgs,
    },
}

/// What a token may do, for its access-file line.
#[derive(Debug, Args)]
struct GrantArgs {
    /// The token's name in the access file and in the server's logs (default: the file's name).
    #[arg(long)]
    name: Option<String>,
    /// read (plan, digest maps), replicate (also write the replicas it matches), or admin
    /// (also lower retention).
    #[arg(long, default_value = "replicate")]
    role: String,
    /// Glob of the replica names it may touch: * any characters, ? any one.
    #[arg(long, default_value = "*")]
    replicas: String,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::from(exit_code_of(&e))
        }
    }
}

/// Exit codes, the contract with schedulers (README.md, "Exit codes").
pub const EXIT_OK: u8 = 0;
/// The run failed; a retry may help.
pub const EXIT_FAILED: u8 = 1;
/// Usage or configuration: a retry will not help.
pub const EXIT_USAGE: u8 = 2;
/// Finished with a warning.
pub const EXIT_WARNING: u8 = 3;
/// The replica is busy (another session holds it): try later.
pub const EXIT_BUSY: u8 = 4;

/// The exit code of an error: its class, from the first typed error in its chain.
fn exit_code_of(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        let class = if let Some(m) = cause.downcast_ref::<MoveError>() {
            m.class()
        } else if let Some(s) = cause.downcast_ref::<ferry_datastore::StoreError>() {
            s.class()
        } else if let Some(b) = cause.downcast_ref::<ferry_backup::BackupError>() {
            b.class()
        } else if cause.downcast_ref::<UsageError>().is_some() {
            ErrorClass::Usage
        } else {
            continue;
        };
        return match class {
            ErrorClass::Failed => EXIT_FAILED,
            ErrorClass::Usage => EXIT_USAGE,
            ErrorClass::Busy => EXIT_BUSY,
        };
    }
    EXIT_FAILED
}

/// A usage error found while validating flags.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve(a) => serve(*a),
        Cmd::Replicate(a) => replicate(*a),
        Cmd::Plan(a) => plan(*a),
        Cmd::Points { cmd } => points(cmd),
        Cmd::Fingerprint(a) => {
            let dir = match (a.tls_dir, a.datastore) {
                (Some(d), _) => d,
                (None, Some(ds)) => ds.join(ferry_replicate::tls::DEFAULT_TLS_DIR),
                (None, None) => return Err(usage("give --tls-dir DIR or --datastore DIR")),
            };
            println!("{}", ferry_replicate::tls::ServerIdentity::load(&dir)?.fingerprint());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Token { cmd: TokenCmd::New { out, grant } } => {
            let (name, role) = grant_of(&grant, &out)?;
            // The line's fields are checked before the token is written: a bad name leaves no file.
            Grant::new(&name, role, &grant.replicas, &ferry_replicate::auth::TokenAuth::new(b"checking the line"))?;
            ferry_replicate::auth::write_new_token(&out)?;
            let auth = ferry_replicate::auth::TokenAuth::from_file(&out)?;
            println!("{}", Grant::new(&name, role, &grant.replicas, &auth)?.line());
            eprintln!(
                "wrote a new token to {} (mode 0600) for `replicate --token-file`; the line above goes into the \
                 server's access file (`serve --access`; it holds a verifier, not the token)",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Token { cmd: TokenCmd::Line { token_file, grant } } => {
            let (name, role) = grant_of(&grant, &token_file)?;
            let auth = ferry_replicate::auth::TokenAuth::from_file(&token_file)?;
            println!("{}", Grant::new(&name, role, &grant.replicas, &auth)?.line());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench { args } => {
            ferry_bench::main_with_args(std::iter::once("ferry bench".to_string()).chain(args).collect())
        }
    }
}

/// The name and role of a token's access-file line (the name defaults to the file's name).
fn grant_of(g: &GrantArgs, file: &std::path::Path) -> anyhow::Result<(String, AccessRole)> {
    let role: AccessRole = g.role.parse().map_err(|e: String| usage(format!("--role: {e}")))?;
    let name = match &g.name {
        Some(n) => n.clone(),
        None => file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    Ok((name, role))
}

/// Parse a size: 262144, 256K, 256KiB, 1M, 4MiB.
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| usage(format!("bad size {s:?}")))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(usage(format!("bad size unit in {s:?} (use K, M, G or T)"))),
    };
    n.checked_mul(mult).ok_or_else(|| usage(format!("size {s:?} too large")))
}

fn serve_config(io: &IoArgs) -> anyhow::Result<ServeConfig> {
    let backend: BackendChoice = io.io_backend.parse().map_err(usage)?;
    // ServeConfig::depth bounds it.
    let mut cfg = ServeConfig { backend, queue_depth: io.queue_depth, ..ServeConfig::default() };
    if let Some(w) = io.workers {
        cfg.workers = w.clamp(1, 64);
    }
    Ok(cfg)
}

fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    // Before any thread starts: every thread inherits the mask, so SIGHUP waits for the
    // reloading thread instead of ending the process.
    ferry_io::process::block_signal(ferry_io::process::Signal::Hup).context("blocking SIGHUP")?;
    let source =
        match (a.access, a.token_file) {
            (Some(p), _) => AccessSource::File(p),
            (None, Some(p)) => AccessSource::TokenFile(p),
            (None, None) => return Err(usage(
                "ferry serve needs --token-file FILE (one admin token: create it with `ferry token new --out PATH`) \
                 or --access FILE (one line per token, as `ferry token new --out PATH --name NAME --role ROLE \
                 --replicas GLOB` prints it)",
            )),
        };
    // Checked before anything is made: a bad rule leaves no datastore behind.
    let throttle = throttle(&a.bwlimit, a.json, "ferry serve")?;
    let access = Arc::new(Access::load(source)?);
    if access.snapshot().grants().is_empty() {
        return Err(usage("the access file lists no token: no source could connect"));
    }
    let ds = Datastore::open_or_create(&a.datastore)?;
    let mut cfg = serve_config(&a.io)?;
    if a.keep_min == 0 {
        return Err(usage("--keep-min must be at least 1 (a replica always keeps its latest point)"));
    }
    let immutable = parse_duration(&a.immutable)?;
    cfg.protection = Protection {
        keep_min: a.keep_min,
        immutable_ns: i64::try_from(immutable.as_nanos()).map_err(|_| usage("--immutable is too long"))?,
    };
    {
        let (access, json) = (access.clone(), a.json);
        std::thread::Builder::new()
            .name("ferry-sighup".into())
            .spawn(move || reload_on_sighup(&access, json))
            .context("starting the SIGHUP thread")?;
    }
    let limits = &mut cfg.limits;
    limits.max_connections = a.max_connections.unwrap_or(limits.max_connections);
    limits.max_sessions = a.max_sessions.unwrap_or(limits.max_sessions);
    limits.handshake_timeout = parse_duration(&a.handshake_timeout)?;
    limits.idle_timeout = parse_duration(&a.idle_timeout)?;
    limits.max_disk_size = parse_size(&a.max_disk_size)?;
    limits.check()?;
    cfg.throttle = throttle;
    // Every connection is a descriptor, a session a few more (its image, undo file, digest map).
    let want = limits.max_connections as u64 + 64 * limits.max_sessions as u64 + 64;
    let have = ferry_io::process::raise_open_files_limit(want).context("raising the open-file limit")?;
    if have < want {
        eprintln!(
            "ferry serve: warning: the open-file limit is {have}, --max-connections {} and --max-sessions {} \
             need about {want}: raise it (ulimit -n) or lower them",
            limits.max_connections, limits.max_sessions
        );
    }
    let (transport, fingerprint) = if a.insecure_plaintext {
        (ServerTransport::Plaintext, None)
    } else {
        let dir = a.tls_dir.clone().unwrap_or_else(|| a.datastore.join(ferry_replicate::tls::DEFAULT_TLS_DIR));
        let id = ferry_replicate::tls::ServerIdentity::load_or_create(&dir)?;
        (ServerTransport::Tls(id.server_config()?), Some(id.fingerprint().to_string()))
    };
    let listener = std::net::TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    let local = listener.local_addr()?;
    if a.json {
        report::print_json(&serde_json::json!({"event": "listening", "address": local.to_string(),
            "datastore": a.datastore, "fingerprint": fingerprint}));
    }
    match &fingerprint {
        Some(fp) => eprintln!(
            "ferry serve: listening on {local}, datastore {}, TLS fingerprint {fp} (sources pin it with --fingerprint {fp})",
            a.datastore.display()
        ),
        None => eprintln!(
            "ferry serve: listening on {local}, datastore {}, INSECURE PLAINTEXT: no TLS, anyone on the path reads and can change the data",
            a.datastore.display()
        ),
    }
    let obs = Arc::new(report::ServeLog { json: a.json });
    ferry_replicate::target::serve(listener, ds, access, transport, cfg, obs)?;
    Ok(ExitCode::SUCCESS)
}

/// Reload the access list at every SIGHUP; a list that does not load leaves the old one
/// in force (logged). Runs for the life of the server.
fn reload_on_sighup(access: &Access, json: bool) {
    while ferry_io::process::wait_signal(ferry_io::process::Signal::Hup).is_ok() {
        match access.reload() {
            Ok(r) if json => report::print_json(&serde_json::json!({
                "event": "access_reloaded",
                "tokens": r.tokens,
                "sessions_ended": r.ended.iter().map(|(t, p)| serde_json::json!({"token": t, "peer": p})).collect::<Vec<_>>(),
            })),
            Ok(r) => {
                eprintln!("ferry serve: access reloaded: {} token(s)", r.tokens);
                for (t, p) in &r.ended {
                    eprintln!("ferry serve: ended the session of revoked token {t:?} from {p}");
                }
            }
            Err(e) if json => report::print_json(&serde_json::json!({
                "event": "access_reload_failed",
                "error": e.detail(),
                "kept": "the access list in force before",
            })),
            Err(e) => eprintln!("ferry serve: access reload failed, keeping the list in force: {}", e.detail()),
        }
    }
}

fn replicate_config(a: &ReplicateArgs) -> anyhow::Result<ReplicateConfig> {
    let mode = match a.mode.as_str() {
        "auto" => None,
        "full" => Some(Mode::Full),
        "cbt" => Some(Mode::Cbt),
        "digest" => Some(Mode::Digest),
        "seed" => Some(Mode::Seed),
        other => return Err(usage(format!("--mode {other}: use auto, full, cbt, digest or seed"))),
    };
    let mut disks = Vec::new();
    for s in &a.sources {
        let (name, path) = ferry_replicate::disk::parse_named(s);
        disks.push(DiskSpec { name, path, mode, cbt: None });
    }
    for c in &a.cbt {
        let (name, path) = match c.split_once('=') {
            Some((n, p)) if disks.iter().any(|d| d.name == n) => (n.to_string(), p),
            _ if disks.len() == 1 => (disks[0].name.clone(), c.as_str()),
            _ => {
                let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
                return Err(usage(format!(
                    "--cbt {c}: say which disk it is for as NAME=PATH (disks: {})",
                    names.join(", ")
                )));
            }
        };
        let source = match path.strip_prefix("qemu-bitmap:") {
            Some(bitmap) => ChangeSource::QemuBitmap(bitmap.to_string()),
            None => ChangeSource::File(PathBuf::from(path)),
        };
        let d = disks.iter_mut().find(|d| d.name == name).expect("found above");
        if d.cbt.replace(source).is_some() {
            return Err(usage(format!("--cbt given twice for disk {name:?}")));
        }
    }
    if !a.cbt.is_empty() && !matches!(mode, None | Some(Mode::Cbt)) {
        return Err(usage(format!("--cbt goes with --mode cbt (or auto), not --mode {}", a.mode)));
    }
    let mut cfg = ReplicateConfig::new(&a.replica, disks);
    ferry_datastore::store::validate_name("replica", &a.replica)?;
    if let Some(cs) = &a.chunk_size {
        let n = u32::try_from(parse_size(cs)?).ok().filter(|&n| ferry_wire::validate_chunk_size(n).is_ok());
        let Some(n) = n else {
            return Err(usage(format!("--chunk-size {cs}: must be a power of two from 64K to 4M")));
        };
        cfg.chunk_size = Some(n);
    }
    cfg.compress = a.compress.parse::<CompressPolicy>().map_err(usage)?;
    cfg.streams = ferry_replicate::source::Streams::parse(&a.streams).map_err(usage)?;
    if let Some(g) = &a.streams_grow_every {
        cfg.streams_grow_every = Some(parse_size(g)?.max(1));
    }
    cfg.backend = a.io.io_backend.parse().map_err(usage)?;
    cfg.queue_depth = a.io.queue_depth.unwrap_or(cfg.queue_depth).clamp(1, 256);
    if let Some(w) = a.io.workers {
        cfg.workers = w.clamp(1, 64);
    }
    if let Some(t) = &a.point_time {
        cfg.point_time_ns = time::parse_rfc3339(t).map_err(usage)?;
    }
    if let Some(r) = a.retain {
        if r == 0 {
            return Err(usage("--retain must be at least 1"));
        }
        cfg.retain = r;
    }
    cfg.direct_io = a.direct_io;
    if let Some(c) = &a.checkpoint_every {
        let n = parse_size(c)?;
        if n == 0 {
            return Err(usage("--checkpoint-every must be more than 0"));
        }
        cfg.checkpoint_bytes = n;
    }
    cfg.verify_samples = a.verify_samples;
    cfg.map_cache = map_cache(a)?;
    cfg.throttle = throttle(&a.bwlimit, a.json, "ferry")?;
    Ok(cfg)
}

/// The throttle of `--bwlimit` and `--bwlimit-rule` (None: unlimited), which reports each
/// change of the rate in force as a `bwlimit` event (a line of `who` without `json`).
///
/// Test-only: `FERRY_TEST_LOCAL_TIME="DAY H:MM[:SS]"` starts the schedule's local clock at
/// that time (it then runs in real time), so tests cross a rule boundary without waiting.
fn throttle(a: &BwLimitArgs, json: bool, who: &'static str) -> anyhow::Result<Option<Arc<throttle::Throttle>>> {
    let schedule = throttle::Schedule::parse(a.bwlimit.as_deref(), &a.bwlimit_rule).map_err(usage)?;
    if schedule.is_unlimited() {
        return Ok(None);
    }
    let clock: Arc<dyn throttle::ThrottleClock> = match std::env::var("FERRY_TEST_LOCAL_TIME") {
        Ok(t) => Arc::new(throttle::SystemClock::starting_at(throttle::LocalTime::parse(&t).map_err(usage)?)),
        Err(_) => Arc::new(throttle::SystemClock::new()),
    };
    let on_change: throttle::OnChange = Box::new(move |ch| report::bwlimit_changed(ch, json, who));
    Ok(Some(Arc::new(throttle::Throttle::new(schedule, clock, Some(on_change)))))
}

/// The digest map cache of a job: its directory and the target's identity in it.
fn map_cache(a: &ReplicateArgs) -> anyhow::Result<Option<ferry_replicate::map_cache::MapCache>> {
    if a.no_map_cache {
        return Ok(None);
    }
    let Some(dir) = a.map_cache.clone().or_else(ferry_replicate::map_cache::MapCache::default_dir) else {
        return Ok(None); // no HOME: nowhere to cache
    };
    let target = match TargetSpec::parse(&a.target)? {
        TargetSpec::Remote(hostport) => format!("ferry://{hostport}"),
        // The same datastore named from another working directory is the same target.
        TargetSpec::Local(d) => format!("dir:{}", std::path::absolute(&d).unwrap_or(d).display()),
    };
    Ok(Some(ferry_replicate::map_cache::MapCache::new(dir, target)))
}

/// Parse a duration: 0, 90s, 30m, 2h, 7d (a bare number is seconds).
fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| usage(format!("bad duration {s:?} (use e.g. 90s, 30m, 2h)")))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(usage(format!("bad duration unit in {s:?} (use s, m, h or d)"))),
    };
    let secs = n.checked_mul(mult).ok_or_else(|| usage(format!("duration {s:?} is too long")))?;
    Ok(std::time::Duration::from_secs(secs))
}

fn replicate(a: ReplicateArgs) -> anyhow::Result<ExitCode> {
    if !a.from_backup.is_empty() || a.vm.is_some() || a.catch_up {
        return backup::replicate_from_backup(a);
    }
    let cfg = replicate_config(&a)?;
    let target = target(&a)?;
    let retry_for = parse_duration(&a.retry_for)?;
    let obs = job_observer(a.json);
    match target.run_with_retry(&cfg, obs.as_observer(), retry_for) {
        Ok(rep) => {
            let status = if obs.warned() { Status::Warning } else { Status::Ok };
            Ok(obs.finish_ok(&cfg, &rep, status))
        }
        Err(e) => Ok(obs.finish_err(&cfg, &anyhow!(e))),
    }
}

/// The observer of a job: NDJSON with `--json`, else text (a progress bar on a terminal).
fn job_observer(json: bool) -> Box<dyn report::JobObserver> {
    if json {
        Box::new(JsonObserver::default())
    } else {
        Box::new(TextObserver::new(std::io::stderr().is_terminal()))
    }
}

/// The target of `replicate` or `plan`.
fn target(a: &ReplicateArgs) -> anyhow::Result<Target> {
    Ok(Target {
        spec: TargetSpec::parse(&a.target)?,
        token: a.token_file.clone(),
        trust: client_trust(&a.trust)?,
        serve: serve_config(&a.io)?,
    })
}

/// How the source trusts a remote target: the flags validated.
fn client_trust(t: &TrustArgs) -> anyhow::Result<ClientTrust> {
    let fingerprint = match &t.fingerprint {
        Some(f) => Some(f.parse::<ferry_replicate::tls::Fingerprint>()?),
        None => None,
    };
    Ok(ClientTrust {
        insecure_plaintext: t.insecure_plaintext,
        fingerprint,
        known_targets: ferry_replicate::tls::KnownTargets::default_path(),
        trust_new: t.trust_new,
    })
}

fn plan(a: ReplicateArgs) -> anyhow::Result<ExitCode> {
    if !a.from_backup.is_empty() || a.vm.is_some() || a.catch_up {
        return backup::plan_from_backup(a);
    }
    let mut cfg = replicate_config(&a)?;
    cfg.plan_only = true;
    let obs = report::WarningsOnly::default();
    let rep = target(&a)?.run(&cfg, &obs)?;
    report::print_plan(&cfg, &rep, a.json);
    Ok(ExitCode::from(if obs.warned() { EXIT_WARNING } else { EXIT_OK }))
}

fn points(cmd: PointsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PointsCmd::List { target, replica, json } => {
            let ds = Datastore::open(&target)?;
            let r = ds.replica(&replica)?;
            let catalog = {
                // A rollback running now holds the points lock: Busy. One that was killed: refused.
                let _points = r.read_points("the listing")?;
                points::refuse_pending(&r)?;
                r.catalog()?
            };
            let session = r.session()?;
            if json {
                let points: Vec<_> = catalog
                    .points
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "id": p.id,
                            "point_time": time::format_rfc3339(p.point_time_ns),
                            "completed": time::format_rfc3339(p.completed_ns),
                            "ferry_version": p.ferry_version,
                            "disks": p.disks,
                        })
                    })
                    .collect();
                report::print_json(&serde_json::json!({
                    "replica": replica,
                    "chunk_size": r.settings.chunk_size,
                    "retain": r.settings.retain,
                    "points": points,
                    "interrupted_session": session.is_some(),
                }));
            } else {
                println!("{:>4}  {:<24}  {:<24}  {:>8}  {:>12}", "id", "point time", "completed", "disks", "changed");
                for p in &catalog.points {
                    let changed: u64 = p.disks.iter().map(|d| d.bytes_changed).sum();
                    println!(
                        "{:>4}  {:<24}  {:<24}  {:>8}  {:>12}",
                        p.id,
                        time::format_rfc3339(p.point_time_ns - p.point_time_ns % 1_000_000_000),
                        time::format_rfc3339(p.completed_ns - p.completed_ns % 1_000_000_000),
                        p.disks.len(),
                        report::human_bytes(changed)
                    );
                }
                if session.is_some() {
                    println!("an interrupted session is pending: the next `ferry replicate` resumes it");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PointsCmd::Export { target, replica, disk, out, point, force } => {
            let ds = Datastore::open(&target)?;
            let rep = points::export_point(&ds, &replica, &disk, point, &out, points::ExportOptions { force })?;
            eprintln!(
                "exported {replica}/{disk} to {} ({} , {} of data)",
                out.display(),
                report::human_bytes(rep.size),
                report::human_bytes(rep.data_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        PointsCmd::Rollback { target, replica, point, incomplete, yes } => {
            if !yes {
                return Err(usage("rollback deletes data for good: add --yes to confirm"));
            }
            let ds = Datastore::open(&target)?;
            ds.replica(&replica)?;
            let r = ds.lock_replica(&replica, "ferry points rollback", 0, 0)?;
            finished_first(&r)?;
            if incomplete {
                if points::rollback_incomplete(&r)? {
                    eprintln!("rolled back the interrupted session of {replica}: it is at its last complete point");
                } else {
                    eprintln!("replica {replica} has no interrupted session: nothing to do");
                }
            } else {
                let to = point.expect("clap requires --point without --incomplete");
                let dropped = points::rollback_to(&r, to)?;
                eprintln!("replica {replica} is at restore point {to}; dropped points {dropped:?}");
            }
            Ok(ExitCode::SUCCESS)
        }
        PointsCmd::Prune { target, replica, retain } => {
            let ds = Datastore::open(&target)?;
            ds.replica(&replica)?;
            let r = ds.lock_replica(&replica, "ferry points prune", 0, retain.unwrap_or(0))?;
            finished_first(&r)?;
            let dropped = points::prune(&r, r.settings.retain)?;
            eprintln!("replica {replica}: kept {} point(s), dropped {dropped:?}", r.settings.retain);
            Ok(ExitCode::SUCCESS)
        }
        PointsCmd::Verify { target, replica, json } => {
            let ds = Datastore::open(&target)?;
            let r = ds.lock_replica(&replica, "ferry points verify", 0, 0)?;
            let (checked, issues) = points::verify(&r)?;
            if r.catalog().is_ok_and(|c| c.checksum.is_none() && !c.points.is_empty()) {
                // Not a finding: catalogs written before ferry kept a checksum have none.
                eprintln!("note: catalog.json of {replica} has no checksum yet (written by an older ferry)");
            }
            if json {
                report::print_json(&serde_json::json!({"replica": replica, "checked": checked, "issues": issues}));
            } else {
                for i in &issues {
                    match i.chunk {
                        Some(c) => println!("disk {} chunk {c}: {}", i.disk, i.problem),
                        None if i.disk.is_empty() => println!("replica {replica}: {}", i.problem),
                        None => println!("disk {}: {}", i.disk, i.problem),
                    }
                }
                println!("{checked} chunks and records checked, {} problem(s)", issues.len());
            }
            Ok(ExitCode::from(if issues.is_empty() { EXIT_OK } else { EXIT_FAILED }))
        }
    }
}

/// Finish a rollback that a crash left recorded (rollback.json) before a command that
/// changes the replica, and say so.
fn finished_first(r: &ferry_datastore::Replica) -> anyhow::Result<()> {
    let f = points::finish_pending(r)?;
    if let Some(what) = f.what {
        let what = match what {
            points::PendingRollback::ToPoint(to) => format!("the rollback to restore point {to}"),
            points::PendingRollback::Incomplete => "the rollback of the interrupted session".to_string(),
        };
        eprintln!("replica {}: finished {what}, which had not finished; dropped points {:?}", r.name, f.dropped);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("262144").unwrap(), 262144);
        assert_eq!(parse_size("256K").unwrap(), 262144);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
    }

    fn replicate_args(args: &[&str]) -> ReplicateArgs {
        let cli = Cli::try_parse_from([&["ferry", "plan"], args].concat()).expect("valid arguments");
        match cli.cmd {
            Cmd::Plan(a) => *a,
            _ => unreachable!("a plan command"),
        }
    }

    #[test]
    fn cbt_options_become_change_sources() {
        let a = replicate_args(&[
            "--source",
            "d=/x.img",
            "--cbt",
            "d=qemu-bitmap:b0",
            "--target",
            "/tmp/t",
            "--replica",
            "r",
        ]);
        let cfg = replicate_config(&a).expect("valid");
        assert_eq!(cfg.disks[0].cbt, Some(ChangeSource::QemuBitmap("b0".into())));
        let a = replicate_args(&["--source", "/x.img", "--cbt", "/y.json", "--target", "/tmp/t", "--replica", "r"]);
        let cfg = replicate_config(&a).expect("valid");
        assert_eq!(cfg.disks[0].cbt, Some(ChangeSource::File(PathBuf::from("/y.json"))));
        // An empty bitmap name is the source's to reject (it names the disk).
        let a =
            replicate_args(&["--source", "/x.img", "--cbt", "qemu-bitmap:", "--target", "/tmp/t", "--replica", "r"]);
        assert_eq!(replicate_config(&a).expect("valid").disks[0].cbt, Some(ChangeSource::QemuBitmap(String::new())));
    }

    #[test]
    fn chunk_size_must_be_a_power_of_two_from_64k_to_4m() {
        for (cs, ok) in
            [("64K", true), ("4M", true), ("1M", true), ("32K", false), ("8M", false), ("96K", false), ("8G", false)]
        {
            let a = replicate_args(&["--source", "/x.img", "--chunk-size", cs, "--target", "/tmp/t", "--replica", "r"]);
            match replicate_config(&a) {
                Ok(cfg) => assert!(ok && cfg.chunk_size.is_some(), "{cs}"),
                Err(e) => {
                    assert!(!ok, "{cs}: {e}");
                    assert_eq!(e.to_string(), format!("--chunk-size {cs}: must be a power of two from 64K to 4M"));
                }
            }
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
