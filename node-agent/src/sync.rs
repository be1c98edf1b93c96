//! When to sync, and how much: kube-proxy's BoundedFrequencyRunner plus its full-sync rules, as a
//! pure state machine over `Instant`s so that it can be tested without waiting.
//!
//! - a queued change is synced as soon as `minSyncPeriod` has passed since the last sync started;
//! - every `syncPeriod` a sync runs even when nothing changed; it is partial, like kube-proxy's
//!   since v1.28: a full sync of 10,000 services costs seconds of kernel time and would hold back
//!   every change queued behind it. Full syncs run when something needs one (start, settings,
//!   topology, a failure, a kernel read-back that finds our rules gone) and at least every
//!   [`FULL_RESYNC_PERIOD`] (kube-proxy's `FullSyncPeriod`);
//! - a failed sync is retried with exponential backoff (from `minSyncPeriod`, at least one second,
//!   up to `syncPeriod`), and the retry is full.

use std::time::{Duration, Instant};

/// The longest time between two full syncs.
pub const FULL_RESYNC_PERIOD: Duration = Duration::from_secs(3600);

/// How much of the rules a sync rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    Full,
    Partial,
}

#[derive(Clone, Debug)]
pub struct Scheduler {
    min_sync_period: Duration,
    sync_period: Duration,
    last_start: Option<Instant>,
    last_full: Option<Instant>,
    last_success: Option<Instant>,
    pending: bool,
    need_full: bool,
    failures: u32,
    retry_at: Option<Instant>,
}

impl Scheduler {
    pub fn new(min_sync_period: Duration, sync_period: Duration) -> Self {
        Self {
            min_sync_period,
            sync_period,
            last_start: None,
            last_full: None,
            last_success: None,
            // The first sync is full and runs as soon as the inputs are complete.
            pending: true,
            need_full: true,
            failures: 0,
            retry_at: None,
        }
    }

    pub fn set_periods(&mut self, min_sync_period: Duration, sync_period: Duration) {
        self.min_sync_period = min_sync_period;
        self.sync_period = sync_period;
    }

    /// Something changed that a partial sync can carry.
    pub fn queue(&mut self) {
        self.pending = true;
    }

    /// Something changed that every rule may depend on (settings, mode, node zone).
    pub fn queue_full(&mut self) {
        self.pending = true;
        self.need_full = true;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the next sync is due; `now` or earlier means at once.
    pub fn next_sync(&self) -> Instant {
        let periodic = self.last_success.map(|at| at + self.sync_period);
        let queued = self.pending.then(|| {
            let rate_limited = self.last_start.map(|at| at + self.min_sync_period);
            rate_limited.into_iter().chain(self.retry_at).max()
        });
        match (periodic, queued) {
            (_, Some(None)) => self.last_start.unwrap_or_else(Instant::now),
            (Some(periodic), Some(Some(queued))) => periodic.min(queued),
            (None, Some(Some(queued))) => queued,
            (Some(periodic), None) => periodic,
            // Never synced and nothing queued: cannot happen after new(); retry at the period.
            (None, None) => self.last_start.map_or_else(Instant::now, |at| at + self.sync_period),
        }
    }

    /// Starts a sync at `now`: returns how much it must rewrite.
    pub fn start(&mut self, now: Instant) -> SyncKind {
        self.last_start = Some(now);
        let full_period = FULL_RESYNC_PERIOD.max(self.sync_period);
        let period_over = self.last_full.is_none_or(|at| now >= at + full_period);
        if self.need_full || period_over { SyncKind::Full } else { SyncKind::Partial }
    }

    pub fn succeeded(&mut self, now: Instant, kind: SyncKind) {
        self.last_success = Some(now);
        if kind == SyncKind::Full {
            self.last_full = Some(now);
            self.need_full = false;
        }
        self.pending = false;
        self.failures = 0;
        self.retry_at = None;
    }

    pub fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.pending = true;
        self.need_full = true;
        self.retry_at = Some(now + self.backoff());
    }

    /// The wait before retry number `failures`.
    pub fn backoff(&self) -> Duration {
        let base = self.min_sync_period.max(Duration::from_secs(1));
        let factor = 2u32.saturating_pow(self.failures.saturating_sub(1).min(16));
        base.saturating_mul(factor).min(self.sync_period.max(base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const PERIOD: Duration = Duration::from_secs(30);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn first_sync_is_full_and_immediate() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(MIN, PERIOD);
        assert!(s.next_sync() <= Instant::now());
        assert_eq!(s.start(t0), SyncKind::Full);
        s.succeeded(t0, SyncKind::Full);
        assert_eq!(s.next_sync(), t0 + PERIOD, "nothing queued: the periodic resync");
    }

    #[test]
    fn changes_are_rate_limited_and_partial() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(MIN, PERIOD);
        s.start(t0);
        s.succeeded(t0, SyncKind::Full);
        s.queue();
        assert_eq!(s.next_sync(), t0 + MIN);
        assert_eq!(s.start(t0 + MIN), SyncKind::Partial);
        s.succeeded(t0 + MIN, SyncKind::Partial);
        assert_eq!(s.next_sync(), t0 + MIN + PERIOD);
        assert_eq!(s.start(t0 + PERIOD), SyncKind::Partial, "the periodic sync is partial");
        s.succeeded(t0 + PERIOD, SyncKind::Partial);
        assert_eq!(s.start(t0 + FULL_RESYNC_PERIOD), SyncKind::Full, "an hour after the last full sync");
    }

    #[test]
    fn full_requests_and_failures_make_the_next_sync_full_with_backoff() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(MIN, PERIOD);
        s.start(t0);
        s.succeeded(t0, SyncKind::Full);
        s.queue_full();
        assert_eq!(s.start(t0 + secs(2)), SyncKind::Full);
        s.failed(t0 + secs(2));
        assert_eq!(s.next_sync(), t0 + secs(3));
        s.start(t0 + secs(3));
        s.failed(t0 + secs(3));
        assert_eq!(s.next_sync(), t0 + secs(5), "doubled");
        for n in 0..10 {
            s.start(t0 + secs(10 + n));
            s.failed(t0 + secs(10 + n));
        }
        assert_eq!(s.backoff(), PERIOD, "capped at syncPeriod");
        assert_eq!(s.failures(), 12);
        let t1 = t0 + secs(100);
        assert_eq!(s.start(t1), SyncKind::Full);
        s.succeeded(t1, SyncKind::Full);
        assert_eq!(s.failures(), 0);
        s.queue();
        assert_eq!(s.start(t1 + MIN), SyncKind::Partial);
    }
}
