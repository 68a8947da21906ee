//! The write-recording disk gate: fault tolerance ships each epoch's disk writes to the backup
//! (replicated mode: the backup applies them to its own image at commit; shared mode: it keeps
//! them to re-issue at failover). The gate passes every write on to its inner gate and, while
//! recording, keeps a copy tagged by arrival order; the epoch loop takes the copies at each
//! epoch boundary, when the device loop is stopped.
//!
//! It can also track which blocks writes touch, recording or not: replicated-disk fault
//! tolerance copies the whole image to the backup while the guest runs, then re-sends the
//! blocks written meanwhile, so tracking must start before that copy does.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use super::DiskOutputGate;

/// One recorded write: where it went and what it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Blocks written since the last [`DiskWriteLog::take_dirty_blocks`].
struct Tracking {
    block_size: u64,
    dirty: BTreeSet<u64>,
}

impl Tracking {
    fn mark(&mut self, offset: u64, len: usize) {
        if len == 0 {
            return;
        }
        let last_byte = offset.saturating_add(len as u64 - 1);
        let (first, last) = (offset / self.block_size, last_byte / self.block_size);
        self.dirty.extend(first..=last);
    }
}

#[derive(Default)]
struct Log {
    recording: bool,
    writes: Vec<RecordedWrite>,
    bytes: u64,
    tracking: Option<Tracking>,
}

/// The epoch loop's handle on a [`RecordingDiskGate`] (cloneable).
#[derive(Clone, Default)]
pub struct DiskWriteLog {
    log: Arc<Mutex<Log>>,
}

impl std::fmt::Debug for DiskWriteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let log = self.lock();
        f.debug_struct("DiskWriteLog")
            .field("recording", &log.recording)
            .field("writes", &log.writes.len())
            .field(
                "dirty_blocks",
                &log.tracking.as_ref().map(|t| t.dirty.len()),
            )
            .finish()
    }
}

impl DiskWriteLog {
    /// The device loop and the epoch loop share the log; neither panics while holding it
    /// (and the build aborts on panic), so a poisoned lock still holds consistent data.
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts or stops keeping copies; stopping drops what was kept.
    pub fn set_recording(&self, recording: bool) {
        let mut log = self.lock();
        log.recording = recording;
        if !recording {
            log.writes = Vec::new();
            log.bytes = 0;
        }
    }

    /// The writes recorded since the last call, in the order they reached the disk gate.
    pub fn take(&self) -> Vec<RecordedWrite> {
        let mut log = self.lock();
        log.bytes = 0;
        std::mem::take(&mut log.writes)
    }

    /// Bytes recorded and not yet taken.
    pub fn pending_bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Starts marking the `block_size`-byte blocks that writes touch (whether or not
    /// recording is on); a write that spans blocks marks each of them. Restarting forgets the
    /// marks so far. A `block_size` of 0 is taken as 1 (byte granularity).
    pub fn start_tracking(&self, block_size: u64) {
        self.lock().tracking = Some(Tracking {
            block_size: block_size.max(1),
            dirty: BTreeSet::new(),
        });
    }

    /// Stops marking blocks and forgets the marks.
    pub fn stop_tracking(&self) {
        self.lock().tracking = None;
    }

    /// The block size blocks are tracked at, while tracking.
    pub fn tracking_block_size(&self) -> Option<u64> {
        self.lock().tracking.as_ref().map(|t| t.block_size)
    }

    /// The indexes (byte offset / block size) of the blocks written since tracking started or
    /// since the last call, ascending, and clears them. Empty when not tracking.
    ///
    /// A block is marked only once its write has reached the inner gate, so a reader that
    /// takes the marks and then reads the image sees every write whose mark it took.
    pub fn take_dirty_blocks(&self) -> Vec<u64> {
        match self.lock().tracking.as_mut() {
            Some(t) => std::mem::take(&mut t.dirty).into_iter().collect(),
            None => Vec::new(),
        }
    }
}

/// A disk gate that records writes for [`DiskWriteLog`] and passes everything to `inner`.
pub struct RecordingDiskGate {
    inner: Box<dyn DiskOutputGate>,
    log: DiskWriteLog,
}

impl RecordingDiskGate {
    pub fn new(inner: Box<dyn DiskOutputGate>) -> (Self, DiskWriteLog) {
        let log = DiskWriteLog::default();
        (
            Self {
                inner,
                log: log.clone(),
            },
            log,
        )
    }
}

impl DiskOutputGate for RecordingDiskGate {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, data)?;
        let mut log = self.log.lock();
        // Marked after the write: see `DiskWriteLog::take_dirty_blocks`.
        if let Some(tracking) = log.tracking.as_mut() {
            tracking.mark(offset, data.len());
        }
        if log.recording {
            log.bytes += data.len() as u64;
            log.writes.push(RecordedWrite {
                offset,
                data: data.to_vec(),
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }

    fn read_through(
        &self,
        offset: u64,
        buf: &mut [u8],
        read_image: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.inner.read_through(offset, buf, read_image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Memory(Vec<u8>);
    impl DiskOutputGate for Memory {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let at = offset as usize;
            self.0[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn records_only_while_recording_and_passes_everything_on() {
        let (mut gate, log) = RecordingDiskGate::new(Box::new(Memory(vec![0; 64])));
        gate.write_at(0, b"ab").unwrap();
        assert!(log.take().is_empty());
        log.set_recording(true);
        gate.write_at(2, b"cd").unwrap();
        gate.write_at(4, b"ef").unwrap();
        assert_eq!(log.pending_bytes(), 4);
        let taken = log.take();
        assert_eq!(
            taken,
            vec![
                RecordedWrite {
                    offset: 2,
                    data: b"cd".to_vec()
                },
                RecordedWrite {
                    offset: 4,
                    data: b"ef".to_vec()
                }
            ]
        );
        assert!(log.take().is_empty());
        gate.write_at(6, b"gh").unwrap();
        log.set_recording(false);
        assert!(log.take().is_empty());
        let mut buf = [0u8; 8];
        gate.read_through(0, &mut buf, &mut |b| {
            b.fill(7);
            Ok(())
        })
        .unwrap();
        assert_eq!(buf, [7; 8]);
    }

    #[test]
    fn tracks_touched_blocks_with_or_without_recording() {
        let (mut gate, log) = RecordingDiskGate::new(Box::new(Memory(vec![0; 64 << 10])));
        assert!(log.take_dirty_blocks().is_empty(), "not tracking yet");
        gate.write_at(0, b"before").unwrap();
        log.start_tracking(4096);
        assert_eq!(log.tracking_block_size(), Some(4096));
        assert!(
            log.take_dirty_blocks().is_empty(),
            "writes before start are not marked"
        );
        gate.write_at(3 * 4096 + 10, b"x").unwrap();
        gate.write_at(4096, &[1; 4096]).unwrap(); // exactly block 1
        gate.write_at(4096 * 6 - 1, b"yz").unwrap(); // last byte of 5, first of 6
        gate.write_at(4096 * 8 + 100, &[2; 3 * 4096]).unwrap(); // blocks 8..=11
        gate.write_at(4096 * 3, b"again").unwrap();
        gate.write_at(4096 * 13, b"").unwrap(); // an empty write touches nothing
        assert!(log.take().is_empty(), "tracking does not record");
        assert_eq!(log.take_dirty_blocks(), vec![1, 3, 5, 6, 8, 9, 10, 11]);
        assert!(log.take_dirty_blocks().is_empty(), "taking clears");

        log.set_recording(true);
        gate.write_at(4096 * 2, b"both").unwrap();
        assert_eq!(log.take_dirty_blocks(), vec![2]);
        assert_eq!(log.take().len(), 1);

        gate.write_at(0, b"z").unwrap();
        log.stop_tracking();
        assert_eq!(log.tracking_block_size(), None);
        assert!(log.take_dirty_blocks().is_empty(), "stopping forgets");
        gate.write_at(0, b"z").unwrap();
        assert!(log.take_dirty_blocks().is_empty());

        log.start_tracking(0);
        assert_eq!(log.tracking_block_size(), Some(1));
        gate.write_at(7, b"abc").unwrap();
        assert_eq!(log.take_dirty_blocks(), vec![7, 8, 9]);
    }

    #[test]
    fn a_failed_write_marks_nothing() {
        struct Failing;
        impl DiskOutputGate for Failing {
            fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
                Err(std::io::Error::other("no"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (mut gate, log) = RecordingDiskGate::new(Box::new(Failing));
        log.start_tracking(512);
        assert!(gate.write_at(0, b"a").is_err());
        assert!(log.take_dirty_blocks().is_empty());
    }

    #[test]
    fn a_write_at_the_end_of_the_address_space_does_not_overflow() {
        let log = DiskWriteLog::default();
        log.start_tracking(4096);
        log.lock().tracking.as_mut().unwrap().mark(u64::MAX - 1, 10);
        assert_eq!(log.take_dirty_blocks(), vec![u64::MAX / 4096]);
    }
}
