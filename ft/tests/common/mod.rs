//! What several of the FT crate's tests share.

use vmm::device_manager::DevicesState;
use vmm::vm::VmSnapshotState;
use vmm::x86_64::cpu_state::KvmVmState;

/// The state of a VM without vCPUs or devices: what a fake VM or a hand-written primary sends
/// as an epoch's state.
pub fn blank_state() -> VmSnapshotState {
    VmSnapshotState {
        vcpus: Vec::new(),
        kvm: KvmVmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: DevicesState {
            serial: None,
            virtio: Vec::new(),
            pmem_pages: Vec::new(),
            pci_hotplug: Default::default(),
        },
        acpi_events: 0,
    }
}
