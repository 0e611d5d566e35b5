//! One op of the replicated log, and how it is signed and checked.
//!
//! **Who signs what** (also in `data-schema/op.cddl`):
//! * The op is carried in an envelope tagged [`TAG_OP`] signed by its **origin** server (the
//!   server whose log it belongs to). The envelope's `nonce` is the op's `seq`, its `issued_at_ms`
//!   the op's HLC wall time, and it never expires: ops are permanent facts, replayed ops are
//!   de-duplicated by `(origin, seq)`.
//! * When the **author** (who asked for the change) is not the origin — an administrator, a client
//!   — the op carries an [`AuthorProof`]: the author's Ed25519 signature over a request envelope
//!   tagged [`TAG_REQUEST`] whose payload is the canonical encoding of `op.body`. Every server
//!   re-checks it (deterministically: the request's validity window must contain the op's HLC), so
//!   a server cannot invent changes in an administrator's name. When author == origin (the server
//!   acting for itself, e.g. claiming an IPAM block) there is no proof: the envelope signature is
//!   the author's.
//! * A request `(author, nonce)` takes effect at most once: the store folds a later op carrying
//!   the same request with no effect (`store::NoEffect::ReplayedRequest`).
//!
//! The payload of an op envelope is [`LoggedOp`] `{op, author_proof}`; [`Op`] itself is what the
//! state fold sees.

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::keys::PublicKey;
use crate::signed::{self, EnvelopeError, Header, TAG_OP, TAG_REQUEST};

/// Longest validity window of an author's request. Bounds how long a captured request could be
/// replayed into a log by a misbehaving server.
pub const MAX_REQUEST_VALIDITY_MS: u64 = 10 * 60 * 1000;
/// How far before its `issued_at_ms` a request may be folded (clock skew between the author and
/// the origin server).
pub const REQUEST_SKEW_MS: u64 = 60 * 1000;

/// One mutation in the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The server whose log this op belongs to.
    pub origin: PublicKey,
    /// Per-origin sequence number, starting at 1, no gaps.
    pub seq: u64,
    /// Hybrid logical clock at the origin when the op was appended: the only clock of the fold.
    pub hlc: Hlc,
    /// Who asked for the change (an admin, a client, the server itself).
    pub author: PublicKey,
    /// What changes.
    pub body: OpBody,
}

/// What the op changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpBody {
    Tree(crate::tree::TreeOp),
    Ipam(crate::ipam::IpamOp),
    /// Server admission and revocation (`crate::trust`).
    Trust(crate::trust::TrustOp),
}

/// The total order in which every server folds ops: (hlc, origin, seq).
pub fn fold_order(a: &Op, b: &Op) -> std::cmp::Ordering {
    a.fold_key().cmp(&b.fold_key())
}

/// An op's position in the fold order, encoded so that byte order equals fold order:
/// `wall_ms (8, BE) | logical (4, BE) | origin (32) | seq (8, BE)` = 52 bytes.
pub type FoldKey = [u8; 52];

impl Op {
    /// The op's fold position as bytes (see [`FoldKey`]).
    pub fn fold_key(&self) -> FoldKey {
        let mut k = [0u8; 52];
        k[..8].copy_from_slice(&self.hlc.wall_ms.to_be_bytes());
        k[8..12].copy_from_slice(&self.hlc.logical.to_be_bytes());
        k[12..44].copy_from_slice(self.origin.as_bytes());
        k[44..].copy_from_slice(&self.seq.to_be_bytes());
        k
    }
}

/// The author's signature on a request, kept with the op (the request's payload is `op.body`, so it
/// is not stored twice).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorProof {
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub nonce: u64,
    pub signature: Sig,
}

/// A 64-byte Ed25519 signature, CBOR byte string.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 64]);

impl std::fmt::Debug for Sig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sig({}…)", hex::encode(&self.0[..8]))
    }
}

impl Serialize for Sig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Sig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a 64-byte Ed25519 signature")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Sig, E> {
                v.try_into()
                    .map(Sig)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// The payload of an op envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedOp {
    pub op: Op,
    /// Present exactly when `op.author != op.origin`.
    pub author_proof: Option<AuthorProof>,
}

/// Why an op (or an author's request) was refused before reaching the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("op envelope is signed by {signer}, but the op's origin is {origin}")]
    SignerNotOrigin {
        signer: PublicKey,
        origin: PublicKey,
    },
    #[error(
        "op envelope header (nonce {nonce}, issued {issued_at_ms}) does not match the op (seq {seq}, hlc wall {wall_ms})"
    )]
    HeaderMismatch {
        nonce: u64,
        issued_at_ms: u64,
        seq: u64,
        wall_ms: u64,
    },
    #[error("op sequence numbers start at 1")]
    ZeroSeq,
    #[error("op by author {author} through origin {origin} carries no author signature")]
    MissingAuthorProof {
        author: PublicKey,
        origin: PublicKey,
    },
    #[error("op authored by its origin must not carry an author proof")]
    UnexpectedAuthorProof,
    #[error(
        "author's request is valid from {issued_at_ms} to {expires_at_ms} ms, but the op is at {wall_ms} ms"
    )]
    RequestOutsideWindow {
        issued_at_ms: u64,
        expires_at_ms: u64,
        wall_ms: u64,
    },
    #[error(
        "author's request validity window is longer than {MAX_REQUEST_VALIDITY_MS} ms or has no expiry"
    )]
    RequestWindowTooLong,
}

/// An op whose envelope and author proof have been checked.
#[derive(Clone, Debug)]
pub struct VerifiedOp {
    pub logged: LoggedOp,
    /// The exact envelope bytes (what the log stores and replicas exchange).
    pub bytes: Vec<u8>,
}

/// Signs `logged` as its origin (`origin_key` must be the key of `logged.op.origin`).
pub fn seal_op(origin_key: &ring::signature::Ed25519KeyPair, logged: &LoggedOp) -> Vec<u8> {
    let header = Header {
        tag: TAG_OP,
        issued_at_ms: logged.op.hlc.wall_ms,
        expires_at_ms: 0,
        nonce: logged.op.seq,
    };
    signed::seal(origin_key, &header, &signed::to_cbor(logged))
}

/// Checks an op envelope completely, without any local clock: signature, canonical payload, header
/// consistency, and the author's proof. Deterministic: the same bytes give the same answer on every
/// server at any time (refolds rely on it).
pub fn verify_op(bytes: &[u8]) -> Result<VerifiedOp, OpError> {
    let env = signed::verify(bytes, TAG_OP)?;
    let logged: LoggedOp = signed::from_cbor_canonical(&env.payload)?;
    let op = &logged.op;
    if env.signer != op.origin {
        return Err(OpError::SignerNotOrigin {
            signer: env.signer,
            origin: op.origin,
        });
    }
    if env.nonce != op.seq || env.issued_at_ms != op.hlc.wall_ms || env.expires_at_ms != 0 {
        return Err(OpError::HeaderMismatch {
            nonce: env.nonce,
            issued_at_ms: env.issued_at_ms,
            seq: op.seq,
            wall_ms: op.hlc.wall_ms,
        });
    }
    if op.seq == 0 {
        return Err(OpError::ZeroSeq);
    }
    match (&logged.author_proof, op.author == op.origin) {
        (None, true) => {}
        (Some(_), true) => return Err(OpError::UnexpectedAuthorProof),
        (None, false) => {
            return Err(OpError::MissingAuthorProof {
                author: op.author,
                origin: op.origin,
            });
        }
        (Some(p), false) => check_author_proof(op, p)?,
    }
    Ok(VerifiedOp {
        logged,
        bytes: bytes.to_vec(),
    })
}

fn check_author_proof(op: &Op, p: &AuthorProof) -> Result<(), OpError> {
    if p.expires_at_ms == 0
        || p.expires_at_ms.saturating_sub(p.issued_at_ms) > MAX_REQUEST_VALIDITY_MS
    {
        return Err(OpError::RequestWindowTooLong);
    }
    let wall = op.hlc.wall_ms;
    if wall.saturating_add(REQUEST_SKEW_MS) < p.issued_at_ms || wall >= p.expires_at_ms {
        return Err(OpError::RequestOutsideWindow {
            issued_at_ms: p.issued_at_ms,
            expires_at_ms: p.expires_at_ms,
            wall_ms: wall,
        });
    }
    // Rebuild the request envelope the author signed and check it: no second copy of the body.
    let request = request_bytes_unsigned(&op.author, p, &signed::to_cbor(&op.body), &p.signature.0);
    signed::verify(&request, TAG_REQUEST)?;
    Ok(())
}

/// The request envelope for `body` as the author signed it.
fn request_bytes_unsigned(
    author: &PublicKey,
    p: &AuthorProof,
    body: &[u8],
    sig: &[u8; 64],
) -> Vec<u8> {
    signed::assemble(
        author,
        &Header {
            tag: TAG_REQUEST,
            issued_at_ms: p.issued_at_ms,
            expires_at_ms: p.expires_at_ms,
            nonce: p.nonce,
        },
        body,
        sig,
    )
}

/// An author's request for a change: what a client or an administrator sends to a server.
pub fn seal_request(
    author_key: &ring::signature::Ed25519KeyPair,
    body: &OpBody,
    issued_at_ms: u64,
    expires_at_ms: u64,
    nonce: u64,
) -> Vec<u8> {
    let header = Header {
        tag: TAG_REQUEST,
        issued_at_ms,
        expires_at_ms,
        nonce,
    };
    signed::seal(author_key, &header, &signed::to_cbor(body))
}

/// A request accepted by a server at `now_ms`: the author, the body, and the proof to keep in the op.
#[derive(Clone, Debug)]
pub struct AcceptedRequest {
    pub author: PublicKey,
    pub body: OpBody,
    pub proof: AuthorProof,
}

/// Opens an author's request arriving now: signature, tag, canonical body, not expired, not from
/// the future beyond `max_skew_ms`, and a validity window no longer than
/// [`MAX_REQUEST_VALIDITY_MS`]. (Replays of the same request within its window are the caller's
/// to refuse with a [`signed::ReplayGuard`].)
pub fn open_request(
    bytes: &[u8],
    now_ms: u64,
    max_skew_ms: u64,
) -> Result<AcceptedRequest, OpError> {
    let env = signed::open(bytes, TAG_REQUEST, now_ms, max_skew_ms)?;
    if env.expires_at_ms == 0
        || env.expires_at_ms.saturating_sub(env.issued_at_ms) > MAX_REQUEST_VALIDITY_MS
    {
        return Err(OpError::RequestWindowTooLong);
    }
    let body: OpBody = signed::from_cbor_canonical(&env.payload)?;
    Ok(AcceptedRequest {
        author: env.signer,
        body,
        proof: AuthorProof {
            issued_at_ms: env.issued_at_ms,
            expires_at_ms: env.expires_at_ms,
            nonce: env.nonce,
            signature: Sig(env.signature),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::IpamOp;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn key(seed: u8) -> (Ed25519KeyPair, PublicKey) {
        let k = Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("seed");
        let p = PublicKey(k.public_key().as_ref().try_into().expect("32"));
        (k, p)
    }

    fn body() -> OpBody {
        OpBody::Ipam(test_ipam_op())
    }

    /// Any IPAM op: the tests here do not care which.
    fn test_ipam_op() -> IpamOp {
        crate::ipam::IpamOp::ClaimBlock { block: 1 }
    }

    fn op(origin: PublicKey, author: PublicKey, seq: u64, wall: u64) -> Op {
        Op {
            origin,
            seq,
            hlc: Hlc {
                wall_ms: wall,
                logical: 0,
            },
            author,
            body: body(),
        }
    }

    #[test]
    fn server_authored_op_round_trips() {
        let (k, p) = key(1);
        let logged = LoggedOp {
            op: op(p, p, 1, 1_000),
            author_proof: None,
        };
        let bytes = seal_op(&k, &logged);
        assert_eq!(verify_op(&bytes).expect("valid").logged, logged);
    }

    #[test]
    fn op_signed_by_someone_else_than_its_origin_is_refused() {
        let (_k1, p1) = key(1);
        let (k2, _p2) = key(2);
        let bytes = seal_op(
            &k2,
            &LoggedOp {
                op: op(p1, p1, 1, 1_000),
                author_proof: None,
            },
        );
        assert!(matches!(
            verify_op(&bytes),
            Err(OpError::SignerNotOrigin { .. })
        ));
    }

    #[test]
    fn admin_request_is_carried_and_rechecked() {
        let (server, sp) = key(1);
        let (admin, ap) = key(2);
        let req = seal_request(&admin, &body(), 1_000, 61_000, 7);
        let acc = open_request(&req, 1_500, 1_000).expect("request ok");
        assert_eq!(acc.author, ap);
        let logged = LoggedOp {
            op: Op {
                origin: sp,
                seq: 1,
                hlc: Hlc {
                    wall_ms: 1_500,
                    logical: 0,
                },
                author: ap,
                body: acc.body,
            },
            author_proof: Some(acc.proof.clone()),
        };
        verify_op(&seal_op(&server, &logged)).expect("valid");

        // The server changes the body: the author's signature no longer matches.
        let mut forged = logged.clone();
        forged.op.body = OpBody::Ipam(crate::ipam::IpamOp::ClaimBlock { block: 2 });
        assert!(matches!(
            verify_op(&seal_op(&server, &forged)),
            Err(OpError::Envelope(EnvelopeError::BadSignature { .. }))
        ));
        // The server claims another author.
        let mut other = logged.clone();
        other.op.author = key(3).1;
        assert!(verify_op(&seal_op(&server, &other)).is_err());
        // The server drops the proof.
        let mut bare = logged.clone();
        bare.author_proof = None;
        assert!(matches!(
            verify_op(&seal_op(&server, &bare)),
            Err(OpError::MissingAuthorProof { .. })
        ));
        // The server folds the request long after it expired.
        let mut late = logged;
        late.op.hlc.wall_ms = 61_000;
        assert!(matches!(
            verify_op(&seal_op(&server, &late)),
            Err(OpError::RequestOutsideWindow { .. })
        ));
    }

    #[test]
    fn requests_with_long_or_no_expiry_are_refused() {
        let (admin, _) = key(2);
        let forever = seal_request(&admin, &body(), 1_000, 0, 1);
        assert!(matches!(
            open_request(&forever, 1_000, 0),
            Err(OpError::RequestWindowTooLong)
        ));
        let long = seal_request(
            &admin,
            &body(),
            1_000,
            1_000 + MAX_REQUEST_VALIDITY_MS + 1,
            1,
        );
        assert!(matches!(
            open_request(&long, 1_000, 0),
            Err(OpError::RequestWindowTooLong)
        ));
    }

    proptest::proptest! {
        /// Arbitrary payload bytes inside a correctly signed envelope: decoding never panics, and
        /// anything accepted re-encodes to exactly the same bytes.
        #[test]
        fn arbitrary_payloads_never_panic(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let (k, _) = key(1);
            let h = Header { tag: TAG_OP, issued_at_ms: 1, expires_at_ms: 0, nonce: 1 };
            let bytes = signed::seal(&k, &h, &payload);
            if let Ok(v) = verify_op(&bytes) {
                proptest::prop_assert_eq!(signed::to_cbor(&v.logged), payload);
            }
        }

        /// A valid op payload with one byte changed and re-signed: never a panic, and never
        /// accepted as a different encoding of the same op.
        #[test]
        fn mutated_payloads_never_panic(pos in 0usize..1000, val in proptest::prelude::any::<u8>()) {
            let (k, p) = key(1);
            let logged = LoggedOp { op: op(p, p, 3, 1_000), author_proof: None };
            let mut payload = signed::to_cbor(&logged);
            let i = pos % payload.len();
            payload[i] = val;
            let h = Header { tag: TAG_OP, issued_at_ms: 1_000, expires_at_ms: 0, nonce: 3 };
            if let Ok(v) = verify_op(&signed::seal(&k, &h, &payload)) {
                proptest::prop_assert_eq!(signed::to_cbor(&v.logged), payload);
            }
        }
    }

    #[test]
    fn fold_key_bytes_sort_like_fold_order() {
        let (_, a) = key(1);
        let (_, b) = key(2);
        let ops = [
            op(a, a, 2, 5),
            op(b, b, 1, 5),
            op(a, a, 1, 5),
            op(b, b, 9, 4),
            op(a, a, 3, 6),
        ];
        for x in &ops {
            for y in &ops {
                assert_eq!(fold_order(x, y), x.fold_key().cmp(&y.fold_key()));
            }
        }
    }
}
