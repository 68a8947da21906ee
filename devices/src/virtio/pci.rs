//! The virtio-pci transport, modern only (virtio 1.x, 4.1 "Virtio Over PCI Bus"), as Cloud
//! Hypervisor offers it: vendor 0x1af4, device 0x1040 + the virtio device ID, one 64-bit memory
//! BAR holding the common configuration, ISR, device configuration and notification structures
//! and the MSI-X table, each announced by a vendor capability.
//!
//! Interrupts go through MSI-X when the driver enabled it (one vector per queue or shared, as the
//! driver programs `queue_msix_vector`), else through the function's INTx line with the ISR.
//! Queue notifications are KVM ioeventfds at each queue's notify address, moved with the BAR.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::core::{
    lock, Ring, TransportError, VirtioCore, VirtioCoreState, Warn, INTERRUPT_CONFIG_CHANGE,
    INTERRUPT_USED_BUFFER,
};
use super::{InterruptKind, VirtioDevice, VirtioInterrupt};
use crate::pci::config::{self, BarSpec, PciConfigState, PciConfiguration, PciIdentity};
use crate::pci::msix::{self, Msix, MsixState, MsixVector};
use crate::pci::{IoEventRegistry, MsiRouter, PciDevice};
use crate::state::RestoreError;
use crate::GuestMemoryMmap;

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Modern devices have revision 1 and a subsystem ID of at least 0x40 (4.1.2.1).
const VIRTIO_PCI_REVISION: u8 = 1;
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
/// "No vector" for `msix_config` / `queue_msix_vector` (4.1.4.3).
pub const NO_VECTOR: u16 = 0xffff;

/// The BAR every virtio function has, and its layout.
pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const ISR_SIZE: u64 = 4;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_SIZE: u64 = 0x1000;
/// Each queue notifies at its own address: queue `i` at `NOTIFY_OFFSET + 4 * i`.
const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
/// At most this many vectors fit the table area (more queues share vectors, which the driver
/// arranges).
pub const MAX_VECTORS: usize = 256;

/// Vendor capability types (4.1.4).
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_VENDOR: u8 = 0x09;

/// Common configuration registers (4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// PCI class codes by virtio device type, as Cloud Hypervisor reports them.
fn class_code(device_type: u32) -> u32 {
    match device_type {
        super::VIRTIO_ID_NET => 0x02_0000,
        super::VIRTIO_ID_BLOCK => 0x01_8000,
        // virtio-console: simple communication controller, other.
        3 => 0x07_8000,
        _ => 0xff_0000,
    }
}

/// Which vector each interrupt source uses, as the driver programmed it. Shared with the
/// interrupt handle so the device loop never takes the transport's lock.
struct Vectors {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
}

/// The interrupt handle given to the device.
pub struct PciInterrupt {
    msix: Arc<Mutex<Msix>>,
    vectors: Arc<Vectors>,
    isr: Arc<AtomicU32>,
    intx: Option<EventFd>,
    /// The command register's Interrupt Disable bit: a driver that polls (or uses MSI-X) sets
    /// it, and then the function must not assert INTx (PCI 3.0, 6.2.2).
    intx_disabled: Arc<AtomicBool>,
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let (bit, vector) = match kind {
            InterruptKind::Queue(i) => (
                INTERRUPT_USED_BUFFER,
                self.vectors
                    .queues
                    .get(usize::from(i))
                    .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst)),
            ),
            InterruptKind::Config => (
                INTERRUPT_CONFIG_CHANGE,
                self.vectors.config.load(Ordering::SeqCst),
            ),
        };
        let mut msix = lock(&self.msix);
        if msix.enabled() {
            // The config-change bit is set in both modes (4.1.5.3); queue interrupts through
            // MSI-X leave the ISR alone.
            if bit == INTERRUPT_CONFIG_CHANGE {
                self.isr.fetch_or(bit, Ordering::SeqCst);
            }
            if vector == NO_VECTOR {
                return Ok(());
            }
            return msix.trigger(vector);
        }
        drop(msix);
        self.isr.fetch_or(bit, Ordering::SeqCst);
        match &self.intx {
            Some(irq) if !self.intx_disabled.load(Ordering::SeqCst) => irq.write(1),
            _ => Ok(()),
        }
    }

    /// The queue's MSI-X irqfd while MSI-X is on and the queue has a vector. Writes to it
    /// bypass the vector's mask bit (the pending bit is not set): a masked vector's interrupt
    /// arrives at once instead of at the unmask, which a driver tolerates as an early (not a
    /// lost) interrupt.
    fn notifier(&self, kind: InterruptKind) -> Option<EventFd> {
        let InterruptKind::Queue(i) = kind else {
            return None;
        };
        let vector = self
            .vectors
            .queues
            .get(usize::from(i))?
            .load(Ordering::SeqCst);
        let msix = lock(&self.msix);
        if !msix.enabled() || vector == NO_VECTOR {
            return None;
        }
        msix.irqfd(vector)?.try_clone().ok()
    }
}

/// The transport's saved state: the virtio registers and queues, the configuration space (BARs,
/// command, MSI-X control), the MSI-X table and which vector each source uses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PciTransportState {
    pub virtio: VirtioCoreState,
    pub config_space: PciConfigState,
    pub msix: MsixState,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}

/// A function's INTx line: the irqfd's eventfd, registered with `resample` so KVM keeps the line
/// asserted until the guest's EOI (a level-triggered PCI interrupt), and the IOAPIC line number
/// the interrupt line register reports.
pub struct IntxLine {
    pub irq: EventFd,
    pub resample: EventFd,
    pub line: u8,
}

/// After the guest's EOI of an INTx interrupt KVM de-asserts the line and signals `resample`;
/// while the ISR still has bits the guest has not read (an interrupt raised while the line was
/// in service), the line is asserted again, as a device holding INTx# low would keep it.
pub struct IntxResampler {
    resample: EventFd,
    irq: EventFd,
    isr: Arc<AtomicU32>,
    msix: Arc<Mutex<Msix>>,
    intx_disabled: Arc<AtomicBool>,
}

impl MutEventSubscriber for IntxResampler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.resample.read();
        if self.isr.load(Ordering::SeqCst) != 0
            && !self.intx_disabled.load(Ordering::SeqCst)
            && !lock(&self.msix).enabled()
        {
            if let Err(e) = self.irq.write(1) {
                log::warn!("virtio-pci: cannot re-assert INTx: {e}");
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.resample, EventSet::IN)) {
            log::error!("virtio-pci: cannot watch the INTx resample eventfd: {e}");
        }
    }
}

/// What the VMM gives a virtio function: where its BAR starts, its INTx line (`None`: MSI-X
/// only), one irqfd per MSI-X vector, and its hooks into KVM.
pub struct PciResources {
    pub bar_address: u64,
    pub intx: Option<IntxLine>,
    pub vectors: Vec<MsixVector>,
    pub router: Arc<dyn MsiRouter>,
    pub ioevents: Arc<dyn IoEventRegistry>,
}

/// How many MSI-X vectors a device with `queues` queues gets: one per queue and one for
/// configuration changes, as Cloud Hypervisor gives.
pub fn vector_count(queues: usize) -> usize {
    (queues + 1).min(MAX_VECTORS)
}

pub struct VirtioPciDevice {
    core: VirtioCore,
    config: PciConfiguration,
    msix: Arc<Mutex<Msix>>,
    msix_cap: usize,
    vectors: Arc<Vectors>,
    isr: Arc<AtomicU32>,
    intx: Option<EventFd>,
    intx_disabled: Arc<AtomicBool>,
    ioevents: Arc<dyn IoEventRegistry>,
    /// Where the notification ioeventfds are registered now (the BAR's decode address).
    notify_base: Option<u64>,
    /// Handed to the device loop once ([`VirtioPciDevice::take_intx_resampler`]).
    resampler: Option<IntxResampler>,
}

impl VirtioPciDevice {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        resources: PciResources,
    ) -> Result<Self, PciTransportError> {
        let (device_type, queue_count) = {
            let d = lock(&device);
            (d.device_type(), d.queue_max_sizes().len())
        };
        let vectors = Arc::new(Vectors {
            config: AtomicU16::new(NO_VECTOR),
            queues: (0..queue_count)
                .map(|_| AtomicU16::new(NO_VECTOR))
                .collect(),
        });
        let vector_total = resources.vectors.len();
        if vector_total == 0 || vector_total > MAX_VECTORS {
            return Err(PciTransportError::Vectors(vector_total));
        }
        let msix = Arc::new(Mutex::new(Msix::new(resources.vectors, resources.router)));
        let isr = Arc::new(AtomicU32::new(0));
        let intx_disabled = Arc::new(AtomicBool::new(false));
        let clone = |e: &EventFd| e.try_clone().map_err(TransportError::IrqClone);
        let (intx, line, resampler) = match resources.intx {
            Some(IntxLine {
                irq,
                resample,
                line,
            }) => {
                let resampler = IntxResampler {
                    resample,
                    irq: clone(&irq)?,
                    isr: isr.clone(),
                    msix: msix.clone(),
                    intx_disabled: intx_disabled.clone(),
                };
                (Some(irq), Some(line), Some(resampler))
            }
            None => (None, None, None),
        };
        let interrupt = Arc::new(PciInterrupt {
            msix: msix.clone(),
            vectors: vectors.clone(),
            isr: isr.clone(),
            intx: intx.as_ref().map(clone).transpose()?,
            intx_disabled: intx_disabled.clone(),
        });
        let core = VirtioCore::new("virtio-pci", device, mem, isr.clone(), interrupt)?;

        let mut config = PciConfiguration::new(
            PciIdentity {
                vendor_id: VIRTIO_PCI_VENDOR_ID,
                device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
                revision: VIRTIO_PCI_REVISION,
                class_code: class_code(device_type),
                subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
                subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            },
            u8::from(line.is_some()),
        );
        if let Some(line) = line {
            config.write(config::INTERRUPT_LINE, &[line]);
        }
        config.add_bar(
            BarSpec {
                index: BAR_INDEX,
                size: BAR_SIZE,
                is_64bit: true,
            },
            resources.bar_address,
        )?;
        let (body, writable) = msix::capability(
            vector_total as u16,
            BAR_INDEX as u8,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(&body, &writable)?;
        for (cfg_type, offset, length) in [
            (CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE),
            (CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE),
            (CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE),
        ] {
            config.add_capability(&virtio_cap(cfg_type, offset, length, None), &[])?;
        }
        config.add_capability(
            &virtio_cap(
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            &[],
        )?;
        Ok(Self {
            core,
            config,
            msix,
            msix_cap,
            vectors,
            isr,
            intx,
            intx_disabled,
            ioevents: resources.ioevents,
            notify_base: None,
            resampler,
        })
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        self.core.device()
    }

    pub fn is_activated(&self) -> bool {
        self.core.is_activated()
    }

    /// The INTx resampler, for the device loop (`None` after the first call, or without INTx).
    pub fn take_intx_resampler(&mut self) -> Option<IntxResampler> {
        self.resampler.take()
    }

    pub fn state(&self) -> PciTransportState {
        PciTransportState {
            virtio: self.core.state(),
            config_space: self.config.state(),
            msix: lock(&self.msix).state(),
            config_vector: self.vectors.config.load(Ordering::SeqCst),
            queue_vectors: self
                .vectors
                .queues
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
        }
    }

    /// Loads `state` into this function, built for the same device from the same configuration,
    /// before any vCPU runs: configuration space (the bus then moves the notification
    /// ioeventfds to where the BAR decodes, see `PciBus::refresh_decode`), MSI-X table and
    /// routes, vectors, then the virtio registers and queues. Pending interrupts are raised
    /// again.
    pub fn restore(&mut self, state: &PciTransportState) -> Result<(), RestoreError> {
        let device_type = self.core.device_type();
        let inconsistent = |reason: String| RestoreError::Inconsistent {
            device_type,
            reason,
        };
        if state.queue_vectors.len() != self.vectors.queues.len() {
            return Err(inconsistent(format!(
                "the device has {} queues but the snapshot has {} queue vectors",
                self.vectors.queues.len(),
                state.queue_vectors.len()
            )));
        }
        self.config
            .restore(&state.config_space)
            .map_err(inconsistent)?;
        let (enabled, masked) = msix::control_bits(self.config.get16(self.msix_cap + 2));
        lock(&self.msix)
            .restore(&state.msix, enabled, masked)
            .map_err(inconsistent)?;
        self.vectors
            .config
            .store(state.config_vector, Ordering::SeqCst);
        for (v, saved) in self.vectors.queues.iter().zip(&state.queue_vectors) {
            v.store(*saved, Ordering::SeqCst);
        }
        self.core.restore(&state.virtio)?;
        let mut msix = lock(&self.msix);
        if msix.enabled() {
            msix.kick_all();
        } else if state.virtio.interrupt_status != 0 && !self.intx_disabled.load(Ordering::SeqCst) {
            if let Some(irq) = &self.intx {
                irq.write(1).map_err(RestoreError::Interrupt)?;
            }
        }
        Ok(())
    }

    /// The value of the common-configuration field starting at `field`.
    fn common_field(&self, field: u64) -> u64 {
        let core = &self.core;
        let queue = core.selected();
        let sel = usize::from(core.queue_sel() as u16);
        match field {
            DEVICE_FEATURE => core.device_features_word().into(),
            DRIVER_FEATURE => core.driver_features_word().into(),
            MSIX_CONFIG => self.vectors.config.load(Ordering::SeqCst).into(),
            NUM_QUEUES => core.queue_count() as u64,
            DEVICE_STATUS => core.status().into(),
            CONFIG_GENERATION => core.config_generation().into(),
            QUEUE_SELECT => core.queue_sel().into(),
            QUEUE_SIZE => queue.map_or(0, |q| q.size().into()),
            QUEUE_MSIX_VECTOR => self
                .vectors
                .queues
                .get(sel)
                .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
                .into(),
            QUEUE_ENABLE => queue.map_or(0, |q| q.ready().into()),
            QUEUE_NOTIFY_OFF => queue.map_or(0, |_| sel as u64),
            QUEUE_DESC => queue.map_or(0, |q| q.desc_table()),
            QUEUE_DRIVER => queue.map_or(0, |q| q.avail_ring()),
            QUEUE_DEVICE => queue.map_or(0, |q| q.used_ring()),
            // The feature selectors are write-only in practice; they read as 0.
            _ => 0,
        }
    }

    /// Any width at any offset: the bytes of whichever field holds them.
    fn read_common(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let field = common_field_start(at);
            *b = (self.common_field(field) >> (8 * (at - field))) as u8;
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let len = data.len().min(8);
        bytes[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(bytes);
        let v32 = value as u32;
        let v16 = value as u16;
        if offset == MSIX_CONFIG {
            let vector = self.checked_vector(v16);
            self.vectors.config.store(vector, Ordering::SeqCst);
            return;
        }
        if offset == QUEUE_MSIX_VECTOR {
            let sel = usize::from(self.core.queue_sel() as u16);
            let vector = self.checked_vector(v16);
            if let Some(v) = self.vectors.queues.get(sel) {
                v.store(vector, Ordering::SeqCst);
            }
            return;
        }
        let core = &mut self.core;
        match offset {
            DEVICE_FEATURE_SELECT => core.set_device_features_sel(v32),
            DRIVER_FEATURE_SELECT => core.set_driver_features_sel(v32),
            DRIVER_FEATURE => core.write_driver_features(v32),
            DEVICE_STATUS => core.write_status(u32::from(data[0])),
            QUEUE_SELECT => core.set_queue_sel(u32::from(v16)),
            QUEUE_SIZE => core.set_queue_size(u32::from(v16)),
            QUEUE_ENABLE => core.set_queue_ready(u32::from(v16)),
            QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE | 0x24 | 0x2c | 0x34 => {
                let ring = match offset & !7 {
                    QUEUE_DESC => Ring::Desc,
                    QUEUE_DRIVER => Ring::Driver,
                    _ => Ring::Device,
                };
                match (offset % 8, data.len()) {
                    (0, 8) => core.set_queue_address(ring, Some(v32), Some((value >> 32) as u32)),
                    (0, 4) => core.set_queue_address(ring, Some(v32), None),
                    (4, 4) => core.set_queue_address(ring, None, Some(v32)),
                    _ => core.warn(
                        Warn::AccessWidth,
                        format_args!("{}-byte write at common register {offset:#x}", data.len()),
                    ),
                }
            }
            _ => core.warn(
                Warn::UnknownRegister,
                format_args!("write to read-only or unknown common register {offset:#x}"),
            ),
        }
    }

    /// A vector number the driver wrote: kept if the table has it, else NO_VECTOR (the driver
    /// reads that back and knows the vector was refused, 4.1.5.1.2).
    fn checked_vector(&mut self, vector: u16) -> u16 {
        if vector == NO_VECTOR || usize::from(vector) < lock(&self.msix).vector_count() {
            return vector;
        }
        self.core.warn(
            Warn::Msix,
            format_args!("MSI-X vector {vector} is past the table"),
        );
        NO_VECTOR
    }

    fn move_notifications(&mut self, new: Option<u64>) {
        if self.notify_base == new {
            return;
        }
        let evts = self.core.queue_notify_evts();
        if let Some(old) = self.notify_base.take() {
            for (i, evt) in evts.iter().enumerate() {
                if let Err(e) = self.ioevents.unregister(evt, notify_address(old, i)) {
                    log::warn!("virtio-pci: cannot unregister queue {i}'s notification: {e}");
                }
            }
        }
        if let Some(base) = new {
            for (i, evt) in evts.iter().enumerate() {
                // Another function's notification at the same address (BARs programmed over
                // each other) makes this fail; the guest's writes then reach us as exits.
                if let Err(e) = self.ioevents.register(evt, notify_address(base, i)) {
                    self.core.warn(
                        Warn::Bar,
                        format_args!("cannot register queue {i}'s notification at {base:#x}: {e}"),
                    );
                }
            }
        }
        self.notify_base = new;
    }
}

/// The first byte of the common-configuration field `offset` falls in.
fn common_field_start(offset: u64) -> u64 {
    match offset {
        0x00..=0x0f => offset & !3,
        0x10..=0x13 | 0x16..=0x1f => offset & !1,
        0x14 | 0x15 => offset,
        _ => offset & !7,
    }
}

fn notify_address(bar: u64, queue: usize) -> u64 {
    bar + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}

/// A `virtio_pci_cap` (4.1.4), plus `notify_off_multiplier` for the notify capability.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, multiplier: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if multiplier.is_some() { 20 } else { 16 };
    let mut cap = vec![CAP_VENDOR, 0, cap_len, cfg_type, BAR_INDEX as u8, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(m) = multiplier {
        cap.extend_from_slice(&m.to_le_bytes());
    }
    cap
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        self.intx_disabled.store(
            self.config.command() & config::COMMAND_INTX_DISABLE != 0,
            Ordering::SeqCst,
        );
        let control = self.msix_cap + 2;
        if offset < control + 2 && offset + data.len() > control {
            let (enabled, masked) = msix::control_bits(self.config.get16(control));
            lock(&self.msix).set_control(enabled, masked);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR_INDEX {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.read_common(o - COMMON_OFFSET, data),
            // Reading the ISR clears it (4.1.4.5); its other bytes read 0.
            ISR_OFFSET => data[0] = self.isr.swap(0, Ordering::SeqCst) as u8,
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                lock(self.core.device()).read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.msix).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR_INDEX || data.is_empty() {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.write_common(o - COMMON_OFFSET, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                lock(self.core.device()).write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                // Only when no ioeventfd caught it (tests, or a BAR over another's).
                let queue = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                self.core.notify_queue(queue as u32);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_decode_changed(&mut self, bar: usize, _old: Option<u64>, new: Option<u64>) {
        if bar == BAR_INDEX {
            self.move_notifications(new);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PciTransportError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("a virtio-pci function needs 1 to {MAX_VECTORS} MSI-X vectors, not {0}")]
    Vectors(usize),
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::super::{ActivateError, ActiveQueue, VirtQueueState, VIRTIO_F_VERSION_1};
    use super::*;
    use crate::pci::config::{COMMAND, COMMAND_MEMORY_SPACE};
    use crate::pci::PciBus;

    struct Fake {
        activations: Arc<AtomicUsize>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            super::super::VIRTIO_ID_NET
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn ack_features(&mut self, _features: u64) {}
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            interrupt: Arc<dyn VirtioInterrupt>,
            _queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            self.activations.fetch_add(1, Ordering::SeqCst);
            self.interrupt = Some(interrupt);
            Ok(())
        }
        fn active_queue_states(&self) -> Vec<VirtQueueState> {
            Vec::new()
        }
        fn reset(&mut self) {
            self.interrupt = None;
        }
    }

    #[derive(Default)]
    struct Kvm {
        routes: Mutex<Vec<(u32, u64, u32)>>,
        ioevents: Mutex<Vec<(bool, u64)>>,
    }

    impl MsiRouter for Kvm {
        fn route(&self, gsi: u32, address: u64, data: u32) -> std::io::Result<()> {
            self.routes.lock().unwrap().push((gsi, address, data));
            Ok(())
        }
    }

    impl IoEventRegistry for Kvm {
        fn register(&self, _evt: &EventFd, address: u64) -> std::io::Result<()> {
            self.ioevents.lock().unwrap().push((true, address));
            Ok(())
        }
        fn unregister(&self, _evt: &EventFd, address: u64) -> std::io::Result<()> {
            self.ioevents.lock().unwrap().push((false, address));
            Ok(())
        }
    }

    struct Rig {
        dev: VirtioPciDevice,
        fake: Arc<Mutex<Fake>>,
        kvm: Arc<Kvm>,
        intx: EventFd,
        vector_irqs: Vec<EventFd>,
    }

    const BAR: u64 = 0xc000_0000;

    fn rig() -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let fake = Arc::new(Mutex::new(Fake {
            activations: Arc::default(),
            interrupt: None,
        }));
        let kvm = Arc::new(Kvm::default());
        let intx = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut vector_irqs = Vec::new();
        let vectors = (0..vector_count(2))
            .map(|i| {
                let irq = EventFd::new(EFD_NONBLOCK).unwrap();
                vector_irqs.push(irq.try_clone().unwrap());
                MsixVector {
                    gsi: 24 + i as u32,
                    irq,
                }
            })
            .collect();
        let dev = VirtioPciDevice::new(
            fake.clone(),
            mem,
            PciResources {
                bar_address: BAR,
                intx: Some(IntxLine {
                    irq: intx.try_clone().unwrap(),
                    resample: EventFd::new(EFD_NONBLOCK).unwrap(),
                    line: 6,
                }),
                vectors,
                router: kvm.clone(),
                ioevents: kvm.clone(),
            },
        )
        .unwrap();
        Rig {
            dev,
            fake,
            kvm,
            intx,
            vector_irqs,
        }
    }

    fn w(dev: &mut VirtioPciDevice, offset: u64, value: u64, len: usize) {
        dev.write_bar(BAR_INDEX, offset, &value.to_le_bytes()[..len]);
    }

    fn r(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        dev.read_bar(BAR_INDEX, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// The driver's sequence (4.1.5.1.3), queues in guest memory at 0x1000 * (queue + 1) * 4.
    fn bring_up(dev: &mut VirtioPciDevice) {
        w(dev, DEVICE_STATUS, 1, 1);
        w(dev, DEVICE_STATUS, 3, 1);
        w(dev, DRIVER_FEATURE_SELECT, 1, 4);
        w(dev, DRIVER_FEATURE, 1, 4);
        w(dev, DEVICE_STATUS, 11, 1);
        assert_eq!(r(dev, DEVICE_STATUS, 1), 11);
        for q in 0..2u64 {
            let base = 0x4000 * (q + 1);
            w(dev, QUEUE_SELECT, q, 2);
            w(dev, QUEUE_DESC, base, 4);
            w(dev, QUEUE_DESC + 4, 0, 4);
            w(dev, QUEUE_DRIVER, base + 0x1000, 8);
            w(dev, QUEUE_DEVICE, base + 0x2000, 8);
            w(dev, QUEUE_MSIX_VECTOR, q + 1, 2);
            w(dev, QUEUE_ENABLE, 1, 2);
            assert_eq!(r(dev, QUEUE_ENABLE, 2), 1);
            assert_eq!(r(dev, QUEUE_NOTIFY_OFF, 2), q);
            assert_eq!(r(dev, QUEUE_DESC, 8), base);
        }
        w(dev, MSIX_CONFIG, 0, 2);
        w(dev, DEVICE_STATUS, 15, 1);
    }

    fn find_cap(dev: &VirtioPciDevice, cfg_type: u8) -> Option<(u32, u32)> {
        let c = dev.config();
        let mut at = usize::from(c.read_byte(config::CAPABILITIES_POINTER));
        while at != 0 {
            if c.read_byte(at) == CAP_VENDOR && c.read_byte(at + 3) == cfg_type {
                return Some((c.get32(at + 8), c.get32(at + 12)));
            }
            at = usize::from(c.read_byte(at + 1));
        }
        None
    }

    fn enable_msix(dev: &mut VirtioPciDevice) {
        let control = dev.msix_cap + 2;
        let value = dev.config().get16(control) | 1 << 15;
        dev.write_config(control, &value.to_le_bytes());
        // Program and unmask every vector.
        for v in 0..3u64 {
            let entry = MSIX_TABLE_OFFSET + 16 * v;
            w(dev, entry, 0xfee0_0000, 4);
            w(dev, entry + 4, 0, 4);
            w(dev, entry + 8, 0x40 + v, 4);
            w(dev, entry + 12, 0, 4);
        }
    }

    #[test]
    fn identity_and_capabilities() {
        let Rig { dev, .. } = rig();
        let c = dev.config();
        assert_eq!(c.get32(0), 0x1041_1af4);
        assert_eq!(c.read_byte(config::REVISION_ID), 1);
        assert_eq!(c.get16(config::SUBSYSTEM_ID), 0x40);
        assert_eq!(c.read_byte(config::INTERRUPT_PIN), 1);
        assert_eq!(c.read_byte(config::INTERRUPT_LINE), 6);
        assert_eq!(find_cap(&dev, CAP_COMMON_CFG), Some((0, 0x38)));
        assert_eq!(find_cap(&dev, CAP_NOTIFY_CFG), Some((0x3000, 0x1000)));
        assert_eq!(find_cap(&dev, CAP_ISR_CFG), Some((0x1000, 4)));
        assert_eq!(find_cap(&dev, CAP_DEVICE_CFG), Some((0x2000, 0x1000)));
        assert_eq!(c.read_byte(dev.msix_cap), msix::MSIX_CAPABILITY_ID);
        assert_eq!(c.get16(dev.msix_cap + 2) & 0x7ff, 2, "3 vectors");
    }

    #[test]
    fn queue_interrupts_follow_their_msix_vectors() {
        let mut rig = rig();
        bring_up(&mut rig.dev);
        assert_eq!(
            rig.fake.lock().unwrap().activations.load(Ordering::SeqCst),
            1
        );
        enable_msix(&mut rig.dev);
        assert!(rig
            .kvm
            .routes
            .lock()
            .unwrap()
            .contains(&(26, 0xfee0_0000, 0x42)));
        let interrupt = rig.fake.lock().unwrap().interrupt.clone().unwrap();
        interrupt.trigger(InterruptKind::Queue(1)).unwrap();
        assert!(rig.vector_irqs[2].read().is_ok());
        assert!(rig.vector_irqs[1].read().is_err());
        assert!(rig.intx.read().is_err());
        interrupt.trigger(InterruptKind::Config).unwrap();
        assert!(rig.vector_irqs[0].read().is_ok());
        // A queue with no vector raises nothing.
        w(&mut rig.dev, QUEUE_SELECT, 0, 2);
        w(&mut rig.dev, QUEUE_MSIX_VECTOR, u64::from(NO_VECTOR), 2);
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert!(rig.vector_irqs.iter().all(|e| e.read().is_err()));
        // A vector past the table is refused: the driver reads NO_VECTOR back.
        w(&mut rig.dev, QUEUE_MSIX_VECTOR, 9, 2);
        assert_eq!(r(&mut rig.dev, QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn intx_and_isr_without_msix() {
        let mut rig = rig();
        bring_up(&mut rig.dev);
        let interrupt = rig.fake.lock().unwrap().interrupt.clone().unwrap();
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert!(rig.intx.read().is_ok());
        assert_eq!(r(&mut rig.dev, ISR_OFFSET, 1), 1);
        assert_eq!(
            r(&mut rig.dev, ISR_OFFSET, 1),
            0,
            "reading the ISR clears it"
        );
    }

    #[test]
    fn no_intx_while_the_driver_disables_it() {
        let mut rig = rig();
        bring_up(&mut rig.dev);
        let command = rig.dev.config().command() | config::COMMAND_INTX_DISABLE;
        rig.dev.write_config(COMMAND, &command.to_le_bytes());
        let interrupt = rig.fake.lock().unwrap().interrupt.clone().unwrap();
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert!(rig.intx.read().is_err());
        // The ISR still tells a polling driver what happened.
        assert_eq!(r(&mut rig.dev, ISR_OFFSET, 1), 1);
    }

    #[test]
    fn intx_is_asserted_again_after_eoi_while_the_isr_is_unread() {
        let mut rig = rig();
        let resampler = rig.dev.take_intx_resampler().unwrap();
        assert!(rig.dev.take_intx_resampler().is_none());
        bring_up(&mut rig.dev);
        let interrupt = rig.fake.lock().unwrap().interrupt.clone().unwrap();
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert!(rig.intx.read().is_ok());
        // The guest EOIs without reading the ISR: the line comes back.
        let eoi = resampler.resample.try_clone().unwrap();
        let mut manager =
            event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                .unwrap();
        let resampler: Arc<Mutex<dyn MutEventSubscriber + Send>> = Arc::new(Mutex::new(resampler));
        event_manager::SubscriberOps::add_subscriber(&mut manager, resampler);
        eoi.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert!(rig.intx.read().is_ok());
        // Once the ISR is read, an EOI leaves the line alone.
        assert_eq!(r(&mut rig.dev, ISR_OFFSET, 1), 1);
        eoi.write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert!(rig.intx.read().is_err());
    }

    #[test]
    fn notifications_move_with_the_bar() {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let rig = rig();
        let kvm = rig.kvm.clone();
        let dev = Arc::new(Mutex::new(rig.dev));
        bus.lock().unwrap().insert(1, dev.clone()).unwrap();
        let mut b = bus.lock().unwrap();
        b.write_config(1, 0, COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert_eq!(
            kvm.ioevents.lock().unwrap().as_slice(),
            &[(true, BAR + 0x3000), (true, BAR + 0x3004)]
        );
        kvm.ioevents.lock().unwrap().clear();
        // The guest moves the BAR above 4 GiB.
        b.write_config(1, 0, config::BAR0 + 4, &2u32.to_le_bytes());
        let events = kvm.ioevents.lock().unwrap().clone();
        assert!(events.contains(&(false, BAR + 0x3000)));
        assert!(events.contains(&(true, 0x2_c000_3000)));
        let mut id = [0u8; 2];
        b.read_bar(0x2_c000_0000 + NUM_QUEUES, &mut id);
        assert_eq!(u16::from_le_bytes(id), 2);
        b.read_bar(BAR + NUM_QUEUES, &mut id);
        assert_eq!(id, [0xff, 0xff], "nothing decodes at the old address");
    }

    #[test]
    fn state_round_trips() {
        let mut source = rig();
        bring_up(&mut source.dev);
        enable_msix(&mut source.dev);
        let state = source.dev.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: PciTransportState = serde_json::from_str(&json).unwrap();
        let mut other = rig();
        other.dev.restore(&back).unwrap();
        assert_eq!(other.dev.state(), state);
        assert_eq!(
            other
                .fake
                .lock()
                .unwrap()
                .activations
                .load(Ordering::SeqCst),
            1
        );
        // Routes are re-made on the destination.
        assert_eq!(other.kvm.routes.lock().unwrap().len(), 3);
        // A snapshot of another device type is refused.
        let mut wrong = back.clone();
        wrong.config_space.registers[0] = 0x1042_1af4;
        assert!(rig().dev.restore(&wrong).is_err());
    }

    /// Property: random accesses of any width anywhere in the BAR and configuration space
    /// never panic, and the identity stays.
    #[test]
    fn random_guest_accesses_are_harmless() {
        let mut rig = rig();
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..100_000 {
            let len = [1usize, 2, 4, 8][(next() % 4) as usize];
            let value = next();
            match next() % 5 {
                0 => {
                    let off = (next() % 300) as usize;
                    rig.dev.write_config(off, &value.to_le_bytes()[..len]);
                }
                1 => {
                    let mut b = [0u8; 8];
                    rig.dev.read_config((next() % 300) as usize, &mut b[..len]);
                }
                2 => w(&mut rig.dev, next() % (BAR_SIZE + 16), value, len),
                3 => {
                    r(&mut rig.dev, next() % (BAR_SIZE + 16), len);
                }
                _ => {
                    if let Some(i) = rig.fake.lock().unwrap().interrupt.clone() {
                        let _ = i.trigger(InterruptKind::Queue((next() % 4) as u16));
                    }
                }
            }
        }
        assert_eq!(rig.dev.config().get32(0), 0x1041_1af4);
    }
}
