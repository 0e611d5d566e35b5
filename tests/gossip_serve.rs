//! Three `serve` processes on loopback (no dataplane: gossip and the store only) replicate one
//! signed log: every server's ops reach the others (same state hash and op count in
//! `/api/health`), a server killed with SIGKILL is declared dead by the others within seconds,
//! when restarted it catches up with what happened while it was down, and once the root revokes
//! it, its gossip connections are closed and its new handshakes refused.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lemonade_nexus::api::client::PinnedClient;
use lemonade_nexus::tls::JoinUrl;
use serde_json::Value;

mod serve_common;
use serve_common::{Proc, bin, spawn_serve};

fn server_cmd(dir: &Path, name: &str, gossip_port: u16) -> Command {
    let mut c = bin();
    c.arg("--data-dir")
        .arg(dir.join(name).join("data"))
        .arg("--master-key-file")
        .arg(dir.join(name).join("master.key"))
        .args(["--listen-api", "127.0.0.1:0", "--log-level", "warn"])
        .args(["--listen-gossip", &format!("127.0.0.1:{gossip_port}")]);
    c
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf8")
}

fn root_init(path: &Path) -> String {
    let mut c = bin();
    c.args(["root", "init", "--out"]).arg(path);
    ok(c.output().expect("root init"))
        .lines()
        .find_map(|l| l.strip_prefix("root public key:"))
        .expect("root public key printed")
        .trim()
        .to_owned()
}

/// Creates server `name`'s identity and store for cluster `root`; returns its key.
fn server_identity(dir: &Path, name: &str, root: &str) -> String {
    let mut c = server_cmd(dir, name, 0);
    c.args(["init", "--root", root]);
    ok(c.output().expect("init"));
    let mut c = server_cmd(dir, name, 0);
    c.args(["identity", "show", "--json"]);
    let v: Value = serde_json::from_str(&ok(c.output().expect("identity"))).expect("json");
    v["ed25519_public_key"].as_str().expect("key").to_owned()
}

fn enroll(root_key: &Path, server: &str, id: &str, out: &Path) {
    let mut c = bin();
    c.args(["enroll-server", server, "--id", id, "--root-key"])
        .arg(root_key)
        .arg("--out")
        .arg(out);
    ok(c.output().expect("enroll"));
}

/// A free UDP port on 127.0.0.1 (released just before the server binds it).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start(dir: &Path, name: &str, port: u16, root: &str, seeds: &[u16]) -> (Proc, JoinUrl) {
    let mut c = server_cmd(dir, name, port);
    c.args(["serve", "--no-dataplane", "--root", root, "--server-cert"])
        .arg(dir.join(format!("{name}.cert")));
    for s in seeds {
        c.args(["--seed-peer", &format!("127.0.0.1:{s}")]);
    }
    spawn_serve(c)
}

fn health(rt: &tokio::runtime::Runtime, url: &JoinUrl) -> Option<Value> {
    rt.block_on(async {
        let c = PinnedClient::new(url.clone()).ok()?;
        tokio::time::timeout(Duration::from_secs(3), c.get("/api/health"))
            .await
            .ok()?
            .ok()?
            .json()
            .ok()
    })
}

/// (state hash, op count) of a server.
fn state_of(h: &Value) -> (String, u64) {
    (
        h["state_hash"].as_str().unwrap_or_default().to_owned(),
        h["op_count"].as_u64().unwrap_or(0),
    )
}

/// The gossip status another server reports for the server whose gossip port is `port`.
fn peer_status(h: &Value, port: u16) -> Option<String> {
    h["gossip"]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["addr"] == format!("127.0.0.1:{port}"))
        .and_then(|p| p["status"].as_str().map(String::from))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn three_servers_replicate_detect_a_dead_one_and_catch_it_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let root_key = d.join("root.key");
    let root = root_init(&root_key);
    let names = ["a", "b", "c", "d"];
    let mut keys = Vec::new();
    for n in names {
        let k = server_identity(d, n, &root);
        enroll(
            &root_key,
            &k,
            &format!("srv-{n}"),
            &d.join(format!("{n}.cert")),
        );
        keys.push(k);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let (_a, url_a) = start(d, "a", ports[0], &root, &[]);
    let (_b, url_b) = start(d, "b", ports[1], &root, &[ports[0]]);
    let (c, url_c) = start(d, "c", ports[2], &root, &[ports[0]]);
    let urls = [url_a.clone(), url_b.clone(), url_c.clone()];

    // Every server's own ops (its admission and server node) reach the others.
    wait_for(
        "the three servers to converge",
        Duration::from_secs(30),
        || {
            let states: Vec<_> = urls
                .iter()
                .filter_map(|u| health(&rt, u).map(|h| state_of(&h)))
                .collect();
            states.len() == 3 && states.iter().all(|s| *s == states[0]) && states[0].1 >= 6
        },
    );
    wait_for(
        "everyone to see everyone alive",
        Duration::from_secs(20),
        || {
            let ha = health(&rt, &url_a);
            let hb = health(&rt, &url_b);
            matches!((ha, hb), (Some(ha), Some(hb))
            if peer_status(&ha, ports[2]).as_deref() == Some("alive")
                && peer_status(&hb, ports[2]).as_deref() == Some("alive")
                && peer_status(&hb, ports[0]).as_deref() == Some("alive"))
        },
    );

    // kill -9 c: a and b declare it dead within seconds.
    drop(c);
    let killed = Instant::now();
    wait_for("c to be declared dead", Duration::from_secs(20), || {
        [&url_a, &url_b].iter().all(|u| {
            health(&rt, u).is_some_and(|h| peer_status(&h, ports[2]).as_deref() == Some("dead"))
        })
    });
    eprintln!("c declared dead after {:?}", killed.elapsed());

    // While c is down, a appends an op: the root's revocation of d (never started).
    let mut rev = bin();
    rev.args(["revoke-server", &keys[3], "--root-key"])
        .arg(&root_key)
        .args(["--reason", "test"])
        .args([
            "--submit",
            &format!("https://{}:{}", url_a.host, url_a.port),
        ])
        .args(["--pin", &url_a.pin.to_string()]);
    ok(rev.output().expect("revoke"));
    wait_for("a and b to agree again", Duration::from_secs(20), || {
        let sa = health(&rt, &url_a).map(|h| state_of(&h));
        let sb = health(&rt, &url_b).map(|h| state_of(&h));
        sa.is_some() && sa == sb
    });

    // c restarts (same data directory) and catches up.
    let (_c, url_c) = start(d, "c", ports[2], &root, &[ports[0]]);
    wait_for("c to catch up", Duration::from_secs(30), || {
        let sa = health(&rt, &url_a).map(|h| state_of(&h));
        let sc = health(&rt, &url_c).map(|h| state_of(&h));
        sa.is_some() && sa == sc
    });
    wait_for("c to be alive again", Duration::from_secs(30), || {
        health(&rt, &url_a).is_some_and(|h| peer_status(&h, ports[2]).as_deref() == Some("alive"))
    });
    assert_eq!(
        peer_connected(&health(&rt, &url_a).expect("a"), ports[2]),
        Some(true)
    );

    // The root revokes c (submitted to b): a and b close c's connections and refuse it from then
    // on, although c keeps dialling its seed.
    let mut rev = bin();
    rev.args(["revoke-server", &keys[2], "--root-key"])
        .arg(&root_key)
        .args(["--reason", "retired"])
        .args([
            "--submit",
            &format!("https://{}:{}", url_b.host, url_b.port),
        ])
        .args(["--pin", &url_b.pin.to_string()]);
    ok(rev.output().expect("revoke c"));
    wait_for("a and b to cut c off", Duration::from_secs(20), || {
        [&url_a, &url_b]
            .iter()
            .all(|u| health(&rt, u).is_some_and(|h| peer_connected(&h, ports[2]) != Some(true)))
    });
    // c redials its seed every few seconds: still refused.
    std::thread::sleep(Duration::from_secs(7));
    for u in [&url_a, &url_b] {
        let h = health(&rt, u).expect("health");
        assert_ne!(peer_connected(&h, ports[2]), Some(true), "{h}");
    }
}

/// Whether another server reports a gossip connection to the server on `port`.
fn peer_connected(h: &Value, port: u16) -> Option<bool> {
    h["gossip"]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["addr"] == format!("127.0.0.1:{port}"))
        .and_then(|p| p["connected"].as_bool())
}
