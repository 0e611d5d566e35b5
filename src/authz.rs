//! Authorization: the ONE function that decides who may do what ([`authorize`]), and the ONE table
//! of which permission each op needs ([`required`]). Every op in the fold and (later) every API
//! route asks `authorize`; nothing else in the code base decides a permission question.
//!
//! Rule: `actor` holds `permission` on `target` when a grant to `actor` on `target` or on any of
//! its ancestors includes `permission` or `admin`. Grants are inherited down the tree, never up.

use crate::ipam::IpamOp;
use crate::keys::PublicKey;
use crate::op::OpBody;
use crate::tree::{NodeId, Permission, Tree, TreeOp};

/// An authorization refusal. Display says who lacked what where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("{actor} lacks the {} permission on node {target}", permission.name())]
    Lacks {
        actor: PublicKey,
        permission: Permission,
        target: NodeId,
    },
    #[error("no node {0} to authorize against")]
    NoSuchNode(NodeId),
}

/// Decides whether `actor` holds `permission` on `target` (see the module rule).
pub fn authorize(
    tree: &Tree,
    actor: &PublicKey,
    permission: Permission,
    target: NodeId,
) -> Result<(), Denied> {
    if tree.get(&target).is_none() {
        return Err(Denied::NoSuchNode(target));
    }
    let granted = tree
        .path_to_root(&target)
        .any(|node| node.grants.get(actor).is_some_and(|g| g.allows(permission)));
    if granted {
        Ok(())
    } else {
        Err(Denied::Lacks {
            actor: *actor,
            permission,
            target,
        })
    }
}

/// THE table: the permissions (and the node each is checked on) that an op's author must hold.
/// All of them are required.
///
/// | op                                   | permission      | on                 |
/// |--------------------------------------|-----------------|--------------------|
/// | tree create                          | add_child       | the parent         |
/// | tree update (any field)              | edit_node       | the node           |
/// | tree move                            | delete_node     | the node           |
/// |                                      | add_child       | the new parent     |
/// | tree delete                          | delete_node     | the node           |
/// | tree grant / revoke                  | admin           | the node           |
/// | ipam claim_block / release_block     | allocate_ip     | the root           |
/// | ipam allocate / release address      | allocate_ip     | the node           |
/// | ipam allocate / release subnet       | allocate_ip     | the node           |
/// | ipam expand_subnet                   | expand_subnet   | the node           |
/// | ipam join / leave backbone           | allocate_ip     | the server node    |
pub fn required(body: &OpBody) -> Vec<(Permission, NodeId)> {
    use Permission::*;
    match body {
        OpBody::Tree(op) => match op {
            TreeOp::Create { parent, .. } => vec![(AddChild, *parent)],
            TreeOp::Update { node, .. } => vec![(EditNode, *node)],
            TreeOp::Move { node, new_parent } => vec![(DeleteNode, *node), (AddChild, *new_parent)],
            TreeOp::Delete { node } => vec![(DeleteNode, *node)],
            TreeOp::Grant { node, .. } | TreeOp::Revoke { node, .. } => vec![(Admin, *node)],
        },
        OpBody::Ipam(op) => match op {
            IpamOp::ClaimBlock { .. } | IpamOp::ReleaseBlock { .. } => {
                vec![(AllocateIp, NodeId::ROOT)]
            }
            IpamOp::AllocateAddress { node, .. }
            | IpamOp::ReleaseAddress { node }
            | IpamOp::AllocateSubnet { node, .. }
            | IpamOp::ReleaseSubnet { node, .. }
            | IpamOp::JoinBackbone { node }
            | IpamOp::LeaveBackbone { node } => vec![(AllocateIp, *node)],
            IpamOp::ExpandSubnet { node, .. } => vec![(ExpandSubnet, *node)],
        },
    }
}

/// Checks every permission [`required`] by `body` for `author`.
pub fn authorize_op(tree: &Tree, author: &PublicKey, body: &OpBody) -> Result<(), Denied> {
    required(body)
        .into_iter()
        .try_for_each(|(permission, target)| authorize(tree, author, permission, target))
}
