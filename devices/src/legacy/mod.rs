//! PC legacy devices: the 8250 UART and the i8042 controller (used by guests to reset).

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{Serial, SerialDeviceState, SERIAL_FIFO_SIZE, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
