//! The tree routes: read what the caller may read, create/update/delete what it may change.
//! Each handler names its permission (see the table in the parent module).

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::{Caller, append_for, parse_node_id, require};
use crate::api::{ApiError, ApiState};
use crate::authz;
use crate::ipam::Ipam;
use crate::op::OpBody;
use crate::tree::{Node, NodeField, NodeId, NodeKind, Permission, Tree, TreeOp, WgKey};

/// A node as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, utoipa::ToSchema)]
pub struct NodeView {
    pub id: String,
    pub parent: Option<String>,
    /// `root`, `customer`, `endpoint`, `relay` or `server`.
    #[schema(value_type = String)]
    pub kind: NodeKind,
    pub hostname: String,
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub owner: Option<String>,
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub wg_pubkey: Option<String>,
    pub endpoint: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub tunnel_ipv4: Option<String>,
    pub tunnel_ipv6: Option<String>,
}

impl NodeView {
    pub fn of(n: &Node, ipam: &Ipam) -> NodeView {
        let addr = ipam.tunnel_address(&n.id);
        NodeView {
            id: n.id.to_string(),
            parent: n.parent.map(|p| p.to_string()),
            kind: n.kind,
            hostname: n.hostname.clone(),
            owner: n.owner.map(|o| o.to_string()),
            wg_pubkey: n.wg_pubkey.map(|k| STANDARD.encode(k.0)),
            endpoint: n.endpoint.clone(),
            metadata: n.metadata.clone(),
            tunnel_ipv4: addr.map(|a| a.v4.to_string()),
            tunnel_ipv6: addr.map(|a| a.v6.to_string()),
        }
    }
}

/// A list of nodes.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct NodesResponse {
    pub nodes: Vec<NodeView>,
}

/// The nodes `caller` may read (the subtrees under its grants), in id order.
pub fn visible(tree: &Tree, caller: &Caller) -> Vec<NodeId> {
    tree.nodes()
        .filter(|n| authz::authorize(tree, &caller.0.subject, Permission::Read, n.id).is_ok())
        .map(|n| n.id)
        .collect()
}

/// `GET /api/tree`: every node the caller may read. Permission: read, on each node.
#[utoipa::path(
    get,
    path = "/api/tree",
    tag = "private",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The nodes the caller may read", body = NodesResponse),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
    )
)]
pub async fn get_visible(state: web::Data<ApiState>, caller: Caller) -> HttpResponse {
    let store = state.lock_store();
    let (tree, ipam) = (store.state().tree(), store.state().ipam());
    let nodes: Vec<NodeView> = visible(tree, &caller)
        .iter()
        .filter_map(|id| tree.get(id))
        .map(|n| NodeView::of(n, ipam))
        .collect();
    HttpResponse::Ok().json(NodesResponse { nodes })
}

/// `GET /api/tree/{id}`. Permission: read, on the node.
#[utoipa::path(
    get,
    path = "/api/tree/{id}",
    tag = "private",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "node id, 32 hex digits")),
    responses(
        (status = 200, description = "The node", body = NodeView),
        (status = 400, description = "Bad input", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
    )
)]
pub async fn get_node(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_node_id(&id)?;
    let store = state.lock_store();
    let tree = store.state().tree();
    require(tree, &caller, Permission::Read, id)?;
    let n = tree
        .get(&id)
        .ok_or_else(|| ApiError::internal("authorized node vanished"))?;
    Ok(HttpResponse::Ok().json(NodeView::of(n, store.state().ipam())))
}

/// `GET /api/tree/{id}/children`. Permission: read, on the node.
#[utoipa::path(
    get,
    path = "/api/tree/{id}/children",
    tag = "private",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "node id, 32 hex digits")),
    responses(
        (status = 200, description = "Its children", body = NodesResponse),
        (status = 400, description = "Bad input", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
    )
)]
pub async fn get_children(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_node_id(&id)?;
    let store = state.lock_store();
    let tree = store.state().tree();
    require(tree, &caller, Permission::Read, id)?;
    let ipam = store.state().ipam();
    let nodes: Vec<NodeView> = tree.children(&id).map(|n| NodeView::of(n, ipam)).collect();
    Ok(HttpResponse::Ok().json(NodesResponse { nodes }))
}

/// `POST /api/tree/{id}/children` body.
#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// `customer`, `endpoint` or `relay` (servers join the cluster, they are not created here).
    #[schema(value_type = String)]
    pub kind: NodeKind,
    pub hostname: String,
    /// The node's owner key (base64). Naming another key than one's own needs admin on the
    /// parent: an owner is who a later join with that key lands as.
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub owner: Option<String>,
    /// WireGuard key (base64); needs admin on the parent, like `owner`.
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub wg_pubkey: Option<String>,
}

/// `POST /api/tree/{id}/children`: creates a node. Permission: add_child, on the parent.
#[utoipa::path(
    post,
    path = "/api/tree/{id}/children",
    tag = "private",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "node id, 32 hex digits")),
    request_body = CreateBody,
    responses(
        (status = 201, description = "Created", body = NodeView),
        (status = 400, description = "Bad input", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
        (status = 409, description = "Refused by the state", body = crate::api::ErrorBody),
    )
)]
pub async fn post_child(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<CreateBody>,
) -> Result<HttpResponse, ApiError> {
    let parent = parse_node_id(&id)?;
    let body = body.into_inner();
    if matches!(body.kind, NodeKind::Root | NodeKind::Server) {
        // A server node's owner may sign tokens for the cluster: never created through the API.
        return Err(ApiError::bad_request(
            "bad_kind",
            "kind must be customer, endpoint or relay",
        ));
    }
    let hostname = body.hostname.to_ascii_lowercase();
    if !crate::tree::is_dns_label(&hostname) {
        return Err(ApiError::bad_request(
            "bad_hostname",
            "hostname must be a DNS label (letters, digits, hyphens; 1-63 characters)",
        ));
    }
    let owner = body
        .owner
        .as_deref()
        .map(|o| {
            o.parse::<crate::keys::PublicKey>()
                .map_err(|_| ApiError::bad_request("bad_owner", "owner must be a base64 key"))
        })
        .transpose()?;
    let wg = body
        .wg_pubkey
        .as_deref()
        .map(|k| {
            STANDARD
                .decode(k.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .map(WgKey)
                .ok_or_else(|| {
                    ApiError::bad_request("bad_wg_pubkey", "wg_pubkey must be base64 of 32 bytes")
                })
        })
        .transpose()?;
    {
        let store = state.lock_store();
        let tree = store.state().tree();
        require(tree, &caller, Permission::AddChild, parent)?;
        if owner.is_some_and(|o| o != caller.0.subject) || wg.is_some() {
            require(tree, &caller, Permission::Admin, parent)?;
        }
        if wg.is_some_and(|k| tree.nodes().any(|n| n.wg_pubkey == Some(k))) {
            return Err(ApiError::new(
                actix_web::http::StatusCode::CONFLICT,
                "wg_key_in_use",
                "this WireGuard public key already belongs to another node",
            ));
        }
    }
    let op = OpBody::Tree(TreeOp::Create {
        parent,
        kind: body.kind,
        hostname,
        owner,
        wg_pubkey: wg,
    });
    let seq = append_blocking(&state, &caller, op).await?;
    let id = NodeId::derive(&state.server.public(), seq);
    Ok(HttpResponse::Created().json(view(&state, id, "created node missing")?))
}

/// `PATCH /api/tree/{id}` body: the fields to change (absent = unchanged).
#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    pub hostname: Option<String>,
    /// Entries to set (a string) or remove (`null`).
    #[serde(default)]
    pub metadata: BTreeMap<String, Option<String>>,
}

/// `PATCH /api/tree/{id}`: updates the hostname and metadata. Permission: edit_node, on the node.
#[utoipa::path(
    patch,
    path = "/api/tree/{id}",
    tag = "private",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "node id, 32 hex digits")),
    request_body = PatchBody,
    responses(
        (status = 200, description = "Updated", body = NodeView),
        (status = 400, description = "Bad input", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
        (status = 409, description = "Refused by the state", body = crate::api::ErrorBody),
    )
)]
pub async fn patch_node(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<PatchBody>,
) -> Result<HttpResponse, ApiError> {
    let node = parse_node_id(&id)?;
    let body = body.into_inner();
    let mut fields = Vec::new();
    if let Some(h) = body.hostname {
        let h = h.to_ascii_lowercase();
        if !crate::tree::is_dns_label(&h) {
            return Err(ApiError::bad_request(
                "bad_hostname",
                "hostname must be a DNS label",
            ));
        }
        fields.push(NodeField::Hostname(h));
    }
    if body.metadata.len() > crate::tree::limits::MAX_METADATA_ENTRIES {
        return Err(ApiError::bad_request(
            "too_much_metadata",
            "too many metadata entries",
        ));
    }
    for (key, value) in body.metadata {
        if key.starts_with(super::RESERVED_METADATA_PREFIX) {
            return Err(ApiError::bad_request(
                "reserved_metadata",
                "metadata keys starting with \"ln:\" are reserved",
            ));
        }
        fields.push(NodeField::Metadata { key, value });
    }
    require_now(&state, &caller, Permission::EditNode, node)?;
    for field in fields {
        append_blocking(
            &state,
            &caller,
            OpBody::Tree(TreeOp::Update { node, field }),
        )
        .await?;
    }
    Ok(HttpResponse::Ok().json(view(&state, node, "updated node missing")?))
}

/// `DELETE /api/tree/{id}`: deletes a leaf node. Permission: delete_node, on the node.
#[utoipa::path(
    delete,
    path = "/api/tree/{id}",
    tag = "private",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "node id, 32 hex digits")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Bad input", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
        (status = 409, description = "Refused by the state", body = crate::api::ErrorBody),
    )
)]
pub async fn delete_node(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let node = parse_node_id(&id)?;
    if node == NodeId::ROOT {
        return Err(ApiError::bad_request("root", "the root cannot be deleted"));
    }
    require_now(&state, &caller, Permission::DeleteNode, node)?;
    append_blocking(&state, &caller, OpBody::Tree(TreeOp::Delete { node })).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Checks `perm` on `node` under a short store lock, so a refusal is answered before any write
/// (`append_for` checks the op again when it appends).
fn require_now(
    state: &ApiState,
    caller: &Caller,
    perm: Permission,
    node: NodeId,
) -> Result<(), ApiError> {
    let store = state.lock_store();
    require(store.state().tree(), caller, perm, node)
}

/// Appends `op` as `caller` on the blocking pool (the store write syncs to disk); returns its
/// sequence number.
async fn append_blocking(
    state: &web::Data<ApiState>,
    caller: &Caller,
    op: OpBody,
) -> Result<u64, ApiError> {
    let st = state.clone().into_inner();
    let c = caller.clone();
    web::block(move || append_for(&st, &c, op))
        .await
        .map_err(ApiError::internal)?
}

/// The current view of `id`; `missing` is the internal error's message if it is absent.
fn view(state: &ApiState, id: NodeId, missing: &'static str) -> Result<NodeView, ApiError> {
    let store = state.lock_store();
    let n = store
        .state()
        .tree()
        .get(&id)
        .ok_or_else(|| ApiError::internal(missing))?;
    Ok(NodeView::of(n, store.state().ipam()))
}
