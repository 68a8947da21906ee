//! System calls into the CPL0 part (boot.S). `syscall` and `int 0x80` are
//! unusable on the nested KVM we test on, so the gate is `ud2` (#UD):
//! rax = number, rdi/rsi/rdx = arguments, rax = result.

use core::arch::asm;

const SHUTDOWN: u64 = 0;
const RESET: u64 = 1;
const PARK: u64 = 2;
const OUTS: u64 = 3;
const OUTB: u64 = 4;
const INB: u64 = 5;
const OUTW: u64 = 6;
#[allow(dead_code)]
const INW: u64 = 7;
const OUTL: u64 = 8;
const INL: u64 = 9;
const WRMSR: u64 = 10;
const RDMSR: u64 = 11;
#[allow(dead_code)]
const HLT: u64 = 12;

#[inline(always)]
fn call(n: u64, a: u64, b: u64, c: u64) -> u64 {
    let r;
    // SAFETY: the CPL0 handler only touches the registers declared here and
    // reads user memory for OUTS; the exception switches to the kernel stack,
    // so the user stack (and its red zone) is untouched.
    unsafe {
        asm!(
            "ud2",
            inlateout("rax") n => r,
            inlateout("rdi") a => _,
            inlateout("rsi") b => _,
            inlateout("rdx") c => _,
            out("rcx") _,
            options(nostack)
        );
    }
    r
}

/// Power off (ACPI S5 via port 0x600, then QEMU's isa-debug-exit).
pub fn shutdown() -> ! {
    call(SHUTDOWN, 0, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// Reset (i8042, else triple fault).
pub fn reset() -> ! {
    call(RESET, 0, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// Halt this CPU for good with interrupts off (costs the host nothing).
pub fn park() -> ! {
    call(PARK, 0, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// `rep outsb` of `buf` to `port`: one kernel entry per console line.
pub fn outs(port: u16, buf: &[u8]) {
    if !buf.is_empty() {
        call(OUTS, port as u64, buf.as_ptr() as u64, buf.len() as u64);
    }
}

pub fn outb(port: u16, v: u8) {
    call(OUTB, port as u64, v as u64, 0);
}

pub fn inb(port: u16) -> u8 {
    call(INB, port as u64, 0, 0) as u8
}

pub fn outw(port: u16, v: u16) {
    call(OUTW, port as u64, v as u64, 0);
}

#[allow(dead_code)]
pub fn inw(port: u16) -> u16 {
    call(INW, port as u64, 0, 0) as u16
}

pub fn outl(port: u16, v: u32) {
    call(OUTL, port as u64, v as u64, 0);
}

pub fn inl(port: u16) -> u32 {
    call(INL, port as u64, 0, 0) as u32
}

pub fn wrmsr(msr: u32, v: u64) {
    call(WRMSR, msr as u64, v, 0);
}

pub fn rdmsr(msr: u32) -> u64 {
    call(RDMSR, msr as u64, 0, 0)
}

/// Wait for an interrupt with interrupts enabled (needs a timer armed).
#[allow(dead_code)]
pub fn hlt() {
    call(HLT, 0, 0, 0);
}
