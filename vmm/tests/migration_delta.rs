//! Delta-encoded page streams (the FT primary's encoding): over many random epochs the
//! receiver's memory must equal the sender's after every epoch, whatever happens to the pages
//! (small changes, rewrites with the same bytes, pages that become zero or all different,
//! pages first sent long after the initial copy), with and without LZ4 on top; and a delta
//! that does not fit its page is refused before anything is written.

mod common;

use std::os::unix::net::UnixStream;
use std::thread;

use common::{first_difference, untouched, Rng};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{MemoryConfig, VmConfig};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::protocol::{
    encode_delta, DeltaBase, FrameReader, FrameType, LaneDigest, Message, TransferStats,
    FLAG_DELTA, FLAG_LZ4,
};
use vmm::migration::{DirtyPages, Lane, Receiver, Sender, SenderOptions, PAGE_SIZE};

const SIZE: u64 = 16 << 20;
const PAGES: u64 = SIZE / PAGE_SIZE as u64;

#[derive(Debug, Serialize, Deserialize)]
struct Epoch {
    n: u64,
}

fn config() -> VmConfig {
    VmConfig {
        memory: MemoryConfig::with_size(SIZE),
        ..VmConfig::default()
    }
}

fn page(n: u64) -> GuestAddress {
    GuestAddress(n * PAGE_SIZE as u64)
}

/// What one epoch does to one page.
fn mutate(mem: &GuestMemoryMmap, rng: &mut Rng, p: u64) {
    let gpa = page(p);
    let mut buf = vec![0u8; PAGE_SIZE];
    mem.read_slice(&mut buf, gpa).unwrap();
    match rng.below(10) {
        // A few bytes anywhere (the common case: counters, pointers, a short record).
        0..=4 => {
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(PAGE_SIZE as u64) as usize;
                let len = (1 + rng.below(64) as usize).min(PAGE_SIZE - at);
                for b in &mut buf[at..at + len] {
                    *b = rng.next() as u8;
                }
            }
        }
        // The first and the last byte of the page (runs at both edges).
        5 => {
            buf[0] = buf[0].wrapping_add(1);
            buf[PAGE_SIZE - 1] = buf[PAGE_SIZE - 1].wrapping_add(1);
        }
        // Rewritten with the same bytes: dirty, unchanged.
        6 => {}
        // Zeroed.
        7 => buf.fill(0),
        // All different.
        8 => {
            for b in &mut buf {
                *b ^= 1 + rng.below(255) as u8;
            }
        }
        // Every other word (many short runs: the delta grows past the page).
        _ => {
            for w in buf.chunks_exact_mut(16) {
                w[0] = w[0].wrapping_add(1 + rng.below(200) as u8);
            }
        }
    }
    mem.write_slice(&buf, gpa).unwrap();
}

/// An initial copy (plain frames), then `epochs` delta epochs of random changes; the
/// receiver's memory is compared with the sender's after every epoch. Returns the receiver's
/// counters and the bytes the sender wrote for the delta epochs.
///
/// `encoders` > 0: the delta passes are encoded on a pool of that many threads; `in_place`:
/// on the sender's thread, whole pages written from `src` where they lie.
fn random_epochs(
    seed: u64,
    epochs: u64,
    compress: bool,
    (encoders, in_place): (usize, bool),
) -> (TransferStats, u64) {
    let src = vmm::memory::create(SIZE).unwrap();
    let mut rng = Rng(seed | 1);
    // Half of memory starts non-zero: the backup has those pages from the initial copy only.
    for p in 0..PAGES / 2 {
        let fill: Vec<u8> = (0..PAGE_SIZE).map(|_| rng.next() as u8).collect();
        src.write_slice(&fill, page(p * 2)).unwrap();
    }
    let (a, b) = UnixStream::pair().unwrap();
    let (check_tx, check_rx) = std::sync::mpsc::channel::<GuestMemoryMmap>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let sender = thread::spawn(move || {
        let mut s = Sender::with_options(
            a,
            SenderOptions {
                compress,
                batch_pages: 37,
                ..SenderOptions::default()
            },
        );
        s.send_hello(&config()).unwrap();
        let all = DirtyPages::all(&src).unwrap();
        s.send_memory(&src, &all).unwrap();
        s.send_state(&Epoch { n: 0 }).unwrap();
        s.send_complete().unwrap();
        s.recv_ack().unwrap();
        let initial = s.stats().bytes;
        let mut base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
        if encoders > 0 {
            s.start_encode_pool(encoders, &src, &base, || true).unwrap();
        }
        if in_place {
            // SAFETY: `src` changes only between passes, on this thread.
            unsafe { s.send_pages_in_place() };
        }
        assert_eq!(s.encode_threads(), encoders);
        for n in 1..=epochs {
            let count = 1 + rng.below(300);
            let mut dirty = Vec::new();
            for _ in 0..count {
                // Low pages are hot (sent again and again), the rest are first sent late.
                let p = if rng.below(4) > 0 {
                    rng.below(64)
                } else {
                    rng.below(PAGES)
                };
                mutate(&src, &mut rng, p);
                dirty.push(page(p));
            }
            let (dirty, _) = DirtyPages::from_pages(&src, dirty).unwrap();
            s.send_memory_delta(&src, &dirty, &mut base).unwrap();
            for gpa in dirty.iter() {
                assert!(base.knows(gpa));
            }
            s.send_state(&Epoch { n }).unwrap();
            s.send_complete().unwrap();
            s.recv_ack().unwrap();
            // The receiver compares after every epoch, against this epoch's memory.
            check_tx.send(src.clone()).unwrap();
            done_rx.recv().unwrap();
        }
        s.stats().bytes - initial
    });
    let mut r = Receiver::new(b);
    r.recv_hello().unwrap();
    let dst = vmm::memory::create(SIZE).unwrap();
    let st: Epoch = r.recv_state(&dst).unwrap();
    assert_eq!(st.n, 0);
    r.send_ack().unwrap();
    for n in 1..=epochs {
        let st: Epoch = r.recv_state(&dst).unwrap();
        assert_eq!(st.n, n);
        r.send_ack().unwrap();
        let src = check_rx.recv().unwrap();
        if let Some(gpa) = first_difference(&src, &dst) {
            panic!("seed {seed:#x}: after epoch {n} the receiver's page {gpa:#x} differs");
        }
        done_tx.send(()).unwrap();
    }
    let bytes = sender.join().unwrap();
    (r.stats(), bytes)
}

#[test]
fn delta_stream_reproduces_memory_over_random_epochs() {
    for (seed, compress, encoders, in_place) in [
        (1u64, true, 0, false),
        (0x5eed, false, 0, false),
        (0xdead_beef, true, 0, false),
        (7, true, 2, false),
        (0xfeed, false, 3, false),
        (0x1ace, false, 0, true),
        (0x2ace, false, 2, true),
    ] {
        let (stats, _) = random_epochs(seed, 60, compress, (encoders, in_place));
        assert!(stats.delta_pages > 0, "no page went as a delta: {stats:?}");
        assert!(
            stats.delta_pages < stats.pages,
            "every page went as a delta: {stats:?}"
        );
    }
}

/// One epoch's changes: up to 700 pages, two thirds of them among the first 256 (so most are
/// rewritten again and go as deltas).
fn rewrite_some(src: &GuestMemoryMmap, rng: &mut Rng) -> DirtyPages {
    let mut dirty = Vec::new();
    for _ in 0..1 + rng.below(700) {
        let p = if rng.below(3) > 0 {
            rng.below(256)
        } else {
            rng.below(PAGES)
        };
        mutate(src, rng, p);
        dirty.push(page(p));
    }
    DirtyPages::from_pages(src, dirty).unwrap().0
}

/// Encoding on a pool of threads is a pipeline, not another format: over random epochs the
/// pooled sender (also with pages written in place) writes exactly the bytes the sender alone
/// writes.
#[test]
fn pooled_encoding_writes_the_same_bytes_as_the_sender_alone() {
    for (seed, compress, threads, in_place) in [
        (3u64, true, 1usize, false),
        (0xabc, false, 2, false),
        (99, true, 4, false),
        (0x1ace, false, 2, true),
    ] {
        let src = vmm::memory::create(SIZE).unwrap();
        let mut rng = Rng(seed);
        let start = |pool: usize, base: &DeltaBase| {
            let mut s = Sender::with_options(
                std::io::Cursor::new(Vec::new()),
                SenderOptions {
                    compress,
                    batch_pages: 64,
                    ..SenderOptions::default()
                },
            );
            s.send_hello(&config()).unwrap();
            if pool > 0 {
                s.start_encode_pool(pool, &src, base, || true).unwrap();
                if in_place {
                    // SAFETY: `src` changes only between passes, on this thread.
                    unsafe { s.send_pages_in_place() };
                }
            }
            s
        };
        let alone_base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
        let pooled_base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
        let alone = start(0, &alone_base);
        let pooled = start(threads, &pooled_base);
        assert_eq!(pooled.encode_threads(), threads);
        let what = format!("seed {seed:#x}, {threads} threads, in place {in_place}");
        let stats = send_alike(
            &src,
            &mut rng,
            [(alone, alone_base), (pooled, pooled_base)],
            &what,
        );
        assert!(stats.delta_pages > 0 && stats.frames > 40, "{stats:?}");
    }
}

type BufferSender = Sender<std::io::Cursor<Vec<u8>>>;

/// Sends the same 40 epochs of random changes to `src` through two senders, each against
/// its own base, and checks that they counted and wrote the same bytes; returns the
/// counters.
fn send_alike(
    src: &GuestMemoryMmap,
    rng: &mut Rng,
    [(mut a, mut a_base), (mut b, mut b_base)]: [(BufferSender, DeltaBase); 2],
    what: &str,
) -> TransferStats {
    for _ in 0..40 {
        let dirty = rewrite_some(src, rng);
        a.send_memory_delta(src, &dirty, &mut a_base).unwrap();
        b.send_memory_delta(src, &dirty, &mut b_base).unwrap();
    }
    let stats = a.stats();
    let other = b.stats();
    assert_eq!(
        format!("{stats:?}"),
        format!("{other:?}"),
        "{what}: counters differ"
    );
    let (a, b) = (a.into_inner().into_inner(), b.into_inner().into_inner());
    assert_eq!(a.len(), b.len(), "{what}: stream lengths differ");
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first, None, "{what}: streams differ");
    stats
}

/// Whole pages written from where they lie are a way of writing, not another format: over
/// random epochs (zero pages, deltas and whole pages mixed in every frame), with checksums
/// and without, the sender that reads pages in place writes exactly the bytes of the sender
/// that copies them into its frames.
#[test]
fn pages_written_in_place_are_the_bytes_of_pages_copied_into_the_frame() {
    for (seed, checksums) in [(11u64, true), (0xbeef, false)] {
        let src = vmm::memory::create(SIZE).unwrap();
        let mut rng = Rng(seed);
        let start = |in_place: bool| {
            let mut s = Sender::with_options(
                std::io::Cursor::new(Vec::new()),
                SenderOptions {
                    batch_pages: 64,
                    checksums,
                    ..SenderOptions::default()
                },
            );
            if in_place {
                // SAFETY: `src` changes only between passes, on this thread.
                unsafe { s.send_pages_in_place() };
            }
            s.send_hello(&config()).unwrap();
            s
        };
        let copied_base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
        let in_place_base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
        let (copied, in_place) = (start(false), start(true));
        let what = format!("seed {seed:#x}, checksums {checksums}");
        let stats = send_alike(
            &src,
            &mut rng,
            [(copied, copied_base), (in_place, in_place_base)],
            &what,
        );
        assert!(
            stats.delta_pages > 0 && stats.zero_pages > 0 && stats.frames > 40,
            "{stats:?}"
        );
        let whole = stats.pages - stats.zero_pages - stats.delta_pages;
        assert!(
            whole > 0 && stats.page_data_bytes > whole * 4096,
            "{stats:?}"
        );
    }
}

#[test]
fn small_changes_cost_far_less_than_a_page() {
    // 64 bytes changed per rewrite of a page the receiver has seen: the delta is the bytes
    // and a few bytes of framing.
    let src = vmm::memory::create(SIZE).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let receiver = thread::spawn(move || {
        let mut r = Receiver::new(b);
        r.recv_hello().unwrap();
        let dst = vmm::memory::create(SIZE).unwrap();
        for _ in 0..3 {
            let _: Epoch = r.recv_state(&dst).unwrap();
            r.send_ack().unwrap();
        }
        dst
    });
    let mut s = Sender::with_options(
        a,
        SenderOptions {
            compress: true,
            ..SenderOptions::default()
        },
    );
    s.send_hello(&config()).unwrap();
    let mut base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
    let pages = 1000u64;
    let mut per_epoch = Vec::new();
    for n in 0..3u64 {
        for p in 0..pages {
            let mut buf = vec![0u8; 64];
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (p * 131 + n * 7 + i as u64 * 13) as u8 | 1;
            }
            let at = ((p * 97 + n * 64) % (PAGE_SIZE as u64 - 64)) as usize;
            src.write_slice(&buf, GuestAddress(page(p).0 + at as u64))
                .unwrap();
        }
        let (dirty, _) = DirtyPages::from_pages(&src, (0..pages).map(page)).unwrap();
        let before = s.stats().bytes;
        s.send_memory_delta(&src, &dirty, &mut base).unwrap();
        s.send_state(&Epoch { n }).unwrap();
        s.send_complete().unwrap();
        s.recv_ack().unwrap();
        per_epoch.push((s.stats().bytes - before) as f64 / pages as f64);
    }
    let dst = receiver.join().unwrap();
    assert_eq!(first_difference(&src, &dst), None);
    // The first epoch sends whole pages (the receiver's copy is unknown), LZ4'd.
    assert!(per_epoch[1] < 120.0, "bytes per page: {per_epoch:?}");
    assert!(per_epoch[2] < 120.0, "bytes per page: {per_epoch:?}");
}

#[test]
fn encoder_output_decodes_to_the_new_page() {
    let mut rng = Rng(42);
    let mut out = vec![0u8; PAGE_SIZE];
    for _ in 0..2000 {
        let old: Vec<u8> = (0..PAGE_SIZE).map(|_| rng.next() as u8).collect();
        let mut new = old.clone();
        for _ in 0..rng.below(40) {
            let at = rng.below(PAGE_SIZE as u64) as usize;
            new[at] = new[at].wrapping_add(1 + rng.below(255) as u8);
        }
        let Some(n) = encode_delta(&old, &new, &mut out) else {
            panic!("a page with a few changes did not fit a page of delta");
        };
        // Apply through the frame decoder, on a one-page memory holding `old`.
        let mem = vmm::memory::create(SIZE).unwrap();
        mem.write_slice(&old, page(3)).unwrap();
        let payload = delta_payload(&[(page(3).0, Some(&out[..n]))]);
        apply(&mem, FLAG_DELTA, &payload).unwrap();
        let mut got = vec![0u8; PAGE_SIZE];
        mem.read_slice(&mut got, page(3)).unwrap();
        assert!(got == new);
    }
    // Too small an output buffer: no delta.
    let old = vec![0u8; PAGE_SIZE];
    let new = vec![1u8; PAGE_SIZE];
    assert_eq!(encode_delta(&old, &new, &mut out[..100]), None);
    assert_eq!(encode_delta(&old, &old, &mut out), Some(0));
}

/// A delta frame's payload: per entry its address and either a delta (its runs) or, with
/// None, a whole page of 0x5a.
fn delta_payload(entries: &[(u64, Option<&[u8]>)]) -> Vec<u8> {
    let mut records = Vec::new();
    let mut p = (entries.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for (gpa, delta) in entries {
        match delta {
            Some(d) => {
                p.extend_from_slice(&(gpa | 2).to_le_bytes());
                records.extend_from_slice(&(d.len() as u16).to_le_bytes());
                records.extend_from_slice(d);
            }
            None => {
                p.extend_from_slice(&gpa.to_le_bytes());
                records.extend_from_slice(&[0x5a; PAGE_SIZE]);
            }
        }
    }
    p[4..8].copy_from_slice(&(records.len() as u32).to_le_bytes());
    p.extend_from_slice(&records);
    p
}

/// Parses a MemoryPages frame and applies it to `mem`.
fn apply(mem: &GuestMemoryMmap, flags: u8, payload: &[u8]) -> Result<(), String> {
    common::apply(mem, flags, payload, None)
}

/// Compresses a delta payload's records (the sender's LZ4 on top of deltas).
fn lz4(payload: &[u8], entries: usize) -> Vec<u8> {
    let data_at = 8 + entries * 8;
    let mut p = payload[..data_at].to_vec();
    p.extend_from_slice(&lz4_flex::block::compress(&payload[data_at..]));
    p
}

#[test]
fn hostile_deltas_are_refused_before_anything_is_written() {
    let mem_of = || vmm::memory::create(SIZE).unwrap();
    let cases: Vec<(&str, u8, Vec<u8>)> = vec![
        // A run past the end of the page: skip 4095, then 2 bytes.
        (
            "passes the end of the page",
            FLAG_DELTA,
            delta_payload(&[(0x1000, None), (0x2000, Some(&[0xff, 0x1f, 2, 1, 2]))]),
        ),
        // A run that starts exactly at the end.
        (
            "passes the end of the page",
            FLAG_DELTA,
            delta_payload(&[(0x2000, Some(&[0x80, 0x20, 1, 9]))]),
        ),
        // Runs adding up past the page (skip accumulates).
        (
            "passes the end of the page",
            FLAG_DELTA,
            delta_payload(&[(0x2000, Some(&[0x80, 0x10, 1, 9, 0x80, 0x10, 1, 9]))]),
        ),
        (
            "empty run",
            FLAG_DELTA,
            delta_payload(&[(0x2000, Some(&[0, 0]))]),
        ),
        (
            "longer than 2 bytes",
            FLAG_DELTA,
            delta_payload(&[(0x2000, Some(&[0x80, 0x80, 0x01, 1, 7]))]),
        ),
        (
            "cut short",
            FLAG_DELTA,
            delta_payload(&[(0x2000, Some(&[0, 10, 1, 2, 3]))]),
        ),
        (
            "run header cut",
            FLAG_DELTA,
            delta_payload(&[(0x2000, Some(&[0, 1, 7, 5]))]),
        ),
        // A record length past the page bound.
        (
            "delta records announced",
            FLAG_DELTA,
            delta_payload(&[(0x2000, Some(&vec![0u8; PAGE_SIZE + 1]))]),
        ),
        // Announced length that is not the data's.
        ("announced", FLAG_DELTA, {
            let mut p = delta_payload(&[(0x2000, Some(&[0, 1, 7]))]);
            p.push(0);
            p[4..8].copy_from_slice(&4u32.to_le_bytes());
            p
        }),
        // Record length larger than what follows it.
        ("cut short", FLAG_DELTA, {
            let mut p = delta_payload(&[(0x2000, Some(&[0, 1, 7]))]);
            let at = p.len() - 5;
            p[at..at + 2].copy_from_slice(&10u16.to_le_bytes());
            p
        }),
        // Zero and delta bits together; a delta bit without the flag.
        ("is not a page address", FLAG_DELTA, {
            let mut p = delta_payload(&[(0x2000, Some(&[0, 1, 7]))]);
            p[8] |= 1;
            p
        }),
        ("is not a page address", 0, {
            let mut p = delta_payload(&[(0x2000, Some(&[0, 1, 7]))]);
            p[4..8].copy_from_slice(&0u32.to_le_bytes());
            p
        }),
        // The reserved word used without the delta flag.
        ("reserved field is not 0", 0, {
            let mut p = delta_payload(&[(0x2000, None)]);
            p[4] = 1;
            p
        }),
        // A delta page outside guest memory.
        (
            "outside guest memory",
            FLAG_DELTA,
            delta_payload(&[(0x1000, None), (SIZE, Some(&[0, 1, 7]))]),
        ),
        // The same faults under LZ4 (found only after decompression).
        (
            "passes the end of the page",
            FLAG_DELTA | FLAG_LZ4,
            lz4(
                &delta_payload(&[(0x1000, None), (0x2000, Some(&[0xff, 0x1f, 2, 1, 2]))]),
                2,
            ),
        ),
        ("LZ4", FLAG_DELTA | FLAG_LZ4, {
            let mut p = lz4(
                &delta_payload(&[(0x1000, None), (0x2000, Some(&[0, 1, 7]))]),
                2,
            );
            // Claims one byte more than the block decompresses to.
            let n = u32::from_le_bytes([p[4], p[5], p[6], p[7]]) + 1;
            p[4..8].copy_from_slice(&n.to_le_bytes());
            p
        }),
        ("LZ4", FLAG_DELTA | FLAG_LZ4, {
            let mut p = delta_payload(&[(0x2000, Some(&[0, 1, 7]))]);
            let at = p.len() - 5;
            p.truncate(at);
            p.extend_from_slice(&[0xff; 5]);
            p
        }),
    ];
    for (needle, flags, payload) in cases {
        let mem = mem_of();
        let e = apply(&mem, flags, &payload).expect_err(needle);
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        assert!(untouched(&mem), "{needle}: memory was written");
    }
    // The valid forms work: an empty delta leaves the page; a run ending at the last byte.
    let mem = mem_of();
    mem.write_slice(&[9u8; PAGE_SIZE], page(2)).unwrap();
    apply(
        &mem,
        FLAG_DELTA,
        &delta_payload(&[(0x2000, Some(&[])), (0x3000, Some(&[0xff, 0x1f, 1, 7]))]),
    )
    .unwrap();
    let mut got = vec![0u8; PAGE_SIZE];
    mem.read_slice(&mut got, page(2)).unwrap();
    assert!(got.iter().all(|&b| b == 9));
    mem.read_slice(&mut got, page(3)).unwrap();
    assert_eq!(got[PAGE_SIZE - 1], 7);
    assert!(got[..PAGE_SIZE - 1].iter().all(|&b| b == 0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Arbitrary delta records never panic and never write outside their page: either the
    /// frame is refused (memory untouched) or only the addressed pages changed.
    #[test]
    fn arbitrary_deltas_stay_in_their_page(
        records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..48), 1..6),
        lz in any::<bool>(),
    ) {
        let mem = vmm::memory::create(SIZE).unwrap();
        let entries: Vec<(u64, Option<&[u8]>)> = records
            .iter()
            .enumerate()
            .map(|(i, r)| (page(2 * i as u64 + 1).0, Some(r.as_slice())))
            .collect();
        let mut payload = delta_payload(&entries);
        let mut flags = FLAG_DELTA;
        if lz {
            payload = lz4(&payload, entries.len());
            flags |= FLAG_LZ4;
        }
        let result = apply(&mem, flags, &payload);
        let dirty = DirtyPages::from_bitmaps(&[], &mem, true).unwrap();
        if result.is_err() {
            prop_assert!(dirty.is_empty());
        }
        for gpa in dirty.iter() {
            prop_assert!(gpa.0 % (2 * PAGE_SIZE as u64) == PAGE_SIZE as u64);
        }
    }
}

/// A writer whose bytes the test reads afterwards (a data stream's far end).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The page frames of each pass of a stream (payload and flags), the pass ended by its
/// MemoryDone; `lanes` (the data streams' bytes) supply the frames each MemoryDone names,
/// whose digest must match. The main stream's reader takes unchecked frames; the data
/// streams' readers do not (their checksums make the digest).
fn passes(main: &[u8], lanes: &[Vec<u8>]) -> Vec<Vec<(u8, Vec<u8>)>> {
    let mut main = std::io::Cursor::new(main);
    let mut reader = FrameReader::new();
    reader.set_authenticated(true);
    let mut lane_streams: Vec<_> = lanes
        .iter()
        .map(|l| (std::io::Cursor::new(l.as_slice()), FrameReader::new()))
        .collect();
    let mut passes = Vec::new();
    let mut pass = Vec::new();
    loop {
        let frame = match reader.read_frame(&mut main) {
            Ok(frame) => frame,
            Err(vmm::migration::ProtocolError::Closed) => break,
            Err(e) => panic!("{e}"),
        };
        match Message::parse(&frame).unwrap() {
            Message::MemoryPages(_) => pass.push((frame.flags, frame.payload.to_vec())),
            Message::MemoryDone { lanes, .. } => {
                assert_eq!(lanes.len(), lane_streams.len());
                for (named, (stream, reader)) in lanes.iter().zip(&mut lane_streams) {
                    let mut digest = LaneDigest::default();
                    for _ in 0..named.frames {
                        let frame = reader.read_frame(stream).unwrap();
                        assert_eq!(frame.kind, FrameType::MemoryPages);
                        digest.add(frame.crc);
                        pass.push((frame.flags, frame.payload.to_vec()));
                    }
                    assert_eq!(&digest.finish(), named, "a pass's digest");
                }
                pass.sort();
                passes.push(std::mem::take(&mut pass));
            }
            _ => {}
        }
    }
    for (stream, reader) in &mut lane_streams {
        assert!(
            matches!(
                reader.read_frame(stream),
                Err(vmm::migration::ProtocolError::Closed)
            ),
            "a data stream carried frames no pass named"
        );
    }
    passes
}

/// Several streams are a transport, not another format: every pass carries the frames the
/// sender alone writes (on whichever stream), each named with its digest by its MemoryDone,
/// and nothing else.
#[test]
fn data_streams_carry_exactly_the_frames_of_each_pass() {
    for (seed, compress, lanes, checksums, in_place) in [
        (5u64, true, 1usize, true, false),
        (0x77, false, 3, true, false),
        (0x99, false, 2, false, false),
        (0x1ace, false, 2, true, true),
        (0x2ace, false, 3, false, true),
    ] {
        let src = vmm::memory::create(SIZE).unwrap();
        let mut rng = Rng(seed);
        let options = SenderOptions {
            compress,
            batch_pages: 64,
            checksums,
        };
        let mut alone_base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
        let mut lanes_base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
        let mut alone = Sender::with_options(std::io::Cursor::new(Vec::new()), options);
        let mut several = Sender::with_options(std::io::Cursor::new(Vec::new()), options);
        alone.send_hello(&config()).unwrap();
        several.send_hello(&config()).unwrap();
        if in_place {
            // SAFETY: `src` changes only between passes, on this thread.
            unsafe { several.send_pages_in_place() };
        }
        let captured: Vec<Captured> = (0..lanes).map(|_| Captured::default()).collect();
        let writers = captured
            .iter()
            .map(|c| Lane {
                out: Box::new(c.clone()),
                next_seq: 0,
            })
            .collect();
        several
            .start_lanes(writers, &src, &lanes_base, || true)
            .unwrap();
        assert_eq!(several.lanes(), lanes);
        for _ in 0..30 {
            let dirty = rewrite_some(&src, &mut rng);
            alone
                .send_memory_delta(&src, &dirty, &mut alone_base)
                .unwrap();
            several
                .send_memory_delta(&src, &dirty, &mut lanes_base)
                .unwrap();
        }
        let (a, b) = (alone.stats(), several.stats());
        assert_eq!(a.pages, b.pages, "{a:?} {b:?}");
        assert_eq!(a.page_wire_bytes, b.page_wire_bytes, "{a:?} {b:?}");
        // Each pass returns once its frames are written, on whichever stream.
        let lane_bytes: Vec<Vec<u8>> = captured
            .iter()
            .map(|c| c.0.lock().unwrap().clone())
            .collect();
        assert!(
            lane_bytes.iter().all(|l| !l.is_empty()),
            "a data stream idle"
        );
        let expected = passes(&alone.into_inner().into_inner(), &[]);
        let got = passes(&several.into_inner().into_inner(), &lane_bytes);
        assert_eq!(expected.len(), 30);
        assert!(
            expected == got,
            "seed {seed:#x}, {lanes} data streams, in place {in_place}: passes differ"
        );
    }
}

/// The delta format spelled out plainly: the runs of consecutive changed 8-byte words, each
/// trimmed to the bytes that differ, as (skip, length, bytes) with 1- or 2-byte LEB128
/// numbers; None when that is longer than `room`, or when a run's whole words alone are.
fn plain_delta(old: &[u8], new: &[u8], room: usize) -> Option<Vec<u8>> {
    let changed: Vec<bool> = (0..PAGE_SIZE / 8)
        .map(|w| old[w * 8..w * 8 + 8] != new[w * 8..w * 8 + 8])
        .collect();
    let leb = |out: &mut Vec<u8>, v: usize| {
        if v < 0x80 {
            out.push(v as u8);
        } else {
            out.extend([(v as u8 & 0x7f) | 0x80, (v >> 7) as u8]);
        }
    };
    let mut out = Vec::new();
    let (mut w, mut pos) = (0, 0);
    while w < changed.len() {
        if !changed[w] {
            w += 1;
            continue;
        }
        let first = w;
        while w < changed.len() && changed[w] {
            w += 1;
        }
        if (w - first) * 8 > room.saturating_sub(out.len()) {
            return None;
        }
        let start = (first * 8..).find(|&i| old[i] != new[i])?;
        let end = (0..w * 8).rev().find(|&i| old[i] != new[i])? + 1;
        leb(&mut out, start - pos);
        leb(&mut out, end - start);
        out.extend_from_slice(&new[start..end]);
        pos = end;
    }
    (out.len() <= room).then_some(out)
}

/// The encoder scans whole blocks of words where it can; over pages changed every way the
/// tests above use (and at room sizes up to the page) it writes what the plain definition
/// says, byte for byte.
#[test]
fn delta_encoding_matches_its_plain_definition() {
    let mut rng = Rng(0xde17a);
    let mem = vmm::memory::create(PAGE_SIZE as u64).unwrap();
    let mut old = vec![0u8; PAGE_SIZE];
    let mut new = vec![0u8; PAGE_SIZE];
    let mut out = vec![0u8; PAGE_SIZE];
    for case in 0..4000 {
        for b in old.iter_mut() {
            *b = rng.next() as u8;
        }
        mem.write_slice(&old, page(0)).unwrap();
        mutate(&mem, &mut rng, 0);
        // A lone changed byte too, near a 512-byte boundary (blocks straddle it or not).
        if case % 3 == 0 {
            let at = 64 * 8 * (1 + rng.below(7) as usize) - 8 + rng.below(16) as usize;
            mem.write_slice(&[!old[at]], GuestAddress(at as u64))
                .unwrap();
        }
        mem.read_slice(&mut new, page(0)).unwrap();
        let room = if case % 2 == 0 {
            PAGE_SIZE * 3 / 4
        } else {
            rng.below(PAGE_SIZE as u64 + 1) as usize
        };
        let got = encode_delta(&old, &new, &mut out[..room]).map(|n| out[..n].to_vec());
        assert_eq!(
            got,
            plain_delta(&old, &new, room),
            "case {case}, room {room}"
        );
    }
}
