//! `GET /api/mesh/peers`: the devices the caller may connect to directly: the other endpoints of
//! its own group (its device node's parent). Permission: connect_private, on that group.

use actix_web::{HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::{Caller, require};
use crate::api::{ApiError, ApiState};
use crate::tree::{NodeId, NodeKind, Permission};

/// One peer a device may program.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, utoipa::ToSchema)]
pub struct Peer {
    pub node_id: String,
    pub hostname: String,
    pub wg_pubkey: String,
    /// Its last reported public endpoint, if any.
    pub endpoint: Option<String>,
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
            Some(Peer {
                node_id: n.id.to_string(),
                hostname: n.hostname.clone(),
                wg_pubkey: STANDARD.encode(wg.0),
                endpoint: n.endpoint.clone(),
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
    pub wg_pubkey: Option<String>,
    pub tunnel_ipv4: Option<String>,
    pub tunnel_ipv6: Option<String>,
    /// Its last reported public endpoint (`POST /api/heartbeat`), if it ever reported one.
    pub endpoint: Option<String>,
    /// True for the device the token names.
    pub is_caller: bool,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct StatusResponse {
    pub group_id: String,
    pub devices: Vec<DeviceStatus>,
    /// What "online" can be judged by. The replicated state records each device's last reported
    /// endpoint but not when it reported (a heartbeat appends an op only when the endpoint
    /// changes), so there is no last-seen time: an endpoint means "has reported at least once".
    pub liveness: String,
}

/// What [`StatusResponse::liveness`] says.
pub const LIVENESS: &str = "not recorded: the state keeps each device's last reported endpoint, not when it last reported; endpoint != null means it has reported at least once";

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
    let devices = tree
        .children(&group)
        .filter(|n| n.kind == NodeKind::Endpoint)
        .map(|n| {
            let a = ipam.tunnel_address(&n.id);
            DeviceStatus {
                node_id: n.id.to_string(),
                hostname: n.hostname.clone(),
                wg_pubkey: n.wg_pubkey.map(|k| STANDARD.encode(k.0)),
                tunnel_ipv4: a.map(|a| a.v4.to_string()),
                tunnel_ipv6: a.map(|a| a.v6.to_string()),
                endpoint: n.endpoint.clone(),
                is_caller: caller.0.node == Some(n.id),
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(StatusResponse {
        group_id: group.to_string(),
        devices,
        liveness: LIVENESS.into(),
    }))
}
