//! A type-0 PCI configuration space (PCI Local Bus 3.0, 6.1): 256 bytes the guest reads and
//! writes at any width and offset, with a write mask per byte so read-only fields stay what the
//! device says and BARs report their size when probed with all ones.

use serde::{Deserialize, Serialize};

pub const CONFIG_SPACE_SIZE: usize = 256;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_CODE: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
/// Capabilities start here (the first 64 bytes are the standard header).
pub const FIRST_CAPABILITY: usize = 0x40;
pub const BAR_COUNT: usize = 6;

pub const COMMAND_IO_SPACE: u16 = 1;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
const BAR_MEMORY_64BIT: u32 = 0b100;

/// A memory BAR as the device declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    pub index: usize,
    /// A power of two, at least 16 bytes.
    pub size: u64,
    pub is_64bit: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {index}: size {size:#x} is not a power of two of at least 16 bytes")]
    BarSize { index: usize, size: u64 },
    #[error("BAR {0} does not exist or overlaps another BAR")]
    BarIndex(usize),
    #[error("BAR {index} at {address:#x} is not aligned to its size {size:#x}")]
    BarAlignment {
        index: usize,
        address: u64,
        size: u64,
    },
    #[error("no room for a {0}-byte capability in configuration space")]
    CapabilitySpace(usize),
}

/// Identity of a function, written once at creation.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// class << 16 | subclass << 8 | programming interface.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// The saved configuration space: what the guest programmed (BARs, command, MSI-X control,
/// interrupt line) along with the read-only contents, which the restoring side checks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PciConfigState {
    /// 64 little-endian dwords.
    pub registers: Vec<u32>,
}

pub struct PciConfiguration {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<BarSpec>; BAR_COUNT],
    /// Where the next capability goes; 0 before the first.
    next_capability: usize,
    last_capability: Option<usize>,
}

impl PciConfiguration {
    pub fn new(id: PciIdentity, interrupt_pin: u8) -> Self {
        let mut config = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        config.put16(VENDOR_ID, id.vendor_id);
        config.put16(DEVICE_ID, id.device_id);
        config.bytes[REVISION_ID] = id.revision;
        config.bytes[CLASS_CODE..CLASS_CODE + 3].copy_from_slice(&id.class_code.to_le_bytes()[..3]);
        config.put16(SUBSYSTEM_VENDOR_ID, id.subsystem_vendor_id);
        config.put16(SUBSYSTEM_ID, id.subsystem_id);
        config.bytes[INTERRUPT_PIN] = interrupt_pin;
        let command = COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER;
        config.writable[COMMAND..COMMAND + 2]
            .copy_from_slice(&(command | COMMAND_INTX_DISABLE).to_le_bytes());
        // Cache line size and latency timer are plain storage; the interrupt line is the
        // firmware's note to the OS.
        config.writable[0x0c] = 0xff;
        config.writable[0x0d] = 0xff;
        config.writable[INTERRUPT_LINE] = 0xff;
        config
    }

    /// Declares a memory BAR at `address` (the VMM's assignment; the guest may move it).
    pub fn add_bar(&mut self, bar: BarSpec, address: u64) -> Result<(), ConfigError> {
        let BarSpec {
            index,
            size,
            is_64bit,
        } = bar;
        if size < 16 || !size.is_power_of_two() || (!is_64bit && size > 1 << 31) {
            return Err(ConfigError::BarSize { index, size });
        }
        let last = index + usize::from(is_64bit);
        let upper_half_of_previous = index > 0 && self.bars[index - 1].is_some_and(|b| b.is_64bit);
        if last >= BAR_COUNT
            || upper_half_of_previous
            || self.bars[index].is_some()
            || (is_64bit && self.bars[last].is_some())
        {
            return Err(ConfigError::BarIndex(index));
        }
        if !address.is_multiple_of(size) || (!is_64bit && address > u64::from(u32::MAX)) {
            return Err(ConfigError::BarAlignment {
                index,
                address,
                size,
            });
        }
        self.bars[index] = Some(bar);
        let offset = BAR0 + 4 * index;
        let mask = !(size - 1);
        let flags = if is_64bit { BAR_MEMORY_64BIT } else { 0 };
        self.put32(offset, (address as u32 & !0xf) | flags);
        self.writable[offset..offset + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if is_64bit {
            self.put32(offset + 4, (address >> 32) as u32);
            self.writable[offset + 4..offset + 8]
                .copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        Ok(())
    }

    /// Appends a capability (`body` starts with its ID; the next pointer is filled in) and
    /// returns its offset. `writable` masks the body's bytes the guest may change.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let offset = self.next_capability;
        let len = body.len().max(2);
        let end = offset + len;
        if end > CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.bytes[offset..offset + body.len()].copy_from_slice(body);
        self.bytes[offset + 1] = 0;
        for (i, m) in writable.iter().enumerate().take(len) {
            self.writable[offset + i] = *m;
        }
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = offset as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = offset as u8;
                let status = self.get16(STATUS) | STATUS_CAPABILITIES_LIST;
                self.put16(STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        // Capabilities are dword aligned.
        self.next_capability = end.div_ceil(4) * 4;
        Ok(offset)
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the 256-byte space read as 0 (as an
    /// absent PCI Express extended capability list does).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes through the masks; read-only bytes and bytes past the space are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset + i;
            if at < CONFIG_SPACE_SIZE {
                let mask = self.writable[at];
                self.bytes[at] = (self.bytes[at] & !mask) | (b & mask);
            }
        }
    }

    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    pub fn bar_spec(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// Where BAR `index` decodes now: `None` while memory decoding is off or for a BAR the
    /// guest left at an address that does not fit its size (a probe in progress).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar_spec(index)?;
        if self.command() & COMMAND_MEMORY_SPACE == 0 {
            return None;
        }
        let offset = BAR0 + 4 * bar.index;
        let low = u64::from(self.get32(offset) & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.get32(offset + 4)) << 32
        } else {
            0
        };
        let address = high | low;
        // An all-ones probe leaves the size mask in place; a BAR that wraps the address space
        // (or is 0) decodes nothing.
        let end = address.checked_add(bar.size)?;
        (address != 0 && end <= 1 << 52).then_some(address)
    }

    /// Every BAR's current decode, indexed by BAR number.
    pub fn bar_addresses(&self) -> [Option<u64>; BAR_COUNT] {
        std::array::from_fn(|i| self.bar_address(i))
    }

    pub fn read_byte(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    pub fn get16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.read_byte(offset), self.read_byte(offset + 1)])
    }

    pub fn get32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(std::array::from_fn(|i| self.read_byte(offset + i)))
    }

    fn put16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn put32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            registers: (0..CONFIG_SPACE_SIZE / 4)
                .map(|i| self.get32(4 * i))
                .collect(),
        }
    }

    /// Takes back what the guest could have written; read-only bytes must match (the same
    /// device, built from the same configuration).
    pub fn restore(&mut self, state: &PciConfigState) -> Result<(), String> {
        if state.registers.len() != CONFIG_SPACE_SIZE / 4 {
            return Err(format!(
                "configuration space has {} dwords, expected {}",
                state.registers.len(),
                CONFIG_SPACE_SIZE / 4
            ));
        }
        let saved: Vec<u8> = state
            .registers
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        for (at, (&have, &want)) in self.bytes.iter().zip(&saved).enumerate() {
            let read_only = !self.writable[at];
            if have & read_only != want & read_only {
                return Err(format!(
                    "read-only configuration byte {at:#x} is {have:#x} here but {want:#x} in the snapshot (a different device?)"
                ));
            }
        }
        self.bytes.copy_from_slice(&saved);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfiguration {
        PciConfiguration::new(
            PciIdentity {
                vendor_id: 0x1af4,
                device_id: 0x1041,
                revision: 1,
                class_code: 0x02_0000,
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x40,
            },
            1,
        )
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = config();
        c.write(0, &[0xff; 4]);
        assert_eq!(c.get32(0), 0x1041_1af4);
        assert_eq!(c.read_byte(INTERRUPT_PIN), 1);
        c.write(CLASS_CODE, &[9, 9, 9]);
        assert_eq!(c.get32(0x08) >> 8, 0x02_0000);
    }

    #[test]
    fn bar_probe_reports_size_then_moves() {
        let mut c = config();
        c.add_bar(
            BarSpec {
                index: 0,
                size: 0x8000,
                is_64bit: true,
            },
            0xc000_0000,
        )
        .unwrap();
        assert_eq!(c.bar_address(0), None, "decode off at reset");
        c.write(COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        c.write(BAR0, &u32::MAX.to_le_bytes());
        c.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(c.get32(BAR0), 0xffff_8000 | BAR_MEMORY_64BIT);
        assert_eq!(c.get32(BAR0 + 4), u32::MAX);
        assert_eq!(c.bar_address(0), None, "a probe decodes nothing");
        c.write(BAR0, &0x1000_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0x1_1000_0000));
        // An unimplemented BAR reads 0 whatever is written.
        c.write(BAR0 + 8, &u32::MAX.to_le_bytes());
        assert_eq!(c.get32(BAR0 + 8), 0);
    }

    #[test]
    fn capabilities_chain() {
        let mut c = config();
        let a = c
            .add_capability(&[0x11, 0, 1, 2], &[0, 0, 0, 0xc0])
            .unwrap();
        let b = c.add_capability(&[0x09, 0, 16, 1, 0, 0], &[]).unwrap();
        assert_eq!(c.read_byte(CAPABILITIES_POINTER) as usize, a);
        assert_eq!(c.read_byte(a + 1) as usize, b);
        assert_eq!(c.read_byte(b + 1), 0);
        assert_ne!(c.get16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        c.write(a, &[0xff; 4]);
        assert_eq!(c.get32(a), 0xc201_0000 | (b as u32) << 8 | 0x11);
    }

    #[test]
    fn bad_bars_refused() {
        let mut c = config();
        let bar = |index, size, is_64bit| BarSpec {
            index,
            size,
            is_64bit,
        };
        assert!(c.add_bar(bar(0, 24, false), 0).is_err());
        assert!(c.add_bar(bar(5, 16, true), 0).is_err());
        assert!(c.add_bar(bar(0, 0x1000, false), 0x800).is_err());
        c.add_bar(bar(0, 0x1000, true), 0x1000).unwrap();
        assert!(c.add_bar(bar(1, 0x1000, false), 0x1000).is_err());
    }

    #[test]
    fn restore_checks_read_only_bytes() {
        let mut c = config();
        c.write(INTERRUPT_LINE, &[7]);
        let mut s = c.state();
        let mut d = config();
        d.restore(&s).unwrap();
        assert_eq!(d.read_byte(INTERRUPT_LINE), 7);
        s.registers[0] = 0x1234_5678;
        assert!(d.restore(&s).is_err());
    }
}
