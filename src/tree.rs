//! The permission tree: who exists (customers, endpoints, relays, servers) and who may do what.
//!
//! Pure and deterministic: the tree changes only through [`TreeOp`]s applied in fold order, and the
//! only clock is the op's HLC. Authorization is NOT decided here (see `crate::authz`); this module
//! keeps the structural invariants (see `docs/state-model.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::keys::PublicKey;

/// A node's identifier: 16 bytes, CBOR byte string, displayed as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 16]);

/// The kind of a tree node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// The one implicit root, owned by the trust anchor.
    Root,
    /// A customer (group): holds endpoints, relays and nested customers.
    Customer,
    /// A client device.
    Endpoint,
    /// A relay.
    Relay,
    /// A controller server.
    Server,
}

/// One permission. Bits are stable (they are in signed bytes); they match the reference system's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    Read,
    Write,
    AddChild,
    EditNode,
    DeleteNode,
    ExpandSubnet,
    ConnectPrivate,
    ConnectShared,
    RelayForward,
    StunRespond,
    RelayRegister,
    AllocateIp,
    RoutingCoordinate,
    /// Implies every other permission.
    Admin,
}

/// A set of permissions, encoded as a `u32` bit set.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Permissions(pub u32);

/// A WireGuard (X25519) public key: 32 bytes, CBOR byte string, base64 display.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WgKey(pub [u8; 32]);

/// One node of the tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// `None` only for the root.
    pub parent: Option<NodeId>,
    pub kind: NodeKind,
    /// A DNS label (RFC 1035 LDH, 1-63 chars), stored lowercase; unique among siblings.
    pub hostname: String,
    /// The Ed25519 identity of the device/server/person this node stands for. Carries no
    /// permission by itself: permissions come only from grants.
    pub owner: Option<PublicKey>,
    pub wg_pubkey: Option<WgKey>,
    /// Last known public endpoint, "ip:port".
    pub endpoint: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Grants on this node; they apply to its whole subtree.
    pub grants: BTreeMap<PublicKey, Permissions>,
    /// HLC of the op that created the node.
    pub created: Hlc,
}

/// A change to one field of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeField {
    Hostname(String),
    Owner(Option<PublicKey>),
    WgPublicKey(Option<WgKey>),
    Endpoint(Option<String>),
    Metadata { key: String, value: Option<String> },
}

/// A mutation of the tree. CBOR: externally tagged, `{"create": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TreeOp {
    /// Creates a node; its id is `NodeId::derive(op.origin, op.seq)`.
    Create {
        parent: NodeId,
        kind: NodeKind,
        hostname: String,
        owner: Option<PublicKey>,
        wg_pubkey: Option<WgKey>,
    },
    Update {
        node: NodeId,
        field: NodeField,
    },
    Move {
        node: NodeId,
        new_parent: NodeId,
    },
    /// Refused while the node has children.
    Delete {
        node: NodeId,
    },
    /// Adds `permissions` to `key`'s grant on `node`.
    Grant {
        node: NodeId,
        key: PublicKey,
        permissions: Permissions,
    },
    /// Removes `permissions` from `key`'s grant on `node`.
    Revoke {
        node: NodeId,
        key: PublicKey,
        permissions: Permissions,
    },
}

/// Size bounds that keep every node, and the tree, small enough to store, hash and gossip.
pub mod limits {
    /// Nodes in the whole tree (the root included).
    pub const MAX_NODES: usize = 1 << 20;
    /// Direct children of one node.
    pub const MAX_CHILDREN: usize = 1 << 16;
    /// Keys holding a grant on one node.
    pub const MAX_GRANTS_PER_NODE: usize = 64;
    /// Metadata entries on one node.
    pub const MAX_METADATA_ENTRIES: usize = 32;
    /// Sum of the lengths of all metadata keys and values on one node, in bytes.
    pub const MAX_METADATA_BYTES: usize = 2048;
    /// Length of one metadata key, in bytes.
    pub const MAX_METADATA_KEY_BYTES: usize = 64;
    /// Length of the endpoint text ("ip:port"), in bytes.
    pub const MAX_ENDPOINT_BYTES: usize = 64;
    /// Depth of the tree: the root is at depth 0, so at most 31 levels of nodes below it. Keeps
    /// every walk up the tree (authorization) and down it (rendering) short.
    pub const MAX_DEPTH: usize = 32;
}

/// Why the tree refused an op (authorization aside: that is `crate::authz::Denied`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("no node {0}")]
    NoSuchNode(NodeId),
    #[error("node {0} already exists")]
    NodeExists(NodeId),
    #[error("the root cannot be created, moved or deleted")]
    RootIsFixed,
    #[error("a {child:?} node cannot be placed under a {parent:?} node")]
    BadPlacement { parent: NodeKind, child: NodeKind },
    #[error("moving node {0} under its own subtree would make a cycle")]
    Cycle(NodeId),
    #[error(
        "invalid hostname {0:?}: a DNS label is 1-63 letters, digits or '-', not starting or ending with '-'"
    )]
    BadHostname(String),
    #[error("hostname {hostname:?} is already used by a sibling under {parent}")]
    HostnameTaken { parent: NodeId, hostname: String },
    #[error("node {0} has children; delete them first (no cascading delete)")]
    HasChildren(NodeId),
    #[error("invalid endpoint {0:?}: expected ip:port of at most 64 bytes")]
    BadEndpoint(String),
    #[error("permission bits {0:#x} are not defined")]
    UnknownPermissionBits(u32),
    #[error("an empty permission set grants or revokes nothing")]
    EmptyPermissions,
    #[error("the trust anchor's admin grant on the root cannot be revoked")]
    AnchorIsPermanent,
    #[error("the tree would be deeper than {} levels", limits::MAX_DEPTH)]
    TooDeep,
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
}

/// The tree state: nodes by id, plus indexes derived from them (rebuilt on load, never stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    anchor: PublicKey,
    nodes: BTreeMap<NodeId, Node>,
    /// parent -> children (derived).
    children: BTreeMap<NodeId, BTreeSet<NodeId>>,
    /// (parent, hostname) -> child (derived; hostnames are stored lowercase).
    names: BTreeMap<(NodeId, String), NodeId>,
    /// Nodes changed since the last `take_dirty` (for persistence).
    dirty: BTreeSet<NodeId>,
}

impl NodeId {
    /// The implicit root's id.
    pub const ROOT: NodeId = NodeId([0; 16]);

    /// The id of the node created by the op `(origin, seq)`. Unique because `(origin, seq)` names
    /// exactly one op of the log, and unpredictable before the origin appends the op, so nobody
    /// can squat an id (design note in docs/state-model.md).
    pub fn derive(origin: &PublicKey, seq: u64) -> NodeId {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"ln-node-id:v1");
        ctx.update(origin.as_bytes());
        ctx.update(&seq.to_be_bytes());
        let digest = ctx.finish();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest.as_ref()[..16]);
        NodeId(id)
    }
}

impl Permission {
    /// Every permission, in bit order.
    pub const ALL: [Permission; 14] = [
        Permission::Read,
        Permission::Write,
        Permission::AddChild,
        Permission::EditNode,
        Permission::DeleteNode,
        Permission::ExpandSubnet,
        Permission::ConnectPrivate,
        Permission::ConnectShared,
        Permission::RelayForward,
        Permission::StunRespond,
        Permission::RelayRegister,
        Permission::AllocateIp,
        Permission::RoutingCoordinate,
        Permission::Admin,
    ];

    /// The stable bit of this permission (Read = 1 ... RoutingCoordinate = 4096, Admin = 8192).
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// The stable name, as used in the reference system and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::AddChild => "add_child",
            Permission::EditNode => "edit_node",
            Permission::DeleteNode => "delete_node",
            Permission::ExpandSubnet => "expand_subnet",
            Permission::ConnectPrivate => "connect_private",
            Permission::ConnectShared => "connect_shared",
            Permission::RelayForward => "relay_forward",
            Permission::StunRespond => "stun_respond",
            Permission::RelayRegister => "relay_register",
            Permission::AllocateIp => "allocate_ip",
            Permission::RoutingCoordinate => "routing_coordinate",
            Permission::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown permission {s:?}"))
    }
}

impl Permissions {
    /// Every defined bit.
    pub const DEFINED: u32 = (1 << 14) - 1;
    pub const NONE: Permissions = Permissions(0);
    pub const ADMIN: Permissions = Permissions(1 << 13);

    pub fn of(perms: &[Permission]) -> Permissions {
        Permissions(perms.iter().fold(0, |acc, p| acc | p.bit()))
    }

    /// Whether this set allows `p` (admin allows everything).
    pub fn allows(self, p: Permission) -> bool {
        self.0 & (p.bit() | Permission::Admin.bit()) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The permissions in this set, in bit order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |p| self.0 & p.bit() != 0)
    }

    /// Comma-separated names, e.g. "read,allocate_ip".
    pub fn names(self) -> String {
        self.iter()
            .map(Permission::name)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// True for a valid DNS label: RFC 1035 letters-digits-hyphen, 1-63 characters, not starting or
/// ending with a hyphen. (A leading digit is allowed, as RFC 1123 relaxed it.)
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Which kinds may be children of which: the root and customers hold anything but a root;
/// endpoints, relays and servers are leaves.
pub fn may_contain(parent: NodeKind, child: NodeKind) -> bool {
    matches!(parent, NodeKind::Root | NodeKind::Customer) && child != NodeKind::Root
}

impl Tree {
    /// A tree with only the implicit root, owned by `anchor` with admin.
    pub fn new(anchor: PublicKey) -> Tree {
        let root = Node {
            id: NodeId::ROOT,
            parent: None,
            kind: NodeKind::Root,
            hostname: "root".to_string(),
            owner: Some(anchor),
            wg_pubkey: None,
            endpoint: None,
            metadata: BTreeMap::new(),
            grants: BTreeMap::from([(anchor, Permissions::ADMIN)]),
            created: Hlc::default(),
        };
        Tree::from_nodes(anchor, [root])
    }

    /// Rebuilds a tree (and its derived indexes) from stored nodes. The caller checks the result
    /// with [`Tree::check_invariants`].
    pub fn from_nodes(anchor: PublicKey, nodes: impl IntoIterator<Item = Node>) -> Tree {
        let mut tree = Tree {
            anchor,
            nodes: BTreeMap::new(),
            children: BTreeMap::new(),
            names: BTreeMap::new(),
            dirty: BTreeSet::new(),
        };
        for node in nodes {
            tree.insert(node);
        }
        tree.dirty.clear();
        tree
    }

    /// The trust anchor (root authority key).
    pub fn anchor(&self) -> &PublicKey {
        &self.anchor
    }

    pub fn get(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// Every node, by id (the persistent part of the tree).
    pub fn node_map(&self) -> &BTreeMap<NodeId, Node> {
        &self.nodes
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The children of `id`, in id order.
    pub fn children(&self, id: &NodeId) -> impl Iterator<Item = &Node> {
        self.children
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|c| self.nodes.get(c))
    }

    /// `id` and its ancestors up to the root, nearest first. Terminates because the tree has no
    /// cycles (an invariant); the length bound is a belt-and-braces guard.
    pub fn path_to_root(&self, id: &NodeId) -> impl Iterator<Item = &Node> {
        let mut next = self.nodes.get(id);
        let mut steps = 0usize;
        std::iter::from_fn(move || {
            let node = next?;
            steps += 1;
            if steps > self.nodes.len() {
                return None;
            }
            next = node.parent.and_then(|p| self.nodes.get(&p));
            Some(node)
        })
    }

    /// The depth of `id` (root = 0).
    pub fn depth(&self, id: &NodeId) -> usize {
        self.path_to_root(id).count().saturating_sub(1)
    }

    /// The number of levels in the subtree under `id` (a leaf has height 0).
    fn height(&self, id: &NodeId) -> usize {
        let mut height = 0;
        let mut level: Vec<NodeId> = vec![*id];
        while !level.is_empty() {
            level = level
                .iter()
                .flat_map(|n| self.children.get(n).into_iter().flatten().copied())
                .collect();
            if !level.is_empty() {
                height += 1;
            }
        }
        height
    }

    /// Node ids changed (created, updated or deleted) since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<NodeId> {
        std::mem::take(&mut self.dirty)
    }

    /// Marks every node dirty (the first persistence after `new` writes every row).
    pub fn mark_all_dirty(&mut self) {
        self.dirty.extend(self.nodes.keys().copied());
    }

    /// Applies `op`, already authorized, created by the op `(origin, seq)` at `hlc`. Checks every
    /// invariant first and changes nothing when it returns an error.
    pub fn apply(
        &mut self,
        op: &TreeOp,
        origin: &PublicKey,
        seq: u64,
        hlc: Hlc,
    ) -> Result<(), TreeError> {
        match op {
            TreeOp::Create {
                parent,
                kind,
                hostname,
                owner,
                wg_pubkey,
            } => {
                let id = NodeId::derive(origin, seq);
                let hostname = self.check_create(id, parent, *kind, hostname)?;
                self.insert(Node {
                    id,
                    parent: Some(*parent),
                    kind: *kind,
                    hostname,
                    owner: *owner,
                    wg_pubkey: *wg_pubkey,
                    endpoint: None,
                    metadata: BTreeMap::new(),
                    grants: BTreeMap::new(),
                    created: hlc,
                });
            }
            TreeOp::Update { node, field } => {
                let updated = self.check_update(node, field)?;
                self.replace(updated);
            }
            TreeOp::Move { node, new_parent } => {
                let moved = self.check_move(node, new_parent)?;
                self.remove(node);
                self.insert(moved);
            }
            TreeOp::Delete { node } => {
                self.check_delete(node)?;
                self.remove(node);
            }
            TreeOp::Grant {
                node,
                key,
                permissions,
            } => {
                let mut updated = self.existing(node)?.clone();
                check_permission_bits(*permissions)?;
                let current = updated.grants.get(key).copied().unwrap_or_default();
                if !updated.grants.contains_key(key)
                    && updated.grants.len() >= limits::MAX_GRANTS_PER_NODE
                {
                    return Err(TreeError::Limit("grants per node"));
                }
                updated
                    .grants
                    .insert(*key, Permissions(current.0 | permissions.0));
                self.replace(updated);
            }
            TreeOp::Revoke {
                node,
                key,
                permissions,
            } => {
                let mut updated = self.existing(node)?.clone();
                check_permission_bits(*permissions)?;
                if *node == NodeId::ROOT
                    && *key == self.anchor
                    && permissions.0 & Permissions::ADMIN.0 != 0
                {
                    return Err(TreeError::AnchorIsPermanent);
                }
                if let Some(current) = updated.grants.get(key).copied() {
                    let left = Permissions(current.0 & !permissions.0);
                    if left.is_empty() {
                        updated.grants.remove(key);
                    } else {
                        updated.grants.insert(*key, left);
                    }
                }
                self.replace(updated);
            }
        }
        Ok(())
    }

    /// Checks every structural invariant of the whole tree (used by tests and after loading).
    pub fn check_invariants(&self) -> Result<(), String> {
        let roots: Vec<_> = self.nodes.values().filter(|n| n.parent.is_none()).collect();
        if roots.len() != 1 || roots[0].id != NodeId::ROOT || roots[0].kind != NodeKind::Root {
            return Err(format!("expected exactly one root, found {}", roots.len()));
        }
        if !self.nodes[&NodeId::ROOT]
            .grants
            .get(&self.anchor)
            .is_some_and(|g| g.allows(Permission::Admin))
        {
            return Err("the trust anchor lost admin on the root".into());
        }
        if self.nodes.len() > limits::MAX_NODES {
            return Err("too many nodes".into());
        }
        let mut seen_names = BTreeSet::new();
        for node in self.nodes.values() {
            if node.kind == NodeKind::Root && node.id != NodeId::ROOT {
                return Err(format!("second root {}", node.id));
            }
            if let Some(parent) = node.parent {
                let Some(p) = self.nodes.get(&parent) else {
                    return Err(format!("node {} has a missing parent {parent}", node.id));
                };
                if !may_contain(p.kind, node.kind) {
                    return Err(format!("node {} placed under a {:?}", node.id, p.kind));
                }
                if !seen_names.insert((parent, node.hostname.clone())) {
                    return Err(format!(
                        "duplicate hostname {:?} under {parent}",
                        node.hostname
                    ));
                }
            }
            // Every node reaches the root: no cycles.
            if self.path_to_root(&node.id).last().map(|n| n.id) != Some(NodeId::ROOT) {
                return Err(format!("node {} does not reach the root (cycle)", node.id));
            }
            if self.depth(&node.id) > limits::MAX_DEPTH {
                return Err(format!("node {} is too deep", node.id));
            }
            if !is_dns_label(&node.hostname) || node.hostname != node.hostname.to_ascii_lowercase()
            {
                return Err(format!("bad hostname {:?}", node.hostname));
            }
            if self.children.get(&node.id).map_or(0, BTreeSet::len) > limits::MAX_CHILDREN {
                return Err(format!("node {} has too many children", node.id));
            }
            if node.grants.len() > limits::MAX_GRANTS_PER_NODE {
                return Err(format!("node {} has too many grants", node.id));
            }
            check_metadata(&node.metadata).map_err(|e| format!("node {}: {e}", node.id))?;
        }
        Ok(())
    }

    // ---- validation (no mutation) ----

    fn existing(&self, id: &NodeId) -> Result<&Node, TreeError> {
        self.nodes.get(id).ok_or(TreeError::NoSuchNode(*id))
    }

    /// Checks a new child's hostname under `parent`; returns it normalized (lowercase).
    fn check_hostname(
        &self,
        parent: &NodeId,
        hostname: &str,
        this: Option<&NodeId>,
    ) -> Result<String, TreeError> {
        if !is_dns_label(hostname) {
            return Err(TreeError::BadHostname(hostname.chars().take(80).collect()));
        }
        let lower = hostname.to_ascii_lowercase();
        match self.names.get(&(*parent, lower.clone())) {
            Some(holder) if Some(holder) != this => Err(TreeError::HostnameTaken {
                parent: *parent,
                hostname: lower,
            }),
            _ => Ok(lower),
        }
    }

    fn check_placement(&self, parent: &NodeId, kind: NodeKind) -> Result<(), TreeError> {
        let p = self.existing(parent)?;
        if !may_contain(p.kind, kind) {
            return Err(TreeError::BadPlacement {
                parent: p.kind,
                child: kind,
            });
        }
        if self.children.get(parent).map_or(0, BTreeSet::len) >= limits::MAX_CHILDREN {
            return Err(TreeError::Limit("children per node"));
        }
        Ok(())
    }

    fn check_create(
        &self,
        id: NodeId,
        parent: &NodeId,
        kind: NodeKind,
        hostname: &str,
    ) -> Result<String, TreeError> {
        if kind == NodeKind::Root {
            return Err(TreeError::RootIsFixed);
        }
        if self.nodes.contains_key(&id) {
            return Err(TreeError::NodeExists(id));
        }
        if self.nodes.len() >= limits::MAX_NODES {
            return Err(TreeError::Limit("nodes in the tree"));
        }
        self.check_placement(parent, kind)?;
        if self.depth(parent) + 1 > limits::MAX_DEPTH {
            return Err(TreeError::TooDeep);
        }
        self.check_hostname(parent, hostname, None)
    }

    /// Returns the node as it would be after the update.
    fn check_update(&self, id: &NodeId, field: &NodeField) -> Result<Node, TreeError> {
        let mut node = self.existing(id)?.clone();
        match field {
            NodeField::Hostname(h) => {
                node.hostname = match node.parent {
                    Some(parent) => self.check_hostname(&parent, h, Some(id))?,
                    None => {
                        if !is_dns_label(h) {
                            return Err(TreeError::BadHostname(h.chars().take(80).collect()));
                        }
                        h.to_ascii_lowercase()
                    }
                }
            }
            NodeField::Owner(k) => node.owner = *k,
            NodeField::WgPublicKey(k) => node.wg_pubkey = *k,
            NodeField::Endpoint(e) => {
                if let Some(e) = e {
                    let ok = e.len() <= limits::MAX_ENDPOINT_BYTES
                        && e.parse::<std::net::SocketAddr>().is_ok();
                    if !ok {
                        return Err(TreeError::BadEndpoint(e.chars().take(80).collect()));
                    }
                }
                node.endpoint = e.clone();
            }
            NodeField::Metadata { key, value } => {
                match value {
                    Some(v) => node.metadata.insert(key.clone(), v.clone()),
                    None => node.metadata.remove(key),
                };
                check_metadata(&node.metadata).map_err(TreeError::Limit)?;
            }
        }
        Ok(node)
    }

    /// Returns the node as it would be after the move.
    fn check_move(&self, id: &NodeId, new_parent: &NodeId) -> Result<Node, TreeError> {
        if *id == NodeId::ROOT {
            return Err(TreeError::RootIsFixed);
        }
        let mut node = self.existing(id)?.clone();
        self.check_placement(new_parent, node.kind)?;
        // The new parent must not be the node itself or one of its descendants.
        if self.path_to_root(new_parent).any(|n| n.id == *id) {
            return Err(TreeError::Cycle(*id));
        }
        if self.depth(new_parent) + 1 + self.height(id) > limits::MAX_DEPTH {
            return Err(TreeError::TooDeep);
        }
        node.hostname = self.check_hostname(new_parent, &node.hostname, Some(id))?;
        node.parent = Some(*new_parent);
        Ok(node)
    }

    fn check_delete(&self, id: &NodeId) -> Result<(), TreeError> {
        if *id == NodeId::ROOT {
            return Err(TreeError::RootIsFixed);
        }
        self.existing(id)?;
        if self.children.get(id).is_some_and(|c| !c.is_empty()) {
            return Err(TreeError::HasChildren(*id));
        }
        Ok(())
    }

    // ---- mutation (only after validation) ----

    fn insert(&mut self, node: Node) {
        if let Some(parent) = node.parent {
            self.children.entry(parent).or_default().insert(node.id);
            self.names.insert((parent, node.hostname.clone()), node.id);
        }
        self.dirty.insert(node.id);
        self.nodes.insert(node.id, node);
    }

    fn remove(&mut self, id: &NodeId) {
        if let Some(node) = self.nodes.remove(id) {
            if let Some(parent) = node.parent {
                if let Some(siblings) = self.children.get_mut(&parent) {
                    siblings.remove(id);
                    if siblings.is_empty() {
                        self.children.remove(&parent);
                    }
                }
                self.names.remove(&(parent, node.hostname));
            }
            self.dirty.insert(*id);
        }
    }

    /// Replaces a node in place (same parent), keeping the name index right.
    fn replace(&mut self, node: Node) {
        self.remove(&node.id);
        self.insert(node);
    }
}

fn check_permission_bits(p: Permissions) -> Result<(), TreeError> {
    if p.0 & !Permissions::DEFINED != 0 {
        return Err(TreeError::UnknownPermissionBits(
            p.0 & !Permissions::DEFINED,
        ));
    }
    if p.is_empty() {
        return Err(TreeError::EmptyPermissions);
    }
    Ok(())
}

fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), &'static str> {
    if m.len() > limits::MAX_METADATA_ENTRIES {
        return Err("metadata entries per node");
    }
    if m.keys()
        .any(|k| k.is_empty() || k.len() > limits::MAX_METADATA_KEY_BYTES)
    {
        return Err("metadata key length (1-64 bytes)");
    }
    if m.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > limits::MAX_METADATA_BYTES {
        return Err("metadata bytes per node");
    }
    Ok(())
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Serde for fixed-size byte arrays as CBOR byte strings (like `PublicKey`).
mod fixed_bytes {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    pub fn serialize<S: Serializer, const N: usize>(b: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> de::Visitor<'_> for V<N> {
            type Value = [u8; N];
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of exactly {N} bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<[u8; N], E> {
                v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V::<N>)
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fixed_bytes::serialize(&self.0, s)
    }
}
impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fixed_bytes::deserialize(d).map(NodeId)
    }
}
impl Serialize for WgKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fixed_bytes::serialize(&self.0, s)
    }
}
impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fixed_bytes::deserialize(d).map(WgKey)
    }
}
impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64::Engine;
        write!(
            f,
            "WgKey({})",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANCHOR: PublicKey = PublicKey([1; 32]);
    const ORIGIN: PublicKey = PublicKey([2; 32]);

    /// Applies a create as op (ORIGIN, seq) and returns the new node's id.
    fn create(
        tree: &mut Tree,
        seq: u64,
        parent: NodeId,
        kind: NodeKind,
        name: &str,
    ) -> Result<NodeId, TreeError> {
        let op = TreeOp::Create {
            parent,
            kind,
            hostname: name.into(),
            owner: None,
            wg_pubkey: None,
        };
        tree.apply(
            &op,
            &ORIGIN,
            seq,
            Hlc {
                wall_ms: seq,
                logical: 0,
            },
        )?;
        Ok(NodeId::derive(&ORIGIN, seq))
    }

    fn apply(tree: &mut Tree, op: TreeOp) -> Result<(), TreeError> {
        tree.apply(&op, &ORIGIN, 999, Hlc::default())
    }

    #[test]
    fn new_tree_has_one_root_owned_by_the_anchor() {
        let tree = Tree::new(ANCHOR);
        assert_eq!(tree.len(), 1);
        let root = tree.get(&NodeId::ROOT).expect("root");
        assert_eq!(root.kind, NodeKind::Root);
        assert_eq!(root.grants.get(&ANCHOR), Some(&Permissions::ADMIN));
        tree.check_invariants().expect("invariants");
    }

    #[test]
    fn permission_bits_are_stable() {
        assert_eq!(Permission::Read.bit(), 1);
        assert_eq!(Permission::AllocateIp.bit(), 2048);
        assert_eq!(Permission::RoutingCoordinate.bit(), 4096);
        assert_eq!(Permission::Admin.bit(), 8192);
        assert!(Permissions::ADMIN.allows(Permission::DeleteNode));
        assert!(!Permissions::of(&[Permission::Read]).allows(Permission::Write));
        assert_eq!(
            "allocate_ip".parse::<Permission>(),
            Ok(Permission::AllocateIp)
        );
        assert_eq!(
            Permissions::of(&[Permission::Read, Permission::AllocateIp]).names(),
            "read,allocate_ip"
        );
    }

    #[test]
    fn node_ids_differ_per_op_and_never_equal_the_root() {
        let a = NodeId::derive(&ORIGIN, 1);
        assert_ne!(a, NodeId::derive(&ORIGIN, 2));
        assert_ne!(a, NodeId::derive(&ANCHOR, 1));
        assert_ne!(a, NodeId::ROOT);
        assert_eq!(a, NodeId::derive(&ORIGIN, 1), "deterministic");
    }

    #[test]
    fn dns_labels() {
        for ok in ["a", "web-1", "1host", "A", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a.b", "a_b", "é", " a", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn hostnames_are_unique_among_siblings_case_insensitively() {
        let mut tree = Tree::new(ANCHOR);
        let acme = create(&mut tree, 1, NodeId::ROOT, NodeKind::Customer, "Acme").expect("create");
        assert_eq!(
            tree.get(&acme).expect("node").hostname,
            "acme",
            "stored lowercase"
        );
        assert!(matches!(
            create(&mut tree, 2, NodeId::ROOT, NodeKind::Customer, "ACME"),
            Err(TreeError::HostnameTaken { .. })
        ));
        // The same name under another parent is fine.
        create(&mut tree, 3, acme, NodeKind::Customer, "acme").expect("nested same name");
        assert!(matches!(
            create(&mut tree, 4, acme, NodeKind::Endpoint, "bad_name"),
            Err(TreeError::BadHostname(_))
        ));
        // Renaming onto a sibling's name is refused; renaming to itself (other case) is fine.
        let other =
            create(&mut tree, 5, NodeId::ROOT, NodeKind::Customer, "other").expect("create");
        assert!(matches!(
            apply(
                &mut tree,
                TreeOp::Update {
                    node: other,
                    field: NodeField::Hostname("acme".into())
                }
            ),
            Err(TreeError::HostnameTaken { .. })
        ));
        apply(
            &mut tree,
            TreeOp::Update {
                node: other,
                field: NodeField::Hostname("OTHER".into()),
            },
        )
        .expect("rename to itself");
        tree.check_invariants().expect("invariants");
    }

    #[test]
    fn placement_rules() {
        let mut tree = Tree::new(ANCHOR);
        let ep = create(&mut tree, 1, NodeId::ROOT, NodeKind::Endpoint, "ep")
            .expect("endpoint under root");
        assert!(matches!(
            create(&mut tree, 2, ep, NodeKind::Endpoint, "child"),
            Err(TreeError::BadPlacement { .. })
        ));
        assert!(matches!(
            create(&mut tree, 3, NodeId::ROOT, NodeKind::Root, "root2"),
            Err(TreeError::RootIsFixed)
        ));
        assert!(matches!(
            create(&mut tree, 4, NodeId([9; 16]), NodeKind::Customer, "orphan"),
            Err(TreeError::NoSuchNode(_))
        ));
        assert_eq!(tree.len(), 2);
    }

    #[test]
    fn delete_refuses_nodes_with_children_and_the_root() {
        let mut tree = Tree::new(ANCHOR);
        let c = create(&mut tree, 1, NodeId::ROOT, NodeKind::Customer, "c").expect("create");
        let e = create(&mut tree, 2, c, NodeKind::Endpoint, "e").expect("create");
        assert_eq!(
            apply(&mut tree, TreeOp::Delete { node: c }),
            Err(TreeError::HasChildren(c))
        );
        assert_eq!(
            apply(&mut tree, TreeOp::Delete { node: NodeId::ROOT }),
            Err(TreeError::RootIsFixed)
        );
        apply(&mut tree, TreeOp::Delete { node: e }).expect("leaf");
        apply(&mut tree, TreeOp::Delete { node: c }).expect("now empty");
        assert_eq!(tree.len(), 1);
        tree.check_invariants().expect("invariants");
    }

    #[test]
    fn moving_under_own_descendant_is_a_cycle() {
        let mut tree = Tree::new(ANCHOR);
        let a = create(&mut tree, 1, NodeId::ROOT, NodeKind::Customer, "a").expect("create");
        let b = create(&mut tree, 2, a, NodeKind::Customer, "b").expect("create");
        assert_eq!(
            apply(
                &mut tree,
                TreeOp::Move {
                    node: a,
                    new_parent: b
                }
            ),
            Err(TreeError::Cycle(a))
        );
        assert_eq!(
            apply(
                &mut tree,
                TreeOp::Move {
                    node: a,
                    new_parent: a
                }
            ),
            Err(TreeError::Cycle(a))
        );
        apply(
            &mut tree,
            TreeOp::Move {
                node: b,
                new_parent: NodeId::ROOT,
            },
        )
        .expect("move up");
        assert_eq!(tree.get(&b).expect("b").parent, Some(NodeId::ROOT));
        assert_eq!(tree.children(&a).count(), 0);
        tree.check_invariants().expect("invariants");
    }

    #[test]
    fn depth_is_bounded() {
        let mut tree = Tree::new(ANCHOR);
        let mut parent = NodeId::ROOT;
        for seq in 1..=limits::MAX_DEPTH as u64 {
            parent = create(&mut tree, seq, parent, NodeKind::Customer, "n").expect("within depth");
        }
        assert_eq!(
            create(&mut tree, 100, parent, NodeKind::Customer, "n"),
            Err(TreeError::TooDeep)
        );
        // Moving a 2-level subtree under the deepest node is refused as well.
        let top = create(&mut tree, 101, NodeId::ROOT, NodeKind::Customer, "top").expect("create");
        create(&mut tree, 102, top, NodeKind::Customer, "kid").expect("create");
        assert_eq!(
            apply(
                &mut tree,
                TreeOp::Move {
                    node: top,
                    new_parent: parent
                }
            ),
            Err(TreeError::TooDeep)
        );
        tree.check_invariants().expect("invariants");
    }

    #[test]
    fn grants_and_revokes() {
        let mut tree = Tree::new(ANCHOR);
        let key = PublicKey([5; 32]);
        let read = Permissions::of(&[Permission::Read]);
        let rw = Permissions::of(&[Permission::Read, Permission::Write]);
        apply(
            &mut tree,
            TreeOp::Grant {
                node: NodeId::ROOT,
                key,
                permissions: rw,
            },
        )
        .expect("grant");
        apply(
            &mut tree,
            TreeOp::Revoke {
                node: NodeId::ROOT,
                key,
                permissions: Permissions::of(&[Permission::Write]),
            },
        )
        .expect("revoke");
        assert_eq!(
            tree.get(&NodeId::ROOT).expect("root").grants.get(&key),
            Some(&read)
        );
        apply(
            &mut tree,
            TreeOp::Revoke {
                node: NodeId::ROOT,
                key,
                permissions: read,
            },
        )
        .expect("revoke");
        assert!(
            !tree
                .get(&NodeId::ROOT)
                .expect("root")
                .grants
                .contains_key(&key),
            "empty grant removed"
        );
        assert_eq!(
            apply(
                &mut tree,
                TreeOp::Revoke {
                    node: NodeId::ROOT,
                    key: ANCHOR,
                    permissions: Permissions::ADMIN
                }
            ),
            Err(TreeError::AnchorIsPermanent)
        );
        assert_eq!(
            apply(
                &mut tree,
                TreeOp::Grant {
                    node: NodeId::ROOT,
                    key,
                    permissions: Permissions(1 << 20)
                }
            ),
            Err(TreeError::UnknownPermissionBits(1 << 20))
        );
        for i in 0..limits::MAX_GRANTS_PER_NODE as u8 - 1 {
            let k = PublicKey([100 + i; 32]);
            apply(
                &mut tree,
                TreeOp::Grant {
                    node: NodeId::ROOT,
                    key: k,
                    permissions: read,
                },
            )
            .expect("grant");
        }
        assert_eq!(
            apply(
                &mut tree,
                TreeOp::Grant {
                    node: NodeId::ROOT,
                    key,
                    permissions: read
                }
            ),
            Err(TreeError::Limit("grants per node"))
        );
        tree.check_invariants().expect("invariants");
    }

    #[test]
    fn metadata_and_endpoint_are_bounded() {
        let mut tree = Tree::new(ANCHOR);
        let e = create(&mut tree, 1, NodeId::ROOT, NodeKind::Endpoint, "e").expect("create");
        let set = |k: &str, v: &str| TreeOp::Update {
            node: e,
            field: NodeField::Metadata {
                key: k.into(),
                value: Some(v.into()),
            },
        };
        apply(&mut tree, set("region", "eu-west")).expect("small metadata");
        assert!(matches!(
            apply(&mut tree, set("big", &"v".repeat(3000))),
            Err(TreeError::Limit(_))
        ));
        assert!(matches!(
            apply(&mut tree, set("", "x")),
            Err(TreeError::Limit(_))
        ));
        let endpoint = |s: &str| TreeOp::Update {
            node: e,
            field: NodeField::Endpoint(Some(s.into())),
        };
        apply(&mut tree, endpoint("198.51.100.7:51940")).expect("ip:port");
        apply(&mut tree, endpoint("[2001:db8::1]:51940")).expect("v6 ip:port");
        assert!(matches!(
            apply(&mut tree, endpoint("example.com:1")),
            Err(TreeError::BadEndpoint(_))
        ));
        tree.check_invariants().expect("invariants");
    }

    #[test]
    fn ops_round_trip_through_cbor_with_stable_names() {
        let op = TreeOp::Grant {
            node: NodeId([3; 16]),
            key: ANCHOR,
            permissions: Permissions(5),
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&op, &mut buf).expect("encode");
        let back: TreeOp = ciborium::from_reader(&buf[..]).expect("decode");
        assert_eq!(back, op);
        let v: ciborium::Value = ciborium::from_reader(&buf[..]).expect("value");
        let text = format!("{v:?}");
        for name in ["grant", "node", "key", "permissions"] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }
}
