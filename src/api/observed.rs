//! What this server sees of its devices on its own client-plane WireGuard device: each peer's
//! endpoint (the source address of its packets, after any NAT on the way: the address another
//! device can send to) and the time of its last handshake.
//!
//! * **Liveness.** A device is *online* when its last handshake with this server is less than
//!   [`ONLINE_WITHIN_MS`] old: WireGuard starts a new handshake every 2 minutes while packets
//!   flow (the agent's keepalive every 25 s is such a packet), so a live device is never more
//!   than about 2 minutes past its last one. Kept in memory ([`Observations`]), shown by
//!   `GET /api/mesh/status`; it is not replicated (a handshake every 2 minutes per device would
//!   grow the log for nothing).
//! * **Server-observed endpoints.** Behind NAT, the endpoint a device reports (its own socket
//!   address) is private; the endpoint this server sees is the NAT's mapping. With an
//!   endpoint-independent mapping (most home routers, Linux masquerade) that mapping also
//!   reaches the device from other peers, so [`endpoint_ops`] records it on the device's node
//!   (metadata [`OBSERVED_ENDPOINT_KEY`], reserved: no client can set it) and
//!   `GET /api/mesh/peers` hands it to the device's peers in preference to the reported one.
//!   Recorded only when it changed, at most once per device per [`ENDPOINT_HOLD_MS`] (a roaming
//!   device does not flood the log), at most [`MAX_ENDPOINT_OPS`] per round, all of a round in
//!   one batch (one transaction).
//!
//! [`endpoint_ops`] and [`is_online`] are pure (time is an argument); [`record`] is the thin IO
//! part the server's dataplane loop calls with each dump (every [`OBSERVE_EVERY`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use lemonade_nexus_netlink::DeviceState;

use super::ApiState;
use crate::op::OpBody;
use crate::state::State;
use crate::store::Submitted;
use crate::tree::{NodeField, NodeId, NodeKind, TreeOp, WgKey};

/// Online: a handshake with this server less than this long ago (WireGuard re-handshakes every
/// 120 s while packets flow; 180 s leaves room for one lost attempt).
pub const ONLINE_WITHIN_MS: u64 = 180_000;
/// How often the server dumps its client-plane device to observe endpoints and handshakes.
pub const OBSERVE_EVERY: Duration = Duration::from_secs(5);
/// At most one recorded endpoint change per device per this long.
pub const ENDPOINT_HOLD_MS: u64 = 30_000;
/// At most this many endpoint ops per observation round (the rest wait for the next round).
pub const MAX_ENDPOINT_OPS: usize = 256;
/// The node metadata key holding the server-observed endpoint (`ip:port`).
pub const OBSERVED_ENDPOINT_KEY: &str = "ln:observed-endpoint";

/// One peer of the device as last dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSeen {
    pub endpoint: Option<SocketAddr>,
    /// Unix ms of the last handshake; `None`: never.
    pub last_handshake_ms: Option<u64>,
}

/// The last dump of the device, and when each node's endpoint was last recorded.
#[derive(Debug, Default)]
pub struct Observations {
    /// Unix ms of the dump; 0: never dumped (no dataplane, or not yet).
    pub at_ms: u64,
    pub peers: HashMap<WgKey, PeerSeen>,
    /// The hold-down of [`ENDPOINT_HOLD_MS`]: when this server last recorded each node's endpoint.
    recorded_at: HashMap<NodeId, u64>,
}

impl Observations {
    /// Replaces the peers with a fresh dump taken at `now_ms`.
    pub fn update(&mut self, dump: &DeviceState, now_ms: u64) {
        self.at_ms = now_ms;
        self.peers = dump
            .peers
            .iter()
            .map(|p| {
                let seen = PeerSeen {
                    endpoint: p.config.endpoint,
                    last_handshake_ms: p.last_handshake.map(unix_ms),
                };
                (WgKey(p.config.public_key.0), seen)
            })
            .collect();
        // A hold-down that has run out no longer matters.
        self.recorded_at
            .retain(|_, at| now_ms.saturating_sub(*at) < ENDPOINT_HOLD_MS);
    }

    /// What the last dump says of `key`, if it listed that peer.
    pub fn peer(&self, key: &WgKey) -> Option<PeerSeen> {
        self.peers.get(key).copied()
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Online: a handshake less than [`ONLINE_WITHIN_MS`] before `now_ms` (a handshake "in the
/// future", after a clock step, counts as just now).
pub fn is_online(last_handshake_ms: Option<u64>, now_ms: u64) -> bool {
    last_handshake_ms.is_some_and(|h| now_ms.saturating_sub(h) < ONLINE_WITHIN_MS)
}

/// The endpoint a node's peers should use: the server-observed one if recorded, else the one
/// the device reported.
pub fn best_endpoint(node: &crate::tree::Node) -> Option<String> {
    node.metadata
        .get(OBSERVED_ENDPOINT_KEY)
        .cloned()
        .or_else(|| node.endpoint.clone())
}

/// The endpoint changes to record (pure): for each enrolled device this server sees online with
/// an endpoint different from the one recorded on its node, and whose last recording is at least
/// [`ENDPOINT_HOLD_MS`] old, one metadata update; at most [`MAX_ENDPOINT_OPS`], in node order.
pub fn endpoint_ops(state: &State, obs: &Observations, now_ms: u64) -> Vec<(NodeId, OpBody)> {
    let mut out = Vec::new();
    for n in state.tree().nodes() {
        if out.len() >= MAX_ENDPOINT_OPS {
            break;
        }
        if n.kind != NodeKind::Endpoint {
            continue;
        }
        let Some(seen) = n.wg_pubkey.and_then(|k| obs.peer(&k)) else {
            continue;
        };
        let Some(endpoint) = seen.endpoint else {
            continue;
        };
        if !is_online(seen.last_handshake_ms, now_ms) {
            continue;
        }
        let endpoint = endpoint.to_string();
        if n.metadata.get(OBSERVED_ENDPOINT_KEY) == Some(&endpoint) {
            continue;
        }
        let held = obs
            .recorded_at
            .get(&n.id)
            .is_some_and(|at| now_ms.saturating_sub(*at) < ENDPOINT_HOLD_MS);
        if held {
            continue;
        }
        out.push((
            n.id,
            OpBody::Tree(TreeOp::Update {
                node: n.id,
                field: NodeField::Metadata {
                    key: OBSERVED_ENDPOINT_KEY.to_owned(),
                    value: Some(endpoint),
                },
            }),
        ));
    }
    out
}

/// Takes in a dump of the client-plane device taken at `now_ms`: keeps it for liveness, and
/// appends (as this server, in one batch) the endpoint changes [`endpoint_ops`] finds. Returns
/// how many were recorded.
pub fn record(state: &ApiState, dump: &DeviceState, now_ms: u64) -> Result<usize, String> {
    // Lock order, everywhere: the store, then the observations.
    let mut store = state.lock_store();
    let mut obs = state.observations.lock().unwrap_or_else(|p| p.into_inner());
    obs.update(dump, now_ms);
    let ops = endpoint_ops(store.state(), &obs, now_ms);
    if ops.is_empty() {
        return Ok(0);
    }
    let server = state.server.public();
    let (nodes, bodies): (Vec<NodeId>, Vec<OpBody>) = ops.into_iter().unzip();
    let batch = bodies.into_iter().map(|b| (server, b, None)).collect();
    let results = store
        .append_local_batch(&state.server, batch, now_ms)
        .map_err(|e| e.to_string())?;
    state.state_changed();
    let mut recorded = 0;
    for (node, r) in nodes.into_iter().zip(results) {
        // Held down either way: a refused update is not retried every round.
        obs.recorded_at.insert(node, now_ms);
        match r {
            Ok(Submitted::Appended { effect: Ok(()), .. }) => recorded += 1,
            Ok(other) => tracing::warn!(node = %node, ?other, "observed endpoint not recorded"),
            Err(e) => tracing::warn!(node = %node, error = %e, "observed endpoint not recorded"),
        }
    }
    Ok(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::join::{JoinRequest, Registration, plan_join};
    use crate::hlc::Hlc;
    use crate::identity::NodeKey;
    use crate::keys::PublicKey;
    use proptest::prelude::*;

    use crate::testkit::apply_all;

    /// A state with devices 2 and 3 enrolled (WireGuard keys [2; 32], [3; 32]).
    fn enrolled() -> (State, PublicKey, u64, Vec<NodeId>) {
        let me = NodeKey::from_seed(&[1; 32]).public();
        let mut state = State::new(me);
        let mut seq = 0;
        let mut nodes = Vec::new();
        for c in [2u8, 3] {
            let req = JoinRequest {
                client: NodeKey::from_seed(&[c; 32]).public(),
                wg_pubkey: WgKey([c; 32]),
                hostname: None,
            };
            let plan = plan_join(
                &state,
                &me,
                seq + 1,
                &req,
                Registration::Open,
                Hlc::default(),
            )
            .expect("plan");
            nodes.push(plan.node);
            apply_all(&mut state, &me, &mut seq, plan.ops);
        }
        (state, me, seq, nodes)
    }

    fn seen(endpoint: &str, handshake_ms: Option<u64>) -> PeerSeen {
        PeerSeen {
            endpoint: Some(endpoint.parse().expect("addr")),
            last_handshake_ms: handshake_ms,
        }
    }

    #[test]
    fn online_means_a_handshake_less_than_180_s_ago() {
        assert!(!is_online(None, 1_000_000));
        assert!(is_online(Some(1_000_000 - 179_999), 1_000_000));
        assert!(!is_online(Some(1_000_000 - 180_000), 1_000_000));
        // A handshake after "now" (clock step back) is just now.
        assert!(is_online(Some(2_000_000), 1_000_000));
    }

    #[test]
    fn a_changed_endpoint_is_recorded_once_then_held_down() {
        let (mut state, me, mut seq, nodes) = enrolled();
        let now = 10_000_000;
        let mut obs = Observations::default();
        obs.peers.insert(
            WgKey([2; 32]),
            seen("198.51.100.7:40001", Some(now - 5_000)),
        );
        // Device 3 never shook hands: nothing to record for it.
        obs.peers.insert(
            WgKey([3; 32]),
            PeerSeen {
                endpoint: None,
                last_handshake_ms: None,
            },
        );
        let ops = endpoint_ops(&state, &obs, now);
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].0, nodes[0]);
        apply_all(&mut state, &me, &mut seq, vec![ops[0].1.clone()]);
        obs.recorded_at.insert(nodes[0], now);
        let node = state.tree().get(&nodes[0]).expect("node").clone();
        assert_eq!(best_endpoint(&node).as_deref(), Some("198.51.100.7:40001"));

        // Unchanged: nothing more.
        assert!(endpoint_ops(&state, &obs, now + 60_000).is_empty());
        // The NAT remaps: held down for ENDPOINT_HOLD_MS after the last recording, then recorded.
        obs.peers.insert(
            WgKey([2; 32]),
            seen("198.51.100.7:40002", Some(now + 1_000)),
        );
        assert!(endpoint_ops(&state, &obs, now + ENDPOINT_HOLD_MS - 1).is_empty());
        assert_eq!(endpoint_ops(&state, &obs, now + ENDPOINT_HOLD_MS).len(), 1);
        // Offline (last handshake too old): its endpoint is not trusted any more.
        assert!(endpoint_ops(&state, &obs, now + 1_000 + ONLINE_WITHIN_MS).is_empty());
    }

    #[test]
    fn the_observed_endpoint_wins_over_the_reported_one() {
        let (state, _, _, nodes) = enrolled();
        let mut node = state.tree().get(&nodes[0]).expect("node").clone();
        assert_eq!(best_endpoint(&node), None);
        node.endpoint = Some("10.1.0.2:51820".into());
        assert_eq!(best_endpoint(&node).as_deref(), Some("10.1.0.2:51820"));
        node.metadata
            .insert(OBSERVED_ENDPOINT_KEY.into(), "203.0.113.5:51820".into());
        assert_eq!(best_endpoint(&node).as_deref(), Some("203.0.113.5:51820"));
    }

    proptest! {
        /// Whatever the dump says, the ops are bounded, name only enrolled devices seen online,
        /// each at most once, and each records exactly what the dump says.
        #[test]
        fn endpoint_ops_are_bounded_and_faithful(
            ports in proptest::collection::vec((any::<u16>(), proptest::option::of(0u64..400_000)), 0..4),
            now in 400_000u64..1_000_000,
        ) {
            let (state, _, _, _) = enrolled();
            let mut obs = Observations::default();
            for (i, (port, age)) in ports.iter().enumerate() {
                let key = WgKey([i as u8 + 2; 32]);
                obs.peers.insert(key, PeerSeen {
                    endpoint: Some(SocketAddr::from(([192, 0, 2, 1], *port))),
                    last_handshake_ms: age.map(|a| now - a),
                });
            }
            let ops = endpoint_ops(&state, &obs, now);
            prop_assert!(ops.len() <= 2);
            let mut nodes: Vec<_> = ops.iter().map(|(n, _)| *n).collect();
            nodes.dedup();
            prop_assert_eq!(nodes.len(), ops.len());
            for (node, body) in &ops {
                let key = state.tree().get(node).and_then(|n| n.wg_pubkey).expect("device");
                let s = obs.peer(&key).expect("seen");
                prop_assert!(is_online(s.last_handshake_ms, now));
                let OpBody::Tree(TreeOp::Update { field: NodeField::Metadata { value, .. }, .. }) = body else {
                    panic!("not a metadata update: {body:?}");
                };
                prop_assert_eq!(value.clone(), s.endpoint.map(|e| e.to_string()));
            }
        }
    }
}
