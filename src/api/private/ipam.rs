//! Subnets for nodes: `POST /api/ipam/subnets` gives a node a free prefix of the requested length
//! from the private pool (default 10.128.0.0/9) or the shared pool (default 172.20.0.0/14);
//! `POST /api/ipam/subnets/{id}/expand` widens node `{id}`'s subnet to a shorter prefix (its
//! supernet), when the wider prefix is free. Both are signed IPAM ops appended by this server.
//!
//! Permissions (the `authz` table): allocate_ip on the node for an allocation, expand_subnet on
//! the node for an expansion. Errors: a prefix length outside the pool's range is a 400 naming the
//! range; a full pool or a taken supernet is a 409 (`exhausted`, `overlap`), never a 500. The free
//! prefix is chosen under the store lock and appended under it again; a concurrent allocation of
//! the same prefix in between is refused by the state (409 `refused_by_state`), never doubled.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::{Caller, append_for, parse_node_id, require};
use crate::api::{ApiError, ApiState};
use crate::ipam::{IpamConfig, IpamError, IpamOp, LenRange, Subnet, SubnetPool};
use crate::op::OpBody;
use crate::tree::{NodeKind, Permission};

/// `POST /api/ipam/subnets` body.
#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocateBody {
    /// The node (a customer group or an endpoint) that gets the subnet.
    pub node: String,
    /// `private` (10.128.0.0/9 by default, lengths 16..=30) or `shared` (172.20.0.0/14, 20..=30).
    #[schema(value_type = String)]
    pub pool: SubnetPool,
    /// The prefix length wanted.
    pub prefix_len: u8,
}

/// `POST /api/ipam/subnets/{id}/expand` body.
#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpandBody {
    #[schema(value_type = String)]
    pub pool: SubnetPool,
    /// The new, shorter prefix length.
    pub prefix_len: u8,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct SubnetResponse {
    pub node_id: String,
    /// `private` or `shared`.
    pub pool: String,
    /// The prefix, e.g. `10.128.0.0/24`.
    pub subnet: String,
}

fn pool_range(cfg: &IpamConfig, pool: SubnetPool) -> (ipnet::Ipv4Net, LenRange) {
    match pool {
        SubnetPool::Private => (cfg.private, cfg.private_len),
        SubnetPool::Shared => (cfg.shared, cfg.shared_len),
    }
}

fn pool_name(pool: SubnetPool) -> &'static str {
    match pool {
        SubnetPool::Private => "private",
        SubnetPool::Shared => "shared",
    }
}

/// A prefix length outside the pool's range: a 400 that names the range.
fn check_len(cfg: &IpamConfig, pool: SubnetPool, len: u8) -> Result<(), ApiError> {
    let (net, r) = pool_range(cfg, pool);
    if len < r.min || len > r.max {
        return Err(ApiError::bad_request(
            "bad_prefix_len",
            format!(
                "prefix_len /{len} is outside the {} pool {net}: allowed /{}..=/{}",
                pool_name(pool),
                r.min,
                r.max
            ),
        ));
    }
    Ok(())
}

/// Maps an IPAM refusal to a clear client error.
fn ipam_error(e: IpamError) -> ApiError {
    let (status, code) = match e {
        IpamError::Exhausted(_) => (StatusCode::CONFLICT, "exhausted"),
        IpamError::Overlap(_) => (StatusCode::CONFLICT, "overlap"),
        IpamError::AlreadyHas(..) => (StatusCode::CONFLICT, "already_has_subnet"),
        IpamError::NotHeld(..) => (StatusCode::NOT_FOUND, "no_subnet"),
        IpamError::NoSuchNode(_) => (StatusCode::NOT_FOUND, "no_such_node"),
        IpamError::WrongKind { .. } => (StatusCode::BAD_REQUEST, "wrong_kind"),
        _ => (StatusCode::BAD_REQUEST, "bad_subnet"),
    };
    ApiError::new(status, code, e.to_string())
}

/// `POST /api/ipam/subnets`. Permission: allocate_ip, on the node.
#[utoipa::path(
    post,
    path = "/api/ipam/subnets",
    operation_id = "allocate_subnet",
    tag = "private",
    security(("bearer" = [])),
    request_body = AllocateBody,
    responses(
        (status = 201, description = "Allocated", body = SubnetResponse),
        (status = 400, description = "Bad input (prefix length outside the pool's range, wrong node kind)", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
        (status = 409, description = "Pool exhausted, or the node already has a subnet in this pool", body = crate::api::ErrorBody),
    )
)]
pub async fn allocate(
    state: web::Data<ApiState>,
    caller: Caller,
    body: web::Json<AllocateBody>,
) -> Result<HttpResponse, ApiError> {
    let node = parse_node_id(&body.node)?;
    let pool = body.pool;
    let subnet = {
        let store = state.lock_store();
        let (tree, ipam) = (store.state().tree(), store.state().ipam());
        require(tree, &caller, Permission::AllocateIp, node)?;
        check_len(ipam.config(), pool, body.prefix_len)?;
        let kind = tree.get(&node).map(|n| n.kind);
        if !matches!(kind, Some(NodeKind::Customer | NodeKind::Endpoint)) {
            return Err(ApiError::bad_request(
                "wrong_kind",
                "only a customer group or an endpoint holds a subnet",
            ));
        }
        if ipam.subnet(pool, &node).is_some() {
            return Err(ipam_error(IpamError::AlreadyHas(
                node,
                "a subnet in this pool",
            )));
        }
        ipam.next_free_subnet(pool, body.prefix_len)
            .map_err(ipam_error)?
    };
    let op = OpBody::Ipam(IpamOp::AllocateSubnet { pool, node, subnet });
    let st = state.clone().into_inner();
    web::block(move || append_for(&st, &caller, op))
        .await
        .map_err(ApiError::internal)??;
    Ok(HttpResponse::Created().json(SubnetResponse {
        node_id: node.to_string(),
        pool: pool_name(pool).into(),
        subnet: subnet.to_string(),
    }))
}

/// `POST /api/ipam/subnets/{id}/expand`. Permission: expand_subnet, on node `{id}`.
#[utoipa::path(
    post,
    path = "/api/ipam/subnets/{id}/expand",
    operation_id = "expand_subnet",
    tag = "private",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The node holding the subnet (32 hex digits)")),
    request_body = ExpandBody,
    responses(
        (status = 200, description = "Expanded", body = SubnetResponse),
        (status = 400, description = "Bad input (prefix length not shorter, or outside the pool's range)", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node, or it holds no subnet in this pool", body = crate::api::ErrorBody),
        (status = 409, description = "The wider prefix overlaps another allocation", body = crate::api::ErrorBody),
    )
)]
pub async fn expand(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
    body: web::Json<ExpandBody>,
) -> Result<HttpResponse, ApiError> {
    let node = parse_node_id(&id)?;
    let pool = body.pool;
    let len = body.prefix_len;
    {
        let store = state.lock_store();
        let (tree, ipam) = (store.state().tree(), store.state().ipam());
        require(tree, &caller, Permission::ExpandSubnet, node)?;
        check_len(ipam.config(), pool, len)?;
        let current = ipam
            .subnet(pool, &node)
            .ok_or_else(|| ipam_error(IpamError::NotHeld(node, "a subnet in this pool")))?;
        if len >= current.len {
            return Err(ApiError::bad_request(
                "bad_prefix_len",
                format!(
                    "expanding {current} needs a prefix shorter than /{}",
                    current.len
                ),
            ));
        }
        // Refuse a taken supernet here rather than append an op the state would fold with no
        // effect (it checks the same; this only keeps such refusals out of the log).
        let wider = Subnet {
            base: current.base & !(u32::MAX.checked_shr(u32::from(len)).unwrap_or(0)),
            len,
        };
        let taken = ipam.data().subnets.iter().find(|((p, n), s)| {
            *p == pool && *n != node && s.base <= wider.last() && wider.base <= s.last()
        });
        if let Some((_, s)) = taken {
            return Err(ipam_error(IpamError::Overlap(*s)));
        }
    }
    let op = OpBody::Ipam(IpamOp::ExpandSubnet { pool, node, len });
    let st = state.clone().into_inner();
    let c = caller.clone();
    web::block(move || append_for(&st, &c, op))
        .await
        .map_err(ApiError::internal)??;
    let subnet = state
        .lock_store()
        .state()
        .ipam()
        .subnet(pool, &node)
        .ok_or_else(|| ApiError::internal("expanded subnet vanished"))?;
    Ok(HttpResponse::Ok().json(SubnetResponse {
        node_id: node.to_string(),
        pool: pool_name(pool).into(),
        subnet: subnet.to_string(),
    }))
}
