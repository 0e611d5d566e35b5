//! `GET /api/servers`: the servers of this cluster as the tree knows them (every `server` node),
//! this one first. Only this server's own API address is known until server membership and
//! gossip exist; the others are listed with their keys so a client can recognise them.

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::ApiState;
use crate::tree::NodeKind;

#[derive(Serialize, Deserialize, Debug, Clone, utoipa::ToSchema)]
pub struct ServerInfo {
    /// The server's Ed25519 identity key (base64).
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub server_key: String,
    pub hostname: String,
    /// Its client-plane WireGuard key (base64), if known.
    /// Standard base64 with padding (RFC 4648 §4): 44 characters, 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub wg_pubkey: Option<String>,
    /// `host:port` of its public API, when known (this server's own).
    pub api_endpoint: Option<String>,
    pub is_self: bool,
}

#[utoipa::path(
    get,
    path = "/api/servers",
    tag = "public",
    responses((status = 200, description = "The cluster's servers, this one first", body = [ServerInfo]))
)]
pub async fn get(state: web::Data<ApiState>, http: HttpRequest) -> HttpResponse {
    let me = state.server.public();
    let host = state
        .settings
        .public_host
        .clone()
        .unwrap_or_else(|| super::join::host_only(http.connection_info().host()));
    let mut list: Vec<ServerInfo> = {
        let store = state.lock_store();
        store
            .state()
            .tree()
            .nodes()
            .filter(|n| n.kind == NodeKind::Server)
            .filter_map(|n| {
                let owner = n.owner?;
                let is_self = owner == me;
                Some(ServerInfo {
                    server_key: owner.to_string(),
                    hostname: n.hostname.clone(),
                    wg_pubkey: n.wg_pubkey.map(|k| STANDARD.encode(k.0)),
                    api_endpoint: is_self
                        .then(|| super::join::endpoint(&host, state.settings.api_port)),
                    is_self,
                })
            })
            .collect()
    };
    list.sort_by_key(|s| !s.is_self);
    HttpResponse::Ok().json(list)
}
