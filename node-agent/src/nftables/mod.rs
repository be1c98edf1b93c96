//! The nftables data plane: tables of our own in each family (`ip fleetproxy` and the service
//! shards `ip fleetproxy-services-N`, the same in `ip6`), programmed with `nft -f -`: one
//! transaction per partial sync, a few per full sync.
//!
//! [`render`] is the pure part (plans + settings → script, see its docs for the table layout);
//! [`NftablesProxier`] runs it against the kernel, keeps what it last applied so that the next
//! partial sync sends only the difference, reads the kernel back for the rule count, and removes
//! its tables on clean-up — nothing else.

pub mod count;
pub mod names;
pub mod netlink;
pub mod render;
pub mod ruleset;

use std::time::Instant;

use fleetproxy_api::ProxyMode;

pub use self::render::{
    KernelObjects, RenderedState, Rendering, SERVICES_PER_TRANSACTION, SHARDS, TABLE, Table, render_full,
    render_partial,
};
use crate::{
    dataplane::{Changes, DataPlane, DataPlaneError, SyncStats},
    exec::Runner,
    policy::{NodeSettings, ServicePlan},
};

const NFT: &str = "nft";

/// The size of one `nft -f` run: a small sync stays one transaction, a large full sync is cut where
/// the renderer allows (see [`render_full`]) to bound `nft`'s memory.
const LINES_PER_TRANSACTION: usize = 8_000;

/// The nftables backend.
#[derive(Debug, Default)]
pub struct NftablesProxier {
    runner: Runner,
    /// What the last successful sync applied; `None` at start and after any failure, when the
    /// kernel's contents are not known and the next sync is a full one.
    applied: Option<RenderedState>,
}

impl NftablesProxier {
    /// A proxier that runs `nft` through `runner` (on the host, or in a network namespace).
    pub fn new(runner: Runner) -> Self {
        Self { runner, applied: None }
    }

    /// What the last successful sync applied, if the proxier knows.
    pub fn applied(&self) -> Option<&RenderedState> {
        self.applied.as_ref()
    }

    /// Renders the next sync from what was applied before (consumed: it becomes the new state):
    /// partial when the changes allow it and the kernel's contents are known, full otherwise
    /// (reading the names of our objects from the kernel if they are not known).
    async fn render(
        &self,
        previous: Option<RenderedState>,
        plans: &[ServicePlan],
        settings: &NodeSettings,
        changes: &Changes,
    ) -> Result<Rendering, DataPlaneError> {
        match (previous, changes) {
            (Some(previous), Changes::Services(changed)) if previous.settings == *settings => {
                Ok(render_partial(previous, plans, changed))
            }
            (Some(previous), _) => Ok(render_full(plans, settings, &previous.objects())),
            (None, _) => {
                let existing = self.kernel_objects().await?;
                Ok(render_full(plans, settings, &existing))
            }
        }
    }

    /// Our tables in the kernel now.
    async fn our_tables(&self) -> Result<Vec<Table>, DataPlaneError> {
        let netns = self.runner.netns().map(str::to_owned);
        tokio::task::spawn_blocking(move || count::our_tables(netns.as_deref())).await.map_err(|e| {
            DataPlaneError::ReadBack { what: "nftables tables".into(), message: e.to_string() }
        })?
    }

    /// The names of our chains, sets and maps in the kernel, per table.
    async fn kernel_objects(&self) -> Result<KernelObjects, DataPlaneError> {
        let netns = self.runner.netns().map(str::to_owned);
        tokio::task::spawn_blocking(move || count::kernel_objects(netns.as_deref())).await.map_err(|e| {
            DataPlaneError::ReadBack { what: "nftables objects".into(), message: e.to_string() }
        })?
    }
}

impl DataPlane for NftablesProxier {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Nftables
    }

    async fn probe(&self) -> Result<(), DataPlaneError> {
        // The tool, then the kernel's nf_tables (over netlink: `nft list tables` would fetch every
        // rule of every table first).
        let unsupported = |reason: String| DataPlaneError::Unsupported { mode: ProxyMode::Nftables, reason };
        self.runner.run(NFT, &["--version"], None).await.map_err(|e| unsupported(e.to_string()))?;
        self.our_tables().await.map(drop).map_err(|e| unsupported(e.to_string()))
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
        // Until this sync succeeds, what the kernel holds is not known for sure.
        let previous = self.applied.take();
        let rendering = self.render(previous, plans, settings, changes).await?;
        let render = started.elapsed();

        let started = Instant::now();
        for transaction in rendering.transactions(LINES_PER_TRANSACTION) {
            // A refused transaction leaves `applied` empty: the next sync is a full one.
            let script = render::script(transaction);
            self.runner.run(NFT, &["-f", "-"], Some(script.as_bytes())).await?;
        }
        let apply = started.elapsed();
        self.applied = Some(rendering.state);
        Ok(SyncStats { render, apply, full: rendering.full, payload_size: rendering.lines })
    }

    async fn rule_count(&self) -> Result<u64, DataPlaneError> {
        let netns = self.runner.netns().map(str::to_owned);
        let (done, counted) = tokio::sync::oneshot::channel();
        // A thread of its own at the lowest priority: dumping 100,000 rules takes the kernel a
        // CPU-second at 10,000 services, and syncs must not wait behind it.
        std::thread::spawn(move || {
            if let Err(error) = rustix::process::setpriority_process(None, 19) {
                tracing::debug!(%error, "cannot lower the read-back thread's priority");
            }
            let _ = done.send(count::count_rules(netns.as_deref()));
        });
        counted.await.map_err(|e| DataPlaneError::ReadBack {
            what: "our nftables tables".into(),
            message: e.to_string(),
        })?
    }

    async fn cleanup(&mut self) -> Result<(), DataPlaneError> {
        self.applied = None;
        let script: String =
            self.our_tables().await?.iter().map(|table| format!("delete table {table}\n")).collect();
        if !script.is_empty() {
            self.runner.run(NFT, &["-f", "-"], Some(script.as_bytes())).await?;
        }
        Ok(())
    }
}
