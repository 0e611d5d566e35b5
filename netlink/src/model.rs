//! Types shared by every backend: keys, desired configuration, and what a device dump returns.

use std::{fmt, net::SocketAddr, str::FromStr, time::SystemTime};

use base64::{Engine, engine::general_purpose::STANDARD};
pub use ipnet::IpNet;

/// A 32-byte WireGuard key (public, private or preshared). Displayed and parsed as base64, like `wg`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Hex form, as the UAPI protocol writes keys.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

/// Keys print as base64 so a private key never lands in a log through `{:?}` by accident of
/// layout; callers that hold private keys wrap them in [`PrivateKey`], whose `Debug` is redacted.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// The error for a string that is not a base64 32-byte key.
#[derive(Debug, thiserror::Error)]
#[error("not a WireGuard key: expected 44 characters of base64 encoding 32 bytes")]
pub struct KeyParseError;

impl FromStr for Key {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyParseError)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyParseError)?;
        Ok(Key(arr))
    }
}

/// A private key. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(pub Key);

impl PrivateKey {
    /// The key as WireGuard implementations store and report it: clamped for X25519
    /// (RFC 7748). The kernel and wireguard-go clamp on write, so a dump shows the clamped form;
    /// comparisons must clamp both sides.
    pub fn clamped(&self) -> PrivateKey {
        let mut k = self.0.0;
        k[0] &= 248;
        k[31] = (k[31] & 127) | 64;
        PrivateKey(Key(k))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// The desired configuration of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<PrivateKey>,
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive interval in seconds; `None` or `Some(0)` means off.
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: Vec<IpNet>,
}

impl PeerConfig {
    /// A peer with only its public key: no preshared key, endpoint, keepalive or prefixes.
    pub fn new(public_key: Key) -> Self {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: Vec::new(),
        }
    }
}

/// The desired configuration of one WireGuard device.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeviceConfig {
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerConfig>,
}

/// One peer as a device dump reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerState {
    pub config: PeerConfig,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl PeerState {
    /// A peer seen for the first time: [`PeerConfig::new`], no handshake, no traffic.
    pub fn new(public_key: Key) -> Self {
        PeerState::from_config(PeerConfig::new(public_key))
    }

    /// A peer configured as `config` that has had no handshake and no traffic yet.
    pub fn from_config(config: PeerConfig) -> Self {
        PeerState {
            config,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }
}

/// A whole device as a dump reports it (peers merged by public key across dump parts).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeviceState {
    pub private_key: Option<PrivateKey>,
    pub public_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerState>,
}
