//! Time at CPL3: kvmclock when the hypervisor offers it (only the MSR write
//! needs the kernel), else the TSC with a frequency from CPUID or the PIT.

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};

use crate::sys;

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    KvmClock,
    Tsc,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::KvmClock => "kvmclock",
            Kind::Tsc => "tsc",
        }
    }
}

/// pvclock_vcpu_time_info, written by the hypervisor.
#[repr(C, align(64))]
struct PvClock(UnsafeCell<[u8; 32]>);

// SAFETY: only read with volatile loads under the version protocol.
unsafe impl Sync for PvClock {}

static PVCLOCK: PvClock = PvClock(UnsafeCell::new([0; 32]));
static KIND: AtomicU8 = AtomicU8::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_BASE: AtomicU64 = AtomicU64::new(0);

#[allow(unused_unsafe)]
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    // SAFETY: cpuid has no side effects.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, sub) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

#[allow(unused_unsafe)]
pub fn rdtsc() -> u64 {
    // SAFETY: CR4.TSD is clear, so rdtsc works at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn kvm_leaf_base() -> Option<u32> {
    let (max, b, c, d) = cpuid(0x4000_0000, 0);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..].copy_from_slice(&d.to_le_bytes());
    (&sig == b"KVMKVMKVM\0\0\0" && max >= 0x4000_0001).then_some(max)
}

fn field<T: Copy>(off: usize) -> T {
    // SAFETY: offsets are inside the 32-byte area.
    unsafe { core::ptr::read_volatile((PVCLOCK.0.get() as *const u8).add(off) as *const T) }
}

fn kvmclock_ns() -> u64 {
    loop {
        let v1: u32 = field(0);
        fence(Ordering::Acquire);
        let tsc_ts: u64 = field(8);
        let sys_time: u64 = field(16);
        let mul: u32 = field(24);
        let shift: i8 = field(28);
        let tsc = rdtsc();
        fence(Ordering::Acquire);
        let v2: u32 = field(0);
        if v1 & 1 != 0 || v1 != v2 {
            continue;
        }
        let mut delta = tsc.wrapping_sub(tsc_ts);
        if shift >= 0 {
            delta <<= shift as u32;
        } else {
            delta >>= (-(shift as i32)) as u32;
        }
        return sys_time.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64);
    }
}

fn tsc_hz_from_cpuid() -> u64 {
    let (max, ..) = cpuid(0, 0);
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            return crystal as u64 * num as u64 / den as u64;
        }
    }
    if let Some(hmax) = kvm_leaf_base() {
        if hmax >= 0x4000_0010 {
            let (khz, ..) = cpuid(0x4000_0010, 0);
            if khz != 0 {
                return khz as u64 * 1000;
            }
        }
    }
    if max >= 0x16 {
        let (mhz, ..) = cpuid(0x16, 0);
        if mhz != 0 {
            return mhz as u64 * 1_000_000;
        }
    }
    0
}

fn pit_count() -> u16 {
    sys::outb(0x43, 0x00); // latch channel 0
    let lo = sys::inb(0x40) as u16;
    let hi = sys::inb(0x40) as u16;
    hi << 8 | lo
}

/// Times ~10 ms of PIT channel 0 (read back through the latch, so neither
/// port 0x61 nor an interrupt is needed) with the TSC.
fn tsc_hz_from_pit() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    sys::outb(0x43, 0x30); // channel 0, lo/hi, mode 0: counts down from 0xffff
    sys::outb(0x40, 0xff);
    sys::outb(0x40, 0xff);
    let c0 = pit_count();
    let t0 = rdtsc();
    let mut ticks = 0u64;
    let mut t1 = t0;
    // 25 ms keeps the error of the emulated port reads near 0.5%; the TSC
    // bound ends the wait when there is no PIT (ports read as all ones).
    while ticks < PIT_HZ / 40 && t1 - t0 < 500_000_000 {
        ticks = c0.wrapping_sub(pit_count()) as u64;
        t1 = rdtsc();
    }
    let hz = if ticks == 0 {
        0
    } else {
        (t1 - t0) as u128 * PIT_HZ as u128 / ticks as u128
    } as u64;
    // No PIT (the ports float) or nonsense: assume a plausible 2 GHz.
    if (100_000_000..20_000_000_000).contains(&hz) && ticks < 0xf000 {
        hz
    } else {
        2_000_000_000
    }
}

pub fn init(allow_kvmclock: bool) -> Kind {
    if allow_kvmclock && kvm_leaf_base().is_some() {
        let (features, ..) = cpuid(0x4000_0001, 0);
        if features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
            sys::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, PVCLOCK.0.get() as u64 | 1);
            let mul: u32 = field(24);
            if mul != 0 {
                KIND.store(1, Ordering::Release);
                return Kind::KvmClock;
            }
        }
    }
    let mut hz = tsc_hz_from_cpuid();
    if hz == 0 {
        hz = tsc_hz_from_pit();
    }
    TSC_HZ.store(hz, Ordering::Relaxed);
    TSC_BASE.store(rdtsc(), Ordering::Relaxed);
    KIND.store(2, Ordering::Release);
    Kind::Tsc
}

/// Nanoseconds since an arbitrary origin (monotonic).
pub fn now_ns() -> u64 {
    match KIND.load(Ordering::Acquire) {
        1 => kvmclock_ns(),
        2 => {
            let hz = TSC_HZ.load(Ordering::Relaxed).max(1);
            let d = rdtsc().wrapping_sub(TSC_BASE.load(Ordering::Relaxed));
            (d as u128 * 1_000_000_000 / hz as u128) as u64
        }
        _ => 0,
    }
}

pub fn delay_us(us: u64) {
    let end = now_ns() + us * 1000;
    while now_ns() < end {
        core::hint::spin_loop();
    }
}
