//! Is kernel WireGuard available here, and which backend do we use?
//!
//! The kernel says "no WireGuard" in two ways: resolving the generic netlink family
//! `wireguard` fails with `ENOENT` (module not loaded or not built), and creating a link of type
//! `wireguard` fails with `EOPNOTSUPP` (no such link kind, even after the kernel tried to load
//! the module). Both are mapped to [`KernelError::Unavailable`]. Resolving the family first is
//! cheap and has no side effect; only if that fails is a throwaway link created, because link
//! creation is what makes the kernel load the module on demand.

use genetlink::{GenetlinkError, GenetlinkHandle};
use netlink_packet_wireguard::WireguardMessage;

use super::KernelError;
use crate::{
    backend::{BackendChoice, BackendKind, BackendPreference},
    rtnl::Rtnl,
};

fn is_enoent(e: &GenetlinkError) -> bool {
    matches!(e, GenetlinkError::NetlinkError(io) if io.raw_os_error() == Some(libc::ENOENT))
}

async fn resolve(genl: &GenetlinkHandle) -> Result<u16, GenetlinkError> {
    genl.resolve_family::<WireguardMessage>()
        .await
        .map(|f| f.id)
}

/// Opens the generic netlink and rtnetlink sockets and resolves the `wireguard` family,
/// loading the module through a throwaway link if needed.
pub(super) async fn open() -> Result<(GenetlinkHandle, u16, Rtnl), KernelError> {
    let (conn, genl, _) = genetlink::new_connection().map_err(|e| {
        KernelError::Unavailable(format!("cannot open a generic netlink socket: {e}"))
    })?;
    tokio::spawn(conn);
    let rtnl = Rtnl::connect()?;
    match resolve(&genl).await {
        Ok(id) => return Ok((genl, id, rtnl)),
        Err(e) if is_enoent(&e) => {}
        Err(e) => {
            return Err(KernelError::Genetlink {
                op: "resolve generic netlink family \"wireguard\"".into(),
                source: e,
            });
        }
    }
    // Not registered yet: creating a link makes the kernel load the module if it has one.
    let probe = format!("lndetect{}", std::process::id() % 10_000_000);
    let created = rtnl.create_wireguard(&probe).await;
    let _ = rtnl.delete_link(&probe).await;
    if let Err(e) = created {
        return Err(KernelError::Unavailable(
            if e.errno() == Some(libc::EOPNOTSUPP) {
                "this kernel has no WireGuard: the generic netlink family \"wireguard\" does not exist \
             (ENOENT) and creating a link of type wireguard is not supported (EOPNOTSUPP)"
                .to_owned()
            } else {
                format!(
                    "the generic netlink family \"wireguard\" does not exist and creating a test link failed: {e}"
                )
            },
        ));
    }
    match resolve(&genl).await {
        Ok(id) => Ok((genl, id, rtnl)),
        Err(e) => Err(KernelError::Unavailable(format!(
            "a wireguard link could be created but the generic netlink family is missing: {e}"
        ))),
    }
}

/// Whether kernel WireGuard can be used here: `Ok(())`, or `Err(reason)` with a sentence for
/// logs and `status`.
pub async fn kernel_wireguard_available() -> Result<(), String> {
    match open().await {
        Ok(_) => Ok(()),
        Err(KernelError::Unavailable(why)) => Err(why),
        Err(e) => Err(e.to_string()),
    }
}

/// Picks the backend for `preference`. `Auto` takes the kernel when it is available and falls
/// back to userspace otherwise, logging the fallback at warn level and reporting it in
/// [`BackendChoice::fallback_reason`] so `status`, `/api/health` and a metric can show it.
/// Forcing `Kernel` where it is unavailable is an error; forcing `Userspace` never probes.
pub async fn choose_backend(preference: BackendPreference) -> Result<BackendChoice, KernelError> {
    match preference {
        BackendPreference::Userspace => Ok(BackendChoice {
            kind: BackendKind::Userspace,
            fallback_reason: None,
        }),
        BackendPreference::Kernel => match kernel_wireguard_available().await {
            Ok(()) => Ok(BackendChoice {
                kind: BackendKind::Kernel,
                fallback_reason: None,
            }),
            Err(why) => Err(KernelError::Unavailable(format!(
                "the kernel backend was forced in the configuration, but {why}"
            ))),
        },
        BackendPreference::Auto => Ok(decide(kernel_wireguard_available().await)),
    }
}

/// The pure part of [`choose_backend`] for `Auto`.
pub fn decide(kernel: Result<(), String>) -> BackendChoice {
    match kernel {
        Ok(()) => BackendChoice {
            kind: BackendKind::Kernel,
            fallback_reason: None,
        },
        Err(why) => {
            tracing::warn!(
                reason = %why,
                "kernel WireGuard unavailable: FALLING BACK TO THE USERSPACE BACKEND (slower)"
            );
            BackendChoice {
                kind: BackendKind::Userspace,
                fallback_reason: Some(why),
            }
        }
    }
}
