//! Kernel WireGuard backend against a real kernel. This host's kernel has no WireGuard, so these
//! run inside User-Mode Linux (tests/uml/). Where kernel WireGuard is unavailable they FAIL,
//! unless LN_SKIP_KERNEL_WG_TESTS=1 says this run knowingly has no kernel WireGuard (the host
//! test run sets it; the UML run does not). Each test works in a private network namespace.

use std::{collections::BTreeSet, future::Future, net::SocketAddr, process::Command};

use lemonade_nexus_netlink::{
    BackendKind, BackendPreference, Capabilities, DeviceConfig, DeviceState, Key, PeerConfig,
    WgBackend,
    kernel::{
        KernelBackend, KernelError,
        detect::{choose_backend, kernel_wireguard_available},
        encode::Budget,
    },
    model::{IpNet, PrivateKey},
    netdiff::RouteSpec,
    netns::run_in_new_netns,
    rtnl::LinkConfig,
};

/// Runs `f` with a kernel backend in a fresh network namespace, or fails (or skips, when
/// LN_SKIP_KERNEL_WG_TESTS=1) if this kernel has no WireGuard.
fn with_kernel<F, Fut>(test: &'static str, f: F)
where
    F: FnOnce(KernelBackend) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    run_in_new_netns(move || async move {
        match KernelBackend::connect(Budget::default()).await {
            Ok(backend) => f(backend).await,
            Err(KernelError::Unavailable(why)) => {
                if std::env::var("LN_SKIP_KERNEL_WG_TESTS").as_deref() == Ok("1") {
                    eprintln!("SKIPPED {test}: kernel WireGuard unavailable ({why}); LN_SKIP_KERNEL_WG_TESTS=1");
                } else {
                    panic!(
                        "{test}: kernel WireGuard is unavailable here ({why}). These tests must \
                         run inside User-Mode Linux (bash tests/uml/run-kernel-tests.sh). Set \
                         LN_SKIP_KERNEL_WG_TESTS=1 to skip them knowingly on a host without it."
                    );
                }
            }
            Err(e) => panic!("{test}: cannot open the kernel backend: {e}"),
        }
    })
    .expect("private network namespace (needs root)");
}

fn key(i: u32) -> Key {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    k[31] = 0x5a;
    Key(k)
}

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

fn peer(i: u32, ips: Vec<IpNet>) -> PeerConfig {
    PeerConfig {
        public_key: key(i),
        preshared_key: None,
        endpoint: None,
        persistent_keepalive: None,
        allowed_ips: ips,
    }
}

/// Peers as (key, sorted allowed IPs, endpoint, keepalive), sorted by key.
/// One peer as compared: key, sorted allowed IPs, endpoint, keepalive.
type PeerSummary = (Key, Vec<IpNet>, Option<SocketAddr>, Option<u16>);

fn summary(state: &DeviceState) -> Vec<PeerSummary> {
    let mut v: Vec<_> = state
        .peers
        .iter()
        .map(|p| {
            let ips: BTreeSet<IpNet> = p.config.allowed_ips.iter().map(IpNet::trunc).collect();
            (
                p.config.public_key,
                ips.into_iter().collect(),
                p.config.endpoint,
                p.config.persistent_keepalive,
            )
        })
        .collect();
    v.sort();
    v
}

fn want_summary(config: &DeviceConfig) -> Vec<PeerSummary> {
    let mut v: Vec<_> = config
        .peers
        .iter()
        .map(|p| {
            let ips: BTreeSet<IpNet> = p.allowed_ips.iter().map(IpNet::trunc).collect();
            (
                p.public_key,
                ips.into_iter().collect(),
                p.endpoint,
                p.persistent_keepalive,
            )
        })
        .collect();
    v.sort();
    v
}

/// `wg show IF dump`, as (public key, allowed-IP count) per peer: an independent reader.
fn wg_dump(ifname: &str) -> Vec<(String, usize)> {
    let out = Command::new("wg")
        .args(["show", ifname, "dump"])
        .output()
        .expect("run wg");
    assert!(
        out.status.success(),
        "wg show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut peers: Vec<(String, usize)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let ips = if f[3] == "(none)" {
                0
            } else {
                f[3].split(',').count()
            };
            (f[0].to_owned(), ips)
        })
        .collect();
    peers.sort();
    peers
}

fn selftest_shapes() -> Vec<(&'static str, DeviceConfig)> {
    let mut huge = Vec::with_capacity(130_560);
    for i in 1..=255u32 {
        for j in 0..=255u32 {
            huge.push(net(&format!("10.{i}.{j}.0/24")));
            huge.push(net(&format!("abcd::{i:x}:{j:x}/128")));
        }
    }
    let forty = (0..40u32)
        .map(|i| {
            let ips = (0..52u32)
                .map(|j| {
                    if j % 2 == 0 {
                        net(&format!("10.{i}.{j}.1/32"))
                    } else {
                        net(&format!("fd00:{i:x}::{j:x}/128"))
                    }
                })
                .collect();
            PeerConfig {
                endpoint: Some(
                    format!("192.0.2.{}:{}", i + 1, 51820 + i)
                        .parse()
                        .expect("ep"),
                ),
                persistent_keepalive: Some(25),
                ..peer(100 + i, ips)
            }
        })
        .collect();
    let mut empties: Vec<PeerConfig> = (0..29u32).map(|i| peer(200 + i, vec![])).collect();
    empties.push(peer(229, vec![net("192.168.0.0/16")]));
    let v6: Vec<IpNet> = (0..197u32)
        .map(|j| net(&format!("fd00:1234::{j:x}/128")))
        .collect();
    vec![
        (
            "one peer x 130560 allowed IPs",
            DeviceConfig {
                peers: vec![peer(1, huge)],
                ..Default::default()
            },
        ),
        (
            "40 peers x 52 allowed IPs",
            DeviceConfig {
                peers: forty,
                ..Default::default()
            },
        ),
        (
            "29 empty peers + 1",
            DeviceConfig {
                peers: empties,
                ..Default::default()
            },
        ),
        (
            "197 IPv6 /128",
            DeviceConfig {
                peers: vec![peer(300, v6)],
                ..Default::default()
            },
        ),
    ]
}

#[test]
fn kernel_link_is_created_once_and_deleted() {
    with_kernel("kernel_link_is_created_once_and_deleted", |wg| async move {
        wg.ensure_device("wgk0").await.expect("create");
        wg.ensure_device("wgk0").await.expect("idempotent");
        let link = wg.rtnl().link("wgk0").await.expect("get").expect("exists");
        assert_eq!(link.kind.as_deref(), Some("wireguard"));
        let state = wg.get("wgk0").await.expect("dump");
        assert!(state.peers.is_empty() && state.private_key.is_none());
        wg.delete_device("wgk0").await.expect("delete");
        assert!(wg.rtnl().link("wgk0").await.expect("get").is_none());
        wg.delete_device("wgk0")
            .await
            .expect("deleting an absent link is fine");
        assert!(
            wg.get("wgk0").await.is_err(),
            "dumping an absent device is an error"
        );
        assert_eq!(wg.kind(), BackendKind::Kernel);
        // A link of that name that is not WireGuard is reported, not reused.
        sh(&[
            "ip", "link", "add", "vnw0", "type", "veth", "peer", "name", "vnw1",
        ]);
        match wg.ensure_device("vnw0").await {
            Err(KernelError::NotWireguard(name, kind)) => {
                assert_eq!(name, "vnw0");
                assert_eq!(kind.as_deref(), Some("veth"));
            }
            other => panic!("expected NotWireguard, got {other:?}"),
        }
        // Detection agrees: the kernel is picked, with no fallback.
        kernel_wireguard_available().await.expect("available");
        let choice = choose_backend(BackendPreference::Auto)
            .await
            .expect("choice");
        assert_eq!(choice.kind, BackendKind::Kernel);
        assert!(!choice.fell_back());
    });
}

#[test]
fn kernel_selftest_shapes_set_split_and_dump_multipart() {
    with_kernel(
        "kernel_selftest_shapes_set_split_and_dump_multipart",
        |wg| async move {
            for (n, (name, config)) in selftest_shapes().into_iter().enumerate() {
                let ifname = format!("wgs{n}");
                wg.ensure_device(&ifname).await.expect("create");
                let applied = wg.reconcile(&ifname, &config).await.expect("reconcile");
                assert!(!applied.is_empty());
                let parts = wg.get_parts(&ifname).await.expect("dump parts");
                let state = wg.get(&ifname).await.expect("dump");
                assert_eq!(summary(&state), want_summary(&config), "{name}");
                // The kernel sizes dump messages to the reader's buffer (netlink-proto reads up
                // to 64 KiB at a time), so only the largest shape is sure to need several parts.
                let total: usize = config.peers.iter().map(|p| p.allowed_ips.len()).sum();
                eprintln!("{name}: {} dump part(s)", parts.len());
                if total > 100_000 {
                    assert!(
                        parts.len() > 1,
                        "{name}: expected a multi-part dump, got {}",
                        parts.len()
                    );
                }
                // wg(8) reads the same thing.
                let mut want: Vec<(String, usize)> = config
                    .peers
                    .iter()
                    .map(|p| (p.public_key.to_string(), p.allowed_ips.len()))
                    .collect();
                want.sort();
                assert_eq!(wg_dump(&ifname), want, "{name}");
                // Nothing left to do.
                let again = wg.reconcile(&ifname, &config).await.expect("reconcile");
                assert!(again.is_empty(), "{name}: {again:?}");
                wg.delete_device(&ifname).await.expect("delete");
            }
        },
    );
}

#[test]
fn kernel_reconcile_corrects_drift_and_removes_undesired_peers() {
    with_kernel(
        "kernel_reconcile_corrects_drift_and_removes_undesired_peers",
        |wg| async move {
            let ifname = "wgd0";
            wg.ensure_device(ifname).await.expect("create");
            let mut desired = DeviceConfig {
                private_key: Some(PrivateKey(Key([7; 32]))),
                listen_port: Some(51999),
                fwmark: Some(0x51),
                peers: (0..3u32)
                    .map(|i| PeerConfig {
                        endpoint: Some(format!("192.0.2.{}:51820", i + 1).parse().expect("ep")),
                        persistent_keepalive: Some(25),
                        preshared_key: (i == 0).then_some(PrivateKey(Key([9; 32]))),
                        ..peer(
                            i,
                            vec![
                                net(&format!("100.64.{i}.0/24")),
                                net(&format!("fd7a::{i}/128")),
                            ],
                        )
                    })
                    .collect(),
            };
            wg.reconcile(ifname, &desired).await.expect("reconcile");
            let state = wg.get(ifname).await.expect("dump");
            assert_eq!(summary(&state), want_summary(&desired));
            assert_eq!(state.listen_port, 51999);
            assert_eq!(state.fwmark, 0x51);
            assert!(
                state.public_key.is_some(),
                "the kernel derives the public key"
            );
            assert_eq!(
                state
                    .peers
                    .iter()
                    .find(|p| p.config.public_key == key(0))
                    .and_then(|p| p.config.preshared_key.clone()),
                Some(PrivateKey(Key([9; 32])))
            );

            // An operator removes a peer, adds a stray one and changes an endpoint with wg(8).
            let run = |args: Vec<String>| {
                let out = Command::new("wg").args(&args).output().expect("run wg");
                assert!(
                    out.status.success(),
                    "wg {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            run(vec![
                "set".into(),
                ifname.into(),
                "peer".into(),
                key(1).to_string(),
                "remove".into(),
            ]);
            run(vec![
                "set".into(),
                ifname.into(),
                "peer".into(),
                key(99).to_string(),
                "allowed-ips".into(),
                "100.64.2.0/24".into(),
            ]);
            run(vec![
                "set".into(),
                ifname.into(),
                "peer".into(),
                key(0).to_string(),
                "endpoint".into(),
                "198.51.100.7:1234".into(),
            ]);
            let drifted = wg.get(ifname).await.expect("dump");
            assert_ne!(summary(&drifted), want_summary(&desired));
            let fix = wg.reconcile(ifname, &desired).await.expect("reconcile");
            assert!(!fix.is_empty());
            assert_eq!(
                summary(&wg.get(ifname).await.expect("dump")),
                want_summary(&desired)
            );
            assert!(
                wg.reconcile(ifname, &desired)
                    .await
                    .expect("reconcile")
                    .is_empty()
            );

            // Shrinking a peer's allowed IPs works with or without per-prefix removal.
            desired.peers[2].allowed_ips = vec![net("100.64.2.0/24")];
            desired.peers.remove(0);
            wg.reconcile(ifname, &desired).await.expect("reconcile");
            assert_eq!(
                summary(&wg.get(ifname).await.expect("dump")),
                want_summary(&desired)
            );

            // Two peers claiming one prefix are refused before anything is sent.
            let mut bad = desired.clone();
            bad.peers[0].allowed_ips.push(net("100.64.2.0/24"));
            assert!(wg.reconcile(ifname, &bad).await.is_err());
            assert_eq!(
                summary(&wg.get(ifname).await.expect("dump")),
                want_summary(&desired)
            );

            wg.remove_peer(ifname, &key(2)).await.expect("remove");
            assert_eq!(wg.get(ifname).await.expect("dump").peers.len(), 1);
            wg.delete_device(ifname).await.expect("delete");
        },
    );
}

#[test]
fn kernel_capability_probe_matches_the_kernel() {
    with_kernel(
        "kernel_capability_probe_matches_the_kernel",
        |wg| async move {
            // Per-allowed-IP removal exists from Linux 6.16.
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
            let mut parts = release
                .trim()
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty());
            let major: u32 = parts.next().and_then(|s| s.parse().ok()).expect("major");
            let minor: u32 = parts.next().and_then(|s| s.parse().ok()).expect("minor");
            let expected = (major, minor) >= (6, 16);
            assert_eq!(
                wg.capabilities(),
                Capabilities {
                    allowed_ip_removal: expected
                },
                "kernel {release}"
            );
        },
    );
}

#[test]
fn kernel_routes_and_addresses_on_a_wireguard_link() {
    with_kernel(
        "kernel_routes_and_addresses_on_a_wireguard_link",
        |wg| async move {
            wg.ensure_device("wgr0").await.expect("create");
            let cfg = LinkConfig {
                up: true,
                mtu: Some(1420),
                addresses: vec![net("100.64.0.1/32"), net("fd7a:115c:a1e0::1/128")],
                routes: vec![net("100.64.0.0/10"), net("fd7a:115c:a1e0::/48")],
                table: 51820,
                rule_priority: Some(10_000),
            };
            let rtnl = wg.rtnl();
            rtnl.reconcile_link("wgr0", &cfg).await.expect("reconcile");
            let link = rtnl.link("wgr0").await.expect("get").expect("exists");
            assert!(link.up);
            assert_eq!(link.mtu, Some(1420));
            let mut routes = rtnl.routes(link.index, 51820).await.expect("routes");
            routes.sort();
            assert_eq!(
                routes,
                vec![
                    RouteSpec::new(net("100.64.0.0/10"), 51820),
                    RouteSpec::new(net("fd7a:115c:a1e0::/48"), 51820)
                ]
            );
            let mut addrs = rtnl.addresses(link.index).await.expect("addresses");
            addrs.sort();
            assert_eq!(addrs, cfg.addresses);
            assert!(
                rtnl.reconcile_link("wgr0", &cfg)
                    .await
                    .expect("reconcile")
                    .is_empty()
            );
            wg.delete_device("wgr0").await.expect("delete");
        },
    );
}

/// Named network namespaces created with `ip netns add`, deleted on drop (even on failure).
struct NamedNetns(Vec<String>);

impl NamedNetns {
    fn create(names: &[String]) -> Self {
        let mut guard = NamedNetns(Vec::new());
        for n in names {
            sh(&["ip", "netns", "add", n]);
            guard.0.push(n.clone());
        }
        guard
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ping(ns: &str, addr: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-c", "2", "-i", "0.2", "-W", "2", addr,
        ])
        .output()
        .expect("run ping")
        .status
        .success()
}

/// Configures `wg0` in namespace `ns` through the crate: the device, its peers, its address.
fn configure(ns: &str, config: DeviceConfig, address: &str) -> DeviceState {
    let address = net(address);
    lemonade_nexus_netlink::netns::run_in_netns(format!("/run/netns/{ns}"), move || async move {
        let wg = KernelBackend::connect(Budget::default())
            .await
            .expect("kernel backend");
        wg.ensure_device("wg0").await.expect("create");
        wg.reconcile("wg0", &config).await.expect("reconcile");
        let link = LinkConfig {
            up: true,
            mtu: Some(1420),
            addresses: vec![address],
            routes: vec![],
            table: 51820,
            rule_priority: None,
        };
        wg.rtnl().reconcile_link("wg0", &link).await.expect("link");
        wg.get("wg0").await.expect("dump")
    })
    .expect("enter namespace")
}

#[test]
fn kernel_traffic_flows_between_namespaces_and_stops_when_the_peer_is_removed() {
    // Only meaningful with kernel WireGuard; with_kernel fails or skips otherwise.
    with_kernel("kernel_traffic_flows_between_namespaces", |_| async move {
        let pid = std::process::id();
        let (a, b) = (format!("lnta{pid}"), format!("lntb{pid}"));
        let _guard = NamedNetns::create(&[a.clone(), b.clone()]);
        sh(&[
            "ip", "-n", &a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b,
        ]);
        sh(&[
            "ip",
            "-n",
            &a,
            "addr",
            "add",
            "192.168.77.1/24",
            "dev",
            "va",
        ]);
        sh(&[
            "ip",
            "-n",
            &b,
            "addr",
            "add",
            "192.168.77.2/24",
            "dev",
            "vb",
        ]);
        for (ns, dev) in [(&a, "va"), (&b, "vb")] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (ka, kb) = (PrivateKey(Key([0x11; 32])), PrivateKey(Key([0x22; 32])));
        let base = |k: &PrivateKey, port| DeviceConfig {
            private_key: Some(k.clone()),
            listen_port: Some(port),
            ..Default::default()
        };
        // First the keys, to learn each side's public key from the kernel.
        let pa = configure(&a, base(&ka, 51001), "10.77.0.1/24")
            .public_key
            .expect("pub a");
        let pb = configure(&b, base(&kb, 51002), "10.77.0.2/24")
            .public_key
            .expect("pub b");
        let with_peer = |k: &PrivateKey, port, peer: Key, ep: &str, ip: &str| {
            let mut c = base(k, port);
            c.peers.push(PeerConfig {
                public_key: peer,
                preshared_key: None,
                endpoint: Some(ep.parse().expect("endpoint")),
                persistent_keepalive: None,
                allowed_ips: vec![net(ip)],
            });
            c
        };
        configure(
            &a,
            with_peer(&ka, 51001, pb, "192.168.77.2:51002", "10.77.0.2/32"),
            "10.77.0.1/24",
        );
        configure(
            &b,
            with_peer(&kb, 51002, pa, "192.168.77.1:51001", "10.77.0.1/32"),
            "10.77.0.2/24",
        );
        assert!(
            ping(&a, "10.77.0.2"),
            "ping through the kernel tunnel failed"
        );
        // A TCP transfer of 1 MB across the tunnel, with plain sockets opened inside each
        // namespace.
        let b_path = format!("/run/netns/{b}");
        let receiver = std::thread::spawn(move || {
            lemonade_nexus_netlink::netns::run_in_netns(b_path, || async {
                let listener = std::net::TcpListener::bind("10.77.0.2:7777").expect("bind");
                let (mut conn, _) = listener.accept().expect("accept");
                let mut got = Vec::new();
                std::io::Read::read_to_end(&mut conn, &mut got).expect("read");
                got.len()
            })
            .expect("enter namespace b")
        });
        let sent =
            lemonade_nexus_netlink::netns::run_in_netns(format!("/run/netns/{a}"), || async {
                let payload = vec![0xa5u8; 1_000_000];
                for _ in 0..50 {
                    if let Ok(mut conn) = std::net::TcpStream::connect("10.77.0.2:7777") {
                        std::io::Write::write_all(&mut conn, &payload).expect("write");
                        return payload.len();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                panic!("cannot connect across the tunnel");
            })
            .expect("enter namespace a");
        assert_eq!(receiver.join().expect("receiver"), sent);
        // Removing the peer (desired state without it) stops the traffic.
        configure(&a, base(&ka, 51001), "10.77.0.1/24");
        assert!(
            !ping(&a, "10.77.0.2"),
            "traffic still flows after the peer was removed"
        );
    });
}
