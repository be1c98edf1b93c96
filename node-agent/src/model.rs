//! The agent's view of the cluster, as plain data: service ports and their endpoints.
//!
//! Built by the change tracker ([`crate::tracker`]) from Services and EndpointSlices; read by the
//! traffic-policy layer ([`crate::policy`]). Nothing here talks to the API server or the kernel.

use std::{collections::BTreeMap, fmt, net::IpAddr, time::Duration};

use ipnet::IpNet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The name iptables and nftables use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    pub fn of_net(net: &IpNet) -> Self {
        Self::of(&net.addr())
    }
}

/// One port of one Service: `namespace/name:port-name` (the port name may be empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port)?;
        if self.protocol != Protocol::Tcp {
            write!(f, "/{}", self.protocol.as_str())?;
        }
        Ok(())
    }
}

/// A Service port as the proxy needs it. Addresses of both families sit together; the policy layer
/// splits them by family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub node_port: Option<u16>,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// Empty: any source may reach the load-balancer IPs.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// sessionAffinity ClientIP, with its timeout.
    pub session_affinity: Option<Duration>,
    /// externalTrafficPolicy: Local.
    pub external_policy_local: bool,
    /// internalTrafficPolicy: Local.
    pub internal_policy_local: bool,
    /// trafficDistribution: PreferClose (or the older topology-aware hints annotation).
    pub prefer_close: bool,
}

/// One endpoint of a service port, from an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint runs on this node.
    pub is_local: bool,
    /// Zones this endpoint is hinted for (EndpointSlice hints.forZones).
    pub zone_hints: Vec<String>,
}

/// Everything the proxy serves, keyed by service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyModel {
    pub services: BTreeMap<ServicePortName, ServicePort>,
    /// Endpoints per service port, sorted and deduplicated.
    pub endpoints: BTreeMap<ServicePortName, Vec<Endpoint>>,
    /// This node's topology zone (label topology.kubernetes.io/zone), for PreferClose and hints.
    pub node_zone: Option<String>,
}
