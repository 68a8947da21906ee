//! workload=net: smoltcp over virtio-net, polled from CPL3. Services: ARP and
//! ICMP echo (smoltcp's interface answers them), TCP echo and UDP echo on port
//! 7, and a TCP counter on port 9000 that sends `net.count` lines
//! `SEQ <n>\n` (n = 1..=count) to each client, then closes.
//!
//! Every QueueNotify is a VM exit, so frames are only published to the rings
//! inside the poll loop and the device is notified once per loop iteration
//! (and not at all while it says it is polling the ring itself).
//!
//! Receive offloads are taken when offered (`GUEST_CSUM`, `GUEST_TSO4`): the
//! host then hands over TCP segments of up to 64 KiB, one buffer each, so a
//! bulk transfer costs a frame per 64 KiB instead of per 1460 bytes, on the
//! host and in here. A frame whose checksum the host left to do
//! (`NEEDS_CSUM`) or checked (`DATA_VALID`) is trusted, as Linux does; any
//! other TCP/UDP frame is checked here, since smoltcp is told not to.

use smoltcp::iface::{
    Config as IfaceConfig, Interface, PollResult, SocketHandle, SocketSet, SocketStorage,
};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use crate::virtio::{self, Transport, Virtq, DESC_F_WRITE};
use crate::workloads::Config;
use crate::{clock, dma};

const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
/// virtio_net_hdr flags.
const HDR_F_NEEDS_CSUM: u8 = 1;
const HDR_F_DATA_VALID: u8 = 2;
/// virtio_net_hdr_v1: with VERSION_1 always 12 bytes (num_buffers included).
const HDR: usize = 12;
/// Per-descriptor buffer: header + a full 1514-byte Ethernet frame fits.
const BUF: usize = 2048;
/// RX buffer with TSO: header + the largest segment (5.1.6.3.1: 65562 bytes),
/// rounded up to whole pages.
const BIG_BUF: usize = 17 * 4096;
/// RX buffers posted with TSO (1.06 MiB).
const BIG_BUFS: u16 = 16;
const FRAME_MAX: usize = 1514;
const QUEUE_SIZE: u16 = 256;

const ECHO_PORT: u16 = 7;
const COUNTER_PORT: u16 = 9000;
const ECHO_SOCKETS: usize = 16;
const COUNTER_SOCKETS: usize = 8;
const ECHO_BUF: usize = 256 * 1024;
const COUNTER_RX: usize = 4096;
const COUNTER_TX: usize = 64 * 1024;
const UDP_BUF: usize = 256 * 1024;
const UDP_PACKETS: usize = 256;

#[derive(Default, Clone, Copy)]
struct Stats {
    rx_frames: u64,
    tx_frames: u64,
    rx_notifies: u64,
    tx_notifies: u64,
}

struct RxQueue {
    q: Virtq,
    bufs: *mut u8,
    /// Size of each buffer (descriptor `id` points at buffer `id`).
    buf_len: usize,
    /// How many buffers are posted (descriptors `0..posted`).
    posted: u16,
    /// The host may leave checksums to us (`GUEST_CSUM` was negotiated).
    csum_offload: bool,
    frames: u64,
}

struct TxQueue {
    q: Virtq,
    bufs: *mut u8,
    free: &'static mut [u16],
    nfree: usize,
    frames: u64,
}

impl TxQueue {
    /// Takes back the buffers the device has sent.
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.q.pop_used() {
            self.free[self.nfree] = id;
            self.nfree += 1;
        }
    }

    fn has_room(&mut self) -> bool {
        if self.nfree == 0 {
            self.reclaim();
        }
        if self.nfree == 0 {
            // Full: make sure the device knows about what is queued.
            self.q.kick();
        }
        self.nfree > 0
    }
}

pub struct VirtioNet {
    rx: RxQueue,
    tx: TxQueue,
}

impl VirtioNet {
    /// End of a poll iteration: one notify per queue at most.
    fn flush(&mut self) {
        self.tx.q.kick();
        self.tx.reclaim();
        self.rx.q.kick();
    }

    fn stats(&self) -> Stats {
        Stats {
            rx_frames: self.rx.frames,
            tx_frames: self.tx.frames,
            rx_notifies: self.rx.q.notifies,
            tx_notifies: self.tx.q.notifies,
        }
    }
}

pub struct NetRx<'a> {
    rx: &'a mut RxQueue,
    id: u16,
    len: usize,
}

impl phy::RxToken for NetRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the device is done with buffer `id` (it is in the used
        // ring) and `len` was checked against the buffer size.
        let frame = unsafe {
            core::slice::from_raw_parts(
                self.rx.bufs.add(self.id as usize * self.rx.buf_len + HDR),
                self.len - HDR,
            )
        };
        f(frame)
    }
}

impl Drop for NetRx<'_> {
    /// The buffer goes straight back to the device (descriptor `id` always
    /// points at buffer `id`).
    fn drop(&mut self) {
        self.rx.q.push(self.id);
    }
}

pub struct NetTx<'a> {
    tx: &'a mut TxQueue,
}

impl phy::TxToken for NetTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.tx;
        if len > FRAME_MAX || !tx.has_room() {
            // Cannot happen (MTU, room checked when the token was made);
            // drop the frame rather than corrupt a ring.
            let mut scratch = [0u8; BUF];
            return f(&mut scratch[..len.min(BUF)]);
        }
        tx.nfree -= 1;
        let id = tx.free[tx.nfree];
        // SAFETY: buffer `id` is ours until the device returns it.
        let buf =
            unsafe { core::slice::from_raw_parts_mut(tx.bufs.add(id as usize * BUF), HDR + len) };
        buf[..HDR].fill(0);
        let r = f(&mut buf[HDR..]);
        tx.q.desc(id).len = (HDR + len) as u32;
        tx.q.push(id);
        tx.frames += 1;
        r
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = NetRx<'a>;
    type TxToken<'a> = NetTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(NetRx<'_>, NetTx<'_>)> {
        // A received frame may need a reply: only take one with room to send.
        if !self.tx.has_room() {
            return None;
        }
        loop {
            let (id, len) = self.rx.q.pop_used()?;
            let len = len as usize;
            if id < self.rx.posted
                && len > HDR
                && len <= self.rx.buf_len
                && self.rx.trusted(id, len)
            {
                self.rx.frames += 1;
                return Some((
                    NetRx {
                        rx: &mut self.rx,
                        id,
                        len,
                    },
                    NetTx { tx: &mut self.tx },
                ));
            }
            if id < self.rx.posted {
                self.rx.q.push(id);
            }
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<NetTx<'_>> {
        self.tx.has_room().then_some(NetTx { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_MAX;
        if self.rx.csum_offload {
            // Checked per frame in `RxQueue::trusted` instead.
            caps.checksum.tcp = phy::Checksum::Tx;
            caps.checksum.udp = phy::Checksum::Tx;
        }
        caps
    }
}

impl RxQueue {
    /// Whether buffer `id` (`len` bytes with the header) may go to smoltcp:
    /// with checksum offload, a TCP/UDP frame the host neither left to us nor
    /// checked must carry a right checksum.
    fn trusted(&self, id: u16, len: usize) -> bool {
        if !self.csum_offload {
            return true;
        }
        // SAFETY: the device is done with buffer `id`; `len` was checked
        // against the buffer size.
        let buf =
            unsafe { core::slice::from_raw_parts(self.bufs.add(id as usize * self.buf_len), len) };
        buf[0] & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 || l4_checksum_ok(&buf[HDR..])
    }
}

/// The TCP or UDP checksum of an IPv4 Ethernet frame verifies (true for
/// anything else, which smoltcp still checks, and for UDP without one).
fn l4_checksum_ok(frame: &[u8]) -> bool {
    const ETH: usize = 14;
    if frame.len() < ETH + 20 || frame[12..14] != [0x08, 0x00] {
        return true;
    }
    let ip = &frame[ETH..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let proto = ip[9];
    if !(proto == 6 || proto == 17) || ihl < 20 || total < ihl || total > ip.len() {
        // Not ours to judge; smoltcp rejects a malformed IPv4 header.
        return true;
    }
    let l4 = &ip[ihl..total];
    if proto == 17 && l4.len() >= 8 && l4[6..8] == [0, 0] {
        return true;
    }
    let mut sum: u64 = 0;
    for w in [&ip[12..16], &ip[16..20]] {
        sum += u16::from_be_bytes([w[0], w[1]]) as u64 + u16::from_be_bytes([w[2], w[3]]) as u64;
    }
    sum += proto as u64 + l4.len() as u64;
    let mut chunks = l4.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

pub fn open(dev: &virtio::Dev) -> Result<(VirtioNet, [u8; 6]), &'static str> {
    let t = Transport::init(dev, F_MAC | F_GUEST_CSUM | F_GUEST_TSO4)?;
    let csum_offload = t.has(F_GUEST_CSUM);
    let tso = csum_offload && t.has(F_GUEST_TSO4);
    let mac = if t.has(F_MAC) {
        t.config::<6>(0)
    } else {
        // Locally administered, fixed: tests can predict it.
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
    };
    let rxq = t.queue(0, QUEUE_SIZE);
    let txq = t.queue(1, QUEUE_SIZE);
    let (mut rxq, mut txq) = match (rxq, txq) {
        (Ok(r), Ok(t)) => (r, t),
        (Err(e), _) | (_, Err(e)) => {
            t.fail();
            return Err(e);
        }
    };
    let (rx_buf_len, posted) = if tso {
        (BIG_BUF, rxq.size.min(BIG_BUFS))
    } else {
        (BUF, rxq.size)
    };
    let rx_bufs = dma::alloc(posted as usize * rx_buf_len, 4096);
    let tx_bufs = dma::alloc(txq.size as usize * BUF, 4096);
    for i in 0..posted {
        let d = rxq.desc(i);
        d.addr = rx_bufs as u64 + i as u64 * rx_buf_len as u64;
        d.len = rx_buf_len as u32;
        d.flags = DESC_F_WRITE;
    }
    for i in 0..txq.size {
        let d = txq.desc(i);
        d.addr = tx_bufs as u64 + i as u64 * BUF as u64;
        d.flags = 0;
    }
    let free = dma::alloc_array(txq.size as usize, || 0u16);
    for (i, f) in free.iter_mut().enumerate() {
        *f = i as u16;
    }
    t.driver_ok();
    for i in 0..posted {
        rxq.push(i);
    }
    rxq.kick_always();
    let nfree = free.len();
    Ok((
        VirtioNet {
            rx: RxQueue {
                q: rxq,
                bufs: rx_bufs,
                buf_len: rx_buf_len,
                posted,
                csum_offload,
                frames: 0,
            },
            tx: TxQueue {
                q: txq,
                bufs: tx_bufs,
                free,
                nfree,
                frames: 0,
            },
        },
        mac,
    ))
}

pub fn now() -> Instant {
    Instant::from_micros((clock::now_ns() / 1000) as i64)
}

pub fn tcp_socket(rx: usize, tx: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(dma::alloc_bytes(rx)),
        tcp::SocketBuffer::new(dma::alloc_bytes(tx)),
    );
    // Echo replies and counter lines go out at once, not after an ACK.
    s.set_nagle_enabled(false);
    s
}

/// Puts a socket back into LISTEN once its connection is over. TIME-WAIT is
/// cut short: on a test link there are no stray old segments, and clients
/// open connections in quick succession.
pub fn relisten(s: &mut tcp::Socket, port: u16) -> bool {
    if s.state() == tcp::State::TimeWait {
        s.abort();
    }
    if !s.is_open() {
        let _ = s.listen(port);
        return true;
    }
    false
}

/// Moves what an echo socket received into its send buffer (through a
/// scratch buffer: smoltcp lends out one buffer at a time).
fn echo(s: &mut tcp::Socket, scratch: &mut [u8]) {
    while s.can_recv() {
        let room = s.send_capacity() - s.send_queue();
        if room == 0 {
            break;
        }
        let want = room.min(scratch.len());
        let n = s.recv_slice(&mut scratch[..want]).unwrap_or(0);
        if n == 0 {
            break;
        }
        let _ = s.send_slice(&scratch[..n]);
    }
    if s.state() == tcp::State::CloseWait && s.send_queue() == 0 {
        s.close();
    }
}

/// Writes "SEQ <n>\n" into `buf` if it fits; returns the length.
fn seq_line(n: u64, buf: &mut [u8]) -> Option<usize> {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let d = &digits[i..];
    let len = 4 + d.len() + 1;
    if buf.len() < len {
        return None;
    }
    buf[..4].copy_from_slice(b"SEQ ");
    buf[4..4 + d.len()].copy_from_slice(d);
    buf[len - 1] = b'\n';
    Some(len)
}

/// Counter service: `next` is the last line number sent on this connection.
fn counter(s: &mut tcp::Socket, next: &mut u64, count: u64) {
    if s.can_recv() {
        // Input is ignored.
        let _ = s.recv(|b| (b.len(), ()));
    }
    if matches!(s.state(), tcp::State::Established | tcp::State::CloseWait) {
        while *next < count && s.can_send() {
            let sent = s.send(|buf| {
                let mut off = 0;
                while *next < count {
                    match seq_line(*next + 1, &mut buf[off..]) {
                        Some(n) => {
                            off += n;
                            *next += 1;
                        }
                        None => break,
                    }
                }
                (off, off)
            });
            if !matches!(sent, Ok(n) if n > 0) {
                break;
            }
        }
        if *next >= count {
            s.close();
        }
    }
}

pub struct Net {
    pub ip: [u8; 4],
    pub prefix: u8,
    pub gw: Option<[u8; 4]>,
}

fn ipv4(a: [u8; 4]) -> Ipv4Address {
    Ipv4Address::new(a[0], a[1], a[2], a[3])
}

/// The smoltcp interface on `dev` with the command line's address and route.
pub fn interface(net: &Net, dev: &mut VirtioNet, mac: [u8; 6]) -> Interface {
    let mut icfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    icfg.random_seed = clock::rdtsc();
    let mut iface = Interface::new(icfg, dev, now());
    let ip = net.ip;
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(ipv4(ip).into(), net.prefix));
    });
    if let Some(gw) = net.gw {
        let _ = iface.routes_mut().add_default_ipv4_route(ipv4(gw));
    }
    iface
}

/// End of a poll pass: smoltcp sends at most one segment per socket per
/// egress pass, so repeat while it still sends (bounded by free TX
/// descriptors) and a window's worth of data leaves before the single notify
/// per queue.
pub fn egress(ts: Instant, iface: &mut Interface, dev: &mut VirtioNet, sockets: &mut SocketSet) {
    for _ in 0..QUEUE_SIZE {
        if iface.poll_egress(ts, dev, sockets) == PollResult::None {
            break;
        }
    }
    dev.flush();
}

/// `aa:bb:cc:dd:ee:ff`.
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

pub fn run(cfg: &Config, devs: &virtio::Devices) {
    let vdev = match devs.first(virtio::ID_NET) {
        Ok(d) => d,
        Err(e) => {
            println!("NET error {}", e);
            return;
        }
    };
    let (mut dev, mac) = match open(&vdev) {
        Ok(x) => x,
        Err(e) => {
            println!("NET error {}", e);
            return;
        }
    };
    let mut iface = interface(&cfg.net, &mut dev, mac);
    let ip = cfg.net.ip;

    let storage = dma::alloc_array(ECHO_SOCKETS + COUNTER_SOCKETS + 1, || SocketStorage::EMPTY);
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut echo_h = [SocketHandle::default(); ECHO_SOCKETS];
    for h in echo_h.iter_mut() {
        *h = sockets.add(tcp_socket(ECHO_BUF, ECHO_BUF));
    }
    let mut counter_h = [SocketHandle::default(); COUNTER_SOCKETS];
    for h in counter_h.iter_mut() {
        *h = sockets.add(tcp_socket(COUNTER_RX, COUNTER_TX));
    }
    let mut counter_next = [0u64; COUNTER_SOCKETS];
    let udp_h = {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(
                dma::alloc_array(UDP_PACKETS, || udp::PacketMetadata::EMPTY),
                dma::alloc_bytes(UDP_BUF),
            ),
            udp::PacketBuffer::new(
                dma::alloc_array(UDP_PACKETS, || udp::PacketMetadata::EMPTY),
                dma::alloc_bytes(UDP_BUF),
            ),
        );
        let _ = s.bind(ECHO_PORT);
        sockets.add(s)
    };
    let scratch = dma::alloc_bytes(64 * 1024);

    println!(
        "NET ready ip={}.{}.{}.{} mac={}",
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        Mac(mac)
    );

    let t0 = clock::now_ns();
    let limit_ns = cfg.net_ms.saturating_mul(1_000_000);
    let count = cfg.net_count;
    loop {
        let ts = now();
        iface.poll(ts, &mut dev, &mut sockets);
        for h in echo_h {
            let s = sockets.get_mut::<tcp::Socket>(h);
            relisten(s, ECHO_PORT);
            echo(s, scratch);
        }
        for (i, h) in counter_h.into_iter().enumerate() {
            let s = sockets.get_mut::<tcp::Socket>(h);
            if relisten(s, COUNTER_PORT) {
                counter_next[i] = 0;
            }
            counter(s, &mut counter_next[i], count);
        }
        {
            let s = sockets.get_mut::<udp::Socket>(udp_h);
            while s.can_send() {
                let Ok((data, meta)) = s.recv() else { break };
                let n = data.len().min(scratch.len());
                scratch[..n].copy_from_slice(&data[..n]);
                let _ = s.send_slice(&scratch[..n], meta.endpoint);
            }
        }
        egress(ts, &mut iface, &mut dev, &mut sockets);
        if limit_ns != 0 && clock::now_ns() - t0 >= limit_ns {
            break;
        }
    }
    let st = dev.stats();
    println!(
        "NET done rx_frames={} tx_frames={} rx_notifies={} tx_notifies={}",
        st.rx_frames, st.tx_frames, st.rx_notifies, st.tx_notifies
    );
}
