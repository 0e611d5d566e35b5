//! The fold of trust ops: admission and revocation of servers (rules in `crate::trust`), unit
//! cases for every refusal and a property test that any arrival order folds to the same state.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::identity::NodeKey;
use crate::op::fold_order;
use crate::tree::{NodeKind, Permission, Permissions, WgKey};
use crate::trust::{Revocation, ServerCert, TrustOp, seal_revocation, seal_server_cert};

fn root() -> NodeKey {
    NodeKey::from_seed(&[1; 32])
}

fn server(i: u8) -> NodeKey {
    NodeKey::from_seed(&[10 + i; 32])
}

fn op(origin: PublicKey, seq: u64, wall_ms: u64, body: OpBody) -> Op {
    Op {
        origin,
        seq,
        hlc: Hlc {
            wall_ms,
            logical: 0,
        },
        author: origin,
        body,
    }
}

fn cert_bytes(signer: &NodeKey, server: PublicKey, name: &str, expires_at_ms: u64) -> Vec<u8> {
    seal_server_cert(
        signer.pair(),
        &ServerCert {
            server,
            name: name.into(),
            issued_at_ms: 1,
            expires_at_ms,
        },
    )
}

fn admit(server: PublicKey, seq: u64, wall: u64, cert: Vec<u8>) -> Op {
    op(
        server,
        seq,
        wall,
        OpBody::Trust(TrustOp::AdmitServer { cert }),
    )
}

fn revocation(target: PublicKey) -> Vec<u8> {
    seal_revocation(
        root().pair(),
        &Revocation {
            server: target,
            issued_at_ms: 5,
            reason: "decommissioned".into(),
        },
    )
}

fn revoke(carrier: PublicKey, seq: u64, wall: u64, target: PublicKey) -> Op {
    op(
        carrier,
        seq,
        wall,
        OpBody::Trust(TrustOp::RevokeServer {
            revocation: revocation(target),
        }),
    )
}

fn create_customer(origin: PublicKey, seq: u64, wall: u64, name: &str) -> Op {
    op(
        origin,
        seq,
        wall,
        OpBody::Tree(TreeOp::Create {
            parent: NodeId::ROOT,
            kind: NodeKind::Customer,
            hostname: name.into(),
            owner: None,
            wg_pubkey: None,
        }),
    )
}

fn server_node(origin: PublicKey, seq: u64, wall: u64, name: &str) -> Op {
    op(
        origin,
        seq,
        wall,
        OpBody::Tree(TreeOp::Create {
            parent: NodeId::ROOT,
            kind: NodeKind::Server,
            hostname: name.into(),
            owner: Some(origin),
            wg_pubkey: Some(WgKey(origin.0)),
        }),
    )
}

fn join_backbone(origin: PublicKey, seq: u64, wall: u64, node: NodeId) -> Op {
    op(
        origin,
        seq,
        wall,
        OpBody::Ipam(crate::ipam::IpamOp::JoinBackbone { node }),
    )
}

/// Applies `o` and checks that a refusal changed nothing.
fn apply_checked(state: &mut State, o: &Op) -> Result<(), Rejection> {
    let before = state.clone();
    let r = state.apply(o);
    if r.is_err() {
        assert_eq!(state, &before, "a refused op changed the state");
    }
    state.check_invariants().expect("invariants hold");
    r
}

fn is_admin(state: &State, key: &PublicKey) -> bool {
    crate::authz::authorize(state.tree(), key, Permission::Admin, NodeId::ROOT).is_ok()
}

#[test]
fn admission_makes_an_active_server_with_admin_on_the_root() {
    let mut state = State::new(root().public());
    let s = server(0).public();
    assert!(!is_admin(&state, &s));
    // Without admission a server can do nothing.
    assert!(apply_checked(&mut state, &create_customer(s, 1, 10, "early")).is_err());
    apply_checked(
        &mut state,
        &admit(s, 2, 20, cert_bytes(&root(), s, "eu-1", 0)),
    )
    .expect("admit");
    assert!(is_admin(&state, &s));
    assert!(state.is_active_server(&s));
    let status = state.server_status(&s).expect("status");
    assert_eq!(status.name, "eu-1");
    assert_eq!(
        status.admitted,
        Some(Hlc {
            wall_ms: 20,
            logical: 0
        })
    );
    assert_eq!(
        state.active_servers().map(|(k, _)| k).collect::<Vec<_>>(),
        vec![s]
    );
    apply_checked(&mut state, &create_customer(s, 3, 30, "acme")).expect("now it may");
    // Re-admission with a renewed certificate: fine, first admission time kept, name updated.
    apply_checked(
        &mut state,
        &admit(s, 4, 40, cert_bytes(&root(), s, "eu-one", 1_000)),
    )
    .expect("renewal");
    let status = state.server_status(&s).expect("status");
    assert_eq!(
        (status.name.as_str(), status.expires_at_ms),
        ("eu-one", 1_000)
    );
    assert_eq!(status.admitted.map(|h| h.wall_ms), Some(20));
}

#[test]
fn admission_refusals_say_why_and_change_nothing() {
    let mut state = State::new(root().public());
    let s = server(0).public();
    let other = server(1).public();
    let wrong_root = NodeKey::from_seed(&[99; 32]);
    // Signed by another root.
    let e = apply_checked(
        &mut state,
        &admit(s, 1, 10, cert_bytes(&wrong_root, s, "a", 0)),
    )
    .expect_err("wrong root");
    assert!(
        e.to_string().contains(&format!(
            "signed by {}, but this cluster's root is {}",
            wrong_root.public(),
            root().public()
        )),
        "{e}"
    );
    // Expired at the op's HLC (the local clock plays no part).
    let expiring = cert_bytes(&root(), s, "a", 100);
    assert!(matches!(
        apply_checked(&mut state, &admit(s, 2, 100, expiring.clone())),
        Err(Rejection::Trust(TrustError::Expired { .. }))
    ));
    // A forged signature (one payload byte changed).
    let mut forged = cert_bytes(&root(), s, "abc", 0);
    let p = forged.windows(3).position(|w| w == b"abc").expect("name");
    forged[p] = b'x';
    assert!(matches!(
        apply_checked(&mut state, &admit(s, 3, 10, forged)),
        Err(Rejection::Trust(TrustError::Envelope { .. }))
    ));
    // Someone else's certificate.
    assert!(matches!(
        apply_checked(
            &mut state,
            &admit(s, 4, 10, cert_bytes(&root(), other, "b", 0))
        ),
        Err(Rejection::Trust(TrustError::NotTheAuthor { .. }))
    ));
    // Carried for another author (an admin's request through a server): refused too.
    let mut carried = admit(other, 1, 10, cert_bytes(&root(), s, "a", 0));
    carried.author = s;
    assert!(apply_checked(&mut state, &carried).is_err());
    assert_eq!(state.trust().map().len(), 0);
    // The same expiring certificate folded at an earlier HLC is valid.
    apply_checked(&mut state, &admit(s, 5, 99, expiring)).expect("before expiry");
}

#[test]
fn revocation_cuts_a_server_off_from_then_on() {
    let r = root();
    let mut state = State::new(r.public());
    let (a, b) = (server(0).public(), server(1).public());
    apply_checked(&mut state, &admit(a, 1, 10, cert_bytes(&r, a, "a", 0))).expect("a");
    apply_checked(&mut state, &admit(b, 1, 11, cert_bytes(&r, b, "b", 0))).expect("b");
    apply_checked(&mut state, &server_node(b, 2, 12, "b")).expect("b's node");
    let b_node = NodeId::derive(&b, 2);
    apply_checked(&mut state, &join_backbone(b, 3, 13, b_node)).expect("backbone");
    apply_checked(&mut state, &create_customer(b, 4, 14, "made-by-b")).expect("customer");
    let made_by_b = NodeId::derive(&b, 4);
    // b also holds a grant deeper in the tree.
    let grant = op(
        a,
        2,
        15,
        OpBody::Tree(TreeOp::Grant {
            node: made_by_b,
            key: b,
            permissions: Permissions::of(&[Permission::EditNode]),
        }),
    );
    apply_checked(&mut state, &grant).expect("grant");
    assert!(state.ipam().backbone_address(&b_node).is_some());

    // A stranger cannot carry a revocation; a revoked key not either (below).
    let stranger = server(2).public();
    assert!(matches!(
        apply_checked(&mut state, &revoke(stranger, 1, 16, b)),
        Err(Rejection::Trust(TrustError::CarrierNotActive(_)))
    ));
    // The root cannot be revoked.
    assert!(matches!(
        apply_checked(&mut state, &revoke(a, 3, 16, r.public())),
        Err(Rejection::Trust(TrustError::RootNotRevocable(_)))
    ));
    apply_checked(&mut state, &revoke(a, 4, 20, b)).expect("revoke");
    assert!(state.is_revoked(&b) && !state.is_active_server(&b));
    assert_eq!(
        state.server_status(&b).map(|s| s.revoke_reason.as_str()),
        Some("decommissioned")
    );
    assert!(state.tree().nodes().all(|n| !n.grants.contains_key(&b)));
    assert!(state.ipam().backbone_address(&b_node).is_none());
    // What b did before the revocation stays.
    assert!(state.tree().get(&made_by_b).is_some());
    // Every later op of b has no effect, whatever it is.
    for o in [
        create_customer(b, 5, 21, "late"),
        revoke(b, 6, 22, a),
        admit(b, 7, 23, cert_bytes(&r, b, "b", 0)),
    ] {
        assert!(matches!(
            apply_checked(&mut state, &o),
            Err(Rejection::Trust(TrustError::OriginRevoked(_)))
        ));
    }
    // Nobody can hand b a grant again, and a second carrier of the same revocation is harmless.
    let regrant = op(
        a,
        5,
        24,
        OpBody::Tree(TreeOp::Grant {
            node: NodeId::ROOT,
            key: b,
            permissions: Permissions::ADMIN,
        }),
    );
    assert!(matches!(
        apply_checked(&mut state, &regrant),
        Err(Rejection::Trust(TrustError::Revoked(_)))
    ));
    let hash = state.hash();
    apply_checked(&mut state, &revoke(a, 6, 25, b)).expect("idempotent");
    let _ = state.take_changes();
    assert_eq!(state.hash(), hash);
    assert!(state.is_active_server(&a));
}

#[test]
fn a_key_revoked_before_admission_is_never_admitted() {
    let r = root();
    let mut state = State::new(r.public());
    let (a, b) = (server(0).public(), server(1).public());
    apply_checked(&mut state, &admit(a, 1, 10, cert_bytes(&r, a, "a", 0))).expect("a");
    apply_checked(&mut state, &revoke(a, 2, 11, b)).expect("pre-emptive revocation");
    let status = state.server_status(&b).expect("recorded");
    assert_eq!((status.admitted, status.revoked.is_some()), (None, true));
    // b's valid certificate, in b's own log (so the origin check is not what refuses it here:
    // b's ops are refused as a revoked origin, and an admission carrying b's cert as well).
    assert!(apply_checked(&mut state, &admit(b, 1, 12, cert_bytes(&r, b, "b", 0))).is_err());
    assert!(!state.is_active_server(&b));
    assert_eq!(state.active_servers().count(), 1);
}

#[test]
fn single_server_root_admits_itself() {
    // The default single-server cluster: the root is the server's own key.
    let r = root();
    let mut state = State::new(r.public());
    apply_checked(
        &mut state,
        &admit(r.public(), 1, 10, cert_bytes(&r, r.public(), "solo", 0)),
    )
    .expect("self-admission");
    assert!(state.is_active_server(&r.public()));
}

#[test]
fn trust_rows_round_trip_and_count_in_the_hash() {
    let r = root();
    let mut state = State::new(r.public());
    let empty_hash = state.hash();
    let (a, b) = (server(0).public(), server(1).public());
    apply_checked(&mut state, &admit(a, 1, 10, cert_bytes(&r, a, "a", 0))).expect("a");
    apply_checked(&mut state, &revoke(a, 2, 11, b)).expect("revoke b");
    assert_ne!(state.hash(), empty_hash);
    let rows = state.take_changes();
    assert!(rows.iter().filter(|r| r.table == StateTable::Trust).count() == 2);
    let back = State::from_rows(r.public(), state.rows()).expect("decode");
    assert_eq!(back.hash(), state.hash());
    assert_eq!(back, state);
    // A trust row with a short key is refused.
    let mut bad = state.rows();
    for row in &mut bad {
        if row.table == StateTable::Trust {
            row.key.pop();
        }
    }
    assert!(State::from_rows(r.public(), bad).is_err());
}

// ---- property: any arrival order, the same state; a revoked origin never acts again ----

#[derive(Clone, Debug)]
enum Act {
    /// Re-admit with a fresh certificate, or an expired one.
    Admit {
        expired: bool,
    },
    Customer,
    ServerNode,
    Backbone,
    /// Revoke server `i % 4` (3 = the root, always refused).
    Revoke(u8),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        1 => any::<bool>().prop_map(|expired| Act::Admit { expired }),
        3 => Just(Act::Customer),
        2 => Just(Act::ServerNode),
        2 => Just(Act::Backbone),
        1 => any::<u8>().prop_map(Act::Revoke),
    ]
}

/// Three servers' logs: each starts with its admission, then the steps `(act, server, delta)`.
/// Each origin's HLC grows by `delta`, so the logs interleave in many ways in fold order.
fn build(steps: &[(Act, u8, u8)]) -> Vec<Op> {
    let r = root();
    let keys: Vec<PublicKey> = (0..3).map(|i| server(i).public()).collect();
    let mut seq = [0u64; 3];
    let mut wall = [100u64, 101, 102];
    let mut ops = Vec::new();
    let next = |i: usize, seq: &mut [u64; 3]| {
        seq[i] += 1;
        seq[i]
    };
    for i in 0..3 {
        let s = next(i, &mut seq);
        ops.push(admit(keys[i], s, wall[i], cert_bytes(&r, keys[i], "s", 0)));
    }
    for (step, (act, who, delta)) in steps.iter().enumerate() {
        let i = usize::from(*who % 3);
        wall[i] += u64::from(*delta % 40);
        let k = keys[i];
        let s = next(i, &mut seq);
        let w = wall[i];
        ops.push(match act {
            Act::Admit { expired } => {
                let exp = if *expired { w } else { 0 };
                admit(k, s, w, cert_bytes(&r, k, "s", exp))
            }
            Act::Customer => create_customer(k, s, w, &format!("c{step}")),
            Act::ServerNode => server_node(k, s, w, &format!("srv{step}")),
            Act::Backbone => {
                // Its most recent server-node create (may not exist or already be on it).
                let node = ops
                    .iter()
                    .rev()
                    .find(|o| {
                        o.origin == k
                            && matches!(
                                o.body,
                                OpBody::Tree(TreeOp::Create {
                                    kind: NodeKind::Server,
                                    ..
                                })
                            )
                    })
                    .map(|o| NodeId::derive(&o.origin, o.seq))
                    .unwrap_or(NodeId::ROOT);
                join_backbone(k, s, w, node)
            }
            Act::Revoke(t) => {
                let target = match t % 4 {
                    3 => r.public(),
                    j => keys[usize::from(j)],
                };
                revoke(k, s, w, target)
            }
        });
    }
    ops
}

/// The store's way of receiving ops: in order → apply; late → refold everything.
fn receive(arrival: &[Op]) -> State {
    let mut log: Vec<Op> = Vec::new();
    let mut state = State::new(root().public());
    for o in arrival {
        let in_order = log.last().is_none_or(|last| fold_order(o, last).is_gt());
        let at = log.partition_point(|x| fold_order(x, o).is_lt());
        log.insert(at, o.clone());
        if in_order {
            let _ = state.apply(o);
        } else {
            state = State::new(root().public());
            for x in &log {
                let _ = state.apply(x);
            }
        }
    }
    state
}

fn interleave(ops: &[Op], picks: &[u8]) -> Vec<Op> {
    let mut queues: BTreeMap<PublicKey, std::collections::VecDeque<Op>> = BTreeMap::new();
    for o in ops {
        queues.entry(o.origin).or_default().push_back(o.clone());
    }
    let origins: Vec<PublicKey> = queues.keys().copied().collect();
    let mut out = Vec::new();
    let mut picks = picks.iter().cycle();
    while out.len() < ops.len() {
        let want = usize::from(*picks.next().unwrap_or(&0));
        let q = (want..want + origins.len())
            .map(|i| origins[i % origins.len()])
            .find(|k| queues.get(k).is_some_and(|q| !q.is_empty()))
            .expect("some queue is not empty");
        if let Some(o) = queues.get_mut(&q).and_then(|q| q.pop_front()) {
            out.push(o);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn trust_fold_is_independent_of_arrival_order(
        steps in proptest::collection::vec((act(), any::<u8>(), any::<u8>()), 1..40),
        picks_a in proptest::collection::vec(any::<u8>(), 1..20),
        picks_b in proptest::collection::vec(any::<u8>(), 1..20),
    ) {
        let ops = build(&steps);
        let mut sorted = ops.clone();
        sorted.sort_by(fold_order);
        let mut reference = State::new(root().public());
        for o in &sorted {
            let revoked_before = reference.is_revoked(&o.origin);
            let before = reference.clone();
            let r = reference.apply(o);
            // A revoked origin's later ops never take effect.
            if revoked_before {
                prop_assert!(r.is_err());
                prop_assert_eq!(&reference, &before);
            }
            if let Err(e) = reference.check_invariants() {
                return Err(TestCaseError::fail(format!("after {:?}: {e}", o.body)));
            }
            // Revoked keys are never active and hold no grant (also checked by invariants).
            for (k, _) in reference.active_servers() {
                prop_assert!(!reference.is_revoked(&k));
            }
        }
        let _ = reference.take_changes();
        let back = State::from_rows(root().public(), reference.rows()).expect("rows");
        prop_assert_eq!(back.hash(), reference.hash());
        for picks in [&picks_a, &picks_b] {
            let mut state = receive(&interleave(&ops, picks));
            let _ = state.take_changes();
            prop_assert_eq!(state.hash(), reference.hash());
            prop_assert_eq!(&state, &reference);
        }
    }
}

/// The generator does reach the cases that matter: revocations taking effect, and a revoked
/// origin's later ops being refused (so the property above is not vacuous).
#[test]
fn generated_logs_revoke_servers_that_keep_writing() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut revocations, mut refused_after) = (0, 0);
    for _ in 0..64 {
        let steps = proptest::collection::vec((act(), any::<u8>(), any::<u8>()), 20..40)
            .new_tree(&mut runner)
            .expect("tree")
            .current();
        let mut ops = build(&steps);
        ops.sort_by(fold_order);
        let mut state = State::new(root().public());
        for o in &ops {
            let was = state.is_revoked(&o.origin);
            let r = state.apply(o);
            if was {
                refused_after += 1;
            }
            if r.is_ok() && matches!(o.body, OpBody::Trust(TrustOp::RevokeServer { .. })) {
                revocations += 1;
            }
        }
    }
    assert!(
        revocations > 10,
        "only {revocations} revocations took effect"
    );
    assert!(
        refused_after > 10,
        "only {refused_after} ops after a revocation"
    );
}
