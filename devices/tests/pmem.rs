//! virtio-pmem end to end: a `Pmem` behind a virtio-pci function, driven by the in-test
//! driver, over a backing file in the target's temporary directory. Guest stores to the region
//! are stood in for by writes through the backing's mapping (what KVM maps for the guest).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use devices::virtio::pmem::*;
use devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 4 << 20;
const MIB: u64 = 1 << 20;
/// Where the tests place the region in the guest's physical address space.
const START: u64 = 0x1_0000_0000;
const QSIZE: u16 = 16;

/// A file of `len` bytes of a known pattern; removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(len: u64) -> (TempFile, Vec<u8>) {
        let path = temp_path("pmem");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        (TempFile(path), data)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn temp_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{what}-{}-{n}", std::process::id()))
}

fn pmem(path: &Path, discard_writes: bool) -> (Arc<Mutex<Pmem>>, Arc<PmemBacking>) {
    let backing = Arc::new(PmemBacking::open(path, None, discard_writes).unwrap());
    let dev = Pmem::new("_pmem0", GuestAddress(START), backing.clone()).unwrap();
    (Arc::new(Mutex::new(dev)), backing)
}

fn started(dev: &Arc<Mutex<Pmem>>) -> Harness {
    let mut h = Harness::new(dev.clone(), MEM_SIZE);
    assert_eq!(h.driver.device_features(), VIRTIO_F_VERSION_1);
    assert!(h.activate(VIRTIO_F_VERSION_1, &[QSIZE]));
    h
}

/// Submits a well-formed request of `kind` (request buffer, then a 4-byte response buffer);
/// returns the used length and the response.
fn request(h: &mut Harness, kind: u32) -> (u32, u32) {
    let req = h.buffer_with(&kind.to_le_bytes());
    let resp = h.buffer_with(&[0xaa; 4]);
    let head = h.driver.add_chain(0, &[(req, 4, false), (resp, 4, true)]);
    let used = h.kick_and_wait(0, 1);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].0, u32::from(head));
    let status = u32::from_le_bytes(h.read(resp, 4).try_into().unwrap());
    (used[0].1, status)
}

#[test]
fn config_space_has_start_and_size() {
    let (file, _) = TempFile::new(4 * MIB);
    let (dev, backing) = pmem(&file.0, false);
    assert_eq!(dev.lock().unwrap().device_type(), 27);
    assert_eq!(backing.len(), 4 * MIB);
    let h = started(&dev);
    let mut b = [0u8; 16];
    h.driver.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), START);
    assert_eq!(u64::from_le_bytes(b[8..].try_into().unwrap()), 4 * MIB);
    // As a driver reading 32-bit halves sees it.
    let mut w = [0u8; 4];
    h.driver.read_config(4, &mut w);
    assert_eq!(u32::from_le_bytes(w), (START >> 32) as u32);
    h.driver.read_config(8, &mut w);
    assert_eq!(u32::from_le_bytes(w), (4 * MIB) as u32);
    // Writes are ignored.
    h.driver.write_config(0, &[0xff; 8]);
    h.driver.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), START);
}

#[test]
fn host_mapping_shows_the_file() {
    let (file, data) = TempFile::new(2 * MIB);
    let (_, backing) = pmem(&file.0, false);
    assert_ne!(backing.host_addr(), 0);
    assert_eq!(backing.host_addr() % 4096, 0);
    let mut first = vec![0u8; 4096];
    // SAFETY: host_addr is the start of a live mapping of len() >= 4096 readable bytes.
    let raw = unsafe { std::slice::from_raw_parts(backing.host_addr() as *const u8, 4096) };
    first.copy_from_slice(raw);
    assert_eq!(first, data[..4096]);
    let mut last = [0u8; 16];
    backing.read_at(2 * MIB - 16, &mut last).unwrap();
    assert_eq!(last, data[data.len() - 16..]);
    assert!(backing.read_at(2 * MIB - 15, &mut last).is_err());
    assert!(backing.write_at(u64::MAX, &[1]).is_err());
}

#[test]
fn flush_makes_stores_reach_the_file() {
    let (file, mut data) = TempFile::new(4 * MIB);
    let (dev, backing) = pmem(&file.0, false);
    let mut h = started(&dev);
    let stored = b"persistent bytes";
    backing.write_at(3 * MIB + 5, stored).unwrap();
    data[3 * MIB as usize + 5..][..stored.len()].copy_from_slice(stored);
    assert_eq!(
        request(&mut h, VIRTIO_PMEM_REQ_TYPE_FLUSH),
        (4, VIRTIO_PMEM_RESP_OK)
    );
    assert!(std::fs::read(&file.0).unwrap() == data);
    assert_eq!(backing.private_pages().unwrap(), Vec::<u64>::new());
    let c = dev.lock().unwrap().counters();
    assert_eq!((c["flushes"], c["syncs"], c["errors"]), (1, 1, 0));

    // FLUSHes taken together share one sync.
    let mut resps = Vec::new();
    for _ in 0..3 {
        let req = h.buffer_with(&0u32.to_le_bytes());
        let resp = h.buffer_with(&[0xaa; 4]);
        h.driver.add_chain(0, &[(req, 4, false), (resp, 4, true)]);
        resps.push(resp);
    }
    let used = h.kick_and_wait(0, 3);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [4, 4, 4]);
    for resp in resps {
        assert_eq!(h.read(resp, 4), [0; 4]);
    }
    let c = dev.lock().unwrap().counters();
    assert_eq!((c["flushes"], c["syncs"]), (4, 2));
}

#[test]
fn discard_writes_leaves_the_file_unchanged() {
    let (file, data) = TempFile::new(4 * MIB);
    let (dev, backing) = pmem(&file.0, true);
    assert!(backing.discard_writes());
    let mut h = started(&dev);
    let mut before = [0u8; 64];
    backing.read_at(MIB, &mut before).unwrap();
    backing.write_at(MIB + 100, &[0x5a; 8]).unwrap();
    backing.write_at(3 * MIB, &[0x33; 4]).unwrap();
    let mut after = [0u8; 8];
    backing.read_at(MIB + 100, &mut after).unwrap();
    assert_eq!(after, [0x5a; 8], "the guest sees its own stores");
    assert_eq!(
        request(&mut h, VIRTIO_PMEM_REQ_TYPE_FLUSH),
        (4, VIRTIO_PMEM_RESP_OK)
    );
    assert!(std::fs::read(&file.0).unwrap() == data, "the file changed");
    assert_eq!(backing.private_pages().unwrap(), [MIB, 3 * MIB]);
    drop(h);
    drop(dev);
    drop(backing);
    let again = PmemBacking::open(&file.0, None, true).unwrap();
    let mut b = [0u8; 64];
    again.read_at(MIB, &mut b).unwrap();
    assert_eq!(b, before);
    assert_eq!(again.private_pages().unwrap(), Vec::<u64>::new());
}

#[test]
fn a_file_smaller_than_size_is_refused() {
    let (file, _) = TempFile::new(2 * MIB);
    let e = PmemBacking::open(&file.0, Some(4 * MIB), false).unwrap_err();
    assert!(matches!(e, PmemError::FileTooSmall { .. }), "{e:?}");
    let msg = e.to_string();
    for part in [&file.0.display().to_string(), "2097152", "4194304"] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    // A larger file maps its first `size` bytes.
    let b = PmemBacking::open(&file.0, Some(2 * MIB), true).unwrap();
    assert_eq!(b.len(), 2 * MIB);
}

#[test]
fn sizes_not_a_multiple_of_2mib_are_refused() {
    let (file, _) = TempFile::new(4 * MIB);
    let e = PmemBacking::open(&file.0, Some(3 * MIB), false).unwrap_err();
    assert!(matches!(e, PmemError::SizeNotAligned { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&file.0.display().to_string()) && msg.contains("2MiB"),
        "{msg}"
    );
    let (odd, _) = TempFile::new(MIB + 4096);
    let e = PmemBacking::open(&odd.0, None, true).unwrap_err();
    assert!(matches!(e, PmemError::SizeNotAligned { .. }), "{e:?}");
    let (empty, _) = TempFile::new(0);
    let e = PmemBacking::open(&empty.0, None, false).unwrap_err();
    assert!(matches!(e, PmemError::Empty { .. }), "{e:?}");
}

#[test]
fn a_missing_file_is_refused_with_its_name() {
    let path = temp_path("missing");
    let e = PmemBacking::open(&path, None, false).unwrap_err();
    assert!(matches!(e, PmemError::Open { .. }), "{e:?}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}

#[test]
fn a_directory_needs_a_size_and_gets_a_temporary_file() {
    let dir = TempFile(temp_path("pmem-dir"));
    std::fs::create_dir(&dir.0).unwrap();
    let e = PmemBacking::open(&dir.0, None, false).unwrap_err();
    assert!(matches!(e, PmemError::DirectoryWithoutSize { .. }), "{e:?}");
    let b = PmemBacking::open(&dir.0, Some(2 * MIB), false).unwrap();
    assert_eq!(b.len(), 2 * MIB);
    b.write_at(0, b"tmp").unwrap();
    b.sync().unwrap();
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0, "unnamed");
}

#[test]
fn the_guest_address_must_be_aligned() {
    let (file, _) = TempFile::new(2 * MIB);
    let backing = Arc::new(PmemBacking::open(&file.0, None, false).unwrap());
    let e = Pmem::new("_pmem0", GuestAddress(START + 4096), backing.clone()).err();
    assert!(
        matches!(e, Some(PmemError::AddressNotAligned { .. })),
        "{e:?}"
    );
    let e = Pmem::new("_pmem0", GuestAddress(0u64.wrapping_sub(2 * MIB)), backing).err();
    assert!(
        matches!(e, Some(PmemError::AddressOverflow { .. })),
        "{e:?}"
    );
}

#[test]
fn an_unknown_request_type_gets_an_error() {
    let (file, _) = TempFile::new(2 * MIB);
    let (dev, _backing) = pmem(&file.0, false);
    let mut h = started(&dev);
    assert_eq!(request(&mut h, 1), (4, VIRTIO_PMEM_RESP_ERR));
    assert_eq!(request(&mut h, 0xdead_beef), (4, VIRTIO_PMEM_RESP_ERR));
    assert_eq!(request(&mut h, 0), (4, VIRTIO_PMEM_RESP_OK));
    let c = dev.lock().unwrap().counters();
    assert_eq!((c["requests"], c["flushes"], c["errors"]), (3, 1, 2));
}

/// A chain as `(address, length, device-writable)` buffers.
type Chain = Vec<(u64, u32, bool)>;

#[test]
fn malformed_chains_are_answered_or_dropped_without_harm() {
    let (file, _) = TempFile::new(2 * MIB);
    let (dev, _backing) = pmem(&file.0, false);
    let mut h = started(&dev);
    let flush = h.buffer_with(&0u32.to_le_bytes());
    let mut cases: Vec<(&str, Chain, u32, Option<u32>)> = Vec::new();
    let resp = |h: &mut Harness| h.buffer_with(&[0xaa; 4]);
    // (what, chain, used length, status written)
    cases.push(("no response buffer", vec![(flush, 4, false)], 0, None));
    // Its status goes to the first four writable bytes: the misplaced request buffer.
    let misplaced = h.buffer_with(&0u32.to_le_bytes());
    let r = resp(&mut h);
    cases.push((
        "request marked device-writable",
        vec![(misplaced, 4, true), (r, 4, true)],
        4,
        Some(VIRTIO_PMEM_RESP_ERR),
    ));
    let r = resp(&mut h);
    cases.push((
        "request too short",
        vec![(flush, 2, false), (r, 4, true)],
        4,
        Some(VIRTIO_PMEM_RESP_ERR),
    ));
    let r = resp(&mut h);
    cases.push((
        "response too short",
        vec![(flush, 4, false), (r, 2, true)],
        0,
        None,
    ));
    let r = resp(&mut h);
    let r2 = resp(&mut h);
    cases.push((
        "readable after writable",
        vec![(flush, 4, false), (r, 4, true), (r2, 4, false)],
        4,
        Some(VIRTIO_PMEM_RESP_ERR),
    ));
    let r = resp(&mut h);
    cases.push((
        "response outside guest memory",
        vec![(flush, 4, false), (MEM_SIZE as u64, 4, true)],
        0,
        None,
    ));
    cases.push((
        "request outside guest memory",
        vec![(MEM_SIZE as u64 - 2, 4, false), (r, 4, true)],
        0,
        None,
    ));
    // Any layout (2.7.4): request and response split over descriptors.
    let r = resp(&mut h);
    cases.push((
        "split request and response",
        vec![
            (flush, 2, false),
            (flush + 2, 2, false),
            (r, 1, true),
            (r + 1, 3, true),
        ],
        4,
        Some(VIRTIO_PMEM_RESP_OK),
    ));
    let r = resp(&mut h);
    cases.push((
        "oversized buffers",
        vec![(flush, 64, false), (r, 64, true)],
        4,
        Some(VIRTIO_PMEM_RESP_OK),
    ));
    for (what, chain, want_len, want_status) in cases {
        let status_at = chain.iter().find(|d| d.2).map(|d| d.0);
        let head = h.driver.add_chain(0, &chain);
        let used = h.kick_and_wait(0, 1);
        assert_eq!(used, [(u32::from(head), want_len)], "{what}");
        if let (Some(at), Some(want)) = (status_at, want_status) {
            if at < MEM_SIZE as u64 {
                let got = u32::from_le_bytes(h.read(at, 4).try_into().unwrap());
                assert_eq!(got, want, "{what}");
            }
        }
        if want_status.is_none() {
            if let Some(at) = status_at.filter(|&a| a < MEM_SIZE as u64) {
                assert_eq!(h.read(at, 2), [0xaa; 2], "{what}: nothing written");
            }
        }
    }

    // A chain whose link points past the table, and an avail entry naming no descriptor.
    let q = &h.driver.queues[0];
    let mem = h.mem().clone();
    q.write_desc(&mem, 5, flush, 4, VIRTQ_DESC_F_NEXT, 200);
    h.driver.queues[0].make_available(&mem, 5);
    h.driver.queues[0].make_available(&mem, 999);
    let used = h.kick_and_wait(0, 1);
    assert_eq!(used, [(5, 0)]);
    // Later requests still work.
    assert_eq!(request(&mut h, 0), (4, VIRTIO_PMEM_RESP_OK));
    assert!(dev.lock().unwrap().is_activated());
}

#[test]
fn state_round_trips_and_a_moved_region_is_refused() {
    let (file, _) = TempFile::new(2 * MIB);
    let (dev, backing) = pmem(&file.0, false);
    let mut h = started(&dev);
    request(&mut h, 0);
    let state = dev.lock().unwrap().state();
    assert_eq!(state.acked_features, VIRTIO_F_VERSION_1);
    assert_eq!(
        (state.start, state.size, state.discard_writes),
        (START, 2 * MIB, false)
    );
    assert_eq!(state.counters.flushes, 1);
    let back: PmemState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(back, state);
    let mut fresh = Pmem::new("_pmem0", GuestAddress(START), backing.clone()).unwrap();
    fresh.restore(&back).unwrap();
    assert_eq!(fresh.state(), state);

    let mut moved = Pmem::new("_pmem0", GuestAddress(START + 2 * MIB), backing).unwrap();
    let e = moved.restore(&state).unwrap_err();
    assert!(e.to_string().contains("_pmem0"), "{e}");
    assert_eq!(moved.state().acked_features, 0, "unchanged on error");
    let private = Arc::new(PmemBacking::open(&file.0, None, true).unwrap());
    let mut other = Pmem::new("_pmem0", GuestAddress(START), private).unwrap();
    assert!(other.restore(&state).is_err(), "discard_writes differs");
    let mut wrong = state.clone();
    wrong.avail_features = 0;
    assert!(fresh.restore(&wrong).is_err());
}

/// A restore moves a region to where the snapshot's guest had it (a hot-plug placed it there):
/// the config space says so, and the saved state then matches.
#[test]
fn a_relocated_region_restores_and_shows_its_new_start() {
    let (file, _) = TempFile::new(2 * MIB);
    let backing = Arc::new(PmemBacking::open(&file.0, None, false).unwrap());
    let saved = Pmem::new("_pmem0", GuestAddress(START + 4 * MIB), backing.clone())
        .unwrap()
        .state();
    let mut dev = Pmem::new("_pmem0", GuestAddress(START), backing).unwrap();
    assert!(matches!(
        dev.relocate(GuestAddress(START + 4096)),
        Err(PmemError::AddressNotAligned { .. })
    ));
    assert!(matches!(
        dev.relocate(GuestAddress(0u64.wrapping_sub(2 * MIB))),
        Err(PmemError::AddressOverflow { .. })
    ));
    assert_eq!(dev.start(), GuestAddress(START), "unchanged on error");
    dev.relocate(GuestAddress(START + 4 * MIB)).unwrap();
    dev.restore(&saved).unwrap();
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), START + 4 * MIB);
}

/// xorshift64: deterministic, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the device must answer for a chain of in-memory, well-linked descriptors: the used
/// length and the status (when one is written).
fn model(chain: &[(u64, u32, bool)], req_type: u32) -> (u32, Option<u32>) {
    let in_mem = |&(a, l, _): &(u64, u32, bool)| l == 0 || a + u64::from(l) <= MEM_SIZE as u64;
    if !chain.iter().all(in_mem) {
        return (0, None);
    }
    let first_writable = chain.iter().position(|d| d.2).unwrap_or(chain.len());
    let readable: u32 = chain[..first_writable].iter().map(|d| d.1).sum();
    let writable: u32 = chain[first_writable..]
        .iter()
        .filter(|d| d.2)
        .map(|d| d.1)
        .sum();
    let bad_layout = chain[first_writable..].iter().any(|d| !d.2);
    if writable < 4 {
        return (0, None);
    }
    let status = if !bad_layout && readable >= 4 && req_type == 0 {
        VIRTIO_PMEM_RESP_OK
    } else {
        VIRTIO_PMEM_RESP_ERR
    };
    (4, Some(status))
}

#[test]
fn random_queue_contents_property() {
    let (file, _) = TempFile::new(2 * MIB);
    let (dev, _backing) = pmem(&file.0, false);
    let mut h = started(&dev);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // A pool of buffers: requests are read from and statuses written to them.
    let pool = h.buffer(64 * 1024);
    let mem = h.mem().clone();
    // How often each outcome came up: answered OK, answered with an error, returned
    // unanswered, chaos.
    let mut tally = [0u32; 4];
    for round in 0..400 {
        if rng.below(5) == 0 {
            // Chaos: raw descriptor bytes and a random avail entry; no panic, at most one
            // answer, and the queue keeps working (checked by the modelled rounds after).
            let q = &h.driver.queues[0];
            let head = rng.below(u64::from(QSIZE)) as u16;
            for i in 0..3u16 {
                let addr = if rng.below(2) == 0 {
                    pool + rng.below(64 * 1024)
                } else {
                    rng.next()
                };
                q.write_desc(
                    &mem,
                    (head + i) % QSIZE,
                    addr,
                    rng.next() as u32 % 128,
                    rng.next() as u16 & 7,
                    rng.next() as u16 % (QSIZE * 2),
                );
            }
            let avail = if rng.below(8) == 0 {
                rng.next() as u16
            } else {
                head
            };
            h.driver.queues[0].make_available(&mem, avail);
            h.driver.notify(0);
            for _ in 0..3 {
                h.poll(5);
            }
            let used = h.driver.take_used(0);
            assert!(used.len() <= 1, "round {round}: {used:?}");
            if let Some(&(id, len)) = used.first() {
                assert_eq!(id, u32::from(avail), "round {round}");
                assert!(len == 0 || len == 4, "round {round}: len {len}");
            }
            tally[3] += 1;
            continue;
        }
        let n = 1 + rng.below(4) as usize;
        let req_type = match rng.below(4) {
            0 => rng.next() as u32,
            1 => 1,
            _ => 0,
        };
        let mut chain = Vec::new();
        for _ in 0..n {
            let len = rng.below(9) as u32;
            let addr = if rng.below(20) == 0 {
                MEM_SIZE as u64 - rng.below(8)
            } else {
                pool + rng.below(64 * 1024 - 16)
            };
            // Mostly readable then writable, as a driver lays them out.
            let write = if rng.below(6) == 0 {
                rng.below(2) == 0
            } else {
                chain.len() * 2 >= n
            };
            chain.push((addr, len, write));
        }
        for &(addr, len, write) in &chain {
            if !write && addr + u64::from(len) <= MEM_SIZE as u64 {
                // The request type's bytes, repeated.
                let bytes = req_type.to_le_bytes();
                let fill: Vec<u8> = (0..len as usize).map(|i| bytes[i % 4]).collect();
                mem.write_slice(&fill, GuestAddress(addr)).unwrap();
            }
        }
        // The request is the first four readable bytes, as they are now in memory (buffers
        // may overlap): read them as the device will.
        let mut seen = Vec::new();
        for &(addr, len, write) in &chain {
            if write || seen.len() >= 4 {
                break;
            }
            let take = (4 - seen.len()).min(len as usize);
            if take > 0 && addr + len as u64 <= MEM_SIZE as u64 {
                seen.extend(h.read(addr, take));
            }
        }
        let seen_type = if seen.len() >= 4 {
            u32::from_le_bytes(seen[..4].try_into().unwrap())
        } else {
            req_type
        };
        let (want_len, want_status) = model(&chain, seen_type);
        tally[match want_status {
            Some(VIRTIO_PMEM_RESP_OK) => 0,
            Some(_) => 1,
            None => 2,
        }] += 1;
        let head = h.driver.add_chain(0, &chain);
        let used = h.kick_and_wait(0, 1);
        assert_eq!(
            used,
            [(u32::from(head), want_len)],
            "round {round}: {chain:x?} type {seen_type:#x}"
        );
        if let Some(want) = want_status {
            // The status is the first four writable bytes, possibly split.
            let mut got = Vec::new();
            for &(addr, len, write) in chain.iter().skip_while(|d| !d.2) {
                if write && got.len() < 4 {
                    let take = (4 - got.len()).min(len as usize);
                    got.extend(h.read(addr, take));
                }
            }
            assert_eq!(
                u32::from_le_bytes(got[..4].try_into().unwrap()),
                want,
                "round {round}: {chain:x?}"
            );
        }
    }
    assert!(tally.iter().all(|&n| n >= 20), "outcomes {tally:?}");
    assert_eq!(request(&mut h, 0), (4, VIRTIO_PMEM_RESP_OK));
    assert!(dev.lock().unwrap().counters()["requests"] >= 400);
}
