//! Saving a vCPU's state, as an FT primary does inside every epoch's pause (and a snapshot or
//! migration once): a fresh `VcpuSaver` for each save (every ioctl, reading the CPUID and
//! learning which MSRs KVM reads, as every save did before the saver kept them) against one
//! saver reused across saves, side by side, taking turns in one run.
//!
//! Needs /dev/kvm (prints a SKIP line without). A vCPU of its own, set up with the host's
//! CPUID as the VMM sets it; no guest runs.
//!
//! Run: `cargo bench -p vmm --bench state_capture [-- --rounds N --quick]` (`ci/bench-ft`
//! runs it in its pipeline section).

use std::time::{Duration, Instant};

use vmm::x86_64::cpu_state::VcpuSaver;

mod support;

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP: state_capture: /dev/kvm is absent");
        return;
    }
    let flags = support::Flags::parse(&["--rounds"]);
    let rounds = flags.count("--rounds", 500, 3000) as usize;
    let kvm = vmm::vm::open_kvm().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create a VM");
    vm.create_irq_chip().expect("create the irqchip");
    let vcpu = vm.create_vcpu(0).expect("create a vCPU");
    let base = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("read the supported CPUID");
    vcpu.set_cpuid2(&vmm::x86_64::cpuid::for_vcpu(&base, 0, 1))
        .expect("set the CPUID");
    let msr_indices = vmm::x86_64::msr::supported_indices(&kvm).expect("list the MSRs");

    let mut reused = VcpuSaver::new(0);
    let first = reused.save(&vcpu, &msr_indices).expect("save");
    let (mut fresh, mut kept) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for round in 0..rounds {
        // Alternate which goes first, so both see the same caches and the same machine.
        for case in [round % 2, 1 - round % 2] {
            let start = Instant::now();
            let state = if case == 0 {
                VcpuSaver::new(0).save(&vcpu, &msr_indices)
            } else {
                reused.save(&vcpu, &msr_indices)
            };
            let took = start.elapsed();
            let state = state.expect("save");
            assert_eq!(state.msrs.len(), first.msrs.len(), "the MSRs read changed");
            assert_eq!(state.cpuid.len(), first.cpuid.len(), "the CPUID changed");
            if case == 0 {
                fresh.push(took);
            } else {
                kept.push(took);
            }
        }
    }
    fresh.sort();
    kept.sort();
    println!(
        "vCPU state capture: {rounds} saves per case, taking turns; {} MSRs listed, {} read, {} CPUID entries; {}",
        msr_indices.len(),
        first.msrs.len(),
        first.cpuid.len(),
        support::machine()
    );
    println!();
    println!(
        "{:<34} | {:>8} | {:>8} | {:>13}",
        "case", "p50 us", "p99 us", "p50 vs fresh"
    );
    let base = micros(support::percentile(&fresh, 0.5));
    for (name, samples) in [
        ("fresh saver (every ioctl)", &fresh),
        ("reused saver (CPUID, MSR list kept)", &kept),
    ] {
        let p50 = micros(support::percentile(samples, 0.5));
        println!(
            "{name:<34} | {p50:>8.1} | {:>8.1} | {:>13.3}",
            micros(support::percentile(samples, 0.99)),
            p50 / base
        );
    }
}
