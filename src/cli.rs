//! The command line: one binary, one subcommand per job. Doc comments here are the `--help` text.
//!
//! Every command returns `anyhow::Result`; `main` prints the error chain (which says what to fix)
//! and exits non-zero. Nothing here panics on bad input.

use std::path::Path;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ring::rand::SystemRandom;
use serde::Serialize;

use crate::config::{self, Config, ConfigArgs};
use crate::identity::{self, Identity, MasterKey};
use crate::keys::PublicKey;
use crate::store::{self, Snapshot, Store};

/// Lemonade Nexus: a self-hosted, zero-trust mesh VPN control plane.
///
/// Every option can be set in the config file, by an environment variable LEMONADE_NEXUS_<KEY>,
/// or by its flag; flags win over the environment, which wins over the file, which wins over the
/// defaults. See deploy/lemonade-nexus.toml.
#[derive(Parser, Debug)]
#[command(name = "lemonade-nexus", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the data directory, this node's identity and its state store (a new cluster whose
    /// trust anchor is this node's key, unless --root names another). Safe to run again: existing
    /// keys and state are kept (an older store schema is migrated).
    Init(InitArgs),
    /// This node's keys.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// The permission tree (read offline from the data directory).
    #[command(subcommand)]
    Tree(ShowCommand),
    /// Address allocations (read offline from the data directory).
    #[command(subcommand)]
    Ipam(ShowCommand),
    /// Run the server: genesis on an empty data directory, the client-plane WireGuard interface,
    /// the public HTTPS API. See README "Running a server".
    Serve(crate::server::ServeArgs),
    /// Join a server as a client device: authenticate, enrol, program the local WireGuard
    /// interface. The URL is the one `serve` prints (it carries the server's certificate pin).
    Join(crate::api::client::JoinArgs),
    /// Undo `join` on this device: remove its WireGuard interface (with its addresses and
    /// routes) and the saved join answer. The identity is kept, so a later join gets the same
    /// node and address.
    Leave(crate::api::client::LeaveArgs),
    /// This node's status: for a client, its server, addresses, handshake age, traffic and
    /// backend; for a server, a table of client-plane peers.
    Status(crate::status::StatusArgs),
    /// A whole cluster on this machine (root): three servers and four clients in network
    /// namespaces, a live status table and pings; Ctrl-C removes everything. See README "Demo".
    Demo(crate::demo::DemoArgs),
    /// The cluster's offline root key (signs server certificates and revocations). See README
    /// "Servers and trust".
    #[command(subcommand)]
    Root(crate::trust::cli::RootCommand),
    /// Sign a server certificate with the root key: admits that server key to the cluster.
    EnrollServer(crate::trust::cli::EnrollArgs),
    /// Sign a revocation with the root key: removes a server from the cluster for good. Write it
    /// to a file and/or submit it to a running server.
    RevokeServer(crate::trust::cli::RevokeArgs),
    /// Print the effective configuration and where each value came from.
    Config {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Base64 Ed25519 public key of the cluster's trust anchor (root authority). Default: this
    /// node's own identity key (a new cluster).
    #[arg(long, value_name = "PUBKEY")]
    pub root: Option<PublicKey>,
}

#[derive(Subcommand, Debug)]
pub enum IdentityCommand {
    /// Print this node's Ed25519 identity key and WireGuard public key.
    Show {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replace the WireGuard key with a fresh one (the Ed25519 identity is kept) and print the new
    /// public key.
    RotateWireguard,
}

#[derive(Subcommand, Debug)]
pub enum ShowCommand {
    /// Render it.
    Show {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a parsed command line; output goes to `out`.
pub fn run(cli: Cli, out: &mut dyn std::io::Write) -> Result<()> {
    let loaded = config::load(&cli.config)?;
    init_logging(&loaded.config.log_level);
    let cfg = &loaded.config;
    match cli.command {
        Command::Init(args) => init(cfg, args, out),
        Command::Identity(IdentityCommand::Show { json }) => identity_show(cfg, json, out),
        Command::Identity(IdentityCommand::RotateWireguard) => {
            let master = load_master(cfg, false)?;
            let k = Identity::rotate_wireguard(&cfg.data_dir, &master, &SystemRandom::new())?;
            writeln!(out, "new WireGuard public key: {}", k.public_base64())?;
            Ok(())
        }
        Command::Tree(ShowCommand::Show { json }) => {
            let snap = snapshot(cfg)?;
            if json {
                write_json(out, &crate::state::tree_view(&snap.state))
            } else {
                Ok(write!(out, "{}", crate::state::render_tree(&snap.state))?)
            }
        }
        Command::Ipam(ShowCommand::Show { json }) => {
            let snap = snapshot(cfg)?;
            if json {
                write_json(out, &crate::state::ipam_view(&snap.state))
            } else {
                Ok(write!(out, "{}", crate::state::render_ipam(&snap.state))?)
            }
        }
        Command::Serve(args) => crate::server::serve(cfg, args, out),
        Command::Join(args) => crate::api::client::join_command(cfg, args, out),
        Command::Leave(args) => crate::api::client::leave_command(cfg, args, out),
        Command::Status(args) => crate::status::status_command(cfg, args, out),
        Command::Root(cmd) => crate::trust::cli::root_command(cmd, out),
        Command::EnrollServer(args) => crate::trust::cli::enroll_command(args, out),
        Command::RevokeServer(args) => crate::trust::cli::revoke_command(args, out),
        Command::Demo(args) => crate::demo::demo_command(cfg, args, out),
        Command::Config { json } => {
            if json {
                return write_json(out, cfg);
            }
            if let Some(f) = &loaded.file {
                writeln!(out, "# config file: {}", f.display())?;
            }
            for key in config::keys() {
                writeln!(
                    out,
                    "{key} = {}   # from {}",
                    config_value(cfg, key),
                    loaded.source(key)
                )?;
            }
            Ok(())
        }
    }
}

fn config_value(cfg: &Config, key: &str) -> String {
    let v = serde_json::to_value(cfg).unwrap_or_default();
    let mut cur = &v;
    for part in key.split('.') {
        cur = cur.get(part).unwrap_or(&serde_json::Value::Null);
    }
    cur.to_string()
}

fn init_logging(filter: &str) {
    // Already validated by the config loader; logs go to stderr so stdout stays machine-readable.
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = crate::api::http_log::subscriber(filter).try_init();
}

fn write_json<T: Serialize>(out: &mut dyn std::io::Write, v: &T) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

fn load_master(cfg: &Config, create: bool) -> Result<MasterKey> {
    identity::check_master_outside(&cfg.master_key_file, &cfg.data_dir)?;
    let path = &cfg.master_key_file;
    if create {
        Ok(MasterKey::load_or_create(path, &SystemRandom::new())?)
    } else if !path.exists() {
        anyhow::bail!(
            "master key file {} does not exist; run `lemonade-nexus init` first, or point --master-key-file (LEMONADE_NEXUS_MASTER_KEY_FILE) at the right file",
            path.display()
        )
    } else {
        Ok(MasterKey::load(path)?)
    }
}

fn init(cfg: &Config, args: InitArgs, out: &mut dyn std::io::Write) -> Result<()> {
    create_dir_0700(&cfg.data_dir)?;
    let master = load_master(cfg, true)?;
    let (id, created) = Identity::load_or_create(&cfg.data_dir, &master, &SystemRandom::new())?;
    let root = args.root.unwrap_or(id.node.public());
    let ipam = cfg
        .ipam_config()
        .map_err(|e| anyhow::anyhow!("overlay configuration: {e}"))?;
    let path = store::db_path(&cfg.data_dir);
    let (store, report) = Store::create(&path, root, ipam.clone())
        .with_context(|| format!("state store {}", path.display()))?;
    // The overlay is fixed when the cluster is created: a different configuration now is ignored,
    // and the operator should know.
    if store.state().ipam().config() != &ipam {
        writeln!(
            out,
            "note: this cluster's address plan was fixed at creation and differs from the configured overlay/grace options, which are ignored"
        )?;
    }
    writeln!(out, "data directory: {}", cfg.data_dir.display())?;
    writeln!(
        out,
        "identity: {} ({})",
        id.node.public(),
        if created { "created" } else { "existing" }
    )?;
    writeln!(
        out,
        "wireguard public key: {}",
        id.wireguard.public_base64()
    )?;
    writeln!(out, "cluster root key: {}", store.root())?;
    if let Some(v) = report.migrated_from {
        writeln!(out, "store migrated from schema version {v}")?;
    }
    if report.repaired {
        writeln!(out, "state tables rebuilt from the op log")?;
    }
    Ok(())
}

fn create_dir_0700(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}

#[derive(Serialize)]
struct IdentityView {
    ed25519_public_key: String,
    wireguard_public_key: String,
}

fn identity_show(cfg: &Config, json: bool, out: &mut dyn std::io::Write) -> Result<()> {
    let master = load_master(cfg, false)?;
    let id = Identity::load(&cfg.data_dir, &master)?;
    let view = IdentityView {
        ed25519_public_key: id.node.public().to_string(),
        wireguard_public_key: id.wireguard.public_base64(),
    };
    if json {
        return write_json(out, &view);
    }
    writeln!(out, "ed25519 identity:     {}", view.ed25519_public_key)?;
    writeln!(out, "wireguard public key: {}", view.wireguard_public_key)?;
    Ok(())
}

fn snapshot(cfg: &Config) -> Result<Snapshot> {
    let path = store::db_path(&cfg.data_dir);
    Ok(Snapshot::read(&path)?)
}
