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
//! A server that exits while starting (for example `--dataplane kernel` on a kernel without
//! WireGuard) fails the demo at once, with the reason from its log.
//!
//! It then prints, once, which name is which (namespaces, addresses, interfaces, the log
//! directory) and what the tables mean, and waits until the cluster has settled (`settle`:
//! state hashes agree, every backbone peer and client has a handshake, every same-group pair
//! answers), so the first table reports no missing answer that is merely not there yet. Then
//! every few seconds it prints a status table (servers: state hash, backbone peers with a recent
//! handshake; clients: tunnel address, server, handshake age) and pings between the clients
//! (same group: expected to answer; across groups: expected to be blocked). What a table shows
//! is an `Observation`; what is missing from it and how it is printed are pure functions.
//!
//! On Ctrl-C (SIGINT/SIGTERM), at the end of `--for`, or on any error (printed first), the
//! [`Lab`] guard stops every process it started and removes every namespace (with their links),
//! UAPI socket and directory it made, the logs too (a failure quotes the log lines it needs).

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

    /// Starts `cmd` with its output in `log`; returns its index in `children`.
    fn spawn(&mut self, what: &str, mut cmd: Command, log: &Path) -> Result<usize> {
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        self.children.push((what.to_owned(), child));
        Ok(self.children.len() - 1)
    }

    /// The exit status of child `i` once it has exited (and is reaped).
    fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.children.get_mut(i)?.1.try_wait().ok().flatten()
    }
}

/// `kill -<signal> <pid>`, quietly: the process may have exited since it was listed.
fn signal(sig: &str, pid: &str) {
    let _ = Command::new("kill")
        .args([sig, pid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first (SIGTERM, then SIGKILL after a grace period), so no agent or server
        // reprograms what is being removed. A child already reaped (an agent attempt that
        // exited) is skipped: its pid is no longer ours.
        for (_, c) in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                signal("-TERM", &c.id().to_string());
            }
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
                    .stderr(Stdio::null())
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if pids.trim().is_empty() {
                    break;
                }
                for pid in pids.split_whitespace() {
                    signal("-KILL", pid);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
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
    /// Its `serve` process: an index into [`Lab::children`].
    child: Option<usize>,
}

/// One client of the demo.
struct Client {
    name: &'static str,
    group: &'static str,
    server: usize,
    ns: String,
    addr: String,
    dir: PathBuf,
    ifname: String,
    answer: Option<JoinResponse>,
    /// The log of its running agent.
    log: Option<PathBuf>,
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

/// Runs the demo until Ctrl-C or `--for`. Needs root. On failure it prints the reason first,
/// then removes everything it made (the logs too: the reason quotes the lines that matter).
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
    if let Err(e) = &r {
        writeln!(out, "demo: failed: {e:#}")?;
        out.flush()?;
    }
    drop(lab);
    writeln!(
        out,
        "demo: cleaned up (namespaces, processes, interfaces, files)"
    )?;
    out.flush()?;
    r.map_err(|e| match e.downcast::<std::io::Error>() {
        Ok(io) => anyhow::Error::from(io),
        Err(_) => anyhow::anyhow!("the demo failed (the reason is printed above)"),
    })
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

    let mut servers = start_servers(lab, &inet, &bridge, dataplane)?;
    wait_servers(lab, &mut servers, out).await?;
    let clients = start_clients(lab, &inet, &bridge, &servers, dataplane, out).await?;

    write!(out, "{}", map_text(lab, &inet, &bridge, &servers, &clients))?;
    writeln!(
        out,
        "demo: waiting until the servers agree, every backbone and client tunnel has a \
         handshake and every same-group pair answers (at most {} s) ...",
        SETTLE_WITHIN.as_secs()
    )?;
    out.flush()?;
    let first = settle(&inet, &servers, &clients, out).await?;
    writeln!(
        out,
        "demo: cluster up; Ctrl-C stops it and removes everything"
    )?;
    write!(out, "{}", legend(args.interval.max(1)))?;
    write!(out, "{}", first.render())?;
    out.flush()?;
    let deadline = args.run_for.map(|d| Instant::now() + d);
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            writeln!(out, "demo: stopping (--for elapsed)")?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(args.interval.max(1))).await;
        let obs = observe(&inet, &servers, &clients).await;
        write!(out, "{}", obs.render())?;
        out.flush()?;
    }
}

/// How long the servers may take to start, and the cluster to settle before the first table.
const START_WITHIN: Duration = Duration::from_secs(60);
const SETTLE_WITHIN: Duration = Duration::from_secs(90);
/// A ping probes every 0.2 s for this long before its pair counts as not answering.
const PING_WITHIN_SECS: u32 = 2;

/// Observes until nothing expected is missing (or [`SETTLE_WITHIN`] is over, then says what
/// still is); returns the observation the first table shows.
async fn settle(
    inet: &str,
    servers: &[Server],
    clients: &[Client],
    out: &mut dyn std::io::Write,
) -> Result<Observation> {
    let started = Instant::now();
    loop {
        let obs = observe(inet, servers, clients).await;
        let missing = obs.missing();
        if missing.is_empty() {
            writeln!(
                out,
                "demo: ready after {:.1} s",
                started.elapsed().as_secs_f64()
            )?;
            return Ok(obs);
        }
        if started.elapsed() > SETTLE_WITHIN {
            writeln!(
                out,
                "demo: after {} s still missing: {}",
                SETTLE_WITHIN.as_secs(),
                missing.join("; ")
            )?;
            return Ok(obs);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The three servers' namespaces, hung off the internet, each started as `serve`.
fn start_servers(
    lab: &mut Lab,
    inet: &str,
    bridge: &str,
    dataplane: DemoDataplane,
) -> Result<Vec<Server>> {
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
        let addr = lab.attach(inet, bridge, &ns, i)?;
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
            child: None,
        });
    }
    for s in servers.iter_mut() {
        s.child = Some(start_server(
            lab,
            s,
            &servers_seed(s),
            &root,
            &root_pub,
            dataplane,
        )?);
    }
    Ok(servers)
}

/// Waits for every server's join URL. A server that exits first fails the demo at once, with
/// the reason it gave.
async fn wait_servers(
    lab: &mut Lab,
    servers: &mut [Server],
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        for s in servers.iter_mut().filter(|s| s.url.is_none()) {
            let log = s.dir.join("serve.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(url) = join_url(&text)? {
                s.url = Some(url);
                writeln!(out, "server {}: {} up", s.name, s.addr)?;
                out.flush()?;
                continue;
            }
            if let Some(status) = s.child.and_then(|i| lab.exited(i)) {
                // Read again: it may have written its last words after the read above.
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!(
                    "server {} exited during start-up ({status}): {}",
                    s.name,
                    reason(&text)
                );
            }
        }
        let waiting: Vec<&Server> = servers.iter().filter(|s| s.url.is_none()).collect();
        let Some(first) = waiting.first() else {
            return Ok(());
        };
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(first.dir.join("serve.log")).unwrap_or_default();
            bail!(
                "server {} did not start within {} s; the last lines of its log:\n{}",
                first.name,
                START_WITHIN.as_secs(),
                tail(&text, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The join URL `serve` prints (`join URL: ...`), once it has.
fn join_url(log: &str) -> Result<Option<JoinUrl>> {
    match log.lines().find_map(|l| l.strip_prefix("join URL:")) {
        Some(u) => Ok(Some(
            JoinUrl::parse(u.trim()).map_err(|e| anyhow::anyhow!("{e}"))?,
        )),
        None => Ok(None),
    }
}

/// Why a process stopped, from its log: its `error:` lines, else its last lines.
fn reason(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("error: "))
        .collect();
    if errors.is_empty() {
        let t = tail(log, 10);
        if t.trim().is_empty() {
            "it printed nothing".into()
        } else {
            format!("its last lines:\n{t}")
        }
    } else {
        errors.join("; ")
    }
}

/// The four clients: each group's first device joins (its own group), makes a reusable setup
/// key, and the second joins another server with it (once the key has replicated there).
async fn start_clients(
    lab: &mut Lab,
    inet: &str,
    bridge: &str,
    servers: &[Server],
    dataplane: DemoDataplane,
    out: &mut dyn std::io::Write,
) -> Result<Vec<Client>> {
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
        let addr = lab.attach(inet, bridge, &ns, host)?;
        let ifname = lab.name(&format!("c{host}"));
        lab.interfaces.push(ifname.clone());
        clients.push(Client {
            name,
            group,
            server,
            ns,
            addr,
            dir: lab.dir.join(name),
            ifname,
            answer: None,
            log: None,
        });
    }
    for (a, b) in [(0usize, 1usize), (2, 3)] {
        let url = servers[clients[a].server].url.clone().context("url")?;
        let (first, log) = start_client(lab, &clients[a], &url, None, dataplane).await?;
        writeln!(
            out,
            "client {} joined {} -> {}",
            clients[a].name, servers[clients[a].server].name, first.tunnel_ipv4
        )?;
        out.flush()?;
        let key = make_setup_key(&clients[a].ns, &first, &url).await?;
        clients[a].answer = Some(first);
        clients[a].log = Some(log);
        let url2 = servers[clients[b].server].url.clone().context("url")?;
        let (second, log) = start_client(lab, &clients[b], &url2, Some(&key), dataplane).await?;
        writeln!(
            out,
            "client {} joined {} with {}'s setup key -> {}",
            clients[b].name, servers[clients[b].server].name, clients[a].name, second.tunnel_ipv4
        )?;
        out.flush()?;
        clients[b].answer = Some(second);
        clients[b].log = Some(log);
    }
    Ok(clients)
}

/// Which name is which: every server and client with its namespace, addresses and interfaces,
/// and where the logs are. Printed once.
fn map_text(lab: &Lab, inet: &str, bridge: &str, servers: &[Server], clients: &[Client]) -> String {
    use std::fmt::Write;
    let rel = |p: &Path| {
        p.strip_prefix(&lab.dir)
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| p.display().to_string())
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "demo: who is where (look inside with `ip netns exec <namespace> ...`):"
    );
    let _ = writeln!(
        t,
        "  {:<8} namespace {:<10} bridge {} {NET}.0/24 (the demo watches from {NET}.{OBSERVER})",
        "internet", inet, bridge
    );
    for s in servers {
        let tunnel = clients
            .iter()
            .find(|c| servers[c.server].name == s.name)
            .and_then(|c| c.answer.as_ref())
            .map(|a| a.server_tunnel_ipv4.as_str())
            .unwrap_or("-");
        let _ = writeln!(
            t,
            "  {:<8} namespace {:<10} underlay {:<15} tunnel {:<13} WireGuard {} (clients), {} (backbone); log {}",
            s.name,
            s.ns,
            s.addr,
            tunnel,
            s.client_if,
            s.backbone_if,
            rel(&s.dir.join("serve.log"))
        );
    }
    for c in clients {
        let tunnel = c
            .answer
            .as_ref()
            .map(|a| a.tunnel_ipv4.as_str())
            .unwrap_or("-");
        let _ = writeln!(
            t,
            "  {:<8} namespace {:<10} underlay {:<15} tunnel {:<13} client of {}, group {}; WireGuard {}; log {}",
            c.name,
            c.ns,
            c.addr,
            tunnel,
            servers[c.server].name,
            c.group,
            c.ifname,
            c.log.as_deref().map(rel).unwrap_or_else(|| "-".into())
        );
    }
    let _ = writeln!(
        t,
        "demo: logs in {}/ (removed with everything else when the demo ends)",
        lab.dir.display()
    );
    t
}

/// One line per part of the table: what it shows.
fn legend(interval: u64) -> String {
    format!(
        "demo: a table every {interval} s:\n  \
         servers: each server's hash of its replicated state (one hash: converged) and how many \
         of the other servers it had a backbone WireGuard handshake with in the last {ALIVE_SECS} s\n  \
         clients: each device's tunnel address, the server it joined and the age of its last \
         WireGuard handshake with it\n  \
         pings:   a ping between two devices' tunnel addresses (up to {PING_WITHIN_SECS} s): \
         same group must answer (device to device, also across servers), other groups must be \
         blocked\n"
    )
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

/// Starts `s`'s `serve`; returns its index in [`Lab::children`].
fn start_server(
    lab: &mut Lab,
    s: &Server,
    seed: &Option<String>,
    root: &ring::signature::Ed25519KeyPair,
    root_pub: &crate::keys::PublicKey,
    dataplane: DemoDataplane,
) -> Result<usize> {
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
    lab.spawn(&format!("server {}", s.name), c, &s.dir.join("serve.log"))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts a client's agent and waits until it has joined; retries (a setup key made on one
/// server reaches the others by gossip within seconds). Returns the join answer and the log of
/// the agent that runs.
async fn start_client(
    lab: &mut Lab,
    c: &Client,
    url: &JoinUrl,
    setup_key: Option<&str>,
    dataplane: DemoDataplane,
) -> Result<(JoinResponse, PathBuf)> {
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
        let child = lab.spawn(&format!("client {}", c.name), cmd, &log)?;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("agent running") {
                let saved = std::fs::read(c.dir.join("data").join("join.json"))
                    .context("the agent saved no join answer")?;
                return Ok((serde_json::from_slice(&saved).context("join answer")?, log));
            }
            if lab.exited(child).is_some() {
                if Instant::now() > deadline {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    bail!("client {} could not join: {}", c.name, reason(&text));
                }
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "client {} did not join within 60 s; the last lines of its log:\n{}",
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

/// Starts one ping from `ns` to `to`: probes every 0.2 s until one answers or
/// [`PING_WITHIN_SECS`] are over, so one lost packet is not reported as no answer.
fn start_ping(ns: &str, to: &str) -> Option<tokio::process::Child> {
    tokio::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-n", "-c", "1", "-i", "0.2", "-w",
        ])
        .arg(PING_WITHIN_SECS.to_string())
        .arg(to)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()
}

/// The round-trip time of the first answer in `ping`'s output, in ms.
fn parse_rtt(ping_output: &str) -> Option<f64> {
    ping_output
        .split("time=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|t| t.parse().ok())
}

/// What one look at the cluster saw: everything a status table shows.
#[derive(Debug, Clone, PartialEq)]
struct Observation {
    servers: Vec<ServerSeen>,
    clients: Vec<ClientSeen>,
    pings: Vec<PingSeen>,
}

#[derive(Debug, Clone, PartialEq)]
struct ServerSeen {
    name: String,
    addr: String,
    /// The state hash from `/api/health`; `None`: no answer.
    hash: Option<String>,
    /// Backbone peers with a handshake younger than [`ALIVE_SECS`], and all backbone peers.
    alive: usize,
    peers: usize,
}

#[derive(Debug, Clone, PartialEq)]
struct ClientSeen {
    name: String,
    group: String,
    tunnel: String,
    server: String,
    /// Seconds since the last handshake with its server; `None`: never.
    handshake_age: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
struct PingSeen {
    from: String,
    from_server: String,
    to: String,
    to_server: String,
    same_group: bool,
    /// Round-trip time in ms; `None`: no answer.
    rtt_ms: Option<f64>,
}

impl Observation {
    /// The one state hash, when every server answered with the same.
    fn converged(&self) -> Option<&str> {
        let first = self.servers.first()?.hash.as_deref()?;
        self.servers
            .iter()
            .all(|s| s.hash.as_deref() == Some(first))
            .then_some(first)
    }

    /// What the demo expects but did not see: empty once the cluster is settled. (A ping that
    /// answers across groups is not "missing" but broken; the table says so.)
    fn missing(&self) -> Vec<String> {
        let mut m = Vec::new();
        for s in self.servers.iter().filter(|s| s.hash.is_none()) {
            m.push(format!("{} does not answer /api/health", s.name));
        }
        if self.servers.iter().all(|s| s.hash.is_some()) && self.converged().is_none() {
            m.push("the servers' state hashes differ".into());
        }
        let others = self.servers.len().saturating_sub(1);
        for s in self.servers.iter().filter(|s| s.alive < others) {
            m.push(format!(
                "{} has a backbone handshake with {} of {others} servers",
                s.name, s.alive
            ));
        }
        for c in &self.clients {
            if c.handshake_age.is_none_or(|a| a >= ALIVE_SECS) {
                m.push(format!("{} has no handshake with {}", c.name, c.server));
            }
        }
        for p in self
            .pings
            .iter()
            .filter(|p| p.same_group && p.rtt_ms.is_none())
        {
            m.push(format!("{} -> {} does not answer", p.from, p.to));
        }
        m
    }

    /// The status table.
    fn render(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n=== lemonade-nexus demo: {} servers, {} clients ===",
            self.servers.len(),
            self.clients.len()
        );
        let _ = writeln!(
            t,
            "{:<6} {:<16} {:<18} BACKBONE PEERS ALIVE",
            "SERVER", "UNDERLAY", "STATE HASH"
        );
        for s in &self.servers {
            let _ = writeln!(
                t,
                "{:<6} {:<16} {:<18} {}/{}",
                s.name,
                s.addr,
                s.hash.as_deref().map(short).unwrap_or("(down)"),
                s.alive,
                s.peers
            );
        }
        match self.converged() {
            Some(h) => {
                let _ = writeln!(t, "state hashes: converged ({})", short(h));
            }
            None => {
                let _ = writeln!(t, "state hashes: NOT CONVERGED");
            }
        }
        let _ = writeln!(
            t,
            "{:<8} {:<6} {:<14} {:<6} SERVER HANDSHAKE",
            "CLIENT", "GROUP", "TUNNEL", "SERVER"
        );
        for c in &self.clients {
            let _ = writeln!(
                t,
                "{:<8} {:<6} {:<14} {:<6} {}",
                c.name,
                c.group,
                c.tunnel,
                c.server,
                c.handshake_age
                    .map(|a| format!("{a} s ago"))
                    .unwrap_or_else(|| "never".into())
            );
        }
        for p in &self.pings {
            let verdict = match (p.same_group, p.rtt_ms) {
                (true, Some(ms)) => format!("ok {ms:.2} ms"),
                (true, None) => "NO ANSWER (expected one)".into(),
                (false, None) => "blocked (other group, as expected)".into(),
                (false, Some(_)) => "ANSWERED ACROSS GROUPS (isolation broken)".into(),
            };
            let via = if p.from_server == p.to_server {
                "same server"
            } else {
                "cross-server"
            };
            let _ = writeln!(
                t,
                "ping {} ({}) -> {} ({}) [{}, {via}]: {verdict}",
                p.from,
                p.from_server,
                p.to,
                p.to_server,
                if p.same_group {
                    "same group"
                } else {
                    "other group"
                },
            );
        }
        t
    }
}

/// The first 16 hex digits of a state hash.
fn short(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

/// The state hashes in `healths`, when every server answered with the same one.
fn agree(healths: &[Option<serde_json::Value>]) -> bool {
    let hashes: Vec<Option<&str>> = healths
        .iter()
        .map(|h| h.as_ref().and_then(|h| h["state_hash"].as_str()))
        .collect();
    hashes.first().is_some_and(|f| f.is_some()) && hashes.windows(2).all(|w| w[0] == w[1])
}

/// One look at the cluster: health of every server, handshakes, and every pair's ping (all at
/// once). A state change may be on its way between servers, so differing hashes are looked at
/// again (up to 3 s) before they are reported.
async fn observe(inet: &str, servers: &[Server], clients: &[Client]) -> Observation {
    let mut started = Vec::new();
    for (i, from) in clients.iter().enumerate() {
        for to in clients.iter().skip(i + 1) {
            let Some(dst) = to.answer.as_ref().map(|a| a.tunnel_ipv4.clone()) else {
                continue;
            };
            started.push((from, to, start_ping(&from.ns, &dst)));
        }
    }
    let mut healths = health(inet, servers).await;
    for _ in 0..3 {
        if agree(&healths) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        healths = health(inet, servers).await;
    }
    let servers_seen = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let peers = handshake_ages(&s.ns, &s.backbone_if);
            ServerSeen {
                name: s.name.clone(),
                addr: s.addr.clone(),
                hash: healths
                    .get(i)
                    .and_then(|h| h.as_ref())
                    .and_then(|h| h["state_hash"].as_str().map(str::to_owned)),
                alive: peers
                    .iter()
                    .filter(|(_, a)| a.is_some_and(|a| a < ALIVE_SECS))
                    .count(),
                peers: peers.len(),
            }
        })
        .collect();
    let clients_seen = clients
        .iter()
        .filter_map(|c| {
            let a = c.answer.as_ref()?;
            Some(ClientSeen {
                name: c.name.into(),
                group: c.group.into(),
                tunnel: a.tunnel_ipv4.clone(),
                server: servers[c.server].name.clone(),
                handshake_age: handshake_ages(&c.ns, &c.ifname)
                    .into_iter()
                    .find(|(k, _)| *k == a.server_wg_pubkey)
                    .and_then(|(_, age)| age),
            })
        })
        .collect();
    let mut pings = Vec::new();
    for (from, to, child) in started {
        let rtt_ms = match child {
            Some(c) => c
                .wait_with_output()
                .await
                .ok()
                .and_then(|o| parse_rtt(&String::from_utf8_lossy(&o.stdout))),
            None => None,
        };
        pings.push(PingSeen {
            from: from.name.into(),
            from_server: servers[from.server].name.clone(),
            to: to.name.into(),
            to_server: servers[to.server].name.clone(),
            same_group: from.group == to.group,
            rtt_ms,
        });
    }
    Observation {
        servers: servers_seen,
        clients: clients_seen,
        pings,
    }
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

    fn settled() -> Observation {
        let server = |n: &str, h: &str| ServerSeen {
            name: n.into(),
            addr: "192.168.250.1".into(),
            hash: Some(h.into()),
            alive: 2,
            peers: 2,
        };
        let client = |n: &str, s: &str| ClientSeen {
            name: n.into(),
            group: "red".into(),
            tunnel: "10.1.0.0".into(),
            server: s.into(),
            handshake_age: Some(1),
        };
        Observation {
            servers: vec![server("s1", "ab"), server("s2", "ab"), server("s3", "ab")],
            clients: vec![client("red-a", "s1"), client("red-b", "s2")],
            pings: vec![
                PingSeen {
                    from: "red-a".into(),
                    from_server: "s1".into(),
                    to: "red-b".into(),
                    to_server: "s2".into(),
                    same_group: true,
                    rtt_ms: Some(0.4),
                },
                PingSeen {
                    from: "red-a".into(),
                    from_server: "s1".into(),
                    to: "blue-c".into(),
                    to_server: "s3".into(),
                    same_group: false,
                    rtt_ms: None,
                },
            ],
        }
    }

    #[test]
    fn a_settled_cluster_misses_nothing_and_its_table_says_so() {
        let o = settled();
        assert_eq!(o.missing(), Vec::<String>::new());
        let t = o.render();
        assert!(t.contains("state hashes: converged (ab)"), "{t}");
        assert!(t.contains("red-a (s1) -> red-b (s2) [same group, cross-server]: ok 0.40 ms"));
        assert!(t.contains("[other group, cross-server]: blocked"), "{t}");
        assert!(!t.contains("NO ANSWER") && !t.contains("never") && !t.contains("NOT"));
    }

    #[test]
    fn every_expected_but_unseen_thing_is_missing() {
        let mut o = settled();
        o.servers[1].hash = Some("cd".into());
        o.servers[2].alive = 1;
        o.clients[0].handshake_age = None;
        o.clients[1].handshake_age = Some(ALIVE_SECS);
        o.pings[0].rtt_ms = None;
        assert_eq!(
            o.missing(),
            vec![
                "the servers' state hashes differ",
                "s3 has a backbone handshake with 1 of 2 servers",
                "red-a has no handshake with s1",
                "red-b has no handshake with s2",
                "red-a -> red-b does not answer",
            ]
        );
        let t = o.render();
        assert!(
            t.contains("NOT CONVERGED") && t.contains("NO ANSWER (expected one)"),
            "{t}"
        );
        let mut down = settled();
        down.servers[0].hash = None;
        assert_eq!(down.missing(), vec!["s1 does not answer /api/health"]);
        assert!(down.render().contains("(down)"));
    }

    #[test]
    fn an_answer_across_groups_is_shown_as_broken_not_waited_for() {
        let mut o = settled();
        o.pings[1].rtt_ms = Some(1.0);
        assert!(o.missing().is_empty());
        assert!(
            o.render()
                .contains("ANSWERED ACROSS GROUPS (isolation broken)")
        );
    }

    #[test]
    fn ping_output_gives_the_first_round_trip() {
        let out = "PING 10.1.0.1 (10.1.0.1) 56(84) bytes of data.\n\
                   64 bytes from 10.1.0.1: icmp_seq=3 ttl=64 time=0.412 ms\n";
        assert_eq!(parse_rtt(out), Some(0.412));
        assert_eq!(
            parse_rtt("PING 10.1.0.1\n\n--- 1 packets transmitted, 0 received"),
            None
        );
    }

    #[test]
    fn a_failed_process_is_explained_by_its_error_lines() {
        let log = "2026-01-01 INFO starting\nerror: kernel WireGuard is not available: no\n";
        assert_eq!(reason(log), "kernel WireGuard is not available: no");
        assert_eq!(reason(""), "it printed nothing");
        assert!(reason("a\nb\n").ends_with("a\nb"));
        assert!(join_url("nothing yet").expect("no url").is_none());
    }

    #[test]
    fn hashes_agree_only_when_every_server_answered_the_same() {
        let h = |s: &str| Some(serde_json::json!({ "state_hash": s }));
        assert!(agree(&[h("a"), h("a")]));
        assert!(!agree(&[h("a"), h("b")]));
        assert!(!agree(&[h("a"), None]));
        assert!(!agree(&[None, None]));
        assert!(!agree(&[]));
    }
}
