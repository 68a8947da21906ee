//! What the loader tells us: PVH `hvm_start_info` or Linux `boot_params`.
//! Copied out early because the workloads may reuse any RAM afterwards.

const CMDLINE_MAX: usize = 1024;
const MEM_MAX: usize = 128;
const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

unsafe extern "C" {
    static boot_info_ptr: u64;
    static boot_entry_kind: u32;
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Pvh,
    Linux64,
    Unknown,
}

#[derive(Clone, Copy, Default)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootInfo {
    pub entry: Entry,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    pub mem: [MemRegion; MEM_MAX],
    pub mem_count: usize,
    pub rsdp: u64,
}

/// Reads guest-physical memory (identity mapped, user accessible).
pub unsafe fn phys<T: Copy>(addr: u64) -> T {
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl BootInfo {
    pub fn read() -> BootInfo {
        let mut bi = BootInfo {
            entry: Entry::Unknown,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            mem: [MemRegion::default(); MEM_MAX],
            mem_count: 0,
            rsdp: 0,
        };
        // SAFETY: written by boot.S before CPL3 was entered, never after.
        let (kind, ptr) = unsafe {
            (
                core::ptr::read_volatile(core::ptr::addr_of!(boot_entry_kind)),
                core::ptr::read_volatile(core::ptr::addr_of!(boot_info_ptr)),
            )
        };
        if ptr == 0 {
            return bi;
        }
        // SAFETY: the loader's structures are in identity-mapped RAM.
        unsafe {
            match kind {
                1 => bi.read_pvh(ptr),
                2 => bi.read_linux(ptr),
                _ => {}
            }
        }
        bi
    }

    unsafe fn read_pvh(&mut self, p: u64) {
        self.entry = Entry::Pvh;
        unsafe {
            if phys::<u32>(p) != PVH_MAGIC {
                return;
            }
            let version: u32 = phys(p + 4);
            self.copy_cmdline(phys(p + 24));
            self.rsdp = phys(p + 32);
            if version >= 1 {
                let map: u64 = phys(p + 40);
                let n = (phys::<u32>(p + 48) as usize).min(MEM_MAX);
                for i in 0..n {
                    let e = map + i as u64 * 24;
                    self.push_mem(phys(e), phys(e + 8), phys(e + 16));
                }
            }
        }
    }

    unsafe fn read_linux(&mut self, p: u64) {
        self.entry = Entry::Linux64;
        unsafe {
            let lo: u32 = phys(p + 0x228);
            let hi: u32 = phys(p + 0x0c8);
            self.copy_cmdline(lo as u64 | (hi as u64) << 32);
            self.rsdp = phys(p + 0x070);
            let n = phys::<u8>(p + 0x1e8) as usize;
            for i in 0..n.min(MEM_MAX) {
                let e = p + 0x2d0 + i as u64 * 20;
                self.push_mem(phys(e), phys(e + 8), phys(e + 16));
            }
        }
    }

    fn push_mem(&mut self, addr: u64, size: u64, kind: u32) {
        if self.mem_count < MEM_MAX {
            self.mem[self.mem_count] = MemRegion { addr, size, kind };
            self.mem_count += 1;
        }
    }

    unsafe fn copy_cmdline(&mut self, addr: u64) {
        if addr == 0 {
            return;
        }
        let mut n = 0;
        while n < CMDLINE_MAX {
            // SAFETY: NUL-terminated string in RAM, bounded by CMDLINE_MAX.
            let b: u8 = unsafe { phys(addr + n as u64) };
            if b == 0 {
                break;
            }
            self.cmdline[n] = b;
            n += 1;
        }
        while n > 0 && self.cmdline[n - 1].is_ascii_whitespace() {
            n -= 1;
        }
        self.cmdline_len = n;
    }

    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    pub fn entry_name(&self) -> &'static str {
        match self.entry {
            Entry::Pvh => "pvh",
            Entry::Linux64 => "linux64",
            Entry::Unknown => "unknown",
        }
    }

    pub fn ram_regions(&self) -> impl Iterator<Item = &MemRegion> {
        self.mem[..self.mem_count]
            .iter()
            .filter(|r| r.kind == E820_RAM)
    }

    /// Total RAM reported, rounded to the nearest MiB (the map leaves holes
    /// such as the legacy VGA/BIOS area).
    pub fn ram_mib(&self) -> u64 {
        let total: u64 = self.ram_regions().map(|r| r.size).sum();
        (total + (1 << 19)) >> 20
    }
}
