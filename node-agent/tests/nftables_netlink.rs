//! The nftables netlink writer against the kernel: a corpus of commands with every statement,
//! set shape and command kind, applied through [`Nftables`] in one network namespace and as
//! `nft -f` of the same commands' nft syntax in another, must leave the same `nft list ruleset`
//! text — after a first transaction and after a second one on top of it. Also: a refused command
//! is named and leaves the kernel as it was; a large transaction goes through.
//!
//! Needs root (fails loudly without it); runs in throwaway network namespaces.
//! `cargo test -p fleetproxy-agent --test nftables_netlink -- --ignored --nocapture` also times a
//! 10,000-service-like ruleset both ways.

mod common;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use common::Netns;
use fleetproxy_agent::{
    model::{IpFamily, Protocol},
    nftables::{
        Table,
        netlink::{Nftables, encode},
        ruleset::{
            ChainType, Command, Element, Field, Hook, HookPoint, KeyType, Rule, SetSpec, Stmt, Value, Verdict,
        },
    },
};

/// The netns helpers this crate adds to the shared ones.
trait NetnsExt {
    /// `nft -f` of the commands' nft syntax, which must pass.
    fn nft_f(&self, commands: &[Command]);
    /// Our netlink writer in the namespace.
    fn writer(&self) -> Nftables;
}

impl NetnsExt for Netns {
    fn nft_f(&self, commands: &[Command]) {
        let script: String = commands.iter().map(ToString::to_string).collect();
        if let Err(e) = self.nft(&["-f", "-"], Some(&script)) {
            panic!("nft -f refused the commands:\n{e}");
        }
    }

    fn writer(&self) -> Nftables {
        Nftables::open(Some(self.name())).expect("netlink socket in the netns")
    }
}

// ---- the corpus -------------------------------------------------------------------------------

struct Family {
    family: IpFamily,
    main: Table,
    shard: Table,
    /// A table created in the first transaction and deleted in the second.
    doomed: Table,
}

impl Family {
    fn new(family: IpFamily) -> Self {
        Self {
            family,
            main: Table::main(family),
            shard: Table::shard(family, 3),
            doomed: Table::shard(family, 5),
        }
    }

    fn v4(&self) -> bool {
        self.family == IpFamily::V4
    }

    /// Address number `n` of a small test network of this family.
    fn addr(&self, net: u8, n: u16) -> IpAddr {
        let [hi, lo] = n.to_be_bytes();
        if self.v4() {
            IpAddr::from([10, net, hi, lo])
        } else {
            IpAddr::from([0xfd00, u16::from(net), 0, 0, 0, 0, 0, n])
        }
    }

    fn net(&self, v4: &str, v6: &str) -> Value {
        Value::Net((if self.v4() { v4 } else { v6 }).parse().expect("test network"))
    }

    fn key(&self) -> KeyType {
        KeyType::addr(self.family)
    }

    fn rule(&self, table: Table, chain: &str, stmts: Vec<Stmt>) -> Command {
        Command::AddRule { table, chain: chain.into(), rule: Rule::new(self.family, stmts) }
    }
}

fn chain(table: Table, name: &str) -> Command {
    Command::AddChain { table, name: name.into(), hook: None }
}

fn base(table: Table, name: &str, kind: ChainType, hook: HookPoint, priority: i32) -> Command {
    Command::AddChain { table, name: name.into(), hook: Some(Hook { kind, hook, priority }) }
}

fn set(table: Table, name: &str, spec: SetSpec) -> Command {
    Command::AddSet { table, name: name.into(), spec }
}

fn cmp(field: Field, negate: bool, value: Value) -> Stmt {
    Stmt::Cmp { field, negate, value }
}

fn proto(p: Protocol) -> Stmt {
    cmp(Field::L4proto, false, Value::Proto(p))
}

fn jump(chain: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(chain.into()))
}

fn goto(chain: &str) -> Verdict {
    Verdict::Goto(chain.into())
}

fn element(key: Vec<Value>, verdict: Option<Verdict>) -> Element {
    Element { key, verdict }
}

fn add(table: Table, set: &str, elements: Vec<Element>) -> Command {
    Command::AddElements { table, set: set.into(), elements }
}

const DADDR_PROTO_PORT: [Field; 3] = [Field::Daddr, Field::L4proto, Field::Dport];

/// Every statement, set shape and base chain of the renderer, in one family.
fn first_transaction(f: &Family) -> Vec<Command> {
    let (main, shard) = (f.main, f.shard);
    let addr = f.key();
    let service = |key: Vec<KeyType>| SetSpec::verdict_map(key);
    let mut c = vec![
        Command::AddTable(main),
        base(main, "filter-prerouting", ChainType::Filter, HookPoint::Prerouting, -110),
        base(main, "filter-input", ChainType::Filter, HookPoint::Input, -110),
        base(main, "filter-forward", ChainType::Filter, HookPoint::Forward, -110),
        base(main, "filter-output", ChainType::Filter, HookPoint::Output, -110),
        base(main, "nat-postrouting", ChainType::Nat, HookPoint::Postrouting, 100),
        chain(main, "firewall-check"),
        chain(main, "reject-tcp"),
        chain(main, "reject-other"),
        chain(main, "masquerading"),
        chain(main, "spare"),
        Command::AddSet {
            table: main,
            name: "excluded-cidrs".into(),
            spec: SetSpec { interval: true, ..SetSpec::set(vec![addr]) },
        },
        set(main, "no-endpoint-services", service(vec![addr, KeyType::InetProto, KeyType::InetService])),
        set(main, "nodeport-protos", SetSpec::set(vec![KeyType::InetProto, KeyType::InetService])),
        set(main, "clients", SetSpec::set(vec![addr, addr, KeyType::InetProto, KeyType::InetService])),
        set(main, "one-port", service(vec![KeyType::InetService])),
        set(main, "pairs", service(vec![addr, addr])),
        set(main, "four", service(vec![addr, addr, KeyType::InetProto, KeyType::InetService])),
        set(main, "spare-set", SetSpec::set(vec![addr])),
        f.rule(main, "filter-prerouting", vec![Stmt::CtStateNew, jump("firewall-check")]),
        f.rule(
            main,
            "filter-input",
            vec![
                Stmt::CtStateNew,
                Stmt::Vmap { fields: DADDR_PROTO_PORT.to_vec(), map: "no-endpoint-services".into() },
            ],
        ),
        f.rule(
            main,
            "filter-forward",
            vec![
                Stmt::CtStateNew,
                Stmt::Vmap {
                    fields: vec![Field::Saddr, Field::Daddr, Field::L4proto, Field::Dport],
                    map: "four".into(),
                },
            ],
        ),
        f.rule(
            main,
            "filter-forward",
            vec![
                Stmt::Lookup {
                    fields: vec![Field::Saddr, Field::Daddr, Field::L4proto, Field::Dport],
                    set: "clients".into(),
                },
                Stmt::Verdict(Verdict::Drop),
            ],
        ),
        f.rule(
            main,
            "filter-forward",
            vec![Stmt::Vmap { fields: vec![Field::Saddr, Field::Daddr], map: "pairs".into() }],
        ),
        f.rule(
            main,
            "filter-output",
            vec![Stmt::CtStateNew, Stmt::FibLocal(Field::Daddr), jump("firewall-check")],
        ),
        f.rule(
            main,
            "filter-output",
            vec![
                Stmt::FibLocal(Field::Saddr),
                Stmt::Vmap { fields: vec![Field::Dport], map: "one-port".into() },
            ],
        ),
        f.rule(
            main,
            "firewall-check",
            vec![
                Stmt::Lookup { fields: vec![Field::Daddr], set: "excluded-cidrs".into() },
                Stmt::Verdict(Verdict::Return),
            ],
        ),
        f.rule(
            main,
            "firewall-check",
            vec![
                cmp(Field::Saddr, true, f.net("10.16.0.0/12", "fd00:10::/60")),
                Stmt::Lookup { fields: vec![Field::L4proto, Field::Dport], set: "nodeport-protos".into() },
                Stmt::Verdict(Verdict::Drop),
            ],
        ),
        f.rule(
            main,
            "firewall-check",
            vec![
                cmp(Field::Saddr, false, f.net("10.0.0.0/8", "fd00::/48")),
                cmp(Field::Daddr, true, f.net("127.0.0.0/8", "::1/128")),
                proto(Protocol::Udp),
                cmp(Field::Dport, false, Value::Port(53)),
                cmp(Field::Dport, true, Value::Port(54)),
                Stmt::Verdict(Verdict::Drop),
            ],
        ),
        f.rule(
            main,
            "firewall-check",
            vec![
                cmp(Field::Daddr, false, Value::Addr(f.addr(1, 1))),
                cmp(Field::Saddr, true, Value::Addr(f.addr(1, 2))),
                cmp(Field::L4proto, true, Value::Proto(Protocol::Sctp)),
                cmp(Field::Saddr, false, f.net("0.0.0.0/0", "::/0")),
                cmp(Field::Daddr, false, f.net("10.1.0.1/32", "fd00::1/128")),
                Stmt::Verdict(Verdict::Return),
            ],
        ),
        f.rule(main, "reject-tcp", vec![Stmt::RejectTcpReset]),
        f.rule(main, "reject-tcp", vec![proto(Protocol::Tcp), Stmt::RejectTcpReset]),
        f.rule(main, "reject-other", vec![Stmt::Reject]),
        f.rule(main, "nat-postrouting", vec![jump("masquerading")]),
        f.rule(main, "masquerading", vec![Stmt::MarkClear(0x4000), Stmt::Verdict(Verdict::Return)]),
        f.rule(main, "masquerading", vec![Stmt::MarkXor(0x4000)]),
        f.rule(main, "masquerading", vec![Stmt::Masquerade]),
        add(
            main,
            "excluded-cidrs",
            vec![
                element(vec![f.net("192.168.0.0/16", "fd99::/64")], None),
                element(vec![f.net("10.0.0.0/24", "fd98::/63")], None),
                element(vec![f.net("10.0.1.0/24", "fd98:0:0:2::/64")], None),
                element(vec![Value::Addr(f.addr(9, 9))], None),
                element(vec![f.net("255.255.255.0/24", "ffff::/16")], None),
            ],
        ),
        add(
            main,
            "no-endpoint-services",
            vec![
                element(
                    vec![Value::Addr(f.addr(2, 1)), Value::Proto(Protocol::Tcp), Value::Port(80)],
                    Some(goto("reject-tcp")),
                ),
                element(
                    vec![Value::Addr(f.addr(2, 2)), Value::Proto(Protocol::Udp), Value::Port(53)],
                    Some(goto("reject-other")),
                ),
                element(
                    vec![Value::Addr(f.addr(2, 3)), Value::Proto(Protocol::Sctp), Value::Port(9)],
                    Some(Verdict::Drop),
                ),
            ],
        ),
        add(
            main,
            "nodeport-protos",
            vec![
                element(vec![Value::Proto(Protocol::Tcp), Value::Port(30080)], None),
                element(vec![Value::Proto(Protocol::Udp), Value::Port(30053)], None),
            ],
        ),
        add(
            main,
            "clients",
            vec![element(
                vec![
                    Value::Addr(f.addr(3, 1)),
                    Value::Addr(f.addr(3, 2)),
                    Value::Proto(Protocol::Tcp),
                    Value::Port(443),
                ],
                None,
            )],
        ),
        add(
            main,
            "one-port",
            vec![
                element(vec![Value::Port(80)], Some(Verdict::Jump("firewall-check".into()))),
                element(vec![Value::Port(81)], Some(Verdict::Return)),
            ],
        ),
        add(
            main,
            "pairs",
            vec![element(vec![Value::Addr(f.addr(4, 1)), Value::Addr(f.addr(4, 2))], Some(Verdict::Drop))],
        ),
        add(
            main,
            "four",
            vec![element(
                vec![
                    Value::Addr(f.addr(5, 1)),
                    Value::Addr(f.addr(5, 2)),
                    Value::Proto(Protocol::Udp),
                    Value::Port(53),
                ],
                Some(Verdict::Drop),
            )],
        ),
    ];

    // A service shard: nat hooks, a service map, endpoint chains, every NAT statement.
    let targets: Vec<(IpAddr, u16)> = (0..40).map(|i| (f.addr(7, i), 8000 + i)).collect();
    c.extend([
        Command::AddTable(shard),
        base(shard, "nat-prerouting", ChainType::Nat, HookPoint::Prerouting, -100),
        base(shard, "nat-output", ChainType::Nat, HookPoint::Output, -100),
        chain(shard, "services"),
        chain(shard, "mark-for-masquerade"),
        chain(shard, "svc-tcp"),
        chain(shard, "svc-udp"),
        chain(shard, "svc-sctp"),
        chain(shard, "ep-0"),
        chain(shard, "ep-1"),
        chain(shard, "ep-2"),
        set(
            shard,
            "service-ips",
            SetSpec::verdict_map(vec![f.key(), KeyType::InetProto, KeyType::InetService]),
        ),
        set(shard, "service-nodeports", SetSpec::verdict_map(vec![KeyType::InetProto, KeyType::InetService])),
        set(shard, "affinity-svc-tcp", SetSpec { timeout_s: Some(10800), ..SetSpec::set(vec![f.key()]) }),
        f.rule(shard, "nat-prerouting", vec![jump("services")]),
        f.rule(shard, "nat-output", vec![jump("services")]),
        f.rule(
            shard,
            "services",
            vec![Stmt::Vmap { fields: DADDR_PROTO_PORT.to_vec(), map: "service-ips".into() }],
        ),
        f.rule(
            shard,
            "services",
            vec![
                Stmt::FibLocal(Field::Daddr),
                Stmt::Vmap { fields: vec![Field::L4proto, Field::Dport], map: "service-nodeports".into() },
            ],
        ),
        f.rule(shard, "mark-for-masquerade", vec![Stmt::MarkOr(0x4000)]),
        f.rule(
            shard,
            "svc-tcp",
            vec![
                cmp(Field::Saddr, true, f.net("10.244.0.0/16", "fd00:10::/64")),
                jump("mark-for-masquerade"),
            ],
        ),
        f.rule(
            shard,
            "svc-tcp",
            vec![
                Stmt::Lookup { fields: vec![Field::Saddr], set: "affinity-svc-tcp".into() },
                Stmt::Verdict(goto("ep-0")),
            ],
        ),
        f.rule(shard, "svc-tcp", vec![Stmt::NumgenGoto(vec!["ep-0".into(), "ep-1".into(), "ep-2".into()])]),
        f.rule(
            shard,
            "svc-udp",
            vec![proto(Protocol::Udp), Stmt::NumgenIsZero(2), Stmt::Dnat(f.addr(6, 1), 53)],
        ),
        f.rule(shard, "svc-udp", vec![proto(Protocol::Udp), Stmt::Dnat(f.addr(6, 2), 5353)]),
        f.rule(shard, "svc-sctp", vec![proto(Protocol::Sctp), Stmt::DnatNumgenMap(targets)]),
    ]);
    for i in 0..3u16 {
        let ep = format!("ep-{i}");
        c.extend([
            f.rule(
                shard,
                &ep,
                vec![cmp(Field::Saddr, false, Value::Addr(f.addr(8, i))), jump("mark-for-masquerade")],
            ),
            f.rule(shard, &ep, vec![Stmt::UpdateSaddr("affinity-svc-tcp".into())]),
            f.rule(shard, &ep, vec![proto(Protocol::Tcp), Stmt::Dnat(f.addr(8, i), 8080)]),
        ]);
    }
    c.extend([
        add(
            shard,
            "service-ips",
            vec![
                element(
                    vec![Value::Addr(f.addr(0, 10)), Value::Proto(Protocol::Tcp), Value::Port(80)],
                    Some(goto("svc-tcp")),
                ),
                element(
                    vec![Value::Addr(f.addr(0, 11)), Value::Proto(Protocol::Udp), Value::Port(53)],
                    Some(goto("svc-udp")),
                ),
                element(
                    vec![Value::Addr(f.addr(0, 12)), Value::Proto(Protocol::Sctp), Value::Port(9)],
                    Some(goto("svc-sctp")),
                ),
            ],
        ),
        add(
            shard,
            "service-nodeports",
            vec![element(vec![Value::Proto(Protocol::Tcp), Value::Port(30080)], Some(goto("svc-tcp")))],
        ),
        Command::AddTable(f.doomed),
        chain(f.doomed, "services"),
        f.rule(f.doomed, "services", vec![Stmt::Verdict(Verdict::Return)]),
    ]);
    c
}

/// Flushes, deletes and element changes on top of the first transaction.
fn second_transaction(f: &Family) -> Vec<Command> {
    let (main, shard) = (f.main, f.shard);
    vec![
        Command::FlushChain { table: shard, name: "svc-udp".into() },
        f.rule(
            shard,
            "svc-udp",
            vec![proto(Protocol::Udp), Stmt::NumgenIsZero(3), Stmt::Dnat(f.addr(6, 3), 53)],
        ),
        f.rule(shard, "svc-udp", vec![proto(Protocol::Udp), Stmt::Dnat(f.addr(6, 4), 53)]),
        Command::FlushChain { table: shard, name: "svc-tcp".into() },
        f.rule(shard, "svc-tcp", vec![Stmt::NumgenGoto(vec!["ep-0".into(), "ep-1".into()])]),
        Command::FlushChain { table: shard, name: "ep-2".into() },
        Command::DeleteChain { table: shard, name: "ep-2".into() },
        Command::FlushChain { table: shard, name: "svc-sctp".into() },
        f.rule(
            shard,
            "svc-sctp",
            vec![proto(Protocol::Sctp), Stmt::DnatNumgenMap(vec![(f.addr(7, 100), 9), (f.addr(7, 101), 9)])],
        ),
        Command::DeleteElements {
            table: shard,
            set: "service-ips".into(),
            elements: vec![element(
                vec![Value::Addr(f.addr(0, 11)), Value::Proto(Protocol::Udp), Value::Port(53)],
                None,
            )],
        },
        add(
            shard,
            "service-ips",
            vec![element(
                vec![Value::Addr(f.addr(0, 13)), Value::Proto(Protocol::Udp), Value::Port(5353)],
                Some(goto("svc-udp")),
            )],
        ),
        Command::DeleteElements {
            table: main,
            set: "excluded-cidrs".into(),
            elements: vec![
                element(vec![f.net("10.0.1.0/24", "fd98:0:0:2::/64")], None),
                element(vec![f.net("255.255.255.0/24", "ffff::/16")], None),
            ],
        },
        add(main, "excluded-cidrs", vec![element(vec![f.net("172.16.0.0/12", "fd97::/32")], None)]),
        Command::FlushSet { table: main, name: "nodeport-protos".into(), map: false },
        Command::FlushSet { table: main, name: "four".into(), map: true },
        Command::FlushChain { table: main, name: "filter-output".into() },
        f.rule(
            main,
            "filter-output",
            vec![Stmt::CtStateNew, Stmt::FibLocal(Field::Daddr), jump("firewall-check")],
        ),
        Command::DeleteSet { table: main, name: "one-port".into(), map: true },
        Command::DeleteSet { table: main, name: "spare-set".into(), map: false },
        Command::DeleteChain { table: main, name: "spare".into() },
        Command::DeleteTable(f.doomed),
    ]
}

fn both_families(transaction: fn(&Family) -> Vec<Command>) -> Vec<Command> {
    [IpFamily::V4, IpFamily::V6].into_iter().flat_map(|family| transaction(&Family::new(family))).collect()
}

// ---- tests ------------------------------------------------------------------------------------

#[test]
fn the_writer_leaves_what_nft_leaves() {
    let (ours, theirs) = (Netns::new("nftnl-eq-a"), Netns::new("nftnl-eq-b"));
    let mut writer = ours.writer();
    for (step, commands) in
        [both_families(first_transaction), both_families(second_transaction)].iter().enumerate()
    {
        writer.apply(commands).unwrap_or_else(|e| panic!("transaction {}: {e}", step + 1));
        theirs.nft_f(commands);
        let (a, b) = (ours.ruleset(), theirs.ruleset());
        assert!(a.contains("dnat ip") || a.contains("dnat ip6"), "the corpus is in the kernel:\n{a}");
        if a != b {
            let diff: Vec<String> = a
                .lines()
                .zip(b.lines())
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .take(10)
                .map(|(i, (x, y))| format!("line {}:\n  netlink: {x}\n  nft -f:  {y}", i + 1))
                .collect();
            panic!(
                "transaction {}: the rulesets differ\n{}\n--- netlink ---\n{a}",
                step + 1,
                diff.join("\n")
            );
        }
    }
}

#[test]
fn a_refused_command_is_named_and_changes_nothing() {
    let ns = Netns::new("nftnl-refused");
    let f = Family::new(IpFamily::V4);
    let mut writer = ns.writer();
    writer.apply(&[Command::AddTable(f.main), chain(f.main, "present")]).expect("setup");
    let before = ns.ruleset();

    let bad = f.rule(f.main, "absent", vec![Stmt::Verdict(Verdict::Drop)]);
    let commands = vec![
        chain(f.main, "new-chain"),
        f.rule(f.main, "present", vec![Stmt::Verdict(Verdict::Return)]),
        bad.clone(),
        f.rule(f.main, "new-chain", vec![Stmt::Masquerade]),
    ];
    let error = writer.apply(&commands).expect_err("a rule in a chain that does not exist").to_string();
    let text = bad.to_string();
    assert!(error.contains(text.trim()), "the error names the command: {error}");
    assert!(error.contains("command 3 of 4"), "{error}");
    assert!(error.contains("No such file or directory"), "{error}");
    assert!(error.starts_with("nftables netlink failed"), "{error}");
    assert_eq!(ns.ruleset(), before, "nothing of the refused transaction stays");

    // The socket goes on working after a refusal.
    writer.apply(&commands[..2]).expect("a valid transaction after a refused one");
    assert!(ns.ruleset().contains("chain new-chain"));
}

/// 2,000 chains of 10 rules and a 2,000-element verdict map in one transaction (~3 MB).
fn large(f: &Family, chains: u16, rules: u16) -> Vec<Command> {
    let table = f.shard;
    let mut c = vec![
        Command::AddTable(table),
        base(table, "nat-prerouting", ChainType::Nat, HookPoint::Prerouting, -100),
        chain(table, "services"),
        set(
            table,
            "service-ips",
            SetSpec::verdict_map(vec![f.key(), KeyType::InetProto, KeyType::InetService]),
        ),
        f.rule(table, "nat-prerouting", vec![jump("services")]),
        f.rule(
            table,
            "services",
            vec![Stmt::Vmap { fields: DADDR_PROTO_PORT.to_vec(), map: "service-ips".into() }],
        ),
    ];
    let mut elements = Vec::new();
    for s in 0..chains {
        let name = format!("svc-{s}");
        c.push(chain(table, &name));
        for r in 0..rules {
            let mut stmts = vec![Stmt::NumgenIsZero(u32::from(rules - r))];
            if r + 1 == rules {
                stmts.clear();
            }
            stmts.extend([proto(Protocol::Tcp), Stmt::Dnat(f.addr(100 + r as u8, s), 8080)]);
            c.push(f.rule(table, &name, stmts));
        }
        elements.push(element(
            vec![Value::Addr(f.addr(0, s)), Value::Proto(Protocol::Tcp), Value::Port(80)],
            Some(goto(&name)),
        ));
    }
    c.push(add(table, "service-ips", elements));
    c
}

#[test]
fn a_large_transaction_goes_through() {
    let ns = Netns::new("nftnl-large");
    let f = Family::new(IpFamily::V4);
    let commands = large(&f, 2000, 10);
    let started = Instant::now();
    ns.writer().apply(&commands).expect("2,000 chains x 10 rules");
    let took = started.elapsed();
    let listing = ns.nft(&["list", "table", "ip", &f.shard.name()], None).expect("list table");
    assert_eq!(listing.matches("dnat to").count(), 20_000);
    assert!(listing.contains("svc-1999"));
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

fn time(what: &str, f: impl FnOnce()) -> Duration {
    let started = Instant::now();
    f();
    let took = started.elapsed();
    println!("{what}: {took:.2?}");
    took
}

/// The figures for a 10,000-service-like ruleset: 10,000 chains of 11 rules and a verdict map of
/// 10,000 elements, then one chain's change (flush + 10 rules), through the writer and `nft -f`.
#[test]
#[ignore = "timing, run by hand"]
fn timing_10000_services() {
    let f = Family::new(IpFamily::V4);
    let commands = large(&f, 10_000, 11);
    let change = {
        let mut c = vec![Command::FlushChain { table: f.shard, name: "svc-77".into() }];
        c.extend((0..10u16).map(|r| {
            f.rule(
                f.shard,
                "svc-77",
                vec![
                    Stmt::NumgenIsZero(u32::from(10 - r)),
                    proto(Protocol::Tcp),
                    Stmt::Dnat(f.addr(200, r), 9090),
                ],
            )
        }));
        c
    };
    let script: String = commands.iter().map(ToString::to_string).collect();
    println!("{} commands, {} bytes of nft syntax", commands.len(), script.len());
    let (ours, theirs) = (Netns::new("nftnl-time-a"), Netns::new("nftnl-time-b"));
    let mut writer = ours.writer();
    let mut bytes = 0;
    time("full, encoding alone", || bytes = encode(&commands, 1).expect("encode").bytes().len());
    println!("{bytes} bytes of netlink");
    time("full, netlink writer", || writer.apply(&commands).expect("full"));
    time("full, nft -f", || theirs.nft_f(&commands));
    time("one chain, netlink writer", || writer.apply(&change).expect("change"));
    time("one chain, nft -f", || theirs.nft_f(&change));
    assert_eq!(ours.ruleset(), theirs.ruleset());
}
