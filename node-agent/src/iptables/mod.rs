//! The iptables data plane: kube-proxy's iptables proxier, with chains of our own (`FP-`).
//!
//! [`render`] turns service plans into `iptables-restore` input (pure); [`IptablesProxier`] applies
//! it with one `iptables-restore --noflush` per address family and sync (and `ip6tables-restore` for
//! IPv6), reads the kernel back with `iptables-save`, and cleans up. Tools run through [`Runner`], so
//! tests can point the proxier at a network namespace. With the nf_tables backend, large nat updates
//! are cut into several transactions (see [`render::Split`] and "Transactions" in [`render`]).
//!
//! Full syncs read our chains back from the kernel first, so that they add only missing jump rules
//! and delete chains of ours nothing references any more. Partial syncs trust what the last
//! successful sync wrote and rewrite only the changed services' chains and the top-level chains
//! whose rules changed; any failure makes the next sync a full one.

pub mod render;
pub mod save;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use fleetproxy_api::ProxyMode;

use self::{
    render::{Applied, CHAIN_PREFIX, Mode, Split, Table},
    save::TableDump,
};
use crate::{
    dataplane::{Changes, DataPlane, DataPlaneError, SyncStats, read_back_idle},
    exec::Runner,
    model::IpFamily,
    nftables::count::count_xtables_rules,
    policy::{NodeSettings, ServicePlan},
};

/// Seconds `iptables-restore` waits for the xtables lock held by another writer.
const LOCK_WAIT: &str = "--wait=5";

/// The tools of one address family.
#[derive(Clone, Copy, Debug)]
struct Tools {
    restore: &'static str,
    save: &'static str,
    iptables: &'static str,
}

fn tools(family: IpFamily) -> Tools {
    match family {
        IpFamily::V4 => Tools { restore: "iptables-restore", save: "iptables-save", iptables: "iptables" },
        IpFamily::V6 => Tools { restore: "ip6tables-restore", save: "ip6tables-save", iptables: "ip6tables" },
    }
}

/// Whether `tool` is an executable file on `PATH` (or in the usual sbin directories).
fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(Into::into))
        .any(|dir| Path::new(&dir).join(tool).is_file())
}

/// The iptables data plane of one node.
#[derive(Debug)]
pub struct IptablesProxier {
    runner: Runner,
    families: Vec<IpFamily>,
    /// Per family: what the last successful sync wrote; absent until a full sync of that family
    /// succeeded.
    applied: BTreeMap<IpFamily, Applied>,
    /// A sync failed: the next one must be full, whatever the caller says.
    needs_full: bool,
    warned_no_ipv6: bool,
    /// Per family: whether its `iptables-restore` is the nf_tables one; asked once per proxier.
    nf_tables: BTreeMap<IpFamily, bool>,
    /// Set by [`Self::force_split`].
    split_override: Option<Split>,
}

impl IptablesProxier {
    /// A proxier that runs its tools through `runner` (`Runner::host()` on a node,
    /// `Runner::in_netns(..)` in tests). IPv6 is programmed when `ip6tables-restore` is installed;
    /// otherwise IPv6 plans are skipped with a warning.
    pub fn new(runner: Runner) -> Self {
        let mut families = vec![IpFamily::V4];
        if on_path(tools(IpFamily::V6).restore) {
            families.push(IpFamily::V6);
        } else {
            tracing::warn!(
                "ip6tables-restore not found: IPv6 services will not be programmed in iptables mode"
            );
        }
        Self::with_families(runner, families)
    }

    /// A proxier limited to `families`.
    pub fn with_families(runner: Runner, families: Vec<IpFamily>) -> Self {
        Self {
            runner,
            families,
            applied: BTreeMap::new(),
            needs_full: true,
            warned_no_ipv6: false,
            nf_tables: BTreeMap::new(),
            split_override: None,
        }
    }

    /// Lays out every render as `split` says, whatever the backend (tests of the split layout).
    pub fn force_split(&mut self, split: Split) {
        self.split_override = Some(split);
    }

    /// The address families this proxier programs.
    pub fn families(&self) -> &[IpFamily] {
        &self.families
    }

    /// `iptables-save -t <table>` of one family, parsed.
    async fn dump(&self, family: IpFamily, table: Table) -> Result<TableDump, DataPlaneError> {
        let tool = tools(family).save;
        let text = self.runner.run(tool, &["-t", table.as_str()], None).await.map_err(|e| {
            DataPlaneError::ReadBack {
                what: format!("{} {} table", family_name(family), table.as_str()),
                message: e.to_string(),
            }
        })?;
        Ok(save::parse_table(&text, table))
    }

    /// Whether `family`'s `iptables-restore` is the nf_tables one; `None` if it cannot be asked.
    async fn is_nf_tables(&self, family: IpFamily) -> Option<bool> {
        if let Some(&known) = self.nf_tables.get(&family) {
            return Some(known);
        }
        match self.runner.run(tools(family).restore, &["--version"], None).await {
            // "iptables-restore v1.8.9 (nf_tables)"; legacy says "(legacy)" or nothing.
            Ok(version) => Some(version.contains("nf_tables")),
            Err(e) => {
                tracing::debug!(error = %e, "{} --version failed", tools(family).restore);
                None
            }
        }
    }

    /// How renders for `family` may be split: only the nf_tables backend gains from several
    /// transactions; with iptables-legacy each one rewrites the whole table.
    async fn split(&mut self, family: IpFamily) -> Split {
        if let Some(split) = self.split_override {
            return split;
        }
        // Not remembered when unknown: a later sync asks again.
        let nf_tables = self.is_nf_tables(family).await;
        if let Some(known) = nf_tables {
            self.nf_tables.insert(family, known);
        }
        if nf_tables == Some(true) { Split::Auto } else { Split::Never }
    }

    /// Our rules of `family` in iptables-nft's tables, counted over netlink (`iptables-save` would
    /// print the whole table: at 10,000 services, seconds and hundreds of MiB).
    async fn count_over_netlink(&self, family: IpFamily) -> Result<u64, DataPlaneError> {
        let netns = self.runner.netns().map(str::to_owned);
        read_back_idle(format!("{} iptables rules", family_name(family)), move || {
            let tables = [Table::Nat.as_str(), Table::Filter.as_str()];
            count_xtables_rules(netns.as_deref(), family, &tables, CHAIN_PREFIX)
        })
        .await
    }

    async fn restore(&self, family: IpFamily, input: &str) -> Result<(), DataPlaneError> {
        self.runner
            .run(tools(family).restore, &["--noflush", LOCK_WAIT], Some(input.as_bytes()))
            .await
            .map(drop)
    }

    /// Renders and applies one family; returns (render time, apply time, lines).
    async fn sync_family(
        &mut self,
        family: IpFamily,
        plans: &[ServicePlan],
        settings: &NodeSettings,
        changes: Option<&BTreeSet<crate::model::ServicePortName>>,
    ) -> Result<(Duration, Duration, usize), DataPlaneError> {
        let split = self.split(family).await;
        let mut apply = Duration::ZERO;
        let existing;
        let mode = match (changes, self.applied.get(&family)) {
            (Some(changed), Some(previous)) => Mode::Partial { changed, previous },
            _ => {
                let started = Instant::now();
                let nat = self.dump(family, Table::Nat).await?;
                let filter = self.dump(family, Table::Filter).await?;
                existing = save::kernel_chains(&nat, &filter);
                apply += started.elapsed();
                Mode::Full { existing: &existing }
            }
        };
        let started = Instant::now();
        let rendered = render::render(family, plans, settings, &mode, split);
        let render_time = started.elapsed();

        let started = Instant::now();
        if !rendered.text.is_empty() {
            self.restore(family, &rendered.text).await?;
        }
        apply += started.elapsed();
        self.applied.insert(family, rendered.applied);
        Ok((render_time, apply, rendered.lines))
    }
}

fn family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

impl DataPlane for IptablesProxier {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Iptables
    }

    async fn probe(&self) -> Result<(), DataPlaneError> {
        let unsupported = |reason: String| DataPlaneError::Unsupported { mode: ProxyMode::Iptables, reason };
        for tool in ["iptables-restore", "iptables-save"] {
            if !on_path(tool) {
                return Err(unsupported(format!("{tool} is not installed")));
            }
        }
        // One small builtin chain: listing the whole nat table of a big node takes seconds.
        self.runner
            .run(tools(IpFamily::V4).iptables, &[LOCK_WAIT, "-t", "nat", "-L", "POSTROUTING", "-n"], None)
            .await
            .map_err(|e| unsupported(e.to_string()))?;
        Ok(())
    }

    async fn sync(
        &mut self,
        plans: &[ServicePlan],
        settings: &NodeSettings,
        changes: &Changes,
    ) -> Result<SyncStats, DataPlaneError> {
        let changed = match changes {
            Changes::Services(set) if !self.needs_full => Some(set),
            _ => None,
        };
        if !self.families.contains(&IpFamily::V6)
            && !self.warned_no_ipv6
            && plans.iter().any(|p| p.family == IpFamily::V6)
        {
            tracing::warn!("skipping IPv6 services: ip6tables-restore is not installed");
            self.warned_no_ipv6 = true;
        }
        let full = changed.is_none() || self.families.iter().any(|f| !self.applied.contains_key(f));
        let mut stats = SyncStats { full, ..SyncStats::default() };
        // Assume failure until every family went through.
        self.needs_full = true;
        for family in self.families.clone() {
            let (render, apply, lines) = self.sync_family(family, plans, settings, changed).await?;
            stats.render += render;
            stats.apply += apply;
            stats.payload_size += lines;
        }
        self.needs_full = false;
        Ok(stats)
    }

    async fn rule_count(&self) -> Result<u64, DataPlaneError> {
        let mut count = 0;
        for &family in &self.families {
            count += if self.is_nf_tables(family).await == Some(true) {
                self.count_over_netlink(family).await?
            } else {
                let mut count = 0;
                for table in [Table::Nat, Table::Filter] {
                    count += self.dump(family, table).await?.rule_count();
                }
                count
            };
        }
        Ok(count)
    }

    async fn cleanup(&mut self) -> Result<(), DataPlaneError> {
        self.needs_full = true;
        self.applied.clear();
        for family in self.families.clone() {
            let filter = self.dump(family, Table::Filter).await?;
            let nat = self.dump(family, Table::Nat).await?;
            let split = self.split(family).await != Split::Never;
            if let Some(input) = save::cleanup_input(&[(Table::Filter, &filter), (Table::Nat, &nat)], split) {
                self.restore(family, &input).await?;
            }
        }
        Ok(())
    }
}
