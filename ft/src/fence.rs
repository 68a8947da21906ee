//! Fencing: before a side of a pair goes on alone (a primary that lost its backup, a backup
//! whose primary went silent) it must prove that the other side cannot, so that two copies of
//! one VM never both release output. No answer counts as a refusal: a copy that cannot prove
//! it may run must not release output. Without fencing both sides go on (the status reports
//! `fencing: none`). Two ways to decide, chosen by the operator:
//!
//! - the built-in witness ([`crate::witness`]): the first claim for a pair wins;
//! - etcd ([`crate::etcd_fence`]): the primary holds a lease-bound key per pair and releases
//!   output only while its lease is provably alive; the backup takes over only by creating
//!   the key once the lease expired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::etcd_fence::{EtcdFencing, LeaseHold};
pub use crate::witness::Role;
use crate::witness::WitnessClient;
use transport::Security;

/// How long a claim may take before the claimant counts itself fenced.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before a witness claim that got no answer is tried again.
const CLAIM_RETRY: Duration = Duration::from_millis(100);

/// The name the primary announces for etcd fencing (the backup must fence the same way).
pub const ETCD: &str = "etcd";

/// How this side decides whether it may go on alone: its own operator's choice.
#[derive(Clone, Debug)]
pub enum Fencing {
    None,
    Witness {
        addr: String,
        /// The operator's TLS credentials (or plaintext opt-out) for the witness channel.
        security: Option<Security>,
    },
    Etcd(Arc<EtcdFencing>),
}

impl Fencing {
    /// `--witness HOST:PORT` or `--fencing etcd://HOST:PORT[,...]` (not both). etcd is reached
    /// with the same TLS credentials as the replication channel.
    pub fn from_operator(
        witness: Option<&str>,
        fencing: Option<&str>,
        security: Option<&Security>,
    ) -> Result<Self, String> {
        match (witness, fencing) {
            (Some(_), Some(_)) => Err("give --witness or --fencing, not both".to_string()),
            (Some(addr), None) => Ok(Fencing::Witness {
                addr: addr.to_string(),
                security: security.cloned(),
            }),
            (None, Some(spec)) => {
                let tls_dir = match security {
                    Some(Security::Tls(creds)) => Some(creds.dir().to_path_buf()),
                    Some(Security::InsecurePlaintext) => None,
                    None => {
                        return Err(format!(
                            "fencing on {spec} needs TLS credentials (or the plaintext opt-out)"
                        ))
                    }
                };
                EtcdFencing::parse(spec, tls_dir.as_deref())
                    .map(|etcd| Fencing::Etcd(Arc::new(etcd)))
                    .map_err(|e| e.to_string())
            }
            (None, None) => Ok(Fencing::None),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Fencing::None => "none".to_string(),
            Fencing::Witness { addr, .. } => format!("witness {addr}"),
            Fencing::Etcd(etcd) => format!(
                "etcd {} (lease {:?})",
                etcd.endpoints().join(","),
                etcd.ttl()
            ),
        }
    }

    /// Asked once when protection starts, so that an unreachable decider (or one that refuses
    /// our certificate) is an error then rather than a fence at the first fault.
    pub fn check_reachable(&self) -> Result<(), String> {
        match self {
            Fencing::None => Ok(()),
            Fencing::Witness { addr, security } => {
                let Some(security) = security else {
                    return Err(no_security(addr));
                };
                // Pair 0 is never used: the answer is "nothing decided".
                WitnessClient::new(addr.clone(), CLAIM_TIMEOUT, security.clone())
                    .status(0)
                    .map(|_| ())
                    .map_err(|e| format!("the witness cannot be asked: {e}"))
            }
            Fencing::Etcd(etcd) => etcd
                .check_reachable(CLAIM_TIMEOUT)
                .map_err(|e| format!("etcd cannot be asked: {e}")),
        }
    }

    /// The witness the primary announces (the backup's operator must name its own way to it).
    pub fn announced_witness(&self) -> Option<String> {
        match self {
            Fencing::Witness { addr, .. } => Some(addr.clone()),
            _ => None,
        }
    }

    /// The fencing kind the primary announces when it is not a witness.
    pub fn announced_kind(&self) -> Option<String> {
        matches!(self, Fencing::Etcd(_)).then(|| ETCD.to_string())
    }

    /// The backup's check that it fences as the primary does: otherwise one side could go
    /// on alone without the other ever being asked.
    pub fn agree(&self, witness: Option<&str>, kind: Option<&str>) -> Result<(), String> {
        match (self, witness, kind) {
            (Fencing::Etcd(_), None, Some(ETCD)) => Ok(()),
            (_, _, Some(ETCD)) => Err(
                "the primary fences on etcd; name this host's etcd endpoints \
                 (receive-ft --fencing etcd://HOST:PORT[,...])"
                    .to_string(),
            ),
            (_, _, Some(other)) => Err(format!("the primary fences with {other:?}, unknown here")),
            (Fencing::Etcd(_), _, None) => {
                Err("this backup fences on etcd but the primary does not \
                 (enable-ft --fencing etcd://...)"
                    .to_string())
            }
            (Fencing::None, Some(theirs), None) => Err(format!(
                "the primary fences with the witness {theirs}; name this host's way to it \
                 (receive-ft --witness HOST:PORT)"
            )),
            _ => Ok(()),
        }
    }

    /// On etcd: how long a primary that stops without its backup's word keeps its lease
    /// alive. A backup that timed out (at most `heartbeat_timeout` after the stop) claims the
    /// pair once the lease expires, for at most [`Self::claim`]'s deadline; past that it has
    /// given up, so the released output can no longer be overwritten by a takeover.
    pub fn stop_lease_window(&self, heartbeat_timeout: Duration) -> Option<Duration> {
        match self {
            Fencing::Etcd(etcd) => {
                Some(heartbeat_timeout + etcd.ttl() + CLAIM_TIMEOUT * 2 + Duration::from_secs(1))
            }
            _ => None,
        }
    }

    /// The primary takes its pair's key before protection starts (etcd; nothing otherwise).
    pub fn hold_as_primary(&self, pair_id: u64) -> Result<Option<LeaseHold>, String> {
        match self {
            Fencing::Etcd(etcd) => etcd
                .hold_as_primary(pair_id, &claimant(Role::Primary))
                .map(Some)
                .map_err(|e| e.to_string()),
            _ => Ok(None),
        }
    }

    /// Ok when this side may go on alone; Err(why) when it is fenced. A primary on etcd proves
    /// its `lease` is alive with one renewal; a backup on etcd wins the pair's key (waiting at
    /// most one lease TTL and a little for the primary's lease to expire) and returns the
    /// hold it now keeps alive.
    pub fn claim(
        &self,
        pair_id: u64,
        role: Role,
        epoch: u64,
        lease: Option<&LeaseHold>,
    ) -> Result<Option<LeaseHold>, String> {
        match self {
            Fencing::None => Ok(None),
            Fencing::Witness { addr, security } => {
                claim_witness(addr, security.as_ref(), pair_id, role, epoch).map(|()| None)
            }
            Fencing::Etcd(etcd) => match role {
                Role::Primary => {
                    let Some(lease) = lease else {
                        return Err("this primary holds no etcd lease".to_string());
                    };
                    lease
                        .confirm(CLAIM_TIMEOUT)
                        .map(|()| None)
                        .map_err(|e| format!("etcd: {e}"))
                }
                Role::Backup => {
                    let deadline = etcd.ttl() + CLAIM_TIMEOUT * 2;
                    let hold = etcd
                        .claim_as_backup(pair_id, &claimant(role), deadline)
                        .map_err(|e| format!("etcd: {e}"))?;
                    log::warn!("FT: etcd gave pair {pair_id:#x} to this backup (epoch {epoch})");
                    Ok(Some(hold))
                }
            },
        }
    }
}

fn claimant(role: Role) -> String {
    format!("{role} pid {}", std::process::id())
}

fn no_security(addr: &str) -> String {
    format!("no TLS credentials (or plaintext opt-out) for the witness {addr}")
}

fn claim_witness(
    addr: &str,
    security: Option<&Security>,
    pair_id: u64,
    role: Role,
    epoch: u64,
) -> Result<(), String> {
    let Some(security) = security else {
        return Err(no_security(addr));
    };
    // A claim is idempotent: one that found the witness busy or its connection dropped is
    // tried again while the claim's time lasts (many pairs of a failed host claim at once).
    let deadline = Instant::now() + CLAIM_TIMEOUT;
    let answer = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let client = WitnessClient::new(addr.to_string(), left, security.clone());
        match client.claim(pair_id, role, epoch, &claimant(role)) {
            Err(e) if deadline.saturating_duration_since(Instant::now()) > CLAIM_RETRY => {
                log::warn!("FT: claim at the witness {addr}: {e}; trying again");
                std::thread::sleep(CLAIM_RETRY);
            }
            answer => break answer,
        }
    };
    match answer {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_must_fence_the_same_way() {
        let none = Fencing::None;
        let witness = Fencing::Witness {
            addr: "w:1".into(),
            security: Some(Security::InsecurePlaintext),
        };
        assert!(none.agree(None, None).is_ok());
        assert!(witness.agree(Some("w:1"), None).is_ok());
        // A backup with its own witness while the primary has none goes on as before.
        assert!(witness.agree(None, None).is_ok());
        let e = none.agree(Some("w:1"), None).unwrap_err();
        assert!(e.contains("--witness"), "{e}");
        let e = none.agree(None, Some(ETCD)).unwrap_err();
        assert!(e.contains("--fencing etcd://"), "{e}");
        let e = witness.agree(None, Some("zookeeper")).unwrap_err();
        assert!(e.contains("unknown"), "{e}");
    }

    #[test]
    fn the_operator_gives_one_way() {
        let e = Fencing::from_operator(Some("w:1"), Some("etcd://e:2379"), None).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = Fencing::from_operator(None, Some("etcd://e:2379"), None).unwrap_err();
        assert!(e.contains("needs TLS credentials"), "{e}");
        let e = Fencing::from_operator(
            None,
            Some("zk://e:2181"),
            Some(&Security::InsecurePlaintext),
        )
        .unwrap_err();
        assert!(e.contains("etcd://"), "{e}");
        assert!(matches!(
            Fencing::from_operator(None, None, None),
            Ok(Fencing::None)
        ));
    }
}
