//! Saved device state: what a restore needs, as plain serde data.
//!
//! Each device keeps its persisted state next to its model (`SerialDeviceState` in
//! `legacy::serial`, `PciTransportState` in `virtio::pci`, `BlockState` in `virtio::block`,
//! `NetState` in `virtio::net`, `ConsoleState` in `virtio::console`, `RngState` in
//! `virtio::rng`, `PmemState` in `virtio::pmem`, `VsockState` in `virtio::vsock`); this module gathers them into one [`DeviceState`] per device
//! and holds the error every restore reports. One format serves snapshot/restore, live migration
//! and fault tolerance.
//!
//! The contract with the VMM: state is captured with every vCPU paused and the device event loop
//! stopped, so no device code runs and nothing is half done (devices handle requests
//! synchronously on the loop). On the destination the devices are built from the same VM
//! configuration, `restore` is called on each before any vCPU runs and before the event loop
//! starts; the loop then picks up whatever work the guest had queued.
//!
//! What is not here, on purpose: host resources (image files, TAPs, eventfds), which the
//! destination opens from its own configuration, and anything the device re-derives (event
//! loop registrations, "RX blocked until buffers").

use serde::{Deserialize, Serialize};

pub use crate::legacy::serial::SerialDeviceState;
pub use crate::virtio::block::{BlockCounters, BlockState};
pub use crate::virtio::console::{ConsoleCounters, ConsoleState};
pub use crate::virtio::net::{NetCounters, NetState};
pub use crate::virtio::pci::PciTransportState;
pub use crate::virtio::pmem::{PmemCounters, PmemState};
pub use crate::virtio::rng::{RngCounters, RngState};
pub use crate::virtio::vsock::{VsockCounters, VsockState};
pub use crate::virtio::VirtQueueState;

/// A virtio device's saved state: its transport's (registers, queues, interrupt status) and the
/// device model's own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VirtioState<D, T = PciTransportState> {
    pub transport: T,
    pub device: D,
}

/// The saved state of one device, by kind.
///
/// The i8042 has no variant: vm-superio's model keeps nothing but the reset eventfd (every read
/// returns 0 and the only command acted upon is the reset), so there is nothing to carry over.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Serial(SerialDeviceState),
    Block(VirtioState<BlockState>),
    Net(VirtioState<NetState>),
    Console(VirtioState<ConsoleState>),
    Rng(VirtioState<RngState>),
    Pmem(VirtioState<PmemState>),
    Vsock(VirtioState<VsockState>),
}

/// Why a saved state cannot be restored into a device. The destination builds its devices from
/// its own configuration; these say which part of it disagrees with the snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("disk image {path} has {have} sectors but the snapshot expects {want}")]
    Capacity {
        path: std::path::PathBuf,
        have: u64,
        want: u64,
    },
    #[error("{device}: the device has queues of sizes {have:?} but the snapshot expects {want:?} (num_queues / queue_size differ)")]
    QueueSizes {
        device: String,
        have: Vec<u16>,
        want: Vec<u16>,
    },
    #[error("{device}: the device offers features {have:#x} but the snapshot's device offered {want:#x} (its configuration differs, e.g. readonly, num_queues or mtu)")]
    Features {
        device: String,
        have: u64,
        want: u64,
    },
    #[error(
        "{device}: the snapshot's driver acked features {acked:#x}, not all offered ({offered:#x})"
    )]
    AckedFeatures {
        device: String,
        acked: u64,
        offered: u64,
    },
    #[error("{device}: the device has MTU {have:?} but the snapshot expects {want:?}")]
    Mtu {
        device: String,
        have: Option<u16>,
        want: Option<u16>,
    },
    #[error("virtio: the device has type {have} but the snapshot is of type {want}")]
    DeviceType { have: u32, want: u32 },
    #[error("virtio (device type {device_type}): queue {index}: {reason}")]
    Queue {
        device_type: u32,
        index: usize,
        reason: String,
    },
    #[error("virtio (device type {device_type}): inconsistent snapshot: {reason}")]
    Inconsistent { device_type: u32, reason: String },
    #[error("virtio (device type {device_type}): re-activating the device failed: {source}")]
    Activate {
        device_type: u32,
        source: crate::virtio::ActivateError,
    },
    #[error("serial: {0}")]
    Serial(String),
    #[error("cannot raise the interrupt pending in the snapshot: {0}")]
    Interrupt(std::io::Error),
}
