//! Kernel encoder benchmarks (issue 3):
//! - messages and bytes needed to program N peers into an empty device, with the packed encoder
//!   (wg(8)-style, 4 KiB budget) beside a one-peer-per-message encoder (wgctrl-go, defguard);
//! - time to encode those configurations;
//! - time to compute and encode one incremental change (add a peer, remove one, change one
//!   endpoint) on a device with N peers, per peer (what the controller does on a store event),
//!   beside the whole-device diff for the same change as the in-run reference;
//! - time to decode and merge a GET_DEVICE dump of N peers (4 KiB parts).
//!
//! Run: `cargo bench --bench netlink_encode`. The size table is printed first.

use std::{
    collections::HashMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use criterion::{BenchmarkId, Criterion};
use lemonade_nexus_netlink::{
    Capabilities, DeviceConfig, DeviceDiff, DeviceState, Key, PeerChange, PeerConfig, PeerState,
    PrefixOwners, diff, diff_peer,
    kernel::{
        dump::merge_dump_bytes,
        encode::{
            Budget, PeerEntry, allowed_ip, encode_diff, encode_one_peer_per_message, pack, to_bytes,
        },
        wire::{WireguardAttribute, WireguardCmd, WireguardPeerAttribute},
    },
    model::IpNet,
};

const SIZES: [u32; 3] = [1_000, 10_000, 50_000];
const IFNAME: &str = "wg0";

fn key(i: u32) -> Key {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    k[31] = 0x5a;
    Key(k)
}

/// A typical mesh peer: one IPv4 /32, one IPv6 /128, an endpoint, keepalive 25.
fn mesh_peer(i: u32) -> PeerConfig {
    let v4 = Ipv4Addr::from(0x6440_0000 + i); // 100.64.0.0/10
    let v6 = Ipv6Addr::from((0xfd7a_115c_a1e0_u128 << 80) | u128::from(i));
    PeerConfig {
        public_key: key(i),
        preshared_key: None,
        endpoint: Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(0xc000_0200 + i % 256)),
            51820,
        )),
        persistent_keepalive: Some(25),
        allowed_ips: vec![
            IpNet::new(IpAddr::V4(v4), 32).expect("v4"),
            IpNet::new(IpAddr::V6(v6), 128).expect("v6"),
        ],
    }
}

fn config(n: u32) -> DeviceConfig {
    DeviceConfig {
        private_key: None,
        listen_port: Some(51820),
        fwmark: None,
        peers: (0..n).map(mesh_peer).collect(),
    }
}

fn state(config: &DeviceConfig) -> DeviceState {
    DeviceState {
        listen_port: 51820,
        peers: config
            .peers
            .iter()
            .map(|p| PeerState::from_config(p.clone()))
            .collect(),
        ..Default::default()
    }
}

fn full_diff(n: u32) -> DeviceDiff {
    diff(&DeviceState::default(), &config(n), Capabilities::default()).expect("valid")
}

fn bytes_of(msgs: Vec<lemonade_nexus_netlink::kernel::encode::WireguardMessage>) -> (usize, usize) {
    let count = msgs.len();
    let bytes = msgs.into_iter().map(|m| to_bytes(m, 0x1d, 0).len()).sum();
    (count, bytes)
}

fn report_sizes() {
    println!("\nProgramming N mesh peers into an empty device (netlink messages and bytes):");
    println!(
        "{:>7} | {:>16} {:>12} | {:>17} {:>12} | {:>9}",
        "N", "packed 4KiB msgs", "bytes", "one-per-peer msgs", "bytes", "msg ratio"
    );
    for n in SIZES {
        let d = full_diff(n);
        let (pm, pb) = bytes_of(encode_diff(IFNAME, &d, Budget::default()).expect("encodes"));
        let (om, ob) = bytes_of(encode_one_peer_per_message(IFNAME, &d).expect("encodes"));
        println!(
            "{n:>7} | {pm:>16} {pb:>12} | {om:>17} {ob:>12} | {:>8.1}x",
            om as f64 / pm as f64
        );
    }
    println!();
}

fn bench_full(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_full_config");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for n in SIZES {
        let d = full_diff(n);
        g.bench_with_input(BenchmarkId::new("packed_4KiB", n), &d, |b, d| {
            b.iter(|| bytes_of(encode_diff(IFNAME, black_box(d), Budget::default()).expect("ok")))
        });
        g.bench_with_input(BenchmarkId::new("one_peer_per_message", n), &d, |b, d| {
            b.iter(|| bytes_of(encode_one_peer_per_message(IFNAME, black_box(d)).expect("ok")))
        });
    }
    g.finish();
}

fn bench_incremental(c: &mut Criterion) {
    let caps = Capabilities::default();
    let mut g = c.benchmark_group("incremental_change");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for n in SIZES {
        let desired_cfg = config(n);
        // What the controller keeps: desired and last-read peers by key, and the prefix owners.
        let desired: HashMap<Key, PeerConfig> = desired_cfg
            .peers
            .iter()
            .map(|p| (p.public_key, p.clone()))
            .collect();
        let actual = desired.clone();
        let mut owners = PrefixOwners::from_config(&desired_cfg).expect("valid");
        let newcomer = mesh_peer(n + 1);
        let victim = key(n / 2);
        let mut moved = desired[&key(n / 3)].clone();
        moved.endpoint = Some("198.51.100.9:4242".parse().expect("ep"));

        let encode_one = |change: PeerChange| {
            let d = DeviceDiff {
                peers: vec![change],
                ..Default::default()
            };
            bytes_of(encode_diff(IFNAME, &d, Budget::default()).expect("ok"))
        };

        g.bench_function(BenchmarkId::new("add_one_peer", n), |b| {
            b.iter(|| {
                owners.upsert(None, &newcomer).expect("no conflict");
                let change = diff_peer(actual.get(&newcomer.public_key), Some(&newcomer), caps)
                    .expect("a change");
                let out = encode_one(change);
                owners.remove(&newcomer); // undo for the next iteration
                out
            })
        });
        g.bench_function(BenchmarkId::new("remove_one_peer", n), |b| {
            b.iter(|| {
                let change = diff_peer(actual.get(&victim), None, caps).expect("a change");
                encode_one(change)
            })
        });
        g.bench_function(BenchmarkId::new("change_one_endpoint", n), |b| {
            b.iter(|| {
                owners
                    .upsert(desired.get(&moved.public_key), &moved)
                    .expect("no conflict");
                let change =
                    diff_peer(actual.get(&moved.public_key), Some(&moved), caps).expect("a change");
                encode_one(change)
            })
        });
        // Reference: the whole-device diff for the same endpoint change (linear in N).
        let actual_state = state(&desired_cfg);
        let mut changed_cfg = desired_cfg.clone();
        changed_cfg.peers[(n / 3) as usize] = moved.clone();
        g.bench_function(BenchmarkId::new("whole_device_diff_one_endpoint", n), |b| {
            b.iter(|| {
                let d = diff(black_box(&actual_state), &changed_cfg, caps).expect("valid");
                assert_eq!(d.peers.len(), 1);
                bytes_of(encode_diff(IFNAME, &d, Budget::default()).expect("ok"))
            })
        });
    }
    g.finish();
}

/// A GET_DEVICE dump of N mesh peers, shaped like the kernel's (all peer attributes, counters)
/// and cut into 4 KiB parts, as bytes.
fn dump_parts(n: u32) -> Vec<Vec<u8>> {
    let first = vec![
        WireguardAttribute::ListenPort(51820),
        WireguardAttribute::Fwmark(0),
    ];
    let entries = (0..n).map(|i| {
        let p = mesh_peer(i);
        let mut attrs = vec![
            WireguardPeerAttribute::PublicKey(p.public_key.0),
            WireguardPeerAttribute::PresharedKey([0; 32]),
            WireguardPeerAttribute::PersistentKeepalive(25),
            WireguardPeerAttribute::TxBytes(u64::from(i)),
            WireguardPeerAttribute::RxBytes(u64::from(i)),
            WireguardPeerAttribute::ProtocolVersion(1),
        ];
        if let Some(ep) = p.endpoint {
            attrs.push(WireguardPeerAttribute::Endpoint(ep));
        }
        PeerEntry {
            first: attrs,
            continuation: vec![WireguardPeerAttribute::PublicKey(p.public_key.0)],
            allowed_ips: p.allowed_ips.iter().map(|n| allowed_ip(n, false)).collect(),
        }
    });
    pack(
        WireguardCmd::GetDevice,
        &[],
        first,
        entries,
        Budget::default(),
    )
    .expect("packs")
    .into_iter()
    .enumerate()
    .map(|(i, m)| to_bytes(m, 0x1d, i as u32))
    .collect()
}

fn bench_dump(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_and_merge_dump");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for n in SIZES {
        let parts = dump_parts(n);
        g.bench_with_input(BenchmarkId::new("peers", n), &parts, |b, parts| {
            b.iter(|| {
                let s = merge_dump_bytes(parts.iter().map(Vec::as_slice)).expect("merges");
                assert_eq!(s.peers.len(), n as usize);
                s
            })
        });
    }
    g.finish();
}

fn main() {
    report_sizes();
    let mut c = Criterion::default().configure_from_args();
    bench_full(&mut c);
    bench_incremental(&mut c);
    bench_dump(&mut c);
    c.final_summary();
}
