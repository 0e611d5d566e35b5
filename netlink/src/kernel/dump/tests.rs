use std::net::IpAddr;

use netlink_packet_core::{NLM_F_MULTIPART, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAllowedIp, WireguardCmd, WireguardPeer, WireguardPeerAttribute, WireguardTimeSpec,
};
use proptest::prelude::*;

use super::*;
use crate::{
    kernel::{
        encode::{Budget, DEFAULT_BUDGET, MIN_BUDGET, PeerEntry, allowed_ip as ip_entry, pack},
        setmodel::canonical,
    },
    model::{DeviceConfig, PeerConfig},
    testutil::{arb_state, key, peer, state_from},
};

const FAMILY: u16 = 0x1d;

/// Dump parts shaped like the kernel's (`get_peer` in drivers/net/wireguard/netlink.c): device
/// attributes in the first part, every peer attribute in a peer's first fragment, only the public
/// key in its continuations. Built with the same packer and budget rules as the SET encoder.
fn kernel_shaped_dump(state: &DeviceState, budget: usize) -> Vec<Vec<u8>> {
    let mut first = Vec::new();
    if let Some(k) = &state.private_key {
        first.push(WireguardAttribute::PrivateKey(k.0.0));
    }
    if let Some(k) = &state.public_key {
        first.push(WireguardAttribute::PublicKey(k.0));
    }
    first.push(WireguardAttribute::ListenPort(state.listen_port));
    first.push(WireguardAttribute::Fwmark(state.fwmark));
    first.push(WireguardAttribute::IfIndex(7));
    first.push(WireguardAttribute::IfName("wgdump0".into()));
    let entries = state.peers.iter().map(|p| {
        let c = &p.config;
        let mut attrs = vec![
            WireguardPeerAttribute::PublicKey(c.public_key.0),
            WireguardPeerAttribute::PresharedKey(
                c.preshared_key.as_ref().map(|k| k.0.0).unwrap_or([0; 32]),
            ),
            WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                seconds: p
                    .last_handshake
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
                nano_seconds: 0,
            }),
            WireguardPeerAttribute::PersistentKeepalive(c.persistent_keepalive.unwrap_or(0)),
            WireguardPeerAttribute::TxBytes(p.tx_bytes),
            WireguardPeerAttribute::RxBytes(p.rx_bytes),
            WireguardPeerAttribute::ProtocolVersion(1),
        ];
        if let Some(ep) = c.endpoint {
            attrs.push(WireguardPeerAttribute::Endpoint(ep));
        }
        PeerEntry {
            first: attrs,
            continuation: vec![WireguardPeerAttribute::PublicKey(c.public_key.0)],
            allowed_ips: c.allowed_ips.iter().map(|n| ip_entry(n, false)).collect(),
        }
    });
    let msgs = pack(
        WireguardCmd::GetDevice,
        &[],
        first,
        entries,
        Budget::new(budget).expect("budget"),
    )
    .expect("packs");
    msgs.into_iter()
        .enumerate()
        .map(|(seq, m)| {
            let mut genl = GenlMessage::from_payload(m);
            genl.set_resolved_family_id(FAMILY);
            let mut nl = NetlinkMessage::from(genl);
            nl.header.flags = NLM_F_MULTIPART;
            nl.header.sequence_number = seq as u32;
            nl.finalize();
            let mut buf = vec![0u8; nl.buffer_len()];
            nl.serialize(&mut buf);
            assert!(buf.len() <= budget);
            buf
        })
        .collect()
}

fn decode_parts(parts: &[Vec<u8>]) -> Vec<WireguardMessage> {
    parts
        .iter()
        .map(|b| {
            let nl =
                NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(b).expect("decodes");
            match nl.payload {
                NetlinkPayload::InnerMessage(g) => g.payload,
                other => panic!("unexpected {other:?}"),
            }
        })
        .collect()
}

fn roundtrip(state: &DeviceState, budget: usize) -> (usize, DeviceState) {
    let parts = kernel_shaped_dump(state, budget);
    let msgs = decode_parts(&parts);
    let merged = merge_dump(&msgs).expect("merges");
    // The byte-level entry point agrees.
    let from_bytes = merge_dump_bytes(parts.iter().map(Vec::as_slice)).expect("merges bytes");
    assert_eq!(from_bytes, merged);
    (parts.len(), merged)
}

fn big_state(peers: u32, ips_per_peer: u32) -> DeviceState {
    let config = DeviceConfig {
        listen_port: Some(51820),
        peers: (0..peers)
            .map(|i| PeerConfig {
                endpoint: Some(endpoint(i)),
                persistent_keepalive: Some(25),
                allowed_ips: (0..ips_per_peer)
                    .map(|j| {
                        let v = i * ips_per_peer + j;
                        if j % 2 == 0 {
                            IpNet::new(
                                IpAddr::from([10, (v >> 16) as u8, (v >> 8) as u8, v as u8]),
                                32,
                            )
                            .expect("v4")
                        } else {
                            IpNet::new(
                                IpAddr::from(std::net::Ipv6Addr::from(
                                    (0xfd00_u128 << 112) | u128::from(v),
                                )),
                                128,
                            )
                            .expect("v6")
                        }
                    })
                    .collect(),
                ..peer(i, &[])
            })
            .collect(),
        ..Default::default()
    };
    let mut s = state_from(&config);
    s.public_key = Some(key(4242));
    for (i, p) in s.peers.iter_mut().enumerate() {
        p.rx_bytes = i as u64 * 1000;
        p.tx_bytes = i as u64 * 7;
        p.last_handshake =
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i as u64));
    }
    s
}

fn endpoint(i: u32) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([192, 0, 2, (i % 250) as u8 + 1], 51820 + (i % 1000) as u16))
}

#[test]
fn selftest_shaped_dumps_merge_back() {
    // One peer with 130,560 allowed IPs: split over more than a thousand parts.
    let (n, got) = roundtrip(&big_state(1, 130_560), DEFAULT_BUDGET);
    assert!(n > 1000, "{n} parts");
    assert_eq!(got.peers.len(), 1);
    assert_eq!(got.peers[0].config.allowed_ips.len(), 130_560);
    assert_eq!(canonical(&got), canonical(&big_state(1, 130_560)));
    // 40 peers x 52 allowed IPs, 29 empty peers plus one, 197 IPv6 /128s.
    for (peers, ips) in [(40, 52), (30, 0), (1, 197)] {
        let want = big_state(peers, ips);
        for budget in [MIN_BUDGET, DEFAULT_BUDGET] {
            let (n, got) = roundtrip(&want, budget);
            assert_eq!(
                canonical(&got),
                canonical(&want),
                "{peers}x{ips} at {budget} ({n} parts)"
            );
        }
    }
}

#[test]
fn a_peer_cut_across_parts_is_one_peer_with_every_allowed_ip() {
    let want = big_state(3, 300);
    let parts = kernel_shaped_dump(&want, MIN_BUDGET);
    let msgs = decode_parts(&parts);
    // The dump really repeats peers: more peer fragments than peers.
    let fragments: usize = msgs
        .iter()
        .flat_map(|m| &m.attributes)
        .map(|a| match a {
            WireguardAttribute::Peers(p) => p.len(),
            _ => 0,
        })
        .sum();
    assert!(fragments > 3 * 10, "{fragments} fragments");
    let got = merge_dump(&msgs).expect("merges");
    assert_eq!(got.peers.len(), 3);
    // Order of first appearance is kept, and counters come from the first fragment.
    assert_eq!(got, want);
    // A naive reader that keeps only the first part sees a fraction of the peer.
    let first_only = merge_dump(&msgs[..1]).expect("merges");
    assert!(first_only.peers[0].config.allowed_ips.len() < 300);
}

#[test]
fn malformed_dumps_are_errors_not_panics() {
    let no_key = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::RxBytes(1),
        ])])],
    };
    assert_eq!(merge_dump([&no_key]), Err(DumpError::PeerWithoutKey));
    // Truncated or garbage bytes are an error.
    let good = kernel_shaped_dump(&big_state(2, 3), DEFAULT_BUDGET);
    for cut in [0, 3, 16, 21, good[0].len() - 1] {
        assert!(merge_dump_bytes([&good[0][..cut]]).is_err(), "cut at {cut}");
    }
    let bad_mask = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(key(1).0),
            WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::IpAddr("10.0.0.0".parse().expect("ip")),
                WireguardAllowedIpAttr::Cidr(33),
            ])]),
        ])])],
    };
    assert!(matches!(
        merge_dump([&bad_mask]),
        Err(DumpError::BadAllowedIp { .. })
    ));
    // Zero keys and zero times mean "none".
    let zeros = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![
            WireguardAttribute::PrivateKey([0; 32]),
            WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(key(1).0),
                WireguardPeerAttribute::PresharedKey([0; 32]),
                WireguardPeerAttribute::LastHandshake(WireguardTimeSpec::default()),
                WireguardPeerAttribute::PersistentKeepalive(0),
            ])]),
        ],
    };
    let s = merge_dump([&zeros]).expect("merges");
    assert_eq!(s.private_key, None);
    assert_eq!(s.peers[0].config.preshared_key, None);
    assert_eq!(s.peers[0].last_handshake, None);
    assert_eq!(s.peers[0].config.persistent_keepalive, None);
}

proptest! {
    #[test]
    fn any_state_survives_a_split_dump(state in arb_state(), budget in MIN_BUDGET..1500usize) {
        let mut want = state;
        for p in &mut want.peers {
            p.config.allowed_ips = p.config.allowed_ips.iter().map(IpNet::trunc).collect();
            if p.config.preshared_key.as_ref().is_some_and(|k| k.0.0 == [0; 32]) {
                p.config.preshared_key = None;
            }
            if p.config.persistent_keepalive == Some(0) {
                p.config.persistent_keepalive = None;
            }
        }
        let (_, got) = roundtrip(&want, budget);
        prop_assert_eq!(got, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Corrupted dump bytes give an error or a state, never a panic.
    #[test]
    fn corrupted_dump_bytes_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let parts = kernel_shaped_dump(&big_state(2, 3), DEFAULT_BUDGET);
        let mut bytes = parts[0].clone();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let len = cut.index(bytes.len() + 1);
        let _ = merge_dump_bytes([&bytes[..len.max(1)]]);
    }
}

/// An allowed IP whose CIDR attribute is empty (the crate's parser indexes its first byte).
#[test]
fn empty_cidr_attribute_is_an_error_not_a_panic() {
    let parts = kernel_shaped_dump(&big_state(1, 1), DEFAULT_BUDGET);
    let mut bytes = parts[0].clone();
    // The CIDR attribute: length 5, type 3 (WGALLOWEDIP_A_CIDR_MASK), prefix 32.
    let at = bytes
        .windows(5)
        .position(|w| w == [5, 0, 3, 0, 32])
        .expect("cidr attribute present");
    bytes[at] = 4;
    assert!(merge_dump_bytes([bytes.as_slice()]).is_err());
}
