//! Boot-time MSR values, filtered against the MSRs this host's KVM can save and restore.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::Kvm;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("cannot read the MSR index list from KVM: {0}")]
    IndexList(kvm_ioctls::Error),
    #[error("cannot build the MSR list: {0:?}")]
    Build(vmm_sys_util::fam::Error),
}

/// The MSRs KVM reports it can save and restore; the boot list and later state capture
/// use only these.
pub fn supported_indices(kvm: &Kvm) -> Result<Vec<u32>, MsrError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(MsrError::IndexList)?
        .as_slice()
        .to_vec())
}

/// Boot values for the MSRs in `supported` (others are left to KVM's reset values).
pub fn boot_msrs(supported: &[u32]) -> Result<Msrs, MsrError> {
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(MsrError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_msrs_are_left_out() {
        let msrs = boot_msrs(&[MSR_IA32_TSC, MSR_MTRR_DEF_TYPE]).unwrap();
        let got: Vec<u32> = msrs.as_slice().iter().map(|e| e.index).collect();
        assert_eq!(got, vec![MSR_IA32_TSC, MSR_MTRR_DEF_TYPE]);
    }
}
