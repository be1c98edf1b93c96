//! What the agent reads from its own Node object.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::{model::IpFamily, tracker};

/// The taint the cluster autoscaler puts on a node it is about to remove; kube-proxy's /healthz
/// reports such a node as not eligible so that load balancers drain it first.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// This node as the agent needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Label topology.kubernetes.io/zone.
    pub zone: Option<String>,
    /// The primary address of each family (first InternalIP, else first ExternalIP), IPv4 first.
    pub primary_ips: Vec<IpAddr>,
    /// False while the node is being deleted or drained by the autoscaler.
    pub eligible: bool,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Self {
        let addresses = node.status.as_ref().and_then(|status| status.addresses.as_ref());
        let parsed = |type_: &str| -> Vec<IpAddr> {
            addresses
                .into_iter()
                .flatten()
                .filter(|address| address.type_ == type_)
                .filter_map(|address| address.address.parse().ok())
                .collect()
        };
        let (internal, external) = (parsed("InternalIP"), parsed("ExternalIP"));
        // As kubelet's GetNodeHostIPs: per family, the first InternalIP, or else the first ExternalIP.
        let primary_ips = [IpFamily::V4, IpFamily::V6]
            .into_iter()
            .filter_map(|family| {
                let first = |ips: &[IpAddr]| ips.iter().copied().find(|ip| IpFamily::of(ip) == family);
                first(&internal).or_else(|| first(&external))
            })
            .collect();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|taint| taint.key == TAINT_TO_BE_DELETED));
        Self {
            zone: tracker::node_zone(node.metadata.labels.as_ref()),
            primary_ips,
            eligible: node.metadata.deletion_timestamp.is_none() && !tainted,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::{NodeAddress, NodeSpec, NodeStatus, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
        jiff::Timestamp,
    };

    use super::*;

    fn address(type_: &str, address: &str) -> NodeAddress {
        NodeAddress { type_: type_.into(), address: address.into() }
    }

    #[test]
    fn reads_zone_primary_ips_and_eligibility() {
        let mut node = Node {
            metadata: ObjectMeta {
                labels: Some(BTreeMap::from([(tracker::LABEL_TOPOLOGY_ZONE.into(), "zone-a".into())])),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![
                    address("Hostname", "node-a"),
                    address("ExternalIP", "203.0.113.5"),
                    address("InternalIP", "fd00::5"),
                    address("InternalIP", "192.168.1.5"),
                    address("InternalIP", "192.168.1.6"),
                ]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        let info = NodeInfo::from_node(&node);
        assert_eq!(info.zone.as_deref(), Some("zone-a"));
        let ips: Vec<String> = info.primary_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["192.168.1.5", "fd00::5"]);
        assert!(info.eligible);

        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TAINT_TO_BE_DELETED.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert!(!NodeInfo::from_node(&node).eligible);
        node.spec = None;
        node.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        assert!(!NodeInfo::from_node(&node).eligible);
    }

    #[test]
    fn external_ips_stand_in_for_a_missing_internal_one() {
        let node = Node {
            status: Some(NodeStatus {
                addresses: Some(vec![address("ExternalIP", "203.0.113.5"), address("InternalIP", "fd00::5")]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        let ips: Vec<String> =
            NodeInfo::from_node(&node).primary_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["203.0.113.5", "fd00::5"]);
    }
}
