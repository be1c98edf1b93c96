//! Which ProxyConfig governs which node.
//!
//! A config's `nodeSelector` is a set of labels a node must carry (`matchLabels`); an empty selector
//! selects every node. A node selected by two or more configs is governed by none of them: the
//! operator leaves its ProxyNode as it is rather than let the configs fight over it, and each config
//! involved names the node in its Conflict condition until the selectors are fixed.

use std::collections::{BTreeMap, BTreeSet};

use fleetproxy_api::ProxyConfig;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

/// A node that more than one config selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub node: String,
    /// Every config that selects the node, sorted by name.
    pub configs: Vec<String>,
}

/// The outcome of matching every live config against every node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Config name to the nodes it alone selects.
    governed: BTreeMap<String, BTreeSet<String>>,
    /// Node name to the configs that all select it, for nodes selected more than once.
    contested: BTreeMap<String, BTreeSet<String>>,
}

/// Whether a node with these labels is selected by this selector.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

/// Whether the config claims nodes at all: a config being deleted gives its nodes up, so that
/// another config selecting them can take over once the deletion is done.
pub fn is_live(config: &ProxyConfig) -> bool {
    config.metadata.deletion_timestamp.is_none()
}

/// Matches every live config against every node, given by its metadata (name and labels are all
/// that matter, so the controller can cache node metadata instead of whole Nodes).
pub fn select<'a>(
    configs: impl IntoIterator<Item = &'a ProxyConfig>,
    nodes: impl IntoIterator<Item = &'a ObjectMeta>,
) -> Selection {
    let configs: Vec<&ProxyConfig> = configs.into_iter().filter(|c| is_live(c)).collect();
    let no_labels = BTreeMap::new();
    let mut selection = Selection::default();
    for config in &configs {
        selection.governed.entry(config.name_any()).or_default();
    }
    for node in nodes {
        let labels = node.labels.as_ref().unwrap_or(&no_labels);
        let claimants: BTreeSet<String> = configs
            .iter()
            .filter(|config| selects(&config.spec.node_selector, labels))
            .map(|config| config.name_any())
            .collect();
        let mut claimants_iter = claimants.iter();
        match (claimants_iter.next(), claimants_iter.next()) {
            (None, _) => {}
            (Some(only), None) => {
                selection.governed.entry(only.clone()).or_default().insert(node_name(node));
            }
            (Some(_), Some(_)) => {
                selection.contested.insert(node_name(node), claimants);
            }
        }
    }
    selection
}

fn node_name(node: &ObjectMeta) -> String {
    node.name.clone().unwrap_or_default()
}

impl Selection {
    /// The nodes this config alone selects, sorted by name.
    pub fn nodes_of(&self, config: &str) -> impl Iterator<Item = &str> {
        self.governed.get(config).into_iter().flatten().map(String::as_str)
    }

    /// The config that governs this node, if exactly one selects it.
    pub fn governor_of(&self, node: &str) -> Option<&str> {
        self.governed.iter().find(|(_, nodes)| nodes.contains(node)).map(|(config, _)| config.as_str())
    }

    /// Whether any live config selects this node, alone or in a conflict.
    pub fn is_claimed(&self, node: &str) -> bool {
        self.contested.contains_key(node) || self.governor_of(node).is_some()
    }

    /// The nodes this config selects together with other configs, sorted by node name.
    pub fn conflicts_of(&self, config: &str) -> Vec<Conflict> {
        self.contested
            .iter()
            .filter(|(_, configs)| configs.contains(config))
            .map(|(node, configs)| Conflict {
                node: node.clone(),
                configs: configs.iter().cloned().collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use fleetproxy_api::ProxyConfigSpec;
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn config(name: &str, selector: &[(&str, &str)]) -> ProxyConfig {
        ProxyConfig::new(name, ProxyConfigSpec { node_selector: labels(selector), ..Default::default() })
    }

    fn node(name: &str, node_labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta { name: Some(name.to_owned()), labels: Some(labels(node_labels)), ..Default::default() }
    }

    fn governed<'a>(selection: &'a Selection, config: &str) -> Vec<&'a str> {
        selection.nodes_of(config).collect()
    }

    #[test]
    fn empty_selector_selects_every_node() {
        let nodes = [node("a", &[]), node("b", &[("zone", "x")])];
        let selection = select(&[config("default", &[])], &nodes);
        assert_eq!(governed(&selection, "default"), ["a", "b"]);
        assert!(selection.conflicts_of("default").is_empty());
    }

    #[test]
    fn selector_is_match_labels() {
        let nodes = [
            node("a", &[("pool", "edge"), ("zone", "x")]),
            node("b", &[("pool", "edge")]),
            node("c", &[("pool", "core"), ("zone", "x")]),
        ];
        let selection = select(&[config("edge-x", &[("pool", "edge"), ("zone", "x")])], &nodes);
        assert_eq!(governed(&selection, "edge-x"), ["a"]);
        assert_eq!(selection.governor_of("a"), Some("edge-x"));
        assert_eq!(selection.governor_of("b"), None);
    }

    #[test]
    fn disjoint_configs_split_the_nodes() {
        let nodes = [node("a", &[("pool", "edge")]), node("b", &[("pool", "core")]), node("c", &[])];
        let configs = [config("edge", &[("pool", "edge")]), config("core", &[("pool", "core")])];
        let selection = select(&configs, &nodes);
        assert_eq!(governed(&selection, "edge"), ["a"]);
        assert_eq!(governed(&selection, "core"), ["b"]);
        assert_eq!(selection.governor_of("c"), None);
    }

    #[test]
    fn overlapping_configs_give_the_node_to_none_and_both_name_it() {
        let nodes = [node("a", &[("pool", "edge")]), node("b", &[])];
        let configs = [config("default", &[]), config("edge", &[("pool", "edge")])];
        let selection = select(&configs, &nodes);
        assert_eq!(governed(&selection, "default"), ["b"]);
        assert!(governed(&selection, "edge").is_empty());
        assert_eq!(selection.governor_of("a"), None);
        let expected = vec![Conflict { node: "a".into(), configs: vec!["default".into(), "edge".into()] }];
        assert_eq!(selection.conflicts_of("default"), expected);
        assert_eq!(selection.conflicts_of("edge"), expected);
    }

    #[test]
    fn a_config_being_deleted_claims_nothing() {
        let mut leaving = config("old", &[]);
        leaving.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        let selection = select(&[leaving, config("new", &[])], &[node("a", &[])]);
        assert_eq!(governed(&selection, "new"), ["a"]);
        assert!(selection.conflicts_of("new").is_empty());
        assert!(governed(&selection, "old").is_empty());
    }

    #[test]
    fn a_config_selecting_nothing_is_still_known() {
        let selection = select(&[config("none", &[("pool", "gpu")])], &[node("a", &[])]);
        assert!(governed(&selection, "none").is_empty());
        assert!(selection.governed.contains_key("none"));
    }
}
