//! The 8250 UART on COM1, backed by vm-superio's register model.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::state::RestoreError;

pub const SERIAL_PORT_BASE: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
/// ISA IRQ line of COM1.
pub const SERIAL_IRQ: u32 = 4;

/// Raises the UART's interrupt line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Largest receive FIFO vm-superio accepts (its `FIFO_SIZE`, not exported).
pub const SERIAL_FIFO_SIZE: usize = 64;

/// The UART's saved state: every register and the input bytes the guest has not read yet.
/// Mirrors vm-superio's `SerialState`, which has no serde support. The output sink and the
/// interrupt line are host resources the destination wires up itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Host input queued for the guest but not read yet (at most [`SERIAL_FIFO_SIZE`] bytes).
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

pub struct Serial {
    inner: vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// `out` receives every byte the guest transmits; it is flushed by vm-superio per byte,
    /// which keeps console output prompt for tests that wait on markers.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues host input for the guest to read (console input).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or_else(|e| {
            log::warn!("serial input dropped: {e}");
            0
        })
    }

    /// The UART's registers and pending input.
    pub fn state(&self) -> SerialDeviceState {
        self.inner.state().into()
    }

    /// Loads `state`, keeping this device's output and interrupt line. Raises the interrupt
    /// if the restored registers have one pending (vm-superio's `from_state` does that), so a
    /// guest that had not yet seen it does not wait forever. On error the device is unchanged.
    pub fn restore(&mut self, state: &SerialDeviceState) -> Result<(), RestoreError> {
        if state.in_buffer.len() > SERIAL_FIFO_SIZE {
            return Err(RestoreError::Serial(format!(
                "the snapshot holds {} input bytes, more than the {SERIAL_FIFO_SIZE}-byte FIFO",
                state.in_buffer.len()
            )));
        }
        let irq =
            self.inner.interrupt_evt().0.try_clone().map_err(|e| {
                RestoreError::Serial(format!("cannot duplicate the irq eventfd: {e}"))
            })?;
        // Built with a placeholder output so that a failure leaves `self` untouched; the real
        // output moves over once the new model exists.
        let placeholder: Box<dyn Write + Send> = Box::new(std::io::sink());
        let fresh = vm_superio::Serial::from_state(
            &SerialState::from(state),
            IrqTrigger(irq),
            NoEvents,
            placeholder,
        )
        .map_err(|e| RestoreError::Serial(format!("{e:?}")))?;
        let old = std::mem::replace(&mut self.inner, fresh);
        *self.inner.writer_mut() = old.into_writer();
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |o| self.inner.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        for &byte in data {
            if let Err(e) = self.inner.write(offset, byte) {
                // Losing console output is not worth stopping the guest for.
                log::warn!("serial output error: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let buf = SharedBuf::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq, Box::new(buf.clone()));
        serial.write(0, b"hi");
        // LSR reports the transmitter empty so that polling drivers proceed.
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(&*buf.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn state_round_trips_through_json() {
        let buf = SharedBuf::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq.try_clone().unwrap(), Box::new(buf.clone()));
        // Non-default registers: LCR (8N1 + DLAB off), scratch, IER with RDA enabled.
        serial.write(3, &[0x03]);
        serial.write(7, &[0x5a]);
        serial.write(1, &[0x01]);
        // Input the guest has been interrupted for but not read yet.
        assert_eq!(serial.enqueue_input(b"abc"), 3);
        assert_eq!(irq.read().unwrap(), 1);

        let state = serial.state();
        assert_eq!(state.in_buffer, b"abc");
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let out2 = SharedBuf::default();
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored = Serial::new(irq2.try_clone().unwrap(), Box::new(out2.clone()));
        restored.restore(&back).unwrap();
        assert_eq!(restored.state(), state);
        // Received data pending with RDA enabled: the guest is interrupted again.
        assert_eq!(irq2.read().unwrap(), 1);
        // The pending input continues where it stopped, and output still reaches our sink.
        let mut next = [0u8];
        restored.read(0, &mut next);
        assert_eq!(next, *b"a");
        restored.write(0, b"z");
        assert_eq!(&*out2.0.lock().unwrap(), b"z");
    }

    #[test]
    fn oversized_fifo_is_refused_and_leaves_the_device_alone() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq, Box::new(std::io::sink()));
        let before = serial.state();
        let mut state = before.clone();
        state.in_buffer = vec![0; SERIAL_FIFO_SIZE + 1];
        let err = serial.restore(&state).unwrap_err().to_string();
        assert!(err.contains("65 input bytes"), "{err}");
        assert_eq!(serial.state(), before);
        let json = serde_json::to_string(&before)
            .unwrap()
            .replace('}', ",\"extra\":1}");
        assert!(serde_json::from_str::<SerialDeviceState>(&json).is_err());
    }
}
