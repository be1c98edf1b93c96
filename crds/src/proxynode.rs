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

/// Where a node's agent stands on the settings in its ProxyNode's spec, read from the status alone.
///
/// The contract the agent keeps, and the operator relies on:
/// - it writes status only after an attempt to apply the spec, never while applying;
/// - on success it sets `appliedGeneration` to `spec.configGeneration` and `Ready` to True;
/// - on failure it leaves `appliedGeneration` at what it last applied and sets `Ready` to False with a
///   reason and message;
/// - the `Ready` condition's `observedGeneration` is the ProxyNode's `metadata.generation` it acted
///   on, so that a report about an older spec is not mistaken for one about the current spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// The agent has not reported on the current spec yet (or has never run).
    Pending,
    /// The agent applied the current spec and is Ready.
    Ready,
    /// The agent applied the current spec but is not Ready now, for example after a failed resync.
    NotReady { reason: String, message: String },
    /// The agent could not apply the current spec; it keeps its last working mode.
    Failed { reason: String, message: String },
}

impl ProxyNode {
    /// The agent's `Ready` condition, if it wrote one.
    pub fn ready_condition(&self) -> Option<&Condition> {
        let status = self.status.as_ref()?;
        status.conditions.iter().find(|c| c.type_ == node_condition_types::READY)
    }

    /// Whether an agent ever reported on this node: an agent that never did has no rules in the kernel.
    pub fn has_reported(&self) -> bool {
        self.status.as_ref().is_some_and(|status| {
            status.applied_generation.is_some()
                || status.active_mode.is_some()
                || !status.conditions.is_empty()
        })
    }

    /// Where the agent stands on the current spec; see [`SyncState`] for the contract behind it.
    pub fn sync_state(&self) -> SyncState {
        let Some(ready) = self.ready_condition() else { return SyncState::Pending };
        // A condition without observedGeneration is taken as current: halting on a stale failure is
        // safer than rolling on past a real one.
        let about_current_spec = match (ready.observed_generation, self.metadata.generation) {
            (Some(observed), Some(current)) => observed >= current,
            _ => true,
        };
        if !about_current_spec {
            return SyncState::Pending;
        }
        let applied_current =
            self.status.as_ref().and_then(|s| s.applied_generation) == Some(self.spec.config_generation);
        let reason = || ready.reason.clone();
        let message = || ready.message.clone();
        match (ready.status.as_str(), applied_current) {
            ("True", true) => SyncState::Ready,
            ("True", false) => SyncState::Pending,
            (_, true) => SyncState::NotReady { reason: reason(), message: message() },
            (_, false) => SyncState::Failed { reason: reason(), message: message() },
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn node(
        generation: i64,
        config_generation: i64,
        applied: Option<i64>,
        ready: Option<(&str, i64)>,
    ) -> ProxyNode {
        let mut node = ProxyNode::new("n", ProxyNodeSpec { config_generation, ..Default::default() });
        node.metadata.generation = Some(generation);
        node.status = Some(ProxyNodeStatus {
            applied_generation: applied,
            conditions: ready
                .map(|(status, observed)| Condition {
                    type_: node_condition_types::READY.into(),
                    status: status.into(),
                    reason: "R".into(),
                    message: "M".into(),
                    observed_generation: Some(observed),
                    last_transition_time: Time(Timestamp::UNIX_EPOCH),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        });
        node
    }

    #[test]
    fn sync_state_follows_the_agent_contract() {
        let failed = SyncState::Failed { reason: "R".into(), message: "M".into() };
        let not_ready = SyncState::NotReady { reason: "R".into(), message: "M".into() };
        assert_eq!(node(2, 5, None, None).sync_state(), SyncState::Pending);
        assert_eq!(node(2, 5, Some(5), Some(("True", 2))).sync_state(), SyncState::Ready);
        assert_eq!(node(3, 6, Some(5), Some(("True", 2))).sync_state(), SyncState::Pending, "stale report");
        assert_eq!(node(3, 6, Some(5), Some(("False", 2))).sync_state(), SyncState::Pending, "stale failure");
        assert_eq!(node(3, 6, Some(5), Some(("False", 3))).sync_state(), failed);
        assert_eq!(node(3, 6, Some(6), Some(("False", 3))).sync_state(), not_ready);
        assert!(!ProxyNode::new("n", ProxyNodeSpec::default()).has_reported());
        assert!(node(1, 1, None, Some(("False", 1))).has_reported());
    }
}
