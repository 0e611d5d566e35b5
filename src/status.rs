//! `lemonade-nexus status [--json]` for both roles.
//!
//! - A client (its data directory holds `join.json`): the server it joined, its tunnel addresses,
//!   the server's WireGuard endpoint, and from a dump of the local WireGuard device the handshake
//!   age and traffic counters of the server peer, and the backend in use.
//! - A server (its data directory holds the state store): one row per peer of the client-plane
//!   device (hostname from the tree, tunnel addresses, endpoint, handshake age, rx/tx).
//!
//! The views and their rendering are pure (`now` is an argument); only [`status_command`] reads
//! files and dumps devices.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use lemonade_nexus_netlink::model::IpNet;
use lemonade_nexus_netlink::uapi::UapiBackend;
use lemonade_nexus_netlink::{BackendKind, DeviceState, Key, WgBackend};
use serde::Serialize;

use crate::api::join::JoinResponse;
use crate::config::Config;

/// `lemonade-nexus status` options.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The WireGuard interface to dump. Default: the one `join` recorded (client), or `ln-client`
    /// (server).
    #[arg(long, value_name = "IFNAME")]
    pub wg_interface: Option<String>,
}

/// One WireGuard peer as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    pub public_key: String,
    /// The peer's hostname in the tree, when known.
    pub name: Option<String>,
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<String>,
    /// Seconds since the last handshake; `None`: never.
    pub handshake_age_secs: Option<u64>,
    /// Unix seconds of the last handshake (last seen); `None`: never.
    pub last_handshake_unix: Option<u64>,
    /// A handshake less than 180 s ago (`crate::api::observed::ONLINE_WITHIN_MS`).
    pub online: bool,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A client's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientStatus {
    pub role: &'static str,
    /// The server's API address (host:port of the join URL), when the agent recorded it.
    pub server: Option<String>,
    pub node_id: String,
    pub tunnel_ipv4: String,
    pub tunnel_ipv6: String,
    pub server_endpoint: String,
    pub server_tunnel_ipv4: String,
    pub interface: String,
    /// `kernel` or `userspace`; `None` when the device is missing.
    pub backend: Option<String>,
    /// The server peer on the local device; `None` when the device or the peer is missing.
    pub server_peer: Option<PeerView>,
    /// The other peers on the local device: devices of this device's group, reached directly.
    pub group_peers: Vec<PeerView>,
    /// Why the device could not be read, if it could not.
    pub device_error: Option<String>,
}

/// A server's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerStatus {
    pub role: &'static str,
    pub interface: String,
    pub backend: Option<String>,
    /// Why the running server's `auto` backend fell back to userspace (from `GET /api/health`).
    pub fallback_reason: Option<String>,
    /// What the running server's `GET /api/health` said, or why it could not be asked.
    pub health: String,
    /// Where peer names came from, or why they are missing.
    pub names: String,
    pub peers: Vec<PeerView>,
    pub device_error: Option<String>,
    /// The server backbone interface (`crate::backbone`): the other servers as peers.
    pub backbone: Option<BackboneView>,
}

/// The backbone interface as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackboneView {
    pub interface: String,
    pub peers: Vec<PeerView>,
    pub device_error: Option<String>,
}

/// The backbone section of a server's status: one line per other server.
fn render_backbone(s: &ServerStatus) -> String {
    let Some(b) = &s.backbone else {
        return String::new();
    };
    let mut o = format!("backbone:   {} ({} servers)\n", b.interface, b.peers.len());
    if let Some(e) = &b.device_error {
        o.push_str(&format!("  device:   {e}\n"));
    }
    for p in &b.peers {
        o.push_str(&format!(
            "  {}  {}  {}  handshake {}\n",
            p.name.clone().unwrap_or_else(|| short_key(&p.public_key)),
            p.allowed_ips.join(" "),
            p.endpoint.as_deref().unwrap_or("-"),
            format_age(p.handshake_age_secs)
        ));
    }
    o
}

/// Seconds between `last` and `now` (0 if `last` is in the future); `None` when never.
pub fn handshake_age(last: Option<SystemTime>, now: SystemTime) -> Option<u64> {
    last.map(|t| now.duration_since(t).unwrap_or(Duration::ZERO).as_secs())
}

/// "never", "42s ago", "3m 5s ago", "2h 1m ago", "4d 3h ago".
pub fn format_age(age: Option<u64>) -> String {
    let Some(s) = age else {
        return "never".into();
    };
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h ago")
    } else if h > 0 {
        format!("{h}h {m}m ago")
    } else if m > 0 {
        format!("{m}m {s}s ago")
    } else {
        format!("{s}s ago")
    }
}

/// Bytes with a binary unit: "512 B", "1.5 KiB", "3.0 MiB".
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

/// The peers of a device dump as views, sorted by name then key. Pure.
pub fn peer_views(
    dev: &DeviceState,
    names: &HashMap<Key, String>,
    now: SystemTime,
) -> Vec<PeerView> {
    let mut v: Vec<PeerView> = dev
        .peers
        .iter()
        .map(|p| PeerView {
            public_key: p.config.public_key.to_string(),
            name: names.get(&p.config.public_key).cloned(),
            allowed_ips: p.config.allowed_ips.iter().map(IpNet::to_string).collect(),
            endpoint: p.config.endpoint.map(|e| e.to_string()),
            handshake_age_secs: handshake_age(p.last_handshake, now),
            last_handshake_unix: p
                .last_handshake
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            online: handshake_age(p.last_handshake, now)
                .is_some_and(|a| a < crate::api::observed::ONLINE_WITHIN_MS / 1_000),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
        })
        .collect();
    v.sort_by(|a, b| (&a.name, &a.public_key).cmp(&(&b.name, &b.public_key)));
    v
}

/// The client view from the saved join answer and (if readable) the device dump. Pure.
pub fn client_status(
    answer: &JoinResponse,
    agent: Option<&AgentState>,
    interface: &str,
    dump: Result<(BackendKind, DeviceState), String>,
    now: SystemTime,
) -> ClientStatus {
    let (backend, server_peer, group_peers, device_error) = match dump {
        Ok((kind, dev)) => {
            let names = HashMap::new();
            let (server, group): (Vec<PeerView>, Vec<PeerView>) = peer_views(&dev, &names, now)
                .into_iter()
                .partition(|p| p.public_key == answer.server_wg_pubkey);
            let peer = server.into_iter().next();
            let err = peer
                .is_none()
                .then(|| format!("the server peer is not on {interface}"));
            (Some(kind.to_string()), peer, group, err)
        }
        Err(e) => (None, None, Vec::new(), Some(e)),
    };
    ClientStatus {
        role: "client",
        server: agent.map(|a| a.server.clone()),
        node_id: answer.node_id.clone(),
        tunnel_ipv4: answer.tunnel_ipv4.clone(),
        tunnel_ipv6: answer.tunnel_ipv6.clone(),
        server_endpoint: answer.server_wg_endpoint.clone(),
        server_tunnel_ipv4: answer.server_tunnel_ipv4.clone(),
        interface: interface.to_owned(),
        backend,
        server_peer,
        group_peers,
        device_error,
    }
}

/// Text rendering of a client's status. Pure.
pub fn render_client(s: &ClientStatus) -> String {
    let mut o = String::new();
    o.push_str("role:              client\n");
    if let Some(server) = &s.server {
        o.push_str(&format!("server:            {server}\n"));
    }
    o.push_str(&format!("node:              {}\n", s.node_id));
    o.push_str(&format!(
        "tunnel addresses:  {} {}\n",
        s.tunnel_ipv4, s.tunnel_ipv6
    ));
    o.push_str(&format!(
        "server endpoint:   {} (tunnel {})\n",
        s.server_endpoint, s.server_tunnel_ipv4
    ));
    o.push_str(&format!(
        "interface:         {} ({})\n",
        s.interface,
        s.backend.as_deref().unwrap_or("not present")
    ));
    if let Some(p) = &s.server_peer {
        o.push_str(&format!(
            "last handshake:    {}\n",
            format_age(p.handshake_age_secs)
        ));
        o.push_str(&format!(
            "traffic:           rx {}  tx {}\n",
            format_bytes(p.rx_bytes),
            format_bytes(p.tx_bytes)
        ));
    }
    o.push_str(&format!("group peers:       {}\n", s.group_peers.len()));
    for p in &s.group_peers {
        o.push_str(&format!(
            "  {}  {}  endpoint {}  handshake {}  {}\n",
            p.public_key,
            p.allowed_ips.join(" "),
            p.endpoint.as_deref().unwrap_or("-"),
            format_age(p.handshake_age_secs),
            if p.online { "online" } else { "offline" }
        ));
    }
    if let Some(e) = &s.device_error {
        o.push_str(&format!("device:            {e}\n"));
    }
    o
}

/// Text rendering of a server's status: a header and one row per peer. Pure.
pub fn render_server(s: &ServerStatus) -> String {
    let mut o = String::new();
    o.push_str("role:       server\n");
    o.push_str(&format!(
        "interface:  {} ({})\n",
        s.interface,
        s.backend.as_deref().unwrap_or("not present")
    ));
    if let Some(r) = &s.fallback_reason {
        o.push_str(&format!("fell back:  {r}\n"));
    }
    o.push_str(&format!("health:     {}\n", s.health));
    o.push_str(&format!("names:      {}\n", s.names));
    if let Some(e) = &s.device_error {
        o.push_str(&format!("device:     {e}\n"));
    }
    o.push_str(&format!("peers:      {}\n", s.peers.len()));
    if s.peers.is_empty() {
        return o + &render_backbone(s);
    }
    let rows: Vec<[String; 7]> = s
        .peers
        .iter()
        .map(|p| {
            [
                p.name.clone().unwrap_or_else(|| short_key(&p.public_key)),
                p.allowed_ips.join(" "),
                p.endpoint.clone().unwrap_or_else(|| "-".into()),
                if p.online { "online" } else { "offline" }.into(),
                format_age(p.handshake_age_secs),
                format_bytes(p.rx_bytes),
                format_bytes(p.tx_bytes),
            ]
        })
        .collect();
    let head = [
        "PEER",
        "TUNNEL",
        "ENDPOINT",
        "STATE",
        "HANDSHAKE",
        "RX",
        "TX",
    ]
    .map(String::from);
    let mut widths = head.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&head).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        o.push_str(line.join("  ").trim_end());
        o.push('\n');
    }
    o + &render_backbone(s)
}

fn short_key(k: &str) -> String {
    format!("{}…", k.chars().take(10).collect::<String>())
}

/// What the join agent records beside `join.json` so `status` and `leave` find its interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AgentState {
    /// host:port of the server's public API.
    pub server: String,
    /// The local WireGuard interface, or `None` when joined with `--no-dataplane`.
    pub interface: Option<String>,
}

/// `<data dir>/agent.json`.
pub fn agent_state_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("agent.json")
}

/// `<data dir>/join.json`.
pub fn join_state_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("join.json")
}

/// Reads `agent.json` if present.
pub fn read_agent_state(data_dir: &Path) -> Result<Option<AgentState>> {
    let p = agent_state_path(data_dir);
    match std::fs::read(&p) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("{} is not valid", p.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

/// Dumps `ifname` with the backend that drives it: userspace when a UAPI socket exists for it,
/// else the kernel.
pub async fn dump_device(ifname: &str) -> Result<(BackendKind, DeviceState), String> {
    let uapi = UapiBackend::new();
    let userspace = uapi
        .socket_path(ifname)
        .map(|p| p.exists())
        .unwrap_or(false);
    if userspace {
        return uapi
            .get(ifname)
            .await
            .map(|d| (BackendKind::Userspace, d))
            .map_err(|e| format!("cannot dump {ifname} (userspace): {e}"));
    }
    let kernel = lemonade_nexus_netlink::kernel::KernelBackend::connect(Default::default())
        .await
        .map_err(|e| {
            format!("interface {ifname} not found (no UAPI socket, no kernel WireGuard: {e})")
        })?;
    kernel
        .get(ifname)
        .await
        .map(|d| (BackendKind::Kernel, d))
        .map_err(|e| format!("cannot dump {ifname} (kernel): {e}"))
}

/// `lemonade-nexus status`.
pub fn status_command(cfg: &Config, args: StatusArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let dir = &cfg.data_dir;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let join_path = join_state_path(dir);
    if join_path.exists() {
        let answer: JoinResponse = serde_json::from_slice(
            &std::fs::read(&join_path)
                .with_context(|| format!("cannot read {}", join_path.display()))?,
        )
        .with_context(|| format!("{} is not a join answer", join_path.display()))?;
        let agent = read_agent_state(dir)?;
        let no_dataplane =
            args.wg_interface.is_none() && agent.as_ref().is_some_and(|a| a.interface.is_none());
        let ifname = args
            .wg_interface
            .clone()
            .or_else(|| agent.as_ref().and_then(|a| a.interface.clone()))
            .unwrap_or_else(|| "ln-wg".into());
        let dump = if no_dataplane {
            Err("joined with --no-dataplane: no local interface".into())
        } else {
            rt.block_on(dump_device(&ifname))
        };
        let s = client_status(&answer, agent.as_ref(), &ifname, dump, SystemTime::now());
        return if args.json {
            write_json(out, &s)
        } else {
            Ok(write!(out, "{}", render_client(&s))?)
        };
    }
    let db = crate::store::db_path(dir);
    if !db.exists() {
        anyhow::bail!(
            "{} holds neither a join state (join.json: run `lemonade-nexus join URL`) nor a server's state store (run `lemonade-nexus serve`); point --data-dir at the right directory",
            dir.display()
        );
    }
    // The running server (if any) says which backend it uses, whether it fell back, and its
    // interface; the generated certificate in the data directory gives the pin to trust.
    let health = rt.block_on(local_health(cfg));
    let (health_note, fallback_reason, health_if) = match &health {
        Ok(h) => (
            format!(
                "server running (backend {}); state {} ({} ops); gossip: {}",
                h["dataplane"]["backend"].as_str().unwrap_or("?"),
                h["state_hash"]
                    .as_str()
                    .unwrap_or("?")
                    .get(..16)
                    .unwrap_or("?"),
                h["op_count"].as_u64().unwrap_or(0),
                gossip_summary(&h["gossip"])
            ),
            h["dataplane"]["fallback_reason"].as_str().map(String::from),
            h["dataplane"]["interface"].as_str().map(String::from),
        ),
        Err(e) => (format!("not reachable ({e:#})"), None, None),
    };
    let ifname = args
        .wg_interface
        .or(health_if)
        .unwrap_or_else(|| "ln-client".into());
    // While `serve` runs it holds the store's lock; then the peers are shown without names.
    let (names, source) = match crate::store::Snapshot::read(&db) {
        Ok(snap) => {
            let names: HashMap<Key, String> = snap
                .state
                .tree()
                .nodes()
                .filter_map(|n| Some((Key(n.wg_pubkey?.0), n.hostname.clone())))
                .collect();
            (names, "from the state store".to_owned())
        }
        // The running server holds the store's lock: say so plainly rather than the raw error.
        Err(_) if health.is_ok() => (
            HashMap::new(),
            "unavailable while the server runs (it holds the state store's lock); rows show keys"
                .to_owned(),
        ),
        Err(e) => (
            HashMap::new(),
            format!("unavailable (state store not readable: {e})"),
        ),
    };
    let dump = rt.block_on(dump_device(&ifname));
    let (backend, peers, device_error) = match dump {
        Ok((kind, dev)) => (
            Some(kind.to_string()),
            peer_views(&dev, &names, SystemTime::now()),
            None,
        ),
        Err(e) => (None, Vec::new(), Some(e)),
    };
    let bb_if = crate::backbone::status_interface(&ifname);
    let backbone = Some(match rt.block_on(dump_device(&bb_if)) {
        Ok((_, dev)) => BackboneView {
            interface: bb_if,
            peers: peer_views(&dev, &names, SystemTime::now()),
            device_error: None,
        },
        Err(e) => BackboneView {
            interface: bb_if,
            peers: Vec::new(),
            device_error: Some(e),
        },
    });
    let s = ServerStatus {
        role: "server",
        interface: ifname,
        backend,
        fallback_reason,
        health: health_note,
        names: source,
        peers,
        device_error,
        backbone,
    };
    if args.json {
        write_json(out, &s)
    } else {
        Ok(write!(out, "{}", render_server(&s))?)
    }
}

/// "2 alive, 0 suspect, 1 dead (peers: key1 alive, ...)" from the `gossip` of `/api/health`.
fn gossip_summary(g: &serde_json::Value) -> String {
    let Some(peers) = g["peers"].as_array() else {
        return "not running".into();
    };
    let count = |s: &str| peers.iter().filter(|p| p["status"] == s).count();
    let list: Vec<String> = peers
        .iter()
        .map(|p| {
            format!(
                "{} {} {}",
                p["addr"].as_str().unwrap_or("?"),
                p["status"].as_str().unwrap_or("?"),
                if p["connected"] == true {
                    "connected"
                } else {
                    "not connected"
                }
            )
        })
        .collect();
    format!(
        "{} alive, {} suspect, {} dead [{}]",
        count("alive"),
        count("suspect"),
        count("dead"),
        list.join("; ")
    )
}

/// `GET /api/health` of the server on this host: its configured API address (a wildcard address
/// is asked on loopback), trusting the generated certificate in the data directory.
async fn local_health(cfg: &Config) -> Result<serde_json::Value> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let cert_path = cfg
        .data_dir
        .join("tls")
        .join(crate::tls::GENERATED_CERT_FILE);
    let leaf = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("no generated certificate {}", cert_path.display()))?
        .next()
        .with_context(|| format!("{} holds no certificate", cert_path.display()))?
        .with_context(|| format!("{} is not valid PEM", cert_path.display()))?;
    let mut addr = cfg.listen.api;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = crate::tls::JoinUrl {
        host: addr.ip().to_string(),
        port: addr.port(),
        pin: crate::tls::Pin::of(&leaf),
    };
    let client = crate::api::client::PinnedClient::new(url)?;
    tokio::time::timeout(Duration::from_secs(5), client.get("/api/health"))
        .await
        .context("no answer within 5 s")??
        .json()
}

fn write_json<T: Serialize>(out: &mut dyn std::io::Write, v: &T) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lemonade_nexus_netlink::{PeerConfig, PeerState};

    fn dev(now: SystemTime) -> DeviceState {
        DeviceState {
            peers: vec![
                PeerState {
                    config: PeerConfig {
                        public_key: Key([2; 32]),
                        preshared_key: None,
                        endpoint: Some("192.0.2.7:40000".parse().expect("addr")),
                        persistent_keepalive: None,
                        allowed_ips: vec!["10.64.3.17/32".parse().expect("net")],
                    },
                    last_handshake: Some(now - Duration::from_secs(75)),
                    rx_bytes: 1536,
                    tx_bytes: 100,
                },
                PeerState {
                    config: PeerConfig {
                        public_key: Key([1; 32]),
                        preshared_key: None,
                        endpoint: None,
                        persistent_keepalive: None,
                        allowed_ips: vec![],
                    },
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn status_and_leave_in_an_empty_directory_say_so() {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let args = StatusArgs {
            json: false,
            wg_interface: None,
        };
        let e = status_command(&cfg, args, &mut Vec::new()).expect_err("nothing there");
        assert!(format!("{e:#}").contains("neither a join state"), "{e:#}");

        let mut out = Vec::new();
        crate::api::client::leave_command(
            &cfg,
            crate::api::client::LeaveArgs { wg_interface: None },
            &mut out,
        )
        .expect("leave when not joined is not an error");
        assert!(String::from_utf8_lossy(&out).contains("not joined"));
    }

    #[test]
    fn a_no_dataplane_join_reads_back_without_a_device() {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        std::fs::write(
            join_state_path(dir.path()),
            serde_json::to_vec(&answer()).expect("json"),
        )
        .expect("write");
        let agent = AgentState {
            server: "192.0.2.7:9100".into(),
            interface: None,
        };
        std::fs::write(
            agent_state_path(dir.path()),
            serde_json::to_vec(&agent).expect("json"),
        )
        .expect("write");
        let mut out = Vec::new();
        let args = StatusArgs {
            json: true,
            wg_interface: None,
        };
        status_command(&cfg, args, &mut out).expect("status");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["role"], "client");
        assert_eq!(v["tunnel_ipv4"], "10.64.3.17");
        assert_eq!(v["server"], "192.0.2.7:9100");
        assert!(
            v["device_error"]
                .as_str()
                .expect("error")
                .contains("--no-dataplane")
        );

        // leave removes both files and touches no device.
        let mut out = Vec::new();
        crate::api::client::leave_command(
            &cfg,
            crate::api::client::LeaveArgs { wg_interface: None },
            &mut out,
        )
        .expect("leave");
        assert!(!join_state_path(dir.path()).exists());
        assert!(!agent_state_path(dir.path()).exists());
    }

    #[test]
    fn ages_and_sizes_read_like_a_human_wrote_them() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(handshake_age(None, now), None);
        assert_eq!(
            handshake_age(Some(now - Duration::from_secs(42)), now),
            Some(42)
        );
        // A handshake "in the future" (clock step) is 0 s old, not a panic.
        assert_eq!(
            handshake_age(Some(now + Duration::from_secs(5)), now),
            Some(0)
        );
        assert_eq!(format_age(None), "never");
        assert_eq!(format_age(Some(42)), "42s ago");
        assert_eq!(format_age(Some(185)), "3m 5s ago");
        assert_eq!(format_age(Some(7260)), "2h 1m ago");
        assert_eq!(format_age(Some(3 * 86_400 + 3600)), "3d 1h ago");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn server_table_names_peers_from_the_tree_and_shows_ages() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let names = HashMap::from([(Key([2; 32]), "laptop".to_owned())]);
        let peers = peer_views(&dev(now), &names, now);
        assert_eq!(peers.len(), 2);
        let named = peers.iter().find(|p| p.name.is_some()).expect("named");
        assert_eq!(named.handshake_age_secs, Some(75));
        assert_eq!(named.allowed_ips, vec!["10.64.3.17/32"]);
        let s = ServerStatus {
            role: "server",
            interface: "ln-client".into(),
            backend: Some("userspace".into()),
            fallback_reason: Some("no kernel WireGuard".into()),
            health: "server running (backend userspace)".into(),
            names: "from the state store".into(),
            peers,
            device_error: None,
            backbone: None,
        };
        let text = render_server(&s);
        let row = text.lines().find(|l| l.starts_with("laptop")).expect(&text);
        assert!(row.contains("10.64.3.17/32"), "{row}");
        assert!(row.contains("192.0.2.7:40000"), "{row}");
        assert!(row.contains("1m 15s ago"), "{row}");
        assert!(row.contains("1.5 KiB"), "{row}");
        assert!(
            row.contains("online"),
            "a handshake 75 s ago is online: {row}"
        );
        let never = text.lines().find(|l| l.contains("never")).expect(&text);
        assert!(never.contains("offline"), "{never}");
        assert!(text.contains("ln-client (userspace)"), "{text}");
        assert!(text.contains("fell back:  no kernel WireGuard"), "{text}");
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["peers"][1]["name"], "laptop");
        assert_eq!(json["peers"][1]["handshake_age_secs"], 75);
        assert_eq!(json["peers"][1]["online"], true);
        assert_eq!(json["peers"][1]["last_handshake_unix"], 1_000_000 - 75);
        assert_eq!(json["peers"][0]["online"], false);
        // 180 s and more: offline.
        let later = now + Duration::from_secs(180 - 75);
        let peers = peer_views(&dev(now), &names, later);
        assert!(peers.iter().all(|p| !p.online));
    }

    fn answer() -> JoinResponse {
        JoinResponse {
            token: "t".into(),
            token_expires_at_ms: 0,
            node_id: "n1".into(),
            group_id: "g".into(),
            existing: false,
            tunnel_ipv4: "10.64.3.17".into(),
            tunnel_ipv6: "fd6c:6e00::311".into(),
            addresses: vec![],
            server_wg_pubkey: Key([2; 32]).to_string(),
            server_wg_endpoint: "192.0.2.7:51940".into(),
            server_tunnel_ipv4: "10.64.0.1".into(),
            server_tunnel_ipv6: "fd6c:6e00::1".into(),
            allowed_ips: vec![],
            dns_servers: vec![],
            private_api: String::new(),
            tls_pin: None,
            peer_programmed: true,
        }
    }

    #[test]
    fn client_status_finds_the_server_peer_or_says_what_is_missing() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let agent = AgentState {
            server: "192.0.2.7:9100".into(),
            interface: Some("lc0".into()),
        };
        let s = client_status(
            &answer(),
            Some(&agent),
            "lc0",
            Ok((BackendKind::Userspace, dev(now))),
            now,
        );
        let p = s.server_peer.as_ref().expect("server peer");
        assert_eq!((p.handshake_age_secs, p.rx_bytes), (Some(75), 1536));
        assert_eq!(s.backend.as_deref(), Some("userspace"));
        let text = render_client(&s);
        assert!(text.contains("192.0.2.7:9100"), "{text}");
        assert!(text.contains("10.64.3.17 fd6c:6e00::311"), "{text}");
        assert!(text.contains("1m 15s ago"), "{text}");
        assert!(text.contains("rx 1.5 KiB  tx 100 B"), "{text}");
        // The other peer on the device is a group peer, not the server.
        assert_eq!(s.group_peers.len(), 1);
        assert_eq!(s.group_peers[0].public_key, Key([1; 32]).to_string());
        assert!(text.contains("group peers:       1"), "{text}");

        let gone = client_status(&answer(), None, "lc0", Err("no such device".into()), now);
        assert!(gone.server_peer.is_none() && gone.backend.is_none());
        assert!(render_client(&gone).contains("no such device"));

        let mut other = answer();
        other.server_wg_pubkey = Key([9; 32]).to_string();
        let s = client_status(
            &other,
            None,
            "lc0",
            Ok((BackendKind::Kernel, dev(now))),
            now,
        );
        assert!(s.server_peer.is_none());
        assert!(s.device_error.expect("error").contains("server peer"));
    }

    proptest::proptest! {
        /// Any age or size renders without panicking; an age renders as "never" only when
        /// there was no handshake, and a later `now` never gives a smaller age.
        #[test]
        fn formatting_is_total_and_ages_grow(secs in 0u64..u64::MAX / 4, later in 0u64..1_000_000,
                                             shake in proptest::option::of(0u64..2_000_000_000), n: u64) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let last = shake.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
            let a = handshake_age(last, now);
            let b = handshake_age(last, now + Duration::from_secs(later));
            proptest::prop_assert_eq!(a.is_none(), shake.is_none());
            proptest::prop_assert!(b >= a);
            proptest::prop_assert_eq!(format_age(a) == "never", a.is_none());
            proptest::prop_assert!(!format_bytes(n).is_empty());
        }
    }
}
