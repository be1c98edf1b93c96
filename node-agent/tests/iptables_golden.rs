//! Golden tests of the iptables renderer: a fixed set of service plans against the expected
//! `iptables-restore` input in `tests/golden/iptables-*.txt`.
//!
//! After an intended change of the output, regenerate the files and review the diff:
//! `UPDATE_GOLDEN=1 cargo test -p fleetproxy-agent --test iptables_golden`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use fleetproxy_agent::{
    iptables::render::{self, KernelChains, Mode, Split, Table},
    model::{IpFamily, Protocol, ServicePortName},
    policy::{NodeSettings, ServicePlan, Target},
};
use proptest::prelude::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn name(ns: &str, svc: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName { namespace: ns.into(), name: svc.into(), port: port.into(), protocol }
}

fn target(addr: &str, port: u16, is_local: bool) -> Target {
    Target { ip: ip(addr), port, is_local }
}

fn plan(
    name: ServicePortName,
    family: IpFamily,
    port: u16,
    cluster_ip: &str,
    targets: Vec<Target>,
) -> ServicePlan {
    ServicePlan {
        cluster_ips: vec![ip(cluster_ip)],
        external_targets: targets.clone(),
        cluster_targets: targets,
        ..ServicePlan::new(name, family, port)
    }
}

/// Every feature at least once.
fn plans() -> Vec<ServicePlan> {
    let v4 = IpFamily::V4;
    let eps = vec![
        target("10.244.1.5", 8080, true),
        target("10.244.2.6", 8080, false),
        target("10.244.3.7", 8080, false),
    ];

    // ClusterIP + NodePort + externalIP, Cluster policy, three endpoints.
    let mut web = plan(name("shop", "web", "http", Protocol::Tcp), v4, 80, "10.96.0.10", eps.clone());
    web.node_port = Some(30080);
    web.external_ips = vec![ip("192.0.2.10")];

    // LoadBalancer with source ranges, Local external policy, ClientIP affinity.
    let mut lb = plan(name("shop", "lb", "https", Protocol::Tcp), v4, 443, "10.96.0.20", eps.clone());
    lb.node_port = Some(30443);
    lb.load_balancer_ips = vec![ip("203.0.113.5")];
    lb.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().expect("cidr")];
    lb.external_policy_local = true;
    lb.external_targets = vec![eps[0]];
    lb.session_affinity = Some(Duration::from_secs(10800));

    // No endpoints at all: REJECT (UDP: ICMP port unreachable).
    let dns = plan(name("kube-system", "dns", "dns", Protocol::Udp), v4, 53, "10.96.0.53", vec![]);

    // Local policy and no local endpoint: node port traffic is dropped, cluster traffic served.
    let mut remote = plan(name("shop", "remote", "", Protocol::Tcp), v4, 8080, "10.96.0.30", vec![eps[1]]);
    remote.node_port = Some(30081);
    remote.external_policy_local = true;
    remote.external_targets = vec![];

    // SCTP, one endpoint.
    let sctp = plan(
        name("telco", "sig", "sctp", Protocol::Sctp),
        v4,
        3868,
        "10.96.0.40",
        vec![target("10.244.4.8", 3868, false)],
    );

    // IPv6, two endpoints, affinity.
    let mut v6 = plan(
        name("shop", "web", "http", Protocol::Tcp),
        IpFamily::V6,
        80,
        "fd00:96::10",
        vec![target("fd00:244:1::5", 8080, true), target("fd00:244:2::6", 8080, false)],
    );
    v6.session_affinity = Some(Duration::from_secs(60));

    vec![web, lb, dns, remote, sctp, v6]
}

fn settings() -> NodeSettings {
    NodeSettings {
        excluded_cidrs: vec!["10.0.0.0/24".parse().expect("cidr"), "fd00:1::/64".parse().expect("cidr")],
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr"), "fd00:244::/48".parse().expect("cidr")],
        masquerade_all: false,
        masquerade_bit: 14,
        node_port_addresses: vec![],
    }
}

fn check(file: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("golden dir")).expect("create golden dir");
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1 to create it", path.display()));
    if expected != actual {
        let first = expected.lines().zip(actual.lines()).position(|(e, a)| e != a);
        panic!(
            "{file} differs (first differing line: {first:?}); run with UPDATE_GOLDEN=1 and review the diff.\n--- actual ---\n{actual}"
        );
    }
}

#[test]
fn full_sync_ipv4() {
    let rendered = render::render(
        IpFamily::V4,
        &plans(),
        &settings(),
        &Mode::Full { existing: &KernelChains::default() },
        Split::Never,
    );
    assert_eq!(rendered.lines, rendered.text.lines().count());
    check("iptables-full-v4.txt", &rendered.text);
}

#[test]
fn full_sync_ipv6() {
    let rendered = render::render(
        IpFamily::V6,
        &plans(),
        &settings(),
        &Mode::Full { existing: &KernelChains::default() },
        Split::Never,
    );
    check("iptables-full-v6.txt", &rendered.text);
}

/// A full sync over a kernel that already has our jump rules and some stale chains: no jump rule is
/// added twice, stale chains of ours are deleted.
#[test]
fn full_sync_over_existing_state() {
    let mut existing = KernelChains::default();
    for jump in render::JUMP_RULES {
        existing.jumps.insert((jump.table, jump.chain.to_owned(), jump.target.to_owned()));
    }
    existing
        .nat
        .extend(["FP-SERVICES", "FP-SVC-STALESTALESTALE1", "FP-SEP-STALESTALESTALE2"].map(String::from));
    existing.filter.extend(["FP-FORWARD", "FP-OLD-CHAIN"].map(String::from));
    let plans: Vec<ServicePlan> = plans().into_iter().take(1).collect();
    let rendered =
        render::render(IpFamily::V4, &plans, &settings(), &Mode::Full { existing: &existing }, Split::Never);
    assert!(!rendered.text.contains("-I "), "jump rules re-added:\n{}", rendered.text);
    check("iptables-full-existing-v4.txt", &rendered.text);
    assert_eq!(existing.jumps.iter().filter(|(t, _, _)| *t == Table::Nat).count(), 3);
}

/// One service's endpoints change and another service goes away: only their chains are written or
/// deleted, and of the top-level chains only nat `FP-SERVICES` (the removed service's cluster IP),
/// whole.
#[test]
fn partial_sync_ipv4() {
    let before = plans();
    let full = render::render(
        IpFamily::V4,
        &before,
        &settings(),
        &Mode::Full { existing: &KernelChains::default() },
        Split::Never,
    );

    let mut after = before.clone();
    let web = &mut after[0];
    web.cluster_targets.pop();
    web.external_targets.pop();
    let removed = after.remove(4).name; // telco/sig
    let changed: BTreeSet<ServicePortName> = [after[0].name.clone(), removed].into();
    let rendered = render::render(
        IpFamily::V4,
        &after,
        &settings(),
        &Mode::Partial { changed: &changed, previous: &full.applied },
        Split::Never,
    );

    let untouched = render::service_chain("SVC", &after[1].name, Protocol::Tcp);
    assert!(!rendered.text.contains(&format!(":{untouched} ")), "unchanged chain declared (flushed)");
    assert!(rendered.text.contains(&format!("-j {untouched}")), "unchanged service still dispatched");
    let declared = commands(&rendered.text);
    assert!(!declared.contains_key("filter"), "filter table unchanged:\n{}", rendered.text);
    assert!(declared["nat"].declared.contains("FP-SERVICES - [0:0]"));
    for chain in ["FP-NODEPORTS", "FP-POSTROUTING", "FP-MARK-MASQ"] {
        assert!(!declared["nat"].declared.contains(&format!("{chain} - [0:0]")), "{chain} rewritten");
    }
    check("iptables-partial-v4.txt", &rendered.text);
}

/// A partial render of `after` over the full render of `before`, with every service port whose
/// plan differs (or that was added or removed) marked changed.
fn partial_after(before: &[ServicePlan], after: &[ServicePlan], split: Split) -> render::Rendered {
    let full = render::render(
        IpFamily::V4,
        before,
        &settings(),
        &Mode::Full { existing: &KernelChains::default() },
        Split::Never,
    );
    let changed = changed_names(before, after);
    let mode = Mode::Partial { changed: &changed, previous: &full.applied };
    render::render(IpFamily::V4, after, &settings(), &mode, split)
}

fn changed_names(before: &[ServicePlan], after: &[ServicePlan]) -> BTreeSet<ServicePortName> {
    // Plans of both families share a name.
    let of = |plans: &[ServicePlan], name: &ServicePortName| -> Vec<ServicePlan> {
        plans.iter().filter(|p| p.name == *name).cloned().collect()
    };
    before.iter().chain(after).map(|p| &p.name).filter(|n| of(before, n) != of(after, n)).cloned().collect()
}

/// An endpoint moves within a service (the number of endpoints stays): nothing but that service's
/// chains is written; no top-level chain is declared, so none is flushed.
#[test]
fn partial_sync_endpoint_change_leaves_top_level_chains_alone() {
    let before = plans();
    let mut after = before.clone();
    after[0].cluster_targets[2].ip = ip("10.244.3.9");
    after[0].external_targets[2].ip = ip("10.244.3.9");
    for split in [Split::Never, Split::Chains(2)] {
        let rendered = partial_after(&before, &after, split);
        let tables = commands(&rendered.text);
        assert!(!tables.contains_key("filter"), "{}", rendered.text);
        assert!(tables.contains_key("nat"), "{split:?}: {}", rendered.text);
        let fixed = [
            render::SERVICES,
            render::NODEPORTS,
            render::POSTROUTING,
            render::MARK_MASQ,
            render::MARK_MASQ_OFF_CLUSTER,
        ];
        for chain in fixed {
            assert!(!tables["nat"].declared.contains(&format!("{chain} - [0:0]")), "{}", rendered.text);
            assert!(!tables["nat"].rules.contains_key(chain), "{}", rendered.text);
        }
        if split == Split::Never {
            check("iptables-partial-endpoints-v4.txt", &rendered.text);
        }
    }

    // Nothing changed at all: nothing to send.
    let rendered = partial_after(&before, &before, Split::Never);
    assert_eq!(rendered.text, "");
    assert_eq!(rendered.lines, 0);
}

/// A service added: its dispatch rules (nat `FP-SERVICES` and `FP-NODEPORTS`) come with it, and
/// the filter table is left alone. A service losing its last endpoint: nat `FP-SERVICES` loses
/// its rule, filter `FP-SERVICES` gains the REJECT.
#[test]
fn partial_sync_service_added_or_emptied_rewrites_dispatch() {
    let before: Vec<ServicePlan> = plans().into_iter().take(3).collect();
    let mut added = before[0].clone();
    added.name = name("shop", "web2", "http", Protocol::Tcp);
    added.cluster_ips = vec![ip("10.96.0.11")];
    added.external_ips.clear();
    added.node_port = Some(30082);
    let mut after = before.clone();
    after.push(added);
    let rendered = partial_after(&before, &after, Split::Never);
    let tables = commands(&rendered.text);
    assert!(!tables.contains_key("filter"), "{}", rendered.text);
    let nat = &tables["nat"];
    let declared: BTreeSet<&str> = nat.declared.iter().filter_map(|d| d.split(' ').next()).collect();
    assert!(declared.is_superset(&[render::SERVICES, render::NODEPORTS].into()), "{}", rendered.text);
    assert!(!declared.contains(render::POSTROUTING), "{}", rendered.text);
    assert!(nat.rules[render::SERVICES].iter().any(|r| r.contains("shop/web2:http cluster IP")));

    let mut emptied = before.clone();
    emptied[0].cluster_targets.clear();
    emptied[0].external_targets.clear();
    let rendered = partial_after(&before, &emptied, Split::Never);
    let tables = commands(&rendered.text);
    assert_eq!(
        tables["filter"].declared,
        ["FP-SERVICES - [0:0]".to_owned(), "FP-EXTERNAL-SERVICES - [0:0]".to_owned()].into()
    );
    let declared: BTreeSet<&str> =
        tables["nat"].declared.iter().filter_map(|d| d.split(' ').next()).collect();
    assert!(declared.contains(render::SERVICES) && declared.contains(render::NODEPORTS), "{}", rendered.text);
}

/// Settings variants: several cluster CIDRs (masquerade through the off-cluster chain) and node
/// ports restricted to some addresses; then masquerade-all.
#[test]
fn settings_variants_ipv4() {
    let plans: Vec<ServicePlan> = plans().into_iter().take(3).collect();
    let mut settings = settings();
    settings.cluster_cidrs.push("10.245.0.0/16".parse().expect("cidr"));
    settings.node_port_addresses = vec!["192.168.1.0/24".parse().expect("cidr")];
    let rendered = render::render(
        IpFamily::V4,
        &plans,
        &settings,
        &Mode::Full { existing: &KernelChains::default() },
        Split::Never,
    );
    check("iptables-cidrs-nodeport-addresses-v4.txt", &rendered.text);

    settings.masquerade_all = true;
    let rendered = render::render(
        IpFamily::V4,
        &plans,
        &settings,
        &Mode::Full { existing: &KernelChains::default() },
        Split::Never,
    );
    assert!(!rendered.text.contains(render::MARK_MASQ_OFF_CLUSTER));
    check("iptables-masquerade-all-v4.txt", &rendered.text);
}

/// Per table: the rules of each chain in order, the declared and deleted chains, the jump rules
/// inserted; what a restore input does, whatever its transactions.
fn commands(text: &str) -> BTreeMap<String, Commands> {
    let mut tables: BTreeMap<String, Commands> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_owned();
            continue;
        }
        let t = tables.entry(table.clone()).or_default();
        if let Some(decl) = line.strip_prefix(':') {
            t.declared.insert(decl.to_owned());
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().expect("chain");
            t.rules.entry(chain.to_owned()).or_default().push(rule.to_owned());
        } else if let Some(chain) = line.strip_prefix("-X ") {
            t.deleted.insert(chain.to_owned());
        } else if line.starts_with("-I ") {
            t.inserted.push(line.to_owned());
        } else {
            assert_eq!(line, "COMMIT", "unexpected line");
        }
    }
    tables
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Commands {
    rules: BTreeMap<String, Vec<String>>,
    declared: BTreeSet<String>,
    deleted: BTreeSet<String>,
    inserted: Vec<String>,
}

/// The nf_tables layout ("Transactions" in the renderer): the fixed chains, the jump rules and the
/// first services; more blocks of whole services; the dispatch chains; then the stale chains,
/// flushed, then deleted. The same commands as one transaction, in other transactions.
#[test]
fn split_full_sync_ipv4() {
    let mut existing = KernelChains::default();
    existing.nat.extend(["FP-SVC-STALESTALESTALE1", "FP-SEP-STALESTALESTALE2"].map(String::from));
    let mode = Mode::Full { existing: &existing };
    let split = render::render(IpFamily::V4, &plans(), &settings(), &mode, Split::Chains(5));
    let single = render::render(IpFamily::V4, &plans(), &settings(), &mode, Split::Never);
    assert_eq!(split.lines, split.text.lines().count());
    assert_eq!(split.applied, single.applied);
    assert_eq!(commands(&split.text), commands(&single.text));
    assert_eq!(split.text.matches("*nat\n").count(), 7, "4 blocks, dispatch, flush, delete");
    check("iptables-split-v4.txt", &split.text);

    // Small enough for one block: one transaction, as without splitting.
    let whole = render::render(IpFamily::V4, &plans(), &settings(), &mode, Split::Chains(1000));
    assert_eq!(whole.text, single.text);
}

/// A partial sync splits the same way, and writes what one transaction would.
#[test]
fn split_partial_sync_ipv4() {
    let before = plans();
    let full = render::render(
        IpFamily::V4,
        &before,
        &settings(),
        &Mode::Full { existing: &KernelChains::default() },
        Split::Never,
    );
    let mut after = before.clone();
    after[0].cluster_targets.pop();
    after[0].external_targets.pop();
    after[1].cluster_targets.pop();
    let removed = after.remove(4).name;
    let changed: BTreeSet<ServicePortName> = [after[0].name.clone(), after[1].name.clone(), removed].into();
    let mode = Mode::Partial { changed: &changed, previous: &full.applied };
    let split = render::render(IpFamily::V4, &after, &settings(), &mode, Split::Chains(2));
    let single = render::render(IpFamily::V4, &after, &settings(), &mode, Split::Never);
    assert!(split.text.matches("COMMIT").count() > 3, "{}", split.text);
    assert_eq!(split.applied, single.applied);
    assert_eq!(commands(&split.text), commands(&single.text));
}

/// The tables as `iptables-restore --noflush` leaves them: per (table, chain), its rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Kernel(BTreeMap<(String, String), Vec<String>>);

impl Kernel {
    /// Applies restore input as the kernel would, checking what it would refuse: a rule into an
    /// undeclared chain of ours, a jump to a chain that does not exist at COMMIT, deleting a
    /// referenced chain.
    fn apply(&mut self, text: &str) {
        let mut table = String::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('*') {
                table = name.to_owned();
            } else if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split(' ').next().expect("chain");
                self.0.insert((table.clone(), chain.to_owned()), Vec::new());
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split(' ').next().expect("chain");
                let rules = self.0.get_mut(&(table.clone(), chain.to_owned()));
                rules.unwrap_or_else(|| panic!("-A into missing chain: {line}")).push(rule.to_owned());
            } else if let Some(rest) = line.strip_prefix("-I ") {
                let mut words = rest.splitn(3, ' ');
                let chain = words.next().expect("chain");
                let at: usize = words.next().and_then(|n| n.parse().ok()).expect("position");
                let spec = words.next().expect("spec");
                let rules = self.0.entry((table.clone(), chain.to_owned())).or_default();
                rules.insert(at - 1, format!("{chain} {spec}"));
            } else if let Some(chain) = line.strip_prefix("-X ") {
                let key = (table.clone(), chain.to_owned());
                assert_eq!(
                    self.0.get(&key).map(Vec::len),
                    Some(0),
                    "-X of a missing or non-empty chain: {chain}"
                );
                let target = format!(" -j {chain}");
                assert!(
                    !self
                        .0
                        .iter()
                        .any(|((t, _), rules)| *t == table && rules.iter().any(|r| r.ends_with(&target))),
                    "-X of a referenced chain: {chain}"
                );
                self.0.remove(&key);
            } else {
                assert_eq!(line, "COMMIT");
                for ((t, _), rules) in &self.0 {
                    for rule in rules.iter().filter(|_| *t == table) {
                        if let Some((_, target)) = rule.rsplit_once(" -j FP-") {
                            let target = format!("FP-{}", target.split(' ').next().expect("target"));
                            assert!(self.0.contains_key(&(table.clone(), target)), "dangling jump: {rule}");
                        }
                    }
                }
            }
        }
    }
}

/// A small, varied V4 service: `endpoints` picks from five pod addresses.
fn generated(index: usize, endpoints: u8, node_port: bool, local: bool, affinity: bool) -> ServicePlan {
    let targets: Vec<Target> = (0..5u8)
        .filter(|bit| endpoints & (1 << bit) != 0)
        .map(|bit| target(&format!("10.244.{bit}.{}", index + 2), 8080, bit % 2 == 0))
        .collect();
    let mut p = plan(
        name("gen", &format!("svc-{index}"), "p", Protocol::Tcp),
        IpFamily::V4,
        80,
        &format!("10.96.1.{index}"),
        targets.clone(),
    );
    if node_port {
        p.node_port = Some(31000 + u16::try_from(index).expect("index"));
    }
    if local {
        p.external_policy_local = true;
        p.external_targets = targets.into_iter().filter(|t| t.is_local).collect();
    }
    if affinity {
        p.session_affinity = Some(Duration::from_secs(30));
    }
    p
}

type Spec = Vec<Option<(u8, bool, bool, bool)>>;

fn plans_of(spec: &Spec) -> Vec<ServicePlan> {
    spec.iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|(eps, np, local, aff)| generated(i, eps, np, local, aff)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Partial syncs one after another leave the kernel, and the applied state, as one full sync
    /// of the last plans would: whatever the top-level chains they left out.
    #[test]
    fn partial_after_partial_equals_full(
        steps in prop::collection::vec(
            prop::collection::vec(
                prop::option::weighted(0.8, (0u8..32, any::<bool>(), prop::bool::weighted(0.2), prop::bool::weighted(0.2))),
                6,
            ),
            2..6,
        ),
        split in prop_oneof![Just(Split::Never), (1usize..6).prop_map(Split::Chains)],
    ) {
        let mut kernel = Kernel::default();
        let first = plans_of(&steps[0]);
        let full = render::render(IpFamily::V4, &first, &settings(), &Mode::Full { existing: &KernelChains::default() }, split);
        kernel.apply(&full.text);
        let (mut applied, mut previous) = (full.applied, first);
        for spec in &steps[1..] {
            let plans = plans_of(spec);
            let changed = changed_names(&previous, &plans);
            let partial = render::render(IpFamily::V4, &plans, &settings(), &Mode::Partial { changed: &changed, previous: &applied }, split);
            kernel.apply(&partial.text);

            let mut fresh = Kernel::default();
            let full = render::render(IpFamily::V4, &plans, &settings(), &Mode::Full { existing: &KernelChains::default() }, Split::Never);
            fresh.apply(&full.text);
            prop_assert_eq!(&kernel, &fresh);
            prop_assert_eq!(&partial.applied, &full.applied);
            (applied, previous) = (partial.applied, plans);
        }
    }
}
