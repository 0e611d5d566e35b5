//! rtnetlink reconciliation on real links in a private network namespace (needs root).

use std::net::Ipv4Addr;

use lemonade_nexus_netlink::{
    model::IpNet,
    netdiff::{RouteSpec, RuleSpec},
    netns::run_in_new_netns,
    rtnl::{LinkConfig, Rtnl},
};
use rtnetlink::{LinkVeth, RouteMessageBuilder};

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

const TABLE: u32 = 51820;

fn desired() -> LinkConfig {
    LinkConfig {
        up: true,
        mtu: Some(1380),
        addresses: vec![net("100.64.0.1/10"), net("fd7a:115c:a1e0::1/48")],
        routes: vec![
            net("100.64.0.0/10"),
            net("10.99.0.0/16"),
            net("fd7a:115c:a1e0::/48"),
        ],
        table: TABLE,
        rule_priority: Some(10_000),
    }
}

async fn veth(rtnl: &Rtnl) -> Rtnl {
    let (conn, handle, _) = rtnetlink::new_connection().expect("socket");
    tokio::spawn(conn);
    handle
        .link()
        .add(LinkVeth::new("ln-a", "ln-b").build())
        .execute()
        .await
        .expect("veth");
    rtnl.clone()
}

async fn read_back(rtnl: &Rtnl) -> (bool, Option<u32>, Vec<IpNet>, Vec<RouteSpec>, Vec<RuleSpec>) {
    let link = rtnl.link("ln-a").await.expect("get").expect("exists");
    let mut addrs: Vec<IpNet> = rtnl
        .addresses(link.index)
        .await
        .expect("addresses")
        .into_iter()
        .filter(|a| !a.to_string().starts_with("fe80"))
        .collect();
    addrs.sort();
    let mut routes = rtnl.routes(link.index, TABLE).await.expect("routes");
    routes.sort();
    let mut rules = rtnl.rules(TABLE).await.expect("rules");
    rules.sort();
    (link.up, link.mtu, addrs, routes, rules)
}

#[test]
fn link_addresses_routes_and_rules_are_reconciled_and_read_back() {
    run_in_new_netns(|| async {
        let rtnl = veth(&Rtnl::connect().expect("rtnl")).await;
        let want = desired();

        let changes = rtnl.reconcile_link("ln-a", &want).await.expect("reconcile");
        assert!(
            changes.set_up && changes.set_mtu == Some(1380),
            "{changes:?}"
        );
        let (up, mtu, addrs, routes, rules) = read_back(&rtnl).await;
        assert!(up);
        assert_eq!(mtu, Some(1380));
        let mut want_addrs = want.addresses.clone();
        want_addrs.sort();
        assert_eq!(addrs, want_addrs);
        let mut want_routes: Vec<RouteSpec> = want
            .routes
            .iter()
            .map(|n| RouteSpec::new(*n, TABLE))
            .collect();
        want_routes.sort();
        assert_eq!(routes, want_routes);
        assert_eq!(
            rules,
            vec![
                RuleSpec {
                    ipv6: false,
                    priority: 10_000,
                    table: TABLE
                },
                RuleSpec {
                    ipv6: true,
                    priority: 10_000,
                    table: TABLE
                },
            ]
        );

        // Nothing differs: nothing is changed.
        let again = rtnl.reconcile_link("ln-a", &want).await.expect("reconcile");
        assert!(again.is_empty(), "{again:?}");

        // Drift: an operator deletes a route, an address and a rule, and adds a stray route.
        // (The IPv6 address: deleting a link's last IPv4 address makes the kernel flush every
        // IPv4 route through the link, which the next reconcile would also repair.)
        let index = rtnl.link("ln-a").await.expect("get").expect("exists").index;
        rtnl.del_route(index, &RouteSpec::new(net("10.99.0.0/16"), TABLE))
            .await
            .expect("del");
        rtnl.del_address(index, net("fd7a:115c:a1e0::1/48"))
            .await
            .expect("del");
        rtnl.add_route(index, &RouteSpec::new(net("192.0.2.0/24"), TABLE))
            .await
            .expect("add");
        rtnl.del_rule(&RuleSpec {
            ipv6: true,
            priority: 10_000,
            table: TABLE,
        })
        .await
        .expect("del");
        assert_ne!(read_back(&rtnl).await.3, want_routes);

        let fix = rtnl.reconcile_link("ln-a", &want).await.expect("reconcile");
        let routes_fixed = fix.routes.expect("routes changed");
        assert_eq!(
            routes_fixed.add,
            vec![RouteSpec::new(net("10.99.0.0/16"), TABLE)]
        );
        assert_eq!(
            routes_fixed.remove,
            vec![RouteSpec::new(net("192.0.2.0/24"), TABLE)]
        );
        assert_eq!(
            fix.addresses.expect("address changed").add,
            vec![net("fd7a:115c:a1e0::1/48")]
        );
        assert_eq!(
            fix.rules.expect("rule changed").add,
            vec![RuleSpec {
                ipv6: true,
                priority: 10_000,
                table: TABLE
            }]
        );
        let (_, _, addrs, routes, rules) = read_back(&rtnl).await;
        assert_eq!(addrs, want_addrs);
        assert_eq!(routes, want_routes);
        assert_eq!(rules.len(), 2);

        // A smaller desired state removes what is no longer wanted, and only that.
        let mut smaller = want.clone();
        smaller.routes = vec![net("100.64.0.0/10")];
        smaller.addresses = vec![net("100.64.0.1/10")];
        let shrink = rtnl
            .reconcile_link("ln-a", &smaller)
            .await
            .expect("reconcile");
        assert_eq!(shrink.routes.expect("routes").remove.len(), 2);
        let (_, _, addrs, routes, rules) = read_back(&rtnl).await;
        assert_eq!(addrs, vec![net("100.64.0.1/10")]);
        assert_eq!(routes, vec![RouteSpec::new(net("100.64.0.0/10"), TABLE)]);
        // No IPv6 route left, so no IPv6 rule either.
        assert_eq!(
            rules,
            vec![RuleSpec {
                ipv6: false,
                priority: 10_000,
                table: TABLE
            }]
        );
    })
    .expect("netns");
}

#[test]
fn routes_in_other_tables_and_on_other_links_are_not_touched() {
    run_in_new_netns(|| async {
        let rtnl = veth(&Rtnl::connect().expect("rtnl")).await;
        let (conn, handle, _) = rtnetlink::new_connection().expect("socket");
        tokio::spawn(conn);
        let b = rtnl.link("ln-b").await.expect("get").expect("exists");
        rtnl.set_link(b.index, true, None).await.expect("up");
        // A route on the other link in our table, and one in main.
        rtnl.add_route(b.index, &RouteSpec::new(net("198.51.100.0/24"), TABLE))
            .await
            .expect("add");
        handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::new(203, 0, 113, 0), 24)
                    .output_interface(b.index)
                    .build(),
            )
            .execute()
            .await
            .expect("main route");
        rtnl.reconcile_link("ln-a", &desired())
            .await
            .expect("reconcile");
        let mut cfg = desired();
        cfg.routes.clear();
        cfg.rule_priority = None;
        rtnl.reconcile_link("ln-a", &cfg).await.expect("reconcile");
        assert_eq!(
            rtnl.routes(b.index, TABLE).await.expect("routes"),
            vec![RouteSpec::new(net("198.51.100.0/24"), TABLE)]
        );
        let main_v4: Vec<RouteSpec> = rtnl
            .routes(b.index, 254)
            .await
            .expect("routes")
            .into_iter()
            .filter(|r| r.destination.addr().is_ipv4())
            .collect();
        assert_eq!(main_v4, vec![RouteSpec::new(net("203.0.113.0/24"), 254)]);
        assert!(rtnl.rules(TABLE).await.expect("rules").is_empty());
        let a = rtnl.link("ln-a").await.expect("get").expect("exists");
        assert!(
            rtnl.routes(a.index, TABLE)
                .await
                .expect("routes")
                .is_empty()
        );
        // Absent links are reported as such, and deleting one is not an error.
        assert!(rtnl.link("ln-none").await.expect("get").is_none());
        rtnl.delete_link("ln-none")
            .await
            .expect("absent link delete");
        assert!(rtnl.reconcile_link("ln-none", &cfg).await.is_err());
    })
    .expect("netns");
}
