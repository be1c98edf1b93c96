//! The settings an agent runs with: [`ProxySettings`] (from its ProxyNode's spec, or from the
//! command line when no ProxyNode governs it) checked again and resolved against this node.

use std::{net::IpAddr, time::Duration};

use fleetproxy_api::{IpvsScheduler, NodePortAddress, ProxyMode, ProxySettings, SettingsError};
use ipnet::IpNet;

use crate::policy::NodeSettings;

/// Everything the sync loop needs from the settings, resolved for this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSettings {
    pub mode: ProxyMode,
    /// Read by the IPVS backend only.
    pub ipvs_scheduler: IpvsScheduler,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    /// What the backends render with.
    pub node: NodeSettings,
}

/// Validates `settings` again (the agent's own check: the API server's may have been bypassed or be
/// older than this agent) and resolves them for a node with the given primary addresses.
pub fn resolve(settings: &ProxySettings, node_ips: &[IpAddr]) -> Result<AgentSettings, SettingsError> {
    settings.validate()?;
    let masquerade_bit = u8::try_from(settings.masquerade_bit).map_err(|_| {
        SettingsError(vec![format!("masqueradeBit {} is out of range", settings.masquerade_bit)])
    })?;
    let mut node_port_addresses = Vec::new();
    for address in &settings.node_port_addresses {
        match address {
            NodePortAddress::Cidr(cidr) => node_port_addresses.push(cidr.net()),
            NodePortAddress::Primary if node_ips.is_empty() => {
                // Serving node ports on every address instead would expose them where the user
                // asked us not to: refuse until the Node's addresses are known.
                return Err(SettingsError(vec![
                    "nodePortAddresses 'primary' needs this node's addresses, which are not known yet".into(),
                ]));
            }
            NodePortAddress::Primary => {
                node_port_addresses.extend(node_ips.iter().map(|ip| IpNet::from(*ip)))
            }
        }
    }
    Ok(AgentSettings {
        mode: settings.mode,
        ipvs_scheduler: settings.ipvs.scheduler,
        sync_period: settings.sync_period.as_duration(),
        min_sync_period: settings.min_sync_period.as_duration(),
        node: NodeSettings {
            excluded_cidrs: settings.excluded_cidrs.iter().map(|cidr| cidr.net()).collect(),
            cluster_cidrs: settings.cluster_cidrs.iter().map(|cidr| cidr.net()).collect(),
            masquerade_all: settings.masquerade_all,
            masquerade_bit,
            node_port_addresses,
        },
    })
}

#[cfg(test)]
mod tests {
    use fleetproxy_api::GoDuration;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn defaults_resolve_to_kube_proxys() {
        let resolved = resolve(&ProxySettings::default(), &[]).expect("valid");
        assert_eq!(resolved.mode, ProxyMode::Iptables);
        assert_eq!(resolved.sync_period, Duration::from_secs(30));
        assert_eq!(resolved.min_sync_period, Duration::from_secs(1));
        assert_eq!(resolved.node, NodeSettings { masquerade_bit: 14, ..NodeSettings::default() });
    }

    #[test]
    fn every_field_is_carried_over() {
        let settings = ProxySettings {
            mode: ProxyMode::Nftables,
            ipvs: fleetproxy_api::IpvsSettings { scheduler: IpvsScheduler::Sh },
            excluded_cidrs: vec!["10.0.0.0/24".parse().expect("cidr")],
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().expect("cidr"),
                "fd00:10::/48".parse().expect("cidr"),
            ],
            masquerade_all: true,
            masquerade_bit: 3,
            sync_period: "1m".parse::<GoDuration>().expect("duration"),
            min_sync_period: "500ms".parse::<GoDuration>().expect("duration"),
            node_port_addresses: vec!["192.168.0.0/16".parse().expect("address")],
            ..ProxySettings::default()
        };
        let resolved = resolve(&settings, &[ip("192.168.1.5")]).expect("valid");
        assert_eq!(resolved.mode, ProxyMode::Nftables);
        assert_eq!(resolved.ipvs_scheduler, IpvsScheduler::Sh);
        assert_eq!(resolved.sync_period, Duration::from_secs(60));
        assert_eq!(resolved.min_sync_period, Duration::from_millis(500));
        assert_eq!(resolved.node.excluded_cidrs, ["10.0.0.0/24".parse::<IpNet>().expect("net")]);
        assert_eq!(resolved.node.cluster_cidrs.len(), 2);
        assert!(resolved.node.masquerade_all);
        assert_eq!(resolved.node.masquerade_bit, 3);
        assert_eq!(resolved.node.node_port_addresses, ["192.168.0.0/16".parse::<IpNet>().expect("net")]);
    }

    #[test]
    fn primary_node_port_addresses_are_the_nodes_ips() {
        let settings =
            ProxySettings { node_port_addresses: vec![NodePortAddress::Primary], ..ProxySettings::default() };
        let resolved = resolve(&settings, &[ip("192.168.1.5"), ip("fd00::5")]).expect("valid");
        assert_eq!(
            resolved.node.node_port_addresses,
            ["192.168.1.5/32".parse::<IpNet>().expect("net"), "fd00::5/128".parse().expect("net")]
        );
        assert!(resolve(&settings, &[]).is_err(), "unknown node addresses are not 'every address'");
    }

    #[test]
    fn invalid_settings_are_refused_by_the_agent_too() {
        let settings = ProxySettings {
            masquerade_bit: 40,
            min_sync_period: "1h".parse().expect("duration"),
            ..ProxySettings::default()
        };
        let problems = resolve(&settings, &[]).expect_err("invalid").0;
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
