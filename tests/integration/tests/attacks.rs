//! Attacks as regression tests: a hostile peer that reaches a backup's `receive-ft` port or a
//! `receive-migration` listener names host files in the VM configuration it sends (an image to
//! overwrite, a console file to truncate). The receiving VMM opens only what its own operator
//! named: the peer is refused with a clear error, nothing on the host changes, and the VMM
//! runs on. These run without /dev/kvm (the refusal comes before any VM exists).
//!
//! By default a stranger does not get that far: every TCP listener between hosts is mutual TLS
//! (a plaintext peer, or one whose certificate comes from another CA, is turned away before
//! anything it sends is read; the listener goes on waiting for its real peer), and a listener
//! without TLS credentials is refused unless its operator opted out in so many words. The
//! host-file attacks run against such an opted-out plaintext listener: defence in depth.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use std::io::Write;

use ft::wire::Control;
use integration::{api_request, tls_dir, wait_for_api_socket, workspace_root, TempDir, Vmm};
use transport::Security;
use vmm::config::VmConfig;
use vmm::control::FtDiskMode;
use vmm::migration::protocol::{FrameReader, FrameType, Message, Sender};

const TIMEOUT: Duration = Duration::from_secs(30);
const VICTIM: &[u8] = b"precious host data\n";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A VM configuration whose host paths are the victims.
fn hostile_config(image: &Path, console: &Path) -> VmConfig {
    serde_json::from_value(serde_json::json!({
        "payload": {"kernel": image},
        "memory": {"size": 64u64 << 20},
        "serial": {"mode": "File", "file": console},
        "console": {"mode": "Off"},
        "disks": [{"path": image}],
    }))
    .expect("config")
}

fn victims(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let (image, console) = (dir.join("victim.img"), dir.join("victim.log"));
    std::fs::write(&image, VICTIM).expect("victim image");
    std::fs::write(&console, VICTIM).expect("victim console");
    (image, console)
}

fn assert_untouched(files: &[&Path]) {
    for file in files {
        assert_eq!(
            std::fs::read(file).expect("victim"),
            VICTIM,
            "{} was changed by a peer",
            file.display()
        );
    }
}

/// The first Error frame the VMM answers with (within the timeout).
fn error_from(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let mut reader = FrameReader::new();
    loop {
        let frame = match reader.read_frame(stream) {
            Ok(frame) => frame,
            Err(e) => return format!("(no Error frame: {e})"),
        };
        if frame.kind == FrameType::Error {
            return String::from_utf8_lossy(frame.payload).into_owned();
        }
        if let Ok(Message::Error { message }) = Message::parse(&frame) {
            return message.to_string();
        }
    }
}

fn vmm(dir: &TempDir, name: &str) -> (Vmm, std::path::PathBuf) {
    let socket = dir.join(&format!("{name}.sock"));
    let mut vmm = Vmm::builder(name)
        .args(["--api-socket", socket.to_str().expect("path"), "-v"])
        .spawn()
        .expect("start the VMM");
    wait_for_api_socket(&mut vmm, &socket, TIMEOUT);
    (vmm, socket)
}

fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect to 127.0.0.1:{port}: {e}"),
        }
    }
}

#[test]
fn a_fake_primary_cannot_make_a_backup_write_host_files() {
    let dir = TempDir::new("attack_ft").expect("temp dir");
    let (image, console) = victims(&dir);
    let (mut backup, socket) = vmm(&dir, "attack_ft_backup");
    let port = free_port();
    let body = format!(r#"{{"receiver_url": "tcp:127.0.0.1:{port}", "insecure_plaintext": true}}"#);
    let (status, answer) =
        api_request(&socket, "PUT", "vm.receive-ft", Some(&body), TIMEOUT).expect("receive-ft");
    assert_eq!(status, 204, "{answer}");

    // The fake primary: Hello naming the victims, Params announcing a witness of its choice.
    let stream = connect(port);
    let mut sender = Sender::new(stream.try_clone().expect("clone"));
    sender
        .send_hello(&hostile_config(&image, &console))
        .expect("hello");
    let params = Control::Params {
        pair_id: 1,
        epoch_ms: 10,
        heartbeat_timeout_ms: 1000,
        disk_mode: FtDiskMode::Shared,
        witness: Some("127.0.0.1:9".into()),
        fencing: None,
        disk_sizes: Vec::new(),
        lanes: 0,
        lane_token: 0,
    };
    sender
        .send_frame(FrameType::Control, &params.encode())
        .expect("params");
    let mut stream = stream;
    let error = error_from(&mut stream);
    assert!(
        error.contains("witness") || error.contains("disk"),
        "the backup's answer: {error}"
    );
    // A protocol-level retry with the witness dropped is refused for the image instead.
    drop(stream);
    assert_untouched(&[&image, &console]);
    let (status, _) = api_request(&socket, "GET", "vmm.ping", None, TIMEOUT).expect("ping");
    assert_eq!(status, 200, "the VMM runs on");
    assert!(backup.poll_exit().is_none(), "the VMM exited");
    let (_, ft) = api_request(&socket, "GET", "vm.ft-status", None, TIMEOUT).expect("status");
    assert!(ft.contains("failed"), "{ft}");
}

#[test]
fn a_fake_primary_without_a_witness_is_refused_for_the_image_it_names() {
    let dir = TempDir::new("attack_ft_disk").expect("temp dir");
    let (image, console) = victims(&dir);
    let (mut backup, socket) = vmm(&dir, "attack_ft_disk_backup");
    let port = free_port();
    let body = format!(r#"{{"receiver_url": "tcp:127.0.0.1:{port}", "insecure_plaintext": true}}"#);
    let (status, answer) =
        api_request(&socket, "PUT", "vm.receive-ft", Some(&body), TIMEOUT).expect("receive-ft");
    assert_eq!(status, 204, "{answer}");
    let mut stream = connect(port);
    let mut sender = Sender::new(stream.try_clone().expect("clone"));
    sender
        .send_hello(&hostile_config(&image, &console))
        .expect("hello");
    let params = Control::Params {
        pair_id: 1,
        epoch_ms: 10,
        heartbeat_timeout_ms: 1000,
        disk_mode: FtDiskMode::Shared,
        witness: None,
        fencing: None,
        disk_sizes: Vec::new(),
        lanes: 0,
        lane_token: 0,
    };
    sender
        .send_frame(FrameType::Control, &params.encode())
        .expect("params");
    let error = error_from(&mut stream);
    assert!(
        error.contains("disk") && error.contains("never opened"),
        "the backup's answer: {error}"
    );
    assert_untouched(&[&image, &console]);
    let (status, _) = api_request(&socket, "GET", "vmm.ping", None, TIMEOUT).expect("ping");
    assert_eq!(status, 200);
    assert!(backup.poll_exit().is_none(), "the VMM exited");
}

#[test]
fn a_fake_migration_source_cannot_make_the_destination_write_host_files() {
    let dir = TempDir::new("attack_migration").expect("temp dir");
    let (image, console) = victims(&dir);
    let (mut destination, socket) = vmm(&dir, "attack_migration_destination");
    let port = free_port();
    let body = format!(r#"{{"receiver_url": "tcp:127.0.0.1:{port}", "insecure_plaintext": true}}"#);
    // The request blocks until the receive ends (as Cloud Hypervisor's does).
    let request = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            api_request(&socket, "PUT", "vm.receive-migration", Some(&body), TIMEOUT)
        })
    };
    let mut stream = connect(port);
    let mut sender = Sender::new(stream.try_clone().expect("clone"));
    sender
        .send_hello(&hostile_config(&image, &console))
        .expect("hello");
    let error = error_from(&mut stream);
    assert!(
        error.contains("never opened"),
        "the destination's answer: {error}"
    );
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let (status, answer) = request
        .join()
        .expect("request thread")
        .expect("receive-migration answer");
    assert_eq!(status, 500, "{answer}");
    assert!(answer.contains("never opened"), "{answer}");
    assert_untouched(&[&image, &console]);
    let (status, _) = api_request(&socket, "GET", "vmm.ping", None, TIMEOUT).expect("ping");
    assert_eq!(status, 200);
    assert!(destination.poll_exit().is_none(), "the VMM exited");
}

/// Waits until the VMM's log holds each of `causes`.
fn wait_for_log(vmm: &Vmm, causes: &[&str]) {
    let deadline = Instant::now() + TIMEOUT;
    while !causes.iter().all(|c| vmm.stderr().contains(c)) {
        assert!(
            Instant::now() < deadline,
            "the log names each refusal and its cause ({causes:?}):\n{}",
            vmm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Credentials from a CA of the attacker's own (the same file layout, another trust root).
fn foreign_credentials(dir: &TempDir) -> std::path::PathBuf {
    let foreign = dir.join("foreign-tls");
    let out = std::process::Command::new(workspace_root().join("ci/make-tls-certs"))
        .arg(&foreign)
        .args(["127.0.0.1"])
        .output()
        .expect("ci/make-tls-certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It trusts our CA (so it gets as far as showing its certificate) but its own certificate
    // comes from its CA.
    std::fs::copy(tls_dir().join("ca-cert.pem"), foreign.join("ca-cert.pem")).expect("copy");
    foreign
}

/// Plays a stranger against a TLS listener on `port`: a plaintext peer sending a Hello that
/// names the victims, then a TLS peer with a certificate from another CA doing the same.
fn strangers_knock(port: u16, image: &Path, console: &Path, foreign: &Path) {
    let mut encoded = std::io::Cursor::new(Vec::new());
    Sender::new(&mut encoded)
        .send_hello(&hostile_config(image, console))
        .expect("hello");
    let hello = encoded.into_inner();
    let mut plain = connect(port);
    let _ = plain.write_all(&hello);
    plain.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("never opened"),
        "a plaintext peer's Hello was read"
    );

    let creds = Security::choose(Some(foreign), false, "attack").expect("foreign credentials");
    let deadline = Instant::now() + TIMEOUT;
    let addr = format!("127.0.0.1:{port}");
    let dialled = loop {
        match transport::dial(&addr, &creds, TIMEOUT) {
            Err(transport::DialError::Connect { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other,
        }
    };
    if let Ok(mut stream) = dialled {
        // TLS 1.3 lets a client finish before the listener checked its certificate; the
        // listener's refusal arrives as an alert on the first read.
        let _ = stream.write_all(&hello);
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        assert!(
            read.is_err() || answer.is_empty(),
            "a foreign peer got an answer"
        );
    }
}

#[test]
fn receive_ft_over_tcp_needs_tls_or_an_explicit_opt_out() {
    let dir = TempDir::new("attack_ft_default").expect("temp dir");
    let (mut backup, socket) = vmm(&dir, "attack_ft_default_backup");
    let port = free_port();
    let body = format!(r#"{{"receiver_url": "tcp:127.0.0.1:{port}"}}"#);
    let (status, answer) =
        api_request(&socket, "PUT", "vm.receive-ft", Some(&body), TIMEOUT).expect("receive-ft");
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains("needs mutual TLS") && answer.contains("insecure_plaintext"),
        "{answer}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens after the refusal"
    );
    let body = format!(
        r#"{{"receiver_url": "tcp:127.0.0.1:{port}", "tls_dir": "{}"}}"#,
        dir.join("no-such-dir").display()
    );
    let (status, answer) =
        api_request(&socket, "PUT", "vm.receive-ft", Some(&body), TIMEOUT).expect("receive-ft");
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("no-such-dir/ca-cert.pem"), "{answer}");
    // A fencing decider that cannot be asked is an error now, not a fence at the first fault.
    let closed = free_port();
    for (fencing, expected) in [
        (
            serde_json::json!({"witness": format!("127.0.0.1:{closed}")}),
            "the witness cannot be asked",
        ),
        (
            serde_json::json!({"fencing": format!("etcd://127.0.0.1:{closed}")}),
            "etcd cannot be asked",
        ),
        (
            serde_json::json!({"witness": "127.0.0.1:1", "fencing": "etcd://127.0.0.1:1"}),
            "not both",
        ),
    ] {
        let mut body = serde_json::json!({
            "receiver_url": format!("tcp:127.0.0.1:{port}"),
            "tls_dir": tls_dir(),
        });
        for (key, value) in fencing.as_object().expect("object") {
            body[key] = value.clone();
        }
        let (status, answer) = api_request(
            &socket,
            "PUT",
            "vm.receive-ft",
            Some(&body.to_string()),
            TIMEOUT,
        )
        .expect("receive-ft");
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains(expected), "{expected}: {answer}");
    }
    assert!(backup.poll_exit().is_none(), "the VMM exited");
}

#[test]
fn strangers_cannot_reach_a_tls_backup() {
    let dir = TempDir::new("attack_ft_tls").expect("temp dir");
    let (image, console) = victims(&dir);
    let foreign = foreign_credentials(&dir);
    let (mut backup, socket) = vmm(&dir, "attack_ft_tls_backup");
    let port = free_port();
    let body = serde_json::json!({
        "receiver_url": format!("tcp:127.0.0.1:{port}"),
        "tls_dir": tls_dir(),
    })
    .to_string();
    let (status, answer) =
        api_request(&socket, "PUT", "vm.receive-ft", Some(&body), TIMEOUT).expect("receive-ft");
    assert_eq!(status, 204, "{answer}");
    strangers_knock(port, &image, &console, &foreign);
    assert_untouched(&[&image, &console]);
    assert!(backup.poll_exit().is_none(), "the VMM exited");
    // Still waiting for its real primary: the strangers changed nothing.
    let (_, ft) = api_request(&socket, "GET", "vm.ft-status", None, TIMEOUT).expect("status");
    assert!(ft.contains("waiting_for_primary"), "{ft}");
    // Each refusal is logged with its cause (the alert may reach the peer before the log).
    wait_for_log(&backup, &["does not speak TLS", "does not chain to our CA"]);
}

#[test]
fn strangers_cannot_reach_a_tls_migration_destination() {
    let dir = TempDir::new("attack_migration_tls").expect("temp dir");
    let (image, console) = victims(&dir);
    let foreign = foreign_credentials(&dir);
    let (mut destination, socket) = vmm(&dir, "attack_migration_tls_destination");
    let port = free_port();
    let body = serde_json::json!({
        "receiver_url": format!("tcp:127.0.0.1:{port}"),
        "tls_dir": tls_dir(),
    })
    .to_string();
    // The request blocks while the receive waits; it is left waiting (the VMM is killed at
    // the end of the test).
    let _request = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            api_request(&socket, "PUT", "vm.receive-migration", Some(&body), TIMEOUT)
        })
    };
    strangers_knock(port, &image, &console, &foreign);
    assert_untouched(&[&image, &console]);
    assert!(destination.poll_exit().is_none(), "the VMM exited");
    let (status, info) = api_request(&socket, "GET", "vm.info", None, TIMEOUT).expect("info");
    assert!(
        status >= 400 || !info.contains("victim"),
        "a stranger's VM: {info}"
    );
    wait_for_log(
        &destination,
        &["does not speak TLS", "does not chain to our CA"],
    );
}
