//! The same network-namespace scenario as `netns_userspace.rs`, against the kernel backend.
//! This host's kernel has no WireGuard: these run inside User-Mode Linux
//! (tests/uml/run-kernel-tests.sh). On the host, `tests/run.sh` sets LN_SKIP_KERNEL_WG_TESTS=1
//! and they print that they skipped; anywhere else a missing kernel WireGuard fails them.

mod common;

use common::{Flavor, scenario, skip_kernel_tests};
use lemonade_nexus_netlink::kernel::{KernelBackend, encode::Budget};

/// The kernel backend (generic netlink + rtnetlink), with the default 4 KiB message budget.
struct Kernel;

impl Flavor for Kernel {
    type Backend = KernelBackend;
    const TAG: &'static str = "kn";
    async fn backend() -> KernelBackend {
        KernelBackend::connect(Budget::default())
            .await
            .expect("kernel WireGuard backend (is the wireguard module loaded?)")
    }
}

#[test]
fn kernel_configure_dump_and_traffic() {
    if skip_kernel_tests() {
        return;
    }
    scenario::configure_dump_and_traffic::<Kernel>();
}

#[test]
fn kernel_drift_is_corrected() {
    if skip_kernel_tests() {
        return;
    }
    scenario::drift_is_corrected::<Kernel>();
}

#[test]
fn kernel_peer_removal_stops_traffic() {
    if skip_kernel_tests() {
        return;
    }
    scenario::peer_removal_stops_traffic::<Kernel>();
}

#[test]
fn kernel_addresses_and_routes_read_back() {
    if skip_kernel_tests() {
        return;
    }
    scenario::addresses_and_routes_read_back::<Kernel>();
}
