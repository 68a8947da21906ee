//! Duration statistics of the primary's epochs: pauses, send times, output commit delays.

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
