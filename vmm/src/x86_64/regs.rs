//! Boot CPU register state for the two entry protocols: the Linux 64-bit entry (long mode,
//! identity-mapped page tables) and the PVH entry (32-bit protected mode, paging off).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, IDENTITY_MAPPED_GIB, PDE_START,
    PDPTE_START, PML4_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_HUGE: u64 = 0x80;

/// How the kernel is entered, decided by what the loader found in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: `rsi` holds the zero page.
    Linux64 { entry: GuestAddress },
    /// PVH: `rbx` holds `hvm_start_info`.
    Pvh { entry: GuestAddress },
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot page tables or GDT into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
}

/// A GDT descriptor from the packed flags/base/limit form used by Linux's GDT_ENTRY macro.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = (((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000)) as u32;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: u64::from(base),
        // A page-granular limit covers whole pages.
        limit: if granularity == 1 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from((entry >> 47) & 1 == 0),
    }
}

fn write_gdt<M: GuestMemory>(mem: &M, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, BOOT_GDT_START.unchecked_add(i as u64 * 8))
            .map_err(RegsError::GuestMemory)?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)
        .map_err(RegsError::GuestMemory)
}

/// Identity page tables for the first [`IDENTITY_MAPPED_GIB`] GiB with 2 MiB pages.
fn write_identity_page_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START.0 | PAGE_PRESENT_RW, PML4_START)
        .map_err(RegsError::GuestMemory)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START.0 + gib * 0x1000;
        mem.write_obj(pd | PAGE_PRESENT_RW, PDPTE_START.unchecked_add(gib * 8))
            .map_err(RegsError::GuestMemory)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | PAGE_PRESENT_RW | PAGE_HUGE, GuestAddress(pd + i * 8))
                .map_err(RegsError::GuestMemory)?;
        }
    }
    Ok(())
}

/// Special registers for `mode`, writing the boot GDT (and page tables for 64-bit entry).
pub fn boot_sregs<M: GuestMemory>(
    mem: &M,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt: [u64; 4] = match mode {
        EntryMode::Linux64 { .. } => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        EntryMode::Pvh { .. } => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xffff_ffff), // 32-bit code
            gdt_entry(0xc093, 0, 0xffff_ffff), // data
            gdt_entry(0x008b, 0, 0x67),        // TSS
        ],
    };
    write_gdt(mem, &gdt)?;
    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match mode {
        EntryMode::Linux64 { .. } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START.0;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// General registers: entry point, stack and the boot information pointer.
pub fn boot_regs(mode: EntryMode, boot_info: GuestAddress) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 { entry } => {
            regs.rip = entry.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot_info.0;
        }
        EntryMode::Pvh { entry } => {
            regs.rip = entry.0;
            regs.rbx = boot_info.0;
        }
    }
    regs
}

/// FPU reset state as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_decode_back() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code64.l, 1);
        assert_eq!(code64.db, 0);
        assert_eq!(code64.type_, 0xb);
        assert_eq!(code64.limit, 0xffff_ffff);
        assert_eq!(code64.selector, 8);
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xffff_ffff), 1);
        assert_eq!(code32.l, 0);
        assert_eq!(code32.db, 1);
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!(tss.limit, 0x67);
        assert_eq!(tss.g, 0);
        assert_eq!(tss.unusable, 0);
    }

    #[test]
    fn long_mode_sregs_identity_map_low_memory() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory");
        let mode = EntryMode::Linux64 {
            entry: GuestAddress(0x10_0000),
        };
        let sregs = boot_sregs(&mem, mode, kvm_sregs::default()).expect("sregs");
        assert_eq!(sregs.cr3, PML4_START.0);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let pde3: u64 = mem
            .read_obj(GuestAddress(PDE_START.0 + 3 * 0x1000 + 511 * 8))
            .expect("pde");
        assert_eq!(pde3 & !0xfff, (3 << 30) | (511 << 21));
        let regs = boot_regs(mode, GuestAddress(0x7000));
        assert_eq!((regs.rip, regs.rsi), (0x10_0000, 0x7000));
    }
}
