//! The backup's copy of the output the primary still held when each epoch ended.
//!
//! Output commit holds the frames a guest sends in epoch E until the backup acknowledges E.
//! If the primary dies after the backup holds E but before the Ack reached it, those frames
//! never left, yet the guest the backup restores from E counts them as sent: a reply lost that
//! way is only sent again at the guest's retransmission timeout (200 ms for Linux, a second for
//! some stacks). So the primary copies each ended epoch's held frames to the backup, and a
//! backup taking over from epoch C sends the ones of the epochs the primary may not have
//! released (after its last `released_through`, up to C) before the restored guest goes on.
//! Some may have left already; a duplicate frame is what networks do anyway.
//!
//! Memory is bounded: over the bound the oldest epochs are forgotten first (they are the most
//! likely to have left); their frames then wait for the guest's retransmission, as without the
//! copy.

use std::collections::VecDeque;

use devices::gate::LoggedFrame;

/// Bytes of held output the backup keeps at most (the primary's hold limit).
pub const OUTPUT_STORE_MAX: usize = 64 << 20;

/// The held output of the epoch being received.
#[derive(Debug, Default)]
pub struct EpochOutput {
    frames: Vec<LoggedFrame>,
}

impl EpochOutput {
    /// Takes the frames of one OutputFrames payload. Err: the stream is wrong (numbering not
    /// continuing the epoch's, a NIC the VM does not have).
    pub fn receive(&mut self, frames: Vec<LoggedFrame>, nics: usize) -> Result<(), String> {
        let last = self.frames.last().map_or(0, |f| f.seq);
        if let Some(first) = frames.first() {
            if first.seq <= last {
                return Err(format!(
                    "output frame {} after output frame {last}",
                    first.seq
                ));
            }
        }
        if let Some(f) = frames.iter().find(|f| f.nic as usize >= nics) {
            return Err(format!(
                "output frame {} of NIC {}, the VM has {nics}",
                f.seq, f.nic
            ));
        }
        self.frames.extend(frames);
        Ok(())
    }

    /// The epoch ended as `epoch`: every frame must say so.
    pub fn check_epoch(&self, epoch: u64) -> Result<(), String> {
        match self.frames.iter().find(|f| f.epoch != epoch) {
            Some(f) => Err(format!(
                "output frame {} of epoch {} in epoch {epoch}",
                f.seq, f.epoch
            )),
            None => Ok(()),
        }
    }
}

/// The held output of the epochs the backup holds and the primary may not have released.
#[derive(Debug)]
pub struct OutputStore {
    epochs: VecDeque<(u64, Vec<LoggedFrame>)>,
    bytes: usize,
    max_bytes: usize,
    /// Epochs forgotten over the bound.
    forgotten: u64,
}

impl OutputStore {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            epochs: VecDeque::new(),
            bytes: 0,
            max_bytes,
            forgotten: 0,
        }
    }

    /// Epoch `epoch` is held with `output`; the primary released every epoch up to
    /// `released_through`.
    pub fn keep(&mut self, epoch: u64, output: EpochOutput, released_through: u64) {
        while self
            .epochs
            .front()
            .is_some_and(|(e, _)| *e <= released_through)
        {
            self.forget_oldest();
        }
        if output.frames.is_empty() {
            return;
        }
        self.bytes += output.frames.iter().map(|f| f.data.len()).sum::<usize>();
        self.epochs.push_back((epoch, output.frames));
        while self.bytes > self.max_bytes {
            self.forget_oldest();
            self.forgotten += 1;
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, frames)) = self.epochs.pop_front() {
            self.bytes -= frames.iter().map(|f| f.data.len()).sum::<usize>();
        }
    }

    /// The frames to send again at a takeover (NIC index, Ethernet frame), oldest epoch
    /// first and in production order within an epoch.
    pub fn take(&mut self) -> Vec<(u32, Vec<u8>)> {
        self.bytes = 0;
        self.epochs
            .drain(..)
            .flat_map(|(_, frames)| frames)
            .map(|f| (f.nic, f.data))
            .collect()
    }

    /// Epochs forgotten over the bound so far.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, epoch: u64, nic: u32, len: usize) -> LoggedFrame {
        LoggedFrame {
            seq,
            nic,
            epoch,
            data: vec![seq as u8; len],
            placed: Vec::new(),
        }
    }

    fn epoch_output(epoch: u64, seqs: std::ops::RangeInclusive<u64>, len: usize) -> EpochOutput {
        let mut out = EpochOutput::default();
        out.receive(seqs.map(|s| frame(s, epoch, 0, len)).collect(), 1)
            .unwrap();
        out
    }

    #[test]
    fn epochs_after_the_released_one_are_sent_again_in_order() {
        let mut store = OutputStore::new(1 << 20);
        store.keep(4, epoch_output(4, 1..=2, 60), 3);
        store.keep(5, epoch_output(5, 1..=1, 60), 3);
        // Epoch 4 left the primary: only 5 and 6 may not have.
        store.keep(6, epoch_output(6, 1..=2, 60), 4);
        let again: Vec<u8> = store.take().into_iter().map(|(_, f)| f[0]).collect();
        assert_eq!(again, vec![1, 1, 2]);
        assert!(store.take().is_empty());
    }

    #[test]
    fn over_the_bound_the_oldest_epoch_is_forgotten() {
        let mut store = OutputStore::new(250);
        store.keep(1, epoch_output(1, 1..=1, 100), 0);
        store.keep(2, epoch_output(2, 1..=1, 100), 0);
        assert_eq!(store.forgotten(), 0);
        store.keep(3, epoch_output(3, 1..=1, 100), 0);
        assert_eq!(store.forgotten(), 1);
        assert_eq!(store.take().len(), 2);
    }

    #[test]
    fn a_wrong_stream_is_refused() {
        let mut out = EpochOutput::default();
        out.receive(vec![frame(1, 7, 0, 60), frame(2, 7, 1, 60)], 2)
            .unwrap();
        assert!(out
            .receive(vec![frame(2, 7, 0, 60)], 2)
            .unwrap_err()
            .contains("after output frame 2"));
        assert!(out
            .receive(vec![frame(3, 7, 2, 60)], 2)
            .unwrap_err()
            .contains("NIC 2"));
        out.check_epoch(7).unwrap();
        assert!(out.check_epoch(8).unwrap_err().contains("of epoch 7"));
    }
}
