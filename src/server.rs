//! `lemonade-nexus serve`: the server process.
//!
//! Start-up, in order:
//! 1. data directory, master key, identity (created on first start);
//! 2. the store: on an empty data directory this is **genesis**: a new cluster whose trust anchor
//!    is this server's key (or `--root`), then the server's own `server` node and, if
//!    `--admin-key` is given, the first administrator's `admin` grant on the root. Nobody becomes
//!    administrator by joining;
//! 3. the API certificate (configured, or generated once) and its pin, printed with the join URL;
//! 4. the client-plane WireGuard interface through the dataplane crate (kernel or userspace, by
//!    detection or `--dataplane`), reconciled from the store: private key, port, every enrolled
//!    device as a peer, the gateway addresses (slot 1 of the client prefixes, the address every
//!    server answers on). This runs on every start, so `kill -9` and restart converge;
//! 5. the public HTTPS API (`crate::api`) on `listen.api`.
//!
//! Then a reconciler task keeps the device equal to the store: on every join (coalesced; diffed
//! against what the last reconcile programmed, no dump) and every [`DRIFT_CHECK`] against drift
//! (a full dump and diff: an operator's `wg set`, a restarted daemon).
//! SIGINT/SIGTERM stop the API gracefully; the WireGuard device and its peers are left up, so
//! clients keep their data path while the server restarts.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use lemonade_nexus_netlink::kernel::KernelBackend;
use lemonade_nexus_netlink::kernel::detect::choose_backend;
use lemonade_nexus_netlink::kernel::encode::Budget;
use lemonade_nexus_netlink::model::PrivateKey;
use lemonade_nexus_netlink::rtnl::{LinkConfig, Rtnl};
use lemonade_nexus_netlink::uapi::UapiBackend;
use lemonade_nexus_netlink::{
    BackendKind, BackendPreference, DeviceConfig, DeviceDiff, DeviceState, Key, PeerConfig,
    WgBackend,
};
use ring::rand::SystemRandom;

use crate::api::join::Registration;
use crate::api::{self, ApiState, DataplaneInfo, PeerSync, PeerSyncWorker, Settings};
use crate::config::{Config, Dataplane};
use crate::identity::{self, Identity, MasterKey};
use crate::ipam::IpamConfig;
use crate::keys::PublicKey;
use crate::op::OpBody;
use crate::state::State;
use crate::store::{self, Store, Submitted};
use crate::tls::{self, JoinUrl};
use crate::tree::{NodeId, NodeKind, Permission, Permissions, TreeOp, WgKey};

/// How often the device is compared with the store even without a change.
pub const DRIFT_CHECK: Duration = Duration::from_secs(30);
/// The MTU of the client-plane interface (WireGuard's usual 1420).
pub const CLIENT_MTU: u32 = 1420;
/// The routing table named in the link config (no routes are put there yet: the interface
/// addresses' prefixes route the client plane).
pub const CLIENT_TABLE: u32 = 51940;

/// `serve` options that are not in the shared configuration.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Base64 Ed25519 key of the first administrator: granted `admin` on the root at genesis.
    /// Without it, only the trust anchor administers the cluster.
    #[arg(long, value_name = "PUBKEY", env = "LEMONADE_NEXUS_ADMIN_KEY")]
    pub admin_key: Option<PublicKey>,
    /// Base64 Ed25519 key of the cluster's trust anchor at genesis. Default: this server's key.
    #[arg(long, value_name = "PUBKEY", env = "LEMONADE_NEXUS_ROOT")]
    pub root: Option<PublicKey>,
    /// Whether unknown devices may join (each in its own customer group).
    #[arg(long, value_enum, default_value_t = Registration::Open, env = "LEMONADE_NEXUS_REGISTRATION")]
    pub registration: Registration,
    /// API certificate chain (PEM). Default: a self-signed certificate generated in <data dir>/tls.
    #[arg(
        long,
        value_name = "PATH",
        env = "LEMONADE_NEXUS_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// API certificate key (PEM).
    #[arg(
        long,
        value_name = "PATH",
        env = "LEMONADE_NEXUS_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Host name or address clients use to reach this server (join URL, WireGuard endpoint,
    /// certificate name). Default: the listen address if specific, else what each client used.
    #[arg(long, value_name = "HOST", env = "LEMONADE_NEXUS_PUBLIC_HOST")]
    pub public_host: Option<String>,
    /// Name of the client-plane WireGuard interface.
    #[arg(
        long,
        value_name = "IFNAME",
        default_value = "ln-client",
        env = "LEMONADE_NEXUS_WG_INTERFACE"
    )]
    pub wg_interface: String,
    /// Hostname of this server's node in the tree (a DNS label). Default: server-<key hash>.
    #[arg(long, value_name = "NAME", env = "LEMONADE_NEXUS_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Requests per second allowed from one client address on the public API (bursts of twice
    /// that); 0 disables the limit.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        env = "LEMONADE_NEXUS_RATE_LIMIT"
    )]
    pub rate_limit: u32,
    /// Run the API without any WireGuard device (testing the API alone; joins are recorded but
    /// no peer is programmed).
    #[arg(long)]
    pub no_dataplane: bool,
    /// This server's certificate: the base64 file written by `lemonade-nexus enroll-server`,
    /// signed by the cluster root. Required with --root until the server is admitted; without
    /// --root (the root is this server's own key) the server issues its own.
    #[arg(long, value_name = "FILE", env = "LEMONADE_NEXUS_SERVER_CERT")]
    pub server_cert: Option<PathBuf>,
    #[command(flatten)]
    pub backbone: crate::backbone::BackboneArgs,
    /// Gossip address (`host:port`, udp) of a server of the cluster to join (repeatable). A
    /// fresh server started with --root, --server-cert and --seed-peer joins that cluster.
    #[arg(
        long = "seed-peer",
        value_name = "HOST:PORT",
        env = "LEMONADE_NEXUS_SEED_PEERS",
        value_delimiter = ','
    )]
    pub seed_peers: Vec<String>,
}

/// The WireGuard backend in use (static dispatch over the two implementations).
#[derive(Clone, Debug)]
pub enum Backend {
    Kernel(KernelBackend),
    Userspace(UapiBackend),
}

impl Backend {
    /// Picks and builds the backend for `preference` (see `choose_backend`): `auto` falls back to
    /// userspace loudly. Returns the backend and why it fell back, if it did.
    pub async fn choose_with_reason(
        preference: BackendPreference,
    ) -> Result<(Backend, lemonade_nexus_netlink::BackendChoice)> {
        let choice = choose_backend(preference).await?;
        let backend = match choice.kind {
            BackendKind::Kernel => {
                Backend::Kernel(KernelBackend::connect(Budget::default()).await?)
            }
            BackendKind::Userspace => Backend::Userspace(UapiBackend::new()),
        };
        Ok((backend, choice))
    }

    /// [`Backend::choose_with_reason`] without the reason.
    pub async fn choose(preference: BackendPreference) -> Result<Backend> {
        Ok(Self::choose_with_reason(preference).await?.0)
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Kernel(b) => b.kind(),
            Backend::Userspace(b) => b.kind(),
        }
    }

    pub async fn ensure_device(&self, ifname: &str) -> Result<()> {
        match self {
            Backend::Kernel(b) => b.ensure_device(ifname).await?,
            Backend::Userspace(b) => b.ensure_device(ifname).await?,
        }
        Ok(())
    }

    pub fn capabilities(&self) -> lemonade_nexus_netlink::Capabilities {
        match self {
            Backend::Kernel(b) => b.capabilities(),
            Backend::Userspace(b) => b.capabilities(),
        }
    }

    pub async fn apply(&self, ifname: &str, diff: &DeviceDiff) -> Result<()> {
        match self {
            Backend::Kernel(b) => b.apply(ifname, diff).await?,
            Backend::Userspace(b) => b.apply(ifname, diff).await?,
        }
        Ok(())
    }

    pub async fn reconcile(&self, ifname: &str, desired: &DeviceConfig) -> Result<DeviceDiff> {
        Ok(match self {
            Backend::Kernel(b) => b.reconcile(ifname, desired).await?,
            Backend::Userspace(b) => b.reconcile(ifname, desired).await?,
        })
    }

    /// A dump of the device (peers with endpoints, handshakes, counters).
    pub async fn get(&self, ifname: &str) -> Result<lemonade_nexus_netlink::DeviceState> {
        Ok(match self {
            Backend::Kernel(b) => b.get(ifname).await?,
            Backend::Userspace(b) => b.get(ifname).await?,
        })
    }
}

/// The gateway addresses of the client plane (slot 1: the address every server answers on),
/// with the client prefixes' lengths so the kernel routes the whole plane through the interface.
pub fn gateway_addresses(cfg: &IpamConfig) -> Result<Vec<IpNet>> {
    let g = cfg.address_of(1);
    Ok(vec![
        IpNet::V4(Ipv4Net::new(g.v4, cfg.tunnel_v4.prefix_len())?),
        IpNet::V6(Ipv6Net::new(g.v6, cfg.tunnel_v6.prefix_len())?),
    ])
}

/// The client-plane device as the store says it should be: one peer per enrolled device that has
/// a WireGuard key and a lease, allowed IPs its two tunnel addresses. Pure.
///
/// A WireGuard key held by two nodes (which join refuses, but a replicated state might still
/// carry) goes to the node created first; the server's own key is never a peer.
pub fn client_plane_device(
    state: &State,
    private_key: PrivateKey,
    own_public: [u8; 32],
    port: u16,
) -> DeviceConfig {
    let mut nodes: Vec<_> = state
        .tree()
        .nodes()
        .filter(|n| n.kind == NodeKind::Endpoint)
        .filter_map(|n| Some((n.created, n.id, n.wg_pubkey?)))
        .collect();
    nodes.sort();
    let mut seen = std::collections::BTreeSet::new();
    let mut peers = Vec::new();
    for (_, id, WgKey(k)) in nodes {
        let Some(a) = state.ipam().tunnel_address(&id) else {
            continue;
        };
        if k == own_public || !seen.insert(k) {
            tracing::warn!(node = %id, "WireGuard key already used by another peer; node skipped");
            continue;
        }
        peers.push(PeerConfig {
            public_key: Key(k),
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: vec![
                IpNet::V4(Ipv4Net::from(a.v4)),
                IpNet::V6(Ipv6Net::from(a.v6)),
            ],
        });
    }
    DeviceConfig {
        private_key: Some(private_key),
        listen_port: Some(port),
        fwmark: None,
        peers,
    }
}

/// The ops of genesis (or of a start that finds this server's node missing): this server's node
/// and, at genesis only, the first administrator's grant. Pure.
pub fn genesis_ops(
    state: &State,
    server: &PublicKey,
    server_wg: [u8; 32],
    server_name: &str,
    admin: Option<PublicKey>,
    fresh: bool,
) -> Result<Vec<OpBody>> {
    let tree = state.tree();
    let mut ops = Vec::new();
    let has_node = tree
        .nodes()
        .any(|n| n.kind == NodeKind::Server && n.owner.as_ref() == Some(server));
    if !has_node {
        ops.push(OpBody::Tree(TreeOp::Create {
            parent: NodeId::ROOT,
            kind: NodeKind::Server,
            hostname: server_name.to_owned(),
            owner: Some(*server),
            wg_pubkey: Some(WgKey(server_wg)),
        }));
    }
    if let Some(admin) = admin {
        let granted =
            crate::authz::authorize(tree, &admin, Permission::Admin, NodeId::ROOT).is_ok();
        if !granted {
            if !fresh {
                bail!(
                    "--admin-key {admin} is not an administrator of this cluster, and the first administrator can only be named at genesis (on an empty data directory); grant it with an admin op instead"
                );
            }
            ops.push(OpBody::Tree(TreeOp::Grant {
                node: NodeId::ROOT,
                key: admin,
                permissions: Permissions::ADMIN,
            }));
        }
    }
    Ok(ops)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The trust side of start-up (pure; `now_ms` only checks a given certificate's expiry): the
/// `AdmitServer` op this server must append before anything else, if any.
///
/// * A revoked server refuses to start.
/// * Already an active server: nothing (a certificate, if given, must still be this cluster's
///   and name this server; it is not re-appended).
/// * The cluster root is this server's own key (the single-server default, no `--root`): it
///   issues its own certificate (it holds the root key), so nothing changes for the operator.
/// * Otherwise `cert` (from `--server-cert`) is required and must verify against the root.
pub fn admission_op(
    state: &State,
    me: &crate::identity::NodeKey,
    cert: Option<&[u8]>,
    name: &str,
    now_ms: u64,
) -> Result<Option<OpBody>> {
    use crate::trust::{ServerCert, TrustOp};
    let key = me.public();
    let root = *state.tree().anchor();
    if let Some(s) = state.server_status(&key).filter(|s| s.revoked.is_some()) {
        bail!(
            "this server ({key}) was revoked by the cluster root ({}); it cannot serve this cluster again. Use a new data directory and identity, enrolled with a new certificate",
            if s.revoke_reason.is_empty() {
                "no reason given"
            } else {
                &s.revoke_reason
            }
        );
    }
    if let Some(c) = cert {
        let checked = crate::trust::verify_server_cert(c, &root, now_ms)
            .map_err(|e| anyhow::anyhow!("--server-cert: {e}"))?;
        if checked.server != key {
            bail!(
                "--server-cert is for server key {}, but this server's key is {key} (`lemonade-nexus identity show`)",
                checked.server
            );
        }
    }
    if state.is_active_server(&key) {
        return Ok(None);
    }
    let cert = match cert {
        Some(c) => c.to_vec(),
        None if root == key => crate::trust::seal_server_cert(
            me.pair(),
            &ServerCert {
                server: key,
                name: name.to_owned(),
                issued_at_ms: now_ms,
                expires_at_ms: 0,
            },
        ),
        None => bail!(
            "this cluster's root is {root}, not this server's key {key}, so the server needs a certificate: on the root key's machine run `lemonade-nexus enroll-server {key} --id <name> --root-key <file> --out server.cert`, then start with --server-cert server.cert"
        ),
    };
    Ok(Some(OpBody::Trust(TrustOp::AdmitServer { cert })))
}

/// Opens (or creates, at genesis) identity and store, and appends the genesis ops.
///
/// The store's root is fixed when the store is created: `--root`, or this server's own key (a
/// new single-server cluster). A server **joining an existing cluster** starts the same way (an
/// empty data directory, `--root <cluster root>`, `--server-cert`, and gossip's seed peer): its
/// new store carries the cluster's root, so it invents no cluster, and its own log starts with
/// its `AdmitServer` and its server node; the rest of the cluster's state arrives by gossip.
/// Rule: the first op of every server's log is its `AdmitServer` ([`admission_op`]), then
/// [`genesis_ops`].
fn open_state(cfg: &Config, args: &ServeArgs) -> Result<(Identity, Store, bool)> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    identity::check_master_outside(&cfg.master_key_file, &cfg.data_dir)?;
    let master = MasterKey::load_or_create(&cfg.master_key_file, &SystemRandom::new())?;
    let (id, _) = Identity::load_or_create(&cfg.data_dir, &master, &SystemRandom::new())?;
    let path = store::db_path(&cfg.data_dir);
    let mut store = if !path.exists() {
        let root = args.root.unwrap_or(id.node.public());
        let ipam = cfg
            .ipam_config()
            .map_err(|e| anyhow::anyhow!("overlay configuration: {e}"))?;
        Store::create(&path, root, ipam)?.0
    } else {
        let store = Store::open(&path)?.0;
        if args.root.is_some_and(|r| r != store.root()) {
            bail!(
                "--root differs from the trust anchor of the existing store {}",
                path.display()
            );
        }
        store
    };
    // Genesis: no op in the log yet (a new data directory, or one prepared by `init`).
    let fresh = store.op_count()? == 0;
    let me = id.node.public();
    let cert = match &args.server_cert {
        Some(p) => Some(crate::trust::cli::read_object_file(p).context("--server-cert")?),
        None => None,
    };
    // The server's name: --server-name, else its certificate's, else one derived from its key.
    let cert_name = cert
        .as_deref()
        .and_then(|c| crate::trust::decode_server_cert(c, &store.root()).ok())
        .map(|c| c.name);
    let name = args
        .server_name
        .clone()
        .or(cert_name)
        .unwrap_or_else(|| format!("server-{}", &hex::encode(me.as_bytes())[..8]));
    let admit = admission_op(store.state(), &id.node, cert.as_deref(), &name, now_ms())?;
    let ops = genesis_ops(
        store.state(),
        &me,
        id.wireguard.public(),
        &name,
        args.admin_key,
        fresh,
    )?;
    let ops: Vec<OpBody> = admit.into_iter().chain(ops).collect();
    if !ops.is_empty() {
        let batch = ops.into_iter().map(|b| (me, b, None)).collect();
        for r in store.append_local_batch(&id.node, batch, now_ms())? {
            if let Submitted::Appended { effect: Err(e), .. } = r? {
                bail!(
                    "genesis op refused: {e}. If the cluster's root is another key, start this server ({me}) with --server-cert (from `lemonade-nexus enroll-server`)"
                );
            }
        }
    }
    let tree = store.state().tree();
    for p in [
        Permission::AddChild,
        Permission::AllocateIp,
        Permission::Admin,
    ] {
        crate::authz::authorize(tree, &me, p, NodeId::ROOT).map_err(|e| {
            anyhow::anyhow!("this server cannot enrol devices: {e}. Start it with --server-cert (from `lemonade-nexus enroll-server`), or the cluster root must grant it admin on the root")
        })?;
    }
    Ok((id, store, fresh))
}

/// The running dataplane of the client plane.
struct Plane {
    backend: Backend,
    ifname: String,
    private_key: PrivateKey,
    own_public: [u8; 32],
    port: u16,
    link: LinkConfig,
    rtnl: Rtnl,
    /// What the last successful reconcile left on the device. A reconcile asked for by a join
    /// diffs against it instead of dumping the device (a dump costs time linear in the number
    /// of peers, for every batch of joins); the periodic drift check always dumps.
    programmed: Option<DeviceState>,
}

impl Plane {
    /// Brings the device to the store's state; returns the state version it read (see
    /// [`PeerSync`]). `full`: dump the device and diff against what it really has (start-up, drift
    /// check, after a failure); otherwise diff against what the last reconcile programmed.
    async fn reconcile(&mut self, state: &ApiState, full: bool) -> Result<u64> {
        let (desired, version) = {
            let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
            let device = client_plane_device(
                store.state(),
                self.private_key.clone(),
                self.own_public,
                self.port,
            );
            (device, state.version())
        };
        let known = if full { None } else { self.programmed.take() };
        let actual = match known {
            Some(k) => k,
            None => self.backend.get(&self.ifname).await?,
        };
        let diff = lemonade_nexus_netlink::diff(&actual, &desired, self.backend.capabilities())?;
        if !diff.is_empty() {
            self.backend.apply(&self.ifname, &diff).await?;
            tracing::info!(ifname = %self.ifname, peers = desired.peers.len(), full, "client-plane device reconciled");
        }
        self.programmed = Some(DeviceState {
            private_key: desired.private_key.clone(),
            public_key: None,
            listen_port: desired.listen_port.unwrap_or(actual.listen_port),
            fwmark: desired.fwmark.unwrap_or(actual.fwmark),
            peers: desired
                .peers
                .iter()
                .cloned()
                .map(lemonade_nexus_netlink::PeerState::from_config)
                .collect(),
        });
        if full {
            let changes = self.rtnl.reconcile_link(&self.ifname, &self.link).await?;
            if !changes.is_empty() {
                tracing::info!(ifname = %self.ifname, ?changes, "client-plane link reconciled");
            }
        }
        Ok(version)
    }
}

async fn start_plane(
    cfg: &Config,
    args: &ServeArgs,
    id: &Identity,
    ipam: &IpamConfig,
) -> Result<(Plane, DataplaneInfo)> {
    let pref = match cfg.dataplane {
        Dataplane::Auto => BackendPreference::Auto,
        Dataplane::Kernel => BackendPreference::Kernel,
        Dataplane::Userspace => BackendPreference::Userspace,
    };
    let (backend, choice) = Backend::choose_with_reason(pref).await?;
    let ifname = args.wg_interface.clone();
    backend
        .ensure_device(&ifname)
        .await
        .with_context(|| format!("cannot create the client-plane WireGuard interface {ifname}"))?;
    let private_key = PrivateKey(
        id.wireguard
            .private_base64()
            .parse()
            .context("the WireGuard identity key")?,
    );
    let plane = Plane {
        backend,
        ifname: ifname.clone(),
        private_key,
        own_public: id.wireguard.public(),
        port: cfg.listen.wg_client_port,
        link: LinkConfig {
            up: true,
            mtu: Some(CLIENT_MTU),
            addresses: gateway_addresses(ipam)?,
            routes: Vec::new(),
            table: CLIENT_TABLE,
            rule_priority: None,
        },
        rtnl: Rtnl::connect()?,
        programmed: None,
    };
    let info = DataplaneInfo {
        backend: choice.kind.to_string(),
        fallback_reason: choice.fallback_reason,
        interface: Some(ifname),
    };
    Ok((plane, info))
}

/// Keeps the device equal to the store: on request (joins) and every [`DRIFT_CHECK`].
async fn reconcile_loop(mut plane: Plane, state: Arc<ApiState>, mut worker: PeerSyncWorker) {
    let every = api::observed::OBSERVE_EVERY;
    let mut observe = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    observe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut full = true;
    loop {
        let applied = match plane.reconcile(&state, full).await {
            Ok(version) => version,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "client-plane reconcile failed; retrying");
                // The device is in an unknown state: the next one dumps it.
                plane.programmed = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        worker.applied.send_replace(applied);
        // Next: as soon as someone waits for a newer state (see `PeerSync`), or against drift;
        // meanwhile the device is observed (endpoints, handshakes: `api::observed`).
        let drift = tokio::time::Instant::now() + DRIFT_CHECK;
        loop {
            tokio::select! {
                // A waiting join first; an observation only when none is.
                biased;
                r = worker.requested.wait_for(|v| *v > applied) => {
                    if r.is_err() { return }
                    full = false;
                    break;
                }
                _ = tokio::time::sleep_until(drift) => {
                    full = true;
                    break;
                }
                _ = observe.tick() => {
                    let recorded = match plane.backend.get(&plane.ifname).await {
                        Ok(dump) => api::observed::record(&state, &dump, now_ms()),
                        Err(e) => Err(format!("{e:#}")),
                    };
                    match recorded {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(devices = n, "recorded server-observed endpoints"),
                        Err(e) => tracing::warn!(error = %e, "client-plane observation failed"),
                    }
                }
            }
        }
    }
}

/// Runs the server until SIGINT/SIGTERM. `out` gets the start-up summary (identity, pin, URL).
pub fn serve(cfg: &Config, args: ServeArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve_async(cfg, args, out))
}

async fn serve_async(cfg: &Config, args: ServeArgs, out: &mut dyn std::io::Write) -> Result<()> {
    // Signal handlers first: a SIGTERM that arrives once the summary is printed must stop us
    // gracefully, not kill us.
    let mut signals = Signals::install()?;
    let (id, store, fresh) = open_state(cfg, &args)?;
    let ipam = store.state().ipam().config().clone();
    let api_addr = cfg.listen.api;
    let public_host = args
        .public_host
        .clone()
        .or_else(|| (!api_addr.ip().is_unspecified()).then(|| api_addr.ip().to_string()));
    let names: Vec<String> = public_host
        .iter()
        .cloned()
        .chain(["localhost".to_owned()])
        .collect();
    let cert = tls::load_or_generate(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        &cfg.data_dir,
        &names,
    )?;

    let (plane, dataplane) = if args.no_dataplane {
        (
            None,
            DataplaneInfo {
                backend: "none".into(),
                fallback_reason: None,
                interface: None,
            },
        )
    } else {
        let (p, i) = start_plane(cfg, &args, &id, &ipam).await?;
        (Some(p), i)
    };
    let (peers, worker) = match plane {
        Some(_) => {
            let (s, w) = PeerSync::new();
            (Some(s), Some(w))
        }
        None => (None, None),
    };
    let listener = TcpListener::bind(api_addr)
        .with_context(|| format!("cannot listen on {api_addr} (public API)"))?;
    let bound = listener.local_addr()?;
    let settings = Settings {
        registration: args.registration,
        wg_public_key: id.wireguard.public(),
        wg_port: cfg.listen.wg_client_port,
        public_host: public_host.clone(),
        private_api_port: cfg.listen.private_api_port,
        api_port: bound.port(),
        tls_pin: Some(cert.pin),
    };
    let state = Arc::new(
        ApiState::new(id.node, store, settings, dataplane.clone(), peers)
            .with_rate_limit(args.rate_limit, args.rate_limit.saturating_mul(2)),
    );

    // Replication with the other servers (QUIC on listen.gossip, see `crate::gossip`).
    let gossip = {
        let master = MasterKey::load(&cfg.master_key_file)?;
        let key = Identity::load(&cfg.data_dir, &master)?.node;
        crate::gossip::node::start_for_server(
            &state,
            key,
            cfg.listen.gossip,
            public_host.as_deref(),
            args.seed_peers.clone(),
        )?
    };

    // The device first (converges after a crash), then the API.
    let plane = match (plane, worker) {
        (Some(mut p), Some(w)) => {
            p.reconcile(&state, true)
                .await
                .context("initial reconcile of the client plane")?;
            Some((p, w))
        }
        _ => None,
    };

    // The server backbone (a second WireGuard interface, see `crate::backbone`).
    let backbone = match &plane {
        Some((p, _)) => {
            let host = public_host.as_deref();
            crate::backbone::start(&args, cfg, host, &p.backend, &p.private_key).await?
        }
        None => None,
    };

    // The private API listens on the tunnel (gateway) addresses only, IPv4 and IPv6, never on
    // 0.0.0.0 or [::]: only enrolled devices reach it, through the tunnel. Without a dataplane
    // there is no tunnel, so no private API.
    let private_listeners = match &plane {
        Some(_) => {
            let g = ipam.address_of(1);
            let port = cfg.listen.private_api_port;
            vec![
                bind_tunnel(std::net::SocketAddr::from((g.v4, port))).await?,
                bind_tunnel(std::net::SocketAddr::from((g.v6, port))).await?,
            ]
        }
        None => Vec::new(),
    };
    let private_addrs: Vec<_> = private_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let tls_cfg = tls::server_config(&cert)?;
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let api_state = state.clone();
    let http_thread =
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || -> Result<()> {
                actix_web::rt::System::new().block_on(async move {
                    let st = api_state.clone();
                    let server = actix_web::HttpServer::new(move || {
                        actix_web::App::new().configure(api::public(st.clone()))
                    })
                    .workers(2)
                    .disable_signals()
                    .shutdown_timeout(5)
                    .listen_rustls_0_23(listener, tls_cfg.clone())?
                    .run();
                    let private = if private_listeners.is_empty() {
                        None
                    } else {
                        let st = api_state.clone();
                        let mut p = actix_web::HttpServer::new(move || {
                            actix_web::App::new().configure(api::private::routes(st.clone()))
                        })
                        .workers(1)
                        .disable_signals()
                        .shutdown_timeout(5);
                        for l in private_listeners {
                            p = p.listen_rustls_0_23(l, tls_cfg.clone())?;
                        }
                        Some(p.run())
                    };
                    let _ = handle_tx.send((server.handle(), private.as_ref().map(|p| p.handle())));
                    match private {
                        Some(p) => {
                            let (a, b) = tokio::join!(server, p);
                            a?;
                            b?;
                        }
                        None => server.await?,
                    }
                    Ok(())
                })
            })?;
    let handle = match handle_rx.recv() {
        Ok(h) => h,
        // The thread ended before the server ran: its error says why.
        Err(_) => {
            return match http_thread.join() {
                Ok(Err(e)) => Err(e.context("the public API failed to start")),
                _ => Err(anyhow::anyhow!("the public API failed to start")),
            };
        }
    };

    let host = public_host.unwrap_or_else(|| "<this-host>".into());
    let url = JoinUrl {
        host,
        port: bound.port(),
        pin: cert.pin,
    };
    writeln!(
        out,
        "lemonade-nexus serve: {}",
        match (fresh, args.seed_peers.is_empty()) {
            (true, true) => "genesis: new cluster",
            (true, false) => "new server joining the cluster through its seed peers",
            (false, _) => "existing cluster",
        }
    )?;
    writeln!(out, "server key:     {}", state.server.public())?;
    writeln!(
        out,
        "cluster root:   {}",
        state.store.lock().unwrap_or_else(|p| p.into_inner()).root()
    )?;
    writeln!(
        out,
        "dataplane:      {}{}",
        dataplane.backend,
        dataplane
            .fallback_reason
            .as_ref()
            .map(|r| format!(" (FELL BACK: {r})"))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "gossip:         {} (udp, QUIC)",
        gossip
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    )?;
    writeln!(out, "public API:     https://{bound}")?;
    if private_addrs.is_empty() {
        writeln!(out, "private API:    off (no dataplane, no tunnel)")?;
    } else {
        let urls: Vec<String> = private_addrs
            .iter()
            .map(|a| format!("https://{a}"))
            .collect();
        writeln!(out, "private API:    {} (tunnel only)", urls.join(" "))?;
    }
    writeln!(out, "TLS pin:        {}", cert.pin)?;
    writeln!(out, "join URL:       {url}")?;
    out.flush()?;

    // The reconciler runs here, beside the signal wait (the backends' futures are not Send, so
    // it is not a spawned task); shutdown drops it between two reconciles or mid-way, which is
    // safe: every reconcile starts from a fresh dump.
    match plane {
        Some((p, w)) => {
            let changed = w.requested.clone();
            tokio::select! {
                _ = reconcile_loop(p, state.clone(), w) => {}
                _ = crate::backbone::run(backbone, state.clone(), changed) => {}
                _ = signals.recv() => {}
            }
        }
        None => signals.recv().await,
    }
    tracing::info!("shutting down: API stops, the WireGuard device stays up");
    gossip.shutdown();
    let (handle, private_handle) = handle;
    if let Some(p) = private_handle {
        p.stop(true).await;
    }
    handle.stop(true).await;
    let served = match http_thread.join() {
        Ok(r) => r,
        Err(_) => bail!("the API thread panicked"),
    };
    close_store(state).await;
    served
}

/// Binds a tunnel address of the private API. The address was just put on the interface: an
/// IPv6 address may still be tentative (duplicate address detection) for a moment, so a refused
/// bind is retried for a few seconds before giving up.
async fn bind_tunnel(addr: std::net::SocketAddr) -> Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrNotAvailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot listen on {addr} (private API)"));
            }
        }
    }
}

/// Drops the last reference to the API state, which closes the store cleanly. The API's worker
/// threads may still be dropping their copies after the server stopped; exiting before they do
/// would leave the database to be recovered on the next open.
async fn close_store(mut state: Arc<ApiState>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Arc::try_unwrap(state) {
            Ok(s) => {
                drop(s);
                return;
            }
            Err(shared) if tokio::time::Instant::now() < deadline => {
                state = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                tracing::warn!(
                    "API workers still hold the store at exit; it will be recovered on the next start"
                );
                return;
            }
        }
    }
}

/// SIGINT and SIGTERM, installed at start.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::join::{JoinRequest, plan_join};
    use crate::hlc::Hlc;
    use crate::identity::NodeKey;

    use crate::testkit::apply_all;

    #[test]
    fn genesis_names_the_admin_once_and_only_at_genesis() {
        let me = NodeKey::from_seed(&[1; 32]).public();
        let admin = NodeKey::from_seed(&[2; 32]).public();
        let mut state = State::new(me);
        let ops = genesis_ops(&state, &me, [5; 32], "srv", Some(admin), true).expect("genesis");
        assert_eq!(ops.len(), 2);
        let mut seq = 0;
        apply_all(&mut state, &me, &mut seq, ops);
        assert!(
            crate::authz::authorize(state.tree(), &admin, Permission::Admin, NodeId::ROOT).is_ok()
        );
        // A restart with the same flags appends nothing.
        assert!(
            genesis_ops(&state, &me, [5; 32], "srv", Some(admin), false)
                .expect("again")
                .is_empty()
        );
        // A later start cannot name another administrator.
        let other = NodeKey::from_seed(&[3; 32]).public();
        assert!(genesis_ops(&state, &me, [5; 32], "srv", Some(other), false).is_err());
    }

    #[test]
    fn admission_is_self_issued_for_a_root_server_and_required_otherwise() {
        use crate::trust::{ServerCert, seal_revocation, seal_server_cert};
        let root = NodeKey::from_seed(&[1; 32]);
        let me = NodeKey::from_seed(&[2; 32]);
        // Single server: the root is this server's key; it admits itself, then genesis follows.
        let mut solo = State::new(root.public());
        let admit = admission_op(&solo, &root, None, "solo", 1_000)
            .expect("self-issued")
            .expect("an op");
        let mut ops = vec![admit];
        ops.extend(
            genesis_ops(&solo, &root.public(), [5; 32], "solo", None, true).expect("genesis"),
        );
        let mut seq = 0;
        apply_all(&mut solo, &root.public(), &mut seq, ops);
        assert!(solo.is_active_server(&root.public()));
        assert!(
            admission_op(&solo, &root, None, "solo", 2_000)
                .expect("restart")
                .is_none(),
            "already admitted: nothing on restart"
        );

        // A server of a cluster whose root is elsewhere: a certificate is required.
        let mut state = State::new(root.public());
        let e = admission_op(&state, &me, None, "eu-1", 1_000).expect_err("no cert");
        assert!(e.to_string().contains("enroll-server"), "{e}");
        let cert = |signer: &NodeKey, server: PublicKey, expires| {
            seal_server_cert(
                signer.pair(),
                &ServerCert {
                    server,
                    name: "eu-1".into(),
                    issued_at_ms: 500,
                    expires_at_ms: expires,
                },
            )
        };
        let stranger = NodeKey::from_seed(&[3; 32]);
        let e = admission_op(
            &state,
            &me,
            Some(&cert(&stranger, me.public(), 0)),
            "x",
            1_000,
        )
        .expect_err("wrong root");
        assert!(
            e.to_string().contains(&format!(
                "signed by {}, but this cluster's root is {}",
                stranger.public(),
                root.public()
            )),
            "{e}"
        );
        let e = admission_op(
            &state,
            &me,
            Some(&cert(&root, stranger.public(), 0)),
            "x",
            1_000,
        )
        .expect_err("someone else's");
        assert!(e.to_string().contains("this server's key is"), "{e}");
        assert!(
            admission_op(
                &state,
                &me,
                Some(&cert(&root, me.public(), 900)),
                "x",
                1_000
            )
            .is_err(),
            "expired"
        );
        let good = cert(&root, me.public(), 0);
        let admit = admission_op(&state, &me, Some(&good), "eu-1", 1_000)
            .expect("valid")
            .expect("an op");
        let mut ops = vec![admit];
        ops.extend(genesis_ops(&state, &me.public(), [6; 32], "eu-1", None, true).expect("g"));
        let mut seq = 0;
        apply_all(&mut state, &me.public(), &mut seq, ops);
        assert!(
            crate::authz::authorize(state.tree(), &me.public(), Permission::Admin, NodeId::ROOT)
                .is_ok()
        );

        // Revoked: the server refuses to start.
        let rev = seal_revocation(
            root.pair(),
            &crate::trust::Revocation {
                server: me.public(),
                issued_at_ms: 2_000,
                reason: "stolen".into(),
            },
        );
        apply_all(
            &mut state,
            &me.public(),
            &mut seq,
            vec![OpBody::Trust(crate::trust::TrustOp::RevokeServer {
                revocation: rev,
            })],
        );
        let e = admission_op(&state, &me, Some(&good), "eu-1", 3_000).expect_err("revoked");
        assert!(
            e.to_string().contains("revoked") && e.to_string().contains("stolen"),
            "{e}"
        );
    }

    #[test]
    fn device_config_has_one_peer_per_leased_device() {
        let me = NodeKey::from_seed(&[1; 32]).public();
        let mut state = State::new(me);
        let mut seq = 0;
        let ops = genesis_ops(&state, &me, [5; 32], "srv", None, true).expect("genesis");
        apply_all(&mut state, &me, &mut seq, ops);
        for c in [2u8, 3] {
            let req = JoinRequest {
                client: NodeKey::from_seed(&[c; 32]).public(),
                wg_pubkey: WgKey([c; 32]),
                hostname: None,
            };
            let now = Hlc {
                wall_ms: 2_000,
                logical: 0,
            };
            let plan =
                plan_join(&state, &me, seq + 1, &req, Registration::Open, now).expect("plan");
            apply_all(&mut state, &me, &mut seq, plan.ops);
        }
        let dev = client_plane_device(&state, PrivateKey(Key([9; 32])), [5; 32], 51940);
        assert_eq!(
            dev.peers.len(),
            2,
            "the server node's own key is not a peer"
        );
        assert_eq!(dev.listen_port, Some(51940));
        for p in &dev.peers {
            assert_eq!(p.allowed_ips.len(), 2);
            assert!(
                p.allowed_ips
                    .iter()
                    .all(|n| n.prefix_len() == 32 || n.prefix_len() == 128)
            );
        }
        assert_ne!(dev.peers[0].allowed_ips, dev.peers[1].allowed_ips);
        let gw = gateway_addresses(state.ipam().config()).expect("gw");
        assert_eq!(gw[0].to_string(), "10.64.0.1/10");
    }
}
