//! Fault tolerance end to end: a primary VMM on host A protected by a backup VMM on host B
//! (network namespaces), a client in a third namespace talking to the guest over TCP, then the
//! primary killed with SIGKILL. The client's connection must go on against the backup.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::ft::echo_round;
use integration::{
    api_vmm, ch_remote, ch_remote_binary, guest_vm_args, kvm_serial_guard, report, require_kvm,
    require_netns, test_guest, two_hosts, TempDir, HOST_B,
};

const TIMEOUT: Duration = Duration::from_secs(90);
const GUEST_MAC: &str = "12:34:56:78:9a:bc";

fn ft_status(socket: &Path) -> serde_json::Value {
    let out = ch_remote(socket, &["ft-status"], None);
    assert!(
        out.status.success(),
        "ft-status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ft-status is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn wait_status(socket: &Path, field: &str, want: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = ft_status(socket);
        if status[field] == want {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "ft-status {field} never became {want}: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcp_connection_survives_the_kill_of_the_primary() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let hosts = two_hosts("f");
    let dir = TempDir::new("ft_failover").expect("temp dir");
    let guest = test_guest().expect("guest");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let kernel = guest.display().to_string();
    let net = format!("tap=tapvm,mac={GUEST_MAC}");
    let args = guest_vm_args(
        &kernel,
        "workload=net net.ip=192.168.249.2/24",
        "size=128M",
        &net,
        &["-v"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut primary = api_vmm(TIMEOUT, "ft_primary", &hosts.a, &sock_a, &args);
    primary
        .wait_for("NET ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut backup = api_vmm(TIMEOUT, "ft_backup", &hosts.b, &sock_b, &["-v"]);
    let url = format!("tcp:{HOST_B}:7100");
    let out = ch_remote(&sock_b, &["receive-ft", &url, "--tap", "tapvm"], None);
    assert!(
        out.status.success(),
        "receive-ft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = Instant::now();
    let out = ch_remote(
        &sock_a,
        &[
            "enable-ft",
            "--peer",
            &format!("{HOST_B}:7100"),
            "--heartbeat-timeout-ms",
            "500",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "enable-ft: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        primary.diagnose("primary"),
        backup.diagnose("backup")
    );
    let sync = started.elapsed();
    let status = wait_status(&sock_a, "health", "protected", TIMEOUT);
    assert_eq!(status["role"], "primary");

    let mut stream = hosts
        .client
        .run(|| {
            TcpStream::connect_timeout(
                &"192.168.249.2:7".parse().expect("addr"),
                Duration::from_secs(10),
            )
        })
        .expect("namespace thread")
        .expect("connect to the guest's echo service");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    for round in 0..50 {
        echo_round(&mut stream, round).unwrap_or_else(|e| panic!("{e}"));
    }
    let protected = ft_status(&sock_a);
    assert!(
        protected["last_committed_epoch"].as_u64().unwrap_or(0) > 1,
        "{protected}"
    );

    primary.kill();
    let killed = Instant::now();
    let backup_status = wait_status(&sock_b, "health", "took_over", TIMEOUT);
    for round in 50..100 {
        echo_round(&mut stream, round)
            .unwrap_or_else(|e| panic!("{e}\n{}", backup.diagnose("echo after the failover")));
    }
    let first_answer = killed.elapsed();
    let info = ch_remote(&sock_b, &["info"], None);
    assert!(String::from_utf8_lossy(&info.stdout).contains("Running"));
    report(&format!(
        "ft: sync {sync:?}; primary status {protected}; after kill -9 the backup took over ({}) and answered 50 echo rounds within {first_answer:?}",
        backup_status["last_failover_ms"]
    ));
    let _ = Command::new(ch_remote_binary()).arg("--version").status();
    backup.kill();
}
