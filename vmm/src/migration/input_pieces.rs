//! The sender's side of pages built from input frames (fault tolerance). Every frame the
//! primary's guest receives crosses the replication link as mirrored input (for early TCP
//! ACKs and replay), and then again inside the dirty page of the receive buffer it landed in.
//! The backup holds the mirrored frames until their epoch is applied, so such a page can name
//! the frames' bytes instead of carrying them: "lay bytes 12..1526 of input frame 9041 at
//! offset 64", then a delta for whatever else changed.
//!
//! Nothing here is assumed about the guest: the encoder lays the pieces over its copy of the
//! receiver's page and diffs the result against the page actually captured, so a buffer the
//! guest reused or changed since costs a longer delta (or the page itself), never a wrong page.
//! A piece is named only once the backup acknowledged holding its frame (`acked`): it keeps
//! acknowledged frames of epochs it has not applied (see the FT input store).

use std::collections::HashMap;
use std::sync::Arc;

use devices::gate::LoggedFrame;

use super::memory::PAGE_SIZE;
use super::protocol::{InputPiece, INPUT_PIECE_LEN, MAX_INPUT_PIECES};

/// Where one piece of a frame lies in a page.
#[derive(Clone, Copy, Debug)]
struct Placed {
    frame: usize,
    frame_offset: u32,
    page_offset: u16,
    len: u16,
}

/// The input frames of one epoch and the pages they landed in.
pub struct InputPieces {
    frames: Vec<LoggedFrame>,
    /// Per page (guest address), the pieces laid on it, in delivery order.
    pages: HashMap<u64, Vec<Placed>>,
    /// The newest frame seq the receiver acknowledged holding (read per page: an
    /// acknowledgement arriving during a pass serves the rest of it).
    acked: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl InputPieces {
    pub fn new(acked: Arc<dyn Fn() -> u64 + Send + Sync>) -> Self {
        Self {
            frames: Vec::new(),
            pages: HashMap::new(),
            acked,
        }
    }

    /// Adds a frame, in delivery order, placed where its `placed` segments say (a frame whose
    /// segments do not cover it exactly is kept but laid nowhere).
    pub fn add(&mut self, frame: LoggedFrame) {
        let index = self.frames.len();
        let covered: u64 = frame.placed.iter().map(|&(_, len)| u64::from(len)).sum();
        if covered == frame.data.len() as u64 {
            let mut at = 0u32;
            for &(gpa, len) in &frame.placed {
                let (mut addr, mut left) = (gpa, len);
                while left > 0 {
                    let page = addr & !(PAGE_SIZE as u64 - 1);
                    let offset = (addr - page) as u32;
                    let take = left.min(PAGE_SIZE as u32 - offset);
                    let list = self.pages.entry(page).or_default();
                    // A piece laid over an earlier one whole leaves nothing of it.
                    let (from, to) = (offset, offset + take);
                    list.retain(|p| {
                        let (pf, pt) = (u32::from(p.page_offset), u32::from(p.page_offset + p.len));
                        !(from <= pf && pt <= to)
                    });
                    list.push(Placed {
                        frame: index,
                        frame_offset: at,
                        page_offset: offset as u16,
                        len: take as u16,
                    });
                    addr += u64::from(take);
                    at += take;
                    left -= take;
                }
            }
        }
        self.frames.push(frame);
    }

    /// The frames, for their buffers to be reused.
    pub fn into_frames(self) -> Vec<LoggedFrame> {
        self.frames
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether any frame landed in the page at `gpa`.
    pub(super) fn touches(&self, gpa: u64) -> bool {
        self.pages.contains_key(&gpa)
    }

    /// Lays the acknowledged pieces of the page at `gpa` over `page` (the receiver's copy)
    /// and writes their records to `out`; returns how many (0: none, or more than a record
    /// may hold, and `page` is then unusable).
    pub(super) fn lay_over(&self, gpa: u64, page: &mut [u8], out: &mut [u8]) -> usize {
        let Some(list) = self.pages.get(&gpa) else {
            return 0;
        };
        let acked = (self.acked)();
        let mut count = 0;
        for placed in list {
            let Some(frame) = self.frames.get(placed.frame) else {
                continue;
            };
            if frame.seq > acked {
                continue;
            }
            if count == MAX_INPUT_PIECES {
                return 0;
            }
            let from = placed.frame_offset as usize;
            let len = usize::from(placed.len);
            let to = usize::from(placed.page_offset);
            let (Some(bytes), Some(dest), Some(record)) = (
                frame.data.get(from..from + len),
                page.get_mut(to..to + len),
                out.get_mut(count * INPUT_PIECE_LEN..(count + 1) * INPUT_PIECE_LEN),
            ) else {
                return 0;
            };
            dest.copy_from_slice(bytes);
            InputPiece {
                seq: frame.seq,
                frame_offset: placed.frame_offset,
                page_offset: placed.page_offset,
                len: placed.len,
            }
            .write(record);
            count += 1;
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, data: Vec<u8>, placed: Vec<(u64, u32)>) -> LoggedFrame {
        LoggedFrame {
            seq,
            nic: 0,
            epoch: 1,
            data,
            placed,
        }
    }

    fn always(seq: u64) -> Arc<dyn Fn() -> u64 + Send + Sync> {
        Arc::new(move || seq)
    }

    #[test]
    fn a_frame_across_a_page_boundary_lands_in_both_pages() {
        let mut pieces = InputPieces::new(always(u64::MAX));
        let data: Vec<u8> = (0..100u8).collect();
        pieces.add(frame(3, data, vec![(0x1000 + 4046, 100)]));
        let mut page = vec![0u8; PAGE_SIZE];
        let mut out = vec![0u8; MAX_INPUT_PIECES * INPUT_PIECE_LEN];
        assert_eq!(pieces.lay_over(0x1000, &mut page, &mut out), 1);
        assert_eq!(&page[4046..], &(0..50u8).collect::<Vec<_>>()[..]);
        assert_eq!(pieces.lay_over(0x2000, &mut page, &mut out), 1);
        assert_eq!(&page[..50], &(50..100u8).collect::<Vec<_>>()[..]);
        assert_eq!(
            InputPiece::read(&out[..INPUT_PIECE_LEN]),
            InputPiece {
                seq: 3,
                frame_offset: 50,
                page_offset: 0,
                len: 50
            }
        );
    }

    #[test]
    fn unacknowledged_frames_and_pieces_laid_over_whole_are_left_out() {
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let a = acked.clone();
        let mut pieces = InputPieces::new(Arc::new(move || {
            a.load(std::sync::atomic::Ordering::SeqCst)
        }));
        pieces.add(frame(1, vec![1; 60], vec![(0x3000, 60)]));
        pieces.add(frame(2, vec![2; 80], vec![(0x3000, 80)]));
        pieces.add(frame(3, vec![3; 10], vec![(0x3010, 10)]));
        let mut page = vec![0u8; PAGE_SIZE];
        let mut out = vec![0u8; MAX_INPUT_PIECES * INPUT_PIECE_LEN];
        assert_eq!(
            pieces.lay_over(0x3000, &mut page, &mut out),
            0,
            "frame 1 lies under frame 2, which is not acknowledged yet"
        );
        acked.store(3, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(pieces.lay_over(0x3000, &mut page, &mut out), 2);
        assert_eq!(&page[..0x10], &[2; 0x10]);
        assert_eq!(&page[0x10..0x1a], &[3; 10]);
        assert_eq!(&page[0x1a..80], &[2; 80 - 0x1a]);
        assert!(!pieces.touches(0x4000));
    }

    #[test]
    fn a_frame_whose_segments_do_not_cover_it_is_laid_nowhere() {
        let mut pieces = InputPieces::new(always(u64::MAX));
        pieces.add(frame(1, vec![1; 60], vec![(0x3000, 50)]));
        assert!(!pieces.touches(0x3000));
        assert_eq!(pieces.into_frames().len(), 1);
    }
}
