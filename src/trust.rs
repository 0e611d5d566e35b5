//! Enrolment and trust between servers: who may be a server of this cluster.
//!
//! The cluster's **root** key (the trust anchor, kept offline; `lemonade-nexus root init`) signs
//! two kinds of objects, each in the one signed envelope of `crate::signed`:
//!
//! * a [`ServerCert`] (tag [`TAG_SERVER_CERT`]): "the Ed25519 key `server`, named `name`, is a
//!   server of this cluster until `expires_at_ms`" (`lemonade-nexus enroll-server`);
//! * a [`Revocation`] (tag [`TAG_REVOCATION`]): "the key `server` is no longer a server of this
//!   cluster, permanently" (`lemonade-nexus revoke-server`).
//!
//! Both travel in the replicated log inside a [`TrustOp`] (`OpBody::Trust`), so every server folds
//! the same admissions and revocations in the same order (`crate::state`, DESIGN §4.4):
//!
//! * `AdmitServer { cert }` is the first op of every server's own log (author = origin = the
//!   certified key; the root's signature is the proof, no author proof is needed). It takes effect
//!   when the certificate verifies against the state's root, names the op's author, is not expired
//!   **at the op's HLC** (never the local clock: the fold is deterministic), and the key was not
//!   revoked. Effect: the key becomes an active server and holds `admin` on the root, so
//!   `crate::authz::authorize` stays the one place that decides permissions.
//! * `RevokeServer { revocation }` may be carried by any active server. Effect: the key is marked
//!   revoked for good (a later `AdmitServer` for it has no effect), its grants are removed from
//!   every node, its server nodes leave the backbone, and every later op (in fold order) whose
//!   origin is that key has no effect. Its earlier ops keep their effect.
//!
//! The signing and checking here are pure (time is an argument); the fold lives in
//! `crate::state` (`src/state/trust_fold.rs`).

use std::collections::{BTreeMap, BTreeSet};

use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::keys::PublicKey;
use crate::signed::{self, EnvelopeError, Header, TAG_REVOCATION, TAG_SERVER_CERT};

/// Longest revocation reason, in bytes (UTF-8).
pub const MAX_REASON_BYTES: usize = 256;
/// Largest certificate or revocation envelope accepted inside a trust op, in bytes (a real one is
/// about 250 bytes).
pub const MAX_TRUST_OBJECT_BYTES: usize = 2048;

/// A server's admission to the cluster, signed by the cluster root key (envelope tag
/// [`TAG_SERVER_CERT`]; CDDL in `data-schema/server-cert.cddl`). The envelope header repeats
/// `issued_at_ms` and `expires_at_ms`; its nonce is 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerCert {
    /// The server's Ed25519 identity key.
    pub server: PublicKey,
    /// The server's name: a DNS label (the `--id` of `enroll-server`), stored lowercase.
    pub name: String,
    /// When the root signed it (unix ms).
    pub issued_at_ms: u64,
    /// When it stops admitting (unix ms); 0 = never.
    pub expires_at_ms: u64,
}

/// A server's revocation, signed by the cluster root key (envelope tag [`TAG_REVOCATION`]; CDDL in
/// `data-schema/revocation.cddl`). Never expires; the envelope's nonce is 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The revoked server's Ed25519 identity key.
    pub server: PublicKey,
    /// When the root signed it (unix ms).
    pub issued_at_ms: u64,
    /// Why, for the operators (at most [`MAX_REASON_BYTES`] bytes; may be empty).
    pub reason: String,
}

/// A trust change in the replicated log (`OpBody::Trust`). CBOR: externally tagged, like the other
/// op bodies: `{"admit_server": {"cert": bstr}}`, `{"revoke_server": {"revocation": bstr}}`. The
/// byte strings are the exact envelopes the root signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustOp {
    /// The op's author (= its origin) admits itself with its certificate.
    AdmitServer {
        #[serde(with = "bounded_bytes")]
        cert: Vec<u8>,
    },
    /// An active server carries the root's revocation of some server.
    RevokeServer {
        #[serde(with = "bounded_bytes")]
        revocation: Vec<u8>,
    },
}

/// One row of the trust table: what the fold knows about one server key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    /// The name of its latest admitting certificate ("" if never admitted).
    pub name: String,
    /// HLC of its first admission; `None` if it was revoked before ever being admitted.
    pub admitted: Option<Hlc>,
    /// Expiry of its latest admitting certificate (unix ms, 0 = never). Informational: expiry is
    /// checked when an admission is folded, and a server re-admits itself with a renewed
    /// certificate.
    pub expires_at_ms: u64,
    /// HLC of the revocation, if revoked (permanent).
    pub revoked: Option<Hlc>,
    /// The revocation's reason ("" if none).
    pub revoke_reason: String,
}

impl ServerStatus {
    /// Admitted and not revoked.
    pub fn is_active(&self) -> bool {
        self.admitted.is_some() && self.revoked.is_none()
    }
}

/// Why a certificate, a revocation or a trust op was refused. Display says what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("{what}: {source}")]
    Envelope {
        what: &'static str,
        source: EnvelopeError,
    },
    #[error("{what} is signed by {signer}, but this cluster's root is {root}")]
    WrongRoot {
        what: &'static str,
        signer: PublicKey,
        root: PublicKey,
    },
    #[error(
        "server certificate for {server} expired at {expires_at_ms} ms (checked at {at_ms} ms); issue a new one with `lemonade-nexus enroll-server`"
    )]
    Expired {
        server: PublicKey,
        expires_at_ms: u64,
        at_ms: u64,
    },
    #[error(
        "server name {0:?} is not a DNS label (1-63 letters, digits or '-', not starting or ending with '-')"
    )]
    BadName(String),
    #[error("revocation reason is {len} bytes; the limit is {MAX_REASON_BYTES}")]
    ReasonTooLong { len: usize },
    #[error("{what}: the envelope header does not match the signed object ({field})")]
    HeaderMismatch {
        what: &'static str,
        field: &'static str,
    },
    #[error("server certificate is for {cert_server}, but the op admitting it is by {author}")]
    NotTheAuthor {
        cert_server: PublicKey,
        author: PublicKey,
    },
    #[error("server {0} is revoked; a revoked key cannot be admitted again")]
    Revoked(PublicKey),
    #[error("the cluster root {0} cannot be revoked")]
    RootNotRevocable(PublicKey),
    #[error("revocation carried by {0}, which is not an active server of this cluster")]
    CarrierNotActive(PublicKey),
    #[error("trust op by {0}, which is revoked")]
    OriginRevoked(PublicKey),
}

const WHAT_CERT: &str = "server certificate";
const WHAT_REVOCATION: &str = "revocation";

/// Signs `cert` with the cluster root key. Panics only if `cert` is not encodable (never: plain
/// fields). Check the name first with [`check_name`] to give a friendly error.
pub fn seal_server_cert(root: &Ed25519KeyPair, cert: &ServerCert) -> Vec<u8> {
    let header = Header {
        tag: TAG_SERVER_CERT,
        issued_at_ms: cert.issued_at_ms,
        expires_at_ms: cert.expires_at_ms,
        nonce: 0,
    };
    signed::seal(root, &header, &signed::to_cbor(cert))
}

/// Checks a server certificate: signed by `root`, canonical, header consistent, a valid name, and
/// not expired at `now_ms` (the op's HLC wall time in the fold; the local clock elsewhere).
pub fn verify_server_cert(
    bytes: &[u8],
    root: &PublicKey,
    now_ms: u64,
) -> Result<ServerCert, TrustError> {
    let cert = decode_server_cert(bytes, root)?;
    if cert.expires_at_ms != 0 && now_ms >= cert.expires_at_ms {
        return Err(TrustError::Expired {
            server: cert.server,
            expires_at_ms: cert.expires_at_ms,
            at_ms: now_ms,
        });
    }
    Ok(cert)
}

/// [`verify_server_cert`] without the expiry check (to show an expired certificate).
pub fn decode_server_cert(bytes: &[u8], root: &PublicKey) -> Result<ServerCert, TrustError> {
    let env = open_envelope(bytes, TAG_SERVER_CERT, WHAT_CERT, root)?;
    let cert: ServerCert = payload(&env.payload, WHAT_CERT)?;
    if env.issued_at_ms != cert.issued_at_ms {
        return Err(mismatch(WHAT_CERT, "issued_at_ms"));
    }
    if env.expires_at_ms != cert.expires_at_ms {
        return Err(mismatch(WHAT_CERT, "expires_at_ms"));
    }
    if env.nonce != 0 {
        return Err(mismatch(WHAT_CERT, "nonce"));
    }
    check_name(&cert.name)?;
    Ok(cert)
}

/// Signs `revocation` with the cluster root key.
pub fn seal_revocation(root: &Ed25519KeyPair, revocation: &Revocation) -> Vec<u8> {
    let header = Header {
        tag: TAG_REVOCATION,
        issued_at_ms: revocation.issued_at_ms,
        expires_at_ms: 0,
        nonce: 0,
    };
    signed::seal(root, &header, &signed::to_cbor(revocation))
}

/// Checks a revocation: signed by `root`, canonical, header consistent, reason bounded. A
/// revocation never expires, so no clock is involved.
pub fn verify_revocation(bytes: &[u8], root: &PublicKey) -> Result<Revocation, TrustError> {
    let env = open_envelope(bytes, TAG_REVOCATION, WHAT_REVOCATION, root)?;
    let r: Revocation = payload(&env.payload, WHAT_REVOCATION)?;
    if env.issued_at_ms != r.issued_at_ms {
        return Err(mismatch(WHAT_REVOCATION, "issued_at_ms"));
    }
    if env.expires_at_ms != 0 || env.nonce != 0 {
        return Err(mismatch(WHAT_REVOCATION, "expires_at_ms/nonce"));
    }
    if r.reason.len() > MAX_REASON_BYTES {
        return Err(TrustError::ReasonTooLong {
            len: r.reason.len(),
        });
    }
    Ok(r)
}

/// Whether `key`, presenting `cert` (possibly empty), may act as a server of the cluster whose
/// folded state is `state`, at local time `now_ms` (for transports admitting peers, e.g. gossip).
///
/// * revoked: never;
/// * already an active server in the state: yes; a presented certificate must still be signed by
///   the root and name `key`, but its expiry does not matter (expiry is an admission rule, checked
///   once, at the admitting op's HLC; an admitted server needs no renewal);
/// * the root key itself: yes (the single-server cluster whose root runs as the server);
/// * otherwise (not yet admitted, e.g. a server joining): `cert` must verify now and name `key`.
pub fn check_peer(
    state: &crate::state::State,
    key: &PublicKey,
    cert: &[u8],
    now_ms: u64,
) -> Result<(), TrustError> {
    let root = *state.tree().anchor();
    if state.is_revoked(key) {
        return Err(TrustError::Revoked(*key));
    }
    let named = |c: ServerCert| {
        if c.server == *key {
            Ok(())
        } else {
            Err(TrustError::NotTheAuthor {
                cert_server: c.server,
                author: *key,
            })
        }
    };
    if state.is_active_server(key) || *key == root {
        if cert.is_empty() {
            return Ok(());
        }
        return named(decode_server_cert(cert, &root)?);
    }
    named(verify_server_cert(cert, &root, now_ms)?)
}

/// A server name must be a DNS label (it is also the server's hostname in the tree).
pub fn check_name(name: &str) -> Result<(), TrustError> {
    if crate::tree::is_dns_label(name) && name == name.to_ascii_lowercase() {
        Ok(())
    } else {
        Err(TrustError::BadName(name.to_owned()))
    }
}

fn open_envelope(
    bytes: &[u8],
    tag: &str,
    what: &'static str,
    root: &PublicKey,
) -> Result<signed::Envelope, TrustError> {
    if bytes.len() > MAX_TRUST_OBJECT_BYTES {
        return Err(TrustError::Envelope {
            what,
            source: EnvelopeError::TooLarge {
                len: bytes.len(),
                max: MAX_TRUST_OBJECT_BYTES,
            },
        });
    }
    let env = signed::verify(bytes, tag).map_err(|source| TrustError::Envelope { what, source })?;
    if env.signer != *root {
        return Err(TrustError::WrongRoot {
            what,
            signer: env.signer,
            root: *root,
        });
    }
    Ok(env)
}

fn payload<T>(bytes: &[u8], what: &'static str) -> Result<T, TrustError>
where
    T: serde::de::DeserializeOwned + Serialize,
{
    signed::from_cbor_canonical(bytes).map_err(|source| TrustError::Envelope { what, source })
}

fn mismatch(what: &'static str, field: &'static str) -> TrustError {
    TrustError::HeaderMismatch { what, field }
}

/// The trust table of the state: one [`ServerStatus`] per server key ever admitted or revoked,
/// plus the keys changed since the last persistence (`crate::state::State::take_changes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustTable {
    servers: BTreeMap<PublicKey, ServerStatus>,
    dirty: BTreeSet<PublicKey>,
}

impl TrustTable {
    /// Rebuilds the table from stored rows (nothing dirty).
    pub fn from_rows(servers: BTreeMap<PublicKey, ServerStatus>) -> Self {
        TrustTable {
            servers,
            dirty: BTreeSet::new(),
        }
    }

    /// Every row, by key (the persistent part; what the state hash covers).
    pub fn map(&self) -> &BTreeMap<PublicKey, ServerStatus> {
        &self.servers
    }

    pub fn get(&self, key: &PublicKey) -> Option<&ServerStatus> {
        self.servers.get(key)
    }

    /// Inserts or replaces one row.
    pub fn put(&mut self, key: PublicKey, status: ServerStatus) {
        self.servers.insert(key, status);
        self.dirty.insert(key);
    }

    /// Keys changed since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<PublicKey> {
        std::mem::take(&mut self.dirty)
    }

    /// Marks every row dirty (a full rewrite).
    pub fn mark_all_dirty(&mut self) {
        self.dirty.extend(self.servers.keys().copied());
    }
}

/// Serde for the envelope bytes inside a [`TrustOp`]: a CBOR byte string of at most
/// [`MAX_TRUST_OBJECT_BYTES`] (a `Vec<u8>` would otherwise be an array of integers).
mod bounded_bytes {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    use super::MAX_TRUST_OBJECT_BYTES;

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of at most {MAX_TRUST_OBJECT_BYTES} bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                if v.len() > MAX_TRUST_OBJECT_BYTES {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}

pub mod cli;
pub mod root_key;

#[cfg(test)]
mod tests;
