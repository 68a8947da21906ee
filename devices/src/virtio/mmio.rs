//! The virtio-mmio transport (virtio 1.x, 4.2 "Virtio Over MMIO"), modern register layout
//! (version 2) only.
//!
//! The transport owns everything the guest programs through registers: feature negotiation, the
//! device status state machine, the queues' sizes and addresses, and the interrupt status. On
//! DRIVER_OK it validates the queues against guest memory and hands them to the device together
//! with one notification eventfd per queue and an interrupt handle.
//!
//! The guest is not trusted: any register sequence, however wrong, leaves the VMM running. Wrong
//! accesses are ignored (reads return 0) and logged once per kind of mistake.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActiveQueue, InterruptKind, VirtQueueState, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::state::RestoreError;
use crate::{BusDevice, GuestMemoryMmap};

/// Size of one virtio-mmio device's register window.
pub const MMIO_REGION_SIZE: u64 = 0x1000;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// "TSVM" in little endian; any constant works, Linux does not match on it.
pub const MMIO_VENDOR_ID: u32 = 0x4d56_5354;

// Register offsets (4.2.2 MMIO Device Register Layout).
pub const REG_MAGIC_VALUE: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
/// Where the VMM registers each queue's ioeventfd (datamatch = queue index, 4 bytes).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const REG_CONFIG: u64 = 0x100;

// Device status bits (2.1 Device Status Field).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

// InterruptStatus bits (4.2.2).
pub const INTERRUPT_USED_BUFFER: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("virtio device offers {0} queues; the transport supports 1 to 1024")]
    QueueCount(usize),
    #[error("virtio device queue {index} has invalid maximum size {size} (must be a power of two, at most 32768)")]
    QueueMaxSize { index: usize, size: u16 },
    #[error("cannot create the notification eventfd of queue {index}: {source}")]
    EventFd {
        index: usize,
        source: std::io::Error,
    },
    #[error("cannot duplicate the interrupt eventfd: {0}")]
    IrqClone(std::io::Error),
}

/// The transport's saved state: every register the driver programmed, the interrupt status and
/// each queue. For an activated transport the queues carry the device's progress (taken from the
/// device, which owns the live queues), so a restore re-activates the device exactly where it
/// stopped. The notification and interrupt eventfds are host resources and are not saved.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MmioTransportState {
    /// Checked on restore: a snapshot of one device type cannot go into another.
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// Pending InterruptStatus bits; re-raised on restore since the guest may not have seen
    /// the interrupt.
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// DRIVER_OK accepted and the device handed its queues (not reset since).
    pub activated: bool,
    pub queues: Vec<VirtQueueState>,
}

/// The interrupt handle given to the device: sets InterruptStatus bits and signals the irqfd.
pub struct MmioInterrupt {
    status: Arc<AtomicU32>,
    irq: EventFd,
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue => INTERRUPT_USED_BUFFER,
            InterruptKind::Config => INTERRUPT_CONFIG_CHANGE,
        };
        // The status bit must be visible before the guest's handler reads InterruptStatus.
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }
}

/// Kinds of guest mistakes, each logged once per transport so a looping guest cannot flood the
/// log.
#[derive(Clone, Copy)]
enum Warn {
    AccessWidth = 0,
    UnknownRegister,
    WrongState,
    QueueSel,
    QueueSize,
    QueueInvalid,
    QueueNotify,
    Status,
    Features,
    Activate,
    Interrupt,
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    device_type: u32,
    avail_features: u64,
    /// The register-side view of each queue; a fresh `Queue` is built from it on activation, so
    /// the device never shares state with the registers.
    queues: Vec<Queue>,
    notify: Vec<Arc<EventFd>>,
    interrupt_status: Arc<AtomicU32>,
    interrupt: Arc<MmioInterrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// ConfigGeneration: no device changes its config space yet, so it stays 0, but it is part
    /// of the saved state so that one that does later keeps the guest's view consistent.
    config_generation: u32,
    activated: bool,
    warned: u32,
}

impl MmioTransport {
    /// Wraps `device`. `irq` is the interrupt line (the VMM registers it as a KVM irqfd).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        if max_sizes.is_empty() || max_sizes.len() > 1024 {
            return Err(MmioError::QueueCount(max_sizes.len()));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut notify = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| MmioError::QueueMaxSize { index, size })?);
            let evt = EventFd::new(EFD_NONBLOCK)
                .map_err(|source| MmioError::EventFd { index, source })?;
            notify.push(Arc::new(evt));
        }
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let interrupt = Arc::new(MmioInterrupt {
            status: interrupt_status.clone(),
            irq,
        });
        Ok(Self {
            device,
            mem,
            device_type,
            avail_features,
            queues,
            notify,
            interrupt_status,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
            warned: 0,
        })
    }

    /// Captures the transport's state. Call it only while no device code runs (vCPUs paused,
    /// device event loop stopped): the queue progress is read from the device.
    pub fn state(&self) -> MmioTransportState {
        let live = if self.activated {
            lock(&self.device).active_queue_states()
        } else {
            Vec::new()
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut saved = VirtQueueState::from(q.state());
                // The register copy never moves; the device's queue has the real progress.
                if let Some(l) = live.get(i) {
                    saved.next_avail = l.next_avail;
                    saved.next_used = l.next_used;
                    saved.event_idx_enabled = l.event_idx_enabled;
                }
                saved
            })
            .collect();
        MmioTransportState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            config_generation: self.config_generation,
            activated: self.activated,
            queues,
        }
    }

    /// Loads `state` into this transport, built for the same device from the same
    /// configuration. Re-does what the driver did: acks its features with the device (if
    /// FEATURES_OK was reached) and, for an activated transport, activates the device through
    /// the normal [`VirtioDevice::activate`] path with queues rebuilt from the saved progress,
    /// so the device registers with the event loop when that starts and then serves what the
    /// guest had queued. A pending interrupt status is raised again.
    ///
    /// Call it before any vCPU runs and before the device event loop starts. A transport that
    /// was in use is reset first. On error the transport is left reset (status 0).
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), RestoreError> {
        if self.status != 0 || self.activated {
            self.reset();
        }
        let result = self.try_restore(state);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn try_restore(&mut self, state: &MmioTransportState) -> Result<(), RestoreError> {
        let device_type = self.device_type;
        if state.device_type != device_type {
            return Err(RestoreError::DeviceType {
                have: device_type,
                want: state.device_type,
            });
        }
        let inconsistent = |reason: String| RestoreError::Inconsistent {
            device_type,
            reason,
        };
        if state.queues.len() != self.queues.len() {
            return Err(inconsistent(format!(
                "the device has {} queues but the snapshot has {}",
                self.queues.len(),
                state.queues.len()
            )));
        }
        if state.activated && state.status & STATUS_DRIVER_OK == 0 {
            return Err(inconsistent(format!(
                "activated but status {:#x} lacks DRIVER_OK",
                state.status
            )));
        }
        let features_ok = state.status & STATUS_FEATURES_OK != 0;
        if features_ok && state.driver_features & !self.avail_features != 0 {
            return Err(RestoreError::AckedFeatures {
                device: format!("virtio-mmio (device type {device_type})"),
                acked: state.driver_features,
                offered: self.avail_features,
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, reg)) in state.queues.iter().zip(&self.queues).enumerate() {
            let queue_err = |reason: String| RestoreError::Queue {
                device_type,
                index,
                reason,
            };
            if saved.max_size != reg.max_size() {
                return Err(queue_err(format!(
                    "the device's maximum size is {} but the snapshot's is {}",
                    reg.max_size(),
                    saved.max_size
                )));
            }
            let q = Queue::try_from(QueueState::from(*saved))
                .map_err(|e| queue_err(format!("invalid saved queue: {e}")))?;
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(queue_err(
                    "its rings are not in guest memory (different memory layout?)".into(),
                ));
            }
            queues.push(q);
        }

        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        if features_ok {
            lock(&self.device).ack_features(state.driver_features);
        }
        if state.activated {
            let active = self.restored_active_queues(&state.queues);
            lock(&self.device)
                .activate(
                    self.mem.clone(),
                    self.interrupt.clone() as Arc<dyn VirtioInterrupt>,
                    active,
                )
                .map_err(|source| RestoreError::Activate {
                    device_type,
                    source,
                })?;
            self.activated = true;
        }
        self.interrupt_status
            .store(state.interrupt_status, Ordering::SeqCst);
        if state.interrupt_status != 0 {
            // The guest may have been about to take this interrupt when the source stopped;
            // a spurious one is harmless, a lost one can hang the driver.
            self.interrupt
                .irq
                .write(1)
                .map_err(RestoreError::Interrupt)?;
        }
        Ok(())
    }

    /// The queues to hand the device on restore: the ready prefix, as on activation, but with
    /// the saved progress instead of starting at 0. The registers were validated already.
    fn restored_active_queues(&self, saved: &[VirtQueueState]) -> Vec<ActiveQueue> {
        let ready = self.queues.iter().take_while(|q| q.ready()).count();
        saved
            .iter()
            .zip(&self.notify)
            .take(ready)
            .filter_map(|(s, notify)| {
                Queue::try_from(QueueState::from(*s))
                    .ok()
                    .map(|queue| ActiveQueue {
                        queue,
                        notify: notify.clone(),
                    })
            })
            .collect()
    }

    /// One eventfd per queue, in queue order. The VMM registers eventfd `i` as a KVM ioeventfd
    /// at `base + REG_QUEUE_NOTIFY`, length 4, datamatch `i`.
    pub fn queue_notify_evts(&self) -> Vec<Arc<EventFd>> {
        self.notify.clone()
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated (DRIVER_OK accepted) and not reset since.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The interrupt status register (bit 0 used buffer, bit 1 config change).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::SeqCst)
    }

    fn warn(&mut self, kind: Warn, msg: std::fmt::Arguments) {
        let bit = 1u32 << (kind as u32);
        if self.warned & bit == 0 {
            self.warned |= bit;
            log::warn!(
                "virtio-mmio (device type {}): {msg} (further such warnings suppressed)",
                self.device_type
            );
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = self.queue_sel as usize;
        if sel >= self.queues.len() {
            self.warn(
                Warn::QueueSel,
                format_args!("QueueSel {sel} is out of range"),
            );
            return None;
        }
        self.queues.get_mut(sel)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK (4.2.3.2).
    fn queue_config_allowed(&mut self) -> bool {
        let ok = self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED)
            == STATUS_FEATURES_OK;
        if !ok {
            let status = self.status;
            self.warn(
                Warn::WrongState,
                format_args!("queue register written in device status {status:#x}"),
            );
        }
        ok
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            // The remaining registers are write-only; reading them returns 0 (as other VMMs do).
            REG_DEVICE_FEATURES_SEL
            | REG_DRIVER_FEATURES
            | REG_DRIVER_FEATURES_SEL
            | REG_QUEUE_SEL
            | REG_QUEUE_NUM
            | REG_QUEUE_NOTIFY
            | REG_INTERRUPT_ACK
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => 0,
            _ => {
                self.warn(
                    Warn::UnknownRegister,
                    format_args!("read of unknown register {offset:#x}"),
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED)
                    != STATUS_DRIVER
                {
                    let status = self.status;
                    self.warn(
                        Warn::WrongState,
                        format_args!("DriverFeatures written in device status {status:#x}"),
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    sel if value != 0 => self.warn(
                        Warn::Features,
                        format_args!("driver acked features {value:#x} in word {sel}"),
                    ),
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if !self.queue_config_allowed() {
                    return;
                }
                let Some(queue) = self.selected_queue() else {
                    return;
                };
                let max = queue.max_size();
                let ok = u16::try_from(value)
                    .ok()
                    .is_some_and(|size| queue.try_set_size(size).is_ok());
                if !ok {
                    self.warn(
                        Warn::QueueSize,
                        format_args!(
                            "invalid queue size {value} (must be a power of two, 1..={max})"
                        ),
                    );
                }
            }
            REG_QUEUE_READY => {
                if !self.queue_config_allowed() {
                    return;
                }
                let mem = self.mem.clone();
                let Some(queue) = self.selected_queue() else {
                    return;
                };
                if value == 0 {
                    queue.set_ready(false);
                    return;
                }
                // Refuse a queue whose rings are not in guest memory; the guest reads back
                // QueueReady = 0 and activation will not see the queue.
                queue.set_ready(true);
                if !queue.is_valid(&mem) {
                    queue.set_ready(false);
                    let sel = self.queue_sel;
                    self.warn(
                        Warn::QueueInvalid,
                        format_args!("queue {sel} set ready with rings outside guest memory"),
                    );
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if !self.queue_config_allowed() {
                    return;
                }
                let Some(queue) = self.selected_queue() else {
                    return;
                };
                if queue.ready() {
                    // 4.2.2.2: the driver must not change a ready queue's addresses.
                    self.warn(
                        Warn::WrongState,
                        format_args!("address of a ready queue written"),
                    );
                    return;
                }
                let (low, high) = if offset & 4 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                // The setters reject misaligned addresses and keep the old value.
                match offset & !4 {
                    REG_QUEUE_DESC_LOW => queue.set_desc_table_address(low, high),
                    REG_QUEUE_DRIVER_LOW => queue.set_avail_ring_address(low, high),
                    _ => queue.set_used_ring_address(low, high),
                }
            }
            REG_QUEUE_NOTIFY => self.notify_queue(value),
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            _ => self.warn(
                Warn::UnknownRegister,
                format_args!("write of {value:#x} to read-only or unknown register {offset:#x}"),
            ),
        }
    }

    /// A QueueNotify write that reached the VMM as an MMIO exit (no ioeventfd registered, e.g.
    /// in tests): signal the same eventfd the ioeventfd would have.
    fn notify_queue(&mut self, value: u32) {
        match self.notify.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    self.warn(
                        Warn::QueueNotify,
                        format_args!("cannot signal queue {value}: {e}"),
                    );
                }
            }
            None => self.warn(
                Warn::QueueNotify,
                format_args!("notify of nonexistent queue {value}"),
            ),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if old & STATUS_DEVICE_NEEDS_RESET != 0 {
            // Only a reset brings a broken device back; FAILED is still recorded.
            if value & STATUS_FAILED != 0 {
                self.status |= STATUS_FAILED;
            }
            return;
        }
        if value & STATUS_FAILED != 0 {
            // The driver gave up on the device (2.1.1); remember it, nothing else to do.
            self.status |= STATUS_FAILED;
            return;
        }
        // Each step may add exactly the next bit of the initialization sequence (3.1.1).
        let step = value & !old;
        if value & old != old || step.count_ones() != 1 {
            self.warn(
                Warn::Status,
                format_args!("status change {old:#x} -> {value:#x} is not a single forward step"),
            );
            return;
        }
        match (old, step) {
            (0, STATUS_ACKNOWLEDGE) => self.status = value,
            (STATUS_ACKNOWLEDGE, STATUS_DRIVER) => self.status = value,
            (s, STATUS_FEATURES_OK) if s == STATUS_ACKNOWLEDGE | STATUS_DRIVER => {
                if self.features_acceptable() {
                    lock(&self.device).ack_features(self.driver_features);
                    self.status = value;
                }
                // Otherwise FEATURES_OK stays clear and the driver sees the refusal (3.1.1).
            }
            (s, STATUS_DRIVER_OK)
                if s == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK =>
            {
                self.activate(value);
            }
            _ => self.warn(
                Warn::Status,
                format_args!("status change {old:#x} -> {value:#x} is out of order"),
            ),
        }
    }

    fn features_acceptable(&mut self) -> bool {
        let unknown = self.driver_features & !self.avail_features;
        if unknown != 0 {
            self.warn(
                Warn::Features,
                format_args!("driver acked features {unknown:#x} the device does not offer"),
            );
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            self.warn(
                Warn::Features,
                format_args!(
                    "driver did not ack VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
                ),
            );
            return false;
        }
        true
    }

    fn activate(&mut self, value: u32) {
        match self.build_active_queues() {
            Ok(queues) => {
                let result = lock(&self.device).activate(
                    self.mem.clone(),
                    self.interrupt.clone() as Arc<dyn VirtioInterrupt>,
                    queues,
                );
                match result {
                    Ok(()) => {
                        self.status = value;
                        self.activated = true;
                    }
                    Err(e) => self.activation_failed(format_args!("{e}")),
                }
            }
            Err(msg) => self.activation_failed(format_args!("{msg}")),
        }
    }

    fn activation_failed(&mut self, why: std::fmt::Arguments) {
        self.warn(Warn::Activate, format_args!("activation failed: {why}"));
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
            self.warn(
                Warn::Interrupt,
                format_args!("cannot raise the config interrupt: {e}"),
            );
        }
    }

    /// The ready queues, which must be a prefix of the device's queues (a device with optional
    /// queues, like a net control queue, sees only the ones the driver set up).
    fn build_active_queues(&self) -> Result<Vec<ActiveQueue>, String> {
        let ready = self.queues.iter().take_while(|q| q.ready()).count();
        if let Some(i) = self.queues[ready..].iter().position(|q| q.ready()) {
            return Err(format!(
                "queue {} is ready but queue {ready} is not",
                ready + i
            ));
        }
        let mut active = Vec::with_capacity(ready);
        for (i, (reg, notify)) in self.queues.iter().zip(&self.notify).take(ready).enumerate() {
            let mut q = Queue::new(reg.max_size()).map_err(|e| format!("queue {i}: {e}"))?;
            q.try_set_size(reg.size())
                .map_err(|e| format!("queue {i}: {e}"))?;
            q.set_desc_table_address(
                Some(reg.desc_table() as u32),
                Some((reg.desc_table() >> 32) as u32),
            );
            q.set_avail_ring_address(
                Some(reg.avail_ring() as u32),
                Some((reg.avail_ring() >> 32) as u32),
            );
            q.set_used_ring_address(
                Some(reg.used_ring() as u32),
                Some((reg.used_ring() >> 32) as u32),
            );
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i} is not valid in guest memory"));
            }
            active.push(ActiveQueue {
                queue: q,
                notify: notify.clone(),
            });
        }
        Ok(active)
    }

    /// Status 0: back to the power-on state; the device stops and may be activated again.
    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        // Drop notifications the device will never look at, so they do not fire after the next
        // activation.
        for evt in &self.notify {
            let _ = evt.read();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.activated = false;
        lock(&self.device).reset();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            data.fill(0);
            lock(&self.device).read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            data.fill(0);
            self.warn(
                Warn::AccessWidth,
                format_args!("{}-byte read at register {offset:#x}", data.len()),
            );
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            lock(&self.device).write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.warn(
                Warn::AccessWidth,
                format_args!("{}-byte write at register {offset:#x}", data.len()),
            );
            return;
        };
        if offset & 3 != 0 {
            self.warn(
                Warn::AccessWidth,
                format_args!("misaligned write at register {offset:#x}"),
            );
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

/// A poisoned lock means a thread panicked inside the device; with panic=abort that cannot
/// happen, so recovering the guard is sound.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::super::ActivateError;
    use super::*;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Fake {
        acked: u64,
        activations: usize,
        resets: usize,
        fail_activate: bool,
        queue_count: usize,
        config: [u8; 8],
        live: Vec<VirtQueueState>,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Device("test".into()));
            }
            self.activations += 1;
            self.queue_count = queues.len();
            self.live = queues
                .iter()
                .map(|q| VirtQueueState::from(q.queue.state()))
                .collect();
            Ok(())
        }
        fn active_queue_states(&self) -> Vec<VirtQueueState> {
            self.live.clone()
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.live.clear();
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Fake>>, EventFd) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let fake = Arc::new(Mutex::new(Fake::default()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(fake.clone(), mem, irq.try_clone().unwrap()).unwrap();
        (t, fake, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(t, REG_STATUS, s);
        r(t, REG_STATUS) == s
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
        w(t, REG_QUEUE_SEL, sel);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, 0);
        w(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, 0);
        w(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _, _) = setup();
        assert_eq!(r(&mut t, REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        assert_eq!(r(&mut t, REG_VENDOR_ID), MMIO_VENDOR_ID);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0b101);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 8);
        w(&mut t, REG_QUEUE_SEL, 5);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 0);
        assert_eq!(t.queue_notify_evts().len(), 2);
    }

    #[test]
    fn odd_widths_and_unknown_registers_are_ignored() {
        let (mut t, _, _) = setup();
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(0x2, &mut b);
        assert_eq!(b, [0; 4]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        w(&mut t, 0x0f0, 5);
        w(&mut t, REG_MAGIC_VALUE, 5);
        assert_eq!(r(&mut t, 0x0f0), 0);
        assert_eq!(r(&mut t, REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    }

    #[test]
    fn config_space_any_width() {
        let (mut t, fake, _) = setup();
        t.write(REG_CONFIG + 2, &[7, 8]);
        let mut b = [0u8; 1];
        t.read(REG_CONFIG + 3, &mut b);
        assert_eq!(b, [8]);
        let mut b = [0u8; 8];
        t.read(REG_CONFIG, &mut b);
        assert_eq!(b, [0, 0, 7, 8, 0, 0, 0, 0]);
        assert_eq!(fake.lock().unwrap().config[2], 7);
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, fake, _) = setup();
        // Unoffered bit 1: refused.
        assert!(!negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10));
        w(&mut t, REG_STATUS, 0);
        // No VERSION_1: refused.
        assert!(!negotiate(&mut t, 0b1));
        w(&mut t, REG_STATUS, 0);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b100));
        assert_eq!(fake.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 0b100);
        // Features are frozen after FEATURES_OK.
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 0b1);
        assert_eq!(t.driver_features, VIRTIO_F_VERSION_1 | 0b100);
    }

    #[test]
    fn status_must_step_forward() {
        let (mut t, _, _) = setup();
        w(&mut t, REG_STATUS, STATUS_DRIVER);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_FAILED);
        assert_eq!(r(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_FAILED);
    }

    #[test]
    fn activation_with_valid_queues_and_reset() {
        let (mut t, fake, _) = setup();
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, REG_STATUS, s);
        assert_eq!(r(&mut t, REG_STATUS), s);
        assert!(t.is_activated());
        assert_eq!(fake.lock().unwrap().activations, 1);
        assert_eq!(fake.lock().unwrap().queue_count, 2);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);

        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert!(!t.is_activated());
        assert_eq!(fake.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        // And again.
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 4, 0x1_0000);
        w(&mut t, REG_STATUS, s);
        assert_eq!(fake.lock().unwrap().activations, 2);
        assert_eq!(fake.lock().unwrap().queue_count, 1);
    }

    #[test]
    fn bad_queue_values_are_refused() {
        let (mut t, _, _) = setup();
        // Queue registers before FEATURES_OK are ignored.
        w(&mut t, REG_QUEUE_NUM, 4);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 12); // not a power of two
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, REG_QUEUE_NUM, 32); // above max
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, REG_QUEUE_NUM, 0x1_0000); // does not fit in u16
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, REG_QUEUE_NUM, 0);
        assert_eq!(t.queues[0].size(), 16);
        // Rings outside guest memory: ready is refused.
        w(&mut t, REG_QUEUE_DESC_LOW, 0);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0x10);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        // Out-of-range QueueSel.
        w(&mut t, REG_QUEUE_SEL, 99);
        w(&mut t, REG_QUEUE_NUM, 4);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        // Notify of a nonexistent queue.
        w(&mut t, REG_QUEUE_NOTIFY, 99);
        // Ready queue 1 without queue 0: activation fails, NEEDS_RESET and config interrupt.
        setup_queue(&mut t, 1, 8, 0x2_0000);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(&mut t, REG_STATUS, s | STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, REG_STATUS), s | STATUS_DEVICE_NEEDS_RESET);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        assert!(!t.is_activated());
        w(&mut t, REG_INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn device_activation_failure_needs_reset() {
        let (mut t, fake, irq) = setup();
        fake.lock().unwrap().fail_activate = true;
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 16, 0x1_0000);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(&mut t, REG_STATUS, s | STATUS_DRIVER_OK);
        assert_eq!(
            r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET,
            STATUS_DEVICE_NEEDS_RESET
        );
        assert_eq!(irq.read().unwrap(), 1);
        // Only reset leaves the broken state.
        w(&mut t, REG_STATUS, s | STATUS_DRIVER_OK);
        assert!(!t.is_activated());
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_notify_write_signals_eventfd_and_interrupt_sets_status() {
        let (mut t, _, irq) = setup();
        let evts = t.queue_notify_evts();
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert!(evts[0].read().is_err());
        assert_eq!(evts[1].read().unwrap(), 1);
        t.interrupt.trigger(InterruptKind::Queue).unwrap();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
        assert_eq!(irq.read().unwrap(), 1);
        w(&mut t, REG_INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    fn json_round_trip(state: &MmioTransportState) -> MmioTransportState {
        let json = serde_json::to_string(state).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn activated_state_round_trips_and_reactivates_with_progress() {
        let (mut t, fake, _) = setup();
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b100));
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, REG_STATUS, s);
        w(&mut t, REG_QUEUE_SEL, 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        // The device made progress and interrupted; the guest has not acknowledged yet.
        fake.lock().unwrap().live[0].next_avail = 5;
        fake.lock().unwrap().live[0].next_used = 4;
        fake.lock().unwrap().live[1].next_avail = 2;
        t.interrupt.trigger(InterruptKind::Queue).unwrap();

        let state = t.state();
        assert!(state.activated);
        assert_eq!(state.status, s);
        assert_eq!(state.interrupt_status, INTERRUPT_USED_BUFFER);
        assert_eq!(
            (state.queues[0].next_avail, state.queues[0].next_used),
            (5, 4)
        );
        assert_eq!(state.queues[1].size, 8);
        assert_eq!(state.queues[0].desc_table, 0x1_0000);
        let saved = json_round_trip(&state);
        assert_eq!(saved, state);

        let (mut t2, fake2, irq2) = setup();
        t2.restore(&saved).unwrap();
        assert_eq!(t2.state(), state);
        assert!(t2.is_activated());
        let f2 = fake2.lock().unwrap();
        assert_eq!(f2.activations, 1);
        assert_eq!(f2.queue_count, 2);
        assert_eq!(f2.acked, VIRTIO_F_VERSION_1 | 0b100);
        assert_eq!((f2.live[0].next_avail, f2.live[0].next_used), (5, 4));
        drop(f2);
        // The pending interrupt is raised again, and the registers read as before.
        assert_eq!(irq2.read().unwrap(), 1);
        assert_eq!(r(&mut t2, REG_INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
        assert_eq!(r(&mut t2, REG_STATUS), s);
        assert_eq!(r(&mut t2, REG_QUEUE_NUM_MAX), 8);
        assert_eq!(r(&mut t2, REG_DEVICE_FEATURES), 1);
        // A restored device resets like any other.
        w(&mut t2, REG_STATUS, 0);
        assert!(!t2.is_activated());
        assert_eq!(fake2.lock().unwrap().resets, 1);
    }

    #[test]
    fn state_mid_negotiation_round_trips_without_activation() {
        let (mut t, _, _) = setup();
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 4, 0x1_0000);
        let state = t.state();
        assert!(!state.activated);
        let (mut t2, fake2, irq2) = setup();
        t2.restore(&json_round_trip(&state)).unwrap();
        assert_eq!(t2.state(), state);
        assert_eq!(fake2.lock().unwrap().activations, 0);
        assert_eq!(fake2.lock().unwrap().acked, VIRTIO_F_VERSION_1);
        assert!(irq2.read().is_err());
        // The driver carries on where it was: queue 1, then DRIVER_OK.
        setup_queue(&mut t2, 1, 8, 0x2_0000);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t2, REG_STATUS, s);
        assert!(t2.is_activated());
        assert_eq!(fake2.lock().unwrap().live[0].size, 4);
    }

    #[test]
    fn mismatched_snapshots_are_refused_and_leave_the_transport_reset() {
        let (mut t, _, _) = setup();
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 16, 0x1_0000);
        let good = t.state();

        let mut bad = good.clone();
        bad.device_type = 2;
        let err = t.restore(&bad).unwrap_err().to_string();
        assert!(err.contains("type 42") && err.contains("type 2"), "{err}");
        assert_eq!(t.status(), 0);

        let mut bad = good.clone();
        bad.queues.pop();
        let err = t.restore(&bad).unwrap_err().to_string();
        assert!(err.contains("2 queues but the snapshot has 1"), "{err}");

        let mut bad = good.clone();
        bad.queues[1].max_size = 32;
        let err = t.restore(&bad).unwrap_err().to_string();
        assert!(
            err.contains("queue 1") && err.contains("maximum size is 8"),
            "{err}"
        );

        let mut bad = good.clone();
        bad.queues[0].desc_table = 0x10_0000_0000;
        let err = t.restore(&bad).unwrap_err().to_string();
        assert!(err.contains("not in guest memory"), "{err}");

        let mut bad = good.clone();
        bad.driver_features |= 0b10;
        let err = t.restore(&bad).unwrap_err().to_string();
        assert!(err.contains("not all offered"), "{err}");

        let mut bad = good.clone();
        bad.activated = true;
        let err = t.restore(&bad).unwrap_err().to_string();
        assert!(err.contains("lacks DRIVER_OK"), "{err}");

        let json = serde_json::to_string(&good)
            .unwrap()
            .replacen('{', "{\"surprise\":1,", 1);
        assert!(serde_json::from_str::<MmioTransportState>(&json).is_err());

        t.restore(&good).unwrap();
        assert_eq!(t.state(), good);
    }
}
