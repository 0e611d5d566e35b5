//! The network-namespace scenario against the userspace backend (wireguard-go), on the host.
//! Needs root (CI is root), `wg`, `wireguard-go`, `ip`, `ping` and `nc`.

mod common;

use common::{Userspace, scenario};

#[test]
fn userspace_configure_dump_and_traffic() {
    scenario::configure_dump_and_traffic::<Userspace>();
}

#[test]
fn userspace_drift_is_corrected() {
    scenario::drift_is_corrected::<Userspace>();
}

#[test]
fn userspace_peer_removal_stops_traffic() {
    scenario::peer_removal_stops_traffic::<Userspace>();
}

#[test]
fn userspace_addresses_and_routes_read_back() {
    scenario::addresses_and_routes_read_back::<Userspace>();
}
