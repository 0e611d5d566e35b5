//! Several servers in network namespaces (needs root; CI is root), with the userspace backend
//! (real `wireguard-go`) or, with `LN_E2E_DATAPLANE=kernel`, kernel WireGuard (inside User-Mode
//! Linux: tests/uml/run-kernel-tests.sh).
//!
//! Process-level scenarios (each runs three `serve` processes admitted by a root key made with
//! `root init` / `enroll-server`, `s2` and `s3` joining through `s1` with `--seed-peer`, and
//! `join` agents; they run one at a time, they are heavy for two cores):
//!
//! - (a) `cluster_converges_and_clients_of_different_servers_talk`: three servers, two clients
//!   each; same state hash on every `/api/health`; same-group clients of different servers ping
//!   each other directly, a client of another group cannot; the servers ping each other on their
//!   backbone addresses.
//! - (b) `killed_server_others_keep_serving_and_it_catches_up`: `kill -9` of one server; the
//!   others keep serving joins and client traffic continues; restarted, it reaches the same hash.
//! - (c) `partition_heals_to_one_state_without_duplicate_addresses`: nftables cuts gossip between
//!   {s1} and {s2, s3} while joins continue on both sides; after healing every server has the same
//!   hash within the bound, and the final IPAM holds no address twice.
//! - (c') `partition_conflict_on_one_block_resolves_to_one_holder`: the same with a one-block
//!   tunnel pool, so both sides lease the same address; after healing one device holds it.
//! - (d) `revoked_server_is_cut_off_from_gossip_and_backbone`: `revoke-server --submit`; the
//!   revoked server leaves every other server's backbone interface and gets no more ops.
//!
//! - `backbone_full_mesh_and_revocation`: the backbone's IO on its own: one replicated state
//!   with three admitted servers, each namespace programs its backbone interface from it
//!   (`lemonade_nexus::backbone::Backbone`), the servers ping each other on their backbone
//!   addresses; after a revocation in the state the revoked server is gone from the others'
//!   interfaces (dumped) and unreachable.

#[path = "../netlink/tests/common/mod.rs"]
mod common;
mod e2e_common;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Netns, must, unique_name};
use e2e_common::{
    ClusterClient, ClusterRoot, ClusterServer, Internet, dataplane, ping, state_hashes,
    wait_converged,
};
use lemonade_nexus::backbone::{self, Backbone};
use lemonade_nexus::hlc::Hlc;
use lemonade_nexus::identity::{NodeKey, WireGuardKey};
use lemonade_nexus::ipam::IpamOp;
use lemonade_nexus::keys::PublicKey;
use lemonade_nexus::op::{Op, OpBody};
use lemonade_nexus::server::Backend;
use lemonade_nexus::state::State;
use lemonade_nexus::tree::{NodeField, NodeId, NodeKind, TreeOp, WgKey};
use lemonade_nexus::trust;
use lemonade_nexus_netlink::BackendPreference;
use lemonade_nexus_netlink::model::PrivateKey;

/// A state written by the cluster root, op by op (the fold is what every server computes).
struct RootLog {
    state: State,
    root: NodeKey,
    seq: u64,
}

impl RootLog {
    fn new() -> RootLog {
        let root = NodeKey::from_seed(&[250; 32]);
        RootLog {
            state: State::new(root.public()),
            root,
            seq: 0,
        }
    }

    /// Folds `body` with `origin` as origin and author; returns the node id it would create.
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
        self.state.apply(&op).expect("op applies");
        NodeId::derive(&origin, self.seq)
    }

    fn apply(&mut self, body: OpBody) -> NodeId {
        self.apply_from(self.root.public(), body)
    }

    /// Server `key` admits itself with a root-signed certificate (its first op at start-up).
    fn admit(&mut self, key: PublicKey, name: &str) {
        let cert = trust::seal_server_cert(
            self.root.pair(),
            &trust::ServerCert {
                server: key,
                name: name.to_owned(),
                issued_at_ms: 1,
                expires_at_ms: 0,
            },
        );
        self.apply_from(key, OpBody::Trust(trust::TrustOp::AdmitServer { cert }));
    }

    /// The root revokes server `key` (its grants go, its node leaves the backbone).
    fn revoke(&mut self, key: PublicKey) {
        let revocation = trust::seal_revocation(
            self.root.pair(),
            &trust::Revocation {
                server: key,
                issued_at_ms: 2,
                reason: "test".into(),
            },
        );
        self.apply(OpBody::Trust(trust::TrustOp::RevokeServer { revocation }));
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
        log.admit(key, &format!("srv{i}"));
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

    // The root revokes server 3 (the trust fold removes its grants and its backbone address).
    // The others drop it at their next reconcile.
    let s3 = &servers[2];
    let addr3 = addr(s3);
    log.revoke(s3.key);
    assert_eq!(backbone::own_address(&log.state, &s3.key), None);
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

/// The process-level scenarios run one at a time (each runs about twenty processes).
static SERIAL: Mutex<()> = Mutex::new(());

/// How long servers may take to reach one hash after the last change (gossip push, or
/// anti-entropy after a partition or restart).
const CONVERGE: Duration = Duration::from_secs(30);
/// How long a same-group peer may take to appear on a device (heartbeat endpoint replicated,
/// agent round) and answer.
const PEER_UP: Duration = Duration::from_secs(40);

/// Three enrolled servers on a fresh underlay; `s1` started first, the others seeded by it.
struct Cluster {
    net: Internet,
    root: ClusterRoot,
    servers: Vec<ClusterServer>,
    tmp: tempfile::TempDir,
}

impl Cluster {
    fn start(tag: &str, prefix: &str) -> Cluster {
        Cluster::start_with(tag, prefix, &[])
    }

    /// Like [`Cluster::start`], every server with the global options `args`.
    fn start_with(tag: &str, prefix: &str, args: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().expect("tmp");
        let net = Internet::new(tag, prefix);
        let root = ClusterRoot::new(&tmp.path().join("root"));
        let mut servers: Vec<ClusterServer> = (1..=3u8)
            .map(|i| ClusterServer::new(&net, &root, tmp.path(), &format!("s{i}"), i))
            .collect();
        for s in &mut servers {
            s.global_args = args.iter().map(|a| a.to_string()).collect();
        }
        servers[0].start(&root, None);
        let seed = servers[0].seed();
        for s in &mut servers[1..] {
            s.start(&root, Some(&seed));
        }
        let c = Cluster {
            net,
            root,
            servers,
            tmp,
        };
        c.converge("start");
        c
    }

    fn all(&self) -> Vec<&ClusterServer> {
        self.servers.iter().collect()
    }

    fn converge(&self, when: &str) -> String {
        let (hash, took) = wait_converged(&self.net.ns, &self.all(), CONVERGE);
        eprintln!("cluster: converged {when} in {took:?} ({hash})");
        hash
    }

    fn client(&self, name: &str, n: u8) -> ClusterClient {
        ClusterClient::new(&self.net, self.tmp.path(), name, n)
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }
}

impl ClusterServer {
    fn seed(&self) -> String {
        format!("{}:9102", self.addr)
    }
}

fn tunnel_of(c: &ClusterClient) -> String {
    c.answer().tunnel_ipv4.clone()
}

/// Asserts that `a` and `b` ping each other over their tunnel addresses.
fn assert_talk(a: &ClusterClient, b: &ClusterClient) {
    assert!(
        a.ping(&tunnel_of(b), PEER_UP),
        "{} pings {} ({})",
        a.name,
        b.name,
        tunnel_of(b)
    );
    assert!(
        b.ping(&tunnel_of(a), PEER_UP),
        "{} pings {} ({})",
        b.name,
        a.name,
        tunnel_of(a)
    );
}

fn assert_isolated(a: &ClusterClient, b: &ClusterClient) {
    assert!(
        !a.ping(&tunnel_of(b), Duration::from_secs(3)),
        "{} must not reach {} (other group)",
        a.name,
        b.name
    );
}

/// Every server has the two others on its backbone and pings their backbone addresses.
fn assert_backbone_mesh(c: &Cluster) {
    let addrs: Vec<String> = c
        .servers
        .iter()
        .map(|s| {
            s.backbone_address()
                .expect("backbone address on the interface")
        })
        .collect();
    for (i, s) in c.servers.iter().enumerate() {
        let deadline = Instant::now() + CONVERGE;
        while s.backbone_peers().len() != 2 {
            assert!(
                Instant::now() < deadline,
                "{}: backbone peers {:?}",
                s.name,
                s.backbone_peers()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        for (j, a) in addrs.iter().enumerate() {
            if i != j {
                assert!(
                    ping(&s.ns, a, Duration::from_secs(20)),
                    "{} pings {}'s backbone address {a}",
                    s.name,
                    c.servers[j].name
                );
            }
        }
    }
}

#[test]
fn cluster_converges_and_clients_of_different_servers_talk() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = Cluster::start("ca", "192.168.242");
    let (u1, u2, u3) = (c.servers[0].url(), c.servers[1].url(), c.servers[2].url());
    let mut red1 = c.client("red-1", 11);
    red1.join(&u1, None, Duration::from_secs(30));
    let red_key = red1.make_setup_key(&u1);
    let mut blue1 = c.client("blue-1", 12);
    blue1.join(&u1, None, Duration::from_secs(30));
    let blue_key = blue1.make_setup_key(&u1);
    let mut red2 = c.client("red-2", 21);
    red2.join(&u2, Some(&red_key), CONVERGE);
    let mut blue2 = c.client("blue-2", 22);
    blue2.join(&u2, Some(&blue_key), CONVERGE);
    let mut red3 = c.client("red-3", 31);
    red3.join(&u3, Some(&red_key), CONVERGE);
    let mut green3 = c.client("green-3", 32);
    green3.join(&u3, None, Duration::from_secs(30));
    assert_eq!(red2.answer().group_id, red1.answer().group_id);
    assert_eq!(red3.answer().group_id, red1.answer().group_id);
    assert_eq!(blue2.answer().group_id, blue1.answer().group_id);
    assert_ne!(green3.answer().group_id, red1.answer().group_id);
    c.converge("after six joins");

    assert_talk(&red1, &red2);
    assert_talk(&red1, &red3);
    assert_talk(&red2, &red3);
    assert_talk(&blue1, &blue2);
    assert_isolated(&green3, &red1);
    assert_isolated(&green3, &red2);
    assert_isolated(&red1, &blue2);
    assert_isolated(&blue2, &red3);
    // Directly: red-1's device has red-2's and red-3's keys as peers besides its server.
    let peers = common::must(red1.ns.cmd("wg").args(["show", &red1.ifname, "peers"]));
    assert_eq!(
        peers.lines().count(),
        3,
        "red-1: its server, red-2, red-3: {peers}"
    );

    assert_backbone_mesh(&c);
    // `status` on a server lists its backbone peers: the two other servers, at their endpoints.
    let s1 = &c.servers[0];
    let mut st = e2e_common::node_cmd(&s1.ns, &s1.dir);
    st.args([
        "--log-level",
        "error",
        "status",
        "--wg-interface",
        &s1.client_if,
    ]);
    let text = common::must(&mut st);
    let section = text
        .split("backbone:")
        .nth(1)
        .unwrap_or_else(|| panic!("no backbone section in status:\n{text}"));
    let (a2, a3) = (&c.servers[1].addr, &c.servers[2].addr);
    assert!(
        section.contains("(2 servers)")
            && section.contains(&format!("{a2}:51941"))
            && section.contains(&format!("{a3}:51941")),
        "status lists s2 and s3 on the backbone:\n{text}"
    );
}

#[test]
fn killed_server_others_keep_serving_and_it_catches_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::start("cb", "192.168.243");
    let (u1, u2, u3) = (c.servers[0].url(), c.servers[1].url(), c.servers[2].url());
    let mut a = c.client("a", 11);
    a.join(&u1, None, Duration::from_secs(30));
    let key = a.make_setup_key(&u1);
    let mut b = c.client("b", 21);
    b.join(&u2, Some(&key), CONVERGE);
    let mut d = c.client("d", 31);
    d.join(&u3, Some(&key), CONVERGE);
    assert_talk(&a, &b);
    assert_talk(&a, &d);

    c.servers[2].kill();
    let killed = Instant::now();
    // The others detect it (SWIM, shown in /api/health) within seconds.
    let s3_key = c.servers[2].key.clone();
    for s in &c.servers[..2] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let dead = e2e_common::get_json(&c.net.ns, &s.url(), "/api/health").is_some_and(|h| {
                h["gossip"]["peers"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["key"] == s3_key.as_str() && p["status"] == "dead")
                })
            });
            if dead {
                eprintln!(
                    "cluster: {} saw s3 dead {:?} after kill -9",
                    s.name,
                    killed.elapsed()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not detect the death of s3",
                s.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The others keep serving joins...
    let mut e = c.client("e", 12);
    e.join(&u1, Some(&key), Duration::from_secs(30));
    let mut f = c.client("f", 22);
    f.join(&u2, None, Duration::from_secs(30));
    let live = [&c.servers[0], &c.servers[1]];
    wait_converged(&c.net.ns, &live, CONVERGE);
    assert_eq!(
        state_hashes(&c.net.ns, &[&c.servers[2]]),
        vec![None],
        "s3 is down"
    );
    // ... and traffic continues, also to the device of the dead server (direct tunnels).
    assert_talk(&a, &b);
    assert_talk(&a, &e);
    assert!(
        a.ping(&tunnel_of(&d), Duration::from_secs(10)),
        "a still reaches d, whose server is dead"
    );

    // Restarted, s3 catches up with what it missed.
    let seed = c.servers[0].seed();
    c.servers[2].start(&c.root, Some(&seed));
    // converge() waits for one hash on all three: s3 has every op it missed.
    c.converge("after the restart of s3");
    // And it is alive again in the others' membership.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !e2e_common::get_json(&c.net.ns, &c.servers[0].url(), "/api/health").is_some_and(|h| {
        h["gossip"]["peers"].as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["key"] == s3_key.as_str() && p["status"] == "alive")
        })
    }) {
        assert!(Instant::now() < deadline, "s1 did not re-admit s3 as alive");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn partition_heals_to_one_state_without_duplicate_addresses() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::start("cc", "192.168.244");
    let urls: Vec<_> = c.servers.iter().map(|s| s.url()).collect();
    partition_s1(&c);
    // Joins on both sides while partitioned: s1 and s3 both need an address block now.
    let mut clients = Vec::new();
    for (i, server) in [0usize, 2, 0, 2, 1, 0].into_iter().enumerate() {
        let mut cl = c.client(&format!("p{i}"), 11 + i as u8);
        cl.join(&urls[server], None, Duration::from_secs(30));
        clients.push(cl);
    }
    let side = wait_converged(&c.net.ns, &[&c.servers[1], &c.servers[2]], CONVERGE).0;
    let alone = state_hashes(&c.net.ns, &[&c.servers[0]]);
    assert_ne!(alone, vec![Some(side)], "s1 is really cut off");
    let ipam = heal_and_check(&mut c);
    assert_eq!(
        ipam["leases"].as_array().map(Vec::len),
        Some(clients.len()),
        "every device joined during the partition keeps a lease (no block conflict here)"
    );
}

/// The same with a tunnel pool of one block (10.99.0.0/24), so both sides of the partition must
/// claim that block and lease the same address: the merge has to resolve a real conflict.
#[test]
fn partition_conflict_on_one_block_resolves_to_one_holder() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = Cluster::start_with(
        "ce",
        "192.168.246",
        &["--overlay-client-v4", "10.99.0.0/24"],
    );
    let (u1, u3) = (c.servers[0].url(), c.servers[2].url());
    partition_s1(&c);
    let mut x = c.client("x", 11);
    let ax = x.join(&u1, None, Duration::from_secs(30));
    let mut y = c.client("y", 31);
    let ay = y.join(&u3, None, Duration::from_secs(30));
    assert_eq!(
        ax.tunnel_ipv4, ay.tunnel_ipv4,
        "both sides leased the same address of the one block (the conflict is real)"
    );
    let ipam = heal_and_check(&mut c);
    let blocks = ipam["blocks"].as_array().expect("blocks");
    assert_eq!(blocks.len(), 1, "one block, one holder: {ipam:#}");
    let holders: Vec<&str> = ipam["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .filter(|l| l["v4"] == ax.tunnel_ipv4.as_str())
        .filter_map(|l| l["hostname"].as_str())
        .collect();
    assert_eq!(
        holders.len(),
        1,
        "{} is held once: {ipam:#}",
        ax.tunnel_ipv4
    );
    eprintln!("partition conflict: {} kept {}", holders[0], ax.tunnel_ipv4);
}

/// {s1} | {s2, s3}: s1 drops gossip (udp 9102) to and from the other two.
fn partition_s1(c: &Cluster) {
    let (a2, a3) = (c.servers[1].addr.clone(), c.servers[2].addr.clone());
    let rules = format!(
        "table inet lnpart {{
            chain input {{ type filter hook input priority 0; ip saddr {{ {a2}, {a3} }} udp dport 9102 drop; ip saddr {{ {a2}, {a3} }} udp sport 9102 drop; }}
            chain output {{ type filter hook output priority 0; ip daddr {{ {a2}, {a3} }} udp dport 9102 drop; ip daddr {{ {a2}, {a3} }} udp sport 9102 drop; }}
        }}"
    );
    let file = c.dir().join("partition.nft");
    std::fs::write(&file, rules).expect("nft file");
    common::must(c.servers[0].ns.cmd("nft").arg("-f").arg(&file));
}

/// Removes the partition, waits for one hash within the bound, stops the servers and checks
/// that their final IPAM (read offline) holds no address and no block twice, the same on all.
/// Returns that IPAM.
fn heal_and_check(c: &mut Cluster) -> serde_json::Value {
    common::must(
        c.servers[0]
            .ns
            .cmd("nft")
            .args(["delete", "table", "inet", "lnpart"]),
    );
    let healed = Instant::now();
    c.converge("after healing");
    eprintln!(
        "partition: healed in {:?} (bound {CONVERGE:?})",
        healed.elapsed()
    );
    let mut finals = Vec::new();
    for s in &mut c.servers {
        s.stop();
        finals.push(s.ipam_offline());
    }
    eprintln!(
        "partition: final blocks {} and leases {}",
        finals[0]["blocks"], finals[0]["leases"]
    );
    for ipam in &finals {
        let leases = ipam["leases"].as_array().expect("leases");
        let mut v4: Vec<&str> = leases.iter().filter_map(|l| l["v4"].as_str()).collect();
        let n = v4.len();
        v4.sort();
        v4.dedup();
        assert_eq!(v4.len(), n, "an IPv4 address is held twice: {ipam:#}");
        let mut blocks: Vec<u64> = ipam["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .filter_map(|b| b["block"].as_u64())
            .collect();
        let nb = blocks.len();
        blocks.sort();
        blocks.dedup();
        assert_eq!(blocks.len(), nb, "a block has two holders: {ipam:#}");
        assert_eq!(ipam, &finals[0], "one IPAM on every server");
    }
    finals.swap_remove(0)
}

#[test]
fn revoked_server_is_cut_off_from_gossip_and_backbone() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = Cluster::start("cd", "192.168.245");
    assert_backbone_mesh(&c);
    let s3 = &c.servers[2];
    let s3_wg = s3_wireguard_key(s3);
    let out = c.root.revoke(&c.net.ns, &s3.key, &c.servers[0].url());
    eprintln!("revoke-server: {out}");
    let pair = [&c.servers[0], &c.servers[1]];
    wait_converged(&c.net.ns, &pair, CONVERGE);
    // Gone from the others' backbone interfaces (dumped).
    for s in &c.servers[..2] {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let peers = s.backbone_peers();
            if !peers.contains(&s3_wg) && peers.len() == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} still has revoked s3 ({s3_wg}) on its backbone: {peers:?}",
                s.name
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    // Cut off from gossip: new ops on s1 reach s2, never s3 (its state stays where it was).
    // First let s3 settle (the revocation itself may still be reaching it): the same hash for 3 s.
    let mut before = state_hashes(&c.net.ns, &[s3]);
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + CONVERGE;
    while stable_since.elapsed() < Duration::from_secs(3) {
        assert!(Instant::now() < deadline, "s3's state keeps changing");
        std::thread::sleep(Duration::from_millis(300));
        let now = state_hashes(&c.net.ns, &[s3]);
        if now != before {
            before = now;
            stable_since = Instant::now();
        }
    }
    assert!(before[0].is_some(), "s3 still runs and answers");
    let mut late = c.client("late", 11);
    late.join(&c.servers[0].url(), None, Duration::from_secs(30));
    let (h, _) = wait_converged(&c.net.ns, &pair, CONVERGE);
    std::thread::sleep(Duration::from_secs(5));
    let after = state_hashes(&c.net.ns, &[s3]);
    assert_eq!(after, before, "revoked s3 received no new op");
    assert_ne!(after, vec![Some(h)], "s3 is behind the cluster");
}

/// The server's WireGuard public key (base64), from its client-plane interface.
fn s3_wireguard_key(s: &ClusterServer) -> String {
    common::must(s.ns.cmd("wg").args(["show", &s.client_if, "public-key"]))
        .trim()
        .to_owned()
}
