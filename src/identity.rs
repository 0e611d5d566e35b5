//! Node identity: one Ed25519 signing key per node, and a separate, rotatable WireGuard X25519 key.
//! Both are stored encrypted at rest under `<data dir>/identity/`.
//!
//! How the encryption works (README "Identity and keys at rest"):
//! * A 32-byte random **master key** lives OUTSIDE the data directory (default
//!   `/etc/lemonade-nexus/master.key`, mode 0600, created on first start). It has full entropy, so
//!   no slow password KDF is needed; refusing a master key inside the data directory keeps a copy
//!   of the data directory alone useless to an attacker.
//! * Each key file has its own random 16-byte salt; the file key is
//!   `HKDF-SHA256(salt, master, info = "lemonade-nexus/keyfile/v1/" || purpose)`.
//! * The secret is sealed with ChaCha20-Poly1305 (ring) under a random 96-bit nonce, with the file
//!   header (magic, version, purpose) as associated data, so a file cannot be swapped for another
//!   purpose's file (for example the WireGuard key presented as the node key).
//! * Files are written atomically: temp file (mode 0600), fsync, rename, fsync of the directory.
//!
//! File layout: `"LNXKEY" | version (1 byte) | purpose length (1 byte) | purpose | salt (16) |
//! nonce (12) | ciphertext (32) | tag (16)`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::rand::SecureRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::keys::PublicKey;

const MAGIC: &[u8; 6] = b"LNXKEY";
const FILE_VERSION: u8 = 1;
const SALT_LEN: usize = 16;
const PURPOSE_NODE: &str = "node-ed25519";
const PURPOSE_WG: &str = "wireguard-x25519";

/// The file names under `<data dir>/identity/`.
pub const NODE_KEY_FILE: &str = "node.key";
/// See [`NODE_KEY_FILE`].
pub const WG_KEY_FILE: &str = "wireguard.key";

/// Everything that can go wrong loading or creating keys. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "master key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    MasterKeyPermissions { path: PathBuf, mode: u32 },
    #[error("master key file {path} must hold exactly 32 bytes, found {len}")]
    MasterKeyLength { path: PathBuf, len: usize },
    #[error(
        "master key file {master} is inside the data directory {data_dir}; keep it elsewhere so a copy of the data directory does not reveal the keys"
    )]
    MasterKeyInsideDataDir { master: PathBuf, data_dir: PathBuf },
    #[error(
        "{path} cannot be decrypted: wrong master key, or the file is corrupt or belongs to another purpose"
    )]
    Decrypt { path: PathBuf },
    #[error("{path} is not a Lemonade Nexus key file ({why})")]
    Format { path: PathBuf, why: &'static str },
    #[error("no identity in {0}; run `lemonade-nexus init` first")]
    Missing(PathBuf),
    #[error("the system random number generator failed")]
    Random,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The 32-byte master key from which every key-file encryption key is derived.
pub struct MasterKey([u8; 32]);

impl Drop for MasterKey {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl MasterKey {
    /// Builds a master key from raw bytes (tests and tooling).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(bytes)
    }

    /// Loads the master key at `path`, creating it (32 random bytes, mode 0600, parent directory
    /// mode 0700) if it does not exist. Refuses a file that group or others can read.
    pub fn load_or_create(path: &Path, rng: &dyn SecureRandom) -> Result<Self, IdentityError> {
        if !path.exists() {
            let mut k = [0u8; 32];
            rng.fill(&mut k).map_err(|_| IdentityError::Random)?;
            if let Some(parent) = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty() && !p.exists())
            {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(io(parent))?;
            }
            write_atomic(path, &k)?;
            wipe(&mut k);
        }
        Self::load(path)
    }

    /// Loads an existing master key.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let meta = fs::metadata(path).map_err(io(path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::MasterKeyPermissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut bytes = fs::read(path).map_err(io(path))?;
        let arr: Result<[u8; 32], _> = bytes.as_slice().try_into();
        let len = bytes.len();
        wipe(&mut bytes);
        arr.map(MasterKey)
            .map_err(|_| IdentityError::MasterKeyLength {
                path: path.to_owned(),
                len,
            })
    }
}

/// The node's Ed25519 signing identity.
pub struct NodeKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl NodeKey {
    /// The key pair for a 32-byte Ed25519 seed (RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let pair =
            Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are an Ed25519 seed");
        let public = PublicKey(
            pair.public_key()
                .as_ref()
                .try_into()
                .expect("32-byte public key"),
        );
        NodeKey { pair, public }
    }

    /// The public key (the node's name in signed state).
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The ring key pair, for signing envelopes.
    pub fn pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }
}

/// A WireGuard (X25519) private key: 32 random bytes, clamped as `wg genkey` does.
pub struct WireGuardKey {
    secret: [u8; 32],
    public: [u8; 32],
}

impl Drop for WireGuardKey {
    fn drop(&mut self) {
        wipe(&mut self.secret);
    }
}

impl WireGuardKey {
    /// The key for 32 raw bytes (clamped here, so any bytes give a valid key).
    pub fn from_bytes(mut secret: [u8; 32]) -> Self {
        secret[0] &= 248;
        secret[31] &= 127;
        secret[31] |= 64;
        let public =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes();
        WireGuardKey { secret, public }
    }

    /// A fresh random key.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, IdentityError> {
        let mut b = [0u8; 32];
        rng.fill(&mut b).map_err(|_| IdentityError::Random)?;
        let k = Self::from_bytes(b);
        wipe(&mut b);
        Ok(k)
    }

    /// The public key, base64 (what `wg pubkey` prints).
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public)
    }

    /// The public key bytes.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The private key, base64 (what `wg genkey` prints). Handle with care: never log it.
    pub fn private_base64(&self) -> String {
        STANDARD.encode(self.secret)
    }
}

/// A node's keys, loaded from (or created in) `<data dir>/identity/`.
pub struct Identity {
    /// Ed25519 signing identity.
    pub node: NodeKey,
    /// WireGuard key.
    pub wireguard: WireGuardKey,
}

/// The directory holding the key files.
pub fn identity_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

/// Refuses a master key stored inside the data directory.
pub fn check_master_outside(master_path: &Path, data_dir: &Path) -> Result<(), IdentityError> {
    let m = std::path::absolute(master_path).map_err(io(master_path))?;
    let d = std::path::absolute(data_dir).map_err(io(data_dir))?;
    if m.starts_with(&d) {
        return Err(IdentityError::MasterKeyInsideDataDir {
            master: m,
            data_dir: d,
        });
    }
    Ok(())
}

impl Identity {
    /// Loads the identity, creating missing keys on first start. Returns whether anything was created.
    pub fn load_or_create(
        data_dir: &Path,
        master: &MasterKey,
        rng: &dyn SecureRandom,
    ) -> Result<(Self, bool), IdentityError> {
        let dir = identity_dir(data_dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let mut created = false;
        let node_path = dir.join(NODE_KEY_FILE);
        if !node_path.exists() {
            let mut seed = [0u8; 32];
            rng.fill(&mut seed).map_err(|_| IdentityError::Random)?;
            write_sealed(&node_path, PURPOSE_NODE, &seed, master, rng)?;
            wipe(&mut seed);
            created = true;
        }
        let wg_path = dir.join(WG_KEY_FILE);
        if !wg_path.exists() {
            let k = WireGuardKey::generate(rng)?;
            write_sealed(&wg_path, PURPOSE_WG, &k.secret, master, rng)?;
            created = true;
        }
        Ok((Self::load(data_dir, master)?, created))
    }

    /// Loads an existing identity; never creates anything.
    pub fn load(data_dir: &Path, master: &MasterKey) -> Result<Self, IdentityError> {
        let dir = identity_dir(data_dir);
        let node_path = dir.join(NODE_KEY_FILE);
        if !node_path.exists() {
            return Err(IdentityError::Missing(data_dir.to_owned()));
        }
        let mut seed = read_sealed(&node_path, PURPOSE_NODE, master)?;
        let node = NodeKey::from_seed(&seed);
        wipe(&mut seed);
        let mut wg = read_sealed(&dir.join(WG_KEY_FILE), PURPOSE_WG, master)?;
        let wireguard = WireGuardKey::from_bytes(wg);
        wipe(&mut wg);
        Ok(Identity { node, wireguard })
    }

    /// Replaces the WireGuard key with a fresh one (atomically) and returns the new key. The
    /// Ed25519 identity is untouched.
    pub fn rotate_wireguard(
        data_dir: &Path,
        master: &MasterKey,
        rng: &dyn SecureRandom,
    ) -> Result<WireGuardKey, IdentityError> {
        // Load first: refuses to rotate with a wrong master key (which would orphan the identity).
        let _current = Self::load(data_dir, master)?;
        let k = WireGuardKey::generate(rng)?;
        write_sealed(
            &identity_dir(data_dir).join(WG_KEY_FILE),
            PURPOSE_WG,
            &k.secret,
            master,
            rng,
        )?;
        Ok(k)
    }
}

fn header(purpose: &str) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.push(FILE_VERSION);
    h.push(purpose.len() as u8);
    h.extend_from_slice(purpose.as_bytes());
    h
}

fn file_key(master: &MasterKey, salt: &[u8], purpose: &str) -> LessSafeKey {
    let info_text = format!("lemonade-nexus/keyfile/v1/{purpose}");
    let info = [info_text.as_bytes()];
    let prk = Salt::new(HKDF_SHA256, salt).extract(&master.0);
    let okm = prk
        .expand(&info, &CHACHA20_POLY1305)
        .expect("HKDF output length fits ChaCha20-Poly1305");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Encrypts `secret` for `purpose` and writes it atomically with mode 0600.
fn write_sealed(
    path: &Path,
    purpose: &str,
    secret: &[u8; 32],
    master: &MasterKey,
    rng: &dyn SecureRandom,
) -> Result<(), IdentityError> {
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut salt).map_err(|_| IdentityError::Random)?;
    rng.fill(&mut nonce).map_err(|_| IdentityError::Random)?;
    let head = header(purpose);
    let mut buf = secret.to_vec();
    file_key(master, &salt, purpose)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&head),
            &mut buf,
        )
        .map_err(|_| IdentityError::Random)?;
    let mut out = head;
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    write_atomic(path, &out)
}

fn read_sealed(path: &Path, purpose: &str, master: &MasterKey) -> Result<[u8; 32], IdentityError> {
    let data = fs::read(path).map_err(io(path))?;
    let head = header(purpose);
    let fmt = |why| IdentityError::Format {
        path: path.to_owned(),
        why,
    };
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(fmt("bad magic"));
    }
    if data.get(MAGIC.len()) != Some(&FILE_VERSION) {
        return Err(fmt("unsupported key file version"));
    }
    if !data.starts_with(&head) {
        return Err(IdentityError::Decrypt {
            path: path.to_owned(),
        });
    }
    let rest = &data[head.len()..];
    if rest.len() != SALT_LEN + NONCE_LEN + 32 + 16 {
        return Err(fmt("wrong length"));
    }
    let (salt, rest) = rest.split_at(SALT_LEN);
    let (nonce, ct) = rest.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fmt("bad nonce"))?;
    let mut buf = ct.to_vec();
    let plain = file_key(master, salt, purpose)
        .open_in_place(nonce, Aad::from(&head), &mut buf)
        .map_err(|_| IdentityError::Decrypt {
            path: path.to_owned(),
        })?;
    let out: [u8; 32] = (&*plain)
        .try_into()
        .map_err(|_| fmt("wrong secret length"))?;
    wipe(&mut buf);
    Ok(out)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory (mode 0600), fsync,
/// rename over `path`, fsync of the directory. A crash leaves either the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// Overwrites a secret buffer with zeros in a way the optimizer keeps.
fn wipe(b: &mut [u8]) {
    for x in b.iter_mut() {
        // SAFETY: `x` is a valid, aligned, exclusive reference to a u8 of this slice.
        unsafe { std::ptr::write_volatile(x, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use std::process::{Command, Stdio};

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().expect("tempdir");
        let master = t.path().join("etc/master.key");
        let data = t.path().join("data");
        (t, master, data)
    }

    #[test]
    fn first_start_creates_encrypted_keys_with_mode_0600_and_reloads_them() {
        let (_t, mp, data) = setup();
        let rng = SystemRandom::new();
        let master = MasterKey::load_or_create(&mp, &rng).expect("master");
        assert_eq!(
            fs::metadata(&mp).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let (id, created) = Identity::load_or_create(&data, &master, &rng).expect("create");
        assert!(created);
        let (again, created) = Identity::load_or_create(&data, &master, &rng).expect("reload");
        assert!(!created);
        assert_eq!(id.node.public(), again.node.public());
        assert_eq!(id.wireguard.public(), again.wireguard.public());
        for f in [NODE_KEY_FILE, WG_KEY_FILE] {
            let p = identity_dir(&data).join(f);
            assert_eq!(
                fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
                0o600
            );
            let raw = fs::read(&p).expect("read");
            assert!(
                !raw.windows(32).any(|w| w == id.wireguard.secret),
                "secret stored in clear"
            );
        }
    }

    #[test]
    fn wrong_master_key_and_swapped_files_are_refused() {
        let (_t, _mp, data) = setup();
        let rng = SystemRandom::new();
        Identity::load_or_create(&data, &MasterKey::from_bytes([1; 32]), &rng).expect("create");
        let err = Identity::load(&data, &MasterKey::from_bytes([2; 32]))
            .err()
            .expect("wrong key");
        assert!(matches!(err, IdentityError::Decrypt { .. }), "{err}");
        // The WireGuard file copied over the node file: refused (purpose is authenticated).
        let dir = identity_dir(&data);
        fs::copy(dir.join(WG_KEY_FILE), dir.join(NODE_KEY_FILE)).expect("copy");
        let err = Identity::load(&data, &MasterKey::from_bytes([1; 32]))
            .err()
            .expect("swapped");
        assert!(matches!(err, IdentityError::Decrypt { .. }), "{err}");
    }

    #[test]
    fn tampered_key_file_is_refused() {
        let (_t, _mp, data) = setup();
        let m = MasterKey::from_bytes([1; 32]);
        Identity::load_or_create(&data, &m, &SystemRandom::new()).expect("create");
        let p = identity_dir(&data).join(NODE_KEY_FILE);
        let mut raw = fs::read(&p).expect("read");
        let last = raw.len() - 1;
        raw[last] ^= 1;
        fs::write(&p, raw).expect("write");
        assert!(matches!(
            Identity::load(&data, &m),
            Err(IdentityError::Decrypt { .. })
        ));
    }

    #[test]
    fn group_readable_master_key_is_refused() {
        let (_t, mp, _data) = setup();
        MasterKey::load_or_create(&mp, &SystemRandom::new()).expect("create");
        fs::set_permissions(&mp, fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = MasterKey::load(&mp).err().expect("refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn master_key_inside_the_data_dir_is_refused() {
        let (_t, _mp, data) = setup();
        assert!(check_master_outside(&data.join("master.key"), &data).is_err());
        assert!(check_master_outside(Path::new("/etc/lemonade-nexus/master.key"), &data).is_ok());
    }

    #[test]
    fn rotation_changes_only_the_wireguard_key() {
        let (_t, _mp, data) = setup();
        let m = MasterKey::from_bytes([5; 32]);
        let rng = SystemRandom::new();
        let (before, _) = Identity::load_or_create(&data, &m, &rng).expect("create");
        let new = Identity::rotate_wireguard(&data, &m, &rng).expect("rotate");
        let after = Identity::load(&data, &m).expect("load");
        assert_eq!(before.node.public(), after.node.public());
        assert_ne!(before.wireguard.public(), after.wireguard.public());
        assert_eq!(new.public(), after.wireguard.public());
    }

    /// The public key must be what WireGuard itself computes: checked against the real `wg` binary.
    #[test]
    fn wireguard_public_key_matches_wg_pubkey() {
        let rng = SystemRandom::new();
        for i in 0..8u8 {
            // Unclamped raw bytes too: `wg` clamps them the same way.
            let raw = if i == 0 { [0xff; 32] } else { [i; 32] };
            let k = if i < 2 {
                WireGuardKey::from_bytes(raw)
            } else {
                WireGuardKey::generate(&rng).expect("gen")
            };
            let mut child = Command::new("wg")
                .arg("pubkey")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("`wg` (wireguard-tools) must be installed for this test");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(k.private_base64().as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("wg pubkey");
            assert!(out.status.success());
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                k.public_base64()
            );
        }
    }
}
