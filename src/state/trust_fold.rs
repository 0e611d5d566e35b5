//! The fold of trust ops (`OpBody::Trust`): server admission and revocation. The rules are in
//! `crate::trust`'s module doc; here they are applied to the tree, the IPAM and the trust table.
//! Deterministic: the only clock is the op's HLC (certificate expiry is checked against it).

use super::{Rejection, State};
use crate::ipam::{IpamOp, OpCtx};
use crate::keys::PublicKey;
use crate::op::Op;
use crate::tree::{NodeId, NodeKind, Permission, Permissions, TreeOp};
use crate::trust::{self, ServerStatus, TrustError, TrustOp};

impl State {
    /// Applies one trust op. Every check comes before the first change, so a refused op changes
    /// nothing.
    pub(super) fn apply_trust(&mut self, t: &TrustOp, op: &Op) -> Result<(), Rejection> {
        let root = *self.tree.anchor();
        match t {
            TrustOp::AdmitServer { cert } => {
                let cert = trust::verify_server_cert(cert, &root, op.hlc.wall_ms)?;
                // A server admits itself: its own first op, so the envelope signature (the
                // origin's) is the certified key's.
                if cert.server != op.author || op.author != op.origin {
                    return Err(TrustError::NotTheAuthor {
                        cert_server: cert.server,
                        author: op.author,
                    }
                    .into());
                }
                if self.is_revoked(&cert.server) {
                    return Err(TrustError::Revoked(cert.server).into());
                }
                let holds_admin = self
                    .tree
                    .get(&NodeId::ROOT)
                    .and_then(|r| r.grants.get(&cert.server))
                    .is_some_and(|g| g.allows(Permission::Admin));
                if !holds_admin {
                    // The only step that can fail (the root's grant limit): before any change.
                    let grant = TreeOp::Grant {
                        node: NodeId::ROOT,
                        key: cert.server,
                        permissions: Permissions::ADMIN,
                    };
                    self.tree.apply(&grant, &op.origin, op.seq, op.hlc)?;
                }
                let admitted = self
                    .trust
                    .get(&cert.server)
                    .and_then(|s| s.admitted)
                    .unwrap_or(op.hlc);
                self.trust.put(
                    cert.server,
                    ServerStatus {
                        name: cert.name,
                        admitted: Some(admitted),
                        expires_at_ms: cert.expires_at_ms,
                        revoked: None,
                        revoke_reason: String::new(),
                    },
                );
            }
            TrustOp::RevokeServer { revocation } => {
                let r = trust::verify_revocation(revocation, &root)?;
                // The carrier is a server acting for itself: an active server, or the root key
                // itself running as the (single) server.
                let carrier_ok = op.author == op.origin
                    && (op.origin == root || self.is_active_server(&op.origin));
                if !carrier_ok {
                    return Err(TrustError::CarrierNotActive(op.author).into());
                }
                if r.server == root {
                    return Err(TrustError::RootNotRevocable(root).into());
                }
                if self.is_revoked(&r.server) {
                    // The same revocation carried by a second server: already in effect.
                    return Ok(());
                }
                self.cut_off(&r.server, op);
                let mut status = self.trust.get(&r.server).cloned().unwrap_or(ServerStatus {
                    name: String::new(),
                    admitted: None,
                    expires_at_ms: 0,
                    revoked: None,
                    revoke_reason: String::new(),
                });
                status.revoked = Some(op.hlc);
                status.revoke_reason = r.reason;
                self.trust.put(r.server, status);
            }
        }
        Ok(())
    }

    /// Removes every grant `key` holds and takes its server nodes off the backbone. Never fails:
    /// each step only undoes what the fold let in before (existing nodes, valid permission bits,
    /// never the anchor's root grant, which the caller excluded).
    fn cut_off(&mut self, key: &PublicKey, op: &Op) {
        let grants: Vec<(NodeId, Permissions)> = self
            .tree
            .nodes()
            .filter_map(|n| n.grants.get(key).map(|p| (n.id, *p)))
            .collect();
        for (node, permissions) in grants {
            let revoke = TreeOp::Revoke {
                node,
                key: *key,
                permissions,
            };
            let r = self.tree.apply(&revoke, &op.origin, op.seq, op.hlc);
            debug_assert!(r.is_ok(), "removing an existing grant cannot fail: {r:?}");
        }
        let on_backbone: Vec<NodeId> = self
            .tree
            .nodes()
            .filter(|n| n.kind == NodeKind::Server && n.owner.as_ref() == Some(key))
            .map(|n| n.id)
            .filter(|id| self.ipam.backbone_address(id).is_some())
            .collect();
        let ctx = OpCtx {
            origin: &op.origin,
            author: &op.author,
            hlc: op.hlc,
        };
        for node in on_backbone {
            let r = self
                .ipam
                .apply(&IpamOp::LeaveBackbone { node }, ctx, &self.tree);
            debug_assert!(
                r.is_ok(),
                "leaving a held backbone address cannot fail: {r:?}"
            );
        }
    }
}
