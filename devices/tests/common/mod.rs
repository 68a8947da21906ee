//! An in-test virtio driver: guest memory, split virtqueues laid out in it, and the virtio-pci
//! (modern) sequence a guest driver performs, all through the function's configuration space
//! and BAR (`PciDevice`), the way the VMM's guests reach its devices. The driver finds the
//! common, ISR, device and notification structures by walking the capability list, as Linux
//! does. There is no KVM: a notification write reaches the function as a BAR write, and
//! interrupts are the function's INTx eventfd (MSI-X disabled, the default) or its per-vector
//! eventfds once the driver enabled MSI-X. Shared by the device tests.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::config::{CAPABILITIES_POINTER, DEVICE_ID, STATUS as PCI_STATUS, VENDOR_ID};
use devices::pci::msix::{MsixVector, MSIX_CAPABILITY_ID, MSIX_ENTRY_SIZE};
use devices::pci::{IoEventRegistry, MsiRouter, PciDevice};
use devices::virtio::core::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use devices::virtio::pci::{
    vector_count, IntxLine, PciResources, VirtioPciDevice, BAR_INDEX, BAR_SIZE, NO_VECTOR,
    VIRTIO_PCI_VENDOR_ID,
};
use devices::virtio::VirtioDevice;
use devices::GuestMemoryMmap;
use event_manager::SubscriberOps;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// The common configuration structure's fields (virtio 1.x, 4.1.4.3), as offsets into it, and
/// the width a driver accesses each with.
pub mod common_cfg {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Bytes a driver needs in the structure (the fields above).
    pub const LEN: u64 = 0x38;

    /// The access width of the field at `offset`.
    pub fn width(offset: u64) -> usize {
        match offset {
            0x00..=0x0f => 4,
            DEVICE_STATUS | CONFIG_GENERATION => 1,
            0x10..=0x1f => 2,
            _ => 8,
        }
    }
}

/// Vendor capability types (4.1.4).
const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
/// Status register: the function has a capability list.
const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
/// Modern virtio-pci device IDs are 0x1040 + the virtio device ID (4.1.2.1).
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;

/// Guest address of the function's BAR as the VMM would assign it. The driver never uses it
/// (accesses are BAR-relative); it only fills the configuration space.
pub const BAR_ADDRESS: u64 = 0xc000_0000;
/// The INTx line the function reports.
pub const INTX_LINE: u8 = 5;
/// MSI-X message the driver programs for vector `v`: the local APIC window, data 0x30 + v.
pub const MSI_ADDRESS: u64 = 0xfee0_0000;
pub const MSI_DATA_BASE: u32 = 0x30;

/// Stands in for KVM: records the MSI routes the function asks for and the ioeventfds it
/// registers (none of which fire; notification writes reach the BAR instead).
#[derive(Default)]
pub struct FakeKvm {
    pub routes: Mutex<Vec<(u32, u64, u32)>>,
    pub ioevents: Mutex<Vec<(bool, u64)>>,
}

impl MsiRouter for FakeKvm {
    fn route(&self, gsi: u32, address: u64, data: u32) -> std::io::Result<()> {
        self.routes.lock().unwrap().push((gsi, address, data));
        Ok(())
    }
}

impl IoEventRegistry for FakeKvm {
    fn register(&self, _evt: &EventFd, address: u64) -> std::io::Result<()> {
        self.ioevents.lock().unwrap().push((true, address));
        Ok(())
    }
    fn unregister(&self, _evt: &EventFd, address: u64) -> std::io::Result<()> {
        self.ioevents.lock().unwrap().push((false, address));
        Ok(())
    }
}

/// A virtio-pci function around a device, with the host ends of its interrupts.
pub struct PciFunction {
    pub dev: Arc<Mutex<VirtioPciDevice>>,
    /// The INTx line (what KVM's irqfd would see while MSI-X is disabled).
    pub intx: EventFd,
    /// One eventfd per MSI-X vector (vector 0 first).
    pub vectors: Vec<EventFd>,
    pub kvm: Arc<FakeKvm>,
}

/// Builds a virtio-pci function around `device`, with an INTx line and one MSI-X vector per
/// queue plus one for configuration changes, as the VMM gives.
pub fn pci_function(device: Arc<Mutex<dyn VirtioDevice>>, mem: &GuestMemoryMmap) -> PciFunction {
    let queues = device.lock().unwrap().queue_max_sizes().len();
    let kvm = Arc::new(FakeKvm::default());
    let intx = EventFd::new(EFD_NONBLOCK).expect("intx eventfd");
    let mut vectors = Vec::new();
    let msix = (0..vector_count(queues))
        .map(|i| {
            let irq = EventFd::new(EFD_NONBLOCK).expect("vector eventfd");
            vectors.push(irq.try_clone().expect("vector clone"));
            MsixVector {
                gsi: 24 + i as u32,
                irq,
            }
        })
        .collect();
    let dev = VirtioPciDevice::new(
        device,
        mem.clone(),
        PciResources {
            bar_address: BAR_ADDRESS,
            intx: Some(IntxLine {
                irq: intx.try_clone().expect("intx clone"),
                // No EOIs here: nothing resamples the line.
                resample: EventFd::new(EFD_NONBLOCK).expect("resample eventfd"),
                line: INTX_LINE,
            }),
            vectors: msix,
            router: kvm.clone(),
            ioevents: kvm.clone(),
        },
    )
    .expect("virtio-pci function");
    PciFunction {
        dev: Arc::new(Mutex::new(dev)),
        intx,
        vectors,
        kvm,
    }
}

/// Builds a virtio-pci function around `device`; returns it with its INTx eventfd.
pub fn transport(
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: &GuestMemoryMmap,
) -> (Arc<Mutex<VirtioPciDevice>>, EventFd) {
    let f = pci_function(device, mem);
    (f.dev, f.intx)
}

/// Where the virtio structures are in BAR 0, as the capability list says.
#[derive(Clone, Copy, Debug)]
pub struct VirtioCaps {
    pub common: u64,
    pub isr: u64,
    pub device: u64,
    pub device_len: u64,
    pub notify: u64,
    pub notify_multiplier: u32,
    /// The MSI-X capability's offset in configuration space.
    pub msix: Option<usize>,
}

impl VirtioCaps {
    /// Walks the capability list of `dev`'s configuration space.
    pub fn find(dev: &mut dyn PciDevice) -> Self {
        let cfg8 = |dev: &mut dyn PciDevice, at: usize| {
            let mut b = [0u8; 1];
            dev.read_config(at, &mut b);
            b[0]
        };
        let cfg32 = |dev: &mut dyn PciDevice, at: usize| {
            let mut b = [0u8; 4];
            dev.read_config(at, &mut b);
            u32::from_le_bytes(b)
        };
        let mut status = [0u8; 2];
        dev.read_config(PCI_STATUS, &mut status);
        assert_ne!(
            u16::from_le_bytes(status) & PCI_STATUS_CAP_LIST,
            0,
            "no capability list"
        );
        let (mut common, mut isr, mut device, mut notify) = (None, None, None, None);
        let mut msix = None;
        let mut at = usize::from(cfg8(dev, CAPABILITIES_POINTER) & !3);
        let mut seen = 0;
        while at != 0 {
            seen += 1;
            assert!(seen < 48, "capability list loops");
            let id = cfg8(dev, at);
            if id == MSIX_CAPABILITY_ID {
                msix = Some(at);
            } else if id == CAP_VENDOR {
                let cfg_type = cfg8(dev, at + 3);
                let bar = cfg8(dev, at + 4);
                let offset = u64::from(cfg32(dev, at + 8));
                let length = u64::from(cfg32(dev, at + 12));
                // The first capability of each type is the one to use (4.1.4).
                let place = match cfg_type {
                    CAP_COMMON_CFG => &mut common,
                    CAP_NOTIFY_CFG => &mut notify,
                    CAP_ISR_CFG => &mut isr,
                    CAP_DEVICE_CFG => &mut device,
                    _ => &mut None,
                };
                if place.is_none() {
                    assert_eq!(
                        usize::from(bar),
                        BAR_INDEX,
                        "structure {cfg_type} in BAR {bar}"
                    );
                    assert!(
                        offset + length <= BAR_SIZE,
                        "structure {cfg_type} past the BAR"
                    );
                    let multiplier = (cfg_type == CAP_NOTIFY_CFG).then(|| {
                        assert!(cfg8(dev, at + 2) >= 20, "notify capability too short");
                        cfg32(dev, at + 16)
                    });
                    *place = Some((offset, length, multiplier));
                }
            }
            at = usize::from(cfg8(dev, at + 1) & !3);
        }
        let (common, common_len, _) = common.expect("common configuration capability");
        assert!(common_len >= common_cfg::LEN);
        let (isr, isr_len, _) = isr.expect("ISR capability");
        assert!(isr_len >= 1);
        let (device, device_len, _) = device.expect("device configuration capability");
        let (notify, _, multiplier) = notify.expect("notification capability");
        Self {
            common,
            isr,
            device,
            device_len,
            notify,
            notify_multiplier: multiplier.unwrap_or(0),
            msix,
        }
    }
}

/// A virtio driver talking to one virtio-pci function through its configuration space and BAR.
pub struct Driver {
    pub dev: Arc<Mutex<VirtioPciDevice>>,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<DriverQueue>,
    /// The interrupt line the driver listens on: the function's INTx (what KVM's irqfd would
    /// see) while MSI-X is disabled.
    pub irq: EventFd,
    pub caps: VirtioCaps,
    /// MSI-X enabled by `enable_msix`: configuration changes use vector 0, queue `i` vector
    /// `i + 1`.
    msix: bool,
}

impl Driver {
    /// A driver for the function `dev`; checks its identity and finds its structures.
    pub fn new(dev: Arc<Mutex<VirtioPciDevice>>, mem: GuestMemoryMmap, irq: EventFd) -> Self {
        let caps = {
            let mut d = dev.lock().unwrap();
            let device_type = d.device().lock().unwrap().device_type();
            let mut id = [0u8; 2];
            d.read_config(VENDOR_ID, &mut id);
            assert_eq!(u16::from_le_bytes(id), VIRTIO_PCI_VENDOR_ID);
            d.read_config(DEVICE_ID, &mut id);
            assert_eq!(
                u16::from_le_bytes(id),
                VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16
            );
            VirtioCaps::find(&mut *d)
        };
        Self {
            dev,
            mem,
            queues: Vec::new(),
            irq,
            caps,
            msix: false,
        }
    }

    /// A read of `data.len()` bytes at `offset` in BAR 0.
    pub fn read_bar(&self, offset: u64, data: &mut [u8]) {
        self.dev.lock().unwrap().read_bar(BAR_INDEX, offset, data);
    }

    pub fn write_bar(&self, offset: u64, data: &[u8]) {
        self.dev.lock().unwrap().write_bar(BAR_INDEX, offset, data);
    }

    /// Reads the common configuration field at `field` (a `common_cfg` offset) at its width.
    pub fn common_read(&self, field: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read_bar(self.caps.common + field, &mut b[..common_cfg::width(field)]);
        u64::from_le_bytes(b)
    }

    /// Writes the common configuration field at `field` at its width; the 64-bit queue
    /// addresses as two 32-bit halves, low first, as Linux does.
    pub fn common_write(&self, field: u64, value: u64) {
        let at = self.caps.common + field;
        match common_cfg::width(field) {
            8 => {
                self.write_bar(at, &(value as u32).to_le_bytes());
                self.write_bar(at + 4, &((value >> 32) as u32).to_le_bytes());
            }
            n => self.write_bar(at, &value.to_le_bytes()[..n]),
        }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.common_read(common_cfg::DEVICE_STATUS) as u32
    }

    pub fn set_status(&self, status: u32) {
        self.common_write(common_cfg::DEVICE_STATUS, u64::from(status));
    }

    /// Reads the ISR (which clears it).
    pub fn read_isr(&self) -> u32 {
        let mut b = [0u8; 1];
        self.read_bar(self.caps.isr, &mut b);
        u32::from(b[0])
    }

    /// Reads the device-specific configuration at `offset`.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        assert!(offset + data.len() as u64 <= self.caps.device_len);
        self.read_bar(self.caps.device + offset, data);
    }

    pub fn write_config(&self, offset: u64, data: &[u8]) {
        assert!(offset + data.len() as u64 <= self.caps.device_len);
        self.write_bar(self.caps.device + offset, data);
    }

    pub fn device_features(&self) -> u64 {
        self.common_write(common_cfg::DEVICE_FEATURE_SELECT, 0);
        let low = self.common_read(common_cfg::DEVICE_FEATURE);
        self.common_write(common_cfg::DEVICE_FEATURE_SELECT, 1);
        let high = self.common_read(common_cfg::DEVICE_FEATURE);
        low | (high << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, write `features`, FEATURES_OK; returns whether the device
    /// accepted the features.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.reset();
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.common_write(common_cfg::DRIVER_FEATURE_SELECT, 0);
        self.common_write(common_cfg::DRIVER_FEATURE, features & 0xffff_ffff);
        self.common_write(common_cfg::DRIVER_FEATURE_SELECT, 1);
        self.common_write(common_cfg::DRIVER_FEATURE, features >> 32);
        let want = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(want);
        self.status() == want
    }

    /// Lays queue `index` out at guest address `base` with `size` entries and enables it.
    pub fn setup_queue(&mut self, index: u32, size: u16, base: u64) -> bool {
        let (desc, avail, used) = DriverQueue::layout(base, size);
        // Clean rings: the avail and used indexes start at 0.
        let zeros = vec![0u8; DriverQueue::footprint(size) as usize];
        self.mem
            .write_slice(&zeros, GuestAddress(base))
            .expect("queue memory");
        self.common_write(common_cfg::QUEUE_SELECT, u64::from(index));
        // After reset the size reads as the queue's maximum.
        let max = self.common_read(common_cfg::QUEUE_SIZE);
        assert!(u64::from(size) <= max, "queue {index}: size {size} > {max}");
        self.common_write(common_cfg::QUEUE_SIZE, u64::from(size));
        if self.msix {
            let vector = u64::from(index) + 1;
            self.common_write(common_cfg::QUEUE_MSIX_VECTOR, vector);
            assert_eq!(self.common_read(common_cfg::QUEUE_MSIX_VECTOR), vector);
        }
        self.common_write(common_cfg::QUEUE_DESC, desc);
        self.common_write(common_cfg::QUEUE_DRIVER, avail);
        self.common_write(common_cfg::QUEUE_DEVICE, used);
        let notify_off = self.common_read(common_cfg::QUEUE_NOTIFY_OFF) as u16;
        self.common_write(common_cfg::QUEUE_ENABLE, 1);
        let ready = self.common_read(common_cfg::QUEUE_ENABLE) == 1;
        self.queues.push(DriverQueue {
            index,
            size,
            desc,
            avail,
            used,
            notify_off,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        });
        ready
    }

    /// Sets DRIVER_OK; returns whether the device is live (no NEEDS_RESET).
    pub fn driver_ok(&self) -> bool {
        let want = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.set_status(want);
        self.status() == want
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

    /// Writes 0 to the device status and waits for it to read 0 (4.1.4.3.1).
    pub fn reset(&mut self) {
        self.set_status(0);
        assert_eq!(self.status(), 0, "reset did not complete");
        self.queues.clear();
    }

    /// Enables MSI-X: every table entry programmed (vector `v` with data `MSI_DATA_BASE + v`)
    /// and unmasked, the enable bit set, configuration changes on vector 0; the queues set up
    /// from now on use vector `index + 1`. Interrupts then arrive on the function's vector
    /// eventfds, no longer on `irq`.
    pub fn enable_msix(&mut self) {
        let cap = self.caps.msix.expect("MSI-X capability");
        let mut d = self.dev.lock().unwrap();
        let mut b = [0u8; 4];
        d.read_config(cap, &mut b);
        let control = u16::from_le_bytes([b[2], b[3]]);
        let vectors = u64::from(control & 0x7ff) + 1;
        d.read_config(cap + 4, &mut b);
        let table = u32::from_le_bytes(b);
        assert_eq!((table & 7) as usize, BAR_INDEX);
        let table = u64::from(table & !7);
        for v in 0..vectors {
            let entry = table + v * MSIX_ENTRY_SIZE;
            d.write_bar(BAR_INDEX, entry, &(MSI_ADDRESS as u32).to_le_bytes());
            d.write_bar(BAR_INDEX, entry + 4, &0u32.to_le_bytes());
            d.write_bar(
                BAR_INDEX,
                entry + 8,
                &(MSI_DATA_BASE + v as u32).to_le_bytes(),
            );
            d.write_bar(BAR_INDEX, entry + 12, &0u32.to_le_bytes());
        }
        d.write_config(cap + 2, &(control | 1 << 15).to_le_bytes());
        drop(d);
        self.common_write(common_cfg::MSIX_CONFIG, 0);
        assert_eq!(self.common_read(common_cfg::MSIX_CONFIG), 0);
        self.msix = true;
    }

    /// Disables MSI-X again (interrupts back on INTx and the ISR).
    pub fn disable_msix(&mut self) {
        let cap = self.caps.msix.expect("MSI-X capability");
        let mut d = self.dev.lock().unwrap();
        let mut b = [0u8; 2];
        d.read_config(cap + 2, &mut b);
        let control = u16::from_le_bytes(b) & !(1 << 15);
        d.write_config(cap + 2, &control.to_le_bytes());
        drop(d);
        self.common_write(common_cfg::MSIX_CONFIG, u64::from(NO_VECTOR));
        self.msix = false;
    }

    /// Notifies `queue` as a guest would: a write of its index at its notify address (an
    /// MMIO exit, with no ioeventfd registered here).
    pub fn notify(&self, queue: u32) {
        let notify_off = match self.queues.iter().find(|q| q.index == queue) {
            Some(q) => u64::from(q.notify_off),
            None => {
                self.common_write(common_cfg::QUEUE_SELECT, u64::from(queue));
                self.common_read(common_cfg::QUEUE_NOTIFY_OFF)
            }
        };
        let at = self.caps.notify + notify_off * u64::from(self.caps.notify_multiplier);
        self.write_bar(at, &(queue as u16).to_le_bytes());
    }

    pub fn add_chain(&mut self, queue: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let mem = self.mem.clone();
        self.queues[queue].add_chain(&mem, bufs)
    }

    pub fn take_used(&mut self, queue: usize) -> Vec<(u32, u32)> {
        let mem = self.mem.clone();
        self.queues[queue].take_used(&mem)
    }

    /// Takes the pending interrupt as an INTx handler does: reads the ISR (which acknowledges
    /// it) and drains the line; returns the ISR seen.
    pub fn ack_interrupt(&self) -> u32 {
        let isr = self.read_isr();
        let _ = self.irq.read();
        isr
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
    /// The queue's `queue_notify_off`, read at setup.
    pub notify_off: u16,
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

/// A device behind a virtio-pci function, a driver for it and the device event loop, all in
/// the test thread: the event loop runs only while the test waits for used buffers.
pub struct Harness {
    pub em: DeviceEventManager,
    pub driver: Driver,
    /// The function's MSI-X vector eventfds (vector 0 first), for a driver that enables MSI-X.
    pub vectors: Vec<EventFd>,
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
        let f = pci_function(device, &mem);
        let end = mem.last_addr().0 + 1;
        Self {
            em,
            driver: Driver::new(f.dev, mem, f.intx),
            vectors: f.vectors,
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
        let f = pci_function(device, &mem);
        Self {
            em,
            driver: Driver::new(f.dev, mem, f.intx),
            vectors: f.vectors,
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
