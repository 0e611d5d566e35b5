//! Builds `WG_CMD_SET_DEVICE` messages from a [`DeviceDiff`], packed under a byte budget the way
//! wg(8) does (wireguard-tools `ipc-linux.h`), and a one-peer-per-message encoder for comparison.
//!
//! Packing rules (the kernel's API, `include/uapi/linux/wireguard.h`):
//! - Every message names the device (`WGDEVICE_A_IFNAME`). Device attributes (private key,
//!   port, fwmark) go only in the first message. `WGDEVICE_F_REPLACE_PEERS` is never sent.
//! - Peers are packed one after another while the whole netlink message stays within the
//!   budget. A peer whose allowed IPs do not fit continues in the next message, carrying only its
//!   public key (plus `WGPEER_F_UPDATE_ONLY` if the first fragment had it, so a continuation never
//!   creates a peer the first fragment declined to create) and the remaining allowed IPs.
//! - `WGPEER_F_REPLACE_ALLOWEDIPS` is only in a peer's first fragment; otherwise each fragment
//!   would wipe the allowed IPs the previous one added.
//!
//! Sizes are computed from the attributes' own `buffer_len`, so they match the emitted bytes.
//! The budget is capped below 64 KiB: a netlink attribute's length is a `u16`, and the peers
//! attribute of a message must not overflow it (netlink-packet-core would panic).

use std::collections::VecDeque;

use netlink_packet_core::{Emitable, NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage};
use netlink_packet_generic::GenlMessage;
pub use netlink_packet_wireguard::WireguardMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAllowedIpFlags,
    WireguardAttribute, WireguardCmd, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use crate::{
    diff::{AllowedIpsChange, DeviceDiff, PeerChange},
    model::{IpNet, Key, PeerConfig},
};

/// The default message budget: wg(8) uses `mnl_ideal_socket_buffer_size()`, the page size
/// capped at 8 KiB, which is 4096 bytes on x86_64.
pub const DEFAULT_BUDGET: usize = 4096;
/// The largest budget accepted: the nested peers attribute must stay below 64 KiB.
pub const MAX_BUDGET: usize = 65_000;
/// The smallest budget accepted: enough for the device attributes, one fully specified peer and
/// one allowed IP, with room to spare.
pub const MIN_BUDGET: usize = 512;

/// Netlink header (16 bytes) plus generic netlink header (4 bytes).
const HEADERS_LEN: usize = 16 + 4;
/// The header of a nested attribute (peers list, one peer, allowed-IP list).
const NEST_HEADER_LEN: usize = 4;

/// Why messages could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("message budget {0} bytes is too small (minimum {MIN_BUDGET})")]
    BudgetTooSmall(usize),
    #[error(
        "interface name {0:?} is not a valid Linux interface name (1 to 15 bytes, no '/', NUL or whitespace)"
    )]
    BadIfName(String),
}

/// The message size limit, clamped to `[MIN_BUDGET, MAX_BUDGET]` on construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget(usize);

impl Budget {
    /// A budget of `bytes` per netlink message (headers included). Larger than [`MAX_BUDGET`] is
    /// capped; smaller than [`MIN_BUDGET`] is an error.
    pub fn new(bytes: usize) -> Result<Self, EncodeError> {
        if bytes < MIN_BUDGET {
            return Err(EncodeError::BudgetTooSmall(bytes));
        }
        Ok(Budget(bytes.min(MAX_BUDGET)))
    }

    pub fn bytes(self) -> usize {
        self.0
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget(DEFAULT_BUDGET)
    }
}

/// Checks a Linux interface name (IFNAMSIZ is 16 including the NUL).
pub fn check_ifname(ifname: &str) -> Result<(), EncodeError> {
    let ok = !ifname.is_empty()
        && ifname.len() < 16
        && ifname != "."
        && ifname != ".."
        && !ifname
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(EncodeError::BadIfName(ifname.to_owned()))
    }
}

/// One allowed-IP entry as netlink attributes.
pub fn allowed_ip(net: &IpNet, remove: bool) -> WireguardAllowedIp {
    let family = match net {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    let mut attrs = vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.trunc().addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ];
    if remove {
        attrs.push(WireguardAllowedIpAttr::Flags(
            WireguardAllowedIpFlags::RemoveMe,
        ));
    }
    WireguardAllowedIp(attrs)
}

/// One peer, ready to be packed: the attributes of its first fragment, those of a
/// continuation fragment, and its allowed-IP entries.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    /// Public key first, then flags and settings.
    pub first: Vec<WireguardPeerAttribute>,
    /// Public key, and `UPDATE_ONLY` if the first fragment has it.
    pub continuation: Vec<WireguardPeerAttribute>,
    pub allowed_ips: Vec<WireguardAllowedIp>,
}

impl PeerEntry {
    fn new(key: &Key, flags: WireguardPeerFlags) -> Self {
        let mut first = vec![WireguardPeerAttribute::PublicKey(key.0)];
        let mut continuation = first.clone();
        if !flags.is_empty() {
            first.push(WireguardPeerAttribute::Flags(flags));
        }
        if flags.contains(WireguardPeerFlags::UpdateOnly) {
            continuation.push(WireguardPeerAttribute::Flags(
                WireguardPeerFlags::UpdateOnly,
            ));
        }
        PeerEntry {
            first,
            continuation,
            allowed_ips: Vec::new(),
        }
    }

    /// A new peer with its whole configuration.
    pub fn add(peer: &PeerConfig) -> Self {
        let mut e = PeerEntry::new(&peer.public_key, WireguardPeerFlags::empty());
        if let Some(psk) = &peer.preshared_key {
            e.first.push(WireguardPeerAttribute::PresharedKey(psk.0.0));
        }
        if let Some(ep) = peer.endpoint {
            e.first.push(WireguardPeerAttribute::Endpoint(ep));
        }
        if let Some(k) = peer.persistent_keepalive.filter(|k| *k != 0) {
            e.first.push(WireguardPeerAttribute::PersistentKeepalive(k));
        }
        e.allowed_ips = peer
            .allowed_ips
            .iter()
            .map(|n| allowed_ip(n, false))
            .collect();
        e
    }

    /// The entry for one change of a diff.
    pub fn from_change(change: &PeerChange) -> Self {
        match change {
            PeerChange::Add(p) => PeerEntry::add(p),
            PeerChange::Remove(k) => PeerEntry::new(k, WireguardPeerFlags::RemoveMe),
            PeerChange::Update(u) => {
                let mut flags = WireguardPeerFlags::UpdateOnly;
                if matches!(u.allowed_ips, AllowedIpsChange::Replace(_)) {
                    flags |= WireguardPeerFlags::ReplaceAllowedIps;
                }
                let mut e = PeerEntry::new(&u.public_key, flags);
                if let Some(psk) = &u.preshared_key {
                    // An all-zero key clears the preshared key.
                    let bytes = psk.as_ref().map(|k| k.0.0).unwrap_or([0; 32]);
                    e.first.push(WireguardPeerAttribute::PresharedKey(bytes));
                }
                if let Some(ep) = u.endpoint {
                    e.first.push(WireguardPeerAttribute::Endpoint(ep));
                }
                if let Some(k) = u.persistent_keepalive {
                    e.first.push(WireguardPeerAttribute::PersistentKeepalive(k));
                }
                e.allowed_ips = match &u.allowed_ips {
                    AllowedIpsChange::Unchanged => Vec::new(),
                    AllowedIpsChange::Incremental { remove, add } => remove
                        .iter()
                        .map(|n| allowed_ip(n, true))
                        .chain(add.iter().map(|n| allowed_ip(n, false)))
                        .collect(),
                    AllowedIpsChange::Replace(list) => {
                        list.iter().map(|n| allowed_ip(n, false)).collect()
                    }
                };
                e
            }
        }
    }
}

/// Device attributes of a diff (first message only).
pub fn device_attrs(diff: &DeviceDiff) -> Vec<WireguardAttribute> {
    let mut attrs = Vec::new();
    if let Some(k) = &diff.private_key {
        attrs.push(WireguardAttribute::PrivateKey(k.0.0));
    }
    if let Some(p) = diff.listen_port {
        attrs.push(WireguardAttribute::ListenPort(p));
    }
    if let Some(m) = diff.fwmark {
        attrs.push(WireguardAttribute::Fwmark(m));
    }
    attrs
}

/// Encodes a diff as `WG_CMD_SET_DEVICE` messages within `budget`. An empty diff gives no
/// messages. To program a whole configuration into an empty device, encode
/// `diff(&DeviceState::default(), &config, caps)`.
pub fn encode_diff(
    ifname: &str,
    diff: &DeviceDiff,
    budget: Budget,
) -> Result<Vec<WireguardMessage>, EncodeError> {
    let Some(mut packer) = diff_packer(ifname, diff, budget)? else {
        return Ok(Vec::new());
    };
    for change in &diff.peers {
        packer.push(PeerEntry::from_change(change))?;
    }
    Ok(packer.finish())
}

/// A [`Packer`] for a diff's SET messages, already holding the device attributes; `None` for an
/// empty diff. Push `PeerEntry::from_change` of each change, taking ready messages as they come
/// (the backend sends them while it encodes the rest, which keeps memory bounded).
pub fn diff_packer(
    ifname: &str,
    diff: &DeviceDiff,
    budget: Budget,
) -> Result<Option<Packer>, EncodeError> {
    check_ifname(ifname)?;
    if diff.is_empty() {
        return Ok(None);
    }
    let every = vec![WireguardAttribute::IfName(ifname.to_owned())];
    Packer::new(WireguardCmd::SetDevice, every, device_attrs(diff), budget).map(Some)
}

/// Packs peers into messages. `every` goes in each message, `first` only in the first one.
/// Generic over the command so tests can build dump-shaped replies with the same rules.
pub fn pack(
    cmd: WireguardCmd,
    every: &[WireguardAttribute],
    first: Vec<WireguardAttribute>,
    peers: impl IntoIterator<Item = PeerEntry>,
    budget: Budget,
) -> Result<Vec<WireguardMessage>, EncodeError> {
    let mut packer = Packer::new(cmd, every.to_vec(), first, budget)?;
    for entry in peers {
        packer.push(entry)?;
    }
    Ok(packer.finish())
}

/// The incremental form of [`pack`]: peers are pushed one at a time and finished messages can
/// be taken out as soon as they are complete.
#[derive(Debug)]
pub struct Packer {
    cmd: WireguardCmd,
    every: Vec<WireguardAttribute>,
    ready: VecDeque<WireguardMessage>,
    attrs: Vec<WireguardAttribute>,
    peers: Vec<WireguardPeer>,
    size: usize,
    base: usize,
    limit: usize,
}

impl Packer {
    /// A packer whose messages all carry `every`, and whose first message also carries `first`.
    pub fn new(
        cmd: WireguardCmd,
        every: Vec<WireguardAttribute>,
        first: Vec<WireguardAttribute>,
        budget: Budget,
    ) -> Result<Self, EncodeError> {
        let limit = budget.bytes();
        let base = HEADERS_LEN + every.as_slice().buffer_len();
        let mut attrs = every.clone();
        let size = base + first.as_slice().buffer_len();
        attrs.extend(first);
        if size + NEST_HEADER_LEN > limit {
            return Err(EncodeError::BudgetTooSmall(limit));
        }
        Ok(Packer {
            cmd,
            every,
            ready: VecDeque::new(),
            attrs,
            peers: Vec::new(),
            size,
            base,
            limit,
        })
    }

    /// Adds one peer, splitting its allowed IPs across messages if needed.
    pub fn push(&mut self, entry: PeerEntry) -> Result<(), EncodeError> {
        let limit = self.limit;
        let first_len = NEST_HEADER_LEN + entry.first.as_slice().buffer_len();
        let cont_len = NEST_HEADER_LEN + entry.continuation.as_slice().buffer_len();
        let mut ips = entry.allowed_ips.into_iter().peekable();
        let mut attrs = entry.first;
        let mut fixed_len = first_len;
        loop {
            // Room needed to start this fragment: the peers list header if the message has no
            // peer yet, the peer's fixed attributes, and one allowed IP (with its list header)
            // if any remain, so no fragment is an empty continuation.
            let ip_len = ips
                .peek()
                .map(|ip| NEST_HEADER_LEN + ip.buffer_len())
                .unwrap_or(0);
            let list_header = if self.peers.is_empty() {
                NEST_HEADER_LEN
            } else {
                0
            };
            if self.size + list_header + fixed_len + ip_len > limit {
                if !self.has_content() {
                    // Even an otherwise empty message cannot hold this fragment.
                    return Err(EncodeError::BudgetTooSmall(limit));
                }
                self.flush();
                continue;
            }
            self.size += list_header + fixed_len;
            let mut fragment_ips = Vec::new();
            if ips.peek().is_some() {
                self.size += NEST_HEADER_LEN;
                while let Some(ip) = ips.next_if(|ip| self.size + ip.buffer_len() <= limit) {
                    self.size += ip.buffer_len();
                    fragment_ips.push(ip);
                }
            }
            let mut peer_attrs = attrs;
            if !fragment_ips.is_empty() {
                peer_attrs.push(WireguardPeerAttribute::AllowedIps(fragment_ips));
            }
            self.peers.push(WireguardPeer(peer_attrs));
            if ips.peek().is_none() {
                return Ok(());
            }
            // The rest of this peer's allowed IPs go in the next message, under its key only.
            self.flush();
            attrs = entry.continuation.clone();
            fixed_len = cont_len;
        }
    }

    /// The oldest finished message, if any.
    pub fn pop_ready(&mut self) -> Option<WireguardMessage> {
        self.ready.pop_front()
    }

    /// Closes the last message and returns every message not yet taken.
    pub fn finish(mut self) -> Vec<WireguardMessage> {
        self.flush();
        self.ready.into()
    }

    /// True when the current message carries peers or device attributes.
    fn has_content(&self) -> bool {
        !self.peers.is_empty() || self.attrs.len() > self.every.len()
    }

    /// Closes the current message (if it carries anything) and starts the next one.
    fn flush(&mut self) {
        if self.has_content() {
            let mut attrs = std::mem::replace(&mut self.attrs, self.every.clone());
            if !self.peers.is_empty() {
                attrs.push(WireguardAttribute::Peers(std::mem::take(&mut self.peers)));
            }
            debug_assert!(
                HEADERS_LEN + attrs.as_slice().buffer_len() <= self.limit,
                "packer size accounting is wrong"
            );
            self.ready.push_back(WireguardMessage {
                cmd: self.cmd,
                attributes: attrs,
            });
        }
        self.size = self.base;
    }
}

/// What wgctrl-go and defguard do: the device attributes in a message of their own, then one
/// message per peer, with a peer's allowed IPs split into further messages of at most 256 entries.
/// Kept for the benchmark's comparison; the backend uses [`encode_diff`].
pub fn encode_one_peer_per_message(
    ifname: &str,
    diff: &DeviceDiff,
) -> Result<Vec<WireguardMessage>, EncodeError> {
    const IPS_PER_MESSAGE: usize = 256;
    check_ifname(ifname)?;
    let name = WireguardAttribute::IfName(ifname.to_owned());
    let mut out = Vec::new();
    let device = device_attrs(diff);
    if !device.is_empty() {
        let mut attributes = vec![name.clone()];
        attributes.extend(device);
        out.push(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        });
    }
    for change in &diff.peers {
        let entry = PeerEntry::from_change(change);
        let mut chunks = entry.allowed_ips.chunks(IPS_PER_MESSAGE);
        let mut attrs = entry.first.clone();
        if let Some(chunk) = chunks.next() {
            attrs.push(WireguardPeerAttribute::AllowedIps(chunk.to_vec()));
        }
        let mut push = |attrs| {
            out.push(WireguardMessage {
                cmd: WireguardCmd::SetDevice,
                attributes: vec![
                    name.clone(),
                    WireguardAttribute::Peers(vec![WireguardPeer(attrs)]),
                ],
            })
        };
        push(attrs);
        for chunk in chunks {
            let mut attrs = entry.continuation.clone();
            attrs.push(WireguardPeerAttribute::AllowedIps(chunk.to_vec()));
            push(attrs);
        }
    }
    Ok(out)
}

/// The full netlink message for a generic netlink payload, as sent: request + ack flags, the
/// given family id and sequence number.
pub fn to_netlink(
    msg: WireguardMessage,
    family_id: u16,
    seq: u32,
) -> NetlinkMessage<GenlMessage<WireguardMessage>> {
    let mut genl = GenlMessage::from_payload(msg);
    genl.set_resolved_family_id(family_id);
    let mut nl = NetlinkMessage::from(genl);
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    nl.header.sequence_number = seq;
    nl.finalize();
    nl
}

/// Serializes one message to bytes (used by tests and by the size checks).
pub fn to_bytes(msg: WireguardMessage, family_id: u16, seq: u32) -> Vec<u8> {
    let nl = to_netlink(msg, family_id, seq);
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

#[cfg(test)]
mod tests;
