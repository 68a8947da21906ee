//! What fault tolerance adds to the migration stream (`vmm::migration::protocol` frames):
//! Control messages (JSON) and DiskWrites (binary). One connection carries, primary -> backup:
//!
//! ```text
//! Hello(config) Control(Params)                     once
//! [MemoryPages* MemoryDone]* [DiskWrites*] State Control(EpochEnd{E})   per epoch (E = 0: the initial sync)
//! Control(Heartbeat)                                 when no epoch was sent for a while
//! Control(StandDown)                                 protection ends on purpose
//! ```
//!
//! Replicated disks are copied inside the initial sync (epoch 0), per disk (see `disk_sync`):
//! `Control(DiskSyncStart)`, then DiskWrites and `Control(DiskZero)` (applied in stream
//! order), then `Control(DiskSyncDone)` while the primary is paused, before the State.
//!
//! and backup -> primary: `Control(Ack{E})` once E is held completely, `Control(Heartbeat)`
//! in answer to each heartbeat, `Error` before it closes on a bad stream.
//!
//! DiskWrites payload, little-endian: `disk u32, count u32, count x (offset u64, len u32),
//! then the data of the writes back to back`. Every length is checked against the payload
//! before anything is used.

use serde::{Deserialize, Serialize};
use vmm::control::FtDiskMode;

/// Largest disk-write payload one frame carries (a frame's limit is 64 MiB).
pub const MAX_DISK_FRAME: usize = 16 << 20;
const DISK_HEADER: usize = 8;
const DISK_ENTRY: usize = 12;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// The protection parameters, right after Hello.
    Params {
        pair_id: u64,
        epoch_ms: u64,
        heartbeat_timeout_ms: u64,
        disk_mode: FtDiskMode,
        witness: Option<String>,
        /// Fencing other than a witness (`"etcd"`): the backup must fence the same way.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fencing: Option<String>,
        /// Replicated mode: the size of each of the primary's images, so that the backup
        /// sizes its own before it builds the standby VM's disks.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        disk_sizes: Vec<u64>,
    },
    /// Closes epoch `epoch`. `released_through`: the newest epoch whose held disk writes the
    /// primary has written to the shared image (the backup may forget them).
    EpochEnd {
        epoch: u64,
        released_through: u64,
        /// The group epoch this epoch ends, for a member of an FT group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_epoch: Option<u64>,
    },
    /// The backup holds `epoch` completely.
    Ack {
        epoch: u64,
    },
    Heartbeat {
        epoch: u64,
    },
    /// Protection ends on purpose: the backup drops its copy (and with `guest_shutdown`, its
    /// VMM ends as the primary's does; with `reprotect`, it waits for the primary again).
    StandDown {
        guest_shutdown: bool,
        reason: String,
        #[serde(default)]
        reprotect: bool,
    },
    /// The backup's answer to StandDown: it dropped its copy and will not take over, so the
    /// primary's held output may leave without asking the fencing.
    StoodDown,
    /// Replicated disks: the copy of image `disk` (`size` bytes) begins; the backup resizes
    /// its image to match. `chunk_size`: the granularity of the image digest.
    DiskSyncStart {
        disk: u32,
        size: u64,
        chunk_size: u64,
    },
    /// Bytes `offset .. offset + len` of image `disk` are zero (a hole or all-zero data).
    DiskZero {
        disk: u32,
        offset: u64,
        len: u64,
    },
    /// The copy of image `disk` is complete; `digest` (hex) is the primary's digest of it.
    DiskSyncDone {
        disk: u32,
        digest: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad Control message: {0}")]
    Control(String),
    #[error("bad DiskWrites frame: {0}")]
    DiskWrites(String),
}

impl Control {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these plain enums cannot fail; an empty payload would be rejected by
        // the peer's decoder anyway.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        serde_json::from_slice(payload).map_err(|e| WireError::Control(e.to_string()))
    }
}

/// One write of a disk, as shipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Encodes `writes` of disk `disk` into frames of at most [`MAX_DISK_FRAME`] bytes (a write
/// larger than that gets a frame of its own).
pub fn encode_disk_writes(disk: u32, writes: &[devices::gate::RecordedWrite]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut start = 0;
    while start < writes.len() {
        let mut end = start;
        let mut size = DISK_HEADER;
        while end < writes.len() {
            let add = DISK_ENTRY + writes[end].data.len();
            if end > start && size + add > MAX_DISK_FRAME {
                break;
            }
            size += add;
            end += 1;
        }
        let batch = &writes[start..end];
        let mut p = Vec::with_capacity(size);
        p.extend_from_slice(&disk.to_le_bytes());
        p.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        for w in batch {
            p.extend_from_slice(&w.offset.to_le_bytes());
            p.extend_from_slice(&(w.data.len() as u32).to_le_bytes());
        }
        for w in batch {
            p.extend_from_slice(&w.data);
        }
        frames.push(p);
        start = end;
    }
    frames
}

/// Decodes one DiskWrites payload: the disk index and its writes.
pub fn decode_disk_writes(p: &[u8]) -> Result<(u32, Vec<DiskWrite>), WireError> {
    let bad = |m: String| WireError::DiskWrites(m);
    if p.len() < DISK_HEADER {
        return Err(bad(format!("{} bytes, the header needs 8", p.len())));
    }
    let disk = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    let count = u32::from_le_bytes([p[4], p[5], p[6], p[7]]) as usize;
    let table_end = count
        .checked_mul(DISK_ENTRY)
        .and_then(|n| n.checked_add(DISK_HEADER))
        .filter(|&n| n <= p.len())
        .ok_or_else(|| bad(format!("{count} entries do not fit in {} bytes", p.len())))?;
    let mut writes = Vec::with_capacity(count);
    let mut at = table_end;
    for i in 0..count {
        let e = &p[DISK_HEADER + i * DISK_ENTRY..DISK_HEADER + (i + 1) * DISK_ENTRY];
        let mut o = [0u8; 8];
        o.copy_from_slice(&e[..8]);
        let offset = u64::from_le_bytes(o);
        let len = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as usize;
        let end = at
            .checked_add(len)
            .filter(|&end| end <= p.len())
            .ok_or_else(|| bad(format!("write {i} ({len} bytes) runs past the frame")))?;
        if offset.checked_add(len as u64).is_none() {
            return Err(bad(format!("write {i} ends beyond 2^64")));
        }
        writes.push(DiskWrite {
            offset,
            data: p[at..end].to_vec(),
        });
        at = end;
    }
    if at != p.len() {
        return Err(bad(format!("{} trailing bytes", p.len() - at)));
    }
    Ok((disk, writes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::gate::RecordedWrite;
    use proptest::prelude::*;

    #[test]
    fn disk_writes_round_trip_and_split() {
        let writes: Vec<RecordedWrite> = (0..5)
            .map(|i| RecordedWrite {
                offset: i * 4096,
                data: vec![i as u8; 6 << 20],
            })
            .collect();
        let frames = encode_disk_writes(3, &writes);
        assert!(frames.len() >= 2, "30 MiB must be split");
        let mut back = Vec::new();
        for f in &frames {
            assert!(f.len() <= MAX_DISK_FRAME);
            let (disk, w) = decode_disk_writes(f).unwrap();
            assert_eq!(disk, 3);
            back.extend(w);
        }
        assert_eq!(back.len(), 5);
        for (a, b) in back.iter().zip(&writes) {
            assert_eq!((a.offset, &a.data), (b.offset, &b.data));
        }
    }

    #[test]
    fn control_round_trips_and_rejects_unknown_fields() {
        for group_epoch in [None, Some(3)] {
            let c = Control::EpochEnd {
                epoch: 7,
                released_through: 5,
                group_epoch,
            };
            assert_eq!(Control::decode(&c.encode()).unwrap(), c);
        }
        // A peer that predates re-protection leaves `reprotect` out.
        assert_eq!(
            Control::decode(br#"{"stand_down":{"guest_shutdown":false,"reason":"r"}}"#).unwrap(),
            Control::StandDown {
                guest_shutdown: false,
                reason: "r".into(),
                reprotect: false
            }
        );
        assert!(Control::decode(
            br#"{"epoch_end":{"epoch":2,"released_through":1,"group_epoch":-1}}"#
        )
        .is_err());
        // A peer that predates groups leaves the field out.
        assert_eq!(
            Control::decode(br#"{"epoch_end":{"epoch":2,"released_through":1}}"#).unwrap(),
            Control::EpochEnd {
                epoch: 2,
                released_through: 1,
                group_epoch: None
            }
        );
        assert!(Control::decode(br#"{"ack":{"epoch":1,"x":2}}"#).is_err());
        for c in [
            Control::DiskSyncStart {
                disk: 1,
                size: 1 << 40,
                chunk_size: 1 << 20,
            },
            Control::DiskZero {
                disk: 0,
                offset: 4096,
                len: u64::MAX - 4096,
            },
            Control::DiskSyncDone {
                disk: 2,
                digest: "00ff".into(),
            },
        ] {
            assert_eq!(Control::decode(&c.encode()).unwrap(), c);
        }
        assert!(Control::decode(br#"{"disk_zero":{"disk":0,"offset":0,"len":1,"x":0}}"#).is_err());
        assert!(Control::decode(b"").is_err());
    }

    #[test]
    fn truncated_disk_frames_are_rejected() {
        let frames = encode_disk_writes(
            0,
            &[RecordedWrite {
                offset: 512,
                data: vec![1; 100],
            }],
        );
        let f = &frames[0];
        for cut in 0..f.len() {
            assert!(decode_disk_writes(&f[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = f.clone();
        longer.push(0);
        assert!(decode_disk_writes(&longer).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_disk_writes(&bytes);
            let _ = Control::decode(&bytes);
        }
    }
}
