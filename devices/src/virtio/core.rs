//! What every virtio transport shares (virtio 1.x, 2 "Basic Facilities of a Virtio Device"):
//! feature negotiation, the device status state machine, the queues' sizes and addresses, the
//! interrupt status bits, activation and reset, and the saved state of all of it.
//!
//! The transport (virtio-pci) decodes its registers and calls into [`VirtioCore`]; the core
//! hands the device its queues on DRIVER_OK together with one notification eventfd per queue
//! and the transport's interrupt handle.
//!
//! The guest is not trusted: any register sequence, however wrong, leaves the VMM running. Wrong
//! accesses are ignored and logged once per kind of mistake.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActiveQueue, InterruptKind, VirtQueueState, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::state::RestoreError;
use crate::GuestMemoryMmap;

/// Device status bits (2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Interrupt status bits (the virtio-pci ISR, 4.1.4.5).
pub const INTERRUPT_USED_BUFFER: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
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

/// The transport-independent saved state: every register the driver programmed, the interrupt
/// status and each queue. For an activated device the queues carry the device's progress (taken
/// from the device, which owns the live queues), so a restore re-activates the device exactly
/// where it stopped. The notification and interrupt eventfds are host resources and are not
/// saved.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VirtioCoreState {
    /// Checked on restore: a snapshot of one device type cannot go into another.
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// Pending interrupt status bits; re-raised on restore since the guest may not have seen
    /// the interrupt.
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// DRIVER_OK accepted and the device handed its queues (not reset since).
    pub activated: bool,
    pub queues: Vec<VirtQueueState>,
}

/// Kinds of guest mistakes, each logged once per transport so a looping guest cannot flood the
/// log.
#[derive(Clone, Copy)]
pub(crate) enum Warn {
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
    Msix,
    Bar,
}

/// Which ring address a register sets.
#[derive(Clone, Copy)]
pub(crate) enum Ring {
    Desc,
    Driver,
    Device,
}

/// One virtio device's transport-independent registers and queues.
pub struct VirtioCore {
    /// Names the transport in log lines ("virtio-pci").
    transport: &'static str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    device_type: u32,
    avail_features: u64,
    /// The register-side view of each queue; a fresh `Queue` is built from it on activation, so
    /// the device never shares state with the registers.
    queues: Vec<Queue>,
    notify: Vec<Arc<EventFd>>,
    interrupt_status: Arc<AtomicU32>,
    interrupt: Arc<dyn VirtioInterrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// No device changes its config space yet, so this stays 0, but it is part of the saved
    /// state so that one that does later keeps the guest's view consistent.
    config_generation: u32,
    activated: bool,
    warned: u32,
}

impl VirtioCore {
    /// Wraps `device`. `interrupt` is what the device is handed on activation; it sets bits in
    /// `interrupt_status`, which the transport shows the guest.
    pub fn new(
        transport: &'static str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt_status: Arc<AtomicU32>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Self, TransportError> {
        let (device_type, avail_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        if max_sizes.is_empty() || max_sizes.len() > 1024 {
            return Err(TransportError::QueueCount(max_sizes.len()));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut notify = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            queues
                .push(Queue::new(size).map_err(|_| TransportError::QueueMaxSize { index, size })?);
            let evt = EventFd::new(EFD_NONBLOCK)
                .map_err(|source| TransportError::EventFd { index, source })?;
            notify.push(Arc::new(evt));
        }
        Ok(Self {
            transport,
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
    pub fn state(&self) -> VirtioCoreState {
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
        VirtioCoreState {
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
    pub fn restore(&mut self, state: &VirtioCoreState) -> Result<(), RestoreError> {
        if self.status != 0 || self.activated {
            self.reset();
        }
        let result = self.try_restore(state);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn try_restore(&mut self, state: &VirtioCoreState) -> Result<(), RestoreError> {
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
                device: format!("{} (device type {device_type})", self.transport),
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

    /// One eventfd per queue, in queue order: what the guest's notifications signal (the VMM
    /// registers them as KVM ioeventfds).
    pub fn queue_notify_evts(&self) -> Vec<Arc<EventFd>> {
        self.notify.clone()
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated (DRIVER_OK accepted) and not reset since.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The interrupt status bits (bit 0 used buffer, bit 1 config change).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::SeqCst)
    }

    /// The interrupt handle the device is given.
    pub fn interrupt(&self) -> &Arc<dyn VirtioInterrupt> {
        &self.interrupt
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    pub fn queue_sel(&self) -> u32 {
        self.queue_sel
    }

    pub fn set_queue_sel(&mut self, sel: u32) {
        self.queue_sel = sel;
    }

    pub fn set_device_features_sel(&mut self, sel: u32) {
        self.device_features_sel = sel;
    }

    pub fn set_driver_features_sel(&mut self, sel: u32) {
        self.driver_features_sel = sel;
    }

    /// The word of the device's features `device_feature_select` selects (0 past the second).
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.avail_features as u32,
            1 => (self.avail_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The word of the driver's features `driver_feature_select` selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    pub fn write_driver_features(&mut self, value: u32) {
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED) != STATUS_DRIVER {
            let status = self.status;
            self.warn(
                Warn::WrongState,
                format_args!("driver features written in device status {status:#x}"),
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
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

    /// The selected queue's register view, if `queue_select` is in range (quietly: for reads).
    pub fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    pub fn set_queue_size(&mut self, value: u32) {
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
                format_args!("invalid queue size {value} (must be a power of two, 1..={max})"),
            );
        }
    }

    pub fn set_queue_ready(&mut self, value: u32) {
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
        // Refuse a queue whose rings are not in guest memory; the guest reads back "not ready"
        // and activation will not see the queue.
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

    /// Sets one half (`low` or `high`) or both of a ring address of the selected queue.
    pub(crate) fn set_queue_address(&mut self, ring: Ring, low: Option<u32>, high: Option<u32>) {
        if !self.queue_config_allowed() {
            return;
        }
        let Some(queue) = self.selected_queue() else {
            return;
        };
        if queue.ready() {
            // 4.1.4.3.2: the driver must not change a ready queue's addresses.
            self.warn(
                Warn::WrongState,
                format_args!("address of a ready queue written"),
            );
            return;
        }
        // The setters reject misaligned addresses and keep the old value.
        match ring {
            Ring::Desc => queue.set_desc_table_address(low, high),
            Ring::Driver => queue.set_avail_ring_address(low, high),
            Ring::Device => queue.set_used_ring_address(low, high),
        }
    }

    pub(crate) fn warn(&mut self, kind: Warn, msg: std::fmt::Arguments) {
        let bit = 1u32 << (kind as u32);
        if self.warned & bit == 0 {
            self.warned |= bit;
            log::warn!(
                "{} (device type {}): {msg} (further such warnings suppressed)",
                self.transport,
                self.device_type
            );
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = self.queue_sel as usize;
        if sel >= self.queues.len() {
            self.warn(
                Warn::QueueSel,
                format_args!("queue_select {sel} is out of range"),
            );
            return None;
        }
        self.queues.get_mut(sel)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK (3.1.1, 4.1.5.1.3).
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

    /// A notification write that reached the VMM as an MMIO exit (no ioeventfd registered, e.g.
    /// in tests): signal the same eventfd the ioeventfd would have.
    pub fn notify_queue(&mut self, value: u32) {
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

    pub fn write_status(&mut self, value: u32) {
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
                let result =
                    lock(&self.device).activate(self.mem.clone(), self.interrupt.clone(), queues);
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
    pub fn reset(&mut self) {
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

/// A poisoned lock means a thread panicked inside the device; with panic=abort that cannot
/// happen, so recovering the guard is sound.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The core's behaviour as a driver sees it: feature negotiation, the status state machine,
/// queue validation, activation, reset and saved state, all driven through the virtio-pci
/// common configuration (the transport the VMM ships) with INTx and the ISR for interrupts.
#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::super::pci::{
        vector_count, IntxLine, PciResources, PciTransportState, VirtioPciDevice, BAR_INDEX,
    };
    use super::super::{ActivateError, ActiveQueue, VirtQueueState, VIRTIO_F_VERSION_1};
    use super::*;
    use crate::pci::msix::MsixVector;
    use crate::pci::{IoEventRegistry, MsiRouter, PciDevice};

    // The common configuration fields (4.1.4.3) and the other structures, at the offsets the
    // function's capabilities announce in its BAR.
    const DEVICE_FEATURE_SELECT: u64 = 0x00;
    const DEVICE_FEATURE: u64 = 0x04;
    const DRIVER_FEATURE_SELECT: u64 = 0x08;
    const DRIVER_FEATURE: u64 = 0x0c;
    const NUM_QUEUES: u64 = 0x12;
    const DEVICE_STATUS: u64 = 0x14;
    const CONFIG_GENERATION: u64 = 0x15;
    const QUEUE_SELECT: u64 = 0x16;
    const QUEUE_SIZE: u64 = 0x18;
    const QUEUE_ENABLE: u64 = 0x1c;
    const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    const QUEUE_DESC: u64 = 0x20;
    const QUEUE_DRIVER: u64 = 0x28;
    const QUEUE_DEVICE: u64 = 0x30;
    const ISR: u64 = 0x1000;
    const DEVICE_CFG: u64 = 0x2000;
    const NOTIFY: u64 = 0x3000;
    const NOTIFY_MULTIPLIER: u64 = 4;

    const S_FEATURES: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    const S_LIVE: u32 = S_FEATURES | STATUS_DRIVER_OK;

    #[derive(Default)]
    struct Fake {
        acked: u64,
        activations: usize,
        resets: usize,
        fail_activate: bool,
        queue_count: usize,
        config: [u8; 8],
        live: Vec<VirtQueueState>,
        notify: Vec<Arc<EventFd>>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
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
            interrupt: Arc<dyn VirtioInterrupt>,
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
            self.notify = queues.iter().map(|q| q.notify.clone()).collect();
            self.interrupt = Some(interrupt);
            Ok(())
        }
        fn active_queue_states(&self) -> Vec<VirtQueueState> {
            self.live.clone()
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.live.clear();
            self.notify.clear();
            self.interrupt = None;
        }
    }

    /// No KVM: routes and ioeventfds go nowhere.
    struct NoKvm;

    impl MsiRouter for NoKvm {
        fn route(&self, _gsi: u32, _address: u64, _data: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl IoEventRegistry for NoKvm {
        fn register(&self, _evt: &EventFd, _address: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn unregister(&self, _evt: &EventFd, _address: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Rig {
        dev: VirtioPciDevice,
        fake: Arc<Mutex<Fake>>,
        intx: EventFd,
    }

    fn setup() -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let fake = Arc::new(Mutex::new(Fake::default()));
        let intx = EventFd::new(EFD_NONBLOCK).unwrap();
        let kvm = Arc::new(NoKvm);
        let vectors = (0..vector_count(2))
            .map(|i| MsixVector {
                gsi: 24 + i as u32,
                irq: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        let dev = VirtioPciDevice::new(
            fake.clone(),
            mem,
            PciResources {
                bar_address: 0xc000_0000,
                intx: Some(IntxLine {
                    irq: intx.try_clone().unwrap(),
                    resample: EventFd::new(EFD_NONBLOCK).unwrap(),
                    line: 5,
                }),
                vectors,
                router: kvm.clone(),
                ioevents: kvm,
            },
        )
        .unwrap();
        Rig { dev, fake, intx }
    }

    impl Rig {
        fn r(&mut self, offset: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.read_bar(BAR_INDEX, offset, &mut b[..len]);
            u64::from_le_bytes(b)
        }

        fn w(&mut self, offset: u64, value: u64, len: usize) {
            self.dev
                .write_bar(BAR_INDEX, offset, &value.to_le_bytes()[..len]);
        }

        fn status(&mut self) -> u32 {
            self.r(DEVICE_STATUS, 1) as u32
        }

        fn set_status(&mut self, status: u32) {
            self.w(DEVICE_STATUS, status.into(), 1);
        }

        fn isr(&mut self) -> u32 {
            self.r(ISR, 1) as u32
        }

        fn negotiate(&mut self, features: u64) -> bool {
            self.set_status(STATUS_ACKNOWLEDGE);
            self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            self.w(DRIVER_FEATURE_SELECT, 0, 4);
            self.w(DRIVER_FEATURE, features & 0xffff_ffff, 4);
            self.w(DRIVER_FEATURE_SELECT, 1, 4);
            self.w(DRIVER_FEATURE, features >> 32, 4);
            self.set_status(S_FEATURES);
            self.status() == S_FEATURES
        }

        /// Rings at `base`, `base + 0x1000` and `base + 0x2000`, set as two 32-bit halves.
        fn setup_queue(&mut self, sel: u64, size: u64, base: u64) {
            self.w(QUEUE_SELECT, sel, 2);
            self.w(QUEUE_SIZE, size, 2);
            for (field, addr) in [
                (QUEUE_DESC, base),
                (QUEUE_DRIVER, base + 0x1000),
                (QUEUE_DEVICE, base + 0x2000),
            ] {
                self.w(field, addr & 0xffff_ffff, 4);
                self.w(field + 4, addr >> 32, 4);
            }
            self.w(QUEUE_ENABLE, 1, 2);
        }

        fn activated(&self) -> bool {
            self.dev.is_activated()
        }
    }

    #[test]
    fn common_config_reads() {
        let mut t = setup();
        t.w(DEVICE_FEATURE_SELECT, 0, 4);
        assert_eq!(t.r(DEVICE_FEATURE, 4), 0b101);
        t.w(DEVICE_FEATURE_SELECT, 1, 4);
        assert_eq!(t.r(DEVICE_FEATURE, 4), 1);
        t.w(DEVICE_FEATURE_SELECT, 7, 4);
        assert_eq!(t.r(DEVICE_FEATURE, 4), 0);
        assert_eq!(t.r(NUM_QUEUES, 2), 2);
        // Before the driver sets a size, queue_size reads the maximum.
        t.w(QUEUE_SELECT, 1, 2);
        assert_eq!(t.r(QUEUE_SELECT, 2), 1);
        assert_eq!(t.r(QUEUE_SIZE, 2), 8);
        assert_eq!(t.r(QUEUE_NOTIFY_OFF, 2), 1);
        // A queue past num_queues reads as absent.
        t.w(QUEUE_SELECT, 5, 2);
        assert_eq!(t.r(QUEUE_SIZE, 2), 0);
        assert_eq!(t.r(QUEUE_ENABLE, 2), 0);
        assert_eq!(t.r(CONFIG_GENERATION, 1), 0);
        // Any width, any offset: the bytes of the fields there (status, then generation).
        t.set_status(STATUS_ACKNOWLEDGE);
        assert_eq!(t.r(DEVICE_STATUS, 2), u64::from(STATUS_ACKNOWLEDGE));
        assert_eq!(t.r(NUM_QUEUES + 1, 1), 0);
    }

    #[test]
    fn misfit_and_read_only_writes_are_ignored() {
        let mut t = setup();
        assert!(t.negotiate(VIRTIO_F_VERSION_1));
        t.w(QUEUE_SELECT, 0, 2);
        // A queue address takes 4- or 8-byte writes at its halves, nothing else.
        t.w(QUEUE_DESC, 0x1000, 2);
        t.w(QUEUE_DESC + 2, 0x1000, 4);
        assert_eq!(t.r(QUEUE_DESC, 8), 0);
        t.w(QUEUE_DESC, 0x1_0000, 8);
        assert_eq!(t.r(QUEUE_DESC, 8), 0x1_0000);
        t.w(QUEUE_DESC + 4, 0, 4);
        t.w(QUEUE_DESC, 0x2_0000, 4);
        assert_eq!(t.r(QUEUE_DESC, 8), 0x2_0000);
        // Read-only fields keep their values.
        t.w(NUM_QUEUES, 9, 2);
        t.w(CONFIG_GENERATION, 9, 1);
        t.w(QUEUE_NOTIFY_OFF, 9, 2);
        assert_eq!(t.r(NUM_QUEUES, 2), 2);
        assert_eq!(t.r(CONFIG_GENERATION, 1), 0);
        assert_eq!(t.r(QUEUE_NOTIFY_OFF, 2), 0);
        // An empty write does nothing.
        t.dev.write_bar(BAR_INDEX, DEVICE_STATUS, &[]);
        assert_eq!(t.status(), S_FEATURES);
    }

    #[test]
    fn device_config_any_width() {
        let mut t = setup();
        t.dev.write_bar(BAR_INDEX, DEVICE_CFG + 2, &[7, 8]);
        assert_eq!(t.r(DEVICE_CFG + 3, 1), 8);
        let mut b = [0u8; 8];
        t.dev.read_bar(BAR_INDEX, DEVICE_CFG, &mut b);
        assert_eq!(b, [0, 0, 7, 8, 0, 0, 0, 0]);
        assert_eq!(t.fake.lock().unwrap().config[2], 7);
    }

    #[test]
    fn feature_negotiation() {
        let mut t = setup();
        // Unoffered bit 1: refused.
        assert!(!t.negotiate(VIRTIO_F_VERSION_1 | 0b10));
        t.set_status(0);
        // No VERSION_1: refused.
        assert!(!t.negotiate(0b1));
        t.set_status(0);
        assert!(t.negotiate(VIRTIO_F_VERSION_1 | 0b100));
        assert_eq!(t.fake.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 0b100);
        // Features are frozen after FEATURES_OK.
        t.w(DRIVER_FEATURE_SELECT, 0, 4);
        t.w(DRIVER_FEATURE, 0b1, 4);
        assert_eq!(t.r(DRIVER_FEATURE, 4), 0b100);
        assert_eq!(
            t.dev.state().virtio.driver_features,
            VIRTIO_F_VERSION_1 | 0b100
        );
    }

    #[test]
    fn status_must_step_forward() {
        let mut t = setup();
        t.set_status(STATUS_DRIVER);
        assert_eq!(t.status(), 0);
        t.set_status(STATUS_ACKNOWLEDGE);
        t.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE);
        t.set_status(STATUS_ACKNOWLEDGE | STATUS_FAILED);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_FAILED);
        // FAILED is final until a reset.
        t.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_FAILED);
        t.set_status(0);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn activation_with_valid_queues_and_reset() {
        let mut t = setup();
        assert!(t.negotiate(VIRTIO_F_VERSION_1));
        t.setup_queue(0, 16, 0x1_0000);
        t.setup_queue(1, 8, 0x2_0000);
        assert_eq!(t.r(QUEUE_ENABLE, 2), 1);
        t.set_status(S_LIVE);
        assert_eq!(t.status(), S_LIVE);
        assert!(t.activated());
        assert_eq!(t.fake.lock().unwrap().activations, 1);
        assert_eq!(t.fake.lock().unwrap().queue_count, 2);
        // Queue registers are frozen after DRIVER_OK.
        t.w(QUEUE_SELECT, 0, 2);
        t.w(QUEUE_ENABLE, 0, 2);
        t.w(QUEUE_SIZE, 4, 2);
        assert_eq!(t.r(QUEUE_ENABLE, 2), 1);
        assert_eq!(t.r(QUEUE_SIZE, 2), 16);

        t.set_status(0);
        assert_eq!(t.status(), 0);
        assert!(!t.activated());
        assert_eq!(t.fake.lock().unwrap().resets, 1);
        assert_eq!(t.r(QUEUE_ENABLE, 2), 0);
        assert_eq!(t.r(QUEUE_DESC, 8), 0);
        // And again, with only the first queue.
        assert!(t.negotiate(VIRTIO_F_VERSION_1));
        t.setup_queue(0, 4, 0x1_0000);
        t.set_status(S_LIVE);
        assert_eq!(t.fake.lock().unwrap().activations, 2);
        assert_eq!(t.fake.lock().unwrap().queue_count, 1);
        assert_eq!(t.fake.lock().unwrap().live[0].size, 4);
    }

    #[test]
    fn bad_queue_values_are_refused() {
        let mut t = setup();
        // Queue registers before FEATURES_OK are ignored.
        t.w(QUEUE_SIZE, 4, 2);
        assert_eq!(t.r(QUEUE_SIZE, 2), 16);
        assert!(t.negotiate(VIRTIO_F_VERSION_1));
        t.w(QUEUE_SELECT, 0, 2);
        for bad in [12, 32, 0] {
            // Not a power of two, above the maximum, zero.
            t.w(QUEUE_SIZE, bad, 2);
            assert_eq!(t.r(QUEUE_SIZE, 2), 16, "size {bad}");
        }
        // Rings outside guest memory: enabling is refused.
        t.w(QUEUE_DESC, 0, 4);
        t.w(QUEUE_DESC + 4, 0x10, 4);
        t.w(QUEUE_ENABLE, 1, 2);
        assert_eq!(t.r(QUEUE_ENABLE, 2), 0);
        // A queue past num_queues.
        t.w(QUEUE_SELECT, 99, 2);
        t.w(QUEUE_SIZE, 4, 2);
        t.w(QUEUE_ENABLE, 1, 2);
        assert_eq!(t.r(QUEUE_ENABLE, 2), 0);
        // A notification of a queue that does not exist.
        t.w(NOTIFY + 99 * NOTIFY_MULTIPLIER, 99, 2);
        // Queue 1 enabled without queue 0: activation fails, NEEDS_RESET and a config
        // interrupt.
        t.setup_queue(1, 8, 0x2_0000);
        t.set_status(S_LIVE);
        assert_eq!(t.status(), S_FEATURES | STATUS_DEVICE_NEEDS_RESET);
        assert!(!t.activated());
        assert_eq!(t.intx.read().unwrap(), 1);
        assert_eq!(t.isr(), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(t.isr(), 0);
    }

    #[test]
    fn device_activation_failure_needs_reset() {
        let mut t = setup();
        t.fake.lock().unwrap().fail_activate = true;
        assert!(t.negotiate(VIRTIO_F_VERSION_1));
        t.setup_queue(0, 16, 0x1_0000);
        t.set_status(S_LIVE);
        assert_eq!(
            t.status() & STATUS_DEVICE_NEEDS_RESET,
            STATUS_DEVICE_NEEDS_RESET
        );
        assert_eq!(t.intx.read().unwrap(), 1);
        // Only reset leaves the broken state.
        t.set_status(S_LIVE);
        assert!(!t.activated());
        t.set_status(0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.isr(), 0);
        t.fake.lock().unwrap().fail_activate = false;
        assert!(t.negotiate(VIRTIO_F_VERSION_1));
        t.setup_queue(0, 16, 0x1_0000);
        t.set_status(S_LIVE);
        assert!(t.activated());
    }

    #[test]
    fn notifications_signal_their_queue() {
        let mut t = setup();
        assert!(t.negotiate(VIRTIO_F_VERSION_1));
        t.setup_queue(0, 16, 0x1_0000);
        t.setup_queue(1, 8, 0x2_0000);
        t.set_status(S_LIVE);
        let evts = t.fake.lock().unwrap().notify.clone();
        t.w(QUEUE_SELECT, 1, 2);
        let off = t.r(QUEUE_NOTIFY_OFF, 2);
        t.w(NOTIFY + off * NOTIFY_MULTIPLIER, 1, 2);
        assert!(evts[0].read().is_err());
        assert_eq!(evts[1].read().unwrap(), 1);
        t.w(NOTIFY, 0, 2);
        assert_eq!(evts[0].read().unwrap(), 1);
        // Notifications left unread when the driver resets do not fire after reactivation.
        t.w(NOTIFY, 0, 2);
        t.set_status(0);
        assert!(evts[0].read().is_err());
    }

    fn json_round_trip(state: &PciTransportState) -> PciTransportState {
        let json = serde_json::to_string(state).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn activated_state_round_trips_and_reactivates_with_progress() {
        let mut t = setup();
        assert!(t.negotiate(VIRTIO_F_VERSION_1 | 0b100));
        t.setup_queue(0, 16, 0x1_0000);
        t.setup_queue(1, 8, 0x2_0000);
        t.set_status(S_LIVE);
        t.w(QUEUE_SELECT, 1, 2);
        t.w(DEVICE_FEATURE_SELECT, 1, 4);
        // The device made progress and interrupted; the guest has not taken it yet.
        let interrupt = {
            let mut f = t.fake.lock().unwrap();
            f.live[0].next_avail = 5;
            f.live[0].next_used = 4;
            f.live[1].next_avail = 2;
            f.interrupt.clone().unwrap()
        };
        interrupt.trigger(InterruptKind::Queue(0)).unwrap();

        let state = t.dev.state();
        let v = &state.virtio;
        assert!(v.activated);
        assert_eq!(v.status, S_LIVE);
        assert_eq!(v.interrupt_status, INTERRUPT_USED_BUFFER);
        assert_eq!((v.queues[0].next_avail, v.queues[0].next_used), (5, 4));
        assert_eq!(v.queues[1].size, 8);
        assert_eq!(v.queues[0].desc_table, 0x1_0000);
        let saved = json_round_trip(&state);
        assert_eq!(saved, state);

        let mut t2 = setup();
        t2.dev.restore(&saved).unwrap();
        assert_eq!(t2.dev.state(), state);
        assert!(t2.activated());
        {
            let f2 = t2.fake.lock().unwrap();
            assert_eq!(f2.activations, 1);
            assert_eq!(f2.queue_count, 2);
            assert_eq!(f2.acked, VIRTIO_F_VERSION_1 | 0b100);
            assert_eq!((f2.live[0].next_avail, f2.live[0].next_used), (5, 4));
        }
        // The pending interrupt is raised again, and the registers read as before.
        assert_eq!(t2.intx.read().unwrap(), 1);
        assert_eq!(t2.isr(), INTERRUPT_USED_BUFFER);
        assert_eq!(t2.status(), S_LIVE);
        assert_eq!(t2.r(QUEUE_SIZE, 2), 8);
        assert_eq!(t2.r(QUEUE_DESC, 8), 0x2_0000);
        assert_eq!(t2.r(DEVICE_FEATURE, 4), 1);
        // A restored device resets like any other.
        t2.set_status(0);
        assert!(!t2.activated());
        assert_eq!(t2.fake.lock().unwrap().resets, 1);
    }

    #[test]
    fn state_mid_negotiation_round_trips_without_activation() {
        let mut t = setup();
        assert!(t.negotiate(VIRTIO_F_VERSION_1));
        t.setup_queue(0, 4, 0x1_0000);
        let state = t.dev.state();
        assert!(!state.virtio.activated);
        let mut t2 = setup();
        t2.dev.restore(&json_round_trip(&state)).unwrap();
        assert_eq!(t2.dev.state(), state);
        assert_eq!(t2.fake.lock().unwrap().activations, 0);
        assert_eq!(t2.fake.lock().unwrap().acked, VIRTIO_F_VERSION_1);
        assert!(t2.intx.read().is_err());
        // The driver carries on where it was: queue 1, then DRIVER_OK.
        t2.setup_queue(1, 8, 0x2_0000);
        t2.set_status(S_LIVE);
        assert!(t2.activated());
        assert_eq!(t2.fake.lock().unwrap().live[0].size, 4);
    }

    #[test]
    fn mismatched_snapshots_are_refused_and_leave_the_transport_reset() {
        let mut t = setup();
        assert!(t.negotiate(VIRTIO_F_VERSION_1));
        t.setup_queue(0, 16, 0x1_0000);
        let good = t.dev.state();
        let refused = |t: &mut Rig, edit: &dyn Fn(&mut VirtioCoreState)| {
            let mut bad = good.clone();
            edit(&mut bad.virtio);
            let err = t.dev.restore(&bad).unwrap_err().to_string();
            assert_eq!(t.status(), 0, "{err}");
            err
        };

        let err = refused(&mut t, &|v| v.device_type = 2);
        assert!(err.contains("type 42") && err.contains("type 2"), "{err}");
        let err = refused(&mut t, &|v| {
            v.queues.pop();
        });
        assert!(err.contains("2 queues but the snapshot has 1"), "{err}");
        let err = refused(&mut t, &|v| v.queues[1].max_size = 32);
        assert!(
            err.contains("queue 1") && err.contains("maximum size is 8"),
            "{err}"
        );
        let err = refused(&mut t, &|v| v.queues[0].desc_table = 0x10_0000_0000);
        assert!(err.contains("not in guest memory"), "{err}");
        let err = refused(&mut t, &|v| v.driver_features |= 0b10);
        assert!(err.contains("not all offered"), "{err}");
        let err = refused(&mut t, &|v| v.activated = true);
        assert!(err.contains("lacks DRIVER_OK"), "{err}");

        let json = serde_json::to_string(&good).unwrap().replacen(
            "\"virtio\":{",
            "\"virtio\":{\"surprise\":1,",
            1,
        );
        assert!(json.contains("surprise"));
        assert!(serde_json::from_str::<PciTransportState>(&json).is_err());

        t.dev.restore(&good).unwrap();
        assert_eq!(t.dev.state(), good);
    }
}
