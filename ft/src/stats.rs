//! Duration statistics of the primary's epochs: pauses, send times, output commit delays
//! (and input frames' waits for the backup).

use std::time::{Duration, Instant};

/// Durations kept for the percentiles (the most recent ones).
const WINDOW: usize = 4096;

#[derive(Default)]
pub struct DurationStats {
    recent: Vec<u32>,
    next: usize,
    max_us: u64,
    last_us: u64,
}

impl DurationStats {
    pub fn record(&mut self, took: Duration) {
        let us = took.as_micros().min(u128::from(u32::MAX)) as u32;
        if self.recent.len() < WINDOW {
            self.recent.push(us);
        } else {
            self.recent[self.next] = us;
        }
        self.next = (self.next + 1) % WINDOW;
        self.max_us = self.max_us.max(u64::from(us));
        self.last_us = u64::from(us);
    }

    pub fn last_us(&self) -> u64 {
        self.last_us
    }

    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    /// The `p`th percentile (nearest rank) of the recent durations, 0 without any.
    pub fn percentile_us(&self, p: f64) -> u64 {
        if self.recent.is_empty() {
            return 0;
        }
        let mut sorted = self.recent.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        u64::from(sorted[rank.clamp(1, sorted.len()) - 1])
    }
}

/// The checkpoint pauses, as long as the guest stood still in each: from the pause being
/// asked for to its last vCPU leaving its park (`ReplicableVm::last_stop`). The control loop's
/// own measure (start of the pause to `resume` returning) also counts the time it waits for a
/// core after waking the vCPUs, often a whole time slice of the vCPU it woke on a busy host,
/// while the guest already runs. So a pause is recorded once its vCPUs have run again; the
/// control loop's measure stands in when the VM cannot tell.
#[derive(Default)]
pub struct GuestPauses {
    stats: DurationStats,
    pending: Option<PendingPause>,
}

struct PendingPause {
    started: Instant,
    /// The control loop's measure.
    measured: Duration,
}

impl GuestPauses {
    /// A pause that began at `started` (before the VM was asked to stop) and ended, as the
    /// control loop saw it, `measured` later. Recorded at once unless `await_guest`.
    pub fn ended(&mut self, started: Instant, measured: Duration, await_guest: bool) {
        self.settle(None, true);
        let pause = PendingPause { started, measured };
        if await_guest {
            self.pending = Some(pause);
        } else {
            self.stats.record(pause.measured);
        }
    }

    /// Records the pending pause as `last_stop` (the VM's latest stop: when it was asked for,
    /// how long the guest stood still) says, if that is about this pause: asked for between
    /// its start and the end of the control loop's measure. Otherwise it stays pending, or,
    /// with `last` (the next pause is about to start), the control loop's measure is recorded.
    pub fn settle(&mut self, last_stop: Option<(Instant, Duration)>, last: bool) {
        let Some(pause) = self.pending.take() else {
            return;
        };
        let seen = last_stop.and_then(|(asked, stood)| {
            (asked >= pause.started && asked <= pause.started + pause.measured).then_some(stood)
        });
        match seen {
            Some(stood) => self.stats.record(stood),
            None if last => self.stats.record(pause.measured),
            None => self.pending = Some(pause),
        }
    }

    pub fn stats(&self) -> &DurationStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_counts_as_long_as_the_guest_stood_still() {
        let mut pauses = GuestPauses::default();
        let start = Instant::now();
        let asked = start + Duration::from_micros(5);
        pauses.ended(start, Duration::from_micros(3000), true);
        // Not recorded until the vCPUs have run again.
        assert_eq!(pauses.stats().last_us(), 0);
        pauses.settle(None, false);
        assert_eq!(pauses.stats().last_us(), 0);
        pauses.settle(Some((asked, Duration::from_micros(700))), false);
        assert_eq!(pauses.stats().last_us(), 700);
        assert_eq!(pauses.stats().max_us(), 700);
        // Recorded once.
        pauses.settle(Some((asked, Duration::from_micros(900))), true);
        assert_eq!(pauses.stats().percentile_us(100.0), 700);
    }

    #[test]
    fn a_stop_from_another_pause_is_not_taken_for_this_one() {
        let mut pauses = GuestPauses::default();
        let start = Instant::now();
        let earlier = (start, Duration::from_micros(100));
        let later = start + Duration::from_millis(10);
        pauses.ended(later, Duration::from_micros(2000), true);
        // The VM's latest stop is an earlier pause (the vCPUs have not left this one yet).
        pauses.settle(Some(earlier), false);
        assert_eq!(pauses.stats().last_us(), 0);
        // One asked after this pause's end is not about it either; before the next pause,
        // the control loop's measure stands.
        pauses.settle(
            Some((later + Duration::from_millis(3), Duration::from_micros(50))),
            true,
        );
        assert_eq!(pauses.stats().last_us(), 2000);
    }

    #[test]
    fn without_the_guest_the_control_loops_measure_stands() {
        let mut pauses = GuestPauses::default();
        let start = Instant::now();
        pauses.ended(start, Duration::from_micros(400), false);
        assert_eq!(pauses.stats().last_us(), 400);
        // A pending pause never seen by the guest is recorded when the next one ends.
        pauses.ended(start, Duration::from_micros(600), true);
        pauses.ended(
            start + Duration::from_millis(10),
            Duration::from_micros(800),
            true,
        );
        assert_eq!(pauses.stats().last_us(), 600);
        assert_eq!(pauses.stats().percentile_us(100.0), 600);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut s = DurationStats::default();
        assert_eq!(s.percentile_us(50.0), 0);
        for us in 1..=100 {
            s.record(Duration::from_micros(us));
        }
        assert_eq!(s.percentile_us(50.0), 50);
        assert_eq!(s.percentile_us(99.0), 99);
        assert_eq!(s.max_us(), 100);
        assert_eq!(s.last_us(), 100);
    }
}
