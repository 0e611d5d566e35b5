//! The network-namespace scenario, written once and generic over the backend ([`Flavor`]):
//! two namespaces `a` and `b` joined by a veth pair (underlay 192.168.77.0/24), one WireGuard
//! device in each (tunnel 10.77.0.0/24), configured only through this crate, checked with
//! `wg show <if> dump` and real traffic (ping, a TCP transfer through `nc`).

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr},
    process::Stdio,
    time::{Duration, Instant},
};

use lemonade_nexus_netlink::{
    DeviceConfig, Key, PeerChange, PeerConfig, WgBackend,
    model::IpNet,
    model::PrivateKey,
    rtnl::{LinkConfig, Rtnl},
};

use super::{Flavor, Netns, keypair, must, run, unique_name};

/// One side of the pair.
pub struct Node {
    pub ns: Netns,
    pub ifname: String,
    pub private: PrivateKey,
    pub public: Key,
    pub port: u16,
    pub underlay: Ipv4Addr,
    pub tunnel: Ipv4Addr,
}

impl Node {
    fn new(tag: &str, host: u8) -> Node {
        let (private, public) = keypair();
        Node {
            ns: Netns::new(tag),
            ifname: unique_name("wg"),
            private,
            public,
            port: 51820,
            underlay: Ipv4Addr::new(192, 168, 77, host),
            tunnel: Ipv4Addr::new(10, 77, 0, host),
        }
    }

    /// This node's configuration with `peer` as its only peer (or none).
    pub fn desired(&self, peer: Option<&Node>) -> DeviceConfig {
        DeviceConfig {
            private_key: Some(self.private.clone()),
            listen_port: Some(self.port),
            fwmark: None,
            peers: peer
                .map(|p| PeerConfig {
                    public_key: p.public,
                    preshared_key: None,
                    endpoint: Some(SocketAddr::from((p.underlay, p.port))),
                    persistent_keepalive: Some(25),
                    allowed_ips: vec![IpNet::new(p.tunnel.into(), 32).expect("prefix")],
                })
                .into_iter()
                .collect(),
        }
    }

    /// Creates the device if needed and reconciles it to `desired`, through the backend, inside
    /// this node's namespace. Returns the peer changes that were applied.
    pub fn reconcile<F: Flavor>(&self, desired: &DeviceConfig) -> Vec<PeerChange> {
        self.ns.own_uapi_socket(&self.ifname);
        self.ns.block_on(|| async {
            let b = F::backend().await;
            b.ensure_device(&self.ifname).await.expect("ensure_device");
            let d = b.reconcile(&self.ifname, desired).await.expect("reconcile");
            d.peers
        })
    }

    /// Reads the device through the backend.
    pub fn get<F: Flavor>(&self) -> lemonade_nexus_netlink::DeviceState {
        self.ns
            .block_on(|| async { F::backend().await.get(&self.ifname).await.expect("get") })
    }

    /// Deletes the device through the backend and checks the link is gone.
    pub fn delete<F: Flavor>(&self) {
        self.ns.block_on(|| async {
            F::backend()
                .await
                .delete_device(&self.ifname)
                .await
                .expect("delete_device")
        });
        let out = run(self.ns.cmd("ip").args(["link", "show", &self.ifname]));
        assert!(
            !out.status.success(),
            "{} still exists after delete_device",
            self.ifname
        );
    }

    /// The link configuration the scenario uses: up, MTU 1380, the tunnel address (v4 and v6)
    /// and a route to the other side's network in a dedicated table with its policy rule.
    pub fn link_config(&self) -> LinkConfig {
        let host = self.tunnel.octets()[3];
        LinkConfig {
            up: true,
            mtu: Some(1380),
            addresses: vec![
                IpNet::new(self.tunnel.into(), 24).expect("prefix"),
                format!("fd77::{host}/64").parse().expect("v6"),
            ],
            routes: vec![
                "10.177.0.0/24".parse().expect("route"),
                "fd77:1::/64".parse().expect("route"),
            ],
            table: 1077,
            rule_priority: Some(10770),
        }
    }

    /// Gives the device its addresses, routes and rule and brings it up, through the crate's
    /// rtnetlink reconciler. Returns whether anything changed.
    pub fn reconcile_link(&self) -> bool {
        let want = self.link_config();
        self.ns.block_on(|| async {
            let rtnl = Rtnl::connect().expect("rtnetlink");
            let changes = rtnl
                .reconcile_link(&self.ifname, &want)
                .await
                .expect("reconcile_link");
            !changes.is_empty()
        })
    }

    /// `ping` from this node; true if at least one reply came back.
    pub fn ping(&self, to: Ipv4Addr, count: u32) -> bool {
        let out = run(self.ns.cmd("ping").args([
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            &to.to_string(),
        ]));
        out.status.success()
    }

    /// Asserts `wg show <if> dump` equals `want`.
    pub fn assert_dump_matches(&self, want: &DeviceConfig) {
        let dump = must(self.ns.cmd("wg").args(["show", &self.ifname, "dump"]));
        let mut lines = dump.lines();
        let dev: Vec<&str> = lines.next().expect("device line").split('\t').collect();
        assert_eq!(dev.len(), 4, "device line {dev:?}");
        let want_key = want.private_key.as_ref().map(|k| k.0.to_string());
        assert_eq!(
            Some(dev[0].to_owned()),
            want_key,
            "private key of {}",
            self.ifname
        );
        assert_eq!(
            dev[2],
            want.listen_port.expect("port").to_string(),
            "listen port"
        );
        let fwmark = want.fwmark.filter(|m| *m != 0);
        let want_mark = fwmark.map_or("off".to_owned(), |m| format!("0x{m:x}"));
        assert_eq!(dev[3], want_mark, "fwmark");

        let mut got = Vec::new();
        for line in lines {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 8, "peer line {line:?}");
            let allowed: BTreeSet<String> = match f[3] {
                "(none)" => BTreeSet::new(),
                s => s.split(',').map(str::to_owned).collect(),
            };
            got.push((
                f[0].to_owned(),
                f[1].to_owned(),
                f[2].to_owned(),
                allowed,
                f[7].to_owned(),
            ));
        }
        let mut expected: Vec<_> = want
            .peers
            .iter()
            .map(|p| {
                (
                    p.public_key.to_string(),
                    p.preshared_key
                        .as_ref()
                        .map_or("(none)".to_owned(), |k| k.0.to_string()),
                    p.endpoint.map_or("(none)".to_owned(), |e| e.to_string()),
                    p.allowed_ips
                        .iter()
                        .map(|n| n.trunc().to_string())
                        .collect::<BTreeSet<_>>(),
                    p.persistent_keepalive
                        .filter(|k| *k != 0)
                        .map_or("off".to_owned(), |k| k.to_string()),
                )
            })
            .collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "peers of {} per `wg show dump`", self.ifname);
    }
}

/// Two namespaces joined by veth, each with its WireGuard device configured through the crate
/// (device created, peers reconciled, address set, link up).
pub struct Pair {
    pub a: Node,
    pub b: Node,
}

impl Pair {
    pub fn new<F: Flavor>() -> Pair {
        let a = Node::new(&format!("{}a", F::TAG), 1);
        let b = Node::new(&format!("{}b", F::TAG), 2);
        let (va, vb) = (unique_name("va"), unique_name("vb"));
        super::ip(&[
            "link", "add", &va, "netns", &a.ns.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.ns.name,
        ]);
        for (n, v) in [(&a, &va), (&b, &vb)] {
            n.ns.ip(&["address", "add", &format!("{}/24", n.underlay), "dev", v]);
            n.ns.ip(&["link", "set", v, "up"]);
        }
        let pair = Pair { a, b };
        for (me, other) in [(&pair.a, &pair.b), (&pair.b, &pair.a)] {
            let changes = me.reconcile::<F>(&me.desired(Some(other)));
            assert!(
                matches!(changes.as_slice(), [PeerChange::Add(p)] if p.public_key == other.public),
                "a fresh device gets exactly one Add, got {changes:?}"
            );
            assert!(
                me.reconcile_link(),
                "a fresh link gets addresses and routes"
            );
        }
        pair
    }

    /// Waits for the tunnel to carry a ping from a to b (the first one waits for the handshake).
    /// On failure, prints both sides' links, addresses, routes, rules and `wg show`.
    pub fn ping_a_to_b(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.a.ping(self.b.tunnel, 1) {
                return true;
            }
        }
        for n in [&self.a, &self.b] {
            for args in [
                &["ip", "-d", "link"][..],
                &["ip", "address"],
                &["ip", "route", "show", "table", "all"],
                &["ip", "rule"],
                &["wg", "show", &n.ifname],
            ] {
                let out = run(n.ns.cmd(args[0]).args(&args[1..]));
                eprintln!(
                    "[{}] {}:\n{}{}",
                    n.ns.name,
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        false
    }
}

/// Sends `len` bytes from a to b over TCP through the tunnel with `nc`, and checks b received
/// exactly those bytes.
pub fn tcp_transfer(pair: &Pair, len: usize) {
    let data: Vec<u8> = {
        // Deterministic, incompressible-enough bytes (an LCG), so corruption would show.
        let mut x: u32 = 0x1234_5678;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect()
    };
    let port = "5001";
    let mut server = pair
        .b
        .ns
        .cmd("nc")
        .args(["-l", &pair.b.tunnel.to_string(), port])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nc -l");
    let mut received = Vec::with_capacity(len);
    let mut server_out = server.stdout.take().expect("stdout");
    let reader =
        std::thread::spawn(move || server_out.read_to_end(&mut received).map(|_| received));
    // The listener needs a moment to bind; retry the client until it connects.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = pair
            .a
            .ns
            .cmd("nc")
            .args(["-N", &pair.b.tunnel.to_string(), port])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nc client");
        let mut stdin = client.stdin.take().expect("stdin");
        let wrote = stdin.write_all(&data).is_ok();
        drop(stdin);
        let out = client.wait_with_output().expect("nc client exit");
        if wrote && out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nc client never connected: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = reader
        .join()
        .expect("reader thread")
        .expect("read nc output");
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(got.len(), data.len(), "bytes received through the tunnel");
    assert!(got == data, "data corrupted through the tunnel");
}

// ---- The test bodies, each generic over the backend ----

/// Devices configured through the crate match `wg show dump`; ping and a 4 MiB TCP transfer
/// cross the tunnel; a second reconcile of a live device changes nothing; delete removes it.
pub fn configure_dump_and_traffic<F: Flavor>() {
    let pair = Pair::new::<F>();
    pair.a.assert_dump_matches(&pair.a.desired(Some(&pair.b)));
    pair.b.assert_dump_matches(&pair.b.desired(Some(&pair.a)));
    assert!(pair.ping_a_to_b(), "no ping through the tunnel");
    tcp_transfer(&pair, 4 << 20);

    // The device now has handshake times and counters; reconciling again must be a no-op.
    let again = pair.a.reconcile::<F>(&pair.a.desired(Some(&pair.b)));
    assert!(again.is_empty(), "second reconcile changed {again:?}");
    let state = pair.a.get::<F>();
    let peer = &state.peers[0];
    assert!(
        peer.last_handshake.is_some(),
        "handshake time after traffic"
    );
    assert!(
        peer.rx_bytes > 4 << 20 || peer.tx_bytes > 4 << 20,
        "counters after 4 MiB"
    );

    pair.a.delete::<F>();
    pair.b.delete::<F>();
}

/// An operator's `wg set <if> peer X remove`, a stranger peer and a changed allowed IP are all
/// undone by the next reconcile, and traffic flows again.
pub fn drift_is_corrected<F: Flavor>() {
    let pair = Pair::new::<F>();
    assert!(pair.ping_a_to_b(), "no ping through the tunnel");
    let want = pair.a.desired(Some(&pair.b));
    let b_key = pair.b.public.to_string();

    must(
        pair.a
            .ns
            .cmd("wg")
            .args(["set", &pair.a.ifname, "peer", &b_key, "remove"]),
    );
    assert!(
        pair.a.get::<F>().peers.is_empty(),
        "operator removal visible through get"
    );
    assert!(!pair.a.ping(pair.b.tunnel, 2), "traffic without the peer");

    let changes = pair.a.reconcile::<F>(&want);
    assert!(
        matches!(changes.as_slice(), [PeerChange::Add(p)] if p.public_key == pair.b.public),
        "reconcile re-adds the removed peer, got {changes:?}"
    );
    pair.a.assert_dump_matches(&want);
    assert!(pair.ping_a_to_b(), "traffic after drift correction");

    // A stranger peer and a changed allowed-IP list of the real one.
    let (_, stranger) = keypair();
    must(pair.a.ns.cmd("wg").args([
        "set",
        &pair.a.ifname,
        "peer",
        &stranger.to_string(),
        "allowed-ips",
        "10.99.0.0/24",
        "peer",
        &b_key,
        "allowed-ips",
        "10.77.0.2/32,10.88.0.0/16",
    ]));
    let changes = pair.a.reconcile::<F>(&want);
    assert_eq!(
        changes.len(),
        2,
        "one removal and one update, got {changes:?}"
    );
    assert!(
        changes.contains(&PeerChange::Remove(stranger)),
        "stranger removed: {changes:?}"
    );
    pair.a.assert_dump_matches(&want);
    assert!(pair.a.reconcile::<F>(&want).is_empty(), "converged");
}

/// Removing the peer from the desired state removes it from the device and stops traffic.
pub fn peer_removal_stops_traffic<F: Flavor>() {
    let pair = Pair::new::<F>();
    assert!(pair.ping_a_to_b(), "no ping through the tunnel");
    let lonely = pair.a.desired(None);
    let changes = pair.a.reconcile::<F>(&lonely);
    assert_eq!(changes, vec![PeerChange::Remove(pair.b.public)]);
    pair.a.assert_dump_matches(&lonely);
    assert!(
        !pair.a.ping(pair.b.tunnel, 3),
        "ping still crosses after the peer was removed"
    );
    // And back.
    pair.a.reconcile::<F>(&pair.a.desired(Some(&pair.b)));
    assert!(pair.ping_a_to_b(), "traffic after re-adding the peer");
}

/// Addresses (IPv4 and IPv6), MTU, routes in the dedicated table and the policy rules read back
/// through rtnetlink and `ip`; a route and an address an operator deletes come back on the next
/// reconcile, and a second reconcile changes nothing.
pub fn addresses_and_routes_read_back<F: Flavor>() {
    let pair = Pair::new::<F>();
    let a = &pair.a;
    let want = a.link_config();
    let (addrs, routes, rules, link) = a.ns.block_on(|| async {
        let rtnl = Rtnl::connect().expect("rtnetlink");
        let link = rtnl
            .link(&a.ifname)
            .await
            .expect("link")
            .expect("link exists");
        let addrs = rtnl.addresses(link.index).await.expect("addresses");
        let routes = rtnl.routes(link.index, want.table).await.expect("routes");
        let rules = rtnl.rules(want.table).await.expect("rules");
        (addrs, routes, rules, link)
    });
    assert!(link.up, "link up");
    assert_eq!(link.mtu, Some(1380), "mtu");
    for addr in &want.addresses {
        assert!(
            addrs.contains(addr),
            "address {addr} read back from {addrs:?}"
        );
    }
    let dests: BTreeSet<IpNet> = routes.iter().map(|r| r.destination).collect();
    assert_eq!(
        dests,
        want.routes.iter().copied().collect(),
        "routes in table {}",
        want.table
    );
    assert_eq!(rules.len(), 2, "one rule per family: {rules:?}");

    // The same, as the operator sees it.
    let shown = must(
        a.ns.cmd("ip")
            .args(["-o", "address", "show", "dev", &a.ifname]),
    );
    assert!(
        shown.contains("10.77.0.1/24") && shown.contains("fd77::1/64"),
        "{shown}"
    );
    let shown = must(a.ns.cmd("ip").args(["route", "show", "table", "1077"]));
    assert!(shown.contains("10.177.0.0/24"), "{shown}");
    // A rule whose action is not "lookup" would make every route lookup fail with EINVAL.
    let shown = must(a.ns.cmd("ip").args(["rule", "show", "priority", "10770"]));
    assert_eq!(shown.trim(), "10770:\tfrom all lookup 1077", "policy rule");

    // Drift: an operator deletes a route and an address.
    a.ns.ip(&["route", "del", "10.177.0.0/24", "table", "1077"]);
    a.ns.ip(&["address", "del", "fd77::1/64", "dev", &a.ifname]);
    assert!(a.reconcile_link(), "reconcile restores what was deleted");
    let shown = must(a.ns.cmd("ip").args(["route", "show", "table", "1077"]));
    assert!(shown.contains("10.177.0.0/24"), "route restored: {shown}");
    let shown = must(
        a.ns.cmd("ip")
            .args(["-o", "address", "show", "dev", &a.ifname]),
    );
    assert!(shown.contains("fd77::1/64"), "address restored: {shown}");
    assert!(!a.reconcile_link(), "converged: nothing left to change");
    assert!(pair.ping_a_to_b(), "tunnel still carries traffic");
}
