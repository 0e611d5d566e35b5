//! Links, addresses, routes and policy rules over rtnetlink, reconciled like the peers.
//!
//! These work on any link (wireguard, TUN from a userspace implementation, veth), so the
//! controller uses them whatever WireGuard backend carries the packets. Reconciliation uses the
//! pure set diff in [`crate::netdiff`]: only what differs is added or removed.
//!
//! Routes of the mesh live in a dedicated routing table, reached through one policy rule per
//! address family ("lookup TABLE" at a fixed priority, ahead of `main`): the mesh's routes can
//! be listed, compared and flushed without touching anyone else's.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{Handle, IpVersion, LinkUnspec, LinkWireguard, RouteMessageBuilder};

use crate::{
    model::IpNet,
    netdiff::{RouteSpec, RuleSpec, SetDiff, diff_addresses, diff_routes, diff_sets},
};

/// An rtnetlink failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("link {0:?} does not exist")]
    NoSuchLink(String),
    #[error("invalid route {0}: {1}")]
    InvalidRoute(IpNet, String),
}

impl RtnlError {
    /// The errno the kernel answered with, if this is a kernel error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Netlink {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

fn nl_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RtnlError {
    let op = op.into();
    move |source| RtnlError::Netlink { op, source }
}

/// `Ok(absent)` when the kernel answered that the link does not exist (`ENODEV`), else `err`.
fn or_if_no_device<T>(err: RtnlError, absent: T) -> Result<T, RtnlError> {
    if err.errno() == Some(libc::ENODEV) {
        Ok(absent)
    } else {
        Err(err)
    }
}

/// What a link looks like now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub mtu: Option<u32>,
    /// The link kind (`wireguard`, `tun`, `veth`, ...), when the kernel reports one.
    pub kind: Option<String>,
}

/// What a managed link should look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    pub up: bool,
    pub mtu: Option<u32>,
    /// Interface addresses with their prefix length (for example 100.64.0.1/10).
    pub addresses: Vec<IpNet>,
    /// Destinations routed through this link, in `table`.
    pub routes: Vec<IpNet>,
    /// The dedicated routing table (not `main`, 254, nor `local`, 255).
    pub table: u32,
    /// Priority of the policy rules ("lookup `table`"), one per address family that has
    /// routes. `None` installs no rule.
    pub rule_priority: Option<u32>,
}

/// What a [`Rtnl::reconcile_link`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkChanges {
    pub set_up: bool,
    pub set_mtu: Option<u32>,
    pub addresses: Option<SetDiff<IpNet>>,
    pub routes: Option<SetDiff<RouteSpec>>,
    pub rules: Option<SetDiff<RuleSpec>>,
}

impl LinkChanges {
    pub fn is_empty(&self) -> bool {
        !self.set_up
            && self.set_mtu.is_none()
            && self.addresses.is_none()
            && self.routes.is_none()
            && self.rules.is_none()
    }
}

/// An rtnetlink connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Rtnl {
    handle: Handle,
}

impl Rtnl {
    /// Opens a socket in the current network namespace and spawns its connection task on the
    /// current tokio runtime.
    pub fn connect() -> Result<Self, RtnlError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RtnlError::Socket)?;
        tokio::spawn(conn);
        Ok(Rtnl { handle })
    }

    /// The link named `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>, RtnlError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_info(&msg))),
            Ok(None) => Ok(None),
            Err(e) => or_if_no_device(nl_err(format!("get link {name}"))(e), None),
        }
    }

    async fn require_link(&self, name: &str) -> Result<LinkInfo, RtnlError> {
        self.link(name)
            .await?
            .ok_or_else(|| RtnlError::NoSuchLink(name.to_owned()))
    }

    /// Creates a `wireguard` link. The kernel answers `EOPNOTSUPP` when it has no WireGuard
    /// (see [`RtnlError::errno`]); an existing link of that name gives `EEXIST`.
    pub async fn create_wireguard(&self, name: &str) -> Result<(), RtnlError> {
        self.handle
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await
            .map_err(nl_err(format!("create wireguard link {name}")))
    }

    /// Deletes a link; a link that does not exist is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<(), RtnlError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) => or_if_no_device(nl_err(format!("delete link {name}"))(e), ()),
        }
    }

    /// Brings a link up or down and sets its MTU.
    pub async fn set_link(&self, index: u32, up: bool, mtu: Option<u32>) -> Result<(), RtnlError> {
        let mut b = LinkUnspec::new_with_index(index);
        b = if up { b.up() } else { b.down() };
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        self.handle
            .link()
            .change(b.build())
            .execute()
            .await
            .map_err(nl_err(format!("set link {index} up={up} mtu={mtu:?}")))
    }

    /// The kernel's address messages for link `index` (the filter is a hint; callers still
    /// check `header.index`).
    async fn address_messages(&self, index: u32) -> Result<Vec<AddressMessage>, RtnlError> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err(format!("list addresses of link {index}")))
    }

    /// The addresses of a link (IPv4 and IPv6), with their prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>, RtnlError> {
        let msgs = self.address_messages(index).await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(address_of)
            .collect())
    }

    pub async fn add_address(&self, index: u32, addr: IpNet) -> Result<(), RtnlError> {
        self.handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
            .map_err(nl_err(format!("add address {addr} to link {index}")))
    }

    pub async fn del_address(&self, index: u32, addr: IpNet) -> Result<(), RtnlError> {
        let msgs = self.address_messages(index).await?;
        for m in msgs {
            if m.header.index == index && address_of(&m) == Some(addr) {
                self.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(nl_err(format!("delete address {addr} from link {index}")))?;
            }
        }
        Ok(())
    }

    /// Routes through link `index` in `table` (both families).
    pub async fn routes(&self, index: u32, table: u32) -> Result<Vec<RouteSpec>, RtnlError> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(table)
                .build(),
            RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(table)
                .build(),
        ] {
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .map_err(nl_err(format!("list routes of table {table}")))?;
            out.extend(routes.iter().filter_map(|r| route_of(r, index, table)));
        }
        Ok(out)
    }

    fn route_message(index: u32, route: &RouteSpec) -> Result<RouteMessage, RtnlError> {
        let dst = route.destination.trunc();
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| RtnlError::InvalidRoute(dst, e.to_string()))?
            .output_interface(index)
            .table_id(route.table)
            .build())
    }

    pub async fn add_route(&self, index: u32, route: &RouteSpec) -> Result<(), RtnlError> {
        self.handle
            .route()
            .add(Self::route_message(index, route)?)
            .execute()
            .await
            .map_err(nl_err(format!(
                "add route {} dev {index} table {}",
                route.destination, route.table
            )))
    }

    pub async fn del_route(&self, index: u32, route: &RouteSpec) -> Result<(), RtnlError> {
        self.handle
            .route()
            .del(Self::route_message(index, route)?)
            .execute()
            .await
            .map_err(nl_err(format!(
                "delete route {} dev {index} table {}",
                route.destination, route.table
            )))
    }

    /// Policy rules whose action is "lookup `table`" and that have no selector, as messages
    /// (for deletion) and as specs.
    async fn rule_messages(&self, table: u32) -> Result<Vec<(RuleSpec, RuleMessage)>, RtnlError> {
        let mut out = Vec::new();
        for (v, ipv6) in [(IpVersion::V4, false), (IpVersion::V6, true)] {
            let rules: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(v)
                .execute()
                .try_collect()
                .await
                .map_err(nl_err("list policy rules"))?;
            for r in rules {
                let t = r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RuleAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(r.header.table));
                if t != table {
                    continue;
                }
                let priority = r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RuleAttribute::Priority(p) => Some(*p),
                        _ => None,
                    })
                    .unwrap_or(0);
                out.push((
                    RuleSpec {
                        ipv6,
                        priority,
                        table,
                    },
                    r,
                ));
            }
        }
        Ok(out)
    }

    /// The policy rules that look up `table`.
    pub async fn rules(&self, table: u32) -> Result<Vec<RuleSpec>, RtnlError> {
        Ok(self
            .rule_messages(table)
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }

    pub async fn add_rule(&self, rule: &RuleSpec) -> Result<(), RtnlError> {
        let req = self
            .handle
            .rule()
            .add()
            .table_id(rule.table)
            // rtnetlink leaves the action unspecified, which the kernel answers with EINVAL on
            // every lookup that reaches the rule: all routing in the namespace breaks.
            .action(RuleAction::ToTable)
            .priority(rule.priority);
        let res = if rule.ipv6 {
            req.v6().execute().await
        } else {
            req.v4().execute().await
        };
        res.map_err(nl_err(format!(
            "add rule priority {} lookup {} ({})",
            rule.priority,
            rule.table,
            if rule.ipv6 { "IPv6" } else { "IPv4" }
        )))
    }

    pub async fn del_rule(&self, rule: &RuleSpec) -> Result<(), RtnlError> {
        for (spec, msg) in self.rule_messages(rule.table).await? {
            if spec == *rule {
                self.handle
                    .rule()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(nl_err(format!("delete rule priority {}", rule.priority)))?;
            }
        }
        Ok(())
    }

    /// Brings link `name` to `desired`: link state and MTU, then addresses, routes in the
    /// dedicated table, and the policy rules, each changed only where it differs. IPv6
    /// link-local addresses the kernel adds by itself are left alone unless desired.
    pub async fn reconcile_link(
        &self,
        name: &str,
        desired: &LinkConfig,
    ) -> Result<LinkChanges, RtnlError> {
        let link = self.require_link(name).await?;
        let mut changes = LinkChanges::default();

        // The link goes up first: IPv4 routes cannot be added through a link that is down.
        let mtu_change = desired.mtu.filter(|m| link.mtu != Some(*m));
        if link.up != desired.up || mtu_change.is_some() {
            self.set_link(link.index, desired.up, mtu_change).await?;
            changes.set_up = link.up != desired.up && desired.up;
            changes.set_mtu = mtu_change;
        }

        let actual: Vec<IpNet> = self
            .addresses(link.index)
            .await?
            .into_iter()
            .filter(|a| !is_link_local(a) || desired.addresses.contains(a))
            .collect();
        let d = diff_addresses(&actual, &desired.addresses);
        for a in &d.remove {
            self.del_address(link.index, *a).await?;
        }
        for a in &d.add {
            self.add_address(link.index, *a).await?;
        }
        if !d.is_empty() {
            changes.addresses = Some(d);
        }

        let want: Vec<RouteSpec> = desired
            .routes
            .iter()
            .map(|n| RouteSpec::new(*n, desired.table))
            .collect();
        let d = diff_routes(&self.routes(link.index, desired.table).await?, &want);
        for r in &d.remove {
            self.del_route(link.index, r).await?;
        }
        for r in &d.add {
            self.add_route(link.index, r).await?;
        }
        if !d.is_empty() {
            changes.routes = Some(d);
        }

        let mut want_rules = Vec::new();
        if let Some(priority) = desired.rule_priority {
            for ipv6 in [false, true] {
                if want.iter().any(|r| r.destination.addr().is_ipv6() == ipv6) {
                    want_rules.push(RuleSpec {
                        ipv6,
                        priority,
                        table: desired.table,
                    });
                }
            }
        }
        let actual_rules = match self.rules(desired.table).await {
            Ok(rules) => rules,
            // A kernel without policy routing (CONFIG_IP_MULTIPLE_TABLES off) cannot list rules;
            // that is only an error if rules are wanted.
            Err(e) if want_rules.is_empty() && e.errno() == Some(libc::EOPNOTSUPP) => Vec::new(),
            Err(e) => return Err(e),
        };
        let d = diff_sets(&actual_rules, &want_rules);
        for r in &d.remove {
            self.del_rule(r).await?;
        }
        for r in &d.add {
            self.add_rule(r).await?;
        }
        if !d.is_empty() {
            changes.rules = Some(d);
        }
        Ok(changes)
    }
}

fn is_link_local(a: &IpNet) -> bool {
    match a.addr() {
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
        IpAddr::V4(_) => false,
    }
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        up: msg.header.flags.contains(LinkFlags::Up),
        mtu: None,
        kind: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Mtu(m) => info.mtu = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let netlink_packet_route::link::LinkInfo::Kind(k) = i {
                        info.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// The address of an address message: `IFA_LOCAL` for IPv4 (the interface's own address on
/// point-to-point links), `IFA_ADDRESS` otherwise.
fn address_of(m: &AddressMessage) -> Option<IpNet> {
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let addr = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    let ip = match m.header.family {
        AddressFamily::Inet => local.or(addr),
        _ => addr.or(local),
    }?;
    IpNet::new(ip, m.header.prefix_len).ok()
}

fn route_of(r: &RouteMessage, index: u32, table: u32) -> Option<RouteSpec> {
    let mut oif = None;
    let mut t = u32::from(r.header.table);
    let mut dst = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(x) => t = *x,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            _ => {}
        }
    }
    if oif != Some(index) || t != table {
        return None;
    }
    let dst = dst.unwrap_or(match r.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    IpNet::new(dst, r.header.destination_prefix_length)
        .ok()
        .map(|n| RouteSpec::new(n, table))
}
