//! The i8042 keyboard controller, present so that guests can reset the machine through it
//! (command 0xfe on port 0x64), which is how Linux reboots without ACPI.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

/// Adapts `EventFd` to vm-superio's trigger so that a reset command wakes the control loop.
pub struct ResetTrigger(pub EventFd);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// No saved state: vm-superio's i8042 keeps nothing but the reset eventfd (reads return 0,
/// the only command acted upon is the reset), so a snapshot has nothing to carry and a fresh
/// device on the destination behaves identically.
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            inner: I8042Device::new(ResetTrigger(reset_evt)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |o| self.inner.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.inner.write(offset, value) {
            log::error!("i8042 cannot signal reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_reset() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
