//! What fault tolerance adds to the migration stream (`vmm::migration::protocol` frames):
//! Control messages (JSON) and DiskWrites (binary). One connection carries, primary -> backup:
//!
//! ```text
//! Hello(config) Control(Params)                     once
//! (then, on each of `Params.lanes` more connections: Control(JoinLane) and MemoryPages only)
//! [MemoryPages* MemoryDone]* [DiskWrites*] [OutputFrames*] State Control(EpochEnd{E})
//!                                                    per epoch (E = 0: the initial sync)
//! Control(Heartbeat)                                 when no epoch was sent for a while
//! Control(StandDown)                                 protection ends on purpose
//! ```
//!
//! Replicated disks are copied inside the initial sync (epoch 0), per disk (see `disk_sync`):
//! `Control(DiskSyncStart)`, then DiskWrites and `Control(DiskZero)` (applied in stream
//! order), then `Control(DiskSyncDone)` while the primary is paused, before the State.
//!
//! With data streams (`enable-ft --streams N`, N > 1) the page frames of each protected
//! epoch travel on the N - 1 other connections, and each MemoryDone counts how many every
//! data stream carried in the pass (see `vmm::migration::protocol`). A data stream proves it
//! belongs to this session with the pair and the random token of its Params (sent on the
//! first, authenticated connection); anything else is turned away.
//!
//! and backup -> primary: `Control(Ack{E})` once E is held completely, `Control(Heartbeat)`
//! in answer to each heartbeat, `Error` before it closes on a bad stream.
//!
//! Input mirroring (TCP at full speed): frames the primary's NICs delivered to the guest go,
//! as soon as they arrive, in `InputFrames` frames between the others (those of epoch E
//! always before E's EpochEnd); the backup answers `Control(InputAck{seq})` once it holds
//! every frame up to `seq`, and the primary lets the guest's pure TCP ACKs covered by it
//! leave before their epoch commits. At failover the backup delivers the frames of epochs
//! after the one it resumes again.
//!
//! Held output: the frames the primary's NICs produced in epoch E and still held when E
//! ended go in `OutputFrames` frames before E's State. The backup keeps those of the epochs
//! after the primary's `released_through`; at failover from epoch C it sends the ones of
//! epochs up to C on its own NICs before the restored guest goes on. The primary may have
//! died before releasing them, and the restored guest counts them as sent: without this, a
//! reply lost that way waits for the guest's retransmission timeout (a second for some
//! stacks). A frame sent twice is what networks do anyway.
//!
//! OutputFrames payloads have the InputFrames layout: `seq` numbers the epoch's frames from 1,
//! `epoch` is E.
//!
//! InputFrames payload, little-endian: `count u32, count x (seq u64, epoch u64, nic u32,
//! len u32, len bytes)`; seqs strictly increase. An input frame's bytes are what the guest's
//! buffer received: the 12-byte virtio-net header (checksum and segmentation state of an
//! offloaded frame), then the Ethernet frame; an output frame's are the Ethernet frame alone.
//!
//! DiskWrites payload, little-endian: `disk u32, count u32, count x (offset u64, len u32),
//! then the data of the writes back to back`. Every length is checked against the payload
//! before anything is used.

use std::ops::Range;

use devices::gate::{FramePool, LoggedFrame};
use serde::{Deserialize, Serialize};
use vmm::control::FtDiskMode;

/// Largest disk-write payload one frame carries (a frame's limit is 64 MiB).
pub const MAX_DISK_FRAME: usize = 16 << 20;
/// Largest input-frame payload one frame carries.
pub const MAX_INPUT_FRAME: usize = 1 << 20;
/// Largest Ethernet frame a NIC delivers (the virtio-net device's packet limit).
pub const MAX_INPUT_LEN: usize = 65562;
const INPUT_HEADER: usize = 4;
const INPUT_ENTRY: usize = 24;
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
        /// Data streams that follow this connection (0: every frame travels here).
        #[serde(default, skip_serializing_if = "is_zero")]
        lanes: u32,
        /// What each data stream's JoinLane must repeat.
        #[serde(default, skip_serializing_if = "is_zero")]
        lane_token: u64,
    },
    /// The first frame on a data stream: which session (`pair_id`, `token` of its Params)
    /// and which of its data streams (1 ..= lanes) this connection is.
    JoinLane {
        pair_id: u64,
        token: u64,
        lane: u32,
    },
    /// Closes epoch `epoch`. `released_through`: the newest epoch whose held disk writes the
    /// primary has written to the shared image (the backup may forget them).
    EpochEnd {
        epoch: u64,
        released_through: u64,
        /// The group epoch this epoch ends, for a member of an FT group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_epoch: Option<u64>,
        /// When the epoch was captured and when this message left, on the primary's clock:
        /// the backup moves the guest clock forward by the time since the capture at
        /// failover.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clock: Option<EpochClock>,
    },
    /// The backup holds every input frame up to `seq`.
    InputAck {
        seq: u64,
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

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Times of one epoch on the primary's session clock (nanoseconds since protection began).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochClock {
    pub captured_ns: u64,
    pub sent_ns: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad Control message: {0}")]
    Control(String),
    #[error("bad DiskWrites frame: {0}")]
    DiskWrites(String),
    #[error("bad InputFrames frame: {0}")]
    InputFrames(String),
    #[error("bad OutputFrames frame: {0}")]
    OutputFrames(String),
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
    batches(writes, DISK_HEADER, MAX_DISK_FRAME, |w| {
        DISK_ENTRY + w.data.len()
    })
    .into_iter()
    .map(|(batch, size)| {
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
        p
    })
    .collect()
}

/// Cuts `items` into consecutive batches whose encoded size (`header` plus `size_of` each)
/// stays within `max`; an item larger than that gets a batch of its own. Each batch comes
/// with its encoded size.
fn batches<T>(
    items: &[T],
    header: usize,
    max: usize,
    size_of: impl Fn(&T) -> usize,
) -> Vec<(&[T], usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let mut end = start;
        let mut size = header;
        while end < items.len() {
            let add = size_of(&items[end]);
            if end > start && size + add > max {
                break;
            }
            size += add;
            end += 1;
        }
        out.push((&items[start..end], size));
        start = end;
    }
    out
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

/// Encodes input frames into payloads of at most [`MAX_INPUT_FRAME`] bytes (a frame larger
/// than that gets a payload of its own). OutputFrames payloads are encoded the same way.
pub fn encode_input_frames(frames: &[LoggedFrame]) -> Vec<Vec<u8>> {
    input_batches(frames)
        .into_iter()
        .map(|(batch, size)| {
            let mut p = Vec::with_capacity(size);
            encode_input_batch(&mut p, batch);
            p
        })
        .collect()
}

/// The batches [`encode_input_frames`] makes of `frames`, each with its payload size, for a
/// caller that encodes each with [`encode_input_batch`] where it wants the bytes.
pub fn input_batches(frames: &[LoggedFrame]) -> Vec<(&[LoggedFrame], usize)> {
    batches(frames, INPUT_HEADER, MAX_INPUT_FRAME, |f| {
        INPUT_ENTRY + f.data.len()
    })
}

/// Appends the InputFrames payload of `batch` to `out`.
pub fn encode_input_batch(out: &mut Vec<u8>, batch: &[LoggedFrame]) {
    out.extend_from_slice(&(batch.len() as u32).to_le_bytes());
    for f in batch {
        append_entry_header(out, f);
        out.extend_from_slice(&f.data);
    }
}

fn append_entry_header(out: &mut Vec<u8>, f: &LoggedFrame) {
    out.extend_from_slice(&f.seq.to_le_bytes());
    out.extend_from_slice(&f.epoch.to_le_bytes());
    out.extend_from_slice(&f.nic.to_le_bytes());
    out.extend_from_slice(&(f.data.len() as u32).to_le_bytes());
}

/// Frames up to this size are copied next to their entry header: a piece of its own costs
/// more than copying a small frame (a pure ACK is 66 bytes).
const INLINE_FRAME_MAX: usize = 256;

/// The InputFrames payload of `batch` in pieces, for a frame written without assembling it:
/// the count and the entry headers (with the data of small frames) in `scratch`, larger
/// frames' data where it lies. Joined, the pieces are [`encode_input_batch`]'s payload.
pub fn input_batch_parts<'a>(batch: &'a [LoggedFrame], scratch: &'a mut Vec<u8>) -> Vec<&'a [u8]> {
    enum Piece {
        Scratch(Range<usize>),
        Data(usize),
    }
    scratch.clear();
    scratch.extend_from_slice(&(batch.len() as u32).to_le_bytes());
    let mut pieces = Vec::new();
    let mut start = 0;
    for (i, f) in batch.iter().enumerate() {
        append_entry_header(scratch, f);
        if f.data.len() <= INLINE_FRAME_MAX {
            scratch.extend_from_slice(&f.data);
        } else {
            pieces.push(Piece::Scratch(start..scratch.len()));
            pieces.push(Piece::Data(i));
            start = scratch.len();
        }
    }
    pieces.push(Piece::Scratch(start..scratch.len()));
    let scratch: &'a [u8] = scratch;
    pieces
        .into_iter()
        .map(|piece| match piece {
            Piece::Scratch(range) => &scratch[range],
            Piece::Data(i) => &batch[i].data[..],
        })
        .collect()
}

/// Decodes one InputFrames payload. Seqs must strictly increase; lengths are checked before
/// anything is copied.
/// The frames' buffers come from `pool` (the backup's input store gives them back).
pub fn decode_input_frames(p: &[u8], pool: &mut FramePool) -> Result<Vec<LoggedFrame>, WireError> {
    decode_logged_frames(p, WireError::InputFrames, &mut |data| pool.copy_of(data))
}

/// Decodes one OutputFrames payload (InputFrames' layout and checks).
pub fn decode_output_frames(p: &[u8]) -> Result<Vec<LoggedFrame>, WireError> {
    decode_logged_frames(p, WireError::OutputFrames, &mut |data| data.to_vec())
}

fn decode_logged_frames(
    p: &[u8],
    bad: fn(String) -> WireError,
    copy: &mut dyn FnMut(&[u8]) -> Vec<u8>,
) -> Result<Vec<LoggedFrame>, WireError> {
    let word = |at: usize, n: usize| -> Result<u64, WireError> {
        let bytes = p
            .get(at..at + n)
            .ok_or_else(|| bad(format!("cut short at byte {at} of {}", p.len())))?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(v))
    };
    let count = word(0, 4)? as usize;
    if count == 0 {
        return Err(bad("no frames".into()));
    }
    // Each entry takes at least its header: a count that cannot fit is refused before any
    // allocation.
    if count > (p.len() - INPUT_HEADER) / INPUT_ENTRY {
        return Err(bad(format!(
            "{count} entries do not fit in {} bytes",
            p.len()
        )));
    }
    let mut frames = Vec::with_capacity(count);
    let mut at = INPUT_HEADER;
    let mut last_seq = 0;
    for i in 0..count {
        let seq = word(at, 8)?;
        let epoch = word(at + 8, 8)?;
        let nic = word(at + 16, 4)? as u32;
        let len = word(at + 20, 4)? as usize;
        at += INPUT_ENTRY;
        if seq <= last_seq {
            return Err(bad(format!("entry {i}: seq {seq} after {last_seq}")));
        }
        if len == 0 || len > MAX_INPUT_LEN {
            return Err(bad(format!(
                "entry {i}: a {len}-byte frame (1..={MAX_INPUT_LEN})"
            )));
        }
        let data = p
            .get(at..at + len)
            .ok_or_else(|| bad(format!("entry {i} ({len} bytes) runs past the frame")))?;
        frames.push(LoggedFrame {
            seq,
            nic,
            epoch,
            data: copy(data),
            placed: Vec::new(),
        });
        last_seq = seq;
        at += len;
    }
    if at != p.len() {
        return Err(bad(format!("{} trailing bytes", p.len() - at)));
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::gate::RecordedWrite;
    use proptest::prelude::*;

    /// A batch in pieces is the batch's payload: small frames ride with their headers,
    /// larger ones are pieces of their own.
    #[test]
    fn an_input_batch_in_pieces_joins_to_its_payload() {
        let frame = |seq: u64, len: usize| LoggedFrame {
            seq,
            nic: 1,
            epoch: 9,
            data: (0..len).map(|i| (i as u64 + seq) as u8).collect(),
            placed: Vec::new(),
        };
        let batch = [
            frame(1, 66),
            frame(2, 1514),
            frame(3, 0),
            frame(4, INLINE_FRAME_MAX),
            frame(5, INLINE_FRAME_MAX + 1),
            frame(6, 90),
        ];
        let mut whole = Vec::new();
        encode_input_batch(&mut whole, &batch);
        let mut scratch = vec![0xee; 7];
        let parts = input_batch_parts(&batch, &mut scratch);
        assert_eq!(parts.concat(), whole);
        // Header + frames 1 and 2's header; frame 2; frames 3 to 5's headers; frame 5;
        // frame 6 with its header.
        assert_eq!(parts.len(), 5);
        assert_eq!(
            parts[1].as_ptr(),
            batch[1].data.as_ptr(),
            "a large frame is copied"
        );
        let parts = input_batch_parts(&[], &mut scratch);
        assert_eq!(parts.concat(), 0u32.to_le_bytes());
    }

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
                clock: None,
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
                group_epoch: None,
                clock: None,
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

    fn input(seq: u64, len: usize) -> LoggedFrame {
        LoggedFrame {
            seq,
            nic: (seq % 3) as u32,
            epoch: seq / 4,
            data: vec![seq as u8; len],
            placed: Vec::new(),
        }
    }

    #[test]
    fn input_frames_round_trip_split_and_refuse_malformed_payloads() {
        let frames: Vec<LoggedFrame> = (1..=40).map(|s| input(s, 60_000)).collect();
        let payloads = encode_input_frames(&frames);
        assert!(payloads.len() >= 2, "2.4 MB must be split");
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() <= MAX_INPUT_FRAME);
            back.extend(decode_input_frames(p, &mut FramePool::new(0)).unwrap());
        }
        assert_eq!(back, frames);

        let one = &encode_input_frames(&[input(7, 100), input(9, 64)])[0];
        for cut in 0..one.len() {
            assert!(
                decode_input_frames(&one[..cut], &mut FramePool::new(0)).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = one.clone();
        longer.push(0);
        assert!(decode_input_frames(&longer, &mut FramePool::new(0)).is_err());
        // Seqs out of order, a zero-length or oversized frame, a count that cannot fit.
        let backwards = &encode_input_frames(&[input(9, 10), input(7, 10)])[0];
        assert!(decode_input_frames(backwards, &mut FramePool::new(0)).is_err());
        let empty = &encode_input_frames(&[input(1, 0)])[0];
        assert!(decode_input_frames(empty, &mut FramePool::new(0)).is_err());
        let huge = &encode_input_frames(&[input(1, MAX_INPUT_LEN + 1)])[0];
        assert!(decode_input_frames(huge, &mut FramePool::new(0)).is_err());
        let mut lying = one.clone();
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_input_frames(&lying, &mut FramePool::new(0)).is_err());
        assert!(decode_input_frames(&0u32.to_le_bytes(), &mut FramePool::new(0)).is_err());
    }

    #[test]
    fn epoch_end_carries_the_primary_s_clock_and_input_acks_round_trip() {
        let c = Control::EpochEnd {
            epoch: 3,
            released_through: 2,
            group_epoch: None,
            clock: Some(EpochClock {
                captured_ns: 10,
                sent_ns: 20,
            }),
        };
        assert_eq!(Control::decode(&c.encode()).unwrap(), c);
        let ack = Control::InputAck { seq: 99 };
        assert_eq!(Control::decode(&ack.encode()).unwrap(), ack);
        assert!(Control::decode(br#"{"input_ack":{"seq":-1}}"#).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_disk_writes(&bytes);
            let _ = decode_input_frames(&bytes, &mut FramePool::new(0));
            let _ = decode_output_frames(&bytes);
            let _ = Control::decode(&bytes);
        }
    }
}
