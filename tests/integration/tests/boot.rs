//! The test guest under the real VMM and real KVM: boot, workloads, SMP, serial to a file.
//!
//! Each test takes the KVM boot lock, so guests boot one at a time across all test binaries
//! (every vCPU under this machine's CPL0 emulation occupies a host core).

use std::time::Duration;

use integration::{
    kvm_serial_guard, marker_fields, report, require_kvm, test_guest, TempDir, Vmm, GUEST_DONE,
    GUEST_READY,
};

/// Generous: CPL0 guest code is emulated here (~1.8 M instructions/s).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn guest_vmm(name: &str, cpus: u32, cmdline: &str) -> Vmm {
    let guest = test_guest().expect("build the test guest");
    Vmm::builder(name)
        .kernel(&guest)
        .cmdline(cmdline)
        .cpus(cpus)
        .memory("512M")
        .serial_tty()
        .spawn()
        .expect("start the VMM")
}

fn expect_clean_shutdown(vmm: &mut Vmm) {
    vmm.wait_for(GUEST_DONE, WORKLOAD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = vmm
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        vmm.diagnose(&format!(
            "VMM exited with {status} after the guest shut down"
        ))
    );
    let stderr = vmm.stderr();
    assert!(!stderr.contains("panicked"), "VMM panicked:\n{stderr}");
}

#[test]
fn boot_hello_reaches_ready_via_pvh_and_exits_zero_on_guest_shutdown() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let mut vmm = guest_vmm("boot_hello", 1, "workload=hello");

    let ready = vmm
        .wait_for(GUEST_READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let fields = marker_fields(&ready.line);
    assert_eq!(
        fields.get("entry").map(String::as_str),
        Some("pvh"),
        "{}",
        ready.line
    );
    assert_eq!(
        fields.get("cpus").map(String::as_str),
        Some("1"),
        "{}",
        ready.line
    );
    assert!(
        ready.line.contains("workload=hello"),
        "guest did not see our command line: {}",
        ready.line
    );
    if let Some(mib) = fields.get("mem_mib").and_then(|m| m.parse::<u64>().ok()) {
        assert!(
            (256..=512).contains(&mib),
            "guest sees {mib} MiB, expected about 512: {}",
            ready.line
        );
    }
    report(&format!(
        "boot_hello: time to '{GUEST_READY}': {} ms",
        ready.after.as_millis()
    ));

    expect_clean_shutdown(&mut vmm);
    report(&format!(
        "boot_hello: time to VMM exit: {} ms",
        vmm.elapsed().as_millis()
    ));
}

#[test]
fn boot_dirty_workload_dirties_32_mib_and_verifies_its_memory() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let mut vmm = guest_vmm(
        "boot_dirty",
        1,
        "workload=dirty dirty.mib=32 dirty.rate=50 dirty.ms=1000",
    );

    vmm.wait_for(GUEST_READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let result = vmm
        .wait_for("DIRTY result", WORKLOAD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let fields = marker_fields(&result.line);
    assert_eq!(
        fields.get("verify").map(String::as_str),
        Some("ok"),
        "{}",
        result.line
    );
    assert_eq!(
        fields.get("mib").map(String::as_str),
        Some("32"),
        "{}",
        result.line
    );
    report(&format!("boot_dirty: {}", result.line));

    expect_clean_shutdown(&mut vmm);
}

#[test]
fn boot_smp_starts_two_vcpus_and_both_report_results() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let mut vmm = guest_vmm("boot_smp", 2, "workload=smp");

    let ready = vmm
        .wait_for(GUEST_READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        marker_fields(&ready.line).get("cpus").map(String::as_str),
        Some("2"),
        "{}",
        ready.line
    );
    let done = vmm
        .wait_for("SMP done", WORKLOAD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        done.line.contains("SMP done cpus=2 ok"),
        "{}",
        vmm.diagnose(&format!("unexpected SMP summary: {}", done.line))
    );
    let console = vmm.console();
    for cpu in 0..2 {
        let prefix = format!("SMP cpu={cpu} ");
        let line = console
            .lines()
            .find(|l| l.contains(&prefix))
            .unwrap_or_else(|| panic!("{}", vmm.diagnose(&format!("no line from CPU {cpu}"))));
        assert!(
            line.trim_end().ends_with(" ok"),
            "CPU {cpu} did not succeed: {line}"
        );
    }
    report(&format!(
        "boot_smp: '{}' after {} ms",
        done.line,
        done.after.as_millis()
    ));

    expect_clean_shutdown(&mut vmm);
}

#[test]
fn serial_file_receives_the_guest_console() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let guest = test_guest().expect("build the test guest");
    let dir = TempDir::new("serial_file").expect("temp dir");
    let log = dir.join("serial.log");
    let mut vmm = Vmm::builder("serial_file")
        .kernel(&guest)
        .cmdline("workload=hello")
        .cpus(1)
        .memory("512M")
        .serial_file(&log)
        .temp_dir(dir)
        .spawn()
        .expect("start the VMM");

    // wait_for reads the --serial file for this VMM.
    vmm.wait_for(GUEST_READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    expect_clean_shutdown(&mut vmm);

    let file = std::fs::read_to_string(&log).expect("read the serial file");
    assert!(file.contains(GUEST_READY), "serial file:\n{file}");
    assert!(file.contains(GUEST_DONE), "serial file:\n{file}");
    assert!(
        !vmm.stdout().contains(GUEST_READY),
        "with --serial file= the console must not also go to stdout"
    );
}

#[test]
fn guest_reset_reboots_the_vm_like_cloud_hypervisor() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    // exit=reset: the guest resets through the i8042 after DONE; the VMM must boot it again.
    let vmm = guest_vmm("guest_reset", 1, "workload=hello exit=reset");
    let deadline = std::time::Instant::now() + WORKLOAD_TIMEOUT;
    loop {
        let boots = vmm.console().matches(GUEST_READY).count();
        if boots >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            vmm.diagnose(&format!("only {boots} boots after resets"))
        );
        assert!(
            vmm.stderr().is_empty() || !vmm.stderr().contains("Error"),
            "{}",
            vmm.diagnose("VMM reported an error while rebooting")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    report(&format!(
        "guest_reset: 3 boots through guest resets in {:?}",
        vmm.elapsed()
    ));
}
