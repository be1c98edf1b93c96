//! The agent DaemonSet, built from the operator's settings. Pure; the controller applies it.

use std::{collections::BTreeMap, net::SocketAddr};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet},
        core::v1::{
            Capabilities, Container, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource,
            ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, SecurityContext, Toleration, Volume,
            VolumeMount,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};

/// The label every agent pod and the DaemonSet carry; the DaemonSet selects its pods by it.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const AGENT_NAME: &str = "fleetproxy-agent";
/// Hash of the DaemonSet as built, so the operator writes it only when what it would write changed
/// (comparing with the live object instead would trip over the API server's defaulting).
pub const SPEC_HASH_ANNOTATION: &str = "fleetproxy.io/spec-hash";
const XTABLES_LOCK: &str = "/run/xtables.lock";
const LIB_MODULES: &str = "/lib/modules";

/// What the operator's flags say about the agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSettings {
    pub namespace: String,
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; the cluster's default when absent.
    pub image_pull_policy: Option<String>,
    pub service_account: String,
    /// Where the agent serves `/metrics` and `/proxyMode` (kube-proxy's `--metrics-bind-address`).
    pub metrics_bind_address: SocketAddr,
    /// Where the agent serves `/healthz` and `/livez` (kube-proxy's `--healthz-bind-address`).
    pub health_bind_address: SocketAddr,
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([(NAME_LABEL.to_owned(), AGENT_NAME.to_owned())])
}

fn host_path_volume(name: &str, path: &str, type_: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        host_path: Some(HostPathVolumeSource { path: path.to_owned(), type_: Some(type_.to_owned()) }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

/// FNV-1a over the serialized object: stable across builds, unlike `std`'s hasher.
fn stable_hash(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The agent DaemonSet. `owners` are the live ProxyConfigs: the DaemonSet is shared by all of them and
/// garbage-collected once none is left.
pub fn agent_daemonset(settings: &AgentSettings, owners: Vec<OwnerReference>) -> DaemonSet {
    let container = Container {
        name: "agent".to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        // In-cluster: no --kubeconfig, the pod's service account is used.
        args: Some(vec![
            "--node-name=$(NODE_NAME)".to_owned(),
            format!("--metrics-bind-address={}", settings.metrics_bind_address),
            format!("--healthz-bind-address={}", settings.health_bind_address),
        ]),
        env: Some(vec![EnvVar {
            name: "NODE_NAME".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            // NET_ADMIN for iptables, nftables and IPVS; NET_RAW for iptables' raw sockets.
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".to_owned()),
                port: IntOrString::Int(i32::from(settings.health_bind_address.port())),
                ..Default::default()
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            // Shared with every other iptables user on the host, so that concurrent writers serialize.
            mount("xtables-lock", XTABLES_LOCK, false),
            // For loading the ip_vs and nf_tables modules the node's kernel has.
            mount("lib-modules", LIB_MODULES, true),
        ]),
        ..Default::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        host_network: Some(true),
        dns_policy: Some("ClusterFirstWithHostNet".to_owned()),
        priority_class_name: Some("system-node-critical".to_owned()),
        service_account_name: Some(settings.service_account.clone()),
        // Every node needs its Service routing, whatever its taints.
        tolerations: Some(vec![Toleration { operator: Some("Exists".to_owned()), ..Default::default() }]),
        volumes: Some(vec![
            host_path_volume("xtables-lock", XTABLES_LOCK, "FileOrCreate"),
            host_path_volume("lib-modules", LIB_MODULES, "Directory"),
        ]),
        ..Default::default()
    };
    let spec = DaemonSetSpec {
        selector: LabelSelector { match_labels: Some(labels()), ..Default::default() },
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta { labels: Some(labels()), ..Default::default() }),
            spec: Some(pod),
        },
        update_strategy: Some(DaemonSetUpdateStrategy {
            type_: Some("RollingUpdate".to_owned()),
            rolling_update: Some(RollingUpdateDaemonSet {
                max_unavailable: Some(IntOrString::String("10%".to_owned())),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    let mut daemonset = DaemonSet {
        metadata: ObjectMeta {
            name: Some(AGENT_NAME.to_owned()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels()),
            owner_references: Some(owners),
            ..Default::default()
        },
        spec,
        ..Default::default()
    };
    // Serializing plain structs of strings and numbers cannot fail; an empty hash would only cost
    // one redundant write.
    let hash = serde_json::to_vec(&daemonset).map(|bytes| stable_hash(&bytes)).unwrap_or_default();
    daemonset.metadata.annotations = Some(BTreeMap::from([(SPEC_HASH_ANNOTATION.to_owned(), hash)]));
    daemonset
}

/// Whether the live DaemonSet already is what [`agent_daemonset`] builds.
pub fn is_current(live: &DaemonSet, desired: &DaemonSet) -> bool {
    let hash_of = |ds: &DaemonSet| ds.metadata.annotations.as_ref()?.get(SPEC_HASH_ANNOTATION).cloned();
    hash_of(live).is_some() && hash_of(live) == hash_of(desired)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AgentSettings {
        AgentSettings {
            namespace: "kube-system".into(),
            image: "ghcr.io/fleetproxy/agent:0.1.0".into(),
            image_pull_policy: Some("IfNotPresent".into()),
            service_account: "fleetproxy-agent".into(),
            metrics_bind_address: "127.0.0.1:10249".parse().expect("address"),
            health_bind_address: "0.0.0.0:10256".parse().expect("address"),
        }
    }

    fn owner(name: &str) -> OwnerReference {
        OwnerReference {
            api_version: "fleetproxy.io/v1alpha1".into(),
            kind: "ProxyConfig".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            ..Default::default()
        }
    }

    fn pod(ds: &DaemonSet) -> &PodSpec {
        ds.spec.template.spec.as_ref().expect("pod spec")
    }

    #[test]
    fn metadata_and_selector() {
        let ds = agent_daemonset(&settings(), vec![owner("default")]);
        assert_eq!(ds.metadata.name.as_deref(), Some("fleetproxy-agent"));
        assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
        assert_eq!(ds.metadata.labels, Some(labels()));
        assert_eq!(ds.metadata.owner_references, Some(vec![owner("default")]));
        let spec = &ds.spec;
        assert_eq!(spec.selector.match_labels, Some(labels()));
        assert_eq!(spec.template.metadata.as_ref().and_then(|m| m.labels.clone()), Some(labels()));
    }

    #[test]
    fn container_runs_the_agent_in_cluster_for_its_node() {
        let ds = agent_daemonset(&settings(), vec![]);
        let container = &pod(&ds).containers[0];
        assert_eq!(container.image.as_deref(), Some("ghcr.io/fleetproxy/agent:0.1.0"));
        assert_eq!(container.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(
            container.args.as_deref(),
            Some(
                &[
                    "--node-name=$(NODE_NAME)".to_owned(),
                    "--metrics-bind-address=127.0.0.1:10249".to_owned(),
                    "--healthz-bind-address=0.0.0.0:10256".to_owned(),
                ][..]
            )
        );
        assert!(!container.args.iter().flatten().any(|a| a.starts_with("--kubeconfig")));
        let env = &container.env.as_ref().expect("env")[0];
        assert_eq!(env.name, "NODE_NAME");
        let field = env.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("downward API");
        assert_eq!(field.field_path, "spec.nodeName");
    }

    #[test]
    fn pod_runs_on_every_node_in_the_host_network() {
        let ds = agent_daemonset(&settings(), vec![]);
        let pod = pod(&ds);
        assert_eq!(
            pod.tolerations,
            Some(vec![Toleration { operator: Some("Exists".into()), ..Default::default() }]),
            "one toleration with no key tolerates every taint"
        );
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
        assert_eq!(pod.service_account_name.as_deref(), Some("fleetproxy-agent"));
    }

    #[test]
    fn container_has_network_capabilities_without_privilege() {
        let ds = agent_daemonset(&settings(), vec![]);
        let security = pod(&ds).containers[0].security_context.as_ref().expect("security context");
        assert_eq!(security.privileged, Some(false));
        let added = security.capabilities.as_ref().and_then(|c| c.add.clone()).expect("capabilities");
        assert_eq!(added, ["NET_ADMIN", "NET_RAW"]);
    }

    #[test]
    fn host_mounts_for_the_xtables_lock_and_kernel_modules() {
        let ds = agent_daemonset(&settings(), vec![]);
        let pod = pod(&ds);
        let volumes = pod.volumes.as_ref().expect("volumes");
        let host = |name: &str| {
            volumes
                .iter()
                .find(|v| v.name == name)
                .and_then(|v| v.host_path.clone())
                .expect("host path volume")
        };
        assert_eq!(host("xtables-lock").path, "/run/xtables.lock");
        assert_eq!(host("xtables-lock").type_.as_deref(), Some("FileOrCreate"));
        assert_eq!(host("lib-modules").path, "/lib/modules");
        let mounts = pod.containers[0].volume_mounts.as_ref().expect("mounts");
        let mount = |name: &str| mounts.iter().find(|m| m.name == name).expect("mount");
        assert_eq!(mount("xtables-lock").mount_path, "/run/xtables.lock");
        assert_eq!(mount("xtables-lock").read_only, None);
        assert_eq!(mount("lib-modules").mount_path, "/lib/modules");
        assert_eq!(mount("lib-modules").read_only, Some(true));
    }

    #[test]
    fn rolling_updates_and_readiness() {
        let ds = agent_daemonset(&settings(), vec![]);
        let strategy = ds.spec.update_strategy.clone().expect("strategy");
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        assert_eq!(
            strategy.rolling_update.and_then(|r| r.max_unavailable),
            Some(IntOrString::String("10%".into()))
        );
        let probe =
            pod(&ds).containers[0].readiness_probe.as_ref().and_then(|p| p.http_get.clone()).expect("probe");
        assert_eq!(probe.path.as_deref(), Some("/healthz"));
        assert_eq!(probe.port, IntOrString::Int(10256));
    }

    #[test]
    fn the_hash_changes_with_what_is_built_and_only_then() {
        let base = agent_daemonset(&settings(), vec![owner("default")]);
        assert!(is_current(&base, &agent_daemonset(&settings(), vec![owner("default")])));
        let newer_image = AgentSettings { image: "ghcr.io/fleetproxy/agent:0.2.0".into(), ..settings() };
        assert!(!is_current(&base, &agent_daemonset(&newer_image, vec![owner("default")])));
        assert!(!is_current(&base, &agent_daemonset(&settings(), vec![owner("default"), owner("edge")])));
        let mut unannotated = base.clone();
        unannotated.metadata.annotations = None;
        assert!(!is_current(&unannotated, &base));
    }
}
