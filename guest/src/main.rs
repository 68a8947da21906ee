//! Tandem test guest: a freestanding guest OS for the Tandem VMM's tests.
//!
//! The privileged (CPL0) part is in `boot.S`: under nested KVM of the
//! emulating kind every CPL0 instruction is interpreted, so it is kept tiny and
//! free of SSE. Everything here runs at CPL3, natively, and asks the CPL0 part
//! for port I/O and MSR access through `ud2` (see `sys`).

#![no_std]
#![no_main]

use core::arch::global_asm;

#[macro_use]
mod console;
mod blk;
mod bootinfo;
mod clock;
mod dma;
mod ft;
mod mem;
mod net;
mod pci;
mod smp;
mod sys;
mod tables;
mod virtio;
mod workloads;

global_asm!(include_str!("boot.S"), options(att_syntax));

#[cfg(feature = "linux64-selftest")]
global_asm!(include_str!("selftest.S"), options(att_syntax));

// Normal builds: boot.S sees a null hook and skips it.
#[cfg(not(feature = "linux64-selftest"))]
global_asm!(".globl linux64_selftest", ".set linux64_selftest, 0");

pub const MAX_CPUS: usize = 64;

unsafe extern "C" {
    static __free_mem: u8;
}

/// First physical address not used by the image, its page tables and stacks.
pub fn free_mem_start() -> u64 {
    core::ptr::addr_of!(__free_mem) as u64
}

/// The CPU state the CPL0 code hands over is whatever the loader left; give
/// x87/SSE their defaults before any Rust code might use them.
fn fpu_init() {
    let mxcsr: u32 = 0x1f80;
    // SAFETY: plain FPU/SSE control instructions on our own control word.
    unsafe {
        core::arch::asm!("fninit", "ldmxcsr [{0}]", in(reg) &mxcsr, options(nostack));
    }
}

/// BSP at CPL3 (entered from boot.S with the CPU index, always 0).
#[no_mangle]
pub extern "C" fn user_main(_cpu: u64) -> ! {
    fpu_init();
    console::init();
    let info = bootinfo::BootInfo::read();
    let cfg = workloads::Config::parse(info.cmdline());
    let clock = clock::init(!cfg.force_tsc);
    let cpus = tables::find_cpus(info.rsdp);
    let expected = cpus.count.max(1);
    println!(
        "TANDEM-GUEST READY entry={} cpus={} mem_mib={} clock={} cmdline=\"{}\"",
        info.entry_name(),
        expected,
        info.ram_mib(),
        clock.name(),
        console::Bytes(info.cmdline())
    );
    dma::init(&info);
    let bus = if cfg.pci_off {
        pci::Bus::empty()
    } else {
        pci::init(tables::find_ecam(info.rsdp), cfg.pci_cf8);
        pci::scan()
    };
    for f in bus.iter() {
        println!(
            "PCI {} id={:04x}:{:04x} class=0x{:06x} header=0x{:02x} access={}",
            f.addr,
            f.vendor,
            f.device,
            f.class,
            f.header_type,
            pci::method()
        );
    }
    let devs = virtio::discover(info.cmdline(), &bus);
    for d in devs.iter() {
        match d.at {
            virtio::At::Mmio { base, size } => println!(
                "VIRTIO dev={} base=0x{:x} irq={} features=0x{:x} id={} version={} size=0x{:x}",
                d.kind(),
                base,
                d.irq,
                d.features,
                d.id,
                d.version,
                size
            ),
            virtio::At::Pci { addr, span } => println!(
                "VIRTIO dev={} pci={} irq={} features=0x{:x} id={} version={} size=0x{:x}",
                d.kind(),
                addr,
                d.irq,
                d.features,
                d.id,
                d.version,
                span
            ),
        }
        if let Some((why, at)) = d.problem {
            println!("VIRTIO error {} (0x{:x})", why, at);
        }
    }
    workloads::run(&cfg, &info, &cpus, &devs);
    println!("TANDEM-GUEST DONE");
    match cfg.exit {
        workloads::Exit::Shutdown => sys::shutdown(),
        workloads::Exit::Reset => sys::reset(),
        workloads::Exit::Halt => loop {
            // A running (not halted) vCPU, so pause/resume tests see a live guest.
            core::hint::spin_loop();
        },
    }
}

/// Application processors at CPL3, with their index in start order (1..).
#[no_mangle]
pub extern "C" fn ap_main(cpu: u64) -> ! {
    fpu_init();
    smp::ap_entry(cpu as usize)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::force_unlock_after_spin();
    match info.location() {
        Some(l) => println!(
            "TANDEM-GUEST PANIC {} at {}:{}",
            info.message(),
            l.file(),
            l.line()
        ),
        None => println!("TANDEM-GUEST PANIC {}", info.message()),
    }
    sys::shutdown()
}
