//! Memory for device rings, I/O buffers and socket buffers: a bump allocator
//! over RAM from 16 MiB up (the image must stay below 2 MiB, so large buffers
//! cannot be statics). Memory is identity mapped, so an allocation's address
//! is also the physical address a device is given. Nothing is ever freed:
//! each workload allocates once at start.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::bootinfo::BootInfo;

static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

/// Takes the largest RAM region above 16 MiB and below 4 GiB (the identity
/// map) for the allocator.
pub fn init(info: &BootInfo) {
    let floor = crate::free_mem_start().max(16 << 20);
    let mut best = (0u64, 0u64);
    for r in info.ram_regions() {
        let start = r.addr.max(floor).next_multiple_of(4096);
        let end = (r.addr + r.size).min(1 << 32) & !4095;
        if end > start && end - start > best.1 - best.0 {
            best = (start, end);
        }
    }
    NEXT.store(best.0, Ordering::Relaxed);
    END.store(best.1, Ordering::Relaxed);
}

/// `bytes` of zeroed memory aligned to `align` (a power of two), or a panic
/// naming the shortfall: the workloads cannot run without it.
pub fn alloc(bytes: usize, align: usize) -> *mut u8 {
    let start = NEXT.load(Ordering::Relaxed).next_multiple_of(align as u64);
    let end = start + bytes as u64;
    if start == 0 || end > END.load(Ordering::Relaxed) {
        panic!("out of memory: {} bytes wanted", bytes);
    }
    NEXT.store(end, Ordering::Relaxed);
    // SAFETY: RAM the loader reported, handed out once.
    unsafe { core::ptr::write_bytes(start as *mut u8, 0, bytes) };
    start as *mut u8
}

pub fn alloc_bytes(bytes: usize) -> &'static mut [u8] {
    // SAFETY: fresh, zeroed, never aliased.
    unsafe { core::slice::from_raw_parts_mut(alloc(bytes, 4096), bytes) }
}

/// An array of `n` values made by `f` (for smoltcp's socket and metadata
/// storage, which must outlive the interface).
pub fn alloc_array<T>(n: usize, f: impl Fn() -> T) -> &'static mut [T] {
    let p = alloc(
        n * core::mem::size_of::<T>(),
        core::mem::align_of::<T>().max(8),
    ) as *mut T;
    for i in 0..n {
        // SAFETY: inside the fresh allocation, suitably aligned.
        unsafe { p.add(i).write(f()) };
    }
    // SAFETY: all n elements initialized above.
    unsafe { core::slice::from_raw_parts_mut(p, n) }
}
