//! Live migration between two VMM processes in two network namespaces acting as two hosts,
//! with the guest busy: a TCP connection from a client namespace survives the move, a guest
//! rewriting memory verifies every page afterwards, and a failed migration leaves the source
//! running.
//!
//! Network: the client namespace has a bridge (192.168.249.1/24); each host namespace has a
//! bridge joining its guest TAP to a veth into the client's bridge, and the hosts talk to
//! each other (the migration stream) over their own veth link, 10.77.0.1 <-> 10.77.0.2.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration::{
    api_request, api_vmm, ch_remote, ch_remote_binary, guest_vm_args, kvm_serial_guard, report,
    require_kvm, require_netns, test_guest, tls_dir, two_hosts, wait_for_api_socket, TempDir, Vmm,
};

const TIMEOUT: Duration = Duration::from_secs(90);
const GUEST_MAC: &str = "12:34:56:78:9a:bc";

/// Starts `ch-remote receive-migration` in the background (it returns when the VM arrived).
/// `extra`: what the destination's operator names for the VM (`--disk-path`, `--tap`).
/// Over TCP the channel is mutual TLS with the test CA's credentials.
fn receive_in_background(socket: &Path, url: &str, extra: &[&str]) -> std::process::Child {
    let security: Vec<&std::ffi::OsStr> = if url.starts_with("tcp:") {
        vec!["--tls-dir".as_ref(), tls_dir().as_os_str()]
    } else {
        Vec::new()
    };
    Command::new(ch_remote_binary())
        .arg("--api-socket")
        .arg(socket)
        .args(["receive-migration", url])
        .args(extra)
        .args(security)
        .spawn()
        .expect("start ch-remote receive-migration")
}

fn echo_exact(stream: &mut TcpStream, data: &[u8]) -> Result<(), String> {
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let owned = data.to_vec();
    let sender = std::thread::spawn(move || writer.write_all(&owned));
    let mut back = vec![0u8; data.len()];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("echo read: {e}"))?;
    sender
        .join()
        .map_err(|_| "sender panicked".to_string())?
        .map_err(|e| format!("echo write: {e}"))?;
    if back != data {
        return Err("echoed bytes differ".into());
    }
    Ok(())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn tcp_connection_survives_live_migration_between_two_hosts() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let hosts = two_hosts("m");
    let dir = TempDir::new("migration_tcp").expect("temp dir");
    let guest = test_guest().expect("guest");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).expect("image");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let kernel = guest.display().to_string();
    let net = format!("tap=tapvm,mac={GUEST_MAC}");
    let disk = format!("path={}", image.display());
    let args = guest_vm_args(
        &kernel,
        "workload=net net.ip=192.168.249.2/24",
        "size=256M",
        &net,
        &["--disk", &disk],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut source = api_vmm(TIMEOUT, "migration_source", &hosts.a, &sock_a, &args);
    source
        .wait_for("NET ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut destination = api_vmm(TIMEOUT, "migration_destination", &hosts.b, &sock_b, &[]);
    let image_path = image.display().to_string();
    let mut receiver = receive_in_background(
        &sock_b,
        "tcp:10.77.0.2:6000",
        &["--disk-path", &image_path, "--tap", "tapvm"],
    );

    // A connection from the client namespace, used before, during and after the move.
    let stream = hosts
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
    let mut conn = stream.try_clone().expect("clone");
    echo_exact(&mut conn, &pattern(1 << 20, 1)).expect("echo before the migration");

    let stop = Arc::new(AtomicBool::new(false));
    let chatter = {
        let stop = stop.clone();
        let mut conn = stream.try_clone().expect("clone");
        std::thread::spawn(move || -> Result<u32, String> {
            let mut rounds = 0u32;
            while !stop.load(Ordering::SeqCst) {
                echo_exact(&mut conn, &pattern(1000, rounds as u8))?;
                rounds += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(rounds)
        })
    };

    let started = Instant::now();
    let out = ch_remote(
        &sock_a,
        &[
            "send-migration",
            "destination_url=tcp:10.77.0.2:6000,downtime_ms=100",
        ],
        None,
    );
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        source.diagnose("send-migration failed")
    );
    let status = receiver.wait().expect("receive-migration");
    assert!(
        status.success(),
        "{}",
        destination.diagnose("receive-migration failed")
    );

    // The connection keeps working through the new host.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let rounds = chatter
        .join()
        .expect("chatter thread")
        .unwrap_or_else(|e| panic!("{e}\n{}", destination.diagnose("echo during the migration")));
    echo_exact(&mut conn, &pattern(4 << 20, 7))
        .unwrap_or_else(|e| panic!("{e}\n{}", destination.diagnose("echo after the migration")));
    let status = source
        .wait_exit(TIMEOUT)
        .expect("the source exits after the move");
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        source.diagnose("source exit code")
    );
    let info = ch_remote(&sock_b, &["info"], None);
    assert!(String::from_utf8_lossy(&info.stdout).contains("Running"));
    report(&format!(
        "migration: TCP connection survived; send-migration took {took:?}; {rounds} echo rounds during the move"
    ));
    destination.kill();
}

#[test]
fn busy_guest_memory_is_intact_after_migration_over_a_unix_socket() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("migration_dirty").expect("temp dir");
    let guest = test_guest().expect("guest");
    let kernel = guest.display().to_string();
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut source = Vmm::builder("migration_dirty_source")
        .args(["--api-socket", sock_a.to_str().expect("path")])
        .args([
            "--kernel",
            &kernel,
            "--cmdline",
            // Long enough that pre-copy ends before the workload does even under load (a debug
            // build on two busy cores took up to 14 s); it then finishes on the destination.
            "workload=dirty dirty.mib=64 dirty.rate=20 dirty.ms=30000",
            "--cpus",
            "boot=2",
            "--memory",
            "size=256M",
            "--serial",
            "tty",
            "--console",
            "off",
        ])
        .spawn()
        .expect("source");
    wait_for_api_socket(&mut source, &sock_a, TIMEOUT);
    source
        .wait_for("DIRTY progress", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut destination = Vmm::builder("migration_dirty_destination")
        .args(["--api-socket", sock_b.to_str().expect("path")])
        .spawn()
        .expect("destination");
    wait_for_api_socket(&mut destination, &sock_b, TIMEOUT);
    let link = dir.join("migration.sock");
    let url = format!("unix:{}", link.display());
    let mut receiver = receive_in_background(&sock_b, &url, &[]);
    let deadline = Instant::now() + TIMEOUT;
    while !link.exists() {
        assert!(Instant::now() < deadline, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let out = ch_remote(&sock_a, &["send-migration", &url], None);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        source.diagnose("send-migration")
    );
    assert!(receiver.wait().expect("receiver").success());
    // A guest that finished on the source has nothing left to print on the destination.
    assert!(
        !source.console().contains("DIRTY result"),
        "the workload finished on the source before the migration (send-migration took {took:?})"
    );
    let result = destination
        .wait_for("DIRTY result", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(result.line.contains("verify=ok"), "{}", result.line);
    assert!(
        !source.console().contains("DIRTY result"),
        "the workload must finish on the destination"
    );
    report(&format!(
        "migration: destination finished the workload (send-migration took {took:?}): {}",
        result.line.trim()
    ));
}

#[test]
fn failed_migration_leaves_the_source_running() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("migration_fail").expect("temp dir");
    let guest = test_guest().expect("guest");
    let kernel = guest.display().to_string();
    let sock = dir.join("a.sock");
    let mut source = Vmm::builder("migration_fail_source")
        .args(["--api-socket", sock.to_str().expect("path")])
        .args([
            "--kernel",
            &kernel,
            "--cmdline",
            "workload=dirty dirty.mib=16 dirty.rate=20 dirty.ms=0",
            "--memory",
            "size=128M",
            "--serial",
            "tty",
            "--console",
            "off",
        ])
        .spawn()
        .expect("source");
    wait_for_api_socket(&mut source, &sock, TIMEOUT);
    source
        .wait_for("DIRTY progress", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // Nobody listens there.
    let nowhere = format!("unix:{}", dir.join("nobody.sock").display());
    let out = ch_remote(&sock, &["send-migration", &nowhere], None);
    assert!(!out.status.success(), "migration to nowhere succeeded");
    // Nothing was sent: no transfer to report.
    let progress = ch_remote(&sock, &["progress"], None);
    assert!(!progress.status.success());
    assert!(
        String::from_utf8_lossy(&progress.stderr).contains("no enable-ft or send-migration"),
        "{}",
        String::from_utf8_lossy(&progress.stderr)
    );
    // A receiver that hangs up mid-stream.
    let link = dir.join("hangup.sock");
    let listener = std::os::unix::net::UnixListener::bind(&link).expect("bind");
    let hangup = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = vec![0u8; 1 << 20];
            let _ = s.read(&mut buf);
        }
    });
    let out = ch_remote(
        &sock,
        &["send-migration", &format!("unix:{}", link.display())],
        None,
    );
    assert!(
        !out.status.success(),
        "migration to a vanished peer succeeded"
    );
    let _ = hangup.join();
    // The operator sees how far it got and why it stopped.
    let progress = ch_remote(&sock, &["progress"], None);
    assert!(progress.status.success());
    let report: serde_json::Value = serde_json::from_slice(&progress.stdout).expect("JSON");
    assert_eq!(report["operation"], "send-migration", "{report}");
    assert_eq!(report["phase"], "failed", "{report}");
    assert!(
        report["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{report}"
    );
    let info = ch_remote(&sock, &["info"], None);
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    assert!(
        info.contains("Running"),
        "source not running after failures: {info}"
    );
    // And the guest still makes progress.
    let before = source.console().matches("DIRTY progress").count();
    let deadline = Instant::now() + TIMEOUT;
    while source.console().matches("DIRTY progress").count() <= before {
        assert!(
            Instant::now() < deadline,
            "{}",
            source.diagnose("guest stopped after a failed migration")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long the destination waits for a complete Hello after accepting a source.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How fast the control loop must answer while a migration is being received.
const API_LIMIT: Duration = Duration::from_secs(1);

/// Waits for a background `ch-remote` for at most `limit`; kills it when it takes longer.
fn wait_child(child: &mut std::process::Child, limit: Duration) -> Result<bool, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status.success());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn child_stderr(child: &mut std::process::Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    text
}

/// Half a Hello: a frame header announcing 256 payload bytes, then only 100 of them.
fn half_hello() -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(b"TMIG");
    frame.extend_from_slice(&[1, 0, 0, 0]); // Hello, no flags, reserved
    frame.extend_from_slice(&256u32.to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes()); // sequence number
    frame.extend_from_slice(&[b'{'; 100]);
    frame
}

/// A migration source that connects and then stays silent (or stops in the middle of its
/// Hello) must not freeze the destination: its API answers meanwhile, a second receive is
/// refused, the receive fails after the handshake timeout with a clear error, and the VMM can
/// then receive a real migration.
#[test]
fn silent_migration_source_does_not_block_the_destination() {
    require_kvm!();
    let dir = TempDir::new("migration_silent").expect("temp dir");
    let sock_b = dir.join("b.sock");
    let mut destination = Vmm::builder("migration_silent_destination")
        .args(["--api-socket", sock_b.to_str().expect("path")])
        .spawn()
        .expect("destination");
    wait_for_api_socket(&mut destination, &sock_b, TIMEOUT);

    for (round, sends) in [("silent", Vec::new()), ("half-hello", half_hello())] {
        let link = dir.join(&format!("{round}.sock"));
        let url = format!("unix:{}", link.display());
        let mut receiver = Command::new(ch_remote_binary())
            .arg("--api-socket")
            .arg(&sock_b)
            .args(["receive-migration", &url])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ch-remote receive-migration");
        let deadline = Instant::now() + TIMEOUT;
        while !link.exists() {
            assert!(
                Instant::now() < deadline,
                "{round}: the receiver never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut peer = UnixStream::connect(&link).expect("connect as the source");
        peer.write_all(&sends).expect("send");
        let connected = Instant::now();
        std::thread::sleep(Duration::from_millis(200));

        // The control loop answers while the receive waits for the peer.
        for endpoint in ["vmm.ping", "vm.info"] {
            let answer = api_request(&sock_b, "GET", endpoint, None, API_LIMIT);
            let (status, body) = answer.unwrap_or_else(|e| {
                panic!(
                    "{round}: {e}\n{}",
                    destination.diagnose("API while receiving")
                )
            });
            if endpoint == "vmm.ping" {
                assert_eq!(status, 200, "{round}: ping: {body}");
            } else {
                // No VM exists before the source's Hello.
                assert!(
                    !body.contains("Running"),
                    "{round}: vm.info: {status} {body}"
                );
            }
        }
        // A second receive while this one is in progress is refused at once.
        let other = format!(
            "{{\"receiver_url\":\"unix:{}\"}}",
            dir.join("other.sock").display()
        );
        let (status, body) = api_request(
            &sock_b,
            "PUT",
            "vm.receive-migration",
            Some(&other),
            API_LIMIT,
        )
        .unwrap_or_else(|e| panic!("{round}: second receive-migration: {e}"));
        assert!(
            status >= 400 && body.contains("already being received"),
            "{round}: second receive-migration: {status} {body}"
        );

        // The receive gives up after the handshake timeout, with a clear error.
        let ok = wait_child(&mut receiver, HANDSHAKE_TIMEOUT + Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{round}: receive-migration {e}"));
        let took = connected.elapsed();
        let stderr = child_stderr(&mut receiver);
        assert!(!ok, "{round}: the receive succeeded");
        assert!(
            stderr.contains("handshake timeout"),
            "{round}: unclear error: {stderr}\n{}",
            destination.diagnose("receive error")
        );
        assert!(
            took >= HANDSHAKE_TIMEOUT - Duration::from_millis(500),
            "{round}: gave up after {took:?}"
        );
        assert!(destination.poll_exit().is_none(), "{round}: the VMM exited");
        let (status, _) = api_request(&sock_b, "GET", "vmm.ping", None, API_LIMIT)
            .unwrap_or_else(|e| panic!("{round}: ping after the failure: {e}"));
        assert_eq!(status, 200);
        drop(peer);
    }

    // A real source then migrates into the same VMM.
    let _boot = kvm_serial_guard();
    let guest = test_guest().expect("guest");
    let kernel = guest.display().to_string();
    let sock_a = dir.join("a.sock");
    let mut source = Vmm::builder("migration_silent_source")
        .args(["--api-socket", sock_a.to_str().expect("path")])
        .args([
            "--kernel",
            &kernel,
            "--cmdline",
            "workload=dirty dirty.mib=16 dirty.rate=20 dirty.ms=0",
            "--memory",
            "size=128M",
            "--serial",
            "tty",
            "--console",
            "off",
        ])
        .spawn()
        .expect("source");
    wait_for_api_socket(&mut source, &sock_a, TIMEOUT);
    source
        .wait_for("DIRTY progress", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let link = dir.join("real.sock");
    let url = format!("unix:{}", link.display());
    let mut receiver = receive_in_background(&sock_b, &url, &[]);
    let deadline = Instant::now() + TIMEOUT;
    while !link.exists() {
        assert!(Instant::now() < deadline, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = ch_remote(&sock_a, &["send-migration", &url], None);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        source.diagnose("send-migration after the failed receives")
    );
    let ok = wait_child(&mut receiver, TIMEOUT).expect("receive-migration");
    assert!(ok, "{}", destination.diagnose("receive-migration"));
    let (status, body) = api_request(&sock_b, "GET", "vm.info", None, API_LIMIT).expect("vm.info");
    assert!(
        status == 200 && body.contains("Running"),
        "vm.info after the migration: {status} {body}"
    );
    let before = destination.console().matches("DIRTY progress").count();
    let deadline = Instant::now() + TIMEOUT;
    while destination.console().matches("DIRTY progress").count() <= before {
        assert!(
            Instant::now() < deadline,
            "{}",
            destination.diagnose("the migrated guest makes no progress")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    report("migration: a silent source and half a Hello did not block the destination's API");
}
