//! Signed op log throughput (issue 2).
//!
//! * `ops/raw_ed25519_verify`: ring Ed25519 verifications per second of signatures over messages
//!   the size of an op envelope — the in-run reference.
//! * `ops/verify_apply`: signed ops fully checked (`op::verify_op`: structure, canonical payload,
//!   signature) and folded into a `State` (`State::apply`), one core. The ratio to the reference
//!   is our overhead over the signature check itself (goal ≥ 70%).
//! * `ops/verify_apply_rows`: the same plus producing the state rows (`take_changes`), i.e. all the
//!   CPU work of `Store::submit` except redb.
//! * `redb/commit_single`: ops committed through `Store::submit`, one op per write transaction
//!   (fsync per op: `Durability::Immediate`).
//! * `redb/commit_grouped`: the same with `Store::submit_batch`, 64 ops per transaction.
//! * `redb/late_arrival_refold_4k`: one op that sorts before everything else (a late arrival from
//!   another origin) into a log of 4096 ops: a full refold and rewrite of the state tables.
//! * `redb/late_arrival_replay_4k`: one op slightly behind the newest (the common case): undo to
//!   the store's checkpoint and replay from there (bounded by the checkpoint interval, 1024).
//! * `redb/raw_commit_single`: a bare redb transaction inserting one 300-byte row: what the disk
//!   and redb cost before any of our work.
//!
//! Run: `cargo bench --bench state_ops` (or `-- --quick`). Besides criterion's own output it
//! writes a summary to `target/bench-results/state_ops.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use lemonade_nexus::hlc::Hlc;
use lemonade_nexus::identity::NodeKey;
use lemonade_nexus::ipam::IpamConfig;
use lemonade_nexus::op::{self, OpBody};
use lemonade_nexus::state::State;
use lemonade_nexus::store::Store;
use lemonade_nexus::testkit::{create, key, now_ms, sealed};
use lemonade_nexus::tree::NodeId;
use ring::signature::{ED25519, KeyPair, UnparsedPublicKey};

const OPS_PER_ITER: usize = 1024;
const GROUP: usize = 64;

/// Op number `i` (0-based) of `origin`'s log: 256 customers under the root, then endpoints spread
/// over them (stays far below the per-node child limit). Every op takes effect.
fn body(origin: &NodeKey, i: u64) -> OpBody {
    if i < 256 {
        create(NodeId::ROOT, &format!("c{i}"), false)
    } else {
        create(
            NodeId::derive(&origin.public(), 1 + i % 256),
            &format!("e{i}"),
            true,
        )
    }
}

fn ops(origin: &NodeKey, from: u64, n: usize, clock: &mut Hlc) -> Vec<Vec<u8>> {
    (from..from + n as u64)
        .map(|i| {
            *clock = clock.tick(now_ms());
            sealed(origin, i + 1, *clock, body(origin, i))
        })
        .collect()
}

fn bench_cpu(c: &mut Criterion) {
    let origin = key(1);
    let mut clock = Hlc::default();
    let envelopes = ops(&origin, 0, OPS_PER_ITER, &mut clock);
    let empty = State::with_ipam_config(origin.public(), IpamConfig::default()).expect("state");

    // Reference: raw signature checks over messages as long as our envelopes.
    let sigs: Vec<(Vec<u8>, Vec<u8>)> = envelopes
        .iter()
        .map(|e| {
            let msg = e.clone();
            let sig = origin.pair().sign(&msg).as_ref().to_vec();
            (msg, sig)
        })
        .collect();
    let public = origin.pair().public_key().as_ref().to_vec();

    let mut g = c.benchmark_group("ops");
    g.throughput(Throughput::Elements(OPS_PER_ITER as u64));
    g.bench_function("raw_ed25519_verify", |b| {
        b.iter(|| {
            for (m, s) in &sigs {
                UnparsedPublicKey::new(&ED25519, &public)
                    .verify(m, s)
                    .expect("valid");
            }
        })
    });
    g.bench_function("verify_apply", |b| {
        b.iter_batched(
            || empty.clone(),
            |mut state| {
                for e in &envelopes {
                    let v = op::verify_op(e).expect("valid op");
                    state.apply(&v.logged.op).expect("op takes effect");
                }
                state
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("verify_apply_rows", |b| {
        b.iter_batched(
            || {
                let mut s = empty.clone();
                s.take_changes();
                s
            },
            |mut state| {
                let mut rows = 0;
                for e in &envelopes {
                    let v = op::verify_op(e).expect("valid op");
                    state.apply(&v.logged.op).expect("op takes effect");
                    rows += state.take_changes().len();
                }
                (state, rows)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn bench_dir() -> PathBuf {
    // On the target disk (not a tmpfs), so fsync costs what it costs in production.
    // Per process: two runs at once must not share (and delete) each other's databases.
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-scratch")
        .join(format!("state_ops-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn fresh_store(dir: &Path, name: &str, root: &NodeKey) -> Store {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    Store::create(&path, root.public(), IpamConfig::default())
        .expect("store")
        .0
}

fn bench_redb(c: &mut Criterion) {
    let dir = bench_dir();
    let origin = key(1);
    let mut g = c.benchmark_group("redb");

    // Reference for the disk: a bare redb commit of one 300-byte row per transaction.
    let raw_path = dir.join("raw.redb");
    let _ = std::fs::remove_file(&raw_path);
    let raw = redb::Database::create(&raw_path).expect("raw db");
    let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
    let mut n = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_commit_single", |b| {
        b.iter(|| {
            n += 1;
            let tx = raw.begin_write().expect("tx");
            tx.open_table(table)
                .expect("table")
                .insert(n, &[7u8; 300][..])
                .expect("insert");
            tx.commit().expect("commit");
        })
    });
    drop(raw);

    let mut store = fresh_store(&dir, "single.redb", &origin);
    let (mut next, mut clock) = (0u64, Hlc::default());
    g.throughput(Throughput::Elements(1));
    g.bench_function("commit_single", |b| {
        b.iter_custom(|iters| {
            let batch = ops(&origin, next, iters as usize, &mut clock);
            next += iters;
            let start = Instant::now();
            for e in &batch {
                store.submit(e, now_ms()).expect("committed");
            }
            start.elapsed()
        })
    });
    drop(store);

    let mut store = fresh_store(&dir, "grouped.redb", &origin);
    let (mut next, mut clock) = (0u64, Hlc::default());
    g.throughput(Throughput::Elements(GROUP as u64));
    g.bench_function("commit_grouped", |b| {
        b.iter_custom(|iters| {
            let batch = ops(&origin, next, iters as usize * GROUP, &mut clock);
            next += iters * GROUP as u64;
            let start = Instant::now();
            for chunk in batch.chunks(GROUP) {
                for r in store.submit_batch(chunk, now_ms()).expect("committed") {
                    r.expect("accepted");
                }
            }
            start.elapsed()
        })
    });

    // A late arrival: an op from another origin that sorts before everything folded so far, into
    // a log of LATE_LOG ops. The store refolds the whole log and rewrites the state tables.
    let mut store = fresh_store(&dir, "late.redb", &origin);
    let mut clock = Hlc::default();
    for chunk in ops(&origin, 0, LATE_LOG, &mut clock).chunks(GROUP) {
        store.submit_batch(chunk, now_ms()).expect("committed");
    }
    let other = key(2);
    let mut seq = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("late_arrival_refold_4k", |b| {
        b.iter(|| {
            seq += 1;
            let late = sealed(
                &other,
                seq,
                Hlc {
                    wall_ms: seq,
                    logical: 0,
                },
                create(NodeId::ROOT, &format!("late{seq}"), false),
            );
            store.submit(&late, now_ms()).expect("committed");
        })
    });

    // The common late arrival: an op from another origin only slightly behind (it sorts just
    // before the newest op), into the same log. The store undoes back to its checkpoint (at most
    // 1024 ops back) and replays from there instead of refolding everything.
    let newest = clock;
    g.bench_function("late_arrival_replay_4k", |b| {
        b.iter(|| {
            seq += 1;
            let hlc = Hlc {
                wall_ms: newest.wall_ms - 1,
                logical: seq as u32,
            };
            let late = sealed(
                &other,
                seq,
                hlc,
                create(NodeId::ROOT, &format!("late{seq}"), false),
            );
            store.submit(&late, now_ms()).expect("committed");
        })
    });
    g.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Log size for the late-arrival (refold) benchmark.
const LATE_LOG: usize = 4096;

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = bench_cpu, bench_redb
}

/// Reads criterion's mean time per iteration (ns) for `id` from this run's estimates.
fn mean_ns(id: &str) -> Option<f64> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/criterion")
        .join(id)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

/// Writes `target/bench-results/state_ops.json`: rates and the two ratios.
fn write_summary() {
    let rate = |id: &str, per_iter: usize| mean_ns(id).map(|ns| per_iter as f64 * 1e9 / ns);
    let raw = rate("ops/raw_ed25519_verify", OPS_PER_ITER);
    let va = rate("ops/verify_apply", OPS_PER_ITER);
    let var = rate("ops/verify_apply_rows", OPS_PER_ITER);
    let single = rate("redb/commit_single", 1);
    let grouped = rate("redb/commit_grouped", GROUP);
    let raw_commit = rate("redb/raw_commit_single", 1);
    let late = mean_ns("redb/late_arrival_refold_4k").map(|ns| ns / 1e6);
    let late_replay = mean_ns("redb/late_arrival_replay_4k").map(|ns| ns / 1e6);
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let summary = serde_json::json!({
        "bench": "state_ops",
        "raw_ed25519_verifies_per_s": raw,
        "verify_apply_ops_per_s": va,
        "verify_apply_rows_ops_per_s": var,
        "verify_apply_ratio_to_raw": ratio(va, raw),
        "verify_apply_rows_ratio_to_raw": ratio(var, raw),
        "redb_commit_single_ops_per_s": single,
        "redb_commit_grouped_ops_per_s": grouped,
        "redb_raw_commits_per_s": raw_commit,
        "late_arrival_refold_ms_at_4096_ops": late,
        "late_arrival_replay_ms_at_4096_ops": late_replay,
        "redb_group_size": GROUP,
        "redb_grouped_ratio_to_single": ratio(grouped, single),
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("state_ops.json"), format!("{summary:#}\n"));
    }
    println!("summary: {summary}");
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    write_summary();
}
