//! `POST /api/ops`: submit a change the caller signed itself. The body carries an author's
//! request ([`op::seal_request`]: the canonical op body in an envelope signed by the caller's
//! Ed25519 key, with a validity window and a nonce). The server opens it ([`op::open_request`]),
//! requires that its signer is the token's subject, checks with [`authz::authorize_op`] that the
//! author may cause exactly that op (the table the store's fold applies), and appends it as this
//! server's op with the author's proof kept in it, so every server re-checks the author's
//! signature. Permission: whatever the op needs (the `authz` table), held by the signer, plus the
//! same limits the dedicated routes apply (see `api_policy`): no root or server nodes, owner/WireGuard
//! key changes need admin, `ln:` metadata keys are reserved, no block or backbone ops.
//!
//! A request takes effect once. Before appending, the server checks the op against the request
//! ids already in the log and against the current state (a dry run of the fold on a copy): a
//! replayed request, or one the state refuses, is answered 409 `refused_by_state` WITHOUT being
//! appended, so refusals do not grow the replicated log. The check and the append run under one
//! store lock; the fold stays authoritative (an op that passed the check and still had no effect,
//! say because a replicated op sorted before it, is in the log and answered 409 the same way).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::{Caller, denied};
use crate::api::{ApiError, ApiState};
use crate::authz;
use crate::ipam::IpamOp;
use crate::op::{self, OpBody};
use crate::store::Submitted;
use crate::tree::{NodeField, NodeKind, Permission, TreeOp};

/// How far in the future a request's `issued_at_ms` may be (client clock skew).
pub const MAX_SKEW_MS: u64 = 30_000;

#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// The signed request (`op::seal_request` bytes), base64 (standard alphabet).
    /// Standard base64 with padding (RFC 4648 §4) of the signed envelope bytes (at most 64 KiB).
    #[schema(pattern = "^[A-Za-z0-9+/]*={0,2}$")]
    pub request: String,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct SubmitResponse {
    /// The op's seq in this server's log.
    pub seq: u64,
    /// The author (the token's subject).
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub author: String,
}

/// `POST /api/ops`. Permission: the one the op needs, held by its signer (= the caller).
#[utoipa::path(
    post,
    path = "/api/ops",
    operation_id = "submit_op",
    tag = "private",
    security(("bearer" = [])),
    request_body = SubmitBody,
    responses(
        (status = 201, description = "Appended with effect", body = SubmitResponse),
        (status = 400, description = "Bad input (not base64, bad signature, expired or too long a window)", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "Signed by someone other than the caller, or the signer lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
        (status = 409, description = "Refused by the state (a replayed request, a conflicting change)", body = crate::api::ErrorBody),
    )
)]
pub async fn post(
    state: web::Data<ApiState>,
    caller: Caller,
    body: web::Json<SubmitBody>,
) -> Result<HttpResponse, ApiError> {
    let bytes = STANDARD
        .decode(body.request.trim())
        .map_err(|_| ApiError::bad_request("bad_request_encoding", "request must be base64"))?;
    let now = state.clock.now_ms();
    let accepted = op::open_request(&bytes, now, MAX_SKEW_MS)
        .map_err(|e| ApiError::bad_request("bad_signed_request", e.to_string()))?;
    if accepted.author != caller.0.subject {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "author_mismatch",
            "the request must be signed by the token's own key",
        ));
    }
    let st = state.clone().into_inner();
    let author = accepted.author;
    let seq = web::block(move || append_request(&st, accepted))
        .await
        .map_err(ApiError::internal)??;
    Ok(HttpResponse::Created().json(SubmitResponse {
        seq,
        author: author.to_string(),
    }))
}

/// The API's policy on top of the authz table, the same the dedicated routes apply, so a signed
/// op cannot do what the routes refuse: no root or server nodes (a server node's owner may sign
/// tokens for the cluster), an owner other than oneself or a WireGuard key needs admin, `ln:`
/// metadata keys are reserved (setup keys), and server-only IPAM ops (blocks, backbone) are the
/// servers' own.
fn api_policy(
    tree: &crate::tree::Tree,
    author: &crate::keys::PublicKey,
    body: &OpBody,
) -> Result<(), ApiError> {
    let refuse = |msg: &str| ApiError::bad_request("op_not_allowed", msg.to_owned());
    let admin_on = |node| authz::authorize(tree, author, Permission::Admin, node).map_err(denied);
    match body {
        OpBody::Tree(TreeOp::Create {
            parent,
            kind,
            owner,
            wg_pubkey,
            ..
        }) => {
            if matches!(kind, NodeKind::Root | NodeKind::Server) {
                return Err(refuse(
                    "root and server nodes are never created through the API",
                ));
            }
            if owner.is_some_and(|o| o != *author) || wg_pubkey.is_some() {
                admin_on(*parent)?;
            }
        }
        OpBody::Tree(TreeOp::Update { node, field }) => match field {
            NodeField::Owner(_) | NodeField::WgPublicKey(_) => admin_on(*node)?,
            NodeField::Metadata { key, .. } if key.starts_with(super::RESERVED_METADATA_PREFIX) => {
                return Err(refuse("metadata keys starting with ln: are reserved"));
            }
            _ => {}
        },
        OpBody::Ipam(
            IpamOp::ClaimBlock { .. }
            | IpamOp::ReleaseBlock { .. }
            | IpamOp::JoinBackbone { .. }
            | IpamOp::LeaveBackbone { .. },
        ) => return Err(refuse("block and backbone ops are the servers' own")),
        _ => {}
    }
    Ok(())
}

/// Why a request would have no effect (see the module docs).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("request {nonce} of {author} was already submitted (a replay has no effect)")]
    Replayed {
        author: crate::keys::PublicKey,
        nonce: u64,
    },
    #[error("{0}")]
    State(crate::state::Rejection),
}

/// The dry run: would `req`, appended now as `server`'s next op, take effect? Checks the request
/// ids in the log, then folds the op into a copy of the state with the seq and HLC the append
/// will give it. (Copying the state costs a little per submission; client-signed ops are rare
/// next to joins and heartbeats, and a refusal no longer costs a log entry on every server.)
fn would_take_effect(
    store: &crate::store::Store,
    server: crate::keys::PublicKey,
    req: &op::AcceptedRequest,
    now_ms: u64,
) -> Result<(), Refusal> {
    // A failed read leaves the decision to the fold, which refuses a replay all the same.
    let seen = store
        .request_seen(&req.author, req.proof.nonce)
        .unwrap_or(false);
    if seen {
        return Err(Refusal::Replayed {
            author: req.author,
            nonce: req.proof.nonce,
        });
    }
    let probe = op::Op {
        origin: server,
        seq: store.heads().get(&server).copied().unwrap_or(0) + 1,
        hlc: store.clock().tick(now_ms),
        author: req.author,
        body: req.body.clone(),
    };
    let mut copy = store.state().clone();
    copy.apply(&probe).map_err(Refusal::State)
}

/// Checks and appends under one store lock (the check and the append see the same state).
fn append_request(state: &ApiState, req: op::AcceptedRequest) -> Result<u64, ApiError> {
    let mut store = state.lock_store();
    authz::authorize_op(store.state().tree(), &req.author, &req.body).map_err(denied)?;
    api_policy(store.state().tree(), &req.author, &req.body)?;
    let now = state.clock.now_ms();
    would_take_effect(&store, state.server.public(), &req, now)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "refused_by_state", e.to_string()))?;
    let r = store
        .append_local(&state.server, req.author, req.body, Some(req.proof), now)
        .map_err(ApiError::internal)?;
    state.state_changed();
    match r {
        Submitted::Appended {
            effect: Ok(()),
            seq,
            ..
        } => Ok(seq),
        Submitted::Appended { effect: Err(e), .. } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "refused_by_state",
            e.to_string(),
        )),
        Submitted::Duplicate { .. } => Err(ApiError::internal("a fresh local op was a duplicate")),
    }
}
