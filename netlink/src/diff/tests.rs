use proptest::prelude::*;

use super::*;
use crate::testutil::{arb_config, arb_state, key, net, peer, state_from};

/// True when `state` is what `desired` asks for, with the diff's "unset means leave it" rule.
fn conforms(state: &DeviceState, desired: &DeviceConfig) -> Result<(), String> {
    if let Some(k) = &desired.private_key
        && state.private_key.as_ref().map(PrivateKey::clamped) != Some(k.clamped())
    {
        return Err("private key".into());
    }
    if desired.listen_port.is_some_and(|p| p != state.listen_port) {
        return Err("listen port".into());
    }
    if desired.fwmark.is_some_and(|m| m != state.fwmark) {
        return Err("fwmark".into());
    }
    if state.peers.len() != desired.peers.len() {
        return Err(format!(
            "{} peers, want {}",
            state.peers.len(),
            desired.peers.len()
        ));
    }
    for want in &desired.peers {
        let have = state
            .peers
            .iter()
            .find(|p| p.config.public_key == want.public_key)
            .ok_or_else(|| format!("peer {} missing", want.public_key))?;
        let have = &have.config;
        if canonical_allowed_ips(&have.allowed_ips) != canonical_allowed_ips(&want.allowed_ips) {
            return Err(format!(
                "allowed ips of {}: {:?}",
                want.public_key, have.allowed_ips
            ));
        }
        if psk(&have.preshared_key) != psk(&want.preshared_key) {
            return Err("psk".into());
        }
        if keepalive(have.persistent_keepalive) != keepalive(want.persistent_keepalive) {
            return Err("keepalive".into());
        }
        if want.endpoint.is_some() && want.endpoint != have.endpoint {
            return Err("endpoint".into());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn diff_then_apply_reaches_desired_and_rediff_is_empty(
        actual in arb_state(),
        desired in arb_config(),
        removal in any::<bool>(),
    ) {
        let caps = Capabilities { allowed_ip_removal: removal };
        let d = diff(&actual, &desired, caps).expect("valid desired state");
        let applied = apply(&actual, &d);
        prop_assert_eq!(conforms(&applied, &desired), Ok(()));
        let again = diff(&applied, &desired, caps).expect("valid desired state");
        prop_assert!(again.is_empty(), "second diff not empty: {:?}", again);
        if !removal {
            for change in &d.peers {
                if let PeerChange::Update(u) = change
                    && let AllowedIpsChange::Incremental { remove, .. } = &u.allowed_ips
                {
                    prop_assert!(remove.is_empty(), "per-prefix removal without capability");
                }
            }
        }
        // Removals come first, additions last.
        let rank = |c: &PeerChange| match c {
            PeerChange::Remove(_) => 0,
            PeerChange::Update(_) => 1,
            PeerChange::Add(_) => 2,
        };
        prop_assert!(d.peers.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])));
    }

    /// The per-peer diff agrees with the whole-device diff, peer by peer.
    #[test]
    fn diff_peer_agrees_with_diff(
        actual in arb_state(),
        desired in arb_config(),
        removal in any::<bool>(),
    ) {
        let caps = Capabilities { allowed_ip_removal: removal };
        let whole = diff(&actual, &desired, caps).expect("valid");
        let mut keys: Vec<Key> = actual.peers.iter().map(|p| p.config.public_key).collect();
        keys.extend(desired.peers.iter().map(|p| p.public_key));
        keys.sort();
        keys.dedup();
        for k in keys {
            let have = actual.peers.iter().find(|p| p.config.public_key == k).map(|p| &p.config);
            let want = desired.peers.iter().find(|p| p.public_key == k);
            let one = diff_peer(have, want, caps);
            let from_whole = whole.peers.iter().find(|c| *c.public_key() == k).cloned();
            prop_assert_eq!(one, from_whole);
        }
    }

    /// Building the owner index peer by peer accepts exactly the states `diff` accepts.
    #[test]
    fn prefix_owners_incremental_matches_whole_check(
        desired in arb_config(),
        extra in arb_config(),
    ) {
        let mut owners = PrefixOwners::from_config(&desired).expect("valid");
        for p in &extra.peers {
            let old = desired.peers.iter().find(|d| d.public_key == p.public_key);
            let mut next = desired.clone();
            next.peers.retain(|d| d.public_key != p.public_key);
            next.peers.push(p.clone());
            let whole = check_desired(&next);
            let mut trial = owners.clone();
            let incremental = trial.upsert(old, p);
            prop_assert_eq!(whole.is_ok(), incremental.is_ok(), "{:?} vs {:?}", whole, incremental);
        }
        if let Some(p) = desired.peers.first() {
            owners.remove(p);
            for n in &p.allowed_ips {
                prop_assert_eq!(owners.owner(n), None);
            }
        }
    }

    #[test]
    fn diff_of_a_state_against_itself_is_empty(desired in arb_config()) {
        let caps = Capabilities::default();
        let d = diff(&state_from(&desired), &desired, caps).expect("valid");
        prop_assert!(d.is_empty(), "{:?}", d);
    }
}

#[test]
fn duplicate_prefix_is_refused_naming_both_peers_and_the_prefix() {
    let desired = DeviceConfig {
        peers: vec![peer(1, &["10.0.0.0/24"]), peer(2, &["10.0.0.7/24"])],
        ..Default::default()
    };
    let err = diff(&DeviceState::default(), &desired, Capabilities::default())
        .expect_err("duplicate prefix must be refused");
    assert_eq!(
        err,
        DesiredStateError::DuplicateAllowedIp {
            prefix: net("10.0.0.0/24"),
            first: key(1),
            second: key(2)
        }
    );
    let msg = err.to_string();
    assert!(msg.contains("10.0.0.0/24"), "{msg}");
    assert!(
        msg.contains(&key(1).to_string()) && msg.contains(&key(2).to_string()),
        "{msg}"
    );
}

#[test]
fn same_prefix_twice_in_one_peer_is_fine_and_different_lengths_are_distinct() {
    let desired = DeviceConfig {
        peers: vec![
            peer(1, &["10.0.0.0/24", "10.0.0.1/24"]),
            peer(2, &["10.0.0.0/25"]),
        ],
        ..Default::default()
    };
    let d = diff(&DeviceState::default(), &desired, Capabilities::default()).expect("valid");
    assert_eq!(d.peers.len(), 2);
    assert_eq!(d.peers[0], PeerChange::Add(peer(1, &["10.0.0.0/24"])));
}

#[test]
fn duplicate_peer_is_refused() {
    let desired = DeviceConfig {
        peers: vec![peer(1, &[]), peer(1, &[])],
        ..Default::default()
    };
    assert_eq!(
        diff(&DeviceState::default(), &desired, Capabilities::default()),
        Err(DesiredStateError::DuplicatePeer(key(1)))
    );
}

#[test]
fn removed_prefix_uses_per_prefix_removal_only_when_supported() {
    let actual = state_from(&DeviceConfig {
        peers: vec![peer(1, &["10.0.0.0/24", "10.0.1.0/24"])],
        ..Default::default()
    });
    let desired = DeviceConfig {
        peers: vec![peer(1, &["10.0.1.0/24", "10.0.2.0/24"])],
        ..Default::default()
    };
    let with = diff(
        &actual,
        &desired,
        Capabilities {
            allowed_ip_removal: true,
        },
    )
    .expect("valid");
    let PeerChange::Update(u) = &with.peers[0] else {
        panic!("want update: {with:?}")
    };
    assert_eq!(
        u.allowed_ips,
        AllowedIpsChange::Incremental {
            remove: vec![net("10.0.0.0/24")],
            add: vec![net("10.0.2.0/24")]
        }
    );
    let without = diff(&actual, &desired, Capabilities::default()).expect("valid");
    let PeerChange::Update(u) = &without.peers[0] else {
        panic!("want update: {without:?}")
    };
    assert_eq!(
        u.allowed_ips,
        AllowedIpsChange::Replace(vec![net("10.0.1.0/24"), net("10.0.2.0/24")])
    );
}

#[test]
fn only_additions_never_replace() {
    let actual = state_from(&DeviceConfig {
        peers: vec![peer(1, &["10.0.0.0/24"])],
        ..Default::default()
    });
    let desired = DeviceConfig {
        peers: vec![peer(1, &["10.0.0.0/24", "10.0.2.0/24"])],
        ..Default::default()
    };
    let d = diff(&actual, &desired, Capabilities::default()).expect("valid");
    let PeerChange::Update(u) = &d.peers[0] else {
        panic!("want update: {d:?}")
    };
    assert_eq!(
        u.allowed_ips,
        AllowedIpsChange::Incremental {
            remove: vec![],
            add: vec![net("10.0.2.0/24")]
        }
    );
}

#[test]
fn unset_endpoint_keeps_learned_endpoint_and_zero_psk_means_none() {
    let mut have = peer(1, &[]);
    have.endpoint = Some("192.0.2.9:4000".parse().expect("addr"));
    have.preshared_key = Some(PrivateKey(Key([0; 32])));
    have.persistent_keepalive = Some(0);
    let actual = state_from(&DeviceConfig {
        peers: vec![have],
        ..Default::default()
    });
    let desired = DeviceConfig {
        peers: vec![peer(1, &[])],
        ..Default::default()
    };
    let d = diff(&actual, &desired, Capabilities::default()).expect("valid");
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn changes_are_ordered_and_minimal() {
    let actual = state_from(&DeviceConfig {
        listen_port: Some(51820),
        peers: vec![
            peer(1, &["10.0.1.0/24"]),
            peer(2, &["10.0.2.0/24"]),
            peer(3, &[]),
        ],
        ..Default::default()
    });
    let mut changed = peer(2, &["10.0.2.0/24"]);
    changed.endpoint = Some("192.0.2.2:51820".parse().expect("addr"));
    changed.persistent_keepalive = Some(25);
    let desired = DeviceConfig {
        listen_port: Some(51820),
        peers: vec![peer(3, &[]), changed, peer(4, &["10.0.4.0/24"])],
        ..Default::default()
    };
    let d = diff(&actual, &desired, Capabilities::default()).expect("valid");
    assert!(!d.has_device_changes());
    assert_eq!(
        d.peers,
        vec![
            PeerChange::Remove(key(1)),
            PeerChange::Update(PeerUpdate {
                public_key: key(2),
                preshared_key: None,
                endpoint: Some("192.0.2.2:51820".parse().expect("addr")),
                persistent_keepalive: Some(25),
                allowed_ips: AllowedIpsChange::Unchanged,
            }),
            PeerChange::Add(peer(4, &["10.0.4.0/24"])),
        ]
    );
}

#[test]
fn apply_moves_a_prefix_like_the_kernel() {
    let actual = state_from(&DeviceConfig {
        peers: vec![peer(1, &["10.0.0.0/24"]), peer(2, &[])],
        ..Default::default()
    });
    let desired = DeviceConfig {
        peers: vec![peer(1, &[]), peer(2, &["10.0.0.0/24"])],
        ..Default::default()
    };
    // Whatever the order, peer 1 ends without the prefix.
    for caps in [
        Capabilities::default(),
        Capabilities {
            allowed_ip_removal: true,
        },
    ] {
        let d = diff(&actual, &desired, caps).expect("valid");
        let mut reversed = d.clone();
        reversed.peers.reverse();
        for dd in [d, reversed] {
            assert_eq!(conforms(&apply(&actual, &dd), &desired), Ok(()));
        }
    }
}

#[test]
fn private_keys_compare_clamped_like_the_kernel_stores_them() {
    let raw = PrivateKey(Key([7; 32]));
    let actual = DeviceState {
        private_key: Some(raw.clamped()),
        ..Default::default()
    };
    let desired = DeviceConfig {
        private_key: Some(raw),
        ..Default::default()
    };
    assert!(
        diff(&actual, &desired, Capabilities::default())
            .expect("valid")
            .is_empty()
    );
    let other = DeviceConfig {
        private_key: Some(PrivateKey(Key([8; 32]))),
        ..Default::default()
    };
    let d = diff(&actual, &other, Capabilities::default()).expect("valid");
    assert_eq!(d.private_key, Some(PrivateKey(Key([8; 32])).clamped()));
}
