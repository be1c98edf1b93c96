//! The agent's command line. Every flag can also be set through the environment variable named
//! next to it, which is how the DaemonSet passes NODE_NAME from the downward API.

use std::{net::SocketAddr, path::PathBuf};

use clap::{ArgAction, Parser, ValueEnum};
use fleetproxy_api::{
    Cidr, GoDuration, IpvsScheduler, IpvsSettings, NodePortAddress, ProxyMode, ProxySettings,
};

#[derive(Clone, Debug, Parser)]
#[command(name = "fleetproxy-agent", version, about = "The fleetproxy node agent, a kube-proxy replacement")]
pub struct Args {
    /// Path to a kubeconfig file. Default: the in-cluster service account, or $KUBECONFIG.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name, as its Node object is named.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// The mode when no ProxyNode governs this node. A ProxyNode's spec always wins.
    #[arg(long, env = "FLEETPROXY_MODE", default_value = "iptables", value_parser = parse_mode)]
    pub mode: ProxyMode,

    /// The IPVS scheduler when no ProxyNode governs this node (rr wrr lc wlc lblc lblcr sh dh sed nq mh).
    #[arg(long, env = "FLEETPROXY_IPVS_SCHEDULER", default_value = "rr", value_parser = parse_scheduler)]
    pub ipvs_scheduler: IpvsScheduler,

    /// Watch the ProxyNode named like this node and apply its spec. Without one (or with false),
    /// the flags decide.
    #[arg(long, env = "FLEETPROXY_PROXYNODE", default_value_t = true, action = ArgAction::Set)]
    pub proxynode: bool,

    /// The longest time between two full resyncs.
    #[arg(long, env = "FLEETPROXY_SYNC_PERIOD", default_value = "30s")]
    pub sync_period: GoDuration,

    /// The shortest time between two syncs; changes arriving faster are batched.
    #[arg(long, env = "FLEETPROXY_MIN_SYNC_PERIOD", default_value = "1s")]
    pub min_sync_period: GoDuration,

    /// Comma-separated CIDRs that are never intercepted.
    #[arg(long, env = "FLEETPROXY_EXCLUDED_CIDRS", value_delimiter = ',')]
    pub excluded_cidrs: Vec<Cidr>,

    /// Comma-separated pod CIDRs (at most one per family); traffic from outside them is masqueraded.
    #[arg(long, env = "FLEETPROXY_CLUSTER_CIDRS", value_delimiter = ',')]
    pub cluster_cidrs: Vec<Cidr>,

    /// Masquerade all traffic to Service addresses.
    #[arg(long, env = "FLEETPROXY_MASQUERADE_ALL")]
    pub masquerade_all: bool,

    /// The packet-mark bit that flags a packet for masquerading.
    #[arg(long, env = "FLEETPROXY_MASQUERADE_BIT", default_value_t = 14)]
    pub masquerade_bit: i32,

    /// Comma-separated CIDRs (or `primary`) node ports are served on. Default: every local address.
    #[arg(long, env = "FLEETPROXY_NODEPORT_ADDRESSES", value_delimiter = ',')]
    pub nodeport_addresses: Vec<NodePortAddress>,

    /// Where /metrics and /proxyMode are served.
    #[arg(long, env = "FLEETPROXY_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,

    /// Where /healthz and /livez are served.
    #[arg(long, env = "FLEETPROXY_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,

    /// Serve Services labelled service.kubernetes.io/service-proxy-name=<this>. Default: only
    /// Services without that label, as kube-proxy.
    #[arg(long, env = "FLEETPROXY_SERVICE_PROXY_NAME")]
    pub service_proxy_name: Option<String>,

    /// Program the kernel of this named network namespace (`ip netns exec`) instead of the agent's
    /// own. For tests that run several simulated nodes on one machine.
    #[arg(long, env = "FLEETPROXY_NETNS")]
    pub netns: Option<String>,

    /// Log format.
    #[arg(long, env = "FLEETPROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_mode(text: &str) -> Result<ProxyMode, String> {
    text.parse().map_err(|err: fleetproxy_api::SettingsError| err.to_string())
}

fn parse_scheduler(text: &str) -> Result<IpvsScheduler, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("unknown IPVS scheduler {text:?}: use rr wrr lc wlc lblc lblcr sh dh sed nq mh"))
}

impl Args {
    /// The settings the flags describe, used while no ProxyNode governs this node.
    pub fn settings(&self) -> ProxySettings {
        ProxySettings {
            mode: self.mode,
            ipvs: IpvsSettings { scheduler: self.ipvs_scheduler },
            excluded_cidrs: self.excluded_cidrs.clone(),
            sync_period: self.sync_period.clone(),
            min_sync_period: self.min_sync_period.clone(),
            cluster_cidrs: self.cluster_cidrs.clone(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
            node_port_addresses: self.nodeport_addresses.clone(),
            ..ProxySettings::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_are_kube_proxys() {
        let args = Args::try_parse_from(["agent", "--node-name", "n"]).expect("parses");
        assert_eq!(args.metrics_bind_address.to_string(), "127.0.0.1:10249");
        assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert!(args.proxynode);
        assert_eq!(args.settings(), ProxySettings::default());
    }

    #[test]
    fn flags_become_settings() {
        let args = Args::try_parse_from([
            "agent",
            "--node-name=n",
            "--mode=nftables",
            "--proxynode=false",
            "--sync-period=1m",
            "--min-sync-period=2s",
            "--excluded-cidrs=10.0.0.0/24,fd00::/64",
            "--cluster-cidrs=10.244.0.0/16",
            "--masquerade-all",
            "--masquerade-bit=5",
            "--nodeport-addresses=primary",
            "--ipvs-scheduler=mh",
        ])
        .expect("parses");
        assert!(!args.proxynode);
        let settings = args.settings();
        assert_eq!(settings.mode, ProxyMode::Nftables);
        assert_eq!(settings.ipvs.scheduler, IpvsScheduler::Mh);
        assert!(Args::try_parse_from(["agent", "--node-name=n", "--ipvs-scheduler=fastest"]).is_err());
        assert_eq!(settings.excluded_cidrs.len(), 2);
        assert_eq!(settings.sync_period.as_str(), "1m");
        assert!(settings.masquerade_all);
        assert_eq!(settings.masquerade_bit, 5);
        assert_eq!(settings.node_port_addresses, [NodePortAddress::Primary]);
        assert!(Args::try_parse_from(["agent", "--node-name=n", "--mode=userspace"]).is_err());
        assert!(Args::try_parse_from(["agent", "--node-name=n", "--excluded-cidrs=10.0.0.1/24"]).is_err());
    }
}
