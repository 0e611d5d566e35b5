//! Shared harness for the network-namespace integration tests (they need root; CI is root).
//!
//! - [`Netns`]: a named network namespace that is deleted, with every process in it, on drop.
//! - [`Netns::block_on`]: runs async code of this crate *inside* a namespace (a fresh thread that
//!   `setns`es into it, with its own current-thread tokio runtime; sockets and processes created
//!   there belong to the namespace).
//! - [`Flavor`]: how a test builds a backend, so one scenario runs against the userspace backend
//!   on the host and against the kernel backend inside User-Mode Linux.
//! - Names are unique per test and per process (UAPI sockets in /var/run/wireguard are global).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod scenario;

use std::{
    fs::File,
    future::Future,
    os::fd::AsRawFd,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use lemonade_nexus_netlink::{Key, WgBackend, model::PrivateKey};

/// Builds the backend a scenario runs against. `backend()` is called inside the namespace the
/// device lives in.
pub trait Flavor {
    type Backend: WgBackend;
    /// Short tag used in names ("us", "kn").
    const TAG: &'static str;
    fn backend() -> impl Future<Output = Self::Backend>;
}

/// The userspace backend (wireguard-go).
pub struct Userspace;

impl Flavor for Userspace {
    type Backend = lemonade_nexus_netlink::uapi::UapiBackend;
    const TAG: &'static str = "us";
    async fn backend() -> Self::Backend {
        lemonade_nexus_netlink::uapi::UapiBackend::new()
    }
}

/// A name unique to this process and call: `<prefix><pid base36><counter>`, at most 15 bytes
/// (the interface name limit) for prefixes up to 4 bytes.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}{}", base36(std::process::id()), base36(n));
    assert!(name.len() <= 15, "name {name} too long");
    name
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
    String::from_utf8(s).expect("ascii")
}

/// Runs a command and returns its output; panics with the command and its stderr if it could
/// not be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn must(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `ip` with arguments, which must succeed.
pub fn ip(args: &[&str]) -> String {
    must(Command::new("ip").args(args))
}

/// A network namespace owned by a test. Dropping it stops every process inside it, removes the
/// UAPI sockets of the userspace devices registered with [`Netns::own_uapi_socket`], and deletes
/// the namespace (with its links).
pub struct Netns {
    pub name: String,
    uapi_sockets: std::sync::Mutex<Vec<String>>,
}

impl Netns {
    /// Creates a namespace with `lo` up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("ln-{}", unique_name(tag));
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name,
            uapi_sockets: Default::default(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Remembers that `ifname`'s UAPI socket belongs to this namespace's test, so drop removes it
    /// (which also stops its wireguard-go even if the test failed before deleting the device).
    pub fn own_uapi_socket(&self, ifname: &str) {
        self.uapi_sockets
            .lock()
            .expect("lock")
            .push(ifname.to_owned());
    }

    /// Runs `f()`'s future inside this namespace, on a fresh thread with a current-thread tokio
    /// runtime, and returns its output.
    pub fn block_on<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: `file` is an open namespace file for the whole call; setns only changes
                // the network namespace of this (freshly spawned, test-owned) thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// PIDs of the processes in this namespace.
    fn pids(&self) -> Vec<String> {
        let out = run(Command::new("ip").args(["netns", "pids", &self.name]));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Removing the socket makes wireguard-go shut down cleanly and delete its TUN link.
        for ifname in self
            .uapi_sockets
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
        {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
        }
        // Also the sockets of devices a process under test made itself (for example a server's
        // second interface): a wireguard-go killed below would leave its socket file behind.
        for pid in self.pids() {
            let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = argv.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
            if let (Some(prog), Some(ifname)) = (args.first(), args.last())
                && prog.ends_with(b"wireguard-go")
                && args.len() > 1
                && ifname.iter().all(|b| b.is_ascii_graphic() && *b != b'/')
            {
                let ifname = String::from_utf8_lossy(ifname);
                let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
            }
        }
        for _ in 0..100 {
            if self.pids().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in self.pids() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A fresh X25519 key pair from `wg genkey` / `wg pubkey`.
pub fn keypair() -> (PrivateKey, Key) {
    let private = must(Command::new("wg").arg("genkey"));
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(private.as_bytes()).expect("write key");
    }
    let out = child.wait_with_output().expect("wg pubkey output");
    assert!(out.status.success(), "wg pubkey failed");
    let public = String::from_utf8(out.stdout).expect("utf-8");
    (
        PrivateKey(private.trim().parse().expect("private key")),
        public.trim().parse().expect("public key"),
    )
}

/// True when the kernel-WireGuard tests are asked to skip (the host run; see tests/run.sh). They
/// print that they skipped; everywhere else (UML) a missing kernel WireGuard makes them fail.
pub fn skip_kernel_tests() -> bool {
    if std::env::var_os("LN_SKIP_KERNEL_WG_TESTS").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: LN_SKIP_KERNEL_WG_TESTS=1 (kernel WireGuard tests run inside UML)");
        true
    } else {
        false
    }
}
