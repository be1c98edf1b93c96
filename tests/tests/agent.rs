//! The agent on its own (no operator, no ProxyNode) against the real control plane, in each mode:
//! Services and EndpointSlices written through the API carry real traffic, removing an endpoint stops
//! its traffic, and kube-proxy's endpoints (/proxyMode, /metrics, /healthz, /livez) answer.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, ensure};
use fleetproxy_api::ProxyMode;
use fleetproxy_tests::{
    control_plane,
    fleet::{Fleet, FleetSpec, agent_container, eventually, http_get},
    netns::{Netns, Proto},
    unique_name,
};

const SERVICE_PORT: u16 = 80;
const PROBES: usize = 40;
const SETTLE: Duration = Duration::from_secs(60);

/// Succeeds when `PROBES` requests to `service` from `netns` were all answered, by exactly `expected`.
fn answered_by(netns: &Netns, service: SocketAddr, expected: &[&str]) -> Result<Option<()>> {
    let seen: Option<BTreeSet<String>> = netns
        .probe_many(Proto::Tcp, service, PROBES, Duration::from_secs(1))
        .iter()
        .map(|outcome| outcome.answer().map(str::to_owned))
        .collect();
    let expected: BTreeSet<String> = expected.iter().map(|name| (*name).to_owned()).collect();
    ensure!(seen.as_ref() == Some(&expected), "answered by {seen:?} (None: a request failed)");
    Ok(Some(()))
}

async fn agent_programs_services_from_the_api(mode: ProxyMode) -> Result<()> {
    let control_plane = control_plane().await?;
    let id = unique_name(&format!("agent-{mode}"));
    let mut fleet = Fleet::create(control_plane, &FleetSpec::new(&id, 1)).await?;
    let node = fleet.node_names().remove(0);
    let one = fleet.add_pod(&node, "one")?;
    let two = fleet.add_pod(&node, "two")?;
    let cluster_ip = fleet.create_service("web", SERVICE_PORT, &[one.clone(), two.clone()]).await?;
    let service = SocketAddr::new(IpAddr::V4(cluster_ip), SERVICE_PORT);

    let args =
        ["--proxynode=false".to_owned(), format!("--mode={mode}"), "--min-sync-period=100ms".to_owned()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fleet.run_agent(&node, &agent_container(fleet.kubeconfig(), &args), &[])?;
    let netns = fleet.node(&node)?.netns.clone();

    eventually("both endpoints answer through the ClusterIP", SETTLE, || {
        std::future::ready(answered_by(&netns, service, &["one", "two"]))
    })
    .await?;

    fleet.write_endpoints("web", &[one]).await?;
    eventually("a removed endpoint gets no more traffic", SETTLE, || {
        std::future::ready(answered_by(&netns, service, &["one"]))
    })
    .await?;

    let metrics_addr: SocketAddr = "127.0.0.1:10249".parse()?;
    let health_addr: SocketAddr = "127.0.0.1:10256".parse()?;
    let proxy_mode = http_get(&netns, metrics_addr, "/proxyMode")?;
    ensure!(proxy_mode.trim() == mode.as_str(), "/proxyMode said {proxy_mode:?}");
    let metrics = http_get(&netns, metrics_addr, "/metrics")?;
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    ] {
        ensure!(metrics.contains(name), "/metrics lacks {name}");
    }
    for path in ["/healthz", "/livez"] {
        let body: serde_json::Value = serde_json::from_str(&http_get(&netns, health_addr, path)?)?;
        ensure!(body.get("lastUpdated").is_some() && body.get("currentTime").is_some(), "{path}: {body}");
    }
    fleet.passed();
    Ok(())
}

#[tokio::test]
async fn iptables_agent_programs_services_from_the_api() -> Result<()> {
    agent_programs_services_from_the_api(ProxyMode::Iptables).await
}

#[tokio::test]
async fn nftables_agent_programs_services_from_the_api() -> Result<()> {
    agent_programs_services_from_the_api(ProxyMode::Nftables).await
}
