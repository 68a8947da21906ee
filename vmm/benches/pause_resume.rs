//! vCPU pause/resume round trip under real KVM with the test guest running at CPL3, and the
//! whole VM's (vCPUs and device loop, as an FT checkpoint stops it): the cost
//! fault tolerance pays at every epoch boundary. Prints median and p99 per vCPU count, as the
//! pausing thread measures it (pause asked to `resume` returning) and as the guest stood still
//! (`Vm::last_stop`: pause asked to the last vCPU running again, what FT reports), on an idle
//! host and with a spinning thread per core (a host whose cores are all taken, as the FT
//! sender and the backup take them on the 2-core test host).
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
/// Pause round trips: as the pausing thread measured them and as the guest stood still.
struct Rounds {
    pauser: Vec<Duration>,
    guest: Vec<Duration>,
}

fn measure(cpus: u8, cmdline: &str, stop: Stop) -> Rounds {
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
    let mut pauser = Vec::with_capacity(ROUNDS);
    let mut guest = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        std::thread::sleep(RUN_BETWEEN);
        if round > 0 {
            // The previous round's vCPUs have run for RUN_BETWEEN (or are still waiting for
            // a core: then that round counts until now, a lower bound).
            guest.push(vm.last_stop().map_or(RUN_BETWEEN, |(_, stood)| stood));
        }
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
            Stop::WithStateReadByPauser => {
                vm.pause().expect("pause");
                let kvm = vmm::x86_64::cpu_state::save_vm(vm.vm_fd()).expect("save the VM");
                let devices = vm.device_manager().save_state().expect("save the devices");
                let vcpus = vm.vcpus().save_state_here().expect("save the vCPUs");
                std::hint::black_box((kvm, devices, vcpus));
                vm.resume().expect("resume");
            }
        }
        pauser.push(t.elapsed());
    }
    vm.shutdown();
    pauser.sort();
    guest.sort();
    Rounds { pauser, guest }
}

/// Threads spinning on every core while alive.
struct BusyHost {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyHost {
    fn start() -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for BusyHost {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
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
    /// As `WithState`, but the vCPUs' state read by the pausing thread after the rest (what
    /// every pause did before each vCPU read its own on its core).
    WithStateReadByPauser,
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
            false,
        ),
        (
            2u8,
            "2 vCPUs (BSP spinning, AP idle)",
            "workload=smp smp.iters=1000 exit=halt",
            Stop::Vcpus,
            false,
        ),
        // The VM's devices (its virtio-rng) give it a device loop to stop as well.
        (
            1u8,
            "1 vCPU + device loop (Vm::pause)",
            "workload=hello exit=halt",
            Stop::WholeVm,
            false,
        ),
        (
            1u8,
            "... + state capture (FT's pause)",
            "workload=hello exit=halt",
            Stop::WithState,
            false,
        ),
        (
            1u8,
            "... vCPU state read by the pauser",
            "workload=hello exit=halt",
            Stop::WithStateReadByPauser,
            false,
        ),
        (
            1u8,
            "FT's pause, every core busy",
            "workload=hello exit=halt",
            Stop::WithState,
            true,
        ),
    ];
    println!(
        "vCPU pause+resume round trip, {ROUNDS} rounds, guest runs {RUN_BETWEEN:?} between pauses; {}",
        support::machine()
    );
    println!("  pauser: pause asked -> resume returned, on the pausing thread");
    println!("  guest: pause asked -> last vCPU running again (what FT reports as its pause)");
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12} {:>12} {:>14}",
        "case",
        "pauser p50",
        "pauser p99",
        "guest p50",
        "guest p99",
        "guest max",
        "guest/pauser p99"
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut idle_p99 = Vec::new();
    // Guest p50 of one vCPU alone and with the device loop: what stopping the loop adds.
    let (mut vcpu_alone, mut with_loop) = (None, None);
    // Guest p50 with the state captured: the vCPUs reading their own, and the pauser.
    let (mut captured, mut read_by_pauser) = (None, None);
    for (cpus, name, cmdline, stop, busy) in cases {
        let host = busy.then(BusyHost::start);
        let rounds = measure(cpus, cmdline, stop);
        drop(host);
        let p = |v: &[Duration], q| us(support::percentile(v, q));
        let guest_max = rounds.guest.last().map_or(0.0, |d| us(*d));
        println!(
            "{:<34} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>14.2}",
            name,
            p(&rounds.pauser, 0.5),
            p(&rounds.pauser, 0.99),
            p(&rounds.guest, 0.5),
            p(&rounds.guest, 0.99),
            guest_max,
            p(&rounds.guest, 0.99) / p(&rounds.pauser, 0.99)
        );
        if !busy && matches!(stop, Stop::Vcpus) {
            idle_p99.push(p(&rounds.pauser, 0.99));
        }
        match (cpus, stop, busy) {
            (1, Stop::Vcpus, false) => vcpu_alone = Some(p(&rounds.guest, 0.5)),
            (1, Stop::WholeVm, false) => with_loop = Some(p(&rounds.guest, 0.5)),
            (1, Stop::WithState, false) => captured = Some(p(&rounds.guest, 0.5)),
            (1, Stop::WithStateReadByPauser, false) => read_by_pauser = Some(p(&rounds.guest, 0.5)),
            _ => {}
        }
    }
    if let (Some(alone), Some(both)) = (vcpu_alone, with_loop) {
        // Vm::pause asks the loop to park before it kicks the vCPUs: only what does not
        // overlap shows here.
        println!(
            "device loop in Vm::pause: guest p50 +{:.1} us over the vCPU alone ({:.2}x)",
            both - alone,
            both / alone
        );
    }
    if let (Some(own), Some(pauser)) = (captured, read_by_pauser) {
        println!(
            "vCPU state read by each vCPU itself: guest p50 {own:.1} us against {pauser:.1} us read by the pauser ({:.2}x)",
            own / pauser
        );
    }
    let worst = idle_p99.iter().copied().fold(0.0, f64::max);
    println!(
        "target: vCPUs alone, pauser p99 < 100 us on an idle host: worst {worst:.1} us ({})",
        if worst < 100.0 { "MET" } else { "MISSED" }
    );
}
