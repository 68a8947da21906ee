//! vCPU pause/resume round trip under real KVM with the test guest running at CPL3, and the
//! whole VM's (vCPUs and device loop, as an FT checkpoint stops it): the cost
//! fault tolerance pays at every epoch boundary. Prints median and p99 per vCPU count.
//!
//! Run: `cargo bench -p vmm --bench pause_resume` (the guest must be built: `ci/setup`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::config::{
    ConsoleConfig, ConsoleOutputMode, CpusConfig, MemoryConfig, PayloadConfig, VmConfig,
};
use vmm::vm::{Vm, VmEvents};
use vmm::SeccompMode;

mod support;

const ROUNDS: usize = 2000;
/// Time the guest runs between pauses, about one FT epoch.
const RUN_BETWEEN: Duration = Duration::from_millis(2);

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn guest_path() -> PathBuf {
    std::env::var_os("TANDEM_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../guest/target/x86_64-unknown-linux-gnu/release/tandem-guest")
        })
}

/// `whole_vm`: `Vm::pause`/`Vm::resume` (the vCPUs and the device loop, as an FT checkpoint
/// stops the VM) instead of the vCPUs alone.
fn measure(cpus: u8, cmdline: &str, stop: Stop) -> (Duration, Duration, Duration) {
    let kvm = vmm::vm::open_kvm().expect("open /dev/kvm");
    let events = VmEvents::new().expect("events");
    let capture = Capture::default();
    let config = VmConfig {
        cpus: CpusConfig {
            boot_vcpus: cpus,
            max_vcpus: cpus,
            ..Default::default()
        },
        memory: MemoryConfig::with_size(256 << 20),
        payload: Some(PayloadConfig {
            kernel: Some(guest_path()),
            cmdline: Some(cmdline.to_string()),
            ..Default::default()
        }),
        serial: ConsoleConfig::with_mode(ConsoleOutputMode::Tty),
        console: ConsoleConfig::with_mode(ConsoleOutputMode::Off),
        ..Default::default()
    };
    let mut vm = Vm::boot(
        &kvm,
        &config,
        Some(Box::new(capture.clone())),
        &events,
        SeccompMode::Trap,
    )
    .expect("boot");
    let start = Instant::now();
    while !String::from_utf8_lossy(&capture.0.lock().unwrap()).contains("TANDEM-GUEST DONE") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "guest never got ready"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        std::thread::sleep(RUN_BETWEEN);
        let t = Instant::now();
        match stop {
            Stop::Vcpus => {
                vm.vcpus().pause(Duration::from_secs(2)).expect("pause");
                vm.vcpus().resume();
            }
            Stop::WholeVm => {
                vm.pause().expect("pause");
                vm.resume().expect("resume");
            }
            Stop::WithState => {
                vm.pause().expect("pause");
                let state = vm.save_state().expect("save the state");
                std::hint::black_box(state);
                vm.resume().expect("resume");
            }
        }
        samples.push(t.elapsed());
    }
    vm.shutdown();
    samples.sort();
    (
        support::percentile(&samples, 0.5),
        support::percentile(&samples, 0.99),
        samples[samples.len() - 1],
    )
}

/// What each round stops (and reads) before letting the guest run again.
#[derive(Clone, Copy)]
enum Stop {
    /// The vCPUs alone.
    Vcpus,
    /// The vCPUs and the device loop, as an FT checkpoint stops the VM.
    WholeVm,
    /// As `WholeVm`, and the VM's state captured in the pause, as an FT checkpoint does.
    WithState,
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIP: pause_resume benchmark: /dev/kvm not available - nothing measured");
        return;
    }
    if !guest_path().exists() {
        println!("SKIP: pause_resume benchmark: test guest not built (run ci/setup)");
        return;
    }
    // The guest finishes its workload, then spins at CPL3 (exit=halt): a busy vCPU to stop.
    let cases = [
        (
            1u8,
            "1 vCPU spinning at CPL3",
            "workload=hello exit=halt",
            Stop::Vcpus,
        ),
        (
            2u8,
            "2 vCPUs (BSP spinning, AP idle)",
            "workload=smp smp.iters=1000 exit=halt",
            Stop::Vcpus,
        ),
        // The VM's devices (its virtio-rng) give it a device loop to stop as well.
        (
            1u8,
            "1 vCPU + device loop (Vm::pause)",
            "workload=hello exit=halt",
            Stop::WholeVm,
        ),
        (
            1u8,
            "... + state capture (FT's pause)",
            "workload=hello exit=halt",
            Stop::WithState,
        ),
    ];
    println!(
        "vCPU pause+resume round trip, {ROUNDS} rounds, guest runs {RUN_BETWEEN:?} between pauses"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>12}",
        "case", "median us", "p99 us", "max us", "p99/target"
    );
    for (cpus, name, cmdline, stop) in cases {
        let (p50, p99, max) = measure(cpus, cmdline, stop);
        println!(
            "{:<34} {:>10.1} {:>10.1} {:>10.1} {:>12.2}",
            name,
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            max.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6 / 100.0
        );
    }
    println!("target: p99 < 100 us (p99/target < 1.00)");
}
