//! The one signed envelope that carries every replicated fact (DESIGN §4.3).
//!
//! Wire form (CDDL in `data-schema/envelope.cddl`), a CBOR array of exactly 8 items:
//!
//! ```text
//! [ tag: tstr, schema: uint, signer: bstr .size 32, issued_at_ms: uint, expires_at_ms: uint,
//!   nonce: uint, payload: bstr, signature: bstr .size 64 ]
//! ```
//!
//! * Deterministic: definite lengths, shortest-form integers, no tags, no floats. Decoding rejects
//!   anything else, so one fact has exactly one byte string (hashes and de-duplication are stable).
//! * The signature is Ed25519 over `tag || 0x00 || tbs`, where `tbs` is the CBOR array of the
//!   first seven items (the same bytes as the envelope minus its signature, with the array head
//!   `0x87`). The tag is both inside the signed array and prefixed, so a signature made for one
//!   object type can never be read as another.
//! * `payload` is the deterministic CBOR (ciborium) encoding of the object; its type is named by
//!   the tag. The payload stays a byte string so verification never re-encodes anything.
//! * `expires_at_ms == 0` means "never expires": used for log ops, which are permanent facts that
//!   may be replicated long after they were written (their replay protection is `(origin, seq)`).
//!   Short-lived objects (requests, tickets) set a real expiry and use [`ReplayGuard`].
//!
//! **One verification rule** (DESIGN §4.3): every path — local writes, gossip, catch-up — checks
//! each signature singly: a signer key of small order (the 8-torsion, any encoding) is refused, then
//! ring's `UnparsedPublicKey::verify` decides (RFC 8032 cofactorless verification, which rejects
//! non-canonical `S`). There is no batch verification anywhere, so every server accepts exactly
//! the same set of signatures. (A refold re-reads ops from the local log, which only ever holds
//! ops that passed this rule, and does not re-check them.) The tests pin ring's behaviour on the
//! edge cases (non-canonical `S`, the identity key's universal "signature"), so a library upgrade
//! that changes it is noticed before replicas could disagree.
//!
//! The envelope codec is written out here (about 100 lines) rather than derived through serde so it
//! is strict, bounded and allocation-light; a test checks that ciborium reads and writes the same
//! bytes.

use std::collections::HashMap;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::keys::PublicKey;

/// Largest envelope accepted, in bytes. Decoding checks this before reading anything.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
/// Largest domain-separation tag, in bytes.
pub const MAX_TAG_BYTES: usize = 64;
/// The envelope schema version this code writes and reads.
pub const SCHEMA_VERSION: u64 = 1;

/// Tag of an op appended to a server's log (payload: `crate::op::Op`), signed by the origin server.
pub const TAG_OP: &str = "lemonade-nexus/op/v1";
/// Tag of an author's request for a change (payload: `crate::op::OpBody`), signed by the author.
pub const TAG_REQUEST: &str = "lemonade-nexus/request/v1";
/// Tag of a server certificate (payload: `crate::trust::ServerCert`), signed by the cluster root.
pub const TAG_SERVER_CERT: &str = "lemonade-nexus/server-cert/v1";
/// Tag of a server revocation (payload: `crate::trust::Revocation`), signed by the cluster root.
pub const TAG_REVOCATION: &str = "lemonade-nexus/revocation/v1";

/// A decoded envelope whose signature has been verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Domain-separation tag: names the payload type.
    pub tag: String,
    /// Envelope schema version.
    pub schema: u64,
    /// Ed25519 public key of the signer.
    pub signer: PublicKey,
    /// When the object was issued (unix ms).
    pub issued_at_ms: u64,
    /// When it stops being valid (unix ms); 0 = never.
    pub expires_at_ms: u64,
    /// Replay protection: unique per signer for objects that expire (random or a counter).
    pub nonce: u64,
    /// Deterministic CBOR of the object.
    pub payload: Vec<u8>,
    /// Ed25519 signature over `tag || 0x00 || tbs`.
    pub signature: [u8; 64],
}

/// Why an envelope was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("signed object is {len} bytes; the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("signed object is malformed: {0}")]
    Malformed(&'static str),
    #[error("signed object has tag {found:?}, expected {expected:?}")]
    WrongTag { expected: String, found: String },
    #[error("signed object has schema version {found}; this build supports {supported}")]
    UnsupportedSchema { found: u64, supported: u64 },
    #[error("signer key {signer} is a point of small order (such a key would sign every message)")]
    WeakSignerKey { signer: PublicKey },
    #[error("signature does not verify for signer {signer}")]
    BadSignature { signer: PublicKey },
    #[error("signed object expired at {expires_at_ms} ms (now {now_ms} ms)")]
    Expired { expires_at_ms: u64, now_ms: u64 },
    #[error(
        "signed object is issued at {issued_at_ms} ms, more than {max_skew_ms} ms after now ({now_ms} ms)"
    )]
    FromTheFuture {
        issued_at_ms: u64,
        now_ms: u64,
        max_skew_ms: u64,
    },
    #[error("signed object expires before it is issued")]
    InvertedValidity,
    #[error("signed object (signer {signer}, nonce {nonce}) was already seen: replay")]
    Replayed { signer: PublicKey, nonce: u64 },
    #[error("payload is not the canonical encoding of its object: {0}")]
    NonCanonicalPayload(&'static str),
}

/// The header fields of an envelope to be signed.
#[derive(Clone, Debug)]
pub struct Header<'a> {
    pub tag: &'a str,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub nonce: u64,
}

/// Signs `payload` (already deterministic CBOR) and returns the envelope bytes.
pub fn seal(key: &Ed25519KeyPair, header: &Header<'_>, payload: &[u8]) -> Vec<u8> {
    let signer = PublicKey(
        key.public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public key is 32 bytes"),
    );
    let mut out = unsigned_prefix(&signer, header, payload);
    let sig = key.sign(&signed_message(header.tag, &out[1..]));
    push_bytes(&mut out, sig.as_ref());
    out
}

/// Builds envelope bytes from their parts and a detached signature (nothing is checked here; pass
/// the result to [`verify`]). Used to re-check an author's signature kept apart from its payload.
pub fn assemble(
    signer: &PublicKey,
    header: &Header<'_>,
    payload: &[u8],
    signature: &[u8; 64],
) -> Vec<u8> {
    let mut out = unsigned_prefix(signer, header, payload);
    push_bytes(&mut out, signature);
    out
}

/// The envelope up to (not including) the signature, with the 8-item array head.
fn unsigned_prefix(signer: &PublicKey, header: &Header<'_>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + header.tag.len() + 140);
    out.push(0x88); // array(8)
    push_text(&mut out, header.tag);
    push_uint(&mut out, 0, SCHEMA_VERSION);
    push_bytes(&mut out, signer.as_bytes());
    push_uint(&mut out, 0, header.issued_at_ms);
    push_uint(&mut out, 0, header.expires_at_ms);
    push_uint(&mut out, 0, header.nonce);
    push_bytes(&mut out, payload);
    out
}

/// The bytes the signature covers: `tag || 0x00 || 0x87 || items[0..7]`.
fn signed_message(tag: &str, seven_items: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(tag.len() + 2 + seven_items.len());
    m.extend_from_slice(tag.as_bytes());
    m.push(0);
    m.push(0x87);
    m.extend_from_slice(seven_items);
    m
}

/// Decodes and verifies the signature and tag; no clock checks (deterministic: the fold and
/// refold use this). Use [`open`] for objects arriving now.
pub fn verify(bytes: &[u8], expected_tag: &str) -> Result<Envelope, EnvelopeError> {
    let (env, signed_end) = parse(bytes, expected_tag)?;
    if is_small_order(env.signer.as_bytes()) {
        return Err(EnvelopeError::WeakSignerKey { signer: env.signer });
    }
    let msg = signed_message(&env.tag, &bytes[1..signed_end]);
    UnparsedPublicKey::new(&ED25519, env.signer.as_bytes())
        .verify(&msg, &env.signature)
        .map_err(|_| EnvelopeError::BadSignature { signer: env.signer })?;
    Ok(env)
}

/// The y-coordinate encodings (sign bit cleared) of every point of small order: the 8-torsion
/// (y = 0, 1, p-1 and the two order-8 values) and the non-canonical encodings of 0 and 1 (p, p+1).
/// The same list as libsodium's; a test derives it from curve25519-dalek's torsion points.
const SMALL_ORDER_Y: [[u8; 32]; 7] = {
    const FF: u8 = 0xff;
    [
        [0; 32],
        [
            1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0,
        ],
        [
            0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef,
            0x98, 0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88,
            0x6d, 0x53, 0xfc, 0x05,
        ],
        [
            0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10,
            0x67, 0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77,
            0x92, 0xac, 0x03, 0x7a,
        ],
        [
            0xec, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF,
            FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x7f,
        ],
        [
            0xed, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF,
            FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x7f,
        ],
        [
            0xee, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF,
            FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x7f,
        ],
    ]
};

/// True if `key` encodes a point of small order (whatever its sign bit). With such a key the
/// "signature" `R = small-order point, S = 0` verifies for EVERY message under the cofactorless
/// equation ring uses, so no envelope may name one as its signer. A comparison against the 7
/// encodings, not a point decompression: it stays off the cost of every verification.
fn is_small_order(key: &[u8; 32]) -> bool {
    let mut y = *key;
    y[31] &= 0x7f;
    SMALL_ORDER_Y.contains(&y)
}

/// Decodes an envelope WITHOUT checking its signature. Only for bytes this process verified
/// before storing them (the store's own op log, read back for a refold).
pub fn decode_unverified(bytes: &[u8], expected_tag: &str) -> Result<Envelope, EnvelopeError> {
    parse(bytes, expected_tag).map(|(env, _)| env)
}

/// Strict structural decoding; returns the envelope and where the signed items end.
fn parse(bytes: &[u8], expected_tag: &str) -> Result<(Envelope, usize), EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            len: bytes.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.head()? != (4, 8) {
        return Err(EnvelopeError::Malformed("expected an array of 8 items"));
    }
    let tag = r.text()?;
    if tag != expected_tag {
        return Err(EnvelopeError::WrongTag {
            expected: expected_tag.into(),
            found: tag.into(),
        });
    }
    let schema = r.uint()?;
    if schema != SCHEMA_VERSION {
        return Err(EnvelopeError::UnsupportedSchema {
            found: schema,
            supported: SCHEMA_VERSION,
        });
    }
    let signer = PublicKey(
        r.bytes()?
            .try_into()
            .map_err(|_| EnvelopeError::Malformed("signer must be 32 bytes"))?,
    );
    let issued_at_ms = r.uint()?;
    let expires_at_ms = r.uint()?;
    let nonce = r.uint()?;
    let payload = r.bytes()?;
    let signed_end = r.pos;
    let signature: [u8; 64] = r
        .bytes()?
        .try_into()
        .map_err(|_| EnvelopeError::Malformed("signature must be 64 bytes"))?;
    if r.pos != bytes.len() {
        return Err(EnvelopeError::Malformed(
            "trailing bytes after the envelope",
        ));
    }
    if expires_at_ms != 0 && expires_at_ms < issued_at_ms {
        return Err(EnvelopeError::InvertedValidity);
    }
    let env = Envelope {
        tag: tag.to_owned(),
        schema,
        signer,
        issued_at_ms,
        expires_at_ms,
        nonce,
        payload: payload.to_vec(),
        signature,
    };
    Ok((env, signed_end))
}

/// Clock checks for an object arriving at `now_ms`: not expired, not issued more than
/// `max_skew_ms` in the future.
pub fn check_time(env: &Envelope, now_ms: u64, max_skew_ms: u64) -> Result<(), EnvelopeError> {
    if env.issued_at_ms > now_ms.saturating_add(max_skew_ms) {
        return Err(EnvelopeError::FromTheFuture {
            issued_at_ms: env.issued_at_ms,
            now_ms,
            max_skew_ms,
        });
    }
    if env.expires_at_ms != 0 && env.expires_at_ms <= now_ms {
        return Err(EnvelopeError::Expired {
            expires_at_ms: env.expires_at_ms,
            now_ms,
        });
    }
    Ok(())
}

/// [`verify`] then [`check_time`]: for an object arriving now.
pub fn open(
    bytes: &[u8],
    expected_tag: &str,
    now_ms: u64,
    max_skew_ms: u64,
) -> Result<Envelope, EnvelopeError> {
    let env = verify(bytes, expected_tag)?;
    check_time(&env, now_ms, max_skew_ms)?;
    Ok(env)
}

/// Remembers `(signer, nonce)` of short-lived objects until they expire, and rejects a second
/// use. Objects without an expiry cannot be guarded this way (their memory would grow forever) and
/// are refused: permanent facts are de-duplicated by the op log's `(origin, seq)` instead.
#[derive(Default, Debug)]
pub struct ReplayGuard {
    seen: HashMap<(PublicKey, u64), u64>,
}

impl ReplayGuard {
    /// Records `env`, or refuses it if already seen and not yet expired. Prunes expired entries.
    pub fn check_and_record(&mut self, env: &Envelope, now_ms: u64) -> Result<(), EnvelopeError> {
        if env.expires_at_ms == 0 {
            return Err(EnvelopeError::Malformed(
                "a replay-guarded object must have an expiry",
            ));
        }
        self.seen.retain(|_, exp| *exp > now_ms);
        match self.seen.entry((env.signer, env.nonce)) {
            std::collections::hash_map::Entry::Occupied(_) => Err(EnvelopeError::Replayed {
                signer: env.signer,
                nonce: env.nonce,
            }),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(env.expires_at_ms);
                Ok(())
            }
        }
    }

    /// Number of remembered objects.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True if nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Encodes `value` as deterministic CBOR with ciborium (structs become maps with their fields in
/// declaration order; integers in shortest form; definite lengths).
pub fn to_cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("encoding into a Vec cannot fail for our types");
    out
}

/// Decodes CBOR produced by [`to_cbor`], bounded (size and nesting depth), and rejects any input
/// that is not exactly the canonical encoding of the decoded value (tags, non-shortest integers,
/// indefinite lengths, reordered map keys, trailing bytes...).
pub fn from_cbor_canonical<T>(bytes: &[u8]) -> Result<T, EnvelopeError>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            len: bytes.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    let value: T = ciborium::de::from_reader_with_recursion_limit(bytes, 32).map_err(|_| {
        EnvelopeError::NonCanonicalPayload("not a valid encoding of the expected type")
    })?;
    if to_cbor(&value) != bytes {
        return Err(EnvelopeError::NonCanonicalPayload(
            "bytes differ from the canonical encoding",
        ));
    }
    Ok(value)
}

// ---- a strict, minimal CBOR reader/writer for the envelope's fixed shape ----

fn push_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= 0xff {
        out.extend_from_slice(&[m | 24, n as u8]);
    } else if n <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

fn push_uint(out: &mut Vec<u8>, major: u8, n: u64) {
    push_head(out, major, n)
}

fn push_bytes(out: &mut Vec<u8>, b: &[u8]) {
    push_head(out, 2, b.len() as u64);
    out.extend_from_slice(b);
}

fn push_text(out: &mut Vec<u8>, s: &str) {
    push_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EnvelopeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(EnvelopeError::Malformed("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Reads a head: (major type, argument). Rejects indefinite lengths, reserved values and
    /// non-shortest arguments.
    fn head(&mut self) -> Result<(u8, u64), EnvelopeError> {
        let b = self.take(1)?[0];
        let (major, info) = (b >> 5, b & 0x1f);
        let (n, min) = match info {
            0..=23 => return Ok((major, u64::from(info))),
            24 => (u64::from(self.take(1)?[0]), 24),
            25 => (
                u64::from(u16::from_be_bytes(
                    self.take(2)?.try_into().expect("2 bytes"),
                )),
                0x100,
            ),
            26 => (
                u64::from(u32::from_be_bytes(
                    self.take(4)?.try_into().expect("4 bytes"),
                )),
                0x1_0000,
            ),
            27 => (
                u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")),
                0x1_0000_0000,
            ),
            _ => {
                return Err(EnvelopeError::Malformed(
                    "indefinite length or reserved value",
                ));
            }
        };
        if n < min {
            return Err(EnvelopeError::Malformed("integer not in shortest form"));
        }
        Ok((major, n))
    }

    fn uint(&mut self) -> Result<u64, EnvelopeError> {
        match self.head()? {
            (0, n) => Ok(n),
            _ => Err(EnvelopeError::Malformed("expected an unsigned integer")),
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], EnvelopeError> {
        match self.head()? {
            (2, n) => self.take(
                usize::try_from(n).map_err(|_| EnvelopeError::Malformed("length too large"))?,
            ),
            _ => Err(EnvelopeError::Malformed("expected a byte string")),
        }
    }

    fn text(&mut self) -> Result<&'a str, EnvelopeError> {
        match self.head()? {
            (3, n) if n <= MAX_TAG_BYTES as u64 => std::str::from_utf8(self.take(n as usize)?)
                .map_err(|_| EnvelopeError::Malformed("tag is not UTF-8")),
            (3, _) => Err(EnvelopeError::Malformed("tag too long")),
            _ => Err(EnvelopeError::Malformed("expected a text string")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> Ed25519KeyPair {
        // (A fixed seed per test: Ed25519 signing is deterministic, so the bytes are too.)
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("seed")
    }

    fn header(tag: &str) -> Header<'_> {
        Header {
            tag,
            issued_at_ms: 1_000,
            expires_at_ms: 2_000,
            nonce: 42,
        }
    }

    #[test]
    fn sealed_envelope_verifies_and_round_trips() {
        let k = key(1);
        let bytes = seal(&k, &header(TAG_REQUEST), b"\xa0");
        let env = open(&bytes, TAG_REQUEST, 1_500, 0).expect("valid");
        assert_eq!(env.signer.as_bytes(), k.public_key().as_ref());
        assert_eq!(
            (env.issued_at_ms, env.expires_at_ms, env.nonce),
            (1_000, 2_000, 42)
        );
        assert_eq!(env.payload, b"\xa0");
        assert_eq!(env.schema, SCHEMA_VERSION);
    }

    #[test]
    fn ciborium_reads_and_writes_the_same_envelope_bytes() {
        let bytes = seal(&key(1), &header(TAG_OP), b"payload");
        let v: ciborium::Value = ciborium::from_reader(&bytes[..]).expect("ciborium decodes it");
        let mut again = Vec::new();
        ciborium::into_writer(&v, &mut again).expect("encode");
        assert_eq!(again, bytes, "ciborium re-encodes identically");
        let items = v.as_array().expect("array");
        assert_eq!(items.len(), 8);
        assert_eq!(items[0].as_text(), Some(TAG_OP));
    }

    #[test]
    fn tampered_bytes_are_rejected() {
        let bytes = seal(&key(1), &header(TAG_OP), b"payload");
        // Flip one bit in every position: each result must fail (signature, or structure).
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(verify(&t, TAG_OP).is_err(), "tampered byte {i} accepted");
        }
        // Specifically the payload: a bad signature.
        let mut t = bytes.clone();
        let p = bytes
            .windows(7)
            .position(|w| w == b"payload")
            .expect("payload present");
        t[p] = b'P';
        assert!(matches!(
            verify(&t, TAG_OP),
            Err(EnvelopeError::BadSignature { .. })
        ));
    }

    #[test]
    fn wrong_tag_is_rejected_even_when_relabelled() {
        let bytes = seal(&key(1), &header(TAG_REQUEST), b"x");
        assert!(matches!(
            verify(&bytes, TAG_OP),
            Err(EnvelopeError::WrongTag { .. })
        ));
        // Rewrite the tag to the expected one: the signature (which covers the tag) fails.
        let forged = relabel(&bytes, TAG_REQUEST, "lemonade-nexus/zzzzzzz/v1");
        assert!(matches!(
            verify(&forged, "lemonade-nexus/zzzzzzz/v1"),
            Err(EnvelopeError::BadSignature { .. })
        ));
    }

    fn relabel(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let mut out = bytes.to_vec();
        let p = out
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .expect("tag");
        out[p..p + to.len()].copy_from_slice(to.as_bytes());
        out
    }

    #[test]
    fn expired_objects_are_rejected() {
        let bytes = seal(&key(1), &header(TAG_REQUEST), b"x");
        assert!(open(&bytes, TAG_REQUEST, 1_999, 0).is_ok());
        assert_eq!(
            open(&bytes, TAG_REQUEST, 2_000, 0),
            Err(EnvelopeError::Expired {
                expires_at_ms: 2_000,
                now_ms: 2_000
            })
        );
    }

    #[test]
    fn future_dated_objects_beyond_the_skew_are_rejected() {
        let bytes = seal(&key(1), &header(TAG_REQUEST), b"x");
        // Issued at 1000; now 900 with 100 ms allowed skew: fine. Now 899: too far in the future.
        assert!(open(&bytes, TAG_REQUEST, 900, 100).is_ok());
        assert!(matches!(
            open(&bytes, TAG_REQUEST, 899, 100),
            Err(EnvelopeError::FromTheFuture { .. })
        ));
    }

    #[test]
    fn replayed_objects_are_rejected_until_they_expire() {
        let bytes = seal(&key(1), &header(TAG_REQUEST), b"x");
        let mut guard = ReplayGuard::default();
        let env = open(&bytes, TAG_REQUEST, 1_100, 0).expect("valid");
        guard.check_and_record(&env, 1_100).expect("first use");
        assert!(matches!(
            guard.check_and_record(&env, 1_200),
            Err(EnvelopeError::Replayed { .. })
        ));
        // Another nonce from the same signer is a different object.
        let other = seal(
            &key(1),
            &Header {
                nonce: 43,
                ..header(TAG_REQUEST)
            },
            b"x",
        );
        guard
            .check_and_record(&open(&other, TAG_REQUEST, 1_100, 0).expect("valid"), 1_100)
            .expect("new nonce");
        // After expiry the entry is pruned (and `open` refuses the object anyway).
        assert!(open(&bytes, TAG_REQUEST, 2_000, 0).is_err());
        let _ = guard.check_and_record(&env, 2_001);
        assert_eq!(
            guard.len(),
            1,
            "expired entries pruned, the re-recorded one remains"
        );
    }

    #[test]
    fn unsupported_schema_and_inverted_validity_are_rejected() {
        let mut bytes = seal(&key(1), &header(TAG_OP), b"x");
        let schema_pos = 1 + 1 + TAG_OP.len();
        assert_eq!(bytes[schema_pos], 0x01);
        bytes[schema_pos] = 0x02;
        assert_eq!(
            verify(&bytes, TAG_OP),
            Err(EnvelopeError::UnsupportedSchema {
                found: 2,
                supported: 1
            })
        );
        let inv = seal(
            &key(1),
            &Header {
                issued_at_ms: 5,
                expires_at_ms: 4,
                ..header(TAG_OP)
            },
            b"x",
        );
        assert_eq!(verify(&inv, TAG_OP), Err(EnvelopeError::InvertedValidity));
    }

    #[test]
    fn non_shortest_integers_and_trailing_bytes_are_rejected() {
        let bytes = seal(
            &key(1),
            &Header {
                nonce: 5,
                ..header(TAG_OP)
            },
            b"x",
        );
        let mut long = bytes.clone();
        // nonce 5 is one byte 0x05 right before the payload head 0x41 'x': widen it to 0x18 0x05.
        let p = long
            .windows(3)
            .position(|w| w == [0x05, 0x41, b'x'])
            .expect("nonce");
        long.splice(p..p + 1, [0x18, 0x05]);
        assert_eq!(
            verify(&long, TAG_OP),
            Err(EnvelopeError::Malformed("integer not in shortest form"))
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            verify(&trailing, TAG_OP),
            Err(EnvelopeError::Malformed(_))
        ));
        let huge = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            verify(&huge, TAG_OP),
            Err(EnvelopeError::TooLarge { .. })
        ));
    }

    #[test]
    fn canonical_payload_decoding_rejects_alternative_encodings() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S {
            a: u32,
            b: String,
        }
        let good = to_cbor(&S {
            a: 1,
            b: "x".into(),
        });
        assert_eq!(
            from_cbor_canonical::<S>(&good),
            Ok(S {
                a: 1,
                b: "x".into()
            })
        );
        // Same value with a CBOR tag in front: ciborium would skip it; we refuse it.
        let mut tagged = vec![0xc0];
        tagged.extend_from_slice(&good);
        assert!(from_cbor_canonical::<S>(&tagged).is_err());
        // Keys in the other order.
        let mut swapped = vec![0xa2, 0x61, b'b', 0x61, b'x', 0x61, b'a', 0x01];
        assert!(from_cbor_canonical::<S>(&swapped).is_err());
        swapped.clear();
        // A float where an integer belongs.
        let float = [0xa2, 0x61, b'a', 0xf9, 0x3c, 0x00, 0x61, b'b', 0x61, b'x'];
        assert!(from_cbor_canonical::<S>(&float).is_err());
    }

    // ---- the one verification rule, on its edge cases (DESIGN §4.3) ----

    /// The group order L of Ed25519, little-endian.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];

    fn add_le(a: &[u8], b: &[u8; 32]) -> [u8; 32] {
        let mut out = [0u8; 32];
        let mut carry = 0u16;
        for i in 0..32 {
            let v = u16::from(a[i]) + u16::from(b[i]) + carry;
            out[i] = v as u8;
            carry = v >> 8;
        }
        out
    }

    #[test]
    fn non_canonical_s_is_rejected() {
        let k = key(1);
        let h = header(TAG_OP);
        let good = seal(&k, &h, b"x");
        let env = verify(&good, TAG_OP).expect("valid");
        // S + L is the same scalar mod L: a malleated signature. ring requires S < L.
        let mut sig = env.signature;
        let s_plus_l = add_le(&sig[32..], &L);
        sig[32..].copy_from_slice(&s_plus_l);
        let bad = assemble(&env.signer, &h, b"x", &sig);
        assert_eq!(
            verify(&bad, TAG_OP),
            Err(EnvelopeError::BadSignature { signer: env.signer })
        );
    }

    #[test]
    fn small_order_signer_keys_are_rejected_even_where_ring_accepts() {
        use curve25519_dalek::constants::EIGHT_TORSION;
        let h = header(TAG_OP);
        for (i, point) in EIGHT_TORSION.iter().enumerate() {
            let a = point.compress().to_bytes();
            // R = the identity, S = 0: [S]B = R + [k]A holds whenever [k]A is the identity,
            // i.e. for every message whose k is a multiple of A's order (always, for A = identity).
            let mut sig = [0u8; 64];
            sig[0] = 1;
            let env = assemble(&PublicKey(a), &h, b"any message", &sig);
            assert_eq!(
                verify(&env, TAG_OP),
                Err(EnvelopeError::WeakSignerKey {
                    signer: PublicKey(a)
                }),
                "torsion point {i}"
            );
        }
        // Pin ring's own behaviour for the identity key, so an upgrade that changes it is noticed:
        // ring alone accepts this universal "signature"; our rule refuses the key first.
        let identity = EIGHT_TORSION[0].compress().to_bytes();
        let mut sig = [0u8; 64];
        sig[0] = 1;
        let msg = signed_message(TAG_OP, b"whatever");
        let ring_alone = UnparsedPublicKey::new(&ED25519, &identity)
            .verify(&msg, &sig)
            .is_ok();
        assert!(
            ring_alone,
            "ring's verification of small-order keys changed: review the rule"
        );
        // A non-canonical encoding of the identity (y = p + 1) is refused too.
        let mut p_plus_1 = [0xffu8; 32];
        p_plus_1[0] = 0xee;
        p_plus_1[31] = 0x7f;
        let env = assemble(&PublicKey(p_plus_1), &h, b"m", &sig);
        assert!(verify(&env, TAG_OP).is_err());
    }

    #[test]
    fn small_order_list_is_exactly_the_torsion_points_and_their_non_canonical_encodings() {
        use curve25519_dalek::constants::EIGHT_TORSION;
        let mut derived: Vec<[u8; 32]> = EIGHT_TORSION
            .iter()
            .map(|p| {
                let mut y = p.compress().to_bytes();
                y[31] &= 0x7f;
                y
            })
            .collect();
        // p and p + 1: the only non-canonical y encodings (of 0 and 1) that fit in 255 bits.
        let p_enc = add_le(&SMALL_ORDER_Y[4], &{
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        });
        let p1_enc = add_le(&p_enc, &{
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        });
        derived.push(p_enc);
        derived.push(p1_enc);
        derived.sort();
        derived.dedup();
        let mut list = SMALL_ORDER_Y.to_vec();
        list.sort();
        assert_eq!(derived, list);
        // And every torsion point, with either sign bit, is caught.
        for p in EIGHT_TORSION.iter() {
            let mut e = p.compress().to_bytes();
            assert!(is_small_order(&e));
            e[31] ^= 0x80;
            assert!(is_small_order(&e));
        }
        // An honest key is not.
        let k = key(1);
        assert!(!is_small_order(
            k.public_key().as_ref().try_into().expect("32")
        ));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = verify(&bytes, TAG_OP);
        }

        #[test]
        fn decoding_mutated_envelopes_never_panics_or_accepts(
            pos in 0usize..200, val in any::<u8>(), cut in 0usize..200,
        ) {
            let bytes = seal(&key(3), &header(TAG_OP), b"some payload bytes");
            let mut m = bytes.clone();
            let p = pos % m.len();
            if m[p] != val {
                m[p] = val;
                prop_assert!(verify(&m, TAG_OP).is_err());
            }
            let c = cut % bytes.len();
            prop_assert!(verify(&bytes[..c], TAG_OP).is_err());
        }
    }
}
