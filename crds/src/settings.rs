//! The proxy settings a node runs with: what a ProxyConfig asks for and a ProxyNode hands to one agent.

use std::{fmt, str::FromStr, time::Duration};

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::{Cidr, GoDuration, NodePortAddress};

/// How the agent programs the kernel.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// iptables rules loaded with iptables-restore; kube-proxy's default.
    #[default]
    Iptables,
    /// The kernel's IPVS load balancer (deprecated upstream since Kubernetes 1.35).
    Ipvs,
    /// One nftables table per address family.
    Nftables,
}

impl ProxyMode {
    pub const ALL: [ProxyMode; 3] = [ProxyMode::Iptables, ProxyMode::Ipvs, ProxyMode::Nftables];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Ipvs => "ipvs",
            Self::Nftables => "nftables",
        }
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProxyMode {
    type Err = SettingsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|mode| mode.as_str() == text).ok_or_else(|| {
            SettingsError(vec![format!("unknown mode {text:?}: use iptables, ipvs or nftables")])
        })
    }
}

/// IPVS scheduling algorithms, named as `ipvsadm -s` names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IpvsScheduler {
    /// Round robin.
    #[default]
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connection.
    Lc,
    /// Weighted least connection.
    Wlc,
    /// Locality-based least connection.
    Lblc,
    /// Locality-based least connection with replication.
    Lblcr,
    /// Source hashing.
    Sh,
    /// Destination hashing.
    Dh,
    /// Shortest expected delay.
    Sed,
    /// Never queue.
    Nq,
    /// Maglev hashing.
    Mh,
}

impl IpvsScheduler {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Wrr => "wrr",
            Self::Lc => "lc",
            Self::Wlc => "wlc",
            Self::Lblc => "lblc",
            Self::Lblcr => "lblcr",
            Self::Sh => "sh",
            Self::Dh => "dh",
            Self::Sed => "sed",
            Self::Nq => "nq",
            Self::Mh => "mh",
        }
    }

    /// The kernel module that implements this scheduler.
    pub fn kernel_module(self) -> String {
        format!("ip_vs_{}", self.as_str())
    }
}

/// Settings read only in IPVS mode. They may stay set in other modes, so that switching the fleet off
/// IPVS is a one-field change (`spec.mode`), as kube-proxy also ignores its ipvs section outside IPVS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpvsSettings {
    /// The scheduling algorithm of every virtual server.
    #[serde(default)]
    pub scheduler: IpvsScheduler,
}

fn default_sync_period() -> GoDuration {
    GoDuration::from(Duration::from_secs(30))
}

fn default_min_sync_period() -> GoDuration {
    GoDuration::from(Duration::from_secs(1))
}

fn default_masquerade_bit() -> i32 {
    14
}

/// Everything that decides what an agent writes into its node's kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
// Each rule first checks the durations' own grammar (the pattern of `GoDuration`), so that a malformed
// one is reported only by its field's rule, and not here as a CEL type conversion error.
#[x_kube(
    validation = Rule::new(
        r"!self.syncPeriod.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || duration(self.syncPeriod) > duration('0s')"
    ).message("syncPeriod must be longer than 0s"),
    validation = Rule::new(
        r"!self.minSyncPeriod.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || !self.syncPeriod.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || duration(self.syncPeriod) == duration('0s') || duration(self.minSyncPeriod) <= duration(self.syncPeriod)"
    ).message("minSyncPeriod must not be longer than syncPeriod"),
)]
pub struct ProxySettings {
    /// The data plane: iptables, ipvs or nftables.
    #[serde(default)]
    pub mode: ProxyMode,

    /// IPVS-only settings.
    #[serde(default)]
    pub ipvs: IpvsSettings,

    /// Destinations that are never intercepted, and whose kernel objects are never removed.
    #[serde(default, rename = "excludedCIDRs")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "set"))]
    pub excluded_cidrs: Vec<Cidr>,

    /// The longest time between two full resyncs of the rules.
    #[serde(default = "default_sync_period")]
    pub sync_period: GoDuration,

    /// The shortest time between two syncs; changes arriving faster are batched.
    #[serde(default = "default_min_sync_period")]
    pub min_sync_period: GoDuration,

    /// Pod networks, at most one per family. Traffic to a Service from outside them is masqueraded.
    #[serde(default, rename = "clusterCIDRs")]
    #[schemars(length(max = 2), extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(validation = Rule::new(
        "self.filter(c, c.contains(':')).size() <= 1 && self.filter(c, !c.contains(':')).size() <= 1"
    ).message("clusterCIDRs takes at most one IPv4 and one IPv6 CIDR"))]
    pub cluster_cidrs: Vec<Cidr>,

    /// Masquerade all traffic sent to Service IPs, not only traffic from outside the cluster CIDRs.
    #[serde(default)]
    pub masquerade_all: bool,

    /// The bit of the packet mark that flags a packet for masquerading (kube-proxy's masqueradeBit).
    #[serde(default = "default_masquerade_bit")]
    #[schemars(range(min = 0, max = 31))]
    pub masquerade_bit: i32,

    /// Addresses NodePorts are served on: CIDRs, or `primary` for the node's primary addresses.
    /// Empty means every local address.
    #[serde(default)]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(validation = Rule::new("!('primary' in self) || self.size() == 1")
        .message("'primary' must be the only entry of nodePortAddresses"))]
    pub node_port_addresses: Vec<NodePortAddress>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            mode: ProxyMode::default(),
            ipvs: IpvsSettings::default(),
            excluded_cidrs: Vec::new(),
            sync_period: default_sync_period(),
            min_sync_period: default_min_sync_period(),
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            masquerade_bit: default_masquerade_bit(),
            node_port_addresses: Vec::new(),
        }
    }
}

/// Every problem found in a [`ProxySettings`], each phrased as what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid proxy settings: {}", .0.join("; "))]
pub struct SettingsError(pub Vec<String>);

impl ProxySettings {
    /// The agent's own check of what the API server already validated: an agent must not program a
    /// kernel from settings written by an older operator, a newer API, or around admission.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let mut problems = Vec::new();
        if self.min_sync_period.as_duration() > self.sync_period.as_duration() {
            problems.push(format!(
                "minSyncPeriod {} must not be longer than syncPeriod {}",
                self.min_sync_period, self.sync_period
            ));
        }
        if self.sync_period.as_duration().is_zero() {
            problems.push("syncPeriod must be longer than 0s".to_owned());
        }
        if !(0..=31).contains(&self.masquerade_bit) {
            problems.push(format!("masqueradeBit {} must be between 0 and 31", self.masquerade_bit));
        }
        let v4 = self.cluster_cidrs.iter().filter(|c| c.is_ipv4()).count();
        if v4 > 1 || self.cluster_cidrs.len() - v4 > 1 {
            problems.push("clusterCIDRs takes at most one IPv4 and one IPv6 CIDR".to_owned());
        }
        if self.node_port_addresses.contains(&NodePortAddress::Primary) && self.node_port_addresses.len() > 1
        {
            problems.push("'primary' must be the only entry of nodePortAddresses".to_owned());
        }
        if problems.is_empty() { Ok(()) } else { Err(SettingsError(problems)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_kube_proxys() {
        let settings: ProxySettings = serde_json::from_value(serde_json::json!({})).expect("empty settings");
        assert_eq!(settings, ProxySettings::default());
        assert_eq!(settings.mode, ProxyMode::Iptables);
        assert_eq!(settings.sync_period.as_duration(), Duration::from_secs(30));
        assert_eq!(settings.min_sync_period.as_duration(), Duration::from_secs(1));
        assert_eq!(settings.masquerade_bit, 14);
        assert_eq!(settings.validate(), Ok(()));
    }

    #[test]
    fn validate_names_every_problem() {
        let settings: ProxySettings = serde_json::from_value(serde_json::json!({
            "syncPeriod": "1s",
            "minSyncPeriod": "5s",
            "masqueradeBit": 32,
            "clusterCIDRs": ["10.0.0.0/8", "172.16.0.0/12"],
            "nodePortAddresses": ["primary", "10.0.0.0/8"],
        }))
        .expect("parses");
        let problems = settings.validate().expect_err("invalid").0;
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn mode_names_round_trip() {
        for mode in ProxyMode::ALL {
            assert_eq!(mode.as_str().parse::<ProxyMode>(), Ok(mode));
            assert_eq!(serde_json::to_value(mode).ok(), Some(serde_json::json!(mode.as_str())));
        }
        assert!("IPVS".parse::<ProxyMode>().is_err());
    }

    #[test]
    fn unknown_fields_of_bad_types_are_refused() {
        assert!(serde_json::from_value::<ProxySettings>(serde_json::json!({"mode": "userspace"})).is_err());
        assert!(
            serde_json::from_value::<ProxySettings>(serde_json::json!({"excludedCIDRs": ["10.0.0.1/8"]}))
                .is_err()
        );
        assert!(serde_json::from_value::<ProxySettings>(serde_json::json!({"syncPeriod": "-1s"})).is_err());
    }
}
