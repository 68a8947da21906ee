//! ACPI table build time: building all tables (RSDP, XSDT, FADT, DSDT, MADT, MCFG) for the
//! VM and writing them to guest memory, as every boot does. Prints µs per build by vCPU count.
//!
//! Run: `cargo bench -p vmm --bench acpi_tables`

use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::x86_64::acpi::{build_acpi_tables, create_acpi_tables, AcpiMachine};

const BUILDS: usize = 20_000;
const WARMUP: usize = 2_000;

fn machine(cpus: u8) -> AcpiMachine {
    AcpiMachine {
        cpus,
        mem_size: 1 << 30,
        phys_bits: 40,
        // A few PCI devices with INTx lines, as a VM with disks and NICs has.
        pci_intx: (1..=4).map(|d| (d, 16 + u32::from(d))).collect(),
        serial: true,
    }
}

/// Per-build times in µs of `f`, sorted.
fn measure(mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..WARMUP {
        f();
    }
    let mut times: Vec<f64> = (0..BUILDS)
        .map(|_| {
            let start = Instant::now();
            f();
            duration_us(start.elapsed())
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

fn duration_us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

fn main() {
    // The tables live in the first MiB.
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    println!("ACPI table build time, {BUILDS} builds each (µs per build)");
    println!(
        "{:>5} {:>7} {:>10} {:>10} {:>10} {:>12}",
        "vCPUs", "bytes", "median", "p99", "min", "build-only"
    );
    for cpus in [1u8, 2, 8] {
        let m = machine(cpus);
        let size = build_acpi_tables(&m).expect("build tables").size();
        let full = measure(|| {
            create_acpi_tables(&mem, &m).expect("write tables");
        });
        let build_only = measure(|| {
            std::hint::black_box(build_acpi_tables(&m).expect("build tables"));
        });
        println!(
            "{:>5} {:>7} {:>10.2} {:>10.2} {:>10.2} {:>12.2}",
            cpus,
            size,
            percentile(&full, 0.5),
            percentile(&full, 0.99),
            full[0],
            percentile(&build_only, 0.5),
        );
    }
}
