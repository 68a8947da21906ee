//! The write-recording disk gate: fault tolerance ships each epoch's disk writes to the backup
//! (replicated mode: the backup applies them to its own image at commit; shared mode: it keeps
//! them to re-issue at failover). The gate passes every write on to its inner gate and, while
//! recording, keeps a copy tagged by arrival order; the epoch loop takes the copies at each
//! epoch boundary, when the device loop is stopped.

use std::sync::{Arc, Mutex, MutexGuard};

use super::DiskOutputGate;

/// One recorded write: where it went and what it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

#[derive(Default)]
struct Log {
    recording: bool,
    writes: Vec<RecordedWrite>,
    bytes: u64,
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
}
