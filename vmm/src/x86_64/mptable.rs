//! The Intel MultiProcessor Specification 1.4 table, which tells the guest how many CPUs it has
//! and how the ISA IRQs reach the IOAPIC. Written by hand: it is a few fixed-layout records and
//! no maintained crate builds it against current rust-vmm versions.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_START, IOAPIC_START, MPTABLE_END, MPTABLE_START};

const SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature; guests only look at it for errata.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ISA_IRQS: u8 = 16;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("the MP table does not fit in the BIOS area")]
    TooBig,
    #[error("cannot write the MP table into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The MP table bytes for `cpu_count` CPUs (APIC IDs 0..n), to be placed at `base`.
pub fn build(cpu_count: u8, base: GuestAddress) -> Result<Vec<u8>, MptableError> {
    if cpu_count == 0 || cpu_count > 254 {
        return Err(MptableError::TooManyCpus(cpu_count));
    }
    let ioapic_id = cpu_count;
    let table_addr = base.0 + FLOATING_POINTER_LEN as u64;

    let mut entries = Vec::new();
    for cpu in 0..cpu_count {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for irq in 0..ISA_IRQS {
        // IRQ 0 (PIT) is wired to IOAPIC pin 2 on PCs, as KVM's in-kernel IOAPIC routes it.
        let (kind, pin) = match irq {
            0 => (INT_TYPE_INT, 2),
            2 => (INT_TYPE_EXTINT, 0),
            _ => (INT_TYPE_INT, irq),
        };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, irq, ioapic_id, pin]);
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(cpu_count) + 1 + 1 + u16::from(ISA_IRQS) + 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, below
    table.extend_from_slice(b"TANDEM  ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table into the BIOS area, where Linux and the test guest look for it.
pub fn setup<M: GuestMemory>(mem: &M, cpu_count: u8) -> Result<(), MptableError> {
    let bytes = build(cpu_count, MPTABLE_START)?;
    if MPTABLE_START.0 + bytes.len() as u64 > MPTABLE_END {
        return Err(MptableError::TooBig);
    }
    mem.write_slice(&bytes, MPTABLE_START)
        .map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_cpu_entries_are_valid() {
        let bytes = build(3, MPTABLE_START).unwrap();
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(checksum(&bytes[..16]), 0);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(checksum(table), 0);
        let cpus: Vec<(u8, u8)> = (0..3)
            .map(|i| {
                let e = &table[HEADER_LEN + i * 20..];
                (e[1], e[3])
            })
            .collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
    }

    #[test]
    fn all_cpus_fit_the_bios_area() {
        assert!(build(254, MPTABLE_START).unwrap().len() as u64 <= MPTABLE_END - MPTABLE_START.0);
        assert!(matches!(
            build(0, MPTABLE_START),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(matches!(
            build(255, MPTABLE_START),
            Err(MptableError::TooManyCpus(255))
        ));
    }
}
