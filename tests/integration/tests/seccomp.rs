//! Every thread of a running VMM runs under a seccomp filter (`Seccomp: 2` in its
//! `/proc/<pid>/task/<tid>/status`): without a VM (main thread and API server), and with a
//! booted VM (vCPUs, device loop). The protected pair is checked by the FT tests
//! (`ft_shared_disk_reads`). That a forbidden call traps in each role is `vmm`'s
//! `seccomp_roles` test. The running VM's vCPUs are pinned (`--cpus affinity=`), which they
//! do themselves under their parent's filter.

use std::time::Duration;

use integration::{
    api_request, assert_every_thread_filtered, kvm_serial_guard, require_kvm, test_guest,
    thread_seccomp, thread_status, wait_for_api_socket, TempDir, Vmm,
};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn every_thread_of_an_idle_vmm_is_filtered() {
    let dir = TempDir::new("seccomp_idle").expect("temp dir");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::builder("seccomp_idle")
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");
    wait_for_api_socket(&mut vmm, &socket, TIMEOUT);
    // A connection thread exists while a request is served; ping makes sure the server ran.
    let (status, _) = api_request(&socket, "GET", "vmm.ping", None, TIMEOUT).expect("ping");
    assert_eq!(status, 200);
    assert_every_thread_filtered(vmm.pid(), "idle VMM");
    let names: Vec<_> = thread_seccomp(vmm.pid())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.iter().any(|n| n == "http-server"), "{names:?}");
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("seccomp_vm").expect("temp dir");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
    let kernel = test_guest().expect("guest").display().to_string();
    let socket = dir.join("api.sock");
    let disk = format!("path={}", image.display());
    // vCPU 0 on the first host CPU, vCPU 1 on the last.
    let last_cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let cpus = format!("boot=2,affinity=[0@[0],1@[{last_cpu}]]");
    let mut vmm = Vmm::builder("seccomp_vm")
        .args(["--api-socket", socket.to_str().expect("path")])
        .args([
            "--kernel",
            &kernel,
            "--cmdline",
            "workload=dirty dirty.mib=4 dirty.rate=10 dirty.ms=0",
            "--cpus",
            &cpus,
            "--memory",
            "size=64M",
            "--disk",
            &disk,
            "--serial",
            "tty",
            "--console",
            "off",
        ])
        .spawn()
        .expect("start the VMM");
    wait_for_api_socket(&mut vmm, &socket, TIMEOUT);
    vmm.wait_for("DIRTY progress", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_every_thread_filtered(vmm.pid(), "VMM with a running VM");
    let names: Vec<_> = thread_seccomp(vmm.pid())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for role in ["vcpu0", "vcpu1", "device-loop", "http-server"] {
        assert!(
            names.iter().any(|n| n == role),
            "no {role} thread: {names:?}"
        );
    }
    let allowed = thread_status(vmm.pid(), "Cpus_allowed_list:");
    for (vcpu, cpu) in [("vcpu0", 0), ("vcpu1", last_cpu)] {
        assert!(
            allowed.contains(&(vcpu.to_string(), cpu.to_string())),
            "{vcpu} is not pinned to host CPU {cpu}: {allowed:?}"
        );
    }
    assert!(vmm.poll_exit().is_none(), "the VMM exited");
}
