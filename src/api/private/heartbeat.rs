//! `POST /api/heartbeat`: a device reports the endpoint (`ip:port`) it is seen from. Stored on its
//! node as a signed op (only when it changed, so a steady heartbeat does not grow the log).
//! Permission: edit_node, on the caller's own device node.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::{Caller, append_for, require};
use crate::api::{ApiError, ApiState};
use crate::op::OpBody;
use crate::tree::{NodeField, Permission, TreeOp};

#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    /// The device's public endpoint, `ip:port`.
    pub endpoint: String,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct HeartbeatResponse {
    pub node_id: String,
    /// True when the endpoint changed (and an op was appended).
    pub changed: bool,
}

#[utoipa::path(
    post,
    path = "/api/heartbeat",
    operation_id = "heartbeat",
    tag = "private",
    security(("bearer" = [])),
    request_body = HeartbeatBody,
    responses(
        (status = 200, description = "Recorded", body = HeartbeatResponse),
        (status = 400, description = "Bad input", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
    )
)]
pub async fn post(
    state: web::Data<ApiState>,
    caller: Caller,
    body: web::Json<HeartbeatBody>,
) -> Result<HttpResponse, ApiError> {
    let node = caller.0.node.ok_or_else(|| {
        ApiError::bad_request("no_device", "this token names no device node; join first")
    })?;
    let endpoint: std::net::SocketAddr = body
        .endpoint
        .trim()
        .parse()
        .map_err(|_| ApiError::bad_request("bad_endpoint", "endpoint must be ip:port"))?;
    let endpoint = endpoint.to_string();
    let unchanged = {
        let store = state.lock_store();
        let tree = store.state().tree();
        require(tree, &caller, Permission::EditNode, node)?;
        tree.get(&node).and_then(|n| n.endpoint.as_deref()) == Some(endpoint.as_str())
    };
    if !unchanged {
        let st = state.clone().into_inner();
        let c = caller.clone();
        let op = OpBody::Tree(TreeOp::Update {
            node,
            field: NodeField::Endpoint(Some(endpoint)),
        });
        web::block(move || append_for(&st, &c, op))
            .await
            .map_err(ApiError::internal)??;
    }
    Ok(HttpResponse::Ok().json(HeartbeatResponse {
        node_id: node.to_string(),
        changed: !unchanged,
    }))
}
