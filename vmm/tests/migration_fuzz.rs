//! Property tests of the migration stream decoder: arbitrary bytes and mutated valid streams
//! never panic, never make the reader hold more than the frame bound, and always end in a
//! valid frame or an error.

use std::io::{self, Cursor, Read, Write};

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{MemoryConfig, VmConfig};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::protocol::{
    encode_frame, FrameReader, FrameType, Message, MAX_FRAME_PAYLOAD, MAX_PAGES_PER_FRAME,
};
use vmm::migration::{DirtyPages, ProtocolError, Receiver, Sender, SenderOptions, PAGE_SIZE};

const MEM_SIZE: u64 = 32 << 20;
const READER_BOUND: usize = MAX_FRAME_PAYLOAD + 4;

#[derive(Debug, Serialize, Deserialize)]
struct DummyState {
    n: u64,
}

/// Input from a byte vector, output discarded.
struct Duplex {
    input: Cursor<Vec<u8>>,
}

impl Read for Duplex {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Duplex {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Capture(Vec<u8>);

impl Read for Capture {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decodes frames from `bytes` until the first error, checking each decoded frame fully.
fn decode_all(bytes: &[u8]) -> usize {
    decode_all_from(bytes, false)
}

/// [`decode_all`] by a reader told its stream authenticates (or not).
fn decode_all_from(bytes: &[u8], authenticated: bool) -> usize {
    let mut reader = FrameReader::new();
    reader.set_authenticated(authenticated);
    let mut input = bytes;
    let mut scratch = Vec::new();
    let mut frames = 0;
    loop {
        let result = reader.read_frame(&mut input);
        let frame = match result {
            Ok(f) => f,
            Err(_) => break,
        };
        assert!(frame.payload.len() <= MAX_FRAME_PAYLOAD);
        frames += 1;
        if let Ok(Message::MemoryPages(batch)) = Message::parse(&frame) {
            assert!(batch.len() <= MAX_PAGES_PER_FRAME);
            if let Ok(data) = batch.data(&mut scratch) {
                assert_eq!(data.len(), batch.data_pages() * PAGE_SIZE);
            }
            assert!(scratch.len() <= MAX_PAGES_PER_FRAME * PAGE_SIZE);
        }
    }
    assert!(reader.buffer_capacity() <= READER_BOUND);
    frames
}

/// A valid stream: Hello, a memory pass with data, zero and (optionally) compressed pages,
/// State, Complete; without `checksums` every frame after Hello is unchecked.
fn valid_stream(compress: bool, checksums: bool) -> Vec<u8> {
    let mem = vmm::memory::create(MEM_SIZE).unwrap_or_else(|e| panic!("{e}"));
    for p in [0u64, 1, 2, 9, 100] {
        mem.write_slice(&[p as u8 + 1; 300], GuestAddress(p * PAGE_SIZE as u64))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (pages, _) = DirtyPages::from_pages(
        &mem,
        (0..12u64)
            .chain([100, 101])
            .map(|p| GuestAddress(p * PAGE_SIZE as u64)),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut s = Sender::with_options(
        Capture(Vec::new()),
        SenderOptions {
            compress,
            batch_pages: 5,
            checksums,
        },
    );
    let config = VmConfig {
        memory: MemoryConfig::with_size(MEM_SIZE),
        ..VmConfig::default()
    };
    s.send_hello(&config).unwrap_or_else(|e| panic!("{e}"));
    s.send_memory(&mem, &pages)
        .unwrap_or_else(|e| panic!("{e}"));
    s.send_state(&DummyState { n: 7 })
        .unwrap_or_else(|e| panic!("{e}"));
    s.send_complete().unwrap_or_else(|e| panic!("{e}"));
    s.into_inner().0
}

/// Runs a receiver (told its stream authenticates, or not) over `bytes`: Ok only for a
/// complete valid transfer.
fn receive(
    bytes: Vec<u8>,
    mem: &GuestMemoryMmap,
    authenticated: bool,
) -> Result<u64, ProtocolError> {
    let mut r = Receiver::new(Duplex {
        input: Cursor::new(bytes),
    });
    r.set_authenticated(authenticated);
    r.recv_hello()?;
    let st: DummyState = r.recv_state(mem)?;
    Ok(st.n)
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        value: u8,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    /// Rewrites a length field (header offset 8) of the frame starting at a header boundary.
    Length {
        at: usize,
        len: u32,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..32)
        )
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (any::<usize>(), any::<u32>()).prop_map(|(at, len)| Mutation::Length { at, len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    match m {
        Mutation::Flip { at, bit } => bytes[at % n] ^= 1 << bit,
        Mutation::Set { at, value } => bytes[at % n] = *value,
        Mutation::Truncate { at } => bytes.truncate(at % n),
        Mutation::Insert { at, bytes: b } => {
            let at = at % (n + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = at % n;
            let end = (at + len).min(n);
            bytes.drain(at..end);
        }
        Mutation::Length { at, len } => {
            // The first frame header is at 0; aim at it or at any offset.
            let at = if at % 2 == 0 { 0 } else { at % n };
            if at + 12 <= n {
                bytes[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        decode_all(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header(
        kind in 0u8..12,
        flags in any::<u8>(),
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
        seal in any::<bool>(),
    ) {
        // With a correct checksum the payload reaches the message parser.
        let bytes = match FrameType::from_u8(kind) {
            Some(k) if seal => encode_frame(k, flags & 1, 0, &payload),
            _ => {
                let mut b = encode_frame(FrameType::State, 0, 0, &payload);
                b[4] = kind;
                b[5] = flags;
                b
            }
        };
        decode_all(&bytes);
        decode_all_from(&bytes, true);
    }

    #[test]
    fn mutated_streams_fail_cleanly(
        compress in any::<bool>(),
        checksums in any::<bool>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let original = valid_stream(compress, checksums);
        let mut bytes = original.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        decode_all_from(&bytes, !checksums);
        let mem = vmm::memory::create(MEM_SIZE).unwrap_or_else(|e| panic!("{e}"));
        match receive(bytes.clone(), &mem, !checksums) {
            // A checked stream is accepted only if the mutation left it intact (e.g. a byte
            // set to its own value) or cut only after the Complete frame. An unchecked one
            // relies on its transport (TLS) for that: here it must only fail cleanly.
            Ok(n) if checksums => {
                prop_assert_eq!(n, 7);
                prop_assert!(bytes.starts_with(&original) || original.starts_with(&bytes));
            }
            Ok(_) => {}
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!text.is_empty() && !text.contains('\n'));
            }
        }
    }
}

#[test]
fn valid_streams_decode() {
    for (compress, checksums) in [(false, true), (true, true), (true, false)] {
        let bytes = valid_stream(compress, checksums);
        // Hello, 3 page frames (14 pages by 5), MemoryDone, State, Complete.
        assert_eq!(decode_all_from(&bytes, !checksums), 7);
        let mem = vmm::memory::create(MEM_SIZE).unwrap();
        assert_eq!(receive(bytes, &mem, !checksums).unwrap(), 7);
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(100 * PAGE_SIZE as u64))
            .unwrap();
        assert_eq!(b[0], 101);
    }
}

#[test]
fn huge_length_is_refused_before_allocation() {
    let mut frame = encode_frame(FrameType::State, 0, 0, b"{}");
    frame[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut reader = FrameReader::new();
    let e = reader.read_frame(&mut frame.as_slice()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("frame of 4294967295 bytes exceeds the limit of {MAX_FRAME_PAYLOAD} bytes")
    );
    assert_eq!(reader.buffer_capacity(), 0);
}

#[test]
fn announced_length_allocates_only_as_data_arrives() {
    // A header announcing the maximum, followed by 10 bytes: the reader reserves only its
    // first read size, not 64 MiB.
    let mut frame = encode_frame(FrameType::State, 0, 0, &[b' '; 10]);
    frame[8..12].copy_from_slice(&(MAX_FRAME_PAYLOAD as u32).to_le_bytes());
    let mut reader = FrameReader::new();
    let e = reader.read_frame(&mut frame.as_slice()).unwrap_err();
    assert!(matches!(e, ProtocolError::Truncated { .. }), "{e}");
    assert!(reader.buffer_capacity() <= 64 << 10);
}

/// A payload taken out of the reader is the frame's payload alone, and the reader reads the
/// next frames into the buffer handed in, growing it only when they need more room.
#[test]
fn a_taken_payload_leaves_the_reader_reading_into_the_replacement() {
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut stream = encode_frame(FrameType::State, 0, 0, &big);
    stream.extend(encode_frame(FrameType::State, 0, 1, &[2; 50]));
    stream.extend(encode_frame(FrameType::State, 0, 2, &[3; 5000]));
    let mut stream = stream.as_slice();
    let mut reader = FrameReader::new();
    let len = reader.read_frame(&mut stream).unwrap().payload.len();
    let replacement = vec![9u8; 1000];
    assert_eq!(reader.take_payload(len, replacement), big);
    assert_eq!(reader.buffer_capacity(), 1000);
    let frame = reader.read_frame(&mut stream).unwrap();
    assert_eq!(frame.payload, &[2; 50]);
    assert_eq!(reader.buffer_capacity(), 1000);
    assert_eq!(reader.take_payload(50, Vec::new()), vec![2; 50]);
    assert_eq!(reader.read_frame(&mut stream).unwrap().payload, &[3; 5000]);
}

#[test]
fn bad_magic_unknown_type_reserved_flags_sequence() {
    let good = encode_frame(FrameType::Complete, 0, 0, &[]);
    let cases: [(usize, u8, &str); 4] = [
        (0, b'X', "bad frame magic"),
        (4, 99, "unknown frame type 99"),
        (6, 1, "reserved field"),
        (12, 5, "checksum mismatch"),
    ];
    for (at, value, needle) in cases {
        let mut f = good.clone();
        f[at] = value;
        let e = FrameReader::new()
            .read_frame(&mut f.as_slice())
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e} lacks {needle}");
    }
    let flagged = encode_frame(FrameType::Complete, 1, 0, &[]);
    let e = FrameReader::new()
        .read_frame(&mut flagged.as_slice())
        .unwrap_err();
    assert_eq!(e.to_string(), "Complete frame: invalid flags 0x01");
    let out_of_order = encode_frame(FrameType::Complete, 0, 3, &[]);
    let e = FrameReader::new()
        .read_frame(&mut out_of_order.as_slice())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "frame sequence number 3, expected 0 (frames lost or repeated)"
    );
    let empty: &[u8] = &[];
    assert!(matches!(
        FrameReader::new().read_frame(&mut &*empty),
        Err(ProtocolError::Closed)
    ));
}
