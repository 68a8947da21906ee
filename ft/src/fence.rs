//! Fencing: before a side of a pair goes on alone (a primary that lost its backup, a backup
//! whose primary went silent) it asks the witness, which grants the pair to the first claimant
//! only. No answer counts as a refusal: a copy that cannot prove it may run must not release
//! output. Without a witness both sides go on (the status reports `fencing: none`).

use std::time::Duration;

pub use crate::witness::Role;
use crate::witness::WitnessClient;

/// How long a claim may take before the claimant counts itself fenced.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

pub fn describe(witness: &Option<String>) -> String {
    match witness {
        Some(addr) => format!("witness {addr}"),
        None => "none".to_string(),
    }
}

/// Ok when this side may go on; Err(why) when it is fenced.
pub fn claim(witness: &Option<String>, pair_id: u64, role: Role, epoch: u64) -> Result<(), String> {
    let Some(addr) = witness else {
        return Ok(());
    };
    let claimant = format!("{role} pid {}", std::process::id());
    match WitnessClient::new(addr.clone(), CLAIM_TIMEOUT).claim(pair_id, role, epoch, &claimant) {
        Ok(outcome) if outcome.granted => {
            log::warn!("FT: witness {addr} granted pair {pair_id:#x} to this {role}");
            Ok(())
        }
        Ok(outcome) => Err(format!(
            "the witness {addr} gave the VM to the {} (epoch {})",
            outcome.winner, outcome.epoch
        )),
        Err(e) => Err(format!("no decision from the witness {addr}: {e}")),
    }
}
