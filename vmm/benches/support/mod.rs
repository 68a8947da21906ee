//! What the benchmarks share (this crate's, and the ft crate's by path): the line naming the
//! machine, their command-line flags and their statistics.

// Each benchmark uses the part it needs.
#![allow(dead_code)]

use std::time::Duration;

/// The middle value (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `p` quantile (0..=1) of `sorted`, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// "N cores, <CPU model>": only ratios within a run count, but absolute figures name the host.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cores} cores, {cpu}")
}

/// A benchmark's flags: `--quick`, and numbers given as `--name N` for the names it takes.
/// Anything else (cargo bench passes `--bench`) is ignored.
pub struct Flags {
    pub quick: bool,
    numbers: Vec<(String, u64)>,
}

impl Flags {
    /// Panics with the flag's name when a number is missing or malformed: a bench run by hand
    /// should stop at once rather than measure something else.
    pub fn parse(numbered: &[&str]) -> Flags {
        let mut flags = Flags {
            quick: false,
            numbers: Vec::new(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            if arg == "--quick" {
                flags.quick = true;
            } else if numbered.contains(&arg.as_str()) {
                let value = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{arg} needs a number"));
                flags.numbers.push((arg, value));
            }
        }
        flags
    }

    /// The count given for `name` (at least 1), else `quick` under `--quick`, else `full`.
    pub fn count(&self, name: &str, quick: u64, full: u64) -> u64 {
        self.number(name)
            .unwrap_or(if self.quick { quick } else { full })
            .max(1)
    }

    /// The last value given for `name`.
    pub fn number(&self, name: &str) -> Option<u64> {
        self.numbers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}
