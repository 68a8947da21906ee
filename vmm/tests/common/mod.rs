//! Helpers of the page-stream tests.

#![allow(dead_code)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::memory::GuestMemoryMmap;
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
