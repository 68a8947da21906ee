//! Bad input must make the VMM exit non-zero with a short message on stderr that names the
//! problem - never a panic, never a hang.

use std::process::Command;
use std::time::Duration;

use integration::{require_kvm, test_guest, TempDir, Vmm};

/// Runs the VMM with `args` and checks the failure: non-zero exit, no panic, and stderr's
/// first line mentions one of `words` (case-insensitive; lenient about the exact wording).
fn expect_rejected(name: &str, args: &[&str], words: &[&str]) {
    let mut vmm = Vmm::builder(name)
        .args(args)
        .spawn()
        .expect("start the VMM");
    expect_rejected_vmm(&mut vmm, words);
}

fn expect_rejected_vmm(vmm: &mut Vmm, words: &[&str]) {
    let status = vmm
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("bad input must not hang the VMM: {e}"));
    let stderr = vmm.stderr();
    assert!(
        !status.success(),
        "{}",
        vmm.diagnose("VMM accepted bad input (exit code 0)")
    );
    assert!(
        status.code().is_some(),
        "{}",
        vmm.diagnose(&format!(
            "VMM died from a signal ({status}) instead of exiting"
        ))
    );
    assert!(
        !stderr.contains("panicked"),
        "{}",
        vmm.diagnose("VMM panicked on bad input")
    );
    let first = stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        words.iter().any(|w| first.contains(&w.to_lowercase())),
        "{}",
        vmm.diagnose(&format!(
            "the first stderr line should name the problem (one of {words:?})"
        ))
    );
}

fn guest() -> std::path::PathBuf {
    test_guest().expect("build the test guest")
}

fn run_guest_with(name: &str, extra: &[&str], words: &[&str]) {
    let guest = guest();
    let kernel = guest.display().to_string();
    let mut args = vec!["--kernel", kernel.as_str(), "--cmdline", "workload=hello"];
    let has = |flag: &str| extra.contains(&flag);
    if !has("--cpus") {
        args.extend(["--cpus", "boot=1"]);
    }
    if !has("--memory") {
        args.extend(["--memory", "size=512M"]);
    }
    if !has("--serial") {
        args.extend(["--serial", "null"]);
    }
    if !has("--console") {
        args.extend(["--console", "off"]);
    }
    args.extend(extra);
    expect_rejected(name, &args, words);
}

// --- rejected by the command-line parser: no KVM needed -------------------------------------

#[test]
fn rejects_zero_boot_cpus() {
    run_guest_with("boot=0", &["--cpus", "boot=0"], &["cpu"]);
}

#[test]
fn rejects_unknown_option_key() {
    run_guest_with(
        "unknown key",
        &["--cpus", "boot=1,foo=2"],
        &["foo", "unknown", "cpus"],
    );
}

#[test]
fn rejects_serial_and_console_both_on_tty() {
    run_guest_with(
        "serial+console tty",
        &["--serial", "tty", "--console", "tty"],
        &["serial", "console", "tty"],
    );
}

// --- rejected while setting up the VM: these may open /dev/kvm first -------------------------

#[test]
fn rejects_missing_kernel_file() {
    require_kvm!();
    let dir = TempDir::new("missing_kernel").expect("temp dir");
    let missing = dir.join("no-such-kernel");
    let kernel = missing.display().to_string();
    expect_rejected(
        "missing kernel",
        &[
            "--kernel",
            &kernel,
            "--cpus",
            "boot=1",
            "--memory",
            "size=512M",
            "--serial",
            "null",
            "--console",
            "off",
        ],
        &["kernel", "no-such-kernel"],
    );
}

#[test]
fn rejects_unreadable_kernel_path_a_directory() {
    require_kvm!();
    // chmod 000 does not stop root; reading a directory fails for everyone (EISDIR).
    let dir = TempDir::new("dir_kernel").expect("temp dir");
    let kernel = dir.path().display().to_string();
    expect_rejected(
        "directory as kernel",
        &[
            "--kernel",
            &kernel,
            "--cpus",
            "boot=1",
            "--memory",
            "size=512M",
            "--serial",
            "null",
            "--console",
            "off",
        ],
        &["kernel"],
    );
}

#[test]
fn rejects_text_file_that_is_neither_elf_nor_bzimage() {
    require_kvm!();
    let dir = TempDir::new("text_kernel").expect("temp dir");
    let text = dir.join("kernel.txt");
    std::fs::write(&text, "this is a text file, not a kernel\n".repeat(200)).expect("write");
    let kernel = text.display().to_string();
    expect_rejected(
        "text kernel",
        &[
            "--kernel",
            &kernel,
            "--cpus",
            "boot=1",
            "--memory",
            "size=512M",
            "--serial",
            "null",
            "--console",
            "off",
        ],
        &["kernel", "elf", "bzimage"],
    );
}

#[test]
fn rejects_memory_too_small_for_the_kernel() {
    require_kvm!();
    run_guest_with("size=1M", &["--memory", "size=1M"], &["memory", "kernel"]);
}

#[test]
fn rejects_memory_larger_than_the_host_can_map() {
    require_kvm!();
    run_guest_with("size=64T", &["--memory", "size=64T"], &["memory"]);
}

#[test]
fn rejects_more_boot_cpus_than_kvm_allows() {
    require_kvm!();
    run_guest_with("boot=255", &["--cpus", "boot=255"], &["cpu"]);
}

/// Simulates a host without /dev/kvm: the VMM runs in a private mount namespace whose /dev is
/// an empty tmpfs. Needs root (unshare); skipped loudly otherwise.
#[test]
fn rejects_host_without_dev_kvm() {
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        integration::skip_or_fail(
            "rejects_host_without_dev_kvm",
            "cannot create a mount namespace (needs root and unshare)",
        );
        return;
    }
    let guest = guest();
    let kernel = guest.display().to_string();
    let mut vmm = Vmm::builder("no /dev/kvm")
        .wrapped_in([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs none /dev && exec \"$0\" \"$@\"",
        ])
        .args([
            "--kernel",
            kernel.as_str(),
            "--cmdline",
            "workload=hello",
            "--cpus",
            "boot=1",
            "--memory",
            "size=512M",
            "--serial",
            "null",
            "--console",
            "off",
        ])
        .spawn()
        .expect("start the VMM");
    expect_rejected_vmm(&mut vmm, &["kvm"]);
}

// --- disks and networks -----------------------------------------------------------------------

#[test]
fn rejects_missing_disk_image() {
    require_kvm!();
    run_guest_with(
        "missing_disk",
        &["--disk", "path=/nonexistent/disk.img"],
        &["does not exist"],
    );
}

#[test]
fn rejects_disk_image_smaller_than_a_sector() {
    require_kvm!();
    let dir = TempDir::new("tiny_disk").expect("temp dir");
    let image = dir.join("tiny.img");
    std::fs::write(&image, [0u8; 100]).expect("write image");
    let arg = format!("path={}", image.display());
    run_guest_with("tiny_disk", &["--disk", arg.as_str()], &["sector", "small"]);
}

#[test]
fn rejects_disk_queue_size_not_a_power_of_two() {
    run_guest_with(
        "disk_queue_size",
        &["--disk", "path=/tmp/x.img,queue_size=100"],
        &["queue_size"],
    );
}

#[test]
fn rejects_malformed_mac() {
    run_guest_with("bad_mac", &["--net", "mac=12:34:56:zz:9a:bc"], &["mac"]);
}

#[test]
fn rejects_tap_name_that_cannot_be_a_tap() {
    require_kvm!();
    // `lo` exists but is not a TAP: attaching to it must fail with a message naming it.
    run_guest_with("tap_lo", &["--net", "tap=lo"], &["lo"]);
}

#[test]
fn rejects_tap_name_too_long() {
    run_guest_with(
        "tap_long",
        &["--net", "tap=this-name-is-far-too-long"],
        &["net.tap"],
    );
}

#[test]
fn rejects_missing_rng_source() {
    require_kvm!();
    let dir = TempDir::new("missing_rng").expect("temp dir");
    let source = format!("src={}", dir.join("no-such-entropy").display());
    let kernel = guest().display().to_string();
    expect_rejected(
        "missing rng source",
        &[
            "--kernel",
            &kernel,
            "--memory",
            "size=64M",
            "--serial",
            "null",
            "--console",
            "off",
            "--rng",
            &source,
        ],
        &["--rng", "no-such-entropy"],
    );
}

#[test]
fn rejects_console_file_in_a_missing_directory() {
    require_kvm!();
    let dir = TempDir::new("console_file").expect("temp dir");
    let console = format!("file={}", dir.join("no-such-dir/console.log").display());
    let kernel = guest().display().to_string();
    expect_rejected(
        "console file in a missing directory",
        &[
            "--kernel",
            &kernel,
            "--memory",
            "size=64M",
            "--serial",
            "null",
            "--console",
            &console,
        ],
        &["console", "no-such-dir"],
    );
}

// --- vsock and pmem ---------------------------------------------------------------------------

#[test]
fn rejects_vsock_socket_path_that_exists() {
    require_kvm!();
    let dir = TempDir::new("vsock_exists").expect("temp dir");
    let socket = dir.join("vsock.sock");
    // A stale socket (or any file) there: the VMM must not take it over or remove it.
    std::fs::write(&socket, b"someone else's").expect("write file");
    let arg = format!("cid=3,socket={}", socket.display());
    run_guest_with(
        "vsock_exists",
        &["--vsock", arg.as_str()],
        &["vsock.socket"],
    );
    assert_eq!(
        std::fs::read(&socket).expect("the file is still there"),
        b"someone else's"
    );
}

#[test]
fn rejects_vsock_cid_below_3() {
    let dir = TempDir::new("vsock_cid").expect("temp dir");
    let arg = format!("cid=2,socket={}", dir.join("vsock.sock").display());
    run_guest_with("vsock_cid", &["--vsock", arg.as_str()], &["vsock.cid"]);
}

#[test]
fn rejects_missing_pmem_file() {
    require_kvm!();
    run_guest_with(
        "pmem_missing",
        &["--pmem", "file=/nonexistent/pmem.img"],
        &["pmem.file"],
    );
}

#[test]
fn rejects_pmem_file_smaller_than_its_size() {
    require_kvm!();
    let dir = TempDir::new("pmem_small").expect("temp dir");
    let file = dir.join("pmem.img");
    std::fs::write(&file, vec![0u8; 2 << 20]).expect("write file");
    let arg = format!("file={},size=4M", file.display());
    run_guest_with("pmem_small", &["--pmem", arg.as_str()], &["pmem.size"]);
}

#[test]
fn rejects_pmem_size_not_a_multiple_of_2mib() {
    let dir = TempDir::new("pmem_unaligned").expect("temp dir");
    let file = dir.join("pmem.img");
    std::fs::write(&file, vec![0u8; 4 << 20]).expect("write file");
    let arg = format!("file={},size=3M", file.display());
    run_guest_with("pmem_unaligned", &["--pmem", arg.as_str()], &["pmem.size"]);
}

// --- virtio-fs (vhost-user) ---------------------------------------------------------------------

/// `--fs` with the memory it needs (a vhost-user backend maps guest RAM).
fn fs_args(socket: &std::path::Path) -> Vec<String> {
    vec![
        "--memory".into(),
        "size=512M,shared=on".into(),
        "--fs".into(),
        format!("tag=myfs,socket={}", socket.display()),
    ]
}

#[test]
fn rejects_fs_without_shared_memory() {
    run_guest_with(
        "fs_private_memory",
        &["--fs", "tag=myfs,socket=/nonexistent/fs.sock"],
        &["memory.shared"],
    );
}

#[test]
fn rejects_fs_on_pci_segment_1_and_a_dax_window() {
    run_guest_with(
        "fs_segment",
        &[
            "--memory",
            "size=512M,shared=on",
            "--fs",
            "tag=myfs,socket=/nonexistent/fs.sock,pci_segment=1",
        ],
        &["fs.pci_segment"],
    );
    run_guest_with(
        "fs_dax",
        &[
            "--memory",
            "size=512M,shared=on",
            "--fs",
            "tag=myfs,socket=/nonexistent/fs.sock,cache_size=8G",
        ],
        &["dax"],
    );
}

#[test]
fn rejects_fs_socket_that_does_not_exist() {
    require_kvm!();
    let args = fs_args(std::path::Path::new("/nonexistent/fs.sock"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_guest_with("fs_missing_socket", &args, &["fs.socket"]);
}

#[test]
fn rejects_fs_socket_nobody_listens_on() {
    require_kvm!();
    let dir = TempDir::new("fs_refused").expect("temp dir");
    let socket = dir.join("fs.sock");
    // A socket file whose listener is gone: connections are refused.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    let args = fs_args(&socket);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_guest_with("fs_refused", &args, &["fs.socket"]);
}

#[test]
fn rejects_fs_backend_that_never_answers() {
    require_kvm!();
    let dir = TempDir::new("fs_mute").expect("temp dir");
    let socket = dir.join("fs.sock");
    // Listening (so the connection is made) but never answering: the handshake times out.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let args = fs_args(&socket);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    run_guest_with("fs_mute", &args, &["no answer"]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the handshake timeout took {:?}",
        started.elapsed()
    );
}

/// Through the API: `vm.create` refuses private memory, and `vm.boot` reports a backend
/// nobody runs (the VM stays created, nothing hangs).
#[test]
fn api_refuses_fs_without_shared_memory_and_boot_names_the_missing_backend() {
    require_kvm!();
    let dir = TempDir::new("fs_api").expect("temp dir");
    let api = dir.join("api.sock");
    let fs_socket = dir.join("fs.sock");
    let mut vmm = Vmm::builder("fs_api")
        .args(["--api-socket", api.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");
    integration::wait_for_api_socket(&mut vmm, &api, Duration::from_secs(30));
    let body = |shared: bool| {
        format!(
            r#"{{"cpus": {{"boot_vcpus": 1, "max_vcpus": 1}},
                "memory": {{"size": 536870912, "shared": {shared}}},
                "payload": {{"kernel": "{}", "cmdline": "workload=hello"}},
                "serial": {{"mode": "Null"}}, "console": {{"mode": "Off"}},
                "fs": [{{"tag": "myfs", "socket": "{}", "num_queues": 1, "queue_size": 1024}}]}}"#,
            guest().display(),
            fs_socket.display()
        )
    };
    let limit = Duration::from_secs(30);
    let (status, text) =
        integration::api_request(&api, "PUT", "vm.create", Some(&body(false)), limit)
            .expect("vm.create");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("memory.shared"), "{text}");
    let (status, text) =
        integration::api_request(&api, "PUT", "vm.create", Some(&body(true)), limit)
            .expect("vm.create");
    assert!((200..300).contains(&status), "{status} {text}");
    let (status, text) =
        integration::api_request(&api, "PUT", "vm.boot", None, limit).expect("vm.boot");
    assert!(status >= 400, "{status} {text}");
    assert!(text.contains("fs.socket"), "{text}");
    assert!(text.contains(&fs_socket.display().to_string()), "{text}");
    let (status, text) =
        integration::api_request(&api, "GET", "vm.info", None, limit).expect("vm.info");
    assert_eq!(status, 200, "{text}");
    drop(vmm);
}
