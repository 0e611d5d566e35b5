//! End to end for the client agent, `status` and `leave` (needs root; CI is root), in network
//! namespaces with the userspace backend (real `wireguard-go`): `serve` runs in namespace `srv`,
//! the agent (`join URL`, staying in the foreground) in namespace `cli`.
//!
//! - after a ping, `status --json` on the client shows the server peer with a recent handshake
//!   and traffic, and on the server the client's peer with a recent handshake;
//! - the agent corrects drift: the server peer removed from the client device behind its back
//!   comes back within a few rounds and traffic flows again;
//! - SIGTERM stops the agent cleanly; a restarted agent keeps its node and tunnel address;
//! - `leave` removes the client's interface and join state but keeps the identity: joining again
//!   gives the same address.

#[path = "../netlink/tests/common/mod.rs"]
mod common;
mod e2e_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Netns, must, run, unique_name};
use e2e_common::{Proc, ping, spawn_lines, veth_pair, wait_line};
use lemonade_nexus::api::join::JoinResponse;

const SRV_UNDERLAY: &str = "192.168.232.1";
const CLI_UNDERLAY: &str = "192.168.232.2";

fn bin(ns: &Netns) -> Command {
    ns.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"))
}

fn server_cmd(ns: &Netns, dir: &Path) -> Command {
    let mut c = bin(ns);
    c.args(["--config", "/dev/null", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .args(["--dataplane", "userspace"]);
    c
}

fn client_cmd(ns: &Netns, dir: &Path) -> Command {
    let mut c = bin(ns);
    c.args(["--config", "/dev/null", "--data-dir"])
        .arg(dir.join("client"))
        .arg("--master-key-file")
        .arg(dir.join("client-master.key"))
        .args(["--dataplane", "userspace"]);
    c
}

/// Starts the agent (`join URL` in the foreground, one round a second) and waits until it runs.
fn start_agent(ns: &Netns, dir: &Path, url: &str, ifname: &str) -> (Proc, JoinResponse) {
    let mut c = client_cmd(ns, dir);
    c.args([
        "join",
        url,
        "--hostname",
        "laptop",
        "--wg-interface",
        ifname,
        "--interval",
        "1",
    ]);
    let (p, rx) = spawn_lines(c, "agent");
    wait_line(&rx, "agent running", Duration::from_secs(60));
    (p, read_join(dir))
}

fn read_join(dir: &Path) -> JoinResponse {
    let saved = std::fs::read(dir.join("client").join("join.json")).expect("join.json");
    serde_json::from_slice(&saved).expect("join answer")
}

fn stop_agent(p: Proc) {
    stop_process(p, "agent")
}

/// Sends SIGTERM and waits for a clean exit.
fn stop_process(mut p: Proc, what: &str) {
    must(Command::new("kill").args(["-TERM", &p.child.id().to_string()]));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = p.child.try_wait().expect("wait") {
            assert!(
                status.success(),
                "{what} exits cleanly on SIGTERM: {status}"
            );
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_json(mut c: Command) -> serde_json::Value {
    let out = must(c.args(["status", "--json"]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

/// The server's peer row whose allowed IPs contain `addr/32`.
fn server_row(v: &serde_json::Value, addr: &str) -> serde_json::Value {
    let want = format!("{addr}/32");
    v["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| {
            p["allowed_ips"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == want.as_str()))
        })
        .unwrap_or_else(|| panic!("no peer with {want} in {v:#}"))
        .clone()
}

#[test]
fn agent_status_drift_restart_and_leave() {
    let srv = Netns::new("as");
    let cli = Netns::new("ac");
    veth_pair(&srv, &cli, SRV_UNDERLAY, CLI_UNDERLAY);
    let sif = unique_name("ls");
    let cif = unique_name("lc");
    srv.own_uapi_socket(&sif);
    cli.own_uapi_socket(&cif);
    let dir = tempfile::tempdir().expect("tmp");
    let dir = dir.path();

    let mut serve = server_cmd(&srv, dir);
    serve.args([
        "--listen-api",
        &format!("{SRV_UNDERLAY}:9100"),
        "serve",
        "--wg-interface",
        &sif,
        "--public-host",
        SRV_UNDERLAY,
    ]);
    let (server, srx) = spawn_lines(serve, "serve");
    let url = wait_line(&srx, "join URL:", Duration::from_secs(60));

    // The agent joins and stays up; traffic flows.
    let (agent, joined) = start_agent(&cli, dir, &url, &cif);
    assert!(
        ping(&cli, &joined.server_tunnel_ipv4, Duration::from_secs(15)),
        "client pings the server's tunnel address"
    );

    // status on the client: the server peer with a recent handshake and traffic both ways.
    let mut c = client_cmd(&cli, dir);
    c.args(["--log-level", "error"]);
    let s = status_json(c);
    assert_eq!(s["role"], "client");
    assert_eq!(s["tunnel_ipv4"], joined.tunnel_ipv4.as_str());
    assert_eq!(s["backend"], "userspace");
    assert_eq!(s["interface"], cif.as_str());
    assert_eq!(s["server"], format!("{SRV_UNDERLAY}:9100").as_str());
    let age = s["server_peer"]["handshake_age_secs"]
        .as_u64()
        .unwrap_or_else(|| panic!("a handshake happened: {s:#}"));
    assert!(age < 60, "recent handshake: {s:#}");
    assert!(s["server_peer"]["rx_bytes"].as_u64().expect("rx") > 0);
    assert!(s["server_peer"]["tx_bytes"].as_u64().expect("tx") > 0);

    // status on the server while it serves: the running server's health names its backend and
    // interface (no --wg-interface needed); the client's peer, recent handshake, its endpoint.
    let mut c = server_cmd(&srv, dir);
    c.args([
        "--listen-api",
        &format!("{SRV_UNDERLAY}:9100"),
        "--log-level",
        "error",
        "status",
        "--json",
    ]);
    let out = must(&mut c);
    let v: serde_json::Value = serde_json::from_str(&out).expect("server status json");
    assert_eq!(v["role"], "server");
    assert_eq!(v["backend"], "userspace");
    assert_eq!(v["interface"], sif.as_str(), "{v:#}");
    // "server running (backend userspace); state <16 hex> (<n> ops); gossip: <peers>"
    let health = v["health"].as_str().expect("health line");
    assert!(
        health.starts_with("server running (backend userspace); state "),
        "{v:#}"
    );
    assert!(health.contains(" ops); gossip: "), "{v:#}");
    let row = server_row(&v, &joined.tunnel_ipv4);
    assert!(
        row["handshake_age_secs"].as_u64().is_some_and(|a| a < 60),
        "server sees a recent handshake: {row:#}"
    );
    assert!(
        row["endpoint"]
            .as_str()
            .is_some_and(|e| e.starts_with(CLI_UNDERLAY)),
        "{row:#}"
    );

    // Drift: remove the server peer from the client device; the agent puts it back.
    must(
        cli.cmd("wg")
            .args(["set", &cif, "peer", &joined.server_wg_pubkey, "remove"]),
    );
    assert!(
        ping(&cli, &joined.server_tunnel_ipv4, Duration::from_secs(20)),
        "the agent restores the removed peer and traffic flows again"
    );

    // SIGTERM stops the agent cleanly; restarted, it keeps the node and the address.
    stop_agent(agent);
    let (agent, again) = start_agent(&cli, dir, &url, &cif);
    assert!(again.existing);
    assert_eq!(
        (&again.node_id, &again.tunnel_ipv4),
        (&joined.node_id, &joined.tunnel_ipv4)
    );
    assert!(ping(
        &cli,
        &joined.server_tunnel_ipv4,
        Duration::from_secs(15)
    ));
    stop_agent(agent);

    // leave: the interface and the join state go, the identity stays.
    let out = must(client_cmd(&cli, dir).arg("leave"));
    assert!(out.contains(&format!("removed interface {cif}")), "{out}");
    assert!(
        !run(cli.cmd("ip").args(["link", "show", &cif]))
            .status
            .success(),
        "the client interface is gone after leave"
    );
    assert!(!dir.join("client").join("join.json").exists());
    let st = run(client_cmd(&cli, dir).arg("status"));
    assert!(!st.status.success(), "status after leave is an error");
    assert!(
        String::from_utf8_lossy(&st.stderr).contains("neither a join state"),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    // Joining again (once) gives the same address and traffic flows.
    must(client_cmd(&cli, dir).args([
        "join",
        "--once",
        &url,
        "--hostname",
        "laptop",
        "--wg-interface",
        &cif,
    ]));
    let rejoined = read_join(dir);
    assert_eq!(rejoined.tunnel_ipv4, joined.tunnel_ipv4);
    assert!(ping(
        &cli,
        &joined.server_tunnel_ipv4,
        Duration::from_secs(15)
    ));

    // With the server stopped (SIGTERM closes the store cleanly), status reads the store: the
    // peer carries its hostname.
    stop_process(server, "serve");
    let mut c = server_cmd(&srv, dir);
    c.args([
        "--log-level",
        "error",
        "status",
        "--wg-interface",
        &sif,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&must(&mut c)).expect("json");
    assert_eq!(v["names"], "from the state store");
    assert!(
        v["health"]
            .as_str()
            .is_some_and(|h| h.starts_with("not reachable")),
        "{v:#}"
    );
    assert_eq!(server_row(&v, &joined.tunnel_ipv4)["name"], "laptop");
}
