//! The ACPI-style shutdown port: a guest write of the S5 sleep value powers the VM off, as with
//! Cloud Hypervisor's shutdown device, so guests written for it shut our VMM down too.

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

#[cfg(test)]
mod tests {
    use super::*;

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
