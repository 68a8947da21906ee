//! PCI configuration space and a scan of bus 0.
//!
//! Two access methods. Mechanism #1 (address port 0xcf8, data port 0xcfc)
//! works on any PC-like machine, but port I/O is only possible at CPL0, so
//! every access is two system calls (address, then data), each running
//! emulated kernel code on the nested KVM we test on. ECAM (the PCI Express
//! configuration window the ACPI MCFG table describes) is plain MMIO that
//! CPL3 reaches directly: one exit per access, several times cheaper. ECAM is
//! used when the MCFG names one and it agrees with mechanism #1 about
//! 00:00.0; `pci=cf8` on the command line forces mechanism #1.
//!
//! Configuration space is read at set-up only, and no more of it than the
//! drivers need.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::sys;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

pub const VENDOR_ID: u8 = 0x00;
pub const COMMAND: u8 = 0x04;
pub const CLASS_REV: u8 = 0x08;
pub const HEADER: u8 = 0x0c;
pub const BAR0: u8 = 0x10;
pub const SUBSYSTEM: u8 = 0x2c;
pub const CAP_PTR: u8 = 0x34;
pub const INTERRUPT: u8 = 0x3c;

const STATUS_CAP_LIST: u32 = 1 << 4;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
const CMD_INTX_DISABLE: u16 = 1 << 10;

/// Capability ID of a vendor-specific capability.
pub const CAP_VENDOR: u8 = 0x09;

/// Functions kept by `scan` (bus 0 has at most 32 x 8).
pub const MAX_FUNCTIONS: usize = 32;

/// Bus, device, function.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Addr {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl core::fmt::Display for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

/// ECAM base of bus 0, 0 for none (mechanism #1).
static ECAM: AtomicU64 = AtomicU64::new(0);

/// How configuration space is reached, for the listing.
pub fn method() -> &'static str {
    if ECAM.load(Ordering::Relaxed) != 0 {
        "ecam"
    } else {
        "cf8"
    }
}

impl Addr {
    fn ecam(&self, off: u8) -> Option<u64> {
        match ECAM.load(Ordering::Relaxed) {
            0 => None,
            base => Some(
                base + ((self.bus as u64) << 20
                    | (self.dev as u64 & 31) << 15
                    | (self.func as u64 & 7) << 12
                    | off as u64),
            ),
        }
    }

    fn cf8(&self, off: u8) -> u32 {
        1 << 31
            | (self.bus as u32) << 16
            | (self.dev as u32 & 31) << 11
            | (self.func as u32 & 7) << 8
            | (off as u32 & 0xfc)
    }

    /// The aligned dword at `off` (low two bits ignored).
    pub fn read32(&self, off: u8) -> u32 {
        if let Some(a) = self.ecam(off & 0xfc) {
            // SAFETY: the ECAM window, identity mapped (checked by the MCFG
            // lookup), user accessible.
            return unsafe { core::ptr::read_volatile(a as usize as *const u32) };
        }
        self.read32_cf8(off)
    }

    fn read32_cf8(&self, off: u8) -> u32 {
        sys::outl(CONFIG_ADDRESS, self.cf8(off));
        sys::inl(CONFIG_DATA)
    }

    /// A 16-bit register (`off` even): a word access, so the register
    /// sharing its dword (e.g. the status register's write-1-to-clear bits)
    /// is left alone.
    pub fn write16(&self, off: u8, v: u16) {
        if let Some(a) = self.ecam(off & 0xfe) {
            // SAFETY: as in `read32`.
            unsafe { core::ptr::write_volatile(a as usize as *mut u16, v) };
            return;
        }
        sys::outl(CONFIG_ADDRESS, self.cf8(off));
        sys::outw(CONFIG_DATA + (off as u16 & 2), v);
    }

    /// Turns on memory decoding and bus mastering (DMA) and masks INTx: the
    /// drivers poll and use no interrupts.
    pub fn enable(&self) {
        let cmd = self.read32(COMMAND) as u16;
        let want = cmd | CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE;
        if want != cmd {
            self.write16(COMMAND, want);
        }
    }

    /// The address a memory BAR holds (as firmware or the VMM programmed
    /// it), 64-bit BARs included; None for an I/O BAR or a bad index.
    pub fn mem_bar(&self, index: u8) -> Option<u64> {
        if index > 5 {
            return None;
        }
        let lo = self.read32(BAR0 + 4 * index);
        if lo & 1 != 0 {
            return None;
        }
        let base = (lo & !0xf) as u64;
        match (lo >> 1) & 3 {
            0 => Some(base),
            2 if index < 5 => Some((self.read32(BAR0 + 4 * (index + 1)) as u64) << 32 | base),
            _ => None,
        }
    }

    /// The capabilities list: (offset, first dword) of each entry; the
    /// capability ID is the dword's low byte.
    pub fn caps(&self) -> Caps {
        let next = if self.read32(COMMAND) >> 16 & STATUS_CAP_LIST != 0 {
            self.read32(CAP_PTR) as u8 & 0xfc
        } else {
            0
        };
        Caps {
            addr: *self,
            next,
            left: 48,
        }
    }
}

pub struct Caps {
    addr: Addr,
    next: u8,
    /// A malformed list may loop: at most 48 entries fit in 256 bytes.
    left: u8,
}

impl Iterator for Caps {
    type Item = (u8, u32);

    fn next(&mut self) -> Option<(u8, u32)> {
        if self.next < 0x40 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let off = self.next;
        let head = self.addr.read32(off);
        self.next = (head >> 8) as u8 & 0xfc;
        Some((off, head))
    }
}

/// One function found by `scan`.
#[derive(Clone, Copy, Default)]
pub struct Function {
    pub addr: Addr,
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: u32,
    pub header_type: u8,
}

pub struct Bus {
    pub list: [Function; MAX_FUNCTIONS],
    pub count: usize,
}

impl Bus {
    pub fn empty() -> Bus {
        Bus {
            list: [Function::default(); MAX_FUNCTIONS],
            count: 0,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Function> {
        self.list[..self.count].iter()
    }
}

/// Picks the access method: `ecam` is the MCFG's window for bus 0, if any,
/// and `cf8_only` refuses it. ECAM is trusted only if it reads 00:00.0's IDs
/// as mechanism #1 does (one access through each).
pub fn init(ecam: Option<u64>, cf8_only: bool) {
    ECAM.store(0, Ordering::Relaxed);
    let Some(base) = ecam.filter(|_| !cf8_only) else {
        return;
    };
    let a = Addr::default();
    // SAFETY: as in `read32`.
    let via_ecam = unsafe { core::ptr::read_volatile(base as usize as *const u32) };
    if via_ecam != 0xffff_ffff && via_ecam == a.read32_cf8(VENDOR_ID) {
        ECAM.store(base, Ordering::Relaxed);
    }
}

/// Functions on bus 0, in (device, function) order. Function 0 of each
/// device, and functions 1..7 of multi-function devices. Nothing answering
/// at 00:00.0 (no host bridge) is taken to mean there is no PCI bus: two
/// system calls, not 64, on a machine without one.
pub fn scan() -> Bus {
    let mut bus = Bus::empty();
    'devices: for dev in 0..32 {
        for func in 0..8 {
            let addr = Addr { bus: 0, dev, func };
            let id = addr.read32(VENDOR_ID);
            if id as u16 == 0xffff {
                if func == 0 {
                    if dev == 0 {
                        break 'devices;
                    }
                    continue 'devices;
                }
                continue;
            }
            let header_type = (addr.read32(HEADER) >> 16) as u8;
            if bus.count < MAX_FUNCTIONS {
                bus.list[bus.count] = Function {
                    addr,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    class: addr.read32(CLASS_REV) >> 8,
                    header_type,
                };
                bus.count += 1;
            }
            if func == 0 && header_type & 0x80 == 0 {
                continue 'devices;
            }
        }
    }
    bus
}
