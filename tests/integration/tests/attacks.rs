//! Attacks as regression tests: a hostile peer that reaches a backup's `receive-ft` port or a
//! `receive-migration` listener names host files in the VM configuration it sends (an image to
//! overwrite, a console file to truncate). The receiving VMM opens only what its own operator
//! named: the peer is refused with a clear error, nothing on the host changes, and the VMM
//! runs on. These run without /dev/kvm (the refusal comes before any VM exists).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ft::wire::Control;
use integration::{api_request, wait_for_api_socket, TempDir, Vmm};
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
    let body = format!(r#"{{"receiver_url": "tcp:127.0.0.1:{port}"}}"#);
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
        disk_sizes: Vec::new(),
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
    let body = format!(r#"{{"receiver_url": "tcp:127.0.0.1:{port}"}}"#);
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
        disk_sizes: Vec::new(),
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
    let body = format!(r#"{{"receiver_url": "tcp:127.0.0.1:{port}"}}"#);
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
