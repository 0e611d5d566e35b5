//! In-process cluster harness: N replication cores, each with a REAL store in a temporary
//! directory, on a simulated network (loss, delay, partitions, servers going offline) driven by
//! a virtual clock. Deterministic for a seed.
//!
//! Stream requests are answered from the target's store with [`super::core::answer`] (the same
//! function the QUIC driver uses); datagrams may be lost, streams may not (QUIC retransmits), but
//! both fail across a partition or to an offline server.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::core::{Core, CoreConfig, Outcome, Output, Push};
use super::membership::{PeerStatus, ServerId};
use super::wire::{Request, Response};
use crate::identity::NodeKey;
use crate::ipam::IpamConfig;
use crate::keys::PublicKey;
use crate::op::OpBody;
use crate::store::Store;
use crate::testkit;
use crate::tree::NodeId;

const START_MS: u64 = 1_700_000_000_000;
/// The max datagram size of the simulated connections (quinn's on loopback).
const MAX_DATAGRAM: usize = 1200;

enum Msg {
    Datagram {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    Request {
        from: usize,
        to: usize,
        id: u64,
        req: Request,
    },
    Response {
        to: usize,
        id: u64,
        resp: Option<Response>,
    },
}

struct SimNode {
    key: NodeKey,
    store: Store,
    core: Core,
    up: bool,
    _dir: tempfile::TempDir,
}

/// The simulated network's behaviour.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// One-way delay range, ms.
    pub delay_ms: (u64, u64),
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            loss: 0.0,
            delay_ms: (1, 20),
        }
    }
}

pub struct Cluster {
    nodes: Vec<SimNode>,
    pub now: u64,
    queue: BTreeMap<(u64, u64), Msg>,
    seq: u64,
    rng: StdRng,
    pub net: NetConfig,
    /// Partition group of each node (`None`: no partition).
    groups: Option<Vec<u8>>,
    names: u64,
}

impl Cluster {
    /// `n` servers; server 0 is the cluster root and grants every other server admin at genesis,
    /// so all of them can create nodes. All servers are connected to each other.
    pub fn new(n: usize, push: Push, net: NetConfig, seed: u64) -> Cluster {
        let keys: Vec<NodeKey> = (0..n).map(|i| testkit::key(10 + i as u8)).collect();
        let root = keys[0].public();
        let mut nodes = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (mut store, _) =
                Store::create(&dir.path().join("state.redb"), root, IpamConfig::default())
                    .expect("store");
            if i == 0 {
                let grants = keys[1..]
                    .iter()
                    .map(|k| (root, testkit::grant_admin(k.public()), None))
                    .collect();
                for r in store
                    .append_local_batch(key, grants, START_MS)
                    .expect("genesis")
                {
                    r.expect("genesis op");
                }
            }
            let id = ServerId {
                key: key.public(),
                addr: format!("sim-{i}"),
                bump: 0,
            };
            let cfg = CoreConfig {
                push,
                ..CoreConfig::default()
            };
            let core = Core::new(id, store.heads().clone(), cfg, seed + i as u64, START_MS);
            nodes.push(SimNode {
                key: NodeKey::from_seed(&[10 + i as u8; 32]),
                store,
                core,
                up: true,
                _dir: dir,
            });
        }
        let mut c = Cluster {
            nodes,
            now: START_MS,
            queue: BTreeMap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            net,
            groups: None,
            names: 0,
        };
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    c.connect(i, j);
                }
            }
        }
        c
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn key(&self, i: usize) -> PublicKey {
        self.nodes[i].key.public()
    }

    pub fn core(&self, i: usize) -> &Core {
        &self.nodes[i].core
    }

    pub fn store(&self, i: usize) -> &Store {
        &self.nodes[i].store
    }

    fn id(&self, i: usize) -> ServerId {
        ServerId {
            key: self.key(i),
            addr: format!("sim-{i}"),
            bump: 0,
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[a].up && self.nodes[b].up && self.groups.as_ref().is_none_or(|g| g[a] == g[b])
    }

    /// `i` learns that `j` is connected (one direction of a connection).
    fn connect(&mut self, i: usize, j: usize) {
        let id = self.id(j);
        let now = self.now;
        self.nodes[i].core.peer_up(id, MAX_DATAGRAM, now);
    }

    /// Splits the servers into groups (`groups[i]` is server i's group).
    pub fn partition(&mut self, groups: Vec<u8>) {
        self.groups = Some(groups);
    }

    pub fn heal(&mut self) {
        self.groups = None;
    }

    /// Takes server `i` offline: everything to and from it is lost; its peers' connections
    /// close after a while (QUIC idle timeout), modelled as immediately.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].up = false;
        let key = self.key(i);
        let now = self.now;
        for j in 0..self.len() {
            if j != i {
                self.nodes[j].core.peer_down(&key, now);
                let kj = self.key(j);
                self.nodes[i].core.peer_down(&kj, now);
            }
        }
    }

    /// Brings server `i` back and reconnects it to every reachable server.
    pub fn start(&mut self, i: usize) {
        self.nodes[i].up = true;
        for j in 0..self.len() {
            if j != i && self.reachable(i, j) {
                self.connect(i, j);
                self.connect(j, i);
            }
        }
    }

    /// Server `i` appends a random op of its own (a new customer node, sometimes a block claim).
    pub fn local_op(&mut self, i: usize) {
        self.names += 1;
        let body: OpBody = if self.rng.random_range(0..10) == 0 {
            testkit::claim_block(self.rng.random_range(0..64))
        } else {
            testkit::create(NodeId::ROOT, &format!("n{}", self.names), false)
        };
        let n = &mut self.nodes[i];
        let me = n.key.public();
        let r = n
            .store
            .append_local(&n.key, me, body, None, self.now)
            .expect("append");
        let crate::store::Submitted::Appended { seq, .. } = r else {
            panic!("local op not appended");
        };
        let ops = n.store.ops_of(&me, seq, seq).expect("read back");
        n.core.local_ops(ops);
    }

    /// Injects raw op envelopes into server `to` as if pushed by server `from`.
    pub fn inject(&mut self, from: usize, to: usize, ops: Vec<Vec<u8>>) {
        let d = super::wire::Datagram::Ops(ops.into_iter().map(super::wire::Blob).collect());
        let bytes = super::wire::encode(&d);
        let key = self.key(from);
        let now = self.now;
        self.nodes[to].core.handle_datagram(key, &bytes, now);
        self.pump(to);
    }

    fn delay(&mut self) -> u64 {
        let (a, b) = self.net.delay_ms;
        self.rng.random_range(a..=b.max(a))
    }

    fn enqueue(&mut self, at: u64, m: Msg) {
        self.seq += 1;
        self.queue.insert((at, self.seq), m);
    }

    /// Handles every output of server `i`.
    fn pump(&mut self, i: usize) {
        while let Some(o) = self.nodes[i].core.poll_output() {
            let now = self.now;
            match o {
                Output::Datagram { to, bytes } => {
                    let Some(j) = self.index_of(&to) else {
                        continue;
                    };
                    if !self.reachable(i, j) || self.rng.random_bool(self.net.loss) {
                        continue;
                    }
                    let at = now + self.delay();
                    self.enqueue(
                        at,
                        Msg::Datagram {
                            from: i,
                            to: j,
                            bytes,
                        },
                    );
                }
                Output::Stream { to, op } => {
                    // A reliable stream: never lost, delivered as a one-op push.
                    let Some(j) = self.index_of(&to) else {
                        continue;
                    };
                    if self.reachable(i, j) {
                        let d = super::wire::Datagram::Ops(vec![super::wire::Blob(op)]);
                        let at = now + self.delay();
                        let bytes = super::wire::encode(&d);
                        self.enqueue(
                            at,
                            Msg::Datagram {
                                from: i,
                                to: j,
                                bytes,
                            },
                        );
                    }
                }
                Output::Request { to, id, req } => {
                    let at = now + self.delay();
                    match self.index_of(&to) {
                        Some(j) if self.reachable(i, j) => self.enqueue(
                            at,
                            Msg::Request {
                                from: i,
                                to: j,
                                id,
                                req,
                            },
                        ),
                        _ => self.enqueue(
                            at,
                            Msg::Response {
                                to: i,
                                id,
                                resp: None,
                            },
                        ),
                    }
                }
                Output::Submit { via, ops } => {
                    let n = &mut self.nodes[i];
                    let results = n.store.submit_batch(&ops, now).expect("store works");
                    let outcomes = results.iter().map(Outcome::of).collect();
                    n.core.submitted(via, ops, outcomes, now);
                }
                Output::Connect(id) => {
                    if let Some(j) = self.index_of(&id.key)
                        && self.reachable(i, j)
                        && !self.nodes[i].core.is_connected(&id.key)
                    {
                        self.connect(i, j);
                        self.connect(j, i);
                    }
                }
            }
        }
    }

    fn index_of(&self, key: &PublicKey) -> Option<usize> {
        self.nodes.iter().position(|n| n.key.public() == *key)
    }

    /// Runs the simulation for `ms` of virtual time, in 5 ms steps.
    pub fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += 5;
            let now = self.now;
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let m = entry.remove();
                self.deliver(m);
            }
            for i in 0..self.len() {
                if self.nodes[i].up && self.nodes[i].core.next_deadline() <= now {
                    self.nodes[i].core.tick(now);
                }
                self.pump(i);
            }
        }
    }

    fn deliver(&mut self, m: Msg) {
        let now = self.now;
        match m {
            Msg::Datagram { from, to, bytes } => {
                if self.reachable(from, to) {
                    let key = self.key(from);
                    self.nodes[to].core.handle_datagram(key, &bytes, now);
                    self.pump(to);
                }
            }
            Msg::Request { from, to, id, req } => {
                let resp = self
                    .reachable(from, to)
                    .then(|| super::core::answer(&self.nodes[to].store, &req));
                let at = now + self.delay();
                self.enqueue(at, Msg::Response { to: from, id, resp });
            }
            Msg::Response { to, id, resp } => {
                if self.nodes[to].up {
                    self.nodes[to].core.handle_response(id, resp, now);
                    self.pump(to);
                }
            }
        }
    }

    /// Whether every online server has the same heads and state hash as server `reference`.
    pub fn converged(&self) -> bool {
        let up: Vec<&SimNode> = self.nodes.iter().filter(|n| n.up).collect();
        up.windows(2).all(|w| {
            w[0].store.heads() == w[1].store.heads()
                && w[0].store.state_hash() == w[1].store.state_hash()
        })
    }

    /// Runs until converged (checked every 100 ms), at most `max_ms`; returns the time it took.
    pub fn run_until_converged(&mut self, max_ms: u64) -> Option<u64> {
        let start = self.now;
        while self.now - start < max_ms {
            self.run(100);
            if self.converged() {
                return Some(self.now - start);
            }
        }
        None
    }

    pub fn status(&self, i: usize, of: usize) -> Option<PeerStatus> {
        self.nodes[i].core.status_of(&self.key(of))
    }

    pub fn op_count(&self, i: usize) -> u64 {
        self.nodes[i].store.op_count().expect("count")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_ops(c: &mut Cluster, count: usize, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..count {
            let i = rng.random_range(0..c.len());
            c.local_op(i);
            c.run(rng.random_range(0..30));
        }
    }

    fn converges(n: usize, push: Push, net: NetConfig, ops: usize, seed: u64) -> Cluster {
        let mut c = Cluster::new(n, push, net, seed);
        random_ops(&mut c, ops, seed);
        let t = c.run_until_converged(30_000);
        assert!(
            t.is_some(),
            "{n} servers ({push:?}) did not converge within 30 s of virtual time"
        );
        let hash = c.store(0).state_hash();
        for i in 0..n {
            assert_eq!(c.store(i).state_hash(), hash);
            c.store(i).verify_against_log().expect("store consistent");
        }
        assert_eq!(c.op_count(0), (n as u64 - 1) + ops as u64);
        c
    }

    #[test]
    fn three_servers_converge() {
        for push in [Push::All, Push::Fanout { k: 2 }] {
            converges(3, push, NetConfig::default(), 60, 1);
        }
    }

    #[test]
    fn ten_servers_converge() {
        for push in [Push::All, Push::Fanout { k: 4 }, Push::Streams] {
            let c = converges(10, push, NetConfig::default(), 100, 2);
            assert_eq!(c.core(3).counters().ops_rejected, 0);
        }
    }

    #[test]
    fn twenty_percent_loss_still_converges() {
        let net = NetConfig {
            loss: 0.2,
            delay_ms: (1, 40),
        };
        for push in [Push::All, Push::Fanout { k: 3 }] {
            let c = converges(6, push, net.clone(), 80, 3);
            let fetched: u64 = (0..6).map(|i| c.core(i).counters().fetched_ops).sum();
            assert!(fetched > 0, "losses are repaired by anti-entropy fetches");
        }
    }

    #[test]
    fn partition_then_heal_converges() {
        let mut c = Cluster::new(6, Push::Fanout { k: 3 }, NetConfig::default(), 4);
        c.run(500);
        c.partition(vec![0, 0, 0, 1, 1, 1]);
        random_ops(&mut c, 60, 4);
        c.run(2_000);
        assert!(!c.converged(), "the two sides diverge while partitioned");
        // Each side sees the other as dead after a few seconds.
        c.run(8_000);
        assert_eq!(c.status(0, 4), Some(PeerStatus::Dead));
        c.heal();
        assert!(c.run_until_converged(30_000).is_some(), "heals");
        // SWIM re-admits the other side (periodic announces to down members).
        c.run(15_000);
        assert_eq!(c.status(0, 4), Some(PeerStatus::Alive));
    }

    #[test]
    fn a_server_offline_for_thousands_of_ops_catches_up_by_fetch() {
        let mut c = Cluster::new(4, Push::Fanout { k: 2 }, NetConfig::default(), 5);
        c.run(200);
        c.stop(3);
        // 5 ms of virtual time between ops, so ops mostly arrive in fold order (a burst of
        // concurrent ops from three origins would make the store replay late arrivals).
        for k in 0..1_500 {
            c.local_op(k % 3);
            c.run(5);
        }
        assert!(c.run_until_converged(10_000).is_some());
        assert!(c.op_count(3) < 10);
        c.start(3);
        let t = c.run_until_converged(30_000);
        assert!(t.is_some(), "the returning server catches up");
        assert_eq!(c.op_count(3), c.op_count(0));
        assert!(
            c.core(3).counters().fetches >= 3,
            "catch-up takes several bounded fetches"
        );
    }

    #[test]
    fn a_dead_server_is_detected_within_seconds() {
        let mut c = Cluster::new(5, Push::Fanout { k: 2 }, NetConfig::default(), 6);
        c.run(2_000);
        assert_eq!(c.status(0, 4), Some(PeerStatus::Alive));
        // Crash without closing connections: only SWIM notices.
        c.nodes[4].up = false;
        c.run(6_000);
        for i in 0..4 {
            assert_eq!(c.status(i, 4), Some(PeerStatus::Dead), "server {i}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

        /// Any schedule of local ops, datagram loss, a partition and a crash converges once the
        /// network heals and every server is back.
        #[test]
        fn random_schedules_converge(
            n in 3usize..6,
            loss in 0.0f64..0.3,
            fanout in proptest::prelude::any::<bool>(),
            steps in proptest::collection::vec((0u8..8, 0usize..6, 0u64..200), 10..40),
            seed in 0u64..1000,
        ) {
            let push = if fanout { Push::Fanout { k: 2 } } else { Push::All };
            let net = NetConfig { loss, delay_ms: (1, 30) };
            let mut c = Cluster::new(n, push, net, seed);
            for (what, who, wait) in steps {
                let who = who % n;
                match what {
                    0 => c.partition((0..n).map(|i| u8::from(i <= who)).collect()),
                    1 => c.heal(),
                    2 if c.nodes[who].up && who != 0 => c.stop(who),
                    3 if !c.nodes[who].up => c.start(who),
                    _ if c.nodes[who].up => c.local_op(who),
                    _ => {}
                }
                c.run(wait);
            }
            c.heal();
            for i in 0..n {
                if !c.nodes[i].up {
                    c.start(i);
                }
            }
            proptest::prop_assert!(c.run_until_converged(60_000).is_some(), "did not converge");
        }
    }

    #[test]
    fn forged_ops_are_refused_and_counted() {
        let mut c = Cluster::new(3, Push::All, NetConfig::default(), 7);
        c.run(100);
        let victim = c.key(1);
        let before = c.store(2).state_hash();
        let head = c.store(2).heads().get(&victim).copied().unwrap_or(0);
        // An op claiming server 1 as origin, signed by an outsider.
        let outsider = testkit::key(99);
        let forged = crate::op::seal_op(
            outsider.pair(),
            &crate::op::LoggedOp {
                op: crate::op::Op {
                    origin: victim,
                    seq: head + 1,
                    hlc: crate::hlc::Hlc {
                        wall_ms: c.now,
                        logical: 0,
                    },
                    author: victim,
                    body: testkit::create(NodeId::ROOT, "forged", false),
                },
                author_proof: None,
            },
        );
        // A correctly signed op whose signature bytes were then tampered with.
        let next0 = c.store(2).heads().get(&c.key(0)).copied().unwrap_or(0) + 1;
        let mut tampered = testkit::sealed(
            &testkit::key(10),
            next0,
            crate::hlc::Hlc {
                wall_ms: c.now,
                logical: 0,
            },
            testkit::create(NodeId::ROOT, "x", false),
        );
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        // The forged op: its envelope names the outsider as signer, i.e. origin "outsider".
        c.inject(0, 2, vec![forged]);
        c.inject(0, 2, vec![tampered]);
        c.run(200);
        assert_eq!(c.core(2).counters().ops_rejected, 2);
        assert_eq!(c.store(2).state_hash(), before);
        assert_eq!(c.store(2).heads().get(&victim).copied().unwrap_or(0), head);
        assert!(
            !c.store(2).heads().contains_key(&outsider.public()),
            "nothing from the outsider was appended"
        );
    }
}
