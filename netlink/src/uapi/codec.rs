//! The cross-platform UAPI text protocol (<https://www.wireguard.com/xplatform/>), sans IO.
//!
//! A request is `set=1\n` or `get=1\n`, then `key=value` lines, then an empty line. A reply is
//! `key=value` lines ending with `errno=N` and an empty line. Keys are lowercase hex; device lines
//! come first, and each `public_key=` line starts a peer section.
//!
//! - [`SetWriter`] builds a `set=1` request. It has no way to write `replace_peers=true`: this crate
//!   never wipes a live device's peers, it removes the ones that are not desired one by one.
//! - [`parse_get_reply`] turns a `get=1` reply into a [`DeviceState`]. It is bounded (line length,
//!   reply size) and never panics on any input (a proptest feeds it arbitrary bytes). It tolerates
//!   other implementations: unknown keys are skipped (amneziawg adds `jc=`...), missing fields take
//!   their defaults, and boringtun's dialect is recognised by its `own_public_key=` line, in which
//!   case `last_handshake_time_sec` is read as "seconds ago" instead of a Unix time.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr, SocketAddrV6},
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    diff::{AllowedIpsChange, DeviceDiff, PeerChange, PeerUpdate},
    model::{DeviceConfig, DeviceState, IpNet, Key, PeerConfig, PeerState, PrivateKey},
};

/// The longest reply line accepted. The longest legitimate line is a bracketed IPv6 endpoint with
/// a zone (well under 100 bytes); anything far longer is not the protocol.
pub const MAX_LINE_LEN: usize = 1024;

/// The default bound on a whole `get` reply. wireguard-go writes about 400 bytes per peer with
/// one allowed IP, so this is far above 100,000 peers while still bounding memory.
pub const DEFAULT_MAX_REPLY_LEN: usize = 256 * 1024 * 1024;

/// Everything that can go wrong when speaking UAPI.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    /// The device answered with a non-zero `errno=`, as it wrote it: wireguard-go writes negative
    /// values (-22, EINVAL, for a bad value; -98, EADDRINUSE, for a listen port already taken),
    /// boringtun positive ones.
    #[error("the WireGuard device refused the request: errno={0} ({desc})", desc = errno_text(*.0))]
    Errno(i32),
    /// The reply was not the protocol: a line without `=`, a bad value, a missing terminator.
    #[error("malformed UAPI reply at line {line}: {what}")]
    Malformed { line: usize, what: String },
    /// The reply exceeded the size bound.
    #[error("UAPI reply longer than the {limit}-byte bound")]
    TooLong { limit: usize },
    /// Socket or process IO.
    #[error("UAPI socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Starting or stopping the userspace implementation failed.
    #[error("userspace WireGuard for {ifname}: {what}")]
    Process { ifname: String, what: String },
}

/// The OS description of an errno of either sign.
fn errno_text(e: i32) -> String {
    std::io::Error::from_raw_os_error(e.checked_abs().unwrap_or(0)).to_string()
}

fn malformed(line: usize, what: impl Into<String>) -> UapiError {
    UapiError::Malformed {
        line,
        what: what.into(),
    }
}

/// Where a `set=1` request is in its structure: device lines may only precede the first peer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    Device,
    Peer,
}

/// Builds a `set=1` request. Device lines first, then one section per peer; [`finish`](Self::finish)
/// adds the terminating empty line. Calling a device method after a peer was started is a bug in
/// this crate, so it is caught by a debug assertion and, in release builds, ignored (the line would
/// otherwise be applied to the wrong peer).
#[derive(Debug)]
pub struct SetWriter {
    buf: String,
    section: Section,
}

impl Default for SetWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl SetWriter {
    /// Starts a request.
    pub fn new() -> Self {
        let mut buf = String::with_capacity(256);
        buf.push_str("set=1\n");
        SetWriter {
            buf,
            section: Section::Device,
        }
    }

    /// Starts a request with room for about `peers` peer sections (saves reallocations at 50k).
    pub fn with_capacity_for(peers: usize) -> Self {
        let mut w = Self::new();
        w.buf.reserve(peers.saturating_mul(200));
        w
    }

    fn device_line(&mut self) -> bool {
        debug_assert_eq!(
            self.section,
            Section::Device,
            "device line after a peer section"
        );
        self.section == Section::Device
    }

    fn key_line(&mut self, name: &str, key: &Key) {
        self.buf.push_str(name);
        self.buf.push('=');
        push_hex(&mut self.buf, &key.0);
        self.buf.push('\n');
    }

    /// `private_key=`.
    pub fn private_key(&mut self, key: &PrivateKey) -> &mut Self {
        if self.device_line() {
            self.key_line("private_key", &key.0);
        }
        self
    }

    /// `listen_port=`.
    pub fn listen_port(&mut self, port: u16) -> &mut Self {
        if self.device_line() {
            let _ = writeln!(self.buf, "listen_port={port}");
        }
        self
    }

    /// `fwmark=` (0 clears it).
    pub fn fwmark(&mut self, mark: u32) -> &mut Self {
        if self.device_line() {
            let _ = writeln!(self.buf, "fwmark={mark}");
        }
        self
    }

    /// The device lines for whichever of the three fields is set.
    fn device_fields(
        &mut self,
        private_key: Option<&PrivateKey>,
        listen_port: Option<u16>,
        fwmark: Option<u32>,
    ) {
        if let Some(key) = private_key {
            self.private_key(key);
        }
        if let Some(port) = listen_port {
            self.listen_port(port);
        }
        if let Some(mark) = fwmark {
            self.fwmark(mark);
        }
    }

    /// `public_key=`: starts (or creates) the peer that the following peer lines apply to.
    pub fn peer(&mut self, key: &Key) -> &mut Self {
        self.section = Section::Peer;
        self.key_line("public_key", key);
        self
    }

    /// `remove=true`: removes the current peer.
    pub fn remove(&mut self) -> &mut Self {
        self.buf.push_str("remove=true\n");
        self
    }

    /// `update_only=true`: the current section only updates an existing peer; if the peer is gone
    /// (an operator removed it meanwhile) it is not re-created half-configured.
    pub fn update_only(&mut self) -> &mut Self {
        self.buf.push_str("update_only=true\n");
        self
    }

    /// `preshared_key=`; `None` writes the all-zero key, which clears it.
    pub fn preshared_key(&mut self, key: Option<&PrivateKey>) -> &mut Self {
        match key {
            Some(k) => self.key_line("preshared_key", &k.0),
            None => self.key_line("preshared_key", &Key([0; 32])),
        }
        self
    }

    /// `endpoint=`; IPv6 is written bracketed, as the protocol wants.
    pub fn endpoint(&mut self, addr: SocketAddr) -> &mut Self {
        let _ = writeln!(self.buf, "endpoint={addr}");
        self
    }

    /// `persistent_keepalive_interval=` in seconds; 0 turns it off.
    pub fn persistent_keepalive(&mut self, secs: u16) -> &mut Self {
        let _ = writeln!(self.buf, "persistent_keepalive_interval={secs}");
        self
    }

    /// `replace_allowed_ips=true`: the following `allowed_ip=` lines become the peer's whole list.
    pub fn replace_allowed_ips(&mut self) -> &mut Self {
        self.buf.push_str("replace_allowed_ips=true\n");
        self
    }

    /// `remove_allowed_ip=`: removes one prefix from the current peer. Only newer implementations
    /// know this key (wireguard-go since 2025); the diff emits it only when the backend says so.
    pub fn remove_allowed_ip(&mut self, net: &IpNet) -> &mut Self {
        let _ = writeln!(self.buf, "remove_allowed_ip={net}");
        self
    }

    /// `allowed_ip=`.
    pub fn allowed_ip(&mut self, net: &IpNet) -> &mut Self {
        let _ = writeln!(self.buf, "allowed_ip={net}");
        self
    }

    /// Writes one whole peer: every field, with its allowed IPs replacing the current list. On an
    /// existing peer an absent preshared key or keepalive is written as zero, which clears it.
    pub fn full_peer(&mut self, peer: &PeerConfig, existing: bool) -> &mut Self {
        self.peer(&peer.public_key);
        if existing {
            self.update_only();
            self.preshared_key(peer.preshared_key.as_ref());
        } else if let Some(psk) = &peer.preshared_key {
            self.preshared_key(Some(psk));
        }
        if let Some(ep) = peer.endpoint {
            self.endpoint(ep);
        }
        match peer.persistent_keepalive {
            Some(secs) if secs != 0 => {
                self.persistent_keepalive(secs);
            }
            _ if existing => {
                self.persistent_keepalive(0);
            }
            _ => {}
        }
        self.replace_allowed_ips();
        for net in &peer.allowed_ips {
            self.allowed_ip(net);
        }
        self
    }

    /// Ends the request with the empty line and returns its bytes.
    pub fn finish(mut self) -> String {
        self.buf.push('\n');
        self.buf
    }

    /// True if nothing but `set=1` was written (no need to talk to the device at all).
    pub fn is_empty(&self) -> bool {
        self.buf == "set=1\n"
    }
}

/// The request that programs a whole configuration into a device that has no peers yet (a freshly
/// started one). Device fields first, then every peer as new.
pub fn encode_config(config: &DeviceConfig) -> String {
    let mut w = SetWriter::with_capacity_for(config.peers.len());
    w.device_fields(
        config.private_key.as_ref(),
        config.listen_port,
        config.fwmark,
    );
    for peer in &config.peers {
        w.full_peer(peer, false);
    }
    w.finish()
}

/// The request that applies a [`DeviceDiff`] to a live device: removals, updates (each marked
/// `update_only`, so a peer an operator removed meanwhile is not re-created half-configured; the
/// next reconcile adds it back whole) and additions, in the diff's order. An empty diff gives an
/// empty request ([`SetWriter::is_empty`]).
pub fn encode_diff(diff: &DeviceDiff) -> SetWriter {
    let mut w = SetWriter::with_capacity_for(diff.peers.len());
    w.device_fields(diff.private_key.as_ref(), diff.listen_port, diff.fwmark);
    for change in &diff.peers {
        match change {
            PeerChange::Remove(key) => {
                w.peer(key).remove();
            }
            PeerChange::Add(peer) => {
                w.full_peer(peer, false);
            }
            PeerChange::Update(update) => encode_update(&mut w, update),
        }
    }
    w
}

fn encode_update(w: &mut SetWriter, u: &PeerUpdate) {
    w.peer(&u.public_key).update_only();
    if let Some(psk) = &u.preshared_key {
        w.preshared_key(psk.as_ref());
    }
    if let Some(ep) = u.endpoint {
        w.endpoint(ep);
    }
    if let Some(secs) = u.persistent_keepalive {
        w.persistent_keepalive(secs);
    }
    match &u.allowed_ips {
        AllowedIpsChange::Unchanged => {}
        AllowedIpsChange::Incremental { remove, add } => {
            for net in remove {
                w.remove_allowed_ip(net);
            }
            for net in add {
                w.allowed_ip(net);
            }
        }
        AllowedIpsChange::Replace(list) => {
            w.replace_allowed_ips();
            for net in list {
                w.allowed_ip(net);
            }
        }
    }
}

/// The `get=1` request.
pub const GET_REQUEST: &[u8] = b"get=1\n\n";

/// True once `buf` holds a complete reply (it ends with the empty line after `errno=`).
/// Replies never contain an empty line before the end, so the end of the buffer is enough.
pub fn reply_complete(buf: &[u8]) -> bool {
    buf.ends_with(b"\n\n")
}

/// Checks the reply to a `set=1` request: `errno=0` and the empty line.
pub fn parse_set_reply(reply: &[u8]) -> Result<(), UapiError> {
    let text = std::str::from_utf8(reply).map_err(|_| malformed(1, "reply is not UTF-8"))?;
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| malformed(i + 1, "line without '='"))?;
        if k == "errno" {
            return errno_result(i + 1, v);
        }
    }
    Err(malformed(0, "reply has no errno line"))
}

fn errno_result(line: usize, v: &str) -> Result<(), UapiError> {
    let n: i32 = v
        .parse()
        .map_err(|_| malformed(line, "errno is not a number"))?;
    if n == 0 {
        Ok(())
    } else {
        Err(UapiError::Errno(n))
    }
}

/// Parses a `get=1` reply into a [`DeviceState`]. `now` converts boringtun's relative handshake
/// times; `max_len` bounds the reply (see [`DEFAULT_MAX_REPLY_LEN`]).
pub fn parse_get_reply(
    reply: &[u8],
    now: SystemTime,
    max_len: usize,
) -> Result<DeviceState, UapiError> {
    if reply.len() > max_len {
        return Err(UapiError::TooLong { limit: max_len });
    }
    let text = std::str::from_utf8(reply).map_err(|_| malformed(1, "reply is not UTF-8"))?;
    let mut dev = DeviceState::default();
    let mut peers: Vec<PeerBuilder> = Vec::new();
    // Index of each public key in `peers`, so a key that appears twice is merged, not duplicated.
    let mut by_key: std::collections::HashMap<Key, usize> = std::collections::HashMap::new();
    let mut current: Option<usize> = None;
    let mut relative_handshakes = false;
    let mut errno_seen = false;

    for (idx, line) in text.split('\n').enumerate() {
        let n = idx + 1;
        if line.is_empty() {
            if errno_seen {
                break;
            }
            continue;
        }
        if line.len() > MAX_LINE_LEN {
            return Err(malformed(
                n,
                format!("line longer than {MAX_LINE_LEN} bytes"),
            ));
        }
        if errno_seen {
            return Err(malformed(n, "data after errno"));
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| malformed(n, "line without '='"))?;
        if k == "errno" {
            errno_result(n, v)?;
            errno_seen = true;
            continue;
        }
        if k == "public_key" {
            let key = parse_hex_key(n, v)?;
            let i = *by_key.entry(key).or_insert_with(|| {
                peers.push(PeerBuilder::new(key));
                peers.len() - 1
            });
            current = Some(i);
            continue;
        }
        match current.and_then(|i| peers.get_mut(i)) {
            None => match k {
                "private_key" => {
                    let key = parse_hex_key(n, v)?;
                    dev.private_key = (key.0 != [0; 32]).then_some(PrivateKey(key));
                }
                // boringtun reports its public key instead of its private key.
                "own_public_key" => {
                    dev.public_key = Some(parse_hex_key(n, v)?);
                    relative_handshakes = true;
                }
                "listen_port" => dev.listen_port = parse_num(n, k, v)?,
                "fwmark" => dev.fwmark = parse_num(n, k, v)?,
                _ => {} // other implementations' extensions
            },
            Some(p) => match k {
                "preshared_key" => {
                    let key = parse_hex_key(n, v)?;
                    p.config.preshared_key = (key.0 != [0; 32]).then_some(PrivateKey(key));
                }
                "endpoint" => p.config.endpoint = Some(parse_endpoint(n, v)?),
                "persistent_keepalive_interval" => {
                    let secs: u16 = parse_num(n, k, v)?;
                    p.config.persistent_keepalive = (secs != 0).then_some(secs);
                }
                "allowed_ip" => {
                    let net = IpNet::from_str(v).map_err(|_| malformed(n, "bad allowed_ip"))?;
                    p.config.allowed_ips.push(net);
                }
                "last_handshake_time_sec" => p.handshake_sec = parse_num(n, k, v)?,
                "last_handshake_time_nsec" => p.handshake_nsec = parse_num(n, k, v)?,
                "rx_bytes" => p.rx_bytes = parse_num(n, k, v)?,
                "tx_bytes" => p.tx_bytes = parse_num(n, k, v)?,
                _ => {} // protocol_version and extensions
            },
        }
    }
    if !errno_seen {
        return Err(malformed(0, "reply ended without errno (truncated?)"));
    }
    dev.peers = peers
        .into_iter()
        .map(|p| p.build(now, relative_handshakes))
        .collect();
    Ok(dev)
}

/// A peer being assembled from reply lines.
struct PeerBuilder {
    config: PeerConfig,
    handshake_sec: u64,
    handshake_nsec: u64,
    rx_bytes: u64,
    tx_bytes: u64,
}

impl PeerBuilder {
    fn new(public_key: Key) -> Self {
        PeerBuilder {
            config: PeerConfig::new(public_key),
            handshake_sec: 0,
            handshake_nsec: 0,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    fn build(self, now: SystemTime, relative: bool) -> PeerState {
        // Nanoseconds beyond one second are not the protocol; clamp instead of failing the read.
        let nsec = self.handshake_nsec.min(999_999_999);
        let since = Duration::from_secs(self.handshake_sec) + Duration::from_nanos(nsec);
        let last_handshake = if relative {
            // boringtun omits the lines when there was no handshake; `since` is "ago".
            (since != Duration::ZERO)
                .then(|| now.checked_sub(since))
                .flatten()
        } else {
            // wireguard-go and the kernel: Unix time, 0 meaning never.
            (since != Duration::ZERO)
                .then(|| UNIX_EPOCH.checked_add(since))
                .flatten()
        };
        PeerState {
            config: self.config,
            last_handshake,
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
        }
    }
}

fn parse_num<T: FromStr>(line: usize, key: &str, v: &str) -> Result<T, UapiError> {
    v.parse()
        .map_err(|_| malformed(line, format!("{key} is not a valid number")))
}

/// 64 hex digits (either case) to a key.
fn parse_hex_key(line: usize, v: &str) -> Result<Key, UapiError> {
    let b = v.as_bytes();
    if b.len() != 64 {
        return Err(malformed(line, "key is not 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let hi = hex_val(pair[0]).ok_or_else(|| malformed(line, "key is not hex"))?;
        let lo = hex_val(pair[1]).ok_or_else(|| malformed(line, "key is not hex"))?;
        *o = (hi << 4) | lo;
    }
    Ok(Key(out))
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn push_hex(buf: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        buf.push(HEX[usize::from(b >> 4)] as char);
        buf.push(HEX[usize::from(b & 0xf)] as char);
    }
}

/// `1.2.3.4:5`, `[::1]:5`, and wireguard-go's `[fe80::1%eth0]:5` (the zone is kept when numeric,
/// dropped when it is an interface name, which `SocketAddr` cannot carry).
fn parse_endpoint(line: usize, v: &str) -> Result<SocketAddr, UapiError> {
    if let Ok(addr) = SocketAddr::from_str(v) {
        return Ok(addr);
    }
    let bad = || malformed(line, "bad endpoint");
    let rest = v.strip_prefix('[').ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once("]:").ok_or_else(bad)?;
    let (ip, zone) = host.split_once('%').ok_or_else(bad)?;
    let ip = match IpAddr::from_str(ip).map_err(|_| bad())? {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(_) => return Err(bad()),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let scope = zone.parse().unwrap_or(0);
    Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    fn hex(k: &Key) -> String {
        k.to_hex()
    }

    /// A get reply in wireguard-go's exact shape (field order and zero defaults).
    fn wggo_reply(dev: &DeviceState) -> String {
        let mut s = String::new();
        if let Some(k) = &dev.private_key {
            s += &format!("private_key={}\n", hex(&k.0));
        }
        if dev.listen_port != 0 {
            s += &format!("listen_port={}\n", dev.listen_port);
        }
        if dev.fwmark != 0 {
            s += &format!("fwmark={}\n", dev.fwmark);
        }
        for p in &dev.peers {
            let c = &p.config;
            s += &format!("public_key={}\n", hex(&c.public_key));
            let psk = c
                .preshared_key
                .as_ref()
                .map(|k| k.0)
                .unwrap_or(Key([0; 32]));
            s += &format!("preshared_key={}\nprotocol_version=1\n", hex(&psk));
            if let Some(ep) = c.endpoint {
                s += &format!("endpoint={ep}\n");
            }
            let since = p
                .last_handshake
                .map(|t| t.duration_since(UNIX_EPOCH).expect("after epoch"));
            let since = since.unwrap_or_default();
            s += &format!(
                "last_handshake_time_sec={}\nlast_handshake_time_nsec={}\n",
                since.as_secs(),
                since.subsec_nanos()
            );
            s += &format!("tx_bytes={}\nrx_bytes={}\n", p.tx_bytes, p.rx_bytes);
            s += &format!(
                "persistent_keepalive_interval={}\n",
                c.persistent_keepalive.unwrap_or(0)
            );
            for net in &c.allowed_ips {
                s += &format!("allowed_ip={net}\n");
            }
        }
        s += "errno=0\n\n";
        s
    }

    /// A model of how wireguard-go applies a `set=1` request (only what our writer emits), used to
    /// check that what we encode yields exactly the intended device. Like wireguard-go, a section
    /// marked `update_only` for a peer that did not exist is dropped, and `remove` ends a section.
    fn apply_set(dev: &mut DeviceState, req: &str) {
        let mut lines = req.split('\n');
        assert_eq!(lines.next(), Some("set=1"));
        // The peer the current section applies to; None = device section or a dropped section.
        let mut cur: Option<Key> = None;
        let mut in_peers = false;
        let mut created = false;
        for line in lines {
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once('=').expect("key=value");
            if k == "public_key" {
                let pk = parse_hex_key(0, v).expect("hex key");
                in_peers = true;
                created = !dev.peers.iter().any(|p| p.config.public_key == pk);
                if created {
                    dev.peers
                        .push(PeerBuilder::new(pk).build(UNIX_EPOCH, false));
                }
                cur = Some(pk);
                continue;
            }
            if !in_peers {
                match k {
                    "private_key" => {
                        dev.private_key = Some(PrivateKey(parse_hex_key(0, v).expect("hex")))
                    }
                    "listen_port" => dev.listen_port = v.parse().expect("port"),
                    "fwmark" => dev.fwmark = v.parse().expect("fwmark"),
                    _ => panic!("unexpected device key {k}"),
                }
                continue;
            }
            let Some(pk) = cur else { continue };
            let i = dev
                .peers
                .iter()
                .position(|p| p.config.public_key == pk)
                .expect("peer");
            if k == "allowed_ip" {
                // A prefix has one owner per device: inserting it moves it (the kernel does too).
                let net: IpNet = v.parse().expect("net");
                for p in &mut dev.peers {
                    p.config.allowed_ips.retain(|n| *n != net);
                }
                dev.peers[i].config.allowed_ips.push(net);
                continue;
            }
            let c = &mut dev.peers[i].config;
            match k {
                "remove" => {
                    dev.peers.remove(i);
                    cur = None;
                }
                "update_only" => {
                    if created {
                        dev.peers.remove(i);
                        cur = None;
                    }
                }
                "preshared_key" => {
                    let pk = parse_hex_key(0, v).expect("hex");
                    c.preshared_key = (pk.0 != [0; 32]).then_some(PrivateKey(pk));
                }
                "endpoint" => c.endpoint = Some(v.parse().expect("endpoint")),
                "persistent_keepalive_interval" => {
                    let s: u16 = v.parse().expect("keepalive");
                    c.persistent_keepalive = (s != 0).then_some(s);
                }
                "replace_allowed_ips" => c.allowed_ips.clear(),
                "remove_allowed_ip" => {
                    let net: IpNet = v.parse().expect("net");
                    c.allowed_ips.retain(|n| *n != net);
                }
                _ => panic!("unexpected peer key {k}"),
            }
        }
    }

    fn sample_peer() -> PeerConfig {
        PeerConfig {
            public_key: key(0xab),
            preshared_key: Some(PrivateKey(key(0x01))),
            endpoint: Some("[2001:db8::1]:51820".parse().expect("addr")),
            persistent_keepalive: Some(25),
            allowed_ips: vec![
                "10.0.0.2/32".parse().expect("net"),
                "fd00::2/128".parse().expect("net"),
            ],
        }
    }

    #[test]
    fn encodes_a_new_device_exactly() {
        let cfg = DeviceConfig {
            private_key: Some(PrivateKey(key(0x11))),
            listen_port: Some(51820),
            fwmark: None,
            peers: vec![sample_peer()],
        };
        let expected = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\n\
             endpoint=[2001:db8::1]:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\n\n",
            "11".repeat(32),
            "ab".repeat(32),
            "01".repeat(32)
        );
        assert_eq!(encode_config(&cfg), expected);
        assert!(!encode_config(&cfg).contains("replace_peers"));
    }

    #[test]
    fn existing_peer_update_clears_absent_fields_and_is_update_only() {
        let mut p = sample_peer();
        p.preshared_key = None;
        p.persistent_keepalive = None;
        let mut w = SetWriter::new();
        w.full_peer(&p, true);
        let s = w.finish();
        assert!(s.contains("update_only=true\n"));
        assert!(s.contains(&format!("preshared_key={}\n", "0".repeat(64))));
        assert!(s.contains("persistent_keepalive_interval=0\n"));
    }

    #[test]
    fn removal_section() {
        let mut w = SetWriter::new();
        assert!(w.is_empty());
        w.peer(&key(7)).remove();
        assert_eq!(
            w.finish(),
            format!("set=1\npublic_key={}\nremove=true\n\n", "07".repeat(32))
        );
    }

    #[test]
    fn parses_wireguard_go_reply() {
        let reply = format!(
            "private_key={}\nlisten_port=51820\nfwmark=7\npublic_key={}\npreshared_key={}\n\
             protocol_version=1\nendpoint=192.0.2.1:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\ntx_bytes=10\nrx_bytes=20\n\
             persistent_keepalive_interval=0\nallowed_ip=10.0.0.2/32\nerrno=0\n\n",
            "11".repeat(32),
            "ab".repeat(32),
            "0".repeat(64)
        );
        let dev = parse_get_reply(reply.as_bytes(), UNIX_EPOCH, DEFAULT_MAX_REPLY_LEN).expect("ok");
        assert_eq!(dev.private_key, Some(PrivateKey(key(0x11))));
        assert_eq!((dev.listen_port, dev.fwmark), (51820, 7));
        let p = &dev.peers[0];
        assert_eq!(p.config.public_key, key(0xab));
        assert_eq!(p.config.preshared_key, None);
        assert_eq!(p.config.persistent_keepalive, None);
        assert_eq!(
            p.config.endpoint,
            Some("192.0.2.1:51820".parse().expect("addr"))
        );
        assert_eq!(
            p.last_handshake,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_nanos(5))
        );
        assert_eq!((p.tx_bytes, p.rx_bytes), (10, 20));
    }

    #[test]
    fn never_handshaken_peer_has_no_handshake_time() {
        let reply = format!(
            "public_key={}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\nerrno=0\n\n",
            "ab".repeat(32)
        );
        let dev = parse_get_reply(reply.as_bytes(), UNIX_EPOCH, DEFAULT_MAX_REPLY_LEN).expect("ok");
        assert_eq!(dev.peers[0].last_handshake, None);
    }

    #[test]
    fn parses_boringtun_dialect() {
        // boringtun: own_public_key instead of private_key, handshake as "seconds ago", no
        // protocol_version, rx before tx, and no keepalive/psk lines when unset.
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let reply = format!(
            "own_public_key={}\nlisten_port=4000\npublic_key={}\nendpoint=10.1.1.1:4000\n\
             allowed_ip=10.0.0.2/32\nlast_handshake_time_sec=56\nlast_handshake_time_nsec=0\n\
             rx_bytes=1\ntx_bytes=2\nerrno=0\n\n",
            "cc".repeat(32),
            "ab".repeat(32)
        );
        let dev = parse_get_reply(reply.as_bytes(), now, DEFAULT_MAX_REPLY_LEN).expect("ok");
        assert_eq!(dev.public_key, Some(key(0xcc)));
        assert_eq!(dev.private_key, None);
        assert_eq!(
            dev.peers[0].last_handshake,
            Some(now - Duration::from_secs(56))
        );
    }

    #[test]
    fn errno_and_malformed_replies_are_errors() {
        let e = parse_set_reply(b"errno=-98\n\n").expect_err("wireguard-go's negative errno");
        assert!(
            e.to_string().contains("errno=-98 (Address already in use"),
            "{e}"
        );
        assert!(matches!(parse_set_reply(b"errno=0\n\n"), Ok(())));
        assert!(matches!(
            parse_set_reply(b"errno=22\n\n"),
            Err(UapiError::Errno(22))
        ));
        assert!(matches!(
            parse_get_reply(b"errno=98\n\n", UNIX_EPOCH, 1 << 20),
            Err(UapiError::Errno(98))
        ));
        assert!(matches!(
            parse_get_reply(b"listen_port=1\n", UNIX_EPOCH, 1 << 20),
            Err(UapiError::Malformed { .. })
        ));
        assert!(matches!(
            parse_get_reply(b"listen_port\nerrno=0\n\n", UNIX_EPOCH, 1 << 20),
            Err(UapiError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            parse_get_reply(b"public_key=zz\nerrno=0\n\n", UNIX_EPOCH, 1 << 20),
            Err(UapiError::Malformed { .. })
        ));
        assert!(matches!(
            parse_get_reply(b"errno=0\n\n", UNIX_EPOCH, 3),
            Err(UapiError::TooLong { limit: 3 })
        ));
    }

    #[test]
    fn endpoint_with_interface_zone_is_accepted() {
        let ep = parse_endpoint(1, "[fe80::1%veth0]:51820").expect("zone");
        assert_eq!(
            ep,
            SocketAddr::new(IpAddr::V6("fe80::1".parse().expect("ip")), 51820)
        );
        let ep = parse_endpoint(1, "[fe80::1%3]:51820").expect("numeric zone");
        assert!(matches!(ep, SocketAddr::V6(v6) if v6.scope_id() == 3));
        assert!(parse_endpoint(1, "[1.2.3.4%x]:1").is_err());
    }

    #[test]
    fn unknown_keys_are_skipped() {
        let reply = format!(
            "jc=4\npublic_key={}\nfuture_key=x\nerrno=0\n\n",
            "ab".repeat(32)
        );
        let dev = parse_get_reply(reply.as_bytes(), UNIX_EPOCH, 1 << 20).expect("ok");
        assert_eq!(dev.peers.len(), 1);
    }

    fn arb_key() -> impl Strategy<Value = Key> {
        any::<[u8; 32]>().prop_map(Key)
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::new(Ipv4Addr::from(a).into(), l)
                .expect("prefix")
                .trunc()),
            (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet::new(Ipv6Addr::from(a).into(), l)
                .expect("prefix")
                .trunc()),
        ]
    }

    fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::from((Ipv4Addr::from(a), p))),
            (any::<u128>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::from((Ipv6Addr::from(a), p))),
        ]
    }

    fn arb_peer() -> impl Strategy<Value = PeerConfig> {
        (
            arb_key(),
            proptest::option::of(any::<[u8; 32]>().prop_filter("non-zero", |k| *k != [0; 32])),
            proptest::option::of(arb_endpoint()),
            proptest::option::of(1u16..),
            proptest::collection::vec(arb_net(), 0..5),
        )
            .prop_map(|(public_key, psk, endpoint, ka, allowed_ips)| PeerConfig {
                public_key,
                preshared_key: psk.map(|k| PrivateKey(Key(k))),
                endpoint,
                persistent_keepalive: ka,
                allowed_ips,
            })
    }

    fn arb_config() -> impl Strategy<Value = DeviceConfig> {
        (
            proptest::option::of(any::<[u8; 32]>().prop_filter("non-zero", |k| *k != [0; 32])),
            proptest::option::of(1u16..),
            proptest::option::of(1u32..),
            proptest::collection::vec(arb_peer(), 0..6),
        )
            .prop_map(|(pk, port, mark, peers)| {
                // Public keys are unique on a device, and so is each prefix's owner.
                let mut seen = std::collections::HashSet::new();
                let mut owned = std::collections::HashSet::new();
                let peers = peers
                    .into_iter()
                    .filter(|p| seen.insert(p.public_key))
                    .map(|mut p| {
                        p.allowed_ips.retain(|n| owned.insert(*n));
                        p
                    })
                    .collect();
                DeviceConfig {
                    private_key: pk.map(|k| PrivateKey(Key(k))),
                    listen_port: port,
                    fwmark: mark,
                    peers,
                }
            })
    }

    fn norm(p: &PeerConfig) -> PeerConfig {
        let mut p = p.clone();
        p.allowed_ips = crate::diff::canonical_allowed_ips(&p.allowed_ips);
        p
    }

    proptest! {
        /// Encoding a configuration into an empty device (modelled like wireguard-go applies it),
        /// dumping that device in wireguard-go's get format, and parsing the dump gives back
        /// exactly the configuration.
        #[test]
        fn set_then_get_round_trips(cfg in arb_config(), hs in proptest::option::of(1u64..(1 << 40)),
                                    rx in any::<u64>(), tx in any::<u64>()) {
            let mut dev = DeviceState::default();
            apply_set(&mut dev, &encode_config(&cfg));
            prop_assert_eq!(&dev, &crate::testutil::state_from(&cfg));
            for p in &mut dev.peers {
                p.last_handshake = hs.map(|s| UNIX_EPOCH + Duration::from_secs(s));
                p.rx_bytes = rx;
                p.tx_bytes = tx;
            }
            let reply = wggo_reply(&dev);
            let parsed = parse_get_reply(reply.as_bytes(), UNIX_EPOCH, DEFAULT_MAX_REPLY_LEN);
            prop_assert_eq!(parsed.expect("parses"), dev);
        }

        /// Applying the encoded diff (between an arbitrary device and an arbitrary desired state,
        /// with and without per-prefix removal) to the device yields the desired peers, and never
        /// wipes the peer set.
        #[test]
        fn encoded_diff_reaches_the_desired_state(
            actual in arb_config(), desired in arb_config(), removal in any::<bool>(),
        ) {
            let mut dev = DeviceState::default();
            apply_set(&mut dev, &encode_config(&actual));
            // Endpoints are always set in `desired` so that "unset keeps the learned endpoint"
            // does not blur the comparison.
            let mut desired = desired;
            for p in &mut desired.peers {
                p.endpoint.get_or_insert("192.0.2.9:1".parse().expect("addr"));
            }
            let caps = crate::diff::Capabilities { allowed_ip_removal: removal };
            let Ok(d) = crate::diff::diff(&dev, &desired, caps) else {
                // A desired state giving one prefix to two peers is refused; nothing to apply.
                return Ok(());
            };
            let req = encode_diff(&d).finish();
            prop_assert!(!req.contains("replace_peers"));
            apply_set(&mut dev, &req);
            let mut got: Vec<PeerConfig> = dev.peers.iter().map(|p| norm(&p.config)).collect();
            let mut want: Vec<PeerConfig> = desired.peers.iter().map(norm).collect();
            got.sort_by_key(|p| p.public_key);
            want.sort_by_key(|p| p.public_key);
            prop_assert_eq!(got, want);
            let again = crate::diff::diff(&dev, &desired, caps).expect("valid");
            prop_assert!(again.peers.is_empty(), "second diff not empty: {:?}", again);
        }

        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_get_reply(&bytes, UNIX_EPOCH, 1 << 20);
            let _ = parse_set_reply(&bytes);
            let _ = reply_complete(&bytes);
        }

        /// Protocol-shaped garbage (known keys, random values, random order) never panics either;
        /// this reaches the value parsers that random bytes rarely get to.
        #[test]
        fn protocol_shaped_garbage_never_panics(
            lines in proptest::collection::vec(
                (prop_oneof![
                    Just("private_key"), Just("own_public_key"), Just("listen_port"),
                    Just("fwmark"), Just("public_key"), Just("preshared_key"), Just("endpoint"),
                    Just("last_handshake_time_sec"), Just("last_handshake_time_nsec"),
                    Just("rx_bytes"), Just("tx_bytes"), Just("persistent_keepalive_interval"),
                    Just("allowed_ip"), Just("errno"), Just("protocol_version"),
                ], "[0-9a-f:.\\[\\]%/x-]{0,70}"),
                0..40),
            now in any::<u64>(),
        ) {
            let mut s = String::new();
            for (k, v) in &lines {
                s += &format!("{k}={v}\n");
            }
            s += "errno=0\n\n";
            let now = UNIX_EPOCH.checked_add(Duration::from_secs(now)).unwrap_or(UNIX_EPOCH);
            let _ = parse_get_reply(s.as_bytes(), now, 1 << 20);
        }
    }
}
