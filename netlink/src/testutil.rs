//! Test helpers shared by the unit tests of this crate: keys, peers and proptest strategies.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;

use crate::model::{DeviceConfig, DeviceState, IpNet, Key, PeerConfig, PeerState, PrivateKey};

/// A public key whose bytes are derived from `i` (distinct for distinct `i`).
pub fn key(i: u32) -> Key {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    k[31] = 0x5a;
    Key(k)
}

pub fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix")
}

pub fn peer(i: u32, ips: &[&str]) -> PeerConfig {
    PeerConfig {
        allowed_ips: ips.iter().map(|s| net(s)).collect(),
        ..PeerConfig::new(key(i))
    }
}

pub fn state_from(config: &DeviceConfig) -> DeviceState {
    DeviceState {
        private_key: config.private_key.clone(),
        public_key: None,
        listen_port: config.listen_port.unwrap_or(0),
        fwmark: config.fwmark.unwrap_or(0),
        peers: config
            .peers
            .iter()
            .map(|p| PeerState::from_config(p.clone()))
            .collect(),
    }
}

/// The `i`-th prefix of a small pool mixing IPv4 and IPv6 and several lengths, so random
/// states share prefixes often.
pub fn pool_prefix(i: u8) -> IpNet {
    let i = i % 24;
    if i < 12 {
        IpNet::new(IpAddr::V4(Ipv4Addr::new(10, i, 0, 0)), 16 + (i % 3) * 8).expect("prefix")
    } else {
        IpNet::new(
            IpAddr::V6(Ipv6Addr::new(0xfd00, u16::from(i), 0, 0, 0, 0, 0, 1)),
            64 + (i % 2) * 64,
        )
        .expect("prefix")
    }
}

fn arb_peer() -> impl Strategy<Value = PeerConfig> {
    (
        0u32..8,
        prop::option::of(0u8..3),
        prop::option::of(0u16..4),
        prop::option::of(0u16..3),
        prop::collection::vec(0u8..24, 0..5),
    )
        .prop_map(|(k, psk, ep, ka, ips)| PeerConfig {
            public_key: key(k),
            preshared_key: psk.map(|b| PrivateKey(Key([b; 32]))),
            endpoint: ep.map(|p| SocketAddr::from(([192, 0, 2, 1], 51820 + p))),
            persistent_keepalive: ka.map(|k| k * 10),
            allowed_ips: ips.into_iter().map(pool_prefix).collect(),
        })
}

/// A device configuration with distinct peers and each prefix owned by at most one peer.
pub fn arb_config() -> impl Strategy<Value = DeviceConfig> {
    (
        prop::option::of(0u8..3),
        prop::option::of(0u16..3),
        prop::option::of(0u32..3),
        prop::collection::vec(arb_peer(), 0..8),
    )
        .prop_map(|(pk, port, mark, peers)| {
            let mut seen_keys = std::collections::BTreeSet::new();
            let mut seen_ips = std::collections::BTreeSet::new();
            let peers = peers
                .into_iter()
                .filter(|p| seen_keys.insert(p.public_key))
                .map(|mut p| {
                    p.allowed_ips.retain(|n| seen_ips.insert(n.trunc()));
                    p
                })
                .collect();
            DeviceConfig {
                private_key: pk.map(|b| PrivateKey(Key([b + 1; 32]))),
                listen_port: port.map(|p| 51820 + p),
                fwmark: mark,
                peers,
            }
        })
}

/// A device state as a dump would show it: a valid configuration, where unset fields are
/// filled with what a device reports.
pub fn arb_state() -> impl Strategy<Value = DeviceState> {
    arb_config().prop_map(|c| state_from(&c))
}
