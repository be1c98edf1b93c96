//! The pure iptables renderer: service plans of one address family → `iptables-restore --noflush`
//! input for the `filter` and `nat` tables, laid out as kube-proxy's iptables proxier lays out its
//! rules, with our own `FP-` chain prefix.
//!
//! # Chains
//! | table  | chain                    | role                                                              |
//! |--------|--------------------------|-------------------------------------------------------------------|
//! | nat    | `FP-SERVICES`            | dispatch on destination (cluster, external, load-balancer IPs)    |
//! | nat    | `FP-NODEPORTS`           | dispatch on node ports (last rule of `FP-SERVICES`, local dst)    |
//! | nat    | `FP-POSTROUTING`         | masquerade packets carrying the masquerade mark                   |
//! | nat    | `FP-MARK-MASQ`           | set the masquerade mark                                           |
//! | nat    | `FP-MARK-MASQ-OFFCLUSTER`| mark unless the source is in a cluster CIDR (only with 2+ CIDRs)  |
//! | nat    | `FP-SVC-<hash>`          | load balancing over the cluster-traffic endpoints                 |
//! | nat    | `FP-SVX-<hash>`          | load balancing over the external-traffic endpoints, when they differ (Local policy) |
//! | nat    | `FP-EXT-<hash>`          | external traffic: masquerade (Cluster policy) or keep the source (Local) |
//! | nat    | `FP-FW-<hash>`           | loadBalancerSourceRanges                                          |
//! | nat    | `FP-SEP-<hash>`          | one endpoint: hairpin masquerade, affinity, DNAT                  |
//! | filter | `FP-SERVICES`            | REJECT cluster IPs without endpoints                              |
//! | filter | `FP-EXTERNAL-SERVICES`   | REJECT/DROP node ports, external and LB IPs without endpoints     |
//! | filter | `FP-FORWARD`             | accept forwarded service traffic                                  |
//! | filter | `FP-PROXY-FIREWALL`      | DROP load-balancer traffic the `FP-FW-` chain did not accept      |
//!
//! Per-service names carry the first 80 bits of a SHA-256 of the service port (and endpoint), in
//! base32, as kube-proxy's do: 16 characters, so `FP-SEP-` + 16 = 23, within iptables' 28.
//!
//! # Partial updates
//! In `iptables-restore --noflush`, a `:CHAIN` line creates the chain, or flushes it if it exists.
//! So a partial render declares (and rewrites) only the chains it writes: the per-service chains of
//! the changed services, and the top-level chains whose rules differ from what the last sync wrote
//! (a digest of each is kept in [`Applied`]). Unlike kube-proxy, which rewrites its top-level chains
//! on every sync, an endpoint change then leaves `FP-SERVICES` and `FP-NODEPORTS` alone: with
//! 10,000 services, rewriting them is 20,000 rules naming 20,000 chains, most of a sync's cost
//! (see "Transactions"). They change when a service is added or removed or gains or loses its
//! endpoints, and are then rewritten whole. Chains of unchanged services are neither declared nor
//! written, so the kernel keeps them as they are; so are the endpoint chains a changed service
//! keeps (a service of 10,000 endpoints that loses one rewrites its `FP-SVC-` chain only, one
//! third of what it wrote before). Chains no longer needed are declared (flushed) and then deleted
//! with `-X` after every rule that referenced them has been rewritten. A full render writes every
//! chain.
//!
//! # Transactions
//! Each `*table ... COMMIT` is one kernel transaction. The filter table is always one. The nat table
//! is one too ([`Split::Never`], and any small sync), unless the render writes many chains and the
//! nf_tables backend runs it ([`Split::Auto`]): iptables-nft 1.8 keeps, per transaction, a sorted
//! linked list of every chain a command names (its chain and jump target), for the cache it fetches
//! at `COMMIT`, and inserts into it by walking it from the start for every command. Only a command
//! without a chain (a table flush: plain `iptables-restore`) switches that list off, and none that
//! leaves foreign rules and counters alone exists; so one `--noflush` transaction costs commands x
//! chains (1,000 Services x 10: 7 s against 0.8 s for the same rules without `--noflush`; 5,000 x
//! 10: 24 minutes). Split, the nat table becomes: the fixed chains, any missing jump rule and the
//! first block of services; further blocks of whole services (each service's chains in one
//! transaction); the dispatch chains, which make the new services reachable; then the stale chains,
//! flushed, then deleted. Every state in between is consistent per service, but the sync as a whole
//! is not atomic. iptables-legacy gets one transaction: there each one replaces the whole table.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::{
    model::{IpFamily, Protocol, ServicePortName},
    policy::{NodeSettings, ServicePlan, Target},
};

/// Every chain of ours starts with this.
pub const CHAIN_PREFIX: &str = "FP-";
pub const SERVICES: &str = "FP-SERVICES";
pub const EXTERNAL_SERVICES: &str = "FP-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "FP-NODEPORTS";
pub const POSTROUTING: &str = "FP-POSTROUTING";
pub const MARK_MASQ: &str = "FP-MARK-MASQ";
pub const MARK_MASQ_OFF_CLUSTER: &str = "FP-MARK-MASQ-OFFCLUSTER";
pub const FORWARD: &str = "FP-FORWARD";
pub const PROXY_FIREWALL: &str = "FP-PROXY-FIREWALL";

/// Top-level nat chains (and `FP-MARK-MASQ-OFFCLUSTER` with 2+ cluster CIDRs).
const NAT_CHAINS: [&str; 4] = [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ];
/// Filter chains.
pub const FILTER_CHAINS: [&str; 4] = [SERVICES, EXTERNAL_SERVICES, FORWARD, PROXY_FIREWALL];

/// Above this many endpoints (all services, this family), per-endpoint rules go without comments,
/// as in kube-proxy's large-cluster mode: they make up most of the payload.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Filter,
    Nat,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Filter => "filter",
            Self::Nat => "nat",
        }
    }
}

/// A rule in a builtin chain that sends traffic into one of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpRule {
    pub table: Table,
    /// The builtin chain (`PREROUTING`, `INPUT`, ...).
    pub chain: &'static str,
    /// Our chain it jumps to.
    pub target: &'static str,
    /// The matches, as `iptables-save` prints them.
    pub matches: &'static str,
}

impl JumpRule {
    /// The rule spec after the chain name: matches and `-j target`.
    pub fn spec(&self) -> String {
        format!("{} -j {}", self.matches, self.target)
    }
}

/// Our jump rules, in the order they should end up in each builtin chain (all at its top).
pub const JUMP_RULES: [JumpRule; 11] = {
    const PORTALS: &str = "-m comment --comment \"fleetproxy service portals\"";
    const NEW_PORTALS: &str =
        "-m conntrack --ctstate NEW -m comment --comment \"fleetproxy service portals\"";
    const NEW_EXTERNAL: &str =
        "-m conntrack --ctstate NEW -m comment --comment \"fleetproxy externally-visible service portals\"";
    const NEW_FIREWALL: &str =
        "-m conntrack --ctstate NEW -m comment --comment \"fleetproxy load balancer firewall\"";
    const fn jump(
        table: Table,
        chain: &'static str,
        target: &'static str,
        matches: &'static str,
    ) -> JumpRule {
        JumpRule { table, chain, target, matches }
    }
    [
        jump(Table::Nat, "PREROUTING", SERVICES, PORTALS),
        jump(Table::Nat, "OUTPUT", SERVICES, PORTALS),
        jump(Table::Nat, "POSTROUTING", POSTROUTING, "-m comment --comment \"fleetproxy postrouting rules\""),
        jump(Table::Filter, "INPUT", PROXY_FIREWALL, NEW_FIREWALL),
        jump(Table::Filter, "INPUT", EXTERNAL_SERVICES, NEW_EXTERNAL),
        jump(Table::Filter, "FORWARD", PROXY_FIREWALL, NEW_FIREWALL),
        jump(Table::Filter, "FORWARD", FORWARD, "-m comment --comment \"fleetproxy forwarding rules\""),
        jump(Table::Filter, "FORWARD", SERVICES, NEW_PORTALS),
        jump(Table::Filter, "FORWARD", EXTERNAL_SERVICES, NEW_EXTERNAL),
        jump(Table::Filter, "OUTPUT", PROXY_FIREWALL, NEW_FIREWALL),
        jump(Table::Filter, "OUTPUT", SERVICES, NEW_PORTALS),
    ]
};

/// What the kernel holds of ours, as read from `iptables-save` before a full sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelChains {
    /// Our chains in the nat table.
    pub nat: BTreeSet<String>,
    /// Our chains in the filter table.
    pub filter: BTreeSet<String>,
    /// Jump rules present: (table, builtin chain, our target chain).
    pub jumps: BTreeSet<(Table, String, String)>,
}

/// The nat chains each service port owns (per family), as last written.
pub type ServiceChains = BTreeMap<ServicePortName, BTreeSet<String>>;

/// SHA-256 of a chain's rules (its `-A` lines).
pub type ChainDigest = [u8; 32];

/// The digest of each top-level chain's rules (filter and nat, by table and name), as last written.
pub type FixedChains = BTreeMap<(Table, &'static str), ChainDigest>;

/// What the last successful render of one family wrote, as the next partial render needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub service_chains: ServiceChains,
    /// A partial render leaves out the top-level chains whose digest did not change.
    pub fixed_chains: FixedChains,
    /// Whether endpoint chains carry comments ([`LARGE_CLUSTER_ENDPOINTS`]).
    pub endpoint_comments: bool,
    /// The session affinity timeout (seconds) of the service ports that have one. With
    /// `endpoint_comments`, all that an endpoint chain's rules depend on besides what its name
    /// hashes: a changed service rewrites only the endpoint chains that these make differ.
    pub affinity: BTreeMap<ServicePortName, u64>,
}

/// How much to render.
#[derive(Clone, Copy, Debug)]
pub enum Mode<'a> {
    /// Rewrite every chain of ours, add missing jump rules, delete the chains of ours in `existing`
    /// that this render does not produce.
    Full { existing: &'a KernelChains },
    /// Rewrite the chains of the `changed` service ports and the top-level chains whose rules
    /// changed, only; `previous` is what the last successful sync wrote (to delete what a changed
    /// service no longer needs, and to compare the top-level chains with).
    Partial { changed: &'a BTreeSet<ServicePortName>, previous: &'a Applied },
}

/// A rendered transaction for one address family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    /// `iptables-restore --noflush` input: `*filter ... COMMIT`, `*nat ... COMMIT`; empty when a
    /// partial render has nothing to change.
    pub text: String,
    /// Lines in `text`.
    pub lines: usize,
    /// What the kernel holds of this family once `text` is applied.
    pub applied: Applied,
}

/// The first 80 bits of SHA-256 of `input`, in RFC 4648 base32: 16 characters `A-Z2-7`.
pub fn hash16(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(input.as_bytes());
    let mut bits: u128 = 0;
    for byte in &digest[..10] {
        bits = (bits << 8) | u128::from(*byte);
    }
    (0..16).rev().map(|i| char::from(ALPHABET[((bits >> (5 * i)) & 31) as usize])).collect()
}

/// kube-proxy's "namespace/name:port" + protocol, the input of every per-service hash.
fn service_key(name: &ServicePortName, protocol: Protocol) -> String {
    format!("{}/{}:{}{}", name.namespace, name.name, name.port, protocol.as_str())
}

/// `FP-<kind>-<hash of the service port>` (kind: SVC, SVX, EXT, FW).
pub fn service_chain(kind: &str, name: &ServicePortName, protocol: Protocol) -> String {
    format!("{CHAIN_PREFIX}{kind}-{}", hash16(&service_key(name, protocol)))
}

/// `FP-SEP-<hash of the service port and endpoint>`.
pub fn endpoint_chain(name: &ServicePortName, protocol: Protocol, target: &Target) -> String {
    let endpoint = SocketAddr::new(target.ip, target.port);
    format!("{SEP_PREFIX}{}", hash16(&format!("{}{endpoint}", service_key(name, protocol))))
}

const SEP_PREFIX: &str = "FP-SEP-";

/// Whether `chain` is a per-service chain of ours (the kind a stale-chain sweep may delete).
pub fn is_service_chain(chain: &str) -> bool {
    ["SVC-", "SVX-", "EXT-", "FW-", "SEP-"]
        .iter()
        .any(|kind| chain.strip_prefix(CHAIN_PREFIX).is_some_and(|rest| rest.starts_with(kind)))
}

/// kube-proxy's probability formatting: 1/n with ten decimals.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Names of one plan's nat chains.
struct Names {
    svc: String,
    svx: String,
    ext: String,
    fw: String,
}

impl Names {
    fn of(plan: &ServicePlan) -> Self {
        let key = service_key(&plan.name, plan.protocol);
        let hash = hash16(&key);
        Self {
            svc: format!("{CHAIN_PREFIX}SVC-{hash}"),
            svx: format!("{CHAIN_PREFIX}SVX-{hash}"),
            ext: format!("{CHAIN_PREFIX}EXT-{hash}"),
            fw: format!("{CHAIN_PREFIX}FW-{hash}"),
        }
    }
}

/// What a plan needs, decided once.
struct Shape {
    has_cluster: bool,
    /// External traffic balances over its own chain (its targets differ from cluster traffic's).
    separate_external: bool,
    uses_ext: bool,
    uses_fw: bool,
}

impl Shape {
    fn of(plan: &ServicePlan) -> Self {
        let has_cluster = !plan.cluster_targets.is_empty();
        let has_external = !plan.external_targets.is_empty();
        let separate_external = has_external && plan.external_targets != plan.cluster_targets;
        let uses_ext = has_external && plan.has_external();
        let uses_fw =
            uses_ext && !plan.load_balancer_ips.is_empty() && !plan.load_balancer_source_ranges.is_empty();
        Self { has_cluster, separate_external, uses_ext, uses_fw }
    }

    /// The chain external traffic is balanced by.
    fn external_lb<'n>(&self, names: &'n Names) -> &'n str {
        if self.separate_external { &names.svx } else { &names.svc }
    }
}

/// The nat chains a plan owns.
fn plan_chains(plan: &ServicePlan) -> BTreeSet<String> {
    let names = Names::of(plan);
    let shape = Shape::of(plan);
    let mut chains = BTreeSet::new();
    if shape.has_cluster {
        chains.insert(names.svc.clone());
    }
    if shape.separate_external {
        chains.insert(names.svx.clone());
    }
    if shape.uses_ext {
        chains.insert(names.ext.clone());
    }
    if shape.uses_fw {
        chains.insert(names.fw.clone());
    }
    let mut targets: Vec<&Target> = Vec::new();
    if shape.has_cluster {
        targets.extend(&plan.cluster_targets);
    }
    if shape.separate_external {
        targets.extend(&plan.external_targets);
    }
    for target in targets {
        chains.insert(endpoint_chain(&plan.name, plan.protocol, target));
    }
    chains
}

/// Node-wide settings narrowed to one family.
struct Ctx {
    family: IpFamily,
    excluded: Vec<IpNet>,
    cluster_cidrs: Vec<IpNet>,
    node_port_addresses: Vec<IpNet>,
    masquerade_all: bool,
    /// `0x4000`
    mark: String,
    endpoint_comments: bool,
}

impl Ctx {
    fn new(family: IpFamily, settings: &NodeSettings, endpoints: usize) -> Self {
        let of_family =
            |nets: &[IpNet]| nets.iter().filter(|n| IpFamily::of_net(n) == family).copied().collect();
        Self {
            family,
            excluded: of_family(&settings.excluded_cidrs),
            cluster_cidrs: of_family(&settings.cluster_cidrs),
            node_port_addresses: of_family(&settings.node_port_addresses),
            masquerade_all: settings.masquerade_all,
            mark: format!("{:#x}", 1u32 << u32::from(settings.masquerade_bit.min(31))),
            endpoint_comments: endpoints <= LARGE_CLUSTER_ENDPOINTS,
        }
    }

    /// The rule that marks cluster-IP traffic for masquerading, if any: `-j FP-MARK-MASQ` for
    /// everything, or only for sources outside the cluster CIDRs.
    fn cluster_masq(&self) -> Option<String> {
        if self.masquerade_all {
            Some(format!("-j {MARK_MASQ}"))
        } else {
            match self.cluster_cidrs.as_slice() {
                [] => None,
                [one] => Some(format!("! -s {one} -j {MARK_MASQ}")),
                _ => Some(format!("-j {MARK_MASQ_OFF_CLUSTER}")),
            }
        }
    }

    fn reject(&self, protocol: Protocol) -> &'static str {
        match protocol {
            Protocol::Tcp => "REJECT --reject-with tcp-reset",
            Protocol::Udp | Protocol::Sctp => match self.family {
                IpFamily::V4 => "REJECT --reject-with icmp-port-unreachable",
                IpFamily::V6 => "REJECT --reject-with icmp6-port-unreachable",
            },
        }
    }
}

/// A host address or a network, as iptables wants it after `-d`/`-s`.
fn addr(ip: &IpAddr) -> String {
    ip.to_string()
}

/// An iptables-restore section being built: chain declarations, then rules, then deletions.
#[derive(Default)]
struct Section {
    chains: String,
    head: String,
    rules: String,
    tail: String,
}

impl Section {
    fn chain(&mut self, name: &str) {
        declare(&mut self.chains, name);
    }

    fn rule(&mut self, chain: &str, spec: &str) {
        let _ = writeln!(self.rules, "-A {chain} {spec}");
    }

    fn insert(&mut self, chain: &str, spec: &str) {
        let _ = writeln!(self.head, "-I {chain} 1 {spec}");
    }

    /// Flushes (by declaring) and deletes `name` after every rule has been rewritten.
    fn delete(&mut self, name: &str) {
        self.chain(name);
        let _ = writeln!(self.tail, "-X {name}");
    }

    fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.head.is_empty() && self.rules.is_empty() && self.tail.is_empty()
    }

    fn finish(self, table: Table, out: &mut String) {
        let _ = writeln!(out, "*{}", table.as_str());
        out.push_str(&self.chains);
        out.push_str(&self.head);
        out.push_str(&self.rules);
        out.push_str(&self.tail);
        out.push_str("COMMIT\n");
    }
}

/// `:name - [0:0]`: creates the chain, or flushes it if it exists.
fn declare(out: &mut String, name: &str) {
    let _ = writeln!(out, ":{name} - [0:0]");
}

/// Chains per nat transaction below which splitting is not worth a commit.
const MIN_BLOCK_CHAINS: usize = 256;

/// How [`render`] lays out the nat table (see "Transactions" above).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// One transaction per table, whatever the size: for iptables-legacy, where every transaction
    /// replaces the whole table.
    Never,
    /// Per-service chains in transactions sized from the ruleset: for the nf_tables backend.
    Auto,
    /// Per-service chains in transactions of at most this many chains (at least one service each).
    Chains(usize),
}

impl Split {
    /// The most per-service chains one transaction may write, if the render is to be split.
    ///
    /// Each command costs iptables-nft a walk over the chains its transaction names, and each commit
    /// costs the kernel a walk over every chain of the table (a validation of every rule reachable
    /// from the builtin chains, once ours are): blocks of about `sqrt(k * chains)` balance the two.
    /// `k` was measured at 1,000 and 10,000 Services x 10 endpoints: about 20 for a first sync,
    /// where the blocks are not reachable until the last transaction, about 120 over a full ruleset.
    fn block(self, total: usize, in_kernel: usize) -> Option<usize> {
        match self {
            Self::Never => None,
            Self::Chains(n) => Some(n.max(1)),
            Self::Auto => {
                let reachable = in_kernel.min(total) as f64 / total.max(1) as f64;
                let k = 20.0 + 100.0 * reachable;
                Some(((k * total as f64).sqrt() as usize).max(MIN_BLOCK_CHAINS))
            }
        }
    }
}

/// The nat table of one render, before it is laid out in transactions.
struct Nat<'a> {
    /// `-I` jump rules into builtin chains.
    head: String,
    /// The fixed chains written (of `FP-POSTROUTING`, `FP-MARK-MASQ`, `FP-MARK-MASQ-OFFCLUSTER`).
    fixed_chains: Vec<&'static str>,
    /// Their rules.
    fixed: String,
    /// `FP-SERVICES` is not in the kernel yet (a jump rule into it may come first).
    services_missing: bool,
    /// The dispatch chains written (of `FP-SERVICES` and `FP-NODEPORTS`).
    dispatch_chains: Vec<&'static str>,
    /// Their rules.
    dispatch: String,
    /// The plans whose chains are written, in order. Their rules are rendered straight into the
    /// output as it is laid out (at 10,000 services they are 27 MB: not held twice).
    written: Vec<Written<'a>>,
    /// Chains of ours to delete.
    stale: BTreeSet<&'a str>,
}

/// One plan whose chains a render writes.
struct Written<'a> {
    plan: &'a ServicePlan,
    /// Its endpoint chains that the kernel holds as they would be written: neither declared nor
    /// written.
    kept: BTreeSet<&'a str>,
}

impl Written<'_> {
    /// The chains it declares (creates or flushes) and writes.
    fn chains<'c>(&self, all: &'c ServiceChains) -> impl Iterator<Item = &'c str> {
        all[&self.plan.name].iter().map(String::as_str).filter(|c| !self.kept.contains(c))
    }
}

/// Appends the rules of `plans`' chains to `out`.
fn write_written(ctx: &Ctx, plans: &[Written<'_>], out: &mut String) {
    let mut section = Section { rules: std::mem::take(out), ..Section::default() };
    for written in plans {
        write_service_chains(ctx, written.plan, &written.kept, &mut section);
    }
    *out = section.rules;
}

impl Nat<'_> {
    /// Everything in one transaction, in rule order; nothing if there is nothing to write.
    fn single(&self, ctx: &Ctx, chains: &ServiceChains, out: &mut String) {
        if self.dispatch_chains.is_empty()
            && self.fixed_chains.is_empty()
            && self.written.is_empty()
            && self.stale.is_empty()
            && self.head.is_empty()
        {
            return;
        }
        out.push_str("*nat\n");
        for chain in self.dispatch_chains.iter().chain(&self.fixed_chains) {
            declare(out, chain);
        }
        for plan in &self.written {
            for chain in plan.chains(chains) {
                declare(out, chain);
            }
        }
        for chain in &self.stale {
            declare(out, chain);
        }
        out.push_str(&self.head);
        out.push_str(&self.fixed);
        out.push_str(&self.dispatch);
        write_written(ctx, &self.written, out);
        for chain in &self.stale {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }

    /// Several transactions: the fixed chains, missing jump rules and the first block of services;
    /// the other blocks; the dispatch chains (if written); then the stale chains, flushed and deleted. Each
    /// service's chains are rewritten together and the dispatch chains last, so every state in
    /// between sends traffic to a consistent set of chains. Declarations come in descending order:
    /// each one is then the first in iptables-nft's sorted list of the transaction's chains.
    fn split(&self, ctx: &Ctx, chains: &ServiceChains, block: usize, out: &mut String) {
        let mut blocks: Vec<&[Written<'_>]> = Vec::new();
        let (mut start, mut size) = (0, 0);
        for (i, plan) in self.written.iter().enumerate() {
            let n = plan.chains(chains).count();
            if size > 0 && size + n > block {
                blocks.push(&self.written[start..i]);
                (start, size) = (i, 0);
            }
            size += n;
        }
        blocks.push(&self.written[start..]);

        for (i, plans) in blocks.iter().enumerate() {
            let mut names: Vec<&str> = plans.iter().flat_map(|plan| plan.chains(chains)).collect();
            if i == 0 {
                // A loop, not `extend`: that would make every name `'static`.
                for &chain in &self.fixed_chains {
                    names.push(chain);
                }
                if self.services_missing {
                    names.push(SERVICES);
                }
            }
            names.sort_unstable_by(|a, b| b.cmp(a));
            out.push_str("*nat\n");
            for chain in names {
                declare(out, chain);
            }
            if i == 0 {
                out.push_str(&self.head);
                out.push_str(&self.fixed);
            }
            write_written(ctx, plans, out);
            out.push_str("COMMIT\n");
        }

        if !self.dispatch_chains.is_empty() {
            out.push_str("*nat\n");
            for chain in &self.dispatch_chains {
                declare(out, chain);
            }
            out.push_str(&self.dispatch);
            out.push_str("COMMIT\n");
        }

        // Nothing references the stale chains any more.
        if !self.stale.is_empty() {
            out.push_str("*nat\n");
            for chain in self.stale.iter().rev() {
                declare(out, chain);
            }
            out.push_str("COMMIT\n*nat\n");
            for chain in self.stale.iter().rev() {
                let _ = writeln!(out, "-X {chain}");
            }
            out.push_str("COMMIT\n");
        }
    }
}

/// Renders the plans of `family` (plans of the other family are ignored).
pub fn render(
    family: IpFamily,
    plans: &[ServicePlan],
    settings: &NodeSettings,
    mode: &Mode<'_>,
    split: Split,
) -> Rendered {
    let mut plans: Vec<&ServicePlan> = plans.iter().filter(|p| p.family == family).collect();
    plans.sort_by(|a, b| a.name.cmp(&b.name));
    let endpoints = plans.iter().map(|p| p.cluster_targets.len().max(p.external_targets.len())).sum();
    let ctx = Ctx::new(family, settings, endpoints);

    let mut filter = Section::default();
    // nat: only its head (jump rules) and rules (fixed chains) are used.
    let mut nat = Section::default();
    let off_cluster = !ctx.masquerade_all && ctx.cluster_cidrs.len() > 1;

    if let Mode::Full { existing } = mode {
        // Inserted at the top in reverse, so they end up in JUMP_RULES order.
        for jump in JUMP_RULES.iter().rev() {
            if !existing.jumps.contains(&(jump.table, jump.chain.to_owned(), jump.target.to_owned())) {
                let section = if jump.table == Table::Nat { &mut nat } else { &mut filter };
                section.insert(jump.chain, &jump.spec());
            }
        }
    }

    write_fixed_rules(&ctx, &mut filter, &mut nat, off_cluster);

    // Per-service chains: which to write, which the kernel keeps, which go.
    let mut service_chains = ServiceChains::new();
    let mut dispatch = Dispatch::default();
    let mut written = Vec::new();
    let mut affinity = BTreeMap::new();
    for plan in &plans {
        let affinity_secs = plan.session_affinity.map(|t| t.as_secs().max(1));
        let (write_chains, kept) = match mode {
            Mode::Full { .. } => (true, BTreeSet::new()),
            Mode::Partial { changed, previous } => match previous.service_chains.get(&plan.name) {
                None => (true, BTreeSet::new()),
                Some(_) if !changed.contains(&plan.name) => (false, BTreeSet::new()),
                Some(old) => {
                    let same = previous.endpoint_comments == ctx.endpoint_comments
                        && previous.affinity.get(&plan.name).copied() == affinity_secs;
                    let seps = old.iter().map(String::as_str).filter(|c| c.starts_with(SEP_PREFIX));
                    (true, if same { seps.collect() } else { BTreeSet::new() })
                }
            },
        };
        write_dispatch(&ctx, plan, &mut dispatch, &mut filter);
        if write_chains {
            written.push(Written { plan, kept });
        }
        service_chains.insert(plan.name.clone(), plan_chains(plan));
        if let Some(secs) = affinity_secs {
            affinity.insert(plan.name.clone(), secs);
        }
    }

    // Deletions: chains of ours that nothing produces any more.
    let mut stale: BTreeSet<&str> = BTreeSet::new();
    let active: BTreeSet<&str> = service_chains.values().flatten().map(String::as_str).collect();
    let in_kernel = match mode {
        Mode::Full { existing } => {
            let mut keep: BTreeSet<&str> = active.clone();
            keep.extend(NAT_CHAINS);
            if off_cluster {
                keep.insert(MARK_MASQ_OFF_CLUSTER);
            }
            stale.extend(existing.nat.iter().map(String::as_str).filter(|c| !keep.contains(c)));
            for chain in existing.filter.iter().filter(|c| !FILTER_CHAINS.contains(&c.as_str())) {
                filter.delete(chain);
            }
            existing.nat.len()
        }
        Mode::Partial { changed, previous } => {
            for name in changed.iter() {
                if let Some(old) = previous.service_chains.get(name) {
                    stale.extend(old.iter().map(String::as_str).filter(|c| !active.contains(c)));
                }
            }
            previous.service_chains.values().map(BTreeSet::len).sum()
        }
    };

    // The dispatch rules: excluded CIDRs first, node ports last.
    let mut dispatch_rules = Section::default();
    for net in &ctx.excluded {
        dispatch_rules.rule(
            SERVICES,
            &format!("-m comment --comment \"excluded CIDR, never intercepted\" -d {net} -j RETURN"),
        );
    }
    dispatch_rules.rules.push_str(&dispatch.services);
    if ctx.node_port_addresses.is_empty() {
        dispatch_rules.rule(
            SERVICES,
            &format!(
                "-m comment --comment \"fleetproxy service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j {NODEPORTS}"
            ),
        );
    } else {
        for net in &ctx.node_port_addresses {
            dispatch_rules.rule(
                SERVICES,
                &format!("-m comment --comment \"fleetproxy service nodeports\" -d {net} -m addrtype --dst-type LOCAL -j {NODEPORTS}"),
            );
        }
    }
    dispatch_rules.rules.push_str(&dispatch.nodeports);

    // Top-level chains: a partial render leaves out (neither declares nor writes) those whose rules
    // are what the kernel holds already; with 10,000 services the dispatch chains are most of the
    // cost of a sync otherwise.
    let mut fixed_chains = FixedChains::new();
    let (filter_chains, filter_rules) =
        changed_chains(Table::Filter, &FILTER_CHAINS, filter.rules, mode, &mut fixed_chains);
    let mut declarations = String::new();
    for chain in filter_chains {
        declare(&mut declarations, chain);
    }
    // Before the declarations of the chains to delete.
    filter.chains.insert_str(0, &declarations);
    filter.rules = filter_rules;
    let fixed_nat: Vec<&'static str> =
        [POSTROUTING, MARK_MASQ].into_iter().chain(off_cluster.then_some(MARK_MASQ_OFF_CLUSTER)).collect();
    let (fixed_nat, fixed_rules) = changed_chains(Table::Nat, &fixed_nat, nat.rules, mode, &mut fixed_chains);
    let (dispatch_chains, dispatch_rules) =
        changed_chains(Table::Nat, &[SERVICES, NODEPORTS], dispatch_rules.rules, mode, &mut fixed_chains);

    let nat = Nat {
        head: nat.head,
        fixed_chains: fixed_nat,
        fixed: fixed_rules,
        services_missing: matches!(mode, Mode::Full { existing } if !existing.nat.contains(SERVICES)),
        dispatch_chains,
        dispatch: dispatch_rules,
        written,
        stale,
    };
    let total = active.len() + NAT_CHAINS.len() + usize::from(off_cluster);
    let writing: usize = nat.written.iter().map(|plan| plan.chains(&service_chains).count()).sum();

    let mut text = String::with_capacity(filter.rules.len() + nat.dispatch.len() + 1024);
    if !filter.is_empty() {
        filter.finish(Table::Filter, &mut text);
    }
    match split.block(total, in_kernel).filter(|&block| writing > block) {
        Some(block) => nat.split(&ctx, &service_chains, block, &mut text),
        None => nat.single(&ctx, &service_chains, &mut text),
    }
    let lines = text.bytes().filter(|&b| b == b'\n').count();
    let endpoint_comments = ctx.endpoint_comments;
    Rendered { text, lines, applied: Applied { service_chains, fixed_chains, endpoint_comments, affinity } }
}

/// The chain a rule line (`-A chain ...`) belongs to.
fn chain_of(line: &str) -> Option<&str> {
    line.strip_prefix("-A ")?.split(' ').next()
}

/// Records the digest of each of `chains`' rules (in `rules`) into `digests`; returns the chains
/// to write and their rules: all in a full render, those whose digest changed in a partial one.
fn changed_chains(
    table: Table,
    chains: &[&'static str],
    rules: String,
    mode: &Mode<'_>,
    digests: &mut FixedChains,
) -> (Vec<&'static str>, String) {
    let mut hashers: Vec<Sha256> = chains.iter().map(|_| Sha256::new()).collect();
    for line in rules.lines() {
        if let Some(i) = chain_of(line).and_then(|c| chains.iter().position(|&name| name == c)) {
            hashers[i].update(line.as_bytes());
            hashers[i].update(b"\n");
        }
    }
    let mut write = Vec::new();
    for (&chain, hasher) in chains.iter().zip(hashers) {
        let digest: ChainDigest = hasher.finalize().into();
        let unchanged = match mode {
            Mode::Full { .. } => false,
            Mode::Partial { previous, .. } => previous.fixed_chains.get(&(table, chain)) == Some(&digest),
        };
        if !unchanged {
            write.push(chain);
        }
        digests.insert((table, chain), digest);
    }
    if write.len() == chains.len() {
        return (write, rules);
    }
    let kept = rules.split_inclusive('\n').filter(|line| chain_of(line).is_some_and(|c| write.contains(&c)));
    let kept = kept.collect();
    (write, kept)
}

/// Rules of the fixed chains (masquerading, forwarding, excluded CIDRs in filter).
fn write_fixed_rules(ctx: &Ctx, filter: &mut Section, nat: &mut Section, off_cluster: bool) {
    let mark = &ctx.mark;
    for net in &ctx.excluded {
        for chain in [SERVICES, EXTERNAL_SERVICES, PROXY_FIREWALL] {
            filter.rule(
                chain,
                &format!("-m comment --comment \"excluded CIDR, never intercepted\" -d {net} -j RETURN"),
            );
        }
    }
    filter.rule(FORWARD, "-m conntrack --ctstate INVALID -j DROP");
    filter.rule(
        FORWARD,
        &format!(
            "-m comment --comment \"fleetproxy forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
        ),
    );
    filter.rule(
        FORWARD,
        "-m comment --comment \"fleetproxy forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    );

    nat.rule(POSTROUTING, &format!("-m mark ! --mark {mark}/{mark} -j RETURN"));
    // Clear the mark so that a packet that comes back through the stack is not masqueraded twice.
    nat.rule(POSTROUTING, &format!("-j MARK --set-xmark {mark}/0x0"));
    nat.rule(
        POSTROUTING,
        "-m comment --comment \"fleetproxy service traffic requiring SNAT\" -j MASQUERADE --random-fully",
    );
    nat.rule(MARK_MASQ, &format!("-j MARK --set-xmark {mark}/{mark}"));
    if off_cluster {
        for net in &ctx.cluster_cidrs {
            nat.rule(MARK_MASQ_OFF_CLUSTER, &format!("-s {net} -j RETURN"));
        }
        nat.rule(MARK_MASQ_OFF_CLUSTER, &format!("-j {MARK_MASQ}"));
    }
}

/// nat rules of the dispatch chains, kept apart so that they can follow the excluded-CIDR rules.
#[derive(Default)]
struct Dispatch {
    services: String,
    nodeports: String,
}

impl Dispatch {
    fn service(&mut self, spec: &str) {
        let _ = writeln!(self.services, "-A {SERVICES} {spec}");
    }

    fn nodeport(&mut self, spec: &str) {
        let _ = writeln!(self.nodeports, "-A {NODEPORTS} {spec}");
    }
}

/// The dispatch rules of one plan (nat `FP-SERVICES`, `FP-NODEPORTS`) and its filter rules.
fn write_dispatch(ctx: &Ctx, plan: &ServicePlan, dispatch: &mut Dispatch, filter: &mut Section) {
    let names = Names::of(plan);
    let shape = Shape::of(plan);
    let name = plan.name.to_string();
    let proto = plan.protocol.as_str();
    let port = plan.port;
    let matches = |ip: &IpAddr| format!("-m {proto} -p {proto} -d {} --dport {port}", addr(ip));

    // What traffic without usable endpoints gets: DROP when endpoints exist but not for this kind
    // of traffic (Local policy), REJECT (a fast refusal) when there are none at all.
    let internal_verdict = if plan.internal_policy_local && !plan.external_targets.is_empty() {
        ("has no local endpoints", "DROP")
    } else {
        ("has no endpoints", ctx.reject(plan.protocol))
    };
    let external_verdict = if plan.external_policy_local && !plan.cluster_targets.is_empty() {
        ("has no local endpoints", "DROP")
    } else {
        ("has no endpoints", ctx.reject(plan.protocol))
    };

    for ip in &plan.cluster_ips {
        if shape.has_cluster {
            dispatch.service(&format!(
                "-m comment --comment \"{name} cluster IP\" {} -j {}",
                matches(ip),
                names.svc
            ));
        } else {
            let (why, verdict) = internal_verdict;
            filter.rule(
                SERVICES,
                &format!("-m comment --comment \"{name} {why}\" {} -j {verdict}", matches(ip)),
            );
        }
    }
    let external_entry = if shape.uses_fw { &names.fw } else { &names.ext };
    for ip in &plan.external_ips {
        if shape.uses_ext {
            dispatch.service(&format!(
                "-m comment --comment \"{name} external IP\" {} -j {}",
                matches(ip),
                names.ext
            ));
        } else {
            let (why, verdict) = external_verdict;
            filter.rule(
                EXTERNAL_SERVICES,
                &format!("-m comment --comment \"{name} {why}\" {} -j {verdict}", matches(ip)),
            );
        }
    }
    for ip in &plan.load_balancer_ips {
        if shape.uses_ext {
            dispatch.service(&format!(
                "-m comment --comment \"{name} loadbalancer IP\" {} -j {external_entry}",
                matches(ip)
            ));
            if shape.uses_fw {
                filter.rule(
                    PROXY_FIREWALL,
                    &format!(
                        "-m comment --comment \"{name} traffic not accepted by {}\" {} -j DROP",
                        names.fw,
                        matches(ip)
                    ),
                );
            }
        } else {
            let (why, verdict) = external_verdict;
            filter.rule(
                EXTERNAL_SERVICES,
                &format!("-m comment --comment \"{name} {why}\" {} -j {verdict}", matches(ip)),
            );
        }
    }
    if let Some(node_port) = plan.node_port {
        if shape.uses_ext {
            dispatch.nodeport(&format!(
                "-m comment --comment \"{name}\" -m {proto} -p {proto} --dport {node_port} -j {}",
                names.ext
            ));
        } else {
            let (why, verdict) = external_verdict;
            let destinations: Vec<String> = if ctx.node_port_addresses.is_empty() {
                vec![String::new()]
            } else {
                ctx.node_port_addresses.iter().map(|net| format!(" -d {net}")).collect()
            };
            for dst in destinations {
                filter.rule(
                    EXTERNAL_SERVICES,
                    &format!(
                        "-m comment --comment \"{name} {why}\" -m addrtype --dst-type LOCAL{dst} -m {proto} -p {proto} --dport {node_port} -j {verdict}"
                    ),
                );
            }
        }
    }
}

/// The per-service nat chains of one plan but the endpoint chains in `kept` (their declarations
/// are the caller's).
fn write_service_chains(ctx: &Ctx, plan: &ServicePlan, kept: &BTreeSet<&str>, out: &mut Section) {
    let names = Names::of(plan);
    let shape = Shape::of(plan);
    let name = plan.name.to_string();
    let proto = plan.protocol.as_str();
    let port = plan.port;

    if shape.has_cluster {
        if let Some(masq) = ctx.cluster_masq() {
            for ip in &plan.cluster_ips {
                out.rule(
                    &names.svc,
                    &format!("-m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {} --dport {port} {masq}", addr(ip)),
                );
            }
        }
        write_balancing(ctx, plan, &names.svc, &plan.cluster_targets, out);
    }
    if shape.separate_external {
        write_balancing(ctx, plan, &names.svx, &plan.external_targets, out);
    }
    if shape.uses_ext {
        let lb = shape.external_lb(&names);
        if plan.external_policy_local {
            if shape.has_cluster {
                for net in &ctx.cluster_cidrs {
                    out.rule(
                        &names.ext,
                        &format!("-m comment --comment \"pod traffic for {name} external destinations\" -s {net} -j {}", names.svc),
                    );
                }
                out.rule(
                    &names.ext,
                    &format!(
                        "-m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {MARK_MASQ}"
                    ),
                );
                out.rule(
                    &names.ext,
                    &format!(
                        "-m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {}",
                        names.svc
                    ),
                );
            }
        } else {
            out.rule(&names.ext, &format!("-m comment --comment \"masquerade traffic for {name} external destinations\" -j {MARK_MASQ}"));
        }
        out.rule(&names.ext, &format!("-j {lb}"));
    }
    if shape.uses_fw {
        for net in &plan.load_balancer_source_ranges {
            out.rule(
                &names.fw,
                &format!("-m comment --comment \"{name} loadbalancer IP\" -s {net} -j {}", names.ext),
            );
        }
        out.rule(
            &names.fw,
            &format!("-m comment --comment \"other traffic to {name} will be dropped by {PROXY_FIREWALL}\""),
        );
    }

    // Endpoint chains: each target once, even when both kinds of traffic use it.
    let mut seen = BTreeSet::new();
    let affinity = plan.session_affinity.map(|t| t.as_secs().max(1));
    for target in plan
        .cluster_targets
        .iter()
        .filter(|_| shape.has_cluster)
        .chain(plan.external_targets.iter().filter(|_| shape.separate_external))
    {
        if !seen.insert(*target) {
            continue;
        }
        let sep = endpoint_chain(&plan.name, plan.protocol, target);
        if kept.contains(sep.as_str()) {
            continue;
        }
        let comment =
            if ctx.endpoint_comments { format!("-m comment --comment \"{name}\" ") } else { String::new() };
        out.rule(&sep, &format!("{comment}-s {} -j {MARK_MASQ}", addr(&target.ip)));
        let recent = match affinity {
            Some(_) => format!("-m recent --set --name {sep} --mask {} --rsource ", full_mask(ctx.family)),
            None => String::new(),
        };
        let to = SocketAddr::new(target.ip, target.port);
        out.rule(&sep, &format!("{comment}{recent}-m {proto} -p {proto} -j DNAT --to-destination {to}"));
    }
}

/// The all-ones mask `-m recent` saves with (`--mask 255.255.255.255` for IPv4).
fn full_mask(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "255.255.255.255",
        IpFamily::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    }
}

/// Affinity lookups, then random-probability selection over `targets` in `chain`.
fn write_balancing(ctx: &Ctx, plan: &ServicePlan, chain: &str, targets: &[Target], out: &mut Section) {
    let name = plan.name.to_string();
    let seps: Vec<(String, &Target)> =
        targets.iter().map(|t| (endpoint_chain(&plan.name, plan.protocol, t), t)).collect();
    let comment = |t: &Target| {
        if ctx.endpoint_comments {
            format!("-m comment --comment \"{name} -> {}\" ", SocketAddr::new(t.ip, t.port))
        } else {
            String::new()
        }
    };
    if let Some(timeout) = plan.session_affinity {
        let seconds = timeout.as_secs().max(1);
        for (sep, target) in &seps {
            out.rule(
                chain,
                &format!(
                    "{}-m recent --rcheck --seconds {seconds} --reap --name {sep} --mask {} --rsource -j {sep}",
                    comment(target),
                    full_mask(ctx.family)
                ),
            );
        }
    }
    let n = seps.len();
    for (i, (sep, target)) in seps.iter().enumerate() {
        let left = n - i;
        if left > 1 {
            out.rule(
                chain,
                &format!(
                    "{}-m statistic --mode random --probability {} -j {sep}",
                    comment(target),
                    probability(left)
                ),
            );
        } else {
            out.rule(chain, &format!("{}-j {sep}", comment(target)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_base32_of_sha256() {
        // sha256("") = e3b0c442 98fc1c14 9afb...; first 80 bits in base32.
        assert_eq!(hash16(""), "4OYMIQUY7QOBJGX3");
        assert_eq!(hash16("ns/svc:httptcp").len(), 16);
    }

    #[test]
    fn probabilities_are_formatted_like_kube_proxy() {
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(7), "0.1428571429");
    }

    #[test]
    fn chain_names_fit_iptables() {
        let name = ServicePortName {
            namespace: "a-very-long-namespace-name-indeed".into(),
            name: "and-a-very-long-service-name-as-well".into(),
            port: "https-metrics".into(),
            protocol: Protocol::Sctp,
        };
        let target = Target { ip: "fd00::1234".parse().expect("ip"), port: 65535, is_local: false };
        for chain in
            [service_chain("SVC", &name, Protocol::Sctp), endpoint_chain(&name, Protocol::Sctp, &target)]
        {
            assert!(chain.len() <= 28, "{chain}");
            assert!(is_service_chain(&chain));
        }
        assert!(!is_service_chain(SERVICES) && !is_service_chain("KUBE-SVC-ABC"));
    }
}
