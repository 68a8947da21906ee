//! Migration stream: sender and receiver over a Unix stream pair, real guest memory on both
//! sides, zero-page elision, dirty-only passes, LZ4, and the error paths (order, versions,
//! corruption, a peer that goes away).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::{MemoryConfig, VmConfig};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::protocol::{
    decode_state, encode_frame, encode_state, FrameReader, FrameType, Message, HEADER_LEN,
    TRAILER_LEN,
};
use vmm::migration::{
    DirtyPages, ProtocolError, Receiver, Sender, SenderOptions, PAGE_SIZE, PROTOCOL_VERSION,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DummyState {
    epoch: u64,
    regs: Vec<u64>,
}

fn config(size: u64) -> VmConfig {
    VmConfig {
        memory: MemoryConfig::with_size(size),
        ..VmConfig::default()
    }
}

fn page(n: u64) -> GuestAddress {
    GuestAddress(n * PAGE_SIZE as u64)
}

/// `data_pages` scattered non-zero pages (every third page), the rest zero.
fn fill(mem: &GuestMemoryMmap, data_pages: u64) {
    for i in 0..data_pages {
        let p = i * 3;
        mem.write_slice(&(p + 1).to_le_bytes().repeat(PAGE_SIZE / 8), page(p))
            .unwrap();
    }
}

fn assert_same(a: &GuestMemoryMmap, b: &GuestMemoryMmap) {
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    for r in a.iter() {
        let mut off = 0;
        while off < r.len() {
            let gpa = GuestAddress(r.start_addr().0 + off);
            let n = x.len().min((r.len() - off) as usize);
            a.read_slice(&mut x[..n], gpa).unwrap();
            b.read_slice(&mut y[..n], gpa).unwrap();
            assert!(
                x[..n] == y[..n],
                "memory differs in the MiB at {:#x}",
                gpa.0
            );
            off += n as u64;
        }
    }
}

fn round_trip(options: SenderOptions) {
    const SIZE: u64 = 32 << 20;
    let src = vmm::memory::create(SIZE).unwrap();
    fill(&src, 500);
    // Start tracking after the initial fill.
    DirtyPages::from_bitmaps(&[], &src, true).unwrap();
    let (a, b) = UnixStream::pair().unwrap();

    let sender = thread::spawn(move || {
        let mut s = Sender::with_options(a, options);
        s.send_hello(&config(SIZE)).unwrap();
        let first = s.send_all_memory(&src).unwrap();
        assert_eq!(first.pages, SIZE / PAGE_SIZE as u64);
        assert_eq!(first.zero_pages, SIZE / PAGE_SIZE as u64 - 500);
        // The guest (here: a device through vm-memory) dirties a few pages; a KVM log adds one.
        src.write_slice(&[0xAB; 100], page(1)).unwrap();
        src.write_slice(&[0xCD; PAGE_SIZE * 2], page(4000)).unwrap();
        src.write_slice(&[0; PAGE_SIZE], page(3)).unwrap(); // becomes a zero page
        src.write_slice(&[0xEE; 8], page(7999)).unwrap();
        let mut kvm = vec![vec![0u64; (SIZE / PAGE_SIZE as u64 / 64) as usize]];
        kvm[0][10] = 1; // page 640 (untouched, zero on both sides)
        let dirty = DirtyPages::from_bitmaps(&kvm, &src, true).unwrap();
        assert_eq!(dirty.count(), 6);
        let second = s.send_memory(&src, &dirty).unwrap();
        assert_eq!(second.pages, 6);
        assert_eq!(second.iteration, 1);
        s.send_state(&DummyState {
            epoch: 2,
            regs: vec![1, 2, 3],
        })
        .unwrap();
        s.send_complete().unwrap();
        s.recv_ack().unwrap();
        (s.stats(), src)
    });

    let mut r = Receiver::new(b);
    r.set_authenticated(!options.checksums);
    let cfg = r.recv_hello().unwrap();
    assert_eq!(cfg, config(SIZE));
    let dst = vmm::memory::create(cfg.memory.size).unwrap();
    let st: DummyState = r.recv_state(&dst).unwrap();
    assert_eq!(
        st,
        DummyState {
            epoch: 2,
            regs: vec![1, 2, 3]
        }
    );
    r.send_ack().unwrap();
    let (sent, src) = sender.join().unwrap();
    assert_same(&src, &dst);

    let got = r.stats();
    let total = SIZE / PAGE_SIZE as u64;
    assert_eq!(sent.pages, total + 6);
    assert_eq!(got.pages, sent.pages);
    assert_eq!(sent.zero_pages, total - 500 + 2);
    assert_eq!(got.zero_pages, sent.zero_pages);
    assert_eq!(sent.iterations, 2);
    assert_eq!(got.iterations, 2);
    assert_eq!(
        sent.page_data_bytes,
        (500 + 4) * PAGE_SIZE as u64,
        "only non-zero pages carry data"
    );
    assert_eq!(got.page_wire_bytes, sent.page_wire_bytes);
    if options.compress {
        assert!(sent.compressed_frames > 0);
        assert!(sent.page_wire_bytes < sent.page_data_bytes / 4);
    } else {
        assert_eq!(sent.compressed_frames, 0);
        assert_eq!(sent.page_wire_bytes, sent.page_data_bytes);
    }
    // The receiver wrote through vm-memory: its bitmap marks the data pages (and the zero
    // page that had to be cleared), and not the zero pages that were already zero.
    let marked = DirtyPages::from_bitmaps(&[], &dst, true).unwrap();
    assert!(marked.contains(page(0)) && marked.contains(page(3)) && marked.contains(page(4001)));
    assert!(!marked.contains(page(1000 * 3 + 1)));
    assert_eq!(marked.count(), 500 + 4);
    println!("sender {sent:?}\nreceiver {got:?}");
}

#[test]
fn round_trip_raw() {
    round_trip(SenderOptions::default());
}

#[test]
fn round_trip_lz4_small_batches() {
    round_trip(SenderOptions {
        compress: true,
        batch_pages: 37,
        checksums: true,
    });
}

#[test]
fn round_trip_unchecked_on_an_authenticated_stream() {
    round_trip(SenderOptions {
        compress: true,
        batch_pages: 37,
        checksums: false,
    });
}

/// One epoch's stream (Hello, a memory pass, the state, Complete) from a sender with
/// `checksums` on or off.
fn captured_epoch(checksums: bool) -> Vec<u8> {
    const SIZE: u64 = 32 << 20;
    let src = vmm::memory::create(SIZE).unwrap();
    fill(&src, 20);
    let options = SenderOptions {
        checksums,
        ..SenderOptions::default()
    };
    let mut s = Sender::with_options(Capture::default(), options);
    s.send_hello(&config(SIZE)).unwrap();
    s.send_all_memory(&src).unwrap();
    s.send_state(&DummyState {
        epoch: 1,
        regs: vec![7],
    })
    .unwrap();
    s.send_complete().unwrap();
    s.into_inner().0
}

/// Reads `stream` as a receiver that trusts its stream to authenticate (or not).
fn receive_captured(stream: &[u8], authenticated: bool) -> Result<DummyState, ProtocolError> {
    let (mut a, b) = UnixStream::pair().unwrap();
    let stream = stream.to_vec();
    let writer = thread::spawn(move || {
        let _ = a.write_all(&stream);
        a
    });
    let mut r = Receiver::new(b);
    r.set_authenticated(authenticated);
    r.recv_hello()?;
    let dst = vmm::memory::create(32 << 20).unwrap();
    let state = r.recv_state::<DummyState>(&dst);
    drop(r);
    drop(writer.join().unwrap());
    state
}

#[test]
fn unchecked_frames_are_refused_unless_the_stream_authenticates() {
    let unchecked = captured_epoch(false);
    let checked = captured_epoch(true);
    // The same frames, but without checksums after Hello: every trailer after it is zero.
    assert_eq!(unchecked.len(), checked.len());
    assert_ne!(unchecked, checked);

    assert_eq!(receive_captured(&unchecked, true).unwrap().regs, vec![7]);
    assert_eq!(receive_captured(&checked, true).unwrap().regs, vec![7]);
    assert_eq!(receive_captured(&checked, false).unwrap().regs, vec![7]);
    // A plain stream's reader must not take a frame that checks nothing.
    let e = receive_captured(&unchecked, false).unwrap_err();
    assert!(matches!(e, ProtocolError::Unchecked { seq: 1, .. }), "{e}");
    assert!(e.to_string().contains("only a TLS stream"), "{e}");
}

#[test]
fn an_authenticated_reader_still_checks_checked_frames_and_hello() {
    // A checked frame with a flipped byte is refused on any stream.
    let mut checked = captured_epoch(true);
    // The first byte of the state's payload: after it come its trailer and Complete (a
    // header and a trailer).
    let state = encode_state(&DummyState {
        epoch: 1,
        regs: vec![7],
    })
    .unwrap();
    let at = checked.len() - (HEADER_LEN + TRAILER_LEN) - TRAILER_LEN - state.len();
    checked[at] ^= 1;
    let e = receive_captured(&checked, true).unwrap_err();
    assert!(matches!(e, ProtocolError::Checksum { .. }), "{e}");
    // Hello always carries its checksum: it names the version a peer must be able to read.
    let (k, _, p) = hello(PROTOCOL_VERSION);
    let mut frame = encode_frame(k, 0x80, 0, &p);
    let end = frame.len() - 4;
    frame[end..].copy_from_slice(&[0; 4]);
    let e = receive_captured(&frame, true).unwrap_err();
    assert!(matches!(e, ProtocolError::BadFlags { .. }), "{e}");
}

#[test]
fn several_epochs_on_one_stream() {
    const SIZE: u64 = 32 << 20;
    let src = vmm::memory::create(SIZE).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let sender = thread::spawn(move || {
        let mut s = Sender::new(a);
        s.send_hello(&config(SIZE)).unwrap();
        for epoch in 0..5u64 {
            src.write_slice(&epoch.to_le_bytes(), page(epoch * 10))
                .unwrap();
            let dirty = DirtyPages::from_bitmaps(&[], &src, true).unwrap();
            s.send_memory(&src, &dirty).unwrap();
            s.send_state(&DummyState {
                epoch,
                regs: vec![],
            })
            .unwrap();
            s.send_complete().unwrap();
            s.recv_ack().unwrap();
        }
        src
    });
    let mut r = Receiver::new(b);
    let cfg = r.recv_hello().unwrap();
    let dst = vmm::memory::create(cfg.memory.size).unwrap();
    for epoch in 0..5u64 {
        let st: DummyState = r.recv_state(&dst).unwrap();
        assert_eq!(st.epoch, epoch);
        r.send_ack().unwrap();
    }
    let src = sender.join().unwrap();
    assert_same(&src, &dst);
    assert_eq!(r.stats().pages, 5);
}

/// Writes raw frames (numbered from 0) to a receiver and returns its error and what it sent
/// back.
fn feed(frames: &[(FrameType, u8, Vec<u8>)], mem_size: u64) -> (ProtocolError, Vec<String>) {
    let (mut a, b) = UnixStream::pair().unwrap();
    for (seq, (kind, flags, payload)) in frames.iter().enumerate() {
        a.write_all(&encode_frame(*kind, *flags, seq as u32, payload))
            .unwrap();
    }
    a.shutdown(std::net::Shutdown::Write).unwrap();
    let mut r = Receiver::new(b);
    let mem = vmm::memory::create(mem_size).unwrap();
    let err = match r.recv_hello() {
        Err(e) => e,
        Ok(_) => r.recv_state::<DummyState>(&mem).unwrap_err(),
    };
    drop(r);
    // Nothing may have been written into memory by a rejected stream (tests below only
    // send invalid page frames).
    let mut replies = Vec::new();
    let mut reader = FrameReader::new();
    while let Ok(f) = reader.read_frame(&mut a) {
        if let Ok(Message::Error { message }) = Message::parse(&f) {
            replies.push(message);
        }
    }
    (err, replies)
}

fn hello(version: u32) -> (FrameType, u8, Vec<u8>) {
    let mut p = version.to_le_bytes().to_vec();
    p.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    p.extend_from_slice(&serde_json::to_vec(&config(32 << 20)).unwrap());
    (FrameType::Hello, 0, p)
}

fn pages_payload(entries: &[u64], data: &[u8]) -> Vec<u8> {
    let mut p = (entries.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for e in entries {
        p.extend_from_slice(&e.to_le_bytes());
    }
    p.extend_from_slice(data);
    p
}

#[test]
fn state_before_hello() {
    let (e, replies) = feed(&[(FrameType::State, 0, b"{}".to_vec())], 32 << 20);
    assert!(matches!(e, ProtocolError::UnexpectedFrame { .. }), "{e}");
    assert_eq!(e.to_string(), "unexpected State frame before Hello");
    assert_eq!(replies, vec![e.to_string()]);
}

#[test]
fn compressed_state_round_trips_and_bad_lz4_state_is_refused() {
    let state = DummyState {
        epoch: 3,
        regs: vec![7; 4096],
    };
    let json = encode_state(&state).unwrap();
    let packed = lz4_flex::block::compress_prepend_size(&json);
    assert!(packed.len() < json.len() / 4);
    let decoded = Message::state_bytes(&packed, true).unwrap();
    assert_eq!(&decoded[..], &json[..]);
    assert_eq!(&Message::state_bytes(&json, false).unwrap()[..], &json[..]);
    assert_eq!(decode_state::<DummyState>(&decoded).unwrap(), state);

    let mut huge = packed.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut short = packed.clone();
    short[..4].copy_from_slice(&((json.len() + 1) as u32).to_le_bytes());
    for (bad, why) in [
        (vec![1, 2], "shorter than its length"),
        (huge, "more than"),
        (short, "decompresses to"),
        (vec![16, 0, 0, 0, 0xff, 0xff], "LZ4 state"),
    ] {
        let (e, _) = feed(
            &[hello(PROTOCOL_VERSION), (FrameType::State, 1, bad)],
            32 << 20,
        );
        assert!(e.to_string().contains(why), "{why}: {e}");
    }
    // The flag is only for State and MemoryPages.
    let (e, _) = feed(
        &[hello(PROTOCOL_VERSION), (FrameType::Complete, 1, vec![])],
        32 << 20,
    );
    assert!(e.to_string().contains("invalid flags"), "{e}");
}

#[test]
fn a_state_that_does_not_decode_whole_is_refused() {
    let state = DummyState {
        epoch: 3,
        regs: vec![1, 2, 3],
    };
    let encoded = encode_state(&state).unwrap();
    assert_eq!(decode_state::<DummyState>(&encoded).unwrap(), state);
    let mut longer = encoded.clone();
    longer.push(0);
    let cut = encoded[..encoded.len() - 1].to_vec();
    // A count of registers far beyond the bytes that follow (a varint of 2^35).
    let lying = vec![3, 0x80, 0x80, 0x80, 0x80, 0x01, 1];
    for (bad, why) in [
        (longer, "1 bytes after its end"),
        (cut, "invalid VM state"),
        (lying, "invalid VM state"),
        (b"{}".to_vec(), "invalid VM state"),
    ] {
        let e = decode_state::<DummyState>(&bad).unwrap_err();
        assert!(e.to_string().contains(why), "{why}: {e}");
        let (e, replies) = feed(
            &[hello(PROTOCOL_VERSION), (FrameType::State, 0, bad)],
            32 << 20,
        );
        assert!(e.to_string().contains(why), "{why}: {e}");
        assert_eq!(replies, vec![e.to_string()]);
    }
}

#[test]
fn complete_without_state() {
    let (e, _) = feed(
        &[hello(PROTOCOL_VERSION), (FrameType::Complete, 0, vec![])],
        32 << 20,
    );
    assert!(e.to_string().contains("unexpected Complete frame"), "{e}");
}

#[test]
fn second_hello_and_ack_from_sender() {
    let (e, _) = feed(
        &[hello(PROTOCOL_VERSION), hello(PROTOCOL_VERSION)],
        32 << 20,
    );
    assert!(e.to_string().contains("unexpected Hello frame"), "{e}");
    let (e, _) = feed(
        &[hello(PROTOCOL_VERSION), (FrameType::Ack, 0, vec![])],
        32 << 20,
    );
    assert!(e.to_string().contains("unexpected Ack frame"), "{e}");
}

#[test]
fn wrong_version_is_reported_to_the_sender() {
    let (e, replies) = feed(&[hello(PROTOCOL_VERSION + 1)], 32 << 20);
    assert_eq!(
        e.to_string(),
        format!(
            "unsupported migration protocol version {} (this VMM speaks version \
             {PROTOCOL_VERSION})",
            PROTOCOL_VERSION + 1
        )
    );
    assert_eq!(replies, vec![e.to_string()]);
}

#[test]
fn bad_config_in_hello() {
    let mut p = PROTOCOL_VERSION.to_le_bytes().to_vec();
    p.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    p.extend_from_slice(b"{\"memory\": {\"size\": \"big\"}}");
    let (e, _) = feed(&[(FrameType::Hello, 0, p)], 32 << 20);
    assert!(
        e.to_string()
            .starts_with("invalid VM configuration in Hello"),
        "{e}"
    );
}

#[test]
fn page_outside_memory_writes_nothing() {
    let data = vec![0x11u8; 2 * PAGE_SIZE];
    let frames = [
        hello(PROTOCOL_VERSION),
        (
            FrameType::MemoryPages,
            0,
            pages_payload(&[0x1000, 64 << 20], &data),
        ),
    ];
    let (mut a, b) = UnixStream::pair().unwrap();
    for (seq, (kind, flags, payload)) in frames.iter().enumerate() {
        a.write_all(&encode_frame(*kind, *flags, seq as u32, payload))
            .unwrap();
    }
    let mut r = Receiver::new(b);
    r.recv_hello().unwrap();
    let mem = vmm::memory::create(32 << 20).unwrap();
    let e = r.recv_state::<DummyState>(&mem).unwrap_err();
    assert_eq!(e.to_string(), "guest page 0x4000000: outside guest memory");
    assert!(DirtyPages::from_bitmaps(&[], &mem, true)
        .unwrap()
        .is_empty());
    let mut first = [0u8; 8];
    mem.read_slice(&mut first, GuestAddress(0x1000)).unwrap();
    assert_eq!(first, [0; 8]);
}

#[test]
fn page_count_mismatch() {
    let mut done = 0u32.to_le_bytes().to_vec();
    done.extend_from_slice(&0u32.to_le_bytes());
    done.extend_from_slice(&5u64.to_le_bytes());
    let frames = [
        hello(PROTOCOL_VERSION),
        (FrameType::MemoryPages, 0, pages_payload(&[0x1001], &[])),
        (FrameType::MemoryDone, 0, done),
    ];
    let (e, _) = feed(&frames, 32 << 20);
    assert_eq!(
        e.to_string(),
        "memory pass 0: the sender counted 5 pages, 1 arrived"
    );
}

/// Data streams are fault tolerance's: a migration's MemoryDone that names any is refused,
/// and no MemoryDone may name more than MAX_LANES or a count its length does not hold.
#[test]
fn memory_done_naming_data_streams() {
    let done = |lanes: u32, entries: usize| {
        let mut d = 0u32.to_le_bytes().to_vec();
        d.extend_from_slice(&lanes.to_le_bytes());
        d.extend_from_slice(&0u64.to_le_bytes());
        d.extend(std::iter::repeat_n(0u8, 8 * entries));
        d
    };
    for (payload, needle) in [
        (
            done(1, 1),
            "data streams are fault tolerance's; a migration has one stream",
        ),
        (done(9, 9), "9 data streams, at most 8"),
        (done(2, 1), "payload is 24 bytes, expected 32"),
        (done(0, 1), "payload is 24 bytes, expected 16"),
    ] {
        let frames = [hello(PROTOCOL_VERSION), (FrameType::MemoryDone, 0, payload)];
        let (e, _) = feed(&frames, 32 << 20);
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }
}

#[test]
fn malformed_page_frames() {
    for (flags, payload, needle) in [
        (
            0,
            pages_payload(&[0x1000], &[1, 2, 3]),
            "bytes of page data",
        ),
        (0, pages_payload(&[0x1010], &[]), "is not a page address"),
        (
            1,
            pages_payload(&[0x1001], &[1]),
            "LZ4 flag on a frame without page data",
        ),
        (1, pages_payload(&[0x1000], &[0xff; 40]), "LZ4"),
        (0, vec![1, 2, 3], "shorter than 8 bytes"),
        (
            0,
            {
                let mut p = pages_payload(&[], &[]);
                p[0..4].copy_from_slice(&100_000u32.to_le_bytes());
                p
            },
            "the limit is",
        ),
    ] {
        let (e, replies) = feed(
            &[
                hello(PROTOCOL_VERSION),
                (FrameType::MemoryPages, flags, payload),
            ],
            32 << 20,
        );
        assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        assert_eq!(replies.len(), 1);
    }
}

#[test]
fn abort_from_the_sender() {
    let (e, replies) = feed(
        &[
            hello(PROTOCOL_VERSION),
            (FrameType::Abort, 0, b"source VM failed".to_vec()),
        ],
        32 << 20,
    );
    assert_eq!(
        e.to_string(),
        "the sender aborted the migration: source VM failed"
    );
    assert!(replies.is_empty());
}

#[test]
fn corrupted_frame_is_rejected() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let (k, f, p) = hello(PROTOCOL_VERSION);
    let mut frame = encode_frame(k, f, 0, &p);
    frame[20] ^= 1;
    a.write_all(&frame).unwrap();
    let mut r = Receiver::new(b);
    let e = r.recv_hello().unwrap_err();
    assert!(
        e.to_string().starts_with("frame 0: checksum mismatch"),
        "{e}"
    );
}

#[test]
fn sender_closes_mid_stream() {
    const SIZE: u64 = 32 << 20;
    let (a, b) = UnixStream::pair().unwrap();
    let sender = thread::spawn(move || {
        // Send Hello and half of a page frame, then vanish.
        let src = vmm::memory::create(SIZE).unwrap();
        fill(&src, 100);
        let mut s = Sender::new(Capture::default());
        s.send_hello(&config(SIZE)).unwrap();
        s.send_all_memory(&src).unwrap();
        let buf = s.into_inner().0;
        let mut a = a;
        a.write_all(&buf[..buf.len() / 2]).unwrap();
    });
    let mut r = Receiver::new(b);
    r.recv_hello().unwrap();
    let dst = vmm::memory::create(SIZE).unwrap();
    let e = r.recv_state::<DummyState>(&dst).unwrap_err();
    sender.join().unwrap();
    assert!(
        matches!(e, ProtocolError::Truncated { .. } | ProtocolError::Closed),
        "{e}"
    );
    println!("{e}");
}

/// A write-only stream collecting bytes (reads see EOF).
#[derive(Default)]
struct Capture(Vec<u8>);

impl Read for Capture {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }
}

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn receiver_closes_mid_stream() {
    const SIZE: u64 = 64 << 20;
    let (a, b) = UnixStream::pair().unwrap();
    let receiver = thread::spawn(move || {
        let mut r = Receiver::new(b);
        r.recv_hello().unwrap();
        r.send_error("cannot create the VM: out of memory").unwrap();
        // Dropping `r` closes the stream without reading further.
    });
    let src = vmm::memory::create(SIZE).unwrap();
    fill(&src, 5000);
    let mut s = Sender::new(a);
    s.send_hello(&config(SIZE)).unwrap();
    receiver.join().unwrap();
    let e = s.send_all_memory(&src).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the receiver reported an error: cannot create the VM: out of memory"
    );
}

#[test]
fn receiver_gone_before_ack() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut s = Sender::new(a);
    s.send_hello(&config(32 << 20)).unwrap();
    s.send_state(&DummyState {
        epoch: 0,
        regs: vec![],
    })
    .unwrap();
    s.send_complete().unwrap();
    drop(b);
    let e = s.recv_ack().unwrap_err();
    assert!(
        matches!(e, ProtocolError::Closed | ProtocolError::Io(_)),
        "{e}"
    );
}

#[test]
fn sender_refuses_memory_before_hello() {
    let (a, _b) = UnixStream::pair().unwrap();
    let mut s = Sender::new(a);
    let mem = vmm::memory::create(32 << 20).unwrap();
    assert_eq!(
        s.send_all_memory(&mem).unwrap_err().to_string(),
        "memory before Hello"
    );
}

fn throughput(size: u64, options: SenderOptions, label: &str) {
    throughput_into(size, options, label, false);
    throughput_into(size, options, label, true);
}

/// `populated`: the destination's memory is faulted in before the clock starts, which
/// separates the protocol's cost from the kernel's page-fault cost on a fresh mapping.
fn throughput_into(size: u64, options: SenderOptions, label: &str, populated: bool) {
    let src = vmm::memory::create(size).unwrap();
    // Every page non-zero and not trivially compressible: worst case for the raw path.
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in chunk.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    let mut off = 0;
    while off < size {
        chunk[0..8].copy_from_slice(&off.to_le_bytes());
        src.write_slice(&chunk, GuestAddress(off)).unwrap();
        off += chunk.len() as u64;
    }
    let dst = vmm::memory::create(size).unwrap();
    if populated {
        let mut off = 0;
        while off < size {
            dst.write_slice(&[1], GuestAddress(off)).unwrap();
            off += PAGE_SIZE as u64;
        }
    }
    let (a, b) = UnixStream::pair().unwrap();
    let start = Instant::now();
    let sender = thread::spawn(move || {
        let mut s = Sender::with_options(a, options);
        s.send_hello(&config(size)).unwrap();
        s.send_all_memory(&src).unwrap();
        s.send_state(&DummyState {
            epoch: 0,
            regs: vec![],
        })
        .unwrap();
        s.send_complete().unwrap();
        s.recv_ack().unwrap();
        s.stats()
    });
    let mut r = Receiver::new(b);
    let cfg = r.recv_hello().unwrap();
    assert_eq!(cfg.memory.size, size);
    let _: DummyState = r.recv_state(&dst).unwrap();
    r.send_ack().unwrap();
    let stats = sender.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{label}{}: {} MiB of non-zero pages in {:.3} s = {:.0} MB/s ({} bytes on the wire, {} frames)",
        if populated { ", destination pre-faulted" } else { ", fresh destination" },
        size >> 20,
        secs,
        size as f64 / secs / 1e6,
        stats.bytes,
        stats.frames
    );
}

/// Prints the transfer rate of 256 MiB of non-zero pages over a Unix stream pair.
#[test]
fn throughput_256mib() {
    throughput(256 << 20, SenderOptions::default(), "raw");
}

/// The same with 1 GiB and both encodings: `cargo test --release -p vmm --test
/// migration_protocol throughput_1gib -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput_1gib() {
    throughput(1 << 30, SenderOptions::default(), "raw, 1 GiB");
    throughput(
        1 << 30,
        SenderOptions {
            compress: true,
            ..SenderOptions::default()
        },
        "lz4, 1 GiB",
    );
}

/// A frame sent in pieces is the same frame as one sent whole, checked or not.
#[test]
fn a_frame_in_pieces_is_the_frame_sent_whole() {
    let parts: [&[u8]; 4] = [b"", &[1; 5000], b"xy", &[7; 70_000]];
    let whole = parts.concat();
    for checksums in [true, false] {
        let options = SenderOptions {
            checksums,
            ..SenderOptions::default()
        };
        let mut sent = Vec::new();
        for in_pieces in [false, true] {
            let mut sender = Sender::with_options(std::io::Cursor::new(Vec::new()), options);
            sender.send_hello(&config(1 << 20)).unwrap();
            if in_pieces {
                sender.send_frame_parts(FrameType::State, &parts).unwrap();
            } else {
                sender.send_frame(FrameType::State, &whole).unwrap();
            }
            let stats = sender.stats();
            sent.push((sender.into_inner().into_inner(), stats.frames, stats.bytes));
        }
        assert!(
            sent[0] == sent[1],
            "checksums {checksums}: the frames differ"
        );
    }
}
