//! Helpers shared by the end-to-end tests (`tests/e2e_*.rs`): a child process killed on drop,
//! its stdout read as a channel of lines, `serve` started in a namespace, a veth pair between two
//! namespaces, and ping. The
//! namespace harness itself is `netlink/tests/common` (each test declares it as `mod common`).
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::common::{Netns, unique_name};
use lemonade_nexus::tls::JoinUrl;

/// A child process killed (SIGKILL) on drop if still running.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` with stdout piped into a channel of lines (echoed to stderr with `tag`).
pub fn spawn_lines(mut cmd: Command, tag: &'static str) -> (Proc, Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("{tag}: {line}");
            let _ = tx.send(line);
        }
    });
    (Proc { child }, rx)
}

/// Waits for a line starting with `prefix`; returns the rest.
pub fn wait_line(rx: &Receiver<String>, prefix: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line starting with {prefix:?} within {within:?}"));
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.trim().to_owned();
        }
    }
}

/// Links namespaces `srv` and `cli` by a veth pair, addressed `srv_addr/24` and `cli_addr/24`.
pub fn veth_pair(srv: &Netns, cli: &Netns, srv_addr: &str, cli_addr: &str) {
    let (vs, vc) = (unique_name("vs"), unique_name("vc"));
    crate::common::ip(&[
        "link", "add", &vs, "netns", &srv.name, "type", "veth", "peer", "name", &vc, "netns",
        &cli.name,
    ]);
    srv.ip(&["address", "add", &format!("{srv_addr}/24"), "dev", &vs]);
    srv.ip(&["link", "set", &vs, "up"]);
    cli.ip(&["address", "add", &format!("{cli_addr}/24"), "dev", &vc]);
    cli.ip(&["link", "set", &vc, "up"]);
}

/// Pings `to` from `ns` until one answer arrives or `within` has passed.
pub fn ping(ns: &Netns, to: &str, within: Duration) -> bool {
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

/// Starts `serve` (userspace backend, API on `host:9100`, data under `dir`) inside `ns` with the
/// global options `extra`, and waits for its start-up summary; returns the join URL.
pub fn start_serve(
    ns: &Netns,
    dir: &std::path::Path,
    ifname: &str,
    host: &str,
    extra: &[&str],
) -> (Proc, JoinUrl) {
    // serve's backbone interface, named after the client interface (crate::backbone).
    ns.own_uapi_socket(&format!("{ifname}b"));
    let mut c = ns.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"));
    c.args(["--config", "/dev/null", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .args([
            "--dataplane",
            "userspace",
            "--listen-api",
            &format!("{host}:9100"),
        ])
        .args(extra)
        .args(["serve", "--wg-interface", ifname, "--public-host", host]);
    let (server, rx) = spawn_lines(c, "serve");
    let url = wait_line(&rx, "join URL:", Duration::from_secs(60));
    (server, JoinUrl::parse(&url).expect("valid join URL"))
}

/// The WireGuard backend under test: `userspace` (wireguard-go; the default, for hosts without
/// kernel WireGuard) or `kernel` (set `LN_E2E_DATAPLANE=kernel`, as inside User-Mode Linux).
pub fn dataplane() -> &'static str {
    match std::env::var("LN_E2E_DATAPLANE").as_deref() {
        Ok("kernel") => "kernel",
        Ok("userspace") | Err(_) => "userspace",
        Ok(other) => panic!("LN_E2E_DATAPLANE must be kernel or userspace, not {other:?}"),
    }
}

/// A shared underlay: a namespace holding one bridge that every attached namespace reaches
/// through its own veth (an "internet" where every host is one hop from every other).
pub struct Internet {
    pub ns: Netns,
    bridge: String,
    /// `a.b.c` of the /24 every attached host gets an address in.
    prefix: String,
}

impl Internet {
    /// A new underlay with addresses `prefix.N/24` (`prefix` like "192.168.240").
    pub fn new(tag: &str, prefix: &str) -> Internet {
        let ns = Netns::new(tag);
        let bridge = unique_name("ib");
        ns.ip(&["link", "add", &bridge, "type", "bridge"]);
        ns.ip(&["link", "set", &bridge, "up"]);
        // The test itself talks to the hosts from here (`prefix.254`).
        ns.ip(&[
            "address",
            "add",
            &format!("{prefix}.254/24"),
            "dev",
            &bridge,
        ]);
        Internet {
            ns,
            bridge,
            prefix: prefix.to_owned(),
        }
    }

    /// Attaches `host` at `prefix.n`; returns that address.
    pub fn attach(&self, host: &Netns, n: u8) -> String {
        let (outer, inner) = (unique_name("io"), unique_name("ii"));
        crate::common::ip(&[
            "link",
            "add",
            &outer,
            "netns",
            &self.ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
            "netns",
            &host.name,
        ]);
        self.ns
            .ip(&["link", "set", &outer, "master", &self.bridge, "up"]);
        let addr = format!("{}.{n}", self.prefix);
        host.ip(&["address", "add", &format!("{addr}/24"), "dev", &inner]);
        host.ip(&["link", "set", &inner, "up"]);
        addr
    }
}

/// The `lemonade-nexus` binary in `ns` with its data directory and master key under `dir` and
/// the dataplane under test.
pub fn node_cmd(ns: &Netns, dir: &std::path::Path) -> Command {
    let mut c = ns.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"));
    c.args(["--config", "/dev/null", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .args(["--dataplane", dataplane()]);
    c
}

/// The node identity in `dir` (created if missing), as `serve` and `join` will load it.
pub fn identity_in(dir: &std::path::Path) -> lemonade_nexus::identity::Identity {
    let rng = ring::rand::SystemRandom::new();
    let master = lemonade_nexus::identity::MasterKey::load_or_create(&dir.join("master.key"), &rng)
        .expect("master key");
    lemonade_nexus::identity::Identity::load_or_create(&dir.join("data"), &master, &rng)
        .expect("identity")
        .0
}

/// The cluster's root key, made with `lemonade-nexus root init` (on the host: it is offline).
pub struct ClusterRoot {
    pub key_file: std::path::PathBuf,
    pub public: String,
    dir: std::path::PathBuf,
}

/// The passphrase of the test root key (passed through the environment, as an operator would).
const ROOT_PASSPHRASE: &str = "e2e cluster root passphrase";

impl ClusterRoot {
    pub fn new(dir: &std::path::Path) -> ClusterRoot {
        std::fs::create_dir_all(dir).expect("root dir");
        let key_file = dir.join("root.key");
        let out = crate::common::must(
            Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"))
                .env("LEMONADE_NEXUS_ROOT_PASSPHRASE", ROOT_PASSPHRASE)
                .args(["--config", "/dev/null", "root", "init", "--out"])
                .arg(&key_file),
        );
        let public = out
            .lines()
            .find_map(|l| l.strip_prefix("root public key:"))
            .expect("root init prints the public key")
            .trim()
            .to_owned();
        ClusterRoot {
            key_file,
            public,
            dir: dir.to_owned(),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"));
        c.env("LEMONADE_NEXUS_ROOT_PASSPHRASE", ROOT_PASSPHRASE)
            .args(["--config", "/dev/null"]);
        c
    }

    /// `enroll-server`: the certificate file for `server` named `name`.
    pub fn enroll(&self, server: &str, name: &str) -> std::path::PathBuf {
        let out = self.dir.join(format!("{name}.cert"));
        let _ = std::fs::remove_file(&out);
        crate::common::must(
            self.cmd()
                .args(["enroll-server", server, "--id", name, "--root-key"])
                .arg(&self.key_file)
                .arg("--out")
                .arg(&out),
        );
        out
    }

    /// `revoke-server --submit`, run inside `from` (a namespace that reaches `url`).
    pub fn revoke(&self, from: &Netns, server: &str, url: &JoinUrl) -> String {
        let mut c = from.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"));
        c.env("LEMONADE_NEXUS_ROOT_PASSPHRASE", ROOT_PASSPHRASE)
            .args([
                "--config",
                "/dev/null",
                "revoke-server",
                server,
                "--root-key",
            ])
            .arg(&self.key_file)
            .args(["--reason", "e2e", "--submit", &url.to_string()]);
        crate::common::must(&mut c)
    }
}

/// One server of a test cluster: its namespace on an [`Internet`], directory, interfaces.
pub struct ClusterServer {
    /// First, so it is dropped (killed) before the namespace: a live server would recreate
    /// its devices (and their UAPI sockets) while the namespace is being removed.
    pub proc: Option<Proc>,
    pub name: String,
    pub ns: Netns,
    pub addr: String,
    pub dir: std::path::PathBuf,
    pub client_if: String,
    pub backbone_if: String,
    /// Its Ed25519 identity key (base64).
    pub key: String,
    pub cert: std::path::PathBuf,
    pub url: Option<JoinUrl>,
    /// Extra global options for `serve` (for example an overlay prefix; every server of a
    /// cluster needs the same).
    pub global_args: Vec<String>,
}

impl ClusterServer {
    /// A server `name` at `net`'s address `.n`, enrolled by `root` (not started).
    pub fn new(
        net: &Internet,
        root: &ClusterRoot,
        tmp: &std::path::Path,
        name: &str,
        n: u8,
    ) -> ClusterServer {
        let ns = Netns::new(&format!("s{n}"));
        let addr = net.attach(&ns, n);
        // The backbone interface gets serve's default name beside this client interface
        // (`<client if>b`), the one `status` looks for.
        let client_if = unique_name("cc");
        let backbone_if = format!("{client_if}b");
        ns.own_uapi_socket(&client_if);
        ns.own_uapi_socket(&backbone_if);
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).expect("server dir");
        let key = identity_in(&dir).node.public().to_string();
        let cert = root.enroll(&key, name);
        ClusterServer {
            name: name.to_owned(),
            ns,
            addr,
            dir,
            client_if,
            backbone_if,
            key,
            cert,
            proc: None,
            url: None,
            global_args: Vec::new(),
        }
    }

    /// Starts `serve` (with `--seed-peer` if given) and waits for its join URL.
    pub fn start(&mut self, root: &ClusterRoot, seed: Option<&str>) {
        let mut c = node_cmd(&self.ns, &self.dir);
        c.args(["--listen-api", &format!("{}:9100", self.addr)])
            .args(&self.global_args)
            .args([
                "serve",
                "--wg-interface",
                &self.client_if,
                "--public-host",
                &self.addr,
                "--server-name",
                &self.name,
                "--root",
                &root.public,
                "--server-cert",
            ])
            .arg(&self.cert);
        if let Some(s) = seed {
            c.args(["--seed-peer", s]);
        }
        let tag: &'static str = Box::leak(self.name.clone().into_boxed_str());
        let (p, rx) = spawn_lines(c, tag);
        let url = wait_line(&rx, "join URL:", Duration::from_secs(60));
        self.url = Some(JoinUrl::parse(&url).expect("join URL"));
        self.proc = Some(p);
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// SIGTERM and wait for the clean exit (the store is closed, so it can be read offline).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            crate::common::must(Command::new("kill").args(["-TERM", &p.child.id().to_string()]));
            let deadline = Instant::now() + Duration::from_secs(20);
            while p.child.try_wait().expect("wait").is_none() {
                assert!(
                    Instant::now() < deadline,
                    "{} did not stop on SIGTERM",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `ipam show --json` on the (stopped) server's store.
    pub fn ipam_offline(&self) -> serde_json::Value {
        let mut c = node_cmd(&self.ns, &self.dir);
        c.args(["--log-level", "error", "ipam", "show", "--json"]);
        serde_json::from_str(&crate::common::must(&mut c)).expect("ipam json")
    }

    pub fn url(&self) -> JoinUrl {
        self.url.clone().expect("started")
    }

    /// `wg show <backbone> peers`, sorted.
    pub fn backbone_peers(&self) -> Vec<String> {
        let mut v: Vec<String> =
            crate::common::must(self.ns.cmd("wg").args(["show", &self.backbone_if, "peers"]))
                .lines()
                .map(str::to_owned)
                .collect();
        v.sort();
        v
    }

    /// This server's backbone address (from its interface).
    pub fn backbone_address(&self) -> Option<String> {
        let out = crate::common::must(self.ns.cmd("ip").args([
            "-4",
            "-o",
            "address",
            "show",
            "dev",
            &self.backbone_if,
        ]));
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .map(str::to_owned)
    }
}

/// `GET <path>` on `url` from inside `ns`, as JSON; `None` if unreachable.
pub fn get_json(ns: &Netns, url: &JoinUrl, path: &str) -> Option<serde_json::Value> {
    let url = url.clone();
    let path = path.to_owned();
    ns.block_on(|| async move {
        let c = lemonade_nexus::api::client::PinnedClient::new(url).ok()?;
        let r = tokio::time::timeout(Duration::from_secs(3), c.get(&path))
            .await
            .ok()?
            .ok()?;
        r.json::<serde_json::Value>().ok()
    })
}

/// The state hash in `GET /api/health` of each server (`None`: unreachable), asked from `ns`.
pub fn state_hashes(ns: &Netns, servers: &[&ClusterServer]) -> Vec<Option<String>> {
    servers
        .iter()
        .map(|s| {
            get_json(ns, &s.url(), "/api/health")
                .and_then(|h| h["state_hash"].as_str().map(str::to_owned))
        })
        .collect()
}

/// Waits until every server answers with one same state hash; returns it and how long it took.
pub fn wait_converged(
    ns: &Netns,
    servers: &[&ClusterServer],
    within: Duration,
) -> (String, Duration) {
    let start = Instant::now();
    loop {
        let hashes = state_hashes(ns, servers);
        if let Some(Some(first)) = hashes.first()
            && hashes.iter().all(|h| h.as_ref() == Some(first))
        {
            return (first.clone(), start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "servers did not converge within {within:?}: {hashes:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One client device of a test cluster.
pub struct ClusterClient {
    /// First, so the agent is killed before the namespace goes (see [`ClusterServer::proc`]).
    pub proc: Option<Proc>,
    pub name: String,
    pub ns: Netns,
    pub ifname: String,
    pub dir: std::path::PathBuf,
    pub answer: Option<lemonade_nexus::api::join::JoinResponse>,
}

impl ClusterClient {
    pub fn new(net: &Internet, tmp: &std::path::Path, name: &str, n: u8) -> ClusterClient {
        let ns = Netns::new(&format!("c{n}"));
        net.attach(&ns, n);
        let ifname = unique_name("cw");
        ns.own_uapi_socket(&ifname);
        ClusterClient {
            name: name.to_owned(),
            ns,
            ifname,
            dir: tmp.join(name),
            proc: None,
            answer: None,
        }
    }

    /// Starts the agent (a round a second) against `url` and waits until it has joined,
    /// retrying for up to `within` (a setup key made on one server reaches the others by
    /// gossip). Returns the join answer.
    pub fn join(
        &mut self,
        url: &JoinUrl,
        setup_key: Option<&str>,
        within: Duration,
    ) -> lemonade_nexus::api::join::JoinResponse {
        let deadline = Instant::now() + within;
        loop {
            let mut c = node_cmd(&self.ns, &self.dir);
            c.args([
                "join",
                &url.to_string(),
                "--wg-interface",
                &self.ifname,
                "--hostname",
                &self.name,
                "--interval",
                "1",
            ]);
            if let Some(k) = setup_key {
                c.args(["--setup-key", k]);
            }
            let (mut p, rx) = spawn_lines(c, "agent");
            let started = Instant::now();
            let mut running = false;
            while started.elapsed() < Duration::from_secs(30) {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(l) if l.starts_with("agent running") => {
                        running = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if p.child.try_wait().expect("wait").is_some() {
                            break;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            if running {
                let saved =
                    std::fs::read(self.dir.join("data").join("join.json")).expect("join.json");
                let answer: lemonade_nexus::api::join::JoinResponse =
                    serde_json::from_slice(&saved).expect("join answer");
                self.proc = Some(p);
                self.answer = Some(answer.clone());
                return answer;
            }
            let _ = p.child.kill();
            assert!(
                Instant::now() < deadline,
                "{} could not join {url} within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    pub fn answer(&self) -> &lemonade_nexus::api::join::JoinResponse {
        self.answer.as_ref().expect("joined")
    }

    /// A reusable setup key for this device's group, made on its server's private API
    /// through its tunnel.
    pub fn make_setup_key(&self, url: &JoinUrl) -> String {
        let a = self.answer().clone();
        let private = JoinUrl {
            host: a.server_tunnel_ipv4.clone(),
            port: 9101,
            pin: url.pin,
        };
        let v: serde_json::Value = self.ns.block_on(|| async move {
            let c = lemonade_nexus::api::client::PinnedClient::new(private)
                .expect("client")
                .with_bearer(&a.token);
            let body = serde_json::json!({
                "group": a.group_id, "reusable": true, "expires_in_secs": 3600
            });
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match c.post("/api/setup-keys", &body).await {
                    Ok(r) => return r.json().expect("setup key answer"),
                    Err(e) => {
                        assert!(Instant::now() < deadline, "POST /api/setup-keys: {e:#}");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }
        });
        v["setup_key"].as_str().expect("setup_key").to_owned()
    }

    pub fn ping(&self, to: &str, within: Duration) -> bool {
        ping(&self.ns, to, within)
    }
}
