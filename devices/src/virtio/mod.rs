//! Virtio devices (virtio 1.x) and their transport, virtio-pci.
//!
//! A device implements [`VirtioDevice`]: its identity, features, config space and what happens
//! when the driver activates it. The transport (`pci`) owns the guest-facing registers; what
//! does not depend on the transport (queue configuration, status, features, interrupt status,
//! activation, saved state) is in `core`.
//! On activation the device gets its queues, their notification eventfds (ioeventfds
//! registered with KVM) and an interrupt handle. Devices do their queue work on the device
//! event loop thread (`event-manager`), never on a vCPU thread.

/// The [`VirtioDevice`] methods every device implements alike, over its fields `queue_sizes`
/// (`Vec<u16>` or array), `avail_features` and `acked_features` (`u64`): its type, queue sizes
/// and feature negotiation (the driver gets only what was offered).
macro_rules! virtio_device_basics {
    ($device_type:expr) => {
        fn device_type(&self) -> u32 {
            $device_type
        }

        fn queue_max_sizes(&self) -> &[u16] {
            &self.queue_sizes
        }

        fn avail_features(&self) -> u64 {
            self.avail_features
        }

        fn ack_features(&mut self, features: u64) {
            self.acked_features = features & self.avail_features;
        }
    };
}

pub mod block;
pub mod console;
pub mod core;
pub mod fs;
pub mod net;
pub mod pci;
pub mod pmem;
pub mod rng;
pub mod vhost_user;
pub mod vsock;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// Device IDs from the virtio specification (5 Device Types).
pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_ID_CONSOLE: u32 = 3;
pub const VIRTIO_ID_RNG: u32 = 4;

/// Feature bits every device offers (6 Reserved Feature Bits).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Why the device wants the driver's attention (the ISR bits, 4.1.4.5, or an MSI-X vector).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// Used buffers were added to the queue with this index (a virtio-pci transport with
    /// MSI-X interrupts through that queue's vector).
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// How a device interrupts the guest; implemented by the transport.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;

    /// An eventfd whose every write raises `kind`'s interrupt with no work in this process:
    /// for a device whose queues another process serves (vhost-user), which signals it
    /// directly. With MSI-X that is the vector's KVM irqfd, as Cloud Hypervisor hands it out.
    /// None when the interrupt needs this process's bookkeeping (INTx and the ISR, or no
    /// vector assigned): the device then relays the backend's signals through
    /// [`VirtioInterrupt::trigger`].
    fn notifier(&self, _kind: InterruptKind) -> Option<EventFd> {
        None
    }
}

/// A queue handed to a device on activation, with the eventfd the guest's notifications
/// (writes to the queue's notify address, caught by a KVM ioeventfd) arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: Arc<EventFd>,
}

/// One virtqueue's saved state. Mirrors virtio-queue's `QueueState`, which has no serde
/// support: the driver's configuration (size, ready, ring addresses) and the device's progress
/// (`next_avail`: the next avail ring entry to take; `next_used`: the next used ring slot).
/// Restoring the progress is what makes the device continue exactly where it stopped: chains
/// made available but not taken are served after restore, and the used index carries on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VirtQueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for VirtQueueState {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<VirtQueueState> for QueueState {
    fn from(q: VirtQueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues but the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    #[error("device activation failed: {0}")]
    Device(String),
}

/// The driver's "no interrupt, please" flag in the avail ring (2.7.7).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver wants an interrupt for what was just added to `queue`'s used ring. With
/// EVENT_IDX that is virtio-queue's `used_event` check; without it, the avail ring's
/// NO_INTERRUPT flag (2.7.7), which virtio-queue does not look at: polling drivers (the test
/// guest, Linux's NAPI) set it, and an interrupt they did not ask for costs a VM exit on a
/// polling vCPU. A ring that cannot be read asks for one: a spurious interrupt is harmless, a
/// lost one stalls the driver.
pub fn driver_wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used-ring writes must be visible before the flag is read (as needs_notification does).
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map_or(true, |flags| flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

/// Reads `data.len()` bytes of a device's configuration space `config` at `offset`; bytes past
/// its end read as 0 (what every device here does with an out-of-range read).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// What a device's restore checks before anything else: it was built with the same queues and
/// offers the same features as the snapshot's device, and the driver acked only offered ones.
pub fn check_restored_device(
    device: &str,
    queue_sizes: (&[u16], &[u16]),
    avail_features: (u64, u64),
    acked_features: u64,
) -> Result<(), crate::RestoreError> {
    use crate::RestoreError;
    let ((have_sizes, want_sizes), (have, want)) = (queue_sizes, avail_features);
    if have_sizes != want_sizes {
        return Err(RestoreError::QueueSizes {
            device: device.to_string(),
            have: have_sizes.to_vec(),
            want: want_sizes.to_vec(),
        });
    }
    if have != want {
        return Err(RestoreError::Features {
            device: device.to_string(),
            have,
            want,
        });
    }
    if acked_features & !have != 0 {
        return Err(RestoreError::AckedFeatures {
            device: device.to_string(),
            acked: acked_features,
            offered: have,
        });
    }
    Ok(())
}

/// Checks that the driver set up exactly `want` queues, all in guest memory.
pub fn check_active_queues(
    queues: &[ActiveQueue],
    mem: &GuestMemoryMmap,
    want: usize,
) -> Result<(), ActivateError> {
    if queues.len() != want {
        return Err(ActivateError::QueueCount {
            got: queues.len(),
            want,
        });
    }
    match queues.iter().position(|q| !q.queue.is_valid(mem)) {
        Some(i) => Err(ActivateError::InvalidQueue(i)),
        None => Ok(()),
    }
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of `avail_features`), before activation.
    fn ack_features(&mut self, features: u64);
    /// Reads from the device-specific configuration space; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration space; most devices ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start processing the queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// The state of the queues the device is working on, in queue order; empty when it is not
    /// activated. The transport saves these, not its own register copies, because only the
    /// device knows how far it got (`next_avail`, `next_used`).
    fn active_queue_states(&self) -> Vec<VirtQueueState>;
    /// The driver reset the device (status 0): stop processing and drop the queues; the device
    /// must be able to activate again.
    fn reset(&mut self);
}
