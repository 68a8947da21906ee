//! The migration stream: framed, versioned, checksummed messages over any `Read + Write`
//! (a TCP or Unix stream).
//!
//! Every frame, both directions, integers little-endian:
//!
//! ```text
//! offset  size  field
//!      0     4  magic "TMIG" (0x47494d54 read as u32 LE)
//!      4     1  type   1 Hello, 2 MemoryPages, 3 MemoryDone, 4 State, 5 Complete,
//!                      6 Ack, 7 Error, 8 Abort, 9 DiskWrites, 10 Control, 11 InputFrames,
//!                      12 OutputFrames (the last four only in fault-tolerance streams; a
//!                      migration receiver rejects them)
//!      5     1  flags  bit 0 = LZ4 (MemoryPages, State), bit 1 = delta (MemoryPages),
//!                      bit 7 = unchecked (any type but Hello: the trailer is 0 and means
//!                      nothing; only on a stream that authenticates every byte itself, such
//!                      as TLS, and only where the reader was told so); other bits must be 0
//!      6     2  reserved, 0
//!      8     4  payload length (at most MAX_FRAME_PAYLOAD, checked before any allocation)
//!     12     4  sequence number: 0, 1, 2, ... per direction
//!     16     n  payload
//!   16+n     4  CRC-32 (IEEE) of bytes 0 .. 16+n (0 in an unchecked frame)
//! ```
//!
//! The checksum catches what TCP's own misses on a plain stream. Over TLS every record's
//! AEAD tag already rejects any changed byte, so the CRC there is the same check done twice
//! (both ends computing it cost about as much CPU as the AES-GCM itself on FT's input
//! mirroring): a sender told its stream is authenticated leaves it out after Hello.
//!
//! Payloads:
//! - Hello: `version u32, page_size u32, VmConfig JSON`;
//! - MemoryPages: `count u32, reserved u32 (0), count x u64 entries, data`; an entry is the
//!   page's guest physical address with bit 0 set for a zero page (no data sent); data is the
//!   non-zero pages, 4 KiB each in entry order, or with the LZ4 flag one LZ4 block that
//!   decompresses to exactly that; at most MAX_PAGES_PER_FRAME entries;
//! - MemoryPages with the delta flag (the FT primary's encoding; the migration source does
//!   not use it): the reserved word is the length of the data before LZ4 (at most
//!   MAX_FRAME_PAYLOAD), and an entry may have bit 1 set (not with bit 0): the page is sent as
//!   a change to the copy the receiver already holds. The data is, per non-zero entry in
//!   order, either the whole page (4 KiB) or for a delta entry `len u16` (0 ..= 4096) and
//!   `len` bytes of runs `skip, count, count bytes` (skip and count LEB128, at most 2 bytes
//!   each, count >= 1): skip `skip` bytes of the page from where the last run ended (from 0
//!   at first), then overwrite `count` bytes; no run may reach past the page. A delta entry
//!   may also have bit 2 set (fault tolerance: the page holds input frames the receiver
//!   already has): its record starts with `pieces u8` (1 ..= MAX_INPUT_PIECES) and that many
//!   `seq u64, frame_offset u32, page_offset u16, len u16` (len >= 1, within the page), each
//!   saying "bytes `frame_offset..+len` of input frame `seq` go to `page_offset`", laid over
//!   the receiver's copy in order before the delta (`len u16` and runs) is applied to the
//!   result. With the LZ4 flag the whole data is one LZ4 block that decompresses to exactly
//!   the announced length. Every length and offset, and every input frame named, is checked
//!   before anything is written;
//! - MemoryDone: `iteration u32, lanes u32, pages u64, lanes x (frames u32, digest u32)`
//!   closes one pass over memory (pages = entries sent in the pass, checked by the
//!   receiver). `lanes` (at most MAX_LANES; 0 in a migration) is the number of data streams
//!   beside this one (the FT primary's several TCP streams): per stream, how many of the
//!   pass's MemoryPages frames it carried and the CRC-32 of their checksums (each trailer's
//!   4 bytes, in order), which ties those frames to this pass. A data stream carries only
//!   MemoryPages frames, with sequence numbers of its own; the receiver takes each stream's
//!   frames of the pass, in that stream's order, when the MemoryDone naming them arrives;
//! - State: the VM state JSON; Complete, Ack: empty; Error, Abort: a UTF-8 message;
//! - DiskWrites, Control, InputFrames, OutputFrames: opaque here (their layout belongs to the
//!   fault-tolerance crate).
//!
//! Order (sender -> receiver): Hello, then per epoch any number of MemoryPages / MemoryDone,
//! one State, Complete; the receiver answers Complete with Ack (or Error at any point), and
//! the sender may send Abort at any point. Anything else is a [`ProtocolError`].

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::input_pieces::InputPieces;
use super::memory::{is_zero, DirtyPages, DirtyPagesError, PAGE_SIZE};
use super::page_encoder::{
    DataPiece, DeltaView, EncodeJob, EncodePool, EncodedFrame, Lane, PageEncoder,
};
use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;
use crate::progress::TransferProgress;

/// 2: State frames may be LZ4-compressed (a version-1 peer would refuse the flag mid-stream;
/// Hello says it at once).
/// 3: device states are virtio-pci's (see `SNAPSHOT_VERSION` 2).
/// 4: MemoryPages frames may carry page deltas (an older peer would refuse them mid-stream).
/// 5: fault-tolerance streams carry InputFrames and InputAck (input mirroring).
/// 6: MemoryDone may count page frames sent on data streams (FT's several streams).
/// 7: fault-tolerance streams carry each epoch's held output (OutputFrames).
/// 8: InputFrames carry each frame's virtio-net header (receive offloads).
/// 9: frames after Hello may be unchecked on an authenticated stream (`FLAG_UNCHECKED`).
/// 10: the State frame carries the VM state in postcard (binary serde) instead of JSON.
/// 11: delta entries may lay input frames the receiver holds over its copy (bit 2).
pub const PROTOCOL_VERSION: u32 = 11;
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"TMIG");
pub const HEADER_LEN: usize = 16;
pub const TRAILER_LEN: usize = 4;
/// Largest payload accepted; a header announcing more is rejected before reading on.
pub const MAX_FRAME_PAYLOAD: usize = 64 << 20;
/// Largest decompressed VM state accepted.
pub const MAX_STATE_BYTES: usize = 64 << 20;
/// Most page entries one MemoryPages frame may carry (32 MiB of page data).
pub const MAX_PAGES_PER_FRAME: usize = 8192;
/// Most data streams a MemoryDone may name.
pub const MAX_LANES: usize = 8;
pub const FLAG_LZ4: u8 = 1;
/// MemoryPages: entries may be deltas against the receiver's copy of the page.
pub const FLAG_DELTA: u8 = 2;
/// The frame carries no checksum: its stream authenticates every byte (see the module doc).
pub const FLAG_UNCHECKED: u8 = 0x80;
pub(super) const ZERO_PAGE_BIT: u64 = 1;
pub(super) const DELTA_PAGE_BIT: u64 = 2;
/// With `DELTA_PAGE_BIT`: the delta applies to the receiver's copy with input frames laid
/// over it.
pub(super) const INPUT_PAGE_BIT: u64 = 4;
/// Most input-frame pieces one page's record may lay (the sender sends the page otherwise).
pub const MAX_INPUT_PIECES: usize = 32;
pub(super) const INPUT_PIECE_LEN: usize = 16;
/// Longest page delta a frame may carry (the sender sends the page itself before that).
const MAX_DELTA_LEN: usize = PAGE_SIZE;
pub(super) const DELTA_LEN_BYTES: usize = 2;
/// The shortest delta record: its length alone (0: the page did not change).
const MIN_DELTA_RECORD: usize = DELTA_LEN_BYTES;
const PAGE_MASK: u64 = PAGE_SIZE as u64 - 1;
pub(super) const PAGES_HEADER_LEN: usize = 8;
pub(super) const ENTRY_LEN: usize = 8;
/// Error and Abort messages are cut to this length.
const MAX_MESSAGE: usize = 4096;
/// A frame's payload buffer grows from this size as bytes actually arrive.
const FIRST_READ: usize = 64 << 10;
pub(super) static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    MemoryPages = 2,
    MemoryDone = 3,
    State = 4,
    Complete = 5,
    Ack = 6,
    Error = 7,
    Abort = 8,
    DiskWrites = 9,
    Control = 10,
    InputFrames = 11,
    OutputFrames = 12,
}

impl FrameType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::MemoryPages,
            3 => Self::MemoryDone,
            4 => Self::State,
            5 => Self::Complete,
            6 => Self::Ack,
            7 => Self::Error,
            8 => Self::Abort,
            9 => Self::DiskWrites,
            10 => Self::Control,
            11 => Self::InputFrames,
            12 => Self::OutputFrames,
            _ => return None,
        })
    }

    fn allowed_flags(self) -> u8 {
        match self {
            Self::MemoryPages => FLAG_LZ4 | FLAG_DELTA,
            Self::State => FLAG_LZ4,
            _ => 0,
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Hello => "Hello",
            Self::MemoryPages => "MemoryPages",
            Self::MemoryDone => "MemoryDone",
            Self::State => "State",
            Self::Complete => "Complete",
            Self::Ack => "Ack",
            Self::Error => "Error",
            Self::Abort => "Abort",
            Self::DiskWrites => "DiskWrites",
            Self::Control => "Control",
            Self::InputFrames => "InputFrames",
            Self::OutputFrames => "OutputFrames",
        };
        f.write_str(name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("page encoder thread {0} is gone")]
    EncoderGone(usize),
    #[error("data stream {lane}: {reason}")]
    Lane { lane: usize, reason: String },
    #[error("stream truncated in the {what}: expected {expected} bytes, got {got}")]
    Truncated {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("migration stream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame magic {0:#010x} (not a Tandem migration stream)")]
    BadMagic(u32),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{kind} frame: invalid flags {flags:#04x}")]
    BadFlags { kind: FrameType, flags: u8 },
    #[error("frame header: reserved field is {0:#06x}, must be 0")]
    Reserved(u16),
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_PAYLOAD} bytes")]
    TooLarge { len: u64 },
    #[error("frame {seq}: checksum mismatch (expected {expected:08x}, got {actual:08x})")]
    Checksum {
        seq: u32,
        expected: u32,
        actual: u32,
    },
    #[error(
        "frame {seq} ({kind}) carries no checksum, and this stream does not authenticate its \
         bytes (only a TLS stream may leave the checksum out)"
    )]
    Unchecked { kind: FrameType, seq: u32 },
    #[error("frame sequence number {got}, expected {expected} (frames lost or repeated)")]
    Sequence { expected: u32, got: u32 },
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: FrameType, reason: String },
    #[error("unexpected {got} frame {state}")]
    UnexpectedFrame { got: FrameType, state: &'static str },
    #[error(
        "unsupported migration protocol version {0} (this VMM speaks version {PROTOCOL_VERSION})"
    )]
    Version(u32),
    #[error("unsupported page size {0} (this VMM uses {PAGE_SIZE})")]
    PageSize(u32),
    #[error("invalid VM configuration in Hello: {0}")]
    Config(serde_json::Error),
    #[error("invalid VM state: {0}")]
    State(postcard::Error),
    #[error("invalid VM state: {0} bytes after its end")]
    StateTrailing(usize),
    #[error("cannot serialize the VM state: {0}")]
    SerializeState(postcard::Error),
    #[error("cannot serialize the {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("guest page {gpa:#x}: {reason}")]
    GuestMemory { gpa: u64, reason: String },
    #[error("memory pass {iteration}: the sender counted {sent} pages, {received} arrived")]
    PageCount {
        iteration: u32,
        sent: u64,
        received: u64,
    },
    #[error("memory pass {got} announced, expected pass {expected}")]
    Iteration { expected: u32, got: u32 },
    #[error("the receiver reported an error: {0}")]
    Remote(String),
    #[error("the sender aborted the migration: {0}")]
    Aborted(String),
    #[error("{0}")]
    Dirty(#[from] DirtyPagesError),
    #[error("{0} before Hello")]
    NotStarted(&'static str),
    #[error("the stream already failed; a new transfer needs a new connection")]
    Failed,
}

impl ProtocolError {
    fn malformed(kind: FrameType, reason: impl Into<String>) -> Self {
        Self::Malformed {
            kind,
            reason: reason.into(),
        }
    }

    /// Whether telling the peer about this error makes sense (the link still works).
    fn worth_reporting(&self) -> bool {
        !matches!(
            self,
            Self::Closed
                | Self::Io(_)
                | Self::Truncated { .. }
                | Self::Remote(_)
                | Self::Aborted(_)
                | Self::Failed
        )
    }
}

/// Counters of one side of a transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Frames sent (sender) or received (receiver).
    pub frames: u64,
    /// Bytes on the wire, headers and checksums included.
    pub bytes: u64,
    /// Page entries (zero and non-zero).
    pub pages: u64,
    /// Pages sent as "zero page" markers only.
    pub zero_pages: u64,
    /// MemoryPages frames whose data went LZ4-compressed.
    pub compressed_frames: u64,
    /// Page data before compression (non-zero pages x 4 KiB).
    pub page_data_bytes: u64,
    /// Page data on the wire (after compression).
    pub page_wire_bytes: u64,
    /// Completed memory passes (MemoryDone frames).
    pub iterations: u64,
    /// Pages sent (or applied) as deltas against the receiver's copy.
    pub delta_pages: u64,
    /// Pages sent (or applied) as input frames laid over the receiver's copy (with a delta).
    pub input_pages: u64,
}

/// What one `send_memory` call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    pub iteration: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub wire_bytes: u64,
}

/// A received frame, borrowing its payload from the reader's buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    pub kind: FrameType,
    pub flags: u8,
    pub seq: u32,
    pub payload: &'a [u8],
    /// Its checksum (as checked; 0 for a frame that did not come off a stream).
    pub crc: u32,
}

/// What a pass carried on one data stream: its page frames and the CRC-32 of their
/// checksums (see the MemoryDone layout).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LanePass {
    pub frames: u32,
    pub digest: u32,
}

/// Builds a [`LanePass`] frame by frame, on either side.
#[derive(Clone, Default)]
pub struct LaneDigest {
    frames: u32,
    crc: crc32fast::Hasher,
}

impl LaneDigest {
    pub fn add(&mut self, frame_crc: u32) {
        self.frames += 1;
        self.crc.update(&frame_crc.to_le_bytes());
    }

    pub fn finish(&self) -> LanePass {
        LanePass {
            frames: self.frames,
            digest: self.crc.clone().finalize(),
        }
    }
}

/// A decoded frame.
#[derive(Debug)]
pub enum Message<'a> {
    Hello {
        version: u32,
        page_size: u32,
        config_json: &'a [u8],
    },
    MemoryPages(PageBatch<'a>),
    MemoryDone {
        iteration: u32,
        pages: u64,
        /// Per data stream, what the pass carried on it (empty without data streams).
        lanes: Vec<LanePass>,
    },
    /// The state in postcard ([`decode_state`]); with `compressed`, LZ4 with the length
    /// prepended (see [`Message::state_bytes`]).
    State {
        state: &'a [u8],
        compressed: bool,
    },
    Complete,
    Ack,
    Error {
        message: String,
    },
    Abort {
        message: String,
    },
    DiskWrites {
        payload: &'a [u8],
    },
    Control {
        payload: &'a [u8],
    },
    InputFrames {
        payload: &'a [u8],
    },
    OutputFrames {
        payload: &'a [u8],
    },
}

/// How one page of a MemoryPages frame travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// No data: the page is all zeros.
    Zero,
    /// The whole page.
    Data,
    /// A delta against the receiver's copy of the page.
    Delta,
    /// A delta against the receiver's copy with pieces of input frames it holds laid over.
    Input,
}

/// The pages of one MemoryPages frame, checked for shape (count, alignment, data length;
/// delta records are checked in full when the data is at hand, see [`apply_pages`]).
#[derive(Debug)]
pub struct PageBatch<'a> {
    entries: &'a [u8],
    data: &'a [u8],
    compressed: bool,
    data_pages: usize,
    /// Delta frames: the length of the data before LZ4 (the records).
    delta_data_len: Option<usize>,
}

impl<'a> PageBatch<'a> {
    /// Number of page entries.
    pub fn len(&self) -> usize {
        self.entries.len() / ENTRY_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries that carry data (not zero pages).
    pub fn data_pages(&self) -> usize {
        self.data_pages
    }

    pub fn is_compressed(&self) -> bool {
        self.compressed
    }

    /// Whether the frame carries deltas (its data is records, not whole pages).
    pub fn is_delta(&self) -> bool {
        self.delta_data_len.is_some()
    }

    /// The entries: page address and whether it is a zero page.
    pub fn entries(&self) -> impl Iterator<Item = (GuestAddress, bool)> + 'a {
        self.kinds()
            .map(|(gpa, kind)| (gpa, kind == PageKind::Zero))
    }

    /// The entries: page address and how the page travels.
    pub fn kinds(&self) -> impl Iterator<Item = (GuestAddress, PageKind)> + 'a {
        self.entries.chunks_exact(ENTRY_LEN).map(|e| {
            let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            let kind = if v & ZERO_PAGE_BIT != 0 {
                PageKind::Zero
            } else if v & INPUT_PAGE_BIT != 0 {
                PageKind::Input
            } else if v & DELTA_PAGE_BIT != 0 {
                PageKind::Delta
            } else {
                PageKind::Data
            };
            (GuestAddress(v & !PAGE_MASK), kind)
        })
    }

    /// The data of the non-zero pages, 4 KiB each in entry order (decompressed into
    /// `scratch` if needed; its size is bounded by `MAX_PAGES_PER_FRAME` pages). A delta
    /// frame has no such data on its own (its pages need the receiver's copy): an error.
    pub fn data<'s>(&self, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], ProtocolError>
    where
        'a: 's,
    {
        if self.is_delta() {
            return Err(ProtocolError::malformed(
                FrameType::MemoryPages,
                "a delta frame's pages need the receiver's copy (apply_pages)",
            ));
        }
        self.raw_data(scratch)
    }

    /// The data as sent, decompressed if needed: whole pages, or a delta frame's records
    /// (checked by [`check_records`] before use).
    fn raw_data<'s>(&self, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], ProtocolError>
    where
        'a: 's,
    {
        if !self.compressed {
            return Ok(self.data);
        }
        let want = self.delta_data_len.unwrap_or(self.data_pages * PAGE_SIZE);
        if scratch.len() < want {
            scratch.resize(want, 0);
        }
        let out = &mut scratch[..want];
        let n = lz4_flex::block::decompress_into(self.data, out).map_err(|e| {
            ProtocolError::malformed(FrameType::MemoryPages, format!("LZ4 data: {e}"))
        })?;
        if n != want {
            return Err(ProtocolError::malformed(
                FrameType::MemoryPages,
                format!("LZ4 data decompresses to {n} bytes, the entries need {want}"),
            ));
        }
        Ok(&scratch[..want])
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The VM state as a State frame carries it: postcard, a compact binary serde format. JSON
/// (snapshot files, the API) took 0.13 ms to write and 0.4 ms to parse every epoch on the
/// FT commit path; postcard takes about a tenth of that and half the bytes. The format has no
/// absent fields: state types must not skip fields when serializing.
pub fn encode_state<S: Serialize + ?Sized>(state: &S) -> Result<Vec<u8>, ProtocolError> {
    postcard::to_allocvec(state).map_err(ProtocolError::SerializeState)
}

/// Reads a state [`encode_state`] wrote; every byte must belong to it.
pub fn decode_state<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    let (state, rest) = postcard::take_from_bytes(bytes).map_err(ProtocolError::State)?;
    if !rest.is_empty() {
        return Err(ProtocolError::StateTrailing(rest.len()));
    }
    Ok(state)
}

fn message_text(payload: &[u8]) -> String {
    let cut = &payload[..payload.len().min(MAX_MESSAGE)];
    String::from_utf8_lossy(cut).into_owned()
}

impl<'a> Message<'a> {
    /// The encoded state of a State frame, decompressed when it came compressed. The length
    /// LZ4 data claims is checked against the frame limit before anything is allocated.
    pub fn state_bytes(
        payload: &[u8],
        compressed: bool,
    ) -> Result<std::borrow::Cow<'_, [u8]>, ProtocolError> {
        if !compressed {
            return Ok(std::borrow::Cow::Borrowed(payload));
        }
        let bad = |why: String| ProtocolError::malformed(FrameType::State, why);
        let (len, data) = match payload {
            [a, b, c, d, data @ ..] => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, data),
            _ => return Err(bad("LZ4 state shorter than its length".into())),
        };
        if len > MAX_STATE_BYTES {
            return Err(bad(format!(
                "LZ4 state claims {len} bytes, more than {MAX_STATE_BYTES}"
            )));
        }
        let mut state = vec![0u8; len];
        let n = lz4_flex::block::decompress_into(data, &mut state)
            .map_err(|e| bad(format!("LZ4 state: {e}")))?;
        if n != len {
            return Err(bad(format!(
                "LZ4 state decompresses to {n} bytes, {len} claimed"
            )));
        }
        Ok(std::borrow::Cow::Owned(state))
    }

    /// Decodes and checks the payload of `frame`.
    pub fn parse(frame: &Frame<'a>) -> Result<Self, ProtocolError> {
        let p = frame.payload;
        let kind = frame.kind;
        let fixed = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                Err(ProtocolError::malformed(
                    kind,
                    format!("payload is {} bytes, expected {n}", p.len()),
                ))
            }
        };
        Ok(match kind {
            FrameType::Hello => {
                if p.len() < 8 {
                    return Err(ProtocolError::malformed(kind, "shorter than 8 bytes"));
                }
                Message::Hello {
                    version: le_u32(p, 0),
                    page_size: le_u32(p, 4),
                    config_json: &p[8..],
                }
            }
            FrameType::MemoryPages => Message::MemoryPages(Self::parse_pages(frame)?),
            FrameType::MemoryDone => {
                let lanes = p.get(4..8).map_or(0, |_| le_u32(p, 4) as usize);
                if lanes > MAX_LANES {
                    return Err(ProtocolError::malformed(
                        kind,
                        format!("{lanes} data streams, at most {MAX_LANES}"),
                    ));
                }
                fixed(16 + 8 * lanes)?;
                Message::MemoryDone {
                    iteration: le_u32(p, 0),
                    pages: le_u64(p, 8),
                    lanes: (0..lanes)
                        .map(|i| LanePass {
                            frames: le_u32(p, 16 + 8 * i),
                            digest: le_u32(p, 20 + 8 * i),
                        })
                        .collect(),
                }
            }
            FrameType::State => Message::State {
                state: p,
                compressed: frame.flags & FLAG_LZ4 != 0,
            },
            FrameType::Complete => {
                fixed(0)?;
                Message::Complete
            }
            FrameType::Ack => {
                fixed(0)?;
                Message::Ack
            }
            FrameType::Error => Message::Error {
                message: message_text(p),
            },
            FrameType::Abort => Message::Abort {
                message: message_text(p),
            },
            FrameType::DiskWrites => Message::DiskWrites { payload: p },
            FrameType::Control => Message::Control { payload: p },
            FrameType::InputFrames => Message::InputFrames { payload: p },
            FrameType::OutputFrames => Message::OutputFrames { payload: p },
        })
    }

    fn parse_pages(frame: &Frame<'a>) -> Result<PageBatch<'a>, ProtocolError> {
        let kind = FrameType::MemoryPages;
        let p = frame.payload;
        if p.len() < PAGES_HEADER_LEN {
            return Err(ProtocolError::malformed(kind, "shorter than 8 bytes"));
        }
        let count = le_u32(p, 0) as usize;
        let delta = frame.flags & FLAG_DELTA != 0;
        let announced = le_u32(p, 4) as usize;
        if !delta && announced != 0 {
            return Err(ProtocolError::malformed(kind, "reserved field is not 0"));
        }
        if count > MAX_PAGES_PER_FRAME {
            return Err(ProtocolError::malformed(
                kind,
                format!("{count} pages, the limit is {MAX_PAGES_PER_FRAME}"),
            ));
        }
        let data_at = PAGES_HEADER_LEN + count * ENTRY_LEN;
        if p.len() < data_at {
            return Err(ProtocolError::malformed(
                kind,
                format!("{count} entries do not fit in {} bytes", p.len()),
            ));
        }
        let entries = &p[PAGES_HEADER_LEN..data_at];
        let flag_bits = if delta {
            ZERO_PAGE_BIT | DELTA_PAGE_BIT | INPUT_PAGE_BIT
        } else {
            ZERO_PAGE_BIT
        };
        let mut data_pages = 0;
        let mut delta_pages = 0;
        let mut input_pages = 0;
        for (i, e) in entries.chunks_exact(ENTRY_LEN).enumerate() {
            let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            let both = ZERO_PAGE_BIT | DELTA_PAGE_BIT;
            let input_alone = v & INPUT_PAGE_BIT != 0 && v & DELTA_PAGE_BIT == 0;
            if v & PAGE_MASK & !flag_bits != 0 || v & both == both || input_alone {
                return Err(ProtocolError::malformed(
                    kind,
                    format!("entry {i} ({v:#x}) is not a page address"),
                ));
            }
            if v & ZERO_PAGE_BIT == 0 {
                data_pages += 1;
            }
            if v & DELTA_PAGE_BIT != 0 {
                delta_pages += 1;
            }
            if v & INPUT_PAGE_BIT != 0 {
                input_pages += 1;
            }
        }
        let data = &p[data_at..];
        let compressed = frame.flags & FLAG_LZ4 != 0;
        if delta {
            // The records' length is bounded by the entries before any decompression: whole
            // pages plus at most a page and its length word per delta, and the pieces of the
            // input entries.
            let whole = (data_pages - delta_pages) * PAGE_SIZE;
            let least = whole + delta_pages * MIN_DELTA_RECORD + input_pages * MIN_INPUT_HEAD;
            let most = whole
                + delta_pages * (DELTA_LEN_BYTES + MAX_DELTA_LEN)
                + input_pages * MAX_INPUT_HEAD;
            if announced < least || announced > most || announced > MAX_FRAME_PAYLOAD {
                return Err(ProtocolError::malformed(
                    kind,
                    format!(
                        "{announced} bytes of delta records announced, {} whole and {delta_pages} delta pages need {least} to {most}",
                        data_pages - delta_pages
                    ),
                ));
            }
            if compressed && data.is_empty() {
                return Err(ProtocolError::malformed(
                    kind,
                    "LZ4 flag on a frame without page data",
                ));
            }
            if !compressed {
                if data.len() != announced {
                    return Err(ProtocolError::malformed(
                        kind,
                        format!(
                            "{} bytes of delta records, {announced} announced",
                            data.len()
                        ),
                    ));
                }
                check_records(entries, data, None)?;
            }
            return Ok(PageBatch {
                entries,
                data,
                compressed,
                data_pages,
                delta_data_len: Some(announced),
            });
        }
        let raw = data_pages * PAGE_SIZE;
        if compressed {
            if data_pages == 0 || data.is_empty() {
                return Err(ProtocolError::malformed(
                    kind,
                    "LZ4 flag on a frame without page data",
                ));
            }
        } else if data.len() != raw {
            return Err(ProtocolError::malformed(
                kind,
                format!(
                    "{} bytes of page data, {data_pages} non-zero pages need {raw}",
                    data.len()
                ),
            ));
        }
        Ok(PageBatch {
            entries,
            data,
            compressed,
            data_pages,
            delta_data_len: None,
        })
    }
}

// Page deltas, XBZRLE-style (QEMU's encoding of a page as runs against its previous copy; no
// maintained crate implements it, and the format is a few lines): runs of changed bytes
// found word by word, trimmed to the bytes that differ.

/// Reads a LEB128 value of at most 2 bytes (anything a page offset needs) at `*at`.
fn read_leb(b: &[u8], at: &mut usize) -> Result<usize, String> {
    let first = *b
        .get(*at)
        .ok_or_else(|| format!("run header cut at byte {at}"))?;
    *at += 1;
    let mut v = usize::from(first & 0x7f);
    if first & 0x80 != 0 {
        let second = *b
            .get(*at)
            .ok_or_else(|| format!("run header cut at byte {at}"))?;
        *at += 1;
        if second & 0x80 != 0 {
            return Err("run header longer than 2 bytes".into());
        }
        v |= usize::from(second) << 7;
    }
    Ok(v)
}

fn write_leb(out: &mut [u8], at: &mut usize, v: usize) -> Option<()> {
    if v < 0x80 {
        *out.get_mut(*at)? = v as u8;
        *at += 1;
    } else {
        *out.get_mut(*at)? = (v as u8 & 0x7f) | 0x80;
        *out.get_mut(*at + 1)? = (v >> 7) as u8;
        *at += 2;
    }
    Some(())
}

/// Walks the runs of one page delta, checking every length and offset: `copy(offset, bytes)`
/// is called per run, always with `offset + bytes.len() <= PAGE_SIZE`.
fn walk_delta(delta: &[u8], mut copy: impl FnMut(usize, &[u8])) -> Result<(), String> {
    let mut at = 0;
    let mut pos = 0usize;
    while at < delta.len() {
        let skip = read_leb(delta, &mut at)?;
        let count = read_leb(delta, &mut at)?;
        if count == 0 {
            return Err(format!("empty run at byte {pos} of the page"));
        }
        let start = pos + skip;
        let end = start + count;
        if end > PAGE_SIZE {
            return Err(format!(
                "run of {count} bytes at byte {start} passes the end of the page"
            ));
        }
        let bytes = delta
            .get(at..at + count)
            .ok_or_else(|| format!("run of {count} bytes cut short"))?;
        copy(start, bytes);
        at += count;
        pos = end;
    }
    Ok(())
}

/// One delta record at `data[at..]`: its runs, and where the next record starts.
fn delta_record(data: &[u8], at: usize) -> Result<(&[u8], usize), String> {
    let len = data
        .get(at..at + DELTA_LEN_BYTES)
        .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
        .ok_or("delta length cut short")?;
    if len > MAX_DELTA_LEN {
        return Err(format!("delta of {len} bytes"));
    }
    let body_at = at + DELTA_LEN_BYTES;
    let body = data
        .get(body_at..body_at + len)
        .ok_or_else(|| format!("delta of {len} bytes cut short"))?;
    Ok((body, body_at + len))
}

/// An input entry's record before its delta: the piece count and the pieces.
const MIN_INPUT_HEAD: usize = 1 + INPUT_PIECE_LEN;
const MAX_INPUT_HEAD: usize = 1 + MAX_INPUT_PIECES * INPUT_PIECE_LEN;

/// The input frames a page of a delta frame may be built from (the FT backup's store of the
/// frames its primary's guest received), by sequence number.
pub trait InputFrameSource {
    fn input_frame(&self, seq: u64) -> Option<&[u8]>;
}

/// One piece of an input record: bytes `frame_offset..+len` of input frame `seq` go to
/// `page_offset..` of the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct InputPiece {
    pub seq: u64,
    pub frame_offset: u32,
    pub page_offset: u16,
    pub len: u16,
}

impl InputPiece {
    pub(super) fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..12].copy_from_slice(&self.frame_offset.to_le_bytes());
        out[12..14].copy_from_slice(&self.page_offset.to_le_bytes());
        out[14..16].copy_from_slice(&self.len.to_le_bytes());
    }

    pub(super) fn read(b: &[u8]) -> Self {
        Self {
            seq: le_u64(b, 0),
            frame_offset: le_u32(b, 8),
            page_offset: u16::from_le_bytes([b[12], b[13]]),
            len: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// The bytes the piece lays, from `source`.
    fn bytes<'s>(&self, source: &'s dyn InputFrameSource) -> Result<&'s [u8], String> {
        let frame = source
            .input_frame(self.seq)
            .ok_or_else(|| format!("input frame {} is not held here", self.seq))?;
        let from = self.frame_offset as usize;
        let to = from + usize::from(self.len);
        frame.get(from..to).ok_or_else(|| {
            format!(
                "bytes {from}..{to} of input frame {} of {} bytes",
                self.seq,
                frame.len()
            )
        })
    }
}

/// One input record at `data[at..]`: its pieces (checked for shape), its delta's runs, and
/// where the next record starts.
fn input_record(data: &[u8], at: usize) -> Result<(Vec<InputPiece>, &[u8], usize), String> {
    let count = usize::from(*data.get(at).ok_or("input piece count cut short")?);
    if count == 0 || count > MAX_INPUT_PIECES {
        return Err(format!("{count} input pieces (1 ..= {MAX_INPUT_PIECES})"));
    }
    let from = at + 1;
    let to = from + count * INPUT_PIECE_LEN;
    let raw = data
        .get(from..to)
        .ok_or_else(|| format!("{count} input pieces cut short"))?;
    let mut pieces = Vec::with_capacity(count);
    for b in raw.chunks_exact(INPUT_PIECE_LEN) {
        let piece = InputPiece::read(b);
        let end = usize::from(piece.page_offset) + usize::from(piece.len);
        if piece.len == 0 || end > PAGE_SIZE {
            return Err(format!(
                "input piece of {} bytes at byte {} of the page",
                piece.len, piece.page_offset
            ));
        }
        pieces.push(piece);
    }
    let (body, next) = delta_record(data, to)?;
    Ok((pieces, body, next))
}

/// Checks a delta frame's records against its entries (lengths, runs, total length) and,
/// with `input`, that every input piece names bytes it holds.
fn check_records(
    entries: &[u8],
    data: &[u8],
    input: Option<&dyn InputFrameSource>,
) -> Result<(), ProtocolError> {
    let bad = |i: usize, why: String| {
        ProtocolError::malformed(FrameType::MemoryPages, format!("entry {i}: {why}"))
    };
    let mut at = 0usize;
    for (i, e) in entries.chunks_exact(ENTRY_LEN).enumerate() {
        let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
        if v & ZERO_PAGE_BIT != 0 {
            continue;
        }
        if v & INPUT_PAGE_BIT != 0 {
            let (pieces, body, next) = input_record(data, at).map_err(|why| bad(i, why))?;
            if let Some(source) = input {
                for piece in &pieces {
                    piece.bytes(source).map_err(|why| bad(i, why))?;
                }
            }
            walk_delta(body, |_, _| {}).map_err(|why| bad(i, why))?;
            at = next;
        } else if v & DELTA_PAGE_BIT != 0 {
            let (body, next) = delta_record(data, at).map_err(|why| bad(i, why))?;
            walk_delta(body, |_, _| {}).map_err(|why| bad(i, why))?;
            at = next;
        } else {
            at += PAGE_SIZE;
            if at > data.len() {
                return Err(bad(i, "page data cut short".into()));
            }
        }
    }
    if at != data.len() {
        return Err(ProtocolError::malformed(
            FrameType::MemoryPages,
            format!("{} bytes of records, the entries use {at}", data.len()),
        ));
    }
    Ok(())
}

/// Applies a checked delta to `page`.
fn apply_delta(page: &mut [u8], delta: &[u8]) -> Result<(), String> {
    if page.len() != PAGE_SIZE {
        return Err(format!("a page buffer of {} bytes", page.len()));
    }
    walk_delta(delta, |start, bytes| {
        page[start..start + bytes.len()].copy_from_slice(bytes)
    })
}

/// Encodes `new` as runs against `old` into `out` (0 bytes: nothing changed); None when that
/// takes more than `out.len()` bytes (send the page itself then). Words are compared 8 bytes at a
/// time; a run spans consecutive changed words and is trimmed to the bytes that differ.
pub fn encode_delta(old: &[u8], new: &[u8], out: &mut [u8]) -> Option<usize> {
    const WORD: usize = 8;
    let (Ok(old), Ok(new)) = (
        <&[u8; PAGE_SIZE]>::try_from(old),
        <&[u8; PAGE_SIZE]>::try_from(new),
    ) else {
        return None;
    };
    // A page stored again with what it held (a reused receive buffer) is common: one
    // vectorised compare settles it.
    if old == new {
        return Some(0);
    }
    let words = PAGE_SIZE / WORD;
    // Whole-word loads: comparing 8-byte subslices calls `bcmp` once per word.
    let word = |page: &[u8; PAGE_SIZE], w: usize| {
        let mut bytes = [0u8; WORD];
        bytes.copy_from_slice(&page[w * WORD..(w + 1) * WORD]);
        u64::from_ne_bytes(bytes)
    };
    let same = |w: usize| word(old, w) == word(new, w);
    // Four words at a time where they all agree or all differ, branch-free within the four
    // (180 ns instead of 260 for a page rewritten whole, such as a receive buffer with new
    // data, to give up on its first run).
    const BLOCK: usize = 4;
    let block = |w: usize, want_same: bool| {
        (0..BLOCK).fold(true, |all, i| all & (same(w + i) == want_same))
    };
    let mut at = 0usize;
    let mut pos = 0usize;
    let mut w = 0usize;
    loop {
        while w + BLOCK <= words && block(w, true) {
            w += BLOCK;
        }
        while w < words && same(w) {
            w += 1;
        }
        if w == words {
            break;
        }
        let first = w;
        let room = out.len().saturating_sub(at);
        while w + BLOCK <= words && block(w, false) {
            w += BLOCK;
            if (w - first) * WORD > room {
                return None;
            }
        }
        while w < words && !same(w) {
            w += 1;
            if (w - first) * WORD > room {
                return None;
            }
        }
        let mut start = first * WORD;
        while old[start] == new[start] {
            start += 1;
        }
        let mut end = w * WORD;
        while old[end - 1] == new[end - 1] {
            end -= 1;
        }
        write_leb(out, &mut at, start - pos)?;
        write_leb(out, &mut at, end - start)?;
        out.get_mut(at..at + (end - start))?
            .copy_from_slice(&new[start..end]);
        at += end - start;
        pos = end;
    }
    Some(at)
}

/// Reads frames, reusing one buffer whose size never exceeds the largest frame actually
/// received (at most `MAX_FRAME_PAYLOAD + 4` bytes); a frame announcing a large payload
/// only gets memory as its bytes arrive.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    next_seq: u32,
    /// The stream authenticates every byte (TLS): frames may leave their checksum out.
    authenticated: bool,
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the stream this reader reads authenticates every byte itself (TLS), so that
    /// frames marked [`FLAG_UNCHECKED`] are accepted without a checksum. Off by default:
    /// such a frame is then an error.
    pub fn set_authenticated(&mut self, authenticated: bool) {
        self.authenticated = authenticated;
    }

    /// Bytes currently reserved for frame payloads.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The payload of the frame just read (`len` bytes), moved out rather than copied for a
    /// caller that keeps it; `replacement`, a buffer the caller is done with (whatever it
    /// holds), becomes the read buffer, so its room serves the next frames.
    pub fn take_payload(&mut self, len: usize, replacement: Vec<u8>) -> Vec<u8> {
        let mut payload = std::mem::replace(&mut self.buf, replacement);
        payload.truncate(len);
        payload
    }

    /// Reads and checks one frame (magic, type, flags, reserved, length bound, checksum,
    /// sequence). EOF before the first header byte is [`ProtocolError::Closed`].
    pub fn read_frame<R: Read + ?Sized>(&mut self, r: &mut R) -> Result<Frame<'_>, ProtocolError> {
        let mut header = [0u8; HEADER_LEN];
        let got = read_full(r, &mut header)?;
        if got == 0 {
            return Err(ProtocolError::Closed);
        }
        if got < HEADER_LEN {
            return Err(ProtocolError::Truncated {
                what: "frame header",
                expected: HEADER_LEN,
                got,
            });
        }
        let magic = le_u32(&header, 0);
        if magic != FRAME_MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let kind = FrameType::from_u8(header[4]).ok_or(ProtocolError::UnknownType(header[4]))?;
        let unchecked = header[5] & FLAG_UNCHECKED != 0;
        let flags = header[5] & !FLAG_UNCHECKED;
        if unchecked && kind == FrameType::Hello {
            // Hello names the version: a peer that cannot read the flag must still read it.
            return Err(ProtocolError::BadFlags {
                kind,
                flags: header[5],
            });
        }
        let reserved = u16::from_le_bytes([header[6], header[7]]);
        if reserved != 0 {
            return Err(ProtocolError::Reserved(reserved));
        }
        let len = le_u32(&header, 8) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(ProtocolError::TooLarge { len: len as u64 });
        }
        let seq = le_u32(&header, 12);
        let need = len + TRAILER_LEN;
        self.fill(r, need)?;
        let expected = le_u32(&self.buf, len);
        let actual = if unchecked {
            if !self.authenticated {
                return Err(ProtocolError::Unchecked { kind, seq });
            }
            0
        } else {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&header);
            hasher.update(&self.buf[..len]);
            hasher.finalize()
        };
        if actual != expected {
            return Err(ProtocolError::Checksum {
                seq,
                expected,
                actual,
            });
        }
        if seq != self.next_seq {
            return Err(ProtocolError::Sequence {
                expected: self.next_seq,
                got: seq,
            });
        }
        if flags & !kind.allowed_flags() != 0 {
            return Err(ProtocolError::BadFlags { kind, flags });
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(Frame {
            kind,
            flags,
            seq,
            payload: &self.buf[..len],
            crc: actual,
        })
    }

    /// Reads exactly `need` bytes into the front of the buffer, growing it (exactly, at most
    /// doubling what has arrived) only as data comes in.
    fn fill<R: Read + ?Sized>(&mut self, r: &mut R, need: usize) -> Result<(), ProtocolError> {
        let mut filled = 0;
        while filled < need {
            let target = need.min(filled.saturating_mul(2).max(FIRST_READ));
            if self.buf.len() < target {
                self.buf.reserve_exact(target - self.buf.len());
                self.buf.resize(target, 0);
            }
            match r.read(&mut self.buf[filled..target]) {
                Ok(0) => {
                    return Err(ProtocolError::Truncated {
                        what: "frame payload",
                        expected: need,
                        got: filled,
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Fills in the header (at `buf[..HEADER_LEN]`) and the checksum (after `payload_len` payload
/// bytes; 0 with [`FLAG_UNCHECKED`]) of a frame assembled in place; returns the frame's total
/// length.
fn seal_frame(buf: &mut [u8], kind: FrameType, flags: u8, seq: u32, payload_len: usize) -> usize {
    write_header(buf, kind, flags, seq, payload_len);
    let end = HEADER_LEN + payload_len;
    let crc = if flags & FLAG_UNCHECKED != 0 {
        0
    } else {
        crc32fast::hash(&buf[..end])
    };
    buf[end..end + TRAILER_LEN].copy_from_slice(&crc.to_le_bytes());
    end + TRAILER_LEN
}

/// Seals a frame [`PageEncoder::encode`] assembled in `frame` (header with `seq`, checksum:
/// the header's CRC combined with the encoder's CRC of the payload, or 0 for an unchecked
/// frame); returns its length and checksum.
pub(super) fn seal_encoded(frame: &mut [u8], encoded: &EncodedFrame, seq: u32) -> (usize, u32) {
    let crc = encoded_header(frame, encoded, seq);
    let end = HEADER_LEN + encoded.payload_len;
    frame[end..end + TRAILER_LEN].copy_from_slice(&crc.to_le_bytes());
    (end + TRAILER_LEN, crc)
}

/// Seals (header with `seq`, checksum) and writes to `out` a frame [`PageEncoder::encode`]
/// assembled in place: header, page count and entries from `frame`, then its data runs
/// (`layout`) and the checksum, in one vectored write (TLS seals the runs into records as they
/// lie). Returns its length and checksum.
///
/// # Safety
/// `layout`'s memory runs are still mapped and unchanged since the frame was encoded.
pub(super) unsafe fn write_in_place<W: Write>(
    out: &mut W,
    (frame, layout): (&mut [u8], &[DataPiece]),
    encoded: &EncodedFrame,
    seq: u32,
) -> io::Result<(usize, u32)> {
    let crc = encoded_header(frame, encoded, seq);
    let trailer = crc.to_le_bytes();
    let frame: &[u8] = frame;
    let head = HEADER_LEN + encoded.payload_len - encoded.data_sent;
    let mut slices = Vec::with_capacity(layout.len() + 2);
    slices.push(IoSlice::new(&frame[..head]));
    // SAFETY: the caller vouches for the memory runs.
    slices.extend(
        layout
            .iter()
            .map(|p| IoSlice::new(unsafe { p.bytes(frame) })),
    );
    slices.push(IoSlice::new(&trailer));
    write_all_vectored(out, &mut slices)?;
    Ok((HEADER_LEN + encoded.payload_len + TRAILER_LEN, crc))
}

/// Writes the header (with `seq`) of a frame [`PageEncoder::encode`] assembled in `frame`;
/// returns the frame's checksum (0 unchecked).
fn encoded_header(frame: &mut [u8], encoded: &EncodedFrame, seq: u32) -> u32 {
    write_header(
        frame,
        FrameType::MemoryPages,
        encoded.flags,
        seq,
        encoded.payload_len,
    );
    if encoded.flags & FLAG_UNCHECKED != 0 {
        return 0;
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame[..HEADER_LEN]);
    crc.combine(&encoded.payload_crc);
    crc.finalize()
}

fn write_header(buf: &mut [u8], kind: FrameType, flags: u8, seq: u32, payload_len: usize) {
    buf[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    buf[4] = kind as u8;
    buf[5] = flags;
    buf[6..8].copy_from_slice(&0u16.to_le_bytes());
    buf[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    buf[12..16].copy_from_slice(&seq.to_le_bytes());
}

/// Encodes one frame with `payload` into a new buffer (for the small frames; page frames are
/// assembled in place by the [`Sender`]).
pub fn encode_frame(kind: FrameType, flags: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    assemble_frame(&mut buf, kind, flags, seq, payload);
    buf
}

/// Largest frame buffer a [`Sender`] keeps between small frames (an input batch fits).
const KEEP_FRAME_BUFFER: usize = 2 << 20;

/// Assembles one frame in `buf`, emptied first: a buffer kept across frames saves the
/// allocation, its zeroing and, for large frames, the page faults of fresh memory.
fn assemble_frame(buf: &mut Vec<u8>, kind: FrameType, flags: u8, seq: u32, payload: &[u8]) {
    assemble_frame_with(buf, kind, flags, seq, &mut |b| b.extend_from_slice(payload));
}

/// [`assemble_frame`] with a payload that `build` appends to the buffer in place (no copy of
/// a payload built elsewhere first); returns the payload's length.
fn assemble_frame_with(
    buf: &mut Vec<u8>,
    kind: FrameType,
    flags: u8,
    seq: u32,
    build: &mut dyn FnMut(&mut Vec<u8>),
) -> usize {
    buf.clear();
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    build(buf);
    let payload_len = buf.len() - HEADER_LEN;
    buf.extend_from_slice(&[0u8; TRAILER_LEN]);
    seal_frame(buf, kind, flags, seq, payload_len);
    payload_len
}

/// Writes one small frame with the next sequence number of `seq` (for a side that speaks the
/// protocol without a [`Sender`] or [`Receiver`], such as the FT backup's answers).
pub fn write_frame<T: Write>(
    stream: &mut T,
    seq: &mut u32,
    stats: &mut TransferStats,
    kind: FrameType,
    payload: &[u8],
) -> io::Result<()> {
    write_small(stream, seq, stats, kind, payload)
}

/// Writes one small frame and counts it.
fn write_small<T: Write>(
    stream: &mut T,
    seq: &mut u32,
    stats: &mut TransferStats,
    kind: FrameType,
    payload: &[u8],
) -> io::Result<()> {
    let mut frame = Vec::new();
    let build = &mut |b: &mut Vec<u8>| b.extend_from_slice(payload);
    write_small_flagged((stream, &mut frame), seq, stats, (kind, 0), build)
}

/// A frame this side was asked to send that the receiver would refuse.
fn payload_too_large(kind: FrameType, payload_len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{kind} payload of {payload_len} bytes exceeds the frame limit of {MAX_FRAME_PAYLOAD}"
        ),
    )
}

/// Writes one frame assembled in `frame` (a buffer the caller may keep for the next one),
/// its payload appended by `build`.
fn write_small_flagged<T: Write>(
    (stream, frame): (&mut T, &mut Vec<u8>),
    seq: &mut u32,
    stats: &mut TransferStats,
    (kind, flags): (FrameType, u8),
    build: &mut dyn FnMut(&mut Vec<u8>),
) -> io::Result<()> {
    let payload_len = assemble_frame_with(frame, kind, flags, *seq, build);
    if payload_len > MAX_FRAME_PAYLOAD {
        *frame = Vec::new();
        return Err(payload_too_large(kind, payload_len));
    }
    let written = stream.write_all(frame).and_then(|()| stream.flush());
    let len = frame.len() as u64;
    if frame.capacity() > KEEP_FRAME_BUFFER {
        // A rare large frame (disk writes, a migration's state) does not pin its memory.
        *frame = Vec::new();
    }
    written?;
    *seq = seq.wrapping_add(1);
    stats.frames += 1;
    stats.bytes += len;
    Ok(())
}

impl<T: Read + Write> FrameSink for Sender<T> {
    fn send_parts(&mut self, kind: FrameType, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        self.send_frame_parts(kind, parts)
    }
}

/// Writes every byte of `slices` (`Write::write_all_vectored` is not stable yet).
fn write_all_vectored<T: Write>(stream: &mut T, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the receiver of a delta stream holds, as its sender knows it: a copy of every page
/// sent so far (same layout as the guest's memory), and which pages those are. Pages never
/// sent (the receiver has them from before, e.g. the initial copy) are sent whole once.
pub struct DeltaBase {
    mem: GuestMemoryMmap,
    known: DirtyPages,
}

impl DeltaBase {
    /// `mem`: fresh (zeroed) memory with the guest's layout; pages are populated as sent.
    pub fn new(mem: GuestMemoryMmap) -> Result<Self, DirtyPagesError> {
        let known = DirtyPages::empty(&mem)?;
        Ok(Self { mem, known })
    }

    /// Whether the receiver's copy of the page at `gpa` is known.
    pub fn knows(&self, gpa: GuestAddress) -> bool {
        self.known.contains(gpa)
    }

    /// Fills `known` with whether the receiver has each page of `chunks` (in order) and
    /// records them all as sent.
    fn record(&mut self, chunks: &[(u64, usize)], known: &mut Vec<bool>) {
        known.clear();
        for &(start, n) in chunks {
            for i in 0..n {
                let gpa = GuestAddress(start + (i * PAGE_SIZE) as u64);
                known.push(self.known.contains(gpa));
                self.known.insert(gpa);
            }
        }
    }
}

/// Cuts the runs of a page set into frames of at most `batch` pages.
struct FrameCutter<'a> {
    runs: super::memory::Runs<'a>,
    carry: Option<(u64, u64)>,
    batch: usize,
}

impl<'a> FrameCutter<'a> {
    fn new(pages: &'a DirtyPages, batch: usize) -> Self {
        Self {
            runs: pages.runs(),
            carry: None,
            batch,
        }
    }

    /// The next frame's runs into `chunks`; returns its page count (0: none left).
    fn next_frame(&mut self, chunks: &mut Vec<(u64, usize)>) -> usize {
        chunks.clear();
        let mut count = 0usize;
        while count < self.batch {
            let Some((start, n)) = self
                .carry
                .take()
                .or_else(|| self.runs.next().map(|(a, n)| (a.0, n)))
            else {
                break;
            };
            let take = (self.batch - count).min(usize::try_from(n).unwrap_or(usize::MAX));
            chunks.push((start, take));
            count += take;
            if (take as u64) < n {
                self.carry = Some((start + (take * PAGE_SIZE) as u64, n - take as u64));
            }
        }
        count
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderOptions {
    /// LZ4-compress page data (a frame is sent compressed only when that is smaller).
    pub compress: bool,
    /// Pages per MemoryPages frame (1 ..= MAX_PAGES_PER_FRAME).
    pub batch_pages: usize,
    /// Checksum every frame. Turn off only on a stream that authenticates every byte (TLS)
    /// and whose receiver knows it ([`FrameReader::set_authenticated`]): frames after Hello
    /// then go [`FLAG_UNCHECKED`]. Data streams ([`Sender::start_lanes`]) stay checked: their
    /// checksums tie each frame to its pass.
    pub checksums: bool,
}

impl Default for SenderOptions {
    fn default() -> Self {
        Self {
            compress: false,
            batch_pages: 1024,
            checksums: true,
        }
    }
}

/// Where a frame is written in pieces (a [`Sender`]; see [`Sender::send_frame_parts`]).
pub trait FrameSink {
    fn send_parts(&mut self, kind: FrameType, parts: &[&[u8]]) -> Result<(), ProtocolError>;
}

/// Another source's frames, sent as soon as possible: asked for between the page frames of a
/// pass (see [`Sender::set_interleave`]), it writes what it has to the sink.
pub type InterleaveHook = Box<dyn FnMut(&mut dyn FrameSink) -> Result<(), ProtocolError> + Send>;

/// The sending side: the migration source, or the FT primary.
pub struct Sender<T: Read + Write> {
    stream: T,
    options: SenderOptions,
    seq: u32,
    reader: FrameReader,
    started: bool,
    iteration: u32,
    stats: TransferStats,
    /// The frame being assembled on this thread (header, count, entries, data, checksum),
    /// its page runs and whether the receiver knows each page.
    job: EncodeJob,
    encoder: PageEncoder,
    /// Encoder threads for delta passes (see [`Sender::start_encode_pool`]).
    pool: Option<EncodePool>,
    /// Counts what leaves for an operator watching a long transfer (`vm.progress`).
    progress: Option<Arc<TransferProgress>>,
    interleave: Option<InterleaveHook>,
    /// Where small frames (state, input, control) are assembled, kept across frames.
    small_frame: Vec<u8>,
    /// Delta passes on this thread send whole pages from where they lie in the memory read
    /// (see [`Sender::send_pages_in_place`]).
    pages_in_place: bool,
}

impl<T: Read + Write> Sender<T> {
    pub fn new(stream: T) -> Self {
        Self::with_options(stream, SenderOptions::default())
    }

    pub fn with_options(stream: T, options: SenderOptions) -> Self {
        let batch = options.batch_pages.clamp(1, MAX_PAGES_PER_FRAME);
        Self {
            stream,
            options: SenderOptions {
                batch_pages: batch,
                ..options
            },
            seq: 0,
            reader: FrameReader::new(),
            started: false,
            iteration: 0,
            stats: TransferStats::default(),
            job: EncodeJob::default(),
            // Hello is always checked; `started` turns this on after it.
            encoder: PageEncoder::new(options.compress, true),
            pool: None,
            progress: None,
            interleave: None,
            small_frame: Vec::new(),
            pages_in_place: false,
        }
    }

    /// From now on a delta pass without LZ4 (encoded on this thread, a pool's or data
    /// streams') reads its pages where they lie and writes those it sends whole from there
    /// instead of copying them into its frames first (fault tolerance: the staging memory;
    /// the stream's bytes are the same).
    ///
    /// # Safety
    /// No page of the memory given to a delta pass may change while the pass runs: the
    /// frame's checksum and the bytes written are read at different times, and another
    /// thread's writes under a live `&[u8]` are undefined behaviour.
    pub unsafe fn send_pages_in_place(&mut self) {
        self.pages_in_place = true;
    }

    /// Pages per MemoryPages frame from now on (1 ..= MAX_PAGES_PER_FRAME).
    pub fn set_batch_pages(&mut self, pages: usize) {
        self.options.batch_pages = pages.clamp(1, MAX_PAGES_PER_FRAME);
    }

    /// Sends what `hook` returns after every page frame of a pass (fault tolerance's input
    /// mirroring: the guest's input must not wait for a whole epoch's pages).
    pub fn set_interleave(&mut self, hook: Option<InterleaveHook>) {
        self.interleave = hook;
    }

    fn send_interleaved(&mut self) -> Result<(), ProtocolError> {
        let Some(mut hook) = self.interleave.take() else {
            return Ok(());
        };
        let result = hook(self);
        self.interleave = Some(hook);
        result
    }

    /// Reports what is sent to `progress` from now on (None: stop reporting).
    pub fn set_progress(&mut self, progress: Option<Arc<TransferProgress>>) {
        self.progress = progress;
    }

    pub fn progress(&self) -> Option<&Arc<TransferProgress>> {
        self.progress.as_ref()
    }

    pub fn stats(&self) -> TransferStats {
        self.stats
    }

    pub fn get_ref(&self) -> &T {
        &self.stream
    }

    pub fn into_inner(self) -> T {
        self.stream
    }

    /// A write failed: if the receiver explained why before closing, prefer its message.
    fn write_failed(&mut self, e: io::Error) -> ProtocolError {
        if matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            if let Ok(frame) = self.reader.read_frame(&mut self.stream) {
                if let Ok(Message::Error { message }) = Message::parse(&frame) {
                    return ProtocolError::Remote(message);
                }
            }
        }
        ProtocolError::Io(e)
    }

    /// [`FLAG_UNCHECKED`] for the frames after Hello when checksums are off.
    fn unchecked(&self) -> u8 {
        if self.started && !self.options.checksums {
            FLAG_UNCHECKED
        } else {
            0
        }
    }

    fn send_small(&mut self, kind: FrameType, payload: &[u8]) -> Result<(), ProtocolError> {
        self.send_small_with(kind, &mut |b| b.extend_from_slice(payload))
    }

    /// Sends one frame whose payload `build` appends to the frame buffer.
    fn send_small_with(
        &mut self,
        kind: FrameType,
        build: &mut dyn FnMut(&mut Vec<u8>),
    ) -> Result<(), ProtocolError> {
        let flags = self.unchecked();
        let before = self.stats.bytes;
        match write_small_flagged(
            (&mut self.stream, &mut self.small_frame),
            &mut self.seq,
            &mut self.stats,
            (kind, flags),
            build,
        ) {
            Ok(()) => {
                if let Some(progress) = &self.progress {
                    progress.sent_bytes(self.stats.bytes - before);
                }
                Ok(())
            }
            Err(e) => Err(self.write_failed(e)),
        }
    }

    fn check_started(&self, what: &'static str) -> Result<(), ProtocolError> {
        if self.started {
            Ok(())
        } else {
            Err(ProtocolError::NotStarted(what))
        }
    }

    /// Opens the stream: protocol version, page size and the VM configuration, so the
    /// receiver can create the VM before memory arrives.
    pub fn send_hello(&mut self, config: &VmConfig) -> Result<(), ProtocolError> {
        let json = serde_json::to_vec(config).map_err(|source| ProtocolError::Serialize {
            what: "VM configuration",
            source,
        })?;
        let mut payload = Vec::with_capacity(8 + json.len());
        payload.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        payload.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        payload.extend_from_slice(&json);
        self.send_small(FrameType::Hello, &payload)?;
        self.started = true;
        self.encoder.set_checksum(self.options.checksums);
        Ok(())
    }

    /// Sends every page of `mem`.
    pub fn send_all_memory(&mut self, mem: &GuestMemoryMmap) -> Result<PassStats, ProtocolError> {
        let all = DirtyPages::all(mem)?;
        self.send_memory(mem, &all)
    }

    /// Sends the pages of `pages` from `mem` as one pass (MemoryPages frames, then
    /// MemoryDone). Zero pages travel as markers; runs of pages are copied with one
    /// `vm-memory` read each into a reused frame buffer; nothing is allocated per page.
    pub fn send_memory(
        &mut self,
        mem: &GuestMemoryMmap,
        pages: &DirtyPages,
    ) -> Result<PassStats, ProtocolError> {
        self.send_pass(mem, pages, None, None)
    }

    /// [`Sender::send_memory`] for a receiver whose copy of memory `base` tracks: a page
    /// `base` knows goes as a delta against it when that is smaller than the page, and
    /// `base` then holds every page sent. Only for a stream on which every pass is applied
    /// in order (FT: an epoch that is not applied ends the session, and with it `base`).
    pub fn send_memory_delta(
        &mut self,
        mem: &GuestMemoryMmap,
        pages: &DirtyPages,
        base: &mut DeltaBase,
    ) -> Result<PassStats, ProtocolError> {
        self.send_pass(mem, pages, Some(base), None)
    }

    /// [`Sender::send_memory_delta`] to a receiver that holds the input frames of `input`
    /// (fault tolerance's backup): a page they landed in may name their bytes instead of
    /// carrying them.
    pub fn send_memory_delta_with_input(
        &mut self,
        mem: &GuestMemoryMmap,
        pages: &DirtyPages,
        base: &mut DeltaBase,
        input: &Arc<InputPieces>,
    ) -> Result<PassStats, ProtocolError> {
        self.send_pass(mem, pages, Some(base), Some(input))
    }

    /// Encodes the delta passes of `staging` against `base` on `threads` threads from now on,
    /// while this thread writes (fault tolerance's pipeline). `on_start` runs first on each
    /// thread (its seccomp filter).
    pub fn start_encode_pool(
        &mut self,
        threads: usize,
        staging: &GuestMemoryMmap,
        base: &DeltaBase,
        on_start: impl Fn() -> bool + Clone + Send + 'static,
    ) -> io::Result<()> {
        self.start_pool(threads, Vec::new(), staging, base, on_start)
    }

    /// [`Sender::start_encode_pool`] with one thread per data stream in `lanes`, each writing
    /// the frames it encodes to its stream; MemoryDone then counts them per stream.
    pub fn start_lanes(
        &mut self,
        lanes: Vec<Lane>,
        staging: &GuestMemoryMmap,
        base: &DeltaBase,
        on_start: impl Fn() -> bool + Clone + Send + 'static,
    ) -> io::Result<()> {
        if lanes.is_empty() || lanes.len() > MAX_LANES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} data streams (1 ..= {MAX_LANES})", lanes.len()),
            ));
        }
        self.start_pool(0, lanes, staging, base, on_start)
    }

    fn start_pool(
        &mut self,
        threads: usize,
        lanes: Vec<Lane>,
        staging: &GuestMemoryMmap,
        base: &DeltaBase,
        on_start: impl Fn() -> bool + Clone + Send + 'static,
    ) -> io::Result<()> {
        self.pool = None;
        let compress = self.options.compress;
        // A data stream's frames are tied to their pass by their checksums.
        let checksum = self.options.checksums || !lanes.is_empty();
        let pool = EncodePool::start(
            threads,
            lanes,
            staging,
            &base.mem,
            (compress, checksum),
            on_start,
        )?;
        self.pool = Some(pool);
        Ok(())
    }

    /// Data streams beside this one that carry page frames (0: none).
    pub fn lanes(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.lanes())
    }

    /// Encoder threads of the pool (0: frames are encoded on the sending thread).
    pub fn encode_threads(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.threads())
    }

    fn send_pass(
        &mut self,
        mem: &GuestMemoryMmap,
        pages: &DirtyPages,
        base: Option<&mut DeltaBase>,
        input: Option<&Arc<InputPieces>>,
    ) -> Result<PassStats, ProtocolError> {
        self.check_started("memory")?;
        let mut pass = PassStats {
            iteration: self.iteration,
            ..PassStats::default()
        };
        let mut frames = FrameCutter::new(pages, self.options.batch_pages);
        let mut lanes = Vec::new();
        match (self.pool.take(), base) {
            (Some(mut pool), Some(base)) if pool.serves(mem, &base.mem) => {
                lanes = vec![LaneDigest::default(); pool.lanes()];
                let sent = self.send_pages_pooled(
                    &mut pool,
                    &mut frames,
                    (base, input),
                    &mut pass,
                    &mut lanes,
                );
                if sent.is_err() {
                    pool.drain();
                }
                self.pool = Some(pool);
                sent?;
            }
            (pool, base) => {
                self.pool = pool;
                let mut job = std::mem::take(&mut self.job);
                let sent =
                    self.send_pages_alone(&mut job, mem, &mut frames, (base, input), &mut pass);
                self.job = job;
                sent?;
            }
        }
        let mut done = Vec::with_capacity(16 + 8 * lanes.len());
        done.extend_from_slice(&self.iteration.to_le_bytes());
        done.extend_from_slice(&(lanes.len() as u32).to_le_bytes());
        done.extend_from_slice(&pass.pages.to_le_bytes());
        for lane in &lanes {
            let lane = lane.finish();
            done.extend_from_slice(&lane.frames.to_le_bytes());
            done.extend_from_slice(&lane.digest.to_le_bytes());
        }
        let before = self.stats.bytes;
        self.send_small(FrameType::MemoryDone, &done)?;
        pass.wire_bytes += self.stats.bytes - before;
        self.stats.iterations += 1;
        self.iteration = self.iteration.wrapping_add(1);
        Ok(pass)
    }

    /// The page frames of a pass, encoded and written on this thread (`base`: as deltas).
    fn send_pages_alone(
        &mut self,
        job: &mut EncodeJob,
        mem: &GuestMemoryMmap,
        frames: &mut FrameCutter<'_>,
        (mut base, input): (Option<&mut DeltaBase>, Option<&Arc<InputPieces>>),
        pass: &mut PassStats,
    ) -> Result<(), ProtocolError> {
        loop {
            job.count = frames.next_frame(&mut job.chunks);
            if job.count == 0 {
                return Ok(());
            }
            let view = base.as_deref_mut().map(|base| {
                base.record(&job.chunks, &mut job.known);
                DeltaView {
                    mem: &base.mem,
                    known: &job.known,
                    input: input.map(|i| &**i),
                }
            });
            let in_place = self.pages_in_place && view.is_some();
            let encoded = self.encoder.encode(
                &mut job.frame,
                mem,
                (&job.chunks, job.count),
                view,
                in_place,
            )?;
            if encoded.in_place {
                std::mem::swap(&mut self.encoder.layout, &mut job.layout);
                let written = self.write_in_place((&mut job.frame, &job.layout), &encoded, pass);
                std::mem::swap(&mut self.encoder.layout, &mut job.layout);
                written?;
            } else {
                self.write_encoded(&mut job.frame, &encoded, pass)?;
            }
            self.send_interleaved()?;
        }
    }

    /// The page frames of a delta pass, encoded by `pool` and written here in the order
    /// they were cut (or by the pool's threads to their data streams: `lanes` counts them
    /// per stream).
    fn send_pages_pooled(
        &mut self,
        pool: &mut EncodePool,
        frames: &mut FrameCutter<'_>,
        (base, input): (&mut DeltaBase, Option<&Arc<InputPieces>>),
        pass: &mut PassStats,
        lanes: &mut [LaneDigest],
    ) -> Result<(), ProtocolError> {
        let mut cut_all = false;
        loop {
            while !cut_all && pool.in_flight() < pool.window() {
                let mut job = pool.job();
                job.count = frames.next_frame(&mut job.chunks);
                if job.count == 0 {
                    pool.give_back(job);
                    cut_all = true;
                    break;
                }
                base.record(&job.chunks, &mut job.known);
                job.input = input.cloned();
                job.in_place = self.pages_in_place;
                pool.submit(job)?;
            }
            if pool.in_flight() == 0 {
                return Ok(());
            }
            let mut done = pool.next_done()?;
            let written = done.result.and_then(|e| match done.written {
                Some(lane) => {
                    let total = lane.len;
                    if let Some(digest) = lanes.get_mut(lane.index) {
                        digest.add(lane.crc);
                    }
                    self.count_frame(&e, total, pass);
                    Ok(())
                }
                None if e.in_place => {
                    let job = &mut done.job;
                    self.write_in_place((&mut job.frame, &job.layout), &e, pass)
                }
                None => self.write_encoded(&mut done.job.frame, &e, pass),
            });
            pool.give_back(done.job);
            written?;
            self.send_interleaved()?;
        }
    }

    /// Seals (header with this stream's sequence number, checksum) and writes a frame
    /// [`PageEncoder::encode`] assembled in `frame`.
    fn write_encoded(
        &mut self,
        frame: &mut [u8],
        encoded: &EncodedFrame,
        pass: &mut PassStats,
    ) -> Result<(), ProtocolError> {
        let (total, _) = seal_encoded(frame, encoded, self.seq);
        if let Err(e) = self.stream.write_all(&frame[..total]) {
            return Err(self.write_failed(e));
        }
        self.seq = self.seq.wrapping_add(1);
        self.count_frame(encoded, total, pass);
        Ok(())
    }

    /// [`write_in_place`] on this stream, counted.
    fn write_in_place(
        &mut self,
        frame: (&mut [u8], &[DataPiece]),
        encoded: &EncodedFrame,
        pass: &mut PassStats,
    ) -> Result<(), ProtocolError> {
        // SAFETY: the pages were read in this pass, which `send_pages_in_place`'s caller
        // promised leaves them unchanged; the memory outlives the pass.
        let written = unsafe { write_in_place(&mut self.stream, frame, encoded, self.seq) };
        let total = match written {
            Ok((total, _)) => total,
            Err(e) => return Err(self.write_failed(e)),
        };
        self.seq = self.seq.wrapping_add(1);
        self.count_frame(encoded, total, pass);
        Ok(())
    }

    /// Counts a page frame of `total` bytes that left (on this stream or a data stream).
    fn count_frame(&mut self, encoded: &EncodedFrame, total: usize, pass: &mut PassStats) {
        self.stats.frames += 1;
        self.stats.bytes += total as u64;
        self.stats.pages += encoded.pages as u64;
        self.stats.zero_pages += encoded.zero;
        self.stats.delta_pages += encoded.deltas - encoded.inputs;
        self.stats.input_pages += encoded.inputs;
        self.stats.page_data_bytes += encoded.data_raw as u64;
        self.stats.page_wire_bytes += encoded.data_sent as u64;
        if encoded.flags & FLAG_LZ4 != 0 {
            self.stats.compressed_frames += 1;
        }
        if let Some(progress) = &self.progress {
            progress.sent(encoded.pages as u64, total as u64);
        }
        pass.pages += encoded.pages as u64;
        pass.zero_pages += encoded.zero;
        pass.wire_bytes += total as u64;
    }

    /// Sends one frame of a kind without its own method (fault tolerance's DiskWrites and
    /// Control).
    pub fn send_frame(&mut self, kind: FrameType, payload: &[u8]) -> Result<(), ProtocolError> {
        self.check_started("frames")?;
        self.send_small(kind, payload)
    }

    /// [`Sender::send_frame`] with the payload in `parts`, written as they are (vectored: no
    /// frame buffer; fault tolerance's input frames, each the bytes of a frame the guest
    /// received, would otherwise be copied into one first).
    pub fn send_frame_parts(
        &mut self,
        kind: FrameType,
        parts: &[&[u8]],
    ) -> Result<(), ProtocolError> {
        self.check_started("frames")?;
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        if payload_len > MAX_FRAME_PAYLOAD {
            return Err(ProtocolError::Io(payload_too_large(kind, payload_len)));
        }
        let flags = self.unchecked();
        let mut header = [0u8; HEADER_LEN];
        write_header(&mut header, kind, flags, self.seq, payload_len);
        let crc = if flags & FLAG_UNCHECKED != 0 {
            0
        } else {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&header);
            parts.iter().for_each(|p| hasher.update(p));
            hasher.finalize()
        };
        let trailer = crc.to_le_bytes();
        let mut slices = Vec::with_capacity(parts.len() + 2);
        slices.push(IoSlice::new(&header));
        slices.extend(
            parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| IoSlice::new(p)),
        );
        slices.push(IoSlice::new(&trailer));
        let written =
            write_all_vectored(&mut self.stream, &mut slices).and_then(|()| self.stream.flush());
        if let Err(e) = written {
            return Err(self.write_failed(e));
        }
        let len = (HEADER_LEN + payload_len + TRAILER_LEN) as u64;
        self.seq = self.seq.wrapping_add(1);
        self.stats.frames += 1;
        self.stats.bytes += len;
        if let Some(progress) = &self.progress {
            progress.sent_bytes(len);
        }
        Ok(())
    }

    /// Sends the VM state (after the last memory pass of an epoch or migration).
    pub fn send_state<S: Serialize>(&mut self, state: &S) -> Result<(), ProtocolError> {
        self.check_started("state")?;
        let encoded = encode_state(state)?;
        // Fault tolerance sends the state every epoch: about 11 KiB that LZ4 shrinks several
        // times over.
        if self.options.compress {
            let packed = lz4_flex::block::compress_prepend_size(&encoded);
            if packed.len() < encoded.len() {
                let flags = FLAG_LZ4 | self.unchecked();
                return match write_small_flagged(
                    (&mut self.stream, &mut self.small_frame),
                    &mut self.seq,
                    &mut self.stats,
                    (FrameType::State, flags),
                    &mut |b| b.extend_from_slice(&packed),
                ) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(self.write_failed(e)),
                };
            }
        }
        self.send_small(FrameType::State, &encoded)
    }

    /// Closes the epoch / migration; the receiver answers with Ack or Error.
    pub fn send_complete(&mut self) -> Result<(), ProtocolError> {
        self.check_started("Complete")?;
        self.send_small(FrameType::Complete, &[])
    }

    /// Tells the receiver to drop everything (best effort; the error is returned).
    pub fn abort(&mut self, message: &str) -> Result<(), ProtocolError> {
        let cut = message.as_bytes();
        self.send_small(FrameType::Abort, &cut[..cut.len().min(MAX_MESSAGE)])
    }

    /// Waits for the receiver's verdict on the last Complete.
    pub fn recv_ack(&mut self) -> Result<(), ProtocolError> {
        let frame = self.reader.read_frame(&mut self.stream)?;
        let (kind, len) = (frame.kind, frame.payload.len());
        let msg = Message::parse(&frame)?;
        self.stats.bytes += (HEADER_LEN + len + TRAILER_LEN) as u64;
        match msg {
            Message::Ack => Ok(()),
            Message::Error { message } => Err(ProtocolError::Remote(message)),
            _ => Err(ProtocolError::UnexpectedFrame {
                got: kind,
                state: "while waiting for Ack",
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecvPhase {
    AwaitHello,
    Memory,
    AwaitComplete,
    Failed,
}

/// The receiving side: the migration destination, or the FT backup.
pub struct Receiver<T: Read + Write> {
    stream: T,
    reader: FrameReader,
    seq: u32,
    phase: RecvPhase,
    iteration: u32,
    pass_pages: u64,
    stats: TransferStats,
    /// Decompressed page data of one frame.
    scratch: Vec<u8>,
    /// One destination page read back to see whether a zero page needs writing.
    probe: Vec<u8>,
}

impl<T: Read + Write> Receiver<T> {
    pub fn new(stream: T) -> Self {
        Self {
            stream,
            reader: FrameReader::new(),
            seq: 0,
            phase: RecvPhase::AwaitHello,
            iteration: 0,
            pass_pages: 0,
            stats: TransferStats::default(),
            scratch: Vec::new(),
            probe: vec![0; PAGE_SIZE],
        }
    }

    pub fn stats(&self) -> TransferStats {
        self.stats
    }

    /// See [`FrameReader::set_authenticated`]: whether the stream authenticates every byte,
    /// so that its sender may leave checksums out.
    pub fn set_authenticated(&mut self, authenticated: bool) {
        self.reader.set_authenticated(authenticated);
    }

    pub fn get_ref(&self) -> &T {
        &self.stream
    }

    pub fn into_inner(self) -> T {
        self.stream
    }

    /// The stream with the frame reader and the sequence of this side's frames, for a
    /// protocol that goes on with frames of its own after Hello (fault tolerance).
    pub fn into_parts(self) -> (T, FrameReader, u32, TransferStats) {
        (self.stream, self.reader, self.seq, self.stats)
    }

    /// Reports `message` to the sender (e.g. the VM could not be created or restored).
    pub fn send_error(&mut self, message: &str) -> Result<(), ProtocolError> {
        let cut = message.as_bytes();
        write_small(
            &mut self.stream,
            &mut self.seq,
            &mut self.stats,
            FrameType::Error,
            &cut[..cut.len().min(MAX_MESSAGE)],
        )?;
        Ok(())
    }

    /// Acknowledges the epoch / migration received by the last [`Receiver::recv_state`]:
    /// call it once the state is safely applied (or held).
    pub fn send_ack(&mut self) -> Result<(), ProtocolError> {
        write_small(
            &mut self.stream,
            &mut self.seq,
            &mut self.stats,
            FrameType::Ack,
            &[],
        )?;
        Ok(())
    }

    /// On a protocol error, tell the sender why (best effort) and refuse further frames.
    fn fail(&mut self, e: ProtocolError) -> ProtocolError {
        self.phase = RecvPhase::Failed;
        if e.worth_reporting() {
            let _ = self.send_error(&e.to_string());
        }
        e
    }

    /// Waits for Hello and returns the VM configuration it carries.
    pub fn recv_hello(&mut self) -> Result<VmConfig, ProtocolError> {
        self.recv_hello_inner().map_err(|e| self.fail(e))
    }

    fn recv_hello_inner(&mut self) -> Result<VmConfig, ProtocolError> {
        if self.phase != RecvPhase::AwaitHello {
            return Err(ProtocolError::UnexpectedFrame {
                got: FrameType::Hello,
                state: "(Hello already received)",
            });
        }
        let frame = self.reader.read_frame(&mut self.stream)?;
        self.stats.frames += 1;
        self.stats.bytes += (HEADER_LEN + frame.payload.len() + TRAILER_LEN) as u64;
        let kind = frame.kind;
        match Message::parse(&frame)? {
            Message::Hello {
                version,
                page_size,
                config_json,
            } => {
                if version != PROTOCOL_VERSION {
                    return Err(ProtocolError::Version(version));
                }
                if page_size as usize != PAGE_SIZE {
                    return Err(ProtocolError::PageSize(page_size));
                }
                let config = serde_json::from_slice(config_json).map_err(ProtocolError::Config)?;
                self.phase = RecvPhase::Memory;
                Ok(config)
            }
            Message::Abort { message } => Err(ProtocolError::Aborted(message)),
            _ => Err(ProtocolError::UnexpectedFrame {
                got: kind,
                state: "before Hello",
            }),
        }
    }

    /// Receives one epoch (or the whole migration after Hello): memory passes written into
    /// `mem` through `vm-memory`, then the state, then Complete. Returns the state; answer
    /// with [`Receiver::send_ack`] or [`Receiver::send_error`]. Can be called again for the
    /// next epoch.
    pub fn recv_state<S: DeserializeOwned>(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<S, ProtocolError> {
        self.recv_state_inner(mem).map_err(|e| self.fail(e))
    }

    fn recv_state_inner<S: DeserializeOwned>(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<S, ProtocolError> {
        match self.phase {
            RecvPhase::Memory => {}
            RecvPhase::AwaitHello => return Err(ProtocolError::NotStarted("memory or state")),
            RecvPhase::AwaitComplete | RecvPhase::Failed => return Err(ProtocolError::Failed),
        }
        let mut state: Option<S> = None;
        loop {
            let frame = self.reader.read_frame(&mut self.stream)?;
            self.stats.frames += 1;
            self.stats.bytes += (HEADER_LEN + frame.payload.len() + TRAILER_LEN) as u64;
            let kind = frame.kind;
            let msg = Message::parse(&frame)?;
            match (self.phase, msg) {
                (_, Message::Abort { message }) => return Err(ProtocolError::Aborted(message)),
                (RecvPhase::Memory, Message::MemoryPages(batch)) => {
                    apply_pages(
                        mem,
                        &batch,
                        &mut self.scratch,
                        &mut self.probe,
                        &mut self.stats,
                    )?;
                    self.pass_pages += batch.len() as u64;
                }
                (
                    RecvPhase::Memory,
                    Message::MemoryDone {
                        iteration,
                        pages,
                        lanes,
                    },
                ) => {
                    if !lanes.is_empty() {
                        return Err(ProtocolError::malformed(
                            kind,
                            "data streams are fault tolerance's; a migration has one stream",
                        ));
                    }
                    if iteration != self.iteration {
                        return Err(ProtocolError::Iteration {
                            expected: self.iteration,
                            got: iteration,
                        });
                    }
                    if pages != self.pass_pages {
                        return Err(ProtocolError::PageCount {
                            iteration,
                            sent: pages,
                            received: self.pass_pages,
                        });
                    }
                    self.pass_pages = 0;
                    self.iteration = self.iteration.wrapping_add(1);
                    self.stats.iterations += 1;
                }
                (
                    RecvPhase::Memory,
                    Message::State {
                        state: encoded,
                        compressed,
                    },
                ) => {
                    if self.pass_pages != 0 {
                        return Err(ProtocolError::UnexpectedFrame {
                            got: kind,
                            state: "in the middle of a memory pass (no MemoryDone)",
                        });
                    }
                    let bytes = Message::state_bytes(encoded, compressed)?;
                    state = Some(decode_state(&bytes)?);
                    self.phase = RecvPhase::AwaitComplete;
                }
                (RecvPhase::AwaitComplete, Message::Complete) => {
                    self.phase = RecvPhase::Memory;
                    return state.ok_or(ProtocolError::UnexpectedFrame {
                        got: kind,
                        state: "before State",
                    });
                }
                (RecvPhase::Memory, _) => {
                    return Err(ProtocolError::UnexpectedFrame {
                        got: kind,
                        state: "during the memory/state phase",
                    })
                }
                (_, _) => {
                    return Err(ProtocolError::UnexpectedFrame {
                        got: kind,
                        state: "after State (expected Complete)",
                    })
                }
            }
        }
    }
}

/// Writes one frame's pages into `mem`. Every address is checked first, so a bad frame
/// writes nothing. Consecutive data pages are written with one call; a zero page is
/// written only if the destination is not already zero (fresh guest memory stays
/// unpopulated). `probe` is a page-sized buffer. A page built from input frames is refused
/// (see [`apply_pages_with_input`]).
pub fn apply_pages(
    mem: &GuestMemoryMmap,
    batch: &PageBatch<'_>,
    scratch: &mut Vec<u8>,
    probe: &mut [u8],
    stats: &mut TransferStats,
) -> Result<(), ProtocolError> {
    apply_pages_with_input(mem, batch, None, scratch, probe, stats)
}

/// [`apply_pages`] on a stream whose pages may lay the input frames `input` holds over the
/// receiver's copy (fault tolerance's backup).
pub fn apply_pages_with_input(
    mem: &GuestMemoryMmap,
    batch: &PageBatch<'_>,
    input: Option<&dyn InputFrameSource>,
    scratch: &mut Vec<u8>,
    probe: &mut [u8],
    stats: &mut TransferStats,
) -> Result<(), ProtocolError> {
    for (gpa, _) in batch.entries() {
        let inside = mem
            .find_region(gpa)
            .is_some_and(|r| gpa.0 - r.start_addr().0 + PAGE_SIZE as u64 <= r.len());
        if !inside {
            return Err(ProtocolError::GuestMemory {
                gpa: gpa.0,
                reason: "outside guest memory".to_string(),
            });
        }
    }
    let wire = batch.data.len();
    let data = batch.raw_data(scratch)?;
    if batch.is_delta() {
        if input.is_none() && batch.kinds().any(|(_, kind)| kind == PageKind::Input) {
            return Err(ProtocolError::malformed(
                FrameType::MemoryPages,
                "a page built from input frames, on a stream that carries none",
            ));
        }
        // Checked whole before the first write: a bad record writes nothing.
        check_records(batch.entries, data, input)?;
    }
    let write = |from: usize, to: usize, gpa: u64| {
        mem.write_slice(&data[from..to], GuestAddress(gpa))
            .map_err(|e| ProtocolError::GuestMemory {
                gpa,
                reason: e.to_string(),
            })
    };
    // A run of consecutive data pages: (first gpa, data offset, length).
    let mut run: Option<(u64, usize, usize)> = None;
    let mut at = 0usize;
    let mut zero = 0u64;
    let mut deltas = 0u64;
    let mut inputs = 0u64;
    for (gpa, kind) in batch.kinds() {
        if kind == PageKind::Input {
            let Some(source) = input else {
                return Err(ProtocolError::malformed(
                    FrameType::MemoryPages,
                    "a page built from input frames, on a stream that carries none",
                ));
            };
            inputs += 1;
            if let Some((g, from, len)) = run.take() {
                write(from, from + len, g)?;
            }
            let bad = |reason: String| ProtocolError::GuestMemory { gpa: gpa.0, reason };
            let (pieces, body, next) = input_record(data, at).map_err(bad)?;
            at = next;
            if body.is_empty() {
                // Most receive buffers: the pieces go where they lie, with no read and
                // write back of the whole page around them.
                for piece in &pieces {
                    let bytes = piece.bytes(source).map_err(bad)?;
                    let to = gpa.0 + u64::from(piece.page_offset);
                    mem.write_slice(bytes, GuestAddress(to))
                        .map_err(|e| bad(e.to_string()))?;
                }
                continue;
            }
            mem.read_slice(probe, gpa).map_err(|e| bad(e.to_string()))?;
            for piece in &pieces {
                let bytes = piece.bytes(source).map_err(bad)?;
                let to = usize::from(piece.page_offset);
                probe[to..to + bytes.len()].copy_from_slice(bytes);
            }
            apply_delta(probe, body).map_err(bad)?;
            mem.write_slice(probe, gpa)
                .map_err(|e| bad(e.to_string()))?;
            continue;
        }
        if kind == PageKind::Delta {
            deltas += 1;
            if let Some((g, from, len)) = run.take() {
                write(from, from + len, g)?;
            }
            let (body, next) = delta_record(data, at)
                .map_err(|reason| ProtocolError::GuestMemory { gpa: gpa.0, reason })?;
            at = next;
            if body.is_empty() {
                continue;
            }
            let guest = |e: vm_memory::GuestMemoryError| ProtocolError::GuestMemory {
                gpa: gpa.0,
                reason: e.to_string(),
            };
            mem.read_slice(probe, gpa).map_err(guest)?;
            apply_delta(probe, body)
                .map_err(|reason| ProtocolError::GuestMemory { gpa: gpa.0, reason })?;
            mem.write_slice(probe, gpa).map_err(guest)?;
            continue;
        }
        if kind == PageKind::Zero {
            zero += 1;
            if let Some((g, from, len)) = run.take() {
                write(from, from + len, g)?;
            }
            mem.read_slice(probe, gpa)
                .map_err(|e| ProtocolError::GuestMemory {
                    gpa: gpa.0,
                    reason: e.to_string(),
                })?;
            if !is_zero(probe) {
                mem.write_slice(&ZERO_PAGE, gpa)
                    .map_err(|e| ProtocolError::GuestMemory {
                        gpa: gpa.0,
                        reason: e.to_string(),
                    })?;
            }
            continue;
        }
        run = match run {
            Some((g, from, len)) if g + len as u64 == gpa.0 => Some((g, from, len + PAGE_SIZE)),
            Some((g, from, len)) => {
                write(from, from + len, g)?;
                Some((gpa.0, at, PAGE_SIZE))
            }
            None => Some((gpa.0, at, PAGE_SIZE)),
        };
        at += PAGE_SIZE;
    }
    if let Some((g, from, len)) = run {
        write(from, from + len, g)?;
    }
    stats.pages += batch.len() as u64;
    stats.zero_pages += zero;
    stats.delta_pages += deltas;
    stats.input_pages += inputs;
    stats.page_data_bytes += data.len() as u64;
    stats.page_wire_bytes += wire as u64;
    if batch.is_compressed() {
        stats.compressed_frames += 1;
    }
    Ok(())
}
