//! Guest physical memory map. Low addresses follow the PC conventions Linux expects; boot
//! structures sit in the first MiB below the kernel, devices above RAM under 4 GiB.

use vm_memory::GuestAddress;

/// GDT used for the boot CPU's entry state (the guest replaces it).
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// PVH `hvm_start_info` and, right after it, its memory map.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6100);
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (0x7000 - 0x6100) / 24;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry: PML4, one PDPT and four page directories
/// (2 MiB pages) covering the first 4 GiB.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
pub const IDENTITY_MAPPED_GIB: u64 = 4;
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Linux's x86 COMMAND_LINE_SIZE is 2048; newer kernels accept more, 4 KiB keeps us generous.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// The extended BIOS data area, reserved as on a PC.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
pub const EBDA_END: u64 = 0xa0000;
/// The MP table sits in the BIOS area, which Linux scans for its floating pointer; the
/// guest's memory map does not list it as RAM, so nothing overwrites it.
pub const MPTABLE_START: GuestAddress = GuestAddress(0xf_0000);
pub const MPTABLE_END: u64 = 0x10_0000;
/// Kernels load at or above 1 MiB.
pub const HIGH_RAM_START: GuestAddress = GuestAddress(0x10_0000);
/// RAM stops below this address; the hole up to 4 GiB holds the IOAPIC, LAPIC and MMIO.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
pub const RAM_64BIT_START: GuestAddress = GuestAddress(0x1_0000_0000);
/// The PCI machine (Cloud Hypervisor's layout in spirit): BARs the VMM assigns live in the
/// 32-bit window at the start of the hole; the guest may move 64-bit BARs to the 64-bit window
/// above RAM ([`pci_mmio64_window`]). ECAM (PCI Express enhanced configuration access,
/// described by the MCFG table) covers segment 0, bus 0 only: 32 devices x 8 functions x 4 KiB.
pub const PCI_MMIO32_START: u64 = MEM_32BIT_GAP_START;
pub const PCI_MMIO32_SIZE: u64 = 0x2800_0000;
pub const PCI_ECAM_START: u64 = 0xe800_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The last PCI bus number ECAM covers.
pub const PCI_ECAM_LAST_BUS: u8 = 0;
/// Legacy configuration mechanism #1: address at 0xcf8, data at 0xcfc..0xcff.
pub const PCI_CONFIG_IO_START: u64 = 0xcf8;
pub const PCI_CONFIG_IO_SIZE: u64 = 8;
/// ACPI generic event device (GED, ACPI0013): one 32-bit register the guest reads to learn
/// which event fired (bit 0: power button), raised on [`GED_IRQ`].
pub const GED_START: u64 = 0xfe00_0000;
pub const GED_SIZE: u64 = 0x10;
pub const GED_IRQ: u32 = 5;
/// The PCI hot-plug controller's registers (slot bitmaps and the eject register, see
/// `devices::pci::hotplug`), next to the GED whose PCI event announces them.
pub const PCI_HOTPLUG_START: u64 = 0xfe00_1000;
pub const PCI_HOTPLUG_SIZE: u64 = devices::pci::hotplug::HOTPLUG_REGISTERS_SIZE;
/// ACPI tables: the RSDP at the start (Linux also scans 0xe0000..0xfffff for it), the other
/// tables after it, below the MP table.
pub const ACPI_START: GuestAddress = GuestAddress(0xe_0000);
pub const ACPI_END: u64 = 0xf_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// Where KVM places its TSS and identity-map pages (three pages, inside the 32-bit hole).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Smallest guest RAM we accept: room for the boot structures, a kernel and its stack.
pub const MIN_MEMORY_SIZE: u64 = 2 << 20;

/// The guest RAM ranges for `size` bytes of memory: below the 32-bit gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MEM_32BIT_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((RAM_64BIT_START, size - low));
    }
    ranges
}

/// The 64-bit PCI window: from the first 4 GiB boundary at or above the end of RAM, 64 GiB,
/// clipped to what the CPU's physical address width reaches.
pub fn pci_mmio64_window(mem_size: u64, phys_bits: u8) -> (u64, u64) {
    const FOUR_GIB: u64 = 1 << 32;
    let ram_end = ram_ranges(mem_size)
        .last()
        .map_or(0, |(start, len)| start.0 + len);
    let start = ram_end.max(FOUR_GIB).div_ceil(FOUR_GIB) * FOUR_GIB;
    let limit = 1u64 << phys_bits.clamp(36, 52);
    (start, (64u64 << 30).min(limit.saturating_sub(start)))
}

/// A memory-map entry as both the e820 table and the PVH memmap describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

/// The map the guest sees: low RAM up to the EBDA, the EBDA reserved (it holds the MP table),
/// RAM from 1 MiB, and RAM above 4 GiB when the guest is big enough.
pub fn memory_map(size: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START.0,
            kind: MemoryKind::Ram,
        },
        MemoryMapEntry {
            addr: EBDA_START.0,
            size: EBDA_END - EBDA_START.0,
            kind: MemoryKind::Reserved,
        },
    ];
    for (start, len) in ram_ranges(size) {
        let start = start.0.max(HIGH_RAM_START.0);
        let end = if start >= RAM_64BIT_START.0 {
            start + len
        } else {
            len
        };
        if end > start {
            map.push(MemoryMapEntry {
                addr: start,
                size: end - start,
                kind: MemoryKind::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_low_ram_only() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let map = memory_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, HIGH_RAM_START.0);
        assert_eq!(map[2].size, (512 << 20) - HIGH_RAM_START.0);
    }

    #[test]
    fn big_guest_skips_the_32bit_gap() {
        let size = 4u64 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(ranges[1], (RAM_64BIT_START, size - MEM_32BIT_GAP_START));
        let map = memory_map(size);
        let total: u64 = map
            .iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.size)
            .sum();
        // Only the EBDA and the legacy hole below 1 MiB are not RAM.
        assert_eq!(total, size - (HIGH_RAM_START.0 - EBDA_START.0));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MEM_32BIT_GAP_START || e.addr >= RAM_64BIT_START.0));
    }
}
