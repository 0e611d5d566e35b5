//! The scenario end to end (needs root; CI is root), in network namespaces with the
//! userspace backend (real `wireguard-go`; `LN_E2E_DATAPLANE=kernel` runs it on kernel WireGuard): one server and three clients on one LAN (a bridge in
//! the server's namespace). A is the administrator (`serve --admin-key`); B joins A's group with
//! a setup key A made on the private API through the tunnel; C is another customer.
//!
//! - A and B ping the server's tunnel address and each other (directly: each agent programs the
//!   other as a peer from `GET /api/mesh/peers`); C pings the server but cannot reach A or B;
//! - the private API answers through the tunnel and not on the server's underlay address;
//! - after `kill -9` and a restart of the server, traffic recovers without re-joining;
//! - a restarted client keeps its node and address.

#[path = "../netlink/tests/common/mod.rs"]
mod common;
mod e2e_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, must, unique_name};
use e2e_common::{Proc, spawn_lines, wait_line};
use lemonade_nexus::api::client::PinnedClient;
use lemonade_nexus::api::join::JoinResponse;
use lemonade_nexus::tls::JoinUrl;

const SRV_UNDERLAY: &str = "192.168.233.1";

/// The WireGuard backend under test: `userspace` (wireguard-go; the default, for hosts without
/// kernel WireGuard) or `kernel` (set `LN_E2E_DATAPLANE=kernel`, as inside User-Mode Linux).
fn dataplane() -> &'static str {
    match std::env::var("LN_E2E_DATAPLANE").as_deref() {
        Ok("kernel") => "kernel",
        Ok("userspace") | Err(_) => "userspace",
        Ok(other) => panic!("LN_E2E_DATAPLANE must be kernel or userspace, not {other:?}"),
    }
}

/// The `lemonade-nexus` binary in `ns` with the data directory and master key under `dir`.
fn node_cmd(ns: &Netns, dir: &Path) -> Command {
    let mut c = ns.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"));
    c.args(["--config", "/dev/null", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .args(["--dataplane", dataplane()]);
    c
}

fn start_server(ns: &Netns, dir: &Path, ifname: &str, admin: Option<&str>) -> (Proc, String) {
    let mut c = node_cmd(ns, dir);
    c.args([
        "--listen-api",
        &format!("{SRV_UNDERLAY}:9100"),
        "serve",
        "--wg-interface",
        ifname,
        "--public-host",
        SRV_UNDERLAY,
    ]);
    if let Some(a) = admin {
        c.args(["--admin-key", a]);
    }
    let (p, rx) = spawn_lines(c, "serve");
    let url = wait_line(&rx, "join URL:", Duration::from_secs(60));
    (p, url)
}

/// One client: its namespace, interface, directory.
struct Client {
    ns: Netns,
    ifname: String,
    dir: PathBuf,
}

impl Client {
    /// Starts the agent (one round a second) and waits until it runs; returns its join answer.
    fn start(&self, url: &str, setup_key: Option<&str>) -> (Proc, JoinResponse) {
        let mut c = node_cmd(&self.ns, &self.dir);
        c.args([
            "join",
            url,
            "--wg-interface",
            &self.ifname,
            "--interval",
            "1",
        ]);
        if let Some(k) = setup_key {
            c.args(["--setup-key", k]);
        }
        let (p, rx) = spawn_lines(c, "agent");
        wait_line(&rx, "agent running", Duration::from_secs(60));
        let saved = std::fs::read(self.dir.join("data").join("join.json")).expect("join.json");
        (p, serde_json::from_slice(&saved).expect("join answer"))
    }

    fn ping(&self, to: &str, within: Duration) -> bool {
        e2e_common::ping(&self.ns, to, within)
    }

    /// Whether a TCP connection to `host:port` succeeds within 2 s.
    fn connects(&self, host: &str, port: u16) -> bool {
        self.ns
            .cmd("nc")
            .args(["-z", "-w", "2", host, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The WireGuard public keys of this client's device's peers.
    fn wg_peers(&self) -> Vec<String> {
        must(self.ns.cmd("wg").args(["show", &self.ifname, "peers"]))
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// Stops an agent with SIGTERM and waits for its clean exit.
fn stop(mut p: Proc) {
    must(Command::new("kill").args(["-TERM", &p.child.id().to_string()]));
    let deadline = Instant::now() + Duration::from_secs(15);
    while p.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_clients_group_isolation_private_api_and_restarts() {
    let srv = Netns::new("ts");
    let tmp = tempfile::tempdir().expect("tmp");
    let br = unique_name("tb");
    srv.ip(&["link", "add", &br, "type", "bridge"]);
    srv.ip(&["address", "add", &format!("{SRV_UNDERLAY}/24"), "dev", &br]);
    srv.ip(&["link", "set", &br, "up"]);
    let client = |tag: &str, host: u8| {
        let ns = Netns::new(tag);
        let (outer, inner) = (unique_name("to"), unique_name("ti"));
        common::ip(&[
            "link", "add", &outer, "netns", &srv.name, "type", "veth", "peer", "name", &inner,
            "netns", &ns.name,
        ]);
        srv.ip(&["link", "set", &outer, "master", &br, "up"]);
        ns.ip(&[
            "address",
            "add",
            &format!("192.168.233.{host}/24"),
            "dev",
            &inner,
        ]);
        ns.ip(&["link", "set", &inner, "up"]);
        let ifname = unique_name("tw");
        ns.own_uapi_socket(&ifname);
        let dir = tmp.path().join(tag);
        Client { ns, ifname, dir }
    };
    let (a, b, c) = (client("ta", 2), client("tb", 3), client("tc", 4));
    let sif = unique_name("tsw");
    srv.own_uapi_socket(&sif);
    let sdir = tmp.path().join("server");

    // A's identity exists before the server, which names it the first administrator.
    let rng = ring::rand::SystemRandom::new();
    let master =
        lemonade_nexus::identity::MasterKey::load_or_create(&a.dir.join("master.key"), &rng)
            .expect("master key");
    let (a_id, _) =
        lemonade_nexus::identity::Identity::load_or_create(&a.dir.join("data"), &master, &rng)
            .expect("identity");
    let admin = a_id.node.public().to_string();
    let (server, url) = start_server(&srv, &sdir, &sif, Some(&admin));

    let (agent_a, ja) = a.start(&url, None);
    assert!(
        a.ping(&ja.server_tunnel_ipv4, Duration::from_secs(15)),
        "A pings the server's tunnel address"
    );

    // The private API through A's tunnel: A (admin) makes a setup key for its own group.
    let pin = JoinUrl::parse(&url).expect("join url").pin;
    let gw = ja.server_tunnel_ipv4.clone();
    let (token, group) = (ja.token.clone(), ja.group_id.clone());
    let created: serde_json::Value = a.ns.block_on(|| async move {
        let private = PinnedClient::new(JoinUrl {
            host: gw,
            port: 9101,
            pin,
        })
        .expect("client")
        .with_bearer(&token);
        private
            .post(
                "/api/setup-keys",
                &serde_json::json!({ "group": group, "expires_in_secs": 600 }),
            )
            .await
            .expect("POST /api/setup-keys through the tunnel")
            .json()
            .expect("setup key answer")
    });
    let key = created["setup_key"].as_str().expect("setup_key").to_owned();

    let (agent_b, jb) = b.start(&url, Some(&key));
    assert_eq!(jb.group_id, ja.group_id, "B joins A's group with the key");
    let (_agent_c, jc) = c.start(&url, None);
    assert_ne!(jc.group_id, ja.group_id, "C is another customer");

    for (who, cl) in [("A", &a), ("B", &b), ("C", &c)] {
        assert!(
            cl.ping(&ja.server_tunnel_ipv4, Duration::from_secs(15)),
            "{who} pings the server's tunnel address"
        );
    }
    assert!(
        a.ping(&jb.tunnel_ipv4, Duration::from_secs(30)),
        "A pings B"
    );
    assert!(
        b.ping(&ja.tunnel_ipv4, Duration::from_secs(30)),
        "B pings A"
    );
    assert!(
        a.ping(&jb.tunnel_ipv6, Duration::from_secs(15)),
        "A pings B over IPv6"
    );
    assert!(
        b.ping(&ja.server_tunnel_ipv6, Duration::from_secs(15)),
        "B pings the server over IPv6"
    );
    // Directly: each has the other as a WireGuard peer besides the server; C has only the server.
    assert_eq!(a.wg_peers().len(), 2, "A: server and B");
    assert_eq!(b.wg_peers().len(), 2, "B: server and A");
    // `status` on A shows B as a group peer with a recent handshake.
    let mut st = node_cmd(&a.ns, &a.dir);
    st.args(["--log-level", "error", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&must(&mut st)).expect("status json");
    let peers = v["group_peers"].as_array().expect("group_peers");
    let want = format!("{}/32", jb.tunnel_ipv4);
    assert!(
        peers.len() == 1
            && peers[0]["allowed_ips"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == want.as_str()))
            && peers[0]["handshake_age_secs"].as_u64().is_some(),
        "A's status names B as a group peer with a handshake: {v:#}"
    );
    let endpoints = must(a.ns.cmd("wg").args(["show", &a.ifname, "endpoints"]));
    assert!(
        endpoints.contains("192.168.233.3:"),
        "A reaches B at B's own underlay address: {endpoints}"
    );
    assert_eq!(
        c.wg_peers(),
        vec![ja.server_wg_pubkey.clone()],
        "C: server only"
    );
    assert!(
        !c.ping(&ja.tunnel_ipv4, Duration::from_secs(3)),
        "C cannot reach A"
    );
    assert!(
        !c.ping(&jb.tunnel_ipv4, Duration::from_secs(3)),
        "C cannot reach B"
    );

    // Even a server host that forwards IP between its clients does not connect the groups:
    // the clients accept from the server peer only the server's own addresses.
    must(srv.cmd("sysctl").args(["-w", "net.ipv4.ip_forward=1"]));
    assert!(
        !c.ping(&ja.tunnel_ipv4, Duration::from_secs(3)),
        "C cannot reach A through a forwarding server"
    );
    must(srv.cmd("sysctl").args(["-w", "net.ipv4.ip_forward=0"]));

    // The private API: through the tunnel yes, on the public plane no.
    assert!(
        c.connects(&ja.server_tunnel_ipv4, 9101),
        "private API through the tunnel"
    );
    assert!(
        !c.connects(SRV_UNDERLAY, 9101),
        "the private API is not on the server's underlay address"
    );
    assert!(c.connects(SRV_UNDERLAY, 9100), "(the public API is)");

    // kill -9 and restart the server: traffic recovers, the agents did not re-enroll by hand.
    drop(server);
    let (_server, url2) = start_server(&srv, &sdir, &sif, None);
    assert_eq!(url2, url, "same certificate after restart");
    for (who, cl) in [("A", &a), ("B", &b), ("C", &c)] {
        assert!(
            cl.ping(&ja.server_tunnel_ipv4, Duration::from_secs(30)),
            "{who} reaches the server after its restart"
        );
    }
    assert!(
        a.ping(&jb.tunnel_ipv4, Duration::from_secs(15)),
        "A pings B after the restart"
    );
    assert!(
        !c.ping(&ja.tunnel_ipv4, Duration::from_secs(3)),
        "C still cannot reach A"
    );

    // A restarted client keeps its node and address, and traffic flows again.
    stop(agent_b);
    let (_agent_b, again) = b.start(&url, None);
    assert!(again.existing);
    assert_eq!(
        (&again.node_id, &again.tunnel_ipv4, &again.group_id),
        (&jb.node_id, &jb.tunnel_ipv4, &jb.group_id)
    );
    assert!(
        b.ping(&ja.tunnel_ipv4, Duration::from_secs(30)),
        "B pings A after its restart"
    );
    drop(agent_a);
}
