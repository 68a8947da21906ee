//! Emulated devices of a Tandem VM.
//!
//! Each device keeps its model and its guest-facing register interface side by side. Devices see
//! only what they need: an interrupt line (an `EventFd` the VMM wires to KVM as an irqfd) and the
//! outputs they drive. They know nothing of vCPUs, KVM or fault tolerance.

pub mod acpi;
pub mod bus;
pub mod gate;
pub mod legacy;
pub mod pci;
pub mod state;
pub mod tap;
pub mod virtio;

pub use bus::{BusDevice, IoBus, IoBusError};
pub use state::{DeviceState, RestoreError, VirtioState};

/// Guest memory as devices see it: every write through it marks the page in the dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
