//! The hot-plug API and CLI with bad input: `ch-remote add-*` / `remove-device` against a VMM
//! with no VM, malformed device syntax, descriptors ch-remote does not have, and TAP
//! descriptors on the cloud-hypervisor command line that are not TAPs, and requests a running
//! VM must refuse. Nothing here needs a guest that takes a device; refusals must be one clear
//! message, never a panic or a hang.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Output;
use std::time::Duration;

use integration::{api_request, ch_remote, require_kvm, test_guest, TempDir, Vmm};

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

/// `vm.info` as JSON (the configuration, state and device tree).
fn vm_info(vmm: &Vmm, socket: &std::path::Path) -> serde_json::Value {
    let (status, body) = api_request(socket, "GET", "vm.info", None, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e.to_string())));
    assert_eq!(status, 200, "{}", vmm.diagnose(&body));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("vm.info {body}: {e}"))
}

/// `PUT endpoint body` answers `status` with Cloud Hypervisor's error body (a JSON array of
/// messages) holding every one of `words`.
fn refused(
    vmm: &Vmm,
    socket: &std::path::Path,
    endpoint: &str,
    body: &str,
    status: u16,
    words: &[&str],
) {
    let (got, answer) = api_request(socket, "PUT", endpoint, Some(body), Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e.to_string())));
    assert_eq!(
        got,
        status,
        "{}",
        vmm.diagnose(&format!("{endpoint} {body}: {answer}"))
    );
    let messages: Vec<String> = serde_json::from_str(&answer).unwrap_or_else(|e| {
        panic!("{endpoint}: the error body {answer:?} is not a list of messages: {e}")
    });
    let text = messages.join("\n");
    for word in words {
        assert!(
            text.contains(word),
            "{endpoint} {body}: no {word:?} in {text}"
        );
    }
}

/// Hot-plug requests a running VM must refuse: a second vsock (one per VM), a pmem file smaller
/// than the size asked for, a pmem file that does not exist, virtio-fs on memory that is not
/// shared, and the removal of a device that does not exist. Each answers 400 (404 for the
/// unknown id) with the reason, and the VM runs on exactly as before: same configuration, same
/// devices, no mapping of the refused file. A good pmem then goes in (200, `{id, bdf}`, mapped,
/// pinned in the configuration).
#[test]
fn bad_hotplug_requests_leave_a_running_vm_untouched() {
    require_kvm!();
    let guest = test_guest().expect("build the test guest");
    let dir = TempDir::new("hotplug_running").expect("temp dir");
    let socket = dir.join("api.sock");
    let vsock = dir.join("vsock.sock");
    let small = dir.join("small.img");
    std::fs::write(&small, vec![0u8; 2 << 20]).expect("pmem file");
    let good = dir.join("good.img");
    std::fs::write(&good, vec![0u8; 2 << 20]).expect("pmem file");
    let vsock_arg = format!("cid=3,socket={}", vsock.display());
    let mut vmm = Vmm::builder("hotplug_running")
        .args([
            "--kernel",
            guest.to_str().expect("path"),
            "--cmdline",
            "workload=hello exit=halt",
            "--memory",
            "size=256M",
            "--serial",
            "null",
            "--console",
            "off",
            "--vsock",
            vsock_arg.as_str(),
            "--api-socket",
            socket.to_str().expect("path"),
        ])
        .temp_dir(dir)
        .spawn()
        .expect("start the VMM");
    integration::wait_for_api_socket(&mut vmm, &socket, Duration::from_secs(30));
    let before = vm_info(&vmm, &socket);
    assert_eq!(before["state"], "Running", "{before}");

    let other_socket = small.with_file_name("other.sock");
    refused(
        &vmm,
        &socket,
        "vm.add-vsock",
        &format!(r#"{{"cid": 4, "socket": "{}"}}"#, other_socket.display()),
        400,
        &["vsock device already", "one per VM"],
    );
    assert!(!other_socket.exists(), "the refused vsock made its socket");
    refused(
        &vmm,
        &socket,
        "vm.add-pmem",
        &format!(r#"{{"file": "{}", "size": 4194304}}"#, small.display()),
        400,
        &["pmem.size", "smaller than the requested size", "small.img"],
    );
    refused(
        &vmm,
        &socket,
        "vm.add-pmem",
        r#"{"file": "/nonexistent/pmem.img"}"#,
        400,
        &["pmem.file", "/nonexistent/pmem.img"],
    );
    refused(
        &vmm,
        &socket,
        "vm.add-fs",
        r#"{"tag": "myfs", "socket": "/nonexistent/fs.sock", "num_queues": 1, "queue_size": 1024}"#,
        400,
        &["memory.shared", "virtio-fs"],
    );
    refused(
        &vmm,
        &socket,
        "vm.remove-device",
        r#"{"id": "_nosuch0"}"#,
        404,
        &["_nosuch0"],
    );
    assert!(
        vmm.poll_exit().is_none(),
        "{}",
        vmm.diagnose("the VMM exited")
    );
    assert_eq!(
        vm_info(&vmm, &socket),
        before,
        "a refused request changed the VM"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vmm.pid())).expect("maps");
    assert!(
        !maps.contains("small.img"),
        "the refused pmem file is mapped"
    );

    // A good one: CH's answer, its file mapped into the VMM, pinned where it sits.
    let (status, body) = api_request(
        &socket,
        "PUT",
        "vm.add-pmem",
        Some(&format!(r#"{{"file": "{}"}}"#, good.display())),
        Duration::from_secs(60),
    )
    .expect("vm.add-pmem");
    assert_eq!(status, 200, "{}", vmm.diagnose(&body));
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
    assert_eq!(answer["id"], "_pmem0", "{answer}");
    let bdf = answer["bdf"].as_str().expect("bdf");
    let slot = u64::from_str_radix(&bdf[8..10], 16).expect("slot");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vmm.pid())).expect("maps");
    assert!(maps.contains("good.img"), "the pmem file is not mapped");
    let after = vm_info(&vmm, &socket);
    assert_eq!(after["config"]["pmem"][0]["id"], "_pmem0", "{after}");
    assert_eq!(after["config"]["pmem"][0]["pci_device_id"], slot, "{after}");
    assert_eq!(after["state"], "Running", "{after}");
}

/// virtio-fs into a running VM on shared memory, with no backend behind the socket: a socket
/// nobody listens on is refused (400) at once, and a backend that accepts but never answers
/// is given up after the vhost-user watchdog's bound (500 naming the step), not waited on
/// forever; a vsock whose socket path exists is refused (400). The control loop answers
/// throughout and the VM is as it was.
#[test]
fn a_missing_or_mute_vhost_user_backend_is_refused_without_hanging_the_vmm() {
    require_kvm!();
    let guest = test_guest().expect("build the test guest");
    let dir = TempDir::new("hotplug_mute_fs").expect("temp dir");
    let socket = dir.join("api.sock");
    let missing = dir.join("missing.sock");
    let mute = dir.join("mute.sock");
    // Accepts connections (the kernel's backlog) and never reads or answers.
    let _mute_backend = std::os::unix::net::UnixListener::bind(&mute).expect("bind");
    let stale = dir.join("stale.sock");
    std::fs::write(&stale, b"").expect("a file in the way");
    let mut vmm = Vmm::builder("hotplug_mute_fs")
        .args([
            "--kernel",
            guest.to_str().expect("path"),
            "--cmdline",
            "workload=hello exit=halt",
            "--memory",
            "size=256M,shared=on",
            "--serial",
            "null",
            "--console",
            "off",
            "--api-socket",
            socket.to_str().expect("path"),
        ])
        .temp_dir(dir)
        .spawn()
        .expect("start the VMM");
    integration::wait_for_api_socket(&mut vmm, &socket, Duration::from_secs(30));
    let before = vm_info(&vmm, &socket);
    let fs_body = |path: &std::path::Path| {
        format!(
            r#"{{"tag": "myfs", "socket": "{}", "num_queues": 1, "queue_size": 1024}}"#,
            path.display()
        )
    };
    refused(
        &vmm,
        &socket,
        "vm.add-fs",
        &fs_body(&missing),
        400,
        &["fs.socket", "cannot connect", "missing.sock"],
    );
    let started = std::time::Instant::now();
    refused(
        &vmm,
        &socket,
        "vm.add-fs",
        &fs_body(&mute),
        500,
        &["mute.sock", "gave no answer"],
    );
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "the mute backend held the control loop for {waited:?}"
    );
    refused(
        &vmm,
        &socket,
        "vm.add-vsock",
        &format!(r#"{{"cid": 3, "socket": "{}"}}"#, stale.display()),
        400,
        &["vsock.socket", "stale.sock"],
    );
    assert!(
        stale.is_file(),
        "the refused vsock touched the file in its way"
    );
    let (status, _) = api_request(&socket, "GET", "vmm.ping", None, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e.to_string())));
    assert_eq!(status, 200);
    assert_eq!(
        vm_info(&vmm, &socket),
        before,
        "a refused request changed the VM"
    );
    assert!(
        vmm.poll_exit().is_none(),
        "{}",
        vmm.diagnose("the VMM exited")
    );
}
