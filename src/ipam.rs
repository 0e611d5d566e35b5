//! IP address management: client tunnel addresses, private subnets, shared blocks and server
//! backbone addresses, folded from [`IpamOp`]s. Pure and deterministic (the op's HLC is the only
//! clock); see `docs/state-model.md` for the design and the partition story.
//!
//! **Tunnel addresses.** The tunnel pool (default 10.64.0.0/10 and the ULA fd6c:6e00::/48) is a
//! range of *slots*: slot `s` is the IPv4 address `tunnel_v4 + s` and the IPv6 address
//! `tunnel_v6 + s`, so every client gets a matching pair. Slots are grouped into per-server
//! *blocks* (default /24, 256 slots). A server first claims a block through the log
//! ([`IpamOp::ClaimBlock`]; the first claim in fold order wins), then leases single slots only
//! inside blocks it holds ([`IpamOp::AllocateAddress`] is valid only when the op's origin holds the
//! block). Two servers therefore never lease the same address, unless both claimed the same block
//! during a partition: then the fold keeps the first claim and rejects the other server's claim
//! and every lease it made in that block. A released slot is quarantined for `reuse_grace_ms` of
//! HLC time before it can be leased again.
//!
//! **Subnets** (private 10.128.0.0/9, shared 172.20.0.0/14): one aligned prefix per node and pool,
//! prefix length within the pool's configured range, never overlapping; expansion widens a
//! prefix in place to a supernet that overlaps nothing else. Concurrent conflicting allocations
//! are resolved in fold order (the later one is rejected).
//!
//! **Backbone** (172.16.0.0/22): one address per server node, placed by the fold at the offset
//! given by a hash of the server's key, probing linearly (with wrap) past taken offsets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::keys::PublicKey;
use crate::tree::{NodeId, NodeKind, Tree};

/// Cluster-wide IPAM parameters. They are part of the replicated state (the same on every server,
/// fixed at cluster creation, included in the state hash): changing them would reinterpret every
/// lease, so there is no op for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamConfig {
    /// Client tunnel IPv4 prefix (default 10.64.0.0/10).
    #[serde(with = "as_text")]
    pub tunnel_v4: Ipv4Net,
    /// Client tunnel IPv6 prefix; slot `s` maps to `tunnel_v6 + s` (default fd6c:6e00::/48).
    #[serde(with = "as_text")]
    pub tunnel_v6: Ipv6Net,
    /// IPv4 prefix length of one per-server block (default 24: 256 slots).
    pub block_len: u8,
    /// Slots `0..reserved_low` are never leased: network (0), the gateway every server answers on
    /// (1), and 2-9 for future service addresses. The last slot (broadcast) is reserved too.
    pub reserved_low: u32,
    /// How long a released slot stays unusable, in HLC milliseconds (default 24 h).
    pub reuse_grace_ms: u64,
    /// Private subnets pool (default 10.128.0.0/9) and allowed prefix lengths (default 16..=30).
    #[serde(with = "as_text")]
    pub private: Ipv4Net,
    pub private_len: LenRange,
    /// Shared blocks pool (default 172.20.0.0/14) and allowed prefix lengths (default 20..=30).
    #[serde(with = "as_text")]
    pub shared: Ipv4Net,
    pub shared_len: LenRange,
    /// Server backbone prefix (default 172.16.0.0/22).
    #[serde(with = "as_text")]
    pub backbone: Ipv4Net,
    /// Backbone offsets `0..backbone_reserved_low` are never assigned (default 10); nor the last.
    pub backbone_reserved_low: u32,
}

/// An inclusive range of prefix lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LenRange {
    pub min: u8,
    pub max: u8,
}

impl Default for IpamConfig {
    fn default() -> Self {
        IpamConfig {
            tunnel_v4: Ipv4Net::new_assert(Ipv4Addr::new(10, 64, 0, 0), 10),
            tunnel_v6: Ipv6Net::new_assert(Ipv6Addr::new(0xfd6c, 0x6e00, 0, 0, 0, 0, 0, 0), 48),
            block_len: 24,
            reserved_low: 10,
            reuse_grace_ms: 24 * 3600 * 1000,
            private: Ipv4Net::new_assert(Ipv4Addr::new(10, 128, 0, 0), 9),
            private_len: LenRange { min: 16, max: 30 },
            shared: Ipv4Net::new_assert(Ipv4Addr::new(172, 20, 0, 0), 14),
            shared_len: LenRange { min: 20, max: 30 },
            backbone: Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 22),
            backbone_reserved_low: 10,
        }
    }
}

impl IpamConfig {
    /// Checks the parameters; the message names the option and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        let v4 = self.tunnel_v4.prefix_len();
        if !(8..=24).contains(&v4) {
            return Err(format!(
                "tunnel_v4: prefix length must be 8..=24, got /{v4}"
            ));
        }
        if self.tunnel_v4 != self.tunnel_v4.trunc() {
            return Err(format!("tunnel_v4: {} has host bits set", self.tunnel_v4));
        }
        if self.tunnel_v6 != self.tunnel_v6.trunc() {
            return Err(format!("tunnel_v6: {} has host bits set", self.tunnel_v6));
        }
        let host_bits = 32 - u32::from(v4);
        if u32::from(self.tunnel_v6.prefix_len()) > 128 - host_bits {
            return Err(format!(
                "tunnel_v6: prefix must leave at least {host_bits} host bits to mirror tunnel_v4"
            ));
        }
        if !(v4..=28).contains(&self.block_len) {
            return Err(format!(
                "block_len: must be {v4}..=28, got {}",
                self.block_len
            ));
        }
        let block_size = 1u32 << (32 - self.block_len);
        if self.reserved_low >= block_size {
            return Err(format!(
                "reserved_low: must be below the block size {block_size}"
            ));
        }
        for (name, pool, range) in [
            ("private", self.private, self.private_len),
            ("shared", self.shared, self.shared_len),
        ] {
            if pool != pool.trunc() {
                return Err(format!("{name}: {pool} has host bits set"));
            }
            if range.min < pool.prefix_len() || range.min > range.max || range.max > 30 {
                return Err(format!(
                    "{name}_len: need {}..=30 with min <= max, got {}..={}",
                    pool.prefix_len(),
                    range.min,
                    range.max
                ));
            }
        }
        if !(16..=30).contains(&self.backbone.prefix_len())
            || self.backbone != self.backbone.trunc()
        {
            return Err(format!(
                "backbone: need an aligned /16../30, got {}",
                self.backbone
            ));
        }
        let bb_size = 1u32 << (32 - self.backbone.prefix_len());
        if self.backbone_reserved_low + 1 >= bb_size {
            return Err("backbone_reserved_low: leaves no usable backbone address".into());
        }
        let pools = [
            ("tunnel_v4", self.tunnel_v4),
            ("private", self.private),
            ("shared", self.shared),
            ("backbone", self.backbone),
        ];
        for (i, (a_name, a)) in pools.iter().enumerate() {
            for (b_name, b) in &pools[i + 1..] {
                if a.contains(b) || b.contains(a) {
                    return Err(format!("{a_name} ({a}) overlaps {b_name} ({b})"));
                }
            }
        }
        Ok(())
    }

    /// Number of slots in the tunnel pool.
    pub fn slot_count(&self) -> u32 {
        1 << (32 - self.tunnel_v4.prefix_len())
    }

    /// Number of slots in one block.
    pub fn block_size(&self) -> u32 {
        1 << (32 - self.block_len)
    }

    /// Number of blocks in the tunnel pool (a power of two).
    pub fn block_count(&self) -> u32 {
        1 << (self.block_len - self.tunnel_v4.prefix_len())
    }

    /// The block containing `slot`.
    pub fn block_of(&self, slot: u32) -> u32 {
        slot >> (32 - self.block_len)
    }

    /// Slots never leased: the low reserved ones and the last (broadcast).
    pub fn is_reserved(&self, slot: u32) -> bool {
        slot < self.reserved_low || slot == self.slot_count() - 1
    }

    /// How many slots of `block` are reserved.
    pub fn reserved_in_block(&self, block: u32) -> u32 {
        let first = block * self.block_size();
        let last = first + (self.block_size() - 1);
        let low = self
            .reserved_low
            .saturating_sub(first)
            .min(self.block_size());
        let broadcast = u32::from(last == self.slot_count() - 1);
        low + broadcast
    }

    /// The IPv4 and IPv6 tunnel addresses of `slot`.
    pub fn address_of(&self, slot: u32) -> TunnelAddress {
        TunnelAddress {
            slot,
            v4: Ipv4Addr::from(u32::from(self.tunnel_v4.network()).wrapping_add(slot)),
            v6: Ipv6Addr::from(u128::from(self.tunnel_v6.network()).wrapping_add(u128::from(slot))),
        }
    }

    fn pool(&self, pool: SubnetPool) -> (Ipv4Net, LenRange) {
        match pool {
            SubnetPool::Private => (self.private, self.private_len),
            SubnetPool::Shared => (self.shared, self.shared_len),
        }
    }
}

/// The two subnet pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubnetPool {
    Private,
    Shared,
}

/// An IPv4 prefix: `base` is the network address as a big-endian integer (10.128.0.0 =
/// 0x0a800000), `len` the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Subnet {
    pub base: u32,
    pub len: u8,
}

impl Subnet {
    /// The last address of the prefix, as an integer.
    pub fn last(self) -> u32 {
        self.base | host_mask(self.len)
    }
    pub fn net(self) -> Ipv4Net {
        Ipv4Net::new_assert(Ipv4Addr::from(self.base), self.len.min(32))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.len)
    }
}

/// The host bits of a prefix of length `len` (0..=32).
fn host_mask(len: u8) -> u32 {
    if len >= 32 { 0 } else { u32::MAX >> len }
}

/// A client's tunnel address pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TunnelAddress {
    pub slot: u32,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// A mutation of the IPAM. CBOR: externally tagged, `{"claim_block": {"block": 7}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpamOp {
    /// The origin server claims tunnel block `block` for itself (author must be the origin).
    ClaimBlock {
        block: u32,
    },
    /// The origin server gives back a block it holds; only when nothing in it is leased.
    ReleaseBlock {
        block: u32,
    },
    /// Leases tunnel slot `slot` to `node`; valid only inside a block the op's origin holds.
    AllocateAddress {
        node: NodeId,
        slot: u32,
    },
    /// Releases `node`'s tunnel slot (quarantined for the grace period).
    ReleaseAddress {
        node: NodeId,
    },
    /// Gives `node` the subnet `subnet` from `pool`.
    AllocateSubnet {
        pool: SubnetPool,
        node: NodeId,
        subnet: Subnet,
    },
    /// Widens `node`'s subnet in `pool` to prefix length `len` (its supernet).
    ExpandSubnet {
        pool: SubnetPool,
        node: NodeId,
        len: u8,
    },
    ReleaseSubnet {
        pool: SubnetPool,
        node: NodeId,
    },
    /// Gives the server node a backbone address (placed by the fold, see the module doc).
    JoinBackbone {
        node: NodeId,
    },
    LeaveBackbone {
        node: NodeId,
    },
}

/// Who holds a block, since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockClaim {
    pub holder: PublicKey,
    pub claimed: Hlc,
}

/// A node's tunnel lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub slot: u32,
    /// The server that leased it (the holder of the slot's block at the time).
    pub origin: PublicKey,
    pub allocated: Hlc,
}

/// Why the IPAM refused an op, or why a proposal cannot be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("block {block} does not exist (the pool has {count} blocks)")]
    NoSuchBlock { block: u32, count: u32 },
    #[error("block {block} is already held by server {holder}")]
    BlockTaken { block: u32, holder: PublicKey },
    #[error("a server claims or releases blocks only for itself (author must be the origin)")]
    NotOwnBlock,
    #[error("block {0} is not held by this op's origin server")]
    NotYourBlock(u32),
    #[error("block {0} still has leased addresses")]
    BlockInUse(u32),
    #[error("slot {0} is outside the tunnel pool or reserved")]
    BadSlot(u32),
    #[error("address {0} is already leased")]
    SlotTaken(Ipv4Addr),
    #[error(
        "address {addr} was released at {released}; reusable from HLC wall time {reusable_ms} ms"
    )]
    InGrace {
        addr: Ipv4Addr,
        released: Hlc,
        reusable_ms: u64,
    },
    #[error("node {0} already has {1}")]
    AlreadyHas(NodeId, &'static str),
    #[error("node {0} has no {1}")]
    NotHeld(NodeId, &'static str),
    #[error("node {0} does not exist")]
    NoSuchNode(NodeId),
    #[error("a {kind:?} node cannot hold {what}")]
    WrongKind { kind: NodeKind, what: &'static str },
    #[error("server node {0} has no owner key to place its backbone address by")]
    NoOwnerKey(NodeId),
    #[error("subnet {subnet} is not an aligned prefix of length {min}..={max} inside {pool}")]
    BadSubnet {
        subnet: Subnet,
        pool: Ipv4Net,
        min: u8,
        max: u8,
    },
    #[error("subnet {0} overlaps an allocated subnet")]
    Overlap(Subnet),
    #[error("the servers's blocks have no free address; claim another block first")]
    BlocksFull,
    #[error("{0} is exhausted")]
    Exhausted(&'static str),
}

/// The persistent IPAM data (what is stored and hashed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamData {
    pub config: IpamConfig,
    pub blocks: BTreeMap<u32, BlockClaim>,
    pub leases: BTreeMap<NodeId, Lease>,
    /// Released slot -> when it was released.
    pub quarantine: BTreeMap<u32, Hlc>,
    pub subnets: BTreeMap<(SubnetPool, NodeId), Subnet>,
    /// Server node -> backbone offset.
    pub backbone: BTreeMap<NodeId, u32>,
}

/// A changed persistent entry (for `take_dirty`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IpamKey {
    Block(u32),
    Lease(NodeId),
    Quarantine(u32),
    Subnet(SubnetPool, NodeId),
    Backbone(NodeId),
}

/// The IPAM state: the data plus indexes derived from it (rebuilt on load, never stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipam {
    data: IpamData,
    /// (holder, block) for every claim.
    held: BTreeSet<(PublicKey, u32)>,
    /// slot -> node.
    by_slot: BTreeMap<u32, NodeId>,
    /// block -> number of leased slots.
    used: BTreeMap<u32, u32>,
    /// (holder, block) for every claimed block that still has an unleased, unreserved slot: what
    /// `next_free_address` scans, so full blocks cost nothing.
    open: BTreeSet<(PublicKey, u32)>,
    /// (pool, base) -> (subnet, node).
    by_base: BTreeMap<(SubnetPool, u32), (Subnet, NodeId)>,
    /// backbone offset -> node.
    by_offset: BTreeMap<u32, NodeId>,
    dirty: BTreeSet<IpamKey>,
}

/// The op fields the IPAM looks at besides the body.
#[derive(Clone, Copy, Debug)]
pub struct OpCtx<'a> {
    pub origin: &'a PublicKey,
    pub author: &'a PublicKey,
    pub hlc: Hlc,
}

impl Ipam {
    /// An empty IPAM. The caller validated `config`.
    pub fn new(config: IpamConfig) -> Ipam {
        Ipam::from_data(IpamData {
            config,
            blocks: BTreeMap::new(),
            leases: BTreeMap::new(),
            quarantine: BTreeMap::new(),
            subnets: BTreeMap::new(),
            backbone: BTreeMap::new(),
        })
    }

    /// Rebuilds the derived indexes from stored data.
    pub fn from_data(data: IpamData) -> Ipam {
        let mut ipam = Ipam {
            held: data.blocks.iter().map(|(b, c)| (c.holder, *b)).collect(),
            by_slot: data.leases.iter().map(|(n, l)| (l.slot, *n)).collect(),
            used: BTreeMap::new(),
            open: BTreeSet::new(),
            by_base: data
                .subnets
                .iter()
                .map(|((pool, node), s)| ((*pool, s.base), (*s, *node)))
                .collect(),
            by_offset: data.backbone.iter().map(|(n, o)| (*o, *n)).collect(),
            dirty: BTreeSet::new(),
            data,
        };
        for lease in ipam.data.leases.values() {
            *ipam
                .used
                .entry(ipam.data.config.block_of(lease.slot))
                .or_default() += 1;
        }
        let claims: Vec<(u32, PublicKey)> = ipam
            .data
            .blocks
            .iter()
            .map(|(b, c)| (*b, c.holder))
            .collect();
        for (block, holder) in claims {
            if ipam.has_room(block) {
                ipam.open.insert((holder, block));
            }
        }
        ipam
    }

    pub fn data(&self) -> &IpamData {
        &self.data
    }

    pub fn config(&self) -> &IpamConfig {
        &self.data.config
    }

    /// Entries changed since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<IpamKey> {
        std::mem::take(&mut self.dirty)
    }

    /// Marks every entry dirty (the first persistence writes every row).
    pub fn mark_all_dirty(&mut self) {
        let d = &self.data;
        let keys: Vec<IpamKey> = (d.blocks.keys().map(|b| IpamKey::Block(*b)))
            .chain(d.leases.keys().map(|n| IpamKey::Lease(*n)))
            .chain(d.quarantine.keys().map(|s| IpamKey::Quarantine(*s)))
            .chain(d.subnets.keys().map(|(p, n)| IpamKey::Subnet(*p, *n)))
            .chain(d.backbone.keys().map(|n| IpamKey::Backbone(*n)))
            .collect();
        self.dirty.extend(keys);
    }

    /// The tunnel addresses of `node`, if it has a lease.
    pub fn tunnel_address(&self, node: &NodeId) -> Option<TunnelAddress> {
        self.data
            .leases
            .get(node)
            .map(|l| self.data.config.address_of(l.slot))
    }

    /// The backbone address of a server node, if it joined.
    pub fn backbone_address(&self, node: &NodeId) -> Option<Ipv4Addr> {
        let base = u32::from(self.data.config.backbone.network());
        self.data
            .backbone
            .get(node)
            .map(|o| Ipv4Addr::from(base + o))
    }

    /// `node`'s subnet in `pool`.
    pub fn subnet(&self, pool: SubnetPool, node: &NodeId) -> Option<Subnet> {
        self.data.subnets.get(&(pool, *node)).copied()
    }

    /// Applies `op` after authorization. Checks everything first; changes nothing on error.
    pub fn apply(&mut self, op: &IpamOp, ctx: OpCtx<'_>, tree: &Tree) -> Result<(), IpamError> {
        match op {
            IpamOp::ClaimBlock { block } => {
                self.check_claim(*block, ctx)?;
                let claim = BlockClaim {
                    holder: *ctx.origin,
                    claimed: ctx.hlc,
                };
                self.data.blocks.insert(*block, claim);
                self.held.insert((*ctx.origin, *block));
                if self.has_room(*block) {
                    self.open.insert((*ctx.origin, *block));
                }
                self.dirty.insert(IpamKey::Block(*block));
            }
            IpamOp::ReleaseBlock { block } => {
                if ctx.author != ctx.origin {
                    return Err(IpamError::NotOwnBlock);
                }
                if !self.held.contains(&(*ctx.origin, *block)) {
                    return Err(IpamError::NotYourBlock(*block));
                }
                if self.used.get(block).is_some_and(|n| *n > 0) {
                    return Err(IpamError::BlockInUse(*block));
                }
                self.data.blocks.remove(block);
                self.held.remove(&(*ctx.origin, *block));
                self.open.remove(&(*ctx.origin, *block));
                self.dirty.insert(IpamKey::Block(*block));
            }
            IpamOp::AllocateAddress { node, slot } => {
                self.check_allocate(node, *slot, ctx, tree)?;
                let lease = Lease {
                    slot: *slot,
                    origin: *ctx.origin,
                    allocated: ctx.hlc,
                };
                self.data.leases.insert(*node, lease);
                self.by_slot.insert(*slot, *node);
                let block = self.data.config.block_of(*slot);
                *self.used.entry(block).or_default() += 1;
                if !self.has_room(block) {
                    self.open.remove(&(*ctx.origin, block));
                }
                if self.data.quarantine.remove(slot).is_some() {
                    self.dirty.insert(IpamKey::Quarantine(*slot));
                }
                self.dirty.insert(IpamKey::Lease(*node));
            }
            IpamOp::ReleaseAddress { node } => {
                if !self.data.leases.contains_key(node) {
                    return Err(IpamError::NotHeld(*node, "a tunnel address"));
                }
                self.release_address(node, ctx.hlc);
            }
            IpamOp::AllocateSubnet { pool, node, subnet } => {
                self.check_subnet_holder(*pool, node, tree)?;
                self.check_subnet(*pool, *subnet, None)?;
                self.insert_subnet(*pool, *node, *subnet);
            }
            IpamOp::ExpandSubnet { pool, node, len } => {
                let current = self
                    .subnet(*pool, node)
                    .ok_or(IpamError::NotHeld(*node, "a subnet"))?;
                let wider = Subnet {
                    base: current.base & !host_mask(*len),
                    len: *len,
                };
                if *len >= current.len {
                    let (net, range) = self.data.config.pool(*pool);
                    let (min, max) = (range.min, range.max);
                    return Err(IpamError::BadSubnet {
                        subnet: wider,
                        pool: net,
                        min,
                        max,
                    });
                }
                self.check_subnet(*pool, wider, Some(node))?;
                self.remove_subnet(*pool, node);
                self.insert_subnet(*pool, *node, wider);
            }
            IpamOp::ReleaseSubnet { pool, node } => {
                if self.subnet(*pool, node).is_none() {
                    return Err(IpamError::NotHeld(*node, "a subnet"));
                }
                self.remove_subnet(*pool, node);
            }
            IpamOp::JoinBackbone { node } => {
                let n = tree.get(node).ok_or(IpamError::NoSuchNode(*node))?;
                if n.kind != NodeKind::Server {
                    return Err(IpamError::WrongKind {
                        kind: n.kind,
                        what: "a backbone address",
                    });
                }
                let key = n.owner.ok_or(IpamError::NoOwnerKey(*node))?;
                if self.data.backbone.contains_key(node) {
                    return Err(IpamError::AlreadyHas(*node, "a backbone address"));
                }
                let offset = self.backbone_offset_for(&key)?;
                self.data.backbone.insert(*node, offset);
                self.by_offset.insert(offset, *node);
                self.dirty.insert(IpamKey::Backbone(*node));
            }
            IpamOp::LeaveBackbone { node } => {
                let offset = self
                    .data
                    .backbone
                    .remove(node)
                    .ok_or(IpamError::NotHeld(*node, "a backbone address"))?;
                self.by_offset.remove(&offset);
                self.dirty.insert(IpamKey::Backbone(*node));
            }
        }
        Ok(())
    }

    /// Releases everything `node` holds (called when the node is deleted). Never fails.
    pub fn release_all(&mut self, node: &NodeId, hlc: Hlc) {
        if self.data.leases.contains_key(node) {
            self.release_address(node, hlc);
        }
        for pool in [SubnetPool::Private, SubnetPool::Shared] {
            if self.subnet(pool, node).is_some() {
                self.remove_subnet(pool, node);
            }
        }
        if let Some(offset) = self.data.backbone.remove(node) {
            self.by_offset.remove(&offset);
            self.dirty.insert(IpamKey::Backbone(*node));
        }
    }

    // ---- proposals: pure helpers a server uses to choose what to put in an op ----

    /// The ops `server` appends to give `node` a tunnel address at HLC `now`: the lease of its
    /// first free slot, preceded by a block claim when the server's blocks are full. This is the
    /// whole proposal a server makes on a join; the fold then decides (see the partition story).
    pub fn propose_lease(
        &self,
        server: &PublicKey,
        node: NodeId,
        now: Hlc,
    ) -> Result<Vec<IpamOp>, IpamError> {
        match self.next_free_address(server, now) {
            Ok(a) => return Ok(vec![IpamOp::AllocateAddress { node, slot: a.slot }]),
            Err(IpamError::BlocksFull) => {}
            Err(e) => return Err(e),
        }
        let unclaimed = self
            .claim_order(server)
            .filter(|b| !self.data.blocks.contains_key(b));
        for block in unclaimed {
            if let Some(slot) = self.first_available(block, now) {
                let claim = IpamOp::ClaimBlock { block };
                return Ok(vec![claim, IpamOp::AllocateAddress { node, slot }]);
            }
        }
        Err(IpamError::Exhausted(
            "the tunnel pool (no unclaimed block has a free address)",
        ))
    }

    /// The first tunnel address free for leasing at HLC `now` in the blocks `server` holds.
    /// `Err(BlocksFull)` means: claim a block first ([`Ipam::next_block_to_claim`]).
    pub fn next_free_address(
        &self,
        server: &PublicKey,
        now: Hlc,
    ) -> Result<TunnelAddress, IpamError> {
        let open = self.open.range((*server, 0)..=(*server, u32::MAX));
        open.filter_map(|(_, block)| self.first_available(*block, now))
            .map(|slot| self.data.config.address_of(slot))
            .next()
            .ok_or(IpamError::BlocksFull)
    }

    /// The next block `server` should claim: the first unclaimed block in the server's own
    /// hash-seeded permutation of all blocks, so that two servers rarely race for the same block.
    pub fn next_block_to_claim(&self, server: &PublicKey) -> Result<u32, IpamError> {
        self.claim_order(server)
            .find(|b| !self.data.blocks.contains_key(b))
            .ok_or(IpamError::Exhausted(
                "the tunnel pool (every block is claimed)",
            ))
    }

    /// `server`'s preferred order of all blocks: `(h0 + i * step) mod count` with `h0` and an odd
    /// `step` from SHA-256 of its key. An odd step is coprime with the power-of-two block count,
    /// so this is a permutation: every block exactly once.
    fn claim_order(&self, server: &PublicKey) -> impl Iterator<Item = u32> {
        let count = u64::from(self.data.config.block_count());
        let h = key_hash(b"ln-block-order:v1", server);
        let start = h[0] % count;
        let step = (h[1] % count) | 1;
        (0..count).map(move |i| ((start + i * step) % count) as u32)
    }

    /// The first slot of `block` that is neither leased, reserved nor in quarantine at `now`.
    fn first_available(&self, block: u32, now: Hlc) -> Option<u32> {
        let cfg = &self.data.config;
        let first = block * cfg.block_size();
        let end = first + cfg.block_size();
        // Walk the block beside its (sorted) leased slots; check the others for reservation and
        // quarantine.
        let mut leased = self.by_slot.range(first..end).map(|(s, _)| *s).peekable();
        (first..end).find(|slot| {
            if leased.peek() == Some(slot) {
                leased.next();
                false
            } else {
                !cfg.is_reserved(*slot) && self.grace_over(*slot, now).is_ok()
            }
        })
    }

    /// The first free aligned prefix of length `len` in `pool` (first fit).
    pub fn next_free_subnet(&self, pool: SubnetPool, len: u8) -> Result<Subnet, IpamError> {
        let (net, range) = self.data.config.pool(pool);
        if len < range.min || len > range.max {
            let subnet = Subnet {
                base: u32::from(net.network()),
                len,
            };
            return Err(IpamError::BadSubnet {
                subnet,
                pool: net,
                min: range.min,
                max: range.max,
            });
        }
        let size = u64::from(host_mask(len)) + 1;
        let pool_last = u64::from(u32::from(net.broadcast()));
        let mut candidate = u64::from(u32::from(net.network()));
        while candidate + size - 1 <= pool_last {
            let s = Subnet {
                base: candidate as u32,
                len,
            };
            match self.overlapping(pool, s, None) {
                None => return Ok(s),
                // Jump past the blocker, rounded up to the next aligned start.
                Some(blocker) => candidate = (u64::from(blocker.last()) + 1).div_ceil(size) * size,
            }
        }
        Err(IpamError::Exhausted(match pool {
            SubnetPool::Private => "the private subnet pool",
            SubnetPool::Shared => "the shared block pool",
        }))
    }

    /// Checks the IPAM invariants against `tree` (tests and loading): no two holders of
    /// overlapping space, every holder exists with the right kind, leases inside held blocks.
    pub fn check_invariants(&self, tree: &Tree) -> Result<(), String> {
        let cfg = &self.data.config;
        let mut slots = BTreeSet::new();
        for (node, lease) in &self.data.leases {
            if !slots.insert(lease.slot) {
                return Err(format!("slot {} leased twice", lease.slot));
            }
            if cfg.is_reserved(lease.slot) || lease.slot >= cfg.slot_count() {
                return Err(format!("reserved or out-of-pool slot {}", lease.slot));
            }
            let block = cfg.block_of(lease.slot);
            if self.data.blocks.get(&block).map(|c| c.holder) != Some(lease.origin) {
                return Err(format!("lease of {node} is outside its server's blocks"));
            }
            if tree.get(node).is_none() {
                return Err(format!("lease held by missing node {node}"));
            }
            if self.data.quarantine.contains_key(&lease.slot) {
                return Err(format!("slot {} both leased and quarantined", lease.slot));
            }
        }
        for pool in [SubnetPool::Private, SubnetPool::Shared] {
            let (net, range) = cfg.pool(pool);
            let mut prev_last: Option<u32> = None;
            let mut subnets: Vec<_> = self
                .data
                .subnets
                .iter()
                .filter(|((p, _), _)| *p == pool)
                .collect();
            subnets.sort_by_key(|(_, s)| s.base);
            for ((_, node), s) in subnets {
                if tree.get(node).is_none() {
                    return Err(format!("subnet held by missing node {node}"));
                }
                if s.len < range.min || s.len > range.max || s.base & host_mask(s.len) != 0 {
                    return Err(format!("bad subnet {s}"));
                }
                if !net.contains(&s.net()) {
                    return Err(format!("subnet {s} outside {net}"));
                }
                if prev_last.is_some_and(|l| l >= s.base) {
                    return Err(format!("subnet {s} overlaps another"));
                }
                prev_last = Some(s.last());
            }
        }
        let mut offsets = BTreeSet::new();
        for (node, o) in &self.data.backbone {
            if !offsets.insert(*o) {
                return Err(format!("backbone offset {o} assigned twice"));
            }
            if tree.get(node).is_none_or(|n| n.kind != NodeKind::Server) {
                return Err(format!(
                    "backbone address held by missing or non-server {node}"
                ));
            }
        }
        if *self != Ipam::from_data(self.data.clone()).with_dirty(self.dirty.clone()) {
            return Err("derived indexes out of date".into());
        }
        Ok(())
    }

    // ---- validation helpers ----

    /// Whether `block` has a slot that is neither leased nor reserved.
    fn has_room(&self, block: u32) -> bool {
        let cfg = &self.data.config;
        let used = self.used.get(&block).copied().unwrap_or(0);
        used + cfg.reserved_in_block(block) < cfg.block_size()
    }

    fn check_claim(&self, block: u32, ctx: OpCtx<'_>) -> Result<(), IpamError> {
        if ctx.author != ctx.origin {
            return Err(IpamError::NotOwnBlock);
        }
        let count = self.data.config.block_count();
        if block >= count {
            return Err(IpamError::NoSuchBlock { block, count });
        }
        if let Some(c) = self.data.blocks.get(&block) {
            return Err(IpamError::BlockTaken {
                block,
                holder: c.holder,
            });
        }
        Ok(())
    }

    fn check_allocate(
        &self,
        node: &NodeId,
        slot: u32,
        ctx: OpCtx<'_>,
        tree: &Tree,
    ) -> Result<(), IpamError> {
        let cfg = &self.data.config;
        let n = tree.get(node).ok_or(IpamError::NoSuchNode(*node))?;
        if !matches!(
            n.kind,
            NodeKind::Endpoint | NodeKind::Relay | NodeKind::Server
        ) {
            return Err(IpamError::WrongKind {
                kind: n.kind,
                what: "a tunnel address",
            });
        }
        if self.data.leases.contains_key(node) {
            return Err(IpamError::AlreadyHas(*node, "a tunnel address"));
        }
        if slot >= cfg.slot_count() || cfg.is_reserved(slot) {
            return Err(IpamError::BadSlot(slot));
        }
        let block = cfg.block_of(slot);
        if !self.held.contains(&(*ctx.origin, block)) {
            return Err(IpamError::NotYourBlock(block));
        }
        if self.by_slot.contains_key(&slot) {
            return Err(IpamError::SlotTaken(cfg.address_of(slot).v4));
        }
        self.grace_over(slot, ctx.hlc)
    }

    /// Ok when `slot` is not quarantined at `now`.
    fn grace_over(&self, slot: u32, now: Hlc) -> Result<(), IpamError> {
        match self.data.quarantine.get(&slot) {
            Some(released) => {
                let reusable_ms = released
                    .wall_ms
                    .saturating_add(self.data.config.reuse_grace_ms);
                if now.wall_ms >= reusable_ms {
                    Ok(())
                } else {
                    let addr = self.data.config.address_of(slot).v4;
                    Err(IpamError::InGrace {
                        addr,
                        released: *released,
                        reusable_ms,
                    })
                }
            }
            None => Ok(()),
        }
    }

    fn check_subnet_holder(
        &self,
        pool: SubnetPool,
        node: &NodeId,
        tree: &Tree,
    ) -> Result<(), IpamError> {
        let n = tree.get(node).ok_or(IpamError::NoSuchNode(*node))?;
        if !matches!(n.kind, NodeKind::Customer | NodeKind::Endpoint) {
            return Err(IpamError::WrongKind {
                kind: n.kind,
                what: "a subnet",
            });
        }
        if self.subnet(pool, node).is_some() {
            return Err(IpamError::AlreadyHas(*node, "a subnet in this pool"));
        }
        Ok(())
    }

    /// `subnet` is aligned, of an allowed length, inside the pool, and overlaps no subnet other
    /// than `except`'s.
    fn check_subnet(
        &self,
        pool: SubnetPool,
        subnet: Subnet,
        except: Option<&NodeId>,
    ) -> Result<(), IpamError> {
        let (net, range) = self.data.config.pool(pool);
        let ok = subnet.len >= range.min
            && subnet.len <= range.max
            && subnet.base & host_mask(subnet.len) == 0
            && net.contains(&subnet.net());
        if !ok {
            return Err(IpamError::BadSubnet {
                subnet,
                pool: net,
                min: range.min,
                max: range.max,
            });
        }
        match self.overlapping(pool, subnet, except) {
            Some(_) => Err(IpamError::Overlap(subnet)),
            None => Ok(()),
        }
    }

    /// A subnet of `pool` (not `except`'s) that overlaps `s`. Allocated subnets never overlap, so
    /// only those starting at or before `s.last()` can, and of those the last ones to start.
    fn overlapping(&self, pool: SubnetPool, s: Subnet, except: Option<&NodeId>) -> Option<Subnet> {
        self.by_base
            .range((pool, 0)..=(pool, s.last()))
            .rev()
            .filter(|(_, (_, holder))| Some(holder) != except)
            .take(1)
            .map(|(_, (other, _))| *other)
            .find(|other| other.last() >= s.base)
    }

    fn backbone_offset_for(&self, key: &PublicKey) -> Result<u32, IpamError> {
        let cfg = &self.data.config;
        let size = 1u32 << (32 - cfg.backbone.prefix_len());
        let low = cfg.backbone_reserved_low;
        let usable = size - 1 - low; // the last offset is the broadcast address
        let preferred = (key_hash(b"ln-backbone:v1", key)[0] % u64::from(usable)) as u32;
        (0..usable)
            .map(|i| low + (preferred + i) % usable)
            .find(|o| !self.by_offset.contains_key(o))
            .ok_or(IpamError::Exhausted("the backbone prefix"))
    }

    // ---- mutation helpers ----

    fn release_address(&mut self, node: &NodeId, hlc: Hlc) {
        if let Some(lease) = self.data.leases.remove(node) {
            self.by_slot.remove(&lease.slot);
            let block = self.data.config.block_of(lease.slot);
            if let Some(n) = self.used.get_mut(&block) {
                *n -= 1;
                if *n == 0 {
                    self.used.remove(&block);
                }
            }
            if let Some(claim) = self.data.blocks.get(&block) {
                self.open.insert((claim.holder, block));
            }
            self.data.quarantine.insert(lease.slot, hlc);
            self.dirty.insert(IpamKey::Lease(*node));
            self.dirty.insert(IpamKey::Quarantine(lease.slot));
        }
    }

    fn insert_subnet(&mut self, pool: SubnetPool, node: NodeId, subnet: Subnet) {
        self.data.subnets.insert((pool, node), subnet);
        self.by_base.insert((pool, subnet.base), (subnet, node));
        self.dirty.insert(IpamKey::Subnet(pool, node));
    }

    fn remove_subnet(&mut self, pool: SubnetPool, node: &NodeId) {
        if let Some(s) = self.data.subnets.remove(&(pool, *node)) {
            self.by_base.remove(&(pool, s.base));
            self.dirty.insert(IpamKey::Subnet(pool, *node));
        }
    }

    fn with_dirty(mut self, dirty: BTreeSet<IpamKey>) -> Ipam {
        self.dirty = dirty;
        self
    }
}

/// Two 64-bit words of SHA-256(tag || key): deterministic placement seeds.
fn key_hash(tag: &[u8], key: &PublicKey) -> [u64; 2] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(tag);
    ctx.update(key.as_bytes());
    let d = ctx.finish();
    let b = d.as_ref();
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_be_bytes(w)
    };
    [word(0), word(8)]
}

/// Serde of prefixes as their text form ("10.64.0.0/10"): readable in the stored config.
mod as_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(d: D) -> Result<T, D::Error>
    where
        T::Err: Display,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::TreeOp;

    const ANCHOR: PublicKey = PublicKey([1; 32]);
    const S1: PublicKey = PublicKey([11; 32]);
    const S2: PublicKey = PublicKey([12; 32]);

    fn hlc(ms: u64) -> Hlc {
        Hlc {
            wall_ms: ms,
            logical: 0,
        }
    }

    fn ctx(server: &PublicKey, ms: u64) -> OpCtx<'_> {
        OpCtx {
            origin: server,
            author: server,
            hlc: hlc(ms),
        }
    }

    /// A tree with `n` endpoints (seq 1..=n) and a customer (seq 1000); returns their ids.
    fn tree_with(n: u64) -> (Tree, Vec<NodeId>, NodeId) {
        let mut tree = Tree::new(ANCHOR);
        let mut ids = Vec::new();
        for seq in 1..=n {
            let op = TreeOp::Create {
                parent: NodeId::ROOT,
                kind: NodeKind::Endpoint,
                hostname: format!("e{seq}"),
                owner: None,
                wg_pubkey: None,
            };
            tree.apply(&op, &ANCHOR, seq, Hlc::default())
                .expect("create");
            ids.push(NodeId::derive(&ANCHOR, seq));
        }
        let op = TreeOp::Create {
            parent: NodeId::ROOT,
            kind: NodeKind::Customer,
            hostname: "cust".into(),
            owner: None,
            wg_pubkey: None,
        };
        tree.apply(&op, &ANCHOR, 1000, Hlc::default())
            .expect("create");
        (tree, ids, NodeId::derive(&ANCHOR, 1000))
    }

    /// A small pool: tunnel /24 in 4 blocks of 64, grace 1000 ms, tiny subnet pools and backbone.
    fn small() -> IpamConfig {
        IpamConfig {
            tunnel_v4: "10.64.0.0/24".parse().expect("net"),
            tunnel_v6: "fd6c:6e00::/48".parse().expect("net"),
            block_len: 26,
            reserved_low: 10,
            reuse_grace_ms: 1000,
            private: "10.128.0.0/24".parse().expect("net"),
            private_len: LenRange { min: 25, max: 30 },
            shared: "172.20.0.0/24".parse().expect("net"),
            shared_len: LenRange { min: 28, max: 30 },
            backbone: "172.16.0.0/28".parse().expect("net"),
            backbone_reserved_low: 2,
        }
    }

    #[test]
    fn default_config_is_valid_and_maps_slots_to_address_pairs() {
        let cfg = IpamConfig::default();
        cfg.validate().expect("defaults valid");
        assert_eq!(cfg.slot_count(), 1 << 22);
        assert_eq!(cfg.block_count(), 1 << 14);
        let a = cfg.address_of(10);
        assert_eq!(a.v4, Ipv4Addr::new(10, 64, 0, 10));
        assert_eq!(a.v6, "fd6c:6e00::a".parse::<Ipv6Addr>().expect("v6"));
        assert_eq!(cfg.address_of(256 + 5).v4, Ipv4Addr::new(10, 64, 1, 5));
        assert!(
            cfg.is_reserved(0) && cfg.is_reserved(1) && cfg.is_reserved(9) && !cfg.is_reserved(10)
        );
        assert!(cfg.is_reserved(cfg.slot_count() - 1), "broadcast");
        assert_eq!(cfg.reserved_in_block(0), 10);
        assert_eq!(cfg.reserved_in_block(1), 0);
        assert_eq!(cfg.reserved_in_block(cfg.block_count() - 1), 1);
    }

    #[test]
    fn bad_configs_name_the_option() {
        type Case = (fn(&mut IpamConfig), &'static str);
        let cases: [Case; 6] = [
            (
                |c| c.tunnel_v4 = "10.64.0.0/26".parse().expect("net"),
                "tunnel_v4",
            ),
            (|c| c.block_len = 31, "block_len"),
            (
                |c| c.private_len = LenRange { min: 8, max: 30 },
                "private_len",
            ),
            (
                |c| c.shared_len = LenRange { min: 20, max: 32 },
                "shared_len",
            ),
            (
                |c| c.private = "10.0.0.0/8".parse().expect("net"),
                "overlaps",
            ),
            (
                |c| c.tunnel_v6 = "fd6c:6e00::/120".parse().expect("net"),
                "tunnel_v6",
            ),
        ];
        for (break_it, word) in cases {
            let mut cfg = IpamConfig::default();
            break_it(&mut cfg);
            let err = cfg.validate().expect_err("must be refused");
            assert!(err.contains(word), "{err:?} should mention {word}");
        }
    }

    #[test]
    fn leases_only_inside_the_origins_blocks() {
        let (tree, ids, _) = tree_with(3);
        let mut ipam = Ipam::new(small());
        let alloc = |node, slot| IpamOp::AllocateAddress { node, slot };
        assert_eq!(
            ipam.apply(&alloc(ids[0], 10), ctx(&S1, 1), &tree),
            Err(IpamError::NotYourBlock(0))
        );
        ipam.apply(&IpamOp::ClaimBlock { block: 0 }, ctx(&S1, 2), &tree)
            .expect("claim");
        assert_eq!(
            ipam.apply(&IpamOp::ClaimBlock { block: 0 }, ctx(&S2, 3), &tree),
            Err(IpamError::BlockTaken {
                block: 0,
                holder: S1
            })
        );
        let on_behalf = OpCtx {
            origin: &S2,
            author: &ANCHOR,
            hlc: hlc(4),
        };
        assert_eq!(
            ipam.apply(&IpamOp::ClaimBlock { block: 1 }, on_behalf, &tree),
            Err(IpamError::NotOwnBlock)
        );
        assert_eq!(
            ipam.apply(&alloc(ids[0], 5), ctx(&S1, 5), &tree),
            Err(IpamError::BadSlot(5))
        );
        assert_eq!(
            ipam.apply(&alloc(ids[0], 10), ctx(&S2, 6), &tree),
            Err(IpamError::NotYourBlock(0))
        );
        ipam.apply(&alloc(ids[0], 10), ctx(&S1, 7), &tree)
            .expect("lease");
        assert!(matches!(
            ipam.apply(&alloc(ids[1], 10), ctx(&S1, 8), &tree),
            Err(IpamError::SlotTaken(_))
        ));
        assert!(matches!(
            ipam.apply(&alloc(ids[0], 11), ctx(&S1, 9), &tree),
            Err(IpamError::AlreadyHas(..))
        ));
        assert_eq!(
            ipam.tunnel_address(&ids[0]).map(|a| a.v4),
            Some(Ipv4Addr::new(10, 64, 0, 10))
        );
        assert_eq!(
            ipam.apply(&IpamOp::ReleaseBlock { block: 0 }, ctx(&S1, 10), &tree),
            Err(IpamError::BlockInUse(0))
        );
        ipam.check_invariants(&tree).expect("invariants");
    }

    #[test]
    fn released_addresses_wait_for_the_grace_period() {
        let (tree, ids, _) = tree_with(2);
        let mut ipam = Ipam::new(small());
        ipam.apply(&IpamOp::ClaimBlock { block: 0 }, ctx(&S1, 1), &tree)
            .expect("claim");
        let first = ipam.next_free_address(&S1, hlc(2)).expect("free");
        assert_eq!(first.slot, 10);
        ipam.apply(
            &IpamOp::AllocateAddress {
                node: ids[0],
                slot: 10,
            },
            ctx(&S1, 2),
            &tree,
        )
        .expect("lease");
        ipam.apply(
            &IpamOp::ReleaseAddress { node: ids[0] },
            ctx(&S1, 100),
            &tree,
        )
        .expect("release");
        // Within the grace period the proposal skips slot 10 and the fold refuses it.
        assert_eq!(
            ipam.next_free_address(&S1, hlc(1099)).expect("free").slot,
            11
        );
        assert!(matches!(
            ipam.apply(
                &IpamOp::AllocateAddress {
                    node: ids[1],
                    slot: 10
                },
                ctx(&S1, 1099),
                &tree
            ),
            Err(IpamError::InGrace {
                reusable_ms: 1100,
                ..
            })
        ));
        assert_eq!(
            ipam.next_free_address(&S1, hlc(1100)).expect("free").slot,
            10
        );
        ipam.apply(
            &IpamOp::AllocateAddress {
                node: ids[1],
                slot: 10,
            },
            ctx(&S1, 1100),
            &tree,
        )
        .expect("reuse");
        assert!(ipam.data().quarantine.is_empty());
        ipam.check_invariants(&tree).expect("invariants");
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic() {
        let (tree, ids, _) = tree_with(260);
        let mut ipam = Ipam::new(small());
        let mut leased = 0;
        let mut claims = 0;
        let mut ms = 0;
        for node in &ids {
            ms += 1;
            let ops = match ipam.propose_lease(&S1, *node, hlc(ms)) {
                Ok(ops) => ops,
                Err(e) => {
                    assert!(matches!(e, IpamError::Exhausted(_)), "{e}");
                    break;
                }
            };
            for op in &ops {
                ipam.apply(op, ctx(&S1, ms), &tree)
                    .expect("a proposal applies");
                claims += usize::from(matches!(op, IpamOp::ClaimBlock { .. }));
            }
            leased += 1;
        }
        // 4 blocks of 64 slots, minus 10 reserved low and the broadcast.
        assert_eq!((leased, claims), (245, 4));
        assert_eq!(
            ipam.next_free_address(&S1, hlc(ms)),
            Err(IpamError::BlocksFull)
        );
        assert!(matches!(
            ipam.next_block_to_claim(&S1),
            Err(IpamError::Exhausted(_))
        ));
        // A release frees one address again, but only after the grace period.
        ipam.apply(
            &IpamOp::ReleaseAddress { node: ids[0] },
            ctx(&S1, ms),
            &tree,
        )
        .expect("release");
        assert!(ipam.propose_lease(&S1, ids[259], hlc(ms + 999)).is_err());
        let ops = ipam
            .propose_lease(&S1, ids[259], hlc(ms + 1000))
            .expect("reusable");
        assert_eq!(ops.len(), 1, "no claim needed: {ops:?}");
        ipam.check_invariants(&tree).expect("invariants");
    }

    #[test]
    fn block_preference_is_a_per_server_permutation() {
        let cfg = IpamConfig::default();
        let ipam = Ipam::new(cfg);
        let a = ipam.next_block_to_claim(&S1).expect("block");
        let b = ipam.next_block_to_claim(&S2).expect("block");
        assert_ne!(a, b, "two servers start in different places");
        // The order visits every block exactly once.
        let mut ipam = Ipam::new(small());
        let tree = Tree::new(ANCHOR);
        let mut seen = BTreeSet::new();
        while let Ok(block) = ipam.next_block_to_claim(&S1) {
            assert!(seen.insert(block));
            ipam.apply(&IpamOp::ClaimBlock { block }, ctx(&S1, 1), &tree)
                .expect("claim");
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn subnets_are_aligned_bounded_and_never_overlap() {
        let (tree, ids, cust) = tree_with(2);
        let mut ipam = Ipam::new(small());
        let private = SubnetPool::Private;
        let s = |text: &str| {
            let net: Ipv4Net = text.parse().expect("net");
            Subnet {
                base: u32::from(net.addr()),
                len: net.prefix_len(),
            }
        };
        let alloc = |node, subnet| IpamOp::AllocateSubnet {
            pool: private,
            node,
            subnet,
        };
        for bad in [
            "10.128.0.0/24",
            "10.128.0.4/31",
            "10.128.0.2/30",
            "10.129.0.0/30",
        ] {
            assert!(
                matches!(
                    ipam.apply(&alloc(cust, s(bad)), ctx(&S1, 1), &tree),
                    Err(IpamError::BadSubnet { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(ipam.next_free_subnet(private, 30), Ok(s("10.128.0.0/30")));
        ipam.apply(&alloc(cust, s("10.128.0.0/30")), ctx(&S1, 1), &tree)
            .expect("alloc");
        assert_eq!(ipam.next_free_subnet(private, 30), Ok(s("10.128.0.4/30")));
        assert_eq!(ipam.next_free_subnet(private, 29), Ok(s("10.128.0.8/29")));
        assert_eq!(
            ipam.apply(&alloc(ids[0], s("10.128.0.0/29")), ctx(&S1, 2), &tree),
            Err(IpamError::Overlap(s("10.128.0.0/29")))
        );
        ipam.apply(&alloc(ids[0], s("10.128.0.8/30")), ctx(&S1, 3), &tree)
            .expect("alloc");
        // Expanding the first to /29 covers .0-.7: free. To /28 would swallow .8/30: refused.
        let expand = |len| IpamOp::ExpandSubnet {
            pool: private,
            node: cust,
            len,
        };
        ipam.apply(&expand(29), ctx(&S1, 4), &tree).expect("expand");
        assert_eq!(ipam.subnet(private, &cust), Some(s("10.128.0.0/29")));
        assert_eq!(
            ipam.apply(&expand(28), ctx(&S1, 5), &tree),
            Err(IpamError::Overlap(s("10.128.0.0/28")))
        );
        assert!(matches!(
            ipam.apply(&expand(29), ctx(&S1, 6), &tree),
            Err(IpamError::BadSubnet { .. })
        ));
        // A second endpoint expanding past the pool's minimum length is refused.
        let e1 = IpamOp::ExpandSubnet {
            pool: private,
            node: ids[0],
            len: 24,
        };
        assert!(matches!(
            ipam.apply(&e1, ctx(&S1, 7), &tree),
            Err(IpamError::BadSubnet { .. })
        ));
        // Fill the pool: exhaustion is an error.
        let mut pool = Ipam::new(small());
        pool.apply(&alloc(cust, s("10.128.0.0/25")), ctx(&S1, 1), &tree)
            .expect("alloc");
        pool.apply(&alloc(ids[0], s("10.128.0.128/25")), ctx(&S1, 1), &tree)
            .expect("alloc");
        assert_eq!(
            pool.next_free_subnet(private, 30),
            Err(IpamError::Exhausted("the private subnet pool"))
        );
        ipam.check_invariants(&tree).expect("invariants");
    }

    #[test]
    fn backbone_placement_is_hashed_with_linear_probing() {
        let mut tree = Tree::new(ANCHOR);
        let mut servers = Vec::new();
        for seq in 1..=14u64 {
            let op = TreeOp::Create {
                parent: NodeId::ROOT,
                kind: NodeKind::Server,
                hostname: format!("s{seq}"),
                owner: Some(PublicKey([seq as u8; 32])),
                wg_pubkey: None,
            };
            tree.apply(&op, &ANCHOR, seq, Hlc::default())
                .expect("create");
            servers.push(NodeId::derive(&ANCHOR, seq));
        }
        let mut ipam = Ipam::new(small());
        // /28 = 16 offsets, 0-1 reserved, 15 broadcast: 13 usable.
        let expected_first = 2 + (key_hash(b"ln-backbone:v1", &PublicKey([1; 32]))[0] % 13) as u32;
        for (i, node) in servers.iter().enumerate() {
            let r = ipam.apply(&IpamOp::JoinBackbone { node: *node }, ctx(&S1, 1), &tree);
            if i < 13 {
                r.expect("join");
            } else {
                assert_eq!(r, Err(IpamError::Exhausted("the backbone prefix")));
            }
        }
        let first = ipam.backbone_address(&servers[0]).expect("address");
        assert_eq!(
            first,
            Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + expected_first)
        );
        let offsets: BTreeSet<u32> = ipam.data().backbone.values().copied().collect();
        assert_eq!(offsets, (2..15).collect(), "every usable offset, each once");
        ipam.check_invariants(&tree).expect("invariants");
    }
}
