//! Kernel dataplane for Lemonade Nexus.
//!
//! The controller describes what a WireGuard interface should look like ([`DeviceConfig`]); this
//! crate reads what the interface looks like now ([`DeviceState`]), computes the smallest set of
//! changes ([`diff`]) and applies them through a [`WgBackend`]: the kernel's generic netlink
//! `wireguard` family, or the cross-platform UAPI socket of a userspace implementation.
//!
//! Layout:
//! - [`model`]: keys, peers, device configuration and dump types shared by every backend.
//! - [`backend`]: the [`WgBackend`] trait and backend detection.

pub mod backend;
pub mod model;

pub use backend::{BackendKind, WgBackend};
pub use model::{DeviceConfig, DeviceState, Key, PeerConfig, PeerState};
