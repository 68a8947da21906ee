//! The PCI machine: one segment, bus 0, as Cloud Hypervisor's guests see it. A host bridge at
//! 00:00.0, devices at 00:01.0 onwards (function 0 only), configuration space through ports
//! 0xcf8/0xcfc (mechanism #1) and ECAM, and memory BARs the guest may move.
//!
//! [`PciBus`] owns the functions and routes accesses: configuration reads and writes by
//! device number, BAR accesses by the address each BAR decodes now. The VMM maps the BAR
//! windows onto its MMIO bus as [`PciBarWindow`]s, so a BAR the guest moves needs no change to
//! the VMM's bus; a function that must know (virtio-pci moves its notification ioeventfds) is
//! told through [`PciDevice::bar_decode_changed`].

pub mod config;
pub mod hotplug;
pub mod msix;

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

pub use config::{BarSpec, PciConfiguration, PciIdentity};

use crate::virtio::core::lock;
use crate::BusDevice;

/// Devices per bus.
pub const DEVICES_PER_BUS: usize = 32;
/// The host bridge's identity, as Cloud Hypervisor's.
const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
const CLASS_HOST_BRIDGE: u32 = 0x06_0000;
/// Configuration mechanism #1: bit 31 enables the data port.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

/// Routes an MSI message to a GSI (the VMM's KVM GSI routing table).
pub trait MsiRouter: Send + Sync {
    fn route(&self, gsi: u32, address: u64, data: u32) -> std::io::Result<()>;
}

/// Registers the eventfds that catch guest writes to an address without a VM exit to user
/// space (KVM ioeventfds), so a function can move them with its BAR.
pub trait IoEventRegistry: Send + Sync {
    fn register(&self, evt: &EventFd, address: u64) -> std::io::Result<()>;
    fn unregister(&self, evt: &EventFd, address: u64) -> std::io::Result<()>;
}

/// A PCI function: its configuration space and its BARs.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    /// A guest configuration write; the function applies it (through its masks) and reacts.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` decodes at `new` now (`None`: not at all), where it decoded at `old`.
    fn bar_decode_changed(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
}

type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

struct Slot {
    device: SharedPciDevice,
    /// Each BAR's decode as last seen, for dispatch and to notice moves.
    decode: [Option<(u64, u64)>; config::BAR_COUNT],
}

/// Bus 0 of segment 0.
pub struct PciBus {
    slots: Vec<Option<Slot>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with its host bridge at device 0.
    pub fn new() -> Self {
        let mut bus = Self {
            slots: (0..DEVICES_PER_BUS).map(|_| None).collect(),
        };
        bus.slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(HostBridge::new())),
            decode: [None; config::BAR_COUNT],
        });
        bus
    }

    /// The lowest free device number.
    pub fn next_device_number(&self) -> Option<u8> {
        self.slots.iter().position(Option::is_none).map(|n| n as u8)
    }

    /// Places `device` at `number` (which must be free).
    pub fn insert(&mut self, number: u8, device: SharedPciDevice) -> Result<(), PciBusError> {
        let slot = self
            .slots
            .get_mut(usize::from(number))
            .ok_or(PciBusError::DeviceNumber(number))?;
        if slot.is_some() {
            return Err(PciBusError::Occupied(number));
        }
        let decode = decode_of(&*lock(&device));
        *slot = Some(Slot { device, decode });
        Ok(())
    }

    /// Takes the function at `number` off the bus (a hot-unplug): its BARs stop decoding
    /// (each is told it decodes nothing, so notifications registered with KVM go too).
    pub fn remove(&mut self, number: u8) -> Option<SharedPciDevice> {
        if number == 0 {
            // The host bridge stays.
            return None;
        }
        let slot = self.slots.get_mut(usize::from(number))?.take()?;
        {
            let mut dev = lock(&slot.device);
            for (bar, old) in slot.decode.iter().enumerate() {
                if let Some((base, _)) = old {
                    dev.bar_decode_changed(bar, Some(*base), None);
                }
            }
        }
        Some(slot.device)
    }

    /// Whether a function sits at `number`.
    pub fn is_occupied(&self, number: u8) -> bool {
        self.slots
            .get(usize::from(number))
            .is_some_and(Option::is_some)
    }

    fn slot(&self, device: usize, function: usize) -> Option<&Slot> {
        if function != 0 {
            return None;
        }
        self.slots.get(device)?.as_ref()
    }

    /// A configuration read; an absent function reads all ones (how the guest finds it absent).
    pub fn read_config(&self, device: usize, function: usize, offset: usize, data: &mut [u8]) {
        match self.slot(device, function) {
            Some(slot) => lock(&slot.device).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write_config(&mut self, device: usize, function: usize, offset: usize, data: &[u8]) {
        if function != 0 {
            return;
        }
        let Some(Some(slot)) = self.slots.get_mut(device) else {
            return;
        };
        let mut dev = lock(&slot.device);
        dev.write_config(offset, data);
        let decode = decode_of(&*dev);
        for (bar, (old, new)) in slot.decode.iter().zip(decode).enumerate() {
            if *old != new {
                dev.bar_decode_changed(bar, old.map(|d| d.0), new.map(|d| d.0));
            }
        }
        slot.decode = decode;
    }

    /// The function and BAR decoding `address`, with the offset into the BAR. The first match
    /// in device order wins when the guest programmed BARs over each other.
    fn bar_at(&self, address: u64) -> Option<(&SharedPciDevice, usize, u64)> {
        self.slots.iter().flatten().find_map(|slot| {
            slot.decode.iter().enumerate().find_map(|(bar, d)| {
                let (base, size) = (*d)?;
                (address >= base && address - base < size)
                    .then(|| (&slot.device, bar, address - base))
            })
        })
    }

    pub fn read_bar(&self, address: u64, data: &mut [u8]) {
        match self.bar_at(address) {
            Some((device, bar, offset)) => lock(device).read_bar(bar, offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write_bar(&self, address: u64, data: &[u8]) {
        if let Some((device, bar, offset)) = self.bar_at(address) {
            lock(device).write_bar(bar, offset, data);
        }
    }

    /// Re-reads every function's BAR decode after a restore put configuration spaces back,
    /// telling each function where its BARs are now.
    pub fn refresh_decode(&mut self) {
        for slot in self.slots.iter_mut().flatten() {
            let mut dev = lock(&slot.device);
            let decode = decode_of(&*dev);
            for (bar, (old, new)) in slot.decode.iter().zip(decode).enumerate() {
                if *old != new {
                    dev.bar_decode_changed(bar, old.map(|d| d.0), new.map(|d| d.0));
                }
            }
            slot.decode = decode;
        }
    }
}

fn decode_of(dev: &dyn PciDevice) -> [Option<(u64, u64)>; config::BAR_COUNT] {
    let config = dev.config();
    std::array::from_fn(|bar| {
        let size = config.bar_spec(bar)?.size;
        config.bar_address(bar).map(|a| (a, size))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum PciBusError {
    #[error("PCI device number {0} is past the last one (31)")]
    DeviceNumber(u8),
    #[error("PCI device number {0} is taken")]
    Occupied(u8),
    #[error("the PCI bus is full (32 devices)")]
    Full,
}

/// 00:00.0, the host bridge: identity only.
struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    fn new() -> Self {
        Self {
            config: PciConfiguration::new(
                PciIdentity {
                    vendor_id: HOST_BRIDGE_VENDOR_ID,
                    device_id: HOST_BRIDGE_DEVICE_ID,
                    revision: 0,
                    class_code: CLASS_HOST_BRIDGE,
                    subsystem_vendor_id: 0,
                    subsystem_id: 0,
                },
                0,
            ),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Ports 0xcf8..0xcff: the configuration address register (32-bit accesses only, as on a PC)
/// and the data window it selects.
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { bus, address: 0 }
    }

    /// (device, function, register) the address register selects, if enabled and on bus 0.
    fn target(&self) -> Option<(usize, usize, usize)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 || (self.address >> 16) & 0xff != 0 {
            return None;
        }
        let a = self.address as usize;
        Some(((a >> 11) & 0x1f, (a >> 8) & 0x7, a & 0xfc))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if offset as usize - 4 + data.len() <= 4 => match self.target() {
                Some((device, function, register)) => lock(&self.bus).read_config(
                    device,
                    function,
                    register + offset as usize - 4,
                    data,
                ),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(bytes);
                }
            }
            4..=7 if offset as usize - 4 + data.len() <= 4 => {
                if let Some((device, function, register)) = self.target() {
                    lock(&self.bus).write_config(
                        device,
                        function,
                        register + offset as usize - 4,
                        data,
                    );
                }
            }
            _ => {}
        }
    }
}

/// ECAM (PCI Express enhanced configuration access) for bus 0: 4 KiB per function.
pub struct PciEcam {
    bus: Arc<Mutex<PciBus>>,
}

impl PciEcam {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { bus }
    }

    fn target(offset: u64, len: usize) -> Option<(usize, usize, usize)> {
        let register = (offset & 0xfff) as usize;
        // An access must stay inside one function's space and on bus 0.
        if offset >> 20 != 0 || register + len > 0x1000 {
            return None;
        }
        Some((
            ((offset >> 15) & 0x1f) as usize,
            ((offset >> 12) & 0x7) as usize,
            register,
        ))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::target(offset, data.len()) {
            Some((device, function, register)) => {
                lock(&self.bus).read_config(device, function, register, data)
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((device, function, register)) = Self::target(offset, data.len()) {
            lock(&self.bus).write_config(device, function, register, data);
        }
    }
}

/// A BAR window on the VMM's MMIO bus (32- or 64-bit): accesses go to whichever BAR decodes
/// the address now.
pub struct PciBarWindow {
    bus: Arc<Mutex<PciBus>>,
    base: u64,
}

impl PciBarWindow {
    pub fn new(bus: Arc<Mutex<PciBus>>, base: u64) -> Self {
        Self { bus, base }
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.bus).read_bar(self.base + offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.bus).write_bar(self.base + offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> PciConfigIo {
        PciConfigIo::new(Arc::new(Mutex::new(PciBus::new())))
    }

    fn read32(io: &mut PciConfigIo, device: u32, register: u32) -> u32 {
        io.write(
            0,
            &(CONFIG_ADDRESS_ENABLE | device << 11 | register).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_and_absent_devices() {
        let mut io = io();
        assert_eq!(read32(&mut io, 0, 0), 0x0d57_8086);
        assert_eq!(read32(&mut io, 0, 8) >> 8, CLASS_HOST_BRIDGE);
        assert_eq!(read32(&mut io, 1, 0), u32::MAX);
        // Disabled address register: all ones.
        io.write(0, &0u32.to_le_bytes());
        let mut b = [0u8; 2];
        io.read(4, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn byte_accesses_to_the_address_port_are_not_the_register() {
        let mut io = io();
        io.write(0, &0x8000_0000u32.to_le_bytes());
        io.write(3, &[0x01]);
        let mut b = [0u8; 4];
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
    }

    #[test]
    fn ecam_reads_match_the_io_ports() {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let mut ecam = PciEcam::new(bus.clone());
        let mut b = [0u8; 4];
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0d57_8086);
        ecam.read(1 << 15, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Across a function's 4 KiB boundary, or past bus 0: absent.
        ecam.read(0xffe, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.read(1 << 20, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    /// Property: random guest accesses of any width at any port or ECAM offset never panic and
    /// never change the host bridge's identity.
    #[test]
    fn random_config_accesses_are_harmless() {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let mut io = PciConfigIo::new(bus.clone());
        let mut ecam = PciEcam::new(bus.clone());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..50_000 {
            let len = [1usize, 2, 3, 4, 8][(next() % 5) as usize];
            let mut data = vec![0u8; len];
            let value = next();
            for (i, b) in data.iter_mut().enumerate() {
                *b = (value >> (8 * i)) as u8;
            }
            match next() % 4 {
                0 => io.write(next() % 8, &data),
                1 => io.read(next() % 8, &mut data),
                2 => ecam.write(next() % (2 << 20), &data),
                _ => ecam.read(next() % (2 << 20), &mut data),
            }
        }
        let mut b = [0u8; 4];
        bus.lock().unwrap().read_config(0, 0, 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0d57_8086);
    }
}
