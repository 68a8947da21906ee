//! The epoch-holding disk gate (shared-disk mode: one image, writes held until commit).

use std::io;
use std::sync::{Arc, Mutex};

use super::epoch::{lock, Accepted, EpochControl, EpochCore, HoldLimits, Sink};
use super::DiskOutputGate;

/// A held disk operation.
#[derive(Clone, Copy, Debug)]
enum DiskOp {
    /// Write the item's payload at this byte offset.
    Write(u64),
    /// A guest FLUSH: the inner flush must run after every write held before it.
    Flush,
}

struct DiskSink(Box<dyn DiskOutputGate>);

impl Sink for DiskSink {
    type Meta = DiskOp;
    // A write that fails must not be overtaken by later ones (they could overwrite or depend on
    // it); it stays held and the next commit retries it.
    const STOP_ON_ERROR: bool = true;

    fn release(&mut self, meta: &DiskOp, data: &[u8]) -> io::Result<()> {
        match meta {
            DiskOp::Write(offset) => self.0.write_at(*offset, data),
            DiskOp::Flush => self.0.flush(),
        }
    }

    fn is_barrier(meta: &DiskOp) -> bool {
        matches!(meta, DiskOp::Flush)
    }
}

/// A disk output gate that holds each epoch's writes (and flush barriers) until the epoch is
/// committed (see [`EpochControl`]), then applies them through the wrapped gate in order.
///
/// Held writes must show through reads: the block device reads through
/// [`DiskOutputGate::read_through`], which patches what was read from the image with held data.
///
/// Over the hold limits a write is refused with an error (the guest sees an I/O error): unlike a
/// packet, a silently dropped write is corruption, and waiting for a commit inside the device
/// loop would stop the loop from reaching the epoch boundary that produces the commit.
///
/// A held FLUSH completes for the guest before the data reaches the image. That is sound for
/// shared-disk fault tolerance because the backup holds the epoch and re-issues its writes at
/// failover; without a backup ([`crate::gate::GateMode::PassThrough`]) flushes go straight through.
pub struct EpochDiskGate {
    core: Arc<Mutex<EpochCore<DiskSink>>>,
}

impl EpochDiskGate {
    /// Wraps `inner`, holding writes from `first_epoch` on with the default limits.
    pub fn new(inner: Box<dyn DiskOutputGate>, first_epoch: u64) -> (Self, EpochControl) {
        Self::with_limits(inner, first_epoch, HoldLimits::default())
    }

    /// Like [`EpochDiskGate::new`] with explicit hold limits.
    pub fn with_limits(
        inner: Box<dyn DiskOutputGate>,
        first_epoch: u64,
        limits: HoldLimits,
    ) -> (Self, EpochControl) {
        let core = Arc::new(Mutex::new(EpochCore::new(
            DiskSink(inner),
            first_epoch,
            limits,
        )));
        let control = EpochControl::new(core.clone());
        (Self { core }, control)
    }

    /// Patches `buf`, the image's bytes at `offset`, with held writes covering that range
    /// (newest write wins).
    ///
    /// Only correct if no commit ran between reading `buf` from the image and this call: a
    /// commit in between moves held data to the image after `buf` was read and out of the
    /// overlay, so neither would have it. [`DiskOutputGate::read_through`] does the image read
    /// and the patching under one lock and has no such window.
    pub fn overlay_read(&self, offset: u64, buf: &mut [u8]) {
        overlay(&lock(&self.core), offset, buf);
    }
}

/// Applies held writes, oldest first so that newer ones overwrite older ones. Linear in the
/// number of held writes: epochs are short, so that stays small, and it needs no extra index
/// maintained on every write.
fn overlay(core: &EpochCore<DiskSink>, offset: u64, buf: &mut [u8]) {
    let end = offset.saturating_add(buf.len() as u64);
    for queue in &core.queues {
        for item in queue.pending() {
            let DiskOp::Write(at) = item.meta else {
                continue;
            };
            let item_end = at.saturating_add(item.len as u64);
            let from = at.max(offset);
            let to = item_end.min(end);
            if from >= to {
                continue;
            }
            // Offsets within the overlap fit in usize: they are bounded by the two lengths.
            let src = item.start + (from - at) as usize;
            let n = (to - from) as usize;
            let dst = (from - offset) as usize;
            buf[dst..dst + n].copy_from_slice(&queue.arena[src..src + n]);
        }
    }
}

impl DiskOutputGate for EpochDiskGate {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        match lock(&self.core).accept(DiskOp::Write(offset), data)? {
            Accepted::Passed | Accepted::Held => Ok(()),
            Accepted::OverLimit => Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "too much disk output held for an unacknowledged epoch",
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match lock(&self.core).accept(DiskOp::Flush, &[])? {
            Accepted::Passed | Accepted::Held => Ok(()),
            Accepted::OverLimit => Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "too much disk output held for an unacknowledged epoch",
            )),
        }
    }

    fn read_through(
        &self,
        offset: u64,
        buf: &mut [u8],
        read_image: &mut dyn FnMut(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        // One lock for both steps: no commit can move data from the overlay to the image
        // between the image read and the patching.
        let core = lock(&self.core);
        read_image(buf)?;
        overlay(&core, offset, buf);
        Ok(())
    }
}
