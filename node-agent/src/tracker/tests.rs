//! Tracker tests: one per rule of kube-proxy's change trackers, then the property that incremental
//! updates and a build from scratch agree.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort as K8sServicePort,
            ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{
            Endpoint as K8sEndpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForZone,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proptest::prelude::*;

use super::*;

fn meta(namespace: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        labels: (!labels.is_empty())
            .then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..ObjectMeta::default()
    }
}

fn service(name: &str, cluster_ips: &[&str], ports: &[(&str, i32, &str)]) -> Service {
    Service {
        metadata: meta("ns", name, &[]),
        spec: Some(ServiceSpec {
            cluster_ip: cluster_ips.first().map(|ip| ip.to_string()),
            cluster_ips: Some(cluster_ips.iter().map(|ip| ip.to_string()).collect()),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, protocol)| K8sServicePort {
                        name: Some(name.to_string()),
                        port: *port,
                        protocol: Some(protocol.to_string()),
                        ..K8sServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[derive(Clone, Debug)]
struct Ep {
    ip: &'static str,
    node: Option<&'static str>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    zones: &'static [&'static str],
}

fn ep(ip: &'static str) -> Ep {
    Ep { ip, node: None, ready: None, serving: None, terminating: None, zones: &[] }
}

fn slice(name: &str, service: &str, family: &str, ports: &[(&str, i32)], endpoints: &[Ep]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta("ns", name, &[(LABEL_SERVICE_NAME, service)]),
        address_type: family.into(),
        ports: Some(
            ports
                .iter()
                .map(|(name, port)| EndpointPort {
                    name: Some(name.to_string()),
                    port: Some(*port),
                    protocol: Some("TCP".into()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
        endpoints: Some(
            endpoints
                .iter()
                .map(|e| K8sEndpoint {
                    addresses: vec![e.ip.to_string()],
                    node_name: e.node.map(str::to_owned),
                    conditions: Some(EndpointConditions {
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                    }),
                    hints: (!e.zones.is_empty()).then(|| EndpointHints {
                        for_zones: Some(e.zones.iter().map(|z| ForZone { name: z.to_string() }).collect()),
                        for_nodes: None,
                    }),
                    ..K8sEndpoint::default()
                })
                .collect(),
        ),
    }
}

fn spn(name: &str, port: &str) -> ServicePortName {
    ServicePortName { namespace: "ns".into(), name: name.into(), port: port.into(), protocol: Protocol::Tcp }
}

fn tracker() -> ChangeTracker {
    ChangeTracker::new(TrackerConfig { node_name: "node-a".into(), ..TrackerConfig::default() })
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test IP")
}

#[test]
fn service_ports_become_model_entries() {
    let mut t = tracker();
    t.apply_service(&service("web", &["10.96.0.10"], &[("http", 80, "TCP"), ("dns", 53, "UDP")]));
    let model = t.model();
    assert_eq!(model.services.len(), 2);
    let http = &model.services[&spn("web", "http")];
    assert_eq!(http.port, 80);
    assert_eq!(http.cluster_ips, vec![ip("10.96.0.10")]);
    assert_eq!(http.node_port, None);
    assert!(!http.external_policy_local && !http.internal_policy_local && !http.prefer_close);
    let dns = ServicePortName { protocol: Protocol::Udp, ..spn("web", "dns") };
    assert!(model.services.contains_key(&dns));
    let changes = t.take_changes();
    assert_eq!(changes.services.len(), 2);
    assert_eq!(changes.service_events, 1);
    assert!(!t.has_changes());
}

#[test]
fn headless_external_name_and_foreign_proxy_services_are_skipped() {
    let mut t = tracker();
    t.apply_service(&service("headless", &["None"], &[("http", 80, "TCP")]));
    t.apply_service(&service("no-ip", &[], &[("http", 80, "TCP")]));
    let mut external_name = service("ext", &["10.96.0.11"], &[("http", 80, "TCP")]);
    if let Some(spec) = external_name.spec.as_mut() {
        spec.type_ = Some("ExternalName".into());
    }
    t.apply_service(&external_name);
    let mut foreign = service("foreign", &["10.96.0.12"], &[("http", 80, "TCP")]);
    foreign.metadata.labels = Some(BTreeMap::from([(LABEL_SERVICE_PROXY_NAME.into(), "other".into())]));
    t.apply_service(&foreign);
    assert!(t.model().services.is_empty());
    assert!(!t.has_changes());

    // Configured with that name, the agent takes the labelled Service.
    let mut ours = ChangeTracker::new(TrackerConfig {
        service_proxy_name: Some("other".into()),
        ..TrackerConfig::default()
    });
    ours.apply_service(&foreign);
    assert_eq!(ours.model().services.len(), 1);
}

#[test]
fn a_service_that_becomes_skipped_is_removed() {
    let mut t = tracker();
    let mut svc = service("web", &["10.96.0.10"], &[("http", 80, "TCP")]);
    t.apply_service(&svc);
    t.take_changes();
    svc.metadata.labels = Some(BTreeMap::from([(LABEL_SERVICE_PROXY_NAME.into(), "other".into())]));
    t.apply_service(&svc);
    assert!(t.model().services.is_empty());
    assert_eq!(t.take_changes().services, [spn("web", "http")].into());
}

#[test]
fn unchanged_updates_record_nothing() {
    let mut t = tracker();
    let svc = service("web", &["10.96.0.10"], &[("http", 80, "TCP")]);
    let sl = slice("web-1", "web", "IPv4", &[("http", 8080)], &[ep("10.0.0.1")]);
    t.apply_service(&svc);
    t.apply_slice(&sl);
    t.take_changes();
    t.apply_service(&svc);
    t.apply_slice(&sl);
    assert_eq!(t.take_changes(), TrackedChanges::default());
}

#[test]
fn only_the_changed_port_is_recorded() {
    let mut t = tracker();
    t.apply_service(&service("web", &["10.96.0.10"], &[("http", 80, "TCP"), ("https", 443, "TCP")]));
    t.take_changes();
    t.apply_service(&service("web", &["10.96.0.10"], &[("http", 80, "TCP"), ("https", 8443, "TCP")]));
    assert_eq!(t.take_changes().services, [spn("web", "https")].into());
    t.delete_service(&service("web", &[], &[]));
    assert!(t.model().services.is_empty());
    assert_eq!(t.take_changes().services, [spn("web", "http"), spn("web", "https")].into());
}

#[test]
fn service_fields_are_read_as_kube_proxy_reads_them() {
    let mut svc = service("lb", &["10.96.0.20", "fd00::20"], &[("http", 80, "TCP")]);
    let spec = svc.spec.as_mut().expect("spec");
    spec.type_ = Some("LoadBalancer".into());
    if let Some(port) = spec.ports.as_mut().and_then(|p| p.first_mut()) {
        port.node_port = Some(30080);
    }
    spec.external_ips = Some(vec!["192.0.2.1".into()]);
    spec.external_traffic_policy = Some("Local".into());
    spec.internal_traffic_policy = Some("Local".into());
    spec.traffic_distribution = Some("PreferClose".into());
    spec.session_affinity = Some("ClientIP".into());
    spec.session_affinity_config =
        Some(SessionAffinityConfig { client_ip: Some(ClientIPConfig { timeout_seconds: Some(60) }) });
    spec.load_balancer_source_ranges = Some(vec!["203.0.113.0/24".into(), " 198.51.100.7/24 ".into()]);
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![
                LoadBalancerIngress { ip: Some("198.51.100.1".into()), ..LoadBalancerIngress::default() },
                LoadBalancerIngress {
                    ip: Some("198.51.100.2".into()),
                    ip_mode: Some("Proxy".into()),
                    ..LoadBalancerIngress::default()
                },
                LoadBalancerIngress { hostname: Some("lb.example".into()), ..LoadBalancerIngress::default() },
            ]),
        }),
        conditions: None,
    });
    let mut t = tracker();
    t.apply_service(&svc);
    let port = &t.model().services[&spn("lb", "http")];
    assert_eq!(port.cluster_ips, vec![ip("10.96.0.20"), ip("fd00::20")]);
    assert_eq!(port.node_port, Some(30080));
    assert_eq!(port.external_ips, vec![ip("192.0.2.1")]);
    assert_eq!(
        port.load_balancer_ips,
        vec![ip("198.51.100.1")],
        "ipMode Proxy and hostnames are not intercepted"
    );
    assert_eq!(
        port.load_balancer_source_ranges,
        vec!["198.51.100.0/24".parse::<IpNet>().expect("net"), "203.0.113.0/24".parse().expect("net")]
    );
    assert_eq!(port.session_affinity, Some(Duration::from_secs(60)));
    assert!(port.external_policy_local && port.internal_policy_local && port.prefer_close);
}

#[test]
fn external_policy_needs_external_access_and_affinity_has_a_default_timeout() {
    let mut svc = service("web", &["10.96.0.10"], &[("http", 80, "TCP")]);
    let spec = svc.spec.as_mut().expect("spec");
    spec.external_traffic_policy = Some("Local".into());
    spec.session_affinity = Some("ClientIP".into());
    if let Some(port) = spec.ports.as_mut().and_then(|p| p.first_mut()) {
        port.node_port = Some(30080); // left over from an earlier NodePort type: ignored
    }
    let mut t = tracker();
    t.apply_service(&svc);
    let port = &t.model().services[&spn("web", "http")];
    assert!(!port.external_policy_local);
    assert_eq!(port.node_port, None);
    assert_eq!(port.session_affinity, Some(Duration::from_secs(10_800)));
}

#[test]
fn slices_merge_per_service_port_and_dedupe() {
    let mut t = tracker();
    let mut local = ep("10.0.0.2");
    local.node = Some("node-a");
    t.apply_slice(&slice("web-1", "web", "IPv4", &[("http", 8080)], &[ep("10.0.0.2"), ep("10.0.0.1")]));
    t.apply_slice(&slice("web-2", "web", "IPv4", &[("http", 8080)], &[local.clone(), ep("10.0.0.3")]));
    t.apply_slice(&slice("web-3", "web", "IPv6", &[("http", 8080)], &[ep("fd00::1"), ep("10.0.0.9")]));
    let endpoints = &t.model().endpoints[&spn("web", "http")];
    let ips: Vec<String> = endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1"], "sorted, deduplicated, family-checked");
    assert!(endpoints[1].is_local, "the local copy of a duplicate wins");
    assert_eq!(t.take_changes().endpoint_events, 3);

    t.delete_slice(&slice("web-2", "web", "IPv4", &[], &[]));
    let ips: Vec<String> =
        t.model().endpoints[&spn("web", "http")].iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["10.0.0.1", "10.0.0.2", "fd00::1"]);
    assert!(!t.model().endpoints[&spn("web", "http")][1].is_local);

    t.delete_slice(&slice("web-1", "web", "IPv4", &[], &[]));
    t.delete_slice(&slice("web-3", "web", "IPv6", &[], &[]));
    assert!(t.model().endpoints.is_empty());
    assert_eq!(t.take_changes().services, [spn("web", "http")].into());
}

#[test]
fn endpoint_conditions_default_as_the_api_says() {
    let mut t = tracker();
    let mut terminating = ep("10.0.0.2");
    terminating.ready = Some(false);
    terminating.terminating = Some(true);
    let mut local = ep("10.0.0.3");
    local.node = Some("node-a");
    local.zones = &["zone-b", "zone-a"];
    let mut no_address =
        slice("web-1", "web", "IPv4", &[("http", 8080)], &[ep("10.0.0.1"), terminating, local]);
    if let Some(endpoints) = no_address.endpoints.as_mut() {
        endpoints.push(K8sEndpoint::default());
    }
    t.apply_slice(&no_address);
    let endpoints = &t.model().endpoints[&spn("web", "http")];
    assert_eq!(endpoints.len(), 3, "an endpoint without addresses is skipped");
    let (plain, terminating, local) = (&endpoints[0], &endpoints[1], &endpoints[2]);
    assert!(plain.ready && plain.serving && !plain.terminating && !plain.is_local);
    assert!(!terminating.ready && terminating.serving && terminating.terminating);
    assert!(local.is_local);
    assert_eq!(local.zone_hints, ["zone-a", "zone-b"]);
}

#[test]
fn foreign_headless_and_fqdn_slices_are_skipped() {
    let mut t = tracker();
    let mut headless = slice("h-1", "h", "IPv4", &[("http", 80)], &[ep("10.0.0.1")]);
    headless.metadata.labels.get_or_insert_default().insert(LABEL_HEADLESS.into(), String::new());
    let mut foreign = slice("f-1", "f", "IPv4", &[("http", 80)], &[ep("10.0.0.1")]);
    foreign.metadata.labels.get_or_insert_default().insert(LABEL_SERVICE_PROXY_NAME.into(), "x".into());
    let fqdn = slice("q-1", "q", "FQDN", &[("http", 80)], &[ep("10.0.0.1")]);
    let mut orphan = slice("o-1", "o", "IPv4", &[("http", 80)], &[ep("10.0.0.1")]);
    orphan.metadata.labels = None;
    for s in [&headless, &foreign, &fqdn, &orphan] {
        t.apply_slice(s);
    }
    assert!(t.model().endpoints.is_empty());

    // A tracked slice that gains the headless label leaves the model.
    let plain = slice("h-1", "h", "IPv4", &[("http", 80)], &[ep("10.0.0.1")]);
    t.apply_slice(&plain);
    assert_eq!(t.model().endpoints.len(), 1);
    t.apply_slice(&headless);
    assert!(t.model().endpoints.is_empty());
}

#[test]
fn the_earliest_trigger_time_per_service_is_kept() {
    let started: Timestamp = "2025-01-01T00:00:00Z".parse().expect("time");
    let mut t = ChangeTracker::new(TrackerConfig { started: Some(started), ..TrackerConfig::default() });
    let stamped = |name: &str, ip: &'static str, time: &str| {
        let mut s = slice(name, "web", "IPv4", &[("http", 80)], &[ep(ip)]);
        s.metadata.annotations =
            Some(BTreeMap::from([(ANNOTATION_LAST_CHANGE_TRIGGER_TIME.into(), time.into())]));
        s
    };
    t.apply_slice(&stamped("web-1", "10.0.0.1", "2025-01-01T00:00:05Z"));
    t.apply_slice(&stamped("web-2", "10.0.0.2", "2025-01-01T00:00:02Z"));
    t.apply_slice(&stamped("web-1", "10.0.0.3", "2025-01-01T00:00:09Z"));
    t.apply_slice(&stamped("other", "10.0.0.4", "2024-12-31T00:00:00Z")); // before start: ignored
    let changes = t.take_changes();
    let web = ServiceRef { namespace: "ns".into(), name: "web".into() };
    assert_eq!(changes.trigger_times.len(), 1);
    assert_eq!(changes.trigger_times[&web], "2025-01-01T00:00:02Z".parse::<Timestamp>().expect("time"));
    assert!(t.take_changes().trigger_times.is_empty());
}

#[test]
fn node_zone_changes_flag_a_full_sync() {
    let mut t = tracker();
    assert!(!t.set_node_zone(None));
    assert!(t.set_node_zone(Some("zone-a".into())));
    assert_eq!(t.model().node_zone.as_deref(), Some("zone-a"));
    assert!(t.take_changes().topology_changed);
    assert!(!t.set_node_zone(Some("zone-a".into())));
    assert!(t.set_node_zone(Some(String::new())));
    assert_eq!(t.model().node_zone, None);
    let labels = BTreeMap::from([(LABEL_TOPOLOGY_ZONE.to_owned(), "z".to_owned())]);
    assert_eq!(node_zone(Some(&labels)).as_deref(), Some("z"));
}

#[test]
fn a_relist_removes_what_disappeared() {
    let mut t = tracker();
    t.apply_service(&service("a", &["10.96.0.1"], &[("", 80, "TCP")]));
    t.apply_service(&service("b", &["10.96.0.2"], &[("", 80, "TCP")]));
    t.apply_slice(&slice("a-1", "a", "IPv4", &[("", 80)], &[ep("10.0.0.1")]));
    t.apply_slice(&slice("b-1", "b", "IPv4", &[("", 80)], &[ep("10.0.0.2")]));
    t.take_changes();
    let b = service("b", &["10.96.0.2"], &[("", 80, "TCP")]);
    let b1 = slice("b-1", "b", "IPv4", &[("", 80)], &[ep("10.0.0.2")]);
    t.replace_services([&b]);
    t.replace_slices([&b1]);
    assert_eq!(t.model().services.keys().cloned().collect::<Vec<_>>(), [spn("b", "")]);
    assert_eq!(t.model().endpoints.keys().cloned().collect::<Vec<_>>(), [spn("b", "")]);
    assert_eq!(t.take_changes().services, [spn("a", "")].into());
}

// --- property: incremental == from scratch ---------------------------------------------------

const NAMES: [&str; 3] = ["a", "b", "c"];
const IPS: [&str; 6] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "fd00::2", "fd00::3"];

#[derive(Clone, Debug)]
enum Event {
    ApplyService(Box<Service>),
    DeleteService(usize),
    ApplySlice(Box<EndpointSlice>),
    DeleteSlice(usize),
    Relist,
}

fn arb_service() -> impl Strategy<Value = Service> {
    (0..NAMES.len(), 0..3usize, prop::collection::vec((0..2usize, 1..3i32), 0..3), any::<bool>(), 0..3usize)
        .prop_map(|(name, ips, ports, local, kind)| {
            let cluster_ips: &[&str] = match ips {
                0 => &["10.96.0.1"],
                1 => &["10.96.0.1", "fd00::96:1"],
                _ => &["None"],
            };
            let ports: Vec<(&str, i32, &str)> =
                ports.into_iter().map(|(name, port)| (["", "http"][name], port, "TCP")).collect();
            let mut svc = service(NAMES[name], cluster_ips, &ports);
            if let Some(spec) = svc.spec.as_mut() {
                spec.type_ = Some(["ClusterIP", "NodePort", "ExternalName"][kind].into());
                spec.external_traffic_policy = local.then(|| "Local".into());
            }
            svc
        })
}

fn arb_slice() -> impl Strategy<Value = EndpointSlice> {
    let endpoint = (0..IPS.len(), prop::option::of(any::<bool>()), any::<bool>(), any::<bool>());
    (0..NAMES.len(), 0..2usize, any::<bool>(), prop::collection::vec(endpoint, 0..4), 0..2usize).prop_map(
        |(service, index, v6, endpoints, port)| {
            let endpoints: Vec<Ep> = endpoints
                .into_iter()
                .map(|(ip, ready, local, terminating)| Ep {
                    ip: IPS[ip],
                    node: local.then_some("node-a"),
                    ready,
                    serving: None,
                    terminating: Some(terminating),
                    zones: &[],
                })
                .collect();
            let name = format!("{}-{index}", NAMES[service]);
            slice(
                &name,
                NAMES[service],
                if v6 { "IPv6" } else { "IPv4" },
                &[(["", "http"][port], 80)],
                &endpoints,
            )
        },
    )
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => arb_service().prop_map(|s| Event::ApplyService(Box::new(s))),
        1 => (0..NAMES.len()).prop_map(Event::DeleteService),
        4 => arb_slice().prop_map(|s| Event::ApplySlice(Box::new(s))),
        1 => (0..NAMES.len() * 2).prop_map(Event::DeleteSlice),
        1 => Just(Event::Relist),
    ]
}

fn slice_name(index: usize) -> String {
    format!("{}-{}", NAMES[index / 2], index % 2)
}

proptest! {
    #[test]
    fn incremental_updates_equal_a_build_from_scratch(events in prop::collection::vec(arb_event(), 0..40)) {
        let mut incremental = tracker();
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        for event in events {
            match event {
                Event::ApplyService(svc) => {
                    incremental.apply_service(&svc);
                    services.insert(svc.metadata.name.clone().unwrap_or_default(), *svc);
                }
                Event::DeleteService(index) => {
                    if let Some(svc) = services.remove(NAMES[index]) {
                        incremental.delete_service(&svc);
                    }
                }
                Event::ApplySlice(s) => {
                    incremental.apply_slice(&s);
                    slices.insert(s.metadata.name.clone().unwrap_or_default(), *s);
                }
                Event::DeleteSlice(index) => {
                    if let Some(s) = slices.remove(&slice_name(index)) {
                        incremental.delete_slice(&s);
                    }
                }
                Event::Relist => {
                    incremental.replace_services(services.values());
                    incremental.replace_slices(slices.values());
                }
            }
        }
        // From scratch, slices first: arrival order must not matter either.
        let mut scratch = tracker();
        for s in slices.values().rev() {
            scratch.apply_slice(s);
        }
        for svc in services.values() {
            scratch.apply_service(svc);
        }
        prop_assert_eq!(incremental.model(), scratch.model());

        // Everything the tracker reports as changed is consistent with the model: an unreported
        // port is the same in a model built before the last take_changes.
        for (name, endpoints) in &incremental.model().endpoints {
            prop_assert!(!endpoints.is_empty(), "{name}: empty endpoint lists are removed");
            prop_assert!(endpoints.windows(2).all(|w| (w[0].ip, w[0].port) < (w[1].ip, w[1].port)));
        }
    }

    #[test]
    fn changes_name_exactly_the_ports_that_differ(
        before in prop::collection::vec(arb_event(), 0..20),
        after in prop::collection::vec(arb_event(), 0..10),
    ) {
        let mut t = tracker();
        let apply = |t: &mut ChangeTracker, event: &Event| match event {
            Event::ApplyService(svc) => t.apply_service(svc),
            Event::ApplySlice(s) => t.apply_slice(s),
            Event::DeleteService(index) => t.delete_service(&service(NAMES[*index], &[], &[])),
            Event::DeleteSlice(index) => t.delete_slice(&slice(&slice_name(*index), "x", "IPv4", &[], &[])),
            Event::Relist => {}
        };
        for event in &before {
            apply(&mut t, event);
        }
        let old = t.model().clone();
        t.take_changes();
        for event in &after {
            apply(&mut t, event);
        }
        let changed = t.take_changes().services;
        let new = t.model();
        let names: BTreeSet<&ServicePortName> =
            old.services.keys().chain(old.endpoints.keys()).chain(new.services.keys()).chain(new.endpoints.keys()).collect();
        for name in names {
            let differs = old.services.get(name) != new.services.get(name) || old.endpoints.get(name) != new.endpoints.get(name);
            if differs {
                prop_assert!(changed.contains(name), "{name} changed but was not reported");
            }
        }
    }
}
