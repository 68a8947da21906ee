//! What PCI functions need from KVM while the guest runs: MSI routes for their MSI-X vectors
//! (KVM GSI routing, each vector an irqfd on a GSI of its own) and notification ioeventfds
//! that follow a BAR the guest moves. Both are called from vCPU threads (the guest's
//! configuration and MSI-X table writes), so the vCPU seccomp filter allows these two ioctls.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::{IoEventRegistry, MsiRouter};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC pins; GSIs from here on are ours to give to MSI vectors.
pub const IOAPIC_PINS: u32 = 24;
/// PIC pins (two cascaded 8259s).
const PIC_PINS: u32 = 16;

pub struct KvmRouting {
    vm_fd: Arc<VmFd>,
    /// MSI routes by GSI; the whole table is handed to KVM on every change.
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
}

impl KvmRouting {
    pub fn new(vm_fd: Arc<VmFd>) -> Self {
        Self {
            vm_fd,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// KVM's default routes (what `KVM_CREATE_IRQCHIP` installs: the PIC for 0-15, the IOAPIC
    /// for 0-23) followed by the MSI routes, since `KVM_SET_GSI_ROUTING` replaces the table.
    fn table(msi: &BTreeMap<u32, (u64, u32)>) -> std::io::Result<KvmIrqRouting> {
        let mut entries = Vec::with_capacity((PIC_PINS + IOAPIC_PINS) as usize + msi.len());
        for gsi in 0..PIC_PINS {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(irqchip_route(gsi, chip, pin));
        }
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, &(address, data)) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("GSI routing table: {e:?}")))
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

impl MsiRouter for KvmRouting {
    fn route(&self, gsi: u32, address: u64, data: u32) -> std::io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        if msi.get(&gsi) == Some(&(address, data)) {
            return Ok(());
        }
        msi.insert(gsi, (address, data));
        let table = Self::table(&msi)?;
        self.vm_fd
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl IoEventRegistry for KvmRouting {
    fn register(&self, evt: &EventFd, address: u64) -> std::io::Result<()> {
        self.vm_fd
            .register_ioevent(evt, &IoEventAddress::Mmio(address), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, evt: &EventFd, address: u64) -> std::io::Result<()> {
        self.vm_fd
            .unregister_ioevent(evt, &IoEventAddress::Mmio(address), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}
