//! A simulated fleet: Node objects in a real API server, each backed by a network namespace in which
//! the real agent runs exactly as on a host-network pod, pods with real servers behind the nodes, and
//! a routed fabric between them.
//!
//! ```text
//!   pod 10.1.1.2   pod 10.1.2.2         pod 10.2.1.2          pod 10.3.1.2
//!        |              |                    |                     |
//!   +--- node-a ---------+         +--- node-b ---+       +--- node-c ---+
//!   | eth0 10.255.1.2    |         | 10.255.2.2   |       | 10.255.3.2   |   agent + API bridge
//!   +---------+----------+         +------+-------+       +------+-------+   in each node netns
//!             |                           |                      |
//!   +---------+------------------- fabric (router) --------------+-------+
//!   | 10.255.N.1 on each link; routes 10.N.0.0/16 (node N's pods) via 10.255.N.2 |
//!   +-----------------------------------------------------------------------------+
//! ```
//!
//! Node N owns the pod CIDR `10.N.0.0/16` (its `spec.podCIDR`); its pod M sits on a point-to-point
//! link `10.N.M.0/24` with the node as gateway (`.1`) and the pod at `.2`. Every node's default route
//! points at the fabric, so a node reaches every pod, and a ClusterIP the node's rules do not catch
//! dies at the fabric (no route) instead of going anywhere.
//!
//! The API side: Nodes labelled with [`FLEET_LABEL`]`=<fleet id>` and a zone, Services without
//! selectors and EndpointSlices written directly (no kubelet runs pods, so no controller would),
//! all in a namespace named like the fleet. [`Fleet`] plays the kubelet through its [`Kubelet`]: the
//! agents (from a DaemonSet object or from fixed args) and the operator run as processes inside
//! their pod's network namespace, each with an [`ApiBridge`] so that the control plane's kubeconfig
//! works unchanged there.
//!
//! An operator acts on every ProxyConfig of the cluster, so two fleets with operators must not run at
//! once against one control plane: [`Fleet::create`] takes a host-wide lock, held until the fleet is
//! dropped. Dropping a fleet deletes its ProxyConfigs, stops its processes, deletes its namespaces
//! and its API objects (ProxyNodes go with their Nodes).

pub mod kubelet;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fleetproxy_api::{
    ProxyConfig, ProxyConfigSpec, ProxyConfigStatus, ProxyMode, ProxyNode, ProxySettings, RolloutSpec,
};
use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{
            Container, EnvVar, EnvVarSource, Namespace, Node, NodeAddress, NodeSpec, NodeStatus,
            ObjectFieldSelector, Service, ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{Condition, ObjectMeta},
        util::intstr::IntOrString,
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::Kubeconfig,
    runtime::{WatchStreamExt, watcher},
};

use self::kubelet::lock;
pub use self::kubelet::{AGENT, ApiBridge, Binaries, Kubelet, OPERATOR, PodSpec};
use crate::{
    FIELD_MANAGER,
    netns::{NETNS_PREFIX, Netns, NsThread, Outcome, Proto, Server, probe_here, require_root, sweep_stale},
};

/// The label every Node of a fleet carries, with the fleet's id as value; select a fleet with it.
pub const FLEET_LABEL: &str = "fleetproxy.io/fleet";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The port every pod's server listens on.
pub const SERVER_PORT: u16 = 8080;
/// Who manages the EndpointSlices the fleet writes.
pub const SLICE_MANAGER: &str = "fleetproxy-tests";

static NEXT_FLEET: AtomicU32 = AtomicU32::new(0);

/// A simulated node: a Node object and the network namespace it stands for.
pub struct FleetNode {
    pub name: String,
    pub netns: Netns,
    /// Its address on the fabric: the Node's InternalIP.
    pub ip: Ipv4Addr,
    pub zone: String,
    /// 1-based; the second octet of its pod CIDR.
    pub index: u8,
    pods: u8,
    _bridge: ApiBridge,
}

impl FleetNode {
    /// The name of the agent pod the kubelet runs on this node.
    pub fn agent_pod(&self) -> String {
        format!("agent-{}", self.name)
    }
}

/// A pod: a namespace behind a node, with a server answering its name on [`SERVER_PORT`].
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub zone: String,
    pub netns: Netns,
    pub ip: Ipv4Addr,
}

/// The shape of a fleet.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// Unique in the cluster: the value of [`FLEET_LABEL`] and the name of the fleet's namespace.
    pub id: String,
    /// Names of the nodes; zones are assigned round-robin (zone-a, zone-b, zone-c).
    pub nodes: Vec<String>,
}

impl FleetSpec {
    /// `count` nodes named `<id>-a`, `<id>-b`, ...
    pub fn new(id: &str, count: usize) -> Self {
        let nodes = (0..count).map(|i| format!("{id}-{}", letter(i))).collect();
        Self { id: id.to_owned(), nodes }
    }
}

fn letter(i: usize) -> char {
    char::from(b'a' + u8::try_from(i % 26).unwrap_or(0))
}

/// A simulated fleet; see the module docs.
pub struct Fleet {
    id: String,
    client: Client,
    kubeconfig: PathBuf,
    api: SocketAddr,
    dir: PathBuf,
    fabric: Netns,
    nodes: Vec<FleetNode>,
    pods: Vec<Pod>,
    servers: Vec<Server>,
    /// Network namespaces of pods that are not host-network (the operator's), by pod name.
    pod_netns: BTreeMap<String, (Netns, ApiBridge)>,
    kubelet: Kubelet,
    passed: AtomicBool,
    _lock: File,
}

/// The API server's address from a kubeconfig's current cluster.
fn api_address(kubeconfig: &Path) -> Result<SocketAddr> {
    let config = Kubeconfig::read_from(kubeconfig)?;
    let server = config
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .context("kubeconfig has no cluster server")?;
    let authority = server.trim_start_matches("https://").trim_start_matches("http://");
    let authority = authority.split('/').next().unwrap_or(authority);
    authority.parse().with_context(|| format!("API server {server} is not an IP:port"))
}

/// A tool from PATH, or from the project's tool cache (`~/.cache/fleetproxy/tools`, where
/// scripts/setup.sh installs helm and kubectl).
pub fn tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()))
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        let cache = std::env::var_os("FLEETPROXY_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/fleetproxy")
        });
        cache.join("tools").join(name)
    })
}

/// Runs `command`, returning its stdout or an error with its stderr.
pub fn run(command: &mut Command) -> Result<String> {
    crate::netns::run_checked(command)
}

/// Retries `check` every 200ms until it yields a value, failing after `timeout` with `what` and the
/// last error.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition not met");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?} ({last})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Fleet {
    /// Creates the fleet: takes the host-wide fleet lock, builds the namespaces and routes, creates
    /// the Nodes (deleting leftovers of a fleet with the same id first) and the fleet's namespace.
    pub async fn create(control_plane: &crate::ControlPlane, spec: &FleetSpec) -> Result<Self> {
        require_root();
        let binaries = Binaries::locate()?;
        let lock = tokio::task::spawn_blocking(host_lock).await??;
        sweep_stale();
        let client = control_plane.client()?;
        let kubeconfig = control_plane.kubeconfig().to_path_buf();
        let api = api_address(&kubeconfig)?;
        let n = NEXT_FLEET.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NETNS_PREFIX}{}-f{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("fleetproxy-fleet-{}", spec.id));
        let _ = std::fs::remove_dir_all(&dir);
        let kubelet = Kubelet::new(binaries, &dir)?;

        let fabric = Netns::create(&format!("{prefix}-fabric"))?;
        fabric.sysctl("net.ipv4.ip_forward", "1")?;
        no_rp_filter(&fabric)?;
        let mut nodes = Vec::new();
        for (i, name) in spec.nodes.iter().enumerate() {
            let index = u8::try_from(i + 1).ok().filter(|i| *i < 255).context("too many nodes")?;
            let netns = Netns::create(&format!("{prefix}-{name}"))?;
            let ip = Ipv4Addr::new(10, 255, index, 2);
            let gateway = Ipv4Addr::new(10, 255, index, 1);
            let link = format!("n{index}");
            netns.sysctl("net.ipv4.ip_forward", "1")?;
            no_rp_filter(&netns)?;
            fabric.add_veth(&link, &netns)?;
            fabric.ip(&["addr", "add", &format!("{gateway}/24"), "dev", &link])?;
            fabric.ip(&["link", "set", &link, "up"])?;
            fabric.ip(&["route", "add", &format!("10.{index}.0.0/16"), "via", &ip.to_string()])?;
            netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            netns.ip(&["link", "set", "eth0", "up"])?;
            netns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
            let bridge = ApiBridge::start(&netns, api)?;
            let zone = format!("zone-{}", letter(i));
            nodes.push(FleetNode { name: name.clone(), netns, ip, zone, index, pods: 0, _bridge: bridge });
        }
        let fleet = Self {
            id: spec.id.clone(),
            client,
            kubeconfig,
            api,
            dir,
            fabric,
            nodes,
            pods: Vec::new(),
            servers: Vec::new(),
            pod_netns: BTreeMap::new(),
            kubelet,
            passed: AtomicBool::new(false),
            _lock: lock,
        };
        fleet.create_api_objects().await?;
        Ok(fleet)
    }

    async fn create_api_objects(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let selector = format!("{FLEET_LABEL}={}", self.id);
        let stale = nodes.list_metadata(&ListParams::default().labels(&selector)).await?;
        for node in &stale {
            let name = node.metadata.name.clone().unwrap_or_default();
            let _ = nodes.delete(&name, &DeleteParams::default()).await;
        }
        if !stale.items.is_empty() {
            eventually("stale Nodes of the fleet to go", Duration::from_secs(30), || async {
                Ok(nodes
                    .list_metadata(&ListParams::default().labels(&selector))
                    .await?
                    .items
                    .is_empty()
                    .then_some(()))
            })
            .await?;
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        eventually("the fleet's namespace to be free", Duration::from_secs(60), || async {
            match namespaces.get_opt(&self.id).await? {
                Some(ns) if ns.metadata.deletion_timestamp.is_some() => Ok(None),
                Some(_) => {
                    // Left by a fleet of the same id that was killed: start afresh.
                    namespaces.delete(&self.id, &DeleteParams::default()).await?;
                    Ok(None)
                }
                None => {
                    let ns = Namespace {
                        metadata: ObjectMeta {
                            name: Some(self.id.clone()),
                            labels: Some(BTreeMap::from([(FLEET_LABEL.to_owned(), self.id.clone())])),
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    namespaces.create(&PostParams::default(), &ns).await?;
                    Ok(Some(()))
                }
            }
        })
        .await?;
        for node in &self.nodes {
            let object = Node {
                metadata: ObjectMeta {
                    name: Some(node.name.clone()),
                    labels: Some(BTreeMap::from([
                        (FLEET_LABEL.to_owned(), self.id.clone()),
                        (ZONE_LABEL.to_owned(), node.zone.clone()),
                        ("kubernetes.io/hostname".to_owned(), node.name.clone()),
                        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                    ])),
                    ..Default::default()
                },
                spec: Some(NodeSpec {
                    pod_cidr: Some(format!("10.{}.0.0/16", node.index)),
                    pod_cidrs: Some(vec![format!("10.{}.0.0/16", node.index)]),
                    ..Default::default()
                }),
                status: None,
            };
            nodes
                .create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("creating Node {}", node.name))?;
            let status = NodeStatus {
                addresses: Some(vec![
                    NodeAddress { type_: "InternalIP".into(), address: node.ip.to_string() },
                    NodeAddress { type_: "Hostname".into(), address: node.name.clone() },
                ]),
                ..Default::default()
            };
            let patch = serde_json::json!({ "status": status });
            nodes.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The label selector of this fleet's nodes, as a ProxyConfig's nodeSelector.
    pub fn node_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(FLEET_LABEL.to_owned(), self.id.clone())])
    }

    /// The namespace of the fleet's Services, EndpointSlices and Lease.
    pub fn namespace(&self) -> &str {
        &self.id
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The admin kubeconfig of the control plane.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's address (the same inside every pod namespace, through its bridge).
    pub fn api_address(&self) -> SocketAddr {
        self.api
    }

    /// Where the fleet's logs and scratch files go.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kubelet(&self) -> &Kubelet {
        &self.kubelet
    }

    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }

    pub fn nodes(&self) -> &[FleetNode] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Result<&FleetNode> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| format!("no node {name} in the fleet"))
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Adds a pod named `name` behind `node`, with a TCP server on [`SERVER_PORT`] answering `name`.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<Pod> {
        let at = self.nodes.iter().position(|n| n.name == node).with_context(|| format!("no node {node}"))?;
        let prefix = self.fabric.name().trim_end_matches("-fabric").to_owned();
        let host = &mut self.nodes[at];
        host.pods = host.pods.checked_add(1).filter(|p| *p < 255).context("too many pods on one node")?;
        let (n, m) = (host.index, host.pods);
        let netns = Netns::create(&format!("{prefix}-{name}"))?;
        let ip = Ipv4Addr::new(10, n, m, 2);
        let gateway = Ipv4Addr::new(10, n, m, 1);
        let link = format!("p{m}");
        host.netns.add_veth(&link, &netns)?;
        host.netns.ip(&["addr", "add", &format!("{gateway}/24"), "dev", &link])?;
        host.netns.ip(&["link", "set", &link, "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        self.servers.push(netns.serve(name, Proto::Tcp, SocketAddr::new(ip.into(), SERVER_PORT))?);
        let pod = Pod { name: name.to_owned(), node: node.to_owned(), zone: host.zone.clone(), netns, ip };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Creates a ClusterIP Service `name` on `port` (to [`SERVER_PORT`]) without a selector, and its
    /// EndpointSlice listing `backends` as ready, with their node and zone. Returns the ClusterIP.
    pub async fn create_service(&self, name: &str, port: u16, backends: &[Pod]) -> Result<Ipv4Addr> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.id);
        let service = Service {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                ip_families: Some(vec!["IPv4".into()]),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: i32::from(port),
                    target_port: Some(IntOrString::Int(i32::from(SERVER_PORT))),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        };
        let created = services
            .create(&PostParams::default(), &service)
            .await
            .with_context(|| format!("creating Service {name}"))?;
        let ip = created.spec.and_then(|s| s.cluster_ip).context("Service without a ClusterIP")?;
        self.write_endpoints(name, backends).await?;
        ip.parse().with_context(|| format!("ClusterIP {ip}"))
    }

    /// Writes the EndpointSlice of Service `service` with `backends` as its ready endpoints.
    pub async fn write_endpoints(&self, service: &str, backends: &[Pod]) -> Result<()> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.id);
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-fleet")),
                labels: Some(BTreeMap::from([
                    ("kubernetes.io/service-name".to_owned(), service.to_owned()),
                    ("endpointslice.kubernetes.io/managed-by".to_owned(), SLICE_MANAGER.to_owned()),
                ])),
                annotations: Some(BTreeMap::from([(
                    "endpoints.kubernetes.io/last-change-trigger-time".to_owned(),
                    Timestamp::now().to_string(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: backends
                .iter()
                .map(|pod| Endpoint {
                    addresses: vec![pod.ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(pod.node.clone()),
                    zone: Some(pod.zone.clone()),
                    ..Default::default()
                })
                .collect::<Vec<_>>()
                .into(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(i32::from(SERVER_PORT)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        };
        let name = format!("{service}-fleet");
        slices
            .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&slice))
            .await
            .with_context(|| format!("writing EndpointSlice {name}"))?;
        Ok(())
    }

    /// Runs the agent `container` on every node, as the kubelet would run a DaemonSet's pod there.
    pub fn run_agents(&self, container: &Container, extra_env: &[(String, String)]) -> Result<()> {
        for node in &self.nodes {
            self.run_agent(&node.name, container, extra_env)?;
        }
        Ok(())
    }

    /// Runs the agent `container` on `node` (replacing the one running there).
    pub fn run_agent(&self, node: &str, container: &Container, extra_env: &[(String, String)]) -> Result<()> {
        let node = self.node(node)?;
        self.kubelet.run(PodSpec {
            name: node.agent_pod(),
            namespace: self.id.clone(),
            node_name: node.name.clone(),
            netns: node.netns.clone(),
            container: container.clone(),
            entrypoint: AGENT.to_owned(),
            extra_env: extra_env.to_vec(),
        })
    }

    /// Runs the first container of `daemonset`'s pod template on every node, with the environment
    /// `extra_env(node)` besides its own (a token bound to that node, say).
    pub fn run_daemonset(
        &self,
        daemonset: &DaemonSet,
        extra_env: impl Fn(&FleetNode) -> Result<Vec<(String, String)>>,
    ) -> Result<()> {
        let container = daemonset
            .spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.containers.first())
            .context("the DaemonSet has no container")?;
        for node in &self.nodes {
            self.run_agent(&node.name, container, &extra_env(node)?)?;
        }
        Ok(())
    }

    /// Runs a pod that is not host-network (the operator) in a network namespace of its own, with an
    /// API bridge; `entrypoint` stands in for an image entrypoint when the container has no command.
    pub fn run_pod(
        &mut self,
        name: &str,
        container: &Container,
        entrypoint: &str,
        extra_env: &[(String, String)],
    ) -> Result<()> {
        if !self.pod_netns.contains_key(name) {
            let prefix = self.fabric.name().trim_end_matches("-fabric").to_owned();
            let netns = Netns::create(&format!("{prefix}-{name}"))?;
            let bridge = ApiBridge::start(&netns, self.api)?;
            self.pod_netns.insert(name.to_owned(), (netns, bridge));
        }
        let netns = self.pod_netns[name].0.clone();
        self.kubelet.run(PodSpec {
            name: name.to_owned(),
            namespace: self.id.clone(),
            node_name: String::new(),
            netns,
            container: container.clone(),
            entrypoint: entrypoint.to_owned(),
            extra_env: extra_env.to_vec(),
        })
    }

    /// The network namespace of a pod started with [`Fleet::run_pod`].
    pub fn pod_netns(&self, name: &str) -> Result<&Netns> {
        self.pod_netns.get(name).map(|(netns, _)| netns).with_context(|| format!("no pod {name}"))
    }

    /// Fails if any process the kubelet runs has exited.
    pub fn check_processes(&self) -> Result<()> {
        for pod in self.kubelet.pods() {
            self.kubelet.check(&pod)?;
        }
        Ok(())
    }

    /// `iptables-save` output lines of ours (`FP-` chains and rules) in `node`'s namespace.
    pub fn iptables_objects(&self, node: &str) -> Result<Vec<String>> {
        let node = self.node(node)?;
        let mut found = Vec::new();
        for tool in ["iptables-save", "ip6tables-save"] {
            let text = node.netns.run(tool, &[])?;
            found.extend(text.lines().filter(|l| l.contains("FP-")).map(str::to_owned));
        }
        Ok(found)
    }

    /// The nftables tables in `node`'s namespace (`nft list tables`).
    pub fn nft_tables(&self, node: &str) -> Result<Vec<String>> {
        let text = self.node(node)?.netns.run("nft", &["list", "tables"])?;
        Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
    }

    /// Deletes the fleet's ProxyConfigs and waits (up to `timeout`) until they are gone.
    pub fn delete_proxyconfigs(&self, timeout: Duration) -> Result<()> {
        let selector = format!("{FLEET_LABEL}={}", self.id);
        run(kubectl(&self.kubeconfig).args([
            "delete",
            "proxyconfigs",
            "-l",
            &selector,
            "--ignore-not-found",
            &format!("--timeout={}s", timeout.as_secs().max(1)),
        ]))
        .map(drop)
    }

    /// Marks the fleet's test as passed: dropping the fleet then removes the process logs instead of
    /// printing them (as it does after a failure or a panic).
    pub fn passed(&self) {
        self.passed.store(true, Ordering::Relaxed);
    }

    /// Prints the tails of every process log to stderr.
    pub fn dump_logs(&self) {
        self.kubelet.dump_logs(60);
    }
}

/// `kubectl --kubeconfig <kubeconfig>`.
pub fn kubectl(kubeconfig: &Path) -> Command {
    let mut command = Command::new(tool("kubectl"));
    command.arg("--kubeconfig").arg(kubeconfig);
    command
}

/// Writes to `out` a kubeconfig for the control plane of `admin` that authenticates as service
/// account `namespace/account` with a fresh token (`kubectl create token`), bound to Node
/// `bound_node` if given, as the token the kubelet mounts into a pod on that node is.
pub fn service_account_kubeconfig(
    admin: &Path,
    namespace: &str,
    account: &str,
    bound_node: Option<&str>,
    out: &Path,
) -> Result<()> {
    let mut create = kubectl(admin);
    create.args(["create", "token", account, "-n", namespace, "--duration=2h"]);
    if let Some(node) = bound_node {
        create.args(["--bound-object-kind=Node", &format!("--bound-object-name={node}")]);
    }
    let token = run(&mut create)?.trim().to_owned();
    let mut config = Kubeconfig::read_from(admin)?;
    let user = format!("system:serviceaccount:{namespace}:{account}");
    config.auth_infos =
        vec![serde_json::from_value(serde_json::json!({ "name": user, "user": { "token": token } }))?];
    for context in config.contexts.iter_mut().filter_map(|c| c.context.as_mut()) {
        context.user = Some(user.clone());
    }
    // JSON is YAML: every client reads it.
    std::fs::write(out, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", out.display()))?;
    std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(())
}

fn no_rp_filter(netns: &Netns) -> Result<()> {
    netns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    netns.sysctl("net.ipv4.conf.default.rp_filter", "0")
}

/// Serializes fleets on this host: an operator acts on every ProxyConfig of the cluster, so two
/// fleets with operators against one control plane would act on each other's configs.
fn host_lock() -> Result<File> {
    let path = std::env::temp_dir().join("fleetproxy-fleet.lock");
    let file = File::options().create(true).truncate(false).write(true).open(&path)?;
    file.lock().with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if !self.passed.load(Ordering::Relaxed) {
            eprintln!("fleet {}: logs in {}", self.id, self.dir.display());
            self.dump_logs();
        }
        if let Err(e) = self.delete_proxyconfigs(Duration::from_secs(20)) {
            eprintln!("fleet {}: deleting ProxyConfigs: {e:#}", self.id);
        }
        for pod in self.kubelet.pods() {
            self.kubelet.kill(&pod);
        }
        let selector = format!("{FLEET_LABEL}={}", self.id);
        for args in [
            vec!["delete", "nodes", "-l", &selector, "--wait=false", "--ignore-not-found"],
            vec!["delete", "namespace", &self.id, "--wait=false", "--ignore-not-found"],
        ] {
            if let Err(e) = run(kubectl(&self.kubeconfig).args(&args)) {
                eprintln!("fleet {}: {e:#}", self.id);
            }
        }
        self.servers.clear();
        if self.passed.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// --- ProxyConfigs ----------------------------------------------------------------------------------

/// A ProxyConfig named `name` for this fleet's nodes (selected by [`FLEET_LABEL`], and labelled with
/// it, so that dropping the fleet deletes it), in `mode`, one node at a time.
pub fn proxy_config(fleet: &Fleet, name: &str, mode: ProxyMode) -> ProxyConfig {
    let mut config = ProxyConfig::new(
        name,
        ProxyConfigSpec {
            settings: ProxySettings { mode, ..ProxySettings::default() },
            node_selector: fleet.node_selector(),
            rollout: RolloutSpec::default(),
        },
    );
    config.metadata.labels = Some(fleet.node_selector());
    config
}

/// Whether the config's status, for its current generation, shows `nodes` nodes all Ready on the
/// newest settings in `mode`, each with a rule count read back from its kernel.
pub fn fleet_settled(config: &ProxyConfig, mode: ProxyMode, nodes: usize) -> bool {
    let Some(status) = &config.status else { return false };
    status.observed_generation == config.metadata.generation
        && status.summary.nodes as usize == nodes
        && status.nodes.len() == nodes
        && status.nodes.iter().all(|n| {
            n.ready && n.updated && n.active_mode == Some(mode) && n.rule_count.is_some_and(|c| c > 0)
        })
}

/// Waits until the ProxyConfig `name` shows all `nodes` nodes settled in `mode`; returns it.
pub async fn wait_for_fleet_mode(
    client: &Client,
    name: &str,
    mode: ProxyMode,
    nodes: usize,
    timeout: Duration,
) -> Result<ProxyConfig> {
    let api: Api<ProxyConfig> = Api::all(client.clone());
    let what = format!("ProxyConfig {name}: {nodes} nodes Ready in {mode}");
    let last: Arc<Mutex<Option<ProxyConfigStatus>>> = Arc::default();
    let found = eventually(&what, timeout, || {
        let (api, last) = (api.clone(), Arc::clone(&last));
        async move {
            let config = api.get(name).await?;
            let settled = fleet_settled(&config, mode, nodes);
            *lock(&last) = config.status.clone();
            Ok(settled.then_some(config))
        }
    })
    .await;
    found.with_context(|| {
        format!("last status: {}", serde_json::to_string_pretty(&*lock(&last)).unwrap_or_default())
    })
}

/// A condition of a ProxyConfig's status, by type.
pub fn condition<'a>(config: &'a ProxyConfig, type_: &str) -> Option<&'a Condition> {
    config.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

// --- the processes' command lines ------------------------------------------------------------------

fn env_from_field(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: field.to_owned(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The agent's container when the test, not the operator, decides how agents run: the DaemonSet's
/// shape (NODE_NAME from the downward API) plus a kubeconfig, and `extra_args`.
pub fn agent_container(kubeconfig: &Path, extra_args: &[&str]) -> Container {
    let mut args =
        vec!["--node-name=$(NODE_NAME)".to_owned(), format!("--kubeconfig={}", kubeconfig.display())];
    args.extend(extra_args.iter().map(|a| (*a).to_owned()));
    Container {
        name: "agent".into(),
        command: Some(vec![AGENT.into()]),
        args: Some(args),
        env: Some(vec![env_from_field("NODE_NAME", "spec.nodeName")]),
        ..Default::default()
    }
}

/// The operator's container for a test: its own Lease in `namespace`, no DaemonSet, metrics on
/// 127.0.0.1:8080 of its pod's namespace.
pub fn operator_container(kubeconfig: &Path, namespace: &str, lease: &str) -> Container {
    Container {
        name: "operator".into(),
        command: Some(vec![OPERATOR.into()]),
        args: Some(vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--namespace={namespace}"),
            "--manage-daemonset=false".into(),
            "--leader-election=true".into(),
            format!("--lease-name={lease}"),
            "--metrics-bind-address=127.0.0.1:8080".into(),
            "--reconcile-debounce-ms=200".into(),
        ]),
        env: Some(vec![env_from_field("POD_NAME", "metadata.name")]),
        ..Default::default()
    }
}

// --- HTTP and Prometheus --------------------------------------------------------------------------

/// `GET path` from inside `netns` (an endpoint bound to a namespace's 127.0.0.1); the body.
pub fn http_get(netns: &Netns, addr: SocketAddr, path: &str) -> Result<String> {
    let path = path.to_owned();
    let response = netns.enter(move || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })??;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {addr}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// Every sample of metric `name` in a Prometheus text: (labels as written, value).
pub fn metric_samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
                let (labels, value) = rest.split_once('}')?;
                (labels.to_owned(), value)
            } else if rest.starts_with(' ') {
                (String::new(), rest)
            } else {
                return None;
            };
            let value = value.split_whitespace().next()?.parse().ok()?;
            Some((labels, value))
        })
        .collect()
}

/// The sum of every sample of metric `name`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    metric_samples(text, name).iter().map(|(_, v)| v).sum()
}

// --- traffic ---------------------------------------------------------------------------------------

/// One failed request.
#[derive(Clone, Debug)]
pub struct Failure {
    pub after: Duration,
    pub node: String,
    pub outcome: Outcome,
}

/// What the clients saw so far.
#[derive(Clone, Debug, Default)]
pub struct TrafficStats {
    pub ok: u64,
    pub failed: u64,
    /// Answers by backend name.
    pub backends: BTreeMap<String, u64>,
    /// Requests (ok, failed) by the node they were sent from.
    pub by_node: BTreeMap<String, (u64, u64)>,
    pub failures: Vec<Failure>,
}

/// Clients on every node sending TCP requests to one address continuously, one at a time each.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<NsThread<()>>,
    stats: Arc<Mutex<TrafficStats>>,
}

impl Traffic {
    /// Starts one client per node, each sending a request to `addr` every `interval`, with a
    /// `timeout` per request.
    pub fn start(
        nodes: &[FleetNode],
        addr: SocketAddr,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(TrafficStats::default()));
        let started = Instant::now();
        let mut threads = Vec::new();
        for node in nodes {
            let (stop, stats, name) = (Arc::clone(&stop), Arc::clone(&stats), node.name.clone());
            threads.push(node.netns.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let outcome = probe_here(Proto::Tcp, addr, timeout);
                    let mut stats = lock(&stats);
                    let entry = stats.by_node.entry(name.clone()).or_default();
                    match outcome {
                        Outcome::Answered(backend) => {
                            entry.0 += 1;
                            stats.ok += 1;
                            *stats.backends.entry(backend).or_default() += 1;
                        }
                        outcome => {
                            entry.1 += 1;
                            stats.failed += 1;
                            stats.failures.push(Failure {
                                after: started.elapsed(),
                                node: name.clone(),
                                outcome,
                            });
                        }
                    }
                    drop(stats);
                    std::thread::sleep(interval);
                }
            })?);
        }
        Ok(Self { stop, threads, stats })
    }

    /// What the clients saw until now.
    pub fn stats(&self) -> TrafficStats {
        self.view().stats()
    }

    /// A handle that reads the counts while the clients run (from a callback, say).
    pub fn view(&self) -> TrafficView {
        TrafficView(Arc::clone(&self.stats))
    }

    /// Stops the clients and returns what they saw.
    pub fn stop(mut self) -> TrafficStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Reads what the clients of a [`Traffic`] saw so far.
#[derive(Clone)]
pub struct TrafficView(Arc<Mutex<TrafficStats>>);

impl TrafficView {
    pub fn stats(&self) -> TrafficStats {
        lock(&self.0).clone()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.halt();
    }
}

// --- node states -----------------------------------------------------------------------------------

/// What a ProxyNode says about its node: the settings wanted and what the agent applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    pub desired: ProxyMode,
    pub config_generation: i64,
    pub active: Option<ProxyMode>,
    pub applied_generation: Option<i64>,
    pub ready: Option<bool>,
    pub reason: String,
    pub message: String,
    pub rule_count: Option<i64>,
}

impl NodeState {
    pub fn of(proxy_node: &ProxyNode) -> Self {
        let status = proxy_node.status.clone().unwrap_or_default();
        let ready = proxy_node.ready_condition();
        Self {
            desired: proxy_node.spec.settings.mode,
            config_generation: proxy_node.spec.config_generation,
            active: status.active_mode,
            applied_generation: status.applied_generation,
            ready: ready.map(|c| c.status == "True"),
            reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
            message: ready.map(|c| c.message.clone()).unwrap_or_default(),
            rule_count: status.rule_count,
        }
    }

    /// Ready on the newest settings it was given, in the mode they ask for.
    pub fn settled(&self) -> bool {
        self.ready == Some(true)
            && self.applied_generation == Some(self.config_generation)
            && self.active == Some(self.desired)
    }

    /// A short line: `iptables -> nftables, not ready (Synced), 42 rules`.
    pub fn describe(&self) -> String {
        let active = self.active.map_or("-", ProxyMode::as_str);
        let state = match self.ready {
            Some(true) if self.settled() => "ready".to_owned(),
            Some(true) => "applying".to_owned(),
            Some(false) => format!("not ready ({})", self.reason),
            None => "pending".to_owned(),
        };
        let rules = self.rule_count.map(|c| format!(", {c} rules")).unwrap_or_default();
        if self.active == Some(self.desired) {
            format!("{active}, {state}{rules}")
        } else {
            format!("{active} -> {}, {state}{rules}", self.desired)
        }
    }
}

/// One change of one node's state; `state` is None when its ProxyNode was deleted.
#[derive(Clone, Debug)]
pub struct Change {
    pub after: Duration,
    pub node: String,
    pub state: Option<NodeState>,
}

type OnChange = Box<dyn Fn(&Change) + Send + Sync>;

/// Records every change of the ProxyNodes of some nodes, from a watch (no state is missed between
/// two polls).
pub struct StateLog {
    changes: Arc<Mutex<Vec<Change>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StateLog {
    /// Starts watching on the current tokio runtime; `on_change` is called for every change.
    pub async fn start(client: Client, nodes: BTreeSet<String>, on_change: Option<OnChange>) -> Result<Self> {
        let changes: Arc<Mutex<Vec<Change>>> = Arc::default();
        let log = Arc::clone(&changes);
        let api: Api<ProxyNode> = Api::all(client);
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut current: BTreeMap<String, NodeState> = BTreeMap::new();
            let mut synced = Some(synced_tx);
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            while let Some(event) = events.next().await {
                let (node, state) = match event {
                    Ok(watcher::Event::Apply(pn) | watcher::Event::InitApply(pn)) => {
                        (pn.metadata.name.clone().unwrap_or_default(), Some(NodeState::of(&pn)))
                    }
                    Ok(watcher::Event::Delete(pn)) => (pn.metadata.name.clone().unwrap_or_default(), None),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    Ok(watcher::Event::Init) | Err(_) => continue,
                };
                if !nodes.contains(&node) {
                    continue;
                }
                let changed = match &state {
                    Some(state) => current.insert(node.clone(), state.clone()).as_ref() != Some(state),
                    None => current.remove(&node).is_some(),
                };
                if changed {
                    let change = Change { after: started.elapsed(), node, state };
                    if let Some(f) = &on_change {
                        f(&change);
                    }
                    lock(&log).push(change);
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), synced_rx)
            .await
            .context("ProxyNode watch did not start")??;
        Ok(Self { changes, task })
    }

    /// Every change recorded so far.
    pub fn changes(&self) -> Vec<Change> {
        lock(&self.changes).clone()
    }

    /// The latest state of every node, replaying the changes.
    pub fn current(&self) -> BTreeMap<String, NodeState> {
        replay(&self.changes()).into_iter().last().unwrap_or_default()
    }
}

/// The state of every node after each change.
pub fn replay(changes: &[Change]) -> Vec<BTreeMap<String, NodeState>> {
    let mut current = BTreeMap::new();
    changes
        .iter()
        .map(|change| {
            match &change.state {
                Some(state) => current.insert(change.node.clone(), state.clone()),
                None => current.remove(&change.node),
            };
            current.clone()
        })
        .collect()
}

/// The largest number of nodes that were unsettled (given new settings, not yet Ready on them) at
/// the same time, after the first `skip` changes.
pub fn max_unsettled(changes: &[Change], skip: usize) -> usize {
    replay(changes)
        .iter()
        .skip(skip)
        .map(|states| states.values().filter(|s| !s.settled()).count())
        .max()
        .unwrap_or(0)
}

impl Drop for StateLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_parsed() {
        let text = "# HELP x\nfleetproxy_operator_api_writes_total{kind=\"ProxyNode\"} 6\n\
                    fleetproxy_operator_api_writes_total{kind=\"Event\"} 3\nfleetproxy_operator_api_writes_totalx 9\nother 1\n";
        assert_eq!(metric_sum(text, "fleetproxy_operator_api_writes_total"), 9.0);
        assert_eq!(metric_samples(text, "fleetproxy_operator_api_writes_total")[0].0, "kind=\"ProxyNode\"");
    }
}
