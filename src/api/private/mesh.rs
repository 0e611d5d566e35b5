//! `GET /api/mesh/peers`: the devices the caller may connect to directly: the other endpoints of
//! its own group (its device node's parent). Permission: connect_private, on that group. Each
//! peer's endpoint is the one a server observed (the NAT-mapped source of its WireGuard packets,
//! see [`crate::api::observed`]) when recorded, else the one the device reported.
//!
//! `GET /api/mesh/status`: the devices of a group with their liveness as this server sees it
//! (online: a handshake with this server's client-plane device less than 180 s ago).

use actix_web::{HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::{Caller, require};
use crate::api::{ApiError, ApiState, observed};
use crate::tree::{NodeId, NodeKind, Permission};

/// One peer a device may program.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, utoipa::ToSchema)]
pub struct Peer {
    pub node_id: String,
    pub hostname: String,
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub wg_pubkey: String,
    /// Where to send to it: the server-observed endpoint if recorded, else the reported one.
    pub endpoint: Option<String>,
    /// `observed` (by a server: what a NAT maps it to), `reported` (by the device itself), or
    /// null when there is no endpoint.
    pub endpoint_source: Option<String>,
    /// Its tunnel addresses as `/32` and `/128`.
    pub allowed_ips: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct PeersResponse {
    pub group_id: String,
    pub peers: Vec<Peer>,
}

#[utoipa::path(
    get,
    path = "/api/mesh/peers",
    tag = "private",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The peers of the caller's group", body = PeersResponse),
        (status = 400, description = "Bad input", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
    )
)]
pub async fn get_peers(
    state: web::Data<ApiState>,
    caller: Caller,
) -> Result<HttpResponse, ApiError> {
    let node = caller.0.node.ok_or_else(|| {
        ApiError::bad_request("no_device", "this token names no device node; join first")
    })?;
    let store = state.lock_store();
    let (tree, ipam) = (store.state().tree(), store.state().ipam());
    let group: NodeId = tree
        .get(&node)
        .and_then(|n| n.parent)
        .ok_or_else(|| super::denied(crate::authz::Denied::NoSuchNode(node)))?;
    require(tree, &caller, Permission::ConnectPrivate, group)?;
    let peers = tree
        .children(&group)
        .filter(|n| n.kind == NodeKind::Endpoint && n.id != node)
        .filter_map(|n| {
            let (wg, a) = (n.wg_pubkey?, ipam.tunnel_address(&n.id)?);
            let observed = n.metadata.contains_key(observed::OBSERVED_ENDPOINT_KEY);
            let endpoint = observed::best_endpoint(n);
            let source = match (&endpoint, observed) {
                (None, _) => None,
                (Some(_), true) => Some("observed".to_owned()),
                (Some(_), false) => Some("reported".to_owned()),
            };
            Some(Peer {
                node_id: n.id.to_string(),
                hostname: n.hostname.clone(),
                wg_pubkey: STANDARD.encode(wg.0),
                endpoint,
                endpoint_source: source,
                allowed_ips: vec![format!("{}/32", a.v4), format!("{}/128", a.v6)],
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(PeersResponse {
        group_id: group.to_string(),
        peers,
    }))
}

/// `GET /api/mesh/status` query: which group (default: the caller's device's group).
#[derive(Deserialize, Debug, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// A customer group id (32 hex digits); default the group of the token's device.
    pub group: Option<String>,
}

/// One device of the group, as the state knows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, utoipa::ToSchema)]
pub struct DeviceStatus {
    pub node_id: String,
    pub hostname: String,
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub wg_pubkey: Option<String>,
    pub tunnel_ipv4: Option<String>,
    pub tunnel_ipv6: Option<String>,
    /// Its last reported endpoint (`POST /api/heartbeat`), if it ever reported one.
    pub endpoint: Option<String>,
    /// The endpoint a server observed (NAT-mapped), if recorded.
    pub observed_endpoint: Option<String>,
    /// True for the device the token names.
    pub is_caller: bool,
    /// Online: its last handshake with this server's WireGuard device is less than 180 s old.
    /// Null when this server's device does not list it (no key or lease yet, or no dataplane).
    pub online: Option<bool>,
    /// Unix ms of its last handshake with this server; null: never (or not listed).
    pub last_handshake_ms: Option<u64>,
    /// Seconds since then, as of `observed_at_ms`.
    pub last_handshake_age_s: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct StatusResponse {
    pub group_id: String,
    pub devices: Vec<DeviceStatus>,
    /// How `online` is judged (see [`LIVENESS`]).
    pub liveness: String,
    /// Unix ms of the dump of this server's device the liveness comes from; null: none yet.
    pub observed_at_ms: Option<u64>,
}

/// What [`StatusResponse::liveness`] says.
pub const LIVENESS: &str = "online = last WireGuard handshake with this server less than 180 s ago (a live device re-handshakes every 120 s; its agent's keepalive keeps packets flowing), from this server's device dump every 5 s; a device connected through another server is not listed here (online null)";

/// `GET /api/mesh/status`. Permission: read, on the group.
#[utoipa::path(
    get,
    path = "/api/mesh/status",
    operation_id = "mesh_status",
    tag = "private",
    security(("bearer" = [])),
    params(StatusQuery),
    responses(
        (status = 200, description = "The devices of the group", body = StatusResponse),
        (status = 400, description = "Bad input (no group given and the token names no device)", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
    )
)]
pub async fn get_status(
    state: web::Data<ApiState>,
    caller: Caller,
    query: web::Query<StatusQuery>,
) -> Result<HttpResponse, ApiError> {
    let store = state.lock_store();
    let (tree, ipam) = (store.state().tree(), store.state().ipam());
    let group = match &query.group {
        Some(g) => super::parse_node_id(g)?,
        None => {
            let node = caller.0.node.ok_or_else(|| {
                ApiError::bad_request(
                    "no_device",
                    "this token names no device node; pass ?group=<id>",
                )
            })?;
            tree.get(&node)
                .and_then(|n| n.parent)
                .ok_or_else(|| super::denied(crate::authz::Denied::NoSuchNode(node)))?
        }
    };
    require(tree, &caller, Permission::Read, group)?;
    let obs = state.observations.lock().unwrap_or_else(|p| p.into_inner());
    let now = state.clock.now_ms();
    let devices = tree
        .children(&group)
        .filter(|n| n.kind == NodeKind::Endpoint)
        .map(|n| {
            let a = ipam.tunnel_address(&n.id);
            let seen = n.wg_pubkey.and_then(|k| obs.peer(&k));
            let handshake = seen.and_then(|s| s.last_handshake_ms);
            DeviceStatus {
                node_id: n.id.to_string(),
                hostname: n.hostname.clone(),
                wg_pubkey: n.wg_pubkey.map(|k| STANDARD.encode(k.0)),
                tunnel_ipv4: a.map(|a| a.v4.to_string()),
                tunnel_ipv6: a.map(|a| a.v6.to_string()),
                endpoint: n.endpoint.clone(),
                observed_endpoint: n.metadata.get(observed::OBSERVED_ENDPOINT_KEY).cloned(),
                is_caller: caller.0.node == Some(n.id),
                online: seen.map(|_| observed::is_online(handshake, now)),
                last_handshake_ms: handshake,
                last_handshake_age_s: handshake.map(|h| now.saturating_sub(h) / 1_000),
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(StatusResponse {
        group_id: group.to_string(),
        devices,
        liveness: LIVENESS.into(),
        observed_at_ms: (obs.at_ms > 0).then_some(obs.at_ms),
    }))
}
