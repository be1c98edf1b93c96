//! Rollout planning: which nodes get the newest settings now. Pure; the controller does the writing.
//!
//! The rules, in the order they are applied:
//! 1. A node whose agent has never reported (no ProxyNode yet, or one without any status) gets the
//!    newest settings at once, whatever the budget, even while the rollout is paused or halted: an
//!    agent that has never run has no rules in its kernel and no traffic to drop, and holding it back
//!    would leave the node without any Service routing at all. Such nodes do not count against
//!    `maxUnavailable` until their agent first reports.
//! 2. A node whose agent reports failure on the newest settings halts the rollout: nothing more is
//!    assigned until it recovers or the intent changes, and the verdict names it.
//! 3. `paused` holds: nothing more is assigned.
//! 4. A node that is already unavailable on older settings (assigned older settings and not Ready on
//!    them yet, failed on them, or not Ready for another reason) gets the newest settings directly:
//!    it costs no extra budget, and when the intent changes mid-rollout the nodes in flight go
//!    straight to the newest intent instead of finishing a detour through an abandoned one.
//! 5. Nodes Ready on older settings get the newest settings in name order while fewer than
//!    `maxUnavailable` nodes are unavailable. Unavailable means not Ready on the settings in their
//!    spec, for whatever reason, so a node that is down for reasons of its own also uses the budget.
//!
//! "The newest settings" means the ProxyConfig's settings, compared by value, not by generation: a
//! change to `rollout` or `nodeSelector` bumps the generation without changing what the nodes run,
//! and must not send the fleet through a rollout. Only settings are ever written, always the newest,
//! so no node is ever moved to an intermediate intent.

use fleetproxy_api::{ProxyConfig, ProxyNode, ProxyNodeSpec, SyncState};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

/// One selected node and its ProxyNode, if it has one.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    pub name: &'a str,
    pub proxy_node: Option<&'a ProxyNode>,
}

/// Where one selected node stands relative to the newest settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePhase {
    /// No agent has reported on this node yet: nothing to disrupt.
    New,
    /// Ready on the newest settings.
    Updated,
    /// Ready on older settings: next in line.
    Outdated,
    /// Assigned the newest settings; the agent has not reported on them yet.
    Applying,
    /// Applied the newest settings but not Ready now, in the agent's words.
    Unhealthy { reason: String, message: String },
    /// Could not apply the newest settings, in the agent's words. Halts the rollout.
    Failed { reason: String, message: String },
    /// On older settings and not Ready on them (still applying them, failed or unhealthy).
    Behind { state: SyncState },
}

impl NodePhase {
    /// Whether the node counts against `maxUnavailable`.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Applying | Self::Unhealthy { .. } | Self::Failed { .. } | Self::Behind { .. })
    }

    /// Whether the agent reports something wrong, as opposed to merely not being done yet.
    pub fn is_failing(&self) -> bool {
        matches!(
            self,
            Self::Unhealthy { .. }
                | Self::Failed { .. }
                | Self::Behind { state: SyncState::Failed { .. } | SyncState::NotReady { .. } }
        )
    }
}

/// What the rollout as a whole is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every selected node is Ready on the newest settings.
    Complete,
    /// Nodes are moving onto the newest settings.
    Progressing,
    /// `rollout.paused` holds the remaining nodes back.
    Paused,
    /// These nodes failed on the newest settings; nothing more is assigned until they recover.
    Halted { failed: Vec<String> },
}

/// The outcome of one planning round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutPlan {
    /// Nodes whose agent never reported, to be given the newest settings regardless of the budget.
    pub initial: Vec<String>,
    /// Nodes with traffic to protect, to be given the newest settings now, within the budget.
    pub updates: Vec<String>,
    pub verdict: Verdict,
    /// The most nodes that may be unavailable at once.
    pub budget: usize,
    /// Unavailable nodes once the assignments are made.
    pub unavailable: usize,
}

impl RolloutPlan {
    /// Every node to write the newest settings to, in the order to write them.
    pub fn assignments(&self) -> impl Iterator<Item = &str> {
        self.initial.iter().chain(&self.updates).map(String::as_str)
    }
}

/// The ProxyNode spec that carries the config's newest settings.
pub fn desired_spec(config: &ProxyConfig) -> ProxyNodeSpec {
    ProxyNodeSpec {
        settings: config.spec.settings.clone(),
        config_name: config.name_any(),
        config_generation: config.metadata.generation.unwrap_or_default(),
    }
}

/// Whether this ProxyNode's spec already carries the config's newest settings.
pub fn is_on_newest(config: &ProxyConfig, proxy_node: &ProxyNode) -> bool {
    proxy_node.spec.config_name == config.name_any() && proxy_node.spec.settings == config.spec.settings
}

/// Where a selected node stands relative to the config's newest settings.
pub fn phase(config: &ProxyConfig, node: NodeView<'_>) -> NodePhase {
    let Some(proxy_node) = node.proxy_node.filter(|pn| pn.has_reported()) else { return NodePhase::New };
    let state = proxy_node.sync_state();
    if !is_on_newest(config, proxy_node) {
        return match state {
            SyncState::Ready => NodePhase::Outdated,
            state => NodePhase::Behind { state },
        };
    }
    match state {
        SyncState::Ready => NodePhase::Updated,
        SyncState::Pending => NodePhase::Applying,
        SyncState::NotReady { reason, message } => NodePhase::Unhealthy { reason, message },
        SyncState::Failed { reason, message } => NodePhase::Failed { reason, message },
    }
}

/// `maxUnavailable` as a node count: a count, or a percentage of the selected nodes rounded down,
/// and at least one either way so that a rollout can always proceed. A value the API server should
/// have refused counts as 1, the most careful choice.
pub fn budget(max_unavailable: &IntOrString, selected: usize) -> usize {
    let count = match max_unavailable {
        IntOrString::Int(count) => usize::try_from(*count).unwrap_or(1),
        IntOrString::String(text) => text
            .strip_suffix('%')
            .and_then(|percent| percent.parse::<usize>().ok())
            .filter(|percent| *percent <= 100)
            .map_or(1, |percent| selected * percent / 100),
    };
    count.max(1)
}

/// Decides which nodes get the newest settings now. `nodes` are the config's selected nodes.
pub fn plan(config: &ProxyConfig, nodes: &[NodeView<'_>]) -> RolloutPlan {
    let mut nodes: Vec<(NodeView<'_>, NodePhase)> = nodes.iter().map(|n| (*n, phase(config, *n))).collect();
    nodes.sort_by(|(a, _), (b, _)| a.name.cmp(b.name));

    let budget = budget(&config.spec.rollout.max_unavailable, nodes.len());
    let mut unavailable = nodes.iter().filter(|(_, phase)| phase.is_unavailable()).count();
    let initial: Vec<String> = nodes
        .iter()
        .filter(|(node, phase)| {
            *phase == NodePhase::New && !node.proxy_node.is_some_and(|pn| is_on_newest(config, pn))
        })
        .map(|(node, _)| node.name.to_owned())
        .collect();
    let failed: Vec<String> = nodes
        .iter()
        .filter(|(_, phase)| matches!(phase, NodePhase::Failed { .. }))
        .map(|(node, _)| node.name.to_owned())
        .collect();
    let held = !failed.is_empty() || config.spec.rollout.paused;

    let mut updates = Vec::new();
    if !held {
        // Already unavailable: retargeting them costs nothing.
        updates.extend(
            nodes
                .iter()
                .filter(|(_, phase)| matches!(phase, NodePhase::Behind { .. }))
                .map(|(node, _)| node.name.to_owned()),
        );
        for (node, _) in nodes.iter().filter(|(_, phase)| *phase == NodePhase::Outdated) {
            if unavailable >= budget {
                break;
            }
            updates.push(node.name.to_owned());
            unavailable += 1;
        }
    }

    let verdict = if nodes.iter().all(|(_, phase)| *phase == NodePhase::Updated) {
        Verdict::Complete
    } else if !failed.is_empty() {
        Verdict::Halted { failed }
    } else if config.spec.rollout.paused {
        Verdict::Paused
    } else {
        Verdict::Progressing
    };
    RolloutPlan { initial, updates, verdict, budget, unavailable }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use fleetproxy_api::{ProxyConfigSpec, ProxyMode, ProxyNodeStatus, RolloutSpec, node_condition_types};
    use k8s_openapi::{
        apimachinery::pkg::apis::meta::v1::{Condition, Time},
        jiff::Timestamp,
    };
    use proptest::prelude::*;

    use super::*;

    pub(crate) fn config(mode: ProxyMode, generation: i64, max_unavailable: IntOrString) -> ProxyConfig {
        let mut config = ProxyConfig::new(
            "default",
            ProxyConfigSpec { rollout: RolloutSpec { max_unavailable, paused: false }, ..Default::default() },
        );
        config.spec.settings.mode = mode;
        config.metadata.generation = Some(generation);
        config
    }

    /// A ProxyNode as the operator would have written it for `config`, with no report yet.
    pub(crate) fn assigned(config: &ProxyConfig, name: &str) -> ProxyNode {
        let mut node = ProxyNode::new(name, desired_spec(config));
        node.metadata.generation = Some(1);
        node
    }

    /// What the agent writes after an attempt on the node's current spec.
    pub(crate) fn report(node: &mut ProxyNode, ready: bool) {
        let generation = node.metadata.generation;
        let spec_generation = node.spec.config_generation;
        let status = node.status.get_or_insert_with(ProxyNodeStatus::default);
        if ready {
            status.applied_generation = Some(spec_generation);
            status.active_mode = Some(node.spec.settings.mode);
            status.rule_count = Some(10);
        }
        status.conditions = vec![Condition {
            type_: node_condition_types::READY.into(),
            status: if ready { "True" } else { "False" }.into(),
            reason: if ready { "Synced" } else { "ModeUnsupported" }.into(),
            message: if ready { "rules applied" } else { "the kernel has no nf_tables" }.into(),
            observed_generation: generation,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }];
    }

    /// The operator writing the newest settings, as the API server records it.
    pub(crate) fn write_newest(config: &ProxyConfig, node: &mut ProxyNode) {
        node.spec = desired_spec(config);
        node.metadata.generation = Some(node.metadata.generation.unwrap_or_default() + 1);
    }

    pub(crate) fn ready_on(config: &ProxyConfig, name: &str) -> ProxyNode {
        let mut node = assigned(config, name);
        report(&mut node, true);
        node
    }

    fn views(nodes: &BTreeMap<String, Option<ProxyNode>>) -> Vec<NodeView<'_>> {
        nodes.iter().map(|(name, pn)| NodeView { name, proxy_node: pn.as_ref() }).collect()
    }

    fn fleet(config: &ProxyConfig, names: &[&str]) -> BTreeMap<String, Option<ProxyNode>> {
        names.iter().map(|name| ((*name).to_owned(), Some(ready_on(config, name)))).collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn budget_is_a_count_or_a_rounded_down_percentage_and_at_least_one() {
        assert_eq!(budget(&IntOrString::Int(3), 10), 3);
        assert_eq!(budget(&IntOrString::Int(0), 10), 1);
        assert_eq!(budget(&IntOrString::Int(-2), 10), 1);
        assert_eq!(budget(&IntOrString::String("25%".into()), 10), 2);
        assert_eq!(budget(&IntOrString::String("10%".into()), 5), 1);
        assert_eq!(budget(&IntOrString::String("100%".into()), 7), 7);
        assert_eq!(budget(&IntOrString::String("10%".into()), 5000), 500);
        assert_eq!(budget(&IntOrString::String("abc".into()), 100), 1);
        assert_eq!(budget(&IntOrString::String("150%".into()), 100), 1);
        assert_eq!(budget(&IntOrString::String("5".into()), 100), 1);
    }

    #[test]
    fn a_settled_fleet_is_complete_and_gets_nothing() {
        let config = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let nodes = fleet(&config, &["a", "b", "c"]);
        let plan = plan(&config, &views(&nodes));
        assert_eq!(plan.verdict, Verdict::Complete);
        assert_eq!(plan.assignments().count(), 0);
    }

    #[test]
    fn new_nodes_get_the_newest_settings_at_once() {
        let config = config(ProxyMode::Nftables, 1, IntOrString::Int(1));
        let nodes: BTreeMap<String, Option<ProxyNode>> =
            [("a".to_owned(), None), ("b".to_owned(), None), ("c".to_owned(), None)].into();
        let plan = plan(&config, &views(&nodes));
        assert_eq!(plan.initial, names(&["a", "b", "c"]));
        assert!(plan.updates.is_empty());
        assert_eq!(plan.unavailable, 0);
        assert_eq!(plan.verdict, Verdict::Progressing);
    }

    #[test]
    fn new_nodes_already_assigned_are_not_written_again() {
        let config = config(ProxyMode::Nftables, 1, IntOrString::Int(1));
        let nodes: BTreeMap<String, Option<ProxyNode>> =
            [("a".to_owned(), Some(assigned(&config, "a")))].into();
        let plan = plan(&config, &views(&nodes));
        assert!(plan.initial.is_empty());
        assert_eq!(plan.verdict, Verdict::Progressing);
    }

    #[test]
    fn new_nodes_are_served_even_while_paused_or_halted() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let mut new = config(ProxyMode::Nftables, 2, IntOrString::Int(1));
        new.spec.rollout.paused = true;
        let mut nodes = fleet(&old, &["a", "b"]);
        nodes.insert("z".into(), None);
        let paused = plan(&new, &views(&nodes));
        assert_eq!(
            (paused.initial, paused.updates, paused.verdict),
            (names(&["z"]), vec![], Verdict::Paused)
        );
    }

    #[test]
    fn a_mode_change_moves_one_node_at_a_time() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let new = config(ProxyMode::Nftables, 2, IntOrString::Int(1));
        let mut nodes = fleet(&old, &["c", "a", "b"]);

        let first = plan(&new, &views(&nodes));
        assert_eq!(first.updates, names(&["a"]));
        assert_eq!(first.verdict, Verdict::Progressing);
        let a = nodes.get_mut("a").and_then(Option::as_mut).expect("a");
        write_newest(&new, a);

        let waiting = plan(&new, &views(&nodes));
        assert!(waiting.updates.is_empty(), "a is still in flight");
        assert_eq!(waiting.unavailable, 1);

        let a = nodes.get_mut("a").and_then(Option::as_mut).expect("a");
        report(a, true);
        let second = plan(&new, &views(&nodes));
        assert_eq!(second.updates, names(&["b"]));
    }

    #[test]
    fn a_percentage_budget_moves_several_nodes() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let new = config(ProxyMode::Ipvs, 2, IntOrString::String("50%".into()));
        let nodes = fleet(&old, &["a", "b", "c", "d", "e"]);
        assert_eq!(plan(&new, &views(&nodes)).updates, names(&["a", "b"]));
    }

    #[test]
    fn a_node_down_for_its_own_reasons_uses_the_budget() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let new = config(ProxyMode::Nftables, 2, IntOrString::Int(2));
        let mut nodes = fleet(&new, &["a"]);
        nodes.extend(fleet(&old, &["b", "c", "d"]));
        // a runs the newest settings, then a resync fails: not Ready, but applied.
        let a = nodes.get_mut("a").and_then(Option::as_mut).expect("a");
        let status = a.status.as_mut().expect("status");
        status.conditions[0].status = "False".into();
        assert!(matches!(
            phase(&new, NodeView { name: "a", proxy_node: Some(a) }),
            NodePhase::Unhealthy { .. }
        ));
        let plan = plan(&new, &views(&nodes));
        assert_eq!(plan.updates, names(&["b"]), "a uses one of the two slots");
        assert_eq!(plan.verdict, Verdict::Progressing, "unhealthy is not an apply failure");
    }

    #[test]
    fn a_failure_on_the_newest_settings_halts_and_is_named() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let new = config(ProxyMode::Nftables, 2, IntOrString::Int(3));
        let mut nodes = fleet(&old, &["a", "b", "c", "d"]);
        let a = nodes.get_mut("a").and_then(Option::as_mut).expect("a");
        write_newest(&new, a);
        report(a, false);
        let plan = plan(&new, &views(&nodes));
        assert!(plan.updates.is_empty());
        assert_eq!(plan.verdict, Verdict::Halted { failed: names(&["a"]) });
        assert!(matches!(
            phase(&new, NodeView { name: "a", proxy_node: nodes["a"].as_ref() }),
            NodePhase::Failed { ref reason, .. } if reason == "ModeUnsupported"
        ));
    }

    #[test]
    fn a_halted_rollout_resumes_when_the_node_recovers() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let new = config(ProxyMode::Nftables, 2, IntOrString::Int(1));
        let mut nodes = fleet(&old, &["a", "b"]);
        let a = nodes.get_mut("a").and_then(Option::as_mut).expect("a");
        write_newest(&new, a);
        report(a, false);
        assert!(matches!(plan(&new, &views(&nodes)).verdict, Verdict::Halted { .. }));
        let a = nodes.get_mut("a").and_then(Option::as_mut).expect("a");
        report(a, true);
        assert_eq!(plan(&new, &views(&nodes)).updates, names(&["b"]));
    }

    #[test]
    fn reverting_the_intent_unblocks_a_halted_rollout_without_a_detour() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let new = config(ProxyMode::Nftables, 2, IntOrString::Int(1));
        let mut nodes = fleet(&old, &["a", "b", "c"]);
        let a = nodes.get_mut("a").and_then(Option::as_mut).expect("a");
        write_newest(&new, a);
        report(a, false);
        // The user reverts to iptables: generation 3 has generation 1's settings.
        let reverted = config(ProxyMode::Iptables, 3, IntOrString::Int(1));
        let plan = plan(&reverted, &views(&nodes));
        assert_eq!(plan.updates, names(&["a"]), "only the failed node moves; b and c never leave iptables");
        assert_eq!(plan.verdict, Verdict::Progressing);
    }

    #[test]
    fn a_second_mode_change_sends_nodes_in_flight_straight_to_the_newest() {
        let first = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let second = config(ProxyMode::Nftables, 2, IntOrString::Int(1));
        let third = config(ProxyMode::Ipvs, 3, IntOrString::Int(1));
        let mut nodes = fleet(&first, &["a", "b", "c"]);
        let a = nodes.get_mut("a").and_then(Option::as_mut).expect("a");
        write_newest(&second, a);
        let plan = plan(&third, &views(&nodes));
        assert_eq!(plan.updates, names(&["a"]), "a is retargeted; b and c wait for a");
        assert_eq!(plan.unavailable, 1);
    }

    #[test]
    fn paused_holds_and_reports_paused() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let mut new = config(ProxyMode::Nftables, 2, IntOrString::Int(1));
        new.spec.rollout.paused = true;
        let nodes = fleet(&old, &["a", "b"]);
        let plan = plan(&new, &views(&nodes));
        assert!(plan.updates.is_empty());
        assert_eq!(plan.verdict, Verdict::Paused);
    }

    #[test]
    fn a_complete_rollout_stays_complete_while_paused() {
        let mut config = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let nodes = fleet(&config, &["a"]);
        config.spec.rollout.paused = true;
        config.metadata.generation = Some(2);
        assert_eq!(plan(&config, &views(&nodes)).verdict, Verdict::Complete);
    }

    #[test]
    fn a_generation_bump_without_a_settings_change_moves_nobody() {
        let old = config(ProxyMode::Nftables, 1, IntOrString::Int(1));
        let mut bumped = config(ProxyMode::Nftables, 7, IntOrString::Int(5));
        bumped.spec.node_selector.insert("pool".into(), "edge".into());
        let nodes = fleet(&old, &["a", "b"]);
        let plan = plan(&bumped, &views(&nodes));
        assert_eq!(plan.verdict, Verdict::Complete);
        assert_eq!(plan.assignments().count(), 0);
    }

    #[test]
    fn a_node_taken_over_from_another_config_waits_for_its_turn() {
        let mut other = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        other.metadata.name = Some("other".into());
        let ours = config(ProxyMode::Iptables, 4, IntOrString::Int(1));
        let mut nodes = fleet(&other, &["a", "b"]);
        nodes.extend(fleet(&ours, &["c"]));
        let c = nodes.get_mut("c").and_then(Option::as_mut).expect("c");
        write_newest(&ours, c);
        let plan = plan(&ours, &views(&nodes));
        assert!(plan.updates.is_empty(), "c is in flight, so a and b wait");
        assert!(matches!(
            phase(&ours, NodeView { name: "a", proxy_node: nodes["a"].as_ref() }),
            NodePhase::Outdated
        ));
    }

    #[test]
    fn no_nodes_is_complete() {
        let config = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        assert_eq!(plan(&config, &[]).verdict, Verdict::Complete);
    }

    // ---- property tests: a simulated fleet whose agents succeed after random delays ----

    /// One simulated node: its ProxyNode, and how many ticks its agent takes to apply a new spec.
    struct SimNode {
        proxy_node: Option<ProxyNode>,
        remaining: u32,
        delay: u32,
    }

    struct Sim {
        nodes: BTreeMap<String, SimNode>,
    }

    impl Sim {
        fn new(start: &ProxyConfig, delays: &[u32], fresh: &[bool]) -> Self {
            let nodes = delays
                .iter()
                .zip(fresh)
                .enumerate()
                .map(|(i, (delay, fresh))| {
                    let name = format!("node-{i:03}");
                    let proxy_node = (!fresh).then(|| ready_on(start, &name));
                    (name, SimNode { proxy_node, remaining: 0, delay: *delay })
                })
                .collect();
            Self { nodes }
        }

        fn plan(&self, config: &ProxyConfig) -> RolloutPlan {
            let views: Vec<NodeView<'_>> = self
                .nodes
                .iter()
                .map(|(name, node)| NodeView { name, proxy_node: node.proxy_node.as_ref() })
                .collect();
            plan(config, &views)
        }

        /// Writes what the plan says; returns the plan.
        fn step(&mut self, config: &ProxyConfig) -> RolloutPlan {
            let plan = self.plan(config);
            for name in plan.assignments() {
                let node = self.nodes.get_mut(name).expect("planned node exists");
                match node.proxy_node.as_mut() {
                    Some(pn) => write_newest(config, pn),
                    None => node.proxy_node = Some(assigned(config, name)),
                }
                node.remaining = node.delay;
            }
            plan
        }

        /// One tick of the agents: those whose delay has run out report success.
        fn tick(&mut self) {
            for node in self.nodes.values_mut() {
                let Some(pn) = node.proxy_node.as_mut() else { continue };
                if pn.sync_state() != SyncState::Pending {
                    continue;
                }
                if node.remaining == 0 {
                    report(pn, true);
                } else {
                    node.remaining -= 1;
                }
            }
        }

        /// Unavailable nodes with traffic to protect (agents that have reported before).
        fn unavailable(&self, config: &ProxyConfig) -> usize {
            self.nodes
                .iter()
                .filter(|(name, node)| {
                    phase(config, NodeView { name, proxy_node: node.proxy_node.as_ref() }).is_unavailable()
                })
                .count()
        }
    }

    fn mode_strategy() -> impl Strategy<Value = ProxyMode> {
        prop::sample::select(ProxyMode::ALL.to_vec())
    }

    fn max_unavailable_strategy() -> impl Strategy<Value = IntOrString> {
        prop_oneof![
            (1i32..5).prop_map(IntOrString::Int),
            (1u32..=100).prop_map(|p| IntOrString::String(format!("{p}%")))
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Agents succeed after random delays, the intent changes at random moments: the budget is
        /// never exceeded, every write carries the then-newest settings, and the fleet converges on
        /// the last intent.
        #[test]
        fn budget_holds_and_the_rollout_completes(
            delays in prop::collection::vec(0u32..4, 1..20),
            fresh_seed in prop::collection::vec(prop::bool::weighted(0.15), 20),
            max_unavailable in max_unavailable_strategy(),
            intents in prop::collection::vec((mode_strategy(), 0u32..6), 1..4),
        ) {
            let fresh = &fresh_seed[..delays.len()];
            let mut config = config(ProxyMode::Iptables, 1, max_unavailable);
            let mut sim = Sim::new(&config, &delays, fresh);
            let budget = budget(&config.spec.rollout.max_unavailable, delays.len());
            let mut ticks = 0u32;
            for (mode, ticks_before_next) in &intents {
                config.spec.settings.mode = *mode;
                config.metadata.generation = config.metadata.generation.map(|g| g + 1);
                for _ in 0..*ticks_before_next {
                    sim.step(&config);
                    prop_assert!(sim.unavailable(&config) <= budget);
                    sim.tick();
                    ticks += 1;
                }
            }
            let bound = 10 * (delays.len() as u32 + 1) * 5;
            while sim.plan(&config).verdict != Verdict::Complete {
                let plan = sim.step(&config);
                prop_assert_eq!(plan.verdict, Verdict::Progressing);
                prop_assert!(sim.unavailable(&config) <= budget, "{} > {}", sim.unavailable(&config), budget);
                sim.tick();
                ticks += 1;
                prop_assert!(ticks < bound, "no convergence after {} ticks", ticks);
            }
            for node in sim.nodes.values() {
                let pn = node.proxy_node.as_ref().expect("every node has a ProxyNode at the end");
                prop_assert_eq!(&pn.spec.settings, &config.spec.settings);
                prop_assert_eq!(pn.status.as_ref().and_then(|s| s.active_mode), Some(config.spec.settings.mode));
            }
        }

        /// While paused, or while a node has failed on the newest settings, no node with traffic is
        /// assigned anything, and the failing node is named.
        #[test]
        fn nothing_is_assigned_while_paused_or_halted(
            delays in prop::collection::vec(0u32..3, 2..15),
            max_unavailable in max_unavailable_strategy(),
            progress_ticks in 0u32..6,
            pause in any::<bool>(),
            hold_ticks in 1u32..6,
        ) {
            let fresh = vec![false; delays.len()];
            let mut config = config(ProxyMode::Iptables, 1, max_unavailable);
            let mut sim = Sim::new(&config, &delays, &fresh);
            config.spec.settings.mode = ProxyMode::Nftables;
            config.metadata.generation = Some(2);
            for _ in 0..progress_ticks {
                sim.step(&config);
                sim.tick();
            }
            if pause {
                config.spec.rollout.paused = true;
            } else {
                // The intent changes again and the first node given it fails on it.
                config.spec.settings.mode = ProxyMode::Ipvs;
                config.metadata.generation = Some(3);
                let first = sim.nodes.values_mut().next().and_then(|n| n.proxy_node.as_mut()).expect("a node");
                write_newest(&config, first);
                report(first, false);
            }
            for _ in 0..hold_ticks {
                let plan = sim.step(&config);
                prop_assert!(plan.updates.is_empty(), "assigned {:?}", plan.updates);
                match plan.verdict {
                    Verdict::Complete => prop_assert!(pause),
                    Verdict::Paused => prop_assert!(pause),
                    Verdict::Halted { failed } => {
                        prop_assert!(!pause);
                        prop_assert_eq!(failed, vec!["node-000".to_owned()]);
                    }
                    Verdict::Progressing => prop_assert!(false, "neither paused nor halted"),
                }
                sim.tick();
            }
        }
    }
}
