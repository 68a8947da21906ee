//! Helpers of the page-stream tests.

#![allow(dead_code)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::protocol::{
    apply_pages_with_input, encode_frame, Frame, FrameReader, FrameType, InputFrameSource, Message,
    TransferStats,
};
use vmm::migration::{DirtyPages, PAGE_SIZE};

/// xorshift64*: reproducible test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The first page at which `a` and `b` differ.
pub fn first_difference(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> Option<u64> {
    let mut x = vec![0u8; PAGE_SIZE];
    let mut y = vec![0u8; PAGE_SIZE];
    for r in a.iter() {
        for p in 0..r.len() / PAGE_SIZE as u64 {
            let gpa = GuestAddress(r.start_addr().0 + p * PAGE_SIZE as u64);
            a.read_slice(&mut x, gpa).unwrap();
            b.read_slice(&mut y, gpa).unwrap();
            if x != y {
                return Some(gpa.0);
            }
        }
    }
    None
}

/// Whether nothing wrote `mem` since it was created.
pub fn untouched(mem: &GuestMemoryMmap) -> bool {
    DirtyPages::from_bitmaps(&[], mem, true).unwrap().is_empty()
}

/// Parses a MemoryPages frame and applies it to `mem` (`input`: the frames held; None, a
/// stream without input).
pub fn apply(
    mem: &GuestMemoryMmap,
    flags: u8,
    payload: &[u8],
    input: Option<&dyn InputFrameSource>,
) -> Result<(), String> {
    let bytes = encode_frame(FrameType::MemoryPages, flags, 0, payload);
    let mut reader = FrameReader::new();
    let frame: Frame = reader
        .read_frame(&mut &bytes[..])
        .map_err(|e| e.to_string())?;
    let Message::MemoryPages(batch) = Message::parse(&frame).map_err(|e| e.to_string())? else {
        return Err("not a page frame".into());
    };
    let mut scratch = Vec::new();
    let mut probe = vec![0u8; PAGE_SIZE];
    let mut stats = TransferStats::default();
    apply_pages_with_input(mem, &batch, input, &mut scratch, &mut probe, &mut stats)
        .map_err(|e| e.to_string())
}
