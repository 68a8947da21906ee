//! Virtio devices (virtio 1.x) and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]: its identity, features, config space and what happens
//! when the driver activates it. The transport (`mmio`) owns the guest-facing registers, the
//! queues' configuration and the interrupt status, and hands the device its queues, their
//! notification eventfds (ioeventfds registered with KVM) and an interrupt handle on
//! activation. Devices do their queue work on the device event loop thread (`event-manager`),
//! never on a vCPU thread.

pub mod block;
pub mod mmio;
pub mod net;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// Device IDs from the virtio specification (5 Device Types).
pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Feature bits every device offers (6 Reserved Feature Bits).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Why the device wants the driver's attention (4.2.2 interrupt status bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// Used buffers were added to a queue.
    Queue,
    /// The device configuration changed.
    Config,
}

/// How a device interrupts the guest; implemented by the transport.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
}

/// A queue handed to a device on activation, with the eventfd the guest's notifications
/// (QueueNotify writes, caught by a KVM ioeventfd) arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: Arc<EventFd>,
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
    /// The driver reset the device (status 0): stop processing and drop the queues; the device
    /// must be able to activate again.
    fn reset(&mut self);
}
