//! The userspace backend: a WireGuard implementation in a separate process, programmed over the
//! cross-platform UAPI socket `/var/run/wireguard/<ifname>.sock`.
//!
//! # Why we start `wireguard-go` instead of embedding a userspace device
//!
//! This backend exists for hosts whose kernel lacks WireGuard, and it is the loud fallback, not
//! the fast path. For it we run Debian's `wireguard-go` package as a separate daemon:
//!
//! - it is the reference userspace implementation, maintained by the WireGuard authors, and the
//!   one operators already install, run and debug with `wg show` (which speaks the same socket);
//! - the only embeddable Rust device, `defguard_wireguard_rs`' userspace mode, embeds DefGuard's
//!   boringtun fork and drags in a second `netlink-packet-route` (0.33 beside our 0.34, whose types
//!   do not interoperate), base64 0.23, a RustCrypto stack, and host-wide side effects: its
//!   interface removal calls DNS cleanup first and fails on hosts without systemd-resolved or
//!   resolvconf, and its routing helper runs `iptables-restore` (see shared/reference/crates.md
//!   §1b);
//! - a separate process keeps the data path alive across a controller restart: `ensure_device`
//!   finds the running daemon's socket and leaves its peers alone, exactly as with a kernel link.
//!
//! Everything we say to the device goes through the pure codec in [`codec`], so the same code
//! talks to boringtun or any other UAPI implementation (its quirks are handled when parsing).
//!
//! The daemon is started in the network namespace of the calling thread (the TUN link and the UDP
//! socket belong to that namespace). It daemonizes itself; its socket exists when the launcher
//! exits. Deleting the socket file makes it shut down and remove its TUN link.

pub mod codec;

use std::{
    ffi::CString,
    io::ErrorKind,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    process::Command,
};

pub use codec::UapiError;

use crate::{
    backend::{BackendKind, WgBackend},
    diff::{Capabilities, DeviceDiff},
    model::{DeviceConfig, DeviceState, Key},
};

/// Where userspace implementations put their sockets (not per network namespace).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

/// The userspace backend. Cheap to build; holds no connection (each operation opens one).
#[derive(Clone, Debug)]
pub struct UapiBackend {
    socket_dir: PathBuf,
    program: PathBuf,
    start_timeout: Duration,
    io_timeout: Duration,
    max_reply_len: usize,
}

impl Default for UapiBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl UapiBackend {
    /// A backend that starts `wireguard-go` from `PATH` and uses `/var/run/wireguard`.
    pub fn new() -> Self {
        UapiBackend {
            socket_dir: PathBuf::from(DEFAULT_SOCKET_DIR),
            program: PathBuf::from("wireguard-go"),
            start_timeout: Duration::from_secs(10),
            // Programming 50,000 peers into wireguard-go takes tens of seconds.
            io_timeout: Duration::from_secs(300),
            max_reply_len: codec::DEFAULT_MAX_REPLY_LEN,
        }
    }

    /// Uses another userspace implementation binary (it must take the interface name as its
    /// only argument and daemonize, like `wireguard-go`).
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Uses another socket directory.
    pub fn with_socket_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.socket_dir = dir.into();
        self
    }

    /// Bounds one request/reply exchange.
    pub fn with_io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// The UAPI socket of `ifname`.
    pub fn socket_path(&self, ifname: &str) -> Result<PathBuf, UapiError> {
        check_ifname(ifname)?;
        Ok(self.socket_dir.join(format!("{ifname}.sock")))
    }

    /// Programs a whole configuration into a device that has no peers yet (what `wg setconf`
    /// does to a fresh device, minus `replace_peers`). One request, no dump first.
    pub async fn configure_new(
        &self,
        ifname: &str,
        config: &DeviceConfig,
    ) -> Result<(), UapiError> {
        let req = codec::encode_config(config);
        self.set(ifname, req.as_bytes()).await
    }

    /// Sends a `set=1` request (as built by [`codec::SetWriter`]) and checks its `errno`.
    pub async fn set(&self, ifname: &str, request: &[u8]) -> Result<(), UapiError> {
        let reply = self.exchange(ifname, request).await?;
        codec::parse_set_reply(&reply)
    }

    /// One request and its reply over a fresh connection. Writing and reading run concurrently:
    /// a device that rejects a line stops reading, answers `errno=` and closes, and that answer
    /// is what the caller needs, not the broken-pipe error of the unfinished write.
    async fn exchange(&self, ifname: &str, request: &[u8]) -> Result<Vec<u8>, UapiError> {
        let path = self.socket_path(ifname)?;
        let io_err = |source| UapiError::Io {
            path: path.display().to_string(),
            source,
        };
        let work = async {
            let mut stream = UnixStream::connect(&path).await.map_err(io_err)?;
            let (mut rd, mut wr) = stream.split();
            let write = async {
                let r = wr.write_all(request).await;
                // Half-close is not needed (the request ends with an empty line); flush only.
                r.and(wr.flush().await)
            };
            let read = async {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = rd.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    if buf.len() > self.max_reply_len {
                        return Ok(Err(UapiError::TooLong {
                            limit: self.max_reply_len,
                        }));
                    }
                    if codec::reply_complete(&buf) {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(Ok(buf))
            };
            let (written, reply) = tokio::join!(write, read);
            let reply = reply.map_err(io_err)??;
            if !codec::reply_complete(&reply) {
                // No complete answer: report the write error if there was one, else truncation.
                written.map_err(io_err)?;
                return Err(UapiError::Malformed {
                    line: 0,
                    what: "reply truncated".into(),
                });
            }
            Ok(reply)
        };
        match tokio::time::timeout(self.io_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(io_err(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("no reply within {:?}", self.io_timeout),
            ))),
        }
    }

    /// True if something accepts connections on the socket.
    async fn socket_alive(path: &Path) -> bool {
        UnixStream::connect(path).await.is_ok()
    }

    async fn start_daemon(&self, ifname: &str, path: &Path) -> Result<(), UapiError> {
        let proc_err = |what: String| UapiError::Process {
            ifname: ifname.to_owned(),
            what,
        };
        let out = Command::new(&self.program)
            .arg(ifname)
            // Without LOG_LEVEL the daemon's stdio is /dev/null, so it never holds our pipe open.
            .env_remove("LOG_LEVEL")
            .env_remove("WG_PROCESS_FOREGROUND")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(self.start_timeout, out)
            .await
            .map_err(|_| proc_err(format!("{} did not return", self.program.display())))?
            .map_err(|e| proc_err(format!("cannot run {}: {e}", self.program.display())))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Skip the banner about kernel support; keep the actual error lines.
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(proc_err(format!(
                "{} exited with {}: {}",
                self.program.display(),
                out.status,
                tail.join(" | ")
            )));
        }
        let deadline = Instant::now() + self.start_timeout;
        while !Self::socket_alive(path).await {
            if Instant::now() > deadline {
                return Err(proc_err(format!(
                    "socket {} did not appear",
                    path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl WgBackend for UapiBackend {
    type Error = UapiError;

    fn kind(&self) -> BackendKind {
        BackendKind::Userspace
    }

    /// Debian's wireguard-go (0.0.20220316) has no `remove_allowed_ip`, so a peer losing a
    /// prefix gets its list replaced.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            allowed_ip_removal: false,
        }
    }

    async fn ensure_device(&self, ifname: &str) -> Result<(), UapiError> {
        let path = self.socket_path(ifname)?;
        if Self::socket_alive(&path).await {
            return Ok(());
        }
        // A socket file nobody listens on is left over from a crashed daemon.
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::warn!(%ifname, "removed stale UAPI socket {}", path.display()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(UapiError::Io {
                    path: path.display().to_string(),
                    source: e,
                });
            }
        }
        self.start_daemon(ifname, &path).await?;
        tracing::info!(%ifname, program = %self.program.display(), "started userspace WireGuard");
        Ok(())
    }

    async fn get(&self, ifname: &str) -> Result<DeviceState, UapiError> {
        let reply = self.exchange(ifname, codec::GET_REQUEST).await?;
        codec::parse_get_reply(&reply, SystemTime::now(), self.max_reply_len)
    }

    async fn apply(&self, ifname: &str, diff: &DeviceDiff) -> Result<(), UapiError> {
        let w = codec::encode_diff(diff);
        if w.is_empty() {
            return Ok(());
        }
        self.set(ifname, w.finish().as_bytes()).await
    }

    async fn remove_peer(&self, ifname: &str, peer: &Key) -> Result<(), UapiError> {
        let mut w = codec::SetWriter::new();
        w.peer(peer).remove();
        self.set(ifname, w.finish().as_bytes()).await
    }

    /// Deletes the socket file, which makes the daemon shut down and remove its TUN link, and
    /// waits until the link is gone from the calling thread's network namespace and the daemon
    /// has released its UDP port (wireguard-go closes the TUN first and the port a moment later;
    /// a device re-created at once on the same port would otherwise get EADDRINUSE).
    async fn delete_device(&self, ifname: &str) -> Result<(), UapiError> {
        let path = self.socket_path(ifname)?;
        let port = match self.get(ifname).await {
            Ok(state) if state.listen_port != 0 => Some(state.listen_port),
            _ => None,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(UapiError::Io {
                    path: path.display().to_string(),
                    source: e,
                });
            }
        }
        let deadline = Instant::now() + self.start_timeout;
        while link_exists(ifname) {
            if Instant::now() > deadline {
                return Err(UapiError::Process {
                    ifname: ifname.to_owned(),
                    what: "link still present after its UAPI socket was removed".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while let Some(port) = port.filter(|p| !udp_port_free(*p)) {
            if Instant::now() > deadline {
                return Err(UapiError::Process {
                    ifname: ifname.to_owned(),
                    what: format!("UDP port {port} still taken after the device was deleted"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// Whether UDP `port` can be bound in the calling thread's network namespace. The IPv6 wildcard
/// bind is dual-stack (it conflicts with an IPv4 holder too); without IPv6, IPv4 is checked.
fn udp_port_free(port: u16) -> bool {
    use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
    match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::AddrInUse => false,
        Err(_) => !matches!(
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)),
            Err(e) if e.kind() == ErrorKind::AddrInUse
        ),
    }
}

/// A Linux interface name: 1 to 15 bytes, no `/`, no whitespace, not `.` or `..`. Checked before
/// it becomes part of a socket path.
fn check_ifname(ifname: &str) -> Result<(), UapiError> {
    let ok = !ifname.is_empty()
        && ifname.len() <= 15
        && ifname != "."
        && ifname != ".."
        && ifname
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(UapiError::Process {
            ifname: ifname.escape_debug().to_string(),
            what: "not a valid interface name (1-15 printable bytes, no '/' or ':')".into(),
        })
    }
}

/// Whether a link named `ifname` exists in the calling thread's network namespace.
fn link_exists(ifname: &str) -> bool {
    let Ok(name) = CString::new(ifname) else {
        return false;
    };
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; if_nametoindex
    // only reads it and returns 0 when no such interface exists.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_before_becoming_paths() {
        let b = UapiBackend::new();
        assert_eq!(
            b.socket_path("wg0").expect("valid"),
            PathBuf::from("/var/run/wireguard/wg0.sock")
        );
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "sixteen-chars-xx",
            "a b",
            "a\0b",
        ] {
            assert!(b.socket_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A device that answers with an error while we are still writing a large request: we must
    /// report its errno, not a broken pipe.
    #[tokio::test]
    async fn errno_reply_wins_over_broken_pipe() {
        let dir = std::env::temp_dir().join(format!("ln-uapi-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let listener =
            tokio::net::UnixListener::bind(dir.join("wgfake.sock")).expect("bind fake device");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut first = [0u8; 16];
            let _ = s.read(&mut first).await;
            s.write_all(b"errno=22\n\n").await.expect("reply");
            // Close without reading the rest of the request.
        });
        let b = UapiBackend::new().with_socket_dir(&dir);
        let huge = vec![b'x'; 8 * 1024 * 1024];
        let r = b.set("wgfake", &huge).await;
        server.await.expect("server");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(r, Err(UapiError::Errno(22))), "{r:?}");
    }

    #[tokio::test]
    async fn missing_socket_is_an_io_error_naming_the_path() {
        let b = UapiBackend::new().with_socket_dir("/nonexistent-ln-test");
        let e = b.get("wg0").await.expect_err("no socket");
        assert!(
            e.to_string().contains("/nonexistent-ln-test/wg0.sock"),
            "{e}"
        );
    }
}
