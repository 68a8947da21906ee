//! vCPU control and dirty logging against real KVM, with tiny hand-assembled kernels (CPL0
//! code, so KVM emulates it here; that is slow but exact).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::config::{
    ConsoleConfig, ConsoleOutputMode, CpusConfig, MemoryConfig, PayloadConfig, VmConfig,
};
use vmm::vm::{Vm, VmEvents};
use vmm::SeccompMode;

const LOAD_ADDR: u64 = 0x10_0000;
const COUNTER_ADDR: u64 = 0x20_0000;

fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        // Where KVM must be there (`ci/test` on a root host with /dev/kvm), a skip would hide
        // a broken setup.
        if std::env::var("TANDEM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm not available, and TANDEM_REQUIRE_KVM=1 forbids skipping");
        }
        // Straight to stderr, past the harness's capture, so the skip shows in a passing run.
        let line = format!("SKIP: {test}: /dev/kvm not available - this test did NOT run\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
    ok
}

/// A 64-bit ELF with one loadable segment holding `code` at 1 MiB, entered through the Linux
/// 64-bit protocol (no PVH note).
fn elf_kernel(code: &[u8], name: &str) -> PathBuf {
    let mut elf = Vec::new();
    let code_off: u64 = 64 + 56;
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes());
    elf.extend_from_slice(&56u16.to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes());
    elf.extend_from_slice(&[0; 6]);
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes());
    elf.extend_from_slice(&code_off.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(code);
    let path = std::env::temp_dir().join(format!("tandem-{name}-{}.elf", std::process::id()));
    std::fs::write(&path, elf).expect("write kernel");
    path
}

/// `mov rax, COUNTER_ADDR; 1: inc qword [rax]; jmp 1b`
fn counting_loop() -> Vec<u8> {
    let mut code = vec![0x48, 0xc7, 0xc0];
    code.extend_from_slice(&(COUNTER_ADDR as u32).to_le_bytes());
    code.extend_from_slice(&[0x48, 0xff, 0x00, 0xeb, 0xfb]);
    code
}

fn config(kernel: PathBuf, cpus: u8) -> VmConfig {
    VmConfig {
        cpus: CpusConfig {
            boot_vcpus: cpus,
            max_vcpus: cpus,
            ..Default::default()
        },
        memory: MemoryConfig::with_size(64 << 20),
        payload: Some(PayloadConfig {
            kernel: Some(kernel),
            ..Default::default()
        }),
        serial: ConsoleConfig::with_mode(ConsoleOutputMode::Null),
        console: ConsoleConfig::with_mode(ConsoleOutputMode::Off),
        ..Default::default()
    }
}

fn counter(vm: &Vm) -> u64 {
    vm.memory()
        .read_obj(GuestAddress(COUNTER_ADDR))
        .expect("read counter")
}

/// Boots the counting loop on `cpus` vCPUs; the events must live as long as the VM.
fn boot_counting(name: &str, cpus: u8) -> (Vm, VmEvents, PathBuf) {
    let kernel = elf_kernel(&counting_loop(), name);
    let kvm = vmm::vm::open_kvm().expect("kvm");
    let events = VmEvents::new().expect("events");
    let vm = Vm::boot(
        &kvm,
        &config(kernel.clone(), cpus),
        None,
        &events,
        SeccompMode::Trap,
    )
    .expect("boot");
    (vm, events, kernel)
}

#[test]
fn paused_guest_makes_no_progress_and_resumes() {
    if !kvm_available("paused_guest_makes_no_progress_and_resumes") {
        return;
    }
    let (mut vm, _events, kernel) = boot_counting("pause", 2);
    let start = Instant::now();
    while counter(&vm) < 1000 {
        assert!(start.elapsed() < Duration::from_secs(20), "guest never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..50 {
        vm.vcpus().pause(Duration::from_secs(2)).expect("pause");
        let before = counter(&vm);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(counter(&vm), before, "guest ran while paused");
        vm.vcpus().resume();
    }
    let resumed_at = counter(&vm);
    let start = Instant::now();
    while counter(&vm) == resumed_at {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "guest did not resume"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.shutdown();
    let _ = std::fs::remove_file(kernel);
}

/// The stop a pause reports is the guest's: from the pause being asked for to the last vCPU
/// running again, known only once they all have, and about the latest pause only.
#[test]
fn vcpus_report_how_long_the_guest_stood_still() {
    if !kvm_available("vcpus_report_how_long_the_guest_stood_still") {
        return;
    }
    let (mut vm, _events, kernel) = boot_counting("last-stop", 2);
    assert!(vm.last_stop().is_none(), "a stop reported before any pause");
    let held = Duration::from_millis(3);
    let mut previous: Option<Instant> = None;
    for _ in 0..20 {
        let before = Instant::now();
        vm.vcpus().pause(Duration::from_secs(2)).expect("pause");
        let paused = Instant::now();
        assert!(vm.last_stop().is_none(), "a stop reported while paused");
        std::thread::sleep(held);
        let resuming = Instant::now();
        vm.vcpus().resume();
        let start = Instant::now();
        let (asked, stood) = loop {
            if let Some(stop) = vm.last_stop() {
                break stop;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the vCPUs never ran again"
            );
            std::thread::yield_now();
        };
        assert!(
            asked >= before && asked <= paused,
            "the stop was not asked for in this pause"
        );
        assert!(
            previous.is_none_or(|p| p < asked),
            "an earlier pause reported"
        );
        // The guest stood still at least while it was held, and not before it was asked to.
        assert!(
            stood >= resuming - paused && stood <= Instant::now() - asked,
            "stood still {stood:?}, held {:?}",
            resuming - paused
        );
        previous = Some(asked);
    }
    vm.shutdown();
    let _ = std::fs::remove_file(kernel);
}

#[test]
fn dirty_log_reports_guest_writes() {
    if !kvm_available("dirty_log_reports_guest_writes") {
        return;
    }
    let (mut vm, _events, kernel) = boot_counting("dirty", 1);
    vm.vcpus().pause(Duration::from_secs(2)).expect("pause");
    vm.set_dirty_logging(true).expect("enable dirty log");
    let _ = vm.take_dirty_log().expect("clear dirty log");
    vm.vcpus().resume();
    let start = counter(&vm);
    while counter(&vm) < start + 100 {
        std::thread::sleep(Duration::from_millis(2));
    }
    vm.vcpus().pause(Duration::from_secs(2)).expect("pause");
    let log = vm.take_dirty_log().expect("dirty log");
    let page = (COUNTER_ADDR / 4096) as usize;
    assert_ne!(
        log[0][page / 64] & (1 << (page % 64)),
        0,
        "counter page not dirty"
    );
    let dirty: u32 = log[0].iter().map(|w| w.count_ones()).sum();
    assert!(
        dirty < 8,
        "only the counter page (and stack) should be dirty, got {dirty}"
    );
    vm.vcpus().resume();
    vm.shutdown();
    let _ = std::fs::remove_file(kernel);
}

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

#[test]
fn serial_output_and_acpi_shutdown_reach_the_vmm() {
    if !kvm_available("serial_output_and_acpi_shutdown_reach_the_vmm") {
        return;
    }
    let mut code = Vec::new();
    for byte in b"OK\n" {
        // mov dx, 0x3f8; mov al, byte; out dx, al
        code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, *byte, 0xee]);
    }
    // mov dx, 0x600; mov al, 0x34; out dx, al; hlt
    code.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4]);
    let kernel = elf_kernel(&code, "shutdown");
    let path = kernel.clone();
    let capture = Capture::default();
    let kvm = vmm::vm::open_kvm().expect("kvm");
    let events = VmEvents::new().expect("events");
    let mut cfg = config(kernel, 1);
    cfg.serial = ConsoleConfig::with_mode(ConsoleOutputMode::Tty);
    let mut vm = Vm::boot(
        &kvm,
        &cfg,
        Some(Box::new(capture.clone())),
        &events,
        SeccompMode::Trap,
    )
    .expect("boot");
    let start = Instant::now();
    while events.exit.read().is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "no shutdown");
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.shutdown();
    assert_eq!(&*capture.0.lock().unwrap(), b"OK\n");
    let _ = std::fs::remove_file(path);
}

#[test]
fn captured_state_restores_into_a_new_vm_that_continues() {
    if !kvm_available("captured_state_restores_into_a_new_vm_that_continues") {
        return;
    }
    use vmm::vm::{RestoredMemory, Start, VmSnapshotState};
    let kernel = elf_kernel(&counting_loop(), "state");
    let kvm = vmm::vm::open_kvm().expect("kvm");
    let events = VmEvents::new().expect("events");
    let cfg = config(kernel.clone(), 2);
    let mut vm = Vm::boot(&kvm, &cfg, None, &events, SeccompMode::Trap).expect("boot");
    let start = Instant::now();
    while counter(&vm) < 1000 {
        assert!(start.elapsed() < Duration::from_secs(20), "guest never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.pause().expect("pause");
    let state = vm.save_state().expect("save state");
    let saved_counter = counter(&vm);
    let memory: Vec<u8> = {
        let mut bytes = vec![0u8; 64 << 20];
        vm.memory()
            .read_slice(&mut bytes, GuestAddress(0))
            .expect("read memory");
        bytes
    };
    // Through JSON, as snapshots and migration carry it.
    let json = serde_json::to_string(&state).expect("serialize");
    let state: VmSnapshotState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(state.vcpus.len(), 2);
    vm.shutdown();
    drop(vm);

    let events = VmEvents::new().expect("events");
    let fill = |mem: &vmm::memory::GuestMemoryMmap| {
        mem.write_slice(&memory, GuestAddress(0))
            .map_err(|e| e.to_string())
    };
    let mut restored = Vm::create(
        &kvm,
        &cfg,
        None,
        &events,
        SeccompMode::Trap,
        Start::Restore {
            state: &state,
            memory: RestoredMemory::Fill(&fill),
            resume: false,
        },
    )
    .expect("restore");
    // Paused after restore: nothing runs until resume.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        counter(&restored),
        saved_counter,
        "restored VM ran before resume"
    );
    restored.resume().expect("resume");
    let start = Instant::now();
    while counter(&restored) < saved_counter + 100 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "restored guest does not continue its loop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    restored.shutdown();
    let _ = std::fs::remove_file(kernel);
}

/// The FT primary's saver keeps the CPUID and the list of readable MSRs between saves: what
/// it reads must still be the vCPU's current state, exactly what a fresh saver reads.
#[test]
fn a_reused_saver_reads_the_current_msrs_as_a_fresh_one_does() {
    if !kvm_available("a_reused_saver_reads_the_current_msrs_as_a_fresh_one_does") {
        return;
    }
    use kvm_bindings::{kvm_msr_entry, Msrs};
    use vmm::x86_64::cpu_state::VcpuSaver;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    // Counts on between the two reads.
    const MSR_IA32_TSC: u32 = 0x10;

    let kvm = vmm::vm::open_kvm().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let base = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&vmm::x86_64::cpuid::for_vcpu(&base, 0, 1))
        .unwrap();
    let indices = vmm::x86_64::msr::supported_indices(&kvm).unwrap();
    let mut reused = VcpuSaver::new(0);
    for value in [0x1000u64, 0x2000, 0x3000] {
        let entry = kvm_msr_entry {
            index: MSR_IA32_SYSENTER_ESP,
            data: value,
            ..Default::default()
        };
        assert_eq!(
            vcpu.set_msrs(&Msrs::from_entries(&[entry]).unwrap())
                .unwrap(),
            1
        );
        let kept = reused.save(&vcpu, &indices).unwrap();
        let fresh = VcpuSaver::new(0).save(&vcpu, &indices).unwrap();
        let pairs = |s: &vmm::x86_64::cpu_state::VcpuState| {
            s.msrs
                .iter()
                .map(|e| (e.index, if e.index == MSR_IA32_TSC { 0 } else { e.data }))
                .collect::<Vec<_>>()
        };
        assert_eq!(pairs(&kept), pairs(&fresh));
        assert!(pairs(&kept).contains(&(MSR_IA32_SYSENTER_ESP, value)));
        assert_eq!(
            serde_json::to_string(&kept.cpuid).unwrap(),
            serde_json::to_string(&fresh.cpuid).unwrap()
        );
    }
}

/// Each vCPU reads its own state once the whole VM stands still, while the pausing thread
/// goes on; what the pause then saves is what the pausing thread reads itself from the
/// stopped vCPUs, and it is read in this pause, not an earlier one.
#[test]
fn the_state_a_vcpu_reads_itself_is_what_the_pauser_reads() {
    if !kvm_available("the_state_a_vcpu_reads_itself_is_what_the_pauser_reads") {
        return;
    }
    use vmm::x86_64::cpu_state::VcpuState;
    // Counts on between the two reads.
    const MSR_IA32_TSC: u32 = 0x10;
    const APIC_TMCCT: usize = 0x390;
    let comparable = |s: &VcpuState| {
        let mut lapic = s.lapic;
        lapic.regs[APIC_TMCCT..APIC_TMCCT + 4].fill(0);
        let msrs: Vec<_> = s
            .msrs
            .iter()
            .map(|e| (e.index, if e.index == MSR_IA32_TSC { 0 } else { e.data }))
            .collect();
        (
            (
                s.regs,
                s.sregs,
                s.xsave.region.to_vec(),
                s.xcrs,
                s.debugregs,
            ),
            (lapic.regs.to_vec(), msrs, s.mp_state, s.vcpu_events),
        )
    };
    let (mut vm, _events, kernel) = boot_counting("own-state", 2);
    let start = Instant::now();
    while counter(&vm) < 1000 {
        assert!(start.elapsed() < Duration::from_secs(20), "guest never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    const PAUSES: usize = 30;
    let mut rips = std::collections::HashSet::new();
    for _ in 0..PAUSES {
        vm.pause().expect("pause");
        let own = vm.save_state().expect("save the state").vcpus;
        let here = vm.vcpus().save_state_here().expect("read the state");
        assert_eq!(own.len(), 2);
        for (index, (own, here)) in own.iter().zip(&here).enumerate() {
            assert!(
                comparable(own) == comparable(here),
                "vCPU {index}: the state it read itself differs from the pauser's"
            );
        }
        rips.insert(own[0].regs.rip);
        vm.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(1));
    }
    // A vCPU's thread that gets no core for a millisecond (tests run side by side) is read
    // by the saving thread instead; most are not.
    let captured = vm.vcpus().captured_saves();
    assert!(
        (PAUSES..=2 * PAUSES).contains(&captured),
        "{captured} of {} saves took what the vCPU read itself",
        2 * PAUSES
    );
    // The loop is two instructions: a state from an earlier pause would repeat.
    assert!(
        rips.len() > 1,
        "the BSP stopped at one rip in {PAUSES} pauses"
    );
    vm.shutdown();
    let _ = std::fs::remove_file(kernel);
}
