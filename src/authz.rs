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
/// | trust admit / revoke server          | (none here: the cluster root's signature on the certificate or revocation is the authority; `crate::state` checks it) | |
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
        OpBody::Trust(_) => Vec::new(),
    }
}

/// Checks every permission [`required`] by `body` for `author`.
pub fn authorize_op(tree: &Tree, author: &PublicKey, body: &OpBody) -> Result<(), Denied> {
    required(body)
        .into_iter()
        .try_for_each(|(permission, target)| authorize(tree, author, permission, target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::tree::{NodeKind, Permissions};

    const ANCHOR: PublicKey = PublicKey([1; 32]);
    const ALICE: PublicKey = PublicKey([2; 32]);
    const MALLORY: PublicKey = PublicKey([3; 32]);

    fn setup() -> (Tree, NodeId, NodeId, NodeId) {
        let mut tree = Tree::new(ANCHOR);
        let mk = |tree: &mut Tree, seq, parent, kind, name: &str| {
            let op = TreeOp::Create {
                parent,
                kind,
                hostname: name.into(),
                owner: None,
                wg_pubkey: None,
            };
            tree.apply(&op, &ANCHOR, seq, Hlc::default())
                .expect("create");
            NodeId::derive(&ANCHOR, seq)
        };
        let acme = mk(&mut tree, 1, NodeId::ROOT, NodeKind::Customer, "acme");
        let laptop = mk(&mut tree, 2, acme, NodeKind::Endpoint, "laptop");
        let other = mk(&mut tree, 3, NodeId::ROOT, NodeKind::Customer, "other");
        let grant = TreeOp::Grant {
            node: acme,
            key: ALICE,
            permissions: Permissions::of(&[Permission::EditNode]),
        };
        tree.apply(&grant, &ANCHOR, 4, Hlc::default())
            .expect("grant");
        (tree, acme, laptop, other)
    }

    #[test]
    fn grants_apply_to_the_subtree_only() {
        let (tree, acme, laptop, other) = setup();
        assert_eq!(authorize(&tree, &ALICE, Permission::EditNode, acme), Ok(()));
        assert_eq!(
            authorize(&tree, &ALICE, Permission::EditNode, laptop),
            Ok(()),
            "inherited"
        );
        assert!(
            authorize(&tree, &ALICE, Permission::EditNode, other).is_err(),
            "sibling subtree"
        );
        assert!(
            authorize(&tree, &ALICE, Permission::EditNode, NodeId::ROOT).is_err(),
            "not upwards"
        );
        assert!(
            authorize(&tree, &ALICE, Permission::DeleteNode, laptop).is_err(),
            "other permission"
        );
    }

    #[test]
    fn admin_implies_everything_and_strangers_get_nothing() {
        let (tree, _, laptop, _) = setup();
        for p in Permission::ALL {
            assert_eq!(authorize(&tree, &ANCHOR, p, laptop), Ok(()));
            assert_eq!(
                authorize(&tree, &MALLORY, p, laptop),
                Err(Denied::Lacks {
                    actor: MALLORY,
                    permission: p,
                    target: laptop
                })
            );
        }
        assert_eq!(
            authorize(&tree, &ANCHOR, Permission::Read, NodeId([7; 16])),
            Err(Denied::NoSuchNode(NodeId([7; 16])))
        );
    }

    #[test]
    fn the_table_names_both_ends_of_a_move() {
        let (tree, acme, laptop, other) = setup();
        let body = OpBody::Tree(TreeOp::Move {
            node: laptop,
            new_parent: other,
        });
        assert_eq!(
            required(&body),
            vec![
                (Permission::DeleteNode, laptop),
                (Permission::AddChild, other)
            ]
        );
        assert!(authorize_op(&tree, &ALICE, &body).is_err());
        let edit = OpBody::Tree(TreeOp::Update {
            node: laptop,
            field: crate::tree::NodeField::Hostname("x".into()),
        });
        assert_eq!(authorize_op(&tree, &ALICE, &edit), Ok(()));
        let claim = OpBody::Ipam(IpamOp::ClaimBlock { block: 0 });
        assert_eq!(
            required(&claim),
            vec![(Permission::AllocateIp, NodeId::ROOT)]
        );
        let _ = acme;
    }
}
