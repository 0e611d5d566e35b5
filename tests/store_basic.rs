//! The store's contract, one behaviour per test: the single submit path, duplicates, gaps,
//! equivocation, tampering, clock skew, late arrivals (refold), batching, author proofs, schema
//! migration and refusal, and self-repair of drifted state tables.

use lemonade_nexus::hlc::Hlc;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::op::{self, OpError};
use lemonade_nexus::store::{self, Store, StoreError, Submitted};
use lemonade_nexus::testkit::{claim_block, create, grant_admin, key, now_ms, sealed};
use lemonade_nexus::tree::NodeId;

fn hlc(wall_ms: u64) -> Hlc {
    Hlc {
        wall_ms,
        logical: 0,
    }
}

fn new_store(dir: &tempfile::TempDir) -> Store {
    let anchor = key(1).public();
    Store::create(
        &dir.path().join("state.redb"),
        anchor,
        IpamConfig::default(),
    )
    .expect("create")
    .0
}

fn effect_ok(s: &Submitted) -> bool {
    matches!(s, Submitted::Appended { effect: Ok(()), .. })
}

#[test]
fn local_writes_persist_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let anchor = key(1);
    let path = dir.path().join("state.redb");
    let hash = {
        let mut s = new_store(&dir);
        let r = s.append_local(
            &anchor,
            anchor.public(),
            create(NodeId::ROOT, "acme", false),
            None,
            now_ms(),
        );
        assert!(
            effect_ok(&r.expect("append")),
            "root key may create under root"
        );
        let r = s
            .append_local(&anchor, anchor.public(), claim_block(3), None, now_ms())
            .expect("append");
        assert!(effect_ok(&r));
        assert_eq!(s.heads().get(&anchor.public()), Some(&2));
        s.state_hash()
    };
    let (s, report) = Store::open(&path).expect("reopen");
    assert_eq!(report, store::OpenReport::default());
    assert_eq!(s.state_hash(), hash);
    assert_eq!(s.verify_against_log().expect("consistent"), hash);
    assert_eq!(s.op_count().expect("count"), 2);
    assert!(
        s.state()
            .tree()
            .get(&NodeId::derive(&anchor.public(), 1))
            .is_some()
    );
}

#[test]
fn duplicate_is_an_idempotent_no_op() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = new_store(&dir);
    let a = key(1);
    let op = sealed(&a, 1, hlc(1_000), claim_block(1));
    assert!(effect_ok(&s.submit(&op, 1_000).expect("first")));
    let hash = s.state_hash();
    assert_eq!(
        s.submit(&op, 1_000).expect("again"),
        Submitted::Duplicate {
            origin: a.public(),
            seq: 1
        }
    );
    assert_eq!(s.state_hash(), hash);
    assert_eq!(s.op_count().expect("count"), 1);
}

#[test]
fn gap_names_the_missing_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = new_store(&dir);
    let a = key(1);
    s.submit(&sealed(&a, 1, hlc(1_000), claim_block(1)), 1_000)
        .expect("seq 1");
    let err = s
        .submit(&sealed(&a, 3, hlc(1_002), claim_block(3)), 1_002)
        .expect_err("gap");
    assert!(
        matches!(
            err,
            StoreError::Gap {
                missing: 2,
                got: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("missing seq 2"), "{err}");
    assert_eq!(s.op_count().expect("count"), 1, "nothing stored");
}

#[test]
fn a_second_different_op_with_the_same_seq_is_equivocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = new_store(&dir);
    let a = key(1);
    s.submit(&sealed(&a, 1, hlc(1_000), claim_block(1)), 1_000)
        .expect("seq 1");
    let err = s
        .submit(&sealed(&a, 1, hlc(1_000), claim_block(2)), 1_000)
        .expect_err("equivocation");
    assert!(
        matches!(err, StoreError::Equivocation { seq: 1, .. }),
        "{err}"
    );
}

#[test]
fn tampered_op_is_refused_and_not_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = new_store(&dir);
    let mut op = sealed(&key(1), 1, hlc(1_000), claim_block(1));
    let n = op.len();
    op[n - 80] ^= 1; // inside the payload
    let err = s.submit(&op, 1_000).expect_err("tampered");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert_eq!(s.op_count().expect("count"), 0);
}

#[test]
fn op_from_too_far_in_the_future_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = new_store(&dir);
    s.set_max_skew_ms(5_000);
    let op = sealed(&key(1), 1, hlc(100_000), claim_block(1));
    let err = s.submit(&op, 90_000).expect_err("future");
    assert!(matches!(err, StoreError::Skew(_)), "{err}");
    assert_eq!(s.op_count().expect("count"), 0);
    // Later, when our clock has caught up, the same op is accepted.
    assert!(effect_ok(&s.submit(&op, 96_000).expect("now in bound")));
}

#[test]
fn late_arrival_refolds_to_the_same_state_as_fold_order() {
    let a = key(1);
    let b = key(2);
    // a grants b admin at t=100; b creates "x" at t=150; a creates "x" at t=200 (sibling clash:
    // whichever folds first wins, so the order matters).
    let ops = vec![
        sealed(&a, 1, hlc(100), grant_admin(b.public())),
        sealed(&b, 1, hlc(150), create(NodeId::ROOT, "x", false)),
        sealed(&a, 2, hlc(200), create(NodeId::ROOT, "x", false)),
    ];
    let d1 = tempfile::tempdir().expect("tempdir");
    let mut in_order = new_store(&d1);
    for o in &ops {
        in_order.submit(o, 1_000).expect("submit");
    }
    let d2 = tempfile::tempdir().expect("tempdir");
    let mut late = new_store(&d2);
    late.submit(&ops[0], 1_000).expect("a1");
    late.submit(&ops[2], 1_000).expect("a2");
    assert_eq!((late.refolds(), late.replays()), (0, 0));
    let r = late.submit(&ops[1], 1_000).expect("b1 arrives late");
    assert!(effect_ok(&r), "b's create folds before a's: {r:?}");
    assert_eq!(
        late.replays(),
        1,
        "the checkpoint (the empty state) is before the late op"
    );
    assert_eq!(late.state_hash(), in_order.state_hash());
    assert_eq!(
        late.state_rows().expect("rows"),
        in_order.state_rows().expect("rows")
    );
    late.verify_against_log().expect("consistent");
    // a's create of the same hostname is the one with no effect, in both stores.
    let winner = NodeId::derive(&b.public(), 1);
    assert!(late.state().tree().get(&winner).is_some());
    assert!(
        late.state()
            .tree()
            .get(&NodeId::derive(&a.public(), 2))
            .is_none()
    );
}

#[test]
fn batch_gives_the_same_result_as_single_submits() {
    let a = key(1);
    let ops: Vec<Vec<u8>> = (1..=64u64)
        .map(|i| {
            sealed(
                &a,
                i,
                hlc(1_000 + i),
                create(NodeId::ROOT, &format!("n{i}"), false),
            )
        })
        .collect();
    let d1 = tempfile::tempdir().expect("tempdir");
    let mut one = new_store(&d1);
    for o in &ops {
        assert!(effect_ok(&one.submit(o, 2_000).expect("submit")));
    }
    let d2 = tempfile::tempdir().expect("tempdir");
    let mut batch = new_store(&d2);
    let results = batch.submit_batch(&ops, 2_000).expect("batch");
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(effect_ok)));
    assert_eq!(
        batch.state_rows().expect("rows"),
        one.state_rows().expect("rows")
    );
    // A batch containing a bad op: the others still go in.
    let b = key(2);
    let mixed = vec![
        sealed(&b, 1, hlc(5_000), claim_block(9)),
        sealed(&b, 3, hlc(5_001), claim_block(10)),
    ];
    let r = batch.submit_batch(&mixed, 5_000).expect("batch");
    assert!(r[0].is_ok());
    assert!(matches!(r[1], Err(StoreError::Gap { missing: 2, .. })));
}

#[test]
fn hostile_author_is_logged_without_effect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = new_store(&dir);
    let mallory = key(9);
    let r = s
        .submit(
            &sealed(&mallory, 1, hlc(1_000), create(NodeId::ROOT, "evil", false)),
            1_000,
        )
        .expect("logged");
    match r {
        Submitted::Appended {
            effect: Err(why), ..
        } => assert!(why.to_string().contains("not authorized"), "{why}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        s.state()
            .tree()
            .get(&NodeId::derive(&mallory.public(), 1))
            .map(|_| ()),
        None
    );
}

#[test]
fn admin_request_carried_by_a_server_takes_effect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = new_store(&dir);
    let admin = key(1); // the trust anchor
    let server = key(2); // holds no permission itself
    let now = now_ms();
    let req = op::seal_request(
        admin.pair(),
        &create(NodeId::ROOT, "corp", false),
        now,
        now + 60_000,
        77,
    );
    let accepted = op::open_request(&req, now, 5_000).expect("request valid");
    let r = s
        .append_local(
            &server,
            accepted.author,
            accepted.body,
            Some(accepted.proof),
            now,
        )
        .expect("append");
    assert!(effect_ok(&r), "{r:?}");
    // Without the proof the op cannot even be built validly.
    let err = s
        .append_local(
            &server,
            admin.public(),
            create(NodeId::ROOT, "corp2", false),
            None,
            now,
        )
        .expect_err("no proof");
    assert!(
        matches!(err, StoreError::Invalid(OpError::MissingAuthorProof { .. })),
        "{err}"
    );
}

#[test]
fn v0_layout_is_migrated_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let a = key(1);
    let ops: Vec<Vec<u8>> = (1..=5u64)
        .map(|i| {
            sealed(
                &a,
                i,
                hlc(1_000 + i),
                create(NodeId::ROOT, &format!("h{i}"), false),
            )
        })
        .collect();
    store::write_v0_layout(&path, a.public(), &ops).expect("v0");
    let (s, report) = Store::open(&path).expect("migrates");
    assert_eq!(report.migrated_from, Some(0));
    let d2 = tempfile::tempdir().expect("tempdir");
    let mut fresh = new_store(&d2);
    fresh.submit_batch(&ops, 2_000).expect("batch");
    assert_eq!(
        s.state_rows().expect("rows"),
        fresh.state_rows().expect("rows")
    );
    assert_eq!(
        s.verify_against_log().expect("consistent"),
        fresh.state_hash()
    );
    drop(s);
    let (_, again) = Store::open(&path).expect("reopen");
    assert_eq!(again.migrated_from, None, "migrated once");
}

#[test]
fn newer_schema_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    drop(new_store(&dir));
    store::force_schema_version(&path, 7).expect("force");
    let err = Store::open(&path).err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 7") && msg.contains("supports 0 to 1"),
        "{msg}"
    );
}

#[test]
fn store_of_another_cluster_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    drop(new_store(&dir));
    let err = Store::create(&path, key(5).public(), IpamConfig::default())
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::RootMismatch { .. }), "{err}");
    assert!(matches!(
        Store::open(&dir.path().join("nope.redb")),
        Err(StoreError::Missing(_))
    ));
}

#[test]
fn drifted_state_tables_are_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let a = key(1);
    let hash = {
        let mut s = new_store(&dir);
        s.submit(
            &sealed(&a, 1, hlc(1_000), create(NodeId::ROOT, "keep", false)),
            1_000,
        )
        .expect("op");
        s.state_hash()
    };
    // Someone deletes a state row behind the store's back.
    {
        let db = redb::Database::create(&path).expect("db");
        let tx = db.begin_write().expect("tx");
        {
            let def: redb::TableDefinition<&[u8], &[u8]> =
                redb::TableDefinition::new("state_nodes");
            let mut t = tx.open_table(def).expect("table");
            let id = NodeId::derive(&a.public(), 1);
            assert!(t.remove(&id.0[..]).expect("remove").is_some());
        }
        tx.commit().expect("commit");
    }
    let (s, report) = Store::open(&path).expect("open repairs");
    assert!(report.repaired);
    assert_eq!(s.state_hash(), hash);
    s.verify_against_log().expect("consistent after repair");
}

#[test]
fn an_author_request_takes_effect_at_most_once() {
    use lemonade_nexus::op::{LoggedOp, Op};
    use lemonade_nexus::store::NoEffect;
    let (admin, b, c) = (key(1), key(2), key(3));
    let t = 1_000_000;
    let req = op::seal_request(
        admin.pair(),
        &create(NodeId::ROOT, "corp", false),
        t,
        t + 60_000,
        5,
    );
    let acc = op::open_request(&req, t, 0).expect("request");
    let carry = |origin: &lemonade_nexus::identity::NodeKey, seq, wall| {
        let op = Op {
            origin: origin.public(),
            seq,
            hlc: hlc(wall),
            author: admin.public(),
            body: acc.body.clone(),
        };
        op::seal_op(
            origin.pair(),
            &LoggedOp {
                op,
                author_proof: Some(acc.proof.clone()),
            },
        )
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = new_store(&dir);
    assert!(effect_ok(
        &s.submit(&carry(&b, 1, t + 10), t + 10).expect("first use")
    ));
    // The same server replays it.
    match s.submit(&carry(&b, 2, t + 20), t + 20).expect("logged") {
        Submitted::Appended {
            effect: Err(NoEffect::ReplayedRequest { nonce: 5, .. }),
            ..
        } => {}
        other => panic!("expected a replay, got {other:?}"),
    }
    // Another server carried it too, earlier in fold order, and its op arrives late: now that one
    // is the first use and server b's op becomes the replay, on every server alike.
    assert!(effect_ok(
        &s.submit(&carry(&c, 1, t + 5), t + 30).expect("late")
    ));
    assert!(
        s.state()
            .tree()
            .get(&NodeId::derive(&c.public(), 1))
            .is_some()
    );
    assert!(
        s.state()
            .tree()
            .get(&NodeId::derive(&b.public(), 1))
            .is_none()
    );
    s.verify_against_log().expect("consistent");
    let path = dir.path().join("state.redb");
    drop(s);
    let (s, report) = Store::open(&path).expect("reopen");
    assert!(!report.repaired);
    s.verify_against_log().expect("consistent after reopen");
}

/// A late op after the checkpoint is folded by undoing back to it and replaying; one before the
/// checkpoint needs a full refold. Both give the state of the fold order, and consistent tables.
#[test]
fn late_ops_replay_from_the_checkpoint_or_refold_fully() {
    let (a, b) = (key(1), key(2));
    // a grants b admin first, then creates a2..a11 at t = 200..1100.
    let mut a_ops = vec![sealed(&a, 1, hlc(50), grant_admin(b.public()))];
    a_ops.extend((2..=11u64).map(|i| {
        sealed(
            &a,
            i,
            hlc(100 * i),
            create(NodeId::ROOT, &format!("a{i}"), false),
        )
    }));
    // b creates the same hostnames slightly earlier than a does, but b's ops arrive late: in fold
    // order b's creates win and a's are refused.
    let b_late = sealed(&b, 1, hlc(1_050), create(NodeId::ROOT, "a11", false));
    let b_very_late = sealed(&b, 2, hlc(150), create(NodeId::ROOT, "a2", false));

    let d1 = tempfile::tempdir().expect("tempdir");
    let mut reference = new_store(&d1);
    let mut all = a_ops.clone();
    all.push(b_late.clone());
    all.push(b_very_late.clone());
    reference.submit_batch(&all, 10_000).expect("batch"); // one refold, in fold order

    let d2 = tempfile::tempdir().expect("tempdir");
    let mut s = new_store(&d2);
    s.set_checkpoint_interval(4);
    for o in &a_ops {
        s.submit(o, 10_000).expect("a");
    }
    // The checkpoint moved to a's 8th op (t = 800); b1 at 1050 sorts after it: replay.
    assert!(effect_ok(&s.submit(&b_late, 10_000).expect("b1")));
    assert_eq!((s.replays(), s.refolds()), (1, 0));
    s.verify_against_log().expect("consistent after replay");
    assert!(
        s.state()
            .tree()
            .get(&NodeId::derive(&a.public(), 11))
            .is_none(),
        "a's a11 lost to b's"
    );
    // b2 at 150 sorts before the checkpoint: full refold.
    assert!(effect_ok(&s.submit(&b_very_late, 10_000).expect("b2")));
    assert_eq!((s.replays(), s.refolds()), (1, 1));
    s.verify_against_log().expect("consistent after refold");
    assert!(
        s.state()
            .tree()
            .get(&NodeId::derive(&a.public(), 2))
            .is_none(),
        "a's a2 lost to b's"
    );
    assert_eq!(
        s.state_rows().expect("rows"),
        reference.state_rows().expect("rows")
    );
    assert_eq!(s.state_hash(), reference.state_hash());
}
