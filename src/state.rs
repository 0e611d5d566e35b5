//! The replicated state: the permission tree plus the IPAM, folded from ops.
//!
//! `State::apply` is the only way the state changes. It asks `crate::authz` whether the op's
//! author may do it, then lets the tree or the IPAM check their invariants; a refused op returns a
//! [`Rejection`] and changes nothing (it stays in the log with no effect, the same on every
//! server). The state is a deterministic function of the ops folded in `crate::op::fold_order`.
//!
//! Note for helper C: `Rejection` is an enum (Denied / Tree / Ipam) rather than the contract's
//! opaque struct; it implements Display and std::error::Error as agreed.

mod render;
mod trust_fold;

use std::io::Write;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::authz::{self, Denied};
use crate::hlc::Hlc;
use crate::ipam::{
    BlockClaim, Ipam, IpamConfig, IpamData, IpamError, IpamKey, Lease, OpCtx, Subnet, SubnetPool,
};
use crate::keys::PublicKey;
use crate::op::{Op, OpBody};
use crate::tree::{Node, NodeId, Tree, TreeError, TreeOp};
use crate::trust::{ServerStatus, TrustError, TrustTable};

pub use render::{IpamView, TreeView, ipam_view, render_ipam, render_tree, tree_view};

/// The version of the state-table encoding (rows and hash input).
pub const STATE_SCHEMA_VERSION: u32 = 1;

/// The whole replicated state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    tree: Tree,
    ipam: Ipam,
    /// Which keys are (or were) servers of the cluster (`crate::trust`).
    trust: TrustTable,
    /// The meta rows (anchor, IPAM config) still have to be written.
    meta_dirty: bool,
}

/// One state table of the store (one redb table per variant). Keys and values:
///
/// | table            | key                          | value (CBOR)               |
/// |------------------|------------------------------|----------------------------|
/// | Meta             | b"anchor" / b"ipam_config"   | PublicKey / IpamConfig     |
/// | Nodes            | node id (16 bytes)           | Node (with its grants)     |
/// | IpamBlocks       | block number (u32 BE)        | BlockClaim                 |
/// | IpamLeases       | node id                      | Lease                      |
/// | IpamQuarantine   | slot (u32 BE)                | Hlc of the release         |
/// | IpamSubnets      | pool (1 byte) + node id      | Subnet                     |
/// | IpamBackbone     | node id                      | backbone offset (u32)      |
/// | Trust            | server public key (32 bytes) | ServerStatus               |
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StateTable {
    Meta,
    Nodes,
    IpamBlocks,
    IpamLeases,
    IpamQuarantine,
    IpamSubnets,
    IpamBackbone,
    Trust,
}

impl StateTable {
    pub const ALL: [StateTable; 8] = [
        StateTable::Meta,
        StateTable::Nodes,
        StateTable::IpamBlocks,
        StateTable::IpamLeases,
        StateTable::IpamQuarantine,
        StateTable::IpamSubnets,
        StateTable::IpamBackbone,
        StateTable::Trust,
    ];

    /// The redb table name.
    pub fn name(self) -> &'static str {
        match self {
            StateTable::Meta => "state_meta",
            StateTable::Nodes => "state_nodes",
            StateTable::IpamBlocks => "state_ipam_blocks",
            StateTable::IpamLeases => "state_ipam_leases",
            StateTable::IpamQuarantine => "state_ipam_quarantine",
            StateTable::IpamSubnets => "state_ipam_subnets",
            StateTable::IpamBackbone => "state_ipam_backbone",
            // Added after store schema 1 shipped, without a schema bump: redb creates the table
            // on the first write, and a store written before it exists has no trust op in its
            // log (`OpBody::Trust` did not exist), so an absent table reads as the correct,
            // empty trust table (`store::read_state_rows` skips missing tables).
            StateTable::Trust => "state_trust",
        }
    }
}

/// One changed row: `value: None` deletes the row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowChange {
    pub table: StateTable,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Why an op had no effect. Display says why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("not authorized: {0}")]
    Denied(#[from] Denied),
    #[error("tree: {0}")]
    Tree(#[from] TreeError),
    #[error("ipam: {0}")]
    Ipam(#[from] IpamError),
    #[error("trust: {0}")]
    Trust(#[from] TrustError),
}

/// The state tables could not be decoded into a valid state.
#[derive(Debug, thiserror::Error)]
#[error("state table {table}: {why}")]
pub struct StateDecodeError {
    pub table: &'static str,
    pub why: String,
}

const META_ANCHOR: &[u8] = b"anchor";
const META_IPAM_CONFIG: &[u8] = b"ipam_config";

impl State {
    /// Empty state for a cluster whose trust anchor (root authority key) is `root`, with the
    /// default IPAM configuration.
    pub fn new(root: PublicKey) -> Self {
        State::assemble(
            Tree::new(root),
            Ipam::new(IpamConfig::default()),
            TrustTable::default(),
            true,
        )
    }

    /// Empty state with a cluster-specific IPAM configuration (the same on every server).
    pub fn with_ipam_config(root: PublicKey, config: IpamConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(State::assemble(
            Tree::new(root),
            Ipam::new(config),
            TrustTable::default(),
            true,
        ))
    }

    fn assemble(mut tree: Tree, mut ipam: Ipam, mut trust: TrustTable, dirty: bool) -> State {
        if dirty {
            tree.mark_all_dirty();
            ipam.mark_all_dirty();
            trust.mark_all_dirty();
        }
        State {
            tree,
            ipam,
            trust,
            meta_dirty: dirty,
        }
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// The trust table: every server key ever admitted or revoked.
    pub fn trust(&self) -> &TrustTable {
        &self.trust
    }

    /// What the fold knows about server `key` (None: never admitted nor revoked).
    pub fn server_status(&self, key: &PublicKey) -> Option<&ServerStatus> {
        self.trust.get(key)
    }

    /// The servers admitted and not revoked, by key.
    pub fn active_servers(&self) -> impl Iterator<Item = (PublicKey, &ServerStatus)> {
        self.trust
            .map()
            .iter()
            .filter(|(_, s)| s.is_active())
            .map(|(k, s)| (*k, s))
    }

    /// The keys of revoked servers.
    pub fn revoked_servers(&self) -> impl Iterator<Item = PublicKey> + '_ {
        self.trust
            .map()
            .iter()
            .filter(|(_, s)| s.revoked.is_some())
            .map(|(k, _)| *k)
    }

    /// True if `key` is admitted and not revoked.
    pub fn is_active_server(&self, key: &PublicKey) -> bool {
        self.trust.get(key).is_some_and(ServerStatus::is_active)
    }

    /// True if the root revoked `key` (permanent).
    pub fn is_revoked(&self, key: &PublicKey) -> bool {
        self.trust.get(key).is_some_and(|s| s.revoked.is_some())
    }

    /// Applies one already signature-verified op. Deterministic: uses only the op's fields. A
    /// refused op returns Err and leaves the state unchanged.
    pub fn apply(&mut self, op: &Op) -> Result<(), Rejection> {
        // A revoked server's ops have no effect from its revocation on (in fold order).
        if self.is_revoked(&op.origin) {
            return Err(TrustError::OriginRevoked(op.origin).into());
        }
        // ...and no new grant brings a revoked key back.
        if let OpBody::Tree(TreeOp::Grant { key, .. }) = &op.body
            && self.is_revoked(key)
        {
            return Err(TrustError::Revoked(*key).into());
        }
        authz::authorize_op(&self.tree, &op.author, &op.body)?;
        match &op.body {
            OpBody::Tree(t) => {
                self.tree.apply(t, &op.origin, op.seq, op.hlc)?;
                // A deleted node holds nothing: its addresses are released (tunnel slot
                // quarantined) by the same op.
                if let TreeOp::Delete { node } = t {
                    self.ipam.release_all(node, op.hlc);
                }
            }
            OpBody::Ipam(i) => {
                let ctx = OpCtx {
                    origin: &op.origin,
                    author: &op.author,
                    hlc: op.hlc,
                };
                self.ipam.apply(i, ctx, &self.tree)?;
            }
            OpBody::Trust(t) => self.apply_trust(t, op)?,
        }
        Ok(())
    }

    /// Checks every invariant of the tree and the IPAM (tests, and after loading).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.tree.check_invariants()?;
        for (key, _) in self.trust.map().iter().filter(|(_, s)| s.revoked.is_some()) {
            if let Some(n) = self.tree.nodes().find(|n| n.grants.contains_key(key)) {
                return Err(format!(
                    "revoked server {key} still holds a grant on {}",
                    n.id
                ));
            }
        }
        self.ipam.check_invariants(&self.tree)
    }

    /// SHA-256 over the canonical encoding of the whole state: the deterministic CBOR of
    /// `{schema, anchor, nodes, ipam, servers}` (maps in key order, as BTreeMap serializes).
    pub fn hash(&self) -> [u8; 32] {
        #[derive(Serialize)]
        struct Canonical<'a> {
            schema: u32,
            anchor: &'a PublicKey,
            nodes: &'a std::collections::BTreeMap<NodeId, Node>,
            ipam: &'a IpamData,
            servers: &'a std::collections::BTreeMap<PublicKey, ServerStatus>,
        }
        let canonical = Canonical {
            schema: STATE_SCHEMA_VERSION,
            anchor: self.tree.anchor(),
            nodes: self.tree.node_map(),
            ipam: self.ipam.data(),
            servers: self.trust.map(),
        };
        let mut hasher = HashWriter(ring::digest::Context::new(&ring::digest::SHA256));
        ciborium::into_writer(&canonical, &mut hasher)
            .expect("state values always encode: no IO error, no unsupported type");
        let mut out = [0u8; 32];
        out.copy_from_slice(hasher.0.finish().as_ref());
        out
    }

    /// Every live row of every table (what the store writes after a full refold, having cleared
    /// the state tables first).
    pub fn rows(&self) -> Vec<RowChange> {
        State::assemble(
            self.tree.clone(),
            self.ipam.clone(),
            self.trust.clone(),
            true,
        )
        .take_changes()
    }

    /// Rows changed since the last call (after `new`, every live row).
    pub fn take_changes(&mut self) -> Vec<RowChange> {
        let mut rows = Vec::new();
        if std::mem::take(&mut self.meta_dirty) {
            rows.push(row(
                StateTable::Meta,
                META_ANCHOR.to_vec(),
                Some(self.tree.anchor()),
            ));
            rows.push(row(
                StateTable::Meta,
                META_IPAM_CONFIG.to_vec(),
                Some(self.ipam.config()),
            ));
        }
        for id in self.tree.take_dirty() {
            rows.push(row(StateTable::Nodes, id.0.to_vec(), self.tree.get(&id)));
        }
        let dirty = self.ipam.take_dirty();
        let data = self.ipam.data();
        for key in dirty {
            rows.push(match key {
                IpamKey::Block(b) => row(
                    StateTable::IpamBlocks,
                    b.to_be_bytes().to_vec(),
                    data.blocks.get(&b),
                ),
                IpamKey::Lease(n) => row(StateTable::IpamLeases, n.0.to_vec(), data.leases.get(&n)),
                IpamKey::Quarantine(s) => row(
                    StateTable::IpamQuarantine,
                    s.to_be_bytes().to_vec(),
                    data.quarantine.get(&s),
                ),
                IpamKey::Subnet(p, n) => row(
                    StateTable::IpamSubnets,
                    subnet_key(p, &n),
                    data.subnets.get(&(p, n)),
                ),
                IpamKey::Backbone(n) => row(
                    StateTable::IpamBackbone,
                    n.0.to_vec(),
                    data.backbone.get(&n),
                ),
            });
        }
        for key in self.trust.take_dirty() {
            rows.push(row(StateTable::Trust, key.0.to_vec(), self.trust.get(&key)));
        }
        rows
    }

    /// Rebuilds the state from the rows of every state table (what `take_changes` wrote). No rows
    /// at all means a fresh data directory: `State::new(root)`. Refuses rows written for another
    /// trust anchor, undecodable rows, and rows that break an invariant.
    pub fn from_rows(
        root: PublicKey,
        rows: impl IntoIterator<Item = RowChange>,
    ) -> Result<Self, StateDecodeError> {
        let mut anchor = None;
        let mut config = None;
        let mut nodes = Vec::new();
        let mut data = IpamData {
            config: IpamConfig::default(),
            blocks: Default::default(),
            leases: Default::default(),
            quarantine: Default::default(),
            subnets: Default::default(),
            backbone: Default::default(),
        };
        let mut servers = std::collections::BTreeMap::new();
        let mut any = false;
        for r in rows {
            let Some(value) = r.value else { continue };
            any = true;
            let t = r.table;
            match t {
                StateTable::Meta if r.key == META_ANCHOR => {
                    anchor = Some(decode::<PublicKey>(t, &value)?)
                }
                StateTable::Meta if r.key == META_IPAM_CONFIG => {
                    config = Some(decode::<IpamConfig>(t, &value)?)
                }
                StateTable::Meta => return Err(bad(t, "unknown meta key")),
                StateTable::Nodes => {
                    let node: Node = decode(t, &value)?;
                    if node.id.0[..] != r.key[..] {
                        return Err(bad(t, "row key differs from the node id"));
                    }
                    nodes.push(node);
                }
                StateTable::IpamBlocks => {
                    data.blocks
                        .insert(u32_key(t, &r.key)?, decode::<BlockClaim>(t, &value)?);
                }
                StateTable::IpamLeases => {
                    data.leases
                        .insert(node_key(t, &r.key)?, decode::<Lease>(t, &value)?);
                }
                StateTable::IpamQuarantine => {
                    data.quarantine
                        .insert(u32_key(t, &r.key)?, decode::<Hlc>(t, &value)?);
                }
                StateTable::IpamSubnets => {
                    let (pool_byte, node) =
                        r.key.split_first().ok_or_else(|| bad(t, "empty key"))?;
                    let pool = match pool_byte {
                        0 => SubnetPool::Private,
                        1 => SubnetPool::Shared,
                        _ => return Err(bad(t, "unknown pool byte")),
                    };
                    data.subnets
                        .insert((pool, node_key(t, node)?), decode::<Subnet>(t, &value)?);
                }
                StateTable::IpamBackbone => {
                    data.backbone
                        .insert(node_key(t, &r.key)?, decode::<u32>(t, &value)?);
                }
                StateTable::Trust => {
                    let key: [u8; 32] = r.key[..]
                        .try_into()
                        .map_err(|_| bad(t, "key is not a 32-byte public key"))?;
                    servers.insert(PublicKey(key), decode::<ServerStatus>(t, &value)?);
                }
            }
        }
        if !any {
            return Ok(State::new(root));
        }
        let meta = StateTable::Meta;
        match anchor {
            Some(a) if a == root => {}
            Some(a) => {
                return Err(bad(
                    meta,
                    &format!("written for trust anchor {a}, not {root}"),
                ));
            }
            None => return Err(bad(meta, "missing trust anchor row")),
        }
        data.config = config.ok_or_else(|| bad(meta, "missing ipam_config row"))?;
        data.config.validate().map_err(|e| bad(meta, &e))?;
        let state = State::assemble(
            Tree::from_nodes(root, nodes),
            Ipam::from_data(data),
            TrustTable::from_rows(servers),
            false,
        );
        state
            .check_invariants()
            .map_err(|e| bad(StateTable::Nodes, &e))?;
        Ok(state)
    }
}

fn subnet_key(pool: SubnetPool, node: &NodeId) -> Vec<u8> {
    let mut key = vec![match pool {
        SubnetPool::Private => 0,
        SubnetPool::Shared => 1,
    }];
    key.extend_from_slice(&node.0);
    key
}

fn row<T: Serialize>(table: StateTable, key: Vec<u8>, value: Option<&T>) -> RowChange {
    RowChange {
        table,
        key,
        value: value.map(cbor),
    }
}

/// Deterministic CBOR of a state value.
fn cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out)
        .expect("state values always encode: no IO error, no unsupported type");
    out
}

fn decode<T: DeserializeOwned>(table: StateTable, bytes: &[u8]) -> Result<T, StateDecodeError> {
    ciborium::from_reader(bytes).map_err(|e| bad(table, &format!("undecodable row: {e}")))
}

fn u32_key(table: StateTable, key: &[u8]) -> Result<u32, StateDecodeError> {
    let bytes: [u8; 4] = key
        .try_into()
        .map_err(|_| bad(table, "key is not 4 bytes"))?;
    Ok(u32::from_be_bytes(bytes))
}

fn node_key(table: StateTable, key: &[u8]) -> Result<NodeId, StateDecodeError> {
    let bytes: [u8; 16] = key
        .try_into()
        .map_err(|_| bad(table, "key is not a 16-byte node id"))?;
    Ok(NodeId(bytes))
}

fn bad(table: StateTable, why: &str) -> StateDecodeError {
    StateDecodeError {
        table: table.name(),
        why: why.to_string(),
    }
}

/// Feeds encoded bytes straight into SHA-256 (no intermediate buffer).
struct HashWriter(ring::digest::Context);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod trust_tests;
