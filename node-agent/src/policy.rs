//! The traffic-policy layer: computed once per sync from the model and shared by every backend, so
//! that iptables, nftables and IPVS make the same choices.

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;

use crate::model::{IpFamily, Protocol, ServicePortName};

/// An endpoint address a backend sends traffic to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node (traffic to it needs no masquerade for Local policy).
    pub is_local: bool,
}

/// One service port in one address family, with every decision a backend needs already made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePlan {
    pub name: ServicePortName,
    pub family: IpFamily,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Addresses of this family only, excluded CIDRs already removed.
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// Sources allowed to reach the load-balancer IPs (this family); empty: any source.
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub session_affinity: Option<Duration>,
    /// Endpoints for traffic to the cluster IPs (internalTrafficPolicy, topology, fallback to
    /// serving-terminating endpoints applied). Empty: reject.
    pub cluster_targets: Vec<Target>,
    /// Endpoints for traffic to node ports, external IPs and load-balancer IPs (externalTrafficPolicy
    /// applied). Empty: reject (or drop, for Local policy with endpoints elsewhere).
    pub external_targets: Vec<Target>,
    /// externalTrafficPolicy Local: external traffic keeps its source address (no masquerade) and
    /// only local endpoints serve it.
    pub external_policy_local: bool,
    /// internalTrafficPolicy Local.
    pub internal_policy_local: bool,
}

impl ServicePlan {
    /// Every distinct target of either kind of traffic, sorted: one endpoint chain/element each.
    pub fn all_targets(&self) -> Vec<Target> {
        let mut all: Vec<Target> = self.cluster_targets.iter().chain(&self.external_targets).copied().collect();
        all.sort();
        all.dedup();
        all
    }

    /// Whether this port is reachable from outside the node at all (node port, external or LB IPs).
    pub fn has_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.load_balancer_ips.is_empty()
    }
}

/// Node-wide settings every backend renders with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSettings {
    /// Destinations never intercepted.
    pub excluded_cidrs: Vec<IpNet>,
    /// Pod networks: traffic to a Service from outside them is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    /// Local addresses node ports are served on; empty: every local address.
    pub node_port_addresses: Vec<IpNet>,
}
