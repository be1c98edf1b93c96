//! End to end on the real control plane: three simulated nodes with real agent processes, the real
//! operator process, pods with real servers and a Service spread over the nodes (see
//! `fleetproxy_tests::fleet`). The fleet switches modes node by node while clients on every node
//! keep sending through the ClusterIP.
//!
//! Fleets take a host-wide lock (an operator acts on every ProxyConfig of the cluster), so these
//! tests run one after the other even when the harness runs them in parallel.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetproxy_api::{ProxyConfig, ProxyMode, ProxyNode, condition_types};
use fleetproxy_tests::{
    ControlPlane, control_plane,
    fleet::{
        self, Fleet, FleetSpec, OPERATOR, StateLog, Traffic, agent_container, eventually, http_get, kubectl,
        metric_sum, operator_container, proxy_config, run, wait_for_fleet_mode,
    },
    netns::{Outcome, Proto},
    unique_name,
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};

const NODES: usize = 3;
const PODS_PER_NODE: usize = 2;
const SERVICE_PORT: u16 = 80;
const SETTLE: Duration = Duration::from_secs(120);
const AGENT_METRICS: &str = "127.0.0.1:10249";
const OPERATOR_METRICS: &str = "127.0.0.1:8080";

/// A fleet with its pods, one Service over all of them, the operator and a ProxyConfig in iptables
/// mode that every node has reached.
struct Setup {
    fleet: Fleet,
    client: Client,
    config: String,
    service: SocketAddr,
}

impl Setup {
    /// `agent_env(node)` adds environment to that node's agent (to break a node on purpose).
    async fn new(
        prefix: &str,
        agent_env: impl Fn(&Fleet, &str) -> Result<Vec<(String, String)>>,
    ) -> Result<Self> {
        let control_plane: &ControlPlane = control_plane().await?;
        let id = unique_name(prefix);
        let mut fleet = Fleet::create(control_plane, &FleetSpec::new(&id, NODES)).await?;
        let client = fleet.client();
        let mut backends = Vec::new();
        for node in fleet.node_names() {
            for i in 1..=PODS_PER_NODE {
                let suffix = node.rsplit('-').next().unwrap_or_default().to_owned();
                backends.push(fleet.add_pod(&node, &format!("web-{suffix}{i}"))?);
            }
        }
        let ip = fleet.create_service("web", SERVICE_PORT, &backends).await?;
        let service = SocketAddr::new(IpAddr::V4(ip), SERVICE_PORT);

        let kubeconfig = fleet.kubeconfig().to_path_buf();
        let operator = operator_container(&kubeconfig, fleet.namespace(), &format!("{id}-operator"));
        fleet.run_pod("operator", &operator, OPERATOR, &[])?;
        let agent = agent_container(&kubeconfig, &[]);
        for node in fleet.node_names() {
            let env = agent_env(&fleet, &node)?;
            fleet.run_agent(&node, &agent, &env)?;
        }

        let config = id.clone();
        let api: Api<ProxyConfig> = Api::all(client.clone());
        api.create(&PostParams::default(), &proxy_config(&fleet, &config, ProxyMode::Iptables)).await?;
        let setup = Self { fleet, client, config, service };
        setup.settle(ProxyMode::Iptables).await?;
        Ok(setup)
    }

    async fn settle(&self, mode: ProxyMode) -> Result<ProxyConfig> {
        let settled = wait_for_fleet_mode(&self.client, &self.config, mode, NODES, SETTLE).await;
        self.fleet.check_processes()?;
        settled
    }

    async fn proxy_config(&self) -> Result<ProxyConfig> {
        Ok(Api::<ProxyConfig>::all(self.client.clone()).get(&self.config).await?)
    }

    async fn proxy_node(&self, node: &str) -> Result<Option<ProxyNode>> {
        Ok(Api::<ProxyNode>::all(self.client.clone()).get_opt(node).await?)
    }

    /// `kubectl patch proxyconfig <config> --type=merge -p <patch>`, with the real kubectl.
    fn patch(&self, patch: &str) -> Result<()> {
        run(kubectl(self.fleet.kubeconfig()).args([
            "patch",
            "proxyconfig",
            &self.config,
            "--type=merge",
            "-p",
            patch,
        ]))
        .map(drop)
    }

    async fn state_log(&self) -> Result<StateLog> {
        StateLog::start(self.client.clone(), self.fleet.node_names().into_iter().collect(), None).await
    }

    /// One request through the Service from every node must be answered.
    fn assert_service_answers(&self) -> Result<()> {
        for node in self.fleet.nodes() {
            let outcome = node.netns.probe(Proto::Tcp, self.service, Duration::from_secs(2));
            ensure!(outcome.answer().is_some(), "{} -> {}: {outcome:?}", node.name, self.service);
        }
        Ok(())
    }

    fn operator_metrics(&self) -> Result<String> {
        let addr = OPERATOR_METRICS.parse()?;
        http_get(self.fleet.pod_netns("operator")?, addr, "/metrics")
    }

    fn agent_metrics(&self, node: &str) -> Result<String> {
        http_get(&self.fleet.node(node)?.netns, AGENT_METRICS.parse()?, "/metrics")
    }
}

fn nodes_in(
    states: &std::collections::BTreeMap<String, fleet::NodeState>,
    desired: ProxyMode,
) -> BTreeSet<String> {
    states.iter().filter(|(_, s)| s.desired == desired).map(|(n, _)| n.clone()).collect()
}

/// The fleet starts in iptables, then `kubectl patch` moves it to nftables with maxUnavailable 1:
/// nodes switch one at a time, clients on every node never see a failed connection, nothing of
/// iptables is left and the status shows nftables with read-back rule counts everywhere. Deleting
/// the ProxyConfig then removes the ProxyNodes the operator created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_switches_from_iptables_to_nftables_node_by_node_without_failed_connections() -> Result<()> {
    let setup = Setup::new("fleet-switch", |_, _| Ok(Vec::new())).await?;
    let fleet = &setup.fleet;
    setup.assert_service_answers()?;
    for node in fleet.nodes() {
        ensure!(
            !fleet.iptables_objects(&node.name)?.is_empty(),
            "{}: no FP- chains in iptables mode",
            node.name
        );
    }

    let log = setup.state_log().await?;
    let traffic =
        Traffic::start(fleet.nodes(), setup.service, Duration::from_millis(20), Duration::from_secs(2))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    setup.patch(r#"{"spec":{"mode":"nftables","rollout":{"maxUnavailable":1}}}"#)?;
    let config = setup.settle(ProxyMode::Nftables).await?;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = traffic.stop();

    let changes = log.changes();
    for change in &changes {
        let state = change.state.as_ref().map_or("deleted".to_owned(), fleet::NodeState::describe);
        eprintln!("  {:>6.2}s {:<24} {state}", change.after.as_secs_f64(), change.node);
    }
    eprintln!(
        "3-node switch iptables -> nftables took {:.1}s; requests: {} ok, {} failed; answered by {:?}",
        took.as_secs_f64(),
        seen.ok,
        seen.failed,
        seen.backends
    );
    ensure!(seen.failed == 0, "failed requests during the switch: {:#?}", seen.failures);
    for node in fleet.nodes() {
        let (ok, _) = seen.by_node.get(&node.name).copied().unwrap_or_default();
        ensure!(ok >= 10, "{}: only {ok} requests went through during the switch", node.name);
    }
    ensure!(seen.backends.len() == NODES * PODS_PER_NODE, "not every backend answered: {:?}", seen.backends);

    // One node at a time: never two nodes on new settings and not Ready on them.
    let most = fleet::max_unsettled(&changes, 0);
    ensure!(most == 1, "{most} nodes were switching at once (expected exactly 1 at a time)");
    let switched: BTreeSet<&str> = changes
        .iter()
        .filter(|c| c.state.as_ref().is_some_and(|s| !s.settled()))
        .map(|c| c.node.as_str())
        .collect();
    ensure!(switched.len() == NODES, "not every node was seen switching: {switched:?}");

    // Nothing of iptables is left; the status holds what each kernel holds.
    for node in fleet.nodes() {
        let left = fleet.iptables_objects(&node.name)?;
        ensure!(left.is_empty(), "{}: iptables objects left after the switch: {left:#?}", node.name);
        ensure!(!fleet.nft_tables(&node.name)?.is_empty(), "{}: no nftables table", node.name);
    }
    setup.assert_service_answers()?;
    // The kernel is read back beside the sync loop, so the counts settle a moment after the switch.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut config = config;
    loop {
        match check_rule_counts(&setup, &config).await {
            Ok(()) => break,
            Err(err) if Instant::now() < deadline => {
                eprintln!("  rule counts not settled yet: {err}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                config = setup.settle(ProxyMode::Nftables).await?;
            }
            Err(err) => return Err(err),
        }
    }

    // API writes, per node.
    let operator = setup.operator_metrics()?;
    let operator_writes = metric_sum(&operator, "fleetproxy_operator_api_writes_total");
    eprintln!(
        "operator API writes: {operator_writes} in all ({:.1} per node)",
        operator_writes / NODES as f64
    );
    for (labels, value) in fleet::metric_samples(&operator, "fleetproxy_operator_api_writes_total") {
        eprintln!("  operator {labels}: {value}");
    }
    for node in fleet.nodes() {
        let writes = metric_sum(&setup.agent_metrics(&node.name)?, "fleetproxy_agent_api_writes_total");
        eprintln!("  agent on {}: {writes} API writes", node.name);
    }

    // Deleting the ProxyConfig removes what the operator created: the operator sweeps the ProxyNodes
    // of nodes that no config selects any more.
    let configs: Api<ProxyConfig> = Api::all(setup.client.clone());
    configs.delete(&setup.config, &DeleteParams::default()).await?;
    eventually("the ProxyConfig and its ProxyNodes to go", Duration::from_secs(60), || async {
        let mut left = Vec::new();
        for node in fleet.node_names() {
            if setup.proxy_node(&node).await?.is_some() {
                left.push(node);
            }
        }
        let config_left = configs.get_opt(&setup.config).await?.is_some();
        ensure!(
            left.is_empty() && !config_left,
            "ProxyNodes left: {left:?}; ProxyConfig left: {config_left}"
        );
        Ok(Some(()))
    })
    .await?;
    // The agents keep serving with their last rules: removing the operator's objects must not
    // black-hole traffic.
    setup.assert_service_answers()?;
    setup.fleet.passed();
    Ok(())
}

/// Pausing mid-rollout holds it: a node whose switch is underway completes, no further node is given
/// the new settings until the rollout is resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_rollout_holds_mid_way() -> Result<()> {
    let setup = Setup::new("fleet-pause", |_, _| Ok(Vec::new())).await?;
    let fleet = &setup.fleet;
    let log = setup.state_log().await?;
    // With the agents stopped, the first node given nftables cannot finish: the rollout stands
    // still there (and maxUnavailable holds even with a node that never reports).
    for node in fleet.nodes() {
        fleet.kubelet().kill(&node.agent_pod());
    }
    setup.patch(r#"{"spec":{"mode":"nftables"}}"#)?;
    let first = eventually("a first node given nftables", Duration::from_secs(30), || async {
        let on_nft = nodes_in(&log.current(), ProxyMode::Nftables);
        Ok((!on_nft.is_empty()).then_some(on_nft))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = nodes_in(&log.current(), ProxyMode::Nftables);
    ensure!(still == first && first.len() == 1, "with one node not reporting: {first:?} then {still:?}");

    setup.patch(r#"{"spec":{"rollout":{"paused":true}}}"#)?;
    eventually("the operator to see the pause", Duration::from_secs(30), || async {
        let config = setup.proxy_config().await?;
        let observed =
            config.status.as_ref().and_then(|s| s.observed_generation) == config.metadata.generation;
        Ok(observed.then_some(()))
    })
    .await?;
    for node in fleet.nodes() {
        fleet.kubelet().restart(&node.agent_pod())?;
    }
    // The node that had the new settings finishes; nobody else moves while paused.
    eventually("the first node to settle in nftables", Duration::from_secs(60), || async {
        let states = log.current();
        Ok(first
            .iter()
            .all(|n| states.get(n).is_some_and(|s| s.settled() && s.active == Some(ProxyMode::Nftables)))
            .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let held = nodes_in(&log.current(), ProxyMode::Nftables);
    let config = setup.proxy_config().await?;
    let progressing = fleet::condition(&config, condition_types::PROGRESSING).cloned();
    eprintln!("paused: nodes on nftables {held:?}; Progressing {progressing:?}");
    ensure!(held == first, "the rollout moved while paused: {first:?} -> {held:?}");
    setup.assert_service_answers()?;

    setup.patch(r#"{"spec":{"rollout":{"paused":false}}}"#)?;
    setup.settle(ProxyMode::Nftables).await?;
    ensure!(fleet::max_unsettled(&log.changes(), 0) <= 1, "more than one node switching at once");
    setup.fleet.passed();
    Ok(())
}

/// A node whose agent cannot run the new mode halts the rollout: the ProxyConfig is Degraded and
/// names it, the node keeps serving in iptables, and no other node moves on. The mode is IPVS,
/// which this kernel cannot run (no `ip_vs` module, checked first): the first node tried refuses
/// it in its probe, for a real reason, with nothing faked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_that_cannot_run_the_mode_halts_the_rollout_and_keeps_serving() -> Result<()> {
    let modprobe = std::process::Command::new("modprobe").args(["-n", "-q", "ip_vs"]).status()?;
    ensure!(!modprobe.success(), "this test needs a mode the kernel cannot run, and this kernel has IPVS");
    let setup = Setup::new("fleet-halt", |_, _| Ok(Vec::new())).await?;
    let fleet = &setup.fleet;
    let traffic =
        Traffic::start(fleet.nodes(), setup.service, Duration::from_millis(50), Duration::from_secs(2))?;

    setup.patch(r#"{"spec":{"mode":"ipvs","rollout":{"maxUnavailable":1}}}"#)?;
    let (config, broken) = eventually("a Degraded condition naming a node", SETTLE, || async {
        let config = setup.proxy_config().await?;
        let named = fleet::condition(&config, condition_types::DEGRADED)
            .filter(|c| c.status == "True")
            .and_then(|c| fleet.node_names().iter().find(|n| c.message.contains(n.as_str())).cloned());
        Ok(named.map(|broken| (config, broken)))
    })
    .await?;
    let broken_ns = fleet.node(&broken)?.netns.clone();
    let degraded = fleet::condition(&config, condition_types::DEGRADED).cloned().context("no Degraded")?;
    eprintln!("Degraded: {} {}", degraded.reason, degraded.message);

    // Halted: no node moves.
    let before = config.status.as_ref().map(|s| s.summary.by_mode.clone()).unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let config = setup.proxy_config().await?;
    let status = config.status.clone().context("no status")?;
    ensure!(
        status.summary.by_mode == before,
        "the rollout moved on: {before:?} -> {:?}",
        status.summary.by_mode
    );
    ensure!(
        status.summary.by_mode.get("iptables").copied().unwrap_or(0) == NODES as u32,
        "a node left iptables: {:?}",
        status.summary
    );
    let entry =
        status.nodes.iter().find(|n| n.name == broken).context("no status entry for the broken node")?;
    ensure!(entry.active_mode == Some(ProxyMode::Iptables) && !entry.ready, "broken node: {entry:?}");
    let pn = setup.proxy_node(&broken).await?.context("no ProxyNode")?;
    let ready = pn.ready_condition().cloned().context("no Ready condition")?;
    eprintln!("{broken}: Ready={} {} {}", ready.status, ready.reason, ready.message);

    // It keeps serving in its old mode.
    ensure!(!fleet.iptables_objects(&broken)?.is_empty(), "{broken}: its iptables rules are gone");
    let outcome = broken_ns.probe(Proto::Tcp, setup.service, Duration::from_secs(2));
    ensure!(matches!(outcome, Outcome::Answered(_)), "{broken}: {outcome:?}");
    let seen = traffic.stop();
    eprintln!("traffic from every node: {} ok, {} failed", seen.ok, seen.failed);
    ensure!(seen.failed == 0 && seen.ok > 0, "failures {:#?}", seen.failures);
    fleet
        .kubelet()
        .check(&fleet.node(&broken)?.agent_pod())
        .context("the broken node's agent must not crash")?;
    setup.fleet.passed();
    Ok(())
}

/// Deleting a Node removes its ProxyNode (garbage collector, through the owner reference) and its
/// entry in the ProxyConfig status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_node_loses_its_proxynode_and_status_entry() -> Result<()> {
    let setup = Setup::new("fleet-gc", |_, _| Ok(Vec::new())).await?;
    let gone = setup.fleet.node_names()[NODES - 1].clone();
    setup.fleet.kubelet().kill(&setup.fleet.node(&gone)?.agent_pod());
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(setup.client.clone());
    nodes.delete(&gone, &DeleteParams::default()).await?;
    eventually(
        "the ProxyNode and status entry of the deleted Node to go",
        Duration::from_secs(60),
        || async {
            let config = setup.proxy_config().await?;
            let status = config.status.clone().unwrap_or_default();
            let in_status = status.nodes.iter().any(|n| n.name == gone);
            let proxy_node = setup.proxy_node(&gone).await?;
            Ok((proxy_node.is_none() && !in_status && status.summary.nodes as usize == NODES - 1)
                .then_some(()))
        },
    )
    .await?;
    let config = setup.proxy_config().await?;
    let status = config.status.context("no status")?;
    if !status.nodes.iter().all(|n| n.ready) {
        bail!("the remaining nodes are not ready: {:?}", status.nodes);
    }
    setup.fleet.passed();
    Ok(())
}

/// The status holds what each kernel holds: every entry's count is its ProxyNode's, and the
/// agent's gauges agree (nftables counted, iptables zero after the switch).
async fn check_rule_counts(setup: &Setup, config: &ProxyConfig) -> Result<()> {
    let status = config.status.clone().context("no status")?;
    ensure!(status.summary.by_mode.get("nftables") == Some(&(NODES as u32)), "{:?}", status.summary);
    for entry in &status.nodes {
        let metrics = setup.agent_metrics(&entry.name)?;
        let kernel = fleet::metric_samples(&metrics, "fleetproxy_agent_rules");
        let pn = setup.proxy_node(&entry.name).await?.context("ProxyNode gone")?;
        let reported = pn.status.and_then(|s| s.rule_count);
        eprintln!(
            "  {}: status ruleCount {:?}, ProxyNode ruleCount {reported:?}, agent gauge {kernel:?}",
            entry.name, entry.rule_count
        );
        ensure!(entry.rule_count.is_some_and(|c| c > 0), "{}: no rule count", entry.name);
        ensure!(
            reported == entry.rule_count,
            "{}: the status entry is not the ProxyNode's count",
            entry.name
        );
        let iptables = kernel.iter().find(|(labels, _)| labels.contains("iptables")).map(|(_, v)| *v);
        ensure!(
            iptables == Some(0.0),
            "{}: the agent's iptables gauge reads {iptables:?} after the switch",
            entry.name
        );
        let gauge = kernel.iter().find(|(labels, _)| labels.contains("nftables")).map(|(_, v)| *v as i64);
        ensure!(
            gauge == reported,
            "{}: the agent's nftables gauge {gauge:?} is not its reported count",
            entry.name
        );
    }
    Ok(())
}
