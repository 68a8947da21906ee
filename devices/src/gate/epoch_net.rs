//! The epoch-holding network gate.

use std::io;
use std::sync::{Arc, Mutex};

use super::epoch::{lock, Accepted, EpochControl, EpochCore, HoldLimits, Sink};
use super::NetOutputGate;

struct NetSink(Box<dyn NetOutputGate>);

impl Sink for NetSink {
    type Meta = ();
    // A frame the TAP refuses is lost, as on any congested link; stopping would hold every
    // later frame hostage to one bad one.
    const STOP_ON_ERROR: bool = false;

    fn release(&mut self, _meta: &(), data: &[u8]) -> io::Result<()> {
        self.0.transmit(data)
    }
}

/// A network output gate that holds each epoch's frames until the epoch is committed
/// (see [`EpochControl`]), then sends them through the wrapped gate in production order.
///
/// Over the hold limits the newest frame is dropped (and counted): a dropped packet is
/// recovered by the guest's TCP, unbounded memory for a slow backup is not recoverable.
pub struct EpochNetGate {
    core: Arc<Mutex<EpochCore<NetSink>>>,
}

impl EpochNetGate {
    /// Wraps `inner`, holding output from `first_epoch` on with the default limits.
    pub fn new(inner: Box<dyn NetOutputGate>, first_epoch: u64) -> (Self, EpochControl) {
        Self::with_limits(inner, first_epoch, HoldLimits::default())
    }

    /// Like [`EpochNetGate::new`] with explicit hold limits.
    pub fn with_limits(
        inner: Box<dyn NetOutputGate>,
        first_epoch: u64,
        limits: HoldLimits,
    ) -> (Self, EpochControl) {
        let core = Arc::new(Mutex::new(EpochCore::new(
            NetSink(inner),
            first_epoch,
            limits,
        )));
        let control = EpochControl::new(core.clone());
        (Self { core }, control)
    }
}

impl NetOutputGate for EpochNetGate {
    fn transmit(&mut self, frame: &[u8]) -> io::Result<()> {
        match lock(&self.core).accept((), frame)? {
            Accepted::Passed | Accepted::Held => Ok(()),
            // Reported as sent: the device's job is done, the frame is lost on the way, which
            // the guest's protocols handle. The drop is counted in the gate's stats.
            Accepted::OverLimit => Ok(()),
        }
    }
}
