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
use crate::store::{StoreError, Submitted};

/// How long a join waits for the WireGuard peer to be programmed before answering anyway.
pub const PEER_SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// `POST /api/join` body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    /// Proof of possession of the device key over a fresh challenge (see `auth`).
    pub proof: String,
    /// The device's WireGuard (X25519) public key, base64.
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

/// The store-side part of a join: plan and append in one locked step (so no other join on this
/// server interleaves), and read back the result.
struct Joined {
    node: NodeId,
    group: NodeId,
    existing: bool,
    address: crate::ipam::TunnelAddress,
    gateway: crate::ipam::TunnelAddress,
    config: crate::ipam::IpamConfig,
}

fn join_in_store(
    state: &ApiState,
    req: &JoinRequest,
    setup_key: Option<&str>,
) -> Result<Joined, ApiError> {
    let server = state.server.public();
    let mut store = state.lock_store();
    let now_ms = state.clock.now_ms();
    let next_seq = store.heads().get(&server).copied().unwrap_or(0) + 1;
    let now = store.clock().tick(now_ms);
    let plan = match setup_key {
        Some(k) => super::private::setup_keys::plan_join_with_key(
            store.state(),
            &server,
            next_seq,
            req,
            k,
            now_ms,
            now,
        )?,
        None => plan_join(
            store.state(),
            &server,
            next_seq,
            req,
            state.settings.registration,
            now,
        )?,
    };
    if !plan.ops.is_empty() {
        let ops = plan.ops.iter().map(|b| (server, b.clone(), None)).collect();
        let results = store
            .append_local_batch(&state.server, ops, now_ms)
            .map_err(ApiError::internal)?;
        for r in results {
            match r {
                Ok(Submitted::Appended { effect: Ok(()), .. }) => {}
                Ok(Submitted::Appended { effect: Err(e), .. }) => {
                    // The op is in the log with no effect (as on every server); say why.
                    tracing::warn!(error = %e, "a join op had no effect");
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "join_conflict",
                        e.to_string(),
                    ));
                }
                Ok(Submitted::Duplicate { .. }) => {}
                Err(e @ StoreError::Invalid(_)) => return Err(ApiError::internal(e)),
                Err(e) => return Err(ApiError::internal(e)),
            }
        }
        state.state_changed();
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
    })
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
    let st = state.clone().into_inner();
    let setup_key = body.setup_key;
    let joined = web::block(move || join_in_store(&st, &req, setup_key.as_deref()))
        .await
        .map_err(ApiError::internal)??;
    let peer_programmed = match &state.peers {
        Some(p) => p.sync(PEER_SYNC_TIMEOUT).await,
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
}
