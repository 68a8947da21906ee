//! Starting the application processors (INIT-SIPI-SIPI through the LAPIC,
//! sent from CPL3: the xAPIC page is mapped user) and their CPL3 life.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::{clock, sys, workloads, MAX_CPUS};

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const TRAMPOLINE: u64 = 0x8000;

const REG_ID: u32 = 0x20;
const REG_SVR: u32 = 0xf0;
const REG_ICR_LO: u32 = 0x300;
const REG_ICR_HI: u32 = 0x310;

const ICR_INIT: u32 = 0x0000_c500; // INIT, level, assert
const ICR_STARTUP: u32 = 0x0000_4600;
const ICR_PENDING: u32 = 1 << 12;
const ICR_ALL_BUT_SELF: u32 = 0x000c_0000;

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

/// CPUs (including the BSP) that reached CPL3.
pub static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// APs run the SMP workload once this is set, else they park.
pub static RUN_WORK: AtomicBool = AtomicBool::new(false);
pub static APIC_ID: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];
pub static RESULT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
pub static FINISHED: AtomicUsize = AtomicUsize::new(0);

struct Lapic {
    x2: bool,
    base: u64,
}

impl Lapic {
    fn get() -> Lapic {
        let v = sys::rdmsr(MSR_APIC_BASE);
        let base = v & 0xf_ffff_f000;
        Lapic {
            x2: v & APIC_BASE_X2APIC != 0,
            base: if base == 0 { 0xfee0_0000 } else { base },
        }
    }

    fn read(&self, reg: u32) -> u32 {
        if self.x2 {
            sys::rdmsr(0x800 + (reg >> 4)) as u32
        } else {
            // SAFETY: LAPIC MMIO page, identity mapped and user accessible.
            unsafe { core::ptr::read_volatile((self.base + reg as u64) as *const u32) }
        }
    }

    fn write(&self, reg: u32, v: u32) {
        if self.x2 {
            sys::wrmsr(0x800 + (reg >> 4), v as u64);
        } else {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile((self.base + reg as u64) as *mut u32, v) }
        }
    }

    fn id(&self) -> u32 {
        let v = self.read(REG_ID);
        if self.x2 {
            v
        } else {
            v >> 24
        }
    }

    fn enable(&self) {
        let svr = self.read(REG_SVR);
        self.write(REG_SVR, svr | 0x1ff);
    }

    fn ipi(&self, dest: u32, low: u32) {
        if self.x2 {
            sys::wrmsr(0x830, (dest as u64) << 32 | low as u64);
            return;
        }
        self.write(REG_ICR_HI, dest << 24);
        self.write(REG_ICR_LO, low);
        for _ in 0..1_000_000u32 {
            if self.read(REG_ICR_LO) & ICR_PENDING == 0 {
                break;
            }
            core::hint::spin_loop();
        }
    }
}

pub fn bsp_apic_id() -> u32 {
    Lapic::get().id()
}

fn wait_online(n: usize, timeout_us: u64) -> bool {
    let end = clock::now_ns() + timeout_us * 1000;
    while ONLINE.load(Ordering::Acquire) < n {
        if clock::now_ns() > end {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn copy_trampoline() {
    let start = core::ptr::addr_of!(ap_tramp_start);
    let end = core::ptr::addr_of!(ap_tramp_end);
    let len = end as usize - start as usize;
    // SAFETY: the page at TRAMPOLINE is conventional RAM below 1 MiB that
    // nothing else uses once the boot information has been copied out.
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len) };
}

/// Starts the APs listed in `apic_ids` (the BSP's own ID is skipped) one at a
/// time, so indices follow table order; with no list, broadcasts and counts
/// those that check in within 200 ms. Returns the number of CPUs online.
pub fn start_aps(apic_ids: &[u32]) -> usize {
    let lapic = Lapic::get();
    lapic.enable();
    let me = lapic.id();
    APIC_ID[0].store(me, Ordering::Relaxed);
    copy_trampoline();
    let sipi = ICR_STARTUP | (TRAMPOLINE >> 12) as u32;
    if apic_ids.is_empty() {
        lapic.ipi(0, ICR_ALL_BUT_SELF | ICR_INIT);
        lapic.ipi(0, ICR_ALL_BUT_SELF | sipi);
        clock::delay_us(200_000);
        return ONLINE.load(Ordering::Acquire);
    }
    for &id in apic_ids.iter().filter(|&&id| id != me) {
        let want = ONLINE.load(Ordering::Acquire) + 1;
        lapic.ipi(id, ICR_INIT);
        lapic.ipi(id, sipi);
        // KVM needs no settling time; the second SIPI is the specified retry
        // for a CPU that missed the first.
        if !wait_online(want, 10_000) {
            lapic.ipi(id, sipi);
            wait_online(want, 200_000);
        }
    }
    ONLINE.load(Ordering::Acquire)
}

pub fn ap_entry(cpu: usize) -> ! {
    let lapic = Lapic::get();
    lapic.enable();
    if cpu < MAX_CPUS {
        APIC_ID[cpu].store(lapic.id(), Ordering::Relaxed);
    }
    ONLINE.fetch_add(1, Ordering::AcqRel);
    while !RUN_WORK.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    workloads::smp_cpu(cpu);
    sys::park()
}
