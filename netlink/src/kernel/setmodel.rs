//! A model of the kernel's `WG_CMD_SET_DEVICE` semantics (`drivers/net/wireguard/netlink.c`,
//! `wg_set_device` and `set_peer`, and `allowedips.c`), applied to messages decoded back from
//! bytes. Tests use it to check that what the encoder sends does what the diff meant.

use std::collections::{BTreeMap, HashMap};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAllowedIpAttr, WireguardAllowedIpFlags, WireguardAttribute, WireguardCmd,
    WireguardDeviceFlags, WireguardMessage, WireguardPeerAttribute, WireguardPeerFlags,
};

use crate::diff::canonical_allowed_ips;
use crate::model::{DeviceState, IpNet, Key, PeerState, PrivateKey};

/// Decodes one serialized netlink message back into its wireguard payload.
pub fn decode(bytes: &[u8]) -> Result<WireguardMessage, String> {
    let nl = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(bytes)
        .map_err(|e| format!("decode: {e}"))?;
    if nl.header.length as usize != bytes.len() {
        return Err(format!(
            "length field {} != {} bytes",
            nl.header.length,
            bytes.len()
        ));
    }
    match nl.payload {
        NetlinkPayload::InnerMessage(genl) => Ok(genl.payload),
        other => Err(format!("not a generic netlink message: {other:?}")),
    }
}

/// The kernel's view of a device: peers in creation order and the allowed-IP trie as a map from
/// prefix to owning peer (each prefix has exactly one owner, as in `allowedips.c`).
#[derive(Clone, Debug, Default)]
pub struct KernelDevice {
    pub state: DeviceState,
    owner: BTreeMap<IpNet, Key>,
}

impl KernelDevice {
    /// A device holding `state` (whose prefixes must be unique across peers, as the kernel's are).
    pub fn new(state: &DeviceState) -> Self {
        let mut dev = KernelDevice {
            state: state.clone(),
            owner: BTreeMap::new(),
        };
        for p in &mut dev.state.peers {
            for n in p.config.allowed_ips.drain(..) {
                dev.owner.insert(n.trunc(), p.config.public_key);
            }
        }
        dev
    }

    /// The device as a dump would show it.
    pub fn to_state(&self) -> DeviceState {
        let mut state = self.state.clone();
        let mut by_key: HashMap<Key, Vec<IpNet>> = HashMap::new();
        for (net, key) in &self.owner {
            by_key.entry(*key).or_default().push(*net);
        }
        for p in &mut state.peers {
            p.config.allowed_ips = by_key.remove(&p.config.public_key).unwrap_or_default();
        }
        state
    }

    /// Applies one SET message, as the kernel would. Errors where the kernel would return an
    /// error (which, as in the kernel, may leave earlier peers applied).
    pub fn apply_set(&mut self, msg: &WireguardMessage) -> Result<(), String> {
        if msg.cmd != WireguardCmd::SetDevice {
            return Err(format!("not a SET message: {:?}", msg.cmd));
        }
        if !msg.attributes.iter().any(|a| {
            matches!(
                a,
                WireguardAttribute::IfName(_) | WireguardAttribute::IfIndex(_)
            )
        }) {
            return Err("no device named".into());
        }
        for attr in &msg.attributes {
            match attr {
                WireguardAttribute::Fwmark(m) => self.state.fwmark = *m,
                WireguardAttribute::ListenPort(p) => self.state.listen_port = *p,
                WireguardAttribute::Flags(f) if f.contains(WireguardDeviceFlags::ReplacePeers) => {
                    self.state.peers.clear();
                    self.owner.clear();
                }
                WireguardAttribute::PrivateKey(k) => {
                    // The kernel clamps the key it is given.
                    self.state.private_key = Some(PrivateKey(Key(*k)).clamped());
                }
                _ => {}
            }
        }
        for attr in &msg.attributes {
            if let WireguardAttribute::Peers(peers) = attr {
                for peer in peers {
                    self.set_peer(&peer.0)?;
                }
            }
        }
        Ok(())
    }

    fn set_peer(&mut self, attrs: &[WireguardPeerAttribute]) -> Result<(), String> {
        let key = attrs
            .iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
                _ => None,
            })
            .ok_or("peer without public key")?;
        let flags = attrs
            .iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::Flags(f) => Some(*f),
                _ => None,
            })
            .unwrap_or(WireguardPeerFlags::empty());
        let peers = &mut self.state.peers;
        let idx = peers.iter().position(|p| p.config.public_key == key);
        if flags.contains(WireguardPeerFlags::RemoveMe) {
            if let Some(i) = idx {
                peers.remove(i);
                self.owner.retain(|_, k| *k != key);
            }
            return Ok(());
        }
        let idx = match idx {
            Some(i) => i,
            None if flags.contains(WireguardPeerFlags::UpdateOnly) => return Ok(()),
            None => {
                peers.push(PeerState::new(key));
                peers.len() - 1
            }
        };
        let cfg = &mut peers[idx].config;
        for a in attrs {
            match a {
                WireguardPeerAttribute::PresharedKey(k) => {
                    cfg.preshared_key = (*k != [0; 32]).then_some(PrivateKey(Key(*k)));
                }
                WireguardPeerAttribute::Endpoint(ep) => cfg.endpoint = Some(*ep),
                _ => {}
            }
        }
        if flags.contains(WireguardPeerFlags::ReplaceAllowedIps) {
            self.owner.retain(|_, k| *k != key);
        }
        for a in attrs {
            if let WireguardPeerAttribute::AllowedIps(list) = a {
                for ip in list {
                    let (net, remove) = allowed_ip(&ip.0)?;
                    if remove {
                        // Only the owning peer's entry is removed.
                        if self.owner.get(&net) == Some(&key) {
                            self.owner.remove(&net);
                        }
                    } else {
                        // Adding moves the prefix from whichever peer had it.
                        self.owner.insert(net, key);
                    }
                }
            }
        }
        for a in attrs {
            if let WireguardPeerAttribute::PersistentKeepalive(k) = a {
                cfg.persistent_keepalive = (*k != 0).then_some(*k);
            }
        }
        Ok(())
    }
}

fn allowed_ip(attrs: &[WireguardAllowedIpAttr]) -> Result<(IpNet, bool), String> {
    let mut addr = None;
    let mut cidr = None;
    let mut remove = false;
    for a in attrs {
        match a {
            WireguardAllowedIpAttr::IpAddr(ip) => addr = Some(*ip),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
            WireguardAllowedIpAttr::Flags(f) => {
                remove = f.contains(WireguardAllowedIpFlags::RemoveMe)
            }
            _ => {}
        }
    }
    let (Some(addr), Some(cidr)) = (addr, cidr) else {
        return Err("allowed IP without address or mask".into());
    };
    let net = IpNet::new(addr, cidr).map_err(|e| format!("bad allowed IP: {e}"))?;
    Ok((net.trunc(), remove))
}

/// Canonical view of a state for comparisons: peers sorted by key, allowed IPs sorted.
pub fn canonical(state: &DeviceState) -> DeviceState {
    let mut s = state.clone();
    s.peers.sort_by_key(|p| p.config.public_key);
    for p in &mut s.peers {
        p.config.allowed_ips = canonical_allowed_ips(&p.config.allowed_ips);
    }
    s
}
