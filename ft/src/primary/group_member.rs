//! The primary's side of an FT group (fate sharing, see [`crate::group`]): its link to the
//! coordinator, the orders it takes (cut, fail, degrade), the barrier of a group cut and the
//! group's commits. A child module of `primary`, as it works on the primary's own state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::control::FtHealth;
use vmm::fault_tolerance::{PrimaryEvent, ReplicableVm};
use vmm_sys_util::eventfd::EventFd;

use super::{commit_epoch, Cut, Job, Primary, Shared};
use crate::group::{PrimaryMember, PrimaryMsg};

/// A group member's side of the group (see [`crate::group`]).
pub(super) struct GroupLink {
    pub(super) member: PrimaryMember,
    /// Local epoch minus group epoch, fixed at the first group cut (`i64::MIN` until then):
    /// a member is cut exactly once per group epoch, so the two advance together. Negative
    /// for a member that joined a group older than its own epochs.
    pub(super) offset: AtomicI64,
    /// Orders for the control loop, in arrival order.
    pub(super) orders: Mutex<VecDeque<GroupOrder>>,
    pub(super) members: AtomicU64,
    pub(super) group_epoch: AtomicU64,
}

/// What the coordinator asks of this member's control loop.
#[derive(Debug)]
pub(super) enum GroupOrder {
    /// End group epoch `epoch`; with `barrier`, resume only when the coordinator says so.
    Cut { epoch: u64, barrier: bool },
    /// Another member's primary failed: stop, as it did.
    Fail(String),
    /// Another member lost its backup (or the group ended): run on unprotected.
    Degrade(String),
}

impl GroupLink {
    pub(super) fn local_epoch(&self, group_epoch: u64) -> Option<u64> {
        let offset = self.offset.load(Ordering::SeqCst);
        if offset == i64::MIN {
            return None;
        }
        u64::try_from(i64::try_from(group_epoch).ok()?.checked_add(offset)?).ok()
    }

    pub(super) fn group_epoch_of(&self, local: u64) -> Option<u64> {
        let offset = self.offset.load(Ordering::SeqCst);
        if offset == i64::MIN {
            return None;
        }
        let group_epoch = i64::try_from(local).ok()?.checked_sub(offset)?;
        u64::try_from(group_epoch).ok().filter(|g| *g > 0)
    }

    pub(super) fn degrade_pending(&self) -> bool {
        self.orders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|o| matches!(o, GroupOrder::Degrade(_)))
    }

    pub(super) fn order(&self, order: GroupOrder, wake: &EventFd) {
        self.orders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(order);
        let _ = wake.write(1);
    }
}

/// Every member's backup holds `group_epoch`: its output may leave.
pub(super) fn commit_group_epoch(shared: &Shared, group: &GroupLink, group_epoch: u64) {
    let Some(epoch) = group.local_epoch(group_epoch) else {
        return;
    };
    commit_epoch(shared, epoch);
}

impl Primary {
    /// Group members: starts taking the coordinator's orders and reports this member ready.
    /// Returns the channel the coordinator's Resume orders arrive on.
    pub(super) fn listen_to_group(shared: &Arc<Shared>) -> Result<Option<Receiver<u64>>, String> {
        let Some(group) = &shared.group else {
            return Ok(None);
        };
        let (resume_tx, resumes) = mpsc::channel();
        let mut resume_tx = Some(resume_tx);
        let mut ended = false;
        let s = shared.clone();
        group.member.listen(move |msg| {
            let Some(group) = &s.group else {
                return;
            };
            match msg {
                Ok(PrimaryMsg::Cut { epoch, barrier }) => {
                    group.order(GroupOrder::Cut { epoch, barrier }, &s.wake)
                }
                Ok(PrimaryMsg::Resume { epoch }) => {
                    if let Some(tx) = &resume_tx {
                        let _ = tx.send(epoch);
                    }
                }
                Ok(PrimaryMsg::Commit { epoch }) => commit_group_epoch(&s, group, epoch),
                Ok(PrimaryMsg::Peers { macs, members, .. }) => {
                    s.gates.group_peers.set(macs);
                    group.members.store(members, Ordering::SeqCst);
                }
                // The order is queued before the Resume channel closes: a cut waiting on
                // that channel looks for the order as soon as it sees the close.
                Ok(PrimaryMsg::Degrade { reason }) => {
                    ended = true;
                    group.order(GroupOrder::Degrade(reason), &s.wake);
                    resume_tx = None;
                }
                Ok(PrimaryMsg::Fail { reason }) => {
                    ended = true;
                    group.order(GroupOrder::Fail(reason), &s.wake);
                    resume_tx = None;
                }
                Ok(other) => log::warn!("FT group: ignoring {other:?}"),
                // The coordinator closes every link right after it ends the group: the
                // order already queued says how.
                Err(_) if ended => resume_tx = None,
                Err(why) => {
                    if !s.stopping.load(Ordering::SeqCst) {
                        let reason = format!("the group's coordinator is gone ({why})");
                        group.order(GroupOrder::Fail(reason), &s.wake);
                    }
                    // A waiting cut must not sit out its timeout.
                    resume_tx = None;
                }
            }
        })?;
        group.member.send(&PrimaryMsg::Ready)?;
        Ok(Some(resumes))
    }

    /// A group cut (see [`crate::group`]): the one checkpoint routine, with the barrier that
    /// keeps every member paused until all have paused.
    pub(super) fn group_checkpoint(
        &mut self,
        vm: &mut dyn ReplicableVm,
        group_epoch: u64,
        barrier: bool,
        running: bool,
    ) -> Result<(), String> {
        let shared = self.shared.clone();
        let Some(group) = &shared.group else {
            return Ok(());
        };
        let cut = Cut::Group {
            epoch: group_epoch,
            barrier,
        };
        // Early staging is timed from here (see `next_checkpoint`).
        self.epoch_started = Instant::now();
        let Some(mut job) = self.cut(vm, &cut, running)? else {
            return Ok(());
        };
        // Epochs stay far below i64::MAX (one per millisecond for 292 million years).
        let offset = job.epoch as i64 - group_epoch as i64;
        let _ = group
            .offset
            .compare_exchange(i64::MIN, offset, Ordering::SeqCst, Ordering::SeqCst);
        group.group_epoch.store(group_epoch, Ordering::SeqCst);
        job.group_epoch = Some(group_epoch);
        self.hand_over(job);
        Ok(())
    }

    /// Group barrier, first half: tell the coordinator this member paused.
    pub(super) fn group_paused(&self, cut: &Cut) -> Result<(), String> {
        match (cut, &self.shared.group) {
            (
                Cut::Group {
                    epoch,
                    barrier: true,
                },
                Some(group),
            ) => group.member.send(&PrimaryMsg::Paused { epoch: *epoch }),
            _ => Ok(()),
        }
    }

    /// Group barrier, second half: wait until the coordinator says every member paused (as
    /// long as it waits for the slowest member, see group.rs).
    pub(super) fn group_resume(&self, cut: &Cut, told: Result<(), String>) -> Result<(), String> {
        let Cut::Group {
            epoch: group_epoch,
            barrier: true,
        } = *cut
        else {
            return told;
        };
        told?;
        let resumes = self
            .resumes
            .as_ref()
            .ok_or_else(|| "not listening to the group".to_string())?;
        let epoch = resumes
            .recv_timeout(self.heartbeat_timeout * 2 + Duration::from_millis(500))
            .map_err(|e| match e {
                RecvTimeoutError::Timeout => {
                    format!("group epoch {group_epoch}: the group did not resume in time")
                }
                RecvTimeoutError::Disconnected => format!(
                    "group epoch {group_epoch}: the group ended during the cut: another member was lost"
                ),
            })?;
        if epoch != group_epoch {
            return Err(format!(
                "resumed for group epoch {epoch}, cut {group_epoch}"
            ));
        }
        Ok(())
    }

    /// This member stops because the group failed: nothing uncommitted may leave, and the
    /// backup (its link now closed) takes over with the others.
    pub(super) fn fail_with_group(&mut self, reason: String) -> PrimaryEvent {
        self.close(None);
        for gate in self.shared.gates.all() {
            gate.discard_uncommitted();
        }
        self.health = FtHealth::Fenced;
        self.last_error = Some(reason.clone());
        PrimaryEvent::Fenced(format!("fate sharing: {reason}"))
    }

    /// The group runs on unprotected: the backup stands down and held output leaves.
    pub(super) fn degrade_with_group(&mut self, reason: String) {
        self.close(Some(Job::StandDown {
            guest_shutdown: false,
            reprotect: false,
            reason: format!("the FT group runs unprotected: {reason}"),
        }));
        for gate in self.shared.gates.all() {
            if let Err(e) = gate.passthrough() {
                log::error!("FT: releasing held output: {e}");
            }
        }
        self.shared.gates.group_peers.set(Vec::new());
        self.health = FtHealth::Degraded;
        log::warn!("FT: running unprotected ({reason})");
        self.last_error = Some(reason);
    }

    pub(super) fn next_group_order(&self) -> Option<GroupOrder> {
        self.shared
            .group
            .as_ref()?
            .orders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// How the group ended for this member, when a group cut broke off: the coordinator
    /// closes a member's link right after ordering it to fail or degrade, so a cut can break
    /// before the order is read. The order, if it comes within `wait`, names the real end.
    pub(super) fn group_end_after(&self, broken: String, wait: Duration) -> GroupEnd {
        match &self.shared.group {
            Some(group) => first_group_end(&group.orders, broken, wait),
            None => GroupEnd::Fail(broken),
        }
    }
}

/// How a group ended for a member whose cut broke off.
#[derive(Debug, PartialEq)]
pub(super) enum GroupEnd {
    /// Stop, as the group does (the member's backup takes over).
    Fail(String),
    /// Run on unprotected, as the rest of the group does.
    Degrade(String),
}

/// The first ending order in arrival order decides: a Degrade followed by the close of the
/// coordinator's link is a degrade, not a failure (the group ended first). Cut orders queued
/// meanwhile are dropped: the group they belonged to is over. Without any ending order within
/// `wait`, the broken link itself fails the member.
fn first_group_end(
    orders: &Mutex<VecDeque<GroupOrder>>,
    broken: String,
    wait: Duration,
) -> GroupEnd {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let next = orders.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        match next {
            Some(GroupOrder::Fail(reason)) => return GroupEnd::Fail(reason),
            Some(GroupOrder::Degrade(reason)) => return GroupEnd::Degrade(reason),
            Some(GroupOrder::Cut { .. }) => continue,
            None if std::time::Instant::now() >= deadline => return GroupEnd::Fail(broken),
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(orders: Vec<GroupOrder>) -> Mutex<VecDeque<GroupOrder>> {
        Mutex::new(orders.into_iter().collect())
    }

    #[test]
    fn a_degrade_before_the_coordinator_s_close_is_a_degrade() {
        // The group ran on unprotected (another member lost its backup) while this member
        // waited in a barrier; the coordinator then closed its link.
        let orders = queue(vec![
            GroupOrder::Cut {
                epoch: 7,
                barrier: true,
            },
            GroupOrder::Degrade("member 2 lost its backup".into()),
            GroupOrder::Fail("the group's coordinator is gone (closed)".into()),
        ]);
        let end = first_group_end(&orders, "no resume".into(), Duration::ZERO);
        assert_eq!(end, GroupEnd::Degrade("member 2 lost its backup".into()));
    }

    #[test]
    fn a_fail_first_fails_and_silence_fails_with_the_broken_link() {
        let orders = queue(vec![
            GroupOrder::Fail("member 2's primary died".into()),
            GroupOrder::Degrade("later".into()),
        ]);
        let end = first_group_end(&orders, "no resume".into(), Duration::ZERO);
        assert_eq!(end, GroupEnd::Fail("member 2's primary died".into()));
        let started = std::time::Instant::now();
        let end = first_group_end(
            &queue(Vec::new()),
            "no resume".into(),
            Duration::from_millis(30),
        );
        assert_eq!(end, GroupEnd::Fail("no resume".into()));
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn an_order_arriving_within_the_wait_decides() {
        let orders = Arc::new(queue(Vec::new()));
        let late = orders.clone();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            late.lock()
                .unwrap()
                .push_back(GroupOrder::Degrade("late degrade".into()));
        });
        let end = first_group_end(&orders, "no resume".into(), Duration::from_secs(5));
        pusher.join().unwrap();
        assert_eq!(end, GroupEnd::Degrade("late degrade".into()));
    }
}
