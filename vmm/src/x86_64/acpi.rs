//! ACPI tables for the VM, describing Cloud Hypervisor's machine: a hardware-reduced ACPI
//! platform with a PCI host bridge (ECAM on bus 0), the legacy COM1 port, a power button behind
//! a generic event device (GED), and the sleep/reset port of the shutdown device.
//!
//! Layout in guest memory: the RSDP at [`ACPI_START`] (where a PC OS also scans for it), then
//! DSDT, FADT, MADT, MCFG and the XSDT, each 8-byte aligned, all below [`ACPI_END`].
//!
//! PCI hot-plug is ACPI's, as in Cloud Hypervisor: a slot object per device number under the
//! host bridge (`_ADR`, `_SUN`, `_EJ0`), the hot-plug controller `PHPR` whose registers say
//! which slots gained or should lose a device, and the GED's PCI event that makes the guest
//! look (see `devices::pci::hotplug`).
//!
//! A Linux guest runs every CPL0 instruction under emulation on some hosts, AML interpretation
//! included, so the DSDT stays small: no per-CPU objects, and the slot objects hold no more
//! than the hot-plug driver needs.

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable, Path};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi::{GED_EVENT_PCI_CHANGED, GED_EVENT_POWER_BUTTON, RESET_VALUE, SHUTDOWN_PORT};
use devices::legacy::serial::SERIAL_IRQ;
use devices::legacy::{SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    pci_mmio64_window, ACPI_END, ACPI_START, APIC_START, GED_IRQ, GED_START, IOAPIC_START,
    PCI_CONFIG_IO_SIZE, PCI_CONFIG_IO_START, PCI_ECAM_LAST_BUS, PCI_ECAM_SIZE, PCI_ECAM_START,
    PCI_HOTPLUG_SIZE, PCI_HOTPLUG_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
};

/// Cloud Hypervisor's OEM identifiers, so guest software that keys on them sees the same
/// machine.
const OEM_ID: [u8; 6] = *b"CLOUDH";
const OEM_REVISION: u32 = 1;
const HYPERVISOR_VENDOR: [u8; 8] = *b"CLOUDHYP";
/// Each table starts on this boundary.
const TABLE_ALIGN: u64 = 8;
/// The highest PCI device number on a bus.
const PCI_MAX_DEVICE: u8 = 31;
/// `Notify` value of a power-button press (ACPI "device specific: S0 power button pressed").
const NOTIFY_POWER_BUTTON: u8 = 0x80;
/// `Notify` values for a PCI slot: re-enumerate it (a device was added) / eject its device.
const NOTIFY_DEVICE_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;
/// SLP_TYP value of S5 in the `_S5_` package; the shutdown device powers off on it.
const S5_SLEEP_TYPE: u8 = 5;
/// MADT structure types and flags.
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_ALL_PROCESSORS: u8 = 0xff;
/// The PC wiring: the PIT's ISA IRQ 0 reaches IOAPIC pin 2.
const ISA_TIMER_IRQ: u8 = 0;
const IOAPIC_TIMER_GSI: u32 = 2;
/// LINT1 carries NMIs, as PC firmware programs it.
const NMI_LINT: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables need {size:#x} bytes but only {room:#x} are reserved for them at {start:#x}")]
    TooBig { size: u64, room: u64, start: u64 },
    #[error("cannot write the ACPI {table} table at {addr:#x}: {source}")]
    Write {
        table: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("PCI interrupt routing names device {0} on bus 0; device numbers go up to 31")]
    PciDevice(u8),
}

/// What the tables describe of the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiMachine {
    /// Boot vCPUs; vCPU `i` has local APIC id `i`.
    pub cpus: u8,
    /// Guest RAM in bytes (places the 64-bit PCI window above it).
    pub mem_size: u64,
    /// The guest CPU's physical address width (bounds the 64-bit PCI window).
    pub phys_bits: u8,
    /// Legacy PCI interrupts: for each device on bus 0 that uses INTx, its device number and
    /// the GSI its INTA# is wired to. Listed in `_PRT`.
    pub pci_intx: Vec<(u8, u32)>,
    /// Whether COM1 exists.
    pub serial: bool,
}

/// Built tables, each with the guest address it belongs at.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    pub rsdp: GuestAddress,
    pub tables: Vec<(&'static str, GuestAddress, Vec<u8>)>,
}

impl AcpiTables {
    /// Bytes from [`ACPI_START`] to the end of the last table.
    pub fn size(&self) -> u64 {
        self.tables
            .iter()
            .map(|(_, addr, bytes)| addr.0 + bytes.len() as u64)
            .max()
            .map_or(0, |end| end - ACPI_START.0)
    }
}

/// Builds the tables for `machine` and writes them to guest memory; returns the RSDP's
/// address, which the boot protocol hands to the guest.
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    machine: &AcpiMachine,
) -> Result<GuestAddress, AcpiError> {
    let built = build_acpi_tables(machine)?;
    for (table, addr, bytes) in &built.tables {
        mem.write_slice(bytes, *addr)
            .map_err(|source| AcpiError::Write {
                table,
                addr: addr.0,
                source,
            })?;
    }
    Ok(built.rsdp)
}

/// Builds the tables for `machine` without writing them anywhere.
pub fn build_acpi_tables(machine: &AcpiMachine) -> Result<AcpiTables, AcpiError> {
    if let Some(&(device, _)) = machine
        .pci_intx
        .iter()
        .find(|(device, _)| *device > PCI_MAX_DEVICE)
    {
        return Err(AcpiError::PciDevice(device));
    }
    let mut next = ACPI_START.0 + Rsdp::len() as u64;
    let mut place = |len: usize| {
        let addr = next.next_multiple_of(TABLE_ALIGN);
        next = addr + len as u64;
        GuestAddress(addr)
    };
    let mut tables = Vec::with_capacity(6);

    let dsdt = dsdt(machine);
    let dsdt_addr = place(dsdt.len());
    let fadt = to_bytes(&fadt(dsdt_addr));
    let fadt_addr = place(fadt.len());
    let madt = madt(machine.cpus);
    let madt_addr = place(madt.len());
    let mut mcfg = MCFG::new(OEM_ID, *b"CHMCFG  ", OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, PCI_ECAM_LAST_BUS);
    let mcfg = to_bytes(&mcfg);
    let mcfg_addr = place(mcfg.len());

    let mut xsdt = XSDT::new(OEM_ID, *b"CHXSDT  ", OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr.0);
    }
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr.0));

    tables.push(("RSDP", ACPI_START, rsdp));
    tables.push(("DSDT", dsdt_addr, dsdt.as_slice().to_vec()));
    tables.push(("FACP", fadt_addr, fadt));
    tables.push(("APIC", madt_addr, madt.as_slice().to_vec()));
    tables.push(("MCFG", mcfg_addr, mcfg));
    tables.push(("XSDT", xsdt_addr, xsdt));
    let built = AcpiTables {
        rsdp: ACPI_START,
        tables,
    };
    let room = ACPI_END - ACPI_START.0;
    if built.size() > room {
        return Err(AcpiError::TooBig {
            size: built.size(),
            room,
            start: ACPI_START.0,
        });
    }
    Ok(built)
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// One byte-wide register in system I/O space.
fn io_port_u8(port: u64) -> GAS {
    GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// The FADT of a hardware-reduced machine, flags as Cloud Hypervisor sets them: sleep control
/// and status, and reset, all on the shutdown device's port.
fn fadt(dsdt: GuestAddress) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"CHFACP  ", OEM_REVISION)
        .dsdt_64(dsdt.0)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::TmrValExt);
    fadt.reset_reg = io_port_u8(SHUTDOWN_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_port_u8(SHUTDOWN_PORT);
    fadt.sleep_status_reg = io_port_u8(SHUTDOWN_PORT);
    fadt.fadt_minor_version = 3;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    fadt.finalize()
}

/// The MADT: one enabled local APIC per vCPU, the IOAPIC, the PC's timer override and NMI on
/// LINT1 of every processor.
fn madt(cpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"CHMADT  ", OEM_REVISION);
    madt.write_u32(36, APIC_START as u32);
    // Flags (PCAT_COMPAT) stay 0: a hardware-reduced guest ignores the 8259s anyway.
    let mut entries = Vec::with_capacity(usize::from(cpus) * 8 + 32);
    for cpu in 0..cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(0, IOAPIC_START as u32, 0).to_aml_bytes(&mut entries);
    // Interrupt source override: type, length, bus (ISA), source IRQ, GSI, MPS INTI flags.
    entries.extend_from_slice(&[MADT_INTERRUPT_OVERRIDE, 10, 0, ISA_TIMER_IRQ]);
    entries.extend_from_slice(&IOAPIC_TIMER_GSI.to_le_bytes());
    entries.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI: type, length, processor UID (all), MPS INTI flags, LINT#.
    entries.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, MADT_ALL_PROCESSORS, 0, 0, NMI_LINT]);
    madt.append_slice(&entries);
    madt
}

/// The DSDT: PCI host bridge, ECAM reservation, COM1, `_S5_`, power button and GED.
fn dsdt(machine: &AcpiMachine) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"CHDSDT  ", OEM_REVISION);
    let mut body = Vec::with_capacity(1024);
    pci_host_bridge(machine, &mut body);
    motherboard_resources(&mut body);
    if machine.serial {
        com1(&mut body);
    }
    sleep_states(&mut body);
    power_button(&mut body);
    pci_hotplug_controller(&mut body);
    ged(&mut body);
    dsdt.append_slice(&body);
    dsdt
}

fn pci_host_bridge(machine: &AcpiMachine, sink: &mut Vec<u8>) {
    let bus = AddressSpace::<u16>::new_bus_number(0, u16::from(PCI_ECAM_LAST_BUS));
    let config_io = aml::IO::new(
        PCI_CONFIG_IO_START as u16,
        PCI_CONFIG_IO_START as u16,
        1,
        PCI_CONFIG_IO_SIZE as u8,
    );
    // All other ports are forwarded to the bus: legacy devices decode theirs below it.
    let io_below = AddressSpace::<u16>::new_io(0, PCI_CONFIG_IO_START as u16 - 1, None);
    let io_above = AddressSpace::<u16>::new_io(0xd00, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let (mmio64_start, mmio64_size) = pci_mmio64_window(machine.mem_size, machine.phys_bits);
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start + mmio64_size.max(1) - 1,
        None,
    );
    let mut resources: Vec<&dyn Aml> = vec![&bus, &config_io, &io_below, &io_above, &mmio32];
    if mmio64_size > 0 {
        resources.push(&mmio64);
    }
    let crs = aml::ResourceTemplate::new(resources);

    // _PRT: Package { address (device << 16 | 0xffff: any function), pin, source 0 (a GSI,
    // no link device), GSI }.
    let mut prt = aml::PackageBuilder::new();
    for &(device, gsi) in &machine.pci_intx {
        let mut entry = aml::PackageBuilder::new();
        entry.add_element(&((u32::from(device) << 16) | 0xffff));
        entry.add_element(&aml::ZERO); // INTA#
        entry.add_element(&aml::ZERO);
        entry.add_element(&gsi);
        prt.add_element(&entry);
    }

    let slots: Vec<PciSlot> = (1..=PCI_MAX_DEVICE).map(PciSlot).collect();
    let notify_slots = NotifySlots;
    let up = aml::Local(0);
    let down = aml::Local(1);
    let (pciu, pcid) = (Path::new("\\_SB_.PHPR.PCIU"), Path::new("\\_SB_.PHPR.PCID"));
    let read_up = aml::Store::new(&up, &pciu);
    let read_down = aml::Store::new(&down, &pcid);
    let notify_up = aml::MethodCall::new("DVNT".into(), vec![&up, &NOTIFY_DEVICE_CHECK]);
    let notify_down = aml::MethodCall::new("DVNT".into(), vec![&down, &NOTIFY_EJECT_REQUEST]);
    // PCNT: read each bitmap once (a read clears it), then notify the slots it names.
    let pcnt = aml::Method::new(
        "PCNT".into(),
        0,
        true,
        vec![&read_up, &read_down, &notify_up, &notify_down],
    );
    let (hid, cid) = (aml::EISAName::new("PNP0A08"), aml::EISAName::new("PNP0A03"));
    let names = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_SEG".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &crs),
        aml::Name::new("_PRT".into(), &prt),
    ];
    let mut children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    children.push(&notify_slots);
    children.push(&pcnt);
    for slot in &slots {
        children.push(slot);
    }
    aml::Device::new(Path::new("\\_SB_.PCI0"), children).to_aml_bytes(sink);
}

/// The ACPI object of PCI slot `.0` (device number) under the host bridge: its address, its
/// slot number, and `_EJ0`, which tells the hot-plug controller the guest let go of it.
struct PciSlot(u8);

impl Aml for PciSlot {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let slot = self.0;
        let address = u32::from(slot) << 16;
        let sun = aml::Path::new("_SUN");
        let eject = aml::MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&sun]);
        aml::Device::new(
            slot_name(slot).as_str().into(),
            vec![
                &aml::Name::new("_ADR".into(), &address),
                &aml::Name::new("_SUN".into(), &u32::from(slot)),
                &aml::Method::new("_EJ0".into(), 1, false, vec![&eject]),
            ],
        )
        .to_aml_bytes(sink);
    }
}

fn slot_name(slot: u8) -> String {
    format!("S{slot:03}")
}

/// `DVNT(bitmap, value)`: `Notify(Snnn, value)` for each slot whose bit is set.
struct NotifySlots;

impl Aml for NotifySlots {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let names: Vec<String> = (1..=PCI_MAX_DEVICE).map(slot_name).collect();
        let paths: Vec<Path> = names.iter().map(|n| Path::new(n)).collect();
        let bits: Vec<u32> = (1..=PCI_MAX_DEVICE).map(|slot| 1u32 << slot).collect();
        let masked: Vec<aml::And> = bits
            .iter()
            .map(|bit| aml::And::new(&aml::ZERO, &aml::Arg(0), bit))
            .collect();
        let tests: Vec<aml::Equal> = masked
            .iter()
            .zip(&bits)
            .map(|(m, bit)| aml::Equal::new(m, bit))
            .collect();
        let notifies: Vec<aml::Notify> = paths
            .iter()
            .map(|p| aml::Notify::new(p, &aml::Arg(1)))
            .collect();
        let ifs: Vec<aml::If> = tests
            .iter()
            .zip(&notifies)
            .map(|(t, n)| aml::If::new(t, vec![n]))
            .collect();
        let body: Vec<&dyn Aml> = ifs.iter().map(|i| i as &dyn Aml).collect();
        aml::Method::new("DVNT".into(), 2, true, body).to_aml_bytes(sink);
    }
}

/// `\_SB_.PHPR`: the PCI hot-plug controller's registers as AML fields, `PCEJ(slot)` (an
/// eject, from a slot's `_EJ0`) and `PSCN` (a scan, from the GED's PCI event).
fn pci_hotplug_controller(sink: &mut Vec<u8>) {
    let registers =
        aml::Memory32Fixed::new(true, PCI_HOTPLUG_START as u32, PCI_HOTPLUG_SIZE as u32);
    let lock = || Path::new("BLCK");
    let (pseg, b0ej) = (Path::new("PSEG"), Path::new("B0EJ"));
    let select_segment = aml::Store::new(&pseg, &aml::ZERO);
    let slot_bit = aml::ShiftLeft::new(&b0ej, &aml::ONE, &aml::Arg(0));
    let (acquire, release) = (aml::Acquire::new(lock(), 0xffff), aml::Release::new(lock()));
    let done = aml::Return::new(&aml::ZERO);
    let pcej = aml::Method::new(
        "PCEJ".into(),
        1,
        true,
        vec![&acquire, &select_segment, &slot_bit, &release, &done],
    );
    let scan = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let pscn = aml::Method::new(
        "PSCN".into(),
        0,
        true,
        vec![&acquire, &select_segment, &scan, &release],
    );
    aml::Device::new(
        Path::new("\\_SB_.PHPR"),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
            &aml::Name::new("_UID".into(), &"PCI Hotplug Controller"),
            &aml::Name::new("_STA".into(), &0x0bu8),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&registers])),
            &aml::Mutex::new(lock(), 0),
            &aml::OpRegion::new(
                "PCST".into(),
                aml::OpRegionSpace::SystemMemory,
                &(PCI_HOTPLUG_START as u32),
                &(PCI_HOTPLUG_SIZE as u32),
            ),
            &aml::Field::new(
                "PCST".into(),
                aml::FieldAccessType::DWord,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![
                    aml::FieldEntry::Named(*b"PCIU", 32),
                    aml::FieldEntry::Named(*b"PCID", 32),
                    aml::FieldEntry::Named(*b"B0EJ", 32),
                    aml::FieldEntry::Named(*b"PSEG", 32),
                ],
            ),
            &pcej,
            &pscn,
        ],
    )
    .to_aml_bytes(sink);
}

/// Reserves the ECAM window as a motherboard resource: Linux uses MCFG's area only when the
/// firmware reserves it (here or in the memory map).
fn motherboard_resources(sink: &mut Vec<u8>) {
    let ecam = aml::Memory32Fixed::new(true, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    aml::Device::new(
        Path::new("\\_SB_.MBRD"),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ecam])),
        ],
    )
    .to_aml_bytes(sink);
}

fn com1(sink: &mut Vec<u8>) {
    let irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let ports = aml::IO::new(
        SERIAL_PORT_BASE as u16,
        SERIAL_PORT_BASE as u16,
        1,
        SERIAL_PORT_LEN as u8,
    );
    aml::Device::new(
        Path::new("\\_SB_.COM1"),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&irq, &ports]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// `_S5_`: the SLP_TYP values an OS writes to the sleep control register to power off.
fn sleep_states(sink: &mut Vec<u8>) {
    aml::Name::new(
        Path::new("\\_S5_"),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(sink);
}

fn power_button(sink: &mut Vec<u8>) {
    aml::Device::new(
        Path::new("\\_SB_.PWRB"),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(sink);
}

/// The generic event device: its interrupt runs `_EVT`, which reads the event register (a read
/// clears it) and notifies the power button when that bit is set.
fn ged(sink: &mut Vec<u8>) {
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let event_bits = aml::Local(0);
    let pressed = aml::And::new(&aml::ZERO, &event_bits, &GED_EVENT_POWER_BUTTON);
    let is_pressed = aml::Equal::new(&pressed, &GED_EVENT_POWER_BUTTON);
    let button = Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&button, &NOTIFY_POWER_BUTTON);
    let pci_bits = aml::And::new(&aml::ZERO, &event_bits, &GED_EVENT_PCI_CHANGED);
    let pci_changed = aml::Equal::new(&pci_bits, &GED_EVENT_PCI_CHANGED);
    let scan = aml::MethodCall::new("\\_SB_.PHPR.PSCN".into(), vec![]);
    aml::Device::new(
        Path::new("\\_SB_.GED_"),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq])),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemMemory,
                &GED_START,
                &4u8,
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::DWord,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::Preserve,
                vec![aml::FieldEntry::Named(*b"GDAT", 32)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&event_bits, &Path::new("GDAT")),
                    &aml::If::new(&is_pressed, vec![&notify]),
                    &aml::If::new(&pci_changed, vec![&scan]),
                ],
            ),
        ],
    )
    .to_aml_bytes(sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestMemory = vm_memory::GuestMemoryMmap<()>;

    fn memory() -> TestMemory {
        // Covers the ACPI area (and nothing above 1 MiB: the tables must not need it).
        TestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn machine(cpus: u8) -> AcpiMachine {
        AcpiMachine {
            cpus,
            mem_size: 512 << 20,
            phys_bits: 40,
            pci_intx: vec![(1, 16), (2, 17)],
            serial: true,
        }
    }

    fn read(mem: &TestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Reads one system description table (header and body) at `addr`, checking its
    /// checksum.
    fn table(mem: &TestMemory, addr: u64) -> Vec<u8> {
        let len = u32_at(&read(mem, addr, 36), 4) as usize;
        assert!(len >= 36);
        let t = read(mem, addr, len);
        assert!(
            sums_to_zero(&t),
            "{} checksum",
            String::from_utf8_lossy(&t[..4])
        );
        t
    }

    /// Walks RSDP -> XSDT -> tables as an OS does, returning each table by signature, and the
    /// DSDT reached through the FADT.
    fn walk(mem: &TestMemory, rsdp_addr: GuestAddress) -> Vec<([u8; 4], u64, Vec<u8>)> {
        let rsdp = read(mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]), "RSDP (ACPI 1.0 part) checksum");
        assert!(sums_to_zero(&rsdp), "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = table(mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut found = vec![(*b"XSDT", xsdt_addr, xsdt.clone())];
        for entry in xsdt[36..].chunks(8) {
            let addr = u64_at(entry, 0);
            let t = table(mem, addr);
            found.push((t[..4].try_into().unwrap(), addr, t));
        }
        let fadt = found
            .iter()
            .find(|(sig, _, _)| sig == b"FACP")
            .expect("FADT listed")
            .2
            .clone();
        let dsdt_addr = u64_at(&fadt, 140);
        let dsdt = table(mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        found.push((*b"DSDT", dsdt_addr, dsdt));
        for (_, addr, t) in &found {
            assert!(*addr >= ACPI_START.0 && addr + t.len() as u64 <= ACPI_END);
        }
        found
    }

    fn get<'a>(tables: &'a [([u8; 4], u64, Vec<u8>)], sig: &[u8; 4]) -> &'a [u8] {
        &tables
            .iter()
            .find(|(s, _, _)| s == sig)
            .unwrap_or_else(|| panic!("{} missing", String::from_utf8_lossy(sig)))
            .2
    }

    #[test]
    fn tables_walk_from_rsdp_with_valid_checksums() {
        for cpus in [1u8, 2, 8, 254] {
            let mem = memory();
            let rsdp = create_acpi_tables(&mem, &machine(cpus)).unwrap();
            assert_eq!(rsdp, ACPI_START);
            let tables = walk(&mem, rsdp);
            let sigs: Vec<_> = tables.iter().map(|(s, _, _)| *s).collect();
            for sig in [b"XSDT", b"FACP", b"APIC", b"MCFG", b"DSDT"] {
                assert_eq!(sigs.iter().filter(|s| s == &sig).count(), 1);
            }
        }
    }

    #[test]
    fn fadt_describes_a_hardware_reduced_machine_with_the_shutdown_port() {
        let mem = memory();
        let tables = walk(&mem, create_acpi_tables(&mem, &machine(2)).unwrap());
        let fadt = get(&tables, b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "FADT major revision");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG: system I/O, 8 bits, at the shutdown port; RESET_VALUE.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 120), SHUTDOWN_PORT);
        assert_eq!(fadt[128], RESET_VALUE);
        assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG.
        for offset in [244, 256] {
            assert_eq!(&fadt[offset..offset + 4], &[1, 8, 0, 1]);
            assert_eq!(u64_at(fadt, offset + 4), SHUTDOWN_PORT);
        }
        assert_eq!(&fadt[268..276], b"CLOUDHYP");
    }

    #[test]
    fn madt_lists_each_cpu_the_ioapic_and_pc_overrides() {
        for cpus in [1u8, 3] {
            let mem = memory();
            let tables = walk(&mem, create_acpi_tables(&mem, &machine(cpus)).unwrap());
            let madt = get(&tables, b"APIC");
            assert_eq!(u32_at(madt, 36), APIC_START as u32);
            let mut entries = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                let len = madt[at + 1] as usize;
                assert!(len >= 2);
                entries.push(madt[at..at + len].to_vec());
                at += len;
            }
            assert_eq!(at, madt.len());
            // cpus local APICs + IOAPIC + override + NMI.
            assert_eq!(entries.len(), usize::from(cpus) + 3);
            for (i, e) in entries.iter().take(usize::from(cpus)).enumerate() {
                assert_eq!(e[..4], [0, 8, i as u8, i as u8]);
                assert_eq!(u32_at(e, 4), 1, "enabled");
            }
            let ioapic = &entries[usize::from(cpus)];
            assert_eq!(ioapic[..3], [1, 12, 0]);
            assert_eq!(u32_at(ioapic, 4), IOAPIC_START as u32);
            assert_eq!(u32_at(ioapic, 8), 0);
            let iso = &entries[usize::from(cpus) + 1];
            assert_eq!(iso[..4], [2, 10, 0, 0]);
            assert_eq!(u32_at(iso, 4), 2);
            assert_eq!(entries[usize::from(cpus) + 2], [4, 6, 0xff, 0, 0, 1]);
        }
    }

    #[test]
    fn mcfg_has_one_allocation_for_bus_0() {
        let mem = memory();
        let tables = walk(&mem, create_acpi_tables(&mem, &machine(1)).unwrap());
        let mcfg = get(&tables, b"MCFG");
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        assert_eq!(u64_at(mcfg, 44), PCI_ECAM_START);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, PCI_ECAM_LAST_BUS]);
    }

    /// The AML of the hot-plug machinery, checked by ACPICA's own disassembler (the parser
    /// the kernel's interpreter shares): every object parses and the methods are where the
    /// guest's hot-plug driver looks for them.
    #[test]
    fn dsdt_hotplug_aml_disassembles_with_acpica() {
        let Ok(out) = std::process::Command::new("iasl").arg("-v").output() else {
            eprintln!("SKIP: iasl (acpica-tools, installed by ci/setup) is missing");
            return;
        };
        assert!(out.status.success());
        let mem = memory();
        let tables = walk(&mem, create_acpi_tables(&mem, &machine(2)).unwrap());
        let dsdt = get(&tables, b"DSDT");
        let dir = std::env::temp_dir().join(format!("dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, dsdt).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .output()
            .unwrap();
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_default();
        if std::env::var_os("DSDT_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        assert!(
            out.status.success(),
            "iasl -d: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for needle in [
            "Device (\\_SB.PHPR)",
            "Method (PCEJ, 1, Serialized)",
            "Method (PSCN, 0, Serialized)",
            "Method (PCNT, 0, Serialized)",
            "Method (DVNT, 2, Serialized)",
            "Device (S001)",
            "Device (S031)",
            "Method (_EJ0, 1, NotSerialized)",
            "PCIU,   32",
            "\\_SB.PHPR.PSCN ()",
            "Notify (S031, Arg1)",
        ] {
            assert!(dsl.contains(needle), "DSDT lacks {needle:?}:\n{dsl}");
        }
    }

    #[test]
    fn dsdt_has_the_devices_and_the_s5_package() {
        let mem = memory();
        let tables = walk(&mem, create_acpi_tables(&mem, &machine(2)).unwrap());
        let dsdt = get(&tables, b"DSDT");
        for name in [
            &b"_S5_"[..],
            b"PCI0",
            b"_PRT",
            b"PWRB",
            b"GED_",
            b"ACPI0013",
            b"_EVT",
            b"GDAT",
            b"COM1",
            b"MBRD",
        ] {
            assert!(
                contains(dsdt, name),
                "DSDT lacks {}",
                String::from_utf8_lossy(name)
            );
        }
        // _S5_ is Package(4) { 5, 0, 0, 0 }.
        assert!(contains(dsdt, b"_S5_\x12\x07\x04\x0a\x05\x00\x00\x00"));
        // The 32-bit window's base appears in the host bridge's _CRS.
        assert!(contains(dsdt, &(PCI_MMIO32_START as u32).to_le_bytes()));
        // _PRT entry of device 1: DWord 0x0001ffff, pin 0, source 0, GSI 16.
        assert!(contains(
            dsdt,
            b"\x12\x0b\x04\x0c\xff\xff\x01\x00\x00\x00\x0a\x10"
        ));
    }

    #[test]
    fn dsdt_omits_com1_without_serial() {
        let built = build_acpi_tables(&AcpiMachine {
            serial: false,
            ..machine(1)
        })
        .unwrap();
        let (_, _, dsdt) = built.tables.iter().find(|(n, _, _)| *n == "DSDT").unwrap();
        assert!(!contains(dsdt, b"COM1"));
        assert!(contains(dsdt, b"PWRB"));
    }

    #[test]
    fn tables_fit_the_reserved_area_at_the_vcpu_limit() {
        let built = build_acpi_tables(&AcpiMachine {
            pci_intx: (0..32).map(|d| (d, 16 + u32::from(d % 8))).collect(),
            ..machine(254)
        })
        .unwrap();
        assert!(built.size() <= ACPI_END - ACPI_START.0);
        // Tables do not overlap.
        let mut spans: Vec<_> = built
            .tables
            .iter()
            .map(|(_, a, b)| (a.0, a.0 + b.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    }

    #[test]
    fn bad_pci_device_number_is_an_error() {
        let err = build_acpi_tables(&AcpiMachine {
            pci_intx: vec![(32, 16)],
            ..machine(1)
        })
        .unwrap_err();
        assert!(matches!(err, AcpiError::PciDevice(32)), "{err}");
    }

    #[test]
    fn write_outside_guest_memory_is_reported() {
        let mem = TestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = create_acpi_tables(&mem, &machine(1)).unwrap_err();
        assert!(matches!(err, AcpiError::Write { .. }), "{err}");
    }

    /// Writes each table (`dsdt.dat`, `facp.dat`, ...) into the directory TANDEM_ACPI_DUMP_DIR
    /// names, when set, so an AML disassembler can check them by hand.
    #[test]
    fn dump_tables_when_asked() {
        let Some(dir) = std::env::var_os("TANDEM_ACPI_DUMP_DIR") else {
            return;
        };
        let built = build_acpi_tables(&machine(2)).unwrap();
        for (name, _, bytes) in &built.tables {
            if *name != "RSDP" {
                let path = std::path::Path::new(&dir).join(format!("{}.dat", name.to_lowercase()));
                std::fs::write(path, bytes).unwrap();
            }
        }
    }
}
