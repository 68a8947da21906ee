//! The epoch-holding network gate.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, RwLock};

use super::epoch::{
    lock, Accepted, DiscardStats, EpochControl, EpochCore, GateMode, HoldLimits, ReleaseStats, Sink,
};
use super::{is_pure_tcp_ack, InputLog, NetOutputGate};

/// A pure TCP ACK waiting in the ACK lane.
struct LaneItem {
    /// The epoch it was produced in: its commit releases it whatever the input log says.
    epoch: u64,
    /// [`InputLog::ack_tag`] when it was produced (the newest input frame carrying bytes it
    /// acknowledges): it may leave once the backup holds every input frame up to this one.
    tag: u64,
    frame: Vec<u8>,
}

/// The TAP side of the network gate, with the ACK lane ("TCP at full speed").
///
/// Ordering: pure ACKs may overtake the guest's data frames still held for their epoch. That
/// is safe: TCP accepts an ACK whose sequence number is ahead of data it has not seen yet
/// (within the window), and an early ACK only covers input frames the backup already holds;
/// at failover the backup replays every one of them into its restored guest, so nothing the
/// peer was told is delivered is lost. Within the lane ACKs keep their order (FIFO).
struct NetSink {
    inner: Box<dyn NetOutputGate>,
    input_log: Option<Arc<InputLog>>,
    lane: VecDeque<LaneItem>,
    lane_bytes: u64,
}

impl NetSink {
    fn new(inner: Box<dyn NetOutputGate>) -> Self {
        Self {
            inner,
            input_log: None,
            lane: VecDeque::new(),
            lane_bytes: 0,
        }
    }

    /// Sends lane items, oldest first, while `ready` says the oldest may leave.
    fn release_lane(&mut self, ready: impl Fn(&LaneItem) -> bool) -> ReleaseStats {
        let mut step = ReleaseStats::default();
        while self.lane.front().is_some_and(&ready) {
            let Some(item) = self.lane.pop_front() else {
                break;
            };
            self.lane_bytes -= item.frame.len() as u64;
            match self.inner.transmit(&item.frame) {
                Ok(()) => {
                    step.items += 1;
                    step.bytes += item.frame.len() as u64;
                }
                Err(e) => {
                    // Lost like any refused frame (see STOP_ON_ERROR).
                    log::debug!("dropping a held TCP ACK: {e}");
                    step.failed += 1;
                }
            }
        }
        step
    }
}

impl Sink for NetSink {
    type Meta = ();
    // A frame the TAP refuses is lost, as on any congested link; stopping would hold every
    // later frame hostage to one bad one.
    const STOP_ON_ERROR: bool = false;

    fn release(&mut self, _meta: &(), data: &[u8]) -> io::Result<()> {
        self.inner.transmit(data)
    }

    fn on_commit(&mut self, epoch: u64) -> ReleaseStats {
        self.release_lane(|item| item.epoch <= epoch)
    }

    fn on_mirrored(&mut self, seq: u64) -> ReleaseStats {
        self.release_lane(|item| item.tag <= seq)
    }

    fn on_passthrough(&mut self) -> ReleaseStats {
        self.release_lane(|_| true)
    }

    fn on_discard(&mut self) -> DiscardStats {
        let dropped = DiscardStats {
            items: self.lane.len() as u64,
            bytes: self.lane_bytes,
        };
        self.lane.clear();
        self.lane_bytes = 0;
        dropped
    }

    fn own_held(&self) -> (u64, u64) {
        (self.lane.len() as u64, self.lane_bytes)
    }
}

/// The MAC addresses of the other VMs of a fault-tolerance group (fate sharing): frames to
/// them leave at once, since sender and receiver always roll back to the same epoch. Clones
/// share one list; it is empty (everything held) outside a group.
#[derive(Clone, Debug, Default)]
pub struct GroupPeers(Arc<RwLock<Vec<[u8; 6]>>>);

impl GroupPeers {
    /// Replaces the list.
    pub fn set(&self, macs: Vec<[u8; 6]>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = macs;
    }

    pub fn get(&self) -> Vec<[u8; 6]> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `frame` is addressed (unicast) to a group member.
    fn addressed_to_member(&self, frame: &[u8]) -> bool {
        let Some(dest) = frame.get(..6) else {
            return false;
        };
        let peers = self.0.read().unwrap_or_else(|p| p.into_inner());
        !peers.is_empty() && peers.iter().any(|mac| mac[..] == *dest)
    }
}

/// A network output gate that holds each epoch's frames until the epoch is committed
/// (see [`EpochControl`]), then sends them through the wrapped gate in production order.
///
/// Over the hold limits the newest frame is dropped (and counted): a dropped packet is
/// recovered by the guest's TCP, unbounded memory for a slow backup is not recoverable.
pub struct EpochNetGate {
    core: Arc<Mutex<EpochCore<NetSink>>>,
    peers: GroupPeers,
}

impl EpochNetGate {
    /// Wraps `inner`, holding output from `first_epoch` on with the default limits.
    pub fn new(inner: Box<dyn NetOutputGate>, first_epoch: u64) -> (Self, EpochControl) {
        Self::with_limits(inner, first_epoch, HoldLimits::default())
    }

    /// Like [`EpochNetGate::new`] with explicit hold limits.
    pub fn with_limits(
        inner: Box<dyn NetOutputGate>,
        first_epoch: u64,
        limits: HoldLimits,
    ) -> (Self, EpochControl) {
        let core = Arc::new(Mutex::new(EpochCore::new(
            NetSink::new(inner),
            first_epoch,
            limits,
        )));
        let control = EpochControl::new(core.clone());
        let peers = GroupPeers::default();
        (Self { core, peers }, control)
    }

    /// Frames addressed to a MAC in `peers` are not held (see [`GroupPeers`]).
    pub fn with_group_peers(mut self, peers: GroupPeers) -> Self {
        self.peers = peers;
        self
    }

    /// Enables the ACK lane: while the gate holds and `log` is not stopped, a pure TCP ACK
    /// leaves as soon as the backup holds every input frame delivered before it (see
    /// [`EpochControl::input_mirrored`]) or its epoch commits, whichever comes first.
    pub fn with_input_log(self, log: Arc<InputLog>) -> Self {
        lock(&self.core).sink.input_log = Some(log);
        self
    }
}

/// What the ACK lane did with a frame (`None`: not the lane's business).
fn ack_lane(core: &mut EpochCore<NetSink>, frame: &[u8]) -> Option<io::Result<()>> {
    if core.mode() != GateMode::Hold {
        return None;
    }
    let log = core.sink.input_log.as_ref().filter(|l| !l.is_stopped())?;
    if !is_pure_tcp_ack(frame) {
        return None;
    }
    let tag = log.ack_tag(frame);
    if core.sink.lane.is_empty() && log.mirrored() >= tag {
        // Counted in `early_released` only (not in `passed_items`): it left before its epoch
        // committed.
        if let Err(e) = core.sink.inner.transmit(frame) {
            return Some(Err(e));
        }
        core.count_early(&ReleaseStats {
            items: 1,
            bytes: frame.len() as u64,
            ..ReleaseStats::default()
        });
        return Some(Ok(()));
    }
    if !core.fits(frame.len()) {
        // Dropped like any frame over the limits (see `transmit`).
        core.count_over_limit(frame.len());
        return Some(Ok(()));
    }
    let epoch = core.current();
    core.sink.lane_bytes += frame.len() as u64;
    core.sink.lane.push_back(LaneItem {
        epoch,
        tag,
        frame: frame.to_vec(),
    });
    Some(Ok(()))
}

impl NetOutputGate for EpochNetGate {
    fn transmit(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut core = lock(&self.core);
        let accepted = if self.peers.addressed_to_member(frame) {
            core.pass((), frame)?
        } else if let Some(result) = ack_lane(&mut core, frame) {
            return result;
        } else {
            core.accept((), frame)?
        };
        match accepted {
            Accepted::Passed | Accepted::Held => Ok(()),
            // Reported as sent: the device's job is done, the frame is lost on the way, which
            // the guest's protocols handle. The drop is counted in the gate's stats.
            Accepted::OverLimit => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::ack_index::tests::{guest_ack, input_segment};
    use crate::gate::tcp_ack::tests::ipv4_tcp_frame;

    /// Records transmitted frames.
    #[derive(Clone, Default)]
    struct Wire {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Wire {
        fn sent(&self) -> Vec<Vec<u8>> {
            self.sent.lock().unwrap().clone()
        }
    }

    impl NetOutputGate for Wire {
        fn transmit(&mut self, frame: &[u8]) -> io::Result<()> {
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    /// A pure ACK told apart from others by its source port.
    /// A pure ACK of everything [`input`] delivers, told apart by its IP identification.
    fn ack(id: u16) -> Vec<u8> {
        let mut f = guest_ack(80, 1 << 20);
        f[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
        f
    }

    /// An input frame carrying bytes every [`ack`] acknowledges.
    fn input() -> Vec<u8> {
        input_segment(80, 0, 100)
    }

    fn data(id: u16) -> Vec<u8> {
        let mut f = ipv4_tcp_frame(0x18, 0, 100);
        f[14 + 20..14 + 22].copy_from_slice(&id.to_be_bytes());
        f
    }

    fn gate_with_log(limits: HoldLimits) -> (EpochNetGate, EpochControl, Wire, Arc<InputLog>) {
        let wire = Wire::default();
        let (gate, control) = EpochNetGate::with_limits(Box::new(wire.clone()), 1, limits);
        let log = InputLog::new(1, 1 << 20);
        (gate.with_input_log(log.clone()), control, wire, log)
    }

    fn gate() -> (EpochNetGate, EpochControl, Wire, Arc<InputLog>) {
        gate_with_log(HoldLimits::default())
    }

    fn held_of(control: &EpochControl, epoch: u64) -> Vec<Vec<u8>> {
        let mut held = Vec::new();
        control.for_each_held(epoch, &mut |frame| held.push(frame.to_vec()));
        held
    }

    #[test]
    fn an_ended_epochs_held_frames_are_visited_in_order_until_they_leave() {
        let (mut gate, control, wire, log) = gate();
        gate.transmit(&data(1)).unwrap();
        assert!(log.record(0, &input(), Vec::new()));
        // A pure ACK goes to the lane, not to the epoch's queue.
        gate.transmit(&ack(9)).unwrap();
        gate.transmit(&data(2)).unwrap();
        control.begin_epoch(2).unwrap();
        gate.transmit(&data(3)).unwrap();
        assert_eq!(held_of(&control, 1), vec![data(1), data(2)]);
        assert_eq!(held_of(&control, 2), vec![data(3)]);
        assert!(held_of(&control, 7).is_empty());
        control.begin_epoch(3).unwrap();
        control.commit(1).unwrap();
        assert_eq!(wire.sent(), vec![data(1), data(2), ack(9)]);
        assert!(held_of(&control, 1).is_empty());
        assert_eq!(held_of(&control, 2), vec![data(3)]);
        control.discard_uncommitted();
        assert!(held_of(&control, 2).is_empty());
    }

    #[test]
    fn held_ack_leaves_when_its_input_is_mirrored_and_not_before() {
        let (mut gate, control, wire, log) = gate();
        assert!(log.record(0, &input(), Vec::new()));
        assert!(log.record(0, &input(), Vec::new()));
        gate.transmit(&ack(1)).unwrap();
        assert!(wire.sent().is_empty());
        assert_eq!(control.stats().lane_held, 1);
        assert_eq!(control.stats().held_items, 0);
        log.set_mirrored(1);
        assert_eq!(control.input_mirrored(1).items, 0);
        assert!(wire.sent().is_empty());
        log.set_mirrored(2);
        let step = control.input_mirrored(2);
        assert_eq!(step.items, 1);
        assert_eq!(wire.sent(), vec![ack(1)]);
        let stats = control.stats();
        assert_eq!(stats.early_released, 1);
        assert_eq!(stats.lane_held, 0);
        assert_eq!(stats.released.items, 0);
        assert_eq!(stats.passed_items, 0);
    }

    #[test]
    fn an_ack_waits_only_for_the_input_it_acknowledges() {
        let (mut gate, control, wire, log) = gate();
        assert!(log.record(0, &input_segment(80, 0, 100), Vec::new()));
        assert!(log.record(0, &input_segment(80, 100, 100), Vec::new()));
        assert!(log.record(0, &input_segment(81, 0, 100), Vec::new()));
        let first = guest_ack(80, 100);
        gate.transmit(&first).unwrap();
        log.set_mirrored(1);
        assert_eq!(control.input_mirrored(1).items, 1);
        assert_eq!(
            wire.sent(),
            vec![first.clone()],
            "frames 2 and 3 are not acknowledged"
        );
        let second = guest_ack(80, 200);
        gate.transmit(&second).unwrap();
        assert_eq!(control.stats().lane_held, 1);
        log.set_mirrored(2);
        assert_eq!(control.input_mirrored(2).items, 1);
        assert_eq!(wire.sent(), vec![first, second]);
    }

    #[test]
    fn ack_whose_input_is_already_mirrored_leaves_at_once() {
        let (mut gate, control, wire, log) = gate();
        assert!(log.record(0, &input(), Vec::new()));
        log.set_mirrored(1);
        gate.transmit(&ack(1)).unwrap();
        assert_eq!(wire.sent(), vec![ack(1)]);
        assert_eq!(control.stats().early_released, 1);
        assert_eq!(control.stats().passed_items, 0);
    }

    #[test]
    fn held_ack_leaves_at_the_commit_of_its_epoch_without_mirroring() {
        let (mut gate, control, wire, log) = gate();
        assert!(log.record(0, &input(), Vec::new()));
        gate.transmit(&ack(1)).unwrap();
        control.begin_epoch(2).unwrap();
        assert!(log.record(0, &input(), Vec::new()));
        gate.transmit(&ack(2)).unwrap();
        control.begin_epoch(3).unwrap();
        let step = control.commit(1).unwrap();
        assert_eq!(step.items, 1);
        assert_eq!(wire.sent(), vec![ack(1)]);
        control.commit(2).unwrap();
        assert_eq!(wire.sent(), vec![ack(1), ack(2)]);
        let stats = control.stats();
        assert_eq!(stats.released.items, 2);
        assert_eq!(stats.early_released, 0);
        assert_eq!(stats.lane_held, 0);
    }

    #[test]
    fn data_frames_are_still_held_until_commit() {
        let (mut gate, control, wire, log) = gate();
        assert!(log.record(0, &input(), Vec::new()));
        log.set_mirrored(1);
        gate.transmit(&data(1)).unwrap();
        gate.transmit(&ack(2)).unwrap();
        // The ACK overtakes the held data frame (see `NetSink`).
        assert_eq!(wire.sent(), vec![ack(2)]);
        assert_eq!(control.input_mirrored(5).items, 0);
        assert_eq!(control.stats().held_items, 1);
        control.begin_epoch(2).unwrap();
        control.commit(1).unwrap();
        assert_eq!(wire.sent(), vec![ack(2), data(1)]);
    }

    #[test]
    fn the_first_held_frame_of_each_epoch_is_announced_once() {
        let (mut gate, control, _wire, log) = gate();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = calls.clone();
        control.set_on_first_held(Some(Arc::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })));
        let count = || calls.load(std::sync::atomic::Ordering::SeqCst);
        // A pure ACK that leaves early is not waiting output.
        log.set_mirrored(log.delivered());
        gate.transmit(&ack(1)).unwrap();
        assert_eq!(count(), 0);
        gate.transmit(&data(1)).unwrap();
        gate.transmit(&data(2)).unwrap();
        assert_eq!(count(), 1);
        control.begin_epoch(2).unwrap();
        gate.transmit(&data(3)).unwrap();
        assert_eq!(count(), 2);
        control.set_on_first_held(None);
        control.begin_epoch(3).unwrap();
        gate.transmit(&data(4)).unwrap();
        assert_eq!(count(), 2);
    }

    #[test]
    fn lane_is_fifo() {
        let (mut gate, control, wire, log) = gate();
        assert!(log.record(0, &input(), Vec::new()));
        gate.transmit(&ack(1)).unwrap();
        // Mirrored, but not yet reported to the gate: the next ACK's input is mirrored, yet it
        // must queue behind the first one instead of overtaking it.
        log.set_mirrored(1);
        gate.transmit(&ack(2)).unwrap();
        assert!(wire.sent().is_empty());
        assert_eq!(control.input_mirrored(1).items, 2);
        assert_eq!(wire.sent(), vec![ack(1), ack(2)]);
    }

    #[test]
    fn a_later_ack_with_a_smaller_tag_does_not_overtake() {
        let mut sink = NetSink::new(Box::new(Wire::default()));
        for (tag, id) in [(5, 1), (1, 2)] {
            let frame = ack(id);
            sink.lane_bytes += frame.len() as u64;
            sink.lane.push_back(LaneItem {
                epoch: 1,
                tag,
                frame,
            });
        }
        assert_eq!(sink.on_mirrored(1).items, 0);
        assert_eq!(sink.own_held().0, 2);
        assert_eq!(sink.on_mirrored(5).items, 2);
        assert_eq!(sink.own_held(), (0, 0));
    }

    #[test]
    fn passthrough_releases_the_lane() {
        let (mut gate, control, wire, log) = gate();
        assert!(log.record(0, &input(), Vec::new()));
        gate.transmit(&data(1)).unwrap();
        gate.transmit(&ack(2)).unwrap();
        let step = control.passthrough().unwrap();
        assert_eq!(step.items, 2);
        assert_eq!(wire.sent(), vec![data(1), ack(2)]);
        assert_eq!(control.stats().lane_held, 0);
        // Pass-through: ACKs pass like everything else.
        gate.transmit(&ack(3)).unwrap();
        assert_eq!(control.stats().passed_items, 1);
    }

    #[test]
    fn discard_drops_the_lane_and_counts_it() {
        let (mut gate, control, wire, log) = gate();
        assert!(log.record(0, &input(), Vec::new()));
        gate.transmit(&data(1)).unwrap();
        gate.transmit(&ack(2)).unwrap();
        let dropped = control.discard_uncommitted();
        assert_eq!(dropped.items, 2);
        assert_eq!(dropped.bytes, (data(1).len() + ack(2).len()) as u64);
        let stats = control.stats();
        assert_eq!(stats.discarded_items, 2);
        assert_eq!(stats.lane_held, 0);
        assert_eq!(control.input_mirrored(u64::MAX).items, 0);
        assert!(wire.sent().is_empty());
    }

    #[test]
    fn lane_over_the_limits_drops_and_counts() {
        let limits = HoldLimits {
            max_bytes: 1 << 20,
            max_items: 2,
        };
        let (mut gate, control, wire, log) = gate_with_log(limits);
        assert!(log.record(0, &input(), Vec::new()));
        gate.transmit(&data(1)).unwrap();
        gate.transmit(&ack(2)).unwrap();
        // Queue and lane share the limits.
        gate.transmit(&ack(3)).unwrap();
        gate.transmit(&data(4)).unwrap();
        let stats = control.stats();
        assert_eq!(stats.held_items, 1);
        assert_eq!(stats.lane_held, 1);
        assert_eq!(stats.over_limit_items, 2);
        assert_eq!(
            stats.over_limit_bytes,
            (ack(3).len() + data(4).len()) as u64
        );
        control.input_mirrored(1);
        assert_eq!(wire.sent(), vec![ack(2)]);
    }

    #[test]
    fn ack_to_a_group_peer_passes_as_before() {
        let (gate, control, wire, log) = gate();
        let peers = GroupPeers::default();
        let frame = ack(1);
        let mut dest = [0u8; 6];
        dest.copy_from_slice(&frame[..6]);
        peers.set(vec![dest]);
        let mut gate = gate.with_group_peers(peers);
        assert!(log.record(0, &input(), Vec::new()));
        gate.transmit(&frame).unwrap();
        assert_eq!(wire.sent(), vec![frame]);
        let stats = control.stats();
        assert_eq!(stats.passed_items, 1);
        assert_eq!(stats.early_released, 0);
        assert_eq!(stats.lane_held, 0);
    }

    #[test]
    fn without_an_input_log_acks_are_held_like_any_frame() {
        let wire = Wire::default();
        let (mut gate, control) = EpochNetGate::new(Box::new(wire.clone()), 1);
        gate.transmit(&ack(1)).unwrap();
        assert_eq!(control.input_mirrored(u64::MAX).items, 0);
        assert!(wire.sent().is_empty());
        let stats = control.stats();
        assert_eq!(stats.held_items, 1);
        assert_eq!(stats.lane_held, 0);
        control.begin_epoch(2).unwrap();
        control.commit(1).unwrap();
        assert_eq!(wire.sent(), vec![ack(1)]);
    }

    #[test]
    fn a_stopped_log_turns_the_lane_off() {
        let (mut gate, control, wire, log) = gate();
        log.stop();
        gate.transmit(&ack(1)).unwrap();
        assert!(wire.sent().is_empty());
        assert_eq!(control.stats().held_items, 1);
        assert_eq!(control.stats().lane_held, 0);
    }
}
