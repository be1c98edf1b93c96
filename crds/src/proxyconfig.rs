//! ProxyConfig: the cluster's proxy settings and the rollout that brings nodes onto them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::{
    apis::meta::v1::{Condition, Time},
    util::intstr::IntOrString,
};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{ProxyMode, ProxySettings};

/// The condition types of a ProxyConfig.
pub mod condition_types {
    /// Every selected node runs the newest settings and reports Ready.
    pub const READY: &str = "Ready";
    /// Some selected nodes are not yet on the newest settings.
    pub const PROGRESSING: &str = "Progressing";
    /// A node failed to apply the settings; the rollout halts until it recovers.
    pub const DEGRADED: &str = "Degraded";
    /// Another ProxyConfig selects some of the same nodes; those nodes are left to neither.
    pub const CONFLICT: &str = "Conflict";
}

/// The cluster's proxy settings (`kubectl edit proxyconfig default`).
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "fleetproxy.io",
    version = "v1alpha1",
    kind = "ProxyConfig",
    shortname = "pxc",
    category = "fleetproxy",
    status = "ProxyConfigStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "The proxy settings of a set of nodes, and the rollout that moves them onto new settings",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Updated", type_ = "integer", json_path = ".status.summary.updated"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.summary.ready"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfigSpec {
    #[serde(flatten)]
    pub settings: ProxySettings,

    /// The nodes this config governs, by label (every node when empty).
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub node_selector: BTreeMap<String, String>,

    /// How fast nodes move onto new settings.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}

/// How fast nodes move onto new settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// How many selected nodes may be not Ready on the newest settings at once: a count (at least 1)
    /// or a percentage of the selected nodes (rounded down, but at least one node).
    #[serde(default = "default_max_unavailable")]
    #[x_kube(validation = Rule::new(
        "type(self) == int ? self >= 1 : self.matches('^([1-9][0-9]?|100)%$')"
    ).message("maxUnavailable must be a count of at least 1 or a percentage from 1% to 100%"))]
    pub max_unavailable: IntOrString,

    /// Hold the rollout where it is: no further node gets new settings until this is false again.
    #[serde(default)]
    pub paused: bool,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self { max_unavailable: default_max_unavailable(), paused: false }
    }
}

/// What the operator observed across the selected nodes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfigStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Progressing, Degraded and Conflict.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Counts over every selected node.
    #[serde(default)]
    pub summary: Summary,

    /// One entry per node, failing and lagging nodes first; capped in length (see summary.listed), so
    /// that the object stays small on large clusters while the counts in summary stay exact.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub nodes: Vec<NodeEntry>,
}

/// Counts over every selected node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Nodes this config selects.
    #[serde(default)]
    pub nodes: u32,
    /// Nodes whose agent applied the newest settings.
    #[serde(default)]
    pub updated: u32,
    /// Nodes whose agent reports Ready.
    #[serde(default)]
    pub ready: u32,
    /// Nodes whose agent reports a failure.
    #[serde(default)]
    pub failed: u32,
    /// Nodes per active mode, as read back from their kernels.
    #[serde(default)]
    pub by_mode: BTreeMap<String, u32>,
    /// How many of the nodes are listed in status.nodes.
    #[serde(default)]
    pub listed: u32,
}

/// One node as its agent last reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEntry {
    pub name: String,
    /// The mode whose rules are in the node's kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_mode: Option<ProxyMode>,
    /// How many rules of ours the kernel holds, counted from the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<Time>,
    /// The agent applied the newest settings.
    #[serde(default)]
    pub updated: bool,
    #[serde(default)]
    pub ready: bool,
    /// Why the node is not ready, in the agent's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
