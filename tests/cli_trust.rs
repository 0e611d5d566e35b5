//! The real binary, end to end on loopback: `root init` / `root show`, `enroll-server`, `serve`
//! with `--root` and `--server-cert` (and every way it refuses to start), `revoke-server
//! --submit` to the running server's public API, and the revocation in `tree show` and in the
//! state (a revoked server cannot start again). `serve --no-dataplane`: no WireGuard is needed to
//! prove the trust rules; the dataplane variant is `e2e_trust_serve_with_wireguard` below.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use lemonade_nexus::tls::JoinUrl;
use serde_json::Value;

mod serve_common;
use serve_common::{PASSPHRASE, Proc, bin, spawn_serve, stop};

/// A server's directories: `<dir>/<name>/data` and its master key beside it.
fn server_cmd(dir: &Path, name: &str) -> Command {
    let mut c = bin();
    c.arg("--data-dir")
        .arg(dir.join(name).join("data"))
        .arg("--master-key-file")
        .arg(dir.join(name).join("master.key"))
        .args(["--listen-api", "127.0.0.1:0", "--log-level", "warn"])
        .args(["--listen-gossip", "127.0.0.1:0"]);
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

fn failed(o: Output) -> String {
    assert!(
        !o.status.success(),
        "unexpected success: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8(o.stderr).expect("utf8");
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

fn run(mut c: Command) -> Output {
    c.output().expect("run lemonade-nexus")
}

/// `root init --out <file>`; returns the printed root public key.
fn root_init(path: &Path) -> String {
    let out = ok(run({
        let mut c = bin();
        c.args(["root", "init", "--out"]).arg(path);
        c
    }));
    out.lines()
        .find_map(|l| l.strip_prefix("root public key:"))
        .expect("root public key printed")
        .trim()
        .to_owned()
}

/// A server's Ed25519 key: `init --root` creates its identity (and its store with that root).
fn server_identity(dir: &Path, name: &str, root: &str) -> String {
    ok(run({
        let mut c = server_cmd(dir, name);
        c.args(["init", "--root", root]);
        c
    }));
    let v: Value = serde_json::from_str(&ok(run({
        let mut c = server_cmd(dir, name);
        c.args(["identity", "show", "--json"]);
        c
    })))
    .expect("json");
    v["ed25519_public_key"].as_str().expect("key").to_owned()
}

fn enroll(root_key: &Path, server: &str, id: &str, out: &Path) {
    ok(run({
        let mut c = bin();
        c.args(["enroll-server", server, "--id", id, "--root-key"])
            .arg(root_key)
            .arg("--out")
            .arg(out);
        c
    }));
}

/// Starts `serve --no-dataplane` with `extra` serve options; returns it and its join URL.
fn start(dir: &Path, name: &str, extra: &[&str]) -> (Proc, JoinUrl) {
    let mut c = server_cmd(dir, name);
    c.args(["serve", "--no-dataplane"]).args(extra);
    spawn_serve(c)
}

fn revoke_submit(root_key: &Path, server: &str, url: &JoinUrl, reason: &str) -> Output {
    let mut c = bin();
    c.args(["revoke-server", server, "--root-key"])
        .arg(root_key)
        .args(["--reason", reason])
        .args(["--submit", &format!("https://{}:{}", url.host, url.port)])
        .args(["--pin", &url.pin.to_string()]);
    run(c)
}

#[test]
fn root_key_file_is_encrypted_private_and_never_overwritten() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("root.key");
    let key = root_init(&path);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let raw = std::fs::read(&path).expect("read");
    assert!(raw.starts_with(b"LNXROOT"), "our format");
    let shown = ok(run({
        let mut c = bin();
        c.args(["root", "show", "--key"]).arg(&path);
        c
    }));
    assert_eq!(shown.trim(), key);
    // Never overwritten.
    let err = failed(run({
        let mut c = bin();
        c.args(["root", "init", "--out"]).arg(&path);
        c
    }));
    assert!(err.contains("refusing to overwrite"), "{err}");
    // No passphrase, a short one, a wrong one: clear errors.
    let other = dir.path().join("other.key");
    let err = failed(run({
        let mut c = bin();
        c.env_remove("LEMONADE_NEXUS_ROOT_PASSPHRASE")
            .args(["root", "init", "--out"])
            .arg(&other);
        c
    }));
    assert!(err.contains("LEMONADE_NEXUS_ROOT_PASSPHRASE"), "{err}");
    let err = failed(run({
        let mut c = bin();
        c.env("LEMONADE_NEXUS_ROOT_PASSPHRASE", "short")
            .args(["root", "init", "--out"])
            .arg(&other);
        c
    }));
    assert!(err.contains("at least 8"), "{err}");
    let some_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    let err = failed(run({
        let mut c = bin();
        c.env("LEMONADE_NEXUS_ROOT_PASSPHRASE", "not the passphrase")
            .args(["enroll-server", some_key, "--id", "x", "--root-key"])
            .arg(&path);
        c
    }));
    assert!(err.contains("wrong passphrase"), "{err}");
    // --passphrase-file works as well as the environment.
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, format!("{PASSPHRASE}\n")).expect("write");
    let cert = ok(run({
        let mut c = bin();
        c.env_remove("LEMONADE_NEXUS_ROOT_PASSPHRASE")
            .args(["enroll-server", some_key, "--id", "Eu-1", "--root-key"])
            .arg(&path)
            .arg("--passphrase-file")
            .arg(&pass_file);
        c
    }));
    let bytes = base64_decode(cert.trim());
    let root: lemonade_nexus::keys::PublicKey = key.parse().expect("key");
    let c = lemonade_nexus::trust::verify_server_cert(&bytes, &root, 0).expect("valid cert");
    assert_eq!(c.name, "eu-1", "names are lowercased");
    assert_eq!(c.server.to_string(), some_key);
    assert!(c.expires_at_ms > c.issued_at_ms, "365 days by default");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

#[test]
fn enrolled_server_starts_and_a_submitted_revocation_takes_effect() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let root_key = d.join("root.key");
    let root = root_init(&root_key);
    let a = server_identity(d, "a", &root);
    let b = server_identity(d, "b", &root);
    let a_cert = d.join("a.cert");
    let b_cert = d.join("b.cert");
    enroll(&root_key, &a, "eu-1", &a_cert);
    enroll(&root_key, &b, "eu-2", &b_cert);

    // Refusals, each with a message that says what to do.
    let err = failed(run({
        let mut c = server_cmd(d, "a");
        c.args(["serve", "--no-dataplane", "--root", &root]);
        c
    }));
    assert!(err.contains("enroll-server") && err.contains(&a), "{err}");
    let err = failed(run({
        let mut c = server_cmd(d, "a");
        c.args(["serve", "--no-dataplane", "--root", &root, "--server-cert"])
            .arg(&b_cert);
        c
    }));
    assert!(err.contains("this server's key is"), "{err}");
    let other_root_key = d.join("other-root.key");
    let other_root = root_init(&other_root_key);
    let forged = d.join("forged.cert");
    enroll(&other_root_key, &a, "eu-1", &forged);
    let err = failed(run({
        let mut c = server_cmd(d, "a");
        c.args(["serve", "--no-dataplane", "--root", &root, "--server-cert"])
            .arg(&forged);
        c
    }));
    assert!(
        err.contains(&format!(
            "signed by {other_root}, but this cluster's root is {root}"
        )),
        "{err}"
    );

    // The enrolled server starts (the certificate also by environment variable).
    let cert_arg = a_cert.to_string_lossy().into_owned();
    let (mut server, url) = start(d, "a", &["--root", &root, "--server-cert", &cert_arg]);

    // Revoke b through a's public API; a second time is harmless.
    let out = ok(revoke_submit(&root_key, &b, &url, "retired"));
    assert!(out.contains("revoked"), "{out}");
    let out = ok(revoke_submit(&root_key, &b, &url, "retired"));
    assert!(out.contains("already_revoked"), "{out}");
    // A revocation signed by another root is refused with a 400 and a JSON error.
    let err = failed(revoke_submit(&other_root_key, &b, &url, "x"));
    assert!(
        err.contains("400") && err.contains("bad_revocation") && err.contains("signed by"),
        "{err}"
    );
    // Garbage is a 400 with the JSON error shape, never a 500.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let client = lemonade_nexus::api::client::PinnedClient::new(url.clone()).expect("client");
    for body in [
        serde_json::json!({"revocation": "not base64!"}),
        serde_json::json!({"revocation": "AAAA"}),
        serde_json::json!({"wrong": 1}),
    ] {
        let r = rt
            .block_on(client.post("/api/trust/revocations", &body))
            .expect("answer");
        assert_eq!(r.status, 400, "{body}");
        let v: Value = serde_json::from_slice(&r.body).expect("json error");
        assert!(v["error"]["code"].is_string(), "{v}");
    }
    // Without a pin, --submit refuses to talk to the server.
    let err = failed(run({
        let mut c = bin();
        c.args(["revoke-server", &b, "--root-key"])
            .arg(&root_key)
            .args(["--submit", &format!("https://{}:{}", url.host, url.port)]);
        c
    }));
    assert!(err.contains("--pin"), "{err}");
    stop(&mut server);

    // The state: a is an active server, b revoked, with the reason.
    let text = ok(run({
        let mut c = server_cmd(d, "a");
        c.args(["tree", "show"]);
        c
    }));
    assert!(text.contains(&format!("eu-1  {a}  active")), "{text}");
    assert!(text.contains(&format!("{b}  revoked (retired)")), "{text}");
    let json: Value = serde_json::from_str(&ok(run({
        let mut c = server_cmd(d, "a");
        c.args(["tree", "show", "--json"]);
        c
    })))
    .expect("json");
    let servers = json["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 2);
    // a's server node is named after its certificate.
    assert!(
        json["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .any(|n| n["kind"] == "server" && n["hostname"] == "eu-1" && n["owner"] == a),
        "{json}"
    );

    // Restart without --server-cert: already admitted, fine. Then a revokes itself (any holder
    // of the root's revocation may deliver it) and can never start again.
    let (mut server, url) = start(d, "a", &[]);
    let out = ok(revoke_submit(&root_key, &a, &url, "compromised"));
    assert!(out.contains("revoked"), "{out}");
    stop(&mut server);
    let err = failed(run({
        let mut c = server_cmd(d, "a");
        c.args(["serve", "--no-dataplane", "--server-cert"])
            .arg(&a_cert);
        c
    }));
    assert!(
        err.contains("was revoked") && err.contains("compromised"),
        "{err}"
    );
}

#[test]
fn single_server_default_admits_itself() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let (mut server, _url) = start(d, "solo", &["--server-name", "solo"]);
    stop(&mut server);
    let json: Value = serde_json::from_str(&ok(run({
        let mut c = server_cmd(d, "solo");
        c.args(["tree", "show", "--json"]);
        c
    })))
    .expect("json");
    let servers = json["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 1, "{json}");
    assert_eq!(servers[0]["name"], "solo");
    assert_eq!(servers[0]["status"], "active");
    assert_eq!(
        servers[0]["key"], json["anchor"],
        "the root is the server itself"
    );
}

/// The dataplane variant (root, network namespaces, real wireguard-go): a server of a cluster
/// whose root key is elsewhere, admitted by its certificate (given by environment variable),
/// runs its client plane; a client in another namespace joins through it and pings the server's
/// tunnel address; a revocation is submitted over the underlay to the running server.
#[test]
fn e2e_trust_serve_with_wireguard() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let root_key = d.join("root.key");
    let root = root_init(&root_key);
    let a = server_identity(d, "a", &root);
    let a_cert = d.join("a.cert");
    enroll(&root_key, &a, "eu-1", &a_cert);

    let srv = Netns::new("ts");
    let cli = Netns::new("tc");
    veth_pair(&srv, &cli, SRV_UNDERLAY, CLI_UNDERLAY);
    let (sif, cif) = (unique_name("lts"), unique_name("ltc"));
    srv.own_uapi_socket(&sif);
    cli.own_uapi_socket(&cif);

    let mut c = srv.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"));
    c.args(["--config", "/dev/null", "--data-dir"])
        .arg(d.join("a").join("data"))
        .arg("--master-key-file")
        .arg(d.join("a").join("master.key"))
        .args(["--dataplane", "userspace", "--listen-api"])
        .arg(format!("{SRV_UNDERLAY}:9100"))
        .args([
            "serve",
            "--wg-interface",
            &sif,
            "--public-host",
            SRV_UNDERLAY,
        ])
        .args(["--root", &root])
        .env("LEMONADE_NEXUS_SERVER_CERT", &a_cert);
    let (_server, rx) = spawn_lines(c, "serve");
    let key_line = wait_line(&rx, "server key:", Duration::from_secs(60));
    assert_eq!(key_line, a);
    let url = JoinUrl::parse(&wait_line(&rx, "join URL:", Duration::from_secs(30))).expect("url");

    // A client joins through the enrolled server and reaches it through WireGuard.
    let client = |ns: &Netns| {
        let mut c = ns.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"));
        c.args(["--config", "/dev/null", "--data-dir"])
            .arg(d.join("client"))
            .arg("--master-key-file")
            .arg(d.join("client-master.key"))
            .args(["--dataplane", "userspace"]);
        c
    };
    must(client(&cli).args(["join", "--once", &url.to_string(), "--wg-interface", &cif]));
    let saved = std::fs::read(d.join("client").join("join.json")).expect("join.json");
    let joined: Value = serde_json::from_slice(&saved).expect("join answer");
    let gw = joined["server_tunnel_ipv4"].as_str().expect("gateway");
    assert!(
        ping(&cli, gw, Duration::from_secs(15)),
        "the client pings the enrolled server through the tunnel"
    );

    // The revocation route answers on the real serve path (pinned HTTPS over the underlay).
    let stranger = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
    let mut c = cli.cmd(env!("CARGO_BIN_EXE_lemonade-nexus"));
    c.env("LEMONADE_NEXUS_ROOT_PASSPHRASE", PASSPHRASE)
        .args([
            "--config",
            "/dev/null",
            "revoke-server",
            stranger,
            "--root-key",
        ])
        .arg(&root_key)
        .args(["--submit", &url.to_string()]);
    let out = must(&mut c);
    assert!(out.contains("revoked"), "{out}");
}

const SRV_UNDERLAY: &str = "192.168.236.1";
const CLI_UNDERLAY: &str = "192.168.236.2";

#[path = "../netlink/tests/common/mod.rs"]
mod common;
mod e2e_common;

use common::{Netns, must, unique_name};
use e2e_common::{ping, spawn_lines, veth_pair, wait_line};
