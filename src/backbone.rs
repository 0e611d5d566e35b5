//! The server backbone: a full mesh of WireGuard tunnels between the cluster's servers.
//!
//! Every server has a backbone address (172.16.0.0/22 by default, placed by the IPAM fold from a
//! hash of its key: [`IpamOp::JoinBackbone`]) and a second WireGuard interface, `ln-backbone`, on
//! its own port (51941/udp by default), separate from the client plane (`ln-client`, 51940). Why
//! a separate interface and port (see docs/backbone.md): the two planes have different peer sets
//! and allowed IPs, a server's key appears as a peer on the backbone of every other server while
//! clients see it on the client plane, and an operator can firewall, monitor or rate-limit the
//! backbone on its own. The WireGuard key is the server's one WireGuard identity key (the one its
//! server node carries in the tree), so nothing new has to be replicated for it.
//!
//! What is replicated, and by whom:
//! - each server appends, for its own server node, `JoinBackbone` (once) and an `Update` of its
//!   node's `endpoint` to `<public host>:<backbone port>` (whenever that changes): [`self_ops`];
//! - every server derives from the replicated state the backbone device it should have:
//!   [`backbone_device`]: one peer per *active* server other than itself that has a backbone
//!   address, a WireGuard key and an endpoint; allowed IPs that server's backbone `/32`.
//!
//! "Active" is [`State::is_active_server`] of the server node's owner: admitted by a server
//! certificate folded into the state and not revoked. A revocation also removes the server's
//! backbone address, so a revoked server leaves every other server's backbone at the next
//! reconcile.
//!
//! The IO ([`Backbone`]) is thin: create the interface through the dataplane crate (kernel or
//! userspace, the same backend as the client plane), put the backbone address with the prefix's
//! length on it (the kernel then routes the whole backbone prefix through it), and reconcile on
//! every state change (the same notification the client-plane reconciler gets) and every
//! [`POLL`] (ops replicated from other servers).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::{IpNet, Ipv4Net};
use lemonade_nexus_netlink::model::PrivateKey;
use lemonade_nexus_netlink::rtnl::{LinkConfig, Rtnl};
use lemonade_nexus_netlink::{DeviceConfig, Key, PeerConfig};
use tokio::sync::watch;

use crate::api::ApiState;
use crate::ipam::IpamOp;
use crate::keys::PublicKey;
use crate::op::OpBody;
use crate::server::Backend;
use crate::state::State;
use crate::store::Submitted;
use crate::tree::{NodeField, NodeId, NodeKind, Permission, TreeOp};

/// Default name of the backbone interface.
pub const DEFAULT_INTERFACE: &str = "ln-backbone";
/// MTU of the backbone interface (WireGuard's usual 1420).
pub const BACKBONE_MTU: u32 = 1420;
/// Routing table named in the link config (no routes go there: the interface address's prefix
/// routes the backbone).
pub const BACKBONE_TABLE: u32 = 51941;
/// Keepalive on backbone peers, so a NAT or stateful firewall between servers keeps the path
/// open in both directions.
pub const KEEPALIVE_SECS: u16 = 25;
/// How often the backbone is reconciled without a notification (replicated ops, drift).
pub const POLL: Duration = Duration::from_secs(2);

/// `serve` options of the backbone.
#[derive(clap::Args, Debug, Clone)]
pub struct BackboneArgs {
    /// Name of the server-backbone WireGuard interface (its port is listen.wg_backbone_port).
    /// Default: `ln-backbone` beside the default client interface, else the client interface's
    /// name with a `b` appended (so two servers on one host never share a UAPI socket name).
    #[arg(long, value_name = "IFNAME", env = "LEMONADE_NEXUS_BACKBONE_INTERFACE")]
    pub backbone_interface: Option<String>,
    /// Run without the backbone interface (one server alone, or API tests).
    #[arg(long)]
    pub no_backbone: bool,
}

/// Another server as the backbone sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackbonePeer {
    pub node: NodeId,
    pub hostname: String,
    pub server_key: PublicKey,
    pub wg_pubkey: [u8; 32],
    pub endpoint: SocketAddr,
    pub address: Ipv4Addr,
}

/// This server's node in the tree: the first-created server node it owns.
pub fn own_server_node(state: &State, me: &PublicKey) -> Option<NodeId> {
    state
        .tree()
        .nodes()
        .filter(|n| n.kind == NodeKind::Server && n.owner.as_ref() == Some(me))
        .min_by_key(|n| (n.created, n.id))
        .map(|n| n.id)
}

/// The other active servers that can be backbone peers (a backbone address, a WireGuard key and
/// a parseable endpoint), ordered by node creation. A WireGuard key or backbone address already
/// taken by an earlier server is skipped (the kernel would silently move the prefix). Pure.
pub fn backbone_peers(state: &State, me: &PublicKey) -> Vec<BackbonePeer> {
    let mut servers: Vec<_> = state
        .tree()
        .nodes()
        .filter(|n| n.kind == NodeKind::Server && n.owner.as_ref() != Some(me))
        .filter(|n| n.owner.is_some_and(|o| state.is_active_server(&o)))
        .collect();
    servers.sort_by_key(|n| (n.created, n.id));
    let own_wg = own_server_node(state, me)
        .and_then(|id| state.tree().get(&id))
        .and_then(|n| n.wg_pubkey);
    let mut keys = std::collections::BTreeSet::new();
    let mut addrs = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for n in servers {
        let (Some(owner), Some(wg), Some(address)) =
            (n.owner, n.wg_pubkey, state.ipam().backbone_address(&n.id))
        else {
            continue;
        };
        let Some(endpoint) = n.endpoint.as_deref().and_then(|e| e.parse().ok()) else {
            continue;
        };
        if Some(wg) == own_wg || !keys.insert(wg.0) || !addrs.insert(address) {
            tracing::warn!(node = %n.id, "backbone: WireGuard key or address already used; server skipped");
            continue;
        }
        out.push(BackbonePeer {
            node: n.id,
            hostname: n.hostname.clone(),
            server_key: owner,
            wg_pubkey: wg.0,
            endpoint,
            address,
        });
    }
    out
}

/// The backbone device this server should have. Pure.
pub fn backbone_device(
    state: &State,
    me: &PublicKey,
    private_key: PrivateKey,
    port: u16,
) -> DeviceConfig {
    DeviceConfig {
        private_key: Some(private_key),
        listen_port: Some(port),
        fwmark: None,
        peers: backbone_peers(state, me)
            .into_iter()
            .map(|p| PeerConfig {
                public_key: Key(p.wg_pubkey),
                preshared_key: None,
                endpoint: Some(p.endpoint),
                persistent_keepalive: Some(KEEPALIVE_SECS),
                allowed_ips: vec![IpNet::V4(Ipv4Net::from(p.address))],
            })
            .collect(),
    }
}

/// This server's backbone address with the backbone prefix's length (what goes on the
/// interface), once it has one. Pure.
pub fn own_address(state: &State, me: &PublicKey) -> Option<Ipv4Net> {
    let node = own_server_node(state, me)?;
    let a = state.ipam().backbone_address(&node)?;
    Ipv4Net::new(a, state.ipam().config().backbone.prefix_len()).ok()
}

/// The ops this server still has to append for its own node: `JoinBackbone` when it has no
/// backbone address, and its endpoint when the node's differs. Empty when there is nothing to do
/// or when the server cannot do it yet (no node, or not admitted: appending would only put
/// refused ops in the log). Pure.
pub fn self_ops(state: &State, me: &PublicKey, endpoint: Option<SocketAddr>) -> Vec<OpBody> {
    let Some(node) = own_server_node(state, me) else {
        return Vec::new();
    };
    let tree = state.tree();
    if crate::authz::authorize(tree, me, Permission::AllocateIp, node).is_err()
        || crate::authz::authorize(tree, me, Permission::Admin, node).is_err()
    {
        return Vec::new();
    }
    let mut ops = Vec::new();
    if state.ipam().backbone_address(&node).is_none() {
        ops.push(OpBody::Ipam(IpamOp::JoinBackbone { node }));
    }
    if let Some(e) = endpoint {
        let text = e.to_string();
        if tree.get(&node).and_then(|n| n.endpoint.as_deref()) != Some(text.as_str()) {
            ops.push(OpBody::Tree(TreeOp::Update {
                node,
                field: NodeField::Endpoint(Some(text)),
            }));
        }
    }
    ops
}

/// The backbone endpoint other servers use: the public host (an IP address, or a name resolved
/// once at start) and the backbone port. `None` when no public host is known (the server then
/// has no backbone endpoint: it is not a backbone peer of anyone).
pub fn resolve_endpoint(public_host: Option<&str>, port: u16) -> Option<SocketAddr> {
    let host = public_host?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    use std::net::ToSocketAddrs;
    (host, port).to_socket_addrs().ok()?.next()
}

/// The backbone interface's name for a server whose client-plane interface is `client_if`
/// (see [`BackboneArgs::backbone_interface`]).
pub fn interface_name(args: &BackboneArgs, client_if: &str) -> String {
    if let Some(n) = &args.backbone_interface {
        return n.clone();
    }
    if client_if == "ln-client" {
        return DEFAULT_INTERFACE.to_owned();
    }
    // Interface names are at most 15 bytes.
    let mut n: String = client_if.chars().take(14).collect();
    n.push('b');
    n
}

/// The backbone interface `status` dumps beside a server's client-plane interface `client_if`
/// (the default naming: an explicit `--backbone-interface` is not known to `status`).
pub fn status_interface(client_if: &str) -> String {
    let defaults = BackboneArgs {
        backbone_interface: None,
        no_backbone: false,
    };
    interface_name(&defaults, client_if)
}

/// Starts the backbone of `serve` (unless `--no-backbone`) on the client plane's backend and key.
pub async fn start(
    args: &crate::server::ServeArgs,
    cfg: &crate::config::Config,
    public_host: Option<&str>,
    backend: &Backend,
    private_key: &PrivateKey,
) -> Result<Option<Backbone>> {
    if args.backbone.no_backbone {
        return Ok(None);
    }
    let port = cfg.listen.wg_backbone_port;
    let ifname = interface_name(&args.backbone, &args.wg_interface);
    let endpoint = resolve_endpoint(public_host, port);
    Backbone::start(
        backend.clone(),
        &ifname,
        private_key.clone(),
        port,
        endpoint,
    )
    .await
    .map(Some)
}

/// Runs the backbone's reconciler (forever when there is no backbone, so a `select!` beside it
/// waits for its other branches).
pub async fn run(backbone: Option<Backbone>, state: Arc<ApiState>, changed: watch::Receiver<u64>) {
    match backbone {
        Some(b) => b.run(state, changed).await,
        None => std::future::pending().await,
    }
}

/// The running backbone of one server.
pub struct Backbone {
    backend: Backend,
    rtnl: Rtnl,
    ifname: String,
    private_key: PrivateKey,
    port: u16,
    endpoint: Option<SocketAddr>,
}

impl Backbone {
    /// Creates the backbone interface (if missing) with the client plane's backend.
    pub async fn start(
        backend: Backend,
        ifname: &str,
        private_key: PrivateKey,
        port: u16,
        endpoint: Option<SocketAddr>,
    ) -> Result<Backbone> {
        backend
            .ensure_device(ifname)
            .await
            .with_context(|| format!("cannot create the backbone WireGuard interface {ifname}"))?;
        if endpoint.is_none() {
            tracing::warn!(
                "backbone: no public host known (--public-host), so no backbone endpoint is published; other servers will not peer with this one"
            );
        }
        Ok(Backbone {
            backend,
            rtnl: Rtnl::connect()?,
            ifname: ifname.to_owned(),
            private_key,
            port,
            endpoint,
        })
    }

    /// One round: append this server's missing backbone ops, then make the device and the link
    /// equal to the state.
    pub async fn reconcile(&self, state: &ApiState) -> Result<()> {
        let desired = self.prepare(state)?;
        self.apply(desired).await
    }

    /// Appends this server's missing backbone ops and returns the device and link the state
    /// asks for (no I/O besides the store).
    fn prepare(&self, state: &ApiState) -> Result<(DeviceConfig, LinkConfig)> {
        let me = state.server.public();
        let desired = {
            let mut store = state.store.lock().unwrap_or_else(|p| p.into_inner());
            let ops = self_ops(store.state(), &me, self.endpoint);
            if !ops.is_empty() {
                let batch = ops.into_iter().map(|b| (me, b, None)).collect();
                for r in store.append_local_batch(&state.server, batch, now_ms())? {
                    match r? {
                        Submitted::Appended { effect: Err(e), .. } => {
                            tracing::warn!(error = %e, "backbone op refused")
                        }
                        _ => tracing::info!("backbone: own node updated (address or endpoint)"),
                    }
                }
                // With the store locked, so the new version names this state.
                state.state_changed();
            }
            self.desired(store.state(), &me)
        };
        Ok(desired)
    }

    /// The device and link this server's backbone should have in `state`.
    pub fn desired(&self, state: &State, me: &PublicKey) -> (DeviceConfig, LinkConfig) {
        let device = backbone_device(state, me, self.private_key.clone(), self.port);
        let link = LinkConfig {
            up: true,
            mtu: Some(BACKBONE_MTU),
            addresses: own_address(state, me).map(IpNet::V4).into_iter().collect(),
            routes: Vec::new(),
            table: BACKBONE_TABLE,
            rule_priority: None,
        };
        (device, link)
    }

    /// Makes the interface equal to `desired` (a minimal diff of peers, addresses and link).
    pub async fn apply(&self, (device, link): (DeviceConfig, LinkConfig)) -> Result<()> {
        let diff = self.backend.reconcile(&self.ifname, &device).await?;
        if !diff.is_empty() {
            tracing::info!(ifname = %self.ifname, peers = device.peers.len(), "backbone device reconciled");
        }
        let changes = self.rtnl.reconcile_link(&self.ifname, &link).await?;
        if !changes.is_empty() {
            tracing::info!(ifname = %self.ifname, ?changes, "backbone link reconciled");
        }
        Ok(())
    }

    /// Reconciles on every notification of `changed` and every [`POLL`]; never returns unless
    /// the notifier is gone. Every join notifies too, and joins rarely change the backbone: a
    /// notified round whose desired backbone equals what the last round applied does no I/O.
    /// A [`POLL`] round always dumps and diffs the device, which also corrects drift.
    async fn run(self, state: Arc<ApiState>, mut changed: watch::Receiver<u64>) {
        let mut applied: Option<(DeviceConfig, LinkConfig)> = None;
        let mut poll_round = true;
        loop {
            changed.borrow_and_update();
            let round = match self.prepare(&state) {
                Ok(desired) if !poll_round && applied.as_ref() == Some(&desired) => Ok(()),
                Ok(desired) => {
                    applied = None;
                    let r = self.apply(desired.clone()).await;
                    if r.is_ok() {
                        applied = Some(desired);
                    }
                    r
                }
                Err(e) => Err(e),
            };
            if let Err(e) = round {
                tracing::error!(error = %format!("{e:#}"), "backbone reconcile failed; retrying");
            }
            poll_round = tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        return;
                    }
                    false
                }
                _ = tokio::time::sleep(POLL) => true,
            };
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::identity::NodeKey;
    use crate::op::Op;
    use crate::tree::WgKey;
    use proptest::prelude::*;

    /// A state built by applying ops one by one: the anchor's, and each server's own admission.
    struct World {
        state: State,
        anchor: NodeKey,
        seq: u64,
    }

    impl World {
        fn new() -> World {
            let anchor = NodeKey::from_seed(&[200; 32]);
            World {
                state: State::new(anchor.public()),
                anchor,
                seq: 0,
            }
        }

        /// Applies `body` with `origin` as origin and author at the next HLC.
        fn apply_from(&mut self, origin: PublicKey, body: OpBody) -> NodeId {
            self.seq += 1;
            let op = Op {
                origin,
                seq: self.seq,
                hlc: Hlc {
                    wall_ms: 1_000 + self.seq,
                    logical: 0,
                },
                author: origin,
                body,
            };
            self.state.apply(&op).expect("applies");
            NodeId::derive(&origin, self.seq)
        }

        /// Applies `body` authored by the anchor; returns the (origin, seq) node id it would create.
        fn apply(&mut self, body: OpBody) -> NodeId {
            self.apply_from(self.anchor.public(), body)
        }

        /// Adds server `i`: its node, its admission with an anchor-signed certificate, and
        /// optionally its backbone address and endpoint.
        fn server(&mut self, i: u8, join: bool, endpoint: bool) -> (PublicKey, NodeId) {
            let key = NodeKey::from_seed(&[i; 32]).public();
            let node = self.apply(OpBody::Tree(TreeOp::Create {
                parent: NodeId::ROOT,
                kind: NodeKind::Server,
                hostname: format!("srv{i}"),
                owner: Some(key),
                wg_pubkey: Some(WgKey([i; 32])),
            }));
            let cert = crate::trust::seal_server_cert(
                self.anchor.pair(),
                &crate::trust::ServerCert {
                    server: key,
                    name: format!("srv{i}"),
                    issued_at_ms: 1,
                    expires_at_ms: 0,
                },
            );
            self.apply_from(
                key,
                OpBody::Trust(crate::trust::TrustOp::AdmitServer { cert }),
            );
            if join {
                self.apply(OpBody::Ipam(IpamOp::JoinBackbone { node }));
            }
            if endpoint {
                self.apply(OpBody::Tree(TreeOp::Update {
                    node,
                    field: NodeField::Endpoint(Some(format!("192.0.2.{i}:51941"))),
                }));
            }
            (key, node)
        }

        /// Revokes server `key` with an anchor-signed revocation carried by the anchor.
        fn revoke(&mut self, key: PublicKey) {
            let revocation = crate::trust::seal_revocation(
                self.anchor.pair(),
                &crate::trust::Revocation {
                    server: key,
                    issued_at_ms: 2,
                    reason: "test".into(),
                },
            );
            self.apply(OpBody::Trust(crate::trust::TrustOp::RevokeServer {
                revocation,
            }));
        }
    }

    fn device(w: &World, me: &PublicKey) -> DeviceConfig {
        backbone_device(&w.state, me, PrivateKey(Key([7; 32])), 51941)
    }

    #[test]
    fn one_peer_per_other_ready_server_with_its_backbone_address() {
        let mut w = World::new();
        let (me, _) = w.server(1, true, true);
        let (_, b) = w.server(2, true, true);
        let (_, c) = w.server(3, true, true);
        w.server(4, false, true); // no backbone address yet
        w.server(5, true, false); // no endpoint yet
        let dev = device(&w, &me);
        assert_eq!(dev.listen_port, Some(51941));
        let keys: Vec<_> = dev.peers.iter().map(|p| p.public_key.0[0]).collect();
        assert_eq!(keys, vec![2, 3], "only servers 2 and 3 are ready; never me");
        for (p, node) in dev.peers.iter().zip([b, c]) {
            let a = w.state.ipam().backbone_address(&node).expect("address");
            assert_eq!(p.allowed_ips, vec![IpNet::V4(Ipv4Net::from(a))]);
            assert_eq!(p.persistent_keepalive, Some(KEEPALIVE_SECS));
            assert!(w.state.ipam().config().backbone.contains(&a));
        }
        assert_eq!(
            dev.peers[0].endpoint,
            Some("192.0.2.2:51941".parse().expect("addr"))
        );
    }

    #[test]
    fn a_revoked_server_leaves_the_backbone() {
        let mut w = World::new();
        let (me, _) = w.server(1, true, true);
        let (k2, _) = w.server(2, true, true);
        w.server(3, true, true);
        assert_eq!(device(&w, &me).peers.len(), 2);
        w.revoke(k2);
        let dev = device(&w, &me);
        assert_eq!(dev.peers.len(), 1);
        assert_eq!(dev.peers[0].public_key.0[0], 3);
    }

    #[test]
    fn self_ops_join_once_and_follow_the_endpoint() {
        let mut w = World::new();
        let (me, node) = w.server(1, false, false);
        let e: SocketAddr = "198.51.100.1:51941".parse().expect("addr");
        let ops = self_ops(&w.state, &me, Some(e));
        assert_eq!(ops.len(), 2);
        for op in ops {
            w.apply(op);
        }
        assert!(self_ops(&w.state, &me, Some(e)).is_empty(), "idempotent");
        assert!(own_address(&w.state, &me).is_some_and(|a| a.prefix_len() == 22));
        let moved: SocketAddr = "198.51.100.9:51941".parse().expect("addr");
        assert_eq!(
            self_ops(&w.state, &me, Some(moved)),
            vec![OpBody::Tree(TreeOp::Update {
                node,
                field: NodeField::Endpoint(Some(moved.to_string())),
            })]
        );
        // Not admitted (no admin grant): nothing to append.
        let stranger = NodeKey::from_seed(&[9; 32]).public();
        w.apply(OpBody::Tree(TreeOp::Create {
            parent: NodeId::ROOT,
            kind: NodeKind::Server,
            hostname: "stranger".into(),
            owner: Some(stranger),
            wg_pubkey: Some(WgKey([9; 32])),
        }));
        assert!(self_ops(&w.state, &stranger, Some(e)).is_empty());
    }

    #[test]
    fn endpoints_resolve_from_ip_hosts() {
        assert_eq!(
            resolve_endpoint(Some("192.0.2.7"), 51941),
            Some("192.0.2.7:51941".parse().expect("addr"))
        );
        assert_eq!(
            resolve_endpoint(Some("[2001:db8::1]"), 5),
            Some("[2001:db8::1]:5".parse().expect("addr"))
        );
        assert_eq!(resolve_endpoint(None, 5), None);
    }

    proptest! {
        /// Whatever the servers' readiness and revocations: every server's device has exactly
        /// the other active, ready servers, each allowed IP is one /32 inside the backbone
        /// prefix, no prefix or key appears twice, and two servers see each other symmetrically.
        #[test]
        fn devices_are_exact_and_symmetric(
            spec in proptest::collection::vec((any::<bool>(), any::<bool>(), any::<bool>()), 1..8)
        ) {
            let mut w = World::new();
            let mut servers = Vec::new();
            for (i, (join, endpoint, revoked)) in spec.iter().enumerate() {
                let (k, n) = w.server(i as u8 + 1, *join, *endpoint);
                servers.push((k, n, *join && *endpoint && !*revoked));
            }
            for ((k, _, _), (_, _, revoked)) in servers.iter().zip(spec.iter()) {
                if *revoked {
                    w.revoke(*k);
                }
            }
            let prefix = w.state.ipam().config().backbone;
            for (me, _, _) in &servers {
                let dev = device(&w, me);
                let expected: Vec<u8> = servers
                    .iter()
                    .filter(|(k, _, ready)| *ready && k != me)
                    .map(|(_, n, _)| w.state.tree().get(n).expect("node").wg_pubkey.expect("wg").0[0])
                    .collect();
                let got: Vec<u8> = dev.peers.iter().map(|p| p.public_key.0[0]).collect();
                prop_assert_eq!(got, expected);
                let mut seen = std::collections::BTreeSet::new();
                for p in &dev.peers {
                    prop_assert_eq!(p.allowed_ips.len(), 1);
                    let IpNet::V4(n) = p.allowed_ips[0] else { panic!("v4 only") };
                    prop_assert_eq!(n.prefix_len(), 32);
                    prop_assert!(prefix.contains(&n.addr()));
                    prop_assert!(seen.insert(n));
                }
            }
            for (a, _, ra) in &servers {
                for (b, _, rb) in &servers {
                    if a == b || !*ra || !*rb { continue; }
                    let b_wg = device(&w, a).peers.iter().any(|p| p.public_key.0 == w.state.tree().get(&own_server_node(&w.state, b).expect("b")).expect("b").wg_pubkey.expect("wg").0);
                    prop_assert!(b_wg, "active ready servers peer with each other");
                }
            }
        }
    }
}
