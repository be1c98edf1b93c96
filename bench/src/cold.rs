//! When a cold start ends: the netlink listener ([`crate::netlink::ColdStart`]) says when the last
//! address of the load was announced, kernel dumps confirm it, and, where netlink cannot vouch for
//! its figure, give their own.
//!
//! Dumps are polled throughout (as `--detect poll` does, with the same pause), so that every run
//! also has the dump-based figure: the end of the first dump holding every address. Netlink's
//! figure is taken when a dump that started after it holds every address too (the confirmation).
//! Otherwise the polled figure is the cold start, and why is recorded ([`Fallback`]): events were
//! lost before the end (an overrun) or the listener failed; the dumps held everything before
//! netlink announced it (a listener that fell behind) or netlink never announced some address;
//! or a dump taken after netlink's end still missed addresses (a byte match that was not the
//! address).

use std::time::{Duration, Instant};

/// How long after the first complete dump netlink may take to catch up with what it had received
/// by then (normally it has: `caught_up` follows within a `recv` timeout).
pub const MISSED_GRACE: Duration = Duration::from_secs(30);
/// How often the loop looks at the listener between dumps.
const TICK: Duration = Duration::from_millis(10);

/// Why a cold start is the polled figure, not netlink's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The listener was overrun before the last address arrived.
    Overrun,
    /// The listener stopped on an error before the last address arrived.
    ListenerFailed,
    /// A dump held every address before netlink announced the last one.
    Late,
    /// A dump held every address, and netlink has not announced them all.
    Missed,
    /// A dump started after netlink's end did not hold every address.
    Disagreed,
}

impl Fallback {
    pub fn name(self) -> &'static str {
        match self {
            Fallback::Overrun => "overrun",
            Fallback::ListenerFailed => "listener-failed",
            Fallback::Late => "late",
            Fallback::Missed => "missed",
            Fallback::Disagreed => "disagreed",
        }
    }
}

/// The listener's state, as the loop sees it between dumps.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetlinkView {
    /// When the last address arrived.
    pub complete_at: Option<Instant>,
    /// No event lost and the listener alive until then.
    pub usable: bool,
    pub overrun: bool,
    /// Every datagram still to come arrives after this.
    pub caught_up: Option<Instant>,
}

/// A finished cold start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cold {
    /// The cold start: netlink's end, or the polled one if `fallback`.
    pub at: Instant,
    /// Netlink's end, whether taken or not.
    pub netlink: Option<Instant>,
    /// The end of the first kernel dump holding every address, and how long that dump took.
    pub poll: Instant,
    pub poll_took: Duration,
    /// The start of the last dump before `poll` that missed an address: the kernel completed
    /// after it, so together with `poll` it brackets the cold start's end.
    pub before: Option<Instant>,
    pub fallback: Option<Fallback>,
}

/// What the loop does next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step {
    Dump,
    Wait(Duration),
    Done(Cold),
    TimedOut,
}

/// The dumps so far, and the decision.
#[derive(Debug)]
pub struct Judge {
    deadline: Instant,
    next_dump: Instant,
    /// End and duration of the first dump holding every address.
    first_complete: Option<(Instant, Duration)>,
    /// Start of the last dump that missed an address, before the first complete one.
    last_incomplete: Option<Instant>,
    /// Whether the first dump started after netlink's end (as known when it ended) held every
    /// address.
    confirmed: Option<bool>,
}

impl Judge {
    /// A cold start that began at `started` and gives up at `deadline` unless netlink's end is
    /// still to be confirmed by a dump.
    pub fn new(started: Instant, deadline: Instant) -> Self {
        Self { deadline, next_dump: started, first_complete: None, last_incomplete: None, confirmed: None }
    }

    /// A dump ran from `start` to `end`; `complete`: it held every address. `netlink_end`: the
    /// listener's `complete_at` as of the end of the dump. The next regular dump is due `gap` later.
    pub fn dumped(
        &mut self,
        start: Instant,
        end: Instant,
        complete: bool,
        netlink_end: Option<Instant>,
        gap: Duration,
    ) {
        if self.first_complete.is_none() {
            if complete {
                self.first_complete = Some((end, end.saturating_duration_since(start)));
            } else {
                self.last_incomplete = Some(start);
            }
        }
        if let Some(nl) = netlink_end
            && start >= nl
            && self.confirmed.is_none()
        {
            self.confirmed = Some(complete);
        }
        self.next_dump = end + gap;
    }

    /// The end of the first dump that held every address.
    pub fn first_complete(&self) -> Option<Instant> {
        self.first_complete.map(|(end, _)| end)
    }

    pub fn step(&self, nl: &NetlinkView, now: Instant) -> Step {
        let unusable = if nl.usable {
            None
        } else if nl.overrun {
            Some(Fallback::Overrun)
        } else {
            Some(Fallback::ListenerFailed)
        };
        let Some((poll, poll_took)) = self.first_complete else {
            return match (nl.complete_at, unusable, self.confirmed) {
                // Netlink's end, still to be confirmed: one dump now, even past the deadline.
                (Some(_), None, None) => Step::Dump,
                _ => self.poll_or_time_out(now),
            };
        };
        let done = |fallback: Option<Fallback>| {
            let at = match (fallback, nl.complete_at) {
                (None, Some(nl_end)) => nl_end,
                _ => poll,
            };
            Step::Done(Cold {
                at,
                netlink: nl.complete_at,
                poll,
                poll_took,
                before: self.last_incomplete,
                fallback,
            })
        };
        if let Some(why) = unusable {
            return done(Some(why));
        }
        match nl.complete_at {
            Some(nl_end) if nl_end > poll => done(Some(Fallback::Late)),
            Some(_) => match self.confirmed {
                Some(true) => done(None),
                Some(false) => done(Some(Fallback::Disagreed)),
                None => Step::Dump,
            },
            // Whatever netlink still announces arrives after the dump's end.
            None if nl.caught_up.is_some_and(|c| c > poll) || now > poll + MISSED_GRACE => {
                done(Some(Fallback::Missed))
            }
            None => Step::Wait(TICK),
        }
    }

    fn poll_or_time_out(&self, now: Instant) -> Step {
        if now > self.deadline {
            Step::TimedOut
        } else if now >= self.next_dump {
            Step::Dump
        } else {
            Step::Wait(TICK.min(self.next_dump - now))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: Duration = Duration::from_millis(100);

    fn s(n: u64) -> Duration {
        Duration::from_millis(n * 100)
    }

    /// A judge whose cold start began at `t0`, deadline 100 ticks later.
    fn judge(t0: Instant) -> Judge {
        Judge::new(t0, t0 + s(100))
    }

    fn view(complete_at: Option<Instant>, caught_up: Option<Instant>) -> NetlinkView {
        NetlinkView { complete_at, usable: true, overrun: false, caught_up }
    }

    #[test]
    fn polls_with_the_gap_until_something_is_complete() {
        let t0 = Instant::now();
        let mut j = judge(t0);
        assert_eq!(j.step(&view(None, None), t0), Step::Dump);
        j.dumped(t0, t0 + s(1), false, None, GAP);
        assert!(matches!(j.step(&view(None, None), t0 + s(1)), Step::Wait(_)));
        assert_eq!(j.step(&view(None, None), t0 + s(2)), Step::Dump);
        assert_eq!(j.step(&view(None, None), t0 + s(101)), Step::TimedOut);
    }

    #[test]
    fn netlink_end_confirmed_by_the_next_dump() {
        let t0 = Instant::now();
        let mut j = judge(t0);
        j.dumped(t0, t0 + s(3), false, None, GAP);
        let nl = view(Some(t0 + s(4)), Some(t0 + s(4)));
        // Netlink saw everything: confirm at once, without waiting for the gap.
        assert_eq!(j.step(&nl, t0 + s(4)), Step::Dump);
        j.dumped(t0 + s(4), t0 + s(6), true, nl.complete_at, GAP);
        let Step::Done(cold) = j.step(&nl, t0 + s(6)) else { panic!("not done") };
        assert_eq!(cold.at, t0 + s(4));
        assert_eq!(cold.before, Some(t0));
        assert_eq!(cold.poll, t0 + s(6));
        assert_eq!(cold.poll_took, s(2));
        assert_eq!(cold.fallback, None);
    }

    #[test]
    fn a_complete_dump_that_began_before_netlink_end_does_not_confirm_it() {
        let t0 = Instant::now();
        let mut j = judge(t0);
        let nl = view(Some(t0 + s(2)), Some(t0 + s(2)));
        j.dumped(t0 + s(1), t0 + s(3), true, nl.complete_at, GAP);
        assert_eq!(j.step(&nl, t0 + s(3)), Step::Dump);
        j.dumped(t0 + s(3), t0 + s(5), true, nl.complete_at, GAP);
        let Step::Done(cold) = j.step(&nl, t0 + s(5)) else { panic!("not done") };
        assert_eq!((cold.at, cold.poll, cold.fallback), (t0 + s(2), t0 + s(3), None));
    }

    #[test]
    fn a_dump_after_netlink_end_missing_addresses_falls_back_to_polling() {
        let t0 = Instant::now();
        let mut j = judge(t0);
        let nl = view(Some(t0 + s(2)), Some(t0 + s(2)));
        j.dumped(t0 + s(2), t0 + s(3), false, nl.complete_at, GAP);
        // Refuted: poll on, with the gap, and the deadline applies again.
        assert!(matches!(j.step(&nl, t0 + s(3)), Step::Wait(_)));
        assert_eq!(j.step(&nl, t0 + s(4)), Step::Dump);
        j.dumped(t0 + s(4), t0 + s(5), true, nl.complete_at, GAP);
        let Step::Done(cold) = j.step(&nl, t0 + s(5)) else { panic!("not done") };
        assert_eq!(
            (cold.at, cold.netlink, cold.fallback),
            (t0 + s(5), nl.complete_at, Some(Fallback::Disagreed))
        );
        let mut late = judge(t0);
        late.dumped(t0 + s(2), t0 + s(3), false, nl.complete_at, GAP);
        assert_eq!(late.step(&nl, t0 + s(101)), Step::TimedOut);
    }

    #[test]
    fn a_confirmation_pending_at_the_deadline_still_gets_its_dump() {
        let t0 = Instant::now();
        let j = judge(t0);
        let nl = view(Some(t0 + s(99)), None);
        assert_eq!(j.step(&nl, t0 + s(150)), Step::Dump);
    }

    #[test]
    fn dumps_ahead_of_netlink() {
        let t0 = Instant::now();
        // Netlink ends after the first complete dump: its figure is late.
        let mut j = judge(t0);
        j.dumped(t0 + s(1), t0 + s(2), true, None, GAP);
        let Step::Done(cold) = j.step(&view(Some(t0 + s(3)), None), t0 + s(3)) else { panic!() };
        assert_eq!((cold.at, cold.fallback), (t0 + s(2), Some(Fallback::Late)));
        // Netlink has not seen everything: wait until it has handled what arrived by the dump's end.
        assert_eq!(j.step(&view(None, Some(t0 + s(1))), t0 + s(3)), Step::Wait(TICK));
        let Step::Done(cold) = j.step(&view(None, Some(t0 + s(2) + TICK)), t0 + s(3)) else { panic!() };
        assert_eq!((cold.at, cold.netlink, cold.fallback), (t0 + s(2), None, Some(Fallback::Missed)));
        // ... or not long: a listener that never catches up.
        let Step::Done(cold) = j.step(&view(None, None), t0 + s(2) + MISSED_GRACE + TICK) else { panic!() };
        assert_eq!(cold.fallback, Some(Fallback::Missed));
    }

    #[test]
    fn an_overrun_or_a_failed_listener_leaves_it_to_the_dumps() {
        let t0 = Instant::now();
        let mut j = judge(t0);
        let overrun =
            NetlinkView { complete_at: Some(t0 + s(1)), usable: false, overrun: true, caught_up: None };
        // A netlink end after an overrun is not confirmed: dumps go on at their pace.
        assert_eq!(j.step(&overrun, t0), Step::Dump);
        j.dumped(t0, t0 + s(2), true, overrun.complete_at, GAP);
        let Step::Done(cold) = j.step(&overrun, t0 + s(2)) else { panic!() };
        assert_eq!((cold.at, cold.fallback), (t0 + s(2), Some(Fallback::Overrun)));
        let failed = NetlinkView { complete_at: None, usable: false, overrun: false, caught_up: None };
        let Step::Done(cold) = j.step(&failed, t0 + s(2)) else { panic!() };
        assert_eq!(cold.fallback, Some(Fallback::ListenerFailed));
    }
}
