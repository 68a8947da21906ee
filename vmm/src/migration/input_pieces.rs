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
//!
//! The guest copies what it received, too (a socket buffer, a process's buffer): the TCP
//! payload of the frames, in stream order, at places no device recorded. A page that is no
//! receive buffer and changed beyond a small delta is searched for that payload by content
//! (`PayloadIndex`): an 8-byte anchor at every 128th payload byte, then the run extended both
//! ways and followed into the next frames and across consecutive pages.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use devices::gate::{tcp_payload, LoggedFrame};

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

impl Placed {
    /// Its record, naming frame `seq`.
    fn piece(&self, seq: u64) -> InputPiece {
        InputPiece {
            seq,
            frame_offset: self.frame_offset,
            page_offset: self.page_offset,
            len: self.len,
        }
    }
}

/// The input frames of one epoch and the pages they landed in.
pub struct InputPieces {
    frames: Vec<LoggedFrame>,
    /// Per page (guest address), the pieces laid on it, in delivery order.
    pages: HashMap<u64, Vec<Placed>>,
    /// The newest frame seq the receiver acknowledged holding (read per page: an
    /// acknowledgement arriving during a pass serves the rest of it).
    acked: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Per frame, where its TCP payload lies in its data (empty: none worth a search).
    ranges: Vec<Range<usize>>,
    /// The frames' TCP payload by content, built when a page first needs it.
    payload: OnceLock<PayloadIndex>,
    /// Pages that may still be searched for payload: twice the pages the payload fills, so
    /// that a pass over pages holding none of it costs in proportion to the input, not to
    /// the dirty set.
    searches: AtomicUsize,
}

/// Payload bytes between two anchors; a search probes twice as many places (an anchor may
/// have been overwritten in the table).
const STRIDE: usize = 128;
/// The shortest run of payload worth a piece (its record takes 16 bytes).
const MIN_RUN: usize = 32;
/// Where a run of payload goes on: frame index and offset in its data.
pub(super) type PayloadCursor = (usize, usize);

/// The TCP payload of an epoch's frames, for finding the guest's copies of it.
struct PayloadIndex {
    tables: AnchorTables,
}

#[derive(Default)]
struct AnchorTables {
    /// A direct-mapped table of anchors: (frame, offset) of 8 payload bytes, by their value.
    /// A colliding anchor replaces the one before (other anchors of the same run find it).
    /// A slot holds no key: a match is checked against the frame's bytes.
    slots: Vec<(u32, u32)>,
    /// Per slot, 8 more bits of its anchor's hash (0: empty; a slot whose tag is not 0 was
    /// written by this build, so only the tags are cleared). Almost every probe of a page
    /// holding no payload stops here: an eighth of the table's size, it stays in the cache
    /// where the table (1 MiB for 2 MiB of payload) does not.
    tags: Vec<u8>,
}

/// The tables of the last index dropped, for the next build: an index is built every epoch
/// that receives TCP payload, on whichever encoding thread first needs it, and dropped on
/// another; allocating and clearing its megabytes each time was most of its build.
static SPARE_TABLES: Mutex<Option<AnchorTables>> = Mutex::new(None);

fn spare_tables() -> std::sync::MutexGuard<'static, Option<AnchorTables>> {
    SPARE_TABLES.lock().unwrap_or_else(|p| p.into_inner())
}

impl PayloadIndex {
    fn build(frames: &[LoggedFrame], ranges: &[Range<usize>]) -> Self {
        let anchors: usize = ranges.iter().map(|r| r.len() / STRIDE + 1).sum();
        // Mostly empty: a slot an anchor shares with an older one loses that one.
        let size = (8 * anchors).next_power_of_two().max(64);
        let mut tables = spare_tables().take().unwrap_or_default();
        tables.tags.clear();
        tables.tags.resize(size, 0);
        // Slots are read only under a tag written below: they need no clearing.
        tables.slots.resize(size, (0, 0));
        let mut index = Self { tables };
        for (f, (frame, range)) in frames.iter().zip(ranges).enumerate() {
            let mut at = range.start;
            while at + 8 <= range.end {
                let (slot, tag) = index.slot(key_at(&frame.data, at));
                index.tables.slots[slot] = (f as u32, at as u32);
                index.tables.tags[slot] = tag;
                at += STRIDE;
            }
        }
        index
    }

    /// The slot of `key` (the hash's top bits) and its tag (8 lower bits, apart from the
    /// slot's in any table of up to 2^24 slots, far more than the kept input's bound makes).
    fn slot(&self, key: u64) -> (usize, u8) {
        let bits = self.tables.slots.len().trailing_zeros();
        let hash = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ((hash >> (64 - bits)) as usize, (hash >> 32) as u8 | 1)
    }

    /// Where the 8 bytes `key` lie in `frames`' payload, if an anchor holds them.
    fn lookup(&self, frames: &[LoggedFrame], key: u64) -> Option<PayloadCursor> {
        let (slot, tag) = self.slot(key);
        if self.tables.tags[slot] != tag {
            return None;
        }
        let (f, at) = self.tables.slots[slot];
        let (f, at) = (f as usize, at as usize);
        let data = &frames.get(f)?.data;
        (at + 8 <= data.len() && key_at(data, at) == key).then_some((f, at))
    }
}

impl Drop for PayloadIndex {
    fn drop(&mut self) {
        let tables = std::mem::take(&mut self.tables);
        let mut spare = spare_tables();
        // The larger tables serve more builds without growing.
        if spare
            .as_ref()
            .is_none_or(|s| s.tags.capacity() < tables.tags.capacity())
        {
            *spare = Some(tables);
        }
    }
}

fn key_at(bytes: &[u8], at: usize) -> u64 {
    let mut k = [0u8; 8];
    k.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(k)
}

/// How many bytes `a` and `b` have in common from their starts.
fn common(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n && a[i..i + 8] == b[i..i + 8] {
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

impl InputPieces {
    pub fn new(acked: Arc<dyn Fn() -> u64 + Send + Sync>) -> Self {
        Self {
            frames: Vec::new(),
            pages: HashMap::new(),
            acked,
            ranges: Vec::new(),
            payload: OnceLock::new(),
            searches: AtomicUsize::new(0),
        }
    }

    /// Adds a frame, in delivery order, placed where its `placed` segments say (a frame whose
    /// segments do not cover it exactly is kept but laid nowhere).
    pub fn add(&mut self, frame: LoggedFrame) {
        // The data starts with the 12-byte virtio-net header.
        const VNET_HDR: usize = 12;
        let payload = frame
            .data
            .get(VNET_HDR..)
            .and_then(tcp_payload)
            .map(|r| r.start + VNET_HDR..r.end + VNET_HDR)
            .filter(|r| r.len() >= MIN_RUN)
            .unwrap_or(0..0);
        let searches = self.searches.get_mut();
        *searches = searches.saturating_add(2 * payload.len().div_ceil(PAGE_SIZE));
        self.ranges.push(payload);
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

    /// Lays runs of the frames' TCP payload that `new` holds over `page` (the receiver's
    /// copy of the page) and writes their records to `out`; returns how many, and where the
    /// payload goes on when the runs reach the page's end (`hint` for the next page, which
    /// starts there when the guest copied on). Only acknowledged frames are named.
    pub(super) fn lay_payload(
        &self,
        new: &[u8],
        hint: Option<PayloadCursor>,
        page: &mut [u8],
        out: &mut [u8],
    ) -> (usize, Option<PayloadCursor>) {
        let index = self
            .payload
            .get_or_init(|| PayloadIndex::build(&self.frames, &self.ranges));
        let acked = (self.acked)();
        let usable = |f: usize| {
            self.frames.get(f).is_some_and(|fr| fr.seq <= acked) && !self.ranges[f].is_empty()
        };
        let end = new.len().min(page.len());
        // A copy that starts inside the page follows bytes the receiver has.
        let mut pos = if hint.is_some() { 0 } else { common(new, page) };
        let mut cursor = hint;
        let mut count = 0;
        while pos < end && count < MAX_INPUT_PIECES {
            let rest = &new[pos..end];
            let mut found = None;
            // On from where the last run stopped: the same frame, or the next ones' payload.
            if let Some((f, at)) = cursor.take() {
                let next = (f + 1..self.frames.len().min(f + 5)).map(|g| (g, self.ranges[g].start));
                for (g, from) in std::iter::once((f, at)).chain(next) {
                    if !usable(g) || from >= self.ranges[g].end {
                        continue;
                    }
                    let n = common(rest, &self.frames[g].data[from..self.ranges[g].end]);
                    if n >= MIN_RUN.min(rest.len()) && n > 0 {
                        found = Some((g, from, pos, n));
                        break;
                    }
                }
            }
            if found.is_none() {
                found = self.anchor(index, new, pos, &usable);
            }
            let Some((f, from, to, len)) = found else {
                break;
            };
            let record = &mut out[count * INPUT_PIECE_LEN..(count + 1) * INPUT_PIECE_LEN];
            page[to..to + len].copy_from_slice(&self.frames[f].data[from..from + len]);
            InputPiece {
                seq: self.frames[f].seq,
                frame_offset: from as u32,
                page_offset: to as u16,
                len: len as u16,
            }
            .write(record);
            count += 1;
            pos = to + len;
            cursor = Some((f, from + len));
        }
        (count, cursor.filter(|_| pos == end))
    }

    /// A run of payload at or after `pos` in `new`, found by an anchor among the next
    /// 2 x STRIDE positions: (frame, offset in its data, offset in `new`, length).
    fn anchor(
        &self,
        index: &PayloadIndex,
        new: &[u8],
        pos: usize,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<(usize, usize, usize, usize)> {
        let last = new.len().checked_sub(8)?;
        for p in pos..=last.min(pos + 2 * STRIDE) {
            let Some((f, at)) = index.lookup(&self.frames, key_at(new, p)) else {
                continue;
            };
            if !usable(f) {
                continue;
            }
            let range = &self.ranges[f];
            let data = &self.frames[f].data;
            let ahead = common(&new[p..], &data[at..range.end]);
            let mut back = 0;
            while p - back > pos
                && at - back > range.start
                && new[p - back - 1] == data[at - back - 1]
            {
                back += 1;
            }
            if ahead + back >= MIN_RUN {
                return Some((f, at - back, p - back, ahead + back));
            }
        }
        None
    }

    /// Whether a page may be searched for payload (each call takes one search).
    pub(super) fn may_search(&self) -> bool {
        self.searches
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// The records of the page at `gpa` when its pieces, laid over the receiver's copy `old`,
    /// give `new` exactly, as a receive buffer filled and left alone does; returns how many
    /// (written to `out`). Compares only: no copy of `old` to lay them over. None when any
    /// piece is unacknowledged, pieces overlap, or a byte differs: [`InputPieces::lay_over`]
    /// then builds the page and a delta.
    pub(super) fn name_exactly(
        &self,
        gpa: u64,
        old: &[u8],
        new: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let list = self.pages.get(&gpa)?;
        if list.len() > MAX_INPUT_PIECES || old.len() != PAGE_SIZE || new.len() != PAGE_SIZE {
            return None;
        }
        let acked = (self.acked)();
        // Bytes of the page checked so far: pieces must come in page order.
        let mut end = 0usize;
        for (count, placed) in list.iter().enumerate() {
            let frame = self.frames.get(placed.frame).filter(|f| f.seq <= acked)?;
            let from = placed.frame_offset as usize;
            let len = usize::from(placed.len);
            let to = usize::from(placed.page_offset);
            if to < end {
                return None;
            }
            let bytes = frame.data.get(from..from + len)?;
            if old.get(end..to)? != new.get(end..to)? || new.get(to..to + len)? != bytes {
                return None;
            }
            placed
                .piece(frame.seq)
                .write(out.get_mut(count * INPUT_PIECE_LEN..(count + 1) * INPUT_PIECE_LEN)?);
            end = to + len;
        }
        (old.get(end..)? == new.get(end..)?).then_some(list.len())
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
            placed.piece(frame.seq).write(record);
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
    fn a_page_is_named_exactly_only_when_its_pieces_and_the_rest_match() {
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(2));
        let a = acked.clone();
        let mut pieces = InputPieces::new(Arc::new(move || {
            a.load(std::sync::atomic::Ordering::SeqCst)
        }));
        // Two frames fill the page's start; the rest keeps what the receiver holds.
        pieces.add(frame(1, vec![1; 100], vec![(0x5000, 100)]));
        pieces.add(frame(2, vec![2; 200], vec![(0x5000 + 300, 200)]));
        let old = vec![9u8; PAGE_SIZE];
        let mut new = old.clone();
        new[..100].fill(1);
        new[300..500].fill(2);
        let mut out = vec![0u8; MAX_INPUT_PIECES * INPUT_PIECE_LEN];
        assert_eq!(pieces.name_exactly(0x5000, &old, &new, &mut out), Some(2));
        assert_eq!(
            InputPiece::read(&out[INPUT_PIECE_LEN..2 * INPUT_PIECE_LEN]),
            InputPiece {
                seq: 2,
                frame_offset: 0,
                page_offset: 300,
                len: 200
            }
        );
        for at in [50, 200, 400, PAGE_SIZE - 1] {
            let mut changed = new.clone();
            changed[at] ^= 0xff;
            assert_eq!(
                pieces.name_exactly(0x5000, &old, &changed, &mut out),
                None,
                "byte {at} differs from what the pieces and the receiver's copy give"
            );
        }
        acked.store(1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            pieces.name_exactly(0x5000, &old, &new, &mut out),
            None,
            "frame 2 is not acknowledged"
        );
        acked.store(3, std::sync::atomic::Ordering::SeqCst);
        // A frame laid over part of an earlier one: left to the overlay and its delta.
        pieces.add(frame(3, vec![3; 50], vec![(0x5000 + 80, 50)]));
        new[80..130].fill(3);
        assert_eq!(pieces.name_exactly(0x5000, &old, &new, &mut out), None);
        let mut page = old.clone();
        assert_eq!(pieces.lay_over(0x5000, &mut page, &mut out), 3);
        assert_eq!(page, new);
    }

    /// `n` bytes of a xorshift sequence from `rng` (not 0).
    fn random_bytes(rng: &mut u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                *rng as u8
            })
            .collect()
    }

    /// A frame with `payload` as TCP over IPv4, as a NIC logs it (virtio-net header first).
    fn tcp(seq: u64, payload: &[u8]) -> LoggedFrame {
        let mut data = vec![0u8; 12 + 14 + 20 + 20];
        data[24..26].copy_from_slice(&0x0800u16.to_be_bytes());
        data[26] = 0x45;
        data[28..30].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
        data[35] = 6;
        data[58] = 5 << 4;
        data.extend_from_slice(payload);
        frame(seq, data, Vec::new())
    }

    #[test]
    fn a_copy_of_the_payload_is_found_across_frames_and_followed_into_the_next_page() {
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut bytes = |n: usize| random_bytes(&mut rng, n);
        let payloads: Vec<Vec<u8>> = (0..4).map(|_| bytes(1448)).collect();
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(4));
        let a = acked.clone();
        let mut pieces = InputPieces::new(Arc::new(move || {
            a.load(std::sync::atomic::Ordering::SeqCst)
        }));
        for (i, p) in payloads.iter().enumerate() {
            pieces.add(tcp(i as u64 + 1, p));
        }
        // The receiver's page, and the guest's: 700 bytes as they were, then the stream
        // from byte 300 of the first payload on.
        let base = bytes(PAGE_SIZE);
        let stream: Vec<u8> = payloads.concat();
        let mut new = base.clone();
        new[700..].copy_from_slice(&stream[300..300 + PAGE_SIZE - 700]);
        let mut page = base.clone();
        let mut out = vec![0u8; MAX_INPUT_PIECES * INPUT_PIECE_LEN];
        let (count, hint) = pieces.lay_payload(&new, None, &mut page, &mut out);
        assert_eq!(count, 3);
        assert!(page == new, "the pieces rebuild the page");
        // Where the next page goes on: payload 3 at its byte 300 + 3396 - 2 * 1448 = 800.
        assert_eq!(hint, Some((2, 66 + 800)));
        let mut next = bytes(PAGE_SIZE);
        let tail = &stream[300 + PAGE_SIZE - 700..];
        next[..tail.len()].copy_from_slice(tail);
        let mut page = vec![0u8; PAGE_SIZE];
        let (count, hint) = pieces.lay_payload(&next, hint, &mut page, &mut out);
        assert_eq!((count, hint), (2, None));
        assert!(page[..tail.len()] == *tail);
        // Unacknowledged frames are not named: only the run in frame 1 is left.
        acked.store(1, std::sync::atomic::Ordering::SeqCst);
        let mut page = base.clone();
        let (count, _) = pieces.lay_payload(&new, None, &mut page, &mut out);
        assert_eq!(count, 1);
        assert!(page[700..700 + 1148] == new[700..700 + 1148]);
        assert!(page[700 + 1148..] == base[700 + 1148..]);
    }

    /// An index built on the tables of a larger one dropped before finds its own payload
    /// and nothing of the other's.
    #[test]
    fn an_index_on_recycled_tables_finds_its_payload_only() {
        let frames = |seed: u64, count: usize| -> Vec<LoggedFrame> {
            let mut rng = seed;
            (0..count)
                .map(|i| tcp(i as u64 + 1, &random_bytes(&mut rng, 1448)))
                .collect()
        };
        let ranges = |frames: &[LoggedFrame]| -> Vec<Range<usize>> {
            frames.iter().map(|_| 66..66 + 1448).collect()
        };
        let anchors = |frames: &[LoggedFrame]| -> Vec<u64> {
            frames
                .iter()
                .flat_map(|f| {
                    (66..66 + 1448 - 8)
                        .step_by(STRIDE)
                        .map(|at| key_at(&f.data, at))
                })
                .collect()
        };
        let old = frames(1, 64);
        drop(PayloadIndex::build(&old, &ranges(&old)));
        let new = frames(2, 4);
        let index = PayloadIndex::build(&new, &ranges(&new));
        assert!(index.tables.tags.len() < 8 * 64 * 1448 / STRIDE);
        for key in anchors(&old) {
            assert_eq!(index.lookup(&new, key), None);
        }
        let found = anchors(&new)
            .into_iter()
            .filter(|&key| index.lookup(&new, key).is_some())
            .count();
        assert!(
            found * 10 >= anchors(&new).len() * 9,
            "{found} anchors found"
        );
        // A tag matches one probe in 255 of another key's slot: the frame's bytes decide.
        let mut key = 0x0123_4567_89ab_cdefu64;
        for _ in 0..200_000 {
            key = key
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            assert_eq!(index.lookup(&new, key), None, "{key:#x}");
        }
    }

    #[test]
    fn a_frame_whose_segments_do_not_cover_it_is_laid_nowhere() {
        let mut pieces = InputPieces::new(always(u64::MAX));
        pieces.add(frame(1, vec![1; 60], vec![(0x3000, 50)]));
        assert!(!pieces.touches(0x3000));
        assert_eq!(pieces.into_frames().len(), 1);
    }
}
