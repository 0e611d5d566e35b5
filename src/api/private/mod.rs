//! The private HTTPS API (DESIGN §2): served on the server's tunnel addresses only (port 9101),
//! so only enrolled devices reach it, through the tunnel. One module per resource:
//!
//! | route                              | module         | permission (checked on)            |
//! |------------------------------------|----------------|------------------------------------|
//! | `GET    /api/tree`                 | [`tree`]       | read (each node returned)          |
//! | `GET    /api/tree/{id}`            | [`tree`]       | read (the node)                    |
//! | `GET    /api/tree/{id}/children`   | [`tree`]       | read (the node)                    |
//! | `POST   /api/tree/{id}/children`   | [`tree`]       | add_child (the node)               |
//! | `PATCH  /api/tree/{id}`            | [`tree`]       | edit_node (the node)               |
//! | `DELETE /api/tree/{id}`            | [`tree`]       | delete_node (the node)             |
//! | `POST   /api/heartbeat`            | [`heartbeat`]  | edit_node (the caller's device)    |
//! | `GET    /api/mesh/peers`           | [`mesh`]       | connect_private (the caller's group)|
//! | `GET    /api/mesh/status`          | [`mesh`]       | read (the group)                   |
//! | `POST   /api/setup-keys`           | [`setup_keys`] | add_child (the target group)       |
//! | `POST   /api/link-tokens`          | [`link_tokens`]| add_child (the group)              |
//! | `POST   /api/ops`                  | [`ops`]        | the op's (authz table), by its signer |
//! | `POST   /api/ipam/subnets`         | [`ipam`]       | allocate_ip (the node)             |
//! | `POST   /api/ipam/subnets/{id}/expand` | [`ipam`]   | expand_subnet (the node)           |
//!
//! Every route takes a [`Caller`]: the `Authorization: Bearer <token>` header verified with
//! [`auth::verify_token`] (short-lived, signed by any server of the cluster). A missing, expired
//! or foreign token is a 401. Every route then asks [`authz::authorize`], the one authorization
//! function, for the permission it names; a refusal is a 403 (an unknown node a 404). Changes are
//! signed ops appended by this server with [`Store::append_local`](crate::store::Store): the server
//! authors them (it holds admin on the root), after the route checked the caller's permission for
//! exactly that op with [`authz::authorize_op`] (the table in `authz`). Errors have the public
//! API's JSON shape.

pub mod heartbeat;
pub mod ipam;
pub mod link_tokens;
pub mod mesh;
pub mod ops;
pub mod setup_keys;
pub mod tree;

use std::future::{Ready, ready};
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, web};

use super::auth::{self, TokenClaims};
use super::{ApiError, ApiState, CommonResponses};
use crate::authz::{self, Denied};
use crate::op::OpBody;
use crate::store::Submitted;
use crate::tree::{NodeId, Permission};

/// Metadata keys the API reserves for itself (setup keys); users cannot set them.
pub const RESERVED_METADATA_PREFIX: &str = "ln:";

/// The authenticated caller of a private route (from its bearer token).
#[derive(Clone, Debug)]
pub struct Caller(pub TokenClaims);

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(caller(req))
    }
}

fn caller(req: &HttpRequest) -> Result<Caller, ApiError> {
    let state = req
        .app_data::<web::Data<ApiState>>()
        .ok_or_else(|| ApiError::internal("private API without state"))?;
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
    let token = header
        .to_str()
        .ok()
        // The scheme name is case-insensitive (RFC 9110 §11.1).
        .and_then(|h| {
            h.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| &h[7..])
        })
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be Bearer <token>"))?;
    let now = state.clock.now_ms();
    let store = state.lock_store();
    let claims = auth::verify_token(store.state().tree(), token, now)
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    Ok(Caller(claims))
}

/// Maps an authorization refusal: an unknown node is a 404, a missing permission a 403.
pub fn denied(e: Denied) -> ApiError {
    match e {
        Denied::NoSuchNode(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "no_such_node", e.to_string())
        }
        Denied::Lacks { .. } => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
    }
}

/// The route's permission check: `caller` must hold `permission` on `target`.
pub fn require(
    tree: &crate::tree::Tree,
    caller: &Caller,
    permission: Permission,
    target: NodeId,
) -> Result<(), ApiError> {
    authz::authorize(tree, &caller.0.subject, permission, target).map_err(denied)
}

/// Parses a node id (32 hex digits) from a path.
pub fn parse_node_id(s: &str) -> Result<NodeId, ApiError> {
    hex::decode(s)
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map(NodeId)
        .ok_or_else(|| ApiError::bad_request("bad_node_id", "a node id is 32 hex digits"))
}

/// Checks that `caller` may cause `body` (the authz table, with the caller as author) and appends
/// it as this server's op. Returns the op's seq in this server's log. Runs with the store locked,
/// so the check and the append see the same state.
pub fn append_for(state: &ApiState, caller: &Caller, body: OpBody) -> Result<u64, ApiError> {
    let mut store = state.lock_store();
    authz::authorize_op(store.state().tree(), &caller.0.subject, &body).map_err(denied)?;
    let server = state.server.public();
    let now = state.clock.now_ms();
    let r = store
        .append_local(&state.server, server, body, None, now)
        .map_err(ApiError::internal)?;
    state.state_changed();
    match r {
        Submitted::Appended {
            effect: Ok(()),
            seq,
            ..
        } => Ok(seq),
        // In the log with no effect (identically on every server): say why.
        Submitted::Appended { effect: Err(e), .. } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "refused_by_state",
            e.to_string(),
        )),
        Submitted::Duplicate { .. } => Err(ApiError::internal("a fresh local op was a duplicate")),
    }
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route (or method not allowed)",
    ))
}

/// Declares the bearer-token security scheme the private routes name.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build();
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The OpenAPI 3.1 document of the private API, generated from the handlers and types
/// (committed as `data-schema/openapi-private.json`; a test fails when the two drift apart).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Lemonade Nexus private API",
        description = "Served on the server's tunnel address only. Every route needs Authorization: Bearer <token> and names one permission. Errors are {\"error\": {\"code\", \"message\"}}."
    ),
    paths(
        tree::get_visible,
        tree::get_node,
        tree::get_children,
        tree::post_child,
        tree::patch_node,
        tree::delete_node,
        heartbeat::post,
        mesh::get_peers,
        mesh::get_status,
        setup_keys::post,
        ipam::allocate,
        ipam::expand,
        link_tokens::post,
        ops::post
    ),
    components(schemas(super::ErrorBody, super::ErrorDetail)),
    modifiers(&BearerScheme, &CommonResponses)
)]
pub struct PrivateApiDoc;

/// The document as pretty JSON (what is committed).
pub fn openapi_document() -> String {
    use utoipa::OpenApi;
    let mut doc = PrivateApiDoc::openapi();
    doc.info.version = "1".into();
    doc.to_pretty_json().unwrap_or_default() + "\n"
}

/// `GET /api/openapi.json` on the private listener: this document (no token needed: it is public
/// knowledge, and reachable only through the tunnel anyway).
async fn openapi_json() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body(openapi_document())
}

/// Registers the private API on an actix app: `App::new().configure(api::private::routes(state))`.
pub fn routes(state: Arc<ApiState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::from(state))
            .app_data(super::json_config())
            .default_service(web::to(not_found))
            .app_data(
                web::QueryConfig::default()
                    .error_handler(|e, _| ApiError::bad_request("bad_query", e.to_string()).into()),
            )
            .app_data(
                web::PathConfig::default()
                    .error_handler(|e, _| ApiError::bad_request("bad_path", e.to_string()).into()),
            )
            .service(
                web::scope("")
                    .wrap(actix_web::middleware::from_fn(super::ratelimit::limit))
                    .route("/api/tree", web::get().to(tree::get_visible))
                    .route("/api/tree/{id}", web::get().to(tree::get_node))
                    .route("/api/tree/{id}", web::patch().to(tree::patch_node))
                    .route("/api/tree/{id}", web::delete().to(tree::delete_node))
                    .route("/api/tree/{id}/children", web::get().to(tree::get_children))
                    .route("/api/tree/{id}/children", web::post().to(tree::post_child))
                    .route("/api/heartbeat", web::post().to(heartbeat::post))
                    .route("/api/mesh/peers", web::get().to(mesh::get_peers))
                    .route("/api/mesh/status", web::get().to(mesh::get_status))
                    .route("/api/setup-keys", web::post().to(setup_keys::post))
                    .route("/api/ops", web::post().to(ops::post))
                    .route("/api/link-tokens", web::post().to(link_tokens::post))
                    .route("/api/ipam/subnets", web::post().to(ipam::allocate))
                    .route(
                        "/api/ipam/subnets/{id}/expand",
                        web::post().to(ipam::expand),
                    )
                    .route("/api/openapi.json", web::get().to(openapi_json))
                    .default_service(web::to(not_found)),
            );
    }
}
