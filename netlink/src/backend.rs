//! The one trait every WireGuard backend implements, and how the controller picks a backend.

use std::fmt;

use crate::{
    diff::{Capabilities, DesiredStateError, DeviceDiff, diff},
    model::{DeviceConfig, DeviceState, Key},
};

/// Which implementation carries the packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

/// A WireGuard device implementation: the kernel's generic netlink family
/// ([`crate::kernel::KernelBackend`]) or a userspace implementation over the UAPI socket.
///
/// How it is used: the controller holds one concrete backend (static dispatch: services are
/// generic over `B: WgBackend`, never `dyn`) and, for each interface it manages,
///
/// 1. calls [`ensure_device`](WgBackend::ensure_device) once (creates the interface if it is
///    missing, leaves an existing one and its peers alone);
/// 2. on every change of the desired state, and periodically to correct drift, calls
///    [`reconcile`](WgBackend::reconcile), which is [`get`](WgBackend::get) (a full dump, merged by
///    public key), the pure [`diff`] against the desired [`DeviceConfig`] with this backend's
///    [`capabilities`](WgBackend::capabilities), and [`apply`](WgBackend::apply) of that diff;
/// 3. on shutdown of an interface it owns, calls [`delete_device`](WgBackend::delete_device).
///
/// `reconcile` costs a full dump and a diff linear in the number of peers: it is the periodic
/// drift check. For one change known from a store event (a peer added, removed, moved), the
/// controller instead checks the peer with [`crate::diff::PrefixOwners::upsert`], builds the change with
/// [`crate::diff::diff_peer`] and calls [`apply`](WgBackend::apply) with a one-change
/// [`DeviceDiff`]: the cost then does not depend on how many peers the device has.
///
/// A backend never replaces the peer set of a live device: `apply` only adds, updates and
/// removes the peers named in the diff. Addresses, link state, MTU and routes are not part of
/// this trait; they go through rtnetlink (the `rtnl` module) whatever the backend, because a
/// userspace device is a TUN link the kernel routes like any other.
#[allow(async_fn_in_trait)]
pub trait WgBackend {
    /// The error this backend returns.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Which backend this is, for `status`, `/api/health` and metrics.
    fn kind(&self) -> BackendKind;

    /// What this backend can do (for example remove a single allowed IP). Probed once when the
    /// backend is built.
    fn capabilities(&self) -> Capabilities;

    /// Creates the WireGuard interface `ifname` if it does not exist. An existing interface is
    /// left as it is (its peers are not touched). Does not bring the link up.
    async fn ensure_device(&self, ifname: &str) -> Result<(), Self::Error>;

    /// Reads the device, merging multi-part dumps by public key.
    async fn get(&self, ifname: &str) -> Result<DeviceState, Self::Error>;

    /// Applies a diff computed by [`diff`] (with this backend's capabilities). Never sends
    /// "replace peers".
    async fn apply(&self, ifname: &str, diff: &DeviceDiff) -> Result<(), Self::Error>;

    /// Removes one peer.
    async fn remove_peer(&self, ifname: &str, peer: &Key) -> Result<(), Self::Error>;

    /// Deletes the interface. Deleting an interface that does not exist is not an error.
    async fn delete_device(&self, ifname: &str) -> Result<(), Self::Error>;

    /// Brings the device to `desired`: dump, diff, apply. Returns the diff that was applied
    /// (empty when the device already matched), so the caller can log and count changes.
    async fn reconcile(
        &self,
        ifname: &str,
        desired: &DeviceConfig,
    ) -> Result<DeviceDiff, ReconcileError<Self::Error>> {
        let actual = self.get(ifname).await.map_err(ReconcileError::Backend)?;
        let changes = diff(&actual, desired, self.capabilities())?;
        if !changes.is_empty() {
            self.apply(ifname, &changes)
                .await
                .map_err(ReconcileError::Backend)?;
        }
        Ok(changes)
    }
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError<E: std::error::Error + 'static> {
    /// The desired state is invalid; nothing was sent to the device.
    #[error("refusing desired state: {0}")]
    Desired(#[from] DesiredStateError),
    /// The backend failed to read or write the device.
    #[error("backend error: {0}")]
    Backend(#[source] E),
}

/// Which backend the configuration asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendPreference {
    /// The kernel if it has WireGuard, else userspace (loudly).
    #[default]
    Auto,
    /// The kernel or nothing.
    Kernel,
    /// Userspace even if the kernel has WireGuard.
    Userspace,
}

impl std::str::FromStr for BackendPreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendPreference::Auto),
            "kernel" => Ok(BackendPreference::Kernel),
            "userspace" => Ok(BackendPreference::Userspace),
            other => Err(format!(
                "unknown backend {other:?}: expected auto, kernel or userspace"
            )),
        }
    }
}

/// The backend picked at start, and why it is not the kernel when it fell back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendChoice {
    pub kind: BackendKind,
    /// `Some(reason)` when `Auto` fell back to userspace because kernel WireGuard is
    /// unavailable. Shown by `status`, `/api/health` and a metric.
    pub fallback_reason: Option<String>,
}

impl BackendChoice {
    pub fn fell_back(&self) -> bool {
        self.fallback_reason.is_some()
    }
}
