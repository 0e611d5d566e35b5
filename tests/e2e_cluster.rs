//! Several servers in network namespaces (needs root; CI is root), with the userspace backend
//! (real `wireguard-go`) or, with `LN_E2E_DATAPLANE=kernel`, kernel WireGuard (inside User-Mode
//! Linux: tests/uml/run-kernel-tests.sh).
//!
//! - `backbone_full_mesh_and_revocation`: the backbone's IO on its own: one replicated state
//!   with three admitted servers, each namespace programs its backbone interface from it
//!   (`lemonade_nexus::backbone::Backbone`), the servers ping each other on their backbone
//!   addresses; after a revocation in the state the revoked server is gone from the others'
//!   interfaces (dumped) and unreachable.

#[path = "../netlink/tests/common/mod.rs"]
mod common;
mod e2e_common;

use std::time::Duration;

use common::{Netns, must, unique_name};
use e2e_common::{Internet, dataplane, ping};
use lemonade_nexus::backbone::{self, Backbone};
use lemonade_nexus::hlc::Hlc;
use lemonade_nexus::identity::{NodeKey, WireGuardKey};
use lemonade_nexus::ipam::IpamOp;
use lemonade_nexus::keys::PublicKey;
use lemonade_nexus::op::{Op, OpBody};
use lemonade_nexus::server::Backend;
use lemonade_nexus::state::State;
use lemonade_nexus::tree::{NodeField, NodeId, NodeKind, Permissions, TreeOp, WgKey};
use lemonade_nexus_netlink::BackendPreference;
use lemonade_nexus_netlink::model::PrivateKey;

/// A state written by the cluster root, op by op (the fold is what every server computes).
struct RootLog {
    state: State,
    root: PublicKey,
    seq: u64,
}

impl RootLog {
    fn new() -> RootLog {
        let root = NodeKey::from_seed(&[250; 32]).public();
        RootLog {
            state: State::new(root),
            root,
            seq: 0,
        }
    }

    fn apply(&mut self, body: OpBody) -> NodeId {
        self.seq += 1;
        let op = Op {
            origin: self.root,
            seq: self.seq,
            hlc: Hlc {
                wall_ms: 1_000 + self.seq,
                logical: 0,
            },
            author: self.root,
            body,
        };
        self.state.apply(&op).expect("op applies");
        NodeId::derive(&self.root, self.seq)
    }
}

fn preference() -> BackendPreference {
    match dataplane() {
        "kernel" => BackendPreference::Kernel,
        _ => BackendPreference::Userspace,
    }
}

/// One server of the backbone test: its namespace, keys and interface.
struct BbServer {
    ns: Netns,
    key: PublicKey,
    wg: WireGuardKey,
    ifname: String,
    underlay: String,
}

impl BbServer {
    /// Programs this server's backbone interface from `state` (creating it if missing).
    fn reconcile(&self, state: &State) {
        let (ifname, wg, key) = (&self.ifname, &self.wg, self.key);
        self.ns.block_on(|| async move {
            let backend = Backend::choose(preference()).await.expect("backend");
            let private = PrivateKey(wg.private_base64().parse().expect("key"));
            let bb = Backbone::start(backend, ifname, private, 51941, None)
                .await
                .expect("backbone interface");
            bb.apply(bb.desired(state, &key)).await.expect("reconcile");
        });
    }

    /// `wg show <if> peers`.
    fn peers(&self) -> Vec<String> {
        let mut v: Vec<String> = must(self.ns.cmd("wg").args(["show", &self.ifname, "peers"]))
            .lines()
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }
}

#[test]
fn backbone_full_mesh_and_revocation() {
    let net = Internet::new("bi", "192.168.241");
    let mut log = RootLog::new();
    let mut servers = Vec::new();
    for i in 1..=3u8 {
        let ns = Netns::new(&format!("bs{i}"));
        let underlay = net.attach(&ns, i);
        let ifname = unique_name("bb");
        ns.own_uapi_socket(&ifname);
        let key = NodeKey::from_seed(&[i; 32]).public();
        let wg = WireGuardKey::from_bytes([i.wrapping_mul(37); 32]);
        // What admission and each server's own start-up append (see backbone::self_ops).
        let node = log.apply(OpBody::Tree(TreeOp::Create {
            parent: NodeId::ROOT,
            kind: NodeKind::Server,
            hostname: format!("srv{i}"),
            owner: Some(key),
            wg_pubkey: Some(WgKey(wg.public())),
        }));
        log.apply(OpBody::Tree(TreeOp::Grant {
            node: NodeId::ROOT,
            key,
            permissions: Permissions::ADMIN,
        }));
        log.apply(OpBody::Ipam(IpamOp::JoinBackbone { node }));
        log.apply(OpBody::Tree(TreeOp::Update {
            node,
            field: NodeField::Endpoint(Some(format!("{underlay}:51941"))),
        }));
        servers.push(BbServer {
            ns,
            key,
            wg,
            ifname,
            underlay,
        });
    }
    for s in &servers {
        s.reconcile(&log.state);
    }
    let addrs: Vec<String> = servers
        .iter()
        .map(|s| {
            backbone::own_address(&log.state, &s.key)
                .expect("backbone address")
                .addr()
                .to_string()
        })
        .collect();
    let addr = |s: &BbServer| {
        let i = servers.iter().position(|x| x.key == s.key).expect("server");
        addrs[i].clone()
    };
    for a in &servers {
        assert_eq!(
            a.peers().len(),
            2,
            "{}: a peer per other server",
            a.underlay
        );
        for b in &servers {
            if a.key != b.key {
                assert!(
                    ping(&a.ns, &addr(b), Duration::from_secs(15)),
                    "{} pings {}'s backbone address {}",
                    a.underlay,
                    b.underlay,
                    addr(b)
                );
            }
        }
    }

    // The root revokes server 3 (what the trust fold does: its grants go, its node leaves the
    // backbone). The others drop it at their next reconcile.
    let s3 = &servers[2];
    let addr3 = addr(s3);
    let node3 = backbone::own_server_node(&log.state, &s3.key).expect("node");
    log.apply(OpBody::Tree(TreeOp::Revoke {
        node: NodeId::ROOT,
        key: s3.key,
        permissions: Permissions::ADMIN,
    }));
    log.apply(OpBody::Ipam(IpamOp::LeaveBackbone { node: node3 }));
    for s in &servers[..2] {
        s.reconcile(&log.state);
        let peers = s.peers();
        assert_eq!(peers.len(), 1, "{}: only the other live server", s.underlay);
        let wg3 = lemonade_nexus_netlink::Key(s3.wg.public()).to_string();
        assert!(!peers.contains(&wg3), "revoked server 3 is gone: {peers:?}");
        assert!(
            !ping(&s.ns, &addr3, Duration::from_secs(3)),
            "{} no longer reaches revoked server 3",
            s.underlay
        );
    }
    assert!(
        ping(&servers[0].ns, &addr(&servers[1]), Duration::from_secs(10)),
        "1 and 2 still reach each other"
    );
}
