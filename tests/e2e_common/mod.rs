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
