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

use common::{Netns, unique_name};
use lemonade_nexus_netlink::{WgBackend, uapi::UapiBackend, uapi::UapiError};

/// Userspace-only behaviour against a real wireguard-go: a second `ensure_device` (a restarted
/// controller) finds the running daemon and leaves its peers alone; a request the daemon rejects
/// comes back as its errno; a stale socket file left by a crashed daemon does not stop a start.
#[test]
fn userspace_daemon_lifecycle_errno_and_stale_socket() {
    let ns = Netns::new("usl");
    let ifname = unique_name("wg");
    ns.own_uapi_socket(&ifname);
    let (private, _) = common::keypair();
    let (_, peer) = common::keypair();
    let desired = lemonade_nexus_netlink::DeviceConfig {
        private_key: Some(private),
        listen_port: Some(51999),
        fwmark: None,
        peers: vec![lemonade_nexus_netlink::PeerConfig {
            public_key: peer,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: vec!["10.55.0.0/24".parse().expect("net")],
        }],
    };
    ns.block_on(|| async {
        let b = UapiBackend::new();
        b.ensure_device(&ifname).await.expect("start");
        b.reconcile(&ifname, &desired).await.expect("reconcile");
        b.ensure_device(&ifname)
            .await
            .expect("second ensure_device");
        assert_eq!(
            b.get(&ifname).await.expect("get").peers.len(),
            1,
            "peers kept"
        );

        let bad = b.set(&ifname, b"set=1\npublic_key=not-hex\n\n").await;
        assert!(matches!(bad, Err(UapiError::Errno(e)) if e != 0), "{bad:?}");
        let bad_port = b.set(&ifname, b"set=1\nlisten_port=70000\n\n").await;
        assert!(matches!(bad_port, Err(UapiError::Errno(_))), "{bad_port:?}");
        // The daemon still answers after rejecting requests.
        assert_eq!(b.get(&ifname).await.expect("get").listen_port, 51999);

        b.delete_device(&ifname).await.expect("delete");
        assert!(b.get(&ifname).await.is_err(), "no device after delete");

        // A stale socket: bound once, its listener gone, the file left behind.
        let path = b.socket_path(&ifname).expect("path");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind stale socket"));
        assert!(path.exists());
        b.ensure_device(&ifname)
            .await
            .expect("start over a stale socket");
        assert!(
            b.get(&ifname).await.expect("get").peers.is_empty(),
            "a fresh device"
        );
        // delete_device waits until the old daemon released its port: the same port again.
        b.reconcile(&ifname, &desired)
            .await
            .expect("same listen port after delete");
        b.delete_device(&ifname).await.expect("delete");
        b.ensure_device(&ifname).await.expect("restart at once");
        b.reconcile(&ifname, &desired)
            .await
            .expect("same listen port right after delete");
        b.delete_device(&ifname).await.expect("delete");
    });
}
