//! Assembling MemoryPages frames: on the sending thread, or on a pool of encoder threads
//! while the sender writes (fault tolerance's pipeline: reading the staging copy, diffing
//! against the backup's copy, LZ4 and the checksum are the per-byte work of an epoch; the
//! sender only adds a header and writes).
//!
//! With data streams (FT's several TCP streams) each encoder thread owns one and writes its
//! frames itself, sealed with that stream's sequence numbers; the sender then only counts
//! them (MemoryDone says how many each stream carried in the pass).
//!
//! Both paths produce the same bytes: a frame is a function of its pages, the staging
//! memory, the base (the receiver's copy) and which of its pages the base knows. The pages
//! of one pass are distinct, so encoders never touch the same page of the base.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc;
use std::thread::JoinHandle;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::input_pieces::{InputPieces, PayloadCursor};
use super::memory::{is_zero, PAGE_SIZE};
use super::protocol::{
    encode_delta, seal_encoded, write_in_place, ProtocolError, DELTA_LEN_BYTES, DELTA_PAGE_BIT,
    ENTRY_LEN, FLAG_DELTA, FLAG_LZ4, FLAG_UNCHECKED, HEADER_LEN, INPUT_PAGE_BIT, INPUT_PIECE_LEN,
    MAX_INPUT_PIECES, PAGES_HEADER_LEN, TRAILER_LEN, ZERO_PAGE, ZERO_PAGE_BIT,
};
use crate::memory::GuestMemoryMmap;

/// The receiver's copy of memory, for a delta frame: where it is and, per page of the frame
/// in order, whether the receiver has it (a page it never had is sent whole).
pub(super) struct DeltaView<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub known: &'a [bool],
    /// The input frames the receiver holds that landed in this pass's pages.
    pub input: Option<&'a InputPieces>,
}

/// What [`PageEncoder::encode`] assembled: the payload starts at `HEADER_LEN` of the frame
/// buffer; header and trailer are the sender's (they carry its sequence number).
#[derive(Clone)]
pub(super) struct EncodedFrame {
    pub payload_len: usize,
    pub flags: u8,
    pub pages: usize,
    pub zero: u64,
    pub deltas: u64,
    /// Of the deltas, those laid over input frames.
    pub inputs: u64,
    /// Page data (or delta records) before LZ4, and as sent.
    pub data_raw: usize,
    pub data_sent: usize,
    /// CRC-32 state over the payload, combined with the header's by the sender.
    pub payload_crc: crc32fast::Hasher,
    /// The page data is not in the frame buffer but in [`PageEncoder::layout`]: records in
    /// the buffer, whole pages where they were read (see [`PageEncoder::encode`]).
    pub in_place: bool,
}

/// A run of a frame's page data as it is sent when whole pages are read in place: bytes of
/// the frame buffer (records) or of the memory the pages were read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DataPiece {
    Frame { from: usize, to: usize },
    Memory { addr: usize, len: usize },
}

impl DataPiece {
    /// The piece's bytes (of `frame` for a run of the frame buffer).
    ///
    /// # Safety
    /// A memory piece's bytes must still be mapped and unchanged since the frame was encoded
    /// (the caller of [`PageEncoder::encode`] in place promised it for the pass).
    pub(super) unsafe fn bytes(self, frame: &[u8]) -> &[u8] {
        match self {
            DataPiece::Frame { from, to } => &frame[from..to],
            // SAFETY: `len` bytes of guest memory at `addr` that vm-memory handed out when
            // the frame was encoded; the caller vouches they are mapped and unchanged.
            DataPiece::Memory { addr, len } => unsafe {
                std::slice::from_raw_parts(addr as *const u8, len)
            },
        }
    }
}

/// Appends a run to a frame's layout, joined to the last one where it goes on from it.
fn push_piece(layout: &mut Vec<DataPiece>, piece: DataPiece) {
    match (layout.last_mut(), piece) {
        (Some(DataPiece::Frame { to, .. }), DataPiece::Frame { from, to: end }) if *to == from => {
            *to = end;
        }
        (
            Some(DataPiece::Memory { addr, len }),
            DataPiece::Memory {
                addr: at,
                len: more,
            },
        ) if *addr + *len == at => {
            *len += more;
        }
        _ => layout.push(piece),
    }
}

/// Scratch buffers for assembling frames; one per thread that encodes.
pub(super) struct PageEncoder {
    compress: bool,
    /// Compute the payload's CRC (off: the frame goes unchecked on an authenticated stream).
    checksum: bool,
    packed: Vec<u8>,
    delta: Vec<u8>,
    /// The receiver's copy of a page with input frames laid over it, and their records.
    overlay: Vec<u8>,
    pieces: Vec<u8>,
    /// A second delta buffer, for comparing two encodings of a page.
    residual: Vec<u8>,
    /// Where the input payload the last page ended with goes on, and the page that may hold
    /// it (the guest's copies of what it received run across consecutive pages).
    payload_hint: Option<(u64, PayloadCursor)>,
    /// The page data of the last frame encoded in place, in order.
    pub(super) layout: Vec<DataPiece>,
}

impl PageEncoder {
    pub fn new(compress: bool, checksum: bool) -> Self {
        Self {
            compress,
            checksum,
            packed: Vec::new(),
            delta: vec![0; PAGE_SIZE],
            overlay: vec![0; PAGE_SIZE],
            residual: vec![0; PAGE_SIZE],
            pieces: vec![0; MAX_INPUT_PIECES * INPUT_PIECE_LEN],
            payload_hint: None,
            layout: Vec::new(),
        }
    }

    pub fn set_checksum(&mut self, checksum: bool) {
        self.checksum = checksum;
    }

    /// Assembles the MemoryPages payload of `count` pages (`chunks`: runs of pages) from
    /// `mem` into `frame` (grown as needed). With `delta`, a page the receiver knows goes as
    /// a delta against its copy when that is clearly smaller, and every page is recorded in
    /// that copy.
    ///
    /// `in_place` (without LZ4, which needs the data in one piece): a page that goes whole is
    /// not copied into `frame` but sent from `mem` (see [`PageEncoder::layout`]); the caller
    /// must then keep `mem`'s pages unchanged until the frame is written.
    pub fn encode(
        &mut self,
        frame: &mut Vec<u8>,
        mem: &GuestMemoryMmap,
        (chunks, count): (&[(u64, usize)], usize),
        delta: Option<DeltaView<'_>>,
        in_place: bool,
    ) -> Result<EncodedFrame, ProtocolError> {
        let in_place = in_place && !self.compress;
        self.layout.clear();
        let frame_len =
            HEADER_LEN + PAGES_HEADER_LEN + count * (ENTRY_LEN + PAGE_SIZE) + TRAILER_LEN;
        if frame.len() < frame_len {
            frame.resize(frame_len, 0);
        }
        let entries_at = HEADER_LEN + PAGES_HEADER_LEN;
        let data_at = entries_at + count * ENTRY_LEN;
        let mut end = data_at;
        let mut entry = entries_at;
        let mut zero = 0u64;
        let mut deltas = 0u64;
        let mut inputs = 0u64;
        let mut index = 0usize;
        // Page data (records and whole pages) so far: `end - data_at` unless in place.
        let mut data_len = 0usize;
        self.payload_hint = None;
        // A delta is sent only when it is clearly smaller than the page: beyond three quarters
        // of it, the page itself under the frame's LZ4 costs about as much on the wire, and
        // the encoder gives up early (pages rewritten whole cost little CPU).
        let budget = PAGE_SIZE * 3 / 4;
        for &(start, n) in chunks {
            let len = n * PAGE_SIZE;
            // The pages land past the records written so far (records never outgrow pages).
            let src0 = end;
            if !in_place {
                mem.read_slice(&mut frame[src0..src0 + len], GuestAddress(start))
                    .map_err(|e| ProtocolError::GuestMemory {
                        gpa: start,
                        reason: e.to_string(),
                    })?;
            }
            for i in 0..n {
                let gpa = GuestAddress(start + (i * PAGE_SIZE) as u64);
                let src = src0 + i * PAGE_SIZE;
                let page_err = |e: vm_memory::GuestMemoryError| ProtocolError::GuestMemory {
                    gpa: gpa.0,
                    reason: e.to_string(),
                };
                let base = delta
                    .as_ref()
                    .map(|d| (d.mem, d.known.get(index) == Some(&true)));
                let input = delta.as_ref().and_then(|d| d.input);
                index += 1;
                let new = if in_place {
                    page_in_place(mem, gpa).map_err(page_err)?
                } else {
                    &frame[src..src + PAGE_SIZE]
                };
                let new_addr = new.as_ptr() as usize;
                let value = if is_zero(new) {
                    zero += 1;
                    // A page never recorded is still zero in the base (fresh memory).
                    if let Some((base, true)) = base {
                        base.write_slice(&ZERO_PAGE, gpa).map_err(page_err)?;
                    }
                    gpa.0 | ZERO_PAGE_BIT
                } else {
                    let record = match base {
                        Some((base, true)) => {
                            let record = self
                                .page_record(base, input, gpa, new, budget)
                                .map_err(page_err)?;
                            // An empty delta: the copy holds this page already.
                            if record != Record::Delta(0) {
                                base.write_slice(new, gpa).map_err(page_err)?;
                            }
                            record
                        }
                        Some((base, false)) => {
                            base.write_slice(new, gpa).map_err(page_err)?;
                            Record::Whole
                        }
                        None => Record::Whole,
                    };
                    // A record is shorter than the page, which is used up by now:
                    // `end + record < src + PAGE_SIZE`.
                    let record_at = end;
                    let value = match record {
                        Record::Input(pieces, d) => {
                            frame[end] = pieces as u8;
                            let at = end + 1;
                            let len = pieces * INPUT_PIECE_LEN;
                            frame[at..at + len].copy_from_slice(&self.pieces[..len]);
                            let at = at + len;
                            frame[at..at + DELTA_LEN_BYTES]
                                .copy_from_slice(&(d as u16).to_le_bytes());
                            let body = at + DELTA_LEN_BYTES;
                            frame[body..body + d].copy_from_slice(&self.delta[..d]);
                            end = body + d;
                            deltas += 1;
                            inputs += 1;
                            gpa.0 | DELTA_PAGE_BIT | INPUT_PAGE_BIT
                        }
                        Record::Delta(d) => {
                            frame[end..end + DELTA_LEN_BYTES]
                                .copy_from_slice(&(d as u16).to_le_bytes());
                            let body = end + DELTA_LEN_BYTES;
                            frame[body..body + d].copy_from_slice(&self.delta[..d]);
                            end = body + d;
                            deltas += 1;
                            gpa.0 | DELTA_PAGE_BIT
                        }
                        Record::Whole if in_place => {
                            push_piece(
                                &mut self.layout,
                                DataPiece::Memory {
                                    addr: new_addr,
                                    len: PAGE_SIZE,
                                },
                            );
                            data_len += PAGE_SIZE;
                            gpa.0
                        }
                        Record::Whole => {
                            if end != src {
                                frame.copy_within(src..src + PAGE_SIZE, end);
                            }
                            end += PAGE_SIZE;
                            gpa.0
                        }
                    };
                    if end > record_at {
                        data_len += end - record_at;
                        if in_place {
                            let piece = DataPiece::Frame {
                                from: record_at,
                                to: end,
                            };
                            push_piece(&mut self.layout, piece);
                        }
                    }
                    value
                };
                frame[entry..entry + ENTRY_LEN].copy_from_slice(&value.to_le_bytes());
                entry += ENTRY_LEN;
            }
        }
        let data_raw = data_len;
        frame[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&(count as u32).to_le_bytes());
        // Without deltas the frame is a plain one (reserved word 0).
        let records = if deltas > 0 { data_raw as u32 } else { 0 };
        frame[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&records.to_le_bytes());
        let mut flags = if deltas > 0 { FLAG_DELTA } else { 0 };
        let mut data_sent = data_raw;
        if self.compress && data_raw > 0 {
            let max = lz4_flex::block::get_maximum_output_size(data_raw);
            if self.packed.len() < max {
                self.packed.resize(max, 0);
            }
            if let Ok(n) = lz4_flex::block::compress_into(&frame[data_at..end], &mut self.packed) {
                if n < data_raw {
                    frame[data_at..data_at + n].copy_from_slice(&self.packed[..n]);
                    end = data_at + n;
                    data_sent = n;
                    flags |= FLAG_LZ4;
                }
            }
        }
        let mut payload_crc = crc32fast::Hasher::new();
        if self.checksum && in_place {
            payload_crc.update(&frame[HEADER_LEN..data_at]);
            for piece in &self.layout {
                // SAFETY: the pages were read from `mem` just now, in this call, and the
                // caller keeps them unchanged (see `in_place`).
                payload_crc.update(unsafe { piece.bytes(frame) });
            }
        } else if self.checksum {
            payload_crc.update(&frame[HEADER_LEN..end]);
        } else {
            flags |= FLAG_UNCHECKED;
        }
        Ok(EncodedFrame {
            payload_len: data_at - HEADER_LEN + data_sent,
            flags,
            pages: count,
            zero,
            deltas,
            inputs,
            data_raw,
            data_sent,
            payload_crc,
            in_place,
        })
    }
}

/// A delta this short is sent as it is, without looking for input in the page.
const SMALL_DELTA: usize = 256;

/// How a page the receiver knows travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Record {
    Whole,
    /// A delta of this many bytes (in `PageEncoder::delta`) against the receiver's copy.
    Delta(usize),
    /// This many input pieces (in `PageEncoder::pieces`) laid over the receiver's copy, then
    /// a delta of this many bytes.
    Input(usize, usize),
}

impl PageEncoder {
    /// How `new`, the page at `gpa`, travels to a receiver whose copy `base` holds: as input
    /// frames laid over that copy plus a delta, or as a delta, when the record fits `budget`.
    fn page_record(
        &mut self,
        base: &GuestMemoryMmap,
        input: Option<&InputPieces>,
        gpa: GuestAddress,
        new: &[u8],
        budget: usize,
    ) -> Result<Record, vm_memory::GuestMemoryError> {
        if let Some(input) = input.filter(|i| i.touches(gpa.0)) {
            let overlay = &mut self.overlay[..PAGE_SIZE];
            let named = &mut self.pieces;
            let found = with_base_page(base, gpa, |old| {
                if old == new {
                    return Some(Record::Delta(0));
                }
                // Most receive buffers: the pieces alone, found by comparing.
                let exact = input
                    .name_exactly(gpa.0, old, new, named)
                    .filter(|&n| 1 + n * INPUT_PIECE_LEN + DELTA_LEN_BYTES < budget)
                    .map(|n| Record::Input(n, 0));
                if exact.is_none() {
                    overlay.copy_from_slice(old);
                }
                exact
            })?;
            if let Some(record) = found {
                return Ok(record);
            }
            let pieces = input.lay_over(gpa.0, overlay, &mut self.pieces);
            if let Some(record) = self.input_record(pieces, new, budget) {
                return Ok(record);
            }
        }
        let out = &mut self.delta[..budget];
        let delta = with_base_page(base, gpa, |old| encode_delta(old, new, out))?;
        let plain = delta.map_or(Record::Whole, Record::Delta);
        if delta.is_some_and(|d| d <= SMALL_DELTA) {
            return Ok(plain);
        }
        // Changed beyond a small delta: perhaps the guest's copy of input it received (in
        // part: a copy may start or end anywhere in the page).
        if let Some(input) = input.filter(|i| i.may_search()) {
            let hint = self
                .payload_hint
                .take()
                .filter(|&(next, _)| next == gpa.0)
                .map(|(_, cursor)| cursor);
            let overlay = &mut self.overlay[..PAGE_SIZE];
            with_base_page(base, gpa, |old| overlay.copy_from_slice(old))?;
            let (pieces, next) = input.lay_payload(new, hint, overlay, &mut self.pieces);
            self.payload_hint = next.map(|cursor| (gpa.0 + PAGE_SIZE as u64, cursor));
            // Only if no longer than the plain delta's record.
            let room = delta.map_or(budget, |d| d + DELTA_LEN_BYTES);
            if let Some(record) = self.input_record(pieces, new, room) {
                return Ok(record);
            }
        }
        Ok(plain)
    }

    /// The record of `pieces` input pieces (laid over `self.overlay`) and the delta from there
    /// to `new`, when it takes at most `room` bytes; the delta is then in `self.delta`.
    fn input_record(&mut self, pieces: usize, new: &[u8], room: usize) -> Option<Record> {
        let head = 1 + pieces * INPUT_PIECE_LEN + DELTA_LEN_BYTES;
        if pieces == 0 || head >= room {
            return None;
        }
        let d = encode_delta(
            &self.overlay[..PAGE_SIZE],
            new,
            &mut self.residual[..room - head],
        )?;
        std::mem::swap(&mut self.delta, &mut self.residual);
        Some(Record::Input(pieces, d))
    }
}

/// Runs `f` on the receiver's copy of the page at `gpa`, read where it lies (a copy out would
/// cost as much as the compare itself).
fn with_base_page<R>(
    base: &GuestMemoryMmap,
    gpa: GuestAddress,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, vm_memory::GuestMemoryError> {
    let slice = base.get_slice(gpa, PAGE_SIZE)?;
    let guard = slice.ptr_guard();
    // SAFETY: PAGE_SIZE bytes of a live mapping (vm-memory checked the range). Only encoders
    // write the receiver's copy, each only the pages of its own frame (a pass's pages are
    // distinct), and this one not while `f` reads.
    let page = unsafe { std::slice::from_raw_parts(guard.as_ptr(), PAGE_SIZE) };
    Ok(f(page))
}

/// The page of `mem` at `gpa`, where it lies (a frame encoded in place sends it from there).
fn page_in_place(
    mem: &GuestMemoryMmap,
    gpa: GuestAddress,
) -> Result<&[u8], vm_memory::GuestMemoryError> {
    let slice = mem.get_slice(gpa, PAGE_SIZE)?;
    let guard = slice.ptr_guard();
    // SAFETY: PAGE_SIZE bytes of a mapping vm-memory checked, which lives as long as `mem`
    // (its regions are unmapped only when the last handle goes). The caller of an in-place
    // encode keeps the pages unchanged while the frame is read.
    Ok(unsafe { std::slice::from_raw_parts(guard.as_ptr(), PAGE_SIZE) })
}

/// One frame's work (for a pool thread, its buffers come back with the result).
#[derive(Default)]
pub(super) struct EncodeJob {
    pub frame: Vec<u8>,
    pub chunks: Vec<(u64, usize)>,
    pub count: usize,
    pub known: Vec<bool>,
    /// The input frames the receiver holds (see [`InputPieces`]).
    pub input: Option<std::sync::Arc<InputPieces>>,
    /// Encode in place (see [`PageEncoder::encode`]); the frame's layout comes back here.
    pub in_place: bool,
    pub layout: Vec<DataPiece>,
}

pub(super) struct EncodeDone {
    pub job: EncodeJob,
    pub result: Result<EncodedFrame, ProtocolError>,
    /// Written by its thread to a data stream.
    pub written: Option<LaneWrite>,
}

/// A frame an encoder thread wrote to its data stream.
pub(super) struct LaneWrite {
    pub index: usize,
    pub len: usize,
    pub crc: u32,
}

/// A data stream an encoder thread writes its frames to, and the sequence number of its
/// next frame (the stream's first frames are its owner's, such as a join message).
pub struct Lane {
    pub out: Box<dyn Write + Send>,
    pub next_seq: u32,
}

impl Lane {
    /// Seals and writes a frame `encoded` in `frame` (in place: with its `layout`). After a
    /// failed write the stream is out of step, so every later frame fails too.
    fn write(
        &mut self,
        index: usize,
        (frame, layout): (&mut [u8], &[DataPiece]),
        encoded: &EncodedFrame,
        broken: &mut Option<String>,
    ) -> Result<LaneWrite, ProtocolError> {
        let failed = |reason: &str| ProtocolError::Lane {
            lane: index,
            reason: reason.to_string(),
        };
        if let Some(reason) = broken {
            return Err(failed(reason));
        }
        let written = if encoded.in_place {
            // SAFETY: the pages were read from staging just now, for a pass of a sender whose
            // owner promised staging stays unchanged while a pass runs.
            unsafe { write_in_place(&mut self.out, (frame, layout), encoded, self.next_seq) }
        } else {
            let (len, crc) = seal_encoded(frame, encoded, self.next_seq);
            self.out.write_all(&frame[..len]).map(|()| (len, crc))
        };
        let (len, crc) = match written {
            Ok(sealed) => sealed,
            Err(e) => {
                let reason = e.to_string();
                *broken = Some(reason.clone());
                return Err(failed(&reason));
            }
        };
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(LaneWrite { index, len, crc })
    }
}

struct Worker {
    jobs: Option<mpsc::Sender<EncodeJob>>,
    done: mpsc::Receiver<EncodeDone>,
    thread: Option<JoinHandle<()>>,
}

/// Encoder threads for the delta passes of one staging memory against one base (fault
/// tolerance: both live as long as the session). Frames are handed out round-robin and
/// taken back in the order they were submitted, so the stream's order does not depend on
/// which thread finished first.
pub struct EncodePool {
    workers: Vec<Worker>,
    /// Data streams (one per worker) or 0: the sender writes every frame.
    lanes: usize,
    next: usize,
    /// The worker of each frame in flight, oldest first.
    in_flight: VecDeque<usize>,
    spare: Vec<EncodeJob>,
    /// Host addresses of the first region of the staging memory and of the base: the pool
    /// serves only the pair it was built for.
    serves: (usize, usize),
}

fn first_region_addr(mem: &GuestMemoryMmap) -> usize {
    mem.iter().next().map_or(0, |r| r.as_ptr() as usize)
}

impl EncodePool {
    /// Starts `threads` encoders (at least one; with `lanes`, one per data stream, which it
    /// writes) reading `staging` and keeping `base` (the delta base's memory). `on_start`
    /// runs first on each thread (its seccomp filter); a thread for which it returns false
    /// ends, and the pass using it fails.
    pub(super) fn start(
        threads: usize,
        lanes: Vec<Lane>,
        staging: &GuestMemoryMmap,
        base: &GuestMemoryMmap,
        (compress, checksum): (bool, bool),
        on_start: impl Fn() -> bool + Clone + Send + 'static,
    ) -> std::io::Result<Self> {
        let lane_count = lanes.len();
        let mut lanes = lanes.into_iter();
        let threads = if lane_count > 0 {
            lane_count
        } else {
            threads.max(1)
        };
        let mut workers = Vec::new();
        for i in 0..threads {
            let (jobs, job_rx) = mpsc::channel::<EncodeJob>();
            let (done_tx, done) = mpsc::channel::<EncodeDone>();
            let (staging, base) = (staging.clone(), base.clone());
            let on_start = on_start.clone();
            let mut lane = lanes.next();
            let name = match lane {
                Some(_) => format!("ft-stream-{}", i + 1),
                None => format!("ft-encode-{i}"),
            };
            let thread = std::thread::Builder::new().name(name).spawn(move || {
                if !on_start() {
                    return;
                }
                let mut encoder = PageEncoder::new(compress, checksum);
                let mut broken = None;
                while let Ok(mut job) = job_rx.recv() {
                    let view = DeltaView {
                        mem: &base,
                        known: &job.known,
                        input: job.input.as_deref(),
                    };
                    let mut result = encoder.encode(
                        &mut job.frame,
                        &staging,
                        (&job.chunks, job.count),
                        Some(view),
                        job.in_place,
                    );
                    std::mem::swap(&mut encoder.layout, &mut job.layout);
                    let mut written = None;
                    if let (Ok(encoded), Some(lane)) = (&result, lane.as_mut()) {
                        let frame = (&mut job.frame[..], &job.layout[..]);
                        match lane.write(i, frame, encoded, &mut broken) {
                            Ok(w) => written = Some(w),
                            Err(e) => result = Err(e),
                        }
                    }
                    if done_tx
                        .send(EncodeDone {
                            job,
                            result,
                            written,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })?;
            workers.push(Worker {
                jobs: Some(jobs),
                done,
                thread: Some(thread),
            });
        }
        Ok(Self {
            workers,
            lanes: lane_count,
            next: 0,
            in_flight: VecDeque::new(),
            spare: Vec::new(),
            serves: (first_region_addr(staging), first_region_addr(base)),
        })
    }

    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Data streams its threads write (0: the sender writes the frames).
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// Whether this pool encodes from `staging` against `base`.
    pub(super) fn serves(&self, staging: &GuestMemoryMmap, base: &GuestMemoryMmap) -> bool {
        self.serves == (first_region_addr(staging), first_region_addr(base))
    }

    /// Frames in flight that keep every thread busy while the sender writes one.
    pub(super) fn window(&self) -> usize {
        2 * self.workers.len()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Empty buffers for the next frame.
    pub(super) fn job(&mut self) -> EncodeJob {
        let mut job = self.spare.pop().unwrap_or_default();
        job.chunks.clear();
        job.known.clear();
        job.count = 0;
        job
    }

    pub(super) fn give_back(&mut self, mut job: EncodeJob) {
        // The sender takes the frames back once a pass is over.
        job.input = None;
        self.spare.push(job);
    }

    pub(super) fn submit(&mut self, job: EncodeJob) -> Result<(), ProtocolError> {
        let index = self.next;
        self.next = (self.next + 1) % self.workers.len();
        let sent = self.workers[index]
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            return Err(ProtocolError::EncoderGone(index));
        }
        self.in_flight.push_back(index);
        Ok(())
    }

    /// The oldest frame in flight, once encoded.
    pub(super) fn next_done(&mut self) -> Result<EncodeDone, ProtocolError> {
        let Some(index) = self.in_flight.pop_front() else {
            return Err(ProtocolError::EncoderGone(usize::MAX));
        };
        self.workers[index]
            .done
            .recv()
            .map_err(|_| ProtocolError::EncoderGone(index))
    }

    /// Waits out the frames still in flight (after a failed pass), so the next pass starts
    /// in step.
    pub(super) fn drain(&mut self) {
        while !self.in_flight.is_empty() {
            match self.next_done() {
                Ok(done) => self.give_back(done.job),
                Err(_) => self.in_flight.clear(),
            }
        }
    }
}

impl Drop for EncodePool {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            // Closing the job channel ends the thread.
            worker.jobs = None;
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}
