//! The FT sender's ceiling: how many dirty pages per second one replication stream carries
//! when the sending thread encodes them alone (`--encode-threads 0`), when 1 or 2 encoder
//! threads do while it writes (`Sender::start_encode_pool`), and when 2 data streams beside
//! the first connection carry them, each encoded and written by its own thread
//! (`--streams 3`, `Sender::start_lanes`), side by side in one run.
//!
//! No guest and no KVM: an epoch is `--pages` pages of a 64 MiB memory rewritten in place
//! (every word, as the test guest's `ft` workload does; 64 bytes per page, a delta's case; or
//! with the bytes each held, as a receive buffer refilled with the same data), then sent as
//! the FT primary sends it (64-page frames, no LZ4 unless `--lz4 1`, deltas against the
//! backup's copy, the state, Complete) over loopback TCP to a receiver thread that applies it
//! and acknowledges, as the backup does (with data streams, a reader thread per stream applies
//! its frames and the receiver waits, at each MemoryDone, for the frames it names). Only the
//! send and the acknowledgement are timed.
//! Every case reads the pages where they lie and writes those that go whole from there, as
//! FT does (`Sender::send_pages_in_place`), except the first, which copies them into its
//! frames first (as the sender did before), for comparison.
//! The cases take turns within each run (the order rotating), so they see the same machine.
//!
//! Run: `cargo bench -p vmm --bench sender_pipeline [-- --runs N --epochs N --pages N --lz4 1]`
//! (`ci/bench-ft` runs it unless `--no-pipeline`).

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{MemoryConfig, VmConfig};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::protocol::{
    apply_pages, write_frame, DeltaBase, FrameReader, FrameType, Message, TransferStats,
};
use vmm::migration::{DirtyPages, Lane, Receiver, Sender, SenderOptions, PAGE_SIZE};

mod support;

const MEMORY: u64 = 64 << 20;

/// How a case encodes and sends each epoch's pages.
#[derive(Clone, Copy)]
enum Case {
    /// The sender alone (0) or with this many encoder threads.
    Threads(usize),
    /// The sender alone, writing whole pages from where they lie.
    InPlace,
    /// This many data streams beside the first connection.
    Lanes(usize),
}

const CASES: [Case; 5] = [
    Case::Threads(0),
    Case::InPlace,
    Case::Threads(1),
    Case::Threads(2),
    Case::Lanes(2),
];

impl Case {
    fn name(self) -> String {
        match self {
            Case::Threads(0) => "0, copying".into(),
            Case::InPlace => "0 (alone)".into(),
            Case::Threads(1) => "1 thread".into(),
            Case::Threads(n) => format!("{n} threads"),
            Case::Lanes(n) => format!("{} streams", n + 1),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    EveryWord,
    Bytes64,
    /// Dirty but rewritten with the bytes it held (a reused receive buffer filled with the
    /// same data, a guest storing what is already there).
    Same,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::EveryWord => "every word",
            Pattern::Bytes64 => "64 B/page",
            Pattern::Same => "same bytes",
        }
    }

    /// Rewrites page `page` for epoch `epoch`.
    fn rewrite(self, mem: &GuestMemoryMmap, page: u64, epoch: u64, buf: &mut [u8]) {
        let gpa = GuestAddress(page * PAGE_SIZE as u64);
        match self {
            Pattern::EveryWord => {
                for (i, word) in buf.chunks_exact_mut(8).enumerate() {
                    let v = (epoch << 40) ^ (page << 12) ^ (i as u64).wrapping_mul(0x9e37);
                    word.copy_from_slice(&v.to_le_bytes());
                }
                mem.write_slice(buf, gpa).expect("rewrite");
            }
            Pattern::Bytes64 => {
                let at = ((epoch * 64) % PAGE_SIZE as u64) as usize;
                let bytes: Vec<u8> = (0..64).map(|i| (epoch as u8) ^ i).collect();
                mem.write_slice(&bytes, GuestAddress(gpa.0 + at as u64))
                    .expect("rewrite");
            }
            Pattern::Same => {
                for (i, word) in buf.chunks_exact_mut(8).enumerate() {
                    let v = (page << 12) ^ (i as u64).wrapping_mul(0x9e37);
                    word.copy_from_slice(&v.to_le_bytes());
                }
                mem.write_slice(buf, gpa).expect("rewrite");
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct EpochState {
    epoch: u64,
}

struct Args {
    runs: usize,
    epochs: u64,
    pages: u64,
    /// LZ4 over each frame (`--lz4 1`; FT sends without by default, and pages then go
    /// whole in place only without it).
    lz4: bool,
}

fn args() -> Args {
    let flags = support::Flags::parse(&["--runs", "--epochs", "--pages", "--lz4"]);
    Args {
        runs: flags.count("--runs", 1, 3) as usize,
        epochs: flags.count("--epochs", 20, 40),
        pages: flags
            .number("--pages")
            .unwrap_or(4000)
            .clamp(1, MEMORY / PAGE_SIZE as u64),
        lz4: flags.number("--lz4").is_some_and(|n| n != 0),
    }
}

struct Sample {
    pages_per_s: f64,
    wire_mb_per_s: f64,
    bytes_per_page: f64,
    epoch_ms: f64,
}

/// The receiving side with data streams: a thread per stream applies its frames (the pages
/// of a pass are distinct) and counts them; the first connection's MemoryDone waits for the
/// frames it names, Complete is acknowledged.
fn receive_with_lanes(
    (mut main, mut reader, mut seq): (TcpStream, FrameReader, u32),
    lanes: Vec<TcpStream>,
) {
    let dst = vmm::memory::create(MEMORY).expect("memory");
    let applied: Vec<Arc<AtomicU64>> = lanes.iter().map(|_| Arc::default()).collect();
    for (mut lane, count) in lanes.into_iter().zip(applied.clone()) {
        let dst = dst.clone();
        std::thread::spawn(move || {
            let mut reader = FrameReader::new();
            let (mut scratch, mut probe) = (Vec::new(), vec![0; PAGE_SIZE]);
            let mut stats = TransferStats::default();
            while let Ok(frame) = reader.read_frame(&mut lane) {
                let Ok(Message::MemoryPages(batch)) = Message::parse(&frame) else {
                    return;
                };
                apply_pages(&dst, &batch, &mut scratch, &mut probe, &mut stats).expect("apply");
                count.fetch_add(1, Ordering::Release);
            }
        });
    }
    let (mut scratch, mut probe) = (Vec::new(), vec![0; PAGE_SIZE]);
    let mut stats = TransferStats::default();
    let mut named = vec![0u64; applied.len()];
    let mut write = main.try_clone().expect("clone");
    while let Ok(frame) = reader.read_frame(&mut main) {
        match Message::parse(&frame).expect("frame") {
            Message::MemoryPages(batch) => {
                apply_pages(&dst, &batch, &mut scratch, &mut probe, &mut stats).expect("apply");
            }
            Message::MemoryDone { lanes, .. } => {
                for ((lane, named), applied) in lanes.iter().zip(&mut named).zip(&applied) {
                    *named += u64::from(lane.frames);
                    while applied.load(Ordering::Acquire) < *named {
                        std::thread::yield_now();
                    }
                }
            }
            Message::Complete => {
                let mut stats = TransferStats::default();
                if write_frame(&mut write, &mut seq, &mut stats, FrameType::Ack, &[]).is_err() {
                    return;
                }
            }
            _ => {}
        }
    }
}

fn measure(pattern: Pattern, case: Case, args: &Args) -> Sample {
    let lanes = match case {
        Case::Lanes(n) => n,
        Case::Threads(_) | Case::InPlace => 0,
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("address");
    let receiver = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let mut r = Receiver::new(stream);
        r.recv_hello().expect("hello");
        let dst = vmm::memory::create(MEMORY).expect("memory");
        // The initial copy, on the first connection.
        if r.recv_state::<EpochState>(&dst).is_err() || r.send_ack().is_err() {
            return;
        }
        if lanes > 0 {
            let lane_streams = (0..lanes)
                .map(|_| listener.accept().expect("accept").0)
                .collect();
            let (stream, reader, seq, _) = r.into_parts();
            return receive_with_lanes((stream, reader, seq), lane_streams);
        }
        while r.recv_state::<EpochState>(&dst).is_ok() {
            if r.send_ack().is_err() {
                break;
            }
        }
    });
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut s = Sender::with_options(
        stream,
        SenderOptions {
            compress: args.lz4,
            batch_pages: 64,
            ..SenderOptions::default()
        },
    );
    let config = VmConfig {
        memory: MemoryConfig::with_size(MEMORY),
        ..VmConfig::default()
    };
    let src = vmm::memory::create(MEMORY).expect("memory");
    let mut buf = vec![0u8; PAGE_SIZE];
    let total_pages = MEMORY / PAGE_SIZE as u64;
    for page in 0..total_pages {
        Pattern::EveryWord.rewrite(&src, page, 0, &mut buf);
    }
    s.send_hello(&config).expect("hello");
    s.send_all_memory(&src).expect("initial copy");
    s.send_state(&EpochState { epoch: 0 }).expect("state");
    s.send_complete().expect("complete");
    s.recv_ack().expect("ack");
    let mut base = DeltaBase::new(vmm::memory::create(MEMORY).expect("memory")).expect("base");
    // Every case but the first reads pages in place, as FT does.
    if !matches!(case, Case::Threads(0)) {
        // SAFETY: `src` is rewritten only between passes, on this thread.
        unsafe { s.send_pages_in_place() };
    }
    match case {
        Case::Threads(0) | Case::InPlace => {}
        Case::Threads(n) => s
            .start_encode_pool(n, &src, &base, || true)
            .expect("encoder threads"),
        Case::Lanes(n) => {
            let lanes = (0..n)
                .map(|_| {
                    let lane = TcpStream::connect(addr).expect("connect");
                    lane.set_nodelay(true).expect("nodelay");
                    Lane {
                        out: Box::new(lane),
                        next_seq: 0,
                    }
                })
                .collect();
            s.start_lanes(lanes, &src, &base, || true)
                .expect("data streams");
        }
    }
    let mut busy = Duration::ZERO;
    let (mut pages, mut bytes) = (0u64, 0u64);
    for epoch in 1..=args.epochs {
        // Consecutive windows of memory, as the guest's dirty region is walked.
        let first = (epoch * args.pages) % total_pages;
        let dirty: Vec<GuestAddress> = (0..args.pages)
            .map(|i| GuestAddress(((first + i) % total_pages) * PAGE_SIZE as u64))
            .collect();
        for gpa in &dirty {
            pattern.rewrite(&src, gpa.0 / PAGE_SIZE as u64, epoch, &mut buf);
        }
        let (dirty, _) = DirtyPages::from_pages(&src, dirty).expect("dirty set");
        let before = s.stats().bytes;
        let start = Instant::now();
        s.send_memory_delta(&src, &dirty, &mut base).expect("epoch");
        s.send_state(&EpochState { epoch }).expect("state");
        s.send_complete().expect("complete");
        s.recv_ack().expect("ack");
        busy += start.elapsed();
        pages += dirty.count();
        bytes += s.stats().bytes - before;
    }
    drop(s);
    let _ = receiver.join();
    let secs = busy.as_secs_f64();
    Sample {
        pages_per_s: pages as f64 / secs,
        wire_mb_per_s: bytes as f64 / secs / 1e6,
        bytes_per_page: bytes as f64 / pages as f64,
        epoch_ms: secs * 1e3 / args.epochs as f64,
    }
}

fn main() {
    let args = args();
    println!(
        "FT sender pipeline: {} pages/epoch, {} epochs per case, {} run(s), median; loopback TCP, {} deltas, 64-page frames; {}; sender, encoders and the receiver share the cores",
        args.pages,
        args.epochs,
        args.runs,
        if args.lz4 { "LZ4 +" } else { "no LZ4," },
        support::machine()
    );
    println!();
    println!(
        "{:<11} | {:>14} | {:>10} | {:>11} | {:>9} | {:>12} | {:>16}",
        "pattern", "case", "Mpages/s", "wire MB/s", "B/page", "ms/epoch", "pages/s vs alone"
    );
    println!("{}", "-".repeat(102));
    for pattern in [Pattern::EveryWord, Pattern::Bytes64, Pattern::Same] {
        let mut samples: Vec<Vec<Sample>> = CASES.iter().map(|_| Vec::new()).collect();
        for run in 0..args.runs {
            let mut order: Vec<usize> = (0..CASES.len()).collect();
            order.rotate_left(run % CASES.len());
            for i in order {
                samples[i].push(measure(pattern, CASES[i], &args));
            }
        }
        // The ratios are to the sender alone as FT runs it (in place).
        let alone = support::median(samples[1].iter().map(|s| s.pages_per_s).collect());
        for (i, case) in CASES.iter().enumerate() {
            let rate = support::median(samples[i].iter().map(|s| s.pages_per_s).collect());
            let wire = support::median(samples[i].iter().map(|s| s.wire_mb_per_s).collect());
            let per_page = support::median(samples[i].iter().map(|s| s.bytes_per_page).collect());
            let epoch_ms = support::median(samples[i].iter().map(|s| s.epoch_ms).collect());
            println!(
                "{:<11} | {:>14} | {:>10.3} | {:>11.1} | {:>9.0} | {:>12.2} | {:>16.3}",
                pattern.name(),
                case.name(),
                rate / 1e6,
                wire,
                per_page,
                epoch_ms,
                rate / alone
            );
        }
    }
}
