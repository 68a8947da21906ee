//! virtio-console end to end: a `Console` behind a virtio-pci function, driven by the
//! in-test driver, with the device event loop run by the test thread. Output goes to an
//! in-memory sink; input comes from one end of a socket pair (or a real socket client).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use devices::virtio::console::*;
use devices::virtio::VIRTIO_F_VERSION_1;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_SIZE;
const SIZES: [u16; 2] = [16, 16];
const MEM_SIZE: usize = 4 << 20;
const RX: usize = 0;
const TX: usize = 1;

/// An output sink the test can read.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// A console whose input is fed through the returned stream.
fn stream_console() -> (Arc<Mutex<Console>>, Capture, UnixStream) {
    let (host, device_end) = UnixStream::pair().unwrap();
    let capture = Capture::default();
    let backend = ConsoleBackend::Stream {
        output: Box::new(capture.clone()),
        input: std::fs::File::from(std::os::fd::OwnedFd::from(device_end)),
    };
    let console = Console::new("console0", backend, 80, 25).unwrap();
    (Arc::new(Mutex::new(console)), capture, host)
}

fn started(console: &Arc<Mutex<Console>>) -> Harness {
    let mut h = Harness::new(console.clone(), MEM_SIZE);
    assert!(h.activate(FEATURES, &SIZES));
    h
}

/// Runs the loop until `n` used entries arrived on `queue` (without notifying).
fn wait_used(h: &mut Harness, queue: usize, n: usize) -> Vec<(u32, u32)> {
    let em = &mut h.em;
    h.driver.wait_used(queue, n, Duration::from_secs(5), || {
        em.run_with_timeout(50).expect("event loop");
    })
}

/// Posts `count` receive buffers of `len` bytes each; returns their addresses by head index.
fn post_rx(h: &mut Harness, count: usize, len: u32) -> Vec<(u16, u64)> {
    (0..count)
        .map(|_| {
            let at = h.buffer(len as usize);
            (h.driver.add_chain(RX, &[(at, len, true)]), at)
        })
        .collect()
}

/// The bytes the used entries say were written, in used order.
fn received(h: &Harness, posted: &[(u16, u64)], used: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(id, len) in used {
        let addr = posted.iter().find(|p| u32::from(p.0) == id).unwrap().1;
        out.extend(h.read(addr, len as usize));
    }
    out
}

#[test]
fn offers_size_and_reports_it_in_config_space() {
    let (console, _capture, _host) = stream_console();
    let h = started(&console);
    assert_eq!(h.driver.device_features(), FEATURES);
    let mut cfg = [0u8; 12];
    h.driver.read_config(0, &mut cfg);
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 80);
    assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]), 25);
}

#[test]
fn output_reaches_the_sink_byte_exact() {
    let capture = Capture::default();
    let console = Arc::new(Mutex::new(
        Console::new("c", ConsoleBackend::Output(Box::new(capture.clone())), 0, 0).unwrap(),
    ));
    let mut h = started(&console);
    let all: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    // One chain of three descriptors, then a chain per remaining piece.
    let a = h.buffer_with(&all[..100]);
    let b = h.buffer_with(&all[100..101]);
    let c = h.buffer_with(&all[101..5000]);
    h.driver
        .add_chain(TX, &[(a, 100, false), (b, 1, false), (c, 4899, false)]);
    let d = h.buffer_with(&all[5000..]);
    h.driver.add_chain(TX, &[(d, 5000, false)]);
    let used = h.kick_and_wait(TX, 2);
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    assert_eq!(capture.bytes(), all);
    assert_eq!(console.lock().unwrap().counters()["tx_bytes"], 10_000);
}

#[test]
fn input_reaches_the_guest_in_order() {
    let (console, _capture, mut host) = stream_console();
    let mut h = started(&console);
    let posted = post_rx(&mut h, 4, 4);
    h.driver.notify(RX as u32);
    h.poll(10);
    host.write_all(b"hello, guest").unwrap();
    let used = wait_used(&mut h, RX, 3);
    assert_eq!(received(&h, &posted, &used), b"hello, guest");
    assert_eq!(console.lock().unwrap().pending_input(), 0);
}

#[test]
fn a_full_receive_queue_keeps_the_input() {
    let (console, _capture, mut host) = stream_console();
    let mut h = started(&console);
    let input: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    host.write_all(&input).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while console.lock().unwrap().pending_input() < input.len() && Instant::now() < deadline {
        h.poll(50);
    }
    assert_eq!(console.lock().unwrap().pending_input(), input.len());
    // Buffers smaller than the input: it arrives over several chains, in order.
    let posted = post_rx(&mut h, 3, 4096);
    let used = h.kick_and_wait(RX, 3);
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        [4096, 4096, 1808]
    );
    assert_eq!(received(&h, &posted, &used), input);
}

#[test]
fn input_beyond_the_cap_is_dropped_and_counted() {
    let (console, _capture, mut host) = stream_console();
    let mut h = started(&console);
    let extra = 1000;
    let input = vec![b'x'; MAX_PENDING_INPUT + extra];
    let writer = std::thread::spawn(move || {
        host.write_all(&input).unwrap();
        host
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        h.poll(20);
        let c = console.lock().unwrap();
        if c.counters()["rx_dropped"] == extra as u64 || Instant::now() > deadline {
            break;
        }
    }
    let _host = writer.join().unwrap();
    let c = console.lock().unwrap();
    assert_eq!(c.pending_input(), MAX_PENDING_INPUT);
    assert_eq!(c.counters()["rx_dropped"], extra as u64);
}

#[test]
fn bad_chains_are_skipped_without_harm() {
    let (console, capture, mut host) = stream_console();
    let mut h = started(&console);
    let buf = h.buffer_with(b"ok");
    // Transmit: a device-writable chain, a zero-length chain, one outside guest memory.
    let heads = [
        h.driver.add_chain(TX, &[(buf, 2, true)]),
        h.driver.add_chain(TX, &[(buf, 0, false)]),
        h.driver.add_chain(TX, &[(MEM_SIZE as u64 - 1, 16, false)]),
        h.driver.add_chain(TX, &[(u64::MAX - 8, 4, false)]),
        h.driver.add_chain(TX, &[(buf, 2, false)]),
    ];
    let used = h.kick_and_wait(TX, heads.len());
    assert_eq!(used.len(), heads.len());
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(capture.bytes(), b"ok", "only the good chain's bytes leave");
    assert_eq!(console.lock().unwrap().counters()["bad_chains"], 4);

    // Receive: a device-readable buffer and one outside memory are skipped (used, length 0);
    // the input goes to the next good buffer.
    let ro = h.buffer(8);
    let bad = [
        (h.driver.add_chain(RX, &[(ro, 8, false)]), ro),
        (
            h.driver.add_chain(RX, &[(MEM_SIZE as u64 + 4096, 8, true)]),
            0,
        ),
    ];
    let good = post_rx(&mut h, 1, 8);
    h.driver.notify(RX as u32);
    host.write_all(b"in").unwrap();
    let used = wait_used(&mut h, RX, 3);
    assert_eq!(used.len(), 3);
    assert_eq!(used[0], (u32::from(bad[0].0), 0));
    assert_eq!(used[1], (u32::from(bad[1].0), 0));
    assert_eq!(used[2], (u32::from(good[0].0), 2));
    assert_eq!(h.read(good[0].1, 2), b"in");
    assert_eq!(
        h.read(ro, 8),
        [0u8; 8],
        "a device-readable buffer is not written"
    );
}

#[test]
fn state_round_trips_and_pending_input_survives() {
    let (console, _capture, mut host) = stream_console();
    let mut h = started(&console);
    host.write_all(b"typed before the snapshot").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while console.lock().unwrap().pending_input() < 25 && Instant::now() < deadline {
        h.poll(50);
    }
    let state = console.lock().unwrap().state();
    assert_eq!(state.pending_input, b"typed before the snapshot");
    assert_eq!(state.acked_features, FEATURES);
    let json = serde_json::to_string(&state).unwrap();
    let back: ConsoleState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    // A fresh device from the same configuration takes the state and delivers the input.
    let (fresh, _capture2, _host2) = stream_console();
    fresh.lock().unwrap().restore(&back).unwrap();
    assert_eq!(fresh.lock().unwrap().state(), state);
    let mut h2 = started(&fresh);
    let posted = post_rx(&mut h2, 1, 64);
    let used = h2.kick_and_wait(RX, 1);
    assert_eq!(received(&h2, &posted, &used), b"typed before the snapshot");

    // A state of another shape is refused by name.
    let mut wrong = state;
    wrong.queue_sizes = vec![64, 64];
    let err = fresh.lock().unwrap().restore(&wrong).unwrap_err();
    assert!(err.to_string().contains("virtio-console"), "{err}");
}

fn socket_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("console-{}-{n}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn socket_client_gets_output_and_sends_input() {
    let path = socket_path("client");
    let listener = UnixListener::bind(&path).unwrap();
    let console = Arc::new(Mutex::new(
        Console::new("c", ConsoleBackend::Socket(listener), 0, 0).unwrap(),
    ));
    let mut h = started(&console);
    // Output with no client is discarded, not kept for a later client.
    let early = h.buffer_with(b"nobody hears this");
    h.driver.add_chain(TX, &[(early, 17, false)]);
    h.kick_and_wait(TX, 1);
    assert_eq!(console.lock().unwrap().counters()["tx_dropped"], 17);

    let mut client = UnixStream::connect(&path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // The loop accepts the client; then output reaches it.
    h.poll(50);
    let hello = h.buffer_with(b"hello client");
    h.driver.add_chain(TX, &[(hello, 12, false)]);
    h.kick_and_wait(TX, 1);
    let mut got = [0u8; 12];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello client");

    let posted = post_rx(&mut h, 1, 32);
    h.driver.notify(RX as u32);
    client.write_all(b"from client").unwrap();
    let used = wait_used(&mut h, RX, 1);
    assert!(Instant::now() < deadline);
    assert_eq!(received(&h, &posted, &used), b"from client");

    // The client leaves; output is discarded again and a new client can connect.
    drop(client);
    h.poll(50);
    let mut second = UnixStream::connect(&path).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    h.poll(50);
    let again = h.buffer_with(b"again");
    h.driver.add_chain(TX, &[(again, 5, false)]);
    h.kick_and_wait(TX, 1);
    let mut got = [0u8; 5];
    second.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"again");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn reset_and_reactivate() {
    let (console, capture, _host) = stream_console();
    let mut h = started(&console);
    h.driver.reset();
    h.poll(10);
    assert!(!console.lock().unwrap().is_activated());
    assert!(h.activate(FEATURES, &SIZES));
    let at = h.buffer_with(b"after reset");
    h.driver.add_chain(TX, &[(at, 11, false)]);
    h.kick_and_wait(TX, 1);
    assert_eq!(capture.bytes(), b"after reset");
}
