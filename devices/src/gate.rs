//! Output gates: the one place through which a device's externally visible output leaves the
//! VM. Without fault tolerance a gate passes output straight through; fault tolerance swaps in
//! a gate that holds each epoch's output until the backup has acknowledged that epoch.
//! Devices know nothing else of fault tolerance.

/// Where a network device's transmitted frames go (a TAP device, through the gate).
pub trait NetOutputGate: Send {
    /// Sends one Ethernet frame (without the virtio-net header).
    fn transmit(&mut self, frame: &[u8]) -> std::io::Result<()>;
}
