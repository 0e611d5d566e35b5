//! Pure diff for what rtnetlink programs on a link: interface addresses, routes and policy rules.
//!
//! The same idea as [`crate::diff`]: from (actual, desired) lists compute what to add and what to
//! remove, then the `rtnl` module sends just those. Nothing is replaced wholesale, so an address
//! or route that is already right is never removed and re-added (which would drop traffic).

use std::collections::BTreeSet;

use crate::model::IpNet;

/// What to add and what to remove to turn one set into another. Both lists are sorted and
/// free of duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetDiff<T> {
    pub add: Vec<T>,
    pub remove: Vec<T>,
}

impl<T> SetDiff<T> {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// Computes the additions and removals that turn `actual` into `desired`, both taken as sets.
pub fn diff_sets<T: Ord + Clone>(actual: &[T], desired: &[T]) -> SetDiff<T> {
    let have: BTreeSet<&T> = actual.iter().collect();
    let want: BTreeSet<&T> = desired.iter().collect();
    SetDiff {
        add: want.difference(&have).map(|t| (*t).clone()).collect(),
        remove: have.difference(&want).map(|t| (*t).clone()).collect(),
    }
}

/// Applies a [`SetDiff`] to a list, as a set (the model the property tests use).
pub fn apply_set<T: Ord + Clone>(actual: &[T], diff: &SetDiff<T>) -> Vec<T> {
    let mut set: BTreeSet<T> = actual.iter().cloned().collect();
    for t in &diff.remove {
        set.remove(t);
    }
    set.extend(diff.add.iter().cloned());
    set.into_iter().collect()
}

/// A route this crate manages: a destination prefix through the managed link, in a routing
/// table. The link is implied by the call (routes are reconciled per link).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteSpec {
    /// Destination, with host bits cleared (the kernel stores it that way).
    pub destination: IpNet,
    /// Routing table id (the dedicated table of the mesh, not `main`).
    pub table: u32,
}

impl RouteSpec {
    pub fn new(destination: IpNet, table: u32) -> Self {
        RouteSpec {
            destination: destination.trunc(),
            table,
        }
    }
}

/// A policy routing rule: "lookup `table`" at `priority`, for one address family. Traffic for
/// the mesh's prefixes reaches the dedicated table through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleSpec {
    pub ipv6: bool,
    pub priority: u32,
    pub table: u32,
}

/// Addresses: compares interface addresses exactly (address and prefix length), so
/// 10.0.0.1/24 and 10.0.0.1/32 are different addresses, as they are to the kernel.
pub fn diff_addresses(actual: &[IpNet], desired: &[IpNet]) -> SetDiff<IpNet> {
    diff_sets(actual, desired)
}

/// Routes: compares destinations with host bits cleared.
pub fn diff_routes(actual: &[RouteSpec], desired: &[RouteSpec]) -> SetDiff<RouteSpec> {
    let norm = |v: &[RouteSpec]| -> Vec<RouteSpec> {
        v.iter()
            .map(|r| RouteSpec::new(r.destination, r.table))
            .collect()
    };
    diff_sets(&norm(actual), &norm(desired))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testutil::{net, pool_prefix};

    proptest! {
        #[test]
        fn set_diff_reaches_desired_and_rediff_is_empty(
            actual in prop::collection::vec(0u8..24, 0..12),
            desired in prop::collection::vec(0u8..24, 0..12),
            table in 100u32..103,
        ) {
            let actual: Vec<RouteSpec> =
                actual.into_iter().map(|i| RouteSpec::new(pool_prefix(i), table)).collect();
            let desired: Vec<RouteSpec> =
                desired.into_iter().map(|i| RouteSpec::new(pool_prefix(i), table)).collect();
            let d = diff_routes(&actual, &desired);
            let applied = apply_set(&actual, &d);
            let want: BTreeSet<RouteSpec> = desired.iter().copied().collect();
            prop_assert_eq!(applied.iter().copied().collect::<BTreeSet<_>>(), want);
            prop_assert!(diff_routes(&applied, &desired).is_empty());
            // Nothing already right is removed.
            prop_assert!(d.remove.iter().all(|r| !desired.contains(r)));
        }
    }

    #[test]
    fn address_prefix_length_matters_and_route_host_bits_do_not() {
        let d = diff_addresses(&[net("10.0.0.1/24")], &[net("10.0.0.1/32")]);
        assert_eq!(d.add, vec![net("10.0.0.1/32")]);
        assert_eq!(d.remove, vec![net("10.0.0.1/24")]);
        let r = diff_routes(
            &[RouteSpec {
                destination: net("10.1.0.0/16"),
                table: 7,
            }],
            &[RouteSpec {
                destination: net("10.1.2.3/16"),
                table: 7,
            }],
        );
        assert!(r.is_empty(), "{r:?}");
        let other_table = diff_routes(
            &[RouteSpec::new(net("10.1.0.0/16"), 7)],
            &[RouteSpec::new(net("10.1.0.0/16"), 8)],
        );
        assert_eq!(other_table.add.len(), 1);
        assert_eq!(other_table.remove.len(), 1);
    }
}
