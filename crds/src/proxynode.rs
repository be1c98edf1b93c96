//! ProxyNode: what the operator asks of one node now, and what that node's agent reports back.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{GoDuration, ProxyMode, ProxySettings};

/// The condition types of a ProxyNode.
pub mod node_condition_types {
    /// The kernel holds the rules of the settings in spec, read back after the last sync.
    pub const READY: &str = "Ready";
}

/// One per node, named after the Node and owned by it. Each agent writes only its own ProxyNode's
/// status, so thousands of agents never contend on one object.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "fleetproxy.io",
    version = "v1alpha1",
    kind = "ProxyNode",
    shortname = "pxn",
    category = "fleetproxy",
    status = "ProxyNodeStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "The proxy settings the operator wants on one node now, and what its agent applied",
    printcolumn(name = "Desired", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activeMode"),
    printcolumn(name = "Rules", type_ = "integer", json_path = ".status.ruleCount"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProxyNodeSpec {
    #[serde(flatten)]
    pub settings: ProxySettings,

    /// The ProxyConfig these settings come from.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub config_name: String,

    /// That ProxyConfig's generation when the operator wrote these settings.
    #[serde(default)]
    pub config_generation: i64,
}

/// What this node's agent applied and read back from its kernel.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyNodeStatus {
    /// The mode whose rules are in the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_mode: Option<ProxyMode>,

    /// The spec.configGeneration the agent last applied successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_generation: Option<i64>,

    /// Rules of ours in the kernel, counted from the kernel after the last sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_count: Option<i64>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<Time>,

    /// How long the last full sync took, rendering and kernel apply together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_duration: Option<GoDuration>,

    /// What this node's kernel and userspace can run.
    #[serde(default)]
    pub capabilities: Capabilities,

    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// What a node can run, as its agent found it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub modes: Vec<ProxyMode>,
}
