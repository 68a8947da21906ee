//! Receive buffers named by the input frames the backup holds (fault tolerance, "TCP at full
//! speed"): what a page of them costs the sender to encode and the receiver to apply.
//!
//! Two cases, side by side in one run, the same frames in the same ring:
//! - **as received**: the guest leaves its receive buffers as the device filled them, the
//!   common case. The sender names each page's pieces by comparing them with the page and
//!   the receiver's copy (no copy of that page), and the receiver writes the pieces where
//!   they lie.
//! - **changed**: the guest changed one byte in every page after the device wrote it. The
//!   sender lays the pieces over a copy of the receiver's page and diffs the result (one
//!   run), and the receiver reads the page, lays the pieces and the run over it and writes it
//!   back: the path every receive buffer took before pages were named exactly.
//!
//! No guest and no KVM: an epoch is `--frames` frames of 64 KiB (a segment with receive
//! offloads) landing in 4 KiB buffers of a ring, encoded into memory as the FT sender encodes
//! a pass (`Sender::send_memory_delta_with_input`), then applied as the backup applies it.
//! Each part is timed alone, per page.
//!
//! Run: `cargo bench -p vmm --bench input_pages [-- --runs N --epochs N --frames N]`
//! (`ci/bench-ft` runs it unless `--no-pipeline`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::gate::LoggedFrame;
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{MemoryConfig, VmConfig};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::protocol::{
    apply_pages_with_input, DeltaBase, FrameReader, InputFrameSource, Message, ProtocolError,
    TransferStats,
};
use vmm::migration::{DirtyPages, InputPieces, Sender, PAGE_SIZE};

mod support;

const MEMORY: u64 = 64 << 20;
/// The receive ring: 4 KiB buffers from 8 MiB on.
const RING: u64 = 8 << 20;
const RING_BUFFERS: u64 = 1024;
/// A segment with receive offloads, its 12-byte virtio-net header included.
const FRAME_LEN: usize = 65_550;

#[derive(Clone, Copy, PartialEq)]
enum Case {
    AsReceived,
    Changed,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::AsReceived => "as received",
            Case::Changed => "changed",
        }
    }
}

/// The backup's input store: frames by seq.
#[derive(Default)]
struct Held(HashMap<u64, Vec<u8>>);

impl InputFrameSource for Held {
    fn input_frame(&self, seq: u64) -> Option<&[u8]> {
        self.0.get(&seq).map(Vec::as_slice)
    }
}

/// The sender's stream: what it wrote, taken after each pass (nothing comes back).
#[derive(Clone, Default)]
struct Wire(Rc<RefCell<Vec<u8>>>);

impl Wire {
    fn written(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Read for Wire {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }
}

/// Per page: (encode, apply) of every epoch.
#[derive(Default)]
struct Timings {
    encode: Vec<f64>,
    apply: Vec<f64>,
    wire_per_page: Vec<f64>,
}

struct Pair {
    src: GuestMemoryMmap,
    dst: GuestMemoryMmap,
    base: DeltaBase,
    sender: Sender<Wire>,
    wire: Wire,
    reader: FrameReader,
    next_buffer: u64,
    seq: u64,
    rng: u64,
}

impl Pair {
    fn new() -> Result<Self, String> {
        let create = || vmm::memory::create(MEMORY).map_err(|e| e.to_string());
        let (src, dst) = (create()?, create()?);
        let base = DeltaBase::new(create()?).map_err(|e| e.to_string())?;
        let wire = Wire::default();
        Ok(Self {
            src,
            dst,
            base,
            sender: Sender::new(wire.clone()),
            wire,
            reader: FrameReader::new(),
            next_buffer: 0,
            seq: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        })
    }

    fn random_frame(&mut self) -> Vec<u8> {
        (0..FRAME_LEN)
            .map(|_| {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                self.rng as u8
            })
            .collect()
    }

    /// One epoch of `frames` frames into the ring, sent and applied; per page timings.
    fn epoch(&mut self, case: Case, frames: usize, t: &mut Timings) -> Result<(), String> {
        let mut pieces = InputPieces::new(Arc::new(|| u64::MAX));
        let mut held = Held::default();
        let mut dirty = Vec::new();
        for _ in 0..frames {
            self.seq += 1;
            let data = self.random_frame();
            let mut placed = Vec::new();
            let mut done = 0;
            while done < data.len() {
                let at = RING + (self.next_buffer % RING_BUFFERS) * PAGE_SIZE as u64;
                self.next_buffer += 1;
                let take = (data.len() - done).min(PAGE_SIZE);
                self.src
                    .write_slice(&data[done..done + take], GuestAddress(at))
                    .map_err(|e| e.to_string())?;
                if case == Case::Changed {
                    let flipped = [data[done] ^ 0x5a];
                    self.src
                        .write_slice(&flipped, GuestAddress(at))
                        .map_err(|e| e.to_string())?;
                }
                placed.push((at, take as u32));
                dirty.push(GuestAddress(at));
                done += take;
            }
            held.0.insert(self.seq, data.clone());
            pieces.add(LoggedFrame {
                seq: self.seq,
                nic: 0,
                epoch: 1,
                data,
                placed,
            });
        }
        let (dirty, _) = DirtyPages::from_pages(&self.src, dirty).map_err(|e| e.to_string())?;
        let pages = dirty.count() as f64;
        let began = Instant::now();
        let pass = self
            .sender
            .send_memory_delta_with_input(&self.src, &dirty, &mut self.base, &Arc::new(pieces))
            .map_err(|e| e.to_string())?;
        t.encode.push(micros(began.elapsed()) / pages);
        t.wire_per_page.push(pass.wire_bytes as f64 / pages);
        let bytes = self.wire.written();
        let began = Instant::now();
        apply_all(&bytes, &mut self.reader, &self.dst, &held)?;
        t.apply.push(micros(began.elapsed()) / pages);
        Ok(())
    }
}

fn apply_all(
    bytes: &[u8],
    reader: &mut FrameReader,
    dst: &GuestMemoryMmap,
    held: &Held,
) -> Result<(), String> {
    let mut stream = std::io::Cursor::new(bytes);
    let mut scratch = Vec::new();
    let mut probe = vec![0u8; PAGE_SIZE];
    let mut stats = TransferStats::default();
    loop {
        let frame = match reader.read_frame(&mut stream) {
            Ok(frame) => frame,
            Err(ProtocolError::Closed) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        if let Message::MemoryPages(batch) = Message::parse(&frame).map_err(|e| e.to_string())? {
            apply_pages_with_input(
                dst,
                &batch,
                Some(held),
                &mut scratch,
                &mut probe,
                &mut stats,
            )
            .map_err(|e| e.to_string())?;
        }
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn config() -> VmConfig {
    VmConfig {
        memory: MemoryConfig::with_size(MEMORY),
        ..VmConfig::default()
    }
}

/// The receiver starts from the sender's memory, as after the first synchronisation.
fn synchronise(pair: &mut Pair) -> Result<(), String> {
    pair.sender
        .send_hello(&config())
        .map_err(|e| e.to_string())?;
    let all = DirtyPages::all(&pair.src).map_err(|e| e.to_string())?;
    pair.sender
        .send_memory_delta(&pair.src, &all, &mut pair.base)
        .map_err(|e| e.to_string())?;
    let bytes = pair.wire.written();
    apply_all(&bytes, &mut pair.reader, &pair.dst, &Held::default())
}

fn main() -> Result<(), String> {
    let flags = support::Flags::parse(&["--runs", "--epochs", "--frames"]);
    let runs = flags.count("--runs", 3, 5);
    let epochs = flags.count("--epochs", 20, 50);
    let frames = flags.number("--frames").unwrap_or(48) as usize;
    let cases = [Case::AsReceived, Case::Changed];
    let mut pairs = Vec::new();
    for _ in cases {
        let mut pair = Pair::new()?;
        synchronise(&mut pair)?;
        pairs.push(pair);
    }
    let mut timings: Vec<Timings> = cases.iter().map(|_| Timings::default()).collect();
    for run in 0..runs {
        // The cases take turns, the order rotating with the run.
        for turn in 0..cases.len() {
            let i = (turn + run as usize) % cases.len();
            for _ in 0..epochs {
                pairs[i].epoch(cases[i], frames, &mut timings[i])?;
            }
        }
    }
    for (pair, case) in pairs.iter().zip(cases) {
        // Checked once at the end: the receiver must hold what the sender does.
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        for page in 0..RING_BUFFERS {
            let gpa = GuestAddress(RING + page * PAGE_SIZE as u64);
            pair.src
                .read_slice(&mut a, gpa)
                .map_err(|e| e.to_string())?;
            pair.dst
                .read_slice(&mut b, gpa)
                .map_err(|e| e.to_string())?;
            if a != b {
                return Err(format!("{}: page {:#x} differs", case.name(), gpa.0));
            }
        }
    }
    println!(
        "input pages: {frames} frames of {FRAME_LEN} bytes per epoch, {epochs} epochs x {runs} runs per case ({})",
        support::machine()
    );
    println!("| case | encode us/page | apply us/page | wire B/page |");
    println!("| --- | ---: | ---: | ---: |");
    let medians: Vec<(f64, f64)> = timings
        .into_iter()
        .zip(cases)
        .map(|(t, case)| {
            let (e, a) = (support::median(t.encode), support::median(t.apply));
            let w = support::median(t.wire_per_page);
            println!("| {} | {e:.3} | {a:.3} | {w:.0} |", case.name());
            (e, a)
        })
        .collect();
    let (named, changed) = (medians[0], medians[1]);
    println!(
        "changed / as received: encode {:.2}x, apply {:.2}x, both {:.2}x",
        changed.0 / named.0,
        changed.1 / named.1,
        (changed.0 + changed.1) / (named.0 + named.1)
    );
    Ok(())
}
