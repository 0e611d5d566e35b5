//! `POST /api/trust/revocations`: a server revocation signed by the cluster root enters this
//! server's log (and from there every server's). Public and unauthenticated on purpose: the
//! root's signature is the whole authority, so anyone holding a valid revocation may deliver it
//! (`lemonade-nexus revoke-server --submit`). Rate-limited like every public route.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::op::OpBody;
use crate::store::Submitted;
use crate::trust::cli::{RevocationBody, decode_object};
use crate::trust::{self, TrustOp};

/// The answer to an accepted revocation.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct RevocationAccepted {
    /// The revoked server's key (base64).
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub server: String,
    /// `revoked` (appended now) or `already_revoked` (the cluster already folded it).
    pub status: String,
}

#[utoipa::path(
    post,
    path = "/api/trust/revocations",
    tag = "public",
    request_body = RevocationBody,
    responses(
        (status = 200, description = "The revocation is in effect", body = RevocationAccepted),
        (status = 400, description = "Not a valid revocation by this cluster's root", body = super::ErrorBody),
    )
)]
pub async fn post_revocation(
    state: web::Data<ApiState>,
    body: web::Json<RevocationBody>,
) -> Result<HttpResponse, ApiError> {
    let bytes = decode_object(&body.revocation)
        .map_err(|e| ApiError::bad_request("bad_revocation", format!("{e:#}")))?;
    let r = trust::verify_revocation(&bytes, &state.root)
        .map_err(|e| ApiError::bad_request("bad_revocation", e.to_string()))?;
    if r.server == state.root {
        return Err(ApiError::bad_request(
            "bad_revocation",
            trust::TrustError::RootNotRevocable(state.root).to_string(),
        ));
    }
    let now = state.clock.now_ms();
    let answer = |status: &str| RevocationAccepted {
        server: r.server.to_string(),
        status: status.to_owned(),
    };
    let version = {
        let mut store = state.lock_store();
        if store.state().is_revoked(&r.server) {
            return Ok(HttpResponse::Ok().json(answer("already_revoked")));
        }
        let body = OpBody::Trust(TrustOp::RevokeServer { revocation: bytes });
        let me = state.server.public();
        let submitted = store
            .append_local(&state.server, me, body, None, now)
            .map_err(ApiError::internal)?;
        state.state_changed();
        if let Submitted::Appended { effect: Err(e), .. } = submitted {
            // In the log with no effect (e.g. this server is itself revoked): say why.
            return Err(ApiError::bad_request("revocation_refused", e.to_string()));
        }
        // Read under the store lock: the version that includes the revocation.
        state.version()
    };
    tracing::warn!(server = %r.server, reason = %r.reason, "server revoked by the cluster root");
    // The revoked server leaves the backbone: wake the reconcilers now, without waiting for them.
    if let Some(p) = &state.peers {
        p.sync(version, std::time::Duration::ZERO).await;
    }
    Ok(HttpResponse::Ok().json(answer("revoked")))
}
