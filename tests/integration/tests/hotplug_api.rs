//! The hot-plug API and CLI with bad input: `ch-remote add-*` / `remove-device` against a VMM
//! with no VM, malformed device syntax, descriptors ch-remote does not have, and TAP
//! descriptors on the cloud-hypervisor command line that are not TAPs. Nothing here needs a
//! guest that takes a device; refusals must be one clear message, never a panic or a hang.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Output;
use std::time::Duration;

use integration::{ch_remote, require_kvm, test_guest, TempDir, Vmm};

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A VMM serving the API with no VM.
fn api_only(name: &str) -> (Vmm, std::path::PathBuf) {
    let dir = TempDir::new(name).expect("temp dir");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::builder(name)
        .args(["--api-socket", socket.to_str().expect("path")])
        .temp_dir(dir)
        .spawn()
        .expect("start the VMM");
    integration::wait_for_api_socket(&mut vmm, &socket, Duration::from_secs(30));
    (vmm, socket)
}

/// `ch-remote ARGS` fails with exit code 1, stderr holding every one of `words`.
fn fails_with(vmm: &Vmm, socket: &std::path::Path, args: &[&str], words: &[&str]) {
    let out = ch_remote(socket, args, None);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        vmm.diagnose(&format!(
            "ch-remote {args:?}\nstdout: {stdout}\nstderr: {stderr}"
        ))
    );
    assert!(!stderr.contains("panicked"), "ch-remote {args:?}: {stderr}");
    for word in words {
        assert!(
            stderr.contains(word),
            "ch-remote {args:?}: no {word:?} in {stderr}"
        );
    }
}

#[test]
fn hotplug_without_a_vm_is_refused_as_cloud_hypervisor_does() {
    require_kvm!();
    let (mut vmm, socket) = api_only("hotplug_no_vm");
    // Well-formed: the VMM answers 404, and ch-remote reports it as Cloud Hypervisor's does.
    for args in [
        &["add-disk", "path=/nonexistent/x.img,readonly=on"][..],
        &["add-net", "tap=tnd9"],
        &["add-pmem", "file=/nonexistent/p"],
        &["add-vsock", "cid=3,socket=/nonexistent/v.sock"],
    ] {
        fails_with(
            &vmm,
            &socket,
            args,
            &[
                "Error: ch-remote exited with the following chain of errors:",
                "Server responded with NotFound",
                "no VM has been created",
            ],
        );
    }
    // An unknown device: whatever the control loop says, it is no success and says why.
    let out = ch_remote(&socket, &["remove-device", "_nosuch0"], None);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "remove-device: {stdout}");
    assert!(stderr.contains("Server responded with"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Refused by the VMM as vm.create refuses such a device (400 naming the field).
    fails_with(
        &vmm,
        &socket,
        &["add-disk", "path=/x.img,num_queues=2"],
        &["Server responded with BadRequest", "disks.num_queues"],
    );
    fails_with(
        &vmm,
        &socket,
        &["add-vsock", "cid=2,socket=/v.sock"],
        &["Server responded with BadRequest", "vsock.cid"],
    );
    // Refused by ch-remote before anything is sent: syntax, and descriptors it does not have.
    fails_with(
        &vmm,
        &socket,
        &["add-disk", "readonly=on"],
        &["invalid add-disk argument", "path=<disk image> is required"],
    );
    fails_with(
        &vmm,
        &socket,
        &["add-net", "fd=[987654]"],
        &["fd 987654 is not an open descriptor of ch-remote"],
    );
    assert!(
        vmm.poll_exit().is_none(),
        "{}",
        vmm.diagnose("the VMM exited")
    );
}

#[test]
fn a_net_fd_that_is_not_open_is_refused_at_start() {
    let mut vmm = Vmm::builder("net_fd_not_open")
        .args(["--kernel", "/nonexistent/k", "--net", "fd=987654"])
        .spawn()
        .expect("start the VMM");
    let status = vmm.wait_exit(Duration::from_secs(30)).expect("exit");
    assert!(!status.success(), "{}", vmm.diagnose("accepted"));
    let stderr = vmm.stderr();
    assert!(
        stderr.contains("--net fd=987654: descriptor 987654 is not open in this process"),
        "{}",
        vmm.diagnose("wrong message")
    );
}

/// Leaves `fd` open across exec (the VMM inherits it under the same number).
fn inheritable(fd: OwnedFd) -> OwnedFd {
    // SAFETY: F_GETFD/F_SETFD on our own open descriptor; no memory involved.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFD);
        assert!(flags >= 0);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC);
    }
    fd
}

#[test]
fn a_net_fd_that_is_not_a_tap_is_refused_by_name() {
    require_kvm!();
    let guest = test_guest().expect("build the test guest");
    let dir = TempDir::new("net_fd_file").expect("temp dir");
    let file = std::fs::File::create(dir.join("not-a-tap")).expect("file");
    let fd = inheritable(file.into());
    let net = format!("fd={}", fd.as_raw_fd());
    let mut vmm = Vmm::builder("net_fd_file")
        .args([
            "--kernel",
            guest.to_str().expect("path"),
            "--cmdline",
            "workload=hello",
            "--memory",
            "size=256M",
            "--serial",
            "null",
            "--console",
            "off",
            "--net",
            net.as_str(),
        ])
        .spawn()
        .expect("start the VMM");
    drop(fd);
    let status = vmm.wait_exit(Duration::from_secs(30)).expect("exit");
    assert!(!status.success(), "{}", vmm.diagnose("accepted a file"));
    let stderr = vmm.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("is not a TAP device: a regular file"),
        "{}",
        vmm.diagnose("wrong message")
    );
}
