//! How many CPUs and which LAPIC IDs: ACPI MADT first, else the Intel MP table.

use crate::bootinfo::phys;
use crate::MAX_CPUS;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    None,
    Madt,
    MpTable,
}

pub struct Cpus {
    pub apic_ids: [u32; MAX_CPUS],
    pub count: usize,
    #[allow(dead_code)]
    pub source: Source,
}

impl Cpus {
    fn push(&mut self, id: u32) {
        if self.count < MAX_CPUS {
            self.apic_ids[self.count] = id;
            self.count += 1;
        }
    }
}

fn checksum_ok(addr: u64, len: usize) -> bool {
    let mut s = 0u8;
    for i in 0..len as u64 {
        // SAFETY: firmware area inside the identity map.
        s = s.wrapping_add(unsafe { phys::<u8>(addr + i) });
    }
    s == 0
}

fn sig_at(addr: u64, sig: &[u8]) -> bool {
    // SAFETY: reads within the low 1 MiB / firmware tables.
    sig.iter()
        .enumerate()
        .all(|(i, &b)| unsafe { phys::<u8>(addr + i as u64) } == b)
}

/// Scans [start, end) at 16-byte steps for a signature with a valid checksum
/// over `len` bytes.
fn scan(start: u64, end: u64, sig: &[u8], len: usize) -> Option<u64> {
    let mut a = start;
    while a + len as u64 <= end {
        if sig_at(a, sig) && checksum_ok(a, len) {
            return Some(a);
        }
        a += 16;
    }
    None
}

fn ebda() -> u64 {
    // SAFETY: BIOS data area word at 0x40e.
    (unsafe { phys::<u16>(0x40e) } as u64) << 4
}

fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && sig_at(hint, b"RSD PTR ") {
        return Some(hint);
    }
    let e = ebda();
    if (0x80000..0xa0000).contains(&e) {
        if let Some(a) = scan(e, e + 1024, b"RSD PTR ", 20) {
            return Some(a);
        }
    }
    scan(0xe0000, 0x100000, b"RSD PTR ", 20)
}

/// The ACPI table with signature `sig` (through the XSDT, else the RSDT).
fn find_table(rsdp: u64, sig: &[u8]) -> Option<u64> {
    // SAFETY: ACPI tables in RAM, addresses below 4 GiB in practice.
    unsafe {
        let rev: u8 = phys(rsdp + 15);
        let xsdt: u64 = if rev >= 2 { phys(rsdp + 24) } else { 0 };
        let (sdt, step) = if xsdt != 0 && xsdt < (1 << 32) {
            (xsdt, 8)
        } else {
            (phys::<u32>(rsdp + 16) as u64, 4)
        };
        if sdt == 0 {
            return None;
        }
        let len = phys::<u32>(sdt + 4) as u64;
        let mut p = sdt + 36;
        while p + step <= sdt + len {
            let t = if step == 8 {
                phys::<u64>(p)
            } else {
                phys::<u32>(p) as u64
            };
            if t != 0 && t < (1 << 32) && sig_at(t, sig) {
                return Some(t);
            }
            p += step;
        }
    }
    None
}

fn from_madt(madt: u64, cpus: &mut Cpus) {
    // SAFETY: bounded by the table's own length.
    unsafe {
        let len = phys::<u32>(madt + 4) as u64;
        let mut p = madt + 44;
        while p + 2 <= madt + len {
            let kind: u8 = phys(p);
            let elen = phys::<u8>(p + 1) as u64;
            if elen < 2 {
                break;
            }
            match kind {
                0 if phys::<u32>(p + 4) & 1 != 0 => cpus.push(phys::<u8>(p + 3) as u32),
                9 if phys::<u32>(p + 8) & 1 != 0 => cpus.push(phys::<u32>(p + 4)),
                _ => {}
            }
            p += elen;
        }
    }
}

fn find_mp() -> Option<u64> {
    let e = ebda();
    if (0x80000..0xa0000).contains(&e) {
        if let Some(a) = scan(e, e + 1024, b"_MP_", 16) {
            return Some(a);
        }
    }
    scan(0x9fc00, 0xa0000, b"_MP_", 16).or_else(|| scan(0xf0000, 0x100000, b"_MP_", 16))
}

fn from_mp(fp: u64, cpus: &mut Cpus) {
    // SAFETY: bounded by the configuration table's entry count and length.
    unsafe {
        let cfg = phys::<u32>(fp + 4) as u64;
        if cfg == 0 || !sig_at(cfg, b"PCMP") {
            return;
        }
        // Walk by the base table length: some firmware (qboot) leaves the
        // entry count at 0.
        let len = phys::<u16>(cfg + 4) as u64;
        let mut p = cfg + 44;
        while p < cfg + len {
            let kind: u8 = phys(p);
            if kind == 0 {
                if phys::<u8>(p + 3) & 1 != 0 {
                    cpus.push(phys::<u8>(p + 1) as u32);
                }
                p += 20;
            } else if kind <= 4 {
                p += 8;
            } else {
                break;
            }
        }
    }
}

/// `rsdp_hint`: the RSDP address the loader passed, 0 if none.
pub fn find_cpus(rsdp_hint: u64) -> Cpus {
    let mut cpus = Cpus {
        apic_ids: [0; MAX_CPUS],
        count: 0,
        source: Source::None,
    };
    let hint = rsdp_hint;
    if let Some(madt) = find_rsdp(hint).and_then(|r| find_table(r, b"APIC")) {
        from_madt(madt, &mut cpus);
        if cpus.count > 0 {
            cpus.source = Source::Madt;
            return cpus;
        }
    }
    if let Some(fp) = find_mp() {
        from_mp(fp, &mut cpus);
        if cpus.count > 0 {
            cpus.source = Source::MpTable;
        }
    }
    cpus
}

/// The PCI Express enhanced configuration (ECAM) window of segment 0, bus 0,
/// from the ACPI MCFG table, if it lies inside the identity map.
pub fn find_ecam(rsdp_hint: u64) -> Option<u64> {
    let mcfg = find_table(find_rsdp(rsdp_hint)?, b"MCFG")?;
    // SAFETY: bounded by the table's own length.
    unsafe {
        let len = phys::<u32>(mcfg + 4) as u64;
        // Header (36 bytes), 8 reserved, then 16-byte entries: base address,
        // segment, first bus, last bus, reserved.
        let mut p = mcfg + 44;
        while p + 16 <= mcfg + len {
            let base: u64 = phys(p);
            let segment: u16 = phys(p + 8);
            let first_bus: u8 = phys(p + 10);
            if segment == 0 && first_bus == 0 && base != 0 && base + (1 << 20) <= 1 << 32 {
                return Some(base);
            }
            p += 16;
        }
    }
    None
}
