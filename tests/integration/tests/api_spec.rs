//! The running VMM's REST API checked against `api-spec/cloud-hypervisor.yaml` by a
//! schema-driven tester (`ci/api-schema-test`, schemathesis through a loopback relay).

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::{report, require_kvm, workspace_root, TempDir, Vmm};

#[test]
fn api_responses_match_the_openapi_spec() {
    // The VMM opens /dev/kvm when a generated request happens to create and boot a VM.
    require_kvm!();
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

    let script = workspace_root().join("ci/api-schema-test");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&socket)
        .current_dir(workspace_root())
        .env("API_SCHEMA_MAX_EXAMPLES", "15")
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
