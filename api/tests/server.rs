//! The server over real Unix sockets with a fake control loop: endpoints, keep-alive,
//! pipelining, limits, timeouts, concurrency, descriptor passing and listener set-up.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::client::{self, read_response};
use api::ServerOptions;
use common::{fake_control_loop, kernel_config, socket_path, start};

fn connect(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn read_all(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn lifecycle_statuses_and_bodies() {
    let (path, _fake) = start("lifecycle");
    let call = |m: &str, e: &str, b: Option<&str>| client::request(&path, m, e, b).unwrap();

    let ping = call("GET", "vmm.ping", None);
    assert_eq!(ping.status, 200);
    let v: serde_json::Value = serde_json::from_str(&ping.body).unwrap();
    assert_eq!(v["version"], "0.0.0");

    let r = call("GET", "vm.info", None);
    assert_eq!(r.status, 404);
    assert_eq!(r.error_messages(), vec!["no VM has been created"]);

    assert_eq!(call("PUT", "vm.create", Some("{nope")).status, 400);
    assert_eq!(call("PUT", "vm.create", Some(&kernel_config())).status, 204);
    let r = call("PUT", "vm.create", Some(&kernel_config()));
    assert_eq!(r.status, 400);
    assert_eq!(r.error_messages(), vec!["a VM has already been created"]);

    let r = call("PUT", "vm.pause", None);
    assert_eq!(r.status, 405);
    assert_eq!(
        r.error_messages(),
        vec!["cannot pause a VM in state Created"]
    );

    for e in [
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.reboot",
        "vm.power-button",
    ] {
        let r = call("PUT", e, None);
        assert_eq!((r.status, r.body.as_str()), (204, ""), "{e}");
    }
    let info = call("GET", "vm.info", None);
    assert_eq!(info.status, 200);
    let v: serde_json::Value = serde_json::from_str(&info.body).unwrap();
    assert_eq!(v["state"], "Running");
    assert_eq!(v["config"]["payload"]["kernel"], "/k");
    assert_eq!(call("GET", "vm.counters", None).status, 200);
    assert_eq!(call("PUT", "vm.shutdown", None).status, 204);
    assert_eq!(call("PUT", "vm.delete", None).status, 204);
    assert_eq!(call("PUT", "vmm.shutdown", None).status, 204);

    let r = call("PUT", "vmm.ping", None);
    assert_eq!(r.status, 405);
    assert_eq!(call("GET", "vm.nothing", None).status, 404);
}

#[test]
fn snapshot_restore_and_migration_endpoints() {
    let (path, _fake) = start("migration");
    let call = |e: &str, b: &str| client::request(&path, "PUT", e, Some(b)).unwrap();

    let r = call("vm.snapshot", r#"{"destination_url": "file:///tmp/s"}"#);
    assert_eq!(r.status, 404);
    let r = call(
        "vm.restore",
        r#"{"source_url": "file:///tmp/s", "bogus": 1}"#,
    );
    assert_eq!(r.status, 400);
    assert!(
        r.error_messages()[0].contains("unknown field `bogus`"),
        "{r:?}"
    );
    let r = call(
        "vm.restore",
        r#"{"source_url": "file:///tmp/s", "prefault": true}"#,
    );
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    let r = call(
        "vm.receive-migration",
        r#"{"receiver_url": "tcp:0.0.0.0:6000"}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.error_messages(), vec!["a VM has already been created"]);
    assert_eq!(
        call("vm.snapshot", r#"{"destination_url": "file:///tmp/s"}"#).status,
        204
    );
    let r = call("vm.send-migration", r#"{"destination_url": "tcp:h:6000"}"#);
    assert_eq!(r.status, 405);
    assert_eq!(call("vm.resume", "").status, 204);
    let r = call(
        "vm.send-migration",
        r#"{"destination_url": "tcp:h:6000", "downtime_ms": 100}"#,
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        call("vm.receive-migration", r#"{"receiver_url": "unix:/tmp/m"}"#).status,
        204
    );
}

/// A control loop that takes `delay` to answer anything (a migration).
struct Slow {
    delay: Duration,
    calls: AtomicUsize,
}

impl api::Backend for Slow {
    fn call(
        &self,
        _: vmm::control::VmmRequest,
    ) -> Result<vmm::control::VmmResult, vmm::control::SendError> {
        std::thread::sleep(self.delay);
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Ok(vmm::control::VmmResponse::Empty))
    }
}

#[test]
fn long_running_calls_outlive_the_socket_timeouts() {
    // The read and write timeouts bound a client that stalls while sending a request or
    // reading the answer, not the time the control loop takes: a migration may take minutes.
    let path = socket_path("slow");
    let listener = api::bind(&path).unwrap();
    let slow = Arc::new(Slow {
        delay: Duration::from_millis(800),
        calls: AtomicUsize::new(0),
    });
    let options = ServerOptions {
        read_timeout: Duration::from_millis(100),
        write_timeout: Duration::from_millis(100),
        ..ServerOptions::default()
    };
    api::spawn_server(listener, slow.clone(), options).unwrap();
    let started = Instant::now();
    let mut s = connect(&path);
    let r = client::request_on(
        &mut s,
        "PUT",
        "vm.send-migration",
        Some(r#"{"destination_url": "tcp:h:6000"}"#),
        false,
    )
    .unwrap();
    assert_eq!(r.status, 204);
    assert!(started.elapsed() >= Duration::from_millis(800));
    // The connection is still usable afterwards (keep-alive), and the fault-tolerance calls
    // (`vm.enable-ft` waits for the initial synchronisation) are served the same way.
    for (endpoint, body) in [
        ("vm.enable-ft", r#"{"peer": "b:7000"}"#),
        ("vm.receive-ft", r#"{"receiver_url": "tcp:0.0.0.0:7000"}"#),
    ] {
        let r = client::request_on(&mut s, "PUT", endpoint, Some(body), false).unwrap();
        assert_eq!(r.status, 204, "{endpoint}");
    }
    let r = client::request_on(
        &mut s,
        "PUT",
        "vm.receive-migration",
        Some(r#"{"receiver_url": "tcp:0.0.0.0:6000"}"#),
        true,
    )
    .unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(slow.calls.load(Ordering::SeqCst), 4);
    assert!(started.elapsed() >= Duration::from_millis(4 * 800));
}

#[test]
fn fault_tolerance_endpoints() {
    let (path, _fake) = start("ft");
    let call = |m: &str, e: &str, b: Option<&str>| client::request(&path, m, e, b).unwrap();
    let status = || {
        let r = call("GET", "vm.ft-status", None);
        assert_eq!(r.status, 200, "{r:?}");
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()
    };

    // Nothing protected: a status all the same, with the optional fields null.
    let v = status();
    assert_eq!((&v["role"], &v["health"]), (&"none".into(), &"off".into()));
    assert!(v["peer"].is_null() && v["disk_mode"].is_null() && v["last_error"].is_null());

    let r = call("PUT", "vm.enable-ft", Some(r#"{"peer": "b:7000"}"#));
    assert_eq!(r.status, 404);
    assert_eq!(r.error_messages(), vec!["no VM has been created"]);
    let r = call("PUT", "vm.enable-ft", Some(r#"{"peer": "b:7000", "x": 1}"#));
    assert_eq!(r.status, 400);
    assert!(r.error_messages()[0].contains("unknown field `x`"), "{r:?}");
    let r = call("PUT", "vm.enable-ft", None);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.error_messages(),
        vec!["vm.enable-ft needs an EnableFtData JSON request body"]
    );
    assert_eq!(call("PUT", "vm.disable-ft", None).status, 404);
    let r = call("GET", "vm.enable-ft", None);
    assert_eq!(r.status, 405);

    assert_eq!(call("PUT", "vm.create", Some(&kernel_config())).status, 204);
    let r = call("PUT", "vm.enable-ft", Some(r#"{"peer": "b:7000"}"#));
    assert_eq!(r.status, 405);
    assert_eq!(
        r.error_messages(),
        vec!["cannot enable fault tolerance for a VM in state Created"]
    );
    assert_eq!(call("PUT", "vm.boot", None).status, 204);
    let r = call(
        "PUT",
        "vm.enable-ft",
        Some(r#"{"peer": "b:7000", "epoch_ms": 0}"#),
    );
    assert_eq!(r.status, 400);
    let r = call(
        "PUT",
        "vm.enable-ft",
        Some(r#"{"peer": "b:7000", "epoch_ms": 25, "disk_mode": "shared"}"#),
    );
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    let v = status();
    assert_eq!(v["role"], "primary");
    assert_eq!(v["health"], "protected");
    assert_eq!(v["peer"], "b:7000");
    assert_eq!(v["disk_mode"], "shared");
    assert_eq!(v["epoch_ms"], 25);
    let r = call(
        "PUT",
        "vm.receive-ft",
        Some(r#"{"receiver_url": "tcp:0.0.0.0:7000"}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!((call("PUT", "vm.disable-ft", None).status), 204);
    assert_eq!(status()["role"], "none");

    // A fresh VMM becomes a backup.
    let (path, _fake) = start("ft-backup");
    let r = client::request(
        &path,
        "PUT",
        "vm.receive-ft",
        Some(r#"{"receiver_url": "tcp:0.0.0.0:7000", "disk_paths": ["/b/d0"], "witness": "w:1"}"#),
    )
    .unwrap();
    assert_eq!(r.status, 204);
    let r = client::request(&path, "GET", "vm.ft-status", None).unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["role"], "backup");
    assert_eq!(v["health"], "waiting_for_primary");
    assert_eq!(v["fencing"], "witness w:1");
}

#[test]
fn raw_headers_of_responses() {
    let (path, _fake) = start("headers");
    let mut s = connect(&path);
    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let text = read_all(&mut s);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("Content-Type: application/json\r\n"),
        "{text}"
    );
    assert!(text.contains("Content-Length: "), "{text}");

    let mut s = connect(&path);
    s.write_all(b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let text = read_all(&mut s);
    assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
    assert!(!text.contains("Content-Length"), "{text}");
    assert!(!text.contains("Content-Type"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "{text}");

    let mut s = connect(&path);
    s.write_all(b"DELETE /api/v1/vm.boot HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let text = read_all(&mut s);
    assert!(text.starts_with("HTTP/1.1 405 "), "{text}");
    assert!(text.contains("Allow: PUT\r\n"), "{text}");
}

#[test]
fn keep_alive_and_pipelining() {
    let (path, fake) = start("pipeline");
    let mut s = connect(&path);
    for _ in 0..5 {
        let r = client::request_on(&mut s, "GET", "vmm.ping", None, false).unwrap();
        assert_eq!(r.status, 200);
    }
    // Three requests in one write, the middle one with a body; answers come in order.
    let body = kernel_config();
    let batch = format!(
        "GET /api/v1/vm.info HTTP/1.1\r\n\r\nPUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET /api/v1/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(batch.as_bytes()).unwrap();
    // All three answers are waiting before the first is read: reading one must not take
    // (and lose) the next.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(read_response(&mut s).unwrap().status, 404);
    assert_eq!(read_response(&mut s).unwrap().status, 204);
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    // Connection: close was honoured.
    assert_eq!(read_all(&mut s), "");
    assert_eq!(fake.answered.load(Ordering::SeqCst), 8);
}

#[test]
fn request_split_into_tiny_writes() {
    let (path, _fake) = start("split");
    let mut s = connect(&path);
    let body = kernel_config();
    let raw = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for b in raw.as_bytes() {
        s.write_all(&[*b]).unwrap();
    }
    assert_eq!(read_response(&mut s).unwrap().status, 204);
}

#[test]
fn malformed_requests_get_an_error_and_a_close() {
    let (path, fake) = start("malformed");
    let big_head = format!("GET /x HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"garbage garbage\r\n\r\n".to_vec(), 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), 400),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            411,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n".to_vec(),
            413,
        ),
        (big_head.into_bytes(), 431),
    ];
    for (raw, status) in cases {
        let mut s = connect(&path);
        // The server may close before reading everything; that is fine.
        let _ = s.write_all(&raw);
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&raw));
        assert!(!r.error_messages().is_empty());
        assert_eq!(read_all(&mut s), "", "connection must be closed");
    }
    assert_eq!(fake.answered.load(Ordering::SeqCst), 0);
    // The server is still fine.
    assert_eq!(
        client::request(&path, "GET", "vmm.ping", None)
            .unwrap()
            .status,
        200
    );
}

#[test]
fn body_of_exactly_one_mib_is_read() {
    let (path, _fake) = start("onemib");
    let mut s = connect(&path);
    let body = format!("{{\"x\": \"{}\"}}", "a".repeat(1024 * 1024 - 9));
    assert_eq!(body.len(), 1024 * 1024);
    let r = client::request_on(&mut s, "PUT", "vm.create", Some(&body), false).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.error_messages()[0].contains("unknown field `x`"), "{r:?}");
    // Framing survived: the connection is still usable.
    let r = client::request_on(&mut s, "GET", "vmm.ping", None, true).unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn expect_100_continue() {
    let (path, _fake) = start("continue");
    let mut s = connect(&path);
    let body = kernel_config();
    s.write_all(
        format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 204);
}

#[test]
fn stalled_clients_do_not_block_others() {
    let (path, _fake) = start("stall");
    // One client connects and says nothing; another sends half a head; a third half a body.
    let _silent = connect(&path);
    let mut half_head = connect(&path);
    half_head.write_all(b"GET /api/v1/vmm.pi").unwrap();
    let mut half_body = connect(&path);
    half_body
        .write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"cp")
        .unwrap();
    let started = Instant::now();
    for _ in 0..10 {
        let r = client::request(&path, "GET", "vmm.ping", None).unwrap();
        assert_eq!(r.status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn read_timeout_ends_stalled_connections() {
    let path = socket_path("timeout");
    let listener = api::bind(&path).unwrap();
    let fake = fake_control_loop();
    let options = ServerOptions {
        read_timeout: Duration::from_millis(200),
        idle_timeout: Some(Duration::from_millis(200)),
        ..ServerOptions::default()
    };
    api::spawn_server(listener, Arc::new(fake.sender.clone()), options).unwrap();

    // Idle, with an idle bound set: closed without a word.
    let mut idle = connect(&path);
    let started = Instant::now();
    assert_eq!(read_all(&mut idle), "");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Mid-request: 408, then closed.
    let mut partial = connect(&path);
    partial
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n")
        .unwrap();
    let r = read_response(&mut partial).unwrap();
    assert_eq!(r.status, 408);
    assert_eq!(read_all(&mut partial), "");
}

#[test]
fn idle_keep_alive_connections_stay_open_by_default() {
    // Cloud Hypervisor never closes an idle connection; Kata's client keeps one for the
    // sandbox's life and a PUT racing a server-side close would fail. Only a request that
    // stalls half-way is cut off.
    let path = socket_path("idle_open");
    let listener = api::bind(&path).unwrap();
    let fake = fake_control_loop();
    let options = ServerOptions {
        read_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    };
    api::spawn_server(listener, Arc::new(fake.sender.clone()), options).unwrap();
    let mut s = connect(&path);
    let r = client::request_on(&mut s, "GET", "vmm.ping", None, false).unwrap();
    assert_eq!(r.status, 200);
    // Five times the in-request timeout, idle.
    std::thread::sleep(Duration::from_millis(1000));
    let r = client::request_on(&mut s, "GET", "vmm.ping", None, false)
        .expect("the idle keep-alive connection was closed");
    assert_eq!(r.status, 200);
}

#[test]
fn connection_cap_answers_503() {
    let path = socket_path("cap");
    let listener = api::bind(&path).unwrap();
    let fake = fake_control_loop();
    let options = ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    };
    api::spawn_server(listener, Arc::new(fake.sender.clone()), options).unwrap();
    let a = connect(&path);
    let b = connect(&path);
    // Let the accept thread take both.
    std::thread::sleep(Duration::from_millis(100));
    let r = client::request(&path, "GET", "vmm.ping", None).unwrap();
    assert_eq!(r.status, 503);
    drop(a);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client::request(&path, "GET", "vmm.ping", None).unwrap();
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slots were never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn concurrent_clients() {
    let (path, fake) = start("concurrent");
    let done = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let path = path.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut s = connect(&path);
                for _ in 0..50 {
                    let r = client::request_on(&mut s, "GET", "vmm.ping", None, false).unwrap();
                    assert_eq!(r.status, 200);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 800);
    assert_eq!(fake.answered.load(Ordering::SeqCst), 800);
}

/// Sends `data` with `fd` attached (SCM_RIGHTS).
fn send_with_fd(s: &UnixStream, data: &[u8], fd: i32) {
    let mut control = [0u64; 8];
    // SAFETY: pure size computations.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: zeroed msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is large enough for one cmsg with one fd.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        assert_eq!(libc::sendmsg(s.as_raw_fd(), &msg, 0), data.len() as isize);
    }
}

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Whether the pipe whose write end is `write_end` still has a reader anywhere (the server
/// keeping its copy of the read end), waiting a little for the server to drop it.
fn pipe_has_reader(write_end: &OwnedFd) -> bool {
    // SAFETY: ignore SIGPIPE for this process so that the write reports EPIPE instead.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // SAFETY: writing one byte from a valid buffer to our own write end.
        let n = unsafe { libc::write(write_end.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        if n == -1 {
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPIPE)
            );
            return false;
        }
        if Instant::now() > deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn passed_descriptors_are_refused_and_closed_not_leaked() {
    let (path, _fake) = start("fds");
    let (read_end, write_end) = pipe();
    let mut s = connect(&path);
    send_with_fd(
        &s,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
        read_end.as_raw_fd(),
    );
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        r.error_messages(),
        ["vmm.ping takes no file descriptors (1 passed with the request)"]
    );
    drop(read_end);
    // If the server kept its copy, the pipe would still have a reader.
    assert!(
        !pipe_has_reader(&write_end),
        "the server kept the passed descriptor open"
    );
}

#[test]
fn add_net_takes_the_descriptors_passed_with_it() {
    let (path, _fake) = start("add_net_fds");
    let call = |body: &str, fds: &[BorrowedFd<'_>]| {
        client::request_with_fds(&path, "PUT", "vm.add-net", Some(body), fds).unwrap()
    };
    let (read_end, write_end) = pipe();
    // No VM yet: the request reaches the control loop, which has nothing to plug into.
    let r = call("{}", &[read_end.as_fd()]);
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        client::request(&path, "PUT", "vm.create", Some(&kernel_config()))
            .unwrap()
            .status,
        204
    );
    // The body's numbers (the client's) give way to the descriptor received.
    let r = call(
        r#"{"fds": [99], "mac": "12:34:56:78:9a:bc"}"#,
        &[read_end.as_fd()],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let info: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        info,
        serde_json::json!({"id": "net-1-fds-named", "bdf": "0000:00:05.0"})
    );
    // Numbers without descriptors are refused, and so is more than one queue pair's worth.
    let r = call(r#"{"fds": [3]}"#, &[]);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("SCM_RIGHTS"), "{}", r.body);
    let (other, _other_write) = pipe();
    let r = call("{}", &[read_end.as_fd(), other.as_fd()]);
    assert_eq!(r.status, 400);
    assert!(
        r.error_messages()[0].starts_with("vm.add-net: 2 file descriptors were passed"),
        "{}",
        r.body
    );
    // The other endpoints refuse them.
    let r = client::request_with_fds(
        &path,
        "PUT",
        "vm.add-disk",
        Some(r#"{"path": "/img"}"#),
        &[read_end.as_fd()],
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        r.error_messages(),
        ["vm.add-disk takes no file descriptors (1 passed with the request)"]
    );
    // Whatever the outcome, the server closed every descriptor it was given.
    drop(read_end);
    assert!(
        !pipe_has_reader(&write_end),
        "the server kept a passed descriptor open"
    );
}

#[test]
fn bind_replaces_stale_sockets_only() {
    let path = socket_path("stale");
    drop(UnixListener::bind(&path).unwrap()); // leaves the socket file behind
    assert!(path.exists());
    let listener = api::bind(&path).unwrap();
    drop(listener);

    let file = path.with_extension("txt");
    std::fs::write(&file, "precious").unwrap();
    let e = api::bind(&file).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

#[test]
fn inherited_listener_fd() {
    let path = socket_path("fd");
    let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
    let listener = api::listener_from_fd(fd).unwrap();
    let fake = fake_control_loop();
    api::start_server(listener, fake.sender.clone()).unwrap();
    assert_eq!(
        client::request(&path, "GET", "vmm.ping", None)
            .unwrap()
            .status,
        200
    );

    let e = api::listener_from_fd(-1).unwrap_err();
    assert!(e.to_string().starts_with("--api-socket fd=-1"), "{e}");
    let (a, _b) = UnixStream::pair().unwrap();
    let e = api::listener_from_fd(a.as_raw_fd()).unwrap_err();
    assert!(e.to_string().contains("not listening"), "{e}");
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let e = api::listener_from_fd(devnull.as_raw_fd()).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
}

#[test]
fn socket_is_private_whatever_the_umask() {
    let path = socket_path("mode");
    // SAFETY: umask only swaps this process's file-creation mask; it touches no memory.
    let old = unsafe { libc::umask(0) };
    let bound = api::bind(&path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let _listener = bound.unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");
}

#[test]
fn slow_loris_clients_are_cut_off_by_the_request_deadline() {
    let path = socket_path("slowloris");
    let listener = api::bind(&path).unwrap();
    let fake = fake_control_loop();
    let options = ServerOptions {
        read_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(1),
        ..ServerOptions::default()
    };
    api::spawn_server(listener, Arc::new(fake.sender.clone()), options).unwrap();

    // One byte every 100 ms: never silent long enough for the per-read timeout.
    let slow = connect(&path);
    let mut writer = slow.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut bytes = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow: ".iter().copied();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            let b = bytes.next().unwrap_or(b'a');
            if writer.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // A normal client is served meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    let r = client::request(&path, "GET", "vmm.ping", None).unwrap();
    assert_eq!(r.status, 200);

    let started = Instant::now();
    let mut slow = slow;
    let r = read_response(&mut slow).expect("the slow client got no answer");
    assert_eq!(r.status, 408);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut off after {:?}",
        started.elapsed()
    );
}
