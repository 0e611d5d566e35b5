//! `serve` as a child process on loopback (no namespaces): start it, read its join URL, stop it
//! cleanly; the binary with a clean environment. Shared by the loopback process tests
//! (`api_serve`, `cli_trust`, `gossip_serve`).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lemonade_nexus::tls::JoinUrl;

/// The root key passphrase the tests' `bin()` gives every command.
pub const PASSPHRASE: &str = "correct horse battery";

/// The `lemonade-nexus` binary with a clean environment: no config file, the test passphrase.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"));
    c.env_clear()
        .env("LEMONADE_NEXUS_CONFIG", "/dev/null")
        .env("LEMONADE_NEXUS_ROOT_PASSPHRASE", PASSPHRASE);
    c
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test leaves nothing.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `serve` (`cmd` carries every argument) and waits up to 30 s for the join URL it prints.
pub fn spawn_serve(mut cmd: Command) -> (Proc, JoinUrl) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("join URL:") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    let proc = Proc(child);
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("serve printed its join URL");
    (proc, JoinUrl::parse(&url).expect("join URL"))
}

/// Sends SIGTERM and asserts a clean exit within 15 s.
pub fn stop(server: &mut Proc) {
    // SAFETY: kill takes a pid and a signal number; the pid is our own live child.
    let rc = unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = server.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not stop within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "serve exited with {status}");
}
