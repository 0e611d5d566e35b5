//! Setup keys (as NetBird and headscale users expect): a secret that lets a device join a named
//! group, even when registration is closed. `POST /api/setup-keys` makes one; `POST /api/join`
//! with `setup_key` redeems it.
//!
//! **Storage: the signed state.** A key is one metadata entry on its target group,
//! `ln:sk:<hash>` → `<expires_at_ms>:<single|reusable>`, written by a signed op, so every server of
//! the cluster can redeem it after gossip and a restart keeps it. Only a hash of the secret is
//! stored (the secret is shown once, at creation). Redeeming a single-use key appends the
//! removal of its entry in the same batch as the join, under the store lock, so a second use on
//! the same server is refused.
//!
//! **Single use across a cluster: prevention, not repair.** A single-use key (and a link token)
//! names the server that issued it, and only that server redeems it; any other server answers
//! 409 `setup_key_other_server` naming the issuer. So two servers can never both accept one
//! single-use key, even while partitioned (the price: while its issuer is down the key waits, or
//! the administrator makes a new one). Reusable keys are redeemed by every server.
//!
//! A device joining with a key gets an endpoint node under the group, read and connect_private
//! on the group (it sees and reaches its group's peers) and edit_node on its own node (heartbeat),
//! nothing more: it cannot create, change or delete its group's nodes.
//!
//! Permission to make a key: add_child on the group (admitting a device is adding a child).

use actix_web::{HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

use super::{Caller, append_for, parse_node_id, require};
use crate::api::join::{JoinPlan, JoinRequest, Registration, find_device, plan_join};
use crate::api::{ApiError, ApiState};
use crate::hlc::Hlc;
use crate::keys::PublicKey;
use crate::op::OpBody;
use crate::state::State;
use crate::tree::{NodeField, NodeId, NodeKind, Permission, Permissions, TreeOp};

/// Longest validity of a setup key.
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;
const PREFIX: &str = "ln:sk:";
const SECRET_PREFIX: &str = "lnsk_";

/// The metadata key under which the key with `secret` is stored.
pub fn entry_key(secret: &str) -> String {
    let mut m = b"ln-setup-key:v1".to_vec();
    m.extend_from_slice(secret.as_bytes());
    format!(
        "{PREFIX}{}",
        hex::encode(&digest(&SHA256, &m).as_ref()[..16])
    )
}

/// A stored key's terms: `<expires_at_ms>:reusable` or `<expires_at_ms>:single:<issuer>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub expires_at_ms: u64,
    pub reusable: bool,
    /// The server that alone redeems a single-use key (`None` for reusable keys, and for
    /// single-use keys written before keys named their issuer: those any server redeems).
    pub issuer: Option<PublicKey>,
}

impl Terms {
    pub fn encode(self) -> String {
        match (self.reusable, self.issuer) {
            (true, _) => format!("{}:reusable", self.expires_at_ms),
            (false, Some(issuer)) => format!("{}:single:{issuer}", self.expires_at_ms),
            (false, None) => format!("{}:single", self.expires_at_ms),
        }
    }
    pub fn decode(s: &str) -> Option<Terms> {
        let mut parts = s.splitn(3, ':');
        let expires_at_ms = parts.next()?.parse().ok()?;
        let (reusable, issuer) = match (parts.next()?, parts.next()) {
            ("reusable", None) => (true, None),
            ("single", None) => (false, None),
            ("single", Some(k)) => (false, Some(k.parse().ok()?)),
            _ => return None,
        };
        Some(Terms {
            expires_at_ms,
            reusable,
            issuer,
        })
    }
}

/// What a device holding a setup key is granted on its group.
pub fn group_permissions() -> Permissions {
    Permissions::of(&[Permission::Read, Permission::ConnectPrivate])
}

/// Plans a join with a setup key (pure). A device already enrolled rejoins as without a key (the
/// key is not spent). Otherwise the key must exist and be unexpired at `now_ms`.
pub fn plan_join_with_key(
    state: &State,
    server: &PublicKey,
    next_seq: u64,
    req: &JoinRequest,
    secret: &str,
    now_ms: u64,
    now: Hlc,
) -> Result<JoinPlan, ApiError> {
    use actix_web::http::StatusCode;
    let tree = state.tree();
    if find_device(tree, &req.client).is_some() {
        return Ok(plan_join(
            state,
            server,
            next_seq,
            req,
            Registration::Closed,
            now,
        )?);
    }
    // The shared checks (hostname, WireGuard key) of an ordinary join, on a plan we discard.
    plan_join(state, server, next_seq, req, Registration::Open, now)?;
    let key = entry_key(secret.trim());
    let refused = |code, msg: &str| ApiError::new(StatusCode::FORBIDDEN, code, msg.to_owned());
    let (group, terms) = tree
        .nodes()
        .find_map(|n| Some((n.id, Terms::decode(n.metadata.get(&key)?)?)))
        .ok_or_else(|| refused("setup_key_invalid", "unknown or already used setup key"))?;
    if now_ms >= terms.expires_at_ms {
        return Err(refused("setup_key_expired", "this setup key has expired"));
    }
    if let Some(issuer) = terms.issuer.filter(|i| !terms.reusable && i != server) {
        let name = tree
            .nodes()
            .find(|n| n.kind == NodeKind::Server && n.owner == Some(issuer))
            .map_or_else(
                || issuer.to_string(),
                |n| format!("{} ({issuer})", n.hostname),
            );
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "setup_key_other_server",
            format!(
                "this single-use key can only be redeemed through the server that issued it: {name}; join through that server, or ask for a new key"
            ),
        ));
    }
    let mut ops = Vec::new();
    if !terms.reusable {
        ops.push(OpBody::Tree(TreeOp::Update {
            node: group,
            field: NodeField::Metadata { key, value: None },
        }));
    }
    let node = NodeId::derive(server, next_seq + ops.len() as u64);
    let hostname = req.hostname.clone().unwrap_or_else(|| {
        let h = digest(&SHA256, req.client.as_bytes());
        format!("device-{}", hex::encode(&h.as_ref()[..6]))
    });
    ops.extend([
        OpBody::Tree(TreeOp::Create {
            parent: group,
            kind: NodeKind::Endpoint,
            hostname,
            owner: Some(req.client),
            wg_pubkey: Some(req.wg_pubkey),
        }),
        OpBody::Tree(TreeOp::Grant {
            node: group,
            key: req.client,
            permissions: group_permissions(),
        }),
        OpBody::Tree(TreeOp::Grant {
            node,
            key: req.client,
            permissions: Permissions::of(&[Permission::EditNode]),
        }),
    ]);
    ops.extend(
        state
            .ipam()
            .propose_lease(server, node, now)
            .map_err(crate::api::join::JoinError::from)?
            .into_iter()
            .map(OpBody::Ipam),
    );
    Ok(JoinPlan {
        node,
        group,
        ops,
        existing: false,
    })
}

/// `POST /api/setup-keys` body.
#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    /// The group devices joining with the key land in.
    pub group: String,
    /// Usable any number of times until it expires (default: single use).
    #[serde(default)]
    pub reusable: bool,
    /// Validity in seconds (1 ..= one year).
    pub expires_in_secs: u64,
}

#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct CreateKeyResponse {
    /// The secret: shown once, never stored.
    /// `lnsk_` then base64url without padding (RFC 4648 §5) of 32 random bytes: 48 characters.
    #[schema(pattern = "^lnsk_[A-Za-z0-9_-]{43}$")]
    pub setup_key: String,
    pub group_id: String,
    pub reusable: bool,
    pub expires_at_ms: u64,
}

/// `POST /api/setup-keys`. Permission: add_child, on the target group.
#[utoipa::path(
    post,
    path = "/api/setup-keys",
    operation_id = "create_setup_key",
    tag = "private",
    security(("bearer" = [])),
    request_body = CreateKeyBody,
    responses(
        (status = 201, description = "Created; the secret is shown once", body = CreateKeyResponse),
        (status = 400, description = "Bad input", body = crate::api::ErrorBody),
        (status = 401, description = "Missing, expired or foreign token", body = crate::api::ErrorBody),
        (status = 403, description = "The caller lacks the permission", body = crate::api::ErrorBody),
        (status = 404, description = "No such node", body = crate::api::ErrorBody),
    )
)]
pub async fn post(
    state: web::Data<ApiState>,
    caller: Caller,
    body: web::Json<CreateKeyBody>,
) -> Result<HttpResponse, ApiError> {
    let group = parse_node_id(&body.group)?;
    let created = create(
        &state,
        caller,
        group,
        body.reusable,
        body.expires_in_secs,
        MAX_TTL_SECS,
    )
    .await?;
    Ok(HttpResponse::Created().json(created))
}

/// Makes a key for `group` valid `expires_in_secs` (1..=`max_secs`) after checking add_child on
/// it; shared with link tokens (single-use setup keys, [`super::link_tokens`]).
pub async fn create(
    state: &web::Data<ApiState>,
    caller: Caller,
    group: NodeId,
    reusable: bool,
    expires_in_secs: u64,
    max_secs: u64,
) -> Result<CreateKeyResponse, ApiError> {
    if expires_in_secs == 0 || expires_in_secs > max_secs {
        return Err(ApiError::bad_request(
            "bad_expiry",
            format!("expires_in_secs must be 1..={max_secs}"),
        ));
    }
    {
        let store = state.lock_store();
        let tree = store.state().tree();
        require(tree, &caller, Permission::AddChild, group)?;
        if tree.get(&group).map(|n| n.kind) != Some(NodeKind::Customer) {
            return Err(ApiError::bad_request(
                "not_a_group",
                "the target must be a customer group",
            ));
        }
    }
    let secret = format!(
        "{SECRET_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(state.random::<32>()?)
    );
    let terms = Terms {
        expires_at_ms: state
            .clock
            .now_ms()
            .saturating_add(expires_in_secs.saturating_mul(1000)),
        reusable,
        issuer: (!reusable).then(|| state.server.public()),
    };
    let op = OpBody::Tree(TreeOp::Update {
        node: group,
        field: NodeField::Metadata {
            key: entry_key(&secret),
            value: Some(terms.encode()),
        },
    });
    let st = state.clone().into_inner();
    web::block(move || append_for(&st, &caller, op))
        .await
        .map_err(ApiError::internal)??;
    Ok(CreateKeyResponse {
        setup_key: secret,
        group_id: group.to_string(),
        reusable: terms.reusable,
        expires_at_ms: terms.expires_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_round_trip_and_bad_text_is_refused() {
        for t in [
            Terms {
                expires_at_ms: 5,
                reusable: true,
                issuer: None,
            },
            Terms {
                expires_at_ms: u64::MAX,
                reusable: false,
                issuer: None,
            },
            Terms {
                expires_at_ms: 7,
                reusable: false,
                issuer: Some(PublicKey([9; 32])),
            },
        ] {
            assert_eq!(Terms::decode(&t.encode()), Some(t));
        }
        let bad_issuer = "5:single:not-a-key".to_owned();
        let with_issuer_on_reusable = format!("5:reusable:{}", PublicKey([9; 32]));
        for bad in [
            "",
            "5",
            "x:single",
            "5:other",
            ":reusable",
            &bad_issuer,
            &with_issuer_on_reusable,
        ] {
            assert_eq!(Terms::decode(bad), None, "{bad}");
        }
        assert!(entry_key("a").len() <= crate::tree::limits::MAX_METADATA_KEY_BYTES);
        assert_ne!(entry_key("a"), entry_key("b"));
    }

    /// A single-use key is redeemed only by its issuer; a reusable one by any server.
    #[test]
    fn single_use_keys_are_redeemed_only_by_their_issuer() {
        use crate::testkit::{create, key};
        use crate::tree::WgKey;
        let (root, issuer, other) = (key(1).public(), key(2).public(), key(3).public());
        let at = |wall_ms| Hlc {
            wall_ms,
            logical: 0,
        };
        let mut state = State::new(root);
        let mut seq = 0;
        let mut apply = |state: &mut State, body| {
            seq += 1;
            let op = crate::op::Op {
                origin: root,
                seq,
                hlc: at(seq),
                author: root,
                body,
            };
            state.apply(&op).expect("op applies");
        };
        apply(&mut state, create(NodeId::ROOT, "group", false));
        let group = state
            .tree()
            .nodes()
            .find(|n| n.hostname == "group")
            .map(|n| n.id)
            .expect("group");
        for (secret, reusable) in [("lnsk_single", false), ("lnsk_many", true)] {
            let terms = Terms {
                expires_at_ms: 1_000_000,
                reusable,
                issuer: (!reusable).then_some(issuer),
            };
            apply(
                &mut state,
                OpBody::Tree(TreeOp::Update {
                    node: group,
                    field: NodeField::Metadata {
                        key: entry_key(secret),
                        value: Some(terms.encode()),
                    },
                }),
            );
        }
        let req = JoinRequest {
            client: key(9).public(),
            wg_pubkey: WgKey([9; 32]),
            hostname: None,
        };
        let plan = |server: &PublicKey, secret| {
            plan_join_with_key(&state, server, 0, &req, secret, 10, at(100))
        };
        let refused = plan(&other, "lnsk_single").expect_err("other server refuses");
        assert_eq!(
            (refused.status.as_u16(), refused.code),
            (409, "setup_key_other_server")
        );
        assert!(refused.message.contains(&issuer.to_string()));
        let by_issuer = plan(&issuer, "lnsk_single").expect("the issuer redeems it");
        assert_eq!(by_issuer.group, group);
        assert_eq!(
            plan(&other, "lnsk_many").expect("reusable anywhere").group,
            group
        );
    }
}
