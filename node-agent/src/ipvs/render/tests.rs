use std::time::Duration;

use super::*;
use crate::ipvs::netlink::{AF_INET, IP_VS_CONN_F_MASQ};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn name(n: &str) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: n.into(),
        port: "http".into(),
        protocol: Protocol::Tcp,
    }
}

fn target(s: &str, port: u16, is_local: bool) -> Target {
    Target { ip: ip(s), port, is_local }
}

fn plan(n: &str, cluster_ip: &str, targets: Vec<Target>) -> ServicePlan {
    ServicePlan {
        cluster_ips: vec![ip(cluster_ip)],
        cluster_targets: targets,
        ..ServicePlan::new(name(n), IpFamily::of(&ip(cluster_ip)), 80)
    }
}

fn settings() -> NodeSettings {
    NodeSettings {
        excluded_cidrs: vec!["10.0.0.0/24".parse().expect("cidr")],
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
        masquerade_all: false,
        masquerade_bit: 14,
        node_port_addresses: vec![],
    }
}

fn tcp(addr: &str, port: u16) -> ServiceId {
    ServiceId::Addr { protocol: IPPROTO_TCP, addr: ip(addr), port }
}

#[test]
fn cluster_ip_with_endpoints() {
    let plans = [plan(
        "web",
        "10.96.0.10",
        vec![target("10.244.1.2", 8080, false), target("10.244.2.3", 8080, true)],
    )];
    let desired = render(&plans, &settings(), "rr", &[]);
    assert_eq!(desired.bind, BTreeSet::from([ip("10.96.0.10")]));
    assert!(desired.node_ports.is_empty());
    let svc = &desired.services[&tcp("10.96.0.10", 80)];
    assert_eq!(svc.service.scheduler, "rr");
    assert_eq!((svc.service.flags, svc.service.timeout), (0, 0));
    assert_eq!(svc.service.netmask, host_netmask(AF_INET));
    assert_eq!(
        svc.dests,
        vec![Destination::masq(ip("10.244.1.2"), 8080, 1), Destination::masq(ip("10.244.2.3"), 8080, 1)]
    );
    assert!(svc.dests.iter().all(|d| d.fwd_method == IP_VS_CONN_F_MASQ));
    assert_eq!(desired.object_count(), 3);
}

#[test]
fn affinity_node_ports_externals_and_load_balancers() {
    let mut p = plan("web", "10.96.0.10", vec![target("10.244.1.2", 8080, false)]);
    p.session_affinity = Some(Duration::from_secs(10800));
    p.node_port = Some(30080);
    p.external_ips = vec![ip("192.0.2.7")];
    p.load_balancer_ips = vec![ip("198.51.100.1")];
    p.external_targets = vec![target("10.244.1.2", 8080, false), target("10.244.3.3", 8080, true)];
    let node_ips = [ip("127.0.0.1"), ip("172.18.0.2"), ip("10.0.0.5"), ip("fe80::1"), ip("fd00::2")];
    let desired = render(&[p], &settings(), "sh", &node_ips);

    // Loopback, link-local, excluded and other-family node addresses serve no node port.
    let ids: Vec<ServiceId> = desired.services.keys().copied().collect();
    assert_eq!(
        ids,
        vec![tcp("10.96.0.10", 80), tcp("172.18.0.2", 30080), tcp("192.0.2.7", 80), tcp("198.51.100.1", 80)]
    );
    assert_eq!(desired.bind, BTreeSet::from([ip("10.96.0.10"), ip("192.0.2.7"), ip("198.51.100.1")]));
    assert_eq!(desired.node_ports, BTreeSet::from([(IPPROTO_TCP, 30080)]));
    for svc in desired.services.values() {
        // sh: sh-fallback, so that a draining real server does not refuse its clients.
        assert_eq!(svc.service.flags, IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_SCHED1);
        assert_eq!(svc.service.timeout, 10800);
        assert_eq!(svc.service.scheduler, "sh");
    }
    assert_eq!(desired.services[&tcp("10.96.0.10", 80)].dests.len(), 1);
    assert_eq!(desired.services[&tcp("172.18.0.2", 30080)].dests.len(), 2);
    assert_eq!(desired.services[&tcp("198.51.100.1", 80)].dests.len(), 2);

    // nodePortAddresses narrows the node addresses.
    let mut narrowed = settings();
    narrowed.node_port_addresses = vec!["192.168.0.0/16".parse().expect("cidr")];
    assert_eq!(
        node_port_ips(&[ip("172.18.0.2"), ip("192.168.1.1")], &narrowed),
        BTreeSet::from([ip("192.168.1.1")])
    );
}

#[test]
fn ipv6_and_udp() {
    let mut p = plan("dns", "fd00:96::a", vec![target("fd00:244::5", 53, false)]);
    p.protocol = Protocol::Udp;
    p.port = 53;
    let desired = render(&[p], &settings(), "rr", &[]);
    let id = ServiceId::Addr { protocol: IPPROTO_UDP, addr: ip("fd00:96::a"), port: 53 };
    assert_eq!(desired.services[&id].service.netmask, 128);
}

fn ownership(bound: &[&str]) -> Ownership {
    Ownership {
        excluded: settings().excluded_cidrs,
        bound: bound.iter().map(|s| ip(s)).collect(),
        node_ips: BTreeSet::from([ip("172.18.0.2")]),
        node_ports: BTreeSet::from([(IPPROTO_TCP, 30080)]),
    }
}

fn current_of(desired: &Desired) -> Current {
    as_current(desired)
}

#[test]
fn diff_from_empty_creates_everything_and_binds() {
    let plans = [plan("web", "10.96.0.10", vec![target("10.244.1.2", 8080, false)])];
    let desired = render(&plans, &settings(), "rr", &[]);
    let changes = diff(&desired, &Current::new(), &BTreeSet::new(), &ownership(&[]));
    assert_eq!(changes.bind, vec![ip("10.96.0.10")]);
    assert!(changes.unbind.is_empty());
    let svc = desired.services[&tcp("10.96.0.10", 80)].service.clone();
    assert_eq!(
        changes.requests,
        vec![
            Request::NewService(svc),
            Request::NewDest(tcp("10.96.0.10", 80), Destination::masq(ip("10.244.1.2"), 8080, 1)),
        ]
    );
}

#[test]
fn diff_of_the_applied_state_is_empty() {
    let plans = [plan("web", "10.96.0.10", vec![target("10.244.1.2", 8080, false)])];
    let desired = render(&plans, &settings(), "rr", &[]);
    let mut current = current_of(&desired);
    // The kernel reports HASHED on every service: not a difference.
    for (svc, _) in current.values_mut() {
        svc.flags |= IP_VS_SVC_F_HASHED;
    }
    let changes = diff(&desired, &current, &desired.bind, &ownership(&["10.96.0.10"]));
    assert!(changes.is_empty(), "{changes:?}");
}

#[test]
fn diff_touches_only_what_changed() {
    let before = render(
        &[
            plan("a", "10.96.0.1", vec![target("10.244.1.1", 80, false), target("10.244.1.2", 80, false)]),
            plan("b", "10.96.0.2", vec![target("10.244.2.1", 80, false)]),
            plan("gone", "10.96.0.3", vec![target("10.244.3.1", 80, false)]),
        ],
        &settings(),
        "rr",
        &[],
    );
    let after = render(
        &[
            // a: one endpoint replaced
            plan("a", "10.96.0.1", vec![target("10.244.1.1", 80, false), target("10.244.1.3", 80, false)]),
            // b: unchanged
            plan("b", "10.96.0.2", vec![target("10.244.2.1", 80, false)]),
        ],
        &settings(),
        "wrr",
        &[],
    );
    let current = current_of(&before);
    let changes = diff(&after, &current, &before.bind, &ownership(&["10.96.0.1", "10.96.0.2", "10.96.0.3"]));
    let mut set_a = after.services[&tcp("10.96.0.1", 80)].service.clone();
    set_a.scheduler = "wrr".into();
    let set_b = after.services[&tcp("10.96.0.2", 80)].service.clone();
    assert_eq!(
        changes.requests,
        vec![
            Request::SetService(set_a),
            Request::NewDest(tcp("10.96.0.1", 80), Destination::masq(ip("10.244.1.3"), 80, 1)),
            Request::SetService(set_b),
            Request::DelDest(tcp("10.96.0.1", 80), ip("10.244.1.2"), 80),
            Request::DelService(tcp("10.96.0.3", 80)),
        ]
    );
    assert!(changes.bind.is_empty());
    assert_eq!(changes.unbind, vec![ip("10.96.0.3")]);
}

#[test]
fn graceful_removal_of_busy_real_servers() {
    let desired = render(&[plan("a", "10.96.0.1", vec![])], &settings(), "rr", &[]);
    let id = tcp("10.96.0.1", 80);
    let mut busy = Destination::masq(ip("10.244.1.1"), 80, 1);
    busy.active_conns = 2;
    let mut draining = Destination::masq(ip("10.244.1.2"), 80, 0);
    draining.inactive_conns = 1;
    let idle = Destination::masq(ip("10.244.1.3"), 80, 0);
    let mut current = current_of(&desired);
    current.get_mut(&id).expect("service").1 = vec![busy, draining, idle];
    let changes = diff(&desired, &current, &desired.bind, &ownership(&["10.96.0.1"]));
    assert_eq!(
        changes.requests,
        vec![
            Request::SetDest(id, Destination { weight: 0, ..busy }),
            Request::DelDest(id, ip("10.244.1.3"), 80),
        ]
    );

    // UDP real servers go at once.
    let mut udp = plan("u", "10.96.0.9", vec![]);
    udp.protocol = Protocol::Udp;
    let desired = render(&[udp], &settings(), "rr", &[]);
    let uid = ServiceId::Addr { protocol: IPPROTO_UDP, addr: ip("10.96.0.9"), port: 80 };
    let mut current = current_of(&desired);
    current.get_mut(&uid).expect("service").1 = vec![busy];
    let changes = diff(&desired, &current, &desired.bind, &ownership(&["10.96.0.9"]));
    assert_eq!(changes.requests, vec![Request::DelDest(uid, ip("10.244.1.1"), 80)]);
}

#[test]
fn diff_never_touches_foreign_or_excluded_services() {
    let desired = Desired::default();
    let foreign = |id: ServiceId| {
        (id, (Service { id, scheduler: "rr".into(), flags: 2, timeout: 0, netmask: u32::MAX }, vec![]))
    };
    let current: Current = [
        // on an address that is not on our interface
        foreign(tcp("192.0.2.50", 80)),
        // inside excludedCIDRs, even though the address is bound to our interface
        foreign(tcp("10.0.0.9", 80)),
        // a node address on a port that is not one of our node ports
        foreign(tcp("172.18.0.2", 8443)),
        // a firewall-mark service
        foreign(ServiceId::Fwmark { af: AF_INET, fwmark: 7 }),
        // ours: a stale node port, and a stale cluster IP
        foreign(tcp("172.18.0.2", 30080)),
        foreign(tcp("10.96.0.77", 80)),
    ]
    .into_iter()
    .collect();
    let changes = diff(
        &desired,
        &current,
        &BTreeSet::from([ip("10.0.0.9"), ip("10.96.0.77")]),
        &ownership(&["10.0.0.9", "10.96.0.77"]),
    );
    assert_eq!(
        changes.requests,
        vec![Request::DelService(tcp("10.96.0.77", 80)), Request::DelService(tcp("172.18.0.2", 30080))]
    );
    // The excluded address stays bound.
    assert_eq!(changes.unbind, vec![ip("10.96.0.77")]);
}

#[test]
fn iptables_rules() {
    let mut web = plan("web", "10.96.0.10", vec![target("10.244.1.2", 8080, true)]);
    web.node_port = Some(30080);
    web.external_targets = web.cluster_targets.clone();
    let mut empty = plan("empty", "10.96.0.11", vec![]);
    empty.load_balancer_ips = vec![ip("198.51.100.1")];
    let mut fw = plan("fw", "10.96.0.12", vec![target("10.244.1.3", 80, false)]);
    fw.load_balancer_ips = vec![ip("198.51.100.2")];
    fw.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().expect("cidr")];
    fw.external_targets = fw.cluster_targets.clone();
    fw.external_policy_local = true;
    let v6 = plan("v6", "fd00::1", vec![]);
    let text = render_iptables(IpFamily::V4, &[web, empty, fw, v6], &settings(), &JUMPS[..1]);
    let want = "\
*filter
:FPVS-FILTER - [0:0]
-A FPVS-FILTER -m comment --comment \"default/empty:http\" -d 10.96.0.11/32 -p tcp -m tcp --dport 80 -j REJECT
-A FPVS-FILTER -m comment --comment \"default/empty:http\" -d 198.51.100.1/32 -p tcp -m tcp --dport 80 -j REJECT
-A FPVS-FILTER -m comment --comment \"default/fw:http\" -s 203.0.113.0/24 -d 198.51.100.2/32 -p tcp -m tcp --dport 80 -j RETURN
-A FPVS-FILTER -m comment --comment \"default/fw:http\" -d 198.51.100.2/32 -p tcp -m tcp --dport 80 -j DROP
COMMIT
*nat
:FPVS-SERVICES - [0:0]
:FPVS-MARK-MASQ - [0:0]
:FPVS-POSTROUTING - [0:0]
-A FPVS-SERVICES -m comment --comment \"default/web:http\" ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j FPVS-MARK-MASQ
-A FPVS-SERVICES -m comment --comment \"default/web:http\" -m addrtype --dst-type LOCAL -p tcp -m tcp --dport 30080 -j FPVS-MARK-MASQ
-A FPVS-SERVICES -m comment --comment \"default/empty:http\" ! -s 10.244.0.0/16 -d 10.96.0.11/32 -p tcp -m tcp --dport 80 -j FPVS-MARK-MASQ
-A FPVS-SERVICES -m comment --comment \"default/empty:http\" -d 198.51.100.1/32 -p tcp -m tcp --dport 80 -j FPVS-MARK-MASQ
-A FPVS-SERVICES -m comment --comment \"default/fw:http\" ! -s 10.244.0.0/16 -d 10.96.0.12/32 -p tcp -m tcp --dport 80 -j FPVS-MARK-MASQ
-A FPVS-MARK-MASQ -j MARK --or-mark 0x4000
-A FPVS-POSTROUTING -m comment --comment \"default/web:http\" -s 10.244.1.2/32 -d 10.244.1.2/32 -p tcp -m tcp --dport 8080 -j MASQUERADE
-A FPVS-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A FPVS-POSTROUTING -j MARK --xor-mark 0x4000
-A FPVS-POSTROUTING -m comment --comment \"fleetproxy ipvs masquerade\" -j MASQUERADE
-I PREROUTING 1 -m comment --comment \"fleetproxy ipvs service portals\" -j FPVS-SERVICES
COMMIT
";
    assert_eq!(text, want);
}

#[test]
fn saved_rules_and_cleanup() {
    let dump = "\
*filter
:INPUT ACCEPT [0:0]
:FP-SERVICES - [0:0]
:FPVS-FILTER - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"fleetproxy ipvs filter\" -j FPVS-FILTER
-A INPUT -j FP-SERVICES
-A FPVS-FILTER -d 10.96.0.11/32 -p tcp -m tcp --dport 80 -j REJECT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:FPVS-SERVICES - [0:0]
-A PREROUTING -m comment --comment \"fleetproxy ipvs service portals\" -j FPVS-SERVICES
COMMIT
";
    let saved = parse_saved(dump);
    assert_eq!(saved.rules, 1);
    assert_eq!(saved.jumps.len(), 2);
    // The iptables mode's FP- chains are not ours.
    assert_eq!(
        saved.chains,
        BTreeSet::from([
            ("filter".to_owned(), "FPVS-FILTER".to_owned()),
            ("nat".to_owned(), "FPVS-SERVICES".to_owned())
        ])
    );
    let missing: Vec<&str> = saved.missing_jumps().iter().map(|j| j.chain).collect();
    assert_eq!(missing, vec!["OUTPUT", "POSTROUTING", "FORWARD", "OUTPUT"]);
    let cleanup = cleanup_iptables(&saved).expect("something to remove");
    assert_eq!(
        cleanup,
        "\
*filter
:FPVS-FILTER - [0:0]
-D INPUT -m conntrack --ctstate NEW -m comment --comment \"fleetproxy ipvs filter\" -j FPVS-FILTER
-X FPVS-FILTER
COMMIT
*nat
:FPVS-SERVICES - [0:0]
-D PREROUTING -m comment --comment \"fleetproxy ipvs service portals\" -j FPVS-SERVICES
-X FPVS-SERVICES
COMMIT
"
    );
    assert_eq!(cleanup_iptables(&SavedRules::default()), None);
}
