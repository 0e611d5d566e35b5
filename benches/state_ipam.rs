//! Tunnel address allocation throughput with 100k addresses already allocated (issue 2).
//!
//! * `ipam/reference_btreemap_insert_remove`: one insert + one remove in a `BTreeMap<u32, u64>`
//!   of 100k entries — the in-run reference (the floor cost of touching one ordered index).
//! * `ipam/propose`: `Ipam::next_free_address` alone (the pure function a server calls to choose
//!   the slot to put in its op).
//! * `ipam/propose_apply`: the figure: propose (`Ipam::propose_lease`), then `State::apply` of
//!   the `AllocateAddress` op (authorization, invariant checks, lease + indexes). Only this part
//!   is timed; after each iteration the lease is released (untimed) and the HLC moves past the
//!   grace period, so the state stays at 100k live leases and the next allocation reuses the
//!   freed slot through the quarantine check. Signature verification is not included (that is
//!   `benches/state_ops.rs`).
//!
//! Run: `cargo bench --bench state_ipam` (add `-- --quick` for a short run).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lemonade_nexus::hlc::Hlc;
use lemonade_nexus::ipam::IpamOp;
use lemonade_nexus::keys::PublicKey;
use lemonade_nexus::op::{Op, OpBody};
use lemonade_nexus::state::State;
use lemonade_nexus::tree::{NodeId, NodeKind, Permission, Permissions, TreeOp};

const ANCHOR: PublicKey = PublicKey([1; 32]);
const SERVER: PublicKey = PublicKey([2; 32]);
const ALLOCATED: u64 = 100_000;
const CUSTOMERS: u64 = 100;

/// Builds ops for the one server's log and applies them, keeping seq and HLC.
struct Log {
    state: State,
    seq: u64,
    wall_ms: u64,
}

impl Log {
    fn apply(&mut self, author: PublicKey, body: OpBody) -> Result<(), String> {
        self.seq += 1;
        self.wall_ms += 1;
        let op = Op {
            origin: SERVER,
            seq: self.seq,
            hlc: Hlc {
                wall_ms: self.wall_ms,
                logical: 0,
            },
            author,
            body,
        };
        self.state.apply(&op).map_err(|e| e.to_string())
    }

    fn now(&self) -> Hlc {
        Hlc {
            wall_ms: self.wall_ms + 1,
            logical: 0,
        }
    }

    /// Proposes a tunnel address for `node` (`Ipam::propose_lease`: the lease, plus a block claim
    /// when the server's blocks are full) and applies the ops.
    fn allocate(&mut self, node: NodeId) -> Result<(), String> {
        let now = self.now();
        let ops = self
            .state
            .ipam()
            .propose_lease(&SERVER, node, now)
            .map_err(|e| e.to_string())?;
        for op in ops {
            self.apply(SERVER, OpBody::Ipam(op))?;
        }
        Ok(())
    }

    fn create(
        &mut self,
        parent: NodeId,
        kind: NodeKind,
        hostname: String,
    ) -> Result<NodeId, String> {
        let body = TreeOp::Create {
            parent,
            kind,
            hostname,
            owner: None,
            wg_pubkey: None,
        };
        self.apply(SERVER, OpBody::Tree(body))?;
        Ok(NodeId::derive(&SERVER, self.seq))
    }
}

/// A state with 100k endpoints (100 customers x 1000) that all hold a tunnel address, plus one
/// spare endpoint without one.
fn setup() -> Result<(Log, NodeId), String> {
    let mut log = Log {
        state: State::new(ANCHOR),
        seq: 0,
        wall_ms: 0,
    };
    let perms = Permissions::of(&[Permission::AddChild, Permission::AllocateIp]);
    log.apply(
        ANCHOR,
        OpBody::Tree(TreeOp::Grant {
            node: NodeId::ROOT,
            key: SERVER,
            permissions: perms,
        }),
    )?;
    let mut customers = Vec::new();
    for c in 0..CUSTOMERS {
        customers.push(log.create(NodeId::ROOT, NodeKind::Customer, format!("c{c}"))?);
    }
    for i in 0..ALLOCATED {
        let parent = customers[(i % CUSTOMERS) as usize];
        let node = log.create(parent, NodeKind::Endpoint, format!("e{i}"))?;
        log.allocate(node)?;
    }
    let spare = log.create(NodeId::ROOT, NodeKind::Endpoint, "spare".into())?;
    Ok((log, spare))
}

fn bench(c: &mut Criterion) {
    let started = Instant::now();
    let (mut log, spare) = match setup() {
        Ok(x) => x,
        Err(e) => panic!("benchmark setup failed: {e}"),
    };
    assert_eq!(log.state.ipam().data().leases.len() as u64, ALLOCATED);
    eprintln!("setup: {ALLOCATED} allocations in {:?}", started.elapsed());
    let grace = log.state.ipam().config().reuse_grace_ms;

    let mut group = c.benchmark_group("ipam");
    group.throughput(Throughput::Elements(1));

    // Even keys; the probe key is odd, so each iteration inserts a new key and removes it again.
    let mut reference: BTreeMap<u32, u64> = (0..ALLOCATED as u32)
        .map(|i| (i * 2, u64::from(i)))
        .collect();
    let mut k = 1u32;
    group.bench_function("reference_btreemap_insert_remove", |b| {
        b.iter(|| {
            k = k.wrapping_mul(2_654_435_761).wrapping_add(1);
            let probe = (k % (ALLOCATED as u32 * 2)) | 1;
            reference.insert(probe, 1);
            reference.remove(&probe)
        })
    });

    group.bench_function("propose", |b| {
        b.iter(|| log.state.ipam().next_free_address(&SERVER, log.now()))
    });

    group.bench_function("propose_apply", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let result = log.allocate(spare);
                timed += t.elapsed();
                if let Err(e) = result {
                    panic!("allocation failed: {e}");
                }
                // Untimed: free the slot again and move past the grace period.
                if let Err(e) =
                    log.apply(SERVER, OpBody::Ipam(IpamOp::ReleaseAddress { node: spare }))
                {
                    panic!("release failed: {e}");
                }
                log.wall_ms += grace;
            }
            timed
        })
    });
    group.finish();
    assert_eq!(
        log.state.ipam().data().leases.len() as u64,
        ALLOCATED,
        "still 100k live leases"
    );
    log.state
        .check_invariants()
        .expect("invariants after the benchmark");
}

criterion_group!(benches, bench);
criterion_main!(benches);
