//! Tests of the whole state: routing, rejection without effect, persistence rows, rendering, and
//! the property tests of the issue (hostile op sequences; order-independent fold; IPAM with
//! several origins and partitions).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;
use crate::ipam::{IpamOp, LenRange};
use crate::op::fold_order;
use crate::tree::{NodeField, NodeKind, Permission, Permissions, WgKey};

const ANCHOR: PublicKey = PublicKey([1; 32]);
const SERVERS: [PublicKey; 3] = [
    PublicKey([10; 32]),
    PublicKey([11; 32]),
    PublicKey([12; 32]),
];
const USER: PublicKey = PublicKey([20; 32]);
const USER2: PublicKey = PublicKey([21; 32]);
/// Never receives any grant in these tests.
const HOSTILE: PublicKey = PublicKey([66; 32]);

fn op(origin: PublicKey, seq: u64, wall_ms: u64, author: PublicKey, body: OpBody) -> Op {
    Op {
        origin,
        seq,
        hlc: Hlc {
            wall_ms,
            logical: 0,
        },
        author,
        body,
    }
}

/// A small IPAM so that pools run out and servers collide on blocks: tunnel /24 in 16 blocks of
/// 16 slots, grace 5 s, private /24 (/26-/30), shared /26 (/28-/30), backbone /28.
fn small_config() -> IpamConfig {
    IpamConfig {
        tunnel_v4: "10.64.0.0/24".parse().expect("net"),
        tunnel_v6: "fd6c:6e00::/48".parse().expect("net"),
        block_len: 28,
        reserved_low: 10,
        reuse_grace_ms: 5000,
        private: "10.128.0.0/24".parse().expect("net"),
        private_len: LenRange { min: 26, max: 30 },
        shared: "172.20.0.0/26".parse().expect("net"),
        shared_len: LenRange { min: 28, max: 30 },
        backbone: "172.16.0.0/28".parse().expect("net"),
        backbone_reserved_low: 2,
    }
}

/// The genesis ops every scenario starts from (origin SERVERS[0], seq 1..=3, HLC 1..=3): the
/// anchor grants servers 0 and 1 what a server needs at the root, and USER a few permissions.
/// Server 2 starts with nothing (a rogue or unadmitted server).
fn genesis() -> Vec<Op> {
    let server_perms = Permissions::of(&[
        Permission::AllocateIp,
        Permission::AddChild,
        Permission::EditNode,
        Permission::DeleteNode,
    ]);
    let user_perms = Permissions::of(&[
        Permission::AddChild,
        Permission::EditNode,
        Permission::ExpandSubnet,
    ]);
    let grant = |key, permissions| {
        OpBody::Tree(TreeOp::Grant {
            node: NodeId::ROOT,
            key,
            permissions,
        })
    };
    vec![
        op(SERVERS[0], 1, 1, ANCHOR, grant(SERVERS[0], server_perms)),
        op(SERVERS[0], 2, 2, ANCHOR, grant(SERVERS[1], server_perms)),
        op(SERVERS[0], 3, 3, ANCHOR, grant(USER, user_perms)),
    ]
}

fn fresh() -> State {
    let mut state = State::with_ipam_config(ANCHOR, small_config()).expect("valid config");
    for g in genesis() {
        state.apply(&g).expect("genesis applies");
    }
    state
}

// ---------------------------------------------------------------------------------------------
// Independent checks (they do not reuse the implementation's own invariant checker).

/// No two live holders of overlapping space: tunnel addresses (v4 and v6), subnets of both
/// pools, backbone addresses.
fn assert_no_overlap(state: &State) {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    let mut nets: Vec<ipnet::Ipv4Net> = Vec::new();
    let mut backbone = BTreeSet::new();
    for node in state.tree().nodes() {
        if let Some(a) = state.ipam().tunnel_address(&node.id) {
            assert!(v4.insert(a.v4), "tunnel address {} held twice", a.v4);
            assert!(v6.insert(a.v6), "tunnel address {} held twice", a.v6);
        }
        for pool in [SubnetPool::Private, SubnetPool::Shared] {
            if let Some(s) = state.ipam().subnet(pool, &node.id) {
                nets.push(s.net());
            }
        }
        if let Some(b) = state.ipam().backbone_address(&node.id) {
            assert!(backbone.insert(b), "backbone address {b} held twice");
        }
    }
    for (i, a) in nets.iter().enumerate() {
        for b in &nets[i + 1..] {
            assert!(
                !a.contains(b) && !b.contains(a),
                "subnets {a} and {b} overlap"
            );
        }
    }
}

/// Watches leases appear and disappear and checks that an address is never leased again
/// within the grace period after it was released.
#[derive(Default)]
struct GraceModel {
    leases: BTreeMap<NodeId, Ipv4Addr>,
    released_at: BTreeMap<Ipv4Addr, u64>,
}

impl GraceModel {
    fn observe(&mut self, state: &State, wall_ms: u64) {
        let grace = state.ipam().config().reuse_grace_ms;
        let now: BTreeMap<NodeId, Ipv4Addr> = state
            .tree()
            .nodes()
            .filter_map(|n| Some((n.id, state.ipam().tunnel_address(&n.id)?.v4)))
            .collect();
        for (node, addr) in &self.leases {
            if now.get(node) != Some(addr) {
                self.released_at.insert(*addr, wall_ms);
            }
        }
        for (node, addr) in &now {
            if self.leases.get(node) != Some(addr)
                && let Some(released) = self.released_at.get(addr)
            {
                assert!(
                    wall_ms >= released + grace,
                    "{addr} released at {released} reused at {wall_ms} (grace {grace})"
                );
            }
        }
        self.leases = now;
    }
}

// ---------------------------------------------------------------------------------------------
// Unit tests.

#[test]
fn a_refused_op_changes_nothing_and_says_why() {
    let mut state = fresh();
    let before = state.clone();
    let hash = state.hash();
    let create = OpBody::Tree(TreeOp::Create {
        parent: NodeId::ROOT,
        kind: NodeKind::Customer,
        hostname: "acme".into(),
        owner: None,
        wg_pubkey: None,
    });
    let err = state
        .apply(&op(SERVERS[0], 10, 10, HOSTILE, create.clone()))
        .expect_err("hostile");
    assert!(
        err.to_string().contains("lacks the add_child permission"),
        "{err}"
    );
    assert_eq!(state, before);
    assert_eq!(state.hash(), hash);
    state
        .apply(&op(SERVERS[0], 11, 11, USER, create))
        .expect("user may add children");
    assert_ne!(state.hash(), hash);
}

#[test]
fn deleting_a_node_releases_its_addresses_into_quarantine() {
    let mut state = fresh();
    let s = SERVERS[0];
    let create = OpBody::Tree(TreeOp::Create {
        parent: NodeId::ROOT,
        kind: NodeKind::Endpoint,
        hostname: "laptop".into(),
        owner: Some(USER2),
        wg_pubkey: Some(WgKey([4; 32])),
    });
    state.apply(&op(s, 10, 10, s, create)).expect("create");
    let laptop = NodeId::derive(&s, 10);
    state
        .apply(&op(
            s,
            11,
            11,
            s,
            OpBody::Ipam(IpamOp::ClaimBlock { block: 0 }),
        ))
        .expect("claim");
    let slot = state
        .ipam()
        .next_free_address(
            &s,
            Hlc {
                wall_ms: 12,
                logical: 0,
            },
        )
        .expect("free")
        .slot;
    let alloc = OpBody::Ipam(IpamOp::AllocateAddress { node: laptop, slot });
    state.apply(&op(s, 12, 12, s, alloc)).expect("lease");
    state
        .apply(&op(
            s,
            13,
            13,
            s,
            OpBody::Tree(TreeOp::Delete { node: laptop }),
        ))
        .expect("delete");
    assert!(state.ipam().data().leases.is_empty());
    assert_eq!(
        state.ipam().data().quarantine.get(&slot),
        Some(&Hlc {
            wall_ms: 13,
            logical: 0
        })
    );
    state.check_invariants().expect("invariants");
}

#[test]
fn rows_round_trip_and_refuse_another_anchor() {
    let mut state = fresh();
    let s = SERVERS[0];
    state
        .apply(&op(
            s,
            10,
            10,
            s,
            OpBody::Ipam(IpamOp::ClaimBlock { block: 2 }),
        ))
        .expect("claim");
    let rows = state.take_changes();
    assert!(rows.iter().any(|r| r.table == StateTable::Meta));
    assert!(state.take_changes().is_empty(), "nothing changed since");
    let back = State::from_rows(ANCHOR, rows.clone()).expect("decode");
    assert_eq!(back, state);
    assert_eq!(back.hash(), state.hash());
    let err = State::from_rows(PublicKey([9; 32]), rows.clone()).expect_err("other anchor");
    assert!(err.to_string().contains("trust anchor"), "{err}");
    // A corrupted value is a clear error, not a panic.
    let mut corrupt = rows;
    if let Some(r) = corrupt.iter_mut().find(|r| r.table == StateTable::Nodes) {
        r.value = Some(vec![0xff, 0x00]);
    }
    assert!(State::from_rows(ANCHOR, corrupt).is_err());
    // No rows at all: a fresh data directory.
    assert_eq!(
        State::from_rows(ANCHOR, Vec::new()).expect("empty"),
        State::new(ANCHOR)
    );
}

#[test]
fn rendering_shows_the_tree_and_the_allocations() {
    let mut state = fresh();
    let s = SERVERS[0];
    let mk = |parent, kind, name: &str| {
        OpBody::Tree(TreeOp::Create {
            parent,
            kind,
            hostname: name.into(),
            owner: None,
            wg_pubkey: None,
        })
    };
    state
        .apply(&op(
            s,
            10,
            10,
            s,
            mk(NodeId::ROOT, NodeKind::Customer, "acme"),
        ))
        .expect("create");
    let acme = NodeId::derive(&s, 10);
    state
        .apply(&op(s, 11, 11, s, mk(acme, NodeKind::Endpoint, "laptop")))
        .expect("create");
    state
        .apply(&op(s, 12, 12, s, mk(acme, NodeKind::Endpoint, "phone")))
        .expect("create");
    let laptop = NodeId::derive(&s, 11);
    state
        .apply(&op(
            s,
            13,
            13,
            s,
            OpBody::Ipam(IpamOp::ClaimBlock { block: 0 }),
        ))
        .expect("claim");
    let alloc = OpBody::Ipam(IpamOp::AllocateAddress {
        node: laptop,
        slot: 10,
    });
    state.apply(&op(s, 14, 14, s, alloc)).expect("lease");
    let text = render_tree(&state);
    assert_eq!(
        text,
        "root  [root]\n\
         └── acme  [customer]\n    \
             ├── laptop  [endpoint]  10.64.0.10 fd6c:6e00::a\n    \
             └── phone  [endpoint]\n"
    );
    let ipam = render_ipam(&state);
    assert!(ipam.contains("10.64.0.0/28  held by"), "{ipam}");
    assert!(ipam.contains("10.64.0.10 fd6c:6e00::a  laptop"), "{ipam}");
    let json = serde_json::to_value(tree_view(&state)).expect("json");
    assert_eq!(json["nodes"].as_array().map(Vec::len), Some(4));
    let json = serde_json::to_value(ipam_view(&state)).expect("json");
    assert_eq!(json["leases"][0]["v4"], "10.64.0.10");
}

// ---------------------------------------------------------------------------------------------
// Random op sequences.

/// One random action; indices pick from the keys / nodes known when the op is built.
#[derive(Clone, Debug)]
enum Act {
    Create {
        parent: u8,
        kind: u8,
        name: u8,
        owner: u8,
    },
    Rename {
        node: u8,
        name: u8,
    },
    Metadata {
        node: u8,
        key: u8,
        len: Option<u16>,
    },
    Endpoint {
        node: u8,
        good: bool,
    },
    Move {
        node: u8,
        parent: u8,
    },
    Delete {
        node: u8,
    },
    Grant {
        node: u8,
        key: u8,
        perms: u16,
    },
    Revoke {
        node: u8,
        key: u8,
        perms: u16,
    },
    Claim {
        block: u8,
    },
    ReleaseBlock {
        block: u8,
    },
    Alloc {
        node: u8,
        slot: u16,
    },
    /// Lease the origin's next free address (the proposal a server would make).
    AllocNext {
        node: u8,
    },
    /// Lease the most recently released address again (tests the grace period).
    Realloc {
        node: u8,
    },
    Release {
        node: u8,
    },
    Subnet {
        shared: bool,
        node: u8,
        len: u8,
        base: u8,
    },
    Expand {
        shared: bool,
        node: u8,
        len: u8,
    },
    ReleaseSubnet {
        shared: bool,
        node: u8,
    },
    Join {
        node: u8,
    },
    Leave {
        node: u8,
    },
}

fn act() -> impl Strategy<Value = Act> {
    let i = || any::<u8>();
    prop_oneof![
        4 => (i(), 0..10u8, 0..48u8, i()).prop_map(|(parent, kind, name, owner)| Act::Create { parent, kind, name, owner }),
        1 => (i(), 0..48u8).prop_map(|(node, name)| Act::Rename { node, name }),
        1 => (i(), 0..3u8, proptest::option::of(0..1500u16)).prop_map(|(node, key, len)| Act::Metadata { node, key, len }),
        1 => (i(), any::<bool>()).prop_map(|(node, good)| Act::Endpoint { node, good }),
        1 => (i(), i()).prop_map(|(node, parent)| Act::Move { node, parent }),
        1 => i().prop_map(|node| Act::Delete { node }),
        2 => (i(), i(), any::<u16>()).prop_map(|(node, key, perms)| Act::Grant { node, key, perms }),
        1 => (i(), i(), any::<u16>()).prop_map(|(node, key, perms)| Act::Revoke { node, key, perms }),
        2 => prop_oneof![0..5u8, 0..17u8].prop_map(|block| Act::Claim { block }),
        1 => (0..5u8).prop_map(|block| Act::ReleaseBlock { block }),
        // Half the leases aim at a few slots of blocks 0 and 1, so releases and reuses collide.
        2 => (i(), 0..260u16).prop_map(|(node, slot)| Act::Alloc { node, slot }),
        5 => (i(), prop_oneof![10..14u16, 74..78u16]).prop_map(|(node, slot)| Act::Alloc { node, slot }),
        3 => i().prop_map(|node| Act::AllocNext { node }),
        2 => i().prop_map(|node| Act::Realloc { node }),
        3 => i().prop_map(|node| Act::Release { node }),
        4 => (any::<bool>(), i(), 24..32u8, i()).prop_map(|(shared, node, len, base)| Act::Subnet { shared, node, len, base }),
        3 => (any::<bool>(), i(), 24..31u8).prop_map(|(shared, node, len)| Act::Expand { shared, node, len }),
        1 => (any::<bool>(), i()).prop_map(|(shared, node)| Act::ReleaseSubnet { shared, node }),
        1 => i().prop_map(|node| Act::Join { node }),
        1 => i().prop_map(|node| Act::Leave { node }),
    ]
}

/// Builds the op body for `act`, picking target nodes from `recent` (newest live nodes) and `live`
/// (every live node and one that never exists).
fn body(
    act: &Act,
    recent: &[NodeId],
    live: &[NodeId],
    shadow: &State,
    origin: &PublicKey,
    wall: u64,
) -> OpBody {
    // Half the picks go to the three newest live nodes, the rest to any node (or a missing one).
    let node = |i: &u8| {
        let i = *i as usize;
        if i < 128 && !recent.is_empty() {
            recent[recent.len() - 1 - i % 3.min(recent.len())]
        } else {
            live[i % live.len()]
        }
    };
    // Mostly a node that holds the resource in question, sometimes any node.
    let holder = |i: &u8, holders: &mut dyn Iterator<Item = NodeId>| {
        let holders: Vec<NodeId> = holders.collect();
        if *i < 200 && !holders.is_empty() {
            holders[*i as usize % holders.len()]
        } else {
            node(i)
        }
    };
    // Grants go to honest keys only: HOSTILE never holds a permission.
    let grantee = |i: &u8| [SERVERS[0], SERVERS[1], SERVERS[2], USER, USER2][*i as usize % 5];
    // A few special names (a case-insensitive duplicate, invalid labels), then plain ones.
    let label = |i: &u8| match *i {
        0..8 => ["a", "b", "A", "web-1", "-bad", "x_y", "", "c"][*i as usize].to_string(),
        i => format!("h{}", i % 24),
    };
    use NodeKind::*;
    let kinds = [
        Root, Customer, Customer, Customer, Endpoint, Endpoint, Endpoint, Relay, Server, Server,
    ];
    let pool = |shared: &bool| {
        if *shared {
            SubnetPool::Shared
        } else {
            SubnetPool::Private
        }
    };
    let tree = |t| OpBody::Tree(t);
    let ipam = |i| OpBody::Ipam(i);
    match act {
        Act::Create {
            parent,
            kind,
            name,
            owner,
        } => tree(TreeOp::Create {
            parent: node(parent),
            kind: kinds[*kind as usize],
            hostname: label(name),
            owner: (*owner % 2 == 0).then_some(PublicKey([*owner; 32])),
            wg_pubkey: None,
        }),
        Act::Rename { node: n, name } => tree(TreeOp::Update {
            node: node(n),
            field: NodeField::Hostname(label(name)),
        }),
        Act::Metadata { node: n, key, len } => tree(TreeOp::Update {
            node: node(n),
            field: NodeField::Metadata {
                key: ["k", "", "region"][*key as usize].into(),
                value: len.map(|l| "v".repeat(l as usize)),
            },
        }),
        Act::Endpoint { node: n, good } => tree(TreeOp::Update {
            node: node(n),
            field: NodeField::Endpoint(Some(if *good { "192.0.2.1:51940" } else { "nope" }.into())),
        }),
        Act::Move { node: n, parent } => tree(TreeOp::Move {
            node: node(n),
            new_parent: node(parent),
        }),
        Act::Delete { node: n } => tree(TreeOp::Delete { node: node(n) }),
        Act::Grant {
            node: n,
            key,
            perms,
        } => tree(TreeOp::Grant {
            node: node(n),
            key: grantee(key),
            permissions: Permissions(u32::from(*perms)),
        }),
        Act::Revoke {
            node: n,
            key,
            perms,
        } => tree(TreeOp::Revoke {
            node: node(n),
            key: grantee(key),
            permissions: Permissions(u32::from(*perms)),
        }),
        Act::Claim { block } => ipam(IpamOp::ClaimBlock {
            block: u32::from(*block),
        }),
        Act::ReleaseBlock { block } => ipam(IpamOp::ReleaseBlock {
            block: u32::from(*block),
        }),
        Act::Alloc { node: n, slot } => ipam(IpamOp::AllocateAddress {
            node: node(n),
            slot: u32::from(*slot),
        }),
        Act::AllocNext { node: n } => {
            let now = Hlc {
                wall_ms: wall,
                logical: 0,
            };
            let slot = shadow
                .ipam()
                .next_free_address(origin, now)
                .map_or(10, |a| a.slot);
            ipam(IpamOp::AllocateAddress {
                node: node(n),
                slot,
            })
        }
        Act::Realloc { node: n } => {
            // The origin's most recently released slot, to a node that can take a lease.
            let data = shadow.ipam().data();
            let cfg = shadow.ipam().config();
            let mine = |slot: &u32| {
                data.blocks
                    .get(&cfg.block_of(*slot))
                    .is_some_and(|c| c.holder == *origin)
            };
            let latest = data
                .quarantine
                .iter()
                .filter(|(s, _)| mine(s))
                .max_by_key(|(_, at)| **at);
            let slot = latest.map_or(11, |(slot, _)| *slot);
            let leasable = shadow.tree().nodes().filter(|x| {
                matches!(x.kind, NodeKind::Endpoint | NodeKind::Server)
                    && !data.leases.contains_key(&x.id)
            });
            let node = holder(n, &mut leasable.map(|x| x.id));
            ipam(IpamOp::AllocateAddress { node, slot })
        }
        Act::Release { node: n } => {
            let node = holder(n, &mut shadow.ipam().data().leases.keys().copied());
            ipam(IpamOp::ReleaseAddress { node })
        }
        Act::Subnet {
            shared,
            node: n,
            len,
            base,
        } => {
            // Mostly aligned prefixes inside the pool (a /24 or a /26), sometimes not.
            let (pool_base, host_bits) = if *shared {
                (0xac14_0000u32, 0x3f)
            } else {
                (0x0a80_0000, 0xff)
            };
            let offset = (u32::from(*base) << (32 - u32::from(*len).min(31))) & host_bits;
            let subnet = Subnet {
                base: pool_base + offset + u32::from(*base % 8 == 7),
                len: *len,
            };
            let data = shadow.ipam().data();
            let eligible = shadow.tree().nodes().filter(|x| {
                matches!(x.kind, NodeKind::Customer | NodeKind::Endpoint)
                    && !data.subnets.contains_key(&(pool(shared), x.id))
            });
            let node = holder(n, &mut eligible.map(|x| x.id));
            ipam(IpamOp::AllocateSubnet {
                pool: pool(shared),
                node,
                subnet,
            })
        }
        Act::Expand {
            shared,
            node: n,
            len,
        } => {
            let subnets = shadow.ipam().data().subnets.keys();
            let node = holder(n, &mut subnets.filter(|k| k.0 == pool(shared)).map(|k| k.1));
            ipam(IpamOp::ExpandSubnet {
                pool: pool(shared),
                node,
                len: *len,
            })
        }
        Act::ReleaseSubnet { shared, node: n } => {
            let subnets = shadow.ipam().data().subnets.keys();
            let node = holder(n, &mut subnets.filter(|k| k.0 == pool(shared)).map(|k| k.1));
            ipam(IpamOp::ReleaseSubnet {
                pool: pool(shared),
                node,
            })
        }
        Act::Join { node: n } => ipam(IpamOp::JoinBackbone { node: node(n) }),
        Act::Leave { node: n } => {
            let node = holder(n, &mut shadow.ipam().data().backbone.keys().copied());
            ipam(IpamOp::LeaveBackbone { node })
        }
    }
}

/// (action, author index, origin index, HLC step in ms)
fn step() -> impl Strategy<Value = (Act, u8, u8, u16)> {
    (act(), 0..10u8, 0..3u8, 0..700u16)
}

/// The author: one of the known keys, or (indices 7-9) the origin server itself.
fn author(i: u8, origin: PublicKey) -> PublicKey {
    let keys = [
        ANCHOR, SERVERS[0], SERVERS[1], SERVERS[2], USER, USER2, HOSTILE,
    ];
    keys.get(i as usize).copied().unwrap_or(origin)
}

/// Turns random steps into a log: per-origin seq numbers from 10 (after genesis), HLC growing by
/// each step's delta (equal HLCs happen and are ordered by origin, then seq).
fn build_ops(steps: &[(Act, u8, u8, u16)]) -> Vec<Op> {
    // Targets are picked from a shadow state folded in generation order, so that most ops name
    // live nodes (the real folds may order them differently; that is the point of test (b)).
    let mut shadow = fresh();
    let mut recent: Vec<NodeId> = vec![NodeId::ROOT];
    let mut next_seq = [10u64; 3];
    let mut wall = 10u64;
    let mut ops = Vec::new();
    for (act, a, o, dt) in steps {
        let origin = SERVERS[*o as usize];
        let seq = next_seq[*o as usize];
        next_seq[*o as usize] += 1;
        wall += u64::from(*dt);
        recent.retain(|n| shadow.tree().get(n).is_some());
        let live: Vec<NodeId> = shadow
            .tree()
            .nodes()
            .map(|n| n.id)
            .chain([NodeId([0xee; 16])])
            .collect();
        let body = body(act, &recent, &live, &shadow, &origin, wall);
        let op = op(origin, seq, wall, author(*a, origin), body);
        if shadow.apply(&op).is_ok() && matches!(op.body, OpBody::Tree(TreeOp::Create { .. })) {
            recent.push(NodeId::derive(&origin, seq));
        }
        ops.push(op);
    }
    ops
}

/// A simulated store's state tables: (table, key) -> value.
type Rows = BTreeMap<(StateTable, Vec<u8>), Vec<u8>>;

/// Applies a row change set to a simulated store.
fn store_rows(store: &mut Rows, rows: Vec<RowChange>) {
    for r in rows {
        match r.value {
            Some(v) => store.insert((r.table, r.key), v),
            None => store.remove(&(r.table, r.key)),
        };
    }
}

fn stored(store: &Rows) -> Vec<RowChange> {
    store
        .iter()
        .map(|((table, key), v)| RowChange {
            table: *table,
            key: key.clone(),
            value: Some(v.clone()),
        })
        .collect()
}

/// A server receiving ops in `arrival` order, as the store does it: an op that sorts after
/// everything applied so far is applied incrementally; an earlier one triggers a refold of the
/// whole ordered log (and a rewrite of every state table). Returns the state and its rows.
fn receive(arrival: &[Op]) -> (State, Rows) {
    let mut log: Vec<Op> = genesis();
    let mut state = fresh();
    let mut store = BTreeMap::new();
    store_rows(&mut store, state.take_changes());
    for op in arrival {
        let in_order = log.last().is_none_or(|last| fold_order(op, last).is_gt());
        let at = log.partition_point(|o| fold_order(o, op).is_lt());
        log.insert(at, op.clone());
        if in_order {
            let _ = state.apply(op);
            store_rows(&mut store, state.take_changes());
        } else {
            state = State::with_ipam_config(ANCHOR, small_config()).expect("config");
            for o in &log {
                let _ = state.apply(o);
            }
            store.clear();
            store_rows(&mut store, state.take_changes());
        }
    }
    (state, store)
}

/// A random interleaving of the per-origin logs (each origin's ops stay in seq order).
fn interleave(ops: &[Op], picks: &[u8]) -> Vec<Op> {
    let mut queues: Vec<std::collections::VecDeque<Op>> = SERVERS
        .iter()
        .map(|s| ops.iter().filter(|o| o.origin == *s).cloned().collect())
        .collect();
    let mut out = Vec::new();
    let mut picks = picks.iter().cycle();
    while queues.iter().any(|q| !q.is_empty()) {
        let want = *picks.next().unwrap_or(&0) as usize % 3;
        let q = (want..want + 3)
            .map(|i| i % 3)
            .find(|i| !queues[*i].is_empty())
            .unwrap_or(0);
        if let Some(op) = queues[q].pop_front() {
            out.push(op);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// (a) Any sequence of ops, hostile ones included, keeps every invariant; a refused op (every
    /// hostile one among them) leaves the state byte-identical; no two live holders of
    /// overlapping space; no address reused within the grace period; and the rows written along
    /// the way rebuild the same state.
    #[test]
    fn random_ops_never_break_an_invariant(steps in proptest::collection::vec(step(), 1..120)) {
        let mut state = fresh();
        let mut store = BTreeMap::new();
        store_rows(&mut store, state.take_changes());
        let mut grace = GraceModel::default();
        for op in build_ops(&steps) {
            let before = state.clone();
            let hash = state.hash();
            let result = state.apply(&op);
            if op.author == HOSTILE {
                prop_assert!(result.is_err(), "hostile op accepted: {:?}", op.body);
            }
            if result.is_err() {
                prop_assert_eq!(&state, &before);
                prop_assert_eq!(state.hash(), hash);
            }
            if let Err(e) = state.check_invariants() {
                return Err(TestCaseError::fail(format!("after {:?}: {e}", op.body)));
            }
            assert_no_overlap(&state);
            grace.observe(&state, op.hlc.wall_ms);
            store_rows(&mut store, state.take_changes());
        }
        let back = State::from_rows(ANCHOR, stored(&store)).expect("rows decode");
        prop_assert_eq!(back.hash(), state.hash());
        prop_assert_eq!(back, state);
    }

    /// (b) The same ops from three origins, received in different interleavings (incremental
    /// applies plus refolds on late arrivals, as the store does), give byte-identical state,
    /// rows and hash — equal to folding the whole set in fold order.
    #[test]
    fn fold_is_independent_of_arrival_order(
        steps in proptest::collection::vec(step(), 1..80),
        picks_a in proptest::collection::vec(any::<u8>(), 1..40),
        picks_b in proptest::collection::vec(any::<u8>(), 1..40),
    ) {
        let ops = build_ops(&steps);
        let mut sorted = ops.clone();
        sorted.sort_by(fold_order);
        let mut reference = fresh();
        for op in &sorted {
            let _ = reference.apply(op);
        }
        let _ = reference.take_changes();
        let reference_rows: BTreeMap<_, _> =
            reference.rows().into_iter().filter_map(|r| Some(((r.table, r.key), r.value?))).collect();
        for picks in [&picks_a, &picks_b] {
            let (mut state, store) = receive(&interleave(&ops, picks));
            let _ = state.take_changes();
            prop_assert_eq!(state.hash(), reference.hash());
            prop_assert_eq!(&state, &reference);
            prop_assert_eq!(&store, &reference_rows);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (c) Servers allocating on their own during a partition, then merging.

/// What a server does locally.
#[derive(Clone, Debug)]
enum Local {
    /// A client joins: create an endpoint and lease it an address (claiming a block if needed).
    Join,
    /// A client leaves: release its address.
    Release(u8),
    /// A client is deleted.
    Delete(u8),
    /// A client gets a subnet of prefix length `len` (first fit from the local view).
    Subnet(bool, u8),
    /// A client's subnet is widened by one bit.
    Expand(bool, u8),
}

fn local() -> impl Strategy<Value = Local> {
    prop_oneof![
        5 => Just(Local::Join),
        2 => any::<u8>().prop_map(Local::Release),
        1 => any::<u8>().prop_map(Local::Delete),
        2 => (any::<bool>(), 28..31u8).prop_map(|(s, l)| Local::Subnet(s, l)),
        1 => (any::<bool>(), any::<u8>()).prop_map(|(s, i)| Local::Expand(s, i)),
    ]
}

/// One server's view and log during the partition.
struct Server {
    key: PublicKey,
    state: State,
    log: Vec<Op>,
    seq: u64,
    clients: Vec<NodeId>,
}

impl Server {
    /// Appends an op authored by the server itself; it must apply on the local view.
    fn propose(&mut self, wall_ms: u64, body: OpBody) {
        self.seq += 1;
        let o = op(self.key, self.seq, wall_ms, self.key, body);
        self.state
            .apply(&o)
            .expect("a server's own proposal applies locally");
        self.log.push(o);
    }

    /// Leases an address to `node` from the local view, claiming a block if needed. Returns false
    /// when the pool is exhausted (from this server's point of view).
    fn lease(&mut self, node: NodeId, wall_ms: u64) -> bool {
        let now = Hlc {
            wall_ms,
            logical: 0,
        };
        match self.state.ipam().propose_lease(&self.key, node, now) {
            Ok(ops) => {
                for o in ops {
                    self.propose(wall_ms, OpBody::Ipam(o));
                }
                true
            }
            Err(IpamError::Exhausted(_)) => false,
            Err(e) => panic!("unexpected proposal error {e}"),
        }
    }

    fn act(&mut self, action: &Local, wall_ms: u64) {
        let pick = |clients: &[NodeId], i: u8| {
            (!clients.is_empty()).then(|| clients[i as usize % clients.len()])
        };
        match action {
            Local::Join => {
                let create = OpBody::Tree(TreeOp::Create {
                    parent: NodeId::ROOT,
                    kind: NodeKind::Endpoint,
                    hostname: format!("c{}-{}", self.key.0[0], self.seq + 1),
                    owner: None,
                    wg_pubkey: None,
                });
                self.propose(wall_ms, create);
                let node = NodeId::derive(&self.key, self.seq);
                self.clients.push(node);
                self.lease(node, wall_ms);
            }
            Local::Release(i) => {
                if let Some(node) = pick(&self.clients, *i)
                    && self.state.ipam().tunnel_address(&node).is_some()
                {
                    self.propose(wall_ms, OpBody::Ipam(IpamOp::ReleaseAddress { node }));
                }
            }
            Local::Delete(i) => {
                if let Some(node) = pick(&self.clients, *i) {
                    self.propose(wall_ms, OpBody::Tree(TreeOp::Delete { node }));
                    self.clients.retain(|c| *c != node);
                }
            }
            Local::Subnet(shared, len) => {
                let pool = if *shared {
                    SubnetPool::Shared
                } else {
                    SubnetPool::Private
                };
                let without: Vec<NodeId> = self
                    .clients
                    .iter()
                    .copied()
                    .filter(|c| self.state.ipam().subnet(pool, c).is_none())
                    .collect();
                if let (Some(node), Ok(subnet)) = (
                    without.first(),
                    self.state.ipam().next_free_subnet(pool, *len),
                ) {
                    let node = *node;
                    self.propose(
                        wall_ms,
                        OpBody::Ipam(IpamOp::AllocateSubnet { pool, node, subnet }),
                    );
                }
            }
            Local::Expand(shared, i) => {
                let pool = if *shared {
                    SubnetPool::Shared
                } else {
                    SubnetPool::Private
                };
                if let Some(node) = pick(&self.clients, *i)
                    && let Some(s) = self.state.ipam().subnet(pool, &node)
                {
                    let body = OpBody::Ipam(IpamOp::ExpandSubnet {
                        pool,
                        node,
                        len: s.len - 1,
                    });
                    // Only propose what applies locally (the pool may not allow it).
                    let mut probe = self.state.clone();
                    if probe
                        .apply(&op(self.key, self.seq + 1, wall_ms, self.key, body.clone()))
                        .is_ok()
                    {
                        self.propose(wall_ms, body);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// (c) Two servers allocate on their own views during a partition (with a pool small enough
    /// that they often claim the same block), then every log is merged in fold order:
    /// - no two live holders of overlapping space, invariants hold;
    /// - a server's leases survive exactly where its block claim won (the loser's are rejected);
    /// - after the repair (the loser re-leases from the merged view), every client that had an
    ///   address has one again, still without overlap.
    #[test]
    fn partitioned_servers_never_share_space_after_merge(
        a in proptest::collection::vec((local(), 0..400u16), 1..60),
        b in proptest::collection::vec((local(), 0..400u16), 1..60),
    ) {
        let mut servers: Vec<Server> = [(SERVERS[0], 100), (SERVERS[1], 100)]
            .into_iter()
            .map(|(key, seq)| Server { key, state: fresh(), log: Vec::new(), seq, clients: Vec::new() })
            .collect();
        for (server, actions) in servers.iter_mut().zip([&a, &b]) {
            let mut wall = 10u64;
            for (action, dt) in actions {
                wall += u64::from(*dt);
                server.act(action, wall);
            }
        }
        let mut all: Vec<Op> = genesis().into_iter().chain(servers.iter().flat_map(|s| s.log.clone())).collect();
        all.sort_by(fold_order);
        let mut merged = State::with_ipam_config(ANCHOR, small_config()).expect("config");
        let mut grace = GraceModel::default();
        for op in &all {
            let _ = merged.apply(op);
            grace.observe(&merged, op.hlc.wall_ms);
        }
        merged.check_invariants().map_err(TestCaseError::fail)?;
        assert_no_overlap(&merged);
        let data = merged.ipam().data();
        for server in &servers {
            for (node, lease) in &server.state.ipam().data().leases {
                let won = data.blocks.get(&merged.ipam().config().block_of(lease.slot)).map(|c| c.holder) == Some(server.key);
                prop_assert_eq!(data.leases.get(node) == Some(lease), won, "lease of {} by {}", node, server.key);
            }
        }
        // Repair: each server re-leases, from the merged view, for its clients that lost theirs.
        let mut wall = all.last().map_or(0, |o| o.hlc.wall_ms) + 1;
        for server in &mut servers {
            server.state = merged.clone();
            let lost: Vec<NodeId> = server.clients.iter().copied()
                .filter(|c| server.state.ipam().tunnel_address(c).is_none())
                .collect();
            for node in lost {
                wall += 1;
                server.lease(node, wall);
            }
            merged = server.state.clone();
        }
        merged.check_invariants().map_err(TestCaseError::fail)?;
        assert_no_overlap(&merged);
    }
}

#[test]
fn two_servers_claiming_the_same_block_keep_the_first_claim() {
    // Both servers claim block 4 during a partition and each leases slot 74 (4 * 16 + 10).
    let mut logs = Vec::new();
    for (i, key) in SERVERS[..2].iter().enumerate() {
        let mut s = Server {
            key: *key,
            state: fresh(),
            log: Vec::new(),
            seq: 100,
            clients: Vec::new(),
        };
        let wall = 10 + i as u64; // server 0 claims first in HLC order
        s.propose(
            wall,
            OpBody::Tree(TreeOp::Create {
                parent: NodeId::ROOT,
                kind: NodeKind::Endpoint,
                hostname: format!("client{i}"),
                owner: None,
                wg_pubkey: None,
            }),
        );
        let node = NodeId::derive(key, s.seq);
        s.propose(wall, OpBody::Ipam(IpamOp::ClaimBlock { block: 4 }));
        s.propose(
            wall,
            OpBody::Ipam(IpamOp::AllocateAddress { node, slot: 74 }),
        );
        logs.push((node, s.log));
    }
    let mut all: Vec<Op> = genesis()
        .into_iter()
        .chain(logs.iter().flat_map(|(_, l)| l.clone()))
        .collect();
    all.sort_by(fold_order);
    let mut merged = State::with_ipam_config(ANCHOR, small_config()).expect("config");
    let results: Vec<_> = all.iter().map(|o| merged.apply(o)).collect();
    assert_eq!(
        merged.ipam().data().blocks.get(&4).map(|c| c.holder),
        Some(SERVERS[0])
    );
    assert_eq!(
        merged.ipam().tunnel_address(&logs[0].0).map(|a| a.v4),
        Some(Ipv4Addr::new(10, 64, 0, 74))
    );
    assert_eq!(
        merged.ipam().tunnel_address(&logs[1].0),
        None,
        "the loser's lease is rejected"
    );
    let rejected: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(rejected[0].contains("already held"), "{rejected:?}");
    assert!(
        rejected[1].contains("not held by this op's origin"),
        "{rejected:?}"
    );
    let _: Ipv6Addr = merged.ipam().config().address_of(74).v6;
}

/// Guards the property tests against generating only noise: over a fixed-seed batch of random
/// sequences, every kind of op is sometimes accepted, and the interesting refusals happen.
#[test]
fn random_sequences_reach_the_interesting_cases() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut accepted = BTreeSet::new();
    let mut refusals = BTreeSet::new();
    for _ in 0..300 {
        let steps = proptest::collection::vec(step(), 60..120)
            .new_tree(&mut runner)
            .expect("generate")
            .current();
        let mut state = fresh();
        for op in build_ops(&steps) {
            let kind = format!("{:?}", op.body)
                .split([' ', '(', '{'])
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            match state.apply(&op) {
                Ok(()) => {
                    accepted.insert(kind);
                }
                Err(e) => {
                    let text = format!("{e:?}");
                    refusals.insert(
                        text.split(['(', ' ', '{'])
                            .take(2)
                            .collect::<Vec<_>>()
                            .join(" "),
                    );
                }
            }
        }
    }
    let kinds = [
        "Tree Create",
        "Tree Update",
        "Tree Move",
        "Tree Delete",
        "Tree Grant",
        "Tree Revoke",
        "Ipam ClaimBlock",
        "Ipam ReleaseBlock",
        "Ipam AllocateAddress",
        "Ipam ReleaseAddress",
        "Ipam AllocateSubnet",
        "Ipam ExpandSubnet",
        "Ipam ReleaseSubnet",
        "Ipam JoinBackbone",
        "Ipam LeaveBackbone",
    ];
    for k in kinds {
        assert!(
            accepted.contains(k),
            "{k} never accepted; accepted: {accepted:?}"
        );
    }
    let wanted = [
        "Denied Lacks",
        "Tree HostnameTaken",
        "Tree Cycle",
        "Tree HasChildren",
        "Tree BadPlacement",
        "Ipam BlockTaken",
        "Ipam NotYourBlock",
        "Ipam InGrace",
        "Ipam Overlap",
        "Ipam SlotTaken",
    ];
    for w in wanted {
        assert!(
            refusals.contains(w),
            "{w} never happened; refusals: {refusals:?}"
        );
    }
}
