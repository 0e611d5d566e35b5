//! Decodes a `WG_CMD_GET_DEVICE` dump into a [`DeviceState`].
//!
//! The kernel answers a GET with a multi-part dump. Device attributes come in the first part;
//! peers follow, as many as fit in each part, and a peer with many allowed IPs is cut: its next
//! part repeats it with only its public key and more allowed IPs. Peers are therefore merged by
//! public key (in a hash map, so a 20,000-peer dump stays linear: wgctrl-go once took seconds
//! here because its merge was quadratic).

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NlasIterator};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAllowedIpAttr, WireguardAttribute, WireguardMessage, WireguardPeerAttribute,
    WireguardTimeSpec,
};

use crate::model::{DeviceState, IpNet, Key, PeerState, PrivateKey};

/// A dump the decoder refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DumpError {
    #[error("device dump: cannot decode a part: {0}")]
    Decode(String),
    #[error("device dump: a peer without a public key")]
    PeerWithoutKey,
    #[error("device dump: allowed IP of peer {peer} is invalid: {why}")]
    BadAllowedIp { peer: Key, why: String },
}

/// Decodes serialized dump parts (whole netlink messages, as read from the socket) and merges
/// them. The backend gets parts already decoded by its connection; this is for tests, tools and
/// benchmarks that hold bytes. Malformed bytes give an error, never a panic.
pub fn merge_dump_bytes<'a>(
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> Result<DeviceState, DumpError> {
    let mut msgs = Vec::new();
    for bytes in parts {
        precheck(bytes).map_err(DumpError::Decode)?;
        let nl = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(bytes)
            .map_err(|e| DumpError::Decode(e.to_string()))?;
        match nl.payload {
            NetlinkPayload::InnerMessage(genl) => msgs.push(genl.payload),
            NetlinkPayload::Done(_) | NetlinkPayload::Noop => {}
            other => return Err(DumpError::Decode(format!("unexpected message {other:?}"))),
        }
    }
    merge_dump(&msgs)
}

/// A bounded walk over one serialized message that rejects what would make
/// netlink-packet-wireguard 0.5's parser panic instead of returning an error: an empty
/// `WGALLOWEDIP_A_CIDR_MASK` (it reads the first byte unchecked). Every other attribute parser of
/// that crate checks lengths itself.
fn precheck(bytes: &[u8]) -> Result<(), String> {
    const HEADERS: usize = 16 + 4;
    let len_field: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or("shorter than a netlink header")?;
    let len = u32::from_ne_bytes(len_field) as usize;
    if len < HEADERS || len > bytes.len() {
        // Not a generic netlink message with a payload: the real decoder reports it.
        return Ok(());
    }
    let nested = |buf: &[u8], want: u16, f: &mut dyn FnMut(&[u8]) -> Result<(), String>| {
        for nla in NlasIterator::new(buf) {
            let nla = nla.map_err(|e| e.to_string())?;
            if nla.kind() == want {
                f(nla.value())?;
            }
        }
        Ok::<(), String>(())
    };
    const WGDEVICE_A_PEERS: u16 = 8;
    const WGPEER_A_ALLOWEDIPS: u16 = 9;
    const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
    nested(&bytes[HEADERS..len], WGDEVICE_A_PEERS, &mut |peers| {
        for peer in NlasIterator::new(peers) {
            let peer = peer.map_err(|e| e.to_string())?;
            nested(peer.value(), WGPEER_A_ALLOWEDIPS, &mut |ips| {
                for ip in NlasIterator::new(ips) {
                    let ip = ip.map_err(|e| e.to_string())?;
                    nested(ip.value(), WGALLOWEDIP_A_CIDR_MASK, &mut |cidr| {
                        if cidr.is_empty() {
                            Err("empty WGALLOWEDIP_A_CIDR_MASK attribute".into())
                        } else {
                            Ok(())
                        }
                    })?;
                }
                Ok(())
            })?;
        }
        Ok(())
    })
}

/// Merges the parts of one device dump, in order.
pub fn merge_dump<'a>(
    parts: impl IntoIterator<Item = &'a WireguardMessage>,
) -> Result<DeviceState, DumpError> {
    let mut state = DeviceState::default();
    let mut index: HashMap<Key, usize> = HashMap::new();
    for part in parts {
        for attr in &part.attributes {
            match attr {
                WireguardAttribute::PrivateKey(k) => {
                    state.private_key = (*k != [0; 32]).then_some(PrivateKey(Key(*k)));
                }
                WireguardAttribute::PublicKey(k) => {
                    state.public_key = (*k != [0; 32]).then_some(Key(*k));
                }
                WireguardAttribute::ListenPort(p) => state.listen_port = *p,
                WireguardAttribute::Fwmark(m) => state.fwmark = *m,
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        merge_peer(&mut state, &mut index, &peer.0)?;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(state)
}

fn merge_peer(
    state: &mut DeviceState,
    index: &mut HashMap<Key, usize>,
    attrs: &[WireguardPeerAttribute],
) -> Result<(), DumpError> {
    let key = attrs
        .iter()
        .find_map(|a| match a {
            WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
            _ => None,
        })
        .ok_or(DumpError::PeerWithoutKey)?;
    let idx = *index.entry(key).or_insert_with(|| {
        state.peers.push(PeerState::new(key));
        state.peers.len() - 1
    });
    let peer = &mut state.peers[idx];
    for a in attrs {
        match a {
            WireguardPeerAttribute::PresharedKey(k) => {
                peer.config.preshared_key = (*k != [0; 32]).then_some(PrivateKey(Key(*k)));
            }
            WireguardPeerAttribute::Endpoint(ep) => peer.config.endpoint = Some(*ep),
            WireguardPeerAttribute::PersistentKeepalive(k) => {
                peer.config.persistent_keepalive = (*k != 0).then_some(*k);
            }
            WireguardPeerAttribute::LastHandshake(t) => peer.last_handshake = handshake_time(t),
            WireguardPeerAttribute::RxBytes(n) => peer.rx_bytes = *n,
            WireguardPeerAttribute::TxBytes(n) => peer.tx_bytes = *n,
            WireguardPeerAttribute::AllowedIps(list) => {
                peer.config.allowed_ips.reserve(list.len());
                for ip in list {
                    let net = allowed_ip(&ip.0)
                        .map_err(|why| DumpError::BadAllowedIp { peer: key, why })?;
                    peer.config.allowed_ips.push(net);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The kernel reports "never" as zero; negative or out-of-range values are treated as never.
fn handshake_time(t: &WireguardTimeSpec) -> Option<SystemTime> {
    if t.seconds <= 0 && t.nano_seconds <= 0 {
        return None;
    }
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nano_seconds)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

fn allowed_ip(attrs: &[WireguardAllowedIpAttr]) -> Result<IpNet, String> {
    let mut addr = None;
    let mut cidr = None;
    for a in attrs {
        match a {
            WireguardAllowedIpAttr::IpAddr(ip) => addr = Some(*ip),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
            _ => {}
        }
    }
    match (addr, cidr) {
        (Some(addr), Some(cidr)) => IpNet::new(addr, cidr).map_err(|e| e.to_string()),
        _ => Err("address or mask missing".into()),
    }
}

#[cfg(test)]
mod tests;
