//! The complete architectural state of a vCPU and of the VM-wide KVM devices (irqchip, PIT,
//! clock), as plain serde data: what a snapshot, a migration or an FT epoch carries.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {op} of vCPU {index}: {source}")]
    Vcpu {
        op: &'static str,
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot {op} of the VM: {source}")]
    Vm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted {accepted} of {total} MSRs (first refused: {first:#x})")]
    MsrsRefused {
        index: u8,
        accepted: usize,
        total: usize,
        first: u32,
    },
    #[error("vCPU {index}: cannot build the {what} list: {detail}")]
    Fam {
        index: u8,
        what: &'static str,
        detail: String,
    },
}

/// Everything KVM keeps for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
}

/// The in-kernel devices and clock of the VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Reads the MSRs in `indices`, leaving out those KVM refuses to read (it reports how many it
/// read; the entry after that is the one it refused).
fn read_msrs(fd: &VcpuFd, index: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut wanted: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut out = Vec::with_capacity(wanted.len());
    while !wanted.is_empty() {
        let mut msrs = Msrs::from_entries(&wanted).map_err(|e| StateError::Fam {
            index,
            what: "MSR",
            detail: format!("{e:?}"),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(|source| StateError::Vcpu {
            op: "read the MSRs",
            index,
            source,
        })?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the refused MSR and go on with the rest.
        wanted.drain(..(read + 1).min(wanted.len()));
    }
    Ok(out)
}

/// Saves one vCPU's state, again and again: an FT primary does it at every epoch, inside the
/// pause. What cannot change while the vCPU's thread lives is learned at the first save and
/// reused: its CPUID (only this process sets it, before the thread starts) and which of the
/// MSRs KVM lists it reads for this vCPU (learning that costs an ioctl per refused MSR).
pub struct VcpuSaver {
    index: u8,
    cpuid: Option<Vec<kvm_cpuid_entry2>>,
    /// The MSRs KVM read last time, as the buffer the next read fills.
    readable: Option<Msrs>,
}

impl VcpuSaver {
    pub fn new(index: u8) -> Self {
        VcpuSaver {
            index,
            cpuid: None,
            readable: None,
        }
    }

    pub fn save(&mut self, fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
        let index = self.index;
        let err = |op| move |source| StateError::Vcpu { op, index, source };
        let cpuid = match &self.cpuid {
            Some(cpuid) => cpuid.clone(),
            None => {
                let read = fd
                    .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(err("read the CPUID"))?
                    .as_slice()
                    .to_vec();
                self.cpuid = Some(read.clone());
                read
            }
        };
        Ok(VcpuState {
            cpuid,
            mp_state: fd.get_mp_state().map_err(err("read the MP state"))?,
            regs: fd.get_regs().map_err(err("read the registers"))?,
            sregs: fd.get_sregs().map_err(err("read the special registers"))?,
            xsave: fd.get_xsave().map_err(err("read the XSAVE area"))?,
            xcrs: fd.get_xcrs().map_err(err("read the XCRs"))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(err("read the debug registers"))?,
            lapic: fd.get_lapic().map_err(err("read the LAPIC"))?,
            msrs: self.read_msrs(fd, msr_indices)?,
            vcpu_events: fd.get_vcpu_events().map_err(err("read the vCPU events"))?,
        })
    }

    fn read_msrs(
        &mut self,
        fd: &VcpuFd,
        msr_indices: &[u32],
    ) -> Result<Vec<kvm_msr_entry>, StateError> {
        if let Some(msrs) = self.readable.as_mut() {
            let read = fd.get_msrs(msrs).map_err(|source| StateError::Vcpu {
                op: "read the MSRs",
                index: self.index,
                source,
            })?;
            if read == msrs.as_slice().len() {
                return Ok(msrs.as_slice().to_vec());
            }
            // KVM refused one it read before: learn the list again.
            self.readable = None;
        }
        let read = read_msrs(fd, self.index, msr_indices)?;
        self.readable = Some(Msrs::from_entries(&read).map_err(|e| StateError::Fam {
            index: self.index,
            what: "MSR",
            detail: format!("{e:?}"),
        })?);
        Ok(read)
    }
}

/// Puts `state` into a vCPU that has not run yet (or is parked). The order follows what KVM
/// needs: CPUID before MSRs, special registers before the LAPIC, events and MP state last.
pub fn restore_vcpu(fd: &VcpuFd, index: u8, state: &VcpuState) -> Result<(), StateError> {
    let err = |op| move |source| StateError::Vcpu { op, index, source };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| StateError::Fam {
        index,
        what: "CPUID",
        detail: format!("{e:?}"),
    })?;
    fd.set_cpuid2(&cpuid).map_err(err("set the CPUID"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(err("set the MP state"))?;
    fd.set_regs(&state.regs).map_err(err("set the registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(err("set the special registers"))?;
    // SAFETY: the buffer is a kvm_xsave read from KVM by get_xsave, so it has the size and
    // layout KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(err("set the XSAVE area"))?;
    fd.set_xcrs(&state.xcrs).map_err(err("set the XCRs"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(err("set the debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(err("set the LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|e| StateError::Fam {
        index,
        what: "MSR",
        detail: format!("{e:?}"),
    })?;
    let written = fd.set_msrs(&msrs).map_err(err("set the MSRs"))?;
    if written != state.msrs.len() {
        return Err(StateError::MsrsRefused {
            index,
            accepted: written,
            total: state.msrs.len(),
            first: state.msrs.get(written).map_or(0, |e| e.index),
        });
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(err("set the vCPU events"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(|source| StateError::Vm {
        op: "read the irqchip",
        source,
    })?;
    Ok(chip)
}

pub fn save_vm(vm: &VmFd) -> Result<KvmVmState, StateError> {
    Ok(KvmVmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(|source| StateError::Vm {
            op: "read the PIT",
            source,
        })?,
        clock: vm.get_clock().map_err(|source| StateError::Vm {
            op: "read the clock",
            source,
        })?,
    })
}

pub fn restore_vm(vm: &VmFd, state: &KvmVmState) -> Result<(), StateError> {
    let err = |op| move |source| StateError::Vm { op, source };
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(err("set the irqchip"))?;
    }
    vm.set_pit2(&state.pit).map_err(err("set the PIT"))?;
    // KVM_SET_CLOCK takes only the clock value; flags KVM reports (TSC_STABLE...) are refused.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        flags: state.clock.flags
            & !KVM_CLOCK_TSC_STABLE
            & !kvm_bindings::KVM_CLOCK_REALTIME
            & !kvm_bindings::KVM_CLOCK_HOST_TSC,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(err("set the clock"))?;
    Ok(())
}
