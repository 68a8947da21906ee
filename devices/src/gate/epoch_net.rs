//! The epoch-holding network gate.

use std::io;
use std::sync::{Arc, Mutex, RwLock};

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

/// The MAC addresses of the other VMs of a fault-tolerance group (fate sharing): frames to
/// them leave at once, since sender and receiver always roll back to the same epoch. Clones
/// share one list; it is empty (everything held) outside a group.
#[derive(Clone, Debug, Default)]
pub struct GroupPeers(Arc<RwLock<Vec<[u8; 6]>>>);

impl GroupPeers {
    /// Replaces the list.
    pub fn set(&self, macs: Vec<[u8; 6]>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = macs;
    }

    pub fn get(&self) -> Vec<[u8; 6]> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `frame` is addressed (unicast) to a group member.
    fn addressed_to_member(&self, frame: &[u8]) -> bool {
        let Some(dest) = frame.get(..6) else {
            return false;
        };
        let peers = self.0.read().unwrap_or_else(|p| p.into_inner());
        !peers.is_empty() && peers.iter().any(|mac| mac[..] == *dest)
    }
}

/// A network output gate that holds each epoch's frames until the epoch is committed
/// (see [`EpochControl`]), then sends them through the wrapped gate in production order.
///
/// Over the hold limits the newest frame is dropped (and counted): a dropped packet is
/// recovered by the guest's TCP, unbounded memory for a slow backup is not recoverable.
pub struct EpochNetGate {
    core: Arc<Mutex<EpochCore<NetSink>>>,
    peers: GroupPeers,
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
        let peers = GroupPeers::default();
        (Self { core, peers }, control)
    }

    /// Frames addressed to a MAC in `peers` are not held (see [`GroupPeers`]).
    pub fn with_group_peers(mut self, peers: GroupPeers) -> Self {
        self.peers = peers;
        self
    }
}

impl NetOutputGate for EpochNetGate {
    fn transmit(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut core = lock(&self.core);
        let accepted = if self.peers.addressed_to_member(frame) {
            core.pass((), frame)?
        } else {
            core.accept((), frame)?
        };
        match accepted {
            Accepted::Passed | Accepted::Held => Ok(()),
            // Reported as sent: the device's job is done, the frame is lost on the way, which
            // the guest's protocols handle. The drop is counted in the gate's stats.
            Accepted::OverLimit => Ok(()),
        }
    }
}
