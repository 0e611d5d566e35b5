//! Join: what the server appends to the log when an authenticated device joins.
//!
//! [`plan_join`] is pure: from the state, the server's key, the next seq of its log and the
//! authenticated client, it returns the ops to append (all authored by the server, which holds
//! `add_child`/`admin`/`allocate_ip` on the root) and the node the device will be.
//!
//! * A device already in the tree (an endpoint whose owner is the client key) keeps its node and
//!   its address: rejoining is idempotent. A changed WireGuard key is updated; a missing lease
//!   (lost in a partition merge) is proposed again.
//! * A new device under **open** registration gets its own customer group directly under the
//!   root (`group-<hash of key>`), a grant on that group (read, write, add_child, edit_node,
//!   delete_node, connect_private: its own subtree, nothing above it), an endpoint node owned by
//!   its key, and a tunnel address from the IPAM proposal functions.
//! * Under **closed** registration a new device is refused, unless it brings a setup key: then
//!   it joins the key's group, open or closed ([`crate::api::private::setup_keys`]).
//!
//! Nobody becomes an administrator by joining: the first administrator is set at genesis
//! (`serve --admin-key`), never by the first joiner (inventory §13.1).

use ring::digest::{SHA256, digest};

use crate::hlc::Hlc;
use crate::ipam::{IpamError, IpamOp};
use crate::keys::PublicKey;
use crate::op::OpBody;
use crate::state::State;
use crate::tree::{NodeField, NodeId, NodeKind, Permission, Permissions, Tree, TreeOp, WgKey};

/// Whether unknown devices may join.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Any device that proves its key joins, in its own customer group.
    #[default]
    Open,
    /// Only devices already in the tree may (re)join.
    Closed,
}

/// What a joining device asked for (already authenticated).
#[derive(Clone, Debug)]
pub struct JoinRequest {
    pub client: PublicKey,
    pub wg_pubkey: WgKey,
    /// A DNS label; `None` picks `device-<hash>`.
    pub hostname: Option<String>,
}

/// The ops to append and the node the device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinPlan {
    pub node: NodeId,
    pub group: NodeId,
    pub ops: Vec<OpBody>,
    /// True if the device was already in the tree.
    pub existing: bool,
}

/// Why a join cannot be planned. Each maps to a 4xx (or 503 for exhaustion).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("registration is closed: this device is not enrolled")]
    RegistrationClosed,
    #[error("hostname {0:?} is not a DNS label (letters, digits, hyphens; 1-63 characters)")]
    BadHostname(String),
    #[error("this WireGuard public key already belongs to another device")]
    WgKeyInUse,
    #[error("no tunnel address available: {0}")]
    Ipam(#[from] IpamError),
}

/// The permissions a device gets on its own group under open registration.
pub fn device_group_permissions() -> Permissions {
    use Permission::*;
    Permissions::of(&[Read, Write, AddChild, EditNode, DeleteNode, ConnectPrivate])
}

/// The endpoint node owned by `client`, if any.
pub fn find_device(tree: &Tree, client: &PublicKey) -> Option<NodeId> {
    tree.nodes()
        .find(|n| n.kind == NodeKind::Endpoint && n.owner.as_ref() == Some(client))
        .map(|n| n.id)
}

fn short_hash(tag: &[u8], key: &PublicKey) -> String {
    let mut m = tag.to_vec();
    m.extend_from_slice(key.as_bytes());
    hex::encode(&digest(&SHA256, &m).as_ref()[..6])
}

/// Plans the join (see the module docs). `next_seq` is the seq the first op will get in
/// `server`'s log; `now` is (a lower bound of) the HLC the ops will carry.
pub fn plan_join(
    state: &State,
    server: &PublicKey,
    next_seq: u64,
    req: &JoinRequest,
    registration: Registration,
    now: Hlc,
) -> Result<JoinPlan, JoinError> {
    if let Some(h) = &req.hostname
        && !crate::tree::is_dns_label(h)
    {
        return Err(JoinError::BadHostname(h.clone()));
    }
    let tree = state.tree();
    // One WireGuard key, one device: a peer's allowed IPs are keyed by its WireGuard key.
    let taken = tree
        .nodes()
        .any(|n| n.wg_pubkey == Some(req.wg_pubkey) && n.owner.as_ref() != Some(&req.client));
    if taken {
        return Err(JoinError::WgKeyInUse);
    }
    if let Some(node) = find_device(tree, &req.client) {
        let group = tree
            .get(&node)
            .and_then(|n| n.parent)
            .unwrap_or(NodeId::ROOT);
        let mut ops = Vec::new();
        if tree.get(&node).and_then(|n| n.wg_pubkey) != Some(req.wg_pubkey) {
            ops.push(OpBody::Tree(TreeOp::Update {
                node,
                field: NodeField::WgPublicKey(Some(req.wg_pubkey)),
            }));
        }
        if state.ipam().tunnel_address(&node).is_none() {
            ops.extend(lease(state, server, node, now)?);
        }
        return Ok(JoinPlan {
            node,
            group,
            ops,
            existing: true,
        });
    }
    if registration == Registration::Closed {
        return Err(JoinError::RegistrationClosed);
    }
    let group = NodeId::derive(server, next_seq);
    let node = NodeId::derive(server, next_seq + 2);
    let hostname = req
        .hostname
        .clone()
        .unwrap_or_else(|| format!("device-{}", short_hash(b"ln-device-name:v1", &req.client)));
    let mut ops = vec![
        OpBody::Tree(TreeOp::Create {
            parent: NodeId::ROOT,
            kind: NodeKind::Customer,
            hostname: format!("group-{}", short_hash(b"ln-group-name:v1", &req.client)),
            owner: Some(req.client),
            wg_pubkey: None,
        }),
        OpBody::Tree(TreeOp::Grant {
            node: group,
            key: req.client,
            permissions: device_group_permissions(),
        }),
        OpBody::Tree(TreeOp::Create {
            parent: group,
            kind: NodeKind::Endpoint,
            hostname,
            owner: Some(req.client),
            wg_pubkey: Some(req.wg_pubkey),
        }),
    ];
    ops.extend(lease(state, server, node, now)?);
    Ok(JoinPlan {
        node,
        group,
        ops,
        existing: false,
    })
}

fn lease(
    state: &State,
    server: &PublicKey,
    node: NodeId,
    now: Hlc,
) -> Result<Vec<OpBody>, JoinError> {
    Ok(state
        .ipam()
        .propose_lease(server, node, now)?
        .into_iter()
        .map(OpBody::Ipam)
        .collect::<Vec<_>>())
}

/// True if `op` is an IPAM block claim (useful to callers that count them).
pub fn is_block_claim(op: &OpBody) -> bool {
    matches!(op, OpBody::Ipam(IpamOp::ClaimBlock { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;
    use crate::op::Op;

    fn fold(state: &mut State, server: &PublicKey, seq0: u64, ops: &[OpBody], wall: u64) {
        for (i, body) in ops.iter().enumerate() {
            let op = Op {
                origin: *server,
                seq: seq0 + i as u64,
                hlc: Hlc {
                    wall_ms: wall,
                    logical: i as u32,
                },
                author: *server,
                body: body.clone(),
            };
            state.apply(&op).expect("plan applies");
        }
    }

    fn req(seed: u8) -> JoinRequest {
        JoinRequest {
            client: NodeKey::from_seed(&[seed; 32]).public(),
            wg_pubkey: WgKey([seed; 32]),
            hostname: None,
        }
    }

    /// The partition repair a client sees: two servers leased the same address in the same
    /// block while partitioned; after the merge the later claim loses with its lease, and the
    /// losing device's next join (its agent re-joins every round) gets a fresh address from
    /// a block its server holds, distinct from the winner's.
    #[test]
    fn a_device_whose_lease_lost_a_partition_conflict_is_re_leased_by_its_next_join() {
        use crate::ipam::IpamOp;
        let a = NodeKey::from_seed(&[1; 32]).public();
        let b = NodeKey::from_seed(&[4; 32]).public();
        let mut state = State::new(a);
        let at = |wall_ms| Hlc {
            wall_ms,
            logical: 0,
        };
        fold(&mut state, &a, 1, &[crate::testkit::grant_admin(b)], 500);
        // Both sides of the partition plan from the same state.
        let px = plan_join(&state, &a, 2, &req(2), Registration::Open, at(1_000)).expect("x");
        let py = plan_join(&state, &b, 1, &req(3), Registration::Open, at(1_000)).expect("y");
        let claim = |p: &JoinPlan| {
            p.ops.iter().find_map(|o| match o {
                OpBody::Ipam(IpamOp::ClaimBlock { block }) => Some(*block),
                _ => None,
            })
        };
        // Force the rare collision: B claims A's block and leases A's slot.
        let (block, slot) = (
            claim(&px).expect("x claims a block"),
            px.ops
                .iter()
                .find_map(|o| match o {
                    OpBody::Ipam(IpamOp::AllocateAddress { slot, .. }) => Some(*slot),
                    _ => None,
                })
                .expect("x leases"),
        );
        let y_ops: Vec<OpBody> = py
            .ops
            .iter()
            .map(|o| match o {
                OpBody::Ipam(IpamOp::ClaimBlock { .. }) => {
                    OpBody::Ipam(IpamOp::ClaimBlock { block })
                }
                OpBody::Ipam(IpamOp::AllocateAddress { node, .. }) => {
                    OpBody::Ipam(IpamOp::AllocateAddress { node: *node, slot })
                }
                o => o.clone(),
            })
            .collect();
        // The merge: A's ops sort first (lower HLC), so B's claim and lease have no effect.
        for (i, body) in px.ops.iter().enumerate() {
            let op = Op {
                origin: a,
                seq: 2 + i as u64,
                hlc: at(1_000 + i as u64),
                author: a,
                body: body.clone(),
            };
            state.apply(&op).expect("x applies");
        }
        for (i, body) in y_ops.iter().enumerate() {
            let op = Op {
                origin: b,
                seq: 1 + i as u64,
                hlc: at(2_000 + i as u64),
                author: b,
                body: body.clone(),
            };
            let refused = matches!(body, OpBody::Ipam(_));
            assert_eq!(state.apply(&op).is_err(), refused, "{body:?}");
        }
        let x_addr = state.ipam().tunnel_address(&px.node).expect("x kept it");
        assert_eq!(x_addr.slot, slot);
        assert_eq!(state.ipam().tunnel_address(&py.node), None, "y lost it");
        // y's agent re-joins through B: same node, a new lease in another block.
        let again = plan_join(
            &state,
            &b,
            1 + y_ops.len() as u64,
            &req(3),
            Registration::Open,
            at(3_000),
        )
        .expect("rejoin");
        assert!(again.existing);
        assert_eq!(again.node, py.node);
        assert_ne!(claim(&again), Some(block));
        fold(&mut state, &b, 1 + y_ops.len() as u64, &again.ops, 3_000);
        let y_addr = state.ipam().tunnel_address(&py.node).expect("y re-leased");
        assert_ne!(y_addr.v4, x_addr.v4);
    }

    #[test]
    fn open_registration_places_each_device_in_its_own_group_with_its_own_address() {
        let server = NodeKey::from_seed(&[1; 32]).public();
        let mut state = State::new(server);
        let now = Hlc {
            wall_ms: 1_000,
            logical: 0,
        };
        let p1 = plan_join(&state, &server, 1, &req(2), Registration::Open, now).expect("plan");
        fold(&mut state, &server, 1, &p1.ops, 1_000);
        let seq = 1 + p1.ops.len() as u64;
        let p2 = plan_join(&state, &server, seq, &req(3), Registration::Open, now).expect("plan");
        fold(&mut state, &server, seq, &p2.ops, 1_001);

        let tree = state.tree();
        let a = state.ipam().tunnel_address(&p1.node).expect("lease 1");
        let b = state.ipam().tunnel_address(&p2.node).expect("lease 2");
        assert_ne!(a.v4, b.v4);
        assert_ne!(p1.group, p2.group);
        assert_eq!(tree.get(&p1.node).and_then(|n| n.parent), Some(p1.group));
        assert_eq!(
            tree.get(&p1.group).and_then(|n| n.parent),
            Some(NodeId::ROOT)
        );
        // The device holds rights on its own group only, not on the root nor the other group.
        let c1 = req(2).client;
        assert!(crate::authz::authorize(tree, &c1, Permission::AddChild, p1.group).is_ok());
        assert!(crate::authz::authorize(tree, &c1, Permission::Read, NodeId::ROOT).is_err());
        assert!(crate::authz::authorize(tree, &c1, Permission::Read, p2.group).is_err());
        assert!(crate::authz::authorize(tree, &c1, Permission::AllocateIp, p1.node).is_err());

        // Rejoining changes nothing; a new WireGuard key is one update.
        let again =
            plan_join(&state, &server, 99, &req(2), Registration::Closed, now).expect("rejoin");
        assert_eq!(
            (again.node, again.existing, again.ops.len()),
            (p1.node, true, 0)
        );
        // Another device may not present a WireGuard key already in use.
        let mut thief = req(9);
        thief.wg_pubkey = req(2).wg_pubkey;
        assert_eq!(
            plan_join(&state, &server, 99, &thief, Registration::Open, now),
            Err(JoinError::WgKeyInUse)
        );
        let mut rekey = req(2);
        rekey.wg_pubkey = WgKey([77; 32]);
        let p = plan_join(&state, &server, 99, &rekey, Registration::Open, now).expect("rekey");
        assert_eq!(p.ops.len(), 1);
    }

    #[test]
    fn closed_registration_and_bad_hostnames_are_refused() {
        let server = NodeKey::from_seed(&[1; 32]).public();
        let state = State::new(server);
        let now = Hlc::default();
        assert_eq!(
            plan_join(&state, &server, 1, &req(2), Registration::Closed, now),
            Err(JoinError::RegistrationClosed)
        );
        let mut r = req(2);
        r.hostname = Some("not a label".into());
        assert!(matches!(
            plan_join(&state, &server, 1, &r, Registration::Open, now),
            Err(JoinError::BadHostname(_))
        ));
    }
}

// ---- HTTP ----

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::op::Op;
use crate::store::Submitted;

/// How long a join waits for the WireGuard peer to be programmed before answering anyway.
pub const PEER_SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// `POST /api/join` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    /// Proof of possession of the device key over a fresh challenge (see `auth`).
    /// Standard base64 with padding (RFC 4648 §4) of the signed envelope bytes (at most 64 KiB).
    #[schema(pattern = "^[A-Za-z0-9+/]*={0,2}$")]
    pub proof: String,
    /// The device's WireGuard (X25519) public key, base64.
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub wg_pubkey: String,
    /// A DNS label for the device.
    pub hostname: Option<String>,
    /// A setup key: joins the group it names, even under closed registration
    /// (see `api::private::setup_keys`).
    pub setup_key: Option<String>,
}

/// `POST /api/join` answer: everything the client needs to bring its tunnel up.
#[derive(Serialize, Deserialize, Debug, Clone, utoipa::ToSchema)]
pub struct JoinResponse {
    /// Base64url without padding (RFC 4648 §5) of the token envelope (about 300 characters).
    #[schema(pattern = "^[A-Za-z0-9_-]+$")]
    pub token: String,
    pub token_expires_at_ms: u64,
    pub node_id: String,
    pub group_id: String,
    /// True when the device was already enrolled (same node, same address).
    pub existing: bool,
    pub tunnel_ipv4: String,
    pub tunnel_ipv6: String,
    /// The device's interface addresses (`/32` and `/128`).
    pub addresses: Vec<String>,
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub server_wg_pubkey: String,
    /// `host:port` of the server's client-plane WireGuard socket.
    pub server_wg_endpoint: String,
    pub server_tunnel_ipv4: String,
    pub server_tunnel_ipv6: String,
    /// What the device routes to the server peer (the client-plane prefixes).
    pub allowed_ips: Vec<String>,
    pub dns_servers: Vec<String>,
    /// The private API, reachable only through the tunnel.
    pub private_api: String,
    /// The API certificate pin the client keeps using.
    pub tls_pin: Option<String>,
    /// Whether the server's WireGuard device had the peer when this answer was sent.
    pub peer_programmed: bool,
}

impl From<JoinError> for ApiError {
    fn from(e: JoinError) -> Self {
        match e {
            JoinError::RegistrationClosed => {
                ApiError::new(StatusCode::FORBIDDEN, "registration_closed", e.to_string())
            }
            JoinError::BadHostname(_) => ApiError::bad_request("bad_hostname", e.to_string()),
            JoinError::WgKeyInUse => {
                ApiError::new(StatusCode::CONFLICT, "wg_key_in_use", e.to_string())
            }
            JoinError::Ipam(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "address_pool_exhausted",
                e.to_string(),
            ),
        }
    }
}

/// The host part of a `Host` header value (`h`, `h:p`, `[v6]:p`).
pub(super) fn host_only(authority: &str) -> String {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_owned();
    }
    match authority.rsplit_once(':') {
        Some((h, _)) if !h.contains(':') => h.to_owned(),
        _ => authority.to_owned(),
    }
}

pub(super) fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// What a committed join reads back from the store.
pub(super) struct Joined {
    node: NodeId,
    group: NodeId,
    existing: bool,
    address: crate::ipam::TunnelAddress,
    gateway: crate::ipam::TunnelAddress,
    config: crate::ipam::IpamConfig,
    /// The state version that includes this join (what the peer sync waits for).
    version: u64,
}

/// The join committer's copy of the state and the store heads it matches (see [`commit_joins`]).
pub(super) struct Replica {
    state: State,
    heads: std::collections::BTreeMap<PublicKey, u64>,
}

/// How long the first join of a batch waits for more to share its commit.
pub const JOIN_LINGER: Duration = Duration::from_millis(2);

/// Most joins committed in one write transaction (one fsync).
pub const MAX_JOIN_BATCH: usize = 256;

/// One join waiting for the group commit, and where to send its answer.
pub(super) struct PendingJoin {
    req: JoinRequest,
    setup_key: Option<String>,
    reply: tokio::sync::oneshot::Sender<Result<Joined, ApiError>>,
}

/// The queue to this server's join committer, started on first use. The committer holds only a
/// weak reference to the state, so it stops when the state (and with it this sender) is dropped.
fn committer(state: &std::sync::Arc<ApiState>) -> &std::sync::mpsc::Sender<PendingJoin> {
    state.joins.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let weak = std::sync::Arc::downgrade(state);
        let spawned = std::thread::Builder::new()
            .name("join-committer".into())
            .spawn(move || run_committer(weak, rx));
        if let Err(e) = spawned {
            // The receiver is gone with the closure: every join then fails with a clear 500.
            tracing::error!(error = %e, "cannot start the join committer thread");
        }
        tx
    })
}

/// Group commit: takes every join waiting (up to [`MAX_JOIN_BATCH`]), commits them in one
/// transaction, then answers each. Nothing is answered before its commit is durable.
fn run_committer(state: std::sync::Weak<ApiState>, rx: std::sync::mpsc::Receiver<PendingJoin>) {
    let mut replica = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        // Joins come in bursts (devices enrolled together, agents restarting): the first one
        // waits up to JOIN_LINGER for the rest, which then share its fsync and its reconcile
        // instead of waiting for both to finish first.
        let linger_until = std::time::Instant::now() + JOIN_LINGER;
        while batch.len() < MAX_JOIN_BATCH {
            let left = linger_until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(state) = state.upgrade() else {
            return;
        };
        let items: Vec<_> = batch
            .iter()
            .map(|p| (&p.req, p.setup_key.as_deref()))
            .collect();
        let results = commit_joins(&state, &items, &mut replica);
        // Let go of the state before answering: whoever holds the last reference once answered
        // (a test reopening the store) must not find it still in use.
        drop(items);
        drop(state);
        for (p, r) in batch.into_iter().zip(results) {
            // The client may have gone away; its join is committed anyway.
            let _ = p.reply.send(r);
        }
    }
}

/// Plans one join against `view` (the state as the batch has made it so far).
#[allow(clippy::too_many_arguments)]
fn plan_one(
    state: &ApiState,
    view: &State,
    server: &PublicKey,
    next_seq: u64,
    req: &JoinRequest,
    setup_key: Option<&str>,
    now_ms: u64,
    now: Hlc,
) -> Result<JoinPlan, ApiError> {
    Ok(match setup_key {
        Some(k) => super::private::setup_keys::plan_join_with_key(
            view, server, next_seq, req, k, now_ms, now,
        )?,
        None => plan_join(
            view,
            server,
            next_seq,
            req,
            state.settings.registration,
            now,
        )?,
    })
}

/// The store-side part of a batch of joins, under the store lock (no other append interleaves):
/// plans each join against the state as the earlier joins of the batch leave it (so two joins
/// get two addresses, and a refused join changes nothing for the others), appends every planned
/// op in ONE write transaction, and reads back each result. One result per item, in order.
///
/// `replica` is the committer's own copy of the state, kept from one batch to the next: cloning
/// the whole state for every batch would cost more than the batch itself once thousands of
/// devices are enrolled. It is used only while the store's heads are exactly the ones it was
/// taken at (no other op appended since: the same ops fold to the same state), and dropped
/// whenever an op of the batch did not take effect in the store exactly as planned.
pub(super) fn commit_joins(
    state: &ApiState,
    items: &[(&JoinRequest, Option<&str>)],
    replica: &mut Option<Replica>,
) -> Vec<Result<Joined, ApiError>> {
    let server = state.server.public();
    let mut store = state.lock_store();
    let now_ms = state.clock.now_ms();
    // Mirror what `append_local_batch` will assign: consecutive seqs and HLC ticks.
    let mut next_seq = store.heads().get(&server).copied().unwrap_or(0) + 1;
    let mut clock = store.clock();
    // The state with the batch's accepted ops folded in.
    let mut scratch = match replica.take() {
        Some(r) if &r.heads == store.heads() => r.state,
        _ => store.state().clone(),
    };
    let mut accepted: Vec<Op> = Vec::new();
    let mut plans: Vec<Result<JoinPlan, ApiError>> = Vec::with_capacity(items.len());
    for (req, setup_key) in items {
        let view = &scratch;
        let plan = plan_one(
            state,
            view,
            &server,
            next_seq,
            req,
            *setup_key,
            now_ms,
            clock.tick(now_ms),
        );
        let plan = match plan {
            Ok(p) if !p.ops.is_empty() => p,
            other => {
                plans.push(other);
                continue;
            }
        };
        let s = &mut scratch;
        let mut c = clock;
        let ops: Vec<Op> = plan
            .ops
            .iter()
            .enumerate()
            .map(|(i, body)| {
                c = c.tick(now_ms);
                Op {
                    origin: server,
                    seq: next_seq + i as u64,
                    hlc: c,
                    author: server,
                    body: body.clone(),
                }
            })
            .collect();
        match ops.iter().try_for_each(|op| s.apply(op)) {
            Ok(()) => {
                clock = c;
                next_seq += ops.len() as u64;
                accepted.extend(ops);
                plans.push(Ok(plan));
            }
            Err(e) => {
                // A plan that does not fold is a bug; undo its partial effect on the scratch
                // state (rebuild it) so the rest of the batch is unaffected.
                let mut fresh = store.state().clone();
                for op in &accepted {
                    let _ = fresh.apply(op);
                }
                *s = fresh;
                plans.push(Err(ApiError::internal(format!(
                    "a join plan does not apply: {e}"
                ))));
            }
        }
    }

    // One transaction, one fsync, for every accepted join.
    let bodies: Vec<_> = plans
        .iter()
        .flat_map(|p| p.iter().flat_map(|p| p.ops.iter()))
        .map(|b| (server, b.clone(), None))
        .collect();
    let mut results = Vec::new();
    if !bodies.is_empty() {
        match store.append_local_batch(&state.server, bodies, now_ms) {
            Ok(r) => results = r,
            Err(e) => {
                let e = ApiError::internal(e);
                return items.iter().map(|_| Err(e.clone())).collect();
            }
        }
        state.state_changed();
    }
    // The store folded exactly the ops the scratch state did: keep it for the next batch.
    let as_planned = results
        .iter()
        .all(|r| matches!(r, Ok(Submitted::Appended { effect: Ok(()), .. })));
    if as_planned {
        // Its row changes are the store's business, not ours.
        scratch.take_changes();
        *replica = Some(Replica {
            state: scratch,
            heads: store.heads().clone(),
        });
    }
    // Read under the store lock: exactly the state that holds this batch.
    let version = state.version();
    let mut results = results.into_iter();
    plans
        .into_iter()
        .map(|plan| {
            let plan = plan?;
            // Every op of the plan must have taken effect.
            let mut failed = None;
            for r in results.by_ref().take(plan.ops.len()) {
                match r {
                    Ok(Submitted::Appended { effect: Ok(()), .. })
                    | Ok(Submitted::Duplicate { .. }) => {}
                    Ok(Submitted::Appended { effect: Err(e), .. }) => {
                        // The op is in the log with no effect (as on every server); say why.
                        tracing::warn!(error = %e, "a join op had no effect");
                        failed.get_or_insert(ApiError::new(
                            StatusCode::CONFLICT,
                            "join_conflict",
                            e.to_string(),
                        ));
                    }
                    Err(e) => {
                        failed.get_or_insert(ApiError::internal(e));
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            let ipam = store.state().ipam();
            let address = ipam
                .tunnel_address(&plan.node)
                .ok_or_else(|| ApiError::internal("joined node has no lease after the append"))?;
            let config = ipam.config().clone();
            Ok(Joined {
                node: plan.node,
                group: plan.group,
                existing: plan.existing,
                address,
                gateway: config.address_of(1),
                config,
                version,
            })
        })
        .collect()
}

#[utoipa::path(
    post,
    path = "/api/join",
    tag = "public",
    request_body = JoinBody,
    responses(
        (status = 200, description = "Enrolled: everything the device needs", body = JoinResponse),
        (status = 400, description = "Malformed body, key or hostname", body = super::ErrorBody),
        (status = 401, description = "No valid proof of possession", body = super::ErrorBody),
        (status = 403, description = "Registration is closed, or the setup key is unknown, used or expired", body = super::ErrorBody),
        (status = 409, description = "WireGuard key already in use", body = super::ErrorBody),
        (status = 503, description = "Address pool exhausted", body = super::ErrorBody),
    )
)]
pub async fn post_join(
    state: web::Data<ApiState>,
    http: HttpRequest,
    body: web::Json<JoinBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let wg: [u8; 32] = STANDARD
        .decode(body.wg_pubkey.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            ApiError::bad_request("bad_wg_pubkey", "wg_pubkey must be base64 of 32 bytes")
        })?;
    let client = super::auth::authenticate(&state, &body.proof)?;
    let req = JoinRequest {
        client,
        wg_pubkey: WgKey(wg),
        hostname: body.hostname,
    };
    // Queued to the group committer; answered once its batch is durable.
    let (reply, answer) = tokio::sync::oneshot::channel();
    let st = state.clone().into_inner();
    committer(&st)
        .send(PendingJoin {
            req,
            setup_key: body.setup_key,
            reply,
        })
        .map_err(|_| ApiError::internal("the join committer has stopped"))?;
    let joined = answer
        .await
        .map_err(|_| ApiError::internal("the join committer has stopped"))??;
    let peer_programmed = match &state.peers {
        Some(p) => p.sync(joined.version, PEER_SYNC_TIMEOUT).await,
        None => false,
    };
    let (token, token_expires_at_ms) = super::auth::token_for(&state, client, Some(joined.node))?;
    let s = &state.settings;
    let host = s
        .public_host
        .clone()
        .unwrap_or_else(|| host_only(http.connection_info().host()));
    let (g, a, c) = (&joined.gateway, &joined.address, &joined.config);
    Ok(HttpResponse::Ok().json(JoinResponse {
        token,
        token_expires_at_ms,
        node_id: joined.node.to_string(),
        group_id: joined.group.to_string(),
        existing: joined.existing,
        tunnel_ipv4: a.v4.to_string(),
        tunnel_ipv6: a.v6.to_string(),
        addresses: vec![format!("{}/32", a.v4), format!("{}/128", a.v6)],
        server_wg_pubkey: STANDARD.encode(s.wg_public_key),
        server_wg_endpoint: endpoint(&host, s.wg_port),
        server_tunnel_ipv4: g.v4.to_string(),
        server_tunnel_ipv6: g.v6.to_string(),
        allowed_ips: vec![c.tunnel_v4.to_string(), c.tunnel_v6.to_string()],
        dns_servers: vec![g.v4.to_string()],
        private_api: format!("https://{}:{}", g.v4, s.private_api_port),
        tls_pin: s.tls_pin.map(|p| p.to_string()),
        peer_programmed,
    }))
}

#[cfg(test)]
mod http_tests {
    use super::*;

    #[test]
    fn host_part_of_authorities() {
        assert_eq!(host_only("example.org:9100"), "example.org");
        assert_eq!(host_only("example.org"), "example.org");
        assert_eq!(host_only("[fd00::1]:9100"), "fd00::1");
        assert_eq!(host_only("10.0.0.1:1"), "10.0.0.1");
        assert_eq!(endpoint("fd00::1", 5), "[fd00::1]:5");
    }

    use std::sync::Arc;

    use crate::api::{DataplaneInfo, Settings};
    use crate::identity::NodeKey;
    use crate::ipam::IpamConfig;
    use crate::store::Store;

    /// An API state over a fresh store with the genesis ops, open registration, no dataplane.
    fn api_state(path: &std::path::Path) -> Arc<ApiState> {
        let server = NodeKey::from_seed(&[1; 32]);
        let (mut store, _) =
            Store::create(path, server.public(), IpamConfig::default()).expect("store");
        let ops =
            crate::server::genesis_ops(store.state(), &server.public(), [5; 32], "srv", None, true)
                .expect("genesis");
        let batch = ops
            .into_iter()
            .map(|b| (server.public(), b, None))
            .collect();
        for r in store
            .append_local_batch(&server, batch, 1_000)
            .expect("append")
        {
            r.expect("genesis op");
        }
        let settings = Settings {
            registration: Registration::Open,
            wg_public_key: [5; 32],
            wg_port: 51940,
            public_host: None,
            private_api_port: 9101,
            api_port: 9100,
            tls_pin: None,
        };
        let dp = DataplaneInfo {
            backend: "none".into(),
            fallback_reason: None,
            interface: None,
        };
        Arc::new(ApiState::new(server, store, settings, dp, None))
    }

    fn device(i: u8) -> JoinRequest {
        JoinRequest {
            client: NodeKey::from_seed(&[i; 32]).public(),
            wg_pubkey: WgKey([i; 32]),
            hostname: None,
        }
    }

    #[test]
    fn one_batch_gives_distinct_addresses_and_a_refused_join_changes_nothing_else() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("state.redb");
        let st = api_state(&path);
        let devices: Vec<_> = (10..74).map(device).collect();
        // Mid-batch, another device presents the WireGuard key the batch's first join just took:
        // only the state as the batch evolved shows the conflict.
        let mut thief = device(200);
        thief.wg_pubkey = devices[0].wg_pubkey;
        let mut items: Vec<_> = devices.iter().map(|d| (d, None)).collect();
        items.insert(32, (&thief, None));
        let mut results = commit_joins(&st, &items, &mut None);
        let refused = results.remove(32);
        assert_eq!(refused.err().map(|e| e.code), Some("wg_key_in_use"));
        let joined: Vec<Joined> = results
            .into_iter()
            .map(|r| r.expect("every other join succeeds"))
            .collect();
        let v4: std::collections::BTreeSet<_> = joined.iter().map(|j| j.address.v4).collect();
        let nodes: std::collections::BTreeSet<_> = joined.iter().map(|j| j.node).collect();
        assert_eq!((v4.len(), nodes.len()), (64, 64));
        assert!(joined.iter().all(|j| !j.existing));

        // Answered means durable: a reopened store holds every device with its address.
        drop(st);
        let (store, _) = Store::open(&path).expect("reopen");
        for (d, j) in devices.iter().zip(&joined) {
            assert_eq!(find_device(store.state().tree(), &d.client), Some(j.node));
            assert_eq!(
                store.state().ipam().tunnel_address(&j.node),
                Some(j.address)
            );
        }
        assert_eq!(find_device(store.state().tree(), &thief.client), None);
    }

    #[test]
    fn the_committers_replica_stays_equal_to_the_store_state_across_batches() {
        let dir = tempfile::tempdir().expect("tmp");
        let st = api_state(&dir.path().join("state.redb"));
        let mut replica = None;
        let mut addresses = std::collections::BTreeSet::new();
        for batch in 0..3u8 {
            let devices: Vec<_> = (0..20).map(|i| device(10 + batch * 20 + i)).collect();
            let items: Vec<_> = devices.iter().map(|d| (d, None)).collect();
            for r in commit_joins(&st, &items, &mut replica) {
                assert!(addresses.insert(r.expect("joined").address.v4));
            }
            let kept = replica
                .as_ref()
                .expect("kept after a batch that went as planned");
            let store = st.lock_store();
            assert!(
                kept.state == *store.state(),
                "batch {batch}: replica differs"
            );
            assert_eq!(&kept.heads, store.heads());
        }
        // Someone else appends (a heartbeat, a replicated op): the replica is not used as is.
        {
            let mut store = st.lock_store();
            let op = OpBody::Tree(crate::tree::TreeOp::Update {
                node: NodeId::ROOT,
                field: NodeField::Metadata {
                    key: "note".into(),
                    value: Some("x".into()),
                },
            });
            let server = st.server.public();
            store
                .append_local(&st.server, server, op, None, st.clock.now_ms())
                .expect("append");
        }
        let late = device(200);
        let r = commit_joins(&st, &[(&late, None)], &mut replica);
        assert!(addresses.insert(r[0].as_ref().expect("joined").address.v4));
        let store = st.lock_store();
        assert!(replica.as_ref().expect("replica").state == *store.state());
    }

    #[tokio::test]
    async fn a_peer_sync_waits_for_a_reconcile_of_its_own_version_only() {
        let (sync, mut worker) = crate::api::PeerSync::new();
        worker.applied.send_replace(5);
        // Already covered: no request, no wait.
        assert!(sync.sync(5, Duration::from_millis(10)).await);
        assert_eq!(*worker.requested.borrow_and_update(), 0);
        // Newer: it asks for version 7 and waits until a reconcile says so.
        let reconciler = async {
            worker.requested.wait_for(|v| *v >= 7).await.expect("asked");
            worker.applied.send_replace(6);
            tokio::time::sleep(Duration::from_millis(5)).await;
            worker.applied.send_replace(7);
        };
        let (ok, ()) = tokio::join!(sync.sync(7, Duration::from_secs(5)), reconciler);
        assert!(ok);
        // Nobody applies 8: it times out (and says so).
        assert!(!sync.sync(8, Duration::from_millis(20)).await);
    }

    #[test]
    fn concurrent_joins_through_the_committer_all_answer() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("state.redb");
        let st = api_state(&path);
        // 64 devices and one presenting device 10's WireGuard key: whichever is committed
        // first gets the key, the other a 409; all the rest succeed.
        let mut thief = device(200);
        thief.wg_pubkey = device(10).wg_pubkey;
        let reqs: Vec<_> = (10..74).map(device).chain([thief]).collect();
        let answers: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = reqs
                .iter()
                .map(|r| {
                    let st = st.clone();
                    s.spawn(move || {
                        let (reply, answer) = tokio::sync::oneshot::channel();
                        committer(&st)
                            .send(PendingJoin {
                                req: r.clone(),
                                setup_key: None,
                                reply,
                            })
                            .expect("queued");
                        answer.blocking_recv().expect("answered")
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let (ok, refused): (Vec<_>, Vec<_>) = answers.into_iter().partition(|r| r.is_ok());
        assert_eq!(refused.len(), 1);
        assert_eq!(
            refused[0].as_ref().err().map(|e| e.code),
            Some("wg_key_in_use")
        );
        let v4: std::collections::BTreeSet<_> = ok
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|j| j.address.v4))
            .collect();
        assert_eq!(v4.len(), 64);
        drop(st);
        let (store, _) = Store::open(&path).expect("reopen");
        let devices = (10..74)
            .map(device)
            .chain([device(200)])
            .filter(|d| find_device(store.state().tree(), &d.client).is_some())
            .count();
        assert_eq!(devices, 64);
    }
}
