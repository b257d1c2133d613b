//! Who may do what at a target: scoped tokens, the access file, revocation.
//!
//! An access file (`ferry serve --access FILE`) lists the tokens a server
//! accepts, one per line; `ferry token new` prints the line of the token it
//! makes:
//!
//! ```text
//! # NAME        ROLE       REPLICAS  VERIFIER KEY (64 hex digits)
//! web-writer    replicate  web*      3f2a...c9
//! dr-reader     read       *         81b0...7e
//! ops           admin      *         5d11...04
//! ```
//!
//! Fields are separated by spaces or tabs; `#` starts a comment line; blank
//! lines are ignored. NAME: 1 to 64 of `A-Z a-z 0-9 . _ -`, unique in the
//! file. ROLE: `read` (plan, digest maps: never writes), `replicate` (also
//! writes the replicas it matches), `admin` (also lowers retention; the
//! target's protection still binds it). REPLICAS: a glob over replica names,
//! `*` any run of characters and `?` any one (no whitespace). The key is
//! the verifier `derive_key("ferry v1 auth token", token)`: the server never
//! holds a token, but a verifier authenticates to this server, so the file
//! is secret and refused unless it is the owner's alone (wire/PROTOCOL.md,
//! section 4). A bad line is refused with its line number; a file with a key
//! or a name twice is refused.
//!
//! [`Access`] is what a server runs with: the list in force, reloaded on
//! SIGHUP ([`Access::reload`]: a bad file leaves the old list in force), and
//! the sessions running under each token, so that a token removed or changed
//! by a reload ends its running sessions (with a `NotAllowed` error) and is
//! refused from its next handshake on. The legacy `--token-file` is an access
//! list of one admin token that matches every replica.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use ferry_wire::{Authenticator, Role};

use crate::auth::{check_private, proof, TokenAuth};
use crate::error::{MoveError, Result};

/// Largest access file read, and most tokens in one: bounds memory and the
/// handshake's work (one keyed BLAKE3 per token).
pub const MAX_ACCESS_FILE: u64 = 1 << 20;
/// Most tokens in an access file.
pub const MAX_TOKENS: usize = 4096;
/// Longest token name.
pub const MAX_TOKEN_NAME: usize = 64;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessRole {
    /// Plan, fetch digest maps, read: never write.
    Read,
    /// Also write (replicate into) the replicas it matches, and raise their retention.
    Replicate,
    /// Also lower retention (down to the target's `--keep-min`; never below its protection).
    Admin,
}

impl AccessRole {
    /// The role's name in an access file.
    pub fn name(self) -> &'static str {
        match self {
            AccessRole::Read => "read",
            AccessRole::Replicate => "replicate",
            AccessRole::Admin => "admin",
        }
    }

    /// True when the role may write replicas.
    pub fn may_write(self) -> bool {
        self != AccessRole::Read
    }
}

impl std::str::FromStr for AccessRole {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "read" => Ok(AccessRole::Read),
            "replicate" => Ok(AccessRole::Replicate),
            "admin" => Ok(AccessRole::Admin),
            other => Err(format!("unknown role {other:?}: use read, replicate or admin")),
        }
    }
}

/// One token of an access list: its name, role, replica scope and verifier key.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's name (for messages and logs).
    pub name: String,
    /// What it may do.
    pub role: AccessRole,
    /// Glob over the replica names it may touch.
    pub replicas: String,
    key: [u8; 32],
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// A grant for the token behind `auth`; `name` and `replicas` are checked as in a file.
    pub fn new(name: &str, role: AccessRole, replicas: &str, auth: &TokenAuth) -> Result<Grant> {
        check_name(name).map_err(MoveError::Usage)?;
        check_glob(replicas).map_err(MoveError::Usage)?;
        Ok(Grant { name: name.to_string(), role, replicas: replicas.to_string(), key: auth.verifier_key() })
    }

    /// True when the grant's scope covers replica `replica`.
    pub fn matches(&self, replica: &str) -> bool {
        glob_match(self.replicas.as_bytes(), replica.as_bytes())
    }

    /// The grant as an access-file line.
    pub fn line(&self) -> String {
        let key: String = self.key.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {} {} {key}", self.name, self.role.name(), self.replicas)
    }

    /// How the grant is shown in messages: `token "NAME" (role ROLE, replicas "GLOB")`.
    pub fn describe(&self) -> String {
        format!("token {:?} (role {}, replicas {:?})", self.name, self.role.name(), self.replicas)
    }
}

/// The tokens a server accepts. As an [`Authenticator`], key `i` is grant `i`'s verifier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    grants: Vec<Grant>,
}

impl AccessList {
    /// Parse an access file's text; `origin` (the file) names it in errors, which give the
    /// line number.
    pub fn parse(text: &str, origin: &Path) -> Result<AccessList> {
        let bad = |line: usize, what: String| MoveError::AccessFile { path: origin.to_path_buf(), line, what };
        let mut grants: Vec<Grant> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = l.split_whitespace().collect();
            let [name, role, replicas, key] = fields[..] else {
                return Err(bad(
                    n,
                    format!(
                        "expected 4 fields (NAME ROLE REPLICAS KEY, as `ferry token new` prints), found {}",
                        fields.len()
                    ),
                ));
            };
            check_name(name).map_err(|e| bad(n, e))?;
            let role: AccessRole = role.parse().map_err(|e| bad(n, e))?;
            check_glob(replicas).map_err(|e| bad(n, e))?;
            let key = parse_key(key).ok_or_else(|| {
                bad(n, "the key must be 64 hex digits (the verifier `ferry token new` prints)".to_string())
            })?;
            if let Some(j) = grants.iter().position(|g| g.name == name) {
                return Err(bad(
                    n,
                    format!("token name {name:?} is used twice (here and on line {})", line_of(text, j)),
                ));
            }
            if let Some(j) = grants.iter().position(|g| g.key == key) {
                return Err(bad(
                    n,
                    format!(
                        "the key of {name:?} is the key of {:?} (line {}): one token, one line",
                        grants[j].name,
                        line_of(text, j)
                    ),
                ));
            }
            if grants.len() == MAX_TOKENS {
                return Err(bad(n, format!("more than {MAX_TOKENS} tokens")));
            }
            grants.push(Grant { name: name.to_string(), role, replicas: replicas.to_string(), key });
        }
        Ok(AccessList { grants })
    }

    /// Read and parse an access file (refused unless it is the owner's alone, or when larger
    /// than [`MAX_ACCESS_FILE`]).
    pub fn load(path: &Path) -> Result<AccessList> {
        check_private(path, "access file")?;
        let meta = fs::metadata(path).map_err(|e| MoveError::file("reading access file", path, e))?;
        if meta.len() > MAX_ACCESS_FILE {
            return Err(MoveError::AccessFile {
                path: path.to_path_buf(),
                line: 0,
                what: format!("{} bytes; an access file holds at most {MAX_ACCESS_FILE}", meta.len()),
            });
        }
        let text = fs::read_to_string(path).map_err(|e| MoveError::file("reading access file", path, e))?;
        AccessList::parse(&text, path)
    }

    /// One admin token for every replica: the legacy `--token-file`, and in-process targets.
    pub fn single_admin(name: &str, auth: &TokenAuth) -> AccessList {
        AccessList {
            grants: vec![Grant {
                name: name.to_string(),
                role: AccessRole::Admin,
                replicas: "*".into(),
                key: auth.verifier_key(),
            }],
        }
    }

    /// The grants, in file order.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Grant `key` (a [`ferry_wire::PeerInfo::key`] of a session authenticated with this list).
    pub fn grant(&self, key: usize) -> Option<&Grant> {
        self.grants.get(key)
    }
}

impl Authenticator for AccessList {
    fn key_count(&self) -> usize {
        self.grants.len()
    }

    fn proof(
        &self,
        key: usize,
        role: Role,
        binding: &[u8; 32],
        client_nonce: &[u8; 32],
        server_nonce: &[u8; 32],
    ) -> [u8; 32] {
        proof(&self.grants[key].key, role, binding, client_nonce, server_nonce)
    }
}

/// The 1-based line of the `j`-th grant of `text` (for "used twice" errors).
fn line_of(text: &str, j: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim().starts_with('#'))
        .nth(j)
        .map_or(0, |(i, _)| i + 1)
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOKEN_NAME {
        return Err(format!("token name {name:?} must be 1 to {MAX_TOKEN_NAME} characters"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("token name {name:?} holds {c:?}: use letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

fn check_glob(glob: &str) -> std::result::Result<(), String> {
    if glob.is_empty() || glob.len() > ferry_wire::MAX_NAME_LEN {
        return Err(format!("replica glob {glob:?} must be 1 to {} bytes", ferry_wire::MAX_NAME_LEN));
    }
    if let Some(c) = glob.chars().find(|c| c.is_whitespace() || c.is_control() || *c == '/') {
        return Err(format!("replica glob {glob:?} holds {c:?} (use ? for any one character)"));
    }
    Ok(())
}

fn parse_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

/// `*` matches any run of bytes, `?` any one byte; everything else itself.
/// Iterative, backtracking only to the last `*`: linear in practice, never exponential.
fn glob_match(glob: &[u8], name: &[u8]) -> bool {
    let (mut g, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match glob.get(g) {
            Some(b'*') => {
                star = Some((g, n));
                g += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                g += 1;
                n += 1;
            }
            _ => match star {
                Some((sg, sn)) => {
                    g = sg + 1;
                    n = sn + 1;
                    star = Some((sg, sn + 1));
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|&c| c == b'*')
}

/// Where a server's access list comes from, for [`Access::reload`].
#[derive(Debug, Clone)]
pub enum AccessSource {
    /// An access file (`--access`).
    File(PathBuf),
    /// A single token file (`--token-file`): one admin token named after the file.
    TokenFile(PathBuf),
    /// Fixed (in-process targets, tests): reload keeps it.
    Fixed,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Tokens in the new list.
    pub tokens: usize,
    /// Running sessions ended: (token name, peer).
    pub ended: Vec<(String, String)>,
}

/// Ends one running session from outside (a revocation); given the reason.
pub type Revoke = Box<dyn Fn(&str) + Send + Sync>;

struct Live {
    grant: Grant,
    peer: String,
    revoke: Revoke,
}

/// A server's access control: the list in force, its source, the sessions running under it.
pub struct Access {
    source: AccessSource,
    current: RwLock<Arc<AccessList>>,
    live: Mutex<(u64, HashMap<u64, Live>)>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").field("source", &self.source).finish_non_exhaustive()
    }
}

impl Access {
    /// Load the list from `source` (a fixed source: an empty list; see [`Access::fixed`]).
    pub fn load(source: AccessSource) -> Result<Access> {
        let list = read_source(&source)?;
        Ok(Access::with(source, list))
    }

    /// A fixed list (no reload).
    pub fn fixed(list: AccessList) -> Access {
        Access::with(AccessSource::Fixed, list)
    }

    fn with(source: AccessSource, list: AccessList) -> Access {
        Access { source, current: RwLock::new(Arc::new(list)), live: Mutex::new((0, HashMap::new())) }
    }

    /// The list in force now: a session authenticates with one snapshot and finds its
    /// grant in the same one.
    pub fn snapshot(&self) -> Arc<AccessList> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Read the source again and put the new list in force; end the running sessions of
    /// every token that is no longer in it exactly as before (removed, or its role, scope or
    /// key changed). A source that does not read or parse leaves the old list in force.
    pub fn reload(&self) -> Result<Reloaded> {
        let list = match &self.source {
            AccessSource::Fixed => return Ok(Reloaded { tokens: self.snapshot().grants.len(), ended: vec![] }),
            s => read_source(s)?,
        };
        let tokens = list.grants.len();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<u64> =
            live.1.iter().filter(|(_, l)| !list.grants.contains(&l.grant)).map(|(id, _)| *id).collect();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
        let mut ended = Vec::new();
        for id in gone {
            if let Some(l) = live.1.remove(&id) {
                (l.revoke)(&format!(
                    "{} was revoked at the target (its access-file line was removed or changed); \
                     this session ends",
                    l.grant.describe()
                ));
                ended.push((l.grant.name, l.peer));
            }
        }
        Ok(Reloaded { tokens, ended })
    }

    /// Record a session running under `grant` until the returned guard is dropped; a reload
    /// that revokes the grant calls `revoke`. Refused when a reload took the grant away
    /// since the session authenticated.
    pub fn register(self: &Arc<Self>, grant: &Grant, peer: &str, revoke: Revoke) -> Result<Registration> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if !self.snapshot().grants.contains(grant) {
            return Err(MoveError::NotAllowed(format!("{} was revoked at the target", grant.describe())));
        }
        live.0 += 1;
        let id = live.0;
        live.1.insert(id, Live { grant: grant.clone(), peer: peer.to_string(), revoke });
        Ok(Registration { access: self.clone(), id })
    }

    /// Sessions running now.
    pub fn running(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).1.len()
    }
}

/// A session's place in [`Access`]'s table; dropping it removes the session.
pub struct Registration {
    access: Arc<Access>,
    id: u64,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("id", &self.id).finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.access.live.lock().unwrap_or_else(|p| p.into_inner()).1.remove(&self.id);
    }
}

fn read_source(source: &AccessSource) -> Result<AccessList> {
    match source {
        AccessSource::File(p) => AccessList::load(p),
        AccessSource::TokenFile(p) => {
            let auth = TokenAuth::from_file(p)?;
            let stem = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let name: String =
                stem.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')).collect();
            let name = if name.is_empty() { "token-file".to_string() } else { name };
            Ok(AccessList::single_admin(&name[..name.len().min(MAX_TOKEN_NAME)], &auth))
        }
        AccessSource::Fixed => Ok(AccessList::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "0101010101010101010101010101010101010101010101010101010101010101";
    const K2: &str = "0202020202020202020202020202020202020202020202020202020202020202";

    fn parse(text: &str) -> Result<AccessList> {
        AccessList::parse(text, Path::new("/etc/ferry/access"))
    }

    /// The error of a bad file, as the operator reads it.
    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn lines_comments_and_blanks() {
        let list = parse(&format!(
            "# tokens of dr-site\n\n  web-writer\treplicate  web*  {K1}  \n#ops admin * {K2}\nreader read ? {K2}\n"
        ))
        .unwrap();
        let g = list.grants();
        assert_eq!(g.len(), 2);
        assert_eq!(
            (g[0].name.as_str(), g[0].role, g[0].replicas.as_str()),
            ("web-writer", AccessRole::Replicate, "web*")
        );
        assert_eq!((g[1].name.as_str(), g[1].role, g[1].replicas.as_str()), ("reader", AccessRole::Read, "?"));
        assert_eq!(g[0].line(), format!("web-writer replicate web* {K1}"));
        // A line as printed parses back to the same grant.
        assert_eq!(parse(&g[0].line()).unwrap().grants()[0], g[0]);
        assert_eq!(list.key_count(), 2);
    }

    #[test]
    fn bad_lines_are_refused_with_their_line_number() {
        let cases = [
            (
                format!("ok read * {K1}\nweb replicate web*\n"),
                "line 2: expected 4 fields (NAME ROLE REPLICAS KEY, as `ferry token new` prints), found 3",
            ),
            (format!("\n\nweb writer web* {K1}\n"), "line 3: unknown role \"writer\": use read, replicate or admin"),
            (
                format!("web/1 read * {K1}\n"),
                "line 1: token name \"web/1\" holds '/': use letters, digits, '.', '_' and '-'",
            ),
            (
                "web read * 0123\n".to_string(),
                "line 1: the key must be 64 hex digits (the verifier `ferry token new` prints)",
            ),
            (
                format!("web read * {}zz\n", &K1[..62]),
                "line 1: the key must be 64 hex digits (the verifier `ferry token new` prints)",
            ),
            (
                format!("a read * {K1}\n# x\na admin * {K2}\n"),
                "line 3: token name \"a\" is used twice (here and on line 1)",
            ),
            (
                format!("a read * {K1}\nb admin * {K1}\n"),
                "line 2: the key of \"b\" is the key of \"a\" (line 1): one token, one line",
            ),
            (format!("a read {} {K1}\n", "x".repeat(300)), "line 1: replica glob"),
            (
                format!("a read * {K1} extra\n"),
                "line 1: expected 4 fields (NAME ROLE REPLICAS KEY, as `ferry token new` prints), found 5",
            ),
        ];
        for (text, want) in cases {
            let e = error(&text);
            assert!(e.starts_with(&format!("access file /etc/ferry/access {want}")), "{text:?}: {e}");
        }
        assert_eq!(parse("").unwrap().grants().len(), 0);
    }

    #[test]
    fn globs() {
        for (glob, name, want) in [
            ("*", "anything", true),
            ("web*", "web1", true),
            ("web*", "web", true),
            ("web*", "db1", false),
            ("web*", "xweb1", false),
            ("*-prod", "db-prod", true),
            ("*-prod", "db-prod2", false),
            ("w?b?", "web1", true),
            ("w?b?", "web12", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("db1", "db1", true),
            ("db1", "db10", false),
            ("**", "", true),
        ] {
            assert_eq!(glob_match(glob.as_bytes(), name.as_bytes()), want, "{glob} ~ {name}");
        }
        // No exponential backtracking.
        let t = std::time::Instant::now();
        assert!(!glob_match("*a*a*a*a*a*a*a*a*b".as_bytes(), "a".repeat(200).as_bytes()));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_reload_ends_the_sessions_of_tokens_removed_or_changed_and_keeps_the_rest() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("access");
        let write = |text: &str| {
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(&format!("a replicate * {K1}\nb read * {K2}\n"));
        let access = Arc::new(Access::load(AccessSource::File(p.clone())).unwrap());
        let list = access.snapshot();
        let ended = Arc::new(Mutex::new(Vec::new()));
        let revoke = |who: &str| -> Revoke {
            let (ended, who) = (ended.clone(), who.to_string());
            Box::new(move |why: &str| ended.lock().unwrap().push(format!("{who}: {why}")))
        };
        let ra = access.register(list.grant(0).unwrap(), "peer-a", revoke("a")).unwrap();
        let _rb = access.register(list.grant(1).unwrap(), "peer-b", revoke("b")).unwrap();
        assert_eq!(access.running(), 2);
        // A bad file: the old list stays, nothing ends.
        write("garbage\n");
        assert!(access.reload().unwrap_err().to_string().contains("line 1: expected 4 fields"));
        assert_eq!(access.snapshot().grants().len(), 2);
        // b's role changes, a stays: b's session ends.
        write(&format!("a replicate * {K1}\nb admin * {K2}\n"));
        let r = access.reload().unwrap();
        assert_eq!(r, Reloaded { tokens: 2, ended: vec![("b".into(), "peer-b".into())] });
        assert_eq!(
            *ended.lock().unwrap(),
            vec!["b: token \"b\" (role read, replicas \"*\") was revoked at the target (its access-file line was \
                  removed or changed); this session ends"
                .to_string()]
        );
        assert_eq!(access.running(), 1);
        drop(ra);
        assert_eq!(access.running(), 0);
        // A grant from an older snapshot is refused once it is gone.
        write(&format!("b admin * {K2}\n"));
        access.reload().unwrap();
        let e = access.register(list.grant(0).unwrap(), "peer-a", revoke("a")).unwrap_err();
        assert_eq!(e.to_string(), "token \"a\" (role replicate, replicas \"*\") was revoked at the target");
        assert_eq!(e.code(), ferry_wire::ErrorCode::NotAllowed);
    }

    #[test]
    fn an_access_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("access");
        fs::write(&p, format!("a replicate * {K1}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = AccessList::load(&p).unwrap_err();
        assert!(e.to_string().contains("is accessible by group or others (mode 0644)"), "{e}");
        assert!(e.to_string().contains(&format!("chmod 600 {}", p.display())), "{e}");
    }
}
