//! What every backend (iptables, nftables, IPVS) offers the sync loop.
//!
//! A backend renders [`ServicePlan`]s with a pure renderer and applies the result in one kernel
//! transaction per sync. Objects it creates carry its own prefix or live in its own table, so that it
//! never touches what it does not own.

use std::{collections::BTreeSet, future::Future, time::Duration};

use fleetproxy_api::ProxyMode;

use crate::{
    model::ServicePortName,
    policy::{NodeSettings, ServicePlan},
};

/// What changed since the backend's last successful sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Rewrite everything: first sync, after any failure, every syncPeriod, settings changed.
    Full,
    /// Only these service ports changed (added, updated or removed); the rest is as last applied.
    Services(BTreeSet<ServicePortName>),
}

/// What one sync did, for metrics and the ProxyNode status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Time spent rendering (pure).
    pub render: Duration,
    /// Time spent in the kernel transaction (iptables-restore, nft -f, netlink).
    pub apply: Duration,
    /// Whether the sync rewrote everything.
    pub full: bool,
    /// Size of what was sent to the kernel, in lines or messages.
    pub payload_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// This node cannot run the mode (missing binary, kernel module or permission).
    #[error("{mode} mode is not available on this node: {reason}")]
    Unsupported { mode: ProxyMode, reason: String },
    /// A tool or the kernel refused what we sent.
    #[error("{tool} failed: {message}")]
    Apply { tool: String, message: String },
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel's state could not be read back or parsed.
    #[error("cannot read back {what}: {message}")]
    ReadBack { what: String, message: String },
}

/// One data plane. Methods are called by one sync loop at a time.
pub trait DataPlane: Send {
    fn mode(&self) -> ProxyMode;

    /// Checks that this node can run the mode, without changing the kernel.
    fn probe(&self) -> impl Future<Output = Result<(), DataPlaneError>> + Send;

    /// Brings the kernel to the rendered state of `plans` in one transaction per address family.
    fn sync(
        &mut self,
        plans: &[ServicePlan],
        settings: &NodeSettings,
        changes: &Changes,
    ) -> impl Future<Output = Result<SyncStats, DataPlaneError>> + Send;

    /// Counts the rules (iptables rules, nftables rules and map/set elements, IPVS services and
    /// destinations) of ours that the kernel holds now, read from the kernel.
    fn rule_count(&self) -> impl Future<Output = Result<u64, DataPlaneError>> + Send;

    /// Removes every kernel object of this mode that is ours, and nothing else.
    fn cleanup(&mut self) -> impl Future<Output = Result<(), DataPlaneError>> + Send;
}

/// Runs a kernel read-back of `what` on a thread of its own at the lowest priority: dumping a
/// big node's rules takes the kernel a CPU-second, and syncs must not wait behind it.
pub async fn read_back_idle<T: Send + 'static>(
    what: String,
    read: impl FnOnce() -> Result<T, DataPlaneError> + Send + 'static,
) -> Result<T, DataPlaneError> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        if let Err(error) = rustix::process::setpriority_process(None, 19) {
            tracing::debug!(%error, "cannot lower the read-back thread's priority");
        }
        let _ = done.send(read());
    });
    result.await.map_err(|e| DataPlaneError::ReadBack { what, message: e.to_string() })?
}
