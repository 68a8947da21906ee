//! An in-test virtio driver: guest memory, split virtqueues laid out in it, and the virtio-mmio
//! register sequence a guest driver performs, all through the transport's `BusDevice`
//! interface. Shared by the block and net device tests.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::mmio::*;
use devices::virtio::VirtioDevice;
use devices::{BusDevice, GuestMemoryMmap};
use event_manager::SubscriberOps;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Guest memory of `size` bytes at guest address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// Whether the device-write dirty bitmap has the page of `addr` marked.
pub fn is_dirty(mem: &GuestMemoryMmap, addr: u64) -> bool {
    let region = mem
        .find_region(GuestAddress(addr))
        .expect("address in memory");
    let offset = addr - region.start_addr().0;
    region.get_mmap().bitmap().dirty_at(offset as usize)
}

/// Clears the dirty bitmap of every region (as an epoch harvest would).
pub fn clear_dirty(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        region.get_mmap().bitmap().reset();
    }
}

/// One split virtqueue in guest memory, driven from the driver side.
pub struct DriverQueue {
    pub index: u32,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// Bytes a queue of `size` needs from its base (descriptor table, avail ring, used ring,
    /// each at an aligned offset).
    pub fn footprint(size: u16) -> u64 {
        let (_, _, used) = Self::layout(0, size);
        used + 6 + 8 * u64::from(size)
    }

    fn layout(base: u64, size: u16) -> (u64, u64, u64) {
        let size = u64::from(size);
        let desc = base;
        let avail = desc + 16 * size;
        let used = (avail + 6 + 2 * size + 3) & !3;
        (desc, avail, used)
    }

    /// Writes a descriptor at table index `i`.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).expect("descriptor write");
    }

    /// Adds a chain of `(addr, len, device_writable)` buffers using consecutive free
    /// descriptors and makes it available; returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        assert!(!bufs.is_empty() && bufs.len() <= usize::from(self.size));
        let head = self.next_desc;
        let mut idx = head;
        for (n, &(addr, len, write)) in bufs.iter().enumerate() {
            let next = (idx + 1) % self.size;
            let mut flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
            if n + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(mem, idx, addr, len, flags, next);
            idx = next;
        }
        self.next_desc = idx;
        self.make_available(mem, head);
        head
    }

    /// Puts descriptor `head` into the avail ring and publishes the new avail index.
    pub fn make_available(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail ring write");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail idx write");
    }

    /// Used ring entries `(id, len)` added since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != used_idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = self.used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The avail ring flags word (set 1 = VIRTQ_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, mem: &GuestMemoryMmap, flags: u16) {
        mem.write_obj(flags, GuestAddress(self.avail))
            .expect("avail flags");
    }
}

/// A virtio driver talking to one device through an MMIO transport's registers.
pub struct Driver<B: BusDevice> {
    pub bus: Arc<Mutex<B>>,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<DriverQueue>,
    /// The transport's interrupt line (what KVM's irqfd would see).
    pub irq: EventFd,
}

/// Builds a transport around `device` with a fresh interrupt eventfd.
pub fn transport(
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: &GuestMemoryMmap,
) -> (Arc<Mutex<MmioTransport>>, EventFd) {
    let irq = EventFd::new(EFD_NONBLOCK).expect("irq eventfd");
    let t = MmioTransport::new(device, mem.clone(), irq.try_clone().expect("irq clone"))
        .expect("transport");
    (Arc::new(Mutex::new(t)), irq)
}

impl<B: BusDevice> Driver<B> {
    pub fn new(bus: Arc<Mutex<B>>, mem: GuestMemoryMmap, irq: EventFd) -> Self {
        Self {
            bus,
            mem,
            queues: Vec::new(),
            irq,
        }
    }

    pub fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.bus.lock().unwrap().read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(&self, offset: u64, value: u32) {
        self.bus.lock().unwrap().write(offset, &value.to_le_bytes());
    }

    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.bus.lock().unwrap().read(REG_CONFIG + offset, data);
    }

    pub fn device_features(&self) -> u64 {
        self.write32(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read32(REG_DEVICE_FEATURES);
        self.write32(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read32(REG_DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, write `features`, FEATURES_OK; returns whether the device
    /// accepted the features.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write32(REG_STATUS, 0);
        self.queues.clear();
        assert_eq!(self.read32(REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(self.read32(REG_VERSION), MMIO_VERSION);
        self.write32(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write32(REG_DRIVER_FEATURES_SEL, 0);
        self.write32(REG_DRIVER_FEATURES, features as u32);
        self.write32(REG_DRIVER_FEATURES_SEL, 1);
        self.write32(REG_DRIVER_FEATURES, (features >> 32) as u32);
        let want = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write32(REG_STATUS, want);
        self.read32(REG_STATUS) == want
    }

    /// Lays queue `index` out at guest address `base` with `size` entries and sets it ready.
    pub fn setup_queue(&mut self, index: u32, size: u16, base: u64) -> bool {
        let (desc, avail, used) = DriverQueue::layout(base, size);
        // Clean rings: the avail and used indexes start at 0.
        let zeros = vec![0u8; DriverQueue::footprint(size) as usize];
        self.mem
            .write_slice(&zeros, GuestAddress(base))
            .expect("queue memory");
        self.write32(REG_QUEUE_SEL, index);
        assert!(u32::from(size) <= self.read32(REG_QUEUE_NUM_MAX));
        self.write32(REG_QUEUE_NUM, u32::from(size));
        self.write32(REG_QUEUE_DESC_LOW, desc as u32);
        self.write32(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write32(REG_QUEUE_DRIVER_LOW, avail as u32);
        self.write32(REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write32(REG_QUEUE_DEVICE_LOW, used as u32);
        self.write32(REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.write32(REG_QUEUE_READY, 1);
        let ready = self.read32(REG_QUEUE_READY) == 1;
        self.queues.push(DriverQueue {
            index,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        });
        ready
    }

    /// Sets DRIVER_OK; returns whether the device is live (no NEEDS_RESET).
    pub fn driver_ok(&self) -> bool {
        let want = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.write32(REG_STATUS, want);
        self.read32(REG_STATUS) == want
    }

    /// Negotiate, set up `sizes.len()` queues at `base` (one after another), DRIVER_OK.
    pub fn init(&mut self, features: u64, sizes: &[u16], base: u64) -> bool {
        if !self.negotiate(features) {
            return false;
        }
        let mut at = base;
        for (i, &size) in sizes.iter().enumerate() {
            if !self.setup_queue(i as u32, size, at) {
                return false;
            }
            at += (DriverQueue::footprint(size) + 0xfff) & !0xfff;
        }
        self.driver_ok()
    }

    pub fn reset(&mut self) {
        self.write32(REG_STATUS, 0);
        self.queues.clear();
    }

    /// Writes QueueNotify as a guest would (an MMIO exit without ioeventfd).
    pub fn notify(&self, queue: u32) {
        self.write32(REG_QUEUE_NOTIFY, queue);
    }

    pub fn add_chain(&mut self, queue: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let mem = self.mem.clone();
        self.queues[queue].add_chain(&mem, bufs)
    }

    pub fn take_used(&mut self, queue: usize) -> Vec<(u32, u32)> {
        let mem = self.mem.clone();
        self.queues[queue].take_used(&mem)
    }

    /// Acknowledges all pending interrupt causes; returns the InterruptStatus seen.
    pub fn ack_interrupt(&self) -> u32 {
        let status = self.read32(REG_INTERRUPT_STATUS);
        self.write32(REG_INTERRUPT_ACK, status);
        let _ = self.irq.read();
        status
    }

    /// Runs `poll` (one event loop iteration) until `n` used entries arrived on `queue` or
    /// `timeout` passed; returns what arrived.
    pub fn wait_used(
        &mut self,
        queue: usize,
        n: usize,
        timeout: Duration,
        mut poll: impl FnMut(),
    ) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            got.extend(self.take_used(queue));
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            poll();
        }
    }
}

/// Runs `f` on a thread inside a new network namespace; false (with a SKIP line on stderr) when
/// that is not possible here (no root or no /dev/net/tun).
pub fn in_netns<F: FnOnce() + Send + 'static>(test: &str, f: F) -> bool {
    use std::io::Write as _;
    let handle = std::thread::spawn(move || {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return false;
        }
        // SAFETY: unshare(2) with CLONE_NEWNET only changes this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return false;
        }
        // No IPv6 on new interfaces: no router solicitations appear next to expected frames.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        f();
        true
    });
    match handle.join() {
        Ok(true) => true,
        Ok(false) => {
            if std::env::var("TANDEM_REQUIRE_TAP").as_deref() == Ok("1") {
                panic!("{test}: needs root and /dev/net/tun, and TANDEM_REQUIRE_TAP=1 forbids skipping");
            }
            // One write straight to stderr, past the harness's capture, so the skip shows.
            let line =
                format!("SKIP: {test}: needs root and /dev/net/tun - this test did NOT run\n");
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            false
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A bump allocator for driver buffers in guest memory.
pub struct Alloc {
    next: u64,
    end: u64,
}

impl Alloc {
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    /// `len` bytes aligned to `align` (a power of two).
    pub fn take(&mut self, len: u64, align: u64) -> u64 {
        let at = (self.next + align - 1) & !(align - 1);
        assert!(at + len <= self.end, "test guest memory exhausted");
        self.next = at + len;
        at
    }
}

/// Guest address where `Harness` lays out its queues (one page-aligned block per queue).
pub const QUEUE_BASE: u64 = 0x1_0000;
/// Guest address from which `Harness::alloc` hands out buffers.
pub const BUFFER_BASE: u64 = 0x10_0000;

/// The device event loop as the VMM runs it.
pub type DeviceEventManager =
    event_manager::EventManager<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>;

/// A device behind a transport, a driver for it and the device event loop, all in the test
/// thread: the event loop runs only while the test waits for used buffers.
pub struct Harness {
    pub em: DeviceEventManager,
    pub driver: Driver<MmioTransport>,
    pub alloc: Alloc,
}

impl Harness {
    /// A harness on existing guest memory (a restored device sees the guest's memory as it was).
    pub fn with_memory<D>(device: Arc<Mutex<D>>, mem: GuestMemoryMmap) -> Self
    where
        D: VirtioDevice + event_manager::MutEventSubscriber + Send + 'static,
    {
        let mut em = DeviceEventManager::new().expect("event manager");
        em.add_subscriber(device.clone());
        let (bus, irq) = transport(device, &mem);
        let end = mem.last_addr().0 + 1;
        Self {
            em,
            driver: Driver::new(bus, mem, irq),
            alloc: Alloc::new(BUFFER_BASE, end),
        }
    }

    /// `mem_size` bytes of guest memory (at least 2 MiB: queues below 1 MiB, buffers above).
    pub fn new<D>(device: Arc<Mutex<D>>, mem_size: usize) -> Self
    where
        D: VirtioDevice + event_manager::MutEventSubscriber + Send + 'static,
    {
        let mem = guest_memory(mem_size);
        let mut em = DeviceEventManager::new().expect("event manager");
        em.add_subscriber(device.clone());
        let (bus, irq) = transport(device, &mem);
        Self {
            em,
            driver: Driver::new(bus, mem, irq),
            alloc: Alloc::new(BUFFER_BASE, mem_size as u64),
        }
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.driver.mem
    }

    /// Negotiates `features`, sets up queues of `sizes` at `QUEUE_BASE`, DRIVER_OK, and lets
    /// the event loop see the activation.
    pub fn activate(&mut self, features: u64, sizes: &[u16]) -> bool {
        let ok = self.driver.init(features, sizes, QUEUE_BASE);
        self.poll(10);
        ok
    }

    /// One event loop iteration, waiting at most `ms` milliseconds.
    pub fn poll(&mut self, ms: i32) {
        self.em.run_with_timeout(ms).expect("event loop");
    }

    /// Notifies `queue` and runs the event loop until `n` used entries arrived (5 s at most).
    pub fn kick_and_wait(&mut self, queue: usize, n: usize) -> Vec<(u32, u32)> {
        self.driver.notify(self.driver.queues[queue].index);
        let em = &mut self.em;
        self.driver.wait_used(queue, n, Duration::from_secs(5), || {
            em.run_with_timeout(50).expect("event loop");
        })
    }

    /// Allocates a buffer holding `data`.
    pub fn buffer_with(&mut self, data: &[u8]) -> u64 {
        let at = self.alloc.take(data.len() as u64, 16);
        self.driver
            .mem
            .write_slice(data, GuestAddress(at))
            .expect("buffer write");
        at
    }

    /// Allocates a zeroed buffer of `len` bytes.
    pub fn buffer(&mut self, len: usize) -> u64 {
        self.buffer_with(&vec![0u8; len])
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.driver
            .mem
            .read_slice(&mut out, GuestAddress(addr))
            .expect("buffer read");
        out
    }
}
