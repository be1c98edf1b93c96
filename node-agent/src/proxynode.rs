//! The agent's side of its ProxyNode: what status to report, and when a report is worth an API
//! write. Thousands of agents write their status; each write must carry news.
//!
//! The contract with the operator is documented on [`fleetproxy_api::SyncState`]: status is
//! written only after an attempt to apply the spec; `appliedGeneration` moves only on success; the
//! Ready condition's `observedGeneration` is the ProxyNode generation acted on.

use std::time::Duration;

use fleetproxy_api::{Capabilities, GoDuration, ProxyMode, ProxyNode, ProxyNodeStatus, node_condition_types};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api,
    api::{Patch, PatchParams},
};

/// Reasons of the Ready condition.
pub mod reasons {
    /// The kernel holds the rules of the spec's settings.
    pub const SYNCED: &str = "Synced";
    /// This node cannot run the requested mode; the previous mode keeps working.
    pub const MODE_UNSUPPORTED: &str = "ModeUnsupported";
    /// The kernel refused the rules, or could not be read back.
    pub const SYNC_FAILED: &str = "SyncFailed";
    /// The previous mode's objects could not all be removed after a switch.
    pub const CLEANUP_FAILED: &str = "CleanupFailed";
    /// The spec's settings fail the agent's own validation.
    pub const INVALID_SETTINGS: &str = "InvalidSettings";
}

/// The Ready condition's content, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

impl Readiness {
    pub fn ready(message: impl Into<String>) -> Self {
        Self { ready: true, reason: reasons::SYNCED.into(), message: message.into() }
    }

    pub fn not_ready(reason: &str, message: impl Into<String>) -> Self {
        Self { ready: false, reason: reason.into(), message: message.into() }
    }
}

/// What the agent knows about its node after a sync attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub active_mode: Option<ProxyMode>,
    pub applied_generation: Option<i64>,
    pub rule_count: Option<u64>,
    pub last_sync: Option<Timestamp>,
    pub sync_duration: Option<Duration>,
    pub capabilities: Vec<ProxyMode>,
    pub readiness: Readiness,
    /// The ProxyNode's metadata.generation the agent acted on.
    pub observed_generation: Option<i64>,
}

/// The status to write for `report`, keeping the Ready condition's lastTransitionTime when its
/// status did not change (the API's condition convention).
pub fn status(report: &Report, previous: Option<&ProxyNodeStatus>, now: Timestamp) -> ProxyNodeStatus {
    let status = if report.readiness.ready { "True" } else { "False" };
    let previous_ready =
        previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == node_condition_types::READY));
    let last_transition_time =
        previous_ready.filter(|c| c.status == status).map_or(Time(now), |c| c.last_transition_time.clone());
    let mut capabilities = report.capabilities.clone();
    capabilities.sort();
    capabilities.dedup();
    ProxyNodeStatus {
        active_mode: report.active_mode,
        applied_generation: report.applied_generation,
        rule_count: report.rule_count.map(|count| i64::try_from(count).unwrap_or(i64::MAX)),
        last_sync: report.last_sync.map(Time),
        sync_duration: report.sync_duration.map(GoDuration::from),
        capabilities: Capabilities { modes: capabilities },
        conditions: vec![Condition {
            type_: node_condition_types::READY.into(),
            status: status.into(),
            reason: report.readiness.reason.clone(),
            message: report.readiness.message.clone(),
            observed_generation: report.observed_generation,
            last_transition_time,
        }],
    }
}

/// Whether `desired` is worth a write over `previous` (what was last written or observed).
///
/// Anything the operator acts on (mode, generation, readiness, capabilities) is written at once; the
/// fields that move with every sync (rule count, last sync, sync duration) at most once per
/// `refresh` (the sync period), so that a busy cluster does not turn every sync into a write.
pub fn worth_writing(
    desired: &ProxyNodeStatus,
    previous: Option<&ProxyNodeStatus>,
    refresh: Duration,
    now: Timestamp,
) -> bool {
    let Some(previous) = previous else { return true };
    fn significant(s: &ProxyNodeStatus) -> impl PartialEq + '_ {
        let conditions: Vec<_> = s
            .conditions
            .iter()
            .map(|c| (&c.type_, &c.status, &c.reason, &c.message, c.observed_generation))
            .collect();
        // The count changes only when the kernel is read back (after full syncs and once per
        // syncPeriod), so it is written when it changes.
        (s.active_mode, s.applied_generation, &s.capabilities, conditions, s.rule_count)
    }
    if significant(desired) != significant(previous) {
        return true;
    }
    let volatile_changed =
        desired.sync_duration != previous.sync_duration || desired.last_sync != previous.last_sync;
    let refresh = SignedDuration::try_from(refresh).unwrap_or(SignedDuration::MAX);
    let stale = previous.last_sync.as_ref().is_none_or(|Time(at)| now.duration_since(*at) >= refresh);
    volatile_changed && stale
}

/// Writes `status` to the ProxyNode named `name` with a merge patch of the status subresource.
pub async fn write_status(
    api: &Api<ProxyNode>,
    name: &str,
    status: &ProxyNodeStatus,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).expect("time")
    }

    fn report(ready: bool) -> Report {
        Report {
            active_mode: Some(ProxyMode::Nftables),
            applied_generation: Some(4),
            rule_count: Some(120),
            last_sync: Some(at(0)),
            sync_duration: Some(Duration::from_millis(40)),
            capabilities: vec![ProxyMode::Nftables, ProxyMode::Iptables],
            readiness: if ready {
                Readiness::ready("nftables rules are in the kernel")
            } else {
                Readiness::not_ready(reasons::MODE_UNSUPPORTED, "ipvs mode is not available")
            },
            observed_generation: Some(7),
        }
    }

    #[test]
    fn status_carries_the_report() {
        let status = status(&report(true), None, at(1));
        assert_eq!(status.active_mode, Some(ProxyMode::Nftables));
        assert_eq!(status.applied_generation, Some(4));
        assert_eq!(status.rule_count, Some(120));
        assert_eq!(status.last_sync, Some(Time(at(0))));
        assert_eq!(status.sync_duration.as_ref().map(GoDuration::as_str), Some("40ms"));
        assert_eq!(status.capabilities.modes, [ProxyMode::Iptables, ProxyMode::Nftables]);
        let ready = &status.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str(), ready.reason.as_str()),
            ("Ready", "True", "Synced")
        );
        assert_eq!(ready.observed_generation, Some(7));
        assert_eq!(ready.last_transition_time, Time(at(1)));
    }

    #[test]
    fn transition_time_moves_only_with_the_condition_status() {
        let first = status(&report(true), None, at(1));
        let same = status(&report(true), Some(&first), at(50));
        assert_eq!(same.conditions[0].last_transition_time, Time(at(1)));
        let flipped = status(&report(false), Some(&first), at(60));
        assert_eq!(flipped.conditions[0].last_transition_time, Time(at(60)));
        assert_eq!(flipped.conditions[0].reason, reasons::MODE_UNSUPPORTED);
    }

    #[test]
    fn writes_carry_news_or_refresh_once_a_period() {
        let period = Duration::from_secs(30);
        let written = status(&report(true), None, at(0));
        assert!(worth_writing(&written, None, period, at(0)), "first report");
        assert!(!worth_writing(&written, Some(&written), period, at(100)), "nothing new");

        let mut busier = report(true);
        busier.rule_count = Some(130);
        busier.last_sync = Some(at(10));
        let busier = status(&busier, Some(&written), at(10));
        assert!(worth_writing(&busier, Some(&written), period, at(10)), "a new kernel count is news");
        let mut later = report(true);
        later.last_sync = Some(at(10));
        let later = status(&later, Some(&written), at(10));
        assert!(!worth_writing(&later, Some(&written), period, at(10)), "sync times wait for the period");
        assert!(worth_writing(&later, Some(&written), period, at(30)), "and are written after it");

        let failed = status(&report(false), Some(&written), at(5));
        assert!(worth_writing(&failed, Some(&written), period, at(5)), "readiness is news at once");
        let mut switched = report(true);
        switched.active_mode = Some(ProxyMode::Iptables);
        let switched = status(&switched, Some(&written), at(5));
        assert!(worth_writing(&switched, Some(&written), period, at(5)));
    }
}
