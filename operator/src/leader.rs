//! Leader election on a `coordination.k8s.io` Lease, so that two replicas never both act.
//!
//! kube 5 has no lease support, so this is client-go's algorithm, kept small:
//! - a candidate takes the Lease when it has no holder, or when its record has not changed for a
//!   whole lease duration as measured on the candidate's own clock (so clock skew between replicas
//!   does not matter: only the local time since the record was last seen to change counts);
//! - every write is an update carrying the resourceVersion read, so of two candidates racing for an
//!   expired Lease only one wins;
//! - the leader renews every [`RENEW_PERIOD`], and steps down when it has not renewed for
//!   [`RENEW_DEADLINE`], which is shorter than [`LEASE_DURATION`]: it stops acting before any other
//!   replica may consider the Lease expired.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::metrics::Metrics;

pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_PERIOD: Duration = Duration::from_secs(2);
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// The parts of a Lease record whose change shows that its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
}

/// Why a leader stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum LostLeadership {
    #[error("the Lease is now held by {0}")]
    TakenBy(String),
    #[error("could not renew the Lease for {RENEW_DEADLINE:?}: {0}")]
    RenewFailed(#[source] kube::Error),
}

enum Attempt {
    Leading,
    HeldBy(String),
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    metrics: std::sync::Arc<Metrics>,
    /// The record last seen and when it was first seen, on our clock.
    observed: Option<(Record, Instant)>,
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: String,
        metrics: std::sync::Arc<Metrics>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            metrics,
            observed: None,
        }
    }

    /// Waits until this replica holds the Lease. API errors are retried: they may be passing.
    pub async fn acquire(&mut self) {
        let mut last_holder = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => {
                    info!(lease = %self.name, identity = %self.identity, "acquired the leader Lease");
                    self.metrics.set_leader(true);
                    return;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if last_holder.as_ref() != Some(&holder) {
                        info!(lease = %self.name, %holder, "waiting for the leader Lease");
                        last_holder = Some(holder);
                    }
                }
                Err(error) => warn!(lease = %self.name, %error, "trying to acquire the leader Lease"),
            }
            tokio::time::sleep(RENEW_PERIOD).await;
        }
    }

    /// Renews the Lease until leadership is lost; returns why. Never returns while leading.
    pub async fn keep(&mut self) -> LostLeadership {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(RENEW_PERIOD).await;
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => renewed = Instant::now(),
                Ok(Attempt::HeldBy(holder)) => {
                    self.metrics.set_leader(false);
                    return LostLeadership::TakenBy(holder);
                }
                Err(error) if renewed.elapsed() >= RENEW_DEADLINE => {
                    self.metrics.set_leader(false);
                    return LostLeadership::RenewFailed(error);
                }
                Err(error) => warn!(lease = %self.name, %error, "renewing the leader Lease; will retry"),
            }
        }
    }

    /// Gives the Lease up on a clean shutdown, so that another replica takes over at once instead
    /// of after a whole lease duration.
    pub async fn release(&mut self) {
        self.metrics.set_leader(false);
        let lease = match self.api.get_opt(&self.name).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return,
            Err(error) => return warn!(%error, "reading the Lease to release it"),
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let released = Lease { spec: Some(spec), ..lease };
        match self.api.replace(&self.name, &PostParams::default(), &released).await {
            Ok(_) => {
                self.metrics.api_write("Lease");
                info!(lease = %self.name, "released the leader Lease");
            }
            Err(error) => warn!(%error, "releasing the Lease"),
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let duration_seconds = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(i32::MAX);
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.metrics.api_write("Lease");
                    Ok(Attempt::Leading)
                }
                Err(error) if is_conflict(&error) => Ok(Attempt::HeldBy("another replica".to_owned())),
                Err(error) => Err(error),
            };
        };

        let spec = lease.spec.clone().unwrap_or_default();
        let record = Record {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.clone(),
            transitions: spec.lease_transitions,
        };
        let first_seen = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => Instant::now(),
        };
        self.observed = Some((record.clone(), first_seen));

        let ours = record.holder.as_deref() == Some(self.identity.as_str());
        if let Some(holder) = record.holder.as_ref().filter(|_| !ours) {
            let their_duration = Duration::from_secs(
                spec.lease_duration_seconds
                    .map_or(LEASE_DURATION.as_secs(), |s| u64::try_from(s).unwrap_or(0)),
            );
            if first_seen.elapsed() < their_duration {
                return Ok(Attempt::HeldBy(holder.clone()));
            }
        }

        let renewed = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(duration_seconds),
            acquire_time: if ours { spec.acquire_time.clone() } else { Some(now.clone()) },
            renew_time: Some(now),
            lease_transitions: if ours {
                spec.lease_transitions
            } else {
                Some(spec.lease_transitions.unwrap_or(0) + 1)
            },
            ..spec
        };
        let holder = record.holder.unwrap_or_else(|| "another replica".to_owned());
        let lease_name = lease.name_any();
        let updated = Lease { spec: Some(renewed), ..lease };
        match self.api.replace(&lease_name, &PostParams::default(), &updated).await {
            Ok(_) => {
                self.metrics.api_write("Lease");
                Ok(Attempt::Leading)
            }
            // Someone else wrote first: they won this round. (A conflict on our own Lease is
            // retried until the renew deadline: no one else may take it before it expires.)
            Err(error) if is_conflict(&error) && !ours => Ok(Attempt::HeldBy(holder)),
            Err(error) => Err(error),
        }
    }
}
