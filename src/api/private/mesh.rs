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
