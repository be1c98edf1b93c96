//! The pure renderer: service plans + node settings → the commands of a sync
//! ([`super::ruleset::Command`]), cut into transactions.
//!
//! Layout, after kube-proxy's nftables proxier, in each family (`ip`, `ip6`) over a main table
//! `fleetproxy` and [`SHARDS`] service tables `fleetproxy-services-N` (a service port's shard is
//! a stable hash of its name):
//!
//! - in each shard, base chains `nat-prerouting`/`nat-output` (priority dstnat) → `services`, which
//!   classifies new connections with two verdict maps: `service-ips` (`address . protocol . port`
//!   of cluster, external and load-balancer IPs) and `service-nodeports` (`protocol . port`, on
//!   local addresses only);
//! - per service port, in its shard: a `service-…` chain (cluster traffic) and an `external-…`
//!   chain (node port, external and load-balancer traffic, with externalTrafficPolicy applied) that
//!   DNAT themselves (see [`balance`]). Only sessionAffinity ClientIP needs a chain per endpoint
//!   (`endpoint-…`, picked by `numgen random mod N vmap`) with an `affinity-…` set of its clients.
//!   Without per-endpoint chains and without per-service sets an endpoint change rewrites one chain;
//! - in the main table, `nat-postrouting` (srcnat) → `masquerading`, and
//!   `filter-prerouting`/`-input`/`-forward`/`-output` (priority -110, before DNAT on output) for
//!   the checks that must drop or reject, which nat chains cannot: `firewall-…` chains for
//!   loadBalancerSourceRanges (by the `firewall-ips` map), and `no-endpoint-services`/
//!   `no-endpoint-nodeports`, which map destinations without endpoints to `reject-chain` (TCP
//!   reset, ICMP port unreachable) or `drop` (Local policy, endpoints elsewhere);
//! - hairpin traffic (a pod reaching itself through its service) is masqueraded in `masquerading`,
//!   after DNAT, by the `hairpin-connections` set of `endpoint . endpoint . protocol . port`, which
//!   holds the local endpoints only: only a pod on this node can hairpin here;
//! - every table's `excluded-cidrs` set is checked first: those destinations are never intercepted.
//!
//! A full sync rewrites every table without ever deleting one that is kept (so traffic never meets
//! an empty table and affinity sets keep their clients), see [`render_full`]. A partial sync
//! compares the changed service ports' objects with what the last sync rendered and sends only the
//! difference.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Display};
use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    names,
    ruleset::{
        ChainType, Command, Element, Field, Hook, HookPoint, KeyType, Rule, SetSpec, Stmt, Value, Verdict,
    },
};
use crate::{
    model::{IpFamily, Protocol, ServicePortName},
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
        match self.family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
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

/// The verdict maps every family's tables have between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VerdictMap {
    /// `address . protocol . port` → the service or external chain (shards).
    ServiceIps,
    /// `protocol . port` → the external chain (shards).
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

    fn spec(self, family: Family) -> SetSpec {
        let mut key = match self {
            Self::ServiceNodeports | Self::NoEndpointNodeports => vec![],
            _ => vec![KeyType::addr(family.0)],
        };
        key.extend([KeyType::InetProto, KeyType::InetService]);
        SetSpec::verdict_map(key)
    }
}

/// Family-specific helpers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Family(IpFamily);

impl Family {
    const BOTH: [Family; 2] = [Family(IpFamily::V4), Family(IpFamily::V6)];

    fn loopback(self) -> Value {
        match self.0 {
            IpFamily::V4 => Value::Net(IpNet::V4(ipnet::Ipv4Net::new_assert([127, 0, 0, 0].into(), 8))),
            IpFamily::V6 => Value::Addr(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        }
    }

    /// The networks of `nets` in this family, host bits cleared.
    fn nets(self, nets: &[IpNet]) -> Vec<IpNet> {
        nets.iter().filter(|n| IpFamily::of_net(n) == self.0).map(IpNet::trunc).collect()
    }

    fn rule(self, stmts: Vec<Stmt>) -> Rule {
        Rule::new(self.0, stmts)
    }

    fn set_spec(self, set: &str) -> SetSpec {
        let addr = KeyType::addr(self.0);
        if set == HAIRPIN {
            SetSpec::set(vec![addr, addr, KeyType::InetProto, KeyType::InetService])
        } else {
            SetSpec { interval: true, ..SetSpec::set(vec![addr]) }
        }
    }
}

/// The firewall mark that asks the masquerading chain to SNAT a packet.
fn masquerade_mark(settings: &NodeSettings) -> u32 {
    1u32 << (settings.masquerade_bit & 31)
}

fn jump(chain: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(chain.to_owned()))
}

fn goto(chain: &str) -> Stmt {
    Stmt::Verdict(Verdict::Goto(chain.to_owned()))
}

fn is_proto(protocol: Protocol) -> Stmt {
    Stmt::Cmp { field: Field::L4proto, negate: false, value: Value::Proto(protocol) }
}

/// `address . protocol . port` (or `protocol . port`) and the fields that match it.
const DESTINATION: [Field; 3] = [Field::Daddr, Field::L4proto, Field::Dport];
const PORT: [Field; 2] = [Field::L4proto, Field::Dport];

/// One chain's rules, in order, and their digest. What a sync applied keeps the digest only
/// ([`RenderedState`]): the next partial sync compares digests, and 10,000 services' rules would
/// cost the agent tens of MiB for nothing.
#[derive(Clone, Debug, Default)]
pub struct ChainRules {
    pub rules: Vec<Rule>,
    digest: u64,
}

impl ChainRules {
    fn new(rules: Vec<Rule>) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        rules.hash(&mut hasher);
        Self { digest: hasher.finish(), rules }
    }

    /// Takes the rules out, keeping the digest.
    fn take_rules(&mut self) -> Vec<Rule> {
        std::mem::take(&mut self.rules)
    }
}

impl PartialEq for ChainRules {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for ChainRules {}

/// A set or map key.
pub type Key = Vec<Value>;

/// What one service port in one family contributes to that family's tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// The service shard that holds its chains, sets and nat dispatch elements.
    pub shard: u8,
    /// Chains in the shard by name, each with its rules in order.
    pub chains: BTreeMap<String, ChainRules>,
    /// The firewall chain (loadBalancerSourceRanges), in the main table: the filter hooks need it.
    pub firewall: BTreeMap<String, ChainRules>,
    /// Affinity sets by name, with their declaration.
    pub sets: BTreeMap<String, SetSpec>,
    /// Verdict-map elements: (map, key) → verdict. The map says which table ([`VerdictMap::in_shard`]).
    pub elements: BTreeMap<(VerdictMap, Key), Verdict>,
    /// Elements of the main table's `hairpin-connections` set (shared: two service ports may want
    /// the same one).
    pub hairpin: BTreeSet<Key>,
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

    /// The same, mutable (to take the rules out once they are in a command).
    fn all_chains_mut(
        &mut self,
        family: IpFamily,
    ) -> impl Iterator<Item = (Table, &String, &mut ChainRules)> {
        let shard = self.shard_table(family);
        let main = Table::main(family);
        self.chains
            .iter_mut()
            .map(move |(n, r)| (shard, n, r))
            .chain(self.firewall.iter_mut().map(move |(n, r)| (main, n, r)))
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

/// The commands of a sync and the state they lead to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendering {
    pub commands: Vec<Command>,
    /// Lines the commands take in nft syntax (the payload size reported in sync stats).
    pub lines: usize,
    pub state: RenderedState,
    pub full: bool,
}

impl Rendering {
    /// Whether there is nothing to send to the kernel.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// The commands in nft syntax, one `nft -f` script.
    pub fn script(&self) -> String {
        script(&self.commands)
    }
}

/// Joins the pieces of a full sync ([`render_full_with`]) into transactions of about `max_lines`
/// lines each: consecutive pieces are joined while they stay within the limit (a piece longer
/// than it stays whole).
#[derive(Debug)]
pub struct Transactions {
    max_lines: usize,
    pending: Vec<Command>,
    pending_lines: usize,
}

impl Transactions {
    pub fn new(max_lines: usize) -> Self {
        Self { max_lines, pending: Vec::new(), pending_lines: 0 }
    }

    /// Adds a piece; gives back the transaction it completes, if any.
    pub fn add(&mut self, piece: Vec<Command>, lines: usize) -> Option<Vec<Command>> {
        let full = !self.pending.is_empty() && self.pending_lines + lines > self.max_lines;
        let done = full.then(|| std::mem::take(&mut self.pending));
        if full {
            self.pending_lines = 0;
        }
        self.pending.extend(piece);
        self.pending_lines += lines;
        done
    }

    /// The last transaction, if anything is left.
    pub fn finish(self) -> Option<Vec<Command>> {
        (!self.pending.is_empty()).then_some(self.pending)
    }
}

/// Commands in nft syntax.
pub fn script(commands: &[Command]) -> String {
    use fmt::Write as _;
    let mut out = String::new();
    for command in commands {
        // Writing to a String cannot fail.
        let _ = write!(out, "{command}");
    }
    out
}

/// The commands of a sync being written.
#[derive(Default)]
struct Script {
    commands: Vec<Command>,
    lines: usize,
}

impl Script {
    /// Hands the commands so far to `sink` as one piece: the end of a transaction of its own,
    /// after which the tables work.
    fn cut<E>(&mut self, sink: &mut impl FnMut(Vec<Command>, usize) -> Result<(), E>) -> Result<(), E> {
        if self.commands.is_empty() {
            return Ok(());
        }
        let lines = std::mem::take(&mut self.lines);
        sink(std::mem::take(&mut self.commands), lines)
    }

    fn push(&mut self, command: Command) {
        self.lines += command.lines();
        self.commands.push(command);
    }

    fn rule(&mut self, table: Table, chain: &str, rule: Rule) {
        self.push(Command::AddRule { table, chain: chain.to_owned(), rule });
    }

    /// Adds or deletes elements of a set or map, or nothing for no elements.
    fn elements(&mut self, add: bool, table: Table, set: &str, elements: Vec<Element>) {
        if elements.is_empty() {
            return;
        }
        let set = set.to_owned();
        self.push(if add {
            Command::AddElements { table, set, elements }
        } else {
            Command::DeleteElements { table, set, elements }
        });
    }
}

/// One of the chains every table has.
struct StaticChain {
    name: &'static str,
    hook: Option<Hook>,
    rules: Vec<Rule>,
}

/// The chains `table` always has, with their rules, for these settings.
fn static_chains(table: Table, settings: &NodeSettings) -> Vec<StaticChain> {
    let family = table.syntax();
    let rule = |stmts| family.rule(stmts);
    let mark = masquerade_mark(settings);
    let base = |name, kind, hook, priority, rules| StaticChain {
        name,
        hook: Some(Hook { kind, hook, priority }),
        rules,
    };
    let chain = |name, rules| StaticChain { name, hook: None, rules };
    let new = |target: &str| rule(vec![Stmt::CtStateNew, jump(target)]);
    let not_excluded = rule(vec![
        Stmt::Lookup { fields: vec![Field::Daddr], set: EXCLUDED.to_owned() },
        Stmt::Verdict(Verdict::Return),
    ]);
    let lookup =
        |map: VerdictMap| rule(vec![Stmt::Vmap { fields: DESTINATION.to_vec(), map: map.name().to_owned() }]);
    // Node ports are served on local addresses: all but loopback, or those in nodePortAddresses.
    let node_port_matches: Vec<Vec<Stmt>> = if settings.node_port_addresses.is_empty() {
        vec![vec![
            Stmt::FibLocal(Field::Daddr),
            Stmt::Cmp { field: Field::Daddr, negate: true, value: family.loopback() },
        ]]
    } else {
        family
            .nets(&settings.node_port_addresses)
            .into_iter()
            .map(|net| {
                vec![
                    Stmt::Cmp { field: Field::Daddr, negate: false, value: Value::Net(net) },
                    Stmt::FibLocal(Field::Daddr),
                ]
            })
            .collect()
    };
    let port_lookups = |map: VerdictMap| -> Vec<Rule> {
        node_port_matches
            .iter()
            .map(|matches| {
                let mut stmts = matches.clone();
                stmts.push(Stmt::Vmap { fields: PORT.to_vec(), map: map.name().to_owned() });
                rule(stmts)
            })
            .collect()
    };

    if table.shard.is_some() {
        let mut services = vec![not_excluded, lookup(VerdictMap::ServiceIps)];
        services.extend(port_lookups(VerdictMap::ServiceNodeports));
        return vec![
            base(
                "nat-prerouting",
                ChainType::Nat,
                HookPoint::Prerouting,
                -100,
                vec![rule(vec![jump(SERVICES)])],
            ),
            base("nat-output", ChainType::Nat, HookPoint::Output, -100, vec![rule(vec![jump(SERVICES)])]),
            chain(SERVICES, services),
            chain(MARK_FOR_MASQUERADE, vec![rule(vec![Stmt::MarkOr(mark)])]),
        ];
    }
    let filter = |name, hook, rules| base(name, ChainType::Filter, hook, FILTER_PRIORITY, rules);
    let mut nodeport_checks = vec![not_excluded.clone()];
    nodeport_checks.extend(port_lookups(VerdictMap::NoEndpointNodeports));
    let hairpin = [Field::Saddr, Field::Daddr, Field::L4proto, Field::Dport];
    vec![
        filter("filter-prerouting", HookPoint::Prerouting, vec![new(FIREWALL_CHECK)]),
        filter(
            "filter-input",
            HookPoint::Input,
            vec![new(NODEPORT_ENDPOINTS_CHECK), new(SERVICE_ENDPOINTS_CHECK)],
        ),
        filter("filter-forward", HookPoint::Forward, vec![new(SERVICE_ENDPOINTS_CHECK)]),
        filter("filter-output", HookPoint::Output, vec![new(SERVICE_ENDPOINTS_CHECK), new(FIREWALL_CHECK)]),
        base(
            "nat-postrouting",
            ChainType::Nat,
            HookPoint::Postrouting,
            100,
            vec![rule(vec![jump(MASQUERADING)])],
        ),
        chain(
            MASQUERADING,
            vec![
                rule(vec![
                    Stmt::CtStatusDnat,
                    Stmt::Lookup { fields: hairpin.to_vec(), set: HAIRPIN.to_owned() },
                    Stmt::Masquerade,
                ]),
                rule(vec![Stmt::MarkClear(mark), Stmt::Verdict(Verdict::Return)]),
                rule(vec![Stmt::MarkXor(mark)]),
                rule(vec![Stmt::Masquerade]),
            ],
        ),
        chain(
            REJECT,
            vec![rule(vec![is_proto(Protocol::Tcp), Stmt::RejectTcpReset]), rule(vec![Stmt::Reject])],
        ),
        chain(FIREWALL_CHECK, vec![not_excluded.clone(), lookup(VerdictMap::FirewallIps)]),
        chain(SERVICE_ENDPOINTS_CHECK, vec![not_excluded, lookup(VerdictMap::NoEndpointServices)]),
        chain(NODEPORT_ENDPOINTS_CHECK, nodeport_checks),
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
fn balance(plan: &ServicePlan, family: Family, targets: &[Target]) -> Vec<Rule> {
    let mut targets = targets.to_vec();
    targets.sort();
    let Some(timeout) = plan.session_affinity else {
        let n = targets.len();
        if n > CASCADE_MAX_ENDPOINTS {
            let arms = targets.iter().map(|t| (t.ip, t.port)).collect();
            return vec![family.rule(vec![is_proto(plan.protocol), Stmt::DnatNumgenMap(arms)])];
        }
        return targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut stmts = match u32::try_from(n - i) {
                    Ok(left) if left > 1 => vec![Stmt::NumgenIsZero(left)],
                    _ => vec![],
                };
                stmts.extend([is_proto(plan.protocol), Stmt::Dnat(t.ip, t.port)]);
                family.rule(stmts)
            })
            .collect();
    };
    let mut rules: Vec<Rule> = targets
        .iter()
        .map(|t| {
            family.rule(vec![
                Stmt::Lookup {
                    fields: vec![Field::Saddr],
                    set: names::affinity_set(plan, t.ip, t.port, timeout),
                },
                goto(&names::endpoint_chain(plan, t.ip, t.port)),
            ])
        })
        .collect();
    match targets.as_slice() {
        [] => {}
        [only] => rules.push(family.rule(vec![goto(&names::endpoint_chain(plan, only.ip, only.port))])),
        many => {
            let chains = many.iter().map(|t| names::endpoint_chain(plan, t.ip, t.port)).collect();
            rules.push(family.rule(vec![Stmt::NumgenGoto(chains)]));
        }
    }
    rules
}

/// Everything one service port contributes to its family's tables.
pub fn render_service(plan: &ServicePlan, settings: &NodeSettings) -> ServiceRules {
    let family = Family(plan.family);
    let rule = |stmts| family.rule(stmts);
    let proto = plan.protocol;
    let cluster_cidrs = family.nets(&settings.cluster_cidrs);
    let from = |net: &IpNet, negate| Stmt::Cmp { field: Field::Saddr, negate, value: Value::Net(*net) };
    let mut out = ServiceRules { shard: names::shard(&plan.name, SHARDS), ..ServiceRules::default() };

    let targets = plan.all_targets();
    out.hairpin = targets
        .iter()
        .filter(|t| t.is_local)
        .map(|t| vec![Value::Addr(t.ip), Value::Addr(t.ip), Value::Proto(proto), Value::Port(t.port)])
        .collect();
    // Affinity only: one chain per endpoint (shared by cluster and external traffic) that records
    // the client in the endpoint's set.
    if let Some(timeout) = plan.session_affinity {
        for t in &targets {
            let set = names::affinity_set(plan, t.ip, t.port, timeout);
            let spec = SetSpec {
                timeout_s: Some(timeout.as_secs().max(1)),
                ..SetSpec::set(vec![KeyType::addr(plan.family)])
            };
            out.sets.insert(set.clone(), spec);
            let rules = vec![
                rule(vec![Stmt::UpdateSaddr(set)]),
                rule(vec![is_proto(proto), Stmt::Dnat(t.ip, t.port)]),
            ];
            out.chains.insert(names::endpoint_chain(plan, t.ip, t.port), ChainRules::new(rules));
        }
    }

    // Cluster traffic: masquerade what does not come from a pod, then pick an endpoint.
    let service_chain = (!plan.cluster_targets.is_empty()).then(|| names::service_chain(plan));
    if let Some(chain) = &service_chain {
        let mut rules = Vec::new();
        if settings.masquerade_all {
            rules.push(rule(vec![jump(MARK_FOR_MASQUERADE)]));
        } else if !cluster_cidrs.is_empty() {
            let mut stmts: Vec<Stmt> = cluster_cidrs.iter().map(|net| from(net, true)).collect();
            stmts.push(jump(MARK_FOR_MASQUERADE));
            rules.push(rule(stmts));
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
                rules.extend(cluster_cidrs.iter().map(|net| rule(vec![from(net, false), goto(service)])));
                rules.push(rule(vec![Stmt::FibLocal(Field::Saddr), jump(MARK_FOR_MASQUERADE)]));
                rules.push(rule(vec![Stmt::FibLocal(Field::Saddr), goto(service)]));
            }
            rules.extend(balance(plan, family, &plan.external_targets));
        } else {
            rules.push(rule(vec![jump(MARK_FOR_MASQUERADE)]));
            let mut external = plan.external_targets.clone();
            let mut cluster = plan.cluster_targets.clone();
            external.sort();
            cluster.sort();
            match &service_chain {
                Some(service) if external == cluster => rules.push(rule(vec![goto(service)])),
                _ => rules.extend(balance(plan, family, &plan.external_targets)),
            }
        }
        out.chains.insert(chain.clone(), ChainRules::new(rules));
    }

    // Verdicts: where each destination goes, or how it is refused.
    let key = |addr: &IpAddr| vec![Value::Addr(*addr), Value::Proto(proto), Value::Port(plan.port)];
    let reject = Verdict::Goto(REJECT.to_owned());
    let refuse_external = if plan.external_policy_local && !plan.cluster_targets.is_empty() {
        // Endpoints exist, just not here: drop like kube-proxy, so the load balancer's health
        // check (not a reset) steers clients to other nodes.
        Verdict::Drop
    } else {
        reject.clone()
    };
    for addr in &plan.cluster_ips {
        match &service_chain {
            Some(chain) => {
                out.elements.insert((VerdictMap::ServiceIps, key(addr)), Verdict::Goto(chain.clone()))
            }
            None => out.elements.insert((VerdictMap::NoEndpointServices, key(addr)), reject.clone()),
        };
    }
    for addr in plan.external_ips.iter().chain(&plan.load_balancer_ips) {
        match &external_chain {
            Some(chain) => {
                out.elements.insert((VerdictMap::ServiceIps, key(addr)), Verdict::Goto(chain.clone()))
            }
            None => out.elements.insert((VerdictMap::NoEndpointServices, key(addr)), refuse_external.clone()),
        };
    }
    if let Some(node_port) = plan.node_port {
        let key = vec![Value::Proto(proto), Value::Port(node_port)];
        match &external_chain {
            Some(chain) => {
                out.elements.insert((VerdictMap::ServiceNodeports, key), Verdict::Goto(chain.clone()))
            }
            None => out.elements.insert((VerdictMap::NoEndpointNodeports, key), refuse_external.clone()),
        };
    }

    // loadBalancerSourceRanges: other sources are dropped before DNAT.
    let ranges = family.nets(&plan.load_balancer_source_ranges);
    if !ranges.is_empty() && !plan.load_balancer_ips.is_empty() {
        let chain = names::firewall_chain(plan);
        let mut drop: Vec<Stmt> = ranges.iter().map(|net| from(net, true)).collect();
        drop.push(Stmt::Verdict(Verdict::Drop));
        out.firewall.insert(chain.clone(), ChainRules::new(vec![rule(drop)]));
        for addr in &plan.load_balancer_ips {
            out.elements.insert((VerdictMap::FirewallIps, key(addr)), Verdict::Goto(chain.clone()));
        }
    }
    out
}

/// Renders the plans of the `changed` service ports, keyed by family and service port. Plans of a
/// family other than their addresses' are rendered as given: the policy layer guarantees
/// consistency.
fn render_changed(
    plans: &[ServicePlan],
    settings: &NodeSettings,
    changed: &BTreeSet<ServicePortName>,
) -> BTreeMap<(IpFamily, ServicePortName), ServiceRules> {
    plans
        .iter()
        .filter(|p| changed.contains(&p.name))
        .map(|p| ((p.family, p.name.clone()), render_service(p, settings)))
        .collect()
}

/// The service ports whose objects are in `table` (all of the family for the main table).
fn in_table(
    services: &BTreeMap<(IpFamily, ServicePortName), ServiceRules>,
    table: Table,
) -> impl Iterator<Item = &ServiceRules> {
    services
        .iter()
        .filter(move |((f, _), r)| *f == table.family && table.shard.is_none_or(|s| s == r.shard))
        .map(|(_, r)| r)
}

/// How many service ports' chains one transaction of a full sync carries at most (see
/// [`render_full`]): it bounds the memory one transaction takes to send (and took `nft` about
/// 4 KiB per line when `nft` applied them), for a few more transactions.
pub const SERVICES_PER_TRANSACTION: usize = 400;

/// How many elements of a new set or map one transaction of a full sync carries at most.
const ELEMENTS_PER_TRANSACTION: usize = 4000;

/// Rewrites every table. `existing` names what the kernel holds now, so that objects no longer
/// wanted are deleted; everything else is redeclared, flushed and refilled. Affinity sets that are
/// still wanted keep their clients.
///
/// The commands come in pieces, to `piece` with their line count, as they are rendered: pieces
/// are transactions (or parts of one, see [`Transactions`]) that each leave working tables: first the tables, their sets and maps and static chains; then the service ports'
/// chains, shard by shard, [`SERVICES_PER_TRANSACTION`] at a time, each chain flushed and refilled
/// in one transaction (a new chain is unreachable until the maps point at it); then each table's
/// maps and sets, flushed and refilled together; last, what is no longer wanted is deleted. No
/// table is flushed as a whole, so no packet meets an empty chain of a live service between two
/// transactions, and a transaction that changes chains touches one shard (the kernel re-checks
/// the tables a transaction changes, see [`SHARDS`]).
///
/// The service ports are rendered a piece at a time and their rules dropped (their digests kept)
/// once handed over, so that a full sync of 10,000 service ports never holds all their rules.
///
/// Two service ports claiming the same map key (a misconfiguration) resolve to the first in order
/// within a table; across shards, to the shard whose nat chain runs first. Of two plans of one
/// service port (never made by the policy layer), the first counts.
pub fn render_full_with<E>(
    plans: &[ServicePlan],
    settings: &NodeSettings,
    existing: &KernelObjects,
    piece: &mut impl FnMut(Vec<Command>, usize) -> Result<(), E>,
) -> Result<RenderedState, E> {
    let mut services: BTreeMap<(IpFamily, ServicePortName), ServiceRules> = BTreeMap::new();
    let mut script = Script::default();

    // The tables, their sets, maps and static chains.
    for table in Table::all() {
        let family = table.syntax();
        let existing = existing.get(table);
        script.push(Command::AddTable(table));
        for set in table.sets() {
            script.push(Command::AddSet { table, name: (*set).to_owned(), spec: family.set_spec(set) });
        }
        for map in table.maps() {
            script.push(Command::AddSet { table, name: map.name().to_owned(), spec: map.spec(family) });
        }
        let statics = static_chains(table, settings);
        for chain in &statics {
            if chain.hook.is_some() || !existing.chains.contains(chain.name) {
                script.push(Command::AddChain { table, name: chain.name.to_owned(), hook: chain.hook });
            }
        }
        for chain in statics {
            if existing.chains.contains(chain.name) {
                script.push(Command::FlushChain { table, name: chain.name.to_owned() });
            }
            for rule in chain.rules {
                script.rule(table, chain.name, rule);
            }
        }
    }
    script.cut(piece)?;

    // The service ports' chains, a batch of one shard per transaction. Chains that exist already
    // are flushed, not redeclared: redeclaring thousands of chains costs the kernel more than
    // their rules. (If `existing` is wrong, the transaction fails, and the next full sync reads
    // the names from the kernel.)
    let mut by_shard: BTreeMap<Table, Vec<&ServicePlan>> = BTreeMap::new();
    for plan in plans {
        by_shard.entry(Table::shard(plan.family, names::shard(&plan.name, SHARDS))).or_default().push(plan);
    }
    for (shard, mut plans) in by_shard {
        plans.sort_by(|a, b| a.name.cmp(&b.name));
        plans.dedup_by(|a, b| a.name == b.name);
        for batch in plans.chunks(SERVICES_PER_TRANSACTION) {
            for plan in batch {
                let mut rules = render_service(plan, settings);
                for (name, spec) in &rules.sets {
                    script.push(Command::AddSet { table: shard, name: name.clone(), spec: spec.clone() });
                }
                for (table, name, _) in rules.all_chains(shard.family) {
                    let name = name.clone();
                    script.push(if existing.get(table).chains.contains(&name) {
                        Command::FlushChain { table, name }
                    } else {
                        Command::AddChain { table, name, hook: None }
                    });
                }
                for (table, name, chain) in rules.all_chains_mut(shard.family) {
                    for rule in chain.take_rules() {
                        script.rule(table, name, rule);
                    }
                }
                services.insert((plan.family, plan.name.clone()), rules);
            }
            script.cut(piece)?;
        }
    }

    // Maps and sets, table by table: refilled at once where they exist (so that no lookup misses
    // in between), in batches where they are new (a service is reachable once its element is in).
    for table in Table::all() {
        let family = table.syntax();
        let existing = existing.get(table);
        // Elements, first claim wins.
        let mut maps: BTreeMap<VerdictMap, BTreeMap<&Key, &Verdict>> = BTreeMap::new();
        for rules in in_table(&services, table) {
            for ((map, key), verdict) in &rules.elements {
                if map.in_shard() == table.shard.is_some() {
                    maps.entry(*map).or_default().entry(key).or_insert(verdict);
                }
            }
        }
        let mut fill = |name: &str, map: bool, known: &BTreeSet<String>, elements: Vec<Element>| {
            if known.contains(name) {
                script.push(Command::FlushSet { table, name: name.to_owned(), map });
                script.elements(true, table, name, elements);
            } else {
                let mut elements = elements.into_iter().peekable();
                while elements.peek().is_some() {
                    script.elements(
                        true,
                        table,
                        name,
                        elements.by_ref().take(ELEMENTS_PER_TRANSACTION).collect(),
                    );
                    script.cut(piece)?;
                }
            }
            Ok(())
        };
        let element = |key: Key| Element { key, verdict: None };
        let excluded = IpNet::aggregate(&family.nets(&settings.excluded_cidrs));
        fill(
            EXCLUDED,
            false,
            &existing.sets,
            excluded.into_iter().map(|n| element(vec![Value::Net(n)])).collect(),
        )?;
        if table.shard.is_none() {
            let hairpin: BTreeSet<&Key> = in_table(&services, table).flat_map(|r| &r.hairpin).collect();
            fill(HAIRPIN, false, &existing.sets, hairpin.into_iter().map(|k| element(k.clone())).collect())?;
        }
        for map in table.maps() {
            let elements = maps
                .get(&map)
                .into_iter()
                .flatten()
                .map(|(k, v)| Element { key: (*k).clone(), verdict: Some((*v).clone()) })
                .collect();
            fill(map.name(), true, &existing.maps, elements)?;
        }
        script.cut(piece)?;
    }

    // What the kernel holds and we no longer want: the maps no longer point at these chains; they
    // are flushed first, since they may jump to each other.
    for (&table, existing) in &existing.tables {
        if !table.is_kept() {
            script.push(Command::DeleteTable(table));
            continue;
        }
        let mut wanted_chains: BTreeSet<&str> =
            static_chains(table, settings).iter().map(|c| c.name).collect();
        let mut wanted_sets: BTreeSet<&str> = table.sets().iter().copied().collect();
        for rules in in_table(&services, table) {
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
            script.push(Command::FlushChain { table, name: (*chain).clone() });
        }
        for chain in stale_chains {
            script.push(Command::DeleteChain { table, name: chain.clone() });
        }
        for set in existing.sets.iter().filter(|s| !wanted_sets.contains(s.as_str())) {
            script.push(Command::DeleteSet { table, name: set.clone(), map: false });
        }
        let wanted_maps: BTreeSet<&str> = table.maps().map(VerdictMap::name).collect();
        for map in existing.maps.iter().filter(|m| !wanted_maps.contains(m.as_str())) {
            script.push(Command::DeleteSet { table, name: map.clone(), map: true });
        }
    }
    script.cut(piece)?;
    Ok(RenderedState { settings: settings.clone(), services })
}

/// [`render_full_with`], all pieces in one rendering (the transactions run in order are the same).
pub fn render_full(plans: &[ServicePlan], settings: &NodeSettings, existing: &KernelObjects) -> Rendering {
    let mut commands = Vec::new();
    let mut lines = 0;
    let rendered = render_full_with(plans, settings, existing, &mut |piece, n| {
        commands.extend(piece);
        lines += n;
        Ok::<_, std::convert::Infallible>(())
    });
    let Ok(state) = rendered;
    Rendering { commands, lines, state, full: true }
}

/// What a partial sync changes in one table.
#[derive(Default)]
struct TableChanges<'a> {
    add_sets: Vec<(&'a String, &'a SetSpec)>,
    new_chains: Vec<(&'a String, &'a ChainRules)>,
    rewrite_chains: Vec<(&'a String, &'a ChainRules)>,
    delete_elements: BTreeMap<VerdictMap, Vec<Element>>,
    add_elements: BTreeMap<VerdictMap, Vec<Element>>,
    add_hairpin: BTreeSet<&'a Key>,
    delete_hairpin: BTreeSet<&'a Key>,
    delete_chains: Vec<&'a String>,
    delete_sets: Vec<&'a String>,
}

impl TableChanges<'_> {
    /// The commands, in an order the kernel accepts: what is referred to exists before the
    /// reference and goes after it.
    fn write(self, table: Table, script: &mut Script) {
        for (name, spec) in self.add_sets {
            script.push(Command::AddSet { table, name: name.clone(), spec: spec.clone() });
        }
        for (name, _) in &self.new_chains {
            script.push(Command::AddChain { table, name: (*name).clone(), hook: None });
        }
        for (name, _) in &self.rewrite_chains {
            script.push(Command::FlushChain { table, name: (*name).clone() });
        }
        for (name, rules) in self.new_chains.iter().chain(&self.rewrite_chains) {
            for rule in &rules.rules {
                script.rule(table, name, rule.clone());
            }
        }
        // Removals before additions: a key whose verdict changed is deleted, then re-added.
        for (map, keys) in self.delete_elements {
            script.elements(false, table, map.name(), keys);
        }
        for (map, elements) in self.add_elements {
            script.elements(true, table, map.name(), elements);
        }
        let hairpin = |keys: BTreeSet<&Key>| {
            keys.into_iter().map(|k| Element { key: k.clone(), verdict: None }).collect()
        };
        script.elements(false, table, HAIRPIN, hairpin(self.delete_hairpin));
        script.elements(true, table, HAIRPIN, hairpin(self.add_hairpin));
        // Chains go before sets: a chain being deleted may still refer to a set being deleted.
        for name in &self.delete_chains {
            script.push(Command::FlushChain { table, name: (*name).clone() });
        }
        for name in self.delete_chains {
            script.push(Command::DeleteChain { table, name: name.clone() });
        }
        for name in self.delete_sets {
            script.push(Command::DeleteSet { table, name: name.clone(), map: false });
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
    let mut fresh = render_changed(plans, &previous.settings, changed);
    let mut state = previous;
    let mut script = Script::default();
    let empty = ServiceRules::default();
    let mut ops: BTreeMap<Table, TableChanges<'_>> = BTreeMap::new();

    for family in Family::BOTH.map(|f| f.0) {
        let keys: BTreeSet<(IpFamily, ServicePortName)> =
            changed.iter().map(|n| (family, n.clone())).collect();
        let mut add_hairpin: BTreeSet<&Key> = BTreeSet::new();
        let mut delete_hairpin: BTreeSet<&Key> = BTreeSet::new();

        for key in &keys {
            let old = state.services.get(key).unwrap_or(&empty);
            let new = fresh.get(key).unwrap_or(&empty);
            for (name, spec) in &new.sets {
                if !old.sets.contains_key(name) {
                    ops.entry(new.shard_table(family)).or_default().add_sets.push((name, spec));
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
                    changes
                        .delete_elements
                        .entry(*map)
                        .or_default()
                        .push(Element { key: k.clone(), verdict: None });
                }
            }
            for ((map, k), verdict) in &new.elements {
                if old.elements.get(&(*map, k.clone())) != Some(verdict) {
                    let changes = ops.entry(new.map_table(family, *map)).or_default();
                    let element = Element { key: k.clone(), verdict: Some(verdict.clone()) };
                    changes.add_elements.entry(*map).or_default().push(element);
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
            let still_wanted = |e: &Key| {
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
    for (table, changes) in ops {
        changes.write(table, &mut script);
    }

    // The new state: the changed service ports' rules replace (or remove) their old ones, without
    // their rules (the digests stay).
    for family in Family::BOTH {
        for name in changed {
            state.services.remove(&(family.0, name.clone()));
        }
    }
    for rules in fresh.values_mut() {
        for (_, _, chain) in rules.all_chains_mut(IpFamily::V4) {
            chain.take_rules();
        }
    }
    state.services.extend(fresh);
    Rendering { lines: script.lines, commands: script.commands, state, full: false }
}
