//! The nftables data plane: tables of our own in each family (`ip fleetproxy` and the service
//! shards `ip fleetproxy-services-N`, the same in `ip6`), programmed over nftables netlink: one
//! transaction per partial sync, a few per full sync. No `nft` process: starting one, its fetch
//! of our whole ruleset and its parsing cost 60-200 ms and 25-75 MiB per sync at 10,000 services.
//!
//! [`render`] is the pure part (plans + settings → [`ruleset::Command`]s, see its docs for the
//! table layout); [`netlink`] encodes and sends them; [`NftablesProxier`] keeps what it last
//! applied so that the next partial sync sends only the difference, reads the kernel back
//! ([`count`]) for the rule count and the names of stale objects, and removes its tables on
//! clean-up — nothing else.

pub mod count;
pub mod names;
pub mod netlink;
pub mod render;
pub mod ruleset;

use std::time::{Duration, Instant};

use fleetproxy_api::ProxyMode;

pub use self::render::{
    KernelObjects, RenderedState, Rendering, SERVICES_PER_TRANSACTION, SHARDS, TABLE, Table, Transactions,
    render_full, render_full_with, render_partial,
};
use self::ruleset::Command;
use crate::{
    dataplane::{Changes, DataPlane, DataPlaneError, SyncStats, read_back_idle},
    exec::Runner,
    policy::{NodeSettings, ServicePlan},
};

/// The size of one transaction: a small sync stays one, a large full sync is cut where the
/// renderer allows (see [`render_full`]) into pieces of about this many rules and elements, which
/// bounds the batch the agent builds (a few hundred bytes a rule) and the time the kernel holds
/// its nftables lock.
const LINES_PER_TRANSACTION: usize = 8_000;

/// The nftables backend.
#[derive(Debug, Default)]
pub struct NftablesProxier {
    /// Where the tables are: the runner's network namespace, or ours.
    runner: Runner,
    /// What the last successful sync applied; `None` at start and after any failure, when the
    /// kernel's contents are not known and the next sync is a full one.
    applied: Option<RenderedState>,
    /// The netlink socket to the kernel's nftables, opened at first use and dropped after an
    /// error.
    kernel: Option<netlink::Nftables>,
}

impl NftablesProxier {
    /// A proxier for the kernel's nftables in the runner's network namespace (or ours).
    pub fn new(runner: Runner) -> Self {
        Self { runner, applied: None, kernel: None }
    }

    /// What the last successful sync applied, if the proxier knows.
    pub fn applied(&self) -> Option<&RenderedState> {
        self.applied.as_ref()
    }

    /// The socket to the kernel's nftables: the open one, or a new one.
    fn take_kernel(&mut self) -> Result<netlink::Nftables, DataPlaneError> {
        match self.kernel.take() {
            Some(kernel) => Ok(kernel),
            None => netlink::Nftables::open(self.runner.netns()),
        }
    }

    /// Our tables in the kernel now.
    fn our_tables(&self) -> Result<Vec<Table>, DataPlaneError> {
        count::our_tables(self.runner.netns())
    }
}

impl DataPlane for NftablesProxier {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Nftables
    }

    async fn probe(&self) -> Result<(), DataPlaneError> {
        // The kernel's nf_tables, over netlink (as every sync talks to it; `nft list tables`
        // would fetch every rule of every table first).
        let unsupported = |reason: String| DataPlaneError::Unsupported { mode: ProxyMode::Nftables, reason };
        self.our_tables().map(drop).map_err(|e| unsupported(e.to_string()))
    }

    async fn sync(
        &mut self,
        plans: &[ServicePlan],
        settings: &NodeSettings,
        changes: &Changes,
    ) -> Result<SyncStats, DataPlaneError> {
        if settings.masquerade_bit > 31 {
            return Err(DataPlaneError::Apply {
                tool: "nftables renderer".into(),
                message: format!("masquerade bit {} is not in 0..=31", settings.masquerade_bit),
            });
        }
        let started = Instant::now();
        // Until this sync succeeds, what the kernel holds is not known for sure; a failure drops
        // the socket too (a new one starts clean).
        let previous = self.applied.take();
        let mut kernel = self.take_kernel()?;
        let mut applying = Duration::ZERO;
        // Netlink calls are made inline: a partial sync's transaction takes the kernel
        // milliseconds, and a full sync's pieces are applied while the next ones are rendered,
        // so that it never holds every service's rules at once.
        let mut apply = |commands: &[Command]| {
            let started = Instant::now();
            let applied = kernel.apply(commands);
            applying += started.elapsed();
            applied
        };
        let (state, full, lines) = match (previous, changes) {
            (Some(previous), Changes::Services(changed)) if previous.settings == *settings => {
                let rendering = render_partial(previous, plans, changed);
                apply(&rendering.commands)?;
                (rendering.state, false, rendering.lines)
            }
            (previous, _) => {
                let existing = match previous {
                    Some(previous) => previous.objects(),
                    None => count::kernel_objects(self.runner.netns())?,
                };
                let mut transactions = Transactions::new(LINES_PER_TRANSACTION);
                let mut lines = 0;
                let state = render_full_with(plans, settings, &existing, &mut |piece, n| {
                    lines += n;
                    transactions.add(piece, n).map_or(Ok(()), |transaction| apply(&transaction))
                })?;
                if let Some(last) = transactions.finish() {
                    apply(&last)?;
                }
                (state, true, lines)
            }
        };
        self.kernel = Some(kernel);
        self.applied = Some(state);
        let apply = applying;
        Ok(SyncStats { render: started.elapsed().saturating_sub(apply), apply, full, payload_size: lines })
    }

    async fn rule_count(&self) -> Result<u64, DataPlaneError> {
        let netns = self.runner.netns().map(str::to_owned);
        read_back_idle("our nftables tables".into(), move || count::count_rules(netns.as_deref())).await
    }

    async fn cleanup(&mut self) -> Result<(), DataPlaneError> {
        self.applied = None;
        let commands: Vec<Command> = self.our_tables()?.into_iter().map(Command::DeleteTable).collect();
        self.take_kernel()?.apply(&commands)
    }
}
