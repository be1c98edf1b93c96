//! kube-proxy's health server state: /healthz fails when a queued change has not reached the kernel
//! within 2 × syncPeriod of the last successful sync, or when the node is going away.

use std::{sync::Mutex, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

#[derive(Debug)]
struct State {
    timeout: Duration,
    started: Timestamp,
    last_updated: Option<Timestamp>,
    oldest_pending: Option<Timestamp>,
    node_eligible: bool,
}

/// Shared between the sync loop (which reports) and the health server (which answers).
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
}

/// One answer of /healthz or /livez.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthAnswer {
    pub healthy: bool,
    /// kube-proxy's JSON body.
    pub body: String,
}

/// Go's `time.Time` default format, which kube-proxy's bodies use (without the monotonic reading).
fn go_time(time: Timestamp) -> String {
    time.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string()
}

impl Health {
    /// `timeout` is kube-proxy's healthTimeout: 2 × syncPeriod.
    pub fn new(timeout: Duration, started: Timestamp) -> Self {
        Self {
            state: Mutex::new(State {
                timeout,
                started,
                last_updated: None,
                oldest_pending: None,
                node_eligible: true,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic while holding this lock cannot leave the plain data inconsistent: keep serving.
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut state)
    }

    pub fn set_timeout(&self, timeout: Duration) {
        self.with(|s| s.timeout = timeout);
    }

    /// A change is waiting for a sync.
    pub fn queued(&self, now: Timestamp) {
        self.with(|s| {
            s.oldest_pending.get_or_insert(now);
        });
    }

    /// A sync put everything queued so far into the kernel.
    pub fn updated(&self, now: Timestamp) {
        self.with(|s| {
            s.last_updated = Some(now);
            s.oldest_pending = None;
        });
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.with(|s| s.node_eligible = eligible);
    }

    fn synced_in_time(state: &State, now: Timestamp) -> bool {
        let Some(_) = state.oldest_pending else { return true };
        // Before the first sync the start counts as the last update: the agent is healthy while it
        // starts, but not forever if it never manages a sync.
        let reference = state.last_updated.unwrap_or(state.started);
        let timeout = SignedDuration::try_from(state.timeout).unwrap_or(SignedDuration::MAX);
        now.duration_since(reference) <= timeout
    }

    /// /healthz: synced in time and the node is not going away.
    pub fn healthz(&self, now: Timestamp) -> HealthAnswer {
        self.with(|s| {
            let healthy = Self::synced_in_time(s, now) && s.node_eligible;
            let last = s.last_updated.unwrap_or(s.started);
            HealthAnswer {
                healthy,
                body: format!(
                    r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {}}}"#,
                    go_time(last),
                    go_time(now),
                    s.node_eligible
                ),
            }
        })
    }

    /// /livez: synced in time, whatever becomes of the node.
    pub fn livez(&self, now: Timestamp) -> HealthAnswer {
        self.with(|s| {
            let last = s.last_updated.unwrap_or(s.started);
            HealthAnswer {
                healthy: Self::synced_in_time(s, now),
                body: format!(r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#, go_time(last), go_time(now)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).expect("time")
    }

    #[test]
    fn healthy_until_a_queued_change_waits_too_long() {
        let health = Health::new(Duration::from_secs(60), at(0));
        assert!(health.healthz(at(1000)).healthy, "nothing queued");
        health.queued(at(10));
        assert!(health.healthz(at(59)).healthy, "starting up");
        assert!(!health.healthz(at(61)).healthy, "never synced within the timeout");
        health.updated(at(70));
        assert!(health.healthz(at(500)).healthy);
        health.queued(at(100));
        health.queued(at(120));
        assert!(health.livez(at(130)).healthy);
        assert!(!health.livez(at(131)).healthy, "60s after the last update with a change pending");
    }

    #[test]
    fn a_node_going_away_fails_healthz_but_not_livez() {
        let health = Health::new(Duration::from_secs(60), at(0));
        health.set_node_eligible(false);
        let answer = health.healthz(at(1));
        assert!(!answer.healthy);
        assert!(answer.body.ends_with(r#""nodeEligible": false}"#), "{}", answer.body);
        assert!(health.livez(at(1)).healthy);
    }

    #[test]
    fn bodies_are_kube_proxys_json() {
        let health = Health::new(Duration::from_secs(60), at(0));
        health.updated(at(5));
        let body: serde_json::Value = serde_json::from_str(&health.healthz(at(6)).body).expect("JSON");
        assert_eq!(body["lastUpdated"], "2023-11-14 22:13:25 +0000 UTC");
        assert_eq!(body["currentTime"], "2023-11-14 22:13:26 +0000 UTC");
        assert_eq!(body["nodeEligible"], true);
        let body: serde_json::Value = serde_json::from_str(&health.livez(at(6)).body).expect("JSON");
        assert!(body.get("nodeEligible").is_none());
    }
}
