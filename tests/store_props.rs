//! Property: the state is a function of the SET of ops. Ops from several origins (including a
//! hostile one without permissions) are delivered to redb stores in different interleavings and
//! batchings, as different servers would receive them — with late arrivals forcing refolds — and
//! every store ends with byte-identical state tables and the same state hash, equal to a pure
//! in-memory fold in fold order.

use lemonade_nexus::hlc::Hlc;
use lemonade_nexus::identity::NodeKey;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::op::{self, LoggedOp, Op, OpBody};
use lemonade_nexus::state::State;
use lemonade_nexus::store::{Store, Submitted};
use lemonade_nexus::testkit::{
    allocate, claim_block, create, delete, grant_admin, key, release, sealed,
};
use lemonade_nexus::tree::NodeId;
use proptest::prelude::*;

/// One generated op: (kind, node choice, hostname choice, endpoint?, slot/block, hlc increment).
type Spec = (u8, usize, u8, bool, u32, u64);

fn spec() -> impl Strategy<Value = Spec> {
    (
        0u8..9,
        0usize..64,
        0u8..4,
        any::<bool>(),
        0u32..600,
        0u64..15,
    )
}

struct Origin {
    key: NodeKey,
    start_ms: u64,
}

/// Candidate node ids: the root and every id an op of any origin could create.
fn candidates(origins: &[Origin]) -> Vec<NodeId> {
    // The root several times: most creates should land somewhere that exists.
    let mut v = vec![NodeId::ROOT; 4];
    for o in origins {
        for seq in 1..=6 {
            v.push(NodeId::derive(&o.key.public(), seq));
        }
    }
    v
}

/// The administrator's (anchor's) signed requests that servers may carry into their logs; several
/// servers may carry the same one, and one server may carry it twice: it must take effect once.
fn admin_requests() -> Vec<op::AcceptedRequest> {
    (0..4u64)
        .map(|n| {
            let body = create(NodeId::ROOT, &format!("adm{n}"), n % 2 == 0);
            let bytes = op::seal_request(key(1).pair(), &body, 0, 600_000, n);
            op::open_request(&bytes, 0, 0).expect("valid request")
        })
        .collect()
}

fn body(s: &Spec, nodes: &[NodeId], granted: &[NodeKey]) -> OpBody {
    let (kind, n, h, endpoint, num, _) = *s;
    let node = nodes[n % nodes.len()];
    match kind {
        0 | 1 => create(node, ["web", "db", "api", "ops"][h as usize], endpoint),
        2 => delete(node),
        3 => claim_block(num % 8),
        4 => allocate(node, num),
        5 => release(node),
        6 => grant_admin(granted[h as usize % granted.len()].public()),
        _ => create(node, "web", endpoint),
    }
}

/// Each origin's log: sealed envelopes with per-origin increasing HLCs, as a real origin writes.
fn build_logs(origins: &[Origin], specs: &[Vec<Spec>]) -> Vec<Vec<Vec<u8>>> {
    let nodes = candidates(origins);
    let granted = [key(2), key(3)];
    origins
        .iter()
        .zip(specs)
        .enumerate()
        .map(|(i, (o, ss))| {
            let mut out = Vec::new();
            let mut clock = Hlc::default();
            let mut wall = o.start_ms;
            let mut seq = 0;
            if i == 0 {
                // The anchor grants the two servers admin first (the hostile origin gets nothing).
                for g in &granted {
                    seq += 1;
                    clock = clock.tick(wall);
                    out.push(sealed(&o.key, seq, clock, grant_admin(g.public())));
                }
            }
            let requests = admin_requests();
            for s in ss {
                seq += 1;
                wall += s.5;
                clock = clock.tick(wall);
                // Kinds 7 and 8: the two servers (origins 1 and 2) carry an administrator's request.
                if s.0 >= 7 && (i == 1 || i == 2) {
                    let r = &requests[s.2 as usize % requests.len()];
                    let op = Op {
                        origin: o.key.public(),
                        seq,
                        hlc: clock,
                        author: r.author,
                        body: r.body.clone(),
                    };
                    out.push(op::seal_op(
                        o.key.pair(),
                        &LoggedOp {
                            op,
                            author_proof: Some(r.proof.clone()),
                        },
                    ));
                    continue;
                }
                out.push(sealed(&o.key, seq, clock, body(s, &nodes, &granted)));
            }
            out
        })
        .collect()
}

/// Delivers the logs interleaved by `choices` in batches sized by `batches`.
fn deliver(store: &mut Store, logs: &[Vec<Vec<u8>>], choices: &[usize], batches: &[usize]) {
    let mut next = vec![0usize; logs.len()];
    let mut order = Vec::new();
    let mut ci = 0;
    while next.iter().zip(logs).any(|(n, l)| *n < l.len()) {
        let live: Vec<usize> = (0..logs.len())
            .filter(|&i| next[i] < logs[i].len())
            .collect();
        let pick = live[choices.get(ci).copied().unwrap_or(ci) % live.len()];
        ci += 1;
        order.push(logs[pick][next[pick]].clone());
        next[pick] += 1;
    }
    let mut bi = 0;
    let mut rest = &order[..];
    while !rest.is_empty() {
        let n = batches.get(bi).copied().unwrap_or(1).clamp(1, rest.len());
        bi += 1;
        for r in store
            .submit_batch(&rest[..n], u64::MAX / 2)
            .expect("batch commits")
        {
            let r = r.expect("every op is valid and in order");
            assert!(matches!(r, Submitted::Appended { .. }), "{r:?}");
        }
        rest = &rest[n..];
    }
}

fn fresh(dir: &tempfile::TempDir, name: &str) -> Store {
    let mut s = Store::create(
        &dir.path().join(name),
        key(1).public(),
        IpamConfig::default(),
    )
    .expect("store")
    .0;
    s.set_max_skew_ms(u64::MAX / 4);
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_gives_identical_state(
        specs in proptest::collection::vec(proptest::collection::vec(spec(), 1..10), 4),
        starts in proptest::collection::vec(100u64..160, 4),
        choices_a in proptest::collection::vec(0usize..4, 0..60),
        choices_b in proptest::collection::vec(0usize..4, 0..60),
        batches_a in proptest::collection::vec(1usize..6, 0..40),
        checkpoint_every in 1usize..6,
    ) {
        let origins: Vec<Origin> = [1u8, 2, 3, 9]
            .iter()
            .zip(&starts)
            .map(|(&seed, &start)| Origin { key: key(seed), start_ms: if seed == 1 { 100 } else { start } })
            .collect();
        let logs = build_logs(&origins, &specs);

        // Reference: a pure in-memory fold in fold order.
        // (The rule "an author's request takes effect once" is applied here too.)
        let mut all: Vec<LoggedOp> = logs
            .iter()
            .flatten()
            .map(|b| op::verify_op(b).expect("valid").logged)
            .collect();
        all.sort_by(|x, y| op::fold_order(&x.op, &y.op));
        let mut pure = State::with_ipam_config(key(1).public(), IpamConfig::default()).expect("state");
        let mut used = std::collections::BTreeSet::new();
        for l in &all {
            if let Some(p) = &l.author_proof
                && !used.insert((l.op.author, p.nonce))
            {
                continue; // a replayed request: no effect
            }
            let effect = pure.apply(&l.op);
            if l.op.origin == key(9).public() {
                prop_assert!(effect.is_err(), "the hostile origin's op {:?} took effect", l.op);
            }
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = fresh(&dir, "a.redb");
        // A short checkpoint interval: late ops land both after the checkpoint (replay from it,
        // undoing rows) and before it (full refold).
        a.set_checkpoint_interval(checkpoint_every);
        deliver(&mut a, &logs, &choices_a, &batches_a);
        let mut b = fresh(&dir, "b.redb");
        deliver(&mut b, &logs, &choices_b, &[]);

        prop_assert_eq!(a.state_hash(), pure.hash());
        prop_assert_eq!(b.state_hash(), pure.hash());
        let rows_a = a.state_rows().expect("rows");
        prop_assert_eq!(&rows_a, &b.state_rows().expect("rows"));
        prop_assert_eq!(a.verify_against_log().expect("a consistent"), pure.hash());
        prop_assert_eq!(b.verify_against_log().expect("b consistent"), pure.hash());

        // And after a reopen, from the tables alone.
        drop(a);
        let (a2, report) = Store::open(&dir.path().join("a.redb")).expect("reopen");
        prop_assert!(!report.repaired);
        prop_assert_eq!(a2.state_hash(), pure.hash());
        prop_assert_eq!(a2.state_rows().expect("rows"), rows_a);
    }
}
