//! The traffic-policy table: every rule of kube-proxy's CategorizeEndpoints and traffic policies,
//! one row each, then family splitting and excluded CIDRs.

use std::{collections::BTreeMap, time::Duration};

use super::*;
use crate::model::ServicePort;

/// An endpoint `10.0.0.<n>` written compactly: `r` ready, `s` serving, `t` terminating, `l` local.
fn e(n: u8, flags: &str, zones: &[&str]) -> Endpoint {
    Endpoint {
        ip: IpAddr::from([10, 0, 0, n]),
        port: 8080,
        ready: flags.contains('r'),
        serving: flags.contains('s'),
        terminating: flags.contains('t'),
        is_local: flags.contains('l'),
        zone_hints: zones.iter().map(|z| z.to_string()).collect(),
    }
}

fn name() -> ServicePortName {
    ServicePortName {
        namespace: "ns".into(),
        name: "svc".into(),
        port: "http".into(),
        protocol: Protocol::Tcp,
    }
}

fn port() -> ServicePort {
    ServicePort {
        port: 80,
        node_port: Some(30080),
        cluster_ips: vec!["10.96.0.1".parse().expect("ip")],
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        session_affinity: None,
        external_policy_local: false,
        internal_policy_local: false,
        prefer_close: false,
    }
}

fn model(port: ServicePort, endpoints: Vec<Endpoint>, zone: Option<&str>) -> ProxyModel {
    ProxyModel {
        services: BTreeMap::from([(name(), port)]),
        endpoints: if endpoints.is_empty() { BTreeMap::new() } else { BTreeMap::from([(name(), endpoints)]) },
        node_zone: zone.map(str::to_owned),
    }
}

fn octets(targets: &[Target]) -> Vec<u8> {
    targets
        .iter()
        .map(|t| match t.ip {
            IpAddr::V4(ip) => ip.octets()[3],
            IpAddr::V6(_) => 0,
        })
        .collect()
}

struct Row {
    what: &'static str,
    internal_local: bool,
    external_local: bool,
    zone: Option<&'static str>,
    endpoints: Vec<Endpoint>,
    cluster: &'static [u8],
    external: &'static [u8],
}

fn row(what: &'static str, endpoints: Vec<Endpoint>, cluster: &'static [u8], external: &'static [u8]) -> Row {
    Row { what, internal_local: false, external_local: false, zone: None, endpoints, cluster, external }
}

#[test]
fn endpoint_choice_follows_kube_proxy() {
    let rows = vec![
        row("all ready", vec![e(1, "rs", &[]), e(2, "rs", &[])], &[1, 2], &[1, 2]),
        row("no endpoints: reject", vec![], &[], &[]),
        row("only ready ones", vec![e(1, "rs", &[]), e(2, "", &[]), e(3, "st", &[])], &[1], &[1]),
        row(
            "no ready: serving-terminating",
            vec![e(1, "", &[]), e(2, "st", &[]), e(3, "t", &[])],
            &[2],
            &[2],
        ),
        row("no ready, none serving: reject", vec![e(1, "", &[]), e(2, "t", &[]), e(3, "s", &[])], &[], &[]),
        Row {
            internal_local: true,
            ..row("internal Local: local only", vec![e(1, "rsl", &[]), e(2, "rs", &[])], &[1], &[1, 2])
        },
        Row {
            internal_local: true,
            ..row("internal Local, none local: reject", vec![e(2, "rs", &[])], &[], &[2])
        },
        Row {
            external_local: true,
            ..row("external Local: local only", vec![e(1, "rsl", &[]), e(2, "rs", &[])], &[1, 2], &[1])
        },
        Row {
            external_local: true,
            ..row(
                "external Local falls back to local serving-terminating",
                vec![e(1, "stl", &[]), e(2, "rs", &[])],
                &[2],
                &[1],
            )
        },
        Row {
            external_local: true,
            ..row("external Local prefers local ready", vec![e(1, "stl", &[]), e(3, "rsl", &[])], &[3], &[3])
        },
        Row { external_local: true, ..row("external Local, none local", vec![e(2, "rs", &[])], &[2], &[]) },
        Row {
            internal_local: true,
            external_local: true,
            ..row("both Local", vec![e(1, "rsl", &[]), e(2, "rs", &[])], &[1], &[1])
        },
        Row {
            zone: Some("a"),
            ..row(
                "hints for this zone",
                vec![e(1, "rs", &["a"]), e(2, "rs", &["b"]), e(3, "rs", &["a", "b"])],
                &[1, 3],
                &[1, 3],
            )
        },
        Row {
            zone: Some("a"),
            ..row(
                "one ready endpoint without hints: all",
                vec![e(1, "rs", &["a"]), e(2, "rs", &[])],
                &[1, 2],
                &[1, 2],
            )
        },
        Row {
            zone: Some("a"),
            ..row(
                "no endpoint for this zone: all",
                vec![e(1, "rs", &["b"]), e(2, "rs", &["c"])],
                &[1, 2],
                &[1, 2],
            )
        },
        row("node without a zone: all", vec![e(1, "rs", &["a"]), e(2, "rs", &["b"])], &[1, 2], &[1, 2]),
        Row {
            zone: Some("a"),
            ..row(
                "hints of unready endpoints do not matter",
                vec![e(1, "rs", &["a"]), e(2, "rs", &["b"]), e(3, "", &[])],
                &[1],
                &[1],
            )
        },
        Row {
            zone: Some("a"),
            ..row(
                "no ready endpoint: hints unused for the fallback",
                vec![e(1, "st", &["b"]), e(2, "st", &["b"])],
                &[1, 2],
                &[1, 2],
            )
        },
        Row {
            zone: Some("a"),
            internal_local: true,
            ..row("Local ignores hints", vec![e(1, "rs", &["a"]), e(2, "rsl", &["b"])], &[2], &[1])
        },
    ];
    for row in rows {
        let port = ServicePort {
            internal_policy_local: row.internal_local,
            external_policy_local: row.external_local,
            ..port()
        };
        let plans = plan(&model(port, row.endpoints, row.zone), &NodeSettings::default());
        assert_eq!(plans.len(), 1, "{}", row.what);
        assert_eq!(octets(&plans[0].cluster_targets), row.cluster, "{}: cluster targets", row.what);
        assert_eq!(octets(&plans[0].external_targets), row.external, "{}: external targets", row.what);
    }
}

#[test]
fn locality_is_carried_into_targets() {
    let plans = plan(&model(port(), vec![e(2, "rs", &[]), e(1, "rsl", &[])], None), &NodeSettings::default());
    let targets = &plans[0].cluster_targets;
    assert_eq!(octets(targets), [1, 2]);
    assert!(targets[0].is_local && !targets[1].is_local);
    assert_eq!(targets[0].port, 8080);
}

#[test]
fn a_port_without_external_addresses_has_no_external_targets() {
    let plans = plan(
        &model(ServicePort { node_port: None, ..port() }, vec![e(1, "rs", &[])], None),
        &NodeSettings::default(),
    );
    assert_eq!(octets(&plans[0].cluster_targets), [1]);
    assert!(plans[0].external_targets.is_empty());
    assert!(!plans[0].has_external());
}

#[test]
fn dual_stack_services_split_by_family() {
    let v6_endpoint = Endpoint { ip: "fd00::1".parse().expect("ip"), ..e(0, "rs", &[]) };
    let port = ServicePort {
        cluster_ips: vec!["fd00:96::1".parse().expect("ip"), "10.96.0.1".parse().expect("ip")],
        external_ips: vec!["192.0.2.1".parse().expect("ip"), "2001:db8::1".parse().expect("ip")],
        load_balancer_source_ranges: vec![
            "203.0.113.0/24".parse().expect("net"),
            "2001:db8::/32".parse().expect("net"),
        ],
        session_affinity: Some(Duration::from_secs(30)),
        ..port()
    };
    let plans = plan(&model(port, vec![e(1, "rs", &[]), v6_endpoint], None), &NodeSettings::default());
    assert_eq!(plans.len(), 2);
    let (v4, v6) = (&plans[0], &plans[1]);
    assert_eq!((v4.family, v6.family), (IpFamily::V4, IpFamily::V6), "IPv4 first");
    assert_eq!(v4.cluster_ips, ["10.96.0.1".parse::<IpAddr>().expect("ip")]);
    assert_eq!(v6.cluster_ips, ["fd00:96::1".parse::<IpAddr>().expect("ip")]);
    assert_eq!(v4.external_ips, ["192.0.2.1".parse::<IpAddr>().expect("ip")]);
    assert_eq!(v6.external_ips, ["2001:db8::1".parse::<IpAddr>().expect("ip")]);
    assert_eq!(v4.load_balancer_source_ranges.len(), 1);
    assert!(v6.load_balancer_source_ranges[0].addr().is_ipv6());
    assert_eq!(octets(&v4.cluster_targets), [1]);
    assert_eq!(v6.cluster_targets.len(), 1);
    assert!(v6.cluster_targets[0].ip.is_ipv6());
    assert_eq!(v4.session_affinity, Some(Duration::from_secs(30)), "affinity passes through");
    assert_eq!(v4.node_port, Some(30080));
    assert_eq!(v6.node_port, Some(30080));
}

#[test]
fn a_single_stack_service_ignores_addresses_of_the_other_family() {
    let port = ServicePort { external_ips: vec!["2001:db8::1".parse().expect("ip")], ..port() };
    let v6_endpoint = Endpoint { ip: "fd00::1".parse().expect("ip"), ..e(0, "rs", &[]) };
    let plans = plan(&model(port, vec![v6_endpoint], None), &NodeSettings::default());
    assert_eq!(plans.len(), 1);
    assert!(plans[0].external_ips.is_empty());
    assert!(plans[0].cluster_targets.is_empty(), "an IPv6 endpoint cannot serve an IPv4 cluster IP");
}

#[test]
fn excluded_cidrs_are_never_intercepted() {
    let settings = NodeSettings {
        excluded_cidrs: vec!["10.96.0.0/24".parse().expect("net"), "192.0.2.0/24".parse().expect("net")],
        ..NodeSettings::default()
    };
    let port = ServicePort {
        external_ips: vec!["192.0.2.1".parse().expect("ip"), "198.51.100.1".parse().expect("ip")],
        load_balancer_ips: vec!["192.0.2.9".parse().expect("ip")],
        ..port()
    };
    let plans = plan(&model(port.clone(), vec![e(1, "rs", &[])], None), &settings);
    assert_eq!(plans.len(), 1);
    assert!(plans[0].cluster_ips.is_empty());
    assert_eq!(plans[0].external_ips, ["198.51.100.1".parse::<IpAddr>().expect("ip")]);
    assert!(plans[0].load_balancer_ips.is_empty());
    assert_eq!(octets(&plans[0].external_targets), [1], "node port and the remaining external IP still work");

    // Nothing left to intercept in that family: no plan at all.
    let bare =
        ServicePort { node_port: None, external_ips: Vec::new(), load_balancer_ips: Vec::new(), ..port };
    assert!(plan(&model(bare, vec![e(1, "rs", &[])], None), &settings).is_empty());

    // Endpoints inside an excluded CIDR are destinations of ours, not intercepted: they stay.
    let settings =
        NodeSettings { excluded_cidrs: vec!["10.0.0.0/24".parse().expect("net")], ..NodeSettings::default() };
    let plans = plan(&model(self::port(), vec![e(1, "rs", &[])], None), &settings);
    assert_eq!(octets(&plans[0].cluster_targets), [1]);
}

#[test]
fn plans_are_sorted_and_per_service_plans_agree() {
    let mut m = model(port(), vec![e(1, "rs", &[])], None);
    let other = ServicePortName { name: "a-first".into(), ..name() };
    m.services.insert(other.clone(), port());
    let settings = NodeSettings::default();
    let plans = plan(&m, &settings);
    assert_eq!(plans.iter().map(|p| p.name.name.as_str()).collect::<Vec<_>>(), ["a-first", "svc"]);
    assert!(plans[0].cluster_targets.is_empty(), "a port without endpoints still gets a plan: it rejects");
    assert_eq!(plan_service(&m, &name(), &settings), vec![plans[1].clone()]);
    let gone = ServicePortName { name: "gone".into(), ..name() };
    assert!(plan_service(&m, &gone, &settings).is_empty());
    assert_eq!(plans[1].protocol, Protocol::Tcp);
    assert_eq!(plans[1].port, 80);
}

#[test]
fn the_plan_cache_replans_only_what_changed_and_agrees_with_planning_all() {
    let mut m = model(port(), vec![e(1, "rs", &[])], None);
    let other = ServicePortName { name: "a-first".into(), ..name() };
    m.services.insert(other.clone(), port());
    let settings = NodeSettings::default();
    let mut cache = PlanCache::default();
    assert_eq!(cache.update(&m, &settings, Some(&BTreeSet::new())), plan(&m, &settings), "first: all");

    // A change the cache is told about, one it is not (a stale plan stays), a removal.
    m.endpoints.insert(name(), vec![e(1, "rs", &[]), e(2, "rs", &[])]);
    m.services.get_mut(&other).expect("other").port = 81;
    let changed = BTreeSet::from([name()]);
    let plans = cache.update(&m, &settings, Some(&changed)).to_vec();
    assert_eq!(octets(&plans[1].cluster_targets), [1, 2]);
    assert_eq!(plans[0].port, 80, "not named as changed: not replanned");
    m.services.remove(&other);
    let gone = BTreeSet::from([other]);
    assert_eq!(cache.update(&m, &settings, Some(&gone)), plan(&m, &settings));

    // Other settings, or no change set: everything is replanned.
    let masquerade_all = NodeSettings { masquerade_all: true, ..NodeSettings::default() };
    m.services.get_mut(&name()).expect("svc").port = 82;
    assert_eq!(cache.update(&m, &masquerade_all, Some(&BTreeSet::new())), plan(&m, &masquerade_all));
    m.services.get_mut(&name()).expect("svc").port = 83;
    assert_eq!(cache.update(&m, &masquerade_all, None), plan(&m, &masquerade_all));
}
