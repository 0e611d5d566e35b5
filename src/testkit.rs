//! Builders for tests, benchmarks and golden vectors: fixed keys and ready-made ops. Not part of
//! the product; public only so integration tests and benches can share it.

use crate::hlc::Hlc;
use crate::identity::NodeKey;
use crate::ipam::IpamOp;
use crate::keys::PublicKey;
use crate::op::{self, LoggedOp, Op, OpBody};
use crate::tree::{NodeId, NodeKind, Permissions, TreeOp};

/// A node key from a one-byte seed (`[seed; 32]`): fixed, so vectors and tests are reproducible.
pub fn key(seed: u8) -> NodeKey {
    NodeKey::from_seed(&[seed; 32])
}

/// Grants `key` admin on the root.
pub fn grant_admin(key: PublicKey) -> OpBody {
    OpBody::Tree(TreeOp::Grant {
        node: NodeId::ROOT,
        key,
        permissions: Permissions::ADMIN,
    })
}

/// Creates a customer (`endpoint == false`) or endpoint node under `parent`.
pub fn create(parent: NodeId, hostname: &str, endpoint: bool) -> OpBody {
    let kind = if endpoint {
        NodeKind::Endpoint
    } else {
        NodeKind::Customer
    };
    OpBody::Tree(TreeOp::Create {
        parent,
        kind,
        hostname: hostname.into(),
        owner: None,
        wg_pubkey: None,
    })
}

/// Deletes a node.
pub fn delete(node: NodeId) -> OpBody {
    OpBody::Tree(TreeOp::Delete { node })
}

/// The origin claims IPAM block `block`.
pub fn claim_block(block: u32) -> OpBody {
    OpBody::Ipam(IpamOp::ClaimBlock { block })
}

/// Leases tunnel slot `slot` to `node`.
pub fn allocate(node: NodeId, slot: u32) -> OpBody {
    OpBody::Ipam(IpamOp::AllocateAddress { node, slot })
}

/// Releases `node`'s tunnel address.
pub fn release(node: NodeId) -> OpBody {
    OpBody::Ipam(IpamOp::ReleaseAddress { node })
}

/// Folds `ops` into `state` as authored by `server` itself, with seqs following `*seq` and HLC
/// wall times `1_000 + seq`; panics if one is refused (for tests of what the fold accepts).
pub fn apply_all(
    state: &mut crate::state::State,
    server: &PublicKey,
    seq: &mut u64,
    ops: Vec<OpBody>,
) {
    for body in ops {
        *seq += 1;
        let op = Op {
            origin: *server,
            seq: *seq,
            hlc: Hlc {
                wall_ms: 1_000 + *seq,
                logical: 0,
            },
            author: *server,
            body,
        };
        state.apply(&op).expect("applies");
    }
}

/// A signed op authored by its origin (no author proof).
pub fn sealed(origin: &NodeKey, seq: u64, hlc: Hlc, body: OpBody) -> Vec<u8> {
    let o = origin.public();
    op::seal_op(
        origin.pair(),
        &LoggedOp {
            op: Op {
                origin: o,
                seq,
                hlc,
                author: o,
                body,
            },
            author_proof: None,
        },
    )
}

/// Milliseconds since the unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An in-process API server state at genesis, for API tests and benches: a store in `dir`
/// created by `server` with `ipam`, the genesis ops appended (optionally granting `admin`), and
/// fixed public settings (WireGuard key `[5; 32]`, host 203.0.113.7, no dataplane, no TLS pin).
pub fn genesis_api_state(
    dir: &std::path::Path,
    server: NodeKey,
    registration: crate::api::join::Registration,
    admin: Option<PublicKey>,
    ipam: crate::ipam::IpamConfig,
) -> crate::api::ApiState {
    use crate::api::{ApiState, DataplaneInfo, Settings};
    let (mut store, _) =
        crate::store::Store::create(&dir.join("state.redb"), server.public(), ipam).expect("store");
    let ops =
        crate::server::genesis_ops(store.state(), &server.public(), [5; 32], "srv", admin, true)
            .expect("genesis");
    let batch = ops
        .into_iter()
        .map(|b| (server.public(), b, None))
        .collect();
    for r in store
        .append_local_batch(&server, batch, 1_000)
        .expect("append")
    {
        r.expect("genesis op");
    }
    let settings = Settings {
        registration,
        wg_public_key: [5; 32],
        wg_port: 51940,
        public_host: Some("203.0.113.7".into()),
        private_api_port: 9101,
        api_port: 9100,
        tls_pin: None,
    };
    let dataplane = DataplaneInfo {
        backend: "none".into(),
        fallback_reason: None,
        interface: None,
    };
    ApiState::new(server, store, settings, dataplane, None)
}
