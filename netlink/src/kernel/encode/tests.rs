use std::collections::HashSet;

use netlink_packet_wireguard::{WireguardAttribute, WireguardPeerAttribute, WireguardPeerFlags};
use proptest::prelude::*;

use super::*;
use crate::{
    diff::{Capabilities, apply, diff},
    kernel::setmodel::{KernelDevice, canonical, decode},
    model::{DeviceConfig, DeviceState, PrivateKey},
    testutil::{arb_config, arb_state, key, peer, state_from},
};

const FAMILY: u16 = 0x1d;

/// Shapes from the kernel selftest (tools/testing/selftests/wireguard/netns.sh, "things that
/// usually cause split responses").
fn one_peer_130560_ips() -> DeviceConfig {
    let mut ips = Vec::with_capacity(130_560);
    for i in 1..=255u32 {
        for j in 0..=255u32 {
            ips.push(format!("10.{i}.{j}.0/24").parse().expect("v4"));
            ips.push(format!("abcd::{i:x}:{j:x}/128").parse().expect("v6"));
        }
    }
    assert_eq!(ips.len(), 130_560);
    DeviceConfig {
        private_key: Some(PrivateKey(key(999))),
        listen_port: Some(51820),
        peers: vec![PeerConfig {
            allowed_ips: ips,
            ..peer(1, &[])
        }],
        ..Default::default()
    }
}

fn forty_peers_52_ips() -> DeviceConfig {
    let peers = (0..40u32)
        .map(|i| {
            let ips = (0..52u32)
                .map(|j| {
                    if j % 2 == 0 {
                        format!("10.{i}.{j}.1/32").parse().expect("v4")
                    } else {
                        format!("fd00:{i:x}::{j:x}/128").parse().expect("v6")
                    }
                })
                .collect();
            PeerConfig {
                endpoint: Some(
                    format!("192.0.2.{}:{}", i + 1, 51820 + i)
                        .parse()
                        .expect("ep"),
                ),
                persistent_keepalive: Some(25),
                allowed_ips: ips,
                ..peer(i, &[])
            }
        })
        .collect();
    DeviceConfig {
        listen_port: Some(51820),
        peers,
        ..Default::default()
    }
}

fn twenty_nine_empty_plus_one() -> DeviceConfig {
    let mut peers: Vec<PeerConfig> = (0..29u32).map(|i| peer(i, &[])).collect();
    peers.push(peer(29, &["192.168.0.0/16", "fd00::/64"]));
    DeviceConfig {
        peers,
        ..Default::default()
    }
}

fn ipv6_197() -> DeviceConfig {
    let ips = (0..197u32)
        .map(|j| format!("fd00:1234::{j:x}/128").parse().expect("v6"))
        .collect();
    DeviceConfig {
        peers: vec![PeerConfig {
            allowed_ips: ips,
            ..peer(7, &[])
        }],
        ..Default::default()
    }
}

fn peer_key(attrs: &[WireguardPeerAttribute]) -> Key {
    attrs
        .iter()
        .find_map(|a| match a {
            WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
            _ => None,
        })
        .expect("every peer fragment carries its public key")
}

/// Serializes, checks the budget and the fragment rules on the decoded bytes, and returns the
/// decoded messages.
fn encode_and_check(msgs: Vec<WireguardMessage>, budget: Budget) -> Vec<WireguardMessage> {
    let mut decoded = Vec::new();
    let mut seen_peers: HashSet<Key> = HashSet::new();
    let mut last_key: Option<Key> = None;
    for (n, msg) in msgs.into_iter().enumerate() {
        let bytes = to_bytes(msg.clone(), FAMILY, n as u32);
        assert!(
            bytes.len() <= budget.bytes(),
            "message {n} is {} bytes",
            bytes.len()
        );
        let back = decode(&bytes).expect("decodes");
        assert_eq!(back, msg, "message {n} round-trips");
        for attr in &back.attributes {
            match attr {
                WireguardAttribute::IfName(_) | WireguardAttribute::Peers(_) => {}
                WireguardAttribute::Flags(_) => panic!("device flags (REPLACE_PEERS) sent"),
                other => assert_eq!(n, 0, "device attribute {other:?} outside the first message"),
            }
        }
        assert!(matches!(back.attributes[0], WireguardAttribute::IfName(_)));
        for attr in &back.attributes {
            let WireguardAttribute::Peers(peers) = attr else {
                continue;
            };
            assert!(!peers.is_empty(), "empty peers list in message {n}");
            for (i, p) in peers.iter().enumerate() {
                let k = peer_key(&p.0);
                if !seen_peers.insert(k) {
                    // A continuation: first in its message, same peer as the previous fragment,
                    // only key, UPDATE_ONLY at most, and allowed IPs.
                    assert_eq!(i, 0, "continuation of {k} not at the start of message {n}");
                    assert_eq!(
                        last_key,
                        Some(k),
                        "continuation of a peer that is not the last"
                    );
                    for a in &p.0 {
                        match a {
                            WireguardPeerAttribute::PublicKey(_) => {}
                            WireguardPeerAttribute::AllowedIps(ips) => assert!(!ips.is_empty()),
                            WireguardPeerAttribute::Flags(f) => {
                                assert_eq!(*f, WireguardPeerFlags::UpdateOnly)
                            }
                            other => panic!("continuation carries {other:?}"),
                        }
                    }
                }
                last_key = Some(k);
            }
        }
        decoded.push(back);
    }
    decoded
}

fn run_model(start: &DeviceState, msgs: &[WireguardMessage]) -> DeviceState {
    let mut dev = KernelDevice::new(start);
    for m in msgs {
        dev.apply_set(m).expect("kernel model accepts the message");
    }
    dev.to_state()
}

fn check_shape(config: &DeviceConfig, budget: usize) -> usize {
    let budget = Budget::new(budget).expect("budget");
    let d = diff(&DeviceState::default(), config, Capabilities::default()).expect("valid");
    let msgs = encode_diff("wgtest0", &d, budget).expect("encodes");
    let count = msgs.len();
    let decoded = encode_and_check(msgs, budget);
    let got = run_model(&DeviceState::default(), &decoded);
    let mut want = state_from(config);
    want.public_key = None;
    assert_eq!(canonical(&got), canonical(&want));
    count
}

#[test]
fn selftest_one_peer_with_130560_allowed_ips() {
    let config = one_peer_130560_ips();
    let n = check_shape(&config, DEFAULT_BUDGET);
    // 65,280 v4 entries of 28 bytes and 65,280 v6 entries of 40 bytes need at least 1,085
    // 4 KiB messages; the packer must not waste many more.
    assert!((1085..1120).contains(&n), "{n} messages");
    check_shape(&config, MAX_BUDGET);
}

#[test]
fn selftest_forty_peers_with_52_allowed_ips() {
    let config = forty_peers_52_ips();
    for budget in [MIN_BUDGET, DEFAULT_BUDGET, 8192, MAX_BUDGET] {
        let n = check_shape(&config, budget);
        if budget == MAX_BUDGET {
            // 40 peers of about 1,840 bytes need two messages even at the largest budget.
            assert_eq!(n, 2);
        }
    }
}

#[test]
fn selftest_twenty_nine_empty_peers_plus_one() {
    let config = twenty_nine_empty_plus_one();
    for budget in [MIN_BUDGET, DEFAULT_BUDGET] {
        check_shape(&config, budget);
    }
    assert_eq!(check_shape(&config, DEFAULT_BUDGET), 1);
    assert!(check_shape(&config, MIN_BUDGET) > 1);
}

#[test]
fn selftest_197_ipv6_host_routes() {
    let config = ipv6_197();
    // 197 × 40 bytes do not fit in 4 KiB: one split.
    assert_eq!(check_shape(&config, DEFAULT_BUDGET), 2);
    check_shape(&config, MIN_BUDGET);
}

#[test]
fn a_thousand_peers_never_panic_whatever_the_budget() {
    let peers = (0..1000u32)
        .map(|i| PeerConfig {
            allowed_ips: vec![
                format!("10.{}.{}.0/24", i / 256, i % 256)
                    .parse()
                    .expect("v4"),
                format!("fd00:{i:x}::/64").parse().expect("v6"),
                format!("fd01:{i:x}::1/128").parse().expect("v6"),
            ],
            ..peer(i, &[])
        })
        .collect();
    let config = DeviceConfig {
        peers,
        ..Default::default()
    };
    for budget in [MIN_BUDGET, DEFAULT_BUDGET, MAX_BUDGET, 1 << 20] {
        check_shape(&config, budget);
    }
}

#[test]
fn update_only_survives_a_split_and_replace_stays_in_the_first_fragment() {
    let ips: Vec<IpNet> = (0..100u32)
        .map(|j| format!("10.9.{j}.0/24").parse().expect("v4"))
        .collect();
    let actual = state_from(&DeviceConfig {
        peers: vec![peer(1, &["10.8.0.0/24"])],
        ..Default::default()
    });
    let desired = DeviceConfig {
        peers: vec![PeerConfig {
            allowed_ips: ips,
            ..peer(1, &[])
        }],
        ..Default::default()
    };
    let d = diff(&actual, &desired, Capabilities::default()).expect("valid");
    let budget = Budget::new(MIN_BUDGET).expect("budget");
    let msgs = encode_and_check(encode_diff("wgtest0", &d, budget).expect("encodes"), budget);
    assert!(msgs.len() > 1);
    let flags: Vec<WireguardPeerFlags> = msgs
        .iter()
        .flat_map(|m| &m.attributes)
        .filter_map(|a| match a {
            WireguardAttribute::Peers(p) => Some(p),
            _ => None,
        })
        .flatten()
        .map(|p| {
            p.0.iter()
                .find_map(|a| match a {
                    WireguardPeerAttribute::Flags(f) => Some(*f),
                    _ => None,
                })
                .expect("updates carry flags")
        })
        .collect();
    assert_eq!(
        flags[0],
        WireguardPeerFlags::UpdateOnly | WireguardPeerFlags::ReplaceAllowedIps
    );
    assert!(
        flags[1..]
            .iter()
            .all(|f| *f == WireguardPeerFlags::UpdateOnly)
    );
    assert_eq!(
        canonical(&run_model(&actual, &msgs)),
        canonical(&apply(&actual, &d))
    );
    // If the peer vanished meanwhile (an operator removed it), nothing recreates it partially.
    assert!(run_model(&DeviceState::default(), &msgs).peers.is_empty());
}

#[test]
fn tiny_budget_and_bad_names_are_errors() {
    assert_eq!(Budget::new(100), Err(EncodeError::BudgetTooSmall(100)));
    assert_eq!(Budget::new(1 << 20).expect("capped").bytes(), MAX_BUDGET);
    let d = DeviceDiff {
        listen_port: Some(1),
        ..Default::default()
    };
    for bad in ["", "a/b", "sixteen-chars-xx", "a b"] {
        assert!(matches!(
            encode_diff(bad, &d, Budget::default()),
            Err(EncodeError::BadIfName(_))
        ));
    }
    assert!(
        encode_diff("wg0", &DeviceDiff::default(), Budget::default())
            .expect("ok")
            .is_empty()
    );
}

#[test]
fn golden_bytes_of_one_small_message() {
    let mut p = peer(1, &["10.0.0.0/24"]);
    p.endpoint = Some("192.0.2.1:51820".parse().expect("ep"));
    p.persistent_keepalive = Some(25);
    let d = DeviceDiff {
        listen_port: Some(51820),
        peers: vec![PeerChange::Add(p)],
        ..Default::default()
    };
    let msgs = encode_diff("wg0", &d, Budget::default()).expect("encodes");
    assert_eq!(msgs.len(), 1);
    let bytes = to_bytes(msgs[0].clone(), FAMILY, 7);
    #[rustfmt::skip]
    let want: Vec<u8> = [
        // nlmsghdr: length 140, type 0x1d (family), flags REQUEST|ACK, seq 7, pid 0
        &[140u8, 0, 0, 0, 0x1d, 0, 0x05, 0, 7, 0, 0, 0, 0, 0, 0, 0][..],
        // genlmsghdr: cmd 1 (SET_DEVICE), version 1, reserved
        &[1, 1, 0, 0],
        // WGDEVICE_A_IFNAME (2) "wg0\0"
        &[8, 0, 2, 0, b'w', b'g', b'0', 0],
        // WGDEVICE_A_LISTEN_PORT (6) 51820, padded
        &[6, 0, 6, 0, 0x6c, 0xca, 0, 0],
        // WGDEVICE_A_PEERS (8 | NESTED), length 104
        &[104, 0, 8, 0x80],
        // one peer (nested, type 0), length 100
        &[100, 0, 0, 0x80],
        // WGPEER_A_PUBLIC_KEY (1): key(1) = 00 00 00 01, 27 zeros, 0x5a
        &[36, 0, 1, 0, 0, 0, 0, 1], &[0; 27], &[0x5a],
        // WGPEER_A_ENDPOINT (4): sockaddr_in AF_INET, port 51820 big-endian, 192.0.2.1, zero pad
        &[20, 0, 4, 0, 2, 0, 0xca, 0x6c, 192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        // WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL (5) 25, padded
        &[6, 0, 5, 0, 25, 0, 0, 0],
        // WGPEER_A_ALLOWEDIPS (9 | NESTED), length 32, one entry of 28
        &[32, 0, 9, 0x80, 28, 0, 0, 0x80],
        // family AF_INET (2), address 10.0.0.0, cidr 24 (padded)
        &[6, 0, 1, 0, 2, 0, 0, 0, 8, 0, 2, 0, 10, 0, 0, 0, 5, 0, 3, 0, 24, 0, 0, 0],
    ]
    .concat();
    assert_eq!(bytes, want);
}

#[test]
fn one_peer_per_message_encoder_reaches_the_same_state() {
    let config = forty_peers_52_ips();
    let d = diff(&DeviceState::default(), &config, Capabilities::default()).expect("valid");
    let msgs = encode_one_peer_per_message("wgtest0", &d).expect("encodes");
    assert_eq!(msgs.len(), 41, "one message for the device, one per peer");
    let decoded = encode_and_check(msgs, Budget::new(MAX_BUDGET).expect("budget"));
    let mut want = state_from(&config);
    want.public_key = None;
    assert_eq!(
        canonical(&run_model(&DeviceState::default(), &decoded)),
        canonical(&want)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Any diff, split at the smallest budget, does through the kernel model what the pure
    /// model says it does.
    #[test]
    fn kernel_model_of_encoded_diff_agrees_with_pure_apply(
        actual in arb_state(),
        desired in arb_config(),
        removal in any::<bool>(),
        budget in MIN_BUDGET..1200usize,
    ) {
        let caps = Capabilities { allowed_ip_removal: removal };
        let d = diff(&actual, &desired, caps).expect("valid");
        let budget = Budget::new(budget).expect("budget");
        let msgs = encode_and_check(encode_diff("wgp0", &d, budget).expect("encodes"), budget);
        prop_assert_eq!(canonical(&run_model(&actual, &msgs)), canonical(&apply(&actual, &d)));
    }
}
