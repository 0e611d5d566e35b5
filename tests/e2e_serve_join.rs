//! End to end in network namespaces (needs root; CI is root), with the userspace backend
//! (real `wireguard-go`): `lemonade-nexus serve` runs in namespace `srv`; a client in namespace
//! `cli` (joined to `srv` by a veth pair) joins over HTTPS with the pinned certificate of the
//! printed join URL, brings up its own WireGuard device from the join answer and pings the
//! server's tunnel address. Then the server is killed with SIGKILL, its WireGuard peer removed
//! behind its back, and after a restart the peer is back (reconciled from the store) and the
//! client's traffic flows again without re-joining.

#[path = "../netlink/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, keypair, must, unique_name};
use lemonade_nexus::api::client::PinnedClient;
use lemonade_nexus::api::join::JoinResponse;
use lemonade_nexus::identity::NodeKey;
use lemonade_nexus::tls::JoinUrl;
use lemonade_nexus_netlink::uapi::UapiBackend;
use lemonade_nexus_netlink::{DeviceConfig, PeerConfig, WgBackend};

const SRV_UNDERLAY: &str = "192.168.231.1";
const CLI_UNDERLAY: &str = "192.168.231.2";

/// A `serve` process; killed (SIGKILL) on drop.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve` inside `ns` and waits for its start-up summary; returns the join URL.
fn start_server(ns: &Netns, dir: &std::path::Path, ifname: &str) -> (Server, JoinUrl) {
    let mut child = ns
        .cmd(env!("CARGO_BIN_EXE_lemonade-nexus"))
        .args(["--config", "/dev/null", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .args([
            "--dataplane",
            "userspace",
            "--listen-api",
            &format!("{SRV_UNDERLAY}:9100"),
            "--log-level",
            "info",
            "serve",
            "--wg-interface",
            ifname,
            "--public-host",
            SRV_UNDERLAY,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start serve");
    let stdout = child.stdout.take().expect("stdout");
    let server = Server { child };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("serve: {line}");
            if let Some(url) = line.strip_prefix("join URL:") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("serve printed its join URL within 60 s");
    (server, JoinUrl::parse(&url).expect("valid join URL"))
}

fn wg_allowed_ips(ns: &Netns, ifname: &str) -> String {
    must(ns.cmd("wg").args(["show", ifname, "allowed-ips"]))
}

fn ping(ns: &Netns, to: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let ok = ns
            .cmd("ping")
            .args(["-c", "1", "-W", "1", to])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return true;
        }
    }
    false
}

#[test]
fn serve_join_traffic_and_recovery_after_kill_9() {
    let srv = Netns::new("es");
    let cli = Netns::new("ec");
    let (vs, vc) = (unique_name("vs"), unique_name("vc"));
    common::ip(&[
        "link", "add", &vs, "netns", &srv.name, "type", "veth", "peer", "name", &vc, "netns",
        &cli.name,
    ]);
    srv.ip(&["address", "add", &format!("{SRV_UNDERLAY}/24"), "dev", &vs]);
    srv.ip(&["link", "set", &vs, "up"]);
    cli.ip(&["address", "add", &format!("{CLI_UNDERLAY}/24"), "dev", &vc]);
    cli.ip(&["link", "set", &vc, "up"]);

    let sif = unique_name("ls");
    let cif = unique_name("lc");
    srv.own_uapi_socket(&sif);
    cli.own_uapi_socket(&cif);
    let dir = tempfile::tempdir().expect("tmp");

    let (server, url) = start_server(&srv, dir.path(), &sif);
    assert_eq!(url.host, SRV_UNDERLAY);

    // The client joins over HTTPS from its namespace, pinning the printed certificate.
    let key = NodeKey::from_seed(&[42; 32]);
    let (wg_private, wg_public) = keypair();
    let join_url = url.clone();
    let wg_pub_text = wg_public.to_string();
    let joined: JoinResponse = cli.block_on(|| async move {
        let c = PinnedClient::new(join_url).expect("client");
        c.join(&key, &wg_pub_text, Some("laptop"))
            .await
            .expect("join")
    });
    assert!(joined.peer_programmed, "the join answer waits for the peer");
    let allowed = wg_allowed_ips(&srv, &sif);
    let expected = format!(
        "{wg_public}\t{}/32 {}/128",
        joined.tunnel_ipv4, joined.tunnel_ipv6
    );
    assert!(
        allowed.contains(&expected),
        "wg show on the server: {allowed:?}, want {expected:?}"
    );

    // The client's own device, from the join answer.
    let answer = joined.clone();
    let dev_name = cif.clone();
    cli.block_on(|| async move {
        let b = UapiBackend::new();
        b.ensure_device(&dev_name).await.expect("client device");
        let desired = DeviceConfig {
            private_key: Some(wg_private),
            listen_port: None,
            fwmark: None,
            peers: vec![PeerConfig {
                public_key: answer.server_wg_pubkey.parse().expect("server wg key"),
                preshared_key: None,
                endpoint: Some(answer.server_wg_endpoint.parse().expect("endpoint")),
                persistent_keepalive: Some(5),
                allowed_ips: answer
                    .allowed_ips
                    .iter()
                    .map(|n| n.parse().expect("prefix"))
                    .collect(),
            }],
        };
        b.reconcile(&dev_name, &desired)
            .await
            .expect("client reconcile");
    });
    cli.ip(&[
        "address",
        "add",
        &format!("{}/10", joined.tunnel_ipv4),
        "dev",
        &cif,
    ]);
    cli.ip(&["link", "set", &cif, "up"]);
    assert!(
        ping(&cli, &joined.server_tunnel_ipv4, Duration::from_secs(15)),
        "client pings the server's tunnel address through WireGuard"
    );

    // kill -9, then the peer disappears behind the server's back.
    drop(server);
    must(
        srv.cmd("wg")
            .args(["set", &sif, "peer", &wg_public.to_string(), "remove"]),
    );
    assert!(!wg_allowed_ips(&srv, &sif).contains(&wg_public.to_string()));
    assert!(
        !ping(&cli, &joined.server_tunnel_ipv4, Duration::from_secs(2)),
        "no peer, no traffic"
    );

    // Restart: same cluster, same certificate, the peer comes back from the store.
    let (_server, url2) = start_server(&srv, dir.path(), &sif);
    assert_eq!(url2.pin, url.pin, "the generated certificate is kept");
    let allowed = wg_allowed_ips(&srv, &sif);
    assert!(allowed.contains(&expected), "after restart: {allowed:?}");
    assert!(
        ping(&cli, &joined.server_tunnel_ipv4, Duration::from_secs(15)),
        "traffic recovers without re-joining"
    );
}
