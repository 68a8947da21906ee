//! Per-vCPU CPUID: what KVM supports, with the topology and identity of each vCPU filled in
//! and the KVM paravirtual features that break on nested PVM hosts hidden.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// KVM features we keep: kvmclock (both MSR sets), the no-delay port 0x80 and the stable-clock
/// bit. The others (async page faults, steal time, PV EOI/IPI/TLB flush/unhalt/sched-yield,
/// poll control) make a second vCPU hang in a hypercall on nested PVM hosts, and none is needed
/// for correctness.
const KVM_FEATURES_KEPT: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("cannot read the CPUID features KVM supports: {0}")]
    Supported(kvm_ioctls::Error),
}

/// The supported CPUID of this host, read once and adapted per vCPU by [`for_vcpu`].
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)
}

/// Number of bits an APIC ID needs to number `count` CPUs.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1) - 1)
        .checked_ilog2()
        .map_or(0, |b| b + 1)
}

/// CPUID for vCPU `cpu_index` of `cpu_count`, one core per vCPU, APIC ID = index.
pub fn for_vcpu(base: &CpuId, cpu_index: u8, cpu_count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = u32::from(cpu_index);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(cpu_count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package - 1 in bits 31..26; one thread per cache per core.
                entry.eax =
                    (entry.eax & 0x03ff_ffff & !(0xfff << 14)) | (u32::from(cpu_count - 1) << 26);
            }
            LEAF_PERFMON => {
                // No virtual PMU: the emulator cannot run the guest's PMU set-up.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = apic_id;
                match entry.index {
                    // SMT level: one thread per core.
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    // Core level: all vCPUs in one package.
                    1 => {
                        entry.eax = id_bits(cpu_count);
                        entry.ebx = u32::from(cpu_count);
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_KVM_FEATURES => entry.eax &= KVM_FEATURES_KEPT,
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn topology_and_identity_are_per_vcpu() {
        let base = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_KVM_FEATURES, 0),
        ])
        .unwrap();
        let c = for_vcpu(&base, 2, 3);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[1].edx, 2);
        assert_eq!(e[2].ebx, 3);
        assert_eq!(e[2].eax, 2, "3 CPUs need 2 APIC ID bits");
        assert_eq!(e[3].eax, KVM_FEATURES_KEPT);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
