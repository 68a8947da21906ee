//! Hot pages stay writable (after write-fault prediction, Zhu et al.): a page the guest rewrites
//! epoch after epoch would otherwise take a write fault in every epoch (6-20 us of guest time each
//! on the nested hosts measured, 1-2 us with EPT; `ci/bench-ft` prints it as `us/fault floor`),
//! because each checkpoint write-protects what it harvested. With KVM's manual dirty-log re-arming
//! the checkpoint leaves such pages writable and, at every pause, compares each one with its copy
//! in the staging memory (which holds what the backup has, or is about to get): a changed page is
//! copied and sent like a logged one, an unchanged one is skipped.
//!
//! Why it is safe: a kept page is never re-armed, so KVM reports it in every harvest and the
//! pause compares it whether or not the guest wrote it; a page becomes kept only in an epoch in
//! which it was copied into staging, and from then on every change is copied, so its staging
//! copy is always the newest the backup will hold. A page leaves the set by being re-armed in
//! a pause, after its last compare, so its next write is logged again.
//!
//! Adaptive: a page is kept when it changes again within `window` epochs of its previous
//! change (a page written once, or swept through by a guest that rewrites a large region in
//! turn, would only be compared in vain), and stays kept while it changed within the last
//! `window` epochs, where the window is the number of compares one saved fault pays for (the
//! fault's assumed cost over the measured cost of a compare); the set is bounded so that
//! comparing it takes at most a twentieth of an epoch.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use vm_memory::GuestAddress;
use vmm::memory::GuestMemoryMmap;
use vmm::migration::memory::DirtyPages;

use super::staging::StagingCopier;

/// What a write fault is taken to cost: the low end (EPT hardware), so that a slower host only
/// keeps fewer pages than it could.
const FAULT_COST: Duration = Duration::from_micros(2);
/// A compare's cost before the first measurement (a 4 KiB memcmp).
const INITIAL_COMPARE_COST: Duration = Duration::from_nanos(400);
/// The keep window's bounds, in epochs.
const MIN_WINDOW: u64 = 2;
const MAX_WINDOW: u64 = 16;

/// The hot-page set of a protected VM.
pub struct HotPages {
    /// Manual re-arming is on in the VM (false: every harvest re-arms, nothing is kept).
    enabled: bool,
    /// Kept pages and the epoch each last changed in.
    kept: BTreeMap<u64, u64>,
    /// `kept` as a page set, for the VM's re-arm call.
    keep: DirtyPages,
    /// The kept pages a pause compares (kept between pauses: no allocation in the pause).
    candidates: Vec<GuestAddress>,
    /// The pages the guest changed in each of the last `MAX_WINDOW` epochs and that were not
    /// kept, oldest first: a page in one of them that changes again within the window is
    /// kept. Their bitmaps are reused (no allocation in the pause once there are enough).
    recent: VecDeque<(u64, DirtyPages)>,
    /// Measured cost of comparing one kept page (moving average).
    compare_cost: Duration,
    /// Longest time the compares of one pause may take.
    budget: Duration,
    /// Compares made, and changed pages they found.
    compares: u64,
    hits: u64,
}

impl HotPages {
    /// Off until [`HotPages::set_enabled`]: the VM re-arms every page it reports.
    pub fn new(memory: &GuestMemoryMmap, epoch: Duration) -> Result<Self, String> {
        Ok(Self {
            enabled: false,
            kept: BTreeMap::new(),
            keep: DirtyPages::empty(memory).map_err(|e| e.to_string())?,
            candidates: Vec::new(),
            recent: VecDeque::new(),
            compare_cost: INITIAL_COMPARE_COST,
            budget: epoch / 20,
            compares: 0,
            hits: 0,
        })
    }

    /// Whether the VM turned manual re-arming on.
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    /// Pages kept writable now.
    pub fn kept(&self) -> &DirtyPages {
        &self.keep
    }

    /// Changes the compares found so far (write faults saved).
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// A line for the log: how many pages are kept and what the compares found.
    pub fn summary(&self) -> String {
        format!(
            "{} pages kept writable; {} compares found {} changed pages (write faults saved), {:?} a compare",
            self.kept.len(),
            self.compares,
            self.hits,
            self.compare_cost
        )
    }

    /// In the pause: copies the pages of `reported` (a harvest, kept pages included) from
    /// guest memory into `staging` with `copier`, a kept page only if it changed. Returns the
    /// pages that changed (what this epoch must send).
    pub fn stage(
        &mut self,
        memory: &GuestMemoryMmap,
        staging: &GuestMemoryMmap,
        mut reported: DirtyPages,
        copier: &mut StagingCopier,
    ) -> Result<DirtyPages, String> {
        // A kept page is always reported (never re-armed); a harvest without it means manual
        // re-arming is not in force, so it is not compared.
        self.candidates.clear();
        self.candidates.extend(
            self.kept
                .keys()
                .map(|&gpa| GuestAddress(gpa))
                .filter(|&gpa| reported.contains(gpa)),
        );
        let staged = copier.stage(memory, staging, &reported, &self.candidates)?;
        let compared = self.candidates.len() as u64;
        if compared > 0 {
            // Time on a thread, not in the pause (two threads share the compares): the set
            // is sized as if one did them all.
            let per_page = staged.compare_time / u32::try_from(compared).unwrap_or(u32::MAX);
            self.compare_cost = (self.compare_cost * 7 + per_page) / 8;
        }
        self.compares += compared;
        for gpa in staged.unchanged {
            reported.remove(gpa);
        }
        Ok(reported)
    }

    /// After [`HotPages::stage`] of `epoch`: `changed` is what it returned, `guest_written`
    /// the pages of the harvest the guest wrote itself (None: unknown). Keeps the pages that
    /// changed recently, within the budget; the rest is re-armed by the caller with
    /// [`HotPages::kept`]. A page only devices wrote (a NIC's receive buffer) never faults, so
    /// keeping it would only take room from one that does.
    pub fn update(&mut self, epoch: u64, changed: &DirtyPages, guest_written: Option<&DirtyPages>) {
        if !self.enabled {
            return;
        }
        let cost = self.compare_cost.max(Duration::from_nanos(1));
        let window = (FAULT_COST.as_nanos() / cost.as_nanos())
            .clamp(u128::from(MIN_WINDOW), u128::from(MAX_WINDOW)) as u64;
        let room = (self.budget.as_nanos() / cost.as_nanos()) as usize;
        for (gpa, last) in self.kept.iter_mut() {
            if changed.contains(GuestAddress(*gpa)) {
                *last = epoch;
                self.hits += 1;
            }
        }
        self.kept
            .retain(|_, last| epoch.saturating_sub(*last) < window);
        let mut first_changes = match self.recent.len() as u64 {
            n if n >= MAX_WINDOW => self.recent.pop_front().map(|(_, set)| set),
            _ => None,
        }
        .unwrap_or_else(|| self.keep.clone());
        first_changes.clear();
        for gpa in changed.iter() {
            if guest_written.is_some_and(|written| !written.contains(gpa))
                || self.kept.contains_key(&gpa.0)
            {
                continue;
            }
            let again = self
                .recent
                .iter()
                .rev()
                .take_while(|(e, _)| epoch.saturating_sub(*e) < window)
                .any(|(_, set)| set.contains(gpa));
            if again && self.kept.len() < room {
                self.kept.insert(gpa.0, epoch);
            } else {
                first_changes.insert(gpa);
            }
        }
        self.recent.push_back((epoch, first_changes));
        // The set may have been over a budget that shrank: drop the stalest pages.
        if self.kept.len() > room {
            let mut by_age: Vec<(u64, u64)> = self.kept.iter().map(|(g, l)| (*l, *g)).collect();
            by_age.sort_unstable();
            for (_, gpa) in by_age.into_iter().take(self.kept.len() - room) {
                self.kept.remove(&gpa);
            }
        }
        self.keep.clear();
        for &gpa in self.kept.keys() {
            self.keep.insert(GuestAddress(gpa));
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;
    use vmm::migration::memory::PAGE_SIZE;

    use super::*;

    const MEM: usize = 64 * PAGE_SIZE;

    fn page(n: u64) -> GuestAddress {
        GuestAddress(n * PAGE_SIZE as u64)
    }

    /// Stages the pages numbered `pages` on this thread.
    fn stage(
        hot: &mut HotPages,
        guest: &GuestMemoryMmap,
        staging: &GuestMemoryMmap,
        pages: &[u64],
    ) -> DirtyPages {
        hot.stage(
            guest,
            staging,
            set(guest, pages),
            &mut StagingCopier::alone(),
        )
        .unwrap()
    }

    /// Stages what a harvest reports when the guest wrote `pages`: those and the kept ones.
    fn stage_with_kept(
        hot: &mut HotPages,
        guest: &GuestMemoryMmap,
        staging: &GuestMemoryMmap,
        pages: &[u64],
    ) -> DirtyPages {
        let mut reported = set(guest, pages);
        for gpa in hot.kept().iter() {
            reported.insert(gpa);
        }
        hot.stage(guest, staging, reported, &mut StagingCopier::alone())
            .unwrap()
    }

    /// Guest memory, staging memory and a hot-page set for `epoch`-long epochs, with manual
    /// re-arming on or off.
    fn rig(epoch: Duration, rearm: bool) -> (GuestMemoryMmap, GuestMemoryMmap, HotPages) {
        let guest = vmm::memory::create(MEM as u64).unwrap();
        let staging = vmm::memory::create(MEM as u64).unwrap();
        let mut hot = HotPages::new(&guest, epoch).unwrap();
        hot.set_enabled(rearm);
        (guest, staging, hot)
    }

    fn set(mem: &GuestMemoryMmap, pages: &[u64]) -> DirtyPages {
        DirtyPages::from_pages(mem, pages.iter().map(|&p| page(p)))
            .unwrap()
            .0
    }

    #[test]
    fn kept_pages_are_sent_only_when_they_changed_and_staging_follows() {
        let (guest, staging, mut hot) = rig(Duration::from_millis(10), true);
        // Epochs 0 and 1: pages 1 and 2 written (logged) and copied; written again within the
        // window, they are kept.
        for (epoch, value) in [(0, 10u64), (1, 11)] {
            guest.write_obj(value, page(1)).unwrap();
            guest.write_obj(value * 2, page(2)).unwrap();
            let dirty = stage(&mut hot, &guest, &staging, &[1, 2]);
            assert_eq!(dirty, set(&guest, &[1, 2]));
            hot.update(epoch, &dirty, None);
            let kept = if epoch == 0 {
                set(&guest, &[])
            } else {
                set(&guest, &[1, 2])
            };
            assert_eq!(hot.kept(), &kept, "epoch {epoch}");
        }
        assert_eq!(staging.read_obj::<u64>(page(2)).unwrap(), 22);
        // Epoch 2: page 2 rewritten while writable (unlogged, but kept pages are always
        // reported); page 1 untouched; page 3 logged.
        guest.write_obj(23u64, page(2)).unwrap();
        guest.write_obj(33u64, page(3)).unwrap();
        let dirty = stage(&mut hot, &guest, &staging, &[1, 2, 3]);
        assert_eq!(
            dirty,
            set(&guest, &[2, 3]),
            "the unchanged kept page is not sent"
        );
        assert_eq!(staging.read_obj::<u64>(page(2)).unwrap(), 23);
        assert_eq!(staging.read_obj::<u64>(page(3)).unwrap(), 33);
        hot.update(2, &dirty, None);
        assert!(
            hot.summary().contains("found 1 changed"),
            "{}",
            hot.summary()
        );
    }

    #[test]
    fn pages_that_stop_changing_are_rearmed_and_the_set_is_bounded() {
        // A 20 us budget at the initial 400 ns a compare: room for 50 pages.
        let (guest, staging, mut hot) = rig(Duration::from_micros(400), true);
        let all: Vec<u64> = (0..64).collect();
        for epoch in 0..2 {
            for &p in &all {
                guest.write_obj(epoch + 1, page(p)).unwrap();
            }
            let dirty = stage(&mut hot, &guest, &staging, &all);
            hot.update(epoch, &dirty, None);
        }
        assert!(
            hot.kept().count() > 0,
            "pages changed twice in a row are kept"
        );
        let room = (hot.budget.as_nanos() / hot.compare_cost.as_nanos()) as u64;
        assert!(
            hot.kept().count() <= room.max(1),
            "{} kept",
            hot.kept().count()
        );
        // Nothing changes for MAX_WINDOW epochs: every page goes back to the log.
        for epoch in 2..2 + MAX_WINDOW {
            let reported = hot.kept().clone();
            let dirty = hot
                .stage(&guest, &staging, reported, &mut StagingCopier::alone())
                .unwrap();
            assert!(dirty.is_empty(), "unchanged kept pages were sent");
            hot.update(epoch, &dirty, None);
        }
        assert!(hot.kept().is_empty(), "{} still kept", hot.kept().count());
    }

    #[test]
    fn pages_only_devices_wrote_are_not_kept() {
        let (guest, staging, mut hot) = rig(Duration::from_millis(10), true);
        for epoch in 0..2 {
            guest.write_obj(11 + epoch, page(1)).unwrap();
            guest.write_obj(22 + epoch, page(2)).unwrap();
            let dirty = stage(&mut hot, &guest, &staging, &[1, 2]);
            // The guest wrote page 1; page 2 is a receive buffer a device filled.
            hot.update(epoch, &dirty, Some(&set(&guest, &[1])));
            assert_eq!(dirty, set(&guest, &[1, 2]), "both are still sent");
        }
        assert_eq!(hot.kept(), &set(&guest, &[1]));
    }

    #[test]
    fn a_sweep_through_a_large_region_keeps_nothing() {
        // The guest rewrites 8 of 64 pages per epoch in turn: each page changes again only
        // after 8 epochs, beyond the window at the initial compare cost (5 epochs).
        let (guest, staging, mut hot) = rig(Duration::from_millis(10), true);
        for epoch in 0..40u64 {
            let pages: Vec<u64> = (0..8).map(|i| (epoch * 8 + i) % 64).collect();
            for &p in &pages {
                guest.write_obj(epoch + 1, page(p)).unwrap();
            }
            let dirty = stage_with_kept(&mut hot, &guest, &staging, &pages);
            assert_eq!(dirty, set(&guest, &pages), "epoch {epoch}");
            hot.update(epoch, &dirty, None);
            assert!(hot.kept().is_empty(), "epoch {epoch}: {}", hot.summary());
        }
        // A page rewritten in consecutive epochs among them is kept.
        for epoch in 40..44u64 {
            guest.write_obj(epoch, page(63)).unwrap();
            let dirty = stage_with_kept(&mut hot, &guest, &staging, &[63]);
            hot.update(epoch, &dirty, None);
        }
        assert_eq!(hot.kept(), &set(&guest, &[63]));
    }

    #[test]
    fn without_manual_rearming_nothing_is_kept() {
        let (guest, staging, mut hot) = rig(Duration::from_millis(10), false);
        let dirty = stage(&mut hot, &guest, &staging, &[1, 2]);
        hot.update(1, &dirty, None);
        assert!(hot.kept().is_empty());
        assert_eq!(dirty, set(&guest, &[1, 2]));
    }
}
