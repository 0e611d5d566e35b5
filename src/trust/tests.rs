//! Certificates and revocations: signing, checking, and every way they are refused.

use super::*;
use crate::identity::NodeKey;

fn root() -> NodeKey {
    NodeKey::from_seed(&[1; 32])
}

fn cert(server: PublicKey, expires_at_ms: u64) -> ServerCert {
    ServerCert {
        server,
        name: "eu-1".into(),
        issued_at_ms: 1_000,
        expires_at_ms,
    }
}

#[test]
fn certificate_round_trips_and_expires() {
    let root = root();
    let server = NodeKey::from_seed(&[2; 32]).public();
    let c = cert(server, 5_000);
    let bytes = seal_server_cert(root.pair(), &c);
    assert_eq!(
        verify_server_cert(&bytes, &root.public(), 4_999),
        Ok(c.clone())
    );
    assert_eq!(
        verify_server_cert(&bytes, &root.public(), 5_000),
        Err(TrustError::Expired {
            server,
            expires_at_ms: 5_000,
            at_ms: 5_000
        })
    );
    // 0 = never expires.
    let forever = seal_server_cert(root.pair(), &cert(server, 0));
    assert!(verify_server_cert(&forever, &root.public(), u64::MAX).is_ok());
}

#[test]
fn certificate_from_another_root_names_both_keys() {
    let other = NodeKey::from_seed(&[9; 32]);
    let server = NodeKey::from_seed(&[2; 32]).public();
    let bytes = seal_server_cert(other.pair(), &cert(server, 0));
    let e = verify_server_cert(&bytes, &root().public(), 1).expect_err("wrong root");
    assert_eq!(
        e,
        TrustError::WrongRoot {
            what: "server certificate",
            signer: other.public(),
            root: root().public()
        }
    );
    let text = e.to_string();
    assert!(
        text.contains(&other.public().to_string()) && text.contains(&root().public().to_string())
    );
    assert!(
        text.starts_with("server certificate is signed by"),
        "{text}"
    );
}

#[test]
fn forged_or_relabelled_objects_are_refused() {
    let root = root();
    let server = NodeKey::from_seed(&[2; 32]).public();
    let bytes = seal_server_cert(root.pair(), &cert(server, 0));
    // Change the name inside the payload: the signature no longer verifies.
    let mut forged = bytes.clone();
    let p = forged
        .windows(4)
        .position(|w| w == b"eu-1")
        .expect("name in payload");
    forged[p] = b'x';
    assert!(matches!(
        verify_server_cert(&forged, &root.public(), 1),
        Err(TrustError::Envelope { .. })
    ));
    // A certificate is not a revocation, and the other way round (the tag is signed).
    assert!(verify_revocation(&bytes, &root.public()).is_err());
    let rev = seal_revocation(
        root.pair(),
        &Revocation {
            server,
            issued_at_ms: 7,
            reason: "lost".into(),
        },
    );
    assert!(verify_server_cert(&rev, &root.public(), 1).is_err());
    assert_eq!(
        verify_revocation(&rev, &root.public())
            .expect("valid")
            .reason,
        "lost"
    );
}

#[test]
fn header_must_repeat_the_payload_and_names_must_be_labels() {
    let root = root();
    let server = NodeKey::from_seed(&[2; 32]).public();
    // An envelope whose header expiry (never) differs from the payload's (5000).
    let c = cert(server, 5_000);
    let header = Header {
        tag: TAG_SERVER_CERT,
        issued_at_ms: c.issued_at_ms,
        expires_at_ms: 0,
        nonce: 0,
    };
    let odd = signed::seal(root.pair(), &header, &signed::to_cbor(&c));
    assert_eq!(
        verify_server_cert(&odd, &root.public(), 1),
        Err(TrustError::HeaderMismatch {
            what: "server certificate",
            field: "expires_at_ms"
        })
    );
    for bad in ["", "Upper", "-x", "a.b", &"x".repeat(64)] {
        let mut c = cert(server, 0);
        c.name = bad.into();
        let bytes = seal_server_cert(root.pair(), &c);
        assert_eq!(
            verify_server_cert(&bytes, &root.public(), 1),
            Err(TrustError::BadName(bad.into())),
            "{bad:?}"
        );
    }
}

#[test]
fn long_reasons_and_oversized_objects_are_refused() {
    let root = root();
    let server = NodeKey::from_seed(&[2; 32]).public();
    let long = seal_revocation(
        root.pair(),
        &Revocation {
            server,
            issued_at_ms: 1,
            reason: "r".repeat(MAX_REASON_BYTES + 1),
        },
    );
    assert_eq!(
        verify_revocation(&long, &root.public()),
        Err(TrustError::ReasonTooLong {
            len: MAX_REASON_BYTES + 1
        })
    );
    let huge = vec![0u8; MAX_TRUST_OBJECT_BYTES + 1];
    assert!(matches!(
        verify_revocation(&huge, &root.public()),
        Err(TrustError::Envelope {
            source: EnvelopeError::TooLarge { .. },
            ..
        })
    ));
}

#[test]
fn trust_op_encodes_envelopes_as_byte_strings() {
    let op = TrustOp::AdmitServer {
        cert: vec![1, 2, 3],
    };
    let bytes = signed::to_cbor(&op);
    // {"admit_server": {"cert": h'010203'}}
    let mut expected = vec![0xa1, 0x6c];
    expected.extend_from_slice(b"admit_server");
    expected.extend_from_slice(&[0xa1, 0x64]);
    expected.extend_from_slice(b"cert");
    expected.extend_from_slice(&[0x43, 1, 2, 3]);
    assert_eq!(bytes, expected);
    assert_eq!(signed::from_cbor_canonical::<TrustOp>(&bytes), Ok(op));
    // A byte string longer than the bound is refused while decoding.
    let big = signed::to_cbor(&TrustOp::RevokeServer {
        revocation: vec![0; MAX_TRUST_OBJECT_BYTES + 1],
    });
    assert!(signed::from_cbor_canonical::<TrustOp>(&big).is_err());
}

proptest::proptest! {
    /// Decoding hostile bytes (random, or a valid certificate with one byte changed or cut
    /// short) never panics and never accepts anything but the original.
    #[test]
    fn hostile_bytes_never_panic_or_verify(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        pos in 0usize..400, val in proptest::prelude::any::<u8>(), cut in 0usize..400,
    ) {
        let root = root();
        let _ = verify_server_cert(&bytes, &root.public(), 1);
        let _ = verify_revocation(&bytes, &root.public());
        let _ = signed::from_cbor_canonical::<TrustOp>(&bytes);
        let good = seal_server_cert(root.pair(), &cert(NodeKey::from_seed(&[2; 32]).public(), 0));
        let mut m = good.clone();
        let p = pos % m.len();
        if m[p] != val {
            m[p] = val;
            proptest::prop_assert!(verify_server_cert(&m, &root.public(), 1).is_err());
        }
        proptest::prop_assert!(verify_server_cert(&good[..cut % good.len()], &root.public(), 1).is_err());
    }
}

#[test]
fn peers_are_checked_against_the_folded_state() {
    use crate::hlc::Hlc;
    use crate::op::{Op, OpBody};
    use crate::state::State;
    let root = root();
    let (a, b, c) = (
        NodeKey::from_seed(&[2; 32]),
        NodeKey::from_seed(&[3; 32]),
        NodeKey::from_seed(&[4; 32]),
    );
    let expiring = |k: &NodeKey| seal_server_cert(root.pair(), &cert(k.public(), 5_000));
    let mut state = State::new(root.public());
    let op = |origin: PublicKey, wall_ms, body| Op {
        origin,
        seq: 1,
        hlc: Hlc {
            wall_ms,
            logical: 0,
        },
        author: origin,
        body,
    };
    let admit = OpBody::Trust(TrustOp::AdmitServer { cert: expiring(&a) });
    state.apply(&op(a.public(), 1_000, admit)).expect("admit a");
    let revoke = OpBody::Trust(TrustOp::RevokeServer {
        revocation: seal_revocation(
            root.pair(),
            &Revocation {
                server: c.public(),
                issued_at_ms: 1,
                reason: String::new(),
            },
        ),
    });
    state
        .apply(&op(a.public(), 1_001, revoke))
        .expect("revoke c");
    // Admitted: its certificate may have expired since; a certificate for another key may not.
    assert_eq!(
        check_peer(&state, &a.public(), &expiring(&a), 9_000),
        Ok(())
    );
    assert_eq!(check_peer(&state, &a.public(), &[], 9_000), Ok(()));
    assert!(check_peer(&state, &a.public(), &expiring(&b), 1).is_err());
    // Not yet admitted: a valid, unexpired certificate for that key.
    assert_eq!(
        check_peer(&state, &b.public(), &expiring(&b), 4_999),
        Ok(())
    );
    assert!(matches!(
        check_peer(&state, &b.public(), &expiring(&b), 5_000),
        Err(TrustError::Expired { .. })
    ));
    assert!(check_peer(&state, &b.public(), &[], 1).is_err());
    // Revoked: never. The root: always.
    assert_eq!(
        check_peer(&state, &c.public(), &expiring(&c), 1),
        Err(TrustError::Revoked(c.public()))
    );
    assert_eq!(check_peer(&state, &root.public(), &[], 1), Ok(()));
}
