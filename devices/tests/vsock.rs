//! virtio-vsock end to end: a `Vsock` behind a virtio-pci function, driven by an in-test guest
//! driver that writes packets into guest memory, with real Unix sockets on the host side (the
//! hybrid vsock protocol: `CONNECT <port>\n` / `OK <port>\n`, and `PATH_<port>` listeners).
//! The device event loop runs in the test thread while the test waits.

mod common;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use devices::virtio::vsock::packet::*;
use devices::virtio::vsock::*;
use devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

const CID: u64 = 3;
const MEM_SIZE: usize = 8 << 20;
const SIZES: [u16; 3] = [128, 128, 8];
const RX: usize = 0;
const TX: usize = 1;
const RX_BUFS: usize = 32;
/// As Linux posts them: header and 4 KiB of payload in one buffer.
const RX_BUF_LEN: u32 = (HDR_LEN + 4096) as u32;
const TIMEOUT: Duration = Duration::from_secs(5);

fn socket_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vsock-{}-{n}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn port_path(path: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", path.display()))
}

/// A guest-to-host header on the guest's connection (guest port `src`, host port `dst`).
fn g2h(src: u32, dst: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: VSOCK_HOST_CID,
        src_port: src,
        dst_port: dst,
        len: 0,
        type_: VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    }
}

/// The in-test guest: its vsock driver's queues, the device and its event loop.
struct Guest {
    h: Harness,
    dev: Arc<Mutex<Vsock>>,
    path: PathBuf,
    rx_posted: HashMap<u32, u64>,
    /// Receive buffers used but not given back (while `starve` holds them).
    rx_held: Vec<u64>,
    starve: bool,
    tx_area: u64,
    inbox: VecDeque<(Header, Vec<u8>)>,
}

impl Guest {
    fn new(name: &str) -> Guest {
        let path = socket_path(name);
        let dev = Arc::new(Mutex::new(Vsock::new("vsock0", CID, &path).unwrap()));
        Guest::with_device(dev, path)
    }

    fn with_device(dev: Arc<Mutex<Vsock>>, path: PathBuf) -> Guest {
        let mut h = Harness::new(dev.clone(), MEM_SIZE);
        assert_eq!(h.driver.device_features(), VIRTIO_F_VERSION_1);
        assert!(h.activate(VIRTIO_F_VERSION_1, &SIZES));
        let tx_area = h.buffer(2 * (MAX_PKT_LEN + HDR_LEN));
        let mut g = Guest {
            h,
            dev,
            path,
            rx_posted: HashMap::new(),
            rx_held: Vec::new(),
            starve: false,
            tx_area,
            inbox: VecDeque::new(),
        };
        for _ in 0..RX_BUFS {
            let at = g.h.buffer(RX_BUF_LEN as usize);
            g.post_rx(at);
        }
        g.h.driver.notify(RX as u32);
        g.poll();
        g
    }

    fn post_rx(&mut self, at: u64) {
        let head = self.h.driver.add_chain(RX, &[(at, RX_BUF_LEN, true)]);
        self.rx_posted.insert(u32::from(head), at);
    }

    /// One event loop iteration, then takes what arrived.
    fn poll(&mut self) {
        self.h.poll(2);
        self.collect();
    }

    /// Moves used receive buffers into the inbox and gives them back (unless starving).
    fn collect(&mut self) {
        let used = self.h.driver.take_used(RX);
        for (id, len) in used {
            let at = self.rx_posted.remove(&id).expect("used id was posted");
            assert!(len as usize >= HDR_LEN, "a {len}-byte receive packet");
            let raw = self.h.read(at, len as usize);
            let hdr = Header::from_bytes(raw[..HDR_LEN].try_into().unwrap());
            assert_eq!(hdr.len as usize, len as usize - HDR_LEN, "{hdr:?}");
            assert_eq!(hdr.src_cid, VSOCK_HOST_CID);
            assert_eq!(hdr.dst_cid, CID);
            self.inbox.push_back((hdr, raw[HDR_LEN..].to_vec()));
            self.rx_held.push(at);
        }
        if !self.starve && !self.rx_held.is_empty() {
            for at in std::mem::take(&mut self.rx_held) {
                self.post_rx(at);
            }
            self.h.driver.notify(RX as u32);
        }
    }

    fn feed(&mut self) {
        self.starve = false;
        self.collect();
    }

    /// Sends `bufs` as one transmit chain and runs the loop until the device used it.
    fn send_chain(&mut self, bufs: &[(u64, u32, bool)]) {
        self.h.driver.add_chain(TX, bufs);
        self.h.driver.notify(TX as u32);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.h.poll(1);
            let used = self.h.driver.take_used(TX);
            self.collect();
            if !used.is_empty() {
                assert_eq!(used.len(), 1);
                assert_eq!(used[0].1, 0, "transmit buffers are not written");
                return;
            }
            assert!(Instant::now() < deadline, "transmit chain not used");
        }
    }

    /// Sends a packet (header and payload in one buffer, or in two when `split`).
    fn send_split(&mut self, mut hdr: Header, payload: &[u8], split: bool) {
        hdr.len = payload.len() as u32;
        let mem = self.h.mem().clone();
        mem.write_slice(&hdr.to_bytes(), GuestAddress(self.tx_area))
            .unwrap();
        let data_at = self.tx_area + HDR_LEN as u64 + if split { 64 } else { 0 };
        mem.write_slice(payload, GuestAddress(data_at)).unwrap();
        if split && !payload.is_empty() {
            self.send_chain(&[
                (self.tx_area, HDR_LEN as u32, false),
                (data_at, payload.len() as u32, false),
            ]);
        } else {
            self.send_chain(&[(self.tx_area, (HDR_LEN + payload.len()) as u32, false)]);
        }
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        self.send_split(hdr, payload, false);
    }

    /// Runs the loop until a packet matching `pred` arrives; other packets stay in the inbox.
    fn wait(&mut self, what: &str, pred: impl Fn(&Header) -> bool) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.collect();
            if let Some(i) = self.inbox.iter().position(|(h, _)| pred(h)) {
                return self.inbox.remove(i).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no {what}; inbox: {:?}",
                self.inbox.iter().map(|p| p.0).collect::<Vec<_>>()
            );
            self.h.poll(5);
        }
    }

    /// Runs the loop for `ms` and returns the packets matching `pred` that arrived.
    fn settle(&mut self, ms: u64, pred: impl Fn(&Header) -> bool) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < deadline {
            self.poll();
        }
        let (matching, rest): (Vec<_>, Vec<_>) = self.inbox.drain(..).partition(|(h, _)| pred(h));
        self.inbox = rest.into();
        matching
    }

    /// Collects `n` payload bytes of RW packets from host port `local` to guest port `peer`.
    fn recv_data(&mut self, local: u32, peer: u32, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let (h, data) = self.wait("data", |h| {
                h.op == VSOCK_OP_RW && h.src_port == local && h.dst_port == peer
            });
            assert_eq!(h.type_, VSOCK_TYPE_STREAM);
            out.extend(data);
        }
        assert_eq!(out.len(), n, "more data than expected");
        out
    }

    fn counter(&self, name: &str) -> u64 {
        self.dev.lock().unwrap().counters()[name]
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).expect("line"), 1, "EOF inside a line");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Whether the host end sees EOF within the timeout (false: data arrived instead).
fn sees_eof(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut b = [0u8; 64];
    // Closing a socket with unread bytes resets it (Unix sockets report ECONNRESET).
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// Opens a host-initiated connection to guest port `port`, the guest accepting with
/// `buf_alloc`; returns the host client and the host port the device chose.
fn host_connect(g: &mut Guest, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (req, _) = g.wait("REQUEST", |h| {
        h.op == VSOCK_OP_REQUEST && h.dst_port == port
    });
    assert_eq!(req.type_, VSOCK_TYPE_STREAM);
    assert!(req.src_port >= 1 << 30, "{req:?}");
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    let mut resp = g2h(port, req.src_port, VSOCK_OP_RESPONSE);
    resp.buf_alloc = buf_alloc;
    g.send(resp, &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
    (s, req.src_port)
}

/// The guest connects to host port `port` from guest port `from`; returns the accepted host
/// end.
fn guest_connect(g: &mut Guest, listener: &UnixListener, from: u32, port: u32) -> UnixStream {
    g.send(g2h(from, port, VSOCK_OP_REQUEST), &[]);
    let (resp, _) = g.wait("RESPONSE", |h| {
        h.src_port == port && h.dst_port == from && h.op != VSOCK_OP_CREDIT_UPDATE
    });
    assert_eq!(resp.op, VSOCK_OP_RESPONSE, "{resp:?}");
    assert_eq!(resp.buf_alloc, BUF_ALLOC);
    let (s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

#[test]
fn config_space_holds_the_guest_cid() {
    let g = Guest::new("cfg");
    let mut cfg = [0u8; 8];
    g.h.driver.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let dev = g.dev.lock().unwrap();
    assert_eq!(dev.device_type(), VIRTIO_ID_VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
}

#[test]
fn constructor_refuses_bad_cids_and_an_existing_path() {
    let path = socket_path("ctor");
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let err = Vsock::new("v", cid, &path).err().expect("refused");
        assert!(err.to_string().contains("CID"), "{err}");
    }
    let first = Vsock::new("v", CID, &path).unwrap();
    // As Cloud Hypervisor: an existing path (here, a live socket) is not taken over.
    let err = Vsock::new("v", CID, &path).err().expect("refused");
    assert!(err.to_string().contains("stale socket"), "{err}");
    drop(first);
    assert!(!path.exists(), "the socket file is removed with the device");
    let again = Vsock::new("v", CID, &path).unwrap();
    drop(again);
}

#[test]
fn host_initiated_round_trip() {
    let mut g = Guest::new("host-rt");
    let (mut s, local) = host_connect(&mut g, 1234, 64 << 10);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 1);

    s.write_all(b"hello guest").unwrap();
    assert_eq!(g.recv_data(local, 1234, 11), b"hello guest");

    // Header and payload in separate descriptors, as older drivers send.
    g.send_split(g2h(1234, local, VSOCK_OP_RW), b"hello host", true);
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");

    // Bytes the client sent right behind the CONNECT line belong to the stream.
    let mut s2 = UnixStream::connect(&g.path).unwrap();
    s2.set_read_timeout(Some(TIMEOUT)).unwrap();
    s2.write_all(b"connect 77\nearly bytes").unwrap();
    let (req, _) = g.wait("REQUEST", |h| h.op == VSOCK_OP_REQUEST && h.dst_port == 77);
    g.send(g2h(77, req.src_port, VSOCK_OP_RESPONSE), &[]);
    assert_eq!(read_line(&mut s2), format!("OK {}\n", req.src_port));
    assert_ne!(
        req.src_port, local,
        "each connection gets its own host port"
    );
    assert_eq!(g.recv_data(req.src_port, 77, 11), b"early bytes");
    assert_eq!(g.counter("host_connections"), 2);
}

#[test]
fn guest_initiated_round_trip() {
    let mut g = Guest::new("guest-rt");
    let listener = UnixListener::bind(port_path(&g.path, 5000)).unwrap();
    let mut s = guest_connect(&mut g, &listener, 40000, 5000);
    g.send(g2h(40000, 5000, VSOCK_OP_RW), b"from the guest");
    let mut got = [0u8; 14];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the guest");
    s.write_all(b"from the host").unwrap();
    assert_eq!(g.recv_data(5000, 40000, 13), b"from the host");
    assert_eq!(g.counter("guest_connections"), 1);
    let _ = std::fs::remove_file(port_path(&g.path, 5000));
}

#[test]
fn no_listener_at_path_port_gets_an_rst() {
    let mut g = Guest::new("no-listener");
    g.send(g2h(40001, 5001, VSOCK_OP_REQUEST), &[]);
    let (rst, _) = g.wait("RST", |h| h.dst_port == 40001);
    assert_eq!(rst.op, VSOCK_OP_RST);
    assert_eq!(rst.src_port, 5001);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    assert_eq!(g.counter("refused"), 1);
}

#[test]
fn guest_refusal_closes_the_host_client() {
    let mut g = Guest::new("refuse");
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.write_all(b"CONNECT 999\n").unwrap();
    let (req, _) = g.wait("REQUEST", |h| h.op == VSOCK_OP_REQUEST);
    g.send(g2h(999, req.src_port, VSOCK_OP_RST), &[]);
    assert!(sees_eof(&mut s), "the client is closed without an OK");
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn an_unanswered_request_times_out() {
    let mut g = Guest::new("req-timeout");
    g.dev.lock().unwrap().set_timeouts(Timeouts {
        request: Duration::from_millis(100),
        ..Timeouts::default()
    });
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.write_all(b"CONNECT 31\n").unwrap();
    let (req, _) = g.wait("REQUEST", |h| h.op == VSOCK_OP_REQUEST);
    let (rst, _) = g.wait("RST", |h| h.op == VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 31));
    assert!(sees_eof(&mut s));
}

#[test]
fn host_data_beyond_the_guest_credit_waits_for_a_credit_update() {
    let mut g = Guest::new("credit-in");
    let (mut s, local) = host_connect(&mut g, 80, 1000);
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    s.write_all(&data).unwrap();
    assert_eq!(g.recv_data(local, 80, 1000), data[..1000]);
    // Out of credit: no more data, but a CREDIT_REQUEST.
    let later = g.settle(200, |h| h.src_port == local);
    assert!(
        later.iter().all(|(h, _)| h.op != VSOCK_OP_RW),
        "data beyond the credit: {later:?}"
    );
    assert!(later.iter().any(|(h, _)| h.op == VSOCK_OP_CREDIT_REQUEST));
    // The guest consumed 600 bytes: 600 more may come.
    let mut upd = g2h(80, local, VSOCK_OP_CREDIT_UPDATE);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 600;
    g.send(upd, &[]);
    assert_eq!(g.recv_data(local, 80, 600), data[1000..1600]);
    let later = g.settle(100, |h| h.src_port == local && h.op == VSOCK_OP_RW);
    assert!(later.is_empty(), "{later:?}");
    // A bigger buffer and everything consumed: the rest arrives.
    upd.buf_alloc = 4096;
    upd.fwd_cnt = 1600;
    g.send(upd, &[]);
    assert_eq!(g.recv_data(local, 80, 1400), data[1600..]);
}

#[test]
fn the_device_advertises_credit_and_updates_it() {
    let mut g = Guest::new("credit-out");
    let (mut s, local) = host_connect(&mut g, 81, 64 << 10);
    // The host reads everything; after half the advertised buffer the guest is told,
    // unasked, that the bytes were forwarded.
    let chunk = vec![0x5a; 4096];
    for _ in 0..10 {
        g.send(g2h(81, local, VSOCK_OP_RW), &chunk);
    }
    let mut got = vec![0u8; 40960];
    s.read_exact(&mut got).unwrap();
    let (upd, _) = g.wait("CREDIT_UPDATE", |h| h.op == VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(upd.buf_alloc, BUF_ALLOC);
    assert!(upd.fwd_cnt > BUF_ALLOC / 2, "{upd:?}");
    // Asked, it answers.
    g.send(g2h(81, local, VSOCK_OP_CREDIT_REQUEST), &[]);
    let (upd, _) = g.wait("CREDIT_UPDATE", |h| h.op == VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(upd.fwd_cnt, 40960);
}

#[test]
fn a_guest_exceeding_our_credit_is_reset() {
    let mut g = Guest::new("credit-abuse");
    let (s, local) = host_connect(&mut g, 82, 64 << 10);
    // Fill the host socket, then the device buffer, then one packet too many.
    let chunk = vec![1u8; 32 << 10];
    let mut sent = 0usize;
    loop {
        g.send(g2h(82, local, VSOCK_OP_RW), &chunk);
        sent += chunk.len();
        if g.inbox.iter().any(|(h, _)| h.op == VSOCK_OP_RST) {
            break;
        }
        assert!(sent < 8 << 20, "never reset");
        assert!(g.dev.lock().unwrap().buffered_bytes() <= BUF_ALLOC as usize);
    }
    let (rst, _) = g.wait("RST", |h| h.op == VSOCK_OP_RST);
    assert_eq!(rst.src_port, local);
    g.poll();
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    drop(s);
}

#[test]
fn guest_half_close_then_host_close() {
    let mut g = Guest::new("half-guest");
    let (mut s, local) = host_connect(&mut g, 90, 64 << 10);
    g.send(g2h(90, local, VSOCK_OP_RW), b"last words");
    let mut shut = g2h(90, local, VSOCK_OP_SHUTDOWN);
    shut.flags = VSOCK_SHUTDOWN_F_SEND;
    g.send(shut, &[]);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words", "the host reads the data, then its end");
    // The other direction still works.
    s.write_all(b"still here").unwrap();
    assert_eq!(g.recv_data(local, 90, 10), b"still here");
    // The host closes too: the guest is told, then the connection is reset.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (sd, _) = g.wait("SHUTDOWN", |h| h.op == VSOCK_OP_SHUTDOWN);
    assert_ne!(sd.flags & VSOCK_SHUTDOWN_F_SEND, 0);
    let (rst, _) = g.wait("RST", |h| h.op == VSOCK_OP_RST);
    assert_eq!(rst.src_port, local);
    g.poll();
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn host_half_close_then_guest_close() {
    let mut g = Guest::new("half-host");
    let listener = UnixListener::bind(port_path(&g.path, 6000)).unwrap();
    let mut s = guest_connect(&mut g, &listener, 41000, 6000);
    s.write_all(b"bye").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(g.recv_data(6000, 41000, 3), b"bye");
    let (sd, _) = g.wait("SHUTDOWN", |h| h.op == VSOCK_OP_SHUTDOWN);
    assert_eq!(sd.flags, VSOCK_SHUTDOWN_F_SEND);
    // The guest still sends.
    g.send(g2h(41000, 6000, VSOCK_OP_RW), b"reply");
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply");
    // The guest closes (both directions): an RST completes it, and the host reads its end.
    let mut shut = g2h(41000, 6000, VSOCK_OP_SHUTDOWN);
    shut.flags = VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE;
    g.send(shut, &[]);
    let (rst, _) = g.wait("RST", |h| h.op == VSOCK_OP_RST);
    assert_eq!(rst.dst_port, 41000);
    assert!(sees_eof(&mut s));
    let _ = std::fs::remove_file(port_path(&g.path, 6000));
}

#[test]
fn host_close_is_a_full_shutdown() {
    let mut g = Guest::new("host-close");
    let (mut s, local) = host_connect(&mut g, 91, 64 << 10);
    s.write_all(b"and gone").unwrap();
    drop(s);
    assert_eq!(g.recv_data(local, 91, 8), b"and gone");
    let (sd, _) = g.wait("SHUTDOWN", |h| h.op == VSOCK_OP_SHUTDOWN);
    assert_eq!(sd.flags, VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE);
    // The guest answers as Linux does: RST.
    g.send(g2h(91, local, VSOCK_OP_RST), &[]);
    g.poll();
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn a_host_client_that_never_reads_does_not_stall_another() {
    let mut g = Guest::new("slow");
    let (slow, slow_port) = host_connect(&mut g, 100, 64 << 10);
    let (mut fast, fast_port) = host_connect(&mut g, 101, 64 << 10);
    // The guest sends to the slow client as fast as our credit lets it.
    let chunk = vec![7u8; 4096];
    let (mut sent, mut fwd, mut alloc) = (0u32, 0u32, BUF_ALLOC);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        while let Some(i) = g.inbox.iter().position(|(h, _)| h.src_port == slow_port) {
            let (h, _) = g.inbox.remove(i).unwrap();
            assert_ne!(h.op, VSOCK_OP_RST, "the slow connection was reset");
            fwd = h.fwd_cnt;
            alloc = h.buf_alloc;
        }
        let credit = alloc - (sent - fwd);
        if credit < chunk.len() as u32 {
            // Stuck: wait for an update that can only come if the client reads.
            let more = g.settle(100, |h| h.src_port == slow_port);
            if more.iter().all(|(h, _)| h.fwd_cnt == fwd) {
                break;
            }
            g.inbox.extend(more);
            continue;
        }
        g.send(g2h(100, slow_port, VSOCK_OP_RW), &chunk);
        sent += chunk.len() as u32;
        assert!(Instant::now() < deadline, "the credit never ran out");
    }
    let held = g.dev.lock().unwrap().buffered_bytes();
    assert!(held > 0 && held <= BUF_ALLOC as usize, "{held} bytes held");
    // The other connection carries data both ways meanwhile.
    let payload: Vec<u8> = (0..20000u32).map(|i| i as u8).collect();
    for piece in payload.chunks(4096) {
        g.send(g2h(101, fast_port, VSOCK_OP_RW), piece);
    }
    let mut got = vec![0u8; payload.len()];
    fast.read_exact(&mut got).unwrap();
    assert_eq!(got, payload);
    fast.write_all(&payload).unwrap();
    assert_eq!(g.recv_data(fast_port, 101, payload.len()), payload);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 2);
    drop(slow);
}

#[test]
fn malformed_packets_do_not_harm_other_connections() {
    let mut g = Guest::new("bad");
    let (mut good, good_port) = host_connect(&mut g, 200, 64 << 10);
    let (_victim, victim_port) = host_connect(&mut g, 201, 64 << 10);
    let mem = g.h.mem().clone();
    let scratch = g.h.buffer(256);

    // A chain too short for a header, and one split inside the header.
    g.send_chain(&[(scratch, 20, false)]);
    let bad_before = g.counter("bad_chains");
    assert_eq!(bad_before, 1);
    let mut h = g2h(200, good_port, VSOCK_OP_CREDIT_REQUEST);
    h.len = 0;
    mem.write_slice(&h.to_bytes(), GuestAddress(scratch))
        .unwrap();
    g.send_chain(&[(scratch, 30, false), (scratch + 30, 14, false)]);
    // (that one was well formed: header split over two descriptors)
    g.wait("CREDIT_UPDATE", |h| {
        h.op == VSOCK_OP_CREDIT_UPDATE && h.src_port == good_port
    });
    // Device-writable transmit buffers and buffers outside memory.
    g.send_chain(&[(scratch, 64, true)]);
    g.send_chain(&[(MEM_SIZE as u64 - 8, 64, false)]);
    assert_eq!(g.counter("bad_chains"), 3);

    // `len` beyond the chain, and absurd: the connection it names is reset.
    let mut lying = g2h(201, victim_port, VSOCK_OP_RW);
    lying.len = 1000;
    mem.write_slice(&lying.to_bytes(), GuestAddress(scratch))
        .unwrap();
    g.send_chain(&[(scratch, HDR_LEN as u32 + 10, false)]);
    let (rst, _) = g.wait("RST", |h| h.op == VSOCK_OP_RST && h.src_port == victim_port);
    assert_eq!(rst.dst_port, 201);
    let mut absurd = g2h(7000, 7001, VSOCK_OP_RW);
    absurd.len = u32::MAX;
    mem.write_slice(&absurd.to_bytes(), GuestAddress(scratch))
        .unwrap();
    g.send_chain(&[(scratch, HDR_LEN as u32, false)]);
    g.wait("RST", |h| h.op == VSOCK_OP_RST && h.dst_port == 7000);

    // Unknown op and a packet for no connection: RST; SEQPACKET: RST of that type.
    g.send(g2h(7002, 7003, 99), &[]);
    g.wait("RST", |h| h.op == VSOCK_OP_RST && h.dst_port == 7002);
    g.send(g2h(7004, 7005, VSOCK_OP_RW), b"nobody");
    g.wait("RST", |h| h.op == VSOCK_OP_RST && h.dst_port == 7004);
    let mut seq = g2h(7006, 7007, VSOCK_OP_REQUEST);
    seq.type_ = VSOCK_TYPE_SEQPACKET;
    g.send(seq, &[]);
    let (rst, _) = g.wait("RST", |h| h.op == VSOCK_OP_RST && h.dst_port == 7006);
    assert_eq!(rst.type_, VSOCK_TYPE_SEQPACKET);
    // Wrong addresses are dropped without an answer; an RST is never answered.
    let mut other = g2h(7008, 7009, VSOCK_OP_REQUEST);
    other.dst_cid = 5;
    g.send(other, &[]);
    let mut spoofed = g2h(7010, 7011, VSOCK_OP_REQUEST);
    spoofed.src_cid = 9;
    g.send(spoofed, &[]);
    g.send(g2h(7012, 7013, VSOCK_OP_RST), &[]);
    let quiet = g.settle(100, |h| h.dst_port >= 7008);
    assert!(quiet.is_empty(), "{quiet:?}");

    // An unknown op on a live connection resets it alone.
    let (_third, third_port) = host_connect(&mut g, 202, 64 << 10);
    g.send(g2h(202, third_port, 0), &[]);
    g.wait("RST", |h| h.op == VSOCK_OP_RST && h.src_port == third_port);
    assert_eq!(
        g.counter("bad_packets"),
        7,
        "{:?}",
        g.dev.lock().unwrap().counters()
    );

    // The good connection never noticed.
    good.write_all(b"still fine").unwrap();
    assert_eq!(g.recv_data(good_port, 200, 10), b"still fine");
    g.send(g2h(200, good_port, VSOCK_OP_RW), b"yes");
    let mut got = [0u8; 3];
    good.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"yes");
    g.poll();
    assert_eq!(g.dev.lock().unwrap().connection_count(), 1);
}

#[test]
fn bad_connect_lines_close_the_client_only() {
    let mut g = Guest::new("bad-lines");
    g.dev.lock().unwrap().set_timeouts(Timeouts {
        connect_line: Duration::from_millis(200),
        ..Timeouts::default()
    });
    let (mut good, good_port) = host_connect(&mut g, 300, 64 << 10);
    let lines: [&[u8]; 6] = [
        b"HELLO\n",
        b"CONNECT abc\n",
        b"CONNECT 99999999999\n",
        b"CONNECT\n",
        b"\xff\xfe\n",
        // Never ends: no newline within the limit.
        &[b'7'; 40],
    ];
    let mut clients = Vec::new();
    for line in lines {
        let mut c = UnixStream::connect(&g.path).unwrap();
        c.write_all(line).unwrap();
        clients.push(c);
    }
    // Half a line, then silence: closed after the timeout.
    let mut silent = UnixStream::connect(&g.path).unwrap();
    silent.write_all(b"CONN").unwrap();
    let mut nothing = UnixStream::connect(&g.path).unwrap();
    let deadline = Instant::now() + Duration::from_millis(400);
    while Instant::now() < deadline {
        g.poll();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(sees_eof(c), "client {i} not closed");
    }
    assert!(sees_eof(&mut silent));
    assert!(sees_eof(&mut nothing));
    assert!(
        !g.inbox.iter().any(|(h, _)| h.op == VSOCK_OP_REQUEST),
        "no request reached the guest"
    );
    assert_eq!(g.counter("refused"), 8);
    good.write_all(b"ok").unwrap();
    assert_eq!(g.recv_data(good_port, 300, 2), b"ok");
}

#[test]
fn the_connection_limit_holds() {
    let mut g = Guest::new("limit");
    let mut clients = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        clients.push(UnixStream::connect(&g.path).unwrap());
        if clients.len() % 64 == 0 {
            g.poll();
        }
    }
    let deadline = Instant::now() + TIMEOUT;
    let mut extra = UnixStream::connect(&g.path).unwrap();
    while !sees_eof_now(&mut extra) {
        g.poll();
        assert!(
            Instant::now() < deadline,
            "the extra client was not refused"
        );
    }
    // A guest connection is refused too.
    let _l = UnixListener::bind(port_path(&g.path, 6100)).unwrap();
    g.send(g2h(42000, 6100, VSOCK_OP_REQUEST), &[]);
    g.wait("RST", |h| h.op == VSOCK_OP_RST && h.dst_port == 42000);
    drop(clients);
    let _ = std::fs::remove_file(port_path(&g.path, 6100));
}

fn sees_eof_now(s: &mut UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 8];
    let r = match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    s.set_nonblocking(false).unwrap();
    r
}

#[test]
fn reset_closes_connections_and_reactivation_works() {
    let mut g = Guest::new("reset");
    let (mut s, _) = host_connect(&mut g, 400, 64 << 10);
    g.h.driver.reset();
    g.h.poll(10);
    assert!(!g.dev.lock().unwrap().is_activated());
    assert!(sees_eof(&mut s), "a reset closes the host side");
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    // A new driver (and loop) on the same device: connections work again.
    let Guest { h, dev, path, .. } = g;
    drop(h);
    let mut g = Guest::with_device(dev, path);
    let (mut s, local) = host_connect(&mut g, 401, 64 << 10);
    s.write_all(b"again").unwrap();
    assert_eq!(g.recv_data(local, 401, 5), b"again");
}

#[test]
fn restore_resets_the_guests_connections() {
    let mut g = Guest::new("snap");
    let (_s1, p1) = host_connect(&mut g, 500, 64 << 10);
    let listener = UnixListener::bind(port_path(&g.path, 7000)).unwrap();
    let _s2 = guest_connect(&mut g, &listener, 43000, 7000);
    let state = g.dev.lock().unwrap().state();
    assert_eq!(state.cid, CID);
    assert_eq!(state.acked_features, VIRTIO_F_VERSION_1);
    let mut want = vec![(p1, 500), (7000, 43000)];
    want.sort_unstable();
    assert_eq!(state.connections, want);
    let json = serde_json::to_string(&state).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    // The destination: its own socket, no connections; the guest learns its old ones ended.
    let path = socket_path("snap-dst");
    let fresh = Arc::new(Mutex::new(Vsock::new("vsock0", CID, &path).unwrap()));
    fresh.lock().unwrap().restore(&back).unwrap();
    let mut g2 = Guest::with_device(fresh.clone(), path);
    let mut rsts: Vec<(u32, u32)> = Vec::new();
    while rsts.len() < 2 {
        let (h, _) = g2.wait("RST", |h| h.op == VSOCK_OP_RST);
        rsts.push((h.src_port, h.dst_port));
    }
    rsts.sort_unstable();
    assert_eq!(rsts, want);
    assert_eq!(fresh.lock().unwrap().connection_count(), 0);
    assert_eq!(fresh.lock().unwrap().counters()["host_connections"], 1);

    // Another CID or queue layout is refused by name.
    let other_path = socket_path("snap-other");
    let mut other = Vsock::new("vsock0", CID + 1, &other_path).unwrap();
    let err = other.restore(&back).unwrap_err();
    assert!(err.to_string().contains("CID"), "{err}");
    let mut wrong = back.clone();
    wrong.queue_sizes = vec![64, 64, 64];
    let err = fresh.lock().unwrap().restore(&wrong).unwrap_err();
    assert!(err.to_string().contains("virtio-vsock"), "{err}");
    let _ = std::fs::remove_file(port_path(&g.path, 7000));
}

/// xorshift64: deterministic, so a failure replays.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One connection as the model sees it from both ends.
struct Model {
    host: UnixStream,
    /// The guest's port and the host port.
    guest_port: u32,
    host_port: u32,
    h2g_sent: Vec<u8>,
    g_recv: Vec<u8>,
    /// What the guest reports consumed (its fwd_cnt), and its buffer.
    g_consumed: u32,
    g_alloc: u32,
    g2h_sent: Vec<u8>,
    g2h_read: Vec<u8>,
    /// The device's credit as last seen by the guest.
    dev_alloc: u32,
    dev_fwd: u32,
}

impl Model {
    fn hdr(&self, op: u16) -> Header {
        let mut h = g2h(self.guest_port, self.host_port, op);
        h.buf_alloc = self.g_alloc;
        h.fwd_cnt = self.g_consumed;
        h
    }
}

/// Checks every packet the guest got against the model: credit respected, bytes in order.
fn absorb(g: &mut Guest, models: &mut [Model]) -> Vec<usize> {
    let mut want_update = Vec::new();
    for (hdr, data) in g.inbox.drain(..) {
        let Some(i) = models
            .iter()
            .position(|m| (m.host_port, m.guest_port) == (hdr.src_port, hdr.dst_port))
        else {
            // Answers to the garbage packets.
            assert_eq!(hdr.op, VSOCK_OP_RST, "{hdr:?}");
            continue;
        };
        let m = &mut models[i];
        assert!(
            !matches!(hdr.op, VSOCK_OP_RST | VSOCK_OP_SHUTDOWN),
            "connection {i} ended: {hdr:?}"
        );
        m.dev_alloc = hdr.buf_alloc;
        m.dev_fwd = hdr.fwd_cnt;
        match hdr.op {
            VSOCK_OP_RW => {
                m.g_recv.extend(&data);
                let in_flight = m.g_recv.len() as u32 - m.g_consumed;
                assert!(
                    in_flight <= m.g_alloc,
                    "connection {i}: {in_flight} bytes in flight, buffer {}",
                    m.g_alloc
                );
                assert!(
                    m.h2g_sent.starts_with(&m.g_recv),
                    "connection {i}: guest bytes differ from what the host sent"
                );
            }
            VSOCK_OP_CREDIT_REQUEST => want_update.push(i),
            VSOCK_OP_CREDIT_UPDATE => {}
            op => panic!("unexpected op {op}: {hdr:?}"),
        }
    }
    want_update
}

fn run_random(seed: u64, steps: usize) {
    let mut rng = XorShift(seed);
    let mut g = Guest::new(&format!("prop-{seed}"));
    let listener = UnixListener::bind(port_path(&g.path, 9000)).unwrap();
    let mut models = Vec::new();
    for i in 0..3u32 {
        let alloc = 1000 + rng.below(20000) as u32;
        let (host, host_port, guest_port) = if i < 2 {
            let (s, p) = host_connect(&mut g, 600 + i, alloc);
            (s, p, 600 + i)
        } else {
            let mut req = g2h(44000, 9000, VSOCK_OP_REQUEST);
            req.buf_alloc = alloc;
            g.send(req, &[]);
            g.wait("RESPONSE", |h| {
                h.op == VSOCK_OP_RESPONSE && h.dst_port == 44000
            });
            (listener.accept().unwrap().0, 9000, 44000)
        };
        host.set_nonblocking(true).unwrap();
        models.push(Model {
            host,
            guest_port,
            host_port,
            h2g_sent: Vec::new(),
            g_recv: Vec::new(),
            g_consumed: 0,
            g_alloc: alloc,
            g2h_sent: Vec::new(),
            g2h_read: Vec::new(),
            dev_alloc: BUF_ALLOC,
            dev_fwd: 0,
        });
    }
    let mem = g.h.mem().clone();
    let scratch = g.h.buffer(512);
    let mut buf = vec![0u8; 1 << 16];
    for step in 0..steps {
        let i = rng.below(models.len() as u64) as usize;
        match rng.below(9) {
            0 | 1 => {
                let n = 1 + rng.below(5000) as usize;
                let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                let m = &mut models[i];
                match m.host.write(&data) {
                    Ok(k) => m.h2g_sent.extend(&data[..k]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("step {step}: host write: {e}"),
                }
            }
            2 | 3 => {
                let m = &models[i];
                let credit = m.dev_alloc - (m.g2h_sent.len() as u32 - m.dev_fwd);
                let n = (1 + rng.below(6000) as u32).min(credit) as usize;
                if n > 0 {
                    let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    let hdr = m.hdr(VSOCK_OP_RW);
                    g.send_split(hdr, &data, rng.below(2) == 0);
                    models[i].g2h_sent.extend(data);
                }
            }
            4 => {
                let m = &mut models[i];
                let unread = m.g_recv.len() as u32 - m.g_consumed;
                m.g_consumed += rng.below(u64::from(unread) + 1) as u32;
                let hdr = m.hdr(VSOCK_OP_CREDIT_UPDATE);
                g.send(hdr, &[]);
            }
            5 => {
                let m = &mut models[i];
                let want = 1 + rng.below(buf.len() as u64) as usize;
                match m.host.read(&mut buf[..want]) {
                    Ok(k) => m.g2h_read.extend(&buf[..k]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("step {step}: host read: {e}"),
                }
                assert!(m.g2h_sent.starts_with(&m.g2h_read), "host bytes differ");
            }
            6 => {
                // Garbage on ports no connection uses.
                let mut h = g2h(
                    8000 + rng.below(50) as u32,
                    8100 + rng.below(50) as u32,
                    rng.below(10) as u16,
                );
                h.type_ = [VSOCK_TYPE_STREAM, VSOCK_TYPE_SEQPACKET, 0, 77][rng.below(4) as usize];
                h.len = [0, 10, 400, u32::MAX][rng.below(4) as usize];
                mem.write_slice(&h.to_bytes(), GuestAddress(scratch))
                    .unwrap();
                let len = [HDR_LEN as u32, 20, HDR_LEN as u32 + 10][rng.below(3) as usize];
                g.send_chain(&[(scratch, len, false)]);
            }
            7 => g.starve = rng.below(3) == 0,
            _ => g.poll(),
        }
        g.poll();
        for i in absorb(&mut g, &mut models) {
            let hdr = models[i].hdr(VSOCK_OP_CREDIT_UPDATE);
            g.send(hdr, &[]);
        }
        let held = g.dev.lock().unwrap().buffered_bytes();
        assert!(held <= 3 * BUF_ALLOC as usize, "{held} bytes held");
    }

    // Drain: the guest consumes everything, the hosts read everything.
    g.feed();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut done = true;
        for (i, m) in models.iter_mut().enumerate() {
            loop {
                match m.host.read(&mut buf) {
                    Ok(0) => panic!("host {i} saw an end"),
                    Ok(k) => m.g2h_read.extend(&buf[..k]),
                    Err(_) => break,
                }
            }
            done &= m.g2h_read.len() == m.g2h_sent.len() && m.g_recv.len() == m.h2g_sent.len();
            if m.g_consumed as usize != m.g_recv.len() {
                m.g_consumed = m.g_recv.len() as u32;
                let hdr = m.hdr(VSOCK_OP_CREDIT_UPDATE);
                g.send(hdr, &[]);
            }
        }
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: traffic did not drain"
        );
        g.poll();
        for i in absorb(&mut g, &mut models) {
            let hdr = models[i].hdr(VSOCK_OP_CREDIT_UPDATE);
            g.send(hdr, &[]);
        }
    }
    for (i, m) in models.iter().enumerate() {
        assert_eq!(
            m.g2h_read, m.g2h_sent,
            "seed {seed}: connection {i} to the host"
        );
        assert_eq!(
            m.g_recv, m.h2g_sent,
            "seed {seed}: connection {i} to the guest"
        );
    }
    assert_eq!(g.dev.lock().unwrap().connection_count(), 3);
    // The run moved data both ways and hit the guests' credit limits.
    let counters = g.dev.lock().unwrap().counters();
    assert!(
        counters["rx_bytes"] > 50_000 && counters["tx_bytes"] > 50_000,
        "{counters:?}"
    );
    let _ = std::fs::remove_file(port_path(&g.path, 9000));
}

#[test]
fn random_traffic_keeps_order_and_credit() {
    for seed in [1, 7, 0x9e37_79b9_7f4a_7c15, 0xdead_beef] {
        run_random(seed, 300);
    }
}
