//! The local demo (`make demo`, which runs scripts/demo.sh): a real control plane, the operator
//! installed by the Helm chart, three simulated nodes with real agents, sample Services with real
//! backends, and a fleet-wide switch from iptables to nftables while requests keep flowing.
//!
//! No kubelet runs here, so the demo plays its part (see `fleetproxy_tests::fleet`): it runs the
//! chart's operator Deployment (its args, two replicas, a token of the chart's operator
//! ServiceAccount) and the DaemonSet the operator creates (its args, a token of the agent
//! ServiceAccount bound to each node), each process inside its pod's network namespace. That the
//! processes work with those tokens is what proves the chart's RBAC.
//!
//! `DEMO_SMOKE=1`: no pauses, exits when done (the smoke test). Otherwise it waits for Enter between
//! steps and keeps the fleet running at the end until Ctrl-C. Either way, and on Ctrl-C at any
//! point, it removes everything it created.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fleetproxy_api::ProxyMode;
use fleetproxy_tests::{
    control_plane,
    fleet::{
        Fleet, FleetSpec, NodeState, OPERATOR, StateLog, Traffic, eventually, kubectl, run,
        service_account_kubeconfig, tool, wait_for_fleet_mode,
    },
    netns::Proto,
};
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    coordination::v1::Lease,
};
use kube::Api;

const FLEET: &str = "demo";
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
const RELEASE: &str = "fleetproxy";
const NAMESPACE: &str = "kube-system";
const CONFIG: &str = "default";
const SETTLE: Duration = Duration::from_secs(120);

struct Demo {
    smoke: bool,
    kubeconfig: PathBuf,
    fleet: Option<Fleet>,
    installed: bool,
}

fn say(text: &str) {
    println!("{text}");
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}")).collect::<Vec<_>>().join("\n")
}

impl Demo {
    /// `kubectl <args>` against the demo's control plane, shown as typed and with its output.
    fn show(&self, args: &[&str]) -> Result<()> {
        println!("$ kubectl {}", args.join(" "));
        println!("{}", indent(run(kubectl(&self.kubeconfig).args(args))?.trim_end()));
        Ok(())
    }

    fn helm(&self, args: &[&str]) -> Result<String> {
        let helm = tool("helm");
        if !helm.is_file() {
            bail!("helm not found on PATH or in ~/.cache/fleetproxy/tools; run scripts/setup.sh");
        }
        run(std::process::Command::new(helm).arg("--kubeconfig").arg(&self.kubeconfig).args(args))
    }

    async fn pause(&self, what: &str) {
        if self.smoke {
            return;
        }
        println!("\n-- press Enter to {what} (Ctrl-C cleans up and quits)");
        let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    }

    fn fleet(&self) -> Result<&Fleet> {
        self.fleet.as_ref().context("no fleet")
    }

    async fn run(&mut self) -> Result<()> {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/fleetproxy");
        let chart = chart.canonicalize().with_context(|| format!("chart {}", chart.display()))?;
        let control_plane = control_plane().await?;
        self.kubeconfig = control_plane.kubeconfig().to_path_buf();
        say(&format!(
            "fleetproxy demo; to look around meanwhile: export KUBECONFIG={}",
            self.kubeconfig.display()
        ));
        self.remove_leftovers()?;

        step("Three nodes: a Node object and a network namespace each, pods with web servers behind them");
        let spec = FleetSpec { id: FLEET.to_owned(), nodes: NODES.iter().map(|n| (*n).to_owned()).collect() };
        self.fleet = Some(Fleet::create(control_plane, &spec).await?);
        let fleet = self.fleet.as_mut().context("no fleet")?;
        let mut web = Vec::new();
        for (i, node) in NODES.iter().enumerate() {
            let letter = char::from(b'a' + u8::try_from(i).unwrap_or(0));
            for n in 1..=2 {
                web.push(fleet.add_pod(node, &format!("web-{letter}{n}"))?);
            }
        }
        let api = vec![fleet.add_pod(NODES[0], "api-1")?, fleet.add_pod(NODES[2], "api-2")?];
        let fleet = self.fleet()?;
        let web_ip = fleet.create_service("web", 80, &web).await?;
        let api_ip = fleet.create_service("api", 8080, &api).await?;
        for node in fleet.nodes() {
            say(&format!("   {:<7} {}  {}", node.name, node.zone, node.ip));
        }
        say(&format!("   Service demo/web {web_ip}:80   -> {} pods on 3 nodes", web.len()));
        say(&format!("   Service demo/api {api_ip}:8080 -> {} pods on 2 nodes", api.len()));

        step("helm install: the CRDs, the operator, RBAC and the ProxyConfig (mode iptables)");
        let selector = format!("proxyConfig.nodeSelector.fleetproxy\\.io/fleet={FLEET}");
        println!(
            "$ helm install {RELEASE} charts/fleetproxy -n {NAMESPACE} --set proxyConfig.mode=iptables --set {selector}"
        );
        let chart_arg = chart.display().to_string();
        self.helm(&[
            "install",
            RELEASE,
            &chart_arg,
            "-n",
            NAMESPACE,
            "--set",
            "proxyConfig.mode=iptables",
            "--set",
            &selector,
        ])?;
        self.installed = true;
        self.start_operator().await?;
        self.start_agents().await?;

        let fleet = self.fleet()?;
        wait_for_fleet_mode(&fleet.client(), CONFIG, ProxyMode::Iptables, NODES.len(), SETTLE).await?;
        self.show(&["get", "proxyconfig"])?;
        self.show(&["get", "proxynodes"])?;

        step(&format!("Requests to the ClusterIP of web ({web_ip}:80) from every node"));
        let web_addr = SocketAddr::new(IpAddr::V4(web_ip), 80);
        self.requests(web_addr)?;
        self.pause("switch the whole fleet to nftables").await;

        step("Switch the fleet to nftables, one node at a time, with requests flowing from every node");
        let fleet = self.fleet()?;
        let traffic =
            Traffic::start(fleet.nodes(), web_addr, Duration::from_millis(20), Duration::from_secs(2))?;
        let live = Arc::new(AtomicBool::new(false));
        let view = traffic.view();
        let started = Instant::now();
        let printing = Arc::clone(&live);
        let log = StateLog::start(
            fleet.client(),
            NODES.iter().map(|n| (*n).to_owned()).collect::<BTreeSet<_>>(),
            Some(Box::new(move |change| {
                if printing.load(Ordering::Relaxed) {
                    let state =
                        change.state.as_ref().map_or("ProxyNode deleted".to_owned(), NodeState::describe);
                    let seen = view.stats();
                    println!(
                        "   {:>5.1}s  {:<7} {:<44} requests: {} ok, {} failed",
                        started.elapsed().as_secs_f64(),
                        change.node,
                        state,
                        seen.ok,
                        seen.failed
                    );
                }
            })),
        )
        .await?;
        live.store(true, Ordering::Relaxed);
        let patch = r#"{"spec":{"mode":"nftables"}}"#;
        println!("$ kubectl patch proxyconfig {CONFIG} --type=merge -p '{patch}'");
        run(kubectl(&self.kubeconfig).args(["patch", "proxyconfig", CONFIG, "--type=merge", "-p", patch]))?;
        let switched = Instant::now();
        wait_for_fleet_mode(&fleet.client(), CONFIG, ProxyMode::Nftables, NODES.len(), SETTLE).await?;
        let took = switched.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        live.store(false, Ordering::Relaxed);
        drop(log);
        let seen = traffic.stop();
        say(&format!(
            "   all {} nodes on nftables after {:.1}s; requests during the switch: {} ok, {} failed",
            NODES.len(),
            took.as_secs_f64(),
            seen.ok,
            seen.failed
        ));
        for failure in seen.failures.iter().take(5) {
            say(&format!(
                "   failed: {:.1}s from {}: {:?}",
                failure.after.as_secs_f64(),
                failure.node,
                failure.outcome
            ));
        }
        self.show(&["get", "proxyconfig"])?;
        self.show(&["get", "proxynodes"])?;
        let fleet = self.fleet()?;
        let mut left = Vec::new();
        for node in fleet.nodes() {
            left.push(format!("{} {}", node.name, fleet.iptables_objects(&node.name)?.len()));
        }
        say(&format!("   iptables objects of fleetproxy left: {}", left.join(", ")));
        self.requests(web_addr)?;
        if seen.failed > 0 {
            bail!("{} requests failed during the switch", seen.failed);
        }

        if !self.smoke {
            say("\nThe fleet keeps running. Try, with the KUBECONFIG above:");
            say("   kubectl patch proxyconfig default --type=merge -p '{\"spec\":{\"mode\":\"iptables\"}}'");
            say("   kubectl get proxynodes -w");
            say("Press Ctrl-C to clean up and quit.");
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    /// The release and the ProxyConfig a demo that was killed left behind.
    fn remove_leftovers(&self) -> Result<()> {
        let release = self.helm(&["status", RELEASE, "-n", NAMESPACE]).is_ok();
        let selector = format!("app.kubernetes.io/instance={RELEASE}");
        let config =
            run(kubectl(&self.kubeconfig).args(["get", "proxyconfigs", "-l", &selector, "-o", "name"]))?;
        if release || !config.trim().is_empty() {
            say("   removing what a previous demo left behind");
            self.uninstall()?;
        }
        Ok(())
    }

    async fn start_operator(&mut self) -> Result<()> {
        let fleet = self.fleet.as_mut().context("no fleet")?;
        let deployments: Api<Deployment> = Api::namespaced(fleet.client(), NAMESPACE);
        let deployment = deployments.get(&format!("{RELEASE}-operator")).await?;
        let spec = deployment.spec;
        let pod = spec.template.spec.context("Deployment without pod spec")?;
        let account = pod.service_account_name.clone().context("no serviceAccountName")?;
        let container = pod.containers.first().context("no container")?.clone();
        let kubeconfig = fleet.dir().join("operator.kubeconfig");
        service_account_kubeconfig(&self.kubeconfig, NAMESPACE, &account, None, &kubeconfig)?;
        let env = [("KUBECONFIG".to_owned(), kubeconfig.display().to_string())];
        let replicas = spec.replicas.unwrap_or(1).max(1);
        for i in 1..=replicas {
            fleet.run_pod(&format!("{RELEASE}-operator-{i}"), &container, OPERATOR, &env)?;
        }
        let leases: Api<Lease> = Api::namespaced(fleet.client(), NAMESPACE);
        let lease = format!("{RELEASE}-operator");
        let leader = eventually("an operator replica to take the Lease", Duration::from_secs(60), || async {
            let holder = leases.get_opt(&lease).await?.and_then(|l| l.spec).and_then(|s| s.holder_identity);
            Ok(holder)
        })
        .await?;
        say(&format!(
            "   operator: {replicas} replicas of the chart's Deployment, as ServiceAccount {NAMESPACE}/{account}; leader: {}",
            leader.split('_').next().unwrap_or(&leader)
        ));
        Ok(())
    }

    async fn start_agents(&self) -> Result<()> {
        let fleet = self.fleet()?;
        let daemonsets: Api<DaemonSet> = Api::namespaced(fleet.client(), NAMESPACE);
        let daemonset =
            eventually("the operator to create the agent DaemonSet", Duration::from_secs(60), || async {
                Ok(daemonsets.get_opt("fleetproxy-agent").await?)
            })
            .await?;
        let pod = daemonset.spec.template.spec.as_ref().context("DaemonSet without pods")?;
        let account = pod.service_account_name.clone().context("no serviceAccountName")?;
        let args = pod.containers.first().and_then(|c| c.args.clone()).unwrap_or_default();
        fleet.run_daemonset(&daemonset, |node| {
            let kubeconfig = fleet.dir().join(format!("agent-{}.kubeconfig", node.name));
            service_account_kubeconfig(&self.kubeconfig, NAMESPACE, &account, Some(&node.name), &kubeconfig)?;
            Ok(vec![("KUBECONFIG".to_owned(), kubeconfig.display().to_string())])
        })?;
        say(&format!(
            "   agents: DaemonSet {NAMESPACE}/fleetproxy-agent (created by the operator) on {} nodes: fleetproxy-agent {}",
            NODES.len(),
            args.join(" ")
        ));
        say(&format!("           as ServiceAccount {NAMESPACE}/{account}, with a token bound to each node"));
        Ok(())
    }

    /// Ten requests from every node; which backends answered.
    fn requests(&self, addr: SocketAddr) -> Result<()> {
        let fleet = self.fleet()?;
        let mut answers: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = 0;
        for node in fleet.nodes() {
            for outcome in node.netns.probe_many(Proto::Tcp, addr, 10, Duration::from_secs(2)) {
                match outcome.answer() {
                    Some(name) => *answers.entry(name.to_owned()).or_default() += 1,
                    None => failed += 1,
                }
            }
        }
        let answered: Vec<String> = answers.iter().map(|(name, n)| format!("{name} {n}")).collect();
        say(&format!(
            "   {} requests: answered by {}; {failed} failed",
            10 * NODES.len(),
            answered.join(", ")
        ));
        if failed > 0 {
            bail!("{failed} requests to {addr} failed");
        }
        Ok(())
    }

    /// Removes the release, as a user would: `helm uninstall` alone. The ProxyConfig carries no
    /// finalizer, so it goes with the rest; the agents' rules stay until their DaemonSet goes.
    fn uninstall(&self) -> Result<()> {
        if self.helm(&["status", RELEASE, "-n", NAMESPACE]).is_ok() {
            self.helm(&["uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout=60s"])?;
        }
        Ok(())
    }

    fn clean_up(&mut self) {
        step("Cleaning up");
        if self.installed {
            match self.uninstall() {
                Ok(()) => say(&format!("   helm uninstall {RELEASE}")),
                Err(e) => say(&format!("   helm uninstall {RELEASE}: {e:#}")),
            }
        }
        if let Some(fleet) = self.fleet.take() {
            fleet.passed();
            drop(fleet);
            say(
                "   stopped the operator and the agents, deleted the nodes, their namespaces and the demo's objects",
            );
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let smoke = std::env::var("DEMO_SMOKE").is_ok_and(|v| v == "1");
    let mut demo = Demo { smoke, kubeconfig: PathBuf::new(), fleet: None, installed: false };
    let result = tokio::select! {
        result = demo.run() => result,
        () = interrupted() => {
            println!("\ninterrupted");
            Ok(())
        }
    };
    if let Err(e) = &result
        && let Some(fleet) = &demo.fleet
    {
        fleet.dump_logs();
        println!("\ndemo failed: {e:#}");
    }
    demo.clean_up();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
