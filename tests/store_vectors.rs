//! Golden vectors: the exact bytes of signed objects and of every op body, made with fixed keys
//! (Ed25519 signing is deterministic), pinned in `data-schema/vectors/*.hex`. A change to any
//! encoding fails this test; regenerate deliberately with
//! `LEMONADE_NEXUS_UPDATE_VECTORS=1 cargo test --test store_vectors` and review the diff.

use std::collections::BTreeMap;
use std::path::PathBuf;

use lemonade_nexus::hlc::Hlc;
use lemonade_nexus::ipam::{IpamOp, Subnet, SubnetPool};
use lemonade_nexus::op::{self, LoggedOp, Op, OpBody};
use lemonade_nexus::signed::{self, TAG_REQUEST};
use lemonade_nexus::testkit::key;
use lemonade_nexus::tree::{NodeField, NodeId, NodeKind, Permissions, TreeOp, WgKey};
use lemonade_nexus::trust::{self, Revocation, ServerCert, TrustOp};

const T0: u64 = 1_700_000_000_000;

fn node(n: u8) -> NodeId {
    NodeId([n; 16])
}

/// The server certificate of the vectors: root key(1) admits server key(2) as "eu-1" for a year.
fn server_cert() -> Vec<u8> {
    trust::seal_server_cert(
        key(1).pair(),
        &ServerCert {
            server: key(2).public(),
            name: "eu-1".into(),
            issued_at_ms: T0,
            expires_at_ms: T0 + 365 * 86_400_000,
        },
    )
}

/// Root key(1) revokes key(3).
fn revocation() -> Vec<u8> {
    trust::seal_revocation(
        key(1).pair(),
        &Revocation {
            server: key(3).public(),
            issued_at_ms: T0 + 1_000,
            reason: "decommissioned".into(),
        },
    )
}

fn bodies() -> Vec<(&'static str, OpBody)> {
    let k3 = key(3).public();
    let t = |name, op| (name, OpBody::Tree(op));
    let i = |name, op| (name, OpBody::Ipam(op));
    let update = |name, field| {
        t(
            name,
            TreeOp::Update {
                node: node(2),
                field,
            },
        )
    };
    vec![
        t(
            "tree-create",
            TreeOp::Create {
                parent: NodeId::ROOT,
                kind: NodeKind::Customer,
                hostname: "acme".into(),
                owner: Some(k3),
                wg_pubkey: Some(WgKey([7; 32])),
            },
        ),
        t(
            "tree-create-bare",
            TreeOp::Create {
                parent: node(1),
                kind: NodeKind::Endpoint,
                hostname: "laptop".into(),
                owner: None,
                wg_pubkey: None,
            },
        ),
        update("tree-update-hostname", NodeField::Hostname("web-1".into())),
        update("tree-update-owner", NodeField::Owner(Some(k3))),
        update("tree-update-owner-none", NodeField::Owner(None)),
        update(
            "tree-update-wg-public-key",
            NodeField::WgPublicKey(Some(WgKey([8; 32]))),
        ),
        update(
            "tree-update-endpoint",
            NodeField::Endpoint(Some("192.0.2.1:51940".into())),
        ),
        update(
            "tree-update-metadata",
            NodeField::Metadata {
                key: "region".into(),
                value: Some("eu".into()),
            },
        ),
        t(
            "tree-move",
            TreeOp::Move {
                node: node(2),
                new_parent: node(1),
            },
        ),
        t("tree-delete", TreeOp::Delete { node: node(2) }),
        t(
            "tree-grant",
            TreeOp::Grant {
                node: NodeId::ROOT,
                key: k3,
                permissions: Permissions::ADMIN,
            },
        ),
        t(
            "tree-revoke",
            TreeOp::Revoke {
                node: node(1),
                key: k3,
                permissions: Permissions(0b101),
            },
        ),
        i("ipam-claim-block", IpamOp::ClaimBlock { block: 3 }),
        i("ipam-release-block", IpamOp::ReleaseBlock { block: 3 }),
        i(
            "ipam-allocate-address",
            IpamOp::AllocateAddress {
                node: node(2),
                slot: 20,
            },
        ),
        i(
            "ipam-release-address",
            IpamOp::ReleaseAddress { node: node(2) },
        ),
        i(
            "ipam-allocate-subnet",
            IpamOp::AllocateSubnet {
                pool: SubnetPool::Private,
                node: node(1),
                subnet: Subnet {
                    base: 0x0a80_0000,
                    len: 24,
                },
            },
        ),
        i(
            "ipam-expand-subnet",
            IpamOp::ExpandSubnet {
                pool: SubnetPool::Shared,
                node: node(1),
                len: 22,
            },
        ),
        i(
            "ipam-release-subnet",
            IpamOp::ReleaseSubnet {
                pool: SubnetPool::Private,
                node: node(1),
            },
        ),
        i("ipam-join-backbone", IpamOp::JoinBackbone { node: node(4) }),
        i(
            "ipam-leave-backbone",
            IpamOp::LeaveBackbone { node: node(4) },
        ),
        (
            "trust-admit-server",
            OpBody::Trust(TrustOp::AdmitServer {
                cert: server_cert(),
            }),
        ),
        (
            "trust-revoke-server",
            OpBody::Trust(TrustOp::RevokeServer {
                revocation: revocation(),
            }),
        ),
    ]
}

/// Every vector: file stem → bytes.
fn vectors() -> BTreeMap<String, Vec<u8>> {
    let mut v = BTreeMap::new();
    for (name, body) in bodies() {
        v.insert(format!("body-{name}"), signed::to_cbor(&body));
    }
    let (admin, server) = (key(1), key(2));
    let create = bodies().remove(0).1;

    // An administrator's request (what a client sends to a server).
    let request = op::seal_request(admin.pair(), &create, T0, T0 + 60_000, 42);
    v.insert("envelope-request".into(), request.clone());
    v.insert("envelope-server-cert".into(), server_cert());
    v.insert("envelope-revocation".into(), revocation());

    // A server's first op: it admits itself with its certificate.
    let o = Op {
        origin: server.public(),
        seq: 1,
        hlc: Hlc {
            wall_ms: T0 + 10,
            logical: 0,
        },
        author: server.public(),
        body: bodies()
            .into_iter()
            .find(|(n, _)| *n == "trust-admit-server")
            .expect("vector body")
            .1,
    };
    v.insert(
        "op-admit-server".into(),
        op::seal_op(
            server.pair(),
            &LoggedOp {
                op: o,
                author_proof: None,
            },
        ),
    );

    // An op the server authored itself (no author proof).
    let o = Op {
        origin: server.public(),
        seq: 1,
        hlc: Hlc {
            wall_ms: T0,
            logical: 0,
        },
        author: server.public(),
        body: OpBody::Ipam(IpamOp::ClaimBlock { block: 3 }),
    };
    v.insert(
        "op-server-authored".into(),
        op::seal_op(
            server.pair(),
            &LoggedOp {
                op: o,
                author_proof: None,
            },
        ),
    );

    // The administrator's request appended to the server's log, carrying the author proof.
    let accepted = op::open_request(&request, T0 + 500, 0).expect("vector request is valid");
    let o = Op {
        origin: server.public(),
        seq: 2,
        hlc: Hlc {
            wall_ms: T0 + 500,
            logical: 2,
        },
        author: accepted.author,
        body: accepted.body,
    };
    v.insert(
        "op-with-author-proof".into(),
        op::seal_op(
            server.pair(),
            &LoggedOp {
                op: o,
                author_proof: Some(accepted.proof),
            },
        ),
    );
    v
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data-schema/vectors")
}

#[test]
fn golden_vectors_match_the_code() {
    let vectors = vectors();
    let update = std::env::var_os("LEMONADE_NEXUS_UPDATE_VECTORS").is_some();
    if update {
        std::fs::create_dir_all(dir()).expect("mkdir");
    }
    for (name, bytes) in &vectors {
        let path = dir().join(format!("{name}.hex"));
        let hex_now = format!("{}\n", hex::encode(bytes));
        if update {
            std::fs::write(&path, &hex_now).expect("write vector");
            continue;
        }
        let pinned = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate: LEMONADE_NEXUS_UPDATE_VECTORS=1)",
                path.display()
            )
        });
        assert_eq!(
            pinned, hex_now,
            "{name}: encoding changed; if intended, regenerate and review"
        );
    }
    // No stale vector files.
    for entry in std::fs::read_dir(dir()).expect("vectors dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(stem) = name.strip_suffix(".hex") {
            assert!(vectors.contains_key(stem), "stale vector file {name}");
        }
    }
}

#[test]
fn pinned_vectors_decode_and_verify() {
    for (name, bytes) in vectors() {
        if name.starts_with("body-") {
            let body: OpBody = signed::from_cbor_canonical(&bytes).expect(&name);
            assert_eq!(signed::to_cbor(&body), bytes);
        } else if name.starts_with("op-") {
            op::verify_op(&bytes).expect(&name);
        } else if name == "envelope-server-cert" {
            let cert = trust::verify_server_cert(&bytes, &key(1).public(), T0).expect(&name);
            assert_eq!(cert.server, key(2).public());
        } else if name == "envelope-revocation" {
            let r = trust::verify_revocation(&bytes, &key(1).public()).expect(&name);
            assert_eq!(r.server, key(3).public());
        } else {
            signed::verify(&bytes, TAG_REQUEST).expect(&name);
        }
    }
}
