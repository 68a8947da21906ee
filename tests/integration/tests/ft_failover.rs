//! Fault tolerance end to end: a primary VMM on host A protected by a backup VMM on host B
//! (network namespaces), a client in a third namespace talking to the guest over TCP, then the
//! primary killed with SIGKILL. The client's connection must go on against the backup.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::ft::{echo_round, ft_events, wait_for_event};
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
    // Both sides report every protection change on their event monitors.
    let (events_a, events_b) = (dir.join("a-events.json"), dir.join("b-events.json"));
    let monitor_a = format!("path={}", events_a.display());
    let monitor_b = format!("path={}", events_b.display());
    let kernel = guest.display().to_string();
    let net = format!("tap=tapvm,mac={GUEST_MAC}");
    let args = guest_vm_args(
        &kernel,
        "workload=net net.ip=192.168.249.2/24",
        "size=128M",
        &net,
        &["-v", "--event-monitor", &monitor_a],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut primary = api_vmm(TIMEOUT, "ft_primary", &hosts.a, &sock_a, &args);
    primary
        .wait_for("NET ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut backup = api_vmm(
        TIMEOUT,
        "ft_backup",
        &hosts.b,
        &sock_b,
        &["-v", "--event-monitor", &monitor_b],
    );
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
            // Pages on two data streams beside the first connection, each encoded and
            // written by its own thread and read by its own on the backup (seccomp roles
            // included, mutual TLS on each): the backup must still hold exactly the
            // primary's memory.
            "--streams",
            "3",
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
    assert_eq!(status["streams"], 3, "{status}");
    let backup_status = wait_status(&sock_b, "health", "protected", TIMEOUT);
    assert_eq!(backup_status["streams"], 3, "{backup_status}");
    assert_eq!(status["encode_threads"], 2, "{status}");

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
    // What dirty tracking cost the guest so far: its first writes after each checkpoint's
    // re-arm fault in KVM (this host's kernel counts them per vCPU).
    assert!(
        protected["kvm_page_faults"].as_u64().unwrap_or(0) > 0,
        "no KVM page faults counted for a guest that served 50 echo rounds: {protected}"
    );

    primary.kill();
    let killed = Instant::now();
    let backup_status = wait_status(&sock_b, "health", "took_over", TIMEOUT);
    for round in 50..100 {
        echo_round(&mut stream, round)
            .unwrap_or_else(|e| panic!("{e}\n{}", backup.diagnose("echo after the failover")));
    }
    let first_answer = killed.elapsed();
    // The operator's view of all this, on each side's event monitor.
    let primary_events = ft_events(&events_a);
    let names: Vec<&str> = primary_events.iter().map(|(e, _)| e.as_str()).collect();
    let syncing_at = names.iter().position(|e| *e == "ft-syncing");
    let protected_at = names.iter().position(|e| *e == "ft-protected");
    assert!(
        syncing_at.is_some() && protected_at.is_some() && syncing_at < protected_at,
        "primary events: {names:?}"
    );
    let (_, done) = primary_events
        .iter()
        .rfind(|(e, _)| e == "ft-sync-progress")
        .unwrap_or_else(|| panic!("no ft-sync-progress event: {names:?}"));
    assert_eq!(done["phase"], "done", "{done}");
    let events = wait_for_event(&events_b, "ft-failover", TIMEOUT);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names.first(),
        Some(&"ft-waiting"),
        "backup events: {names:?}"
    );
    let (_, failover) = events
        .iter()
        .find(|(e, _)| e == "ft-failover")
        .expect("an ft-failover event");
    assert_eq!(
        failover["epoch"]
            .as_str()
            .and_then(|e| e.parse::<u64>().ok()),
        backup_status["epoch"].as_u64(),
        "the event names the epoch the VM resumed from: {failover}"
    );
    assert_eq!(
        failover["takeover_ms"]
            .as_str()
            .and_then(|e| e.parse::<u64>().ok()),
        backup_status["last_failover_ms"].as_u64(),
        "{failover}"
    );
    // The FT counters sit next to the device counters.
    let counters = ch_remote(&sock_b, &["counters"], None);
    let counters: serde_json::Value =
        serde_json::from_slice(&counters.stdout).expect("counters JSON");
    assert_eq!(counters["ft"]["failovers"], 1, "{counters}");
    let info = ch_remote(&sock_b, &["info"], None);
    assert!(String::from_utf8_lossy(&info.stdout).contains("Running"));
    report(&format!(
        "ft: sync {sync:?}; primary status {protected}; after kill -9 the backup took over ({}) and answered 50 echo rounds within {first_answer:?}",
        backup_status["last_failover_ms"]
    ));
    let _ = Command::new(ch_remote_binary()).arg("--version").status();
    backup.kill();
}
