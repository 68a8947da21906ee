//! Stream throughput through virtio-vsock (hybrid Unix-socket backend) next to a plain Unix
//! socket pair, measured in the same run; prints a ratio table.
//!
//! The guest side is the in-test driver (no KVM): it posts 4 KiB receive buffers as Linux does
//! and sends packets of up to 16 KiB, honouring the device's credit and returning its own.
//! Run with `cargo bench -p devices --bench vsock_throughput` (`VSOCK_BENCH_MB` sets the size).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::*;
use devices::virtio::vsock::packet::*;
use devices::virtio::vsock::*;
use devices::virtio::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress};

const CID: u64 = 3;
const RX_BUFS: usize = 64;
const RX_BUF_LEN: u32 = (HDR_LEN + 4096) as u32;
const TX_CHUNK: usize = 16 << 10;
const GUEST_BUF_ALLOC: u32 = 256 << 10;

struct Bench {
    h: Harness,
    posted: std::collections::HashMap<u32, u64>,
    tx_area: u64,
    _dev: Arc<Mutex<Vsock>>,
    path: PathBuf,
}

impl Bench {
    fn new() -> Bench {
        let path = std::env::temp_dir().join(format!("vsock-bench-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let dev = Arc::new(Mutex::new(Vsock::new("vsock0", CID, &path).unwrap()));
        let mut h = Harness::new(dev.clone(), 8 << 20);
        assert!(h.activate(VIRTIO_F_VERSION_1, &[256, 256, 8]));
        let tx_area = h.buffer(HDR_LEN + TX_CHUNK);
        let mut b = Bench {
            h,
            posted: Default::default(),
            tx_area,
            _dev: dev,
            path,
        };
        for _ in 0..RX_BUFS {
            let at = b.h.buffer(RX_BUF_LEN as usize);
            b.post(at);
        }
        b.h.driver.notify(0);
        b
    }

    fn post(&mut self, at: u64) {
        let head = self.h.driver.add_chain(0, &[(at, RX_BUF_LEN, true)]);
        self.posted.insert(u32::from(head), at);
    }

    /// Runs the loop once; returns the packets received (buffers given back).
    fn turn(&mut self) -> Vec<(Header, usize)> {
        // Busy-polls, as a guest under load would not sleep between packets.
        self.h.poll(0);
        let used = self.h.driver.take_used(0);
        let mut out = Vec::new();
        for (id, len) in &used {
            let at = self.posted.remove(id).unwrap();
            let mut raw = [0u8; HDR_LEN];
            self.h.mem().read_slice(&mut raw, GuestAddress(at)).unwrap();
            out.push((Header::from_bytes(&raw), *len as usize - HDR_LEN));
            self.post(at);
        }
        if !used.is_empty() {
            self.h.driver.notify(0);
        }
        out
    }

    fn send(&mut self, hdr: Header, len: usize) {
        let mut hdr = hdr;
        hdr.len = len as u32;
        self.h
            .mem()
            .write_slice(&hdr.to_bytes(), GuestAddress(self.tx_area))
            .unwrap();
        self.h
            .driver
            .add_chain(1, &[(self.tx_area, (HDR_LEN + len) as u32, false)]);
        self.h.driver.notify(1);
        while self.h.driver.take_used(1).is_empty() {
            self.h.poll(0);
        }
    }

    /// Opens a host-initiated connection; returns the client and its header template.
    fn connect(&mut self) -> (UnixStream, Header) {
        let mut s = UnixStream::connect(&self.path).unwrap();
        s.write_all(b"CONNECT 1\n").unwrap();
        let req = loop {
            if let Some((h, _)) = self.turn().into_iter().find(|p| p.0.op == VSOCK_OP_REQUEST) {
                break h;
            }
        };
        let tmpl = Header {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: 1,
            dst_port: req.src_port,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_RESPONSE,
            buf_alloc: GUEST_BUF_ALLOC,
            ..Header::default()
        };
        self.send(tmpl, 0);
        let mut line = [0u8; 1];
        while line[0] != b'\n' {
            s.read_exact(&mut line).unwrap();
        }
        (s, tmpl)
    }
}

/// Host to guest through the device: seconds for `total` bytes.
fn device_h2g(b: &mut Bench, total: usize) -> f64 {
    let (mut s, tmpl) = b.connect();
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0xa5u8; TX_CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        s
    });
    let (mut got, mut told) = (0usize, 0usize);
    while got < total {
        for (h, len) in b.turn() {
            if h.op == VSOCK_OP_RW && h.src_port == tmpl.dst_port {
                got += len;
            }
        }
        // The guest application reads at once; credit goes back every quarter buffer.
        if got - told >= GUEST_BUF_ALLOC as usize / 4 || got == total {
            let mut upd = tmpl;
            upd.op = VSOCK_OP_CREDIT_UPDATE;
            upd.fwd_cnt = got as u32;
            b.send(upd, 0);
            told = got;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(writer.join().unwrap());
    secs
}

/// Guest to host through the device: seconds for `total` bytes.
fn device_g2h(b: &mut Bench, total: usize) -> f64 {
    let (mut s, tmpl) = b.connect();
    let start = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < total {
            got += s.read(&mut buf).unwrap();
        }
    });
    let (mut sent, mut fwd, mut alloc) = (0usize, 0u32, BUF_ALLOC);
    while sent < total {
        for (h, _) in b
            .turn()
            .into_iter()
            .filter(|p| p.0.src_port == tmpl.dst_port)
        {
            fwd = h.fwd_cnt;
            alloc = h.buf_alloc;
        }
        let credit = alloc as usize - (sent - fwd as usize);
        let n = credit.min(TX_CHUNK).min(total - sent);
        if n == 0 {
            continue;
        }
        let mut hdr = tmpl;
        hdr.op = VSOCK_OP_RW;
        b.send(hdr, n);
        sent += n;
    }
    reader.join().unwrap();
    start.elapsed().as_secs_f64()
}

/// The same transfer over a plain socket pair.
fn unix_pair(total: usize) -> f64 {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5au8; TX_CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            a.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    while got < total {
        got += b.read(&mut buf).unwrap();
    }
    writer.join().unwrap();
    start.elapsed().as_secs_f64()
}

fn main() {
    let mb: usize = std::env::var("VSOCK_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let total = mb << 20;
    let mut b = Bench::new();
    let rate = |secs: f64| total as f64 / secs.max(1e-9) / (1 << 20) as f64;
    let pair = rate(unix_pair(total));
    let rows = [
        ("host -> guest", rate(device_h2g(&mut b, total))),
        ("guest -> host", rate(device_g2h(&mut b, total))),
    ];
    println!("vsock throughput, {mb} MiB per run (no KVM: the guest is the in-test driver)");
    println!(
        "{:<14} {:>12} {:>16} {:>8}",
        "direction", "vsock MiB/s", "unix pair MiB/s", "ratio"
    );
    for (name, r) in rows {
        println!("{name:<14} {r:>12.1} {pair:>16.1} {:>8.3}", r / pair);
    }
}
