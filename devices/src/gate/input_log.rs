//! The input log of "TCP at full speed": every frame delivered to the guest, numbered in
//! delivery order over all NICs, for the fault-tolerance code to mirror to the backup. A
//! frame is logged as the guest's buffer receives it: virtio-net header, then Ethernet frame.
//!
//! A pure TCP ACK the guest sends may leave before its epoch commits once the backup holds every
//! input frame carrying bytes it acknowledges (see [`super::EpochNetGate`] and
//! [`InputLog::ack_tag`]): at failover the backup replays those frames into its restored guest,
//! so whatever the ACK acknowledged is received again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::ack_index::AckIndex;
use super::{FramePool, NetInputRecorder};

/// Spare frame buffers the log keeps for reuse, at most (a few epochs of a bulk transfer's
/// frames in flight to the backup).
const SPARE_BYTES: usize = 8 << 20;

/// Frames whose wait for the backup is timed, at most: past it the oldest go untimed (a
/// backup that stopped answering input would otherwise grow the queue for as long as the
/// link lives).
const MAX_TIMED: usize = 64 * 1024;

/// One frame delivered to the guest, numbered in delivery order over all NICs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedFrame {
    pub seq: u64,
    pub nic: u32,
    pub epoch: u64,
    pub data: Vec<u8>,
    /// Where the guest's buffer holds `data`: (guest address, bytes) segments in order,
    /// covering it exactly. Known where the frame was recorded (the primary's NICs), empty
    /// where it came from the wire.
    pub placed: Vec<(u64, u32)>,
}

struct State {
    epoch: u64,
    /// Seq of the newest recorded frame.
    last_seq: u64,
    /// Recorded frames not yet taken by the sender, oldest first.
    pending: VecDeque<LoggedFrame>,
    pending_bytes: usize,
    /// Buffers of frames the sender is done with (see [`InputLog::recycle`]).
    pool: FramePool,
    /// Which frames each early ACK needs (see [`InputLog::ack_tag`]).
    acks: AckIndex,
    /// (seq, when recorded) of the frames the backup is not known to hold, oldest first:
    /// how long each waited for it is what an early ACK of it waited.
    unmirrored: VecDeque<(u64, Instant)>,
}

/// A frame to record: its bytes, or a device's buffer holding it first.
enum Frame<'a> {
    Slice(&'a [u8]),
    Buffer(&'a mut Vec<u8>, usize),
}

impl Frame<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Frame::Slice(bytes) => bytes,
            Frame::Buffer(buffer, len) => &buffer[..(*len).min(buffer.len())],
        }
    }
}

/// The shared input log (one per VM, shared by its NICs and the FT sender).
pub struct InputLog {
    state: Mutex<State>,
    max_pending_bytes: usize,
    notify: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Mirrors `State::last_seq`, readable without the lock (the net gate asks per ACK).
    delivered: AtomicU64,
    mirrored: AtomicU64,
    stopped: AtomicBool,
    recorded: AtomicU64,
    refused: AtomicU64,
}

impl InputLog {
    /// `max_pending_bytes`: bound on frames recorded but not yet taken by the sender.
    pub fn new(first_epoch: u64, max_pending_bytes: usize) -> Arc<InputLog> {
        Arc::new(InputLog {
            state: Mutex::new(State {
                epoch: first_epoch,
                last_seq: 0,
                pending: VecDeque::new(),
                pending_bytes: 0,
                pool: FramePool::new(SPARE_BYTES),
                acks: AckIndex::default(),
                unmirrored: VecDeque::new(),
            }),
            max_pending_bytes,
            notify: Mutex::new(None),
            delivered: AtomicU64::new(0),
            mirrored: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            recorded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called (outside any lock of the log) after a frame was recorded and the pending queue
    /// was empty before: wakes the FT sender.
    pub fn set_notify(&self, notify: Box<dyn Fn() + Send + Sync>) {
        *self.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::from(notify));
    }

    /// Epoch boundary: frames recorded from now on belong to `epoch`.
    pub fn begin_epoch(&self, epoch: u64) {
        self.state().epoch = epoch;
    }

    /// Records a frame the device is about to deliver; seq = previous + 1 (first is 1).
    ///
    /// Returns false (nothing recorded, seq unchanged) when the pending bytes would exceed the
    /// bound: the device must then drop the frame. A dropped input frame is recovered by TCP;
    /// a delivered frame the backup cannot replay would be unsafe. When the log is stopped,
    /// returns true and records nothing.
    pub fn record(&self, nic: u32, frame: &[u8], placed: Vec<(u64, u32)>) -> bool {
        self.record_from(nic, Frame::Slice(frame), placed)
    }

    /// [`InputLog::record`] of the frame `buffer[..len]`, taking a large frame's buffer
    /// itself (see [`FramePool::take_frame`]): a segment with receive offloads is not copied
    /// once more on the device's thread.
    pub fn record_buffer(
        &self,
        nic: u32,
        buffer: &mut Vec<u8>,
        len: usize,
        placed: Vec<(u64, u32)>,
    ) -> bool {
        self.record_from(nic, Frame::Buffer(buffer, len), placed)
    }

    fn record_from(&self, nic: u32, frame: Frame<'_>, placed: Vec<(u64, u32)>) -> bool {
        if self.is_stopped() {
            return true;
        }
        let was_empty = {
            let mut st = self.state();
            // Checked again under the lock: `stop` clears the queue under it.
            if self.is_stopped() {
                return true;
            }
            let after = st.pending_bytes.saturating_add(frame.bytes().len());
            if after > self.max_pending_bytes {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            let was_empty = st.pending.is_empty();
            st.last_seq += 1;
            let seq = st.last_seq;
            st.acks.delivered(seq, frame.bytes(), self.mirrored());
            let data = match frame {
                Frame::Slice(bytes) => st.pool.copy_of(bytes),
                Frame::Buffer(buffer, len) => st.pool.take_frame(buffer, len),
            };
            let frame = LoggedFrame {
                seq: st.last_seq,
                nic,
                epoch: st.epoch,
                data,
                placed,
            };
            st.pending.push_back(frame);
            st.pending_bytes = after;
            if st.unmirrored.len() >= MAX_TIMED {
                st.unmirrored.pop_front();
            }
            st.unmirrored.push_back((seq, Instant::now()));
            // Published under the lock so that `delivered` never runs ahead of the queue.
            self.delivered.store(st.last_seq, Ordering::Release);
            self.recorded.fetch_add(1, Ordering::Relaxed);
            was_empty
        };
        if was_empty {
            let notify = self
                .notify
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(notify) = notify {
                notify();
            }
        }
        true
    }

    /// Seq of the newest recorded frame (0 before any).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }

    /// Takes every pending frame, oldest first.
    pub fn take_pending(&self) -> Vec<LoggedFrame> {
        let mut st = self.state();
        st.pending_bytes = 0;
        st.pending.drain(..).collect()
    }

    /// The newest input frame the backup must hold before the guest's pure TCP ACK `ack` (an
    /// Ethernet frame) may leave: the newest one carrying bytes the ACK acknowledges. Every
    /// frame delivered so far when the ACK cannot be read as TCP.
    pub fn ack_tag(&self, ack: &[u8]) -> u64 {
        let mirrored = self.mirrored();
        let mut st = self.state();
        let last = st.last_seq;
        st.acks.needed_by(ack, mirrored).unwrap_or(last).min(last)
    }

    /// Hands the buffers of frames taken with [`InputLog::take_pending`] back once they are
    /// sent, for the next frames to reuse.
    pub fn recycle(&self, frames: Vec<LoggedFrame>) {
        let mut st = self.state();
        for frame in frames {
            st.pool.give_back(frame.data);
        }
    }

    /// The backup holds every frame with seq <= `seq` (monotonic: a smaller value is ignored).
    pub fn set_mirrored(&self, seq: u64) {
        self.mirrored_through(seq, |_| {});
    }

    /// [`InputLog::set_mirrored`], telling `waited` how long each frame it newly covers waited
    /// for the backup since it was recorded (oldest first; called under the log's lock).
    pub fn mirrored_through(&self, seq: u64, mut waited: impl FnMut(Duration)) {
        let mut st = self.state();
        self.mirrored.fetch_max(seq, Ordering::AcqRel);
        let now = Instant::now();
        while let Some(&(frame, recorded)) = st.unmirrored.front() {
            if frame > seq {
                break;
            }
            st.unmirrored.pop_front();
            waited(now.saturating_duration_since(recorded));
        }
    }

    pub fn mirrored(&self) -> u64 {
        self.mirrored.load(Ordering::Acquire)
    }

    /// Protection starts (again) at `epoch`: record from now on. Frames delivered before are
    /// in the state the backup starts from, so they count as mirrored.
    pub fn start(&self, epoch: u64) {
        let mut st = self.state();
        st.epoch = epoch;
        st.pending.clear();
        st.pending_bytes = 0;
        st.acks.clear();
        st.unmirrored.clear();
        self.mirrored.fetch_max(st.last_seq, Ordering::AcqRel);
        self.stopped.store(false, Ordering::Release);
    }

    /// Protection ended: stop recording, drop pending frames; `delivered`/`mirrored` stay.
    pub fn stop(&self) {
        let mut st = self.state();
        self.stopped.store(true, Ordering::Release);
        st.pending.clear();
        st.pending_bytes = 0;
        st.acks.clear();
        st.unmirrored.clear();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Frames recorded so far.
    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Frames refused because of the pending bound.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for InputLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputLog")
            .field("delivered", &self.delivered())
            .field("mirrored", &self.mirrored())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

/// A NIC's handle on the shared log.
pub struct InputRecorder {
    log: Arc<InputLog>,
    nic: u32,
}

impl InputRecorder {
    pub fn new(log: Arc<InputLog>, nic: u32) -> Self {
        Self { log, nic }
    }
}

impl NetInputRecorder for InputRecorder {
    fn record(&mut self, frame: &[u8], placed: &[(vm_memory::GuestAddress, usize)]) -> bool {
        self.log
            .record(self.nic, frame, filled_segments(frame.len(), placed))
    }

    fn record_buffer(
        &mut self,
        buffer: &mut Vec<u8>,
        len: usize,
        placed: &[(vm_memory::GuestAddress, usize)],
    ) -> bool {
        let segments = filled_segments(len, placed);
        self.log.record_buffer(self.nic, buffer, len, segments)
    }
}

/// The segments of `placed` a frame of `len` bytes fills, the last cut to its end.
fn filled_segments(len: usize, placed: &[(vm_memory::GuestAddress, usize)]) -> Vec<(u64, u32)> {
    let mut left = len;
    let mut segments = Vec::with_capacity(placed.len());
    for &(addr, len) in placed {
        if left == 0 {
            break;
        }
        let take = len.min(left);
        left -= take;
        segments.push((addr.0, take as u32));
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn frames_are_numbered_in_delivery_order_over_all_nics() {
        let log = InputLog::new(7, 1 << 20);
        assert_eq!(log.delivered(), 0);
        let mut a = InputRecorder::new(log.clone(), 0);
        let mut b = InputRecorder::new(log.clone(), 1);
        assert!(a.record(b"one", &[]));
        assert!(b.record(b"two", &[]));
        assert!(a.record(b"three", &[]));
        assert_eq!(log.delivered(), 3);
        assert_eq!(log.recorded(), 3);
        let taken = log.take_pending();
        let seqs: Vec<(u64, u32)> = taken.iter().map(|f| (f.seq, f.nic)).collect();
        assert_eq!(seqs, vec![(1, 0), (2, 1), (3, 0)]);
        assert_eq!(taken[1].data, b"two");
    }

    #[test]
    fn a_device_buffer_is_taken_whole_unless_the_frame_is_refused() {
        let log = InputLog::new(1, 100_000);
        let mut rec = InputRecorder::new(log.clone(), 0);
        let mut rx = vec![7u8; FramePool::BUFFER_LEN];
        let placed = [(vm_memory::GuestAddress(0x1000), 70_000)];
        let before = rx.as_ptr();
        assert!(rec.record_buffer(&mut rx, 60_000, &placed));
        assert_ne!(rx.as_ptr(), before, "the log took the buffer");
        assert_eq!(rx.len(), FramePool::BUFFER_LEN, "and left one as long");
        let kept = rx.as_ptr();
        rx[..60_000].fill(8);
        assert!(
            !rec.record_buffer(&mut rx, 60_000, &placed),
            "over the pending bound"
        );
        assert_eq!(rx.as_ptr(), kept, "a refused frame's buffer stays");
        assert_eq!(log.delivered(), 1);
        let taken = log.take_pending();
        assert_eq!(taken[0].data, vec![7u8; 60_000]);
        assert_eq!(taken[0].placed, vec![(0x1000, 60_000)]);
    }

    #[test]
    fn buffers_of_sent_frames_are_reused() {
        let log = InputLog::new(1, 1 << 20);
        assert!(log.record(0, &[5u8; 40_000], Vec::new()));
        let sent = log.take_pending();
        log.recycle(sent);
        assert_eq!(log.state().pool.spare(), 1);
        assert!(log.record(0, &[6u8; 50_000], Vec::new()));
        assert_eq!(log.state().pool.spare(), 0, "the spare buffer was taken");
        let next = log.take_pending();
        assert_eq!(next[0].data, vec![6u8; 50_000]);
    }

    #[test]
    fn frames_carry_the_epoch_they_were_recorded_in() {
        let log = InputLog::new(5, 1 << 20);
        assert!(log.record(0, b"a", Vec::new()));
        log.begin_epoch(6);
        assert!(log.record(0, b"b", Vec::new()));
        assert!(log.record(0, b"c", Vec::new()));
        let epochs: Vec<u64> = log.take_pending().iter().map(|f| f.epoch).collect();
        assert_eq!(epochs, vec![5, 6, 6]);
    }

    #[test]
    fn frames_over_the_bound_are_refused_without_a_seq() {
        let log = InputLog::new(1, 10);
        assert!(log.record(0, &[0; 6], Vec::new()));
        assert!(!log.record(0, &[0; 5], Vec::new()));
        assert_eq!(log.delivered(), 1);
        assert_eq!(log.refused(), 1);
        assert!(log.record(0, &[0; 4], Vec::new()));
        assert_eq!(log.delivered(), 2);
        // Taking the pending frames makes room again.
        assert_eq!(log.take_pending().len(), 2);
        assert!(log.record(0, &[0; 10], Vec::new()));
        assert_eq!(log.delivered(), 3);
        assert_eq!(log.recorded(), 3);
    }

    #[test]
    fn take_pending_empties_the_queue_and_notify_fires_on_the_first_frame() {
        let log = InputLog::new(1, 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        log.set_notify(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        assert!(log.record(0, b"a", Vec::new()));
        assert!(log.record(0, b"b", Vec::new()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(log.take_pending().len(), 2);
        assert!(log.take_pending().is_empty());
        assert!(log.record(0, b"c", Vec::new()));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let taken = log.take_pending();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].seq, 3);
    }

    #[test]
    fn a_restarted_log_counts_what_came_before_as_mirrored() {
        let log = InputLog::new(1, 1 << 20);
        assert!(log.record(0, &[1; 60], Vec::new()));
        log.stop();
        assert!(log.record(0, &[2; 60], Vec::new()));
        assert_eq!(log.delivered(), 1, "nothing is recorded while stopped");
        log.start(9);
        assert_eq!(log.mirrored(), 1);
        assert!(log.take_pending().is_empty());
        assert!(log.record(0, &[3; 60], Vec::new()));
        let taken = log.take_pending();
        assert_eq!((taken[0].seq, taken[0].epoch), (2, 9));
    }

    #[test]
    fn each_frame_newly_covered_reports_its_wait_once_oldest_first() {
        let log = InputLog::new(1, 1 << 20);
        for byte in 1..=3u8 {
            assert!(log.record(0, &[byte; 60], Vec::new()));
        }
        std::thread::sleep(Duration::from_millis(2));
        assert!(log.record(0, &[4; 60], Vec::new()));
        let mut waits = Vec::new();
        log.mirrored_through(2, |d| waits.push(d));
        assert_eq!(waits.len(), 2);
        assert!(waits.iter().all(|d| *d >= Duration::from_millis(2)));
        // Covered already, or not acknowledged yet: nothing more.
        log.mirrored_through(2, |d| waits.push(d));
        log.mirrored_through(1, |d| waits.push(d));
        assert_eq!(waits.len(), 2);
        log.mirrored_through(4, |d| waits.push(d));
        assert_eq!(waits.len(), 4);
        assert!(waits[2] >= waits[3], "frame 3 was recorded before frame 4");
        // Protection stopped and started again: earlier frames count as held, untimed.
        assert!(log.record(0, &[5; 60], Vec::new()));
        log.stop();
        log.start(9);
        log.mirrored_through(5, |d| waits.push(d));
        assert_eq!(waits.len(), 4);
    }

    #[test]
    fn mirrored_is_monotonic() {
        let log = InputLog::new(1, 1 << 20);
        assert_eq!(log.mirrored(), 0);
        log.set_mirrored(4);
        log.set_mirrored(2);
        assert_eq!(log.mirrored(), 4);
        log.set_mirrored(9);
        assert_eq!(log.mirrored(), 9);
    }

    #[test]
    fn a_stopped_log_accepts_and_records_nothing() {
        let log = InputLog::new(1, 4);
        assert!(log.record(0, b"ab", Vec::new()));
        log.set_mirrored(1);
        log.stop();
        assert!(log.is_stopped());
        assert!(log.take_pending().is_empty());
        // Over the bound too: nothing is held any more, so nothing is refused.
        assert!(log.record(0, b"abcdefgh", Vec::new()));
        assert_eq!(log.delivered(), 1);
        assert_eq!(log.mirrored(), 1);
        assert_eq!(log.recorded(), 1);
        assert_eq!(log.refused(), 0);
    }
}
