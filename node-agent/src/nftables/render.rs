//! The pure renderer: service plans + node settings → an `nft -f` script.
//!
//! Layout of each family's table (`table ip fleetproxy`, `table ip6 fleetproxy`), after kube-proxy's
//! nftables proxier:
//!
//! - base chains `nat-prerouting`/`nat-output` (priority dstnat) → `services`, `nat-postrouting`
//!   (srcnat) → `masquerading`; `filter-prerouting`/`-input`/`-forward`/`-output` (priority -110,
//!   before DNAT on output) for the checks that must drop or reject, which nat chains cannot;
//! - `services` classifies new connections with two verdict maps: `service-ips`
//!   (`address . protocol . port` of cluster, external and load-balancer IPs) and `service-nodeports`
//!   (`protocol . port`, on local addresses only);
//! - per service port: a `service-…` chain (cluster traffic) and an `external-…` chain (node port,
//!   external and load-balancer traffic, with externalTrafficPolicy applied) that DNAT themselves
//!   (see [`balance`]), and a `firewall-…` chain for loadBalancerSourceRanges. Only
//!   sessionAffinity ClientIP needs a chain per endpoint (`endpoint-…`, picked by
//!   `numgen random mod N vmap`) with an `affinity-…` set of its clients. Without per-endpoint
//!   chains and without per-service sets a full sync is one table, a few maps and
//!   chains of plain rules, and an endpoint change rewrites one chain;
//! - hairpin traffic (a pod reaching itself through its service) is masqueraded in `masquerading`,
//!   after DNAT, by the `hairpin-connections` set of `endpoint . endpoint . protocol . port`, which
//!   holds the local endpoints only: only a pod on this node can hairpin here;
//! - `no-endpoint-services`/`no-endpoint-nodeports` map destinations without endpoints to
//!   `reject-chain` (TCP reset, ICMP port unreachable) or `drop` (Local policy, endpoints elsewhere);
//! - the `excluded-cidrs` set is checked first: those destinations are never intercepted.
//!
//! A full sync rewrites the whole table in one transaction without ever deleting it (so traffic
//! never meets an empty table and affinity sets keep their clients): `flush table`, redeclare
//! everything, then delete objects that are no longer wanted. A partial sync compares the changed
//! service ports' objects with what the last sync rendered and sends only the difference.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Display},
    net::IpAddr,
};

use ipnet::IpNet;

use super::names;
use crate::{
    model::{IpFamily, ServicePortName},
    policy::{NodeSettings, ServicePlan, Target},
};

/// The name of our main table in both families; the service ports live in [`SHARDS`] more tables,
/// `fleetproxy-services-N`.
pub const TABLE: &str = "fleetproxy";
const SHARD_PREFIX: &str = "fleetproxy-services-";

/// How many tables the service ports' chains and verdict maps are spread over. Every transaction
/// that adds a NAT or jump rule makes the kernel re-check every chain reachable from the table's
/// base chains: at 10,000 service ports in one table that is ~110 ms, for a one-endpoint change.
/// Spread over 8 tables it is an eighth. A table's nat chain that DNATs a connection ends the
/// nat hook for it (the kernel skips later nat chains once the mapping is set), so the tables do
/// not interfere; a connection that no table claims costs one lookup per table, on its first
/// packet only.
pub const SHARDS: u8 = 8;

/// One of our tables: the main one of a family (filter checks, masquerading, the maps of refused
/// destinations and firewalls) or one of its service shards (nat dispatch, service chains).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Table {
    pub family: IpFamily,
    pub shard: Option<u8>,
}

impl Table {
    pub fn main(family: IpFamily) -> Self {
        Self { family, shard: None }
    }

    pub fn shard(family: IpFamily, shard: u8) -> Self {
        Self { family, shard: Some(shard) }
    }

    /// Every table we keep, main table first, in both families.
    pub fn all() -> impl Iterator<Item = Table> {
        Family::BOTH.into_iter().flat_map(|f| {
            std::iter::once(Self::main(f.0)).chain((0..SHARDS).map(move |s| Self::shard(f.0, s)))
        })
    }

    /// The table's name (without the family).
    pub fn name(self) -> String {
        match self.shard {
            None => TABLE.to_owned(),
            Some(shard) => format!("{SHARD_PREFIX}{shard}"),
        }
    }

    /// `ip` or `ip6`.
    pub fn family_kw(self) -> &'static str {
        Family(self.family).kw()
    }

    /// Our table named `name` in the family `ip`/`ip6`, if it is one of ours (of any shard
    /// count: a table of a shard no longer kept is still ours to delete).
    pub fn parse(family: &str, name: &str) -> Option<Self> {
        let family = match family {
            "ip" => IpFamily::V4,
            "ip6" => IpFamily::V6,
            _ => return None,
        };
        if name == TABLE {
            return Some(Self::main(family));
        }
        let shard = name.strip_prefix(SHARD_PREFIX)?;
        // `0`, `7`, `12`: no sign, no leading zeros, so that one table has one name.
        if shard.starts_with('+') || (shard.len() > 1 && shard.starts_with('0')) {
            return None;
        }
        shard.parse().ok().map(|s| Self::shard(family, s))
    }

    /// Whether we keep this table (not a shard beyond [`SHARDS`]).
    fn is_kept(self) -> bool {
        self.shard.is_none_or(|s| s < SHARDS)
    }

    /// The sets the table has, besides the affinity sets of its service ports.
    fn sets(self) -> &'static [&'static str] {
        match self.shard {
            None => &[EXCLUDED, HAIRPIN],
            Some(_) => &[EXCLUDED],
        }
    }

    /// The verdict maps the table has.
    fn maps(self) -> impl Iterator<Item = VerdictMap> {
        VerdictMap::ALL.into_iter().filter(move |m| m.in_shard() == self.shard.is_some())
    }

    /// Our sets and maps in this table whose elements are rules (not clients, as in the affinity
    /// sets).
    pub fn static_sets(self) -> impl Iterator<Item = &'static str> {
        self.sets().iter().copied().chain(self.maps().map(VerdictMap::name))
    }

    fn syntax(self) -> Family {
        Family(self.family)
    }
}

impl Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family_kw(), self.name())
    }
}

const SERVICES: &str = "services";
const MASQUERADING: &str = "masquerading";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
const REJECT: &str = "reject-chain";
const FIREWALL_CHECK: &str = "firewall-check";
const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
const EXCLUDED: &str = "excluded-cidrs";
const HAIRPIN: &str = "hairpin-connections";

/// Priority of the filter base chains: before the nat chains (dstnat, -100), so that the output
/// hook still sees the service address, and before iptables' filter table.
const FILTER_PRIORITY: i32 = -110;

/// The verdict maps every family's table has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VerdictMap {
    /// `address . protocol . port` → the service or external chain.
    ServiceIps,
    /// `protocol . port` → the external chain.
    ServiceNodeports,
    /// `address . protocol . port` → reject or drop, for destinations without endpoints.
    NoEndpointServices,
    /// `protocol . port` → reject or drop, for node ports without endpoints.
    NoEndpointNodeports,
    /// load-balancer `address . protocol . port` → the firewall chain.
    FirewallIps,
}

impl VerdictMap {
    pub const ALL: [Self; 5] = [
        Self::ServiceIps,
        Self::ServiceNodeports,
        Self::NoEndpointServices,
        Self::NoEndpointNodeports,
        Self::FirewallIps,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ServiceIps => "service-ips",
            Self::ServiceNodeports => "service-nodeports",
            Self::NoEndpointServices => "no-endpoint-services",
            Self::NoEndpointNodeports => "no-endpoint-nodeports",
            Self::FirewallIps => "firewall-ips",
        }
    }

    /// Whether the map lives in the service shards (nat dispatch) or in the main table.
    fn in_shard(self) -> bool {
        matches!(self, Self::ServiceIps | Self::ServiceNodeports)
    }

    fn key_type(self, family: Family) -> String {
        match self {
            Self::ServiceNodeports | Self::NoEndpointNodeports => "inet_proto . inet_service".to_owned(),
            _ => format!("{} . inet_proto . inet_service", family.addr_type()),
        }
    }
}

/// Family-specific syntax. In nft the table family and the payload keyword are the same word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Family(IpFamily);

impl Family {
    const BOTH: [Family; 2] = [Family(IpFamily::V4), Family(IpFamily::V6)];

    /// `ip` or `ip6`: the table family and the address match keyword (`ip saddr`).
    fn kw(self) -> &'static str {
        match self.0 {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }

    fn addr_type(self) -> &'static str {
        match self.0 {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        }
    }

    /// The `hairpin-connections` set's element type.
    fn hairpin_type(self) -> String {
        let addr = self.addr_type();
        format!("{addr} . {addr} . inet_proto . inet_service")
    }

    fn loopback(self) -> &'static str {
        match self.0 {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1",
        }
    }

    /// `10.0.0.1:80` or `[fd00::1]:80`, for `dnat to`.
    fn socket(self, ip: IpAddr, port: u16) -> String {
        match ip {
            IpAddr::V4(ip) => format!("{ip}:{port}"),
            IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        }
    }

    /// The networks of `nets` in this family, host bits cleared.
    fn nets(self, nets: &[IpNet]) -> Vec<IpNet> {
        nets.iter().filter(|n| IpFamily::of_net(n) == self.0).map(IpNet::trunc).collect()
    }
}

/// `{ a, b }`: an anonymous set literal.
fn set_literal<T: Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The firewall mark that asks the masquerading chain to SNAT a packet.
fn masquerade_mark(settings: &NodeSettings) -> u32 {
    1u32 << (settings.masquerade_bit & 31)
}

/// One chain's rules, in order, and their digest. What a sync applied keeps the digest only
/// ([`RenderedState`]): the next partial sync compares digests, and 10,000 services' rule texts
/// would cost the agent ~20 MiB for nothing.
#[derive(Clone, Debug, Default)]
pub struct ChainRules {
    pub rules: Vec<String>,
    digest: u64,
}

impl ChainRules {
    fn new(rules: Vec<String>) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        rules.hash(&mut hasher);
        Self { digest: hasher.finish(), rules }
    }

    /// Drops the text, keeping the digest.
    fn forget_text(&mut self) {
        self.rules = Vec::new();
    }
}

impl PartialEq for ChainRules {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for ChainRules {}

/// What one service port in one family contributes to that family's tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// The service shard that holds its chains, sets and nat dispatch elements.
    pub shard: u8,
    /// Chains in the shard by name, each with its rules in order.
    pub chains: BTreeMap<String, ChainRules>,
    /// The firewall chain (loadBalancerSourceRanges), in the main table: the filter hooks need it.
    pub firewall: BTreeMap<String, ChainRules>,
    /// Affinity sets by name, with their declaration (`{ type ...; flags ...; timeout ...; }`).
    pub sets: BTreeMap<String, String>,
    /// Verdict-map elements: (map, key) → verdict. The map says which table ([`VerdictMap::in_shard`]).
    pub elements: BTreeMap<(VerdictMap, String), String>,
    /// Elements of the main table's `hairpin-connections` set (shared: two service ports may want
    /// the same one).
    pub hairpin: BTreeSet<String>,
}

impl ServiceRules {
    fn shard_table(&self, family: IpFamily) -> Table {
        Table::shard(family, self.shard)
    }

    /// The table a map's elements of this service port go to.
    fn map_table(&self, family: IpFamily, map: VerdictMap) -> Table {
        if map.in_shard() { self.shard_table(family) } else { Table::main(family) }
    }

    /// Every chain with the table it lives in.
    fn all_chains(&self, family: IpFamily) -> impl Iterator<Item = (Table, &String, &ChainRules)> {
        let shard = self.shard_table(family);
        let main = Table::main(family);
        self.chains
            .iter()
            .map(move |(n, r)| (shard, n, r))
            .chain(self.firewall.iter().map(move |(n, r)| (main, n, r)))
    }
}

/// The names of our objects in one table: what a full sync must delete if it no longer wants
/// them. Read from the kernel, or known from the last sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableObjects {
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
    pub maps: BTreeSet<String>,
}

static NO_OBJECTS: TableObjects =
    TableObjects { chains: BTreeSet::new(), sets: BTreeSet::new(), maps: BTreeSet::new() };

/// Our tables and their objects, in both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelObjects {
    pub tables: BTreeMap<Table, TableObjects>,
}

impl KernelObjects {
    /// The table's objects; none if the table does not exist.
    pub fn get(&self, table: Table) -> &TableObjects {
        self.tables.get(&table).unwrap_or(&NO_OBJECTS)
    }

    pub fn table_mut(&mut self, table: Table) -> &mut TableObjects {
        self.tables.entry(table).or_default()
    }
}

/// What a sync rendered: once applied, what the kernel holds, and the base of the next partial sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenderedState {
    pub settings: NodeSettings,
    pub services: BTreeMap<(IpFamily, ServicePortName), ServiceRules>,
}

impl RenderedState {
    /// Every object this state has, per table.
    pub fn objects(&self) -> KernelObjects {
        let mut objects = KernelObjects::default();
        for table in Table::all() {
            let objects = objects.table_mut(table);
            objects
                .chains
                .extend(static_chains(table, &self.settings).into_iter().map(|c| c.name.to_owned()));
            objects.sets.extend(table.sets().iter().map(|s| (*s).to_owned()));
            objects.maps.extend(table.maps().map(|m| m.name().to_owned()));
        }
        for ((family, _), rules) in &self.services {
            for (table, name, _) in rules.all_chains(*family) {
                objects.table_mut(table).chains.insert(name.clone());
            }
            objects.table_mut(rules.shard_table(*family)).sets.extend(rules.sets.keys().cloned());
        }
        objects
    }
}

/// An `nft -f` script and the state it leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendering {
    pub script: String,
    /// Lines in the script (the payload size reported in sync stats).
    pub lines: usize,
    /// Where the script may be cut into separate transactions: (byte offset, lines before it), in
    /// order. Empty: one transaction.
    pub cuts: Vec<(usize, usize)>,
    pub state: RenderedState,
    pub full: bool,
}

impl Rendering {
    /// The script as transactions of about `max_lines` lines each: consecutive pieces between cuts
    /// are joined while they stay within the limit (a piece longer than it stays whole).
    pub fn transactions(&self, max_lines: usize) -> Vec<&str> {
        let text = self.script.as_str();
        let mut out = Vec::new();
        let mut start = (0, 0);
        let mut last = (0, 0);
        for &(at, lines) in self.cuts.iter().chain([(text.len(), self.lines)].iter()) {
            if at <= start.0 {
                continue;
            }
            if lines - start.1 > max_lines && last.0 > start.0 {
                out.push(&text[start.0..last.0]);
                start = last;
            }
            last = (at, lines);
        }
        if start.0 < text.len() {
            out.push(&text[start.0..]);
        }
        out
    }

    /// Whether there is nothing to send to the kernel.
    pub fn is_empty(&self) -> bool {
        self.script.is_empty()
    }
}

/// A script being written, one command per line (multi-line element lists count their lines).
#[derive(Default)]
struct Script {
    text: String,
    lines: usize,
    cuts: Vec<(usize, usize)>,
}

impl Script {
    /// The end of a transaction of its own (after which the table works).
    fn cut(&mut self) {
        if self.cuts.last().is_none_or(|(at, _)| *at < self.text.len()) {
            self.cuts.push((self.text.len(), self.lines));
        }
    }

    fn line(&mut self, line: impl Display) {
        use fmt::Write as _;
        // Writing to a String cannot fail.
        let _ = writeln!(self.text, "{line}");
        self.lines += 1;
    }

    /// `add element` or `delete element` with one element per line, or nothing for no elements.
    fn elements(&mut self, verb: &str, table: Table, map: VerdictMap, elements: &[String]) {
        self.set_elements(verb, table, map.name(), elements);
    }

    /// The same for any set or map by name.
    fn set_elements<T: Display>(
        &mut self,
        verb: &str,
        table: Table,
        set: &str,
        elements: impl IntoIterator<Item = T>,
    ) {
        let mut elements = elements.into_iter().peekable();
        if elements.peek().is_none() {
            return;
        }
        self.line(format_args!("{verb} element {table} {set} {{"));
        for element in elements {
            self.line(format_args!("\t{element},"));
        }
        self.line("}");
    }
}

/// One of the chains every table has.
struct StaticChain {
    name: &'static str,
    /// `type ... hook ... priority ...;` for base chains.
    hook: Option<String>,
    rules: Vec<String>,
}

/// The chains `table` always has, with their rules, for these settings.
fn static_chains(table: Table, settings: &NodeSettings) -> Vec<StaticChain> {
    let family = table.syntax();
    let ip = family.kw();
    let mark = masquerade_mark(settings);
    let base = |name, kind: &str, hook: &str, priority: String, rules: Vec<String>| StaticChain {
        name,
        hook: Some(format!("type {kind} hook {hook} priority {priority}; policy accept;")),
        rules,
    };
    let chain = |name, rules: Vec<String>| StaticChain { name, hook: None, rules };
    let new = |target: &str| format!("ct state new jump {target}");
    let not_excluded = format!("{ip} daddr @{EXCLUDED} return");

    // Node ports are served on local addresses: all but loopback, or those in nodePortAddresses.
    let node_port_match = if settings.node_port_addresses.is_empty() {
        Some(format!("fib daddr type local {ip} daddr != {}", family.loopback()))
    } else {
        let nets = family.nets(&settings.node_port_addresses);
        (!nets.is_empty()).then(|| format!("{ip} daddr {} fib daddr type local", set_literal(&nets)))
    };
    let lookup = |map: VerdictMap| format!("{ip} daddr . meta l4proto . th dport vmap @{}", map.name());
    let port_lookup = |map: VerdictMap| {
        node_port_match.as_ref().map(|m| format!("{m} meta l4proto . th dport vmap @{}", map.name()))
    };

    if table.shard.is_some() {
        return vec![
            base("nat-prerouting", "nat", "prerouting", "dstnat".into(), vec![format!("jump {SERVICES}")]),
            // nft 1.0.6 knows `dstnat` for prerouting only; -100 is the same priority.
            base("nat-output", "nat", "output", "-100".into(), vec![format!("jump {SERVICES}")]),
            chain(
                SERVICES,
                [
                    Some(not_excluded),
                    Some(lookup(VerdictMap::ServiceIps)),
                    port_lookup(VerdictMap::ServiceNodeports),
                ]
                .into_iter()
                .flatten()
                .collect(),
            ),
            chain(MARK_FOR_MASQUERADE, vec![format!("meta mark set meta mark | {mark:#x}")]),
        ];
    }
    let filter = FILTER_PRIORITY.to_string();
    vec![
        base("filter-prerouting", "filter", "prerouting", filter.clone(), vec![new(FIREWALL_CHECK)]),
        base(
            "filter-input",
            "filter",
            "input",
            filter.clone(),
            vec![new(NODEPORT_ENDPOINTS_CHECK), new(SERVICE_ENDPOINTS_CHECK)],
        ),
        base("filter-forward", "filter", "forward", filter.clone(), vec![new(SERVICE_ENDPOINTS_CHECK)]),
        base(
            "filter-output",
            "filter",
            "output",
            filter,
            vec![new(SERVICE_ENDPOINTS_CHECK), new(FIREWALL_CHECK)],
        ),
        base("nat-postrouting", "nat", "postrouting", "srcnat".into(), vec![format!("jump {MASQUERADING}")]),
        chain(
            MASQUERADING,
            vec![
                format!(
                    "ct status dnat {ip} saddr . {ip} daddr . meta l4proto . th dport @{HAIRPIN} masquerade fully-random"
                ),
                format!("meta mark & {mark:#x} == 0 return"),
                format!("meta mark set meta mark ^ {mark:#x}"),
                "masquerade fully-random".into(),
            ],
        ),
        chain(REJECT, vec!["meta l4proto tcp reject with tcp reset".into(), "reject".into()]),
        chain(FIREWALL_CHECK, vec![not_excluded.clone(), lookup(VerdictMap::FirewallIps)]),
        chain(SERVICE_ENDPOINTS_CHECK, vec![not_excluded.clone(), lookup(VerdictMap::NoEndpointServices)]),
        chain(
            NODEPORT_ENDPOINTS_CHECK,
            [Some(not_excluded), port_lookup(VerdictMap::NoEndpointNodeports)]
                .into_iter()
                .flatten()
                .collect(),
        ),
    ]
}

/// Above this many endpoints a service port DNATs through one anonymous map instead of a cascade.
const CASCADE_MAX_ENDPOINTS: usize = 32;

/// The rules that pick one of `targets` and DNAT to it. Without affinity, up to
/// [`CASCADE_MAX_ENDPOINTS`]: a cascade like iptables' `statistic` rules, rule `i` of `n` taking the
/// connection with probability `1/(n-i)` (uniform in all), each rule DNATing itself. No set at all:
/// this kernel (6.18) makes every anonymous set of a table scan all the table's sets for a free
/// `__map%d` name, and binding a rule to a shared map walk the map's elements, so kube-proxy's
/// `numgen random mod n map { ... }` for every service costs O(services²) to load: 62 s for 10,000
/// services × 10 against 3.5 s for the cascade (docs/benchmarks.md). Larger services are few, and
/// for them one rule with a map beats thousands of rules (a change of a 10,000-endpoint service
/// rewrites one rule, not 10,000).
/// With affinity: a client pinned to an endpoint goes back to its chain, others are spread at
/// random over the endpoint chains (which record the client).
fn balance(plan: &ServicePlan, family: Family, targets: &[Target]) -> Vec<String> {
    let mut targets = targets.to_vec();
    targets.sort();
    let Some(timeout) = plan.session_affinity else {
        let proto = plan.protocol.as_str();
        let n = targets.len();
        if n > CASCADE_MAX_ENDPOINTS {
            let arms: Vec<String> =
                targets.iter().enumerate().map(|(i, t)| format!("{i} : {} . {}", t.ip, t.port)).collect();
            return vec![format!(
                "meta l4proto {proto} dnat {} to numgen random mod {n} map {}",
                family.kw(),
                set_literal(&arms)
            )];
        }
        return targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let dnat = format!("meta l4proto {proto} dnat to {}", family.socket(t.ip, t.port));
                match n - i {
                    1 => dnat,
                    left => format!("numgen random mod {left} 0 {dnat}"),
                }
            })
            .collect();
    };
    let mut rules: Vec<String> = targets
        .iter()
        .map(|t| {
            format!(
                "{} saddr @{} goto {}",
                family.kw(),
                names::affinity_set(plan, t.ip, t.port, timeout),
                names::endpoint_chain(plan, t.ip, t.port)
            )
        })
        .collect();
    match targets.as_slice() {
        [] => {}
        [only] => rules.push(format!("goto {}", names::endpoint_chain(plan, only.ip, only.port))),
        many => {
            let arms: Vec<String> = many
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{i} : goto {}", names::endpoint_chain(plan, t.ip, t.port)))
                .collect();
            rules.push(format!("numgen random mod {} vmap {}", many.len(), set_literal(&arms)));
        }
    }
    rules
}

/// Everything one service port contributes to its family's table.
pub fn render_service(plan: &ServicePlan, settings: &NodeSettings) -> ServiceRules {
    let family = Family(plan.family);
    let ip = family.kw();
    let proto = plan.protocol.as_str();
    let cluster_cidrs = family.nets(&settings.cluster_cidrs);
    let mut out = ServiceRules { shard: names::shard(&plan.name, SHARDS), ..ServiceRules::default() };

    let targets = plan.all_targets();
    out.hairpin = targets
        .iter()
        .filter(|t| t.is_local)
        .map(|t| format!("{} . {} . {proto} . {}", t.ip, t.ip, t.port))
        .collect();
    // Affinity only: one chain per endpoint (shared by cluster and external traffic) that records
    // the client in the endpoint's set.
    if let Some(timeout) = plan.session_affinity {
        for t in &targets {
            let set = names::affinity_set(plan, t.ip, t.port, timeout);
            out.sets.insert(
                set.clone(),
                format!(
                    "{{ type {}; flags dynamic,timeout; timeout {}s; }}",
                    family.addr_type(),
                    timeout.as_secs().max(1)
                ),
            );
            let rules = vec![
                format!("update @{set} {{ {ip} saddr }}"),
                format!("meta l4proto {proto} dnat to {}", family.socket(t.ip, t.port)),
            ];
            out.chains.insert(names::endpoint_chain(plan, t.ip, t.port), ChainRules::new(rules));
        }
    }

    // Cluster traffic: masquerade what does not come from a pod, then pick an endpoint.
    let service_chain = (!plan.cluster_targets.is_empty()).then(|| names::service_chain(plan));
    if let Some(chain) = &service_chain {
        let mut rules = Vec::new();
        if settings.masquerade_all {
            rules.push(format!("jump {MARK_FOR_MASQUERADE}"));
        } else if !cluster_cidrs.is_empty() {
            rules.push(format!("{ip} saddr != {} jump {MARK_FOR_MASQUERADE}", set_literal(&cluster_cidrs)));
        }
        rules.extend(balance(plan, family, &plan.cluster_targets));
        out.chains.insert(chain.clone(), ChainRules::new(rules));
    }

    // External traffic. Cluster policy: masquerade everything. Local policy: keep the client's
    // address and use local endpoints only; traffic from pods and from the node itself is cluster
    // traffic really, and goes to the service chain.
    let external_chain =
        (plan.has_external() && !plan.external_targets.is_empty()).then(|| names::external_chain(plan));
    if let Some(chain) = &external_chain {
        let mut rules = Vec::new();
        if plan.external_policy_local {
            if let Some(service) = &service_chain {
                if !cluster_cidrs.is_empty() {
                    rules.push(format!("{ip} saddr {} goto {service}", set_literal(&cluster_cidrs)));
                }
                rules.push(format!("fib saddr type local jump {MARK_FOR_MASQUERADE}"));
                rules.push(format!("fib saddr type local goto {service}"));
            }
            rules.extend(balance(plan, family, &plan.external_targets));
        } else {
            rules.push(format!("jump {MARK_FOR_MASQUERADE}"));
            let mut external = plan.external_targets.clone();
            let mut cluster = plan.cluster_targets.clone();
            external.sort();
            cluster.sort();
            match &service_chain {
                Some(service) if external == cluster => rules.push(format!("goto {service}")),
                _ => rules.extend(balance(plan, family, &plan.external_targets)),
            }
        }
        out.chains.insert(chain.clone(), ChainRules::new(rules));
    }

    // Verdicts: where each destination goes, or how it is refused.
    let key = |addr: &IpAddr| format!("{addr} . {proto} . {}", plan.port);
    let reject = format!("goto {REJECT}");
    let refuse_external = if plan.external_policy_local && !plan.cluster_targets.is_empty() {
        // Endpoints exist, just not here: drop like kube-proxy, so the load balancer's health
        // check (not a reset) steers clients to other nodes.
        "drop".to_owned()
    } else {
        reject.clone()
    };
    for addr in &plan.cluster_ips {
        match &service_chain {
            Some(chain) => out.elements.insert((VerdictMap::ServiceIps, key(addr)), format!("goto {chain}")),
            None => out.elements.insert((VerdictMap::NoEndpointServices, key(addr)), reject.clone()),
        };
    }
    for addr in plan.external_ips.iter().chain(&plan.load_balancer_ips) {
        match &external_chain {
            Some(chain) => out.elements.insert((VerdictMap::ServiceIps, key(addr)), format!("goto {chain}")),
            None => out.elements.insert((VerdictMap::NoEndpointServices, key(addr)), refuse_external.clone()),
        };
    }
    if let Some(node_port) = plan.node_port {
        let key = format!("{proto} . {node_port}");
        match &external_chain {
            Some(chain) => out.elements.insert((VerdictMap::ServiceNodeports, key), format!("goto {chain}")),
            None => out.elements.insert((VerdictMap::NoEndpointNodeports, key), refuse_external.clone()),
        };
    }

    // loadBalancerSourceRanges: other sources are dropped before DNAT.
    let ranges = family.nets(&plan.load_balancer_source_ranges);
    if !ranges.is_empty() && !plan.load_balancer_ips.is_empty() {
        let chain = names::firewall_chain(plan);
        let drop = vec![format!("{ip} saddr != {} drop", set_literal(&ranges))];
        out.firewall.insert(chain.clone(), ChainRules::new(drop));
        for addr in &plan.load_balancer_ips {
            out.elements.insert((VerdictMap::FirewallIps, key(addr)), format!("goto {chain}"));
        }
    }
    out
}

/// The rules as a sync's state keeps them: digests, no text.
fn without_text(
    mut services: BTreeMap<(IpFamily, ServicePortName), ServiceRules>,
) -> BTreeMap<(IpFamily, ServicePortName), ServiceRules> {
    for rules in services.values_mut() {
        rules.chains.values_mut().chain(rules.firewall.values_mut()).for_each(ChainRules::forget_text);
    }
    services
}

/// Renders every plan, keyed by family and service port. Plans of a family other than their
/// addresses' are rendered as given: the policy layer guarantees consistency.
fn render_services(
    plans: &[ServicePlan],
    settings: &NodeSettings,
    only: Option<&BTreeSet<ServicePortName>>,
) -> BTreeMap<(IpFamily, ServicePortName), ServiceRules> {
    plans
        .iter()
        .filter(|p| only.is_none_or(|names| names.contains(&p.name)))
        .map(|p| ((p.family, p.name.clone()), render_service(p, settings)))
        .collect()
}

/// How many service ports' chains one transaction of a full sync carries at most (see
/// [`render_full`]). `nft` holds the whole transaction in memory, about 4 KiB per line: at 10,000
/// service ports of 10 endpoints one transaction took 440 MiB; batches of 400 (~7,000 lines)
/// keep it under 30 MiB, for a few more transactions (each costs `nft` a start and a cache fetch).
pub const SERVICES_PER_TRANSACTION: usize = 400;

/// How many elements of a new set or map one transaction of a full sync carries at most.
const ELEMENTS_PER_TRANSACTION: usize = 4000;

/// Rewrites every table. `existing` names what the kernel holds now, so that objects no longer
/// wanted are deleted; everything else is redeclared, flushed and refilled. Affinity sets that are
/// still wanted keep their clients.
///
/// The script is cut into transactions ([`Rendering::transactions`]) that each leave working
/// tables: first the tables, their sets and maps and static chains; then the service ports'
/// chains, shard by shard, [`SERVICES_PER_TRANSACTION`] at a time, each chain flushed and refilled
/// in one transaction (a new chain is unreachable until the maps point at it); then each table's
/// maps and sets, flushed and refilled together; last, what is no longer wanted is deleted. No
/// table is flushed as a whole, so no packet meets an empty chain of a live service between two
/// transactions, and a transaction that changes chains touches one shard (the kernel re-checks
/// the tables a transaction changes, see [`SHARDS`]).
///
/// Two service ports claiming the same map key (a misconfiguration) resolve to the first in order
/// within a table; across shards, to the shard whose nat chain runs first.
pub fn render_full(plans: &[ServicePlan], settings: &NodeSettings, existing: &KernelObjects) -> Rendering {
    let services = render_services(plans, settings, None);
    let in_table = |table: Table| -> Vec<&ServiceRules> {
        services
            .iter()
            .filter(|((f, _), r)| *f == table.family && table.shard.is_none_or(|s| s == r.shard))
            .map(|(_, r)| r)
            .collect()
    };
    let mut script = Script::default();

    // The tables, their sets, maps and static chains.
    for table in Table::all() {
        let family = table.syntax();
        let existing = existing.get(table);
        script.line(format_args!("add table {table} {{ comment \"fleetproxy: Service proxy rules\"; }}"));
        for set in table.sets() {
            let key = if *set == HAIRPIN { family.hairpin_type() } else { family.addr_type().to_owned() };
            let flags = if *set == EXCLUDED { " flags interval;" } else { "" };
            script.line(format_args!("add set {table} {set} {{ type {key};{flags} }}"));
        }
        for map in table.maps() {
            script.line(format_args!(
                "add map {table} {} {{ type {} : verdict; }}",
                map.name(),
                map.key_type(family)
            ));
        }
        let statics = static_chains(table, settings);
        for chain in &statics {
            match &chain.hook {
                Some(hook) => script.line(format_args!("add chain {table} {} {{ {hook} }}", chain.name)),
                None if existing.chains.contains(chain.name) => {}
                None => script.line(format_args!("add chain {table} {}", chain.name)),
            }
        }
        for chain in &statics {
            if existing.chains.contains(chain.name) {
                script.line(format_args!("flush chain {table} {}", chain.name));
            }
            for rule in &chain.rules {
                script.line(format_args!("add rule {table} {} {rule}", chain.name));
            }
        }
    }
    script.cut();

    // The service ports' chains, a batch of one shard per transaction. Chains that exist already
    // are flushed, not redeclared: redeclaring thousands of chains costs the kernel more than
    // their rules. (If `existing` is wrong, the transaction fails, and the next full sync reads
    // the names from the kernel.)
    for table in Table::all().filter(|t| t.shard.is_some()) {
        for batch in in_table(table).chunks(SERVICES_PER_TRANSACTION) {
            for rules in batch {
                for (name, declaration) in &rules.sets {
                    script.line(format_args!("add set {table} {name} {declaration}"));
                }
                for (table, name, _) in rules.all_chains(table.family) {
                    if existing.get(table).chains.contains(name) {
                        script.line(format_args!("flush chain {table} {name}"));
                    } else {
                        script.line(format_args!("add chain {table} {name}"));
                    }
                }
                for (table, name, chain) in rules.all_chains(table.family) {
                    for rule in &chain.rules {
                        script.line(format_args!("add rule {table} {name} {rule}"));
                    }
                }
            }
            script.cut();
        }
    }

    // Maps and sets, table by table: refilled at once where they exist (so that no lookup misses
    // in between), in batches where they are new (a service is reachable once its element is in).
    for table in Table::all() {
        let family = table.syntax();
        let in_table = in_table(table);
        let existing = existing.get(table);
        // Elements, first claim wins.
        let mut maps: BTreeMap<VerdictMap, BTreeMap<&str, &str>> = BTreeMap::new();
        for rules in &in_table {
            for ((map, key), verdict) in &rules.elements {
                if map.in_shard() == table.shard.is_some() {
                    maps.entry(*map).or_default().entry(key.as_str()).or_insert(verdict.as_str());
                }
            }
        }
        let mut fill = |kind: &str, name: &str, known: &BTreeSet<String>, elements: Vec<String>| {
            if known.contains(name) {
                script.line(format_args!("flush {kind} {table} {name}"));
                script.set_elements("add", table, name, &elements);
            } else {
                for batch in elements.chunks(ELEMENTS_PER_TRANSACTION) {
                    script.set_elements("add", table, name, batch);
                    script.cut();
                }
            }
        };
        let excluded = IpNet::aggregate(&family.nets(&settings.excluded_cidrs));
        fill("set", EXCLUDED, &existing.sets, excluded.iter().map(ToString::to_string).collect());
        if table.shard.is_none() {
            let hairpin: BTreeSet<&String> = in_table.iter().flat_map(|r| &r.hairpin).collect();
            fill("set", HAIRPIN, &existing.sets, hairpin.iter().map(ToString::to_string).collect());
        }
        for map in table.maps() {
            let elements = maps.get(&map).into_iter().flatten().map(|(k, v)| format!("{k} : {v}")).collect();
            fill("map", map.name(), &existing.maps, elements);
        }
        script.cut();
    }

    // What the kernel holds and we no longer want: the maps no longer point at these chains; they
    // are flushed first, since they may jump to each other.
    for (&table, existing) in &existing.tables {
        if !table.is_kept() {
            script.line(format_args!("delete table {table}"));
            continue;
        }
        let mut wanted_chains: BTreeSet<&str> =
            static_chains(table, settings).iter().map(|c| c.name).collect();
        let mut wanted_sets: BTreeSet<&str> = table.sets().iter().copied().collect();
        for rules in in_table(table) {
            wanted_chains.extend(
                rules.all_chains(table.family).filter(|(t, ..)| *t == table).map(|(_, n, _)| n.as_str()),
            );
            if table.shard.is_some() {
                wanted_sets.extend(rules.sets.keys().map(String::as_str));
            }
        }
        let stale_chains: Vec<&String> =
            existing.chains.iter().filter(|c| !wanted_chains.contains(c.as_str())).collect();
        for chain in &stale_chains {
            script.line(format_args!("flush chain {table} {chain}"));
        }
        for chain in &stale_chains {
            script.line(format_args!("delete chain {table} {chain}"));
        }
        for set in existing.sets.iter().filter(|s| !wanted_sets.contains(s.as_str())) {
            script.line(format_args!("delete set {table} {set}"));
        }
        let wanted_maps: BTreeSet<&str> = table.maps().map(VerdictMap::name).collect();
        for map in existing.maps.iter().filter(|m| !wanted_maps.contains(m.as_str())) {
            script.line(format_args!("delete map {table} {map}"));
        }
    }
    script.cut();
    Rendering {
        lines: script.lines,
        cuts: script.cuts,
        script: script.text,
        state: RenderedState { settings: settings.clone(), services: without_text(services) },
        full: true,
    }
}

/// What a partial sync changes in one table.
#[derive(Default)]
struct TableChanges<'a> {
    add_sets: Vec<(&'a String, &'a String)>,
    new_chains: Vec<(&'a String, &'a ChainRules)>,
    rewrite_chains: Vec<(&'a String, &'a ChainRules)>,
    delete_elements: BTreeMap<VerdictMap, Vec<String>>,
    add_elements: BTreeMap<VerdictMap, Vec<String>>,
    add_hairpin: BTreeSet<&'a String>,
    delete_hairpin: BTreeSet<&'a String>,
    delete_chains: Vec<&'a String>,
    delete_sets: Vec<&'a String>,
}

impl TableChanges<'_> {
    /// The commands, in an order the kernel accepts: what is referred to exists before the
    /// reference and goes after it.
    fn write(&self, table: Table, script: &mut Script) {
        for (name, declaration) in &self.add_sets {
            script.line(format_args!("add set {table} {name} {declaration}"));
        }
        for (name, _) in &self.new_chains {
            script.line(format_args!("add chain {table} {name}"));
        }
        for (name, _) in &self.rewrite_chains {
            script.line(format_args!("flush chain {table} {name}"));
        }
        for (name, rules) in self.new_chains.iter().chain(&self.rewrite_chains) {
            for rule in &rules.rules {
                script.line(format_args!("add rule {table} {name} {rule}"));
            }
        }
        // Removals before additions: a key whose verdict changed is deleted, then re-added.
        for (map, keys) in &self.delete_elements {
            script.elements("delete", table, *map, keys);
        }
        for (map, elements) in &self.add_elements {
            script.elements("add", table, *map, elements);
        }
        script.set_elements("delete", table, HAIRPIN, &self.delete_hairpin);
        script.set_elements("add", table, HAIRPIN, &self.add_hairpin);
        // Chains go before sets: a chain being deleted may still refer to a set being deleted.
        for name in &self.delete_chains {
            script.line(format_args!("flush chain {table} {name}"));
        }
        for name in &self.delete_chains {
            script.line(format_args!("delete chain {table} {name}"));
        }
        for name in &self.delete_sets {
            script.line(format_args!("delete set {table} {name}"));
        }
    }
}

/// Sends only what changed for the `changed` service ports since `previous` was applied: their
/// new or rewritten chains, new sets, added and removed map elements, deleted chains and sets.
/// Everything else is left as it is. The settings must be those of `previous` (a settings change
/// needs a full sync).
///
/// Takes the previous state by value: it becomes the new one, updated in place, so that a partial
/// sync costs what the changed services cost, not a copy of everything.
pub fn render_partial(
    previous: RenderedState,
    plans: &[ServicePlan],
    changed: &BTreeSet<ServicePortName>,
) -> Rendering {
    let fresh = render_services(plans, &previous.settings, Some(changed));
    let mut state = previous;
    let mut script = Script::default();
    let empty = ServiceRules::default();
    let mut ops: BTreeMap<Table, TableChanges<'_>> = BTreeMap::new();

    for family in Family::BOTH.map(|f| f.0) {
        let keys: BTreeSet<(IpFamily, ServicePortName)> =
            changed.iter().map(|n| (family, n.clone())).collect();
        let mut add_hairpin: BTreeSet<&String> = BTreeSet::new();
        let mut delete_hairpin: BTreeSet<&String> = BTreeSet::new();

        for key in &keys {
            let old = state.services.get(key).unwrap_or(&empty);
            let new = fresh.get(key).unwrap_or(&empty);
            for (name, declaration) in &new.sets {
                if !old.sets.contains_key(name) {
                    ops.entry(new.shard_table(family)).or_default().add_sets.push((name, declaration));
                }
            }
            let old_chains: BTreeMap<(Table, &String), &ChainRules> =
                old.all_chains(family).map(|(t, n, r)| ((t, n), r)).collect();
            for (table, name, rules) in new.all_chains(family) {
                let changes = ops.entry(table).or_default();
                match old_chains.get(&(table, name)) {
                    None => changes.new_chains.push((name, rules)),
                    Some(old_rules) if *old_rules != rules => changes.rewrite_chains.push((name, rules)),
                    Some(_) => {}
                }
            }
            let new_chains: BTreeSet<(Table, &String)> =
                new.all_chains(family).map(|(t, n, _)| (t, n)).collect();
            for (table, name) in old_chains.keys().filter(|k| !new_chains.contains(k)) {
                ops.entry(*table).or_default().delete_chains.push(name);
            }
            for ((map, k), verdict) in &old.elements {
                if new.elements.get(&(*map, k.clone())) != Some(verdict) {
                    let changes = ops.entry(old.map_table(family, *map)).or_default();
                    changes.delete_elements.entry(*map).or_default().push(k.clone());
                }
            }
            for ((map, k), verdict) in &new.elements {
                if old.elements.get(&(*map, k.clone())) != Some(verdict) {
                    let changes = ops.entry(new.map_table(family, *map)).or_default();
                    changes.add_elements.entry(*map).or_default().push(format!("{k} : {verdict}"));
                }
            }
            for set in old.sets.keys().filter(|s| !new.sets.contains_key(*s)) {
                ops.entry(old.shard_table(family)).or_default().delete_sets.push(set);
            }
            add_hairpin.extend(new.hairpin.difference(&old.hairpin));
            delete_hairpin.extend(old.hairpin.difference(&new.hairpin));
        }
        // A hairpin element stays while any other service port of the family still wants it.
        if !delete_hairpin.is_empty() {
            let still_wanted = |e: &String| {
                keys.iter().any(|k| fresh.get(k).is_some_and(|r| r.hairpin.contains(e)))
                    || state
                        .services
                        .iter()
                        .any(|(k, r)| k.0 == family && !keys.contains(k) && r.hairpin.contains(e))
            };
            delete_hairpin.retain(|e| !still_wanted(e));
        }
        if !(add_hairpin.is_empty() && delete_hairpin.is_empty()) {
            let changes = ops.entry(Table::main(family)).or_default();
            changes.add_hairpin = add_hairpin;
            changes.delete_hairpin = delete_hairpin;
        }
    }
    for (table, changes) in &ops {
        changes.write(*table, &mut script);
    }

    // The new state: the changed service ports' rules replace (or remove) their old ones.
    for family in Family::BOTH {
        for name in changed {
            state.services.remove(&(family.0, name.clone()));
        }
    }
    state.services.extend(without_text(fresh));
    Rendering { script: script.text, lines: script.lines, cuts: Vec::new(), state, full: false }
}
