//! ACPI platform devices of the hardware-reduced machine the VMM's ACPI tables describe:
//!
//! - the shutdown port: a guest write of the S5 sleep value powers the VM off, as with Cloud
//!   Hypervisor's shutdown device, so guests written for it shut our VMM down too;
//! - the generic event device (GED): an interrupt plus one register that says which platform
//!   event fired; the tables' AML turns a power-button event into a `Notify` of the power
//!   button device, so the guest shuts down cleanly.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// I/O port of the sleep control register.
pub const SHUTDOWN_PORT: u64 = 0x600;
/// SLP_TYP field value of the S5 (soft off) state.
const S5_SLEEP_TYPE: u8 = 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_ENABLE_BIT: u8 = 1 << 5;
/// Writing this to the reset register (same port, as our FADT will describe) reboots the VM.
pub const RESET_VALUE: u8 = 1;

pub struct AcpiShutdownDevice {
    exit_evt: EventFd,
    reset_evt: EventFd,
}

impl AcpiShutdownDevice {
    pub fn new(exit_evt: EventFd, reset_evt: EventFd) -> Self {
        Self {
            exit_evt,
            reset_evt,
        }
    }
}

impl BusDevice for AcpiShutdownDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), 0) = (data.first(), offset) else {
            return;
        };
        if value == (S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE_BIT {
            log::info!("guest requested ACPI S5 shutdown");
            if let Err(e) = self.exit_evt.write(1) {
                log::error!("cannot signal guest shutdown: {e}");
            }
        } else if value == RESET_VALUE {
            log::info!("guest requested reset through the ACPI reset register");
            if let Err(e) = self.reset_evt.write(1) {
                log::error!("cannot signal guest reset: {e}");
            }
        }
    }
}

/// Pending-event bit of a power-button press in the GED register (the DSDT's `_EVT` tests it).
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 0;
/// Pending-event bit of a PCI hot-plug or unplug request: `_EVT` then scans the hot-plug
/// controller's slot bitmaps.
pub const GED_EVENT_PCI_CHANGED: u32 = 1 << 1;
/// Width in bytes of the GED event register, at offset 0 of the device's MMIO range.
const GED_REGISTER_SIZE: usize = 4;

/// The generic event device: platform events the VMM raises (only the power button for now),
/// each a bit in a pending word, announced by an edge on the GED interrupt. The guest's `_EVT`
/// method reads the register, which hands over and clears what is pending.
pub struct Ged {
    interrupt: EventFd,
    pending: u32,
}

impl Ged {
    /// `interrupt` is the eventfd the VMM wires to the GED's interrupt line.
    pub fn new(interrupt: EventFd) -> Self {
        Self {
            interrupt,
            pending: 0,
        }
    }

    /// Presses the power button: marks the event and interrupts the guest.
    pub fn notify_power_button(&mut self) -> std::io::Result<()> {
        self.notify(GED_EVENT_POWER_BUTTON)
    }

    /// A PCI slot gained a device or should give one up (see [`crate::pci::hotplug`]).
    pub fn notify_pci_changed(&mut self) -> std::io::Result<()> {
        self.notify(GED_EVENT_PCI_CHANGED)
    }

    fn notify(&mut self, event: u32) -> std::io::Result<()> {
        self.pending |= event;
        self.interrupt.write(1)
    }

    /// Events raised and not yet read by the guest.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Puts back events a snapshot (or the FT primary) had raised but the guest had not read,
    /// and interrupts again: a power-button press survives a restore or a failover.
    pub fn restore(&mut self, pending: u32) -> std::io::Result<()> {
        if pending == 0 {
            return Ok(());
        }
        self.notify(pending)
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == GED_REGISTER_SIZE {
            data.copy_from_slice(&self.pending.to_le_bytes());
            self.pending = 0;
        } else {
            data.fill(0);
        }
    }

    // The register is read-only: the guest acknowledges events by reading them.
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ged_power_button_interrupts_and_read_clears() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        let mut word = [0xffu8; 4];
        ged.read(0, &mut word);
        assert_eq!(word, [0; 4], "nothing pending at start");
        assert!(irq.read().is_err(), "no interrupt before an event");

        ged.notify_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(ged.pending(), GED_EVENT_POWER_BUTTON);
        // A write does not acknowledge anything.
        ged.write(0, &[0, 0, 0, 0]);
        ged.read(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), GED_EVENT_POWER_BUTTON);
        ged.read(0, &mut word);
        assert_eq!(word, [0; 4], "a read clears the pending events");
    }

    #[test]
    fn ged_pending_press_survives_a_restore() {
        let source = Ged::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut pressed = source;
        pressed.notify_power_button().unwrap();
        let saved = pressed.pending();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored = Ged::new(irq.try_clone().unwrap());
        restored.restore(0).unwrap();
        assert!(irq.read().is_err(), "nothing pending, no interrupt");
        restored.restore(saved).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut word = [0u8; 4];
        restored.read(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), GED_EVENT_POWER_BUTTON);
    }

    #[test]
    fn ged_other_offsets_and_widths_read_zero_and_keep_events() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq);
        ged.notify_power_button().unwrap();
        let mut byte = [0xffu8; 1];
        ged.read(0, &mut byte);
        assert_eq!(byte, [0]);
        let mut word = [0xffu8; 4];
        ged.read(4, &mut word);
        assert_eq!(word, [0; 4]);
        assert_eq!(ged.pending(), GED_EVENT_POWER_BUTTON);
    }

    #[test]
    fn shutdown_port_status_reads_zero() {
        let mut dev = AcpiShutdownDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        let mut status = [0xffu8];
        dev.read(0, &mut status);
        assert_eq!(status, [0], "wake status must read clear");
    }

    #[test]
    fn clearing_wake_status_neither_stops_nor_resets() {
        let exit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev =
            AcpiShutdownDevice::new(exit.try_clone().unwrap(), reset.try_clone().unwrap());
        // An OS writes WAK_STS (bit 7) to the sleep status register before it sleeps.
        dev.write(0, &[0x80]);
        assert!(exit.read().is_err());
        assert!(reset.read().is_err());
    }

    #[test]
    fn s5_write_signals_exit_and_other_values_do_not() {
        let exit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev =
            AcpiShutdownDevice::new(exit.try_clone().unwrap(), reset.try_clone().unwrap());
        dev.write(0, &[0x14]);
        assert!(
            exit.read().is_err(),
            "S5 type without SLP_EN must not shut down"
        );
        dev.write(0, &[0x34]);
        assert_eq!(exit.read().unwrap(), 1);
        dev.write(0, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
