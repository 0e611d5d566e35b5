//! The one trait every WireGuard backend implements, and how the controller picks a backend.

use std::fmt;

use crate::model::{DeviceState, Key};

/// Which implementation carries the packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// In-kernel WireGuard, programmed over generic netlink.
    Kernel,
    /// A userspace implementation (wireguard-go) programmed over the UAPI socket.
    Userspace,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        })
    }
}

/// A WireGuard device implementation. Generic (static dispatch) at the call sites on hot paths.
///
/// The diff type and the full method set are settled by the dataplane work (issue 3); this
/// skeleton fixes the names both backends share.
#[allow(async_fn_in_trait)]
pub trait WgBackend {
    /// The error this backend returns.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Which backend this is, for `status`, `/api/health` and metrics.
    fn kind(&self) -> BackendKind;

    /// Reads the device, merging multi-part dumps by public key.
    async fn get(&self, ifname: &str) -> Result<DeviceState, Self::Error>;

    /// Removes one peer.
    async fn remove_peer(&self, ifname: &str, peer: &Key) -> Result<(), Self::Error>;
}
