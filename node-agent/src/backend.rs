//! One data plane per mode behind one type, so that the sync loop can hold "the active backend" and
//! "the next one" without generics, and switch between them at run time.

use fleetproxy_api::ProxyMode;

use crate::{
    dataplane::{Changes, DataPlane, DataPlaneError, SyncStats},
    exec::Runner,
    iptables::IptablesProxier,
    ipvs::IpvsProxier,
    nftables::NftablesProxier,
    policy::{NodeSettings, ServicePlan},
};

/// The data plane of one mode.
#[derive(Debug)]
pub enum Backend {
    Iptables(IptablesProxier),
    Nftables(NftablesProxier),
    Ipvs(IpvsProxier),
}

impl Backend {
    /// The data plane of `mode`, running its tools through `runner`. Nothing touches the kernel yet.
    pub fn new(mode: ProxyMode, runner: Runner) -> Self {
        match mode {
            ProxyMode::Iptables => Self::Iptables(IptablesProxier::new(runner)),
            ProxyMode::Nftables => Self::Nftables(NftablesProxier::new(runner)),
            ProxyMode::Ipvs => Self::Ipvs(IpvsProxier::new(runner)),
        }
    }

    /// The ProxyConfig's IPVS scheduler (`spec.ipvs.scheduler`); other modes ignore it.
    pub fn set_ipvs_scheduler(&mut self, scheduler: fleetproxy_api::IpvsScheduler) {
        if let Self::Ipvs(backend) = self {
            backend.set_scheduler(scheduler);
        }
    }
}

impl DataPlane for Backend {
    fn mode(&self) -> ProxyMode {
        match self {
            Self::Iptables(backend) => backend.mode(),
            Self::Nftables(backend) => backend.mode(),
            Self::Ipvs(backend) => backend.mode(),
        }
    }

    async fn probe(&self) -> Result<(), DataPlaneError> {
        match self {
            Self::Iptables(backend) => backend.probe().await,
            Self::Nftables(backend) => backend.probe().await,
            Self::Ipvs(backend) => backend.probe().await,
        }
    }

    async fn sync(
        &mut self,
        plans: &[ServicePlan],
        settings: &NodeSettings,
        changes: &Changes,
    ) -> Result<SyncStats, DataPlaneError> {
        match self {
            Self::Iptables(backend) => backend.sync(plans, settings, changes).await,
            Self::Nftables(backend) => backend.sync(plans, settings, changes).await,
            Self::Ipvs(backend) => backend.sync(plans, settings, changes).await,
        }
    }

    async fn rule_count(&self) -> Result<u64, DataPlaneError> {
        match self {
            Self::Iptables(backend) => backend.rule_count().await,
            Self::Nftables(backend) => backend.rule_count().await,
            Self::Ipvs(backend) => backend.rule_count().await,
        }
    }

    async fn cleanup(&mut self) -> Result<(), DataPlaneError> {
        match self {
            Self::Iptables(backend) => backend.cleanup().await,
            Self::Nftables(backend) => backend.cleanup().await,
            Self::Ipvs(backend) => backend.cleanup().await,
        }
    }
}
