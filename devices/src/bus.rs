//! An address-range dispatcher for port I/O (and later MMIO) accesses that exit to the VMM.

use std::sync::{Arc, Mutex};

/// A device reached through guest port I/O or MMIO accesses.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IoBusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
}

struct BusEntry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices sorted by base address. Few devices live on a bus, so a sorted vector beats a tree.
#[derive(Default)]
pub struct IoBus {
    entries: Vec<BusEntry>,
}

impl IoBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), IoBusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(IoBusError::InvalidRange { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(IoBusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, BusEntry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&BusEntry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(idx.checked_sub(1)?)?;
        let offset = addr - entry.base;
        (offset < entry.len).then_some((entry, offset))
    }

    /// Returns false when no device claims `addr`; the guest then reads all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((entry, offset)) => {
                // A poisoned lock means another vCPU panicked inside the device; with
                // panic=abort that cannot happen, so recovering the guard is safe.
                let mut dev = entry.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Returns false when no device claims `addr`; the write is dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((entry, offset)) => {
                let mut dev = entry.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = IoBus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).expect("insert a");
        bus.insert(b.clone(), 0x60, 5).expect("insert b");
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x3fc, 8),
            Err(IoBusError::Overlap {
                base: 0x3fc,
                len: 8
            })
        );
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 0),
            Err(IoBusError::InvalidRange { base: 0x10, len: 0 })
        );
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fb, &mut buf));
        assert_eq!(buf[0], 3);
        assert!(!bus.read(0x400, &mut buf));
        assert_eq!(buf[0], 0xff);
        assert!(bus.write(0x64, &[0xfe]));
        assert!(!bus.write(0x65, &[0]));
        assert_eq!(b.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert!(a.lock().unwrap().writes.is_empty());
    }
}
