//! virtio-net end to end: a `Net` on a real TAP behind a virtio-pci function, driven by the
//! in-test driver, with the device event loop run by the test thread.
//!
//! Every test that needs a TAP runs on a thread that first moves into a fresh network
//! namespace: the TAP, its addresses and all traffic exist only there. Without root or
//! /dev/net/tun those tests print a SKIP line and do not run.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{clear_dirty, guest_memory, in_netns, is_dirty, transport, Alloc, Driver};
use devices::gate::NetOutputGate;
use devices::tap::VNET_HDR_LEN;
use devices::virtio::net::{MacAddr, Net, NetConfig, NetError, MAX_PACKET_LEN};
use devices::virtio::VIRTIO_F_VERSION_1;
use devices::GuestMemoryMmap;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use vm_memory::{Bytes, GuestAddress};

type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const MEM_SIZE: u64 = 1 << 20;
const QUEUE_BASE: u64 = 0x1000;
const DATA_START: u64 = 0x20000;
const WAIT: Duration = Duration::from_secs(3);

/// Records transmitted frames instead of sending them.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

impl NetOutputGate for Recorder {
    fn transmit(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

/// A device, its transport and driver, and the event loop, all on the calling thread.
struct Rig {
    net: Arc<Mutex<Net>>,
    drv: Driver,
    em: Em,
    mem: GuestMemoryMmap,
    alloc: Alloc,
}

fn net_config() -> NetConfig {
    NetConfig {
        ip: Some(HOST_IP),
        mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
        mac: Some(MacAddr::new(GUEST_MAC)),
        ..NetConfig::default()
    }
}

impl Rig {
    fn new(cfg: NetConfig, queue_size: u16) -> Rig {
        let mem = guest_memory(MEM_SIZE as usize);
        let net = Arc::new(Mutex::new(Net::new(cfg).expect("virtio-net")));
        let (bus, irq) = transport(net.clone(), &mem);
        let mut em = Em::new().expect("event manager");
        em.add_subscriber(net.clone());
        let mut rig = Rig {
            net,
            drv: Driver::new(bus, mem.clone(), irq),
            em,
            mem,
            alloc: Alloc::new(DATA_START, MEM_SIZE),
        };
        rig.activate(queue_size);
        rig
    }

    /// Negotiates everything offered, sets up both queues and lets the loop see DRIVER_OK.
    fn activate(&mut self, queue_size: u16) {
        let features = self.drv.device_features();
        assert!(
            self.drv
                .init(features, &[queue_size, queue_size], QUEUE_BASE),
            "driver init"
        );
        self.poll();
    }

    fn poll(&mut self) {
        self.em.run_with_timeout(10).expect("event loop");
    }

    fn counter(&self, name: &str) -> u64 {
        self.net.lock().unwrap().counters()[name]
    }

    /// Polls until `cond` holds or the wait times out.
    fn poll_until(&mut self, what: &str, cond: impl Fn(&Rig) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.poll();
        }
    }

    fn wait_used(&mut self, queue: usize, n: usize) -> Vec<(u32, u32)> {
        let Rig { drv, em, .. } = self;
        let got = drv.wait_used(queue, n, WAIT, || {
            em.run_with_timeout(10).expect("event loop");
        });
        assert_eq!(got.len(), n, "used entries on queue {queue}: {got:?}");
        got
    }

    /// Copies `data` into fresh guest memory and returns its address.
    fn put(&mut self, data: &[u8]) -> u64 {
        let at = self.alloc.take(data.len().max(1) as u64, 16);
        self.mem.write_slice(data, GuestAddress(at)).expect("write");
        at
    }

    /// Posts an RX buffer of `len` bytes (one descriptor) and returns its address.
    fn post_rx(&mut self, len: u32) -> u64 {
        let at = self.alloc.take(u64::from(len), 16);
        self.drv.add_chain(0, &[(at, len, true)]);
        at
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(at))
            .expect("read");
        buf
    }
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in header.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/UDP frame (UDP checksum 0 = none, legal for IPv4).
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let csum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The UDP payload of an Ethernet/IPv4/UDP frame to `port`, if it is one.
fn udp_payload(frame: &[u8], port: u16) -> Option<&[u8]> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = frame.get(14 + ihl..)?;
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != port {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    udp.get(8..len)
}

/// A permanent neighbour entry so the host sends to `ip` without ARP (SIOCSARP).
fn add_neighbour(dev: &str, ip: Ipv4Addr, mac: [u8; 6]) {
    const ATF_COM: libc::c_int = 0x02;
    const ATF_PERM: libc::c_int = 0x04;
    // SAFETY: arpreq is a plain C struct; all-zero bytes are valid.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as AF_INET.
    req.arp_pa = unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) };
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.arp_flags = ATF_COM | ATF_PERM;
    for (d, s) in req.arp_dev.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    let sock = UdpSocket::bind("0.0.0.0:0").expect("socket");
    // SAFETY: SIOCSARP reads one arpreq, which `req` is, on a valid socket fd.
    let ret = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCSARP as _,
            &req,
        )
    };
    assert_eq!(ret, 0, "SIOCSARP: {}", std::io::Error::last_os_error());
}

/// The virtio-net header the device must put in front of every RX frame.
fn expected_rx_header() -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[10] = 1; // num_buffers = 1
    h
}

#[test]
fn features_and_config_space() {
    in_netns("features_and_config_space", || {
        let cfg = NetConfig {
            mtu: Some(1400),
            ..net_config()
        };
        let rig = Rig::new(cfg, 256);
        let features = rig.drv.device_features();
        for bit in [VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU] {
            assert_ne!(features & (1 << bit), 0, "feature {bit} not offered");
        }
        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        // Receive offloads are on by default, as Cloud Hypervisor's offload_csum/offload_tso.
        for bit in [
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
        ] {
            assert_ne!(features & (1 << bit), 0, "feature {bit} not offered");
        }
        // Transmit offloads and mergeable buffers are never offered.
        for bit in [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MRG_RXBUF] {
            assert_eq!(features & (1 << bit), 0, "feature {bit} must stay off");
        }
        let mut cfg = [0u8; 12];
        rig.drv.read_config(0, &mut cfg);
        assert_eq!(cfg[0..6], GUEST_MAC);
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one queue pair");
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400, "mtu");

        let net = rig.net.lock().unwrap();
        assert!(net.tap_name().starts_with("vmtap"), "{}", net.tap_name());
        assert_eq!(net.tap().ip_addr().unwrap(), HOST_IP);
        assert_eq!(net.tap().mtu().unwrap(), 1400);
        assert!(net.tap().is_up().unwrap());
    });
}

#[test]
fn tx_frames_reach_a_host_socket() {
    in_netns("tx_frames_reach_a_host_socket", || {
        let mut rig = Rig::new(net_config(), 256);
        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 5555)).expect("bind");
        host.set_read_timeout(Some(WAIT)).unwrap();
        let tap_mac = rig.net.lock().unwrap().tap().hw_addr().unwrap();
        let from = SocketAddrV4::new(GUEST_IP, 4000);
        let to = SocketAddrV4::new(HOST_IP, 5555);

        // Frame 1: the header split over two descriptors, the frame over two more.
        let f1 = udp_frame(tap_mac, GUEST_MAC, from, to, b"hello from the guest");
        let hdr = rig.put(&[0u8; VNET_HDR_LEN]);
        let a = rig.put(&f1[..20]);
        let b = rig.put(&f1[20..]);
        rig.drv.add_chain(
            1,
            &[
                (hdr, 5, false),
                (hdr + 5, 7, false),
                (a, 20, false),
                (b, (f1.len() - 20) as u32, false),
            ],
        );
        // Frame 2: header and frame in one descriptor.
        let f2 = udp_frame(tap_mac, GUEST_MAC, from, to, b"second");
        let mut one = vec![0u8; VNET_HDR_LEN];
        one.extend_from_slice(&f2);
        let c = rig.put(&one);

        clear_dirty(&rig.mem);
        rig.drv.add_chain(1, &[(c, one.len() as u32, false)]);
        clear_dirty(&rig.mem);
        rig.drv.notify(1);
        let used = rig.wait_used(1, 2);
        assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
        assert!(rig.drv.ack_interrupt() & 1 != 0, "used-buffer interrupt");

        let mut buf = [0u8; 256];
        let (n, peer) = host.recv_from(&mut buf).expect("first datagram");
        assert_eq!(&buf[..n], b"hello from the guest");
        assert_eq!(peer, std::net::SocketAddr::V4(from));
        let (n, _) = host.recv_from(&mut buf).expect("second datagram");
        assert_eq!(&buf[..n], b"second");

        assert_eq!(rig.counter("tx_frames"), 2);
        assert_eq!(rig.counter("tx_bytes"), (f1.len() + f2.len()) as u64);
        assert_eq!(rig.counter("tx_errors"), 0);
        // TX writes nothing but the used ring.
        assert!(!is_dirty(&rig.mem, a) && !is_dirty(&rig.mem, c));
        assert!(is_dirty(&rig.mem, rig.drv.queues[1].used));
    });
}

#[test]
fn rx_frames_land_in_guest_buffers_and_mark_them_dirty() {
    in_netns(
        "rx_frames_land_in_guest_buffers_and_mark_them_dirty",
        || {
            // Without checksum offload the kernel completes the checksum: a zero header.
            let cfg = NetConfig {
                offload_csum: false,
                ..net_config()
            };
            let mut rig = Rig::new(cfg, 256);
            let tap = rig.net.lock().unwrap().tap_name().to_string();
            add_neighbour(&tap, GUEST_IP, GUEST_MAC);

            // One chain of three descriptors, the header split between the first two.
            let p1 = rig.alloc.take(4096, 4096);
            let p2 = rig.alloc.take(4096, 4096);
            rig.drv
                .add_chain(0, &[(p1, 4, true), (p1 + 4, 30, true), (p2, 2000, true)]);
            rig.drv.notify(0);
            clear_dirty(&rig.mem);
            rig.poll();

            let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 6000)).expect("bind");
            host.send_to(b"ping from host", SocketAddrV4::new(GUEST_IP, 7777))
                .expect("send");
            let used = rig.wait_used(0, 1);
            let len = used[0].1 as usize;
            let want_frame_len = 14 + 20 + 8 + 14;
            assert_eq!(len, VNET_HDR_LEN + want_frame_len, "{used:?}");

            let mut packet = rig.read(p1, 34);
            packet.extend(rig.read(p2, len - 34));
            assert_eq!(packet[..VNET_HDR_LEN], expected_rx_header());
            let frame = &packet[VNET_HDR_LEN..];
            assert_eq!(frame[0..6], GUEST_MAC, "destination MAC");
            assert_eq!(udp_payload(frame, 7777), Some(&b"ping from host"[..]));
            assert!(rig.drv.ack_interrupt() & 1 != 0, "used-buffer interrupt");

            // The device's writes are in the dirty bitmap; untouched memory is not.
            assert!(is_dirty(&rig.mem, p1) && is_dirty(&rig.mem, p2));
            assert!(is_dirty(&rig.mem, rig.drv.queues[0].used));
            assert!(!is_dirty(&rig.mem, MEM_SIZE - 4096));
            assert_eq!(rig.counter("rx_frames"), 1);
            assert_eq!(rig.counter("rx_bytes"), want_frame_len as u64);
        },
    );
}

#[test]
fn with_checksum_offload_the_header_says_what_is_left_to_do() {
    in_netns(
        "with_checksum_offload_the_header_says_what_is_left_to_do",
        || {
            let mut rig = Rig::new(net_config(), 256);
            let tap = rig.net.lock().unwrap().tap_name().to_string();
            add_neighbour(&tap, GUEST_IP, GUEST_MAC);
            let p = rig.alloc.take(4096, 4096);
            rig.drv.add_chain(0, &[(p, 2048, true)]);
            rig.drv.notify(0);
            rig.poll();

            let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 6002)).expect("bind");
            host.send_to(b"partial", SocketAddrV4::new(GUEST_IP, 7779))
                .expect("send");
            let used = rig.wait_used(0, 1);
            let packet = rig.read(p, used[0].1 as usize);
            // NEEDS_CSUM, no segmentation, the UDP checksum field 6 bytes into the UDP header
            // at 14 + 20; num_buffers 1.
            assert_eq!(
                packet[..VNET_HDR_LEN],
                [1, 0, 0, 0, 0, 0, 34, 0, 6, 0, 1, 0]
            );
            assert_eq!(
                udp_payload(&packet[VNET_HDR_LEN..], 7779),
                Some(&b"partial"[..])
            );
        },
    );
}

#[test]
fn oversized_rx_frame_is_dropped_and_the_buffer_kept() {
    in_netns("oversized_rx_frame_is_dropped_and_the_buffer_kept", || {
        let mut rig = Rig::new(net_config(), 256);
        let tap = rig.net.lock().unwrap().tap_name().to_string();
        add_neighbour(&tap, GUEST_IP, GUEST_MAC);
        let guard = rig.alloc.take(4096, 4096);
        rig.mem
            .write_slice(&[0xaa; 4096], GuestAddress(guard))
            .unwrap();
        // 64 bytes, followed by a guard page that must stay untouched.
        let buf = guard - 64;
        rig.drv.add_chain(0, &[(buf, 64, true)]);
        rig.drv.notify(0);

        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 6001)).expect("bind");
        let to = SocketAddrV4::new(GUEST_IP, 7778);
        host.send_to(&[0x55; 200], to).expect("send big");
        rig.poll_until("the drop", |r| r.counter("rx_dropped") == 1);
        assert!(rig.drv.take_used(0).is_empty(), "no buffer used for it");
        assert_eq!(rig.read(guard, 4096), vec![0xaa; 4096]);

        // The same buffer takes the next frame that fits (12 + 14 + 20 + 8 + 4 = 58).
        host.send_to(b"tiny", to).expect("send small");
        let used = rig.wait_used(0, 1);
        assert_eq!(used[0].1, 58);
        let packet = rig.read(buf, 58);
        assert_eq!(
            udp_payload(&packet[VNET_HDR_LEN..], 7778),
            Some(&b"tiny"[..])
        );
        assert_eq!(rig.counter("rx_dropped"), 1);
        assert_eq!(rig.counter("rx_frames"), 1);
    });
}

#[test]
fn rx_waits_for_buffers_instead_of_dropping() {
    in_netns("rx_waits_for_buffers_instead_of_dropping", || {
        let mut rig = Rig::new(net_config(), 256);
        let tap = rig.net.lock().unwrap().tap_name().to_string();
        add_neighbour(&tap, GUEST_IP, GUEST_MAC);
        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 6002)).expect("bind");
        let to = SocketAddrV4::new(GUEST_IP, 7779);
        for i in 0..3u8 {
            host.send_to(&[b'a' + i; 10], to).expect("send");
        }
        // The loop runs while no buffer is posted: nothing is dropped, nothing spins.
        let start = Instant::now();
        let mut wakeups = 0;
        while start.elapsed() < Duration::from_millis(200) {
            wakeups += rig.em.run_with_timeout(20).expect("event loop");
        }
        assert!(wakeups < 5, "the loop kept waking up: {wakeups}");
        assert_eq!(rig.counter("rx_dropped"), 0);

        let bufs: Vec<u64> = (0..3).map(|_| rig.post_rx(1600)).collect();
        rig.drv.notify(0);
        let used = rig.wait_used(0, 3);
        for (i, (&(_, len), &at)) in used.iter().zip(&bufs).enumerate() {
            let packet = rig.read(at, len as usize);
            assert_eq!(
                udp_payload(&packet[VNET_HDR_LEN..], 7779),
                Some(&[b'a' + i as u8; 10][..])
            );
        }
        assert_eq!(rig.counter("rx_frames"), 3);
    });
}

#[test]
fn bad_tx_chains_are_counted_and_returned() {
    in_netns("bad_tx_chains_are_counted_and_returned", || {
        let mut rig = Rig::new(net_config(), 16);
        let recorder = Recorder::default();
        rig.net
            .lock()
            .unwrap()
            .replace_output_gate(Box::new(recorder.clone()));
        let data = rig.put(&[0x11; 2048]);
        // Device-writable descriptor in TX.
        rig.drv.add_chain(1, &[(data, 100, true)]);
        // Outside guest memory, and crossing its end.
        rig.drv.add_chain(1, &[(MEM_SIZE + 0x1000, 100, false)]);
        rig.drv.add_chain(1, &[(MEM_SIZE - 50, 100, false)]);
        // Larger than any packet.
        rig.drv.add_chain(
            1,
            &[(data, 2048, false), (0, (MAX_PACKET_LEN as u32), false)],
        );
        // Only part of a header.
        rig.drv.add_chain(1, &[(data, 8, false)]);
        // A descriptor loop: table entry 15 points at itself.
        let q = &rig.drv.queues[1];
        q.write_desc(&rig.mem, 15, data, 64, 1, 15);
        let mem = rig.mem.clone();
        rig.drv.queues[1].make_available(&mem, 15);
        rig.drv.notify(1);
        let used = rig.wait_used(1, 6);
        assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
        assert_eq!(rig.counter("tx_errors"), 6);
        assert_eq!(rig.counter("tx_frames"), 0);
        assert!(recorder.0.lock().unwrap().is_empty());

        // The device still works afterwards.
        let mut good = vec![0u8; VNET_HDR_LEN];
        good.extend_from_slice(&[0x22; 60]);
        let at = rig.put(&good);
        rig.drv.add_chain(1, &[(at, good.len() as u32, false)]);
        rig.drv.notify(1);
        rig.wait_used(1, 1);
        assert_eq!(recorder.0.lock().unwrap().as_slice(), &[vec![0x22; 60]]);
    });
}

#[test]
fn reset_and_reactivate() {
    in_netns("reset_and_reactivate", || {
        let mut rig = Rig::new(net_config(), 64);
        let recorder = Recorder::default();
        rig.net
            .lock()
            .unwrap()
            .replace_output_gate(Box::new(recorder.clone()));
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend_from_slice(&[0x33; 60]);
        let at = rig.put(&pkt);

        for round in 0..3 {
            rig.drv.add_chain(1, &[(at, pkt.len() as u32, false)]);
            rig.drv.notify(1);
            rig.wait_used(1, 1);
            assert_eq!(recorder.0.lock().unwrap().len(), round + 1);
            rig.drv.reset();
            rig.poll();
            // A notification after reset is ignored, not served.
            rig.drv.notify(1);
            rig.poll();
            rig.activate(64);
        }
        // RX works after the resets too.
        let tap = rig.net.lock().unwrap().tap_name().to_string();
        add_neighbour(&tap, GUEST_IP, GUEST_MAC);
        let buf = rig.post_rx(1600);
        rig.drv.notify(0);
        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 6003)).expect("bind");
        host.send_to(b"after reset", SocketAddrV4::new(GUEST_IP, 7780))
            .expect("send");
        let used = rig.wait_used(0, 1);
        let packet = rig.read(buf, used[0].1 as usize);
        assert_eq!(
            udp_payload(&packet[VNET_HDR_LEN..], 7780),
            Some(&b"after reset"[..])
        );
    });
}

#[test]
fn invalid_configuration_is_rejected_before_any_tap_is_opened() {
    let err = Net::new(NetConfig {
        queue_size: 100,
        ..NetConfig::default()
    })
    .err()
    .expect("queue size 100");
    assert!(matches!(err, NetError::InvalidQueueSize(100)), "{err}");
    assert!(err.to_string().contains("power of two"), "{err}");

    let err = Net::new(NetConfig {
        mac: Some("01:00:5e:00:00:01".parse().unwrap()),
        ..NetConfig::default()
    })
    .err()
    .expect("multicast MAC");
    assert!(err.to_string().contains("01:00:5e:00:00:01"), "{err}");

    let err = Net::new(NetConfig {
        mtu: Some(20),
        ..NetConfig::default()
    })
    .err()
    .expect("tiny MTU");
    assert!(matches!(err, NetError::InvalidMtu(20)), "{err}");
}

// ---- random TX chains ------------------------------------------------------------------

const PROP_QUEUE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Clone, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn raw_desc() -> impl Strategy<Value = RawDesc> {
    let addr = prop_oneof![
        4 => DATA_START..MEM_SIZE - 0x2000,
        1 => MEM_SIZE - 64..MEM_SIZE + 64,
        1 => any::<u64>(),
    ];
    let len = prop_oneof![
        4 => 0u32..1600,
        1 => 30000u32..70000,
        1 => any::<u32>(),
    ];
    let flags = prop_oneof![
        6 => prop_oneof![Just(0u16), Just(F_NEXT), Just(F_WRITE), Just(F_NEXT | F_WRITE)],
        1 => any::<u16>(),
    ];
    let next = prop_oneof![4 => 0u16..PROP_QUEUE, 1 => any::<u16>()];
    (addr, len, flags, next).prop_map(|(addr, len, flags, next)| RawDesc {
        addr,
        len,
        flags,
        next,
    })
}

/// What the device must do with the chain at `head`: `Some(Some(frame))` send it,
/// `Some(None)` refuse it, `None` unknown (it reaches an indirect descriptor).
fn model(descs: &[RawDesc], head: u16, mem: &GuestMemoryMmap) -> Option<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    let mut idx = head;
    for n in 0..PROP_QUEUE {
        let Some(d) = descs.get(usize::from(idx)) else {
            return Some(None);
        };
        if d.flags & F_INDIRECT != 0 {
            return None;
        }
        if d.flags & F_WRITE != 0 {
            return Some(None);
        }
        let len = d.len as usize;
        if bytes.len() + len > MAX_PACKET_LEN {
            return Some(None);
        }
        if len > 0 {
            match d.addr.checked_add(d.len as u64) {
                Some(end) if end <= MEM_SIZE => {}
                _ => return Some(None),
            }
            let mut chunk = vec![0u8; len];
            mem.read_slice(&mut chunk, GuestAddress(d.addr)).ok()?;
            bytes.extend(chunk);
        }
        if d.flags & F_NEXT == 0 {
            if bytes.len() <= VNET_HDR_LEN {
                return Some(None);
            }
            return Some(Some(bytes[VNET_HDR_LEN..].to_vec()));
        }
        if n + 1 == PROP_QUEUE {
            break;
        }
        idx = d.next;
    }
    Some(None)
}

#[test]
fn random_tx_chains_never_crash_or_write_outside_the_used_ring() {
    in_netns(
        "random_tx_chains_never_crash_or_write_outside_the_used_ring",
        || {
            let rig = std::cell::RefCell::new(Rig::new(net_config(), PROP_QUEUE));
            let recorder = Recorder::default();
            {
                let r = rig.borrow();
                r.net
                    .lock()
                    .unwrap()
                    .replace_output_gate(Box::new(recorder.clone()));
                // Recognisable content everywhere a descriptor may point.
                let fill: Vec<u8> = (0..MEM_SIZE - DATA_START)
                    .map(|i| (i * 7 + 3) as u8)
                    .collect();
                r.mem.write_slice(&fill, GuestAddress(DATA_START)).unwrap();
            }
            let strategy = (
                proptest::collection::vec(raw_desc(), usize::from(PROP_QUEUE)),
                0..PROP_QUEUE,
            );
            let mut runner = TestRunner::new(PropConfig {
                cases: 300,
                failure_persistence: None,
                ..PropConfig::default()
            });
            let result = runner.run(&strategy, |(descs, head)| {
                let mut r = rig.borrow_mut();
                let mem = r.mem.clone();
                for (i, d) in descs.iter().enumerate() {
                    r.drv.queues[1].write_desc(&mem, i as u16, d.addr, d.len, d.flags, d.next);
                }
                r.drv.queues[1].make_available(&mem, head);
                let expected = model(&descs, head, &mem);
                let errors_before = r.counter("tx_errors");
                let frames_before = recorder.0.lock().unwrap().len();

                let mut before = vec![0u8; MEM_SIZE as usize];
                mem.read_slice(&mut before, GuestAddress(0)).unwrap();
                clear_dirty(&mem);

                r.drv.notify(1);
                let used = r.wait_used(1, 1);
                prop_assert_eq!(used[0], (u32::from(head), 0));

                // Only the used ring changed, and only its pages are dirty.
                let used_ring = r.drv.queues[1].used;
                let ring_end = used_ring + 4 + 8 * u64::from(PROP_QUEUE) + 2;
                let mut after = vec![0u8; MEM_SIZE as usize];
                mem.read_slice(&mut after, GuestAddress(0)).unwrap();
                for (i, (a, b)) in before.iter().zip(&after).enumerate() {
                    let i = i as u64;
                    if a != b {
                        prop_assert!(
                            (used_ring..ring_end).contains(&i),
                            "byte {:#x} changed outside the used ring",
                            i
                        );
                    }
                }
                for page in (0..MEM_SIZE).step_by(4096) {
                    if is_dirty(&mem, page) {
                        prop_assert!(
                            page >= used_ring & !0xfff && page < ring_end,
                            "page {:#x} dirty",
                            page
                        );
                    }
                }

                let frames = recorder.0.lock().unwrap();
                match expected {
                    Some(Some(frame)) => {
                        prop_assert_eq!(frames.len(), frames_before + 1);
                        prop_assert_eq!(frames.last(), Some(&frame));
                        prop_assert_eq!(r.counter("tx_errors"), errors_before);
                    }
                    Some(None) => {
                        prop_assert_eq!(frames.len(), frames_before);
                        prop_assert_eq!(r.counter("tx_errors"), errors_before + 1);
                    }
                    None => {
                        let sent = frames.len() - frames_before;
                        let failed = r.counter("tx_errors") - errors_before;
                        prop_assert_eq!(sent + failed as usize, 1);
                    }
                }
                Ok(())
            });
            if let Err(e) = result {
                panic!("{e}");
            }
        },
    );
}
