//! The epoch-holding core shared by the network and disk holding gates.
//!
//! Output commit (the fault-tolerance promise): output a device produces during epoch E may
//! leave the host only after the backup holds E. The core therefore keeps every output item
//! tagged with the epoch it was produced in, and releases items strictly in production order
//! when the epoch loop reports an acknowledged epoch. Because epochs only grow and items are
//! appended in production order, what has left is always a prefix of what was produced.
//! The one exception is the network gate's ACK lane (pure TCP ACKs, see `epoch_net`), which
//! the sink keeps itself and releases through the `Sink` hooks.
//!
//! The state sits behind one mutex shared by the device (which produces output) and the epoch
//! loop (which commits). Releasing happens under that lock on purpose: a device producing output
//! while a commit is releasing would otherwise have to decide whether its item goes before or
//! after the held ones, and in pass-through mode it would overtake them.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// What a holding gate does with new output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateMode {
    /// Output is held per epoch until that epoch is committed (protected operation).
    Hold,
    /// Output goes straight through (no backup: the VM runs unprotected).
    PassThrough,
}

/// Bounds on what a holding gate keeps in memory.
///
/// Without a backup acknowledging epochs nothing would ever be released, so held output must be
/// bounded: the host must not run out of memory because a backup is slow. What happens on
/// overflow depends on the kind of output (see the gates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldLimits {
    /// Payload bytes held over all epochs.
    pub max_bytes: usize,
    /// Items (frames, writes, flush barriers) held over all epochs; bounds the index memory even
    /// for zero-length items.
    pub max_items: usize,
}

impl Default for HoldLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_items: 1 << 20,
        }
    }
}

/// What one release (a commit or the switch to pass-through) sent through the inner gate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseStats {
    /// Items with payload released (frames, writes).
    pub items: u64,
    /// Payload bytes released.
    pub bytes: u64,
    /// Flush barriers released (disk only).
    pub barriers: u64,
    /// Items the inner gate refused and that were dropped (network only: a lost frame is what
    /// networks do; a disk release stops at the first failure instead).
    pub failed: u64,
}

impl ReleaseStats {
    pub(crate) fn add(&mut self, other: &ReleaseStats) {
        self.items += other.items;
        self.bytes += other.bytes;
        self.barriers += other.barriers;
        self.failed += other.failed;
    }
}

/// What [`EpochControl::discard_uncommitted`] dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardStats {
    /// Items dropped (frames, writes, flush barriers).
    pub items: u64,
    /// Payload bytes dropped.
    pub bytes: u64,
}

/// Counters of a holding gate (monotonic since creation, except the `held_*` gauges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateStats {
    /// Items currently held in the epoch queues (ACK-lane items are in `lane_held`).
    pub held_items: u64,
    /// Payload bytes currently held.
    pub held_bytes: u64,
    /// Everything released so far (commits and the switch to pass-through).
    pub released: ReleaseStats,
    /// Items passed straight through in pass-through mode.
    pub passed_items: u64,
    /// Items refused because holding them would exceed [`HoldLimits`].
    pub over_limit_items: u64,
    /// Payload bytes refused because of [`HoldLimits`].
    pub over_limit_bytes: u64,
    /// Items dropped by [`EpochControl::discard_uncommitted`].
    pub discarded_items: u64,
    /// Payload bytes dropped by [`EpochControl::discard_uncommitted`].
    pub discarded_bytes: u64,
    /// Pure TCP ACKs released before their epoch committed (at once, or when the backup
    /// mirrored the input they depend on); counted neither in `released` nor in `passed_items`.
    /// ACKs of the lane that leave at their epoch's commit or at the switch to pass-through
    /// count in `released`. A lane ACK the inner gate refuses counts in `released.failed`; one
    /// sent at once that fails is reported to the device (its `tx_errors`).
    pub early_released: u64,
    /// Pure TCP ACKs currently waiting in the ACK lane (not included in `held_items`).
    pub lane_held: u64,
}

/// Errors of the epoch control API.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// Epoch numbers must grow: a repeated or older epoch would mix two epochs' output.
    #[error("epoch {next} does not follow the current epoch {current}")]
    NotIncreasing { current: u64, next: u64 },
    /// Only an ended epoch can have been acknowledged by the backup; committing the running
    /// epoch would release output the backup cannot hold yet.
    #[error("epoch {epoch} has not ended (the current epoch is {current})")]
    NotEnded { epoch: u64, current: u64 },
    /// The inner gate failed while releasing held output. The failed item and everything after
    /// it stay held, in order, so that a later commit retries them.
    #[error("releasing held output of epoch {epoch}: {source}")]
    Release {
        epoch: u64,
        #[source]
        source: io::Error,
    },
}

/// The inner-gate side of a holding gate: how one held item leaves.
pub(crate) trait Sink: Send + 'static {
    /// Per-item information besides the payload (e.g. the disk offset).
    type Meta: Copy + Send + 'static;
    /// A failed release stops releasing (disk: later writes must not overtake a failed one)
    /// instead of dropping the item and going on (network).
    const STOP_ON_ERROR: bool;

    /// Sends one item through the inner gate.
    fn release(&mut self, meta: &Self::Meta, data: &[u8]) -> io::Result<()>;

    /// Whether the item is a barrier (counted separately, carries no payload).
    fn is_barrier(_meta: &Self::Meta) -> bool {
        false
    }

    // Hooks for output the sink holds itself, outside the epoch queues (the network gate's
    // ACK lane). All are called under the core's lock.

    /// Epoch `epoch` was committed (after the queues of epochs `<= epoch` were released).
    fn on_commit(&mut self, _epoch: u64) -> ReleaseStats {
        ReleaseStats::default()
    }

    /// The backup holds every input frame with seq `<= seq`.
    fn on_mirrored(&mut self, _seq: u64) -> ReleaseStats {
        ReleaseStats::default()
    }

    /// The gate switched to pass-through (after the queues were released).
    fn on_passthrough(&mut self) -> ReleaseStats {
        ReleaseStats::default()
    }

    /// Uncommitted output is being discarded.
    fn on_discard(&mut self) -> DiscardStats {
        DiscardStats::default()
    }

    /// Items and payload bytes the sink holds itself (they count against the hold limits).
    fn own_held(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// One held item: its metadata and its payload's place in the epoch's arena.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held<M> {
    pub(crate) meta: M,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// One epoch's held output. Payloads are appended to one arena so that holding a frame costs
/// no allocation of its own (the arena grows geometrically and is reused across epochs).
pub(crate) struct EpochQueue<M> {
    pub(crate) epoch: u64,
    pub(crate) arena: Vec<u8>,
    pub(crate) items: Vec<Held<M>>,
    /// Items before this index have been released (a disk release can stop half-way).
    pub(crate) released: usize,
}

impl<M> EpochQueue<M> {
    pub(crate) fn pending(&self) -> &[Held<M>] {
        &self.items[self.released..]
    }
}

/// Emptied queues kept for reuse, so that steady-state epochs allocate nothing.
const SPARE_QUEUES: usize = 4;
/// A spare queue whose arena grew beyond this is freed instead of kept: one burst must not pin
/// its memory for the VM's lifetime.
const SPARE_ARENA_MAX: usize = 4 << 20;

/// The state behind a holding gate and its [`EpochControl`].
pub(crate) struct EpochCore<S: Sink> {
    pub(crate) sink: S,
    current: u64,
    /// The newest epoch committed so far (`None` before the first commit).
    committed: Option<u64>,
    mode: GateMode,
    limits: HoldLimits,
    /// Held epochs, oldest first; only epochs that produced output have a queue.
    pub(crate) queues: VecDeque<EpochQueue<S::Meta>>,
    spare: Vec<EpochQueue<S::Meta>>,
    stats: GateStats,
    /// Called when an epoch's first item is held (see [`EpochControl::set_on_first_held`]).
    on_first_held: Option<FirstHeld>,
}

/// A callback for the first item an epoch holds.
pub type FirstHeld = Arc<dyn Fn() + Send + Sync>;

/// Whether new output was passed on, held, or refused because of the hold limits.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Accepted {
    Passed,
    Held,
    OverLimit,
}

impl<S: Sink> EpochCore<S> {
    pub(crate) fn new(sink: S, first_epoch: u64, limits: HoldLimits) -> Self {
        Self {
            sink,
            current: first_epoch,
            committed: None,
            mode: GateMode::Hold,
            limits,
            queues: VecDeque::new(),
            spare: Vec::new(),
            stats: GateStats::default(),
            on_first_held: None,
        }
    }

    /// Takes new output: passes it through, holds it in the current epoch, or refuses it when
    /// holding it would exceed the limits (the caller decides what refusal means).
    pub(crate) fn accept(&mut self, meta: S::Meta, data: &[u8]) -> io::Result<Accepted> {
        if self.mode == GateMode::PassThrough {
            if !self.queues.is_empty() {
                // Output held when protection ended that could not leave then: it goes
                // first, or the new item is refused (the caller reports an I/O error) rather
                // than overtaking it.
                self.release_through(u64::MAX).map_err(|e| match e {
                    EpochError::Release { source, .. } => source,
                    other => io::Error::other(other.to_string()),
                })?;
            }
            return self.pass(meta, data);
        }
        if !self.fits(data.len()) {
            self.count_over_limit(data.len());
            return Ok(Accepted::OverLimit);
        }
        let current = self.current;
        if self.queues.back().is_none_or(|q| q.epoch != current) {
            let mut queue = self.spare.pop().unwrap_or_else(|| EpochQueue {
                epoch: current,
                arena: Vec::new(),
                items: Vec::new(),
                released: 0,
            });
            queue.epoch = current;
            self.queues.push_back(queue);
            if let Some(notify) = &self.on_first_held {
                notify();
            }
        }
        // The queue for the current epoch exists now; `if let` keeps this free of panics.
        if let Some(queue) = self.queues.back_mut() {
            let start = queue.arena.len();
            queue.arena.extend_from_slice(data);
            queue.items.push(Held {
                meta,
                start,
                len: data.len(),
            });
        }
        self.stats.held_items += 1;
        self.stats.held_bytes += data.len() as u64;
        Ok(Accepted::Held)
    }

    /// Whether one more item of `len` bytes stays within the limits, counting both the epoch
    /// queues and what the sink holds itself.
    pub(crate) fn fits(&self, len: usize) -> bool {
        let (own_items, own_bytes) = self.sink.own_held();
        let items = self.stats.held_items.saturating_add(own_items);
        let bytes = self
            .stats
            .held_bytes
            .saturating_add(own_bytes)
            .saturating_add(len as u64);
        bytes <= self.limits.max_bytes as u64 && items < self.limits.max_items as u64
    }

    pub(crate) fn count_over_limit(&mut self, len: usize) {
        self.stats.over_limit_items += 1;
        self.stats.over_limit_bytes += len as u64;
    }

    /// Counts an item the sink sent before its epoch committed.
    pub(crate) fn count_early(&mut self, step: &ReleaseStats) {
        self.stats.early_released += step.items;
        self.stats.released.failed += step.failed;
    }

    pub(crate) fn mode(&self) -> GateMode {
        self.mode
    }

    /// The epoch new output is attributed to.
    pub(crate) fn current(&self) -> u64 {
        self.current
    }

    /// Sends output on at once, whatever the mode (pass-through, or output a group member
    /// receives: the group rolls back together, so it need not wait).
    pub(crate) fn pass(&mut self, meta: S::Meta, data: &[u8]) -> io::Result<Accepted> {
        self.sink.release(&meta, data)?;
        self.stats.passed_items += 1;
        Ok(Accepted::Passed)
    }

    /// Releases, in order, every held item of epochs `<= upto`.
    fn release_through(&mut self, upto: u64) -> Result<ReleaseStats, EpochError> {
        let mut total = ReleaseStats::default();
        while let Some(queue) = self.queues.front_mut() {
            if queue.epoch > upto {
                break;
            }
            let epoch = queue.epoch;
            let mut step = ReleaseStats::default();
            let mut error = None;
            while queue.released < queue.items.len() {
                let item = queue.items[queue.released];
                let data = &queue.arena[item.start..item.start + item.len];
                match self.sink.release(&item.meta, data) {
                    Ok(()) if S::is_barrier(&item.meta) => step.barriers += 1,
                    Ok(()) => {
                        step.items += 1;
                        step.bytes += item.len as u64;
                    }
                    Err(e) if S::STOP_ON_ERROR => {
                        error = Some(e);
                        break;
                    }
                    Err(e) => {
                        log::debug!("dropping held output of epoch {epoch}: {e}");
                        step.failed += 1;
                    }
                }
                queue.released += 1;
                self.stats.held_items -= 1;
                self.stats.held_bytes -= item.len as u64;
            }
            total.add(&step);
            self.stats.released.add(&step);
            if let Some(source) = error {
                return Err(EpochError::Release { epoch, source });
            }
            if let Some(done) = self.queues.pop_front() {
                self.recycle(done);
            }
        }
        Ok(total)
    }

    fn recycle(&mut self, mut queue: EpochQueue<S::Meta>) {
        if self.spare.len() < SPARE_QUEUES && queue.arena.capacity() <= SPARE_ARENA_MAX {
            queue.arena.clear();
            queue.items.clear();
            queue.released = 0;
            self.spare.push(queue);
        }
    }

    fn current_epoch(&self) -> u64 {
        self.current
    }

    /// Hands the payloads `epoch` still holds to `visit`, in production order (barriers have
    /// none and are skipped).
    fn visit_held(&self, epoch: u64, visit: &mut dyn FnMut(&[u8])) {
        for queue in self.queues.iter().filter(|q| q.epoch == epoch) {
            for item in queue.pending() {
                if !S::is_barrier(&item.meta) {
                    visit(&queue.arena[item.start..item.start + item.len]);
                }
            }
        }
    }

    fn begin_epoch(&mut self, next: u64) -> Result<(), EpochError> {
        if next <= self.current {
            return Err(EpochError::NotIncreasing {
                current: self.current,
                next,
            });
        }
        self.current = next;
        Ok(())
    }

    fn commit(&mut self, epoch: u64) -> Result<ReleaseStats, EpochError> {
        if epoch >= self.current {
            return Err(EpochError::NotEnded {
                epoch,
                current: self.current,
            });
        }
        if self.committed.is_some_and(|c| c >= epoch) {
            // Acknowledgements can arrive late or twice; an older one releases nothing new.
            return Ok(ReleaseStats::default());
        }
        let mut stats = self.release_through(epoch)?;
        let own = self.sink.on_commit(epoch);
        self.stats.released.add(&own);
        stats.add(&own);
        // Recorded only after a complete release, so that a failed disk release is retried by
        // the next commit of this epoch instead of being taken as done.
        self.committed = Some(epoch);
        Ok(stats)
    }

    fn set_mode(&mut self, mode: GateMode) -> Result<ReleaseStats, EpochError> {
        let previous = self.mode;
        self.mode = mode;
        if mode == GateMode::PassThrough && previous == GateMode::Hold {
            // Held output first, so that nothing new overtakes it. What fails to leave stays
            // queued, and the gate passes through anyway: protection has ended, so nothing
            // may stay held for a commit that never comes. Each new item retries the backlog
            // first (see `accept`).
            let released = self.release_through(u64::MAX);
            let own = self.sink.on_passthrough();
            self.stats.released.add(&own);
            return released.map(|mut stats| {
                stats.add(&own);
                stats
            });
        }
        Ok(ReleaseStats::default())
    }

    fn discard_uncommitted(&mut self) -> DiscardStats {
        let mut dropped = DiscardStats::default();
        while let Some(queue) = self.queues.pop_front() {
            for item in queue.pending() {
                dropped.items += 1;
                dropped.bytes += item.len as u64;
            }
            self.recycle(queue);
        }
        self.stats.held_items = 0;
        self.stats.held_bytes = 0;
        let own = self.sink.on_discard();
        dropped.items += own.items;
        dropped.bytes += own.bytes;
        self.stats.discarded_items += dropped.items;
        self.stats.discarded_bytes += dropped.bytes;
        dropped
    }
}

/// Locks the core. A panic while the lock was held (only possible inside an inner gate) leaves
/// the state consistent, because every step of a release updates queue and counters together;
/// so a poisoned lock is used as is rather than turning every later call into a panic.
pub(crate) fn lock<S: Sink>(core: &Mutex<EpochCore<S>>) -> MutexGuard<'_, EpochCore<S>> {
    core.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Object-safe view of a core, so that one control type serves every kind of holding gate (the
/// epoch loop keeps a list of them, one per device).
trait Controlled: Send + Sync {
    fn current_epoch(&self) -> u64;
    fn begin_epoch(&self, next: u64) -> Result<(), EpochError>;
    fn commit(&self, epoch: u64) -> Result<ReleaseStats, EpochError>;
    fn set_mode(&self, mode: GateMode) -> Result<ReleaseStats, EpochError>;
    fn mode(&self) -> GateMode;
    fn discard_uncommitted(&self) -> DiscardStats;
    fn visit_held(&self, epoch: u64, visit: &mut dyn FnMut(&[u8]));
    fn input_mirrored(&self, seq: u64) -> ReleaseStats;
    fn set_on_first_held(&self, notify: Option<FirstHeld>);
    fn drain(&self) -> Result<ReleaseStats, EpochError>;
    fn last_committed(&self) -> Option<u64>;
    fn stats(&self) -> GateStats;
}

impl<S: Sink> Controlled for Mutex<EpochCore<S>> {
    fn current_epoch(&self) -> u64 {
        lock(self).current_epoch()
    }
    fn begin_epoch(&self, next: u64) -> Result<(), EpochError> {
        lock(self).begin_epoch(next)
    }
    fn commit(&self, epoch: u64) -> Result<ReleaseStats, EpochError> {
        lock(self).commit(epoch)
    }
    fn set_mode(&self, mode: GateMode) -> Result<ReleaseStats, EpochError> {
        lock(self).set_mode(mode)
    }
    fn mode(&self) -> GateMode {
        lock(self).mode
    }
    fn discard_uncommitted(&self) -> DiscardStats {
        lock(self).discard_uncommitted()
    }
    fn visit_held(&self, epoch: u64, visit: &mut dyn FnMut(&[u8])) {
        lock(self).visit_held(epoch, visit)
    }
    fn input_mirrored(&self, seq: u64) -> ReleaseStats {
        let mut core = lock(self);
        let step = core.sink.on_mirrored(seq);
        core.count_early(&step);
        step
    }
    fn set_on_first_held(&self, notify: Option<FirstHeld>) {
        lock(self).on_first_held = notify;
    }
    fn drain(&self) -> Result<ReleaseStats, EpochError> {
        let mut core = lock(self);
        if core.mode == GateMode::PassThrough {
            core.release_through(u64::MAX)
        } else {
            Ok(ReleaseStats::default())
        }
    }
    fn last_committed(&self) -> Option<u64> {
        lock(self).committed
    }
    fn stats(&self) -> GateStats {
        let core = lock(self);
        let mut stats = core.stats;
        stats.lane_held = core.sink.own_held().0;
        stats
    }
}

/// The epoch loop's handle on a holding gate (cloneable; all clones control the same gate).
#[derive(Clone)]
pub struct EpochControl {
    core: Arc<dyn Controlled>,
}

impl std::fmt::Debug for EpochControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochControl")
            .field("current_epoch", &self.current_epoch())
            .field("mode", &self.mode())
            .finish()
    }
}

impl EpochControl {
    pub(crate) fn new<S: Sink>(core: Arc<Mutex<EpochCore<S>>>) -> Self {
        Self { core }
    }

    /// The epoch new output is attributed to.
    pub fn current_epoch(&self) -> u64 {
        self.core.current_epoch()
    }

    /// Starts epoch `next` (call at the epoch boundary, while the VM is paused): output produced
    /// from now on belongs to `next`. `next` must be greater than the current epoch.
    pub fn begin_epoch(&self, next: u64) -> Result<(), EpochError> {
        self.core.begin_epoch(next)
    }

    /// The backup acknowledged `epoch`: releases, in production order, all held output of
    /// `epoch` and every earlier epoch. Committing an epoch at or before the newest committed one
    /// is a no-op; committing the running epoch (or a later one) is an error.
    pub fn commit(&self, epoch: u64) -> Result<ReleaseStats, EpochError> {
        self.core.commit(epoch)
    }

    /// The newest committed epoch, if any.
    pub fn last_committed(&self) -> Option<u64> {
        self.core.last_committed()
    }

    /// Switches mode. To [`GateMode::PassThrough`]: releases everything held (all epochs, in
    /// order) and from then on passes output straight through; if a release fails (an error is
    /// returned) the rest stays queued and each new item retries it first, so nothing
    /// overtakes it and nothing stays held for good. To [`GateMode::Hold`]: output from now on
    /// is held in the current epoch.
    pub fn set_mode(&self, mode: GateMode) -> Result<ReleaseStats, EpochError> {
        self.core.set_mode(mode)
    }

    /// The backup is gone: continue unprotected (a dead backup never stops the primary).
    /// Same as `set_mode(GateMode::PassThrough)`.
    pub fn passthrough(&self) -> Result<ReleaseStats, EpochError> {
        self.set_mode(GateMode::PassThrough)
    }

    /// The current mode.
    pub fn mode(&self) -> GateMode {
        self.core.mode()
    }

    /// Drops all held output without releasing it: for a primary that lost a fencing decision,
    /// whose uncommitted output must never leave. The gate keeps its mode.
    pub fn discard_uncommitted(&self) -> DiscardStats {
        self.core.discard_uncommitted()
    }

    /// Hands what epoch `epoch` still holds to `visit`, payload by payload in production order,
    /// under the gate's lock (`visit` must only copy): fault tolerance ships an ended epoch's
    /// frames to the backup, which sends them again if it takes over from that epoch before
    /// they left here. Nothing for an epoch that is released, discarded or held no output; the
    /// ACK lane's frames are not included.
    pub fn for_each_held(&self, epoch: u64, visit: &mut dyn FnMut(&[u8])) {
        self.core.visit_held(epoch, visit)
    }

    /// The backup holds every input frame (see [`super::InputLog`]) with seq `<= seq`: releases,
    /// in order, the pure TCP ACKs of the network gate's ACK lane that waited for no more than
    /// that. Returns what left. A no-op for disks and for a network gate without an input log.
    pub fn input_mirrored(&self, seq: u64) -> ReleaseStats {
        self.core.input_mirrored(seq)
    }

    /// Calls `notify` (under the gate's lock: it must only signal) whenever an epoch holds its
    /// first item, so that the epoch loop can end an epoch early while output waits (latency
    /// mode). None: no more calls.
    pub fn set_on_first_held(&self, notify: Option<FirstHeld>) {
        self.core.set_on_first_held(notify)
    }

    /// A gate in pass-through whose held output failed to leave when protection ended: try
    /// again now (without waiting for the next new item). Nothing to do in hold mode.
    pub fn drain(&self) -> Result<ReleaseStats, EpochError> {
        self.core.drain()
    }

    /// The gate's counters.
    pub fn stats(&self) -> GateStats {
        self.core.stats()
    }
}
