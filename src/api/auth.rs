//! Authentication: server-issued challenges, Ed25519 proof of possession, short-lived tokens.
//!
//! 1. `POST /api/auth/challenge {"pubkey"}`: the server returns 32 random bytes bound to that key,
//!    valid [`CHALLENGE_TTL_MS`], usable ONCE (any attempt consumes it, successful or not).
//! 2. The client proves it holds the key: it seals a signed envelope (`crate::signed`, the one
//!    signed format) with tag [`TAG_AUTH`] whose payload is [`AuthPayload`] `{challenge, server}`
//!    (the server's identity key, so a proof is only good for the server that asked). The tag is
//!    the domain separation: the signature can never be taken for an op, a request or a token.
//!    The envelope check also refuses small-order signer keys.
//! 3. `POST /api/auth {"proof"}` (or `/api/join`, inline) verifies the envelope, redeems the
//!    challenge and returns a **token**: an envelope tagged [`TAG_TOKEN`] signed by the server's
//!    identity key, payload [`TokenClaims`] `{subject, node, cluster}`, expiring after
//!    [`TOKEN_TTL_MS`]. Because it is the same signed envelope, ANY server of the cluster verifies
//!    it offline ([`verify_token`]): the signer must be the cluster's trust anchor or the owner of
//!    a `server` node of the tree. There is no shared HMAC secret (the reference system's tokens
//!    were per-server HS256, inventory §5).
//!
//! Everything here is pure: the caller passes `now_ms` and the random bytes.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;
use crate::signed::{self, EnvelopeError, Header};
use crate::tree::{NodeId, NodeKind, Tree};

/// Tag of a client's proof of possession over a challenge.
pub const TAG_AUTH: &str = "lemonade-nexus/auth-proof/v1";
/// Tag of an API token.
pub const TAG_TOKEN: &str = "lemonade-nexus/api-token/v1";
/// How long a challenge may be answered.
pub const CHALLENGE_TTL_MS: u64 = 60_000;
/// How long a token is valid.
pub const TOKEN_TTL_MS: u64 = 15 * 60_000;
/// Most challenges outstanding at once (a hard cap: beyond it new challenges are refused until
/// old ones expire, so memory stays bounded whatever clients do).
pub const MAX_PENDING_CHALLENGES: usize = 100_000;
/// Clock skew tolerated on tokens issued by another server.
pub const TOKEN_SKEW_MS: u64 = 60_000;

/// The payload a client signs to answer a challenge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthPayload {
    #[serde(with = "bytes32")]
    pub challenge: [u8; 32],
    /// The identity key of the server that issued the challenge.
    pub server: PublicKey,
}

/// What a token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// The authenticated key.
    pub subject: PublicKey,
    /// The subject's endpoint node, when it has one.
    pub node: Option<NodeId>,
    /// The cluster's trust anchor: a token is only good inside its cluster.
    pub cluster: PublicKey,
}

/// Why authentication failed. Messages are for the client; they reveal nothing secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown or already used challenge")]
    UnknownChallenge,
    #[error("challenge expired")]
    ChallengeExpired,
    #[error("the challenge was issued for another key")]
    WrongKey,
    #[error("the proof was made for another server")]
    WrongServer,
    #[error("too many outstanding challenges; retry later")]
    TooManyChallenges,
    #[error("invalid proof: {0}")]
    BadProof(String),
    #[error("invalid token: {0}")]
    BadToken(String),
}

struct Pending {
    key: PublicKey,
    expires_ms: u64,
}

/// The outstanding challenges of one server (in memory; a restart forgets them, which only means
/// clients ask again).
#[derive(Default)]
pub struct Challenges {
    pending: HashMap<[u8; 32], Pending>,
    cap: usize,
}

/// A challenge as returned to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: [u8; 32],
    pub expires_ms: u64,
}

impl Challenges {
    pub fn new() -> Self {
        Self::with_cap(MAX_PENDING_CHALLENGES)
    }

    pub fn with_cap(cap: usize) -> Self {
        Challenges {
            pending: HashMap::new(),
            cap,
        }
    }

    /// Issues `nonce` (32 fresh random bytes from the caller) for `key`.
    pub fn issue(
        &mut self,
        key: PublicKey,
        nonce: [u8; 32],
        now_ms: u64,
    ) -> Result<Challenge, AuthError> {
        if self.pending.len() >= self.cap {
            self.pending.retain(|_, p| p.expires_ms > now_ms);
            if self.pending.len() >= self.cap {
                return Err(AuthError::TooManyChallenges);
            }
        }
        let expires_ms = now_ms.saturating_add(CHALLENGE_TTL_MS);
        self.pending.insert(nonce, Pending { key, expires_ms });
        Ok(Challenge { nonce, expires_ms })
    }

    /// Consumes `nonce` for `key`: single use, whatever the outcome.
    pub fn redeem(
        &mut self,
        nonce: &[u8; 32],
        key: &PublicKey,
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let p = self
            .pending
            .remove(nonce)
            .ok_or(AuthError::UnknownChallenge)?;
        if p.expires_ms <= now_ms {
            return Err(AuthError::ChallengeExpired);
        }
        if p.key != *key {
            return Err(AuthError::WrongKey);
        }
        Ok(())
    }

    /// The expiry of the outstanding challenge `nonce`, if there is one.
    pub fn expiry_of(&self, nonce: &[u8; 32]) -> Option<u64> {
        self.pending.get(nonce).map(|p| p.expires_ms)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The client side: the proof for `challenge` issued by `server`, as base64 text.
pub fn make_proof(
    key: &ring::signature::Ed25519KeyPair,
    challenge: &Challenge,
    server: PublicKey,
    now_ms: u64,
) -> String {
    let payload = AuthPayload {
        challenge: challenge.nonce,
        server,
    };
    let header = Header {
        tag: TAG_AUTH,
        issued_at_ms: now_ms.min(challenge.expires_ms),
        expires_at_ms: challenge.expires_ms,
        nonce: 0,
    };
    STANDARD.encode(signed::seal(key, &header, &signed::to_cbor(&payload)))
}

/// Checks a proof (signature, tag, canonical payload, addressed to `server`) and redeems its
/// challenge. Returns the authenticated key.
pub fn check_proof(
    challenges: &mut Challenges,
    proof_b64: &str,
    server: &PublicKey,
    now_ms: u64,
) -> Result<PublicKey, AuthError> {
    let bytes = STANDARD
        .decode(proof_b64.trim())
        .map_err(|_| AuthError::BadProof("not base64".into()))?;
    let env = signed::verify(&bytes, TAG_AUTH).map_err(|e| AuthError::BadProof(e.to_string()))?;
    let payload: AuthPayload = signed::from_cbor_canonical(&env.payload)
        .map_err(|e| AuthError::BadProof(e.to_string()))?;
    // Redeem first (single use even when the rest fails), then the remaining checks.
    let expiry = challenges.expiry_of(&payload.challenge);
    challenges.redeem(&payload.challenge, &env.signer, now_ms)?;
    if payload.server != *server {
        return Err(AuthError::WrongServer);
    }
    // The header rules of data-schema/api-auth.cddl: nonce 0, the challenge's expiry, and
    // signed no later than that.
    if env.nonce != 0 || Some(env.expires_at_ms) != expiry || env.issued_at_ms > env.expires_at_ms {
        return Err(AuthError::BadProof(
            "the proof header must carry nonce 0 and the challenge's expiry".into(),
        ));
    }
    Ok(env.signer)
}

/// Issues a token for `claims`, signed by the server's identity key. `nonce` is random.
pub fn issue_token(
    server_key: &ring::signature::Ed25519KeyPair,
    claims: &TokenClaims,
    now_ms: u64,
    nonce: u64,
) -> String {
    let header = Header {
        tag: TAG_TOKEN,
        issued_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(TOKEN_TTL_MS),
        nonce,
    };
    URL_SAFE_NO_PAD.encode(signed::seal(server_key, &header, &signed::to_cbor(claims)))
}

/// Verifies a token against the cluster's tree at `now_ms`: signature, expiry, cluster, and that
/// the signer is a server of this cluster (the anchor or the owner of a `server` node).
pub fn verify_token(tree: &Tree, token: &str, now_ms: u64) -> Result<TokenClaims, AuthError> {
    let bad = |e: EnvelopeError| AuthError::BadToken(e.to_string());
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| AuthError::BadToken("not base64url".into()))?;
    let env = signed::open(&bytes, TAG_TOKEN, now_ms, TOKEN_SKEW_MS).map_err(bad)?;
    let claims: TokenClaims = signed::from_cbor_canonical(&env.payload).map_err(bad)?;
    if claims.cluster != *tree.anchor() {
        return Err(AuthError::BadToken("issued for another cluster".into()));
    }
    if !is_cluster_server(tree, &env.signer) {
        return Err(AuthError::BadToken(
            "not signed by a server of this cluster".into(),
        ));
    }
    Ok(claims)
}

/// True if `key` is the trust anchor or the owner of a server node.
pub fn is_cluster_server(tree: &Tree, key: &PublicKey) -> bool {
    tree.anchor() == key
        || tree
            .nodes()
            .any(|n| n.kind == NodeKind::Server && n.owner.as_ref() == Some(key))
}

mod bytes32 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = [u8; 32];
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<[u8; 32], E> {
                v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;

    fn key(seed: u8) -> NodeKey {
        NodeKey::from_seed(&[seed; 32])
    }

    #[test]
    fn a_valid_proof_authenticates_once() {
        let (server, client) = (key(1), key(2));
        let mut ch = Challenges::new();
        let c = ch.issue(client.public(), [7; 32], 1_000).expect("issue");
        let proof = make_proof(client.pair(), &c, server.public(), 1_000);
        assert_eq!(
            check_proof(&mut ch, &proof, &server.public(), 2_000),
            Ok(client.public())
        );
        assert_eq!(
            check_proof(&mut ch, &proof, &server.public(), 2_000),
            Err(AuthError::UnknownChallenge),
            "replay"
        );
    }

    #[test]
    fn expired_foreign_and_misaddressed_proofs_fail_and_consume_the_challenge() {
        let (server, client, other) = (key(1), key(2), key(3));
        let mut ch = Challenges::new();
        let c = ch.issue(client.public(), [1; 32], 0).expect("issue");
        let proof = make_proof(client.pair(), &c, server.public(), 0);
        assert_eq!(
            check_proof(&mut ch, &proof, &server.public(), CHALLENGE_TTL_MS),
            Err(AuthError::ChallengeExpired)
        );
        assert!(ch.is_empty());

        // Someone else answering a challenge issued for `client`.
        let c = ch.issue(client.public(), [2; 32], 0).expect("issue");
        let proof = make_proof(other.pair(), &c, server.public(), 0);
        assert_eq!(
            check_proof(&mut ch, &proof, &server.public(), 1),
            Err(AuthError::WrongKey)
        );

        // A proof made for another server.
        let c = ch.issue(client.public(), [3; 32], 0).expect("issue");
        let proof = make_proof(client.pair(), &c, other.public(), 0);
        assert_eq!(
            check_proof(&mut ch, &proof, &server.public(), 1),
            Err(AuthError::WrongServer)
        );
        assert!(ch.is_empty());
    }

    #[test]
    fn a_tampered_or_unsigned_proof_is_refused() {
        let (server, client) = (key(1), key(2));
        let mut ch = Challenges::new();
        let c = ch.issue(client.public(), [9; 32], 0).expect("issue");
        let proof = make_proof(client.pair(), &c, server.public(), 0);
        let mut raw = STANDARD.decode(&proof).expect("b64");
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = STANDARD.encode(&raw);
        assert!(matches!(
            check_proof(&mut ch, &tampered, &server.public(), 1),
            Err(AuthError::BadProof(_))
        ));
        assert!(matches!(
            check_proof(&mut ch, "%%%", &server.public(), 1),
            Err(AuthError::BadProof(_))
        ));
        // A token is not a proof, even though both are envelopes (domain separation by tag).
        let claims = TokenClaims {
            subject: client.public(),
            node: None,
            cluster: server.public(),
        };
        let token = issue_token(client.pair(), &claims, 0, 1);
        let as_std = STANDARD.encode(URL_SAFE_NO_PAD.decode(token).expect("b64"));
        assert!(matches!(
            check_proof(&mut ch, &as_std, &server.public(), 1),
            Err(AuthError::BadProof(_))
        ));
    }

    /// The CDDL's header rules for a proof: nonce 0 and the challenge's expiry, nothing else.
    #[test]
    fn a_proof_with_another_nonce_or_expiry_is_refused() {
        let (server, client) = (key(1), key(2));
        let mut ch = Challenges::new();
        let forged = |c: &Challenge, nonce: u64, expires_at_ms: u64| {
            let payload = AuthPayload {
                challenge: c.nonce,
                server: server.public(),
            };
            let header = Header {
                tag: TAG_AUTH,
                issued_at_ms: 0,
                expires_at_ms,
                nonce,
            };
            STANDARD.encode(signed::seal(
                client.pair(),
                &header,
                &signed::to_cbor(&payload),
            ))
        };
        for (i, (nonce, later)) in [(1, 0), (u64::MAX, 0), (0, 1), (0, 1_000_000)]
            .into_iter()
            .enumerate()
        {
            let c = ch.issue(client.public(), [i as u8; 32], 0).expect("issue");
            let proof = forged(&c, nonce, c.expires_ms + later);
            assert!(
                matches!(
                    check_proof(&mut ch, &proof, &server.public(), 1),
                    Err(AuthError::BadProof(_))
                ),
                "nonce {nonce}, expiry +{later}"
            );
            assert!(ch.is_empty(), "the attempt consumed the challenge");
        }
        let c = ch.issue(client.public(), [9; 32], 0).expect("issue");
        let proof = forged(&c, 0, c.expires_ms);
        assert_eq!(
            check_proof(&mut ch, &proof, &server.public(), 1),
            Ok(client.public())
        );
    }

    #[test]
    fn pending_challenges_are_capped() {
        let mut ch = Challenges::with_cap(2);
        let k = key(2).public();
        ch.issue(k, [1; 32], 0).expect("1");
        ch.issue(k, [2; 32], 0).expect("2");
        assert_eq!(ch.issue(k, [3; 32], 0), Err(AuthError::TooManyChallenges));
        // Once they expire there is room again.
        ch.issue(k, [3; 32], CHALLENGE_TTL_MS)
            .expect("after expiry");
        assert_eq!(ch.len(), 1);
    }

    #[test]
    fn tokens_verify_on_any_server_of_the_cluster_and_nowhere_else() {
        let anchor = key(1);
        let tree = Tree::new(anchor.public());
        let claims = TokenClaims {
            subject: key(5).public(),
            node: Some(NodeId([4; 16])),
            cluster: anchor.public(),
        };
        let t = issue_token(anchor.pair(), &claims, 1_000, 42);
        assert_eq!(verify_token(&tree, &t, 2_000), Ok(claims.clone()));
        assert!(
            matches!(
                verify_token(&tree, &t, 1_000 + TOKEN_TTL_MS),
                Err(AuthError::BadToken(_))
            ),
            "expired"
        );
        // Signed by a key that is no server of this cluster.
        let foreign = issue_token(key(9).pair(), &claims, 1_000, 1);
        assert!(matches!(
            verify_token(&tree, &foreign, 2_000),
            Err(AuthError::BadToken(_))
        ));
        // Issued for another cluster.
        let other_tree = Tree::new(key(8).public());
        assert!(matches!(
            verify_token(&other_tree, &t, 2_000),
            Err(AuthError::BadToken(_))
        ));
        assert!(matches!(
            verify_token(&tree, "garbage!", 2_000),
            Err(AuthError::BadToken(_))
        ));
    }
}

// ---- HTTP ----

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};

use super::{ApiError, ApiState};

/// `POST /api/auth/challenge` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    /// The client's Ed25519 public key, base64.
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub pubkey: String,
}

/// `POST /api/auth/challenge` answer.
#[derive(Serialize, Deserialize, Debug, Clone, utoipa::ToSchema)]
pub struct ChallengeResponse {
    /// 32 random bytes, base64.
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub challenge: String,
    pub expires_at_ms: u64,
    /// The tag the proof envelope must carry.
    pub domain: String,
    /// The server's identity key (base64): the proof's `server` field.
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub server_key: String,
}

impl ChallengeResponse {
    /// The challenge in the form [`make_proof`] takes.
    pub fn challenge(&self) -> Result<Challenge, AuthError> {
        let bytes = STANDARD
            .decode(&self.challenge)
            .map_err(|_| AuthError::BadProof("challenge is not base64".into()))?;
        Ok(Challenge {
            nonce: bytes
                .try_into()
                .map_err(|_| AuthError::BadProof("challenge is not 32 bytes".into()))?,
            expires_ms: self.expires_at_ms,
        })
    }
}

/// `POST /api/auth` body.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthRequest {
    /// The proof envelope (base64), see [`make_proof`].
    /// Standard base64 with padding (RFC 4648 §4) of the signed envelope bytes (at most 64 KiB).
    #[schema(pattern = "^[A-Za-z0-9+/]*={0,2}$")]
    pub proof: String,
}

/// `POST /api/auth` answer.
#[derive(Serialize, Deserialize, Debug, Clone, utoipa::ToSchema)]
pub struct AuthResponse {
    /// Base64url without padding (RFC 4648 §5) of the token envelope (about 300 characters).
    #[schema(pattern = "^[A-Za-z0-9_-]+$")]
    pub token: String,
    pub expires_at_ms: u64,
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub subject: String,
    /// The caller's endpoint node, if it has joined.
    pub node_id: Option<String>,
}

pub(super) fn parse_pubkey(s: &str) -> Result<PublicKey, ApiError> {
    s.parse().map_err(|e: crate::keys::PublicKeyParseError| {
        ApiError::bad_request("bad_pubkey", e.to_string())
    })
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::TooManyChallenges => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
            }
            other => ApiError::unauthorized(other.to_string()),
        }
    }
}

#[utoipa::path(
    post,
    path = "/api/auth/challenge",
    tag = "public",
    request_body = ChallengeRequest,
    responses(
        (status = 200, description = "A fresh single-use challenge", body = ChallengeResponse),
        (status = 400, description = "Malformed body or key", body = super::ErrorBody),
        (status = 503, description = "Too many outstanding challenges", body = super::ErrorBody),
    )
)]
pub async fn post_challenge(
    state: web::Data<ApiState>,
    body: web::Json<ChallengeRequest>,
) -> Result<HttpResponse, ApiError> {
    let key = parse_pubkey(&body.pubkey)?;
    let nonce: [u8; 32] = state.random()?;
    let now = state.clock.now_ms();
    let c = state.lock_challenges().issue(key, nonce, now)?;
    Ok(HttpResponse::Ok().json(ChallengeResponse {
        challenge: STANDARD.encode(c.nonce),
        expires_at_ms: c.expires_ms,
        domain: TAG_AUTH.into(),
        server_key: state.server.public().to_string(),
    }))
}

/// Verifies a proof and redeems its challenge (shared by `/api/auth` and `/api/join`).
pub(super) fn authenticate(state: &ApiState, proof: &str) -> Result<PublicKey, ApiError> {
    let now = state.clock.now_ms();
    let key = check_proof(
        &mut state.lock_challenges(),
        proof,
        &state.server.public(),
        now,
    )?;
    Ok(key)
}

/// Issues a token for `subject` (and its node).
pub(super) fn token_for(
    state: &ApiState,
    subject: PublicKey,
    node: Option<NodeId>,
) -> Result<(String, u64), ApiError> {
    let now = state.clock.now_ms();
    let claims = TokenClaims {
        subject,
        node,
        cluster: state.root,
    };
    let nonce = u64::from_le_bytes(state.random()?);
    Ok((
        issue_token(state.server.pair(), &claims, now, nonce),
        now.saturating_add(TOKEN_TTL_MS),
    ))
}

#[utoipa::path(
    post,
    path = "/api/auth",
    tag = "public",
    request_body = AuthRequest,
    responses(
        (status = 200, description = "A short-lived token", body = AuthResponse),
        (status = 400, description = "Malformed body", body = super::ErrorBody),
        (status = 401, description = "No valid proof of possession", body = super::ErrorBody),
    )
)]
pub async fn post_auth(
    state: web::Data<ApiState>,
    body: web::Json<AuthRequest>,
) -> Result<HttpResponse, ApiError> {
    let subject = authenticate(&state, &body.proof)?;
    let node = super::join::find_device(state.lock_store().state().tree(), &subject);
    let (token, expires_at_ms) = token_for(&state, subject, node)?;
    Ok(HttpResponse::Ok().json(AuthResponse {
        token,
        expires_at_ms,
        subject: subject.to_string(),
        node_id: node.map(|n| n.to_string()),
    }))
}
