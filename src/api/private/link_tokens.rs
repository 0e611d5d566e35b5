//! `POST /api/link-tokens`: a short-lived, single-use token a group member hands to a new device
//! so it joins the member's group (`lemonade-nexus join` / `POST /api/join` with
//! `setup_key = <link token>`).
//!
//! A link token **is a single-use setup key** (same storage, same redemption, see
//! [`super::setup_keys`]), with a short default life (10 minutes, at most 24 hours) and made for
//! the caller's own group unless another group is named. Permission: add_child on the group, as for
//! any setup key (admitting a device is adding a child).

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::{Caller, parse_node_id, setup_keys};
use crate::api::{ApiError, ApiState};

/// Default life of a link token.
pub const DEFAULT_TTL_SECS: u64 = 10 * 60;
/// Longest life of a link token.
pub const MAX_TTL_SECS: u64 = 24 * 3600;

/// `POST /api/link-tokens` body (may be `{}`).
#[derive(Deserialize, Debug, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkTokenBody {
    /// The group the new device joins (default: the group of the token's device).
    pub group: Option<String>,
    /// Validity in seconds, 1..=86400 (default 600).
    pub expires_in_secs: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct LinkTokenResponse {
    /// The secret: shown once; redeem it as `setup_key` in `POST /api/join`. Single use.
    /// `lnsk_` then base64url without padding (RFC 4648 §5) of 32 random bytes: 48 characters.
    #[schema(pattern = "^lnsk_[A-Za-z0-9_-]{43}$")]
    pub link_token: String,
    pub group_id: String,
    pub expires_at_ms: u64,
}

/// `POST /api/link-tokens`. Permission: add_child, on the group.
#[utoipa::path(
    post,
    path = "/api/link-tokens",
    operation_id = "create_link_token",
    tag = "private",
    security(("bearer" = [])),
    request_body = LinkTokenBody,
    responses(
        (status = 201, description = "Created; the secret is shown once and works once", body = LinkTokenResponse),
        (status = 400, description = "Bad input (expiry out of range, no group and no device)", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
    )
)]
pub async fn post(
    state: web::Data<ApiState>,
    caller: Caller,
    body: web::Json<LinkTokenBody>,
) -> Result<HttpResponse, ApiError> {
    let group = match &body.group {
        Some(g) => parse_node_id(g)?,
        None => {
            let node = caller.0.node.ok_or_else(|| {
                ApiError::bad_request(
                    "no_device",
                    "this token names no device node; name the group",
                )
            })?;
            let store = state.lock_store();
            store
                .state()
                .tree()
                .get(&node)
                .and_then(|n| n.parent)
                .ok_or_else(|| super::denied(crate::authz::Denied::NoSuchNode(node)))?
        }
    };
    let ttl = body.expires_in_secs.unwrap_or(DEFAULT_TTL_SECS);
    let key = setup_keys::create(&state, caller, group, false, ttl, MAX_TTL_SECS).await?;
    Ok(HttpResponse::Created().json(LinkTokenResponse {
        link_token: key.setup_key,
        group_id: key.group_id,
        expires_at_ms: key.expires_at_ms,
    }))
}
