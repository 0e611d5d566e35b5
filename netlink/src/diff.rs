//! Pure reconciliation: from what a device reports ([`DeviceState`]) and what it should be
//! ([`DeviceConfig`]), compute the smallest set of changes ([`DeviceDiff`]).
//!
//! Nothing here does IO. The backends turn a [`DeviceDiff`] into netlink messages or UAPI text.
//!
//! Rules the diff follows (DESIGN.md §4.2):
//! - A live device is never sent "replace all peers": peers are added, updated and removed one by
//!   one, so traffic to unchanged peers never stops.
//! - Each allowed-IP prefix belongs to exactly one peer of an interface. A desired state that gives
//!   one prefix to two peers is refused ([`DesiredStateError::DuplicateAllowedIp`]), because the
//!   kernel would silently move the prefix to whichever peer was written last.
//! - Fields the desired state leaves unset (`None`) are left alone: an unset endpoint keeps the
//!   endpoint the device learned from incoming packets (roaming), an unset listen port keeps the
//!   port the device picked.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
};

use crate::model::{DeviceConfig, DeviceState, IpNet, Key, PeerConfig, PeerState, PrivateKey};

/// What the device (backend) can do; passed to [`diff`] so it emits only changes the backend
/// can carry out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Individual allowed IPs can be removed from a peer (`WGALLOWEDIP_F_REMOVE_ME`, Linux 6.16+,
    /// or a UAPI implementation that supports `remove_allowed_ip`). When false, a peer whose
    /// allowed IPs lose a prefix gets its whole allowed-IP list replaced.
    pub allowed_ip_removal: bool,
}

/// The changes that take a device from its actual state to the desired one.
///
/// Applying it never replaces the peer set. An empty diff ([`DeviceDiff::is_empty`]) means the
/// device already matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceDiff {
    /// New private key, if it changes.
    pub private_key: Option<PrivateKey>,
    /// New listen port, if it changes.
    pub listen_port: Option<u16>,
    /// New firewall mark, if it changes (`Some(0)` clears it).
    pub fwmark: Option<u32>,
    /// Peer changes, in this order: removals, then updates, then additions.
    pub peers: Vec<PeerChange>,
}

impl DeviceDiff {
    /// True when nothing needs to change.
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none()
            && self.listen_port.is_none()
            && self.fwmark.is_none()
            && self.peers.is_empty()
    }

    /// True when a device attribute (key, port, fwmark) changes.
    pub fn has_device_changes(&self) -> bool {
        self.private_key.is_some() || self.listen_port.is_some() || self.fwmark.is_some()
    }
}

/// One peer's change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// A peer the device does not have yet, with its full configuration.
    Add(PeerConfig),
    /// A peer the device has, some of whose settings change.
    Update(PeerUpdate),
    /// A peer the device has and should not.
    Remove(Key),
}

impl PeerChange {
    /// The public key of the peer this change is about.
    pub fn public_key(&self) -> &Key {
        match self {
            PeerChange::Add(p) => &p.public_key,
            PeerChange::Update(u) => &u.public_key,
            PeerChange::Remove(k) => k,
        }
    }
}

/// The settings of an existing peer that change; `None` fields stay as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: Key,
    /// `Some(None)` clears the preshared key, `Some(Some(k))` sets it.
    pub preshared_key: Option<Option<PrivateKey>>,
    pub endpoint: Option<SocketAddr>,
    /// New keepalive interval in seconds; `Some(0)` turns it off.
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: AllowedIpsChange,
}

/// How a peer's allowed IPs change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AllowedIpsChange {
    /// They stay as they are.
    #[default]
    Unchanged,
    /// Remove these prefixes one by one (needs [`Capabilities::allowed_ip_removal`]) and add
    /// these. Both lists are sorted.
    Incremental { remove: Vec<IpNet>, add: Vec<IpNet> },
    /// Replace the peer's whole list with this one (sorted).
    Replace(Vec<IpNet>),
}

/// Why a desired state cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredStateError {
    /// Two peers claim the same allowed-IP prefix.
    #[error(
        "allowed IP {prefix} is given to two peers, {first} and {second}; each prefix must belong to exactly one peer of an interface"
    )]
    DuplicateAllowedIp {
        prefix: IpNet,
        first: Key,
        second: Key,
    },
    /// The same public key appears twice among the desired peers.
    #[error("peer {0} appears twice in the desired state")]
    DuplicatePeer(Key),
}

/// Computes the changes that take `actual` to `desired`. See the module documentation for the
/// rules. The cost is linear in the number of peers and allowed IPs.
pub fn diff(
    actual: &DeviceState,
    desired: &DeviceConfig,
    caps: Capabilities,
) -> Result<DeviceDiff, DesiredStateError> {
    check_desired(desired)?;

    let mut out = DeviceDiff::default();
    if let Some(key) = &desired.private_key
        && actual.private_key.as_ref().map(PrivateKey::clamped) != Some(key.clamped())
    {
        out.private_key = Some(key.clamped());
    }
    if let Some(port) = desired.listen_port
        && actual.listen_port != port
    {
        out.listen_port = Some(port);
    }
    if let Some(mark) = desired.fwmark
        && actual.fwmark != mark
    {
        out.fwmark = Some(mark);
    }

    // The actual peers by key, each remembering whether a desired peer matched it.
    let mut actual_by_key: HashMap<&Key, (&PeerConfig, bool)> = actual
        .peers
        .iter()
        .map(|p| (&p.config.public_key, (&p.config, false)))
        .collect();
    let mut updates = Vec::new();
    let mut additions = Vec::new();
    for want in &desired.peers {
        match actual_by_key.get_mut(&want.public_key) {
            None => additions.push(PeerChange::Add(normalized(want))),
            Some((have, matched)) => {
                *matched = true;
                if let Some(update) = peer_update(have, want, caps) {
                    updates.push(PeerChange::Update(update));
                }
            }
        }
    }
    // Removals first, in key order so the output is deterministic; then updates, then additions.
    let mut removals: Vec<&Key> = actual_by_key
        .iter()
        .filter(|(_, (_, matched))| !matched)
        .map(|(k, _)| *k)
        .collect();
    removals.sort_unstable();
    out.peers
        .reserve(removals.len() + updates.len() + additions.len());
    out.peers
        .extend(removals.into_iter().map(|k| PeerChange::Remove(*k)));
    out.peers.extend(updates);
    out.peers.extend(additions);
    Ok(out)
}

/// The change for one peer, given what the device has for that key (`None`: absent) and
/// what is desired (`None`: should not exist). This is the per-peer step of [`diff`], for
/// callers that know which peers changed (an event from the store): the cost depends on that
/// peer only, not on the number of peers of the device. Check the desired peer's prefixes with
/// [`PrefixOwners`] first.
pub fn diff_peer(
    actual: Option<&PeerConfig>,
    desired: Option<&PeerConfig>,
    caps: Capabilities,
) -> Option<PeerChange> {
    match (actual, desired) {
        (None, None) => None,
        (Some(have), None) => Some(PeerChange::Remove(have.public_key)),
        (None, Some(want)) => Some(PeerChange::Add(normalized(want))),
        (Some(have), Some(want)) => peer_update(have, want, caps).map(PeerChange::Update),
    }
}

/// Which peer owns each allowed-IP prefix of a desired state, kept up to date peer by peer so
/// an incremental change is checked against the one-owner rule in time proportional to that
/// peer's prefixes.
#[derive(Clone, Debug, Default)]
pub struct PrefixOwners {
    owners: HashMap<IpNet, Key>,
}

impl PrefixOwners {
    /// Indexes a whole desired state, refusing it as [`diff`] would.
    pub fn from_config(desired: &DeviceConfig) -> Result<Self, DesiredStateError> {
        check_desired(desired)?;
        let mut owners = HashMap::new();
        for p in &desired.peers {
            for n in &p.allowed_ips {
                owners.insert(n.trunc(), p.public_key);
            }
        }
        Ok(PrefixOwners { owners })
    }

    /// Records `new` as the desired configuration of its peer (replacing `old`, its previous
    /// one, if any), or refuses it without changing anything if one of its prefixes belongs to
    /// another peer.
    pub fn upsert(
        &mut self,
        old: Option<&PeerConfig>,
        new: &PeerConfig,
    ) -> Result<(), DesiredStateError> {
        for n in &new.allowed_ips {
            let prefix = n.trunc();
            if let Some(owner) = self.owners.get(&prefix)
                && *owner != new.public_key
            {
                return Err(DesiredStateError::DuplicateAllowedIp {
                    prefix,
                    first: *owner,
                    second: new.public_key,
                });
            }
        }
        if let Some(old) = old {
            self.remove(old);
        }
        for n in &new.allowed_ips {
            self.owners.insert(n.trunc(), new.public_key);
        }
        Ok(())
    }

    /// Forgets a peer's prefixes.
    pub fn remove(&mut self, peer: &PeerConfig) {
        for n in &peer.allowed_ips {
            let prefix = n.trunc();
            if self.owners.get(&prefix) == Some(&peer.public_key) {
                self.owners.remove(&prefix);
            }
        }
    }

    /// The peer that owns `prefix`, if any.
    pub fn owner(&self, prefix: &IpNet) -> Option<&Key> {
        self.owners.get(&prefix.trunc())
    }
}

/// Refuses duplicate peers and prefixes given to two peers.
pub fn check_desired(desired: &DeviceConfig) -> Result<(), DesiredStateError> {
    // Sorting (rather than hashing) keeps this to two flat arrays: cheap even for 50,000 peers.
    let peers = &desired.peers;
    let mut keys: Vec<(&Key, usize)> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.public_key, i))
        .collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(DesiredStateError::DuplicatePeer(*w[1].0));
    }
    let total = peers.iter().map(|p| p.allowed_ips.len()).sum();
    let mut prefixes: Vec<(IpNet, usize)> = Vec::with_capacity(total);
    for (i, p) in peers.iter().enumerate() {
        prefixes.extend(p.allowed_ips.iter().map(|n| (n.trunc(), i)));
    }
    prefixes.sort_unstable();
    // Equal prefixes are adjacent, ordered by peer position: the first two owners conflict.
    if let Some(w) = prefixes
        .windows(2)
        .find(|w| w[0].0 == w[1].0 && w[0].1 != w[1].1)
    {
        return Err(DesiredStateError::DuplicateAllowedIp {
            prefix: w[0].0,
            first: peers[w[0].1].public_key,
            second: peers[w[1].1].public_key,
        });
    }
    Ok(())
}

/// The canonical form of an allowed-IP list: host bits cleared (the kernel stores and reports
/// prefixes that way), sorted, without duplicates.
pub fn canonical_allowed_ips(ips: &[IpNet]) -> Vec<IpNet> {
    // Usually already canonical: copy without building a set.
    let canonical = ips.iter().all(|n| n.trunc() == *n) && ips.windows(2).all(|w| w[0] < w[1]);
    if canonical {
        return ips.to_vec();
    }
    prefix_set(ips).into_iter().collect()
}

/// The prefixes of an allowed-IP list as a set, host bits cleared (how the kernel keys them).
fn prefix_set(ips: &[IpNet]) -> BTreeSet<IpNet> {
    ips.iter().map(IpNet::trunc).collect()
}

/// Whether two allowed-IP lists hold the same prefixes (as sets, host bits cleared). Mesh peers
/// have one or two prefixes, so short lists are compared without allocating.
fn same_prefixes(a: &[IpNet], b: &[IpNet]) -> bool {
    if a.len() <= 8 && b.len() <= 8 {
        let covered =
            |x: &[IpNet], y: &[IpNet]| x.iter().all(|p| y.iter().any(|q| q.trunc() == p.trunc()));
        return covered(a, b) && covered(b, a);
    }
    let a = prefix_set(a);
    let b = prefix_set(b);
    a == b
}

/// A keepalive of `None` and `Some(0)` both mean off.
fn keepalive(k: Option<u16>) -> u16 {
    k.unwrap_or(0)
}

/// An all-zero preshared key is how the kernel reports "no preshared key".
fn psk(k: &Option<PrivateKey>) -> Option<&PrivateKey> {
    k.as_ref().filter(|k| k.0.0 != [0u8; 32])
}

fn normalized(peer: &PeerConfig) -> PeerConfig {
    PeerConfig {
        public_key: peer.public_key,
        preshared_key: psk(&peer.preshared_key).cloned(),
        endpoint: peer.endpoint,
        persistent_keepalive: match keepalive(peer.persistent_keepalive) {
            0 => None,
            k => Some(k),
        },
        allowed_ips: canonical_allowed_ips(&peer.allowed_ips),
    }
}

fn peer_update(have: &PeerConfig, want: &PeerConfig, caps: Capabilities) -> Option<PeerUpdate> {
    let mut update = PeerUpdate {
        public_key: want.public_key,
        preshared_key: None,
        endpoint: None,
        persistent_keepalive: None,
        allowed_ips: AllowedIpsChange::Unchanged,
    };
    if psk(&have.preshared_key) != psk(&want.preshared_key) {
        update.preshared_key = Some(psk(&want.preshared_key).cloned());
    }
    if want.endpoint.is_some() && want.endpoint != have.endpoint {
        update.endpoint = want.endpoint;
    }
    if keepalive(have.persistent_keepalive) != keepalive(want.persistent_keepalive) {
        update.persistent_keepalive = Some(keepalive(want.persistent_keepalive));
    }
    if !same_prefixes(&have.allowed_ips, &want.allowed_ips) {
        let have_ips = prefix_set(&have.allowed_ips);
        let want_ips = prefix_set(&want.allowed_ips);
        let remove: Vec<IpNet> = have_ips.difference(&want_ips).copied().collect();
        let add: Vec<IpNet> = want_ips.difference(&have_ips).copied().collect();
        update.allowed_ips = if remove.is_empty() || caps.allowed_ip_removal {
            AllowedIpsChange::Incremental { remove, add }
        } else {
            AllowedIpsChange::Replace(want_ips.into_iter().collect())
        };
    }
    let unchanged = update.preshared_key.is_none()
        && update.endpoint.is_none()
        && update.persistent_keepalive.is_none()
        && update.allowed_ips == AllowedIpsChange::Unchanged;
    (!unchanged).then_some(update)
}

/// The pure model of applying a diff the way the kernel does: peers are upserted and removed
/// one by one, an allowed-IP prefix added to one peer is moved away from any other peer that had
/// it, and removing a prefix from a peer only removes it if that peer owns it. Counters and
/// handshake times of untouched peers are kept; new peers start at zero.
///
/// Used by property tests (`diff` then `apply` reaches the desired state) and by the encoder's
/// tests as the reference the kernel-message model must agree with.
pub fn apply(actual: &DeviceState, diff: &DeviceDiff) -> DeviceState {
    let mut state = actual.clone();
    if let Some(key) = &diff.private_key {
        let key = key.clamped();
        if state.private_key.as_ref() != Some(&key) {
            // The public key follows from the private key; the model does not derive it.
            state.public_key = None;
        }
        state.private_key = Some(key);
    }
    if let Some(port) = diff.listen_port {
        state.listen_port = port;
    }
    if let Some(mark) = diff.fwmark {
        state.fwmark = mark;
    }
    for change in &diff.peers {
        match change {
            PeerChange::Remove(key) => state.peers.retain(|p| p.config.public_key != *key),
            PeerChange::Add(peer) => {
                let idx = peer_index_or_insert(&mut state, &peer.public_key);
                let cfg = &mut state.peers[idx].config;
                cfg.preshared_key = psk(&peer.preshared_key).cloned();
                if peer.endpoint.is_some() {
                    cfg.endpoint = peer.endpoint;
                }
                cfg.persistent_keepalive = peer.persistent_keepalive.filter(|k| *k != 0);
                add_allowed_ips(&mut state, idx, &peer.allowed_ips);
            }
            PeerChange::Update(u) => {
                let idx = peer_index_or_insert(&mut state, &u.public_key);
                let cfg = &mut state.peers[idx].config;
                if let Some(k) = &u.preshared_key {
                    cfg.preshared_key = k.clone();
                }
                if u.endpoint.is_some() {
                    cfg.endpoint = u.endpoint;
                }
                if let Some(k) = u.persistent_keepalive {
                    cfg.persistent_keepalive = (k != 0).then_some(k);
                }
                match &u.allowed_ips {
                    AllowedIpsChange::Unchanged => {}
                    AllowedIpsChange::Incremental { remove, add } => {
                        let remove = prefix_set(remove);
                        cfg.allowed_ips.retain(|n| !remove.contains(&n.trunc()));
                        add_allowed_ips(&mut state, idx, add);
                    }
                    AllowedIpsChange::Replace(list) => {
                        cfg.allowed_ips.clear();
                        add_allowed_ips(&mut state, idx, list);
                    }
                }
            }
        }
    }
    state
}

fn peer_index_or_insert(state: &mut DeviceState, key: &Key) -> usize {
    if let Some(i) = state.peers.iter().position(|p| p.config.public_key == *key) {
        return i;
    }
    state.peers.push(PeerState::new(*key));
    state.peers.len() - 1
}

/// Adds prefixes to peer `idx`, moving each away from any other peer that had it (what the
/// kernel's allowedips trie does).
fn add_allowed_ips(state: &mut DeviceState, idx: usize, ips: &[IpNet]) {
    let add = prefix_set(ips);
    if add.is_empty() {
        return;
    }
    for (i, peer) in state.peers.iter_mut().enumerate() {
        if i != idx {
            peer.config
                .allowed_ips
                .retain(|n| !add.contains(&n.trunc()));
        }
    }
    let cfg = &mut state.peers[idx].config;
    let mut all = prefix_set(&cfg.allowed_ips);
    all.extend(add);
    cfg.allowed_ips = all.into_iter().collect();
}

#[cfg(test)]
mod tests;
