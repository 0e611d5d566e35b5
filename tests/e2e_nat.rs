//! Two devices of one group, each behind its own NAT (nftables masquerade in a router
//! namespace), reach each other directly (needs root; CI is root; userspace backend by default,
//! `LN_E2E_DATAPLANE=kernel` for kernel WireGuard).
//!
//! ```text
//!   cli A 10.61.1.2 ── natA (masquerade) 198.18.61.2 ─┐
//!                                                     ├─ "internet" bridge ── srv 198.18.61.1
//!   cli B 10.61.2.2 ── natB (masquerade) 198.18.61.3 ─┘
//! ```
//!
//! Each agent reports its inside address (`10.61.x.2:port`) in its heartbeat; the server sees the
//! NAT's mapping (`198.18.61.x:port`) as the peer's endpoint on its own WireGuard device, records
//! it, and `GET /api/mesh/peers` hands that mapping to the other device. The agents program each
//! other with it, both send, both NATs open (Linux masquerade keeps the source port: an
//! endpoint-independent mapping), and A pings B's tunnel address. The server never forwards
//! between devices, so that ping went device to device through both NATs.

#[path = "../netlink/tests/common/mod.rs"]
mod common;
mod e2e_common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Netns, must, unique_name};
use e2e_common::{Internet, Proc, node_cmd, spawn_lines, wait_line};
use lemonade_nexus::api::client::PinnedClient;
use lemonade_nexus::api::join::JoinResponse;
use lemonade_nexus::api::private::mesh::PeersResponse;
use lemonade_nexus::tls::JoinUrl;

/// A router namespace with a LAN behind masquerade and one client namespace on that LAN.
struct Site {
    /// Kept for its lifetime: dropping it removes the router namespace.
    _nat: Netns,
    client: Netns,
    /// The NAT's public (internet) address.
    public: String,
    /// The client's inside address.
    inside: String,
}

fn site(internet: &Internet, n: u8, lan: &str) -> Site {
    let nat = Netns::new(&format!("nr{n}"));
    let client = Netns::new(&format!("nc{n}"));
    let public = internet.attach(&nat, n);
    let (outer, inner) = (unique_name("nl"), unique_name("nk"));
    common::ip(&[
        "link",
        "add",
        &outer,
        "netns",
        &nat.name,
        "type",
        "veth",
        "peer",
        "name",
        &inner,
        "netns",
        &client.name,
    ]);
    nat.ip(&["address", "add", &format!("{lan}.1/24"), "dev", &outer]);
    nat.ip(&["link", "set", &outer, "up"]);
    client.ip(&["address", "add", &format!("{lan}.2/24"), "dev", &inner]);
    client.ip(&["link", "set", &inner, "up"]);
    client.ip(&["route", "add", "default", "via", &format!("{lan}.1")]);
    must(nat.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
    // Everything from the LAN leaves with the NAT's public address; unsolicited packets from
    // outside are dropped, as a home router does. (Without that drop, Linux conntrack records the
    // peer's first packet as a connection to the router itself, and the device's own packet to
    // that peer then gets another source port: a known race of hole punching through Linux.)
    let rules = format!(
        "table ip nat {{\n  chain post {{\n    type nat hook postrouting priority 100\n    \
         ip saddr {lan}.0/24 oifname != \"{outer}\" masquerade\n  }}\n}}\n\
         table ip filter {{\n  chain input {{\n    type filter hook input priority 0\n    \
         iifname != \"{outer}\" ct state new drop\n  }}\n}}\n"
    );
    let mut nft = nat.cmd("nft");
    nft.args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = nft.spawn().expect("nft");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("nft rules");
    }
    assert!(child.wait().expect("nft").success(), "nft -f: {rules}");
    Site {
        _nat: nat,
        client,
        public,
        inside: format!("{lan}.2"),
    }
}

/// Starts the agent in `ns` (a round every second) and waits until it runs.
fn start_agent(
    ns: &Netns,
    dir: &Path,
    ifname: &str,
    url: &str,
    key: Option<&str>,
) -> (Proc, JoinResponse) {
    let mut c = node_cmd(ns, dir);
    c.args(["join", url, "--wg-interface", ifname, "--interval", "1"]);
    if let Some(k) = key {
        c.args(["--setup-key", k]);
    }
    let (p, rx) = spawn_lines(c, "agent");
    wait_line(&rx, "agent running", Duration::from_secs(60));
    let saved = std::fs::read(dir.join("data").join("join.json")).expect("join.json");
    (p, serde_json::from_slice(&saved).expect("join answer"))
}

/// The private API of the server, through `answer`'s tunnel, as that device.
fn private_client(answer: &JoinResponse, url: &JoinUrl) -> PinnedClient {
    PinnedClient::new(JoinUrl {
        host: answer.server_tunnel_ipv4.clone(),
        port: 9101,
        pin: url.pin,
    })
    .expect("client")
    .with_bearer(&answer.token)
}

/// `wg show <ifname> endpoints` in `ns`: `(key, endpoint)` pairs.
fn wg_endpoints(ns: &Netns, ifname: &str) -> Vec<(String, String)> {
    must(ns.cmd("wg").args(["show", ifname, "endpoints"]))
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

#[test]
fn devices_behind_two_nats_get_each_others_mapped_endpoint_and_talk_directly() {
    let internet = Internet::new("ni", "198.18.61");
    let srv = Netns::new("ns");
    let srv_addr = internet.attach(&srv, 1);
    let a = site(&internet, 2, "10.61.1");
    let b = site(&internet, 3, "10.61.2");
    let (sif, aif, bif) = (unique_name("ns"), unique_name("na"), unique_name("nb"));
    srv.own_uapi_socket(&sif);
    a.client.own_uapi_socket(&aif);
    b.client.own_uapi_socket(&bif);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = |n: &str| -> PathBuf { tmp.path().join(n) };

    let (_server, url) = e2e_common::start_serve(&srv, &dir("srv"), &sif, &srv_addr, &[]);
    let url_text = url.to_string();
    let (_agent_a, ja) = start_agent(&a.client, &dir("a"), &aif, &url_text, None);
    // A link token from A (through its tunnel) puts B in A's group.
    let pa = private_client(&ja, &url);
    let link: serde_json::Value = a.client.block_on(|| async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match pa.post("/api/link-tokens", &serde_json::json!({})).await {
                Ok(r) => break r.json().expect("link token answer"),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("private API not reachable yet: {e:#}");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => panic!("POST /api/link-tokens through A's tunnel: {e:#}"),
            }
        }
    });
    let key = link["link_token"].as_str().expect("link_token").to_owned();
    let (_agent_b, jb) = start_agent(&b.client, &dir("b"), &bif, &url_text, Some(&key));
    assert_eq!(jb.group_id, ja.group_id, "B joins A's group");

    // A's view of B: the NAT mapping the server saw, not B's inside address. (The server dumps
    // its device every 5 s; B's agent reports its inside address every second meanwhile.)
    let b_node = jb.node_id.clone();
    let deadline = Instant::now() + Duration::from_secs(40);
    let peer_b = loop {
        let peers: PeersResponse = a.client.block_on(|| async {
            pa.get("/api/mesh/peers")
                .await
                .expect("GET /api/mesh/peers")
                .json()
                .expect("peers answer")
        });
        let p = peers.peers.into_iter().find(|p| p.node_id == b_node);
        if let Some(p) = p.filter(|p| p.endpoint_source.as_deref() == Some("observed")) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no server-observed endpoint for B within 40 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let endpoint = peer_b.endpoint.clone().expect("endpoint");
    let host = endpoint.rsplit_once(':').expect("ip:port").0.to_owned();
    assert_eq!(
        host, b.public,
        "A is given B's NAT mapping {endpoint}, not its inside address {}",
        b.inside
    );
    // The server's own device agrees: B's peer there has that very endpoint.
    let b_wg = jb_wg_key(&dir("b"));
    let seen = wg_endpoints(&srv, &sif);
    assert!(
        seen.iter().any(|(k, e)| *k == b_wg && *e == endpoint),
        "server device endpoints {seen:?} should list B at {endpoint}"
    );
    // B's status as A sees it: online, with the observed and the reported endpoint.
    let status: serde_json::Value = a.client.block_on(|| async {
        pa.get("/api/mesh/status")
            .await
            .expect("GET /api/mesh/status")
            .json()
            .expect("status answer")
    });
    let bs = status["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["node_id"] == serde_json::json!(b_node))
        .unwrap_or_else(|| panic!("B in {status}"))
        .clone();
    assert_eq!(bs["online"], serde_json::json!(true), "{bs}");
    assert_eq!(bs["observed_endpoint"], serde_json::json!(endpoint), "{bs}");
    let reported = bs["endpoint"].as_str().unwrap_or_default();
    assert!(
        reported.starts_with(&format!("{}:", b.inside)),
        "B reports its inside address: {bs}"
    );

    // Direct: A pings B's tunnel address (the server does not forward between devices).
    assert!(
        e2e_common::ping(&a.client, &jb.tunnel_ipv4, Duration::from_secs(40)),
        "A reaches B directly through both NATs"
    );
    assert!(
        e2e_common::ping(&b.client, &ja.tunnel_ipv4, Duration::from_secs(10)),
        "B reaches A directly through both NATs"
    );
    // On A's device, B's peer talks to B's NAT mapping.
    let on_a = wg_endpoints(&a.client, &aif);
    assert!(
        on_a.iter()
            .any(|(k, e)| *k == b_wg && e.starts_with(&format!("{}:", b.public))),
        "A's device endpoints {on_a:?} should reach B at {}",
        b.public
    );
}

/// The base64 WireGuard public key of the device whose data directory is `dir`.
fn jb_wg_key(dir: &Path) -> String {
    e2e_common::identity_in(dir).wireguard.public_base64()
}
