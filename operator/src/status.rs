//! Status aggregation: from the selected nodes and their ProxyNodes to the ProxyConfig's status.
//! Pure; the controller writes the result only when it differs from the current status.
//!
//! Size: the counts in `summary` cover every node, but `nodes` lists at most [`MAX_LISTED_NODES`]
//! entries, failing nodes first, then lagging ones, then the rest by name, so a 5,000-node cluster's
//! ProxyConfig stays a few tens of KiB, far below the API server's 1.5 MiB object limit, and the
//! nodes that need attention are always the ones shown.

use std::collections::BTreeMap;

use fleetproxy_api::{NodeEntry, ProxyConfig, ProxyConfigStatus, Summary, SyncState, condition_types};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{
    rollout::{NodePhase, NodeView, RolloutPlan, Verdict, phase},
    selection::Conflict,
};

/// The most node entries written into a ProxyConfig's status.
pub const MAX_LISTED_NODES: usize = 100;
/// The most node names spelled out in one condition message.
const MAX_NAMED_IN_MESSAGE: usize = 10;

/// Reasons of the ProxyConfig conditions.
pub mod reasons {
    pub const ALL_NODES_READY: &str = "AllNodesReady";
    pub const NO_NODES_SELECTED: &str = "NoNodesSelected";
    pub const NODES_NOT_READY: &str = "NodesNotReady";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    pub const ROLLOUT_PAUSED: &str = "RolloutPaused";
    pub const ROLLOUT_HALTED: &str = "RolloutHalted";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const NODES_UNHEALTHY: &str = "NodesUnhealthy";
    pub const NO_FAILURES: &str = "NoFailures";
    pub const OVERLAPPING_SELECTORS: &str = "OverlappingSelectors";
    pub const NO_CONFLICT: &str = "NoConflict";
}

/// How a node sorts in the listing: failing first, then lagging, then settled.
fn urgency(phase: &NodePhase) -> u8 {
    match phase {
        _ if phase.is_failing() => 0,
        NodePhase::Updated => 2,
        _ => 1,
    }
}

fn entry(view: NodeView<'_>, phase: &NodePhase) -> NodeEntry {
    let status = view.proxy_node.and_then(|pn| pn.status.as_ref());
    let message = match phase {
        NodePhase::Updated => None,
        NodePhase::New => Some("waiting for the agent's first report".to_owned()),
        NodePhase::Outdated => Some("waiting for its turn in the rollout".to_owned()),
        NodePhase::Applying => Some("applying the newest settings".to_owned()),
        NodePhase::Unhealthy { reason, message } | NodePhase::Failed { reason, message } => {
            Some(format!("{reason}: {message}"))
        }
        NodePhase::Behind { state: SyncState::Failed { reason, message } }
        | NodePhase::Behind { state: SyncState::NotReady { reason, message } } => {
            Some(format!("{reason}: {message}"))
        }
        NodePhase::Behind { .. } => Some("not ready on older settings".to_owned()),
    };
    NodeEntry {
        name: view.name.to_owned(),
        active_mode: status.and_then(|s| s.active_mode),
        rule_count: status.and_then(|s| s.rule_count),
        last_sync: status.and_then(|s| s.last_sync.clone()),
        updated: matches!(phase, NodePhase::Updated | NodePhase::Unhealthy { .. }),
        ready: view.proxy_node.is_some_and(|pn| pn.sync_state() == SyncState::Ready),
        message,
    }
}

/// `a, b and 3 more`.
fn name_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    let shown = names.iter().take(MAX_NAMED_IN_MESSAGE).copied().collect::<Vec<_>>().join(", ");
    match names.len().saturating_sub(MAX_NAMED_IN_MESSAGE) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// A condition, keeping the current one's lastTransitionTime when its status has not changed.
fn condition(
    current: &[Condition],
    type_: &str,
    is_true: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if is_true { "True" } else { "False" };
    let last_transition_time = current
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The ProxyConfig status for this round: `nodes` are the selected nodes, `plan` the round's
/// rollout plan, `conflicts` the nodes this config shares with others, `now` the time stamped on
/// conditions whose status changes.
pub fn aggregate(
    config: &ProxyConfig,
    nodes: &[NodeView<'_>],
    plan: &RolloutPlan,
    conflicts: &[Conflict],
    now: Time,
) -> ProxyConfigStatus {
    let generation = config.metadata.generation;
    let current: &[Condition] = config.status.as_ref().map_or(&[], |s| s.conditions.as_slice());

    let mut phased: Vec<(NodeView<'_>, NodePhase)> = nodes.iter().map(|n| (*n, phase(config, *n))).collect();
    phased.sort_by(|(a, pa), (b, pb)| urgency(pa).cmp(&urgency(pb)).then_with(|| a.name.cmp(b.name)));
    let entries: Vec<NodeEntry> = phased.iter().map(|(view, phase)| entry(*view, phase)).collect();

    let mut by_mode = BTreeMap::new();
    for mode in entries.iter().filter_map(|e| e.active_mode) {
        *by_mode.entry(mode.to_string()).or_insert(0u32) += 1;
    }
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let failing: Vec<&(NodeView<'_>, NodePhase)> = phased.iter().filter(|(_, p)| p.is_failing()).collect();
    let summary = Summary {
        nodes: count(entries.len()),
        updated: count(entries.iter().filter(|e| e.updated).count()),
        ready: count(entries.iter().filter(|e| e.ready).count()),
        failed: count(failing.len()),
        by_mode,
        listed: count(entries.len().min(MAX_LISTED_NODES)),
    };

    let all_ready = plan.verdict == Verdict::Complete;
    let (ready_reason, ready_message) = if nodes.is_empty() {
        (reasons::NO_NODES_SELECTED, "no node is governed by this config".to_owned())
    } else if all_ready {
        (reasons::ALL_NODES_READY, format!("all {} nodes are ready on the newest settings", summary.nodes))
    } else {
        let on_newest = phased.iter().filter(|(_, p)| *p == NodePhase::Updated).count();
        (
            reasons::NODES_NOT_READY,
            format!("{on_newest} of {} nodes are ready on the newest settings", summary.nodes),
        )
    };

    let (progressing, progress_reason, progress_message) = match &plan.verdict {
        Verdict::Complete => {
            (false, reasons::ROLLOUT_COMPLETE, "every node runs the newest settings".to_owned())
        }
        Verdict::Progressing => (
            true,
            reasons::ROLLING_OUT,
            format!(
                "{} of {} nodes updated; {} unavailable of at most {}",
                summary.updated, summary.nodes, plan.unavailable, plan.budget
            ),
        ),
        Verdict::Paused => (
            false,
            reasons::ROLLOUT_PAUSED,
            format!("paused with {} of {} nodes updated", summary.updated, summary.nodes),
        ),
        Verdict::Halted { failed } => (
            false,
            reasons::ROLLOUT_HALTED,
            format!("halted: {} failed on the newest settings", name_list(failed.iter().map(String::as_str))),
        ),
    };

    let (degraded_reason, degraded_message) = if failing.is_empty() {
        (reasons::NO_FAILURES, "no node reports a failure".to_owned())
    } else {
        let reason = if failing.iter().any(|(_, p)| matches!(p, NodePhase::Failed { .. })) {
            reasons::APPLY_FAILED
        } else {
            reasons::NODES_UNHEALTHY
        };
        let described = failing.iter().take(MAX_NAMED_IN_MESSAGE).map(|(view, phase)| {
            let why = entry(*view, phase).message.unwrap_or_default();
            format!("{}: {why}", view.name)
        });
        let mut message = described.collect::<Vec<_>>().join("; ");
        if failing.len() > MAX_NAMED_IN_MESSAGE {
            message.push_str(&format!("; and {} more", failing.len() - MAX_NAMED_IN_MESSAGE));
        }
        (reason, message)
    };

    let (conflict_reason, conflict_message) = if conflicts.is_empty() {
        (reasons::NO_CONFLICT, "no node is selected by another config".to_owned())
    } else {
        let described = conflicts
            .iter()
            .take(MAX_NAMED_IN_MESSAGE)
            .map(|conflict| format!("{} (selected by {})", conflict.node, conflict.configs.join(", ")));
        let mut message = format!(
            "left to no config until the selectors are fixed: {}",
            described.collect::<Vec<_>>().join("; ")
        );
        if conflicts.len() > MAX_NAMED_IN_MESSAGE {
            message.push_str(&format!("; and {} more", conflicts.len() - MAX_NAMED_IN_MESSAGE));
        }
        (reasons::OVERLAPPING_SELECTORS, message)
    };

    let conditions = vec![
        condition(current, condition_types::READY, all_ready, ready_reason, ready_message, generation, &now),
        condition(
            current,
            condition_types::PROGRESSING,
            progressing,
            progress_reason,
            progress_message,
            generation,
            &now,
        ),
        condition(
            current,
            condition_types::DEGRADED,
            !failing.is_empty(),
            degraded_reason,
            degraded_message,
            generation,
            &now,
        ),
        condition(
            current,
            condition_types::CONFLICT,
            !conflicts.is_empty(),
            conflict_reason,
            conflict_message,
            generation,
            &now,
        ),
    ];

    ProxyConfigStatus {
        observed_generation: generation,
        conditions,
        summary,
        nodes: entries.into_iter().take(MAX_LISTED_NODES).collect(),
    }
}

/// Whether the status needs writing: only when it differs from what the object carries.
pub fn needs_write(config: &ProxyConfig, status: &ProxyConfigStatus) -> bool {
    config.status.as_ref() != Some(status)
}

#[cfg(test)]
mod tests {
    use fleetproxy_api::{ProxyMode, ProxyNode};
    use k8s_openapi::{apimachinery::pkg::util::intstr::IntOrString, jiff::Timestamp};

    use super::*;
    use crate::rollout::{
        plan,
        tests::{assigned, config, ready_on, report, write_newest},
    };

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    fn views(nodes: &[(String, Option<ProxyNode>)]) -> Vec<NodeView<'_>> {
        nodes.iter().map(|(name, pn)| NodeView { name, proxy_node: pn.as_ref() }).collect()
    }

    fn status_of(
        config: &ProxyConfig,
        nodes: &[(String, Option<ProxyNode>)],
        now: Time,
    ) -> ProxyConfigStatus {
        let views = views(nodes);
        aggregate(config, &views, &plan(config, &views), &[], now)
    }

    fn find<'a>(status: &'a ProxyConfigStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).expect("condition present")
    }

    /// Three nodes mid-switch from iptables to nftables: a done, b failed, c waiting.
    fn mid_switch() -> (ProxyConfig, Vec<(String, Option<ProxyNode>)>) {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let new = config(ProxyMode::Nftables, 2, IntOrString::Int(1));
        let mut a = ready_on(&old, "a");
        write_newest(&new, &mut a);
        report(&mut a, true);
        let mut b = ready_on(&old, "b");
        write_newest(&new, &mut b);
        report(&mut b, false);
        let c = ready_on(&old, "c");
        (new, vec![("a".into(), Some(a)), ("b".into(), Some(b)), ("c".into(), Some(c))])
    }

    #[test]
    fn a_settled_fleet_is_ready_and_not_progressing() {
        let config = config(ProxyMode::Nftables, 3, IntOrString::Int(1));
        let nodes = vec![
            ("a".to_owned(), Some(ready_on(&config, "a"))),
            ("b".to_owned(), Some(ready_on(&config, "b"))),
        ];
        let status = status_of(&config, &nodes, at(100));
        assert_eq!(status.observed_generation, Some(3));
        let ready = find(&status, condition_types::READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", reasons::ALL_NODES_READY));
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(find(&status, condition_types::PROGRESSING).status, "False");
        assert_eq!(find(&status, condition_types::DEGRADED).status, "False");
        assert_eq!(find(&status, condition_types::CONFLICT).status, "False");
        assert_eq!(
            status.summary,
            Summary {
                nodes: 2,
                updated: 2,
                ready: 2,
                failed: 0,
                by_mode: [("nftables".into(), 2)].into(),
                listed: 2
            }
        );
        let a = &status.nodes[0];
        assert_eq!(
            (a.name.as_str(), a.active_mode, a.rule_count, a.updated, a.ready),
            ("a", Some(ProxyMode::Nftables), Some(10), true, true)
        );
        assert_eq!(a.message, None);
    }

    #[test]
    fn a_failed_node_is_named_listed_first_and_degrades_the_config() {
        let (config, nodes) = mid_switch();
        let status = status_of(&config, &nodes, at(100));
        let degraded = find(&status, condition_types::DEGRADED);
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", reasons::APPLY_FAILED));
        assert!(
            degraded.message.contains("b: ModeUnsupported: the kernel has no nf_tables"),
            "{}",
            degraded.message
        );
        let progressing = find(&status, condition_types::PROGRESSING);
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("False", reasons::ROLLOUT_HALTED)
        );
        assert!(progressing.message.contains('b'));
        assert_eq!(find(&status, condition_types::READY).status, "False");
        let order: Vec<&str> = status.nodes.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(order, ["b", "c", "a"], "failing, then lagging, then settled");
        assert_eq!(status.nodes[0].active_mode, Some(ProxyMode::Iptables), "b keeps its working mode");
        assert_eq!(
            status.summary,
            Summary {
                nodes: 3,
                updated: 1,
                ready: 2,
                failed: 1,
                by_mode: [("iptables".into(), 2), ("nftables".into(), 1)].into(),
                listed: 3,
            }
        );
    }

    #[test]
    fn progressing_says_how_far_the_rollout_is() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let new = config(ProxyMode::Nftables, 2, IntOrString::Int(1));
        let mut a = ready_on(&old, "a");
        write_newest(&new, &mut a);
        let nodes = vec![("a".to_owned(), Some(a)), ("b".to_owned(), Some(ready_on(&old, "b")))];
        let status = status_of(&new, &nodes, at(5));
        let progressing = find(&status, condition_types::PROGRESSING);
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", reasons::ROLLING_OUT)
        );
        assert_eq!(progressing.message, "0 of 2 nodes updated; 1 unavailable of at most 1");
        assert_eq!(status.nodes[0].message.as_deref(), Some("applying the newest settings"));
        assert!(!status.nodes[0].ready);
    }

    #[test]
    fn paused_is_reported() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let mut new = config(ProxyMode::Nftables, 2, IntOrString::Int(1));
        new.spec.rollout.paused = true;
        let nodes = vec![("a".to_owned(), Some(ready_on(&old, "a")))];
        let status = status_of(&new, &nodes, at(5));
        assert_eq!(find(&status, condition_types::PROGRESSING).reason, reasons::ROLLOUT_PAUSED);
    }

    #[test]
    fn new_nodes_are_counted_and_listed_as_waiting() {
        let config = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let nodes = vec![("a".to_owned(), None), ("b".to_owned(), Some(assigned(&config, "b")))];
        let status = status_of(&config, &nodes, at(5));
        assert_eq!(status.summary.nodes, 2);
        assert_eq!(status.summary.ready, 0);
        assert_eq!(status.nodes[0].message.as_deref(), Some("waiting for the agent's first report"));
        assert!(status.summary.by_mode.is_empty());
    }

    #[test]
    fn no_nodes_is_ready_with_a_reason() {
        let config = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let status = status_of(&config, &[], at(5));
        assert_eq!(find(&status, condition_types::READY).reason, reasons::NO_NODES_SELECTED);
        assert!(status.nodes.is_empty());
    }

    #[test]
    fn conflicts_are_named_with_every_config_involved() {
        let config = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let conflicts = [Conflict { node: "a".into(), configs: vec!["default".into(), "edge".into()] }];
        let plan = plan(&config, &[]);
        let status = aggregate(&config, &[], &plan, &conflicts, at(5));
        let conflict = find(&status, condition_types::CONFLICT);
        assert_eq!(
            (conflict.status.as_str(), conflict.reason.as_str()),
            ("True", reasons::OVERLAPPING_SELECTORS)
        );
        assert!(conflict.message.contains("a (selected by default, edge)"), "{}", conflict.message);
    }

    #[test]
    fn transition_times_are_kept_while_statuses_do_not_change() {
        let (mut config, nodes) = mid_switch();
        let first = status_of(&config, &nodes, at(100));
        config.status = Some(first.clone());
        let second = status_of(&config, &nodes, at(200));
        assert_eq!(first, second, "same inputs, same status: nothing to write");
        assert!(!needs_write(&config, &second));

        // b recovers: Degraded flips and gets a new time; Ready stays False and keeps its time.
        let mut nodes = nodes;
        report(nodes[1].1.as_mut().expect("b"), true);
        let third = status_of(&config, &nodes, at(300));
        assert!(needs_write(&config, &third));
        assert_eq!(find(&third, condition_types::DEGRADED).last_transition_time, at(300));
        assert_eq!(find(&third, condition_types::READY).last_transition_time, at(100));
        assert_eq!(find(&third, condition_types::CONFLICT).last_transition_time, at(100));
    }

    #[test]
    fn five_thousand_nodes_stay_far_below_the_object_size_limit() {
        let old = config(ProxyMode::Iptables, 1, IntOrString::Int(1));
        let new = config(ProxyMode::Nftables, 2, IntOrString::String("10%".into()));
        let nodes: Vec<(String, Option<ProxyNode>)> = (0..5000)
            .map(|i| {
                let name = format!("ip-10-0-{}-{}.eu-west-1.compute.internal", i / 256, i % 256);
                let mut node = ready_on(&old, &name);
                if i % 3 == 0 {
                    write_newest(&new, &mut node);
                    report(&mut node, i % 30 != 0);
                }
                node.status.as_mut().expect("status").last_sync = Some(at(1_700_000_000));
                (name, Some(node))
            })
            .collect();
        let status = status_of(&new, &nodes, at(5));
        assert_eq!(status.summary.nodes, 5000);
        assert_eq!(status.summary.listed, MAX_LISTED_NODES as u32);
        assert_eq!(status.nodes.len(), MAX_LISTED_NODES);
        assert_eq!(status.summary.failed, 167);
        assert!(
            status
                .nodes
                .iter()
                .all(|e| e.message.as_deref().is_some_and(|m| m.starts_with("ModeUnsupported")))
        );
        let bytes = serde_json::to_vec(&status).expect("serializes").len();
        assert!(bytes < 64 * 1024, "status is {bytes} bytes");
        let degraded = find(&status, condition_types::DEGRADED);
        assert!(degraded.message.ends_with("; and 157 more"), "{}", degraded.message);
    }
}
