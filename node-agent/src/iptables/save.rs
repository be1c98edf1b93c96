//! Reading `iptables-save` output: which of our chains and jump rules the kernel holds, how many
//! rules of ours there are, and the restore input that removes all of it. Pure.

use std::{collections::BTreeSet, fmt::Write as _};

use super::render::{CHAIN_PREFIX, KernelChains, Table};

/// What one table of an `iptables-save` dump holds of ours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableDump {
    /// Our chains (declared with `:FP-...`).
    pub chains: BTreeSet<String>,
    /// Rules of foreign (usually builtin) chains that jump or go to one of ours, as saved
    /// (`-A PREROUTING ... -j FP-SERVICES`).
    pub jumps: Vec<String>,
    /// Rules inside our chains.
    pub rules: u64,
}

impl TableDump {
    /// Our rules, including the jump rules into our chains.
    pub fn rule_count(&self) -> u64 {
        self.rules + self.jumps.len() as u64
    }

    /// Whether nothing of ours is in this table.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty() && self.rules == 0
    }
}

fn is_ours(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// The chain a rule jumps (`-j`) or goes (`-g`) to, if it is one of ours.
fn our_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(word) = words.next() {
        if word == "-j" || word == "-g" {
            return words.next().filter(|t| is_ours(t));
        }
    }
    None
}

/// Parses the dump of one table (`iptables-save -t <table>`); lines of other tables are ignored.
pub fn parse_table(dump: &str, table: Table) -> TableDump {
    let mut out = TableDump::default();
    let mut in_table = false;
    for line in dump.lines() {
        if let Some(name) = line.strip_prefix('*') {
            in_table = name.trim() == table.as_str();
        } else if !in_table {
            continue;
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next().filter(|c| is_ours(c)) {
                out.chains.insert(chain.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if is_ours(chain) {
                out.rules += 1;
            } else if our_target(rule).is_some() {
                out.jumps.push(line.to_owned());
            }
        }
    }
    out
}

/// The kernel state a full render works from, from the nat and filter dumps.
pub fn kernel_chains(nat: &TableDump, filter: &TableDump) -> KernelChains {
    let mut jumps = BTreeSet::new();
    for (table, dump) in [(Table::Nat, nat), (Table::Filter, filter)] {
        for line in &dump.jumps {
            let rule = line.trim_start_matches("-A ");
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if let Some(target) = our_target(rule) {
                jumps.insert((table, chain.to_owned(), target.to_owned()));
            }
        }
    }
    KernelChains { nat: nat.chains.clone(), filter: filter.chains.clone(), jumps }
}

/// `iptables-restore --noflush` input that removes everything of ours in the given tables: the
/// jump rules into our chains, then our chains (all flushed first, so that their references to
/// each other are gone before any is deleted). `None` when there is nothing to remove.
///
/// `split` (the nf_tables backend): per table, three transactions (jump rules, flushes, deletions)
/// instead of one, each naming its chains in descending order. iptables-nft walks a sorted list of
/// the chains a transaction names for every command, from the smallest: so each walk stops at once,
/// where one transaction that flushes and then deletes every chain walks all of them per deletion.
pub fn cleanup_input(tables: &[(Table, &TableDump)], split: bool) -> Option<String> {
    let mut out = String::new();
    for (table, dump) in tables {
        if dump.is_empty() {
            continue;
        }
        let table = table.as_str();
        if !split {
            let _ = writeln!(out, "*{table}");
            for chain in &dump.chains {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
            for jump in &dump.jumps {
                let _ = writeln!(out, "-D {}", jump.trim_start_matches("-A "));
            }
            for chain in &dump.chains {
                let _ = writeln!(out, "-X {chain}");
            }
            out.push_str("COMMIT\n");
            continue;
        }
        if !dump.jumps.is_empty() {
            let _ = writeln!(out, "*{table}");
            for jump in &dump.jumps {
                let _ = writeln!(out, "-D {}", jump.trim_start_matches("-A "));
            }
            out.push_str("COMMIT\n");
        }
        if !dump.chains.is_empty() {
            let _ = writeln!(out, "*{table}");
            for chain in dump.chains.iter().rev() {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
            let _ = writeln!(out, "COMMIT\n*{table}");
            for chain in dump.chains.iter().rev() {
                let _ = writeln!(out, "-X {chain}");
            }
            out.push_str("COMMIT\n");
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FP-SERVICES - [0:0]
:FP-SVC-ABC - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment \"fleetproxy service portals\" -j FP-SERVICES
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -d 10.0.0.0/8 -j ACCEPT
-A FP-SERVICES -m comment --comment \"ns/a:http cluster IP\" -m tcp -p tcp -d 10.96.0.1/32 --dport 80 -j FP-SVC-ABC
-A FP-SVC-ABC -j FP-SEP-X
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FP-FORWARD - [0:0]
-A INPUT -j FP-FORWARD
COMMIT
";

    #[test]
    fn parses_ours_only() {
        let nat = parse_table(DUMP, Table::Nat);
        assert_eq!(nat.chains, ["FP-SERVICES", "FP-SVC-ABC"].map(String::from).into());
        assert_eq!(
            nat.jumps,
            vec!["-A PREROUTING -m comment --comment \"fleetproxy service portals\" -j FP-SERVICES"]
        );
        assert_eq!(nat.rules, 2);
        assert_eq!(nat.rule_count(), 3);
        let filter = parse_table(DUMP, Table::Filter);
        assert_eq!(filter.rule_count(), 1);
        let kernel = kernel_chains(&nat, &filter);
        assert!(kernel.jumps.contains(&(Table::Nat, "PREROUTING".into(), "FP-SERVICES".into())));
        assert!(kernel.jumps.contains(&(Table::Filter, "INPUT".into(), "FP-FORWARD".into())));
    }

    #[test]
    fn cleanup_removes_jumps_then_chains() {
        let nat = parse_table(DUMP, Table::Nat);
        let filter = parse_table(DUMP, Table::Filter);
        let tables = [(Table::Filter, &filter), (Table::Nat, &nat)];
        let input = cleanup_input(&tables, false).expect("something to clean");
        assert_eq!(
            input,
            "*filter\n:FP-FORWARD - [0:0]\n-D INPUT -j FP-FORWARD\n-X FP-FORWARD\nCOMMIT\n\
             *nat\n:FP-SERVICES - [0:0]\n:FP-SVC-ABC - [0:0]\n\
             -D PREROUTING -m comment --comment \"fleetproxy service portals\" -j FP-SERVICES\n\
             -X FP-SERVICES\n-X FP-SVC-ABC\nCOMMIT\n"
        );
        let input = cleanup_input(&tables, true).expect("something to clean");
        assert_eq!(
            input,
            "*filter\n-D INPUT -j FP-FORWARD\nCOMMIT\n\
             *filter\n:FP-FORWARD - [0:0]\nCOMMIT\n*filter\n-X FP-FORWARD\nCOMMIT\n\
             *nat\n-D PREROUTING -m comment --comment \"fleetproxy service portals\" -j FP-SERVICES\nCOMMIT\n\
             *nat\n:FP-SVC-ABC - [0:0]\n:FP-SERVICES - [0:0]\nCOMMIT\n\
             *nat\n-X FP-SVC-ABC\n-X FP-SERVICES\nCOMMIT\n"
        );
        for split in [false, true] {
            assert_eq!(cleanup_input(&[(Table::Nat, &TableDump::default())], split), None);
        }
    }
}
