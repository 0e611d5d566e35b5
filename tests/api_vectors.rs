//! Golden vectors of the API's signed objects (data-schema/api-auth.cddl): the auth proof and the
//! token, made with fixed seeds (Ed25519 signing is deterministic) and pinned in
//! `data-schema/vectors/api/`, both as envelope bytes (hex) and as the text sent on the wire.
//! The inputs are in `data-schema/vectors/api/README.md`, so another implementation can rebuild
//! and check them. Regenerate deliberately with
//! `LEMONADE_NEXUS_UPDATE_VECTORS=1 cargo test --test api_vectors` and review the diff.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use lemonade_nexus::api::auth::{
    self, AuthPayload, CHALLENGE_TTL_MS, Challenge, Challenges, TAG_AUTH, TAG_TOKEN, TokenClaims,
};
use lemonade_nexus::signed;
use lemonade_nexus::testkit::key;
use lemonade_nexus::tree::NodeId;

const T0: u64 = 1_700_000_000_000;
/// The challenge the server issued at `T0` (for the client key(4), expiring `T0 + 60 s`).
const CHALLENGE: [u8; 32] = [0x5a; 32];
const NODE: NodeId = NodeId([9; 16]);
const TOKEN_NONCE: u64 = 0x0123_4567_89ab_cdef;

fn challenge() -> Challenge {
    Challenge {
        nonce: CHALLENGE,
        expires_ms: T0 + CHALLENGE_TTL_MS,
    }
}

/// The client key(4) answers the challenge of server key(2), signing at `T0 + 1 s`.
fn proof() -> String {
    auth::make_proof(key(4).pair(), &challenge(), key(2).public(), T0 + 1_000)
}

/// Server key(1) (the cluster's root: a one-server cluster) issues a token at `T0 + 2 s`.
fn claims() -> TokenClaims {
    TokenClaims {
        subject: key(4).public(),
        node: Some(NODE),
        cluster: key(1).public(),
    }
}

fn token() -> String {
    auth::issue_token(key(1).pair(), &claims(), T0 + 2_000, TOKEN_NONCE)
}

fn vectors() -> BTreeMap<&'static str, String> {
    let hex = |b: Vec<u8>| hex::encode(b);
    let mut v = BTreeMap::new();
    v.insert("auth-proof.b64", proof());
    let proof_bytes = STANDARD.decode(proof()).expect("base64");
    v.insert("auth-proof.hex", hex(proof_bytes.clone()));
    let env = signed::verify(&proof_bytes, TAG_AUTH).expect("proof envelope");
    v.insert("auth-proof-payload.hex", hex(env.payload));
    v.insert("api-token.b64url", token());
    let token_bytes = URL_SAFE_NO_PAD.decode(token()).expect("base64url");
    v.insert("api-token.hex", hex(token_bytes.clone()));
    let env = signed::verify(&token_bytes, TAG_TOKEN).expect("token envelope");
    v.insert("api-token-payload.hex", hex(env.payload));
    v
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data-schema/vectors/api")
}

#[test]
fn api_golden_vectors_match_the_code() {
    let update = std::env::var_os("LEMONADE_NEXUS_UPDATE_VECTORS").is_some();
    for (name, text) in vectors() {
        let path = dir().join(name);
        let now = format!("{text}\n");
        if update {
            std::fs::write(&path, &now).expect("write vector");
            continue;
        }
        let pinned = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate: LEMONADE_NEXUS_UPDATE_VECTORS=1)",
                path.display()
            )
        });
        assert_eq!(
            pinned, now,
            "{name}: encoding changed; regenerate and review"
        );
    }
}

/// The pinned bytes (not the code's) are what the server accepts: the proof authenticates key(4)
/// once on server key(2), the token opens with the claims above.
#[test]
fn pinned_api_vectors_are_accepted() {
    let read = |n: &str| {
        std::fs::read_to_string(dir().join(n))
            .expect("vector")
            .trim()
            .to_owned()
    };
    let mut ch = Challenges::new();
    ch.issue(key(4).public(), CHALLENGE, T0).expect("issue");
    let proof = read("auth-proof.b64");
    assert_eq!(
        auth::check_proof(&mut ch, &proof, &key(2).public(), T0 + 1_500),
        Ok(key(4).public())
    );
    let env = signed::verify(&STANDARD.decode(&proof).expect("b64"), TAG_AUTH).expect("env");
    assert_eq!(
        (env.issued_at_ms, env.expires_at_ms, env.nonce),
        (T0 + 1_000, T0 + CHALLENGE_TTL_MS, 0)
    );
    let payload: AuthPayload = signed::from_cbor_canonical(&env.payload).expect("payload");
    assert_eq!(payload.challenge, CHALLENGE);

    let bytes = URL_SAFE_NO_PAD
        .decode(read("api-token.b64url"))
        .expect("b64url");
    let env = signed::open(&bytes, TAG_TOKEN, T0 + 3_000, 0).expect("token");
    assert_eq!(env.signer, key(1).public());
    assert_eq!(
        (env.issued_at_ms, env.expires_at_ms, env.nonce),
        (T0 + 2_000, T0 + 2_000 + auth::TOKEN_TTL_MS, TOKEN_NONCE)
    );
    let c: TokenClaims = signed::from_cbor_canonical(&env.payload).expect("claims");
    assert_eq!(c, claims());
}
