//! Fencing on etcd end to end: a primary VMM on host A protected by a backup VMM on host B
//! (network namespaces), both fencing on an etcd cluster in the client's namespace over mutual
//! TLS, a client talking to the guest over TCP.
//!
//! - Three etcd members; the primary is killed with SIGKILL and, at the same moment, one etcd
//!   member too: the backup wins the pair's key once the primary's lease expired and the
//!   client's connection goes on against it.
//! - One etcd member, frozen (SIGSTOP): the primary cannot prove its lease alive, holds its
//!   output and fences itself before the lease can expire; once etcd answers again the backup
//!   wins the key and takes over. Exactly one copy runs at the end.

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use integration::etcd::{etcd_or_skip, EtcdCluster};
use integration::ft::{echo_round, ft_status, wait_status};
use integration::{
    api_vmm, ch_remote, function_name, guest_vm_args, kvm_serial_guard, report, require_kvm,
    require_netns, test_guest, two_hosts, TempDir, TwoHosts, Vmm, CLIENT_NET, HOST_B,
};

const TIMEOUT: Duration = Duration::from_secs(90);
const GUEST_MAC: &str = "12:34:56:78:9a:bc";

fn ok(out: std::process::Output, what: &str, vmms: &[&Vmm]) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        vmms.iter()
            .map(|v| format!("\n{}", v.diagnose(what)))
            .collect::<String>()
    );
}

struct Pair {
    primary: Vmm,
    backup: Vmm,
    sock_a: std::path::PathBuf,
    sock_b: std::path::PathBuf,
    stream: TcpStream,
}

/// The guest on host A, protected by host B, both fencing on `spec`; 20 echo rounds done.
fn protected_pair(hosts: &TwoHosts, dir: &TempDir, spec: &str) -> Pair {
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
    let mut primary = api_vmm(TIMEOUT, "etcd_primary", &hosts.a, &sock_a, &args);
    primary
        .wait_for("NET ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let backup = api_vmm(TIMEOUT, "etcd_backup", &hosts.b, &sock_b, &["-v"]);
    let url = format!("tcp:{HOST_B}:7100");
    let out = ch_remote(
        &sock_b,
        &["receive-ft", &url, "--tap", "tapvm", "--fencing", spec],
        None,
    );
    ok(out, "receive-ft", &[&backup]);
    let peer = format!("{HOST_B}:7100");
    let out = ch_remote(
        &sock_a,
        &[
            "enable-ft",
            "--peer",
            &peer,
            "--heartbeat-timeout-ms",
            "500",
            "--fencing",
            spec,
        ],
        None,
    );
    ok(out, "enable-ft", &[&primary, &backup]);
    let status = wait_status(&sock_a, "health", &["protected"], TIMEOUT).expect("protected");
    let fencing = status["fencing"].as_str().unwrap_or_default().to_string();
    assert!(fencing.starts_with("etcd "), "{status}");
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
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    for round in 0..20 {
        echo_round(&mut stream, round).unwrap_or_else(|e| panic!("{e}"));
    }
    Pair {
        primary,
        backup,
        sock_a,
        sock_b,
        stream,
    }
}

fn running(socket: &Path) -> bool {
    let info = ch_remote(socket, &["info"], None);
    String::from_utf8_lossy(&info.stdout).contains("Running")
}

#[test]
fn a_pair_fenced_on_etcd_fails_over_once_while_an_etcd_member_dies() {
    require_kvm!();
    require_netns!();
    if !etcd_or_skip(function_name!()) {
        return;
    }
    let _boot = kvm_serial_guard();
    let hosts = two_hosts("e3");
    let dir = TempDir::new("ft_etcd3").expect("temp dir");
    let mut cluster =
        EtcdCluster::start(&hosts.client, CLIENT_NET, &dir.join("etcd"), 3).expect("etcd");
    let mut pair = protected_pair(&hosts, &dir, &cluster.spec());

    pair.primary.kill();
    cluster.members[0].kill();
    let killed = Instant::now();
    let status = wait_status(&pair.sock_b, "health", &["took_over"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", pair.backup.diagnose("takeover")));
    let took_over = killed.elapsed();
    for round in 20..60 {
        echo_round(&mut pair.stream, round)
            .unwrap_or_else(|e| panic!("{e}\n{}", pair.backup.diagnose("echo after failover")));
    }
    assert!(running(&pair.sock_b), "the backup runs the VM");
    report(&format!(
        "ft on etcd (3 members, one killed with the primary): the backup took over {took_over:?} \
         after the kill (its own figure {} ms; the lease TTL is part of it) and the TCP \
         connection went on",
        status["last_failover_ms"]
    ));
}

#[test]
fn a_primary_cut_off_from_etcd_fences_itself_and_the_backup_takes_over_once() {
    require_kvm!();
    require_netns!();
    if !etcd_or_skip(function_name!()) {
        return;
    }
    let _boot = kvm_serial_guard();
    let hosts = two_hosts("e1");
    let dir = TempDir::new("ft_etcd1").expect("temp dir");
    let cluster =
        EtcdCluster::start(&hosts.client, CLIENT_NET, &dir.join("etcd"), 1).expect("etcd");
    let mut pair = protected_pair(&hosts, &dir, &cluster.spec());

    cluster.signal_all(libc::SIGSTOP);
    let frozen = Instant::now();
    let fenced = wait_status(&pair.sock_a, "health", &["fenced"], Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", pair.primary.diagnose("fence")));
    let fenced_after = frozen.elapsed();
    assert!(!running(&pair.sock_a), "a fenced primary stops its VM");
    // The backup cannot win while etcd is silent; it may once etcd answers and the lease
    // has expired there.
    assert_ne!(ft_status(&pair.sock_b)["health"], "took_over");
    cluster.signal_all(libc::SIGCONT);
    let status = wait_status(&pair.sock_b, "health", &["took_over"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", pair.backup.diagnose("takeover")));
    for round in 20..60 {
        echo_round(&mut pair.stream, round)
            .unwrap_or_else(|e| panic!("{e}\n{}", pair.backup.diagnose("echo after failover")));
    }
    assert!(running(&pair.sock_b), "the backup runs the VM");
    assert!(!running(&pair.sock_a), "exactly one copy runs");
    report(&format!(
        "ft on etcd (etcd frozen): the primary fenced itself {fenced_after:?} after etcd went \
         silent ({}); the backup took over once etcd answered ({} ms)",
        fenced["last_error"], status["last_failover_ms"]
    ));
}
