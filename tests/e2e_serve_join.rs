//! End to end in network namespaces (needs root; CI is root), with the userspace backend
//! (real `wireguard-go`): `lemonade-nexus serve` runs in namespace `srv`; `lemonade-nexus join
//! URL` runs in namespace `cli` (joined to `srv` by a veth pair): it joins over HTTPS pinned to
//! the certificate in the printed join URL, brings up its own WireGuard device from the answer,
//! and pings the server's tunnel address. Then the server is killed with SIGKILL and its
//! WireGuard peer removed behind its back; after a restart the peer is back (reconciled from the
//! store) and traffic flows again without re-joining. Joining again from the same client data
//! directory keeps the node and the address.

#[path = "../netlink/tests/common/mod.rs"]
mod common;
mod e2e_common;

use std::time::Duration;

use common::{Netns, must, unique_name};
use e2e_common::{Proc, ping, start_serve, veth_pair};
use lemonade_nexus::api::join::JoinResponse;
use lemonade_nexus::tls::JoinUrl;

const SRV_UNDERLAY: &str = "192.168.231.1";
const CLI_UNDERLAY: &str = "192.168.231.2";

/// Starts `serve` inside `ns` and waits for its start-up summary; returns the join URL.
fn start_server(ns: &Netns, dir: &std::path::Path, ifname: &str) -> (Proc, JoinUrl) {
    start_serve(ns, dir, ifname, SRV_UNDERLAY, &["--log-level", "info"])
}

fn wg_allowed_ips(ns: &Netns, ifname: &str) -> String {
    must(ns.cmd("wg").args(["show", ifname, "allowed-ips"]))
}

#[test]
fn serve_join_traffic_and_recovery_after_kill_9() {
    let srv = Netns::new("es");
    let cli = Netns::new("ec");
    veth_pair(&srv, &cli, SRV_UNDERLAY, CLI_UNDERLAY);

    let sif = unique_name("ls");
    let cif = unique_name("lc");
    srv.own_uapi_socket(&sif);
    cli.own_uapi_socket(&cif);
    let dir = tempfile::tempdir().expect("tmp");

    let (server, url) = start_server(&srv, dir.path(), &sif);
    assert_eq!(url.host, SRV_UNDERLAY);

    // The client joins with `lemonade-nexus join URL` from its namespace: pinned HTTPS, then its
    // own WireGuard device (userspace) and addresses from the answer.
    let joined = client_join(&cli, dir.path(), &url, &cif);
    assert!(!joined.existing);
    assert!(joined.peer_programmed, "the join answer waits for the peer");
    let wg_public = client_wg_key(dir.path());
    let allowed = wg_allowed_ips(&srv, &sif);
    let expected = format!(
        "{wg_public}\t{}/32 {}/128",
        joined.tunnel_ipv4, joined.tunnel_ipv6
    );
    assert!(
        allowed.contains(&expected),
        "wg show on the server: {allowed:?}, want {expected:?}"
    );
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

    // A restarted client (join again with the same data directory) keeps its identity and address.
    let again = client_join(&cli, dir.path(), &url, &cif);
    assert!(again.existing);
    assert_eq!(
        (again.node_id, again.tunnel_ipv4),
        (joined.node_id, joined.tunnel_ipv4.clone())
    );
    assert!(ping(
        &cli,
        &joined.server_tunnel_ipv4,
        Duration::from_secs(15)
    ));
}

fn client_cmd(ns: &Netns, dir: &std::path::Path) -> std::process::Command {
    let mut c = ns.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"));
    c.args(["--config", "/dev/null", "--data-dir"])
        .arg(dir.join("client"))
        .arg("--master-key-file")
        .arg(dir.join("client-master.key"))
        .args(["--dataplane", "userspace"]);
    c
}

/// Runs `lemonade-nexus join` in `ns` and returns the answer it saved.
fn client_join(ns: &Netns, dir: &std::path::Path, url: &JoinUrl, ifname: &str) -> JoinResponse {
    let out = must(client_cmd(ns, dir).args([
        "join",
        "--once",
        &url.to_string(),
        "--hostname",
        "laptop",
        "--wg-interface",
        ifname,
    ]));
    eprintln!("join: {out}");
    let saved = std::fs::read(dir.join("client").join("join.json")).expect("join.json");
    serde_json::from_slice(&saved).expect("join answer")
}

fn client_wg_key(dir: &std::path::Path) -> String {
    let out = must(
        std::process::Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"))
            .args(["--config", "/dev/null", "--data-dir"])
            .arg(dir.join("client"))
            .arg("--master-key-file")
            .arg(dir.join("client-master.key"))
            .args(["identity", "show", "--json"]),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["wireguard_public_key"].as_str().expect("key").to_owned()
}
