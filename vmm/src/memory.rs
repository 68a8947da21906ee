//! Guest RAM: anonymous mappings with a dirty bitmap that records every write a device makes
//! through `vm-memory`, registered with KVM as memory slots whose dirty logging can be switched
//! on per slot for migration and fault tolerance.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::x86_64::layout;

/// Guest memory as every part of the VMM sees it (defined by `devices`, the lowest crate).
pub use devices::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory size {size} is smaller than the minimum of {min} bytes")]
    TooSmall { size: u64, min: u64 },
    #[error("memory size {size} bytes exceeds what this host can back ({host} bytes of RAM)")]
    TooBigForHost { size: u64, host: u64 },
    #[error("memory size {size} bytes exceeds the guest physical address space ({bits} bits)")]
    TooBigForAddressSpace { size: u64, bits: u32 },
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused memory slot {slot} at {addr:#x} ({size} bytes): {source}")]
    SetRegion {
        slot: u32,
        addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

fn host_ram_bytes() -> u64 {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}

/// Checks `size` before anything is mapped, so that an impossible request fails with a message
/// instead of a half-built VM. Guest RAM is not overcommitted beyond the host's RAM: a VM that
/// the host cannot back would die later, mid-run, which is worse for a VM with a hot backup.
pub fn validate_size(size: u64, phys_bits: u32) -> Result<(), MemoryError> {
    if size < layout::MIN_MEMORY_SIZE {
        return Err(MemoryError::TooSmall {
            size,
            min: layout::MIN_MEMORY_SIZE,
        });
    }
    let top = layout::ram_ranges(size)
        .last()
        .map_or(0, |(start, len)| start.0 + len);
    if phys_bits < 64 && top > (1u64 << phys_bits) {
        return Err(MemoryError::TooBigForAddressSpace {
            size,
            bits: phys_bits,
        });
    }
    let host = host_ram_bytes();
    if size > host {
        return Err(MemoryError::TooBigForHost { size, host });
    }
    Ok(())
}

pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<_> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { size, source })
}

/// Registers (or re-registers) every region with KVM as slot = region index.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping behind `region` lives as long as `mem`, which the VM owns and
        // drops only after the VM fd is closed.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| {
            MemoryError::SetRegion {
                slot,
                addr: kvm_region.guest_phys_addr,
                size: kvm_region.memory_size,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_before_mapping() {
        assert!(matches!(
            validate_size(1 << 20, 46),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            validate_size(64 << 40, 46),
            Err(MemoryError::TooBigForAddressSpace { .. })
        ));
        assert!(matches!(
            validate_size(16 << 40, 46),
            Err(MemoryError::TooBigForHost { .. })
        ));
        validate_size(64 << 20, 46).expect("64 MiB fits");
    }
}
