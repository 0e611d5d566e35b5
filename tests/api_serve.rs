//! The `serve` process without a dataplane (no root needed): genesis names the administrator
//! given by `--admin-key` (and only at genesis), the API answers over pinned HTTPS on the printed
//! join URL, and SIGTERM stops the server cleanly.

use std::process::Command;

use lemonade_nexus::api::client::PinnedClient;
use lemonade_nexus::identity::NodeKey;
use lemonade_nexus::tls::JoinUrl;
use serde_json::Value;

mod serve_common;
use serve_common::{Proc, spawn_serve, stop};

fn cmd(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"));
    c.args(["--config", "/dev/null", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .args(["--listen-api", "127.0.0.1:0", "--log-level", "warn"])
        .args(["--listen-gossip", "127.0.0.1:0"]);
    c
}

/// Starts `serve` and returns it with the printed join URL.
fn start(dir: &std::path::Path, extra: &[&str]) -> (Proc, JoinUrl) {
    let mut c = cmd(dir);
    c.args(["serve", "--no-dataplane"]).args(extra);
    spawn_serve(c)
}

#[test]
fn genesis_admin_health_over_pinned_https_and_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let admin = NodeKey::from_seed(&[11; 32]).public().to_string();
    let (mut server, url) = start(dir.path(), &["--admin-key", &admin]);
    assert_eq!(url.host, "127.0.0.1");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let health: Value = rt.block_on(async {
        let c = PinnedClient::new(url.clone()).expect("client");
        c.get("/api/health")
            .await
            .expect("health")
            .json()
            .expect("json")
    });
    assert_eq!(health["status"], "ok");
    assert_eq!(health["dataplane"]["backend"], "none");

    // SIGTERM: a clean, prompt exit.
    stop(&mut server);

    // The administrator was written at genesis.
    let tree = cmd(dir.path())
        .args(["tree", "show", "--json"])
        .output()
        .expect("tree show");
    assert!(
        tree.status.success(),
        "{}",
        String::from_utf8_lossy(&tree.stderr)
    );
    let text = String::from_utf8_lossy(&tree.stdout);
    assert!(text.contains(&admin), "admin grant in the tree: {text}");

    // A later start cannot name another administrator.
    let other = NodeKey::from_seed(&[12; 32]).public().to_string();
    let out = cmd(dir.path())
        .args(["serve", "--no-dataplane", "--admin-key", &other])
        .output()
        .expect("second serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("genesis"), "{err}");

    // The same admin key again is fine (idempotent), and the certificate pin is kept.
    let (_again, url2) = start(dir.path(), &["--admin-key", &admin]);
    assert_eq!(url2.pin, url.pin);
}

/// A data directory prepared with `init` has an empty log: the first `serve` is still genesis
/// and may name the administrator.
#[test]
fn serve_after_init_is_still_genesis() {
    let dir = tempfile::tempdir().expect("tmp");
    let init = cmd(dir.path()).arg("init").output().expect("init");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let admin = NodeKey::from_seed(&[13; 32]).public().to_string();
    let (mut server, url) = start(dir.path(), &["--admin-key", &admin]);
    assert_eq!(url.host, "127.0.0.1");
    stop(&mut server);
    let tree = cmd(dir.path())
        .args(["tree", "show", "--json"])
        .output()
        .expect("tree show");
    assert!(
        String::from_utf8_lossy(&tree.stdout).contains(&admin),
        "{} {}",
        String::from_utf8_lossy(&tree.stdout),
        String::from_utf8_lossy(&tree.stderr)
    );
}
