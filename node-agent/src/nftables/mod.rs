//! The nftables data plane: one table of our own per family (`ip fleetproxy`, `ip6 fleetproxy`),
//! programmed with `nft -f -` in one transaction per sync for both families.
//!
//! [`render`] is the pure part (plans + settings → script, see its docs for the table layout);
//! [`NftablesProxier`] runs it against the kernel, keeps what it last applied so that the next
//! partial sync sends only the difference, reads the kernel back for the rule count, and removes
//! its two tables on clean-up — nothing else.

pub mod names;
pub mod readback;
pub mod render;

use std::time::Instant;

use fleetproxy_api::ProxyMode;

pub use self::render::{KernelObjects, RenderedState, Rendering, TABLE, render_full, render_partial};
use crate::{
    dataplane::{Changes, DataPlane, DataPlaneError, SyncStats},
    exec::Runner,
    policy::{NodeSettings, ServicePlan},
};

const NFT: &str = "nft";

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

    /// Renders the next sync: partial when the changes allow it and the kernel's contents are
    /// known, full otherwise (reading the names of our objects from the kernel if needed).
    async fn render(
        &self,
        plans: &[ServicePlan],
        settings: &NodeSettings,
        changes: &Changes,
    ) -> Result<Rendering, DataPlaneError> {
        match (&self.applied, changes) {
            (Some(applied), Changes::Services(changed)) if applied.settings == *settings => {
                Ok(render_partial(applied, plans, changed))
            }
            (Some(applied), _) => Ok(render_full(plans, settings, &applied.objects())),
            (None, _) => {
                let existing = self.kernel_objects().await?;
                Ok(render_full(plans, settings, &existing))
            }
        }
    }

    /// The families our table exists in now.
    async fn our_tables(&self) -> Result<Vec<String>, DataPlaneError> {
        let json = self.runner.run(NFT, &["-j", "list", "tables"], None).await?;
        readback::our_tables(&json).map_err(|message| DataPlaneError::ReadBack { what: "nftables tables".into(), message })
    }

    /// The names of our chains, sets and maps in the kernel, per family.
    async fn kernel_objects(&self) -> Result<KernelObjects, DataPlaneError> {
        let mut objects = KernelObjects::default();
        for family in self.our_tables().await? {
            let json = self.runner.run(NFT, &["-j", "-t", "list", "table", &family, TABLE], None).await?;
            let table = readback::table_objects(&json)
                .map_err(|message| DataPlaneError::ReadBack { what: format!("table {family} {TABLE}"), message })?;
            match family.as_str() {
                "ip" => objects.v4 = table,
                "ip6" => objects.v6 = table,
                _ => {}
            }
        }
        Ok(objects)
    }
}

impl DataPlane for NftablesProxier {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Nftables
    }

    async fn probe(&self) -> Result<(), DataPlaneError> {
        self.runner.run(NFT, &["list", "tables"], None).await.map(drop).map_err(|e| DataPlaneError::Unsupported {
            mode: ProxyMode::Nftables,
            reason: e.to_string(),
        })
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
        let rendering = match self.render(plans, settings, changes).await {
            Ok(r) => r,
            Err(e) => {
                self.applied = None;
                return Err(e);
            }
        };
        let render = started.elapsed();

        let started = Instant::now();
        if !rendering.is_empty() {
            let applied = self.runner.run(NFT, &["-f", "-"], Some(rendering.script.as_bytes())).await;
            if let Err(e) = applied {
                // The transaction was refused as a whole, but what the kernel holds is no longer
                // certain to match what we think: the next sync must be a full one.
                self.applied = None;
                return Err(e);
            }
        }
        let apply = started.elapsed();
        self.applied = Some(rendering.state);
        Ok(SyncStats { render, apply, full: rendering.full, payload_size: rendering.lines })
    }

    async fn rule_count(&self) -> Result<u64, DataPlaneError> {
        let mut count = 0;
        for family in self.our_tables().await? {
            let json = self.runner.run(NFT, &["-j", "list", "table", &family, TABLE], None).await?;
            count += readback::count_rules(&json)
                .map_err(|message| DataPlaneError::ReadBack { what: format!("table {family} {TABLE}"), message })?;
        }
        Ok(count)
    }

    async fn cleanup(&mut self) -> Result<(), DataPlaneError> {
        self.applied = None;
        let script: String =
            self.our_tables().await?.iter().map(|family| format!("delete table {family} {TABLE}\n")).collect();
        if !script.is_empty() {
            self.runner.run(NFT, &["-f", "-"], Some(script.as_bytes())).await?;
        }
        Ok(())
    }
}
