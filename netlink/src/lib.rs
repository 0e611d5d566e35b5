//! Kernel dataplane for Lemonade Nexus.
//!
//! The controller describes what a WireGuard interface should look like ([`DeviceConfig`]); this
//! crate reads what the interface looks like now ([`DeviceState`]), computes the smallest set of
//! changes ([`diff`]) and applies them through a [`WgBackend`]: the kernel's generic netlink
//! `wireguard` family, or the cross-platform UAPI socket of a userspace implementation.
//!
//! Layout:
//! - [`model`]: keys, peers, device configuration and dump types shared by every backend.
//! - [`backend`]: the [`WgBackend`] trait.
//! - [`diff`]: the pure desired-state diff for peers ([`diff()`]) and the pure model that applies
//!   it; [`netdiff`] does the same for addresses and routes.
//! - [`kernel`]: the kernel backend (generic netlink), its message encoder and dump decoder,
//!   and kernel detection.
//! - [`rtnl`]: links, addresses, routes and policy rules over rtnetlink.

pub mod backend;
pub mod diff;
pub mod kernel;
pub mod model;
pub mod netdiff;
pub mod netns;
pub mod rtnl;
pub mod uapi;

#[cfg(test)]
mod testutil;

pub use backend::{BackendChoice, BackendKind, BackendPreference, ReconcileError, WgBackend};
pub use diff::{
    AllowedIpsChange, Capabilities, DesiredStateError, DeviceDiff, PeerChange, PeerUpdate,
    PrefixOwners, diff, diff_peer,
};
pub use model::{DeviceConfig, DeviceState, Key, PeerConfig, PeerState};
