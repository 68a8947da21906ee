//! The backup's copy of the input the primary's guest received (TCP at full speed).
//!
//! The primary mirrors every frame its NICs deliver to the guest, numbered (`seq`) and tagged
//! with the epoch that received it. The backup keeps the frames of epochs it does not hold yet
//! and acknowledges the newest `seq` up to which it holds (or has the state covering) every
//! frame; the primary then lets the guest's pure TCP ACKs covering no later input leave before
//! their epoch commits. At failover from epoch C, the frames of epochs after C are delivered
//! to the restored guest again: the client was told they arrived, so the guest must see them.
//!
//! Memory is bounded: over the bound a frame is dropped, and the acknowledgement stops short
//! of it until an epoch covering it is held (the primary then waits for that commit instead,
//! as without mirroring).

use std::collections::VecDeque;

use devices::gate::{FramePool, LoggedFrame};
use vmm::migration::protocol::InputFrameSource;

/// Bytes of frames the backup keeps at most.
pub const INPUT_STORE_MAX: usize = 64 << 20;
/// Spare frame buffers kept for reuse, at most (a few epochs of a bulk transfer).
const SPARE_BYTES: usize = 16 << 20;

#[derive(Debug)]
pub struct InputStore {
    frames: VecDeque<LoggedFrame>,
    bytes: usize,
    max_bytes: usize,
    nics: u32,
    /// The newest seq received.
    last_seq: u64,
    /// The newest epoch held (frames of it and before are in its state).
    held_epoch: Option<u64>,
    /// The newest epoch of a frame dropped over the bound, until an epoch covering it is held.
    dropped_epoch: Option<u64>,
    /// The newest seq acknowledged.
    acked: u64,
    /// Buffers of frames no longer kept, for the next ones (see [`InputStore::pool`]).
    pool: FramePool,
}

impl InputStore {
    pub fn new(nics: usize, max_bytes: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            bytes: 0,
            max_bytes,
            nics: nics as u32,
            last_seq: 0,
            held_epoch: None,
            dropped_epoch: None,
            acked: 0,
            pool: FramePool::new(SPARE_BYTES),
        }
    }

    /// Where the buffers of received frames come from: those of frames dropped here go back
    /// to it.
    pub fn pool(&mut self) -> &mut FramePool {
        &mut self.pool
    }

    /// Takes the frames of one InputFrames payload. Err: the stream is wrong (seq not after
    /// the last one, a NIC the VM does not have).
    pub fn receive(&mut self, frames: Vec<LoggedFrame>) -> Result<(), String> {
        for frame in frames {
            if frame.seq <= self.last_seq {
                return Err(format!(
                    "input frame {} after input frame {}",
                    frame.seq, self.last_seq
                ));
            }
            if frame.nic >= self.nics {
                return Err(format!(
                    "input frame {} for NIC {}, the VM has {}",
                    frame.seq, frame.nic, self.nics
                ));
            }
            self.last_seq = frame.seq;
            if self.held_epoch.is_some_and(|held| frame.epoch <= held) {
                // Already in the state held.
                self.pool.give_back(frame.data);
                continue;
            }
            // What the frame takes in memory, a pooled buffer's spare room included.
            let size = frame.data.capacity();
            if self.bytes + size > self.max_bytes {
                self.dropped_epoch = self.dropped_epoch.max(Some(frame.epoch));
                self.pool.give_back(frame.data);
                continue;
            }
            self.bytes += size;
            self.frames.push_back(frame);
        }
        Ok(())
    }

    /// Epoch `epoch` is held: its frames and earlier ones are in its state.
    pub fn epoch_held(&mut self, epoch: u64) {
        self.held_epoch = self.held_epoch.max(Some(epoch));
        while self.frames.front().is_some_and(|f| f.epoch <= epoch) {
            if let Some(f) = self.frames.pop_front() {
                self.bytes -= f.data.capacity();
                self.pool.give_back(f.data);
            }
        }
        if self.dropped_epoch.is_some_and(|dropped| dropped <= epoch) {
            self.dropped_epoch = None;
        }
    }

    /// The seq to acknowledge now, if it moved: every frame up to it is kept or in a held
    /// epoch's state.
    pub fn ack_due(&mut self) -> Option<u64> {
        if self.dropped_epoch.is_some() || self.last_seq <= self.acked {
            return None;
        }
        self.acked = self.last_seq;
        Some(self.acked)
    }

    /// The frames to deliver again after resuming from the held epoch, per NIC, oldest first.
    pub fn replay(&mut self) -> Vec<(u32, Vec<u8>)> {
        let held = self.held_epoch;
        self.frames
            .drain(..)
            .filter(|f| held.is_none_or(|h| f.epoch > h))
            .map(|f| (f.nic, f.data))
            .collect()
    }

    /// Frames kept.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// The frames kept, for the pages the primary sends as input laid over the copy here: those of
/// epochs not held yet that were acknowledged (the primary names no other).
impl InputFrameSource for InputStore {
    fn input_frame(&self, seq: u64) -> Option<&[u8]> {
        // Kept in seq order (`receive` refuses any other).
        let at = self.frames.partition_point(|f| f.seq < seq);
        self.frames
            .get(at)
            .filter(|f| f.seq == seq)
            .map(|f| f.data.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, epoch: u64, len: usize) -> LoggedFrame {
        LoggedFrame {
            seq,
            nic: 0,
            epoch,
            data: vec![seq as u8; len],
            placed: Vec::new(),
        }
    }

    #[test]
    fn frames_of_held_epochs_are_dropped_and_the_rest_replayed_in_order() {
        let mut store = InputStore::new(1, 1 << 20);
        store
            .receive(vec![frame(1, 5, 60), frame(2, 5, 60), frame(3, 6, 60)])
            .unwrap();
        assert_eq!(store.ack_due(), Some(3));
        assert_eq!(store.ack_due(), None);
        store.epoch_held(5);
        store.receive(vec![frame(4, 7, 60)]).unwrap();
        assert_eq!(store.ack_due(), Some(4));
        let replay = store.replay();
        assert_eq!(
            replay.iter().map(|(_, d)| d[0]).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }

    #[test]
    fn over_the_bound_the_ack_waits_for_the_epoch_that_covers_the_dropped_frame() {
        let mut store = InputStore::new(1, 100);
        store.receive(vec![frame(1, 5, 60)]).unwrap();
        assert_eq!(store.ack_due(), Some(1));
        store
            .receive(vec![frame(2, 5, 60), frame(3, 6, 10)])
            .unwrap();
        assert_eq!(store.ack_due(), None, "frame 2 was dropped");
        store.epoch_held(4);
        assert_eq!(store.ack_due(), None);
        store.epoch_held(5);
        assert_eq!(store.ack_due(), Some(3));
        assert_eq!(store.replay().len(), 1);
    }

    #[test]
    fn buffers_of_frames_an_epoch_covers_are_reused() {
        let mut store = InputStore::new(1, 1 << 20);
        let big = store.pool().copy_of(&[3u8; 30_000]);
        store
            .receive(vec![LoggedFrame {
                seq: 1,
                nic: 0,
                epoch: 5,
                data: big,
                placed: Vec::new(),
            }])
            .unwrap();
        assert_eq!(store.pool().spare(), 0);
        store.epoch_held(5);
        assert_eq!(
            store.pool().spare(),
            1,
            "the held epoch's frame gave its buffer back"
        );
        let reused = store.pool().copy_of(&[4u8; 40_000]);
        assert_eq!(store.pool().spare(), 0);
        assert_eq!(reused, vec![4u8; 40_000]);
    }

    #[test]
    fn kept_frames_are_found_by_seq_until_their_epoch_is_held() {
        let mut store = InputStore::new(1, 1 << 20);
        store
            .receive(vec![frame(3, 5, 60), frame(7, 5, 61), frame(9, 6, 62)])
            .unwrap();
        assert_eq!(store.input_frame(7).map(<[u8]>::len), Some(61));
        assert_eq!(store.input_frame(9).map(<[u8]>::len), Some(62));
        assert!(store.input_frame(4).is_none());
        assert!(store.input_frame(10).is_none());
        store.epoch_held(5);
        assert!(store.input_frame(3).is_none());
        assert_eq!(store.input_frame(9).map(<[u8]>::len), Some(62));
    }

    #[test]
    fn a_seq_that_does_not_grow_or_an_unknown_nic_breaks_the_stream() {
        let mut store = InputStore::new(2, 1 << 20);
        store.receive(vec![frame(4, 1, 10)]).unwrap();
        assert!(store.receive(vec![frame(4, 1, 10)]).is_err());
        assert!(store.receive(vec![frame(3, 1, 10)]).is_err());
        let mut other = frame(9, 1, 10);
        other.nic = 2;
        assert!(store.receive(vec![other]).is_err());
    }
}
