//! What the renderer says to the kernel, as data: commands on our tables, chains, sets and maps,
//! and the few kinds of rule statement we use. Two encodings serve it: nft syntax ([`Display`],
//! for logs and golden tests) and nftables netlink ([`super::netlink`], what the agent sends).

use std::{
    fmt::{self, Display},
    net::IpAddr,
};

use ipnet::IpNet;

use super::render::Table;
use crate::model::{IpFamily, Protocol};

/// A value matched by a rule or held by a set element.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Addr(IpAddr),
    Net(IpNet),
    Proto(Protocol),
    Port(u16),
}

impl Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(ip) => write!(f, "{ip}"),
            Self::Net(net) => write!(f, "{net}"),
            Self::Proto(p) => f.write_str(p.as_str()),
            Self::Port(p) => write!(f, "{p}"),
        }
    }
}

/// Where a rule or a map element sends a packet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

impl Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Drop => f.write_str("drop"),
            Self::Return => f.write_str("return"),
            Self::Jump(chain) => write!(f, "jump {chain}"),
            Self::Goto(chain) => write!(f, "goto {chain}"),
        }
    }
}

/// A packet field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// Network-header source address (`ip saddr` / `ip6 saddr`).
    Saddr,
    /// Network-header destination address.
    Daddr,
    /// `meta l4proto`.
    L4proto,
    /// Transport-header destination port (`th dport`).
    Dport,
}

impl Field {
    fn write(self, f: &mut fmt::Formatter<'_>, family: IpFamily) -> fmt::Result {
        let ip = family_kw(family);
        match self {
            Self::Saddr => write!(f, "{ip} saddr"),
            Self::Daddr => write!(f, "{ip} daddr"),
            Self::L4proto => f.write_str("meta l4proto"),
            Self::Dport => f.write_str("th dport"),
        }
    }
}

/// `a . b . c`: a concatenation of fields.
fn write_concat(f: &mut fmt::Formatter<'_>, fields: &[Field], family: IpFamily) -> fmt::Result {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            f.write_str(" . ")?;
        }
        field.write(f, family)?;
    }
    Ok(())
}

fn family_kw(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// One statement of a rule: a match, a lookup, an action or a verdict.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Stmt {
    /// `ct state new`
    CtStateNew,
    /// `ct status dnat`
    CtStatusDnat,
    /// `fib daddr type local` (`Daddr`) or `fib saddr type local` (`Saddr`).
    FibLocal(Field),
    /// `ip saddr 10.0.0.0/8`, `ip daddr != 127.0.0.0/8`, `meta l4proto tcp`: equality with a value,
    /// or membership of a network.
    Cmp {
        field: Field,
        negate: bool,
        value: Value,
    },
    /// `ip saddr . ip daddr @set`: membership of a named set.
    Lookup {
        fields: Vec<Field>,
        set: String,
    },
    /// `ip daddr . meta l4proto . th dport vmap @map`: the verdict of a named map, if any.
    Vmap {
        fields: Vec<Field>,
        map: String,
    },
    /// `meta mark & MASK == 0`
    MarkClear(u32),
    /// `meta mark set meta mark | BITS`
    MarkOr(u32),
    /// `meta mark set meta mark ^ BITS`
    MarkXor(u32),
    /// `numgen random mod N 0`: true with probability 1/N.
    NumgenIsZero(u32),
    /// `dnat to ADDR:PORT`
    Dnat(IpAddr, u16),
    /// `dnat ip to numgen random mod N map { 0 : ADDR . PORT, ... }`: one of N endpoints at random.
    DnatNumgenMap(Vec<(IpAddr, u16)>),
    /// `numgen random mod N vmap { 0 : goto C0, ... }`: one of N chains at random.
    NumgenGoto(Vec<String>),
    /// `update @set { ip saddr }`: record the client in a set with timeouts.
    UpdateSaddr(String),
    /// `masquerade fully-random`
    Masquerade,
    /// `reject with tcp reset`
    RejectTcpReset,
    /// `reject` (ICMP port unreachable)
    Reject,
    Verdict(Verdict),
}

/// A rule: statements that all apply, in order, in one family.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub family: IpFamily,
    pub stmts: Vec<Stmt>,
}

impl Rule {
    pub fn new(family: IpFamily, stmts: Vec<Stmt>) -> Self {
        Self { family, stmts }
    }
}

impl Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = self.family;
        let ip = family_kw(family);
        for (i, stmt) in self.stmts.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match stmt {
                Stmt::CtStateNew => f.write_str("ct state new")?,
                Stmt::CtStatusDnat => f.write_str("ct status dnat")?,
                Stmt::FibLocal(field) => {
                    let which = if *field == Field::Saddr { "saddr" } else { "daddr" };
                    write!(f, "fib {which} type local")?;
                }
                Stmt::Cmp { field, negate, value } => {
                    field.write(f, family)?;
                    let op = if *negate { "!= " } else { "" };
                    write!(f, " {op}{value}")?;
                }
                Stmt::Lookup { fields, set } => {
                    write_concat(f, fields, family)?;
                    write!(f, " @{set}")?;
                }
                Stmt::Vmap { fields, map } => {
                    write_concat(f, fields, family)?;
                    write!(f, " vmap @{map}")?;
                }
                Stmt::MarkClear(mask) => write!(f, "meta mark & {mask:#x} == 0")?,
                Stmt::MarkOr(bits) => write!(f, "meta mark set meta mark | {bits:#x}")?,
                Stmt::MarkXor(bits) => write!(f, "meta mark set meta mark ^ {bits:#x}")?,
                Stmt::NumgenIsZero(modulus) => write!(f, "numgen random mod {modulus} 0")?,
                Stmt::Dnat(IpAddr::V4(addr), port) => write!(f, "dnat to {addr}:{port}")?,
                Stmt::Dnat(IpAddr::V6(addr), port) => write!(f, "dnat to [{addr}]:{port}")?,
                Stmt::DnatNumgenMap(targets) => {
                    write!(f, "dnat {ip} to numgen random mod {} map {{ ", targets.len())?;
                    for (i, (addr, port)) in targets.iter().enumerate() {
                        let sep = if i + 1 < targets.len() { ", " } else { " " };
                        write!(f, "{i} : {addr} . {port}{sep}")?;
                    }
                    f.write_str("}")?;
                }
                Stmt::NumgenGoto(chains) => {
                    write!(f, "numgen random mod {} vmap {{ ", chains.len())?;
                    for (i, chain) in chains.iter().enumerate() {
                        let sep = if i + 1 < chains.len() { ", " } else { " " };
                        write!(f, "{i} : goto {chain}{sep}")?;
                    }
                    f.write_str("}")?;
                }
                Stmt::UpdateSaddr(set) => write!(f, "update @{set} {{ {ip} saddr }}")?,
                Stmt::Masquerade => f.write_str("masquerade fully-random")?,
                Stmt::RejectTcpReset => f.write_str("reject with tcp reset")?,
                Stmt::Reject => f.write_str("reject")?,
                Stmt::Verdict(verdict) => write!(f, "{verdict}")?,
            }
        }
        Ok(())
    }
}

/// The type of one part of a set key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyType {
    Ipv4Addr,
    Ipv6Addr,
    InetProto,
    InetService,
}

impl KeyType {
    pub fn addr(family: IpFamily) -> Self {
        match family {
            IpFamily::V4 => Self::Ipv4Addr,
            IpFamily::V6 => Self::Ipv6Addr,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ipv4Addr => "ipv4_addr",
            Self::Ipv6Addr => "ipv6_addr",
            Self::InetProto => "inet_proto",
            Self::InetService => "inet_service",
        }
    }
}

/// A named set or verdict map's declaration.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetSpec {
    /// The key, a concatenation when it has several parts.
    pub key: Vec<KeyType>,
    /// A map to verdicts, not a set.
    pub verdict_map: bool,
    /// Elements are networks (`flags interval`).
    pub interval: bool,
    /// Elements are added by rules and expire after this many seconds (`flags dynamic,timeout`).
    pub timeout_s: Option<u64>,
}

impl SetSpec {
    pub fn set(key: Vec<KeyType>) -> Self {
        Self { key, verdict_map: false, interval: false, timeout_s: None }
    }

    pub fn verdict_map(key: Vec<KeyType>) -> Self {
        Self { verdict_map: true, ..Self::set(key) }
    }

    fn kind(&self) -> &'static str {
        if self.verdict_map { "map" } else { "set" }
    }
}

impl Display for SetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{ type ")?;
        for (i, key) in self.key.iter().enumerate() {
            let sep = if i > 0 { " . " } else { "" };
            write!(f, "{sep}{}", key.name())?;
        }
        if self.verdict_map {
            f.write_str(" : verdict")?;
        }
        f.write_str(";")?;
        if self.interval {
            f.write_str(" flags interval;")?;
        }
        if let Some(timeout) = self.timeout_s {
            write!(f, " flags dynamic,timeout; timeout {timeout}s;")?;
        }
        f.write_str(" }")
    }
}

/// An element of a set (`key`) or of a verdict map (`key : verdict`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub key: Vec<Value>,
    pub verdict: Option<Verdict>,
}

impl Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, value) in self.key.iter().enumerate() {
            let sep = if i > 0 { " . " } else { "" };
            write!(f, "{sep}{value}")?;
        }
        match &self.verdict {
            Some(verdict) => write!(f, " : {verdict}"),
            None => Ok(()),
        }
    }
}

/// The chain types and hooks our base chains use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPoint {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl HookPoint {
    fn name(self) -> &'static str {
        match self {
            Self::Prerouting => "prerouting",
            Self::Input => "input",
            Self::Forward => "forward",
            Self::Output => "output",
            Self::Postrouting => "postrouting",
        }
    }
}

/// A base chain's hook (policy accept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    pub kind: ChainType,
    pub hook: HookPoint,
    pub priority: i32,
}

impl Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        };
        // nft 1.0.6 knows `dstnat` for prerouting and `srcnat` for postrouting only.
        let priority = match (self.kind, self.hook, self.priority) {
            (ChainType::Nat, HookPoint::Prerouting, -100) => "dstnat".to_owned(),
            (ChainType::Nat, HookPoint::Postrouting, 100) => "srcnat".to_owned(),
            (_, _, priority) => priority.to_string(),
        };
        write!(f, "type {kind} hook {} priority {priority}; policy accept;", self.hook.name())
    }
}

/// One command of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    AddTable(Table),
    DeleteTable(Table),
    AddChain {
        table: Table,
        name: String,
        hook: Option<Hook>,
    },
    FlushChain {
        table: Table,
        name: String,
    },
    DeleteChain {
        table: Table,
        name: String,
    },
    AddRule {
        table: Table,
        chain: String,
        rule: Rule,
    },
    AddSet {
        table: Table,
        name: String,
        spec: SetSpec,
    },
    /// Flushes a set or map (`map` says which, for the syntax).
    FlushSet {
        table: Table,
        name: String,
        map: bool,
    },
    DeleteSet {
        table: Table,
        name: String,
        map: bool,
    },
    AddElements {
        table: Table,
        set: String,
        elements: Vec<Element>,
    },
    DeleteElements {
        table: Table,
        set: String,
        elements: Vec<Element>,
    },
}

/// The comment on every table of ours.
pub const TABLE_COMMENT: &str = "fleetproxy: Service proxy rules";

impl Command {
    /// Lines of nft syntax the command takes (element lists take one per element and two more).
    pub fn lines(&self) -> usize {
        match self {
            Self::AddElements { elements, .. } | Self::DeleteElements { elements, .. } => elements.len() + 2,
            _ => 1,
        }
    }
}

impl Display for Command {
    /// The command in nft syntax, each line ending in a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = |map: &bool| if *map { "map" } else { "set" };
        match self {
            Self::AddTable(table) => writeln!(f, "add table {table} {{ comment \"{TABLE_COMMENT}\"; }}"),
            Self::DeleteTable(table) => writeln!(f, "delete table {table}"),
            Self::AddChain { table, name, hook: Some(hook) } => {
                writeln!(f, "add chain {table} {name} {{ {hook} }}")
            }
            Self::AddChain { table, name, hook: None } => writeln!(f, "add chain {table} {name}"),
            Self::FlushChain { table, name } => writeln!(f, "flush chain {table} {name}"),
            Self::DeleteChain { table, name } => writeln!(f, "delete chain {table} {name}"),
            Self::AddRule { table, chain, rule } => writeln!(f, "add rule {table} {chain} {rule}"),
            Self::AddSet { table, name, spec } => writeln!(f, "add {} {table} {name} {spec}", spec.kind()),
            Self::FlushSet { table, name, map } => writeln!(f, "flush {} {table} {name}", kind(map)),
            Self::DeleteSet { table, name, map } => writeln!(f, "delete {} {table} {name}", kind(map)),
            Self::AddElements { table, set, elements } | Self::DeleteElements { table, set, elements } => {
                let verb = if matches!(self, Self::AddElements { .. }) { "add" } else { "delete" };
                writeln!(f, "{verb} element {table} {set} {{")?;
                for element in elements {
                    writeln!(f, "\t{element},")?;
                }
                writeln!(f, "}}")
            }
        }
    }
}
