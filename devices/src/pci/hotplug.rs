//! The PCI hot-plug controller of Cloud Hypervisor's machine: a small MMIO register block that
//! the DSDT's AML reads and writes (ACPI PCI hot-plug, the guest's `acpiphp` driver).
//!
//! The VMM marks a slot "up" (a device was added) or "down" (the VMM asks the guest to give a
//! device up) and raises the GED's PCI event. The guest's `_EVT` reads the two bitmaps (a read
//! clears them) and notifies each slot: a device check for up, an eject request for down. When
//! the guest has let go of the device it runs the slot's `_EJ0`, which writes the slot's bit to
//! the eject register; the VMM then takes the device off the bus.
//!
//! Registers (32-bit, little-endian), as Cloud Hypervisor lays them out:
//! - `0x0` PCIU: slots with a new device (read clears);
//! - `0x4` PCID: slots whose device should be ejected (read clears);
//! - `0x8` B0EJ: the guest writes the bits of the slots it ejected;
//! - `0xc` PSEG: the PCI segment the other registers refer to (only segment 0 exists here).

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub const PCIU_OFFSET: u64 = 0x0;
pub const PCID_OFFSET: u64 = 0x4;
pub const B0EJ_OFFSET: u64 = 0x8;
pub const PSEG_OFFSET: u64 = 0xc;
/// Bytes of MMIO the controller decodes.
pub const HOTPLUG_REGISTERS_SIZE: u64 = 0x10;

/// What the guest has not read yet, kept across a snapshot, migration or failover so that a
/// pending hot-plug is not lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciHotplugState {
    pub up: u32,
    pub down: u32,
    /// Slots the guest ejected and the VMM has not removed yet.
    pub ejected: u32,
}

pub struct PciHotplugController {
    state: PciHotplugState,
    segment: u32,
    /// Written when the guest ejects a slot: the control loop removes the device.
    eject_evt: EventFd,
}

impl PciHotplugController {
    pub fn new(eject_evt: EventFd) -> Self {
        Self {
            state: PciHotplugState::default(),
            segment: 0,
            eject_evt,
        }
    }

    /// A device was placed in `slot`: the guest is told at its next scan.
    pub fn announce_added(&mut self, slot: u8) {
        self.state.up |= slot_bit(slot);
        self.state.down &= !slot_bit(slot);
    }

    /// The device in `slot` should go: the guest is asked to eject it.
    pub fn request_eject(&mut self, slot: u8) {
        self.state.down |= slot_bit(slot);
        self.state.up &= !slot_bit(slot);
    }

    /// Slots the guest ejected since the last call (their devices may leave the bus now).
    pub fn take_ejected(&mut self) -> u32 {
        std::mem::take(&mut self.state.ejected)
    }

    pub fn state(&self) -> PciHotplugState {
        self.state
    }

    /// Puts back a saved state; ejects still to be handled wake the control loop again.
    pub fn restore(&mut self, state: PciHotplugState) -> std::io::Result<()> {
        self.state = state;
        if state.ejected != 0 {
            self.eject_evt.write(1)?;
        }
        Ok(())
    }
}

fn slot_bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

impl BusDevice for PciHotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            PSEG_OFFSET => self.segment,
            // No device ever sits on another segment.
            _ if self.segment != 0 => 0,
            PCIU_OFFSET => std::mem::take(&mut self.state.up),
            PCID_OFFSET => std::mem::take(&mut self.state.down),
            _ => 0,
        };
        log::debug!("PCI hot-plug: the guest read {offset:#x}: {value:#x}");
        fill(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        log::debug!("PCI hot-plug: the guest wrote {value:#x} to {offset:#x}");
        match offset {
            B0EJ_OFFSET if self.segment == 0 && value != 0 => {
                // Slot 0 is the host bridge: it never goes.
                self.state.ejected |= value & !1;
                if let Err(e) = self.eject_evt.write(1) {
                    log::error!("PCI hot-plug: cannot signal an eject: {e}");
                }
            }
            PSEG_OFFSET => self.segment = value,
            _ => {}
        }
    }
}

fn fill(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (PciHotplugController, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (PciHotplugController::new(evt.try_clone().unwrap()), evt)
    }

    fn read32(c: &mut PciHotplugController, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        c.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn slot_bitmaps_are_read_once() {
        let (mut c, _evt) = controller();
        c.announce_added(5);
        c.announce_added(7);
        c.request_eject(3);
        assert_eq!(read32(&mut c, PCIU_OFFSET), (1 << 5) | (1 << 7));
        assert_eq!(read32(&mut c, PCIU_OFFSET), 0);
        assert_eq!(read32(&mut c, PCID_OFFSET), 1 << 3);
        assert_eq!(read32(&mut c, PCID_OFFSET), 0);
    }

    #[test]
    fn an_eject_wakes_the_vmm_and_is_taken_once() {
        let (mut c, evt) = controller();
        c.write(B0EJ_OFFSET, &(1u32 << 4).to_le_bytes());
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(c.take_ejected(), 1 << 4);
        assert_eq!(c.take_ejected(), 0);
        // The host bridge in slot 0 never goes; a zero write signals nothing.
        c.write(B0EJ_OFFSET, &1u32.to_le_bytes());
        assert_eq!(c.take_ejected(), 0);
        c.write(B0EJ_OFFSET, &0u32.to_le_bytes());
        assert!(evt.read().is_err() || c.take_ejected() == 0);
    }

    #[test]
    fn another_segment_reads_empty_and_ejects_nothing() {
        let (mut c, _evt) = controller();
        c.announce_added(2);
        c.write(PSEG_OFFSET, &1u32.to_le_bytes());
        assert_eq!(read32(&mut c, PSEG_OFFSET), 1);
        assert_eq!(read32(&mut c, PCIU_OFFSET), 0);
        c.write(B0EJ_OFFSET, &(1u32 << 2).to_le_bytes());
        assert_eq!(c.take_ejected(), 0);
        c.write(PSEG_OFFSET, &0u32.to_le_bytes());
        assert_eq!(read32(&mut c, PCIU_OFFSET), 1 << 2);
    }

    #[test]
    fn a_pending_event_survives_a_restore() {
        let (mut c, _evt) = controller();
        c.announce_added(6);
        let saved = c.state();
        let (mut other, evt) = controller();
        other.restore(saved).unwrap();
        assert_eq!(read32(&mut other, PCIU_OFFSET), 1 << 6);
        other
            .restore(PciHotplugState {
                ejected: 1 << 9,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(other.take_ejected(), 1 << 9);
    }

    #[test]
    fn odd_widths_and_offsets_do_not_panic() {
        let (mut c, _evt) = controller();
        c.announce_added(1);
        let mut one = [0u8; 1];
        c.read(PCIU_OFFSET, &mut one);
        assert_eq!(one[0], 2);
        let mut eight = [0xffu8; 8];
        c.read(0x20, &mut eight);
        assert_eq!(eight, [0; 8]);
        c.write(B0EJ_OFFSET, &[]);
        c.write(0x40, &[1, 2, 3, 4, 5]);
    }
}
