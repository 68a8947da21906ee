//! Which guest pages to transfer: a set of pages kept as one bitmap per memory region, built
//! from KVM's per-slot dirty logs OR'ed with the dirty bitmap that `vm-memory` keeps for every
//! write a device makes (DESIGN: the dirty set of an epoch = KVM's bitmap OR the device bitmap).
//!
//! Bit layout (the same as KVM's `KVM_GET_DIRTY_LOG` and `vm-memory`'s `AtomicBitmap`): region
//! (slot) `i` of the `GuestMemoryMmap`, word `w`, bit `b` is the page at
//! `region.start + (w * 64 + b) * PAGE_SIZE`.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;

/// The page size of every transfer format (x86_64 base pages; KVM logs dirtiness per 4 KiB).
pub const PAGE_SIZE: usize = 4096;
const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;
const PAGE_SHIFT: u32 = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtyPagesError {
    #[error(
        "got {got} KVM dirty bitmaps, guest memory has {regions} regions (one slot per region)"
    )]
    SlotCount { got: usize, regions: usize },
    #[error("KVM dirty bitmap of slot {slot} has {got} words, region {slot} needs {need}")]
    BitmapTooShort {
        slot: usize,
        got: usize,
        need: usize,
    },
    #[error("region {region} is not a whole number of {PAGE_SIZE}-byte pages ({len} bytes)")]
    RegionNotPageAligned { region: usize, len: u64 },
    #[error(
        "the dirty bitmap of region {region} tracks {got} pages, the region has {need} \
         (host page size is not {PAGE_SIZE}?)"
    )]
    DeviceBitmapSize {
        region: usize,
        got: usize,
        need: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RegionPages {
    start: u64,
    pages: u64,
    bits: Vec<u64>,
}

impl RegionPages {
    fn words(pages: u64) -> usize {
        pages.div_ceil(64) as usize
    }

    /// Clears the bits past the last page, which a KVM bitmap may carry in its last word.
    fn mask_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// First set bit at or after `from`, below `self.pages`.
    fn next_set(&self, from: u64) -> Option<u64> {
        self.scan(from, false)
    }

    /// First clear bit at or after `from`, or `self.pages`.
    fn next_clear(&self, from: u64) -> u64 {
        self.scan(from, true).unwrap_or(self.pages)
    }

    fn scan(&self, from: u64, invert: bool) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut word = (from / 64) as usize;
        let flip = if invert { u64::MAX } else { 0 };
        let mut bits = (self.bits.get(word)? ^ flip) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let page = word as u64 * 64 + u64::from(bits.trailing_zeros());
                return (page < self.pages).then_some(page);
            }
            word += 1;
            bits = self.bits.get(word)? ^ flip;
        }
    }
}

/// A set of guest pages, e.g. the pages dirtied since the last harvest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    regions: Vec<RegionPages>,
}

impl DirtyPages {
    fn with_layout(mem: &GuestMemoryMmap, fill: u64) -> Result<Self, DirtyPagesError> {
        let mut regions = Vec::new();
        for (i, region) in mem.iter().enumerate() {
            let len = region.len();
            if len % PAGE_SIZE_U64 != 0 {
                return Err(DirtyPagesError::RegionNotPageAligned { region: i, len });
            }
            let pages = len >> PAGE_SHIFT;
            let mut r = RegionPages {
                start: region.start_addr().0,
                pages,
                bits: vec![fill; RegionPages::words(pages)],
            };
            r.mask_tail();
            regions.push(r);
        }
        Ok(Self { regions })
    }

    /// No page of `mem`.
    pub fn empty(mem: &GuestMemoryMmap) -> Result<Self, DirtyPagesError> {
        Self::with_layout(mem, 0)
    }

    /// Every page of `mem` (the first pass of a migration, or a full snapshot).
    pub fn all(mem: &GuestMemoryMmap) -> Result<Self, DirtyPagesError> {
        Self::with_layout(mem, u64::MAX)
    }

    /// The union of the per-slot KVM dirty bitmaps (what `Vm::take_dirty_log()` returns; slot
    /// `i` is region `i` of `mem`) and, when `harvest_device_bitmap` is set, the pages devices
    /// wrote through `vm-memory` since the last harvest. Harvesting resets `mem`'s bitmap, so
    /// the next call sees only newer writes. An empty `kvm_bitmaps` means "no KVM log" (dirty
    /// logging off): only the device bitmap counts.
    pub fn from_bitmaps(
        kvm_bitmaps: &[Vec<u64>],
        mem: &GuestMemoryMmap,
        harvest_device_bitmap: bool,
    ) -> Result<Self, DirtyPagesError> {
        let mut set = Self::empty(mem)?;
        let regions = set.regions.len();
        if !kvm_bitmaps.is_empty() && kvm_bitmaps.len() != regions {
            return Err(DirtyPagesError::SlotCount {
                got: kvm_bitmaps.len(),
                regions,
            });
        }
        // Validate everything before resetting the device bitmap, so that an error loses no
        // dirty bit.
        for (slot, (bitmap, r)) in kvm_bitmaps.iter().zip(&set.regions).enumerate() {
            let need = r.bits.len();
            if bitmap.len() < need {
                return Err(DirtyPagesError::BitmapTooShort {
                    slot,
                    got: bitmap.len(),
                    need,
                });
            }
        }
        if harvest_device_bitmap {
            for (i, (region, r)) in mem.iter().zip(&set.regions).enumerate() {
                let got = (**region).bitmap().len();
                if got as u64 != r.pages {
                    return Err(DirtyPagesError::DeviceBitmapSize {
                        region: i,
                        got,
                        need: r.pages,
                    });
                }
            }
        }
        for (bitmap, r) in kvm_bitmaps.iter().zip(set.regions.iter_mut()) {
            for (dst, src) in r.bits.iter_mut().zip(bitmap) {
                *dst |= *src;
            }
        }
        if harvest_device_bitmap {
            for (region, r) in mem.iter().zip(set.regions.iter_mut()) {
                let device = (**region).bitmap().get_and_reset();
                for (dst, src) in r.bits.iter_mut().zip(&device) {
                    *dst |= *src;
                }
            }
        }
        for r in &mut set.regions {
            r.mask_tail();
        }
        Ok(set)
    }

    /// A set holding `pages` (addresses are rounded down to their page); addresses outside
    /// `mem` are ignored and counted in the returned number.
    pub fn from_pages(
        mem: &GuestMemoryMmap,
        pages: impl IntoIterator<Item = GuestAddress>,
    ) -> Result<(Self, usize), DirtyPagesError> {
        let mut set = Self::empty(mem)?;
        let mut outside = 0;
        for gpa in pages {
            if !set.insert(gpa) {
                outside += 1;
            }
        }
        Ok((set, outside))
    }

    /// Adds the page holding `gpa`; false if no region holds it.
    pub fn insert(&mut self, gpa: GuestAddress) -> bool {
        for r in &mut self.regions {
            if gpa.0 >= r.start && (gpa.0 - r.start) >> PAGE_SHIFT < r.pages {
                let page = (gpa.0 - r.start) >> PAGE_SHIFT;
                r.bits[(page / 64) as usize] |= 1 << (page % 64);
                return true;
            }
        }
        false
    }

    /// Whether the page holding `gpa` is in the set.
    pub fn contains(&self, gpa: GuestAddress) -> bool {
        self.regions.iter().any(|r| {
            gpa.0 >= r.start && {
                let page = (gpa.0 - r.start) >> PAGE_SHIFT;
                page < r.pages && r.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
            }
        })
    }

    /// Adds every page of `other` (which must describe the same memory layout; regions that
    /// differ are skipped).
    pub fn union_with(&mut self, other: &DirtyPages) {
        for (dst, src) in self.regions.iter_mut().zip(&other.regions) {
            if dst.start == src.start && dst.pages == src.pages {
                for (d, s) in dst.bits.iter_mut().zip(&src.bits) {
                    *d |= *s;
                }
            }
        }
    }

    /// Takes every page out (the layout stays).
    pub fn clear(&mut self) {
        for r in &mut self.regions {
            r.bits.fill(0);
        }
    }

    /// Takes every page of `other` out (same layout as for [`DirtyPages::union_with`]).
    pub fn subtract(&mut self, other: &DirtyPages) {
        for (dst, src) in self.regions.iter_mut().zip(&other.regions) {
            if dst.start == src.start && dst.pages == src.pages {
                for (d, s) in dst.bits.iter_mut().zip(&src.bits) {
                    *d &= !*s;
                }
            }
        }
    }

    /// Keeps only the pages also in `other` (same layout as for [`DirtyPages::union_with`];
    /// a region that differs is emptied).
    pub fn intersect_with(&mut self, other: &DirtyPages) {
        for (i, dst) in self.regions.iter_mut().enumerate() {
            match other.regions.get(i) {
                Some(src) if dst.start == src.start && dst.pages == src.pages => {
                    for (d, s) in dst.bits.iter_mut().zip(&src.bits) {
                        *d &= *s;
                    }
                }
                _ => dst.bits.fill(0),
            }
        }
    }

    /// Takes the page holding `gpa` out; false if it was not in the set.
    pub fn remove(&mut self, gpa: GuestAddress) -> bool {
        for r in &mut self.regions {
            if gpa.0 >= r.start && (gpa.0 - r.start) >> PAGE_SHIFT < r.pages {
                let page = (gpa.0 - r.start) >> PAGE_SHIFT;
                let word = &mut r.bits[(page / 64) as usize];
                let bit = 1 << (page % 64);
                let was = *word & bit != 0;
                *word &= !bit;
                return was;
            }
        }
        false
    }

    /// Per region (= KVM memory slot) of the layout: its number of pages and its bitmap, 64
    /// pages a word, as KVM's dirty-log calls take them.
    pub fn slot_bitmaps(&self) -> impl Iterator<Item = (u64, &[u64])> {
        self.regions.iter().map(|r| (r.pages, r.bits.as_slice()))
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.bits)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.iter().flat_map(|r| &r.bits).all(|w| *w == 0)
    }

    /// Maximal runs of consecutive pages in the set, as (first page, number of pages), in
    /// address order; a run never crosses a region boundary.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            set: self,
            region: 0,
            next: 0,
        }
    }

    /// Every page in the set, in address order.
    pub fn iter(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.runs()
            .flat_map(|(start, n)| (0..n).map(move |i| GuestAddress(start.0 + (i << PAGE_SHIFT))))
    }
}

/// Iterator over the runs of a [`DirtyPages`].
pub struct Runs<'a> {
    set: &'a DirtyPages,
    region: usize,
    next: u64,
}

impl Iterator for Runs<'_> {
    type Item = (GuestAddress, u64);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let r = self.set.regions.get(self.region)?;
            match r.next_set(self.next) {
                Some(first) => {
                    let end = r.next_clear(first);
                    self.next = end;
                    return Some((GuestAddress(r.start + (first << PAGE_SHIFT)), end - first));
                }
                None => {
                    self.region += 1;
                    self.next = 0;
                }
            }
        }
    }
}

/// Whether `page` holds only zero bytes (OR-folded 64 bytes at a time so the compiler can
/// vectorise it).
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let chunks = page.chunks_exact(64);
    let tail = chunks.remainder();
    chunks
        .map(|c| {
            c.chunks_exact(8).fold(0u64, |acc, w| {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                acc | u64::from_ne_bytes(b)
            })
        })
        .all(|acc| acc == 0)
        && tail.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 100 * PAGE_SIZE),
            (GuestAddress(1 << 32), 130 * PAGE_SIZE),
        ])
        .unwrap()
    }

    #[test]
    fn all_and_empty() {
        let m = mem();
        let all = DirtyPages::all(&m).unwrap();
        assert_eq!(all.count(), 230);
        assert_eq!(
            all.runs().collect::<Vec<_>>(),
            vec![(GuestAddress(0), 100), (GuestAddress(1 << 32), 130)]
        );
        let empty = DirtyPages::empty(&m).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.runs().count(), 0);
    }

    #[test]
    fn kvm_and_device_bitmaps_are_combined() {
        use vm_memory::Bytes;
        let m = mem();
        m.write_slice(&[1, 2, 3], GuestAddress(5 * PAGE_SIZE as u64 + 10))
            .unwrap();
        // Slot 0: pages 0, 1, 63, 64 and a stray bit past the region end (page 120).
        // Slot 1: the last page (129).
        let kvm = vec![vec![1 | 2 | (1 << 63), 1 | (1 << 56)], vec![0, 0, 1 << 1]];
        let set = DirtyPages::from_bitmaps(&kvm, &m, true).unwrap();
        let pages: Vec<u64> = set.iter().map(|a| a.0).collect();
        let p = PAGE_SIZE as u64;
        assert_eq!(
            pages,
            vec![0, p, 5 * p, 63 * p, 64 * p, (1 << 32) + 129 * p]
        );
        assert_eq!(
            set.runs().collect::<Vec<_>>()[0..2],
            [(GuestAddress(0), 2), (GuestAddress(5 * p), 1)]
        );
        // The device bitmap was reset by the harvest.
        let again = DirtyPages::from_bitmaps(&[], &m, true).unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn bad_bitmaps_are_rejected_without_losing_device_bits() {
        use vm_memory::Bytes;
        let m = mem();
        m.write_slice(&[1], GuestAddress(0)).unwrap();
        assert_eq!(
            DirtyPages::from_bitmaps(&[vec![0; 2]], &m, true),
            Err(DirtyPagesError::SlotCount { got: 1, regions: 2 })
        );
        assert_eq!(
            DirtyPages::from_bitmaps(&[vec![0; 2], vec![0; 2]], &m, true),
            Err(DirtyPagesError::BitmapTooShort {
                slot: 1,
                got: 2,
                need: 3
            })
        );
        let set = DirtyPages::from_bitmaps(&[], &m, true).unwrap();
        assert!(set.contains(GuestAddress(0)));
    }

    #[test]
    fn insert_contains_union() {
        let m = mem();
        let (mut a, outside) = DirtyPages::from_pages(
            &m,
            [GuestAddress(0x1234), GuestAddress(200 * PAGE_SIZE as u64)],
        )
        .unwrap();
        assert_eq!(outside, 1);
        assert!(a.contains(GuestAddress(0x1000)));
        assert!(!a.contains(GuestAddress(0x2000)));
        let (b, _) = DirtyPages::from_pages(&m, [GuestAddress(0x2000)]).unwrap();
        a.union_with(&b);
        assert_eq!(
            a.runs().collect::<Vec<_>>(),
            vec![(GuestAddress(0x1000), 2)]
        );
    }

    #[test]
    fn intersection_keeps_the_common_pages() {
        let m = mem();
        let p = PAGE_SIZE as u64;
        let pages = |list: &[u64]| {
            DirtyPages::from_pages(&m, list.iter().map(|&a| GuestAddress(a)))
                .unwrap()
                .0
        };
        let mut a = pages(&[0, 5 * p, 64 * p, (1 << 32) + 129 * p]);
        a.intersect_with(&pages(&[5 * p, 64 * p, 65 * p, (1 << 32) + 129 * p]));
        assert_eq!(
            a.iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![5 * p, 64 * p, (1 << 32) + 129 * p]
        );
        // Another layout shares no page.
        let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 50 * PAGE_SIZE)]).unwrap();
        a.intersect_with(&DirtyPages::all(&other).unwrap());
        assert!(a.is_empty());
    }

    #[test]
    fn zero_check() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&page));
        page[PAGE_SIZE - 1] = 0;
        page[17] = 0x80;
        assert!(!is_zero(&page));
        assert!(is_zero(&[0u8; 5]));
        assert!(!is_zero(&[0, 0, 0, 0, 1]));
    }
}
