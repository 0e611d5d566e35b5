//! `GET /api/health`: liveness, the dataplane backend (and whether it fell back to userspace),
//! the state hash and the server's identity key.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::{ApiState, DataplaneInfo};

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub service: &'static str,
    pub version: &'static str,
    /// The server's Ed25519 identity key (base64).
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub server_key: String,
    /// The cluster's trust anchor (base64).
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub cluster_root: String,
    /// Hex SHA-256 of the replicated state: equal on every server holding the same ops.
    pub state_hash: String,
    pub dataplane: DataplaneInfo,
    /// True when `auto` fell back to the userspace backend.
    pub dataplane_fell_back: bool,
    pub registration: super::join::Registration,
    /// Ops in the replicated log (servers with the same ops have the same state hash).
    #[serde(default)]
    pub op_count: u64,
    /// Gossip with the other servers: listen address, every known server (alive / suspect /
    /// dead, connected or not) and counters. Absent when no gossip runs in this process.
    #[serde(default)]
    pub gossip: Option<crate::gossip::node::GossipStatus>,
}

#[utoipa::path(
    get,
    path = "/api/health",
    tag = "public",
    responses((status = 200, description = "The server is up", body = Health))
)]
pub async fn get(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "ok",
        service: "lemonade-nexus",
        version: env!("CARGO_PKG_VERSION"),
        server_key: state.server.public().to_string(),
        cluster_root: state.root.to_string(),
        state_hash: hex::encode(state.state_hash()),
        dataplane: state.dataplane.clone(),
        dataplane_fell_back: state.dataplane.fallback_reason.is_some(),
        registration: state.settings.registration,
        op_count: state
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .op_count()
            .unwrap_or(0),
        gossip: crate::gossip::node::running().map(|g| g.status()),
    })
}
