//! The running VMM's REST API checked against `api-spec/cloud-hypervisor.yaml` by a
//! schema-driven tester (`ci/api-schema-test`, schemathesis through a loopback relay).

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::{kvm_serial_guard, report, require_kvm, workspace_root, TempDir, Vmm};

#[test]
fn api_responses_match_the_openapi_spec() {
    // The VMM opens /dev/kvm when a generated request happens to create and boot a VM.
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("api_spec").expect("temp dir");
    let socket = dir.join("api.sock");
    let socket_arg = socket.display().to_string();
    let mut vmm = Vmm::builder("api_spec")
        .args(["--api-socket", socket_arg.as_str()])
        .spawn()
        .expect("start the VMM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "{}",
            vmm.diagnose("the API socket never appeared")
        );
        if vmm.wait_exit(Duration::from_millis(50)).is_ok() {
            panic!("{}", vmm.diagnose("the VMM exited before serving the API"));
        }
    }

    // Phase 1: no VM, so the VM endpoints answer with their documented errors.
    run_schema_test(&mut vmm, &socket, "");

    // Phase 2: a booted test guest, so info/counters/pause/resume/reboot answer with success
    // bodies; the operations that would end the VM are left out.
    let guest = integration::test_guest().expect("build the test guest");
    let config = format!(
        r#"{{"cpus": {{"boot_vcpus": 1, "max_vcpus": 1}}, "memory": {{"size": 268435456}},
            "payload": {{"kernel": "{}", "cmdline": "workload=hello exit=halt"}},
            "serial": {{"mode": "Null"}}, "console": {{"mode": "Off"}}}}"#,
        guest.display()
    );
    let ch_remote = integration::vmm_binary()
        .expect("VMM binary")
        .with_file_name("ch-remote");
    for args in [vec!["create", "-"], vec!["boot"]] {
        let mut child = Command::new(&ch_remote)
            .arg("--api-socket")
            .arg(&socket)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run ch-remote");
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, config.as_bytes()).expect("send config");
        }
        let status = child.wait().expect("ch-remote");
        assert!(
            status.success(),
            "{}",
            vmm.diagnose(&format!("ch-remote {args:?}"))
        );
    }
    // Hot-plug is left out too: a generated device would be plugged into the running guest
    // (a vsock would bind its socket wherever the generated path points), and a generated id
    // could name one of the guest's devices.
    run_schema_test(
        &mut vmm,
        &socket,
        "deleteVM,shutdownVM,powerButtonVM,vmAddDiskPut,vmAddNetPut,vmAddPmemPut,vmAddFsPut,\
         vmAddVsockPut,vmRemoveDevicePut",
    );
}

fn run_schema_test(vmm: &mut Vmm, socket: &std::path::Path, exclude: &str) {
    let script = workspace_root().join("ci/api-schema-test");
    let out = Command::new("bash")
        .arg(&script)
        .arg(socket)
        .current_dir(workspace_root())
        .env("API_SCHEMA_MAX_EXAMPLES", "15")
        .env("API_SCHEMA_EXCLUDE", exclude)
        .output()
        .expect("run ci/api-schema-test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    report(&format!(
        "api_spec: ci/api-schema-test exited {}; summary:\n{}",
        out.status,
        integration::tail_lines(&stdout, 12)
    ));
    assert!(
        out.status.success(),
        "{}",
        vmm.diagnose(&format!(
            "ci/api-schema-test failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            out.status
        ))
    );
    assert!(
        vmm.wait_exit(Duration::from_millis(10)).is_err(),
        "{}",
        vmm.diagnose("the VMM exited during the schema test")
    );
}
