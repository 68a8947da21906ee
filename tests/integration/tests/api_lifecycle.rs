//! The REST API end to end: the real `cloud-hypervisor` started with only `--api-socket`, driven
//! by the real `ch-remote` through a whole VM lifecycle of the test guest under real KVM.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use integration::{
    ch_remote, ch_remote_binary, kvm_serial_guard, require_kvm, test_guest, TempDir, Vmm,
    GUEST_READY,
};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Succeeds, prints nothing.
fn ok_silent(vmm: &Vmm, socket: &Path, args: &[&str]) {
    let out = ch_remote(socket, args, None);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success() && stdout.is_empty(),
        "{}",
        vmm.diagnose(&format!(
            "ch-remote {args:?}: {}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        ))
    );
}

/// Fails with exit code 1 and stderr naming `status` and containing `message`.
fn fails(
    vmm: &Vmm,
    socket: &Path,
    args: &[&str],
    stdin: Option<&str>,
    status: &str,
    message: &str,
) {
    let out = ch_remote(socket, args, stdin);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        vmm.diagnose(&format!("ch-remote {args:?} should fail: {stdout}{stderr}"))
    );
    assert!(
        stderr.contains(&format!("Server responded with {status}")) && stderr.contains(message),
        "ch-remote {args:?}: expected {status} / {message:?}, got:\n{stderr}"
    );
}

fn info_state(vmm: &Vmm, socket: &Path) -> String {
    let out = ch_remote(socket, &["info"], None);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "{}",
        vmm.diagnose(&format!("ch-remote info: {stderr}"))
    );
    // Pretty JSON: `"state": "Running"`.
    let at = stdout.find("\"state\": \"").expect("state in vm.info") + 10;
    stdout[at..].split('"').next().unwrap_or("").to_string()
}

/// Waits until the API answers a ping.
fn wait_for_api(vmm: &mut Vmm, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if socket.exists() && ch_remote(socket, &["ping"], None).status.success() {
            return;
        }
        if Instant::now() > deadline {
            panic!("{}", vmm.diagnose("the API socket never answered a ping"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_file(path: &Path, marker: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(marker)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn api_lifecycle_with_ch_remote() {
    require_kvm!();
    let guest = test_guest().expect("build the test guest");
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("api_lifecycle").expect("temp dir");
    let socket = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let events = dir.join("events.json");
    let socket_arg = socket.display().to_string();
    let events_arg = format!("path={}", events.display());
    let mut vmm = Vmm::builder("api_lifecycle")
        .args(["--api-socket", socket_arg.as_str()])
        .args(["--event-monitor", events_arg.as_str()])
        .spawn()
        .expect("start the VMM");
    wait_for_api(&mut vmm, &socket);

    // ping: pretty JSON with the version.
    let out = ch_remote(&socket, &["ping"], None);
    let (stdout, _) = text(&out);
    assert!(stdout.contains("\"version\": "), "{stdout}");

    // Nothing created yet.
    fails(&vmm, &socket, &["info"], None, "NotFound", "");
    fails(&vmm, &socket, &["boot"], None, "NotFound", "");
    // A VMM without a VM is simply not protecting anything, in words and in JSON.
    let out = ch_remote(&socket, &["ft-status", "--summary"], None);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("health:      off (not protected: protect it with enable-ft)"),
        "{stdout}"
    );
    let out = ch_remote(&socket, &["ft-status"], None);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON when piped");
    assert_eq!(
        (&status["role"], &status["health"]),
        (&"none".into(), &"off".into())
    );

    // Bad JSON and a config that fails validation: 400 naming the problem.
    fails(
        &vmm,
        &socket,
        &["create"],
        Some("{\"cpus\": "),
        "BadRequest",
        "invalid VmConfig JSON",
    );
    fails(
        &vmm,
        &socket,
        &["create", "-"],
        Some("{\"bogus\": 1}"),
        "BadRequest",
        "bogus",
    );
    fails(
        &vmm,
        &socket,
        &["create"],
        Some("{}"),
        "BadRequest",
        "payload.kernel",
    );

    let config = format!(
        r#"{{
            "cpus": {{"boot_vcpus": 1, "max_vcpus": 1}},
            "memory": {{"size": 536870912}},
            "payload": {{"kernel": "{}", "cmdline": "workload=hello exit=halt"}},
            "serial": {{"mode": "File", "file": "{}"}},
            "console": {{"mode": "Off"}}
        }}"#,
        guest.display(),
        serial.display()
    );
    let config_file = dir.join("vm.json");
    std::fs::write(&config_file, &config).expect("write config");
    ok_silent(
        &vmm,
        &socket,
        &["create", config_file.to_str().expect("utf-8 path")],
    );
    assert_eq!(info_state(&vmm, &socket), "Created");
    fails(&vmm, &socket, &["pause"], None, "MethodNotAllowed", "pause");

    ok_silent(&vmm, &socket, &["boot"]);
    assert!(
        wait_for_file(&serial, GUEST_READY, READY_TIMEOUT),
        "{}",
        vmm.diagnose(&format!(
            "guest never printed {GUEST_READY} to {}: {:?}",
            serial.display(),
            std::fs::read_to_string(&serial).unwrap_or_default()
        ))
    );
    assert_eq!(info_state(&vmm, &socket), "Running");
    fails(
        &vmm,
        &socket,
        &["resume"],
        None,
        "MethodNotAllowed",
        "resume",
    );

    ok_silent(&vmm, &socket, &["pause"]);
    assert_eq!(info_state(&vmm, &socket), "Paused");
    fails(&vmm, &socket, &["pause"], None, "MethodNotAllowed", "pause");
    ok_silent(&vmm, &socket, &["resume"]);
    assert_eq!(info_state(&vmm, &socket), "Running");

    let out = ch_remote(&socket, &["counters"], None);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "counters: {stderr}");
    assert!(stdout.trim_start().starts_with('{'), "{stdout}");

    // A client that connects and says nothing must not hold up anyone else.
    let stalled = UnixStream::connect(&socket).expect("connect");
    let started = Instant::now();
    let out = ch_remote(&socket, &["ping"], None);
    assert!(out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ping took {:?} next to a stalled client",
        started.elapsed()
    );
    drop(stalled);

    ok_silent(&vmm, &socket, &["shutdown"]);
    // As in Cloud Hypervisor: the VM is gone, its configuration stays (`Created`), and it
    // boots again from it.
    assert_eq!(info_state(&vmm, &socket), "Created");
    ok_silent(&vmm, &socket, &["boot"]);
    assert_eq!(info_state(&vmm, &socket), "Running");
    ok_silent(&vmm, &socket, &["shutdown"]);
    ok_silent(&vmm, &socket, &["delete"]);
    fails(&vmm, &socket, &["info"], None, "NotFound", "");

    ok_silent(&vmm, &socket, &["shutdown-vmm"]);
    let status = vmm
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(0), "{}", vmm.diagnose("exit status"));
    assert!(!vmm.stderr().contains("panicked"), "{}", vmm.stderr());

    // The event monitor saw the lifecycle, in Cloud Hypervisor's format.
    let log = std::fs::read_to_string(&events).unwrap_or_default();
    let mut last = 0;
    for event in [
        "booting", "booted", "pausing", "paused", "resuming", "resumed", "shutdown",
    ] {
        let needle = format!("\"event\": \"{event}\"");
        let at = log[last..]
            .find(&needle)
            .unwrap_or_else(|| panic!("event {event} missing or out of order in:\n{log}"));
        last += at;
    }
}

#[test]
fn ch_remote_usage_errors() {
    let out = ch_remote(Path::new("/nonexistent/api.sock"), &["ping"], None);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with("Error opening HTTP socket: "),
        "{stderr}"
    );

    let out = Command::new(ch_remote_binary())
        .args(["--api-socket", "/x", "frobnicate"])
        .output()
        .expect("run ch-remote");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("frobnicate"), "{stderr}");

    let out = Command::new(ch_remote_binary())
        .arg("ping")
        .output()
        .expect("run ch-remote");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--api-socket"), "{stderr}");
}
