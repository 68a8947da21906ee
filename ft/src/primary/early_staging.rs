//! Early staging: most of an epoch's pages are copied into the staging memory while the guest
//! still runs, so the pause copies only what changed in the epoch's last quarter (Cuju keeps
//! page copies out of the pause as well).
//!
//! Three quarters into an epoch (for a group member: of the group's epoch, after its last
//! cut), once the sender has shipped the previous one out of staging,
//! the control loop harvests the dirty log, re-arms it (the hot pages stay writable: the
//! pause compares them), and only then copies the harvested pages into staging. A write
//! before the re-arm is in the copy; one after it faults and is in the pause's harvest, which
//! copies the page again. The epoch's pages are the union of both harvests. Nothing else
//! writes staging while the sender does not read it (`staging_busy` is false, and only this
//! thread sets it), so the sender's pass over the previous epoch is not disturbed.
//!
//! Early sending: the copied pages then go to the sender at once (staging busy again), as a
//! first memory pass of the running epoch, so that the pause's pass carries only what changed
//! after the re-arm and the epoch's commit waits for less. The backup keeps an epoch's frames
//! until its EpochEnd and applies them in order, so a page sent in both passes ends with its
//! later copy, and an epoch cut short by a failure is dropped whole. The delta base follows
//! each pass as it is encoded, in the same order. The pause waits for the first pass to leave
//! staging before it copies into it (the epoch runs on meanwhile, as behind a slow sender).
//!
//! Pages written again before the pause would go twice: early and in the pause. A receive
//! buffer the NIC fills all epoch long is such a page; sending it twice costs the sender and
//! the backup CPU that input mirroring needs. So the first pass holds back the pages that were
//! staged early in the last epoch and written again before its pause: they stay copied in
//! staging and go in the pause's pass (re-copied there if written meanwhile). A guess that
//! turns out wrong only moves a page from the first pass to the pause's, and the pause learns
//! the guess anew each epoch.

use std::cell::Cell;
use std::time::Duration;

use vmm::fault_tolerance::ReplicableVm;
use vmm::memory::GuestMemoryMmap;
use vmm::migration::live;
use vmm::migration::memory::DirtyPages;

use super::staging::StagingCopier;

/// The part of the epoch after early staging: its writes are copied in the pause.
const LAST_PART: u32 = 4;

/// An epoch's early staging.
pub struct EarlyStaging {
    on: bool,
    /// Early staging ran (or was passed up) in the running epoch.
    tried: bool,
    /// The epoch timer now armed is for early staging, not for the checkpoint.
    timer_is_early: Cell<bool>,
    staged: Option<Staged>,
    /// Pages copied into staging while the guest ran, since protection started.
    pages_copied: u64,
    /// Of them, pages the sender shipped while the guest ran.
    pages_sent: u64,
    /// Of them, pages a first pass held back for the pause (see the module's docs).
    pages_held_back: u64,
    /// The pages staged early in the last epoch that had early staging and written again
    /// before its pause (None before the first): the next first pass holds them back. Kept
    /// between pauses, so that learning it allocates nothing in the pause.
    rewritten: Option<DirtyPages>,
}

/// What early staging harvested in the running epoch.
pub struct Staged {
    /// Pages copied into staging.
    pub copied: Option<DirtyPages>,
    /// Pages harvested and re-armed but not copied (the copy failed): the pause copies them.
    pub uncopied: Option<DirtyPages>,
    /// Of the pages harvested, those the guest wrote itself (None: not known).
    pub guest_written: Option<DirtyPages>,
    /// Of `copied`, the pages the first pass leaves to the pause: written again before the
    /// last pause (see the module's docs). None: none.
    pub held_back: Option<DirtyPages>,
    /// The sender shipped `copied` but `held_back` while the guest ran (as part of the
    /// running epoch): the pause sends `held_back` and the pages written since.
    pub sent: bool,
}

impl Staged {
    fn merge(self, later: Staged) -> Staged {
        let union = |a: Option<DirtyPages>, b: Option<DirtyPages>| match (a, b) {
            (Some(mut a), Some(b)) => {
                a.union_with(&b);
                Some(a)
            }
            (a, b) => a.or(b),
        };
        Staged {
            copied: union(self.copied, later.copied),
            uncopied: union(self.uncopied, later.uncopied),
            guest_written: union_known(self.guest_written, later.guest_written.as_ref()),
            held_back: union(self.held_back, later.held_back),
            // Pages of a harvest not shipped go in the pause, and with them all (sending a
            // page twice costs bytes, missing one loses it).
            sent: self.sent && later.sent,
        }
    }
}

/// The pages two harvests say the guest wrote itself; unknown (None) once either does not
/// tell.
pub fn union_known(first: Option<DirtyPages>, then: Option<&DirtyPages>) -> Option<DirtyPages> {
    match (first, then) {
        (Some(mut written), Some(more)) => {
            written.union_with(more);
            Some(written)
        }
        _ => None,
    }
}

impl EarlyStaging {
    pub fn new(on: bool) -> Self {
        Self {
            on,
            tried: false,
            timer_is_early: Cell::new(false),
            staged: None,
            pages_copied: 0,
            pages_sent: 0,
            pages_held_back: 0,
            rewritten: None,
        }
    }

    /// When an epoch of `len` that has run `ran` should stage early, if it still should; the
    /// caller arms its timer for the sooner of this and the checkpoint.
    pub fn due_in(&self, len: Duration, ran: Duration, min_timer: Duration) -> Option<Duration> {
        let at = len - len / LAST_PART;
        let due = (self.on && !self.tried && ran + min_timer <= at).then(|| at - ran);
        self.timer_is_early.set(due.is_some());
        due
    }

    /// The timer is about to be armed anew.
    pub fn disarm(&self) {
        self.timer_is_early.set(false);
    }

    /// Whether the timer that fired was early staging's (once).
    pub fn timer_fired(&self) -> bool {
        self.timer_is_early.replace(false)
    }

    /// Harvests the dirty log, re-arms it but for the hot pages `kept`, and copies the pages
    /// into `staging`. `staging_busy`: the sender still reads staging (then nothing is done).
    pub fn stage(
        &mut self,
        vm: &mut dyn ReplicableVm,
        staging: &GuestMemoryMmap,
        kept: &DirtyPages,
        copier: &mut StagingCopier,
        staging_busy: bool,
    ) -> Result<(), String> {
        self.tried = true;
        if staging_busy {
            return Ok(());
        }
        let mut pages = live::dirty_since_last(vm)?;
        let guest_written = vm.guest_written().cloned();
        // Kept pages are never re-armed: the pause compares them with their staging copy.
        pages.subtract(kept);
        let copied = vm
            .rearm_dirty_log(kept)
            .and_then(|()| copier.stage(vm.memory(), staging, &pages, &[]).map(|_| ()));
        if let Err(e) = &copied {
            log::warn!("FT: early staging failed ({e}); the pause copies its pages");
        }
        let (copied_pages, uncopied) = match copied {
            Ok(()) => {
                self.pages_copied += pages.count();
                (Some(pages), None)
            }
            Err(_) => (None, Some(pages)),
        };
        let held_back = copied_pages.as_ref().and_then(|p| self.held_back_of(p));
        let harvest = Staged {
            copied: copied_pages,
            uncopied,
            guest_written,
            held_back,
            sent: false,
        };
        // Once per epoch (`tried`); merged all the same, so that no harvest is ever dropped.
        self.staged = Some(match self.staged.take() {
            None => harvest,
            Some(before) => before.merge(harvest),
        });
        copied
    }

    /// The pages copied early in the running epoch for the first pass (all but those held
    /// back), unless there are none or they already went to the sender.
    pub fn unsent(&self) -> Option<DirtyPages> {
        let staged = self.staged.as_ref().filter(|s| !s.sent)?;
        let mut pages = staged.copied.clone()?;
        if let Some(held) = &staged.held_back {
            pages.subtract(held);
        }
        (!pages.is_empty()).then_some(pages)
    }

    /// The pages [`EarlyStaging::unsent`] named went to the sender.
    pub fn mark_sent(&mut self) {
        if let Some(staged) = &mut self.staged {
            staged.sent = true;
            let held = staged.held_back.as_ref().map_or(0, DirtyPages::count);
            let copied = staged.copied.as_ref().map_or(0, DirtyPages::count);
            self.pages_sent += copied.saturating_sub(held);
            self.pages_held_back += held;
        }
    }

    /// The pages of `copied` the first pass leaves to the pause, if any.
    fn held_back_of(&self, copied: &DirtyPages) -> Option<DirtyPages> {
        let mut held = copied.clone();
        held.intersect_with(self.rewritten.as_ref()?);
        (!held.is_empty()).then_some(held)
    }

    /// In the pause of an epoch that staged `copied` early: `harvested` holds the pages
    /// written since (the pause's harvest); the next first pass holds back the pages in both.
    pub fn learn(&mut self, copied: &DirtyPages, harvested: &DirtyPages) {
        // Allocated once per session, then reused.
        let rewritten = self.rewritten.get_or_insert_with(|| copied.clone());
        rewritten.clear();
        rewritten.union_with(copied);
        rewritten.intersect_with(harvested);
    }

    /// Pages sent while the guest ran, since protection started.
    pub fn pages_sent(&self) -> u64 {
        self.pages_sent
    }

    /// Pages first passes held back for the pause, since protection started.
    pub fn pages_held_back(&self) -> u64 {
        self.pages_held_back
    }

    /// Pages copied into staging while the guest ran, since protection started.
    pub fn pages_copied(&self) -> u64 {
        self.pages_copied
    }

    /// What early staging did in the epoch being cut; the next epoch starts afresh.
    pub fn take(&mut self) -> Option<Staged> {
        self.tried = false;
        self.timer_is_early.set(false);
        self.staged.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_micros(100);
    const EPOCH: Duration = Duration::from_millis(10);

    #[test]
    fn due_three_quarters_into_the_epoch_once() {
        let early = EarlyStaging::new(true);
        assert_eq!(
            early.due_in(EPOCH, Duration::from_millis(2), MIN),
            Some(Duration::from_micros(5500))
        );
        assert!(early.timer_fired());
        // Once per timer.
        assert!(!early.timer_fired());
        // Too late in the epoch: the checkpoint comes first.
        assert_eq!(early.due_in(EPOCH, Duration::from_micros(7450), MIN), None);
        assert!(!early.timer_fired());
    }

    #[test]
    fn a_timer_armed_anew_is_not_early_stagings() {
        let early = EarlyStaging::new(true);
        assert!(early.due_in(EPOCH, Duration::ZERO, MIN).is_some());
        early.disarm();
        assert!(!early.timer_fired());
    }

    #[test]
    fn off_it_is_never_due() {
        let early = EarlyStaging::new(false);
        assert_eq!(early.due_in(EPOCH, Duration::ZERO, MIN), None);
        assert!(!early.timer_fired());
    }

    fn harvest(pages: &[u64]) -> Staged {
        let memory = vmm::memory::create(1 << 20).unwrap();
        let mut set = DirtyPages::empty(&memory).unwrap();
        for &page in pages {
            set.insert(vm_memory::GuestAddress(page * 4096));
        }
        Staged {
            copied: Some(set),
            uncopied: None,
            guest_written: None,
            held_back: None,
            sent: false,
        }
    }

    /// The pages copied early go to the sender once; the pause then knows they were sent.
    #[test]
    fn copied_pages_are_handed_to_the_sender_once() {
        let mut early = EarlyStaging::new(true);
        assert!(early.unsent().is_none(), "nothing copied yet");
        early.staged = Some(harvest(&[1, 2, 3]));
        assert_eq!(early.unsent().map(|p| p.count()), Some(3));
        early.mark_sent();
        assert!(early.unsent().is_none());
        assert_eq!(early.pages_sent(), 3);
        let staged = early.take().unwrap();
        assert!(staged.sent);
        // An empty harvest sends nothing.
        early.staged = Some(harvest(&[]));
        assert!(early.unsent().is_none());
    }

    /// A harvest merged into one already sent leaves the whole union to the pause: a page
    /// sent twice costs bytes, a page never sent would be lost.
    #[test]
    fn a_harvest_not_sent_sends_the_union_in_the_pause() {
        let merged = harvest(&[1]).merge(Staged {
            sent: true,
            ..harvest(&[2])
        });
        assert!(!merged.sent);
        let sent = Staged {
            sent: true,
            ..harvest(&[1])
        };
        let merged = sent.merge(harvest(&[2]));
        assert!(!merged.sent);
        assert_eq!(merged.copied.map(|c| c.count()), Some(2));
    }

    fn pages(list: &[u64]) -> DirtyPages {
        harvest(list).copied.unwrap()
    }

    fn numbers(set: &DirtyPages) -> Vec<u64> {
        set.iter().map(|gpa| gpa.0 / 4096).collect()
    }

    /// A page staged early and written again before the pause stays out of the next first
    /// pass, goes in that epoch's pause instead, and rejoins the first pass once an epoch
    /// leaves it alone after early staging.
    #[test]
    fn pages_written_after_early_staging_are_held_for_the_next_pause() {
        let mut early = EarlyStaging::new(true);
        assert!(
            early.held_back_of(&pages(&[1, 2])).is_none(),
            "nothing learnt yet"
        );
        // Epoch 1: 1, 2, 3 staged early; 2, 3 and 9 written before the pause.
        early.learn(&pages(&[1, 2, 3]), &pages(&[2, 3, 9]));
        // Epoch 2: 1, 2, 4 staged early; the first pass holds 2 back.
        let copied = pages(&[1, 2, 4]);
        let held = early.held_back_of(&copied).unwrap();
        assert_eq!(numbers(&held), [2]);
        early.staged = Some(Staged {
            held_back: Some(held),
            ..harvest(&[1, 2, 4])
        });
        assert_eq!(numbers(&early.unsent().unwrap()), [1, 4]);
        early.mark_sent();
        assert_eq!((early.pages_sent(), early.pages_held_back()), (2, 1));
        let staged = early.take().unwrap();
        assert!(staged.sent);
        assert_eq!(staged.held_back.as_ref().map(numbers), Some(vec![2]));
        // Its pause saw 2 unchanged since: the next first pass sends everything.
        early.learn(staged.copied.as_ref().unwrap(), &pages(&[7]));
        assert!(early.held_back_of(&pages(&[1, 2, 4])).is_none());
    }

    /// Held back whole, nothing goes early: the pause sends the harvest as without sending.
    #[test]
    fn a_first_pass_held_back_whole_leaves_everything_to_the_pause() {
        let mut early = EarlyStaging::new(true);
        early.learn(&pages(&[1, 2]), &pages(&[1, 2]));
        let held = early.held_back_of(&pages(&[1, 2])).unwrap();
        early.staged = Some(Staged {
            held_back: Some(held),
            ..harvest(&[1, 2])
        });
        assert!(early.unsent().is_none());
        let staged = early.take().unwrap();
        assert!(!staged.sent, "the pause sends every page copied");
    }

    #[test]
    fn after_it_ran_it_is_due_again_only_in_the_next_epoch() {
        let mut early = EarlyStaging::new(true);
        early.tried = true;
        assert_eq!(early.due_in(EPOCH, Duration::ZERO, MIN), None);
        assert!(early.take().is_none());
        assert!(early.due_in(EPOCH, Duration::ZERO, MIN).is_some());
    }
}
