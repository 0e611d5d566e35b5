//! The offline cluster root key file (`lemonade-nexus root init`), encrypted with a passphrase.
//!
//! The root key signs server certificates and revocations and nothing else; it belongs on an
//! offline machine. Unlike the node keys (`crate::identity`, sealed under a full-entropy master
//! key), it is sealed under a key derived from a human passphrase, so the KDF must be slow and
//! memory-hard: **Argon2id** (RFC 9106; the `argon2` crate) with m = 19 MiB, t = 2, p = 1 (the
//! OWASP minimum; stored in the file, so a later build can raise them), then ChaCha20-Poly1305
//! (ring) with the file header as associated data.
//!
//! File layout (written atomically, mode 0600, never overwritten):
//! `"LNXROOT" | version 1 | m_cost_kib u32 BE | t_cost u32 BE | p_cost u32 BE | public key (32) |
//! salt (16) | nonce (12) | ciphertext of the 32-byte Ed25519 seed (32) | tag (16)`.
//! The public key is readable without the passphrase (`root show`); it is covered by the AEAD, so
//! a file whose public key was edited does not open.

use std::path::{Path, PathBuf};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::SecureRandom;

use crate::identity::NodeKey;
use crate::keys::PublicKey;

const MAGIC: &[u8; 7] = b"LNXROOT";
const VERSION: u8 = 1;
const SALT_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + 1 + 12 + 32;
const FILE_LEN: usize = HEADER_LEN + SALT_LEN + NONCE_LEN + 32 + 16;

/// Argon2id parameters written into new files.
pub const M_COST_KIB: u32 = 19 * 1024;
pub const T_COST: u32 = 2;
pub const P_COST: u32 = 1;
/// Bounds on parameters read from a file (a hostile file must not make us allocate gigabytes).
const MAX_M_COST_KIB: u32 = 1024 * 1024;
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 16;
/// Shortest passphrase accepted by `root init`.
pub const MIN_PASSPHRASE_CHARS: usize = 8;

/// Everything that can go wrong with the root key file. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RootKeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite a root key (move it away first)")]
    Exists(PathBuf),
    #[error("{path} is not a Lemonade Nexus root key file ({why})")]
    Format { path: PathBuf, why: &'static str },
    #[error("{0} cannot be decrypted: wrong passphrase, or the file is corrupt")]
    Decrypt(PathBuf),
    #[error("the passphrase must be at least {MIN_PASSPHRASE_CHARS} characters")]
    WeakPassphrase,
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("the system random number generator failed")]
    Random,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RootKeyError + '_ {
    move |source| RootKeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates a new root key at `path` (which must not exist), sealed under `passphrase`. Returns
/// the key.
pub fn create(
    path: &Path,
    passphrase: &[u8],
    rng: &dyn SecureRandom,
) -> Result<NodeKey, RootKeyError> {
    if std::str::from_utf8(passphrase).map_or(passphrase.len(), |s| s.chars().count())
        < MIN_PASSPHRASE_CHARS
    {
        return Err(RootKeyError::WeakPassphrase);
    }
    if path.exists() {
        return Err(RootKeyError::Exists(path.to_owned()));
    }
    let mut seed = [0u8; 32];
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    for b in [&mut seed[..], &mut salt[..], &mut nonce[..]] {
        rng.fill(b).map_err(|_| RootKeyError::Random)?;
    }
    let key = NodeKey::from_seed(&seed);
    let head = header(M_COST_KIB, T_COST, P_COST, &key.public());
    let aead = derive(passphrase, &salt, M_COST_KIB, T_COST, P_COST)?;
    let mut buf = seed.to_vec();
    seed.fill(0);
    aead.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&head),
        &mut buf,
    )
    .map_err(|_| RootKeyError::Random)?;
    let mut out = head;
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    write_new(path, &out)?;
    Ok(key)
}

/// The public key recorded in the file (no passphrase needed; not authenticated until `load`).
pub fn public_key(path: &Path) -> Result<PublicKey, RootKeyError> {
    let data = read(path)?;
    Ok(parse(path, &data)?.public)
}

/// Opens the root key with `passphrase`.
pub fn load(path: &Path, passphrase: &[u8]) -> Result<NodeKey, RootKeyError> {
    let data = read(path)?;
    let f = parse(path, &data)?;
    let aead = derive(passphrase, f.salt, f.m, f.t, f.p)?;
    let nonce = Nonce::try_assume_unique_for_key(f.nonce).map_err(|_| RootKeyError::Format {
        path: path.to_owned(),
        why: "bad nonce",
    })?;
    let mut buf = f.sealed.to_vec();
    let plain = aead
        .open_in_place(nonce, Aad::from(f.head), &mut buf)
        .map_err(|_| RootKeyError::Decrypt(path.to_owned()))?;
    let mut seed: [u8; 32] = (&*plain).try_into().map_err(|_| RootKeyError::Format {
        path: path.to_owned(),
        why: "wrong secret length",
    })?;
    buf.fill(0);
    let key = NodeKey::from_seed(&seed);
    seed.fill(0);
    if key.public() != f.public {
        return Err(RootKeyError::Decrypt(path.to_owned()));
    }
    Ok(key)
}

fn header(m: u32, t: u32, p: u32, public: &PublicKey) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.push(VERSION);
    for v in [m, t, p] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h.extend_from_slice(public.as_bytes());
    h
}

struct Parsed<'a> {
    head: &'a [u8],
    m: u32,
    t: u32,
    p: u32,
    public: PublicKey,
    salt: &'a [u8],
    nonce: &'a [u8],
    sealed: &'a [u8],
}

fn parse<'a>(path: &Path, data: &'a [u8]) -> Result<Parsed<'a>, RootKeyError> {
    let fmt = |why| RootKeyError::Format {
        path: path.to_owned(),
        why,
    };
    if !data.starts_with(MAGIC) {
        return Err(fmt("bad magic"));
    }
    if data.get(MAGIC.len()) != Some(&VERSION) {
        return Err(fmt("unsupported version"));
    }
    if data.len() != FILE_LEN {
        return Err(fmt("wrong length"));
    }
    let u32_at = |i: usize| {
        u32::from_be_bytes(
            data[i..i + 4]
                .try_into()
                .expect("4 bytes inside a checked length"),
        )
    };
    let base = MAGIC.len() + 1;
    let (m, t, p) = (u32_at(base), u32_at(base + 4), u32_at(base + 8));
    if m > MAX_M_COST_KIB || t > MAX_T_COST || p > MAX_P_COST {
        return Err(fmt("key derivation parameters out of range"));
    }
    let public = PublicKey(
        data[base + 12..HEADER_LEN]
            .try_into()
            .expect("32 bytes inside a checked length"),
    );
    let (salt, rest) = data[HEADER_LEN..].split_at(SALT_LEN);
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    Ok(Parsed {
        head: &data[..HEADER_LEN],
        m,
        t,
        p,
        public,
        salt,
        nonce,
        sealed,
    })
}

fn derive(
    passphrase: &[u8],
    salt: &[u8],
    m: u32,
    t: u32,
    p: u32,
) -> Result<LessSafeKey, RootKeyError> {
    let params =
        argon2::Params::new(m, t, p, Some(32)).map_err(|e| RootKeyError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut okm = [0u8; 32];
    argon
        .hash_password_into(passphrase, salt, &mut okm)
        .map_err(|e| RootKeyError::Kdf(e.to_string()))?;
    let key = UnboundKey::new(&CHACHA20_POLY1305, &okm).map_err(|_| RootKeyError::Random)?;
    okm.fill(0);
    Ok(LessSafeKey::new(key))
}

fn read(path: &Path) -> Result<Vec<u8>, RootKeyError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.len() > 4096 {
        return Err(RootKeyError::Format {
            path: path.to_owned(),
            why: "too large",
        });
    }
    std::fs::read(path).map_err(io(path))
}

/// Writes a new file with mode 0600; fails if it exists (no overwrite, even in a race).
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), RootKeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => RootKeyError::Exists(path.to_owned()),
            _ => RootKeyError::Io {
                path: path.to_owned(),
                source: e,
            },
        })?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    fn create_load_show_and_refusals() {
        let dir = std::env::temp_dir().join(format!("ln-root-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("root.key");
        assert!(matches!(
            create(&path, b"short", &SystemRandom::new()),
            Err(RootKeyError::WeakPassphrase)
        ));
        let key = create(&path, b"correct horse", &SystemRandom::new()).expect("create");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(public_key(&path).expect("show"), key.public());
        assert_eq!(
            load(&path, b"correct horse").expect("load").public(),
            key.public()
        );
        assert!(matches!(
            load(&path, b"wrong horse!"),
            Err(RootKeyError::Decrypt(_))
        ));
        assert!(matches!(
            create(&path, b"correct horse", &SystemRandom::new()),
            Err(RootKeyError::Exists(_))
        ));
        // An edited public key (header is authenticated) does not open.
        let mut data = std::fs::read(&path).expect("read");
        data[HEADER_LEN - 1] ^= 1;
        let edited = dir.join("edited.key");
        std::fs::write(&edited, &data).expect("write");
        assert!(matches!(
            load(&edited, b"correct horse"),
            Err(RootKeyError::Decrypt(_))
        ));
        // Absurd KDF parameters in a hostile file are refused before any allocation.
        let mut data = std::fs::read(&path).expect("read");
        data[MAGIC.len() + 1..MAGIC.len() + 5].copy_from_slice(&u32::MAX.to_be_bytes());
        let hostile = dir.join("hostile.key");
        std::fs::write(&hostile, &data).expect("write");
        assert!(matches!(
            load(&hostile, b"correct horse"),
            Err(RootKeyError::Format { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
