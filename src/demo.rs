//! `lemonade-nexus demo` (root): a whole cluster on one machine, in network namespaces.
//!
//! What it builds, all named `lnd<pid>…` so two demos never collide:
//! - an "internet": one namespace holding a bridge (192.168.250.0/24) every host hangs off;
//! - three servers (`s1`..`s3`, 192.168.250.1-3), each this binary's `serve` as a child process,
//!   admitted by a root key the demo makes in memory (a certificate per server); `s2` and `s3`
//!   join the cluster through `s1` (`--seed-peer`);
//! - four clients, this binary's `join` agent, in two groups spread over the servers so that
//!   same-group traffic crosses servers: `red-a` (via s1) and `red-b` (via s2), `blue-c` (via s3)
//!   and `blue-d` (via s1). The first device of a group joins with open registration (its own
//!   group), makes a reusable setup key on its server's private API through its tunnel, and the
//!   second device joins through another server with that key.
//!
//! Then every few seconds it prints a status table (servers: state hash, backbone peers with a
//! recent handshake; clients: tunnel address, server, handshake age) and pings between the
//! clients (same group: expected to answer; across groups: expected to be blocked).
//!
//! On Ctrl-C (SIGINT/SIGTERM), at the end of `--for`, or on any error, the [`Lab`] guard stops
//! every process it started and removes every namespace (with their links), UAPI socket and
//! directory it made.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use ring::signature::KeyPair;

use crate::api::join::JoinResponse;
use crate::tls::JoinUrl;

/// The underlay prefix (inside the demo's own namespaces only).
const NET: &str = "192.168.250";
/// The address the demo itself uses on the underlay (in the internet namespace).
const OBSERVER: u8 = 254;
/// A backbone peer counts as alive with a handshake this recent (WireGuard rekeys every 2 min).
const ALIVE_SECS: u64 = 180;

/// `demo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Stop by itself this long after the cluster is up (for example `20s`, `2m`), cleaning up
    /// as on Ctrl-C.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    pub run_for: Option<Duration>,
    /// Seconds between two status tables.
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    pub interval: u64,
}

/// The WireGuard implementation of every server and client of the demo: the global
/// `--dataplane` (`kernel` or `userspace`); `auto` means userspace here, so the demo runs the
/// same on every host (wireguard-go) unless kernel WireGuard is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoDataplane {
    Userspace,
    Kernel,
}

impl DemoDataplane {
    fn from_config(d: crate::config::Dataplane) -> DemoDataplane {
        match d {
            crate::config::Dataplane::Kernel => DemoDataplane::Kernel,
            crate::config::Dataplane::Auto | crate::config::Dataplane::Userspace => {
                DemoDataplane::Userspace
            }
        }
    }

    fn flag(self) -> &'static str {
        match self {
            DemoDataplane::Userspace => "userspace",
            DemoDataplane::Kernel => "kernel",
        }
    }
}

/// Parses `20s`, `2m`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m or h, like 20s"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{s:?}: the unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// Everything the demo made; dropping it removes all of it, whatever happened before.
struct Lab {
    /// `lnd<pid base36>`: every name the demo makes starts with it.
    prefix: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    /// WireGuard interfaces (their UAPI sockets are global files).
    interfaces: Vec<String>,
    children: Vec<(String, Child)>,
}

impl Lab {
    fn new() -> Result<Lab> {
        let prefix = format!("lnd{}", base36(std::process::id()));
        let dir = std::env::temp_dir().join(format!("lemonade-nexus-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Lab {
            prefix,
            dir,
            namespaces: Vec::new(),
            interfaces: Vec::new(),
            children: Vec::new(),
        })
    }

    /// `<prefix><suffix>`: at most 15 bytes, a valid interface name.
    fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn netns(&mut self, suffix: &str) -> Result<String> {
        let name = self.name(suffix);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name.clone());
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        Ok(name)
    }

    /// A command run inside namespace `ns`.
    fn cmd(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Hangs `ns` off the internet bridge at `NET.host`.
    fn attach(&self, inet: &str, bridge: &str, ns: &str, host: u8) -> Result<String> {
        let outer = self.name(&format!("o{host}"));
        let inner = self.name(&format!("i{host}"));
        run(Command::new("ip").args([
            "link", "add", &outer, "netns", inet, "type", "veth", "peer", "name", &inner, "netns",
            ns,
        ]))?;
        run(Command::new("ip").args(["-n", inet, "link", "set", &outer, "master", bridge, "up"]))?;
        let addr = format!("{NET}.{host}");
        run(Command::new("ip").args([
            "-n",
            ns,
            "address",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inner,
        ]))?;
        run(Command::new("ip").args(["-n", ns, "link", "set", &inner, "up"]))?;
        Ok(addr)
    }

    fn spawn(&mut self, what: &str, mut cmd: Command, log: &Path) -> Result<u32> {
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let pid = child.id();
        self.children.push((what.to_owned(), child));
        Ok(pid)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first (SIGTERM, then SIGKILL after a grace period), so no agent or server
        // reprograms what is being removed.
        for (_, c) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, c) in &mut self.children {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Removing a UAPI socket makes wireguard-go exit cleanly; the rest is killed below.
        for i in &self.interfaces {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{i}.sock"));
        }
        for ns in self.namespaces.iter().rev() {
            for _ in 0..3 {
                let pids = Command::new("ip")
                    .args(["netns", "pids", ns])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if pids.trim().is_empty() {
                    break;
                }
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn base36(mut v: u32) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// Runs a command that must succeed.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One server of the demo.
struct Server {
    name: String,
    ns: String,
    addr: String,
    dir: PathBuf,
    client_if: String,
    backbone_if: String,
    url: Option<JoinUrl>,
}

/// One client of the demo.
struct Client {
    name: &'static str,
    group: &'static str,
    server: usize,
    ns: String,
    dir: PathBuf,
    ifname: String,
    answer: Option<JoinResponse>,
}

/// The global options every child gets: its own data directory and master key, the dataplane.
fn base_cmd(ns: &str, dir: &Path, dataplane: DemoDataplane) -> Result<Command> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut c = Lab::cmd(ns, &exe.to_string_lossy());
    c.args(["--config", "/dev/null", "--log-level", "info", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .args(["--dataplane", dataplane.flag()]);
    Ok(c)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the demo until Ctrl-C or `--for`. Needs root.
pub fn demo_command(
    cfg: &crate::config::Config,
    args: DemoArgs,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let dataplane = DemoDataplane::from_config(cfg.dataplane);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut lab = Lab::new()?;
    let r = rt.block_on(demo(&mut lab, &args, dataplane, out));
    drop(lab);
    writeln!(
        out,
        "demo: cleaned up (namespaces, processes, interfaces, files)"
    )?;
    out.flush()?;
    r
}

async fn demo(
    lab: &mut Lab,
    args: &DemoArgs,
    dataplane: DemoDataplane,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stopped = async {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    };
    tokio::select! {
        r = run_demo(lab, args, dataplane, out) => r,
        why = stopped => {
            writeln!(out, "demo: stopping ({why})")?;
            Ok(())
        }
    }
}

async fn run_demo(
    lab: &mut Lab,
    args: &DemoArgs,
    dataplane: DemoDataplane,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    if !nix_is_root() {
        bail!("the demo needs root (it creates network namespaces): run it with sudo");
    }
    writeln!(out, "demo: building the cluster under {} ...", lab.prefix)?;
    out.flush()?;
    let inet = lab.netns("net")?;
    let bridge = lab.name("br");
    run(Command::new("ip").args(["-n", &inet, "link", "add", &bridge, "type", "bridge"]))?;
    run(Command::new("ip").args(["-n", &inet, "link", "set", &bridge, "up"]))?;
    run(Command::new("ip").args([
        "-n",
        &inet,
        "address",
        "add",
        &format!("{NET}.{OBSERVER}/24"),
        "dev",
        &bridge,
    ]))?;

    // The cluster root, in memory only: it certifies the three servers and is then forgotten.
    let rng = SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("cannot generate the root key"))?;
    let root = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("cannot load the root key"))?;
    let root_pub: crate::keys::PublicKey = crate::keys::PublicKey(
        root.public_key()
            .as_ref()
            .try_into()
            .context("root public key length")?,
    );

    let mut servers = Vec::new();
    for i in 1..=3u8 {
        let ns = lab.netns(&format!("s{i}"))?;
        let addr = lab.attach(&inet, &bridge, &ns, i)?;
        let dir = lab.dir.join(format!("s{i}"));
        let (client_if, backbone_if) = (lab.name(&format!("s{i}c")), lab.name(&format!("s{i}b")));
        lab.interfaces.push(client_if.clone());
        lab.interfaces.push(backbone_if.clone());
        servers.push(Server {
            name: format!("s{i}"),
            ns,
            addr,
            dir,
            client_if,
            backbone_if,
            url: None,
        });
    }
    for s in servers.iter_mut() {
        start_server(lab, s, &servers_seed(s), &root, &root_pub, dataplane)?;
    }
    for s in servers.iter_mut() {
        s.url = Some(wait_url(&s.dir.join("serve.log"), Duration::from_secs(60)).await?);
        writeln!(out, "server {}: {} up", s.name, s.addr)?;
        out.flush()?;
    }

    let mut clients = Vec::new();
    for (i, (name, group, server)) in [
        ("red-a", "red", 0usize),
        ("red-b", "red", 1),
        ("blue-c", "blue", 2),
        ("blue-d", "blue", 0),
    ]
    .into_iter()
    .enumerate()
    {
        let host = 11 + i as u8;
        let ns = lab.netns(&format!("c{host}"))?;
        lab.attach(&inet, &bridge, &ns, host)?;
        let ifname = lab.name(&format!("c{host}"));
        lab.interfaces.push(ifname.clone());
        clients.push(Client {
            name,
            group,
            server,
            ns,
            dir: lab.dir.join(name),
            ifname,
            answer: None,
        });
    }
    // Each group: the first device joins (its own group), makes a reusable setup key, and the
    // second joins another server with it (once the key has replicated there).
    for pair in [(0usize, 1usize), (2, 3)] {
        let url = servers[clients[pair.0].server].url.clone().context("url")?;
        let first = start_client(lab, &clients[pair.0], &url, None, dataplane).await?;
        writeln!(
            out,
            "client {} joined {} -> {}",
            clients[pair.0].name, servers[clients[pair.0].server].name, first.tunnel_ipv4
        )?;
        out.flush()?;
        let key = make_setup_key(&clients[pair.0].ns, &first, &url).await?;
        clients[pair.0].answer = Some(first);
        let url2 = servers[clients[pair.1].server].url.clone().context("url")?;
        let second = start_client(lab, &clients[pair.1], &url2, Some(&key), dataplane).await?;
        writeln!(
            out,
            "client {} joined {} with {}'s setup key -> {}",
            clients[pair.1].name,
            servers[clients[pair.1].server].name,
            clients[pair.0].name,
            second.tunnel_ipv4
        )?;
        out.flush()?;
        clients[pair.1].answer = Some(second);
    }

    writeln!(
        out,
        "demo: cluster up; Ctrl-C stops it and removes everything"
    )?;
    let deadline = args.run_for.map(|d| Instant::now() + d);
    loop {
        let table = status_table(&inet, &servers, &clients).await;
        write!(out, "{table}")?;
        out.flush()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            writeln!(out, "demo: stopping (--for elapsed)")?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(args.interval.max(1))).await;
    }
}

fn nix_is_root() -> bool {
    // The effective uid, from procfs (no libc dependency in the binary for one call).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The seed peer of a server: `s1` seeds the others.
fn servers_seed(s: &Server) -> Option<String> {
    (s.name != "s1").then(|| format!("{NET}.1:9102"))
}

fn start_server(
    lab: &mut Lab,
    s: &Server,
    seed: &Option<String>,
    root: &ring::signature::Ed25519KeyPair,
    root_pub: &crate::keys::PublicKey,
    dataplane: DemoDataplane,
) -> Result<()> {
    std::fs::create_dir_all(&s.dir)?;
    // The server's identity first, so the root can certify its key.
    let master = crate::identity::MasterKey::load_or_create(
        &s.dir.join("master.key"),
        &SystemRandom::new(),
    )?;
    let (id, _) = crate::identity::Identity::load_or_create(
        &s.dir.join("data"),
        &master,
        &SystemRandom::new(),
    )?;
    let cert = crate::trust::seal_server_cert(
        root,
        &crate::trust::ServerCert {
            server: id.node.public(),
            name: s.name.clone(),
            issued_at_ms: now_ms(),
            expires_at_ms: 0,
        },
    );
    let cert_path = s.dir.join("server.cert");
    // The one base64 line `enroll-server` writes.
    std::fs::write(&cert_path, format!("{}\n", STANDARD.encode(&cert)))?;
    let mut c = base_cmd(&s.ns, &s.dir, dataplane)?;
    c.args(["--listen-api", &format!("{}:9100", s.addr)])
        .args([
            "serve",
            "--wg-interface",
            &s.client_if,
            "--backbone-interface",
            &s.backbone_if,
            "--public-host",
            &s.addr,
            "--server-name",
            &s.name,
            "--root",
            &root_pub.to_string(),
            "--server-cert",
        ])
        .arg(&cert_path);
    if let Some(seed) = seed {
        c.args(["--seed-peer", seed]);
    }
    lab.spawn(&format!("server {}", s.name), c, &s.dir.join("serve.log"))?;
    Ok(())
}

/// Waits for `serve`'s "join URL:" line in its log.
async fn wait_url(log: &Path, within: Duration) -> Result<JoinUrl> {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find_map(|l| l.strip_prefix("join URL:")) {
            return JoinUrl::parse(l.trim()).map_err(|e| anyhow::anyhow!("{e}"));
        }
        if Instant::now() > deadline {
            bail!(
                "server did not start within {within:?}; its log {}:\n{}",
                log.display(),
                tail(&text, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts a client's agent and waits until it has joined; retries (a setup key made on one
/// server reaches the others by gossip within seconds).
async fn start_client(
    lab: &mut Lab,
    c: &Client,
    url: &JoinUrl,
    setup_key: Option<&str>,
    dataplane: DemoDataplane,
) -> Result<JoinResponse> {
    std::fs::create_dir_all(&c.dir)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let log = c.dir.join(format!("agent-{attempt}.log"));
        let mut cmd = base_cmd(&c.ns, &c.dir, dataplane)?;
        cmd.args([
            "join",
            &url.to_string(),
            "--wg-interface",
            &c.ifname,
            "--hostname",
            c.name,
            "--interval",
            "1",
        ]);
        if let Some(k) = setup_key {
            cmd.args(["--setup-key", k]);
        }
        lab.spawn(&format!("client {}", c.name), cmd, &log)?;
        let child_at = lab.children.len() - 1;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("agent running") {
                let saved = std::fs::read(c.dir.join("data").join("join.json"))
                    .context("the agent saved no join answer")?;
                return serde_json::from_slice(&saved).context("join answer");
            }
            let exited = matches!(lab.children[child_at].1.try_wait(), Ok(Some(_)));
            if exited {
                if Instant::now() > deadline {
                    bail!("client {} could not join: {}", c.name, tail(&text, 10));
                }
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "client {} did not join within 60 s: {}",
                    c.name,
                    tail(&text, 10)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A reusable setup key for the group of the device that joined with `answer`, made on its
/// server's private API through its tunnel (from inside the device's namespace).
async fn make_setup_key(ns: &str, answer: &JoinResponse, url: &JoinUrl) -> Result<String> {
    let private = JoinUrl {
        host: answer.server_tunnel_ipv4.clone(),
        port: 9101,
        pin: url.pin,
    };
    let token = answer.token.clone();
    let group = answer.group_id.clone();
    let path = format!("/run/netns/{ns}");
    let v: serde_json::Value = tokio::task::spawn_blocking(move || {
        lemonade_nexus_netlink::netns::run_in_netns(path, move || async move {
            let client = crate::api::client::PinnedClient::new(private)?.with_bearer(&token);
            let body = serde_json::json!({
                "group": group, "reusable": true, "expires_in_secs": 3600
            });
            // The tunnel may need a moment for its first handshake.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match client.post("/api/setup-keys", &body).await {
                    Ok(r) => return r.json::<serde_json::Value>(),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        })
    })
    .await??
    .context("POST /api/setup-keys through the tunnel")?;
    v["setup_key"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no setup key in the answer: {v}"))
}

/// `GET /api/health` of every server, from the demo's own address on the underlay.
async fn health(inet: &str, servers: &[Server]) -> Vec<Option<serde_json::Value>> {
    let urls: Vec<Option<JoinUrl>> = servers.iter().map(|s| s.url.clone()).collect();
    let path = format!("/run/netns/{inet}");
    tokio::task::spawn_blocking(move || {
        lemonade_nexus_netlink::netns::run_in_netns(path, move || async move {
            let mut out = Vec::new();
            for u in urls {
                let v = match u {
                    Some(u) => match crate::api::client::PinnedClient::new(u) {
                        Ok(c) => {
                            match tokio::time::timeout(Duration::from_secs(2), c.get("/api/health"))
                                .await
                            {
                                Ok(Ok(r)) => r.json::<serde_json::Value>().ok(),
                                _ => None,
                            }
                        }
                        Err(_) => None,
                    },
                    None => None,
                };
                out.push(v);
            }
            out
        })
    })
    .await
    .ok()
    .and_then(|r| r.ok())
    .unwrap_or_default()
}

/// `wg show <if> latest-handshakes` in `ns`: public key -> seconds since the handshake.
fn handshake_ages(ns: &str, ifname: &str) -> Vec<(String, Option<u64>)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let text = Lab::cmd(ns, "wg")
        .args(["show", ifname, "latest-handshakes"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let key = it.next()?.to_owned();
            let t: u64 = it.next()?.parse().ok()?;
            Some((key, (t > 0).then(|| now.saturating_sub(t))))
        })
        .collect()
}

/// One ping from `ns` to `to`: the round-trip time in ms, or `None`.
async fn ping(ns: &str, to: &str) -> Option<f64> {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1", to])
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("time=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|t| t.parse().ok())
}

async fn status_table(inet: &str, servers: &[Server], clients: &[Client]) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let healths = health(inet, servers).await;
    let hashes: Vec<Option<String>> = healths
        .iter()
        .map(|h| {
            h.as_ref()
                .and_then(|h| h["state_hash"].as_str().map(str::to_owned))
        })
        .collect();
    let _ = writeln!(
        t,
        "\n=== lemonade-nexus demo: {} servers, {} clients ===",
        servers.len(),
        clients.len()
    );
    let _ = writeln!(
        t,
        "{:<6} {:<16} {:<18} BACKBONE PEERS ALIVE",
        "SERVER", "UNDERLAY", "STATE HASH"
    );
    for (s, h) in servers.iter().zip(&hashes) {
        let peers = handshake_ages(&s.ns, &s.backbone_if);
        let alive = peers
            .iter()
            .filter(|(_, a)| a.is_some_and(|a| a < ALIVE_SECS))
            .count();
        let _ = writeln!(
            t,
            "{:<6} {:<16} {:<18} {}/{}",
            s.name,
            s.addr,
            h.as_deref()
                .map(|h| h.get(..16).unwrap_or(h))
                .unwrap_or("(down)"),
            alive,
            peers.len()
        );
    }
    let up: Vec<&String> = hashes.iter().flatten().collect();
    if up.len() == servers.len() && up.windows(2).all(|w| w[0] == w[1]) {
        let _ = writeln!(
            t,
            "state hashes: converged ({})",
            up[0].get(..16).unwrap_or(up[0])
        );
    } else {
        let _ = writeln!(t, "state hashes: not converged yet");
    }
    let _ = writeln!(
        t,
        "{:<8} {:<6} {:<14} {:<6} SERVER HANDSHAKE",
        "CLIENT", "GROUP", "TUNNEL", "SERVER"
    );
    for c in clients {
        let Some(a) = &c.answer else { continue };
        let age = handshake_ages(&c.ns, &c.ifname)
            .into_iter()
            .find(|(k, _)| *k == a.server_wg_pubkey)
            .and_then(|(_, age)| age);
        let _ = writeln!(
            t,
            "{:<8} {:<6} {:<14} {:<6} {}",
            c.name,
            c.group,
            a.tunnel_ipv4,
            servers[c.server].name,
            age.map(|a| format!("{a} s ago"))
                .unwrap_or_else(|| "never".into())
        );
    }
    for (i, from) in clients.iter().enumerate() {
        for to in clients.iter().skip(i + 1) {
            let Some(dst) = to.answer.as_ref().map(|a| a.tunnel_ipv4.clone()) else {
                continue;
            };
            let same = from.group == to.group;
            let rtt = ping(&from.ns, &dst).await;
            let via = if from.server == to.server {
                "same server"
            } else {
                "cross-server"
            };
            let verdict = match (same, rtt) {
                (true, Some(ms)) => format!("ok {ms:.2} ms"),
                (true, None) => "NO ANSWER (expected one)".into(),
                (false, None) => "blocked (other group, as expected)".into(),
                (false, Some(_)) => "ANSWERED ACROSS GROUPS (isolation broken)".into(),
            };
            let _ = writeln!(
                t,
                "ping {} ({}) -> {} ({}) [{}, {via}]: {verdict}",
                from.name,
                servers[from.server].name,
                to.name,
                servers[to.server].name,
                if same { "same group" } else { "other group" },
            );
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_garbage() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn names_fit_interface_names() {
        let lab_prefix = format!("lnd{}", base36(u32::MAX));
        for suffix in ["s3c", "s3b", "c14", "o14", "i14", "br", "net"] {
            assert!(format!("{lab_prefix}{suffix}").len() <= 15);
        }
    }
}
