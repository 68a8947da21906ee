//! Pages built from input frames (fault tolerance): a receive buffer's dirty page may travel as
//! the mirrored input frames the receiver holds, laid over its copy, plus a delta. Over many
//! random epochs, with frames landing anywhere (across page boundaries, in pieces, over each
//! other), the guest changing the buffers after the device wrote them, and some frames not
//! yet acknowledged, the receiver's memory must equal the sender's after every epoch, while
//! naming only frames it acknowledged; and a record naming bytes it does not hold is refused
//! before anything is written.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{first_difference, untouched, Rng};
use devices::gate::LoggedFrame;
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{MemoryConfig, VmConfig};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::protocol::{
    apply_pages_with_input, DeltaBase, FrameReader, InputFrameSource, Message, TransferStats,
    FLAG_DELTA, FLAG_LZ4,
};
use vmm::migration::{DirtyPages, InputPieces, ProtocolError, Sender, SenderOptions, PAGE_SIZE};

const SIZE: u64 = 4 << 20;
const PAGES: u64 = SIZE / PAGE_SIZE as u64;
/// The receive ring: 48 buffers of 2 KiB from 0x600 into page 64, so that most straddle a
/// page boundary.
const RING: u64 = 64 * PAGE_SIZE as u64 + 0x600;
const BUFFERS: u64 = 48;
const BUFFER: u64 = 2048;
/// A socket's receive ring the guest copies TCP payload into (96 KiB from page 300).
const SOCKET: u64 = 300 * PAGE_SIZE as u64;
const SOCKET_LEN: u64 = 96 << 10;

/// An input frame as a NIC logs it: a virtio-net header, then TCP over IPv4 carrying
/// `payload`.
fn tcp_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12 + 14 + 20 + 20];
    f[12 + 12..12 + 14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = 12 + 14;
    f[ip] = 0x45;
    f[ip + 2..ip + 4].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
    f[ip + 8] = 64;
    f[ip + 9] = 6;
    f[ip + 20 + 12] = 5 << 4;
    f.extend_from_slice(payload);
    f
}

/// Copies `bytes` into the socket ring at `*at` (wrapping), as a guest's TCP stack does with
/// what it received, marking the pages written.
fn copy_to_socket(
    src: &GuestMemoryMmap,
    at: &mut u64,
    bytes: &[u8],
    dirty: &mut Vec<GuestAddress>,
) {
    let mut done = 0;
    while done < bytes.len() {
        let offset = *at % SOCKET_LEN;
        let take = ((SOCKET_LEN - offset) as usize).min(bytes.len() - done);
        let gpa = SOCKET + offset;
        src.write_slice(&bytes[done..done + take], GuestAddress(gpa))
            .unwrap();
        let mut page = gpa & !(PAGE_SIZE as u64 - 1);
        while page < gpa + take as u64 {
            dirty.push(GuestAddress(page));
            page += PAGE_SIZE as u64;
        }
        done += take;
        *at += take as u64;
    }
}

fn config() -> VmConfig {
    VmConfig {
        memory: MemoryConfig::with_size(SIZE),
        ..VmConfig::default()
    }
}

/// The receiver's input store: frames by seq.
#[derive(Default)]
struct Held(HashMap<u64, Vec<u8>>);

impl InputFrameSource for Held {
    fn input_frame(&self, seq: u64) -> Option<&[u8]> {
        self.0.get(&seq).map(Vec::as_slice)
    }
}

/// Applies every page frame of `bytes` (a sender's output) to `dst` with `held` as the
/// input store.
fn receive(
    (bytes, reader): (&[u8], &mut FrameReader),
    dst: &GuestMemoryMmap,
    held: &Held,
    stats: &mut TransferStats,
) {
    let mut stream = std::io::Cursor::new(bytes);
    let mut scratch = Vec::new();
    let mut probe = vec![0u8; PAGE_SIZE];
    loop {
        let frame = match reader.read_frame(&mut stream) {
            Ok(frame) => frame,
            Err(ProtocolError::Closed) => return,
            Err(e) => panic!("{e}"),
        };
        if let Message::MemoryPages(batch) = Message::parse(&frame).unwrap() {
            apply_pages_with_input(dst, &batch, Some(held), &mut scratch, &mut probe, stats)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Where the device puts a frame of `len` bytes: the next ring buffer, now and then split
/// with a second piece in another buffer (a descriptor chain of two).
fn placement(rng: &mut Rng, next_buffer: &mut u64, len: usize) -> Vec<(u64, u32)> {
    let mut buffer = || {
        let at = RING + (*next_buffer % BUFFERS) * BUFFER;
        *next_buffer += 1;
        at
    };
    if len > 1 && rng.below(4) == 0 {
        let cut = 1 + rng.below(len as u64 - 1) as u32;
        vec![(buffer(), cut), (buffer(), len as u32 - cut)]
    } else {
        vec![(buffer(), len as u32)]
    }
}

/// `epochs` epochs of frames landing in the ring and the guest writing to memory (the
/// buffers too), sent with the frames of each epoch acknowledged up to a random point.
/// Returns the receiver's counters and, of the epochs' frames, the bytes delivered.
///
/// `tcp`: the frames are TCP segments, whose payload the guest mostly copies into a socket
/// ring as well. `in_place`: pages sent whole are written from `src` where they lie.
fn random_epochs(
    seed: u64,
    epochs: u64,
    (compress, encoders, tcp, in_place): (bool, usize, bool, bool),
) -> (TransferStats, u64) {
    let mut rng = Rng(seed | 1);
    let src = vmm::memory::create(SIZE).unwrap();
    let dst = vmm::memory::create(SIZE).unwrap();
    for p in 0..PAGES {
        let fill = vec![p as u8; PAGE_SIZE];
        src.write_slice(&fill, GuestAddress(p * PAGE_SIZE as u64))
            .unwrap();
        dst.write_slice(&fill, GuestAddress(p * PAGE_SIZE as u64))
            .unwrap();
    }
    let mut s = Sender::with_options(
        std::io::Cursor::new(Vec::new()),
        SenderOptions {
            compress,
            batch_pages: 16,
            ..SenderOptions::default()
        },
    );
    s.send_hello(&config()).unwrap();
    let mut base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
    if encoders > 0 {
        s.start_encode_pool(encoders, &src, &base, || true).unwrap();
    }
    if in_place {
        // SAFETY: `src` changes only between passes, on this thread.
        unsafe { s.send_pages_in_place() };
    }
    // Every page is known to the receiver (as after the initial copy).
    let all = DirtyPages::all(&src).unwrap();
    s.send_memory_delta(&src, &all, &mut base).unwrap();
    let mut read = 0;
    let mut reader = FrameReader::new();
    let mut stats = TransferStats::default();
    let held = Held::default();
    receive(
        (&s.get_ref().get_ref()[read..], &mut reader),
        &dst,
        &held,
        &mut stats,
    );
    read = s.get_ref().get_ref().len();

    let acked = Arc::new(AtomicU64::new(0));
    let mut seq = 0u64;
    let mut next_buffer = 0u64;
    let mut socket_at = 0u64;
    let mut delivered = 0u64;
    for n in 1..=epochs {
        let a = acked.clone();
        let mut pieces = InputPieces::new(Arc::new(move || a.load(Ordering::SeqCst)));
        let mut dirty = Vec::new();
        let first = seq + 1;
        let mut frames = Vec::new();
        for _ in 0..rng.below(60) {
            if rng.below(3) == 0 {
                // The guest writes: a ring page (a driver touching a buffer it got back) or
                // any page.
                let gpa = if rng.below(2) == 0 {
                    RING + rng.below(BUFFERS * BUFFER - 64)
                } else {
                    rng.below(SIZE - 64)
                };
                let bytes: Vec<u8> = (0..1 + rng.below(64)).map(|_| rng.next() as u8).collect();
                src.write_slice(&bytes, GuestAddress(gpa)).unwrap();
                dirty.push(GuestAddress(gpa & !(PAGE_SIZE as u64 - 1)));
                dirty.push(GuestAddress((gpa + 63) & !(PAGE_SIZE as u64 - 1)));
                continue;
            }
            seq += 1;
            let len = match rng.below(3) {
                0 => 14 + rng.below(60) as usize,
                1 => 1514,
                _ => 60 + rng.below(BUFFER - 60) as usize,
            };
            let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if tcp {
                data = tcp_frame(&data[..len.saturating_sub(66).max(1)]);
                if rng.below(4) > 0 {
                    copy_to_socket(&src, &mut socket_at, &data[66..], &mut dirty);
                }
            }
            let len = data.len();
            let placed = placement(&mut rng, &mut next_buffer, len);
            let mut done = 0;
            for &(gpa, l) in &placed {
                let l = l as usize;
                src.write_slice(&data[done..done + l], GuestAddress(gpa))
                    .unwrap();
                done += l;
                let mut p = gpa & !(PAGE_SIZE as u64 - 1);
                while p < gpa + l as u64 {
                    dirty.push(GuestAddress(p));
                    p += PAGE_SIZE as u64;
                }
            }
            delivered += len as u64;
            frames.push((seq, data.clone()));
            pieces.add(LoggedFrame {
                seq,
                nic: 0,
                epoch: n,
                data,
                placed,
            });
        }
        // The receiver acknowledged the epoch's frames up to a random point (the last ones
        // are often still on their way) and holds exactly those.
        let through = first - 1 + rng.below(seq + 2 - first);
        acked.store(through, Ordering::SeqCst);
        let mut held = Held::default();
        for (s, data) in frames {
            if s <= through {
                held.0.insert(s, data);
            }
        }
        let (dirty, _) = DirtyPages::from_pages(&src, dirty).unwrap();
        let pieces = Arc::new(pieces);
        s.send_memory_delta_with_input(&src, &dirty, &mut base, &pieces)
            .unwrap();
        assert!(
            Arc::try_unwrap(pieces).is_ok(),
            "the encoders let go of the frames when the pass ended"
        );
        receive(
            (&s.get_ref().get_ref()[read..], &mut reader),
            &dst,
            &held,
            &mut stats,
        );
        read = s.get_ref().get_ref().len();
        if let Some(gpa) = first_difference(&src, &dst) {
            panic!("seed {seed:#x}: after epoch {n} the receiver's page {gpa:#x} differs");
        }
    }
    assert_eq!(s.stats().input_pages, stats.input_pages);
    (stats, delivered)
}

#[test]
fn pages_built_from_input_frames_reproduce_memory_over_random_epochs() {
    for (seed, compress, encoders, tcp, in_place) in [
        (1u64, false, 0, false, false),
        (0x5eed, true, 0, false, false),
        (0xdead_beef, false, 2, false, false),
        (77, true, 3, false, false),
        (5, false, 0, true, false),
        (0xc0de, true, 2, true, false),
        (0xabcd, false, 3, true, false),
        (0x1ace, false, 0, false, true),
        (0x7ace, false, 0, true, true),
        (0x3ace, false, 3, true, true),
    ] {
        let (stats, _) = random_epochs(seed, 80, (compress, encoders, tcp, in_place));
        assert!(stats.input_pages > 0, "no page went as input: {stats:?}");
        assert!(
            stats.delta_pages > 0,
            "seed {seed:#x}: no page went as a plain delta: {stats:?}"
        );
    }
}

/// A receive buffer holding only what the device wrote costs its frames' names, not their
/// bytes; and so does the guest's copy of their TCP payload, in stream order (a socket's
/// receive ring), with the guest's copy starting anywhere in a page.
#[test]
fn receive_buffers_and_the_guest_s_copies_cost_a_few_bytes_per_frame() {
    for copies in [false, true] {
        let (wire, bytes) = receive_and_copy(copies);
        eprintln!("copies {copies}: wire {wire} bytes {bytes}");
        assert!(
            wire * 20 < bytes,
            "guest copies {copies}: {wire} bytes on the wire for {bytes} bytes of frames"
        );
    }
}

/// 20 epochs of 48 TCP frames into the receive ring, their payload also copied into the
/// socket ring with `copies`: the bytes of the epochs on the wire, and of the frames.
fn receive_and_copy(copies: bool) -> (u64, u64) {
    let src = vmm::memory::create(SIZE).unwrap();
    let mut base = DeltaBase::new(vmm::memory::create(SIZE).unwrap()).unwrap();
    let mut s = Sender::new(std::io::Cursor::new(Vec::new()));
    s.send_hello(&config()).unwrap();
    let all = DirtyPages::all(&src).unwrap();
    s.send_memory_delta(&src, &all, &mut base).unwrap();
    let mut rng = Rng(9);
    let mut seq = 0;
    let mut next_buffer = 0;
    let mut bytes = 0;
    let mut wire = 0;
    let mut socket_at = 1234;
    for _ in 0..20 {
        let mut pieces = InputPieces::new(Arc::new(|| u64::MAX));
        let mut dirty = Vec::new();
        for _ in 0..BUFFERS {
            seq += 1;
            let payload: Vec<u8> = (0..1448).map(|_| rng.next() as u8).collect();
            let data = tcp_frame(&payload);
            if copies {
                copy_to_socket(&src, &mut socket_at, &payload, &mut dirty);
            }
            let at = RING + (next_buffer % BUFFERS) * BUFFER;
            next_buffer += 1;
            src.write_slice(&data, GuestAddress(at)).unwrap();
            dirty.push(GuestAddress(at & !(PAGE_SIZE as u64 - 1)));
            dirty.push(GuestAddress((at + 1513) & !(PAGE_SIZE as u64 - 1)));
            bytes += data.len() as u64;
            pieces.add(LoggedFrame {
                seq,
                nic: 0,
                epoch: 1,
                data,
                placed: vec![(at, 1514)],
            });
        }
        let (dirty, _) = DirtyPages::from_pages(&src, dirty).unwrap();
        let pass = s
            .send_memory_delta_with_input(&src, &dirty, &mut base, &Arc::new(pieces))
            .unwrap();
        wire += pass.wire_bytes;
    }
    (wire, bytes)
}

/// A delta frame with one input entry at `gpa`: `pieces` as (seq, frame offset, page offset,
/// len), then the delta `runs`.
fn input_payload(gpa: u64, count: u8, pieces: &[(u64, u32, u16, u16)], runs: &[u8]) -> Vec<u8> {
    let mut p = 1u32.to_le_bytes().to_vec();
    let mut record = vec![count];
    for &(seq, from, to, len) in pieces {
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(&from.to_le_bytes());
        record.extend_from_slice(&to.to_le_bytes());
        record.extend_from_slice(&len.to_le_bytes());
    }
    record.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    record.extend_from_slice(runs);
    p.extend_from_slice(&(record.len() as u32).to_le_bytes());
    p.extend_from_slice(&(gpa | 2 | 4).to_le_bytes());
    p.extend_from_slice(&record);
    p
}

/// Parses a MemoryPages frame and applies it to `mem` (`held`: None, a stream without input).
fn apply(
    mem: &GuestMemoryMmap,
    flags: u8,
    payload: &[u8],
    held: Option<&Held>,
) -> Result<(), String> {
    common::apply(
        mem,
        flags,
        payload,
        held.map(|h| h as &dyn InputFrameSource),
    )
}

fn held() -> Held {
    let mut held = Held::default();
    held.0.insert(5, (0..100u8).collect());
    held
}

#[test]
fn input_records_naming_bytes_not_held_are_refused_before_anything_is_written() {
    let cases: Vec<(&str, u8, Vec<u8>, bool)> = vec![
        (
            "input frame 6 is not held",
            FLAG_DELTA,
            input_payload(0x2000, 1, &[(6, 0, 0, 10)], &[]),
            true,
        ),
        (
            "bytes 95..105 of input frame 5",
            FLAG_DELTA,
            input_payload(0x2000, 1, &[(5, 95, 0, 10)], &[]),
            true,
        ),
        (
            "input piece of 200 bytes at byte 4000",
            FLAG_DELTA,
            input_payload(0x2000, 1, &[(5, 0, 4000, 200)], &[]),
            true,
        ),
        (
            "input piece of 0 bytes",
            FLAG_DELTA,
            input_payload(0x2000, 1, &[(5, 0, 0, 0)], &[]),
            true,
        ),
        (
            "0 input pieces",
            FLAG_DELTA,
            input_payload(
                0x2000,
                0,
                &[],
                &[0, 14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
            ),
            true,
        ),
        (
            "33 input pieces",
            FLAG_DELTA,
            input_payload(0x2000, 33, &[(5, 0, 0, 1); 33], &[]),
            true,
        ),
        (
            "2 input pieces cut short",
            FLAG_DELTA,
            input_payload(0x2000, 2, &[(5, 0, 0, 1)], &[]),
            true,
        ),
        // The delta on top is checked as any other.
        (
            "passes the end of the page",
            FLAG_DELTA,
            input_payload(0x2000, 1, &[(5, 0, 0, 10)], &[0xff, 0x1f, 2, 1, 2]),
            true,
        ),
        // The input bit needs the delta bit, and the delta flag.
        (
            "is not a page address",
            FLAG_DELTA,
            {
                let mut p = input_payload(0x2000, 1, &[(5, 0, 0, 10)], &[]);
                p[8] &= !2;
                p
            },
            true,
        ),
        (
            "is not a page address",
            0,
            {
                let mut p = input_payload(0x2000, 1, &[(5, 0, 0, 10)], &[]);
                p[4..8].copy_from_slice(&0u32.to_le_bytes());
                p
            },
            true,
        ),
        // A stream that carries no input (a migration) refuses it whole.
        (
            "on a stream that carries none",
            FLAG_DELTA,
            input_payload(0x2000, 1, &[(5, 0, 0, 10)], &[]),
            false,
        ),
        (
            "outside guest memory",
            FLAG_DELTA,
            input_payload(SIZE, 1, &[(5, 0, 0, 10)], &[]),
            true,
        ),
    ];
    let store = held();
    for (needle, flags, payload, with_input) in cases {
        let mem = vmm::memory::create(SIZE).unwrap();
        let e = apply(&mem, flags, &payload, with_input.then_some(&store)).expect_err(needle);
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        assert!(untouched(&mem), "{needle}: memory was written");
    }
    // The valid form: two pieces, the second over part of the first, then a run.
    let mem = vmm::memory::create(SIZE).unwrap();
    mem.write_slice(&[9u8; PAGE_SIZE], GuestAddress(0x2000))
        .unwrap();
    let payload = input_payload(
        0x2000,
        2,
        &[(5, 0, 4086, 10), (5, 50, 4090, 2)],
        &[0, 1, 0xee],
    );
    apply(&mem, FLAG_DELTA, &payload, Some(&store)).unwrap();
    let mut got = vec![0u8; PAGE_SIZE];
    mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    assert_eq!(got[0], 0xee);
    assert!(got[1..4086].iter().all(|&b| b == 9));
    assert_eq!(&got[4086..], &[0, 1, 2, 3, 50, 51, 6, 7, 8, 9]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Arbitrary input records never panic and never write outside their page: either the
    /// frame is refused (memory untouched) or only the addressed page changed.
    #[test]
    fn arbitrary_input_records_stay_in_their_page(
        record in proptest::collection::vec(any::<u8>(), 0..120),
        count in 0u8..4,
        lz in any::<bool>(),
    ) {
        let mem = vmm::memory::create(SIZE).unwrap();
        let mut payload = 1u32.to_le_bytes().to_vec();
        let mut body = vec![count];
        body.extend_from_slice(&record);
        payload.extend_from_slice(&(body.len() as u32).to_le_bytes());
        payload.extend_from_slice(&(0x3000u64 | 6).to_le_bytes());
        let mut flags = FLAG_DELTA;
        if lz {
            payload.extend_from_slice(&lz4_flex::block::compress(&body));
            flags |= FLAG_LZ4;
        } else {
            payload.extend_from_slice(&body);
        }
        let result = apply(&mem, flags, &payload, Some(&held()));
        let dirty = DirtyPages::from_bitmaps(&[], &mem, true).unwrap();
        if result.is_err() {
            prop_assert!(dirty.is_empty());
        }
        for gpa in dirty.iter() {
            prop_assert_eq!(gpa.0, 0x3000);
        }
    }
}
