//! Mirrored input frames, kept until the pages of their epoch are encoded: a receive
//! buffer's dirty page may then name the frames the backup holds instead of carrying their
//! bytes a second time (see `vmm::migration::InputPieces`).

use std::collections::VecDeque;
use std::sync::Arc;

use devices::gate::{InputLog, LoggedFrame};
use vmm::migration::InputPieces;

/// Bytes of frames kept at most (about three epochs of a fast transfer at 10 ms); the
/// oldest beyond go back to the log, and their pages travel as before.
const KEPT_INPUT_MAX: usize = 32 << 20;

#[derive(Default)]
pub(super) struct KeptInput {
    frames: VecDeque<LoggedFrame>,
    bytes: usize,
}

impl KeptInput {
    /// Keeps `frames`, just mirrored (in seq order). Those not known to lie anywhere in guest
    /// memory, and the oldest beyond the bound, go back to `log`.
    pub(super) fn keep(&mut self, log: &InputLog, frames: Vec<LoggedFrame>) {
        let mut unused = Vec::new();
        for frame in frames {
            if frame.placed.is_empty() {
                unused.push(frame);
                continue;
            }
            self.bytes += frame.data.len();
            self.frames.push_back(frame);
        }
        while self.bytes > KEPT_INPUT_MAX {
            let Some(old) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= old.data.len();
            unused.push(old);
        }
        log.recycle(unused);
    }

    /// The frames the guest received in epoch `epoch`, laid out by page (None: none); older
    /// frames go back to `log`. Those of later epochs stay.
    pub(super) fn take_epoch(
        &mut self,
        log: &Arc<InputLog>,
        epoch: u64,
    ) -> Option<Arc<InputPieces>> {
        let mirrored = log.clone();
        let mut pieces = InputPieces::new(Arc::new(move || mirrored.mirrored()));
        let mut old = Vec::new();
        while self.frames.front().is_some_and(|f| f.epoch <= epoch) {
            let Some(frame) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= frame.data.len();
            if frame.epoch == epoch {
                pieces.add(frame);
            } else {
                old.push(frame);
            }
        }
        log.recycle(old);
        (!pieces.is_empty()).then(|| Arc::new(pieces))
    }

    /// Keeps again the frames of `pieces`, taken by [`KeptInput::take_epoch`] for a pass sent
    /// while their epoch still ran: the pause's pass may name them too. They are older than
    /// any kept since, so they go first (the bound is checked again at the next keep).
    pub(super) fn put_back(&mut self, pieces: Arc<InputPieces>) {
        let Ok(pieces) = Arc::try_unwrap(pieces) else {
            return;
        };
        for frame in pieces.into_frames().into_iter().rev() {
            self.bytes += frame.data.len();
            self.frames.push_front(frame);
        }
    }
}

/// Hands the frames of an encoded pass back to `log` (the encoder threads let go of them
/// when the pass ended; should one still hold them, they are dropped).
pub(super) fn give_back(log: &InputLog, pieces: Arc<InputPieces>) {
    if let Ok(pieces) = Arc::try_unwrap(pieces) {
        log.recycle(pieces.into_frames());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, epoch: u64, placed: bool) -> LoggedFrame {
        LoggedFrame {
            seq,
            nic: 0,
            epoch,
            data: vec![seq as u8; 100],
            placed: if placed {
                vec![(0x1000 * seq, 100)]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn an_epoch_takes_its_own_frames_and_lets_older_ones_go() {
        let log = InputLog::new(1, 1 << 20);
        let mut kept = KeptInput::default();
        kept.keep(
            &log,
            vec![
                frame(1, 4, true),
                frame(2, 5, true),
                frame(3, 5, false),
                frame(4, 6, true),
            ],
        );
        assert_eq!(kept.frames.len(), 3, "a frame placed nowhere is not kept");
        let pieces = kept.take_epoch(&log, 5).expect("epoch 5 has a frame");
        let frames = Arc::try_unwrap(pieces).ok().unwrap().into_frames();
        assert_eq!(frames.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![2]);
        assert_eq!(kept.frames.len(), 1, "epoch 6 stays");
        assert!(kept.take_epoch(&log, 5).is_none());
        assert!(kept.take_epoch(&log, 6).is_some());
        assert_eq!((kept.frames.len(), kept.bytes), (0, 0));
    }

    /// Frames taken for a pass sent while their epoch ran come back for the pause's pass,
    /// ahead of those mirrored meanwhile.
    #[test]
    fn frames_put_back_go_first() {
        let log = Arc::new(InputLog::new(1, 1 << 20));
        let mut kept = KeptInput::default();
        kept.keep(&log, vec![frame(1, 5, true), frame(2, 5, true)]);
        let early = kept.take_epoch(&log, 5).expect("epoch 5 has frames");
        kept.keep(&log, vec![frame(3, 5, true)]);
        kept.put_back(early);
        assert_eq!(kept.bytes, 300);
        let pieces = kept.take_epoch(&log, 5).expect("all three are back");
        let frames = Arc::try_unwrap(pieces).ok().unwrap().into_frames();
        assert_eq!(
            frames.iter().map(|f| f.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn the_oldest_frames_go_beyond_the_bound() {
        let log = InputLog::new(1, 1 << 30);
        let mut kept = KeptInput::default();
        let big = |seq| LoggedFrame {
            seq,
            nic: 0,
            epoch: 1,
            data: vec![0; 1 << 20],
            placed: vec![(0, 1 << 20)],
        };
        kept.keep(&log, (1..=40).map(big).collect());
        assert!(kept.bytes <= KEPT_INPUT_MAX);
        assert_eq!(kept.frames.front().map(|f| f.seq), Some(9));
    }
}
