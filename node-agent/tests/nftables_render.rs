//! Golden tests of the nftables renderer, and a check that what it renders is valid nft that the
//! kernel accepts: full scripts, partial scripts, and that a partial sync leaves the kernel exactly
//! as a full sync of the same plans would.
//!
//! `UPDATE_GOLDEN=1 cargo test -p fleetproxy-agent --test nftables_render` rewrites the golden files
//! under `tests/golden/`. The kernel checks need root (they fail loudly without it) and run in
//! throwaway network namespaces.

mod common;

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, time::Duration};

use common::Netns;
use fleetproxy_agent::{
    dataplane::{Changes, DataPlane},
    exec::Runner,
    model::{IpFamily, Protocol, ServicePortName},
    nftables::{
        KernelObjects, NftablesProxier, SERVICES_PER_TRANSACTION, SHARDS, Table, Transactions, count,
        render::script, render_full, render_full_with, render_partial, ruleset::Command as NftCommand,
    },
    policy::{NodeSettings, ServicePlan, Target},
};
use ipnet::IpNet;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test network")
}

fn name(namespace: &str, service: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName { namespace: namespace.into(), name: service.into(), port: port.into(), protocol }
}

fn target(addr: &str, port: u16, is_local: bool) -> Target {
    Target { ip: ip(addr), port, is_local }
}

fn plan(name: ServicePortName, family: IpFamily, port: u16) -> ServicePlan {
    ServicePlan::new(name, family, port)
}

fn settings() -> NodeSettings {
    NodeSettings {
        excluded_cidrs: vec![
            net("10.0.0.0/24"),
            net("192.168.0.0/16"),
            net("192.168.3.0/24"),
            net("fd99::/64"),
        ],
        cluster_cidrs: vec![net("10.244.0.0/16"), net("fd00:10::/64")],
        masquerade_all: false,
        masquerade_bit: 14,
        node_port_addresses: Vec::new(),
    }
}

/// Every feature once: cluster policy with node port, external and load-balancer IPs and source
/// ranges; UDP with affinity; Local policy with local and remote endpoints; SCTP without endpoints;
/// Local policy without local endpoints; an IPv6 twin; SCTP with an endpoint.
fn plans_before() -> Vec<ServicePlan> {
    let web_targets = vec![
        target("10.244.1.5", 8080, true),
        target("10.244.2.5", 8080, false),
        target("10.244.3.5", 8080, false),
    ];
    let web = ServicePlan {
        node_port: Some(30080),
        cluster_ips: vec![ip("10.96.0.10")],
        external_ips: vec![ip("192.0.2.10")],
        load_balancer_ips: vec![ip("198.51.100.10")],
        load_balancer_source_ranges: vec![net("203.0.113.0/24"), net("198.18.0.0/15")],
        cluster_targets: web_targets.clone(),
        external_targets: web_targets,
        ..plan(name("ns1", "web", "http", Protocol::Tcp), IpFamily::V4, 80)
    };
    let dns = ServicePlan {
        cluster_ips: vec![ip("10.96.0.53")],
        session_affinity: Some(Duration::from_secs(10800)),
        cluster_targets: vec![target("10.244.1.9", 53, true), target("10.244.2.9", 53, false)],
        ..plan(name("kube-system", "dns", "dns", Protocol::Udp), IpFamily::V4, 53)
    };
    let local = ServicePlan {
        node_port: Some(30081),
        cluster_ips: vec![ip("10.96.0.81")],
        load_balancer_ips: vec![ip("198.51.100.81")],
        cluster_targets: vec![target("10.244.1.7", 8081, true), target("10.244.2.7", 8081, false)],
        external_targets: vec![target("10.244.1.7", 8081, true)],
        external_policy_local: true,
        session_affinity: Some(Duration::from_secs(60)),
        ..plan(name("ns2", "local", "", Protocol::Tcp), IpFamily::V4, 8081)
    };
    let empty = ServicePlan {
        node_port: Some(30099),
        cluster_ips: vec![ip("10.96.0.99")],
        external_ips: vec![ip("192.0.2.99")],
        ..plan(name("ns2", "empty", "assoc", Protocol::Sctp), IpFamily::V4, 9000)
    };
    let remote_only = ServicePlan {
        node_port: Some(30082),
        cluster_ips: vec![ip("10.96.0.82")],
        load_balancer_ips: vec![ip("198.51.100.82")],
        cluster_targets: vec![target("10.244.2.8", 8082, false)],
        external_policy_local: true,
        ..plan(name("ns2", "remote-only", "http", Protocol::Tcp), IpFamily::V4, 80)
    };
    let web6 = ServicePlan {
        node_port: Some(30080),
        cluster_ips: vec![ip("fd00:96::10")],
        cluster_targets: vec![target("fd00:10::1:5", 8080, true), target("fd00:10::2:5", 8080, false)],
        external_targets: vec![target("fd00:10::1:5", 8080, true), target("fd00:10::2:5", 8080, false)],
        ..plan(name("ns1", "web", "http", Protocol::Tcp), IpFamily::V6, 80)
    };
    let sctp = ServicePlan {
        cluster_ips: vec![ip("10.96.0.132")],
        cluster_targets: vec![target("10.244.1.13", 3868, true)],
        ..plan(name("ns2", "diameter", "", Protocol::Sctp), IpFamily::V4, 3868)
    };
    vec![web, dns, local, empty, remote_only, web6, sctp]
}

/// `web` loses an endpoint and gains one (both families), `empty` is gone, `fresh` is new; the rest
/// is unchanged.
fn plans_after() -> (Vec<ServicePlan>, BTreeSet<ServicePortName>) {
    let mut plans: Vec<ServicePlan> = plans_before().into_iter().filter(|p| p.name.name != "empty").collect();
    for p in plans.iter_mut().filter(|p| p.name.name == "web") {
        let new = match p.family {
            IpFamily::V4 => target("10.244.4.5", 8080, false),
            IpFamily::V6 => target("fd00:10::4:5", 8080, false),
        };
        p.cluster_targets.remove(0);
        p.cluster_targets.push(new);
        p.external_targets = p.cluster_targets.clone();
    }
    plans.push(ServicePlan {
        cluster_ips: vec![ip("10.96.1.1")],
        cluster_targets: vec![target("10.244.1.11", 9376, true)],
        ..plan(name("ns3", "fresh", "", Protocol::Tcp), IpFamily::V4, 443)
    });
    let changed = ["web", "empty", "fresh"]
        .iter()
        .flat_map(|n| plans_before().into_iter().chain(plans.clone()).filter(move |p| p.name.name == *n))
        .map(|p| p.name)
        .collect();
    (plans, changed)
}

fn golden(file: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("golden dir")).expect("create golden dir");
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", path.display()));
    if expected != actual {
        let diff: Vec<String> = expected
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (e, a))| e != a)
            .take(5)
            .map(|(i, (e, a))| format!("line {}:\n  expected: {e}\n  actual:   {a}", i + 1))
            .collect();
        panic!(
            "{} differs from the rendering ({} vs {} lines); first differences:\n{}\n(UPDATE_GOLDEN=1 regenerates)",
            path.display(),
            expected.lines().count(),
            actual.lines().count(),
            diff.join("\n")
        );
    }
}

#[test]
fn golden_full_sync() {
    let rendering = render_full(&plans_before(), &settings(), &KernelObjects::default());
    assert!(rendering.full);
    assert_eq!(rendering.lines, rendering.script().lines().count());
    golden("nftables-full.nft", &rendering.script());
}

#[test]
fn golden_partial_sync() {
    let before = render_full(&plans_before(), &settings(), &KernelObjects::default());
    let (after, changed) = plans_after();
    let partial = render_partial(before.state.clone(), &after, &changed);
    assert!(!partial.full);
    golden("nftables-partial.nft", &partial.script());
    // The state a partial sync leads to is the one a full rendering of the same plans has.
    assert_eq!(partial.state, render_full(&after, &settings(), &KernelObjects::default()).state);
}

#[test]
fn golden_full_sync_deleting_stale_objects() {
    // A full sync knowing only what the kernel holds: the objects of the removed service with
    // affinity (endpoint chains and sets, in its shard), of the firewall no longer wanted (main
    // table) and a shard table beyond the shard count are deleted; the rest is redeclared.
    let before = render_full(&plans_before(), &settings(), &KernelObjects::default());
    let (mut after, _) = plans_after();
    after.retain(|p| p.name.name != "dns");
    for p in after.iter_mut().filter(|p| p.name.name == "web") {
        p.load_balancer_source_ranges.clear();
    }
    let mut existing = before.state.objects();
    existing.table_mut(Table::shard(IpFamily::V4, SHARDS)).chains.insert("service-OLD".into());
    let rendering = render_full(&after, &settings(), &existing);
    let text = rendering.script();
    let deletes: Vec<&str> = text.lines().filter(|l| l.starts_with("delete ")).collect();
    golden("nftables-full-stale.nft", &(deletes.join("\n") + "\n"));
    assert!(deletes.len() >= 6, "{deletes:#?}");
    assert!(
        deletes.iter().all(|l| l.contains("kube-system/dns")
            || l.starts_with("delete chain ip fleetproxy firewall-") && l.contains("ns1/web")
            || *l == format!("delete table ip fleetproxy-services-{SHARDS}")),
        "{deletes:#?}"
    );
}

#[test]
fn unchanged_services_render_nothing() {
    let before = render_full(&plans_before(), &settings(), &KernelObjects::default());
    let changed = plans_before().into_iter().map(|p| p.name).collect();
    let partial = render_partial(before.state.clone(), &plans_before(), &changed);
    assert!(partial.is_empty(), "{}", partial.script());
}

#[test]
fn masquerade_all_and_node_port_addresses() {
    let settings = NodeSettings {
        masquerade_all: true,
        node_port_addresses: vec![net("10.1.0.0/16"), net("2001:db8::/64")],
        ..settings()
    };
    let script = render_full(&plans_before(), &settings, &KernelObjects::default()).script();
    assert!(script.contains(
        "add rule ip fleetproxy-services-0 services ip daddr 10.1.0.0/16 fib daddr type local meta l4proto . th dport vmap @service-nodeports"
    ));
    assert!(script.contains("ip6 daddr 2001:db8::/64 fib daddr type local"));
    let service_chain_rule = script
        .lines()
        .find(|l| {
            l.starts_with("add rule ip fleetproxy-services-")
                && l.split(' ').nth(4).is_some_and(|chain| chain.starts_with("service-"))
                && l.contains("ns1/web")
        })
        .expect("web service chain");
    assert!(service_chain_rule.ends_with("jump mark-for-masquerade"), "{service_chain_rule}");
}

// ---- kernel checks ----------------------------------------------------------------------------

#[test]
fn kernel_accepts_full_and_partial_scripts() {
    let ns = Netns::new("nftr-check");
    let full = render_full(&plans_before(), &settings(), &KernelObjects::default());
    ns.check(&full.script());
    ns.apply(&full.script());
    // What the kernel holds, read back over netlink, is what the sync says it holds.
    assert_eq!(count::kernel_objects(Some(ns.name())).expect("read back"), full.state.objects());
    // Applying the same full sync again on a programmed kernel (an agent restart) is accepted.
    let again = render_full(&plans_before(), &settings(), &full.state.objects());
    ns.apply(&again.script());

    let (after, changed) = plans_after();
    let partial = render_partial(full.state.clone(), &after, &changed);
    ns.check(&partial.script());
    ns.apply(&partial.script());

    // The kernel after the partial sync is what a fresh full sync of the new plans gives.
    let reference = Netns::new("nftr-ref");
    reference.apply(&render_full(&after, &settings(), &KernelObjects::default()).script());
    assert_eq!(ns.snapshot(), reference.snapshot());

    // A full sync that must delete stale objects, from a kernel holding the old plans.
    let stale = Netns::new("nftr-stale");
    stale.apply(&full.script());
    stale.apply(&render_full(&after, &settings(), &full.state.objects()).script());
    assert_eq!(stale.snapshot(), reference.snapshot());
}

/// `n` cluster-IP services of three endpoints each.
fn many_plans(n: u32, endpoint_base: u32) -> Vec<ServicePlan> {
    (0..n)
        .map(|i| {
            let targets = (0..3u32)
                .map(|e| Target {
                    ip: IpAddr::from(std::net::Ipv4Addr::from(0x0af4_0000 + (endpoint_base + i) * 4 + e)),
                    port: 8080,
                    is_local: e == 0,
                })
                .collect();
            ServicePlan {
                cluster_ips: vec![IpAddr::from(std::net::Ipv4Addr::from(0x0a60_0000 + i))],
                cluster_targets: targets,
                ..plan(name("bulk", &format!("svc-{i}"), "", Protocol::Tcp), IpFamily::V4, 80)
            }
        })
        .collect()
}

/// The pieces of a full sync, each as the transactions (of at most `max_lines`, pieces joined) that
/// the proxier would send.
fn transactions(plans: &[ServicePlan], existing: &KernelObjects, max_lines: usize) -> Vec<Vec<NftCommand>> {
    let mut joined = Transactions::new(max_lines);
    let mut out = Vec::new();
    render_full_with(plans, &settings(), existing, &mut |piece, lines| {
        out.extend(joined.add(piece, lines));
        Ok::<_, std::convert::Infallible>(())
    })
    .expect("infallible");
    out.extend(joined.finish());
    out
}

#[test]
fn a_full_sync_cut_into_transactions_leaves_what_one_transaction_leaves() {
    let plans = many_plans(2 * SERVICES_PER_TRANSACTION as u32 + 100, 0);
    let full = render_full(&plans, &settings(), &KernelObjects::default());
    let pieces = transactions(&plans, &KernelObjects::default(), 1);
    // Head, batches of services per shard, the new maps' and sets' elements, deletions.
    assert!(pieces.len() >= 7, "{} transactions", pieces.len());
    assert_eq!(pieces.concat(), full.commands);
    assert_eq!(transactions(&plans, &KernelObjects::default(), usize::MAX), vec![full.commands.clone()]);

    let whole = Netns::new("nftr-whole");
    whole.apply(&full.script());
    let cut = Netns::new("nftr-cut");
    for piece in &pieces {
        cut.apply(&script(piece));
    }
    assert_eq!(cut.snapshot(), whole.snapshot());

    // A resync in pieces over a programmed kernel, to other endpoints and fewer services.
    let after = many_plans(SERVICES_PER_TRANSACTION as u32 + 10, 1);
    for piece in transactions(&after, &full.state.objects(), 1) {
        cut.apply(&script(&piece));
    }
    let reference = Netns::new("nftr-cutref");
    reference.apply(&render_full(&after, &settings(), &KernelObjects::default()).script());
    assert_eq!(cut.snapshot(), reference.snapshot());
}

#[test]
fn a_large_service_dnats_through_one_map_in_both_families() {
    let v4: Vec<Target> = (0..40u8).map(|i| target(&format!("10.244.9.{i}"), 8080, i == 0)).collect();
    let v6: Vec<Target> = (0..40u8).map(|i| target(&format!("fd00:10::9:{i:x}"), 8080, false)).collect();
    let plans = vec![
        ServicePlan {
            cluster_ips: vec![ip("10.96.9.9")],
            cluster_targets: v4,
            ..plan(name("ns", "big", "http", Protocol::Tcp), IpFamily::V4, 80)
        },
        ServicePlan {
            cluster_ips: vec![ip("fd00:10:96::99")],
            cluster_targets: v6,
            ..plan(name("ns", "big", "http", Protocol::Tcp), IpFamily::V6, 80)
        },
    ];
    let full = render_full(&plans, &settings(), &KernelObjects::default());
    let text = full.script();
    let maps: Vec<&str> = text.lines().filter(|l| l.contains("numgen random mod 40 map {")).collect();
    assert_eq!(maps.len(), 2, "{text}");
    assert!(maps[0].contains("dnat ip to") && maps[0].contains("39 : 10.244.9.39 . 8080"));
    assert!(maps[1].contains("dnat ip6 to"));
    assert!(!full.script().contains("numgen random mod 39 0"), "no cascade above the limit");
    let ns = Netns::new("nftr-bigmap");
    ns.check(&full.script());
    ns.apply(&full.script());
}

#[tokio::test]
async fn proxier_syncs_reads_back_and_cleans_up_in_a_netns() {
    let ns = Netns::new("nftr-proxier");
    // A foreign table that must survive our clean-up.
    ns.apply("add table inet foreign\nadd chain inet foreign c\nadd rule inet foreign c counter\n");
    let mut proxier = NftablesProxier::new(Runner::in_netns(&ns.0));
    proxier.probe().await.expect("probe");

    let stats = proxier.sync(&plans_before(), &settings(), &Changes::Full).await.expect("full sync");
    assert!(stats.full && stats.payload_size > 0);
    let count = proxier.rule_count().await.expect("rule count");
    // Every rule and every static element: matches what was rendered.
    let rendered = render_full(&plans_before(), &settings(), &KernelObjects::default()).script();
    let rules = rendered.lines().filter(|l| l.starts_with("add rule ")).count() as u64;
    let elements = rendered.lines().filter(|l| l.starts_with('\t')).count() as u64;
    assert_eq!(count, rules + elements);

    let (after, changed) = plans_after();
    let stats = proxier.sync(&after, &settings(), &Changes::Services(changed)).await.expect("partial sync");
    assert!(!stats.full);

    // A new proxier (agent restart) knows nothing: its first sync is full and reads the kernel's
    // objects to delete what is stale.
    let mut restarted = NftablesProxier::new(Runner::in_netns(&ns.0));
    let stats = restarted
        .sync(&plans_before(), &settings(), &Changes::Services(BTreeSet::new()))
        .await
        .expect("resync");
    assert!(stats.full);

    restarted.cleanup().await.expect("cleanup");
    let tables = ns.nft(&["list", "tables"], None).expect("list tables");
    assert_eq!(tables.trim(), "table inet foreign");
    assert_eq!(restarted.rule_count().await.expect("rule count"), 0);
    // Clean-up with nothing of ours is a no-op.
    restarted.cleanup().await.expect("second cleanup");
}

#[tokio::test]
async fn a_refused_sync_is_reported_and_forces_a_full_one() {
    let ns = Netns::new("nftr-refused");
    let mut proxier = NftablesProxier::new(Runner::in_netns(&ns.0));
    proxier.sync(&plans_before(), &settings(), &Changes::Full).await.expect("full sync");
    // Someone deletes our table behind our back: the partial sync's `flush chain` fails.
    ns.apply("delete table ip fleetproxy\n");
    let (after, changed) = plans_after();
    let err =
        proxier.sync(&after, &settings(), &Changes::Services(changed.clone())).await.expect_err("refused");
    assert!(err.to_string().contains("nft"), "{err}");
    assert!(proxier.applied().is_none());
    let stats = proxier.sync(&after, &settings(), &Changes::Services(changed)).await.expect("recovers");
    assert!(stats.full);
}
