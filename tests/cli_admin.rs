//! The real `lemonade-nexus` binary: init, identity show/rotate, tree and ipam show (text and
//! JSON) on a data directory, configuration precedence, and error messages with non-zero exit
//! codes (never a panic).

use std::path::PathBuf;
use std::process::{Command, Output};

use lemonade_nexus::identity::{Identity, MasterKey};
use lemonade_nexus::store::{self, Store};
use lemonade_nexus::testkit::{allocate, claim_block, create, now_ms};
use lemonade_nexus::tree::NodeId;

struct Env {
    _dir: tempfile::TempDir,
    data: PathBuf,
    master: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let master = dir.path().join("etc/master.key");
    Env {
        _dir: dir,
        data,
        master,
    }
}

fn run(e: &Env, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"))
        .args(args)
        .env_clear()
        .env("LEMONADE_NEXUS_DATA_DIR", &e.data)
        .env("LEMONADE_NEXUS_MASTER_KEY_FILE", &e.master)
        .env("LEMONADE_NEXUS_CONFIG", "/dev/null")
        .output()
        .expect("run lemonade-nexus")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("utf8")
}

fn failed(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "unexpected success: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8(o.stderr.clone()).expect("utf8");
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(o)).expect("valid JSON")
}

#[test]
fn init_then_identity_show_and_rotate() {
    let e = env();
    let out = ok(&run(&e, &["init"]));
    assert!(out.contains("(created)"), "{out}");
    let id = json(&run(&e, &["identity", "show", "--json"]));
    let ed = id["ed25519_public_key"]
        .as_str()
        .expect("ed25519")
        .to_owned();
    let wg = id["wireguard_public_key"].as_str().expect("wg").to_owned();
    assert!(
        out.contains(&format!("cluster root key: {ed}")),
        "new cluster: this node is the anchor"
    );
    let text = ok(&run(&e, &["identity", "show"]));
    assert!(text.contains(&ed) && text.contains(&wg), "{text}");

    // Init again keeps the keys.
    assert!(ok(&run(&e, &["init"])).contains("(existing)"));
    assert_eq!(
        json(&run(&e, &["identity", "show", "--json"]))["ed25519_public_key"],
        ed.as_str()
    );

    // Rotation changes the WireGuard key only.
    let rotated = ok(&run(&e, &["identity", "rotate-wireguard"]));
    let after = json(&run(&e, &["identity", "show", "--json"]));
    assert_eq!(after["ed25519_public_key"], ed.as_str());
    assert_ne!(after["wireguard_public_key"], wg.as_str());
    assert!(rotated.contains(after["wireguard_public_key"].as_str().expect("wg")));

    // The master key and key files are private.
    use std::os::unix::fs::PermissionsExt;
    for p in [
        e.master.clone(),
        e.data.join("identity/node.key"),
        e.data.join("identity/wireguard.key"),
    ] {
        let mode = std::fs::metadata(&p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
}

/// Writes a small tree and a lease into the store as the node itself (author = anchor).
fn populate(e: &Env) {
    let master = MasterKey::load(&e.master).expect("master");
    let id = Identity::load(&e.data, &master).expect("identity");
    let (mut s, _) = Store::open(&store::db_path(&e.data)).expect("store");
    let me = id.node.public();
    let now = now_ms();
    let acme = NodeId::derive(&me, 1);
    let laptop = NodeId::derive(&me, 2);
    for body in [
        create(NodeId::ROOT, "acme", false),
        create(acme, "laptop", true),
        claim_block(0),
        allocate(laptop, 20),
    ] {
        let r = s
            .append_local(&id.node, me, body, None, now)
            .expect("append");
        assert!(
            matches!(r, store::Submitted::Appended { effect: Ok(()), .. }),
            "{r:?}"
        );
    }
}

#[test]
fn tree_and_ipam_show_read_the_data_directory() {
    let e = env();
    ok(&run(&e, &["init"]));
    populate(&e);

    let tree = ok(&run(&e, &["tree", "show"]));
    assert!(
        tree.contains("acme") && tree.contains("laptop") && tree.contains("10.64.0.20"),
        "{tree}"
    );
    let tj = json(&run(&e, &["tree", "show", "--json"]));
    let text = tj.to_string();
    assert!(
        text.contains("\"acme\"") && text.contains("\"laptop\""),
        "{text}"
    );

    let ipam = ok(&run(&e, &["ipam", "show"]));
    assert!(ipam.contains("10.64.0.20"), "{ipam}");
    let ij = json(&run(&e, &["ipam", "show", "--json"]));
    assert!(ij.to_string().contains("10.64.0.20"), "{ij}");
    assert_eq!(ij["config"]["tunnel_v4"], "10.64.0.0/10");
}

#[test]
fn overlay_prefixes_from_the_config_reach_the_ipam() {
    let e = env();
    let o = Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"))
        .args(["init", "--overlay-client-v4", "10.20.0.0/16"])
        .env_clear()
        .env("LEMONADE_NEXUS_DATA_DIR", &e.data)
        .env("LEMONADE_NEXUS_MASTER_KEY_FILE", &e.master)
        .env("LEMONADE_NEXUS_CONFIG", "/dev/null")
        .output()
        .expect("run");
    ok(&o);
    let ij = json(&run(&e, &["ipam", "show", "--json"]));
    assert_eq!(ij["config"]["tunnel_v4"], "10.20.0.0/16");
    // Changing the overlay later does not change the cluster's plan, and init says so.
    let again = ok(&run(&e, &["init"]));
    assert!(
        again.contains("address plan was fixed at creation"),
        "{again}"
    );
    let ij = json(&run(&e, &["ipam", "show", "--json"]));
    assert_eq!(ij["config"]["tunnel_v4"], "10.20.0.0/16");
}

#[test]
fn config_precedence_through_the_binary() {
    let e = env();
    let file = e.data.parent().expect("parent").join("c.toml");
    std::fs::write(
        &file,
        "log_level = \"warn\"\ndataplane = \"kernel\"\nip_release_grace_secs = 10\n",
    )
    .expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"))
        .args(["--log-level", "debug", "config", "--json"])
        .env_clear()
        .env("LEMONADE_NEXUS_CONFIG", &file)
        .env("LEMONADE_NEXUS_LOG_LEVEL", "error")
        .env("LEMONADE_NEXUS_DATAPLANE", "userspace")
        .output()
        .expect("run");
    let c = json(&o);
    assert_eq!(c["log_level"], "debug", "flag beats env");
    assert_eq!(c["dataplane"], "userspace", "env beats file");
    assert_eq!(c["ip_release_grace_secs"], 10, "file beats default");
    assert_eq!(c["listen"]["api"], "0.0.0.0:9100", "default");
}

#[test]
fn errors_say_what_to_fix_and_exit_non_zero() {
    let e = env();
    // Nothing initialised yet.
    let err = failed(&run(&e, &["tree", "show"]));
    assert!(err.contains("lemonade-nexus init"), "{err}");
    let err = failed(&run(&e, &["identity", "show"]));
    assert!(err.contains("lemonade-nexus init"), "{err}");
    // A bad option value, from a flag.
    let err = failed(&run(&e, &["--listen-gossip", "nonsense", "config"]));
    assert!(
        err.contains("listen.gossip") && err.contains("--listen-gossip") && err.contains("IP:port"),
        "{err}"
    );
    // A typo in the config file.
    let file = e.data.parent().expect("parent").join("bad.toml");
    std::fs::write(&file, "[overlay]\nclient_v5 = \"10.0.0.0/8\"\n").expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"))
        .args(["--config", file.to_str().expect("utf8"), "config"])
        .env_clear()
        .output()
        .expect("run");
    let err = failed(&o);
    assert!(
        err.contains("overlay.client_v5") && err.contains("unknown option"),
        "{err}"
    );
    // The master key inside the data directory is refused.
    let o = Command::new(env!("CARGO_BIN_EXE_lemonade-nexus"))
        .args(["init"])
        .env_clear()
        .env("LEMONADE_NEXUS_DATA_DIR", &e.data)
        .env("LEMONADE_NEXUS_MASTER_KEY_FILE", e.data.join("master.key"))
        .env("LEMONADE_NEXUS_CONFIG", "/dev/null")
        .output()
        .expect("run");
    let err = failed(&o);
    assert!(err.contains("inside the data directory"), "{err}");
    // A wrong master key.
    ok(&run(&e, &["init"]));
    std::fs::write(&e.master, [9u8; 32]).expect("overwrite master");
    let err = failed(&run(&e, &["identity", "show"]));
    assert!(err.contains("cannot be decrypted"), "{err}");
    // An unknown subcommand is clap's usage error.
    let _ = failed(&run(&e, &["frobnicate"]));
}

#[test]
fn an_old_store_is_migrated_by_init_and_not_by_show() {
    let e = env();
    ok(&run(&e, &["init"]));
    let master = MasterKey::load(&e.master).expect("master");
    let id = Identity::load(&e.data, &master).expect("identity");
    let me = id.node.public();
    // Replace the store by a schema-0 one holding two ops.
    let path = store::db_path(&e.data);
    std::fs::remove_file(&path).expect("remove store");
    let ops: Vec<Vec<u8>> = ["old-a", "old-b"]
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let hlc = lemonade_nexus::hlc::Hlc {
                wall_ms: 1_000 + i as u64,
                logical: 0,
            };
            lemonade_nexus::testkit::sealed(
                &id.node,
                i as u64 + 1,
                hlc,
                create(NodeId::ROOT, h, false),
            )
        })
        .collect();
    store::write_v0_layout(&path, me, &ops).expect("v0 store");

    // Showing never writes: it asks for init.
    let err = failed(&run(&e, &["tree", "show"]));
    assert!(
        err.contains("schema version 0") && err.contains("lemonade-nexus init"),
        "{err}"
    );
    let out = ok(&run(&e, &["init"]));
    assert!(out.contains("migrated from schema version 0"), "{out}");
    let tree = ok(&run(&e, &["tree", "show"]));
    assert!(tree.contains("old-a") && tree.contains("old-b"), "{tree}");
}
