//! Slow tier: a stock Debian cloud kernel (`linux-image-*-cloud-amd64`, fetched by
//! `ci/fetch-linux`) booted by our VMM through its PVH entry - a boot protocol against a kernel
//! nobody here wrote.
//!
//! On this machine guest CPL0 code is emulated by (nested, PVM) KVM, and the stock kernel dies
//! on an emulation failure (`lock cmpxchg16b`) shortly after its banner, before its real console
//! registers. So the test stops at the banner and the command-line echo printed through
//! `earlyprintk` on our serial port; on real hardware with VT-x/AMD-V the kernel would boot on.

use std::time::Duration;

use integration::{debian_vmlinux, kvm_serial_guard, report, require_kvm, Vmm};

const MARKER: &str = "tandem-marker-123";

#[test]
fn linux_banner_debian_vmlinux_prints_banner_and_cmdline_on_our_serial() {
    require_kvm!();
    // Not optional: if the kernel cannot be fetched, the test fails.
    let vmlinux = debian_vmlinux().unwrap_or_else(|e| panic!("{e}"));
    let _boot = kvm_serial_guard();

    let mut vmm = Vmm::builder("linux_banner")
        .kernel(&vmlinux)
        .cmdline(&format!(
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 {MARKER}"
        ))
        .cpus(1)
        .memory("512M")
        .serial_tty()
        .spawn()
        .expect("start the VMM");

    let banner = vmm
        .wait_for("Linux version", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    report(&format!(
        "linux_banner: '{}' after {} ms",
        banner.line,
        banner.after.as_millis()
    ));
    let cmdline = vmm
        .wait_for(MARKER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        cmdline.line.contains("Command line:"),
        "{}",
        vmm.diagnose(&format!(
            "marker seen outside the command-line echo: {}",
            cmdline.line
        ))
    );
    report(&format!(
        "linux_banner: command line echoed after {} ms",
        cmdline.after.as_millis()
    ));
    // The kernel cannot get further here (see above): stop it.
    vmm.kill();
    assert!(
        !vmm.stderr().contains("panicked"),
        "{}",
        vmm.diagnose("VMM panicked")
    );
}

/// "Memory too small for the kernel" with a kernel that really is big: the Debian vmlinux loads
/// up to about 62 MiB, so 32 MiB (the smallest size the option parser takes) cannot hold it.
#[test]
fn rejects_debian_vmlinux_that_does_not_fit_in_32_mib() {
    require_kvm!();
    let vmlinux = debian_vmlinux().unwrap_or_else(|e| panic!("{e}"));
    let mut vmm = Vmm::builder("vmlinux in 32M")
        .kernel(&vmlinux)
        .cmdline("console=ttyS0")
        .cpus(1)
        .memory("32M")
        .args(["--serial", "null", "--console", "off"])
        .spawn()
        .expect("start the VMM");
    let status = vmm
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = vmm.stderr();
    assert!(
        !status.success() && status.code().is_some(),
        "{}",
        vmm.diagnose(&format!("expected a clean failure, got {status}"))
    );
    assert!(
        !stderr.contains("panicked"),
        "{}",
        vmm.diagnose("VMM panicked")
    );
    let first = stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        first.contains("memory") || first.contains("kernel"),
        "{}",
        vmm.diagnose("the first stderr line should say the kernel does not fit in memory")
    );
}
