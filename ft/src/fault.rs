//! Fault injection for the fault-injection tests: `TANDEM_FT_CRASH=PHASE:N` in the primary's
//! environment makes the process abort (as `kill -9` would end it) at a chosen point of its
//! N-th protected epoch, points a timed external kill hits only by luck:
//! - `pause`: while the VM is paused for the checkpoint (state captured, not resumed);
//! - `transfer`: in the middle of sending the epoch (pages sent, state not yet);
//! - `release`: after the backup's acknowledgement arrived, before the held output is released.
//!
//! Unset (the normal case) it costs one load of a cached value per point.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pause,
    Transfer,
    Release,
}

fn parse(spec: &str) -> Option<(Phase, u64)> {
    let (phase, n) = spec.split_once(':')?;
    let phase = match phase {
        "pause" => Phase::Pause,
        "transfer" => Phase::Transfer,
        "release" => Phase::Release,
        _ => return None,
    };
    Some((phase, n.parse().ok()?))
}

fn configured() -> Option<(Phase, u64)> {
    static POINT: OnceLock<Option<(Phase, u64)>> = OnceLock::new();
    *POINT.get_or_init(|| {
        let spec = std::env::var("TANDEM_FT_CRASH").ok()?;
        let point = parse(&spec);
        if point.is_none() {
            log::warn!("ignoring malformed TANDEM_FT_CRASH={spec}");
        }
        point
    })
}

/// Aborts the process when `phase` of the `n`-th protected epoch is the configured point.
pub fn crash_point(phase: Phase, n: u64) {
    if configured() == Some((phase, n)) {
        log::error!("TANDEM_FT_CRASH: aborting at {phase:?} of protected epoch {n}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_strictly() {
        assert_eq!(parse("pause:3"), Some((Phase::Pause, 3)));
        assert_eq!(parse("release:0"), Some((Phase::Release, 0)));
        assert_eq!(parse("transfer:x"), None);
        assert_eq!(parse("later:1"), None);
        assert_eq!(parse("pause"), None);
    }
}
