//! Shared-token authentication: token files and the BLAKE3 proofs.
//!
//! A token file holds the token as one line of text (`ferry token new`
//! writes 64 hex characters; surrounding whitespace is ignored). The token
//! never crosses the wire: each side proves it holds it with
//! `BLAKE3-keyed(key = derive_key("ferry v1 auth token", token),
//! label || binding || client_nonce || server_nonce)`, label "ferry-v1 client"
//! or "ferry-v1 server", binding the TLS session's exporter value (zeros
//! without TLS; see wire/PROTOCOL.md section 4).
//!
//! A token file, like an ssh private key, must be the owner's alone: one
//! that group or others may read (or write) is refused, naming the file and
//! the `chmod 600` that fixes it ([`check_private`]; the access file of
//! `ferry serve --access` too). A server keeps only the verifier key
//! `derive_key(..., token)` of each token ([`TokenAuth::verifier_key`],
//! the last field of an access-file line), never the token.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ferry_wire::{Authenticator, Role};

use crate::error::{MoveError, Result};

/// Computes ferry's v1 proofs from a token.
#[derive(Clone)]
pub struct TokenAuth {
    key: [u8; 32],
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenAuth(..)")
    }
}

impl TokenAuth {
    /// Keys derived from the token's bytes.
    pub fn new(token: &[u8]) -> TokenAuth {
        TokenAuth { key: blake3::derive_key("ferry v1 auth token", token) }
    }

    /// From a verifier key (an access-file line's): proves what the token's holder proves.
    pub fn from_verifier_key(key: [u8; 32]) -> TokenAuth {
        TokenAuth { key }
    }

    /// The verifier key the proofs are keyed by: a one-way function of the token, what a
    /// server's access file holds (see wire/PROTOCOL.md, section 4).
    pub fn verifier_key(&self) -> [u8; 32] {
        self.key
    }

    /// Read a token file (refused unless it is the owner's alone).
    pub fn from_file(path: &Path) -> Result<TokenAuth> {
        check_private(path, "token file")?;
        let text = fs::read_to_string(path).map_err(|source| MoveError::Token { path: path.to_path_buf(), source })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(MoveError::BadToken(format!(
                "token file {} is empty; create one with `ferry token new --out {}`",
                path.display(),
                path.display()
            )));
        }
        if token.len() < 16 {
            return Err(MoveError::BadToken(format!(
                "token in {} is only {} characters; use at least 16 (`ferry token new` makes 64)",
                path.display(),
                token.len()
            )));
        }
        Ok(TokenAuth::new(token.as_bytes()))
    }

    /// A fresh random token for an in-process session (local target).
    pub fn ephemeral() -> TokenAuth {
        TokenAuth::new(&random_bytes::<32>())
    }
}

impl Authenticator for TokenAuth {
    fn proof(
        &self,
        _key: usize,
        role: Role,
        binding: &[u8; 32],
        client_nonce: &[u8; 32],
        server_nonce: &[u8; 32],
    ) -> [u8; 32] {
        proof(&self.key, role, binding, client_nonce, server_nonce)
    }
}

/// The v1 proof of `role` keyed by the verifier `key` (wire/PROTOCOL.md, section 4).
pub(crate) fn proof(
    key: &[u8; 32],
    role: Role,
    binding: &[u8; 32],
    client_nonce: &[u8; 32],
    server_nonce: &[u8; 32],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(match role {
        Role::Client => b"ferry-v1 client",
        Role::Server => b"ferry-v1 server",
    });
    h.update(binding);
    h.update(client_nonce);
    h.update(server_nonce);
    *h.finalize().as_bytes()
}

/// Refuse a secret file that group or others may access (any of the mode bits 0o077), as
/// ssh refuses such a private key: the error names the file, its mode and the fix.
pub fn check_private(path: &Path, what: &str) -> Result<()> {
    let meta = fs::metadata(path).map_err(|source| MoveError::Token { path: path.to_path_buf(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(MoveError::BadToken(format!(
            "{what} {} is accessible by group or others (mode {mode:04o}); it holds a secret: \
             run `chmod 600 {}` (and check who could read it)",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source works");
    b
}

/// Write a new random token (64 hex characters) to `path`, mode 0600; never overwrites.
pub fn write_new_token(path: &Path) -> Result<()> {
    let token: String = random_bytes::<32>().iter().map(|b| format!("{b:02x}")).collect();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| MoveError::file("creating token file", path, e))?;
    f.write_all(format!("{token}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| MoveError::file("writing token file", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_differ_by_role_token_and_nonce() {
        let a = TokenAuth::new(b"0123456789abcdef0123");
        let b = TokenAuth::new(b"0123456789abcdef0124");
        let (c, s, z) = ([1u8; 32], [2u8; 32], [0u8; 32]);
        assert_ne!(a.proof(0, Role::Client, &z, &c, &s), a.proof(0, Role::Server, &z, &c, &s));
        assert_ne!(a.proof(0, Role::Client, &z, &c, &s), b.proof(0, Role::Client, &z, &c, &s));
        assert_ne!(a.proof(0, Role::Client, &z, &c, &s), a.proof(0, Role::Client, &z, &s, &c));
        assert_ne!(
            a.proof(0, Role::Client, &z, &c, &s),
            a.proof(0, Role::Client, &[9; 32], &c, &s),
            "bound to the channel"
        );
        assert_eq!(a.proof(0, Role::Client, &z, &c, &s), a.proof(0, Role::Client, &z, &c, &s));
        // The verifier key proves what the token proves.
        let v = TokenAuth::from_verifier_key(a.verifier_key());
        assert_eq!(v.proof(0, Role::Client, &z, &c, &s), a.proof(0, Role::Client, &z, &c, &s));
    }

    #[test]
    fn token_file_roundtrip_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        write_new_token(&p).unwrap();
        let text = fs::read_to_string(&p).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_new_token(&p).is_err(), "never overwrites");
        // Whitespace around the token is ignored.
        let q = dir.path().join("q");
        fs::write(&q, format!("  {}  \n\n", text.trim())).unwrap();
        fs::set_permissions(&q, fs::Permissions::from_mode(0o600)).unwrap();
        let (c, s) = ([3u8; 32], [4u8; 32]);
        assert_eq!(
            TokenAuth::from_file(&p).unwrap().proof(0, Role::Client, &[0; 32], &c, &s),
            TokenAuth::from_file(&q).unwrap().proof(0, Role::Client, &[0; 32], &c, &s)
        );
        fs::write(&q, "\n").unwrap();
        assert!(TokenAuth::from_file(&q).unwrap_err().to_string().contains("ferry token new"));
    }

    #[test]
    fn a_token_file_that_group_or_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        write_new_token(&p).unwrap();
        for mode in [0o640, 0o604, 0o644, 0o660, 0o601] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let e = TokenAuth::from_file(&p).unwrap_err();
            assert_eq!(e.class(), ferry_io::ErrorClass::Usage);
            assert_eq!(
                e.to_string(),
                format!(
                    "token file {} is accessible by group or others (mode {mode:04o}); it holds a secret: run \
                     `chmod 600 {}` (and check who could read it)",
                    p.display(),
                    p.display()
                )
            );
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        TokenAuth::from_file(&p).unwrap();
    }
}
