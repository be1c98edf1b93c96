//! The pure IPVS renderer: service plans → the IPVS table, the addresses of our dummy interface and
//! the few iptables rules IPVS mode needs; and the diff from what the kernel holds to that state, as
//! a minimal list of netlink requests.
//!
//! # Virtual servers
//! One per (address, protocol, port): every cluster IP on the service port (real servers: the
//! cluster-traffic targets), every external and load-balancer IP on the service port and every node
//! address on the node port (real servers: the external-traffic targets). Real servers are NAT
//! (masq) forwarded with weight 1. sessionAffinity ClientIP sets `IP_VS_SVC_F_PERSISTENT` with the
//! affinity timeout. Cluster, external and load-balancer IPs are bound to the dummy interface
//! [`DUMMY_INTERFACE`] so that the node accepts their traffic; node addresses are already local.
//!
//! # Ownership
//! A virtual server is ours when its address is bound to our dummy interface, or when its address
//! is a node address and its (protocol, port) is a node port we program (or programmed: the
//! applier keeps that list across restarts). Firewall-mark services and anything inside
//! `excludedCIDRs` are never ours: the diff never updates or deletes them.
//!
//! # iptables rules
//! Plain rules, no ipsets: one `iptables-restore --noflush` per family rewrites our chains (prefix
//! [`CHAIN_PREFIX`], deliberately not the iptables mode's `FP-`, whose clean-up must not remove
//! them during a switch from iptables to IPVS). ipsets would make the rule count independent of the
//! number of services; with a rule per service address the payload is still one transaction.
//!
//! | table  | chain              | role                                                             |
//! |--------|--------------------|------------------------------------------------------------------|
//! | nat    | `FPVS-SERVICES`    | mark for masquerade: off-cluster sources to cluster IPs, external traffic with Cluster policy, node ports |
//! | nat    | `FPVS-MARK-MASQ`   | set the masquerade bit                                           |
//! | nat    | `FPVS-POSTROUTING` | masquerade hairpin traffic (an endpoint reaching itself) and marked packets |
//! | filter | `FPVS-FILTER`      | REJECT service addresses without endpoints, loadBalancerSourceRanges |

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use ipnet::IpNet;

use super::netlink::{
    Destination, IP_VS_SVC_F_HASHED, IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED1, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP, Request, Service, ServiceId, af_of, host_netmask,
};
use crate::{
    model::{IpFamily, Protocol, ServicePortName},
    policy::{NodeSettings, ServicePlan, Target},
};

/// The dummy interface the service addresses are bound to. Interface names have at most 15
/// characters (IFNAMSIZ 16 with the NUL), so not `fleetproxy-ipvs0`.
pub const DUMMY_INTERFACE: &str = "fleetproxy-ipvs";
/// Every iptables chain of IPVS mode starts with this.
pub const CHAIN_PREFIX: &str = "FPVS-";
pub const NAT_SERVICES: &str = "FPVS-SERVICES";
pub const NAT_MARK_MASQ: &str = "FPVS-MARK-MASQ";
pub const NAT_POSTROUTING: &str = "FPVS-POSTROUTING";
pub const FILTER: &str = "FPVS-FILTER";

/// The weight of every real server.
pub const WEIGHT: u32 = 1;

pub fn ip_protocol(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

/// One virtual server we want, with its real servers (sorted by address and port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// The service port it serves (partial syncs refresh the changed ones from the kernel).
    pub name: ServicePortName,
    pub service: Service,
    pub dests: Vec<Destination>,
}

/// The IPVS state of one node, as rendered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<ServiceId, DesiredService>,
    /// Addresses to bind to the dummy interface.
    pub bind: BTreeSet<IpAddr>,
    /// (protocol, node port) pairs served on node addresses.
    pub node_ports: BTreeSet<(u16, u16)>,
}

impl Desired {
    /// Virtual servers plus real servers: what `rule_count` reads back once this is applied.
    pub fn object_count(&self) -> usize {
        self.services.values().map(|s| 1 + s.dests.len()).sum()
    }
}

fn excluded(settings: &NodeSettings, ip: &IpAddr) -> bool {
    settings.excluded_cidrs.iter().any(|net| net.contains(ip))
}

/// The node addresses node ports are served on: `node_ips` narrowed by nodePortAddresses (empty:
/// all), never an excluded address, never loopback or link-local IPv6 (as kube-proxy).
pub fn node_port_ips(node_ips: &[IpAddr], settings: &NodeSettings) -> BTreeSet<IpAddr> {
    node_ips
        .iter()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .filter(|ip| {
            settings.node_port_addresses.is_empty()
                || settings.node_port_addresses.iter().any(|n| n.contains(*ip))
        })
        .filter(|ip| !excluded(settings, ip))
        .copied()
        .collect()
}

fn virtual_server(
    plan: &ServicePlan,
    addr: IpAddr,
    port: u16,
    scheduler: &str,
    targets: &[Target],
) -> DesiredService {
    let af = af_of(&addr);
    let (mut flags, timeout) = match plan.session_affinity {
        Some(timeout) => {
            (IP_VS_SVC_F_PERSISTENT, u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).max(1))
        }
        None => (0, 0),
    };
    // Hashing schedulers refuse a connection whose hashed real server is draining (weight 0)
    // unless told to fall back to another one.
    if scheduler == "sh" || scheduler == "mh" {
        flags |= IP_VS_SVC_F_SCHED1;
    }
    let mut dests: Vec<Destination> =
        targets.iter().map(|t| Destination::masq(t.ip, t.port, WEIGHT)).collect();
    dests.sort_by_key(|d| (d.addr, d.port));
    dests.dedup_by_key(|d| (d.addr, d.port));
    DesiredService {
        name: plan.name.clone(),
        service: Service {
            id: ServiceId::Addr { protocol: ip_protocol(plan.protocol), addr, port },
            scheduler: scheduler.to_owned(),
            flags,
            timeout,
            netmask: host_netmask(af),
        },
        dests,
    }
}

/// Renders the IPVS state of `plans` (both families). `node_ips` are the node's local addresses
/// (see [`node_port_ips`]); `scheduler` is the ProxyConfig's scheduler name.
pub fn render(
    plans: &[ServicePlan],
    settings: &NodeSettings,
    scheduler: &str,
    node_ips: &[IpAddr],
) -> Desired {
    let node_port_ips = node_port_ips(node_ips, settings);
    let mut desired = Desired::default();
    let add = |desired: &mut Desired, service: DesiredService| {
        desired.services.insert(service.service.id, service);
    };
    for plan in plans {
        for &ip in &plan.cluster_ips {
            desired.bind.insert(ip);
            add(&mut desired, virtual_server(plan, ip, plan.port, scheduler, &plan.cluster_targets));
        }
        for &ip in plan.external_ips.iter().chain(&plan.load_balancer_ips) {
            desired.bind.insert(ip);
            add(&mut desired, virtual_server(plan, ip, plan.port, scheduler, &plan.external_targets));
        }
        if let Some(node_port) = plan.node_port {
            desired.node_ports.insert((ip_protocol(plan.protocol), node_port));
            let family = plan.family;
            for &ip in node_port_ips.iter().filter(|ip| IpFamily::of(ip) == family) {
                add(&mut desired, virtual_server(plan, ip, node_port, scheduler, &plan.external_targets));
            }
        }
    }
    desired
}

/// What the kernel holds: every virtual server (ours or not) with its real servers.
pub type Current = BTreeMap<ServiceId, (Service, Vec<Destination>)>;

/// Decides which virtual servers of the kernel are ours (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Ownership {
    pub excluded: Vec<IpNet>,
    /// Addresses on our dummy interface.
    pub bound: BTreeSet<IpAddr>,
    /// Every local address of the node.
    pub node_ips: BTreeSet<IpAddr>,
    /// (protocol, port) node ports we program or programmed.
    pub node_ports: BTreeSet<(u16, u16)>,
}

impl Ownership {
    pub fn is_excluded(&self, ip: &IpAddr) -> bool {
        self.excluded.iter().any(|net| net.contains(ip))
    }

    pub fn owns(&self, id: &ServiceId) -> bool {
        match id {
            ServiceId::Fwmark { .. } => false,
            ServiceId::Addr { protocol, addr, port } => {
                !self.is_excluded(addr)
                    && (self.bound.contains(addr)
                        || (self.node_ips.contains(addr) && self.node_ports.contains(&(*protocol, *port))))
            }
        }
    }
}

/// What one sync does, in order: bind addresses, send the requests, unbind addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changeset {
    pub bind: Vec<IpAddr>,
    pub requests: Vec<Request>,
    pub unbind: Vec<IpAddr>,
}

impl Changeset {
    pub fn is_empty(&self) -> bool {
        self.bind.is_empty() && self.requests.is_empty() && self.unbind.is_empty()
    }
}

/// Whether two services differ in what we set (the kernel adds `IP_VS_SVC_F_HASHED`).
fn service_differs(want: &Service, have: &Service) -> bool {
    want.scheduler != have.scheduler
        || want.flags != (have.flags & !IP_VS_SVC_F_HASHED)
        || want.timeout != have.timeout
        || want.netmask != have.netmask
}

fn dest_differs(want: &Destination, have: &Destination) -> bool {
    want.weight != have.weight
        || want.fwd_method != have.fwd_method
        || want.upper_threshold != have.upper_threshold
        || want.lower_threshold != have.lower_threshold
}

/// The requests that bring `current` (what the kernel holds, as read back or as last applied) to
/// `desired`, touching only virtual servers that are ours and only what differs.
///
/// Real servers that are no longer wanted are removed gracefully, as kube-proxy's graceful
/// termination does: a TCP or SCTP real server that still has connections first gets weight 0 (no
/// new connections) and is deleted by a later sync once its connections are gone; UDP ones go at
/// once. Whole virtual servers that are no longer wanted are deleted at once.
pub fn diff(
    desired: &Desired,
    current: &Current,
    bound: &BTreeSet<IpAddr>,
    ownership: &Ownership,
) -> Changeset {
    let mut out = Changeset {
        bind: desired.bind.iter().filter(|ip| !bound.contains(ip)).copied().collect(),
        ..Changeset::default()
    };

    let mut deletes = Vec::new();
    for (id, want) in &desired.services {
        let ServiceId::Addr { protocol, .. } = id else { continue };
        let Some((have, have_dests)) = current.get(id) else {
            out.requests.push(Request::NewService(want.service.clone()));
            out.requests.extend(want.dests.iter().map(|d| Request::NewDest(*id, *d)));
            continue;
        };
        if service_differs(&want.service, have) {
            out.requests.push(Request::SetService(want.service.clone()));
        }
        let have_by_key: BTreeMap<(IpAddr, u16), &Destination> =
            have_dests.iter().map(|d| ((d.addr, d.port), d)).collect();
        let want_keys: BTreeSet<(IpAddr, u16)> = want.dests.iter().map(|d| (d.addr, d.port)).collect();
        for dest in &want.dests {
            match have_by_key.get(&(dest.addr, dest.port)) {
                None => out.requests.push(Request::NewDest(*id, *dest)),
                Some(have) if dest_differs(dest, have) => out.requests.push(Request::SetDest(*id, *dest)),
                Some(_) => {}
            }
        }
        for have in have_dests.iter().filter(|d| !want_keys.contains(&(d.addr, d.port))) {
            let connections = have.active_conns + have.inactive_conns;
            if *protocol == IPPROTO_UDP || connections == 0 {
                deletes.push(Request::DelDest(*id, have.addr, have.port));
            } else if have.weight != 0 {
                out.requests.push(Request::SetDest(*id, Destination { weight: 0, ..*have }));
            }
        }
    }
    out.requests.extend(deletes);
    for id in current.keys() {
        if !desired.services.contains_key(id) && ownership.owns(id) {
            out.requests.push(Request::DelService(*id));
        }
    }
    out.unbind =
        bound.iter().filter(|ip| !desired.bind.contains(ip) && !ownership.is_excluded(ip)).copied().collect();
    out
}

/// `current` as it will be once `desired` is applied, for partial syncs that trust the last sync
/// instead of reading the whole kernel: every desired service with its desired real servers. The
/// applier refreshes the changed services' real servers from the kernel on top of it, so that
/// draining real servers and their connection counts are seen.
pub fn as_current(desired: &Desired) -> Current {
    desired.services.iter().map(|(id, s)| (*id, (s.service.clone(), s.dests.clone()))).collect()
}

/// A jump from a builtin chain into one of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub chain: &'static str,
    pub spec: &'static str,
}

/// Our jump rules, as `iptables-save` prints them after `-A <chain> `.
pub const JUMPS: [Jump; 6] = [
    Jump {
        table: "nat",
        chain: "PREROUTING",
        spec: "-m comment --comment \"fleetproxy ipvs service portals\" -j FPVS-SERVICES",
    },
    Jump {
        table: "nat",
        chain: "OUTPUT",
        spec: "-m comment --comment \"fleetproxy ipvs service portals\" -j FPVS-SERVICES",
    },
    Jump {
        table: "nat",
        chain: "POSTROUTING",
        spec: "-m comment --comment \"fleetproxy ipvs postrouting rules\" -j FPVS-POSTROUTING",
    },
    Jump {
        table: "filter",
        chain: "INPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"fleetproxy ipvs filter\" -j FPVS-FILTER",
    },
    Jump {
        table: "filter",
        chain: "FORWARD",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"fleetproxy ipvs filter\" -j FPVS-FILTER",
    },
    Jump {
        table: "filter",
        chain: "OUTPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"fleetproxy ipvs filter\" -j FPVS-FILTER",
    },
];

fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

fn comment(plan: &ServicePlan) -> String {
    format!("-m comment --comment \"{}\"", plan.name)
}

/// `iptables-restore --noflush` input for one family: rewrites our chains and inserts the jump
/// rules in `missing_jumps` (those of [`JUMPS`] the kernel does not have).
pub fn render_iptables(
    family: IpFamily,
    plans: &[ServicePlan],
    settings: &NodeSettings,
    missing_jumps: &[Jump],
) -> String {
    let mark = format!("{:#x}", 1u32 << u32::from(settings.masquerade_bit.min(31)));
    let cluster_cidrs: Vec<&IpNet> =
        settings.cluster_cidrs.iter().filter(|n| IpFamily::of_net(n) == family).collect();
    let plans: Vec<&ServicePlan> = plans.iter().filter(|p| p.family == family).collect();

    let mut nat = String::new();
    let mut post = String::new();
    let mut filter = String::new();
    for plan in &plans {
        let proto = plan.protocol.as_str();
        let c = comment(plan);
        let dport = |ip: &IpAddr, port: u16| format!("-d {} -p {proto} -m {proto} --dport {port}", host(ip));
        for ip in &plan.cluster_ips {
            if settings.masquerade_all {
                let _ = writeln!(nat, "-A {NAT_SERVICES} {c} {} -j {NAT_MARK_MASQ}", dport(ip, plan.port));
            } else {
                for cidr in &cluster_cidrs {
                    let _ = writeln!(
                        nat,
                        "-A {NAT_SERVICES} {c} ! -s {cidr} {} -j {NAT_MARK_MASQ}",
                        dport(ip, plan.port)
                    );
                }
            }
            if plan.cluster_targets.is_empty() {
                let _ = writeln!(filter, "-A {FILTER} {c} {} -j REJECT", dport(ip, plan.port));
            }
        }
        for ip in plan.external_ips.iter().chain(&plan.load_balancer_ips) {
            if !plan.external_policy_local || settings.masquerade_all {
                let _ = writeln!(nat, "-A {NAT_SERVICES} {c} {} -j {NAT_MARK_MASQ}", dport(ip, plan.port));
            }
            if plan.external_targets.is_empty() {
                let _ = writeln!(filter, "-A {FILTER} {c} {} -j REJECT", dport(ip, plan.port));
            }
        }
        if !plan.external_targets.is_empty() && !plan.load_balancer_source_ranges.is_empty() {
            for ip in &plan.load_balancer_ips {
                for range in &plan.load_balancer_source_ranges {
                    let _ = writeln!(filter, "-A {FILTER} {c} -s {range} {} -j RETURN", dport(ip, plan.port));
                }
                let _ = writeln!(filter, "-A {FILTER} {c} {} -j DROP", dport(ip, plan.port));
            }
        }
        if let Some(node_port) = plan.node_port {
            let local = format!("-m addrtype --dst-type LOCAL -p {proto} -m {proto} --dport {node_port}");
            if !plan.external_policy_local || settings.masquerade_all {
                let _ = writeln!(nat, "-A {NAT_SERVICES} {c} {local} -j {NAT_MARK_MASQ}");
            }
            if plan.external_targets.is_empty() {
                let _ = writeln!(filter, "-A {FILTER} {c} {local} -j REJECT");
            }
        }
        // Hairpin: an endpoint on this node that reaches itself through the service must see the
        // reply come from the node, not from itself.
        for target in plan.all_targets().iter().filter(|t| t.is_local) {
            let _ = writeln!(
                post,
                "-A {NAT_POSTROUTING} {c} -s {} -d {} -p {proto} -m {proto} --dport {} -j MASQUERADE",
                host(&target.ip),
                host(&target.ip),
                target.port
            );
        }
    }

    let mut out = String::new();
    out.push_str("*filter\n");
    let _ = writeln!(out, ":{FILTER} - [0:0]");
    out.push_str(&filter);
    for jump in missing_jumps.iter().filter(|j| j.table == "filter") {
        let _ = writeln!(out, "-I {} 1 {}", jump.chain, jump.spec);
    }
    out.push_str("COMMIT\n*nat\n");
    for chain in [NAT_SERVICES, NAT_MARK_MASQ, NAT_POSTROUTING] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(&nat);
    let _ = writeln!(out, "-A {NAT_MARK_MASQ} -j MARK --or-mark {mark}");
    out.push_str(&post);
    let _ = writeln!(out, "-A {NAT_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN");
    let _ = writeln!(out, "-A {NAT_POSTROUTING} -j MARK --xor-mark {mark}");
    let _ = writeln!(
        out,
        "-A {NAT_POSTROUTING} -m comment --comment \"fleetproxy ipvs masquerade\" -j MASQUERADE"
    );
    for jump in missing_jumps.iter().filter(|j| j.table == "nat") {
        let _ = writeln!(out, "-I {} 1 {}", jump.chain, jump.spec);
    }
    out.push_str("COMMIT\n");
    out
}

/// What one family's `iptables-save` holds of IPVS mode's: chains, rules in them, jump rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedRules {
    /// (table, chain)
    pub chains: BTreeSet<(String, String)>,
    pub rules: u64,
    /// (table, saved rule without `-A `) of builtin chains jumping into ours.
    pub jumps: Vec<(String, String)>,
}

impl SavedRules {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }

    /// Which of [`JUMPS`] are missing.
    pub fn missing_jumps(&self) -> Vec<Jump> {
        JUMPS
            .iter()
            .filter(|j| {
                !self.jumps.iter().any(|(t, rule)| t == j.table && *rule == format!("{} {}", j.chain, j.spec))
            })
            .copied()
            .collect()
    }
}

/// Parses `iptables-save` output (every table).
pub fn parse_saved(dump: &str) -> SavedRules {
    let mut out = SavedRules::default();
    let mut table = String::new();
    for line in dump.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.trim().to_owned();
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next().filter(|c| c.starts_with(CHAIN_PREFIX)) {
                out.chains.insert((table.clone(), chain.to_owned()));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if chain.starts_with(CHAIN_PREFIX) {
                out.rules += 1;
            } else {
                let mut words = rule.split_whitespace();
                let jumps_to_ours = std::iter::from_fn(|| words.next())
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(CHAIN_PREFIX));
                if jumps_to_ours {
                    out.jumps.push((table.clone(), rule.to_owned()));
                }
            }
        }
    }
    out
}

/// `iptables-restore --noflush` input removing everything in `saved`; `None` if nothing is there.
pub fn cleanup_iptables(saved: &SavedRules) -> Option<String> {
    if saved.is_empty() {
        return None;
    }
    let mut out = String::new();
    for table in ["filter", "nat"] {
        let chains: Vec<&String> = saved.chains.iter().filter(|(t, _)| t == table).map(|(_, c)| c).collect();
        let jumps: Vec<&String> = saved.jumps.iter().filter(|(t, _)| t == table).map(|(_, r)| r).collect();
        if chains.is_empty() && jumps.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for chain in &chains {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for jump in &jumps {
            let _ = writeln!(out, "-D {jump}");
        }
        for chain in &chains {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }
    Some(out)
}

#[cfg(test)]
mod tests;
