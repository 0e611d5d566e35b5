//! Views of the state for the offline admin CLI: text like `innernet list --tree`, and serde
//! structs for `--json` (flat lists with parent ids; no nesting, so any depth serializes).

use std::fmt::Write;

use serde::Serialize;

use super::State;
use crate::ipam::SubnetPool;
use crate::tree::{Node, NodeId};

/// `lemonade-nexus tree show`: one line per node, indented under its parent:
///
/// ```text
/// root  [root]
/// └── acme  [customer]  private 10.128.0.0/24
///     ├── laptop  [endpoint]  10.64.0.10 fd6c:6e00::a
///     └── phone  [endpoint]  10.64.0.11 fd6c:6e00::b
/// ```
pub fn render_tree(state: &State) -> String {
    let mut out = String::new();
    if let Some(root) = state.tree().get(&NodeId::ROOT) {
        let _ = writeln!(out, "{}", node_line(state, root));
        render_children(state, &NodeId::ROOT, "", &mut out);
    }
    // The servers the cluster root admitted or revoked (nothing before the first admission).
    let servers = server_views(state);
    if !servers.is_empty() {
        let _ = writeln!(out, "servers ({}):", servers.len());
        for s in &servers {
            let _ = write!(out, "  {}  {}  {}", s.name, s.key, s.status);
            if let Some(r) = &s.revoke_reason {
                let _ = write!(out, " ({r})");
            }
            let _ = writeln!(out);
        }
    }
    out
}

/// One server of the trust table, for `tree show`.
#[derive(Debug, Serialize)]
pub struct ServerView {
    pub key: String,
    pub name: String,
    /// `active` or `revoked` (`revoked` also for a key revoked before it was ever admitted).
    pub status: &'static str,
    pub admitted_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    pub revoke_reason: Option<String>,
}

fn server_views(state: &State) -> Vec<ServerView> {
    state
        .trust()
        .map()
        .iter()
        .map(|(k, s)| ServerView {
            key: k.to_string(),
            name: s.name.clone(),
            status: if s.revoked.is_some() {
                "revoked"
            } else {
                "active"
            },
            admitted_at_ms: s.admitted.map(|h| h.wall_ms),
            revoked_at_ms: s.revoked.map(|h| h.wall_ms),
            revoke_reason: s
                .revoked
                .is_some()
                .then(|| s.revoke_reason.clone())
                .filter(|r| !r.is_empty()),
        })
        .collect()
}

/// Depth is bounded by `tree::limits::MAX_DEPTH`, so this recursion is shallow.
fn render_children(state: &State, parent: &NodeId, prefix: &str, out: &mut String) {
    let mut children: Vec<&Node> = state.tree().children(parent).collect();
    children.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    let count = children.len();
    for (i, child) in children.into_iter().enumerate() {
        let last = i + 1 == count;
        let (branch, indent) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        let _ = writeln!(out, "{prefix}{branch}{}", node_line(state, child));
        render_children(state, &child.id, &format!("{prefix}{indent}"), out);
    }
}

fn node_line(state: &State, node: &Node) -> String {
    let kind = serde_json::to_value(node.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut line = format!("{}  [{kind}]", node.hostname);
    let ipam = state.ipam();
    if let Some(a) = ipam.tunnel_address(&node.id) {
        let _ = write!(line, "  {} {}", a.v4, a.v6);
    }
    if let Some(b) = ipam.backbone_address(&node.id) {
        let _ = write!(line, "  backbone {b}");
    }
    if let Some(s) = ipam.subnet(SubnetPool::Private, &node.id) {
        let _ = write!(line, "  private {s}");
    }
    if let Some(s) = ipam.subnet(SubnetPool::Shared, &node.id) {
        let _ = write!(line, "  shared {s}");
    }
    line
}

/// `lemonade-nexus ipam show`: the pools, then every block, lease, subnet and backbone address.
pub fn render_ipam(state: &State) -> String {
    let view = ipam_view(state);
    let mut out = String::new();
    let c = &view.config;
    let _ = writeln!(
        out,
        "tunnel {} + {} (blocks of /{}, grace {} ms); private {}; shared {}; backbone {}",
        c.tunnel_v4, c.tunnel_v6, c.block_len, c.reuse_grace_ms, c.private, c.shared, c.backbone
    );
    let _ = writeln!(out, "blocks ({}):", view.blocks.len());
    for b in &view.blocks {
        let _ = writeln!(
            out,
            "  {}  held by {}  {} leased",
            b.prefix, b.holder, b.leased
        );
    }
    let _ = writeln!(out, "tunnel leases ({}):", view.leases.len());
    for l in &view.leases {
        let _ = writeln!(out, "  {} {}  {}  via {}", l.v4, l.v6, l.hostname, l.origin);
    }
    let _ = writeln!(out, "subnets ({}):", view.subnets.len());
    for s in &view.subnets {
        let _ = writeln!(out, "  {} {}  {}", s.pool, s.subnet, s.hostname);
    }
    let _ = writeln!(out, "backbone ({}):", view.backbone.len());
    for b in &view.backbone {
        let _ = writeln!(out, "  {}  {}", b.address, b.hostname);
    }
    let _ = writeln!(out, "quarantined ({}):", view.quarantine.len());
    for q in &view.quarantine {
        let _ = writeln!(out, "  {}  released at {}", q.v4, q.released);
    }
    out
}

/// JSON view of the tree: every node, flat, parents by id.
#[derive(Debug, Serialize)]
pub struct TreeView {
    pub anchor: String,
    pub nodes: Vec<NodeView>,
    /// The trust table: servers admitted or revoked by the cluster root.
    pub servers: Vec<ServerView>,
}

#[derive(Debug, Serialize)]
pub struct NodeView {
    pub id: String,
    pub parent: Option<String>,
    pub kind: crate::tree::NodeKind,
    pub hostname: String,
    pub owner: Option<String>,
    pub wg_pubkey: Option<String>,
    pub endpoint: Option<String>,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub grants: Vec<GrantView>,
    pub tunnel_v4: Option<String>,
    pub tunnel_v6: Option<String>,
    pub backbone: Option<String>,
    pub private_subnet: Option<String>,
    pub shared_subnet: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct GrantView {
    pub key: String,
    pub permissions: Vec<&'static str>,
}

pub fn tree_view(state: &State) -> TreeView {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let ipam = state.ipam();
    let nodes = state
        .tree()
        .nodes()
        .map(|n| {
            let tunnel = ipam.tunnel_address(&n.id);
            NodeView {
                id: n.id.to_string(),
                parent: n.parent.map(|p| p.to_string()),
                kind: n.kind,
                hostname: n.hostname.clone(),
                owner: n.owner.map(|k| k.to_string()),
                wg_pubkey: n.wg_pubkey.map(|k| b64(&k.0)),
                endpoint: n.endpoint.clone(),
                metadata: n.metadata.clone(),
                grants: n
                    .grants
                    .iter()
                    .map(|(k, p)| GrantView {
                        key: k.to_string(),
                        permissions: p.iter().map(|p| p.name()).collect(),
                    })
                    .collect(),
                tunnel_v4: tunnel.map(|a| a.v4.to_string()),
                tunnel_v6: tunnel.map(|a| a.v6.to_string()),
                backbone: ipam.backbone_address(&n.id).map(|a| a.to_string()),
                private_subnet: ipam
                    .subnet(SubnetPool::Private, &n.id)
                    .map(|s| s.to_string()),
                shared_subnet: ipam
                    .subnet(SubnetPool::Shared, &n.id)
                    .map(|s| s.to_string()),
            }
        })
        .collect();
    TreeView {
        anchor: state.tree().anchor().to_string(),
        nodes,
        servers: server_views(state),
    }
}

/// JSON view of the IPAM.
#[derive(Debug, Serialize)]
pub struct IpamView {
    pub config: ConfigView,
    pub blocks: Vec<BlockView>,
    pub leases: Vec<LeaseView>,
    pub subnets: Vec<SubnetView>,
    pub backbone: Vec<BackboneView>,
    pub quarantine: Vec<QuarantineView>,
}

#[derive(Debug, Serialize)]
pub struct ConfigView {
    pub tunnel_v4: String,
    pub tunnel_v6: String,
    pub block_len: u8,
    pub reuse_grace_ms: u64,
    pub private: String,
    pub shared: String,
    pub backbone: String,
}

#[derive(Debug, Serialize)]
pub struct BlockView {
    pub block: u32,
    pub prefix: String,
    pub holder: String,
    pub leased: usize,
}

#[derive(Debug, Serialize)]
pub struct LeaseView {
    pub node: String,
    pub hostname: String,
    pub v4: String,
    pub v6: String,
    pub origin: String,
    pub allocated: String,
}

#[derive(Debug, Serialize)]
pub struct SubnetView {
    pub pool: &'static str,
    pub node: String,
    pub hostname: String,
    pub subnet: String,
}

#[derive(Debug, Serialize)]
pub struct BackboneView {
    pub node: String,
    pub hostname: String,
    pub address: String,
}

#[derive(Debug, Serialize)]
pub struct QuarantineView {
    pub v4: String,
    pub v6: String,
    pub released: String,
}

pub fn ipam_view(state: &State) -> IpamView {
    let ipam = state.ipam();
    let data = ipam.data();
    let cfg = ipam.config();
    let hostname = |id: &NodeId| {
        state
            .tree()
            .get(id)
            .map(|n| n.hostname.clone())
            .unwrap_or_default()
    };
    let mut leased_per_block = std::collections::BTreeMap::<u32, usize>::new();
    for l in data.leases.values() {
        *leased_per_block.entry(cfg.block_of(l.slot)).or_default() += 1;
    }
    IpamView {
        config: ConfigView {
            tunnel_v4: cfg.tunnel_v4.to_string(),
            tunnel_v6: cfg.tunnel_v6.to_string(),
            block_len: cfg.block_len,
            reuse_grace_ms: cfg.reuse_grace_ms,
            private: cfg.private.to_string(),
            shared: cfg.shared.to_string(),
            backbone: cfg.backbone.to_string(),
        },
        blocks: data
            .blocks
            .iter()
            .map(|(b, c)| BlockView {
                block: *b,
                prefix: format!(
                    "{}/{}",
                    cfg.address_of(b * cfg.block_size()).v4,
                    cfg.block_len
                ),
                holder: c.holder.to_string(),
                leased: leased_per_block.get(b).copied().unwrap_or(0),
            })
            .collect(),
        leases: data
            .leases
            .iter()
            .map(|(n, l)| {
                let a = cfg.address_of(l.slot);
                LeaseView {
                    node: n.to_string(),
                    hostname: hostname(n),
                    v4: a.v4.to_string(),
                    v6: a.v6.to_string(),
                    origin: l.origin.to_string(),
                    allocated: l.allocated.to_string(),
                }
            })
            .collect(),
        subnets: data
            .subnets
            .iter()
            .map(|((pool, n), s)| SubnetView {
                pool: match pool {
                    SubnetPool::Private => "private",
                    SubnetPool::Shared => "shared",
                },
                node: n.to_string(),
                hostname: hostname(n),
                subnet: s.to_string(),
            })
            .collect(),
        backbone: data
            .backbone
            .keys()
            .filter_map(|n| {
                let address = ipam.backbone_address(n)?.to_string();
                Some(BackboneView {
                    node: n.to_string(),
                    hostname: hostname(n),
                    address,
                })
            })
            .collect(),
        quarantine: data
            .quarantine
            .iter()
            .map(|(slot, at)| {
                let a = cfg.address_of(*slot);
                QuarantineView {
                    v4: a.v4.to_string(),
                    v6: a.v6.to_string(),
                    released: at.to_string(),
                }
            })
            .collect(),
    }
}
