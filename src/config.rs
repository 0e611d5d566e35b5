//! Configuration: one TOML file, environment variables and command-line flags for every option.
//!
//! Precedence, highest first: **command-line flag > environment variable > config file > default**.
//! Every option has all three spellings, derived from its key:
//!
//! | key in the file      | environment variable              | flag                    |
//! |----------------------|-----------------------------------|-------------------------|
//! | `data_dir`           | `LEMONADE_NEXUS_DATA_DIR`         | `--data-dir`            |
//! | `listen.api`         | `LEMONADE_NEXUS_LISTEN_API`       | `--listen-api`          |
//! | `overlay.client_v4`  | `LEMONADE_NEXUS_OVERLAY_CLIENT_V4`| `--overlay-client-v4`   |
//!
//! The file is `--config PATH` / `LEMONADE_NEXUS_CONFIG`, else `/etc/lemonade-nexus/lemonade-nexus.toml`
//! if it exists. Every value, whatever its source, goes through the same parser, and a bad one stops
//! start-up with a message naming the option, where the value came from and what is allowed.
//! Unknown keys in the file are errors too (a typo must not silently fall back to a default).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

/// The default config file, read when it exists and no other file is named.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/lemonade-nexus/lemonade-nexus.toml";
/// The prefix of every environment variable.
pub const ENV_PREFIX: &str = "LEMONADE_NEXUS_";

/// Which WireGuard dataplane to program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataplane {
    /// Kernel WireGuard if the kernel has it, else the userspace backend (loudly).
    Auto,
    /// Kernel WireGuard only; fail if the kernel lacks it.
    Kernel,
    /// Userspace WireGuard (UAPI) only.
    Userspace,
}

/// Listening addresses (DESIGN §2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listen {
    /// Public HTTPS bootstrap API.
    pub api: SocketAddr,
    /// Port of the private HTTPS API, bound to this server's tunnel address.
    pub private_api_port: u16,
    /// Gossip (QUIC).
    pub gossip: SocketAddr,
    /// STUN.
    pub stun: SocketAddr,
    /// Relay.
    pub relay: SocketAddr,
    /// Authoritative DNS (UDP and TCP).
    pub dns: SocketAddr,
    /// WireGuard port of the client plane.
    pub wg_client_port: u16,
    /// WireGuard port of the server backbone.
    pub wg_backbone_port: u16,
}

/// The overlay address space. These prefixes are what IPAM allocates from (`crate::ipam`).
/// They must be the same on every server of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Overlay {
    /// Client tunnel addresses, IPv4 (/32 each).
    pub client_v4: Ipv4Net,
    /// Client tunnel addresses, IPv6 ULA (/128 each).
    pub client_v6: Ipv6Net,
    /// Private subnets handed to customers.
    pub private_subnets: Ipv4Net,
    /// Shared blocks.
    pub shared_blocks: Ipv4Net,
    /// Server backbone, IPv4.
    pub backbone_v4: Ipv4Net,
    /// Server backbone, IPv6 ULA.
    pub backbone_v6: Ipv6Net,
}

/// The whole configuration after merging defaults, file, environment and flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Where the node keeps its state (redb file, encrypted identity).
    pub data_dir: PathBuf,
    /// The 32-byte master key that encrypts the identity; must be outside `data_dir`.
    pub master_key_file: PathBuf,
    /// A `tracing` filter: `error|warn|info|debug|trace` or directives like `info,lemonade_nexus=debug`.
    pub log_level: String,
    /// Dataplane backend.
    pub dataplane: Dataplane,
    /// Seconds a released tunnel address stays quarantined before it is handed out again.
    pub ip_release_grace_secs: u64,
    pub listen: Listen,
    pub overlay: Overlay,
}

impl Default for Config {
    fn default() -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Config {
            data_dir: PathBuf::from("/var/lib/lemonade-nexus"),
            master_key_file: PathBuf::from("/etc/lemonade-nexus/master.key"),
            log_level: "info".into(),
            dataplane: Dataplane::Auto,
            ip_release_grace_secs: 86_400,
            listen: Listen {
                api: SocketAddr::new(any, 9100),
                private_api_port: 9101,
                gossip: SocketAddr::new(any, 9102),
                stun: SocketAddr::new(any, 3478),
                relay: SocketAddr::new(any, 9103),
                dns: SocketAddr::new(any, 53),
                wg_client_port: 51940,
                wg_backbone_port: 51941,
            },
            overlay: Overlay {
                client_v4: net4("10.64.0.0/10"),
                client_v6: net6("fd6c:6e00::/48"),
                private_subnets: net4("10.128.0.0/9"),
                shared_blocks: net4("172.20.0.0/14"),
                backbone_v4: net4("172.16.0.0/22"),
                backbone_v6: net6("fd6c:6eff::/64"),
            },
        }
    }
}

fn net4(s: &str) -> Ipv4Net {
    s.parse().expect("valid default prefix")
}
fn net6(s: &str) -> Ipv6Net {
    s.parse().expect("valid default prefix")
}

/// Where a value came from (named in error messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("the built-in default"),
            Source::File(p) => write!(f, "config file {}", p.display()),
            Source::Env(v) => write!(f, "environment variable {v}"),
            Source::Flag(n) => write!(f, "command-line flag {n}"),
        }
    }
}

/// A configuration that cannot be used. Each message says which option, from where, and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "invalid value {value:?} for option `{key}` (from {origin}): {why}; allowed: {allowed}"
    )]
    Invalid {
        key: &'static str,
        value: String,
        origin: Source,
        why: String,
        allowed: &'static str,
    },
    #[error("unknown option `{key}` in config file {file}; known options: {known}")]
    UnknownKey {
        key: String,
        file: PathBuf,
        known: String,
    },
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {error}")]
    Parse { path: PathBuf, error: String },
    #[error("{0}")]
    Overlap(Box<Overlap>),
}

/// Two overlay prefixes that overlap.
#[derive(Debug, thiserror::Error)]
#[error(
    "options `{a}` ({a_source}) and `{b}` ({b_source}) overlap: {a_net} and {b_net}; pick disjoint prefixes"
)]
pub struct Overlap {
    pub a: &'static str,
    pub a_source: Source,
    pub a_net: IpNet,
    pub b: &'static str,
    pub b_source: Source,
    pub b_net: IpNet,
}

/// One option: its key, what it allows, and how to set it from text.
struct Spec {
    key: &'static str,
    allowed: &'static str,
    set: fn(&mut Config, &str) -> Result<(), String>,
}

fn parse_socket(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("{e}"))
}
fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is not allowed".into()),
        Ok(p) => Ok(p),
        Err(e) => Err(e.to_string()),
    }
}
fn parse_v4(s: &str, min_len: u8, max_len: u8) -> Result<Ipv4Net, String> {
    let n: Ipv4Net = s.parse().map_err(|e| format!("{e}"))?;
    if n.network() != n.addr() {
        return Err(format!("host bits set; did you mean {}?", n.trunc()));
    }
    if n.prefix_len() < min_len || n.prefix_len() > max_len {
        return Err(format!("prefix length /{} out of range", n.prefix_len()));
    }
    Ok(n)
}
fn parse_v6_ula(s: &str, min_len: u8, max_len: u8) -> Result<Ipv6Net, String> {
    let n: Ipv6Net = s.parse().map_err(|e| format!("{e}"))?;
    if n.network() != n.addr() {
        return Err(format!("host bits set; did you mean {}?", n.trunc()));
    }
    if n.prefix_len() < min_len || n.prefix_len() > max_len {
        return Err(format!("prefix length /{} out of range", n.prefix_len()));
    }
    if n.addr().segments()[0] & 0xfe00 != 0xfc00 {
        return Err("not a unique local (fc00::/7) prefix".into());
    }
    Ok(n)
}

const SPECS: &[Spec] = &[
    Spec {
        key: "data_dir",
        allowed: "an absolute directory path",
        set: |c, v| {
            let p = PathBuf::from(v);
            if !p.is_absolute() {
                return Err("must be an absolute path".into());
            }
            c.data_dir = p;
            Ok(())
        },
    },
    Spec {
        key: "master_key_file",
        allowed: "an absolute file path outside data_dir",
        set: |c, v| {
            let p = PathBuf::from(v);
            if !p.is_absolute() {
                return Err("must be an absolute path".into());
            }
            c.master_key_file = p;
            Ok(())
        },
    },
    Spec {
        key: "log_level",
        allowed: "error, warn, info, debug, trace, or a tracing filter such as `info,lemonade_nexus=debug`",
        set: |c, v| {
            tracing_subscriber::EnvFilter::try_new(v).map_err(|e| e.to_string())?;
            c.log_level = v.to_owned();
            Ok(())
        },
    },
    Spec {
        key: "dataplane",
        allowed: "auto, kernel, userspace",
        set: |c, v| {
            c.dataplane = match v {
                "auto" => Dataplane::Auto,
                "kernel" => Dataplane::Kernel,
                "userspace" => Dataplane::Userspace,
                _ => return Err("unknown backend".into()),
            };
            Ok(())
        },
    },
    Spec {
        key: "ip_release_grace_secs",
        allowed: "an integer number of seconds from 0 to 2592000 (30 days)",
        set: |c, v| {
            let n: u64 = v.parse().map_err(|e| format!("{e}"))?;
            if n > 30 * 24 * 3600 {
                return Err("more than 30 days".into());
            }
            c.ip_release_grace_secs = n;
            Ok(())
        },
    },
    Spec {
        key: "listen.api",
        allowed: "an IP:port socket address, e.g. 0.0.0.0:9100",
        set: |c, v| {
            c.listen.api = parse_socket(v)?;
            Ok(())
        },
    },
    Spec {
        key: "listen.private_api_port",
        allowed: "a port 1-65535",
        set: |c, v| {
            c.listen.private_api_port = parse_port(v)?;
            Ok(())
        },
    },
    Spec {
        key: "listen.gossip",
        allowed: "an IP:port socket address, e.g. 0.0.0.0:9102",
        set: |c, v| {
            c.listen.gossip = parse_socket(v)?;
            Ok(())
        },
    },
    Spec {
        key: "listen.stun",
        allowed: "an IP:port socket address, e.g. 0.0.0.0:3478",
        set: |c, v| {
            c.listen.stun = parse_socket(v)?;
            Ok(())
        },
    },
    Spec {
        key: "listen.relay",
        allowed: "an IP:port socket address, e.g. 0.0.0.0:9103",
        set: |c, v| {
            c.listen.relay = parse_socket(v)?;
            Ok(())
        },
    },
    Spec {
        key: "listen.dns",
        allowed: "an IP:port socket address, e.g. 0.0.0.0:53",
        set: |c, v| {
            c.listen.dns = parse_socket(v)?;
            Ok(())
        },
    },
    Spec {
        key: "listen.wg_client_port",
        allowed: "a port 1-65535",
        set: |c, v| {
            c.listen.wg_client_port = parse_port(v)?;
            Ok(())
        },
    },
    Spec {
        key: "listen.wg_backbone_port",
        allowed: "a port 1-65535",
        set: |c, v| {
            c.listen.wg_backbone_port = parse_port(v)?;
            Ok(())
        },
    },
    Spec {
        key: "overlay.client_v4",
        allowed: "an IPv4 network prefix from /8 to /24, e.g. 10.64.0.0/10",
        set: |c, v| {
            c.overlay.client_v4 = parse_v4(v, 8, 24)?;
            Ok(())
        },
    },
    Spec {
        key: "overlay.client_v6",
        allowed: "an IPv6 unique-local (fc00::/7) prefix from /32 to /64, e.g. fd6c:6e00::/48",
        set: |c, v| {
            c.overlay.client_v6 = parse_v6_ula(v, 32, 64)?;
            Ok(())
        },
    },
    Spec {
        key: "overlay.private_subnets",
        allowed: "an IPv4 network prefix from /8 to /24, e.g. 10.128.0.0/9",
        set: |c, v| {
            c.overlay.private_subnets = parse_v4(v, 8, 24)?;
            Ok(())
        },
    },
    Spec {
        key: "overlay.shared_blocks",
        allowed: "an IPv4 network prefix from /8 to /24, e.g. 172.20.0.0/14",
        set: |c, v| {
            c.overlay.shared_blocks = parse_v4(v, 8, 24)?;
            Ok(())
        },
    },
    Spec {
        key: "overlay.backbone_v4",
        allowed: "an IPv4 network prefix from /8 to /28, e.g. 172.16.0.0/22",
        set: |c, v| {
            c.overlay.backbone_v4 = parse_v4(v, 8, 28)?;
            Ok(())
        },
    },
    Spec {
        key: "overlay.backbone_v6",
        allowed: "an IPv6 unique-local (fc00::/7) prefix from /32 to /112, e.g. fd6c:6eff::/64",
        set: |c, v| {
            c.overlay.backbone_v6 = parse_v6_ula(v, 32, 112)?;
            Ok(())
        },
    },
];

/// The environment variable of an option key: `listen.api` → `LEMONADE_NEXUS_LISTEN_API`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase())
}

/// The command-line flag of an option key: `listen.api` → `--listen-api`.
pub fn flag_name(key: &str) -> String {
    format!("--{}", key.replace(['.', '_'], "-"))
}

/// Every option key, in documentation order.
pub fn keys() -> impl Iterator<Item = &'static str> {
    SPECS.iter().map(|s| s.key)
}

/// Command-line flags for every option (flattened into the top-level CLI; all global).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ConfigArgs {
    /// Config file (TOML). Env: LEMONADE_NEXUS_CONFIG. Default: /etc/lemonade-nexus/lemonade-nexus.toml if it exists.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Data directory. Env: LEMONADE_NEXUS_DATA_DIR. Default: /var/lib/lemonade-nexus.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<String>,
    /// Master key file (outside the data directory). Env: LEMONADE_NEXUS_MASTER_KEY_FILE. Default: /etc/lemonade-nexus/master.key.
    #[arg(long, global = true, value_name = "PATH")]
    pub master_key_file: Option<String>,
    /// Log filter (error|warn|info|debug|trace or tracing directives). Env: LEMONADE_NEXUS_LOG_LEVEL. Default: info.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Dataplane backend: auto|kernel|userspace. Env: LEMONADE_NEXUS_DATAPLANE. Default: auto.
    #[arg(long, global = true, value_name = "BACKEND")]
    pub dataplane: Option<String>,
    /// Seconds before a released address is reused. Env: LEMONADE_NEXUS_IP_RELEASE_GRACE_SECS. Default: 86400 (24 h).
    #[arg(long, global = true, value_name = "SECS")]
    pub ip_release_grace_secs: Option<String>,
    /// Public API address. Env: LEMONADE_NEXUS_LISTEN_API. Default: 0.0.0.0:9100.
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen_api: Option<String>,
    /// Private API port (on the tunnel address). Env: LEMONADE_NEXUS_LISTEN_PRIVATE_API_PORT. Default: 9101.
    #[arg(long, global = true, value_name = "PORT")]
    pub listen_private_api_port: Option<String>,
    /// Gossip (QUIC) address. Env: LEMONADE_NEXUS_LISTEN_GOSSIP. Default: 0.0.0.0:9102.
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen_gossip: Option<String>,
    /// STUN address. Env: LEMONADE_NEXUS_LISTEN_STUN. Default: 0.0.0.0:3478.
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen_stun: Option<String>,
    /// Relay address. Env: LEMONADE_NEXUS_LISTEN_RELAY. Default: 0.0.0.0:9103.
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen_relay: Option<String>,
    /// DNS address. Env: LEMONADE_NEXUS_LISTEN_DNS. Default: 0.0.0.0:53.
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen_dns: Option<String>,
    /// WireGuard client-plane port. Env: LEMONADE_NEXUS_LISTEN_WG_CLIENT_PORT. Default: 51940.
    #[arg(long, global = true, value_name = "PORT")]
    pub listen_wg_client_port: Option<String>,
    /// WireGuard backbone port. Env: LEMONADE_NEXUS_LISTEN_WG_BACKBONE_PORT. Default: 51941.
    #[arg(long, global = true, value_name = "PORT")]
    pub listen_wg_backbone_port: Option<String>,
    /// Client tunnel IPv4 prefix. Env: LEMONADE_NEXUS_OVERLAY_CLIENT_V4. Default: 10.64.0.0/10.
    #[arg(long, global = true, value_name = "PREFIX")]
    pub overlay_client_v4: Option<String>,
    /// Client tunnel IPv6 ULA prefix. Env: LEMONADE_NEXUS_OVERLAY_CLIENT_V6. Default: fd6c:6e00::/48.
    #[arg(long, global = true, value_name = "PREFIX")]
    pub overlay_client_v6: Option<String>,
    /// Private subnets prefix. Env: LEMONADE_NEXUS_OVERLAY_PRIVATE_SUBNETS. Default: 10.128.0.0/9.
    #[arg(long, global = true, value_name = "PREFIX")]
    pub overlay_private_subnets: Option<String>,
    /// Shared blocks prefix. Env: LEMONADE_NEXUS_OVERLAY_SHARED_BLOCKS. Default: 172.20.0.0/14.
    #[arg(long, global = true, value_name = "PREFIX")]
    pub overlay_shared_blocks: Option<String>,
    /// Server backbone IPv4 prefix. Env: LEMONADE_NEXUS_OVERLAY_BACKBONE_V4. Default: 172.16.0.0/22.
    #[arg(long, global = true, value_name = "PREFIX")]
    pub overlay_backbone_v4: Option<String>,
    /// Server backbone IPv6 ULA prefix. Env: LEMONADE_NEXUS_OVERLAY_BACKBONE_V6. Default: fd6c:6eff::/64.
    #[arg(long, global = true, value_name = "PREFIX")]
    pub overlay_backbone_v6: Option<String>,
}

impl ConfigArgs {
    /// The flag value for an option key, if given.
    fn get(&self, key: &str) -> Option<&str> {
        let v = match key {
            "data_dir" => &self.data_dir,
            "master_key_file" => &self.master_key_file,
            "log_level" => &self.log_level,
            "dataplane" => &self.dataplane,
            "ip_release_grace_secs" => &self.ip_release_grace_secs,
            "listen.api" => &self.listen_api,
            "listen.private_api_port" => &self.listen_private_api_port,
            "listen.gossip" => &self.listen_gossip,
            "listen.stun" => &self.listen_stun,
            "listen.relay" => &self.listen_relay,
            "listen.dns" => &self.listen_dns,
            "listen.wg_client_port" => &self.listen_wg_client_port,
            "listen.wg_backbone_port" => &self.listen_wg_backbone_port,
            "overlay.client_v4" => &self.overlay_client_v4,
            "overlay.client_v6" => &self.overlay_client_v6,
            "overlay.private_subnets" => &self.overlay_private_subnets,
            "overlay.shared_blocks" => &self.overlay_shared_blocks,
            "overlay.backbone_v4" => &self.overlay_backbone_v4,
            "overlay.backbone_v6" => &self.overlay_backbone_v6,
            _ => &None,
        };
        v.as_deref()
    }
}

/// The merged configuration and where each option's value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
    sources: Vec<(&'static str, Source)>,
}

impl Loaded {
    /// Where `key`'s value came from.
    pub fn source(&self, key: &str) -> Source {
        self.sources
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s.clone())
            .unwrap_or(Source::Default)
    }
}

/// Loads the configuration from the process environment and `args`.
pub fn load(args: &ConfigArgs) -> Result<Loaded, ConfigError> {
    load_from(args, |name| std::env::var(name).ok())
}

/// Loads the configuration with an explicit environment lookup (tests pass a map).
pub fn load_from(
    args: &ConfigArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    // Which file: flag, then env, then the default path if it exists.
    let file = match (&args.config, env("LEMONADE_NEXUS_CONFIG")) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(p)) => Some(PathBuf::from(p)),
        (None, None) => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
    };
    let file_values = match &file {
        Some(p) => read_file(p)?,
        None => Vec::new(),
    };

    let mut config = Config::default();
    let mut sources = Vec::new();
    for spec in SPECS {
        let env_var = env_name(spec.key);
        let chosen = if let Some(v) = args.get(spec.key) {
            Some((v.to_owned(), Source::Flag(flag_name(spec.key))))
        } else if let Some(v) = env(&env_var) {
            Some((v, Source::Env(env_var)))
        } else {
            file_values
                .iter()
                .find(|(k, _)| k == spec.key)
                .map(|(_, v)| (v.clone(), Source::File(file.clone().unwrap_or_default())))
        };
        if let Some((value, source)) = chosen {
            (spec.set)(&mut config, value.trim()).map_err(|why| ConfigError::Invalid {
                key: spec.key,
                value: value.clone(),
                origin: source.clone(),
                why,
                allowed: spec.allowed,
            })?;
            sources.push((spec.key, source));
        }
    }
    let loaded = Loaded {
        config,
        file,
        sources,
    };
    check_cross(&loaded)?;
    Ok(loaded)
}

/// Reads a TOML file into (dotted key, value as text) pairs; rejects unknown keys.
fn read_file(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_toml(&text, path)
}

/// Parses TOML text (see [`read_file`]).
pub fn parse_toml(text: &str, path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
    let mut out = Vec::new();
    flatten("", &table, &mut out);
    for (k, _) in &out {
        if !SPECS.iter().any(|s| s.key == k) {
            return Err(ConfigError::UnknownKey {
                key: k.clone(),
                file: path.to_owned(),
                known: keys().collect::<Vec<_>>().join(", "),
            });
        }
    }
    Ok(out)
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, String)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            toml::Value::String(s) => out.push((key, s.clone())),
            other => out.push((key, other.to_string())),
        }
    }
}

/// Checks between options: the overlay prefixes must not overlap each other.
fn check_cross(l: &Loaded) -> Result<(), ConfigError> {
    let o = &l.config.overlay;
    let nets: [(&'static str, IpNet); 6] = [
        ("overlay.client_v4", o.client_v4.into()),
        ("overlay.private_subnets", o.private_subnets.into()),
        ("overlay.shared_blocks", o.shared_blocks.into()),
        ("overlay.backbone_v4", o.backbone_v4.into()),
        ("overlay.client_v6", o.client_v6.into()),
        ("overlay.backbone_v6", o.backbone_v6.into()),
    ];
    for (i, (a, an)) in nets.iter().enumerate() {
        for (b, bn) in &nets[i + 1..] {
            if an.contains(&bn.network()) || bn.contains(&an.network()) {
                return Err(ConfigError::Overlap(Box::new(Overlap {
                    a,
                    a_source: l.source(a),
                    a_net: *an,
                    b,
                    b_source: l.source(b),
                    b_net: *bn,
                })));
            }
        }
    }
    Ok(())
}

impl Config {
    /// The IPAM parameters for a new cluster: D's defaults (block size, reserved addresses, allowed
    /// subnet lengths) with this configuration's prefixes and grace period. They are written into
    /// the replicated state at `init` and fixed for the cluster's life.
    pub fn ipam_config(&self) -> Result<crate::ipam::IpamConfig, String> {
        let o = &self.overlay;
        let c = crate::ipam::IpamConfig {
            tunnel_v4: o.client_v4,
            tunnel_v6: o.client_v6,
            private: o.private_subnets,
            shared: o.shared_blocks,
            backbone: o.backbone_v4,
            reuse_grace_ms: self.ip_release_grace_secs.saturating_mul(1000),
            ..Default::default()
        };
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("c.toml");
        std::fs::write(&p, text).expect("write");
        (d, p)
    }

    #[test]
    fn defaults_apply_without_any_source() {
        let l = load_from(
            &ConfigArgs {
                config: Some(PathBuf::from("/dev/null")),
                ..Default::default()
            },
            env(&[]),
        )
        .expect("defaults");
        assert_eq!(l.config, Config::default());
        assert_eq!(l.config.listen.api.port(), 9100);
        assert_eq!(l.source("data_dir"), Source::Default);
    }

    #[test]
    fn precedence_is_flag_over_env_over_file_over_default() {
        let (_d, p) =
            file("log_level = \"warn\"\ndataplane = \"kernel\"\n[listen]\nwg_client_port = 1000\n");
        let e = env(&[
            ("LEMONADE_NEXUS_LOG_LEVEL", "debug"),
            ("LEMONADE_NEXUS_DATAPLANE", "userspace"),
        ]);
        let args = ConfigArgs {
            config: Some(p.clone()),
            log_level: Some("trace".into()),
            ..Default::default()
        };
        let l = load_from(&args, e).expect("load");
        assert_eq!(l.config.log_level, "trace");
        assert_eq!(l.source("log_level"), Source::Flag("--log-level".into()));
        assert_eq!(l.config.dataplane, Dataplane::Userspace);
        assert_eq!(
            l.source("dataplane"),
            Source::Env("LEMONADE_NEXUS_DATAPLANE".into())
        );
        assert_eq!(l.config.listen.wg_client_port, 1000);
        assert_eq!(l.source("listen.wg_client_port"), Source::File(p));
        assert_eq!(l.config.listen.wg_backbone_port, 51941);
    }

    #[test]
    fn config_file_can_come_from_the_environment() {
        let (_d, p) = file("ip_release_grace_secs = 60\n");
        let l = load_from(
            &ConfigArgs::default(),
            env(&[("LEMONADE_NEXUS_CONFIG", p.to_str().expect("utf8"))]),
        )
        .expect("load");
        assert_eq!(l.config.ip_release_grace_secs, 60);
    }

    #[test]
    fn bad_values_name_the_option_source_and_what_is_allowed() {
        let (_d, p) = file("[overlay]\nclient_v4 = \"10.64.0.1/10\"\n");
        let err = load_from(
            &ConfigArgs {
                config: Some(p),
                ..Default::default()
            },
            env(&[]),
        )
        .expect_err("bad");
        let msg = err.to_string();
        assert!(
            msg.contains("overlay.client_v4")
                && msg.contains("config file")
                && msg.contains("10.64.0.0/10"),
            "{msg}"
        );

        let err = load_from(
            &ConfigArgs::default(),
            env(&[("LEMONADE_NEXUS_DATAPLANE", "dpdk")]),
        )
        .expect_err("bad");
        let msg = err.to_string();
        assert!(
            msg.contains("`dataplane`")
                && msg.contains("LEMONADE_NEXUS_DATAPLANE")
                && msg.contains("auto, kernel, userspace"),
            "{msg}"
        );

        let args = ConfigArgs {
            listen_api: Some("9100".into()),
            ..Default::default()
        };
        let msg = load_from(&args, env(&[])).expect_err("bad").to_string();
        assert!(
            msg.contains("listen.api") && msg.contains("--listen-api") && msg.contains("IP:port"),
            "{msg}"
        );

        for (k, v) in [
            ("overlay.client_v6", "2001:db8::/48"),
            ("overlay.client_v4", "10.0.0.0/30"),
            ("listen.wg_client_port", "0"),
            ("listen.wg_client_port", "70000"),
            ("ip_release_grace_secs", "-1"),
            ("data_dir", "relative/path"),
            ("log_level", "lemonade_nexus=[bad"),
        ] {
            let e = env(&[(env_name(k).as_str(), v)]);
            let msg = load_from(&ConfigArgs::default(), e)
                .expect_err(v)
                .to_string();
            assert!(msg.contains(k), "{k}={v}: {msg}");
        }
    }

    #[test]
    fn overlapping_prefixes_are_refused() {
        let e = env(&[("LEMONADE_NEXUS_OVERLAY_SHARED_BLOCKS", "10.96.0.0/16")]);
        let msg = load_from(&ConfigArgs::default(), e)
            .expect_err("overlap")
            .to_string();
        assert!(
            msg.contains("overlay.client_v4") && msg.contains("overlay.shared_blocks"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_errors() {
        let (_d, p) = file("data_dri = \"/x\"\n");
        let msg = load_from(
            &ConfigArgs {
                config: Some(p),
                ..Default::default()
            },
            env(&[]),
        )
        .expect_err("typo")
        .to_string();
        assert!(
            msg.contains("data_dri") && msg.contains("data_dir"),
            "{msg}"
        );
        let (_d2, p2) = file("data_dir = \n");
        assert!(matches!(
            load_from(
                &ConfigArgs {
                    config: Some(p2),
                    ..Default::default()
                },
                env(&[])
            ),
            Err(ConfigError::Parse { .. })
        ));
        let missing = ConfigArgs {
            config: Some(PathBuf::from("/nonexistent/x.toml")),
            ..Default::default()
        };
        assert!(matches!(
            load_from(&missing, env(&[])),
            Err(ConfigError::Read { .. })
        ));
    }

    /// The example in deploy/ must parse and only use known options (so it cannot rot), and its
    /// values must be the defaults it documents.
    #[test]
    fn deploy_example_parses_and_matches_the_defaults() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/lemonade-nexus.toml");
        let l = load_from(
            &ConfigArgs {
                config: Some(p),
                ..Default::default()
            },
            env(&[]),
        )
        .expect("example loads");
        assert_eq!(l.config, Config::default());
        assert_eq!(
            l.sources.len(),
            SPECS.len(),
            "the example sets every option"
        );
    }

    #[test]
    fn every_option_has_a_flag() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: ConfigArgs,
        }
        for k in keys() {
            let flag = flag_name(k);
            let parsed = P::try_parse_from(["x", flag.as_str(), "v"]).expect(&flag);
            assert_eq!(parsed.a.get(k), Some("v"), "{k}");
        }
    }
}
